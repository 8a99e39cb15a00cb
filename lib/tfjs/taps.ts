// Layer instrumentation for the TF.js adapter: which layers AdaFisher can precondition,
// how to describe them to the core API, and the taps that capture each layer's input and
// pre-activation output gradient during training.
import type * as tf from '@tensorflow/tfjs';

import { codedError, ErrorCodes } from '../errors.js';
import type { LayerSpec, Tensor as CoreTensor } from '../optimizer.js';
import { tfjs } from './tf.js';

/** The parts of a tfjs-layers LayerVariable the adapter uses. */
export interface LayerVariableLike {
  readonly name: string;
  readonly originalName: string;
  readonly shape: number[];
  read(): tf.Variable;
}

/** The fields of tfjs-layers layers the adapter reads (all public in tfjs-layers, untyped in its d.ts). */
interface LayerFields {
  kernel?: LayerVariableLike | null;
  bias?: LayerVariableLike | null;
  gamma?: LayerVariableLike | null;
  beta?: LayerVariableLike | null;
  activation?: { getClassName(): string; apply(x: tf.Tensor): tf.Tensor } | null;
  units?: number;
  filters?: number;
  kernelSize?: number[];
  strides?: number[];
  padding?: string;
  dataFormat?: string;
  dilationRate?: number | number[];
  axis?: number | number[];
  rank?: number;
  layers?: tf.layers.Layer[];
  call(inputs: tf.Tensor | tf.Tensor[], kwargs: Record<string, unknown>): tf.Tensor | tf.Tensor[];
}
type AnyLayer = tf.layers.Layer & LayerFields;

export type TapKind = 'linear' | 'conv2d' | 'batchnorm' | 'layernorm';

/** One row of the adapter's layer report. */
export interface LayerReport {
  /** The layer's name (unique within a model). */
  name: string;
  /** Its TF.js class, e.g. 'Dense'. */
  className: string;
  /** true: AdaFisher's Fisher preconditioning; false: its trainable weights get plain momentum (F = 1). */
  preconditioned: boolean;
  /** The core layer kind, for preconditioned layers. */
  kind?: TapKind;
  /** Why a layer with trainable weights is not preconditioned. */
  reason?: string;
  /** Names (LayerVariable.originalName) of its trainable weights. */
  weights: string[];
}

/** A supported layer: its weight and bias variables and how to describe it to the core API. */
export interface SupportedLayer {
  layer: tf.layers.Layer;
  kind: TapKind;
  weight: LayerVariableLike;
  bias: LayerVariableLike | null;
  /** The core layer description over the given parameter arrays. */
  spec(weight: CoreTensor, bias: CoreTensor | null): LayerSpec;
  /** Core shape of an input / output-gradient tensor of this layer. */
  inputShape(shape: number[]): number[];
  gradShape(shape: number[]): number[];
  /**
   * Dense/Conv2D: the pre-activation, computed the way TF.js computes it while recording
   * gradients (see NOTE: [taps]); BatchNormalization/LayerNormalization: absent (their output is
   * the tapped value).
   */
  preActivation?: (x: tf.Tensor) => tf.Tensor;
}

/** Every distinct layer of a model, descending into nested models (Sequential or functional). */
export function collectLayers(model: tf.LayersModel): tf.layers.Layer[] {
  const out: tf.layers.Layer[] = [];
  const seen = new Set<tf.layers.Layer>();
  const visit = (layers: tf.layers.Layer[]) => {
    for (const l of layers) {
      if (seen.has(l)) continue;
      seen.add(l);
      const inner = (l as AnyLayer).layers;
      if (Array.isArray(inner)) visit(inner);
      else out.push(l);
    }
  };
  visit(model.layers);
  return out;
}

/**
 * Rank of a built layer's input, when TF.js recorded it: from its input spec, or from the
 * inputs of all its uses (a shared layer has one inbound node per use, and `layer.input`
 * throws) when they agree.
 */
