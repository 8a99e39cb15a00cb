// Out of CUDA memory, as a child process (test/reliability-oom.test.ts runs it; so does
// scripts/gpu-check.sh on a GPU machine, without vitest). Needs a usable cuda backend: a GPU,
// or the CUDA host emulator's build of the addon, whose device it shrinks to 64 MiB.
// Prints one JSON line {device, deviceBytes, checks: [{name, ok, detail}]}; exit 1 when a
// check fails, 2 when there is no usable CUDA device.
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import v8 from 'node:v8';
import vm from 'node:vm';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { AdaFisher, backendInfo, createBuffer, ErrorCodes, liveAllocations } = await import(
  pathToFileURL(join(root, 'dist', 'lib', 'index.js')).href
);
const { check, finish, linearLayer, thrown, trainLinearStep: trainStep } = await import('./checks.mjs');

const info = backendInfo('auto');
if (!info.cuda.usable) {
  console.log(JSON.stringify({ skipped: info.reason }));
  process.exit(2);
}
const emulated = info.cuda.deviceName === 'CUDA host emulator';
const EMULATOR_MIB = 64;
if (emulated) process.env.ADAFISHER_CUDA_EMULATOR_MEMORY_MIB = String(EMULATOR_MIB);
const deviceBytes = emulated ? EMULATOR_MIB * 2 ** 20 : info.cuda.memoryBytes;

const isOom = (e) => e instanceof Error && e.code === ErrorCodes.outOfMemory && /cudaErrorMemoryAllocation/.test(e.message);


const start = liveAllocations('cuda');

// 1. One buffer larger than the whole device, next to a training optimizer.
const model = linearLayer(1);
const opt = new AdaFisher(model.specs, { backend: 'cuda', tcov: 1 });
trainStep(opt, 2);
let live = liveAllocations('cuda');
const e1 = thrown(() => createBuffer(Math.ceil(deviceBytes / 4) + 2 ** 20, { backend: 'cuda' }));
check('a buffer larger than the device throws ADAFISHER_OUT_OF_MEMORY naming cudaErrorMemoryAllocation', isOom(e1), e1?.message ?? 'no error');
check('the failed allocation leaves no allocation behind', liveAllocations('cuda') === live, `${live} -> ${liveAllocations('cuda')}`);
const applied = trainStep(opt, 3);
const fresh = linearLayer(1);
const again = new AdaFisher(fresh.specs, { backend: 'cuda', tcov: 1 });
trainStep(again, 2);
trainStep(again, 3);
const same = model.weight.every((v, i) => Object.is(v, fresh.weight[i]));
check('the optimizer made before keeps training, with the numbers of an undisturbed run', applied && same);
const small = createBuffer(Float32Array.of(1, 2, 3), { backend: 'cuda' });
check('new buffers work afterwards', small.download().join(',') === '1,2,3');
small.dispose();
opt.dispose();
again.dispose();

// 2. An optimizer whose state does not fit beside its parameters.
live = liveAllocations('cuda');
const n = Math.floor((deviceBytes * 0.6) / 4);
const param = createBuffer(n, { backend: 'cuda' });
const e2 = thrown(() => new AdaFisher([{ kind: 'param', param }], { backend: 'cuda' }));
check('an optimizer whose momentum does not fit: the constructor throws ADAFISHER_OUT_OF_MEMORY', isOom(e2), e2?.message ?? 'no error');
check('the failed constructor frees what it took', liveAllocations('cuda') === live + 1, `${live + 1} expected, ${liveAllocations('cuda')}`);
param.dispose();
// A quarter of it (at most 2^26 floats: the check downloads it, and a Float32Array of a real
// GPU's quarter would pass V8's typed-array limit).
const quarter = createBuffer(Math.min(Math.floor(n / 4), 2 ** 26), { backend: 'cuda' });
const grad = createBuffer(quarter.length, { backend: 'cuda' });
grad.fill(1);
const fits = new AdaFisher([{ kind: 'param', param: quarter }], { backend: 'cuda' });
const stepped = fits.step([grad]).applied && quarter.download(new Float32Array(quarter.length))[0] < 0;
check('a smaller optimizer then fits and steps', stepped, `${quarter.length} elements`);
fits.dispose();
grad.dispose();
quarter.dispose();
check('every allocation is freed at the end', liveAllocations('cuda') === start, `${start} -> ${liveAllocations('cuda')}`);

// 3. Buffers dropped without dispose(): the garbage collector collects them, and Node runs
// their native finalizers (which free the memory) once the event loop turns. A loop that
// never yields therefore runs out, and its error says why; one that awaits reuses the memory.
v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc');
const chunk = Math.floor(deviceBytes / 4 / 4); // a quarter of the device, in floats
let e3;
let made = 0;
for (; made < 8 && e3 === undefined; made++) {
  e3 = thrown(() => createBuffer(chunk, { backend: 'cuda' }).fill(1));
  gc();
}
check(
  'buffers dropped in a loop that never yields run out of memory, and the error says why',
  isOom(e3) && /allocations live: buffers and optimizers dropped without dispose\(\) are freed only once the event loop turns/.test(e3.message),
  `${made} made; ${e3?.message ?? 'no error'}`,
);
await new Promise((r) => setImmediate(r));
let e4;
let reused = 0;
for (; reused < 16 && e4 === undefined; reused++) {
  e4 = thrown(() => createBuffer(chunk, { backend: 'cuda' }).fill(1));
  gc();
  await new Promise((r) => setImmediate(r));
}
for (let i = 0; i < 10 && liveAllocations('cuda') !== start; i++) {
  gc();
  await new Promise((r) => setImmediate(r));
}
check(
  'awaited between them, 16 dropped buffers of a quarter of the device each fit, and all are freed',
  e4 === undefined && liveAllocations('cuda') === start,
  `${reused} made; ${e4?.message ?? ''}; live ${start} -> ${liveAllocations('cuda')}`,
);

finish({ device: info.cuda.deviceName, deviceBytes });
