// The whole native surface, declared once, and the loader that finds the binary.
// Enum values are mirrored in native/optimizer_wrap.cc (pinned there by static_asserts).
import { closeSync, existsSync, fstatSync, openSync, readdirSync, readSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const LayerKind = { linear: 0, conv2d: 1, batchnorm: 2, layernorm: 3 } as const;
export const WeightLayout = { pytorch: 0, tfjs: 1 } as const;
export const DataFormat = { NCHW: 0, NHWC: 1 } as const;
export const PadMode = { explicit: 0, same: 1 } as const;
export const UpdateRule = { adafisher: 0, adafisherw: 1 } as const;
export const TensorRole = { weight: 0, bias: 1 } as const;
export const FactorWhich = { H: 0, S: 1 } as const;

export type NativeBackendName = 'cpu' | 'cuda';

export interface NativeConfig {
  rule: number;
  lr: number;
  beta: number;
  damping: number;
  decay: number;
  mix: number;
  weightDecay: number;
  tcov: number;
  guard: boolean;
}

export interface NativeLayer {
  kind: number;
  hasBias: boolean;
  inFeatures: number;
  outFeatures: number;
  layout: number;
  format: number;
  kernelH?: number;
  kernelW?: number;
  strideH?: number;
  strideW?: number;
  groups?: number;
  padMode?: number;
  padTop?: number;
  padBottom?: number;
  padLeft?: number;
  padRight?: number;
  /** The index the user knows this layer by, for messages (default: its index here). */
  label?: number;
}

export interface NativeTensor {
  numel: number;
  layer: number;
  role: number;
}

export interface NativeState {
  steps: number;
  stepCounts: number[];
  momenta: Float32Array[];
  factors: Float32Array;
}

/**
 * float32 memory owned by one backend. On cuda, upload and download wait for the backend's
 * queue (they are ordered after the work queued before them and return with the data in
 * place); fill and copyFrom are queued and return at once. On cpu every call completes before
 * it returns. Memory is freed by dispose() or, for a buffer left unreferenced, by the garbage
 * collector. A DeviceBuffer belongs to the thread that created it: sent to a worker with
 * postMessage it arrives as a plain empty object.
 */
export interface NativeDeviceBuffer {
  /** Number of float32 elements. */
  readonly length: number;
  readonly backend: NativeBackendName;
  readonly disposed: boolean;
  /** Copies `data` into elements [offset, offset + data.length); waits on cuda. */
  upload(data: Float32Array, offset?: number): void;
  /** A host copy of the whole buffer (into `into` when given, which must have `length` elements); waits on cuda. */
  download(into?: Float32Array): Float32Array;
  /** Sets every element to `value` (rounded to float32); queued on cuda. */
  fill(value: number): void;
  /** Device-to-device copy from a buffer of the same backend and length; queued on cuda. */
  copyFrom(src: NativeDeviceBuffer): void;
  /**
   * Settles when the work queued on this buffer's backend so far (fills, copies, factor and
   * step kernels) has finished, without blocking the event loop: `synchronize(buffer.backend)`.
   * @throws {Error} code ADAFISHER_DISPOSED after dispose(); the Promise rejects with
   * ADAFISHER_CUDA_ERROR when the device has failed.
   */
  sync(): Promise<void>;
  /** Frees the memory now; later calls other than dispose() throw ADAFISHER_DISPOSED. */
  dispose(): void;
}

export type NativeTensorArg = Float32Array | NativeDeviceBuffer;

export interface NativeTimingEvent {
  readonly backend: NativeBackendName;
  readonly disposed: boolean;
  readonly recorded: boolean;
  record(): void;
  elapsedMs(end: NativeTimingEvent): number;
  dispose(): void;
}

/** One input (which 0: H) or output gradient (which 1: S) of a layer, for recordFactors. */
export interface NativeFactorRecord {
  layer: number;
  which: number;
  data: NativeTensorArg;
  shape: number[];
}

export interface NativeOptimizer {
  readonly steps: number;
  readonly disposed: boolean;
  readonly backend: NativeBackendName;
  recordInput(layer: number, data: NativeTensorArg, shape: number[]): void;
  recordOutputGrad(layer: number, data: NativeTensorArg, shape: number[]): void;
  recordFactors(records: NativeFactorRecord[]): void;
  /** Both are checked before either is written; at least one must be given. */
  setFactors(layer: number, H: NativeTensorArg | null | undefined, S: NativeTensorArg | null | undefined): void;
  /** Each layer's running factors as the statistics of the next step; all indices checked first. */
  reuseRunningFactors(layers: number[]): void;
  step(params: NativeTensorArg[], grads: (NativeTensorArg | null)[]): { applied: boolean; refreshed: boolean };
  willRefresh(): boolean;
  setLearningRate(lr: number): void;
  exportState(): NativeState;
  importState(state: NativeState): void;
  factorLayout(): { hOffset: number; hLength: number; sOffset: number; sLength: number }[];
  dispose(): void;
}

export interface NativeBackendInfo {
  cudaCompiled: boolean;
  cudaUsable: boolean;
  cudaReason: string;
  deviceName: string;
  computeCapability: string;
  /** Total memory of the device in bytes; 0 when no device. */
  deviceMemory: number;
  driverVersion: number;
  runtimeVersion: number;
  cudaArchitectures: string;
  cpuThreads: number;
  napiVersion: number;
}

export interface NativeBinding {
  version: string;
  buildSystem: string;
  /** SHA-256 of the native sources it was compiled from (CMake builds; "" from node-gyp): NOTE: [prebuild stamp]. */
  sourceHash: string;
  backendInfo(): NativeBackendInfo;
  liveAllocations(backend: NativeBackendName): number;
  synchronize(backend: NativeBackendName): Promise<void>;
  DeviceBuffer: new (backend: NativeBackendName, lengthOrData: number | Float32Array) => NativeDeviceBuffer;
  /** Whether `value` is a DeviceBuffer of this addon, by its type tag: runs no JS, never throws. */
  isDeviceBuffer(value: unknown): value is NativeDeviceBuffer;
  NativeOptimizer: new (
    backend: NativeBackendName,
    config: NativeConfig,
    layers: NativeLayer[],
    tensors: NativeTensor[],
  ) => NativeOptimizer;
  TimingEvent: new (backend: NativeBackendName) => NativeTimingEvent;
}

/** The package root (holds package.json), from dist/lib/ or lib/. */
export const packageRoot: string = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return dir;
})();

