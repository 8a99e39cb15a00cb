// The framework-agnostic AdaFisher optimizer: validates a model description and the
// hyperparameters once, builds the native plan, and drives one native step per call.
import { isFloat32Array } from 'node:util/types';

import {
  binding,
  DataFormat,
  FactorWhich,
  LayerKind,
  PadMode,
  TensorRole,
  UpdateRule,
  WeightLayout,
  type NativeBackendName,
  type NativeFactorRecord,
  type NativeLayer,
  type NativeOptimizer,
  type NativeTensor,
} from './binding.js';
import { BACKEND_NAMES, resolveBackend, type BackendName, type DeviceBuffer } from './backend.js';
import { codedError, ErrorCodes, rangeError, typeError, unknownKeyError } from './errors.js';
import { checkBoolean, checkFloat32, checkInteger, checkOneOf, checkPair, checkRange, checkShape, fastShape } from './validate.js';

/** A parameter, gradient or activation: a Float32Array (zero-copy on cpu) or a DeviceBuffer. */
export type Tensor = Float32Array | DeviceBuffer;

export type WeightLayoutName = 'pytorch' | 'tfjs';
export type DataFormatName = 'NCHW' | 'NHWC';
/** 'valid', 'same' (TensorFlow: extra row/column at the end), p, [ph, pw] or [top, bottom, left, right]. */
export type Padding = 'valid' | 'same' | number | [number, number] | [number, number, number, number];

export interface LinearLayer {
  kind: 'linear';
  inFeatures: number;
  outFeatures: number;
  /** [out, in] ('pytorch', default) or [in, out] ('tfjs'). */
  weight: Tensor;
  bias?: Tensor | null | undefined;
  layout?: WeightLayoutName | undefined;
}

export interface Conv2dLayer {
  kind: 'conv2d';
  inChannels: number;
  outChannels: number;
  kernelSize: number | [number, number];
  stride?: number | [number, number] | undefined;
  padding?: Padding | undefined;
  groups?: number | undefined;
  /** Layout of the layer input and output gradient; default 'NCHW'. */
  dataFormat?: DataFormatName | undefined;
  /** [out, in/groups, kh, kw] ('pytorch', default) or [kh, kw, in, out] ('tfjs'). */
  weight: Tensor;
  bias?: Tensor | null | undefined;
  layout?: WeightLayoutName | undefined;
}

export interface BatchNormLayer {
  kind: 'batchnorm';
  channels: number;
  weight: Tensor;
  bias?: Tensor | null | undefined;
  /** Channel axis: 1 ('NCHW', default) or last ('NHWC'); rank-2 inputs are [N, C] either way. */
  dataFormat?: DataFormatName | undefined;
}

export interface LayerNormLayer {
  kind: 'layernorm';
  /** Size of the normalized (last) axis. */
  features: number;
  weight: Tensor;
  bias?: Tensor | null | undefined;
}

/** A parameter of no supported layer: plain momentum (F = 1). */
export interface ParamLayer {
  kind: 'param';
  param: Tensor;
}

export type LayerSpec = LinearLayer | Conv2dLayer | BatchNormLayer | LayerNormLayer | ParamLayer;

/** One layer's statistics for AdaFisher.recordFactors: its input and/or its output gradient. */
export interface FactorRecord {
  /** Index into the layer list. */
  layer: number;
  /** The layer's input, as for recordInput, with its shape. */
  input?: Tensor | undefined;
  inputShape?: readonly number[] | undefined;
  /** The layer's output (pre-activation) gradient, as for recordOutputGrad, with its shape. */
  outputGrad?: Tensor | undefined;
  outputGradShape?: readonly number[] | undefined;
}

export interface AdaFisherOptions {
  /** Learning rate, >= 0. Default 1e-3. */
  lr?: number | undefined;
  /** Momentum coefficient in [0, 1). Default 0.9. */
  beta?: number | undefined;
  /** Damping λ > 0 added to the Fisher diagonal. Default 1e-3. */
  damping?: number | undefined;
  /** EMA parameter γ in [0, 1): decay = γ/10, mix = γ/100 (official form). Default 0.8. */
  gamma?: number | undefined;
  /**
   * Explicit EMA coefficients (the paper's γ1, γ2): R ← decay·R + mix·x'. Given together, and
   * instead of gamma (gamma with either is a RangeError).
   */
  decay?: number | undefined;
  mix?: number | undefined;
  /** Refresh the factors every tcov steps (integer >= 1). Default 1. */
  tcov?: number | undefined;
  /** Weight decay >= 0: L2 (AdaFisher) or decoupled (AdaFisherW). Default 0. */
  weightDecay?: number | undefined;
  /** true: AdaFisherW (decoupled weight decay). Default false. */
  decoupled?: boolean | undefined;
  /** 'auto' (default: ADAFISHER_BACKEND, else cuda when usable, else cpu), 'cpu' or 'cuda'. */
  backend?: BackendName | undefined;
  /**
   * Skip a step, changing nothing, when a gradient is NaN/±Inf or a fresh statistic is NaN
   * (a statistic's ±Inf is cleaned to 1 / 0 as in the official code). Default true.
   */
  nonFiniteGuard?: boolean | undefined;
}

/** The resolved hyperparameters (what a checkpoint records). */
export interface AdaFisherHyperparameters {
  lr: number;
  beta: number;
  damping: number;
  decay: number;
  mix: number;
  tcov: number;
  weightDecay: number;
  decoupled: boolean;
  nonFiniteGuard: boolean;
}

export interface StepResult {
  /** false when the non-finite guard skipped the step (nothing changed). */
  applied: boolean;
  /** true when this step refreshed the running factors. */
  refreshed: boolean;
}

