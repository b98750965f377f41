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
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../sgd_math.h"
#include "../sgd_step.h"
#include "numeric.h"
#include "product_range.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NM_OPTIM_NATIVE)
#define NM_TWO_VARIANTS 1
#define NM_FUSED_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define NM_TWO_VARIANTS 0
#define NM_FUSED_TARGET
#endif

namespace nm_optim {
namespace {

struct StepFlags {
  bool has_wd;
  bool momentum;
  bool nesterov;
  bool unscale;  // a GradScaler scale was given: divide the grads by it and write them back
};

template <typename T>
using ScalarsOf = StepScalars<typename Storage<T>::compute>;

// Whether torch's CPU kernels fuse a * b + c (one rounding), decided once, as torch decides which
// kernels to run (aten/src/ATen/native/DispatchStub.cpp, compute_cpu_capability): AVX2 or AVX512
// (both need AVX2 and FMA: their vec::fmadd is vfmadd, and their scalar tails are contracted to
// fma) unless ATEN_CPU_CAPABILITY=default, which selects the DEFAULT kernels (mul, then add).
// Measured against torch 2.13 on x86-64 for all three settings (tests/test_bitwise.py).
bool torch_fuses_madd() {
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env != nullptr && std::strcmp(env, "default") == 0) return false;
#if NM_TWO_VARIANTS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(__x86_64__)
#if defined(__FMA__)
  return true;
#else
  return false;
#endif
#elif defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
  return true;  // e.g. aarch64: torch's NEON fmadd is vfmaq, its scalar tail contracted
#else
  return false;
#endif
}

// The fused variant runs where torch fuses. With two variants it is compiled for AVX2 + FMA + F16C
// (F16C: one-instruction fp16 loads and stores), which every AVX2 + FMA CPU has.
bool use_fused_variant() {
  static const bool fused = [] {
#if NM_TWO_VARIANTS
    return torch_fuses_madd() && __builtin_cpu_supports("f16c");
#else
    return torch_fuses_madd();
#endif
  }();
  return fused;
}

// The gradient the update and the statistics see, g = grad / grad_scale * gmul, from storage
// element(s) at g. UNSCALE (a GradScaler scale was given): as torch's fused SGD
// (aten/src/ATen/native/cpu/FusedSGDKernel.cpp), the grad is divided by the scale in the compute
// type (a division, not a multiply by the reciprocal: the bits differ for scales that are not
// powers of two) and the quotient, rounded to the storage type, is written back to the grad
// before the maximize sign; the update goes on with the unrounded quotient. Without a scale the
// grad is only read (gmul = +-1: exact). STORE = false: a first pass that will read the grad
// again stores nothing (Stats512). The kernels take the grad as a const pointer (it is written
// only with UNSCALE; bench/ instantiates them with const grads) and grad_out casts the const
// away for that write.
template <typename T>
inline __attribute__((always_inline)) T* grad_out(const T* g) { return const_cast<T*>(g); }

// The maximize sign as a negation that flips the sign bit, NaNs included, as torch's for-loop
// step materialises `-grad` (torch/optim/sgd.py). A multiply by -1 keeps a NaN's sign on x86, and
// so does a negation the compiler folds into the next multiply-add (vfnmadd negates the product,
// not a NaN operand). gmul is +-1 and loop-invariant: the compiler unswitches the loops on it,
// so steps without maximize run the loops as before.
//
// So the sign bit is flipped with an integer xor (scalars: the plain loop, which the compiler
// vectorises, and the tails; vectors: the statistics loops), which the compiler neither folds
// into the multiply-add nor keeps from vectorising. (An empty asm after a negation also works but
// stops the plain loop's vectorisation: 1.35x torch's fused step instead of 0.94x, maximize on.)
template <typename C>
inline __attribute__((always_inline)) C flip_sign(C x) {
  using U = std::conditional_t<sizeof(C) == 8, uint64_t, uint32_t>;
  U u;
  std::memcpy(&u, &x, sizeof u);
  u ^= U(1) << (8 * sizeof(C) - 1);
  std::memcpy(&x, &u, sizeof u);
  return x;
}

template <typename C>
inline __attribute__((always_inline)) C signed_grad(C x, const StepScalars<C>& s) {
  return s.gmul < C(0) ? flip_sign(x) : x;
}

template <typename V, typename C>
inline __attribute__((always_inline)) V signed_grad_vec(V x, const StepScalars<C>& s) {
  using U = std::conditional_t<sizeof(C) == 8, uint64_t, uint32_t>;
  typedef U VU __attribute__((vector_size(sizeof(V))));
  if (s.gmul < C(0)) x = (V)((VU)x ^ (U(1) << (8 * sizeof(C) - 1)));
  return x;
}

template <bool UNSCALE, bool STORE = true, typename T, typename C>
inline __attribute__((always_inline)) C grad_in(const T* g, const StepScalars<C>& s) {
  C x = Storage<T>::load(*g);
  if constexpr (UNSCALE) {
    x = x / s.grad_scale;
    if constexpr (STORE) *grad_out(g) = Storage<T>::store(x);
  }
  return signed_grad(x, s);
}

// Column sums of a cols track for elements reduced outside the column partials (wide_chunk):
// element i of a segment is row element e0 + i, in column (e0 + i) / rest, whose float64 sums
// are cols[k * d1 + column]. cols == nullptr: no cols track.
struct ColSums {
  double* cols = nullptr;
  int64_t d1 = 0, rest = 1, e0 = 0;
  ColSums at(int64_t i) const { return ColSums{cols, d1, rest, e0 + i}; }
};

// Elements [0, n) of ROWS rows (row q at p + q * rowlen), one at a time: the statistics from
// float64 products (exact for float32 inputs, and never out of float64's range) to
// acc[q * 9 + k] and the column sums, and the update with the scalar op sequence the vector
// kernels' tails use (the same bits as their vector bodies). Runs the chunks whose magnitudes
// float32 products cannot hold (product_range.h) and the scalar tails of segments.
template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE, int ROWS = 1>
inline __attribute__((always_inline)) void wide_chunk(T* p, const T* g, T* v, int64_t rowlen, int64_t n,
                                                      const ScalarsOf<T>& s, double* acc, const ColSums& cs) {
  using S = Storage<T>;
  using C = typename S::compute;
  for (int q = 0; q < ROWS; ++q) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = q * rowlen + i;
      C pi = S::load(p[at]);
      const C gi = grad_in<UNSCALE>(g + at, s);
      C vi = (MOM && !FIRST) ? S::load(v[at]) : C(0);
      const double pd = pi, gd = gi, vd = vi;
      const double t[kNumStats] = {pd, gd, vd, pd * pd, gd * gd, vd * vd, pd * gd, pd * vd, gd * vd};
      for (int k = 0; k < kNumStats; ++k) acc[q * kNumStats + k] += t[k];
      if (cs.cols != nullptr) {
        double* col = cs.cols + (cs.e0 + i) / cs.rest;
        for (int k = 0; k < kNumStats; ++k) col[k * cs.d1] += t[k];
      }
      sgd_update_cpu<C, FUSED, HAS_WD, MOM, FIRST, NESTEROV>(pi, gi, vi, s);
      p[at] = S::store(pi);
      if (MOM) v[at] = S::store(vi);
    }
  }
}

