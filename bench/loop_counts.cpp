// The CPU kernel's hot loops, one function each, for bench/loop_counts.py to disassemble and
// count (instructions per element: what the bound in docs/architecture.md, "The CPU statistics:
// what bounds them", is made of). Each wrapper runs one loop exactly as the extension compiles
// it (the kernel's headers are included; float32, momentum 0.9 after the first step, weight
// decay): the plain step (AVX2 + FMA variant), a row segment
// with the 9 statistics (Stats512::row_seg: "rows" and "all" tracks), the two passes of two
// rows with column partials (Stats512::pass: "rows" + "cols") and the range check before each
// chunk of either (chunk_in_range).
//
// The loops' headers, not the kernel's whole source (cpu/sgd_step_cpu.cpp instantiates every
// dtype and flag combination: 4 minutes at -O3 on one core): a template's code does not depend on
// which others the translation unit instantiates, and the counts are the same either way
// (compared when this changed).
#include "cpu/plain_step.h"
#include "cpu/stats_avx512.h"

using namespace nm_optim;

#if NM_TWO_VARIANTS
// The loops of a step without maximize: the kernel's loops branch on the sign (gmul) and the
// compiler makes a copy of each loop per sign; with gmul known here (and the loops inlined:
// flatten) only the usual copy remains.
inline StepScalars<float> minimize(const StepScalars<float>& s) {
  StepScalars<float> t = s;
  t.gmul = 1.0f;
  return t;
}

using S512 = Stats512<float, /*HAS_WD=*/true, /*MOM=*/true, /*FIRST=*/false, /*NESTEROV=*/false>;
using V = S512::V;

NM_FUSED_TARGET __attribute__((noinline, flatten)) void loop_plain(float* p, const float* g, float* v, int64_t n,
                                                          const StepScalars<float>& s) {
  PlainRange<float, true, true, true, false, false>::run(p, g, v, n, minimize(s));
}
NM_AVX512_TARGET __attribute__((noinline, flatten)) void loop_rows(float* p, const float* g, float* v, int64_t n,
                                                          const StepScalars<float>& s, double* acc) {
  S512::row_seg(p, g, v, n, minimize(s), acc);
}
NM_AVX512_TARGET __attribute__((noinline, flatten)) void loop_cols_pass1(float* p, const float* g, float* v, int64_t rowlen,
                                                                int64_t nv, const StepScalars<float>& s,
                                                                V (&lane)[kColRows][kNumStats], float* colf,
                                                                int64_t stride) {
  S512::pass<kColRows, false, kP, kG, kPP, kGG, kPG>(p, g, v, rowlen, nv, minimize(s), lane, colf, stride);
}
NM_AVX512_TARGET __attribute__((noinline, flatten)) void loop_cols_pass2(float* p, const float* g, float* v, int64_t rowlen,
                                                                int64_t nv, const StepScalars<float>& s,
                                                                V (&lane)[kColRows][kNumStats], float* colf,
                                                                int64_t stride) {
  S512::pass<kColRows, true, kV, kVV, kPV, kGV>(p, g, v, rowlen, nv, minimize(s), lane, colf, stride);
}
// The product-only kernel (kProductSums: the scale and rescale laws' sums) in one pass, as the
// kernel runs it (in two passes of 3 sums each, as the all-9 kernel is split, it counted 4.81
// instructions and 36 B loaded per element against 4.44 and 24).
NM_AVX512_TARGET __attribute__((noinline, flatten)) void loop_products(float* p, const float* g, float* v, int64_t rowlen,
                                                              int64_t nv, const StepScalars<float>& s,
                                                              V (&lane)[kColRows][kNumStats], float* colf,
                                                              int64_t stride) {
  S512::pass<kColRows, true, kPP, kGG, kVV, kPG, kPV, kGV>(p, g, v, rowlen, nv, minimize(s), lane, colf, stride);
}
// The range check that precedes each chunk of a float32 statistics loop (product_range.h): p, g and
// v's magnitudes, read again from L1 by the loops above.
NM_AVX512_TARGET __attribute__((noinline, flatten)) bool loop_range(const float* p, const float* g, const float* v,
                                                           int64_t n, const ProductRange& r) {
  return chunk_in_range<float, true, false>(p, g, v, 0, n, r, r);
}
#else
#error "bench/loop_counts.cpp counts the x86-64 two-variant build's loops (GCC, without NM_OPTIM_NATIVE)"
#endif
