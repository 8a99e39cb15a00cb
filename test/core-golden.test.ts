// Golden trajectories recorded from the official PyTorch AdaFisher (test/golden/README.md)
// replayed through the public API, and through the float64 reference (which validates
// the reference the other suites rely on).
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { afterAll, describe, expect, test } from 'vitest';

import { backendInfo, createBuffer, readGolden, replayGolden, type GoldenCase } from '../lib/index.js';
import { goldenLayers } from '../lib/replay.js';
import { maxAbs } from './helpers.js';
import { ReferenceAdaFisher, referenceGradFactor, referenceInputFactor } from './reference.js';

const dir = join(dirname(fileURLToPath(import.meta.url)), 'golden');
const files = readdirSync(dir)
  .filter((f) => f.endsWith('.json'))
  .sort();
const KINDS = ['weights', 'biases', 'momenta', 'H', 'S'] as const;
// docs/ALGORITHM.md "Tolerances": 1e-4 relative (max abs error over max abs value) per array.
const TOLERANCE = 1e-4;
// Every backend this machine can run: cpu, and cuda on a GPU (or the CUDA host emulator build).
const BACKENDS = backendInfo('auto').cuda.usable ? (['cpu', 'cuda'] as const) : (['cpu'] as const);

const rows: string[] = [];
afterAll(() => {
  console.log(`golden max relative errors (tolerance ${TOLERANCE}):\n${rows.join('\n')}`);
});

test('there are golden files to replay', () => {
  expect(files.length).toBeGreaterThanOrEqual(5);
});

describe.each(files)('golden %s', (file) => {
  const g = readGolden(join(dir, file));

  test.each(BACKENDS)('replays within 1e-4 relative through the public API, per array kind (%s)', (backend) => {
    const report = replayGolden(g, { file, backend });
    rows.push(
      `  ${backend.padEnd(4)} ${file.padEnd(30)} ` + KINDS.map((k) => `${k} ${report.maxRelError[k].toExponential(2)}`).join('  ') + `  (worst ${report.worst.kind} step ${report.worst.step} layer ${report.worst.layer})`,
    );
    expect(report.backend).toBe(backend);
    expect(report.steps).toBe(g.steps.length);
    for (const k of KINDS) {
      expect(report.maxRelError[k], `${file}: ${k}`).toBeLessThanOrEqual(TOLERANCE);
      expect(Number.isNaN(report.maxRelError[k]), `${file}: ${k} is NaN`).toBe(false);
    }
    expect(report.pass).toBe(true);
  });

  test.each(BACKENDS)('replays within 1e-4 with DeviceBuffers for every tensor (%s)', (backend) => {
    const report = replayGolden(g, { backend, upload: (a) => createBuffer(a, { backend }) });
    for (const k of KINDS) expect(report.maxRelError[k], `${file}: ${k}`).toBeLessThanOrEqual(TOLERANCE);
  });

  test.each(BACKENDS)('replays to the same errors, bit for bit, with one recordFactors call per step (%s)', (backend) => {
    const each = replayGolden(g, { backend });
    const batched = replayGolden(g, { backend, batched: true });
    expect(batched.maxRelError).toEqual(each.maxRelError);
    expect(batched.pass).toBe(true);
  });

  test('the float64 reference replays it within 1e-4 too', () => {
    const errors = replayReference(g);
    rows.push(`  ref  ${file.padEnd(30)} ` + KINDS.map((k) => `${k} ${errors[k].toExponential(2)}`).join('  '));
    for (const k of KINDS) expect(errors[k], `${file}: ${k}`).toBeLessThanOrEqual(TOLERANCE);
  });
});

function relError(ours: ArrayLike<number>, golden: number[]): number {
  let err = 0;
  for (let i = 0; i < golden.length; i++) err = Math.max(err, Math.abs(ours[i] - golden[i]));
  if (Number.isNaN(err)) return Infinity;
  return err === 0 ? 0 : err / maxAbs(golden);
}

