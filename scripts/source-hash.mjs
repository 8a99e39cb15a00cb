// NOTE: [prebuild stamp]
// A prebuilt binary is packed once and shipped as is, so a tarball could carry a binary
// compiled from older sources than the TypeScript beside it (a method the binding lacks, or
// older kernel math) while every test that builds its own addon stays green. The prebuild
// wrapper writes, next to the binary, a stamp with the hash of the native sources it was
// built from; `npm pack` (prepack: scripts/check-prebuild.mjs) and the package test refuse a
// binary whose stamp does not match the sources of the checkout.
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const ROOTS = ['native', 'cuda'];
const FILES = ['CMakeLists.txt', 'binding.gyp', 'package.json'];
const SOURCE = /\.(cc|cu|h|cuh|cpp|c|txt|cmake)$/;

/** Every file the binary is compiled from, sorted (paths relative to root). */
export function sourceFiles(root) {
  const out = [...FILES];
  const walk = (dir) => {
    for (const e of readdirSync(join(root, dir), { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (SOURCE.test(e.name)) out.push(p);
    }
  };
  ROOTS.forEach(walk);
  return out.map((p) => relative(root, join(root, p))).sort();
}

/** SHA-256 over the names and contents of sourceFiles(root) (package.json: its version only). */
export function sourceHash(root) {
  const h = createHash('sha256');
  for (const f of sourceFiles(root)) {
    const text = f === 'package.json' ? JSON.parse(readFileSync(join(root, f), 'utf8')).version : readFileSync(join(root, f));
    h.update(`${f}\0`);
    h.update(text);
    h.update('\0');
  }
  return h.digest('hex');
}

/** The newest modification time (ms) of sourceFiles(root), package.json aside (its version is checked apart). */
export function newestSource(root) {
  return Math.max(...sourceFiles(root).filter((f) => f !== 'package.json').map((f) => statSync(join(root, f)).mtimeMs));
}

/** Where the stamp of prebuilds/<platform>-<arch>/<binary> lives. */
export const stampPath = (binary) => `${binary}.sources.json`;
