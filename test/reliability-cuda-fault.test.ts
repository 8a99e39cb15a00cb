// A faulted GPU (sticky CUDA error, as after an illegal address): every later cuda call throws
// or rejects with code ADAFISHER_CUDA_ERROR naming the CUDA error, nothing aborts the process,
// dispose and finalizers run, the cpu backend keeps working. The checks run in a child
// process (test/workers/cuda-fault-driver.mjs), since the fault poisons the whole process's
// CUDA context. The fault is injected by the CUDA host emulator, so this runs only on its
// build of the addon (`npm run test:cuda-emulator`, CI); a real GPU cannot be made to fault
// on purpose, and elsewhere the test skips with that reason.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';

import { backendInfo } from '../lib/index.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const info = backendInfo('auto');
const emulated = info.cuda.usable && info.cuda.deviceName === 'CUDA host emulator';
if (!emulated) {
  console.log(`SKIP faulted-GPU test: fault injection needs the CUDA host emulator's addon (here: ${info.cuda.usable ? info.cuda.deviceName : info.reason})`);
}

describe.skipIf(!emulated)('a faulted CUDA device', () => {
  beforeAll(() => ensureDist());

  test('every later call throws ADAFISHER_CUDA_ERROR; no abort; dispose, finalizers and the cpu backend work', () => {
    const r = spawnSync(process.execPath, ['--expose-gc', join(repoRoot, 'test', 'workers', 'cuda-fault-driver.mjs')], {
      cwd: repoRoot,
      encoding: 'utf8',
      timeout: 120_000,
    });
    expect(r.signal, r.stderr).toBeNull();
    const line = r.stdout.trim().split('\n').pop() ?? '';
    expect(line.startsWith('{'), `no report from the driver:\n${r.stdout}\n${r.stderr}`).toBe(true);
    const report = JSON.parse(line) as { checks: { name: string; ok: boolean; detail: string }[] };
    for (const c of report.checks) console.log(`cuda fault: ${c.ok ? 'ok ' : 'BAD'} ${c.name}${c.detail ? ` (${c.detail.slice(0, 100)})` : ''}`);
    expect(report.checks.length).toBe(11);
    for (const c of report.checks) expect(c.ok, `${c.name}: ${c.detail}`).toBe(true);
    expect(r.stderr).toMatch(/injected fault \(ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH\)/);
    expect(r.status).toBe(0);
  });
});
