// CUDA backend parity harness: runs every Backend method of the CPU backend and of the
// CUDA backend on the same inputs and compares the results (max abs error / max abs
// value <= 1e-5), checks that a non-finite gradient or factor makes Step write nothing
// (bit for bit) and that the CUDA results are bit-identical from run to run.
//
// Without a usable GPU it still runs the host emulation of the kernels' index arithmetic
// (the __host__ __device__ functions of cuda/*.h against the CPU backend), then prints
// "SKIP: <reason>" and exits 0. Exit code 1 when any case fails.
//
//   cuda_parity            all cases
//   cuda_parity --wide     also a 2^31 + 1000 element tensor (64-bit index path; ~26 GB of GPU memory)
//   cuda_parity --bench    also kernel bandwidth, as a ratio to a device-to-device copy
//                          measured in the same run (informational, never fails)
//   cuda_parity --sanitize --small
//                          the short run compute-sanitizer checks: no deliberate out-of-memory
//                          case; with --small, no reduction or conv case over 2^17 elements
//                          and no cross-thread synchronize (what racecheck runs)
//   cuda_parity --profile  only the cnn512 bench case's factor calls (for ncu; no checks)
//   cuda_parity --self-test-cpu
//                          the GPU suites with a second CPU backend in place of the CUDA
//                          one: checks the harness itself on machines without a GPU
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../cuda/cuda_backend.h"
#include "../../cuda/factor_items.h"
#include "../../cuda/int_divider.h"
#include "../../cuda/launch_plan.h"
#include "../../cuda/step_desc.h"
#include "core/backend.h"
#if ADAFISHER_CUDA_EMULATOR
#include <cuda_runtime.h>  // the emulator's: cudaMemGetInfo of the emulated device
#endif

namespace {

using adafisher::Backend;
using adafisher::BackendError;
using adafisher::Conv2dShape;
using adafisher::DataFormat;
using adafisher::ErrorCode;
using adafisher::FactorJob;
using adafisher::FactorOp;
using adafisher::FactorSegment;
using adafisher::index_t;
using adafisher::PatchOrder;
using adafisher::StepRequest;
using adafisher::StepTensor;
namespace math = adafisher::math;
namespace cu = adafisher::cuda;

constexpr double kTolerance = 1e-5;

// ---------------------------------------------------------------------------------------
// Reporting.
int g_cases = 0;
int g_failed = 0;

void Record(const std::string& name, bool ok, const std::string& detail) {
  ++g_cases;
  if (!ok) ++g_failed;
  std::printf("%s %-52s %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  std::fflush(stdout);
}

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Format(const char* fmt, ...) {
  char buffer[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof buffer, fmt, args);
  va_end(args);
  return buffer;
}

// max |got - want| / max |want|; NaN must match NaN, inf must match the same inf.
struct Diff {
  double err = 0, scale = 0;
  size_t count = 0, bitwise = 0, mismatched_special = 0, matched_special = 0;
  size_t first_bad = std::numeric_limits<size_t>::max();
  double Relative() const { return scale > 0 ? err / scale : err; }
  bool Ok() const { return mismatched_special == 0 && Relative() <= kTolerance; }
  void Merge(const Diff& o) {
    err = std::max(err, o.err);
    scale = std::max(scale, o.scale);
    count += o.count;
    bitwise += o.bitwise;
    mismatched_special += o.mismatched_special;
    matched_special += o.matched_special;
    if (first_bad == std::numeric_limits<size_t>::max()) first_bad = o.first_bad;
  }
  std::string Str() const {
    std::string s = Format("rel=%.3g (err %.3g / max %.3g) bitwise %zu/%zu", Relative(), err, scale, bitwise, count);
    if (matched_special) s += Format(", %zu NaN/inf alike", matched_special);
    if (mismatched_special) s += Format(", NaN/inf MISMATCHES %zu", mismatched_special);
    if (!Ok() && first_bad != std::numeric_limits<size_t>::max()) s += Format(" first bad index %zu", first_bad);
    return s;
  }
};

Diff Compare(const float* got, const float* want, size_t n) {
  Diff d;
  d.count = n;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) == 0) ++d.bitwise;
    const float g = got[i], w = want[i];
    if (!std::isfinite(g) || !std::isfinite(w)) {
      const bool same = (std::isnan(g) && std::isnan(w)) || g == w;
      if (same) {
        ++d.matched_special;
      } else {
        ++d.mismatched_special;
        d.first_bad = std::min(d.first_bad, i);
      }
      continue;
    }
    d.scale = std::max(d.scale, std::fabs(static_cast<double>(w)));
    d.err = std::max(d.err, std::fabs(static_cast<double>(g) - static_cast<double>(w)));
  }
  for (size_t i = 0; i < n && d.err > kTolerance * d.scale; ++i) {
    if (std::isfinite(got[i]) && std::isfinite(want[i]) &&
        std::fabs(static_cast<double>(got[i]) - want[i]) > kTolerance * d.scale) {
      d.first_bad = std::min(d.first_bad, i);
      break;
    }
  }
  return d;
}
Diff Compare(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) {
    Diff d;
    d.mismatched_special = 1;
    return d;
  }
  return Compare(got.data(), want.data(), got.size());
}
bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// One parity case: the GPU result against the CPU one, and a second GPU run bit for bit.
void RecordParity(const std::string& name, const std::vector<float>& want, const std::vector<float>& got,
                  const std::vector<float>& again) {
  const Diff d = Compare(got, want);
  const bool same = SameBits(got, again);
  Record(name, d.Ok() && same, d.Str() + (same ? ", deterministic" : ", NOT DETERMINISTIC"));
}

std::vector<float> Normal(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// ---------------------------------------------------------------------------------------
// Backend memory helpers: a buffer of n floats starting `offset` floats into an allocation
// (offset 1 makes every pointer 4 but not 16 bytes aligned).
class Buffer {
 public:
  Buffer(Backend& b, size_t n, size_t offset = 0) : backend_(&b), n_(n), offset_(offset) {
    base_ = b.Allocate(n + offset);
  }
  Buffer(Backend& b, const std::vector<float>& host, size_t offset = 0) : Buffer(b, host.size(), offset) {
    b.Upload(ptr(), host.data(), host.size());
  }
  ~Buffer() {
    if (base_ != nullptr) backend_->Release(base_);
  }
  Buffer(Buffer&& o) noexcept : backend_(o.backend_), base_(o.base_), n_(o.n_), offset_(o.offset_) { o.base_ = nullptr; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer& operator=(Buffer&&) = delete;
  float* ptr() const { return base_ + offset_; }
  size_t size() const { return n_; }
  std::vector<float> Read() const {
    std::vector<float> v(n_);
    backend_->Download(v.data(), ptr(), n_);
    return v;
  }
  void Write(const std::vector<float>& host) { backend_->Upload(ptr(), host.data(), host.size()); }

 private:
  Backend* backend_;
  float* base_ = nullptr;
  size_t n_ = 0, offset_ = 0;
};

// --sanitize: leaves out the deliberate out-of-memory case, whose failed cudaMalloc
// compute-sanitizer reports as an API error (and racecheck then loses track of launches).
// --small: leaves out the reduction and conv cases of more than 2^17 elements (racecheck
// tracks every shared-memory access: the short run it checks) and the cross-thread
// synchronize case (racecheck stalls on it).
bool g_sanitize = false, g_small = false;
constexpr size_t kSmallElements = size_t{1} << 17;

// Runs fn, reporting an exception as a failed case instead of ending the harness.
void Guarded(const std::string& name, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const BackendError& e) {
    Record(name, false, Format("BackendError %s: %s", adafisher::ErrorCodeName(e.code()), e.what()));
  } catch (const std::exception& e) {
    Record(name, false, Format("exception: %s", e.what()));
  }
}

// ---------------------------------------------------------------------------------------
// Shapes under test.
struct ReduceShape {
  index_t outer, kept, inner;
};
const std::vector<ReduceShape>& ReduceShapes() {
  static const std::vector<ReduceShape> shapes = {
      // inner == 1: columns (Linear, NHWC norm layers)
      {1000, 1, 1}, {513, 3, 1}, {4096, 64, 1}, {777, 65, 1}, {300, 1000, 1}, {37, 4097, 1}, {278011, 1, 1},
      {2048, 200, 1}, {0, 10, 1}, {5, 0, 1},
      // inner > 1: planes (NCHW conv/norm, LayerNorm)
      {8, 16, 49}, {4, 3, 50176}, {16, 64, 784}, {2, 5, 2}, {3, 5000, 3}, {1, 1, 278011}, {7, 9, 0}};
  return shapes;
}

enum class Pad { kValid, kSame, kExplicit };

Conv2dShape MakeConv(index_t n, index_t c, index_t h, index_t w, index_t kh, index_t kw, index_t sh, index_t sw,
                     index_t groups, DataFormat format, PatchOrder order, Pad pad, index_t pt = 0, index_t pb = 0,
                     index_t pl = 0, index_t pr = 0) {
  Conv2dShape s;
  s.batch = n, s.channels = c, s.height = h, s.width = w;
  s.kernel_h = kh, s.kernel_w = kw, s.stride_h = sh, s.stride_w = sw, s.groups = groups;
  s.format = format, s.order = order;
  if (pad == Pad::kSame) {
    // TensorFlow 'same': out = ceil(in / stride), the odd padding row/column at the bottom/right.
    s.out_h = (h + sh - 1) / sh;
    s.out_w = (w + sw - 1) / sw;
    const index_t th = std::max<index_t>((s.out_h - 1) * sh + kh - h, 0);
    const index_t tw = std::max<index_t>((s.out_w - 1) * sw + kw - w, 0);
    s.pad_top = th / 2;
    s.pad_left = tw / 2;
  } else {
    if (pad == Pad::kValid) pt = pb = pl = pr = 0;
    s.pad_top = pt, s.pad_left = pl;
    s.out_h = (h + pt + pb - kh) / sh + 1;
    s.out_w = (w + pl + pr - kw) / sw + 1;
  }
  return s;
}

struct ConvCase {
  std::string name;
  Conv2dShape shape;
  bool bias;
};

std::vector<ConvCase> ConvCases() {
  const DataFormat NCHW = DataFormat::kNCHW, NHWC = DataFormat::kNHWC;
  const PatchOrder major = PatchOrder::kChannelMajor, minor = PatchOrder::kChannelMinor;
  std::vector<ConvCase> cases = {
      {"3x3 s1 same", MakeConv(4, 8, 13, 13, 3, 3, 1, 1, 1, NCHW, major, Pad::kSame), true},
      {"3x3 s2 same asym", MakeConv(3, 6, 16, 16, 3, 3, 2, 2, 1, NCHW, major, Pad::kSame), true},
      {"3x3 s2 same odd", MakeConv(2, 5, 15, 17, 3, 3, 2, 2, 1, NCHW, minor, Pad::kSame), false},
      {"1x1 s2 valid", MakeConv(4, 16, 14, 14, 1, 1, 2, 2, 1, NCHW, major, Pad::kValid), true},
      {"1x1 pad1", MakeConv(2, 4, 5, 6, 1, 1, 1, 1, 1, NCHW, major, Pad::kExplicit, 1, 1, 1, 1), false},
      {"1x7 pad0,3", MakeConv(2, 8, 9, 12, 1, 7, 1, 1, 1, NCHW, major, Pad::kExplicit, 0, 0, 3, 3), true},
      {"7x1 pad3,0", MakeConv(2, 8, 12, 9, 7, 1, 1, 1, 1, NCHW, minor, Pad::kExplicit, 3, 3, 0, 0), true},
      {"5x3 s(2,1)", MakeConv(3, 4, 21, 11, 5, 3, 2, 1, 1, NCHW, major, Pad::kExplicit, 2, 1, 1, 0), true},
      {"groups2", MakeConv(3, 8, 10, 10, 3, 3, 1, 1, 2, NCHW, major, Pad::kSame), true},
      {"depthwise g=C", MakeConv(4, 12, 9, 9, 3, 3, 2, 2, 12, NCHW, major, Pad::kSame), true},
      {"7x7 s2 stem", MakeConv(2, 3, 64, 64, 7, 7, 2, 2, 1, NCHW, major, Pad::kExplicit, 3, 3, 3, 3), false},
      {"3x3 wide T", MakeConv(2, 64, 64, 64, 3, 3, 1, 1, 1, NCHW, major, Pad::kSame), true},
      {"kernel > input", MakeConv(2, 3, 4, 4, 5, 5, 1, 1, 1, NCHW, major, Pad::kExplicit, 2, 2, 2, 2), true},
      {"batch 0", MakeConv(0, 4, 6, 6, 3, 3, 1, 1, 1, NCHW, major, Pad::kSame), true},
      // Phase 2 in one kernel with 17 classes per block: 2 blocks, the second with 3.
      {"classes split", MakeConv(3, 20, 6, 5, 3, 3, 1, 1, 1, NCHW, major, Pad::kSame), true},
      // kh * W = 4200 entries of U per class: more than shared memory holds, phase 2 in two kernels.
      {"row past shared", MakeConv(1, 2, 3, 2100, 2, 3, 1, 1, 1, NCHW, major, Pad::kSame), true},
  };
  // The same geometries in NHWC, in both patch orders.
  const size_t base = cases.size();
  for (size_t i = 0; i < base; ++i) {
    for (PatchOrder order : {major, minor}) {
      ConvCase c = cases[i];
      c.shape.format = NHWC;
      c.shape.order = order;
      c.name += order == major ? " nhwc major" : " nhwc minor";
      cases.push_back(c);
    }
    cases[i].name += cases[i].shape.order == major ? " nchw major" : " nchw minor";
  }
  return cases;
}

index_t ConvInputSize(const Conv2dShape& s) { return s.batch * s.channels * s.height * s.width; }
index_t ConvOutputSize(const Conv2dShape& s, bool bias) {
  return (s.channels / s.groups) * s.kernel_h * s.kernel_w + (bias ? 1 : 0);
}

// ---------------------------------------------------------------------------------------
// Host emulation of the kernels' index arithmetic (no GPU needed).

void EmulateIntDivider() {
  std::mt19937_64 rng(7);
  std::vector<uint32_t> divisors = {1, 2, 3, 5, 7, 10, 64, 100, 173, 1607, 65535, 65536, 65537, 1000003,
                                    (1u << 31) - 1, (1u << 30) + 1, (1u << 30), (1u << 30) - 1};
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + static_cast<uint32_t>(rng() % ((1u << 31) - 1)));
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + static_cast<uint32_t>(rng() % 5000));
  size_t checks = 0, bad = 0;
  for (uint32_t d : divisors) {
    const cu::IntDivider div(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, (1u << 31) - 2, (1u << 31) - 3};
    for (int i = 0; i < 2000; ++i) ns.push_back(static_cast<uint32_t>(rng() % ((1u << 31) - 1)));
    for (uint32_t n : ns) {
      if (n >= (1u << 31) - 1) continue;
      ++checks;
      if (div.Div(n) != n / d || div.Mod(n) != n % d) ++bad;
    }
  }
  // Clamped divisors: quotient 0 for every dividend below 2^31 - 1.
  const cu::IntDivider big = cu::MakeClampedDivider(int64_t{1} << 40);
  for (uint32_t n : {0u, 5u, (1u << 31) - 2}) {
    ++checks;
    if (big.Div(n) != 0 || big.Mod(n) != n) ++bad;
  }
  Record("emulate/int_divider", bad == 0, Format("%zu quotients, %zu wrong", checks, bad));
}

