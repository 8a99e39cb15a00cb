// The AdaFisher state as TF.js optimizer weights (what model.save({ includeOptimizer }) stores).
import type * as tf from '@tensorflow/tfjs';

import { codedError, ErrorCodes, typeError } from '../errors.js';
import type { AdaFisherState } from '../optimizer.js';
import { tfjs } from './tf.js';

// NOTE: [optimizer weight names]
// TF.js decodes model and optimizer weights into ONE name → tensor map, so optimizer weight
// names must never equal a model weight name. Names are built from stable identifiers that a
// saved model keeps (LayerVariable.originalName, layer names), never from tf.Variable names,
// which get `_1` suffixes when a model is loaded next to another:
//   'iter'                            int32 scalar, optimizer steps (TF.js convention: first)
//   '<weight originalName>/adafisher_m' float32, momentum of that parameter
//   'adafisher/step_counts'           int32 [tensors], per-parameter steps (bias correction)
//   '<layer name>/adafisher_H', '.../adafisher_S'  float32 running factors
// An optimizer that has not made its first step has no state to name yet (it is set up for
// the model's trainable weights at that step) and saves 'iter' = 0 alone: the fresh state,
// which restores as a fresh optimizer. Anything else must be a complete state.
/** TF.js's { name, tensor } pair (not exported by @tensorflow/tfjs's typings). */
export interface NamedTensor {
  name: string;
  tensor: tf.Tensor;
}

export const ITER = 'iter';
export const STEP_COUNTS = 'adafisher/step_counts';
export const momentumName = (key: string) => `${key}/adafisher_m`;
export const factorName = (layer: string, which: 'H' | 'S') => `${layer}/adafisher_${which}`;

/** Host copies of saved optimizer weights, by name. */
export type SavedWeights = Map<string, Float32Array | Int32Array>;

/** The names of one plan: a stable key per parameter slot and a name per preconditioned layer. */
export interface StateNames {
  slotKeys: string[];
  layerNames: string[];
}

/** Copies optimizer weights out of their tensors, synchronously (TF.js disposes them right after setWeights). */
export function readSavedWeights(weights: NamedTensor[]): SavedWeights {
  if (!Array.isArray(weights)) throw typeError('weights', 'an array of { name, tensor }', weights);
  const out: SavedWeights = new Map();
  for (const [i, w] of weights.entries()) {
    if (w?.tensor == null || typeof w.name !== 'string') throw typeError(`weights[${i}]`, '{ name: string, tensor: tf.Tensor }', w);
    const v = w.tensor.dataSync();
    out.set(w.name, w.tensor.dtype === 'int32' ? Int32Array.from(v) : Float32Array.from(v));
  }
  return out;
}

/** The weights of an optimizer that has made no step (see NOTE: [optimizer weight names]). */
export function freshSaved(): SavedWeights {
  return new Map([[ITER, Int32Array.of(0)]]);
}

/** True for what freshSaved() holds: 'iter' = 0 and nothing else. */
export function isFreshState(saved: SavedWeights): boolean {
  const iter = saved.get(ITER);
  return saved.size === 1 && iter !== undefined && iter.length === 1 && iter[0] === 0;
}

/** The state as saved weights, in the order getWeights() hands them out. */
export function stateToSaved(state: AdaFisherState, names: StateNames): SavedWeights {
  const out: SavedWeights = new Map([[ITER, Int32Array.of(state.steps)]]);
  state.momenta.forEach((m, i) => out.set(momentumName(names.slotKeys[i]), m));
  out.set(STEP_COUNTS, Int32Array.from(state.stepCounts));
  state.factors.forEach((f, j) => {
    out.set(factorName(names.layerNames[j], 'H'), f.H);
    out.set(factorName(names.layerNames[j], 'S'), f.S);
  });
  return out;
}

/** Saved weights as named tensors ('iter' a scalar; new tensors, the caller owns them). */
export function savedToTensors(saved: SavedWeights): NamedTensor[] {
  return [...saved].map(([name, v]) => ({
    name,
    tensor: tfjs.tensor(v, name === ITER ? [] : [v.length], v instanceof Int32Array ? 'int32' : 'float32'),
  }));
}

/** True when `tensors` hold exactly `saved`: the same names in the same order, dtypes and bits. */
export function tensorsHold(tensors: NamedTensor[], saved: SavedWeights): boolean {
  if (tensors.length !== saved.size) return false;
  let i = 0;
  for (const [name, v] of saved) {
    const t = tensors[i++];
    if (t.name !== name || t.tensor.isDisposed || t.tensor.dtype !== (v instanceof Int32Array ? 'int32' : 'float32') || t.tensor.size !== v.length) return false;
    const held = t.tensor.dataSync() as Float32Array | Int32Array;
    const a = new Int32Array(held.buffer, held.byteOffset, held.length);
    const b = new Int32Array(v.buffer, v.byteOffset, v.length);
    for (let k = 0; k < a.length; k++) if (a[k] !== b[k]) return false;
  }
  return true;
}

/**
 * Rebuilds a core checkpoint from saved weights, using `template` (the live optimizer's own
 * export) for structure and hyperparameters.
 * @throws {Error} code ADAFISHER_BAD_CHECKPOINT naming the first missing or mis-sized weight.
 */
export function stateFromSaved(saved: SavedWeights, template: AdaFisherState, names: StateNames): AdaFisherState {
  const bad = (msg: string) =>
    codedError(ErrorCodes.badCheckpoint, `Cannot restore the AdaFisher optimizer weights into this model: ${msg}`);
  const get = (name: string, length: number): Float32Array | Int32Array => {
    const v = saved.get(name);
    if (v === undefined) throw bad(`no saved weight '${name}' (saved: ${[...saved.keys()].slice(0, 8).join(', ')}${saved.size > 8 ? ', ...' : ''})`);
    if (v.length !== length) throw bad(`'${name}' has ${v.length} values, this model needs ${length}`);
    return v;
  };
  const iter = get(ITER, 1);
  const counts = get(STEP_COUNTS, template.tensors.length);
  return {
    ...template,
    steps: iter[0],
    stepCounts: Array.from(counts),
    momenta: template.momenta.map((m, i) => Float32Array.from(get(momentumName(names.slotKeys[i]), m.length))),
    factors: template.factors.map((f, j) => ({
      layer: f.layer,
      H: Float32Array.from(get(factorName(names.layerNames[j], 'H'), f.H.length)),
      S: Float32Array.from(get(factorName(names.layerNames[j], 'S'), f.S.length)),
    })),
  };
}
