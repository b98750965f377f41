// nm_optim: the fused SGD step on the CPU (C++17, OpenMP over tiles, SIMD by auto-vectorisation).
//
// One parallel loop over the bucket's tiles (BucketView in sgd_step.h): the number of parallel
// regions per step is one per bucket, whatever the number of tensors. Each tile streams p, g, v
// once: read p, g, v; write p, v (20 bytes per fp32 element with momentum). Tracked tensors
// (StatsView) reduce the 9 statistics of the pre-step values in the same loop: per-thread
// partial sums in float64, combined in a fixed order at the end (deterministic for a given
// thread count; no atomics).
//
// Portable by default: the inner loops are compiled twice (x86-64-v3 = AVX2 + FMA + F16C, and the
// baseline) and the loader picks one at run time (GCC function multiversioning). NM_OPTIM_NATIVE=1
// at build time compiles for the build machine instead (-march=native, see CMakeLists.txt).
#include <algorithm>
#include <cstdint>
#include <vector>

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

template <typename T>
using ScalarsOf = StepScalars<typename Storage<T>::compute>;

// The hot loop without statistics: flags are template arguments so every variant is branch-free
// and vectorises.
template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
struct PlainRange {
  static inline __attribute__((always_inline)) void run(T* __restrict p, const T* __restrict g,
                                                        T* __restrict v, int64_t n,
                                                        const ScalarsOf<T>& s) {
    using S = Storage<T>;
    using C = typename S::compute;
    for (int64_t i = 0; i < n; ++i) {
      C pi = S::load(p[i]);
      C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
      sgd_update<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, S::load(g[i]) * s.gmul, vi, s);
      p[i] = S::store(pi);
      if (MOM) v[i] = S::store(vi);
    }
  }
};

// The same loop that also adds the 9 statistics of the pre-step values to acc[0..8] and, with
// COLS, element i's statistics to col[k * col_stride + i] (the "cols" groups of a rest == 1
// tensor). Sums are float64 in kLanes explicit lanes fixed by the position in the range, so the
// result does not depend on the data's alignment (a vectorised reduction with alignment peeling
// would: same data, different bits from run to run).
constexpr int kLanes = 4;

template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool COLS>
struct StatsRange {
  using S = Storage<T>;
  using C = typename S::compute;

  static inline __attribute__((always_inline)) void element(T* __restrict p, const T* __restrict g,
                                                            T* __restrict v, int64_t i,
                                                            const ScalarsOf<T>& s, double* lane,
                                                            int stride, double* __restrict col,
                                                            int64_t col_stride) {
    C pi = S::load(p[i]);
    C gi = S::load(g[i]) * s.gmul;
    C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
    const double pd = pi, gd = gi, vd = vi;
    const double t[kNumStats] = {pd, gd, vd, pd * pd, gd * gd, vd * vd, pd * gd, pd * vd, gd * vd};
    for (int k = 0; k < kNumStats; ++k) lane[k * stride] += t[k];
    if (COLS) {
      for (int k = 0; k < kNumStats; ++k) col[k * col_stride + i] += t[k];
    }
    sgd_update<C, HAS_WD, MOM, FIRST, NESTEROV>(pi, gi, vi, s);
    p[i] = S::store(pi);
    if (MOM) v[i] = S::store(vi);
  }

  static inline __attribute__((always_inline)) void run(T* __restrict p, const T* __restrict g,
                                                        T* __restrict v, int64_t n,
                                                        const ScalarsOf<T>& s, double* acc,
                                                        double* __restrict col, int64_t col_stride) {
    double a[kNumStats * kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) element(p, g, v, i + l, s, a + l, kLanes, col, col_stride);
    }
    double tail[kNumStats] = {};
    for (; i < n; ++i) element(p, g, v, i, s, tail, 1, col, col_stride);
    for (int k = 0; k < kNumStats; ++k) {
      const double* ak = a + k * kLanes;
      acc[k] += ((ak[0] + ak[1]) + (ak[2] + ak[3])) + tail[k];
    }
  }
};

// Where the statistics of one tracked tensor go in this thread's partial sums (SoA: 9 rows of
// n_groups each), nullptr for an axis the tensor has no track of.
struct TensorStats {
  int64_t d0, d1, rest;
  double* rows;
  double* cols;
  double* all;
};