/** The full optimizer state; see exportState(). */
export interface AdaFisherState {
  format: 'adafisher-state';
  version: 1;
  hyperparameters: AdaFisherHyperparameters;
  /** One entry per parameter tensor, in step() order. */
  tensors: { numel: number; layer: number; role: 'weight' | 'bias' }[];
  /**
   * Each layer of the model the state belongs to, as a one-line description (kind, sizes,
   * geometry, layout, data format): loadState refuses a state whose layers differ (a
   * 'pytorch' weight's momenta loaded into a 'tfjs' one would be transposed). Optional when
   * loading: states exported before it existed carry none.
   */
  layers?: string[];
  /** Optimizer steps applied (drives the tcov cadence). */
  steps: number;
  /** Per tensor: steps applied to it (drives bias correction). */
  stepCounts: number[];
  momenta: Float32Array[];
  /** Running factors of each preconditioned layer (index into the layer list). */
  factors: { layer: number; H: Float32Array; S: Float32Array }[];
}

/** The parameter tensors of a model description, in the order step() takes gradients. */
export interface ParameterSlot {
  layer: number;
  role: 'weight' | 'bias' | 'param';
}

// The native side's limits (native/optimizer_wrap.cc), checked here so that the error names
// the user's own argument: a conv window's kernel, stride and padding, and tcov.
const MAX_WINDOW = 65536;
const MAX_TCOV = 2 ** 40;

export function resolveHyperparameters(options: AdaFisherOptions): AdaFisherHyperparameters {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) throw typeError('options', 'an object', options);
  const known = new Set(['lr', 'beta', 'damping', 'gamma', 'decay', 'mix', 'tcov', 'weightDecay', 'decoupled', 'backend', 'nonFiniteGuard']);
  for (const key of Object.keys(options)) {
    if (!known.has(key)) throw unknownKeyError(`options.${key}`, `a known option (${[...known].join(', ')})`, key);
  }
  // Every number the kernels take as float32 must fit in one (1e39 would be +Infinity there).
  const lr = options.lr === undefined ? 1e-3 : checkFloat32('options.lr', checkRange('options.lr', options.lr, 0, Infinity));
  const beta = options.beta === undefined ? 0.9 : checkRange('options.beta', options.beta, 0, 1, { hiOpen: true });
  const damping =
    options.damping === undefined
      ? 1e-3
      : checkFloat32('options.damping', checkRange('options.damping', options.damping, 0, Infinity, { loOpen: true }), true);
  let decay: number;
  let mix: number;
  if (options.decay !== undefined || options.mix !== undefined) {
    if (options.gamma !== undefined) throw rangeError('options.gamma', 'gamma or decay/mix, not both', options.gamma);
    if (options.decay === undefined || options.mix === undefined) {
      throw rangeError(options.decay === undefined ? 'options.decay' : 'options.mix', 'decay and mix given together', undefined);
    }
    decay = checkRange('options.decay', options.decay, 0, 1);
    mix = checkFloat32('options.mix', checkRange('options.mix', options.mix, 0, Infinity));
  } else {
    const gamma = options.gamma === undefined ? 0.8 : checkRange('options.gamma', options.gamma, 0, 1, { hiOpen: true });
    decay = gamma / 10;
    mix = gamma / 100;
  }
  const tcov = options.tcov === undefined ? 1 : checkInteger('options.tcov', options.tcov, 1, MAX_TCOV);
  const weightDecay =
    options.weightDecay === undefined ? 0 : checkFloat32('options.weightDecay', checkRange('options.weightDecay', options.weightDecay, 0, Infinity));
  const decoupled = options.decoupled === undefined ? false : checkBoolean('options.decoupled', options.decoupled);
  const nonFiniteGuard = options.nonFiniteGuard === undefined ? true : checkBoolean('options.nonFiniteGuard', options.nonFiniteGuard);
  return { lr, beta, damping, decay, mix, tcov, weightDecay, decoupled, nonFiniteGuard };
}

function tensorLength(name: string, t: unknown): number {
  if (isFloat32Array(t)) return t.length;
  if (binding().isDeviceBuffer(t)) {
    const b = t as DeviceBuffer;
    if (b.disposed) throw codedError(ErrorCodes.disposed, `${name}: the DeviceBuffer was already disposed.`);
    return b.length;
  }
  throw typeError(name, 'a Float32Array or DeviceBuffer', t);
}

/** The name of parameter slot `s` as the user wrote it: layers[i].weight, .bias or .param. */
function slotName(s: ParameterSlot): string {
  return `layers[${s.layer}].${s.role}`;
}

// Parameters are updated in place, so two of them must not share memory: a tied weight
// given twice would be stepped twice on cpu and once, racing, on cuda. Checked when the
// optimizer is created (the addon checks every step's tensors again, gradients included).
function checkParameterStorage(params: readonly Tensor[], slots: readonly ParameterSlot[], backend: BackendName): void {
  const name = (i: number) => slotName(slots[i]);
  const seen = new Map<object, { index: number; begin: number; end: number }[]>();
  params.forEach((p, i) => {
    if (!isFloat32Array(p)) {
      if (p.backend !== backend) {
        throw codedError(
          ErrorCodes.foreignBuffer,
          `${name(i)}: Expected a DeviceBuffer of the ${backend} backend (this optimizer's) but received one of the ${p.backend} backend.`,
        );
      }
    }
    const key: object = isFloat32Array(p) ? p.buffer : p;
    const begin = isFloat32Array(p) ? p.byteOffset : 0;
    const end = begin + 4 * p.length;
    const ranges = seen.get(key) ?? [];
    for (const r of ranges) {
      if (p.length > 0 && begin < r.end && r.begin < end) {
        throw rangeError(name(i), `memory of its own, but it overlaps ${name(r.index)} (each parameter is updated in place once per step)`, p);
      }
    }
    ranges.push({ index: i, begin, end });
    seen.set(key, ranges);
  });
}

function checkTensor(name: string, t: unknown, numel: number): Tensor {
  const n = tensorLength(name, t);
  if (n !== numel) throw rangeError(name, `${numel} elements`, t);
  return t as Tensor;
}

