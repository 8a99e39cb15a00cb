// The CUDA backend: device discovery (QueryCuda, CreateCudaBackend), the stream, memory
// and host copies. The factor and step kernels are in factor_kernels.cu and step_kernels.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_backend.h"
#include "cuda_internal.h"

#ifndef ADAFISHER_CUDA_ARCHITECTURES
#define ADAFISHER_CUDA_ARCHITECTURES ""
#endif

namespace adafisher {
namespace cuda {

std::string DescribeCudaError(cudaError_t error) {
  const char* name = cudaGetErrorName(error);
  const char* text = cudaGetErrorString(error);
  return std::string(name != nullptr ? name : "cudaErrorUnknown") + ": " + (text != nullptr ? text : "unknown error");
}

void ThrowCudaError(cudaError_t error, const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  const std::string where = std::string(slash != nullptr ? slash + 1 : file) + ":" + std::to_string(line);
  const std::string message = DescribeCudaError(error) + " at " + where;
  // A call that fails also leaves its error in this thread's last error. Unless it is
  // sticky (then every later call reports it anyway), clear it: otherwise the next
  // ADAFISHER_CUDA_LAUNCH_CHECK() would blame it on a launch that succeeded and is queued.
  cudaGetLastError();
  if (error == cudaErrorMemoryAllocation) throw BackendError(ErrorCode::kOutOfMemory, message);
  throw BackendError(ErrorCode::kCudaError, message);
}

namespace {

__global__ void ProbeKernel(int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *flag = 0;
}

__global__ void FillKernel(float* __restrict__ dst, float value, int64_t count) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += stride) dst[i] = value;
}

// ---------------------------------------------------------------------------------------
// Architectures: the CMake list (e.g. "75-real;80-real;86-real;89-real;90") as built.
struct Arch {
  int number = 0;           // 75, 90, ...
  bool sass = false;        // real code for this architecture
  bool ptx = false;         // PTX (JIT-compiled for this and newer architectures)
  bool specific = false;    // "90a": runs on exactly that architecture
};

bool ParseArchitectures(const std::string& list, std::vector<Arch>* out) {
  std::stringstream in(list);
  std::string token;
  while (std::getline(in, token, ';')) {
    if (token.empty()) continue;
    Arch a;
    std::string number = token;
    bool real = true, virt = true;
    const size_t dash = token.find('-');
    if (dash != std::string::npos) {
      number = token.substr(0, dash);
      const std::string kind = token.substr(dash + 1);
      if (kind == "real") {
        virt = false;
      } else if (kind == "virtual") {
        real = false;
      } else {
        return false;
      }
    }
    size_t digits = 0;
    while (digits < number.size() && number[digits] >= '0' && number[digits] <= '9') ++digits;
    if (digits == 0) return false;  // "all", "native", ...: not a list we can read
    a.number = std::atoi(number.substr(0, digits).c_str());
    a.specific = digits < number.size();  // "90a", "100f"
    a.sass = real;
    a.ptx = virt;
    out->push_back(a);
  }
  return true;
}

// "75;80;86;89;90;compute_90": real architectures, then the PTX ones.
std::string FormatArchitectures(const std::string& list_in) {
  // CMake's list arrives comma-separated (a ';' cannot travel through a -D define).
  std::string list = list_in;
  std::replace(list.begin(), list.end(), ',', ';');
  std::vector<Arch> archs;
  if (list.empty()) {
#if defined(__CUDA_ARCH_LIST__)
#define ADAFISHER_STRINGIFY2(...) #__VA_ARGS__
#define ADAFISHER_STRINGIFY(...) ADAFISHER_STRINGIFY2(__VA_ARGS__)
    // nvcc's own list ("750,800,900"), without the real/PTX distinction.
    std::string built = ADAFISHER_STRINGIFY(__CUDA_ARCH_LIST__);
    std::replace(built.begin(), built.end(), ',', ';');
    std::stringstream in(built);
    std::string token, result;
    while (std::getline(in, token, ';')) {
      if (token.empty()) continue;
      if (!result.empty()) result += ';';
      result += std::to_string(std::atoi(token.c_str()) / 10);
    }
    return result;
#else
    return "";
#endif
  }
  if (!ParseArchitectures(list, &archs)) return list;
  std::string result;
  for (const Arch& a : archs) {
    if (!a.sass) continue;
    if (!result.empty()) result += ';';
    result += std::to_string(a.number);
  }
  for (const Arch& a : archs) {
    if (!a.ptx) continue;
    if (!result.empty()) result += ';';
    result += "compute_" + std::to_string(a.number);
  }
  return result;
}

// Whether the build has code that runs on compute capability `cc` (e.g. 86). Unknown
// lists count as covering: creating the backend then checks for real.
bool ArchitecturesCover(const std::string& list, int cc) {
  std::vector<Arch> archs;
  if (list.empty() || !ParseArchitectures(list, &archs)) return true;
  for (const Arch& a : archs) {
    if (a.specific) {
      if (a.number == cc) return true;
      continue;
    }
    if (a.sass && a.number / 10 == cc / 10 && a.number % 10 <= cc % 10) return true;  // same major
    if (a.ptx && a.number <= cc) return true;
  }
  return false;
}

std::string VersionString(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

// Why cudaGetDeviceCount failed, in words a user can act on.
std::string ExplainInitError(cudaError_t error, int driver_version, int runtime_version) {
  const std::string detail = " (" + DescribeCudaError(error) + ")";
  switch (error) {
    case cudaErrorInsufficientDriver:
      // The runtime's own text ("driver version is insufficient") reads as a too-old driver
      // where there is none at all: say that.
      if (driver_version == 0) return "no NVIDIA driver found (the CUDA driver library, libcuda, could not be loaded)";
      return "the NVIDIA driver supports CUDA " + VersionString(driver_version) + " but this build needs CUDA " +
             VersionString(runtime_version) + "; update the driver" + detail;
    case cudaErrorNoDevice: {
      const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
      std::string hint = visible != nullptr ? std::string(" with CUDA_VISIBLE_DEVICES=") + visible : "";
      return "no CUDA device found" + hint + detail;
    }
    case cudaErrorStubLibrary:
      return "no CUDA driver found (only the stub driver library is installed)" + detail;
    case cudaErrorInitializationError:
      return "the CUDA driver failed to initialize" + detail;
    case cudaErrorSystemDriverMismatch:
      return "the NVIDIA kernel module and user-mode driver versions differ; reinstall the driver or reboot" + detail;
    case cudaErrorDevicesUnavailable:
      return "every CUDA device is busy or unavailable (exclusive or prohibited compute mode)" + detail;
    case cudaErrorNotPermitted:
      return "this process is not permitted to use CUDA" + detail;
    default:
      return "CUDA cannot be used" + detail;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// CudaBackend: construction, memory, copies.

CudaBackend::CudaBackend(int device) : device_(device) {
  try {
    Activate();
    cudaFuncAttributes attributes;
    const cudaError_t image = cudaFuncGetAttributes(&attributes, ProbeKernel);
    if (image == cudaErrorNoKernelImageForDevice || image == cudaErrorInvalidDeviceFunction) {
      cudaGetLastError();
      throw BackendError(ErrorCode::kBackendUnavailable,
                         "this binary has no kernels for this GPU (built for " +
                             FormatArchitectures(ADAFISHER_CUDA_ARCHITECTURES) + "; " + DescribeCudaError(image) + ")");
    }
    ADAFISHER_CUDA_CHECK(image);
    // The factor kernels wait for their predecessors (griddepcontrol) only where their image
    // was compiled for compute capability 9.0+ (NOTE: [programmatic dependent launch]).
    int factor_ptx = 0;
    ADAFISHER_CUDA_CHECK(FactorKernelPtxVersion(&factor_ptx));
    programmatic_launch_ = factor_ptx >= 90;
    ADAFISHER_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    for (cudaEvent_t& e : staging_done_) ADAFISHER_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    ADAFISHER_CUDA_CHECK(cudaEventCreateWithFlags(&meta_uploaded_, cudaEventDisableTiming));
    ADAFISHER_CUDA_CHECK(cudaEventCreateWithFlags(&guard_read_, cudaEventDisableTiming));
    ADAFISHER_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&flag_device_), sizeof(int)));
    ADAFISHER_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&flag_host_), sizeof(int), cudaHostAllocDefault));
    // One launch proves that kernels load and run on this device.
    ProbeKernel<<<1, 1, 0, stream_>>>(flag_device_);
    ADAFISHER_CUDA_LAUNCH_CHECK();
    ADAFISHER_CUDA_CHECK(cudaStreamSynchronize(stream_));
  } catch (...) {
    FreeResources();
    throw;
  }
}

