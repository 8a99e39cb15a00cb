// The CUDA host emulator's runtime (see README.md here and include/cuda_runtime.h).
//
// NOTE: [emulated stream semantics]
// Work queued on a stream (kernels, memsets, async copies into pinned memory) does NOT run
// when it is queued: it runs when the host waits for it (cudaStreamSynchronize,
// cudaEventSynchronize on a later event, cudaFree/cudaFreeHost, a copy to pageable memory).
// That is the latest moment a real GPU could finish it, so host code that reads a result,
// or reuses a pinned buffer, without waiting sees stale data here and fails its test. An
// async copy FROM pageable memory snapshots the source at the call, which is what CUDA
// promises for pageable sources.
//
// Checked on every call: copies and memsets must lie inside one device allocation on the
// device side and outside every device allocation on the host side; launch configurations
// must be valid; a block's threads must all reach each __syncthreads and every lane of a
// shuffle's mask must take part (else the kernel fails with cudaErrorLaunchFailure, sticky
// as on a GPU, and a message on stderr). Fresh device memory holds NaNs, not zeros.
//
// NOTE: [protected device memory]
// Device memory is host memory here, so host code that dereferences a device pointer -- a
// segmentation fault on a GPU machine -- would silently work. With
// ADAFISHER_CUDA_EMULATOR_PROTECT=1 every device allocation lives in one address range that
// host code cannot touch except while the emulated device runs queued work (a memory
// protection key, or PROT_NONE); a host access then faults and a SIGSEGV handler names the
// allocation before the process aborts. Without it,
// allocations come from malloc, which AddressSanitizer checks byte-exactly (kernels'
// out-of-bounds accesses and use-after-free included; use that for the ASan runs).
//
// Environment: ADAFISHER_CUDA_EMULATOR_DEVICES (default 1; 0 = no device),
// ADAFISHER_CUDA_EMULATOR_MEMORY_MIB (device memory, default 8192; read at every
// cudaMalloc), ADAFISHER_CUDA_EMULATOR_ORDER (forward | reverse: the order in which the
// threads of a block and the blocks of a grid start, default forward),
// ADAFISHER_CUDA_EMULATOR_PROTECT (1: see NOTE: [protected device memory]),
// ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH=N (the N-th kernel launch after the variable is set
// or changed faults when it runs, like a kernel hitting an illegal address on a GPU: sticky
// cudaErrorLaunchFailure; for tests of what a faulted device does to the process),
// ADAFISHER_CUDA_EMULATOR_FAIL_EVENT_RECORD=N (the N-th cudaEventRecord after the variable is
// set or changed fails, non-sticky, and records nothing: the event keeps its older completion).
#include <cuda_runtime.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#if defined(CUDA_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;