function inputRank(layer: tf.layers.Layer): number | undefined {
  const spec = (layer as unknown as { inputSpec?: { ndim?: number }[] | null }).inputSpec;
  if (spec?.[0]?.ndim != null) return spec[0].ndim;
  const uses = (layer as unknown as { inboundNodes?: unknown[] }).inboundNodes?.length ?? 0;
  let rank: number | undefined;
  for (let i = 0; i < uses; i++) {
    const input = layer.getInputAt(i);
    if (Array.isArray(input)) return undefined;
    if (rank !== undefined && input.shape.length !== rank) return undefined;
    rank = input.shape.length;
  }
  return rank;
}

/**
 * Why TF.js cannot train a normalization layer, or null: TF.js 4.22's training pass fails
 * (with any optimizer) for a BatchNormalization without gamma or beta or over another axis
 * than the last, and for a LayerNormalization without gamma or beta.
 */
export function untrainableNormalization(layer: tf.layers.Layer): string | null {
  const cls = layer.getClassName();
  if (cls !== 'BatchNormalization' && cls !== 'LayerNormalization') return null;
  const l = layer as unknown as { gamma?: unknown; beta?: unknown; axis?: number | number[] };
  if (l.gamma == null) return 'scale: false';
  if (l.beta == null) return 'center: false';
  if (cls === 'BatchNormalization') {
    const axis = l.axis as number;
    const rank = inputRank(layer);
    if (axis !== -1 && rank !== undefined && axis !== rank - 1) return `axis ${axis} of a rank-${rank} input`;
  }
  return null;
}

function trainableNames(l: tf.layers.Layer): string[] {
  return (l.trainableWeights as unknown as LayerVariableLike[]).map((w) => w.originalName);
}

const flattenRows = (inner: number) => (shape: number[]) => [shape.reduce((a, b) => a * b, 1) / inner, inner];

/**
 * Decides whether a layer can be preconditioned: a SupportedLayer, or the reason it cannot.
 * Only the TF.js layouts the native kernels take without transposes are accepted
 * (Dense [in, out]; Conv2D [kh, kw, in, out] on NHWC; channel-last BatchNormalization; last-axis
 * LayerNormalization).
 */
