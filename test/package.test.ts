// The published package, end to end: `npm pack` yields exactly the files a user needs, and
// installing the tarball into a fresh project with no compiler, nvcc, cmake or python on
// PATH loads the prebuilt binary (nothing is compiled at install), `adafisher info` reports
// it, and a golden trajectory replays. The loader's rules are checked in that install: a
// stale local build never shadows the prebuild, and a failed load says what was tried.
//
// The prebuild must exist before this runs (`npm run prebuild:binary`, several minutes for
// the full CUDA build). When it does not and build/Release holds a current cmake-js build,
// this suite packs that binary through the same wrapper (ADAFISHER_PREBUILD_REUSE; seconds).
import { execFileSync, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';

// @ts-expect-error: a plain .mjs script, no declarations
import { sourceHash, stampPath } from '../scripts/source-hash.mjs';
import { ensureDist } from './workers/ensure-dist.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { name: string; version: string };
const platformDir = `${process.platform}-${process.arch}`;
const prebuildName = 'adafisher.glibc.node';

// What the tarball may hold (besides package.json, README*, LICENSE*, which npm always adds).
const ALLOWED = [
  /^package\.json$/,
  /^README(\.md)?$/,
  /^LICENSE(\.md|\.txt)?$/,
  /^dist\/lib\/.*\.(js|d\.ts)$/,
  /^dist\/bench\/(cases|common|cpu|gpu|gpu-report)\.js$/, // `adafisher bench`
  /^bench\/(torch_baselines\.py|README\.md)$/, // its PyTorch baselines and its method
  /^prebuilds\/[a-z0-9]+-[a-z0-9]+\/[^/]+\.node$/,
  /^binding\.gyp$/,
  /^scripts\/install\.mjs$/, // the install step (NOTE: [offline source build])
  /^native\/.*\.(cc|h)$/,
  /^test\/golden\/[^/]+\.json$/, // data of `adafisher demo`
  /^test\/golden\/README\.md$/, // their format, which the README cites
  /^docs\/ALGORITHM\.md$/, // the math, which the code and the README cite
  /^docs\/mnist-demo\.svg$/, // the plot the README shows
];
const REQUIRED = [
  'package.json',
  'binding.gyp',
  'scripts/install.mjs',
  'native/addon.cc',
  'native/core/cuda_stub.cc',
  'dist/lib/index.js',
  'dist/lib/index.d.ts',
  'dist/lib/cli.js',
  'dist/lib/binding.js',
  'dist/bench/cpu.js',
  'dist/bench/gpu.js',
  'bench/torch_baselines.py',
  `prebuilds/${platformDir}/${prebuildName}`,
  'test/golden/mlp_adafisher.json',
  'test/golden/README.md',
  'docs/ALGORITHM.md',
  // the README's plot, which it shows from the installed package too
  'docs/mnist-demo.svg',
];

let work = '';
let tarball = '';
let packedFiles: { path: string; size: number }[] = [];
let packedSize = 0;
let consumer = '';
let env: NodeJS.ProcessEnv = {};

function run(cmd: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv; timeout?: number }): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, encoding: 'utf8', timeout: opts.timeout ?? 300_000 });
}

function ok(r: SpawnSyncReturns<string>, what: string): string {
  if (r.status !== 0) throw new Error(`${what} exited with ${r.status ?? r.signal}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`);
  return r.stdout;
}