void EmulateMultiTensorPlan() {
  std::vector<int64_t> numels = {0, 1, 65535, 65536, 65537, 278011, 0, 3, 0};
  std::mt19937_64 rng(11);
  for (int i = 0; i < 700; ++i) numels.push_back(static_cast<int64_t>(rng() % 300));
  numels.push_back(cu::kChunkElements * 1000 + 17);  // one tensor of 1001 blocks
  numels.push_back(0);
  auto numel = [&](size_t t) { return numels[t]; };
  const int64_t blocks = cu::CountBlocks(numels.size(), numel);
  std::vector<cu::BlockSlot> slots(static_cast<size_t>(blocks) + 1, cu::BlockSlot{-1, -1});
  cu::PlanBlocks(numels.size(), numel, slots.data());
  bool ok = slots.back().tensor == -1;  // wrote exactly `blocks` slots
  slots.pop_back();
  std::vector<std::pair<int32_t, int32_t>> seen;
  for (const cu::BlockSlot& s : slots) seen.emplace_back(s.tensor, s.chunk);
  // Every (tensor, chunk) exactly once, in order, and nothing for empty tensors.
  size_t next = 0;
  for (size_t t = 0; t < numels.size() && ok; ++t) {
    const int64_t chunks = cu::CeilDiv(numels[t], cu::kChunkElements);
    for (int64_t c = 0; c < chunks; ++c, ++next) {
      ok &= next < seen.size() && seen[next].first == static_cast<int32_t>(t) && seen[next].second == c;
    }
  }
  ok &= next == seen.size();
  // A grid holds at most 2^31 - 1 blocks: more is refused before anything is written.
  auto refused = [](auto&& fn) {
    try {
      fn();
    } catch (const adafisher::BackendError&) {
      return true;
    }
    return false;
  };
  ok &= cu::CountBlocks(1, [](size_t) { return cu::kChunkElements * INT32_MAX; }) == INT32_MAX;
  ok &= refused([] { cu::CountBlocks(2, [](size_t) { return int64_t{1} << 46; }); });  // 2 x 2^30 blocks
  ok &= refused([] { cu::CountBlocks(2, [](size_t t) { return t == 0 ? int64_t{-1} : int64_t{65536}; }); });
  Record("emulate/multi_tensor_plan", ok,
         Format("%zu blocks in one launch; 2^31 - 1 blocks accepted, 2^31 and negative sizes refused", seen.size()));
}

void EmulateFisherIndex() {
  std::mt19937_64 rng(13);
  size_t checks = 0, bad = 0;
  for (int trial = 0; trial < 300; ++trial) {
    StepTensor t;
    const index_t out = 1 + static_cast<index_t>(rng() % 300), K = 1 + static_cast<index_t>(rng() % 3000);
    t.numel = out * K;
    t.preconditioned = true;
    switch (trial % 4) {
      case 0: t.o_stride = K, t.o_count = out, t.k_stride = 1, t.k_count = K; break;    // [out, K]
      case 1: t.o_stride = 1, t.o_count = out, t.k_stride = out, t.k_count = K; break;  // [K, out]
      case 2: t.numel = out, t.o_stride = 1, t.o_count = out, t.k_stride = out, t.k_count = 1; break;  // bias
      default:
        t.o_stride = 1 + rng() % 50, t.o_count = out, t.k_stride = 1 + rng() % 50, t.k_count = K;
        break;
    }
    std::vector<float> running = Normal(static_cast<size_t>(out + K), 100 + trial);
    t.s_offset = 0;
    t.h_offset = out;
    const cu::StepDesc d = cu::MakeStepDesc(t, running.data());
    for (int s = 0; s < 200; ++s) {
      const index_t i = static_cast<index_t>(rng() % static_cast<uint64_t>(t.numel));
      const float want = math::fisher_diagonal(running[(i / t.o_stride) % t.o_count],
                                               running[out + (i / t.k_stride) % t.k_count], 1e-3f);
      const float narrow = cu::FisherNarrow(d, static_cast<uint32_t>(i), 1e-3f);
      const float wide = cu::FisherWide(d, i, 1e-3f);
      ++checks;
      if (std::memcmp(&want, &narrow, 4) != 0 || std::memcmp(&want, &wide, 4) != 0) ++bad;
    }
  }
  Record("emulate/fisher_index", bad == 0, Format("%zu lookups, %zu wrong", checks, bad));
}

// The column/plane kernels' thread partition, then the finalize expressions.
template <bool kSquare>
std::vector<double> EmulateReduceKept(const float* x, index_t outer, index_t kept, index_t inner) {
  std::vector<double> sums(static_cast<size_t>(std::max<index_t>(kept, 0)), 0.0);
  if (outer <= 0 || kept <= 0 || inner <= 0) return sums;
  const int threads = cu::kReduceThreads;
  std::vector<double> t(threads);
  if (inner == 1) {
    const cu::ColumnPlan p = cu::MakeColumnPlan(outer, kept);
    std::vector<double> partial(static_cast<size_t>(p.slices * kept), 0.0);
    for (int64_t tile = 0; tile < p.col_tiles; ++tile) {
      for (int64_t slice = 0; slice < p.slices; ++slice) {
        for (int tid = 0; tid < threads; ++tid) t[tid] = cu::ColumnThreadSum<kSquare>(x, p, tile, slice, tid);
        for (int tid = 0; tid < p.cols; ++tid) {
          const int64_t col = tile * p.cols + tid;
          if (col >= kept) continue;
          double total = 0.0;
          for (int r = 0; r < p.step; ++r) total += t[r * p.cols + tid];
          partial[slice * kept + col] = total;
        }
      }
    }
    for (int64_t s = 0; s < p.slices; ++s) {
      for (index_t b = 0; b < kept; ++b) sums[b] += partial[s * kept + b];
    }
    return sums;
  }
  const cu::PlanePlan p = cu::MakePlanePlan(outer, kept, inner);
  std::vector<double> partial(static_cast<size_t>(p.parts * kept), 0.0);
  for (int64_t part = 0; part < p.parts; ++part) {
    for (index_t b = 0; b < kept; ++b) {
      double total = 0.0;
      for (int tid = 0; tid < threads; ++tid) total += cu::PlaneThreadSum<kSquare>(x, p, part, b, tid, threads);
      partial[part * kept + b] = total;
    }
  }
  for (int64_t s = 0; s < p.parts; ++s) {
    for (index_t b = 0; b < kept; ++b) sums[b] += partial[s * kept + b];
  }
  return sums;
}

