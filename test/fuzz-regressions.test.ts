// Inputs the fuzzer (test/workers/fuzz-driver.mjs) found that crash the process or are
// accepted wrongly, one test each, each in its own child process so a crash fails only
// its own test. Every one must end in a JS error of the documented class (or a correct
// result) and a process that exits normally.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';

import { ensureDist, repoRoot } from './workers/ensure-dist.js';

beforeAll(() => ensureDist());

// Runs `body` (CommonJS; `b` is the raw binding, `cfg` a valid optimizer config) in a fresh
// node and returns what it printed: the outcome as JSON on the last line.
function inChild(body: string): { status: number | null; signal: string | null; outcome: any; output: string } {
  const script = `
    const { loadBinding } = await import(${JSON.stringify(join(repoRoot, 'dist', 'lib', 'binding.js'))});
    const b = loadBinding().binding;
    const cfg = { rule: 0, lr: 1e-3, beta: 0.9, damping: 1e-3, decay: 0.08, mix: 0.008, weightDecay: 0, tcov: 1, guard: true };
    let outcome;
    try {
      outcome = { ok: true, value: await (async () => { ${body} })() };
    } catch (e) {
      outcome = { ok: false, name: e?.constructor?.name, code: e?.code, message: String(e?.message) };
    }
    console.log(JSON.stringify(outcome));`;
  const r = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], {
    cwd: repoRoot,
    encoding: 'utf8',
    timeout: 60_000,
  });
  const last = r.stdout.trim().split('\n').pop() ?? '';
  let outcome: unknown;
  try {
    outcome = JSON.parse(last);
  } catch {
    outcome = undefined;
  }
  return { status: r.status, signal: r.signal, outcome, output: `${r.stdout}\n${r.stderr}`.slice(-2000) };
}

function expectError(r: ReturnType<typeof inChild>, name: string, code: string, message?: RegExp): void {
  expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
  expect(r.outcome?.ok, r.output).toBe(false);
  expect(r.outcome.name).toBe(name);
  expect(r.outcome.code).toBe(code);
  if (message) expect(r.outcome.message).toMatch(message);
}

// Shared by the re-entrancy cases: a 4 MiB parameter whose memory is freed and reused while
// step() is still collecting its arguments.
const DETACH_AND_REUSE = `
  const N = 1 << 20;
  const o = new b.NativeOptimizer('cpu', cfg, [], [{ numel: N, layer: -1, role: 0 }, { numel: 4, layer: -1, role: 0 }]);
  const p0 = new Float32Array(N).fill(1);
  const detach = () => {
    if (p0.buffer.byteLength === 0) return;
    structuredClone(p0.buffer, { transfer: [p0.buffer] });
    globalThis.gc(); globalThis.gc();
    globalThis.junk = Array.from({ length: 8 }, () => new Float32Array(N).fill(7));
  };`;

describe('fuzz findings: re-entrancy while step() collects its arguments (use after free)', () => {
  // native/optimizer_wrap.cc Step() resolves params[t]/grads[t] one at a time (TensorRef keeps
  // the raw Float32Array data pointer, native/glue.cc); a getter on a later element runs JS
  // that detaches an earlier parameter, whose memory step() then writes. Fix: read every
  // element (ps.Get/gs.Get) before resolving any, and resolve without running JS (below).
  test('an array getter that detaches an earlier parameter', () => {
    const r = inChild(`${DETACH_AND_REUSE}
      const params = [p0];
      Object.defineProperty(params, 1, { enumerable: true, get() { detach(); return new Float32Array(4); } });
      return o.step(params, [new Float32Array(N).fill(1), new Float32Array(4).fill(1)]);`);
    expectError(r, 'RangeError', 'ADAFISHER_INVALID_ARGUMENT', /params\[0\].*detached/);
  });

  // BufferWrap::FromValue (native/buffer_wrap.cc) uses InstanceOf, which walks the prototype
  // chain and so runs Proxy traps. Fix: napi_type_tag_object at construction and
  // napi_check_object_type_tag here (N-API 8), which run no JS.
  test('a DeviceBuffer whose prototype chain holds a Proxy that detaches an earlier parameter', () => {
    const r = inChild(`${DETACH_AND_REUSE}
      const d = new b.DeviceBuffer('cpu', 4);
      Object.setPrototypeOf(d, new Proxy(b.DeviceBuffer.prototype, { getPrototypeOf(t) { detach(); return t; } }));
      return o.step([p0, d], [new Float32Array(N).fill(1), new Float32Array(4)]);`);
    expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
    // Either refused (detached params[0]) or applied to intact memory; never a crash.
    if (!r.outcome.ok) expect([r.outcome.name, r.outcome.code]).toEqual(['RangeError', 'ADAFISHER_INVALID_ARGUMENT']);
  });
});

