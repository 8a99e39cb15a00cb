// Argument checks shared by the public API. Each throws TypeError for a wrong type and
// RangeError for a wrong value, naming the argument (see errors.ts).
import { rangeError, typeError } from './errors.js';

export function checkNumber(name: string, value: unknown): number {
  if (typeof value !== 'number') throw typeError(name, 'a number', value);
  if (!Number.isFinite(value)) throw rangeError(name, 'a finite number', value);
  return value;
}

export function checkRange(
  name: string,
  value: unknown,
  lo: number,
  hi: number,
  { loOpen = false, hiOpen = false }: { loOpen?: boolean; hiOpen?: boolean } = {},
): number {
  const v = checkNumber(name, value);
  const okLo = loOpen ? v > lo : v >= lo;
  const okHi = hiOpen ? v < hi : v <= hi;
  if (!okLo || !okHi) {
    const text = `a number in ${loOpen ? '(' : '['}${lo}, ${hi}${hiOpen ? ')' : ']'}`;
    throw rangeError(name, hi === Infinity ? `a number ${loOpen ? '>' : '>='} ${lo}` : text, value);
  }
  return v;
}

/**
 * A number the native code can hold as float32 (the hyperparameters are float32 in its
 * kernels): below 2^128 (else +Infinity), and, when `positive`, not rounding to 0.
 */
export function checkFloat32(name: string, value: number, positive = false): number {
  const f = Math.fround(value);
  if (!Number.isFinite(f)) throw rangeError(name, "a number below 2^128 (float32's range)", value);
  if (positive && f === 0) throw rangeError(name, "a number of at least 2^-149 (float32's smallest above 0)", value);
  return value;
}

export function checkInteger(name: string, value: unknown, lo: number, hi = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number') throw typeError(name, 'an integer', value);
  if (!Number.isInteger(value) || value < lo || value > hi) {
    throw rangeError(name, hi === Number.MAX_SAFE_INTEGER ? `an integer >= ${lo}` : `an integer in [${lo}, ${hi}]`, value);
  }
  return value;
}

export function checkBoolean(name: string, value: unknown): boolean {
  if (typeof value !== 'boolean') throw typeError(name, 'a boolean', value);
  return value;
}

export function checkOneOf<T extends string>(name: string, value: unknown, options: readonly T[]): T {
  if (typeof value !== 'string') throw typeError(name, `one of ${options.map((o) => `'${o}'`).join(', ')}`, value);
  if (!options.includes(value as T)) throw rangeError(name, `one of ${options.map((o) => `'${o}'`).join(', ')}`, value);
  return value as T;
}

export function checkPair(name: string, value: unknown, lo: number, hi = Number.MAX_SAFE_INTEGER): [number, number] {
  if (typeof value === 'number') {
    const v = checkInteger(name, value, lo, hi);
    return [v, v];
  }
  if (!Array.isArray(value) || value.length !== 2) throw typeError(name, 'an integer or a pair of integers', value);
  return [checkInteger(`${name}[0]`, value[0], lo, hi), checkInteger(`${name}[1]`, value[1], lo, hi)];
}

// NOTE: [names on failure in TypeScript]
// The calls made every training step (recordFactors for every layer) check their arguments
// with a fast test first and build an argument's name ("records[3].inputShape") only to
// throw: the strings cost more than the checks. fastShape is checkShape's test without the
// name: a copy of a valid shape, or undefined (then checkShape names what is wrong).
export function fastShape(value: unknown): number[] | undefined {
  if (!Array.isArray(value)) return undefined;
  const n = value.length;
  const out = new Array<number>(n);
  for (let i = 0; i < n; ++i) {
    const d: unknown = value[i];
    if (typeof d !== 'number' || !Number.isInteger(d) || d < 0 || d > Number.MAX_SAFE_INTEGER) return undefined;
    out[i] = d;
  }
  return out;
}

export function checkShape(name: string, value: unknown): number[] {
  if (!Array.isArray(value)) throw typeError(name, 'an array of dimensions', value);
  return value.map((d, i) => checkInteger(`${name}[${i}]`, d, 0));
}
