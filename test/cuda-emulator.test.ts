// The CUDA host emulator (test/cuda-emulator/), which runs the CUDA backend's own source on
// the CPU in `npm run test:cuda-emulator`: here its self-test proves that it computes what
// CUDA computes (indices, __syncthreads, warp shuffles, stream order) and catches what it
// claims to catch (stale reads before a sync, bad copies and launches, divergent barriers,
// host access to device memory, out of memory). Built with CMake and the C++ compiler; no
// CUDA toolkit needed.
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..');
const buildDir = join(root, 'build-cuda-emulator-selftest');
const exe = join(buildDir, 'cuda_emulator_self_test');

const missing = ['cmake', 'c++'].find((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0);
if (missing) console.log(`SKIP CUDA host emulator self-test: ${missing} is not on PATH`);

describe.skipIf(missing !== undefined)('CUDA host emulator self-test', () => {
  it('builds', () => {
    execFileSync('cmake', ['-S', join(root, 'test/native'), '-B', buildDir, '-DADAFISHER_CUDA_EMULATOR=ON'], { stdio: 'pipe' });
    execFileSync('cmake', ['--build', buildDir, '--target', 'cuda_emulator_self_test', '-j2'], { stdio: 'pipe' });
  }, 300_000);

  it.each(['forward', 'reverse'])('passes every case with threads started %s', (order) => {
    const r = spawnSync(exe, [], { encoding: 'utf8', env: { ...process.env, ADAFISHER_CUDA_EMULATOR_ORDER: order } });
    const out = `${r.stdout}${r.stderr}`;
    const m = /summary: (\d+) cases, (\d+) failed/.exec(out);
    expect(m, out).not.toBeNull();
    expect(Number(m![2]), out).toBe(0);
    expect(Number(m![1])).toBeGreaterThanOrEqual(19);
    // The failure cases announce what they caught.
    expect(out).toMatch(/deadlock: 48 threads wait at __syncthreads/);
    expect(out).toMatch(/host code touched device memory/);
    expect(r.status).toBe(0);
  });
});
