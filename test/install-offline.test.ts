// The install step's source build needs no network (NOTE: [offline source build] in
// scripts/install.mjs): with no prebuild, a fresh HOME (no ~/.npmrc, no node-gyp cache) and
// every HTTP request sent to a closed port, `npm run install` builds the CPU addon with node-gyp
// against the headers of the Node.js that runs it. Without that, node-gyp fetches
// node-v*-headers.tar.gz from nodejs.org and an offline machine cannot install from a clone.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, test } from 'vitest';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const prefix = resolve(dirname(process.execPath), '..');
const headers = join(prefix, 'include', 'node');
const haveHeaders = existsSync(join(headers, 'node_api.h')) && existsSync(join(headers, 'common.gypi'));
const npm = spawnSync('npm', ['--version'], { encoding: 'utf8' });
const haveToolchain = spawnSync('make', ['--version']).status === 0 && spawnSync('c++', ['--version']).status === 0;
const skip = !haveHeaders
  ? `this Node.js has no headers at ${headers} (the install then leaves node-gyp to download them)`
  : npm.status !== 0
    ? 'npm is not on PATH'
    : !haveToolchain
      ? 'no C++ compiler or make on PATH for the source build'
      : '';
if (skip) console.log(`SKIP offline source build: ${skip}`);

const work = mkdtempSync(join(tmpdir(), 'adafisher-offline-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe.skipIf(skip !== '')('npm install from a clone, offline', () => {
  test('builds the CPU addon against the local Node.js headers, downloading nothing', () => {
    // What a clone holds for the install step, without prebuilds/ and without a build/.
    const pkgDir = join(work, 'adafisher');
    mkdirSync(pkgDir);
    for (const f of ['package.json', 'binding.gyp', 'native', 'scripts/install.mjs']) cpSync(join(root, f), join(pkgDir, f), { recursive: true });
    symlinkSync(join(root, 'node_modules'), join(pkgDir, 'node_modules'), 'dir');
    const home = join(work, 'home');
    mkdirSync(home);
    const [userRc, globalRc] = [join(work, 'user-npmrc'), join(work, 'global-npmrc')];
    for (const f of [userRc, globalRc]) writeFileSync(f, '');
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: home, npm_config_userconfig: userRc, npm_config_globalconfig: globalRc };
    for (const k of Object.keys(env)) if (/^npm_config_(nodedir|tarball|dist_url|devdir)$/i.test(k)) delete env[k];
    // Any download goes to a closed port and fails at once, network or not.
    for (const k of ['http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY']) env[k] = 'http://127.0.0.1:9';
    delete env.NO_PROXY;
    delete env.no_proxy;
    const r = spawnSync('npm', ['run', 'install', '--foreground-scripts'], { cwd: pkgDir, env, encoding: 'utf8', timeout: 540_000 });
    const out = `${r.stdout}\n${r.stderr}`;
    expect(r.status, out.slice(-3000)).toBe(0);
    expect(out).not.toMatch(/gyp http GET/);
    expect(existsSync(join(home, '.cache', 'node-gyp')), 'node-gyp cached downloaded headers').toBe(false);
    const config = readFileSync(join(pkgDir, 'build', 'config.gypi'), 'utf8');
    expect(config).toContain(`"nodedir": ${JSON.stringify(prefix)}`);
    // The addon it built loads: node-gyp's build is the CPU backend alone.
    const addon = JSON.stringify(join(pkgDir, 'build', 'Release', 'adafisher.node'));
    const code = `const b = require(${addon}); const x = new b.DeviceBuffer('cpu', 3); console.log(JSON.stringify([b.backendInfo().cudaCompiled, b.liveAllocations('cpu')]))`;
    const load = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' });
    expect(load.status, load.stderr).toBe(0);
    expect(JSON.parse(load.stdout.trim())).toEqual([false, 1]);
  }, 600_000);
});