namespace cuda_emu {

struct Stream {
  std::deque<std::function<void()>> ops;
  uint64_t enqueued = 0, executed = 0;
};
struct Event {
  Stream* stream = nullptr;
  uint64_t position = 0;
  unsigned flags = 0;
  bool recorded = false;
  double stamp_ms = 0;  // host clock when its stream reached it (cudaEventElapsedTime)
};

namespace {

// ---- global state (one emulated device) ----------------------------------------------------
std::recursive_mutex g_mutex;
std::map<uintptr_t, size_t> g_device;  // device allocations: start -> bytes
std::map<uintptr_t, size_t> g_pinned;  // cudaHostAlloc allocations
size_t g_device_used = 0;
std::set<Stream*> g_streams;
std::set<Event*> g_events;
Stream g_legacy_stream;
cudaError_t g_sticky = cudaSuccess;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local int t_device = 0;

long EnvLong(const char* name, long fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return end != nullptr && *end == '\0' && n >= 0 ? n : fallback;
}
int DeviceCount() { return static_cast<int>(EnvLong("ADAFISHER_CUDA_EMULATOR_DEVICES", 1)); }
size_t MemoryLimit() { return static_cast<size_t>(EnvLong("ADAFISHER_CUDA_EMULATOR_MEMORY_MIB", 8192)) << 20; }
bool Protect() {
  static const bool on = EnvLong("ADAFISHER_CUDA_EMULATOR_PROTECT", 0) != 0;
  return on;
}
bool Reverse() {
  const char* v = std::getenv("ADAFISHER_CUDA_EMULATOR_ORDER");
  return v != nullptr && std::string(v) == "reverse";
}

cudaError_t Record(cudaError_t e) {
  if (e != cudaSuccess) t_last_error = e;
  return e;
}
void Complain(const std::string& what) { std::fprintf(stderr, "cuda emulator: %s\n", what.c_str()); }

// The allocation of `map` containing [p, p + bytes), or end().
std::map<uintptr_t, size_t>::const_iterator Containing(const std::map<uintptr_t, size_t>& map, const void* p,
                                                       size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = map.upper_bound(a);
  if (it == map.begin()) return map.end();
  --it;
  if (a + bytes < a || a + bytes > it->first + it->second || (bytes == 0 && a >= it->first + it->second)) {
    return map.end();
  }
  return it;
}
bool InDevice(const void* p, size_t bytes) { return Containing(g_device, p, bytes) != g_device.end(); }
bool TouchesDevice(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = g_device.lower_bound(a + bytes);
  if (it == g_device.begin()) return false;
  --it;
  return it->first + it->second > a;
}
bool InPinned(const void* p, size_t bytes) { return Containing(g_pinned, p, bytes) != g_pinned.end(); }

Stream* Resolve(cudaStream_t s) {
  if (s == nullptr) return &g_legacy_stream;
  return g_streams.count(s) != 0 ? s : nullptr;
}

// ---- protected device memory (see NOTE: [protected device memory]) --------------------------
// One reserved address range of page-rounded allocations. Where the CPU has memory
// protection keys the whole range carries one key, and opening or closing the device is a
// write of the calling thread's PKRU register (other threads stay closed); elsewhere it is
// an mprotect of the range's used part (slow for large live sets). Freed pages go back to
// the kernel; their addresses are reused only by an allocation of the same page count.
constexpr size_t kArenaBytes = size_t{1} << 40;
char* g_arena = nullptr;
int g_pkey = -1;
size_t g_arena_used = 0;
std::map<size_t, std::vector<char*>> g_arena_free;  // page-rounded size -> freed ranges
int g_device_running = 0;  // > 0 while queued work runs: the arena is open
struct sigaction g_previous_segv;

size_t PageSize() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
void SetDeviceAccess(bool open) {
  if (g_pkey >= 0) {
    pkey_set(g_pkey, open ? 0 : PKEY_DISABLE_ACCESS);
  } else if (g_arena_used > 0) {
    mprotect(g_arena, g_arena_used, open ? PROT_READ | PROT_WRITE : PROT_NONE);
  }
}
struct DeviceRunning {
  DeviceRunning() {
    if (g_device_running++ == 0 && Protect()) SetDeviceAccess(true);
  }
  ~DeviceRunning() {
    if (--g_device_running == 0 && Protect()) SetDeviceAccess(false);
  }
};

void OnSegv(int sig, siginfo_t* info, void* context) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  const uintptr_t arena = reinterpret_cast<uintptr_t>(g_arena);
  if (g_arena != nullptr && a >= arena && a < arena + kArenaBytes) {
    uintptr_t start = 0;
    size_t bytes = 0;
    auto it = g_device.upper_bound(a);
    if (it != g_device.begin() && (--it)->first + it->second > a) start = it->first, bytes = it->second;
    char text[256];
    const int n = std::snprintf(text, sizeof text, "cuda emulator: host code touched device memory at %p (%s%p, %zu bytes)\n",
                                info->si_addr, start != 0 ? "allocation " : "freed or never allocated; ",
                                reinterpret_cast<void*>(start), bytes);
    if (n > 0) (void)!write(2, text, static_cast<size_t>(n));
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
    return;
  }
  // Not ours (V8's WebAssembly trap handler, for one): pass it on.
  if ((g_previous_segv.sa_flags & SA_SIGINFO) != 0 && g_previous_segv.sa_sigaction != nullptr) {
    g_previous_segv.sa_sigaction(sig, info, context);
  } else if (g_previous_segv.sa_handler == SIG_DFL || g_previous_segv.sa_handler == SIG_IGN) {
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
  } else {
    g_previous_segv.sa_handler(sig);
  }
}

void* MapDevice(size_t bytes) {
  if (g_arena == nullptr) {
    void* reserved = mmap(nullptr, kArenaBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (reserved == MAP_FAILED) return nullptr;
    g_arena = static_cast<char*>(reserved);
    g_pkey = pkey_alloc(0, PKEY_DISABLE_ACCESS);
    if (g_pkey >= 0 && pkey_mprotect(g_arena, kArenaBytes, PROT_READ | PROT_WRITE, g_pkey) != 0) {
      pkey_free(g_pkey);
      g_pkey = -1;
    }
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = OnSegv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous_segv);
  }
  const size_t size = (bytes + PageSize() - 1) / PageSize() * PageSize();
  char* p = nullptr;
  auto reuse = g_arena_free.find(size);
  if (reuse != g_arena_free.end() && !reuse->second.empty()) {
    p = reuse->second.back();
    reuse->second.pop_back();
  } else {
    if (size > kArenaBytes - g_arena_used) return nullptr;
    p = g_arena + g_arena_used;
    g_arena_used += size;
  }
  if (g_pkey >= 0) {
    DeviceRunning open;
    std::memset(p, 0xff, bytes);
  } else {
    mprotect(p, size, PROT_READ | PROT_WRITE);
    std::memset(p, 0xff, bytes);
    if (g_device_running == 0) mprotect(p, size, PROT_NONE);
  }
  return p;
}
void UnmapDevice(void* p, size_t bytes) {
  const size_t size = (bytes + PageSize() - 1) / PageSize() * PageSize();
  madvise(p, size, MADV_DONTNEED);  // the pages go back; the addresses stay reserved
  g_arena_free[size].push_back(static_cast<char*>(p));
}

void Flush(Stream* s, uint64_t upto) {
  if (s->executed >= upto || s->ops.empty()) return;
  DeviceRunning running;
  while (s->executed < upto && !s->ops.empty()) {
    std::function<void()> op = std::move(s->ops.front());
    s->ops.pop_front();
    ++s->executed;
    if (g_sticky == cudaSuccess) op();  // after a fault nothing more runs, as on a GPU
  }
}
void FlushAll() {
  Flush(&g_legacy_stream, g_legacy_stream.enqueued);
  for (Stream* s : g_streams) Flush(s, s->enqueued);
}
void Enqueue(Stream* s, std::function<void()> op) {
  s->ops.push_back(std::move(op));
  ++s->enqueued;
  // The legacy default stream is synchronous here; the backend uses its own stream.
  if (s == &g_legacy_stream) Flush(s, s->enqueued);
}

// ---- fibers: one per CUDA thread of the running block ---------------------------------------
constexpr size_t kFiberStack = size_t{256} << 10;
constexpr size_t kGuard = 4096;

// NOTE: [fiber switch]
// A block of 512 threads needs >= 1024 switches, and a test run millions; glibc's
// swapcontext makes a sigprocmask system call on each. On x86-64 a fiber switch is these
// few instructions instead: push the callee-saved registers, swap stack pointers, pop. (The
// SSE and x87 control words are not switched: neither the kernels nor the scheduler change
// them.) A new fiber's stack is laid out as if it had switched away at
// the start of FiberEntry. Other architectures use swapcontext.
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
void SwitchTo(Context* save, Context* load) { cuda_emu_switch(&save->sp, load->sp); }
void MakeContext(Context* c, char* stack, size_t size, void (*entry)(), Context* /*link*/) {
  // Top of stack, 16-byte aligned; below it a zero "return address" of entry (it never
  // returns), entry itself for `ret`, and six zero registers.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(entry);  // entered with rsp % 16 == 8, as after a call
  for (int r = 0; r < 6; ++r) *--sp = 0;
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void SwitchTo(Context* save, Context* load) { swapcontext(&save->uc, &load->uc); }
void MakeContext(Context* c, char* stack, size_t size, void (*entry)(), Context* link) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = &link->uc;
  makecontext(&c->uc, entry, 0);
}
#endif

struct Fiber {
  Context context;
  char* stack = nullptr;  // mmap'ed, lowest page a guard
  uint3 tid{0, 0, 0};
  int linear = 0;
  enum State { kReady, kBlockWait, kWarpWait, kDone } state = kReady;
  unsigned wait_generation = 0;
  void* asan_fake_stack = nullptr;
  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber() {
    if (stack != nullptr) munmap(stack, kFiberStack + kGuard);
  }
};

struct Warp {
  int members = 0, arrived = 0;
  unsigned generation = 0;
};

struct Block {
  const std::function<void()>* body = nullptr;
  int threads = 0;
  int current = -1;
  int done = 0;
  Context scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  int arrived = 0;
  unsigned generation = 0;
  int acc_or = 0, acc_count = 0, res_or = 0, res_count = 0;
  std::vector<Warp> warps;
  std::vector<unsigned long long> exchange;
  std::string error;  // first contract violation seen in this block
};

thread_local std::vector<std::unique_ptr<Fiber>> t_fibers;  // reused across blocks and launches
thread_local Block* t_block = nullptr;

void AsanStart(void** fake, const void* bottom, size_t size) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
void AsanFinish(void* fake, const void** bottom, size_t* size) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

Fiber& Current() { return *t_fibers[static_cast<size_t>(t_block->current)]; }

void YieldToScheduler(Fiber& f) {
  Block& b = *t_block;
  AsanStart(&f.asan_fake_stack, b.scheduler_stack, b.scheduler_stack_size);
  SwitchTo(&f.context, &b.scheduler);
  AsanFinish(f.asan_fake_stack, &t_block->scheduler_stack, &t_block->scheduler_stack_size);
}

[[noreturn]] void FiberEntry() {
  Block& b = *t_block;
  AsanFinish(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
  (*b.body)();
  Fiber& f = Current();
  f.state = Fiber::kDone;
  ++b.done;
  AsanStart(nullptr, b.scheduler_stack, b.scheduler_stack_size);  // this fiber ends
  SwitchTo(&f.context, &b.scheduler);
  std::abort();  // a finished fiber is never resumed
}

void Violation(Block& b, const std::string& what) {
  if (b.error.empty()) b.error = what;
}

// Runs one block to completion; false (with b.error) when its threads cannot all finish.
bool RunBlock(Block& b, dim3 block, bool reverse) {
  const int n = b.threads;
  while (t_fibers.size() < static_cast<size_t>(n)) {
    auto f = std::make_unique<Fiber>();
    void* mem = mmap(nullptr, kFiberStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) {
      b.error = "cannot map a fiber stack";
      return false;
    }
    mprotect(mem, kGuard, PROT_NONE);
    f->stack = static_cast<char*>(mem);
    t_fibers.push_back(std::move(f));
  }
  b.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  for (size_t w = 0; w < b.warps.size(); ++w) b.warps[w].members = std::min(32, n - static_cast<int>(w) * 32);
  b.exchange.assign(static_cast<size_t>(n), 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = *t_fibers[static_cast<size_t>(i)];
    f.linear = i;
    f.tid = {static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
             static_cast<unsigned>(i) / (block.x * block.y)};
    f.state = Fiber::kReady;
    f.asan_fake_stack = nullptr;
    MakeContext(&f.context, f.stack + kGuard, kFiberStack, FiberEntry, &b.scheduler);
  }
  while (b.done < n) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      Fiber& f = *t_fibers[static_cast<size_t>(i)];
      if (f.state == Fiber::kDone) continue;
      if (f.state == Fiber::kBlockWait && b.generation == f.wait_generation) continue;
      if (f.state == Fiber::kWarpWait && b.warps[static_cast<size_t>(i / 32)].generation == f.wait_generation) continue;
      f.state = Fiber::kReady;
      b.current = i;
      threadIdx = f.tid;
      void* fake = nullptr;
      AsanStart(&fake, f.stack + kGuard, kFiberStack);
      SwitchTo(&b.scheduler, &f.context);
      AsanFinish(fake, nullptr, nullptr);
      ran = true;
    }
    if (!ran) {
      int block_waiting = 0, warp_waiting = 0;
      for (int i = 0; i < n; ++i) {
        const Fiber& f = *t_fibers[static_cast<size_t>(i)];
        block_waiting += f.state == Fiber::kBlockWait;
        warp_waiting += f.state == Fiber::kWarpWait;
      }
      Violation(b, "deadlock: " + std::to_string(block_waiting) + " threads wait at __syncthreads, " +
                       std::to_string(warp_waiting) + " at a warp shuffle, " + std::to_string(b.done) + " of " +
                       std::to_string(n) + " have exited (a barrier not reached by every thread)");
      return false;
    }
  }
  return b.error.empty();
}

