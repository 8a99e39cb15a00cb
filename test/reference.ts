// A float64 re-implementation of docs/ALGORITHM.md, written from the page and not
// from lib/ or native/: the factor reductions of every layer kind, the min-max
// normalization + EMA of the running factors, and the AdaFisher / AdaFisherW step with
// per-parameter bias correction. Deliberately naive (explicit loops over every patch
// position, no im2col tricks) so that it is easy to check against the page by eye.
import type { AdaFisherOptions, LayerSpec, Padding } from '../lib/index.js';

export type Num = ArrayLike<number>;

const prod = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

// ---------------------------------------------------------------------------------------
// Per layer kind: the two fresh (not yet normalized) diagonal factors.
// ---------------------------------------------------------------------------------------

/** Linear: H[k] = mean over all leading positions of a[., k]^2, plus H[in] = 1 with a bias. */
export function linearH(a: Num, shape: readonly number[], inF: number, hasBias: boolean): Float64Array {
  if (shape[shape.length - 1] !== inF) throw new Error(`reference linearH: last dim ${shape.at(-1)} != ${inF}`);
  const M = prod(shape) / inF;
  const H = new Float64Array(inF + (hasBias ? 1 : 0));
  for (let m = 0; m < M; m++) for (let k = 0; k < inF; k++) H[k] += a[m * inF + k] ** 2;
  for (let k = 0; k < inF; k++) H[k] /= M;
  if (hasBias) H[inF] = 1;
  return H;
}

/** Linear: S[o] = mean over all leading positions of g[., o]^2. */
export function linearS(g: Num, shape: readonly number[], outF: number): Float64Array {
  const M = prod(shape) / outF;
  const S = new Float64Array(outF);
  for (let m = 0; m < M; m++) for (let o = 0; o < outF; o++) S[o] += g[m * outF + o] ** 2;
  for (let o = 0; o < outF; o++) S[o] /= M;
  return S;
}

export interface ConvGeometry {
  outH: number;
  outW: number;
  top: number;
  left: number;
}

/** Output size and leading padding; 'same' follows TensorFlow (out = ceil(in/stride), extra row/col at the end). */
export function convGeometry(
  height: number,
  width: number,
  kernel: [number, number],
  stride: [number, number],
  padding: Padding | undefined,
): ConvGeometry {
  const [kh, kw] = kernel;
  const [sh, sw] = stride;
  if (padding === 'same') {
    const outH = Math.ceil(height / sh);
    const outW = Math.ceil(width / sw);
    const totalH = Math.max((outH - 1) * sh + kh - height, 0);
    const totalW = Math.max((outW - 1) * sw + kw - width, 0);
    return { outH, outW, top: Math.floor(totalH / 2), left: Math.floor(totalW / 2) };
  }
  let t = 0;
  let b = 0;
  let l = 0;
  let r = 0;
  if (typeof padding === 'number') t = b = l = r = padding;
  else if (Array.isArray(padding) && padding.length === 2) [t, b, l, r] = [padding[0], padding[0], padding[1], padding[1]];
  else if (Array.isArray(padding) && padding.length === 4) [t, b, l, r] = padding;
  return {
    outH: Math.floor((height + t + b - kh) / sh) + 1,
    outW: Math.floor((width + l + r - kw) / sw) + 1,
    top: t,
    left: l,
  };
}

export interface ConvSpec {
  inChannels: number;
  outChannels: number;
  kernelSize: number | [number, number];
  stride?: number | [number, number];
  padding?: Padding;
  groups?: number;
  dataFormat?: 'NCHW' | 'NHWC';
  layout?: 'pytorch' | 'tfjs';
}

const pair = (v: number | [number, number] | undefined, d: number): [number, number] =>
  v === undefined ? [d, d] : typeof v === 'number' ? [v, v] : v;

