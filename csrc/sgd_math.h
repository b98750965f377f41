// nm_optim: the SGD update of one element, shared by the CPU and CUDA kernels.
//
// PyTorch's SGD semantics (torch/optim/sgd.py):
//   g  = grad / grad_scale * gmul    gmul = +-1 (maximize; exact); AMP unscaling by a division
//                                    in the compute type, as torch's fused SGD, whose kernels
//                                    also write the quotient back to the grad (before the sign);
//                                    done by the caller, since the statistics need g too
//   d  = g + wd * p                  coupled weight decay, only when wd != 0 (as torch: p = inf
//                                    with wd = 0 must not turn d into nan)
//   v' = d                           first step: the buffer is a copy of d, no dampening
//   v' = mom * v + (1 - damp) * d    later steps
//   u  = d + mom * v'  (nesterov)    else u = v'
//   p' = p - lr * u
// and, beyond the semantics, torch's roundings: the update is bitwise torch's. Torch computes it
// differently on the CPU and on CUDA, so there are two flavours, one per device:
//
// * sgd_update_cpu: torch.optim.SGD's default on the CPU, the for-loop (_single_tensor_sgd), op by
//   op, each op rounding its result as its ATen CPU kernel does:
//     d  = grad.add(param, alpha=wd)          add: self + alpha * other
//     v' = buf.mul_(mom).add_(d, alpha=1-damp) mul: one rounding; then add
//     u  = d.add(v', alpha=mom)               (nesterov)
//     p' = param.add_(u, alpha=-lr)
//   ATen's add (ufunc/add.h) is vec::fmadd(other, alpha, self) in its vector body and
//   self + alpha * other in its scalar tail; alpha is converted to the tensor's dtype first (so
//   -lr, 1 - damp are rounded once from double, as here). What that is in bits depends on the CPU
//   kernel torch runs (its "CPU capability"), measured on x86-64 for every length 1..70 and
//   large odd ones, fp32 and fp64, bodies, tails and OpenMP chunk boundaries alike:
//     AVX2 / AVX512: one rounding (vfmadd; the scalar tail is contracted to an fma too)
//     DEFAULT (no AVX2+FMA, or ATEN_CPU_CAPABILITY=default): two roundings (mul, then add).
//   So the CPU kernel has a fused variant (FUSED = true: explicit fma, the AVX2+FMA build) and an
//   unfused one (FUSED = false: a * b + c, two roundings), picked at run time as torch picks its
//   kernels (csrc/cpu/sgd_step_cpu.cpp). madd() below is the only multiply-add; the CPU sources
//   are compiled with -ffp-contract=off so that the compiler contracts nothing else (a
//   contraction the compiler chooses is what made the statistics path differ from the plain
//   path, once).
//
// * sgd_update_cuda: torch's fused CUDA kernel (SGD(fused=True), _fused_sgd_kernel_cuda_ in
//   aten/src/ATen/native/cuda/FusedSgdKernel.cu, sgd_math), expression by expression. There the
//   hyper-parameters are double and p, g (and the loaded buffer) are opmath values (float for
//   fp32 / fp16 / bf16, double for fp64), so every expression is evaluated in double and rounded
//   to opmath when assigned: g += wd * p; buf = mom * v + (1 - damp) * g (a double, stored
//   rounded, but nesterov reads it unrounded); p -= lr * g. nvcc contracts a * b + c into an
//   fma by default (-fmad=true) and torch is compiled that way; the same expressions, compiled
//   by the same compiler with the same default, make the same contractions. ops/triton/
//   kernels.py::_update spells the contractions out with tl.fma (wd * p + g, mom * v +
//   ((1 - damp) * g), mom * buf + g, -lr * g + p: nvcc fuses the first product of a sum).
//
// fp16 / bf16 storage: computed in float32 (the same flavour as fp32) and rounded to the storage
// type once per step. Torch's for-loop rounds the result of every op to fp16 / bf16 (mul_, add_),
// so low-precision params and buffers are not torch's bits: each step is exactly torch's float32
// step on the upcast values, rounded once (more accurate than torch's per-op rounding).
//
// The Python reference (nm_optim/ops/reference.py) performs the CPU flavour with torch's own ops.
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#define NM_HD __host__ __device__ __forceinline__
#else
#define NM_HD inline __attribute__((always_inline))
#endif

