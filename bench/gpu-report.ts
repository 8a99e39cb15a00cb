// The GPU benchmark's report: the tables, the ratios and the verdicts against issue 3's
// targets (TARGETS.gpu), from the measured results and the PyTorch baselines. Apart from
// bench/gpu.ts (which measures) so that tests can feed it recorded runs.
import { TARGETS } from './cases.js';
import { describeTorch, fmtMB, fmtMs, fmtNum, judge, table, verdict, type KernelFigures, type TorchBaselines, type WorkloadResult } from './common.js';

// Cold figures cycle through copies of each kernel's data totalling more than this: five
// times the 50 MB L2 of an H100 or H200, so every call reads its inputs from DRAM.
export const ROTATE_BYTES = 256 * 1024 * 1024;

export interface FillResult {
  fillGBps: number;
  bytes: number;
  ms: number;
  /** D2D copy through DeviceBuffer.copyFrom, when the addon has that export (read + write). */
  copyGBps?: number;
}

export type GpuWorkloadResult = WorkloadResult & { device: string; hostArrayStep: KernelFigures };

/** The cold figure where one was taken, else the warm one. */
export function coldOrWarm(f: { cold?: KernelFigures; warm: KernelFigures }): KernelFigures {
  return f.cold ?? f.warm;
}