// The hot loop without statistics: flags are template arguments so every variant is branch-free
// and vectorises.

template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE = false>
struct PlainRange {
  static inline __attribute__((always_inline)) void run(T* __restrict p, const T* __restrict g,
                                                        T* __restrict v, int64_t n,
                                                        const ScalarsOf<T>& s) {
    using S = Storage<T>;
    using C = typename S::compute;
    for (int64_t i = 0; i < n; ++i) {
      C pi = S::load(p[i]);
      C vi = (MOM && !FIRST) ? S::load(v[i]) : C(0);
      sgd_update_cpu<C, FUSED, HAS_WD, MOM, FIRST, NESTEROV>(pi, grad_in<UNSCALE>(g + i, s), vi, s);
      p[i] = S::store(pi);
      if (MOM) v[i] = S::store(vi);
    }
  }
};

// The same loop over a segment of one row that also reduces the 9 statistics of the pre-step
// values: their sum over the segment is added to acc[0..8] (float64), and with COLS element j's
// statistics are added to colf[k * rowlen + j] (the per-element column partials, see StatsTile;
// `rowlen` is then the stride between their 9 rows).
// Written with GCC vector extensions (32 bytes: 8 floats or 4 doubles, AVX in the fused
// variant, SSE pairs in the baseline) because the autovectoriser gives up on this loop. Sums run
// in the vector's lanes, fixed by the position in the segment, and go to float64 every
// kFlushBlocks blocks: the result does not depend on the data's alignment (a vectorised
// reduction with alignment peeling would give other bits for the same data), and no partial in
// the compute type holds more than kFlushBlocks terms.
constexpr int kFlushBlocks = 16;

template <typename C>
struct Vec {
  typedef C type __attribute__((vector_size(32)));
  // The same vector at any address of C (an unaligned load / store, no aliasing assumptions).
  typedef C unaligned __attribute__((vector_size(32), aligned(alignof(C)), may_alias));
  static constexpr int N = 32 / sizeof(C);
};

template <typename T, typename V = typename Vec<typename Storage<T>::compute>::type>
inline __attribute__((always_inline)) V load_vec(const T* x) {
  using S = Storage<T>;
  constexpr int N = Vec<typename S::compute>::N;
  if constexpr (std::is_same_v<T, typename S::compute>) {
    return *reinterpret_cast<const typename Vec<T>::unaligned*>(x);
  } else {
    V r;
    for (int l = 0; l < N; ++l) r[l] = S::load(x[l]);
    return r;
  }
}

template <typename T, typename V>
inline __attribute__((always_inline)) void store_vec(T* x, const V& r) {
  using S = Storage<T>;
  constexpr int N = Vec<typename S::compute>::N;
  if constexpr (std::is_same_v<T, typename S::compute>) {
    *reinterpret_cast<typename Vec<T>::unaligned*>(x) = r;
  } else {
    for (int l = 0; l < N; ++l) x[l] = S::store(r[l]);
  }
}

// wide_chunk for a whole chunk outside the range: rare, so kept out of the hot loops' code (inlined
// there it cost the AVX-512 cols kernel registers and time). Compiled for the baseline ISA: FUSED
// multiply-adds then call the C library's fma, which rounds once as the instruction does.
template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE, int ROWS = 1>
__attribute__((noinline, cold)) void wide_chunk_cold(T* p, const T* g, T* v, int64_t rowlen, int64_t n,
                                                     const ScalarsOf<T>& s, double* acc, ColSums cs) {
  wide_chunk<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE, ROWS>(p, g, v, rowlen, n, s, acc, cs);
}

// Whether the products of a chunk (n elements of ROWS rows, n a multiple of 8) stay in float32's
// safe range (product_range.h), read from storage before anything is written. Only where the
// compute type is float32 and the storage can leave the range (not fp16: 65504^2 and its
// smallest subnormal's square are normal floats).
template <typename T>
#ifdef NM_NO_RANGE_CHECK  // for A/B timing only (bench/kernel_cycles.cpp): wrong sums outside the range
constexpr bool kRangeChecked = false;
#else
constexpr bool kRangeChecked = std::is_same_v<typename Storage<T>::compute, float> && !std::is_same_v<T, Half>;
#endif

