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
#include <memory>
#include <new>
#include <type_traits>
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

// AccumulateRow of four consecutive rows (x, x + stride, ...), in row order: each acc[c]
// receives the same additions in the same order as four AccumulateRow calls, but is loaded
// and stored once instead of four times.
template <bool kSquare>
ADAFISHER_CPU_CLONES void AccumulateRows4(double* __restrict acc, const float* __restrict x, index_t stride, index_t n) {
  const float* __restrict x1 = x + stride;
  const float* __restrict x2 = x + 2 * stride;
  const float* __restrict x3 = x + 3 * stride;
  for (index_t c = 0; c < n; ++c) {
    const double v0 = x[c], v1 = x1[c], v2 = x2[c], v3 = x3[c];
    double a = acc[c];
    a += kSquare ? v0 * v0 : v0;
    a += kSquare ? v1 * v1 : v1;
    a += kSquare ? v2 * v2 : v2;
    a += kSquare ? v3 * v3 : v3;
    acc[c] = a;
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

// SumRun of four runs of n values at x, x + stride, x + 2 * stride, x + 3 * stride, into
// out[0..3]: each lane of each run is the same chain of IEEE operations in the same order as
// SumRun's s0..s3 (tail into s0, then (s0 + s1) + (s2 + s3)), so every out[p] is bit-identical
// to SumRun<kSquare>(x + p * stride, n). Four independent chains hide the add latency that
// bounds a single run (one 4-double chain: 4 values per add latency).
typedef double V4d __attribute__((vector_size(32)));
typedef float V4f __attribute__((vector_size(16)));
template <bool kSquare>
ADAFISHER_CPU_CLONES void SumRun4(const float* __restrict x, index_t stride, index_t n, double* __restrict out) {
  V4d acc[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  index_t c = 0;
  for (; c + 4 <= n; c += 4) {
    for (int p = 0; p < 4; ++p) {
      V4f f;
      std::memcpy(&f, x + p * stride + c, sizeof(f));
      const V4d v = {f[0], f[1], f[2], f[3]};  // exact widening (no __builtin_convertvector: GCC 9+)
      acc[p] += kSquare ? v * v : v;
    }
  }
  for (int p = 0; p < 4; ++p) {
    double s0 = acc[p][0];
    for (index_t t = c; t < n; ++t) {
      const double v = x[p * stride + t];
      s0 += kSquare ? v * v : v;
    }
    out[p] = (s0 + acc[p][1]) + (acc[p][2] + acc[p][3]);
  }
}

// NOTE: [factor tasks]
// Each fresh-factor computation is a FactorWork: tasks fixed by its shape (never by the
// thread count), RunTask(t) on any thread in any order, then Finish(), which combines the
// tasks' partials in task order and writes the factor. A factor call runs its work's tasks
// in one pool run; FactorJobs (recordFactors) runs the tasks of all its jobs in ONE pool
// run, so the pool wakes once for the whole model instead of once per call, and then
// finishes the jobs. The same tasks and the same combination order: the same bits.
class FactorWork {
 public:
  virtual ~FactorWork() = default;
  int64_t tasks() const { return tasks_; }
  int64_t elements() const { return elements_; }  // input values read
  virtual void Prepare() = 0;               // before any task: allocates the partials
  virtual void RunTask(int64_t task) = 0;  // must not throw
  virtual void Finish() = 0;

 protected:
  int64_t tasks_ = 0;
  int64_t elements_ = 0;
};

// The sums over (a, c) of x[a, b, c] (or its square) for every b, in double, then the
// job's factor from them (mean square, norm input, norm grad).
class ReduceWork final : public FactorWork {
 public:
  explicit ReduceWork(const FactorJob& job)
      : job_(job), square_(job.op == FactorOp::kMeanSquare), outer_(job.outer), kept_(job.kept), inner_(job.inner) {
    elements_ = outer_ * kept_ * inner_;
    if (outer_ == 0 || kept_ == 0 || inner_ == 0) return;  // no tasks: every sum is 0
    if (inner_ == 1) {
      // Columns of a row-major [outer, kept] matrix: tasks are (row block, column block).
      col_blocks_ = CeilDiv(kept_, kColumnBlock);
      const index_t cols = std::min(kept_, kColumnBlock);
      rows_per_task_ = std::max<index_t>(1, kTaskElements / cols);
      blocks_ = CeilDiv(outer_, rows_per_task_);
      tasks_ = blocks_ * col_blocks_;
      return;
    }
    // Planes: x[a, b, :] is a contiguous run of `inner` values. A task is (a block, b block)
    // and reads x[a0..a1, b0..b1, :], which is contiguous when the b block spans every b: the
    // hardware prefetcher then streams it (one task per 4 KiB plane would restart at every
    // page). partial[a block][b] is combined in a-block order.
    b_per_task_ = std::clamp<index_t>(kTaskElements / inner_, 1, kept_);
    b_blocks_ = CeilDiv(kept_, b_per_task_);
    a_per_task_ = std::max<index_t>(1, kTaskElements / (b_per_task_ * inner_));
    blocks_ = CeilDiv(outer_, a_per_task_);
    tasks_ = blocks_ * b_blocks_;
  }

  void Prepare() override { partial_.assign(static_cast<size_t>(blocks_ * kept_), 0.0); }

  void RunTask(int64_t task) override {
    if (square_) {
      Run<true>(task);
    } else {
      Run<false>(task);
    }
  }

  void Finish() override {
    std::vector<double> sums(static_cast<size_t>(kept_), 0.0);
    if (tasks_ > 0) {
      for (index_t blk = 0; blk < blocks_; ++blk) {
        const double* acc = partial_.data() + blk * kept_;
        for (index_t b = 0; b < kept_; ++b) sums[b] += acc[b];
      }
    }
    float* out = job_.out;
    switch (job_.op) {
      case FactorOp::kMeanSquare: {
        const double count = job_.divisor;
        for (index_t b = 0; b < kept_; ++b) out[b] = static_cast<float>(count > 0 ? sums[b] / count : 0.0);
        if (job_.has_appended) out[kept_] = job_.appended;
        break;
      }
      case FactorOp::kNormInput: {
        double total = 0.0;
        for (index_t b = 0; b < kept_; ++b) {
          const double u = sums[b] / job_.divisor;
          total += u * u;
        }
        const double batch_sq = job_.batch * job_.batch;
        out[0] = static_cast<float>(total / batch_sq);
        out[1] = static_cast<float>(static_cast<double>(kept_) / batch_sq);
        break;
      }
      case FactorOp::kNormGrad:
        for (index_t b = 0; b < kept_; ++b) out[b] = static_cast<float>(sums[b] * sums[b] / job_.divisor);
        break;
      case FactorOp::kConv2dPatch:
        break;  // not a reduction (ConvWork)
    }
  }

 private:
  template <bool kSquare>
  void Run(int64_t task) {
    const float* x = job_.x;
    if (inner_ == 1) {
      const index_t rb = task / col_blocks_, cb = task % col_blocks_;
      const index_t c0 = cb * kColumnBlock, c1 = std::min(kept_, c0 + kColumnBlock);
      const index_t r0 = rb * rows_per_task_, r1 = std::min(outer_, r0 + rows_per_task_);
      double* acc = partial_.data() + rb * kept_;
      index_t r = r0;
      for (; r + 4 <= r1; r += 4) AccumulateRows4<kSquare>(acc + c0, x + r * kept_ + c0, kept_, c1 - c0);
      for (; r < r1; ++r) AccumulateRow<kSquare>(acc + c0, x + r * kept_ + c0, c1 - c0);
      return;
    }
    const index_t ab = task / b_blocks_, bb = task % b_blocks_;
    const index_t a0 = ab * a_per_task_, a1 = std::min(outer_, a0 + a_per_task_);
    const index_t b0 = bb * b_per_task_, b1 = std::min(kept_, b0 + b_per_task_);
    double* acc = partial_.data() + ab * kept_;
    for (index_t a = a0; a < a1; ++a) {
      index_t b = b0;
      for (; b + 4 <= b1; b += 4) {
        double four[4];
        SumRun4<kSquare>(x + (a * kept_ + b) * inner_, inner_, inner_, four);
        for (int p = 0; p < 4; ++p) acc[b + p] += four[p];
      }
      for (; b < b1; ++b) acc[b] += SumRun<kSquare>(x + (a * kept_ + b) * inner_, inner_);
    }
  }

  const FactorJob job_;
  const bool square_;
  const index_t outer_, kept_, inner_;
  index_t blocks_ = 0;  // row blocks (columns) or a blocks (planes): rows of partial_
  index_t col_blocks_ = 1, rows_per_task_ = 1;
  index_t b_per_task_ = 1, b_blocks_ = 1, a_per_task_ = 1;
  std::vector<double> partial_;  // [blocks_][kept_]
};

// NOTE: [conv factor precision]
// Within a band of at most kPatchBandRows input rows of one plane, the squares and their sums
// down the rows of a kernel row are float32, as in the official float32 implementation; every
// sum across bands, columns, planes and images is double. The float part adds at most 64
// terms of one sign: its relative error stays below 64 * 2^-24 (3.8e-6), inside the 1e-5
// parity bound with the cuda backend (which sums in double) for images of any height (one
// float sum down a 512-row image drifted 3e-5 on adversarial data), and it doubles the SIMD
// width of the hot loop. Images up to 64 rows are one band. Where a float square or row sum overflows
// (inputs near 1e19) but the double sums the cuda backend keeps would not, the plane is
// summed again in double (PatchSumsWide), so both backends see the same finite factor;
// NaN or infinite inputs take that path too and give the same non-finite result.
constexpr index_t kPatchBandRows = 64;

struct PatchScratch {
  std::vector<float> rows;   // [kh][W][lanes]: per kernel row i, column sums of squares
  std::vector<double> wide;  // the same in double, for PatchSumsWide
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
  // [band][i]: the input rows of kernel row i inside band b are y0 + k * stride_h, k < count
  // (the rows of row_taps with that i and y in the band, in the same ascending order).
  std::vector<index_t> band_y0, band_count;

  explicit PatchPlan(const Conv2dShape& s) {
    for (index_t band = 0; band < s.height; band += kPatchBandRows) {
      const index_t band_end = std::min(s.height, band + kPatchBandRows);
      for (index_t i = 0; i < s.kernel_h; ++i) {
        // y = oh * stride_h - pad_top + i with oh in [0, out_h) and y in [band, band_end).
        const index_t lo = band + s.pad_top - i;  // oh * stride_h >= lo
        const index_t oh0 = lo <= 0 ? 0 : CeilDiv(lo, s.stride_h);
        const index_t hi = band_end - 1 + s.pad_top - i;  // oh * stride_h <= hi
        const index_t oh1 = hi < 0 ? -1 : std::min(s.out_h - 1, hi / s.stride_h);
        band_y0.push_back(oh0 * s.stride_h - s.pad_top + i);
        band_count.push_back(oh1 >= oh0 ? oh1 - oh0 + 1 : 0);
      }
    }
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

// r[x] = sum over k < count of src[k * step + x]^2 in float, in ascending k, for x < W.
typedef float V8f __attribute__((vector_size(32)));
__attribute__((always_inline)) inline void PatchRowsNarrow(const float* __restrict src, index_t step, index_t count,
                                                           index_t W, float* __restrict r) {
  index_t x = 0;
  for (; x + 32 <= W; x += 32) {
    V8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const float* p = src + x;
    for (index_t k = 0; k < count; ++k, p += step) {
      V8f v0, v1, v2, v3;
      std::memcpy(&v0, p, 32), std::memcpy(&v1, p + 8, 32), std::memcpy(&v2, p + 16, 32), std::memcpy(&v3, p + 24, 32);
      a0 += v0 * v0, a1 += v1 * v1, a2 += v2 * v2, a3 += v3 * v3;
    }
    std::memcpy(r + x, &a0, 32), std::memcpy(r + x + 8, &a1, 32), std::memcpy(r + x + 16, &a2, 32), std::memcpy(r + x + 24, &a3, 32);
  }
  for (; x + 8 <= W; x += 8) {
    V8f a0 = {};
    const float* p = src + x;
    for (index_t k = 0; k < count; ++k, p += step) {
      V8f v0;
      std::memcpy(&v0, p, 32);
      a0 += v0 * v0;
    }
    std::memcpy(r + x, &a0, 32);
  }
  for (; x < W; ++x) {
    float a = 0.0f;
    const float* p = src + x;
    for (index_t k = 0; k < count; ++k, p += step) a += *p * *p;
    r[x] = a;
  }
}

// Sums of squares of the patch entries (i, j) of one channel plane (or, for NHWC, a
// block of `lanes` channels stored contiguously): adds into acc[l * kh*kw + i*kw + j].
// `x_stride` is the distance between horizontally adjacent values (1 for NCHW, C for
// NHWC) and `y_stride` between rows. Each input row is squared and added to the
// accumulators of every kernel row i whose windows cover it (rows_i, in float: see
// NOTE: [conv factor precision]); the column sums of rows_i per tap j are double. The
// lanes' accumulators start at zero. Returns false when a sum is not finite (then acc holds
// no meaningful values).
template <typename Row>
__attribute__((always_inline)) inline bool PatchSumsOf(const float* plane, const Conv2dShape& s, const PatchPlan& plan,
                                                       index_t x_stride, index_t y_stride, index_t lanes,
                                                       std::vector<Row>& rows, double* acc) {
  const index_t kh = s.kernel_h, kw = s.kernel_w, W = s.width;
  const index_t row_len = W * lanes;
  bool finite = true;
  const auto* tap = plan.row_taps.data();
  const auto* const taps_end = tap + plan.row_taps.size();
  // Bands of kPatchBandRows input rows (NOTE: [conv factor precision]): a kernel row's float
  // sum never takes more than that many squares before it is folded into the double sums.
  for (index_t band = 0; band < s.height; band += kPatchBandRows) {
    const index_t band_end = band + kPatchBandRows;
    rows.assign(static_cast<size_t>(kh * row_len), Row{0});
    if constexpr (std::is_same<Row, float>::value) {
      if (lanes == 1 && x_stride == 1) {
        // NOTE: [conv rows in registers] Kernel row by kernel row, 32 columns at a time in
        // registers down the rows that feed it: each rows_i[x] takes the same float additions
        // (0, then v*v in ascending y) as in the tap loop below, without a load and a store of
        // rows_i[x] per addition. The tap loop then has nothing left to do in any band.
        const index_t b = band / kPatchBandRows;
        for (index_t i = 0; i < kh; ++i) {
          const index_t count = plan.band_count[b * kh + i];
          if (count == 0) continue;
          PatchRowsNarrow(plane + plan.band_y0[b * kh + i] * y_stride, s.stride_h * y_stride, count, W,
                          rows.data() + i * row_len);
        }
        tap = taps_end;
      }
    }
    for (; tap != taps_end && tap->y < band_end; ++tap) {
      // Squared in registers for each kernel row it feeds (a multiply is cheaper than a
      // stored and reloaded row of squares).
      const float* __restrict src = plane + tap->y * y_stride;
      Row* __restrict r = rows.data() + tap->i * row_len;
      if (lanes == 1 && x_stride == 1) {
        for (index_t x = 0; x < W; ++x) {
          const Row v = src[x];
          r[x] += v * v;
        }
      } else if (lanes == 1) {
        for (index_t x = 0; x < W; ++x) {
          const Row v = src[x * x_stride];
          r[x] += v * v;
        }
      } else {
        for (index_t x = 0; x < W; ++x) {
          const float* __restrict px = src + x * x_stride;
          Row* __restrict rx = r + x * lanes;
          for (index_t l = 0; l < lanes; ++l) {
            const Row v = px[l];
            rx[l] += v * v;
          }
        }
      }
    }
    // acc[l][i*kw + j] += sum over output cols ow of rows_i[x = ow*sw + j - pad_left][l].
    for (index_t i = 0; i < kh; ++i) {
      const Row* r = rows.data() + i * row_len;
      for (index_t j = 0; j < kw; ++j) {
        const index_t first = plan.col_first[j], end = plan.col_end[j];
        double* __restrict out = acc + i * kw + j;
        const index_t step = s.stride_w * lanes;
        for (index_t l = 0; l < lanes; ++l) {
          // Two interleaved partial sums (even and odd ow) halve the add-latency chain.
          double even = 0.0, odd = 0.0;
          const Row* __restrict col = r + (first * s.stride_w + j - s.pad_left) * lanes + l;
          index_t ow = first;
          for (; ow + 2 <= end; ow += 2, col += 2 * step) {
            even += col[0];
            odd += col[step];
          }
          if (ow < end) even += col[0];
          const double sum = even + odd;
          finite &= (sum - sum) == 0.0;
          out[l * kh * kw] += sum;
        }
      }
    }
  }
  return finite;
}

ADAFISHER_CPU_CLONES void PatchSumsWide(const float* plane, const Conv2dShape& s, const PatchPlan& plan,
                                        index_t x_stride, index_t y_stride, index_t lanes, std::vector<double>& rows,
                                        double* acc) {
  PatchSumsOf(plane, s, plan, x_stride, y_stride, lanes, rows, acc);
}

ADAFISHER_CPU_CLONES bool PatchSumsNarrow(const float* plane, const Conv2dShape& s, const PatchPlan& plan,
                                          index_t x_stride, index_t y_stride, index_t lanes, std::vector<float>& rows,
                                          double* acc) {
  return PatchSumsOf(plane, s, plan, x_stride, y_stride, lanes, rows, acc);
}

// The patch sums of one plane (or block of NHWC lanes) into acc[0, lanes * kh*kw), zero on
// entry: in float rows, or in double where those overflow (NOTE: [conv factor precision]).
void PatchSums(const float* plane, const Conv2dShape& s, const PatchPlan& plan, index_t x_stride, index_t y_stride,
               index_t lanes, PatchScratch& scratch, double* acc) {
  if (PatchSumsNarrow(plane, s, plan, x_stride, y_stride, lanes, scratch.rows, acc)) return;
  std::fill(acc, acc + lanes * s.kernel_h * s.kernel_w, 0.0);
  PatchSumsWide(plane, s, plan, x_stride, y_stride, lanes, scratch.wide, acc);
}

// H of a Conv2d (Backend::Conv2dPatchFactor): per-(image, channel) patch sums, then their
// fixed-order combination.
class ConvWork final : public FactorWork {
 public:
  explicit ConvWork(const FactorJob& job) : job_(job), s_(job.conv), plan_(job.conv) {
    khw_ = s_.kernel_h * s_.kernel_w;
    plane_ = s_.height * s_.width;
    elements_ = s_.batch * s_.channels * plane_;
    if (s_.format == DataFormat::kNCHW) {
      // A task is a run of consecutive planes (about kTaskElements values).
      planes_ = s_.batch * s_.channels;
      per_task_ = std::max<index_t>(1, kTaskElements / std::max<index_t>(plane_, 1));
      tasks_ = CeilDiv(planes_, per_task_);
    } else {
      // NHWC: a task is (image, block of channels); a block of channels is contiguous.
      block_ = std::min<index_t>(s_.channels, 64);
      blocks_ = CeilDiv(s_.channels, block_);
      tasks_ = s_.batch * blocks_;
    }
  }

  // partial[n][c][i*kw + j]: one slot per (image, channel), combined in fixed order.
  void Prepare() override { partial_.assign(static_cast<size_t>(s_.batch * s_.channels * khw_), 0.0); }

  void RunTask(int64_t task) override {
    // A thread keeps its scratch between calls up to kKeptScratchFloats floats (4 MiB); a
    // larger one lives for this task only.
    constexpr index_t kKeptScratchFloats = index_t{1} << 20;
    thread_local PatchScratch kept;
    PatchScratch local;
    const index_t lanes_most = s_.format == DataFormat::kNCHW ? 1 : block_;
    PatchScratch& scratch = s_.kernel_h * s_.width * lanes_most <= kKeptScratchFloats ? kept : local;
    const float* x = job_.x;
    if (s_.format == DataFormat::kNCHW) {
      const index_t end = std::min(planes_, (task + 1) * per_task_);
      for (index_t nc = task * per_task_; nc < end; ++nc) {
        PatchSums(x + nc * plane_, s_, plan_, 1, s_.width, 1, scratch, partial_.data() + nc * khw_);
      }
      return;
    }
    const index_t C = s_.channels;
    const index_t n = task / blocks_, c0 = (task % blocks_) * block_;
    const index_t lanes = std::min(block_, C - c0);
    PatchSums(x + n * plane_ * C + c0, s_, plan_, C, s_.width * C, lanes, scratch, partial_.data() + (n * C + c0) * khw_);
  }

  void Finish() override {
    const index_t N = s_.batch, C = s_.channels, cg = C / s_.groups;
    const double count = static_cast<double>(N) * static_cast<double>(s_.out_h) * static_cast<double>(s_.out_w);
    float* out = job_.out;
    for (index_t cp = 0; cp < cg; ++cp) {
      for (index_t ij = 0; ij < khw_; ++ij) {
        double sum = 0.0;
        for (index_t n = 0; n < N; ++n) {
          for (index_t g = 0; g < s_.groups; ++g) sum += partial_[(n * C + g * cg + cp) * khw_ + ij];
        }
        const index_t k = s_.order == PatchOrder::kChannelMajor ? cp * khw_ + ij : ij * cg + cp;
        out[k] = static_cast<float>(count > 0 ? sum / count : 0.0);
      }
    }
    if (job_.has_appended) out[cg * khw_] = static_cast<float>(s_.groups);
  }

 private:
  const FactorJob job_;
  const Conv2dShape s_;
  const PatchPlan plan_;
  index_t khw_ = 1, plane_ = 0;
  index_t planes_ = 0, per_task_ = 1;  // NCHW
  index_t block_ = 1, blocks_ = 1;     // NHWC
  std::vector<double> partial_;
};

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

// math::guard_accepts(x, true) over a run (no NaN), as integer ops: |x|'s bits are above
// +inf's exactly for a NaN, and then 0x7f800000 - |x| wraps into bit 31.
bool NoNaN(const float* __restrict x, index_t n) {
  uint32_t acc = 0;
  for (index_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    acc |= 0x7f800000u - (bits & 0x7fffffffu);
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
    FactorJob job;
    job.op = FactorOp::kMeanSquare;
    job.x = x, job.outer = outer, job.kept = kept, job.inner = inner;
    job.divisor = count, job.has_appended = has_appended, job.appended = appended;
    job.out = out;
    FactorJobs(&job, 1);
  }

  void NormInputFactor(const float* x, index_t outer, index_t kept, index_t inner, double u_divisor, double batch,
                       float* out) override {
    FactorJob job;
    job.op = FactorOp::kNormInput;
    job.x = x, job.outer = outer, job.kept = kept, job.inner = inner;
    job.divisor = u_divisor, job.batch = batch;
    job.out = out;
    FactorJobs(&job, 1);
  }

  void NormGradFactor(const float* x, index_t outer, index_t kept, index_t inner, double batch, float* out) override {
    FactorJob job;
    job.op = FactorOp::kNormGrad;
    job.x = x, job.outer = outer, job.kept = kept, job.inner = inner;
    job.divisor = batch;
    job.out = out;
    FactorJobs(&job, 1);
  }

  void Conv2dPatchFactor(const float* x, const Conv2dShape& s, bool has_bias, float* out) override {
    FactorJob job;
    job.op = FactorOp::kConv2dPatch;
    job.x = x, job.conv = s, job.has_appended = has_bias;
    job.out = out;
    FactorJobs(&job, 1);
  }

  // Every job's tasks in one pool run, then each job's combination (NOTE: [factor tasks]).
  void FactorJobs(const FactorJob* jobs, size_t count) override {
    std::vector<std::unique_ptr<FactorWork>> works;
    works.reserve(count);
    std::vector<int64_t> first(count + 1, 0);  // first[j]: the pool task of job j's task 0
    int64_t elements = 0;
    for (size_t j = 0; j < count; ++j) {
      if (jobs[j].op == FactorOp::kConv2dPatch) {
        works.push_back(std::make_unique<ConvWork>(jobs[j]));
      } else {
        works.push_back(std::make_unique<ReduceWork>(jobs[j]));
      }
      works.back()->Prepare();
      first[j + 1] = first[j] + works.back()->tasks();
      elements += works.back()->elements();
    }
    const auto run = [&](int64_t task) {
      // The job whose tasks include `task` (jobs without tasks have first[j] == first[j + 1]).
      const size_t j = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
      works[j]->RunTask(task - first[j]);
    };
    if (elements <= kTaskElements) {
      // Less than one task's worth in all (a model of small layers): waking the pool would
      // cost more than the work. Which thread runs a task does not change its result.
      for (int64_t task = 0; task < first[count]; ++task) run(task);
    } else {
      pool_.Run(first[count], run);
    }
    for (const std::unique_ptr<FactorWork>& w : works) w->Finish();
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
          // A fresh factor's +-inf is cleaned below (NOTE: [guard predicate]); NaN is not.
          if (!NoNaN(r.fresh + r.segments[s].offset, r.segments[s].length)) bad.store(true, std::memory_order_relaxed);
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
        // NaN anywhere makes min and max NaN, as torch's min()/max() do (NOTE: [NaN min-max]).
        float lo = math::clean_infinity(f[0]), hi = lo;
        bool nan = lo != lo;
        for (index_t i = 1; i < seg.length; ++i) {
          const float v = math::clean_infinity(f[i]);
          nan |= v != v;
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
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

std::unique_ptr<Backend> CreateCpuBackend(int threads, const std::string* setting) {
  if (threads <= 0) {
    // ADAFISHER_NUM_THREADS, when set and not empty, must be an integer in [1, 256]: a
    // typo is refused (like a bad ADAFISHER_BACKEND) rather than silently ignored.
    const char* env = setting != nullptr ? setting->c_str() : std::getenv("ADAFISHER_NUM_THREADS");
    if (env != nullptr && *env != '\0') {
      // Decimal digits only, as the README says: no sign, space or exponent (strtol alone
      // took " 2" and "+2").
      const bool digits = std::all_of(env, env + std::strlen(env), [](char c) { return c >= '0' && c <= '9'; });
      char* end = nullptr;
      errno = 0;
      const long v = digits ? std::strtol(env, &end, 10) : 0;
      if (!digits || errno != 0 || end == env || *end != '\0' || v < 1 || v > kMaxThreads) {
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