export function report(
  fill: FillResult | { error: string },
  results: Record<string, GpuWorkloadResult | { error: string }>,
  torch: TorchBaselines | undefined,
  cases: readonly string[],
): { text: string; json: Record<string, unknown>; failures: number } {
  const copy = torch?.copyGBps ?? ('error' in fill ? undefined : fill.copyGBps);
  const T = TARGETS.gpu;
  const sections: string[] = [];
  const key: Record<string, Record<string, number | boolean | string | null>> = {};
  let failures = 0;
  let device = torch?.device ?? '';
  for (const name of cases) {
    const r = results[name];
    if (!r || 'error' in r) {
      failures++;
      sections.push(`### ${name}\n\nFAILED: ${r ? r.error : 'no result'}`);
      key[name] = { error: r ? r.error : 'no result' };
      continue;
    }
    device = r.device;
    const tw = torch?.workloads?.[name];
    // Bandwidth figures and targets use the cold calls (data cycled through copies larger
    // than L2, see measureWorkload); the comparison with torch's back-to-back fused Adam
    // uses our back-to-back (warm) calls, the same conditions.
    const onMs = coldOrWarm(r.step.guardOn).timing.ms;
    const offMs = coldOrWarm(r.step.guardOff).timing.ms;
    const k: Record<string, number | boolean | string | null> = {
      stepGuardOffMs: offMs,
      stepGuardOnMs: onMs,
      stepGuardOffGBps20: (20 * r.parameters) / (offMs * 1e6),
      factorsMs: coldOrWarm(r.factors).timing.ms,
      factorsBatchedMs: coldOrWarm({ cold: r.factors.batchedCold, warm: r.factors.batchedWarm }).timing.ms,
      minMaxEmaMs: r.minMaxEma.ms,
      wholeMs: r.wholeMs,
      wholeBatchedMs: r.wholeBatchedMs,
      hostArrayStepMs: r.hostArrayStep.timing.ms,
      rotationCopies: `${r.rotation.factorCopies} (factors), ${r.rotation.stepCopies} (step)`,
    };
    const conv = r.factors.convWarm ? coldOrWarm({ cold: r.factors.convCold, warm: r.factors.convWarm }) : undefined;
    const convBatched = r.factors.convBatchedWarm ? coldOrWarm({ cold: r.factors.convBatchedCold, warm: r.factors.convBatchedWarm }) : undefined;
    if (copy) {
      k.stepGuardOffFractionOfCopy = (k.stepGuardOffGBps20 as number) / copy;
      k.stepGuardOnFractionOfCopy20 = (20 * r.parameters) / (onMs * 1e6) / copy;
      // What the guarded step moves: the guard's read of the gradients comes before any write
      // (so that a skipped step changes nothing), 24 B/param in all.
      k.stepGuardOnFractionOfCopy24 = (24 * r.parameters) / (onMs * 1e6) / copy;
      if (conv) k.convFactorsFractionOfCopy = conv.gbps / copy;
      if (convBatched) k.convFactorsBatchedFractionOfCopy = convBatched.gbps / copy;
    }
    if (tw?.fusedAdamMs) {
      k.fusedAdamMs = tw.fusedAdamMs;
      k.speedupVsFusedAdamGuardOff = tw.fusedAdamMs / r.step.guardOff.warm.timing.ms;
      k.speedupVsFusedAdamGuardOn = tw.fusedAdamMs / r.step.guardOn.warm.timing.ms;
    }
    if (tw?.eager) {
      k.eagerTotalMs = tw.eager.totalMs;
      k.wholeSpeedupVsEager = tw.eager.totalMs / r.wholeMs;
      k.wholeBatchedSpeedupVsEager = tw.eager.totalMs / r.wholeBatchedMs;
    }
    // Targets (only where the inputs exist; true / false where measured, null where a figure
    // has no samples: never "met" without a measurement).
    // The step targets are the issue's 20 B/param step, the guard off; the default (guard on)
    // is judged beside it, so neither hides the other: its bandwidth at the 24 B/param it
    // moves (at 20 B/param 85 % would be out of its reach by construction), its speed
    // against fused Adam as is. A target
    // whose baseline is missing (no copy figure, no torch run) is null: "not measured".
    if (name === 'big') {
      k.stepCopyTargetMet = k.stepGuardOffFractionOfCopy !== undefined ? judge(k.stepGuardOffFractionOfCopy, (x) => x >= T.stepFractionOfCopy) : null;
      k.stepCopyTargetMetGuardOn = k.stepGuardOnFractionOfCopy24 !== undefined ? judge(k.stepGuardOnFractionOfCopy24, (x) => x >= T.stepFractionOfCopy) : null;
      k.fusedAdamTargetMet = k.speedupVsFusedAdamGuardOff !== undefined ? judge(k.speedupVsFusedAdamGuardOff, (x) => x >= T.stepSpeedupOverFusedAdam) : null;
      k.fusedAdamTargetMetGuardOn = k.speedupVsFusedAdamGuardOn !== undefined ? judge(k.speedupVsFusedAdamGuardOn, (x) => x >= T.stepSpeedupOverFusedAdam) : null;
    }
    // The conv target is judged where the conv data exceeds any L2 several times; below
    // that the figure is shown but measures launch latency (see WORKLOADS.cnn512).
    const convJudged = conv !== undefined && conv.bytes >= T.convFactorsMinBytes;
    if (convJudged) k.convFactorsTargetMet = k.convFactorsFractionOfCopy !== undefined ? judge(k.convFactorsFractionOfCopy, (x) => x >= T.convFactorsFractionOfCopy) : null;
    // Every workload of the issue's; `tiny` measures a call's fixed cost (shown, not judged).
    if (name !== 'tiny') k.eagerTargetMet = k.wholeSpeedupVsEager !== undefined ? judge(k.wholeSpeedupVsEager, (x) => x >= T.wholeSpeedupOverEager) : null;
    key[name] = k;

    const pct = (gbps: number) => (copy ? `${fmtNum((100 * gbps) / copy, 0)}%` : '-');
    const rows = [
      ['factors, all layers', r.factors] as const,
      ...(r.factors.convWarm ? [['factors, conv layers', { cold: r.factors.convCold, warm: r.factors.convWarm }] as const] : []),
      ['factors, one recordFactors', { cold: r.factors.batchedCold, warm: r.factors.batchedWarm }] as const,
      ...(r.factors.convBatchedWarm
        ? [['conv layers, one recordFactors', { cold: r.factors.convBatchedCold, warm: r.factors.convBatchedWarm }] as const]
        : []),
      ['step, guard on (24 B/p)', r.step.guardOn] as const,
      ['step, guard off (20 B/p)', r.step.guardOff] as const,
    ];
    const body = rows.map(([label, f]) => {
      const c = coldOrWarm(f);
      return [label, fmtMs(c.timing.ms), fmtMs(f.warm.timing.ms), `${c.timing.callsPerSample}x${c.timing.samples}`, fmtMB(c.bytes), fmtNum(c.gbps, 0), pct(c.gbps)];
    });
    const h = r.hostArrayStep;
    body.push(['step, Float32Arrays (12 B/p host link)', fmtMs(h.timing.ms), '', `${h.timing.callsPerSample}x${h.timing.samples}`, fmtMB(h.bytes), fmtNum(h.gbps, 1), '-']);
    body.push(['min-max + EMA', fmtMs(r.minMaxEma.ms), '', '', '', '', `refresh ${fmtMs(r.minMaxEma.refreshStepMs)} - empty ${fmtMs(r.minMaxEma.emptyStepMs)}`]);
    body.push(['whole (factors+mm+step on)', fmtMs(r.wholeMs), '', '', '', '', '']);
    body.push(['whole, one recordFactors', fmtMs(r.wholeBatchedMs), '', '', '', '', '']);
    if (tw?.fusedAdamMs) body.push([`torch ${tw.adam ?? 'fused'} Adam step`, '', fmtMs(tw.fusedAdamMs), 'CUDA events', fmtMB(28 * r.parameters), fmtNum((28 * r.parameters) / (tw.fusedAdamMs * 1e6), 0), '']);
    if (tw?.eager) body.push(['eager PyTorch AdaFisher', '', fmtMs(tw.eager.totalMs), 'CUDA events', '', '', `f ${fmtMs(tw.eager.factorsMs)} mm ${fmtMs(tw.eager.minMaxEmaMs)} step ${fmtMs(tw.eager.stepMs)}`]);
    const lines: string[] = [];
    if (k.stepGuardOffFractionOfCopy !== undefined) {
      lines.push(`step (guard off) at ${fmtNum(100 * (k.stepGuardOffFractionOfCopy as number), 0)}% of D2D copy bandwidth` + (name === 'big' ? ` (target >= ${100 * T.stepFractionOfCopy}%: ${verdict(k.stepCopyTargetMet as boolean | null)})` : ''));
      lines.push(
        `step (guard on, the default) at ${fmtNum(100 * (k.stepGuardOnFractionOfCopy24 as number), 0)}% of D2D copy bandwidth at the 24 B/param it moves ` +
          `(${fmtNum(100 * (k.stepGuardOnFractionOfCopy20 as number), 0)}% at 20)` +
          (name === 'big' ? ` (the same target: ${verdict(k.stepCopyTargetMetGuardOn as boolean | null)})` : ''),
      );
    }
    if (k.speedupVsFusedAdamGuardOff !== undefined) {
      lines.push(
        `vs torch ${tw?.adam ?? 'fused'} Adam, both back-to-back: ${fmtNum(k.speedupVsFusedAdamGuardOff as number, 2)}x (guard off), ${fmtNum(k.speedupVsFusedAdamGuardOn as number, 2)}x (guard on)` +
          (name === 'big'
            ? ` (target >= ${T.stepSpeedupOverFusedAdam}x: ${verdict(k.fusedAdamTargetMet as boolean | null)} guard off, ${verdict(k.fusedAdamTargetMetGuardOn as boolean | null)} guard on)`
            : ''),
      );
    }
    if (k.convFactorsFractionOfCopy !== undefined) {
      const judged = convJudged
        ? `target >= ${100 * T.convFactorsFractionOfCopy}%: ${verdict(k.convFactorsTargetMet as boolean | null)}`
        : `${fmtMB(conv!.bytes)} of conv data, below the ${T.convFactorsMinBytes >> 20} MiB where the target is judged: latency-bound`;
      const batched =
        k.convFactorsBatchedFractionOfCopy !== undefined ? `; ${fmtNum(100 * (k.convFactorsBatchedFractionOfCopy as number), 0)}% with one recordFactors call (not judged)` : '';
      lines.push(`conv factors at ${fmtNum(100 * (k.convFactorsFractionOfCopy as number), 0)}% of copy bandwidth (${judged})${batched}`);
    }
    if (k.wholeSpeedupVsEager !== undefined) {
      lines.push(
        `whole optimizer work vs eager PyTorch AdaFisher: ${fmtNum(k.wholeSpeedupVsEager as number, 1)}x (` +
          (name === 'tiny' ? "a call's fixed cost: not judged" : `target >= ${T.wholeSpeedupOverEager}x: ${verdict(k.eagerTargetMet as boolean | null)}`) +
          '); ' +
          `${fmtNum(k.wholeBatchedSpeedupVsEager as number, 1)}x with one recordFactors call (not judged)`,
      );
    }
    sections.push(
      `### ${name}: ${r.description} (${(r.parameters / 1e6).toFixed(3)} M parameters)\n\n` +
        table(['kernel', 'ms/call', 'warm ms/call', 'calls x batches', 'bytes', 'GB/s', '% copy BW'], body) +
        (lines.length ? `\n\n${lines.map((l) => `- ${l}`).join('\n')}` : ''),
    );
  }
  const fillText = 'error' in fill ? `fill reference FAILED: ${fill.error}` : `fill (write-only, 1 GiB) ${fmtNum(fill.fillGBps, 0)} GB/s`;
  const copySource = torch?.copyGBps !== undefined ? 'torch, same run' : 'DeviceBuffer.copyFrom, same process';
  const copyText = copy ? `D2D copy (${copySource}, read + write) ${fmtNum(copy, 0)} GB/s` : `D2D copy: not available (${torch?.error ?? 'no --torch file'})`;
  const workloads = Object.fromEntries(cases.filter((c) => c in results).map((c) => [c, results[c]])); // not the fill
  const header = `adafisher GPU benchmark on ${device || 'unknown device'}: ${copyText}; ${fillText}`;
  return {
    text:
      `${header}\n${describeTorch(torch)}\n\n${sections.join('\n\n')}\n\n` +
      `ms/call = median over batches of (device time between two CUDA events around the batch) / calls, each call on the next ` +
      `of several copies of its data (> ${ROTATE_BYTES >> 20} MiB in all: read from DRAM, not L2); warm = back-to-back ` +
      `calls on the same buffers; bytes, GB/s and % copy BW are of the ms/call column. The torch figures are back-to-back.`,
    json: { device, copyGBps: copy ?? null, fill, torch: torch ?? null, workloads, key, targets: T },
    failures,
  };
}