// The tarball needs prebuilds/<platform>-<arch>/: packed from build/Release when that is the
// cmake-js build (CI builds it first), else compiled here by the same wrapper (a fresh
// cmake-js build for every default CUDA architecture, minutes on 2 cores; CPU-only where
// there is no nvcc) — e.g. right after `npm install`, whose build/Release is node-gyp's.
// A prebuild whose stamp does not match this checkout's native sources (NOTE: [prebuild
// stamp] in scripts/source-hash.mjs) is built again: the tarball must carry current code.
function ensurePrebuild(): void {
  const dir = join(root, 'prebuilds', platformDir);
  const stamp = stampPath(join(dir, prebuildName)) as string;
  const current = existsSync(stamp) && (JSON.parse(readFileSync(stamp, 'utf8')) as { sources: string }).sources === sourceHash(root);
  if (existsSync(join(dir, prebuildName)) && current) return;
  if (existsSync(join(dir, prebuildName))) console.log('package test: the prebuild in prebuilds/ was built from other sources; building it again');
  const local = join(root, 'build', 'Release', 'adafisher.node');
  const probe = existsSync(local)
    ? run(process.execPath, ['-p', `const b = require(${JSON.stringify(local)}); b.buildSystem + ' ' + b.sourceHash`], { cwd: root })
    : undefined;
  // Reused only when built from these very sources (scripts/prebuild.mjs checks it too).
  const reuse = probe?.status === 0 && probe.stdout.trim() === `cmake-js ${sourceHash(root) as string}`;
  const haveNvcc = spawnSync('sh', ['-c', 'command -v nvcc']).status === 0;
  if (!reuse) console.log(`package test: no cmake-js build to pack; compiling one with scripts/prebuild.mjs${haveNvcc ? ' (CUDA, all architectures)' : ' (CPU only: no nvcc)'}`);
  ok(
    run(process.execPath, [join(root, 'scripts', 'prebuild.mjs')], {
      cwd: root,
      env: {
        ...process.env,
        ...(reuse ? { ADAFISHER_PREBUILD_REUSE: local } : {}),
        ...(haveNvcc ? {} : { ADAFISHER_PREBUILD_ALLOW_CPU: '1' }),
      },
      timeout: 900_000,
    }),
    reuse ? 'scripts/prebuild.mjs (reusing build/Release)' : 'scripts/prebuild.mjs (cmake-js build)',
  );
}

// A PATH holding only node, npm, npx and sh (npm runs scripts with `sh -c`): no
// cc/c++/make/python/cmake/nvcc can be found, so any attempt to compile fails the install.
function barePath(): string {
  const bin = join(work, 'bin');
  mkdirSync(bin);
  const nodeDir = dirname(process.execPath);
  symlinkSync(process.execPath, join(bin, 'node'));
  symlinkSync('/bin/sh', join(bin, 'sh'));
  for (const tool of ['npm', 'npx']) {
    const p = join(nodeDir, tool);
    if (!existsSync(p)) throw new Error(`${tool} not found next to ${process.execPath}`);
    symlinkSync(p, join(bin, tool));
  }
  return bin;
}

/** What the prebuild's stamp says (after ensurePrebuild): a CPU-only one where there is no nvcc. */
let prebuiltCuda = true;

