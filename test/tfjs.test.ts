// The TF.js adapter: parity with the core API and a float64 reference, save/load, leaks,
// prediction, layer reporting, the wasm backend, the optimizer's life cycle and errors, and
// loading the compiled adapter with require() and import.
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';

import { AdaFisher, backendInfo, type LayerSpec } from '../lib/index.js';
import { adaFisher, AdaFisherOptimizer } from '../lib/tfjs/index.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const LR = 1e-3;
const BETA = 0.9;
const DAMPING = 1e-3;
const DECAY = 0.08;
const MIX = 0.008;

beforeAll(async () => {
  await tf.setBackend('cpu');
});

// ---------- helpers ----------

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}

function seedWeights(model: tf.LayersModel, seed: number): void {
  const r = rng(seed);
  model.setWeights(model.getWeights().map((w) => tf.tensor(Float32Array.from({ length: w.size }, () => r()), w.shape)));
}

function weightsOf(model: tf.LayersModel): Float32Array[] {
  return model.getWeights().map((w) => Float32Array.from(w.dataSync()));
}

/** Max |a-b| / max |b|; NaN anywhere fails. Reports the first bad index. */
function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, rel: number, what: string): void {
  expect(actual.length, `${what}: length`).toBe(expected.length);
  let scale = 0;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]));
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= rel * scale + 1e-12)) {
      throw new Error(`${what}: index ${i}: ${actual[i]} vs ${expected[i]} (|diff| ${d}, allowed ${rel * scale})`);
    }
  }
}

// ---------- float64 reference of ALGORITHM.md for Dense and Conv2D (TF.js layouts) ----------

interface RefLayer {
  kind: 'linear' | 'conv2d';
  K: number; // weight rows (in, or kh*kw*in)
  out: number;
  R_H: Float64Array;
  R_S: Float64Array;
}

function normalize(x: Float64Array): Float64Array {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of x) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  return x.map((v) => (v - lo) / (hi - lo + 1e-6));
}

function refLinearH(a: Float32Array, M: number, inF: number): Float64Array {
  const H = new Float64Array(inF + 1);
  for (let m = 0; m < M; m++) for (let k = 0; k < inF; k++) H[k] += a[m * inF + k] ** 2;
  for (let k = 0; k < inF; k++) H[k] /= M;
  H[inF] = 1;
  return H;
}

function refS(g: Float32Array, rows: number, out: number): Float64Array {
  const S = new Float64Array(out);
  for (let m = 0; m < rows; m++) for (let o = 0; o < out; o++) S[o] += g[m * out + o] ** 2;
  return S.map((v) => v / rows);
}

interface ConvGeom {
  N: number;
  Hh: number;
  Ww: number;
  C: number;
  kh: number;
  kw: number;
  s: number;
  padding: 'same' | 'valid';
}

function outSize(g: ConvGeom): { OH: number; OW: number; top: number; left: number } {
  if (g.padding === 'valid') return { OH: Math.ceil((g.Hh - g.kh + 1) / g.s), OW: Math.ceil((g.Ww - g.kw + 1) / g.s), top: 0, left: 0 };
  const OH = Math.ceil(g.Hh / g.s);
  const OW = Math.ceil(g.Ww / g.s);
  const ph = Math.max((OH - 1) * g.s + g.kh - g.Hh, 0);
  const pw = Math.max((OW - 1) * g.s + g.kw - g.Ww, 0);
  return { OH, OW, top: Math.floor(ph / 2), left: Math.floor(pw / 2) };
}

/** H in (i, j, c) order, NHWC input, bias entry last. */
function refConvH(a: Float32Array, g: ConvGeom): Float64Array {
  const { OH, OW, top, left } = outSize(g);
  const K = g.kh * g.kw * g.C;
  const H = new Float64Array(K + 1);
  for (let n = 0; n < g.N; n++)
    for (let oh = 0; oh < OH; oh++)
      for (let ow = 0; ow < OW; ow++)
        for (let i = 0; i < g.kh; i++)
          for (let j = 0; j < g.kw; j++) {
            const y = oh * g.s + i - top;
            const x = ow * g.s + j - left;
            if (y < 0 || y >= g.Hh || x < 0 || x >= g.Ww) continue;
            for (let c = 0; c < g.C; c++) H[(i * g.kw + j) * g.C + c] += a[((n * g.Hh + y) * g.Ww + x) * g.C + c] ** 2;
          }
  for (let k = 0; k < K; k++) H[k] /= g.N * OH * OW;
  H[K] = 1;
  return H;
}

/** One reference step for a layer with weight [K, out] (o fastest) and bias [out]. */
function refLayerStep(
  L: RefLayer,
  H: Float64Array,
  S: Float64Array,
  params: Float64Array[],
  grads: Float32Array[],
  moms: Float64Array[],
  t: number,
): void {
  const nh = normalize(H);
  const ns = normalize(S);
  L.R_H = L.R_H.map((r, i) => DECAY * r + MIX * nh[i]);
  L.R_S = L.R_S.map((r, i) => DECAY * r + MIX * ns[i]);
  const bc = 1 - BETA ** t;
  const [w, b] = params;
  for (let k = 0; k < L.K; k++)
    for (let o = 0; o < L.out; o++) {
      const i = k * L.out + o;
      moms[0][i] = BETA * moms[0][i] + (1 - BETA) * grads[0][i];
      w[i] -= ((LR / bc) * moms[0][i]) / (L.R_S[o] * L.R_H[k] + DAMPING);
    }
  for (let o = 0; o < L.out; o++) {
    moms[1][o] = BETA * moms[1][o] + (1 - BETA) * grads[1][o];
    b[o] -= ((LR / bc) * moms[1][o]) / (L.R_S[o] * L.R_H[L.K] + DAMPING);
  }
}

// ---------- the models under test, and their statistics computed independently ----------

interface Stats {
  /** per preconditioned layer: input, its core shape, output gradient, its core shape */
  layers: { a: Float32Array; aShape: number[]; g: Float32Array; gShape: number[] }[];
  /** gradients of every weight, in model.getWeights() order */
  grads: Float32Array[];
}

/**
 * Model: [conv2d (relu) →] flatten → dense(relu) → dense(linear), loss MSE. The statistics are
 * computed here with plain TF.js ops and a test-local customGrad capture, not by the adapter.
 */
function manualStats(weights: Float32Array[], shapes: number[][], x: tf.Tensor, y: tf.Tensor, conv?: { s: number; padding: 'same' | 'valid' }): Stats {
  const captured: Float32Array[] = [];
  const capture = (slot: number) =>
    tf.customGrad(((z: tf.Tensor) => ({
      value: z.clone(),
      gradFunc: (dy: tf.Tensor) => {
        captured[slot] = Float32Array.from(dy.dataSync());
        return dy;
      },
    })) as unknown as Parameters<typeof tf.customGrad>[0]);
  const vars = weights.map((w, i) => tf.variable(tf.tensor(w, shapes[i]), true));
  const inputs: { a: Float32Array; shape: number[] }[] = [];
  const pre: number[][] = [];
  const { grads } = tf.variableGrads(() => {
    let h = x;
    let v = 0;
    let layer = 0;
    if (conv) {
      inputs.push({ a: Float32Array.from(h.dataSync()), shape: h.shape });
      const z = tf.add(tf.conv2d(h as tf.Tensor4D, vars[0] as tf.Tensor4D, conv.s, conv.padding), vars[1]);
      pre.push(z.shape);
      h = tf.relu(capture(layer++)(z));
      h = tf.reshape(h, [h.shape[0], -1]);
      v = 2;
    }
    for (let d = 0; d < 2; d++) {
      inputs.push({ a: Float32Array.from(h.dataSync()), shape: h.shape });
      const z = tf.add(tf.matMul(h as tf.Tensor2D, vars[v] as tf.Tensor2D), vars[v + 1]);
      pre.push(z.shape);
      const zc = capture(layer++)(z);
      h = d === 0 ? tf.relu(zc) : zc;
      v += 2;
    }
    return tf.losses.meanSquaredError(y, h) as tf.Scalar;
  }, vars);
  const out: Stats = {
    layers: inputs.map((inp, i) => ({ a: inp.a, aShape: inp.shape, g: captured[i], gShape: pre[i] })),
    grads: vars.map((v) => Float32Array.from(grads[v.name].dataSync())),
  };
  tf.dispose(grads);
  tf.dispose(vars);
  return out;
}

function buildModel(conv?: { s: number; padding: 'same' | 'valid' }): tf.LayersModel {
  const layers: tf.layers.Layer[] = [];
  if (conv) {
    layers.push(tf.layers.conv2d({ inputShape: [7, 6, 2], filters: 3, kernelSize: 3, strides: conv.s, padding: conv.padding, activation: 'relu' }));
    layers.push(tf.layers.flatten());
    layers.push(tf.layers.dense({ units: 5, activation: 'relu' }));
  } else {
    layers.push(tf.layers.dense({ inputShape: [6], units: 5, activation: 'relu' }));
  }
  layers.push(tf.layers.dense({ units: 3 }));
  const model = tf.sequential({ layers });
  seedWeights(model, conv ? 7 : 3);
  return model;
}

function batch(step: number, conv: boolean): { x: tf.Tensor; y: tf.Tensor } {
  const r = rng(1000 + step);
  const xs = conv ? [4, 7, 6, 2] : [8, 6];
  const n = xs.reduce((a, b) => a * b, 1);
  return {
    x: tf.tensor(Float32Array.from({ length: n }, () => 2 * r()), xs),
    y: tf.tensor(Float32Array.from({ length: xs[0] * 3 }, () => r()), [xs[0], 3]),
  };
}

// ---------- tests ----------

describe.each([
  { name: 'Dense', conv: undefined },
  { name: "Conv2D NHWC 'same' stride 2", conv: { s: 2, padding: 'same' as const } },
  { name: "Conv2D NHWC 'valid' stride 2", conv: { s: 2, padding: 'valid' as const } },
])('fit on a tiny $name model', ({ conv }) => {
  it('matches the core API on the same statistics and a float64 reference, step by step', async () => {
    const model = buildModel(conv);
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const shapes = model.getWeights().map((w) => w.shape);
    const start = weightsOf(model);

    // Core API over host copies, fed the independently computed statistics.
    const coreParams = start.map((w) => w.slice());
    const specs: LayerSpec[] = [];
    let p = 0;
    if (conv) {
      specs.push({ kind: 'conv2d', inChannels: 2, outChannels: 3, kernelSize: 3, stride: conv.s, padding: conv.padding, dataFormat: 'NHWC', layout: 'tfjs', weight: coreParams[0], bias: coreParams[1] });
      p = 2;
    }
    for (; p < coreParams.length; p += 2) {
      const [inF, outF] = shapes[p];
      specs.push({ kind: 'linear', inFeatures: inF, outFeatures: outF, layout: 'tfjs', weight: coreParams[p], bias: coreParams[p + 1] });
    }
    const core = new AdaFisher(specs, { lr: LR, backend: 'cpu' });

    // float64 reference
    const ref64 = start.map((w) => Float64Array.from(w));
    const moms = start.map((w) => new Float64Array(w.length));
    const refLayers: RefLayer[] = specs.map((s) => {
      const K = s.kind === 'conv2d' ? 9 * 2 : (s as { inFeatures: number }).inFeatures;
      const out = s.kind === 'conv2d' ? 3 : (s as { outFeatures: number }).outFeatures;
      return { kind: s.kind as 'linear' | 'conv2d', K, out, R_H: new Float64Array(K + 1).fill(1), R_S: new Float64Array(out).fill(1) };
    });

    for (let step = 1; step <= 5; step++) {
      const { x, y } = batch(step, conv !== undefined);
      const stats = manualStats(coreParams, shapes, x, y, conv);
      stats.layers.forEach((l, i) => {
        const s = specs[i];
        if (s.kind === 'conv2d') {
          core.recordInput(i, l.a, l.aShape);
          core.recordOutputGrad(i, l.g, l.gShape);
        } else {
          core.recordInput(i, l.a, l.aShape);
          core.recordOutputGrad(i, l.g, l.gShape);
        }
      });
      expect(core.step(stats.grads)).toEqual({ applied: true, refreshed: true });

      // float64: statistics from the same captured tensors
      stats.layers.forEach((l, i) => {
        const L = refLayers[i];
        const H =
          L.kind === 'conv2d'
            ? refConvH(l.a, { N: l.aShape[0], Hh: 7, Ww: 6, C: 2, kh: 3, kw: 3, s: conv!.s, padding: conv!.padding })
            : refLinearH(l.a, l.aShape[0], L.K);
        const S = refS(l.g, l.g.length / L.out, L.out);
        refLayerStep(L, H, S, [ref64[2 * i], ref64[2 * i + 1]], [stats.grads[2 * i], stats.grads[2 * i + 1]], [moms[2 * i], moms[2 * i + 1]], step);
      });

      await model.fit(x, y, { batchSize: x.shape[0], epochs: 1, shuffle: false, verbose: 0 });
      tf.dispose([x, y]);
      const got = weightsOf(model);
      got.forEach((w, i) => {
        expectClose(w, coreParams[i], 1e-5, `step ${step} weight ${i} vs core API`);
        expectClose(w, ref64[i], 1e-4, `step ${step} weight ${i} vs float64 reference`);
      });
      // the step actually moved the parameters
      expect(got.some((w, i) => w.some((v, j) => v !== start[i][j]))).toBe(true);
    }
    expect(opt.steps).toBe(5);
    core.dispose();
    opt.dispose();
    model.dispose();
  });
});

