// The per-element math of AdaFisher, shared by the CPU backend (C++17) and the CUDA
// backend (nvcc). Every formula of docs/ALGORITHM.md that is applied element by
// element lives here exactly once, so both backends compute the same float32 operations
// in the same order.
//
// NOTE: [float32 order of operations]
// The official implementation runs in float32 PyTorch eager ops. We follow its order:
//   L2 decay      g' = g + wd * p                       (grad.add(p, alpha=wd))
//   momentum      m' = beta * m + (1 - beta) * g'       (mul_(beta).add_(g, alpha=1-beta))
//   AdaFisher     p' = p - stepSize * m' / F            (stepSize = lr / bc, from double)
//   AdaFisherW    p' = p - lr * (m' / (bc * F) + wd * p)
// Host code computes the per-tensor scalars (stepSize, bc) in double and rounds them once.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ADAFISHER_HD __host__ __device__ __forceinline__
#else
#define ADAFISHER_HD inline
#endif

namespace adafisher {
namespace math {

// Min-max normalization epsilon of the official code.
constexpr float kMinMaxEpsilon = 1e-6f;

// +inf -> 1, -inf -> 0, everything else (NaN included) unchanged: the official
// `smart_detect_inf` cleanup applied to a fresh factor before normalizing it.
ADAFISHER_HD float clean_infinity(float x) {
  if (x == __builtin_huge_valf()) return 1.0f;
  if (x == -__builtin_huge_valf()) return 0.0f;
  return x;
}

ADAFISHER_HD bool is_finite(float x) {
  // x - x is 0 for finite x and NaN for NaN/inf; written without <cmath> so that it
  // vectorizes on the CPU and needs no device intrinsic.
  return (x - x) == 0.0f;
}

// NOTE: [guard predicate]
// What the non-finite guard accepts: a gradient must be finite; a fresh factor entry only
// not NaN, since clean_infinity maps its +-inf to 1 and 0 as the official code does (an
// overflowing activation statistic leaves the refresh finite, and a guard that skipped it
// would skip every later step too, the weights never changing).
ADAFISHER_HD bool guard_accepts(float x, bool infinity_ok) { return infinity_ok ? x == x : is_finite(x); }

// One entry of the running factor: R <- decay * R + mix * (x - min) / (max - min + eps).
// `denominator` is min_max_denominator(min, max) of the cleaned fresh factor.
ADAFISHER_HD float ema_of_normalized(float running, float fresh, float min_value, float denominator, float decay,
                                     float mix) {
  // Division, not multiplication by a reciprocal: the official code divides.
  const float normalized = (clean_infinity(fresh) - min_value) / denominator;
  return decay * running + mix * normalized;
}

// NOTE: [NaN min-max]
// A fresh factor with a NaN entry (possible only with the guard off) has NaN as its min and
// max on both backends, so the whole factor's refresh is NaN, as with torch's min()/max() in
// the official code. A reduction that skipped NaNs (fminf, or std::min depending on the
// position of the NaN) would make the result depend on where the NaN sits.

// Denominator of the min-max normalization for a factor whose cleaned range is [lo, hi].
ADAFISHER_HD float min_max_denominator(float lo, float hi) { return (hi - lo) + kMinMaxEpsilon; }

// Damped Kronecker diagonal entry: F = S[o] * H[k] + damping.
ADAFISHER_HD float fisher_diagonal(float s, float h, float damping) { return s * h + damping; }

// Scalars shared by every element of one parameter tensor.
struct StepScalars {
  float beta;           // momentum coefficient
  float one_minus_beta; // 1 - beta, rounded from double
  float weight_decay;   // L2 (AdaFisher) or decoupled (AdaFisherW) coefficient
  float step_size;      // AdaFisher: lr / bc (rounded from double)
  float lr;             // AdaFisherW: lr
  float bias_correction;  // AdaFisherW: bc = 1 - beta^t
};

// The scalars of a tensor's t-th step (t >= 1), computed in double and rounded once (host).
inline StepScalars step_scalars(double lr, double beta, double weight_decay, int64_t t) {
  const double bc = 1.0 - std::pow(beta, static_cast<double>(t));
  StepScalars s;
  s.beta = static_cast<float>(beta);
  s.one_minus_beta = static_cast<float>(1.0 - beta);
  s.weight_decay = static_cast<float>(weight_decay);
  s.step_size = static_cast<float>(lr / bc);
  s.lr = static_cast<float>(lr);
  s.bias_correction = static_cast<float>(bc);
  return s;
}

// The AdaFisher (L2 weight decay) update of one element.
ADAFISHER_HD void adafisher_update(float& p, float& m, float g, float fisher, const StepScalars& s) {
  const float g_decayed = g + s.weight_decay * p;
  const float m_new = s.beta * m + s.one_minus_beta * g_decayed;
  m = m_new;
  p = p - s.step_size * m_new / fisher;
}

// The AdaFisherW (decoupled weight decay) update of one element.
ADAFISHER_HD void adafisherw_update(float& p, float& m, float g, float fisher, const StepScalars& s) {
  const float m_new = s.beta * m + s.one_minus_beta * g;
  m = m_new;
  p = p - s.lr * (m_new / (s.bias_correction * fisher) + s.weight_decay * p);
}

// Update rule as a compile-time switch (template argument in both backends' loops).
enum class UpdateRule : int32_t { kAdaFisher = 0, kAdaFisherW = 1 };

template <UpdateRule kRule>
ADAFISHER_HD void update(float& p, float& m, float g, float fisher, const StepScalars& s) {
  if (kRule == UpdateRule::kAdaFisher) {
    adafisher_update(p, m, g, fisher, s);
  } else {
    adafisherw_update(p, m, g, fisher, s);
  }
}

}  // namespace math
}  // namespace adafisher
