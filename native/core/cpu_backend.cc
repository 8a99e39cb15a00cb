// The CPU backend: portable C++17, multi-threaded over a ThreadPool, with loops the
// compiler vectorizes. Reductions accumulate in double and combine per-task partials in
// task order, so results do not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "core/backend.h"
#include "core/thread_pool.h"

namespace adafisher {
namespace {

// Elements per task: large enough to amortize scheduling, small enough to balance.
constexpr index_t kTaskElements = 1 << 15;
constexpr index_t kColumnBlock = 1024;

index_t CeilDiv(index_t a, index_t b) { return (a + b - 1) / b; }

// NOTE: [cpu dispatch]
// The hot reduction loops are compiled twice, for baseline x86-64 (SSE2) and for AVX2,
// and picked at load time (GCC/Clang function multiversioning through an ifunc), so one
// prebuilt binary runs everywhere and uses 4 double lanes where the CPU has them. Both
// versions perform the same IEEE operations in the same order: results are identical.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
#define ADAFISHER_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ADAFISHER_CPU_CLONES
#endif

// acc[c] += x[c] (or x[c]^2) in double, for one row.
template <bool kSquare>
ADAFISHER_CPU_CLONES void AccumulateRow(double* __restrict acc, const float* __restrict x, index_t n) {
  for (index_t c = 0; c < n; ++c) {
    const double v = x[c];
    acc[c] += kSquare ? v * v : v;
  }
}

// sum of x[c] (or x[c]^2) in double; four independent partial sums keep the loop
// vectorizable without reassociation flags.
template <bool kSquare>
ADAFISHER_CPU_CLONES double SumRun(const float* __restrict x, index_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  index_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const double v0 = x[c], v1 = x[c + 1], v2 = x[c + 2], v3 = x[c + 3];
    s0 += kSquare ? v0 * v0 : v0;
    s1 += kSquare ? v1 * v1 : v1;
    s2 += kSquare ? v2 * v2 : v2;
    s3 += kSquare ? v3 * v3 : v3;
  }
  for (; c < n; ++c) {
    const double v = x[c];
    s0 += kSquare ? v * v : v;
  }
  return (s0 + s1) + (s2 + s3);
}

// sum over (a, c) of op(x[a, b, c]) for every b, in double, deterministic.
template <bool kSquare>
void ReduceKept(ThreadPool& pool, const float* x, index_t outer, index_t kept, index_t inner, double* sums) {
  std::fill(sums, sums + kept, 0.0);
  if (outer == 0 || kept == 0 || inner == 0) return;
  if (inner == 1) {
    // Columns of a row-major [outer, kept] matrix: tasks are (row block, column block).
    const index_t col_blocks = CeilDiv(kept, kColumnBlock);
    const index_t cols = std::min(kept, kColumnBlock);
    const index_t rows_per_task = std::max<index_t>(1, kTaskElements / cols);
    const index_t row_blocks = CeilDiv(outer, rows_per_task);
    std::vector<double> partial(static_cast<size_t>(row_blocks * kept));
    pool.Run(row_blocks * col_blocks, [&](int64_t task) {
      const index_t rb = task / col_blocks, cb = task % col_blocks;
      const index_t c0 = cb * kColumnBlock, c1 = std::min(kept, c0 + kColumnBlock);
      const index_t r0 = rb * rows_per_task, r1 = std::min(outer, r0 + rows_per_task);
      double* acc = partial.data() + rb * kept;
      for (index_t r = r0; r < r1; ++r) AccumulateRow<kSquare>(acc + c0, x + r * kept + c0, c1 - c0);
    });
    for (index_t rb = 0; rb < row_blocks; ++rb) {
      const double* acc = partial.data() + rb * kept;
      for (index_t c = 0; c < kept; ++c) sums[c] += acc[c];
    }
    return;
  }
  // Planes: x[a, b, :] is a contiguous run of `inner` values. A task is (a block, b block)
  // and reads x[a0..a1, b0..b1, :], which is contiguous when the b block spans every b: the
  // hardware prefetcher then streams it (one task per 4 KiB plane would restart at every
  // page). partial[a block][b] is combined in a-block order.
  const index_t b_per_task = std::clamp<index_t>(kTaskElements / inner, 1, kept);
  const index_t b_blocks = CeilDiv(kept, b_per_task);
  const index_t a_per_task = std::max<index_t>(1, kTaskElements / (b_per_task * inner));
  const index_t a_blocks = CeilDiv(outer, a_per_task);
  std::vector<double> partial(static_cast<size_t>(a_blocks * kept), 0.0);
  pool.Run(a_blocks * b_blocks, [&](int64_t task) {
    const index_t ab = task / b_blocks, bb = task % b_blocks;
    const index_t a0 = ab * a_per_task, a1 = std::min(outer, a0 + a_per_task);
    const index_t b0 = bb * b_per_task, b1 = std::min(kept, b0 + b_per_task);
    double* acc = partial.data() + ab * kept;
    for (index_t a = a0; a < a1; ++a) {
      for (index_t b = b0; b < b1; ++b) acc[b] += SumRun<kSquare>(x + (a * kept + b) * inner, inner);
    }
  });
  for (index_t ab = 0; ab < a_blocks; ++ab) {
    for (index_t b = 0; b < kept; ++b) sums[b] += partial[ab * kept + b];
  }
}

// NOTE: [conv factor precision]
// Within one plane the squares and their sums down the (at most out_h) rows of a kernel row
// are float32, as in the official float32 implementation; every sum across columns, planes
// and images is double. The float part adds at most out_h terms of one sign: its relative
// error stays below out_h * 2^-24 (~2e-6 for 32 rows), far inside the 1e-5 parity bound,
// and it doubles the SIMD width of the hot loop.
struct PatchScratch {
  std::vector<float> rows;  // [kh][W][lanes]: per kernel row i, column sums of squares
};

// The geometry of a conv's windows, worked out once per call (no divisions in the loops):
// which kernel rows i each input row y feeds, and for each kernel tap (i, j) the valid
// range of output columns.
struct PatchPlan {
  struct RowTap {
    index_t y, i;  // input row y is row i of some window (ordered by y, then i)
  };
  std::vector<RowTap> row_taps;
  std::vector<index_t> col_first, col_end;  // [kw]: ow in [first, end) reads x = ow*sw + j - pad_left