export function classifyLayer(layer: tf.layers.Layer): SupportedLayer | { reason: string } {
  const l = layer as AnyLayer;
  const cls = layer.getClassName();
  if (!layer.built) return { reason: 'the layer is not built yet' };
  const stock = stockCall(l, cls);
  if (PRECONDITIONED_CLASSES.has(cls) && (stock === undefined || untappedCall(l) !== stock)) {
    // A subclass keeps its parent's className; the tap would replace its call() by the stock
    // layer's math (and a BatchNormalization's statistics would describe another function).
    return { reason: `a ${cls} with its own call() (a subclass or a patched instance): only TF.js's own ${cls} is preconditioned` };
  }
  switch (cls) {
    case 'Dense': {
      const [inF, outF] = l.kernel!.shape;
      return {
        layer,
        kind: 'linear',
        weight: l.kernel!,
        bias: l.bias ?? null,
        preActivation: (x) => {
          const x2 = x.rank === 2 ? x : tfjs.reshape(x, [-1, inF]);
          let y = tfjs.matMul(x2 as tf.Tensor2D, l.kernel!.read() as tf.Tensor2D);
          if (l.bias != null) y = tfjs.add(y, l.bias.read());
          return x.rank === 2 ? y : tfjs.reshape(y, [...x.shape.slice(0, -1), outF]);
        },
        spec: (weight, bias) => ({ kind: 'linear', inFeatures: inF, outFeatures: outF, weight, bias, layout: 'tfjs' }),
        inputShape: flattenRows(inF),
        gradShape: flattenRows(outF),
      };
    }
    case 'Conv2D': {
      const dil = Array.isArray(l.dilationRate) ? l.dilationRate : [l.dilationRate ?? 1];
      if (dil.some((d) => d !== 1)) return { reason: 'dilated Conv2D (dilationRate > 1): TF.js cannot compute its gradients' };
      if (l.dataFormat !== 'channelsLast') return { reason: "Conv2D with dataFormat 'channelsFirst': only NHWC is preconditioned" };
      if (l.padding !== 'same' && l.padding !== 'valid') return { reason: `Conv2D padding '${l.padding}' is not supported` };
      const [kh, kw, inC, outC] = l.kernel!.shape;
      const stride = l.strides as [number, number];
      return {
        layer,
        kind: 'conv2d',
        weight: l.kernel!,
        bias: l.bias ?? null,
        preActivation: (x) => {
          const y = tfjs.conv2d(x as tf.Tensor4D, l.kernel!.read() as tf.Tensor4D, stride, l.padding as 'same' | 'valid', 'NHWC');
          return l.bias != null ? tfjs.add(y, l.bias.read()) : y;
        },
        spec: (weight, bias) => ({
          kind: 'conv2d',
          inChannels: inC,
          outChannels: outC,
          kernelSize: [kh, kw],
          stride: [stride[0], stride[1]],
          padding: l.padding as 'same' | 'valid',
          dataFormat: 'NHWC',
          weight,
          bias,
          layout: 'tfjs',
        }),
        inputShape: (s) => s,
        gradShape: (s) => s,
      };
    }
    case 'BatchNormalization': {
      const broken = untrainableNormalization(layer);
      if (broken !== null || l.gamma == null) {
        return { reason: `BatchNormalization with ${broken ?? 'scale: false'}: TF.js cannot train it (its training pass fails)` };
      }
      const axis = l.axis as number;
      const rank = inputRank(layer);
      if (!(axis === -1 || (rank !== undefined && axis === rank - 1))) {
        return { reason: `BatchNormalization over axis ${axis}: only the last (channel) axis is preconditioned` };
      }
      const c = l.gamma.shape[0];
      return {
        layer,
        kind: 'batchnorm',
        weight: l.gamma,
        bias: l.beta ?? null,
        spec: (weight, bias) => ({ kind: 'batchnorm', channels: c, weight, bias, dataFormat: 'NHWC' }),
        // Rank 2 is [N, C]; rank 4 is NHWC; other ranks fold the middle axes into the spatial ones.
        inputShape: (s) => (s.length === 2 || s.length === 4 ? s : [s[0], s.slice(1, -1).reduce((a, b) => a * b, 1), 1, c]),
        gradShape: (s) => (s.length === 2 || s.length === 4 ? s : [s[0], s.slice(1, -1).reduce((a, b) => a * b, 1), 1, c]),
      };
    }
    case 'LayerNormalization': {
      const broken = untrainableNormalization(layer);
      if (broken !== null || l.gamma == null) {
        return { reason: `LayerNormalization with ${broken ?? 'scale: false'}: TF.js cannot train it (its training pass fails)` };
      }
      const axes = Array.isArray(l.axis) ? l.axis : [l.axis];
      const rank = inputRank(layer);
      if (axes.length !== 1 || !(axes[0] === -1 || (rank !== undefined && axes[0] === rank - 1))) {
        return { reason: `LayerNormalization over axis ${JSON.stringify(l.axis)}: only the last axis is preconditioned` };
      }
      const d = l.gamma.shape[0];
      return {
        layer,
        kind: 'layernorm',
        weight: l.gamma,
        bias: l.beta ?? null,
        spec: (weight, bias) => ({ kind: 'layernorm', features: d, weight, bias }),
        inputShape: (s) => s,
        gradShape: (s) => s,
      };
    }
    default:
      return { reason: `${cls} is not one of Dense, Conv2D, BatchNormalization, LayerNormalization` };
  }
}

// NOTE: [stock layers]
// The tap computes a Dense or Conv2D layer's output with TF.js's own math (NOTE: [taps]), and
// the factors of every kind assume that math: a layer whose class is one of the four but whose
// call() is not its class's (a subclass, which inherits the className, or an instance with its
// own call) is trained with momentum instead. The stock class is the one nearest the root of
// the layer's prototype chain that names itself `cls` (found by walking the chain: making an
// instance to compare with would take a name from TF.js's layer-name counters).
const PRECONDITIONED_CLASSES = new Set(['Dense', 'Conv2D', 'BatchNormalization', 'LayerNormalization']);
function stockCall(l: AnyLayer, cls: string): AnyLayer['call'] | undefined {
  if (!PRECONDITIONED_CLASSES.has(cls)) return undefined;
  let stock: AnyLayer | undefined;
  for (let p = Object.getPrototypeOf(l) as AnyLayer | null; p !== null; p = Object.getPrototypeOf(p) as AnyLayer | null) {
    const ctor = (p as { constructor?: { className?: unknown } }).constructor;
    if (ctor !== undefined && Object.prototype.hasOwnProperty.call(ctor, 'className') && ctor.className === cls) stock = p;
  }
  return stock?.call;
}