namespace nm_optim {

// ---- CPU flavour: torch's for-loop op sequence ---------------------------------------------------

#if !defined(__CUDACC__)

template <typename C>
struct StepScalars {
  C neg_lr;           // alpha = -lr, rounded once from double to C (torch: alpha.to<scalar_t>())
  C weight_decay;
  C momentum;
  C one_minus_damp;   // alpha = 1 - dampening: computed in double, rounded once
  C gmul;             // maximize ? -1 : 1
  C grad_scale;       // GradScaler's scale (1 without one): g = grad / grad_scale * gmul
};

NM_HD float fused_madd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
NM_HD double fused_madd(double a, double b, double c) { return __builtin_fma(a, b, c); }

// a * b + c with torch's rounding: FUSED, one rounding (vec::fmadd on AVX2 / AVX512); else two
// (vec::fmadd in the DEFAULT build is a * b + c without FMA instructions). V is C or (CPU) a GCC
// vector of C; b is a scalar. The lane loop of the fused vector case compiles to one vfmadd per
// vector in the AVX2+FMA variant.
template <bool FUSED, typename V, typename C>
NM_HD V madd(V a, C b, V c) {
  if constexpr (!FUSED) {
    return a * b + c;  // -ffp-contract=off: the product is rounded, then the sum
  } else if constexpr (std::is_floating_point_v<V>) {
    return fused_madd(a, b, c);
  } else {
    constexpr int N = sizeof(V) / sizeof(C);
    V r;
    for (int l = 0; l < N; ++l) r[l] = fused_madd(a[l], b, c[l]);
    return r;
  }
}

// Updates p (and v when MOM) in registers from g = grad / grad_scale * gmul (the statistics' g: after AMP
// unscaling and the maximize sign, before weight decay). FIRST: the buffer is created now.
template <typename C, bool FUSED, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, typename V>
NM_HD void sgd_update_cpu(V& p, V g, V& v, const StepScalars<C>& s) {
  // Plain ifs on the constant flags, never a ?: on vectors.
  V d = g;
  if (HAS_WD) d = madd<FUSED>(p, s.weight_decay, g);               // grad.add(param, alpha=wd)
  V u = d;
  if (MOM) {
    if (FIRST) {
      v = d;                                                        // buf = grad.clone()
    } else {
      v = madd<FUSED>(d, s.one_minus_damp, v * s.momentum);         // buf.mul_(mom).add_(d, alpha=1-damp)
    }
    if (NESTEROV) u = madd<FUSED>(v, s.momentum, d);                // d.add(buf, alpha=mom)
    else u = v;
  }
  p = madd<FUSED>(u, s.neg_lr, p);                                  // param.add_(u, alpha=-lr)
}

#endif  // !__CUDACC__

// ---- CUDA flavour: torch's fused CUDA kernel -------------------------------------------------------

// The hyper-parameters as FusedSgdKernel.cu takes them: double (lr from a float32 device scalar
// is widened, as torch's lr_ptr).
struct FusedScalars {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
};

// O is the opmath type (float, or double for fp64). g: after unscaling and the maximize sign
// (torch: g /= (double)grad_scale; g *= -1.0). Each line is torch's; the implicit conversions
// (double expression -> O on assignment) are its roundings.
template <typename O, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV>
NM_HD void sgd_update_cuda(O& p, O g, O& v, const FusedScalars& s) {
  if (HAS_WD) g += s.weight_decay * p;
  if (MOM) {
    const double momentum_buffer =
        FIRST ? static_cast<double>(g) : (s.momentum * v + (1 - s.dampening) * g);
    v = static_cast<O>(momentum_buffer);
    if (NESTEROV) g = g + s.momentum * momentum_buffer;
    else g = static_cast<O>(momentum_buffer);
  }
  p -= s.lr * g;
}

// The 9 statistics of the pre-step values, in nm_optim.STAT_NAMES order.
enum Stat { kP = 0, kG, kV, kPP, kGG, kVV, kPG, kPV, kGV, kNumStats };

// The sets of sums a track may reduce (nm_optim/names.py, SUM_MASKS): all 9, or the 6 products
// (the scale and rescale laws' sums).
constexpr unsigned kAllSums = (1u << kNumStats) - 1;
constexpr unsigned kProductSums = (1u << kPP) | (1u << kGG) | (1u << kVV) | (1u << kPG) | (1u << kPV) | (1u << kGV);

}  // namespace nm_optim
