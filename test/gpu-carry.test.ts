// scripts/test-modules.mjs decides what of node_modules travels to the GPU machine for the
// GPU check's vitest stage (there is no npm there). A lockfile change that it mishandles
// would only show on a lent GPU, so its list is checked here against the installed tree.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');

function listed(): string[] {
  const out = execFileSync(process.execPath, ['scripts/test-modules.mjs'], { cwd: root, encoding: 'utf8' });
  return out.split('\n').filter(Boolean);
}

/** The package directory a listed file belongs to (node_modules/a, node_modules/@s/a, nested too). */
function packageDir(file: string): string {
  const m = /^(.*node_modules\/(?:@[^/]+\/)?[^/]+)\//.exec(file);
  if (!m) throw new Error(`not under node_modules: ${file}`);
  return m[1];
}

describe('the GPU check carries what the test suite loads (scripts/test-modules.mjs)', () => {
  const files = listed();
  const set = new Set(files);
  const dirs = new Set(files.map(packageDir));

  it('lists existing files only, each package with its package.json', () => {
    expect(files.length).toBeGreaterThan(100);
    expect(files.filter((f) => !existsSync(join(root, f)))).toEqual([]);
    expect([...dirs].filter((d) => !set.has(`${d}/package.json`))).toEqual([]);
  });

  it("holds the entry points the suite starts from, and TF.js's Node bundles and wasm binaries", () => {
    for (const f of ['node_modules/vitest/vitest.mjs', 'node_modules/vite/package.json', 'node_modules/fast-check/package.json']) {
      expect(set.has(f), f).toBe(true);
    }
    for (const name of ['tfjs', 'tfjs-core', 'tfjs-layers', 'tfjs-backend-cpu', 'tfjs-backend-wasm']) {
      const dir = `node_modules/@tensorflow/${name}`;
      const main = JSON.parse(readFileSync(join(root, dir, 'package.json'), 'utf8')).main as string;
      expect(set.has(join(dir, main)), `${dir} main ${main}`).toBe(true);
    }
    expect(files.some((f) => /tfjs-backend-wasm\/dist\/.*\.wasm$/.test(f))).toBe(true);
  });

  it('is closed: every dependency of a listed package that is installed is listed too', () => {
    const missing: string[] = [];
    for (const dir of dirs) {
      const pkg = JSON.parse(readFileSync(join(root, dir, 'package.json'), 'utf8')) as {
        dependencies?: Record<string, string>;
        optionalDependencies?: Record<string, string>;
      };
      for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies })) {
        if (dep.startsWith('@types/')) continue;
        // Node's lookup: nested node_modules first, then each parent's, then the top.
        const candidates = [`${dir}/node_modules/${dep}`];
        for (let d = dir; d.includes('/node_modules/'); ) {
          d = d.slice(0, d.lastIndexOf('/node_modules/'));
          candidates.push(`${d}/node_modules/${dep}`);
        }
        candidates.push(`node_modules/${dep}`);
        const found = candidates.find((c) => existsSync(join(root, c, 'package.json')));
        if (found && !dirs.has(found)) missing.push(`${dir} -> ${found}`);
      }
    }
    expect(missing).toEqual([]);
  });
});
