// npm's "install" step: node-gyp-build, which keeps the prebuilt binary when one loads here and
// otherwise builds the CPU addon from source with node-gyp (binding.gyp).
//
// NOTE: [offline source build]
// node-gyp downloads Node's headers from nodejs.org for every source build, unless it is
// told where they are (--nodedir, or npm_config_nodedir). Nothing in the install may
// download from the internet except npm packages, and a machine without that access (or
// behind a proxy npm knows but node-gyp does not) would fail there. The Node.js that runs
// this script usually carries its own headers: official binaries and distribution packages
// (nodejs-dev, /usr/include/node) install them beside the executable, at
// <prefix>/include/node. When they are there (and complete enough for node-gyp: node_api.h
// and common.gypi), they are handed to node-gyp, so the build needs no network. A nodedir the
// user set stays theirs; without local headers node-gyp does what it always does.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';

/** The prefix whose include/node holds this Node's headers, or undefined. */
function localNodeDir(execPath = process.execPath) {
  const prefix = resolve(dirname(execPath), '..');
  const headers = join(prefix, 'include', 'node');
  return existsSync(join(headers, 'node_api.h')) && existsSync(join(headers, 'common.gypi')) ? prefix : undefined;
}

const env = { ...process.env };
if (!env.npm_config_nodedir) {
  const nodedir = localNodeDir();
  if (nodedir !== undefined) env.npm_config_nodedir = nodedir;
}
const bin = createRequire(import.meta.url).resolve('node-gyp-build/bin.js');
const r = spawnSync(process.execPath, [bin], { stdio: 'inherit', env });
if (r.error) console.error(`adafisher install: could not run node-gyp-build: ${r.error.message}`);
process.exit(r.status ?? 1);