void EmulateReductions(Backend& cpu) {
  for (const ReduceShape& s : ReduceShapes()) {
    const std::string name = Format("emulate/reduce %" PRId64 "x%" PRId64 "x%" PRId64, s.outer, s.kept, s.inner);
    Guarded(name, [&] {
      const size_t n = static_cast<size_t>(s.outer * s.kept * s.inner);
      // Coverage: with x = 1 every sum must be exactly outer * inner.
      const std::vector<float> ones(n, 1.0f);
      const std::vector<double> counts = EmulateReduceKept<false>(ones.data(), s.outer, s.kept, s.inner);
      bool covered = true;
      for (double c : counts) covered &= c == static_cast<double>(s.outer * s.inner);
      // Values: against the CPU backend's MeanSquareFactor and NormGradFactor.
      const std::vector<float> x = Normal(n, 1000 + n);
      const double count = static_cast<double>(s.outer * s.inner);
      std::vector<float> want(static_cast<size_t>(s.kept) + 1), got(static_cast<size_t>(s.kept) + 1);
      cpu.MeanSquareFactor(x.data(), s.outer, s.kept, s.inner, count, true, 1.0f, want.data());
      const std::vector<double> sq = EmulateReduceKept<true>(x.data(), s.outer, s.kept, s.inner);
      for (index_t b = 0; b < s.kept; ++b) got[b] = static_cast<float>(count > 0 ? sq[b] / count : 0.0);
      got[s.kept] = 1.0f;
      Diff d = Compare(got, want);
      std::vector<float> want_g(static_cast<size_t>(s.kept)), got_g(static_cast<size_t>(s.kept));
      cpu.NormGradFactor(x.data(), s.outer, s.kept, s.inner, 3.0, want_g.data());
      const std::vector<double> sums = EmulateReduceKept<false>(x.data(), s.outer, s.kept, s.inner);
      for (index_t b = 0; b < s.kept; ++b) got_g[b] = static_cast<float>(sums[b] * sums[b] / 3.0);
      d.Merge(Compare(got_g, want_g));
      Record(name, covered && d.Ok(), std::string(covered ? "coverage ok, " : "COVERAGE WRONG, ") + d.Str());
    });
  }
}

// Phase 1 by quads (ConvQuadSum, when the shape allows them) against ConvPixelSum: the
// number of pixels whose sums differ in any bit; SIZE_MAX when the shape has no quads.
size_t QuadSumMismatches(const float* x, const Conv2dShape& s) {
  cu::ConvPlan p = cu::MakeConvPlan(s);
  const bool quads = p.nhwc ? p.cg % 4 == 0 : p.pixels % 4 == 0;
  if (!quads || p.parts <= 0 || p.pixels <= 0) return SIZE_MAX;
  size_t bad = 0;
  for (int64_t part = 0; part < p.parts; ++part) {
    for (int64_t q = 0; q < p.pixels; q += 4) {
      double sums[4];
      cu::ConvQuadSum(x, p, part, q, sums);
      for (int k = 0; k < 4; ++k) {
        const double one = cu::ConvPixelSum(x, p, part, q + k);
        bad += std::memcmp(&one, &sums[k], sizeof one) != 0;
      }
    }
  }
  return bad;
}

std::vector<float> EmulateConv(const float* x, const Conv2dShape& s, bool bias) {
  const cu::ConvPlan p = cu::MakeConvPlan(s);
  const int64_t copies = std::max<int64_t>(p.parts, 1);
  std::vector<double> T(static_cast<size_t>(copies * p.pixels), 0.0);
  for (int64_t part = 0; part < p.parts; ++part) {
    for (int64_t q = 0; q < p.pixels; ++q) T[part * p.pixels + q] = cu::ConvPixelSum(x, p, part, q);
  }
  for (int64_t q = 0; q < p.pixels; ++q) {
    for (int64_t part = 1; part < p.parts; ++part) T[q] += T[part * p.pixels + q];
  }
  std::vector<double> U(static_cast<size_t>(p.row_items()));
  for (int64_t item = 0; item < p.row_items(); ++item) U[item] = cu::ConvRowTap(T.data(), p, item);
  std::vector<float> out(static_cast<size_t>(p.tap_items() + (bias ? 1 : 0)));
  const double count = static_cast<double>(s.batch) * static_cast<double>(s.out_h) * static_cast<double>(s.out_w);
  for (int64_t item = 0; item < p.tap_items(); ++item) {
    int64_t k = 0;
    const double sum = cu::ConvColTap(U.data(), p, item, &k);
    out[k] = static_cast<float>(count > 0 ? sum / count : 0.0);
  }
  if (bias) out[p.tap_items()] = static_cast<float>(s.groups);
  return out;
}

void EmulateConvCases(Backend& cpu) {
  for (const ConvCase& c : ConvCases()) {
    const std::string name = "emulate/conv " + c.name;
    Guarded(name, [&] {
      const size_t n = static_cast<size_t>(ConvInputSize(c.shape));
      std::vector<float> want(static_cast<size_t>(ConvOutputSize(c.shape, c.bias)));
      // Ones: counts of in-image window positions per tap, exact in both.
      const std::vector<float> ones(n, 1.0f);
      cpu.Conv2dPatchFactor(ones.data(), c.shape, c.bias, want.data());
      Diff d = Compare(EmulateConv(ones.data(), c.shape, c.bias), want);
      const std::vector<float> x = Normal(n, 2000 + n);
      cpu.Conv2dPatchFactor(x.data(), c.shape, c.bias, want.data());
      d.Merge(Compare(EmulateConv(x.data(), c.shape, c.bias), want));
      const size_t quad_bad = QuadSumMismatches(x.data(), c.shape);
      const std::string quads = quad_bad == SIZE_MAX ? "" : Format(", quads: %zu pixel sums differ", quad_bad);
      Record(name, d.Ok() && (quad_bad == 0 || quad_bad == SIZE_MAX), d.Str() + quads);
    });
  }
}

// ---------------------------------------------------------------------------------------
// GPU: memory.