void RunGrid(const char* kernel, dim3 grid, dim3 block, const std::function<void()>& body) {
  const bool reverse = Reverse();
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  Block b;
  b.body = &body;
  b.threads = static_cast<int>(block.x * block.y * block.z);
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t i = reverse ? blocks - 1 - k : k;
    blockIdx = {static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                static_cast<unsigned>(i / (uint64_t{grid.x} * grid.y))};
    b.current = -1;
    b.done = 0;
    b.arrived = 0;
    b.acc_or = b.acc_count = 0;
    Block* saved = t_block;
    t_block = &b;
    const bool ok = RunBlock(b, block, reverse);
    t_block = saved;
    if (!ok) {
      Complain(std::string(kernel) + " block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
               std::to_string(blockIdx.z) + "): " + b.error);
      g_sticky = cudaErrorLaunchFailure;
      return;
    }
  }
}

void WarpBarrier(Block& b, Fiber& f) {
  Warp& w = b.warps[static_cast<size_t>(f.linear / 32)];
  if (++w.arrived == w.members) {
    w.arrived = 0;
    ++w.generation;
    return;
  }
  f.state = Fiber::kWarpWait;
  f.wait_generation = w.generation;
  YieldToScheduler(f);
}

const char* ErrorName(cudaError_t e) {
  switch (e) {
#define CUDA_EMU_NAME(x) \
  case x:                \
    return #x;
    CUDA_EMU_NAME(cudaSuccess)
    CUDA_EMU_NAME(cudaErrorInvalidValue)
    CUDA_EMU_NAME(cudaErrorMemoryAllocation)
    CUDA_EMU_NAME(cudaErrorInitializationError)
    CUDA_EMU_NAME(cudaErrorInvalidConfiguration)
    CUDA_EMU_NAME(cudaErrorInvalidDevicePointer)
    CUDA_EMU_NAME(cudaErrorInvalidMemcpyDirection)
    CUDA_EMU_NAME(cudaErrorInsufficientDriver)
    CUDA_EMU_NAME(cudaErrorStubLibrary)
    CUDA_EMU_NAME(cudaErrorNoDevice)
    CUDA_EMU_NAME(cudaErrorInvalidDevice)
    CUDA_EMU_NAME(cudaErrorDevicesUnavailable)
    CUDA_EMU_NAME(cudaErrorNoKernelImageForDevice)
    CUDA_EMU_NAME(cudaErrorInvalidDeviceFunction)
    CUDA_EMU_NAME(cudaErrorInvalidResourceHandle)
    CUDA_EMU_NAME(cudaErrorNotReady)
    CUDA_EMU_NAME(cudaErrorLaunchFailure)
    CUDA_EMU_NAME(cudaErrorNotPermitted)
    CUDA_EMU_NAME(cudaErrorSystemDriverMismatch)
    CUDA_EMU_NAME(cudaErrorUnknown)
#undef CUDA_EMU_NAME
  }
  return "cudaErrorUnknown";
}

