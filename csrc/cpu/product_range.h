// nm_optim: when float32 products are safe for the statistics (torch-free, CPU).
//
// The statistics kernels form p*p, g*g, v*v, p*g, p*v, g*v in the compute type and sum them in
// short float partials (kFlushBlocks terms per lane, kColFoldRows / kColFold512Rows rows per
// column partial) before float64. For float32 compute (float32 and bfloat16 storage) that is
// exact to a few ulps only while every product is a normal float: |p| ~ 1e20 gave Σp² = inf,
// |g| ~ 1e-25 gave Σg² = 0 (every square below float32's smallest subnormal), |p|, |g| ~ 1e-20
// lost 1e-6 to subnormal rounding. float64 products of float32 inputs are exact and never leave
// float64's range, so the kernels check each chunk's magnitudes before forming its products and
// reduce a chunk outside the safe range in float64 (csrc/cpu/sgd_step_cpu.cpp, wide_chunk).
//
// Safe: every nonzero |x| in [2^-60, 2^60]. Then every product lies in [2^-120, 2^120] (normal:
// one rounding, relative error 2^-24, the documented accuracy), and no partial of at most 32 such
// terms reaches float32's largest value (2^128). Zeros are exact and always safe (a zero grad, a
// first step's buffer). NaN and infinity are outside, so their chunks give float64's NaN / inf.
//
// The check is the first pass over a chunk (16 vectors of a row; the statistics loop that follows
// reads it again from L1, and the check prefetches ahead), four integer operations per vector and
// input: the magnitude bits a = bits << 1 (the sign shifted out), their maximum, and the minimum
// of a - 1 (a zero wraps to the top and drops out). Measured: docs/architecture.md, "The CPU
// statistics: what bounds them".
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace nm_optim {

// Magnitude bounds as `bits << 1` of a float32 (monotonic in |x| for non-NaN x).
struct ProductRange {
  uint32_t hi;    // largest safe magnitude
  uint32_t lo_1;  // smallest safe nonzero magnitude, minus 1
};

inline uint32_t magnitude_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u << 1;
}

inline ProductRange product_range(double scale = 1.0) {
  // The bounds of the grad as stored: under a GradScaler the kernels see grad / scale, so the
  // stored grad's safe range is the quotient's times the scale (rounded outward to float32: the
  // margins to float32's limits are 2^6 both ways, far more than a rounding).
  const double hi = std::min(0x1p60 * scale, static_cast<double>(std::numeric_limits<float>::max()));
  const double lo = 0x1p-60 * scale;
  return ProductRange{magnitude_bits(static_cast<float>(hi)), magnitude_bits(static_cast<float>(lo)) - 1u};
}

// Running maximum and minimum of the magnitude bits of a chunk, in 32-byte vectors (8 floats).
struct RangeScan {
  typedef uint32_t U __attribute__((vector_size(32)));
  U hi;
  U lo_1;

  RangeScan() : hi(U{}), lo_1(~U{}) {}

  template <typename V>
  inline __attribute__((always_inline)) void add(V x) {
    static_assert(sizeof(V) == sizeof(U), "32-byte float vectors");
    U a;
    std::memcpy(&a, &x, sizeof a);
    a = a << 1;
    hi = a > hi ? a : hi;
    const U t = a - 1u;
    lo_1 = t < lo_1 ? t : lo_1;
  }

  inline __attribute__((always_inline)) bool within(const ProductRange& r) const {
    uint32_t h = 0, l = ~0u;
    for (int k = 0; k < 8; ++k) {
      h = hi[k] > h ? hi[k] : h;
      l = lo_1[k] < l ? lo_1[k] : l;
    }
    return h <= r.hi && l >= r.lo_1;
  }
};

}  // namespace nm_optim
