// Self-test of the CUDA host emulator: that it computes what CUDA computes (thread and
// block indices, __syncthreads, warp shuffles) and catches what it claims to catch
// (reads before a stream sync, bad copies and launch configurations, divergent barriers,
// host access to device memory, out-of-memory). Each case prints PASS/FAIL; the last line
// is "summary: N cases, N failed". Cases that leave the emulated device faulted (sticky
// errors) or crash on purpose run in a forked child.
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

int g_cases = 0, g_failed = 0;
void Check(const std::string& name, bool ok, const std::string& detail = "") {
  ++g_cases;
  if (!ok) ++g_failed;
  std::printf("%s %-44s %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
}

// Runs body in a child; returns its wait status.
int InChild(const std::function<int()>& body) {
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    const int rc = body();
    std::fflush(stdout);
    _exit(rc);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

__global__ void IndexKernel(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * blockDim.x * blockDim.y * blockDim.z + thread] = block * 10000 + thread;
}

__global__ void ReverseKernel(int* out, int n) {
  __shared__ int s[1024];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + 1000 * static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * n + threadIdx.x] = s[n - 1 - static_cast<int>(threadIdx.x)];
}

__global__ void VoteKernel(int* out) {
  const int any_odd = __syncthreads_or(threadIdx.x == 37);
  const int count = __syncthreads_count(threadIdx.x % 3 == 0);
  if (threadIdx.x == 0) out[0] = any_odd, out[1] = count;
}

__global__ void WarpSumKernel(double* out) {
  double v = threadIdx.x;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) out[threadIdx.x / 32] = v;
}

// A partial last warp of 8 threads: reading lane + 4 is fine, lane + 16 does not exist.
__global__ void PartialWarpKernel(float* out, unsigned delta) {
  const unsigned members = min(32u, blockDim.x - (threadIdx.x & ~31u));
  const unsigned mask = members == 32 ? 0xffffffffu : (1u << members) - 1u;
  out[threadIdx.x] = __shfl_down_sync(mask, static_cast<float>(threadIdx.x), delta, 8);
}

__global__ void PartialWarpKernel32(float* out) {
  const unsigned members = min(32u, blockDim.x - (threadIdx.x & ~31u));
  const unsigned mask = members == 32 ? 0xffffffffu : (1u << members) - 1u;
  out[threadIdx.x] = __shfl_down_sync(mask, 1.0f, 16);
}

__global__ void WriteKernel(float* p, float v) { p[threadIdx.x] = v; }

__global__ void DivergentBarrierKernel(int* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void BadMaskKernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 32) v = __shfl_down_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

void PartialWarpKernelWide(float* d) {
  cuda_emu::Launch("PartialWarpKernel", PartialWarpKernel, 1, 40, 0, nullptr)(d, 4u);
  // Width 32 over the 8-thread warp: lane 0 reads lane 16, which does not exist.
  cuda_emu::Launch("PartialWarpKernel32", PartialWarpKernel32, 1, 40, 0, nullptr)(d);
}

template <typename T>
T* DeviceAlloc(size_t n) {
  void* p = nullptr;
  if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) std::abort();
  return static_cast<T*>(p);
}

void TestIndices() {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  const size_t n = 12 * 24;
  unsigned* d = DeviceAlloc<unsigned>(n);
  cuda_emu::Launch("IndexKernel", IndexKernel, grid, block, 0, nullptr)(d);
  std::vector<unsigned> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(unsigned), cudaMemcpyDeviceToHost);
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += h[i] != (i / 24) * 10000 + i % 24;
  Check("indices: 3-D grid and block", bad == 0, std::to_string(bad) + " wrong of " + std::to_string(n));
  cudaFree(d);
}

