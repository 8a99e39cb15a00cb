// Replays a trajectory recorded from the official PyTorch AdaFisher (the golden format,
// test/golden/README.md) through the public API and measures the error of every array.
import { isFloat32Array } from 'node:util/types';

import { readFileSync } from 'node:fs';

import type { BackendName } from './backend.js';
import { ErrorCodes, typeError } from './errors.js';
import { AdaFisher, type LayerSpec, type Tensor } from './optimizer.js';
import { checkBoolean, checkRange } from './validate.js';

export interface GoldenLayer {
  kind: 'linear' | 'conv2d' | 'batchnorm2d' | 'layernorm';
  in?: number;
  out?: number;
  inChannels?: number;
  outChannels?: number;
  kernel?: [number, number];
  stride?: [number, number];
  padding?: [number, number];
  groups?: number;
  channels?: number;
  shape?: number[];
  bias: boolean;
}

export interface GoldenCase {
  name: string;
  config: { optimizer: 'AdaFisher' | 'AdaFisherW'; lr: number; beta: number; damping: number; gamma: number; tcov: number; weightDecay: number };
  layers: GoldenLayer[];
  init: { weight: number[]; bias: number[] | null }[];
  steps: {
    loss: number;
    factorsUpdated: boolean;
    seen: { inputShape: number[]; input: number[]; gradOutputShape: number[]; gradOutput: number[]; weightGrad: number[]; biasGrad: number[] | null }[];
    after: { weight: number[]; bias: number[] | null; H: number[]; S: number[]; momentumWeight: number[]; momentumBias: number[] | null }[];
  }[];
}

/** A golden file that does not follow the format; the message says what is wrong. */
export class GoldenFormatError extends Error {
  readonly code = ErrorCodes.badGoldenFile;
}

export type ArrayKind = 'weights' | 'biases' | 'momenta' | 'H' | 'S';
export const ARRAY_KINDS: readonly ArrayKind[] = ['weights', 'biases', 'momenta', 'H', 'S'];

export interface ReplayReport {
  name: string;
  file?: string;
  backend: string;
  steps: number;
  /** Max over arrays of (max |ours - golden|) / (max |golden|), per kind. */
  maxRelError: Record<ArrayKind, number>;
  overall: number;
  /** Where the overall maximum occurred. */
  worst: { kind: ArrayKind; step: number; layer: number };
  tolerance: number;
  pass: boolean;
  /**
   * Where the replay did something the official run did not (a step the non-finite guard
   * skipped, a factor refresh at another step): the replay stops there and fails.
   */
  divergence?: string;
}

function fail(path: string, what: string): never {
  throw new GoldenFormatError(`${path}: ${what}`);
}

function numbers(v: unknown, path: string, length?: number): number[] {
  if (!Array.isArray(v)) fail(path, `expected an array of numbers, found ${v === null ? 'null' : typeof v}`);
  if (length !== undefined && v.length !== length) fail(path, `expected ${length} numbers, found ${v.length}`);
  for (let i = 0; i < v.length; i++) if (typeof v[i] !== 'number') fail(`${path}[${i}]`, 'expected a number');
  return v as number[];
}

const prod = (s: number[]) => s.reduce((a, b) => a * b, 1);

/**
 * Checks the structure of a parsed golden file (test/golden/README.md) and returns it typed.
 * @param data The parsed JSON.
 * @throws {GoldenFormatError} (code ADAFISHER_BAD_GOLDEN_FILE) naming the first problem by its
 *   JSON path, e.g. `$.name: expected a string`.
 * @example const g = validateGolden(JSON.parse(text));
 */
