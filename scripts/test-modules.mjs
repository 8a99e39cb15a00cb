// Lists the files under node_modules/ that the test suite needs at run time, one per line,
// for scripts/prepare-gpu-run.sh: the GPU machine has no npm and no network, and the whole
// node_modules (420 MB, most of it TF.js bundles for browsers) cannot travel there.
//
//   node scripts/test-modules.mjs > list && tar -cJf test-modules.tar.xz -T list
//
// The set is the package-lock.json closure (dependencies and installed optional ones) of
// what the tests import; @tensorflow/* packages are cut to what Node loads from them:
// package.json, the "main" bundle and the WebAssembly binaries of the wasm backend.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, posix } from 'node:path';

const ROOTS = ['vitest', 'fast-check', 'node-gyp-build', '@tensorflow/tfjs', '@tensorflow/tfjs-backend-wasm'];

const lock = JSON.parse(readFileSync('package-lock.json', 'utf8'));
const packages = lock.packages ?? {};

/** The lock key a dependency named `name` of the package at `from` resolves to (Node's lookup). */
function resolve(name, from) {
  for (let dir = from; ; ) {
    const key = dir ? `${dir}/node_modules/${name}` : `node_modules/${name}`;
    if (packages[key]) return key;
    if (!dir) return undefined;
    const i = dir.lastIndexOf('/node_modules/');
    dir = i < 0 ? '' : dir.slice(0, i);
  }
}

const seen = new Set();
const queue = ROOTS.map((n) => resolve(n, ''));
while (queue.length) {
  const key = queue.pop();
  if (!key || seen.has(key) || !existsSync(key)) continue; // optional, not installed here
  seen.add(key);
  const p = packages[key];
  for (const dep of Object.keys({ ...p.dependencies, ...p.optionalDependencies })) {
    if (dep.startsWith('@types/')) continue; // declarations only
    queue.push(resolve(dep, key));
  }
}

function* walk(dir) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = posix.join(dir, e.name);
    if (e.isDirectory()) {
      if (e.name !== 'node_modules') yield* walk(p); // nested packages are listed on their own
    } else if (e.isFile()) yield p;
  }
}

const files = [];
for (const key of [...seen].sort()) {
  if (key.includes('@tensorflow/')) {
    const pkg = JSON.parse(readFileSync(join(key, 'package.json'), 'utf8'));
    files.push(`${key}/package.json`, posix.join(key, pkg.main));
    const dist = join(key, 'dist');
    if (existsSync(dist) && statSync(dist).isDirectory()) {
      for (const f of readdirSync(dist)) if (f.endsWith('.wasm')) files.push(`${key}/dist/${f}`);
    }
  } else {
    files.push(...walk(key));
  }
}
process.stdout.write(`${files.join('\n')}\n`);