/** The layer's call() under any taps installed over it (NOTE: [stacked taps]). */
function untappedCall(l: AnyLayer): AnyLayer['call'] {
  let c = l.call;
  for (let rec = tapRecords.get(c); rec !== undefined; rec = tapRecords.get(c)) c = rec.original;
  return c;
}

type Shape = (number | null)[];
interface GraphNode {
  outboundLayer: tf.layers.Layer;
  inboundLayers: tf.layers.Layer[];
  nodeIndices: number[];
  tensorIndices: number[];
  inputShapes: Shape | Shape[];
  outputShapes: Shape | Shape[];
}
interface GraphContainer {
  name: string;
  inputLayers?: tf.layers.Layer[];
  nodesByDepth?: Record<string, GraphNode[]>;
  computeOutputShape(s: Shape | Shape[]): Shape | Shape[];
}
const shapeList = (s: Shape | Shape[]): Shape[] => (s.length > 0 && Array.isArray(s[0]) ? (s as Shape[]) : [s as Shape]);
const sameShapes = (a: Shape[], b: Shape[]) => JSON.stringify(a) === JSON.stringify(b);

/**
 * Every use of every layer in one step of `model`, with its static input shape: the nodes of the
 * model's graph, and, for each application of a nested model (Sequential or functional), the
 * nodes of that model's graph with the shapes of that application, worked out from its inputs
 * as TF.js's own Container.computeOutputShape does. (A nested backbone declared with input
 * [null, null, C] and applied by the outer model to two known image sizes uses its Conv2D at
 * both sizes.) `where` names the model whose graph holds the use.
 */
function staticUses(model: tf.LayersModel): Map<tf.layers.Layer, { shape: Shape; where: string }[]> {
  const uses = new Map<tf.layers.Layer, { shape: Shape; where: string }[]>();
  const visit = (m: GraphContainer, inputShapes: Shape[] | null, where: string, depth: number) => {
    const byDepth = m.nodesByDepth;
    if (byDepth == null || depth > 32) return;
    const known = new Map<string, Shape>();
    (m.inputLayers ?? []).forEach((l, i) => {
      if (inputShapes?.[i] != null) known.set(`${l.name}_0_0`, inputShapes[i]);
    });
    const inputLayers = new Set(m.inputLayers ?? []);
    const depths = Object.keys(byDepth).map(Number).sort((a, b) => b - a);
    for (const d of depths) {
      for (const node of byDepth[d]) {
        const layer = node.outboundLayer;
        if (inputLayers.has(layer)) continue;
        const recorded = shapeList(node.inputShapes);
        const ins = node.inboundLayers.map((l, j) => known.get(`${l.name}_${node.nodeIndices[j]}_${node.tensorIndices[j]}`) ?? recorded[j]);
        const changed = !sameShapes(ins, recorded);
        let outs = shapeList(node.outputShapes);
        if (changed) {
          try {
            outs = shapeList((layer as unknown as GraphContainer).computeOutputShape(ins.length === 1 ? ins[0] : ins));
          } catch {
            // keep the recorded output shapes
          }
        }
        const nodeIndex = (layer as unknown as { inboundNodes: GraphNode[] }).inboundNodes.indexOf(node);
        outs.forEach((s, j) => known.set(`${layer.name}_${nodeIndex}_${j}`, s));
        if (Array.isArray((layer as AnyLayer).layers)) {
          visit(layer as unknown as GraphContainer, ins, layer.name, depth + 1);
          continue;
        }
        const list = uses.get(layer) ?? [];
        list.push({ shape: ins[0], where });
        uses.set(layer, list);
      }
    }
  };
  visit(model as unknown as GraphContainer, null, model.name, 0);
  return uses;
}

