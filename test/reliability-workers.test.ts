// worker_threads: the addon is context-aware (per-environment instance data, see NOTE:
// [context awareness] in native/glue.cc). Two workers train their own optimizers at the
// same time and get bit-for-bit the result of the same run on the main thread; a worker
// terminated in the middle of training takes nothing down with it.
import { Worker } from 'node:worker_threads';
import { join } from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';

import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const workerFile = join(repoRoot, 'test', 'workers', 'train-worker.mjs');
type TrainResult = { params: number[][]; steps: number; momenta: number[][]; factors: number[][][] };
let train: (seed: number, steps: number) => TrainResult;
let liveAllocations: () => number;

beforeAll(async () => {
  ensureDist();
  ({ train, liveAllocations } = await import(join(repoRoot, 'test', 'workers', 'train.mjs')));
});

function runWorker(workerData: object): Promise<{ done: TrainResult; live: number }> {
  return new Promise((resolve, reject) => {
    const w = new Worker(workerFile, { workerData });
    let result: { done: TrainResult; live: number } | undefined;
    w.on('message', (m) => (result = m));
    w.on('error', reject);
    w.on('exit', (code) => (code === 0 && result ? resolve(result) : reject(new Error(`worker exited with ${code}`))));
  });
}

/** Evaluates `code` (an async function body, `m` the package's index module) in a worker with its own `env`. */
function inWorker(env: Record<string, string>, code: string): Promise<unknown> {
  const src =
    `const { parentPort } = require('node:worker_threads');\n` +
    `import(${JSON.stringify(join(repoRoot, 'dist', 'lib', 'index.js'))}).then(async (m) => { ${code} })` +
    `.then((v) => parentPort.postMessage({ v }), (e) => parentPort.postMessage({ e: { code: e.code, message: e.message } }));`;
  return new Promise((resolve, reject) => {
    const w = new Worker(src, { eval: true, env: { ...process.env, ...env } });
    w.on('message', (m) => resolve(m));
    w.on('error', reject);
  });
}

describe('worker_threads', () => {
  test("a worker's own ADAFISHER_NUM_THREADS (its env option) sets its CPU backend's threads, and is checked", async () => {
    // The process environment (what std::getenv sees) does not have the worker's value.
    const saved = process.env.ADAFISHER_NUM_THREADS;
    delete process.env.ADAFISHER_NUM_THREADS;
    try {
      expect(await inWorker({ ADAFISHER_NUM_THREADS: '1' }, "return m.backendInfo('cpu').cpuThreads;")).toEqual({ v: 1 });
      expect(await inWorker({ ADAFISHER_NUM_THREADS: '3' }, "return m.backendInfo('cpu').cpuThreads;")).toEqual({ v: 3 });
      const bad = (await inWorker({ ADAFISHER_NUM_THREADS: 'not-a-number' }, "return m.backendInfo('cpu').cpuThreads;")) as { e?: { code: string; message: string } };
      expect(bad.e?.code).toBe('ADAFISHER_INVALID_ARGUMENT');
      expect(bad.e?.message).toMatch(/Expected an integer in \[1, 256\] for ADAFISHER_NUM_THREADS but received 'not-a-number'/);
    } finally {
      if (saved !== undefined) process.env.ADAFISHER_NUM_THREADS = saved;
    }
  });


  test('two workers train their own optimizers concurrently, matching the main thread exactly', async () => {
    const steps = 40;
    const [a, b] = await Promise.all([runWorker({ mode: 'train', seed: 1, steps }), runWorker({ mode: 'train', seed: 2, steps })]);
    expect(a.done).toEqual(train(1, steps));
    expect(b.done).toEqual(train(2, steps));
    expect(a.done.steps).toBe(steps);
    expect(a.done.params).not.toEqual(b.done.params);
    // Each worker's allocations are its own (per-environment backend) and were all freed.
    expect(a.live).toBe(0);
    expect(b.live).toBe(0);
  });

  test('a worker terminated mid-training exits cleanly; the main thread and new workers keep working', async () => {
    const before = liveAllocations();
    for (let round = 0; round < 3; round++) {
      const w = new Worker(workerFile, { workerData: { mode: 'forever', seed: 10 + round } });
      const errors: Error[] = [];
      w.on('error', (e) => errors.push(e));
      // Let it get well into training (several steps, statistics recorded) before the kill.
      await new Promise<void>((resolve) => w.on('message', (m) => m.step >= 5 + 7 * round && resolve()));
      // Concurrently with the dying worker, the main thread trains.
      const mainRun = train(99, 10);
      const code = await w.terminate();
      expect(code).toBe(1);
      expect(errors).toEqual([]);
      expect(mainRun).toEqual(train(99, 10));
    }
    expect(liveAllocations()).toBe(before);
    const after = await runWorker({ mode: 'train', seed: 3, steps: 20 });
    expect(after.done).toEqual(train(3, 20));
  });

  // Termination lands at random points inside native calls: a JS exception cannot be thrown
  // into a terminating environment, and node-addon-api would then abort the whole process
  // (std::terminate) unless built with NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS. Without it
  // this test crashed the process within a few rounds.
  test('40 workers terminated at random points inside training: the process survives', async () => {
    const before = liveAllocations();
    for (let round = 0; round < 40; round++) {
      const w = new Worker(workerFile, { workerData: { mode: 'forever', seed: 100 + round } });
      await new Promise<void>((resolve) => w.on('message', (m) => m.step >= 1 + (round % 7) && resolve()));
      await new Promise((resolve) => setTimeout(resolve, Math.random() * 3));
      expect(await w.terminate()).toBe(1);
    }
    expect(liveAllocations()).toBe(before);
    expect((await runWorker({ mode: 'train', seed: 4, steps: 10 })).done).toEqual(train(4, 10));
  });
});
