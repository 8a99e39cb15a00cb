// Shared by the child-process drivers that report a list of checks (oom-driver.mjs,
// cuda-fault-driver.mjs): the check list, thrown(), and a small linear layer trained on
// seeded data.
import { fill, rng } from './train.mjs';

const checks = [];

/** Records one named check; `detail` says what was seen. */
export function check(name, ok, detail = '') {
  checks.push({ name, ok: Boolean(ok), detail: String(detail) });
}

/** The error fn throws, or undefined. */
export function thrown(fn) {
  try {
    fn();
  } catch (e) {
    return e;
  }
  return undefined;
}

/** Prints {...extra, checks} as one JSON line; exits 1 when a check failed. */
export function finish(extra = {}) {
  console.log(JSON.stringify({ ...extra, checks }));
  process.exit(checks.every((c) => c.ok) ? 0 : 1);
}

/** A linear 8 -> 4 layer with bias, seeded: its specs and its weight array. */
export function linearLayer(seed) {
  const r = rng(seed);
  const weight = fill(32, r);
  return { specs: [{ kind: 'linear', inFeatures: 8, outFeatures: 4, weight, bias: fill(4, r) }], weight };
}

/** One refreshing step of an optimizer over linearLayer() on seeded data; whether it applied. */
export function trainLinearStep(opt, seed) {
  const r = rng(seed);
  opt.recordInput(0, fill(16, r), [2, 8]);
  opt.recordOutputGrad(0, fill(8, r), [2, 4]);
  return opt.step([fill(32, r), fill(4, r)]).applied;
}
