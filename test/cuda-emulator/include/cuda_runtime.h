// cuda_runtime.h of the CUDA host emulator (test/cuda-emulator/README.md): the subset of
// the CUDA runtime and device language that cuda/*.cu uses, implemented on the CPU, so that
// the CUDA backend's own source (kernels, launchers, tables, streams, error paths) runs and
// is tested on machines without a GPU. Tests only: never part of the shipped addon.
//
// The kernels are compiled as C++. `__global__` functions are plain functions; a launch
// `K<<<grid, block, shared, stream>>>(args)` is rewritten at configure time (emulator.cmake)
// into `::cuda_emu::Launch(K, grid, block, shared, stream)(args)`, which copies the
// arguments like CUDA does and queues the grid on the stream. Each CUDA thread of a block
// runs on its own fiber; __syncthreads and warp shuffles switch fibers.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- device language -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// One block runs at a time on an OS thread, so block-shared memory is a thread-local static.
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

// __thread, not thread_local: no TLS wrapper call per access (and none of GCC 12's UBSan
// false "null pointer" reports on such wrappers).
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread dim3 blockDim;
extern __thread dim3 gridDim;

// Device-side min/max overloads (CUDA declares them for the integer and float types).
#define CUDA_EMU_MINMAX(T)                              \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
// Blocks never overlap here (one runs at a time, to completion), so a fence orders
// nothing that is not already ordered, and an atomic is a plain read-modify-write.
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicExch(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = value;
  return old;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

namespace cuda_emu {
// Block barrier of the calling CUDA thread; returns the OR / count of `predicate` over the block.
int BlockBarrier(int predicate, bool count);
// Warp shuffle of 8 bytes: lane l receives lane l + delta's value (its own past the segment).
unsigned long long ShuffleDown(unsigned mask, unsigned long long value, unsigned delta, int width);
}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::BlockBarrier(0, false); }
inline int __syncthreads_or(int predicate) { return cuda_emu::BlockBarrier(predicate != 0, false); }
inline int __syncthreads_count(int predicate) { return cuda_emu::BlockBarrier(predicate != 0, true); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = cuda_emu::ShuffleDown(mask, bits, delta, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ---- runtime API -------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInsufficientDriver = 35,
  cudaErrorStubLibrary = 34,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorDevicesUnavailable = 46,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotPermitted = 800,
  cudaErrorSystemDriverMismatch = 803,
  cudaErrorUnknown = 999,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr { cudaDevAttrComputeMode = 20 };
enum cudaComputeMode { cudaComputeModeDefault = 0, cudaComputeModeProhibited = 2 };

constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
constexpr unsigned cudaHostAllocDefault = 0;

namespace cuda_emu {
struct Stream;
struct Event;
}  // namespace cuda_emu
using cudaStream_t = cuda_emu::Stream*;
using cudaEvent_t = cuda_emu::Event*;

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor;
  int multiProcessorCount;
  int warpSize;
  int maxThreadsPerBlock;
};
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion, binaryVersion;
};

const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned flags);
cudaError_t cudaMallocHost(void** ptr, size_t bytes);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

namespace cuda_emu {
// Every kernel has an image for the emulated device.
cudaError_t FuncAttributes(cudaFuncAttributes* attributes);

// Queues `thread_body` (one CUDA thread's run of the kernel, arguments bound) over the grid.
// Records a launch error (cudaGetLastError) for an invalid configuration instead.
void LaunchGrid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                size_t argument_bytes, std::function<void()> thread_body);

template <typename... Params>
struct Launcher {
  const char* name;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  template <typename... Args>
  void operator()(Args&&... args) const {
    // Converted to the parameter types and copied now, as a CUDA launch does.
    std::tuple<std::decay_t<Params>...> bound(std::forward<Args>(args)...);
    auto* k = kernel;
    LaunchGrid(name, grid, block, shared_bytes, stream, sizeof(bound), [k, bound]() { std::apply(k, bound); });
  }
};

template <typename... Params>
Launcher<Params...> Launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                           size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return Launcher<Params...>{name, kernel, grid, block, shared_bytes, stream};
}
}  // namespace cuda_emu

// Programmatic dependent launch (compute capability 9.0+): here every launch runs after
// the work queued before it, so the attribute changes nothing and the device-side waits
// (cudaGridDependencySynchronize) have nothing to wait for.
enum cudaLaunchAttributeID { cudaLaunchAttributeIgnore = 0, cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
union cudaLaunchAttributeValue {
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttributeID id = config->attrs[i].id;
    if (id != cudaLaunchAttributeIgnore && id != cudaLaunchAttributeProgrammaticStreamSerialization) {
      return cudaErrorInvalidValue;  // an attribute the emulator does not know
    }
  }
  cuda_emu::Launch("cudaLaunchKernelEx", kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes,
                   config->stream)(std::forward<Args>(args)...);
  return cudaPeekAtLastError();
}

template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T* /*kernel*/) {
  return cuda_emu::FuncAttributes(attributes);
}
