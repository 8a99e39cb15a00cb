#!/usr/bin/env node
// The `adafisher` command: replay a golden trajectory, report the backend, run the demo,
// run the kernel benchmark.
// Every failure is one line on stderr ("adafisher: ...", plus the paths tried when the addon
// cannot be loaded) and a documented exit code, never a stack trace (see EXIT below and
// README "Command line").
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { BACKEND_NAMES, backendInfo, resolveBackend, type BackendReport } from './backend.js';
import { packageRoot } from './binding.js';
import { ErrorCodes } from './errors.js';
import { GoldenFormatError, readGolden, replayGolden, type GoldenCase } from './replay.js';
import { checkOneOf } from './validate.js';

/** Exit codes, the same for every subcommand. */
const EXIT = {
  ok: 0,
  /** replay: an error above the tolerance; demo: a trajectory that does not match; bench: a case that failed. */
  mismatch: 1,
  /** Bad usage (unknown command or option, bad value, bad ADAFISHER_* variable) or a malformed golden file. */
  usage: 2,
  /** The requested backend cannot be used (cuda without a usable GPU), or the addon failed. */
  unavailable: 3,
} as const;

const EXIT_CODES = `Exit codes: 0 success; 1 replay or demo above the tolerance, or a bench case that
failed; 2 bad usage or a malformed golden file; 3 the requested backend cannot be used (e.g.
cuda without a usable GPU) or the native side failed (addon not found, out of memory, internal
error); bench: 128 + n when signal n stopped it.`;

const HELP = {
  replay: `adafisher replay FILE.json [--backend auto|cpu|cuda] [--tol 1e-4]
    Replays a golden trajectory (official PyTorch AdaFisher) through the public API and prints
    a JSON report of max relative errors. Exit 0: within tolerance; 1: above; 2: malformed file.`,
  info: `adafisher info [--json]
    Version, the backend that will be used and why, GPU and CUDA architectures, CPU threads.
    Exit 3 when the requested backend (ADAFISHER_BACKEND) cannot be used.`,
  demo: `adafisher demo
    Replays every shipped golden trajectory and prints which backend ran.`,
  bench: `adafisher bench [cpu|gpu] [OPTIONS]
    The kernel benchmark: time, bytes moved and GB/s of the factor, min-max + EMA and step
    calls on fixed workloads, as a share of the memory copy bandwidth measured in the same
    run, with the targets each is judged by (and, on cpu where python3 has torch, PyTorch's
    Adam and an eager AdaFisher on the same tensors). gpu (the default where the cuda backend
    is usable) times the CUDA kernels with CUDA events; cpu the CPU backend. OPTIONS go to that
    benchmark: 'adafisher bench cpu --help' and 'adafisher bench gpu --help' list them.
    Exit 0: every case ran (a missed target is reported, not an error); 1: a case failed;
    2: bad usage; 3: gpu where no GPU can be used; 128 + n: stopped by signal n (a signal
    sent to this command stops the benchmark too).`,
} as const;

type Command = keyof typeof HELP;

const USAGE = `Usage:\n${Object.values(HELP).map((h) => `  ${h.replace(/\n/g, '\n  ')}`).join('\n')}\n  adafisher [COMMAND] --help\n  adafisher --version\n\n${EXIT_CODES}`;

/** A golden file that cannot be read or does not follow the format (exit 2, no usage hint). */
class BadFile extends Error {}

/** A mistake in the command line; `command` names the subcommand whose --help applies. */
class UsageError extends Error {
  constructor(
    message: string,
    readonly command?: Command,
  ) {
    super(message);
  }
}

