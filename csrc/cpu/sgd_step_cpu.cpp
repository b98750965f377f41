// nm_optim: the fused SGD step on the CPU (C++17, OpenMP over tiles, SIMD by auto-vectorisation).
//
// One parallel loop over the bucket's tiles (BucketView in sgd_step.h): the number of parallel
// regions per step is one per bucket, whatever the number of tensors. Each tile streams p, g, v
// once: read p, g, v; write p, v (20 bytes per fp32 element with momentum). Tracked tensors
// (StatsView) reduce the 9 statistics of the pre-step values in the same loop: per-thread
// partial sums in float64, combined in a fixed order at the end (deterministic for a given
// thread count; no atomics).
//
// The update is bitwise torch.optim.SGD's on the CPU (sgd_math.h, sgd_update_cpu): torch's for-loop
// op sequence, with one rounding per multiply-add where torch's CPU kernels fuse it (AVX2 / AVX512)
// and two where they do not (DEFAULT). This file is compiled with -ffp-contract=off.
//
// Portable by default: the inner loops are compiled twice, a fused variant for AVX2 + FMA + F16C
// and an unfused baseline, and the first call picks one as torch picks its CPU kernels
// (use_fused_variant below). NM_OPTIM_NATIVE=1 at build time compiles for the build machine
// instead (-march=native, see CMakeLists.txt), with both roundings available.
//
// The kernel is one translation unit in several files, one job each: step_common.h (flags,
// scalars, vectors, the range check, the column partials), plain_step.h (the step without
// statistics), stats_avx2.h and stats_avx512.h (the statistics kernels); this file picks the
// variant at run time and drives a bucket's tiles (OpenMP, per-thread partials, their combination).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "plain_step.h"
#include "stats_avx2.h"
#include "stats_avx512.h"
#include "step_common.h"

