// AdaFisher as a TF.js optimizer: model.compile({ optimizer: adaFisher(model) }).
import type * as tf from '@tensorflow/tfjs';

// First, so that a missing @tensorflow/tfjs is reported before anything else (NOTE: [loading tfjs]).
import { tfjs } from './tf.js';

import { BACKEND_NAMES, resolveBackend, type BackendName } from '../backend.js';
import type { NativeBackendName } from '../binding.js';
import { codedError, describe, ErrorCodes, rangeError, typeError, WarningCodes, withCode } from '../errors.js';
import {
  AdaFisher,
  resolveHyperparameters,
  type AdaFisherHyperparameters,
  type AdaFisherOptions,
  type LayerSpec,
  type StepResult,
} from '../optimizer.js';
import { checkFloat32, checkOneOf, checkRange } from '../validate.js';
import {
  freshSaved,
  isFreshState,
  ITER,
  momentumName,
  readSavedWeights,
  stateFromSaved,
  savedToTensors,
  stateToSaved,
  tensorsHold,
  type NamedTensor,
  type SavedWeights,
  type StateNames,
} from './serialization.js';
import {
  classifyModelLayers,
  collectLayers,
  installTap,
  reportLayers,
  untrainableNormalization,
  type LayerReport,
  type LayerVariableLike,
  type SupportedLayer,
  type TapSink,
} from './taps.js';

/** Options of the TF.js optimizer: those of the core API (lr, beta, damping, gamma | decay+mix, tcov, weightDecay, decoupled, backend, nonFiniteGuard). */
export interface AdaFisherTfjsOptions extends Omit<AdaFisherOptions, 'backend'> {
  /**
   * The native backend: 'cpu' by default in the adapter (TF.js keeps tensors in host memory;
   * NOTE: [tfjs backend default]), or ADAFISHER_BACKEND when set; 'cuda' or 'auto' on request.
   */
  backend?: BackendName | undefined;
}

/** One use of a tapped layer: its input or output gradient as TF.js handed it over. */
interface Use {
  data: Float32Array;
  /** core shape (see SupportedLayer.inputShape / gradShape) */
  shape: number[];
  /** leading (batch) dimension of the TF.js tensor: the examples this use saw */
  examples: number;
}

/**
 * What the taps saw during one gradient computation (one computeGradients call, or the one in
 * minimize): per tap (index into Plan.taps), the inputs and output gradients of every use.
 */
interface Recording {
  /** per instrumented layer (index into Instruments.layers) */
  inputs: Use[][];
  grads: Use[][];
  /** which instrumented layers this computation records: those whose weights are all in its varList */
  records: boolean[];
  /** names of the variables it computed gradients for */
  vars: Set<string>;
  /** minimize()'s own computation: its uses are checked against each other only */
  alone: boolean;
  /** the first problem a tap met (thrown once tf.variableGrads has returned; see NOTE: [taps throw late]) */
  problem: Error | null;
}

/** The taps on the model's supported layers and what they recorded since the last step. */
interface Instruments {
  layers: SupportedLayer[];
  uninstall: (() => void)[];
  /** gradient computations recorded since the last step, waiting for it (see NOTE: [recorded statistics]) */
  pending: Recording[];
  /** the computation being recorded now (inside computeGradients), or null */
  open: Recording | null;
}

interface Tap {
  supported: SupportedLayer;
  /** index into Instruments.layers */
  index: number;
  /** index into the core layer list */
  coreLayer: number;
  /** parameter slots of this layer */
  slots: number[];
}

interface Plan {
  core: AdaFisher;
  variables: tf.Variable[];
  slotOf: Map<string, number>;
  taps: Tap[];
  names: StateNames;
}

/**
 * More gradient computations than this waiting for one step draws a process warning (once per
 * optimizer): 64 micro-batches is more than gradient accumulation uses in practice (a batch of
 * 4096 from micro-batches of 64), while computeGradients calls whose gradients are never applied
 * (a skipped batch, a probe) pile up one per training step, each keeping a batch's layer inputs
 * and output gradients in host memory and all folded into the next step.
 */
export const PENDING_WARNING_THRESHOLD = 64;

/**
 * This many steps in a row skipped by the non-finite guard draws a process warning (once per
 * optimizer): `fit` goes on reporting a frozen loss while nothing trains, most often because
 * the weights diverged (a learning rate too large: the step is about lr/damping times the
 * momentum).
 */
export const SKIPPED_WARNING_THRESHOLD = 10;

const PREFIX = 'AdaFisher (TF.js):';

function checkGradientArgs(f: unknown, varList: unknown): void {
  if (typeof f !== 'function') throw typeError('f', 'a function returning the scalar loss', f);
  if (varList === undefined || varList === null) return;
  if (!Array.isArray(varList)) throw typeError('varList', 'an array of tf.Variable', varList);
  if (varList.length === 0) {
    // model.fit and trainOnBatch pass the model's trainable weights here: a model whose layers
    // are all frozen gives an empty list without the user writing any varList.
    throw rangeError(
      'varList',
      "a non-empty array of tf.Variable, or no varList (the attached model's trainable weights): nothing would be " +
        'trained (model.fit passes the trainable weights here; does the model have any left unfrozen?)',
      varList,
    );
  }
  varList.forEach((v, i) => {
    if (!(v instanceof tfjs.Variable)) throw typeError(`varList[${i}]`, 'a tf.Variable', v);
  });
}

/**
 * The uses of one layer recorded over a step, one list per gradient computation, as one batch
 * (see NOTE: [recorded statistics]): concatenated along the batch axis; with `weighted`, the
 * values of computation i scaled by its share of the examples, n_i / sum(n). A single use is
 * handed over as it is.
 */
function combine(perComputation: Use[][], weighted: boolean): Use {
  const uses = perComputation.flat();
  if (uses.length === 1) return uses[0];
  const examples = perComputation.map((us) => us.reduce((a, u) => a + u.examples, 0));
  const total = examples.reduce((a, b) => a + b, 0);
  const computations = perComputation.filter((us) => us.length > 0).length;
  const data = new Float32Array(uses.reduce((a, u) => a + u.data.length, 0));
  let at = 0;
  perComputation.forEach((us, i) => {
    const w = weighted && computations > 1 ? examples[i] / total : 1;
    for (const u of us) {
      if (w === 1) data.set(u.data, at);
      else for (let k = 0; k < u.data.length; k++) data[at + k] = w * u.data[k];
      at += u.data.length;
    }
  });
  return { data, shape: [uses.reduce((a, u) => a + u.shape[0], 0), ...uses[0].shape.slice(1)], examples: total };
}

