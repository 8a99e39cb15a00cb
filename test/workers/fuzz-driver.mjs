#!/usr/bin/env node
// Property-based fuzzing of every native entry point, straight through the raw binding
// (lib/binding.ts `binding()`), bypassing every TypeScript check.
//
//   node [--expose-gc] test/workers/fuzz-driver.mjs --calls 10000 --seed 42 --log fuzz.log [--avoid]
//        [--backend cpu|cuda]
//
// --backend (default: ADAFISHER_BACKEND, else cpu) is the backend the valid values use:
// buffers and optimizers are made on it and every result is checked there. Any backend
// the binding reports usable is accepted; any other name must be refused.
// Each fast-check run builds a small world (device buffers with a host shadow copy,
// optimizers with a snapshot of their state) and makes a sequence of calls whose arguments
// are drawn from valid values, valid values with one part broken, and hostile values
// (wrong types, NaN/negative/huge sizes, detached/resizable/shared buffers, foreign
// objects, Object.create(DeviceBuffer.prototype), disposed handles, throwing getters,
// proxies). Every call must either succeed correctly (checked against the shadow model:
// contents, lengths, step counters, state unchanged when nothing should change) or throw
// a TypeError, RangeError or Error with a `code` starting ADAFISHER_. A call that throws
// leaves every optimizer's state and parameters exactly as they were.
//
// Before each call one line describing it is written (synchronously) to --log, so when the
// process dies (a crash, a sanitizer report) the parent can say which input did it.
// Findings that are JS-level (wrong error class, wrong result) are collected and printed
// as JSON on the last stdout line; the exit code is 1 when there are any.
//
// --avoid skips the input classes of crashes already reported (KNOWN_CRASHES below), so a
// run can look for other problems while those are being fixed. CI runs without it.
import fc from 'fast-check';
import { closeSync, openSync, writeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { values: opts } = parseArgs({
  options: {
    calls: { type: 'string', default: '10000' },
    seed: { type: 'string' },
    log: { type: 'string' },
    avoid: { type: 'boolean', default: false },
    backend: { type: 'string', default: process.env.ADAFISHER_BACKEND || 'cpu' },
  },
});
const targetCalls = Number(opts.calls);
const seed = opts.seed === undefined ? Date.now() % 2 ** 31 : Number(opts.seed);
const logFd = opts.log ? openSync(opts.log, 'w') : -1;

const { loadBinding } = await import(pathToFileURL(join(root, 'dist', 'lib', 'binding.js')).href);
const { binding: b, path: addonPath } = loadBinding();
if (process.env.ADAFISHER_ADDON && addonPath !== resolve(process.env.ADAFISHER_ADDON)) {
  throw new Error(`loaded ${addonPath}, not ADAFISHER_ADDON=${process.env.ADAFISHER_ADDON}`);
}
const { DeviceBuffer, NativeOptimizer, TimingEvent } = b;
const BACKEND = opts.backend;
const USABLE = new Set(['cpu', ...(b.backendInfo().cudaUsable ? ['cuda'] : [])]);
if (!USABLE.has(BACKEND)) throw new Error(`--backend ${BACKEND} is not usable with ${addonPath}`);

// Input classes that crash the process today (reported to the lead; see the final report
// and test/fuzz-regressions.test.ts). Skipped only with --avoid.
const KNOWN_CRASHES = {
  // native/core/optimizer.cc:287/318/325: n / (N * C) with N * C overflowing to 0 (SIGFPE)
  // when a zero dim comes after a huge batch (NHWC batchnorm input/grad, conv grad).
  divByOverflow: (shape) => Array.isArray(shape) && shape.some((d) => d === 0) && shape.some((d) => typeof d === 'number' && d >= 2 ** 20),
  // native/core/optimizer.cc:70/114: unchecked (in/g)*kh*kw and out*k (signed overflow, UB).
  layerOverflow: (layers) =>
    Array.isArray(layers) &&
    layers.some((l) => {
      if (l === null || typeof l !== 'object') return false;
      const f = ['inFeatures', 'outFeatures', 'kernelH', 'kernelW'].map((k) => (typeof l[k] === 'number' && Number.isFinite(l[k]) ? Math.abs(l[k]) : 1));
      return f.reduce((a, x) => a * Math.max(x, 1), 1) >= 2 ** 50;
    }),
  // native/optimizer_wrap.cc:188-190 Step + native/glue.cc:165 TensorRef + native/buffer_wrap.cc:24
  // InstanceOf: a getter/proxy trap that runs
  // while step() collects its arguments detaches an already-resolved Float32Array (use after free).
  reentrantDetach: () => true,
  // native/buffer_wrap.cc / native/optimizer_wrap.cc InstanceAccessor getters: V8 does not
  // check their receiver, so a getter called on the other class's instance unwraps it as the
  // wrong C++ type (type confusion; the optimizer's `backend` getter on a DeviceBuffer segfaults).
  accessorConfusion: (self, cls) => [DeviceBuffer, NativeOptimizer, TimingEvent].some((C) => C !== cls && isA(self, C)),
};
const avoided = { divByOverflow: 0, layerOverflow: 0, reentrantDetach: 0, accessorConfusion: 0 };

class HostileError extends Error {}
// DeviceBuffers the native constructor really made (a subclass instance is one), as opposed
// to objects that merely inherit from DeviceBuffer.prototype.
const realBuffers = new WeakSet();
const otherReal = (self, e) => self !== e?.buf && realBuffers.has(self);
// Likewise for optimizers: `maybe` may swap in another live optimizer, on which a call can
// rightly succeed (e.g. step([], []) on one with no tensors).
const realOpts = new WeakSet();
const otherRealOpt = (self, e) => self !== e?.opt && realOpts.has(self);
const isF32 = (v) => ArrayBuffer.isView(v) && isA(v, Float32Array); // not a Proxy of one
// instanceof that survives hostile proxies (their getPrototypeOf trap throws).
function isA(v, C) {
  try {
    return v instanceof C;
  } catch {
    return false;
  }
}
const hostile = () => {
  throw new HostileError('hostile getter');
};

// ---------------------------------------------------------------------------------------
// Outcome checks
// ---------------------------------------------------------------------------------------
const findings = new Map(); // signature -> { count, example }
let calls = 0;

function finding(kind, entry, detail, desc) {
  const sig = `${kind} in ${entry}: ${String(detail).slice(0, 120)}`;
  const f = findings.get(sig);
  if (f) f.count++;
  else findings.set(sig, { count: 1, example: desc });
}

// A thrown value is acceptable when it is one of ours (class + code) or V8's own receiver
// checks (methods called on a non-instance, a class called without new), or a hostile
// value's own exception passing through.
function acceptableError(e) {
  if (e instanceof HostileError) return true;
  if (!(e instanceof Error)) return false;
  const code = e.code;
  if (e instanceof TypeError) {
    if (code === 'ADAFISHER_INVALID_ARGUMENT') return true;
    return code === undefined && /^(Illegal invocation|Class constructors? .*cannot be invoked without 'new')/.test(e.message);
  }
  if (e instanceof RangeError) return code === 'ADAFISHER_INVALID_ARGUMENT';
  return e.constructor === Error && typeof code === 'string' && code.startsWith('ADAFISHER_');
}

function describe(v, depth = 0) {
  try {
    if (v === undefined) return 'undefined';
    if (typeof v === 'number') return Object.is(v, -0) ? '-0' : String(v);
    if (typeof v === 'bigint') return `${v}n`;
    if (typeof v === 'string') return JSON.stringify(v.length > 20 ? v.slice(0, 20) + '…' : v);
    if (typeof v === 'symbol' || typeof v === 'boolean' || v === null) return String(v);
    if (typeof v === 'function') return 'function';
    if (realBuffers.has(v)) return `DeviceBuffer(${v.disposed ? 'disposed' : v.length})`;
    if (v[TAG]) return v[TAG];
    if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${v.length ?? v.byteLength})`;
    if (Array.isArray(v)) return depth > 2 ? '[…]' : `[${[...Array(Math.min(v.length, 8)).keys()].map((i) => describe(Object.getOwnPropertyDescriptor(v, i)?.get ? '<getter>' : v[i], depth + 1)).join(', ')}]`;
    if (depth > 2) return '{…}';
    return `{${Object.keys(v).slice(0, 16).map((k) => `${k}: ${Object.getOwnPropertyDescriptor(v, k)?.get ? '<getter>' : describe(v[k], depth + 1)}`).join(', ')}}`;
  } catch {
    return '<unprintable>';
  }
}
const TAG = Symbol('fuzz tag');
const tag = (v, name) => {
  try {
    Object.defineProperty(v, TAG, { value: name });
  } catch {
    /* frozen or proxy */
  }
  return v;
};

function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  if (a.length === 0) return true; // views of detached buffers cannot be made
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) return false;
  return true;
}

// ---------------------------------------------------------------------------------------
// The world of one run
// ---------------------------------------------------------------------------------------
const CONFIG = { rule: 0, lr: 1e-2, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };

// Sizes that are wrong in every way but never make the CPU backend really allocate
// gigabytes: integers from 2^39 up fail the allocation at once (and exceed ASan's limit).
const HUGE = [2 ** 39, 2 ** 40, 2 ** 40 + 1, 2 ** 50, 2 ** 50 + 1, 2 ** 52, 2 ** 53, 2 ** 53 + 2, 2 ** 63, 1e300, Number.MAX_VALUE];
const ODD_NUMBERS = [NaN, Infinity, -Infinity, -0, -1, -2, 0.5, 1.5, -(2 ** 31), 2 ** 31 + 0.5, 2 ** 32 - 0.5, Number.EPSILON, -1e-300];

function makeLayer(g) {
  const kind = g(fc.integer, { min: 0, max: 3 });
  const dim = () => g(fc.constantFrom, 1, 2, 3, 4, 5, 7, 8, 1, 2, 3, 16384);
  const l = { kind, hasBias: g(fc.boolean), inFeatures: dim(), outFeatures: dim(), layout: g(fc.integer, { min: 0, max: 1 }), format: g(fc.integer, { min: 0, max: 1 }) };
  if (l.inFeatures > 8 && (l.outFeatures > 8 || kind === 1)) l.inFeatures = 2; // weights stay small
  if (kind === 1) {
    Object.assign(l, {
      kernelH: g(fc.integer, { min: 1, max: 3 }),
      kernelW: g(fc.integer, { min: 1, max: 3 }),
      strideH: g(fc.integer, { min: 1, max: 2 }),
      strideW: g(fc.integer, { min: 1, max: 2 }),
      groups: 1,
      padMode: g(fc.integer, { min: 0, max: 1 }),
      padTop: g(fc.integer, { min: 0, max: 1 }),
      padBottom: g(fc.integer, { min: 0, max: 1 }),
      padLeft: g(fc.integer, { min: 0, max: 1 }),
      padRight: g(fc.integer, { min: 0, max: 1 }),
    });
    if (l.inFeatures % 2 === 0 && l.outFeatures % 2 === 0 && g(fc.boolean)) l.groups = 2;
  }
  return l;
}
const kOf = (l) => (l.kind === 0 ? l.inFeatures : l.kind === 1 ? (l.inFeatures / l.groups) * l.kernelH * l.kernelW : 1);

function makeModel(g) {
  const layers = g(fc.array, fc.constant(0), { maxLength: 3 }).map(() => makeLayer(g));
  const tensors = [];
  layers.forEach((l, i) => {
    tensors.push({ numel: l.outFeatures * kOf(l), layer: i, role: 0 });
    if (l.hasBias) tensors.push({ numel: l.outFeatures, layer: i, role: 1 });
  });
  if (g(fc.boolean)) tensors.push({ numel: g(fc.integer, { min: 0, max: 9 }), layer: -1, role: 0 });
  return { layers, tensors };
}

function inputShape(g, l) {
  const N = g(fc.integer, { min: 1, max: 3 });
  switch (l.kind) {
    case 0:
      return [N, l.inFeatures];
    case 1: {
      const H = l.kernelH + g(fc.integer, { min: 0, max: 2 });
      const W = l.kernelW + g(fc.integer, { min: 0, max: 2 });
      return l.format === 0 ? [N, l.inFeatures, H, W] : [N, H, W, l.inFeatures];
    }
    case 2:
      return g(fc.boolean) ? [N, l.outFeatures] : l.format === 0 ? [N, l.outFeatures, 2, 1] : [N, 2, 1, l.outFeatures];
    default:
      return g(fc.boolean) ? [N, l.outFeatures] : [N, 2, l.outFeatures];
  }
}
function gradShape(g, l) {
  const N = g(fc.integer, { min: 1, max: 3 });
  switch (l.kind) {
    case 0:
    case 3:
      return [N, l.outFeatures];
    case 1:
      return l.format === 0 ? [N, l.outFeatures, 1, 2] : [N, 1, 2, l.outFeatures];
    default:
      return l.format === 0 ? [N, l.outFeatures, 1, 1] : [N, 1, 1, l.outFeatures];
  }
}
const prod = (s) => s.reduce((a, x) => a * x, 1);

function randomF32(g, n) {
  const a = new Float32Array(n);
  const scale = g(fc.constantFrom, 1, 1, 1, 1e-3, 1e30);
  for (let i = 0; i < n; i++) a[i] = Math.sin(i * 12.9898 + n) * scale;
  if (n > 0 && g(fc.integer, { min: 0, max: 15 }) === 0) a[g(fc.integer, { min: 0, max: n - 1 })] = g(fc.constantFrom, NaN, Infinity, -Infinity);
  return a;
}

class World {
  constructor(g) {
    this.g = g;
    this.buffers = []; // { buf, shadow }
    this.opts = []; // { opt, model, params, state }
    this.disposedBuffers = [];
    this.disposedOpts = [];
    this.events = []; // TimingEvents made by the calls (disposed at the end of the run)
  }

  // A value of any kind; `hint` makes valid-looking ones likelier.
  any() {
    const g = this.g;
    switch (g(fc.integer, { min: 0, max: 24 })) {
      case 0: return g(fc.constantFrom, undefined, null, true, false);
      case 1: return g(fc.constantFrom, ...HUGE);
      case 2: return g(fc.constantFrom, ...ODD_NUMBERS);
      case 3: return g(fc.integer, { min: 0, max: 20 });
      case 4: return g(fc.constantFrom, 'cpu', 'cuda', 'CPU', '', 'gpu', 'x'.repeat(64), '3');
      case 5: return g(fc.constantFrom, Symbol('s'), 10n, -1n, () => 1);
      case 6: return g(fc.constantFrom, {}, [], [1, 2], new Date(0), new Map(), Object.create(null), Promise.resolve(1));
      case 7: return tag(new Float32Array(g(fc.integer, { min: 0, max: 16 })), 'Float32Array');
      case 8: {
        const n = g(fc.integer, { min: 0, max: 8 });
        return tag(g(fc.constantFrom, new Float64Array(n), new Int32Array(n), new Uint8Array(n), new DataView(new ArrayBuffer(n)), new ArrayBuffer(n * 4)), 'other typed');
      }
      case 9: return this.detachedF32(g(fc.integer, { min: 0, max: 8 }));
      case 10: return this.specialF32(g(fc.integer, { min: 0, max: 8 }));
      case 11: return this.liveBuffer() ?? 0;
      case 12: return this.disposedBuffer();
      case 13: return tag(Object.create(DeviceBuffer.prototype), 'Object.create(DeviceBuffer.prototype)');
      case 14: return tag(Object.create(NativeOptimizer.prototype), 'Object.create(NativeOptimizer.prototype)');
      case 15: return this.opts.length ? tag(this.opts[g(fc.integer, { min: 0, max: this.opts.length - 1 })].opt, 'optimizer') : null;
      case 16: return this.disposedOptimizer();
      case 17: return tag(Object.defineProperty({}, 'length', { get: hostile, enumerable: true }), 'hostile object');
      case 18: return tag(new Proxy({}, { get: hostile, has: hostile, ownKeys: hostile, getPrototypeOf: hostile }), 'hostile proxy');
      case 19: return tag(new Proxy([1, 2], {}), 'array proxy');
      case 20: return tag(new Proxy(new Float32Array(4), {}), 'Float32Array proxy');
      case 22: return this.events.length ? tag(this.events[g(fc.integer, { min: 0, max: this.events.length - 1 })], 'TimingEvent') : null;
      case 23: return tag(Object.create(TimingEvent.prototype), 'Object.create(TimingEvent.prototype)');
      case 21: {
        class Sub extends DeviceBuffer {}
        const sub = new Sub(BACKEND, 2);
        realBuffers.add(sub);
        return tag(sub, 'DeviceBuffer subclass');
      }
      default: return g(fc.array, fc.constantFrom(0, 1, -1, NaN, 2 ** 50, 'a', null), { maxLength: 4 });
    }
  }

  detachedF32(n) {
    const a = new Float32Array(n);
    structuredClone(a.buffer, { transfer: [a.buffer] });
    return tag(a, `detached Float32Array(${n})`);
  }
  specialF32(n) {
    const g = this.g;
    switch (g(fc.integer, { min: 0, max: 3 })) {
      case 0: return tag(new Float32Array(new SharedArrayBuffer(n * 4)), `shared Float32Array(${n})`);
      case 1: return tag(new Float32Array(n + 3).subarray(1, 1 + n), `offset Float32Array(${n})`);
      case 2: return tag(new Float32Array(new ArrayBuffer(n * 4, { maxByteLength: n * 4 + 64 })), `resizable Float32Array(${n})`);
      default: {
        const ab = new ArrayBuffer(n * 4 + 4, { maxByteLength: n * 4 + 64 });
        const a = new Float32Array(ab); // length-tracking
        ab.resize(n * 4);
        return tag(a, `length-tracking Float32Array(${n})`);
      }
    }
  }
  liveBuffer() {
    const live = this.buffers.filter((x) => !x.buf.disposed);
    return live.length ? tag(live[this.g(fc.integer, { min: 0, max: live.length - 1 })].buf, 'DeviceBuffer') : undefined;
  }
  disposedBuffer() {
    if (this.disposedBuffers.length) return this.disposedBuffers[0];
    const d = new DeviceBuffer(BACKEND, 2);
    realBuffers.add(d);
    d.dispose();
    this.disposedBuffers.push(tag(d, 'disposed DeviceBuffer'));
    return d;
  }
  disposedOptimizer() {
    if (this.disposedOpts.length) return this.disposedOpts[0];
    const o = new NativeOptimizer(BACKEND, CONFIG, [], []);
    o.dispose();
    this.disposedOpts.push(tag(o, 'disposed optimizer'));
    return o;
  }

  // A valid value, or with probability ~1/3 something else.
  maybe(valid) {
    return this.g(fc.integer, { min: 0, max: 2 }) === 0 ? this.any() : valid;
  }
  // A tensor argument of n elements: Float32Array (usual), a DeviceBuffer of n, or broken.
  tensor(n) {
    const g = this.g;
    n = Number.isInteger(n) && n >= 0 ? Math.min(n, 1 << 16) : 1;
    switch (g(fc.integer, { min: 0, max: 9 })) {
      case 0: return this.any();
      case 1: {
        const buf = new DeviceBuffer(BACKEND, randomF32(g, n));
        realBuffers.add(buf);
        this.buffers.push({ buf, shadow: buf.download() });
        return tag(buf, `DeviceBuffer(${n})`);
      }
      case 2: {
        const m = n + g(fc.constantFrom, -1, 1, 7);
        return tag(new Float32Array(m < 0 ? n + 1 : m), `Float32Array(${m < 0 ? n + 1 : m}, expected ${n})`);
      }
      case 3: return g(fc.boolean) ? this.detachedF32(n) : this.specialF32(n);
      default: return tag(randomF32(g, n), `Float32Array(${n})`);
    }
  }
  // Mutates one random field/entry of a plain structure (copy), or returns it as is.
  mutate(obj) {
    const g = this.g;
    if (g(fc.integer, { min: 0, max: 2 }) !== 0 || obj === null || typeof obj !== 'object') return obj;
    const copy = Array.isArray(obj) ? [...obj] : { ...obj };
    const keys = Object.keys(copy);
    const how = g(fc.integer, { min: 0, max: 4 });
    if (keys.length === 0 || how === 0) {
      copy[g(fc.constantFrom, 'extra', 0, 5)] = this.any();
    } else {
      const k = keys[g(fc.integer, { min: 0, max: keys.length - 1 })];
      if (how === 1) delete copy[k];
      else if (how === 2) Object.defineProperty(copy, k, { get: hostile, enumerable: true, configurable: true });
      else if (how === 3 && typeof copy[k] === 'object') copy[k] = this.mutate(copy[k]);
      else copy[k] = this.any();
    }
    return copy;
  }
  shape(valid) {
    const g = this.g;
    if (g(fc.integer, { min: 0, max: 1 }) === 0) return valid;
    const s = [...valid];
    const n = g(fc.integer, { min: 1, max: 3 });
    for (let i = 0; i < n; i++) {
      const what = g(fc.integer, { min: 0, max: 4 });
      const at = g(fc.integer, { min: 0, max: s.length });
      if (what === 0) s.splice(at, 1);
      else if (what === 1) s.splice(at, 0, g(fc.constantFrom, 1, 0, 2));
      else s[Math.min(at, s.length)] = g(fc.constantFrom, 0, -1, 1, 2, 2 ** 20, 2 ** 40, 2 ** 50, 2 ** 50 + 1, NaN, 1.5, '2', null, ...HUGE);
    }
    return g(fc.integer, { min: 0, max: 9 }) === 0 ? this.mutate(s) : s;
  }
}

// ---------------------------------------------------------------------------------------
// One fuzzed call
// ---------------------------------------------------------------------------------------
function snapshot(entry) {
  if (entry.opt.disposed) return null;
  const s = entry.opt.exportState();
  return { s, params: entry.params.map(copyParam) };
}
// A host parameter the fuzzed call itself detached (a hostile getter) has no contents left to
// compare: null, and skipped by sameSnapshot.
function copyParam(p) {
  if (!(p instanceof Float32Array)) return p.download();
  try {
    return p.slice();
  } catch {
    return null;
  }
}
function sameSnapshot(a, b) {
  if (a === null || b === null) return a === b;
  if (a.s.steps !== b.s.steps || a.s.stepCounts.join() !== b.s.stepCounts.join()) return false;
  if (!bytesEqual(a.s.factors, b.s.factors)) return false;
  if (!a.s.momenta.every((m, i) => bytesEqual(m, b.s.momenta[i]))) return false;
  return a.params.every((p, i) => p === null || b.params[i] === null || bytesEqual(p, b.params[i]));
}

const entryCalls = new Map(); // entry point -> calls made
const entryOk = new Map(); // entry point -> calls that succeeded (and passed their check)
function call(world, entryName, fn, check, desc) {
  calls++;
  entryCalls.set(entryName, (entryCalls.get(entryName) ?? 0) + 1);
  if (logFd >= 0) writeSync(logFd, `${calls} ${entryName} ${desc()}\n`);
  const before = world.opts.map(snapshot);
  let result;
  try {
    result = fn();
  } catch (e) {
    if (!acceptableError(e)) finding('bad error', entryName, `${e?.constructor?.name} code=${e?.code} ${e?.message}`, desc());
    // Nothing half-done: every optimizer exactly as before.
    world.opts.forEach((o, i) => {
      if (!sameSnapshot(before[i], snapshot(o))) finding('state changed by a failed call', entryName, e?.message, desc());
    });
    return { ok: false, error: e };
  }
  try {
    const problem = check?.(result, before);
    if (problem) finding('wrong result', entryName, problem, desc());
    else entryOk.set(entryName, (entryOk.get(entryName) ?? 0) + 1);
  } catch (e) {
    finding('check threw', entryName, `${e?.constructor?.name} ${e?.message}`, desc());
  }
  return { ok: true, result };
}

// new NativeOptimizer, with arguments that may be broken (valid = false) or are all valid; a
// valid one is sometimes primed with every layer's statistics, so that its steps can succeed.
function newOptimizer(world, valid) {
  const g = world.g;
  const model = makeModel(g);
  const backend = valid ? BACKEND : world.maybe(BACKEND);
  const config0 = { ...CONFIG, rule: g(fc.integer, { min: 0, max: 1 }), tcov: g(fc.integer, { min: 1, max: 3 }), guard: g(fc.boolean) };
  const config = valid ? config0 : world.mutate(config0);
  const layers = valid || g(fc.boolean) ? model.layers : world.mutate(model.layers.map((l) => world.mutate(l)));
  const tensors = valid || g(fc.boolean) ? model.tensors : world.mutate(model.tensors.map((t) => world.mutate(t)));
  if (opts.avoid && KNOWN_CRASHES.layerOverflow(layers)) return void avoided.layerOverflow++;
  const r = call(world, 'new NativeOptimizer', () => new NativeOptimizer(backend, config, layers, tensors), (o) => {
    if (o.steps !== 0 || o.disposed || o.backend !== backend) return 'bad fresh optimizer';
    if (!Array.isArray(layers) || o.factorLayout().length !== layers.length) return 'factorLayout length';
  }, () => `(${describe(backend)}, ${describe(config)}, ${describe(layers)}, ${describe(tensors)})`);
  if (r.ok && layers === model.layers && tensors === model.tensors) {
    const params = model.tensors.map((t) => (g(fc.integer, { min: 0, max: 3 }) === 0 ? new DeviceBuffer(BACKEND, randomF32(g, t.numel)) : randomF32(g, t.numel)));
    realOpts.add(r.result);
    const e = { opt: r.result, model, params };
    world.opts.push(e);
    if (valid && g(fc.boolean) && g(fc.boolean)) {
      // Every layer's statistics in one recordFactors call.
      const records = model.layers.flatMap((l, i) => [0, 1].map((which) => {
        const shape = which === 0 ? inputShape(g, l) : gradShape(g, l);
        return { layer: i, which, data: randomF32(g, prod(shape)), shape };
      }));
      call(world, 'NativeOptimizer.recordFactors', () => e.opt.recordFactors(records), undefined, () => `(valid) recordFactors(${describe(records)})`);
    } else if (valid && g(fc.boolean)) {
      model.layers.forEach((l, i) => {
        for (const method of ['recordInput', 'recordOutputGrad']) {
          const shape = method === 'recordInput' ? inputShape(g, l) : gradShape(g, l);
          const data = randomF32(g, prod(shape));
          call(world, `NativeOptimizer.${method}`, () => e.opt[method](i, data, shape), undefined, () => `(valid) ${method}(${i}, ${describe(data)}, ${describe(shape)})`);
        }
      });
    }
  } else if (r.ok) {
    r.result.dispose(); // accepted a mutated plan; keep the world to known models
  }
}

function fuzzOne(world) {
  const g = world.g;
  const pickBuf = () => world.buffers.length ? world.buffers[g(fc.integer, { min: 0, max: world.buffers.length - 1 })] : undefined;
  const pickOpt = () => world.opts.length ? world.opts[g(fc.integer, { min: 0, max: world.opts.length - 1 })] : undefined;
  const op = g(fc.integer, { min: 0, max: 29 });
  switch (op) {
    case 0: { // new DeviceBuffer(backend, lengthOrData)
      const backend = world.maybe(BACKEND);
      const init = g(fc.boolean) ? world.maybe(g(fc.integer, { min: 0, max: 40 })) : world.maybe(randomF32(g, g(fc.integer, { min: 0, max: 40 })));
      const initCopy = isF32(init) ? (init.buffer.byteLength > 0 ? init.slice() : new Float32Array(0)) : init;
      const r = call(world, 'new DeviceBuffer', () => new DeviceBuffer(backend, init), (buf) => {
        if (!(buf instanceof DeviceBuffer)) return 'not a DeviceBuffer';
        if (!USABLE.has(backend)) return `accepted backend ${describe(backend)}`;
        const expected = typeof init === 'number' ? new Float32Array(init) : initCopy;
        if (!(expected instanceof Float32Array)) return `accepted ${describe(init)}`;
        if (buf.length !== expected.length || buf.backend !== backend || buf.disposed) return `length ${buf.length}, expected ${expected.length}`;
        if (!bytesEqual(buf.download(), expected)) return 'contents differ';
      }, () => `(${describe(backend)}, ${describe(init)})`);
      if (r.ok && r.result instanceof DeviceBuffer) realBuffers.add(r.result);
      if (r.ok && r.result instanceof DeviceBuffer) world.buffers.push({ buf: r.result, shadow: r.result.download() });
      return;
    }
    case 1: { // upload
      const e = pickBuf();
      const self = e ? world.maybe(e.buf) : world.any();
      const n = e ? g(fc.integer, { min: 0, max: e.buf.length + 1 }) : 2;
      const data = world.maybe(randomF32(g, n));
      const offset = g(fc.boolean) ? undefined : world.maybe(g(fc.integer, { min: 0, max: (e?.buf.length ?? 2) + 1 }));
      call(world, 'DeviceBuffer.upload', () => DeviceBuffer.prototype.upload.call(self, data, offset), () => {
        if (otherReal(self, e) && isF32(data)) {
          // `maybe` swapped in another live buffer: that one's shadow changes instead.
          const other = world.buffers.find((b) => b.buf === self);
          if (other && data.length > 0) other.shadow.set(data, offset ?? 0);
          return;
        }
        if (self !== e?.buf || !isF32(data)) return 'accepted a bad receiver or data';
        if (data.length > 0) e.shadow.set(data, offset ?? 0);
        if (!bytesEqual(e.buf.download(), e.shadow)) return 'contents differ from the shadow after upload';
      }, () => `${describe(self)}.upload(${describe(data)}, ${describe(offset)})`);
      return;
    }
    case 2: { // download
      const e = pickBuf();
      const self = e ? world.maybe(e.buf) : world.any();
      const into = g(fc.boolean) ? undefined : world.maybe(new Float32Array(e?.buf.length ?? 0));
      call(world, 'DeviceBuffer.download', () => DeviceBuffer.prototype.download.call(self, into), (out) => {
        if (otherReal(self, e)) return;
        if (self !== e?.buf) return 'accepted a bad receiver';
        if (into !== undefined && out !== into) return 'did not return `into`';
        if (!bytesEqual(out, e.shadow)) return 'contents differ from the shadow';
      }, () => `${describe(self)}.download(${describe(into)})`);
      return;
    }
    case 3: { // fill
      const e = pickBuf();
      const self = e ? world.maybe(e.buf) : world.any();
      const v = world.maybe(g(fc.constantFrom, 0, 1.5, -2, NaN, Infinity, 1e40));
      call(world, 'DeviceBuffer.fill', () => DeviceBuffer.prototype.fill.call(self, v), () => {
        if (otherReal(self, e) && typeof v === 'number') {
          world.buffers.find((b) => b.buf === self)?.shadow.fill(v);
          return;
        }
        if (self !== e?.buf || typeof v !== 'number') return 'accepted a bad receiver or value';
        e.shadow.fill(v);
        if (!bytesEqual(e.buf.download(), e.shadow)) return 'contents differ after fill';
      }, () => `${describe(self)}.fill(${describe(v)})`);
      return;
    }
    case 4: { // dispose
      const e = pickBuf();
      const self = e ? world.maybe(e.buf) : world.any();
      call(world, 'DeviceBuffer.dispose', () => DeviceBuffer.prototype.dispose.call(self), () => {
        if (self === e?.buf && !e.buf.disposed) return 'still alive after dispose';
      }, () => `${describe(self)}.dispose()`);
      return;
    }
    case 5: { // getters of DeviceBuffer
      const e = pickBuf();
      const self = e && g(fc.boolean) ? e.buf : world.any();
      const name = g(fc.constantFrom, 'length', 'backend', 'disposed');
      const get = Object.getOwnPropertyDescriptor(DeviceBuffer.prototype, name).get;
      if (opts.avoid && KNOWN_CRASHES.accessorConfusion(self, DeviceBuffer)) return void avoided.accessorConfusion++;
      call(world, `DeviceBuffer.${name}`, () => get.call(self), (v) => {
        if (self !== e?.buf && !realBuffers.has(self)) return `returned ${describe(v)} for a foreign receiver`;
        if (self === e?.buf && name === 'length' && v !== e.shadow.length) return `length ${v}`;
      }, () => `get ${name} of ${describe(self)}`);
      return;
    }
    case 6: { // module functions
      const fname = g(fc.constantFrom, 'backendInfo', 'liveAllocations', 'synchronize', 'isDeviceBuffer');
      const arg = fname === 'isDeviceBuffer' ? (g(fc.boolean) ? (pickBuf()?.buf ?? world.any()) : world.any()) : world.maybe(BACKEND);
      call(world, fname, () => b[fname](arg), (r) => {
        if (fname === 'isDeviceBuffer' && r !== realBuffers.has(arg)) return `isDeviceBuffer ${r} for ${describe(arg)}`;
        if (fname === 'liveAllocations' && !(Number.isInteger(r) && r >= 0)) return `liveAllocations ${r}`;
        if (fname === 'liveAllocations' && !USABLE.has(arg)) return `accepted ${describe(arg)}`;
        if (fname === 'synchronize') {
          if (!(r instanceof Promise)) return 'not a Promise';
          pending.push(r.then(() => undefined, (err) => (acceptableError(err) ? undefined : finding('bad rejection', 'synchronize', err?.message, describe(arg)))));
        }
        if (fname === 'backendInfo' && (typeof r.cpuThreads !== 'number' || r.cpuThreads < 1)) return 'bad backendInfo';
      }, () => `${fname}(${describe(arg)})`);
      return;
    }
    case 7:
    case 8: // new NativeOptimizer
      newOptimizer(world, false);
      return;
    case 9:
    case 10:
    case 11: { // recordInput / recordOutputGrad
      const e = pickOpt();
      const grad = op !== 9;
      const layerIdx = e && e.model.layers.length ? g(fc.integer, { min: 0, max: e.model.layers.length - 1 }) : 0;
      const l = e?.model.layers[layerIdx];
      const valid = l ? (grad ? gradShape(g, l) : inputShape(g, l)) : [1, 1];
      const shape = world.shape(valid);
      const n = Array.isArray(shape) && shape.every((d) => Number.isInteger(d) && d >= 0 && d < 4096) ? prod(shape) : prod(valid);
      const data = world.tensor(Math.min(n, 1 << 16));
      const self = e ? world.maybe(e.opt) : world.any();
      const layer = world.maybe(layerIdx);
      if (opts.avoid && KNOWN_CRASHES.divByOverflow(shape)) return void avoided.divByOverflow++;
      const method = grad ? 'recordOutputGrad' : 'recordInput';
      call(world, `NativeOptimizer.${method}`, () => NativeOptimizer.prototype[method].call(self, layer, data, shape), () => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
      }, () => `${describe(self)}.${method}(${describe(layer)}, ${describe(data)}, ${describe(shape)})`);
      return;
    }
    case 12: { // setFactors
      const e = pickOpt();
      const layerIdx = e && e.model.layers.length ? g(fc.integer, { min: 0, max: e.model.layers.length - 1 }) : 0;
      const lay = e?.opt.disposed ? undefined : e?.opt.factorLayout()[layerIdx];
      // H, S or both; either may be missing (null/undefined), mis-sized or of another kind.
      const factor = (n) => (g(fc.integer, { min: 0, max: 3 }) === 0 ? (g(fc.boolean) ? null : undefined) : world.tensor(n));
      const H = factor(lay ? lay.hLength : 1);
      const S = factor(lay ? lay.sLength : 1);
      const self = e ? world.maybe(e.opt) : world.any();
      const layer = world.maybe(layerIdx);
      call(world, 'NativeOptimizer.setFactors', () => NativeOptimizer.prototype.setFactors.call(self, layer, H, S), () => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
        if (H == null && S == null) return 'accepted neither H nor S';
      }, () => `${describe(self)}.setFactors(${describe(layer)}, ${describe(H)}, ${describe(S)})`);
      return;
    }
    case 13:
    case 14:
    case 15:
    case 16: { // step
      const e = pickOpt();
      // One step in three is wholly valid (receiver, parameters, every gradient).
      const allValid = e !== undefined && g(fc.integer, { min: 0, max: 2 }) === 0;
      const self = e ? (allValid ? e.opt : world.maybe(e.opt)) : world.any();
      const ts = e?.model.tensors ?? [];
      let params = e ? e.params : [];
      let grads = ts.map((t) => (allValid ? randomF32(g, t.numel) : g(fc.integer, { min: 0, max: 5 }) === 0 ? null : world.tensor(t.numel)));
      if (!allValid && g(fc.integer, { min: 0, max: 3 }) === 0) params = world.mutate(params.map((p) => (g(fc.integer, { min: 0, max: 5 }) === 0 ? world.tensor(p.length) : p)));
      if (!allValid && g(fc.integer, { min: 0, max: 5 }) === 0) grads = world.mutate(grads);
      const detach = g(fc.integer, { min: 0, max: 9 }) === 0;
      if (detach && opts.avoid) avoided.reentrantDetach++;
      else if (detach) {
        // A getter that detaches an earlier parameter's memory while step() reads its arguments.
        // (A SharedArrayBuffer cannot be transferred, so shared views are no victims.)
        const victim = Array.isArray(params)
          ? params.find((p) => isF32(p) && p.length > 0 && !(p.buffer instanceof SharedArrayBuffer))
          : undefined;
        if (victim && Array.isArray(grads) && grads.length > 0) {
          grads = [...grads];
          const last = grads.length - 1;
          const keep = grads[last];
          Object.defineProperty(grads, last, {
            get() {
              if (victim.buffer.byteLength > 0) structuredClone(victim.buffer, { transfer: [victim.buffer] });
              globalThis.gc?.();
              return keep;
            },
            enumerable: true,
          });
        }
      }
      const snap = e && self === e.opt ? snapshot(e) : null;
      const done = call(world, 'NativeOptimizer.step', () => NativeOptimizer.prototype.step.call(self, params, grads), (r) => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
        if (typeof r?.applied !== 'boolean' || typeof r?.refreshed !== 'boolean') return `result ${describe(r)}`;
        const after = snapshot(e);
        if (r.applied && after.s.steps !== snap.s.steps + 1) return 'steps did not advance';
        if (!r.applied && !sameSnapshot(snap, after)) return 'a skipped step changed state';
      }, () => `${describe(self)}.step(${describe(params)}, ${describe(grads)})`);
      // A step that went through wrote its parameters: a DeviceBuffer of the world's among them
      // (world.tensor hands those out) holds new values. Read as data properties: a getter
      // among the parameters would have failed the step.
      if (done.ok && Array.isArray(params)) {
        for (let i = 0; i < params.length; i++) {
          const d = Object.getOwnPropertyDescriptor(params, i);
          const w = d && 'value' in d ? world.buffers.find((x) => x.buf === d.value) : undefined;
          if (w && !w.buf.disposed) w.shadow = w.buf.download();
        }
      }
      return;
    }
    case 17: { // exportState / importState round trip, and importState of broken states
      const e = pickOpt();
      const self = e ? world.maybe(e.opt) : world.any();
      const exported = e && !e.opt.disposed ? e.opt.exportState() : { steps: 0, stepCounts: [], momenta: [], factors: new Float32Array(0) };
      const state = world.mutate(g(fc.boolean) ? exported : { ...exported, momenta: world.mutate(exported.momenta), stepCounts: world.mutate(exported.stepCounts) });
      const fresh = e && self === e.opt && state === exported;
      call(world, 'NativeOptimizer.importState', () => NativeOptimizer.prototype.importState.call(self, state), () => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
        if (fresh && !sameSnapshot({ s: exported, params: [] }, { s: e.opt.exportState(), params: [] })) return 'round trip changed state';
      }, () => `${describe(self)}.importState(${describe(state)})`);
      return;
    }
    case 18: { // no-argument methods and getters of NativeOptimizer, on any receiver
      const e = pickOpt();
      const self = e && g(fc.integer, { min: 0, max: 3 }) > 0 ? e.opt : world.any();
      const name = g(fc.constantFrom, 'willRefresh', 'exportState', 'factorLayout', 'steps', 'disposed', 'backend');
      const d = Object.getOwnPropertyDescriptor(NativeOptimizer.prototype, name);
      const fn = d.get ?? d.value;
      if (opts.avoid && d.get && KNOWN_CRASHES.accessorConfusion(self, NativeOptimizer)) return void avoided.accessorConfusion++;
      call(world, `NativeOptimizer.${name}`, () => fn.call(self, world.any()), (v) => {
        if (!isA(self, NativeOptimizer)) return `returned ${describe(v)} for a foreign receiver`;
      }, () => `${name} on ${describe(self)}`);
      return;
    }
    case 19: { // dispose an optimizer (then its calls must throw ADAFISHER_DISPOSED)
      const e = pickOpt();
      if (!e || g(fc.integer, { min: 0, max: 3 }) !== 0) return;
      call(world, 'NativeOptimizer.dispose', () => e.opt.dispose(), () => (e.opt.disposed ? undefined : 'still alive'), () => 'optimizer.dispose()');
      world.opts.splice(world.opts.indexOf(e), 1);
      world.disposedOpts.push(e.opt);
      return;
    }
    case 21: { // new TimingEvent(backend)
      const backend = world.maybe(BACKEND);
      const r = call(world, 'new TimingEvent', () => new TimingEvent(backend), (ev) => {
        if (!USABLE.has(backend)) return `accepted backend ${describe(backend)}`;
        if (ev.backend !== backend || ev.disposed || ev.recorded) return 'bad fresh TimingEvent';
      }, () => `(${describe(backend)})`);
      if (r.ok && isA(r.result, TimingEvent)) world.events.push(r.result);
      return;
    }
    case 22: { // record / elapsedMs / dispose of TimingEvent, on any receiver
      // Mostly recorded, live events for elapsedMs, so that it also succeeds.
      const name = g(fc.constantFrom, 'record', 'record', 'elapsedMs', 'elapsedMs', 'dispose');
      const recorded = world.events.filter((x) => x.recorded && !x.disposed);
      const pool = name === 'elapsedMs' && recorded.length && g(fc.integer, { min: 0, max: 3 }) > 0 ? recorded : world.events;
      const pick = () => (pool.length ? pool[g(fc.integer, { min: 0, max: pool.length - 1 })] : undefined);
      const ev = pick();
      const self = ev ? world.maybe(ev) : world.any();
      const end = name === 'elapsedMs' ? world.maybe(pick()) : undefined;
      const live = (x) => isA(x, TimingEvent) && world.events.includes(x) && !x.disposed;
      call(world, `TimingEvent.${name}`, () => TimingEvent.prototype[name].call(self, end), (v) => {
        if (!isA(self, TimingEvent) || !world.events.includes(self)) return `accepted receiver ${describe(self)}`;
        if (name !== 'dispose' && self.disposed) return 'used a disposed TimingEvent';
        if (name === 'record' && !self.recorded) return 'not recorded after record()';
        if (name === 'dispose' && !self.disposed) return 'still alive after dispose';
        if (name === 'elapsedMs') {
          if (!live(end) || !self.recorded || !end.recorded || end.backend !== self.backend) return `accepted end ${describe(end)}`;
          if (typeof v !== 'number' || !Number.isFinite(v)) return `elapsedMs ${describe(v)}`;
        }
      }, () => `${describe(self)}.${name}(${describe(end)})`);
      return;
    }
    case 23: { // getters of TimingEvent, on any receiver
      const self = world.events.length && g(fc.boolean) ? world.events[0] : world.any();
      const name = g(fc.constantFrom, 'backend', 'disposed', 'recorded');
      const get = Object.getOwnPropertyDescriptor(TimingEvent.prototype, name).get;
      if (opts.avoid && KNOWN_CRASHES.accessorConfusion(self, TimingEvent)) return void avoided.accessorConfusion++;
      call(world, `TimingEvent.${name}`, () => get.call(self), (v) => {
        if (!isA(self, TimingEvent) || !world.events.includes(self)) return `returned ${describe(v)} for a foreign receiver`;
      }, () => `get ${name} of ${describe(self)}`);
      return;
    }
    case 24: { // copyFrom: a source of the same length most of the time
      const e = pickBuf();
      const self = e ? world.maybe(e.buf) : world.any();
      const same = world.buffers.filter((x) => x.buf.length === e?.buf.length);
      const s0 = same.length && g(fc.boolean) ? same[g(fc.integer, { min: 0, max: same.length - 1 })] : pickBuf();
      const src = world.maybe(s0?.buf);
      call(world, 'DeviceBuffer.copyFrom', () => DeviceBuffer.prototype.copyFrom.call(self, src), () => {
        const dst = world.buffers.find((x) => x.buf === self);
        const from = world.buffers.find((x) => x.buf === src);
        if (!dst || !from) return realBuffers.has(self) && realBuffers.has(src) ? undefined : `accepted ${describe(self)}.copyFrom(${describe(src)})`;
        if (dst.buf.disposed || from.buf.disposed || dst.buf.length !== from.buf.length) return 'accepted a disposed or mismatched buffer';
        dst.shadow.set(from.shadow);
        if (!bytesEqual(dst.buf.download(), dst.shadow)) return 'contents differ after copyFrom';
      }, () => `${describe(self)}.copyFrom(${describe(src)})`);
      return;
    }
    case 26: { // recordFactors: records that are mostly valid, one of them perhaps broken
      const e = pickOpt();
      const layers = e?.model.layers ?? [];
      const count = g(fc.integer, { min: 0, max: 4 });
      const records = [];
      for (let i = 0; i < count && layers.length; i++) {
        const layer = g(fc.integer, { min: 0, max: layers.length - 1 });
        const which = g(fc.integer, { min: 0, max: 1 });
        const valid = which === 0 ? inputShape(g, layers[layer]) : gradShape(g, layers[layer]);
        const shape = world.shape(valid);
        const n = Array.isArray(shape) && shape.every((d) => Number.isInteger(d) && d >= 0 && d < 4096) ? prod(shape) : prod(valid);
        records.push(world.mutate({ layer: world.maybe(layer), which: world.maybe(which), data: world.tensor(Math.min(n, 1 << 16)), shape }));
      }
      const arg = world.maybe(records);
      const self = e ? world.maybe(e.opt) : world.any();
      if (opts.avoid && records.some((r) => r && KNOWN_CRASHES.divByOverflow(r.shape))) return void avoided.divByOverflow++;
      call(world, 'NativeOptimizer.recordFactors', () => NativeOptimizer.prototype.recordFactors.call(self, arg), () => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
      }, () => `${describe(self)}.recordFactors(${describe(arg)})`);
      return;
    }
    case 27: { // setLearningRate: mostly a valid rate, on the optimizer or another receiver
      const e = pickOpt();
      const lr = world.maybe(g(fc.constantFrom, 0, 1e-3, 0.5, 1e30));
      const self = e ? world.maybe(e.opt) : world.any();
      const steps = e?.opt.disposed === false ? e.opt.steps : undefined;
      call(world, 'NativeOptimizer.setLearningRate', () => NativeOptimizer.prototype.setLearningRate.call(self, lr), () => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
        if (!(typeof lr === 'number' && Number.isFinite(lr) && lr >= 0)) return `accepted lr ${describe(lr)}`;
        if (e.opt.steps !== steps) return 'changed the step count';
      }, () => `${describe(self)}.setLearningRate(${describe(lr)})`);
      return;
    }
    case 28: { // reuseRunningFactors: mostly valid layer lists, sometimes a bad index or not an array
      const e = pickOpt();
      const count = e?.model.layers.length ?? 0;
      const list = Array.from({ length: g(fc.integer, { min: 0, max: 3 }) }, () =>
        count > 0 && g(fc.integer, { min: 0, max: 5 }) > 0 ? g(fc.integer, { min: 0, max: count - 1 }) : world.any(),
      );
      const arg = world.maybe(list);
      const self = e ? world.maybe(e.opt) : world.any();
      const steps = e?.opt.disposed === false ? e.opt.steps : undefined;
      call(world, 'NativeOptimizer.reuseRunningFactors', () => NativeOptimizer.prototype.reuseRunningFactors.call(self, arg), () => {
        if (otherRealOpt(self, e)) return;
        if (self !== e?.opt) return 'accepted a bad receiver';
        if (!Array.isArray(arg) || !arg.every((l) => Number.isInteger(l) && l >= 0 && l < count)) return `accepted layers ${describe(arg)}`;
        if (e.opt.steps !== steps) return 'changed the step count';
      }, () => `${describe(self)}.reuseRunningFactors(${describe(arg)})`);
      return;
    }
    case 29: { // sync: a Promise settled after the backend's queued work, on any receiver
      const e = pickBuf();
      const self = e ? world.maybe(e.buf) : world.any();
      call(world, 'DeviceBuffer.sync', () => DeviceBuffer.prototype.sync.call(self), (r) => {
        if (!realBuffers.has(self) || self.disposed) return `accepted ${describe(self)}`;
        if (!(r instanceof Promise)) return 'not a Promise';
        pending.push(r.then(() => undefined, (err) => (acceptableError(err) ? undefined : finding('bad rejection', 'DeviceBuffer.sync', err?.message, describe(self)))));
      }, () => `${describe(self)}.sync()`);
      return;
    }
    case 20: { // constructors called without new / on odd receivers
      const C = g(fc.constantFrom, DeviceBuffer, NativeOptimizer, TimingEvent);
      const args = [world.any(), world.any(), world.any(), world.any()];
      call(world, `${C.name}()`, () => C(...args), () => 'a class constructor ran without new', () => `${C.name}(${args.map((a) => describe(a)).join(', ')})`);
      return;
    }
    default: { // Reflect.construct with arbitrary argument lists
      const C = g(fc.constantFrom, DeviceBuffer, NativeOptimizer, TimingEvent);
      const args = g(fc.array, fc.constant(0), { maxLength: 5 }).map(() => world.any());
      const r = call(world, `new ${C.name}(any)`, () => Reflect.construct(C, args), (o) => {
        if (C !== NativeOptimizer && !USABLE.has(args[0])) return `accepted backend ${describe(args[0])}`;
      }, () => `new ${C.name}(${args.map((a) => describe(a)).join(', ')})`);
      if (r.ok) r.result.dispose();
    }
  }
}

const pending = [];
const CALLS_PER_RUN = 25;
const runs = Math.ceil(targetCalls / CALLS_PER_RUN);
const startLive = b.liveAllocations(BACKEND);
const t0 = Date.now();
fc.assert(
  fc.property(fc.gen(), (g) => {
    const world = new World(g);
    const start = calls;
    if (g(fc.boolean)) newOptimizer(world, true); // half the worlds start with a valid optimizer
    if (g(fc.boolean)) {
      // ... and half with two recorded timing events, so that elapsedMs can succeed.
      for (let i = 0; i < 2; i++) {
        const r = call(world, 'new TimingEvent', () => new TimingEvent(BACKEND), undefined, () => `(valid) (${BACKEND})`);
        if (r.ok) {
          world.events.push(r.result);
          call(world, 'TimingEvent.record', () => r.result.record(), () => (r.result.recorded ? undefined : 'not recorded'), () => '(valid) record()');
        }
      }
    }
    while (calls - start < CALLS_PER_RUN) {
      try {
        fuzzOne(world);
      } catch (e) {
        // The harness itself tripped over a hostile value while preparing a call: skip it.
        if (!(e instanceof HostileError)) throw e;
      }
    }
    for (const { buf } of world.buffers) buf.dispose();
    for (const ev of world.events) ev.dispose();
    for (const { opt, params } of world.opts) {
      opt.dispose();
      for (const p of params) if (!(p instanceof Float32Array)) p.dispose();
    }
  }),
  { numRuns: runs, seed, endOnFailure: true },
);
await Promise.all(pending);
globalThis.gc?.();
await new Promise((r) => setImmediate(r));
globalThis.gc?.();
await new Promise((r) => setTimeout(r, 50));
const endLive = b.liveAllocations(BACKEND);
if (logFd >= 0) closeSync(logFd);

const report = {
  addon: addonPath,
  backend: BACKEND,
  seed,
  calls,
  seconds: (Date.now() - t0) / 1000,
  liveAllocations: { start: startLive, end: endLive },
  entries: Object.fromEntries([...entryCalls].sort().map(([k, n]) => [k, { calls: n, succeeded: entryOk.get(k) ?? 0 }])),
  avoided: opts.avoid ? avoided : undefined,
  findings: [...findings].map(([signature, { count, example }]) => ({ signature, count, example })),
};
console.log(JSON.stringify(report));
process.exitCode = report.findings.length > 0 ? 1 : 0;