namespace nm_optim {
namespace {


// Picks the template instance for the runtime flags.
template <typename T, template <typename, bool, bool, bool, bool, bool, bool> class Op, bool FUSED, bool HAS_WD,
          bool UNSCALE, typename... A>
inline __attribute__((always_inline)) void dispatch_wd(const StepFlags& f, bool first, A&&... args) {
  if (!f.momentum) return Op<T, FUSED, HAS_WD, false, false, false, UNSCALE>::run(args...);
  if (first) {
    if (f.nesterov) return Op<T, FUSED, HAS_WD, true, true, true, UNSCALE>::run(args...);
    return Op<T, FUSED, HAS_WD, true, true, false, UNSCALE>::run(args...);
  }
  if (f.nesterov) return Op<T, FUSED, HAS_WD, true, false, true, UNSCALE>::run(args...);
  return Op<T, FUSED, HAS_WD, true, false, false, UNSCALE>::run(args...);
}

template <typename T, template <typename, bool, bool, bool, bool, bool, bool> class Op, bool FUSED, typename... A>
inline __attribute__((always_inline)) void dispatch(const StepFlags& f, bool first, A&&... args) {
  if (f.unscale) {
    if (f.has_wd) return dispatch_wd<T, Op, FUSED, true, true>(f, first, args...);
    return dispatch_wd<T, Op, FUSED, false, true>(f, first, args...);
  }
  if (f.has_wd) return dispatch_wd<T, Op, FUSED, true, false>(f, first, args...);
  return dispatch_wd<T, Op, FUSED, false, false>(f, first, args...);
}

// Two entries per storage type and path: the fused variant (one rounding per multiply-add,
// compiled for AVX2 + FMA + F16C in the two-variant build) and the unfused one (two roundings,
// the baseline ISA). Without two variants both are compiled for the build's ISA; the fused one
// only where the ISA has an FMA instruction (elsewhere it would call the C library's fma).
#if NM_TWO_VARIANTS || defined(__FMA__) || (!defined(__x86_64__) && defined(__FP_FAST_FMA))
#define NM_FUSED_ENTRY(T, NAME, PATH, OP, PARAMS, ARGS) \
  NM_FUSED_TARGET void PATH##_##NAME##_fused PARAMS { dispatch<T, OP, true> ARGS; }
#define NM_CALL_FUSED(CALL) if (use_fused_variant()) return CALL;
#else
#define NM_FUSED_ENTRY(T, NAME, PATH, OP, PARAMS, ARGS)
#define NM_CALL_FUSED(CALL)
#endif

#define NM_DEFINE_TILE_ENTRIES(T, NAME)                                                           \
  NM_FUSED_ENTRY(T, NAME, plain, PlainRange,                                                     \
                 (T * p, const T* g, T* v, int64_t n, bool first, const StepFlags& f,           \
                  const ScalarsOf<T>& s),                                                        \
                 (f, first, p, g, v, n, s))                                                              \
  NM_FUSED_ENTRY(T, NAME, stats, StatsTile,                                                      \
                 (T * p, const T* g, T* v, int64_t begin, int64_t end, bool first,              \
                  const StepFlags& f, const TensorStats& ts, const ScalarsOf<T>& s),            \
                 (f, first, p, g, v, begin, end, ts, s))                                                 \
  NM_FUSED_ENTRY(T, NAME, products, ProductStatsTile,                                            \
                 (T * p, const T* g, T* v, int64_t begin, int64_t end, bool first,              \
                  const StepFlags& f, const TensorStats& ts, const ScalarsOf<T>& s),            \
                 (f, first, p, g, v, begin, end, ts, s))                                                 \
  void plain_##NAME##_unfused(T* p, const T* g, T* v, int64_t n, bool first, const StepFlags& f, \
                              const ScalarsOf<T>& s) {                                           \
    dispatch<T, PlainRange, false>(f, first, p, g, v, n, s);                                     \
  }                                                                                              \
  void stats_##NAME##_unfused(T* p, const T* g, T* v, int64_t begin, int64_t end, bool first,    \
                              const StepFlags& f, const TensorStats& ts, const ScalarsOf<T>& s) {\
    dispatch<T, StatsTile, false>(f, first, p, g, v, begin, end, ts, s);                         \
  }                                                                                              \
  inline void plain_tile(T* p, const T* g, T* v, int64_t n, bool first, const StepFlags& f,      \
                         const ScalarsOf<T>& s) {                                                \
    NM_CALL_FUSED(plain_##NAME##_fused(p, g, v, n, first, f, s))                                 \
    plain_##NAME##_unfused(p, g, v, n, first, f, s);                                             \
  }                                                                                              \
  /* products: only the 6 products are needed; the unfused variant (a CPU without AVX2 + FMA) */ \
  /* reduces all 9 and the combination writes the others NaN */                                 \
  inline void stats_tile(T* p, const T* g, T* v, int64_t begin, int64_t end, bool first,         \
                         const StepFlags& f, const TensorStats& ts, const ScalarsOf<T>& s,       \
                         bool products = false) {                                                \
    if (products) {                                                                              \
      NM_CALL_FUSED(products_##NAME##_fused(p, g, v, begin, end, first, f, ts, s))               \
    }                                                                                            \
    NM_CALL_FUSED(stats_##NAME##_fused(p, g, v, begin, end, first, f, ts, s))                    \
    stats_##NAME##_unfused(p, g, v, begin, end, first, f, ts, s);                                \
  }

NM_DEFINE_TILE_ENTRIES(float, f32)
NM_DEFINE_TILE_ENTRIES(double, f64)
NM_DEFINE_TILE_ENTRIES(Half, f16)
NM_DEFINE_TILE_ENTRIES(BFloat16, bf16)
#undef NM_DEFINE_TILE_ENTRIES

int64_t groups_of(const int64_t* geom, int axis) {
  return axis == 0 ? geom[0] : axis == 1 ? geom[1] : 1;
}

// Per-thread scratch of one bucket: float64 partial sums of every tracked group, laid out per
// track as SoA (9 rows of n_groups), and the colf per-element column partials (TensorStats),
// which are all zero between tiles (each cols tile folds what it added).
struct Partials {
  std::vector<int64_t> local;  // [3 * n]: offset of each track in one thread's slab, -1 none
  std::vector<int64_t> colf;   // [n]: byte offset of the tensor's colf in a thread's scratch, -1 none
  int64_t slab = 0;            // doubles per thread
  int64_t scratch = 0;         // colf bytes per thread
  std::vector<double> sums;    // [threads * slab]
  std::vector<char> colf_mem;  // [threads * scratch]

  // wide: the tracked tiles run Stats512 (whose colf is one row, not one strip).
  void layout(const BucketView& b, const StatsView& st, int threads, size_t compute_size, bool wide) {
    const int64_t n = b.n_tensors;
    local.assign(3 * n, -1);
    colf.assign(n, -1);
    slab = scratch = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int a = 0; a < 3; ++a) {
        if (st.offsets[3 * i + a] < 0) continue;
        local[3 * i + a] = slab;
        slab += kNumStats * groups_of(st.geom + 3 * i, a);
      }
      if (st.offsets[3 * i + 1] >= 0) {
        colf[i] = scratch;
        const int64_t bytes = kNumStats * colf_stride(st.geom[3 * i + 1], st.geom[3 * i + 2], wide) * compute_size;
        scratch += (bytes + 63) / 64 * 64;
      }
    }
    if (sums.size() < static_cast<size_t>(threads * slab)) sums.resize(threads * slab);
    if (colf_mem.size() < static_cast<size_t>(threads * scratch)) colf_mem.resize(threads * scratch);
  }

  // Zeroes thread tid's scratch (by that thread: the pages land near it).
  void clear(int tid) {
    std::fill_n(sums.data() + tid * slab, slab, 0.0);
    std::fill_n(colf_mem.data() + tid * scratch, scratch, char(0));
  }

  TensorStats view(const StatsView& st, int64_t i, int tid) {
    const int64_t* geom = st.geom + 3 * i;
    double* base = sums.data() + tid * slab;
    auto at = [&](int a) { return local[3 * i + a] < 0 ? nullptr : base + local[3 * i + a]; };
    void* cf = colf[i] < 0 ? nullptr : colf_mem.data() + tid * scratch + colf[i];
    return TensorStats{geom[0], geom[1], geom[2], at(0), at(1), at(2), cf};
  }
};

template <typename T>
void run_bucket(const BucketView& b, const SGDHyper& h, const AmpView& amp, const StatsView& st,
                int num_threads) {
  using C = typename Storage<T>::compute;
  // The scale as torch's fused SGD divides by it: scalar_t(*grad_scale_ptr) (float for fp16 /
  // bf16 storage: opmath_t), exact from float; 1 (unused) without a scale.
  const bool unscale = amp.grad_scale != nullptr;
  const StepScalars<C> s{static_cast<C>(-h.lr), static_cast<C>(h.weight_decay),
                         static_cast<C>(h.momentum), static_cast<C>(1.0 - h.dampening),
                         static_cast<C>(h.maximize ? -1.0 : 1.0),
                         unscale ? static_cast<C>(*amp.grad_scale) : C(1)};
  const StepFlags f{h.weight_decay != 0.0, h.momentum != 0.0, h.nesterov, unscale};
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
  bool wide = false;  // the tracked tiles run Stats512
#if NM_TWO_VARIANTS
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) wide = use_avx512_stats();
#endif
  if (with_stats) partials.layout(b, st, threads, sizeof(C), wide);

  auto step_tile = [&](int64_t k, int tid) {
    const int64_t t = b.tiles[3 * k];
    const int64_t begin = b.tiles[3 * k + 1];
    const int64_t end = b.tiles[3 * k + 2];
    T* p = reinterpret_cast<T*>(param[t]);
    T* g = reinterpret_cast<T*>(grad[t]);
    T* v = f.momentum ? reinterpret_cast<T*>(buf[t]) : nullptr;
    const bool first = is_first[t] != 0;
    if (with_stats && (st.offsets[3 * t] >= 0 || st.offsets[3 * t + 1] >= 0 || st.offsets[3 * t + 2] >= 0)) {
      const TensorStats ts = partials.view(st, t, tid);
      // Statistics by need: a tensor whose tracks need only products runs the kernels without
      // Σp, Σg, Σv (a third less column-partial traffic for a cols track).
      const bool products = st.sums != nullptr && (static_cast<uint64_t>(st.sums[t]) & ~uint64_t{kProductSums}) == 0;
#if NM_TWO_VARIANTS
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        if (wide) return stats512_tile(p, g, v, begin, end, first, f, ts, s, products);
      }
#endif
      stats_tile(p, g, v, begin, end, first, f, ts, s, products);
    } else {
      plain_tile(p + begin, g + begin, v != nullptr ? v + begin : nullptr, end - begin, first, f, s);
    }
  };

  int team = 1;  // threads that actually run (fewer than asked inside a nested parallel region)
  // out = sum over threads, in thread order; NaN for the sums the tensor's tracks do not hold
  // (StatsView.sums: a product-only kernel left them out, and the all-9 fallback computed them).
  auto combine = [&](int64_t i) {
    const uint64_t held = st.sums != nullptr ? static_cast<uint64_t>(st.sums[i]) : uint64_t{kAllSums};
    for (int a = 0; a < 3; ++a) {
      const int64_t off = st.offsets[3 * i + a];
      if (off < 0) continue;
      const int64_t ng = groups_of(st.geom + 3 * i, a);
      const double* src = partials.sums.data() + partials.local[3 * i + a];
      for (int64_t gi = 0; gi < ng; ++gi) {
        for (int k = 0; k < kNumStats; ++k) {
          if (((held >> k) & 1u) == 0) {
            st.out[(off + gi) * kNumStats + k] = std::numeric_limits<double>::quiet_NaN();
            continue;
          }
          double sum = 0.0;
          for (int tid = 0; tid < team; ++tid) sum += src[tid * partials.slab + k * ng + gi];
          st.out[(off + gi) * kNumStats + k] = sum;
        }
      }
    }
  };

