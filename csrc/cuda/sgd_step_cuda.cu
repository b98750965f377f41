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
// torch does (g /= (double)grad_scale; g *= -1.0) before the statistics see it. Not run here
// (no GPU on the development machines): the Triton kernels, which spell the same contractions
// out with tl.fma, are checked bitwise against an emulation of it (tests/test_bitwise.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// torch: g = (opmath)grad; if (grad_scale) g /= (double)*grad_scale; if (maximize) g *= -1.0.
template <typename C>
__device__ __forceinline__ C unscale(C g, const CudaScalars& s) {
  if (s.grad_scale != nullptr) g /= static_cast<double>(*s.grad_scale);
  if (s.maximize) g *= -1.0;
  return g;
}

template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
__device__ __forceinline__ void step_tile(T* __restrict__ p, const T* __restrict__ g,
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
    const P gg = reinterpret_cast<const P*>(g)[j];
    P vv;
    if (MOM && !FIRST) vv = reinterpret_cast<const P*>(v)[j];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      C pi = S::load(pp.x[e]);
      C vi = (MOM && !FIRST) ? S::load(vv.x[e]) : C(0);
      sgd_update_cuda<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, unscale(S::load(gg.x[e]), s), vi, s.f);
      pp.x[e] = S::store(pi);
      if (MOM) vv.x[e] = S::store(vi);
    }
    reinterpret_cast<P*>(p)[j] = pp;
    if (MOM) reinterpret_cast<P*>(v)[j] = vv;
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < len; i += kThreads) {
    C pi = S::load(p[i]);
    C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
    sgd_update_cuda<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, unscale(S::load(g[i]), s), vi, s.f);
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
  const T* g = reinterpret_cast<const T*>(b.table[n + t]) + begin;
  T* v = MOM ? reinterpret_cast<T*>(b.table[2 * n + t]) + begin : nullptr;
  if (MOM && b.table[3 * n + t] != 0) {
    step_tile<T, HAS_WD, MOM, true, NESTEROV>(p, g, v, len, s);
  } else {
    step_tile<T, HAS_WD, MOM, false, NESTEROV>(p, g, v, len, s);
  }
}


// ---- statistics ---------------------------------------------------------------------------
// One 256-thread block per 2-D tile of a tracked tensor (the StatsPlan of nm_optim/ops/plan.py,
// see sgd_step.h): rows [rb * kTR, +kTR), row elements [cb * kTC, +kTC). Warp w takes rows w,
// w + 8, ...; lane l takes row elements l + 32 e (e < 4), so every load is one coalesced 128-byte
// line. Per row, the warp's 128 values are reduced with a fixed xor-butterfly in float64 and
// lane 0 writes the row partial (and adds it to its warp's tile total); per row element, each
// thread keeps float sums over its (at most kTR / 8 = 16) rows, and the 8 warps' sums are added
// in warp order through shared memory into the column partial (float64). Only the partials a
// track needs are written (base or slot >= 0).
constexpr int kTR = kStatsTileRows;
constexpr int kTC = kStatsTileCols;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kTC / 32;

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV>
__global__ void __launch_bounds__(kThreads)
    sgd_stats_tile_kernel(BucketView b, SGDHyper h, AmpView amp, const float* lr_device,
                          CudaStatsView st) {
  using S = CudaStorage<T>;
  using C = typename S::compute;
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;
  const CudaScalars s = step_scalars(h, amp, lr_device);
  // Partial sums in the compute type: float64 params keep float64 statistics. The column
  // partials cross shared memory in two rounds of half the warps (36.9 KB for double), added in
  // warp order as in one round.
  using A = C;
  constexpr int kHalf = kWarps / 2;
  __shared__ A col_sm[kHalf][kTC][kNumStats];
  __shared__ double total_sm[kWarps][kNumStats];

  const int64_t* tile = st.tiles + 8 * static_cast<int64_t>(blockIdx.x);
  const int64_t t = tile[0], rb = tile[1], cb = tile[2], d0 = tile[3], rowlen = tile[4];
  const int64_t row_base = tile[5], col_base = tile[6], slot = tile[7];
  const int64_t n = b.n_tensors;
  T* p = reinterpret_cast<T*>(b.table[t]);
  const T* g = reinterpret_cast<const T*>(b.table[n + t]);
  T* v = MOM ? reinterpret_cast<T*>(b.table[2 * n + t]) : nullptr;
  const bool first = MOM && b.table[3 * n + t] != 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double warp_total[kNumStats] = {};  // lane 0: the sum of this warp's row sums

  A col_acc[kPerLane][kNumStats];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
#pragma unroll
    for (int q = 0; q < kNumStats; ++q) col_acc[e][q] = A(0);
  }
  for (int rr = warp; rr < kTR; rr += kWarps) {
    const int64_t r = rb * kTR + rr;
    if (r >= d0) break;  // uniform across the warp
    A row_acc[kNumStats] = {};
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t c = cb * kTC + lane + 32 * e;
      if (c >= rowlen) continue;
      const int64_t i = r * rowlen + c;
      C pi = S::load(p[i]);
      const C gi = unscale(S::load(g[i]), s);
      C vi = (MOM && !first) ? S::load(v[i]) : C(0);
      const A tq[kNumStats] = {A(pi),      A(gi),      A(vi),      A(pi * pi), A(gi * gi),
                               A(vi * vi), A(pi * gi), A(pi * vi), A(gi * vi)};
#pragma unroll
      for (int q = 0; q < kNumStats; ++q) {
        row_acc[q] += tq[q];
        col_acc[e][q] += tq[q];
      }
      if (first) {
        sgd_update_cuda<C, HAS_WD, MOM, true, NESTEROV>(pi, gi, vi, s.f);
      } else {
        sgd_update_cuda<C, HAS_WD, MOM, false, NESTEROV>(pi, gi, vi, s.f);
      }
      p[i] = S::store(pi);
      if (MOM) v[i] = S::store(vi);
    }
