// Backend selection (option, ADAFISHER_BACKEND, auto), and DeviceBuffers and TimingEvents of
// every usable backend.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, beforeAll, beforeEach, describe, expect, test } from 'vitest';

import {
  AdaFisher,
  backendInfo,
  createBuffer,
  createTimingEvent,
  ErrorCodes,
  isDeviceBuffer,
  liveAllocations,
  synchronize,
  type LayerSpec,
  type Tensor,
  type TimingEvent,
} from '../lib/index.js';
import { assertBitIdentical, assertSnapshotsIdentical, expectThrows, hostCopy, paramsOf, Rng, snapshot } from './helpers.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const saved = process.env.ADAFISHER_BACKEND;
beforeEach(() => {
  delete process.env.ADAFISHER_BACKEND;
});
afterEach(() => {
  if (saved === undefined) delete process.env.ADAFISHER_BACKEND;
  else process.env.ADAFISHER_BACKEND = saved;
});

const tiny = (): LayerSpec[] => [{ kind: 'param', param: new Float32Array(3) }];

// Whether this machine can run CUDA decides which outcome is right; both branches assert.
const cudaUsable = backendInfo('auto').cuda.usable;

describe('backend selection', () => {
  test('backendInfo() reports the backend that will run and, when it is cpu, why', () => {
    const info = backendInfo();
    expect(info.requested).toBe('auto');
    expect(info.source).toBe('default');
    expect(info.cpuThreads).toBeGreaterThanOrEqual(1);
    expect(info.addonVersion).toMatch(/^\d+\.\d+\.\d+/);
    if (cudaUsable) {
      expect(info.backend).toBe('cuda');
      expect(info.reason).toBe('');
    } else {
      expect(info.backend).toBe('cpu');
      expect(info.reason.length).toBeGreaterThan(0);
      expect(info.cuda.usable).toBe(false);
      if (!info.cuda.compiled) expect(info.reason).toMatch(/without CUDA/i);
    }
  });

  test("backendInfo('cpu') and the cpu option", () => {
    const info = backendInfo('cpu');
    expect(info).toMatchObject({ backend: 'cpu', requested: 'cpu', source: 'option' });
    expect(info.reason).toMatch(/cpu backend was requested \(option\)/);
    const opt = new AdaFisher(tiny(), { backend: 'cpu' });
    expect(opt.backend).toBe('cpu');
    opt.dispose();
  });

  test('ADAFISHER_BACKEND=cpu is honored (any case), and an explicit option wins over it', () => {
    for (const value of ['cpu', 'CPU']) {
      process.env.ADAFISHER_BACKEND = value;
      expect(backendInfo()).toMatchObject({ backend: 'cpu', requested: 'cpu', source: 'ADAFISHER_BACKEND' });
      const opt = new AdaFisher(tiny());
      expect(opt.backend).toBe('cpu');
      opt.dispose();
    }
    process.env.ADAFISHER_BACKEND = 'cuda';
    expect(backendInfo('cpu').source).toBe('option');
    const opt = new AdaFisher(tiny(), { backend: 'cpu' });
    expect(opt.backend).toBe('cpu');
    opt.dispose();
  });

  test('an unknown ADAFISHER_BACKEND is a RangeError naming the variable', () => {
    process.env.ADAFISHER_BACKEND = 'tpu';
    expectThrows(() => new AdaFisher(tiny()), {
      cls: RangeError,
      message: /Expected one of 'auto', 'cpu', 'cuda' for ADAFISHER_BACKEND but received 'tpu'/,
      code: ErrorCodes.invalidArgument,
    });
  });

  test("backendInfo for a 'cuda' request tells the truth: the cuda backend, or none with the error that creating one throws", () => {
    const requests: [() => ReturnType<typeof backendInfo>, () => AdaFisher][] = [
      [() => backendInfo('cuda'), () => new AdaFisher(tiny(), { backend: 'cuda' })],
      [() => ((process.env.ADAFISHER_BACKEND = 'cuda'), backendInfo()), () => new AdaFisher(tiny())],
    ];
    for (const [ask, create] of requests) {
      const info = ask();
      expect(info.requested).toBe('cuda');
      if (cudaUsable) {
        expect(info.backend).toBe('cuda');
        expect(info.error).toBeUndefined();
        create().dispose();
      } else {
        expect(info.backend).toBeNull();
        expect(info.reason).toBe(backendInfo('auto').reason);
        const err = expectThrows(create, { cls: Error, message: /^The cuda backend was requested/, code: ErrorCodes.backendUnavailable });
        expect(info.error).toEqual({ code: err.code, message: err.message });
      }
    }
    // 'auto' falls back to cpu (that is what auto means), and says why.
    delete process.env.ADAFISHER_BACKEND;
    const auto = backendInfo('auto');
    expect(auto.backend).toBe(cudaUsable ? 'cuda' : 'cpu');
    expect(auto.error).toBeUndefined();
  });

  test("requesting 'cuda' (option or ADAFISHER_BACKEND) without a usable GPU throws ADAFISHER_BACKEND_UNAVAILABLE with the reason", () => {
    const reason = backendInfo().reason;
    const attempts: [string, () => unknown][] = [
      ['option', () => new AdaFisher(tiny(), { backend: 'cuda' })],
      ['createBuffer', () => createBuffer(4, { backend: 'cuda' })],
      ['ADAFISHER_BACKEND', () => {
        process.env.ADAFISHER_BACKEND = 'cuda';
        return new AdaFisher(tiny());
      }],
    ];
    for (const [name, attempt] of attempts) {
      if (cudaUsable) {
        const made = attempt() as { backend: string; dispose(): void };
        expect(made.backend, name).toBe('cuda');
        made.dispose();
      } else {
        const escaped = reason.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
        const err = expectThrows(attempt, {
          cls: Error,
          message: new RegExp(`^The cuda backend was requested \\((option|ADAFISHER_BACKEND)\\) but cannot be used: ${escaped}$`),
          code: ErrorCodes.backendUnavailable,
        });
        expect(err.message, name).toContain(reason);
      }
      delete process.env.ADAFISHER_BACKEND;
    }
  });
});

