// Per-step optimizer cost of the TF.js adapter against tf.train.adam, on the TF.js cpu backend.
// `node dist/bench/tfjs-overhead.js` runs every case, each in a fresh process; both optimizers are
// measured in the same process, alternating step by step, from the same initialization.
// `--help` lists the options; see also bench/README.md.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

// Type-only: TF.js (and the adapter, which needs it) are loaded once the command line is
// checked, so --help and a bad option answer at once.
import type * as TF from '@tensorflow/tfjs';

import type { AdaFisherOptimizer } from '../lib/tfjs/index.js';
import { judge, parseCli, runMain, UsageError, verdict } from './common.js';

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

const USAGE = `Usage: node dist/bench/tfjs-overhead.js [options]        (npm run bench:tfjs)

Per-step optimizer cost of the TF.js adapter (adafisher/tfjs) against tf.train.adam, on the
TF.js cpu backend: both models train on the same batch from the same initialization,
alternating step by step, each case in a fresh process; medians over the timed steps.
Cases: ${CASES.map((c, i) => `${i} = ${c.name}`).join('; ')}. See bench/README.md.

Target: AdaFisher's optimizer time (statistics + applyGradients) / Adam's applyGradients
< 1 on every case.

Options:
  --case N     internal (the parent runs each case this way): measure case N (0..${CASES.length - 1})
               and print its result as one JSON line
  -h, --help   print this text and exit

Exit code: 0 when every case ran (a missed target is reported as NOT met, not by the exit
code), 1 when a case failed, 2 on a bad command line.`;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

function buildModel(tf: typeof TF, widths: number[]): TF.LayersModel {
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
  const tf = await import('@tensorflow/tfjs');
  const { adaFisher } = await import('../lib/tfjs/index.js');
  await tf.setBackend('cpu');
  const a = buildModel(tf, c.widths);
  const b = buildModel(tf, c.widths);
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

async function main(argv: string[]): Promise<void> {
  const opts = parseCli(argv, { case: { type: 'string' } }, USAGE);
  if (!opts) return; // --help
  if (opts.case !== undefined) {
    const i = opts.case;
    if (!/^[0-9]+$/.test(i) || Number(i) >= CASES.length) throw new UsageError(`--case expects a case index 0..${CASES.length - 1}, got '${i}'`);
    console.log(JSON.stringify(await runCase(CASES[Number(i)])));
    return;
  }
  const tf = await import('@tensorflow/tfjs');
  const self = fileURLToPath(import.meta.url);
  console.log(`TF.js ${tf.version.tfjs}, backend cpu; medians over timed steps, each case in a fresh process\n`);
  const head = 'case                                   params  batch | Adam apply | AdaFisher stats + apply = total | ratio | step total Adam / AdaFisher';
  console.log(head);
  console.log('-'.repeat(head.length));
  let missed = 0;
  let failures = 0;
  CASES.forEach((c, i) => {
    const run = spawnSync(process.execPath, [self, '--case', String(i)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    let res: Result | undefined;
    try {
      if (run.status === 0) res = JSON.parse(run.stdout.trim().split('\n').at(-1)!) as Result;
    } catch {
      res = undefined;
    }
    if (!res) {
      failures++;
      const why = run.error?.message ?? run.stderr.trim().split('\n').at(-1) ?? '';
      console.log(`${c.name.padEnd(38)} FAILED (exit ${run.signal ?? run.status})${why ? `: ${why}` : ''}`);
      return;
    }
    const ratio = res.adafisher.optimizer / res.adam.apply;
    // Never "met" without a measurement: a ratio that is not finite and > 0 counts as missed.
    if (judge(ratio, (x) => x < 1) !== true) missed++;
    const f = (v: number) => v.toFixed(2).padStart(7);
    console.log(
      `${res.name.padEnd(38)} ${String(res.params).padStart(7)} ${String(res.batch).padStart(5)} | ${f(res.adam.apply)} ms | ` +
        `${f(res.adafisher.statistics)} + ${f(res.adafisher.apply)} = ${f(res.adafisher.optimizer)} ms | ${ratio.toFixed(3)}x | ` +
        `${f(res.adam.total)} / ${f(res.adafisher.total)} ms`,
    );
  });
  const target = missed ? 'NOT met' : failures ? `${verdict(null)} (${failures} of ${CASES.length} cases failed)` : 'met';
  console.log(
    '\nratio: AdaFisher optimizer time (statistics reduced during forward/backward + applyGradients) / Adam applyGradients.' +
      `\nTarget (ratio < 1): ${target} on every case.`,
  );
  // Like cpu.js and gpu.js: a missed target is in the report; the exit code says whether every case ran.
  process.exitCode = failures ? 1 : 0;
}

runMain('tfjs-overhead.js', () => main(process.argv.slice(2)));