function padding(name: string, p: Padding | undefined): Pick<NativeLayer, 'padMode' | 'padTop' | 'padBottom' | 'padLeft' | 'padRight'> {
  if (p === undefined || p === 'valid') return { padMode: PadMode.explicit, padTop: 0, padBottom: 0, padLeft: 0, padRight: 0 };
  if (p === 'same') return { padMode: PadMode.same, padTop: 0, padBottom: 0, padLeft: 0, padRight: 0 };
  if (typeof p === 'number') {
    const v = checkInteger(name, p, 0, MAX_WINDOW);
    return { padMode: PadMode.explicit, padTop: v, padBottom: v, padLeft: v, padRight: v };
  }
  if (Array.isArray(p) && p.length === 2) {
    const [h, w] = checkPair(name, p, 0, MAX_WINDOW);
    return { padMode: PadMode.explicit, padTop: h, padBottom: h, padLeft: w, padRight: w };
  }
  if (Array.isArray(p) && p.length === 4) {
    // By index, not map: map skips a hole, which then reached the native side unnamed.
    const [t, b, l, r] = [0, 1, 2, 3].map((i) => checkInteger(`${name}[${i}]`, p[i], 0, MAX_WINDOW));
    return { padMode: PadMode.explicit, padTop: t, padBottom: b, padLeft: l, padRight: r };
  }
  throw typeError(name, "'valid', 'same', an integer, [ph, pw] or [top, bottom, left, right]", p);
}

/** The fields each layer kind takes (see LinearLayer ... ParamLayer). */
const LAYER_KEYS: Record<LayerSpec['kind'], readonly string[]> = {
  linear: ['kind', 'inFeatures', 'outFeatures', 'weight', 'bias', 'layout'],
  conv2d: ['kind', 'inChannels', 'outChannels', 'kernelSize', 'stride', 'padding', 'groups', 'dataFormat', 'weight', 'bias', 'layout'],
  batchnorm: ['kind', 'channels', 'weight', 'bias', 'dataFormat'],
  layernorm: ['kind', 'features', 'weight', 'bias'],
  param: ['kind', 'param'],
};

interface Plan {
  nativeLayers: NativeLayer[];
  tensors: NativeTensor[];
  slots: ParameterSlot[];
  params: Tensor[];
  /** user layer index -> native layer index (-1 for 'param') */
  nativeIndex: number[];
}

function buildPlan(layers: readonly LayerSpec[]): Plan {
  if (!Array.isArray(layers)) throw typeError('layers', 'an array of layer descriptions', layers);
  const plan: Plan = { nativeLayers: [], tensors: [], slots: [], params: [], nativeIndex: [] };
  // By index, not forEach: a hole in a sparse array is a missing layer, not one to skip.
  for (let i = 0; i < layers.length; i++) {
    const spec = layers[i];
    const at = `layers[${i}]`;
    if (spec === null || typeof spec !== 'object') throw typeError(at, 'a layer description object', spec);
    const kind = checkOneOf(`${at}.kind`, (spec as LayerSpec).kind, ['linear', 'conv2d', 'batchnorm', 'layernorm', 'param'] as const);
    // A misspelt or unsupported field ('strides', 'dilation', 'data_format') would otherwise
    // leave its default in place and precondition with the wrong geometry, silently.
    for (const key of Object.keys(spec)) {
      if (!LAYER_KEYS[kind].includes(key)) {
        throw unknownKeyError(`${at}.${key}`, `a field of a '${kind}' layer (${LAYER_KEYS[kind].join(', ')})`, key);
      }
    }
    if (kind === 'param') {
      const s = spec as ParamLayer;
      plan.nativeIndex.push(-1);
      plan.tensors.push({ numel: tensorLength(`${at}.param`, s.param), layer: -1, role: TensorRole.weight });
      plan.params.push(s.param);
      plan.slots.push({ layer: i, role: 'param' });
      continue;
    }
    const native = plan.nativeLayers.length;
    plan.nativeIndex.push(native);
    let layer: NativeLayer;
    let weightNumel: number;
    let biasNumel: number;
    const layout = (s: { layout?: WeightLayoutName }) =>
      WeightLayout[s.layout === undefined ? 'pytorch' : checkOneOf(`${at}.layout`, s.layout, ['pytorch', 'tfjs'] as const)];
    const format = (s: { dataFormat?: DataFormatName }) =>
      DataFormat[s.dataFormat === undefined ? 'NCHW' : checkOneOf(`${at}.dataFormat`, s.dataFormat, ['NCHW', 'NHWC'] as const)];
    const bias = (spec as { bias?: Tensor | null }).bias;
    const hasBias = bias !== undefined && bias !== null;
    if (kind === 'linear') {
      const s = spec as LinearLayer;
      const inF = checkInteger(`${at}.inFeatures`, s.inFeatures, 1);
      const outF = checkInteger(`${at}.outFeatures`, s.outFeatures, 1);
      layer = { kind: LayerKind.linear, hasBias, inFeatures: inF, outFeatures: outF, layout: layout(s), format: DataFormat.NCHW, label: i };
      weightNumel = inF * outF;
      biasNumel = outF;
    } else if (kind === 'conv2d') {
      const s = spec as Conv2dLayer;
      const inC = checkInteger(`${at}.inChannels`, s.inChannels, 1);
      const outC = checkInteger(`${at}.outChannels`, s.outChannels, 1);
      const [kh, kw] = checkPair(`${at}.kernelSize`, s.kernelSize, 1, MAX_WINDOW);
      const [sh, sw] = s.stride === undefined ? [1, 1] : checkPair(`${at}.stride`, s.stride, 1, MAX_WINDOW);
      const groups = s.groups === undefined ? 1 : checkInteger(`${at}.groups`, s.groups, 1);
      if (inC % groups !== 0 || outC % groups !== 0) {
        throw rangeError(`${at}.groups`, `a divisor of inChannels (${inC}) and outChannels (${outC})`, groups);
      }
      layer = {
        kind: LayerKind.conv2d,
        hasBias,
        inFeatures: inC,
        outFeatures: outC,
        layout: layout(s),
        format: format(s),
        kernelH: kh,
        kernelW: kw,
        strideH: sh,
        strideW: sw,
        groups,
        ...padding(`${at}.padding`, s.padding),
        label: i,
      };
      weightNumel = outC * (inC / groups) * kh * kw;
      biasNumel = outC;
    } else if (kind === 'batchnorm') {
      const s = spec as BatchNormLayer;
      const c = checkInteger(`${at}.channels`, s.channels, 1);
      layer = { kind: LayerKind.batchnorm, hasBias, inFeatures: c, outFeatures: c, layout: WeightLayout.pytorch, format: format(s), label: i };
      weightNumel = biasNumel = c;
    } else {
      const s = spec as LayerNormLayer;
      const d = checkInteger(`${at}.features`, s.features, 1);
      layer = { kind: LayerKind.layernorm, hasBias, inFeatures: d, outFeatures: d, layout: WeightLayout.pytorch, format: DataFormat.NCHW, label: i };
      weightNumel = biasNumel = d;
    }
    if (!Number.isSafeInteger(weightNumel)) {
      // No tensor has this many elements (and the product printed as a number would be rounded).
      throw rangeError(`${at}.weight`, "at most 2^53 elements (the layer's sizes multiply to more)", (spec as { weight: unknown }).weight);
    }
    const weight = checkTensor(`${at}.weight`, (spec as { weight: unknown }).weight, weightNumel);
    plan.nativeLayers.push(layer);
    plan.tensors.push({ numel: weightNumel, layer: native, role: TensorRole.weight });
    plan.params.push(weight);
    plan.slots.push({ layer: i, role: 'weight' });
    if (hasBias) {
      plan.tensors.push({ numel: biasNumel, layer: native, role: TensorRole.bias });
      plan.params.push(checkTensor(`${at}.bias`, bias, biasNumel));
      plan.slots.push({ layer: i, role: 'bias' });
    }
  }
  return plan;
}