void TestMemory(Backend& cpu, Backend& gpu) {
  Guarded("memory/allocate_zeroed", [&] {
    const size_t before = gpu.LiveAllocations();
    bool ok = true;
    {
      Buffer a(gpu, 278011), b(gpu, 0), c(gpu, 0);
      ok &= a.ptr() != nullptr && b.ptr() != nullptr && b.ptr() != c.ptr();
      ok &= gpu.LiveAllocations() == before + 3;
      const std::vector<float> v = a.Read();
      ok &= std::all_of(v.begin(), v.end(), [](float f) { return f == 0.0f && !std::signbit(f); });
    }
    ok &= gpu.LiveAllocations() == before;
    Record("memory/allocate_zeroed", ok, Format("live %zu", gpu.LiveAllocations()));
  });
  for (size_t n : {size_t{1}, size_t{1000}, size_t{262143}, size_t{262144}, size_t{278011 * 5}, size_t{3000017}}) {
    for (size_t offset : {size_t{0}, size_t{1}}) {
      const std::string name = Format("memory/round_trip n=%zu off=%zu", n, offset);
      Guarded(name, [&] {
        const std::vector<float> host = Normal(n, n + offset);
        std::vector<float> staged(n + 1);
        Buffer d(gpu, host, offset);
        // Also an unaligned host destination.
        gpu.Download(staged.data() + 1, d.ptr(), n);
        const bool ok = std::memcmp(staged.data() + 1, host.data(), n * sizeof(float)) == 0 && SameBits(d.Read(), host);
        Record(name, ok, ok ? "bitwise" : "MISMATCH");
      });
    }
  }
  Guarded("memory/copy_fill", [&] {
    const size_t n = 278011;
    const std::vector<float> host = Normal(n, 5);
    bool ok = true;
    // Copy: disjoint and overlapping (memmove semantics), at odd offsets.
    std::vector<float> results[2];
    Backend* backends[2] = {&cpu, &gpu};
    for (int i = 0; i < 2; ++i) {
      Buffer src(*backends[i], host, 1);
      Buffer dst(*backends[i], n + 8, 0);
      backends[i]->Copy(dst.ptr() + 3, src.ptr(), n);
      backends[i]->Copy(src.ptr() + 5, src.ptr(), 1000);    // overlap, forward
      backends[i]->Copy(src.ptr() + 2000, src.ptr() + 2003, 1000);  // overlap, backward
      backends[i]->Fill(dst.ptr(), 1.5f, 3);
      backends[i]->Fill(src.ptr() + 100000, -0.0f, 77777);
      backends[i]->Fill(src.ptr() + 200000, 0.0f, 7);
      std::vector<float> a = dst.Read(), s = src.Read();
      a.insert(a.end(), s.begin(), s.end());
      results[i] = std::move(a);
    }
    ok &= SameBits(results[0], results[1]);
    Record("memory/copy_fill", ok, ok ? "bitwise equal to cpu" : "MISMATCH");
  });
  if (g_sanitize) {
    std::printf("SKIP memory/out_of_memory (--sanitize: a failed cudaMalloc is an API error to the sanitizer)\n");
  } else {
    Guarded("memory/out_of_memory", [&] {
      bool threw = false;
      std::string message;
      try {
        float* p = gpu.Allocate(size_t{1} << 42);  // 16 TiB
        gpu.Release(p);
      } catch (const BackendError& e) {
        threw = e.code() == ErrorCode::kOutOfMemory;
        message = e.what();
      }
      // The error must not be sticky: the backend keeps working.
      Buffer after(gpu, std::vector<float>{1.0f, 2.0f});
      const bool works = after.Read() == std::vector<float>{1.0f, 2.0f};
      Record("memory/out_of_memory", threw && works, message);
    });
  }
  if (!cu::IsCudaBackend(&gpu)) return;  // --self-test-cpu
  Guarded("memory/transient_blocks", [&] {
    // NOTE: [transient device copies]: a returned block serves the next argument of its
    // size class without a cudaMalloc, the one stream keeps its old and new uses apart, and
    // the idle blocks stay bounded.
    const size_t n = 278011;  // over 1 MiB: a large size class
    const std::vector<float> a = Normal(n, 41);
    Buffer in(cpu, a), want(cpu, 1), got(gpu, 2);
    const size_t live = gpu.LiveAllocations();
    cpu.MeanSquareFactor(in.ptr(), 1, 1, static_cast<index_t>(n), double(n), false, 0.0f, want.ptr());
    bool ok = true;
    float* p = gpu.AcquireTransient(n);
    ok &= gpu.LiveAllocations() == live + 1;
    gpu.Upload(p, a.data(), n);
    gpu.MeanSquareFactor(p, 1, 1, static_cast<index_t>(n), double(n), false, 0.0f, got.ptr());  // queued
    gpu.ReleaseTransient(p);
    float* q = gpu.AcquireTransient(n - 3);  // the same class: the same block, at once
    float* r = gpu.AcquireTransient(n);      // q is leased: another block
    float* small = gpu.AcquireTransient(1000);
    ok &= q == p && r != q && small != q && small != r && gpu.LiveAllocations() == live + 3;
    gpu.Fill(q, 2.0f, n - 3);  // queued behind the first factor, which must still read `a`
    gpu.MeanSquareFactor(q, 1, 1, static_cast<index_t>(n - 3), double(n - 3), false, 0.0f, got.ptr() + 1);
    for (float* t : {r, small, q}) gpu.ReleaseTransient(t);
    ok &= gpu.LiveAllocations() == live;
    const std::vector<float> g = got.Read(), w = want.Read();
    const double rel = std::fabs(double(g[0]) - w[0]) / std::fabs(double(w[0]));
    ok &= rel <= 1e-5 && g[1] == 4.0f;
    // Ever larger arguments, one at a time: idle blocks beyond the largest are freed.
    for (size_t k = 1; k <= 40; ++k) gpu.ReleaseTransient(gpu.AcquireTransient(k * n));
    const size_t idle = cu::IdleTransientBytes(&gpu), bound = 40 * n * sizeof(float) * 9 / 8 + 256;
    ok &= idle > 0 && idle <= bound && gpu.LiveAllocations() == live;
    std::string detail = Format("first factor rel err %.1e, second %g; %zu bytes idle (bound %zu)", rel, g[1], idle, bound);
    if (!g_sanitize) {  // a failed cudaMalloc is an API error to compute-sanitizer
      // A full device first frees the idle blocks, then reports out of memory.
      bool threw = false;
      try {
        gpu.Release(gpu.Allocate(size_t{1} << 42));  // 16 TiB
      } catch (const BackendError& e) {
        threw = e.code() == ErrorCode::kOutOfMemory;
      }
      ok &= threw && cu::IdleTransientBytes(&gpu) == 0;
      detail += Format("; after out of memory %zu idle", cu::IdleTransientBytes(&gpu));
    }
    Record("memory/transient_blocks", ok, detail);
  });
#if ADAFISHER_CUDA_EMULATOR
  Guarded("memory/step_table_trims", [&] {
    // The step's device table grows through DeviceMalloc, as every other device allocation
    // does: on a device that idle transient blocks fill, it frees them and goes on (a plain
    // cudaMalloc threw out of memory with 32 MiB idle). The emulated device shrinks to what is
    // in use plus 2 MiB for the call, less than the table of 20,000 tensors needs (a real
    // device cannot shrink: emulator only).
    constexpr size_t kTensors = 20000;
    const std::vector<float> p0 = Normal(kTensors, 91), g0 = Normal(kTensors, 92);
    Buffer p(gpu, p0), g(gpu, g0), m(gpu, kTensors);
    std::vector<StepTensor> tensors(kTensors);
    for (size_t i = 0; i < kTensors; ++i) {
      tensors[i].param = p.ptr() + i, tensors[i].grad = g.ptr() + i, tensors[i].momentum = m.ptr() + i;
      tensors[i].numel = 1;
      tensors[i].scalars = {0.9f, 0.1f, 0.0f, 0.01f, 0.1f, 0.1f};
    }
    gpu.ReleaseTransient(gpu.AcquireTransient(size_t{8} << 20));  // 32 MiB, kept idle
    const size_t idle_before = cu::IdleTransientBytes(&gpu);
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    const char* limit_name = "ADAFISHER_CUDA_EMULATOR_MEMORY_MIB";
    const char* old_limit = std::getenv(limit_name);
    const std::string saved_limit = old_limit != nullptr ? old_limit : "";
    setenv(limit_name, std::to_string(((total_bytes - free_bytes) >> 20) + 2).c_str(), 1);
    bool applied = false;
    std::string error;
    try {
      StepRequest r;
      r.tensors = tensors.data();
      r.tensor_count = kTensors;
      applied = gpu.Step(r);
    } catch (const BackendError& e) {
      error = e.what();
    }
    if (old_limit != nullptr) {
      setenv(limit_name, saved_limit.c_str(), 1);
    } else {
      unsetenv(limit_name);
    }
    const std::vector<float> got = p.Read();
    size_t wrong = 0;
    for (size_t i = 0; i < kTensors; ++i) {
      float pw = p0[i], mw = 0.0f;
      math::update<math::UpdateRule::kAdaFisher>(pw, mw, g0[i], 1.0f, tensors[i].scalars);
      wrong += got[i] != pw;
    }
    const size_t idle_after = cu::IdleTransientBytes(&gpu);
    Record("memory/step_table_trims", applied && error.empty() && wrong == 0 && idle_before >= (size_t{32} << 20) && idle_after == 0,
           Format("%zu tensors, %zu wrong; idle %zu -> %zu bytes%s%s", kTensors, wrong, idle_before, idle_after,
                  error.empty() ? "" : "; ", error.c_str()));
  });
  Guarded("memory/pinned_copy_event_fails", [&] {
    // RecordAfterPinnedCopy: a staged upload whose event record fails throws, and the stream
    // drains first, so the next staged upload cannot refill the pinned buffer under the copy
    // still queued from it. The emulator runs a queued copy only when something waits: without
    // the drain the first buffer receives the second upload's values.
    const size_t n = 1500000;         // 6 MB: staged, in chunks of one 4 MiB pinned buffer
    const size_t chunk = size_t{1} << 20;  // floats per pinned buffer
    const std::vector<float> a = Normal(n, 81), b = Normal(n, 82);
    Buffer first(gpu, n), second(gpu, n);
    setenv("ADAFISHER_CUDA_EMULATOR_FAIL_EVENT_RECORD", "1", 1);
    std::string error;
    bool coded = false;
    try {
      gpu.Upload(first.ptr(), a.data(), n);
    } catch (const BackendError& e) {
      error = e.what();
      coded = e.code() == ErrorCode::kCudaError;
    }
    unsetenv("ADAFISHER_CUDA_EMULATOR_FAIL_EVENT_RECORD");
    gpu.Upload(second.ptr(), b.data(), n);  // the failure was not sticky
    const std::vector<float> f = first.Read(), g = second.Read();
    const bool first_chunk = std::equal(a.begin(), a.begin() + chunk, f.begin());
    const bool rest_untouched = std::all_of(f.begin() + chunk, f.end(), [](float v) { return v == 0.0f; });
    Record("memory/pinned_copy_event_fails", coded && first_chunk && rest_untouched && g == b,
           Format("threw: %s; first upload's first chunk %s, rest %s; second upload %s", error.c_str(),
                  first_chunk ? "its own values" : "OVERWRITTEN", rest_untouched ? "untouched" : "WRITTEN",
                  g == b ? "intact" : "WRONG"));
  });
#endif
  Guarded("memory/upload_async", [&] {
    // NOTE: [host copies]: the device copy of a Float32Array argument is queued behind the
    // work ahead of it and returns without waiting for that work; the host array may change
    // at once. Upload (DeviceBuffer.upload) still returns with the copy done.
#if ADAFISHER_CUDA_EMULATOR
    const size_t busy_floats = 1024, busy_reps = 1;  // queued work waits for a wait here
#else
    // 64 x 256 MiB of memset, ~5 ms on an H200, against < 1 ms of host memcpy for the 6 MB
    // staged upload: the work ahead is still running when the upload returns.
    const size_t busy_floats = size_t{64} << 20, busy_reps = 64;
#endif
    Buffer busy(gpu, busy_floats), got(gpu, 3), want(cpu, 3);
    bool ok = true;
    std::string detail;
    // 1000 floats and 65536 (256 KiB): the driver's pageable copy (inline with the command,
    // and above what drivers send inline); 1.5 M floats (6 MB): both pinned buffers.
    constexpr int kSizes = 3;
    const size_t sizes[kSizes] = {1000, 65536, 1500000};
    float* blocks[kSizes] = {nullptr, nullptr, nullptr};
    std::vector<float> host[kSizes];
    for (int i = 0; i < kSizes; ++i) {
      host[i] = Normal(sizes[i], 71 + i);
      Buffer in(cpu, host[i]);
      cpu.MeanSquareFactor(in.ptr(), 1, 1, static_cast<index_t>(sizes[i]), double(sizes[i]), false, 0.0f, want.ptr() + i);
    }
    gpu.Synchronize();
    for (int i = 0; i < kSizes; ++i) {
      for (size_t r = 0; r < busy_reps; ++r) gpu.Fill(busy.ptr(), 0.0f, busy.size());
      blocks[i] = gpu.AcquireTransient(sizes[i]);
      gpu.UploadAsync(blocks[i], host[i].data(), sizes[i]);
      const bool queued = cu::StreamBusy(&gpu);
      // Whether the driver waits at 256 KiB is what that size measures (NOTE: [host copies]),
      // and under compute-sanitizer (--sanitize) copies may be serialized: reported, not failed.
      ok &= queued || sizes[i] == 65536 || g_sanitize;
      detail += Format("%s%zu floats: %s", i == 0 ? "" : "; ", sizes[i], queued ? "returned before the work ahead" : "WAITED");
      std::fill(host[i].begin(), host[i].end(), 1e30f);  // the copy has the old values already
      gpu.MeanSquareFactor(blocks[i], 1, 1, static_cast<index_t>(sizes[i]), double(sizes[i]), false, 0.0f, got.ptr() + i);
    }
    for (float* b : blocks) gpu.ReleaseTransient(b);
    const std::vector<float> g = got.Read(), w = want.Read();
    for (int i = 0; i < kSizes; ++i) {
      const double rel = std::fabs(double(g[i]) - w[i]) / std::fabs(double(w[i]));
      ok &= rel <= 1e-5;
      detail += Format("; factor %d rel err %.1e", i, rel);
    }
    // Upload waits for its copy, and so for everything queued before it.
    for (size_t r = 0; r < busy_reps; ++r) gpu.Fill(busy.ptr(), 0.0f, busy.size());
    gpu.Upload(got.ptr(), host[0].data(), 2);
    const bool drained = !cu::StreamBusy(&gpu);
    ok &= drained;
    detail += drained ? "; Upload returned with the stream drained" : "; Upload returned EARLY";
    Record("memory/upload_async", ok, detail);
  });
  if (g_small) {
    // Under racecheck, a launch made while another thread synchronizes the stream is lost
    // ("failed to track a kernel launch") and the run stalls here (seen on an H200).
    std::printf("SKIP memory/synchronize_from_thread (--small: racecheck stalls on a cross-thread launch)\n");
    return;
  }
  Guarded("memory/synchronize_from_thread", [&] {
    Buffer a(gpu, 1 << 22);
    gpu.Fill(a.ptr(), 2.0f, a.size());
    bool ok = false;
    std::string error;
    std::thread waiter([&] { ok = cu::SynchronizeStream(&gpu, &error); });
    gpu.Fill(a.ptr(), 3.0f, a.size());  // concurrent enqueue from this thread
    waiter.join();
    gpu.Synchronize();
    ok &= cu::IsCudaBackend(&gpu) && !cu::IsCudaBackend(&cpu);
    std::string not_cuda;
    ok &= !cu::SynchronizeStream(&cpu, &not_cuda) && !not_cuda.empty();
    const std::vector<float> v = a.Read();
    ok &= v.front() == 3.0f && v.back() == 3.0f;
    Record("memory/synchronize_from_thread", ok, error);
  });
}

// ---------------------------------------------------------------------------------------
// GPU: factor kernels.

// run(gpu) with the plan constants changed by `change` (NOTE: [plan tuning]), then restored.
template <typename Change, typename Run>
std::vector<float> RunWithTuning(Backend& gpu, Change change, Run run) {
  const cu::PlanTuning defaults = cu::Tuning();
  change(cu::Tuning());
  std::vector<float> out;
  try {
    out = run(gpu);
  } catch (...) {
    cu::Tuning() = defaults;
    throw;
  }
  cu::Tuning() = defaults;
  return out;
}

// A variant that must not change a single bit of the default's result.
void RecordSameBits(const std::string& name, const std::vector<float>& want, const std::vector<float>& got) {
  const bool same = want.size() == got.size() && std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0;
  Record(name, same, same ? "bit-identical to the default" : "differs from the default");
}