/** Conv2d: mean square of each im2col column (patch order (c,i,j) for 'pytorch', (i,j,c) for 'tfjs'), plus H[K] = groups. */
export function conv2dH(a: Num, shape: readonly number[], spec: ConvSpec, hasBias: boolean): Float64Array {
  const nhwc = spec.dataFormat === 'NHWC';
  const [N, C, Hh, W] = nhwc ? [shape[0], shape[3], shape[1], shape[2]] : [shape[0], shape[1], shape[2], shape[3]];
  if (C !== spec.inChannels) throw new Error('reference conv2dH: channel mismatch');
  const [kh, kw] = pair(spec.kernelSize, 1);
  const [sh, sw] = pair(spec.stride, 1);
  const groups = spec.groups ?? 1;
  const cg = C / groups;
  const K = cg * kh * kw;
  const geo = convGeometry(Hh, W, [kh, kw], [sh, sw], spec.padding);
  const at = (n: number, c: number, y: number, x: number) =>
    nhwc ? a[((n * Hh + y) * W + x) * C + c] : a[((n * C + c) * Hh + y) * W + x];
  const H = new Float64Array(K + (hasBias ? 1 : 0));
  for (let n = 0; n < N; n++) {
    for (let c = 0; c < C; c++) {
      const cp = c % cg;
      for (let oh = 0; oh < geo.outH; oh++) {
        for (let ow = 0; ow < geo.outW; ow++) {
          for (let i = 0; i < kh; i++) {
            const y = oh * sh + i - geo.top;
            if (y < 0 || y >= Hh) continue;
            for (let j = 0; j < kw; j++) {
              const x = ow * sw + j - geo.left;
              if (x < 0 || x >= W) continue;
              const k = spec.layout === 'tfjs' ? (i * kw + j) * cg + cp : cp * kh * kw + i * kw + j;
              H[k] += at(n, c, y, x) ** 2;
            }
          }
        }
      }
    }
  }
  const count = N * geo.outH * geo.outW;
  for (let k = 0; k < K; k++) H[k] /= count;
  if (hasBias) H[K] = groups;
  return H;
}

/** Conv2d: S[o] = mean over (n, oh, ow) of g^2. */
export function conv2dS(g: Num, shape: readonly number[], outC: number, dataFormat: 'NCHW' | 'NHWC' = 'NCHW'): Float64Array {
  const nhwc = dataFormat === 'NHWC';
  const [N, C, OH, OW] = nhwc ? [shape[0], shape[3], shape[1], shape[2]] : [shape[0], shape[1], shape[2], shape[3]];
  if (C !== outC) throw new Error('reference conv2dS: channel mismatch');
  const S = new Float64Array(C);
  for (let n = 0; n < N; n++)
    for (let c = 0; c < C; c++)
      for (let y = 0; y < OH; y++)
        for (let x = 0; x < OW; x++) S[c] += (nhwc ? g[((n * OH + y) * OW + x) * C + c] : g[((n * C + c) * OH + y) * OW + x]) ** 2;
  for (let c = 0; c < C; c++) S[c] /= N * OH * OW;
  return S;
}

/** Channel sums of a BatchNorm input/gradient: rank 2 [N, C], rank 4 NCHW or NHWC. Returns [sums, N, P]. */
function channelSums(x: Num, shape: readonly number[], C: number, dataFormat: 'NCHW' | 'NHWC'): [Float64Array, number, number] {
  const N = shape[0];
  const sums = new Float64Array(C);
  if (shape.length === 2) {
    for (let n = 0; n < N; n++) for (let c = 0; c < C; c++) sums[c] += x[n * C + c];
    return [sums, N, 1];
  }
  const P = shape.length === 4 ? prod(shape) / (N * C) : NaN;
  for (let n = 0; n < N; n++)
    for (let c = 0; c < C; c++)
      for (let p = 0; p < P; p++) sums[c] += dataFormat === 'NHWC' ? x[(n * P + p) * C + c] : x[(n * C + c) * P + p];
  return [sums, N, P];
}

/** BatchNorm: u[c] = sum a / P^2; H = [sum u^2, C] / N^2. */
export function batchnormH(a: Num, shape: readonly number[], C: number, dataFormat: 'NCHW' | 'NHWC' = 'NCHW'): Float64Array {
  const [sums, N, P] = channelSums(a, shape, C, dataFormat);
  let total = 0;
  for (let c = 0; c < C; c++) total += (sums[c] / (P * P)) ** 2;
  return Float64Array.of(total / (N * N), C / (N * N));
}

/** BatchNorm: S[c] = (sum g)^2 / N. */
export function batchnormS(g: Num, shape: readonly number[], C: number, dataFormat: 'NCHW' | 'NHWC' = 'NCHW'): Float64Array {
  const [sums, N] = channelSums(g, shape, C, dataFormat);
  return sums.map((s) => (s * s) / N);
}

/** LayerNorm: axis 1 kept; u[t] = sum over the other axes / Q^2 (Q = reduced sizes except axis 0); H = [sum u^2, T] / N^2. */
export function layernormH(a: Num, shape: readonly number[]): Float64Array {
  const N = shape[0];
  const T = shape[1];
  const Q = prod(shape.slice(2));
  const u = new Float64Array(T);
  for (let n = 0; n < N; n++) for (let t = 0; t < T; t++) for (let q = 0; q < Q; q++) u[t] += a[(n * T + t) * Q + q];
  let total = 0;
  for (let t = 0; t < T; t++) total += (u[t] / (Q * Q)) ** 2;
  return Float64Array.of(total / (N * N), T / (N * N));
}

