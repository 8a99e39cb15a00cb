// bench/gpu_summary.py prints the GPU check's table from the logs of scripts/gpu-check.sh.
// A GPU run is rare, so the parser is checked here on the logs of a real one
// (bench/results/h200-2026-11-28): a format change that it no longer reads shows in CI.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const run = join(root, 'bench/results/h200-2026-11-28');

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
      detail: 'step 0.359 ms (off) / 0.482 ms (on); 88% of copy; 1.71x fused Adam; whole 5.9x eager',
    });
    expect(rows.get('bench cnn512')?.result).toBe('MISSED: convFactors');
    expect(rows.get('bench cnn512')?.detail).toContain('conv factors 35% of copy');
  });

  it("reads ncu's CSV (stage profile, third run) into per-kernel times and a per-pass total", () => {
    const dir = mkdtempSync(join(tmpdir(), 'gpu-summary-'));
    try {
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
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