void TestReductions(Backend& cpu, Backend& gpu) {
  for (const ReduceShape& s : ReduceShapes()) {
    if (g_small && static_cast<size_t>(s.outer * s.kept * s.inner) > kSmallElements) continue;
    for (size_t offset : {size_t{0}, size_t{1}}) {
      const std::string name =
          Format("factor/reduce %" PRId64 "x%" PRId64 "x%" PRId64 " off=%zu", s.outer, s.kept, s.inner, offset);
      Guarded(name, [&] {
        const size_t n = static_cast<size_t>(s.outer * s.kept * s.inner);
        const size_t k = static_cast<size_t>(s.kept);
        const std::vector<float> host = Normal(n, 3000 + n + offset);
        const double count = static_cast<double>(s.outer * s.inner);
        // Every method, on both backends; outputs concatenated: mean square (+ appended),
        // norm input (2), norm grad (kept).
        auto run = [&](Backend& b) {
          Buffer x(b, host, offset);
          Buffer out(b, k + 1 + 2 + k, offset);
          b.MeanSquareFactor(x.ptr(), s.outer, s.kept, s.inner, count, true, 0.25f, out.ptr());
          b.NormInputFactor(x.ptr(), s.outer, s.kept, s.inner, static_cast<double>(s.inner * s.inner),
                            static_cast<double>(std::max<index_t>(s.outer, 1)), out.ptr() + k + 1);
          b.NormGradFactor(x.ptr(), s.outer, s.kept, s.inner, static_cast<double>(std::max<index_t>(s.outer, 1)),
                           out.ptr() + k + 3);
          return out.Read();
        };
        const std::vector<float> want = run(cpu), got = run(gpu), again = run(gpu);
        RecordParity(name, want, got, again);
        RecordSameBits(name + " serial launches", got, RunWithTuning(gpu, [](cu::PlanTuning& t) {
                         t.programmatic_launch = false;
                       }, run));
      });
    }
  }
  // A tall plane whose float row sums would lose their small terms (NOTE: [conv factor
  // precision]): row 0 is 1, the 511 rows below are sqrt(0.98 * 2^-24), so every square below
  // rounds away against 1 in a float sum. One float sum down the 512 rows is 3e-5 off the
  // cuda backend's double sums; the CPU's 64-row bands stay inside the tolerance.
  for (DataFormat format : {DataFormat::kNCHW, DataFormat::kNHWC}) {
    const std::string name = std::string("factor/conv tall plane 512 rows ") + (format == DataFormat::kNCHW ? "nchw" : "nhwc");
    Guarded(name, [&] {
      const Conv2dShape shape = MakeConv(1, 1, 512, 8, 3, 3, 1, 1, 1, format, PatchOrder::kChannelMajor, Pad::kSame);
      std::vector<float> host(512 * 8, std::sqrt(0.98f * std::ldexp(1.0f, -24)));
      std::fill(host.begin(), host.begin() + 8, 1.0f);
      auto run = [&](Backend& b) {
        Buffer x(b, host);
        // No bias entry: the error measure is relative to the largest entry, and the bias
        // entry (1) would dwarf the window entries (~2e-3) where the drift shows.
        Buffer out(b, static_cast<size_t>(ConvOutputSize(shape, false)));
        b.Conv2dPatchFactor(x.ptr(), shape, false, out.ptr());
        return out.Read();
      };
      const std::vector<float> want = run(cpu), got = run(gpu), again = run(gpu);
      RecordParity(name, want, got, again);
    });
  }
}

// Backend::FactorJobs: the cuda backend runs the mean squares of a batch in one launch per
// plan kind (up to 16 jobs) and its conv patch factors in two (up to 8 jobs): NOTE:
// [batched factor launch] in cuda/factor_kernels.cu. Every factor must be the bits of its
// own call. The batch mixes 21 column and 18 plane mean squares (two launches of each kind,
// the last of one job), 12 conv patch factors that batch (two batches, 8 and 4 jobs; NCHW
// and NHWC, groups, strides, one with several phase-1 parts), unaligned inputs, and jobs
// that run on their own (an empty mean square, a norm grad, a conv whose kernel rows do not
// fit in shared memory).
void TestFactorBatch(Backend& cpu, Backend& gpu) {
  const std::string name = "factor/batched 54 jobs";
  Guarded(name, [&] {
    std::vector<FactorJob> shapes;
    auto mean_square = [&](index_t outer, index_t kept, index_t inner, bool appended) {
      FactorJob j;
      j.op = FactorOp::kMeanSquare;
      j.outer = outer, j.kept = kept, j.inner = inner;
      j.divisor = static_cast<double>(outer * inner);
      j.has_appended = appended, j.appended = appended ? 1.0f : 0.0f;
      shapes.push_back(j);
    };
    for (int i = 0; i < 21; ++i) mean_square(1 + 37 * i, 1 + (i * 29) % 300, 1, i % 2 == 0);
    for (int i = 0; i < 17; ++i) mean_square(1 + 5 * i, 1 + (i * 7) % 40, 2 + 4 * (i % 3) + (i % 4 == 0 ? 2 : 0), false);
    mean_square(64, 3, 1024, false);  // 16 parts per kept entry: tickets
    mean_square(0, 12, 1, true);  // nothing to read: runs alone
    FactorJob norm;
    norm.op = FactorOp::kNormGrad;
    norm.outer = 6, norm.kept = 5, norm.inner = 33, norm.divisor = 6.0;
    shapes.push_back(norm);
    auto conv = [&](const Conv2dShape& c, bool bias) {
      FactorJob j;
      j.op = FactorOp::kConv2dPatch;
      j.conv = c;
      j.has_appended = bias;
      shapes.push_back(j);
    };
    conv(MakeConv(3, 4, 9, 7, 3, 3, 2, 1, 2, DataFormat::kNCHW, PatchOrder::kChannelMajor, Pad::kSame), true);
    conv(MakeConv(5, 6, 8, 8, 2, 3, 1, 2, 3, DataFormat::kNHWC, PatchOrder::kChannelMinor, Pad::kValid), false);
    // Several phase-1 parts (tickets):
    conv(MakeConv(64, 2, 5, 5, 3, 3, 1, 1, 1, DataFormat::kNCHW, PatchOrder::kChannelMajor, Pad::kExplicit, 1, 1, 1, 1), true);
    // kh * W > 4096: runs alone.
    conv(MakeConv(1, 1, 3, 1500, 3, 3, 1, 1, 1, DataFormat::kNCHW, PatchOrder::kChannelMajor, Pad::kSame), false);
    for (int i = 0; i < 9; ++i) {
      conv(MakeConv(1 + i % 3, 2 + i, 4 + i, 6, 1 + i % 3, 2, 1 + i % 2, 1, 1, i % 2 ? DataFormat::kNHWC : DataFormat::kNCHW,
                    i % 3 ? PatchOrder::kChannelMajor : PatchOrder::kChannelMinor, Pad::kSame),
           i % 2 == 0);
    }

    auto in_size = [](const FactorJob& j) {
      return static_cast<size_t>(j.op == FactorOp::kConv2dPatch ? ConvInputSize(j.conv) : j.outer * j.kept * j.inner);
    };
    auto out_size = [](const FactorJob& j) {
      return static_cast<size_t>(j.op == FactorOp::kConv2dPatch ? ConvOutputSize(j.conv, j.has_appended)
                                                                 : j.kept + (j.has_appended ? 1 : 0));
    };
    // Runs the jobs on b, all at once or one by one; returns the outputs concatenated.
    auto run = [&](Backend& b, bool batched) {
      std::vector<Buffer> inputs;
      inputs.reserve(shapes.size());
      size_t total_out = 0;
      for (size_t i = 0; i < shapes.size(); ++i) {
        inputs.emplace_back(b, Normal(in_size(shapes[i]), 7000 + i), i % 3 == 1 ? 1 : 0);
        total_out += out_size(shapes[i]);
      }
      Buffer out(b, total_out);
      b.Fill(out.ptr(), -1.0f, total_out);
      std::vector<FactorJob> jobs = shapes;
      size_t at = 0;
      for (size_t i = 0; i < jobs.size(); ++i) {
        jobs[i].x = inputs[i].ptr();
        jobs[i].out = out.ptr() + at;
        at += out_size(jobs[i]);
      }
      if (batched) {
        b.FactorJobs(jobs.data(), jobs.size());
      } else {
        for (const FactorJob& j : jobs) b.RunFactorJob(j);
      }
      return out.Read();
    };
    const std::vector<float> want = run(cpu, false), single = run(gpu, false);
    const std::vector<float> got = run(gpu, true), again = run(gpu, true);
    RecordParity(name, want, got, again);
    RecordSameBits(name + " vs one call each", single, got);
    RecordSameBits(name + " serial launches", got, RunWithTuning(gpu, [](cu::PlanTuning& t) {
                     t.programmatic_launch = false;
                   }, [&](Backend& b) { return run(b, true); }));
    // Jobs of more than 4 blocks run alone, the others still in batches.
    RecordSameBits(name + " large jobs alone", got, RunWithTuning(gpu, [](cu::PlanTuning& t) {
                     t.batch_job_max_blocks = 4;
                   }, [&](Backend& b) { return run(b, true); }));
  });
}

void TestConv(Backend& cpu, Backend& gpu) {
  for (const ConvCase& c : ConvCases()) {
    if (g_small && static_cast<size_t>(ConvInputSize(c.shape)) > kSmallElements) continue;
    for (size_t offset : {size_t{0}, size_t{1}}) {
      const std::string name = Format("factor/conv %s off=%zu", c.name.c_str(), offset);
      Guarded(name, [&] {
        const size_t n = static_cast<size_t>(ConvInputSize(c.shape));
        const size_t k = static_cast<size_t>(ConvOutputSize(c.shape, c.bias));
        const std::vector<float> host = Normal(n, 4000 + n + offset);
        auto run = [&](Backend& b) {
          Buffer x(b, host, offset);
          Buffer out(b, k, offset);
          b.Conv2dPatchFactor(x.ptr(), c.shape, c.bias, out.ptr());
          return out.Read();
        };
        const std::vector<float> want = run(cpu), got = run(gpu), again = run(gpu);
        RecordParity(name, want, got, again);
        // Phase 1 four adjacent pixels per thread, and serial launches (NOTE: [plan tuning]):
        // the same bits.
        RecordSameBits(name + " quads", got, RunWithTuning(gpu, [](cu::PlanTuning& t) { t.conv_quads = true; }, run));
        RecordSameBits(name + " serial launches", got, RunWithTuning(gpu, [](cu::PlanTuning& t) {
                         t.programmatic_launch = false;
                       }, run));
      });
    }
  }
}

// ---------------------------------------------------------------------------------------
// GPU: the step.

struct TensorPlan {
  index_t numel = 0;
  bool preconditioned = false;
  index_t o_stride = 1, o_count = 1, k_stride = 1, k_count = 1, h_offset = 0, s_offset = 0;
  size_t offset = 0;  // floats into the allocation
};

struct StepInput {
  bool refresh = true, guard = true, expect_applied = true;
  std::vector<std::vector<float>> grads;
  std::vector<float> fresh;
};

struct Scenario {
  std::string name;
  math::UpdateRule rule = math::UpdateRule::kAdaFisher;
  float damping = 1e-3f;
  double lr = 1e-3, beta = 0.9, weight_decay = 0.0;
  std::vector<TensorPlan> tensors;
  std::vector<FactorSegment> segments;
  index_t factor_total = 0;
  std::vector<std::vector<float>> params, momenta;
  std::vector<StepInput> steps;