export function validateGolden(data: unknown): GoldenCase {
  const g = data as GoldenCase;
  if (g === null || typeof g !== 'object' || Array.isArray(g)) fail('$', 'expected a JSON object');
  if (typeof g.name !== 'string') fail('$.name', 'expected a string');
  const c = g.config;
  if (c === null || typeof c !== 'object') fail('$.config', 'expected an object');
  if (c.optimizer !== 'AdaFisher' && c.optimizer !== 'AdaFisherW') fail('$.config.optimizer', "expected 'AdaFisher' or 'AdaFisherW'");
  for (const k of ['lr', 'beta', 'damping', 'gamma', 'tcov', 'weightDecay'] as const) {
    if (typeof c[k] !== 'number') fail(`$.config.${k}`, 'expected a number');
  }
  if (!Array.isArray(g.layers) || g.layers.length === 0) fail('$.layers', 'expected a non-empty array');
  // w, b: weight and bias elements; h, s: running factor lengths (ALGORITHM.md: H has K entries
  // plus one for a bias, S one per output; a norm layer's weight is K = 1).
  const sizes = g.layers.map((l, i) => {
    const at = `$.layers[${i}]`;
    if (l === null || typeof l !== 'object') fail(at, 'expected an object');
    if (typeof l.bias !== 'boolean') fail(`${at}.bias`, 'expected a boolean');
    switch (l.kind) {
      case 'linear':
        numbers([l.in, l.out], `${at}.in/out`);
        return { w: l.in! * l.out!, b: l.out!, h: l.in! + (l.bias ? 1 : 0), s: l.out! };
      case 'conv2d':
        numbers([l.inChannels, l.outChannels, l.groups ?? 1], `${at}.inChannels/outChannels/groups`);
        numbers(l.kernel, `${at}.kernel`, 2);
        numbers(l.stride, `${at}.stride`, 2);
        numbers(l.padding, `${at}.padding`, 2);
        return {
          w: l.outChannels! * (l.inChannels! / (l.groups ?? 1)) * l.kernel![0] * l.kernel![1],
          b: l.outChannels!,
          h: (l.inChannels! / (l.groups ?? 1)) * l.kernel![0] * l.kernel![1] + (l.bias ? 1 : 0),
          s: l.outChannels!,
        };
      case 'batchnorm2d':
        numbers([l.channels], `${at}.channels`);
        return { w: l.channels!, b: l.channels!, h: 1 + (l.bias ? 1 : 0), s: l.channels! };
      case 'layernorm':
        numbers(l.shape, `${at}.shape`, 1);
        return { w: l.shape![0], b: l.shape![0], h: 1 + (l.bias ? 1 : 0), s: l.shape![0] };
      default:
        return fail(`${at}.kind`, `unsupported layer kind '${String((l as { kind: unknown }).kind)}'`);
    }
  });
  if (!Array.isArray(g.init) || g.init.length !== g.layers.length) fail('$.init', `expected ${g.layers.length} entries`);
  g.init.forEach((e, i) => {
    numbers(e?.weight, `$.init[${i}].weight`, sizes[i].w);
    if (g.layers[i].bias) numbers(e.bias, `$.init[${i}].bias`, sizes[i].b);
  });
  if (!Array.isArray(g.steps) || g.steps.length === 0) fail('$.steps', 'expected a non-empty array');
  g.steps.forEach((s, t) => {
    const at = `$.steps[${t}]`;
    if (!Array.isArray(s?.seen) || s.seen.length !== g.layers.length) fail(`${at}.seen`, `expected ${g.layers.length} entries`);
    if (typeof s.factorsUpdated !== 'boolean') fail(`${at}.factorsUpdated`, 'expected a boolean');
    if (!Array.isArray(s.after) || s.after.length !== g.layers.length) fail(`${at}.after`, `expected ${g.layers.length} entries`);
    s.seen.forEach((e, i) => {
      const p = `${at}.seen[${i}]`;
      numbers(e?.input, `${p}.input`, prod(numbers(e?.inputShape, `${p}.inputShape`)));
      numbers(e.gradOutput, `${p}.gradOutput`, prod(numbers(e.gradOutputShape, `${p}.gradOutputShape`)));
      numbers(e.weightGrad, `${p}.weightGrad`, sizes[i].w);
      if (g.layers[i].bias) numbers(e.biasGrad, `${p}.biasGrad`, sizes[i].b);
    });
    s.after.forEach((e, i) => {
      const p = `${at}.after[${i}]`;
      numbers(e?.weight, `${p}.weight`, sizes[i].w);
      numbers(e.momentumWeight, `${p}.momentumWeight`, sizes[i].w);
      numbers(e.H, `${p}.H`, sizes[i].h);
      numbers(e.S, `${p}.S`, sizes[i].s);
      if (g.layers[i].bias) {
        numbers(e.bias, `${p}.bias`, sizes[i].b);
        numbers(e.momentumBias, `${p}.momentumBias`, sizes[i].b);
      }
    });
  });
  return g;
}

