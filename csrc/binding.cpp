// nm_optim._C: the pybind11 binding of the torch-free kernels. Pointers arrive as integers
// (tensor.data_ptr()); the Python layer (nm_optim/_native.py) checks devices, dtypes and layouts
// before calling, and this file checks what it can see: enum ranges, sizes, null tables.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sgd_step.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace nm_optim;

#ifndef NM_OPTIM_CUDA_ARCHS
#define NM_OPTIM_CUDA_ARCHS ""
#endif
#ifndef NM_OPTIM_CUDA_REASON
#define NM_OPTIM_CUDA_REASON ""
#endif

namespace {

DType to_dtype(int code) {
  if (code < 0 || code > 3) {
    throw std::invalid_argument("nm_optim._C: dtype code must be 0..3 (f32, f16, bf16, f64), got " +
                                std::to_string(code));
  }
  return static_cast<DType>(code);
}

BucketView to_bucket(int64_t n_tensors, std::uintptr_t numel, std::uintptr_t table, int64_t n_tiles,
                     std::uintptr_t tiles, int64_t tile_size) {
  if (n_tensors < 0 || n_tiles < 0) throw std::invalid_argument("nm_optim._C: negative table size");
  if (tile_size <= 0) {
    throw std::invalid_argument("nm_optim._C: tile_size must be positive, got " + std::to_string(tile_size));
  }
  if (n_tiles > 0 && (numel == 0 || table == 0 || tiles == 0)) {
    throw std::invalid_argument("nm_optim._C: null table pointer");
  }
  return BucketView{n_tensors, reinterpret_cast<const int64_t*>(numel),
                    reinterpret_cast<const int64_t*>(table), n_tiles,
                    reinterpret_cast<const int64_t*>(tiles), tile_size};
}

SGDHyper to_hyper(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                  bool maximize) {
  return SGDHyper{lr, momentum, dampening, weight_decay, nesterov, maximize};
}

AmpView to_amp(std::uintptr_t grad_scale, std::uintptr_t found_inf) {
  return AmpView{reinterpret_cast<const float*>(grad_scale), reinterpret_cast<const float*>(found_inf)};
}

StatsView to_stats(std::uintptr_t geom, std::uintptr_t offsets, std::uintptr_t out, std::uintptr_t sums) {
  if (out != 0 && (geom == 0 || offsets == 0)) {
    throw std::invalid_argument("nm_optim._C: statistics need geom and offsets tables");
  }
  return StatsView{reinterpret_cast<const int64_t*>(geom), reinterpret_cast<const int64_t*>(offsets),
                   reinterpret_cast<double*>(out), reinterpret_cast<const int64_t*>(sums)};
}

void step_cpu(int dtype, int64_t n_tensors, std::uintptr_t numel, std::uintptr_t table, int64_t n_tiles,
              std::uintptr_t tiles, int64_t tile_size, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, std::uintptr_t grad_scale,
              std::uintptr_t found_inf, std::uintptr_t stats_geom, std::uintptr_t stats_offsets,
              std::uintptr_t stats_out, int num_threads, std::uintptr_t stats_sums) {
  const DType dt = to_dtype(dtype);
  const BucketView b = to_bucket(n_tensors, numel, table, n_tiles, tiles, tile_size);
  const SGDHyper h = to_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize);
  const AmpView amp = to_amp(grad_scale, found_inf);
  const StatsView st = to_stats(stats_geom, stats_offsets, stats_out, stats_sums);
  py::gil_scoped_release release;
  sgd_step_cpu(dt, b, h, amp, st, num_threads);
}