/** LayerNorm: S[d] = (sum over all axes but the last of g)^2 / N. */
export function layernormS(g: Num, shape: readonly number[], D: number): Float64Array {
  const rows = prod(shape) / D;
  const S = new Float64Array(D);
  for (let r = 0; r < rows; r++) for (let d = 0; d < D; d++) S[d] += g[r * D + d];
  return S.map((s) => (s * s) / shape[0]);
}

/** The fresh H of any supported layer, from its input. */
export function referenceInputFactor(spec: LayerSpec, a: Num, shape: readonly number[]): Float64Array {
  const hasBias = 'bias' in spec && spec.bias !== undefined && spec.bias !== null;
  switch (spec.kind) {
    case 'linear':
      return linearH(a, shape, spec.inFeatures, hasBias);
    case 'conv2d':
      return conv2dH(a, shape, spec, hasBias);
    case 'batchnorm':
      return batchnormH(a, shape, spec.channels, spec.dataFormat);
    case 'layernorm':
      return layernormH(a, shape);
    default:
      throw new Error(`reference: no factors for kind ${spec.kind}`);
  }
}

/** The fresh S of any supported layer, from its output gradient. */
export function referenceGradFactor(spec: LayerSpec, g: Num, shape: readonly number[]): Float64Array {
  switch (spec.kind) {
    case 'linear':
      return linearS(g, shape, spec.outFeatures);
    case 'conv2d':
      return conv2dS(g, shape, spec.outChannels, spec.dataFormat);
    case 'batchnorm':
      return batchnormS(g, shape, spec.channels, spec.dataFormat);
    case 'layernorm':
      return layernormS(g, shape, spec.features);
    default:
      throw new Error(`reference: no factors for kind ${spec.kind}`);
  }
}

// ---------------------------------------------------------------------------------------
// Normalize, then average.
// ---------------------------------------------------------------------------------------

/** +inf -> 1, -inf -> 0, then (x - min) / (max - min + 1e-6). */
export function normalizeFactor(x: Num): Float64Array {
  const c = Float64Array.from(x, (v) => (v === Infinity ? 1 : v === -Infinity ? 0 : v));
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of c) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  return c.map((v) => (v - lo) / (hi - lo + 1e-6));
}

/** R <- decay * R + mix * normalize(x), in place. */
export function emaFactor(running: Float64Array, fresh: Num, decay: number, mix: number): void {
  const n = normalizeFactor(fresh);
  for (let i = 0; i < running.length; i++) running[i] = decay * running[i] + mix * n[i];
}

// ---------------------------------------------------------------------------------------
// The optimizer.
// ---------------------------------------------------------------------------------------

export interface ReferenceHyper {
  lr: number;
  beta: number;
  damping: number;
  decay: number;
  mix: number;
  tcov: number;
  weightDecay: number;
  decoupled: boolean;
}

/** Defaults of ALGORITHM.md (gamma 0.8 -> decay 0.08, mix 0.008; tcov 1). */
export function referenceHyper(o: AdaFisherOptions = {}): ReferenceHyper {
  const gamma = o.gamma ?? 0.8;
  return {
    lr: o.lr ?? 1e-3,
    beta: o.beta ?? 0.9,
    damping: o.damping ?? 1e-3,
    decay: o.decay ?? gamma / 10,
    mix: o.mix ?? gamma / 100,
    tcov: o.tcov ?? 1,
    weightDecay: o.weightDecay ?? 0,
    decoupled: o.decoupled ?? false,
  };
}

interface RefTensor {
  layer: number;
  role: 'weight' | 'bias' | 'param';
  out: number;
  K: number;
  layout: 'pytorch' | 'tfjs';
  norm: boolean;
}

/** The K of a layer's weight viewed as [out, K] (norm layers: [C, 1]). */
function layerK(spec: LayerSpec): number {
  switch (spec.kind) {
    case 'linear':
      return spec.inFeatures;
    case 'conv2d': {
      const [kh, kw] = pair(spec.kernelSize, 1);
      return (spec.inChannels / (spec.groups ?? 1)) * kh * kw;
    }
    default:
      return 1;
  }
}

function layerOut(spec: LayerSpec): number {
  switch (spec.kind) {
    case 'linear':
      return spec.outFeatures;
    case 'conv2d':
      return spec.outChannels;
    case 'batchnorm':
      return spec.channels;
    case 'layernorm':
      return spec.features;
    default:
      return 0;
  }
}

