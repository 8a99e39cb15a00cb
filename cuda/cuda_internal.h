// Internal to cuda/: the CudaBackend class (its methods are defined across backend.cu,
// factor_kernels.cu and step_kernels.cu) and the CUDA error checks. Included only by .cu
// files.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"

namespace adafisher {
namespace cuda {

// Throws BackendError(kCudaError, "<cudaErrorName>: <description> at <file>:<line>"), or
// kOutOfMemory for cudaErrorMemoryAllocation (after clearing it from cudaGetLastError).
[[noreturn]] void ThrowCudaError(cudaError_t error, const char* file, int line);

// "<cudaErrorName>: <description>".
std::string DescribeCudaError(cudaError_t error);

// The PTX version of the factor kernels' image for the current device (factor_kernels.cu):
// 90 and up, they wait for their predecessor (NOTE: [programmatic dependent launch]).
cudaError_t FactorKernelPtxVersion(int* version);

}  // namespace cuda
}  // namespace adafisher

// Every runtime call goes through this; every launch is followed by
// ADAFISHER_CUDA_LAUNCH_CHECK() (compare C10_CUDA_KERNEL_LAUNCH_CHECK).
#define ADAFISHER_CUDA_CHECK(expr)                                                \
  do {                                                                            \
    const cudaError_t adafisher_cuda_error_ = (expr);                             \
    if (adafisher_cuda_error_ != cudaSuccess) {                                   \
      ::adafisher::cuda::ThrowCudaError(adafisher_cuda_error_, __FILE__, __LINE__); \
    }                                                                             \
  } while (0)
#define ADAFISHER_CUDA_LAUNCH_CHECK() ADAFISHER_CUDA_CHECK(cudaGetLastError())

namespace adafisher {
namespace cuda {

// What a factor reduction writes once its partials are added (NOTE: [last-block epilogue]
// in factor_kernels.cu): nothing (its caller finishes), or the mean square or norm grad
// entries. The kind is a template parameter of the kernels, the arguments a kernel argument.
enum class Finish { kPartials, kMeanSquare, kNormGrad };
struct FinishArgs {
  double divisor = 1.0;       // count (mean square) or batch (norm grad)
  bool has_appended = false;  // mean square: out[kept] = appended, written by block 0
  float appended = 0.0f;
  float* out = nullptr;
  unsigned* tickets = nullptr;  // set by ReduceKept when a group has several blocks
};

class CudaBackend final : public Backend {
 public:
  // Creates the stream and the small pinned buffers on `device`; throws BackendError.
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return "cuda"; }

  float* Allocate(size_t count) override;
  void Release(float* ptr) noexcept override;
  float* AcquireTransient(size_t count) override;
  void ReleaseTransient(float* ptr) noexcept override;
  void Upload(float* dst, const float* host_src, size_t count) override;
  void UploadAsync(float* dst, const float* host_src, size_t count) override;
  void Download(float* host_dst, const float* src, size_t count) override;
  void Copy(float* dst, const float* src, size_t count) override;
  void Fill(float* dst, float value, size_t count) override;
  // Thread-safe, lock-free: see NOTE: [cuda threading] in cuda_backend.h.
  void Synchronize() override;
  void* CreateTimingMark() override;
  void RecordTimingMark(void* mark) override;
  double ElapsedMs(void* from, void* to) override;
  void DestroyTimingMark(void* mark) noexcept override;
  size_t LiveAllocations() const override { return live_.load(std::memory_order_relaxed); }

  void MeanSquareFactor(const float* x, index_t outer, index_t kept, index_t inner, double count, bool has_appended,
                        float appended, float* out) override;
  void NormInputFactor(const float* x, index_t outer, index_t kept, index_t inner, double u_divisor, double batch,
                       float* out) override;
  void NormGradFactor(const float* x, index_t outer, index_t kept, index_t inner, double batch, float* out) override;
  void Conv2dPatchFactor(const float* x, const Conv2dShape& shape, bool has_bias, float* out) override;

  void FactorJobs(const FactorJob* jobs, size_t count) override;
  bool Step(const StepRequest& request) override;

  size_t IdleTransientBytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return transient_idle_bytes_;
  }
  // Waits for the stream; returns the CUDA error instead of throwing.
  cudaError_t SynchronizeNoThrow() const noexcept;
  // True while queued work has not finished (lock-free, like SynchronizeNoThrow).
  bool StreamBusy() const noexcept;

