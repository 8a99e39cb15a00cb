// NOTE: [error codes]
// Every error this package raises on purpose carries a stable `code`. Native failures use
// the same codes (native/core/backend.h ErrorCode, native/core/cpu_backend.cc ErrorCodeName).
// The last codes are raised by TypeScript only (addon loader, TF.js adapter).
export const ErrorCodes = {
  invalidArgument: 'ADAFISHER_INVALID_ARGUMENT',
  disposed: 'ADAFISHER_DISPOSED',
  foreignBuffer: 'ADAFISHER_FOREIGN_BUFFER',
  outOfMemory: 'ADAFISHER_OUT_OF_MEMORY',
  cudaError: 'ADAFISHER_CUDA_ERROR',
  backendUnavailable: 'ADAFISHER_BACKEND_UNAVAILABLE',
  missingStatistics: 'ADAFISHER_MISSING_STATISTICS',
  badCheckpoint: 'ADAFISHER_BAD_CHECKPOINT',
  internal: 'ADAFISHER_INTERNAL',
  addonNotFound: 'ADAFISHER_ADDON_NOT_FOUND',
  /** A golden trajectory file that does not follow test/golden/README.md (GoldenFormatError). */
  badGoldenFile: 'ADAFISHER_BAD_GOLDEN_FILE',
  /** TF.js adapter: the optimizer is not attached to the model (or variables) being trained. */
  modelMismatch: 'ADAFISHER_MODEL_MISMATCH',
  /** TF.js adapter: a layer that neither TF.js nor AdaFisher can train as it is used. */
  unsupportedLayer: 'ADAFISHER_UNSUPPORTED_LAYER',
  /** TF.js adapter: the optional peer dependency @tensorflow/tfjs is not installed. */
  tfjsNotFound: 'ADAFISHER_TFJS_NOT_FOUND',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** An error this package raised on purpose: an Error (TypeError, RangeError) with a stable `code`. */
export type AdaFisherError = Error & { code: ErrorCode };

const CODES: ReadonlySet<string> = new Set(Object.values(ErrorCodes));

/**
 * Whether `e` is an error this package raised on purpose (with `code` when given): narrows a
 * `catch (e: unknown)` to AdaFisherError.
 * @example
 * try { opt.loadState(saved); } catch (e) { if (!isAdaFisherError(e, ErrorCodes.badCheckpoint)) throw e; }
 */
export function isAdaFisherError(e: unknown, code?: ErrorCode): e is AdaFisherError {
  if (!(e instanceof Error)) return false;
  const c = (e as { code?: unknown }).code;
  return typeof c === 'string' && CODES.has(c) && (code === undefined || c === code);
}

/** The codes of the process warnings the TF.js adapter emits (process.emitWarning), not errors. */
export const WarningCodes = {
  /** The non-finite guard skipped 10 steps in a row. */
  stepsSkipped: 'ADAFISHER_STEPS_SKIPPED',
  /** More than 64 gradient computations wait for one step. */
  pendingStatistics: 'ADAFISHER_PENDING_STATISTICS',
} as const;

/** Gives an error a stable code; returns it. */
export function withCode<E extends Error>(e: E, code: ErrorCode): E & { code: ErrorCode } {
  (e as E & { code: ErrorCode }).code = code;
  return e as E & { code: ErrorCode };
}

/** A short description of a received value for error messages. */
export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (ArrayBuffer.isView(value)) {
    const len = (value as unknown as { length?: number }).length;
    return `a ${value.constructor.name}${len !== undefined ? ` of length ${len}` : ''}`;
  }
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  if (typeof value === 'object') return `an object (${(value as object).constructor?.name ?? 'null prototype'})`;
  if (typeof value === 'string') return `'${value.length > 40 ? value.slice(0, 40) + '...' : value}' of type string`;
  return `${String(value)} of type ${typeof value}`;
}

/** "Expected <what> for <name> but received <value> of type <type>" as a TypeError. */
export function typeError(name: string, expected: string, value: unknown): TypeError {
  return withCode(new TypeError(`Expected ${expected} for ${name} but received ${describe(value)}`), ErrorCodes.invalidArgument);
}

/** Same as typeError, as a RangeError (right type, wrong value). */
export function rangeError(name: string, expected: string, value: unknown): RangeError {
  return withCode(new RangeError(`Expected ${expected} for ${name} but received ${describe(value)}`), ErrorCodes.invalidArgument);
}

/** A misspelt or unsupported key of an options object: names the key, not its type. */
export function unknownKeyError(name: string, expected: string, key: string): RangeError {
  return withCode(new RangeError(`Expected ${expected} for ${name} but received the unknown key '${key}'`), ErrorCodes.invalidArgument);
}

export function codedError(code: ErrorCode, message: string): Error & { code: ErrorCode } {
  return withCode(new Error(message), code);
}