/** The fields of a FactorRecord. */
const RECORD_KEYS: ReadonlySet<string> = new Set(['layer', 'input', 'inputShape', 'outputGrad', 'outputGradShape']);

/**
 * AdaFisher / AdaFisherW over a model described as a list of layers.
 *
 * Per training step: hand it each preconditioned layer's input and output gradient
 * (recordInput / recordOutputGrad, or already-reduced factors with setFactors), then call
 * step() with the parameter gradients in parameterSlots() order.
 *
 * @example
 * const opt = new AdaFisher([{ kind: 'linear', inFeatures: 784, outFeatures: 10, weight: w, bias: b }], { lr: 1e-3 });
 * opt.recordInput(0, x, [batch, 784]);
 * opt.recordOutputGrad(0, dy, [batch, 10]);
 * opt.step([dw, db]);  // { applied: true, refreshed: true }
 */
export class AdaFisher {
  #native: NativeOptimizer | null;
  #plan: Plan;
  #hyper: AdaFisherHyperparameters;
  readonly backend: NativeBackendName;

  /**
   * @param layers the model: supported layers (linear, conv2d, batchnorm, layernorm) and plain parameters ('param').
   * @param options hyperparameters and backend; see AdaFisherOptions.
   * @throws {TypeError|RangeError} naming the bad field; code ADAFISHER_BACKEND_UNAVAILABLE for an unusable 'cuda'.
   */
  constructor(layers: readonly LayerSpec[], options: AdaFisherOptions = {}) {
    this.#hyper = resolveHyperparameters(options);
    this.#plan = buildPlan(layers);
    if (options.backend !== undefined) checkOneOf('options.backend', options.backend, BACKEND_NAMES);
    this.backend = resolveBackend(options.backend);
    checkParameterStorage(this.#plan.params, this.#plan.slots, this.backend);
    this.#native = this.#createNative(this.#hyper);
  }

  #createNative(h: AdaFisherHyperparameters): NativeOptimizer {
    return new (binding().NativeOptimizer)(
      this.backend,
      {
        rule: h.decoupled ? UpdateRule.adafisherw : UpdateRule.adafisher,
        lr: h.lr,
        beta: h.beta,
        damping: h.damping,
        decay: h.decay,
        mix: h.mix,
        weightDecay: h.weightDecay,
        tcov: h.tcov,
        guard: h.nonFiniteGuard,
      },
      this.#plan.nativeLayers,
      this.#plan.tensors,
    );
  }

  // NOTE: [native after arguments]
  // Reading the arguments can run user code (getters, Proxies) that replaces the native
  // optimizer (loadState) or disposes it: every method reads its arguments first and takes
  // this.#alive() for the native call after, never a reference taken before them.
  #alive(): NativeOptimizer {
    if (this.#native === null) throw codedError(ErrorCodes.disposed, 'Optimizer already disposed.');
    return this.#native;
  }