/**
 * Shared layers whose uses in a model's graph have static input shapes that AdaFisher cannot
 * combine (see NOTE: [shared layers] in optimizer.ts): each with the reason. A layer's uses are
 * its nodes in the graph of the model and, for every application of a model nested in it, in
 * that model's graph with the shapes of that application (staticUses); not uses of the same
 * layer object in other models. A use whose shape is not fully known before the model runs
 * (a null dimension beyond the batch axis) is checked when the model runs instead.
 */
export function sharedShapeConflicts(model: tf.LayersModel): Map<tf.layers.Layer, string> {
  const out = new Map<tf.layers.Layer, string>();
  for (const [layer, all] of staticUses(model)) {
    const list = all.filter((u) => u.shape.length > 0 && !u.shape.slice(1).some((d) => d == null));
    if (list.length < 2) continue;
    const c = classifyLayer(layer);
    if (!('kind' in c)) continue;
    const tails = list.map((u) => JSON.stringify(c.inputShape([1, ...(u.shape.slice(1) as number[])]).slice(1)));
    const j = tails.findIndex((t) => t !== tails[0]);
    if (j < 0) continue;
    const inner = [list[0].where, list[j].where].filter((w, k, a) => w !== model.name && a.indexOf(w) === k);
    const where = inner.length === 0 ? `in model '${model.name}'` : `in nested model ${inner.map((w) => `'${w}'`).join(' and ')} as model '${model.name}' applies it`;
    out.set(
      layer,
      `shared ${layer.getClassName()} applied to inputs of different shapes ([${list[0].shape.slice(1)}] and [${list[j].shape.slice(1)}]) ` +
        `${where}: their statistics cannot be combined into one factor`,
    );
  }
  return out;
}

/**
 * classifyLayer for every layer of a model (collectLayers order), where a shared layer with
 * uses of different static shapes is not supported (sharedShapeConflicts).
 */
export function classifyModelLayers(model: tf.LayersModel): { layer: tf.layers.Layer; c: SupportedLayer | { reason: string } }[] {
  const conflicts = sharedShapeConflicts(model);
  return collectLayers(model).map((layer) => {
    const reason = conflicts.get(layer);
    return { layer, c: reason !== undefined ? { reason } : classifyLayer(layer) };
  });
}

/** Report rows for every layer of a model that has trainable weights or is a supported kind. */
export function reportLayers(model: tf.LayersModel, preconditioned: ReadonlySet<tf.layers.Layer>): LayerReport[] {
  return classifyModelLayers(model)
    .map(({ layer, c }): LayerReport | null => {
      const weights = trainableNames(layer);
      const row: LayerReport = { name: layer.name, className: layer.getClassName(), preconditioned: preconditioned.has(layer), weights };
      if ('kind' in c) row.kind = c.kind;
      if (!row.preconditioned) {
        if (weights.length === 0 && !('kind' in c)) return null;
        row.reason = 'reason' in c ? c.reason : weights.length === 0 ? 'no trainable weights (frozen)' : 'its weights are not all trained by this optimizer';
      }
      return row;
    })
    .filter((r): r is LayerReport => r !== null);
}

/** Where taps deliver what they see. `active(i)` is checked on every call; false → the original call, untouched. */
export interface TapSink {
  active(index: number): boolean;
  input(index: number, x: tf.Tensor): void;
  outputGrad(index: number, dy: tf.Tensor): void;
}

