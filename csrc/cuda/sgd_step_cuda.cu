// nm_optim: the fused SGD step on CUDA. One launch per bucket: block k handles tile k of the
// bucket's tile table (BucketView in sgd_step.h), so launches do not grow with the number of
// tensors. Each element is read once (p, g, v) and written once (p, v): 20 bytes per fp32 element
// with momentum, the floor. 16-byte vector loads where the three pointers allow it.
//
// Hyper-parameters are kernel arguments (lr may also come from a device scalar, so a scheduler
// holding lr in a tensor neither syncs nor re-launches anything different). Built whenever nvcc
// is found, with the runtime linked statically, so the module imports on machines without a GPU.
//
// The arithmetic is torch's fused CUDA SGD (SGD(fused=True) on CUDA: FusedSgdKernel.cu,
// sgd_math), expression by expression (sgd_math.h, sgd_update_cuda): opmath values, double
// hyper-parameters, so each expression is evaluated in double and rounded to opmath when
// assigned; nvcc contracts a * b + c into fma by default (-fmad=true), as when torch is built,
// so the same expressions get the same contractions. The gradient is unscaled and negated as
// torch does (g /= (double)grad_scale; g *= -1.0) before the statistics see it, and with a scale
// the unscaled gradient is written back to the grad, before the sign, as torch's kernel stores
// it (grads are only read without a scale). Not run here
// (no GPU on the development machines): the Triton kernels, which spell the same contractions
// out with tl.fma, are checked bitwise against an emulation of it (tests/test_bitwise.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "../sgd_math.h"
#include "../sgd_step.h"