describe("re-entrancy: an argument's getter disposes the optimizer whose method reads it (use after free)", () => {
  // native/optimizer_wrap.cc: step, recordInput, recordFactors and importState hold a
  // reference to the optimizer's core while they read their arguments, which runs user JS;
  // a dispose() from there freed the core under them (step: SIGSEGV). Fix (NOTE: [reentrant
  // dispose]): dispose() throws while such a call is in progress.
  const setup = `
    const linear = { kind: 0, hasBias: false, inFeatures: 4, outFeatures: 3, layout: 0, format: 0 };
    const o = new b.NativeOptimizer('cpu', cfg, [linear], [{ numel: 12, layer: 0, role: 0 }]);
    const killer = (value) => () => { o.dispose(); return value; };`;
  const cases: [string, string][] = [
    ['step (a gradient getter)', `const g = []; Object.defineProperty(g, 0, { enumerable: true, get: killer(new Float32Array(12)) });
       g.length = 1; return o.step([new Float32Array(12)], g);`],
    ['recordInput (a shape getter)', `const s = [2]; Object.defineProperty(s, 1, { enumerable: true, get: killer(4) });
       return o.recordInput(0, new Float32Array(8), s);`],
    ['recordFactors (a record getter)', `const r = { layer: 0, which: 0, shape: [2, 4] };
       Object.defineProperty(r, 'data', { get: killer(new Float32Array(8)) }); return o.recordFactors([r]);`],
    ['importState (a momenta getter)', `const m = []; Object.defineProperty(m, 0, { enumerable: true, get: killer(new Float32Array(12)) });
       m.length = 1; return o.importState({ steps: 1, stepCounts: [1], momenta: m, factors: new Float32Array(7) });`],
  ];
  test.each(cases)('%s: dispose() throws, the call fails with that error, the optimizer stays usable', (_, body) => {
    const r = inChild(`${setup}
      let first;
      try { ${body} } catch (e) { first = e; }
      if (!first || first.code !== 'ADAFISHER_INVALID_ARGUMENT' || !/while one of its own calls/.test(first.message)) throw first ?? new Error('no error');
      o.recordInput(0, new Float32Array(8), [2, 4]);
      o.recordOutputGrad(0, new Float32Array(6), [2, 3]);
      const out = o.step([new Float32Array(12)], [new Float32Array(12).fill(1)]);
      o.dispose();
      return { applied: out.applied, disposed: o.disposed };`);
    expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
    expect(r.outcome, r.output).toEqual({ ok: true, value: { applied: true, disposed: true } });
  });
});

describe('fuzz findings: getters called on the wrong receiver', () => {
  // node-addon-api InstanceAccessor getters carry no V8 receiver check (methods do:
  // "Illegal invocation"). native/buffer_wrap.cc:12-14 and native/optimizer_wrap.cc:41-43:
  // on another ObjectWrap the getter unwraps it as the wrong C++ class (type confusion);
  // on any other object node-addon-api throws a plain Error('Invalid argument') with no code.
  // Fix: check the receiver's type tag in each getter and throw TypeError
  // (ADAFISHER_INVALID_ARGUMENT) "Illegal receiver ..." otherwise.
  test("NativeOptimizer 'backend' getter on a DeviceBuffer", () => {
    const r = inChild(`
      const get = Object.getOwnPropertyDescriptor(b.NativeOptimizer.prototype, 'backend').get;
      return get.call(new b.DeviceBuffer('cpu', 3));`);
    expectError(r, 'TypeError', 'ADAFISHER_INVALID_ARGUMENT');
  });
  test("NativeOptimizer 'steps' getter on a DeviceBuffer", () => {
    const r = inChild(`
      const get = Object.getOwnPropertyDescriptor(b.NativeOptimizer.prototype, 'steps').get;
      return get.call(new b.DeviceBuffer('cpu', 3));`);
    expectError(r, 'TypeError', 'ADAFISHER_INVALID_ARGUMENT');
  });
  test("DeviceBuffer 'length' getter on a NativeOptimizer", () => {
    const r = inChild(`
      const get = Object.getOwnPropertyDescriptor(b.DeviceBuffer.prototype, 'length').get;
      return get.call(new b.NativeOptimizer('cpu', cfg, [], []));`);
    expectError(r, 'TypeError', 'ADAFISHER_INVALID_ARGUMENT');
  });
  test("DeviceBuffer 'length' getter on Object.create(DeviceBuffer.prototype)", () => {
    const r = inChild(`return Object.create(b.DeviceBuffer.prototype).length;`);
    expectError(r, 'TypeError', 'ADAFISHER_INVALID_ARGUMENT');
  });
});