function replayReference(g: GoldenCase): Record<(typeof KINDS)[number], number> {
  const specs = goldenLayers(g).layers;
  const c = g.config;
  const ref = new ReferenceAdaFisher(specs, {
    lr: c.lr,
    beta: c.beta,
    damping: c.damping,
    gamma: c.gamma,
    tcov: c.tcov,
    weightDecay: c.weightDecay,
    decoupled: c.optimizer === 'AdaFisherW',
  });
  const err = { weights: 0, biases: 0, momenta: 0, H: 0, S: 0 };
  const note = (k: keyof typeof err, e: number) => (err[k] = Math.max(err[k], e));
  for (const s of g.steps) {
    const fresh = ref.willRefresh
      ? s.seen.map((e, i) => ({ H: referenceInputFactor(specs[i], e.input, e.inputShape), S: referenceGradFactor(specs[i], e.gradOutput, e.gradOutputShape) }))
      : [];
    expect(ref.willRefresh).toBe(s.factorsUpdated);
    const grads: number[][] = [];
    s.seen.forEach((e, i) => {
      grads.push(e.weightGrad);
      if (g.layers[i].bias) grads.push(e.biasGrad!);
    });
    ref.step(fresh, grads);
    let t = 0;
    s.after.forEach((a, i) => {
      note('weights', relError(ref.params[t], a.weight));
      note('momenta', relError(ref.momenta[t++], a.momentumWeight));
      if (g.layers[i].bias) {
        note('biases', relError(ref.params[t], a.bias!));
        note('momenta', relError(ref.momenta[t++], a.momentumBias!));
      }
      note('H', relError(ref.factors[i]!.H, a.H));
      note('S', relError(ref.factors[i]!.S, a.S));
    });
  }
  return err;
}

// A golden file whose factor arrays are short used to pass: only the entries it had were
// compared (an empty S reported an error of 0).
describe('golden files with factor arrays of the wrong length', () => {
  const g = readGolden(join(dir, 'conv_stride2_nobias_bn.json'));
  test.each([
    ['H truncated to 1 entry (conv: 18)', (c: GoldenCase) => void (c.steps[0].after[0].H = c.steps[0].after[0].H.slice(0, 1)), /\$\.steps\[0\]\.after\[0\]\.H: expected 18 numbers, found 1/],
    ['S emptied (batchnorm: 3)', (c: GoldenCase) => void (c.steps[1].after[1].S = []), /\$\.steps\[1\]\.after\[1\]\.S: expected 3 numbers, found 0/],
    ['one H entry too many (linear with bias: 28)', (c: GoldenCase) => void c.steps[0].after[2].H.push(0), /\$\.steps\[0\]\.after\[2\]\.H: expected 28 numbers, found 29/],
  ] as const)('%s: refused as malformed', (_n, patch, message) => {
    const bad = structuredClone(g);
    patch(bad);
    let error: (Error & { code?: string }) | undefined;
    try {
      replayGolden(bad, { backend: 'cpu' });
    } catch (e) {
      error = e as Error & { code?: string };
    }
    expect(error?.code).toBe('ADAFISHER_BAD_GOLDEN_FILE');
    expect(error?.message).toMatch(message);
  });
});

test("a golden step whose refresh differs from the replay's (factorsUpdated) fails the replay, naming the step", () => {
  const g = readGolden(join(dir, 'mlp_adafisherw_tcov2.json'));
  expect(replayGolden(g, { backend: 'cpu' })).not.toHaveProperty('divergence');
  const bad = structuredClone(g);
  bad.steps[1].factorsUpdated = true; // tcov 2: step 1 does not refresh
  const report = replayGolden(bad, { backend: 'cpu' });
  expect(report).toMatchObject({ pass: false, overall: Infinity, divergence: 'step 1 did not refresh the factors; the official run did' });
  expect(report.worst).toEqual({ kind: 'H', step: 1, layer: 0 });
  const untyped = structuredClone(g) as unknown as { steps: { factorsUpdated?: unknown }[] };
  delete untyped.steps[2].factorsUpdated;
  expect(() => replayGolden(untyped as unknown as GoldenCase, { backend: 'cpu' })).toThrow(/\$\.steps\[2\]\.factorsUpdated: expected a boolean/);
});