// The check is the first to touch a chunk; it prefetches two chunks ahead (256 elements). Without
// it the "rows" kernel, one thread, VGG-16's fc1 from memory (bench/kernel_cycles.cpp, paired
// with the kernel before the check in alternating runs): 1.32-1.43x the plain step against
// 1.16-1.29x before the check; with it 1.12-1.23x; "rows" + "cols" 1.33-1.54x against 1.46-1.62x.
constexpr int64_t kRangePrefetch = 256;

template <typename T, bool LOAD_V, bool UNSCALE, int ROWS = 1>
inline __attribute__((always_inline)) bool chunk_in_range(const T* p, const T* g, const T* v, int64_t rowlen,
                                                          int64_t n, const ProductRange& range,
                                                          const ProductRange& g_range) {
  RangeScan pv, gs;
  for (int q = 0; q < ROWS; ++q) {
    for (int64_t i = 0; i < n; i += 8) {
      if (i % 16 == 0) {  // one line per input, kRangePrefetch ahead
        __builtin_prefetch(p + q * rowlen + i + kRangePrefetch, 1, 3);
        __builtin_prefetch(g + q * rowlen + i + kRangePrefetch, 0, 3);
        if (LOAD_V) __builtin_prefetch(v + q * rowlen + i + kRangePrefetch, 1, 3);
      }
      pv.add(load_vec(p + q * rowlen + i));
      (UNSCALE ? gs : pv).add(load_vec(g + q * rowlen + i));
      if (LOAD_V) pv.add(load_vec(v + q * rowlen + i));
    }
  }
  return pv.within(range) && (!UNSCALE || gs.within(g_range));
}

template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool COLS, bool UNSCALE>
struct StatsSegment {
  using S = Storage<T>;
  using C = typename S::compute;
  using V = typename Vec<C>::type;
  static constexpr int N = Vec<C>::N;

  static inline __attribute__((always_inline)) void flush(V (&lane)[kNumStats], double* acc) {
    for (int k = 0; k < kNumStats; ++k) {
      double sum = 0.0;  // fixed order: lane 0 .. N-1
      for (int l = 0; l < N; ++l) sum += static_cast<double>(lane[k][l]);
      acc[k] += sum;
      lane[k] = V{};
    }
  }

  static inline __attribute__((always_inline)) void add_to(C* x, const V& t) {
    *reinterpret_cast<typename Vec<C>::unaligned*>(x) += t;
  }

  // Chunks of kFlushBlocks vectors: each checked for float32 products' range first where that
  // can fail (kRangeChecked; a chunk outside goes to wide_chunk), then its sums in the lanes,
  // flushed to float64 at the chunk's end; the scalar tail in float64 (wide_chunk).
  static inline __attribute__((always_inline)) void run(T* __restrict p, const T* __restrict g,
                                                        T* __restrict v, int64_t n,
                                                        const ScalarsOf<T>& s, double* acc,
                                                        C* __restrict colf, int64_t rowlen, const ColSums& cs) {
    int64_t i = 0;
    if (n >= N) {
      const ProductRange range = product_range(), g_range = product_range(UNSCALE ? s.grad_scale : 1.0);
      for (; i + N <= n;) {
        const int64_t stop = i + std::min<int64_t>(kFlushBlocks, (n - i) / N) * N;
        if constexpr (kRangeChecked<T>) {
          if (!chunk_in_range<T, MOM && !FIRST, UNSCALE>(p + i, g + i, MOM ? v + i : nullptr, 0, stop - i, range,
                                                            g_range)) {
            wide_chunk_cold<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE>(p + i, g + i, MOM ? v + i : nullptr, 0,
                                                                             stop - i, s, acc, cs.at(i));
            i = stop;
            continue;
          }
        }
        V lane[kNumStats] = {};
        for (; i < stop; i += N) {
          V pi = load_vec(p + i);
          V gi = load_vec(g + i);
          if constexpr (UNSCALE) {  // as grad_in
            gi = gi / s.grad_scale;
            store_vec(grad_out(g + i), gi);
          }
          gi = signed_grad_vec(gi, s);
          V vi = V{};
          if (MOM && !FIRST) vi = load_vec(v + i);
          const V t[kNumStats] = {pi, gi, vi, pi * pi, gi * gi, vi * vi, pi * gi, pi * vi, gi * vi};
          for (int k = 0; k < kNumStats; ++k) lane[k] += t[k];
          if (COLS) {
            for (int k = 0; k < kNumStats; ++k) add_to(colf + k * rowlen + i, t[k]);
          }
          sgd_update_cpu<C, FUSED, HAS_WD, MOM, FIRST, NESTEROV>(pi, gi, vi, s);
          store_vec(p + i, pi);
          if (MOM) store_vec(v + i, vi);
        }
        flush(lane, acc);
      }
    }
    wide_chunk<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE>(p + i, g + i, MOM ? v + i : nullptr, 0, n - i, s, acc,
                                                               cs.at(i));
  }
};

// Where the statistics of one tracked tensor go in this thread's scratch: float64 partial sums
// (SoA: 9 rows of n_groups each; nullptr for an axis without a track) and, for a cols track,
// colf [9][colf_stride], the per-element column partials of one column strip (StatsTile) in the
// compute type.
struct TensorStats {
  int64_t d0, d1, rest;
  double* rows;
  double* cols;
  double* all;
  void* colf;
};

