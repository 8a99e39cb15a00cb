// Shared benchmark machinery: random tensors, the per-workload measurement (factors,
// min-max + EMA, step with and without the non-finite guard), timers, one-process-per-case
// runner and table formatting. See bench/README.md for what each figure means.
import { fork, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { AdaFisher, createBuffer, createTimingEvent, synchronize, type DeviceBuffer, type FactorRecord, type LayerSpec, type Tensor } from '../lib/index.js';
import { deriveWorkload, WORKLOADS, type DerivedWorkload } from './cases.js';

export type Backend = 'cpu' | 'cuda';

// ---------------------------------------------------------------------------------------
// Data

/** Deterministic uniform floats in [-scale, scale) (xorshift32); fast enough for 10^8 values. */
export function randomArray(n: number, seed: number, scale = 1, offset = 0): Float32Array {
  const a = new Float32Array(n);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < n; ++i) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    a[i] = offset + scale * (x / 2147483648 - 1);
  }
  return a;
}

const prod = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

// ---------------------------------------------------------------------------------------
// Statistics

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function quantile(xs: readonly number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.round(q * (s.length - 1))))];
}

export interface Timing {
  /** Median milliseconds per call. */
  ms: number;
  /** 10th and 90th percentile of the samples (per call), ms. */
  p10: number;
  p90: number;
  samples: number;
  /** Calls per sample (1 on the CPU; a batch between two synchronize() on the GPU). */
  callsPerSample: number;
}

export function summarize(samplesMs: number[], callsPerSample: number): Timing {
  // A figure without samples would be NaN here and null after a trip through IPC.
  if (samplesMs.length === 0) throw new Error('no samples were taken');
  return {
    ms: median(samplesMs),
    p10: quantile(samplesMs, 0.1),
    p90: quantile(samplesMs, 0.9),
    samples: samplesMs.length,
    callsPerSample,
  };
}

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

/**
 * A timer turns "run fn" into per-call milliseconds.
 * - CPU: every call is one sample; `before` runs untimed before each (cache flush).
 * - GPU: a sample is a batch of calls between two TimingEvents (CUDA events); the
 *   per-call time is the batch's device time over the batch size.
 */
export interface Timer {
  time(fn: () => void, opts?: { before?: () => void; reps?: number; warmup?: number }): Promise<Timing>;
}

export function cpuTimer(defaultReps: number): Timer {
  return {
    async time(fn, { before, reps = defaultReps, warmup = 3 } = {}) {
      for (let i = 0; i < warmup; ++i) {
        before?.();
        fn();
      }
      const samples: number[] = [];
      for (let i = 0; i < reps; ++i) {
        before?.();
        const t0 = nowMs();
        fn();
        samples.push(nowMs() - t0);
      }
      return summarize(samples, 1);
    },
  };
}

export function gpuTimer(batches: number, targetBatchMs = 25, maxCalls = 2000, backend: Backend = 'cuda'): Timer {
  // A batch is timed by two TimingEvents (CUDA events on the GPU) recorded around it.
  const start = createTimingEvent({ backend });
  const end = createTimingEvent({ backend });
  const batchMs = async (fn: () => void, calls: number) => {
    start.record();
    for (let i = 0; i < calls; ++i) fn();
    end.record();
    await synchronize(backend);
    return start.elapsedMs(end);
  };
  return {
    async time(fn, { before, reps = batches, warmup = 5 } = {}) {
      if (before) throw new Error('gpuTimer: per-call untimed hooks cannot be separated from a batch');
      for (let i = 0; i < warmup; ++i) fn();
      await synchronize(backend);
      // Probe one batch to size the others to ~targetBatchMs.
      const perCall = (await batchMs(fn, 5)) / 5;
      const calls = Math.max(5, Math.min(maxCalls, Math.ceil(targetBatchMs / Math.max(perCall, 1e-4))));
      const samples: number[] = [];
      for (let b = 0; b < reps; ++b) samples.push((await batchMs(fn, calls)) / calls);
      return summarize(samples, calls);
    },
  };
}