function parse<T extends Record<string, { type: 'string' | 'boolean'; short?: string }>>(command: Command, args: string[], options: T, positionals = false) {
  try {
    return parseArgs({ args, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: positionals, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message.replace(/\s*\n\s*/g, ' '), command);
  }
}

function backendLine(r: BackendReport): string {
  if (r.backend === null) return `none: ${r.error?.message ?? r.reason}`;
  return `${r.backend}${r.reason ? ` (${r.reason})` : ''}`;
}

function info(args: string[]): number {
  const { values } = parse('info', args, { json: { type: 'boolean' } });
  if (values.help) return help('info');
  const r = backendInfo();
  const version = (JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version;
  if (values.json) {
    console.log(JSON.stringify({ version, ...r }, null, 2));
  } else {
    const lines = [
      `adafisher ${version} (addon ${r.addonVersion}, built with ${r.buildSystem})`,
      `addon:          ${r.addonPath}`,
      `backend:        ${backendLine(r)}`,
      `requested:      ${r.requested} (${r.source})`,
      `CUDA compiled:  ${r.cuda.compiled ? `yes, architectures ${r.cuda.architectures}` : 'no'}`,
      `GPU:            ${r.cuda.usable ? `${r.cuda.deviceName}, compute capability ${r.cuda.computeCapability}, ${(r.cuda.memoryBytes / 2 ** 30).toFixed(1)} GiB` : 'none usable'}`,
      `CPU threads:    ${r.cpuThreads}`,
    ];
    console.log(lines.join('\n'));
  }
  if (r.backend === null) {
    console.error(`adafisher: ${r.error?.message ?? r.reason}`);
    return EXIT.unavailable;
  }
  return EXIT.ok;
}

/** A number >= 0 from a command-line string (not '', not Infinity). */
function tolerance(text: string | undefined): number {
  if (text === undefined) return 1e-4;
  const tol = text.trim() === '' ? NaN : Number(text);
  if (!Number.isFinite(tol) || tol < 0) throw new UsageError(`Expected a finite number >= 0 for --tol but received '${text}'`, 'replay');
  return tol;
}

function replay(args: string[]): number {
  const { values, positionals } = parse('replay', args, { backend: { type: 'string' }, tol: { type: 'string' } }, true);
  if (values.help) return help('replay');
  if (positionals.length !== 1) {
    throw new UsageError(`replay takes one FILE.json, received ${positionals.length === 0 ? 'none' : positionals.map((p) => `'${p}'`).join(', ')}`, 'replay');
  }
  const backend = values.backend === undefined ? undefined : checkOneOf('--backend', values.backend, BACKEND_NAMES);
  const tol = tolerance(values.tol);
  resolveBackend(backend); // an unusable backend is reported before the file is read
  const file = positionals[0];
  let golden: GoldenCase;
  try {
    golden = readGolden(file);
  } catch (e) {
    if (!(e instanceof GoldenFormatError)) throw e;
    // "FILE: cannot read (...)", "FILE: not valid JSON (...)", or a format error at a JSON path.
    throw new BadFile(e.message.startsWith(`${file}: `) ? e.message : `${file}: malformed golden file: ${e.message}`);
  }
  const report = replayGolden(golden, { backend, tolerance: tol, file });
  console.log(JSON.stringify(report, null, 2));
  return report.pass ? EXIT.ok : EXIT.mismatch;
}

function demo(args: string[]): number {
  const { values } = parse('demo', args, {});
  if (values.help) return help('demo');
  const dir = join(packageRoot, 'test', 'golden');
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
  const r = backendInfo();
  resolveBackend(); // throws when the requested backend cannot be used
  console.log(`adafisher demo: replaying ${files.length} trajectories recorded from the official PyTorch AdaFisher`);
  console.log(`backend: ${backendLine(r)}\n`);
  console.log('trajectory                   steps  weights   biases    momenta   H         S         pass');
  let ok = true;
  for (const f of files) {
    const rep = replayGolden(readGolden(join(dir, f)), {});
    const e = rep.maxRelError;
    const fmt = (x: number) => x.toExponential(1).padEnd(9);
    console.log(
      `${rep.name.padEnd(28)} ${String(rep.steps).padEnd(6)} ${fmt(e.weights)} ${fmt(e.biases)} ${fmt(e.momenta)} ${fmt(e.H)} ${fmt(e.S)} ${rep.pass ? 'yes' : 'NO'}`,
    );
    ok &&= rep.pass;
  }
  console.log(`\nmax relative error per array kind; tolerance 1e-4. ${ok ? 'All match.' : 'MISMATCH.'}`);
  return ok ? EXIT.ok : EXIT.mismatch;
}

/** Signals the CLI passes on to the benchmark it runs (Ctrl-C reaches both anyway). */
const RELAYED_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

function bench(args: string[]): number | Promise<number> {
  const [first, ...others] = args;
  if (first === '--help' || first === '-h') return help('bench');
  const named = first === 'cpu' || first === 'gpu';
  if (!named && first !== undefined && !first.startsWith('-')) {
    throw new UsageError(`unknown benchmark '${first}' (expected cpu or gpu)`, 'bench');
  }
  const rest = named ? others : args;
  const wantsHelp = rest.some((a) => a === '--help' || a === '-h');
  // A bad ADAFISHER_NUM_THREADS is bad usage, found before any case runs.
  if (!wantsHelp) backendInfo('cpu');
  let target = first;
  if (!named) {
    const r = backendInfo();
    if (r.backend === null) resolveBackend(); // ADAFISHER_BACKEND=cuda without a usable GPU: exit 3, no silent cpu run
    target = r.backend === 'cuda' ? 'gpu' : 'cpu';
  }
  // What gpu.js does without a GPU (its usage, the workloads, a dry run on --backend cpu) is
  // left to it; it refuses an unusable backend itself too (exit 3).
  const noGpuNeeded = wantsHelp || rest.some((a) => a === '--dump-cases' || a === '--backend' || a.startsWith('--backend='));
  if (target === 'gpu' && !noGpuNeeded) {
    const cuda = backendInfo('cuda');
    if (cuda.backend !== 'cuda') {
      console.error(`adafisher: the gpu benchmark needs the cuda backend, which cannot be used: ${cuda.reason}`);
      return EXIT.unavailable;
    }
  }
  const script = join(packageRoot, 'dist', 'bench', `${target}.js`);
  if (!existsSync(script)) throw new Error(`the ${target} benchmark is missing from this installation (${script})`);
  const env = { ...process.env, ADAFISHER_BENCH_COMMAND: `adafisher bench ${target}` };  // for its usage text
  // Its own process, output and exit status. A signal sent to this process goes on to it (a
  // benchmark left running would hold the GPU); one that ends it ends this command with the
  // shell's status for it, 128 + its number.
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...rest], { stdio: 'inherit', env });
    const relay = (signal: NodeJS.Signals) => child.kill(signal);
    for (const s of RELAYED_SIGNALS) process.on(s, relay);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      for (const s of RELAYED_SIGNALS) process.off(s, relay);
      if (signal) {
        console.error(`adafisher: the ${target} benchmark was stopped by ${signal}`);
        resolve(128 + (constants.signals[signal] ?? 0));
      } else {
        resolve(code ?? EXIT.unavailable);
      }
    });
  });
}

