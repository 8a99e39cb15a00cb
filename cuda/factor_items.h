// The per-thread work of the factor kernels, written as __host__ __device__ functions of
// (block, thread) so that the kernels (factor_kernels.cu) and a host emulation in the
// parity harness run exactly the same index arithmetic. Each function returns a double
// sum accumulated in a fixed order; the kernels combine them in a fixed order too.
#pragma once

#include <cstdint>

#include "core/math.h"
#include "launch_plan.h"

namespace adafisher {
namespace cuda {

// NOTE: [loads in flight]
// A thread of the reductions below issues kLoadsInFlight independent 4-byte loads before it
// adds them, then 4 at a time for what is left, then one: always in the same order as one
// at a time, so the sums are bit-identical whatever these widths. A warp's loads are
// coalesced, but each thread holds only its own 4 bytes per load: to cover DRAM latency at
// full bandwidth an H100/H200 SM needs ~30 KB in flight, 2048 threads x 16 B at four loads,
// twice that at eight (and margin when occupancy falls). The plane reduction's quad units
// hold 16 bytes per load, four of them in flight (PlaneQuadLoads).
constexpr int kLoadsInFlight = 8;

#if defined(__CUDA_ARCH__)  // device code; the host pass and host compilers unroll as they see fit
#define ADAFISHER_UNROLL _Pragma("unroll")
#else
#define ADAFISHER_UNROLL
#endif

// NOTE: [streamed loads]
// The factor kernels read their inputs once, and may run under programmatic dependent launch
// (factor_kernels.cu) right behind the kernel that wrote those inputs: they load through L2
// only (ld.global.cg), never through the SM's L1 or read-only cache, which would gain nothing
// on data read once and is the one place a stale line could hide.
template <typename T>
ADAFISHER_HD T StreamLoad(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// v[0..3] = p[0..3], through L2 (StreamLoad): one 16-byte load on the device when p is
// 16-byte aligned, four 4-byte loads otherwise. The same values either way.
ADAFISHER_HD void LoadQuad(const float* p, bool aligned, float v[4]) {
#if defined(__CUDA_ARCH__)
  if (aligned) {
    const float4 q = StreamLoad(reinterpret_cast<const float4*>(p));
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    return;
  }
#endif
  (void)aligned;
  v[0] = StreamLoad(p), v[1] = StreamLoad(p + 1), v[2] = StreamLoad(p + 2), v[3] = StreamLoad(p + 3);
}

template <bool kSquare>
ADAFISHER_HD double SquareOrValue(float x) {
  // Widen first, then square: the CPU backend's `const double v = x; v * v`.
  const double v = x;
  return kSquare ? v * v : v;
}

// Adds column[r * pitch], r += step, while kLoads more rows remain before r_end: kLoads
// loads issued, then added in row order.
template <int kLoads, bool kSquare>
ADAFISHER_HD void ColumnLoads(const float* column, int64_t step, int64_t pitch, int64_t r_end, int64_t& r,
                              double& acc) {
  for (; r + (kLoads - 1) * step < r_end; r += kLoads * step) {
    float v[kLoads];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) v[u] = StreamLoad(column + (r + u * step) * pitch);
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) acc += SquareOrValue<kSquare>(v[u]);
  }
}

// Column plan (inner == 1): the partial sum of thread `tid` of block (tile, slice).
// Its column is tile * cols + tid % cols; threads with tid >= cols * step, or whose
// column is past the end, return 0.
template <bool kSquare>
ADAFISHER_HD double ColumnThreadSum(const float* x, const ColumnPlan& p, int64_t tile, int64_t slice, int tid) {
  const int lane_col = tid % p.cols;
  const int lane_row = tid / p.cols;
  if (lane_row >= p.step) return 0.0;
  const int64_t col = tile * p.cols + lane_col;
  if (col >= p.kept) return 0.0;
  const int64_t slice_end = (slice + 1) * p.rows_per_slice;
  const int64_t r_end = slice_end < p.outer ? slice_end : p.outer;
  const int64_t step = p.step;
  const int64_t pitch = p.kept;
  const float* column = x + col;
  double acc = 0.0;
  int64_t r = slice * p.rows_per_slice + lane_row;
  // Rows in order, kLoadsInFlight loads at a time, then 4, then one (NOTE: [loads in flight]).
  ColumnLoads<kLoadsInFlight, kSquare>(column, step, pitch, r_end, r, acc);
  ColumnLoads<4, kSquare>(column, step, pitch, r_end, r, acc);
  ColumnLoads<1, kSquare>(column, step, pitch, r_end, r, acc);
  return acc;
}

// Adds plane[a * pitch + c] over positions j, j + threads, ... while kLoads more remain
// before j_end, (a, c) stepping with j: kLoads loads issued, then added in order.
template <int kLoads, bool kSquare>
ADAFISHER_HD void PlaneLoads(const float* plane, int64_t pitch, int64_t inner, int64_t da, int64_t dc, int threads,
                             int64_t j_end, int64_t& j, int64_t& a, int64_t& c, double& acc) {
  for (; j + (kLoads - 1) * int64_t{threads} < j_end; j += kLoads * int64_t{threads}) {
    int64_t offset[kLoads];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) {
      offset[u] = a * pitch + c;
      c += dc;
      a += da;
      if (c >= inner) c -= inner, ++a;
    }
    float v[kLoads];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) v[u] = StreamLoad(plane + offset[u]);
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) acc += SquareOrValue<kSquare>(v[u]);
  }
}