// ---------------------------------------------------------------------------------------
// Workload instance

export interface Instance {
  wl: DerivedWorkload;
  backend: Backend;
  layers: LayerSpec[];
  params: DeviceBuffer[];
  grads: DeviceBuffer[];
  inputs: DeviceBuffer[];
  outGrads: DeviceBuffer[];
  /** Reduced statistics for setFactors (positive values), per layer. */
  freshH: Tensor[];
  freshS: Tensor[];
  dispose(): void;
}

/**
 * Allocates parameters, gradients, layer inputs and output gradients with random data, or,
 * with `constant`, filled on the device (fast: the extra copies that cold GPU timings cycle
 * through, where the values do not matter).
 */
export function instantiate(wl: DerivedWorkload, backend: Backend, { constant = false } = {}): Instance {
  const all: DeviceBuffer[] = [];
  let seed = 1;
  const buf = (n: number, scale: number, offset = 0): DeviceBuffer => {
    let b: DeviceBuffer;
    if (constant) {
      b = createBuffer(n, { backend });
      b.fill(offset + scale / 2);
    } else {
      b = createBuffer(randomArray(n, seed++, scale, offset), { backend });
    }
    all.push(b);
    return b;
  };
  const layers: LayerSpec[] = [];
  const params: DeviceBuffer[] = [];
  const grads: DeviceBuffer[] = [];
  const inputs: DeviceBuffer[] = [];
  const outGrads: DeviceBuffer[] = [];
  const freshH: Tensor[] = [];
  const freshS: Tensor[] = [];
  for (const s of wl.shapes) {
    const weight = buf(s.weightNumel, 0.05);
    const bias = s.biasNumel ? buf(s.biasNumel, 0.05) : null;
    params.push(weight);
    grads.push(buf(s.weightNumel, 1e-2));
    if (bias) {
      params.push(bias);
      grads.push(buf(s.biasNumel, 1e-2));
    }
    inputs.push(buf(prod(s.inputShape), 1));
    outGrads.push(buf(prod(s.outputShape), 1e-3));
    const d = s.def;
    if (d.kind === 'linear') {
      layers.push({ kind: 'linear', inFeatures: d.in, outFeatures: d.out, weight, bias });
    } else {
      layers.push({
        kind: 'conv2d',
        inChannels: d.inChannels,
        outChannels: d.outChannels,
        kernelSize: d.kernel,
        stride: d.stride,
        padding: d.padding,
        weight,
        bias,
      });
    }
    const k = d.kind === 'linear' ? d.in : d.inChannels * d.kernel * d.kernel;
    freshH.push(buf(k + (d.bias ? 1 : 0), 0.5, 0.5));
    freshS.push(buf(s.outputShape[1], 0.5, 0.5));
  }
  return {
    wl,
    backend,
    layers,
    params,
    grads,
    inputs,
    outGrads,
    freshH,
    freshS,
    dispose: () => all.forEach((b) => b.dispose()),
  };
}

// Large enough that no step ever refreshes after the first (k mod tcov == 0 only at k = 0).
const NEVER = 1_000_000;

export interface KernelFigures {
  timing: Timing;
  /** Bytes the kernel must move at minimum (see README). */
  bytes: number;
  /** bytes / time. */
  gbps: number;
}

export interface WorkloadResult {
  workload: string;
  description: string;
  backend: Backend;
  parameters: number;
  /**
   * Cold: every call starts from memory (CPU: caches flushed before it; GPU: it works on the
   * next of `rotation` copies of its data). Warm: back-to-back calls on the same buffers.
   */
  factors: {
    cold?: KernelFigures;
    warm: KernelFigures;
    convCold?: KernelFigures;
    convWarm?: KernelFigures;
    /** The same work as one recordFactors call (every layer's input and output gradient). */
    batchedCold?: KernelFigures;
    batchedWarm: KernelFigures;
    /** The conv layers' work as one recordFactors call. */
    convBatchedCold?: KernelFigures;
    convBatchedWarm?: KernelFigures;
    perLayerWarmMs?: number[];
  };
  minMaxEma: { ms: number; refreshStepMs: number; emptyStepMs: number; entries: number };
  step: {
    guardOn: { cold?: KernelFigures; warm: KernelFigures };
    guardOff: { cold?: KernelFigures; warm: KernelFigures };
  };
  /** Copies of the data that cold GPU calls cycle through (1: no rotation). */
  rotation: { factorCopies: number; stepCopies: number };
  /** factors + min-max/EMA + guarded step (cold figures where measured). */
  wholeMs: number;
  /** The same with the factors recorded by one recordFactors call. */
  wholeBatchedMs: number;
}

