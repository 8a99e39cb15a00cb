// The standalone CUDA parity harness (test/native/cuda_parity.cc, no Node): built here with
// CMake + nvcc for one architecture, then run (1) as is — on a machine with a GPU the full
// CUDA-vs-CPU parity, determinism and guard suite; without one, the host emulation of the
// kernels' index arithmetic against the CPU backend, then "SKIP: <reason>" for the device
// part — and (2) with --self-test-cpu, which checks the harness itself against a second
// CPU backend.
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..');
const buildDir = join(root, 'build-native-test');
const exe = join(buildDir, 'cuda_parity');

function missingTool(): string | null {
  for (const tool of ['cmake', 'nvcc']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not on PATH`;
  }
  return null;
}

const missing = missingTool();
if (missing) console.log(`SKIP cuda parity harness: ${missing}; it needs CMake and the CUDA toolkit to build.`);

function run(args: string[]): { status: number | null; out: string } {
  const r = spawnSync(exe, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

function summary(out: string): { cases: number; failed: number } {
  const m = /summary: (\d+) cases, (\d+) failed/.exec(out);
  expect(m, `no summary line in harness output:\n${out.slice(-2000)}`).not.toBeNull();
  return { cases: Number(m![1]), failed: Number(m![2]) };
}

describe.skipIf(missing !== null)('CUDA parity harness (test/native)', () => {
  it('builds', () => {
    const arch = process.env.CUDAARCHS ?? '90';
    execFileSync('cmake', ['-S', join(root, 'test/native'), '-B', buildDir, `-DCMAKE_CUDA_ARCHITECTURES=${arch}`], { stdio: 'pipe' });
    execFileSync('cmake', ['--build', buildDir, '-j2'], { stdio: 'pipe' });
  }, 600_000);

  it('passes every case it can run here (GPU parity, or host emulation and a stated SKIP)', () => {
    const { status, out } = run([]);
    const s = summary(out);
    const skip = /^SKIP: (.*)$/m.exec(out);
    console.log(skip ? `harness: ${s.cases} host-emulation cases; device part skipped: ${skip[1]}` : `harness: ${s.cases} cases on the GPU`);
    expect(s.failed, out.slice(-4000)).toBe(0);
    expect(s.cases).toBeGreaterThan(0);
    expect(status).toBe(0);
  });

  it('checks itself against a second CPU backend (--self-test-cpu)', () => {
    const { status, out } = run(['--self-test-cpu']);
    const s = summary(out);
    expect(s.failed, out.slice(-4000)).toBe(0);
    expect(s.cases).toBeGreaterThan(100);
    expect(status).toBe(0);
  });
});

// The step and factor kernels are memory-bound by design (cuda/README.md, performance
// contract): a register spill or a stack frame would add local-memory traffic to every
// element. ptxas reports both per kernel; compiled here for sm_90 with the addon's flags.
describe.skipIf(missing !== null)('CUDA kernels: no spills, no stack (ptxas -v, sm_90)', () => {
  it('every kernel of cuda/*.cu has 0 bytes of stack frame, spill stores and spill loads', () => {
    const files = ['backend.cu', 'factor_kernels.cu', 'step_kernels.cu'];
    const outDir = join(buildDir, 'ptxas');
    execFileSync('mkdir', ['-p', outDir]);
    const reports = files.map((f) =>
      spawnSync(
        'nvcc',
        ['-std=c++17', '-O3', '--fmad=false', '--expt-relaxed-constexpr', '-arch=sm_90', '-Xptxas', '-v', `-I${join(root, 'native')}`, '-c', join(root, 'cuda', f), '-o', join(outDir, `${f}.o`)],
        { encoding: 'utf8' },
      ),
    );
    const kernels: string[] = [];
    for (const [i, r] of reports.entries()) {
      expect(r.status, `${files[i]}:\n${r.stderr}`).toBe(0);
      const lines = r.stderr.split('\n');
      lines.forEach((line, j) => {
        const m = /Function properties for (\S+)/.exec(line);
        if (!m) return;
        kernels.push(m[1]);
        expect(lines[j + 1], `${m[1]}`).toMatch(/0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads/);
      });
    }
    console.log(`ptxas: ${kernels.length} kernels, none with stack or spills`);
    expect(kernels.length).toBeGreaterThanOrEqual(16);
  }, 300_000);
});

