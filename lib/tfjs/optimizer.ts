// AdaFisher as a TF.js optimizer: model.compile({ optimizer: adaFisher(model) }).
import type * as tf from '@tensorflow/tfjs';

// First, so that a missing @tensorflow/tfjs is reported before anything else (NOTE: [loading tfjs]).
import { tfjs } from './tf.js';

import { BACKEND_NAMES, resolveBackend, type BackendName } from '../backend.js';
import { codedError, describe, ErrorCodes, withCode } from '../errors.js';
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
  classifyLayer,
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

interface Use {
  data: Float32Array;
  shape: number[];
}

interface Tap {
  supported: SupportedLayer;
  /** index into the core layer list */
  coreLayer: number;
  /** parameter slots of this layer */
  slots: number[];
  inputs: Use[];
  grads: Use[];
}

interface Plan {
  core: AdaFisher;
  variables: tf.Variable[];
  slotOf: Map<string, number>;
  taps: Tap[];
  names: StateNames;
  uninstall: (() => void)[];
}

const PREFIX = 'AdaFisher (TF.js):';

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
 * step per training step. Prediction and evaluation are not touched.
 */
export class AdaFisherOptimizer extends tfjs.Optimizer {
  static className = 'AdaFisher';

  #options: AdaFisherOptions;
  #hyper: AdaFisherHyperparameters;
  #model: tf.LayersModel | null = null;
  #plan: Plan | null = null;
  #capturing = false;
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
   * Wall time spent by this optimizer since the last resetTiming(): reducing layer inputs and
   * output gradients to factors during the forward/backward pass (statisticsMs), and in
   * applyGradients (stepMs: reading gradients, the native step, writing parameters back).
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
      for (const layer of collectLayers(model)) {
        const c = classifyLayer(layer);
        if ('kind' in c && trainable.has(c.weight.name) && (c.bias === null || trainable.has(c.bias.name))) pre.add(layer);
      }
    }
    return reportLayers(model, pre);
  }

  /**
   * One training step (TF.js's fit, fitDataset and trainOnBatch call it): records the layer
   * statistics while computing the gradients, then applies them.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH when `varList` holds a variable that is not a
   *   weight of the attached model, or one this optimizer was not set up for at its first step.
   */
  override minimize(f: () => tf.Scalar, returnCost = false, varList?: tf.Variable[]): tf.Scalar | null {
    this.#alive();
    const model = this.#requireModel();
    if (varList !== undefined) this.#checkOwnVariables(model, varList);
    const plan = this.#ensurePlan(varList);
    for (const v of varList ?? []) if (!plan.slotOf.has(v.name)) throw this.#unknownVariable(v.name);
    this.#checkTrainable(varList ?? plan.variables);
    this.#capturing = plan.core.willRefreshFactors;
    try {
      return super.minimize(f, returnCost, varList);
    } finally {
      this.#capturing = false;
      for (const t of plan.taps) {
        t.inputs = [];
        t.grads = [];
      }
    }
  }

  /**
   * One AdaFisher step with gradients computed by minimize() (which also records the layer
   * statistics). Called by TF.js; calling it directly with your own gradients works on steps
   * that do not refresh the factors only.
   * @throws {Error} code ADAFISHER_MODEL_MISMATCH for a variable this optimizer was not set up
   *   for; code ADAFISHER_MISSING_STATISTICS for missing statistics.
   */
  override applyGradients(variableGradients: tf.NamedTensorMap | NamedTensor[]): void {
    this.#alive();
    const plan = this.#plan;
    if (plan === null) {
      throw codedError(
        ErrorCodes.missingStatistics,
        `${PREFIX} applyGradients() was called before any minimize(): AdaFisher needs the layer statistics that ` +
          'minimize() records. Train with model.fit / fitDataset / trainOnBatch, or optimizer.minimize(lossFn).',
      );
    }
    const t0 = performance.now();
    const entries = Array.isArray(variableGradients)
      ? variableGradients
      : Object.keys(variableGradients).map((name) => ({ name, tensor: variableGradients[name] }));
    const n = plan.variables.length;
    const grads: (Float32Array | null)[] = new Array(n).fill(null);
    for (const { name, tensor } of entries) {
      const i = plan.slotOf.get(name);
      if (i === undefined) throw this.#unknownVariable(name);
      if (tensor != null) grads[i] = floatData(tensor);
    }
    const core = plan.core;
    if (core.willRefreshFactors) this.#completeStatistics(plan, grads);
    const params = plan.variables.map((v) => floatData(v).slice()); // see NOTE: [parameters copied]
    const result = core.step(grads, params);
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

  // A refreshing step needs H and S for every preconditioned layer. A layer none of whose
  // parameters has a gradient this step (frozen in this call, or cut off from the loss) gets its
  // own running factors as the fresh estimate; a layer with gradients but no statistics means the
  // taps did not run (gradients computed outside minimize()).
  #completeStatistics(plan: Plan, grads: (Float32Array | null)[]): void {
    let state: ReturnType<AdaFisher['exportState']> | null = null;
    for (const t of plan.taps) {
      if (t.inputs.length > 0 && t.grads.length > 0) continue;
      if (t.slots.some((i) => grads[i] !== null)) {
        throw codedError(
          ErrorCodes.missingStatistics,
          `${PREFIX} no ${t.inputs.length === 0 ? 'input' : 'output gradient'} was recorded for layer '${t.supported.layer.name}' ` +
            'in this step. Gradients must come from optimizer.minimize() (model.fit, fitDataset and trainOnBatch use it).',
        );
      }
      state ??= plan.core.exportState();
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
    for (const layer of collectLayers(model)) {
      const c = classifyLayer(layer);
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
      taps: supported.map(({ s, coreLayer, slots }) => ({ supported: s, coreLayer, slots, inputs: [], grads: [] })),
      names: { slotKeys, layerNames },
      uninstall: [],
    };
    const sink: TapSink = {
      active: () => this.#capturing,
      input: (i, x) => this.#record(plan, plan.taps[i], 'input', x),
      outputGrad: (i, dy) => this.#record(plan, plan.taps[i], 'grad', dy),
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

  // Hands one use of a layer to the native reduction. A layer used several times in one step
  // (shared layers) is reduced over all its uses together, as one larger batch.
  #record(plan: Plan, tap: Tap, which: 'input' | 'grad', x: tf.Tensor): void {
    const t0 = performance.now();
    const s = tap.supported;
    const use: Use = { data: floatData(x), shape: which === 'input' ? s.inputShape(x.shape) : s.gradShape(x.shape) };
    const uses = which === 'input' ? tap.inputs : tap.grads;
    uses.push(use);
    let { data, shape } = use;
    if (uses.length > 1) {
      const tail = JSON.stringify(use.shape.slice(1));
      const bad = uses.find((u) => JSON.stringify(u.shape.slice(1)) !== tail);
      if (bad) {
        throw codedError(
          ErrorCodes.unsupportedLayer,
          `${PREFIX} layer '${s.layer.name}' is used ${uses.length} times in one step with ${which === 'input' ? 'inputs' : 'outputs'} ` +
            `of different shapes ([${bad.shape}] and [${use.shape}]); AdaFisher combines the uses of a shared layer only when they agree.`,
        );
      }
      data = new Float32Array(uses.reduce((a, u) => a + u.data.length, 0));
      let at = 0;
      for (const u of uses) {
        data.set(u.data, at);
        at += u.data.length;
      }
      shape = [uses.reduce((a, u) => a + u.shape[0], 0), ...use.shape.slice(1)];
    }
    if (which === 'input') plan.core.recordInput(tap.coreLayer, data, shape);
    else plan.core.recordOutputGrad(tap.coreLayer, data, shape);
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