  // A layer [out, K] (tfjs: [K, out]) with its H (K + bias) and S (out) segments.
  void AddLayer(index_t out, index_t K, bool tfjs, bool bias, size_t offset) {
    const index_t h = factor_total, hl = K + (bias ? 1 : 0);
    const index_t s = h + hl;
    factor_total = s + out;
    segments.push_back({h, hl});
    segments.push_back({s, out});
    TensorPlan w;
    w.numel = out * K;
    w.preconditioned = true;
    w.h_offset = h, w.s_offset = s, w.offset = offset;
    if (tfjs) {
      w.o_stride = 1, w.o_count = out, w.k_stride = out, w.k_count = K;
    } else {
      w.o_stride = K, w.o_count = out, w.k_stride = 1, w.k_count = K;
    }
    tensors.push_back(w);
    if (bias) {
      TensorPlan b;
      b.numel = out;
      b.preconditioned = true;
      b.h_offset = h + K, b.s_offset = s, b.offset = offset;
      b.o_stride = 1, b.o_count = out, b.k_stride = out, b.k_count = 1;
      tensors.push_back(b);
    }
  }
  void AddPlain(index_t numel, size_t offset) {
    TensorPlan t;
    t.numel = numel;
    t.offset = offset;
    tensors.push_back(t);
  }
  void Initialize(uint64_t seed) {
    for (size_t t = 0; t < tensors.size(); ++t) {
      params.push_back(Normal(static_cast<size_t>(tensors[t].numel), seed + 2 * t, 0.5f));
      momenta.push_back(Normal(static_cast<size_t>(tensors[t].numel), seed + 2 * t + 1, 0.01f));
    }
  }
  StepInput MakeStep(uint64_t seed, bool refresh) const {
    StepInput in;
    in.refresh = refresh;
    for (size_t t = 0; t < tensors.size(); ++t) in.grads.push_back(Normal(static_cast<size_t>(tensors[t].numel), seed + t));
    in.fresh = Normal(static_cast<size_t>(factor_total), seed + 999999, 2.0f);
    for (float& f : in.fresh) f = f * f;  // fresh factors are mean squares: >= 0
    return in;
  }
};

struct Snapshot {
  std::vector<std::vector<float>> params, momenta;
  std::vector<float> running;
  bool applied = false;
};

// Runs every step of the scenario on one backend; the state after each step.
std::vector<Snapshot> RunScenario(Backend& b, const Scenario& sc) {
  std::vector<Buffer> p, m, g;
  for (size_t t = 0; t < sc.tensors.size(); ++t) {
    p.emplace_back(b, sc.params[t], sc.tensors[t].offset);
    m.emplace_back(b, sc.momenta[t], sc.tensors[t].offset);
    g.emplace_back(b, static_cast<size_t>(sc.tensors[t].numel), sc.tensors[t].offset);
  }
  Buffer running(b, static_cast<size_t>(sc.factor_total));
  Buffer fresh(b, static_cast<size_t>(sc.factor_total));
  b.Fill(running.ptr(), 1.0f, running.size());  // running factors start at ones
  std::vector<int64_t> counts(sc.tensors.size(), 0);
  std::vector<Snapshot> out;
  for (const StepInput& in : sc.steps) {
    for (size_t t = 0; t < sc.tensors.size(); ++t) g[t].Write(in.grads[t]);
    fresh.Write(in.fresh);
    std::vector<StepTensor> tensors(sc.tensors.size());
    for (size_t t = 0; t < sc.tensors.size(); ++t) {
      const TensorPlan& tp = sc.tensors[t];
      StepTensor& st = tensors[t];
      st.param = p[t].ptr(), st.grad = g[t].ptr(), st.momentum = m[t].ptr();
      st.numel = tp.numel;
      st.preconditioned = tp.preconditioned;
      st.h_offset = tp.h_offset, st.s_offset = tp.s_offset;
      st.o_stride = tp.o_stride, st.o_count = tp.o_count, st.k_stride = tp.k_stride, st.k_count = tp.k_count;
      st.scalars = math::step_scalars(sc.lr, sc.beta, sc.weight_decay, counts[t] + 1);
    }
    StepRequest r;
    r.rule = sc.rule;
    r.damping = sc.damping;
    r.tensors = tensors.data();
    r.tensor_count = tensors.size();
    r.refresh = in.refresh;
    r.segments = sc.segments.data();
    r.segment_count = sc.segments.size();
    r.fresh = fresh.ptr();
    r.running = running.ptr();
    r.guard = in.guard;
    Snapshot s;
    s.applied = b.Step(r);
    if (s.applied) {
      for (int64_t& c : counts) ++c;
    }
    for (size_t t = 0; t < sc.tensors.size(); ++t) {
      s.params.push_back(p[t].Read());
      s.momenta.push_back(m[t].Read());
    }
    s.running = running.Read();
    out.push_back(std::move(s));
  }
  return out;
}

Diff CompareSnapshot(const Snapshot& got, const Snapshot& want) {
  Diff d;
  for (size_t t = 0; t < want.params.size(); ++t) {
    d.Merge(Compare(got.params[t], want.params[t]));
    d.Merge(Compare(got.momenta[t], want.momenta[t]));
  }
  d.Merge(Compare(got.running, want.running));
  return d;
}

bool SameSnapshot(const Snapshot& a, const Snapshot& b) {
  bool same = SameBits(a.running, b.running);
  for (size_t t = 0; t < a.params.size(); ++t) {
    same &= SameBits(a.params[t], b.params[t]) && SameBits(a.momenta[t], b.momenta[t]);
  }
  return same;
}

Scenario MixedScenario(math::UpdateRule rule, double weight_decay) {
  Scenario sc;
  sc.name = rule == math::UpdateRule::kAdaFisher ? "adafisher" : "adafisherw";
  sc.rule = rule;
  sc.weight_decay = weight_decay;
  sc.AddLayer(173, 1607, false, true, 0);  // 278011-element [out, K] weight + bias
  sc.AddLayer(173, 1607, true, true, 0);   // the same as TF.js [K, out]
  sc.AddLayer(3, 5, false, true, 1);       // unaligned
  sc.AddLayer(64, 1000, true, false, 1);   // unaligned, TF.js
  sc.AddLayer(16, 72, false, true, 0);     // a conv [16, 8, 3, 3]
  sc.AddLayer(32, 1, false, true, 0);      // a norm layer: weight [C, 1], bias -> H[1]
  sc.AddPlain(278011, 0);
  sc.AddPlain(0, 0);
  sc.AddLayer(4, 0, false, false, 0);  // an empty preconditioned tensor (K = 0)
  {
    // A geometry neither [out, K] nor [K, out]: the CPU backend's general path.
    const index_t h = sc.factor_total;
    sc.factor_total += 5 + 7;
    sc.segments.push_back({h, 5});
    sc.segments.push_back({h + 5, 7});
    TensorPlan t;
    t.numel = 1000, t.preconditioned = true, t.h_offset = h, t.s_offset = h + 5;
    t.o_stride = 4, t.o_count = 7, t.k_stride = 2, t.k_count = 5;
    sc.tensors.push_back(t);
  }
  // Many tensors (600) and blocks in one launch.
  std::mt19937_64 rng(17);
  for (int i = 0; i < 300; ++i) {
    sc.AddLayer(1 + static_cast<index_t>(rng() % 20), 1 + static_cast<index_t>(rng() % 15), i % 2 == 1, i % 3 == 0,
                i % 5 == 0 ? 1 : 0);
    sc.AddPlain(static_cast<index_t>(rng() % 300), i % 7 == 0 ? 1 : 0);
  }
  sc.Initialize(rule == math::UpdateRule::kAdaFisher ? 100 : 200);
  // 0: refresh; 1: reuse the factors; 2: NaN gradient in the first tensor, inf in the last -> skipped;
  // 3: NaN fresh factor -> skipped; 4: refresh, +-inf fresh factors cleaned (the guard lets them
  // through: NOTE: [guard predicate]); 5: no guard, +-inf and NaN fresh factors.
  sc.steps.push_back(sc.MakeStep(1000, true));
  sc.steps.push_back(sc.MakeStep(2000, false));
  StepInput nan_grad = sc.MakeStep(3000, true);
  nan_grad.grads[0][123456] = std::numeric_limits<float>::quiet_NaN();
  for (size_t t = nan_grad.grads.size(); t-- > 0;) {
    if (!nan_grad.grads[t].empty()) {
      nan_grad.grads[t].back() = std::numeric_limits<float>::infinity();
      break;
    }
  }
  nan_grad.expect_applied = false;
  sc.steps.push_back(nan_grad);
  StepInput nan_fresh = sc.MakeStep(4000, true);
  nan_fresh.fresh[sc.segments[7].offset + 1] = std::numeric_limits<float>::quiet_NaN();
  nan_fresh.expect_applied = false;
  sc.steps.push_back(nan_fresh);
  StepInput inf_fresh = sc.MakeStep(5000, true);
  inf_fresh.fresh[sc.segments[7].offset + 1] = std::numeric_limits<float>::infinity();   // -> 1
  inf_fresh.fresh[sc.segments[2].offset] = -std::numeric_limits<float>::infinity();      // -> 0
  sc.steps.push_back(inf_fresh);
  StepInput unguarded = sc.MakeStep(6000, true);
  unguarded.guard = false;
  unguarded.fresh[sc.segments[0].offset + 7] = std::numeric_limits<float>::infinity();    // -> 1
  unguarded.fresh[sc.segments[1].offset + 2] = -std::numeric_limits<float>::infinity();   // -> 0
  unguarded.fresh[sc.segments[4].offset] = std::numeric_limits<float>::quiet_NaN();       // first entry: the whole factor NaN
  unguarded.fresh[sc.segments[6].offset + 3] = std::numeric_limits<float>::quiet_NaN();   // a later entry: NaN too (NOTE: [NaN min-max])
  sc.steps.push_back(unguarded);
  return sc;
}

void TestStep(Backend& cpu, Backend& gpu, const Scenario& sc) {
  const std::string prefix = "step/" + sc.name;
  Guarded(prefix, [&] {
    const std::vector<Snapshot> want = RunScenario(cpu, sc);
    const std::vector<Snapshot> got = RunScenario(gpu, sc);
    const std::vector<Snapshot> again = RunScenario(gpu, sc);
    for (size_t i = 0; i < sc.steps.size(); ++i) {
      const StepInput& in = sc.steps[i];
      const Diff d = CompareSnapshot(got[i], want[i]);
      bool ok = d.Ok() && got[i].applied == in.expect_applied && want[i].applied == in.expect_applied;
      std::string detail = Format("applied gpu=%d cpu=%d, ", got[i].applied, want[i].applied) + d.Str();
      if (!in.expect_applied && i > 0) {
        // A tripped guard writes nothing: the state is bit-identical to the previous one.
        const bool untouched = SameSnapshot(got[i], got[i - 1]) && SameSnapshot(want[i], want[i - 1]);
        ok &= untouched;
        detail += untouched ? ", untouched" : ", STATE CHANGED";
      }
      Record(Format("%s step %zu%s%s", prefix.c_str(), i, in.refresh ? " refresh" : "", in.guard ? "" : " unguarded"),
             ok, detail);
    }
    bool same = true;
    for (size_t i = 0; i < sc.steps.size(); ++i) same &= SameSnapshot(got[i], again[i]) && got[i].applied == again[i].applied;
    Record(prefix + " determinism", same, same ? "two runs bit-identical" : "RUNS DIFFER");
  });
}