  // The native index of a preconditioned layer when `layer` is a valid one, else undefined
  // (then #layerIndex, with the argument's name, throws the error).
  #fastLayerIndex(layer: unknown): number | undefined {
    if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= this.#plan.nativeIndex.length) return undefined;
    const n = this.#plan.nativeIndex[layer];
    return n < 0 ? undefined : n;
  }

  #layerIndex(layer: unknown, name = 'layer'): number {
    const i = checkInteger(name, layer, 0, this.#plan.nativeIndex.length - 1);
    const n = this.#plan.nativeIndex[i];
    if (n < 0) throw rangeError(name, 'the index of a preconditioned layer (not a plain parameter)', layer);
    return n;
  }

  /** The resolved hyperparameters. */
  get hyperparameters(): AdaFisherHyperparameters {
    return { ...this.#hyper };
  }

  /**
   * Changes the learning rate from the next step on, keeping the whole state (momenta,
   * factors, step counts, statistics recorded for the next step): for learning-rate
   * schedules, as often as every step.
   * @throws {RangeError} for an lr that is not a finite number >= 0 (and below 2^128, as float32 holds it).
   */
  setLearningRate(lr: number): void {
    checkFloat32('lr', checkRange('lr', lr, 0, Infinity));
    this.#alive().setLearningRate(lr);
    this.#hyper = { ...this.#hyper, lr };
  }

  /** Steps applied so far. */
  get steps(): number {
    return this.#alive().steps;
  }

  /** Whether the next step refreshes the factors (statistics are only needed then). */
  get willRefreshFactors(): boolean {
    return this.#alive().willRefresh();
  }

  get disposed(): boolean {
    return this.#native === null;
  }

  /** The parameter tensors, in the order step() takes gradients. */
  parameterSlots(): ParameterSlot[] {
    return this.#plan.slots.map((s) => ({ ...s }));
  }

  /**
   * Reduces a layer's input to its H factor (mean squares; conv patches without im2col).
   * @param layer index into the layer list.
   * @param data the input, in the layer's layout (NCHW/NHWC for conv).
   * @param shape its shape, e.g. [batch, in] or [N, C, H, W].
   * @throws {TypeError|RangeError} for a bad layer index, shape or data length.
   */
  recordInput(layer: number, data: Tensor, shape: readonly number[]): void {
    this.#alive();
    const n = this.#layerIndex(layer);
    const s = checkShape('shape', shape);
    this.#alive().recordInput(n, data, s); // see NOTE: [native after arguments]
  }

  /**
   * Reduces a layer's output (pre-activation) gradient to its S factor.
   * @throws {TypeError|RangeError} for a bad layer index, shape or data length.
   */
  recordOutputGrad(layer: number, data: Tensor, shape: readonly number[]): void {
    this.#alive();
    const n = this.#layerIndex(layer);
    const s = checkShape('shape', shape);
    this.#alive().recordOutputGrad(n, data, s);
  }

  /**
   * recordInput and recordOutputGrad of several layers in one call, e.g. every layer's after
   * the backward pass. Each record gives a layer's input (with inputShape) and/or its output
   * gradient (with outputGradShape). Every record is checked before any is reduced, so a bad
   * one records nothing; a layer's input or gradient given twice keeps the later, as with one
   * call each. The results are those of one call each, bit for bit. The cpu backend runs all
   * of them in one pass of its thread pool; the cuda backend reduces the Linear inputs and
   * gradients and the conv output gradients in one launch per kind of reduction (up to 16
   * each) and the conv inputs in two (up to 8), which saves most of the fixed cost of a call
   * when the layers are small.
   * @throws {TypeError|RangeError} for a bad record, layer index, shape or data length.
   */
  recordFactors(records: readonly FactorRecord[]): void {
    this.#alive();
    const what = 'an object { layer, input?, inputShape?, outputGrad?, outputGradShape? }';
    if (!Array.isArray(records)) throw typeError('records', `an array of ${what}`, records);
    const out: NativeFactorRecord[] = [];
    // Argument names ("records[3].inputShape") are made only when a check fails: this runs
    // for every layer of every training step (NOTE: [names on failure in TypeScript]).
    const n = records.length;
    for (let i = 0; i < n; ++i) {
      const r: unknown = records[i];
      if (r === null || typeof r !== 'object') throw typeError(`records[${i}]`, what, r);
      // The layer first, checked before the other fields are read (each once).
      const index = (r as FactorRecord).layer;
      const layer = this.#fastLayerIndex(index) ?? this.#layerIndex(index, `records[${i}].layer`);
      const { input, inputShape, outputGrad, outputGradShape } = r as FactorRecord;
      // A misspelt field ('outputgrad') would leave that statistic unrecorded, silently.
      for (const key of Object.keys(r)) if (!RECORD_KEYS.has(key)) throw unknownKeyError(`records[${i}].${key}`, `a field of a record (${[...RECORD_KEYS].join(', ')})`, key);
      if (input === undefined && outputGrad === undefined) throw typeError(`records[${i}]`, 'an input or an outputGrad', r);
      if (input !== undefined) {
        out.push({ layer, which: FactorWhich.H, data: input, shape: fastShape(inputShape) ?? checkShape(`records[${i}].inputShape`, inputShape) });
      } else if (inputShape !== undefined) {
        throw typeError(`records[${i}].input`, 'a tensor, since inputShape is given', input);
      }
      if (outputGrad !== undefined) {
        out.push({
          layer,
          which: FactorWhich.S,
          data: outputGrad,
          shape: fastShape(outputGradShape) ?? checkShape(`records[${i}].outputGradShape`, outputGradShape),
        });
      } else if (outputGradShape !== undefined) {
        throw typeError(`records[${i}].outputGrad`, 'a tensor, since outputGradShape is given', outputGrad);
      }
    }
    this.#alive().recordFactors(out);
  }

  /**
   * Hands already-reduced statistics for a layer: H (with its bias entry) and/or S. Both are
   * checked before either is written: a call that throws changes nothing.
   * @throws {TypeError|RangeError} for a bad layer index, an unknown key, or a bad tensor or length.
   */
  setFactors(layer: number, factors: { H?: Tensor | undefined; S?: Tensor | undefined }): void {
    this.#alive();
    const n = this.#layerIndex(layer);
    if (factors === null || typeof factors !== 'object' || Array.isArray(factors)) throw typeError('factors', 'an object { H?, S? }', factors);
    for (const key of Object.keys(factors)) {
      if (key !== 'H' && key !== 'S') throw unknownKeyError(`factors.${key}`, "a known key ('H' or 'S')", key);
    }
    const { H, S } = factors;
    if (H === undefined && S === undefined) throw typeError('factors', 'an object with H, S or both', factors);
    this.#alive().setFactors(n, H, S);
  }

  /**
   * For preconditioned layers that did not run this step (frozen, or cut off from the loss):
   * each one's running factors become its statistics for the next step, as if recorded. A
   * refreshing step then moves them toward their own min-max normalization
   * (R ← decay·R + mix·norm(R)). Copied on the backend, without a round trip through the host.
   * @throws {TypeError|RangeError} for a bad index (nothing is changed then).
   */
  reuseRunningFactors(layers: readonly number[]): void {
    this.#alive();
    if (!Array.isArray(layers)) throw typeError('layers', 'an array of layer indices', layers);
    // By index: a hole (or the first of 2^32 in a sparse array) is refused at once.
    const n: number[] = [];
    for (let i = 0; i < layers.length; i++) n.push(this.#layerIndex(layers[i], `layers[${i}]`));
    this.#alive().reuseRunningFactors(n);
  }

  /**
   * One AdaFisher step for every parameter: refresh the factors when due (tcov), then
   * m ← βm + (1-β)g and p ← p - lr/bc · m / (S⊗H + λ). All arguments are checked before
   * anything is written; a NaN/Inf gradient or a NaN statistic skips the step (applied: false).
   * Statistics recorded since the previous step belong to this step and are consumed by it,
   * applied or skipped: record the next batch's before the next step.
   * @param grads one gradient per parameterSlots() entry; null leaves that parameter as is.
   * @param params optional replacement parameter tensors (same order), e.g. after reallocation.
   * @throws {TypeError|RangeError} for bad gradients; code ADAFISHER_MISSING_STATISTICS when a refreshing step lacks statistics.
   */
  step(grads: readonly (Tensor | null | undefined)[], params?: readonly Tensor[]): StepResult {
    this.#alive();
    if (!Array.isArray(grads)) throw typeError('grads', 'an array of gradients', grads);
    const n = this.#plan.params.length;
    if (grads.length !== n) throw rangeError('grads', `${n} gradients (one per parameterSlots() entry)`, grads);
    let ps = this.#plan.params;
    if (params !== undefined) {
      if (!Array.isArray(params)) throw typeError('params', `an array of ${n} tensors, or undefined`, params);
      if (params.length !== n) throw rangeError('params', `an array of ${n} tensors`, params);
      // Read once, by index, before the native call (which then reads only this copy): a getter
      // or an iterator of the caller's array runs here, before anything changes, and what the
      // step used is what the optimizer keeps.
      ps = new Array<Tensor>(n);
      for (let i = 0; i < n; i++) ps[i] = params[i];
    }
    const gs = grads.map((g) => g ?? null);
    let result: StepResult;
    try {
      result = this.#alive().step(ps as Tensor[], gs);
    } catch (e) {
      // The binding names the i-th parameter params[i]; without a params argument that is the
      // layer's own tensor (disposed or detached since), named as the layer description has it.
      if (params === undefined && e instanceof Error) {
        const slots = this.#plan.slots;
        e.message = e.message.replace(/\bparams\[(\d+)\]/g, (m, i: string) => (slots[Number(i)] ? slotName(slots[Number(i)]) : m));
      }
      throw e;
    }
    if (params !== undefined) this.#plan.params = ps;
    return result;
  }

  /**
   * The full state (momenta, running factors, step counters, hyperparameters) as host copies.
   * Loading it into a fresh optimizer over the same model resumes bit-identically.
   */
  exportState(): AdaFisherState {
    const s = this.#alive().exportState();
    const layout = this.#alive().factorLayout();
    const factors: AdaFisherState['factors'] = [];
    this.#plan.nativeIndex.forEach((n, i) => {
      if (n < 0) return;
      const l = layout[n];
      factors.push({
        layer: i,
        H: s.factors.slice(l.hOffset, l.hOffset + l.hLength),
        S: s.factors.slice(l.sOffset, l.sOffset + l.sLength),
      });
    });
    return {
      format: 'adafisher-state',
      version: 1,
      hyperparameters: { ...this.#hyper },
      tensors: this.#plan.tensors.map((t, i) => ({
        numel: t.numel,
        layer: this.#plan.slots[i].layer,
        role: t.role === TensorRole.bias ? 'bias' : 'weight',
      })),
      layers: this.#layerDescriptions(),
      steps: s.steps,
      stepCounts: s.stepCounts,
      momenta: s.momenta,
      factors,
    };
  }

  // The layers as a checkpoint describes them: fixed by the model description, made once.
  #descriptions: string[] | undefined;
  #layerDescriptions(): string[] {
    if (this.#descriptions === undefined) {
      const p = this.#plan;
      const paramNumel = new Map(p.slots.map((x, t) => [x.layer, p.tensors[t].numel]));
      this.#descriptions = p.nativeIndex.map((n, i) => (n < 0 ? `param ${paramNumel.get(i)}` : describeLayer(p.nativeLayers[n])));
    }
    return [...this.#descriptions];
  }

  /**
   * Replaces the whole state (and hyperparameters) with a checkpoint from exportState().
   * All-or-nothing: a checkpoint that does not match this model is refused and nothing changes.
   * @throws {Error} code ADAFISHER_BAD_CHECKPOINT naming what does not match.
   */
  loadState(state: AdaFisherState): void {
    this.#alive();
    const bad = (msg: string) => codedError(ErrorCodes.badCheckpoint, `Invalid AdaFisher checkpoint: ${msg}`);
    if (state === null || typeof state !== 'object' || Array.isArray(state)) throw bad(`expected an object, received ${describeType(state)}`);
    if (state.format !== 'adafisher-state' || state.version !== 1) throw bad("expected format 'adafisher-state', version 1");
    const h = state.hyperparameters as Partial<AdaFisherHyperparameters> | undefined;
    if (h === null || typeof h !== 'object' || Array.isArray(h)) {
      throw bad(`hyperparameters: expected an object, received ${h === undefined ? 'nothing (the field is missing)' : describeType(h)}`);
    }
    // Every field is required: a default here would silently replace the checkpoint's value.
    for (const key of HYPERPARAMETER_KEYS) {
      if (h[key] === undefined) throw bad(`hyperparameters.${key} is missing`);
    }
    let hyper: AdaFisherHyperparameters;
    try {
      hyper = resolveHyperparameters({
        lr: h.lr, beta: h.beta, damping: h.damping, decay: h.decay, mix: h.mix, tcov: h.tcov,
        weightDecay: h.weightDecay, decoupled: h.decoupled, nonFiniteGuard: h.nonFiniteGuard,
      });
    } catch (e) {
      throw bad(`hyperparameters: ${(e as Error).message}`);
    }
    const tensors = this.#plan.tensors;
    if (!Array.isArray(state.tensors) || state.tensors.length !== tensors.length) {
      throw bad(`expected ${tensors.length} tensors, received ${Array.isArray(state.tensors) ? state.tensors.length : describeType(state.tensors)}`);
    }
    state.tensors.forEach((t, i) => {
      const slot = this.#plan.slots[i];
      const role = slot.role === 'bias' ? 'bias' : 'weight';
      if (t?.numel !== tensors[i].numel) throw bad(`tensors[${i}] has ${t?.numel} elements, this model's has ${tensors[i].numel}`);
      if (t.layer !== slot.layer || t.role !== role) {
        throw bad(`tensors[${i}] is the ${t.role} of layer ${t.layer}, this model's is the ${role} of layer ${slot.layer}`);
      }
    });
    if (state.layers !== undefined) {
      const ours = this.#layerDescriptions();
      if (!Array.isArray(state.layers) || state.layers.length !== ours.length) {
        throw bad(`expected the descriptions of ${ours.length} layers, received ${Array.isArray(state.layers) ? state.layers.length : describeType(state.layers)}`);
      }
      state.layers.forEach((l, i) => {
        if (l !== ours[i]) throw bad(`layers[${i}] is '${String(l)}', this model's is '${ours[i]}'`);
      });
    }
    const layout = this.#alive().factorLayout();
    const preconditioned = this.#plan.nativeIndex.map((n, i) => ({ n, i })).filter((x) => x.n >= 0);
    if (!Array.isArray(state.factors) || state.factors.length !== preconditioned.length) {
      throw bad(`expected factors for ${preconditioned.length} layers`);
    }
    const total = layout.reduce((a, l) => a + l.hLength + l.sLength, 0);
    const flat = new Float32Array(total);
    preconditioned.forEach(({ n }, j) => {
      // Each field read once: a getter cannot hand the checks one array and the copy another.
      const f = state.factors[j];
      const l = layout[n];
      const layer = f?.layer;
      const H = f?.H;
      const S = f?.S;
      if (layer !== preconditioned[j].i) throw bad(`factors[${j}] belongs to layer ${layer}, expected layer ${preconditioned[j].i}`);
      if (!isFloat32Array(H) || H.length !== l.hLength) throw bad(`factors[${j}].H must be a Float32Array of ${l.hLength}`);
      if (!isFloat32Array(S) || S.length !== l.sLength) throw bad(`factors[${j}].S must be a Float32Array of ${l.sLength}`);
      checkFactorValues(H, `factors[${j}].H`, hyper.nonFiniteGuard, bad);
      checkFactorValues(S, `factors[${j}].S`, hyper.nonFiniteGuard, bad);
      flat.set(H, l.hOffset);
      flat.set(S, l.sOffset);
    });
    // Momenta are checked natively for sizes and types (importState), not for values: even a
    // guarded optimizer may hold an infinite or NaN one (the guard reads the gradients, and
    // with L2 weight decay g + wd·p can overflow), and every state it exports must load.
    if (!Array.isArray(state.momenta)) throw bad('momenta must be an array');
    // A fresh native optimizer with the checkpoint's hyperparameters; swap only once it holds the state.
    const fresh = this.#createNative(hyper);
    try {
      fresh.importState({ steps: state.steps, stepCounts: state.stepCounts, momenta: state.momenta, factors: flat });
    } catch (e) {
      fresh.dispose();
      // The checkpoint's fault (sizes, types, counts): one code and prefix whichever side found
      // it. Anything else (out of memory, a CUDA error) stays what it is.
      const err = e as Error & { code?: string };
      const resources: (string | undefined)[] = [ErrorCodes.outOfMemory, ErrorCodes.cudaError, ErrorCodes.internal];
      if (resources.includes(err.code)) throw err;
      throw bad(err.message);
    }
    // Disposed meanwhile (by a getter of the checkpoint: NOTE: [native after arguments])? Then
    // the fresh state is freed now, not left to the garbage collector.
    let old: NativeOptimizer;
    try {
      old = this.#alive();
    } catch (e) {
      fresh.dispose();
      throw e;
    }
    old.dispose();
    this.#native = fresh;
    this.#hyper = hyper;
  }

  /**
   * Frees native state now. Idempotent. Later calls that need it (recording, step, state,
   * learning rate) throw code ADAFISHER_DISPOSED; the plain descriptions (`hyperparameters`,
   * `parameterSlots()`, `backend`) stay readable.
   */
  dispose(): void {
    this.#native?.dispose();
    this.#native = null;
  }
}

