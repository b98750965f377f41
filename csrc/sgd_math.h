// nm_optim: the SGD update of one element, shared by the CPU and CUDA kernels.
//
// PyTorch's SGD semantics (torch/optim/sgd.py, _single_tensor_sgd), in the compute type C
// (float for fp32/fp16/bf16 storage, double for fp64):
//   g  = grad * gmul                 gmul = +-1/grad_scale: AMP unscale and maximize in one
//                                    multiply (exact when there is no scale: x * +-1 is exact);
//                                    done by the caller, since the statistics need g too
//   d  = g + wd * p                  coupled weight decay, only when wd != 0 (as torch: p = inf
//                                    with wd = 0 must not turn d into nan)
//   v' = d                           first step: the buffer is a copy of d, no dampening
//   v' = mom * v + (1 - damp) * d    later steps
//   u  = d + mom * v'  (nesterov)    else u = v'
//   p' = p - lr * u
// The Python reference (nm_optim/reference.py) mirrors this branch structure.
#pragma once

#if defined(__CUDACC__)
#define NM_HD __host__ __device__ __forceinline__
#else
#define NM_HD inline __attribute__((always_inline))
#endif

namespace nm_optim {

template <typename C>
struct StepScalars {
  C neg_lr;           // -lr
  C weight_decay;
  C momentum;
  C one_minus_damp;   // 1 - dampening, rounded once as torch does (alpha=1 - dampening)
  C gmul;             // (maximize ? -1 : 1) / grad_scale
};

// Updates p (and v when MOM) in registers from g = grad * s.gmul (the statistics' g: after AMP
// unscaling and the maximize sign, before weight decay). FIRST: the buffer is created now (v' = d).
template <typename C, bool HAS_WD, bool MOM, bool FIRST, bool NESTEROV, typename V>
NM_HD void sgd_update(V& p, V g, V& v, const StepScalars<C>& s) {
  // V is C, or (CPU) a GCC vector of C: plain ifs on the constant flags, never a ?: on vectors.
  V d = g;
  if (HAS_WD) d = d + s.weight_decay * p;
  V u = d;
  if (MOM) {
    if (FIRST) {
      v = d;
    } else {
      v = s.momentum * v + s.one_minus_damp * d;
    }
    if (NESTEROV) u = d + s.momentum * v;
    else u = v;
  }
  p = p + s.neg_lr * u;
}

// The 9 statistics of the pre-step values, in nm_optim.STAT_NAMES order.
enum Stat { kP = 0, kG, kV, kPP, kGG, kVV, kPG, kPV, kGV, kNumStats };

}  // namespace nm_optim