describe('gradients and prediction', () => {
  it('leaves predict(), model JSON and the gradients of every variable bit-identical', async () => {
    const tapped = buildModel({ s: 2, padding: 'same' });
    const plain = buildModel({ s: 2, padding: 'same' });
    const json = JSON.stringify(tapped.toJSON(null, false));
    const opt = adaFisher(tapped, { lr: LR });
    tapped.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = batch(1, true);
    // capture the gradients the adapter receives on a refreshing step (taps active)
    let seen: Float32Array[] = [];
    const apply = opt.applyGradients.bind(opt);
    opt.applyGradients = (g) => {
      seen = (g as { name: string; tensor: tf.Tensor }[]).map((e) => Float32Array.from(e.tensor.dataSync()));
      apply(g);
    };
    const vars = (tapped.trainableWeights as unknown as { read(): tf.Variable }[]).map((w) => w.read());
    const plainVars = (plain.trainableWeights as unknown as { read(): tf.Variable }[]).map((w) => w.read());
    const loss = (m: tf.LayersModel) => () => tf.losses.meanSquaredError(y, m.apply(x, { training: true }) as tf.Tensor) as tf.Scalar;
    const expected = tf.variableGrads(loss(plain), plainVars);
    tf.dispose(opt.minimize(loss(tapped), true, vars));
    expect(opt.lastStep?.refreshed).toBe(true);
    plainVars.forEach((v, i) => expect(Array.from(seen[i])).toEqual(Array.from(expected.grads[v.name].dataSync())));
    tf.dispose(expected.grads);
    tf.dispose(expected.value);

    // predict: equal to an untouched model holding the same weights, and records nothing
    plain.setWeights(tapped.getWeights());
    const stepsBefore = opt.steps;
    const a = tapped.predict(x) as tf.Tensor;
    const b = plain.predict(x) as tf.Tensor;
    expect(Array.from(a.dataSync())).toEqual(Array.from(b.dataSync()));
    tf.dispose(tapped.evaluate(x, y) as tf.Scalar);
    expect(opt.steps).toBe(stepsBefore);
    expect(JSON.stringify(tapped.toJSON(null, false))).toBe(json);
    tf.dispose([a, b, x, y]);
    opt.dispose();
    // taps removed: the layer instances have no own `call` any more
    expect(tapped.layers.every((l) => !Object.prototype.hasOwnProperty.call(l, 'call'))).toBe(true);
    tapped.dispose();
    plain.dispose();
  });

  it('never changes tensors or arrays that share the variables\' data (setWeights, clones, dataSync snapshots)', async () => {
    const a = buildModel();
    const b = buildModel();
    b.setWeights(a.getWeights()); // TF.js now keeps a's and b's variables on the same arrays
    const snapshot = a.getWeights().map((w) => w.clone()); // clones share the data too
    const before = weightsOf(b);
    // A "best weights" snapshot as programs take it: the arrays dataSync() returns (on the cpu
    // backend, the variables' live backing arrays) and tensors made from them without a copy.
    const arrays = a.getWeights().map((w) => w.dataSync() as Float32Array);
    const fromArrays = arrays.map((d, i) => tf.tensor(d, a.getWeights()[i].shape));
    a.compile({ optimizer: adaFisher(a, { lr: LR }), loss: 'meanSquaredError' });
    const { x, y } = batch(3, false);
    await a.fit(x, y, { batchSize: 8, epochs: 1, verbose: 0 });
    weightsOf(b).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    snapshot.forEach((w, i) => expect(Array.from(w.dataSync())).toEqual(Array.from(before[i])));
    arrays.forEach((d, i) => expect(Array.from(d)).toEqual(Array.from(before[i])));
    fromArrays.forEach((t, i) => expect(Array.from(t.dataSync())).toEqual(Array.from(before[i])));
    expect(weightsOf(a).some((w, i) => w.some((v, j) => v !== before[i][j]))).toBe(true);
    tf.dispose([x, y, ...snapshot, ...fromArrays]);
    a.optimizer.dispose();
  });

  it('keeps tf.memory().numTensors flat over many fit / trainOnBatch / fitDataset steps', async () => {
    const model = buildModel({ s: 2, padding: 'valid' });
    model.compile({ optimizer: adaFisher(model, { lr: LR }), loss: 'meanSquaredError' });
    const { x, y } = batch(2, true);
    const ds = tf.data.zip({ xs: tf.data.array(x.unstack()), ys: tf.data.array(y.unstack()) }).batch(2);
    await model.fit(x, y, { batchSize: 2, epochs: 1, verbose: 0 });
    const before = tf.memory().numTensors;
    await model.fit(x, y, { batchSize: 2, epochs: 10, verbose: 0 });
    for (let i = 0; i < 10; i++) await model.trainOnBatch(x, y);
    await model.fitDataset(ds as tf.data.Dataset<{ xs: tf.Tensor; ys: tf.Tensor }>, { epochs: 3, verbose: 0 });
    expect(tf.memory().numTensors).toBe(before);
    expect((model.optimizer as AdaFisherOptimizer).steps).toBe(2 + 20 + 10 + 6);
    tf.dispose([x, y]);
    model.optimizer.dispose();
    model.dispose();
  });
});

describe('save and load', () => {
  it('save → load → re-attach → continue equals an uninterrupted run', async () => {
    const model = buildModel({ s: 2, padding: 'same' });
    model.compile({ optimizer: adaFisher(model, { lr: LR, tcov: 2 }), loss: 'meanSquaredError' });
    for (let s = 1; s <= 3; s++) {
      const { x, y } = batch(s, true);
      await model.fit(x, y, { batchSize: 4, epochs: 1, verbose: 0, shuffle: false });
      tf.dispose([x, y]);
    }
    let artifacts: tf.io.ModelArtifacts | undefined;
    await model.save(
      tf.io.withSaveHandler(async (a) => {
        artifacts = a;
        return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
      }),
      { includeOptimizer: true },
    );
    const loaded = await tf.loadLayersModel(tf.io.fromMemory(artifacts!));
    const lopt = loaded.optimizer as AdaFisherOptimizer;
    expect(lopt).toBeInstanceOf(AdaFisherOptimizer);
    expect(lopt.hyperparameters.tcov).toBe(2);
    // before attach() it hands back what it restored
    const restored = await lopt.getWeights();
    expect(restored.map((w) => w.name)).toEqual(artifacts!.weightSpecs!.filter((s) => s.group === 'optimizer').map((s) => s.name));
    expect(restored.find((w) => w.name === 'iter')!.tensor.shape).toEqual([]);
    expect(restored.find((w) => w.name === 'iter')!.tensor.dataSync()[0]).toBe(3);
    // and counts its steps from the restored ones already (as TF.js's own optimizers do)
    expect(lopt.steps).toBe(3);
    expect(lopt.iterations).toBe(3);
    const { x, y } = batch(9, true);
    await expect(loaded.fit(x, y, { epochs: 1, verbose: 0 })).rejects.toThrow(/not attached to a model.*attach\(model\)/);
    lopt.attach(loaded);
    for (let s = 4; s <= 7; s++) {
      const b = batch(s, true);
      await model.fit(b.x, b.y, { batchSize: 4, epochs: 1, verbose: 0, shuffle: false });
      await loaded.fit(b.x, b.y, { batchSize: 4, epochs: 1, verbose: 0, shuffle: false });
      tf.dispose([b.x, b.y]);
    }
    const a = weightsOf(model);
    const b = weightsOf(loaded);
    a.forEach((w, i) => expect(Array.from(b[i])).toEqual(Array.from(w)));
    expect(lopt.steps).toBe(7);
    const sa = await (model.optimizer as AdaFisherOptimizer).getWeights();
    const sb = await lopt.getWeights();
    expect(sb.map((w) => w.name)).toEqual(sa.map((w) => w.name));
    sa.forEach((w, i) => expect(Array.from(sb[i].tensor.dataSync())).toEqual(Array.from(w.tensor.dataSync())));
    tf.dispose([x, y]);
    model.optimizer.dispose();
    lopt.dispose();
    model.dispose();
    loaded.dispose();
  });

  it('two saves with the optimizer at once both succeed; a step makes getWeights() hand out new tensors and free the old', async () => {
    const model = buildModel();
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    await model.fit(x, y, { batchSize: 4, epochs: 1, verbose: 0 });
    const saved: tf.io.ModelArtifacts[] = [];
    const handler = tf.io.withSaveHandler(async (a) => {
      saved.push(a);
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
    });
    // A checkpoint and an upload of it at the same moment: TF.js awaits getWeights() and then
    // encodes; before, the second call disposed the first one's tensors ("Tensor is disposed").
    await Promise.all([model.save(handler, { includeOptimizer: true }), model.save(handler, { includeOptimizer: true })]);
    expect(saved).toHaveLength(2);
    expect(new Uint8Array(saved[1].weightData as ArrayBuffer)).toEqual(new Uint8Array(saved[0].weightData as ArrayBuffer));
    const first = await opt.getWeights();
    const again = await opt.getWeights();
    expect(again).not.toBe(first); // a list of its own for each caller...
    again.forEach((w, i) => expect(w.tensor).toBe(first[i].tensor)); // ...of the same tensors while the state is unchanged
    again.pop(); // editing it hides nothing from the optimizer
    expect(await opt.getWeights()).toHaveLength(first.length);
    const steps = first.find((w) => w.name === 'iter')!.tensor.dataSync()[0];
    const n = tf.memory().numTensors;
    await model.fit(x, y, { batchSize: 4, epochs: 1, verbose: 0 });
    const second = await opt.getWeights();
    expect(second).not.toBe(first);
    expect(first.every((w) => w.tensor.isDisposed)).toBe(true);
    expect(tf.memory().numTensors).toBe(n);
    expect(second.find((w) => w.name === 'iter')!.tensor.dataSync()[0]).toBe(2 * steps);
    // Tensors a caller disposed are not handed out again.
    tf.dispose(second.map((w) => w.tensor));
    const third = await opt.getWeights();
    expect(third.every((w) => !w.tensor.isDisposed)).toBe(true);
    tf.dispose([x, y]);
    opt.dispose();
    model.dispose();
  });

  it('refuses optimizer weights that do not fit the model, naming the weight', async () => {
    const model = buildModel();
    const opt = adaFisher(model);
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    await opt.setWeights([{ name: 'iter', tensor: tf.scalar(3, 'int32') }]);
    const { x, y } = batch(1, false);
    await expect(model.fit(x, y, { epochs: 1, verbose: 0 })).rejects.toThrow(/Cannot restore the AdaFisher optimizer weights into this model: no saved weight 'adafisher\/step_counts'/);
    tf.dispose([x, y]);
  });
});

