// The binary that ships in prebuilds/linux-x64 loads on every x86-64 Linux where Node 20 runs
// (glibc 2.28+: RHEL/Rocky 8, Ubuntu 20.04, Amazon Linux 2023 ...), not only on systems as
// new as the build machine: NOTE: [portable binary] in native/portable/glibc_compat.cc.
// The cmake-js build (`npm run build:native`, which CI runs and scripts/prebuild.mjs packs)
// is read with scripts/elf-needs.mjs, then loaded with every symbol bound at once.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';

import { hostLibc } from '../lib/binding.js';
import { MAX_GLIBC, portabilityProblems as problemsOf, readElfNeeds as needsOf } from '../scripts/elf-needs.mjs';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const glibcX64 = process.platform === 'linux' && process.arch === 'x64' && hostLibc() === 'glibc';

// The cmake-js builds present: build/Release when cmake-js made it, and packed prebuilds.
function cmakeJsBinaries(): string[] {
  const out: string[] = [];
  const local = join(repoRoot, 'build', 'Release', 'adafisher.node');
  if (existsSync(local)) {
    const r = spawnSync(process.execPath, ['-p', `require(${JSON.stringify(local)}).buildSystem`], { encoding: 'utf8' });
    if (r.status === 0 && r.stdout.trim() === 'cmake-js') out.push(local);
  }
  const dir = join(repoRoot, 'prebuilds', 'linux-x64');
  if (existsSync(dir)) for (const f of readdirSync(dir)) if (f.endsWith('.glibc.node')) out.push(join(dir, f));
  return out;
}

const binaries = glibcX64 ? cmakeJsBinaries() : [];
const skipReason = !glibcX64
  ? `the shipped binary is the glibc x86-64 one; this is ${process.platform}-${process.arch}`
  : binaries.length === 0
    ? 'no cmake-js build here (build/Release is node-gyp\'s or missing): `npm run build:native` makes one'
    : null;
if (skipReason) console.log(`SKIP portable binary checks: ${skipReason}`);

let scratch = '';
afterAll(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe.skipIf(skipReason !== null)(`the shipped Linux binary needs glibc ${MAX_GLIBC} at most`, () => {
  test.each(binaries)(`%s: no symbol newer than glibc ${MAX_GLIBC}, no libstdc++, only the N-API entry points exported`, (path) => {
    expect(problemsOf(path)).toEqual([]);
    const { needed, versionNeeds, imports, exports } = needsOf(path);
    // Read, not assumed empty: it binds the CUDA runtime's and the thread pool's symbols.
    expect(imports.some((s) => s.name === 'pthread_create' && s.version === 'GLIBC_2.2.5')).toBe(true);
    expect(needed).toEqual(expect.arrayContaining(['libc.so.6', 'libpthread.so.0', 'libdl.so.2', 'librt.so.1']));
    expect(needed.some((l) => l.startsWith('libstdc++'))).toBe(false);
    expect(versionNeeds.every((v) => /^(GLIBC|GCC)_/.test(v.version))).toBe(true);
    expect(exports.sort()).toEqual(['napi_register_module_v1', 'node_api_module_get_api_version_v1']);
  });

  test.each(binaries)('%s: every symbol binds at load (LD_BIND_NOW), the golden replays pass and C++ errors reach JS', (path) => {
    ensureDist();
    const env = { ...process.env, LD_BIND_NOW: '1', ADAFISHER_ADDON: path, ADAFISHER_BACKEND: 'cpu', ADAFISHER_NUM_THREADS: '2' };
    // The five trajectories recorded from the official PyTorch AdaFisher, on the thread pool.
    const demo = spawnSync(process.execPath, [join(repoRoot, 'dist', 'lib', 'cli.js'), 'demo'], { env, encoding: 'utf8' });
    expect(demo.status, `${demo.stdout}${demo.stderr}`).toBe(0);
    expect(demo.stdout).toMatch(/cpu/);
    // An exception thrown in C++ (the static libstdc++ and the system's unwinder) arrives
    // as a RangeError, and the process goes on.
    const code =
      'const b = require(process.argv[1]);' +
      "try { new b.DeviceBuffer('cpu', -1); console.log('no error'); } catch (e) { console.log(e.name + ': ' + e.message); }" +
      "const d = new b.DeviceBuffer('cpu', 4); d.fill(2); console.log(d.download().join(','));";
    const r = spawnSync(process.execPath, ['-e', code, path], { env, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^RangeError: .+\n2,2,2,2\n$/);
  });
});

// The checker itself must be able to fail: a library built the default way, against the
// system's libstdc++ and exporting its functions, is refused, with the reasons named.
const compiler = ['c++', 'g++'].find((c) => spawnSync('sh', ['-c', `command -v ${c}`]).status === 0);
if (glibcX64 && !compiler) console.log('SKIP the checker\'s own test: no C++ compiler on PATH');
describe.skipIf(!glibcX64 || !compiler)('scripts/elf-needs.mjs refuses a non-portable binary', () => {
  test('a default-linked C++ library: libstdc++ needed, extra exports', () => {
    scratch = mkdtempSync(join(tmpdir(), 'adafisher-elf-'));
    const src = join(scratch, 'lib.cc');
    writeFileSync(src, '#include <string>\n#include <thread>\nint run() { std::thread t([] {}); t.join(); return std::to_string(42).size(); }\n');
    const so = join(scratch, 'lib.so');
    const r = spawnSync(compiler!, ['-shared', '-fPIC', '-O1', src, '-o', so, '-pthread'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const problems = problemsOf(so);
    expect(problems).toContainEqual(expect.stringMatching(/^needs libstdc\+\+\.so\.6/));
    expect(problems).toContainEqual(expect.stringMatching(/^needs GLIBCXX_3\.4/));
    expect(problems).toContainEqual(expect.stringMatching(/^exports \d+ symbols besides the N-API entry points \(e\.g\. .*_Z3runv/));
    const needs = needsOf(so);
    expect(needs.imports.find((s) => s.name === '_ZNSt6thread4joinEv')?.version).toMatch(/^GLIBCXX_3\.4/);
  });
});
