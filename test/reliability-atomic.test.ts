// A step that throws leaves every parameter and all optimizer state exactly as before:
// the native side resolves and checks every argument before it writes anything. The bad
// argument is always in the third layer, after two layers that would have been updated.
import { describe, expect, test } from 'vitest';

import { AdaFisher, createBuffer, type LayerSpec, type Tensor } from '../lib/index.js';
import { binding } from '../lib/binding.js';
import { Rng } from './helpers.js';

const rng = new Rng(2024);
const [inF, hid, outF, batch] = [12, 10, 6, 5];

function model(deviceBuffers: boolean): { specs: LayerSpec[]; params: Tensor[] } {
  const t = (n: number): Tensor => (deviceBuffers ? createBuffer(rng.array(n, 0.5)) : rng.array(n, 0.5));
  const specs: LayerSpec[] = [
    { kind: 'linear', inFeatures: inF, outFeatures: hid, weight: t(inF * hid), bias: t(hid) },
    { kind: 'layernorm', features: hid, weight: t(hid), bias: t(hid) },
    { kind: 'linear', inFeatures: hid, outFeatures: outF, weight: t(hid * outF), bias: t(outF), layout: 'tfjs' },
  ];
  const params = specs.flatMap((s) => [(s as { weight: Tensor }).weight, (s as { bias: Tensor }).bias]);
  return { specs, params };
}

function record(opt: AdaFisher): void {
  opt.recordInput(0, rng.array(batch * inF), [batch, inF]);
  opt.recordOutputGrad(0, rng.array(batch * hid), [batch, hid]);
  opt.recordInput(1, rng.array(batch * hid), [batch, hid]);
  opt.recordOutputGrad(1, rng.array(batch * hid), [batch, hid]);
  opt.recordInput(2, rng.array(batch * hid), [batch, hid]);
  opt.recordOutputGrad(2, rng.array(batch * outF), [batch, outF]);
}
const grads = () => [inF * hid, hid, hid, hid, hid * outF, outF].map((n) => rng.array(n, 0.1) as Tensor);
const copy = (t: Tensor) => (t instanceof Float32Array ? t.slice() : t.download());

function snapshot(opt: AdaFisher, params: Tensor[]) {
  const s = opt.exportState();
  return { params: params.map(copy), steps: s.steps, stepCounts: s.stepCounts, momenta: s.momenta, factors: s.factors };
}
function bits(x: unknown): unknown {
  if (x instanceof Float32Array) return Array.from(new Uint32Array(x.buffer, x.byteOffset, x.length));
  if (Array.isArray(x)) return x.map(bits);
  if (x && typeof x === 'object') return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, bits(v)]));
  return x;
}

type BadCase = {
  name: string;
  third: (n: number) => unknown; // the third layer's weight gradient
  error: { name: string; code: string; message?: RegExp } | 'skipped';
};

const detached = (n: number) => {
  const a = new Float32Array(n);
  structuredClone(a.buffer, { transfer: [a.buffer] });
  return a;
};
const disposedBuffer = (n: number) => {
  const b = createBuffer(n);
  b.dispose();
  return b;
};
const CASES: BadCase[] = [
  { name: 'wrong length', third: (n) => new Float32Array(n - 1), error: { name: 'RangeError', code: 'ADAFISHER_INVALID_ARGUMENT', message: /grads\[4\]/ } },
  { name: 'a detached ArrayBuffer', third: detached, error: { name: 'RangeError', code: 'ADAFISHER_INVALID_ARGUMENT', message: /detached/ } },
  { name: 'a disposed DeviceBuffer', third: disposedBuffer, error: { name: 'Error', code: 'ADAFISHER_DISPOSED' } },
  { name: 'a Float64Array', third: (n) => new Float64Array(n), error: { name: 'TypeError', code: 'ADAFISHER_INVALID_ARGUMENT' } },
  { name: 'Object.create(DeviceBuffer.prototype)', third: () => Object.create(binding().DeviceBuffer.prototype), error: { name: 'TypeError', code: 'ADAFISHER_INVALID_ARGUMENT' } },
  { name: 'a NaN (non-finite guard)', third: (n) => Object.assign(new Float32Array(n), { [n - 1]: NaN }), error: 'skipped' },
];

describe('a failed step changes nothing', () => {
  for (const deviceBuffers of [false, true]) {
    for (const c of CASES) {
      test(`third layer's gradient is ${c.name} (${deviceBuffers ? 'DeviceBuffer' : 'Float32Array'} params)`, () => {
        const { specs, params } = model(deviceBuffers);
        const opt = new AdaFisher(specs, { lr: 1e-2, tcov: 1 });
        for (let i = 0; i < 3; i++) {
          record(opt);
          expect(opt.step(grads()).applied).toBe(true);
        }
        record(opt); // statistics pending for the step that fails
        const before = snapshot(opt, params);
        const g = grads();
        g[4] = c.third(hid * outF) as Tensor;
        if (c.error === 'skipped') {
          expect(opt.step(g)).toEqual({ applied: false, refreshed: false });
        } else {
          let err: any;
          try {
            opt.step(g);
          } catch (e) {
            err = e;
          }
          expect(err?.constructor?.name, String(err)).toBe(c.error.name);
          expect(err.code).toBe(c.error.code);
          if (c.error.message) expect(err.message).toMatch(c.error.message);
        }
        expect(bits(snapshot(opt, params))).toEqual(bits(before));
        // The optimizer is still usable (a guard-skipped step consumes its statistics, so
        // record again): the next step with good gradients applies.
        record(opt);
        expect(opt.step(grads()).applied).toBe(true);
        expect(opt.steps).toBe(4);
        opt.dispose();
      });
    }
  }

  test('a refreshing step without statistics for the third layer changes nothing', () => {
    const { specs, params } = model(false);
    const opt = new AdaFisher(specs, { lr: 1e-2, tcov: 1 });
    record(opt);
    opt.step(grads());
    opt.recordInput(0, rng.array(batch * inF), [batch, inF]);
    opt.recordOutputGrad(0, rng.array(batch * hid), [batch, hid]);
    opt.recordInput(1, rng.array(batch * hid), [batch, hid]);
    opt.recordOutputGrad(1, rng.array(batch * hid), [batch, hid]);
    opt.recordInput(2, rng.array(batch * hid), [batch, hid]); // no output gradient for layer 2
    const before = snapshot(opt, params);
    expect(() => opt.step(grads())).toThrow(expect.objectContaining({ code: 'ADAFISHER_MISSING_STATISTICS' }));
    expect(bits(snapshot(opt, params))).toEqual(bits(before));
    opt.dispose();
  });
});
