// Every CPU kernel against the float64 reference of test/reference.ts, over several steps,
// on parameters and every state buffer (momenta, H, S, step counters), including sizes
// chosen to hit chunk/vector edges and both weight layouts and data formats.
import { describe, expect, test } from 'vitest';

import { AdaFisher, createBuffer, type Conv2dLayer, type LayerSpec } from '../lib/index.js';
import {
  assertClose,
  hostCopy,
  paramsOf,
  recordStats,
  randomStats,
  referenceFactors,
  Rng,
  runAgainstReference,
  type LayerStats,
} from './helpers.js';
import { linearH, normalizeFactor, ReferenceAdaFisher } from './reference.js';

const hasBias = (b: boolean, rng: Rng, n: number) => (b ? rng.array(n, 0.5) : null);

function linear(rng: Rng, inF: number, outF: number, bias: boolean, layout: 'pytorch' | 'tfjs' = 'pytorch'): LayerSpec {
  return { kind: 'linear', inFeatures: inF, outFeatures: outF, weight: rng.array(inF * outF, 0.5), bias: hasBias(bias, rng, outF), layout };
}

function conv(rng: Rng, o: Omit<Conv2dLayer, 'kind' | 'weight' | 'bias'> & { bias: boolean }): Conv2dLayer {
  const [kh, kw] = typeof o.kernelSize === 'number' ? [o.kernelSize, o.kernelSize] : o.kernelSize;
  const n = o.outChannels * (o.inChannels / (o.groups ?? 1)) * kh * kw;
  return { ...o, kind: 'conv2d', weight: rng.array(n, 0.5), bias: hasBias(o.bias, rng, o.outChannels) };
}

// Running factors that equal the normalized fresh factor (decay 0, mix 1): the factor
// kernels are then compared directly, not damped by the EMA. Uses the paper's (γ1, γ2) form.
const DIRECT = { decay: 0, mix: 1 } as const;