CudaBackend::~CudaBackend() { FreeResources(); }

void CudaBackend::FreeResources() noexcept {
  // Nothing here may throw; errors (a faulted context) are ignored.
  cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  TrimTransient(0);  // leased blocks cannot outlive the backend: their holders own it
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (tickets_ != nullptr) cudaFree(tickets_);
  if (meta_device_ != nullptr) cudaFree(meta_device_);
  if (meta_host_ != nullptr) cudaFreeHost(meta_host_);
  if (flag_device_ != nullptr) cudaFree(flag_device_);
  if (flag_host_ != nullptr) cudaFreeHost(flag_host_);
  for (float* s : staging_) {
    if (s != nullptr) cudaFreeHost(s);
  }
  for (cudaEvent_t e : staging_done_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (meta_uploaded_ != nullptr) cudaEventDestroy(meta_uploaded_);
  if (guard_read_ != nullptr) cudaEventDestroy(guard_read_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  scratch_ = meta_device_ = meta_host_ = nullptr;
  tickets_ = nullptr;
  ticket_bytes_ = 0;
  flag_device_ = flag_host_ = nullptr;
  staging_[0] = staging_[1] = nullptr;
  staging_done_[0] = staging_done_[1] = nullptr;
  meta_uploaded_ = nullptr;
  guard_read_ = nullptr;
  stream_ = nullptr;
  cudaGetLastError();
}

void CudaBackend::Activate() const { ADAFISHER_CUDA_CHECK(cudaSetDevice(device_)); }

cudaError_t CudaBackend::SynchronizeNoThrow() const noexcept {
  cudaError_t error = cudaSetDevice(device_);
  if (error == cudaSuccess) error = cudaStreamSynchronize(stream_);
  return error;
}

bool CudaBackend::StreamBusy() const noexcept {
  if (cudaSetDevice(device_) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const cudaError_t status = cudaStreamQuery(stream_);
  // Neither a real error nor cudaErrorNotReady is kept as this thread's last error (as
  // PyTorch's CUDAStream::query does): a later launch check must not report it.
  if (status != cudaSuccess) cudaGetLastError();
  return status == cudaErrorNotReady;
}

void CudaBackend::Synchronize() {
  const cudaError_t error = SynchronizeNoThrow();
  if (error != cudaSuccess) ThrowCudaError(error, __FILE__, __LINE__);
}

// Timing marks are CUDA events (with timing) recorded on the backend's stream.
void* CudaBackend::CreateTimingMark() {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  cudaEvent_t event = nullptr;
  ADAFISHER_CUDA_CHECK(cudaEventCreate(&event));
  live_.fetch_add(1, std::memory_order_relaxed);
  return event;
}

void CudaBackend::RecordTimingMark(void* mark) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  ADAFISHER_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(mark), stream_));
}

