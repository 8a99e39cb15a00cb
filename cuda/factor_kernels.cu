// Fresh factor kernels: MeanSquareFactor, NormInputFactor, NormGradFactor (sums over a
// [outer, kept, inner] view) and Conv2dPatchFactor (im2col-free windowed mean squares).
//
// NOTE: [deterministic reductions]
// No floating-point atomics: every sum is a fixed-order tree or loop. A thread sums its
// elements in index order (factor_items.h), a block combines its threads with a fixed
// shuffle tree, and blocks write double partials that a second kernel adds in partial
// order. Block counts depend on the shape only (launch_plan.h), never on the device, so
// the result is bit-identical run after run and GPU after GPU. Sums are in double, like
// the CPU backend: the CUDA and CPU float results then agree to about one ulp.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_internal.h"
#include "factor_items.h"
#include "launch_plan.h"

namespace adafisher {
namespace cuda {
namespace {

constexpr int kThreads = kReduceThreads;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block must be whole warps");

// Sum over the block, in a fixed order; the result is valid in thread 0. Once per kernel.
__device__ __forceinline__ double BlockSum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <bool kSquare>
__global__ void __launch_bounds__(kThreads)
    ColumnReduceKernel(const float* __restrict__ x, const ColumnPlan plan, double* __restrict__ partial) {
  __shared__ double sums[kThreads];
  const int tid = threadIdx.x;
  sums[tid] = ColumnThreadSum<kSquare>(x, plan, blockIdx.x, blockIdx.y, tid);
  __syncthreads();
  if (tid < plan.cols) {
    const int64_t col = int64_t{blockIdx.x} * plan.cols + tid;
    if (col < plan.kept) {
      // Rows of the block in order: sums[r * cols + tid] holds rows r, r + step, ...
      double total = 0.0;
      for (int r = 0; r < plan.step; ++r) total += sums[r * plan.cols + tid];
      partial[int64_t{blockIdx.y} * plan.kept + col] = total;
    }
  }
}

template <bool kSquare>
__global__ void __launch_bounds__(kThreads)
    PlaneReduceKernel(const float* __restrict__ x, const PlanePlan plan, double* __restrict__ partial) {
  const int64_t block = blockIdx.x;
  const int64_t b = block % plan.kept;
  const int64_t part = block / plan.kept;
  const double total = BlockSum(PlaneThreadSum<kSquare>(x, plan, part, b, threadIdx.x, kThreads));
  if (threadIdx.x == 0) partial[part * plan.kept + b] = total;
}

// NOTE: [partial sums]
// The second kernels add a [rows, columns] matrix of double partials down its columns
// (rows = blocks of the first pass, up to a few thousand; columns = kept entries or conv
// pixels). One thread per column would chain `rows` dependent L2 round trips. Instead a
// block takes a tile of 32 adjacent columns (coalesced 256-byte row segments): warp w adds
// rows w, w + 8, w + 16, ... of its lane's column in row order, then thread t < 32 adds the
// 8 warp sums in warp order. The order is fixed, so the result is deterministic; the chain
// is rows / 8 loads long, four of them in flight.
constexpr int kTileColumns = 32;
constexpr int kTileWarps = kThreads / 32;

// Thread t < 32 of the block gets the sum of column tile + t of a row-major [rows, columns]
// matrix (0 past the last column); the other threads get 0. Every thread of the block must
// call it, with the same arguments.
__device__ double TileColumnSum(const double* partial, int64_t rows, int64_t columns, int64_t tile) {
  __shared__ double warp_sums[kTileWarps][kTileColumns];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = tile + lane;
  double sum = 0.0;
  if (col < columns) {
    const double* p = partial + col;
    int64_t r = warp;
    for (; r + 3 * kTileWarps < rows; r += 4 * kTileWarps) {
      const double v0 = p[r * columns], v1 = p[(r + kTileWarps) * columns];
      const double v2 = p[(r + 2 * kTileWarps) * columns], v3 = p[(r + 3 * kTileWarps) * columns];
      sum += v0;
      sum += v1;
      sum += v2;
      sum += v3;
    }
    for (; r < rows; r += kTileWarps) sum += p[r * columns];
  }
  warp_sums[warp][lane] = sum;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x < kTileColumns) {
    for (int w = 0; w < kTileWarps; ++w) total += warp_sums[w][threadIdx.x];
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return total;
}

// The finalizers below repeat the CPU backend's double expressions exactly. Grid: one block
// per 32 columns.
__global__ void __launch_bounds__(kThreads)
    MeanSquareFinalizeKernel(const double* __restrict__ partial, int64_t rows, int64_t kept, double count,
                             bool has_appended, float appended, float* __restrict__ out) {
  const int64_t tile = int64_t{blockIdx.x} * kTileColumns;
  const double sum = TileColumnSum(partial, rows, kept, tile);
  const int64_t b = tile + threadIdx.x;
  if (threadIdx.x >= kTileColumns) return;
  if (b < kept) {
    out[b] = static_cast<float>(count > 0 ? sum / count : 0.0);
  } else if (b == kept && has_appended) {
    out[kept] = appended;
  }
}

__global__ void __launch_bounds__(kThreads)
    NormGradFinalizeKernel(const double* __restrict__ partial, int64_t rows, int64_t kept, double batch,
                           float* __restrict__ out) {
  const int64_t tile = int64_t{blockIdx.x} * kTileColumns;
  const double sum = TileColumnSum(partial, rows, kept, tile);
  const int64_t b = tile + threadIdx.x;
  if (threadIdx.x < kTileColumns && b < kept) out[b] = static_cast<float>(sum * sum / batch);
}

// One block: out = { sum_b (sum_b / u_divisor)^2 / batch^2, kept / batch^2 }.
__global__ void __launch_bounds__(kThreads)
    NormInputFinalizeKernel(const double* __restrict__ partial, int64_t rows, int64_t kept, double u_divisor,
                            double batch, float* __restrict__ out) {
  double acc = 0.0;
  for (int64_t tile = 0; tile < kept; tile += kTileColumns) {
    const double sum = TileColumnSum(partial, rows, kept, tile);
    if (threadIdx.x < kTileColumns && tile + threadIdx.x < kept) {
      const double u = sum / u_divisor;
      acc += u * u;
    }
  }
  const double total = BlockSum(acc);
  if (threadIdx.x == 0) {
    const double batch_sq = batch * batch;
    out[0] = static_cast<float>(total / batch_sq);
    out[1] = static_cast<float>(static_cast<double>(kept) / batch_sq);
  }
}

// NOTE: [conv patch factor]
// H[c', i, j] = (1 / (N OH OW)) * sum over images n, groups g, output positions (oh, ow) of
// x[n, g*cg + c', oh*sh + i - pt, ow*sw + j - pl]^2 (zero outside the image). For a fixed
// tap (i, j) each input pixel (y, x) is hit by at most one output position, so the sum
// separates:
//   phase 1   T[c', y, x] = sum_{n, g} x[n, g*cg + c', y, x]^2       (reads x once, coalesced)
//   phase 2a  U[c', i, x] = sum_{oh valid} T[c', oh*sh + i - pt, x]
//   phase 2b  H[c', i, j] = sum_{ow valid} U[c', i, ow*sw + j - pl] / (N OH OW)
// T is N*g times smaller than x; when that is too small to fill the GPU, phase 1 splits the
// (n, g) pairs into `parts` partial copies of T that a fold kernel adds in part order.
__global__ void __launch_bounds__(kThreads)
    ConvPixelKernel(const float* __restrict__ x, const ConvPlan plan, int64_t pixel_blocks, double* __restrict__ T) {
  const int64_t part = blockIdx.x / pixel_blocks;
  const int64_t q = (blockIdx.x % pixel_blocks) * kThreads + threadIdx.x;
  if (q < plan.pixels) T[part * plan.pixels + q] = ConvPixelSum(x, plan, part, q);
}

// T[q] = sum over parts of T[part * pixels + q], in place (see NOTE: [partial sums]); a
// block reads only its own 32 columns, and writes after reading them all.
__global__ void __launch_bounds__(kThreads) ConvFoldKernel(double* T, int64_t pixels, int64_t parts) {
  const int64_t tile = int64_t{blockIdx.x} * kTileColumns;
  const double sum = TileColumnSum(T, parts, pixels, tile);
  const int64_t q = tile + threadIdx.x;
  if (threadIdx.x < kTileColumns && q < pixels) T[q] = sum;
}

__global__ void __launch_bounds__(kThreads)
    ConvRowKernel(const double* __restrict__ T, const ConvPlan plan, double* __restrict__ U) {
  const int64_t item = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (item < plan.row_items()) U[item] = ConvRowTap(T, plan, item);
}

__global__ void __launch_bounds__(kThreads)
    ConvTapKernel(const double* __restrict__ U, const ConvPlan plan, double count, bool has_bias,
                  float* __restrict__ out) {
  const int64_t item = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  const int64_t taps = plan.tap_items();
  if (item < taps) {
    int64_t k = 0;
    const double sum = ConvColTap(U, plan, item, &k);
    out[k] = static_cast<float>(count > 0 ? sum / count : 0.0);
  } else if (item == taps && has_bias) {
    out[taps] = static_cast<float>(plan.groups);
  }
}

unsigned GridSize(int64_t blocks) {
  if (blocks > INT_MAX) {
    throw BackendError(ErrorCode::kInvalidArgument, "tensor too large for the CUDA factor kernels");
  }
  return static_cast<unsigned>(blocks);
}

unsigned BlocksFor(int64_t items) { return GridSize(CeilDiv(items, kThreads)); }
unsigned TilesFor(int64_t columns) { return GridSize(CeilDiv(columns, kTileColumns)); }

size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

int64_t CudaBackend::ReduceKept(ReduceOp op, const float* x, index_t outer, index_t kept, index_t inner,
                                double** partial) {
  *partial = nullptr;
  if (outer <= 0 || kept <= 0 || inner <= 0) return 0;
  const bool square = op == ReduceOp::kSquare;
  if (inner == 1) {
    const ColumnPlan plan = MakeColumnPlan(outer, kept);
    double* out = static_cast<double*>(Scratch(static_cast<size_t>(plan.slices * kept) * sizeof(double)));
    const dim3 grid(GridSize(plan.col_tiles), static_cast<unsigned>(plan.slices));
    if (square) {
      ColumnReduceKernel<true><<<grid, kThreads, 0, stream_>>>(x, plan, out);
    } else {
      ColumnReduceKernel<false><<<grid, kThreads, 0, stream_>>>(x, plan, out);
    }
    ADAFISHER_CUDA_LAUNCH_CHECK();
    *partial = out;
    return plan.slices;
  }
  const PlanePlan plan = MakePlanePlan(outer, kept, inner);
  const unsigned blocks = GridSize(plan.parts * kept);
  double* out = static_cast<double*>(Scratch(static_cast<size_t>(blocks) * sizeof(double)));
  if (square) {
    PlaneReduceKernel<true><<<blocks, kThreads, 0, stream_>>>(x, plan, out);
  } else {
    PlaneReduceKernel<false><<<blocks, kThreads, 0, stream_>>>(x, plan, out);
  }
  ADAFISHER_CUDA_LAUNCH_CHECK();
  *partial = out;
  return plan.parts;
}

void CudaBackend::MeanSquareFactor(const float* x, index_t outer, index_t kept, index_t inner, double count,
                                   bool has_appended, float appended, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  double* partial = nullptr;
  const int64_t rows = ReduceKept(ReduceOp::kSquare, x, outer, kept, inner, &partial);
  const int64_t items = kept + (has_appended ? 1 : 0);
  if (items <= 0) return;
  MeanSquareFinalizeKernel<<<TilesFor(items), kThreads, 0, stream_>>>(partial, rows, kept, count, has_appended,
                                                                        appended, out);
  ADAFISHER_CUDA_LAUNCH_CHECK();
}

void CudaBackend::NormInputFactor(const float* x, index_t outer, index_t kept, index_t inner, double u_divisor,
                                  double batch, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  double* partial = nullptr;
  const int64_t rows = ReduceKept(ReduceOp::kValue, x, outer, kept, inner, &partial);
  NormInputFinalizeKernel<<<1, kThreads, 0, stream_>>>(partial, rows, kept < 0 ? 0 : kept, u_divisor, batch, out);
  ADAFISHER_CUDA_LAUNCH_CHECK();
}

void CudaBackend::NormGradFactor(const float* x, index_t outer, index_t kept, index_t inner, double batch,
                                 float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  double* partial = nullptr;
  const int64_t rows = ReduceKept(ReduceOp::kValue, x, outer, kept, inner, &partial);
  if (kept <= 0) return;
  NormGradFinalizeKernel<<<TilesFor(kept), kThreads, 0, stream_>>>(partial, rows, kept, batch, out);
  ADAFISHER_CUDA_LAUNCH_CHECK();
}

void CudaBackend::Conv2dPatchFactor(const float* x, const Conv2dShape& shape, bool has_bias, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  const ConvPlan plan = MakeConvPlan(shape);
  const int64_t copies = plan.parts > 0 ? plan.parts : 1;
  const size_t t_bytes = AlignUp(static_cast<size_t>(copies * plan.pixels) * sizeof(double));
  const size_t u_bytes = AlignUp(static_cast<size_t>(plan.row_items()) * sizeof(double));
  char* scratch = static_cast<char*>(Scratch(t_bytes + u_bytes + 256));
  double* T = reinterpret_cast<double*>(scratch);
  double* U = reinterpret_cast<double*>(scratch + t_bytes);

  if (plan.pixels > 0) {
    if (plan.parts > 0) {
      const int64_t pixel_blocks = CeilDiv(plan.pixels, kThreads);
      ConvPixelKernel<<<GridSize(pixel_blocks * plan.parts), kThreads, 0, stream_>>>(x, plan, pixel_blocks, T);
      ADAFISHER_CUDA_LAUNCH_CHECK();
      if (plan.parts > 1) {
        ConvFoldKernel<<<TilesFor(plan.pixels), kThreads, 0, stream_>>>(T, plan.pixels, plan.parts);
        ADAFISHER_CUDA_LAUNCH_CHECK();
      }
    } else {
      // No (n, g) pairs (batch 0): every pixel sum is zero.
      ADAFISHER_CUDA_CHECK(cudaMemsetAsync(T, 0, static_cast<size_t>(plan.pixels) * sizeof(double), stream_));
    }
  }
  if (plan.row_items() > 0) {
    ConvRowKernel<<<BlocksFor(plan.row_items()), kThreads, 0, stream_>>>(T, plan, U);
    ADAFISHER_CUDA_LAUNCH_CHECK();
  }
  const int64_t items = plan.tap_items() + (has_bias ? 1 : 0);
  if (items > 0) {
    const double count = static_cast<double>(shape.batch) * static_cast<double>(shape.out_h) *
                         static_cast<double>(shape.out_w);
    ConvTapKernel<<<BlocksFor(items), kThreads, 0, stream_>>>(U, plan, count, has_bias, out);
    ADAFISHER_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace adafisher