function figures(timing: Timing, bytes: number): KernelFigures {
  return { timing, bytes, gbps: bytes / (timing.ms * 1e6) };
}

/** Records every layer's input and output gradient, from `data` (default: inst's own). */
function recordAll(opt: AdaFisher, inst: Instance, onlyConv = false, data: Instance = inst): void {
  inst.wl.shapes.forEach((s, i) => {
    if (onlyConv && s.def.kind !== 'conv2d') return;
    opt.recordInput(i, data.inputs[i], s.inputShape);
    opt.recordOutputGrad(i, data.outGrads[i], s.outputShape);
  });
}

/** The records of one recordFactors call for every layer (or every conv layer) of `data` (default: inst's own). */
function allRecords(inst: Instance, data: Instance = inst, onlyConv = false): FactorRecord[] {
  const records: FactorRecord[] = [];
  inst.wl.shapes.forEach((s, i) => {
    if (onlyConv && s.def.kind !== 'conv2d') return;
    records.push({ layer: i, input: data.inputs[i], inputShape: s.inputShape, outputGrad: data.outGrads[i], outputGradShape: s.outputShape });
  });
  return records;
}

/** Copies so that `copies x bytes` exceeds `rotateBytes` (at least 1, at most 256). */
function rotationCopies(bytes: number, rotateBytes: number | undefined): number {
  return rotateBytes ? Math.min(256, Math.max(1, Math.ceil(rotateBytes / Math.max(bytes, 1)))) : 1;
}

function setAllFactors(opt: AdaFisher, inst: Instance): void {
  inst.wl.shapes.forEach((_, i) => opt.setFactors(i, { H: inst.freshH[i], S: inst.freshS[i] }));
}

/**
 * Measures one workload on one backend: warm figures (back-to-back calls on the same
 * buffers) and, when asked, cold ones, where every call starts from memory:
 * - `flush` (CPU): evicts the caches before each timed call (untimed);
 * - `rotateBytes` (GPU, where a batch of calls cannot be split): each call works on the
 *   next of several copies of its inputs (and, for the step, of the parameters, gradients
 *   and optimizer state), cycling through more than `rotateBytes` of them, so a call never
 *   finds its data in L2.
 */
