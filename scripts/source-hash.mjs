// NOTE: [prebuild stamp]
// A prebuilt binary is packed once and shipped as is, so a tarball could carry a binary
// compiled from older sources than the TypeScript beside it (a method the binding lacks, or
// older kernel math) while every test that builds its own addon stays green. The CMake build
// compiles the hash of the native sources into the binary (`sourceHash` on the binding,
// recomputed whenever a source changes: CMAKE_CONFIGURE_DEPENDS), scripts/prebuild.mjs refuses
// a binary whose hash is not the checkout's and writes it in a stamp beside the prebuilt
// binary, and `npm publish` (prepublishOnly) / `npm pack` (prepack) check the stamp.
//
// The hash: SHA-256 of the lines "<path>\t<sha256 of the file>\n" for sourceFiles() in
// byte order, then "package.json\tversion <version>\n". CMakeLists.txt computes the same
// (ADAFISHER_SOURCE_HASH); test/package.test.ts checks that both agree.
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOTS = ['native', 'cuda'];
const FILES = ['CMakeLists.txt', 'binding.gyp'];
const SOURCE = /\.(cc|cu|h|cuh|cpp|c|txt|cmake)$/;

/** Every file the binary is compiled from, '/'-separated paths relative to root, in byte order. */
export function sourceFiles(root) {
  const out = [...FILES];
  const walk = (dir) => {
    for (const e of readdirSync(join(root, ...dir.split('/')), { withFileTypes: true })) {
      const p = `${dir}/${e.name}`;
      if (e.isDirectory()) walk(p);
      else if (SOURCE.test(e.name)) out.push(p);
    }
  };
  ROOTS.forEach(walk);
  return out.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

const sha256 = (data) => createHash('sha256').update(data).digest('hex');

/** The hash of sourceFiles(root) and the package version (see the NOTE above). */
export function sourceHash(root) {
  let text = '';
  for (const f of sourceFiles(root)) text += `${f}\t${sha256(readFileSync(join(root, ...f.split('/'))))}\n`;
  text += `package.json\tversion ${JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version}\n`;
  return sha256(text);
}

/** The newest modification time (ms) of sourceFiles(root). */
export function newestSource(root) {
  return Math.max(...sourceFiles(root).map((f) => statSync(join(root, ...f.split('/'))).mtimeMs));
}

/** Where the stamp of prebuilds/<platform>-<arch>/<binary> lives. */
export const stampPath = (binary) => `${binary}.sources.json`;

if (process.argv[1] === fileURLToPath(import.meta.url)) console.log(sourceHash(join(fileURLToPath(import.meta.url), '..', '..')));