/**
 * Reads and checks a golden trajectory file (test/golden/README.md).
 * @param file Path of the JSON file.
 * @throws {GoldenFormatError} (code ADAFISHER_BAD_GOLDEN_FILE) when the file cannot be read,
 *   is not JSON, or does not follow the format (see validateGolden).
 * @example const g = readGolden('node_modules/adafisher/test/golden/mlp_adafisher.json');
 */
export function readGolden(file: string): GoldenCase {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new GoldenFormatError(`${file}: cannot read (${(e as Error).message})`);
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new GoldenFormatError(`${file}: not valid JSON (${(e as Error).message})`);
  }
  return validateGolden(data);
}

/** The model of a golden case as AdaFisher layer descriptions (PyTorch layouts, NCHW). */
export function goldenLayers(g: GoldenCase): { layers: LayerSpec[]; params: { weight: Float32Array; bias: Float32Array | null }[] } {
  const params = g.init.map((e, i) => ({
    weight: Float32Array.from(e.weight),
    bias: g.layers[i].bias ? Float32Array.from(e.bias!) : null,
  }));
  const layers = g.layers.map((l, i): LayerSpec => {
    const { weight, bias } = params[i];
    switch (l.kind) {
      case 'linear':
        return { kind: 'linear', inFeatures: l.in!, outFeatures: l.out!, weight, bias };
      case 'conv2d':
        return {
          kind: 'conv2d',
          inChannels: l.inChannels!,
          outChannels: l.outChannels!,
          kernelSize: l.kernel!,
          stride: l.stride!,
          padding: l.padding!,
          groups: l.groups ?? 1,
          weight,
          bias,
        };
      case 'batchnorm2d':
        return { kind: 'batchnorm', channels: l.channels!, weight, bias };
      case 'layernorm':
        return { kind: 'layernorm', features: l.shape![0], weight, bias };
    }
  });
  return { layers, params };
}

function relError(ours: ArrayLike<number>, golden: number[]): number {
  if (ours.length !== golden.length) return Infinity; // validateGolden checks the lengths; never compare a prefix
  let maxErr = 0;
  let maxAbs = 0;
  for (let i = 0; i < golden.length; i++) {
    const d = Math.abs(ours[i] - golden[i]);
    if (!(d <= maxErr)) maxErr = Number.isNaN(d) ? Infinity : d;
    maxAbs = Math.max(maxAbs, Math.abs(golden[i]));
  }
  if (maxErr === 0) return 0;
  return maxAbs === 0 ? Infinity : maxErr / maxAbs;
}

/**
 * Replays a golden case through AdaFisher and reports max relative errors per array kind.
 * @param g a golden case (readGolden(), or parsed JSON: it is checked with validateGolden()).
 * @param options.backend 'auto', 'cpu' or 'cuda' for the optimizer; by default ADAFISHER_BACKEND, then 'auto'.
 * @param options.tolerance the largest max relative error per array that passes (default 1e-4).
 * @param options.file the file name the report carries (readGolden's path, say).
 * @param options.upload turns host data into the tensors handed to the optimizer (e.g. DeviceBuffers).
 * @param options.download reads a tensor back (default: a Float32Array as it is, a DeviceBuffer's download()).
 * @param options.batched records each step's statistics with one recordFactors call instead
 *   of a recordInput and a recordOutputGrad per layer.
 * @throws {TypeError} for a golden case or options that are not objects; GoldenFormatError
 *   (code ADAFISHER_BAD_GOLDEN_FILE) for a malformed case; code ADAFISHER_BACKEND_UNAVAILABLE
 *   for an unusable 'cuda'.
 */