// Checks of one copy / memset; cudaSuccess when its ranges are what `kind` says.
cudaError_t CheckCopy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDeviceToDevice) return cudaErrorInvalidMemcpyDirection;
  if (dst_device ? !InDevice(dst, bytes) : TouchesDevice(dst, bytes)) {
    Complain(std::string("copy of ") + std::to_string(bytes) + " bytes: destination is " +
             (dst_device ? "not inside one device allocation" : "device memory but the kind says host"));
    return cudaErrorInvalidValue;
  }
  if (src_device ? !InDevice(src, bytes) : TouchesDevice(src, bytes)) {
    Complain(std::string("copy of ") + std::to_string(bytes) + " bytes: source is " +
             (src_device ? "not inside one device allocation" : "device memory but the kind says host"));
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

// ---- device-side entry points ----------------------------------------------------------------
int BlockBarrier(int predicate, bool count) {
  Block* b = t_block;
  if (b == nullptr) {
    Complain("__syncthreads outside a kernel");
    std::abort();
  }
  Fiber& f = Current();
  b->acc_or |= predicate;
  b->acc_count += predicate;
  if (++b->arrived == b->threads) {
    b->res_or = b->acc_or;
    b->res_count = b->acc_count;
    b->acc_or = b->acc_count = 0;
    b->arrived = 0;
    ++b->generation;
  } else {
    f.state = Fiber::kBlockWait;
    f.wait_generation = b->generation;
    YieldToScheduler(f);
  }
  return count ? b->res_count : b->res_or;
}

unsigned long long ShuffleDown(unsigned mask, unsigned long long value, unsigned delta, int width) {
  Block* b = t_block;
  if (b == nullptr) {
    Complain("warp shuffle outside a kernel");
    std::abort();
  }
  Fiber& f = Current();
  const int warp = f.linear / 32, lane = f.linear % 32;
  const int members = b->warps[static_cast<size_t>(warp)].members;
  const unsigned expected = members == 32 ? 0xffffffffu : (1u << members) - 1u;
  if (mask != expected) Violation(*b, "shuffle mask does not name exactly the warp's threads");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) Violation(*b, "shuffle width must be a power of 2 <= 32");
  b->exchange[static_cast<size_t>(f.linear)] = value;
  WarpBarrier(*b, f);
  const int segment_lane = lane % width;
  unsigned long long result = value;  // a source past the lane's segment: its own value
  if (segment_lane + static_cast<int>(delta) < width) {
    if (lane + static_cast<int>(delta) < members) {
      result = b->exchange[static_cast<size_t>(f.linear + static_cast<int>(delta))];
    } else {
      Violation(*b, "shuffle reads lane " + std::to_string(lane + static_cast<int>(delta)) + " of a warp of " +
                        std::to_string(members) + " threads (undefined on a GPU)");
    }
  }
  WarpBarrier(*b, f);
  return result;
}