/** A layer as a checkpoint describes it, e.g. 'linear 784->10 layout=pytorch bias'. */
function describeLayer(l: NativeLayer): string {
  const name = (table: Record<string, number>, v: number) => Object.keys(table).find((k) => table[k] === v) ?? String(v);
  const bias = l.hasBias ? ' bias' : '';
  switch (l.kind) {
    case LayerKind.linear:
      return `linear ${l.inFeatures}->${l.outFeatures} layout=${name(WeightLayout, l.layout)}${bias}`;
    case LayerKind.conv2d: {
      const pad = l.padMode === PadMode.same ? 'same' : `${l.padTop},${l.padBottom},${l.padLeft},${l.padRight}`;
      return (
        `conv2d ${l.inFeatures}->${l.outFeatures} kernel=${l.kernelH}x${l.kernelW} stride=${l.strideH}x${l.strideW} ` +
        `groups=${l.groups} padding=${pad} format=${name(DataFormat, l.format)} layout=${name(WeightLayout, l.layout)}${bias}`
      );
    }
    case LayerKind.batchnorm:
      return `batchnorm ${l.inFeatures} format=${name(DataFormat, l.format)}${bias}`;
    default:
      return `layernorm ${l.inFeatures}${bias}`;
  }
}

function describeType(v: unknown): string {
  return v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v;
}