// Column strips: a cols-tracked tile (whole rows, nm_optim/_native.py) is walked strip by strip,
// all its rows for one strip of kStrip elements before the next strip, so that the strip's
// column partials (9 x kStrip floats) stay in L1/L2 (the whole colf of a 25088-wide Linear is
// 900 KB: walking row by row it lived in L3 and the step took 4x longer). The partials are folded
// into the float64 column sums every kColFoldRows rows, so none holds more than that many terms.
// The AVX-512 path (Stats512 below) walks whole rows (kStripWide) instead: it takes two rows at a
// time, and whole rows streamed in memory order measured faster there than strips (the strip walk
// restarts the prefetchers at every strip of every row).
constexpr int64_t kStrip = 2048;
constexpr int64_t kStripWide = 32768;
constexpr int kColFoldRows = 8;

// Elements per column strip of a tensor (whole columns); colf holds one strip (at most a row:
// rowlen = d1 * rest elements), and its 9 rows are colf_stride apart. The padding keeps the 9 rows
// from sharing their address bits 0..11: with a stride that is a multiple of 4 KiB every colf
// store aliased the next colf load ("4K aliasing") and the cols path ran at 1 instruction per
// cycle.
// `wide`: the AVX-512 path's strips (Stats512), else the AVX2 path's.
inline int64_t strip_of(int64_t rest, bool wide) {
  rest = std::max<int64_t>(rest, 1);  // rest == 0: an empty tensor (no tiles), any strip will do
  const int64_t strip = wide ? kStripWide : kStrip;
  return (strip + rest - 1) / rest * rest;
}
inline int64_t colf_stride(int64_t d1, int64_t rest, bool wide) {
  return std::min(strip_of(rest, wide), std::max<int64_t>(d1 * rest, 1)) + 24;
}

// Adds the strip's column partials (columns [j0, j1), first column j0) to the float64 sums.
// `colf` holds the strip's partials, its 9 rows `stride` apart (colf_stride); both cols kernels
// fold through here (it runs once per kColFoldRows / kColFold512Rows rows, off the hot loop).
// (always_inline: compiled with each kernel's instruction set.)
template <typename C>
inline __attribute__((always_inline)) void fold_cols(const TensorStats& ts, C* colf, int64_t stride, int64_t j0,
                                                     int64_t j1) {
  const int64_t n = (j1 - j0) * ts.rest;
  for (int k = 0; k < kNumStats; ++k) {
    C* __restrict src = colf + k * stride;
    double* __restrict dst = ts.cols + k * ts.d1 + j0;
    if (ts.rest == 1) {  // Linear-like: one partial per column (a vectorised loop)
      for (int64_t j = 0; j < j1 - j0; ++j) dst[j] += static_cast<double>(src[j]);
    } else {
      // A group is `rest` consecutive partials (a conv's kernel window, the 49 positions of a
      // channel after Flatten): summed 4 at a time in float64 lanes, then the lanes in a fixed
      // order and the tail. One scalar chain per group (a dependent add per partial) made VGG-16's
      // fc1 as [4096, 512, 49] (find_symmetries' cols track) cost 2.72-2.99 cycles per element on
      // two threads against 2.27-2.48 as [4096, 25088]; summed this way, 2.27-2.41
      // (bench/kernel_cycles.cpp).
      typedef C In4 __attribute__((vector_size(4 * sizeof(C)), aligned(alignof(C)), may_alias));
      typedef double D4 __attribute__((vector_size(32)));
      for (int64_t j = 0; j < j1 - j0; ++j) {
        const C* group = src + j * ts.rest;
        D4 lanes = {};
        int64_t e = 0;
        for (; e + 4 <= ts.rest; e += 4) lanes += __builtin_convertvector(*reinterpret_cast<const In4*>(group + e), D4);
        double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        for (; e < ts.rest; ++e) sum += static_cast<double>(group[e]);
        dst[j] += sum;
      }
    }
    std::fill(src, src + n, C(0));
  }
}

// Steps elements [begin, end) of a tracked tensor (row = index of dim 0; column j of a row = its
// elements [j * rest, (j + 1) * rest)).
template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE>
struct StatsTile {
  static inline __attribute__((always_inline)) void run(T* p, const T* g, T* v, int64_t begin,
                                                        int64_t end, const TensorStats& ts,
                                                        const ScalarsOf<T>& s) {
    using C = typename Storage<T>::compute;
    using Whole = StatsSegment<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, false, UNSCALE>;
    using PerCol = StatsSegment<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, true, UNSCALE>;
    const int64_t rowlen = ts.d1 * ts.rest;
    auto add_row = [&](int64_t r, const double* seg) {
      if (ts.rows != nullptr) {
        for (int k = 0; k < kNumStats; ++k) ts.rows[k * ts.d0 + r] += seg[k];
      }
      if (ts.all != nullptr) {
        for (int k = 0; k < kNumStats; ++k) ts.all[k] += seg[k];
      }
    };
    if (ts.colf == nullptr) {  // rows / all only: any tile, walked row segment by row segment
      for (int64_t idx = begin; idx < end;) {
        const int64_t r = idx / rowlen;
        const int64_t row_end = std::min(end, (r + 1) * rowlen);
        double seg[kNumStats] = {};
        Whole::run(p + idx, g + idx, v != nullptr ? v + idx : nullptr, row_end - idx, s, seg, nullptr, 0, ColSums{});
        add_row(r, seg);
        idx = row_end;
      }
      return;
    }
    // cols: the tile is whole rows [r0, r1).
    C* colf = static_cast<C*>(ts.colf);
    const int64_t r0 = begin / rowlen, r1 = end / rowlen;
    const int64_t strip = strip_of(ts.rest, false), stride = colf_stride(ts.d1, ts.rest, false);
    for (int64_t c0 = 0; c0 < rowlen; c0 += strip) {
      const int64_t c1 = std::min(rowlen, c0 + strip);
      int rows_in = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * rowlen + c0;
        double seg[kNumStats] = {};
        PerCol::run(p + at, g + at, v != nullptr ? v + at : nullptr, c1 - c0, s, seg, colf, stride,
                    ColSums{ts.cols, ts.d1, ts.rest, c0});
        add_row(r, seg);
        if (++rows_in == kColFoldRows || r + 1 == r1) {
          fold_cols<C>(ts, colf, stride, c0 / ts.rest, c1 / ts.rest);
          rows_in = 0;
        }
      }
    }
  }
};