void TestBarrier() {
  for (int n : {1, 33, 256, 1024}) {
    int* d = DeviceAlloc<int>(3 * static_cast<size_t>(n));
    cuda_emu::Launch("ReverseKernel", ReverseKernel, 3, n, 0, nullptr)(d, n);
    std::vector<int> h(3 * static_cast<size_t>(n));
    cudaMemcpy(h.data(), d, h.size() * sizeof(int), cudaMemcpyDeviceToHost);
    size_t bad = 0;
    for (int b = 0; b < 3; ++b)
      for (int t = 0; t < n; ++t) bad += h[static_cast<size_t>(b * n + t)] != n - 1 - t + 1000 * b;
    Check("__syncthreads: shared reversal, " + std::to_string(n) + " threads", bad == 0, std::to_string(bad) + " wrong");
    cudaFree(d);
  }
  int* v = DeviceAlloc<int>(2);
  cuda_emu::Launch("VoteKernel", VoteKernel, 1, 100, 0, nullptr)(v);
  int h[2] = {0, 0};
  cudaMemcpy(h, v, sizeof h, cudaMemcpyDeviceToHost);
  Check("__syncthreads_or / __syncthreads_count", h[0] == 1 && h[1] == 34, std::to_string(h[0]) + " " + std::to_string(h[1]));
  cudaFree(v);
}

void TestShuffle() {
  double* d = DeviceAlloc<double>(2);
  cuda_emu::Launch("WarpSumKernel", WarpSumKernel, 1, 64, 0, nullptr)(d);
  double h[2] = {0, 0};
  cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
  Check("__shfl_down_sync: tree sums of two warps", h[0] == 496 && h[1] == 32 * 32 + 496,
        std::to_string(h[0]) + " " + std::to_string(h[1]));
  cudaFree(d);
  // width 8 segments; lanes whose source is past their segment keep their own value.
  float* f = DeviceAlloc<float>(40);
  cuda_emu::Launch("PartialWarpKernel", PartialWarpKernel, 1, 40, 0, nullptr)(f, 4u);
  std::vector<float> got(40);
  cudaMemcpy(got.data(), f, 40 * sizeof(float), cudaMemcpyDeviceToHost);
  size_t bad = 0;
  for (int t = 0; t < 40; ++t) bad += got[static_cast<size_t>(t)] != static_cast<float>(t % 8 < 4 ? t + 4 : t);
  Check("__shfl_down_sync: width 8, partial last warp", bad == 0, std::to_string(bad) + " wrong");
  cudaFree(f);
}