beforeAll(() => {
  ensurePrebuild();
  prebuiltCuda = (JSON.parse(readFileSync(stampPath(join(root, 'prebuilds', platformDir, prebuildName)) as string, 'utf8')) as { cuda: boolean }).cuda;
  if (!prebuiltCuda) console.log('package test: no nvcc here, so the prebuild is CPU-only: its CUDA checks expect "CUDA compiled: no", and `npm pack` refuses it');
  ensureDist();
  work = mkdtempSync(join(tmpdir(), 'adafisher-pack-'));
  // --ignore-scripts: `prepare` would run tsc while other suites read dist/; ensureDist did it.
  const out = ok(run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', work], { cwd: root }), 'npm pack');
  const info = JSON.parse(out.slice(out.indexOf('['))) as { filename: string; size: number; files: { path: string; size: number }[] }[];
  tarball = join(work, info[0].filename);
  packedFiles = info[0].files;
  packedSize = info[0].size;

  consumer = join(work, 'consumer');
  mkdirSync(consumer);
  writeFileSync(join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  // A minimal environment: nothing from the developer's shell (ADAFISHER_*, npm_config_*,
  // CUDA paths) reaches the install; HOME keeps the npm cache that `npm ci` filled.
  env = { PATH: barePath(), HOME: process.env.HOME, TMPDIR: tmpdir(), LANG: 'C.UTF-8' };
  if (process.env.npm_config_cache) env.npm_config_cache = process.env.npm_config_cache;
  const install = run(
    'npm',
    ['install', tarball, '--prefer-offline', '--no-audit', '--no-fund', '--foreground-scripts', '--loglevel=error'],
    { cwd: consumer, env: { ...env, PATH: env.PATH } },
  );
  ok(install, 'npm install <tarball> with no compiler on PATH');
}, 1_200_000);

afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('npm pack', () => {
  test('holds the prebuilds, compiled JS, declarations and from-source sources, and nothing else', () => {
    const paths = packedFiles.map((f) => f.path);
    const stray = paths.filter((p) => !ALLOWED.some((re) => re.test(p)));
    expect(stray, 'files that should not be published').toEqual([]);
    for (const p of REQUIRED) expect(paths, `tarball lacks ${p}`).toContain(p);
    // Of scripts/, only the install step ships.
    for (const p of paths) expect(p).not.toMatch(/^(test\/.*\.ts|build[-/]|cuda\/|lib\/|bench\/(?!torch_baselines\.py$|README\.md$)|scripts\/(?!install\.mjs$)|\.ci\/)|\.map$/);
    // Every source binding.gyp compiles ships.
    const gyp = readFileSync(join(root, 'binding.gyp'), 'utf8');
    for (const src of gyp.match(/native\/[\w/]+\.cc/g) ?? []) expect(paths).toContain(src);
    // The compressed tarball is dominated by the prebuild; keep it well under npm's comfort zone.
    expect(packedSize).toBeLessThan(64 * 1024 * 1024);
    console.log(`adafisher tarball: ${packedFiles.length} files, ${(packedSize / 1e6).toFixed(2)} MB compressed`);
  });
});

describe('npm pack refuses a prebuild not built from these sources (prepack)', () => {
  test('the prebuilt binary carries the hash of these sources, computed by CMake as scripts/source-hash.mjs does', () => {
    const binary = join(root, 'prebuilds', platformDir, prebuildName);
    const embedded = ok(run(process.execPath, ['-p', `require(${JSON.stringify(binary)}).sourceHash`], { cwd: root }), 'sourceHash').trim();
    expect(embedded).toMatch(/^[0-9a-f]{64}$/);
    expect(embedded).toBe(sourceHash(root));
  });

  test('the checkout\'s prebuild passes; after a native source changes, or without its stamp, it does not', () => {
    const check = (dir: string, ...args: string[]) =>
      run(process.execPath, [join(dir, 'scripts', 'check-prebuild.mjs'), ...args], {
        cwd: dir,
        env: { ...process.env, ADAFISHER_PREBUILD_ALLOW_CPU: prebuiltCuda ? '' : '1' },
      });
    const good = check(root);
    expect(good.status, good.stderr).toBe(0);
    expect(good.stdout).toContain(`prebuilds/${platformDir}/${prebuildName} built from these sources`);
    // A copy of what the hash covers, with the prebuild and its stamp.
    const copy = mkdtempSync(join(tmpdir(), 'adafisher-prepack-'));
    try {
      for (const p of ['native', 'cuda', 'scripts', 'prebuilds', 'CMakeLists.txt', 'binding.gyp', 'package.json']) cpSync(join(root, p), join(copy, p), { recursive: true });
      expect(check(copy).status).toBe(0);
      const math = join(copy, 'native', 'core', 'math.h');
      writeFileSync(math, `${readFileSync(math, 'utf8')}\n// edited\n`);
      const edited = check(copy);
      expect(edited.status).toBe(1);
      expect(edited.stderr).toMatch(new RegExp(`prebuilds/${platformDir}/${prebuildName.replace(/\./g, '\\.')} was built from other native sources than this checkout's`));
      rmSync(stampPath(join(copy, 'prebuilds', platformDir, prebuildName)) as string);
      expect(check(copy).stderr).toMatch(/has no stamp .*not made by `npm run prebuild:binary`/);
      // No prebuilt binary at all (a clone, or npm installing a git dependency): pack warns and
      // goes on (the tarball builds from source); publish refuses.
      rmSync(join(copy, 'prebuilds'), { recursive: true });
      const bare = check(copy);
      expect(bare.status, bare.stderr).toBe(0);
      expect(bare.stderr).toMatch(/no prebuilt binary in prebuilds\/: this tarball installs by building from source/);
      const publish = check(copy, '--publish');
      expect(publish.status).toBe(1);
      expect(publish.stderr).toMatch(/not packing:\n {2}no prebuilt binary in prebuilds\//);
    } finally {
      rmSync(copy, { recursive: true, force: true });
    }
  });
});

describe('installed from the tarball without a compiler', () => {
  const installed = () => join(consumer, 'node_modules', 'adafisher');

  test('nothing was compiled: the prebuild is there and no build/ folder was made', () => {
    expect(existsSync(join(installed(), 'prebuilds', platformDir, prebuildName))).toBe(true);
    expect(existsSync(join(installed(), 'build'))).toBe(false);
    for (const tool of ['cc', 'gcc', 'g++', 'c++', 'make', 'python3', 'cmake', 'nvcc']) {
      expect(readdirSync(env.PATH!)).not.toContain(tool);
    }
  });

  test('imports and loads the prebuilt binary', () => {
    const code = `
      import { backendInfo, liveAllocations } from 'adafisher';
      const r = backendInfo();
      console.log(JSON.stringify({ path: r.addonPath, version: r.addonVersion, build: r.buildSystem, backend: r.backend, live: liveAllocations('cpu') }));`;
    const r = JSON.parse(ok(run('node', ['--input-type=module', '-e', code], { cwd: consumer, env }), 'import adafisher'));
    expect(relative(installed(), r.path)).toBe(join('prebuilds', platformDir, prebuildName));
    expect(r.version).toBe(pkg.version);
    expect(r.build).toBe('cmake-js');
    expect(['cpu', 'cuda']).toContain(r.backend);
  });

  test("a program's declarations can name the package's types (no TS2742), and optional fields take undefined under exactOptionalPropertyTypes", () => {
    const dir = join(consumer, 'decl');
    mkdirSync(dir, { recursive: true });
    writeFileSync(
      join(dir, 'helpers.ts'),
      [
        "import { AdaFisher, createBuffer, createTimingEvent, readGolden } from 'adafisher';",
        'export const buffer = () => createBuffer(3);',
        'export const event = () => createTimingEvent();',
        'export const backendOf = (o: AdaFisher) => o.backend;',
        'export const layersOf = (file: string) => readGolden(file).layers;',
        // Optional fields take undefined, as they do at run time (exactOptionalPropertyTypes below).
        'export const make = (lr: number | undefined, bias: Float32Array | undefined) =>',
        "  new AdaFisher([{ kind: 'linear', inFeatures: 2, outFeatures: 1, weight: new Float32Array(2), bias, layout: undefined }], { lr, backend: undefined });",
        'export const record = (o: AdaFisher, input: Float32Array | undefined) => o.recordFactors([{ layer: 0, input, inputShape: [1, 2] }]);',
        'export const bufferOn = () => createBuffer(3, { backend: undefined });',
      ].join('\n'),
    );
    writeFileSync(
      join(dir, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: { target: 'ES2022', module: 'nodenext', moduleResolution: 'nodenext', strict: true, exactOptionalPropertyTypes: true, skipLibCheck: true, declaration: true, emitDeclarationOnly: true, outDir: 'out' },
        files: ['helpers.ts'],
      }),
    );
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }));
    ok(run('node', [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { cwd: dir, env }), 'tsc --declaration');
    const emitted = readFileSync(join(dir, 'out', 'helpers.d.ts'), 'utf8');
    for (const name of ['DeviceBuffer', 'TimingEvent', 'NativeBackendName', 'GoldenLayer']) expect(emitted).toContain(`import("adafisher").${name}`);
  });

  test('`npx adafisher info` reports version, backend and why, CUDA architectures and CPU threads', () => {
    const text = ok(run('npx', ['--no-install', 'adafisher', 'info'], { cwd: consumer, env }), 'adafisher info');
    console.log(text);
    expect(text).toContain(`adafisher ${pkg.version}`);
    expect(text).toMatch(/backend: +(cpu|cuda)/);
    expect(text).toMatch(prebuiltCuda ? /CUDA compiled: +yes, architectures \S+/ : /CUDA compiled: +no/);
    expect(text).toMatch(/GPU: +(none usable|.+, compute capability \d+\.\d+)/);
    expect(text).toMatch(/CPU threads: +[1-9]\d*/);
    const j = JSON.parse(ok(run('npx', ['--no-install', 'adafisher', 'info', '--json'], { cwd: consumer, env }), 'info --json'));
    expect(j.version).toBe(pkg.version);
    expect(j.cuda.compiled).toBe(prebuiltCuda);
    if (prebuiltCuda) expect(j.cuda.architectures).not.toBe('');
    if (j.backend === 'cpu') expect(j.reason).not.toBe(''); // says why CUDA is not used
    else expect(j.cuda.computeCapability).toMatch(/^\d+\.\d+$/);
    expect(j.cpuThreads).toBeGreaterThan(0);
  });

  test('replays a golden trajectory through the installed package', () => {
    const golden = join(installed(), 'test', 'golden', 'mlp_adafisher.json');
    const report = JSON.parse(ok(run('npx', ['--no-install', 'adafisher', 'replay', golden, '--backend', 'cpu'], { cwd: consumer, env }), 'replay'));
    expect(report.pass).toBe(true);
    expect(ok(run('npx', ['--no-install', 'adafisher', 'demo'], { cwd: consumer, env }), 'demo')).toContain('All match.');
  });

  test('`npx adafisher bench` runs the shipped benchmark on the installed addon (the cpu one here: tiny, one rep)', () => {
    const args = ['--no-install', 'adafisher', 'bench', 'cpu', '--cases', 'tiny', '--reps', '1', '--no-torch', '--json'];
    const j = JSON.parse(ok(run('npx', args, { cwd: consumer, env }), 'adafisher bench cpu'));
    expect(j.machine.addon).toBe(`${pkg.version} (cmake-js)`);
    expect(j.bandwidth.copyGBps).toBeGreaterThan(0);
    expect(j.workloads.tiny.step.guardOn.warm.timing.ms).toBeGreaterThan(0);
    const usage = ok(run('npx', ['--no-install', 'adafisher', 'bench', 'gpu', '--help'], { cwd: consumer, env }), 'bench gpu --help');
    expect(usage).toMatch(/^Usage: adafisher bench gpu \[options\]/);
  });

  // see NOTE: [addon loading] in lib/binding.ts
  test('a stale local build (older version) does not shadow the prebuild; a current one is used', () => {
    const release = join(installed(), 'build', 'Release');
    mkdirSync(release, { recursive: true });
    const prebuild = readFileSync(join(installed(), 'prebuilds', platformDir, prebuildName));
    // The version is compiled in as a NUL-terminated string: rewrite it in a copy to make an
    // "old" build of the same length (0.1.0 -> 0.0.0).
    const current = Buffer.from(`\0${pkg.version}\0`);
    const at = prebuild.indexOf(current);
    expect(at, 'version string in the binary').toBeGreaterThanOrEqual(0);
    expect(prebuild.indexOf(current, at + 1), 'version string occurs once').toBe(-1);
    const stale = Buffer.from(prebuild);
    const old = `\0${pkg.version.replace(/\d/g, '0')}\0`;
    stale.write(old, at, 'latin1');
    const local = join(release, 'adafisher.node');
    writeFileSync(local, stale);
    try {
      const code = `import { backendInfo } from 'adafisher'; const r = backendInfo(); console.log(JSON.stringify([r.addonPath, r.addonVersion]));`;
      const [path, version] = JSON.parse(ok(run('node', ['--input-type=module', '-e', code], { cwd: consumer, env }), 'stale'));
      expect(relative(installed(), path)).toBe(join('prebuilds', platformDir, prebuildName));
      expect(version).toBe(pkg.version);
      // A local build of this very version (what the from-source fallback produces) wins.
      copyFileSync(join(installed(), 'prebuilds', platformDir, prebuildName), local);
      const [path2] = JSON.parse(ok(run('node', ['--input-type=module', '-e', code], { cwd: consumer, env }), 'current'));
      expect(path2).toBe(local);
    } finally {
      rmSync(join(installed(), 'build'), { recursive: true, force: true });
    }
  });

  test('when no binary loads, the error lists what was tried and how to fix it', () => {
    const release = join(installed(), 'build', 'Release');
    mkdirSync(release, { recursive: true });
    writeFileSync(join(release, 'adafisher.node'), 'not an ELF file');
    try {
      const code = `import { backendInfo } from 'adafisher';
        try { backendInfo(); console.log('loaded'); } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); }`;
      // LIBC=musl is node-gyp-build's own override: the glibc prebuild no longer matches.
      const r = JSON.parse(ok(run('node', ['--input-type=module', '-e', code], { cwd: consumer, env: { ...env, LIBC: 'musl' } }), 'no binary'));
      expect(r.code).toBe('ADAFISHER_ADDON_NOT_FOUND');
      expect(r.message).toContain(`${platformDir} (musl)`);
      expect(r.message).toContain(join(release, 'adafisher.node'));
      expect(r.message).toMatch(/prebuilt .*adafisher\.glibc\.node: built for glibc, this system uses musl/);
      expect(r.message).toMatch(/Fix: reinstall it, `rm -rf node_modules\/adafisher && npm install`.*`npm_config_build_from_source=true npm rebuild adafisher`/);
      expect(r.message).toContain('npm install-scripts approve adafisher');
    } finally {
      rmSync(join(installed(), 'build'), { recursive: true, force: true });
    }
  });

  test('the install script (node-gyp-build) accepts the prebuild without building', () => {
    // Exactly what `npm install` ran: exits 0 only when a prebuild (or build) loads.
    const pkgDir = installed();
    const test = run('node', [join(consumer, 'node_modules', 'node-gyp-build', 'build-test.js')], { cwd: pkgDir, env });
    ok(test, 'node-gyp-build-test');
    const resolved = execFileSync('node', ['-e', "console.log(require('node-gyp-build').path('.'))"], { cwd: pkgDir, env, encoding: 'utf8' }).trim();
    expect(relative(pkgDir, resolved)).toBe(join('prebuilds', platformDir, prebuildName));
  });
});