describe('ADAFISHER_NUM_THREADS', () => {
  // The CPU backend is created once per process (worker), so each value gets a fresh node.
  beforeAll(() => ensureDist());
  const probe = (value: string) => {
    const code = `import(${JSON.stringify(join(repoRoot, 'dist', 'lib', 'index.js'))}).then((m) => {
      try { console.log(JSON.stringify({ threads: m.backendInfo('cpu').cpuThreads })); }
      catch (e) { console.log(JSON.stringify({ cls: e.constructor.name, code: e.code, message: e.message })); }
    });`;
    const r = spawnSync(process.execPath, ['-e', code], {
      encoding: 'utf8',
      env: { ...process.env, ADAFISHER_NUM_THREADS: value },
    });
    expect(r.status, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as { threads?: number; cls?: string; code?: string; message?: string };
  };

  test('a valid value sets the CPU threads', () => {
    expect(probe('3')).toEqual({ threads: 3 });
  });

  test.each(['abc', '0', '-2', '4x', '257'])('%j is a RangeError naming the variable, not silently ignored', (value) => {
    expect(probe(value)).toEqual({
      cls: 'RangeError',
      code: ErrorCodes.invalidArgument,
      message: `Expected an integer in [1, 256] for ADAFISHER_NUM_THREADS but received '${value}'`,
    });
  });
});

describe('a damaged addon file', () => {
  test('a truncated binary is skipped with a reason, not loaded (dlopen would die of SIGBUS)', () => {
    ensureDist();
    const dir = mkdtempSync(join(tmpdir(), 'adafisher-cut-'));
    try {
      const whole = readFileSync(backendInfo().addonPath);
      const cut = join(dir, 'adafisher.node');
      writeFileSync(cut, whole.subarray(0, 100_000));
      const code = `import('${join(repoRoot, 'dist', 'lib', 'index.js')}').then((m) => { try { m.backendInfo(); console.log('loaded'); } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); } });`;
      const r = spawnSync(process.execPath, ['-e', code], { env: { ...process.env, ADAFISHER_ADDON: cut }, encoding: 'utf8' });
      expect(r.signal, r.stderr).toBeNull();
      expect(r.status, r.stderr).toBe(0);
      const e = JSON.parse(r.stdout.trim().split('\n').pop()!) as { code: string; message: string };
      expect(e.code).toBe('ADAFISHER_ADDON_NOT_FOUND');
      expect(e.message).toContain(`ADAFISHER_ADDON ${cut}: truncated: 100000 bytes, its headers describe ${whole.length}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('two copies of the addon in one process (NOTE: [type tags per build])', () => {
  test("another version's objects are not taken for this copy's own: a TypeError, not a reinterpretation", () => {
    const dir = mkdtempSync(join(tmpdir(), 'adafisher-two-'));
    try {
      // "Another version": this binary with its version string rewritten (same length).
      const whole = readFileSync(backendInfo().addonPath);
      const version = backendInfo().addonVersion;
      const at = whole.indexOf(Buffer.from(`\0${version}\0`));
      expect(at, 'the version string in the binary').toBeGreaterThanOrEqual(0);
      const other = Buffer.from(whole);
      other.write(`\0${version.replace(/\d/g, '9')}\0`, at, 'latin1');
      writeFileSync(join(dir, 'other.node'), other);
      writeFileSync(join(dir, 'same.node'), whole);
      const code = `
        const a = require(${JSON.stringify(backendInfo().addonPath)});
        const out = {};
        for (const name of ['other', 'same']) {
          const b = require(${JSON.stringify(dir)} + '/' + name + '.node');
          const buf = new a.DeviceBuffer('cpu', 4);
          try { b.DeviceBuffer.prototype.download.call(buf); out[name] = 'accepted'; } catch (e) { out[name] = e.constructor.name + ': ' + e.message; }
          buf.dispose();
        }
        console.log(JSON.stringify(out));`;
      const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout.trim()) as Record<string, string>;
      expect(out.other).toMatch(/^TypeError: Illegal receiver: expected a DeviceBuffer/);
      expect(out.same).toBe('accepted'); // the same build: the same layout
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('native error messages', () => {
  test('print numbers as JavaScript does (1.5, 1e-9, Infinity), not with %f', () => {
    const b = createBuffer(4, { backend: 'cpu' });
    for (const [value, shown] of [[1.5, '1.5'], [1e-9, '1e-9'], [Infinity, 'Infinity'], [-2.25e300, '-2.25e+300'], [0.1, '0.1']] as const) {
      expectThrows(() => b.upload(new Float32Array(1), value), {
        cls: RangeError,
        message: new RegExp(`^Expected an integer in \\[0, 4\\] for offset but received ${shown.replace(/[.+]/g, '\\$&')} of type number$`),
        code: ErrorCodes.invalidArgument,
      });
    }
    expectThrows(() => liveAllocations(1.5 as never), { cls: TypeError, message: /for backend but received 1\.5 of type number$/, code: ErrorCodes.invalidArgument });
    b.dispose();
  });
});

describe('isDeviceBuffer', () => {
  test("checks the addon's own mark: no prototype lookalikes, no Proxy trap run, never throws", () => {
    const real = createBuffer(2, { backend: 'cpu' });
    const proto = Object.getPrototypeOf(real) as object;
    const lookalike = Object.create(proto) as unknown;
    let trapped = 0;
    const proxy = new Proxy(real, {
      getPrototypeOf() {
        trapped++;
        throw new Error('trap');
      },
    });
    expect(isDeviceBuffer(real)).toBe(true);
    expect(isDeviceBuffer(lookalike)).toBe(false); // instanceof said true
    expect(isDeviceBuffer(proxy)).toBe(false); // instanceof ran the trap and threw
    expect(trapped).toBe(0);
    for (const v of [null, undefined, 3, 'buf', {}, new Float32Array(2)]) expect(isDeviceBuffer(v)).toBe(false);
    // Given as a parameter, the lookalike is refused by name (it was 'Illegal receiver: expected a DeviceBuffer').
    expectThrows(() => new AdaFisher([{ kind: 'param', param: lookalike as Float32Array }], { backend: 'cpu' }), {
      cls: TypeError,
      message: /^Expected a Float32Array or DeviceBuffer for layers\[0\]\.param but received an object/,
      code: ErrorCodes.invalidArgument,
    });
    real.dispose();
    expect(isDeviceBuffer(real)).toBe(true); // disposed, still one
  });
});

describe.each(cudaUsable ? (['cpu', 'cuda'] as const) : (['cpu'] as const))('DeviceBuffer (%s backend)', (backend) => {
  test('createBuffer(length) is zero-filled; createBuffer(data) copies', () => {
    const z = createBuffer(5, { backend });
    expect(isDeviceBuffer(z)).toBe(true);
    expect(isDeviceBuffer(new Float32Array(5))).toBe(false);
    expect(z.length).toBe(5);
    expect(z.backend).toBe(backend);
    expect(z.disposed).toBe(false);
    assertBitIdentical(z.download(), new Float32Array(5), 'zeros');
    const src = Float32Array.of(1, -2, 3.5, NaN);
    const b = createBuffer(src, { backend });
    src[0] = 99;
    assertBitIdentical(b.download(), Float32Array.of(1, -2, 3.5, NaN), 'copy of the data at creation');
    z.dispose();
    b.dispose();
  });

  test('upload (with offset), download (new array or into), fill', () => {
    const b = createBuffer(6, { backend });
    b.upload(Float32Array.of(1, 2, 3));
    b.upload(Float32Array.of(8, 9), 4);
    assertBitIdentical(b.download(), Float32Array.of(1, 2, 3, 0, 8, 9), 'after uploads');
    const into = new Float32Array(6);
    expect(b.download(into)).toBe(into);
    assertBitIdentical(into, Float32Array.of(1, 2, 3, 0, 8, 9), 'download into');
    const copy = b.download();
    copy[0] = 42;
    expect(b.download()[0]).toBe(1);
    b.fill(-0.25);
    assertBitIdentical(b.download(), new Float32Array(6).fill(-0.25), 'after fill');
    expectThrows(() => b.upload(new Float32Array(3), 4), { cls: RangeError, message: /Expected at most 2 elements for data but received 3/, code: ErrorCodes.invalidArgument });
    expectThrows(() => b.download(new Float32Array(5)), { cls: RangeError, message: /Expected 6 elements for into but received 5/, code: ErrorCodes.invalidArgument });
    expectThrows(() => b.upload(new Float64Array(2) as unknown as Float32Array), { cls: TypeError, message: /Expected a Float32Array for data/, code: ErrorCodes.invalidArgument });
    b.dispose();
  });

  test('dispose frees the allocation at once and is idempotent', () => {
    const before = liveAllocations(backend);
    const b = createBuffer(10, { backend });
    expect(liveAllocations(backend)).toBe(before + 1);
    b.dispose();
    expect(b.disposed).toBe(true);
    expect(liveAllocations(backend)).toBe(before);
    b.dispose();
    expect(liveAllocations(backend)).toBe(before);
  });

  test('sync() settles after the work queued on its backend; after dispose() it throws ADAFISHER_DISPOSED', async () => {
    const b = createBuffer(1 << 16, { backend });
    const end = createTimingEvent({ backend });
    for (let i = 1; i <= 4; ++i) b.fill(i);
    end.record();
    const p = b.sync();
    expect(p).toBeInstanceOf(Promise);
    expect(await p).toBeUndefined();
    // The mark queued behind the fills has happened: it can be timed against a later one.
    const later = createTimingEvent({ backend });
    later.record();
    await b.sync();
    expect(end.elapsedMs(later)).toBeGreaterThanOrEqual(0);
    assertBitIdentical(b.download().subarray(0, 2), Float32Array.of(4, 4), 'the fills ran');
    b.dispose();
    expectThrows(() => b.sync(), { cls: Error, message: /DeviceBuffer already disposed/, code: ErrorCodes.disposed });
    expectThrows(() => Reflect.apply(Object.getPrototypeOf(b).sync, end, []), { cls: TypeError, message: /Illegal receiver: expected a DeviceBuffer/ });
    end.dispose();
    later.dispose();
  });

  test('DeviceBuffers as params, gradients and statistics give the same result as Float32Arrays', () => {
    const rng = new Rng(31);
    const init = [rng.array(2 * 3 * 2 * 2), rng.array(2), rng.array(2 * 3), rng.array(3), rng.array(2), rng.array(2), rng.array(1001)];
    const build = (wrap: (a: Float32Array) => Tensor): LayerSpec[] => [
      { kind: 'conv2d', inChannels: 3, outChannels: 2, kernelSize: 2, padding: 'same', dataFormat: 'NHWC', layout: 'tfjs', weight: wrap(init[0]), bias: wrap(init[1]) },
      { kind: 'linear', inFeatures: 2, outFeatures: 3, weight: wrap(init[2]), bias: wrap(init[3]) },
      { kind: 'layernorm', features: 2, weight: wrap(init[4]), bias: wrap(init[5]) },
      { kind: 'param', param: wrap(init[6]) },
    ];
    const host = (a: Float32Array) => a.slice();
    const device = (a: Float32Array) => createBuffer(a, { backend });
    const specsH = build(host);
    const specsD = build(device);
    const opts = { lr: 1e-2, weightDecay: 1e-3, tcov: 2, backend };
    const h = new AdaFisher(specsH, opts);
    const d = new AdaFisher(specsD, opts);
    const dataRng = new Rng(32);
    for (let t = 0; t < 4; t++) {
      const stats = [
        { input: dataRng.array(2 * 4 * 3 * 3), shape: [2, 4, 3, 3], grad: dataRng.array(2 * 4 * 3 * 2), gshape: [2, 4, 3, 2] },
        { input: dataRng.array(5 * 2), shape: [5, 2], grad: dataRng.array(5 * 3), gshape: [5, 3] },
        { input: dataRng.array(2 * 3 * 2), shape: [2, 3, 2], grad: dataRng.array(2 * 3 * 2), gshape: [2, 3, 2] },
      ];
      const grads = paramsOf(specsH).map((p) => dataRng.array(p.length));
      expect(h.willRefreshFactors).toBe(d.willRefreshFactors);
      if (h.willRefreshFactors) {
        stats.forEach((s, i) => {
          h.recordInput(i, s.input, s.shape);
          h.recordOutputGrad(i, s.grad, s.gshape);
          d.recordInput(i, device(s.input), s.shape);
          d.recordOutputGrad(i, device(s.grad), s.gshape);
        });
      }
      expect(h.step(grads)).toEqual({ applied: true, refreshed: t % 2 === 0 });
      expect(d.step(grads.map(device))).toEqual({ applied: true, refreshed: t % 2 === 0 });
    }
    const pd = paramsOf(specsD);
    pd.forEach((p) => expect(isDeviceBuffer(p)).toBe(true));
    assertSnapshotsIdentical(snapshot(d, pd), snapshot(h, paramsOf(specsH)), 'DeviceBuffer vs Float32Array');
    // The update really happened on the device buffers.
    expect(hostCopy(pd[6])[0]).not.toBe(init[6][0]);
    h.dispose();
    d.dispose();
  });

  test('setFactors with DeviceBuffers equals setFactors with Float32Arrays', () => {
    const rng = new Rng(33);
    const w = rng.array(12);
    const results = (['host', 'device'] as const).map((kind) => {
      const weight = kind === 'host' ? w.slice() : createBuffer(w, { backend });
      const opt = new AdaFisher([{ kind: 'linear', inFeatures: 4, outFeatures: 3, weight }], { lr: 1e-2, backend });
      const H = Float32Array.of(0.5, 1, 2, 0.25);
      const S = Float32Array.of(3, 1, 0.1);
      opt.setFactors(0, kind === 'host' ? { H, S } : { H: createBuffer(H, { backend }), S: createBuffer(S, { backend }) });
      opt.step([Float32Array.of(...new Array(12).fill(0.5))]);
      const out = hostCopy(weight);
      opt.dispose();
      return out;
    });
    assertBitIdentical(results[1], results[0], 'weight');
    expect(results[0][0]).not.toBe(w[0]);
  });
});

describe.each(cudaUsable ? (['cpu', 'cuda'] as const) : (['cpu'] as const))('TimingEvent (%s backend)', (backend) => {
  test('measures the work queued between two marks, within the host time around it', async () => {
    const start = createTimingEvent({ backend });
    const end = createTimingEvent({ backend });
    expect([start.backend, start.recorded, start.disposed]).toEqual([backend, false, false]);
    const big = createBuffer(1 << 24, { backend });
    const t0 = performance.now();
    start.record();
    for (let i = 0; i < 8; ++i) big.fill(i);
    end.record();
    await synchronize(backend);
    const wall = performance.now() - t0;
    expect([start.recorded, end.recorded]).toEqual([true, true]);
    const ms = start.elapsedMs(end);
    expect(ms).toBeGreaterThan(0);
    expect(ms).toBeLessThanOrEqual(wall + 0.5);
    expect(end.elapsedMs(start)).toBeCloseTo(-ms, 3);
    // Recording again moves the mark: nothing queued in between. The least of three tries: on
    // a GPU shared with other processes (the GPU check runs test files in parallel), a time
    // slice of another context may fall between two marks; a mark that did not move gives
    // the first interval every time.
    const again: number[] = [];
    for (let i = 0; i < 3; ++i) {
      start.record();
      end.record();
      await synchronize(backend);
      again.push(start.elapsedMs(end));
    }
    expect(Math.min(...again)).toBeLessThan(ms);
    assertBitIdentical(big.download().subarray(0, 4), new Float32Array(4).fill(7), 'the timed fills ran');
    for (const x of [big, start, end]) x.dispose();
  });

  test('bad use is a clear error: unrecorded, not a TimingEvent, disposed, another backend', () => {
    const a = createTimingEvent({ backend });
    const b = createTimingEvent({ backend });
    expectThrows(() => a.elapsedMs(b), { cls: RangeError, message: /Expected a recorded TimingEvent \(call record\(\) first\) but this one was never recorded/, code: ErrorCodes.invalidArgument });
    a.record();
    expectThrows(() => a.elapsedMs(b), { cls: RangeError, message: /Expected a recorded TimingEvent for end .* but received one that was never recorded/, code: ErrorCodes.invalidArgument });
    const buf = createBuffer(1, { backend });
    expectThrows(() => a.elapsedMs(buf as unknown as TimingEvent), { cls: TypeError, message: /Expected a TimingEvent for end but received/, code: ErrorCodes.invalidArgument });
    expectThrows(() => Reflect.apply(Object.getPrototypeOf(a).record, buf, []), { cls: TypeError, message: /Illegal receiver: expected a TimingEvent/ });
    buf.dispose();
    expectThrows(() => createTimingEvent({ backend: 'gpu' as never }), { cls: RangeError, message: /Expected one of 'auto', 'cpu', 'cuda' for options.backend/ });
    b.dispose();
    b.dispose();
    expect(b.disposed).toBe(true);
    expectThrows(() => b.record(), { cls: Error, message: /TimingEvent already disposed\./, code: ErrorCodes.disposed });
    expectThrows(() => a.elapsedMs(b), { cls: Error, message: /TimingEvent already disposed \(end\)/, code: ErrorCodes.disposed });
    const other = backend === 'cuda' ? 'cpu' : cudaUsable ? 'cuda' : undefined;
    if (other) {
      const c = createTimingEvent({ backend: other });
      c.record();
      expectThrows(() => a.elapsedMs(c), { cls: Error, message: new RegExp(`Expected a TimingEvent of the ${backend} backend for end but received one of the ${other} backend`), code: ErrorCodes.foreignBuffer });
      c.dispose();
    }
    // Each live event is one native allocation of its backend, released by dispose.
    const live = liveAllocations(backend);
    a.dispose();
    expect(liveAllocations(backend)).toBe(live - 1);
  });
});
