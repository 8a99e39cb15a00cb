// A small deterministic training run through the public API (compiled dist/), shared by
// the worker threads of test/reliability-workers.test.ts and by the test itself, which
// repeats it on the main thread to know the exact expected result.
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const api = await import(pathToFileURL(join(root, 'dist', 'lib', 'index.js')).href);
// The backend under test: ADAFISHER_BACKEND (cuda on a GPU or the CUDA host emulator), else cpu.
const BACKEND = (process.env.ADAFISHER_BACKEND || 'cpu').toLowerCase();

/** A seeded uniform generator in [-0.5, 0.5) (mulberry32). */
export function rng(seed) {
  let s = seed >>> 0;
  return () => {
    let t = (s = (s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296 - 0.5;
  };
}
export const fill = (n, r) => Float32Array.from({ length: n }, r);

/**
 * Trains a 2-layer model (linear 32->16 with bias, layernorm 16) for `steps` steps on
 * seeded data; calls onStep(i) after each step (a worker uses it to report progress).
 * Returns the final parameters and exported state as plain arrays.
 */
export function train(seed, steps, onStep = () => {}) {
  const r = rng(seed);
  const [inF, outF, batch] = [32, 16, 8];
  const w = fill(inF * outF, r), bias = fill(outF, r), g = fill(outF, r), beta = fill(outF, r);
  const opt = new api.AdaFisher(
    [
      { kind: 'linear', inFeatures: inF, outFeatures: outF, weight: w, bias },
      { kind: 'layernorm', features: outF, weight: g, bias: beta },
    ],
    { lr: 1e-2, tcov: 2, backend: BACKEND },
  );
  for (let i = 0; i < steps; i++) {
    if (opt.willRefreshFactors) {
      opt.recordInput(0, fill(batch * inF, r), [batch, inF]);
      opt.recordOutputGrad(0, fill(batch * outF, r), [batch, outF]);
      opt.recordInput(1, fill(batch * outF, r), [batch, outF]);
      opt.recordOutputGrad(1, fill(batch * outF, r), [batch, outF]);
    }
    const res = opt.step([fill(w.length, r), fill(outF, r), fill(outF, r), fill(outF, r)]);
    if (!res.applied) throw new Error(`step ${i} was not applied`);
    onStep(i);
  }
  const s = opt.exportState();
  opt.dispose();
  return {
    params: [w, bias, g, beta].map((a) => Array.from(a)),
    steps: s.steps,
    momenta: s.momenta.map((m) => Array.from(m)),
    factors: s.factors.map((f) => [Array.from(f.H), Array.from(f.S)]),
  };
}

export const liveAllocations = () => api.liveAllocations(BACKEND);