void TestDeferredStreams() {
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  float* d = DeviceAlloc<float>(8);
  float* pinned = nullptr;
  cudaHostAlloc(reinterpret_cast<void**>(&pinned), 8 * sizeof(float), cudaHostAllocDefault);
  for (int i = 0; i < 8; ++i) pinned[i] = -1.0f;
  cuda_emu::Launch("WriteKernel", WriteKernel, 1, 8, 0, s)(d, 5.0f);
  cudaMemcpyAsync(pinned, d, 8 * sizeof(float), cudaMemcpyDeviceToHost, s);
  const bool stale = pinned[0] == -1.0f;
  cudaStreamSynchronize(s);
  Check("streams: pinned result arrives only at the sync", stale && pinned[7] == 5.0f);

  // An event splits the queue: waiting on it runs what came before it, nothing after.
  cudaEvent_t e;
  cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
  cuda_emu::Launch("WriteKernel", WriteKernel, 1, 8, 0, s)(d, 7.0f);
  cudaMemcpyAsync(pinned, d, 8 * sizeof(float), cudaMemcpyDeviceToHost, s);
  cudaEventRecord(e, s);
  cuda_emu::Launch("WriteKernel", WriteKernel, 1, 8, 0, s)(d, 9.0f);
  const bool not_ready = cudaEventQuery(e) == cudaErrorNotReady;
  cudaEventSynchronize(e);
  float after_event = 0;
  cudaMemcpy(&after_event, d, sizeof(float), cudaMemcpyDeviceToHost);  // legacy stream: no wait for s
  cudaStreamSynchronize(s);
  float after_sync = 0;
  cudaMemcpy(&after_sync, d, sizeof(float), cudaMemcpyDeviceToHost);
  Check("events: synchronize runs exactly the work before the record",
        not_ready && pinned[0] == 7.0f && after_event == 7.0f && after_sync == 9.0f,
        std::to_string(pinned[0]) + " " + std::to_string(after_event) + " " + std::to_string(after_sync));

  // Elapsed time between two events, with the runtime's errors: not reached yet is
  // cudaErrorNotReady; never recorded or timing disabled is cudaErrorInvalidResourceHandle.
  cudaEvent_t t0, t1, never;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  cudaEventCreate(&never);
  cudaEventRecord(t0, s);
  cuda_emu::Launch("WriteKernel", WriteKernel, 1, 8, 0, s)(d, 11.0f);
  cudaEventRecord(t1, s);
  float ms = -1.0f, unused = 0.0f;
  const cudaError_t early = cudaEventElapsedTime(&ms, t0, t1);
  cudaEventSynchronize(t1);
  const cudaError_t reached = cudaEventElapsedTime(&ms, t0, t1);
  const cudaError_t unrecorded = cudaEventElapsedTime(&unused, t0, never);
  const cudaError_t untimed = cudaEventElapsedTime(&unused, t0, e);
  cudaGetLastError();
  Check("events: elapsed time once both are reached, the runtime's errors otherwise",
        early == cudaErrorNotReady && reached == cudaSuccess && ms >= 0.0f &&
            unrecorded == cudaErrorInvalidResourceHandle && untimed == cudaErrorInvalidResourceHandle,
        std::string(cudaGetErrorName(early)) + " " + cudaGetErrorName(reached) + " " + std::to_string(ms) + " " +
            cudaGetErrorName(unrecorded) + " " + cudaGetErrorName(untimed));
  for (cudaEvent_t x : {t0, t1, never}) cudaEventDestroy(x);

  // A pageable source is copied at the call: changing it afterwards changes nothing.
  std::vector<float> host(8, 3.0f);
  cudaMemcpyAsync(d, host.data(), 8 * sizeof(float), cudaMemcpyHostToDevice, s);
  host.assign(8, 4.0f);
  cudaStreamSynchronize(s);
  float got = 0;
  cudaMemcpy(&got, d, sizeof(float), cudaMemcpyDeviceToHost);
  Check("copies: a pageable source is taken at the call", got == 3.0f, std::to_string(got));

  std::vector<uint32_t> bits(8);
  float* fresh = DeviceAlloc<float>(8);
  cudaMemcpy(bits.data(), fresh, 8 * sizeof(float), cudaMemcpyDeviceToHost);
  Check("memory: fresh allocations hold NaNs", bits[0] == 0xffffffffu && bits[7] == 0xffffffffu);
  cudaFree(fresh);
  cudaEventDestroy(e);
  cudaFreeHost(pinned);
  cudaFree(d);
  cudaStreamDestroy(s);
}

void TestChecks() {
  float* d = DeviceAlloc<float>(8);
  std::vector<float> host(16, 1.0f);
  const cudaError_t past_end = cudaMemcpy(d, host.data(), 16 * sizeof(float), cudaMemcpyHostToDevice);
  const cudaError_t swapped = cudaMemcpy(host.data(), d, 4 * sizeof(float), cudaMemcpyHostToDevice);
  const cudaError_t memset_past = cudaMemsetAsync(d + 4, 0, 8 * sizeof(float), nullptr);
  cudaGetLastError();
  Check("copies: past an allocation's end, host/device swapped, memset past the end",
        past_end == cudaErrorInvalidValue && swapped == cudaErrorInvalidValue && memset_past == cudaErrorInvalidValue);

  cuda_emu::Launch("WriteKernel", WriteKernel, 0, 8, 0, nullptr)(d, 1.0f);
  const cudaError_t empty_grid = cudaGetLastError();
  cuda_emu::Launch("WriteKernel", WriteKernel, 1, 2048, 0, nullptr)(d, 1.0f);
  const cudaError_t big_block = cudaGetLastError();
  const cudaError_t after = cudaGetLastError();
  Check("launches: empty grid and 2048-thread block refused, not sticky",
        empty_grid == cudaErrorInvalidConfiguration && big_block == cudaErrorInvalidConfiguration && after == cudaSuccess);
  cudaFree(d);
}