cudaError_t FuncAttributes(cudaFuncAttributes* attributes) {
  if (attributes == nullptr) return Record(cudaErrorInvalidValue);
  attributes->maxThreadsPerBlock = 1024;
  attributes->numRegs = 32;
  attributes->ptxVersion = attributes->binaryVersion = 90;
  return cudaSuccess;
}

// Whether this call is the N-th since the variable `name` = N was set or changed.
bool NthCall(const char* name, std::string* armed, long* calls) {
  const char* v = std::getenv(name);
  const std::string value = v != nullptr ? v : "";
  if (value != *armed) *armed = value, *calls = 0;
  if (value.empty()) return false;
  return ++*calls == EnvLong(name, 0);
}

// Whether this launch is the one ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH asks to fault.
bool InjectFault() {
  static std::string armed;  // the variable's value when counting started
  static long launches = 0;
  return NthCall("ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH", &armed, &launches);
}

// Whether this cudaEventRecord is the one ADAFISHER_CUDA_EMULATOR_FAIL_EVENT_RECORD asks to fail.
bool InjectEventRecordFailure() {
  static std::string armed;
  static long records = 0;
  return NthCall("ADAFISHER_CUDA_EMULATOR_FAIL_EVENT_RECORD", &armed, &records);
}

void LaunchGrid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                size_t argument_bytes, std::function<void()> thread_body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_sticky != cudaSuccess) {
    Record(g_sticky);
    return;
  }
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || shared_bytes > 49152) {
    Complain(std::string(kernel) + ": invalid launch configuration grid (" + std::to_string(grid.x) + "," +
             std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block (" + std::to_string(block.x) + "," +
             std::to_string(block.y) + "," + std::to_string(block.z) + ")");
    Record(cudaErrorInvalidConfiguration);
    return;
  }
  if (argument_bytes > 4096) {
    Record(cudaErrorInvalidValue);
    return;
  }
  Stream* s = Resolve(stream);
  if (s == nullptr) {
    Record(cudaErrorInvalidResourceHandle);
    return;
  }
  if (InjectFault()) {
    Enqueue(s, [kernel] {
      Complain(std::string(kernel) + ": injected fault (ADAFISHER_CUDA_EMULATOR_FAIL_LAUNCH)");
      g_sticky = cudaErrorLaunchFailure;
    });
    return;
  }
  Enqueue(s, [kernel, grid, block, body = std::move(thread_body)] { RunGrid(kernel, grid, block, body); });
}

}  // namespace cuda_emu