// NOTE: [taps]
// A tap replaces the `call` of one layer INSTANCE (the class and other instances are left alone)
// and is removed by restoring the original (see NOTE: [stacked taps]). The sink is active only inside the optimizer's
// computeGradients (which minimize uses) on a step that refreshes the factors; otherwise (predict, evaluate,
// tf.variableGrads, a step that does not refresh) the original call runs unchanged. While active:
//  1. the layer input is handed to the sink (kept for the step, whose native kernels reduce it
//     to H: optimizer.ts NOTE: [recorded statistics]);
//  2. Dense/Conv2D compute their pre-activation as TF.js itself does while it records gradients:
//     tf.fused.matMul/conv2d fall back to matMul/conv2d + add(bias) + activation when the
//     gradient depth is > 0 (fused_util shouldFuse), so the same ops run in the same order;
//     BatchNormalization/LayerNormalization run their original call (no activation);
//  3. the pre-activation goes through a tf.customGrad identity whose gradient function sees
//     dLoss/dPre-activation (handed to the sink, reduced to S at the step) and passes it on unchanged;
//  4. the layer's own activation object is applied to that identity's output.
// Forward values and the gradient of every variable equal the untouched layer's (a test checks
// them bit for bit). Not the layer's `call` with a 'linear' activation: TF.js then keeps the fused
// op even while training, and the fused op's gradient also computes dLoss/dInput, a third matmul
// (or conv) that the first layer of a model otherwise never pays.
// NOTE: [stacked taps]
// Several optimizers can tap one layer: recompiling a model with a new adaFisher(model) (after
// unfreezing a layer, say) installs a second tap over the first one's. Removing a tap must not
// remove the taps stacked over it, and may not restore a `call` that another tap has captured as
// its original. So removal marks the tap removed (from then on it only calls its original, a
// pass-through) and then pops every removed tap off the top of the layer's chain: the layer is as
// before once all its taps are removed, in whatever order.
interface TapRecord {
  original: AnyLayer['call'];
  /** whether `original` was the instance's own `call` (else it is the class's, restored by deleting ours) */
  hadOwn: boolean;
  removed: boolean;
}
const tapRecords = new WeakMap<AnyLayer['call'], TapRecord>();

function popRemovedTaps(l: AnyLayer): void {
  while (Object.prototype.hasOwnProperty.call(l, 'call')) {
    const rec = tapRecords.get(l.call);
    if (rec === undefined || !rec.removed) return;
    if (rec.hadOwn) l.call = rec.original;
    else delete (l as Partial<AnyLayer>).call;
  }
}

export function installTap(layer: tf.layers.Layer, supported: SupportedLayer, index: number, sink: TapSink): () => void {
  const l = layer as AnyLayer;
  const rec: TapRecord = { original: l.call, hadOwn: Object.prototype.hasOwnProperty.call(l, 'call'), removed: false };
  const original = rec.original;
  const gradTap = tfjs.customGrad(((x: tf.Tensor) => ({
    value: x.clone(),
    gradFunc: (dy: tf.Tensor) => {
      sink.outputGrad(index, dy);
      return dy;
    },
  })) as unknown as Parameters<typeof tf.customGrad>[0]);
  const pre = supported.preActivation;
  const tappedCall: AnyLayer['call'] = function tappedCall(this: AnyLayer, inputs, kwargs) {
    if (rec.removed || !sink.active(index)) return original.call(this, inputs, kwargs);
    if (Array.isArray(inputs) && inputs.length !== 1) {
      throw codedError(ErrorCodes.unsupportedLayer, `AdaFisher (TF.js): layer '${layer.name}' was called with ${inputs.length} input tensors; it takes one.`);
    }
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    sink.input(index, x);
    if (pre === undefined) return gradTap(original.call(this, inputs, kwargs) as tf.Tensor);
    const act = this.activation;
    // TF.js's Dense.call runs the layer's call hook (Layer.setCallHook) first, inside its tidy;
    // the tap computes the layer in its place, so it runs the hook too (Conv2D's call runs none).
    const hook = supported.kind === 'linear';
    const tapped = gradTap(
      tfjs.tidy(() => {
        if (hook) (this as unknown as { invokeCallHook(i: typeof inputs, k: typeof kwargs): void }).invokeCallHook(inputs, kwargs);
        return pre(x);
      }),
    );
    return act != null && act.getClassName() !== 'linear' ? act.apply(tapped) : tapped;
  };
  tapRecords.set(tappedCall, rec);
  l.call = tappedCall;
  return () => {
    rec.removed = true;
    popRemovedTaps(l);
  };
}
