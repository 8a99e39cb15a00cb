// AdaFisher as a TF.js optimizer: model.compile({ optimizer: adaFisher(model) }).
import type * as tf from '@tensorflow/tfjs';

// First, so that a missing @tensorflow/tfjs is reported before anything else (NOTE: [loading tfjs]).
import { tfjs } from './tf.js';

import { BACKEND_NAMES, resolveBackend, type BackendName } from '../backend.js';
import { codedError, describe, ErrorCodes, rangeError, typeError, withCode } from '../errors.js';
import {
  AdaFisher,
  resolveHyperparameters,
  type AdaFisherHyperparameters,
  type AdaFisherOptions,
  type LayerSpec,
  type StepResult,
} from '../optimizer.js';
import { checkOneOf } from '../validate.js';
import {
  freshStateTensors,
  isFreshState,
  ITER,
  readSavedWeights,
  stateFromSaved,
  stateToTensors,
  type NamedTensor,
  type SavedWeights,
  type StateNames,
} from './serialization.js';
import {
  classifyModelLayers,
  collectLayers,
  installTap,
  reportLayers,
  type LayerReport,
  type LayerVariableLike,
  type SupportedLayer,
  type TapSink,
} from './taps.js';

/** Options of the TF.js optimizer: those of the core API (lr, beta, damping, gamma | decay+mix, tcov, weightDecay, decoupled, backend, nonFiniteGuard). */
export type AdaFisherTfjsOptions = AdaFisherOptions;

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
  inputs: Use[][];
  grads: Use[][];
}

interface Tap {
  supported: SupportedLayer;
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
  uninstall: (() => void)[];
  /** gradient computations recorded since the last step, waiting for it (see NOTE: [recorded statistics]) */
  pending: Recording[];
  /** the computation being recorded now (inside computeGradients), or null */
  open: Recording | null;
}

const PREFIX = 'AdaFisher (TF.js):';