function hostValues(t: unknown): Float64Array {
  if (t instanceof Float32Array) return Float64Array.from(t);
  return Float64Array.from((t as { download(): Float32Array }).download());
}

/**
 * AdaFisher in float64 over the same LayerSpec list the real optimizer takes. The initial
 * parameters are copied from the specs' tensors at construction.
 */
export class ReferenceAdaFisher {
  readonly hyper: ReferenceHyper;
  readonly tensors: RefTensor[] = [];
  readonly params: Float64Array[] = [];
  readonly momenta: Float64Array[] = [];
  readonly stepCounts: number[] = [];
  /** Running factors per layer index (undefined for 'param' layers). */
  readonly factors: ({ H: Float64Array; S: Float64Array } | undefined)[] = [];
  steps = 0;

  constructor(specs: readonly LayerSpec[], options: AdaFisherOptions = {}) {
    this.hyper = referenceHyper(options);
    specs.forEach((spec, layer) => {
      if (spec.kind === 'param') {
        this.add({ layer, role: 'param', out: 0, K: 0, layout: 'pytorch', norm: false }, spec.param);
        this.factors.push(undefined);
        return;
      }
      const K = layerK(spec);
      const out = layerOut(spec);
      const hasBias = spec.bias !== undefined && spec.bias !== null;
      const norm = spec.kind === 'batchnorm' || spec.kind === 'layernorm';
      const layout = 'layout' in spec && spec.layout === 'tfjs' ? 'tfjs' : 'pytorch';
      this.add({ layer, role: 'weight', out, K, layout, norm }, spec.weight);
      if (hasBias) this.add({ layer, role: 'bias', out, K, layout, norm }, spec.bias);
      this.factors.push({ H: new Float64Array(K + (hasBias || norm ? 1 : 0)).fill(1), S: new Float64Array(out).fill(1) });
    });
  }

  private add(t: RefTensor, values: unknown): void {
    this.tensors.push(t);
    const p = hostValues(values);
    this.params.push(p);
    this.momenta.push(new Float64Array(p.length));
    this.stepCounts.push(0);
  }

  get willRefresh(): boolean {
    return this.steps % this.hyper.tcov === 0;
  }

  /** F of element e of tensor t. */
  private fisher(t: RefTensor, e: number): number {
    if (t.role === 'param') return 1;
    const { H, S } = this.factors[t.layer]!;
    let o: number;
    let k: number;
    if (t.role === 'bias') {
      o = e;
      k = t.K; // the bias entry; H[1] for norm layers (K = 1)
    } else if (t.norm) {
      o = e;
      k = 0;
    } else if (t.layout === 'tfjs') {
      o = e % t.out;
      k = Math.floor(e / t.out);
    } else {
      o = Math.floor(e / t.K);
      k = e % t.K;
    }
    return S[o] * H[k] + this.hyper.damping;
  }

  /**
   * One step. `fresh[layer]` are the raw (unnormalized) factors of that layer, needed on
   * refreshing steps; `grads[t]` null leaves tensor t (and its step counter) untouched.
   */
  step(fresh: readonly ({ H: Num; S: Num } | undefined)[], grads: readonly (Num | null)[]): void {
    const h = this.hyper;
    if (this.willRefresh) {
      this.factors.forEach((f, layer) => {
        if (f === undefined) return;
        const x = fresh[layer];
        if (x === undefined) throw new Error(`reference: refreshing step without statistics for layer ${layer}`);
        emaFactor(f.H, x.H, h.decay, h.mix);
        emaFactor(f.S, x.S, h.decay, h.mix);
      });
    }
    this.tensors.forEach((t, i) => {
      const g = grads[i];
      if (g === null || g === undefined) return;
      const p = this.params[i];
      const m = this.momenta[i];
      const count = ++this.stepCounts[i];
      const bc = 1 - h.beta ** count;
      for (let e = 0; e < p.length; e++) {
        const F = this.fisher(t, e);
        if (h.decoupled) {
          m[e] = h.beta * m[e] + (1 - h.beta) * g[e];
          p[e] = p[e] - h.lr * (m[e] / (bc * F) + h.weightDecay * p[e]);
        } else {
          const gd = g[e] + h.weightDecay * p[e];
          m[e] = h.beta * m[e] + (1 - h.beta) * gd;
          p[e] = p[e] - (h.lr / bc) * (m[e] / F);
        }
      }
    });
    this.steps++;
  }
}
