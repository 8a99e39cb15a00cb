// GPU benchmark (CUDA backend). Run on a GPU machine, normally through scripts/gpu-check.sh:
//   node dist/bench/gpu.js [--torch torch.json] [--json-out FILE] [--json] [--batches N] [--cases a,b]
//   node dist/bench/gpu.js --dump-cases        (the workloads, for bench/torch_baselines.py)
//   node dist/bench/gpu.js --help              (every option)
// Each case runs in a fresh child process. Timing: batches of launches between two
// TimingEvents (CUDA events), per-call time = the batch's device time / calls.
// The device-to-device copy bandwidth comes from the PyTorch script of the same run
// (--torch), else from DeviceBuffer.copyFrom in this process; fill() is a write-only reference.
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { AdaFisher, backendInfo, createBuffer, type DeviceBuffer, type LayerSpec } from '../lib/index.js';
import { deriveWorkload, GPU_CASES, WORKLOADS } from './cases.js';
import { report, ROTATE_BYTES, type FillResult, type GpuWorkloadResult } from './gpu-report.js';
import {
  benchCommand,
  caseList,
  gpuTimer,
  instantiate,
  measureWorkload,
  oneOf,
  parseCli,
  positiveInt,
  readTorchBaselines,
  reportToParent,
  runCasesInChildren,
  runMain,
  UsageError,
  type Backend,
  type KernelFigures,
  type Instance,
  type Timer,
} from './common.js';

const SCRIPT = fileURLToPath(import.meta.url);
const FILL_FLOATS = 256 * 1024 * 1024; // 1 GiB

const DEFAULT_BATCHES = 15;
const KNOWN_CASES = Object.keys(WORKLOADS);
const BACKENDS: readonly Backend[] = ['cuda', 'cpu'];

const COMMAND = benchCommand('gpu.js');
const USAGE = `Usage: ${COMMAND} [options]
       ${COMMAND} --dump-cases

GPU benchmark of the cuda backend (in the repository, scripts/gpu-check.sh runs it). Every
case (the fill / copy reference and each workload) runs in a fresh child process; a figure
is the median over batches of calls timed by CUDA events. Method, figures and targets:
bench/README.md.

Options:
  --cases LIST     comma-separated workloads (default ${GPU_CASES.join(',')}; known: ${KNOWN_CASES.join(', ')})
  --batches N      timed batches per figure, a positive integer (default ${DEFAULT_BATCHES})
  --backend NAME   cuda (default) or cpu: a dry run of this script's plumbing without a GPU
  --torch FILE     PyTorch baselines and the D2D copy reference from FILE (bench/torch_baselines.py)
  --json           print the JSON instead of the tables
  --json-out FILE  also write the JSON to FILE
  --dump-cases     print the workloads' shapes as JSON (input of bench/torch_baselines.py) and exit
  --case NAME      internal (the parent runs each case this way): measure one case, fill or a
                   workload, and send the result to the parent process
  -h, --help       print this text and exit

Exit code: 0 when every case ran (a missed target is reported as MISSED, not by the exit
code), 1 when a case failed, 2 on a bad command line, 3 when the backend cannot be used.`;

async function measureFill(batches: number, backend: Backend): Promise<FillResult> {
  const b = createBuffer(FILL_FLOATS, { backend });
  let v = 0;
  const timer = gpuTimer(batches, 50, 200, backend);
  const t = await timer.time(() => b.fill(++v));
  const out: FillResult = { fillGBps: (4 * FILL_FLOATS) / (t.ms * 1e6), bytes: 4 * FILL_FLOATS, ms: t.ms };
  // The in-process device-to-device copy reference (read + write).
  const dst = createBuffer(FILL_FLOATS, { backend });
  const c = await timer.time(() => dst.copyFrom(b));
  out.copyGBps = (8 * FILL_FLOATS) / (c.ms * 1e6);
  dst.dispose();
  b.dispose();
  return out;
}


/**
 * The guarded step of a model whose parameters and gradients are Float32Arrays, as the core
 * API's example passes them: each call copies both to the device and the parameters back
 * (12 B/param over the host link), through device memory the backend keeps between calls
 * (NOTE: [transient device copies] in cuda/backend.cu). Layer inputs stay DeviceBuffers.
 */
