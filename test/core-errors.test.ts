// Bad input as data: each case names the call, the error class, a message regex and the
// code, and every case also checks that nothing was half-applied (parameters and the whole
// exported state bit-identical before and after, no leaked native allocation) and that
// the optimizer still takes a good step afterwards.
import vm from 'node:vm';

import { describe, expect, test } from 'vitest';

import {
  AdaFisher,
  backendInfo,
  createBuffer,
  ErrorCodes,
  isAdaFisherError,
  WarningCodes,
  GoldenFormatError,
  liveAllocations,
  replayGolden,
  stateFromJSON,
  stateToJSON,
  synchronize,
  validateGolden,
  type GoldenCase,
  type AdaFisherOptions,
  type AdaFisherState,
  type LayerSpec,
} from '../lib/index.js';
import { loadBinding } from '../lib/binding.js';
import { assertBitIdentical, assertSnapshotsIdentical, expectThrows, paramsOf, Rng, snapshot } from './helpers.js';

// layers[0]: linear 4 -> 3 with bias (tensors 0 and 1); layers[1]: a plain 5-element param (tensor 2).
interface Fixture {
  opt: AdaFisher;
  specs: LayerSpec[];
  rng: Rng;
  grads(): Float32Array[];
  recordInput(): void;
  recordOutputGrad(): void;
  state: AdaFisherState;
}

function fixture(options: AdaFisherOptions = {}): Fixture {
  const rng = new Rng(42);
  const specs: LayerSpec[] = [
    { kind: 'linear', inFeatures: 4, outFeatures: 3, weight: rng.array(12), bias: rng.array(3) },
    { kind: 'param', param: rng.array(5) },
  ];
  const opt = new AdaFisher(specs, { lr: 1e-2, ...options });
  const f: Fixture = {
    opt,
    specs,
    rng,
    grads: () => [rng.array(12), rng.array(3), rng.array(5)],
    recordInput: () => opt.recordInput(0, rng.array(8), [2, 4]),
    recordOutputGrad: () => opt.recordOutputGrad(0, rng.array(6), [2, 3]),
    state: undefined as unknown as AdaFisherState,
  };
  // Two good steps, so that momenta, factors and counters are all non-trivial.
  for (let t = 0; t < 2; t++) {
    f.recordInput();
    f.recordOutputGrad();
    expect(opt.step(f.grads()).applied).toBe(true);
  }
  f.state = opt.exportState();
  return f;
}

function disposedBuffer(n: number) {
  const b = createBuffer(n);
  b.dispose();
  return b;
}

const INVALID = ErrorCodes.invalidArgument;
const BAD_CHECKPOINT = ErrorCodes.badCheckpoint;

interface Case {
  name: string;
  /** Runs before the "before" snapshot (e.g. records statistics). Default: both statistics recorded. */
  prepare?: (f: Fixture) => void;
  call: (f: Fixture) => unknown;
  cls: ErrorConstructor | TypeErrorConstructor | RangeErrorConstructor;
  message: RegExp;
  code: string;
}

const withState = (f: Fixture, patch: (s: AdaFisherState) => unknown) => {
  const s = structuredClone(f.state);
  return patch(s) ?? s;
};

