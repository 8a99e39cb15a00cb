// The non-finite guard: a NaN/±Inf gradient or a NaN statistic skips the whole step,
// changing nothing; the next good step is exactly the step an optimizer that never saw
// the bad one would take. An infinite statistic is cleaned (+inf -> 1, -inf -> 0), not skipped.
import { describe, expect, test } from 'vitest';

import { AdaFisher, ErrorCodes, stateFromJSON, stateToJSON, type AdaFisherOptions, type LayerSpec } from '../lib/index.js';
import { assertSnapshotsIdentical, assertStatesIdentical, expectThrows, paramsOf, Rng, snapshot } from './helpers.js';

// layers[0]: conv 2->3, 3x3, padding 1, bias (tensors 0, 1); layers[1]: linear 4->2 (tensor 2); layers[2]: param (tensor 3).
function model(seed: number): LayerSpec[] {
  const rng = new Rng(seed);
  return [
    { kind: 'conv2d', inChannels: 2, outChannels: 3, kernelSize: 3, padding: 1, weight: rng.array(54), bias: rng.array(3) },
    { kind: 'linear', inFeatures: 4, outFeatures: 2, weight: rng.array(8) },
    { kind: 'param', param: rng.array(9) },
  ];
}

interface StepData {
  stats: { input: Float32Array; inputShape: number[]; grad: Float32Array; gradShape: number[] }[];
  grads: Float32Array[];
}

function stepData(rng: Rng): StepData {
  return {
    stats: [
      { input: rng.array(2 * 2 * 4 * 4), inputShape: [2, 2, 4, 4], grad: rng.array(2 * 3 * 4 * 4), gradShape: [2, 3, 4, 4] },
      { input: rng.array(3 * 4), inputShape: [3, 4], grad: rng.array(3 * 2), gradShape: [3, 2] },
    ],
    grads: [rng.array(54), rng.array(3), rng.array(8), rng.array(9)],
  };
}

function feed(opt: AdaFisher, d: StepData) {
  if (opt.willRefreshFactors) {
    d.stats.forEach((s, i) => {
      opt.recordInput(i, s.input, s.inputShape);
      opt.recordOutputGrad(i, s.grad, s.gradShape);
    });
  }
  return opt.step(d.grads);
}

function poisoned(d: StepData, poison: (d: StepData) => void): StepData {
  const copy: StepData = structuredClone(d);
  poison(copy);
  return copy;
}

const cases: { name: string; options?: AdaFisherOptions; at: number; poison: (d: StepData) => void }[] = [
  { name: 'NaN in the last gradient (plain param)', at: 2, poison: (d) => void (d.grads[3][8] = NaN) },
  { name: '+Inf in a conv weight gradient', at: 2, poison: (d) => void (d.grads[0][17] = Infinity) },
  { name: '-Inf in a bias gradient', at: 2, poison: (d) => void (d.grads[1][0] = -Infinity) },
  { name: 'NaN in the first step (before any state exists)', at: 0, poison: (d) => void (d.grads[2][3] = NaN) },
  { name: 'NaN in a recorded input (H statistic)', at: 2, poison: (d) => void (d.stats[0].input[5] = NaN) },
  { name: 'NaN in a recorded output gradient (S statistic)', at: 2, poison: (d) => void (d.stats[1].grad[1] = NaN) },
  { name: 'NaN gradient on a step that does not refresh (tcov 2)', options: { tcov: 2 }, at: 3, poison: (d) => void (d.grads[0][0] = NaN) },
];

describe('non-finite guard (default on)', () => {
  test.each(cases.map((c) => [c.name, c] as const))('%s: skipped, nothing changes, the next good step works', (_n, c) => {
    const options = { lr: 1e-2, weightDecay: 1e-3, ...c.options };
    const rng = new Rng(7);
    const data = Array.from({ length: c.at + 2 }, () => stepData(rng));
    const specsA = model(1);
    const specsB = model(1);
    const a = new AdaFisher(specsA, options); // sees the bad step
    const b = new AdaFisher(specsB, options); // never does
    const paramsA = paramsOf(specsA);
    for (let t = 0; t < c.at; t++) {
      expect(feed(a, data[t]).applied).toBe(true);
      feed(b, data[t]);
    }
    const before = snapshot(a, paramsA);
    expect(feed(a, poisoned(data[c.at], c.poison))).toEqual({ applied: false, refreshed: false });
    assertSnapshotsIdentical(snapshot(a, paramsA), before, 'after the skipped step');
    expect(a.steps).toBe(c.at);
    // The next good steps equal those of the twin that never saw the bad step, bit for bit.
    for (let t = c.at; t < c.at + 2; t++) {
      expect(feed(a, data[t]).applied).toBe(true);
      expect(feed(b, data[t]).applied).toBe(true);
    }
    assertSnapshotsIdentical(snapshot(a, paramsA), snapshot(b, paramsOf(specsB)), 'after recovery');
    a.dispose();
    b.dispose();
  });
});

