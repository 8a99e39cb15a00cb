// The optimizer step: non-finite guard, factor refresh (min-max + EMA of every segment in
// one launch) and the preconditioned update of every tensor (multi-tensor launches).
//
// NOTE: [guarded step]
// A step with a NaN/inf gradient (or, when refreshing, a NaN/inf fresh factor) must leave
// every parameter, momentum and running factor untouched. The guard kernel reads all of
// them first and sets a device flag; the refresh and update kernels, queued behind it on
// the same stream, read the flag on entry and return at once when it is set. Step() copies
// the flag back (4 bytes into pinned memory) right behind the guard kernel and waits for
// that copy only, not for the update: it reports whether the step applies while the update
// still runs, so the host prepares the next step meanwhile (as it does unguarded). The
// price is one extra read of the gradients (24 bytes per parameter instead of 20) and the
// wait for the guard kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_internal.h"
#include "launch_plan.h"
#include "step_desc.h"

namespace adafisher {
namespace cuda {
namespace {

constexpr int kRefreshThreads = 256;

__device__ __forceinline__ bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------------------
// Guard: one block per (range, chunk); any value that math::guard_accepts refuses (NaN or
// +-inf in a gradient, NaN in a fresh factor) sets *flag = 1. Every block that finds one
// writes the same value, so the outcome does not depend on timing.
__global__ void __launch_bounds__(kStepThreads) GuardKernel(const GuardLaunchArgs args) {
  const BlockSlot slot = args.slots[blockIdx.x];
  const GuardDesc d = args.table[slot.tensor];
  const int64_t start = int64_t{slot.chunk} * kChunkElements;
  const int n = static_cast<int>(min(kChunkElements, d.numel - start));
  const float* __restrict__ x = d.data + start;
  const bool inf_ok = d.infinity_ok != 0;
  bool ok = true;
  int tail = 0;
  if (Aligned16(x)) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int n4 = n >> 2;
    for (int v = threadIdx.x; v < n4; v += kStepThreads) {
      const float4 q = __ldg(x4 + v);
      ok &= math::guard_accepts(q.x, inf_ok) & math::guard_accepts(q.y, inf_ok) & math::guard_accepts(q.z, inf_ok) &
            math::guard_accepts(q.w, inf_ok);
    }
    tail = n4 << 2;
  }
  for (int e = tail + threadIdx.x; e < n; e += kStepThreads) ok &= math::guard_accepts(__ldg(x + e), inf_ok);
  if (__syncthreads_or(!ok) && threadIdx.x == 0) *args.flag = 1;
}

// ---------------------------------------------------------------------------------------
// Refresh: one block per factor segment. running <- decay * running + mix * minmax(fresh).
// min/max over clean_infinity(fresh) match the CPU backend's: NaN anywhere makes both NaN
// (NOTE: [NaN min-max] in native/core/math.h); otherwise fminf/fmaxf over the values.
__device__ __forceinline__ void BlockMinMax(float* lo, float* hi) {
  __shared__ float warp_lo[kRefreshThreads / 32], warp_hi[kRefreshThreads / 32];
  float l = *lo, h = *hi;
  for (int offset = 16; offset > 0; offset >>= 1) {
    l = fminf(l, __shfl_down_sync(0xffffffffu, l, offset));
    h = fmaxf(h, __shfl_down_sync(0xffffffffu, h, offset));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_lo[warp] = l, warp_hi[warp] = h;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kRefreshThreads / 32; ++w) l = fminf(l, warp_lo[w]), h = fmaxf(h, warp_hi[w]);
    warp_lo[0] = l;
    warp_hi[0] = h;
  }
  __syncthreads();
  *lo = warp_lo[0];
  *hi = warp_hi[0];
}

__global__ void __launch_bounds__(kRefreshThreads)
    RefreshKernel(const FactorSegment* __restrict__ segments, const float* __restrict__ fresh,
                  float* __restrict__ running, float decay, float mix, const int* __restrict__ flag) {
  if (flag != nullptr && *flag != 0) return;
  const FactorSegment seg = segments[blockIdx.x];
  if (seg.length <= 0) return;
  const float* f = fresh + seg.offset;
  float* r = running + seg.offset;
  const float nan = __int_as_float(0x7fc00000);
  float lo = nan, hi = nan;  // fminf(NaN, v) == v: threads without elements do not count
  int saw_nan = 0;
  for (int64_t i = threadIdx.x; i < seg.length; i += kRefreshThreads) {
    const float v = math::clean_infinity(f[i]);
    saw_nan |= v != v;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  BlockMinMax(&lo, &hi);
  if (__syncthreads_or(saw_nan)) lo = hi = nan;
  const float denominator = math::min_max_denominator(lo, hi);
  for (int64_t i = threadIdx.x; i < seg.length; i += kRefreshThreads) {
    r[i] = math::ema_of_normalized(r[i], f[i], lo, denominator, decay, mix);
  }
}

// ---------------------------------------------------------------------------------------
// Update: one block per (tensor, chunk). The per-element math is math::update<kRule>, the
// same inline function the CPU backend calls, with F from the two factor vectors.
template <math::UpdateRule kRule, bool kPreconditioned, bool kWide>
__device__ __forceinline__ void UpdateChunk(const StepDesc& d, int64_t start, int n, float damping) {
  float* __restrict__ p = d.param + start;
  float* __restrict__ m = d.momentum + start;
  const float* __restrict__ g = d.grad + start;
  const math::StepScalars sc = d.scalars;
  // F of chunk element e (tensor element start + e).
  auto fisher = [&](int e) -> float {
    if constexpr (!kPreconditioned) {
      return 1.0f;
    } else if constexpr (kWide) {
      return FisherWide(d, start + e, damping);
    } else {
      return FisherNarrow(d, static_cast<uint32_t>(start + e), damping);
    }
  };
  int tail = 0;
  if (Aligned16(p) && Aligned16(m) && Aligned16(g)) {
    // Fast path: 16-byte loads and stores; the chunk's last n % 4 elements go below.
    float4* p4 = reinterpret_cast<float4*>(p);
    float4* m4 = reinterpret_cast<float4*>(m);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    const int n4 = n >> 2;
    // Streaming loads and stores (ld/st.global.cs): every byte is touched once per step.
    for (int v = threadIdx.x; v < n4; v += kStepThreads) {
      float4 pv = __ldcs(p4 + v);
      float4 mv = __ldcs(m4 + v);
      const float4 gv = __ldcs(g4 + v);
      const int e = v << 2;
      math::update<kRule>(pv.x, mv.x, gv.x, fisher(e), sc);
      math::update<kRule>(pv.y, mv.y, gv.y, fisher(e + 1), sc);
      math::update<kRule>(pv.z, mv.z, gv.z, fisher(e + 2), sc);
      math::update<kRule>(pv.w, mv.w, gv.w, fisher(e + 3), sc);
      __stcs(p4 + v, pv);
      __stcs(m4 + v, mv);
    }
    tail = n4 << 2;
  }
  for (int e = tail + threadIdx.x; e < n; e += kStepThreads) {
    float pe = __ldcs(p + e), me = __ldcs(m + e);
    math::update<kRule>(pe, me, __ldcs(g + e), fisher(e), sc);
    __stcs(p + e, pe);
    __stcs(m + e, me);
  }
}

template <math::UpdateRule kRule>
__global__ void __launch_bounds__(kStepThreads) UpdateKernel(const StepLaunchArgs args) {
  // Written by GuardKernel in an earlier launch: every thread sees the same value.
  if (args.flag != nullptr && *args.flag != 0) return;
  const BlockSlot slot = args.slots[blockIdx.x];
  const StepDesc d = args.table[slot.tensor];
  const int64_t start = int64_t{slot.chunk} * kChunkElements;
  const int n = static_cast<int>(min(kChunkElements, d.numel - start));
  if (!d.preconditioned) {
    UpdateChunk<kRule, false, false>(d, start, n, args.damping);
  } else if (d.wide) {
    UpdateChunk<kRule, true, true>(d, start, n, args.damping);
  } else {
    UpdateChunk<kRule, true, false>(d, start, n, args.damping);
  }
}

size_t Align16(size_t bytes) { return (bytes + 15) / 16 * 16; }
// The sub-tables of the step's device table start at 16-byte offsets of a cudaMalloc block.
static_assert(alignof(StepDesc) <= 16 && alignof(GuardDesc) <= 16 && alignof(FactorSegment) <= 16,
              "a sub-table of the step's device table needs more than 16-byte alignment");

}  // namespace

bool CudaBackend::Step(const StepRequest& r) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  const bool refresh = r.refresh && r.segment_count > 0;

