// Host-side planning shared by the CUDA launchers and the parity harness: how a list of
// tensors is cut into (tensor, chunk) blocks for the multi-tensor kernels, and the grid
// shapes of the factor reductions. Plain C++17, no CUDA headers.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

#include "core/backend.h"

namespace adafisher {
namespace cuda {

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// NOTE: [multi-tensor launch]
// The step touches every parameter tensor of the model in one native call. Following
// PyTorch's MultiTensorApply.cuh, each tensor is cut into chunks of kChunkElements and one
// CUDA block processes one (tensor, chunk) pair. Unlike PyTorch, the per-block map of
// (tensor, chunk) pairs does not travel in the kernel arguments (4 KiB: about 480 blocks,
// so a model of more than 31 M parameters needed several launches, the last one often a
// few blocks on an otherwise idle GPU): it is written into the device table that the step
// uploads anyway (per-tensor descriptors, guard ranges, factor segments), one 8-byte
// BlockSlot per block. So the update is ONE launch for every parameter of the model,
// whatever its size and tensor count, and the guard one more. A block reads its slot, then
// its descriptor: two small loads, against the 1.3 MB its chunk moves. Empty tensors get
// no block.
constexpr int64_t kChunkElements = 65536;
constexpr int kStepThreads = 512;  // 512 threads x 4 floats = 2048 elements per sweep

struct BlockSlot {
  int32_t tensor;
  int32_t chunk;
};
static_assert(sizeof(BlockSlot) == 8 && alignof(BlockSlot) <= 16, "BlockSlot: 8 bytes, placed at 16-byte offsets");

// The number of blocks that cover tensors [0, tensor_count) of sizes numel(t): the grid of
// one multi-tensor launch. Throws when it would exceed a grid's 2^31 - 1 blocks (2^47
// elements) or a tensor index would not fit in int32.
template <typename NumelFn>
int64_t CountBlocks(size_t tensor_count, NumelFn&& numel) {
  if (tensor_count > static_cast<size_t>(INT32_MAX)) {
    throw BackendError(ErrorCode::kInvalidArgument, "too many tensors for one multi-tensor launch");
  }
  int64_t blocks = 0;
  for (size_t t = 0; t < tensor_count; ++t) {
    const int64_t n = static_cast<int64_t>(numel(t));
    if (n < 0) throw BackendError(ErrorCode::kInvalidArgument, "negative tensor size in a multi-tensor launch");
    blocks += CeilDiv(n, kChunkElements);
    if (blocks > INT32_MAX) {
      throw BackendError(ErrorCode::kInvalidArgument, "too many elements for one multi-tensor launch");
    }
  }
  return blocks;
}

// Writes the block map of CountBlocks(tensor_count, numel) blocks: every (tensor, chunk) in
// tensor order, then chunk order.
template <typename NumelFn>
void PlanBlocks(size_t tensor_count, NumelFn&& numel, BlockSlot* out) {
  for (size_t t = 0; t < tensor_count; ++t) {
    const int64_t chunks = CeilDiv(static_cast<int64_t>(numel(t)), kChunkElements);
    for (int64_t c = 0; c < chunks; ++c) *out++ = BlockSlot{static_cast<int32_t>(t), static_cast<int32_t>(c)};
  }
}

// ---------------------------------------------------------------------------------------
// NOTE: [plan tuning]
// The constants that shape the factor reductions' grids. The product always uses these
// defaults, so the grids (and therefore the sums, bit for bit) are a function of the
// tensor shape only. The parity harness's --bench sweeps them on a real GPU (test/native,
// "tune" lines) to find the fastest; nothing else may change them.
struct PlanTuning {
  // Plane plan: elements each thread reads at least, and the most blocks per launch.
  int64_t plane_min_per_thread = 16;
  int64_t plane_max_blocks = 4096;
  // Plane plan: read runs of 4 (16-byte loads) when inner is a multiple of 4.
  bool plane_quads = true;
  // Conv plan: about this many pixels (threads x unit) in phase 1 when one copy of T is too
  // small, and whether a thread reads 4 adjacent pixels (16-byte loads) where it can. The
  // sums are the same bits either way: parts depend on conv_threads only.
  int64_t conv_threads = int64_t{1} << 18;
  bool conv_quads = false;
  // Launch the factor kernels with programmatic stream serialization where the device and
  // the kernels' image allow it (compute capability 9.0+). Timing only: same bits either way.
  bool programmatic_launch = true;
  // A job of a factor batch whose own launch would have more blocks than this runs alone
  // (NOTE: [batched factor launch]): a grid that fills the GPU by itself gains little from
  // sharing a launch, and the batch kernels run fewer blocks per SM. Timing only: same bits.
  int64_t batch_job_max_blocks = INT64_MAX;
};
inline PlanTuning& Tuning() {
  static PlanTuning tuning;
  return tuning;
}

// ---------------------------------------------------------------------------------------
// Factor reductions: x viewed as [outer, kept, inner], sums over (outer, inner) for each
// kept index b. Both plans write double partial sums partial[s * kept + b], s < rows(),
// which a finalize kernel adds in s order. Every shape is a function of the tensor shape
// only (never of the device), so results are bit-identical on every GPU and every run.
constexpr int kReduceThreads = 256;

// inner == 1: columns of a row-major [outer, kept] matrix. A block owns `cols` adjacent
// columns and a slice of rows; thread t reads column t % cols of rows t / cols, t / cols +
// step, ... so that a warp reads whole 128-byte row segments (or several short rows).
struct ColumnPlan {
  int64_t outer = 0, kept = 0;
  int cols = 1;             // columns per block (<= 64)
  int step = 1;             // rows read per sweep = kReduceThreads / cols
  int64_t col_tiles = 0;    // grid.x
  int64_t slices = 0;       // grid.y (<= 2048 / col_tiles, so <= 65535)
  int64_t rows_per_slice = 0;
  ADAFISHER_HD int64_t rows() const { return slices; }
};

inline ColumnPlan MakeColumnPlan(int64_t outer, int64_t kept) {
  ColumnPlan p;
  p.outer = outer;
  p.kept = kept;
  if (outer <= 0 || kept <= 0) return p;  // nothing to read: rows() == 0
  p.cols = static_cast<int>(std::min<int64_t>(kept, 64));
  p.step = kReduceThreads / p.cols;
  p.col_tiles = CeilDiv(kept, p.cols);
  const int64_t max_slices = std::max<int64_t>(1, 2048 / p.col_tiles);
  // At least 8 sweeps per thread: enough loads in flight per block to amortize its reduction.
  const int64_t slices = std::clamp<int64_t>(CeilDiv(outer, int64_t{p.step} * 8), 1, max_slices);
  p.rows_per_slice = CeilDiv(CeilDiv(outer, slices), p.step) * p.step;
  p.slices = CeilDiv(outer, p.rows_per_slice);
  return p;
}

// inner > 1: x[a, b, :] is a contiguous run of `inner` values. The (a, c) space of one b
// (outer * inner values) is read in units of `unit` consecutive values (4 when inner is a
// multiple of 4: one 16-byte load where x is 16-byte aligned, and the same 4 adds in the
// same order where it is not; else 1), and its units are cut into `parts` contiguous
// spans; block (part, b) sums one span with consecutive threads on consecutive units.
struct PlanePlan {
  int64_t outer = 0, kept = 0, inner = 0;
  int64_t unit = 1;   // values per unit: 4 or 1
  int64_t parts = 0;  // grid.x = parts * kept
  int64_t span = 0;   // units of the (a, c) space per part
  ADAFISHER_HD int64_t rows() const { return parts; }
};

inline PlanePlan MakePlanePlan(int64_t outer, int64_t kept, int64_t inner) {
  PlanePlan p;
  p.outer = outer;
  p.kept = kept;
  p.inner = inner;
  if (outer <= 0 || kept <= 0 || inner <= 0) return p;  // nothing to read: rows() == 0
  const int64_t work = outer * inner;
  const PlanTuning& t = Tuning();
  p.unit = t.plane_quads && inner % 4 == 0 ? 4 : 1;
  const int64_t units = work / p.unit;
  const int64_t max_parts = std::max<int64_t>(1, t.plane_max_blocks / kept);
  const int64_t parts =
      std::clamp<int64_t>(CeilDiv(work, int64_t{kReduceThreads} * t.plane_min_per_thread), 1, max_parts);
  p.span = CeilDiv(units, parts);
  p.parts = CeilDiv(units, p.span);
  return p;
}

// ---------------------------------------------------------------------------------------
// Conv2d patch factor (see NOTE: [conv patch factor] in factor_kernels.cu).
struct ConvPlan {
  int64_t N = 0, C = 0, H = 0, W = 0, kh = 1, kw = 1, sh = 1, sw = 1, pt = 0, pl = 0, OH = 0, OW = 0;
  int64_t groups = 1, cg = 0;
  int64_t pixels = 0;  // Q = cg * H * W: entries of the per-class pixel sums T
  int64_t planes = 0;  // N * groups: the (n, g) pairs that add into one T entry
  int64_t parts = 0;   // T is computed in `parts` partial copies over ranges of (n, g)
  int64_t span = 0;    // (n, g) pairs per part
  int64_t unit = 1;    // pixels per phase-1 thread: 4 adjacent ones (see ConvQuadSum) or 1
  bool nhwc = false;
  bool channel_major = true;
  ADAFISHER_HD int64_t row_items() const { return cg * kh * W; }   // phase 2a: U entries
  ADAFISHER_HD int64_t tap_items() const { return cg * kh * kw; }  // phase 2b: K outputs
};

inline ConvPlan MakeConvPlan(const Conv2dShape& s) {
  ConvPlan p;
  p.N = s.batch, p.C = s.channels, p.H = s.height, p.W = s.width;
  p.kh = s.kernel_h, p.kw = s.kernel_w, p.sh = s.stride_h, p.sw = s.stride_w;
  p.pt = s.pad_top, p.pl = s.pad_left, p.OH = s.out_h, p.OW = s.out_w;
  p.groups = s.groups;
  p.cg = s.groups > 0 ? s.channels / s.groups : 0;
  p.pixels = p.cg * p.H * p.W;
  p.planes = p.N * p.groups;
  p.nhwc = s.format == DataFormat::kNHWC;
  p.channel_major = s.order == PatchOrder::kChannelMajor;
  // Quads never straddle an (n, g) block of x: NCHW blocks are cg*H*W pixels, NHWC runs cg.
  p.unit = Tuning().conv_quads && (p.nhwc ? p.cg % 4 == 0 : p.pixels % 4 == 0) && p.pixels > 0 ? 4 : 1;
  if (p.pixels > 0 && p.planes > 0) {
    // About 2^18 threads in phase 1 when one copy of T is too small to fill the GPU; at most
    // 2^18 parts (ConvPixelKernel indexes them in 32 bits).
    const int64_t most = std::min<int64_t>(p.planes, int64_t{1} << 18);
    p.parts = std::clamp<int64_t>(CeilDiv(std::max<int64_t>(Tuning().conv_threads, 1), p.pixels), 1, most);
    p.span = CeilDiv(p.planes, p.parts);
    p.parts = CeilDiv(p.planes, p.span);
  }
  return p;
}

}  // namespace cuda
}  // namespace adafisher
