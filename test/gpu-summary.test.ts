// bench/gpu_summary.py prints the GPU check's table from the logs of scripts/gpu-check.sh.
// A GPU run is rare, so the parser is checked here on the logs of a real one
// (bench/results/h200-2026-11-28): a format change that it no longer reads shows in CI.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const run = join(root, 'bench/results/h200-2026-11-28');

/** Runs fn on a fresh temporary folder (a run's logs), removed afterwards. */
function inTempDir(fn: (dir: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), 'gpu-summary-'));
  try {
    fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function summary(dir: string): Map<string, { result: string; detail: string }> {
  const out = execFileSync('python3', [join(root, 'bench/gpu_summary.py'), dir], { encoding: 'utf8' });
  const rows = new Map<string, { result: string; detail: string }>();
  for (const line of out.split('\n')) {
    const m = /^\| (\S.*?) +\| (.*?) +\| ?(.*)$/.exec(line);
    if (m && m[1] !== 'check' && !m[1].startsWith('-')) rows.set(m[1], { result: m[2], detail: m[3] });
  }
  return rows;
}

describe('bench/gpu_summary.py on the logs of a real H200 run', () => {
  const rows = summary(run);

  it('reads every stage of the run', () => {
    expect(rows.get('parity')).toEqual({ result: 'PASS', detail: expect.stringContaining('213 cases, 0 failed; max rel err 1.2e-07') });
    expect(rows.get('wide')?.detail).toContain('209 samples, 0 wrong');
    expect(rows.get('golden')?.detail).toContain('conv_stride2_nobias_bn 4.3e-05');
    expect(rows.get('vitest')?.detail).toContain('277 passed');
    expect(rows.get('fuzz')?.detail).toBe('10000 calls on cuda, 0 findings, live allocations 0 -> 0');
    expect(rows.get('oom')?.detail).toMatch(/^8\/8 checks ok; cudaErrorMemoryAllocation/);
    expect(rows.get('memcheck')).toEqual({ result: 'PASS', detail: '0 errors; harness 212 cases, 0 failed' });
    expect(rows.get('racecheck')?.result).toBe('TIMEOUT (150s)');
    expect(rows.get('torch')?.detail).toContain('reproduces 5 golden files to 4.3e-05');
    expect(rows.get('profile')?.result).toBe('not run');
  });

  it('reads the benchmark verdicts and ratios', () => {
    expect(rows.get('bench big')).toEqual({
      result: 'targets met',
      detail: 'step 0.359 ms (off) / 0.482 ms (on); 88% of copy (66% guard on, 20 B/p); 1.71x fused Adam (1.27x guard on); whole 5.9x eager',
    });
    expect(rows.get('bench cnn512')?.result).toBe('MISSED: convFactors');
    expect(rows.get('bench cnn512')?.detail).toContain('conv factors 35% of copy');
  });

  it("reads ncu's CSV (stage profile, third run) into per-kernel times and a per-pass total", () => {
    inTempDir((dir) => {
      cpSync(join(root, 'bench/results/h200-2026-11-28-run3'), dir, { recursive: true });
      const rows3 = summary(dir);
      expect(rows3.get('racecheck')).toEqual({ result: 'PASS', detail: '0 hazards (0 errors, 0 warnings); harness 189 cases, 0 failed' });
      expect(rows3.get('profile')).toEqual({
        result: 'PASS',
        detail: 'GPU time per cnn512 conv-factor pass 156.9 us (kernels only), 18 launches; per kernel: profile-kernels.txt',
      });
      const kernels = readFileSync(join(dir, 'profile-kernels.txt'), 'utf8');
      expect(kernels).toMatch(/ConvPixelKernel +9 launches +15\.52 us +35\.69 MB +2300 GB\/s/);
      expect(kernels).toMatch(/PlaneReduceKernel +9 launches +19\.48 us +39\.18 MB/);
      expect(kernels).toContain('GPU time per pass 156.9 us for 232 MB of DRAM traffic');
    });
  });
});

// Lines in the formats the current harness and ncu metric list print, which no recorded run
// has yet: the plan-constant sweep of the parity stage and ncu's occupancy and registers.
describe('bench/gpu_summary.py on the newer log lines', () => {
  it('picks the fastest setting of each "tune" sweep and names the default beside it', () => {
    inTempDir((dir) => {
      writeFileSync(
        join(dir, 'parity.log'),
        [
          'tune plane quads=1 min_per_thread=16 max_blocks=4096 S calls   30.0   17.0   10.0 us, sum   57.0 us,  49.0% of copy',
          'tune plane quads=1 min_per_thread=64 max_blocks=8192 S calls   20.0   12.0    8.0 us, sum   40.0 us,  70.0% of copy',
          'tune plane quads=0 min_per_thread=128 max_blocks=2048 S calls   21.0   12.0    9.0 us, sum   42.0 us,  66.0% of copy',
          'tune conv quads=0 threads=2^18                H calls    7.0   24.0   14.0 us, sum   45.0 us,  58.0% of copy',
          'tune conv quads=1 threads=2^19                H calls    6.0   22.0   13.0 us, sum   41.0 us,  63.0% of copy',
          'tune batch job_max_blocks=512                 B calls cnn512   80.0 big   12.0 us, sum   92.0 us,  61.0% of copy',
          'tune batch job_max_blocks=all                 B calls cnn512   90.0 big   11.0 us, sum  101.0 us,  55.0% of copy',
        ].join('\n') + '\n',
      );
      expect(summary(dir).get('tune')).toEqual({
        result: 'sweep',
        detail:
          'S best plane quads=1 min_per_thread=64 max_blocks=8192 40.0 us (70%) vs default 57.0 us (49%); ' +
          'H best conv quads=1 threads=2^19 41.0 us (63%) vs default 45.0 us (58%); ' +
          'B best batch job_max_blocks=512 92.0 us (61%) vs default 101.0 us (55%)',
      });
    });
  });

  it('adds the step from Float32Arrays to a workload\'s row', () => {
    inTempDir((dir) => {
      const key = { stepGuardOffMs: 0.0438, stepGuardOnMs: 0.084, stepGuardOffFractionOfCopy: 0.2, hostArrayStepMs: 0.912, eagerTargetMet: true };
      writeFileSync(join(dir, 'gpu-bench.json'), JSON.stringify({ copyGBps: 4251, key: { mlp: key } }));
      expect(summary(dir).get('bench mlp')).toEqual({
        result: 'targets met',
        detail: 'step 0.0438 ms (off) / 0.084 ms (on); 20% of copy; Float32Array step 0.912 ms',
      });
    });
  });

  it("adds ncu's achieved occupancy and registers per kernel when the profile has them", () => {
    inTempDir((dir) => {
      const head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"';
      const row = (id: number, metric: string, unit: string, value: string) =>
        `"${id}","1","cuda_parity","127.0.0.1","PlaneReduceKernel","1","13","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","${metric}","${unit}","${value}"`;
      const rows: string[] = [head];
      for (let id = 0; id < 3; ++id) {
        rows.push(row(id, 'dram__bytes_read.sum', 'byte', '67,128,832'));
        rows.push(row(id, 'gpu__time_duration.sum', 'ns', '20,000'));
        rows.push(row(id, 'sm__warps_active.avg.pct_of_peak_sustained_active', '%', String(60 + 3 * id)));
        rows.push(row(id, 'launch__registers_per_thread', 'register/thread', '40'));
      }
      writeFileSync(join(dir, 'profile.log'), rows.join('\n') + '\n');
      writeFileSync(join(dir, 'profile.status'), 'PASS\n');
      expect(summary(dir).get('profile')?.detail).toBe(
        'GPU time per cnn512 conv-factor pass 20.0 us (kernels only), 1 launches; per kernel: profile-kernels.txt',
      );
      const kernels = readFileSync(join(dir, 'profile-kernels.txt'), 'utf8');
      expect(kernels).toMatch(/PlaneReduceKernel +3 launches +20\.00 us +67\.13 MB +3356 GB\/s +occupancy +63% +40 registers/);
    });
  });
});

// What a scripts/gpu-check.sh review found: a diverging golden replay (overall Infinity,
// which JSON writes as null) crashed the table, and a target left unmeasured (null) read as
// MISSED.
describe('bench/gpu_summary.py on failures', () => {
  it('a golden replay that diverged: inf, FAIL and why, and the rest of the table still prints', () => {
    inTempDir((dir) => {
      const report = { name: 'x', overall: null, pass: false, divergence: 'step 1 did not refresh the factors; the official run did' };
      writeFileSync(join(dir, 'golden-mlp_adafisherw_tcov2.json'), JSON.stringify(report));
      writeFileSync(join(dir, 'golden-mlp_adafisher.json'), JSON.stringify({ name: 'y', overall: 2.5e-7, pass: true }));
      writeFileSync(join(dir, 'golden.status'), 'FAIL (1 files)\n');
      const rows = summary(dir);
      expect(rows.get('golden')).toEqual({
        result: 'FAIL (1 files)',
        detail: 'mlp_adafisher 2.5e-07, mlp_adafisherw_tcov2 inf FAIL (step 1 did not refresh the factors; the official run did)',
      });
      expect(rows.get('parity')?.result).toBe('not run');
    });
  });

  it('the default step (guard on) is judged beside the 20 B/param one: its miss is named', () => {
    inTempDir((dir) => {
      const key = { stepGuardOffMs: 0.36, stepCopyTargetMet: true, stepCopyTargetMetGuardOn: false, fusedAdamTargetMet: true, fusedAdamTargetMetGuardOn: false, eagerTargetMet: true };
      writeFileSync(join(dir, 'gpu-bench.json'), JSON.stringify({ copyGBps: 4000, key: { big: key } }));
      expect(summary(dir).get('bench big')?.result).toBe('MISSED: stepCopy(guard on),fusedAdam(guard on)');
    });
  });

  it('an eager baseline that does not reproduce the golden files (NaN as null, or > 1e-4) is said so', () => {
    inTempDir((dir) => {
      const golden = { 'a.json': { maxRelError: 4e-5, worst: '' }, 'b.json': { maxRelError: null, worst: 'step 1 layer 0 H' } };
      writeFileSync(join(dir, 'torch.json'), JSON.stringify({ torch: '2.x', golden }));
      expect(summary(dir).get('torch')?.detail).toBe('torch 2.x; eager AdaFisher does NOT reproduce the golden files within 1e-4 (4.0e-05, nan)');
      writeFileSync(join(dir, 'torch.json'), JSON.stringify({ torch: '2.x', golden: { ...golden, 'b.json': { maxRelError: 3e-5, worst: '' } } }));
      expect(summary(dir).get('torch')?.detail).toBe('torch 2.x; eager AdaFisher reproduces 2 golden files to 4.0e-05');
    });
  });

  it('a sanitizer run names the harness cases that failed, and a bench cut short before any case says so', () => {
    inTempDir((dir) => {
      const fail = `FAIL ${'memory/upload_async'.padEnd(52)} 65536 floats: WAITED`;
      writeFileSync(join(dir, 'memcheck.log'), `PASS ${'step/a'.padEnd(52)} ok\n${fail}\nsummary: 2 cases, 1 failed\n========= ERROR SUMMARY: 0 errors\n`);
      writeFileSync(join(dir, 'memcheck.status'), 'FAIL (rc 1)\n');
      expect(summary(dir).get('memcheck')?.detail).toBe('0 errors; harness 2 cases, 1 failed; failing: memory/upload_async');
      writeFileSync(join(dir, 'gpu-bench.json'), JSON.stringify({ copyGBps: 4000, partial: true, key: {} }));
      expect(summary(dir).get('bench')?.detail).toBe('D2D copy 4000 GB/s; cut short before any case finished');
    });
  });

  it('a target that was not measured (null) is "not measured", not MISSED', () => {
    inTempDir((dir) => {
      const key = { stepGuardOffMs: 0.05, stepCopyTargetMet: true, fusedAdamTargetMet: null, eagerTargetMet: true };
      writeFileSync(join(dir, 'gpu-bench.json'), JSON.stringify({ copyGBps: 4000, key: { big: key } }));
      expect(summary(dir).get('bench big')?.result).toBe('not measured: fusedAdam');
      writeFileSync(join(dir, 'gpu-bench.json'), JSON.stringify({ copyGBps: 4000, key: { big: { ...key, eagerTargetMet: false } } }));
      expect(summary(dir).get('bench big')?.result).toBe('MISSED: eager');
    });
  });
});
