// nm_optim: the fused SGD step on CUDA. One launch per bucket: block k handles tile k of the
// bucket's tile table (BucketView in sgd_step.h), so launches do not grow with the number of
// tensors. Each element is read once (p, g, v) and written once (p, v): 20 bytes per fp32 element
// with momentum, the floor. 16-byte vector loads where the three pointers allow it.
//
// Hyper-parameters are kernel arguments (lr may also come from a device scalar, so a scheduler
// holding lr in a tensor neither syncs nor re-launches anything different). Built whenever nvcc
// is found, with the runtime linked statically, so the module imports on machines without a GPU.
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

template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
__device__ __forceinline__ void step_tile(T* __restrict__ p, const T* __restrict__ g,
                                          T* __restrict__ v, int64_t len,
                                          const StepScalars<typename CudaStorage<T>::compute>& s) {
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
      sgd_update<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, S::load(gg.x[e]) * s.gmul, vi, s);
      pp.x[e] = S::store(pi);
      if (MOM) vv.x[e] = S::store(vi);
    }
    reinterpret_cast<P*>(p)[j] = pp;
    if (MOM) reinterpret_cast<P*>(v)[j] = vv;
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < len; i += kThreads) {
    C pi = S::load(p[i]);
    C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
    sgd_update<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, S::load(g[i]) * s.gmul, vi, s);
    p[i] = S::store(pi);
    if (MOM) v[i] = S::store(vi);
  }
}

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV>
__global__ void __launch_bounds__(kThreads)
    sgd_step_kernel(BucketView b, SGDHyper h, AmpView amp, const float* lr_device) {
  using C = typename CudaStorage<T>::compute;
  // found_inf set by a GradScaler: the step is skipped, nothing is written.
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;
  C gmul = h.maximize ? C(-1) : C(1);
  if (amp.grad_scale != nullptr) gmul /= static_cast<C>(*amp.grad_scale);
  const C lr = lr_device != nullptr ? static_cast<C>(*lr_device) : static_cast<C>(h.lr);
  const StepScalars<C> s{-lr, static_cast<C>(h.weight_decay), static_cast<C>(h.momentum),
                         static_cast<C>(1.0 - h.dampening), gmul};

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

template <typename T, bool HAS_WD, bool MOM, bool NESTEROV>
void launch(const BucketView& b, const SGDHyper& h, const AmpView& amp, const float* lr_device,
            cudaStream_t stream) {
  sgd_step_kernel<T, HAS_WD, MOM, NESTEROV>
      <<<static_cast<unsigned int>(b.n_tiles), kThreads, 0, stream>>>(b, h, amp, lr_device);
}

template <typename T>
void launch_dtype(const BucketView& b, const SGDHyper& h, const AmpView& amp,
                  const float* lr_device, cudaStream_t stream) {
  const bool wd = h.weight_decay != 0.0, mom = h.momentum != 0.0, nest = h.nesterov;
  if (wd) {
    if (!mom) return launch<T, true, false, false>(b, h, amp, lr_device, stream);
    if (nest) return launch<T, true, true, true>(b, h, amp, lr_device, stream);
    return launch<T, true, true, false>(b, h, amp, lr_device, stream);
  }
  if (!mom) return launch<T, false, false, false>(b, h, amp, lr_device, stream);
  if (nest) return launch<T, false, true, true>(b, h, amp, lr_device, stream);
  return launch<T, false, true, false>(b, h, amp, lr_device, stream);
}

}  // namespace

const char* sgd_step_cuda(DType dtype, const BucketView& bucket, const SGDHyper& hyper,
                          const AmpView& amp, const float* lr_device, std::uintptr_t stream_handle) {
  if (bucket.n_tiles <= 0) return "";
  if (bucket.n_tiles > 0x7fffffffLL) return "nm_optim: too many tiles for one launch";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case DType::kFloat32: launch_dtype<float>(bucket, hyper, amp, lr_device, stream); break;
    case DType::kFloat64: launch_dtype<double>(bucket, hyper, amp, lr_device, stream); break;
    case DType::kFloat16: launch_dtype<__half>(bucket, hyper, amp, lr_device, stream); break;
    case DType::kBFloat16: launch_dtype<__nv_bfloat16>(bucket, hyper, amp, lr_device, stream); break;
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