// ---- The statistics on AVX-512 -------------------------------------------------------------------
//
// Tracked float / double tensors, in 32-byte vectors (8 floats / 4 doubles; kStatsVectorBytes)
// with AVX-512 VL's 32 registers. Two paths:
//
// * Without a cols track (rows_tile): one pass per row segment, the 9 row sums in registers,
//   products added as fmas: 6 fmas and 3 adds per vector besides the update.
//
// * With a cols track (cols_tile) every element also adds its 9 terms to its column's partials
//   (colf): in the AVX2 kernel above that is 9 loads and 9 stores per 8 elements and row, more
//   stores than the step's own, and a fold into float64 every kColFoldRows rows. Here two rows
//   at a time and whole rows in memory order (kStripWide): the two rows' terms of a column are
//   summed, then added to its partial in one read-modify-write (one store per two rows), and the
//   9 statistics are done in two passes over a chunk of kFlushBlocks vectors (p, g, pp, gg, pg;
//   then v, vv, pv, gv and the update, which reads the chunk again from L1), so that each pass's
//   row sums (2 rows x 5 or 4) and inputs fit in the 32 vector registers (all 9 in one pass
//   spilled them). Products go to their sums as fmas for some statistics (kFmaStats). The
//   partials fold into float64 every kColFold512Rows rows (see there).
//
// What bounds them: see "The CPU statistics: what bounds them" in docs/architecture.md.
//
// The update is the same per-element op sequence (sgd_update_cpu with FUSED = true: one fma per
// multiply-add, as torch's AVX2 and AVX512 kernels), so only the vector width differs: the bits
// are those of the fused AVX2 variant. Compiled for float and double storage only (fp16 / bf16
// keep the AVX2 path), and only in the two-variant build; picked at run time where the CPU has
// AVX-512 F/VL/DQ/BW and the fused variant runs.
#if NM_TWO_VARIANTS
#define NM_AVX512_TARGET \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")))

bool use_avx512_stats() {
  static const bool ok = [] {
    if (!use_fused_variant()) return false;
    const char* env = std::getenv("NM_OPTIM_NO_AVX512");  // escape hatch, and for A/B timing
    if (env != nullptr && env[0] != '\0' && env[0] != '0') return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  }();
  return ok;
}

// Rows between folds of the column partials into float64. A float partial is then a chain of at
// most 15 row-pair sums, so each term is rounded at most 16 times before the fold (its product,
// the pair's sum, 14 more additions; the first addition to a zeroed partial is exact): relative
// error at most 16 u = 9.5e-7 of the summed magnitudes (u = 2^-24), as the row lanes'
// kFlushBlocks = 16 terms. Folding every 30 rows instead of 16 halves the fold's traffic (9
// float64 sums per column, 1.8 MB per thread for VGG-16's fc1, read and written per fold).
constexpr int kColFold512Rows = 30;
constexpr int kColRows = 2;  // rows per block: 2 x 9 row sums in registers
// The product statistics (bit K: Stat K) that go to their row sum and column partial as two fmas
// (x * y + acc); the others as one multiply and two adds. The mix balances the FMA and the add
// pipes: all fmas or none measured 5-25% slower on Zen 4.
constexpr unsigned kFmaStats = (1u << kPP) | (1u << kPG) | (1u << kPV);

// The vector width of these kernels: 32 bytes (8 floats / 4 doubles), in the 32 registers of
// AVX-512 VL. 64-byte vectors ran slower (bench/kernel_cycles.cpp, float32, paired with the plain
// step in the same repetition): rows + cols on VGG-16's fc1 from memory 1.56-2.08x the plain
// step on two threads against 1.24-1.33x, 1.98x against 1.63x on one; with the data in cache
// 1.46-2.0 against 1.38 cycles per element, rows 0.77-0.91 against 0.71. (Zen 4 executes a
// 64-byte operation as two 32-byte halves and stores 32 bytes per cycle: the wider vectors halve
// the instructions, not the work, and a plain step in 64-byte vectors measured 4% slower than in
// 32-byte ones from memory.)
constexpr int kStatsVectorBytes = 32;

template <typename C>
struct VecS {
  typedef C type __attribute__((vector_size(kStatsVectorBytes)));
  typedef C unaligned __attribute__((vector_size(kStatsVectorBytes), aligned(alignof(C)), may_alias));
  static constexpr int N = kStatsVectorBytes / sizeof(C);
};

// Row sums of one row in a thread's stack: a float64 vector per statistic (lane l holds the
// compute-type lane l), reduced in a fixed order at the end of the segment.
template <typename C>
struct RowLanes {
  static constexpr int N = VecS<C>::N;
  typedef double D __attribute__((vector_size(N * sizeof(double))));
  D d[kNumStats];
};

template <typename C, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE = false>
struct Stats512 {
  using V = typename VecS<C>::type;
  using U = typename VecS<C>::unaligned;
  using D = typename RowLanes<C>::D;
  static constexpr int N = VecS<C>::N;

  static constexpr int64_t kChunk = kFlushBlocks * N;  // elements per chunk of a row (seg)

  static inline __attribute__((always_inline)) V ld(const C* x) { return *reinterpret_cast<const U*>(x); }
  static inline __attribute__((always_inline)) void st(C* x, V y) { *reinterpret_cast<U*>(x) = y; }