void TestEmptyStep(Backend& gpu) {
  Guarded("step/empty", [&] {
    StepRequest r;
    r.guard = true;
    const bool a = gpu.Step(r);
    r.guard = false;
    const bool b = gpu.Step(r);
    Record("step/empty", a && b, "no tensors, no segments");
  });
}

// Optional: one tensor of 2^31 + 1000 elements (the 64-bit index path), checked at sampled
// elements against the host formula.
void TestWide(Backend& gpu) {
  Guarded("step/wide", [&] {
    const index_t numel = (index_t{1} << 31) + 1000;
    const index_t K = (index_t{1} << 20) + 7, out = numel / K + 1;  // [out, K] view, last row partial
    Buffer p(gpu, static_cast<size_t>(numel)), m(gpu, static_cast<size_t>(numel)), g(gpu, static_cast<size_t>(numel));
    gpu.Fill(p.ptr(), 1.0f, p.size());
    gpu.Fill(m.ptr(), 0.5f, m.size());
    gpu.Fill(g.ptr(), 0.25f, g.size());
    const std::vector<float> factors = [&] {
      std::vector<float> f = Normal(static_cast<size_t>(K + out), 77);
      for (float& v : f) v = v * v;
      return f;
    }();
    Buffer running(gpu, factors);
    StepTensor t;
    t.param = p.ptr(), t.grad = g.ptr(), t.momentum = m.ptr(), t.numel = numel, t.preconditioned = true;
    t.h_offset = 0, t.s_offset = K, t.o_stride = K, t.o_count = out, t.k_stride = 1, t.k_count = K;
    t.scalars = {0.9f, 0.1f, 0.0f, 0.01f, 0.001f, 0.1f};
    StepRequest r;
    r.tensors = &t;
    r.tensor_count = 1;
    r.running = running.ptr();
    const bool applied = gpu.Step(r);
    std::mt19937_64 rng(5);
    std::vector<index_t> samples = {0, 1, K - 1, K, numel - 1, numel - 2, (index_t{1} << 31) - 1, index_t{1} << 31,
                                    (index_t{1} << 31) + 1};
    for (int i = 0; i < 200; ++i) samples.push_back(static_cast<index_t>(rng() % static_cast<uint64_t>(numel)));
    size_t bad = 0;
    for (index_t i : samples) {
      float pg = 0, mg = 0;
      gpu.Download(&pg, p.ptr() + i, 1);
      gpu.Download(&mg, m.ptr() + i, 1);
      float pw = 1.0f, mw = 0.5f;
      const float f = math::fisher_diagonal(factors[K + (i / K) % out], factors[i % K], r.damping);
      math::update<math::UpdateRule::kAdaFisher>(pw, mw, 0.25f, f, t.scalars);
      if (std::fabs(pg - pw) > 1e-6f * std::fabs(pw) || std::fabs(mg - mw) > 1e-6f * std::fabs(mw)) ++bad;
    }
    Record("step/wide", applied && bad == 0, Format("%zu samples, %zu wrong", samples.size(), bad));
  });
}

// ---------------------------------------------------------------------------------------
// Optional bandwidth figures (see the performance contract in cuda/README.md).

// The conv layers of bench/gpu.ts's cnn512 case: NCHW, batch 512, 3x3, pad 1.
struct Cnn512Layer {
  int c, hw, stride, out_c;
  Conv2dShape Shape() const {
    return MakeConv(512, c, hw, hw, 3, 3, stride, stride, 1, DataFormat::kNCHW, PatchOrder::kChannelMajor,
                    Pad::kExplicit, 1, 1, 1, 1);
  }
};
const std::vector<Cnn512Layer>& Cnn512Layers() {
  static const std::vector<Cnn512Layer> layers = {{3, 32, 1, 32}, {32, 32, 2, 64}, {64, 16, 2, 128}};
  return layers;
}

// --profile: only cnn512's six factor calls, three times each, for a profiler (ncu) to time
// every kernel they launch (scripts/gpu-check.sh, stage profile).
void Profile(Backend& gpu) {
  Buffer x(gpu, size_t{1} << 25), out(gpu, 1 << 20);  // 128 MiB: the largest input is 64 MiB
  gpu.Fill(x.ptr(), 0.5f, x.size());
  for (int rep = 0; rep < 3; ++rep) {
    for (const Cnn512Layer& l : Cnn512Layers()) {
      const Conv2dShape s = l.Shape();
      gpu.Conv2dPatchFactor(x.ptr(), s, true, out.ptr());
      gpu.MeanSquareFactor(x.ptr(), 512, l.out_c, s.out_h * s.out_w, 512.0, false, 0.0f, out.ptr());
    }
  }
  gpu.Synchronize();
  Record("profile/cnn512", true, "6 factor calls x 3");
}

// Seconds per call of fn, `iterations` calls back to back then one synchronize. With
// `enqueue`, also the host's seconds per call up to the last call's return (before the
// synchronize): near the total, the calls are bound by the host's launches, not the GPU.
double SecondsPerCall(Backend& gpu, const std::function<void()>& fn, int iterations = 20, double* enqueue = nullptr) {
  for (int i = 0; i < 3; ++i) fn();
  gpu.Synchronize();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i) fn();
  const auto queued = std::chrono::steady_clock::now();
  gpu.Synchronize();
  const auto end = std::chrono::steady_clock::now();
  if (enqueue != nullptr) *enqueue = std::chrono::duration<double>(queued - start).count() / iterations;
  return std::chrono::duration<double>(end - start).count() / iterations;
}