const require = createRequire(import.meta.url);

function packageVersion(): string {
  return (require(join(packageRoot, 'package.json')) as { version: string }).version;
}

/** One place the loader looks; `skip` says why it is not tried when it is not. */
export interface AddonCandidate {
  path: string;
  source: 'ADAFISHER_ADDON' | 'local build' | 'prebuilt';
  skip?: string;
}

interface PrebuildTags {
  file: string;
  runtime?: string;
  napi?: boolean;
  abi?: string;
  libc?: string;
  specificity: number;
}
interface NodeGypBuild {
  parseTags(file: string): PrebuildTags | undefined;
  matchTags(runtime: string, abi: string): (tags: PrebuildTags | undefined) => boolean;
  compareTags(runtime: string): (a: PrebuildTags, b: PrebuildTags) => number;
}

/** The C library node-gyp-build matches prebuilds against (LIBC overrides, as there). */
export function hostLibc(): string {
  if (process.platform !== 'linux') return '';
  return process.env.LIBC || (existsSync('/etc/alpine-release') ? 'musl' : 'glibc');
}

/** The prebuilds folder for this platform and arch. */
export function prebuildDir(): string {
  return join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`);
}

/**
 * Where the loader looks, in order: $ADAFISHER_ADDON alone when set; else the local build
 * (build/Release) and then the prebuilds of this platform-arch that node-gyp-build's tag
 * rules accept (prebuildify names N-API builds `<name>[.<libc>].node`), most specific first.
 */
export function addonCandidates(): AddonCandidate[] {
  if (process.env.ADAFISHER_ADDON) return [{ path: resolve(process.env.ADAFISHER_ADDON), source: 'ADAFISHER_ADDON' }];
  const out: AddonCandidate[] = [{ path: join(packageRoot, 'build', 'Release', 'adafisher.node'), source: 'local build' }];
  const dir = prebuildDir();
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.node')) : [];
  if (files.length === 0) {
    // The name prebuildify gives this platform's binary (libc-tagged on Linux).
    out.push({ path: join(dir, hostLibc() ? `adafisher.${hostLibc()}.node` : 'adafisher.node'), source: 'prebuilt' });
    return out;
  }
  const ngb = require('node-gyp-build') as NodeGypBuild;
  const runtime = 'node';
  const abi = process.versions.modules;
  const match = ngb.matchTags(runtime, abi);
  const tagged = files.map((f) => ngb.parseTags(f)).filter((t): t is PrebuildTags => t !== undefined);
  for (const t of tagged.filter(match).sort(ngb.compareTags(runtime))) out.push({ path: join(dir, t.file), source: 'prebuilt' });
  for (const t of tagged.filter((t) => !match(t))) {
    const why = t.libc && t.libc !== hostLibc() ? `built for ${t.libc}, this system uses ${hostLibc()}` : 'built for another runtime or ABI';
    out.push({ path: join(dir, t.file), source: 'prebuilt', skip: why });
  }
  return out;
}

let loaded: { binding: NativeBinding; path: string } | undefined;

/**
 * Why a 64-bit little-endian ELF file is shorter than its own headers say, or null (also for
 * anything that is not such a file: require() then reports it). dlopen maps a truncated
 * library's segments past the end of the file and the process dies of SIGBUS when it touches
 * them, before any error can be thrown, so this is checked first.
 */
export function truncatedElf(path: string): string | null {
  let fd: number | undefined;
  try {
    fd = openSync(path, 'r');
    const size = fstatSync(fd).size;
    const head = Buffer.alloc(64);
    if (readSync(fd, head, 0, 64, 0) < 64) return null;
    if (head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2 || head[5] !== 1) return null;
    const phoff = Number(head.readBigUInt64LE(0x20));
    const shoff = Number(head.readBigUInt64LE(0x28));
    const phentsize = head.readUInt16LE(0x36), phnum = head.readUInt16LE(0x38);
    const shentsize = head.readUInt16LE(0x3a), shnum = head.readUInt16LE(0x3c);
    let need = Math.max(phoff + phentsize * phnum, shnum > 0 ? shoff + shentsize * shnum : 0);
    if (need <= size && phentsize >= 40) {
      const ph = Buffer.alloc(phentsize * phnum);
      readSync(fd, ph, 0, ph.length, phoff);
      for (let i = 0; i < phnum; i++) {
        const at = i * phentsize;
        need = Math.max(need, Number(ph.readBigUInt64LE(at + 8)) + Number(ph.readBigUInt64LE(at + 32)));
      }
    }
    return need > size ? `truncated: ${size} bytes, its headers describe ${need}` : null;
  } catch {
    return null;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

// NOTE: [addon loading]
// A local build (build/Release) is used only when it was built from this package version
// (the version is compiled into the binary): a stale build left from an older checkout or
// install never shadows the prebuilt binary shipped with a newer package. Prebuilds are
// chosen by node-gyp-build's own tag rules, so the loader agrees with what `npm install`
// (the `node-gyp-build` install script) decided was loadable. $ADAFISHER_ADDON, when set, is
// the only candidate: a test that asks for a particular binary (the sanitizer build) must
// fail rather than silently run another one. Every path tried and why it failed is
// reported, with how to fix it.
export function loadBinding(): { binding: NativeBinding; path: string } {
  if (loaded) return loaded;
  const version = packageVersion();
  const tried: string[] = [];
  for (const { path, source, skip } of addonCandidates()) {
    if (skip) {
      tried.push(`${source} ${path}: ${skip} (skipped)`);
      continue;
    }
    if (!existsSync(path)) {
      tried.push(`${source} ${path}: not found`);
      continue;
    }
    const cut = truncatedElf(path);
    if (cut !== null) {
      tried.push(`${source} ${path}: ${cut} (a damaged or partly downloaded file; skipped)`);
      continue;
    }
    try {
      const b = require(path) as NativeBinding;
      if (b.version !== version && source !== 'ADAFISHER_ADDON') {
        tried.push(`${source} ${path}: built for adafisher ${b.version}, this is ${version} (stale, skipped)`);
        continue;
      }
      loaded = { binding: b, path };
      return loaded;
    } catch (e) {
      tried.push(`${source} ${path}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  const libc = hostLibc();
  const err = new Error(
    `Could not load the adafisher native addon for ${process.platform}-${process.arch}${libc ? ` (${libc})` : ''}, ` +
      `Node ${process.versions.node} (N-API ${process.versions.napi}).\nTried:\n  ${tried.join('\n  ')}\n` +
      (process.env.ADAFISHER_ADDON
        ? 'Fix: point ADAFISHER_ADDON at a built adafisher.node, or unset it to use the installed binary.'
        : `Fix: reinstall it, \`rm -rf node_modules/adafisher && npm install\` (prebuilt binaries exist for linux-x64 glibc; ` +
          `a plain \`npm install\` keeps a package it thinks is installed), or build from source with a C++17 compiler and ` +
          `Python: \`npm_config_build_from_source=true npm rebuild adafisher\` (CPU only, node-gyp; ` +
          `where npm skips dependencies' install scripts until approved, first \`npm install-scripts approve adafisher\`) or, ` +
          `in a checkout, \`npm run build:native\` (CMake, CUDA when nvcc is present).`),
  ) as Error & { code: string };
  err.code = 'ADAFISHER_ADDON_NOT_FOUND';
  throw err;
}

export function binding(): NativeBinding {
  return loadBinding().binding;
}