  explicit PatchPlan(const Conv2dShape& s) {
    for (index_t y = 0; y < s.height; ++y) {
      for (index_t i = 0; i < s.kernel_h; ++i) {
        const index_t t = y + s.pad_top - i;  // = oh * stride_h for the window oh that uses it
        if (t >= 0 && t % s.stride_h == 0 && t / s.stride_h < s.out_h) row_taps.push_back({y, i});
      }
    }
    for (index_t j = 0; j < s.kernel_w; ++j) {
      const index_t first = j >= s.pad_left ? 0 : CeilDiv(s.pad_left - j, s.stride_w);
      const index_t last_x = s.width - 1 - j + s.pad_left;  // ow * sw <= last_x
      col_first.push_back(first);
      col_end.push_back(last_x < 0 ? 0 : std::max(first, std::min(s.out_w, last_x / s.stride_w + 1)));
    }
  }
};

// Sums of squares of the patch entries (i, j) of one channel plane (or, for NHWC, a
// block of `lanes` channels stored contiguously): adds into acc[l * kh*kw + i*kw + j].
// `x_stride` is the distance between horizontally adjacent values (1 for NCHW, C for
// NHWC) and `y_stride` between rows. Each input row is squared and added to the
// accumulators of every kernel row i whose windows cover it (rows_i, in float: see
// NOTE: [conv factor precision]); the column sums of rows_i per tap j are double.
ADAFISHER_CPU_CLONES void PatchSums(const float* plane, const Conv2dShape& s, const PatchPlan& plan, index_t x_stride,
                                    index_t y_stride, index_t lanes, PatchScratch& scratch, double* acc) {
  const index_t kh = s.kernel_h, kw = s.kernel_w, W = s.width;
  const index_t row_len = W * lanes;
  scratch.rows.assign(static_cast<size_t>(kh * row_len), 0.0f);
  for (const PatchPlan::RowTap& tap : plan.row_taps) {
    // Squared in registers for each kernel row it feeds (a multiply is cheaper than a
    // stored and reloaded row of squares).
    const float* __restrict src = plane + tap.y * y_stride;
    float* __restrict r = scratch.rows.data() + tap.i * row_len;
    if (lanes == 1 && x_stride == 1) {
      for (index_t x = 0; x < W; ++x) r[x] += src[x] * src[x];
    } else if (lanes == 1) {
      for (index_t x = 0; x < W; ++x) {
        const float v = src[x * x_stride];
        r[x] += v * v;
      }
    } else {
      for (index_t x = 0; x < W; ++x) {
        const float* __restrict px = src + x * x_stride;
        float* __restrict rx = r + x * lanes;
        for (index_t l = 0; l < lanes; ++l) rx[l] += px[l] * px[l];
      }
    }
  }
  // acc[l][i*kw + j] += sum over output cols ow of rows_i[x = ow*sw + j - pad_left][l].
  for (index_t i = 0; i < kh; ++i) {
    const float* r = scratch.rows.data() + i * row_len;
    for (index_t j = 0; j < kw; ++j) {
      const index_t first = plan.col_first[j], end = plan.col_end[j];
      double* __restrict out = acc + i * kw + j;
      const index_t step = s.stride_w * lanes;
      for (index_t l = 0; l < lanes; ++l) {
        // Two interleaved partial sums (even and odd ow) halve the add-latency chain.
        double even = 0.0, odd = 0.0;
        const float* __restrict col = r + (first * s.stride_w + j - s.pad_left) * lanes + l;
        index_t ow = first;
        for (; ow + 2 <= end; ow += 2, col += 2 * step) {
          even += col[0];
          odd += col[step];
        }
        if (ow < end) even += col[0];
        out[l * kh * kw] += even + odd;
      }
    }
  }
}

// math::is_finite over a run, as integer ops the compiler vectorizes with plain SSE2:
// the exponent field plus one exponent LSB carries into bit 31 exactly when the exponent
// is all ones (NaN or +-inf). Same predicate as math::is_finite.
bool AllFinite(const float* __restrict x, index_t n) {
  uint32_t acc = 0;
  for (index_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    acc |= (bits & 0x7f800000u) + 0x00800000u;
  }
  return (acc & 0x80000000u) == 0;
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}
  ~CpuBackend() override = default;

