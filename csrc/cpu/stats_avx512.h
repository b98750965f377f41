// nm_optim CPU kernel: the statistics on AVX-512 (torch-free; included by
// csrc/cpu/sgd_step_cpu.cpp only).
#pragma once

#include "step_common.h"

namespace nm_optim {
namespace {

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
// The product-only kernel uses the same mix, so that its sums are the all-9 kernel's bits. (One
// fma, Σp², would balance its pipes under bench/loop_counts.py's model, 0.69 / 0.66 cycles per
// element against 0.81 / 0.47, but measured no faster: 1.62-1.70 against 1.61-1.63 cycles per
// element with the data in cache, bench/kernel_cycles.cpp.)

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

// SUMS: the sums reduced (kAllSums, kProductSums: step_common.h, has_sum).
template <typename C, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE = false,
          unsigned SUMS = kAllSums>
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
      if (!has_sum<SUMS>(k)) continue;
      out.d[k] += __builtin_convertvector(lane[k], D);
      lane[k] = V{};
    }
  }

  static inline __attribute__((always_inline)) void finish(const RowLanes<C>& rl, double* acc) {
    for (int k = 0; k < kNumStats; ++k) {
      if (!has_sum<SUMS>(k)) continue;
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
        if constexpr (SUMS == kAllSums) {
          pass<ROWS, false, kP, kG, kPP, kGG, kPG>(p + i, g + i, vi, rowlen, nv, s, lane, colf + i, stride);
          pass<ROWS, true, kV, kVV, kPV, kGV>(p + i, g + i, vi, rowlen, nv, s, lane, colf + i, stride);
        } else {
          static_assert(SUMS == kProductSums, "the kernels reduce all 9 sums or the 6 products");
          // 2 rows x 6 sums and the inputs fit the 32 registers: one pass (p, g, v read once from L1).
          pass<ROWS, true, kPP, kGG, kVV, kPG, kPV, kGV>(p + i, g + i, vi, rowlen, nv, s, lane, colf + i, stride);
        }
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
          if constexpr (has_sum<SUMS>(kP)) {
            lane[kP] += pi;
            lane[kG] += gi;
            lane[kV] += vi;
          }
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
          fold_cols<SUMS>(ts, colf, stride, c0 / ts.rest, c1 / ts.rest);
          rows_in = 0;
        }
      }
    }
  }
};

template <typename C, bool HAS_WD, bool UNSCALE, unsigned SUMS>
inline __attribute__((always_inline)) void stats512_wd(const StepFlags& f, bool first, C* p, const C* g,
                                                      C* v, int64_t begin, int64_t end,
                                                      const TensorStats& ts, const StepScalars<C>& s) {
  if (!f.momentum) return Stats512<C, HAS_WD, false, false, false, UNSCALE, SUMS>::run(p, g, v, begin, end, ts, s);
  if (first) {
    if (f.nesterov) return Stats512<C, HAS_WD, true, true, true, UNSCALE, SUMS>::run(p, g, v, begin, end, ts, s);
    return Stats512<C, HAS_WD, true, true, false, UNSCALE, SUMS>::run(p, g, v, begin, end, ts, s);
  }
  if (f.nesterov) return Stats512<C, HAS_WD, true, false, true, UNSCALE, SUMS>::run(p, g, v, begin, end, ts, s);
  return Stats512<C, HAS_WD, true, false, false, UNSCALE, SUMS>::run(p, g, v, begin, end, ts, s);
}

// One function per storage type and set of sums, compiled for AVX-512.
template <typename C, unsigned SUMS>
NM_AVX512_TARGET void stats512_sums(C* p, const C* g, C* v, int64_t begin, int64_t end, bool first,
                                    const StepFlags& f, const TensorStats& ts, const StepScalars<C>& s) {
  if (f.unscale) {
    if (f.has_wd) return stats512_wd<C, true, true, SUMS>(f, first, p, g, v, begin, end, ts, s);
    return stats512_wd<C, false, true, SUMS>(f, first, p, g, v, begin, end, ts, s);
  }
  if (f.has_wd) return stats512_wd<C, true, false, SUMS>(f, first, p, g, v, begin, end, ts, s);
  return stats512_wd<C, false, false, SUMS>(f, first, p, g, v, begin, end, ts, s);
}

// A tracked tile of a float / double tensor; `products`: only the 6 products (kProductSums).
template <typename C>
void stats512_tile(C* p, const C* g, C* v, int64_t begin, int64_t end, bool first, const StepFlags& f,
                   const TensorStats& ts, const StepScalars<C>& s, bool products = false) {
  if (products) return stats512_sums<C, kProductSums>(p, g, v, begin, end, first, f, ts, s);
  stats512_sums<C, kAllSums>(p, g, v, begin, end, first, f, ts, s);
}
#endif  // NM_TWO_VARIANTS

}  // namespace
}  // namespace nm_optim