namespace nm_optim {
namespace {

constexpr int kThreads = 256;

template <typename T> struct CudaStorage {
  using compute = float;
};
template <> struct CudaStorage<float> {
  using compute = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct CudaStorage<double> {
  using compute = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <> struct CudaStorage<__half> {
  using compute = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct CudaStorage<__nv_bfloat16> {
  using compute = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T x[N];
};

// The step's scalars as torch's fused kernel takes them, and how it forms g from the gradient.
struct CudaScalars {
  FusedScalars f;
  const float* grad_scale;  // nullptr: no AMP scale
  bool maximize;
};

// torch: g = (opmath)grad; if (grad_scale) { g /= (double)*grad_scale; grad = g; } and then
// if (maximize) g *= -1.0: the grad written back is the unscaled one, before the sign.
template <typename C>
__device__ __forceinline__ C unscaled(C g, const CudaScalars& s) {
  if (s.grad_scale != nullptr) g /= static_cast<double>(*s.grad_scale);
  return g;
}
template <typename C>
__device__ __forceinline__ C with_sign(C g, const CudaScalars& s) {
  if (s.maximize) g *= -1.0;
  return g;
}

template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
__device__ __forceinline__ void step_tile(T* __restrict__ p, T* __restrict__ g,
                                          T* __restrict__ v, int64_t len, const CudaScalars& s) {
  using S = CudaStorage<T>;
  using C = typename S::compute;
  constexpr int kVec = 16 / sizeof(T);
  using P = Pack<T, kVec>;
  const bool aligned = (reinterpret_cast<std::uintptr_t>(p) % 16 == 0) &&
                       (reinterpret_cast<std::uintptr_t>(g) % 16 == 0) &&
                       (!MOM || reinterpret_cast<std::uintptr_t>(v) % 16 == 0);
  const int64_t n_vec = aligned ? len / kVec : 0;
  for (int64_t j = threadIdx.x; j < n_vec; j += kThreads) {
    P pp = reinterpret_cast<const P*>(p)[j];
    P gg = reinterpret_cast<const P*>(g)[j];
    P vv;
    if (MOM && !FIRST) vv = reinterpret_cast<const P*>(v)[j];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      C pi = S::load(pp.x[e]);
      C vi = (MOM && !FIRST) ? S::load(vv.x[e]) : C(0);
      const C gi = unscaled(S::load(gg.x[e]), s);
      gg.x[e] = S::store(gi);
      sgd_update_cuda<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, with_sign(gi, s), vi, s.f);
      pp.x[e] = S::store(pi);
      if (MOM) vv.x[e] = S::store(vi);
    }
    reinterpret_cast<P*>(p)[j] = pp;
    if (s.grad_scale != nullptr) reinterpret_cast<P*>(g)[j] = gg;
    if (MOM) reinterpret_cast<P*>(v)[j] = vv;
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < len; i += kThreads) {
    C pi = S::load(p[i]);
    C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
    const C gi = unscaled(S::load(g[i]), s);
    if (s.grad_scale != nullptr) g[i] = S::store(gi);
    sgd_update_cuda<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, with_sign(gi, s), vi, s.f);
    p[i] = S::store(pi);
    if (MOM) v[i] = S::store(vi);
  }
}

// torch: double_lr = lr_ptr != nullptr ? *lr_ptr : lr (a float32 device lr, widened).
__device__ __forceinline__ CudaScalars step_scalars(const SGDHyper& h, const AmpView& amp,
                                                    const float* lr_device) {
  const double lr = lr_device != nullptr ? static_cast<double>(*lr_device) : h.lr;
  return CudaScalars{FusedScalars{lr, h.weight_decay, h.momentum, h.dampening}, amp.grad_scale,
                     h.maximize};
}

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV>
__global__ void __launch_bounds__(kThreads)
    sgd_step_kernel(BucketView b, SGDHyper h, AmpView amp, const float* lr_device) {
  // found_inf set by a GradScaler: the step is skipped, nothing is written.
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;
  const CudaScalars s = step_scalars(h, amp, lr_device);

  const int64_t k = blockIdx.x;
  const int64_t n = b.n_tensors;
  const int64_t t = b.tiles[3 * k];
  const int64_t begin = b.tiles[3 * k + 1];
  const int64_t len = b.tiles[3 * k + 2] - begin;
  T* p = reinterpret_cast<T*>(b.table[t]) + begin;
  T* g = reinterpret_cast<T*>(b.table[n + t]) + begin;
  T* v = MOM ? reinterpret_cast<T*>(b.table[2 * n + t]) + begin : nullptr;
  if (MOM && b.table[3 * n + t] != 0) {
    step_tile<T, HAS_WD, MOM, true, NESTEROV>(p, g, v, len, s);
  } else {
    step_tile<T, HAS_WD, MOM, false, NESTEROV>(p, g, v, len, s);
  }
}


// ---- statistics ---------------------------------------------------------------------------
// One 256-thread block per 2-D tile of a tracked tensor (the StatsPlan of nm_optim/ops/plan.py,
// see sgd_step.h): rows [rb * kTR, +kTR), row elements [cb * kTC, +kTC). The design mirrors the
// Triton kernel (nm_optim/ops/triton/kernels.py, stats_kernel), which the CPU tests run:
//
// - Each lane owns V consecutive elements of a row (TileLanes below): kLanes = kTC / V lanes
//   cover the tile's 128 row elements, a warp covers kRowsPerWarp rows at a time, the block
//   kRowsPerStep. A lane loads its V values of p, g, v into registers with 16-byte vector loads
//   (when the addresses and the row length allow; else element by element), steps them, stores
//   them, then adds their 9 terms: into its row sums (compute type) and, in the COLS variant,
//   into its V column accumulators (registers, over all the rows it visits).
// - A row's sums are added across its kLanes lanes with an xor butterfly (log2(kLanes) shuffles
//   per statistic, in the compute type); the row's first lane writes the row partial (float64)
//   and adds it to its float64 tile total.
// - Once per tile: column accumulators of the two rows of a warp are added (one shuffle), then
//   the 8 warps' are added in warp order through shared memory (in rounds, 18 KB), in float64,
//   into the column partials; the warps' tile totals are added in warp order into the slot.
// - COLS is a template switch: tiles with column partials come first in the plan and run the
//   variant with column accumulators; the others run the one without (fewer registers, more
//   blocks per SM, V = 8 elements per lane). Only the partials a track needs are written.
// - PRODUCTS is a template switch too: the tiles of tensors whose groups hold only the 6 product
//   sums (kProductSums: what the scale and rescale laws read) keep 6 row sums, 6 column
//   accumulators per element and 6 totals instead of 9 (Stats<PRODUCTS> below), and write only
//   those partials; the reduction writes the other columns NaN. The plan orders the tiles in
//   runs of one (COLS, PRODUCTS) variant each, one launch per run.
// Partial sums in the compute type: float64 params keep float64 statistics.
constexpr int kTR = kStatsTileRows;
constexpr int kTC = kStatsTileCols;
constexpr int kWarps = kThreads / 32;

// The statistics a variant reduces: kCount of them, Stat kFirst + k for k < kCount.
template <bool PRODUCTS> struct Stats {
  static constexpr int kFirst = PRODUCTS ? kPP : 0;
  static constexpr int kCount = kNumStats - kFirst;
};

template <typename T, bool COLS> struct TileLanes {
  static constexpr int V = (sizeof(T) == 8 || COLS) ? 4 : 8;  // elements per lane
  static constexpr int kChunk = (16 / sizeof(T)) < V ? (16 / sizeof(T)) : V;  // elements per vector access
  static constexpr int kLanes = kTC / V;                       // lanes per row: 32 or 16
  static constexpr int kRowsPerWarp = 32 / kLanes;
  static constexpr int kRowsPerStep = kWarps * kRowsPerWarp;
  static_assert(kLanes <= 32 && 32 % kLanes == 0 && V % kChunk == 0, "a row within a warp");
};

// The `valid` (0..V) first of a lane's V elements at src + i0, in the compute type (zeros beyond):
// kChunk-element vector loads when `vec` (16-byte aligned bases, rows of a multiple of kChunk
// elements) and the lane's elements are all valid.
template <typename T, int V, int kChunk>
__device__ __forceinline__ void load_lane(const T* __restrict__ src, int64_t i0, int valid, bool vec,
                                          typename CudaStorage<T>::compute (&x)[V]) {
  using S = CudaStorage<T>;
  using P = Pack<T, kChunk>;
  if (vec && valid == V) {
#pragma unroll
    for (int k = 0; k < V / kChunk; ++k) {
      const P pk = reinterpret_cast<const P*>(src + i0)[k];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) x[k * kChunk + e] = S::load(pk.x[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = e < valid ? S::load(src[i0 + e]) : typename S::compute(0);
  }
}

template <typename T, int V, int kChunk>
__device__ __forceinline__ void store_lane(T* __restrict__ dst, int64_t i0, int valid, bool vec,
                                           const typename CudaStorage<T>::compute (&x)[V]) {
  using S = CudaStorage<T>;
  using P = Pack<T, kChunk>;
  if (vec && valid == V) {
#pragma unroll
    for (int k = 0; k < V / kChunk; ++k) {
      P pk;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) pk.x[e] = S::store(x[k * kChunk + e]);
      reinterpret_cast<P*>(dst + i0)[k] = pk;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < valid) dst[i0 + e] = S::store(x[e]);
    }
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Blocks per SM the register allocation must allow (ptxas: at most 65536 / (256 * this) registers
// per thread), checked without spills by tools/kernel_resources.py. The same for the PRODUCTS
// variants (nvcc 13, sm_90: float64 with column partials spills 180 bytes at 2 blocks, 148-174
// registers at 1; the 32-bit variants spill 14-48 bytes at 3 blocks, 96-122 registers at 2).
template <typename T, bool COLS>
constexpr int kTileMinBlocks = (COLS && sizeof(T) == 8) ? 1 : 2;

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV, bool COLS, bool PRODUCTS>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks<T, COLS>)
    sgd_stats_tile_kernel(BucketView b, SGDHyper h, AmpView amp, const float* lr_device,
                          CudaStatsView st, const int64_t* __restrict__ tiles) {
  using S = CudaStorage<T>;
  using C = typename S::compute;
  using A = C;
  using L = TileLanes<T, COLS>;
  constexpr int V = L::V;
  // The statistics reduced: Stat kS0 + k for k < kNS (arrays below are indexed by k).
  constexpr int kS0 = Stats<PRODUCTS>::kFirst, kNS = Stats<PRODUCTS>::kCount;
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;
  const CudaScalars s = step_scalars(h, amp, lr_device);
  __shared__ double total_sm[kWarps][kNS];

  const int64_t* tile = tiles + 8 * static_cast<int64_t>(blockIdx.x);
  const int64_t t = tile[0], rb = tile[1], cb = tile[2], d0 = tile[3], rowlen = tile[4];
  const int64_t row_base = tile[5], col_base = tile[6], slot = tile[7];
  const int64_t n = b.n_tensors;
  T* __restrict__ p = reinterpret_cast<T*>(b.table[t]);
  T* __restrict__ g = reinterpret_cast<T*>(b.table[n + t]);
  T* __restrict__ v = MOM ? reinterpret_cast<T*>(b.table[2 * n + t]) : nullptr;
  const bool first = MOM && b.table[3 * n + t] != 0;
  const bool vec = aligned16(p) && aligned16(g) && (!MOM || aligned16(v)) && rowlen % L::kChunk == 0;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / L::kLanes, q = lane % L::kLanes;  // row within the warp, lane within the row
  const int64_t c0 = cb * kTC + q * V;                     // the lane's first row element
  const int valid_c = static_cast<int>(rowlen - c0 < 0 ? 0 : (rowlen - c0 < V ? rowlen - c0 : V));
  const int64_t r_begin = rb * kTR;
  const int64_t n_rows = d0 - r_begin < kTR ? d0 - r_begin : kTR;

  double tot[kNS] = {};  // !COLS: the first lane of each row, the sum of its row sums
  A col_acc[COLS ? V : 1][kNS];
#pragma unroll
  for (int e = 0; e < (COLS ? V : 1); ++e) {
#pragma unroll
    for (int k = 0; k < kNS; ++k) col_acc[e][k] = A(0);
  }
  // Warp-uniform loop (the butterfly needs every lane): rows past the tile load nothing.
#pragma unroll 1
  for (int64_t base = warp * L::kRowsPerWarp; base < n_rows; base += L::kRowsPerStep) {
    const int64_t rr = base + sub;
    const bool row_ok = rr < n_rows;
    const int valid = row_ok ? valid_c : 0;
    const int64_t i0 = (r_begin + rr) * rowlen + c0;
    C pv[V], gv[V], vv[V];
    load_lane<T, V, L::kChunk>(p, i0, valid, vec, pv);
    load_lane<T, V, L::kChunk>(g, i0, valid, vec, gv);
    if (s.grad_scale != nullptr) {  // the unscaled grad, written back (torch's fused kernel)
#pragma unroll
      for (int e = 0; e < V; ++e) gv[e] = unscaled(gv[e], s);
      store_lane<T, V, L::kChunk>(g, i0, valid, vec, gv);
    }
    if (MOM && !first) {
      load_lane<T, V, L::kChunk>(v, i0, valid, vec, vv);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) vv[e] = C(0);
    }
    A rs[kNS] = {};
#pragma unroll
    for (int e = 0; e < V; ++e) {
      C pi = pv[e], vi = vv[e];
      const C gi = with_sign(gv[e], s);
      const A tq[kNumStats] = {A(pi),      A(gi),      A(vi),      A(pi * pi), A(gi * gi),
                               A(vi * vi), A(pi * gi), A(pi * vi), A(gi * vi)};
#pragma unroll
      for (int k = 0; k < kNS; ++k) {
        rs[k] += tq[kS0 + k];
        if (COLS) col_acc[COLS ? e : 0][k] += tq[kS0 + k];
      }
      if (first) {
        sgd_update_cuda<C, HAS_WD, MOM, true, NESTEROV>(pi, gi, vi, s.f);
      } else {
        sgd_update_cuda<C, HAS_WD, MOM, false, NESTEROV>(pi, gi, vi, s.f);
      }
      pv[e] = pi;
      vv[e] = vi;
    }
    store_lane<T, V, L::kChunk>(p, i0, valid, vec, pv);
    if (MOM) store_lane<T, V, L::kChunk>(v, i0, valid, vec, vv);
    // The row's sums over its kLanes lanes (xor offsets below kLanes stay within the row).
#pragma unroll
    for (int k = 0; k < kNS; ++k) {
#pragma unroll
      for (int off = L::kLanes / 2; off > 0; off /= 2) rs[k] += __shfl_xor_sync(0xffffffffu, rs[k], off);
    }
    if (q == 0 && row_ok) {
      const int64_t r = r_begin + rr;
#pragma unroll
      for (int k = 0; k < kNS; ++k) {
        const double x = static_cast<double>(rs[k]);
        if (!COLS) tot[k] += x;  // COLS: the total comes from the column sums
        if (row_base >= 0) st.scratch[(row_base + cb * d0 + r) * kNumStats + kS0 + k] = x;
      }
    }
  }

  if constexpr (COLS) {  // every tile of this variant has column partials (the plan's order)
    // The warp's rows first (lanes q and q + kLanes hold the same columns), then the warps in
    // order through shared memory, kRound warps at a time (18 KB).
#pragma unroll
    for (int e = 0; e < V; ++e) {
#pragma unroll
      for (int k = 0; k < kNS; ++k) {
#pragma unroll
        for (int off = 16; off >= L::kLanes; off /= 2) col_acc[e][k] += __shfl_xor_sync(0xffffffffu, col_acc[e][k], off);
      }
    }
    constexpr int kRound = sizeof(A) == 8 ? 2 : 4;
    __shared__ A col_sm[kRound][kTC][kNS];
    double col_x[kNS] = {};  // thread threadIdx.x < kTC: its column's sum over the warps
    for (int w0 = 0; w0 < kWarps; w0 += kRound) {
      if (warp >= w0 && warp < w0 + kRound && sub == 0) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
#pragma unroll
          for (int k = 0; k < kNS; ++k) col_sm[warp - w0][q * V + e][k] = col_acc[e][k];
        }
      }
      __syncthreads();
      if (threadIdx.x < kTC) {
#pragma unroll
        for (int w = 0; w < kRound; ++w) {
#pragma unroll
          for (int k = 0; k < kNS; ++k) col_x[k] += static_cast<double>(col_sm[w][threadIdx.x][k]);
        }
      }
      __syncthreads();
    }
    const int64_t c = cb * kTC + threadIdx.x;
    if (threadIdx.x < kTC && c < rowlen) {
#pragma unroll
      for (int k = 0; k < kNS; ++k) st.scratch[(col_base + rb * rowlen + c) * kNumStats + kS0 + k] = col_x[k];
    }
#pragma unroll
    for (int k = 0; k < kNS; ++k) tot[k] = col_x[k];  // columns past the row: zeros
  }
  if (slot >= 0) {  // uniform: the tile's total, lanes of a warp, then the warps, in order
#pragma unroll
    for (int k = 0; k < kNS; ++k) {
#pragma unroll
      for (int off = 16; off >= (COLS ? 1 : L::kLanes); off /= 2) tot[k] += __shfl_xor_sync(0xffffffffu, tot[k], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kNS; ++k) total_sm[warp][k] = tot[k];
    }
    __syncthreads();
    if (threadIdx.x < kNS) {
      double x = 0.0;
      for (int w = 0; w < kWarps; ++w) x += total_sm[w][threadIdx.x];
      st.scratch[slot * kNumStats + kS0 + threadIdx.x] = x;
    }
  }
}

// One warp per reduction task (one output group, or one chunk of a long group's partials):
// lane l adds partials l, l + 32, ... in float64, a fixed xor butterfly adds the lanes, and lane
// 0 writes the 9 sums to dst[row]: the sums in the task's mask (the statistics its tensor's
// groups hold), NaN for the others, whose partials the tiles did not write and which are not
// read. The plan's two levels are two launches: chunks of long groups into scratch slots
// (dst = scratch), then every group (dst = the stats). Fixed order: bitwise reproducible, no
// atomics.
constexpr int kTaskFields = 6;  // base, count, inner, outer, output row, sums mask
constexpr int kReduceThreads = 256;
constexpr int kReduceWarps = kReduceThreads / 32;

__global__ void __launch_bounds__(kReduceThreads)
    sgd_stats_reduce_kernel(const int64_t* __restrict__ tasks, int64_t n_tasks, const double* src,
                            double* dst, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // the step was skipped: out stays NaN
  const int lane = threadIdx.x % 32;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kReduceWarps + threadIdx.x / 32;
  if (k >= n_tasks) return;  // warp-uniform; no block-wide barrier below
  const int64_t* task = tasks + kTaskFields * k;
  const int64_t base = task[0], count = task[1], inner = task[2], outer = task[3], out_row = task[4];
  const int64_t sums = task[5];
  double acc[kNumStats] = {};
  for (int64_t j = lane; j < count; j += 32) {
    const double* part = src + (base + (j / inner) * outer + j % inner) * kNumStats;
#pragma unroll
    for (int q = 0; q < kNumStats; ++q) {
      if ((sums >> q) & 1) acc[q] += part[q];  // warp-uniform
    }
  }
#pragma unroll
  for (int q = 0; q < kNumStats; ++q) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < kNumStats; ++q) dst[out_row * kNumStats + q] = ((sums >> q) & 1) ? acc[q] : CUDART_NAN;
  }
}