function checkGradientArgs(f: unknown, varList: unknown): void {
  if (typeof f !== 'function') throw typeError('f', 'a function returning the scalar loss', f);
  if (varList === undefined || varList === null) return;
  if (!Array.isArray(varList)) throw typeError('varList', 'an array of tf.Variable', varList);
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
  /** set while minimize() runs its computeGradients() */
  #minimizing = false;
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
    this.setLearningRate(lr);
  }

  /**
   * Changes the learning rate from the next step on, keeping momenta, factors and step
   * counts (AdaFisher.setLearningRate: the state moves through a checkpoint, so per epoch or
   * every few hundred steps rather than every step of a large model).
   * @throws {RangeError} code ADAFISHER_INVALID_ARGUMENT for an lr that is not a finite number >= 0.
   */
  setLearningRate(lr: number): void {
    this.#alive();
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
   * discarded first: a minimize step uses its own batch's statistics only.
   * @throws {TypeError} code ADAFISHER_INVALID_ARGUMENT when `f` is not a function or `varList`
   *   not an array of tf.Variable.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH when `varList` holds a variable that is not a
   *   weight of the attached model, or one this optimizer was not set up for at its first step.
   */
  override minimize(f: () => tf.Scalar, returnCost = false, varList?: tf.Variable[]): tf.Scalar | null {
    this.#alive();
    checkGradientArgs(f, varList);
    this.#minimizing = true;
    try {
      return super.minimize(f, returnCost, varList);
    } finally {
      this.#minimizing = false;
    }
  }

  /**
   * Runs `f` and computes the gradients of its scalar result with respect to `varList` (default:
   * every trainable variable, as TF.js's own optimizers), recording each preconditioned layer's
   * input and output gradient exactly as minimize() does. For custom training loops: clip,
   * scale or accumulate the gradients, then hand them to applyGradients().
   *
   * The statistics wait for the next step (README, "Custom training loops"): the next
   * applyGradients() combines those of every computeGradients() call since the previous step,
   * as one batch made of all their examples. That is exact for gradient accumulation where each
   * call's loss is the mean over its own examples and the gradients applied are their
   * example-weighted mean (the plain mean for micro-batches of one size): the step equals the
   * step on one big batch. Each layer's inputs and output gradients are kept (host memory) until
   * that step, on steps that refresh the factors only. clearStatistics() drops them, for a
   * computeGradients() whose gradients you do not apply.
   * @returns `{ value, grads }` as tf.variableGrads: the caller disposes them.
   * @throws as minimize(); code ADAFISHER_UNSUPPORTED_LAYER when a layer sees inputs of different
   *   shapes within one step (see applyGradients).
   */
  override computeGradients(f: () => tf.Scalar, varList?: tf.Variable[]): { value: tf.Scalar; grads: tf.NamedTensorMap } {
    this.#alive();
    checkGradientArgs(f, varList);
    varList ??= undefined; // TF.js reads null as "every trainable variable", as undefined
    const model = this.#requireModel();
    if (varList !== undefined) this.#checkOwnVariables(model, varList);
    const plan = this.#ensurePlan(varList);
    for (const v of varList ?? []) if (!plan.slotOf.has(v.name)) throw this.#unknownVariable(v.name);
    this.#checkTrainable(varList ?? plan.variables);
    if (this.#minimizing) {
      this.#minimizing = false; // only the computeGradients() of that minimize
      plan.pending = [];
    }
    if (!plan.core.willRefreshFactors || plan.open !== null) return super.computeGradients(f, varList);
    const open: Recording = { inputs: plan.taps.map(() => []), grads: plan.taps.map(() => []) };
    plan.open = open;
    try {
      const result = super.computeGradients(f, varList);
      plan.pending.push(open);
      return result;
    } finally {
      plan.open = null;
    }
  }

  /** Gradient computations (computeGradients, or the one inside minimize) whose layer statistics wait for the next step. */
  get pendingStatistics(): number {
    return this.#plan?.pending.length ?? 0;
  }

  /**
   * Drops the layer statistics recorded since the last step (by computeGradients calls whose
   * gradients will not be applied). Steps, setWeights() and dispose() clear them too.
   */
  clearStatistics(): void {
    this.#alive();
    if (this.#plan) this.#plan.pending = [];
  }

  /**
   * One AdaFisher step with the given gradients (TF.js's minimize calls it; custom loops call it
   * with gradients from computeGradients(), clipped, scaled or accumulated). A step that
   * refreshes the factors (every step at the default tcov: 1) uses the layer statistics recorded
   * by the computeGradients() calls since the previous step, combined as one batch of all their
   * examples; gradients from tf.variableGrads or tf.grads come with no statistics. Every step,
   * applied or skipped by the non-finite guard, consumes the recorded statistics; one that throws
   * changes nothing (parameters, state and recorded statistics stay as they were).
   * @throws {TypeError|RangeError} code ADAFISHER_INVALID_ARGUMENT for a gradient that is not a
   *   tensor of its variable's size.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH for a variable this optimizer was not set up
   *   for; code ADAFISHER_MISSING_STATISTICS when a refreshing step has gradients for a
   *   preconditioned layer but no recorded statistics for it.
   */
  override applyGradients(variableGradients: tf.NamedTensorMap | NamedTensor[]): void {
    this.#alive();
    const plan = this.#plan;
    if (plan === null) {
      throw codedError(
        ErrorCodes.missingStatistics,
        `${PREFIX} applyGradients() was called before any minimize() or computeGradients(): AdaFisher needs the layer ` +
          'statistics that those record while computing the gradients (tf.variableGrads and tf.grads record none). ' +
          'Train with model.fit / fitDataset / trainOnBatch or optimizer.minimize(lossFn), or compute the gradients with ' +
          'optimizer.computeGradients(lossFn) before applyGradients.',
      );
    }
    const t0 = performance.now();
    if (variableGradients === null || typeof variableGradients !== 'object') {
      throw typeError('variableGradients', 'a map { [variable name]: tf.Tensor } or an array of { name, tensor }', variableGradients);
    }
    const entries = Array.isArray(variableGradients)
      ? variableGradients
      : Object.keys(variableGradients).map((name) => ({ name, tensor: variableGradients[name] }));
    const n = plan.variables.length;
    const grads: (Float32Array | null)[] = new Array(n).fill(null);
    entries.forEach((e, k) => {
      const at = Array.isArray(variableGradients) ? `variableGradients[${k}]` : `variableGradients['${e?.name}']`;
      if (e === null || typeof e !== 'object') throw typeError(at, '{ name, tensor }', e);
      const i = plan.slotOf.get(e.name);
      if (i === undefined) throw this.#unknownVariable(e.name);
      if (e.tensor == null) return;
      if (!(e.tensor instanceof tfjs.Tensor)) throw typeError(at, 'a tf.Tensor (or null)', e.tensor);
      if (e.tensor.size !== plan.variables[i].size) {
        throw rangeError(at, `a gradient of ${plan.variables[i].size} elements (variable '${e.name}' has shape [${plan.variables[i].shape}])`, e.tensor);
      }
      grads[i] = floatData(e.tensor);
    });
    const core = plan.core;
    if (core.willRefreshFactors) this.#recordStatistics(plan, grads);
    const params = plan.variables.map((v) => floatData(v).slice()); // see NOTE: [parameters copied]
    const result = core.step(grads, params);
    plan.pending = [];
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
    this.#timing.stepMs += performance.now() - t0;
    this.#timing.steps++;
  }

  #unknownVariable(name: string): Error {
    return codedError(
      ErrorCodes.modelMismatch,
      `${PREFIX} variable '${name}' is not one this optimizer was set up for (the trainable weights of model ` +
        `'${this.#model?.name}' at its first training step). Create a new optimizer after changing which weights are trainable.`,
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
  // (TF.js's arrays, no copy on the cpu backend) per gradient computation, and the step hands
  // each layer's uses to the native reduction as ONE batch: the inputs concatenated along the
  // batch axis (H is a mean over rows, so this is the example-count-weighted mean of the
  // computations' H), and the output gradients concatenated after scaling those of computation
  // i by w_i = n_i / sum(n), n_i its examples. With a loss that is the mean over each
  // computation's examples, g_i = (B / n_i) g_big for the same example in one big batch of B,
  // and the applied gradient is the n_i/B-weighted mean of the computations' gradients: the
  // scaled rows are exactly the big batch's output gradients, so S (a mean of squares, which
  // scales as 1/B^2 with a mean loss; docs/ALGORITHM.md) and the norm layers' squared sums are
  // the big batch's. One computation (minimize, or an unaccumulated custom loop) gives w = 1:
  // its arrays go to the native kernels as they are. Fresh statistics cannot be read back from
  // the core API, so they cannot be reduced per computation and combined afterwards: hence the
  // arrays are kept until the step, and uses whose shapes differ beyond the batch axis (a
  // shared Conv2D on two image sizes) cannot be combined (NOTE: [shared layers]).
  // A layer none of whose parameters has a gradient this step (frozen in this call, or cut off
  // from the loss) gets its own running factors as the fresh estimate; a layer with gradients
  // but no statistics means the gradients were not computed by minimize/computeGradients.
  #recordStatistics(plan: Plan, grads: (Float32Array | null)[]): void {
    const work: { tap: Tap; H: Use; S: Use }[] = [];
    const missing: Tap[] = [];
    plan.taps.forEach((t, i) => {
      const inputs = plan.pending.map((r) => r.inputs[i]);
      const outGrads = plan.pending.map((r) => r.grads[i]);
      const hasInput = inputs.some((u) => u.length > 0);
      const hasGrad = outGrads.some((u) => u.length > 0);
      if (hasInput && hasGrad) {
        work.push({ tap: t, H: combine(inputs, false), S: combine(outGrads, true) });
        return;
      }
      if (t.slots.some((s) => grads[s] !== null)) {
        throw codedError(
          ErrorCodes.missingStatistics,
          `${PREFIX} no ${hasInput ? 'output gradient' : 'input'} was recorded for layer '${t.supported.layer.name}' for this step. ` +
            'Gradients must come from optimizer.minimize() (model.fit, fitDataset and trainOnBatch use it) or ' +
            'optimizer.computeGradients(lossFn), which record the layer statistics that AdaFisher needs; ' +
            'tf.variableGrads and tf.grads record none.',
        );
      }
      missing.push(t);
    });
    for (const { tap, H, S } of work) {
      plan.core.recordInput(tap.coreLayer, H.data, H.shape);
      plan.core.recordOutputGrad(tap.coreLayer, S.data, S.shape);
    }
    if (missing.length === 0) return;
    const state = plan.core.exportState();
    for (const t of missing) {
      const f = state.factors.find((x) => x.layer === t.coreLayer)!;
      plan.core.setFactors(t.coreLayer, { H: f.H, S: f.S });
    }
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

  #ensurePlan(varList?: tf.Variable[]): Plan {
    if (this.#plan) return this.#plan;
    const model = this.#requireModel();
    const weights = model.weights as unknown as LayerVariableLike[];
    const lvByName = new Map(weights.map((w) => [w.name, w]));
    const vars = varList ?? (model.trainableWeights as unknown as LayerVariableLike[]).map((w) => w.read());
    const byName = new Map(vars.map((v) => [v.name, v]));
    for (const v of vars) {
      if (v.dtype !== 'float32') {
        throw withCode(new TypeError(`${PREFIX} variable '${v.name}' is ${v.dtype}; AdaFisher trains float32 variables.`), ErrorCodes.invalidArgument);
      }
    }
    const specs: LayerSpec[] = [];
    const variables: tf.Variable[] = [];
    const slotKeys: string[] = [];
    const layerNames: string[] = [];
    const supported: { s: SupportedLayer; coreLayer: number; slots: number[] }[] = [];
    const used = new Set<string>();
    const addSlot = (v: tf.Variable) => {
      variables.push(v);
      slotKeys.push(lvByName.get(v.name)?.originalName ?? v.name);
      used.add(v.name);
      return variables.length - 1;
    };
    for (const { layer, c } of classifyModelLayers(model)) {
      if (!('kind' in c)) continue;
      const w = byName.get(c.weight.name);
      const b = c.bias === null ? null : byName.get(c.bias.name);
      if (w === undefined || b === undefined) continue;
      const coreLayer = specs.length;
      specs.push(c.spec(floatData(w), b === null ? null : floatData(b)));
      const slots = [addSlot(w)];
      if (b !== null) slots.push(addSlot(b));
      layerNames.push(layer.name);
      supported.push({ s: c, coreLayer, slots });
    }
    for (const v of vars) {
      if (used.has(v.name)) continue;
      specs.push({ kind: 'param', param: floatData(v) });
      addSlot(v);
    }
    const core = new AdaFisher(specs, { ...this.#options, backend: this.#backendRequest() });
    const plan: Plan = {
      core,
      variables,
      slotOf: new Map(variables.map((v, i) => [v.name, i])),
      taps: supported.map(({ s, coreLayer, slots }) => ({ supported: s, coreLayer, slots })),
      names: { slotKeys, layerNames },
      uninstall: [],
      pending: [],
      open: null,
    };
    const sink: TapSink = {
      active: () => plan.open !== null,
      input: (i, x) => this.#record(plan, i, 'input', x),
      outputGrad: (i, dy) => this.#record(plan, i, 'grad', dy),
    };
    plan.uninstall = plan.taps.map((t, i) => installTap(t.supported.layer, t.supported, i, sink));
    if (this.#pending) {
      try {
        core.loadState(stateFromSaved(this.#pending, core.exportState(), plan.names));
      } catch (e) {
        plan.uninstall.forEach((u) => u());
        core.dispose();
        throw e;
      }
      this.#pending = null;
    }
    this.#plan = plan;
    return plan;
  }

  // NOTE: [shared layers]
  // Keeps one use of a layer for the step (see NOTE: [recorded statistics]). A layer used several
  // times in one step (a shared layer, or accumulated micro-batches) is reduced over all its uses
  // together, as one larger batch, which needs the uses to agree beyond the batch axis. Checked
  // here, in the forward (or backward) pass, before any gradient is applied. A shared layer whose
  // uses have different static shapes in the model's graph is not preconditioned at all
  // (taps.ts, sharedShapeConflicts); this catches the shapes only known when the model runs.
  #record(plan: Plan, index: number, which: 'input' | 'grad', x: tf.Tensor): void {
    const open = plan.open;
    if (open === null) return;
    const t0 = performance.now();
    const tap = plan.taps[index];
    const s = tap.supported;
    const use: Use = {
      data: floatData(x),
      shape: which === 'input' ? s.inputShape(x.shape) : s.gradShape(x.shape),
      examples: x.shape[0] ?? 1,
    };
    const kind = which === 'input' ? 'inputs' : 'grads';
    const first = [...plan.pending, open].map((r) => r[kind][index]).find((u) => u.length > 0)?.[0];
    if (first !== undefined && JSON.stringify(first.shape.slice(1)) !== JSON.stringify(use.shape.slice(1))) {
      throw codedError(
        ErrorCodes.unsupportedLayer,
        `${PREFIX} layer '${s.layer.name}' is used with ${which === 'input' ? 'inputs' : 'output gradients'} of different shapes ` +
          `in one step ([${first.shape}] and [${use.shape}]): a shared layer applied to inputs of two sizes, or gradients ` +
          'accumulated over micro-batches of different sizes. AdaFisher combines the uses of a layer within a step only ' +
          'when their shapes agree beyond the batch axis: give each input size its own layer, accumulate micro-batches of ' +
          'one size per step, or freeze the layer (layer.trainable = false).',
      );
    }
    open[kind][index].push(use);
    this.#timing.statisticsMs += performance.now() - t0;
  }

  /**
   * The full state as named tensors (TF.js calls this in model.save({ includeOptimizer: true })).
   * The tensors stay valid until the next getWeights() or dispose().
   */
  override async getWeights(): Promise<NamedTensor[]> {
    this.#alive();
    tfjs.dispose(this.#savedTensors.map((w) => w.tensor));
    this.#savedTensors = [];
    if (this.#plan === null) {
      if (this.#pending !== null) {
        // Restored but not set up for the model yet: hand back what was restored.
        this.#savedTensors = [...this.#pending].map(([name, v]) => ({
          name,
          tensor: tfjs.tensor(v, name === ITER ? [] : [v.length], v instanceof Int32Array ? 'int32' : 'float32'),
        }));
      } else {
        this.#savedTensors = freshStateTensors();
      }
    } else {
      this.#savedTensors = stateToTensors(this.#plan.core.exportState(), this.#plan.names);
    }
    return this.#savedTensors;
  }

  /**
   * Restores the state saved by getWeights() (TF.js calls this when loading a model saved with
   * its optimizer). Before attach() and the first training step the values are kept and applied
   * when the optimizer is set up for the model. The weights of an optimizer saved before its
   * first step restore a fresh optimizer (set up for the model's trainable weights at the next step).
   * @throws {Error} code ADAFISHER_BAD_CHECKPOINT when the weights do not fit the model.
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
    if (this.#plan === null) {
      this.#pending = saved;
      return;
    }
    const core = this.#plan.core;
    core.loadState(stateFromSaved(saved, core.exportState(), this.#plan.names));
    this.#plan.pending = [];
    this.iterations_ = core.steps;
  }

  // Back to no plan: taps removed, native state freed; the next step sets up a fresh one.
  #dropPlan(): void {
    if (this.#plan === null) return;
    this.#plan.uninstall.forEach((u) => u());
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