  const char* name() const override { return "cpu"; }
  int Threads() const override { return pool_.threads(); }

  float* Allocate(size_t count) override {
    if (count > std::numeric_limits<size_t>::max() / sizeof(float) - 64) {
      throw BackendError(ErrorCode::kOutOfMemory, "cannot allocate " + std::to_string(count) + " floats");
    }
    // 64-byte alignment: whole cache lines, aligned vector loads.
    const size_t bytes = ((std::max<size_t>(count, 1) * sizeof(float)) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) {
      throw BackendError(ErrorCode::kOutOfMemory,
                         "out of host memory allocating " + std::to_string(count) + " floats");
    }
    std::memset(p, 0, bytes);
    live_.fetch_add(1, std::memory_order_relaxed);
    return static_cast<float*>(p);
  }
  void Release(float* ptr) noexcept override {
    if (ptr == nullptr) return;
    std::free(ptr);
    live_.fetch_sub(1, std::memory_order_relaxed);
  }
  void Upload(float* dst, const float* src, size_t count) override { Copy(dst, src, count); }
  void Download(float* dst, const float* src, size_t count) override { Copy(dst, src, count); }
  void Copy(float* dst, const float* src, size_t count) override {
    if (count != 0 && dst != src) std::memmove(dst, src, count * sizeof(float));
  }
  void Fill(float* dst, float value, size_t count) override { std::fill(dst, dst + count, value); }
  void Synchronize() override {}
  size_t LiveAllocations() const override { return live_.load(std::memory_order_relaxed); }

  void MeanSquareFactor(const float* x, index_t outer, index_t kept, index_t inner, double count, bool has_appended,
                        float appended, float* out) override {
    std::vector<double> sums(static_cast<size_t>(kept));
    ReduceKept<true>(pool_, x, outer, kept, inner, sums.data());
    for (index_t b = 0; b < kept; ++b) out[b] = static_cast<float>(count > 0 ? sums[b] / count : 0.0);
    if (has_appended) out[kept] = appended;
  }

