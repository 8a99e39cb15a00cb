// Child process body of the "abandoned without gc()" test in test/reliability-leaks.test.ts
// (run WITHOUT --expose-gc): large buffers and optimizers dropped without dispose(), as a
// careless program would. Only V8's own collections can free them, and V8 starts those only
// if it knows how much memory the objects hold (NOTE: [external memory] in native/glue.h).
// Prints one JSON line: the peak live-allocation count and RSS over the loop.
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { AdaFisher, createBuffer, liveAllocations } = await import(pathToFileURL(join(root, 'dist', 'lib', 'index.js')).href);
const BACKEND = (process.env.ADAFISHER_BACKEND || 'cpu').toLowerCase();
const COUNT = Number(process.argv[2] ?? 200);
const FLOATS = 1 << 22; // 16 MiB per buffer, per optimizer's momentum

const start = { live: liveAllocations(BACKEND), rssMB: process.memoryUsage().rss / 2 ** 20 };
let peakLive = 0;
let peakRss = 0;
const weight = new Float32Array(FLOATS); // shared by the optimizers: only their own state is native
for (let i = 0; i < COUNT; i++) {
  createBuffer(FLOATS, { backend: BACKEND }).fill(1);
  new AdaFisher([{ kind: 'param', param: weight }], { backend: BACKEND });
  await new Promise((r) => setImmediate(r)); // let finalizers run, as between a program's steps
  peakLive = Math.max(peakLive, liveAllocations(BACKEND) - start.live);
  peakRss = Math.max(peakRss, process.memoryUsage().rss / 2 ** 20);
}
console.log(JSON.stringify({ backend: BACKEND, count: COUNT, mibEach: (4 * FLOATS) / 2 ** 20, start, peakLive, peakRssMB: peakRss }));