describe('linear, param and mixed models', () => {
  test('AdaFisher (L2 decay): linear with rank-3 input + bias, tfjs linear, plain param', () => {
    const rng = new Rng(1);
    const specs: LayerSpec[] = [
      linear(rng, 6, 5, true),
      linear(rng, 5, 3, false, 'tfjs'),
      { kind: 'param', param: rng.array(7) },
    ];
    runAgainstReference({
      specs,
      options: { lr: 1e-3, weightDecay: 5e-4 },
      inputShapes: [[2, 3, 6], [4, 5], undefined],
      steps: 5,
      seed: 11,
    }).opt.dispose();
  });

  test('AdaFisherW (decoupled), tcov 3, gamma 0.5: factors reused between refreshes', () => {
    const rng = new Rng(2);
    const specs: LayerSpec[] = [linear(rng, 9, 4, true, 'tfjs'), linear(rng, 4, 2, true)];
    runAgainstReference({
      specs,
      options: { lr: 3e-3, decoupled: true, weightDecay: 1e-2, tcov: 3, gamma: 0.5, beta: 0.8, damping: 2e-3 },
      inputShapes: [[3, 9], [3, 4]],
      steps: 7,
      seed: 12,
    }).opt.dispose();
  });

  test('per-parameter bias correction: null gradients leave a tensor and its step counter alone', () => {
    const rng = new Rng(3);
    const specs: LayerSpec[] = [linear(rng, 4, 3, true), { kind: 'param', param: rng.array(10) }];
    const { opt, ref } = runAgainstReference({
      specs,
      options: { lr: 1e-2 },
      inputShapes: [[5, 4], undefined],
      steps: 6,
      seed: 13,
      nullGrad: (step, tensor) => (tensor === 1 && step % 2 === 0) || (tensor === 2 && step < 3),
    });
    expect(opt.exportState().stepCounts).toEqual([6, 3, 3]);
    expect(ref.stepCounts).toEqual([6, 3, 3]);
    opt.dispose();
  });

  test("a 'param' of 278011 elements (no multiple of any vector width or chunk)", () => {
    const rng = new Rng(4);
    const specs: LayerSpec[] = [{ kind: 'param', param: rng.array(278011) }, linear(rng, 3, 2, true)];
    runAgainstReference({
      specs,
      options: { lr: 1e-2, weightDecay: 1e-3 },
      inputShapes: [undefined, [2, 3]],
      steps: 3,
      seed: 14,
    }).opt.dispose();
  });

  // A zero-size tensor has nothing to update, but a gradient was given for it: its step
  // counter (what a checkpoint records for bias correction) must advance like any other's,
  // and must not depend on whether the empty tensor is a Float32Array or a DeviceBuffer.
  test('a zero-size param (Float32Array and DeviceBuffer) next to others: stepped and counted', () => {
    const counts: Record<string, number[]> = {};
    for (const kind of ['Float32Array', 'DeviceBuffer'] as const) {
      const rng = new Rng(8);
      const empty = () => (kind === 'Float32Array' ? new Float32Array(0) : createBuffer(0));
      const specs: LayerSpec[] = [{ kind: 'param', param: rng.array(5) }, { kind: 'param', param: empty() }, linear(rng, 3, 2, true)];
      const opt = new AdaFisher(specs, { lr: 1e-2 });
      const ref = new ReferenceAdaFisher(specs, { lr: 1e-2 });
      const params = paramsOf(specs);
      for (let t = 0; t < 3; t++) {
        const stats = randomStats(rng, specs, [undefined, undefined, [2, 3]]);
        recordStats(opt, stats);
        const grads = [rng.array(5), empty(), rng.array(6), rng.array(2)];
        expect(opt.step(grads).applied).toBe(true);
        ref.step(referenceFactors(specs, stats), grads.map((g) => (g instanceof Float32Array ? g : new Float32Array(0))));
      }
      const s = opt.exportState();
      expect(s.momenta[1].length).toBe(0);
      params.forEach((p, i) => assertClose(hostCopy(p), ref.params[i], { rtol: 1e-5, atol: 1e-6 }, `${kind}: params[${i}]`));
      counts[kind] = s.stepCounts;
      opt.dispose();
    }
    expect(counts).toEqual({ Float32Array: [3, 3, 3, 3], DeviceBuffer: [3, 3, 3, 3] });
  });

  test('more tensors than one batch of work: 200 small params (lengths 1..97) plus layers', () => {
    const rng = new Rng(5);
    const specs: LayerSpec[] = [];
    for (let i = 0; i < 200; i++) specs.push({ kind: 'param', param: rng.array(1 + ((i * 37) % 97)) });
    specs.push(linear(rng, 3, 4, true));
    const { opt } = runAgainstReference({
      specs,
      options: { lr: 5e-3, decoupled: true, weightDecay: 1e-2 },
      inputShapes: [...new Array<undefined>(200), [6, 3]],
      steps: 3,
      seed: 15,
    });
    expect(opt.parameterSlots().length).toBe(202);
    opt.dispose();
  });

  test('a linear weight of 70001 elements (several work chunks, partial last chunk) in both layouts', () => {
    const rng = new Rng(6);
    runAgainstReference({
      specs: [linear(rng, 7001, 10, true), linear(rng, 10, 7001, true, 'tfjs')],
      options: { lr: 1e-3 },
      inputShapes: [[3, 7001], [3, 10]],
      steps: 2,
      seed: 16,
    }).opt.dispose();
  });

  test('params and gradients at unaligned offsets (subarray views starting 1 float into a buffer)', () => {
    const rng = new Rng(7);
    const view = (a: Float32Array) => {
      const b = new Float32Array(a.length + 1);
      b.set(a, 1);
      return b.subarray(1);
    };
    const specs: LayerSpec[] = [
      { kind: 'linear', inFeatures: 13, outFeatures: 5, weight: view(rng.array(65)), bias: view(rng.array(5)) },
      { kind: 'param', param: view(rng.array(1003)) },
    ];
    const ref = new ReferenceAdaFisher(specs, { lr: 1e-2 });
    const opt = new AdaFisher(specs, { lr: 1e-2 });
    const params = paramsOf(specs);
    for (let t = 0; t < 3; t++) {
      const stats = randomStats(rng, specs, [[4, 13], undefined]);
      recordStats(opt, stats);
      const grads = params.map((p) => view(rng.array(p.length)));
      opt.step(grads);
      ref.step(referenceFactors(specs, stats), grads);
    }
    params.forEach((p, i) => assertClose(hostCopy(p), ref.params[i], { rtol: 1e-5, atol: 1e-6 }, `params[${i}]`));
    opt.dispose();
  });
});

