// What the step kernels know about each tensor: a device table of StepDesc (one per
// tensor, uploaded once per step, see NOTE: [multi-tensor launch]) and the preconditioner
// lookup F = S[o] * H[k] + damping. Plain C++ with __host__ __device__ functions so that
// the parity harness checks the index arithmetic on the host.
#pragma once

#include <cstdint>

#include "core/backend.h"
#include "core/math.h"
#include "int_divider.h"
#include "launch_plan.h"

namespace adafisher {
namespace cuda {

// Tensors below this size index with 32-bit integers and IntDivider; larger ones with
// int64 division (correct everywhere, slower, and only for tensors of >= 2^31 elements).
constexpr int64_t kNarrowLimit = (int64_t{1} << 31) - 1;

struct StepDesc {
  float* param;
  const float* grad;
  float* momentum;
  const float* s;  // running + s_offset, null when not preconditioned
  const float* h;  // running + h_offset, null when not preconditioned
  int64_t numel;
  int64_t o_stride, o_count, k_stride, k_count;
  IntDivider o_stride_div, o_count_div, k_stride_div, k_count_div;  // numel <= kNarrowLimit only
  math::StepScalars scalars;
  int32_t preconditioned;
  int32_t wide;  // numel > kNarrowLimit
};

// A read-only range checked by the non-finite guard: a gradient or a fresh factor segment.
struct GuardDesc {
  const float* data;
  int64_t numel;
  int32_t infinity_ok;  // a fresh factor segment: only NaN trips the guard (math::guard_accepts)
};

inline StepDesc MakeStepDesc(const StepTensor& t, const float* running) {
  StepDesc d{};
  d.param = t.param;
  d.grad = t.grad;
  d.momentum = t.momentum;
  d.numel = t.numel;
  d.preconditioned = t.preconditioned ? 1 : 0;
  d.wide = t.numel > kNarrowLimit ? 1 : 0;
  d.scalars = t.scalars;
  if (t.preconditioned) {
    d.s = running + t.s_offset;
    d.h = running + t.h_offset;
    d.o_stride = t.o_stride, d.o_count = t.o_count, d.k_stride = t.k_stride, d.k_count = t.k_count;
    d.o_stride_div = MakeClampedDivider(t.o_stride);
    d.o_count_div = MakeClampedDivider(t.o_count);
    d.k_stride_div = MakeClampedDivider(t.k_stride);
    d.k_count_div = MakeClampedDivider(t.k_count);
  } else {
    d.s = d.h = nullptr;
    d.o_stride = d.o_count = d.k_stride = d.k_count = 1;
  }
  return d;
}

ADAFISHER_HD float LoadReadOnly(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// F of element i of a tensor with numel <= kNarrowLimit (so i < 2^31 - 1).
ADAFISHER_HD float FisherNarrow(const StepDesc& d, uint32_t i, float damping) {
  const uint32_t o = d.o_count_div.Mod(d.o_stride_div.Div(i));
  const uint32_t k = d.k_count_div.Mod(d.k_stride_div.Div(i));
  return math::fisher_diagonal(LoadReadOnly(d.s + o), LoadReadOnly(d.h + k), damping);
}

// F of element i of any tensor.
ADAFISHER_HD float FisherWide(const StepDesc& d, int64_t i, float damping) {
  const int64_t o = (i / d.o_stride) % d.o_count;
  const int64_t k = (i / d.k_stride) % d.k_count;
  return math::fisher_diagonal(LoadReadOnly(d.s + o), LoadReadOnly(d.h + k), damping);
}

// Kernel arguments of the multi-tensor launches: block b works on slots[b] (see NOTE:
// [multi-tensor launch]); the slots and the table live in the step's device table.
struct StepLaunchArgs {
  const BlockSlot* slots;
  const StepDesc* table;
  const int* flag;  // non-null when guarded: a set flag means "write nothing"
  float damping;
};
struct GuardLaunchArgs {
  const BlockSlot* slots;
  const GuardDesc* table;
  int* flag;
};

}  // namespace cuda
}  // namespace adafisher
