#!/usr/bin/env node
// prepack / prepublishOnly (--publish): refuses to pack a prebuilt binary that was not built
// from this checkout's native sources, or one without CUDA (NOTE: [prebuild stamp] in
// scripts/source-hash.mjs). ADAFISHER_PREBUILD_ALLOW_CPU=1 lets a CPU-only binary through (as
// scripts/prebuild.mjs does). Without any prebuilt binary, `npm pack` only warns (npm runs
// prepack when it installs a git dependency, whose clone has none and builds from source);
// `npm publish` refuses.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { sourceHash, stampPath } from './source-hash.mjs';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const problems = [];
const publish = process.argv.includes('--publish');
const binaries = existsSync(join(root, 'prebuilds'))
  ? readdirSync(join(root, 'prebuilds'), { withFileTypes: true })
      .filter((d) => d.isDirectory())
      .flatMap((d) => readdirSync(join(root, 'prebuilds', d.name)).filter((n) => n.endsWith('.node')).map((n) => join(root, 'prebuilds', d.name, n)))
  : [];
if (binaries.length === 0) {
  if (!publish) {
    console.warn('check-prebuild: no prebuilt binary in prebuilds/: this tarball installs by building from source (`npm run prebuild:binary` makes one)');
    process.exit(0);
  }
  problems.push('no prebuilt binary in prebuilds/ (run `npm run prebuild:binary`)');
}
const hash = sourceHash(root);
const version = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version;
for (const b of binaries) {
  const name = relative(root, b);
  const stamp = stampPath(b);
  if (!existsSync(stamp)) {
    problems.push(`${name} has no stamp (${relative(root, stamp)}): it was not made by \`npm run prebuild:binary\``);
    continue;
  }
  const s = JSON.parse(readFileSync(stamp, 'utf8'));
  if (s.sources !== hash) problems.push(`${name} was built from other native sources than this checkout's`);
  if (s.version !== version) problems.push(`${name} is adafisher ${s.version}, package.json says ${version}`);
  if (!s.cuda && process.env.ADAFISHER_PREBUILD_ALLOW_CPU !== '1') problems.push(`${name} has no CUDA backend (set ADAFISHER_PREBUILD_ALLOW_CPU=1 to pack it anyway)`);
}
if (problems.length > 0) {
  console.error(`check-prebuild: not packing:\n  ${problems.join('\n  ')}\nRebuild with \`npm run prebuild:binary\` (it needs nvcc for the CUDA backend), or, after \`npm run build:native\` of these sources, pack that build: \`ADAFISHER_PREBUILD_REUSE=build/Release/adafisher.node npm run prebuild:binary\`.`);
  process.exit(1);
}
console.log(`check-prebuild: ${binaries.map((b) => relative(root, b)).join(', ')} built from these sources`);