describe('conv2d', () => {
  const cases: { name: string; spec: Omit<Conv2dLayer, 'kind' | 'weight' | 'bias'> & { bias: boolean }; input: number[] }[] = [
    { name: '3x3, padding 1, bias, NCHW', spec: { inChannels: 3, outChannels: 4, kernelSize: 3, padding: 1, bias: true }, input: [2, 3, 6, 5] },
    { name: '1x1 kernel, no bias', spec: { inChannels: 5, outChannels: 3, kernelSize: 1, bias: false }, input: [2, 5, 4, 4] },
    {
      name: "non-square 2x3 kernel, stride 2, 'valid'",
      spec: { inChannels: 2, outChannels: 3, kernelSize: [2, 3], stride: 2, padding: 'valid', bias: true },
      input: [3, 2, 7, 8],
    },
    {
      name: "non-square 3x2 kernel, stride [2, 1], 'same' (TF: odd total padding, extra row at the bottom)",
      spec: { inChannels: 2, outChannels: 2, kernelSize: [3, 2], stride: [2, 1], padding: 'same', bias: true },
      input: [2, 2, 6, 5],
    },
    {
      name: "'same' with stride 2 and 4x4 kernel on an odd input",
      spec: { inChannels: 1, outChannels: 2, kernelSize: 4, stride: 2, padding: 'same', bias: false },
      input: [2, 1, 7, 7],
    },
    {
      name: 'groups 2, explicit [top, bottom, left, right] padding',
      spec: { inChannels: 4, outChannels: 6, kernelSize: [3, 3], groups: 2, padding: [1, 0, 2, 1], bias: true },
      input: [2, 4, 5, 5],
    },
    {
      name: "depthwise (groups = channels), NHWC, tfjs layout, 'same'",
      spec: { inChannels: 3, outChannels: 3, kernelSize: 3, groups: 3, padding: 'same', dataFormat: 'NHWC', layout: 'tfjs', bias: true },
      input: [2, 5, 4, 3],
    },
    {
      name: 'NHWC, tfjs layout, stride 2, groups 2, non-square',
      spec: { inChannels: 4, outChannels: 2, kernelSize: [3, 2], stride: 2, groups: 2, dataFormat: 'NHWC', layout: 'tfjs', bias: true },
      input: [3, 7, 6, 4],
    },
    {
      name: 'NHWC with pytorch layout (patch order (c,i,j)), padding [1, 2]',
      spec: { inChannels: 3, outChannels: 2, kernelSize: 2, padding: [1, 2], dataFormat: 'NHWC', bias: true },
      input: [2, 4, 4, 3],
    },
    {
      name: "kernel larger than the input, 'same' (padding on every side exceeds half the input)",
      spec: { inChannels: 2, outChannels: 2, kernelSize: [5, 4], padding: 'same', bias: true },
      input: [2, 2, 3, 2],
    },
    {
      name: "stride 3 > kernel 1, 'valid' (rows and columns skipped)",
      spec: { inChannels: 2, outChannels: 3, kernelSize: 1, stride: 3, bias: true },
      input: [2, 2, 8, 7],
    },
    {
      name: 'NHWC with more than one 64-channel block (70 channels), 1x1',
      spec: { inChannels: 70, outChannels: 3, kernelSize: 1, dataFormat: 'NHWC', bias: true },
      input: [2, 3, 3, 70],
    },
  ];
  for (const c of cases) {
    test(`${c.name}: factors (direct) and 3 steps`, () => {
      const rng = new Rng(100 + cases.indexOf(c));
      const specs: LayerSpec[] = [conv(rng, c.spec)];
      runAgainstReference({ specs, options: { lr: 1e-3, ...DIRECT }, inputShapes: [c.input], steps: 3, seed: 200 }).opt.dispose();
    });
  }

  test('default EMA (gamma 0.8), AdaFisher with L2, conv + linear, 4 steps', () => {
    const rng = new Rng(300);
    const specs: LayerSpec[] = [
      conv(rng, { inChannels: 3, outChannels: 4, kernelSize: 3, stride: 2, padding: 'same', bias: true }),
      linear(rng, 16, 2, true),
    ];
    runAgainstReference({ specs, options: { lr: 1e-3, weightDecay: 5e-4 }, inputShapes: [[2, 3, 8, 8], [2, 16]], steps: 4, seed: 301 }).opt.dispose();
  });
});