// The Python side (nm_optim/ops/native.py) packs two counts into CudaStatsView's n_tasks (the
// binding passes it through unchanged): all tasks | first-level tasks (the first ones) << 32.
constexpr int kCountBits = 32;
constexpr int64_t kCountMask = (int64_t{1} << kCountBits) - 1;

// One launch of the statistics tile kernel's variant for a run of n alike tiles.
template <typename T, bool HAS_WD, bool MOM, bool NESTEROV, bool COLS, bool PRODUCTS>
void launch_tiles(const BucketView& b, const SGDHyper& h, const AmpView& amp, const float* lr_device,
                  const CudaStatsView& st, const int64_t* tiles, int64_t n, cudaStream_t stream) {
  sgd_stats_tile_kernel<T, HAS_WD, MOM, NESTEROV, COLS, PRODUCTS>
      <<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(b, h, amp, lr_device, st, tiles);
}

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV>
void launch(const BucketView& b, const SGDHyper& h, const AmpView& amp, const float* lr_device,
            const CudaStatsView& st, cudaStream_t stream) {
  if (b.n_tiles > 0) {
    sgd_step_kernel<T, HAS_WD, MOM, NESTEROV>
        <<<static_cast<unsigned int>(b.n_tiles), kThreads, 0, stream>>>(b, h, amp, lr_device);
  }
  if (st.out == nullptr) return;
  const int64_t n_tasks = st.n_tasks & kCountMask, n_pre = st.n_tasks >> kCountBits;
  // The plan's runs of alike tiles (host memory: first, count, variant = kRunCols | kRunProducts).
  for (int64_t r = 0; r < st.n_runs; ++r) {
    const int64_t first = st.runs[3 * r], count = st.runs[3 * r + 1], variant = st.runs[3 * r + 2];
    if (count <= 0) continue;
    const int64_t* tiles = st.tiles + 8 * first;
    switch (variant) {
      case 0: launch_tiles<T, HAS_WD, MOM, NESTEROV, false, false>(b, h, amp, lr_device, st, tiles, count, stream); break;
      case kRunCols: launch_tiles<T, HAS_WD, MOM, NESTEROV, true, false>(b, h, amp, lr_device, st, tiles, count, stream); break;
      case kRunProducts: launch_tiles<T, HAS_WD, MOM, NESTEROV, false, true>(b, h, amp, lr_device, st, tiles, count, stream); break;
      default: launch_tiles<T, HAS_WD, MOM, NESTEROV, true, true>(b, h, amp, lr_device, st, tiles, count, stream); break;
    }
  }
  if (n_pre > 0) {
    sgd_stats_reduce_kernel<<<static_cast<unsigned int>((n_pre + kReduceWarps - 1) / kReduceWarps),
                              kReduceThreads, 0, stream>>>(st.tasks, n_pre, st.scratch, st.scratch,
                                                           amp.found_inf);
  }
  if (n_tasks > n_pre) {
    sgd_stats_reduce_kernel<<<static_cast<unsigned int>((n_tasks - n_pre + kReduceWarps - 1) / kReduceWarps),
                              kReduceThreads, 0, stream>>>(st.tasks + kTaskFields * n_pre, n_tasks - n_pre,
                                                           st.scratch, st.out, amp.found_inf);
  }
}