  // Guard ranges: every non-empty gradient, then (refreshing) every non-empty fresh segment.
  std::vector<GuardDesc> guards;
  if (r.guard) {
    for (size_t t = 0; t < r.tensor_count; ++t) {
      if (r.tensors[t].numel > 0) guards.push_back({r.tensors[t].grad, r.tensors[t].numel, 0});
    }
    if (refresh) {
      for (size_t s = 0; s < r.segment_count; ++s) {
        if (r.segments[s].length > 0) guards.push_back({r.fresh + r.segments[s].offset, r.segments[s].length, 1});
      }
    }
  }
  const size_t guard_count = guards.size();
  const size_t segment_count = refresh ? r.segment_count : 0;
  const int64_t guard_blocks = CountBlocks(guard_count, [&](size_t i) { return guards[i].numel; });
  const int64_t step_blocks = CountBlocks(r.tensor_count, [&](size_t t) { return r.tensors[t].numel; });
  // The device table (see NOTE: [multi-tensor launch]): descriptors, guard ranges, factor
  // segments, then the block maps of the update and guard launches.
  const size_t guard_offset = Align16(r.tensor_count * sizeof(StepDesc));
  const size_t segment_offset = guard_offset + Align16(guard_count * sizeof(GuardDesc));
  const size_t step_slots_offset = segment_offset + Align16(segment_count * sizeof(FactorSegment));
  const size_t guard_slots_offset = step_slots_offset + Align16(static_cast<size_t>(step_blocks) * sizeof(BlockSlot));
  const size_t total = guard_slots_offset + static_cast<size_t>(guard_blocks) * sizeof(BlockSlot);