describe('non-finite guard and setFactors', () => {
  test.each([
    ['NaN in S', { S: Float32Array.of(1, NaN) }],
    ['NaN in H', { H: Float32Array.of(1, 2, NaN, 4) }],
  ] as const)('%s handed through setFactors: skipped, nothing changes', (_n, bad) => {
    const rng = new Rng(10);
    const specs = model(4);
    const opt = new AdaFisher(specs, { lr: 1e-2 });
    feed(opt, stepData(rng));
    const d = stepData(rng);
    const before = snapshot(opt, paramsOf(specs));
    d.stats.forEach((s, i) => {
      opt.recordInput(i, s.input, s.inputShape);
      opt.recordOutputGrad(i, s.grad, s.gradShape);
    });
    opt.setFactors(1, bad);
    expect(opt.step(d.grads)).toEqual({ applied: false, refreshed: false });
    assertSnapshotsIdentical(snapshot(opt, paramsOf(specs)), before, 'after the skipped step');
    expect(feed(opt, d)).toEqual({ applied: true, refreshed: true });
    expect(opt.steps).toBe(2);
    opt.dispose();
  });
});

// ALGORITHM.md cleans a fresh factor's infinities (+inf -> 1, -inf -> 0) before its min-max:
// the guard lets them through, so an overflowing statistic steps as in the official code
// (a guard that skipped it would skip every later step too: the weights would never change).
describe('non-finite guard and infinite statistics', () => {
  test.each([
    ['+Inf', Infinity, 1],
    ['-Inf', -Infinity, 0],
  ] as const)('%s in H handed through setFactors: applied, the same bits as H with it cleaned (+Inf -> 1, -Inf -> 0)', (_n, inf, clean) => {
    const run = (value: number) => {
      const rng = new Rng(12);
      const specs = model(6);
      const opt = new AdaFisher(specs, { lr: 1e-2 });
      feed(opt, stepData(rng));
      const d = stepData(rng);
      d.stats.forEach((s, i) => {
        opt.recordInput(i, s.input, s.inputShape);
        opt.recordOutputGrad(i, s.grad, s.gradShape);
      });
      opt.setFactors(1, { H: Float32Array.of(0.5, 2, value, 4) });
      const result = opt.step(d.grads);
      const snap = snapshot(opt, paramsOf(specs));
      opt.dispose();
      return { result, snap };
    };
    const got = run(inf);
    expect(got.result).toEqual({ applied: true, refreshed: true });
    assertSnapshotsIdentical(got.snap, run(clean).snap, `H with ${clean} in place of ${inf}`);
  });

  test('an activation whose square overflows float32 (1e20): applied, the same bits as with the guard off', () => {
    const run = (nonFiniteGuard: boolean) => {
      const rng = new Rng(13);
      const specs = model(7);
      const opt = new AdaFisher(specs, { lr: 1e-2, nonFiniteGuard });
      feed(opt, stepData(rng));
      const d = stepData(rng);
      d.stats[1].input[5] = 1e20; // H of the linear layer: mean of squares 3.3e39 -> +inf -> 1
      const result = feed(opt, d);
      const snap = snapshot(opt, paramsOf(specs));
      const state = opt.exportState();
      opt.dispose();
      return { result, snap, state };
    };
    const guarded = run(true);
    expect(guarded.result).toEqual({ applied: true, refreshed: true });
    const open = run(false).snap;
    // Everything but the hyperparameters (which differ in nonFiniteGuard).
    open.state.hyperparameters = guarded.snap.state.hyperparameters;
    assertSnapshotsIdentical(guarded.snap, open, 'guard on against guard off');
    for (const f of guarded.state.factors) {
      for (const a of [f.H, f.S]) expect([...a].every(Number.isFinite)).toBe(true);
    }
  });
});

// With tcov > 1 a step that reuses the running factors does not read statistics recorded
// for it: a NaN among them neither skips the step nor reaches the factors (the README says so).
describe('non-finite guard and statistics on a step that does not refresh', () => {
  test('tcov 2: NaN statistics recorded for step 1 are not read; the step applies as if none were recorded', () => {
    const rng = new Rng(14);
    const data = [stepData(rng), stepData(rng), stepData(rng)];
    const specsA = model(8);
    const specsB = model(8);
    const a = new AdaFisher(specsA, { lr: 1e-2, tcov: 2 });
    const b = new AdaFisher(specsB, { lr: 1e-2, tcov: 2 });
    feed(a, data[0]);
    feed(b, data[0]);
    expect(a.willRefreshFactors).toBe(false);
    const bad = poisoned(data[1], (d) => {
      d.stats[0].input.fill(NaN);
      d.stats[1].grad[0] = NaN;
    });
    bad.stats.forEach((s, i) => {
      a.recordInput(i, s.input, s.inputShape);
      a.recordOutputGrad(i, s.grad, s.gradShape);
    });
    expect(a.step(bad.grads)).toEqual({ applied: true, refreshed: false });
    expect(b.step(data[1].grads)).toEqual({ applied: true, refreshed: false });
    assertSnapshotsIdentical(snapshot(a, paramsOf(specsA)), snapshot(b, paramsOf(specsB)), 'after the non-refreshing step');
    // The next step refreshes from its own statistics only.
    expect(feed(a, data[2])).toEqual({ applied: true, refreshed: true });
    expect(feed(b, data[2])).toEqual({ applied: true, refreshed: true });
    assertSnapshotsIdentical(snapshot(a, paramsOf(specsA)), snapshot(b, paramsOf(specsB)), 'after the next refresh');
    a.dispose();
    b.dispose();
  });
});

