// The whole native surface, declared once, and the loader that finds the binary.
// Enum values are mirrored in native/optimizer_wrap.cc (pinned there by static_asserts).
import { existsSync, readdirSync } from 'node:fs';
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

export interface NativeDeviceBuffer {
  readonly length: number;
  readonly backend: NativeBackendName;
  readonly disposed: boolean;
  upload(data: Float32Array, offset?: number): void;
  download(into?: Float32Array): Float32Array;
  fill(value: number): void;
  dispose(): void;
}

export type NativeTensorArg = Float32Array | NativeDeviceBuffer;

export interface NativeOptimizer {
  readonly steps: number;
  readonly disposed: boolean;
  readonly backend: NativeBackendName;
  recordInput(layer: number, data: NativeTensorArg, shape: number[]): void;
  recordOutputGrad(layer: number, data: NativeTensorArg, shape: number[]): void;
  setFactor(layer: number, which: number, data: NativeTensorArg): void;
  step(params: NativeTensorArg[], grads: (NativeTensorArg | null)[]): { applied: boolean; refreshed: boolean };
  willRefresh(): boolean;
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
  driverVersion: number;
  runtimeVersion: number;
  cudaArchitectures: string;
  cpuThreads: number;
  napiVersion: number;
}

export interface NativeBinding {
  version: string;
  buildSystem: string;
  backendInfo(): NativeBackendInfo;
  liveAllocations(backend: NativeBackendName): number;
  synchronize(backend: NativeBackendName): Promise<void>;
  DeviceBuffer: new (backend: NativeBackendName, lengthOrData: number | Float32Array) => NativeDeviceBuffer;
  NativeOptimizer: new (
    backend: NativeBackendName,
    config: NativeConfig,
    layers: NativeLayer[],
    tensors: NativeTensor[],
  ) => NativeOptimizer;
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

/** Where the loader looks, in order. */
export function addonCandidates(): string[] {
  const out: string[] = [];
  if (process.env.ADAFISHER_ADDON) out.push(resolve(process.env.ADAFISHER_ADDON));
  out.push(join(packageRoot, 'build', 'Release', 'adafisher.node'));
  const dir = join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`);
  if (existsSync(dir)) {
    for (const f of readdirSync(dir).sort()) if (f.endsWith('.node')) out.push(join(dir, f));
  } else {
    out.push(join(dir, 'adafisher.node'));
  }
  return out;
}

let loaded: { binding: NativeBinding; path: string } | undefined;

// NOTE: [addon loading]
// A local build (build/Release) is used only when it was built from this package version
// (the version is compiled into the binary): a stale build left from an older checkout or
// install never shadows the prebuilt binary shipped with a newer package. Every path tried
// and why it failed is reported, with how to fix it.
export function loadBinding(): { binding: NativeBinding; path: string } {
  if (loaded) return loaded;
  const version = packageVersion();
  const tried: string[] = [];
  for (const path of addonCandidates()) {
    if (!existsSync(path)) {
      tried.push(`${path}: not found`);
      continue;
    }
    try {
      const b = require(path) as NativeBinding;
      if (b.version !== version && path !== process.env.ADAFISHER_ADDON) {
        tried.push(`${path}: built for adafisher ${b.version}, this is ${version} (stale, skipped)`);
        continue;
      }
      loaded = { binding: b, path };
      return loaded;
    } catch (e) {
      tried.push(`${path}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  const libc = process.platform === 'linux' ? ((process.report?.getReport() as any)?.header?.glibcVersionRuntime ? 'glibc' : 'musl') : '';
  const err = new Error(
    `Could not load the adafisher native addon for ${process.platform}-${process.arch}${libc ? ` (${libc})` : ''}, ` +
      `Node ${process.versions.node} (N-API ${process.versions.napi}).\nTried:\n  ${tried.join('\n  ')}\n` +
      `Fix: reinstall with \`npm install adafisher\` (prebuilt binaries exist for linux-x64 glibc), or build from ` +
      `source with a C++17 compiler: \`npm rebuild adafisher\` (CPU only, node-gyp) or, in a checkout, ` +
      `\`npm run build:native\` (CMake, CUDA when nvcc is present).`,
  ) as Error & { code: string };
  err.code = 'ADAFISHER_ADDON_NOT_FOUND';
  throw err;
}

export function binding(): NativeBinding {
  return loadBinding().binding;
}
