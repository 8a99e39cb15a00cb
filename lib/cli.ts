#!/usr/bin/env node
// The `adafisher` command: replay a golden trajectory, report the backend, run the demo.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { backendInfo, type BackendName } from './backend.js';
import { packageRoot } from './binding.js';
import { GoldenFormatError, readGolden, replayGolden } from './replay.js';

const USAGE = `Usage:
  adafisher replay FILE.json [--backend auto|cpu|cuda] [--tol 1e-4]
      Replays a golden trajectory (official PyTorch AdaFisher) through the public API and prints
      a JSON report of max relative errors. Exit 0: within tolerance; 1: above; 2: malformed file.
  adafisher info [--json]
      Version, the backend that will be used and why, GPU and CUDA architectures, CPU threads.
  adafisher demo
      Replays every shipped golden trajectory and prints which backend ran.`;

function info(json: boolean): number {
  const r = backendInfo();
  const version = (JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version;
  if (json) {
    console.log(JSON.stringify({ version, ...r }, null, 2));
    return 0;
  }
  const lines = [
    `adafisher ${version} (addon ${r.addonVersion}, built with ${r.buildSystem})`,
    `addon:          ${r.addonPath}`,
    `backend:        ${r.backend}${r.reason ? ` (${r.reason})` : ''}`,
    `requested:      ${r.requested} (${r.source})`,
    `CUDA compiled:  ${r.cuda.compiled ? `yes, architectures ${r.cuda.architectures}` : 'no'}`,
    `GPU:            ${r.cuda.usable ? `${r.cuda.deviceName}, compute capability ${r.cuda.computeCapability}, ${(r.cuda.memoryBytes / 2 ** 30).toFixed(1)} GiB` : 'none usable'}`,
    `CPU threads:    ${r.cpuThreads}`,
  ];
  console.log(lines.join('\n'));
  return 0;
}

function replay(args: string[]): number {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { backend: { type: 'string' }, tol: { type: 'string' } },
  });
  if (positionals.length !== 1) {
    console.error(USAGE);
    return 2;
  }
  const tol = values.tol === undefined ? 1e-4 : Number(values.tol);
  if (!(tol >= 0)) {
    console.error(`Expected a number >= 0 for --tol but received '${values.tol}'`);
    return 2;
  }
  let golden;
  try {
    golden = readGolden(positionals[0]);
  } catch (e) {
    if (e instanceof GoldenFormatError) {
      console.error(`malformed golden file: ${e.message}`);
      return 2;
    }
    throw e;
  }
  const report = replayGolden(golden, { backend: values.backend as BackendName | undefined, tolerance: tol, file: positionals[0] });
  console.log(JSON.stringify(report, null, 2));
  return report.pass ? 0 : 1;
}

function demo(): number {
  const dir = join(packageRoot, 'test', 'golden');
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
  const r = backendInfo();
  console.log(`adafisher demo: replaying ${files.length} trajectories recorded from the official PyTorch AdaFisher`);
  console.log(`backend: ${r.backend}${r.reason ? ` (${r.reason})` : ''}\n`);
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
  return ok ? 0 : 1;
}

function main(argv: string[]): number {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'replay':
      return replay(rest);
    case 'info':
      return info(rest.includes('--json'));
    case 'demo':
      return demo();
    default:
      console.error(USAGE);
      return cmd === undefined || cmd === '--help' || cmd === '-h' ? 0 : 2;
  }
}

process.exitCode = main(process.argv.slice(2));
