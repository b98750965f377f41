// nm_optim: the fused SGD step, shared declarations (torch-free).
//
// The kernels see raw pointers, sizes and scalars only, so the extension builds without
// torch and works with any torch version. The Python layer (nm_optim/_native.py) owns every
// allocation and builds the tables described below.
#pragma once

#include <cstdint>

namespace nm_optim {

// Element type of one bucket (param, grad and momentum buffer share it).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Hyper-parameters of one step, with torch.optim.SGD's names. Runtime values, never template
// arguments: a scheduler that changes lr every step must not recompile or re-dispatch anything.
struct SGDHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
};

// One bucket of tensors (one device, one dtype), laid out as the Python side builds it:
//   numel[n]                   element count of tensor i
//   table[4 * n]               rows of n int64: param ptr, grad ptr, momentum_buffer ptr, is_first
//                              (is_first = 1 where the buffer is created by this step: v' = d)
//   tiles[3 * n_tiles]         (tensor index, first element, end element) of each tile; at most
//                              tile_size elements, except that the tiles of a tensor with a
//                              "cols" track hold whole rows (see nm_optim/_native.py)
// Tiles are the unit of parallel work (an OpenMP iteration, a CUDA block). The layout is
// cached per bucket and rebuilt only when the set of params changes.
struct BucketView {
  int64_t n_tensors;
  const int64_t* numel;
  const int64_t* table;
  int64_t n_tiles;
  const int64_t* tiles;
  int64_t tile_size;
};

// Optional AMP inputs set by torch.amp.GradScaler (nullptr when absent):
//   grad_scale: g = grad / *grad_scale, and the quotient is written back to the grad (torch's
//               fused SGD does: the grads are left unscaled); without it grads are only read.
//   found_inf:  when *found_inf != 0 nothing is written (grads included).
struct AmpView {
  const float* grad_scale;
  const float* found_inf;
};

// Tracks: the statistics to reduce in the same pass (nm_optim/tracks.py). For tensor i:
//   geom[3 * i + 0..2]     d0 = size(0), d1 = size(1), rest = product of sizes(2:) (1 if absent)
//   offsets[3 * i + 0..2]  first output group of its "rows" (d0 groups), "cols" (d1 groups) and
//                          "all" (1 group) track, -1 when the tensor has no track of that axis
//   out[group * 9 + k]     the 9 sums (Stat order, sgd_math.h) of the pre-step p, g, v, float64.
//   sums[i]                which of them tensor i's groups hold: a bit mask (bit k: Stat k), all
//                          9 (0x1ff) or the 6 products (kProductSums); the other columns of its
//                          groups are written NaN. nullptr: all 9 for every tensor.
// Only the groups of tracked tensors are written; reductions are deterministic for a given
// thread count (per-thread partials combined in a fixed order, no atomics).
struct StatsView {
  const int64_t* geom;
  const int64_t* offsets;
  double* out;  // nullptr: no statistics
  const int64_t* sums = nullptr;
};

// CPU (OpenMP + SIMD). num_threads <= 0 means the OpenMP default.
void sgd_step_cpu(DType dtype, const BucketView& bucket, const SGDHyper& hyper,
                  const AmpView& amp, const StatsView& stats, int num_threads);

// Whether the CPU kernel runs its fused variant (one rounding per multiply-add, as torch's AVX2 /
// AVX512 CPU kernels) or the unfused one (two, as torch's DEFAULT kernels); see sgd_math.h.
bool sgd_cpu_fused_variant();
// Whether float32 / float64 tensors with a "cols" track run the AVX-512 statistics kernel (the
// CPU has AVX-512 F/VL/DQ/BW, the fused variant runs, and NM_OPTIM_NO_AVX512 is not set).
bool sgd_cpu_avx512_stats();

// CUDA statistics: tracked tensors are stepped by their own kernel over 2-D tiles (kStatsTileRows
// rows x kStatsTileCols row elements of the [d0, d1 * rest] view), which writes the partial sums
// a track needs to `scratch`; a second kernel adds them up in a fixed order (deterministic, no
// atomics). The tables are nm_optim/ops/plan.py's StatsPlan, shared with the Triton kernels:
//   tiles[8 * n_tiles]   (tensor, row block rb, column block cb, d0, rowlen, row_base, col_base,
//                        slot); bases and slot in units of 9 doubles, -1 when not needed. The
//                        row partial of (row r, cb) is at row_base + cb * d0 + r, the column
//                        partial of (rb, column c) at col_base + rb * rowlen + c, the tile's
//                        total at slot.
//   runs[3 * n_runs]     (first tile, count, variant) in HOST memory: the tiles in runs of one
//                        kernel variant each (one launch per run), variant = kRunCols (the
//                        tiles write column partials) | kRunProducts (their tensors' groups hold
//                        only the 6 product sums, kProductSums: the tiles reduce and write those).
//   tasks[6 * n_tasks]   (base, count, inner, outer, output row, sums): partial j of the task is
//                        at base + (j / inner) * outer + j % inner; the sum of its `count`
//                        partials is the group's row of `out`, in the columns of the bit mask
//                        `sums` (bit k: Stat k); the other columns are written NaN.
constexpr int kStatsTileRows = 128;
constexpr int kStatsTileCols = 128;
constexpr int64_t kRunCols = 1;
constexpr int64_t kRunProducts = 2;

struct CudaStatsView {
  const int64_t* tiles;
  int64_t n_tiles;
  double* scratch;
  const int64_t* tasks;
  int64_t n_tasks;
  double* out;  // nullptr: no statistics
  const int64_t* runs = nullptr;  // host memory
  int64_t n_runs = 0;
};

#ifdef NM_OPTIM_WITH_CUDA
// CUDA: every pointer in `bucket` (numel, table, tiles) and in `amp` lives on the device.
// lr_device, when not null, points at a float32 device scalar that overrides hyper.lr (a
// tensor lr that a scheduler may change without a host sync). One launch per call.
// Returns an empty string on success, else the CUDA error message.
// With stats.out set, the tensors of stats.tiles (absent from bucket.tiles) are stepped by the
// statistics kernel: three launches per bucket in all, whatever the number of tensors.
const char* sgd_step_cuda(DType dtype, const BucketView& bucket, const SGDHyper& hyper,
                          const AmpView& amp, const float* lr_device, const CudaStatsView& stats,
                          std::uintptr_t stream);
int cuda_device_count();
#endif

}  // namespace nm_optim
