// Backend selection and device buffers.
import { isFloat32Array } from 'node:util/types';

import { binding, loadBinding, type NativeBackendInfo, type NativeBackendName, type NativeDeviceBuffer, type NativeTimingEvent } from './binding.js';
import { codedError, ErrorCodes, typeError } from './errors.js';
import { checkInteger, checkOneOf } from './validate.js';

export type BackendName = 'auto' | 'cpu' | 'cuda';
export const BACKEND_NAMES: readonly BackendName[] = ['auto', 'cpu', 'cuda'];

/** What backend a request resolves to, and why. */
export interface BackendReport {
  /**
   * The backend that will run: 'cpu' or 'cuda'; null when the request cannot be met
   * ('cuda' asked for where it cannot run: `reason` says why, and creating an optimizer,
   * buffer or timing event with this request throws ADAFISHER_BACKEND_UNAVAILABLE).
   */
  backend: NativeBackendName | null;
  /** What was asked for (option, else ADAFISHER_BACKEND, else 'auto'). */
  requested: BackendName;
  /** Where the request came from. */
  source: 'option' | 'ADAFISHER_BACKEND' | 'default';
  /** Why CUDA is not used, when it is not; empty when it is. */
  reason: string;
  /** Set (to the error those calls throw) exactly when `backend` is null. */
  error?: { code: typeof ErrorCodes.backendUnavailable; message: string };
  cuda: {
    compiled: boolean;
    usable: boolean;
    deviceName: string;
    computeCapability: string;
    /** Total device memory in bytes (0 without a usable device). */
    memoryBytes: number;
    driverVersion: number;
    runtimeVersion: number;
    architectures: string;
  };
  cpuThreads: number;
  addonPath: string;
  addonVersion: string;
  buildSystem: string;
}

function requestedBackend(option: unknown, what = 'options.backend'): { requested: BackendName; source: BackendReport['source'] } {
  if (option !== undefined) return { requested: checkOneOf(what, option, BACKEND_NAMES), source: 'option' };
  const env = process.env.ADAFISHER_BACKEND;
  if (env !== undefined && env !== '') {
    return { requested: checkOneOf('ADAFISHER_BACKEND', env.toLowerCase(), BACKEND_NAMES), source: 'ADAFISHER_BACKEND' };
  }
  return { requested: 'auto', source: 'default' };
}

/**
 * Reports which backend a request resolves to and why CUDA is or is not used.
 * @param backend 'auto' | 'cpu' | 'cuda'; defaults to ADAFISHER_BACKEND, then 'auto'.
 * @throws {RangeError} for an unknown backend name (option or ADAFISHER_BACKEND).
 * @example
 * const { backend, reason } = backendInfo();  // { backend: 'cpu', reason: 'no NVIDIA driver found (...)' }
 * backendInfo('cuda');  // without a usable GPU: { backend: null, reason: '...', error: { code: 'ADAFISHER_BACKEND_UNAVAILABLE', ... } }
 */
export function backendInfo(backend?: BackendName): BackendReport {
  return report(backend, 'backend');
}

// The addon's facts about CUDA (compiled, usable, device properties) are read once per
// loaded binding: buffers, timing events and synchronize() resolve their backend on every
// call, and asking the driver each time cost more than the call itself.
const nativeInfo = new WeakMap<object, NativeBackendInfo>();

function report(backend: unknown, what: string): BackendReport {
  const { requested, source } = requestedBackend(backend, what);
  const { binding: b, path } = loadBinding();
  let info = nativeInfo.get(b);
  if (info === undefined) {
    info = b.backendInfo();
    nativeInfo.set(b, info);
  }
  let chosen: NativeBackendName | null;
  let reason = '';
  let error: BackendReport['error'];
  if (requested === 'cpu') {
    chosen = 'cpu';
    reason = `the cpu backend was requested (${source})`;
  } else if (info.cudaUsable) {
    chosen = 'cuda';
  } else {
    reason = info.cudaReason;
    if (requested === 'cuda') {
      // Never report a fallback that would not happen: asking for cuda is an error.
      chosen = null;
      error = {
        code: ErrorCodes.backendUnavailable,
        message: `The cuda backend was requested (${source}) but cannot be used: ${reason}`,
      };
    } else {
      chosen = 'cpu';
    }
  }
  return {
    backend: chosen,
    requested,
    source,
    reason,
    ...(error ? { error } : {}),
    cuda: {
      compiled: info.cudaCompiled,
      usable: info.cudaUsable,
      deviceName: info.deviceName,
      computeCapability: info.computeCapability,
      memoryBytes: info.deviceMemory,
      driverVersion: info.driverVersion,
      runtimeVersion: info.runtimeVersion,
      architectures: info.cudaArchitectures,
    },
    cpuThreads: info.cpuThreads,
    addonPath: path,
    addonVersion: b.version,
    buildSystem: b.buildSystem,
  };
}

/**
 * Resolves a backend request to the backend that will run.
 * @throws {Error} code ADAFISHER_BACKEND_UNAVAILABLE when 'cuda' is requested but cannot be used.
 */
export function resolveBackend(backend?: BackendName): NativeBackendName {
  return resolve(backend, 'backend');
}

