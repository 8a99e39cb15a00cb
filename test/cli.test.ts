// The `adafisher` command as a user runs it: every failure is one "adafisher: ..." line on
// stderr (never a stack trace) and the documented exit code (0 ok, 1 above tolerance,
// 2 bad usage or malformed file, 3 requested backend unusable); --help prints usage, exit 0.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { beforeAll, describe, expect, test } from 'vitest';

import { backendInfo } from '../lib/index.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

beforeAll(() => ensureDist());

const cli = join(repoRoot, 'dist', 'lib', 'cli.js');
const golden = join(repoRoot, 'test', 'golden', 'mlp_adafisher.json');
const cudaUsable = backendInfo('auto').cuda.usable;

function adafisher(args: string[], env: Record<string, string> = {}) {
  const base = { ...process.env };
  delete base.ADAFISHER_BACKEND;
  delete base.ADAFISHER_NUM_THREADS;
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', env: { ...base, ...env }, timeout: 120_000 });
  return { rc: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A failure: the exit code, one message line (plus the usage hint), no stack trace. */
function expectFailure(r: ReturnType<typeof adafisher>, rc: number, message: RegExp, hint: boolean) {
  expect(r.stderr).not.toContain('    at ');
  expect(r.stderr).not.toMatch(/node:internal|\.js:\d+/);
  const lines = r.stderr.trimEnd().split('\n');
  expect(lines[0]).toMatch(/^adafisher: /);
  expect(lines[0]).toMatch(message);
  expect(lines.slice(1)).toEqual(hint ? [expect.stringMatching(/^Run 'adafisher (\w+ )?--help' for usage\.$/)] : []);
  expect(r.rc, r.stderr).toBe(rc);
}

describe('adafisher replay', () => {
  test('a golden file within tolerance: JSON report, exit 0; above the tolerance: exit 1', () => {
    const ok = adafisher(['replay', golden, '--backend', 'cpu']);
    expect(ok.rc, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ pass: true, backend: 'cpu' });
    const above = adafisher(['replay', golden, '--backend', 'cpu', '--tol', '0']);
    expect(above.rc).toBe(1);
    expect(JSON.parse(above.stdout)).toMatchObject({ pass: false, tolerance: 0 });
    expect(above.stderr).toBe('');
  });

  test('--backend cuda: runs where CUDA is usable, else exit 3 saying why', () => {
    const r = adafisher(['replay', golden, '--backend', 'cuda']);
    if (cudaUsable) expect(r.rc, r.stderr).toBe(0);
    else expectFailure(r, 3, /^adafisher: The cuda backend was requested \(option\) but cannot be used: .+/, false);
  });

  test.each([
    [['--backend', 'bogus'], /Expected one of 'auto', 'cpu', 'cuda' for --backend but received 'bogus'/],
    [['--frob'], /Unknown option '--frob'/],
    [['--tol', '-1'], /'--tol'/],
    [['--tol=-1'], /^adafisher: Expected a finite number >= 0 for --tol but received '-1'$/],
    [['--tol', 'abc'], /for --tol but received 'abc'/],
    [['--tol', ''], /for --tol but received ''$/],
  ])('bad usage %j: exit 2, one line, no stack', (extra, message) => {
    const r = adafisher(['replay', golden, ...extra]);
    expectFailure(r, 2, message, true);
    expect(r.stderr).toContain("Run 'adafisher replay --help' for usage.");
  });

  test('no file, or two: exit 2', () => {
    expectFailure(adafisher(['replay']), 2, /replay takes one FILE\.json, received none/, true);
    expectFailure(adafisher(['replay', golden, golden]), 2, /replay takes one FILE\.json, received '/, true);
  });

  test('a missing or malformed golden file: exit 2 naming the file', () => {
    expectFailure(adafisher(['replay', join(repoRoot, 'no-such.json')]), 2, /no-such\.json: cannot read \(ENOENT/, false);
    expectFailure(adafisher(['replay', join(repoRoot, 'package.json')]), 2, /package\.json: malformed golden file: \$\.config: expected an object$/, false);
  });

  test('--help prints the usage of replay and exits 0', () => {
    for (const flag of ['--help', '-h']) {
      const r = adafisher(['replay', flag]);
      expect(r.rc).toBe(0);
      expect(r.stdout).toMatch(/^Usage:\n  adafisher replay FILE\.json/);
      expect(r.stdout).toMatch(/Exit codes: 0 success; 1 .*; 2 .*; 3 /s);
      expect(r.stderr).toBe('');
    }
  });
});

describe('adafisher info', () => {
  test('reports the backend that will run, exit 0', () => {
    const r = adafisher(['info']);
    expect(r.rc, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^backend: +(cpu|cuda)/m);
    const j = JSON.parse(adafisher(['info', '--json']).stdout);
    expect(['cpu', 'cuda']).toContain(j.backend);
  });

  test('ADAFISHER_BACKEND=cuda where CUDA cannot run: no backend, the reason, exit 3 (text and --json)', () => {
    const r = adafisher(['info'], { ADAFISHER_BACKEND: 'cuda' });
    const j = adafisher(['info', '--json'], { ADAFISHER_BACKEND: 'cuda' });
    if (cudaUsable) {
      expect(r.rc).toBe(0);
      expect(r.stdout).toMatch(/^backend: +cuda$/m);
      return;
    }
    const reason = backendInfo('auto').reason;
    expect(r.stdout).toMatch(/^backend: +none: The cuda backend was requested \(ADAFISHER_BACKEND\) but cannot be used: /m);
    expect(r.stdout).not.toMatch(/^backend: +cpu/m);
    expect(r.stdout).toContain(reason);
    expectFailure(r, 3, /^adafisher: The cuda backend was requested \(ADAFISHER_BACKEND\) but cannot be used: /, false);
    expect(j.rc).toBe(3);
    const report = JSON.parse(j.stdout);
    expect(report).toMatchObject({ backend: null, requested: 'cuda', source: 'ADAFISHER_BACKEND', reason, error: { code: 'ADAFISHER_BACKEND_UNAVAILABLE' } });
  });

  test.each([
    [{ ADAFISHER_BACKEND: 'gpu' }, [], /Expected one of 'auto', 'cpu', 'cuda' for ADAFISHER_BACKEND but received 'gpu'/],
    [{ ADAFISHER_NUM_THREADS: 'abc' }, [], /Expected an integer in \[1, 256\] for ADAFISHER_NUM_THREADS but received 'abc'/],
    [{ ADAFISHER_NUM_THREADS: ' 2' }, [], /Expected an integer in \[1, 256\] for ADAFISHER_NUM_THREADS but received ' 2'/],
    [{ ADAFISHER_NUM_THREADS: '+2' }, [], /Expected an integer in \[1, 256\] for ADAFISHER_NUM_THREADS but received '\+2'/],
    [{}, ['--frob'], /Unknown option '--frob'/],
    [{}, ['extra'], /Unexpected argument 'extra'/],
  ] as [Record<string, string>, string[], RegExp][])('bad usage (env %j, args %j): exit 2, one line, no stack', (env, args, message) => {
    const r = adafisher(['info', ...args], env);
    expectFailure(r, 2, message, true);
    expect(r.stderr).toContain("Run 'adafisher info --help' for usage.");
  });

  test('--help prints the usage of info and exits 0', () => {
    const r = adafisher(['info', '--help']);
    expect(r.rc).toBe(0);
    expect(r.stdout).toMatch(/^Usage:\n  adafisher info \[--json\]/);
  });
});

describe('adafisher demo and the command itself', () => {
  test('demo --help exits 0; demo with an unusable requested backend exits 3', () => {
    const h = adafisher(['demo', '--help']);
    expect(h.rc).toBe(0);
    expect(h.stdout).toMatch(/^Usage:\n  adafisher demo/);
    expectFailure(adafisher(['demo', '--frob']), 2, /Unknown option '--frob'/, true);
    if (!cudaUsable) expectFailure(adafisher(['demo'], { ADAFISHER_BACKEND: 'cuda' }), 3, /cuda backend was requested \(ADAFISHER_BACKEND\) but cannot be used/, false);
  });

  test('--help and no arguments print the whole usage, exit 0; an unknown command exits 2', () => {
    for (const args of [['--help'], ['help'], []]) {
      const r = adafisher(args);
      expect(r.rc).toBe(0);
      for (const cmd of ['replay', 'info', 'demo', 'bench']) expect(r.stdout).toContain(`adafisher ${cmd}`);
    }
    expectFailure(adafisher(['frob']), 2, /^adafisher: unknown command 'frob'/, true);
    const pkgVersion = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { version: string }).version;
    for (const flag of ['--version', '-v']) expect(adafisher([flag])).toMatchObject({ rc: 0, stdout: `${pkgVersion}\n` });
  });
});

describe('adafisher bench', () => {
  test('bench cpu runs the CPU benchmark: a tiny run prints its JSON, exit 0', () => {
    const r = adafisher(['bench', 'cpu', '--cases', 'tiny', '--reps', '1', '--no-torch', '--json']);
    expect(r.rc, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(Object.keys(j.workloads)).toEqual(['tiny']);
    expect(j.workloads.tiny.backend).toBe('cpu');
    expect(j.bandwidth.copyGBps).toBeGreaterThan(0);
  });

  test("--help: ours, and each benchmark's own under the command's name; bad options: the benchmark's exit 2", () => {
    const h = adafisher(['bench', '--help']);
    expect(h.rc).toBe(0);
    expect(h.stdout).toMatch(/^Usage:\n  adafisher bench \[cpu\|gpu\] \[OPTIONS\]/);
    for (const target of ['cpu', 'gpu']) {
      const t = adafisher(['bench', target, '--help']);
      expect(t.rc, t.stderr).toBe(0);
      expect(t.stdout).toMatch(new RegExp(`^Usage: adafisher bench ${target} \\[options\\]`));
    }
    const bad = adafisher(['bench', 'cpu', '--cases', 'nope']);
    expect(bad.rc).toBe(2);
    expect(bad.stderr).toMatch(/^adafisher: unknown case 'nope' in --cases .*\nRun 'adafisher bench cpu --help' for usage\.\n$/);
    const target = adafisher(['bench', 'tpu']);
    expect(target.rc).toBe(2);
    expect(target.stderr).toBe("adafisher: unknown benchmark 'tpu' (expected cpu or gpu)\nRun 'adafisher bench --help' for usage.\n");
    const threads = adafisher(['bench', 'cpu', '--cases', 'tiny'], { ADAFISHER_NUM_THREADS: '0' });
    expect(threads.rc).toBe(2);
    expect(threads.stdout).toBe(''); // refused before any case ran
    expect(threads.stderr).toMatch(/^adafisher: Expected an integer in \[1, 256\] for ADAFISHER_NUM_THREADS but received '0'\n/);
    const help = adafisher(['bench', 'cpu', '--help'], { ADAFISHER_NUM_THREADS: '0' });
    expect(help.rc, help.stderr).toBe(0); // the help needs no backend
  });

  test('a SIGTERM to the command stops the benchmark and its running case too; the command exits 128 + 15', async () => {
    const base = { ...process.env };
    delete base.ADAFISHER_BACKEND;
    const cmd = spawn(process.execPath, [cli, 'bench', 'cpu', '--cases', 'mlp,cnn', '--no-torch'], { env: base, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    cmd.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<[number | null, string | null]>((resolve) => cmd.on('exit', (code, signal) => resolve([code, signal])));
    // The processes under the command: the benchmark and, once it runs, a case.
    const children = (ppid: number) =>
      execFileSync('ps', ['-eo', 'pid=,ppid='], { encoding: 'utf8' })
        .trim()
        .split('\n')
        .map((l) => l.trim().split(/\s+/).map(Number))
        .filter(([, pp]) => pp === ppid)
        .map(([pid]) => pid);
    let pids: number[] = [];
    for (let i = 0; i < 200 && pids.length < 2; i++) {
      await new Promise((r) => setTimeout(r, 50));
      const bench = children(cmd.pid!);
      pids = bench.length ? [bench[0], ...children(bench[0])] : [];
    }
    expect(pids.length, 'the benchmark and a case started').toBe(2);
    cmd.kill('SIGTERM');
    expect(await exited).toEqual([143, null]);
    expect(stderr).toMatch(/adafisher: the cpu benchmark was stopped by SIGTERM\n$/);
    // Running, that is: a zombie (state Z, dead but not yet reaped by whoever adopted it) is not.
    const running = () => pids.filter((pid) => /^[^Z]/.test(spawnSync('ps', ['-o', 'stat=', '-p', String(pid)], { encoding: 'utf8' }).stdout.trim()));
    for (let i = 0; i < 40 && running().length > 0; i++) await new Promise((r) => setTimeout(r, 50));
    expect(running(), 'processes left running').toEqual([]);
  }, 60_000);

  test('bench gpu: the GPU benchmark where CUDA is usable, else exit 3 saying why', () => {
    if (cudaUsable) {
      // The whole GPU run takes minutes: a bad option shows that the GPU benchmark was reached.
      const r = adafisher(['bench', 'gpu', '--batches', '0']);
      expect(r.rc).toBe(2);
      expect(r.stderr).toBe("adafisher: --batches expects a positive integer, got '0'\nRun 'adafisher bench gpu --help' for usage.\n");
    } else {
      expectFailure(adafisher(['bench', 'gpu']), 3, /^adafisher: the gpu benchmark needs the cuda backend, which cannot be used: .+/, false);
      // Without cpu|gpu the backend decides: cuda asked for where it cannot run is an error, not a cpu run.
      expectFailure(adafisher(['bench'], { ADAFISHER_BACKEND: 'cuda' }), 3, /^adafisher: The cuda backend was requested \(ADAFISHER_BACKEND\) but cannot be used/, false);
      // What needs no GPU is left to the GPU benchmark: its workloads, and a dry run on cpu's plumbing.
      const cases = adafisher(['bench', 'gpu', '--dump-cases']);
      expect(cases.rc, cases.stderr).toBe(0);
      expect(Object.keys(JSON.parse(cases.stdout))).toContain('big');
      const own = adafisher(['bench', 'gpu', '--backend', 'cuda']);
      expect(own.rc).toBe(3);
      expect(own.stderr).toMatch(/^GPU benchmark skipped: the cuda backend cannot be used/);
    }
  });
});
