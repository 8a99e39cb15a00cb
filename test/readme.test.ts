// The README's examples as a user copies them: the core-API block runs verbatim (its
// import pointed at this checkout's dist/), the TF.js block and the TypeScript casts it
// shows type-check under --strict, and the custom-loop block type-checks and runs on a small
// model. Keeps the README from drifting away from the API.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { pathToFileURL } from 'node:url';

import { beforeAll, describe, expect, test } from 'vitest';

import { ensureDist, repoRoot } from './workers/ensure-dist.js';

beforeAll(() => ensureDist());

const readme = readFileSync(join(repoRoot, 'README.md'), 'utf8');

/** The first fenced block of a language after a heading. */
/** Writes `source` to dir/name and type-checks it with tsc --strict (as a user's strict project would). */
function expectStrictTypeCheck(dir: string, name: string, source: string): void {
  writeFileSync(join(dir, name), source);
  const tsc = join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc');
  const args = ['--noEmit', '--strict', '--skipLibCheck', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--types', 'node', join(dir, name)];
  const r = spawnSync(process.execPath, [tsc, ...args], { cwd: repoRoot, encoding: 'utf8', timeout: 120_000 });
  expect(r.stdout + r.stderr, source).toBe('');
  expect(r.status).toBe(0);
}

function blockAfter(heading: string, lang: string): string {
  const at = readme.indexOf(`\n${heading}\n`);
  expect(at, `README heading '${heading}'`).toBeGreaterThanOrEqual(0);
  const m = readme.slice(at).match(new RegExp('\\n```' + lang + '\\n([\\s\\S]*?)\\n```\\n'));
  expect(m, `a \`\`\`${lang} block under '${heading}'`).not.toBeNull();
  return m![1];
}

describe('README', () => {
  test('the core-API example runs as written and takes an applied, refreshing step', () => {
    const code = blockAfter('### Any framework: the core API', 'js');
    expect(code).toMatch(/from 'adafisher';/);
    const dir = mkdtempSync(join(tmpdir(), 'adafisher-readme-'));
    try {
      const file = join(dir, 'core-api.mjs');
      const entry = pathToFileURL(join(repoRoot, 'dist', 'lib', 'index.js')).href;
      writeFileSync(file, code.replace(/from 'adafisher';/g, `from '${entry}';`));
      const env = { ...process.env };
      delete env.ADAFISHER_BACKEND;
      const r = spawnSync(process.execPath, [file], { encoding: 'utf8', env, timeout: 120_000 });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      expect(r.stdout.trim()).toBe('{ applied: true, refreshed: true }');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the timing example runs as written (on cpu where no GPU is usable: it times with the host clock)', async () => {
    const code = blockAfter('### Backends', 'js');
    expect(code).toContain("const backend = 'cuda';");
    const { backendInfo } = await import('../lib/index.js');
    const backend = backendInfo('auto').cuda.usable ? 'cuda' : 'cpu';
    if (backend === 'cpu') console.log('README timing example: no usable GPU here, run with backend cpu');
    const dir = mkdtempSync(join(tmpdir(), 'adafisher-readme-'));
    try {
      const file = join(dir, 'timing.mjs');
      const entry = pathToFileURL(join(repoRoot, 'dist', 'lib', 'index.js')).href;
      writeFileSync(file, code.replace(/from 'adafisher';/g, `from '${entry}';`).replace("const backend = 'cuda';", `const backend = '${backend}';`));
      const env = { ...process.env };
      delete env.ADAFISHER_BACKEND;
      const r = spawnSync(process.execPath, [file], { encoding: 'utf8', env, timeout: 120_000 });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      expect(r.stdout.trim()).toMatch(/^\d+(\.\d+)?(e-?\d+)? ms of device time$/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the TF.js example and the AdaFisherOptimizer casts type-check with tsc --strict', () => {
    const casts = [...readme.matchAll(/`(\(model\.optimizer as AdaFisherOptimizer\)\.[^`]+)`/g)].map((m) => m[1]);
    expect(casts.length, 'casts shown for layerReport() and attach()').toBeGreaterThanOrEqual(2);
    expect(readme).toContain("`import { type AdaFisherOptimizer } from 'adafisher/tfjs'`");
    const block = blockAfter('### TensorFlow.js', 'js');
    const [imports, body] = [block.split('\n').filter((l) => l.startsWith('import ')), block.split('\n').filter((l) => !l.startsWith('import '))];
    const source = [
      ...imports,
      "import { type AdaFisherOptimizer } from 'adafisher/tfjs';",
      'declare const model: tf.LayersModel;',
      'declare const xs: tf.Tensor, ys: tf.Tensor;',
      ...body,
      ...casts.map((c) => `${c};`),
      'export {};',
    ].join('\n');
    // Inside the package (out/ is git-ignored) so that 'adafisher/tfjs' resolves to this
    // checkout by self-reference and '@tensorflow/tfjs' to its node_modules.
    mkdirSync(join(repoRoot, 'out'), { recursive: true });
    const dir = mkdtempSync(join(repoRoot, 'out', 'readme-'));
    try {
      expectStrictTypeCheck(dir, 'tfjs-example.ts', source);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the custom-loop example type-checks with tsc --strict, and runs: one clipped step, one accumulated step', () => {
    const block = blockAfter('#### Custom training loops', 'js');
    expect(block).toMatch(/computeGradients/);
    const lines = block.split('\n');
    const [imports, body] = [lines.filter((l) => l.startsWith('import ')), lines.filter((l) => !l.startsWith('import '))];
    mkdirSync(join(repoRoot, 'out'), { recursive: true });
    const dir = mkdtempSync(join(repoRoot, 'out', 'readme-'));
    try {
      const ts = [
        ...imports,
        'declare const model: tf.LayersModel;',
        'declare const xs: tf.Tensor, ys: tf.Tensor;',
        'declare const microBatches: [tf.Tensor, tf.Tensor][];',
        'declare function meanLoss(x: tf.Tensor, y: tf.Tensor): tf.Scalar;',
        ...body,
        'export {};',
      ].join('\n');
      expectStrictTypeCheck(dir, 'custom-loop.ts', ts);

      const js = [
        ...imports,
        "await tf.setBackend('cpu');",
        "const model = tf.sequential({ layers: [tf.layers.dense({ inputShape: [4], units: 8, activation: 'relu' }), tf.layers.dense({ units: 3 })] });",
        'const xs = tf.randomNormal([8, 4], 0, 1, "float32", 1), ys = tf.randomNormal([8, 3], 0, 1, "float32", 2);',
        'const microBatches = [[tf.slice(xs, 0, 3), tf.slice(ys, 0, 3)], [tf.slice(xs, 3, 5), tf.slice(ys, 3, 5)]];',
        'const meanLoss = (x, y) => tf.losses.meanSquaredError(y, model.apply(x, { training: true }));',
        ...body,
        'console.log(JSON.stringify({ steps: optimizer.steps, lastStep: optimizer.lastStep, pending: optimizer.pendingStatistics }));',
      ].join('\n');
      writeFileSync(join(dir, 'custom-loop.mjs'), js);
      const env = { ...process.env };
      delete env.ADAFISHER_BACKEND;
      delete env.NODE_OPTIONS;
      const r = spawnSync(process.execPath, [join(dir, 'custom-loop.mjs')], { cwd: repoRoot, encoding: 'utf8', env, timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout.trim().split('\n').pop()!)).toEqual({ steps: 2, lastStep: { applied: true, refreshed: true }, pending: 0 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('every path to ALGORITHM.md cited in the repository exists', () => {
    const cited: string[] = [];
    const walk = (dir: string) => {
      for (const e of readdirSync(dir, { withFileTypes: true })) {
        if (['node_modules', 'dist', 'build', 'out', 'prebuilds'].includes(e.name) || e.name.startsWith('.') || e.name.startsWith('build-')) continue;
        const p = join(dir, e.name);
        if (e.isDirectory()) walk(p);
        else if (/\.(ts|mjs|md|h|cc|cu|py|sh)$/.test(e.name)) {
          for (const m of readFileSync(p, 'utf8').matchAll(/([\w./-]*\/)ALGORITHM\.md/g)) {
            const target = m[1].startsWith('.') ? join(dirname(p), m[1], 'ALGORITHM.md') : join(repoRoot, m[1], 'ALGORITHM.md');
            cited.push(relative(repoRoot, p));
            expect(existsSync(target), `${relative(repoRoot, p)} cites ${m[0]}`).toBe(true);
          }
        }
      }
    };
    walk(repoRoot);
    expect(cited).toContain('native/core/math.h');
    expect(cited).toContain('test/golden/README.md');
  });
});
