// synchronize() waits on a libuv thread, and libuv has few of them for all of Node's fs, dns,
// crypto and zlib work: pending synchronize() calls of a backend share one wait (NOTE: [one
// wait per backend] in native/glue.cc), so they cannot starve the pool. Needs a backend with a
// queue to wait on: cuda (a GPU, or the CUDA host emulator in CI).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

import { beforeAll, describe, expect, test } from 'vitest';

import { backendInfo } from '../lib/index.js';
import { ensureDist, repoRoot } from './workers/ensure-dist.js';

const cuda = backendInfo('auto').cuda.usable;
if (!cuda) console.log('SKIP synchronize() and the libuv pool: no usable cuda backend (GPU or CUDA host emulator) to queue work on');

beforeAll(() => ensureDist());

describe('synchronize() and the libuv thread pool', () => {
  test.skipIf(!cuda)('four pending synchronize() and DeviceBuffer.sync() calls leave a 2-thread pool free for fs work, and all resolve after the work', () => {
    // The emulator runs queued work when something waits for it, slowly; a GPU runs it as
    // queued: more work there, so that the waits outlast a small file read either way.
    const emulated = /emulator/i.test(backendInfo('cuda').cuda.deviceName ?? '');
    const [floats, fills] = emulated ? [1 << 22, 40] : [1 << 26, 3000];
    const code = `
      import('${join(repoRoot, 'dist', 'lib', 'index.js')}').then(async (m) => {
        const fs = await import('node:fs');
        const b = m.createBuffer(${floats}, { backend: 'cuda' });
        await m.synchronize('cuda');
        for (let i = 0; i < ${fills}; i++) b.fill(i);
        const order = [];
        // synchronize(backend) and a buffer's sync() alike.
        const syncs = [0, 1, 2, 3].map((i) => (i % 2 ? b.sync() : m.synchronize('cuda')).then(() => order.push('sync' + i)));
        const read = new Promise((r) => fs.readFile(${JSON.stringify(join(repoRoot, 'package.json'))}, () => { order.push('read'); r(); }));
        await Promise.all([...syncs, read]);
        const last = b.download()[0];
        b.dispose();
        console.log(JSON.stringify({ order, last }));
      });`;
    const r = spawnSync(process.execPath, ['-e', code], { env: { ...process.env, UV_THREADPOOL_SIZE: '2' }, encoding: 'utf8', timeout: 300_000 });
    expect(r.status, r.stderr).toBe(0);
    const { order, last } = JSON.parse(r.stdout.trim().split('\n').pop()!) as { order: string[]; last: number };
    // The read did not wait behind the device waits (one pool thread each would take both).
    expect(order[0]).toBe('read');
    expect(order.slice(1).sort()).toEqual(['sync0', 'sync1', 'sync2', 'sync3']);
    expect(last).toBe(fills - 1);
  });
});