// Adds the quads plane[a * pitch + 4 * c .. + 3] over quad positions j, j + threads, ...
// while kLoads more remain before j_end, (a, c) stepping with j: kLoads quads loaded (16-byte
// loads on the device when `aligned`), then added in order, each quad's 4 values in order.
template <int kLoads, bool kSquare>
ADAFISHER_HD void PlaneQuadLoads(const float* plane, int64_t pitch, int64_t quads, int64_t da, int64_t dc,
                                 int threads, bool aligned, int64_t j_end, int64_t& j, int64_t& a, int64_t& c,
                                 double& acc) {
  for (; j + (kLoads - 1) * int64_t{threads} < j_end; j += kLoads * int64_t{threads}) {
    const float* at[kLoads];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) {
      at[u] = plane + a * pitch + 4 * c;
      c += dc;
      a += da;
      if (c >= quads) c -= quads, ++a;
    }
    float v[kLoads][4];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) LoadQuad(at[u], aligned, v[u]);
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) {
      acc += SquareOrValue<kSquare>(v[u][0]);
      acc += SquareOrValue<kSquare>(v[u][1]);
      acc += SquareOrValue<kSquare>(v[u][2]);
      acc += SquareOrValue<kSquare>(v[u][3]);
    }
  }
}

// Plane plan (inner > 1): the partial sum of thread `tid` (of `threads`) of block
// (part, b): units j = part * span + tid, + threads, ... of the (a, c) space of b, where
// x[a, b, c] is at (a * kept + b) * inner + c (see PlanePlan).
template <bool kSquare>
ADAFISHER_HD double PlaneThreadSum(const float* x, const PlanePlan& p, int64_t part, int64_t b, int tid,
                                   int threads) {
  if (p.unit == 4) {
    const int64_t quads = p.inner / 4;
    const int64_t work = p.outer * quads;
    const int64_t span_end = (part + 1) * p.span;
    const int64_t j_end = span_end < work ? span_end : work;
    int64_t j = part * p.span + tid;
    if (j >= j_end) return 0.0;
    const int64_t pitch = p.kept * p.inner;
    const int64_t da = threads / quads, dc = threads % quads;
    int64_t a = j / quads, c = j % quads;
    const float* plane = x + b * p.inner;
    // Every quad starts at a multiple of 4 floats from x: all 16-byte aligned when x is.
    const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
    double acc = 0.0;
    PlaneQuadLoads<4, kSquare>(plane, pitch, quads, da, dc, threads, aligned, j_end, j, a, c, acc);
    PlaneQuadLoads<1, kSquare>(plane, pitch, quads, da, dc, threads, aligned, j_end, j, a, c, acc);
    return acc;
  }
  const int64_t work = p.outer * p.inner;
  const int64_t span_end = (part + 1) * p.span;
  const int64_t j_end = span_end < work ? span_end : work;
  int64_t j = part * p.span + tid;
  if (j >= j_end) return 0.0;
  const int64_t inner = p.inner;
  const int64_t pitch = p.kept * inner;  // from x[a, b, c] to x[a + 1, b, c]
  const int64_t da = threads / inner, dc = threads % inner;
  int64_t a = j / inner, c = j % inner;
  const float* plane = x + b * inner;
  double acc = 0.0;
  PlaneLoads<kLoadsInFlight, kSquare>(plane, pitch, inner, da, dc, threads, j_end, j, a, c, acc);
  PlaneLoads<4, kSquare>(plane, pitch, inner, da, dc, threads, j_end, j, a, c, acc);
  PlaneLoads<1, kSquare>(plane, pitch, inner, da, dc, threads, j_end, j, a, c, acc);
  return acc;
}