void TestDeathAndFaults() {
  int status = InChild([] {
    setenv("ADAFISHER_CUDA_EMULATOR_MEMORY_MIB", "1", 1);
    void* p = nullptr;
    const bool oom = cudaMalloc(&p, 2 << 20) == cudaErrorMemoryAllocation && p == nullptr;
    const bool cleared = cudaGetLastError() == cudaErrorMemoryAllocation && cudaGetLastError() == cudaSuccess;
    const bool small = cudaMalloc(&p, 1 << 10) == cudaSuccess && cudaFree(p) == cudaSuccess;
    return oom && cleared && small ? 0 : 1;
  });
  Check("memory: out of memory, reported once, device still usable", WIFEXITED(status) && WEXITSTATUS(status) == 0);

  status = InChild([] {
    int* d = DeviceAlloc<int>(64);
    cuda_emu::Launch("DivergentBarrierKernel", DivergentBarrierKernel, 1, 64, 0, nullptr)(d);
    const bool failed = cudaDeviceSynchronize() == cudaErrorLaunchFailure;
    const bool sticky = cudaMemsetAsync(d, 0, 4, nullptr) == cudaErrorLaunchFailure;
    return failed && sticky ? 0 : 1;
  });
  Check("kernels: a barrier not reached by every thread fails, sticky", WIFEXITED(status) && WEXITSTATUS(status) == 0);

  status = InChild([] {
    float* d = DeviceAlloc<float>(64);
    cuda_emu::Launch("BadMaskKernel", BadMaskKernel, 1, 64, 0, nullptr)(d);
    return cudaDeviceSynchronize() == cudaErrorLaunchFailure ? 0 : 1;
  });
  Check("kernels: a shuffle mask that leaves out lanes fails", WIFEXITED(status) && WEXITSTATUS(status) == 0);

  status = InChild([] {
    float* d = DeviceAlloc<float>(40);
    cuda_emu::Launch("PartialWarpKernel", PartialWarpKernel, 1, 40, 0, nullptr)(d, 2u);  // fine
    const bool ok = cudaDeviceSynchronize() == cudaSuccess;
    PartialWarpKernelWide(d);
    return ok && cudaDeviceSynchronize() == cudaErrorLaunchFailure ? 0 : 1;
  });
  Check("kernels: a shuffle from a lane that does not exist fails", WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // The mode is fixed at a process's first allocation: a fresh process.
  status = InChild([] {
    setenv("ADAFISHER_CUDA_EMULATOR_PROTECT", "1", 1);
    execl("/proc/self/exe", "self_test", "--host-reads-device", static_cast<char*>(nullptr));
    return 4;
  });
  Check("memory (PROTECT=1): host code reading device memory faults", WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
        WIFEXITED(status) ? "exited " + std::to_string(WEXITSTATUS(status)) : "");
}

// Run in a fresh process with ADAFISHER_CUDA_EMULATOR_PROTECT=1: must die of SIGSEGV.
int HostReadsDevice() {
  float* d = DeviceAlloc<float>(64);
  cuda_emu::Launch("WriteKernel", WriteKernel, 1, 64, 0, nullptr)(d, 2.0f);  // the device may write it
  float h = 0;
  cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost);
  if (h != 2.0f) return 2;
  volatile float* host_view = d;
  return host_view[1] == 2.0f ? 0 : 3;  // the host may not
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--host-reads-device") == 0) return HostReadsDevice();
  std::printf("CUDA host emulator self-test (ADAFISHER_CUDA_EMULATOR_ORDER=%s)\n",
              std::getenv("ADAFISHER_CUDA_EMULATOR_ORDER") ? std::getenv("ADAFISHER_CUDA_EMULATOR_ORDER") : "forward");
  TestIndices();
  TestBarrier();
  TestShuffle();
  TestDeferredStreams();
  TestChecks();
  TestDeathAndFaults();
  std::printf("summary: %d cases, %d failed\n", g_cases, g_failed);
  return g_failed == 0 ? 0 : 1;
}
