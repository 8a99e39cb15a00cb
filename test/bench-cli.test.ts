// The benchmark scripts' command lines (dist/bench/cpu.js, gpu.js, tfjs-overhead.js): --help
// prints the usage and exits 0, an unknown option or a bad value is one "bench: ..." line on
// stderr and exit code 2, no stack trace, and all of it before anything is measured (nothing
// here runs a benchmark). Also: a target is never reported as met without a measurement.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { beforeAll, describe, expect, test } from 'vitest';

import { describeTorch, judge, readTorchBaselines, summarize, verdict } from '../bench/common.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

/** dist/bench current too (ensureDist only looks at lib/). */
function ensureBenchDist(): void {
  ensureDist();
  const stale = readdirSync(join(repoRoot, 'bench')).filter((f) => {
    if (!f.endsWith('.ts')) return false;
    const js = join(repoRoot, 'dist', 'bench', f.replace(/\.ts$/, '.js'));
    return !existsSync(js) || statSync(js).mtimeMs < statSync(join(repoRoot, 'bench', f)).mtimeMs;
  });
  if (stale.length === 0) return;
  const r = spawnSync(process.execPath, [join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { cwd: repoRoot, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`tsc failed:\n${r.stdout}${r.stderr}`);
}

beforeAll(() => ensureBenchDist());

function bench(script: string, args: string[]) {
  const r = spawnSync(process.execPath, [join(repoRoot, 'dist', 'bench', script), ...args], { cwd: repoRoot, encoding: 'utf8', timeout: 60_000 });
  return { rc: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Exit 2, nothing on stdout, exactly one "bench: ..." line on stderr, no stack trace. */
function expectUsageError(r: ReturnType<typeof bench>, message: RegExp) {
  expect(r.stderr).not.toContain('    at ');
  expect(r.stderr).not.toMatch(/node:internal|\.js:\d+/);
  const lines = r.stderr.trimEnd().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^bench: /);
  expect(lines[0]).toMatch(message);
  expect(lines[0]).toMatch(/see 'node dist\/bench\/[\w-]+\.js --help'/);
  expect(r.stdout).toBe('');
  expect(r.rc, r.stderr).toBe(2);
}

const SCRIPTS = {
  'cpu.js': ['--cases', '--reps', '--json', '--no-torch', '--torch', '--case', '--help'],
  'gpu.js': ['--cases', '--batches', '--backend', '--torch', '--json', '--json-out', '--dump-cases', '--case', '--help'],
  'tfjs-overhead.js': ['--case', '--help'],
} as const;

describe.each(Object.entries(SCRIPTS))('%s', (script, options) => {
  test('--help and -h: usage with every option and a pointer to bench/README.md, exit 0, nothing run', () => {
    for (const flag of ['--help', '-h']) {
      const r = bench(script, [flag]);
      expect(r.rc, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      expect(r.stdout).toMatch(new RegExp(`^Usage: node dist/bench/${script.replace('.', '\\.')} `));
      expect(r.stdout).toContain('bench/README.md');
      expect(r.stdout).toMatch(/Exit code: 0 /);
      for (const o of options) expect(r.stdout).toContain(o);
    }
  });

  test('an unknown option, a missing value or a positional argument: exit 2', () => {
    expectUsageError(bench(script, ['--frob']), /^bench: Unknown option '--frob'/);
    expectUsageError(bench(script, ['--case']), /'--case <value>' argument missing/);
    expectUsageError(bench(script, ['extra']), /Unexpected argument 'extra'/);
  });
});

describe('bad values: exit 2 before anything is measured', () => {
  test.each([
    ['cpu.js', ['--cases', 'mlp', '--no-torch', '--reps', 'abc'], /--reps expects a positive integer, got 'abc'/],
    ['cpu.js', ['--reps', '0'], /--reps expects a positive integer, got '0'/],
    ['cpu.js', ['--reps', '2.5'], /--reps expects a positive integer, got '2.5'/],
    ['cpu.js', ['--reps', '-3'], /'--reps' argument is ambiguous/],
    ['cpu.js', ['--cases', 'mlp,nope'], /unknown case 'nope' in --cases \(known: mlp, cnn, cnn512, big, tiny\)/],
    ['cpu.js', ['--cases', ''], /--cases expects comma-separated case names/],
    ['cpu.js', ['--case', 'nope'], /unknown case 'nope' for --case \(known: bandwidth, /],
    ['cpu.js', ['--torch', 'torch.json', '--no-torch'], /--torch and --no-torch exclude each other/],
    ['cpu.js', ['--json=yes'], /'--json' does not take an argument/],
    ['gpu.js', ['--backend', 'cpu', '--batches', 'abc'], /--batches expects a positive integer, got 'abc'/],
    ['gpu.js', ['--backend', 'cpu', '--cases', 'nope'], /unknown case 'nope' in --cases/],
    ['gpu.js', ['--backend', 'gpu'], /--backend expects one of cuda, cpu, got 'gpu'/],
    ['gpu.js', ['--case', 'nope', '--backend', 'cpu'], /unknown case 'nope' for --case \(known: fill, /],
    ['gpu.js', ['--dump-cases', '--batches', 'x'], /--batches expects a positive integer/],
    ['tfjs-overhead.js', ['--case', '2'], /--case expects a case index 0\.\.1, got '2'/],
    ['tfjs-overhead.js', ['--case', 'x'], /--case expects a case index 0\.\.1, got 'x'/],
  ] as const)('%s %j', (script, args, message) => {
    expectUsageError(bench(script, [...args]), message);
  });
});

test("cpu.js: tiny (a call's fixed cost) is judged against no target, the PyTorch one included", () => {
  const dir = mkdtempSync(join(tmpdir(), 'adafisher-bench-'));
  try {
    // PyTorch figures for tiny as torch_baselines.py writes them (made up: only the verdicts are read).
    const file = join(dir, 'torch.json');
    const eager = { factorsMs: 1, minMaxEmaMs: 0.1, stepMs: 1, totalMs: 2.1 };
    writeFileSync(file, JSON.stringify({ device: 'cpu', torch: 'test', threads: 2, golden: {}, workloads: { tiny: { fusedAdamMs: 0.05, adam: 'fused', eager } } }));
    const json = bench('cpu.js', ['--cases', 'tiny', '--reps', '1', '--torch', file, '--json']);
    expect(json.rc, json.stderr).toBe(0);
    const v = JSON.parse(json.stdout).verdicts.tiny;
    expect(v.torch.wholeSpeedupVsEager).toBeGreaterThan(0);
    for (const key of ['met', 'target']) expect(v.torch, key).not.toHaveProperty(key);
    for (const key of ['stepGuardOffMet', 'stepGuardOnMet', 'stepTarget']) expect(v, key).not.toHaveProperty(key);
    const text = bench('cpu.js', ['--cases', 'tiny', '--reps', '1', '--torch', file]);
    expect(text.rc, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/vs eager PyTorch AdaFisher .*; a call's fixed cost: not judged/);
    expect(text.stdout).not.toMatch(/\bmet\b|MISSED/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('gpu.js --dump-cases still prints the GPU workloads for bench/torch_baselines.py', () => {
  const r = bench('gpu.js', ['--dump-cases']);
  expect(r.rc, r.stderr).toBe(0);
  expect(Object.keys(JSON.parse(r.stdout))).toEqual(['mlp', 'cnn', 'cnn512', 'big', 'tiny']);
});

describe('verdicts', () => {
  test('a target is never met without a measurement', () => {
    const le = (x: number) => x <= 1.5;
    expect(judge(0.8, le)).toBe(true);
    expect(judge(2, le)).toBe(false);
    // What a figure without samples turns into: NaN, null after IPC, then 0 or Infinity in a ratio.
    for (const x of [NaN, null, undefined, 0, Infinity, -1]) expect(judge(x, le)).toBeNull();
    expect([true, false, null, undefined].map(verdict)).toEqual(['met', 'MISSED', 'not measured', 'not measured']);
  });

  test("PyTorch baselines from a file of another kind of device are refused, and a file's are not called 'same run'", () => {
    const gpuFile = join(repoRoot, 'bench', 'results', 'h200-2026-11-28', 'torch.json');
    const onCpu = readTorchBaselines(gpuFile, 'cpu');
    expect(onCpu.error).toMatch(/measured on NVIDIA H200, this benchmark runs on cpu: its figures are not used/);
    expect(onCpu.workloads).toBeUndefined();
    const onCuda = readTorchBaselines(gpuFile, 'cuda');
    expect(onCuda.error).toBeUndefined();
    expect(onCuda.workloads?.big?.fusedAdamMs).toBeGreaterThan(0);
    expect(describeTorch(onCuda)).toMatch(new RegExp(`^PyTorch baselines \\(from ${gpuFile.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\): torch`));
  });

  test('PyTorch baselines with no golden file checked say so (not "the 0 golden trajectories to -Infinity")', () => {
    const t = { device: 'cpu', torch: '2.x', golden: {}, workloads: {} };
    expect(describeTorch(t)).toMatch(/its eager AdaFisher was not checked against the golden trajectories$/);
    expect(describeTorch({ ...t, golden: { 'a.json': { maxRelError: 2e-5 } } })).toMatch(/reproduces the 1 golden trajectories to max rel\. error 2\.0e-5$/);
  });

  test('a timing without samples is an error, not a NaN figure', () => {
    expect(() => summarize([], 1)).toThrow(/no samples/);
    expect(summarize([3, 1, 2], 1)).toMatchObject({ ms: 2, samples: 3 });
  });
});