export async function measureWorkload(
  inst: Instance,
  timer: Timer,
  opts: { flush?: () => void; rotateBytes?: number; log?: (s: string) => void } = {},
): Promise<WorkloadResult> {
  const { wl, backend } = inst;
  const log = opts.log ?? (() => {});
  const sync = async () => {
    if (backend === 'cuda') await synchronize(backend);
  };
  const mk = (extra: { tcov: number; nonFiniteGuard: boolean }, on: Instance = inst) =>
    new AdaFisher(on.layers, { lr: 1e-4, backend, ...extra });
  const P = wl.parameters;
  // The rotation's data: inst and constant-filled copies (the values do not matter), made
  // before any timing and shared by the kernels.
  const copies: Instance[] = [];
  const rotation = (n: number): Instance[] => {
    while (copies.length < n - 1) copies.push(instantiate(wl, backend, { constant: true }));
    return [inst, ...copies.slice(0, n - 1)];
  };

  // --- factor accumulation: recordInput + recordOutputGrad of every layer ---------------
  const actBytes = 4 * (wl.inputElements + wl.outputGradElements);
  const convBytes = 4 * (wl.convInputElements + wl.convOutputGradElements);
  const fOpt = mk({ tcov: 1, nonFiniteGuard: true });
  log('factors');
  const factorsWarm = figures(await timer.time(() => recordAll(fOpt, inst)), actBytes);
  const records = allRecords(inst);
  const factors: WorkloadResult['factors'] = {
    warm: factorsWarm,
    batchedWarm: figures(await timer.time(() => fOpt.recordFactors(records)), actBytes),
  };
  const rf = rotationCopies(actBytes, opts.rotateBytes);
  // The conv layers' calls read only their own data: cycling through rotateBytes of it takes
  // more copies than the whole model's data needs (a model light in conv data would find it
  // in L2 otherwise).
  // (Capped at 4x the whole model's copies: a copy is of the whole model, not of its conv data.)
  const rfConv = convBytes > 0 ? Math.min(rotationCopies(convBytes, opts.rotateBytes), 4 * rf) : rf;
  const coldFactors = async (onlyConv: boolean) => {
    if (opts.flush) return timer.time(() => recordAll(fOpt, inst, onlyConv), { before: opts.flush });
    const n = onlyConv ? rfConv : rf;
    const data = rotation(n);
    let i = 0;
    return timer.time(() => recordAll(fOpt, inst, onlyConv, data[i++ % n]));
  };
  const coldBatched = async (onlyConv: boolean) => {
    const n = opts.flush ? 1 : onlyConv ? rfConv : rf;
    const each = rotation(n).map((data) => allRecords(inst, data, onlyConv));
    if (opts.flush) return timer.time(() => fOpt.recordFactors(each[0]), { before: opts.flush });
    let i = 0;
    return timer.time(() => fOpt.recordFactors(each[i++ % n]));
  };
  const cold = opts.flush !== undefined || rf > 1;
  if (cold) {
    factors.cold = figures(await coldFactors(false), actBytes);
    factors.batchedCold = figures(await coldBatched(false), actBytes);
  }
  if (convBytes > 0) {
    factors.convWarm = figures(await timer.time(() => recordAll(fOpt, inst, true)), convBytes);
    const convRecords = allRecords(inst, inst, true);
    factors.convBatchedWarm = figures(await timer.time(() => fOpt.recordFactors(convRecords)), convBytes);
    if (cold) {
      factors.convCold = figures(await coldFactors(true), convBytes);
      factors.convBatchedCold = figures(await coldBatched(true), convBytes);
    }
  }
  if (backend === 'cpu') {
    // Per-layer split (warm), for "where does the time go".
    factors.perLayerWarmMs = [];
    for (const [i, s] of wl.shapes.entries()) {
      const t = await timer.time(() => {
        fOpt.recordInput(i, inst.inputs[i], s.inputShape);
        fOpt.recordOutputGrad(i, inst.outGrads[i], s.outputShape);
      });
      factors.perLayerWarmMs.push(t.ms);
    }
  }
  fOpt.dispose();
  await sync();

  // --- min-max + EMA: (setFactors + refreshing step with no gradients) minus
  //     (setFactors + non-refreshing step with no gradients); see README -----------------
  log('min-max + EMA');
  const nulls = inst.params.map(() => null);
  // The guard off: with it on, each step waits for the guard flag to come back to the host
  // (on cuda a round trip of 10-20 us around a kernel of a few), and the difference of the
  // two series would be mostly that noise; without it both series stay queued on the device.
  const refresh = mk({ tcov: 1, nonFiniteGuard: false });
  const empty = mk({ tcov: NEVER, nonFiniteGuard: false });
  setAllFactors(empty, inst);
  empty.step(nulls); // step 0 refreshes; none after
  const refreshT = await timer.time(() => {
    setAllFactors(refresh, inst);
    refresh.step(nulls);
  });
  const emptyT = await timer.time(() => {
    setAllFactors(empty, inst);
    empty.step(nulls);
  });
  if (empty.willRefreshFactors || !refresh.willRefreshFactors) throw new Error('min-max/EMA cadence not as planned');
  refresh.dispose();
  empty.dispose();

  // --- step: guard on / off, non-refreshing ---------------------------------------------
  const step = {} as WorkloadResult['step'];
  const rs = rotationCopies(20 * P, opts.rotateBytes);
  for (const guard of [true, false]) {
    log(`step guard ${guard ? 'on' : 'off'}`);
    // One optimizer per copy (each owns its momentum), after its one refreshing step.
    const replicas = rotation(opts.flush ? 1 : rs).map((on) => {
      const opt = mk({ tcov: NEVER, nonFiniteGuard: guard }, on);
      recordAll(opt, on);
      opt.step(on.grads);
      return { opt, grads: on.grads };
    });
    const fn = () => {
      replicas[0].opt.step(replicas[0].grads);
    };
    // 20 B/param: read p, g, m; write p, m. The guard reads g once more: 24 B/param.
    const bytes = P * (guard ? 24 : 20);
    const warm = figures(await timer.time(fn), bytes);
    const entry: { cold?: KernelFigures; warm: KernelFigures } = { warm };
    if (opts.flush) {
      entry.cold = figures(await timer.time(fn, { before: opts.flush }), bytes);
    } else if (rs > 1) {
      let i = 0;
      entry.cold = figures(
        await timer.time(() => {
          const r = replicas[i++ % rs];
          r.opt.step(r.grads);
        }),
        bytes,
      );
    }
    if (guard) step.guardOn = entry;
    else step.guardOff = entry;
    replicas.forEach((r) => r.opt.dispose());
    await sync();
  }
  copies.forEach((c) => c.dispose());

  const mm = Math.max(0, refreshT.ms - emptyT.ms);
  const pick = (f: { cold?: KernelFigures; warm: KernelFigures }) => (f.cold ?? f.warm).timing.ms;
  return {
    workload: wl.name,
    description: wl.description,
    backend,
    parameters: P,
    factors,
    minMaxEma: { ms: mm, refreshStepMs: refreshT.ms, emptyStepMs: emptyT.ms, entries: wl.factorEntries },
    step,
    rotation: { factorCopies: cold && !opts.flush ? rf : 1, stepCopies: opts.flush ? 1 : rs },
    wholeMs: pick(factors as { cold?: KernelFigures; warm: KernelFigures }) + mm + pick(step.guardOn),
    wholeBatchedMs: pick({ cold: factors.batchedCold, warm: factors.batchedWarm }) + mm + pick(step.guardOn),
  };
}

