// Checkpoint resume: exportState at step k, load into a fresh optimizer (directly or via
// JSON), continue; parameters and state must be bit-identical to the uninterrupted run.
import { describe, expect, test } from 'vitest';

import { AdaFisher, backendInfo, ErrorCodes, liveAllocations, stateFromJSON, stateToJSON, type AdaFisherOptions, type AdaFisherState, type LayerSpec } from '../lib/index.js';
import { assertSnapshotsIdentical, assertStatesIdentical, expectThrows, paramsOf, Rng, snapshot } from './helpers.js';

function model(): LayerSpec[] {
  const rng = new Rng(21);
  return [
    { kind: 'conv2d', inChannels: 2, outChannels: 4, kernelSize: [3, 2], stride: 2, padding: 'same', weight: rng.array(48), bias: rng.array(4) },
    { kind: 'batchnorm', channels: 4, weight: rng.array(4), bias: rng.array(4) },
    { kind: 'linear', inFeatures: 8, outFeatures: 3, weight: rng.array(24), bias: rng.array(3), layout: 'tfjs' },
    { kind: 'param', param: rng.array(11) },
  ];
}

interface StepData {
  stats: { input: Float32Array; inputShape: number[]; grad: Float32Array; gradShape: number[] }[];
  grads: (Float32Array | null)[];
}

function trajectory(steps: number): StepData[] {
  const rng = new Rng(22);
  return Array.from({ length: steps }, (_, t) => ({
    stats: [
      { input: rng.array(2 * 2 * 5 * 4), inputShape: [2, 2, 5, 4], grad: rng.array(2 * 4 * 3 * 2), gradShape: [2, 4, 3, 2] },
      { input: rng.array(2 * 4 * 3 * 2), inputShape: [2, 4, 3, 2], grad: rng.array(2 * 4 * 3 * 2), gradShape: [2, 4, 3, 2] },
      { input: rng.array(2 * 8), inputShape: [2, 8], grad: rng.array(2 * 3), gradShape: [2, 3] },
    ],
    // The plain param skips every third step, so the per-tensor step counters differ.
    grads: [rng.array(48), rng.array(4), rng.array(4), rng.array(4), rng.array(24), rng.array(3), t % 3 === 1 ? null : rng.array(11)],
  }));
}

function run(opt: AdaFisher, data: StepData[], from: number, to: number) {
  for (let t = from; t < to; t++) {
    const refreshing = opt.willRefreshFactors;
    if (refreshing) {
      data[t].stats.forEach((s, i) => {
        opt.recordInput(i, s.input, s.inputShape);
        opt.recordOutputGrad(i, s.grad, s.gradShape);
      });
    }
    expect(opt.step(data[t].grads), `step ${t}`).toEqual({ applied: true, refreshed: refreshing });
  }
}

const STEPS = 7;

const variants: { name: string; options: AdaFisherOptions; k: number; through: 'object' | 'json'; freshOptions?: AdaFisherOptions }[] = [
  { name: 'AdaFisher, checkpoint at 3, loaded as an object', options: { lr: 1e-2, weightDecay: 1e-3 }, k: 3, through: 'object' },
  { name: 'AdaFisherW, checkpoint at 4, through stateToJSON / JSON.stringify / stateFromJSON', options: { lr: 1e-2, decoupled: true, weightDecay: 1e-2 }, k: 4, through: 'json' },
  { name: 'tcov 3, checkpoint at 4 (mid-cycle: step 5 reuses factors, step 6 refreshes)', options: { lr: 1e-2, tcov: 3 }, k: 4, through: 'json' },
  // The fresh optimizer is built with other options: the checkpoint's hyperparameters win.
  { name: 'tcov 3, checkpoint at 5, fresh optimizer built with tcov 1 and another lr', options: { lr: 1e-2, tcov: 3, gamma: 0.6 }, k: 5, through: 'object', freshOptions: { lr: 0.5 } },
  { name: 'checkpoint at 0 (before any step)', options: { lr: 1e-2, tcov: 2 }, k: 0, through: 'json' },
];