const cases: Case[] = [
  // --- layer sizes ---
  {
    name: 'a linear layer 2^31 x 2^31 (a weight count past 2^53, which a number would print rounded)',
    call: () => new AdaFisher([{ kind: 'linear', inFeatures: 2 ** 31, outFeatures: 2 ** 31, weight: new Float32Array(4) }]),
    cls: RangeError,
    message: /^Expected at most 2\^53 elements \(the layer's sizes multiply to more\) for layers\[0\]\.weight but received a Float32Array of length 4$/,
    code: INVALID,
  },
  // --- gradients ---
  {
    name: 'a Float64Array gradient for the third tensor',
    call: (f) => f.opt.step([...f.grads().slice(0, 2), new Float64Array(5) as unknown as Float32Array]),
    cls: TypeError,
    message: /^Expected a Float32Array or DeviceBuffer for grads\[2\] but received a Float64Array of length 5$/,
    code: INVALID,
  },
  {
    name: 'a plain array gradient for the second tensor',
    call: (f) => f.opt.step([f.grads()[0], [1, 2, 3] as unknown as Float32Array, f.grads()[2]]),
    cls: TypeError,
    message: /Expected a Float32Array or DeviceBuffer for grads\[1\] but received an array of length 3/,
    code: INVALID,
  },
  {
    name: 'a gradient for the third tensor with 4 elements instead of 5',
    call: (f) => f.opt.step([...f.grads().slice(0, 2), new Float32Array(4)]),
    cls: RangeError,
    message: /^Expected 5 elements for grads\[2\] but received 4$/,
    code: INVALID,
  },
  {
    name: 'a gradient for the first tensor with 13 elements instead of 12',
    call: (f) => f.opt.step([new Float32Array(13), ...f.grads().slice(1)]),
    cls: RangeError,
    message: /Expected 12 elements for grads\[0\] but received 13/,
    code: INVALID,
  },
  {
    name: 'two gradients for three tensors',
    call: (f) => f.opt.step(f.grads().slice(0, 2)),
    cls: RangeError,
    message: /Expected 3 gradients .* for grads but received an array of length 2/,
    code: INVALID,
  },
  {
    name: 'replacement params: the second has the wrong length',
    call: (f) => f.opt.step(f.grads(), [f.rng.array(12), f.rng.array(2), f.rng.array(5)]),
    cls: RangeError,
    message: /Expected 3 elements for params\[1\] but received 2/,
    code: INVALID,
  },
  {
    name: 'a disposed DeviceBuffer as the third gradient',
    call: (f) => f.opt.step([...f.grads().slice(0, 2), disposedBuffer(5)]),
    cls: Error,
    message: /^DeviceBuffer already disposed \(grads\[2\]\)\.$/,
    code: ErrorCodes.disposed,
  },
  // --- statistics ---
  {
    name: 'an input whose length does not match its declared shape',
    call: (f) => f.opt.recordInput(0, new Float32Array(7), [2, 4]),
    cls: RangeError,
    message: /^Expected 8 elements for layers\[0\] input but received 7$/,
    code: INVALID,
  },
  {
    name: "an input whose last dim is not the layer's inFeatures",
    call: (f) => f.opt.recordInput(0, new Float32Array(10), [2, 5]),
    cls: RangeError,
    message: /layers\[0\] input with last dim 4 but received \[2, 5\]/,
    code: INVALID,
  },
  {
    name: 'an output gradient whose length does not match its declared shape',
    call: (f) => f.opt.recordOutputGrad(0, new Float32Array(5), [2, 3]),
    cls: RangeError,
    message: /^Expected 6 elements for layers\[0\] output gradient but received 5$/,
    code: INVALID,
  },
  {
    name: 'a Float64Array input',
    call: (f) => f.opt.recordInput(0, new Float64Array(8) as unknown as Float32Array, [2, 4]),
    cls: TypeError,
    message: /Expected a Float32Array or DeviceBuffer for layers\[0\] input but received a Float64Array of length 8/,
    code: INVALID,
  },
  {
    name: 'statistics for layer 2 (the model has layers 0 and 1)',
    call: (f) => f.opt.recordInput(2, new Float32Array(8), [2, 4]),
    cls: RangeError,
    message: /^Expected an integer in \[0, 1\] for layer but received 2 of type number$/,
    code: INVALID,
  },
  {
    name: 'an output gradient for layer -1',
    call: (f) => f.opt.recordOutputGrad(-1, new Float32Array(6), [2, 3]),
    cls: RangeError,
    message: /for layer but received -1/,
    code: INVALID,
  },
  {
    name: 'setFactors for layer 7',
    call: (f) => f.opt.setFactors(7, { S: new Float32Array(3) }),
    cls: RangeError,
    message: /for layer but received 7/,
    code: INVALID,
  },
  {
    name: "statistics for a 'param' layer (it has no factors)",
    call: (f) => f.opt.recordInput(1, new Float32Array(5), [5]),
    cls: RangeError,
    message: /preconditioned layer.*for layer but received 1/,
    code: INVALID,
  },
  {
    name: 'setFactors with an H of the wrong length (4, the bias entry forgotten)',
    call: (f) => f.opt.setFactors(0, { H: new Float32Array(4) }),
    cls: RangeError,
    message: /Expected 5 elements for layers\[0\]\.H but received 4/,
    code: INVALID,
  },
  {
    name: "setFactors with an unknown key ('s' for 'S')",
    call: (f) => f.opt.setFactors(0, { H: new Float32Array(5), s: new Float32Array(3) } as { H: Float32Array }),
    cls: RangeError,
    message: /^Expected a known key \('H' or 'S'\) for factors\.s but received the unknown key 's'$/,
    code: INVALID,
  },
  {
    name: 'setFactors with neither H nor S',
    call: (f) => f.opt.setFactors(0, {}),
    cls: TypeError,
    message: /^Expected an object with H, S or both for factors/,
    code: INVALID,
  },
  {
    name: 'a disposed DeviceBuffer as an input',
    call: (f) => f.opt.recordInput(0, disposedBuffer(8), [2, 4]),
    cls: Error,
    message: /DeviceBuffer already disposed \(layers\[0\] input\)/,
    code: ErrorCodes.disposed,
  },
  {
    name: 'a refreshing step without the output-gradient statistics',
    prepare: (f) => f.recordInput(),
    call: (f) => f.opt.step(f.grads()),
    cls: Error,
    message: /^layers\[0\]: no output-gradient \(S\) statistics were recorded before this step, which refreshes the factors \(step 2, tcov 1\)$/,
    code: ErrorCodes.missingStatistics,
  },
  {
    name: 'a refreshing step without any statistics',
    prepare: () => {},
    call: (f) => f.opt.step(f.grads()),
    cls: Error,
    message: /layers\[0\]: no input \(H\) statistics/,
    code: ErrorCodes.missingStatistics,
  },
  // --- checkpoints ---
  {
    name: 'checkpoint: null',
    call: (f) => f.opt.loadState(null as unknown as AdaFisherState),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: expected an object, received null$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: wrong format',
    call: (f) => f.opt.loadState(withState(f, (s) => void ((s as { format: string }).format = 'adam-state')) as AdaFisherState),
    cls: Error,
    message: /Invalid AdaFisher checkpoint: expected format 'adafisher-state', version 1/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: wrong version',
    call: (f) => f.opt.loadState(withState(f, (s) => void ((s as { version: number }).version = 2)) as AdaFisherState),
    cls: Error,
    message: /version 1/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: out-of-range hyperparameter',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.hyperparameters.beta = 1)) as AdaFisherState),
    cls: Error,
    message: /Invalid AdaFisher checkpoint: hyperparameters: .*options\.beta/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: hyperparameters missing (no silent reset to the defaults)',
    call: (f) => f.opt.loadState(withState(f, (s) => void delete (s as Partial<AdaFisherState>).hyperparameters) as AdaFisherState),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: hyperparameters: expected an object, received nothing \(the field is missing\)$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: hyperparameters.tcov missing',
    call: (f) => f.opt.loadState(withState(f, (s) => void delete (s.hyperparameters as Partial<AdaFisherState['hyperparameters']>).tcov) as AdaFisherState),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: hyperparameters\.tcov is missing$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: hyperparameters is an array',
    call: (f) => f.opt.loadState(withState(f, (s) => void ((s as { hyperparameters: unknown }).hyperparameters = [])) as AdaFisherState),
    cls: Error,
    message: /hyperparameters: expected an object, received an array/,
    code: BAD_CHECKPOINT,
  },
  // The corrupt checkpoints below also carry other hyperparameters (lr 0.5, tcov 3): the
  // harness checks that none of them was taken over by the refused load.
  {
    name: 'checkpoint: NaN in a running factor S (saved with nonFiniteGuard: true)',
    call: (f) =>
      f.opt.loadState(
        withState(f, (s) => {
          Object.assign(s.hyperparameters, { lr: 0.5, tcov: 3 });
          s.factors[0].S[1] = NaN;
        }) as AdaFisherState,
      ),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: factors\[0\]\.S\[1\] is NaN; running factors are >= 0/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: a negative running factor H',
    call: (f) =>
      f.opt.loadState(
        withState(f, (s) => {
          Object.assign(s.hyperparameters, { lr: 0.5, tcov: 3 });
          s.factors[0].H[2] = -0.5;
        }) as AdaFisherState,
      ),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: factors\[0\]\.H\[2\] is -0\.5; running factors are >= 0$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: -Infinity in a running factor S',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.factors[0].S[0] = -Infinity)) as AdaFisherState),
    cls: Error,
    message: /factors\[0\]\.S\[0\] is -Infinity; running factors are >= 0$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint JSON: -Infinity in a running factor',
    call: (f) => {
      const json = stateToJSON(f.state) as { factors: { H: unknown[] }[] };
      json.factors[0].H[0] = '-Infinity';
      return f.opt.loadState(stateFromJSON(JSON.parse(JSON.stringify(json))));
    },
    cls: Error,
    message: /factors\[0\]\.H\[0\] is -Infinity/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: two tensors instead of three',
    call: (f) => f.opt.loadState(withState(f, (s) => void s.tensors.pop()) as AdaFisherState),
    cls: Error,
    message: /expected 3 tensors, received 2/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: a tensor of another size',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.tensors[2].numel = 6)) as AdaFisherState),
    cls: Error,
    message: /tensors\[2\] has 6 elements, this model's has 5/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: a momentum of the wrong size',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.momenta[0] = new Float32Array(11))) as AdaFisherState),
    cls: Error,
    message: /momenta\[0\] has 11 elements, expected 12/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: a momentum that is a plain array',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.momenta[1] = [0, 0, 0] as unknown as Float32Array)) as AdaFisherState),
    cls: Error,
    message: /Expected a Float32Array for state\.momenta\[1\]/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: one momentum missing',
    call: (f) => f.opt.loadState(withState(f, (s) => void s.momenta.pop()) as AdaFisherState),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: Expected state for 3 tensors but received 2 momenta and 3 step counts$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: a momentum whose buffer was transferred (detached)',
    call: (f) =>
      f.opt.loadState(
        withState(f, (s) => {
          const m = s.momenta[1] as Float32Array;
          structuredClone(m.buffer, { transfer: [m.buffer] });
        }) as AdaFisherState,
      ),
    cls: Error,
    message: /^Invalid AdaFisher checkpoint: checkpoint momenta\[1\] has 0 elements, expected \d+$/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: an H of the wrong size',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.factors[0].H = new Float32Array(4))) as AdaFisherState),
    cls: Error,
    message: /factors\[0\]\.H must be a Float32Array of 5/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: an S that is a Float64Array',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.factors[0].S = new Float64Array(3) as unknown as Float32Array)) as AdaFisherState),
    cls: Error,
    message: /factors\[0\]\.S must be a Float32Array of 3/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: steps is a string',
    call: (f) => f.opt.loadState(withState(f, (s) => void ((s as { steps: unknown }).steps = '2')) as AdaFisherState),
    cls: Error,
    message: /state\.steps/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint: a negative step count',
    call: (f) => f.opt.loadState(withState(f, (s) => void (s.stepCounts[1] = -1)) as AdaFisherState),
    cls: Error,
    message: /stepCounts\[1\]/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint JSON: a momentum holding a string',
    call: (f) => {
      const json = stateToJSON(f.state) as { momenta: unknown[][] };
      json.momenta[2][0] = 'x';
      return f.opt.loadState(stateFromJSON(JSON.parse(JSON.stringify(json))));
    },
    cls: Error,
    message: /Invalid AdaFisher checkpoint JSON: momenta\[2\] must be an array of numbers/,
    code: BAD_CHECKPOINT,
  },
  {
    name: 'checkpoint JSON: a factor of the wrong size',
    call: (f) => {
      const json = stateToJSON(f.state) as { factors: { S: number[] }[] };
      json.factors[0].S.push(1);
      return f.opt.loadState(stateFromJSON(JSON.parse(JSON.stringify(json))));
    },
    cls: Error,
    message: /factors\[0\]\.S must be a Float32Array of 3/,
    code: BAD_CHECKPOINT,
  },
  // --- arguments that are not objects at all ---
  {
    name: 'stateToJSON(null)',
    call: () => stateToJSON(null as unknown as AdaFisherState),
    cls: TypeError,
    message: /^Expected a checkpoint object from exportState\(\) for state but received null$/,
    code: INVALID,
  },
  {
    name: 'stateToJSON of a checkpoint whose momenta are plain arrays',
    call: (f) => stateToJSON({ ...f.state, momenta: [[1, 2]] as unknown as Float32Array[] }),
    cls: TypeError,
    message: /^Expected a Float32Array for state\.momenta\[0\] but received an array of length 2$/,
    code: INVALID,
  },
  {
    name: 'replayGolden(null)',
    call: () => replayGolden(null as unknown as GoldenCase),
    cls: TypeError,
    message: /^Expected a golden case object \(see readGolden\) for golden but received null$/,
    code: INVALID,
  },
  {
    name: 'replayGolden of an object that is not a golden case',
    call: () => replayGolden({ name: 'x' } as unknown as GoldenCase),
    cls: GoldenFormatError as unknown as ErrorConstructor,
    message: /^\$\.config: expected an object$/,
    code: ErrorCodes.badGoldenFile,
  },
  {
    name: 'step(grads, null): params must be an array or left out',
    call: (f) => f.opt.step(f.grads(), null as unknown as Float32Array[]),
    cls: TypeError,
    message: /^Expected an array of 3 tensors, or undefined for params but received null$/,
    code: INVALID,
  },
  {
    name: 'an array as the options object',
    call: (f) => new AdaFisher(f.specs, [] as unknown as AdaFisherOptions),
    cls: TypeError,
    message: /^Expected an object for options but received an array of length 0$/,
    code: INVALID,
  },
  {
    name: 'conv2d padding [top, bottom, left, right] with a hole: named padding[1]',
    call: () => new AdaFisher([{ kind: 'conv2d', inChannels: 1, outChannels: 1, kernelSize: 1, padding: [1, , 1, 1] as unknown as number[], weight: new Float32Array(1) } as LayerSpec]),
    cls: TypeError,
    message: /^Expected an integer for layers\[0\]\.padding\[1\] but received undefined$/,
    code: INVALID,
  },
  // --- a conv window beyond the native limit is named as the user wrote it, not as the native field ---
  ...(
    [
      [{ kernelSize: [70000, 1] }, 'kernelSize\\[0\\]', 1],
      [{ kernelSize: 1, stride: 65537 }, 'stride', 1],
      [{ kernelSize: 1, padding: 70000 }, 'padding', 0],
      [{ kernelSize: 1, padding: [0, 70000] }, 'padding\\[1\\]', 0],
      [{ kernelSize: 1, padding: [0, 0, 0, 70000] }, 'padding\\[3\\]', 0],
    ] as [Record<string, unknown>, string, number][]
  ).map(
    ([fields, name, lo]): Case => ({
      name: `a conv2d layer with ${JSON.stringify(fields)}`,
      call: () =>
        new AdaFisher([
          { kind: 'param', param: new Float32Array(1) },
          { kind: 'conv2d', inChannels: 1, outChannels: 1, weight: new Float32Array(70000), ...fields } as unknown as LayerSpec,
        ]),
      cls: RangeError,
      message: new RegExp(`^Expected an integer in \\[${lo}, 65536\\] for layers\\[1\\]\\.${name} but received (65537|70000) of type number$`),
      code: INVALID,
    }),
  ),
  // --- a field the layer kind does not take would leave its default in place, silently ---
  ...(
    [
      [{ kind: 'conv2d', inChannels: 1, outChannels: 1, kernelSize: 3, strides: 2 }, 'strides'],
      [{ kind: 'conv2d', inChannels: 1, outChannels: 1, kernelSize: 3, dilation: 2 }, 'dilation'],
      [{ kind: 'conv2d', inChannels: 1, outChannels: 1, kernelSize: 3, data_format: 'NHWC' }, 'data_format'],
      [{ kind: 'linear', inFeatures: 3, outFeatures: 3, Layout: 'tfjs' }, 'Layout'],
      [{ kind: 'batchnorm', channels: 9, layout: 'tfjs' }, 'layout'],
    ] as [Record<string, unknown>, string][]
  ).map(
    ([spec, key]): Case => ({
      name: `a ${String(spec.kind)} layer with '${key}'`,
      call: () => new AdaFisher([{ ...spec, weight: new Float32Array(9) } as unknown as LayerSpec]),
      cls: RangeError,
      message: new RegExp(`^Expected a field of a '${String(spec.kind)}' layer \\(kind, .*\\) for layers\\[0\\]\\.${key} but received the unknown key '${key}'$`),
      code: INVALID,
    }),
  ),
  // --- memory shared between tensors: updated in place, a parameter must own its memory ---
  {
    name: 'two parameters sharing memory (a view into another) are refused when the optimizer is created',
    call: () => {
      const a = new Float32Array(8);
      return new AdaFisher([{ kind: 'param', param: a }, { kind: 'param', param: a.subarray(6) }]);
    },
    cls: RangeError,
    message: /^Expected memory of its own, but it overlaps layers\[0\]\.param .* for layers\[1\]\.param but received a Float32Array of length 2$/,
    code: INVALID,
  },
  {
    name: 'step(grads, params) with params[1] a view into params[0]',
    call: (f) => {
      const w = new Float32Array(12);
      return f.opt.step(f.grads(), [w, w.subarray(9), new Float32Array(5)]);
    },
    cls: RangeError,
    message: /^Expected separate memory for params\[0\] and params\[1\], but they overlap/,
    code: INVALID,
  },
  {
    name: 'a gradient that is a view into a parameter',
    call: (f) => {
      const g = f.grads();
      g[2] = (f.specs[0] as { weight: Float32Array }).weight.subarray(0, 5);
      return f.opt.step(g);
    },
    cls: RangeError,
    message: /^Expected separate memory for layers\[0\]\.weight and grads\[2\], but they overlap: the step writes layers\[0\]\.weight/,
    code: INVALID,
  },
  {
    name: 'a disposed DeviceBuffer as a parameter is refused when the optimizer is created',
    call: () => {
      const b = createBuffer(5, { backend: backendInfo().backend! });
      b.dispose();
      return new AdaFisher([{ kind: 'param', param: b }], { backend: backendInfo().backend! });
    },
    cls: Error,
    message: /^layers\[0\]\.param: the DeviceBuffer was already disposed\.$/,
    code: ErrorCodes.disposed,
  },
  // --- the buffer and backend functions name their arguments ---
  {
    name: 'createBuffer(1, null)',
    call: () => createBuffer(1, null as unknown as { backend?: 'cpu' }),
    cls: TypeError,
    message: /^Expected an object such as \{ backend: 'cuda' \} for options but received null$/,
    code: INVALID,
  },
  {
    name: "synchronize('gpu') names its argument",
    call: () => synchronize('gpu' as 'cpu'),
    cls: RangeError,
    message: /^Expected one of 'auto', 'cpu', 'cuda' for backend but received 'gpu'/,
    code: INVALID,
  },
  // --- hyperparameters (a new optimizer over the same tensors) ---
  ...(
    [
      [{ lr: -1 }, RangeError, /^Expected a number >= 0 for options\.lr but received -1 of type number$/],
      [{ lr: NaN }, RangeError, /Expected a finite number for options\.lr but received NaN/],
      [{ lr: '1e-3' }, TypeError, /Expected a number for options\.lr but received '1e-3' of type string/],
      [{ beta: 1 }, RangeError, /^Expected a number in \[0, 1\) for options\.beta but received 1 of type number$/],
      [{ damping: 0 }, RangeError, /^Expected a number > 0 for options\.damping but received 0 of type number$/],
      [{ gamma: 1 }, RangeError, /^Expected a number in \[0, 1\) for options\.gamma but received 1 of type number$/],
      [{ tcov: 0 }, RangeError, /^Expected an integer in \[1, 1099511627776\] for options\.tcov but received 0 of type number$/],
      [{ tcov: 1.5 }, RangeError, /^Expected an integer in \[1, 1099511627776\] for options\.tcov but received 1\.5 of type number$/],
      [{ tcov: 2 ** 41 }, RangeError, /^Expected an integer in \[1, 1099511627776\] for options\.tcov but received 2199023255552 of type number$/],
      [{ weightDecay: -1 }, RangeError, /^Expected a number >= 0 for options\.weightDecay but received -1 of type number$/],
      [{ learningRate: 1e-3 }, RangeError, /Expected a known option \(lr, .*\) for options\.learningRate/],
      [{ gamma: 0.5, decay: 0.1, mix: 0.01 }, RangeError, /gamma or decay\/mix, not both/],
      [{ decay: 0.1 }, RangeError, /decay and mix given together/],
      [{ decoupled: 'yes' }, TypeError, /Expected a boolean for options\.decoupled/],
      [{ backend: 'gpu' }, RangeError, /Expected one of 'auto', 'cpu', 'cuda' for options\.backend but received 'gpu'/],
    ] as [Record<string, unknown>, ErrorConstructor, RegExp][]
  ).map(
    ([options, cls, message]): Case => ({
      name: `options ${JSON.stringify(options, (_k, v) => (Number.isNaN(v) ? 'NaN' : v))}`,
      call: (f) => new AdaFisher(f.specs, options as AdaFisherOptions),
      cls,
      message,
      code: INVALID,
    }),
  ),
];

