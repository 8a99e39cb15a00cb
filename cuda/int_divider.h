// Division by a divisor fixed per tensor, as a multiply-high and a shift (Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994). The step
// kernel needs two quotients and two remainders per element to find the preconditioner
// entry S[o] * H[k]; hardware 32-bit division costs ~20 instructions, this costs ~3.
// Plain C++ with __host__ __device__ so that the host parity harness checks it exhaustively.
#pragma once

#include <cstdint>

#include "core/math.h"

namespace adafisher {
namespace cuda {

// Valid for dividends n < 2^31 and divisors 1 <= d <= 2^31 - 1.
struct IntDivider {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  IntDivider() = default;
  // Divisors outside [1, 2^31 - 1] must be clamped by the caller (see MakeClampedDivider).
  explicit IntDivider(uint32_t d) : divisor(d) {
    while (shift < 31 && (uint32_t{1} << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }

  ADAFISHER_HD uint32_t Div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    // t <= n < 2^31, so t + n does not wrap.
    return (t + n) >> shift;
  }
  ADAFISHER_HD uint32_t Mod(uint32_t n) const { return n - Div(n) * divisor; }
};

// A divider for dividends below `bound` (<= 2^31 - 1) by any positive divisor: divisors
// >= bound all give quotient 0 and remainder n, as does 2^31 - 1, so they are clamped.
inline IntDivider MakeClampedDivider(int64_t divisor) {
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  if (divisor < 1) divisor = 1;
  if (divisor > kMax) divisor = kMax;
  return IntDivider(static_cast<uint32_t>(divisor));
}

}  // namespace cuda
}  // namespace adafisher