describe('checkpoint resume is bit-identical', () => {
  test.each(variants.map((v) => [v.name, v] as const))('%s', (_n, v) => {
    const data = trajectory(STEPS);
    // Uninterrupted.
    const specsA = model();
    const a = new AdaFisher(specsA, v.options);
    run(a, data, 0, STEPS);
    // Interrupted at k.
    const specsB = model();
    const b = new AdaFisher(specsB, v.options);
    run(b, data, 0, v.k);
    let state: AdaFisherState = b.exportState();
    if (v.through === 'json') state = stateFromJSON(JSON.parse(JSON.stringify(stateToJSON(state))));
    const paramsAtK = paramsOf(specsB).map((p) => (p as Float32Array).slice());
    b.dispose();
    // Resumed in a fresh optimizer over copies of the parameters at k.
    let i = 0;
    const specsC = model().map((s): LayerSpec => {
      if (s.kind === 'param') return { ...s, param: paramsAtK[i++] };
      const weight = paramsAtK[i++];
      const bias = s.bias ? paramsAtK[i++] : null;
      return { ...s, weight, bias } as LayerSpec;
    });
    const c = new AdaFisher(specsC, v.freshOptions ?? v.options);
    c.loadState(state);
    expect(c.hyperparameters).toEqual(a.hyperparameters);
    assertStatesIdentical(c.exportState(), state, 'right after loading');
    run(c, data, v.k, STEPS);
    assertSnapshotsIdentical(snapshot(c, paramsOf(specsC)), snapshot(a, paramsOf(specsA)), 'resumed vs uninterrupted');
    expect(c.exportState().stepCounts).toEqual(a.exportState().stepCounts);
    a.dispose();
    c.dispose();
  });

  test('the checkpoint is a copy: mutating it after export or after load changes nothing', () => {
    const data = trajectory(3);
    const specs = model();
    const opt = new AdaFisher(specs, { lr: 1e-2 });
    run(opt, data, 0, 2);
    const s1 = opt.exportState();
    const kept = structuredClone(s1);
    s1.momenta[0].fill(123);
    s1.factors[0].H.fill(7);
    assertStatesIdentical(opt.exportState(), kept, 'after mutating an export');
    const s2 = structuredClone(kept);
    opt.loadState(s2);
    s2.momenta[0].fill(5);
    s2.factors[1].S.fill(5);
    assertStatesIdentical(opt.exportState(), kept, 'after mutating a loaded checkpoint');
    opt.dispose();
  });

  test('the JSON form holds plain numbers and round-trips float32 values exactly', () => {
    const data = trajectory(2);
    const opt = new AdaFisher(model(), { lr: 1e-2 });
    run(opt, data, 0, 2);
    const s = opt.exportState();
    const json = JSON.parse(JSON.stringify(stateToJSON(s))) as { momenta: unknown[]; factors: { H: unknown }[] };
    expect(Array.isArray(json.momenta[0])).toBe(true);
    expect(Array.isArray(json.factors[0].H)).toBe(true);
    assertStatesIdentical(stateFromJSON(json), s, 'JSON round trip');
    opt.dispose();
  });
});

describe('every exported state loads back', () => {
  test('a guarded optimizer whose L2 weight decay overflowed a momentum (g + wd·p = +Infinity)', () => {
    const p = Float32Array.of(3e38, 1);
    const opt = new AdaFisher([{ kind: 'param', param: p }], { weightDecay: 10 });
    expect(opt.step([Float32Array.of(1, 1)])).toEqual({ applied: true, refreshed: true });
    const s = opt.exportState();
    expect(s.momenta[0][0]).toBe(Infinity);
    const other = new AdaFisher([{ kind: 'param', param: Float32Array.of(0, 0) }], { weightDecay: 10 });
    other.loadState(s);
    assertStatesIdentical(other.exportState(), s, 'loaded');
    opt.setLearningRate(1e-4); // which once went through a checkpoint too
    for (const o of [opt, other]) o.dispose();
  });
});