// Steps elements [begin, end) of a tracked tensor, walking it row by row (row = index of dim 0).
template <typename T, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
struct StatsTile {
  static inline __attribute__((always_inline)) void run(T* p, const T* g, T* v, int64_t begin,
                                                        int64_t end, const TensorStats& ts,
                                                        const ScalarsOf<T>& s) {
    using Whole = StatsRange<T, HAS_WD, MOM, FIRST, NESTEROV, false>;
    using PerCol = StatsRange<T, HAS_WD, MOM, FIRST, NESTEROV, true>;
    const int64_t rowlen = ts.d1 * ts.rest;
    auto at = [&](int64_t i) { return v != nullptr ? v + i : nullptr; };
    for (int64_t idx = begin; idx < end;) {
      const int64_t r = idx / rowlen;
      const int64_t row0 = r * rowlen;
      const int64_t row_end = std::min(end, row0 + rowlen);
      double seg[kNumStats] = {};
      if (ts.cols == nullptr) {
        Whole::run(p + idx, g + idx, at(idx), row_end - idx, s, seg, nullptr, 0);
      } else if (ts.rest == 1) {  // Linear-like: column j is element j of the row
        PerCol::run(p + idx, g + idx, at(idx), row_end - idx, s, seg, ts.cols + (idx - row0), ts.d1);
      } else {  // conv-like: column j is a run of `rest` elements of the row
        for (int64_t pos = idx; pos < row_end;) {
          const int64_t j = (pos - row0) / ts.rest;
          const int64_t col_end = std::min(row_end, row0 + (j + 1) * ts.rest);
          double c[kNumStats] = {};
          Whole::run(p + pos, g + pos, at(pos), col_end - pos, s, c, nullptr, 0);
          for (int k = 0; k < kNumStats; ++k) {
            ts.cols[k * ts.d1 + j] += c[k];
            seg[k] += c[k];
          }
          pos = col_end;
        }
      }
      if (ts.rows != nullptr) {
        for (int k = 0; k < kNumStats; ++k) ts.rows[k * ts.d0 + r] += seg[k];
      }
      if (ts.all != nullptr) {
        for (int k = 0; k < kNumStats; ++k) ts.all[k] += seg[k];
      }
      idx = row_end;
    }
  }
};

// Picks the template instance for the runtime flags.
template <typename T, template <typename, bool, bool, bool, bool> class Op, bool HAS_WD, typename... A>
inline __attribute__((always_inline)) void dispatch_wd(const StepFlags& f, bool first, A&&... args) {
  if (!f.momentum) return Op<T, HAS_WD, false, false, false>::run(args...);
  if (first) {
    if (f.nesterov) return Op<T, HAS_WD, true, true, true>::run(args...);
    return Op<T, HAS_WD, true, true, false>::run(args...);
  }
  if (f.nesterov) return Op<T, HAS_WD, true, false, true>::run(args...);
  return Op<T, HAS_WD, true, false, false>::run(args...);
}

template <typename T, template <typename, bool, bool, bool, bool> class Op, typename... A>
inline __attribute__((always_inline)) void dispatch(const StepFlags& f, bool first, A&&... args) {
  if (f.has_wd) return dispatch_wd<T, Op, true>(f, first, args...);
  return dispatch_wd<T, Op, false>(f, first, args...);
}

// One multiversioned entry per storage type and path (target_clones does not apply to templates).
#define NM_DEFINE_TILE_ENTRIES(T, NAME)                                                          \
  NM_TARGET_CLONES void plain_##NAME(T* p, const T* g, T* v, int64_t n, bool first,             \
                                     const StepFlags& f, const ScalarsOf<T>& s) {               \
    dispatch<T, PlainRange>(f, first, p, g, v, n, s);                                           \
  }                                                                                             \
  NM_TARGET_CLONES void stats_##NAME(T* p, const T* g, T* v, int64_t begin, int64_t end,        \
                                     bool first, const StepFlags& f, const TensorStats& ts,     \
                                     const ScalarsOf<T>& s) {                                   \
    dispatch<T, StatsTile>(f, first, p, g, v, begin, end, ts, s);                               \
  }                                                                                             \
  inline void plain_tile(T* p, const T* g, T* v, int64_t n, bool first, const StepFlags& f,     \
                         const ScalarsOf<T>& s) {                                               \
    plain_##NAME(p, g, v, n, first, f, s);                                                      \
  }                                                                                             \
  inline void stats_tile(T* p, const T* g, T* v, int64_t begin, int64_t end, bool first,        \
                         const StepFlags& f, const TensorStats& ts, const ScalarsOf<T>& s) {    \
    stats_##NAME(p, g, v, begin, end, first, f, ts, s);                                         \
  }

NM_DEFINE_TILE_ENTRIES(float, f32)
NM_DEFINE_TILE_ENTRIES(double, f64)
NM_DEFINE_TILE_ENTRIES(Half, f16)
NM_DEFINE_TILE_ENTRIES(BFloat16, bf16)
#undef NM_DEFINE_TILE_ENTRIES

int64_t groups_of(const int64_t* geom, int axis) {
  return axis == 0 ? geom[0] : axis == 1 ? geom[1] : 1;
}