// ---------------------------------------------------------------------------------------
// One fresh process per case

/**
 * Runs `script --case NAME ...args` in a forked child for every case, in order, and
 * collects what each child sends with `process.send`. A failed case yields { error }.
 */
export async function runCasesInChildren(
  script: string,
  cases: readonly string[],
  args: string[],
  /** Called after each case with the results so far (say, to save them before a time limit cuts the run). */
  onResult?: (results: Record<string, unknown>) => void,
): Promise<Record<string, unknown>> {
  const results: Record<string, unknown> = {};
  // A signal that would end this process ends the running case first (it may hold the GPU),
  // then this process, as the signal would have.
  let current: ChildProcess | undefined;
  const stop = (signal: NodeJS.Signals) => {
    current?.kill(signal);
    for (const s of STOP_SIGNALS) process.off(s, stop);
    process.kill(process.pid, signal);
  };
  for (const s of STOP_SIGNALS) process.on(s, stop);
  try {
    for (const name of cases) {
      results[name] = await new Promise((resolve) => {
        let got: unknown;
        const child = fork(script, ['--case', name, ...args], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
        current = child;
        child.on('message', (m) => {
          got = m;
        });
        child.on('exit', (code, signal) => {
          current = undefined;
          if (got !== undefined) resolve(got);
          else resolve({ error: `case ${name} exited with ${signal ?? code} before reporting` });
        });
      });
      onResult?.(results);
    }
  } finally {
    for (const s of STOP_SIGNALS) process.off(s, stop);
  }
  return results;
}

const STOP_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

/** The child side: runs `fn` and sends its result (or the error) to the parent. */
export async function reportToParent(fn: () => Promise<unknown>): Promise<void> {
  // A parent that is gone (killed) wants no result: stop at the next turn of the event loop.
  if (process.send) process.on('disconnect', () => process.exit(1));
  let out: unknown;
  try {
    out = await fn();
  } catch (e) {
    const err = e as Error & { code?: string };
    out = { error: `${err.code ? `${err.code}: ` : ''}${err.message}` };
  }
  if (process.send) await new Promise<void>((resolve) => process.send!(out, () => resolve()));
  else console.log(JSON.stringify(out, null, 2));
  process.exit(0);
}

// ---------------------------------------------------------------------------------------
// Command line (shared by cpu.ts, gpu.ts and tfjs-overhead.ts)

/** A mistake on a bench's command line: one `bench: ...` line on stderr, exit code 2. */
export class UsageError extends Error {}

type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
type OptionValues<T extends OptionSpec> = { [K in keyof T]?: T[K]['type'] extends 'boolean' ? boolean : string };

/**
 * node:util parseArgs with strict: true (an unknown option, a missing value or a positional
 * argument is a UsageError) plus -h/--help. On --help prints `usage` and returns undefined:
 * the caller returns before measuring anything.
 */
export function parseCli<T extends OptionSpec>(argv: string[], options: T, usage: string): OptionValues<T> | undefined {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false }));
  } catch (e) {
    throw new UsageError((e as Error).message.replace(/\s*\n\s*/g, ' '));
  }
  if (values.help) {
    console.log(usage);
    return undefined;
  }
  return values as OptionValues<T>;
}