describe('batchnorm and layernorm', () => {
  const C = 4;
  const bn = (rng: Rng, dataFormat?: 'NCHW' | 'NHWC', bias = true): LayerSpec => ({
    kind: 'batchnorm',
    channels: C,
    weight: rng.array(C, 0.5),
    bias: bias ? rng.array(C, 0.5) : null,
    dataFormat,
  });
  const ln = (rng: Rng, D: number): LayerSpec => ({ kind: 'layernorm', features: D, weight: rng.array(D, 0.5), bias: rng.array(D, 0.5) });
  const cases: { name: string; make: (rng: Rng) => LayerSpec; input: number[] }[] = [
    { name: 'batchnorm NCHW', make: (r) => bn(r, 'NCHW'), input: [3, C, 3, 2] },
    { name: 'batchnorm NHWC', make: (r) => bn(r, 'NHWC'), input: [3, 3, 2, C] },
    { name: 'batchnorm rank 2 [N, C]', make: (r) => bn(r), input: [5, C] },
    { name: 'batchnorm without bias', make: (r) => bn(r, 'NCHW', false), input: [2, C, 2, 2] },
    { name: 'layernorm rank 2', make: (r) => ln(r, 6), input: [4, 6] },
    { name: 'layernorm rank 3', make: (r) => ln(r, 5), input: [2, 3, 5] },
    { name: 'layernorm rank 4', make: (r) => ln(r, 3), input: [2, 4, 2, 3] },
  ];
  for (const c of cases) {
    test(`${c.name}: 3 steps, direct factors`, () => {
      const rng = new Rng(400 + cases.indexOf(c));
      runAgainstReference({ specs: [c.make(rng)], options: { lr: 1e-3, ...DIRECT }, inputShapes: [c.input], steps: 3, seed: 401 }).opt.dispose();
    });
  }

  test('batchnorm + layernorm in one model, AdaFisherW, default EMA', () => {
    const rng = new Rng(450);
    runAgainstReference({
      specs: [bn(rng, 'NHWC'), ln(rng, 6), linear(rng, 6, 2, true)],
      options: { lr: 1e-3, decoupled: true, weightDecay: 1e-2 },
      inputShapes: [[2, 3, 3, C], [2, 3, 6], [2, 3, 6]],
      steps: 4,
      seed: 451,
    }).opt.dispose();
  });
});

describe('factor scale (not only shape) is checked', () => {
  // Min-max normalization hides a constant factor on a factor, except through the 1e-6
  // epsilon and the bias entry. With statistics ~1e-3 the fresh factors' range is ~1e-6,
  // so the epsilon is comparable to the range and a wrong divisor (e.g. N instead of
  // N·OH·OW) changes the normalized value.
  const small = { input: 1e-3, grad: 1e-3 };
  test('linear without bias, conv without bias, layernorm', () => {
    const rng = new Rng(500);
    runAgainstReference({
      specs: [
        linear(rng, 5, 4, false),
        conv(rng, { inChannels: 2, outChannels: 3, kernelSize: 2, stride: 2, padding: 'same', bias: false }),
        { kind: 'layernorm', features: 4, weight: rng.array(4), bias: rng.array(4) },
      ],
      options: { ...DIRECT },
      inputShapes: [[3, 5], [2, 2, 5, 5], [2, 3, 4]],
      steps: 2,
      seed: 501,
      statScale: small,
      // Normalized values are ~x/(range + 1e-6) with x ~1e-6: still well-conditioned, but
      // give an absolute 1e-5 on values in [0, 1].
      tolerances: {
        params: { rtol: 1e-5, atol: 1e-6 },
        momenta: { rtol: 1e-5, atolScale: 1e-6 },
        factors: { rtol: 1e-5, atol: 1e-5 },
      },
    }).opt.dispose();
  });

  test('the reference itself is scale-sensitive here (guards the test above)', () => {
    const rng = new Rng(502);
    const a = rng.array(3 * 5, 1e-3);
    const h = linearH(a, [3, 5], 5, false);
    const wrong = normalizeFactor(h.map((v) => v * 3));
    const right = normalizeFactor(h);
    expect(Math.max(...right.map((v, i) => Math.abs(v - wrong[i])))).toBeGreaterThan(1e-2);
  });
});

