// recordFactors: several layers' statistics in one call. It must give, bit for bit, what one
// recordInput / recordOutputGrad per layer gives (on cuda it runs the mean squares of
// several layers in one launch: NOTE: [batched factor launch]), check every record before
// reducing any, and keep the later of two records of the same factor.
import { spawnSync } from 'node:child_process';

import { describe, expect, test } from 'vitest';

import { loadBinding } from '../lib/binding.js';
import { AdaFisher, backendInfo, createBuffer, ErrorCodes, type FactorRecord, type LayerSpec, type Tensor } from '../lib/index.js';
import { assertSnapshotsIdentical, expectThrows, paramsOf, randomStats, Rng, snapshot, type LayerStats } from './helpers.js';

// Every layer kind and both conv layouts, and 20 small Linear layers: 22 column reductions
// (Linear inputs and gradients, NHWC conv gradients) and 2 plane reductions (NCHW conv
// gradients) in one call, more than one launch's 16 jobs.
function model(rng: Rng): { specs: LayerSpec[]; inputShapes: (number[] | undefined)[] } {
  const specs: LayerSpec[] = [
    { kind: 'conv2d', inChannels: 3, outChannels: 4, kernelSize: 3, padding: 1, weight: rng.array(108), bias: rng.array(4) },
    { kind: 'conv2d', inChannels: 4, outChannels: 6, kernelSize: [2, 3], stride: 2, padding: 'same', weight: rng.array(144) },
    { kind: 'conv2d', inChannels: 2, outChannels: 5, kernelSize: 2, dataFormat: 'NHWC', layout: 'tfjs', weight: rng.array(40), bias: rng.array(5) },
    { kind: 'batchnorm', channels: 4, weight: rng.array(4), bias: rng.array(4) },
    { kind: 'layernorm', features: 7, weight: rng.array(7), bias: rng.array(7) },
    { kind: 'param', param: rng.array(9) },
  ];
  const inputShapes: (number[] | undefined)[] = [[3, 3, 8, 8], [3, 4, 8, 8], [3, 6, 5, 2], [3, 4, 8, 8], [3, 5, 7], undefined];
  for (let i = 0; i < 20; i++) {
    const inF = 3 + ((i * 7) % 40), outF = 2 + ((i * 11) % 30);
    specs.push({ kind: 'linear', inFeatures: inF, outFeatures: outF, weight: rng.array(inF * outF), bias: i % 3 === 0 ? undefined : rng.array(outF), layout: i % 2 === 0 ? 'pytorch' : 'tfjs' });
    inputShapes.push([1 + ((i * 13) % 70), inF]);
  }
  return { specs, inputShapes };
}

const options = { lr: 1e-2, weightDecay: 1e-3, tcov: 2 };

function records(stats: readonly (LayerStats | undefined)[], wrap: (a: Float32Array) => Tensor = (a) => a): FactorRecord[] {
  const out: FactorRecord[] = [];
  stats.forEach((s, layer) => {
    if (s !== undefined) out.push({ layer, input: wrap(s.input), inputShape: s.inputShape, outputGrad: wrap(s.grad), outputGradShape: s.gradShape });
  });
  return out;
}