describe('every exported state loads back: running factors', () => {
  test('decay 1 and a huge mix overflow the running factors to +Infinity: that state loads', () => {
    const make = () => {
      const p = Float32Array.of(1, 2, 3, 4);
      return new AdaFisher([{ kind: 'linear', inFeatures: 2, outFeatures: 2, weight: p }], { decay: 1, mix: 3e38 });
    };
    const opt = make();
    for (let t = 0; t < 3; t++) {
      opt.setFactors(0, { H: Float32Array.of(0, 1), S: Float32Array.of(1, 0) });
      expect(opt.step([Float32Array.of(0.1, 0.1, 0.1, 0.1)]).applied).toBe(true);
    }
    const s = opt.exportState();
    expect(s.factors[0].H[1]).toBe(Infinity);
    const other = make();
    other.loadState(s);
    assertStatesIdentical(other.exportState(), s, 'loaded');
    for (const o of [opt, other]) o.dispose();
  });
});

describe('a checkpoint describes its layers', () => {
  const linear = (layout: 'pytorch' | 'tfjs'): LayerSpec => ({ kind: 'linear', inFeatures: 3, outFeatures: 2, weight: new Rng(1).array(6), bias: new Rng(2).array(2), layout });
  const conv1x1: LayerSpec = { kind: 'conv2d', inChannels: 3, outChannels: 2, kernelSize: 1, weight: new Rng(1).array(6), bias: new Rng(2).array(2) };
  const trained = () => {
    const opt = new AdaFisher([linear('pytorch'), { kind: 'param', param: new Rng(3).array(4) }]);
    opt.recordInput(0, new Rng(4).array(6), [2, 3]);
    opt.recordOutputGrad(0, new Rng(5).array(4), [2, 2]);
    expect(opt.step([new Rng(6).array(6), new Rng(7).array(2), new Rng(8).array(4)]).applied).toBe(true);
    const state = opt.exportState();
    opt.dispose();
    return state;
  };

  test('its kind, sizes, geometry and layout, which loadState compares (through JSON too)', () => {
    const state = trained();
    expect(state.layers).toEqual(['linear 3->2 layout=pytorch bias', 'param 4']);
    const cases: [LayerSpec, RegExp][] = [
      [linear('tfjs'), /^Invalid AdaFisher checkpoint: layers\[0\] is 'linear 3->2 layout=pytorch bias', this model's is 'linear 3->2 layout=tfjs bias'$/],
      [conv1x1, /layers\[0\] is 'linear 3->2 layout=pytorch bias', this model's is 'conv2d 3->2 kernel=1x1 stride=1x1 groups=1 padding=0,0,0,0 format=NCHW layout=pytorch bias'$/],
    ];
    for (const [spec, message] of cases) {
      // Same element counts, indices and roles: only the descriptions tell them apart.
      const other = new AdaFisher([spec, { kind: 'param', param: new Float32Array(4) }]);
      const before = other.exportState();
      for (const s of [state, stateFromJSON(JSON.parse(JSON.stringify(stateToJSON(state))))]) {
        expectThrows(() => other.loadState(s), { cls: Error, message, code: ErrorCodes.badCheckpoint });
      }
      assertStatesIdentical(other.exportState(), before, 'after the refused load');
      other.dispose();
    }
    const same = new AdaFisher([linear('pytorch'), { kind: 'param', param: new Float32Array(4) }]);
    same.loadState(state);
    assertStatesIdentical(same.exportState(), state, 'loaded');
    // A state without descriptions (exported before they existed) loads on counts alone.
    const { layers: _omitted, ...old } = state;
    const other = new AdaFisher([linear('tfjs'), { kind: 'param', param: new Float32Array(4) }]);
    other.loadState(old as AdaFisherState);
    expectThrows(() => other.loadState({ ...state, layers: ['param 4'] }), { cls: Error, message: /descriptions of 2 layers, received 1/, code: ErrorCodes.badCheckpoint });
    same.dispose();
    other.dispose();
  });
});

describe('user code run while the arguments are read (NOTE: [native after arguments])', () => {
  const backend = () => backendInfo().backend!;
  const make = () => new AdaFisher([{ kind: 'param', param: new Float32Array(64) }], { backend: backend() });

  test('loadState whose checkpoint getter disposes the optimizer: DISPOSED, and the state it built is freed at once', () => {
    const base = liveAllocations(backend());
    const opt = make();
    const state = opt.exportState();
    const momenta: Float32Array[] = [];
    Object.defineProperty(momenta, 0, { enumerable: true, get: () => (opt.dispose(), state.momenta[0]) });
    expectThrows(() => opt.loadState({ ...state, momenta }), { cls: Error, message: /disposed/, code: ErrorCodes.disposed });
    expect(liveAllocations(backend()), 'native allocations left').toBe(base);
  });

  test('step whose gradient getter reloads the state: the step runs on the optimizer as reloaded', () => {
    const opt = make();
    const state = opt.exportState();
    const grads: Float32Array[] = [];
    let reloaded = 0;
    Object.defineProperty(grads, 0, { enumerable: true, get: () => (opt.loadState(state), reloaded++, new Float32Array(64).fill(0.5)) });
    expect(opt.step(grads)).toEqual({ applied: true, refreshed: true });
    expect(reloaded).toBeGreaterThan(0);
    expect(opt.steps).toBe(1);
    opt.dispose();
  });
});

describe('arguments read once (review findings)', () => {
  test("step(grads, params): params read once, by index, before the native call; an iterator is never used", () => {
    const w = new Float32Array(64).fill(1);
    const opt = new AdaFisher([{ kind: 'param', param: new Float32Array(64) }], { backend: 'cpu' });
    const params: Float32Array[] = [w];
    (params as unknown as { [Symbol.iterator]: () => never })[Symbol.iterator] = () => {
      throw new Error('iterated');
    };
    // Before, the step went through and then the copy of params ([...params]) threw: a caller
    // that retried stepped twice.
    expect(opt.step([new Float32Array(64).fill(0.5)], params)).toEqual({ applied: true, refreshed: true });
    expect(opt.steps).toBe(1);
    expect(w[0]).not.toBe(1);
    // The optimizer keeps what the step used: a later step without params updates w again.
    const after = w[0];
    opt.step([new Float32Array(64).fill(0.5)]);
    expect(w[0]).not.toBe(after);
    // A getter that throws while params are read: nothing has changed.
    const bad: Float32Array[] = [];
    Object.defineProperty(bad, 0, { enumerable: true, get: () => { throw new Error('getter'); } });
    const state = opt.exportState();
    expect(() => opt.step([new Float32Array(64)], bad)).toThrow('getter');
    assertStatesIdentical(opt.exportState(), state, 'after the refused step');
    opt.dispose();
  });

  test('loadState reads each factor field once: a getter cannot pass the checks with one array and load another', () => {
    const opt = new AdaFisher([{ kind: 'linear', inFeatures: 3, outFeatures: 2, weight: new Float32Array(6) }], { backend: 'cpu' });
    const state = opt.exportState();
    const good = Float32Array.of(0.5, 0.25, 0.125);
    let reads = 0;
    const f = { layer: 0, S: state.factors[0].S } as { layer: number; S: Float32Array; H?: Float32Array };
    Object.defineProperty(f, 'H', { enumerable: true, get: () => (++reads <= 1 ? good : new Float32Array(3).fill(-5)) });
    opt.loadState({ ...state, factors: [f as AdaFisherState['factors'][0]] });
    expect(reads).toBe(1);
    expect(Array.from(opt.exportState().factors[0].H)).toEqual(Array.from(good));
    opt.dispose();
  });

  test('the layers array is read once: holes are refused, and changing it later changes nothing', () => {
    const lin = () => ({ kind: 'linear', inFeatures: 4, outFeatures: 2, weight: new Float32Array(8) }) as LayerSpec;
    expectThrows(() => new AdaFisher([, lin()] as LayerSpec[]), { cls: TypeError, message: /^Expected a layer description object for layers\[0\] but received undefined$/, code: ErrorCodes.invalidArgument });
    const layers = [lin(), lin()];
    const opt = new AdaFisher(layers, { backend: 'cpu' });
    layers.push(lin());
    expectThrows(() => opt.recordInput(2, new Float32Array(8), [2, 4]), { cls: RangeError, message: /^Expected an integer in \[0, 1\] for layer but received 2 of type number$/, code: ErrorCodes.invalidArgument });
    layers.length = 0;
    opt.recordInput(1, new Float32Array(8), [2, 4]);
    opt.dispose();
  });
});

describe('setLearningRate', () => {
  test('takes effect at the next step and keeps momenta, factors and step counts', () => {
    const rng = new Rng(7);
    const make = (lr: number) => {
      const specs: LayerSpec[] = [{ kind: 'linear', inFeatures: 4, outFeatures: 3, weight: new Rng(1).array(12), bias: new Rng(2).array(3) }];
      return { specs, opt: new AdaFisher(specs, { lr }) };
    };
    const x = rng.array(8), dy = rng.array(6);
    const grads = [rng.array(12), rng.array(3)];
    const stepOnce = (opt: AdaFisher) => {
      opt.recordInput(0, x, [2, 4]);
      opt.recordOutputGrad(0, dy, [2, 3]);
      return opt.step(grads);
    };
    // a: lr 0.1 for two steps, then 0.02; b: the same two steps, then a fresh optimizer with lr 0.02 over b's state.
    const a = make(0.1), b = make(0.1);
    for (const o of [a, b]) for (let i = 0; i < 2; i++) stepOnce(o.opt);
    a.opt.setLearningRate(0.02);
    expect(a.opt.hyperparameters.lr).toBe(0.02);
    expect(a.opt.steps).toBe(2);
    const c = new AdaFisher(b.specs, { lr: 0.02 });
    const s = b.opt.exportState();
    c.loadState({ ...s, hyperparameters: { ...s.hyperparameters, lr: 0.02 } });
    stepOnce(a.opt);
    stepOnce(c);
    assertSnapshotsIdentical(snapshot(a.opt, paramsOf(a.specs)), snapshot(c, paramsOf(b.specs)), 'after the third step');
    // lr 0 moves nothing; a bad lr is refused and changes nothing.
    a.opt.setLearningRate(0);
    const before = paramsOf(a.specs).map((p) => Float32Array.from(p as Float32Array));
    stepOnce(a.opt);
    paramsOf(a.specs).forEach((p, i) => expect(Array.from(p as Float32Array)).toEqual(Array.from(before[i])));
    expect(() => a.opt.setLearningRate(Number.NaN)).toThrow(RangeError);
    expect(() => a.opt.setLearningRate(1e39)).toThrow(/^Expected a number below 2\^128 \(float32's range\) for lr but received 1e\+39 of type number$/);
    expect(a.opt.hyperparameters.lr).toBe(0);
    for (const o of [a.opt, b.opt, c]) o.dispose();
  });

  test('between recording the statistics and the step: they are kept, and the step is the one at the new rate', () => {
    const rng = new Rng(8);
    const specsOf = () => [{ kind: 'linear', inFeatures: 3, outFeatures: 2, weight: new Rng(3).array(6), bias: new Rng(4).array(2) }] as LayerSpec[];
    const x = rng.array(6), dy = rng.array(4);
    const grads = [rng.array(6), rng.array(2)];
    const run = (lr: number, change: number | null) => {
      const specs = specsOf();
      const opt = new AdaFisher(specs, { lr });
      opt.recordInput(0, x, [2, 3]);
      opt.recordOutputGrad(0, dy, [2, 2]);
      if (change !== null) opt.setLearningRate(change);
      expect(opt.step(grads)).toEqual({ applied: true, refreshed: true });
      const snap = snapshot(opt, paramsOf(specs));
      opt.dispose();
      return snap;
    };
    assertSnapshotsIdentical(run(0.1, 1e-4), run(1e-4, null), 'lr changed after recording');
  });
});

describe('hyperparameters that float32 cannot hold', () => {
  test.each([
    ['lr', 1e39, /^Expected a number below 2\^128 \(float32's range\) for options\.lr but received 1e\+39 of type number$/],
    ['weightDecay', 4e38, /for options\.weightDecay but received 4e\+38 of type number$/],
    ['damping', 1e-50, /^Expected a number of at least 2\^-149 \(float32's smallest above 0\) for options\.damping but received 1e-50 of type number$/],
  ] as const)('%s %s is refused (it would be +Infinity or 0 in the kernels)', (key, value, message) => {
    expect(() => new AdaFisher([{ kind: 'param', param: new Float32Array(2) }], { [key]: value })).toThrow(message);
  });
});