describe('fuzz findings: integer overflow in shapes and layer geometry', () => {
  // native/core/optimizer.cc:287 (RecordInput, batchnorm), :318 (RecordOutputGrad, conv2d),
  // :325 (RecordOutputGrad, batchnorm): n / (N * C). Numel() stops checking the running
  // product once it is 0, so [2^50, 0, 1, C] passes, and N * C overflows to 0 for C = 2^14:
  // SIGFPE. Fix: when n == 0 return before dividing (or compute N * C checked).
  const bnNhwc = `[{ kind: 2, hasBias: false, inFeatures: 0, outFeatures: 16384, layout: 0, format: 1 }], [{ numel: 16384, layer: 0, role: 0 }]`;
  const convNhwc = `[{ kind: 1, hasBias: false, inFeatures: 1, outFeatures: 16384, layout: 0, format: 1, kernelH: 1, kernelW: 1,
      strideH: 1, strideW: 1, groups: 1, padMode: 0, padTop: 0, padBottom: 0, padLeft: 0, padRight: 0 }], [{ numel: 16384, layer: 0, role: 0 }]`;
  const cases: [string, string, string][] = [
    ['batchnorm NHWC recordInput', bnNhwc, 'recordInput'],
    ['batchnorm NHWC recordOutputGrad', bnNhwc, 'recordOutputGrad'],
    ['conv2d NHWC recordOutputGrad', convNhwc, 'recordOutputGrad'],
  ];
  for (const [name, plan, method] of cases) {
    test(`${name} with shape [2^50, 0, 1, 16384] (division by an overflowed 0)`, () => {
      const r = inChild(`
        const o = new b.NativeOptimizer('cpu', cfg, ${plan});
        return o.${method}(0, new Float32Array(0), [2 ** 50, 0, 1, 16384]);`);
      expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
      // An empty batch of statistics is refused or recorded; either is fine, a crash is not.
      if (!r.outcome.ok) expect([r.outcome.name, r.outcome.code]).toEqual(['RangeError', 'ADAFISHER_INVALID_ARGUMENT']);
    });
  }

  // native/core/optimizer.cc:70 p.k = (in/groups)*kh*kw and :114 expected = out * p.k are
  // unchecked int64 products (signed overflow: UB). in = 2^40, kh = kw = 65536 wraps k to 0,
  // and a conv layer with a 0-element weight is accepted. Fix: check each product against
  // kMaxElements (2^50) and refuse with RangeError.
  test('conv2d with inChannels 2^40 and a 65536x65536 kernel is refused, not wrapped to k = 0', () => {
    const r = inChild(`
      const layer = { kind: 1, hasBias: false, inFeatures: 2 ** 40, outFeatures: 1, layout: 0, format: 0, kernelH: 65536,
        kernelW: 65536, strideH: 1, strideW: 1, groups: 1, padMode: 0, padTop: 0, padBottom: 0, padLeft: 0, padRight: 0 };
      const o = new b.NativeOptimizer('cpu', cfg, [layer], [{ numel: 0, layer: 0, role: 0 }]);
      return o.factorLayout();`);
    expectError(r, 'RangeError', 'ADAFISHER_INVALID_ARGUMENT', /2\^50|elements/);
  });
  test('linear 2^40 x 2^24 (weight 2^64 elements, wraps to 0) is refused', () => {
    const r = inChild(`
      const layer = { kind: 0, hasBias: false, inFeatures: 2 ** 40, outFeatures: 2 ** 24, layout: 0, format: 0 };
      return new b.NativeOptimizer('cpu', cfg, [layer], [{ numel: 0, layer: 0, role: 0 }]).factorLayout();`);
    // Today this happens to fail as ADAFISHER_OUT_OF_MEMORY (the factor vectors cannot be
    // allocated) after the overflow; it must be refused up front, before allocating.
    expectError(r, 'RangeError', 'ADAFISHER_INVALID_ARGUMENT');
  });
});