// The offsets of the next kLoads (n, g) pairs into at[], (g, offset) stepping past them:
// the next group is g_stride further, the next image's first group `wrap` further.
template <int kLoads>
ADAFISHER_HD void NextPairOffsets(int64_t groups, int64_t g_stride, int64_t wrap, int64_t& g, int64_t& offset,
                                  int64_t at[kLoads]) {
  ADAFISHER_UNROLL
  for (int u = 0; u < kLoads; ++u) {
    at[u] = offset;
    if (++g == groups) {
      g = 0;
      offset += wrap;
    } else {
      offset += g_stride;
    }
  }
}

// Adds x[offset]^2 over the (n, g) pairs ng, ng + 1, ... while kLoads more remain before
// ng_end, (g, offset) stepping with ng: kLoads loads issued, then added in order.
template <int kLoads>
ADAFISHER_HD void ConvLoads(const float* x, int64_t groups, int64_t g_stride, int64_t wrap, int64_t ng_end,
                            int64_t& ng, int64_t& g, int64_t& offset, double& acc) {
  for (; ng + (kLoads - 1) < ng_end; ng += kLoads) {
    int64_t at[kLoads];
    NextPairOffsets<kLoads>(groups, g_stride, wrap, g, offset, at);
    float v[kLoads];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) v[u] = StreamLoad(x + at[u]);
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) acc += SquareOrValue<true>(v[u]);
  }
}

