// The GPU benchmark's verdicts (bench/gpu-report.ts) on the results of a real H200 run
// (bench/results/h200-2026-11-28): the step targets judged for the 20 B/param step (guard
// off) and, beside them, for the default guarded step; a target whose baseline is missing is
// null ("not measured"), never met. No GPU needed: the run's own figures are fed back in.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, test } from 'vitest';

import type { TorchBaselines } from '../bench/common.js';
import { report, type FillResult, type GpuWorkloadResult } from '../bench/gpu-report.js';
import { repoRoot } from './workers/ensure-dist.js';

const dir = join(repoRoot, 'bench', 'results', 'h200-2026-11-28');
const run = JSON.parse(readFileSync(join(dir, 'gpu-bench.json'), 'utf8')) as {
  fill: FillResult;
  workloads: Record<string, GpuWorkloadResult>;
};
const torch = JSON.parse(readFileSync(join(dir, 'torch.json'), 'utf8')) as TorchBaselines;
const CASES = ['mlp', 'cnn', 'cnn512', 'big'];

// Figures this run predates (one recordFactors call, Float32Array steps) are filled in from
// the per-layer ones; the verdicts do not read them.
const workloads = Object.fromEntries(
  CASES.map((name) => {
    const r = structuredClone(run.workloads[name]);
    r.factors.batchedWarm ??= r.factors.warm;
    r.factors.batchedCold ??= r.factors.cold;
    if (r.factors.convWarm) {
      r.factors.convBatchedWarm ??= r.factors.convWarm;
      r.factors.convBatchedCold ??= r.factors.convCold;
    }
    r.wholeBatchedMs ??= r.wholeMs;
    r.hostArrayStep ??= r.step.guardOn.warm;
    return [name, r];
  }),
);

describe('GPU benchmark verdicts on a recorded H200 run', () => {
  type Keys = Record<string, Record<string, unknown>>;
  const keysOf = (r: ReturnType<typeof report>) => r.json.key as Keys;
  const full = report(run.fill, workloads, torch, CASES);
  const key = keysOf(full);
  const text = full.text;

  test('big: the step targets met with the guard off, missed with the default guard, both shown', () => {
    expect(key.big).toMatchObject({
      stepCopyTargetMet: true, // 88 % of copy
      stepCopyTargetMetGuardOn: false, // 79 % at the 24 B/param it moves
      fusedAdamTargetMet: true, // 1.71x
      fusedAdamTargetMetGuardOn: false, // 1.27x
      eagerTargetMet: true, // 5.9x
    });
    expect(key.big.stepGuardOnFractionOfCopy20 as number).toBeCloseTo(0.655, 2);
    expect(key.big.stepGuardOnFractionOfCopy24 as number).toBeCloseTo(0.786, 2);
    expect(text).toMatch(/step \(guard on, the default\) at 79% of D2D copy bandwidth at the 24 B\/param it moves \(66% at 20\) \(the same target: MISSED\)/);
    expect(text).toMatch(/\(target >= 1\.3x: met guard off, MISSED guard on\)/);
  });

  test('cnn512: the conv target judged and missed (35 %); cnn: too little conv data to judge', () => {
    expect(key.cnn512.convFactorsTargetMet).toBe(false);
    expect(key.cnn512.convFactorsFractionOfCopy as number).toBeCloseTo(0.35, 2);
    expect(key.cnn.convFactorsTargetMet).toBeUndefined();
    expect(text).toMatch(/conv factors at \d+% of copy bandwidth \([\d.]+ MB of conv data, below the 128 MiB where the target is judged: latency-bound\)/);
    for (const name of CASES) expect(key[name].eagerTargetMet, name).toBe(true);
  });

  test("tiny (a call's fixed cost, run last on the GPU): its figures shown, no target judged", () => {
    const r = report(run.fill, { tiny: workloads.cnn }, { ...torch, workloads: { tiny: torch.workloads!.cnn } }, ['tiny']);
    const k = keysOf(r).tiny;
    expect(k.wholeSpeedupVsEager as number).toBeGreaterThan(1);
    expect(k.speedupVsFusedAdamGuardOn as number).toBeGreaterThan(1);
    for (const t of ['eagerTargetMet', 'stepCopyTargetMet', 'fusedAdamTargetMet', 'convFactorsTargetMet']) expect(k[t], t).toBeUndefined();
    expect(r.text).toMatch(/vs eager PyTorch AdaFisher: [\d.]+x \(a call's fixed cost: not judged\)/);
  });

  test('without the PyTorch baselines the torch targets are null (not measured), not met and not absent', () => {
    const bare = { key: keysOf(report(run.fill, workloads, undefined, CASES)) };
    expect(bare.key.big).toMatchObject({ stepCopyTargetMet: true, fusedAdamTargetMet: null, fusedAdamTargetMetGuardOn: null, eagerTargetMet: null });
    for (const name of CASES) expect(bare.key[name].eagerTargetMet, name).toBeNull();
    // and without a copy figure either, the copy targets too
    const blind = { key: keysOf(report({ error: 'no fill' }, workloads, undefined, ['big', 'cnn512'])) };
    expect(blind.key.big).toMatchObject({ stepCopyTargetMet: null, stepCopyTargetMetGuardOn: null });
    expect(blind.key.cnn512.convFactorsTargetMet).toBeNull();
  });
});