describe('nonFiniteGuard: false', () => {
  test('a NaN gradient is applied: that element becomes NaN, the others stay finite, counters advance', () => {
    const rng = new Rng(8);
    const specs = model(2);
    const opt = new AdaFisher(specs, { lr: 1e-2, nonFiniteGuard: false });
    expect(opt.hyperparameters.nonFiniteGuard).toBe(false);
    feed(opt, stepData(rng));
    const d = stepData(rng);
    d.grads[3][4] = NaN;
    expect(feed(opt, d)).toEqual({ applied: true, refreshed: true });
    const p = paramsOf(specs)[3] as Float32Array;
    expect(Number.isNaN(p[4])).toBe(true);
    expect([...p].filter((v) => !Number.isFinite(v)).length).toBe(1);
    const s = opt.exportState();
    expect(Number.isNaN(s.momenta[3][4])).toBe(true);
    expect(s.stepCounts).toEqual([2, 2, 2, 2]);
    expect(s.steps).toBe(2);
    opt.dispose();
  });

  test.each([0, 1, 3])('a fresh factor with NaN at entry %i refreshes the whole factor to NaN, as torch min()/max() do', (at) => {
    // NOTE: [NaN min-max]: wherever the NaN sits, min and max are NaN; the other layer's factors stay finite.
    const specs: LayerSpec[] = [
      { kind: 'linear', inFeatures: 3, outFeatures: 2, weight: new Rng(1).array(6), bias: new Rng(2).array(2) },
      { kind: 'linear', inFeatures: 2, outFeatures: 2, weight: new Rng(3).array(4) },
    ];
    const opt = new AdaFisher(specs, { nonFiniteGuard: false });
    const H = Float32Array.of(0.5, 2, 1, 3);
    H[at] = NaN;
    opt.setFactors(0, { H, S: Float32Array.of(1, 2) });
    opt.setFactors(1, { H: Float32Array.of(1, 2), S: Float32Array.of(1, 2) });
    expect(opt.step([new Rng(4).array(6), new Rng(5).array(2), new Rng(6).array(4)]).applied).toBe(true);
    const [first, second] = opt.exportState().factors;
    expect([...first.H].every(Number.isNaN), `H ${[...first.H]}`).toBe(true);
    expect([...first.S, ...second.H, ...second.S].every(Number.isFinite)).toBe(true);
    opt.dispose();
  });

  test('an infinite gradient is applied too', () => {
    const rng = new Rng(9);
    const specs = model(3);
    const opt = new AdaFisher(specs, { nonFiniteGuard: false });
    const d = stepData(rng);
    d.grads[2][0] = Infinity;
    expect(feed(opt, d).applied).toBe(true);
    expect((paramsOf(specs)[2] as Float32Array)[0]).toBe(-Infinity);
    opt.dispose();
  });

  test('its checkpoints may hold NaN momenta and factors: they load (also through JSON); negative factors are refused', () => {
    const rng = new Rng(11);
    const specs = model(5);
    const opt = new AdaFisher(specs, { lr: 1e-2, nonFiniteGuard: false });
    feed(opt, stepData(rng));
    const d = stepData(rng);
    d.grads[3][4] = NaN;
    d.stats[1].input[2] = NaN; // column 2 of the linear layer's H becomes NaN
    expect(feed(opt, d)).toEqual({ applied: true, refreshed: true });
    const state = opt.exportState();
    expect(Number.isNaN(state.momenta[3][4])).toBe(true);
    expect(Number.isNaN(state.factors[1].H[2])).toBe(true);
    const other = new AdaFisher(model(5), { lr: 1e-2 });
    other.loadState(stateFromJSON(JSON.parse(JSON.stringify(stateToJSON(state)))));
    // JSON keeps NaN, not its payload: the GPU's NaN (0x7fffffff) comes back as 0x7fc00000.
    assertStatesIdentical(other.exportState(), state, 'loaded', true);
    const negative = structuredClone(state);
    negative.factors[0].S[1] = -1;
    expectThrows(() => other.loadState(negative), {
      cls: Error,
      message: /^Invalid AdaFisher checkpoint: factors\[0\]\.S\[1\] is -1; running factors are >= 0$/,
      code: ErrorCodes.badCheckpoint,
    });
    assertStatesIdentical(other.exportState(), state, 'after the refused load', true);
    opt.dispose();
    other.dispose();
  });
});