// Per-thread partial sums of every tracked group of one bucket, laid out per track as SoA
// (9 rows of n_groups) so that a "cols" update of a Linear row is one contiguous vector add.
struct Partials {
  std::vector<int64_t> local;  // [3 * n]: offset of each track in one thread's slab, -1 none
  int64_t slab = 0;            // doubles per thread
  std::vector<double> sums;    // [threads * slab]

  void layout(const BucketView& b, const StatsView& st, int threads) {
    local.assign(3 * b.n_tensors, -1);
    slab = 0;
    for (int64_t i = 0; i < b.n_tensors; ++i) {
      for (int a = 0; a < 3; ++a) {
        if (st.offsets[3 * i + a] < 0) continue;
        local[3 * i + a] = slab;
        slab += kNumStats * groups_of(st.geom + 3 * i, a);
      }
    }
    if (sums.size() < static_cast<size_t>(threads * slab)) sums.resize(threads * slab);
  }

  TensorStats view(const StatsView& st, int64_t i, int tid) {
    const int64_t* geom = st.geom + 3 * i;
    double* base = sums.data() + tid * slab;
    auto at = [&](int a) { return local[3 * i + a] < 0 ? nullptr : base + local[3 * i + a]; };
    return TensorStats{geom[0], geom[1], geom[2], at(0), at(1), at(2)};
  }
};

template <typename T>
void run_bucket(const BucketView& b, const SGDHyper& h, const AmpView& amp, const StatsView& st,
                int num_threads) {
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
#else
  const int threads = 1;
#endif
  // The calling thread's scratch: concurrent steps from several Python threads do not share it.
  // (Taken by reference here: inside the parallel region the name would denote each worker's
  // own, empty, thread_local instance.)
  thread_local Partials tls_partials;
  Partials& partials = tls_partials;
  const bool with_stats = st.out != nullptr;
  if (with_stats) partials.layout(b, st, threads);

  auto step_tile = [&](int64_t k, int tid) {
    const int64_t t = b.tiles[2 * k];
    const int64_t begin = b.tiles[2 * k + 1];
    const int64_t end = std::min(begin + b.tile_size, b.numel[t]);
    T* p = reinterpret_cast<T*>(param[t]);
    const T* g = reinterpret_cast<const T*>(grad[t]);
    T* v = f.momentum ? reinterpret_cast<T*>(buf[t]) : nullptr;
    const bool first = is_first[t] != 0;
    if (with_stats && (st.offsets[3 * t] >= 0 || st.offsets[3 * t + 1] >= 0 || st.offsets[3 * t + 2] >= 0)) {
      stats_tile(p, g, v, begin, end, first, f, partials.view(st, t, tid), s);
    } else {
      plain_tile(p + begin, g + begin, v != nullptr ? v + begin : nullptr, end - begin, first, f, s);
    }
  };

  int team = 1;  // threads that actually run (fewer than asked inside a nested parallel region)
  auto combine = [&](int64_t i) {  // out = sum over threads, in thread order
    for (int a = 0; a < 3; ++a) {
      const int64_t off = st.offsets[3 * i + a];
      if (off < 0) continue;
      const int64_t ng = groups_of(st.geom + 3 * i, a);
      const double* src = partials.sums.data() + partials.local[3 * i + a];
      for (int64_t gi = 0; gi < ng; ++gi) {
        for (int k = 0; k < kNumStats; ++k) {
          double sum = 0.0;
          for (int tid = 0; tid < team; ++tid) sum += src[tid * partials.slab + k * ng + gi];
          st.out[(off + gi) * kNumStats + k] = sum;
        }
      }
    }
  };

#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && (b.n_tiles > 1 || with_stats))
  {
    const int tid = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
    if (with_stats) {
      std::fill_n(partials.sums.data() + tid * partials.slab, partials.slab, 0.0);
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < b.n_tiles; ++k) step_tile(k, tid);
    if (with_stats) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) combine(i);
    }
  }
#else
  if (with_stats) std::fill_n(partials.sums.data(), partials.slab, 0.0);
  for (int64_t k = 0; k < b.n_tiles; ++k) step_tile(k, 0);
  if (with_stats) {
    for (int64_t i = 0; i < n; ++i) combine(i);
  }
#endif
}

}  // namespace

void sgd_step_cpu(DType dtype, const BucketView& bucket, const SGDHyper& hyper, const AmpView& amp,
                  const StatsView& stats, int num_threads) {
  // found_inf set by a GradScaler: the step is skipped, nothing is written (statistics neither).
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;
  switch (dtype) {
    case DType::kFloat32: return run_bucket<float>(bucket, hyper, amp, stats, num_threads);
    case DType::kFloat64: return run_bucket<double>(bucket, hyper, amp, stats, num_threads);
    case DType::kFloat16: return run_bucket<Half>(bucket, hyper, amp, stats, num_threads);
    case DType::kBFloat16: return run_bucket<BFloat16>(bucket, hyper, amp, stats, num_threads);
  }
}

}  // namespace nm_optim
