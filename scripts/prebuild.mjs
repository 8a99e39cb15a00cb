#!/usr/bin/env node
// Packs the CUDA-enabled cmake-js build as prebuilds/<platform>-<arch>/adafisher.<libc>.node
// (`npm run prebuild:binary`).
//
// NOTE: [prebuild through cmake-js]
// prebuildify only knows how to run node-gyp: it spawns `opts.nodeGyp rebuild --target=…
// --arch=… --release` in `opts.cwd` and then takes the .node file from `<cwd>/build/Release`.
// binding.gyp is the CPU-only fallback, so prebuildify must not build from it. This wrapper
// hands prebuildify a generated shim as its "node-gyp" that calls this script again in
// --cmake-js mode, which runs the full CMake build (CPU + CUDA, runtime linked statically)
// into build-prebuild/cmake/ and copies the binary to build-prebuild/stage/build/Release/,
// where prebuildify picks it up, strips it and names it (N-API: no ABI tag; libc tagged so
// a glibc binary is never tried on musl). The shared build/ folder is never written.
// `cmake-js rebuild` (a fresh configure) so that a CUDAARCHS used for a quick local build
// (e.g. CUDAARCHS=90) never lingers in the cache of the binary that gets published.
//
// ADAFISHER_PREBUILD_REUSE=path/to/adafisher.node skips the compile and packs an existing
// cmake-js binary (e.g. the one .ci/run already built into build/Release), after checking
// that it was built from this package version, by cmake-js, with CUDA compiled in.
// ADAFISHER_PREBUILD_ALLOW_CPU=1 accepts a binary without CUDA (for machines without nvcc).
// The binary must carry the hash of this checkout's native sources (NOTE: [prebuild stamp] in
// scripts/source-hash.mjs: compiled in by the CMake build); it goes into a stamp beside the
// prebuilt binary, which `npm pack` and `npm publish` check.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { MAX_GLIBC, portabilityProblems } from './elf-needs.mjs';
import { sourceHash, stampPath } from './source-hash.mjs';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const work = join(root, 'build-prebuild');
const stage = join(work, 'stage');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const require = createRequire(import.meta.url);

function fail(message) {
  console.error(`prebuild: ${message}`);
  process.exit(1);
}

// What the binary says about itself, read in a child process (a crash there is not ours).
function describe(addon) {
  const code =
    'const b = require(process.argv[1]); const i = b.backendInfo();' +
    'console.log(JSON.stringify({ version: b.version, buildSystem: b.buildSystem, sourceHash: b.sourceHash, cuda: i.cudaCompiled, archs: i.cudaArchitectures }))';
  const out = execFileSync(process.execPath, ['-e', code, addon], { encoding: 'utf8' });
  return JSON.parse(out.trim().split('\n').pop());
}

function check(addon) {
  const d = describe(addon);
  if (d.version !== pkg.version) fail(`${addon} was built for adafisher ${d.version}, package.json says ${pkg.version}`);
  if (d.buildSystem !== 'cmake-js') fail(`${addon} was built with ${d.buildSystem}, expected the cmake-js build`);
  if (d.sourceHash !== sourceHash(root)) {
    fail(`${addon} was built from other native sources than this checkout's (its hash ${d.sourceHash || 'none'}): rebuild it (npm run build:native)`);
  }
  if (!d.cuda && process.env.ADAFISHER_PREBUILD_ALLOW_CPU !== '1') {
    fail(`${addon} has no CUDA backend (no nvcc found?); set ADAFISHER_PREBUILD_ALLOW_CPU=1 to pack a CPU-only binary`);
  }
  // The published binary must load wherever Node 20 does (NOTE: [portable binary]).
  const glibcX64 = process.platform === 'linux' && process.arch === 'x64' &&
    (process.env.LIBC || (existsSync('/etc/alpine-release') ? 'musl' : 'glibc')) === 'glibc';
  if (glibcX64) {
    const problems = portabilityProblems(addon);
    if (problems.length > 0) {
      fail(`${addon} would not load on every Linux with glibc ${MAX_GLIBC}+:\n  ${problems.join('\n  ')}\n` +
           '(built without the portable link of CMakeLists.txt, ADAFISHER_PORTABLE_LINUX?)');
    }
  }
  console.log(`prebuild: ${addon}: adafisher ${d.version}, ${d.buildSystem}, CUDA ${d.cuda ? `architectures ${d.archs}` : 'not compiled'}` +
              (glibcX64 ? `, loads on glibc ${MAX_GLIBC}+` : ''));
}

// Called by prebuildify in place of node-gyp: `rebuild --target=X --arch=Y --release|--debug …`.
function cmakeJs(args) {
  const opt = (name) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
  const config = args.includes('--debug') ? 'Debug' : 'Release';
  const out = join(stage, 'build', config);
  mkdirSync(out, { recursive: true });
  let binary = process.env.ADAFISHER_PREBUILD_REUSE ? resolve(root, process.env.ADAFISHER_PREBUILD_REUSE) : '';
  if (binary) {
    if (!existsSync(binary)) fail(`ADAFISHER_PREBUILD_REUSE=${binary}: not found`);
  } else {
    const cmakeJsBin = join(dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js');
    const cmd = [cmakeJsBin, 'rebuild', '--out', join(work, 'cmake'), '--CDADAFISHER_CUDA=ON'];
    if (opt('arch')) cmd.push('--arch', opt('arch'));
    if (config === 'Debug') cmd.push('--debug');
    console.log(`prebuild: ${cmd.join(' ')}`);
    const r = spawnSync(process.execPath, cmd, { cwd: root, stdio: 'inherit' });
    if (r.status !== 0) fail(`cmake-js exited with ${r.status ?? r.signal}`);
    binary = join(work, 'cmake', config, 'adafisher.node');
  }
  check(binary);
  copyFileSync(binary, join(out, 'adafisher.node'));
}

function main() {
  // A staging package: prebuildify reads its name from <cwd>/package.json and its binary
  // from <cwd>/build/Release; `out` puts prebuilds/ at the repository root.
  rmSync(stage, { recursive: true, force: true });
  mkdirSync(stage, { recursive: true });
  writeFileSync(join(stage, 'package.json'), JSON.stringify({ name: pkg.name, version: pkg.version }));
  const shim = join(work, 'node-gyp-shim.sh');
  writeFileSync(shim, `#!/bin/sh\nexec "${process.execPath}" "${fileURLToPath(import.meta.url)}" --cmake-js "$@"\n`);
  chmodSync(shim, 0o755);
  rmSync(join(root, 'prebuilds', `${process.platform}-${process.arch}`), { recursive: true, force: true });

  const prebuildify = require('prebuildify');
  prebuildify(
    { cwd: stage, out: root, napi: true, strip: true, tagLibc: true, nodeGyp: shim, targets: [process.versions.node] },
    (err) => {
      if (err) fail(err.message);
      const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
      for (const name of readdirSync(dir).filter((n) => n.endsWith('.node'))) {
        const d = describe(join(dir, name));
        // What the binary says it was built from (checked against the checkout by check()).
        writeFileSync(stampPath(join(dir, name)), `${JSON.stringify({ sources: d.sourceHash, version: d.version, cuda: d.cuda, architectures: d.archs }, null, 2)}\n`);
      }
      console.log(`prebuild: wrote ${execFileSync('ls', ['-l', dir], { encoding: 'utf8' }).trim()}`);
    },
  );
}

if (process.argv[2] === '--cmake-js') cmakeJs(process.argv.slice(3));
else main();
