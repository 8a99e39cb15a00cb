// Out of device memory: allocating more than the GPU has is a catchable Error with code
// ADAFISHER_OUT_OF_MEMORY and the CUDA error's name, nothing is leaked, and the process and
// the optimizers in it keep working. The checks run in a child process
// (test/workers/oom-driver.mjs; scripts/gpu-check.sh runs the same driver on a GPU). Needs
// the cuda backend: a real GPU, or the CUDA host emulator's build of the addon
// (test/cuda-emulator), whose device memory the driver shrinks to 64 MiB. On the cpu
// backend, host allocations of any size usually "succeed" under Linux overcommit; its size
// checks are tested in core-errors and reliability-large.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';

import { backendInfo } from '../lib/index.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const info = backendInfo('auto');
if (!info.cuda.usable) console.log(`SKIP out-of-memory on CUDA: no usable CUDA device (${info.reason})`);

describe.skipIf(!info.cuda.usable)('out of CUDA memory', () => {
  beforeAll(() => ensureDist());

  test('is a catchable ADAFISHER_OUT_OF_MEMORY; nothing leaks; training goes on', () => {
    const r = spawnSync(process.execPath, [join(repoRoot, 'test', 'workers', 'oom-driver.mjs')], {
      cwd: repoRoot,
      encoding: 'utf8',
      timeout: 300_000,
    });
    const line = r.stdout.trim().split('\n').pop() ?? '';
    expect(line.startsWith('{'), `no report from the driver:\n${r.stdout}\n${r.stderr}`).toBe(true);
    const report = JSON.parse(line) as { device: string; deviceBytes: number; checks: { name: string; ok: boolean; detail: string }[] };
    for (const c of report.checks) console.log(`oom on ${report.device}: ${c.ok ? 'ok ' : 'BAD'} ${c.name}${c.detail ? ` (${c.detail})` : ''}`);
    expect(report.checks.length).toBe(10);
    for (const c of report.checks) expect(c.ok, `${c.name}: ${c.detail}`).toBe(true);
    expect(r.status).toBe(0);
  });
});