void Bench(Backend& gpu) {
  const size_t n = size_t{1} << 26;  // 64 Mi floats, 256 MiB per buffer
  Buffer a(gpu, n), b(gpu, n), c(gpu, n);
  gpu.Fill(a.ptr(), 0.5f, n);
  gpu.Fill(b.ptr(), 0.25f, n);
  const double copy = 2.0 * n * sizeof(float) / SecondsPerCall(gpu, [&] { gpu.Copy(c.ptr(), a.ptr(), n); });
  std::printf("bench copy                         %8.1f GB/s (baseline: device-to-device copy, read + write)\n",
              copy / 1e9);
  // With `enqueue` (>= 0): the host's share, see SecondsPerCall.
  auto report = [&](const char* name, double bytes, double seconds, double enqueue = -1) {
    const double bw = bytes / seconds;
    std::printf("bench %-28s %8.1f GB/s  %5.2f x copy  %9.3f ms", name, bw / 1e9, bw / copy, seconds * 1e3);
    if (enqueue >= 0) std::printf("  (host enqueue %.1f us/call)", enqueue * 1e6);
    std::printf("\n");
  };
  // Step: one [8192, 8192] weight; 20 bytes per parameter unguarded, 24 guarded.
  Buffer running(gpu, 8192 * 2);
  gpu.Fill(running.ptr(), 1.0f, running.size());
  StepTensor t;
  t.param = a.ptr(), t.grad = b.ptr(), t.momentum = c.ptr(), t.numel = static_cast<index_t>(n);
  t.preconditioned = true, t.h_offset = 0, t.s_offset = 8192;
  t.o_stride = 8192, t.o_count = 8192, t.k_stride = 1, t.k_count = 8192;
  t.scalars = {0.9f, 0.1f, 0.0f, 1e-9f, 1e-9f, 0.1f};
  gpu.Fill(c.ptr(), 0.0f, n);
  StepRequest r;
  r.tensors = &t;
  r.tensor_count = 1;
  r.running = running.ptr();
  r.guard = false;
  report("step unguarded (20 B/param)", 20.0 * n, SecondsPerCall(gpu, [&] { gpu.Step(r); }));
  r.guard = true;
  report("step guarded (24 B/param)", 24.0 * n, SecondsPerCall(gpu, [&] { gpu.Step(r); }));
  // The same parameters as 1024 tensors of 65536 (TF.js layout): many-tensor launches.
  std::vector<StepTensor> many(1024, t);
  for (size_t i = 0; i < many.size(); ++i) {
    const size_t off = i * 65536;
    many[i].param = a.ptr() + off, many[i].grad = b.ptr() + off, many[i].momentum = c.ptr() + off;
    many[i].numel = 65536;
    many[i].o_stride = 1, many[i].o_count = 256, many[i].k_stride = 256, many[i].k_count = 256;
  }
  r.tensors = many.data();
  r.tensor_count = many.size();
  r.guard = false;
  report("step 1024 tensors unguarded", 20.0 * n, SecondsPerCall(gpu, [&] { gpu.Step(r); }));
  // Factors: bytes read of x.
  Buffer out(gpu, 1 << 20);
  report("mean square [65536, 1024]", 4.0 * n, SecondsPerCall(gpu, [&] {
           gpu.MeanSquareFactor(a.ptr(), 65536, 1024, 1, 65536.0, true, 1.0f, out.ptr());
         }));
  report("mean square [1048576, 64]", 4.0 * n, SecondsPerCall(gpu, [&] {
           gpu.MeanSquareFactor(a.ptr(), 1 << 20, 64, 1, 1048576.0, false, 0.0f, out.ptr());
         }));
  report("norm grad [256, 64, 4096]", 4.0 * n, SecondsPerCall(gpu, [&] {
           gpu.NormGradFactor(a.ptr(), 256, 64, 4096, 256.0, out.ptr());
         }));
  for (DataFormat format : {DataFormat::kNCHW, DataFormat::kNHWC}) {
    const Conv2dShape s = MakeConv(128, 64, 90, 90, 3, 3, 1, 1, 1, format, PatchOrder::kChannelMajor, Pad::kSame);
    const double bytes = 4.0 * static_cast<double>(ConvInputSize(s));
    report(format == DataFormat::kNCHW ? "conv 3x3 [128,64,90,90] nchw" : "conv 3x3 [128,90,90,64] nhwc", bytes,
           SecondsPerCall(gpu, [&] { gpu.Conv2dPatchFactor(a.ptr(), s, true, out.ptr()); }));
  }
  // The conv layers of the GPU bench's cnn512 case, one call at a time, each call on the next
  // of the three 256 MiB buffers (from DRAM, not L2): where a model's conv factor time goes.
  // Then the fixed cost of one call on a tiny conv.
  const float* inputs[3] = {a.ptr(), b.ptr(), c.ptr()};
  double total_bytes = 0, total_seconds = 0;
  for (const Cnn512Layer& l : Cnn512Layers()) {
    const Conv2dShape s = l.Shape();
    const index_t spatial = s.out_h * s.out_w;
    int turn = 0;
    const double h_bytes = 4.0 * static_cast<double>(ConvInputSize(s));
    double h_enqueue = 0, s_enqueue = 0;
    const double h_seconds = SecondsPerCall(
        gpu, [&] { gpu.Conv2dPatchFactor(inputs[turn++ % 3], s, true, out.ptr()); }, 20, &h_enqueue);
    report(Format("cnn512 H x[512,%d,%d,%d]", l.c, l.hw, l.hw).c_str(), h_bytes, h_seconds, h_enqueue);
    const double s_bytes = 4.0 * 512.0 * l.out_c * static_cast<double>(spatial);
    const double s_seconds = SecondsPerCall(
        gpu, [&] { gpu.MeanSquareFactor(inputs[turn++ % 3], 512, l.out_c, spatial, 512.0, false, 0.0f, out.ptr()); },
        20, &s_enqueue);
    report(Format("cnn512 S g[512,%d,%d]", l.out_c, static_cast<int>(spatial)).c_str(), s_bytes, s_seconds,
           s_enqueue);
    total_bytes += h_bytes + s_bytes;
    total_seconds += h_seconds + s_seconds;
  }
  report("cnn512 conv factors, sum", total_bytes, total_seconds);
  std::vector<FactorJob> cnn512_jobs, big_jobs;
  double cnn512_bytes = 0, big_bytes = 0;
  {
    // cnn512's six conv factor calls as one FactorJobs call: the three H in one batch (two
    // launches), the three S in another (one launch). Layer i's input at the start of buffer
    // i, its output gradient 128 MiB further (224 MB in all: more than L2).
    std::vector<FactorJob> jobs;
    double bytes = 0;
    for (size_t i = 0; i < Cnn512Layers().size(); ++i) {
      const Cnn512Layer& l = Cnn512Layers()[i];
      const Conv2dShape s = l.Shape();
      FactorJob h;
      h.op = FactorOp::kConv2dPatch;
      h.x = inputs[i];
      h.conv = s;
      h.has_appended = true;
      h.out = out.ptr() + 4096 * i;
      FactorJob g;
      g.x = inputs[i] + (size_t{32} << 20);
      g.outer = 512, g.kept = l.out_c, g.inner = s.out_h * s.out_w;
      g.divisor = 512.0 * static_cast<double>(g.inner);
      g.out = out.ptr() + 4096 * (i + 3);
      bytes += 4.0 * (static_cast<double>(ConvInputSize(s)) + static_cast<double>(g.outer * g.kept * g.inner));
      jobs.push_back(h);
      jobs.push_back(g);
    }
    double enqueue = 0;
    report("cnn512 conv factors, one call", bytes,
           SecondsPerCall(gpu, [&] { gpu.FactorJobs(jobs.data(), jobs.size()); }, 20, &enqueue), enqueue);
    cnn512_jobs = jobs;
    cnn512_bytes = bytes;
  }
  {
    // The `big` bench case's factors (4 x Linear 4096 -> 4096, batch 256: a 4 MB input and a
    // 4 MB output gradient per layer, one buffer each): 8 calls against one batch (one column
    // launch; NOTE: [batched factor launch] in cuda/factor_kernels.cu). The 32 MB stay in an
    // H100's or H200's L2 from call to call: these two lines compare fixed costs.
    std::vector<FactorJob> jobs;
    for (int i = 0; i < 8; ++i) {
      FactorJob j;
      j.x = a.ptr() + static_cast<size_t>(i) * 256 * 4096;
      j.outer = 256, j.kept = 4096, j.inner = 1;
      j.divisor = 256.0;
      j.has_appended = i % 2 == 0, j.appended = 1.0f;
      j.out = out.ptr() + static_cast<size_t>(i) * 4097;
      jobs.push_back(j);
    }
    const double bytes = 8.0 * 4.0 * 256 * 4096;
    double each_enqueue = 0, batch_enqueue = 0;
    report("big factors, 8 calls", bytes, SecondsPerCall(gpu, [&] {
             for (const FactorJob& j : jobs) gpu.RunFactorJob(j);
           }, 20, &each_enqueue), each_enqueue);
    report("big factors, one batch", bytes, SecondsPerCall(gpu, [&] { gpu.FactorJobs(jobs.data(), jobs.size()); }, 20,
                                                            &batch_enqueue), batch_enqueue);
    big_jobs = jobs;
    big_bytes = bytes;
  }

  // The plan constants (NOTE: [plan tuning] in cuda/launch_plan.h), swept on cnn512's calls:
  // one line per setting with the three calls' times and their sum against copy bandwidth.
  auto tune = [&](const std::string& setting, bool conv) {
    double seconds[3] = {0, 0, 0}, bytes = 0, total = 0;
    int turn = 0;
    for (size_t i = 0; i < Cnn512Layers().size(); ++i) {
      const Cnn512Layer& l = Cnn512Layers()[i];
      const Conv2dShape s = l.Shape();
      const index_t spatial = s.out_h * s.out_w;
      if (conv) {
        bytes += 4.0 * static_cast<double>(ConvInputSize(s));
        seconds[i] = SecondsPerCall(gpu, [&] { gpu.Conv2dPatchFactor(inputs[turn++ % 3], s, true, out.ptr()); });
      } else {
        bytes += 4.0 * 512.0 * l.out_c * static_cast<double>(spatial);
        seconds[i] = SecondsPerCall(gpu, [&] {
          gpu.MeanSquareFactor(inputs[turn++ % 3], 512, l.out_c, spatial, 512.0, false, 0.0f, out.ptr());
        });
      }
      total += seconds[i];
    }
    std::printf("tune %-34s %s calls %6.1f %6.1f %6.1f us, sum %6.1f us, %5.1f%% of copy\n", setting.c_str(),
                conv ? "H" : "S", seconds[0] * 1e6, seconds[1] * 1e6, seconds[2] * 1e6, total * 1e6,
                100.0 * bytes / total / copy);
  };
  const cu::PlanTuning defaults = cu::Tuning();
  for (bool quads : {true, false}) {
    for (int64_t per_thread : {16, 32, 64, 128}) {
      for (int64_t max_blocks : {2048, 4096, 8192}) {
        cu::Tuning() = defaults;
        cu::Tuning().plane_quads = quads;
        cu::Tuning().plane_min_per_thread = per_thread;
        cu::Tuning().plane_max_blocks = max_blocks;
        tune(Format("plane quads=%d min_per_thread=%d max_blocks=%d", quads ? 1 : 0, static_cast<int>(per_thread),
                    static_cast<int>(max_blocks)),
             false);
      }
    }
  }
  cu::Tuning() = defaults;
  cu::Tuning().programmatic_launch = false;
  tune("plane defaults, serial launches", false);
  tune("conv defaults, serial launches", true);
  for (bool quads : {false, true}) {
    for (int shift : {16, 17, 18, 19, 20}) {
      cu::Tuning() = defaults;
      cu::Tuning().conv_quads = quads;
      cu::Tuning().conv_threads = int64_t{1} << shift;
      tune(Format("conv quads=%d threads=2^%d", quads ? 1 : 0, shift), true);
    }
  }
  // The largest job a batch takes (PlanTuning::batch_job_max_blocks): cnn512's conv factors
  // as one call and big's as one batch. cnn512's largest phase-1 grid is 1,024 blocks, each
  // of big's 512.
  for (int64_t most : {int64_t{0}, int64_t{256}, int64_t{512}, int64_t{1024}, INT64_MAX}) {
    cu::Tuning() = defaults;
    cu::Tuning().batch_job_max_blocks = most;
    const double cnn = SecondsPerCall(gpu, [&] { gpu.FactorJobs(cnn512_jobs.data(), cnn512_jobs.size()); });
    const double big = SecondsPerCall(gpu, [&] { gpu.FactorJobs(big_jobs.data(), big_jobs.size()); });
    const std::string setting =
        most == INT64_MAX ? std::string("batch job_max_blocks=all") : Format("batch job_max_blocks=%d", static_cast<int>(most));
    std::printf("tune %-34s B calls cnn512 %6.1f big %6.1f us, sum %6.1f us, %5.1f%% of copy\n", setting.c_str(),
                cnn * 1e6, big * 1e6, (cnn + big) * 1e6, 100.0 * (cnn512_bytes + big_bytes) / (cnn + big) / copy);
  }
  cu::Tuning() = defaults;
  const Conv2dShape tiny = MakeConv(1, 3, 8, 8, 3, 3, 1, 1, 1, DataFormat::kNCHW, PatchOrder::kChannelMajor, Pad::kSame);
  double enqueue = 0;
  const double tiny_conv =
      SecondsPerCall(gpu, [&] { gpu.Conv2dPatchFactor(a.ptr(), tiny, true, out.ptr()); }, 20, &enqueue);
  report("conv [1,3,8,8] (fixed cost)", 4.0 * 192, tiny_conv, enqueue);
  const double tiny_square = SecondsPerCall(
      gpu, [&] { gpu.MeanSquareFactor(a.ptr(), 1, 8, 64, 1.0, false, 0.0f, out.ptr()); }, 20, &enqueue);
  report("mean square [1,8,64] (fixed)", 4.0 * 512, tiny_square, enqueue);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress survives a timeout
  bool wide = false, bench = false, self_test = false, profile = false;
  for (int i = 1; i < argc; ++i) {
    g_sanitize |= std::strcmp(argv[i], "--sanitize") == 0;
    g_small |= std::strcmp(argv[i], "--small") == 0;
    profile |= std::strcmp(argv[i], "--profile") == 0;
    wide |= std::strcmp(argv[i], "--wide") == 0;
    bench |= std::strcmp(argv[i], "--bench") == 0;
    self_test |= std::strcmp(argv[i], "--self-test-cpu") == 0;
  }

  std::unique_ptr<Backend> cpu = adafisher::CreateCpuBackend(2);
  std::printf("adafisher CUDA parity harness (tolerance %.0e, max abs error / max abs value)\n", kTolerance);

  // Host emulation: the kernels' index arithmetic, on any machine.
  EmulateIntDivider();
  EmulateMultiTensorPlan();
  EmulateFisherIndex();
  EmulateReductions(*cpu);
  EmulateConvCases(*cpu);

  const adafisher::CudaInfo info = adafisher::QueryCuda();
  std::printf("cuda: compiled=%d usable=%d device=\"%s\" cc=%d.%d driver=%d runtime=%d archs=%s\n", info.compiled,
              info.usable, info.device_name.c_str(), info.compute_major, info.compute_minor, info.driver_version,
              info.runtime_version, info.architectures.c_str());
  if (!info.usable && !self_test) {
    std::printf("SKIP: %s\n", info.reason.c_str());
    std::printf("summary: %d cases, %d failed (host emulation only)\n", g_cases, g_failed);
    return g_failed == 0 ? 0 : 1;
  }
  std::string reason;
  std::unique_ptr<Backend> gpu =
      self_test ? adafisher::CreateCpuBackend(1) : adafisher::CreateCudaBackend(&reason);
  if (gpu == nullptr) {
    Record("cuda/create", false, reason);
    std::printf("summary: %d cases, %d failed\n", g_cases, g_failed);
    return 1;
  }
  Record("cuda/create", self_test || std::strcmp(gpu->name(), "cuda") == 0, gpu->name());
  if (profile) {
    Guarded("profile/cnn512", [&] { Profile(*gpu); });
    std::printf("summary: %d cases, %d failed\n", g_cases, g_failed);
    return g_failed == 0 ? 0 : 1;
  }

  TestMemory(*cpu, *gpu);
  TestReductions(*cpu, *gpu);
  TestConv(*cpu, *gpu);
  TestFactorBatch(*cpu, *gpu);
  TestStep(*cpu, *gpu, MixedScenario(math::UpdateRule::kAdaFisher, 1e-4));
  TestStep(*cpu, *gpu, MixedScenario(math::UpdateRule::kAdaFisherW, 1e-2));
  TestEmptyStep(*gpu);
  if (wide) TestWide(*gpu);
  if (bench) Guarded("bench", [&] { Bench(*gpu); });
  Guarded("cuda/final_sync", [&] {
    gpu->Synchronize();
    Record("cuda/final_sync", gpu->LiveAllocations() == 0, Format("live allocations %zu", gpu->LiveAllocations()));
  });
  gpu.reset();
  std::printf("summary: %d cases, %d failed\n", g_cases, g_failed);
  return g_failed == 0 ? 0 : 1;
}