  // One upload of every table.
  if (total > 0) {
    // The previous step's upload may still be reading the pinned buffer.
    ADAFISHER_CUDA_CHECK(cudaEventSynchronize(meta_uploaded_));
    if (total > meta_bytes_) {
      ADAFISHER_CUDA_CHECK(cudaStreamSynchronize(stream_));  // queued kernels may read the old table
      if (meta_device_ != nullptr) ADAFISHER_CUDA_CHECK(cudaFree(meta_device_));
      if (meta_host_ != nullptr) ADAFISHER_CUDA_CHECK(cudaFreeHost(meta_host_));
      meta_device_ = meta_host_ = nullptr;
      meta_bytes_ = 0;
      const size_t grown = std::max(total * 2, size_t{64} << 10);
      meta_device_ = DeviceMalloc(grown, "the step's launch table");  // frees idle transient blocks if it must
      ADAFISHER_CUDA_CHECK(cudaHostAlloc(&meta_host_, grown, cudaHostAllocDefault));
      meta_bytes_ = grown;
    }
    char* host = static_cast<char*>(meta_host_);
    for (size_t t = 0; t < r.tensor_count; ++t) {
      const StepDesc d = MakeStepDesc(r.tensors[t], r.running);
      std::memcpy(host + t * sizeof(StepDesc), &d, sizeof d);
    }
    if (guard_count > 0) std::memcpy(host + guard_offset, guards.data(), guard_count * sizeof(GuardDesc));
    if (segment_count > 0) {
      std::memcpy(host + segment_offset, r.segments, segment_count * sizeof(FactorSegment));
    }
    PlanBlocks(r.tensor_count, [&](size_t t) { return r.tensors[t].numel; },
               reinterpret_cast<BlockSlot*>(host + step_slots_offset));
    PlanBlocks(guard_count, [&](size_t i) { return guards[i].numel; },
               reinterpret_cast<BlockSlot*>(host + guard_slots_offset));
    ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(meta_device_, meta_host_, total, cudaMemcpyHostToDevice, stream_));
    RecordAfterPinnedCopy(meta_uploaded_, __FILE__, __LINE__);
  }
  const char* device = static_cast<const char*>(meta_device_);
  const auto* step_table = reinterpret_cast<const StepDesc*>(device);
  const auto* guard_table = reinterpret_cast<const GuardDesc*>(device + guard_offset);
  const auto* segment_table = reinterpret_cast<const FactorSegment*>(device + segment_offset);

  if (r.guard) {
    ADAFISHER_CUDA_CHECK(cudaMemsetAsync(flag_device_, 0, sizeof(int), stream_));
    if (guard_blocks > 0) {
      const GuardLaunchArgs args{reinterpret_cast<const BlockSlot*>(device + guard_slots_offset), guard_table,
                                 flag_device_};
      GuardKernel<<<static_cast<unsigned>(guard_blocks), kStepThreads, 0, stream_>>>(args);
      ADAFISHER_CUDA_LAUNCH_CHECK();
    }
    // The verdict goes to the host as soon as the guard is done; the update queued below
    // runs on while the host returns.
    ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(flag_host_, flag_device_, sizeof(int), cudaMemcpyDeviceToHost, stream_));
    RecordAfterPinnedCopy(guard_read_, __FILE__, __LINE__);
  }
  const int* flag = r.guard ? flag_device_ : nullptr;

  if (segment_count > 0) {
    RefreshKernel<<<static_cast<unsigned>(segment_count), kRefreshThreads, 0, stream_>>>(segment_table, r.fresh,
                                                                                          r.running, r.decay,
                                                                                          r.mix, flag);
    ADAFISHER_CUDA_LAUNCH_CHECK();
  }

  if (step_blocks > 0) {
    const StepLaunchArgs args{reinterpret_cast<const BlockSlot*>(device + step_slots_offset), step_table, flag,
                              r.damping};
    const unsigned blocks = static_cast<unsigned>(step_blocks);
    if (r.rule == math::UpdateRule::kAdaFisher) {
      UpdateKernel<math::UpdateRule::kAdaFisher><<<blocks, kStepThreads, 0, stream_>>>(args);
    } else {
      UpdateKernel<math::UpdateRule::kAdaFisherW><<<blocks, kStepThreads, 0, stream_>>>(args);
    }
    ADAFISHER_CUDA_LAUNCH_CHECK();
  }

  if (!r.guard) return true;
  ADAFISHER_CUDA_CHECK(cudaEventSynchronize(guard_read_));
  return *flag_host_ == 0;
}

}  // namespace cuda
}  // namespace adafisher
