// CPU benchmark: `npm run bench` (table) or `npm run bench -- --json` (one JSON object).
// Every case (the copy-bandwidth reference and each workload) runs in a fresh child
// process; ratios are taken against the bandwidth measured in the same run. Where python3
// can import torch, bench/torch_baselines.py then runs the same workloads (torch Adam,
// eager PyTorch AdaFisher) with the backend's thread count, in the same run
// (`--no-torch` to leave it out, `--torch FILE` to use a file it wrote).
import { readdirSync, readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';

import { AdaFisher, backendInfo, createBuffer } from '../lib/index.js';
import { CPU_CASES, CPU_QUOTED, deriveWorkload, TARGETS, WORKLOADS } from './cases.js';
import {
  benchCommand,
  caseList,
  cpuTimer,
  describeTorch,
  fmtMB,
  fmtMs,
  fmtNum,
  instantiate,
  judge,
  measureWorkload,
  median,
  parseCli,
  positiveInt,
  randomArray,
  readTorchBaselines,
  reportToParent,
  runCasesInChildren,
  runMain,
  runTorchBaselines,
  table,
  UsageError,
  verdict,
  type KernelFigures,
  type TorchBaselines,
  type WorkloadResult,
} from './common.js';

const SCRIPT = fileURLToPath(import.meta.url);
const DEFAULT_REPS = 31;
const KNOWN_CASES = Object.keys(WORKLOADS);

const COMMAND = benchCommand('cpu.js');
const USAGE = `Usage: ${COMMAND} [options]${COMMAND.startsWith('node ') ? '        (npm run bench -- [options])' : ''}

CPU benchmark of the native cpu backend: every case (the memory copy bandwidth reference,
first and last, and each workload) runs in a fresh child process; ratios are taken against
the copy bandwidth of the same run. Method, figures and targets: bench/README.md.

Options:
  --cases LIST   comma-separated workloads (default ${CPU_CASES.join(',')}; known: ${KNOWN_CASES.join(', ')})
  --reps N       timed calls per figure, a positive integer (default ${DEFAULT_REPS}; the bandwidth
                 reference takes N clamped to 5..11, the PyTorch baselines at most 15)
  --json         print one JSON object instead of the tables
  --no-torch     leave out the PyTorch baselines (default: bench/torch_baselines.py runs
                 after our cases when python3 can import torch)
  --torch FILE   read the PyTorch baselines from FILE (written by bench/torch_baselines.py)
  --case NAME    internal (the parent runs each case this way): measure one case, bandwidth
                 or a workload, and send the result to the parent process
  -h, --help     print this text and exit

Exit code: 0 when every case ran (a missed target is reported as MISSED, not by the exit
code), 1 when a case failed, 2 on a bad command line.`;

// Copy buffers far larger than the last-level cache (32 MiB on the reference box).
const COPY_FLOATS = 64 * 1024 * 1024; // 256 MiB per buffer
// Before every cold sample: at least 128 MiB, and four times the last-level cache where
// sysfs tells its size (a 96 MiB+ L3 would keep a 128 MiB flush's tail and the kernel's data).
const FLUSH_ROW = 4096;
function flushFloats(): number {
  let llc = 0;
  try {
    const dir = '/sys/devices/system/cpu/cpu0/cache';
    for (const index of readdirSync(dir).filter((d) => d.startsWith('index'))) {
      const m = readFileSync(join(dir, index, 'size'), 'utf8').trim().match(/^(\d+)([KMG]?)$/);
      if (m) llc = Math.max(llc, Number(m[1]) * ({ '': 1, K: 1024, M: 1 << 20, G: 1 << 30 } as Record<string, number>)[m[2]]);
    }
  } catch {
    // no sysfs (not Linux): the 128 MiB floor
  }
  const bytes = Math.max(128 << 20, 4 * llc);
  return Math.ceil(bytes / 4 / FLUSH_ROW) * FLUSH_ROW;
}

export interface BandwidthResult {
  /** One thread, native memmove (DeviceBuffer.upload on the cpu backend): 2 x bytes / time. */
  copy1GBps: number;
  /** Two worker threads, each copying half, same clock: 2 x total bytes / (last end - first start). */
  copy2GBps: number;
  /** The reference: max of the two. */
  copyGBps: number;
  bytesPerCopy: number;
  /** Both bracketing measurements (first and last case of the run). */
  runs?: BandwidthResult[];
  /** 1-minute load average before and after the run (other processes skew CPU figures). */
  loadAverage1m?: { before: number; after: number };
}

// --- worker: one half of the two-thread copy -------------------------------------------
async function copyWorker(): Promise<void> {
  const { floats } = workerData as { floats: number };
  const src = randomArray(floats, 7);
  const dst = createBuffer(floats, { backend: 'cpu' });
  dst.upload(src); // touch the pages
  parentPort!.on('message', (msg: string) => {
    if (msg === 'stop') {
      dst.dispose();
      process.exit(0);
    }
    const t0 = process.hrtime.bigint();
    dst.upload(src);
    const t1 = process.hrtime.bigint();
    parentPort!.postMessage([t0, t1]);
  });
  parentPort!.postMessage('ready');
}

async function measureBandwidth(reps: number): Promise<BandwidthResult> {
  const bytes = COPY_FLOATS * 4;
  const src = randomArray(COPY_FLOATS, 3);
  const dst = createBuffer(COPY_FLOATS, { backend: 'cpu' });
  dst.upload(src);
  const one: number[] = [];
  for (let i = 0; i < reps; ++i) {
    const t0 = process.hrtime.bigint();
    dst.upload(src);
    one.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  dst.dispose();
  const copy1GBps = (2 * bytes) / (median(one) * 1e6);

  const workers = [0, 1].map(() => new Worker(SCRIPT, { workerData: { floats: COPY_FLOATS / 2 } }));
  const next = (w: Worker) =>
    new Promise<unknown>((resolve, reject) => {
      const onError = (e: Error) => reject(e);
      w.once('error', onError);
      w.once('message', (m) => {
        w.off('error', onError);
        resolve(m);
      });
    });
  await Promise.all(workers.map(next)); // 'ready'
  const two: number[] = [];
  for (let i = 0; i < reps; ++i) {
    const spans = (await Promise.all(workers.map((w) => {
      const p = next(w);
      w.postMessage('go');
      return p;
    }))) as [bigint, bigint][];
    const start = spans.reduce((a, s) => (s[0] < a ? s[0] : a), spans[0][0]);
    const end = spans.reduce((a, s) => (s[1] > a ? s[1] : a), spans[0][1]);
    two.push(Number(end - start) / 1e6);
  }
  workers.forEach((w) => w.postMessage('stop'));
  const copy2GBps = (2 * bytes) / (median(two) * 1e6);
  return { copy1GBps, copy2GBps, copyGBps: Math.max(copy1GBps, copy2GBps), bytesPerCopy: bytes };
}

async function measureCpuWorkload(name: string, reps: number): Promise<WorkloadResult> {
  const wl = deriveWorkload(WORKLOADS[name]);
  const inst = instantiate(wl, 'cpu');
  const n = flushFloats();
  const flushBuf = createBuffer(n, { backend: 'cpu' });
  // The flush writes the buffer (evicting everything), then reads it on the backend's thread
  // pool (a Linear layer's input factor over it), so every core's private caches are flushed
  // too and the caches are left holding clean lines: the timed call pays no write-back of the
  // flush's own dirty lines.
  const reader = new AdaFisher([{ kind: 'linear', inFeatures: FLUSH_ROW, outFeatures: 1, weight: new Float32Array(FLUSH_ROW) }], { backend: 'cpu' });
  let v = 0;
  const flush = () => {
    flushBuf.fill(++v);
    reader.recordInput(0, flushBuf, [n / FLUSH_ROW, FLUSH_ROW]);
  };
  const result = await measureWorkload(inst, cpuTimer(reps), { flush });
  reader.dispose();
  flushBuf.dispose();
  inst.dispose();
  return result;
}

// --- parent: run the cases, derive ratios, print -----------------------------------------
interface Row {
  kernel: string;
  fig?: { cold?: KernelFigures; warm: KernelFigures };
  ms?: number;
  warmMs?: number;
  note?: string;
}

function report(
  bw: BandwidthResult,
  results: Record<string, WorkloadResult | { error: string }>,
  torch: TorchBaselines | { skipped: string },
  cases: readonly string[],
  json: boolean,
): number {
  const copy = bw.copyGBps;
  const floorMs = (bytes: number) => bytes / (copy * 1e6);
  const info = backendInfo('cpu');
  const verdicts: Record<string, unknown> = {};
  const sections: string[] = [];
  let failures = 0;
  for (const name of cases) {
    const r = results[name];
    if (!r || 'error' in r) {
      failures++;
      sections.push(`### ${name}\n\nFAILED: ${r ? r.error : 'no result'}`);
      verdicts[name] = { error: r ? r.error : 'no result' };
      continue;
    }
    const P = r.parameters;
    const stepFloor20 = floorMs(20 * P);
    const onCold = r.step.guardOn.cold!.timing.ms;
    const offCold = r.step.guardOff.cold!.timing.ms;
    const v: Record<string, unknown> = {
      stepGuardOffOverFloor20: offCold / stepFloor20,
      stepGuardOnOverFloor20: onCold / stepFloor20,
      stepGuardOnOverFloor24: onCold / floorMs(24 * P),
    };
    // The targets are judged on the workloads they were set for; `tiny` measures a call's
    // fixed cost (its bytes are nothing), where a ratio to the memory floor means nothing.
    const judged = name !== 'tiny';
    if (judged) {
      v.stepTarget = TARGETS.cpu.stepOverFloor;
      // true / false where measured, null where not: never "met" without samples.
      v.stepGuardOffMet = judge(offCold / stepFloor20, (x) => x <= TARGETS.cpu.stepOverFloor);
      v.stepGuardOnMet = judge(onCold / stepFloor20, (x) => x <= TARGETS.cpu.stepOverFloor);
    }
    if (r.factors.convCold) {
      v.convFactorsOverFloor = r.factors.convCold.timing.ms / floorMs(r.factors.convCold.bytes);
      v.convFactorsTarget = TARGETS.cpu.convFactorsOverFloor;
      v.convFactorsMet = judge(v.convFactorsOverFloor, (x) => x <= TARGETS.cpu.convFactorsOverFloor);
    }
    const q = CPU_QUOTED[name];
    if (q) {
      const ours = q.ours === 'step' ? onCold : r.factors.cold!.timing.ms;
      v.quoted = { ...q, oursMs: ours, speedupVsQuotedLow: q.lowMs / ours, speedupVsQuotedHigh: q.highMs / ours };
    }
    // PyTorch on this machine, same run: every torch figure is back-to-back (warm), so it is
    // compared with our warm figure; our whole-work figure is also given cold (caches flushed).
    const tw = 'skipped' in torch ? undefined : torch.workloads?.[name];
    const wholeWarm = r.factors.warm.timing.ms + r.minMaxEma.ms + r.step.guardOn.warm.timing.ms;
    if (tw?.eager && tw.fusedAdamMs) {
      v.torch = {
        adam: tw.adam,
        fusedAdamMs: tw.fusedAdamMs,
        eager: tw.eager,
        oursWholeWarmMs: wholeWarm,
        wholeSpeedupVsEager: tw.eager.totalMs / wholeWarm,
        wholeColdSpeedupVsEager: tw.eager.totalMs / r.wholeMs,
        factorsSpeedupVsEager: tw.eager.factorsMs / r.factors.warm.timing.ms,
        stepSpeedupVsEager: tw.eager.stepMs / r.step.guardOn.warm.timing.ms,
        stepSpeedupVsAdamGuardOn: tw.fusedAdamMs / r.step.guardOn.warm.timing.ms,
        stepSpeedupVsAdamGuardOff: tw.fusedAdamMs / r.step.guardOff.warm.timing.ms,
        ...(judged && {
          target: TARGETS.cpu.wholeSpeedupOverEager,
          met: judge(tw.eager.totalMs / wholeWarm, (x) => x >= TARGETS.cpu.wholeSpeedupOverEager),
        }),
      };
    } else if (tw?.error) {
      v.torch = { error: tw.error };
    }
    verdicts[name] = v;

    const rows: Row[] = [
      { kernel: 'factors, all layers', fig: { cold: r.factors.cold, warm: r.factors.warm } },
      ...(r.factors.convWarm ? [{ kernel: 'factors, conv layers', fig: { cold: r.factors.convCold, warm: r.factors.convWarm } }] : []),
      { kernel: 'factors, one recordFactors', fig: { cold: r.factors.batchedCold, warm: r.factors.batchedWarm } },
      ...(r.factors.convBatchedWarm ? [{ kernel: 'conv layers, one recordFactors', fig: { cold: r.factors.convBatchedCold, warm: r.factors.convBatchedWarm } }] : []),
      { kernel: 'min-max + EMA', ms: r.minMaxEma.ms, note: `${r.minMaxEma.entries} entries; refresh ${fmtMs(r.minMaxEma.refreshStepMs)} - empty ${fmtMs(r.minMaxEma.emptyStepMs)} ms` },
      { kernel: 'step, guard on (24 B/p)', fig: r.step.guardOn },
      { kernel: 'step, guard off (20 B/p)', fig: r.step.guardOff },
      { kernel: 'whole (factors+mm+step)', ms: r.wholeMs, warmMs: wholeWarm },
    ];
    if (tw?.fusedAdamMs) rows.push({ kernel: `torch ${tw.adam ?? 'fused'} Adam step`, warmMs: tw.fusedAdamMs, note: 'PyTorch, same run' });
    if (tw?.eager) {
      const e = tw.eager;
      rows.push({ kernel: 'eager PyTorch AdaFisher', warmMs: e.totalMs, note: `factors ${fmtMs(e.factorsMs)}, min-max+EMA ${fmtMs(e.minMaxEmaMs)}, step ${fmtMs(e.stepMs)} ms` });
    }
    const body = rows.map((row) => {
      if (!row.fig) return [row.kernel, fmtMs(row.ms), fmtMs(row.warmMs), '', '', '', '', row.note ?? ''];
      const c = row.fig.cold ?? row.fig.warm;
      const fl = floorMs(c.bytes);
      return [
        row.kernel,
        fmtMs(c.timing.ms),
        fmtMs(row.fig.warm.timing.ms),
        fmtMB(c.bytes),
        fmtNum(c.gbps),
        `${fmtNum((100 * c.gbps) / copy, 0)}%`,
        fmtMs(fl),
        `${fmtNum(c.timing.ms / fl, 2)}x`,
      ];
    });
    let text = `### ${name}: ${r.description} (${(P / 1e6).toFixed(3)} M parameters)\n\n`;
    text += table(['kernel', 'cold ms', 'warm ms', 'bytes', 'GB/s', '% copy BW', 'floor ms', 'x floor'], body);
    const lines: string[] = [];
    lines.push(
      `step vs 20 B/param floor (${fmtMs(stepFloor20)} ms): guard off ${fmtNum(v.stepGuardOffOverFloor20 as number, 2)}x, ` +
        `guard on ${fmtNum(v.stepGuardOnOverFloor20 as number, 2)}x (${fmtNum(v.stepGuardOnOverFloor24 as number, 2)}x of its 24 B/param floor); ` +
        (judged
          ? `target <= ${TARGETS.cpu.stepOverFloor}x: ${verdict(v.stepGuardOffMet as boolean | null)} (off), ${verdict(v.stepGuardOnMet as boolean | null)} (on)`
          : 'not judged: this workload measures the fixed cost of a call'),
    );
    if (v.convFactorsOverFloor !== undefined) {
      lines.push(
        `conv factors vs reading conv inputs + output grads once: ${fmtNum(v.convFactorsOverFloor as number, 2)}x; ` +
          `target <= ${TARGETS.cpu.convFactorsOverFloor}x: ${verdict(v.convFactorsMet as boolean | null)}`,
      );
    }
    const vt = v.torch as { wholeSpeedupVsEager: number; wholeColdSpeedupVsEager: number; factorsSpeedupVsEager: number; stepSpeedupVsEager: number; stepSpeedupVsAdamGuardOn: number; stepSpeedupVsAdamGuardOff: number; met?: boolean | null } | { error: string } | undefined;
    if (vt && 'error' in vt) {
      lines.push(`PyTorch baselines FAILED: ${vt.error}`);
    } else if (vt) {
      lines.push(
        `vs eager PyTorch AdaFisher (same run, > 1: ours faster): whole ${fmtNum(vt.wholeSpeedupVsEager, 1)}x warm ` +
          `(${fmtNum(vt.wholeColdSpeedupVsEager, 1)}x with our figures cold); factors ${fmtNum(vt.factorsSpeedupVsEager, 1)}x, ` +
          `step ${fmtNum(vt.stepSpeedupVsEager, 1)}x; ` +
          (judged ? `target whole >= ${TARGETS.cpu.wholeSpeedupOverEager}x: ${verdict(vt.met ?? null)}` : "a call's fixed cost: not judged"),
      );
      lines.push(
        `vs torch ${tw?.adam ?? 'fused'} Adam step (warm): ${fmtNum(vt.stepSpeedupVsAdamGuardOn, 2)}x with our guard on, ` +
          `${fmtNum(vt.stepSpeedupVsAdamGuardOff, 2)}x off (Adam moves 28 B/param, ours 20-24)`,
      );
    }
    if (q) {
      const qq = v.quoted as { oursMs: number };
      lines.push(
        `${q.what}: ${q.lowMs}-${q.highMs} ms (quoted, not measured here) vs ours ${fmtMs(qq.oursMs)} ms (cold) = ` +
          `quoted/ours ${fmtNum(q.lowMs / qq.oursMs, 1)}-${fmtNum(q.highMs / qq.oursMs, 1)} (> 1: ours faster)`,
      );
    }
    if (r.factors.perLayerWarmMs) {
      lines.push(`factors per layer (warm ms): ${r.factors.perLayerWarmMs.map((m, i) => `L${i} ${fmtMs(m)}`).join(', ')}`);
    }
    sections.push(`${text}\n\n${lines.map((l) => `- ${l}`).join('\n')}`);
  }

  const machine = {
    cpu: cpus()[0]?.model ?? 'unknown',
    logicalCpus: cpus().length,
    backendThreads: info.cpuThreads,
    node: process.version,
    addon: `${info.addonVersion} (${info.buildSystem})`,
  };
  if (json) {
    console.log(JSON.stringify({ machine, bandwidth: bw, torch, workloads: results, verdicts, targets: TARGETS.cpu }, null, 2));
  } else {
    console.log(`adafisher CPU benchmark: ${machine.cpu}, ${machine.logicalCpus} logical CPUs, backend threads ${machine.backendThreads}, Node ${machine.node}`);
    console.log(
      `memory copy bandwidth (same run, 256 MiB buffers, counted as read + write): ` +
        `${(bw.runs ?? [bw]).map((b, i) => `${i ? 'last' : 'first'}: 1 thread ${fmtNum(b.copy1GBps)}, 2 threads ${fmtNum(b.copy2GBps)} GB/s`).join('; ')} ` +
        `-> reference ${fmtNum(copy)} GB/s. 1-min load average ${fmtNum(bw.loadAverage1m?.before, 2)} before, ${fmtNum(bw.loadAverage1m?.after, 2)} after.`,
    );
    console.log(`${describeTorch(torch)}.\n`);
    console.log(sections.join('\n\n'));
    console.log(
      `\ncold = caches flushed (${flushFloats() / (1 << 18)} MiB written, then read on every thread) before every timed call; warm = back-to-back calls. ` +
        'Medians; floor = bytes / reference copy bandwidth. See bench/README.md.',
    );
  }
  return failures;
}

async function main(argv: string[]): Promise<void> {
  const opts = parseCli(
    argv,
    {
      cases: { type: 'string' },
      reps: { type: 'string' },
      json: { type: 'boolean' },
      'no-torch': { type: 'boolean' },
      torch: { type: 'string' },
      case: { type: 'string' },
    },
    USAGE,
  );
  if (!opts) return; // --help
  const reps = positiveInt('reps', opts.reps, DEFAULT_REPS);
  const only = opts.case;
  if (only !== undefined) {
    if (only !== 'bandwidth' && !KNOWN_CASES.includes(only)) {
      throw new UsageError(`unknown case '${only}' for --case (known: bandwidth, ${KNOWN_CASES.join(', ')})`);
    }
    await reportToParent(() => (only === 'bandwidth' ? measureBandwidth(Math.max(5, Math.min(reps, 11))) : measureCpuWorkload(only, reps)));
    return;
  }
  const json = opts.json ?? false;
  const cases = caseList('cases', opts.cases, KNOWN_CASES, CPU_CASES);
  const torchFile = opts.torch;
  const noTorch = opts['no-torch'] ?? false;
  if (torchFile !== undefined && noTorch) throw new UsageError('--torch and --no-torch exclude each other');
  if (!json) console.error(`running cases in fresh processes: bandwidth, ${cases.join(', ')} ...`);
  const loadBefore = loadavg()[0];
  // The copy reference runs first and last (each in its own process); the faster of the two
  // is the machine's limit, so a burst of foreign load during one of them does not inflate ratios.
  const first = await runCasesInChildren(SCRIPT, ['bandwidth'], ['--reps', String(reps)]);
  const res = await runCasesInChildren(SCRIPT, cases, ['--reps', String(reps)]);
  // PyTorch on the same workloads, after ours and before the closing bandwidth reference.
  if (!json && torchFile === undefined && !noTorch) console.error('running the PyTorch baselines (bench/torch_baselines.py) ...');
  const torch = torchFile !== undefined
    ? readTorchBaselines(torchFile, 'cpu')
    : noTorch
      ? { skipped: '--no-torch' }
      : runTorchBaselines({ cases, device: 'cpu', threads: backendInfo('cpu').cpuThreads, reps: Math.min(reps, 15) });
  const last = await runCasesInChildren(SCRIPT, ['bandwidth'], ['--reps', String(reps)]);
  const b1 = first.bandwidth as BandwidthResult | { error: string };
  const b2 = last.bandwidth as BandwidthResult | { error: string };
  if ('error' in b1 || 'error' in b2) {
    console.error(`bandwidth reference failed: ${'error' in b1 ? b1.error : (b2 as { error: string }).error}`);
    process.exitCode = 1;
    return;
  }
  const bw: BandwidthResult = {
    ...(b1.copyGBps >= b2.copyGBps ? b1 : b2),
    runs: [b1, b2],
    loadAverage1m: { before: loadBefore, after: loadavg()[0] },
  };
  const failures = report(bw, res as Record<string, WorkloadResult | { error: string }>, torch, cases, json);
  process.exitCode = failures ? 1 : 0;
}

if (isMainThread) {
  runMain('cpu.js', () => main(process.argv.slice(2)));
} else {
  void copyWorker();
}