  // lane (compute type) -> the float64 row lanes, then zeroed.
  static inline __attribute__((always_inline)) void flush(V (&lane)[kNumStats], RowLanes<C>& out) {
    for (int k = 0; k < kNumStats; ++k) {
      out.d[k] += __builtin_convertvector(lane[k], D);
      lane[k] = V{};
    }
  }

  static inline __attribute__((always_inline)) void finish(const RowLanes<C>& rl, double* acc) {
    for (int k = 0; k < kNumStats; ++k) {
      double sum = 0.0;  // fixed order
      for (int l = 0; l < N; ++l) sum += rl.d[k][l];
      acc[k] += sum;
    }
  }

  // Statistic K of ROWS rows: each row's term to its row sum acc[q][j]; the rows' terms of a
  // column summed first (the block's sum), then added to its partial at colf (one load, one
  // store). Summing the block first rounds each term at most 1 + ROWS times before the partial
  // (see kColFold512Rows); the first row's product is a multiply (an fma into the partial would
  // need the partial first).
  template <int K, int ROWS, int KK>
  static inline __attribute__((always_inline)) void add_term(const V (&pr)[ROWS], const V (&gr)[ROWS],
                                                             const V (&vr)[ROWS], V (&acc)[ROWS][KK], int j,
                                                             C* colf) {
    V blk;
#pragma GCC unroll 4
    for (int q = 0; q < ROWS; ++q) {
      if constexpr (K == kP || K == kG || K == kV) {
        const V x = K == kP ? pr[q] : K == kG ? gr[q] : vr[q];
        acc[q][j] += x;
        blk = q == 0 ? x : blk + x;
      } else {
        const V x = (K == kPP || K == kPG || K == kPV) ? pr[q] : (K == kGG || K == kGV) ? gr[q] : vr[q];
        const V y = K == kPP ? pr[q] : (K == kGG || K == kPG) ? gr[q] : vr[q];
        if constexpr (((kFmaStats >> K) & 1) != 0) {
          acc[q][j] = vfma(x, y, acc[q][j]);
          blk = q == 0 ? x * y : vfma(x, y, blk);
        } else {
          const V t = x * y;
          acc[q][j] += t;
          blk = q == 0 ? t : blk + t;
        }
      }
    }
    st(colf, ld(colf) + blk);
  }

  static inline __attribute__((always_inline)) V vfma(V a, V b, V c) {
    V r;
    for (int l = 0; l < N; ++l) r[l] = fused_madd(a[l], b[l], c[l]);
    return r;
  }

