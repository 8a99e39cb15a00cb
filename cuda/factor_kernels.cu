// Fresh factor kernels: MeanSquareFactor, NormInputFactor, NormGradFactor (sums over a
// [outer, kept, inner] view) and Conv2dPatchFactor (im2col-free windowed mean squares).
//
// NOTE: [deterministic reductions]
// No floating-point atomics: every sum is a fixed-order tree or loop. A thread sums its
// elements in index order (factor_items.h), a block combines its threads with a fixed
// shuffle tree, and blocks write double partials that the group's last block adds in
// partial order (NOTE: [last-block epilogue]; integer tickets, not float atomics). Block
// counts depend on the shape only (launch_plan.h), never on the device, so the result is
// bit-identical run after run and GPU after GPU. Sums are in double, like
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
// Threads resident per SM in the architecture being compiled: 1024 on sm_75, 1536 on
// sm_86/87/89, 2048 on sm_80 and sm_90 (and in host code). The launch bounds below ask
// for no more, or ptxas ignores them (with a warning) and caps no registers at all.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
constexpr int kThreadsPerSm = 1024;
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
constexpr int kThreadsPerSm = 1536;
#else
constexpr int kThreadsPerSm = 2048;
#endif
// The streaming first passes keep a full SM's threads resident (32 registers each on
// sm_90): their epilogues must not cost them occupancy.
constexpr int kStreamingBlocksPerSm = kThreadsPerSm / kThreads;