describe('bad input is refused with a precise error, and nothing is half-applied', () => {
  test.each(cases.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    const f = fixture();
    const params = paramsOf(f.specs);
    if (c.prepare) c.prepare(f);
    else {
      f.recordInput();
      f.recordOutputGrad();
    }
    const before = snapshot(f.opt, params);
    const allocations = liveAllocations(backendInfo().backend);
    expectThrows(() => c.call(f), { cls: c.cls, message: c.message, code: c.code });
    expect(liveAllocations(backendInfo().backend), 'native allocations after the failed call').toBe(allocations);
    assertSnapshotsIdentical(snapshot(f.opt, params), before, 'after the failed call');
    // The optimizer is still usable: a good step is applied.
    f.recordInput();
    f.recordOutputGrad();
    expect(f.opt.step(f.grads())).toEqual({ applied: true, refreshed: true });
    expect(f.opt.steps).toBe(3);
    f.opt.dispose();
  });
});

describe('error codes', () => {
  test('every code raised on purpose is in ErrorCodes, ADAFISHER_BAD_GOLDEN_FILE included', () => {
    expect(ErrorCodes.badGoldenFile).toBe('ADAFISHER_BAD_GOLDEN_FILE');
    let err: unknown;
    try {
      validateGolden([]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(GoldenFormatError);
    expect(Object.values(ErrorCodes)).toContain((err as GoldenFormatError).code);
  });
});

describe('use after dispose', () => {
  const calls: [string, (f: Fixture) => unknown][] = [
    ['step', (f) => f.opt.step(f.grads())],
    ['recordInput', (f) => f.recordInput()],
    ['recordOutputGrad', (f) => f.recordOutputGrad()],
    ['setFactors', (f) => f.opt.setFactors(0, { S: new Float32Array(3) })],
    ['exportState', (f) => f.opt.exportState()],
    ['loadState', (f) => f.opt.loadState(f.state)],
    ['steps', (f) => f.opt.steps],
    ['willRefreshFactors', (f) => f.opt.willRefreshFactors],
  ];
  test.each(calls)('%s throws ADAFISHER_DISPOSED and leaves the parameters alone', (_name, call) => {
    const f = fixture();
    const params = paramsOf(f.specs) as Float32Array[];
    const before = params.map((p) => p.slice());
    const allocations = liveAllocations(backendInfo().backend);
    f.opt.dispose();
    expect(liveAllocations(backendInfo().backend), 'dispose frees the optimizer state').toBeLessThan(allocations);
    expect(f.opt.disposed).toBe(true);
    expectThrows(() => call(f), { cls: Error, message: /^Optimizer already disposed\.$/, code: ErrorCodes.disposed });
    params.forEach((p, i) => assertBitIdentical(p, before[i], `params[${i}]`));
    f.opt.dispose(); // idempotent
    expect(f.opt.disposed).toBe(true);
  });

  test('a disposed DeviceBuffer refuses upload, download and fill', () => {
    const b = createBuffer(new Float32Array([1, 2, 3]));
    b.dispose();
    expect(b.disposed).toBe(true);
    for (const call of [() => b.download(), () => b.upload(new Float32Array(3)), () => b.fill(0)]) {
      expectThrows(call, { cls: Error, message: /^DeviceBuffer already disposed\.$/, code: ErrorCodes.disposed });
    }
    b.dispose(); // idempotent
  });
});

describe('numbers in native error messages', () => {
  test('are printed as String() prints them (positional up to 1e21, no "1e+2" for 100)', () => {
    const { DeviceBuffer } = loadBinding().binding;
    for (const x of [-100, -70000, -1e20, -1e21, -123456789012, -1.5e-7, -0.000001, -0.0000012, -5.5, -(2 ** 53 + 2), -1e-9, -5e-324, -Number.MAX_VALUE, -0.1]) {
      const err = expectThrows(() => new DeviceBuffer('cpu', x), { cls: RangeError, code: ErrorCodes.invalidArgument });
      expect(err.message).toContain(`but received ${String(x)} of type number`);
    }
  });
});

describe('backends of parameters and the allocation count', () => {
  test("liveAllocations() counts the backend that createBuffer() uses ('auto')", () => {
    const backend = backendInfo().backend!;
    const before = liveAllocations();
    expect(before).toBe(liveAllocations(backend));
    const b = createBuffer(3);
    expect(liveAllocations('auto')).toBe(before + 1);
    b.dispose();
    expect(liveAllocations()).toBe(before);
  });

  test('liveAllocations() and synchronize() follow ADAFISHER_BACKEND, as createBuffer() does', async () => {
    const saved = process.env.ADAFISHER_BACKEND;
    try {
      process.env.ADAFISHER_BACKEND = 'cpu';
      const before = liveAllocations();
      expect(before).toBe(liveAllocations('cpu'));
      const b = createBuffer(3);
      expect(b.backend).toBe('cpu');
      expect(liveAllocations()).toBe(before + 1);
      b.dispose();
      await synchronize();
      process.env.ADAFISHER_BACKEND = 'cuda';
      if (backendInfo('cuda').backend === 'cuda') {
        expect(liveAllocations()).toBe(liveAllocations('cuda'));
        await synchronize();
      } else {
        // Where cuda is unusable, all three refuse alike (before, the two counted and waited on cpu).
        for (const call of [() => createBuffer(3), () => liveAllocations(), () => synchronize()]) {
          expectThrows(call, { cls: Error, message: /^The cuda backend was requested \(ADAFISHER_BACKEND\)/, code: ErrorCodes.backendUnavailable });
        }
      }
    } finally {
      if (saved === undefined) delete process.env.ADAFISHER_BACKEND;
      else process.env.ADAFISHER_BACKEND = saved;
    }
  });

  const cuda = backendInfo('auto').backend === 'cuda';
  if (!cuda) console.log(`SKIP foreign-buffer check: it needs a second backend, and cuda is not usable here (${backendInfo('auto').reason})`);
  test.skipIf(!cuda)('a DeviceBuffer of the cpu backend given to a cuda optimizer is refused when it is created', () => {
    const b = createBuffer(5, { backend: 'cpu' });
    const before = liveAllocations('cuda');
    expectThrows(() => new AdaFisher([{ kind: 'param', param: b }], { backend: 'cuda' }), {
      cls: Error,
      message: /^layers\[0\]\.param: Expected a DeviceBuffer of the cuda backend \(this optimizer's\) but received one of the cpu backend\.$/,
      code: ErrorCodes.foreignBuffer,
    });
    expect(liveAllocations('cuda')).toBe(before);
    b.dispose();
  });
});

describe('Float32Arrays from another realm (node:vm, a worker-made context)', () => {
  test('are Float32Arrays: accepted as weights, gradients, buffer data and checkpoint factors', () => {
    const other = (n: number, fill = 0) => vm.runInNewContext(`new Float32Array(${n}).fill(${fill})`) as Float32Array;
    expect(other(1) instanceof Float32Array).toBe(false); // the case: instanceof says no
    const w = other(6);
    const opt = new AdaFisher([{ kind: 'linear', inFeatures: 3, outFeatures: 2, weight: w }], { backend: 'cpu' });
    opt.recordInput(0, other(6, 1), [2, 3]);
    opt.recordOutputGrad(0, other(4, 1), [2, 2]);
    expect(opt.step([other(6, 1)]).applied).toBe(true);
    expect(w[0]).not.toBe(0);
    const state = opt.exportState();
    const f = state.factors[0];
    opt.loadState({ ...state, factors: [{ layer: f.layer, H: Object.assign(other(f.H.length), f.H), S: Object.assign(other(f.S.length), f.S) }] });
    expect(Array.from(opt.exportState().factors[0].H)).toEqual(Array.from(f.H));
    const b = createBuffer(other(3, 2), { backend: 'cpu' });
    expect(Array.from(b.download())).toEqual([2, 2, 2]);
    b.dispose();
    opt.dispose();
  });
});

describe('isAdaFisherError and WarningCodes', () => {
  test("narrows a caught value to this package's errors, by code when given", () => {
    const opt = new AdaFisher([{ kind: 'param', param: new Float32Array(2) }], { backend: 'cpu' });
    let caught: unknown;
    try {
      opt.loadState({} as never);
    } catch (e) {
      caught = e;
    }
    expect(isAdaFisherError(caught)).toBe(true);
    expect(isAdaFisherError(caught, ErrorCodes.badCheckpoint)).toBe(true);
    expect(isAdaFisherError(caught, ErrorCodes.disposed)).toBe(false);
    opt.dispose();
    try {
      opt.step([null]);
    } catch (e) {
      caught = e;
    }
    expect(isAdaFisherError(caught, ErrorCodes.disposed)).toBe(true);
    for (const other of [new Error('x'), Object.assign(new Error('x'), { code: 'ENOENT' }), { code: ErrorCodes.internal, message: 'not an Error' }, null, 'ADAFISHER_INTERNAL']) {
      expect(isAdaFisherError(other)).toBe(false);
    }
    expect(Object.values(WarningCodes).sort()).toEqual(['ADAFISHER_PENDING_STATISTICS', 'ADAFISHER_STEPS_SKIPPED']);
  });
});

describe("a step's errors about the optimizer's own parameters name them as the layers do", () => {
  test('a weight disposed or detached since construction is layers[i].bias / .param, not params[k]', () => {
    const w = createBuffer(4, { backend: 'cpu' });
    const b = createBuffer(2, { backend: 'cpu' });
    const opt = new AdaFisher([{ kind: 'param', param: new Float32Array(3) }, { kind: 'linear', inFeatures: 2, outFeatures: 2, weight: w, bias: b }], { backend: 'cpu' });
    b.dispose();
    expectThrows(() => opt.step([null, null, new Float32Array(2)]), { cls: Error, message: /^DeviceBuffer already disposed \(layers\[1\]\.bias\)\.$/, code: ErrorCodes.disposed });
    opt.dispose();
    w.dispose();
    const a = new Float32Array(3);
    const other = new AdaFisher([{ kind: 'param', param: a }], { backend: 'cpu' });
    structuredClone(a.buffer, { transfer: [a.buffer] });
    expectThrows(() => other.step([new Float32Array(3)]), { cls: RangeError, message: /^Expected 3 elements for layers\[0\]\.param but received 0/, code: ErrorCodes.invalidArgument });
    // Parameters the caller hands in are still named by their place in that argument.
    expectThrows(() => other.step([new Float32Array(3)], [new Float32Array(2)]), { cls: RangeError, message: /^Expected 3 elements for params\[0\] but received 2$/, code: ErrorCodes.invalidArgument });
    other.dispose();
  });
});
