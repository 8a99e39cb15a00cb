// Per-step optimizer cost of the TF.js adapter against tf.train.adam, on the TF.js cpu backend.
// `node dist/bench/tfjs-overhead.js` runs every case, each in a fresh process; both optimizers are
// measured in the same process, alternating step by step, from the same initialization.
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

import * as tf from '@tensorflow/tfjs';

import { adaFisher, type AdaFisherOptimizer } from '../lib/tfjs/index.js';

interface Case {
  name: string;
  /** layer widths, input first */
  widths: number[];
  batch: number;
  steps: number;
}

const CASES: Case[] = [
  { name: 'demo MLP 784-128-10', widths: [784, 128, 10], batch: 64, steps: 40 },
  { name: 'MLP 1000-1000-1000-10 (2.0 M params)', widths: [1000, 1000, 1000, 10], batch: 16, steps: 10 },
];

interface Result {
  name: string;
  params: number;
  batch: number;
  steps: number;
  /** medians, ms per step */
  adam: { apply: number; total: number };
  adafisher: { statistics: number; apply: number; optimizer: number; total: number };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

function buildModel(widths: number[]): tf.LayersModel {
  const layers = widths.slice(1).map((units, i) =>
    tf.layers.dense({
      units,
      activation: i === widths.length - 2 ? 'softmax' : 'relu',
      kernelInitializer: tf.initializers.glorotUniform({ seed: i + 1 }),
      ...(i === 0 ? { inputShape: [widths[0]] } : {}),
    }),
  );
  return tf.sequential({ layers });
}

async function runCase(c: Case): Promise<Result> {
  await tf.setBackend('cpu');
  const a = buildModel(c.widths);
  const b = buildModel(c.widths);
  b.setWeights(a.getWeights());
  const adam = tf.train.adam(1e-3);
  const af = adaFisher(b, { lr: 1e-3 }) as AdaFisherOptimizer;
  a.compile({ optimizer: adam, loss: 'categoricalCrossentropy' });
  b.compile({ optimizer: af, loss: 'categoricalCrossentropy' });
  let adamApply = 0;
  const apply = adam.applyGradients.bind(adam);
  adam.applyGradients = (g) => {
    const t0 = performance.now();
    apply(g);
    adamApply = performance.now() - t0;
  };
  const x = tf.randomUniform([c.batch, c.widths[0]], 0, 1, 'float32', 1);
  const y = tf.oneHot(tf.randomUniform([c.batch], 0, c.widths.at(-1)!, 'int32', 2), c.widths.at(-1)!).toFloat();
  const r = { adamApply: [] as number[], adamTotal: [] as number[], stats: [] as number[], afApply: [] as number[], afTotal: [] as number[] };
  for (let s = -2; s < c.steps; s++) {
    let t0 = performance.now();
    await a.trainOnBatch(x, y);
    const adamTotal = performance.now() - t0;
    af.resetTiming();
    t0 = performance.now();
    await b.trainOnBatch(x, y);
    const afTotal = performance.now() - t0;
    if (s < 0) continue; // warm-up
    const t = af.timing;
    r.adamApply.push(adamApply);
    r.adamTotal.push(adamTotal);
    r.stats.push(t.statisticsMs);
    r.afApply.push(t.stepMs);
    r.afTotal.push(afTotal);
  }
  tf.dispose([x, y]);
  const params = a.countParams();
  const optimizer = r.stats.map((v, i) => v + r.afApply[i]);
  return {
    name: c.name,
    params,
    batch: c.batch,
    steps: c.steps,
    adam: { apply: median(r.adamApply), total: median(r.adamTotal) },
    adafisher: { statistics: median(r.stats), apply: median(r.afApply), optimizer: median(optimizer), total: median(r.afTotal) },
  };
}

function main(): void {
  const self = fileURLToPath(import.meta.url);
  console.log(`TF.js ${tf.version.tfjs}, backend cpu; medians over timed steps, each case in a fresh process\n`);
  const head = 'case                                   params  batch | Adam apply | AdaFisher stats + apply = total | ratio | step total Adam / AdaFisher';
  console.log(head);
  console.log('-'.repeat(head.length));
  let ok = true;
  CASES.forEach((c, i) => {
    const out = execFileSync(process.execPath, [self, '--case', String(i)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const res = JSON.parse(out.trim().split('\n').at(-1)!) as Result;
    const ratio = res.adafisher.optimizer / res.adam.apply;
    ok &&= ratio < 1;
    const f = (v: number) => v.toFixed(2).padStart(7);
    console.log(
      `${res.name.padEnd(38)} ${String(res.params).padStart(7)} ${String(res.batch).padStart(5)} | ${f(res.adam.apply)} ms | ` +
        `${f(res.adafisher.statistics)} + ${f(res.adafisher.apply)} = ${f(res.adafisher.optimizer)} ms | ${ratio.toFixed(3)}x | ` +
        `${f(res.adam.total)} / ${f(res.adafisher.total)} ms`,
    );
  });
  console.log(
    '\nratio: AdaFisher optimizer time (statistics reduced during forward/backward + applyGradients) / Adam applyGradients.' +
      `\nTarget (ratio < 1): ${ok ? 'met' : 'NOT met'} on every case.`,
  );
}

const at = process.argv.indexOf('--case');
if (at >= 0) {
  runCase(CASES[Number(process.argv[at + 1])]).then((r) => console.log(JSON.stringify(r)));
} else {
  main();
}