double CudaBackend::ElapsedMs(void* from, void* to) {
  // Waiting on an event needs no lock: other threads may keep queueing work meanwhile.
  Activate();
  ADAFISHER_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(from)));
  ADAFISHER_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(to)));
  float ms = 0.0f;
  ADAFISHER_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(from), static_cast<cudaEvent_t>(to)));
  return ms;
}

void CudaBackend::DestroyTimingMark(void* mark) noexcept {
  if (mark == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (cudaSetDevice(device_) == cudaSuccess) cudaEventDestroy(static_cast<cudaEvent_t>(mark));
  cudaGetLastError();
  live_.fetch_sub(1, std::memory_order_relaxed);
}

void CudaBackend::GrowDeviceBuffer(void** buffer, size_t* capacity, size_t bytes, size_t minimum) {
  // Kernels still queued may use the old buffer.
  ADAFISHER_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (*buffer != nullptr) ADAFISHER_CUDA_CHECK(cudaFree(*buffer));
  *buffer = nullptr;
  *capacity = 0;
  const size_t grown = std::max(bytes, minimum);
  *buffer = DeviceMalloc(grown, "scratch");
  *capacity = grown;
}

void* CudaBackend::Scratch(size_t bytes) {
  if (bytes > scratch_bytes_) GrowDeviceBuffer(&scratch_, &scratch_bytes_, bytes, size_t{1} << 20);
  return scratch_;
}

unsigned* CudaBackend::Tickets(size_t count) {
  const size_t bytes = count * sizeof(unsigned);
  if (bytes > ticket_bytes_) {
    GrowDeviceBuffer(&tickets_, &ticket_bytes_, bytes, 4096 * sizeof(unsigned));
    const cudaError_t zeroed = cudaMemsetAsync(tickets_, 0, ticket_bytes_, stream_);
    if (zeroed != cudaSuccess) {
      ticket_bytes_ = 0;  // not zeroed: the next call zeroes a new buffer
      ThrowCudaError(zeroed, __FILE__, __LINE__);
    }
  }
  return static_cast<unsigned*>(tickets_);
}

namespace {

constexpr size_t kMaxFloats = SIZE_MAX / 2 / sizeof(float);  // leaves room for rounding up

void CheckFloatCount(size_t count) {
  if (count > kMaxFloats) {
    throw BackendError(ErrorCode::kOutOfMemory, "cudaErrorMemoryAllocation: cannot allocate " + std::to_string(count) +
                                                    " floats (size overflows)");
  }
}

// The size class of a transient block of `count` floats: 256-byte granules up to 1 MiB,
// above that eighths of the size's power of two (at most 12.5 % unused), so that the
// arguments of the same shape call after call land in the same class.
size_t TransientBytes(size_t count) {
  const size_t bytes = std::max<size_t>(count, 1) * sizeof(float);
  if (bytes <= (size_t{1} << 20)) return (bytes + 255) / 256 * 256;
  size_t top = size_t{1} << 20;
  while (top <= bytes / 2) top *= 2;  // the largest power of two <= bytes
  const size_t step = top / 8;
  return (bytes + step - 1) / step * step;
}

}  // namespace

void* CudaBackend::DeviceMalloc(size_t bytes, const std::string& what) {
  void* p = nullptr;
  cudaError_t error = cudaMalloc(&p, bytes);
  if (error == cudaErrorMemoryAllocation && !transient_idle_.empty()) {
    cudaGetLastError();
    TrimTransient(0);
    error = cudaMalloc(&p, bytes);
  }
  if (error == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    cudaGetLastError();
    throw BackendError(ErrorCode::kOutOfMemory, "cudaErrorMemoryAllocation: out of GPU memory allocating " + what + " (" +
                                                    std::to_string(bytes) + " bytes; " + std::to_string(free_bytes >> 20) +
                                                    " MiB free of " + std::to_string(total_bytes >> 20) + " MiB; " +
                                                    std::to_string(live_.load(std::memory_order_relaxed)) +
                                                    " allocations live: buffers and optimizers dropped without dispose() "
                                                    "are freed only once the event loop turns)");
  }
  ADAFISHER_CUDA_CHECK(error);
  return p;
}

float* CudaBackend::Allocate(size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  CheckFloatCount(count);
  // 256-byte granules; at least one so that every allocation is a distinct pointer.
  const size_t bytes = (std::max<size_t>(count, 1) * sizeof(float) + 255) / 256 * 256;
  void* p = DeviceMalloc(bytes, std::to_string(count) + " floats");
  const cudaError_t zero = cudaMemsetAsync(p, 0, bytes, stream_);
  if (zero != cudaSuccess) {
    cudaFree(p);
    ThrowCudaError(zero, __FILE__, __LINE__);
  }
  live_.fetch_add(1, std::memory_order_relaxed);
  return static_cast<float*>(p);
}

// NOTE: [transient device copies]
// A Float32Array argument on this backend is copied into device memory for the length of
// the call (and, for a parameter, back). cudaMalloc and cudaFree per argument per call
// would cost more than many a step: cudaFree waits for the whole device. Returned blocks
// therefore stay idle here, and the next call's argument of the same size class takes one
// back. No wait is needed for that: all work is on the one stream, so the new upload runs
// after every kernel that read the old contents. Idle blocks beyond the most ever leased
// at once are freed, oldest first, and all of them when a cudaMalloc finds the device full.
float* CudaBackend::AcquireTransient(size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  CheckFloatCount(count);
  const size_t bytes = TransientBytes(count);
  transient_leased_.reserve(transient_leased_.size() + 1);
  transient_idle_.reserve(transient_idle_.size() + transient_leased_.size() + 1);  // ReleaseTransient cannot fail
  void* p = nullptr;
  for (size_t i = transient_idle_.size(); i-- > 0;) {  // the most recently returned first
    if (transient_idle_[i].bytes != bytes) continue;
    p = transient_idle_[i].ptr;
    transient_idle_.erase(transient_idle_.begin() + static_cast<std::ptrdiff_t>(i));
    transient_idle_bytes_ -= bytes;
    break;
  }
  if (p == nullptr) p = DeviceMalloc(bytes, std::to_string(count) + " floats");
  transient_leased_.push_back({p, bytes});
  transient_leased_bytes_ += bytes;
  transient_peak_bytes_ = std::max(transient_peak_bytes_, transient_leased_bytes_);
  live_.fetch_add(1, std::memory_order_relaxed);
  return static_cast<float*>(p);
}

void CudaBackend::ReleaseTransient(float* ptr) noexcept {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < transient_leased_.size(); ++i) {
    if (transient_leased_[i].ptr != ptr) continue;
    const TransientBlock block = transient_leased_[i];
    transient_leased_.erase(transient_leased_.begin() + static_cast<std::ptrdiff_t>(i));
    transient_leased_bytes_ -= block.bytes;
    transient_idle_.push_back(block);  // capacity reserved by AcquireTransient
    transient_idle_bytes_ += block.bytes;
    live_.fetch_sub(1, std::memory_order_relaxed);
    break;
  }
  TrimTransient(transient_peak_bytes_);
}