export function replayGolden(
  g: GoldenCase,
  options: {
    backend?: BackendName | undefined;
    tolerance?: number | undefined;
    file?: string | undefined;
    upload?: ((a: Float32Array) => Tensor) | undefined;
    download?: ((t: Tensor) => Float32Array) | undefined;
    batched?: boolean | undefined;
  } = {},
): ReplayReport {
  if (g === null || typeof g !== 'object' || Array.isArray(g)) throw typeError('golden', 'a golden case object (see readGolden)', g);
  if (options === null || typeof options !== 'object' || Array.isArray(options)) throw typeError('options', 'an object', options);
  validateGolden(g);
  const tolerance = options.tolerance === undefined ? 1e-4 : checkRange('options.tolerance', options.tolerance, 0, Infinity);
  const batched = options.batched === undefined ? false : checkBoolean('options.batched', options.batched);
  const upload = options.upload ?? ((a: Float32Array) => a);
  const download = options.download ?? ((t: Tensor) => (isFloat32Array(t) ? t : t.download()));
  const { layers, params } = goldenLayers(g);
  const tensors = params.map((p) => ({ weight: upload(p.weight), bias: p.bias ? upload(p.bias) : null }));
  const specs = layers.map((l, i) => ({ ...l, weight: tensors[i].weight, bias: tensors[i].bias })) as LayerSpec[];
  const opt = new AdaFisher(specs, {
    lr: g.config.lr,
    beta: g.config.beta,
    damping: g.config.damping,
    gamma: g.config.gamma,
    tcov: g.config.tcov,
    weightDecay: g.config.weightDecay,
    decoupled: g.config.optimizer === 'AdaFisherW',
    backend: options.backend,
  });
  const maxRelError = Object.fromEntries(ARRAY_KINDS.map((k) => [k, 0])) as Record<ArrayKind, number>;
  let worst: ReplayReport['worst'] = { kind: 'weights', step: 0, layer: 0 };
  let overall = 0;
  const note = (kind: ArrayKind, step: number, layer: number, e: number) => {
    maxRelError[kind] = Math.max(maxRelError[kind], e);
    if (e > overall || Number.isNaN(e)) {
      overall = e;
      worst = { kind, step, layer };
    }
  };
  let divergence: string | undefined;
  try {
    for (const [t, s] of g.steps.entries()) {
      if (opt.willRefreshFactors && batched) {
        opt.recordFactors(
          s.seen.map((e, i) => ({
            layer: i,
            input: upload(Float32Array.from(e.input)),
            inputShape: e.inputShape,
            outputGrad: upload(Float32Array.from(e.gradOutput)),
            outputGradShape: e.gradOutputShape,
          })),
        );
      } else if (opt.willRefreshFactors) {
        s.seen.forEach((e, i) => {
          opt.recordInput(i, upload(Float32Array.from(e.input)), e.inputShape);
          opt.recordOutputGrad(i, upload(Float32Array.from(e.gradOutput)), e.gradOutputShape);
        });
      }
      const grads: Tensor[] = [];
      s.seen.forEach((e, i) => {
        grads.push(upload(Float32Array.from(e.weightGrad)));
        if (g.layers[i].bias) grads.push(upload(Float32Array.from(e.biasGrad!)));
      });
      const result = opt.step(grads);
      // The refresh cadence (tcov) is compared too, not only through the factors it leaves.
      if (!result.applied) divergence = `step ${t} was skipped by the non-finite guard`;
      else if (result.refreshed !== s.factorsUpdated) {
        divergence = `step ${t} ${result.refreshed ? 'refreshed' : 'did not refresh'} the factors; the official run ${s.factorsUpdated ? 'did' : 'did not'}`;
      }
      if (divergence !== undefined) {
        overall = Infinity;
        worst = { kind: result.applied ? 'H' : 'weights', step: t, layer: 0 };
        break;
      }
      const state = opt.exportState();
      let slot = 0;
      s.after.forEach((a, i) => {
        note('weights', t, i, relError(download(tensors[i].weight), a.weight));
        note('momenta', t, i, relError(state.momenta[slot++], a.momentumWeight));
        if (g.layers[i].bias) {
          note('biases', t, i, relError(download(tensors[i].bias!), a.bias!));
          note('momenta', t, i, relError(state.momenta[slot++], a.momentumBias!));
        }
        note('H', t, i, relError(state.factors[i].H, a.H));
        note('S', t, i, relError(state.factors[i].S, a.S));
      });
    }
  } finally {
    opt.dispose();
  }
  return {
    name: g.name,
    file: options.file,
    backend: opt.backend,
    steps: g.steps.length,
    maxRelError,
    overall,
    worst,
    tolerance,
    pass: divergence === undefined && overall <= tolerance,
    ...(divergence === undefined ? {} : { divergence }),
  };
}
