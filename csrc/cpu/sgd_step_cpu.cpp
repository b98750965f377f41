// nm_optim: the fused SGD step on the CPU (C++17, OpenMP over tiles, SIMD by auto-vectorisation).
//
// One parallel loop over the bucket's tiles (BucketView in sgd_step.h): the number of parallel
// regions per step is one per bucket, whatever the number of tensors. Each tile streams p, g, v
// once: read p, g, v; write p, v (20 bytes per fp32 element with momentum).
//
// Portable by default: the inner loops are compiled twice (x86-64-v3 = AVX2 + FMA + F16C, and the
// baseline) and the loader picks one at run time (GCC function multiversioning). NM_OPTIM_NATIVE=1
// at build time compiles for the build machine instead (-march=native, see CMakeLists.txt).
#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../sgd_math.h"
#include "../sgd_step.h"
#include "numeric.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NM_OPTIM_NATIVE)
#define NM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NM_TARGET_CLONES
#endif

namespace nm_optim {
namespace {

struct StepFlags {
  bool has_wd;
  bool momentum;
  bool nesterov;
};

// The hot loop: flags are template arguments so that every variant is branch-free and vectorises.
template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
inline __attribute__((always_inline)) void step_range(T* __restrict p, const T* __restrict g,
                                                      T* __restrict v, int64_t n,
                                                      const StepScalars<typename Storage<T>::compute>& s) {
  using S = Storage<T>;
  using C = typename S::compute;
  for (int64_t i = 0; i < n; ++i) {
    C pi = S::load(p[i]);
    C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
    sgd_update<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, S::load(g[i]), vi, s);
    p[i] = S::store(pi);
    if (MOM) v[i] = S::store(vi);
  }
}

template <typename T, bool HAS_WD>
inline __attribute__((always_inline)) void step_tile_wd(T* p, const T* g, T* v, int64_t n, bool first,
                                                        const StepFlags& f,
                                                        const StepScalars<typename Storage<T>::compute>& s) {
  if (!f.momentum) return step_range<T, HAS_WD, false, false, false>(p, g, v, n, s);
  if (first) {
    if (f.nesterov) return step_range<T, HAS_WD, true, true, true>(p, g, v, n, s);
    return step_range<T, HAS_WD, true, true, false>(p, g, v, n, s);
  }
  if (f.nesterov) return step_range<T, HAS_WD, true, false, true>(p, g, v, n, s);
  return step_range<T, HAS_WD, true, false, false>(p, g, v, n, s);
}

template <typename T>
inline __attribute__((always_inline)) void step_tile(T* p, const T* g, T* v, int64_t n, bool first,
                                                     const StepFlags& f,
                                                     const StepScalars<typename Storage<T>::compute>& s) {
  if (f.has_wd) return step_tile_wd<T, true>(p, g, v, n, first, f, s);
  return step_tile_wd<T, false>(p, g, v, n, first, f, s);
}

// One multiversioned entry per storage type (target_clones does not apply to templates).
NM_TARGET_CLONES void tile_f32(float* p, const float* g, float* v, int64_t n, bool first,
                               const StepFlags& f, const StepScalars<float>& s) {
  step_tile(p, g, v, n, first, f, s);
}
NM_TARGET_CLONES void tile_f64(double* p, const double* g, double* v, int64_t n, bool first,
                               const StepFlags& f, const StepScalars<double>& s) {
  step_tile(p, g, v, n, first, f, s);
}
NM_TARGET_CLONES void tile_f16(Half* p, const Half* g, Half* v, int64_t n, bool first,
                               const StepFlags& f, const StepScalars<float>& s) {
  step_tile(p, g, v, n, first, f, s);
}
NM_TARGET_CLONES void tile_bf16(BFloat16* p, const BFloat16* g, BFloat16* v, int64_t n, bool first,
                                const StepFlags& f, const StepScalars<float>& s) {
  step_tile(p, g, v, n, first, f, s);
}

inline void tile(float* p, const float* g, float* v, int64_t n, bool first, const StepFlags& f,
                 const StepScalars<float>& s) { tile_f32(p, g, v, n, first, f, s); }
inline void tile(double* p, const double* g, double* v, int64_t n, bool first, const StepFlags& f,
                 const StepScalars<double>& s) { tile_f64(p, g, v, n, first, f, s); }
inline void tile(Half* p, const Half* g, Half* v, int64_t n, bool first, const StepFlags& f,
                 const StepScalars<float>& s) { tile_f16(p, g, v, n, first, f, s); }
inline void tile(BFloat16* p, const BFloat16* g, BFloat16* v, int64_t n, bool first,
                 const StepFlags& f, const StepScalars<float>& s) { tile_bf16(p, g, v, n, first, f, s); }

template <typename T>
void run_bucket(const BucketView& b, const SGDHyper& h, const AmpView& amp, int num_threads) {
  using C = typename Storage<T>::compute;
  // gmul folds AMP unscaling and maximize into one multiply; computed in double, rounded once.
  double gmul = h.maximize ? -1.0 : 1.0;
  if (amp.grad_scale != nullptr) gmul /= static_cast<double>(*amp.grad_scale);
  const StepScalars<C> s{static_cast<C>(-h.lr), static_cast<C>(h.weight_decay),
                         static_cast<C>(h.momentum), static_cast<C>(1.0 - h.dampening),
                         static_cast<C>(gmul)};
  const StepFlags f{h.weight_decay != 0.0, h.momentum != 0.0, h.nesterov};
  const int64_t n = b.n_tensors;
  const int64_t* param = b.table;
  const int64_t* grad = b.table + n;
  const int64_t* buf = b.table + 2 * n;
  const int64_t* is_first = b.table + 3 * n;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (b.n_tiles > 1 && threads > 1)
#endif
  for (int64_t k = 0; k < b.n_tiles; ++k) {
    const int64_t t = b.tiles[2 * k];
    const int64_t begin = b.tiles[2 * k + 1];
    const int64_t len = std::min(b.tile_size, b.numel[t] - begin);
    T* p = reinterpret_cast<T*>(param[t]) + begin;
    const T* g = reinterpret_cast<const T*>(grad[t]) + begin;
    T* v = f.momentum ? reinterpret_cast<T*>(buf[t]) + begin : nullptr;
    tile(p, g, v, len, is_first[t] != 0, f, s);
  }
}

}  // namespace

void sgd_step_cpu(DType dtype, const BucketView& bucket, const SGDHyper& hyper, const AmpView& amp,
                  int num_threads) {
  // found_inf set by a GradScaler: the step is skipped, nothing is written.
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;
  switch (dtype) {
    case DType::kFloat32: return run_bucket<float>(bucket, hyper, amp, num_threads);
    case DType::kFloat64: return run_bucket<double>(bucket, hyper, amp, num_threads);
    case DType::kFloat16: return run_bucket<Half>(bucket, hyper, amp, num_threads);
    case DType::kBFloat16: return run_bucket<BFloat16>(bucket, hyper, amp, num_threads);
  }
}

}  // namespace nm_optim
