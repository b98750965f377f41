// nm_optim CPU kernel: the step without statistics (torch-free; included by
// csrc/cpu/sgd_step_cpu.cpp only).
#pragma once

#include "step_common.h"

namespace nm_optim {
namespace {

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

}  // namespace
}  // namespace nm_optim
