// Shared test utilities: a seeded RNG, float comparators, state snapshots, model fixtures
// with random statistics, and a driver that steps the real optimizer and the float64
// reference side by side.
import { expect } from 'vitest';

import { AdaFisher, type AdaFisherOptions, type AdaFisherState, type LayerSpec, type Tensor } from '../lib/index.js';
import { convGeometry, ReferenceAdaFisher, referenceGradFactor, referenceInputFactor } from './reference.js';

// ---------------------------------------------------------------------------------------
// Random numbers (mulberry32 + Box-Muller): reproducible across runs and machines.
// ---------------------------------------------------------------------------------------
export class Rng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  uniform(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  normal(): number {
    const u = 1 - this.uniform();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.uniform());
  }
  array(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = scale * this.normal();
    return a;
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.uniform() * (hi - lo + 1));
  }
}

// ---------------------------------------------------------------------------------------
// Comparators.
// ---------------------------------------------------------------------------------------

export interface Tolerance {
  /** Passes when |actual - expected| <= rtol * |expected| ... */
  rtol: number;
  /** ... or when |actual - expected| <= atol. */
  atol: number;
}

/**
 * Element-wise closeness in the spirit of onnxruntime's assertFloatEqual: an element passes
 * on absolute OR relative closeness; NaN (on either side) always fails; the error names the
 * first bad index, both values and how many elements failed.
 */
export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: Tolerance, what: string): void {
  if (actual.length !== expected.length) {
    throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  }
  let first = -1;
  let bad = 0;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i];
    const e = expected[i];
    const d = Math.abs(a - e);
    // Written so that NaN anywhere makes `ok` false.
    const ok = d <= tol.atol || d <= tol.rtol * Math.abs(e);
    if (!ok) {
      bad++;
      if (first < 0) first = i;
    }
  }
  if (bad > 0) {
    const a = actual[first];
    const e = expected[first];
    throw new Error(
      `${what}: ${bad} of ${expected.length} elements differ; first at index ${first}: ` +
        `actual ${a}, expected ${e} (|diff| ${Math.abs(a - e)}, rtol ${tol.rtol}, atol ${tol.atol})`,
    );
  }
}

/** The largest |expected| of an array (to scale an absolute tolerance). */
export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/**
 * Bit-for-bit equality of two float32 arrays (NaN payloads and -0 included); names the first
 * difference. With `anyNaN`, a NaN matches any NaN: for what went through a JavaScript number
 * (a JSON checkpoint), which keeps NaN but not its payload (a GPU's NaN is 0x7fffffff, the
 * one a Float32Array gets back from NaN is 0x7fc00000).
 */