template <typename T>
void launch_dtype(const BucketView& b, const SGDHyper& h, const AmpView& amp,
                  const float* lr_device, const CudaStatsView& st, cudaStream_t stream) {
  const bool wd = h.weight_decay != 0.0, mom = h.momentum != 0.0, nest = h.nesterov;
  if (wd) {
    if (!mom) return launch<T, true, false, false>(b, h, amp, lr_device, st, stream);
    if (nest) return launch<T, true, true, true>(b, h, amp, lr_device, st, stream);
    return launch<T, true, true, false>(b, h, amp, lr_device, st, stream);
  }
  if (!mom) return launch<T, false, false, false>(b, h, amp, lr_device, st, stream);
  if (nest) return launch<T, false, true, true>(b, h, amp, lr_device, st, stream);
  return launch<T, false, true, false>(b, h, amp, lr_device, st, stream);
}

}  // namespace

const char* sgd_step_cuda(DType dtype, const BucketView& bucket, const SGDHyper& hyper,
                          const AmpView& amp, const float* lr_device, const CudaStatsView& stats,
                          std::uintptr_t stream_handle) {
  if (bucket.n_tiles <= 0 && stats.out == nullptr) return "";
  if (bucket.n_tiles > 0x7fffffffLL || stats.n_tiles > 0x7fffffffLL || (stats.n_tasks & kCountMask) > 0x7fffffffLL) {
    return "nm_optim: too many tiles for one launch";
  }
  if (stats.out != nullptr) {  // every run within the tile table, of a known variant
    for (int64_t r = 0; r < stats.n_runs; ++r) {
      const int64_t first = stats.runs[3 * r], count = stats.runs[3 * r + 1], variant = stats.runs[3 * r + 2];
      if (first < 0 || count < 0 || first + count > stats.n_tiles || variant < 0 ||
          variant > (kRunCols | kRunProducts)) {
        return "nm_optim: a statistics run outside the tile table";
      }
    }
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const CudaStatsView& st = stats;
  switch (dtype) {
    case DType::kFloat32: launch_dtype<float>(bucket, hyper, amp, lr_device, st, stream); break;
    case DType::kFloat64: launch_dtype<double>(bucket, hyper, amp, lr_device, st, stream); break;
    case DType::kFloat16: launch_dtype<__half>(bucket, hyper, amp, lr_device, st, stream); break;
    case DType::kBFloat16: launch_dtype<__nv_bfloat16>(bucket, hyper, amp, lr_device, st, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

}  // namespace nm_optim