function help(command?: Command): number {
  console.log(command === undefined ? USAGE : `Usage:\n  ${HELP[command].replace(/\n/g, '\n  ')}\n\n${EXIT_CODES}`);
  return EXIT.ok;
}

/** The subcommand running, for the usage hint of an error it raises without naming one. */
let running: Command | undefined;

function run(argv: string[]): number | Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'replay':
      running = 'replay';
      return replay(rest);
    case 'info':
      running = 'info';
      return info(rest);
    case 'demo':
      running = 'demo';
      return demo(rest);
    case 'bench':
      running = 'bench';
      return bench(rest);
    case '--version':
    case '-v':
      console.log(JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')).version);
      return EXIT.ok;
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      return help();
    default:
      throw new UsageError(`unknown command '${cmd}' (expected replay, info, demo or bench)`);
  }
}

/** Every error becomes one line on stderr and an exit code. */
function failure(e: unknown): number {
  const err = e as Error & { code?: unknown };
  const code = typeof err?.code === 'string' ? err.code : undefined;
  const message = err instanceof Error ? err.message : String(e);
  const hint = (command: Command | undefined) => `Run 'adafisher ${command ? `${command} ` : ''}--help' for usage.`;
  if (e instanceof UsageError) {
    console.error(`adafisher: ${message}\n${hint(e.command)}`);
    return EXIT.usage;
  }
  if (err instanceof BadFile || code === ErrorCodes.badGoldenFile) {
    console.error(`adafisher: ${message}`);
    return EXIT.usage;
  }
  if (code === ErrorCodes.invalidArgument) {
    // A bad --backend or ADAFISHER_* variable: the message names it.
    console.error(`adafisher: ${message}\n${hint(running)}`);
    return EXIT.usage;
  }
  if (code === ErrorCodes.backendUnavailable) {
    console.error(`adafisher: ${message}`);
    return EXIT.unavailable;
  }
  // Anything else (addon not found, out of memory, an internal error): still one line.
  console.error(`adafisher: ${message}${code && !message.includes(code) ? ` (${code})` : ''}`);
  return EXIT.unavailable;
}

/** Runs the command line (bench waits for its benchmark); sets the exit code. */
function main(argv: string[]): void {
  let result: number | Promise<number>;
  try {
    result = run(argv);
  } catch (e) {
    result = failure(e);
  }
  if (typeof result === 'number') process.exitCode = result;
  else result.then((c) => (process.exitCode = c), (e: unknown) => (process.exitCode = failure(e)));
}

main(process.argv.slice(2));