// ConvLoads for 4 consecutive pixels at once: x[offset .. offset + 3]^2 into acc[0..3], a
// 16-byte load each on the device when `aligned`. Each acc[k] adds in (n, g) order, as
// ConvLoads does for one pixel.
template <int kLoads>
ADAFISHER_HD void ConvQuadLoads(const float* x, bool aligned, int64_t groups, int64_t g_stride, int64_t wrap,
                                int64_t ng_end, int64_t& ng, int64_t& g, int64_t& offset, double acc[4]) {
  for (; ng + (kLoads - 1) < ng_end; ng += kLoads) {
    int64_t at[kLoads];
    NextPairOffsets<kLoads>(groups, g_stride, wrap, g, offset, at);
    float v[kLoads][4];
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) LoadQuad(x + at[u], aligned, v[u]);
    ADAFISHER_UNROLL
    for (int u = 0; u < kLoads; ++u) {
      ADAFISHER_UNROLL
      for (int k = 0; k < 4; ++k) acc[k] += SquareOrValue<true>(v[u][k]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Conv2d patch factor, phase 1: T_part[q] = sum over the (n, g) pairs of `part` of
// x[n, g * cg + c', y, x]^2, for the pixel q of class c'. T is laid out like one image of
// one group: [c'][y][x] for NCHW (q = c' * H * W + y * W + x) and [y][x][c'] for NHWC
// (q = (y * W + x) * cg + c'), so consecutive threads read consecutive addresses.
// Where pixel q of image 0, group 0 is in x, and the steps to the same pixel of the next
// group and the next image.
ADAFISHER_HD void ConvPixelStrides(const ConvPlan& p, int64_t q, int64_t* base, int64_t* n_stride,
                                   int64_t* g_stride) {
  if (p.nhwc) {
    const int64_t pixel = q / p.cg;
    *base = pixel * p.C + (q - pixel * p.cg);
    *n_stride = p.H * p.W * p.C;
    *g_stride = p.cg;
  } else {
    *base = q;  // c' * H * W + y * W + x: the class-c' plane of group 0 of image 0
    *n_stride = p.C * p.H * p.W;
    *g_stride = p.cg * p.H * p.W;
  }
}

// Where part `part` of pixel q's (n, g) pairs starts in x, and how to step through them
// (the loaders above advance ng, g and offset).
struct ConvPairWalk {
  int64_t ng, ng_end, g, offset, g_stride, wrap;
};
ADAFISHER_HD ConvPairWalk StartPairWalk(const ConvPlan& p, int64_t part, int64_t q) {
  ConvPairWalk w;
  w.ng = part * p.span;
  const int64_t ng_limit = w.ng + p.span;
  w.ng_end = ng_limit < p.planes ? ng_limit : p.planes;
  int64_t base, n_stride;
  ConvPixelStrides(p, q, &base, &n_stride, &w.g_stride);
  const int64_t n = w.ng / p.groups;
  w.g = w.ng - n * p.groups;
  w.offset = n * n_stride + w.g * w.g_stride + base;
  w.wrap = n_stride - (p.groups - 1) * w.g_stride;  // from (n, groups - 1) to (n + 1, 0)
  return w;
}

// Phase 1 for the 4 pixels q .. q + 3 (the plan's unit is 4: they are adjacent in x, and
// 16-byte aligned when x is): sums[k] = ConvPixelSum(x, p, part, q + k), bit for bit.
ADAFISHER_HD void ConvQuadSum(const float* x, const ConvPlan& p, int64_t part, int64_t q, double sums[4]) {
  ConvPairWalk w = StartPairWalk(p, part, q);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  sums[0] = sums[1] = sums[2] = sums[3] = 0.0;
  ConvQuadLoads<4>(x, aligned, p.groups, w.g_stride, w.wrap, w.ng_end, w.ng, w.g, w.offset, sums);
  ConvQuadLoads<1>(x, aligned, p.groups, w.g_stride, w.wrap, w.ng_end, w.ng, w.g, w.offset, sums);
}

ADAFISHER_HD double ConvPixelSum(const float* x, const ConvPlan& p, int64_t part, int64_t q) {
  ConvPairWalk w = StartPairWalk(p, part, q);
  double acc = 0.0;
  ConvLoads<kLoadsInFlight>(x, p.groups, w.g_stride, w.wrap, w.ng_end, w.ng, w.g, w.offset, acc);
  ConvLoads<4>(x, p.groups, w.g_stride, w.wrap, w.ng_end, w.ng, w.g, w.offset, acc);
  ConvLoads<1>(x, p.groups, w.g_stride, w.wrap, w.ng_end, w.ng, w.g, w.offset, acc);
  return acc;
}

// First and one-past-last output position whose window tap `tap` lands inside [0, size):
// 0 <= o * stride + tap - pad < size, 0 <= o < out. (The CPU backend's formula.)
ADAFISHER_HD void ValidOutputRange(int64_t tap, int64_t pad, int64_t stride, int64_t size, int64_t out,
                                   int64_t* first, int64_t* end) {
  *first = tap >= pad ? 0 : (pad - tap + stride - 1) / stride;
  const int64_t last = size - 1 - tap + pad;  // o * stride <= last
  if (last < 0) {
    *end = 0;
  } else {
    const int64_t e = last / stride + 1;
    *end = e < out ? e : out;
  }
}

// Sum of line[(o * stride + tap - pad) * pitch] over the output positions o whose window
// tap lands inside the input line of `size` pixels: one axis of the conv patch factor. With
// kGlobal, `line` is global memory written by an earlier kernel, loaded through L2 (NOTE:
// [streamed loads]); without, any memory (shared memory included).
template <bool kGlobal>
ADAFISHER_HD double TapSum(const double* line, int64_t pitch, int64_t tap, int64_t pad, int64_t stride, int64_t size,
                           int64_t out) {
  int64_t first, end;
  ValidOutputRange(tap, pad, stride, size, out, &first, &end);
  double sum = 0.0;
  for (int64_t o = first; o < end; ++o) {
    const double* at = line + (o * stride + tap - pad) * pitch;
    sum += kGlobal ? StreamLoad(at) : *at;
  }
  return sum;
}

// Phase 2a: U[c'][i][x] = sum over output rows oh of T[c'][oh*sh + i - pt][x].
ADAFISHER_HD double ConvRowSum(const double* T, const ConvPlan& p, int64_t cp, int64_t i, int64_t x) {
  // T index of (c', y, x) = c' * t_c + y * t_y + x * t_x.
  const int64_t t_c = p.nhwc ? 1 : p.H * p.W;
  const int64_t t_y = p.nhwc ? p.W * p.cg : p.W;
  const int64_t t_x = p.nhwc ? p.cg : 1;
  return TapSum<true>(T + cp * t_c + x * t_x, t_y, i, p.pt, p.sh, p.H, p.OH);
}

// The (class, kernel row, column) of U entry `item` of `classes` classes: item =
// (c * kh + i) * W + x for NCHW, (i * W + x) * classes + c for NHWC (consecutive items on
// consecutive T addresses).
ADAFISHER_HD void SplitRowItem(const ConvPlan& p, int64_t classes, int64_t item, int64_t* c, int64_t* i, int64_t* x) {
  if (p.nhwc) {
    *c = item % classes;
    const int64_t t = item / classes;
    *x = t % p.W;
    *i = t / p.W;
  } else {
    *x = item % p.W;
    const int64_t t = item / p.W;
    *i = t % p.kh;
    *c = t / p.kh;
  }
}

// Phase 2a by U index (SplitRowItem over all cg classes).
ADAFISHER_HD double ConvRowTap(const double* T, const ConvPlan& p, int64_t item) {
  int64_t cp, i, x;
  SplitRowItem(p, p.cg, item, &cp, &i, &x);
  return ConvRowSum(T, p, cp, i, x);
}

// Phase 2b, item = c' * kh * kw + i * kw + j: sum over output columns ow of
// U[c'][i][ow*sw + j - pl]. Sets *k to the output index of the entry in the plan's order.
ADAFISHER_HD double ConvColTap(const double* U, const ConvPlan& p, int64_t item, int64_t* k) {
  const int64_t khw = p.kh * p.kw;
  const int64_t cp = item / khw;
  const int64_t ij = item - cp * khw;
  const int64_t i = ij / p.kw;
  const int64_t j = ij - i * p.kw;
  *k = p.channel_major ? item : ij * p.cg + cp;
  // U index of (c', i, x) = c' * u_c + i * u_i + x * u_x (see ConvRowTap's numbering).
  const int64_t u_c = p.nhwc ? 1 : p.kh * p.W;
  const int64_t u_i = p.nhwc ? p.W * p.cg : p.W;
  const int64_t u_x = p.nhwc ? p.cg : 1;
  return TapSum<true>(U + cp * u_c + i * u_i, u_x, j, p.pl, p.sw, p.W, p.OW);
}

}  // namespace cuda
}  // namespace adafisher