const HYPERPARAMETER_KEYS = ['lr', 'beta', 'damping', 'decay', 'mix', 'tcov', 'weightDecay', 'decoupled', 'nonFiniteGuard'] as const;

/**
 * Running factors start at ones and are updated as decay·R + mix·x' with decay, mix >= 0 and
 * x' a min-max-normalized statistic in [0, 1) (docs/ALGORITHM.md "Normalize, then average"), so
 * they are >= 0; +Infinity included, which a large mix reaches (decay 1, mix 3e38 overflows
 * float32 in two refreshes) and which every exported state must be able to load back. With
 * nonFiniteGuard off, a NaN statistic is let through and leaves NaN factors, which such a
 * checkpoint may carry. A negative value or -Infinity is no state an optimizer can reach.
 */
function checkFactorValues(a: Float32Array, name: string, guard: boolean, bad: (msg: string) => Error): void {
  for (let i = 0; i < a.length; i++) {
    const x = a[i];
    if (x >= 0) continue;
    if (Number.isNaN(x) && !guard) continue;
    throw bad(
      `${name}[${i}] is ${x}; running factors are >= 0` +
        (Number.isNaN(x) ? ' (NaN only in a checkpoint saved with nonFiniteGuard: false)' : ''),
    );
  }
}

// JSON has no NaN/±Infinity: those (possible with nonFiniteGuard: false) travel as strings.
const toJSONNumber = (x: number): number | string => (Number.isFinite(x) ? x : String(x));
const fromJSONNumber = (x: unknown): number =>
  typeof x === 'number' ? x : x === 'NaN' ? NaN : x === 'Infinity' ? Infinity : x === '-Infinity' ? -Infinity : (undefined as never);