  // One pass over `nv` vectors of ROWS rows (row q at p + q * rowlen) for the statistics Ks...:
  // row sums in lane[q][j] (j: position of K in Ks), column terms (all rows' added first) to
  // colf. UPDATE: also steps the elements (the last pass: the others read the pre-step values).
  // A pass holds |Ks| x ROWS sums and the rows' inputs in registers; two passes per chunk instead
  // of one keep all of them in the 32 vector registers (one pass for all 9 statistics spilled
  // them: stores, the bottleneck here).
  template <int ROWS, bool UPDATE, int... Ks>
  static inline __attribute__((always_inline)) void pass(C* __restrict p, const C* __restrict g, C* __restrict v,
                                                         int64_t rowlen, int64_t nv, const StepScalars<C>& s,
                                                         V (&lane)[ROWS][kNumStats], C* __restrict colf,
                                                         int64_t stride) {
    constexpr int kK = sizeof...(Ks);
    constexpr int ks[kK] = {Ks...};
    constexpr bool kNeedV = UPDATE || ((Ks == kV || Ks == kVV || Ks == kPV || Ks == kGV) || ...);
    V acc[ROWS][kK] = {};
    for (int64_t i = 0; i < nv * N; i += N) {
      V pr[ROWS], gr[ROWS], vr[ROWS];
#pragma GCC unroll 4
      for (int q = 0; q < ROWS; ++q) {
        if constexpr (UPDATE) {
          // The next chunk's lines, one pass ahead: without this the first pass stalls on its
          // loads from memory (the hardware prefetchers do not run ahead of this loop), and the
          // step with rows + cols statistics took the sum of its compute and memory times.
          // Measured: one thread, VGG-16's fc1, 3.15 -> 2.70 cycles per element.
          __builtin_prefetch(p + q * rowlen + i + kChunk, 1, 3);
          __builtin_prefetch(g + q * rowlen + i + kChunk, 0, 3);
          if (MOM && !FIRST) __builtin_prefetch(v + q * rowlen + i + kChunk, 1, 3);
        }
        pr[q] = ld(p + q * rowlen + i);
        gr[q] = ld(g + q * rowlen + i);
        if constexpr (UNSCALE) {  // as grad_in; stored by the last pass only (the first reads g again)
          gr[q] = gr[q] / s.grad_scale;
          if constexpr (UPDATE) st(grad_out(g + q * rowlen + i), gr[q]);
        }
        gr[q] = signed_grad_vec(gr[q], s);
        vr[q] = V{};
        if (MOM && !FIRST && kNeedV) vr[q] = ld(v + q * rowlen + i);
      }
      // Each term goes to its row's sum and its column's partial, a product x * y as one fma
      // into each (x * y + acc): two vector operations per term and row, the fewest.
      int j = 0;
      ((add_term<Ks>(pr, gr, vr, acc, j, colf + Ks * stride + i), ++j), ...);
      if constexpr (UPDATE) {
#pragma GCC unroll 4
        for (int q = 0; q < ROWS; ++q) {
          sgd_update_cpu<C, true, HAS_WD, MOM, FIRST, NESTEROV>(pr[q], gr[q], vr[q], s);
          st(p + q * rowlen + i, pr[q]);
          if (MOM) st(v + q * rowlen + i, vr[q]);
        }
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < ROWS; ++q)
#pragma GCC unroll 9
      for (int jj = 0; jj < kK; ++jj) lane[q][ks[jj]] = acc[q][jj];
  }

  // Elements [0, n) of ROWS rows (row q at p + q * rowlen): acc[q * 9 + k] gets row q's sums,
  // colf[k * stride + i] the column terms of all rows. Chunks of kFlushBlocks vectors: each
  // chunk's sums go to float64 lanes (a float partial holds at most kFlushBlocks terms); a float
  // chunk outside float32 products' range (product_range.h) and the scalar tail go to wide_chunk
  // (float64 products, straight to the row and column sums).
  template <int ROWS>
  static inline __attribute__((always_inline)) void seg(C* __restrict p, const C* __restrict g, C* __restrict v,
                                                        int64_t rowlen, int64_t n, const StepScalars<C>& s,
                                                        double* acc, C* __restrict colf, int64_t stride,
                                                        const ColSums& cs) {
    RowLanes<C> rl[ROWS] = {};
    int64_t i = 0;
    if (n >= N) {
      const ProductRange range = product_range(), g_range = product_range(UNSCALE ? s.grad_scale : 1.0);
      for (; i + N <= n;) {
        const int64_t nv = std::min<int64_t>(kFlushBlocks, (n - i) / N);
        C* vi = MOM ? v + i : nullptr;
        if constexpr (kRangeChecked<C>) {
          if (!chunk_in_range<C, MOM && !FIRST, UNSCALE, ROWS>(p + i, g + i, vi, rowlen, nv * N, range, g_range)) {
            wide_chunk_cold<C, true, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE, ROWS>(p + i, g + i, vi, rowlen, nv * N,
                                                                                 s, acc, cs.at(i));
            i += nv * N;
            continue;
          }
        }
        V lane[ROWS][kNumStats];
        pass<ROWS, false, kP, kG, kPP, kGG, kPG>(p + i, g + i, vi, rowlen, nv, s, lane, colf + i, stride);
        pass<ROWS, true, kV, kVV, kPV, kGV>(p + i, g + i, vi, rowlen, nv, s, lane, colf + i, stride);
#pragma GCC unroll 4
        for (int q = 0; q < ROWS; ++q) flush(lane[q], rl[q]);
        i += nv * N;
      }
    }
    for (int q = 0; q < ROWS; ++q) finish(rl[q], acc + q * kNumStats);
    wide_chunk<C, true, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE, ROWS>(p + i, g + i, MOM ? v + i : nullptr, rowlen,
                                                                    n - i, s, acc, cs.at(i));
  }

  // A tile of a tensor without a cols track (rows and / or all): row segment by row segment,
  // each in one pass (the 9 row sums and the inputs fit in the registers), the products added
  // as fmas: 0.65-0.95 cycles per element with the data in cache, against 0.95-1.35 for the AVX2
  // kernel's (StatsTile) separate multiplies and adds in 32-byte vectors (bench/kernel_cycles.cpp).
  static inline __attribute__((always_inline)) void rows_tile(C* p, const C* g, C* v, int64_t begin, int64_t end,
                                                              const TensorStats& ts, const StepScalars<C>& s) {
    const int64_t rowlen = ts.d1 * ts.rest;
    for (int64_t idx = begin; idx < end;) {
      const int64_t r = idx / rowlen;
      const int64_t row_end = std::min(end, (r + 1) * rowlen);
      double sums[kNumStats] = {};
      row_seg(p + idx, g + idx, MOM ? v + idx : nullptr, row_end - idx, s, sums);
      if (ts.rows != nullptr) {
        for (int k = 0; k < kNumStats; ++k) ts.rows[k * ts.d0 + r] += sums[k];
      }
      if (ts.all != nullptr) {
        for (int k = 0; k < kNumStats; ++k) ts.all[k] += sums[k];
      }
      idx = row_end;
    }
  }

  // Elements [0, n) of one row: their 9 sums added to acc (float64; each lane's partial in the
  // compute type holds at most kFlushBlocks terms). A float chunk outside float32 products' range
  // and the scalar tail: wide_chunk.
  static inline __attribute__((always_inline)) void row_seg(C* __restrict p, const C* __restrict g, C* __restrict v,
                                                            int64_t n, const StepScalars<C>& s, double* acc) {
    RowLanes<C> rl = {};
    int64_t i = 0;
    if (n >= N) {
      const ProductRange range = product_range(), g_range = product_range(UNSCALE ? s.grad_scale : 1.0);
      while (i + N <= n) {
        const int64_t stop = i + std::min<int64_t>(kFlushBlocks, (n - i) / N) * N;
        if constexpr (kRangeChecked<C>) {
          if (!chunk_in_range<C, MOM && !FIRST, UNSCALE>(p + i, g + i, MOM ? v + i : nullptr, 0, stop - i, range,
                                                         g_range)) {
            wide_chunk_cold<C, true, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE>(p + i, g + i, MOM ? v + i : nullptr, 0,
                                                                           stop - i, s, acc, ColSums{});
            i = stop;
            continue;
          }
        }
        V lane[kNumStats] = {};
        for (; i < stop; i += N) {
          V pi = ld(p + i);
          V gi = ld(g + i);
          if constexpr (UNSCALE) {  // as grad_in
            gi = gi / s.grad_scale;
            st(grad_out(g + i), gi);
          }
          gi = signed_grad_vec(gi, s);
          V vi = V{};
          if (MOM && !FIRST) vi = ld(v + i);
          lane[kP] += pi;
          lane[kG] += gi;
          lane[kV] += vi;
          lane[kPP] = vfma(pi, pi, lane[kPP]);
          lane[kGG] = vfma(gi, gi, lane[kGG]);
          lane[kVV] = vfma(vi, vi, lane[kVV]);
          lane[kPG] = vfma(pi, gi, lane[kPG]);
          lane[kPV] = vfma(pi, vi, lane[kPV]);
          lane[kGV] = vfma(gi, vi, lane[kGV]);
          sgd_update_cpu<C, true, HAS_WD, MOM, FIRST, NESTEROV>(pi, gi, vi, s);
          st(p + i, pi);
          if (MOM) st(v + i, vi);
        }
        flush(lane, rl);
      }
    }
    finish(rl, acc);
    wide_chunk<C, true, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE>(p + i, g + i, MOM ? v + i : nullptr, 0, n - i, s, acc,
                                                              ColSums{});
  }

  static inline __attribute__((always_inline)) void run(C* p, const C* g, C* v, int64_t begin, int64_t end,
                                                        const TensorStats& ts, const StepScalars<C>& s) {
    if (ts.colf != nullptr) return cols_tile(p, g, v, begin, end, ts, s);
    rows_tile(p, g, v, begin, end, ts, s);
  }

  // A cols-tracked tile: whole rows [begin / rowlen, end / rowlen), strip by strip, two rows at a
  // time.
  static inline __attribute__((always_inline)) void cols_tile(C* p, const C* g, C* v, int64_t begin, int64_t end,
                                                              const TensorStats& ts, const StepScalars<C>& s) {
    C* colf = static_cast<C*>(ts.colf);
    const int64_t rowlen = ts.d1 * ts.rest;
    const int64_t r0 = begin / rowlen, r1 = end / rowlen;
    const int64_t strip = strip_of(ts.rest, true), stride = colf_stride(ts.d1, ts.rest, true);
    double row_acc[kNumStats * kColRows];
    for (int64_t c0 = 0; c0 < rowlen; c0 += strip) {
      const int64_t c1 = std::min(rowlen, c0 + strip);
      int rows_in = 0;
      for (int64_t r = r0; r < r1;) {
        const int rows = r + kColRows <= r1 && rows_in + kColRows <= kColFold512Rows ? kColRows : 1;
        const int64_t at = r * rowlen + c0;
        const ColSums cs{ts.cols, ts.d1, ts.rest, c0};
        std::fill_n(row_acc, kNumStats * kColRows, 0.0);
        if (rows == kColRows) {
          seg<kColRows>(p + at, g + at, MOM ? v + at : nullptr, rowlen, c1 - c0, s, row_acc, colf, stride, cs);
        } else {
          seg<1>(p + at, g + at, MOM ? v + at : nullptr, rowlen, c1 - c0, s, row_acc, colf, stride, cs);
        }
        for (int q = 0; q < rows; ++q) {
          const double* seg_sums = row_acc + q * kNumStats;
          if (ts.rows != nullptr) {
            for (int k = 0; k < kNumStats; ++k) ts.rows[k * ts.d0 + r + q] += seg_sums[k];
          }
          if (ts.all != nullptr) {
            for (int k = 0; k < kNumStats; ++k) ts.all[k] += seg_sums[k];
          }
        }
        r += rows;
        rows_in += rows;
        if (rows_in == kColFold512Rows || r == r1) {
          fold_cols<C>(ts, colf, stride, c0 / ts.rest, c1 / ts.rest);
          rows_in = 0;
        }
      }
    }
  }
};

template <typename C, bool HAS_WD, bool UNSCALE>
inline __attribute__((always_inline)) void stats512_wd(const StepFlags& f, bool first, C* p, const C* g,
                                                      C* v, int64_t begin, int64_t end,
                                                      const TensorStats& ts, const StepScalars<C>& s) {
  if (!f.momentum) return Stats512<C, HAS_WD, false, false, false, UNSCALE>::run(p, g, v, begin, end, ts, s);
  if (first) {
    if (f.nesterov) return Stats512<C, HAS_WD, true, true, true, UNSCALE>::run(p, g, v, begin, end, ts, s);
    return Stats512<C, HAS_WD, true, true, false, UNSCALE>::run(p, g, v, begin, end, ts, s);
  }
  if (f.nesterov) return Stats512<C, HAS_WD, true, false, true, UNSCALE>::run(p, g, v, begin, end, ts, s);
  return Stats512<C, HAS_WD, true, false, false, UNSCALE>::run(p, g, v, begin, end, ts, s);
}

#define NM_DEFINE_STATS512(T, NAME)                                                         \
  NM_AVX512_TARGET void stats512_tile(T* p, const T* g, T* v, int64_t begin, int64_t end,  \
                                      bool first, const StepFlags& f, const TensorStats& ts, \
                                      const ScalarsOf<T>& s) {                               \
    if (f.unscale) {                                                                         \
      if (f.has_wd) return stats512_wd<T, true, true>(f, first, p, g, v, begin, end, ts, s); \
      return stats512_wd<T, false, true>(f, first, p, g, v, begin, end, ts, s);              \
    }                                                                                        \
    if (f.has_wd) return stats512_wd<T, true, false>(f, first, p, g, v, begin, end, ts, s);  \
    return stats512_wd<T, false, false>(f, first, p, g, v, begin, end, ts, s);               \
  }
NM_DEFINE_STATS512(float, f32)
NM_DEFINE_STATS512(double, f64)
#undef NM_DEFINE_STATS512
#endif  // NM_TWO_VARIANTS

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
  inline void stats_tile(T* p, const T* g, T* v, int64_t begin, int64_t end, bool first,         \
                         const StepFlags& f, const TensorStats& ts, const ScalarsOf<T>& s) {     \
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
#if NM_TWO_VARIANTS
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        if (wide) return stats512_tile(p, g, v, begin, end, first, f, ts, s);
      }
#endif
      stats_tile(p, g, v, begin, end, first, f, ts, s);
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