export function assertBitIdentical(actual: Float32Array, expected: Float32Array, what: string, anyNaN = false): void {
  if (actual.length !== expected.length) throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  const a = new Uint32Array(actual.buffer, actual.byteOffset, actual.length);
  const e = new Uint32Array(expected.buffer, expected.byteOffset, expected.length);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== e[i] && !(anyNaN && Number.isNaN(actual[i]) && Number.isNaN(expected[i]))) {
      throw new Error(`${what}: differs at index ${i}: actual ${actual[i]} (0x${a[i].toString(16)}), expected ${expected[i]} (0x${e[i].toString(16)})`);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Snapshots: parameters + the whole exported state, compared bit for bit.
// ---------------------------------------------------------------------------------------

export function hostCopy(t: Tensor): Float32Array {
  return t instanceof Float32Array ? t.slice() : t.download();
}

export interface Snapshot {
  params: Float32Array[];
  state: AdaFisherState;
}

export function snapshot(opt: AdaFisher, params: readonly Tensor[]): Snapshot {
  return { params: params.map(hostCopy), state: opt.exportState() };
}

export function assertSnapshotsIdentical(actual: Snapshot, expected: Snapshot, what = 'snapshot'): void {
  expect(actual.params.length, `${what}: number of params`).toBe(expected.params.length);
  actual.params.forEach((p, i) => assertBitIdentical(p, expected.params[i], `${what}: params[${i}]`));
  assertStatesIdentical(actual.state, expected.state, what);
}

export function assertStatesIdentical(
  actual: AdaFisherState,
  expected: AdaFisherState,
  what = 'state',
  anyNaN = false,
): void {
  expect(actual.steps, `${what}: steps`).toBe(expected.steps);
  expect(actual.stepCounts, `${what}: stepCounts`).toEqual(expected.stepCounts);
  expect(actual.hyperparameters, `${what}: hyperparameters`).toEqual(expected.hyperparameters);
  expect(actual.tensors, `${what}: tensors`).toEqual(expected.tensors);
  expect(actual.momenta.length, `${what}: momenta`).toBe(expected.momenta.length);
  actual.momenta.forEach((m, i) => assertBitIdentical(m, expected.momenta[i], `${what}: momenta[${i}]`, anyNaN));
  expect(actual.factors.map((f) => f.layer), `${what}: factor layers`).toEqual(expected.factors.map((f) => f.layer));
  actual.factors.forEach((f, i) => {
    assertBitIdentical(f.H, expected.factors[i].H, `${what}: factors[${i}].H`, anyNaN);
    assertBitIdentical(f.S, expected.factors[i].S, `${what}: factors[${i}].S`, anyNaN);
  });
}

// ---------------------------------------------------------------------------------------
// Model fixtures.
// ---------------------------------------------------------------------------------------

/** The parameter tensors of a spec list, in step() order. */
export function paramsOf(specs: readonly LayerSpec[]): Tensor[] {
  const out: Tensor[] = [];
  for (const s of specs) {
    if (s.kind === 'param') out.push(s.param);
    else {
      out.push(s.weight);
      if (s.bias !== undefined && s.bias !== null) out.push(s.bias);
    }
  }
  return out;
}

/** A layer's statistics for one step: its input and its output gradient, with shapes. */
export interface LayerStats {
  input: Float32Array;
  inputShape: number[];
  grad: Float32Array;
  gradShape: number[];
}

/** The output-gradient shape of a layer for a given input shape. */
export function outputShape(spec: LayerSpec, inputShape: readonly number[]): number[] {
  switch (spec.kind) {
    case 'linear':
      return [...inputShape.slice(0, -1), spec.outFeatures];
    case 'conv2d': {
      const nhwc = spec.dataFormat === 'NHWC';
      const [N, H, W] = nhwc ? [inputShape[0], inputShape[1], inputShape[2]] : [inputShape[0], inputShape[2], inputShape[3]];
      const k = typeof spec.kernelSize === 'number' ? [spec.kernelSize, spec.kernelSize] : spec.kernelSize;
      const s = spec.stride === undefined ? [1, 1] : typeof spec.stride === 'number' ? [spec.stride, spec.stride] : spec.stride;
      const g = convGeometry(H, W, k as [number, number], s as [number, number], spec.padding);
      return nhwc ? [N, g.outH, g.outW, spec.outChannels] : [N, spec.outChannels, g.outH, g.outW];
    }
    default:
      return [...inputShape];
  }
}

const numel = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

/** Random statistics for every preconditioned layer (undefined for 'param' layers). */
export function randomStats(
  rng: Rng,
  specs: readonly LayerSpec[],
  inputShapes: readonly (number[] | undefined)[],
  scale = { input: 1, grad: 1 },
): (LayerStats | undefined)[] {
  return specs.map((spec, i) => {
    if (spec.kind === 'param') return undefined;
    const inputShape = inputShapes[i]!;
    const gradShape = outputShape(spec, inputShape);
    return {
      input: rng.array(numel(inputShape), scale.input),
      inputShape,
      grad: rng.array(numel(gradShape), scale.grad),
      gradShape,
    };
  });
}

export function recordStats(opt: AdaFisher, stats: readonly (LayerStats | undefined)[]): void {
  stats.forEach((s, i) => {
    if (s === undefined) return;
    opt.recordInput(i, s.input, s.inputShape);
    opt.recordOutputGrad(i, s.grad, s.gradShape);
  });
}

export function referenceFactors(specs: readonly LayerSpec[], stats: readonly (LayerStats | undefined)[]) {
  return stats.map((s, i) =>
    s === undefined ? undefined : { H: referenceInputFactor(specs[i], s.input, s.inputShape), S: referenceGradFactor(specs[i], s.grad, s.gradShape) },
  );
}

export interface ReferenceTolerances {
  params: Tolerance;
  /** atol is this times max |expected momentum| of the tensor. */
  momenta: { rtol: number; atolScale: number };
  factors: Tolerance;
}

/**
 * Parameters: 1e-5 relative (and 1e-6 absolute for elements that pass near zero).
 * Momenta: 1e-5 relative, or 1e-6 of the tensor's largest momentum (beta*m and
 * (1-beta)*g can cancel, leaving elements whose own relative error is meaningless).
 * Running factors live in [0, 1]; 1e-5 relative or 1e-6 absolute.
 */
export const DEFAULT_TOLERANCES: ReferenceTolerances = {
  params: { rtol: 1e-5, atol: 1e-6 },
  momenta: { rtol: 1e-5, atolScale: 1e-6 },
  factors: { rtol: 1e-5, atol: 1e-6 },
};

/** Compares the optimizer's parameters and every state buffer with the float64 reference. */
export function compareWithReference(
  opt: AdaFisher,
  params: readonly Tensor[],
  ref: ReferenceAdaFisher,
  what: string,
  tol: ReferenceTolerances = DEFAULT_TOLERANCES,
): void {
  const state = opt.exportState();
  expect(state.steps, `${what}: steps`).toBe(ref.steps);
  expect(state.stepCounts, `${what}: stepCounts`).toEqual(ref.stepCounts);
  params.forEach((p, i) => assertClose(hostCopy(p), ref.params[i], tol.params, `${what}: params[${i}]`));
  state.momenta.forEach((m, i) =>
    assertClose(m, ref.momenta[i], { rtol: tol.momenta.rtol, atol: tol.momenta.atolScale * maxAbs(ref.momenta[i]) }, `${what}: momenta[${i}]`),
  );
  for (const f of state.factors) {
    const r = ref.factors[f.layer];
    expect(r, `${what}: reference factors of layer ${f.layer}`).toBeDefined();
    assertClose(f.H, r!.H, tol.factors, `${what}: layers[${f.layer}].H`);
    assertClose(f.S, r!.S, tol.factors, `${what}: layers[${f.layer}].S`);
  }
  expect(state.factors.length, `${what}: number of factor entries`).toBe(ref.factors.filter((f) => f !== undefined).length);
}

export interface ReferenceRun {
  specs: LayerSpec[];
  options: AdaFisherOptions;
  /** Input shape of each preconditioned layer (undefined for 'param'). */
  inputShapes: (number[] | undefined)[];
  steps: number;
  seed: number;
  /** Which gradients are null at a given step (default: none). */
  nullGrad?: (step: number, tensor: number) => boolean;
  statScale?: { input: number; grad: number };
  tolerances?: ReferenceTolerances;
}

/** Steps the real optimizer and the float64 reference together, comparing after every step. */
export function runAgainstReference(run: ReferenceRun): { opt: AdaFisher; ref: ReferenceAdaFisher } {
  const rng = new Rng(run.seed);
  const ref = new ReferenceAdaFisher(run.specs, run.options);
  const opt = new AdaFisher(run.specs, run.options);
  const params = paramsOf(run.specs);
  try {
    for (let t = 0; t < run.steps; t++) {
      expect(opt.willRefreshFactors, `step ${t}: willRefreshFactors`).toBe(ref.willRefresh);
      let fresh: ReturnType<typeof referenceFactors> = [];
      if (ref.willRefresh) {
        const stats = randomStats(rng, run.specs, run.inputShapes, run.statScale);
        recordStats(opt, stats);
        fresh = referenceFactors(run.specs, stats);
      }
      const grads = params.map((p, i) => (run.nullGrad?.(t, i) ? null : rng.array(p.length)));
      const result = opt.step(grads);
      expect(result, `step ${t}`).toEqual({ applied: true, refreshed: ref.willRefresh });
      ref.step(fresh, grads);
      compareWithReference(opt, params, ref, `step ${t}`, run.tolerances);
    }
  } catch (e) {
    opt.dispose();
    throw e;
  }
  return { opt, ref };
}

/** Runs fn, expecting it to throw; checks class, message and code, and returns the error. */
export function expectThrows(
  fn: () => unknown,
  expected: { cls: new (...a: never[]) => Error; message: RegExp; code?: string },
): Error & { code?: string } {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown, 'expected the call to throw').toBeDefined();
  const err = thrown as Error & { code?: string };
  expect(err).toBeInstanceOf(expected.cls);
  // A RangeError/TypeError is also an Error: demand the exact class.
  expect(err.constructor.name).toBe(expected.cls.name);
  expect(err.message).toMatch(expected.message);
  if (expected.code !== undefined) expect(err.code).toBe(expected.code);
  return err;
}