async function measureHostArrayStep(inst: Instance, timer: Timer): Promise<KernelFigures> {
  const host = (b: DeviceBuffer) => b.download();
  const layers = inst.layers.map((l): LayerSpec =>
    'weight' in l ? { ...l, weight: host(l.weight as DeviceBuffer), bias: l.bias ? host(l.bias as DeviceBuffer) : l.bias } : l,
  );
  const grads = inst.grads.map(host);
  const opt = new AdaFisher(layers, { lr: 1e-4, backend: inst.backend, tcov: 1_000_000, nonFiniteGuard: true });
  inst.wl.shapes.forEach((s, i) => {
    opt.recordInput(i, inst.inputs[i], s.inputShape);
    opt.recordOutputGrad(i, inst.outGrads[i], s.outputShape);
  });
  opt.step(grads); // the one refreshing step
  const timing = await timer.time(() => {
    opt.step(grads);
  });
  opt.dispose();
  const bytes = 12 * inst.wl.parameters;
  return { timing, bytes, gbps: bytes / (timing.ms * 1e6) };
}

async function measureGpuWorkload(name: string, batches: number, backend: Backend): Promise<GpuWorkloadResult> {
  const info = backendInfo(backend);
  if (info.backend !== backend) throw new Error(`the ${backend} backend cannot be used: ${info.reason}`);
  const wl = deriveWorkload(WORKLOADS[name]);
  const inst = instantiate(wl, backend);
  const result = await measureWorkload(inst, gpuTimer(batches, 25, 2000, backend), { rotateBytes: ROTATE_BYTES });
  const hostArrayStep = await measureHostArrayStep(inst, gpuTimer(batches, 25, 200, backend));
  inst.dispose();
  return { ...result, hostArrayStep, device: backend === 'cuda' ? info.cuda.deviceName : 'cpu (dry run)' };
}

function dumpCases(): void {
  const out: Record<string, unknown> = {};
  for (const name of GPU_CASES) out[name] = deriveWorkload(WORKLOADS[name]);
  console.log(JSON.stringify(out));
}

async function main(argv: string[]): Promise<void> {
  const opts = parseCli(
    argv,
    {
      cases: { type: 'string' },
      batches: { type: 'string' },
      backend: { type: 'string' },
      torch: { type: 'string' },
      json: { type: 'boolean' },
      'json-out': { type: 'string' },
      'dump-cases': { type: 'boolean' },
      case: { type: 'string' },
    },
    USAGE,
  );
  if (!opts) return; // --help
  const batches = positiveInt('batches', opts.batches, DEFAULT_BATCHES);
  // `--backend cpu` is a dry run of this script's plumbing on a machine without a GPU.
  const backend = oneOf('backend', opts.backend, BACKENDS, 'cuda');
  const cases = caseList('cases', opts.cases, KNOWN_CASES, GPU_CASES);
  const only = opts.case;
  if (only !== undefined && only !== 'fill' && !KNOWN_CASES.includes(only)) {
    throw new UsageError(`unknown case '${only}' for --case (known: fill, ${KNOWN_CASES.join(', ')})`);
  }
  if (opts['dump-cases']) {
    dumpCases();
    return;
  }
  if (only !== undefined) {
    await reportToParent(() => (only === 'fill' ? measureFill(batches, backend) : measureGpuWorkload(only, batches, backend)));
    return;
  }
  const info = backendInfo(backend);
  if (info.backend !== backend) {
    console.error(`GPU benchmark skipped: the ${backend} backend cannot be used (${info.reason})`);
    process.exitCode = 3;
    return;
  }
  const torchFile = opts.torch;
  const torch = torchFile !== undefined ? readTorchBaselines(torchFile, backend) : undefined;
  const out = opts['json-out'];
  // --json-out is rewritten after every case, marked partial until the last: a run that its
  // time limit cuts short (scripts/gpu-check.sh) still leaves the cases it finished.
  const saveSoFar = (res: Record<string, unknown>) => {
    if (out === undefined || res.fill === undefined) return;
    const done = cases.filter((c) => res[c] !== undefined);
    const { json } = report(res.fill as FillResult | { error: string }, res as Record<string, GpuWorkloadResult | { error: string }>, torch, done);
    writeFileSync(out, JSON.stringify({ ...json, partial: done.length < cases.length }, null, 2));
  };
  const res = await runCasesInChildren(SCRIPT, ['fill', ...cases], ['--batches', String(batches), '--backend', backend], saveSoFar);
  const { text, json, failures } = report(
    res.fill as FillResult | { error: string },
    res as Record<string, GpuWorkloadResult | { error: string }>,
    torch,
    cases,
  );
  if (out !== undefined) writeFileSync(out, JSON.stringify({ ...json, partial: false }, null, 2));
  if (opts.json) console.log(JSON.stringify(json, null, 2));
  else console.log(text);
  process.exitCode = failures ? 1 : 0;
}

runMain('gpu.js', () => main(process.argv.slice(2)));