describe('layer coverage', () => {
  it('reports preconditioned and fallback layers in functional, nested and shared-layer models', async () => {
    const inner = tf.sequential({
      name: 'inner',
      layers: [tf.layers.dense({ inputShape: [4], units: 4, name: 'inner_dense' }), tf.layers.layerNormalization({ name: 'ln' })],
    });
    const shared = tf.layers.dense({ units: 4, activation: 'tanh', name: 'shared' });
    const in1 = tf.input({ shape: [4] });
    const in2 = tf.input({ shape: [4] });
    const h = tf.layers.concatenate().apply([shared.apply(in1) as tf.SymbolicTensor, shared.apply(in2) as tf.SymbolicTensor]) as tf.SymbolicTensor;
    const bn = tf.layers.batchNormalization({ name: 'bn' }).apply(h) as tf.SymbolicTensor;
    const pre = tf.layers.prelu({ name: 'prelu' }).apply(bn) as tf.SymbolicTensor;
    const emb = tf.layers.dense({ units: 4, name: 'to_inner' }).apply(pre) as tf.SymbolicTensor;
    const out = tf.layers.dense({ units: 2, name: 'out' }).apply(inner.apply(emb) as tf.SymbolicTensor) as tf.SymbolicTensor;
    const model = tf.model({ inputs: [in1, in2], outputs: out });
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const report = opt.layerReport();
    const by = Object.fromEntries(report.map((r) => [r.name, r]));
    expect(Object.keys(by).sort()).toEqual(['bn', 'inner_dense', 'ln', 'out', 'prelu', 'shared', 'to_inner']);
    expect(by.shared).toMatchObject({ preconditioned: true, kind: 'linear' });
    expect(by.bn).toMatchObject({ preconditioned: true, kind: 'batchnorm' });
    expect(by.ln).toMatchObject({ preconditioned: true, kind: 'layernorm' });
    expect(by.inner_dense).toMatchObject({ preconditioned: true, kind: 'linear' });
    expect(by.prelu.preconditioned).toBe(false);
    expect(by.prelu.reason).toMatch(/PReLU is not one of Dense, Conv2D/);

    // The shared layer's H is the mean square over both uses (one batch of 2N rows).
    const r = rng(5);
    const x1 = tf.tensor(Float32Array.from({ length: 24 }, () => r()), [6, 4]);
    const x2 = tf.tensor(Float32Array.from({ length: 24 }, () => 3 * r()), [6, 4]);
    const y = tf.zeros([6, 2]);
    const n0 = tf.memory().numTensors;
    await model.fit([x1, x2], y, { batchSize: 6, epochs: 1, verbose: 0 });
    expect(tf.memory().numTensors).toBe(n0);
    const w = await opt.getWeights();
    const H = w.find((e) => e.name === 'shared/adafisher_H')!.tensor.dataSync();
    const both = new Float32Array(48);
    both.set(x1.dataSync());
    both.set(x2.dataSync(), 24);
    const expectedH = normalize(refLinearH(both, 12, 4)).map((v) => DECAY + MIX * v);
    expectClose(H, expectedH, 1e-5, 'shared layer running H');
    tf.dispose([x1, x2, y]);
    opt.dispose();
  });

  it('preconditions a LayerNormalization used more than once (siamese, and again in a second model), over both uses', async () => {
    // A shared layer has one inbound node per use and TF.js's layer.input throws; its rank
    // comes from the uses. Before, the shared LayerNormalization fell back to momentum with
    // "only the last axis is preconditioned" (TF.js's build() stores axis -1 as [rank - 1]).
    const D = 5;
    const N = 4;
    const ln = tf.layers.layerNormalization({ name: 'shared_ln' });
    const in1 = tf.input({ shape: [D] });
    const in2 = tf.input({ shape: [D] });
    const model = tf.model({ inputs: [in1, in2], outputs: [ln.apply(in1) as tf.SymbolicTensor, ln.apply(in2) as tf.SymbolicTensor] });
    const z = tf.input({ shape: [D] });
    const alone = tf.model({ inputs: z, outputs: ln.apply(z) as tf.SymbolicTensor }); // a third use, in another model
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    expect(opt.layerReport().find((r) => r.name === 'shared_ln')).toMatchObject({ preconditioned: true, kind: 'layernorm' });

    const r = rng(9);
    const x1 = tf.tensor(Float32Array.from({ length: N * D }, () => r() - 0.3), [N, D]);
    const x2 = tf.tensor(Float32Array.from({ length: N * D }, () => 2 * r() + 0.1), [N, D]);
    const zero = tf.zeros([N, D]);
    // The loss is the sum of both outputs' mean squares: the output gradient of each use is
    // 2 * out / (N * D), and S[d] = (sum over both uses' 2N rows of g[., d])^2 / 2N.
    const outs = (alone.predict(tf.concat([x1, x2])) as tf.Tensor).dataSync();
    await model.fit([x1, x2], [zero, zero], { batchSize: N, epochs: 1, verbose: 0 });
    const S = new Float64Array(D);
    for (let m = 0; m < 2 * N; m++) for (let d = 0; d < D; d++) S[d] += (2 * outs[m * D + d]) / (N * D);
    const expectedS = normalize(S.map((v) => (v * v) / (2 * N))).map((v) => DECAY + MIX * v);
    const w = await opt.getWeights();
    expectClose(w.find((e) => e.name === 'shared_ln/adafisher_S')!.tensor.dataSync(), expectedS, 1e-4, 'shared LayerNormalization running S');
    tf.dispose([x1, x2, zero]);
    opt.dispose();
  });

  it('says clearly when TF.js cannot train a layer (dilated Conv2D)', async () => {
    const model = tf.sequential({
      layers: [tf.layers.conv2d({ inputShape: [6, 6, 1], filters: 2, kernelSize: 3, dilationRate: 2, name: 'dil' }), tf.layers.flatten(), tf.layers.dense({ units: 1 })],
    });
    const opt = adaFisher(model);
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    expect(opt.layerReport().find((r) => r.name === 'dil')).toMatchObject({ preconditioned: false, reason: expect.stringMatching(/dilated.*cannot compute its gradients/) });
    const x = tf.ones([2, 6, 6, 1]);
    const y = tf.ones([2, 1]);
    await expect(model.fit(x, y, { epochs: 1, verbose: 0 })).rejects.toThrow(/Conv2D layer 'dil' has dilationRate \[2,2\].*cannot compute gradients of dilated convolutions/);
    tf.dispose([x, y]);
  });

  // TF.js 4.22's own training pass fails for these normalization layers (tf.train.adam too);
  // the adapter says which layer and why instead of passing on "Cannot read properties of
  // undefined", and layerReport() does not promise them training.
  it.each([
    ['BatchNormalization', 'scale: false', [6], () => tf.layers.batchNormalization({ scale: false, name: 'norm' })],
    ['BatchNormalization', 'center: false', [6], () => tf.layers.batchNormalization({ center: false, name: 'norm' })],
    ['BatchNormalization', 'axis 1 of a rank-4 input', [3, 6, 6], () => tf.layers.batchNormalization({ axis: 1, name: 'norm' })],
    ['LayerNormalization', 'scale: false', [6], () => tf.layers.layerNormalization({ scale: false, name: 'norm' })],
    ['LayerNormalization', 'center: false', [6], () => tf.layers.layerNormalization({ center: false, name: 'norm' })],
  ] as const)('says which layer TF.js cannot train: %s with %s', async (cls, why, shape, make) => {
    const build = () =>
      tf.sequential({
        layers: [tf.layers.inputLayer({ inputShape: [...shape] }), make(), ...(shape.length > 1 ? [tf.layers.flatten()] : []), tf.layers.dense({ units: 2 })],
      });
    const x = tf.ones([4, ...shape]);
    const y = tf.ones([4, 2]);
    // TF.js itself, with its own Adam:
    const plain = build();
    plain.compile({ optimizer: tf.train.adam(), loss: 'meanSquaredError' });
    const tfjsError = await plain.fit(x, y, { epochs: 1, verbose: 0 }).then(() => null, (e: Error) => e);
    expect(tfjsError, 'TF.js trains this layer now: drop the check').not.toBeNull();
    const model = build();
    const opt = adaFisher(model);
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    expect(opt.layerReport().find((r) => r.name === 'norm')).toMatchObject({
      preconditioned: false,
      reason: `${cls} with ${why}: TF.js cannot train it (its training pass fails)`,
    });
    const e = (await model.fit(x, y, { epochs: 1, verbose: 0 }).then(() => null, (err: Error) => err)) as (Error & { code?: string; cause?: Error }) | null;
    expect(e?.code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    expect(e?.message).toContain(`The model has ${cls} layer 'norm' (${why}): TF.js`);
    expect(e?.message).toContain('fit with tf.train.adam fails the same way');
    expect(e?.cause?.message).toBe(tfjsError?.message);
    tf.dispose([x, y]);
    opt.dispose();
  });

  it('rejects bad options and non-models with clear errors', () => {
    const model = buildModel();
    expect(() => adaFisher(model, { lr: -1 })).toThrow(RangeError);
    expect(() => adaFisher(model, { lr: -1 })).toThrow(/options\.lr/);
    expect(() => adaFisher({} as tf.LayersModel)).toThrow(/Expected a tf.LayersModel/);
    expect(() => adaFisher(model).applyGradients([])).toThrow(/before any minimize/);
  });
});

describe('wasm backend', () => {
  it('trains a Dense model like the cpu backend, without leaks, and refuses Conv2D training clearly', async () => {
    // Registers the backend; in Node its .wasm binaries load from the package in node_modules
    // (no setWasmPaths, no network).
    await import('@tensorflow/tfjs-backend-wasm');
    const run = async (backend: string) => {
      await tf.setBackend(backend);
      expect(tf.getBackend()).toBe(backend);
      const model = buildModel();
      model.compile({ optimizer: adaFisher(model, { lr: LR }), loss: 'meanSquaredError' });
      let n0 = 0;
      for (let s = 1; s <= 6; s++) {
        const { x, y } = batch(s, false);
        await model.fit(x, y, { batchSize: 8, epochs: 1, verbose: 0, shuffle: false });
        tf.dispose([x, y]);
        if (s === 1) n0 = tf.memory().numTensors;
      }
      expect(tf.memory().numTensors).toBe(n0);
      const w = weightsOf(model);
      model.optimizer.dispose();
      model.dispose();
      return w;
    };
    const onWasm = await run('wasm');
    const onCpu = await run('cpu');
    onWasm.forEach((w, i) => expectClose(w, onCpu[i], 1e-4, `wasm vs cpu weight ${i}`));

    await tf.setBackend('wasm');
    const conv = buildModel({ s: 1, padding: 'same' });
    conv.compile({ optimizer: adaFisher(conv), loss: 'meanSquaredError' });
    const { x, y } = batch(1, true);
    await expect(conv.fit(x, y, { epochs: 1, verbose: 0 })).rejects.toMatchObject({
      code: 'ADAFISHER_UNSUPPORTED_LAYER',
      message: expect.stringMatching(/cannot be trained on the TF.js 'wasm' backend.*Conv2DBackpropFilter/),
    });
    tf.dispose([x, y]);
    await tf.setBackend('cpu');
  });
});

// ---------- optimizers, models and their life cycle ----------

describe('two optimizers on one model (recompiling after unfreezing a layer)', () => {
  it.each(['old first', 'new first'])('disposing them in either order (%s) keeps the live one working and ends with no taps', async (order) => {
    const model = buildModel();
    model.layers[0].trainable = false;
    const o1 = adaFisher(model, { lr: LR });
    model.compile({ optimizer: o1, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    model.layers[0].trainable = true;
    const o2 = adaFisher(model, { lr: LR });
    model.compile({ optimizer: o2, loss: 'meanSquaredError' });
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    const [first, second] = order === 'old first' ? [o1, o2] : [o2, o1];
    first.dispose();
    if (first === o1) {
      await model.fit(x, y, { epochs: 1, verbose: 0 });
      expect(o2.steps).toBe(2);
      expect(o2.lastStep).toEqual({ applied: true, refreshed: true });
    }
    second.dispose();
    expect(model.layers.every((l) => !Object.prototype.hasOwnProperty.call(l, 'call'))).toBe(true);
    // a third optimizer still gets its statistics
    const o3 = adaFisher(model, { lr: LR });
    model.compile({ optimizer: o3, loss: 'meanSquaredError' });
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    expect(o3.lastStep).toEqual({ applied: true, refreshed: true });
    o3.dispose();
    tf.dispose([x, y]);
  });
});


/** The error a call throws or rejects with (fails the test when it succeeds). */
async function errorOf(f: () => unknown): Promise<Error & { code?: string }> {
  try {
    await f();
  } catch (e) {
    return e as Error & { code?: string };
  }
  throw new Error('expected an error, but the call succeeded');
}

describe('errors and options', () => {
  it("optimizer.backend: 'cpu' by default (TF.js tensors live in host memory), else what was asked for", () => {
    const saved = process.env.ADAFISHER_BACKEND;
    delete process.env.ADAFISHER_BACKEND;
    try {
      const model = buildModel();
      const a = adaFisher(model);
      expect(a.backend).toBe('cpu');
      process.env.ADAFISHER_BACKEND = 'cpu';
      const b = new AdaFisherOptimizer({ backend: 'cpu' });
      expect(b.backend).toBe('cpu');
      const cuda = new AdaFisherOptimizer({ backend: 'cuda' });
      let got: unknown;
      try {
        got = cuda.backend;
      } catch (e) {
        got = (e as { code?: string }).code;
      }
      expect(got).toBe(backendInfo('auto').cuda.usable ? 'cuda' : 'ADAFISHER_BACKEND_UNAVAILABLE');
      for (const o of [a, b, cuda]) o.dispose();
      model.dispose();
    } finally {
      if (saved === undefined) delete process.env.ADAFISHER_BACKEND;
      else process.env.ADAFISHER_BACKEND = saved;
    }
  });

  it('gives every error it raises on purpose a stable code', async () => {
    const model = buildModel();
    const bad = await errorOf(() => adaFisher({} as tf.LayersModel));
    expect(bad).toBeInstanceOf(TypeError);
    expect(bad.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(bad.message).toMatch(/Expected a tf.LayersModel .* for model but received an object \(Object\)/);

    const opt = adaFisher(model, { lr: LR });
    const other = buildModel();
    const twice = await errorOf(() => opt.attach(other));
    expect(twice.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(twice.message).toMatch(/already attached to model/);
    const detached = await errorOf(() => new AdaFisherOptimizer().layerReport());
    expect(detached.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(detached.message).toMatch(/not attached to a model/);
    const notWeights = await errorOf(() => opt.setWeights([{ name: 'iter' }] as unknown as []));
    expect(notWeights).toBeInstanceOf(TypeError);
    expect(notWeights.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(notWeights.message).toMatch(/Expected \{ name: string, tensor: tf.Tensor \} for weights\[0\]/);

    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    const g = tf.zeros([3]);
    const unknown = await errorOf(() => opt.applyGradients([{ name: 'not_a_variable', tensor: g }]));
    expect(unknown.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(unknown.message).toMatch(/variable 'not_a_variable' is not a weight of model .*pass varList/);

    const dil = tf.sequential({
      layers: [tf.layers.conv2d({ inputShape: [6, 6, 1], filters: 2, kernelSize: 3, dilationRate: 2 }), tf.layers.flatten(), tf.layers.dense({ units: 1 })],
    });
    dil.compile({ optimizer: adaFisher(dil), loss: 'meanSquaredError' });
    const dx = tf.ones([2, 6, 6, 1]);
    const dy = tf.ones([2, 1]);
    const dilated = await errorOf(() => dil.fit(dx, dy, { epochs: 1, verbose: 0 }));
    expect(dilated.code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    expect(dilated.message).toMatch(/dilationRate/);

    // one Conv2D applied to inputs of two sizes only known when the model runs: its uses cannot
    // be combined (sizes known from the graph: see 'a shared Conv2D on two image sizes')
    const conv = tf.layers.conv2d({ filters: 2, kernelSize: 3, padding: 'same', name: 'shared_conv' });
    const pool = () => tf.layers.globalAveragePooling2d({});
    const i1 = tf.input({ shape: [null, null, 1] });
    const i2 = tf.input({ shape: [null, null, 1] });
    const h = tf.layers
      .concatenate()
      .apply([pool().apply(conv.apply(i1)) as tf.SymbolicTensor, pool().apply(conv.apply(i2)) as tf.SymbolicTensor]) as tf.SymbolicTensor;
    const shared = tf.model({ inputs: [i1, i2], outputs: tf.layers.dense({ units: 1 }).apply(h) as tf.SymbolicTensor });
    shared.compile({ optimizer: adaFisher(shared), loss: 'meanSquaredError' });
    const s1 = tf.ones([2, 6, 6, 1]);
    const s2 = tf.ones([2, 4, 4, 1]);
    const mixed = await errorOf(() => shared.fit([s1, s2], dy, { epochs: 1, verbose: 0 }));
    expect(mixed.code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    expect(mixed.message).toMatch(/layer 'shared_conv' is used with inputs of different shapes in one step \(\[2,(6,6|4,4),1\] and \[2,(4,4|6,6),1\]\)/);

    tf.dispose([x, y, g, dx, dy, s1, s2]);
    [opt, dil.optimizer, shared.optimizer].forEach((o) => o.dispose());
  });

  it('round-trips every option through getConfig / fromConfig and model.save, backend included', async () => {
    const options = { lr: 0.01, beta: 0.8, damping: 0.002, decay: 0.05, mix: 0.004, tcov: 3, weightDecay: 0.1, decoupled: true, backend: 'cpu' as const, nonFiniteGuard: false };
    const opt = new AdaFisherOptimizer(options);
    const config = opt.getConfig();
    expect(config).toEqual(options);
    const back = AdaFisherOptimizer.fromConfig(AdaFisherOptimizer, config) as AdaFisherOptimizer;
    expect(back.getConfig()).toEqual(options);
    expect(new AdaFisherOptimizer({ lr: 0.01 }).getConfig()).not.toHaveProperty('backend');
    expect(() => new AdaFisherOptimizer({ backend: 'gpu' as 'cpu' })).toThrow(/options\.backend/);
    const model = buildModel();
    model.compile({ optimizer: adaFisher(model, options), loss: 'meanSquaredError' });
    const loaded = await tf.loadLayersModel(tf.io.fromMemory(await saveToMemory(model)));
    expect(loaded.optimizer.getConfig()).toEqual(options);
    model.optimizer.dispose();
    loaded.optimizer.dispose();
  });

  it('throws ADAFISHER_DISPOSED when a disposed optimizer is used again', async () => {
    const model = buildModel();
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    opt.dispose();
    opt.dispose(); // idempotent
    const before = weightsOf(model);
    const e = await errorOf(() => model.fit(x, y, { epochs: 1, verbose: 0 }));
    expect(e.code).toBe('ADAFISHER_DISPOSED');
    expect(e.message).toMatch(/disposed/);
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    expect((await errorOf(() => opt.getWeights())).code).toBe('ADAFISHER_DISPOSED');
    tf.dispose([x, y]);
  });

  it("refuses backend 'cuda' when it is attached, not at the first fit, where CUDA cannot run", async () => {
    const { backendInfo } = await import('../lib/index.js');
    const model = buildModel();
    if (backendInfo('cuda').backend === 'cuda') {
      const opt = adaFisher(model, { backend: 'cuda' });
      expect(opt.model).toBe(model);
      opt.dispose();
      return;
    }
    const e = await errorOf(() => adaFisher(model, { backend: 'cuda' }));
    expect(e.code).toBe('ADAFISHER_BACKEND_UNAVAILABLE');
    expect(e.message).toMatch(/cuda backend was requested \(option\) but cannot be used/);
  });

});

describe('an optimizer trains only the model it is attached to', () => {
  it('refuses variables of another compiled model, naming the variable', async () => {
    const m1 = buildModel();
    const m2 = buildModel();
    const o = adaFisher(m1);
    m2.compile({ optimizer: o, loss: 'meanSquaredError' });
    const before = weightsOf(m2);
    const { x, y } = batch(1, false);
    const e = await errorOf(() => m2.fit(x, y, { epochs: 1, verbose: 0 }));
    expect(e.code).toBe('ADAFISHER_MODEL_MISMATCH');
    const v0 = (m2.trainableWeights[0] as unknown as { name: string }).name;
    expect(e.message).toContain(`'${v0}'`);
    expect(e.message).toMatch(new RegExp(`not a weight of model '${m1.name}'.*adaFisher\\(model\\).*attach`));
    weightsOf(m2).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    expect(o.steps).toBe(0);

    // also once it has trained its own model
    m1.compile({ optimizer: o, loss: 'meanSquaredError' });
    await m1.fit(x, y, { epochs: 1, verbose: 0 });
    m2.compile({ optimizer: o, loss: 'meanSquaredError' });
    expect((await errorOf(() => m2.fit(x, y, { epochs: 1, verbose: 0 }))).code).toBe('ADAFISHER_MODEL_MISMATCH');
    // refused before any gradient is computed: nothing leaks (TF.js's fit itself leaks one
    // tensor whenever an optimizer throws, so this calls minimize directly)
    const vars = (m2.trainableWeights as unknown as { read(): tf.Variable }[]).map((w) => w.read());
    const n0 = tf.memory().numTensors;
    const direct = await errorOf(() => o.minimize(() => tf.losses.meanSquaredError(y, m2.apply(x) as tf.Tensor) as tf.Scalar, true, vars));
    expect(direct.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(tf.memory().numTensors).toBe(n0);
    weightsOf(m2).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    expect(o.steps).toBe(1);
    tf.dispose([x, y]);
    o.dispose();
  });

  it('refuses a weight unfrozen after its first step before computing any gradient', async () => {
    const model = buildModel();
    model.layers[0].trainable = false;
    const o = adaFisher(model, { lr: LR });
    model.compile({ optimizer: o, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    model.layers[0].trainable = true;
    const vars = (model.trainableWeights as unknown as { read(): tf.Variable }[]).map((w) => w.read());
    const n0 = tf.memory().numTensors;
    const e = await errorOf(() => o.minimize(() => tf.losses.meanSquaredError(y, model.apply(x) as tf.Tensor) as tf.Scalar, true, vars));
    expect(e.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(e.message).toMatch(new RegExp(`variable '${vars[0].name}' is not one this optimizer was set up for.*Create a new optimizer`));
    expect(tf.memory().numTensors).toBe(n0);
    expect(o.steps).toBe(1);
    tf.dispose([x, y]);
    o.dispose();
  });

  it('refuses to train an outer model with an optimizer attached to an inner one', async () => {
    const inner = tf.sequential({ layers: [tf.layers.dense({ inputShape: [6], units: 4, activation: 'relu' })] });
    const outer = tf.sequential({ layers: [inner, tf.layers.dense({ units: 3, name: 'outer_head' })] });
    const o = adaFisher(inner);
    outer.compile({ optimizer: o, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    const e = await errorOf(() => outer.fit(x, y, { epochs: 1, verbose: 0 }));
    expect(e.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(e.message).toMatch(/'outer_head\/kernel[^']*' is not a weight of model/);
    // attached to the outer model, the nested one is preconditioned
    const ok = adaFisher(outer, { lr: LR });
    outer.compile({ optimizer: ok, loss: 'meanSquaredError' });
    await outer.fit(x, y, { epochs: 1, verbose: 0 });
    expect(ok.steps).toBe(1);
    expect(ok.layerReport().every((r) => r.preconditioned)).toBe(true);
    tf.dispose([x, y]);
    o.dispose();
    ok.dispose();
  });

  it('a Dense or Conv2D subclass with its own call() keeps it (momentum); one without its own call() is preconditioned', async () => {
    // NOTE: [stock layers]: the subclasses inherit the className 'Dense' / 'Conv2D'.
    const Dense = Object.getPrototypeOf(tf.layers.dense({ units: 1 })).constructor as new (a: object) => tf.layers.Layer;
    const Conv2D = Object.getPrototypeOf(tf.layers.conv2d({ filters: 1, kernelSize: 1 })).constructor as new (a: object) => tf.layers.Layer;
    class ScaledDense extends Dense {
      override call(inputs: tf.Tensor | tf.Tensor[], kwargs: object) {
        return tf.mul((super.call as (i: unknown, k: unknown) => tf.Tensor)(inputs, kwargs), 100);
      }
    }
    class NegatedConv extends Conv2D {
      override call(inputs: tf.Tensor | tf.Tensor[], kwargs: object) {
        return tf.neg((super.call as (i: unknown, k: unknown) => tf.Tensor)(inputs, kwargs));
      }
    }
    class NamedDense extends Dense {
      describe() {
        return 'no call() of its own';
      }
    }
    const model = tf.sequential({
      layers: [
        new NegatedConv({ inputShape: [5, 5, 2], filters: 2, kernelSize: 3, name: 'negated' }),
        tf.layers.flatten({ name: 'flat' }),
        new ScaledDense({ units: 3, name: 'scaled' }),
        new NamedDense({ units: 2, name: 'named' }),
      ],
    });
    seedWeights(model, 5);
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const r = rng(77);
    const x = tf.tensor4d(Float32Array.from({ length: 4 * 50 }, () => r()), [4, 5, 5, 2]);
    const y = tf.ones([4, 2]);
    const before = (model.evaluate(x, y) as tf.Scalar).dataSync()[0];
    const h = await model.fit(x, y, { batchSize: 4, epochs: 1, verbose: 0, shuffle: false });
    // fit computed the loss of the model as it is, the subclasses' call() included
    expect(h.history.loss[0]).toBeCloseTo(before, 4);
    const by = Object.fromEntries(opt.layerReport().map((l) => [l.name, l]));
    expect(by.negated).toMatchObject({ preconditioned: false, className: 'Conv2D' });
    expect(by.negated.reason).toMatch(/a Conv2D with its own call\(\).*only TF\.js's own Conv2D is preconditioned/);
    expect(by.scaled).toMatchObject({ preconditioned: false, className: 'Dense' });
    expect(by.named).toMatchObject({ preconditioned: true, kind: 'linear' });
    tf.dispose([x, y]);
    opt.dispose();
    model.dispose();
  });

  it('model.dispose() under the attached optimizer: the next step fails with ADAFISHER_DISPOSED, nothing leaks', async () => {
    const model = buildModel();
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = batch(1, false);
    await model.fit(x, y, { epochs: 1, verbose: 0 });
    model.dispose();
    const e = await errorOf(() => opt.minimize(() => tf.losses.meanSquaredError(y, model.apply(x) as tf.Tensor) as tf.Scalar));
    expect(e.code).toBe('ADAFISHER_DISPOSED');
    expect(e.message).toMatch(/weight '.*' of the model this optimizer trains was disposed \(model\.dispose\(\)\?\); nothing was changed/);
    expect(opt.steps).toBe(1);
    tf.dispose([x, y]);
    opt.dispose();
  });

  it('trains variables that share one data array (biases assigned from one tf.zeros): TF.js shares it, the step does not', async () => {
    const model = tf.sequential({ layers: [tf.layers.dense({ inputShape: [4], units: 4 }), tf.layers.dense({ units: 4 })] });
    seedWeights(model, 13);
    const zeros = tf.zeros([4]);
    for (const l of model.layers) l.setWeights([l.getWeights()[0], zeros]);
    const biases = () => model.layers.map((l) => (l.trainableWeights[1] as unknown as { read(): tf.Variable }).read());
    expect(biases()[0].dataSync()).toBe(biases()[1].dataSync()); // one Float32Array for both
    const opt = adaFisher(model, { lr: 1e-2 });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const r = rng(5);
    const x = tf.tensor2d(Float32Array.from({ length: 32 }, () => r()), [8, 4]);
    const y = tf.tensor2d(Float32Array.from({ length: 32 }, () => r()), [8, 4]);
    await model.fit(x, y, { epochs: 2, verbose: 0 });
    expect(opt.steps).toBe(2);
    const [b0, b1] = biases().map((v) => Array.from(v.dataSync()));
    expect(b0).not.toEqual(b1); // each bias got its own update
    expect(b0.some((v) => v !== 0) && b1.some((v) => v !== 0)).toBe(true);
    tf.dispose([x, y, zeros]);
    opt.dispose();
    model.dispose();
  });

  it('still trains unsupported layers (Embedding, LSTM) with momentum and reports them', async () => {
    const model = tf.sequential({
      layers: [
        tf.layers.embedding({ inputDim: 10, outputDim: 4, inputLength: 3, name: 'emb' }),
        tf.layers.lstm({ units: 3, name: 'lstm' }),
        tf.layers.dense({ units: 2, name: 'head' }),
      ],
    });
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const before = weightsOf(model);
    const x = tf.tensor2d([[1, 2, 3], [4, 5, 6]]);
    const y = tf.ones([2, 2]);
    await model.fit(x, y, { epochs: 2, verbose: 0 });
    expect(opt.steps).toBe(2);
    weightsOf(model).forEach((w, i) => expect(w.some((v, j) => v !== before[i][j])).toBe(true));
    const by = Object.fromEntries(opt.layerReport().map((r) => [r.name, r]));
    expect(by.emb.preconditioned).toBe(false);
    expect(by.lstm.preconditioned).toBe(false);
    expect(by.head).toMatchObject({ preconditioned: true, kind: 'linear' });
    tf.dispose([x, y]);
    opt.dispose();
  });
});

async function saveToMemory(model: tf.LayersModel): Promise<tf.io.ModelArtifacts> {
  let artifacts: tf.io.ModelArtifacts | undefined;
  await model.save(
    tf.io.withSaveHandler(async (a) => {
      artifacts = a;
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
    }),
    { includeOptimizer: true },
  );
  return artifacts!;
}

describe('a checkpoint taken after freezing a layer', () => {
  it('resumes exactly: the restored optimizer keeps the frozen layer it was set up for', async () => {
    // Two PReLU layers: plain-momentum parameters, whose step counts a checkpoint keeps by
    // position. Freezing the first makes model.weights list it last; its count (2 steps) and
    // the second's (4) must still go to the right variables.
    const model = tf.sequential({
      layers: [
        tf.layers.prelu({ inputShape: [6], name: 'frozen_prelu' }),
        tf.layers.dense({ units: 5, activation: 'relu', name: 'frozen_dense' }),
        tf.layers.prelu({ name: 'prelu' }),
        tf.layers.dense({ units: 3, name: 'head' }),
      ],
    });
    seedWeights(model, 9);
    const opt = adaFisher(model, { lr: LR, tcov: 2 });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const fit = async (m: tf.LayersModel, s: number) => {
      const b = batch(s, false);
      await m.fit(b.x, b.y, { batchSize: 8, epochs: 1, verbose: 0, shuffle: false });
      tf.dispose([b.x, b.y]);
    };
    for (let s = 1; s <= 2; s++) await fit(model, s);
    model.layers[0].trainable = false;
    model.layers[1].trainable = false;
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    for (let s = 3; s <= 4; s++) await fit(model, s);
    // model.getWeights() lists the trainable weights first: the frozen layers' are the last three
    const frozen = weightsOf(model).slice(3);
    const loaded = await tf.loadLayersModel(tf.io.fromMemory(await saveToMemory(model)));
    expect(loaded.layers[0].trainable).toBe(false);
    const lopt = loaded.optimizer as AdaFisherOptimizer;
    lopt.attach(loaded);
    for (let s = 5; s <= 7; s++) {
      await fit(model, s);
      await fit(loaded, s);
    }
    const a = weightsOf(model);
    weightsOf(loaded).forEach((w, i) => expect(Array.from(w), `weight ${i}`).toEqual(Array.from(a[i])));
    a.slice(3).forEach((w, i) => expect(Array.from(w), `frozen weight ${i}`).toEqual(Array.from(frozen[i])));
    expect(lopt.steps).toBe(7);
    const sa = await opt.getWeights();
    const sb = await lopt.getWeights();
    expect(sb.map((w) => w.name)).toEqual(sa.map((w) => w.name));
    sa.forEach((w, i) => expect(Array.from(sb[i].tensor.dataSync()), w.name).toEqual(Array.from(w.tensor.dataSync())));
    opt.dispose();
    lopt.dispose();
    model.dispose();
    loaded.dispose();
  });
});

describe('a model saved before its first training step', () => {
  it('loads, re-attaches and trains exactly like a fresh optimizer', async () => {
    const model = buildModel({ s: 2, padding: 'same' });
    model.compile({ optimizer: adaFisher(model, { lr: LR, tcov: 2 }), loss: 'meanSquaredError' });
    const artifacts = await saveToMemory(model);
    expect(artifacts.weightSpecs!.filter((s) => s.group === 'optimizer').map((s) => s.name)).toEqual(['iter']);
    const loaded = await tf.loadLayersModel(tf.io.fromMemory(artifacts));
    const lopt = loaded.optimizer as AdaFisherOptimizer;
    lopt.attach(loaded);
    for (let s = 1; s <= 4; s++) {
      const b = batch(s, true);
      await model.fit(b.x, b.y, { batchSize: 4, epochs: 1, verbose: 0, shuffle: false });
      await loaded.fit(b.x, b.y, { batchSize: 4, epochs: 1, verbose: 0, shuffle: false });
      tf.dispose([b.x, b.y]);
    }
    expect(lopt.steps).toBe(4);
    const a = weightsOf(model);
    weightsOf(loaded).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(a[i])));
    model.optimizer.dispose();
    lopt.dispose();
    model.dispose();
    loaded.dispose();
  });

  it('setWeights of a fresh state resets a trained optimizer; a partial state is still refused', async () => {
    const model = buildModel();
    const twin = buildModel();
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const fresh = await (adaFisher(twin)).getWeights();
    const b1 = batch(1, false);
    await model.fit(b1.x, b1.y, { batchSize: 8, epochs: 1, verbose: 0 });
    expect(opt.steps).toBe(1);
    await opt.setWeights(fresh);
    expect(opt.steps).toBe(0);
    // continues exactly like a fresh optimizer from the same weights
    twin.setWeights(model.getWeights());
    const topt = adaFisher(twin, { lr: LR });
    twin.compile({ optimizer: topt, loss: 'meanSquaredError' });
    for (let s = 2; s <= 3; s++) {
      const b = batch(s, false);
      await model.fit(b.x, b.y, { batchSize: 8, epochs: 1, verbose: 0, shuffle: false });
      await twin.fit(b.x, b.y, { batchSize: 8, epochs: 1, verbose: 0, shuffle: false });
      tf.dispose([b.x, b.y]);
    }
    const a = weightsOf(twin);
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(a[i])));
    expect(opt.steps).toBe(2);

    // iter 0 plus part of a state is not the fresh state: refused, naming the missing weight
    const key = (model.trainableWeights[0] as unknown as { originalName: string }).originalName;
    const partial = buildModel();
    const popt = adaFisher(partial);
    partial.compile({ optimizer: popt, loss: 'meanSquaredError' });
    await popt.setWeights([
      { name: 'iter', tensor: tf.scalar(0, 'int32') },
      { name: `${key}/adafisher_m`, tensor: tf.zeros([30]) },
    ]);
    const e = await errorOf(() => partial.fit(b1.x, b1.y, { epochs: 1, verbose: 0 }));
    expect(e.code).toBe('ADAFISHER_BAD_CHECKPOINT');
    expect(e.message).toMatch(/no saved weight 'adafisher\/step_counts'/);
    tf.dispose([b1.x, b1.y]);
    [opt, topt, popt].forEach((o) => o.dispose());
  });
});

describe('loading adafisher/tfjs', () => {
  // Plain Node processes on the compiled package (dist/), as an application loads it.
  const script = (load: string) => `
    ${load}
    (async () => {
      await tf.setBackend('cpu');
      const m = tf.sequential({ layers: [tf.layers.dense({ inputShape: [2], units: 1 })] });
      const o = adaFisher(m);
      m.compile({ optimizer: o, loss: 'meanSquaredError' });
      await m.fit(tf.ones([4, 2]), tf.ones([4, 1]), { epochs: 2, verbose: 0 });
      console.log(JSON.stringify({ steps: o.steps, isOptimizer: o instanceof tf.Optimizer, isClass: o instanceof AdaFisherOptimizer }));
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const node = (args: string[], cwd: string) => {
    const env = { ...process.env };
    delete env.NODE_PATH;
    delete env.NODE_OPTIONS; // vitest's own loader hooks
    return spawnSync(process.execPath, args, { cwd, env, encoding: 'utf8', timeout: 60_000 });
  };

  beforeAll(() => ensureDist());

  it.each([
    ['require()', ['-e'], "const tf = require('@tensorflow/tfjs'); const { adaFisher, AdaFisherOptimizer } = require('adafisher/tfjs');"],
    ['import', ['--input-type=module', '-e'], "import * as tf from '@tensorflow/tfjs'; import { adaFisher, AdaFisherOptimizer } from 'adafisher/tfjs';"],
  ])('works with %s, on the application\'s own TF.js instance', (_, flags, load) => {
    const r = node([...flags, script(load)], repoRoot);
    expect(r.stderr).not.toMatch(/ERR_REQUIRE_ASYNC_MODULE|Error/);
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n').pop()!)).toEqual({ steps: 2, isOptimizer: true, isClass: true });
  });

  it('an optimizer left undisposed is collected once its model is disposed and dropped (NOTE: [weak taps]); a live one keeps recording', () => {
    // TF.js keeps a disposed model's layers reachable (its cache of sorted graphs); the taps on
    // them used to keep every optimizer compiled into such a model, with its native state.
    const code = `
      import * as tf from '@tensorflow/tfjs';
      import { adaFisher } from 'adafisher/tfjs';
      await tf.setBackend('cpu');
      const collected = new Set();
      const registry = new FinalizationRegistry((k) => collected.add(k));
      const build = () => {
        const model = tf.sequential({ layers: [tf.layers.dense({ inputShape: [4], units: 8, activation: 'relu' }), tf.layers.dense({ units: 1 })] });
        const opt = adaFisher(model, { lr: 1e-4 });
        model.compile({ optimizer: opt, loss: 'meanSquaredError' });
        return { model, opt };
      };
      const x = tf.randomNormal([4, 4], 0, 1, 'float32', 1), y = tf.zeros([4, 1]);
      const H = async (o) => (await o.getWeights()).find((w) => w.name.endsWith('/adafisher_H')).tensor.dataSync().slice();
      const kept = build();
      await kept.model.fit(x, y, { epochs: 1, verbose: 0 });
      const before = await H(kept.opt);
      const churn = async (k) => {
        const { model, opt } = build();
        await model.fit(x, y, { epochs: 1, verbose: 0 });
        registry.register(opt, k);
        model.dispose();
      };
      const N = 5;
      for (let k = 0; k < N; k++) await churn(k);
      for (let i = 0; i < 50 && collected.size < N; i++) {
        globalThis.gc();
        await new Promise((r) => setTimeout(r, 20));
      }
      await kept.model.fit(x, y, { epochs: 1, verbose: 0 });
      const after = await H(kept.opt);
      console.log(JSON.stringify({ collected: collected.size, of: N, steps: kept.opt.steps, refreshed: after.some((v, i) => v !== before[i]) }));`;
    const r = node(['--expose-gc', '--input-type=module', '-e', code], repoRoot);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n').pop()!)).toEqual({ collected: 5, of: 5, steps: 2, refreshed: true });
  });

  it('says how to install @tensorflow/tfjs when it is missing, to require() and import alike', () => {
    const dir = mkdtempSync(join(tmpdir(), 'adafisher-no-tfjs-'));
    try {
      cpSync(join(repoRoot, 'dist', 'lib'), join(dir, 'lib'), { recursive: true });
      writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }));
      for (const args of [
        ['-e', "try { require('./lib/tfjs/index.js') } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }"],
        ['--input-type=module', '-e', "try { await import('./lib/tfjs/index.js') } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }"],
      ]) {
        const r = node(args, dir);
        expect(r.status, r.stderr).toBe(0);
        const e = JSON.parse(r.stdout.trim().split('\n').pop()!);
        expect(e.code).toBe('ADAFISHER_TFJS_NOT_FOUND');
        expect(e.message).toMatch(/needs the peer dependency '@tensorflow\/tfjs' \(\^4\.22, a 4\.x from 4\.22 on\), which is not installed: npm install @tensorflow\/tfjs/);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('learning-rate schedules', () => {
  it('optimizer.learningRate set in a callback takes effect at the next step and keeps the state', async () => {
    const model = buildModel();
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = batch(3, false);
    const seen: number[] = [];
    await model.fit(x, y, {
      batchSize: 8,
      epochs: 3,
      verbose: 0,
      callbacks: { onEpochEnd: async () => { opt.learningRate *= 0.5; seen.push(opt.learningRate); } },
    });
    expect(seen).toEqual([LR / 2, LR / 4, LR / 8]);
    expect(opt.hyperparameters.lr).toBe(LR / 8);
    const steps = opt.steps;
    expect(steps).toBeGreaterThan(0);
    // lr 0: the next steps move no weight, and the step count (state) carries on.
    opt.learningRate = 0;
    const before = weightsOf(model);
    await model.fit(x, y, { batchSize: 8, epochs: 1, verbose: 0 });
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    expect(opt.steps).toBeGreaterThan(steps);
    expect(() => (opt.learningRate = -1)).toThrow(RangeError);
    // The message names what the program set.
    expect(() => (opt.learningRate = NaN)).toThrow(/^Expected a finite number for learningRate but received NaN/);
    expect(() => opt.setLearningRate(NaN)).toThrow(/for lr but received NaN/);
    expect(opt.learningRate).toBe(0);
    tf.dispose([x, y]);
    opt.dispose();
    model.dispose();
  });
});

// ---------- custom training loops: computeGradients, clipping, accumulation ----------

function trainableVars(model: tf.LayersModel): tf.Variable[] {
  return (model.trainableWeights as unknown as { read(): tf.Variable }[]).map((w) => w.read());
}

/** The mean-squared-error loss of a model on (x, y), as a training step computes it. */
const mseOf = (model: tf.LayersModel, x: tf.Tensor, y: tf.Tensor) => () =>
  tf.losses.meanSquaredError(y, model.apply(x, { training: true }) as tf.Tensor) as tf.Scalar;

/** TF.js has no clipByGlobalNorm: scale every gradient by min(1, clip / global norm). */
function clipByGlobalNorm(grads: tf.NamedTensorMap, clip: number): { grads: tf.NamedTensorMap; scale: number } {
  const names = Object.keys(grads);
  const scale = tf.tidy(() => tf.minimum(1, tf.div(clip, tf.sqrt(tf.addN(names.map((n) => tf.sum(tf.square(grads[n])))))))) as tf.Scalar;
  const out = tf.tidy(() => Object.fromEntries(names.map((n) => [n, tf.mul(grads[n], scale)])));
  const s = scale.dataSync()[0];
  scale.dispose();
  return { grads: out, scale: s };
}

/** Rows [begin, begin + size) of a batch. */
const rows = (t: tf.Tensor, begin: number, size: number) => tf.slice(t, begin, size);

function runningFactors(w: { name: string; tensor: tf.Tensor }[]): Record<string, Float32Array> {
  return Object.fromEntries(w.filter((e) => /adafisher_[HS]$/.test(e.name)).map((e) => [e.name, Float32Array.from(e.tensor.dataSync())]));
}

describe('custom training loops (computeGradients → clip / accumulate → applyGradients)', () => {
  it.each([
    { name: 'Dense', conv: undefined },
    { name: 'Conv2D', conv: { s: 2, padding: 'same' as const } },
  ])('$name: a clipping loop equals minimize() bit for bit while the clip does not bind, and trains when it does', async ({ conv }) => {
    const a = buildModel(conv);
    const b = buildModel(conv);
    const c = buildModel(conv);
    const [oa, ob, oc] = [a, b, c].map((m) => adaFisher(m, { lr: LR }));
    const n0 = tf.memory().numTensors;
    const losses: number[] = [];
    let bound = 0;
    for (let step = 1; step <= 4; step++) {
      const { x, y } = batch(step, conv !== undefined);
      tf.dispose(oa.minimize(mseOf(a, x, y), false, trainableVars(a)));
      // no varList: gradients of every trainable variable f uses, as TF.js's own optimizers
      const gb = ob.computeGradients(mseOf(b, x, y));
      expect(ob.pendingStatistics).toBe(1);
      const clipped = clipByGlobalNorm(gb.grads, 1e6);
      expect(clipped.scale).toBe(1);
      ob.applyGradients(clipped.grads);
      expect(ob.lastStep).toEqual({ applied: true, refreshed: true });
      expect(ob.pendingStatistics).toBe(0);
      tf.dispose([gb.value, gb.grads, clipped.grads]);

      const gc = oc.computeGradients(mseOf(c, x, y), trainableVars(c));
      losses.push(gc.value.dataSync()[0]);
      const tight = clipByGlobalNorm(gc.grads, 0.05);
      if (tight.scale < 1) bound++;
      oc.applyGradients(tight.grads);
      tf.dispose([gc.value, gc.grads, tight.grads, x, y]);
      const wa = weightsOf(a);
      weightsOf(b).forEach((w, i) => expect(Array.from(w), `step ${step} weight ${i}`).toEqual(Array.from(wa[i])));
    }
    expect(tf.memory().numTensors).toBe(n0);
    expect(ob.steps).toBe(4);
    expect(bound).toBe(4);
    expect(oc.steps).toBe(4);
    // the clipped run moved, stayed finite, and took different steps from the unclipped ones
    const wc = weightsOf(c);
    expect(wc.every((w) => w.every(Number.isFinite))).toBe(true);
    expect(wc.some((w, i) => w.some((v, j) => v !== weightsOf(a)[i][j]))).toBe(true);
    const { x, y } = batch(1, conv !== undefined);
    const after = tf.tidy(() => mseOf(c, x, y)().dataSync()[0]);
    expect(after).toBeLessThan(losses[0]);
    tf.dispose([x, y]);
    [oa, ob, oc].forEach((o) => o.dispose());
    [a, b, c].forEach((m) => m.dispose());
  });

  it.each([
    { name: 'Dense, 2 micro-batches of 4', conv: undefined, sizes: [4, 4] },
    { name: 'Dense, micro-batches of 3, 1 and 4', conv: undefined, sizes: [3, 1, 4] },
    { name: "Conv2D 'same' stride 2, 2 micro-batches of 2", conv: { s: 2, padding: 'same' as const }, sizes: [2, 2] },
    { name: "Conv2D 'valid' stride 2, micro-batches of 1 and 3", conv: { s: 2, padding: 'valid' as const }, sizes: [1, 3] },
  ])('accumulating gradients over micro-batches equals one big batch ($name)', async ({ conv, sizes }) => {
    const big = buildModel(conv);
    const acc = buildModel(conv);
    const start = weightsOf(big);
    const ob = adaFisher(big, { lr: LR });
    const oa = adaFisher(acc, { lr: LR });
    const B = sizes.reduce((p, q) => p + q, 0);
    for (let step = 1; step <= 3; step++) {
      const { x, y } = batch(step, conv !== undefined);
      expect(x.shape[0]).toBe(B);
      tf.dispose(ob.minimize(mseOf(big, x, y)));
      // the loss of each micro-batch is the mean over its examples; the applied gradient is
      // their example-weighted mean
      let sum: tf.NamedTensorMap | null = null;
      let at = 0;
      for (const n of sizes) {
        const [xi, yi] = [rows(x, at, n), rows(y, at, n)];
        at += n;
        const { value, grads } = oa.computeGradients(mseOf(acc, xi, yi), trainableVars(acc));
        const prev: tf.NamedTensorMap | null = sum;
        sum = tf.tidy(() => Object.fromEntries(Object.keys(grads).map((k) => [k, tf.add(prev?.[k] ?? tf.zeros(grads[k].shape), tf.mul(grads[k], n / B))])));
        tf.dispose([value, grads, xi, yi]);
        if (prev) tf.dispose(prev);
      }
      expect(oa.pendingStatistics).toBe(sizes.length);
      oa.applyGradients(sum!);
      expect(oa.lastStep).toEqual({ applied: true, refreshed: true });
      expect(oa.pendingStatistics).toBe(0);
      tf.dispose([sum!, x, y]);

      // the running factors are the big batch's (S scaled as 1/B^2 under a mean loss)
      const fb = runningFactors(await ob.getWeights());
      const fa = runningFactors(await oa.getWeights());
      expect(Object.keys(fa).length).toBe(Object.keys(fb).length);
      Object.keys(fb).forEach((k, i) => expectClose(Object.values(fa)[i], fb[k], 1e-6, `step ${step} ${k}`));
      // and so are the steps: each parameter's total displacement from the start
      const wb = weightsOf(big);
      weightsOf(acc).forEach((w, i) => {
        const dA = w.map((v, j) => v - start[i][j]);
        const dB = wb[i].map((v, j) => v - start[i][j]);
        expectClose(dA, dB, 1e-4, `step ${step} weight ${i} displacement`);
        expectClose(w, wb[i], 1e-6, `step ${step} weight ${i}`);
      });
    }
    [ob, oa].forEach((o) => o.dispose());
    [big, acc].forEach((m) => m.dispose());
  });

  it('says clearly that gradients from tf.variableGrads carry no layer statistics, and changes nothing', async () => {
    const model = buildModel();
    const fresh = adaFisher(model, { lr: LR });
    const { x, y } = batch(1, false);
    const g0 = tf.variableGrads(mseOf(model, x, y), trainableVars(model));
    const before0 = await errorOf(() => fresh.applyGradients(g0.grads));
    expect(before0.code).toBe('ADAFISHER_MISSING_STATISTICS');
    expect(before0.message).toMatch(/tf\.variableGrads and tf\.grads record none.*optimizer\.computeGradients\(lossFn\)/);
    tf.dispose([g0.value, g0.grads]);
    fresh.dispose();

    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    await model.fit(x, y, { batchSize: 8, epochs: 1, verbose: 0 });
    const before = weightsOf(model);
    const state = (await opt.getWeights()).map((w) => Array.from(w.tensor.dataSync()));
    const g = tf.variableGrads(mseOf(model, x, y), trainableVars(model));
    const e = await errorOf(() => opt.applyGradients(g.grads));
    expect(e.code).toBe('ADAFISHER_MISSING_STATISTICS');
    expect(e.message).toMatch(new RegExp(`no input was recorded for layer '${model.layers[0].name}'.*optimizer\\.computeGradients\\(lossFn\\).*tf\\.variableGrads and tf\\.grads record none`));
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    (await opt.getWeights()).forEach((w, i) => expect(Array.from(w.tensor.dataSync())).toEqual(state[i]));
    expect(opt.steps).toBe(1);
    tf.dispose([g.value, g.grads, x, y]);
    opt.dispose();
  });

  it('a minimize() step uses its own statistics; clearStatistics() drops those of gradients never applied', async () => {
    const ref = buildModel();
    const m1 = buildModel();
    const m2 = buildModel();
    const m3 = buildModel();
    const [or, o1, o2, o3] = [ref, m1, m2, m3].map((m) => adaFisher(m, { lr: LR }));
    const other = batch(7, false);
    for (let step = 1; step <= 3; step++) {
      const { x, y } = batch(step, false);
      tf.dispose(or.minimize(mseOf(ref, x, y)));
      // gradients computed on another batch and thrown away: minimize discards their statistics
      const thrown1 = o1.computeGradients(mseOf(m1, other.x, other.y));
      tf.dispose([thrown1.value, thrown1.grads]);
      expect(o1.pendingStatistics).toBe(1);
      tf.dispose(o1.minimize(mseOf(m1, x, y)));
      expect(o1.pendingStatistics).toBe(0);
      // ... and so does clearStatistics() before a custom step
      const thrown2 = o2.computeGradients(mseOf(m2, other.x, other.y));
      tf.dispose([thrown2.value, thrown2.grads]);
      o2.clearStatistics();
      expect(o2.pendingStatistics).toBe(0);
      const g2 = o2.computeGradients(mseOf(m2, x, y));
      o2.applyGradients(g2.grads);
      tf.dispose([g2.value, g2.grads]);
      // without it they are combined into the next step, as accumulated micro-batches
      const thrown3 = o3.computeGradients(mseOf(m3, other.x, other.y));
      tf.dispose([thrown3.value, thrown3.grads]);
      const g3 = o3.computeGradients(mseOf(m3, x, y));
      expect(o3.pendingStatistics).toBe(2);
      o3.applyGradients(g3.grads);
      expect(o3.pendingStatistics).toBe(0);
      tf.dispose([g3.value, g3.grads, x, y]);
      const w = weightsOf(ref);
      for (const m of [m1, m2]) weightsOf(m).forEach((v, i) => expect(Array.from(v)).toEqual(Array.from(w[i])));
    }
    expect(weightsOf(m3).some((v, i) => v.some((e, j) => e !== weightsOf(ref)[i][j]))).toBe(true);
    tf.dispose([other.x, other.y]);
    [or, o1, o2, o3].forEach((o) => o.dispose());
  });

  it('consumes the statistics on every step (skipped ones included), records none between refreshes, and keeps them when a step throws', async () => {
    const model = buildModel();
    const opt = adaFisher(model, { lr: LR, tcov: 2 });
    const { x, y } = batch(1, false);
    const g = opt.computeGradients(mseOf(model, x, y));
    expect(opt.pendingStatistics).toBe(1);
    // bad input: a coded error naming the argument, and nothing changes
    const before = weightsOf(model);
    const wrong = tf.zeros([2]);
    const name = Object.keys(g.grads)[0];
    const bad = await errorOf(() => opt.applyGradients({ ...g.grads, [name]: wrong }));
    expect(bad).toBeInstanceOf(RangeError);
    expect(bad.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(bad.message).toContain(`variableGradients['${name}']`);
    expect((await errorOf(() => opt.applyGradients(null as unknown as tf.NamedTensorMap))).message).toMatch(/for variableGradients/);
    const notF = await errorOf(() => opt.computeGradients(42 as unknown as () => tf.Scalar));
    expect(notF).toBeInstanceOf(TypeError);
    expect(notF.message).toMatch(/Expected a function returning the scalar loss for f/);
    expect((await errorOf(() => opt.minimize(mseOf(model, x, y), false, [1] as unknown as tf.Variable[]))).message).toMatch(/for varList\[0\]/);
    expect(opt.pendingStatistics).toBe(1);
    expect(opt.steps).toBe(0);
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    opt.applyGradients(g.grads);
    expect(opt.lastStep).toEqual({ applied: true, refreshed: true });
    tf.dispose([g.value, g.grads, wrong]);
    // step 1 does not refresh (tcov 2): nothing is recorded
    const g1 = opt.computeGradients(mseOf(model, x, y));
    expect(opt.pendingStatistics).toBe(0);
    opt.applyGradients(g1.grads);
    expect(opt.lastStep).toEqual({ applied: true, refreshed: false });
    tf.dispose([g1.value, g1.grads]);
    // a step the non-finite guard skips still consumes them
    const g2 = opt.computeGradients(mseOf(model, x, y));
    expect(opt.pendingStatistics).toBe(1);
    const nan = tf.tidy(() => Object.fromEntries(Object.keys(g2.grads).map((k) => [k, tf.mul(g2.grads[k], NaN)])));
    const kept = weightsOf(model);
    opt.applyGradients(nan);
    expect(opt.lastStep?.applied).toBe(false);
    expect(opt.pendingStatistics).toBe(0);
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(kept[i])));
    tf.dispose([g2.value, g2.grads, nan, x, y]);
    opt.dispose();
  });
});

describe('a shared Conv2D on two image sizes', () => {
  function sharedConvModel(shapes: [number | null, number | null, number][]): tf.LayersModel {
    const conv = tf.layers.conv2d({ filters: 2, kernelSize: 3, padding: 'same', name: 'shared_conv' });
    const ins = shapes.map((shape) => tf.input({ shape }));
    const pooled = ins.map((i) => tf.layers.globalAveragePooling2d({}).apply(conv.apply(i)) as tf.SymbolicTensor);
    const h = tf.layers.concatenate().apply(pooled) as tf.SymbolicTensor;
    const model = tf.model({ inputs: ins, outputs: tf.layers.dense({ units: 1, name: 'head' }).apply(h) as tf.SymbolicTensor });
    seedWeights(model, 11);
    return model;
  }

  it('sizes known from the graph: reported as not preconditioned before the first step, and trained with momentum', async () => {
    const model = sharedConvModel([[6, 6, 1], [4, 4, 1]]);
    const opt = adaFisher(model, { lr: LR });
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const expected = {
      preconditioned: false,
      reason: expect.stringMatching(/shared Conv2D applied to inputs of different shapes \(\[6,6,1\] and \[4,4,1\]\)/),
    };
    expect(opt.layerReport().find((r) => r.name === 'shared_conv')).toMatchObject(expected);
    expect(opt.layerReport().find((r) => r.name === 'head')).toMatchObject({ preconditioned: true });
    const r = rng(3);
    const s1 = tf.tensor(Float32Array.from({ length: 2 * 36 }, () => r()), [2, 6, 6, 1]);
    const s2 = tf.tensor(Float32Array.from({ length: 2 * 16 }, () => r()), [2, 4, 4, 1]);
    const y = tf.ones([2, 1]);
    const before = weightsOf(model);
    await model.fit([s1, s2], y, { epochs: 2, verbose: 0 });
    expect(opt.steps).toBe(2);
    expect(opt.lastStep).toEqual({ applied: true, refreshed: true });
    weightsOf(model).forEach((w, i) => expect(w.some((v, j) => v !== before[i][j])).toBe(true));
    expect(opt.layerReport().find((r) => r.name === 'shared_conv')).toMatchObject(expected);
    // its weights are in the state as plain parameters: no factors
    const names = (await opt.getWeights()).map((w) => w.name);
    expect(names.some((n) => n.startsWith('shared_conv/adafisher_'))).toBe(false);
    expect(names).toContain('head/adafisher_S');
    tf.dispose([s1, s2, y]);
    opt.dispose();
  });

  it('sizes known only when the model runs, or micro-batches of different sizes: a coded error naming the layer, before any update', async () => {
    const model = sharedConvModel([[null, null, 1], [null, null, 1]]);
    const opt = adaFisher(model, { lr: LR });
    expect(opt.layerReport().find((r) => r.name === 'shared_conv')).toMatchObject({ preconditioned: true, kind: 'conv2d' });
    const y = tf.ones([2, 1]);
    const [a6, a4, b6] = [[2, 6, 6, 1], [2, 4, 4, 1], [2, 6, 6, 1]].map((s) => tf.ones(s));
    const loss = (i1: tf.Tensor, i2: tf.Tensor) => () => tf.losses.meanSquaredError(y, model.apply([i1, i2]) as tf.Tensor) as tf.Scalar;
    const before = weightsOf(model);
    const e = await errorOf(() => opt.computeGradients(loss(a6, a4)));
    expect(e.code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    expect(e.message).toMatch(/layer 'shared_conv' is used with inputs of different shapes in one step \(\[2,(6,6|4,4),1\] and \[2,(4,4|6,6),1\]\)/);
    expect(opt.pendingStatistics).toBe(0);
    // one size per call is fine; a second micro-batch of another size is refused the same way
    const g = opt.computeGradients(loss(a6, b6));
    expect(opt.pendingStatistics).toBe(1);
    const e2 = await errorOf(() => opt.computeGradients(loss(a4, a4)));
    expect(e2.code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    expect(e2.message).toMatch(/'shared_conv'.*micro-batches of different sizes/);
    expect(opt.pendingStatistics).toBe(1);
    expect(opt.steps).toBe(0);
    weightsOf(model).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    opt.applyGradients(g.grads);
    expect(opt.lastStep).toEqual({ applied: true, refreshed: true });
    tf.dispose([g.value, g.grads, y, a6, a4, b6]);
    opt.dispose();
  });
});

describe('a nested model applied to two image sizes', () => {
  it('its Conv2D gets momentum, reported by layerReport() from the start, and fit trains', async () => {
    const backbone = tf.sequential({
      name: 'backbone',
      layers: [tf.layers.conv2d({ filters: 2, kernelSize: 3, padding: 'same', inputShape: [null, null, 1], name: 'bb_conv' }), tf.layers.globalAveragePooling2d({})],
    });
    const i1 = tf.input({ shape: [6, 6, 1] });
    const i2 = tf.input({ shape: [4, 4, 1] });
    const h = tf.layers.concatenate().apply([backbone.apply(i1), backbone.apply(i2)] as tf.SymbolicTensor[]) as tf.SymbolicTensor;
    const model = tf.model({ name: 'two_scales', inputs: [i1, i2], outputs: tf.layers.dense({ units: 1, name: 'head' }).apply(h) as tf.SymbolicTensor });
    seedWeights(model, 3);
    const opt = adaFisher(model, { lr: LR });
    const expected = {
      preconditioned: false,
      reason: expect.stringMatching(/shared Conv2D applied to inputs of different shapes \(\[6,6,1\] and \[4,4,1\]\) in nested model 'backbone'/),
    };
    expect(opt.layerReport().find((r) => r.name === 'bb_conv')).toMatchObject(expected);
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const [a, b, y] = [tf.ones([4, 6, 6, 1]), tf.ones([4, 4, 4, 1]), tf.ones([4, 1])];
    await model.fit([a, b], y, { epochs: 1, verbose: 0 });
    expect(opt.steps).toBe(1);
    expect(opt.layerReport().find((r) => r.name === 'bb_conv')).toMatchObject(expected);
    expect(opt.layerReport().find((r) => r.name === 'head')).toMatchObject({ preconditioned: true });
    tf.dispose([a, b, y]);
    opt.dispose();
  });
});

describe('custom loops: what the review found', () => {
  const denseModel = (names = true) => {
    const m = tf.sequential({
      layers: [
        tf.layers.dense({ units: 4, inputShape: [3], activation: 'relu', ...(names ? {} : {}) }),
        tf.layers.dense({ units: 1 }),
      ],
    });
    seedWeights(m, 1);
    return m;
  };
  const xy = (seed: number, n = 8) => {
    const r = rng(seed);
    return { x: tf.tensor(Float32Array.from({ length: n * 3 }, () => r()), [n, 3]), y: tf.tensor(Float32Array.from({ length: n }, () => r()), [n, 1]) };
  };
  const loss = (m: tf.LayersModel, x: tf.Tensor, y: tf.Tensor) => () => tf.losses.meanSquaredError(y, m.apply(x) as tf.Tensor) as tf.Scalar;

  it('keeps owned copies of pending statistics: a loader reusing one Float32Array per micro-batch equals fresh buffers', () => {
    const K = 4;
    const n = 2;
    const { x: X, y: Y } = xy(5, K * n);
    const xs = X.dataSync().slice();
    const run = (reuse: boolean) => {
      const m = denseModel();
      const o = adaFisher(m, { lr: LR });
      const buf = new Float32Array(n * 3);
      for (let step = 0; step < 2; step++) {
        let sum: tf.NamedTensorMap | null = null;
        for (let k = 0; k < K; k++) {
          const src = xs.subarray(k * n * 3, (k + 1) * n * 3);
          let xi: tf.Tensor;
          if (reuse) {
            buf.set(src);
            xi = tf.tensor(buf, [n, 3]);
          } else xi = tf.tensor(src.slice(), [n, 3]);
          const yi = tf.slice(Y, k * n, n);
          const { value, grads } = o.computeGradients(loss(m, xi, yi));
          const prev: tf.NamedTensorMap | null = sum;
          sum = tf.tidy(() => Object.fromEntries(Object.keys(grads).map((g) => [g, tf.add(prev?.[g] ?? tf.zeros(grads[g].shape), tf.mul(grads[g], 1 / K))])));
          if (prev) tf.dispose(prev);
          tf.dispose([value, grads, xi, yi]);
        }
        o.applyGradients(sum!);
        tf.dispose(sum!);
      }
      const w = weightsOf(m);
      o.dispose();
      return w;
    };
    const fresh = run(false);
    run(true).forEach((w, i) => expect(Array.from(w), `weight ${i}`).toEqual(Array.from(fresh[i])));
    tf.dispose([X, Y]);
  });

  it('the first step that succeeds fixes the trained variables, not a probe; an empty varList is refused up front', async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    const { x, y } = xy(2);
    const f = loss(m, x, y);
    const empty = await errorOf(() => o.computeGradients(f, []));
    expect(empty).toBeInstanceOf(RangeError);
    expect(empty.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(empty.message).toMatch(/for varList/);
    expect((await errorOf(() => o.minimize(f, false, []))).message).toMatch(/for varList/);
    // fit on a model with every layer frozen passes an empty varList itself: the message says so
    const frozen = denseModel();
    frozen.layers.forEach((l) => (l.trainable = false));
    const fo = adaFisher(frozen, { lr: LR });
    frozen.compile({ optimizer: fo, loss: 'meanSquaredError' });
    expect((await errorOf(() => frozen.fit(x, y, { epochs: 1, verbose: 0 }))).message).toMatch(/model\.fit passes the trainable weights here; does the model have any left unfrozen\?/);
    fo.dispose();
    // a computeGradients that throws inside TF.js fixes nothing
    expect(await errorOf(() => o.computeGradients(() => m.apply(x) as tf.Scalar))).toBeTruthy();
    // a probe of the head only, never applied
    const head = m.layers[1].trainableWeights.map((w) => (w as unknown as { read(): tf.Variable }).read());
    const probe = o.computeGradients(f, head);
    tf.dispose([probe.value, probe.grads]);
    o.clearStatistics();
    expect(o.layerReport().every((r) => r.preconditioned)).toBe(true);
    const g = o.computeGradients(f);
    o.applyGradients(g.grads);
    expect(o.lastStep).toEqual({ applied: true, refreshed: true });
    expect(o.layerReport().every((r) => r.preconditioned)).toBe(true);
    tf.dispose([g.value, g.grads]);
    // and fit still trains everything
    m.compile({ optimizer: o, loss: 'meanSquaredError' });
    await m.fit(x, y, { epochs: 1, verbose: 0 });
    expect(o.steps).toBe(2);
    tf.dispose([x, y]);
    o.dispose();
  });

  it('refuses a gradient of the wrong shape and a variable given twice, naming the entry, before anything changes', async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    const { x, y } = xy(2);
    const { value, grads } = o.computeGradients(loss(m, x, y));
    const k = Object.keys(grads).find((n) => n.endsWith('kernel'))!;
    const before = weightsOf(m);
    const t = tf.transpose(grads[k]);
    const wrong = await errorOf(() => o.applyGradients({ ...grads, [k]: t }));
    expect(wrong).toBeInstanceOf(RangeError);
    expect(wrong.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(wrong.message).toContain(`variableGradients['${k}']`);
    expect(wrong.message).toMatch(/shape \[3,4\]/);
    const arr = Object.entries(grads).map(([name, tensor]) => ({ name, tensor }));
    const twice = await errorOf(() => o.applyGradients([...arr, { name: arr[0].name, tensor: arr[0].tensor }]));
    expect(twice.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(twice.message).toContain(`variableGradients[${arr.length}]`);
    expect(twice.message).toContain('variableGradients[0]');
    expect(o.steps).toBe(0);
    expect(o.pendingStatistics).toBe(1);
    weightsOf(m).forEach((w, i) => expect(Array.from(w)).toEqual(Array.from(before[i])));
    o.applyGradients(grads);
    expect(o.steps).toBe(1);
    tf.dispose([value, grads, t, x, y]);
    o.dispose();
  });

  it("computeGradients without varList trains the attached model only (a GAN's generator in the loss)", async () => {
    const G = tf.sequential({ layers: [tf.layers.dense({ units: 4, inputShape: [2], activation: 'tanh' })] });
    const D = tf.sequential({ name: 'discriminator', layers: [tf.layers.dense({ units: 1, inputShape: [4] })] });
    const r = rng(9);
    const z = tf.tensor(Float32Array.from({ length: 16 }, () => r()), [8, 2]);
    const y = tf.ones([8, 1]);
    const dOpt = adaFisher(D, { lr: LR });
    const f = () => tf.losses.sigmoidCrossEntropy(y, D.apply(G.apply(z)) as tf.Tensor) as tf.Scalar;
    const { value, grads } = dOpt.computeGradients(f);
    expect(Object.keys(grads).sort()).toEqual(D.trainableWeights.map((w) => w.name).sort());
    const gBefore = G.getWeights().map((w) => Array.from(w.dataSync()));
    dOpt.applyGradients(grads);
    expect(dOpt.steps).toBe(1);
    G.getWeights().forEach((w, i) => expect(Array.from(w.dataSync())).toEqual(gBefore[i]));
    tf.dispose(dOpt.minimize(f));
    expect(dOpt.steps).toBe(2);
    // gradients of a foreign variable: the message says what to do
    const raw = tf.variableGrads(f);
    const g2 = dOpt.computeGradients(f);
    const e = await errorOf(() => dOpt.applyGradients(raw.grads));
    expect(e.code).toBe('ADAFISHER_MODEL_MISMATCH');
    expect(e.message).toMatch(/is not a weight of model 'discriminator'.*pass varList.*its own optimizer/);
    expect(e.message).not.toMatch(/after changing which weights are trainable/);
    tf.dispose([value, grads, raw.value, raw.grads, g2.value, g2.grads, z, y]);
    dOpt.dispose();
  });

  it('a minimize whose loss throws keeps the statistics of earlier computeGradients calls', async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    const { x, y } = xy(2);
    const g = o.computeGradients(loss(m, x, y));
    const e = await errorOf(() =>
      o.minimize(() => {
        m.apply(x);
        throw new Error('user loss bug');
      }),
    );
    expect(e.message).toBe('user loss bug');
    expect(o.pendingStatistics).toBe(1);
    o.applyGradients(g.grads);
    expect(o.lastStep).toEqual({ applied: true, refreshed: true });
    tf.dispose([g.value, g.grads, x, y]);
    o.dispose();
  });

  it('shapes that differ at run time: the coded error leaks no tensor and leaves the gradient tape closed', async () => {
    const conv = tf.layers.conv2d({ filters: 2, kernelSize: 3, padding: 'same', name: 'shared_conv' });
    const ins = [0, 1].map(() => tf.input({ shape: [null, null, 1] }));
    const pooled = ins.map((i) => tf.layers.globalAveragePooling2d({}).apply(conv.apply(i)) as tf.SymbolicTensor);
    const h = tf.layers.concatenate().apply(pooled) as tf.SymbolicTensor;
    const model = tf.model({ inputs: ins, outputs: tf.layers.dense({ units: 1 }).apply(h) as tf.SymbolicTensor });
    const opt = adaFisher(model, { lr: LR });
    const y = tf.ones([2, 1]);
    const [a6, a4] = [tf.ones([2, 6, 6, 1]), tf.ones([2, 4, 4, 1])];
    const f = () => tf.losses.meanSquaredError(y, model.apply([a6, a4]) as tf.Tensor) as tf.Scalar;
    const n0 = tf.memory().numTensors;
    for (let k = 0; k < 3; k++) expect((await errorOf(() => opt.computeGradients(f))).code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    expect(tf.memory().numTensors).toBe(n0);
    const state = (tf.engine() as unknown as { state: { activeTape: unknown; gradientDepth: number } }).state;
    expect(state.activeTape == null).toBe(true);
    expect(state.gradientDepth).toBe(0);
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const fitOnce = async () => expect((await errorOf(() => model.fit([a6, a4], y, { epochs: 1, verbose: 0 }))).code).toBe('ADAFISHER_UNSUPPORTED_LAYER');
    await fitOnce(); // the first fit makes TF.js's own lasting tensors
    const n1 = tf.memory().numTensors;
    for (let k = 0; k < 3; k++) await fitOnce();
    // TF.js's fit loop itself keeps one tensor per step whose optimizer throws (tf.train.adam too)
    expect(tf.memory().numTensors - n1).toBeLessThanOrEqual(3);
    expect(opt.pendingStatistics).toBe(0);
    tf.dispose([y, a6, a4]);
    opt.dispose();
  });

  it('says why statistics are missing (cleared, consumed) and names malformed or disposed gradient entries', async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    const { x, y } = xy(2);
    const f = loss(m, x, y);
    let g = o.computeGradients(f);
    o.clearStatistics();
    expect((await errorOf(() => o.applyGradients(g.grads))).message).toMatch(/cleared by clearStatistics\(\)/);
    tf.dispose([g.value, g.grads]);
    g = o.computeGradients(f);
    o.applyGradients(g.grads);
    const again = await errorOf(() => o.applyGradients(g.grads));
    expect(again.code).toBe('ADAFISHER_MISSING_STATISTICS');
    expect(again.message).toMatch(/consumed by an earlier step/);
    tf.dispose([g.value, g.grads]);
    g = o.computeGradients(f);
    tf.dispose(o.minimize(f));
    expect((await errorOf(() => o.applyGradients(g.grads))).message).toMatch(/consumed by a minimize\(\) step/);
    const g2 = o.computeGradients(f);
    const empty = await errorOf(() => o.applyGradients([{}] as unknown as tf.NamedTensorMap));
    expect(empty).toBeInstanceOf(TypeError);
    expect(empty.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(empty.message).toMatch(/variableGradients\[0\]\.name/);
    const name = Object.keys(g2.grads)[0];
    const noTensor = await errorOf(() => o.applyGradients([{ name }] as unknown as tf.NamedTensorMap));
    expect(noTensor.message).toMatch(/variableGradients\[0\]\.tensor/);
    const dead = tf.zerosLike(g2.grads[name]);
    dead.dispose();
    const disposed = await errorOf(() => o.applyGradients({ ...g2.grads, [name]: dead }));
    expect(disposed.code).toBe('ADAFISHER_INVALID_ARGUMENT');
    expect(disposed.message).toContain(`variableGradients['${name}']`);
    expect(disposed.message).toMatch(/disposed/);
    expect(o.pendingStatistics).toBe(1);
    tf.dispose([g.value, g.grads, g2.value, g2.grads, x, y]);
    o.dispose();
  });

  it('warns once per optimizer, code ADAFISHER_PENDING_STATISTICS, when more than 64 computations wait for a step', async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    const { x, y } = xy(2);
    const warnings: (Error & { code?: string })[] = [];
    const onWarning = (w: Error & { code?: string }) => {
      if (w.code === 'ADAFISHER_PENDING_STATISTICS') warnings.push(w);
    };
    process.on('warning', onWarning);
    try {
      const unapplied = async (k: number) => {
        for (let i = 0; i < k; i++) {
          const { value, grads } = o.computeGradients(loss(m, x, y));
          tf.dispose([value, grads]);
        }
        await new Promise((r) => setTimeout(r, 10));
      };
      await unapplied(64);
      expect(warnings.length).toBe(0);
      await unapplied(1);
      expect(warnings.length).toBe(1);
      expect(warnings[0].message).toMatch(/65 computeGradients\(\) calls are waiting.*clearStatistics\(\)/);
      o.clearStatistics();
      await unapplied(70);
      expect(warnings.length).toBe(1);
      expect(o.pendingStatistics).toBe(70);
    } finally {
      process.off('warning', onWarning);
    }
    tf.dispose([x, y]);
    o.dispose();
  });

  it("minimize with only a preconditioned layer's kernel (after the first step): stepped with its statistics, the bias left alone", async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    m.compile({ optimizer: o, loss: 'meanSquaredError' });
    const { x, y } = xy(3);
    await m.fit(x, y, { epochs: 1, batchSize: 8, verbose: 0 });
    const last = m.layers[1] as tf.layers.Layer & { kernel: { read(): tf.Variable }; bias: { read(): tf.Variable } };
    const kernel = last.kernel.read();
    const bias = last.bias.read();
    const before = { kernel: kernel.dataSync().slice(), bias: bias.dataSync().slice(), first: (m.layers[0].getWeights()[0].dataSync() as Float32Array).slice() };
    tf.dispose(o.minimize(loss(m, x, y), true, [kernel]));
    expect(o.lastStep).toEqual({ applied: true, refreshed: true });
    expect(o.steps).toBe(2);
    expect(Array.from(bias.dataSync())).toEqual(Array.from(before.bias));
    expect(Array.from(m.layers[0].getWeights()[0].dataSync())).toEqual(Array.from(before.first));
    expect(Array.from(kernel.dataSync())).not.toEqual(Array.from(before.kernel));
    tf.dispose([x, y]);
    o.dispose();
  });

  it('warns once per optimizer, code ADAFISHER_STEPS_SKIPPED, when the guard skips 10 steps in a row (fit)', async () => {
    const m = denseModel();
    const o = adaFisher(m, { lr: LR });
    m.compile({ optimizer: o, loss: 'meanSquaredError' });
    const good = xy(8);
    const bad = { x: tf.fill([8, 3], NaN), y: tf.ones([8, 1]) };
    const warnings: (Error & { code?: string })[] = [];
    const onWarning = (w: Error & { code?: string }) => {
      if (w.code === 'ADAFISHER_STEPS_SKIPPED') warnings.push(w);
    };
    process.on('warning', onWarning);
    const fit = async (d: { x: tf.Tensor; y: tf.Tensor }, epochs: number) => {
      await m.fit(d.x, d.y, { epochs, batchSize: 8, verbose: 0 });
      await new Promise((r) => setTimeout(r, 10));
    };
    try {
      // 9 skipped, a good step, 9 skipped: never 10 in a row.
      await fit(bad, 9);
      await fit(good, 1);
      expect(o.lastStep?.applied).toBe(true);
      await fit(bad, 9);
      expect(o.lastStep?.applied).toBe(false);
      expect(warnings.length).toBe(0);
      await fit(bad, 1);
      expect(warnings.length).toBe(1);
      expect(warnings[0].message).toMatch(/skipped the last 10 steps.*lower the learning rate \(the step is about lr \/ damping = /);
      await fit(bad, 20);
      expect(warnings.length).toBe(1);
    } finally {
      process.off('warning', onWarning);
    }
    tf.dispose([good.x, good.y, bad.x, bad.y]);
    o.dispose();
  });

  it("skipping a batch whose loss is not finite: with clearStatistics() (the README's pattern) the next good step is taken", () => {
    const run = (clear: boolean) => {
      const m = denseModel();
      const o = adaFisher(m, { lr: LR });
      const good = xy(2);
      const bad = { x: tf.tidy(() => tf.concat([tf.fill([1, 3], NaN), tf.ones([7, 3])])), y: tf.ones([8, 1]) };
      const steps: (boolean | undefined)[] = [];
      for (const { x, y } of [bad, good, good]) {
        const { value, grads } = o.computeGradients(loss(m, x, y));
        if (!Number.isFinite(value.dataSync()[0])) {
          tf.dispose([value, grads]);
          if (clear) o.clearStatistics();
          continue;
        }
        o.applyGradients(grads);
        steps.push(o.lastStep?.applied);
        tf.dispose([value, grads]);
      }
      expect(weightsOf(m).every((w) => w.every(Number.isFinite))).toBe(true);
      tf.dispose([good.x, good.y, bad.x, bad.y]);
      o.dispose();
      return steps;
    };
    expect(run(true)).toEqual([true, true]);
    // without it the skipped batch's statistics join the next step, which the guard skips
    expect(run(false)).toEqual([false, true]);
  });
});