describe('layouts and data formats give the same results', () => {
  function stepOnce(specs: LayerSpec[], stats: (LayerStats | undefined)[], grads: Float32Array[], options = {}) {
    const opt = new AdaFisher(specs, { lr: 1e-2, ...options });
    try {
      for (let t = 0; t < 3; t++) {
        recordStats(opt, stats);
        opt.step(grads);
      }
      return opt.exportState();
    } finally {
      opt.dispose();
    }
  }

  // NHWC <-> NCHW of a [N, C, H, W] array.
  function toNHWC(x: Float32Array, [N, C, H, W]: number[]): Float32Array {
    const out = new Float32Array(x.length);
    for (let n = 0; n < N; n++)
      for (let c = 0; c < C; c++)
        for (let y = 0; y < H; y++) for (let w = 0; w < W; w++) out[((n * H + y) * W + w) * C + c] = x[((n * C + c) * H + y) * W + w];
    return out;
  }

  // The summation order differs between the two formats (double accumulation, rounded
  // once to float32), so the factors may differ in the last bit: 1e-6 relative.
  const SAME = { rtol: 1e-6, atol: 1e-7 };

  test('conv2d: NCHW and NHWC inputs give the same factors and update (same layout)', () => {
    for (const layout of ['pytorch', 'tfjs'] as const) {
      const rng = new Rng(600);
      const base = conv(rng, { inChannels: 4, outChannels: 4, kernelSize: [3, 2], stride: 2, padding: 'same', groups: 2, layout, bias: true });
      const x = rng.array(2 * 4 * 7 * 6);
      const g = rng.array(2 * 4 * 4 * 3);
      const grads = [rng.array(base.weight.length as number), rng.array(4)];
      const nchw: LayerSpec = { ...base, weight: (base.weight as Float32Array).slice(), bias: (base.bias as Float32Array).slice(), dataFormat: 'NCHW' };
      const nhwc: LayerSpec = { ...base, weight: (base.weight as Float32Array).slice(), bias: (base.bias as Float32Array).slice(), dataFormat: 'NHWC' };
      const a = stepOnce([nchw], [{ input: x, inputShape: [2, 4, 7, 6], grad: g, gradShape: [2, 4, 4, 3] }], grads);
      const b = stepOnce([nhwc], [{ input: toNHWC(x, [2, 4, 7, 6]), inputShape: [2, 7, 6, 4], grad: toNHWC(g, [2, 4, 4, 3]), gradShape: [2, 4, 3, 4] }], grads);
      assertClose(b.factors[0].H, a.factors[0].H, SAME, `${layout}: H`);
      assertClose(b.factors[0].S, a.factors[0].S, SAME, `${layout}: S`);
      assertClose(hostCopy(nhwc.weight), hostCopy(nchw.weight), SAME, `${layout}: weight`);
    }
  });

  test('batchnorm: NCHW and NHWC give the same factors', () => {
    const rng = new Rng(601);
    const x = rng.array(3 * 4 * 2 * 5);
    const g = rng.array(3 * 4 * 2 * 5);
    const w = rng.array(4);
    const b = rng.array(4);
    const grads = [rng.array(4), rng.array(4)];
    const spec = (dataFormat: 'NCHW' | 'NHWC'): LayerSpec => ({ kind: 'batchnorm', channels: 4, weight: w.slice(), bias: b.slice(), dataFormat });
    const s1 = stepOnce([spec('NCHW')], [{ input: x, inputShape: [3, 4, 2, 5], grad: g, gradShape: [3, 4, 2, 5] }], grads);
    const s2 = stepOnce(
      [spec('NHWC')],
      [{ input: toNHWC(x, [3, 4, 2, 5]), inputShape: [3, 2, 5, 4], grad: toNHWC(g, [3, 4, 2, 5]), gradShape: [3, 2, 5, 4] }],
      grads,
    );
    assertClose(s2.factors[0].H, s1.factors[0].H, SAME, 'H');
    assertClose(s2.factors[0].S, s1.factors[0].S, SAME, 'S');
  });

  // PyTorch [out, K] vs TF.js [K, out] weights: transpose weight and gradient between them.
  function transpose(x: Float32Array, rows: number, cols: number): Float32Array {
    const out = new Float32Array(x.length);
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = x[r * cols + c];
    return out;
  }

  test('linear: pytorch [out, in] and tfjs [in, out] weights give the same update (AdaFisher and AdaFisherW)', () => {
    for (const decoupled of [false, true]) {
      const rng = new Rng(602);
      const [inF, outF] = [7, 5];
      const w = rng.array(inF * outF);
      const bias = rng.array(outF);
      const pt: LayerSpec = { kind: 'linear', inFeatures: inF, outFeatures: outF, weight: w.slice(), bias: bias.slice() };
      const tf: LayerSpec = { kind: 'linear', inFeatures: inF, outFeatures: outF, weight: transpose(w, outF, inF), bias: bias.slice(), layout: 'tfjs' };
      const stats = randomStats(rng, [pt], [[2, 3, inF]]);
      const gw = rng.array(inF * outF);
      const gb = rng.array(outF);
      const options = { decoupled, weightDecay: 1e-2 };
      const a = stepOnce([pt], stats, [gw, gb], options);
      const b = stepOnce([tf], stats, [transpose(gw, outF, inF), gb], options);
      assertClose(transpose(hostCopy(tf.weight), inF, outF), hostCopy(pt.weight), SAME, `decoupled ${decoupled}: weight`);
      assertClose(hostCopy(tf.bias!), hostCopy(pt.bias!), SAME, `decoupled ${decoupled}: bias`);
      assertClose(transpose(b.momenta[0], inF, outF), a.momenta[0], SAME, `decoupled ${decoupled}: momentum`);
      assertClose(b.factors[0].H, a.factors[0].H, SAME, 'H');
      assertClose(b.factors[0].S, a.factors[0].S, SAME, 'S');
      // The update actually moved the weights (the comparison is not vacuous).
      expect(Math.max(...hostCopy(pt.weight).map((v, i) => Math.abs(v - w[i])))).toBeGreaterThan(1e-4);
    }
  });

  test('conv2d: pytorch [out, in/g, kh, kw] + NCHW and tfjs [kh, kw, in/g, out] + NHWC give the same update', () => {
    const rng = new Rng(603);
    const [inC, outC, kh, kw, groups] = [4, 6, 3, 2, 2];
    const cg = inC / groups;
    const w = rng.array(outC * cg * kh * kw);
    const bias = rng.array(outC);
    // pytorch index ((o*cg + c)*kh + i)*kw + j  <->  tfjs index ((i*kw + j)*cg + c)*outC + o
    const toTf = (x: Float32Array) => {
      const out = new Float32Array(x.length);
      for (let o = 0; o < outC; o++)
        for (let c = 0; c < cg; c++)
          for (let i = 0; i < kh; i++) for (let j = 0; j < kw; j++) out[((i * kw + j) * cg + c) * outC + o] = x[((o * cg + c) * kh + i) * kw + j];
      return out;
    };
    const common = { kind: 'conv2d' as const, inChannels: inC, outChannels: outC, kernelSize: [kh, kw] as [number, number], stride: 2, padding: 'same' as const, groups };
    const pt: LayerSpec = { ...common, weight: w.slice(), bias: bias.slice() };
    const tf: LayerSpec = { ...common, weight: toTf(w), bias: bias.slice(), layout: 'tfjs', dataFormat: 'NHWC' };
    const x = rng.array(2 * inC * 5 * 6);
    const g = rng.array(2 * outC * 3 * 3);
    const gw = rng.array(w.length);
    const gb = rng.array(outC);
    const a = stepOnce([pt], [{ input: x, inputShape: [2, inC, 5, 6], grad: g, gradShape: [2, outC, 3, 3] }], [gw, gb]);
    const b = stepOnce(
      [tf],
      [{ input: toNHWC(x, [2, inC, 5, 6]), inputShape: [2, 5, 6, inC], grad: toNHWC(g, [2, outC, 3, 3]), gradShape: [2, 3, 3, outC] }],
      [toTf(gw), gb],
    );
    assertClose(hostCopy(tf.weight), toTf(hostCopy(pt.weight)), SAME, 'weight');
    assertClose(hostCopy(tf.bias!), hostCopy(pt.bias!), SAME, 'bias');
    assertClose(b.momenta[0], toTf(a.momenta[0]), SAME, 'momentum');
    assertClose(b.factors[0].S, a.factors[0].S, SAME, 'S');
    // H is in patch order (c,i,j) for pytorch and (i,j,c) for tfjs; the bias entry stays last.
    const hPt = a.factors[0].H;
    const hTf = new Float32Array(hPt.length);
    for (let c = 0; c < cg; c++) for (let ij = 0; ij < kh * kw; ij++) hTf[ij * cg + c] = hPt[c * kh * kw + ij];
    hTf[hPt.length - 1] = hPt[hPt.length - 1];
    assertClose(b.factors[0].H, hTf, SAME, 'H in (i,j,c) order');
  });
});