// NOTE: [programmatic dependent launch]
// A model's factor calls are a chain of short kernels on one stream (cnn512: nine, from 6 to
// 67 MB each), so each kernel's launch and ramp used to sit between its predecessor's last
// block and its own first. Where the kernels' image is for compute capability 9.0+, the
// streaming first passes and the conv phase 2 are launched with programmatic stream
// serialization: each calls AwaitPriorGrids() before it touches memory, which waits until
// the kernel queued before it has completed and its writes are visible (griddepcontrol.wait)
// and then lets the kernel queued after it be scheduled (griddepcontrol.launch_dependents).
// The successor's launch and block scheduling thus overlap this kernel's tail; the order of
// every memory access is what serial launches give, so the results are the same bits.
// PlanTuning::programmatic_launch turns it off (the harness's sweep times both).
__device__ __forceinline__ void AwaitPriorGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// Launches kernel<<<grid, kThreads, 0, stream>>>(args...), with programmatic stream
// serialization when `programmatic`, and checks the launch. The kernel must start with
// AwaitPriorGrids(), in every block, before any return and any access to global memory:
// kernel N + 2 waits for kernel N + 1 only, and is ordered after kernel N because every block
// of N + 1 waited for N before it could finish. A block that returned without waiting
// would let N + 2 start while N still runs.
template <typename... Params, typename... Args>
void LaunchAwaiting(bool programmatic, void (*kernel)(Params...), dim3 grid, cudaStream_t stream,
                    const Args&... args) {
  cudaLaunchAttribute attribute[1] = {};
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = programmatic ? 1 : 0;
  ADAFISHER_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

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

// NOTE: [partial sums]
// The sums of partials add a [rows, columns] matrix of double partials down its columns
// (rows = blocks of the first pass, up to a few thousand; columns = kept entries or conv
// pixels). One thread per column would chain `rows` dependent L2 round trips. Instead a
// block takes a tile of 32 adjacent columns (coalesced 256-byte row segments): warp w adds
// rows w, w + 8, w + 16, ... of its lane's column in row order, then thread t < 32 adds the
// 8 warp sums in warp order. The order is fixed, so the result is deterministic; the chain
// is rows / 8 loads long, four of them in flight. Loads go through L2 only (__ldcg): the
// partials may have been written by other blocks of the same launch.
constexpr int kTileColumns = 32;
constexpr int kTileWarps = kThreads / 32;

// Thread t < 32 of the block gets the sum of column tile + t of a row-major [rows, pitch]
// matrix (0 from column `end` on); the other threads get 0. Every thread of the block must
// call it, with the same arguments.
__device__ double TileColumnSum(const double* partial, int64_t rows, int64_t pitch, int64_t end, int64_t tile) {
  __shared__ double warp_sums[kTileWarps][kTileColumns];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = tile + lane;
  double sum = 0.0;
  if (col < end) {
    const double* p = partial + col;
    int64_t r = warp;
    for (; r + 3 * kTileWarps < rows; r += 4 * kTileWarps) {
      const double v0 = __ldcg(p + r * pitch), v1 = __ldcg(p + (r + kTileWarps) * pitch);
      const double v2 = __ldcg(p + (r + 2 * kTileWarps) * pitch), v3 = __ldcg(p + (r + 3 * kTileWarps) * pitch);
      sum += v0;
      sum += v1;
      sum += v2;
      sum += v3;
    }
    for (; r < rows; r += kTileWarps) sum += __ldcg(p + r * pitch);
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

// NOTE: [last-block epilogue]
// A reduction used to end with a second launch that added the first pass's partials; in
// ncu on an H200 those launches (with the conv fold and phase 2b) were a third of the GPU
// time of cnn512's conv factors. Now every block of the first pass, after writing its partial, draws a ticket: an
// integer atomicAdd on the counter of its group (the blocks that write the partials of one
// kept entry, one column tile or one pixel tile). The block that draws the group's last
// ticket knows that every partial of the group is written (each block fences before it
// draws), adds them with TileColumnSum (the order of the former second launch: the sums
// are bit-identical to it), writes the result and puts the counter back to 0 for the next
// launch (CudaBackend::Tickets). Which block comes last varies from run to run; what it
// computes does not, so results stay deterministic (NOTE: [deterministic reductions]). No
// float atomics.
//
// True in the group's last block only, for every thread of the block; every thread of
// the block must call it after its own partial writes. For groups of 2 blocks or more: a
// group of one block draws no ticket (FinishesGroup).
//
// The fences are thread 0's, on either side of its ticket, with the barriers outside them
// (the shape of cooperative groups' grid sync): the first barrier orders every thread's
// partials before thread 0's release fence, which, being cumulative, publishes them with the
// ticket; the acquire fence after a last ticket comes before the barrier that releases the
// block's other threads to read the group's partials. (A fence in each writing thread before
// the barrier is not a release of the ticket that thread 0 draws in the PTX memory model.)
__device__ bool LastOfGroup(unsigned* tickets, int64_t group, unsigned group_blocks) {
  unsigned* ticket = tickets + group;
  __shared__ bool last;
  __syncthreads();  // every thread's partials are written before thread 0 draws
  if (threadIdx.x == 0) {
    __threadfence();  // release: the block's partials are visible to the device before the ticket
    const bool is_last = atomicAdd(ticket, 1u) == group_blocks - 1;
    if (is_last) {
      atomicExch(ticket, 0u);  // every block of the group has drawn: no one else touches it
      __threadfence();  // acquire: the other blocks' partials, before the barrier below
    }
    last = is_last;
  }
  __syncthreads();
  return last;
}

// LastOfGroup for any group size; a block alone in its group finishes it without a ticket
// (`tickets` may then be null), once its threads' partials are visible to each other.
__device__ __forceinline__ bool FinishesGroup(unsigned* tickets, int64_t group, unsigned group_blocks) {
  if (group_blocks > 1) return LastOfGroup(tickets, group, group_blocks);
  __syncthreads();
  return true;
}

// The factor entry of a finished column sum: the CPU backend's double expressions exactly.
template <Finish kFinish>
__device__ __forceinline__ float Finished(double sum, double divisor) {
  if (kFinish == Finish::kMeanSquare) return static_cast<float>(divisor > 0 ? sum / divisor : 0.0);
  return static_cast<float>(sum * sum / divisor);
}

// The first pass over an [outer, kept] matrix (ColumnPlan): block (tile, slice) writes
// the partial of each of its columns over its slice of rows; with a finish, the last slice
// block of a tile adds the tile's partials and writes its factor entries. Every thread of
// the block calls it.
template <bool kSquare, Finish kFinish>
__device__ __forceinline__ void ColumnReduceBlock(const float* __restrict__ x, const ColumnPlan& plan, double* partial,
                                                  const FinishArgs& finish, int64_t tile, int64_t slice) {
  __shared__ double sums[kThreads];
  const int tid = threadIdx.x;
  sums[tid] = ColumnThreadSum<kSquare>(x, plan, tile, slice, tid);
  __syncthreads();
  if (tid < plan.cols) {
    const int64_t col = tile * plan.cols + tid;
    if (col < plan.kept) {
      // Rows of the block in order: sums[r * cols + tid] holds rows r, r + step, ...
      double total = 0.0;
      for (int r = 0; r < plan.step; ++r) total += sums[r * plan.cols + tid];
      partial[slice * plan.kept + col] = total;
    }
  }
  if (kFinish == Finish::kPartials) return;
  if (finish.has_appended && tile == 0 && slice == 0 && tid == 0) finish.out[plan.kept] = finish.appended;
  if (!FinishesGroup(finish.tickets, tile, static_cast<unsigned>(plan.slices))) return;
  const int64_t first = tile * plan.cols;
  const int64_t end = first + plan.cols < plan.kept ? first + plan.cols : plan.kept;
  for (int64_t t = first; t < end; t += kTileColumns) {
    const double sum = TileColumnSum(partial, plan.slices, plan.kept, end, t);
    if (tid < kTileColumns && t + tid < end) finish.out[t + tid] = Finished<kFinish>(sum, finish.divisor);
  }
}

// Grid (col_tiles, slices).
template <bool kSquare, Finish kFinish>
__global__ void __launch_bounds__(kThreads, kStreamingBlocksPerSm)
    ColumnReduceKernel(const float* __restrict__ x, const ColumnPlan plan, double* partial,
                       const FinishArgs finish) {
  AwaitPriorGrids();
  ColumnReduceBlock<kSquare, kFinish>(x, plan, partial, finish, blockIdx.x, blockIdx.y);
}

// The first pass over [outer, kept, inner] with inner > 1 (PlanePlan): block (part, b)
// writes the partial of its span of b's plane; with a finish, the last part block of b
// adds b's partials and writes out[b]. `block` = part * kept + b; every thread calls it.
template <bool kSquare, Finish kFinish>
__device__ __forceinline__ void PlaneReduceBlock(const float* __restrict__ x, const PlanePlan& plan, double* partial,
                                                 const FinishArgs& finish, int64_t block) {
  const int64_t b = block % plan.kept;
  const int64_t part = block / plan.kept;
  const double total = BlockSum(PlaneThreadSum<kSquare>(x, plan, part, b, threadIdx.x, kThreads));
  if (threadIdx.x == 0) partial[part * plan.kept + b] = total;
  if (kFinish == Finish::kPartials) return;
  if (finish.has_appended && block == 0 && threadIdx.x == 0) finish.out[plan.kept] = finish.appended;
  if (!FinishesGroup(finish.tickets, b, static_cast<unsigned>(plan.parts))) return;
  const double sum = TileColumnSum(partial, plan.parts, plan.kept, b + 1, b);
  if (threadIdx.x == 0) finish.out[b] = Finished<kFinish>(sum, finish.divisor);
}

// Grid parts * kept.
template <bool kSquare, Finish kFinish>
__global__ void __launch_bounds__(kThreads)
    PlaneReduceKernel(const float* __restrict__ x, const PlanePlan plan, double* partial,
                      const FinishArgs finish) {
  AwaitPriorGrids();
  PlaneReduceBlock<kSquare, kFinish>(x, plan, partial, finish, blockIdx.x);
}

// NOTE: [batched factor launch]
// A model's factor calls are one launch each (two for a conv input): for `big` (four Linear
// 4096->4096 layers, batch 256) eight launches read 4 MB each, and each launch's ramp and
// tail cost about as much as its reads; cnn512's six conv calls are nine launches, a third
// of their GPU time in latency-bound small kernels (bench/RESULTS.md). recordFactors hands
// several layers' statistics in one call; the cuda backend then runs its mean squares
// (Linear inputs and gradients, conv output gradients) as one launch per plan kind (column,
// plane) of up to kBatchJobs jobs, and its conv patch factors as one phase-1 launch and one
// phase-2 launch of up to kConvBatchJobs jobs. Each job keeps the plan, the block partition,
// its own partials, T and tickets, and the epilogue of its own launches: block
// `first_block + l` of the batch does what block l of the job's own launch does (column: tile
// l % col_tiles, slice l / col_tiles), so every factor is the same bits as from its own call
// (the harness checks it). The job table travels in the kernel arguments (__grid_constant__:
// read from the constant bank, never copied), so a batch costs no upload and no
// synchronization. A job whose own grid is larger than PlanTuning::batch_job_max_blocks runs
// its own launches (the harness's "tune batch" lines time the choice); by default every job
// of a batchable kind joins a batch.
constexpr int kBatchJobs = 16;

template <typename Plan>
struct ReduceJob {
  const float* x;
  Plan plan;
  double* partial;
  FinishArgs finish;
  int64_t first_block;  // in the batch's grid
};

template <typename Plan>
struct ReduceBatch {
  ReduceJob<Plan> job[kBatchJobs];
  int count;
};
static_assert(sizeof(ReduceBatch<ColumnPlan>) <= 4000 && sizeof(ReduceBatch<PlanePlan>) <= 4000,
              "a batch's job table must fit in the 4 KiB of kernel arguments of every architecture");

// The job of a batch's block `block`: the last of jobs[0..count) whose first block (the
// member `first`) is <= block.
template <typename Job>
__device__ __forceinline__ const Job& JobOfBlock(const Job* jobs, int count, int64_t block, int64_t Job::*first) {
  int j = 0;
  while (j + 1 < count && block >= jobs[j + 1].*first) ++j;
  return jobs[j];
}

// Indexed by the job, the plan's fields live in registers where a launch of its own reads
// them from the argument bank as needed: ptxas spills the column pass below 48 registers
// (at the 32 of ColumnReduceKernel's full occupancy, and also with one copy of the code
// per job index). At 48, five blocks of 256 threads per SM keep 1280 x 8 loads (40 KB) in
// flight (NOTE: [loads in flight]).
constexpr int kBatchColumnBlocksPerSm = 5 < kStreamingBlocksPerSm ? 5 : kStreamingBlocksPerSm;

__global__ void __launch_bounds__(kThreads, kBatchColumnBlocksPerSm)
    ColumnBatchKernel(const __grid_constant__ ReduceBatch<ColumnPlan> batch) {
  AwaitPriorGrids();
  const auto& job = JobOfBlock(batch.job, batch.count, blockIdx.x, &ReduceJob<ColumnPlan>::first_block);
  const int64_t local = int64_t{blockIdx.x} - job.first_block;
  ColumnReduceBlock<true, Finish::kMeanSquare>(job.x, job.plan, job.partial, job.finish, local % job.plan.col_tiles,
                                               local / job.plan.col_tiles);
}

__global__ void __launch_bounds__(kThreads)
    PlaneBatchKernel(const __grid_constant__ ReduceBatch<PlanePlan> batch) {
  AwaitPriorGrids();
  const auto& job = JobOfBlock(batch.job, batch.count, blockIdx.x, &ReduceJob<PlanePlan>::first_block);
  PlaneReduceBlock<true, Finish::kMeanSquare>(job.x, job.plan, job.partial, job.finish,
                                              int64_t{blockIdx.x} - job.first_block);
}

// The finalizers of an empty reduction (no first pass: outer or inner is 0) and of the norm
// input factor, which needs every kept entry's sum. They repeat the CPU backend's double
// expressions exactly. Grid: one block per 32 columns (norm input: one block).
__global__ void __launch_bounds__(kThreads)
    MeanSquareFinalizeKernel(const double* __restrict__ partial, int64_t rows, int64_t kept, double count,
                             bool has_appended, float appended, float* __restrict__ out) {
  const int64_t tile = int64_t{blockIdx.x} * kTileColumns;
  const double sum = TileColumnSum(partial, rows, kept, kept, tile);
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
  const double sum = TileColumnSum(partial, rows, kept, kept, tile);
  const int64_t b = tile + threadIdx.x;
  if (threadIdx.x < kTileColumns && b < kept) out[b] = static_cast<float>(sum * sum / batch);
}

// One block: out = { sum_b (sum_b / u_divisor)^2 / batch^2, kept / batch^2 }.
__global__ void __launch_bounds__(kThreads)
    NormInputFinalizeKernel(const double* __restrict__ partial, int64_t rows, int64_t kept, double u_divisor,
                            double batch, float* __restrict__ out) {
  double acc = 0.0;
  for (int64_t tile = 0; tile < kept; tile += kTileColumns) {
    const double sum = TileColumnSum(partial, rows, kept, kept, tile);
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
// (n, g) pairs into `parts` partial copies of T, and the last part block of each pixel
// tile adds its tile's copies in part order (NOTE: [last-block epilogue]). Phases 2a and 2b
// then run in one kernel, a block per few classes c' with U in shared memory.
//
// T[q] = sum over parts of T[part * pixels + q] for the kThreads pixels q from `first`, in
// place, one 32-column tile at a time (NOTE: [partial sums]): each tile is read whole
// before its first row is written. (Two tiles' loads in flight together would halve the
// chain of L2 round trips, but spill in the 32-register one-pixel kernel.)
__device__ void FoldPixelTile(double* T, int64_t parts, int64_t pixels, int64_t first) {
  const int64_t end = first + kThreads < pixels ? first + kThreads : pixels;
  for (int64_t t = first; t < end; t += kTileColumns) {
    const double sum = TileColumnSum(T, parts, pixels, end, t);
    if (threadIdx.x < kTileColumns && t + threadIdx.x < end) T[t + threadIdx.x] = sum;
  }
}

// Phase 1. Block (tile, part), parts of one tile adjacent in the grid so that the folds
// spread over the launch: the kThreads * kUnit pixels of the tile, copy `part` of T; a
// thread sums kUnit adjacent pixels (kUnit == plan.unit). `block` = tile * parts + part;
// every thread of the block calls it.
template <int kUnit>
__device__ __forceinline__ void ConvPixelBlock(const float* __restrict__ x, const ConvPlan& plan, double* T,
                                               unsigned* __restrict__ tickets, unsigned block) {
  // 32-bit: the grid has fewer than 2^31 blocks and parts <= 2^18 (MakeConvPlan).
  const unsigned parts = static_cast<unsigned>(plan.parts);
  const unsigned tile = block / parts;
  const unsigned part = block - tile * parts;
  const int64_t q = (int64_t{tile} * kThreads + threadIdx.x) * kUnit;
  if (q < plan.pixels) {
    if (kUnit == 4) {
      double sums[4];
      ConvQuadSum(x, plan, part, q, sums);  // plan.pixels % 4 == 0: all four exist
      double* row = T + part * plan.pixels + q;
      row[0] = sums[0], row[1] = sums[1], row[2] = sums[2], row[3] = sums[3];
    } else {
      const double sum = ConvPixelSum(x, plan, part, q);
      T[part * plan.pixels + q] = sum;
    }
  }
  if (parts == 1) return;
  // From the block index again rather than kept live through the loads (32 registers).
  const unsigned my_tile = block / static_cast<unsigned>(plan.parts);
  if (!LastOfGroup(tickets, my_tile, static_cast<unsigned>(plan.parts))) return;
  for (int u = 0; u < kUnit; ++u) FoldPixelTile(T, plan.parts, plan.pixels, (int64_t{my_tile} * kUnit + u) * kThreads);
}

template <int kUnit>
__global__ void __launch_bounds__(kThreads, kUnit == 1 ? kStreamingBlocksPerSm : kStreamingBlocksPerSm / 2)
    ConvPixelKernel(const float* __restrict__ x, const ConvPlan plan, double* T, unsigned* __restrict__ tickets) {
  AwaitPriorGrids();
  ConvPixelBlock<kUnit>(x, plan, T, tickets, blockIdx.x);
}

// Phases 2a and 2b for classes [block * per_block, + per_block): U of those classes
// (per_block * kh * W <= kRowTapShared doubles) in shared memory, then their taps. Sums in
// the order of ConvRowTap and ConvColTap (factor_items.h).
constexpr int64_t kRowTapShared = 4096;  // 32 KiB of doubles

__device__ __forceinline__ void ConvRowTapBlock(const double* __restrict__ T, const ConvPlan& plan, int64_t per_block,
                                                double count, bool has_bias, float* __restrict__ out, int64_t block) {
  __shared__ double U[kRowTapShared];
  const int64_t c0 = block * per_block;
  const int64_t classes = per_block < plan.cg - c0 ? per_block : plan.cg - c0;
  const int64_t line = plan.kh * plan.W;  // U entries of one class
  for (int64_t r = threadIdx.x; r < classes * line; r += kThreads) {
    // Consecutive threads on consecutive T addresses: x fastest for NCHW, c' for NHWC.
    int64_t c, i, xx;
    SplitRowItem(plan, classes, r, &c, &i, &xx);
    U[(c * plan.kh + i) * plan.W + xx] = ConvRowSum(T, plan, c0 + c, i, xx);
  }
  __syncthreads();
  const int64_t khw = plan.kh * plan.kw;
  for (int64_t r = threadIdx.x; r < classes * khw; r += kThreads) {
    const int64_t c = r / khw;
    const int64_t ij = r - c * khw;
    const int64_t i = ij / plan.kw;
    const int64_t j = ij - i * plan.kw;
    const double sum = TapSum<false>(U + (c * plan.kh + i) * plan.W, 1, j, plan.pl, plan.sw, plan.W, plan.OW);
    const int64_t cp = c0 + c;
    out[plan.channel_major ? cp * khw + ij : ij * plan.cg + cp] = static_cast<float>(count > 0 ? sum / count : 0.0);
  }
  if (has_bias && block == 0 && threadIdx.x == 0) out[plan.tap_items()] = static_cast<float>(plan.groups);
}

__global__ void __launch_bounds__(kThreads)
    ConvRowTapKernel(const double* __restrict__ T, const ConvPlan plan, int64_t per_block, double count,
                     bool has_bias, float* __restrict__ out) {
  AwaitPriorGrids();
  ConvRowTapBlock(T, plan, per_block, count, has_bias, out, blockIdx.x);
}

// A batch of conv patch factors (NOTE: [batched factor launch]): phase 1 of every job in one
// launch, then phases 2a + 2b of every job in one more; each job's blocks do what its own
// launches' blocks do.
struct ConvJob {
  const float* x;
  ConvPlan plan;
  double* T;
  unsigned* tickets;
  int64_t per_block;     // classes per phase-2 block
  double count;          // N * OH * OW
  float* out;
  int64_t first_block;   // in the phase-1 grid
  int64_t first_block2;  // in the phase-2 grid
  bool has_bias;
};
constexpr int kConvBatchJobs = 8;
struct ConvBatch {
  ConvJob job[kConvBatchJobs];
  int count;
};
static_assert(sizeof(ConvBatch) <= 4000, "a batch's job table must fit in the 4 KiB of kernel arguments");

__global__ void __launch_bounds__(kThreads, kBatchColumnBlocksPerSm)
    ConvPixelBatchKernel(const __grid_constant__ ConvBatch batch) {
  AwaitPriorGrids();
  const ConvJob& job = JobOfBlock(batch.job, batch.count, blockIdx.x, &ConvJob::first_block);
  ConvPixelBlock<1>(job.x, job.plan, job.T, job.tickets, static_cast<unsigned>(blockIdx.x - job.first_block));
}

__global__ void __launch_bounds__(kThreads) ConvRowTapBatchKernel(const __grid_constant__ ConvBatch batch) {
  AwaitPriorGrids();
  const ConvJob& job = JobOfBlock(batch.job, batch.count, blockIdx.x, &ConvJob::first_block2);
  ConvRowTapBlock(job.T, job.plan, job.per_block, job.count, job.has_bias, job.out,
                  int64_t{blockIdx.x} - job.first_block2);
}

// Phases 2a and 2b for a class whose U does not fit in shared memory (kh * W > 4096): U in
// scratch, one launch each.
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

template <bool kSquare>
void LaunchColumnReduce(bool programmatic, Finish kind, dim3 grid, cudaStream_t stream, const float* x,
                        const ColumnPlan& plan, double* partial, const FinishArgs& args) {
  if (kind == Finish::kMeanSquare) {
    LaunchAwaiting(programmatic, ColumnReduceKernel<kSquare, Finish::kMeanSquare>, grid, stream, x, plan, partial, args);
  } else if (kind == Finish::kNormGrad) {
    LaunchAwaiting(programmatic, ColumnReduceKernel<kSquare, Finish::kNormGrad>, grid, stream, x, plan, partial, args);
  } else {
    LaunchAwaiting(programmatic, ColumnReduceKernel<kSquare, Finish::kPartials>, grid, stream, x, plan, partial, args);
  }
}

template <bool kSquare>
void LaunchPlaneReduce(bool programmatic, Finish kind, unsigned blocks, cudaStream_t stream, const float* x,
                       const PlanePlan& plan, double* partial, const FinishArgs& args) {
  if (kind == Finish::kMeanSquare) {
    LaunchAwaiting(programmatic, PlaneReduceKernel<kSquare, Finish::kMeanSquare>, dim3(blocks), stream, x, plan, partial, args);
  } else if (kind == Finish::kNormGrad) {
    LaunchAwaiting(programmatic, PlaneReduceKernel<kSquare, Finish::kNormGrad>, dim3(blocks), stream, x, plan, partial, args);
  } else {
    LaunchAwaiting(programmatic, PlaneReduceKernel<kSquare, Finish::kPartials>, dim3(blocks), stream, x, plan, partial, args);
  }
}

// What a batch needs of a plan: its blocks, its partials and its ticket counters (one per
// group of several blocks), as ReduceKept sizes them for the plan's own launch.
struct BatchNeeds {
  int64_t blocks, partials, tickets;
};
BatchNeeds NeedsOf(const ColumnPlan& p) {
  return {p.col_tiles * p.slices, p.slices * p.kept, p.slices > 1 ? p.col_tiles : 0};
}
BatchNeeds NeedsOf(const PlanePlan& p) { return {p.parts * p.kept, p.parts * p.kept, p.parts > 1 ? p.kept : 0}; }

ColumnPlan PlanOf(const FactorJob& j, ColumnPlan*) { return MakeColumnPlan(j.outer, j.kept); }
PlanePlan PlanOf(const FactorJob& j, PlanePlan*) { return MakePlanePlan(j.outer, j.kept, j.inner); }

void LaunchBatch(bool programmatic, cudaStream_t stream, unsigned blocks, const ReduceBatch<ColumnPlan>& batch) {
  LaunchAwaiting(programmatic, ColumnBatchKernel, dim3(blocks), stream, batch);
}
void LaunchBatch(bool programmatic, cudaStream_t stream, unsigned blocks, const ReduceBatch<PlanePlan>& batch) {
  LaunchAwaiting(programmatic, PlaneBatchKernel, dim3(blocks), stream, batch);
}

// A conv patch factor that a batch runs (ConvPixelBatchKernel, ConvRowTapBatchKernel): one
// pixel per phase-1 thread, something to read, and U of a class in shared memory.
bool ConvBatchable(const ConvPlan& plan) {
  const int64_t line = plan.kh * plan.W;
  return plan.unit == 1 && plan.pixels > 0 && plan.parts > 0 && line > 0 && line <= kRowTapShared;
}

// The batch kinds; kNone: the job runs its own launches.
enum class BatchKind { kNone, kColumn, kPlane, kConv };

// Which batch a job joins, if any: the mean squares with something to read and the conv
// patch factors of the usual shapes, unless the grid of the job's own (first) launch is
// larger than PlanTuning::batch_job_max_blocks.
BatchKind BatchKindOf(const FactorJob& j) {
  int64_t blocks = 0;
  BatchKind kind = BatchKind::kNone;
  if (j.op == FactorOp::kMeanSquare && j.outer > 0 && j.kept > 0 && j.inner > 0) {
    if (j.inner == 1) {
      kind = BatchKind::kColumn;
      blocks = NeedsOf(MakeColumnPlan(j.outer, j.kept)).blocks;
    } else {
      kind = BatchKind::kPlane;
      blocks = NeedsOf(MakePlanePlan(j.outer, j.kept, j.inner)).blocks;
    }
  } else if (j.op == FactorOp::kConv2dPatch) {
    const ConvPlan plan = MakeConvPlan(j.conv);
    if (!ConvBatchable(plan)) return BatchKind::kNone;
    kind = BatchKind::kConv;
    blocks = CeilDiv(plan.pixels, int64_t{kThreads}) * plan.parts;
  }
  return blocks <= Tuning().batch_job_max_blocks ? kind : BatchKind::kNone;
}

}  // namespace

cudaError_t FactorKernelPtxVersion(int* version) {
  cudaFuncAttributes attributes;
  const cudaError_t error = cudaFuncGetAttributes(&attributes, ColumnBatchKernel);
  if (error == cudaSuccess) *version = attributes.ptxVersion;
  return error;
}

template <typename Plan>
void CudaBackend::LaunchFactorBatch(const FactorJob* const* jobs, size_t count) {
  const bool programmatic = programmatic_launch_ && Tuning().programmatic_launch;
  ReduceBatch<Plan> batch{};
  batch.count = static_cast<int>(count);
  int64_t blocks = 0, partials = 0, tickets = 0;
  int64_t partial_at[kBatchJobs], ticket_at[kBatchJobs];
  for (size_t i = 0; i < count; ++i) {
    const FactorJob& j = *jobs[i];
    ReduceJob<Plan>& r = batch.job[i];
    r.x = j.x;
    r.plan = PlanOf(j, static_cast<Plan*>(nullptr));
    r.finish.divisor = j.divisor;
    r.finish.has_appended = j.has_appended;
    r.finish.appended = j.appended;
    r.finish.out = j.out;
    const BatchNeeds needs = NeedsOf(r.plan);
    r.first_block = blocks;
    blocks += needs.blocks;
    partial_at[i] = partials;
    partials += needs.partials;
    ticket_at[i] = needs.tickets > 0 ? tickets : -1;
    tickets += needs.tickets;
  }
  const unsigned grid = GridSize(blocks);
  double* scratch = static_cast<double*>(Scratch(static_cast<size_t>(partials) * sizeof(double)));
  unsigned* counters = tickets > 0 ? Tickets(static_cast<size_t>(tickets)) : nullptr;
  for (size_t i = 0; i < count; ++i) {
    batch.job[i].partial = scratch + partial_at[i];
    batch.job[i].finish.tickets = ticket_at[i] >= 0 ? counters + ticket_at[i] : nullptr;
  }
  LaunchBatch(programmatic, stream_, grid, batch);
}

int64_t CudaBackend::ReduceKept(ReduceOp op, const float* x, index_t outer, index_t kept, index_t inner,
                                Finish finish, FinishArgs args, double** partial) {
  *partial = nullptr;
  if (outer <= 0 || kept <= 0 || inner <= 0) return 0;
  const bool square = op == ReduceOp::kSquare;
  const bool programmatic = programmatic_launch_ && Tuning().programmatic_launch;
  if (inner == 1) {
    const ColumnPlan plan = MakeColumnPlan(outer, kept);
    double* out = static_cast<double*>(Scratch(static_cast<size_t>(plan.slices * kept) * sizeof(double)));
    if (finish != Finish::kPartials && plan.slices > 1) args.tickets = Tickets(static_cast<size_t>(plan.col_tiles));
    const dim3 grid(GridSize(plan.col_tiles), static_cast<unsigned>(plan.slices));
    if (square) {
      LaunchColumnReduce<true>(programmatic, finish, grid, stream_, x, plan, out, args);
    } else {
      LaunchColumnReduce<false>(programmatic, finish, grid, stream_, x, plan, out, args);
    }
    *partial = out;
    return plan.slices;
  }
  const PlanePlan plan = MakePlanePlan(outer, kept, inner);
  const unsigned blocks = GridSize(plan.parts * kept);
  double* out = static_cast<double*>(Scratch(static_cast<size_t>(blocks) * sizeof(double)));
  if (finish != Finish::kPartials && plan.parts > 1) args.tickets = Tickets(static_cast<size_t>(kept));
  if (square) {
    LaunchPlaneReduce<true>(programmatic, finish, blocks, stream_, x, plan, out, args);
  } else {
    LaunchPlaneReduce<false>(programmatic, finish, blocks, stream_, x, plan, out, args);
  }
  *partial = out;
  return plan.parts;
}

void CudaBackend::MeanSquareFactor(const float* x, index_t outer, index_t kept, index_t inner, double count,
                                   bool has_appended, float appended, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  FinishArgs finish;
  finish.divisor = count;
  finish.has_appended = has_appended;
  finish.appended = appended;
  finish.out = out;
  double* partial = nullptr;
  const int64_t rows = ReduceKept(ReduceOp::kSquare, x, outer, kept, inner, Finish::kMeanSquare, finish, &partial);
  if (rows > 0) return;  // the reduction wrote every entry
  // Nothing to read: every entry is 0.
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
  const int64_t rows = ReduceKept(ReduceOp::kValue, x, outer, kept, inner, Finish::kPartials, FinishArgs{}, &partial);
  NormInputFinalizeKernel<<<1, kThreads, 0, stream_>>>(partial, rows, kept < 0 ? 0 : kept, u_divisor, batch, out);
  ADAFISHER_CUDA_LAUNCH_CHECK();
}

void CudaBackend::NormGradFactor(const float* x, index_t outer, index_t kept, index_t inner, double batch,
                                 float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  FinishArgs finish;
  finish.divisor = batch;
  finish.out = out;
  double* partial = nullptr;
  const int64_t rows = ReduceKept(ReduceOp::kValue, x, outer, kept, inner, Finish::kNormGrad, finish, &partial);
  if (rows > 0 || kept <= 0) return;
  NormGradFinalizeKernel<<<TilesFor(kept), kThreads, 0, stream_>>>(partial, rows, kept, batch, out);
  ADAFISHER_CUDA_LAUNCH_CHECK();
}

template <>
void CudaBackend::LaunchFactorBatch<ConvPlan>(const FactorJob* const* jobs, size_t count) {
  const bool programmatic = programmatic_launch_ && Tuning().programmatic_launch;
  ConvBatch batch{};
  batch.count = static_cast<int>(count);
  int64_t blocks = 0, blocks2 = 0, tickets = 0;
  size_t t_bytes = 0;
  size_t t_at[kConvBatchJobs];
  int64_t ticket_at[kConvBatchJobs];
  for (size_t i = 0; i < count; ++i) {
    const FactorJob& j = *jobs[i];
    ConvJob& c = batch.job[i];
    c.x = j.x;
    c.plan = MakeConvPlan(j.conv);
    const ConvPlan& plan = c.plan;
    const int64_t line = plan.kh * plan.W;
    c.per_block = std::clamp<int64_t>(kThreads / line, 1, kRowTapShared / line);
    c.count = static_cast<double>(j.conv.batch) * static_cast<double>(j.conv.out_h) * static_cast<double>(j.conv.out_w);
    c.out = j.out;
    c.has_bias = j.has_appended;
    const int64_t tiles = CeilDiv(plan.pixels, int64_t{kThreads});  // plan.unit == 1
    c.first_block = blocks;
    blocks += tiles * plan.parts;
    c.first_block2 = blocks2;
    blocks2 += CeilDiv(plan.cg, c.per_block);
    t_at[i] = t_bytes;
    t_bytes += AlignUp(static_cast<size_t>(plan.parts * plan.pixels) * sizeof(double));
    ticket_at[i] = plan.parts > 1 ? tickets : -1;
    tickets += plan.parts > 1 ? tiles : 0;
  }
  const unsigned grid = GridSize(blocks), grid2 = GridSize(blocks2);
  char* scratch = static_cast<char*>(Scratch(t_bytes));
  unsigned* counters = tickets > 0 ? Tickets(static_cast<size_t>(tickets)) : nullptr;
  for (size_t i = 0; i < count; ++i) {
    batch.job[i].T = reinterpret_cast<double*>(scratch + t_at[i]);
    batch.job[i].tickets = ticket_at[i] >= 0 ? counters + ticket_at[i] : nullptr;
  }
  LaunchAwaiting(programmatic, ConvPixelBatchKernel, dim3(grid), stream_, batch);
  LaunchAwaiting(programmatic, ConvRowTapBatchKernel, dim3(grid2), stream_, batch);
}

void CudaBackend::Conv2dPatchFactor(const float* x, const Conv2dShape& shape, bool has_bias, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  const ConvPlan plan = MakeConvPlan(shape);
  const bool programmatic = programmatic_launch_ && Tuning().programmatic_launch;
  const int64_t copies = plan.parts > 0 ? plan.parts : 1;
  const int64_t line = plan.kh * plan.W;  // U entries of one class
  const bool fused = line <= kRowTapShared;
  const size_t t_bytes = AlignUp(static_cast<size_t>(copies * plan.pixels) * sizeof(double));
  const size_t u_bytes = fused ? 0 : AlignUp(static_cast<size_t>(plan.row_items()) * sizeof(double));
  char* scratch = static_cast<char*>(Scratch(t_bytes + u_bytes + 256));
  double* T = reinterpret_cast<double*>(scratch);
  double* U = reinterpret_cast<double*>(scratch + t_bytes);

  if (plan.pixels > 0) {
    if (plan.parts > 0) {
      const int64_t tiles = CeilDiv(plan.pixels, int64_t{kThreads} * plan.unit);
      unsigned* tickets = plan.parts > 1 ? Tickets(static_cast<size_t>(tiles)) : nullptr;
      const unsigned blocks = GridSize(tiles * plan.parts);
      LaunchAwaiting(programmatic, plan.unit == 4 ? ConvPixelKernel<4> : ConvPixelKernel<1>, dim3(blocks), stream_, x,
                     plan, T, tickets);
    } else {
      // No (n, g) pairs (batch 0): every pixel sum is zero.
      ADAFISHER_CUDA_CHECK(cudaMemsetAsync(T, 0, static_cast<size_t>(plan.pixels) * sizeof(double), stream_));
    }
  }
  const double count = static_cast<double>(shape.batch) * static_cast<double>(shape.out_h) *
                       static_cast<double>(shape.out_w);
  const int64_t items = plan.tap_items() + (has_bias ? 1 : 0);
  if (fused) {
    if (items <= 0) return;
    // About one U entry per thread, and no more than shared memory holds.
    const int64_t per_block = line > 0 ? std::clamp<int64_t>(kThreads / line, 1, kRowTapShared / line) : 1;
    const int64_t blocks = plan.cg > 0 ? CeilDiv(plan.cg, per_block) : 1;
    LaunchAwaiting(programmatic, ConvRowTapKernel, dim3(GridSize(blocks)), stream_, T, plan, per_block, count,
                   has_bias, out);
    return;
  }
  if (plan.row_items() > 0) {
    ConvRowKernel<<<BlocksFor(plan.row_items()), kThreads, 0, stream_>>>(T, plan, U);
    ADAFISHER_CUDA_LAUNCH_CHECK();
  }
  if (items > 0) {
    ConvTapKernel<<<BlocksFor(items), kThreads, 0, stream_>>>(U, plan, count, has_bias, out);
    ADAFISHER_CUDA_LAUNCH_CHECK();
  }
}

void CudaBackend::FactorJobs(const FactorJob* jobs, size_t count) {
  // The jobs go into batches by plan kind (NOTE: [batched factor launch]); every other job,
  // and a kind with a single job, runs its own launches.
  std::vector<const FactorJob*> columns, planes, convs;
  for (size_t i = 0; i < count; ++i) {
    const FactorJob& j = jobs[i];
    switch (BatchKindOf(j)) {
      case BatchKind::kColumn: columns.push_back(&j); break;
      case BatchKind::kPlane: planes.push_back(&j); break;
      case BatchKind::kConv: convs.push_back(&j); break;
      case BatchKind::kNone: RunFactorJob(j); break;
    }
  }
  for (std::vector<const FactorJob*>* kind : {&columns, &planes, &convs}) {
    if (kind->size() == 1) RunFactorJob(*kind->front());
    if (kind->size() <= 1) kind->clear();
  }
  if (columns.empty() && planes.empty() && convs.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Activate();
  for (size_t i = 0; i < columns.size(); i += kBatchJobs) {
    LaunchFactorBatch<ColumnPlan>(columns.data() + i, std::min<size_t>(kBatchJobs, columns.size() - i));
  }
  for (size_t i = 0; i < planes.size(); i += kBatchJobs) {
    LaunchFactorBatch<PlanePlan>(planes.data() + i, std::min<size_t>(kBatchJobs, planes.size() - i));
  }
  for (size_t i = 0; i < convs.size(); i += kConvBatchJobs) {
    LaunchFactorBatch<ConvPlan>(convs.data() + i, std::min<size_t>(kConvBatchJobs, convs.size() - i));
  }
}

}  // namespace cuda
}  // namespace adafisher