// `what` names the argument in errors: 'backend' or 'options.backend'.
function resolve(backend: unknown, what: string): NativeBackendName {
  const r = report(backend, what);
  if (r.backend === null) {
    throw codedError(r.error?.code ?? ErrorCodes.backendUnavailable, r.error?.message ?? r.reason);
  }
  return r.backend;
}

function checkOptions(options: unknown): { backend?: BackendName } {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw typeError('options', 'an object such as { backend: \'cuda\' }', options);
  }
  return options as { backend?: BackendName };
}

/**
 * float32 memory owned by a backend (device memory on cuda). An interface of its own (not an
 * alias of the binding's) so that a program's declarations can name it from 'adafisher'.
 */
export interface DeviceBuffer extends NativeDeviceBuffer {}

/**
 * Allocates a DeviceBuffer on a backend, zero-filled or holding a copy of `data`.
 * @param lengthOrData number of float32 elements, or a Float32Array to upload.
 * @param options.backend 'auto', 'cpu' or 'cuda'; by default ADAFISHER_BACKEND, then 'auto'.
 * @throws {TypeError|RangeError} for a bad length or data; code ADAFISHER_OUT_OF_MEMORY when memory runs out.
 * @example
 * const w = createBuffer(new Float32Array([1, 2, 3]), { backend: 'cuda' });
 * w.download(); // Float32Array [1, 2, 3]
 */
export function createBuffer(lengthOrData: number | Float32Array, options: { backend?: BackendName | undefined } = {}): DeviceBuffer {
  const backend = resolve(checkOptions(options).backend, 'options.backend');
  if (typeof lengthOrData === 'number') checkInteger('length', lengthOrData, 0);
  else if (!isFloat32Array(lengthOrData)) throw typeError('data', 'a length or a Float32Array', lengthOrData);
  return new (binding().DeviceBuffer)(backend, lengthOrData);
}

/**
 * True for a DeviceBuffer of this addon (of either backend, disposed or not); false for
 * anything else, a Float32Array included. Never throws.
 * @param value Anything.
 * @example if (!isDeviceBuffer(x)) x = createBuffer(x);
 */
export function isDeviceBuffer(value: unknown): value is DeviceBuffer {
  return binding().isDeviceBuffer(value);
}

/**
 * Resolves when all work queued on a backend has finished, without blocking the event loop
 * (pending calls of one backend share one wait on a libuv thread).
 * @param backend 'auto', 'cpu' or 'cuda'; by default, as createBuffer: ADAFISHER_BACKEND, then 'auto'.
 * @throws {TypeError|RangeError} (code ADAFISHER_INVALID_ARGUMENT) for a backend other than
 *   'auto', 'cpu' or 'cuda', and an Error (code ADAFISHER_BACKEND_UNAVAILABLE) for 'cuda' where CUDA is unusable, at the call;
 *   the promise rejects with code ADAFISHER_CUDA_ERROR when the device has failed.
 * @example await synchronize('cuda');
 */
export function synchronize(backend?: BackendName): Promise<void> {
  return binding().synchronize(resolve(backend, 'backend'));
}

/**
 * A mark on a backend's queue for timing device work: a CUDA event on `cuda` (device
 * time, not host time), the host clock on `cpu` (whose calls finish before they return).
 * `record()` places it after everything submitted so far; `a.elapsedMs(b)` is the time from
 * mark `a` to mark `b` in milliseconds. elapsedMs waits until the backend has reached both
 * marks: call it after `await synchronize()` to keep the event loop free.
 */
export interface TimingEvent extends NativeTimingEvent {}

/**
 * Creates a TimingEvent on a backend.
 * @param options.backend 'auto', 'cpu' or 'cuda'; by default ADAFISHER_BACKEND, then 'auto'.
 * @example
 * const [start, end] = [createTimingEvent({ backend: 'cuda' }), createTimingEvent({ backend: 'cuda' })];
 * start.record();
 * optimizer.step(grads);
 * end.record();
 * await synchronize('cuda');
 * start.elapsedMs(end); // milliseconds of device time
 */
export function createTimingEvent(options: { backend?: BackendName | undefined } = {}): TimingEvent {
  return new (binding().TimingEvent)(resolve(checkOptions(options).backend, 'options.backend'));
}

/**
 * Number of live native allocations of a backend (buffers, optimizer state, timing events):
 * for leak checks.
 * @param backend 'auto', 'cpu' or 'cuda'; by default, as createBuffer: ADAFISHER_BACKEND, then 'auto'.
 * @throws {TypeError|RangeError} (code ADAFISHER_INVALID_ARGUMENT) for a backend other than
 *   'auto', 'cpu' or 'cuda', and an Error (code ADAFISHER_BACKEND_UNAVAILABLE) for 'cuda' where CUDA is unusable.
 * @example
 * const before = liveAllocations('cpu');
 * createBuffer(16, { backend: 'cpu' }).dispose();
 * liveAllocations('cpu') === before; // true
 */
export function liveAllocations(backend?: BackendName): number {
  return binding().liveAllocations(resolve(backend, 'backend'));
}
