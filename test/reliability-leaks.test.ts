// Leaks: 10,000 create/step/dispose cycles of an optimizer, device buffers and a timing
// event, then 10,000 optimizers, buffers and timing events abandoned to the garbage
// collector's finalizers, in a child process with --expose-gc (test/workers/leak-driver.mjs).
//
// The exact check is liveAllocations('cpu') (every native allocation is counted): it must
// be back at its baseline after each phase. RSS catches what that count cannot see
// (strings, vectors, N-API references leaked per call), with slack for the allocator and
// the V8 heap:
//   - disposed cycles: at most 16 MiB above the baseline taken after 10,000 warm-up cycles
//     (V8 grows its heap to its working size over the first ~10,000), and at most 8 MiB
//     growth over the second 5,000 cycles. A leak of 1.6 KiB per cycle would show; the
//     smallest counted allocation per cycle (the 16 KiB weight) would show 100-fold.
//   - finalizer phase: at most 64 MiB above the disposed level. Up to ~3,000 abandoned
//     objects (~100 MiB native) await finalization at the peak; glibc keeps part of that
//     freed heap and V8 keeps its grown heap. Leaking the 16 KiB per abandoned object would
//     add 160 MiB.
// A second test drops 200 large buffers and optimizers (16 MiB each, 6.4 GiB in all) without
// dispose() and WITHOUT gc(): V8 must collect them by itself because the addon reports the
// memory they hold. At most 100 native allocations may be alive at once (without the report,
// measured: 496, and RSS 5.2 GiB; with it: 12 and 0.4 GiB).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, expect, test } from 'vitest';

import { ensureDist, repoRoot } from './workers/ensure-dist.js';

beforeAll(() => ensureDist());

test('10,000 create/step/dispose cycles and 10,000 finalized objects return to baseline', () => {
  const r = spawnSync(process.execPath, ['--expose-gc', join(repoRoot, 'test', 'workers', 'leak-driver.mjs'), '10000'], {
    cwd: repoRoot,
    encoding: 'utf8',
    timeout: 300_000,
  });
  expect(r.status, r.stderr).toBe(0);
  const m = JSON.parse(r.stdout.trim().split('\n').pop()!);
  console.log(`leaks: ${JSON.stringify(m)}`);
  expect(m.baseline.live).toBe(m.baseline.start);
  expect(m.half.live).toBe(m.baseline.live);
  expect(m.disposed.live).toBe(m.baseline.live);
  expect(m.finalized.live).toBe(m.baseline.live);
  expect(m.finalized.peakLiveBeforeGC).toBeGreaterThan(0); // the finalizer phase did abandon objects
  expect(m.disposed.rssMB - m.baseline.rssMB).toBeLessThanOrEqual(16);
  expect(m.disposed.rssMB - m.half.rssMB).toBeLessThanOrEqual(8);
  expect(m.finalized.rssMB - m.disposed.rssMB).toBeLessThanOrEqual(64);
}, 300_000); // ~6 s on the cpu backend; ~80 s on the CUDA host emulator

test('large objects dropped without dispose() or gc() are freed by V8 on its own', () => {
  const r = spawnSync(process.execPath, [join(repoRoot, 'test', 'workers', 'gc-pressure-driver.mjs'), '200'], {
    cwd: repoRoot,
    encoding: 'utf8',
    timeout: 300_000,
  });
  expect(r.status, r.stderr).toBe(0);
  const m = JSON.parse(r.stdout.trim().split('\n').pop()!);
  console.log(`gc pressure: ${JSON.stringify(m)}`);
  expect(m.peakLive).toBeGreaterThan(0);
  expect(m.peakLive).toBeLessThanOrEqual(100); // of 400 objects (200 buffers + 200 optimizers)
  expect(m.peakRssMB - m.start.rssMB).toBeLessThanOrEqual(2048);
}, 300_000);