describe('recordFactors', () => {
  test.each([
    ['Float32Arrays', (a: Float32Array): Tensor => a],
    ['DeviceBuffers', (a: Float32Array): Tensor => createBuffer(a)],
  ])('gives the bits of one recordInput and recordOutputGrad per layer, over 6 steps (%s)', (_, wrap) => {
    const build = () => model(new Rng(51));
    const one = build(), batch = build();
    const a = new AdaFisher(one.specs, options), b = new AdaFisher(batch.specs, options);
    const rng = new Rng(52);
    let refreshed = 0;
    for (let t = 0; t < 6; t++) {
      const stats = randomStats(rng, one.specs, one.inputShapes);
      const grads = paramsOf(one.specs).map((p) => rng.array(p.length));
      if (a.willRefreshFactors) {
        stats.forEach((s, i) => {
          if (s === undefined) return;
          a.recordInput(i, s.input, s.inputShape);
          a.recordOutputGrad(i, s.grad, s.gradShape);
        });
        // Layers in reverse order, inputs and gradients in separate records: order does not matter.
        const rs = records(stats, wrap).reverse();
        b.recordFactors([...rs.map((r) => ({ layer: r.layer, input: r.input, inputShape: r.inputShape })), ...rs.map((r) => ({ layer: r.layer, outputGrad: r.outputGrad, outputGradShape: r.outputGradShape }))]);
      }
      const ra = a.step(grads), rb = b.step(grads);
      expect(rb).toEqual(ra);
      expect(ra.applied).toBe(true);
      if (ra.refreshed) refreshed++;
      assertSnapshotsIdentical(snapshot(b, paramsOf(batch.specs)), snapshot(a, paramsOf(one.specs)), `step ${t}`);
    }
    expect(refreshed).toBe(3);
    // The factors are not trivially equal: they moved away from their initial value.
    const f = a.exportState().factors;
    expect(f.some((x) => x.H.some((v) => v !== f[0].H[0]))).toBe(true);
    a.dispose();
    b.dispose();
  });

  test('a later record of the same factor replaces an earlier one, as with one call each', () => {
    const build = () => model(new Rng(53));
    const one = build(), batch = build();
    const a = new AdaFisher(one.specs, options), b = new AdaFisher(batch.specs, options);
    const rng = new Rng(54);
    const stale = randomStats(rng, one.specs, one.inputShapes);
    const stats = randomStats(rng, one.specs, one.inputShapes);
    for (const s of [stale, stats]) {
      s.forEach((x, i) => {
        if (x === undefined) return;
        a.recordInput(i, x.input, x.inputShape);
        a.recordOutputGrad(i, x.grad, x.gradShape);
      });
    }
    b.recordFactors([...records(stale), ...records(stats)]);
    const grads = paramsOf(one.specs).map((p) => rng.array(p.length));
    expect(b.step(grads)).toEqual(a.step(grads));
    assertSnapshotsIdentical(snapshot(b, paramsOf(batch.specs)), snapshot(a, paramsOf(one.specs)));
    a.dispose();
    b.dispose();
  });

  test('checks every record before reducing any: a bad last record leaves no statistics behind', () => {
    const { specs, inputShapes } = model(new Rng(55));
    const opt = new AdaFisher(specs, options);
    const rng = new Rng(56);
    const good = records(randomStats(rng, specs, inputShapes));
    const last = good[good.length - 1];
    const badShape = [...last.outputGradShape!];
    badShape[badShape.length - 1] += 1;
    expectThrows(() => opt.recordFactors([...good, { ...last, outputGradShape: badShape }]), {
      cls: RangeError,
      message: new RegExp(`layers\\[${last.layer}\\] output gradient`),
    });
    expectThrows(() => opt.recordFactors([...good, { ...last, input: new Float32Array(3) }]), { cls: RangeError, message: /input/ });
    // Nothing was recorded: the first step refreshes the factors and finds no statistics.
    const grads = paramsOf(specs).map((p) => rng.array(p.length));
    expectThrows(() => opt.step(grads), { cls: Error, message: /layers\[0\]: no input \(H\) statistics/, code: ErrorCodes.missingStatistics });
    // The good records alone are enough.
    opt.recordFactors(good);
    expect(opt.step(grads)).toEqual({ applied: true, refreshed: true });
    opt.dispose();
  });

  test("errors name a layer by the user's index, also behind a 'param' layer (native index one less)", () => {
    const rng = new Rng(59);
    const specs: LayerSpec[] = [
      { kind: 'param', param: rng.array(5) },
      { kind: 'linear', inFeatures: 4, outFeatures: 3, weight: rng.array(12) },
    ];
    const opt = new AdaFisher(specs, options);
    expectThrows(() => opt.recordInput(1, new Float32Array(8), [2, 5]), { cls: RangeError, message: /layers\[1\] input/ });
    expectThrows(() => opt.recordFactors([{ layer: 1, outputGrad: new Float32Array(8), outputGradShape: [2, 4] }]), {
      cls: RangeError,
      message: /layers\[1\] output gradient/,
    });
    expectThrows(() => opt.setFactors(1, { H: new Float32Array(2) }), { cls: RangeError, message: /layers\[1\]\.H/ });
    expectThrows(() => opt.step([rng.array(5), rng.array(12)]), { cls: Error, message: /^layers\[1\]: no input/, code: ErrorCodes.missingStatistics });
    opt.dispose();
  });

  test('bad arguments: a TypeError or RangeError naming the record', () => {
    const { specs } = model(new Rng(57));
    const opt = new AdaFisher(specs, options);
    const x = new Float32Array(3 * 3 * 8 * 8);
    expectThrows(() => opt.recordFactors(null as never), { cls: TypeError, message: /records/ });
    expectThrows(() => opt.recordFactors([7 as never]), { cls: TypeError, message: /records\[0\]/ });
    expectThrows(() => opt.recordFactors([{ layer: 0 }]), { cls: TypeError, message: /input or an outputGrad for records\[0\]/ });
    // Inherited enumerable properties (a polyfill's) are not fields of the record.
    Object.defineProperty(Object.prototype, 'polyfilled', { value: 1, enumerable: true, configurable: true, writable: true });
    try {
      opt.recordFactors([{ layer: 0, input: x, inputShape: [3, 3, 8, 8] }]);
    } finally {
      delete (Object.prototype as { polyfilled?: number }).polyfilled;
    }
    // A misspelt field would leave its statistic unrecorded, silently.
    expectThrows(() => opt.recordFactors([{ layer: 0, input: x, inputShape: [3, 3, 8, 8], outputgrad: x } as never]), {
      cls: RangeError,
      message: /^Expected a field of a record \(layer, input, inputShape, outputGrad, outputGradShape\) for records\[0\]\.outputgrad but received the unknown key 'outputgrad'$/,
      code: ErrorCodes.invalidArgument,
    });
    expectThrows(() => opt.recordFactors([{ layer: 0, inputShape: [3, 3, 8, 8], outputGrad: x, outputGradShape: [3, 4, 8, 8] }]), {
      cls: TypeError,
      message: /records\[0\]\.input/,
    });
    expectThrows(() => opt.recordFactors([{ layer: 0, input: x, inputShape: [3, 3, 8, 8] }, { layer: 99, input: x, inputShape: [1] }]), {
      cls: RangeError,
      message: /records\[1\]\.layer/,
    });
    expectThrows(() => opt.recordFactors([{ layer: 5, input: x, inputShape: [3] }]), { cls: RangeError, message: /preconditioned layer.*for records\[0\]\.layer/ });
    expectThrows(() => opt.recordFactors([{ layer: 0, input: x, inputShape: [3, 3, 8, -8] }]), { cls: RangeError, message: /records\[0\]\.inputShape\[3\]/ });
    expectThrows(() => opt.recordFactors([{ layer: 0, input: [1, 2] as never, inputShape: [3, 3, 8, 8] }]), { cls: TypeError, message: /layers\[0\] input/ });
    // A hole in a sparse array is not a record (forEach would skip it silently).
    expectThrows(() => opt.recordFactors([{ layer: 0, input: x, inputShape: [3, 3, 8, 8] }, , ] as never), { cls: TypeError, message: /for records\[1\] but received undefined/ });
    expectThrows(() => opt.recordFactors([{ layer: 0, input: x, inputShape: [3, 3.5, 8, 8] }]), { cls: RangeError, message: /records\[0\]\.inputShape\[1\]/ });
    expectThrows(() => opt.recordFactors([{ layer: 0, outputGrad: x, outputGradShape: [3, 2 ** 60] }]), { cls: RangeError, message: /records\[0\]\.outputGradShape\[1\]/ });
    // The layer is checked before the other fields are read; each field is read once.
    const reads: string[] = [];
    const spy = (layer: unknown) =>
      new Proxy({ layer, input: x, inputShape: [3, 3, 8, 8] }, { get: (t, k) => (reads.push(String(k)), t[k as keyof typeof t]) });
    expectThrows(() => opt.recordFactors([spy(99) as never]), { cls: RangeError, message: /for records\[0\]\.layer/ });
    expect(reads).toEqual(['layer']);
    reads.length = 0;
    opt.recordFactors([spy(0) as never]);
    expect(reads).toEqual(['layer', 'input', 'inputShape', 'outputGrad', 'outputGradShape']);
    opt.recordFactors([]);  // nothing to record is not an error
    opt.dispose();
    expectThrows(() => opt.recordFactors([]), { cls: Error, message: /disposed/, code: ErrorCodes.disposed });
  });

  test('the binding names the bad field of a record on its own (names made only on failure: NOTE: [names on failure])', () => {
    const { backend } = backendInfo();
    const b = loadBinding().binding;
    const cfg = { rule: 0, lr: 1e-3, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };
    const linear = { kind: 0, hasBias: true, inFeatures: 4, outFeatures: 3, layout: 0, format: 0 };
    const conv = { kind: 1, hasBias: false, inFeatures: 2, outFeatures: 3, layout: 0, format: 0, kernelH: 3, kernelW: 3, strideH: 1, strideW: 1, groups: 1, padMode: 0, padTop: 0, padBottom: 0, padLeft: 0, padRight: 0 };
    const tensors = [{ numel: 12, layer: 0, role: 0 }, { numel: 3, layer: 0, role: 1 }, { numel: 54, layer: 1, role: 0 }];
    const native = new b.NativeOptimizer(backend, cfg, [linear, conv], tensors) as unknown as { recordFactors(records: unknown): void; dispose(): void };
    const x = new Float32Array(8), xc = new Float32Array(2 * 2 * 5 * 5);
    const good = { layer: 0, which: 0, data: x, shape: [2, 4] };
    const cases: [unknown[], typeof TypeError, RegExp][] = [
      [[good, 5], TypeError, /^Expected an object for records\[1\] but received 5/],
      [[good, { ...good, layer: 'a' }], TypeError, /^Expected an integer for records\[1\]\.layer but/],
      [[{ ...good, layer: 2 }], RangeError, /^Expected an integer in \[0, 1\] for records\[0\]\.layer but received 2/],
      [[good, { ...good, which: 2 }], RangeError, /for records\[1\]\.which but received 2/],
      [[{ ...good, shape: 'a' }], TypeError, /^Expected an array for layers\[0\] input shape but/],
      [[{ ...good, which: 1, shape: [2, -3] }], RangeError, /for layers\[0\] output gradient shape\[1\] but received -3/],
      [[{ ...good, shape: new Array(17).fill(1) }], RangeError, /^Expected at most 16 dims for layers\[0\] input shape$/],
      [[good, { layer: 1, which: 0, data: xc, shape: [2, 2, 25] }], RangeError, /^Expected layers\[1\] input of rank 4 \(NCHW\)/],
      [[good, { layer: 1, which: 1, data: x, shape: [2, 4, 1, 1] }], RangeError, /^Expected layers\[1\] output gradient with 3 output/],
      [[{ ...good, data: new Float32Array(7) }], RangeError, /^Expected 8 elements for layers\[0\] input but received 7/],
      [[good, { ...good, which: 1, data: 'x', shape: [2, 3] }], TypeError, /for layers\[0\] output gradient but received 'x'/],
    ];
    for (const [records, cls, message] of cases) expectThrows(() => native.recordFactors(records), { cls, message });
    native.recordFactors([good, { layer: 1, which: 0, data: xc, shape: [2, 2, 5, 5] }]);
    native.dispose();
  });

  test('the binding reads its fields with keys of its own: index getters and setters on Object.prototype and Array.prototype never run (NOTE: [property keys])', () => {
    // In a child process: the prototypes of this one stay untouched.
    const script = `
      import { createRequire } from 'node:module';
      const b = createRequire(import.meta.url)(process.argv[1]);
      let seen = '', out = '';
      const protos = [Object.prototype, Array.prototype], keys = ['0', '1', '2', '3', '4'];
      for (const p of protos) for (const k of keys) Object.defineProperty(p, k, { set(v) { seen += String(v) + ','; }, get() { return 'hijacked'; }, configurable: true });
      const cfg = { rule: 0, lr: 1e-3, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };
      const linear = { kind: 0, hasBias: true, inFeatures: 4, outFeatures: 3, layout: 0, format: 0 };
      for (let i = 0; i < 3; i++) {
        try {
          const o = new b.NativeOptimizer('cpu', cfg, [linear], [{ numel: 12, layer: 0, role: 0 }, { numel: 3, layer: 0, role: 1 }]);
          o.recordFactors([{ layer: 0, which: 0, data: new Float32Array(8), shape: [2, 4] }]);
          o.dispose();
          out += 'ok;';
        } catch (e) { out += e.message + ';'; }
      }
      for (const p of protos) for (const k of keys) delete p[k];
      console.log(JSON.stringify({ out, seen }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, backendInfo('cpu').addonPath], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ out: 'ok;ok;ok;', seen: '' });
  });

  test('setFactors checks H and S before it writes either: a call that throws records nothing', () => {
    const { backend } = backendInfo();
    const specs: LayerSpec[] = [{ kind: 'linear', inFeatures: 4, outFeatures: 3, weight: new Rng(3).array(12), bias: new Rng(4).array(3) }];
    const opt = new AdaFisher(specs, options);
    const H = Float32Array.of(1, 2, 3, 4, 1);
    const disposed = createBuffer(3, { backend: backend! });
    disposed.dispose();
    const badS: [unknown, ErrorConstructor, RegExp][] = [
      [new Float32Array(5), RangeError, /Expected 3 elements for layers\[0\]\.S but received 5/],
      [new Float64Array(3), TypeError, /layers\[0\]\.S/],
      [disposed, Error, /disposed/],
    ];
    for (const [S, cls, message] of badS) expectThrows(() => opt.setFactors(0, { H, S: S as Float32Array }), { cls, message });
    // The H of those calls was not kept: a step with only S handed over lacks it.
    opt.setFactors(0, { S: Float32Array.of(1, 2, 3) });
    const grads = [new Float32Array(12).fill(0.1), new Float32Array(3).fill(0.1)];
    expectThrows(() => opt.step(grads), { cls: Error, message: /^layers\[0\]: no input \(H\)/, code: ErrorCodes.missingStatistics });
    opt.setFactors(0, { H });
    expect(opt.step(grads)).toEqual({ applied: true, refreshed: true });
    // The same through the raw binding, which checks on its own.
    const b = loadBinding().binding;
    const cfg = { rule: 0, lr: 1e-3, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };
    const linear = { kind: 0, hasBias: false, inFeatures: 4, outFeatures: 3, layout: 0, format: 0 };
    const native = new b.NativeOptimizer(backend, cfg, [linear], [{ numel: 12, layer: 0, role: 0 }]) as unknown as {
      setFactors(layer: unknown, H: unknown, S: unknown): void;
      step(params: Float32Array[], grads: Float32Array[]): { applied: boolean };
      dispose(): void;
    };
    expectThrows(() => native.setFactors(0, null, undefined), { cls: TypeError, message: /^Expected H or S \(a Float32Array or DeviceBuffer\) but received neither$/ });
    expectThrows(() => native.setFactors(0, Float32Array.of(1, 2, 3, 4), new Float32Array(2)), { cls: RangeError, message: /layers\[0\]\.S/ });
    native.setFactors(0, undefined, Float32Array.of(1, 2, 3));
    const p = new Float32Array(12), g = new Float32Array(12).fill(0.5);
    expectThrows(() => native.step([p], [g]), { cls: Error, message: /no input \(H\)/, code: ErrorCodes.missingStatistics });
    native.setFactors(0, Float32Array.of(1, 2, 3, 4), null);
    expect(native.step([p], [g]).applied).toBe(true);
    native.dispose();
    opt.dispose();
  });

  test("reuseRunningFactors hands a layer's running factors as its statistics: the same bits as setFactors with them", () => {
    const make = () => {
      const rng = new Rng(61);
      const specs: LayerSpec[] = [
        { kind: 'linear', inFeatures: 4, outFeatures: 3, weight: rng.array(12), bias: rng.array(3) },
        { kind: 'param', param: rng.array(5) },
        { kind: 'linear', inFeatures: 3, outFeatures: 2, weight: rng.array(6) },
      ];
      return { specs, opt: new AdaFisher(specs, { lr: 1e-2 }) };
    };
    const a = make(), b = make();
    const data = new Rng(62);
    const x0 = data.array(8), g0 = data.array(6), x2 = data.array(6), g2 = data.array(4);
    const grads = [data.array(12), data.array(3), data.array(5), data.array(6)];
    for (const { opt } of [a, b]) {
      opt.recordInput(0, x0, [2, 4]);
      opt.recordOutputGrad(0, g0, [2, 3]);
      opt.recordInput(2, x2, [2, 3]);
      opt.recordOutputGrad(2, g2, [2, 2]);
      expect(opt.step(grads).applied).toBe(true);
    }
    // Step 2: layer 2 did not run.
    const running = b.opt.exportState().factors[1];
    for (const { opt } of [a, b]) {
      opt.recordInput(0, x0, [2, 4]);
      opt.recordOutputGrad(0, g0, [2, 3]);
    }
    expectThrows(() => a.opt.reuseRunningFactors([2, 1]), { cls: RangeError, message: /preconditioned layer.*for layers\[1\]/ });
    expectThrows(() => a.opt.reuseRunningFactors([2, 9]), { cls: RangeError, message: /layers\[1\]/ });
    expectThrows(() => a.opt.reuseRunningFactors(2 as never), { cls: TypeError, message: /array of layer indices for layers/ });
    // None of those recorded layer 2's statistics.
    expectThrows(() => a.opt.step([...grads.slice(0, 3), null as never]), { cls: Error, message: /^layers\[2\]: no input/, code: ErrorCodes.missingStatistics });
    a.opt.reuseRunningFactors([2]);
    b.opt.setFactors(2, { H: running.H, S: running.S });
    for (const { opt } of [a, b]) expect(opt.step([...grads.slice(0, 3), null as never])).toEqual({ applied: true, refreshed: true });
    assertSnapshotsIdentical(snapshot(a.opt, paramsOf(a.specs)), snapshot(b.opt, paramsOf(b.specs)), 'reuseRunningFactors against setFactors');
    expect(a.opt.exportState().factors[1].H).not.toEqual(running.H); // the refresh moved them: R <- decay R + mix norm(R)
    for (const { opt } of [a, b]) opt.dispose();
  });

  test('the binding refuses hyperparameters that float32 cannot hold, as the TypeScript API does', () => {
    const b = loadBinding().binding;
    const backend = backendInfo().backend!;
    const cfg = { rule: 0, lr: 1e-3, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };
    const make = (patch: object) => new b.NativeOptimizer(backend, { ...cfg, ...patch }, [], [{ numel: 4, layer: -1, role: 0 }]);
    const bad: [object, RegExp][] = [
      [{ damping: 1e-50 }, /damping > 0 in float32/],
      [{ lr: 1e39 }, /lr >= 0 and below 2\^128/],
      [{ mix: 1e39 }, /mix >= 0 \(below 2\^128\)/],
      [{ weightDecay: 1e39 }, /weightDecay >= 0 and below 2\^128/],
      [{ lr: NaN }, /finite number for config\.lr/],
    ];
    for (const [patch, message] of bad) expectThrows(() => make(patch), { cls: RangeError, message });
    const ok = make({ damping: 2 ** -149, lr: 3e38 }) as unknown as { setLearningRate(lr: number): void; dispose(): void };
    expectThrows(() => ok.setLearningRate(1e39), { cls: RangeError, message: /lr >= 0 and below 2\^128/ });
    ok.setLearningRate(1e38);
    ok.dispose();
  });

  test('the native method checks its records itself (called past the TypeScript API)', () => {
    const b = loadBinding().binding;
    const backend = backendInfo().backend!;
    const cfg = { rule: 0, lr: 1e-3, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };
    const linear = { kind: 0, hasBias: false, inFeatures: 4, outFeatures: 3, layout: 0, format: 0 };
    const native = new b.NativeOptimizer(backend, cfg, [linear], [{ numel: 12, layer: 0, role: 0 }]) as unknown as {
      recordFactors(records: unknown): void;
      step(params: Float32Array[], grads: Float32Array[]): { applied: boolean };
      dispose(): void;
    };
    const x = new Float32Array(8);
    expectThrows(() => native.recordFactors(undefined), { cls: TypeError, message: /records/ });
    expectThrows(() => native.recordFactors([{ layer: 0, which: 2, data: x, shape: [2, 4] }]), { cls: RangeError, message: /records\[0\]/ });
    expectThrows(() => native.recordFactors([{ layer: 1, which: 0, data: x, shape: [2, 4] }]), { cls: RangeError, message: /records\[0\]/ });
    expectThrows(() => native.recordFactors([{ layer: 0, which: 0, data: x, shape: 'no' }]), { cls: TypeError, message: /layers\[0\] input shape/ });
    expectThrows(() => native.recordFactors([{ layer: 0, which: 0, data: x, shape: [2, 5] }]), { cls: RangeError, message: /layers\[0\] input/ });
    expectThrows(() => native.recordFactors([{ layer: 0, which: 1, data: x, shape: [2, 4] }]), { cls: RangeError, message: /layers\[0\] output gradient/ });
    expectThrows(() => native.recordFactors([{ layer: 0, which: 0, data: x, shape: [2, 4] }, { layer: 0, which: 1, data: x, shape: [2, 3] }]), {
      cls: RangeError,
      message: /6 elements for layers\[0\] output gradient/,
    });
    // None of those recorded anything: the (refreshing) first step lacks the statistics.
    const p = new Float32Array(12), g = new Float32Array(12).fill(0.5);
    expectThrows(() => native.step([p], [g]), { cls: Error, message: /no input \(H\)/, code: ErrorCodes.missingStatistics });
    native.recordFactors([{ layer: 0, which: 1, data: new Float32Array(6), shape: [2, 3] }, { layer: 0, which: 0, data: x, shape: [2, 4] }]);
    expect(native.step([p], [g]).applied).toBe(true);
    native.dispose();
  });
});