#ifdef NM_OPTIM_WITH_CUDA
void step_cuda(int dtype, int64_t n_tensors, std::uintptr_t numel, std::uintptr_t table, int64_t n_tiles,
               std::uintptr_t tiles, int64_t tile_size, double lr, double momentum, double dampening,
               double weight_decay, bool nesterov, bool maximize, std::uintptr_t grad_scale,
               std::uintptr_t found_inf, std::uintptr_t lr_device, std::uintptr_t stats_tiles,
               int64_t n_stats_tiles, std::uintptr_t stats_scratch, std::uintptr_t stats_tasks,
               int64_t n_stats_tasks, std::uintptr_t stats_out, std::uintptr_t stream,
               std::uintptr_t stats_runs, int64_t n_stats_runs) {
  const DType dt = to_dtype(dtype);
  const BucketView b = to_bucket(n_tensors, numel, table, n_tiles, tiles, tile_size);
  const SGDHyper h = to_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize);
  const AmpView amp = to_amp(grad_scale, found_inf);
  if (stats_out != 0 && (stats_scratch == 0 || (n_stats_tiles > 0 && (stats_tiles == 0 || stats_runs == 0)) ||
                         (n_stats_tasks > 0 && stats_tasks == 0) || n_stats_runs < 0)) {
    throw std::invalid_argument("nm_optim._C: CUDA statistics need tiles, runs, scratch and tasks tables");
  }
  const CudaStatsView st{reinterpret_cast<const int64_t*>(stats_tiles), n_stats_tiles,
                         reinterpret_cast<double*>(stats_scratch), reinterpret_cast<const int64_t*>(stats_tasks),
                         n_stats_tasks, reinterpret_cast<double*>(stats_out),
                         reinterpret_cast<const int64_t*>(stats_runs), n_stats_runs};
  const char* err = sgd_step_cuda(dt, b, h, amp, reinterpret_cast<const float*>(lr_device), st, stream);
  if (err[0] != '\0') throw std::runtime_error(std::string("nm_optim CUDA kernel failed: ") + err);
}
#endif

py::dict build_info() {
  py::dict d;
#ifdef NM_OPTIM_WITH_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  d["cuda_archs"] = std::string(NM_OPTIM_CUDA_ARCHS);
  d["cuda_reason"] = std::string(NM_OPTIM_CUDA_REASON);
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
  // The CPU kernel's variant, chosen at run time as torch chooses its CPU kernels (sgd_math.h).
  const bool fused = sgd_cpu_fused_variant();
#if defined(NM_OPTIM_NATIVE)
  d["cpu_simd"] = std::string("native (-march=native)") +
                  (fused ? ", fused multiply-add" : ", unfused multiply-add");
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  d["cpu_simd"] = std::string(fused ? "fused variant (AVX2, FMA, F16C), chosen at run time"
                                    : "baseline variant (no FMA), chosen at run time") +
                  (sgd_cpu_avx512_stats() ? "; AVX-512 kernels for tracked tensors" : "");
#else
  d["cpu_simd"] = std::string("compiler default") +
                  (fused ? ", fused multiply-add" : ", unfused multiply-add");
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nm_optim kernels (torch-free): fused SGD step on CPU and CUDA";
  m.def("sgd_step_cpu", &step_cpu, "Fused SGD step over one CPU bucket", py::arg("dtype"),
        py::arg("n_tensors"), py::arg("numel"), py::arg("table"), py::arg("n_tiles"), py::arg("tiles"),
        py::arg("tile_size"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("stats_geom"), py::arg("stats_offsets"), py::arg("stats_out"),
        py::arg("num_threads"), py::arg("stats_sums") = 0);
#ifdef NM_OPTIM_WITH_CUDA
  m.def("sgd_step_cuda", &step_cuda, "Fused SGD step over one CUDA bucket (one launch)",
        py::arg("dtype"), py::arg("n_tensors"), py::arg("numel"), py::arg("table"), py::arg("n_tiles"),
        py::arg("tiles"), py::arg("tile_size"), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("lr_device"),
        py::arg("stats_tiles") = 0, py::arg("n_stats_tiles") = 0, py::arg("stats_scratch") = 0, py::arg("stats_tasks") = 0, py::arg("n_stats_tasks") = 0,
        py::arg("stats_out") = 0, py::arg("stream") = 0, py::arg("stats_runs") = 0, py::arg("n_stats_runs") = 0);
  m.def("cuda_device_count", &cuda_device_count);
#else
  m.def("cuda_device_count", []() { return 0; });
#endif
  m.def("build_info", &build_info);
  m.attr("STATS_TILE_ROWS") = kStatsTileRows;
  m.attr("STATS_TILE_COLS") = kStatsTileCols;
}