#ifdef _OPENMP
  // Tiles per thread: equal shares of the elements, not of the tiles. A tensor with a cols track
  // is cut into tiles of whole rows (about ROW_TILE_SIZE elements, nm_optim/ops/plan.py), up to
  // 16 times a flat tile: split by count, VGG-16-BN's symmetries (cols tracks on two of its
  // Linears only) gave one of two threads 79M elements and the other 59M. The split depends only
  // on the tiles and the team's size, so the statistics stay deterministic.
  thread_local std::vector<int64_t> tile_start;  // elements before tile k
  tile_start.resize(b.n_tiles + 1);
  tile_start[0] = 0;
  for (int64_t k = 0; k < b.n_tiles; ++k) tile_start[k + 1] = tile_start[k] + (b.tiles[3 * k + 2] - b.tiles[3 * k + 1]);
  std::vector<int64_t>& starts = tile_start;  // (the workers' own thread_local would be empty)
#pragma omp parallel num_threads(threads) if (threads > 1 && (b.n_tiles > 1 || with_stats))
  {
    const int tid = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
    if (with_stats) partials.clear(tid);
    // Thread t steps the tiles that start in [t, t + 1) * total / team.
    const auto first_tile = [&](int t) {
      if (t == team) return b.n_tiles;
      const int64_t at = starts[b.n_tiles] * t / team;
      return static_cast<int64_t>(std::lower_bound(starts.begin(), starts.begin() + b.n_tiles, at) - starts.begin());
    };
    for (int64_t k = first_tile(tid), stop = first_tile(tid + 1); k < stop; ++k) step_tile(k, tid);
    if (with_stats) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) combine(i);
    }
  }
#else
  if (with_stats) partials.clear(0);
  for (int64_t k = 0; k < b.n_tiles; ++k) step_tile(k, 0);
  if (with_stats) {
    for (int64_t i = 0; i < n; ++i) combine(i);
  }
#endif
}

}  // namespace

bool sgd_cpu_fused_variant() { return use_fused_variant(); }

bool sgd_cpu_avx512_stats() {
#if NM_TWO_VARIANTS
  return use_avx512_stats();
#else
  return false;
#endif
}

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
