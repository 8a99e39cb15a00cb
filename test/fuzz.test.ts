// Property-based fuzzing of every native entry point through the raw binding, run in a
// child process (test/workers/fuzz-driver.mjs) so that a crash is reported with the input
// that caused it instead of taking the test runner down. The same driver runs under
// AddressSanitizer + UBSan via `npm run fuzz:asan` (scripts/sanitize.sh).
//
// ADAFISHER_FUZZ_CALLS (default 10000) and ADAFISHER_FUZZ_SEED (default: fixed, printed)
// replay or extend a run: `node --expose-gc test/workers/fuzz-driver.mjs --seed S --calls N`.
// The calls use the backend ADAFISHER_BACKEND names (default cpu): with cuda, the CUDA backend
// (a GPU, or the CUDA host emulator's build of the addon, test/cuda-emulator).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, expect, test } from 'vitest';

import { loadBinding } from '../lib/binding.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

beforeAll(() => ensureDist());

const CALLS = Number(process.env.ADAFISHER_FUZZ_CALLS ?? 10_000);
// A fixed seed by default, so that CI is repeatable (a new finding must not land or fail at
// random); ADAFISHER_FUZZ_SEED=random explores, any number replays.
const SEED_ENV = process.env.ADAFISHER_FUZZ_SEED;
const SEED = SEED_ENV === 'random' ? Math.floor(Math.random() * 2 ** 31) : Number(SEED_ENV ?? 20261128);
const BACKEND = process.env.ADAFISHER_BACKEND || 'cpu';

test(`${CALLS} random calls into the native binding (${BACKEND} backend): each succeeds correctly or throws the documented error`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'adafisher-fuzz-'));
  const log = join(dir, 'calls.log');
  try {
    const r = spawnSync(
      process.execPath,
      ['--expose-gc', join(repoRoot, 'test', 'workers', 'fuzz-driver.mjs'), '--calls', String(CALLS), '--seed', String(SEED), '--log', log, '--backend', BACKEND],
      { cwd: repoRoot, encoding: 'utf8', timeout: 300_000 },
    );
    const lastCall = existsSync(log) ? readFileSync(log, 'utf8').trim().split('\n').pop() : '(no log)';
    const replay = `replay: node --expose-gc test/workers/fuzz-driver.mjs --seed ${SEED} --calls ${CALLS} --backend ${BACKEND}`;
    expect(
      { status: r.status, signal: r.signal },
      `the fuzz driver died; the call it was making:\n  ${lastCall}\n${replay}\n${r.stderr.slice(-3000)}`,
    ).toEqual({ status: r.status === 1 ? 1 : 0, signal: null });
    const report = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}');
    console.log(`fuzz: ${report.calls} calls on ${report.backend} in ${report.seconds}s, seed ${SEED}, live allocations ${report.liveAllocations.start} -> ${report.liveAllocations.end}`);
    expect(report.calls).toBeGreaterThanOrEqual(CALLS);
    // Every entry point the binding exports was called: module functions, constructors, and
    // each method and getter of each class (read from the binding, so a new one counts) ...
    const entryPoints: string[] = [];
    for (const [name, value] of Object.entries(loadBinding().binding)) {
      if (typeof value !== 'function') continue;
      if (!/^[A-Z]/.test(name)) {
        entryPoints.push(name);
        continue;
      }
      entryPoints.push(`new ${name}`, ...Object.getOwnPropertyNames(value.prototype).filter((p) => p !== 'constructor').map((p) => `${name}.${p}`));
    }
    const entries = report.entries as Record<string, { calls: number; succeeded: number }>;
    expect(entryPoints.length).toBeGreaterThan(30);
    expect(entryPoints.filter((e) => !(entries[e]?.calls > 0)), 'entry points the fuzz run never called').toEqual([]);
    // ... and every one also succeeded (and passed its check) at least once: the fuzz
    // exercises the working paths, not only the refusals.
    expect(entryPoints.filter((e) => !(entries[e]?.succeeded > 0)), 'entry points that never succeeded').toEqual([]);
    expect(report.findings, `${replay}\n${JSON.stringify(report.findings, null, 2)}`).toEqual([]);
    expect(r.status).toBe(0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}, 300_000); // the driver's own limit (spawnSync above): ~15 s on the CUDA host emulator, ~40 s on a loaded 2-core machine