/** A count option: a positive integer (digits only), or `def` when absent. */
export function positiveInt(name: string, text: string | undefined, def: number): number {
  if (text === undefined) return def;
  const n = Number(text);
  if (!/^[0-9]+$/.test(text) || !Number.isSafeInteger(n) || n < 1) {
    throw new UsageError(`--${name} expects a positive integer, got '${text}'`);
  }
  return n;
}

/** One of `allowed`, or `def` when absent. */
export function oneOf<T extends string>(name: string, text: string | undefined, allowed: readonly T[], def: T): T {
  if (text === undefined) return def;
  if (!(allowed as readonly string[]).includes(text)) {
    throw new UsageError(`--${name} expects one of ${allowed.join(', ')}, got '${text}'`);
  }
  return text as T;
}

/** A comma-separated list of case names, each one of `known` (duplicates dropped), or `def`. */
export function caseList(name: string, text: string | undefined, known: readonly string[], def: readonly string[]): string[] {
  if (text === undefined) return [...def];
  const list = [...new Set(text.split(',').map((c) => c.trim()))];
  if (list.length === 0 || list.includes('')) {
    throw new UsageError(`--${name} expects comma-separated case names (${known.join(', ')}), got '${text}'`);
  }
  const bad = list.filter((c) => !known.includes(c));
  if (bad.length > 0) {
    throw new UsageError(`unknown case ${bad.map((c) => `'${c}'`).join(', ')} in --${name} (known: ${known.join(', ')})`);
  }
  return list;
}

/**
 * How the user ran a bench script, for its usage text and error hints: `adafisher bench cpu`
 * (the package's command line sets ADAFISHER_BENCH_COMMAND when it runs the script) or
 * `node dist/bench/<script>` (a clone of the repository).
 */
export function benchCommand(script: string): string {
  return process.env.ADAFISHER_BENCH_COMMAND || `node dist/bench/${script}`;
}

/**
 * Runs a bench's main. A UsageError becomes exit code 2, any other error exit code 1, with
 * no stack trace: run as `adafisher bench`, an error is the command line's `adafisher:
 * <message>` line, followed for bad usage by a line naming the --help to read; run as a
 * script, one `bench: <message>` line.
 */