// NOTE: [read lengths once] in native/optimizer_wrap.cc: a getter of an element that grows
// the array it belongs to made the native loop (bounded by the live length) write past a
// vector sized by the first length: heap corruption (SIGABRT / SIGSEGV).
describe('review findings: an array that grows while the glue reads its elements', () => {
  test("a shape whose shape[0] getter pushes 100,000 dims: read as the 2 dims it had", () => {
    const r = inChild(`
      const o = new b.NativeOptimizer('cpu', cfg, [{ kind: 0, hasBias: false, inFeatures: 4, outFeatures: 2, layout: 0, format: 0 }],
        [{ numel: 8, layer: 0, role: 0 }]);
      const shape = [1, 4];
      let fired = false;
      Object.defineProperty(shape, 0, { get() { if (!fired) { fired = true; for (let i = 0; i < 100000; i++) shape.push(1); } return 1; } });
      o.recordInput(0, new Float32Array(4), shape);
      return shape.length;`);
    expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
    expect(r.outcome, r.output).toEqual({ ok: true, value: 100002 });
  });
  test("layers whose layers[0].kind getter pushes 20,000 layers: the optimizer has the 1 layer it had", () => {
    const r = inChild(`
      const plain = { kind: 0, hasBias: false, inFeatures: 4, outFeatures: 2, layout: 0, format: 0 };
      const layers = [];
      let fired = false;
      layers.push({ ...plain, get kind() { if (!fired) { fired = true; for (let i = 0; i < 20000; i++) layers.push({ ...plain }); } return 0; } });
      const o = new b.NativeOptimizer('cpu', cfg, layers, [{ numel: 8, layer: 0, role: 0 }]);
      return o.factorLayout().length;`);
    expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
    expect(r.outcome, r.output).toEqual({ ok: true, value: 1 });
  });
  test("tensors whose tensors[0].numel getter pushes 20,000 tensors: the optimizer has the 1 tensor it had", () => {
    const r = inChild(`
      const tensors = [];
      let fired = false;
      tensors.push({ layer: -1, role: 0, get numel() { if (!fired) { fired = true; for (let i = 0; i < 20000; i++) tensors.push({ numel: 4, layer: -1, role: 0 }); } return 4; } });
      const o = new b.NativeOptimizer('cpu', cfg, [], tensors);
      return o.step([new Float32Array(4)], [new Float32Array(4)]).applied;`);
    expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
    expect(r.outcome, r.output).toEqual({ ok: true, value: true });
  });
});

// The glue sized its vectors by an argument array's length before reading an element: a
// sparse array of length 2^32 - 1 cost 16 GB (reuseRunningFactors) or ended out of memory
// (the constructor's layers). Now the vectors grow as the elements are read (NOTE: [grow as
// read]) and the first missing element is refused at once.
describe('review findings: a sparse array of length 2^32 - 1', () => {
  const linear = `const o = new b.NativeOptimizer('cpu', cfg, [{ kind: 0, hasBias: false, inFeatures: 2, outFeatures: 2, layout: 0, format: 0 }], [{ numel: 4, layer: 0, role: 0 }]);`;
  const huge = 'const a = []; a.length = 2 ** 32 - 1;';
  test.each([
    ['the constructor\'s layers', `${huge} new b.NativeOptimizer('cpu', cfg, a, []);`, 'Expected an object for layers[0] but received undefined'],
    ['the constructor\'s tensors', `${huge} new b.NativeOptimizer('cpu', cfg, [], a);`, 'Expected an object for tensors[0] but received undefined'],
    ['reuseRunningFactors', `${linear} ${huge} o.reuseRunningFactors(a);`, 'Expected an integer for layers[0] but received undefined'],
    ['recordFactors', `${linear} ${huge} o.recordFactors(a);`, 'Expected an object for records[0] but received undefined'],
  ])('%s: a TypeError naming element 0', (_n, body, message) => {
    const r = inChild(body);
    expect(r.outcome, r.output).toEqual({ ok: false, name: 'TypeError', code: 'ADAFISHER_INVALID_ARGUMENT', message });
  });
});

// A factor task that throws on a pool thread (here: std::bad_alloc for a kernel row's 4 TiB
// of scratch) called std::terminate, or, on the calling thread, left ThreadPool::Run while
// workers still ran the task function. The first exception now reaches the caller once all
// threads are done: ADAFISHER_OUT_OF_MEMORY, the optimizer still usable.
describe('review findings: an exception inside a CPU pool task', () => {
  test.each([1, 2, 3])('conv2d with a 65536-row kernel over %d images of 1 x 2^24: out of memory, no abort', (n) => {
    const r = inChild(`
      const kh = 65536, W = 1 << 24, N = ${n};
      const layer = { kind: 1, hasBias: false, inFeatures: 1, outFeatures: 1, layout: 0, format: 0, kernelH: kh, kernelW: 1,
        strideH: 1, strideW: 1, groups: 1, padMode: 0, padTop: kh - 1, padBottom: 0, padLeft: 0, padRight: 0 };
      const o = new b.NativeOptimizer('cpu', cfg, [layer], [{ numel: kh, layer: 0, role: 0 }]);
      let error;
      try { o.recordInput(0, new Float32Array(N * W), [N, 1, 1, W]); } catch (e) { error = e; }
      if (error?.code !== 'ADAFISHER_OUT_OF_MEMORY') throw error ?? new Error('no error');
      // The pool runs the next call as usual.
      o.recordInput(0, new Float32Array(N * 4), [N, 1, 1, 4]);
      o.recordOutputGrad(0, new Float32Array(N * 4), [N, 1, 1, 4]);
      return o.step([new Float32Array(kh)], [new Float32Array(kh).fill(1)]).applied;`);
    expect({ status: r.status, signal: r.signal }, r.output).toEqual({ status: 0, signal: null });
    expect(r.outcome, r.output).toEqual({ ok: true, value: true });
  });
});
