// A faulted GPU (a kernel hitting an illegal address, an Xid error), as a child process
// (test/reliability-cuda-fault.test.ts). CUDA makes such a fault sticky: every later CUDA call
// of the process fails. What must hold: each call into the cuda backend then throws a JS
// Error with code ADAFISHER_CUDA_ERROR naming the CUDA error, or rejects; nothing aborts the
// process; dispose() and the finalizers still run; the cpu backend keeps working. The fault
// is injected by the CUDA host emulator (ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH), so this needs
// the emulator's build of the addon. Prints one JSON line {checks}; exit 1 when one fails.
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { AdaFisher, backendInfo, createBuffer, ErrorCodes, liveAllocations, synchronize } = await import(
  pathToFileURL(join(root, 'dist', 'lib', 'index.js')).href
);
const { check, finish, linearLayer, thrown, trainLinearStep: trainStep } = await import('./checks.mjs');

if (backendInfo('auto').cuda.deviceName !== 'CUDA host emulator') {
  console.log(JSON.stringify({ skipped: 'fault injection needs the CUDA host emulator' }));
  process.exit(2);
}

const isCudaError = (e) => e instanceof Error && e.code === ErrorCodes.cudaError && /cudaErrorLaunchFailure/.test(e.message);

const model = (backend) => new AdaFisher(linearLayer(5).specs, { backend, tcov: 1 });

const opt = model('cuda');
const buffer = createBuffer(Float32Array.of(1, 2, 3), { backend: 'cuda' });
// Left to the garbage collector: their finalizers must run after the fault. They stay
// reachable until then, so that no collection during the steps below frees them early.
let abandoned = [];
for (let i = 0; i < 20; i++) {
  abandoned.push(createBuffer(64, { backend: 'cuda' }));
  abandoned.push(model('cuda'));
}
check('before the fault the cuda backend trains', trainStep(opt, 1));

process.env.ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH = '1'; // the next kernel launch faults
const e1 = thrown(() => trainStep(opt, 2));
check('the step whose kernel faults throws ADAFISHER_CUDA_ERROR naming the CUDA error', isCudaError(e1), e1?.message ?? 'no error');
const e2 = thrown(() => trainStep(opt, 3));
check('the next step throws the same, it does not crash', isCudaError(e2), e2?.message ?? 'no error');
const e3 = thrown(() => buffer.download());
check('reading a buffer throws the same', isCudaError(e3), e3?.message ?? 'no error');
const e4 = thrown(() => createBuffer(16, { backend: 'cuda' }));
check('allocating throws the same', isCudaError(e4), e4?.message ?? 'no error');
const e5 = await synchronize('cuda').then(() => undefined, (e) => e);
check('synchronize() rejects with the same', isCudaError(e5), e5?.message ?? 'resolved');
const e5b = await buffer.sync().then(() => undefined, (e) => e);
check("a buffer's sync() rejects with the same", isCudaError(e5b), e5b?.message ?? 'resolved');
check('dispose() of the optimizer and the buffer does not throw', thrown(() => (opt.dispose(), buffer.dispose())) === undefined);
const e6 = thrown(() => model('cuda'));
check('a new cuda optimizer throws the same', isCudaError(e6), e6?.message ?? 'no error');
const liveBefore = liveAllocations('cuda'); // the abandoned objects, still reachable
abandoned = undefined;
for (let round = 0; round < 20 && liveAllocations('cuda') > 0; round++) {
  globalThis.gc?.();
  await new Promise((r) => setTimeout(r, 10));
}
check('the finalizers of abandoned cuda objects ran and freed them', liveBefore > 0 && liveAllocations('cuda') === 0, `live ${liveBefore} -> ${liveAllocations('cuda')}`);
const cpu = model('cpu');
check('the cpu backend still trains', trainStep(cpu, 4));
cpu.dispose();

finish();