export function runMain(script: string, main: () => Promise<void> | void): void {
  Promise.resolve()
    .then(main)
    .catch((e: unknown) => {
      const message = (e instanceof Error ? e.message : String(e)).replace(/\s*\n\s*/g, ' ');
      const viaCommand = Boolean(process.env.ADAFISHER_BENCH_COMMAND);
      const usage = e instanceof UsageError;
      if (viaCommand) {
        console.error(`adafisher: ${message}${usage ? `\nRun '${benchCommand(script)} --help' for usage.` : ''}`);
      } else {
        console.error(`bench: ${message}${usage ? ` (see '${benchCommand(script)} --help')` : ''}`);
      }
      process.exitCode = usage ? 2 : 1;
    });
}

// ---------------------------------------------------------------------------------------
// Verdicts

/** A ratio of two measured figures: finite and > 0 (a figure without samples makes it NaN, 0 or Infinity). */
export function isMeasured(x: unknown): x is number {
  return typeof x === 'number' && Number.isFinite(x) && x > 0;
}

/** Whether `ratio` meets a target: true or false where it was measured, null where it was not. */
export function judge(ratio: unknown, ok: (x: number) => boolean): boolean | null {
  return isMeasured(ratio) ? ok(ratio) : null;
}

/** The word for a judge() result: a target is never "met" without a measurement. */
export function verdict(met: boolean | null | undefined): string {
  return met === true ? 'met' : met === false ? 'MISSED' : 'not measured';
}

// ---------------------------------------------------------------------------------------
// PyTorch baselines (bench/torch_baselines.py)

/** What bench/torch_baselines.py prints (see there). */
export interface TorchBaselines {
  /** Set when read with --torch FILE (not measured in this run). */
  fromFile?: string;
  device?: string;
  torch?: string;
  threads?: number;
  copyGBps?: number;
  /** The eager AdaFisher's max relative error against each golden trajectory. */
  golden?: Record<string, { maxRelError: number | null; worst: string }>; // null: NaN or infinite
  workloads?: Record<
    string,
    {
      /** "fused", or "foreach" where this torch build has no fused Adam for the device. */
      adam?: string;
      fusedAdamMs?: number;
      eager?: { factorsMs: number; minMaxEmaMs: number; stepMs: number; totalMs: number };
      error?: string;
    }
  >;
  error?: string;
}

/** Reads a --torch file; a file that cannot be read becomes { error }. */
export function readTorchBaselines(file: string, backend?: 'cpu' | 'cuda', fromFile = true): TorchBaselines {
  let t: TorchBaselines;
  try {
    t = JSON.parse(readFileSync(file, 'utf8')) as TorchBaselines;
  } catch (e) {
    return { error: `cannot read ${file}: ${(e as Error).message}` };
  }
  if (fromFile) t.fromFile = file;
  // Baselines of another kind of device are no baseline (a CPU copy figure taken as a GPU's
  // limit, or an H200's eager time against a CPU run): refused, the figures left out.
  const device = String(t.device ?? '');
  const isCpu = device === 'cpu' || device.startsWith('cpu');
  if (backend !== undefined && (backend === 'cpu') !== isCpu) {
    return { error: `${file} was measured on ${device || 'an unknown device'}, this benchmark runs on ${backend}: its figures are not used`, ...(fromFile ? { fromFile: file } : {}) };
  }
  return t;
}

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * Runs bench/torch_baselines.py with `python` (in its own process, after ours) on the given
 * workloads, with the golden trajectories as its self-check. Returns { skipped } when
 * python or torch is not installed: the PyTorch figures are then simply absent.
 */
