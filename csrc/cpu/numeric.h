// nm_optim: fp16 / bf16 storage types for the CPU kernel (torch-free).
// Loads widen to float, stores round to nearest even, as PyTorch's c10::Half / c10::BFloat16.
#pragma once

#include <cstdint>
#include <cstring>

namespace nm_optim {

struct BFloat16 {
  uint16_t bits;
};

inline float to_float(BFloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline BFloat16 from_float_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{0x7fc0};  // nan stays a quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);                                // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

#if !defined(__FLT16_MAX__)
#error "nm_optim needs a compiler with _Float16 (GCC >= 12 or Clang on x86-64 / aarch64)"
#endif
// The compiler's IEEE binary16: with F16C (the fused variant) a load or store is one
// vcvtph2ps / vcvtps2ph, otherwise a correct software conversion.
using Half = _Float16;
inline float to_float(Half h) { return static_cast<float>(h); }
inline Half from_float_half(float f) { return static_cast<Half>(f); }

template <typename T> struct Storage;
template <> struct Storage<float> {
  using compute = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <> struct Storage<double> {
  using compute = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
template <> struct Storage<Half> {
  using compute = float;
  static float load(Half x) { return to_float(x); }
  static Half store(float x) { return from_float_half(x); }
};
template <> struct Storage<BFloat16> {
  using compute = float;
  static float load(BFloat16 x) { return to_float(x); }
  static BFloat16 store(float x) { return from_float_bf16(x); }
};

}  // namespace nm_optim
