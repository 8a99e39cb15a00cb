// Child process body of test/reliability-leaks.test.ts (run with --expose-gc): cycles of
// create/step/dispose and buffers left to the garbage collector, measuring RSS and the
// addon's live allocation count. Prints one JSON line.
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const api = await import(pathToFileURL(join(root, 'dist', 'lib', 'index.js')).href);
const { AdaFisher, createBuffer, createTimingEvent, liveAllocations } = api;
const CYCLES = Number(process.argv[2] ?? 10000);
// The backend under test: ADAFISHER_BACKEND (cuda on a GPU or the CUDA host emulator), else cpu.
const BACKEND = (process.env.ADAFISHER_BACKEND || 'cpu').toLowerCase();

const [inF, outF, batch] = [64, 64, 4];
const x = new Float32Array(batch * inF).fill(0.5);
const dy = new Float32Array(batch * outF).fill(0.25);
const gw = new Float32Array(inF * outF).fill(1e-3);
const gb = new Float32Array(outF).fill(1e-3);

// One optimizer over a 64x64 linear layer (16 KiB weight, momenta and factors native), two
// device buffers and a timing event, all created, used and disposed.
function cycle() {
  const t = createTimingEvent({ backend: BACKEND });
  t.record();
  const w = createBuffer(inF * outF, { backend: BACKEND });
  const b = new Float32Array(outF);
  const opt = new AdaFisher([{ kind: 'linear', inFeatures: inF, outFeatures: outF, weight: w, bias: b }], { backend: BACKEND });
  opt.recordInput(0, x, [batch, inF]);
  opt.recordOutputGrad(0, dy, [batch, outF]);
  opt.step([gw, gb]);
  opt.exportState();
  const buf = createBuffer(gw, { backend: BACKEND });
  buf.upload(gb, 7);
  buf.download();
  buf.fill(2);
  buf.dispose();
  opt.dispose();
  w.dispose();
  t.record();
  t.elapsedMs(t);
  t.dispose();
}

// Left to the GC: buffers, optimizers and timing events that are never disposed.
function abandon() {
  createBuffer(inF * outF, { backend: BACKEND }).fill(1);
  createTimingEvent({ backend: BACKEND }).record();
  const w = new Float32Array(inF * outF);
  const opt = new AdaFisher([{ kind: 'linear', inFeatures: inF, outFeatures: outF, weight: w }], { backend: BACKEND });
  opt.recordInput(0, x, [batch, inF]);
  opt.recordOutputGrad(0, dy, [batch, outF]);
  opt.step([gw]);
}

// Full GC, then let the deferred N-API finalizers (SetImmediate) run, until stable.
async function settle() {
  let last = -1;
  for (let i = 0; i < 50; i++) {
    globalThis.gc();
    await new Promise((r) => setImmediate(r));
    const live = liveAllocations(BACKEND);
    if (live === last && i >= 3) break;
    last = live;
  }
}
const rss = () => process.memoryUsage.rss();
const mb = (b) => Math.round((b / 2 ** 20) * 10) / 10;

const out = { backend: BACKEND };
const start = liveAllocations(BACKEND);
for (let i = 0; i < 10000; i++) cycle(); // warm up: JIT, allocator arenas, V8 heap sizing (see the test)
await settle();
out.baseline = { rssMB: mb(rss()), live: liveAllocations(BACKEND), start };
for (let i = 0; i < CYCLES / 2; i++) cycle();
await settle();
out.half = { rssMB: mb(rss()), live: liveAllocations(BACKEND) };
for (let i = 0; i < CYCLES / 2; i++) cycle();
await settle();
out.disposed = { rssMB: mb(rss()), live: liveAllocations(BACKEND) };

let peakLive = 0;
for (let i = 0; i < CYCLES; i++) {
  abandon();
  if (i % 500 === 0) {
    peakLive = Math.max(peakLive, liveAllocations(BACKEND));
    await new Promise((r) => setImmediate(r)); // let finalizers run as they would in an app
  }
}
peakLive = Math.max(peakLive, liveAllocations(BACKEND));
await settle();
out.finalized = { rssMB: mb(rss()), live: liveAllocations(BACKEND), peakLiveBeforeGC: peakLive };
console.log(JSON.stringify(out));