  void NormInputFactor(const float* x, index_t outer, index_t kept, index_t inner, double u_divisor, double batch,
                       float* out) override {
    std::vector<double> sums(static_cast<size_t>(kept));
    ReduceKept<false>(pool_, x, outer, kept, inner, sums.data());
    double total = 0.0;
    for (index_t b = 0; b < kept; ++b) {
      const double u = sums[b] / u_divisor;
      total += u * u;
    }
    const double batch_sq = batch * batch;
    out[0] = static_cast<float>(total / batch_sq);
    out[1] = static_cast<float>(static_cast<double>(kept) / batch_sq);
  }

  void NormGradFactor(const float* x, index_t outer, index_t kept, index_t inner, double batch, float* out) override {
    std::vector<double> sums(static_cast<size_t>(kept));
    ReduceKept<false>(pool_, x, outer, kept, inner, sums.data());
    for (index_t b = 0; b < kept; ++b) out[b] = static_cast<float>(sums[b] * sums[b] / batch);
  }

  void Conv2dPatchFactor(const float* x, const Conv2dShape& s, bool has_bias, float* out) override {
    const index_t N = s.batch, C = s.channels, khw = s.kernel_h * s.kernel_w;
    const index_t cg = C / s.groups;
    const index_t K = cg * khw;
    // partial[n][c][i*kw + j]: one slot per (image, channel), combined in fixed order.
    std::vector<double> partial(static_cast<size_t>(N * C * khw), 0.0);
    const index_t plane = s.height * s.width;
    const PatchPlan plan(s);
    if (s.format == DataFormat::kNCHW) {
      // A task is a run of consecutive planes (about kTaskElements values).
      const index_t planes = N * C;
      const index_t per_task = std::max<index_t>(1, kTaskElements / std::max<index_t>(plane, 1));
      pool_.Run(CeilDiv(planes, per_task), [&](int64_t task) {
        thread_local PatchScratch scratch;
        const index_t end = std::min(planes, (task + 1) * per_task);
        for (index_t nc = task * per_task; nc < end; ++nc) {
          PatchSums(x + nc * plane, s, plan, 1, s.width, 1, scratch, partial.data() + nc * khw);
        }
      });
    } else {
      // NHWC: a task is (image, block of channels); a block of channels is contiguous.
      const index_t block = std::min<index_t>(C, 64);
      const index_t blocks = CeilDiv(C, block);
      pool_.Run(N * blocks, [&](int64_t task) {
        thread_local PatchScratch scratch;
        const index_t n = task / blocks, c0 = (task % blocks) * block;
        const index_t lanes = std::min(block, C - c0);
        PatchSums(x + n * plane * C + c0, s, plan, C, s.width * C, lanes, scratch, partial.data() + (n * C + c0) * khw);
      });
    }
    const double count = static_cast<double>(N) * static_cast<double>(s.out_h) * static_cast<double>(s.out_w);
    for (index_t cp = 0; cp < cg; ++cp) {
      for (index_t ij = 0; ij < khw; ++ij) {
        double sum = 0.0;
        for (index_t n = 0; n < N; ++n) {
          for (index_t g = 0; g < s.groups; ++g) sum += partial[(n * C + g * cg + cp) * khw + ij];
        }
        const index_t k = s.order == PatchOrder::kChannelMajor ? cp * khw + ij : ij * cg + cp;
        out[k] = static_cast<float>(count > 0 ? sum / count : 0.0);
      }
    }
    if (has_bias) out[K] = static_cast<float>(s.groups);
  }

  void* CreateTimingMark() override {
    void* mark = new std::chrono::steady_clock::time_point();
    live_.fetch_add(1, std::memory_order_relaxed);
    return mark;
  }
  void RecordTimingMark(void* mark) override {
    *static_cast<std::chrono::steady_clock::time_point*>(mark) = std::chrono::steady_clock::now();
  }
  double ElapsedMs(void* from, void* to) override {
    using Clock = std::chrono::steady_clock;
    return std::chrono::duration<double, std::milli>(*static_cast<Clock::time_point*>(to) -
                                                     *static_cast<Clock::time_point*>(from))
        .count();
  }
  void DestroyTimingMark(void* mark) noexcept override {
    delete static_cast<std::chrono::steady_clock::time_point*>(mark);
    live_.fetch_sub(1, std::memory_order_relaxed);
  }