// ---- runtime API -------------------------------------------------------------------------------
using cuda_emu::g_mutex;
using Lock = std::lock_guard<std::recursive_mutex>;

const char* cudaGetErrorName(cudaError_t error) { return cuda_emu::ErrorName(error); }
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorMemoryAllocation:
      return "out of memory (CUDA host emulator)";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected (CUDA host emulator)";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (CUDA host emulator: see its message on stderr)";
    default:
      return "error reported by the CUDA host emulator";
  }
}
cudaError_t cudaGetLastError() {
  Lock lock(g_mutex);
  const cudaError_t e = cuda_emu::g_sticky != cudaSuccess ? cuda_emu::g_sticky : cuda_emu::t_last_error;
  cuda_emu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  Lock lock(g_mutex);
  return cuda_emu::g_sticky != cudaSuccess ? cuda_emu::g_sticky : cuda_emu::t_last_error;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  if (version == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  if (version == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *count = cuda_emu::DeviceCount();
  return *count > 0 ? cudaSuccess : cuda_emu::Record(cudaErrorNoDevice);
}
cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *device = cuda_emu::t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= cuda_emu::DeviceCount()) return cuda_emu::Record(cudaErrorInvalidDevice);
  cuda_emu::t_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  if (device < 0 || device >= cuda_emu::DeviceCount()) return cuda_emu::Record(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "CUDA host emulator");
  prop->totalGlobalMem = cuda_emu::MemoryLimit();
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 1;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || device < 0 || device >= cuda_emu::DeviceCount()) return cuda_emu::Record(cudaErrorInvalidValue);
  *value = attr == cudaDevAttrComputeMode ? cudaComputeModeDefault : 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  Lock lock(g_mutex);
  cuda_emu::FlushAll();
  return cuda_emu::g_sticky;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  Lock lock(g_mutex);
  if (ptr == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (cuda_emu::g_sticky != cudaSuccess) return cuda_emu::g_sticky;
  if (bytes == 0) return cudaSuccess;
  const size_t limit = cuda_emu::MemoryLimit();
  if (bytes > limit || cuda_emu::g_device_used > limit - bytes) return cuda_emu::Record(cudaErrorMemoryAllocation);
  void* p = nullptr;
  if (cuda_emu::Protect()) {
    p = cuda_emu::MapDevice(bytes);  // NaN-filled too
    if (p == nullptr) return cuda_emu::Record(cudaErrorMemoryAllocation);
  } else {
    if (posix_memalign(&p, 256, bytes) != 0 || p == nullptr) return cuda_emu::Record(cudaErrorMemoryAllocation);
    std::memset(p, 0xff, bytes);  // NaN: a GPU's fresh memory holds whatever was there
  }
  cuda_emu::g_device[reinterpret_cast<uintptr_t>(p)] = bytes;
  cuda_emu::g_device_used += bytes;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  Lock lock(g_mutex);
  if (ptr == nullptr) return cudaSuccess;
  cuda_emu::FlushAll();  // cudaFree waits for the device
  auto it = cuda_emu::g_device.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == cuda_emu::g_device.end()) {
    cuda_emu::Complain("cudaFree of a pointer that is not a device allocation");
    return cuda_emu::Record(cudaErrorInvalidDevicePointer);
  }
  const size_t bytes = it->second;
  cuda_emu::g_device_used -= bytes;
  cuda_emu::g_device.erase(it);
  if (cuda_emu::Protect()) {
    cuda_emu::UnmapDevice(ptr, bytes);
  } else {
    std::free(ptr);
  }
  return cuda_emu::g_sticky;
}
cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned /*flags*/) {
  Lock lock(g_mutex);
  if (ptr == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  void* p = nullptr;
  if (posix_memalign(&p, 64, bytes) != 0 || p == nullptr) return cuda_emu::Record(cudaErrorMemoryAllocation);
  cuda_emu::g_pinned[reinterpret_cast<uintptr_t>(p)] = bytes;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t bytes) { return cudaHostAlloc(ptr, bytes, cudaHostAllocDefault); }
cudaError_t cudaFreeHost(void* ptr) {
  Lock lock(g_mutex);
  if (ptr == nullptr) return cudaSuccess;
  cuda_emu::FlushAll();
  auto it = cuda_emu::g_pinned.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == cuda_emu::g_pinned.end()) {
    cuda_emu::Complain("cudaFreeHost of a pointer that cudaHostAlloc did not return");
    return cuda_emu::Record(cudaErrorInvalidValue);
  }
  cuda_emu::g_pinned.erase(it);
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  Lock lock(g_mutex);
  if (free_bytes == nullptr || total_bytes == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *total_bytes = cuda_emu::MemoryLimit();
  *free_bytes = *total_bytes > cuda_emu::g_device_used ? *total_bytes - cuda_emu::g_device_used : 0;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  Lock lock(g_mutex);
  if (cuda_emu::g_sticky != cudaSuccess) return cuda_emu::g_sticky;
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  const cudaError_t check = cuda_emu::CheckCopy(dst, src, bytes, kind);
  if (check != cudaSuccess) return cuda_emu::Record(check);
  if (kind == cudaMemcpyHostToDevice && !cuda_emu::InPinned(src, bytes)) {
    // Pageable source: CUDA has taken its copy when the call returns.
    auto snapshot = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                        static_cast<const char*>(src) + bytes);
    cuda_emu::Enqueue(s, [dst, snapshot] { std::memcpy(dst, snapshot->data(), snapshot->size()); });
    return cudaSuccess;
  }
  cuda_emu::Enqueue(s, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  if (kind == cudaMemcpyDeviceToHost && !cuda_emu::InPinned(dst, bytes)) {
    // Pageable destination: the call returns once the copy is done.
    cuda_emu::Flush(s, s->enqueued);
    return cuda_emu::g_sticky;
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  Lock lock(g_mutex);
  const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
  return e != cudaSuccess ? e : cuda_emu::g_sticky;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  Lock lock(g_mutex);
  if (cuda_emu::g_sticky != cudaSuccess) return cuda_emu::g_sticky;
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  if (bytes == 0) return cudaSuccess;
  if (!cuda_emu::InDevice(ptr, bytes)) {
    cuda_emu::Complain("memset of " + std::to_string(bytes) + " bytes not inside one device allocation");
    return cuda_emu::Record(cudaErrorInvalidValue);
  }
  cuda_emu::Enqueue(s, [ptr, value, bytes] { std::memset(ptr, value, bytes); });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) { return cudaMemsetAsync(ptr, value, bytes, nullptr); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned /*flags*/) {
  Lock lock(g_mutex);
  if (stream == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *stream = new cuda_emu::Stream();
  cuda_emu::g_streams.insert(*stream);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  Lock lock(g_mutex);
  if (stream == nullptr || cuda_emu::g_streams.count(stream) == 0) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  cuda_emu::Flush(stream, stream->enqueued);  // queued work still completes
  for (cuda_emu::Event* e : cuda_emu::g_events) {
    if (e->stream == stream) e->stream = nullptr;
  }
  cuda_emu::g_streams.erase(stream);
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Lock lock(g_mutex);
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  cuda_emu::Flush(s, s->enqueued);
  return cuda_emu::g_sticky;
}
// cudaErrorNotReady while the stream has work it has not run (here: until a wait runs it).
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  Lock lock(g_mutex);
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (s == nullptr) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  if (s->executed < s->enqueued) return cudaErrorNotReady;
  return cuda_emu::g_sticky;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  Lock lock(g_mutex);
  if (event == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  *event = new cuda_emu::Event();
  (*event)->flags = flags;
  cuda_emu::g_events.insert(*event);
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  Lock lock(g_mutex);
  if (cuda_emu::g_events.erase(event) == 0) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Lock lock(g_mutex);
  cuda_emu::Stream* s = cuda_emu::Resolve(stream);
  if (cuda_emu::g_events.count(event) == 0 || s == nullptr) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  if (cuda_emu::g_sticky == cudaSuccess && cuda_emu::InjectEventRecordFailure()) {
    return cuda_emu::Record(cudaErrorNotPermitted);
  }
  event->stream = s;
  event->recorded = true;
  // The time stamp is taken when the stream gets there (a destroyed event is skipped).
  cuda_emu::Enqueue(s, [event] {
    if (cuda_emu::g_events.count(event) != 0) {
      event->stamp_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    }
  });
  event->position = s->enqueued;
  return cuda_emu::g_sticky;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  Lock lock(g_mutex);
  if (cuda_emu::g_events.count(event) == 0) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  if (event->stream != nullptr) cuda_emu::Flush(event->stream, event->position);
  return cuda_emu::g_sticky;
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  Lock lock(g_mutex);
  if (cuda_emu::g_events.count(event) == 0) return cuda_emu::Record(cudaErrorInvalidResourceHandle);
  if (event->stream != nullptr && event->stream->executed < event->position) return cudaErrorNotReady;
  return cuda_emu::g_sticky;
}
// As documented for the runtime: an unknown, never-recorded or timing-disabled event is
// cudaErrorInvalidResourceHandle; one its stream has not reached yet, cudaErrorNotReady.
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  Lock lock(g_mutex);
  if (ms == nullptr) return cuda_emu::Record(cudaErrorInvalidValue);
  for (cudaEvent_t e : {start, end}) {
    if (cuda_emu::g_events.count(e) == 0 || !e->recorded || (e->flags & cudaEventDisableTiming) != 0) {
      return cuda_emu::Record(cudaErrorInvalidResourceHandle);
    }
  }
  for (cudaEvent_t e : {start, end}) {
    if (e->stream != nullptr && e->stream->executed < e->position) return cudaErrorNotReady;
  }
  *ms = static_cast<float>(end->stamp_ms - start->stamp_ms);
  return cuda_emu::g_sticky;
}
