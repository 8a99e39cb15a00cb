// The compute backend interface: plain C++17, no N-API. The CPU backend
// (native/core/cpu_backend.cc) and the CUDA backend (cuda/) implement it; the N-API glue
// (native/*.cc) validates every argument before calling it, so implementations may
// assume well-formed requests (non-negative sizes, in-range offsets, valid pointers for
// `numel` elements, distinct parameter/momentum/gradient storage).
//
// All pointers handed to a backend are that backend's own memory: host memory for the
// CPU backend, device memory (from allocate()) for the CUDA backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "math.h"

namespace adafisher {

using index_t = int64_t;

// Stable error codes, mirrored in lib/errors.ts (see NOTE: [error codes] there).
enum class ErrorCode : int32_t {
  kInvalidArgument = 0,  // ADAFISHER_INVALID_ARGUMENT
  kDisposed = 1,         // ADAFISHER_DISPOSED
  kForeignBuffer = 2,    // ADAFISHER_FOREIGN_BUFFER
  kOutOfMemory = 3,      // ADAFISHER_OUT_OF_MEMORY
  kCudaError = 4,        // ADAFISHER_CUDA_ERROR
  kBackendUnavailable = 5,  // ADAFISHER_BACKEND_UNAVAILABLE
  kMissingStatistics = 6,   // ADAFISHER_MISSING_STATISTICS
  kBadCheckpoint = 7,       // ADAFISHER_BAD_CHECKPOINT
  kInternal = 8,            // ADAFISHER_INTERNAL
};

const char* ErrorCodeName(ErrorCode code);

// What a backend throws. The N-API glue turns it into a JS Error with `.code`.
class BackendError : public std::runtime_error {
 public:
  BackendError(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

enum class DataFormat : int32_t { kNCHW = 0, kNHWC = 1 };

// Order of the conv patch index k (= order of the flattened weight row).
//   kChannelMajor: k = c' * kh * kw + i * kw + j   (PyTorch [out, in/g, kh, kw])
//   kChannelMinor: k = (i * kw + j) * (C/g) + c'  (TF.js [kh, kw, in, out])
enum class PatchOrder : int32_t { kChannelMajor = 0, kChannelMinor = 1 };

struct Conv2dShape {
  index_t batch = 0, channels = 0, height = 0, width = 0;  // input
  index_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1;
  index_t pad_top = 0, pad_left = 0;  // bottom/right padding is implied by out_h/out_w
  index_t out_h = 0, out_w = 0;
  index_t groups = 1;
  DataFormat format = DataFormat::kNCHW;
  PatchOrder order = PatchOrder::kChannelMajor;
};

// One parameter tensor of a step. The preconditioner of element i is
//   F = S[s_offset + (i / o_stride) % o_count] * H[h_offset + (i / k_stride) % k_count] + damping
// when `preconditioned`, else F = 1 (plain momentum). Examples:
//   PyTorch weight [out, K]: o_stride = K, o_count = out, k_stride = 1,   k_count = K
//   TF.js weight [K, out]:   o_stride = 1, o_count = out, k_stride = out, k_count = K
//   bias [out]:              o_stride = 1, o_count = out, k_stride = numel, k_count = 1, h_offset -> H[K]
struct StepTensor {
  float* param = nullptr;
  const float* grad = nullptr;
  float* momentum = nullptr;
  index_t numel = 0;
  bool preconditioned = false;
  index_t h_offset = 0, s_offset = 0;  // into StepRequest::running
  index_t o_stride = 1, o_count = 1, k_stride = 1, k_count = 1;
  math::StepScalars scalars{};
};

// A factor vector (one layer's H or S) inside the fresh and running factor buffers.
struct FactorSegment {
  index_t offset = 0;
  index_t length = 0;
};

struct StepRequest {
  math::UpdateRule rule = math::UpdateRule::kAdaFisher;
  float damping = 1e-3f;
  const StepTensor* tensors = nullptr;
  size_t tensor_count = 0;
  // Factor refresh: running[seg] <- decay * running[seg] + mix * minmax(fresh[seg]).
  bool refresh = false;
  const FactorSegment* segments = nullptr;
  size_t segment_count = 0;
  const float* fresh = nullptr;
  float* running = nullptr;
  float decay = 0.08f, mix = 0.008f;
  // Non-finite guard: when any grad is NaN or +-inf, or (on refresh) any fresh factor entry
  // is NaN, the step writes nothing at all. A fresh factor's +-inf is cleaned to 1 / 0
  // (NOTE: [guard predicate] in math.h).
  bool guard = true;
};

// One fresh-factor computation: the arguments of one of the four factor methods of
// Backend below, as data, so that a backend may run several in one launch (FactorJobs).
enum class FactorOp : int32_t { kMeanSquare, kNormInput, kNormGrad, kConv2dPatch };
struct FactorJob {
  FactorOp op = FactorOp::kMeanSquare;
  const float* x = nullptr;
  index_t outer = 0, kept = 0, inner = 0;  // the [outer, kept, inner] view (all but conv)
  double divisor = 1.0;  // kMeanSquare: count; kNormInput: u_divisor; kNormGrad: batch
  double batch = 1.0;    // kNormInput
  bool has_appended = false;  // kMeanSquare: out[kept] = appended; kConv2dPatch: has_bias
  float appended = 0.0f;
  Conv2dShape conv{};  // kConv2dPatch
  float* out = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Memory of this backend, counted in float32 elements.
  virtual float* Allocate(size_t count) = 0;  // zero-filled; throws kOutOfMemory
  virtual void Release(float* ptr) noexcept = 0;
  // Device memory for the length of one call: the device copy of a Float32Array argument
  // on a backend that cannot use host memory in place. Not zero-filled (the caller uploads
  // into all of it). A backend may keep returned blocks for later calls (cuda does: NOTE:
  // [transient device copies] in cuda/backend.cu); by default these are Allocate/Release.
  virtual float* AcquireTransient(size_t count) { return Allocate(count); }
  virtual void ReleaseTransient(float* ptr) noexcept { Release(ptr); }
  // Host memory into dst, in queue order. Upload returns with the copy done; UploadAsync
  // returns as soon as host_src may change again, possibly before the copy and the work
  // queued ahead of it are done (cuda: NOTE: [host copies] in cuda/backend.cu). By default
  // UploadAsync is Upload.
  virtual void Upload(float* dst, const float* host_src, size_t count) = 0;
  virtual void UploadAsync(float* dst, const float* host_src, size_t count) { Upload(dst, host_src, count); }
  virtual void Download(float* host_dst, const float* src, size_t count) = 0;
  virtual void Copy(float* dst, const float* src, size_t count) = 0;
  virtual void Fill(float* dst, float value, size_t count) = 0;
  virtual void Synchronize() = 0;
  virtual size_t LiveAllocations() const = 0;  // buffers and timing marks not yet released

  // Timing marks (CUDA events; on the CPU backend, whose calls are done when they return,
  // the host clock). Record puts the mark on the backend's queue after all work submitted
  // so far; ElapsedMs waits until both marks are reached and returns the milliseconds from
  // `from` to `to`. Both must have been recorded (the glue checks).
  virtual void* CreateTimingMark() = 0;  // throws on failure
  virtual void RecordTimingMark(void* mark) = 0;
  virtual double ElapsedMs(void* from, void* to) = 0;
  virtual void DestroyTimingMark(void* mark) noexcept = 0;

  // Fresh factors. x is viewed as [outer, kept, inner]; each writes `kept` (+1) floats.
  // out[b] = sum_{a,c} x[a,b,c]^2 / count; with has_appended, out[kept] = appended.
  virtual void MeanSquareFactor(const float* x, index_t outer, index_t kept, index_t inner, double count,
                                bool has_appended, float appended, float* out) = 0;
  // u[b] = sum_{a,c} x[a,b,c] / u_divisor; out = { sum_b u[b]^2 / batch^2, kept / batch^2 } (2 floats).
  virtual void NormInputFactor(const float* x, index_t outer, index_t kept, index_t inner, double u_divisor,
                               double batch, float* out) = 0;
  // out[b] = (sum_{a,c} x[a,b,c])^2 / batch.
  virtual void NormGradFactor(const float* x, index_t outer, index_t kept, index_t inner, double batch,
                              float* out) = 0;
  // H of a Conv2d: the mean square of each im2col column (K = C/g * kh * kw entries, in
  // shape.order), without materializing im2col; with has_bias, out[K] = groups.
  virtual void Conv2dPatchFactor(const float* x, const Conv2dShape& shape, bool has_bias, float* out) = 0;
  // The job's method, with its arguments.
  void RunFactorJob(const FactorJob& job);
  // jobs[0..count), whose outputs do not overlap, with the results RunFactorJob gives each
  // (bit for bit), in any order. By default one after the other; cuda reduces several mean
  // squares in one launch (NOTE: [batched factor launch] in cuda/factor_kernels.cu).
  virtual void FactorJobs(const FactorJob* jobs, size_t count) {
    for (size_t i = 0; i < count; ++i) RunFactorJob(jobs[i]);
  }

  // Guard, factor refresh and the preconditioned update of every tensor, in one call.
  // Returns false when the guard tripped (nothing was written).
  virtual bool Step(const StepRequest& request) = 0;

  // Threads the backend computes with (CPU) or 0.
  virtual int Threads() const { return 0; }
};

inline void Backend::RunFactorJob(const FactorJob& j) {
  switch (j.op) {
    case FactorOp::kMeanSquare:
      MeanSquareFactor(j.x, j.outer, j.kept, j.inner, j.divisor, j.has_appended, j.appended, j.out);
      break;
    case FactorOp::kNormInput:
      NormInputFactor(j.x, j.outer, j.kept, j.inner, j.divisor, j.batch, j.out);
      break;
    case FactorOp::kNormGrad:
      NormGradFactor(j.x, j.outer, j.kept, j.inner, j.divisor, j.out);
      break;
    case FactorOp::kConv2dPatch:
      Conv2dPatchFactor(j.x, j.conv, j.has_appended, j.out);
      break;
  }
}

// threads > 0: that many; else ADAFISHER_NUM_THREADS as `setting` gives it (the JS
// environment's process.env: a worker thread has its own; nullptr: the process environment),
// checked, or the machine's logical CPUs when unset or empty.
std::unique_ptr<Backend> CreateCpuBackend(int threads, const std::string* setting = nullptr);

// Defined in cuda/ when the addon is built with CUDA. Returns nullptr and sets *reason
// when CUDA cannot be used (no driver, no device, ...). Never throws.
std::unique_ptr<Backend> CreateCudaBackend(std::string* reason);

// Facts about the CUDA build and device, for backendInfo(). Never throws.
struct CudaInfo {
  bool compiled = false;       // built with CUDA
  bool usable = false;         // a device can be used
  std::string reason;          // why not, when !usable
  std::string device_name;
  int compute_major = 0, compute_minor = 0;
  double memory_bytes = 0;     // the device's total memory
  int driver_version = 0, runtime_version = 0;
  std::string architectures;   // e.g. "75;80;86;89;90;PTX"
};
CudaInfo QueryCuda();

}  // namespace adafisher