 private:
  enum class ReduceOp { kSquare, kValue };
  void FreeResources() noexcept;
  // Makes device_ current on the calling thread (the runtime's current device is per thread).
  void Activate() const;
  // cudaMalloc of `bytes`; when the device is out of memory, frees the idle transient
  // blocks and tries once more, then throws kOutOfMemory naming `what`.
  void* DeviceMalloc(size_t bytes, const std::string& what);
  // Frees the oldest idle transient blocks until at most `keep_bytes` stay idle.
  void TrimTransient(size_t keep_bytes) noexcept;
  // Queues the copy of host_src into dst; returns once host_src may change (mutex_ held).
  void EnqueueUpload(float* dst, const float* host_src, size_t count);
  // Records `event` behind a copy just queued from or to pinned host memory, the event the
  // host waits on before it touches that memory again. If the record fails, the event keeps
  // an older completion and that wait would return while the copy may still run: the stream
  // drains before the error is thrown (reported at the caller's file and line).
  void RecordAfterPinnedCopy(cudaEvent_t event, const char* file, int line);
  // Replaces *buffer (of *capacity bytes) by one of max(bytes, minimum) bytes, after the
  // queued kernels that may use it; contents are not kept.
  void GrowDeviceBuffer(void** buffer, size_t* capacity, size_t bytes, size_t minimum);
  // Device scratch of at least `bytes`, reused by every call (stream order keeps uses
  // apart); grows by reallocation after a stream sync.
  void* Scratch(size_t bytes);
  // Zeroed device counters, at least `count`, reused by every call: the tickets of the
  // last-block epilogues (NOTE: [last-block epilogue] in factor_kernels.cu). Every kernel
  // that draws tickets puts them back to zero before it ends. Grows like Scratch.
  unsigned* Tickets(size_t count);
  // Reduces x viewed as [outer, kept, inner] over (outer, inner). Writes partial[r * kept + b],
  // r < returned rows, and, unless `finish` is kPartials, the finished factor to args.out;
  // 0 rows (nothing launched, nothing written) when there is nothing to read.
  int64_t ReduceKept(ReduceOp op, const float* x, index_t outer, index_t kept, index_t inner, Finish finish,
                     FinishArgs args, double** partial);
  // The launches of jobs[0..count), all of the plan kind Plan (ColumnPlan, PlanePlan: mean
  // squares with something to read, one launch; ConvPlan: batchable conv patch factors, two
  // launches), at most a batch's jobs: NOTE: [batched factor launch] in factor_kernels.cu.
  template <typename Plan>
  void LaunchFactorBatch(const FactorJob* const* jobs, size_t count);
  bool EnsureStaging();
  void CopyThroughDevice(float* dst, const float* src, size_t count);

  int device_ = 0;
  // Factor kernels may be launched with programmatic stream serialization (NOTE:
  // [programmatic dependent launch] in factor_kernels.cu): their image has griddepcontrol.
  bool programmatic_launch_ = false;
  cudaStream_t stream_ = nullptr;
  mutable std::mutex mutex_;
  std::atomic<size_t> live_{0};

  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  void* tickets_ = nullptr;  // unsigned counters (Tickets)
  size_t ticket_bytes_ = 0;

  // Large host copies go through two pinned buffers (see Upload / Download).
  static constexpr size_t kStagingBytes = size_t{4} << 20;
  static constexpr size_t kStagingThreshold = size_t{1} << 20;
  float* staging_[2] = {nullptr, nullptr};
  cudaEvent_t staging_done_[2] = {nullptr, nullptr};
  bool staging_failed_ = false;

  // Device copies of Float32Array arguments, kept for the next call (NOTE: [transient
  // device copies] in backend.cu). Idle blocks oldest first.
  struct TransientBlock {
    void* ptr;
    size_t bytes;
  };
  std::vector<TransientBlock> transient_idle_;
  std::vector<TransientBlock> transient_leased_;
  size_t transient_idle_bytes_ = 0;
  size_t transient_leased_bytes_ = 0;
  size_t transient_peak_bytes_ = 0;  // the most ever leased at once

  // Step: tables uploaded from a pinned buffer; meta_uploaded_ marks when the host side is free.
  void* meta_host_ = nullptr;
  void* meta_device_ = nullptr;
  size_t meta_bytes_ = 0;
  cudaEvent_t meta_uploaded_ = nullptr;
  cudaEvent_t guard_read_ = nullptr;  // the guard's flag is in flag_host_ (NOTE: [guarded step])
  int* flag_device_ = nullptr;
  int* flag_host_ = nullptr;  // pinned
};

}  // namespace cuda
}  // namespace adafisher
