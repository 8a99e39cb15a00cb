// Worker threads and the packed tarball run the compiled JS in dist/, not the TypeScript
// sources vitest transforms. `npm test` compiles first (build:ts); when a suite is run on
// its own, recompile here if any lib/ source is newer than its output.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

function staleOutputs(): string[] {
  const out: string[] = [];
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) {
        const js = join(repoRoot, 'dist', relative(repoRoot, p)).replace(/\.ts$/, '.js');
        if (!existsSync(js) || statSync(js).mtimeMs < statSync(p).mtimeMs) out.push(relative(repoRoot, p));
      }
    }
  };
  walk(join(repoRoot, 'lib'));
  return out;
}

/** Makes dist/lib current; throws naming the sources whose output is still missing or old. */
export function ensureDist(): void {
  if (staleOutputs().length === 0) return;
  // tsc emits even when it reports type errors elsewhere in the tree; what matters here is
  // that every output is current, checked again below.
  const r = spawnSync(process.execPath, [join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], {
    cwd: repoRoot,
    encoding: 'utf8',
  });
  const still = staleOutputs();
  if (still.length > 0) throw new Error(`dist/ is stale for ${still.join(', ')} after tsc:\n${r.stdout}${r.stderr}`);
}