void CudaBackend::TrimTransient(size_t keep_bytes) noexcept {
  size_t drop = 0;
  for (size_t idle = transient_idle_bytes_; drop < transient_idle_.size() && idle > keep_bytes; ++drop)
    idle -= transient_idle_[drop].bytes;
  if (drop == 0) return;
  // A released block may still be read by kernels queued before its release: the stream
  // drains first (as in Release; cudaFree's own wait for the device is not a documented
  // guarantee). A faulted context makes these fail; then the pointers are forgotten.
  if (cudaSetDevice(device_) == cudaSuccess) {
    cudaStreamSynchronize(stream_);
    for (size_t i = 0; i < drop; ++i) cudaFree(transient_idle_[i].ptr);
  }
  cudaGetLastError();
  for (size_t i = 0; i < drop; ++i) transient_idle_bytes_ -= transient_idle_[i].bytes;
  transient_idle_.erase(transient_idle_.begin(), transient_idle_.begin() + static_cast<std::ptrdiff_t>(drop));
}

void CudaBackend::Release(float* ptr) noexcept {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  // Queued kernels may still use the buffer; a faulted context makes these fail, and then
  // there is nothing better to do than to forget the pointer.
  if (cudaSetDevice(device_) == cudaSuccess) {
    cudaStreamSynchronize(stream_);
    cudaFree(ptr);
  }
  cudaGetLastError();
  live_.fetch_sub(1, std::memory_order_relaxed);
}