export function runTorchBaselines(opts: {
  cases: readonly string[];
  device: Backend;
  threads?: number;
  reps: number;
  python?: string;
}): TorchBaselines | { skipped: string } {
  const python = opts.python ?? 'python3';
  const probe = spawnSync(python, ['-c', 'import torch; print(torch.__version__)'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    const why = probe.error ? probe.error.message : (probe.stderr.trim().split('\n').pop() ?? `exit ${probe.status}`);
    return { skipped: `${python} cannot import torch (${why})` };
  }
  const dir = mkdtempSync(join(tmpdir(), 'adafisher-torch-'));
  try {
    const cases: Record<string, DerivedWorkload> = {};
    for (const name of opts.cases) cases[name] = deriveWorkload(WORKLOADS[name]);
    writeFileSync(join(dir, 'cases.json'), JSON.stringify(cases));
    const goldenDir = join(REPO, 'test', 'golden');
    const golden = readdirSync(goldenDir).filter((f) => f.endsWith('.json')).map((f) => join(goldenDir, f));
    const args = [join(REPO, 'bench', 'torch_baselines.py'), '--device', opts.device, '--reps', String(opts.reps)];
    if (opts.threads) args.push('--threads', String(opts.threads));
    args.push('--cases', join(dir, 'cases.json'), '--out', join(dir, 'torch.json'), '--check-golden', ...golden);
    // OMP_WAIT_POLICY=PASSIVE (unless set): torch's OpenMP threads otherwise spin between
    // parallel regions, and on a machine shared with other work they lose their time slices:
    // the eager baseline measured 6x slower under load. The passive policy gives torch its
    // robust configuration, so a busy machine does not flatter our ratios.
    const env = { ...process.env, OMP_WAIT_POLICY: process.env.OMP_WAIT_POLICY ?? 'PASSIVE' };
    const run = spawnSync(python, args, { encoding: 'utf8', stdio: ['ignore', 'ignore', 'pipe'], env, timeout: 3_600_000 });
    const out = readTorchBaselines(join(dir, 'torch.json'), opts.device, false);
    if (run.status !== 0 && !out.error) out.error = `torch_baselines.py exited with ${run.status ?? run.signal}: ${(run.stderr ?? '').trim().slice(-300)}`;
    return out;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** One line on the PyTorch baselines of a run: version, threads, golden self-check. */
export function describeTorch(t: TorchBaselines | { skipped: string } | undefined): string {
  if (!t) return 'PyTorch baselines: not measured (no --torch file)';
  if ('skipped' in t) return `PyTorch baselines: not measured: ${t.skipped}`;
  const when = t.fromFile ? `from ${t.fromFile}` : 'same run';
  const parts = [`PyTorch baselines (${when}): torch ${t.torch ?? '?'} on ${t.device ?? '?'}${t.threads ? `, ${t.threads} threads` : ''}`];
  if (t.golden && Object.keys(t.golden).length === 0) {
    parts.push('its eager AdaFisher was not checked against the golden trajectories');
  } else if (t.golden) {
    const errs = Object.values(t.golden).map((g) => (g.maxRelError === null ? Number.NaN : g.maxRelError));
    const worst = errs.some((e) => !(e <= 1e-4)) ? Number.NaN : Math.max(...errs);
    const shown = errs.map((e) => (Number.isFinite(e) ? e.toExponential(1) : 'non-finite'));
    parts.push(
      Number.isNaN(worst)
        ? `its eager AdaFisher does NOT reproduce the golden trajectories within 1e-4 (max rel. errors ${shown.join(', ')}): its figures are not a faithful baseline`
        : `its eager AdaFisher reproduces the ${errs.length} golden trajectories to max rel. error ${worst.toExponential(1)}`,
    );
  }
  if (t.error) parts.push(`ERROR: ${t.error}`);
  return parts.join('; ');
}

// ---------------------------------------------------------------------------------------
// Formatting

export const fmtMs = (ms: number | undefined) =>
  ms === undefined || !Number.isFinite(ms) ? '-' : ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms >= 1 ? ms.toFixed(2) : ms.toFixed(3);
export const fmtNum = (x: number | undefined, digits = 1) => (x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(digits));
export const fmtMB = (bytes: number) => `${(bytes / 1e6).toFixed(bytes >= 1e8 ? 0 : 1)} MB`;

/** A Markdown table (also readable as plain text). */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`;
  return [line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...rows.map(line)].join('\n');
}
