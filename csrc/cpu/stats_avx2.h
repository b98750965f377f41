// nm_optim CPU kernel: the statistics in the AVX2 / baseline variants, for every storage type
// (torch-free; included by csrc/cpu/sgd_step_cpu.cpp only). Where the CPU has AVX-512, tracked
// float32 / float64 tensors run stats_avx512.h instead; fp16 / bf16 always run these.
#pragma once

#include "step_common.h"

namespace nm_optim {
namespace {

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
// SUMS: the sums reduced (kAllSums, kProductSums); the others are left out of the lanes and colf.
template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool COLS, bool UNSCALE,
          unsigned SUMS = kAllSums>
struct StatsSegment {
  using S = Storage<T>;
  using C = typename S::compute;
  using V = typename Vec<C>::type;
  static constexpr int N = Vec<C>::N;

  static inline __attribute__((always_inline)) void flush(V (&lane)[kNumStats], double* acc) {
    for (int k = 0; k < kNumStats; ++k) {
      if (!has_sum<SUMS>(k)) continue;
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
          for (int k = 0; k < kNumStats; ++k) {
            if (has_sum<SUMS>(k)) lane[k] += t[k];
          }
          if (COLS) {
            for (int k = 0; k < kNumStats; ++k) {
              if (has_sum<SUMS>(k)) add_to(colf + k * rowlen + i, t[k]);
            }
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

// Steps elements [begin, end) of a tracked tensor (row = index of dim 0; column j of a row = its
// elements [j * rest, (j + 1) * rest)).
template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE,
          unsigned SUMS = kAllSums>
struct StatsTile {
  static inline __attribute__((always_inline)) void run(T* p, const T* g, T* v, int64_t begin,
                                                        int64_t end, const TensorStats& ts,
                                                        const ScalarsOf<T>& s) {
    using C = typename Storage<T>::compute;
    using Whole = StatsSegment<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, false, UNSCALE, SUMS>;
    using PerCol = StatsSegment<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, true, UNSCALE, SUMS>;
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
          fold_cols<SUMS>(ts, colf, stride, c0 / ts.rest, c1 / ts.rest);
          rows_in = 0;
        }
      }
    }
  }
};

// The product-only kernel with the dispatcher's template parameters (sgd_step_cpu.cpp, dispatch).
template <typename T, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, bool UNSCALE>
using ProductStatsTile = StatsTile<T, FUSED, HAS_WD, MOM, FIRST, NESTEROV, UNSCALE, kProductSums>;

}  // namespace
}  // namespace nm_optim