  bool Step(const StepRequest& r) override {
    // NOTE: [packed step tasks]
    // A task is kTaskElements elements of the model, cut across tensor boundaries (pieces of
    // consecutive tensors), as the CUDA launcher packs its blocks: a model of small tensors
    // is one task, run on the calling thread without waking the pool (a wake-up costs more
    // than such a step). Every element's update is independent of the others and the guard
    // is an OR, so the grouping changes no result.
    struct Piece {
      size_t tensor;
      index_t begin, end;
    };
    std::vector<Piece> pieces;
    std::vector<size_t> task_first{0};  // task i is pieces [task_first[i], task_first[i + 1])
    index_t room = kTaskElements;
    for (size_t t = 0; t < r.tensor_count; ++t) {
      const StepTensor& st = r.tensors[t];
      for (index_t b = 0; b < st.numel;) {
        const index_t e = std::min(st.numel, b + room);
        pieces.push_back({t, b, e});
        room -= e - b;
        b = e;
        if (room == 0) {
          task_first.push_back(pieces.size());
          room = kTaskElements;
        }
      }
    }
    if (task_first.back() != pieces.size()) task_first.push_back(pieces.size());
    const auto tasks = static_cast<int64_t>(task_first.size() - 1);
    auto for_pieces = [&](int64_t task, auto&& fn) {
      for (size_t i = task_first[task]; i < task_first[task + 1]; ++i) fn(pieces[i]);
    };
    if (r.guard) {
      std::atomic<bool> bad{false};
      pool_.Run(tasks, [&](int64_t task) {
        for_pieces(task, [&](const Piece& pc) {
          if (bad.load(std::memory_order_relaxed)) return;
          if (!AllFinite(r.tensors[pc.tensor].grad + pc.begin, pc.end - pc.begin)) bad.store(true, std::memory_order_relaxed);
        });
      });
      if (r.refresh) {
        for (size_t s = 0; s < r.segment_count; ++s) {
          if (!AllFinite(r.fresh + r.segments[s].offset, r.segments[s].length)) bad.store(true, std::memory_order_relaxed);
        }
      }
      if (bad.load()) return false;
    }
    if (r.refresh) {
      for (size_t s = 0; s < r.segment_count; ++s) {
        const FactorSegment& seg = r.segments[s];
        if (seg.length == 0) continue;
        const float* f = r.fresh + seg.offset;
        float* run = r.running + seg.offset;
        float lo = math::clean_infinity(f[0]), hi = lo;
        for (index_t i = 1; i < seg.length; ++i) {
          const float v = math::clean_infinity(f[i]);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        const float denominator = math::min_max_denominator(lo, hi);
        for (index_t i = 0; i < seg.length; ++i) {
          run[i] = math::ema_of_normalized(run[i], f[i], lo, denominator, r.decay, r.mix);
        }
      }
    }
    pool_.Run(tasks, [&](int64_t task) {
      for_pieces(task, [&](const Piece& pc) {
        if (r.rule == math::UpdateRule::kAdaFisher) {
          UpdateChunk<math::UpdateRule::kAdaFisher>(r, r.tensors[pc.tensor], pc.begin, pc.end);
        } else {
          UpdateChunk<math::UpdateRule::kAdaFisherW>(r, r.tensors[pc.tensor], pc.begin, pc.end);
        }
      });
    });
    return true;
  }

 private:
  // One run of elements [begin, end) whose preconditioner is S[o] * H[k] + damping,
  // with either o fixed (h indexed by k) or k fixed (s indexed by o).
  template <math::UpdateRule kRule>
  static void UpdateRun(float* __restrict p, float* __restrict m, const float* __restrict g, index_t n,
                        float scalar_factor, const float* __restrict vector_factor, float damping,
                        const math::StepScalars& sc) {
    for (index_t i = 0; i < n; ++i) {
      const float fisher = math::fisher_diagonal(scalar_factor, vector_factor[i], damping);
      math::update<kRule>(p[i], m[i], g[i], fisher, sc);
    }
  }

  template <math::UpdateRule kRule>
  static void UpdatePlain(float* __restrict p, float* __restrict m, const float* __restrict g, index_t n,
                          const math::StepScalars& sc) {
    for (index_t i = 0; i < n; ++i) math::update<kRule>(p[i], m[i], g[i], 1.0f, sc);
  }

  template <math::UpdateRule kRule>
  static void UpdateChunk(const StepRequest& r, const StepTensor& t, index_t begin, index_t end) {
    float* p = t.param;
    float* m = t.momentum;
    const float* g = t.grad;
    if (!t.preconditioned) {
      UpdatePlain<kRule>(p + begin, m + begin, g + begin, end - begin, t.scalars);
      return;
    }
    const float* H = r.running + t.h_offset;
    const float* S = r.running + t.s_offset;
    // S[o] * H[k]: in a maximal run along the fastest index one factor is constant.
    const bool k_fast = t.k_stride == 1 && t.o_stride == t.k_count;  // [out, K]
    const bool o_fast = t.o_stride == 1 && t.k_stride == t.o_count;  // [K, out], bias
    if (k_fast || o_fast) {
      const index_t row = k_fast ? t.k_count : t.o_count;
      index_t i = begin;
      while (i < end) {
        const index_t slow = i / row;
        const index_t fast = i % row;
        const index_t n = std::min(end - i, row - fast);
        if (k_fast) {
          const float s = S[slow % t.o_count];
          UpdateRun<kRule>(p + i, m + i, g + i, n, s, H + fast, r.damping, t.scalars);
        } else {
          const float h = H[slow % t.k_count];
          UpdateRun<kRule>(p + i, m + i, g + i, n, h, S + fast, r.damping, t.scalars);
        }
        i += n;
      }
      return;
    }
    for (index_t i = begin; i < end; ++i) {
      const float fisher =
          math::fisher_diagonal(S[(i / t.o_stride) % t.o_count], H[(i / t.k_stride) % t.k_count], r.damping);
      math::update<kRule>(p[i], m[i], g[i], fisher, t.scalars);
    }
  }

  ThreadPool pool_;
  std::atomic<size_t> live_{0};
};

}  // namespace

