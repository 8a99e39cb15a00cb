// Out of device memory: allocating more than the GPU has is a catchable Error with code
// ADAFISHER_OUT_OF_MEMORY and the CUDA error's name, nothing is leaked, and the process and
// the optimizers in it keep working. Needs the cuda backend: a real GPU, or the CUDA host
// emulator's build of the addon (test/cuda-emulator), whose device memory the test shrinks
// to 64 MiB. (On the cpu backend, host allocations of any size usually "succeed" under
// Linux overcommit; its size checks are tested in core-errors and reliability-large.)
import { afterAll, beforeAll, describe, expect, test } from 'vitest';

import { AdaFisher, backendInfo, createBuffer, ErrorCodes, liveAllocations, type LayerSpec } from '../lib/index.js';
import { expectThrows, Rng } from './helpers.js';

const info = backendInfo('auto');
const usable = info.cuda.usable;
const emulated = info.cuda.deviceName === 'CUDA host emulator';
if (!usable) console.log(`SKIP out-of-memory on CUDA: no usable CUDA device (${info.reason})`);

const EMULATOR_MIB = 64;
const saved = process.env.ADAFISHER_CUDA_EMULATOR_MEMORY_MIB;
beforeAll(() => {
  if (emulated) process.env.ADAFISHER_CUDA_EMULATOR_MEMORY_MIB = String(EMULATOR_MIB);
});
afterAll(() => {
  if (saved === undefined) delete process.env.ADAFISHER_CUDA_EMULATOR_MEMORY_MIB;
  else process.env.ADAFISHER_CUDA_EMULATOR_MEMORY_MIB = saved;
});
const deviceBytes = () => (emulated ? EMULATOR_MIB * 2 ** 20 : info.cuda.memoryBytes);

function smallModel(seed: number): { specs: LayerSpec[]; weight: Float32Array } {
  const rng = new Rng(seed);
  const weight = rng.array(32);
  return { specs: [{ kind: 'linear', inFeatures: 8, outFeatures: 4, weight, bias: rng.array(4) }], weight };
}

function trainStep(opt: AdaFisher, seed: number): void {
  const rng = new Rng(seed);
  opt.recordInput(0, rng.array(16), [2, 8]);
  opt.recordOutputGrad(0, rng.array(8), [2, 4]);
  expect(opt.step([rng.array(32), rng.array(4)])).toEqual({ applied: true, refreshed: true });
}

describe.skipIf(!usable)('out of CUDA memory', () => {
  test('a buffer larger than the device throws ADAFISHER_OUT_OF_MEMORY; training goes on', () => {
    expect(deviceBytes()).toBeGreaterThan(0);
    const model = smallModel(1);
    const opt = new AdaFisher(model.specs, { backend: 'cuda', tcov: 1 });
    trainStep(opt, 2);
    const live = liveAllocations('cuda');
    const floats = Math.ceil(deviceBytes() / 4) + 2 ** 20;
    const err = expectThrows(() => createBuffer(floats, { backend: 'cuda' }), {
      cls: Error,
      message: /cudaErrorMemoryAllocation/,
      code: ErrorCodes.outOfMemory,
    });
    console.log(`oom: ${(err as Error).message}`);
    expect(liveAllocations('cuda')).toBe(live);
    // The same optimizer and new buffers still work, with the same numbers as a fresh run.
    trainStep(opt, 3);
    const fresh = smallModel(1);
    const again = new AdaFisher(fresh.specs, { backend: 'cuda', tcov: 1 });
    trainStep(again, 2);
    trainStep(again, 3);
    expect(Array.from(model.weight)).toEqual(Array.from(fresh.weight));
    const b = createBuffer(Float32Array.of(1, 2, 3), { backend: 'cuda' });
    expect(Array.from(b.download())).toEqual([1, 2, 3]);
    b.dispose();
    opt.dispose();
    again.dispose();
  });

  test('an optimizer whose state does not fit: the constructor throws and frees what it took', () => {
    const live = liveAllocations('cuda');
    // Parameters on the device take 60% of it; their momentum cannot fit beside them.
    const n = Math.floor((deviceBytes() * 0.6) / 4);
    const param = createBuffer(n, { backend: 'cuda' });
    expectThrows(() => new AdaFisher([{ kind: 'param', param }], { backend: 'cuda' }), {
      cls: Error,
      message: /cudaErrorMemoryAllocation/,
      code: ErrorCodes.outOfMemory,
    });
    expect(liveAllocations('cuda')).toBe(live + 1);
    param.dispose();
    expect(liveAllocations('cuda')).toBe(live);
    // A quarter of the size fits, and steps.
    const small = createBuffer(Math.floor(n / 4), { backend: 'cuda' });
    const opt = new AdaFisher([{ kind: 'param', param: small }], { backend: 'cuda' });
    const grad = createBuffer(small.length, { backend: 'cuda' });
    grad.fill(1);
    expect(opt.step([grad]).applied).toBe(true);
    expect(small.download()[0]).toBeLessThan(0);
    opt.dispose();
    grad.dispose();
    small.dispose();
    expect(liveAllocations('cuda')).toBe(live);
  });
});