/**
 * A checkpoint as plain JSON, for JSON.stringify: float32 values round-trip exactly, and NaN
 * and ±Infinity (possible with nonFiniteGuard: false) travel as the strings "NaN",
 * "Infinity", "-Infinity".
 * @param state What exportState() returned.
 * @throws {TypeError} (code ADAFISHER_INVALID_ARGUMENT) naming the field that is not a
 *   checkpoint's (e.g. `state.momenta[2]` not a Float32Array).
 * @example writeFileSync('opt.json', JSON.stringify(stateToJSON(opt.exportState())));
 */
export function stateToJSON(state: AdaFisherState): unknown {
  if (state === null || typeof state !== 'object' || Array.isArray(state)) {
    throw typeError('state', 'a checkpoint object from exportState()', state);
  }
  if (!Array.isArray(state.momenta)) throw typeError('state.momenta', 'an array of Float32Arrays', state.momenta);
  if (!Array.isArray(state.factors)) throw typeError('state.factors', 'an array of { layer, H, S }', state.factors);
  const arr = (a: Float32Array, name: string) => {
    if (!isFloat32Array(a)) throw typeError(name, 'a Float32Array', a);
    return Array.from(a, toJSONNumber);
  };
  return {
    ...state,
    momenta: state.momenta.map((m, i) => arr(m, `state.momenta[${i}]`)),
    factors: state.factors.map((f, i) => {
      if (f === null || typeof f !== 'object') throw typeError(`state.factors[${i}]`, 'an object { layer, H, S }', f);
      return { layer: f.layer, H: arr(f.H, `state.factors[${i}].H`), S: arr(f.S, `state.factors[${i}].S`) };
    }),
  };
}

/**
 * The inverse of stateToJSON: a checkpoint for loadState() from its parsed JSON.
 * @param json The parsed JSON.
 * @throws {Error} (code ADAFISHER_BAD_CHECKPOINT) naming what is missing or malformed.
 * @example opt.loadState(stateFromJSON(JSON.parse(readFileSync('opt.json', 'utf8'))));
 */
export function stateFromJSON(json: unknown): AdaFisherState {
  const j = json as Record<string, unknown>;
  const bad = (msg: string) => codedError(ErrorCodes.badCheckpoint, `Invalid AdaFisher checkpoint JSON: ${msg}`);
  if (j === null || typeof j !== 'object') throw bad('expected an object');
  const arr = (v: unknown, name: string): Float32Array => {
    const values = Array.isArray(v) ? v.map(fromJSONNumber) : [undefined];
    if (values.some((x) => typeof x !== 'number')) throw bad(`${name} must be an array of numbers`);
    return Float32Array.from(values);
  };
  if (!Array.isArray(j.momenta) || !Array.isArray(j.factors)) throw bad('momenta and factors must be arrays');
  return {
    ...(j as unknown as AdaFisherState),
    momenta: (j.momenta as unknown[]).map((m, i) => arr(m, `momenta[${i}]`)),
    factors: (j.factors as { layer: number; H: unknown; S: unknown }[]).map((f, i) => ({
      layer: f?.layer,
      H: arr(f?.H, `factors[${i}].H`),
      S: arr(f?.S, `factors[${i}].S`),
    })),
  };
}