constexpr int kMaxThreads = 256;

std::unique_ptr<Backend> CreateCpuBackend(int threads) {
  if (threads <= 0) {
    // ADAFISHER_NUM_THREADS, when set and not empty, must be an integer in [1, 256]: a
    // typo is refused (like a bad ADAFISHER_BACKEND) rather than silently ignored.
    const char* env = std::getenv("ADAFISHER_NUM_THREADS");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      errno = 0;
      const long v = std::strtol(env, &end, 10);
      if (errno != 0 || end == env || *end != '\0' || v < 1 || v > kMaxThreads) {
        std::string shown(env);
        if (shown.size() > 40) shown = shown.substr(0, 40) + "...";
        throw BackendError(ErrorCode::kInvalidArgument, "Expected an integer in [1, " + std::to_string(kMaxThreads) +
                                                            "] for ADAFISHER_NUM_THREADS but received '" + shown + "'");
      }
      threads = static_cast<int>(v);
    } else {
      threads = static_cast<int>(std::thread::hardware_concurrency());
      if (threads <= 0) threads = 1;
      threads = std::min(threads, kMaxThreads);
    }
  }
  return std::make_unique<CpuBackend>(threads);
}

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "ADAFISHER_INVALID_ARGUMENT";
    case ErrorCode::kDisposed: return "ADAFISHER_DISPOSED";
    case ErrorCode::kForeignBuffer: return "ADAFISHER_FOREIGN_BUFFER";
    case ErrorCode::kOutOfMemory: return "ADAFISHER_OUT_OF_MEMORY";
    case ErrorCode::kCudaError: return "ADAFISHER_CUDA_ERROR";
    case ErrorCode::kBackendUnavailable: return "ADAFISHER_BACKEND_UNAVAILABLE";
    case ErrorCode::kMissingStatistics: return "ADAFISHER_MISSING_STATISTICS";
    case ErrorCode::kBadCheckpoint: return "ADAFISHER_BAD_CHECKPOINT";
    case ErrorCode::kInternal: return "ADAFISHER_INTERNAL";
  }
  return "ADAFISHER_INTERNAL";
}

}  // namespace adafisher
