// nm_optim CPU kernel: what the plain and the statistics loops share (torch-free; included by
// csrc/cpu/sgd_step_cpu.cpp only, whose translation unit is the whole CPU kernel: everything
// here has internal linkage). The variant macros, the step's flags and scalars, the gradient as
// the update and the statistics see it, the 32-byte vectors, the float32 range check
// (product_range.h) and its float64 fallback (wide_chunk), and the column partials' scratch and
// fold shared by the AVX2 and AVX-512 statistics kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// Vectors per chunk of a statistics loop: its sums run in the compute type for at most this many
// terms per lane before they go to float64 (stats_avx2.h, stats_avx512.h), and the range check
// (chunk_in_range) covers one chunk.
constexpr int kFlushBlocks = 16;

// Statistics by need: whether a kernel reducing the set SUMS (kAllSums or kProductSums,
// sgd_math.h) reduces Stat k. A product-only kernel does not add p, g, v to any sum or partial;
// every sum it does reduce is the same computation, in the same order, as in the all-9 kernel, so
// its bits are the same.
template <unsigned SUMS>
constexpr bool has_sum(int k) { return ((SUMS >> k) & 1u) != 0; }

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
// Only the partials of the sums the kernel reduces (SUMS): the others stay zero.
template <unsigned SUMS, typename C>
inline __attribute__((always_inline)) void fold_cols(const TensorStats& ts, C* colf, int64_t stride, int64_t j0,
                                                     int64_t j1) {
  const int64_t n = (j1 - j0) * ts.rest;
  for (int k = 0; k < kNumStats; ++k) {
    if (!has_sum<SUMS>(k)) continue;
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

}  // namespace
}  // namespace nm_optim