function floatData(t: tf.Tensor): Float32Array {
  const v = t.dataSync();
  return v instanceof Float32Array ? v : Float32Array.from(v as ArrayLike<number>);
}

/** Whether shapes `a` and `b` agree from axis `from` on (the batch axis is 0). */
function sameShape(a: readonly (number | null)[], b: readonly (number | null)[], from = 0): boolean {
  if (Math.max(a.length - from, 0) !== Math.max(b.length - from, 0)) return false;
  for (let i = from; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// NOTE: [parameters copied]
// On TF.js's cpu backend dataSync() returns a variable's live backing array, and the native
// step could update it in place. It does not: arrays a program took earlier with dataSync()
// or data() (a "best weights so far" snapshot), and tensors made from them without a copy,
// alias that array, and would silently follow training. Each step works on a private copy of
// every trained variable and assigns it back as a new tensor, on every backend: one copy of
// the parameters per step (4 bytes each way per parameter, against the step's 24).

/**
 * The AdaFisher optimizer for TF.js models. Create it with adaFisher(model, options); a model
 * loaded with its optimizer (tf.loadLayersModel after save({ includeOptimizer: true })) carries
 * one that is not attached yet: call `optimizer.attach(model)` before training it.
 *
 * Training (fit, fitDataset, trainOnBatch, minimize) records each preconditioned layer's input
 * and output gradient through taps on those layers (see NOTE: [taps]) and makes one native
 * step per training step. Custom loops compute gradients with computeGradients(), which records
 * the same statistics, clip, scale or accumulate them, and call applyGradients() (see
 * NOTE: [recorded statistics]). Prediction and evaluation are not touched.
 */
export class AdaFisherOptimizer extends tfjs.Optimizer {
  static className = 'AdaFisher';

  #options: AdaFisherOptions;
  #hyper: AdaFisherHyperparameters;
  #model: tf.LayersModel | null = null;
  #plan: Plan | null = null;
  #instruments: Instruments | null = null;
  /** why nothing is pending, for MISSING_STATISTICS (null: nothing was ever recorded, or something is pending) */
  #emptiedBy: string | null = null;
  #warnedPending = false;
  #skippedInARow = 0;
  #warnedSkipped = false;
  /** set while minimize() runs its computeGradients() */
  #minimizing = false;
  /** set while minimize() runs */
  #inMinimize = false;
  #pending: SavedWeights | null = null;
  #savedTensors: NamedTensor[] = [];
  #last: StepResult | null = null;
  #timing = { statisticsMs: 0, stepMs: 0, steps: 0 };
  #disposed = false;

  /**
   * @param options hyperparameters as in the core API; checked here (whether a requested 'cuda'
   *   backend can run is checked by attach()).
   * @throws {TypeError|RangeError} naming a bad option.
   */
  constructor(options: AdaFisherTfjsOptions = {}) {
    super();
    this.#hyper = resolveHyperparameters(options);
    if (options.backend !== undefined) checkOneOf('options.backend', options.backend, BACKEND_NAMES);
    this.#options = { ...options };
  }

  #alive(): void {
    if (this.#disposed) {
      throw codedError(ErrorCodes.disposed, `${PREFIX} this optimizer was disposed. Create a new one for the model with adaFisher(model).`);
    }
  }

  // NOTE: [tfjs backend default]
  // TF.js in Node keeps tensors in host memory (cpu, wasm): the native cpu backend updates
  // them in place, while the cuda backend would copy every statistic, gradient and
  // parameter to the device and back each step. So the adapter runs on 'cpu' unless told
  // otherwise, by options.backend or ADAFISHER_BACKEND.
  #backendRequest(): BackendName | undefined {
    return this.#options.backend ?? (process.env.ADAFISHER_BACKEND ? undefined : 'cpu');
  }

  /**
   * Instruments a model's layers for this optimizer. Call once per optimizer; adaFisher() does it.
   * @returns this
   * @throws {TypeError} code ADAFISHER_INVALID_ARGUMENT when `model` is not a tf.LayersModel.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH when already attached to another model; code
   *   ADAFISHER_BACKEND_UNAVAILABLE when backend 'cuda' (option or ADAFISHER_BACKEND) cannot run
   *   here, as the core API; code ADAFISHER_DISPOSED after dispose().
   */
  attach(model: tf.LayersModel): this {
    this.#alive();
    if (!(model instanceof tfjs.LayersModel)) {
      throw withCode(
        new TypeError(`${PREFIX} Expected a tf.LayersModel (tf.sequential or tf.model) for model but received ${describe(model)}`),
        ErrorCodes.invalidArgument,
      );
    }
    if (this.#model !== null && this.#model !== model) {
      throw codedError(
        ErrorCodes.modelMismatch,
        `${PREFIX} this optimizer is already attached to model '${this.#model.name}'; an optimizer trains one model. ` +
          `Create one for model '${model.name}' with adaFisher(model).`,
      );
    }
    // Refuse a backend that cannot run now, not at the first training step. (Not in the
    // constructor: tf.loadLayersModel constructs the optimizer saved with a model, and the model
    // must load for prediction on a machine without CUDA too.)
    resolveBackend(this.#backendRequest());
    this.#model = model;
    return this;
  }

  /** The model this optimizer trains, or null when not attached. */
  get model(): tf.LayersModel | null {
    return this.#model;
  }

  /**
   * The native backend this optimizer computes on: 'cpu' unless `backend` or ADAFISHER_BACKEND
   * asks for another (which `backendInfo()` and `adafisher info`, resolving 'auto', may not show).
   * @throws {Error} code ADAFISHER_BACKEND_UNAVAILABLE when the one asked for cannot run here.
   */
  get backend(): NativeBackendName {
    // Once set up, the backend its native state lives on (ADAFISHER_BACKEND changed later
    // does not move it).
    return this.#plan?.core.backend ?? resolveBackend(this.#backendRequest());
  }

  /** The resolved hyperparameters. */
  get hyperparameters(): AdaFisherHyperparameters {
    return { ...this.#hyper };
  }

  /**
   * The learning rate. Setting it (a schedule's `optimizer.learningRate = x` in a callback)
   * takes effect from the next step and keeps the optimizer's state; see setLearningRate.
   */
  get learningRate(): number {
    return this.#hyper.lr;
  }

  set learningRate(lr: number) {
    this.#setLearningRate(lr, 'learningRate');
  }

  /**
   * Changes the learning rate from the next step on, keeping momenta, factors, step counts and
   * recorded statistics (AdaFisher.setLearningRate), as often as every step.
   * @throws {RangeError} code ADAFISHER_INVALID_ARGUMENT for an lr that is not a finite number >= 0 below 2^128.
   */
  setLearningRate(lr: number): void {
    this.#setLearningRate(lr, 'lr');
  }

  #setLearningRate(lr: number, name: string): void {
    this.#alive();
    checkFloat32(name, checkRange(name, lr, 0, Infinity));
    const hyper = resolveHyperparameters({ ...this.#options, lr });
    this.#plan?.core.setLearningRate(lr);
    this.#options = { ...this.#options, lr };
    this.#hyper = hyper;
  }

  /** The outcome of the last step (null before the first): applied false when the non-finite guard skipped it. */
  get lastStep(): StepResult | null {
    return this.#last ? { ...this.#last } : null;
  }

  /**
   * Wall time spent by this optimizer since the last resetTiming(), in two parts that do not
   * overlap: taking each preconditioned layer's input and output gradient during the
   * forward/backward pass (statisticsMs), and applyGradients (stepMs: reading gradients,
   * reducing the recorded statistics to factors on refreshing steps, the native step, writing
   * parameters back).
   */
  get timing(): { statisticsMs: number; stepMs: number; steps: number } {
    return { ...this.#timing };
  }

  resetTiming(): void {
    this.#timing = { statisticsMs: 0, stepMs: 0, steps: 0 };
  }

  /** Native optimizer steps applied so far. */
  get steps(): number {
    return this.#plan?.core.steps ?? this.iterations;
  }

  /**
   * Which layers are preconditioned and which are not (their trainable weights get plain
   * momentum), with the reason. Before the first training step this is what will happen with
   * the model's current trainable weights.
   */
  layerReport(): LayerReport[] {
    this.#alive();
    const model = this.#requireModel();
    const pre = new Set<tf.layers.Layer>();
    if (this.#plan) for (const t of this.#plan.taps) pre.add(t.supported.layer);
    else {
      const trainable = new Set((model.trainableWeights as unknown as LayerVariableLike[]).map((w) => w.name));
      for (const { layer, c } of classifyModelLayers(model)) {
        if ('kind' in c && trainable.has(c.weight.name) && (c.bias === null || trainable.has(c.bias.name))) pre.add(layer);
      }
    }
    return reportLayers(model, pre);
  }

  /**
   * One training step (TF.js's fit, fitDataset and trainOnBatch call it): computes the gradients
   * with computeGradients(), which records the layer statistics, and applies them. Statistics
   * recorded by earlier computeGradients() calls whose gradients were never applied are
   * discarded once this step's own gradients have been computed: a minimize step uses its own
   * batch's statistics only (and one whose `f` throws leaves the earlier ones pending).
   * @param varList the variables to train (default: the attached model's trainable weights).
   * @throws {TypeError|RangeError} code ADAFISHER_INVALID_ARGUMENT when `f` is not a function or
   *   `varList` not a non-empty array of tf.Variable.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH when `varList` holds a variable that is not a
   *   weight of the attached model, or one this optimizer was not set up for at its first step.
   */
  override minimize(f: () => tf.Scalar, returnCost = false, varList?: tf.Variable[]): tf.Scalar | null {
    this.#alive();
    checkGradientArgs(f, varList);
    this.#minimizing = true;
    this.#inMinimize = true;
    try {
      return super.minimize(f, returnCost, varList);
    } finally {
      this.#minimizing = false;
      this.#inMinimize = false;
    }
  }

  /**
   * Runs `f` and computes the gradients of its scalar result with respect to `varList` (default:
   * the attached model's trainable weights, the variables this optimizer trains; not every
   * trainable TF.js variable `f` touches, as TF.js's own optimizers), recording each
   * preconditioned layer's input and output gradient exactly as minimize() does. For custom
   * training loops: clip, scale or accumulate the gradients, then hand them to applyGradients().
   *
   * Everything `f` runs through the model is recorded: the statistics are those of every
   * forward and backward pass of the model inside `f` (an input gradient taken inside `f` for an
   * adversarial example, a teacher's predict() on the same model). Compute such inputs or
   * targets outside `f`.
   *
   * The statistics wait for the next step (README, "Custom training loops"): the next
   * applyGradients() combines those of every computeGradients() call since the previous step,
   * as one batch made of all their examples. For gradient accumulation where each call's loss
   * is the mean over its own examples and the gradients applied are their example-weighted mean
   * (the plain mean for micro-batches of one size), the step equals the step on one big batch,
   * unless a layer's output depends on the batch (BatchNormalization in training mode, whose
   * micro-batch statistics differ from the big batch's, or Dropout, whose masks differ).
   * Each layer's inputs and output gradients are copied and kept (host memory) until that step,
   * on steps that refresh the factors only. Calls whose gradients are not applied (a batch
   * skipped because its loss is not finite, a probe) still count: call clearStatistics() for
   * them. More than PENDING_WARNING_THRESHOLD (64) computations waiting draws one process
   * warning, code ADAFISHER_PENDING_STATISTICS. The first step, not this call, fixes which
   * variables the optimizer trains.
   * @returns `{ value, grads }` as tf.variableGrads: the caller disposes them.
   * @throws as minimize(); code ADAFISHER_UNSUPPORTED_LAYER when a layer sees inputs of different
   *   shapes within one step (see applyGradients), after disposing what was computed: a call
   *   that throws records nothing.
   */
  override computeGradients(f: () => tf.Scalar, varList?: tf.Variable[]): { value: tf.Scalar; grads: tf.NamedTensorMap } {
    this.#alive();
    const minimizing = this.#minimizing;
    this.#minimizing = false; // only the computeGradients() of that minimize
    checkGradientArgs(f, varList);
    const model = this.#requireLiveModel();
    if (varList != null) this.#checkOwnVariables(model, varList);
    const vars = varList ?? (model.trainableWeights as unknown as LayerVariableLike[]).map((w) => w.read());
    const plan = this.#plan;
    if (plan !== null) for (const v of vars) if (!plan.slotOf.has(v.name)) throw this.#unknownVariable(v.name);
    this.#checkTrainable(vars);
    const inst = this.#instrument();
    if ((plan !== null && !plan.core.willRefreshFactors) || inst.open !== null) {
      const result = this.#gradients(f, vars);
      if (minimizing) this.#consume(inst, 'discarded by minimize()');
      return result;
    }
    const names = new Set(vars.map((v) => v.name));
    const planned = plan === null ? null : new Set(plan.taps.map((t) => t.index));
    const open: Recording = {
      inputs: inst.layers.map(() => []),
      grads: inst.layers.map(() => []),
      // The first step makes a layer preconditioned only with all its weights (#createPlan); after
      // it, a preconditioned layer's statistics are recorded whenever any of its weights trains.
      records: inst.layers.map((s, i) => {
        const weight = names.has(s.weight.name);
        const bias = s.bias !== null && names.has(s.bias.name);
        return planned === null ? weight && (s.bias === null || bias) : planned.has(i) && (weight || bias);
      }),
      vars: names,
      alone: minimizing,
      problem: null,
    };
    inst.open = open;
    let result: { value: tf.Scalar; grads: tf.NamedTensorMap };
    try {
      result = this.#gradients(f, vars);
    } finally {
      inst.open = null;
    }
    if (open.problem !== null) {
      tfjs.dispose([result.value, result.grads]);
      throw open.problem;
    }
    if (minimizing) {
      // Its statistics are handed to the step at once: TF.js's arrays can stay as they are.
      inst.pending = [open];
    } else {
      // Kept beyond this call: owned copies (on the cpu backend tf.tensor(array) does not copy,
      // and a data loader may refill that array for the next micro-batch).
      for (const list of [...open.inputs, ...open.grads]) for (const u of list) u.data = u.data.slice();
      inst.pending.push(open);
      if (inst.pending.length > PENDING_WARNING_THRESHOLD && !this.#warnedPending) {
        this.#warnedPending = true;
        process.emitWarning(
          `${PREFIX} ${inst.pending.length} computeGradients() calls are waiting for one step: their layer statistics are ` +
            'kept in host memory and all combined into the next applyGradients(). If their gradients are not applied ' +
            '(a batch skipped because its loss is not finite, a probe), call optimizer.clearStatistics() after each.',
          { code: WarningCodes.pendingStatistics },
        );
      }
    }
    this.#emptiedBy = null;
    return result;
  }

  /** Gradient computations (computeGradients, or the one inside minimize) whose layer statistics wait for the next step. */
  get pendingStatistics(): number {
    return this.#instruments?.pending.length ?? 0;
  }

  /**
   * Drops the layer statistics recorded since the last step (by computeGradients calls whose
   * gradients will not be applied: call it when a custom loop skips a batch). Steps,
   * optimizer.setWeights() and dispose() clear them too (model.setWeights() does not).
   */
  clearStatistics(): void {
    this.#alive();
    if (this.#instruments !== null && this.#instruments.pending.length > 0) this.#consume(this.#instruments, 'cleared by clearStatistics()');
  }

  #consume(inst: Instruments, why: string): void {
    if (inst.pending.length > 0) this.#emptiedBy = why;
    inst.pending = [];
  }

  /**
   * One AdaFisher step with the given gradients (TF.js's minimize calls it; custom loops call it
   * with gradients from computeGradients(), clipped, scaled or accumulated). A step that
   * refreshes the factors (every step at the default tcov: 1) uses the layer statistics recorded
   * by the computeGradients() calls since the previous step, combined as one batch of all their
   * examples. Gradients from tf.variableGrads or tf.grads come with no statistics: they are
   * refused when nothing is pending, but after a computeGradients() whose gradients were not
   * applied they are accepted and the step uses that call's (stale) statistics. Every step,
   * applied or skipped by the non-finite guard, consumes the recorded statistics; one that throws
   * changes nothing (parameters, state and recorded statistics stay as they were). The first
   * step that succeeds fixes the variables this optimizer trains: those of the computeGradients()
   * calls it combines (minimize's varList, or the model's trainable weights).
   * @throws {TypeError|RangeError} code ADAFISHER_INVALID_ARGUMENT for an entry that is not
   *   `{ name, tensor }`, a gradient that is not a live tensor of its variable's shape, or a
   *   variable given twice.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH for a variable this optimizer was not set up
   *   for; code ADAFISHER_MISSING_STATISTICS when a refreshing step has gradients for a
   *   preconditioned layer but no recorded statistics for it.
   */
  override applyGradients(variableGradients: tf.NamedTensorMap | NamedTensor[]): void {
    this.#alive();
    const inst = this.#instruments;
    if (this.#plan === null && (inst === null || inst.pending.length === 0)) {
      if (this.#emptiedBy !== null) {
        throw codedError(
          ErrorCodes.missingStatistics,
          `${PREFIX} no layer statistics are pending for applyGradients(): those recorded by the last computeGradients() were ` +
            `${this.#emptiedBy}. Gradients are applied by the step after the computeGradients() calls that computed them: ` +
            'compute them again with optimizer.computeGradients(lossFn).',
        );
      }
      throw codedError(
        ErrorCodes.missingStatistics,
        `${PREFIX} applyGradients() was called before any minimize() or computeGradients(): ` +
          'AdaFisher needs the layer statistics that those record while computing the gradients (tf.variableGrads and ' +
          'tf.grads record none). Train with model.fit / fitDataset / trainOnBatch or optimizer.minimize(lossFn), or compute ' +
          'the gradients with optimizer.computeGradients(lossFn) before applyGradients.',
      );
    }
    const t0 = performance.now();
    if (variableGradients === null || typeof variableGradients !== 'object') {
      throw typeError('variableGradients', 'a map { [variable name]: tf.Tensor } or an array of { name, tensor }', variableGradients);
    }
    const isArray = Array.isArray(variableGradients);
    const entries: { name: unknown; tensor: unknown }[] = isArray
      ? (variableGradients as { name: unknown; tensor: unknown }[])
      : Object.keys(variableGradients).map((name) => ({ name, tensor: (variableGradients as tf.NamedTensorMap)[name] }));
    const model = this.#requireLiveModel();
    // Before the first step's plan exists, the model's weights give the names and shapes.
    const shapeOf = this.#plan === null ? new Map((model.weights as unknown as LayerVariableLike[]).map((w) => [w.name, w.shape])) : null;
    const given = new Map<string, string>();
    const checked: { name: string; tensor: tf.Tensor }[] = [];
    entries.forEach((e, k) => {
      const at = isArray ? `variableGradients[${k}]` : `variableGradients['${String(e?.name)}']`;
      if (e === null || typeof e !== 'object') throw typeError(at, '{ name, tensor }', e);
      if (typeof e.name !== 'string') throw typeError(`${at}.name`, 'the name of a variable (a string)', e.name);
      if (isArray && e.tensor === undefined) throw typeError(`${at}.tensor`, 'a tf.Tensor (or null)', e.tensor);
      const before = given.get(e.name);
      if (before !== undefined) {
        throw rangeError(at, `a gradient for a variable not given before (${before} is variable '${e.name}' too)`, e.name);
      }
      given.set(e.name, at);
      if (this.#plan !== null) {
        if (!this.#plan.slotOf.has(e.name)) throw this.#unknownVariable(e.name);
      } else if (!shapeOf!.has(e.name)) throw this.#unknownVariable(e.name);
      if (e.tensor == null) return;
      if (!(e.tensor instanceof tfjs.Tensor)) throw typeError(at, 'a tf.Tensor (or null)', e.tensor);
      if (e.tensor.isDisposed) {
        throw withCode(new TypeError(`${PREFIX} the gradient ${at} was disposed before applyGradients(): dispose gradients after the step.`), ErrorCodes.invalidArgument);
      }
      const shape = this.#plan?.variables[this.#plan.slotOf.get(e.name)!].shape ?? shapeOf!.get(e.name)!;
      if (!sameShape(e.tensor.shape, shape)) {
        throw rangeError(at, `a gradient of shape [${shape}] (the shape of variable '${e.name}')`, e.tensor);
      }
      checked.push({ name: e.name, tensor: e.tensor });
    });
    // The first step that succeeds fixes the trained variables (NOTE: [first step]).
    const fresh = this.#plan === null;
    const plan = this.#plan ?? this.#createPlan(model, inst!.pending);
    const n = plan.variables.length;
    const grads: (Float32Array | null)[] = new Array(n).fill(null);
    const core = plan.core;
    let result: StepResult;
    let params: Float32Array[];
    try {
      for (const { name, tensor } of checked) {
        const i = plan.slotOf.get(name);
        if (i === undefined) throw this.#unknownVariable(name);
        grads[i] = floatData(tensor);
      }
      if (core.willRefreshFactors) this.#recordStatistics(plan, grads);
      params = plan.variables.map((v) => floatData(v).slice()); // see NOTE: [parameters copied]
      result = core.step(grads, params);
    } catch (e) {
      if (fresh) core.dispose();
      throw e;
    }
    if (fresh) {
      this.#plan = plan;
      this.#pending = null;
    }
    if (inst !== null) this.#consume(inst, this.#inMinimize ? 'consumed by a minimize() step (fit, trainOnBatch) since' : 'consumed by an earlier step');
    if (result.applied) {
      plan.variables.forEach((v, i) => {
        if (grads[i] === null) return;
        const t = tfjs.tensor(params[i], v.shape, 'float32');
        v.assign(t);
        t.dispose();
      });
    }
    this.iterations_ = core.steps;
    this.#last = result;
    this.#skippedInARow = result.applied ? 0 : this.#skippedInARow + 1;
    if (this.#skippedInARow === SKIPPED_WARNING_THRESHOLD && !this.#warnedSkipped) {
      this.#warnedSkipped = true;
      const h = this.#hyper;
      process.emitWarning(
        `${PREFIX} the non-finite guard skipped the last ${SKIPPED_WARNING_THRESHOLD} steps (a gradient was NaN or ` +
          'infinite, or a layer statistic NaN): the weights have not changed since. If the loss is NaN or huge, the ' +
          `weights diverged before: lower the learning rate (the step is about lr / damping = ${h.lr / h.damping} times ` +
          'the momentum). optimizer.lastStep tells whether a step was applied.',
        { code: WarningCodes.stepsSkipped },
      );
    }
    this.#timing.stepMs += performance.now() - t0;
    this.#timing.steps++;
  }

  #unknownVariable(name: string): Error {
    const model = this.#model;
    const own = model !== null && (model.weights as unknown as LayerVariableLike[]).some((w) => w.name === name);
    if (!own) {
      return codedError(
        ErrorCodes.modelMismatch,
        `${PREFIX} variable '${name}' is not a weight of model '${model?.name}', the model this optimizer trains. ` +
          "A loss that runs another model (a GAN's generator, a frozen feature extractor) gives gradients for its " +
          "variables too when computed with tf.variableGrads or another optimizer: compute them with this optimizer's " +
          "computeGradients (whose default varList is this model's trainable weights) or pass varList, and train the other " +
          'model with its own optimizer.',
      );
    }
    return codedError(
      ErrorCodes.modelMismatch,
      `${PREFIX} variable '${name}' is not one this optimizer was set up for (the variables trained by its first step on model ` +
        `'${model?.name}'). Create a new optimizer after changing which weights are trainable.`,
    );
  }

  // NOTE: [one model per optimizer]
  // model.compile() does not tell an optimizer which model it is compiled into. One created for
  // (attached to) another model, or to a model nested in the one being trained, would find none
  // of the trained variables among its model's layers and train them all with plain momentum,
  // silently. So every variable it is asked to train must be a weight of the attached model
  // (nested models, shared layers and layers it does not precondition included).
  #checkOwnVariables(model: tf.LayersModel, varList: tf.Variable[]): void {
    const own = new Set((model.weights as unknown as LayerVariableLike[]).map((w) => w.read()));
    for (const v of varList) {
      if (own.has(v)) continue;
      throw codedError(
        ErrorCodes.modelMismatch,
        `${PREFIX} variable '${v.name}' is not a weight of model '${model.name}', the model this optimizer is attached to. ` +
          'An AdaFisher optimizer trains the model it was created for: compile each model with its own, ' +
          'model.compile({ optimizer: adaFisher(model) }), or call optimizer.attach(model) on the model it will train ' +
          '(a model loaded with tf.loadLayersModel carries its optimizer detached).',
      );
    }
  }

  // NOTE: [recorded statistics]
  // A refreshing step needs H and S for every preconditioned layer. The taps keep what they see
  // per gradient computation (TF.js's arrays for minimize's own computation, consumed at once;
  // owned copies for a computeGradients call, whose arrays may alias a caller's buffer that is
  // refilled before the step: on the cpu backend tf.tensor(array) does not copy), and the step hands
  // each layer's uses to the native reduction as ONE batch: the inputs concatenated along the
  // batch axis (H is a mean over rows, so this is the example-count-weighted mean of the
  // computations' H), and the output gradients concatenated after scaling those of computation
  // i by w_i = n_i / sum(n), n_i its examples. With a loss that is the mean over each
  // computation's examples, g_i = (B / n_i) g_big for the same example in one big batch of B,
  // and the applied gradient is the n_i/B-weighted mean of the computations' gradients: the
  // scaled rows are exactly the big batch's output gradients, so S (a mean of squares, which
  // scales as 1/B^2 with a mean loss; docs/ALGORITHM.md) and the norm layers' squared sums are
  // the big batch's (for layers whose outputs do not depend on the batch: BatchNormalization in
  // training mode and Dropout see each micro-batch alone). One computation (minimize, or an
  // unaccumulated custom loop) gives w = 1: its arrays go to the native kernels as they are. Fresh statistics cannot be read back from
  // the core API, so they cannot be reduced per computation and combined afterwards: hence the
  // arrays are kept until the step, and uses whose shapes differ beyond the batch axis (a
  // shared Conv2D on two image sizes) cannot be combined (NOTE: [shared layers]).
  // A layer none of whose parameters has a gradient this step (frozen in this call, or cut off
  // from the loss) gets its own running factors as the fresh estimate; a layer with gradients
  // but no statistics means the gradients were not computed by minimize/computeGradients.
  #recordStatistics(plan: Plan, grads: (Float32Array | null)[]): void {
    const work: { tap: Tap; H: Use; S: Use }[] = [];
    const missing: Tap[] = [];
    const pending = this.#instruments?.pending ?? [];
    plan.taps.forEach((t) => {
      const inputs = pending.map((r) => r.inputs[t.index]);
      const outGrads = pending.map((r) => r.grads[t.index]);
      const hasInput = inputs.some((u) => u.length > 0);
      const hasGrad = outGrads.some((u) => u.length > 0);
      if (hasInput && hasGrad) {
        work.push({ tap: t, H: combine(inputs, false), S: combine(outGrads, true) });
        return;
      }
      if (t.slots.some((s) => grads[s] !== null)) {
        const why =
          pending.length === 0 && this.#emptiedBy !== null
            ? ` The statistics recorded by the last computeGradients() were ${this.#emptiedBy}: gradients are applied once, ` +
              'by the step after the computeGradients() calls that computed them (compute them again after clearStatistics(), ' +
              'minimize(), fit or a step).'
            : '';
        throw codedError(
          ErrorCodes.missingStatistics,
          `${PREFIX} no ${hasInput ? 'output gradient' : 'input'} was recorded for layer '${t.supported.layer.name}' for this step.${why} ` +
            'Gradients must come from optimizer.minimize() (model.fit, fitDataset and trainOnBatch use it) or ' +
            'optimizer.computeGradients(lossFn), which record the layer statistics that AdaFisher needs; ' +
            'tf.variableGrads and tf.grads record none.',
        );
      }
      missing.push(t);
    });
    // Every layer in one native call (on cuda, the reductions of several layers share launches).
    plan.core.recordFactors(
      work.map(({ tap, H, S }) => ({ layer: tap.coreLayer, input: H.data, inputShape: H.shape, outputGrad: S.data, outputGradShape: S.shape })),
    );
    if (missing.length > 0) plan.core.reuseRunningFactors(missing.map((t) => t.coreLayer));
  }

  // The attached model, all of whose weights are alive: a model disposed under the optimizer
  // (model.dispose()) is a coded error before anything is read or changed, not TF.js's uncoded
  // "LayersVariable ... is already disposed" from the middle of a step.
  #requireLiveModel(): tf.LayersModel {
    const model = this.#requireModel();
    const gone = (model.weights as unknown as (LayerVariableLike & { val?: tf.Variable })[]).find((w) => w.val?.isDisposed === true);
    if (gone !== undefined) {
      throw codedError(
        ErrorCodes.disposed,
        `${PREFIX} weight '${gone.name}' of the model this optimizer trains was disposed (model.dispose()?); nothing was changed.`,
      );
    }
    return model;
  }

  #requireModel(): tf.LayersModel {
    if (this.#model === null) {
      throw codedError(
        ErrorCodes.modelMismatch,
        `${PREFIX} this optimizer is not attached to a model. A model loaded with tf.loadLayersModel() carries its ` +
          'AdaFisher optimizer detached: call model.optimizer.attach(model) before training.',
      );
    }
    return this.#model;
  }

  // TF.js's gradient computation; a failure that TF.js's own normalization layers cause (they
  // fail the same way under tf.train.adam) comes back saying which layer and why.
  #gradients(f: () => tf.Scalar, vars: tf.Variable[]): { value: tf.Scalar; grads: tf.NamedTensorMap } {
    try {
      return super.computeGradients(f, vars);
    } catch (e) {
      if (!(e instanceof Error) || (e as Error & { code?: unknown }).code !== undefined) throw e;
      const culprits = collectLayers(this.#requireModel())
        .map((layer) => ({ layer, why: untrainableNormalization(layer) }))
        .filter((c) => c.why !== null);
      if (culprits.length === 0) throw e;
      const list = culprits.map((c) => `${c.layer.getClassName()} layer '${c.layer.name}' (${c.why})`).join(', ');
      const err = codedError(
        ErrorCodes.unsupportedLayer,
        `${PREFIX} TF.js failed while computing the gradients ("${e.message}"). The model has ${list}: TF.js ` +
          `${tfjs.version.tfjs} cannot train ${culprits.length > 1 ? 'these' : 'this'} (fit with tf.train.adam fails the ` +
          'same way). Keep center and scale on (the default) and normalize over the last axis.',
      );
      (err as Error & { cause?: unknown }).cause = e;
      throw err;
    }
  }

  // Where TF.js itself cannot train a layer, say so before it fails deep inside TF.js.
  #checkTrainable(varList: tf.Variable[]): void {
    const names = new Set(varList.map((v) => v.name));
    const backend = tfjs.getBackend();
    for (const layer of collectLayers(this.#requireModel())) {
      if (layer.getClassName() !== 'Conv2D') continue;
      const trained = (layer.trainableWeights as unknown as LayerVariableLike[]).some((w) => names.has(w.name));
      if (!trained) continue;
      const dil = (layer as unknown as { dilationRate: number | number[] }).dilationRate;
      if ((Array.isArray(dil) ? dil : [dil]).some((d) => d !== 1)) {
        throw codedError(
          ErrorCodes.unsupportedLayer,
          `${PREFIX} Conv2D layer '${layer.name}' has dilationRate ${JSON.stringify(dil)}: TF.js ${tfjs.version.tfjs} cannot compute ` +
            'gradients of dilated convolutions, so no optimizer can train it. Freeze it (layer.trainable = false) or use dilationRate 1.',
        );
      }
      if (backend === 'wasm') {
        throw codedError(
          ErrorCodes.unsupportedLayer,
          `${PREFIX} Conv2D layer '${layer.name}' cannot be trained on the TF.js 'wasm' backend: TF.js ${tfjs.version.tfjs} has no ` +
            "wasm kernel for Conv2D's weight gradient (Conv2DBackpropFilter). Train it on the 'cpu' backend (await tf.setBackend('cpu')).",
        );
      }
    }
  }

  // The taps, installed at the first computeGradients (or minimize) on every layer AdaFisher can
  // precondition; each computation records the layers whose weights are all in its varList.
  #instrument(): Instruments {
    if (this.#instruments) return this.#instruments;
    const model = this.#requireModel();
    const layers: SupportedLayer[] = [];
    for (const { c } of classifyModelLayers(model)) if ('kind' in c) layers.push(c);
    const inst: Instruments = { layers, uninstall: [], pending: [], open: null };
    const sink = AdaFisherOptimizer.#weakSink(new WeakRef(this), new WeakRef(inst));
    inst.uninstall = layers.map((s, i) => installTap(s.layer, s, i, sink));
    this.#instruments = inst;
    return inst;
  }

  // NOTE: [weak taps]
  // The taps live on the model's layers, and TF.js keeps layers reachable after model.dispose()
  // (its cache of sorted graphs holds their symbolic tensors, up to 100 entries). A sink holding
  // the optimizer kept it, its recorded statistics and its native state alive with them: a
  // search that disposes only its models kept every optimizer. The sink reaches the optimizer
  // and its instruments through weak references only (built in a scope of its own, so no
  // closure captures them strongly); while the model's compile() holds the optimizer they stay.
  static #weakSink(self: WeakRef<AdaFisherOptimizer>, instruments: WeakRef<Instruments>): TapSink {
    return {
      active: (i) => {
        const open = instruments.deref()?.open;
        return open != null && open.records[i];
      },
      input: (i, x) => AdaFisherOptimizer.#recordWeak(self, instruments, i, 'input', x),
      outputGrad: (i, dy) => AdaFisherOptimizer.#recordWeak(self, instruments, i, 'grad', dy),
    };
  }

  static #recordWeak(self: WeakRef<AdaFisherOptimizer>, instruments: WeakRef<Instruments>, index: number, which: 'input' | 'grad', x: tf.Tensor): void {
    const opt = self.deref();
    const inst = instruments.deref();
    if (opt !== undefined && inst !== undefined) opt.#record(inst, index, which, x);
  }

  // NOTE: [first step]
  // The trained variables are fixed by the first step that succeeds, not by the first
  // computeGradients (a probe of some layers' gradients, one that throws, one never applied):
  // they are the variables of the computations that step combines (minimize's varList, or the
  // model's trainable weights), in the model's weight order. Built here, kept by applyGradients
  // only when the step succeeds.
  #createPlan(model: tf.LayersModel, pending: Recording[]): Plan {
    // The core is built over arrays of its own: every step hands it fresh copies of the
    // variables' values (NOTE: [parameters copied]), and TF.js variables may share one data
    // array (two biases assigned from one tf.zeros), which the core's storage check refuses.
    const slotArray = (v: tf.Variable) => new Float32Array(v.size);
    const weights = model.weights as unknown as LayerVariableLike[];
    const lvByName = new Map(weights.map((w) => [w.name, w]));
    const wanted = new Set(pending.flatMap((r) => [...r.vars]));
    // A restored state names the variables it was trained on (their momenta, NOTE: [optimizer
    // weight names]): those stay in the plan even when frozen since (a checkpoint taken after
    // freezing layers resumes; the frozen ones get no gradients). A variable it lacks fails
    // the restore, naming the missing weight.
    const restored = this.#pending;
    if (restored !== null) for (const w of weights) if (restored.has(momentumName(w.originalName))) wanted.add(w.name);
    const vars = weightsInLayerOrder(model).map((w) => w.read()).filter((v) => wanted.has(v.name));
    const byName = new Map(vars.map((v) => [v.name, v]));
    for (const v of vars) {
      if (v.dtype !== 'float32') {
        throw withCode(new TypeError(`${PREFIX} variable '${v.name}' is ${v.dtype}; AdaFisher trains float32 variables.`), ErrorCodes.invalidArgument);
      }
    }
    const inst = this.#instruments!;
    const specs: LayerSpec[] = [];
    const variables: tf.Variable[] = [];
    const slotKeys: string[] = [];
    const layerNames: string[] = [];
    const taps: Tap[] = [];
    const used = new Set<string>();
    const addSlot = (v: tf.Variable) => {
      variables.push(v);
      slotKeys.push(lvByName.get(v.name)?.originalName ?? v.name);
      used.add(v.name);
      return variables.length - 1;
    };
    inst.layers.forEach((c, index) => {
      const w = byName.get(c.weight.name);
      const b = c.bias === null ? null : byName.get(c.bias.name);
      if (w === undefined || b === undefined) return;
      const coreLayer = specs.length;
      specs.push(c.spec(slotArray(w), b === null ? null : slotArray(b)));
      const slots = [addSlot(w)];
      if (b !== null) slots.push(addSlot(b));
      layerNames.push(c.layer.name);
      taps.push({ supported: c, index, coreLayer, slots });
    });
    for (const v of vars) {
      if (used.has(v.name)) continue;
      specs.push({ kind: 'param', param: slotArray(v) });
      addSlot(v);
    }
    const core = new AdaFisher(specs, { ...this.#options, backend: this.#backendRequest() });
    const plan: Plan = { core, variables, slotOf: new Map(variables.map((v, i) => [v.name, i])), taps, names: { slotKeys, layerNames } };
    if (this.#pending) {
      try {
        core.loadState(stateFromSaved(this.#pending, core.exportState(), plan.names));
      } catch (e) {
        core.dispose();
        throw e;
      }
    }
    return plan;
  }

  // NOTE: [shared layers]
  // Keeps one use of a layer for the step (see NOTE: [recorded statistics]). A layer used several
  // times in one step (a shared layer, or accumulated micro-batches) is reduced over all its uses
  // together, as one larger batch, which needs the uses to agree beyond the batch axis. Checked
  // here, in the forward (or backward) pass, before any gradient is applied. A shared layer whose
  // uses have different static shapes in the model's graph is not preconditioned at all
  // (taps.ts, sharedShapeConflicts); this catches the shapes only known when the model runs.
  // NOTE: [taps throw late]
  // A problem met here is kept and thrown by computeGradients once tf.variableGrads has returned
  // (disposing its result): thrown from inside variableGrads it would leak the tensors of the
  // half-done computation and leave TF.js's gradient tape open.
  #record(inst: Instruments, index: number, which: 'input' | 'grad', x: tf.Tensor): void {
    const open = inst.open;
    if (open === null || open.problem !== null) return;
    const t0 = performance.now();
    const s = inst.layers[index];
    const use: Use = {
      data: floatData(x),
      shape: which === 'input' ? s.inputShape(x.shape) : s.gradShape(x.shape),
      examples: x.shape[0] ?? 1,
    };
    const kind = which === 'input' ? 'inputs' : 'grads';
    let first: Use | undefined;
    if (!open.alone) for (const r of inst.pending) if ((first = r[kind][index][0]) !== undefined) break;
    first ??= open[kind][index][0];
    if (first !== undefined && !sameShape(first.shape, use.shape, 1)) {
      open.problem = codedError(
        ErrorCodes.unsupportedLayer,
        `${PREFIX} layer '${s.layer.name}' is used with ${which === 'input' ? 'inputs' : 'output gradients'} of different shapes ` +
          `in one step ([${first.shape}] and [${use.shape}]): a shared layer applied to inputs of two sizes, or gradients ` +
          'accumulated over micro-batches of different sizes. AdaFisher combines the uses of a layer within a step only ' +
          'when their shapes agree beyond the batch axis: give each input size its own layer, accumulate micro-batches of ' +
          'one size per step, or freeze the layer (layer.trainable = false).',
      );
      return;
    }
    open[kind][index].push(use);
    this.#timing.statisticsMs += performance.now() - t0;
  }

  /**
   * The full state as named tensors (TF.js calls this in model.save({ includeOptimizer: true })).
   * The tensors stay valid until a getWeights() call made after the state changed, or dispose():
   * calls while the state is unchanged return the same tensors, so saves that run at once (a
   * checkpoint and an upload) do not dispose each other's weights while TF.js encodes them.
   */
  override async getWeights(): Promise<NamedTensor[]> {
    this.#alive();
    // Restored but not set up for the model yet: what was restored.
    const saved =
      this.#plan !== null ? stateToSaved(this.#plan.core.exportState(), this.#plan.names) : (this.#pending ?? freshSaved());
    // A copy of the list each time: a caller that edits its array cannot hide a tensor from the next dispose.
    if (tensorsHold(this.#savedTensors, saved)) return this.#savedTensors.slice();
    tfjs.dispose(this.#savedTensors.map((w) => w.tensor));
    this.#savedTensors = [];
    this.#savedTensors = savedToTensors(saved);
    return this.#savedTensors.slice();
  }

  /**
   * Restores the state saved by getWeights() (TF.js calls this when loading a model saved with
   * its optimizer). Before attach() and the first training step the values are kept and applied
   * when the optimizer is set up for the model. The weights of an optimizer saved before its
   * first step restore a fresh optimizer (set up for the model's trainable weights at the next step).
   * @throws {Error} code ADAFISHER_BAD_CHECKPOINT when the weights do not fit the model: at once once the optimizer has
   *   trained (has its plan), else at the first training step, which builds the plan and loads them (nothing changes then).
   */
  override async setWeights(weightValues: NamedTensor[]): Promise<void> {
    this.#alive();
    const saved = readSavedWeights(weightValues);
    if (isFreshState(saved)) {
      this.#dropPlan();
      this.#pending = null;
      this.iterations_ = 0;
      return;
    }
    if (this.#instruments !== null) this.#consume(this.#instruments, 'cleared by optimizer.setWeights()');
    if (this.#plan === null) {
      // Loaded at the first step (it needs the plan); the step count shows at once, as TF.js's
      // own optimizers show theirs. A malformed 'iter' fails at that step, with the rest.
      this.#pending = saved;
      const iter = saved.get(ITER);
      if (iter !== undefined && iter.length === 1 && Number.isSafeInteger(iter[0]) && iter[0] >= 0) this.iterations_ = iter[0];
      return;
    }
    const core = this.#plan.core;
    core.loadState(stateFromSaved(saved, core.exportState(), this.#plan.names));
    this.iterations_ = core.steps;
  }

  // Back to no plan: taps removed, native state freed; the next step sets up a fresh one.
  #dropPlan(): void {
    if (this.#instruments !== null) {
      this.#instruments.uninstall.forEach((u) => u());
      if (this.#instruments.pending.length > 0) this.#emptiedBy = 'cleared by optimizer.setWeights()';
      this.#instruments = null;
    }
    if (this.#plan === null) return;
    this.#plan.core.dispose();
    this.#plan = null;
    this.#last = null;
  }

  /** The hyperparameters, and the backend when one was asked for (what model.save stores in its training config). */
  override getConfig(): tf.serialization.ConfigDict {
    const h = this.#hyper;
    const backend = this.#options.backend;
    return {
      lr: h.lr,
      beta: h.beta,
      damping: h.damping,
      decay: h.decay,
      mix: h.mix,
      tcov: h.tcov,
      weightDecay: h.weightDecay,
      decoupled: h.decoupled,
      nonFiniteGuard: h.nonFiniteGuard,
      ...(backend !== undefined ? { backend } : {}),
    };
  }

  static override fromConfig<T extends tf.serialization.Serializable>(
    cls: tf.serialization.SerializableConstructor<T>,
    config: tf.serialization.ConfigDict,
  ): T {
    // TF.js adds its own entries (customObjects) to the stored config: keep the hyperparameters.
    const keys = ['lr', 'beta', 'damping', 'decay', 'mix', 'tcov', 'weightDecay', 'decoupled', 'nonFiniteGuard', 'backend'] as const;
    const options: Record<string, unknown> = {};
    for (const k of keys) if (config[k] !== undefined) options[k] = config[k];
    return new cls(options as AdaFisherTfjsOptions);
  }

  /**
   * Frees the native state, removes the taps (the model's layers are as before) and drops saved
   * tensors. Further training, attach, getWeights and setWeights throw code ADAFISHER_DISPOSED. Idempotent.
   */
  override dispose(): void {
    this.#disposed = true;
    this.#pending = null;
    this.#dropPlan();
    tfjs.dispose(this.#savedTensors.map((w) => w.tensor));
    this.#savedTensors = [];
    super.dispose();
  }
}

tfjs.serialization.registerClass(AdaFisherOptimizer);

/**
 * The model's weights in layer order (nested models walked in place), whatever is trainable
 * now: `model.weights` lists the trainable weights first, so freezing a layer would reorder the
 * plan's slots, and the step counts a checkpoint keeps by position (NOTE: [optimizer weight
 * names]) would go to other variables. With the same weights trainable the order is the same.
 */
function weightsInLayerOrder(model: tf.LayersModel): LayerVariableLike[] {
  const byName = new Map<string, LayerVariableLike>();
  for (const layer of collectLayers(model)) for (const w of layer.weights as unknown as LayerVariableLike[]) if (!byName.has(w.name)) byName.set(w.name, w);
  for (const w of model.weights as unknown as LayerVariableLike[]) if (!byName.has(w.name)) byName.set(w.name, w);
  return [...byName.values()];
}