describe('more paths against the reference', () => {
  test('reductions larger than one task: linear [70, 1500] (row and column blocks), batchnorm [400, 2, 10, 10], layernorm [300, 3, 40]', () => {
    const rng = new Rng(700);
    runAgainstReference({
      specs: [
        linear(rng, 1500, 3, true),
        { kind: 'batchnorm', channels: 2, weight: rng.array(2), bias: rng.array(2) },
        { kind: 'layernorm', features: 40, weight: rng.array(40), bias: rng.array(40) },
      ],
      options: { lr: 1e-3, ...DIRECT },
      inputShapes: [[70, 1500], [400, 2, 10, 10], [300, 3, 40]],
      steps: 2,
      seed: 701,
    }).opt.dispose();
  });

  test('setFactors (already-reduced H with its bias entry, and S) matches the reference', () => {
    const rng = new Rng(702);
    const specs: LayerSpec[] = [linear(rng, 5, 3, true), linear(rng, 3, 2, false, 'tfjs')];
    const opt = new AdaFisher(specs, { lr: 1e-2, weightDecay: 1e-3 });
    const ref = new ReferenceAdaFisher(specs, { lr: 1e-2, weightDecay: 1e-3 });
    const params = paramsOf(specs);
    for (let t = 0; t < 3; t++) {
      const fresh = [
        { H: rng.array(6).map(Math.abs), S: rng.array(3).map(Math.abs) },
        { H: rng.array(3).map(Math.abs), S: rng.array(2).map(Math.abs) },
      ];
      fresh.forEach((f, i) => opt.setFactors(i, f));
      const grads = params.map((p) => rng.array(p.length));
      expect(opt.step(grads).applied).toBe(true);
      ref.step(fresh, grads);
    }
    const state = opt.exportState();
    params.forEach((p, i) => assertClose(hostCopy(p), ref.params[i], { rtol: 1e-5, atol: 1e-6 }, `params[${i}]`));
    state.factors.forEach((f) => {
      assertClose(f.H, ref.factors[f.layer]!.H, { rtol: 1e-5, atol: 1e-6 }, `H ${f.layer}`);
      assertClose(f.S, ref.factors[f.layer]!.S, { rtol: 1e-5, atol: 1e-6 }, `S ${f.layer}`);
    });
    opt.dispose();
  });

  test('nonFiniteGuard off: +Inf -> 1 and -Inf -> 0 in a fresh factor before min-max normalization', () => {
    const rng = new Rng(703);
    const specs: LayerSpec[] = [linear(rng, 4, 3, true)];
    const opt = new AdaFisher(specs, { lr: 1e-2, nonFiniteGuard: false, ...DIRECT });
    const ref = new ReferenceAdaFisher(specs, { lr: 1e-2, ...DIRECT });
    const fresh = { H: Float32Array.of(0.5, Infinity, 3, -Infinity, 1), S: Float32Array.of(-Infinity, 2, 0.25) };
    opt.setFactors(0, fresh);
    const grads = [rng.array(12), rng.array(3)];
    expect(opt.step(grads).applied).toBe(true);
    ref.step([fresh], grads);
    const f = opt.exportState().factors[0];
    assertClose(f.H, ref.factors[0]!.H, { rtol: 1e-6, atol: 1e-7 }, 'H');
    assertClose(f.S, ref.factors[0]!.S, { rtol: 1e-6, atol: 1e-7 }, 'S');
    // +Inf became 1 (between 0.5 and 3), -Inf became 0 (the new minimum).
    expect(f.H[3]).toBe(0);
    expect(f.H[1]).toBeCloseTo((1 - 0) / (3 + 1e-6), 6);
    assertClose(hostCopy(specs[0].kind === 'linear' ? specs[0].weight : new Float32Array()), ref.params[0], { rtol: 1e-5, atol: 1e-6 }, 'weight');
    opt.dispose();
  });

  test('step(grads, params) with replacement parameter tensors updates (and keeps using) the new ones', () => {
    const rng = new Rng(704);
    const specs: LayerSpec[] = [linear(rng, 3, 2, true), { kind: 'param', param: rng.array(4) }];
    const opt = new AdaFisher(specs, { lr: 1e-2 });
    const ref = new ReferenceAdaFisher(specs, { lr: 1e-2 });
    const old = paramsOf(specs).map((p) => hostCopy(p));
    const moved = paramsOf(specs).map((p) => hostCopy(p));
    for (let t = 0; t < 2; t++) {
      const stats = randomStats(rng, specs, [[2, 3], undefined]);
      recordStats(opt, stats);
      const grads = moved.map((p) => rng.array(p.length));
      opt.step(grads, t === 0 ? moved : undefined);
      ref.step(referenceFactors(specs, stats), grads);
    }
    moved.forEach((p, i) => assertClose(p, ref.params[i], { rtol: 1e-5, atol: 1e-6 }, `replacement params[${i}]`));
    paramsOf(specs).forEach((p, i) => expect(hostCopy(p), `original params[${i}] untouched`).toEqual(old[i]));
    opt.dispose();
  });
});