bool CudaBackend::EnsureStaging() {
  if (staging_[0] != nullptr) return true;
  if (staging_failed_) return false;
  for (float*& s : staging_) {
    if (cudaHostAlloc(reinterpret_cast<void**>(&s), kStagingBytes, cudaHostAllocDefault) != cudaSuccess) {
      // Pinned memory is a limited resource; pageable copies still work, only slower.
      cudaGetLastError();
      s = nullptr;
      staging_failed_ = true;
    }
  }
  if (staging_failed_) {
    for (float*& s : staging_) {
      if (s != nullptr) cudaFreeHost(s);
      s = nullptr;
    }
    return false;
  }
  return true;
}

// NOTE: [host copies]
// cudaMemcpyAsync from pageable host memory is staged by the driver through its own small
// pinned buffers, synchronously, at a fraction of the bus bandwidth. Copies of 1 MiB and
// more go through two 4 MiB pinned buffers instead: while the GPU copies one, the CPU fills
// (upload) or drains (download) the other. Smaller copies are not worth the memcpy.
//
// An upload is queued like a kernel: a pageable copy returns once the driver has taken the
// source, a staged one once the last chunk is in a pinned buffer (the next staged copy waits
// for both buffers' events before it refills them). CUDA's "API synchronization behavior"
// page promises the first only in part: a pageable copy "might be synchronous", the driver
// "may synchronize with the stream and stage the copy". Small copies travel inline with the
// command and do not wait; whether copies between 64 KiB and the staging threshold do, the
// harness case memory/upload_async measures on a GPU (its 256 KiB size). Only DeviceBuffer.upload, whose contract is
// "returns with the data in place", then waits for the stream (Upload). The device copies of
// Float32Array arguments (UploadAsync, NOTE: [transient device copies]) do not: the kernels
// that read them are queued behind them, so a call given Float32Arrays no longer waits for
// the GPU to finish everything queued before it, once per argument.
void CudaBackend::EnqueueUpload(float* dst, const float* host_src, size_t count) {
  const size_t bytes = count * sizeof(float);
  if (bytes < kStagingThreshold || !EnsureStaging()) {
    ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
    return;
  }
  // Both buffers idle (a copy that threw half-way may have left one in flight).
  for (cudaEvent_t e : staging_done_) ADAFISHER_CUDA_CHECK(cudaEventSynchronize(e));
  const size_t per = kStagingBytes / sizeof(float);
  size_t chunk = 0;
  for (size_t done = 0; done < count; done += per, ++chunk) {
    const size_t b = chunk % 2;
    const size_t n = std::min(per, count - done);
    if (chunk >= 2) ADAFISHER_CUDA_CHECK(cudaEventSynchronize(staging_done_[b]));  // buffer b is free again
    std::memcpy(staging_[b], host_src + done, n * sizeof(float));
    ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(dst + done, staging_[b], n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    RecordAfterPinnedCopy(staging_done_[b], __FILE__, __LINE__);
  }
}

void CudaBackend::RecordAfterPinnedCopy(cudaEvent_t event, const char* file, int line) {
  const cudaError_t recorded = cudaEventRecord(event, stream_);
  if (recorded == cudaSuccess) return;
  cudaStreamSynchronize(stream_);
  ThrowCudaError(recorded, file, line);
}

void CudaBackend::Upload(float* dst, const float* host_src, size_t count) {
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  EnqueueUpload(dst, host_src, count);
  ADAFISHER_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::UploadAsync(float* dst, const float* host_src, size_t count) {
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  EnqueueUpload(dst, host_src, count);
}

void CudaBackend::Download(float* host_dst, const float* src, size_t count) {
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  const size_t bytes = count * sizeof(float);
  if (bytes < kStagingThreshold || !EnsureStaging()) {
    ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    ADAFISHER_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return;
  }
  for (cudaEvent_t e : staging_done_) ADAFISHER_CUDA_CHECK(cudaEventSynchronize(e));
  const size_t per = kStagingBytes / sizeof(float);
  const size_t chunks = (count + per - 1) / per;
  auto enqueue = [&](size_t c) {
    const size_t b = c % 2;
    const size_t n = std::min(per, count - c * per);
    ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(staging_[b], src + c * per, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    RecordAfterPinnedCopy(staging_done_[b], __FILE__, __LINE__);
  };
  enqueue(0);
  for (size_t c = 0; c < chunks; ++c) {
    // Buffer (c + 1) % 2 was drained in the previous iteration: refill it while we drain c.
    if (c + 1 < chunks) enqueue(c + 1);
    const size_t b = c % 2;
    const size_t n = std::min(per, count - c * per);
    ADAFISHER_CUDA_CHECK(cudaEventSynchronize(staging_done_[b]));
    std::memcpy(host_dst + c * per, staging_[b], n * sizeof(float));
  }
}

void CudaBackend::CopyThroughDevice(float* dst, const float* src, size_t count) {
  void* tmp = Scratch(count * sizeof(float));
  ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(tmp, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(dst, tmp, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::Copy(float* dst, const float* src, size_t count) {
  if (count == 0 || dst == src) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  const bool overlap = dst < src + count && src < dst + count;
  if (overlap) {
    // cudaMemcpy leaves overlapping ranges undefined; the CPU backend has memmove semantics.
    CopyThroughDevice(dst, src, count);
    return;
  }
  ADAFISHER_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::Fill(float* dst, float value, size_t count) {
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (bits == 0) {
    ADAFISHER_CUDA_CHECK(cudaMemsetAsync(dst, 0, count * sizeof(float), stream_));
    return;
  }
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((static_cast<int64_t>(count) + threads - 1) / threads, 8192);
  FillKernel<<<static_cast<unsigned>(blocks), threads, 0, stream_>>>(dst, value, static_cast<int64_t>(count));
  ADAFISHER_CUDA_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------

bool SynchronizeStream(Backend* backend, std::string* error) noexcept {
  auto* cuda_backend = dynamic_cast<CudaBackend*>(backend);
  if (cuda_backend == nullptr) {
    if (error != nullptr) {
      try {
        *error = "not a CUDA backend";
      } catch (...) {
      }
    }
    return false;
  }
  const cudaError_t status = cuda_backend->SynchronizeNoThrow();
  if (status == cudaSuccess) return true;
  if (error != nullptr) {
    try {
      *error = DescribeCudaError(status);
    } catch (...) {
    }
  }
  return false;
}

bool StreamBusy(Backend* backend) noexcept {
  auto* cuda_backend = dynamic_cast<CudaBackend*>(backend);
  return cuda_backend != nullptr && cuda_backend->StreamBusy();
}

bool IsCudaBackend(const Backend* backend) noexcept { return dynamic_cast<const CudaBackend*>(backend) != nullptr; }

size_t IdleTransientBytes(const Backend* backend) noexcept {
  const auto* cuda = dynamic_cast<const CudaBackend*>(backend);
  return cuda != nullptr ? cuda->IdleTransientBytes() : 0;
}

}  // namespace cuda

CudaInfo QueryCuda() {
  CudaInfo info;
  info.compiled = true;
  try {
    const std::string archs = ADAFISHER_CUDA_ARCHITECTURES;
    info.architectures = cuda::FormatArchitectures(archs);
    if (cudaRuntimeGetVersion(&info.runtime_version) != cudaSuccess) info.runtime_version = 0;
    if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;  // 0: no driver
    int count = 0;
    const cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) {
      cudaGetLastError();
      info.reason = cuda::ExplainInitError(error, info.driver_version, info.runtime_version);
      return info;
    }
    if (count <= 0) {
      info.reason = "no CUDA device found";
      return info;
    }
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) device = 0;
    cudaDeviceProp prop;
    cudaError_t prop_error = cudaGetDeviceProperties(&prop, device);
    if (prop_error != cudaSuccess) {
      cudaGetLastError();
      info.reason = "cannot read the properties of CUDA device " + std::to_string(device) + " (" +
                    cuda::DescribeCudaError(prop_error) + ")";
      return info;
    }
    info.device_name = prop.name;
    info.compute_major = prop.major;
    info.compute_minor = prop.minor;
    info.memory_bytes = static_cast<double>(prop.totalGlobalMem);
    int mode = 0;
    if (cudaDeviceGetAttribute(&mode, cudaDevAttrComputeMode, device) == cudaSuccess &&
        mode == cudaComputeModeProhibited) {
      info.reason = "CUDA device " + std::to_string(device) + " (" + info.device_name +
                    ") is in prohibited compute mode";
      return info;
    }
    cudaGetLastError();
    const int cc = prop.major * 10 + prop.minor;
    if (!cuda::ArchitecturesCover(archs, cc)) {
      info.reason = "this binary has no kernels for compute capability " + std::to_string(prop.major) + "." +
                    std::to_string(prop.minor) + " (" + info.device_name + "); it was built for " +
                    info.architectures;
      return info;
    }
    info.usable = true;
  } catch (...) {
    info.usable = false;
    try {
      info.reason = "CUDA query failed";
    } catch (...) {
    }
  }
  return info;
}

std::unique_ptr<Backend> CreateCudaBackend(std::string* reason) {
  auto fail = [reason](const std::string& why) -> std::unique_ptr<Backend> {
    if (reason != nullptr) {
      try {
        *reason = why;
      } catch (...) {
      }
    }
    return nullptr;
  };
  try {
    const CudaInfo info = QueryCuda();
    if (!info.usable) return fail(info.reason);
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
      cudaGetLastError();
      device = 0;
    }
    return std::make_unique<cuda::CudaBackend>(device);
  } catch (const BackendError& e) {
    return fail(std::string("CUDA backend initialization failed: ") + e.what());
  } catch (const std::bad_alloc&) {
    return fail("CUDA backend initialization failed: out of host memory");
  } catch (...) {
    return fail("CUDA backend initialization failed");
  }
}

}  // namespace adafisher