#pragma unroll
    for (int q = 0; q < kNumStats; ++q) {
      double x = static_cast<double>(row_acc[q]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
      warp_total[q] += x;
      if (lane == 0 && row_base >= 0) st.scratch[(row_base + cb * d0 + r) * kNumStats + q] = x;
    }
  }
  if (slot >= 0 && lane == 0) {
#pragma unroll
    for (int q = 0; q < kNumStats; ++q) total_sm[warp][q] = warp_total[q];
  }
  double col_x[kNumStats] = {};  // thread threadIdx.x < kTC: its column's sum over the warps
  for (int round = 0; round < 2; ++round) {
    if (col_base >= 0 && warp / kHalf == round) {
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
#pragma unroll
        for (int q = 0; q < kNumStats; ++q) col_sm[warp % kHalf][lane + 32 * e][q] = col_acc[e][q];
      }
    }
    __syncthreads();  // reached by every thread: no early return above
    if (col_base >= 0 && threadIdx.x < kTC) {
#pragma unroll
      for (int q = 0; q < kNumStats; ++q) {
        for (int w = 0; w < kHalf; ++w) col_x[q] += static_cast<double>(col_sm[w][threadIdx.x][q]);
      }
    }
    __syncthreads();
  }
  if (col_base >= 0 && threadIdx.x < kTC) {
    const int64_t c = cb * kTC + threadIdx.x;
    if (c < rowlen) {
      for (int q = 0; q < kNumStats; ++q) st.scratch[(col_base + rb * rowlen + c) * kNumStats + q] = col_x[q];
    }
  }
  if (slot >= 0 && threadIdx.x < kNumStats) {  // the tile's total, warps added in order
    double x = 0.0;
    for (int w = 0; w < kWarps; ++w) x += total_sm[w][threadIdx.x];
    st.scratch[slot * kNumStats + threadIdx.x] = x;
  }
}

// One block per reduction task (one output group): adds its partials in a fixed order (strided
// per thread, then a shared-memory tree) and writes the group's 9 sums.
constexpr int kReduceThreads = 128;

__global__ void __launch_bounds__(kReduceThreads)
    sgd_stats_reduce_kernel(CudaStatsView st, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // the step was skipped: out stays NaN
  __shared__ double red[kNumStats][kReduceThreads];
  const int64_t* task = st.tasks + 5 * static_cast<int64_t>(blockIdx.x);
  const int64_t base = task[0], count = task[1], inner = task[2], outer = task[3], out_row = task[4];
  double acc[kNumStats] = {};
  for (int64_t j = threadIdx.x; j < count; j += kReduceThreads) {
    const double* part = st.scratch + (base + (j / inner) * outer + j % inner) * kNumStats;
    for (int q = 0; q < kNumStats; ++q) acc[q] += part[q];
  }
  for (int q = 0; q < kNumStats; ++q) red[q][threadIdx.x] = acc[q];
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      for (int q = 0; q < kNumStats; ++q) red[q][threadIdx.x] += red[q][threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x < kNumStats) st.out[out_row * kNumStats + threadIdx.x] = red[threadIdx.x][0];
}

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV>
void launch(const BucketView& b, const SGDHyper& h, const AmpView& amp, const float* lr_device,
            const CudaStatsView& st, cudaStream_t stream) {
  if (b.n_tiles > 0) {
    sgd_step_kernel<T, HAS_WD, MOM, NESTEROV>
        <<<static_cast<unsigned int>(b.n_tiles), kThreads, 0, stream>>>(b, h, amp, lr_device);
  }
  if (st.out == nullptr) return;
  if (st.n_tiles > 0) {
    sgd_stats_tile_kernel<T, HAS_WD, MOM, NESTEROV>
        <<<static_cast<unsigned int>(st.n_tiles), kThreads, 0, stream>>>(b, h, amp, lr_device, st);
  }
  if (st.n_tasks > 0) {
    sgd_stats_reduce_kernel<<<static_cast<unsigned int>(st.n_tasks), kReduceThreads, 0, stream>>>(
        st, amp.found_inf);
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
  if (bucket.n_tiles > 0x7fffffffLL || stats.n_tiles > 0x7fffffffLL || stats.n_tasks > 0x7fffffffLL) {
    return "nm_optim: too many tiles for one launch";
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