// NOTE: [conv factor precision] in native/core/cpu_backend.cc: the CPU backend adds a conv's
// squares down a kernel row in float32. At inputs near 1e19 those sums overflow where the
// factor itself (a mean, ~1e38) does not; the plane is then summed in double, as the cuda
// backend always does, so both give the same finite factor.
describe('conv2d near the top of float32', () => {
  test.each(['NCHW', 'NHWC'] as const)(
    '%s: inputs ~1e19 whose row sums of squares overflow float32 give the scaled factors of inputs ~1',
    (dataFormat) => {
      const rng = new Rng(31);
      const u = Float32Array.from({ length: 6 * 3 }, () => 0.5 + 0.5 * rng.uniform());
      const grad = rng.array(5 * 2);
      const run = (scale: number) => {
        const specs: LayerSpec[] = [
          { kind: 'conv2d', inChannels: 1, outChannels: 1, kernelSize: 2, dataFormat, weight: Float32Array.of(0.1, 0.2, 0.3, 0.4) },
        ];
        const opt = new AdaFisher(specs);
        // [1, 1, 6, 3] (NCHW) or [1, 6, 3, 1] (NHWC): one channel, the same memory; every
        // kernel row sums 5 input rows of squares up to 1.44e38.
        opt.recordInput(0, u.map((v) => v * scale), dataFormat === 'NCHW' ? [1, 1, 6, 3] : [1, 6, 3, 1]);
        opt.recordOutputGrad(0, grad, dataFormat === 'NCHW' ? [1, 1, 5, 2] : [1, 5, 2, 1]);
        const result = opt.step([rng.array(4)]);
        const { H } = opt.exportState().factors[0];
        opt.dispose();
        return { result, H };
      };
      const small = run(1);
      const huge = run(1.2e19);
      expect(huge.result).toEqual({ applied: true, refreshed: true });
      expect([...huge.H].every(Number.isFinite)).toBe(true);
      // Min-max normalization removes the scale (up to its 1e-6 epsilon against a range ~0.5).
      assertClose(huge.H, small.H, { rtol: 1e-5, atol: 0 }, 'H at 1.2e19 against H at 1');
      expect(Math.max(...small.H)).toBeGreaterThan(0);
    },
  );
});
