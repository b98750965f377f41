// Cycles per element of the CPU kernel's tiles, without Python: the plain step, a "rows" track
// and "rows" + "cols" tracks with all 9 sums and with the 6 products only ("(6)"), on one [rows, cols] float32 tensor (momentum 0.9, weight decay
// 5e-4), cut into tiles of `tile_rows` rows as nm_optim's planner does (ops/plan.py,
// ROW_TILE_SIZE) and stepped by OpenMP threads. The numbers of docs/architecture.md, "The CPU
// statistics: what bounds them", come from here.
//
//   g++ -std=c++17 -O3 -ffp-contract=off -fopenmp -Wno-psabi -Icsrc -o /tmp/kernel_cycles bench/kernel_cycles.cpp
//   OMP_NUM_THREADS=1 /tmp/kernel_cycles 128 1024      # data in L1 / L2
//   OMP_NUM_THREADS=1 /tmp/kernel_cycles 1024 25088    # data in memory
//   OMP_NUM_THREADS=2 /tmp/kernel_cycles 4096 25088    # VGG-16's fc1 on two threads
//   OMP_NUM_THREADS=2 /tmp/kernel_cycles 4096 25088 20 20 49   # fc1 as [4096, 512, 49]: cols of 49
//
// Cycles are time-stamp-counter ticks (the nominal clock), per element and thread, the best of
// `reps` steps. The kernel's own tiles are called (it includes the kernel's source: they are
// internal to it); each tracked tile runs the kernel the extension would pick on this CPU.
#include "cpu/sgd_step_cpu.cpp"

#include <x86intrin.h>

#include <cstdio>
#include <random>

using namespace nm_optim;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s rows cols [reps=20] [tile_rows=20] [rest=1]\n", argv[0]);
    return 2;
  }
  const int64_t R = std::atoll(argv[1]), L = std::atoll(argv[2]);
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;
  const int64_t tile_rows = argc > 4 ? std::atoll(argv[4]) : 20;
  // Columns of `rest` consecutive elements each (a conv's kernel window; Flatten's positions).
  const int64_t rest = argc > 5 ? std::atoll(argv[5]) : 1;
  if (rest < 1 || L % rest != 0) {
    std::fprintf(stderr, "rest must divide cols\n");
    return 2;
  }
  const int64_t n = R * L;
  auto alloc = [](int64_t m) { return static_cast<float*>(std::aligned_alloc(64, (m * 4 + 63) / 64 * 64)); };
  float *p = alloc(n), *g = alloc(n), *v = alloc(n);
#pragma omp parallel
  {
    std::mt19937 rng(omp_get_thread_num());
    std::normal_distribution<float> normal;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {  // first touch by the thread that steps it
      p[i] = normal(rng);
      g[i] = normal(rng);
      v[i] = normal(rng);
    }
  }
  const int threads = omp_get_max_threads();
#if NM_TWO_VARIANTS
  const bool wide = use_avx512_stats();
#else
  const bool wide = false;
#endif
  // Per-thread scratch, as the kernel's Partials: float64 sums and the column partials.
  std::vector<std::vector<double>> rows(threads, std::vector<double>(kNumStats * R));
  std::vector<std::vector<double>> cols(threads, std::vector<double>(kNumStats * (L / rest)));
  std::vector<std::vector<float>> colf(threads, std::vector<float>(kNumStats * colf_stride(L / rest, rest, wide) + 16));
  const StepFlags flags{true, true, false};
  const StepScalars<float> s{-0.01f, 5e-4f, 0.9f, 1.0f, 1.0f};
  const int64_t n_tiles = (R + tile_rows - 1) / tile_rows;

  // products: the kernels that reduce only the 6 products (the scale and rescale laws' sums).
  auto tracked = [&](int64_t k, int tid, bool with_cols, bool products) {
    const TensorStats ts{R, L / rest, rest, rows[tid].data(), with_cols ? cols[tid].data() : nullptr, nullptr,
                         with_cols ? colf[tid].data() : nullptr};
    const int64_t begin = k * tile_rows * L, end = std::min(R, (k + 1) * tile_rows) * L;
#if NM_TWO_VARIANTS
    if (wide) return stats512_tile(p, g, v, begin, end, false, flags, ts, s, products);
#endif
    stats_tile(p, g, v, begin, end, false, flags, ts, s, products);
  };
  auto time = [&](const char* name, auto tile) {
    double best = 1e300;
    for (int r = 0; r < reps; ++r) {
      const uint64_t t0 = __rdtsc();
#pragma omp parallel for schedule(static)
      for (int64_t k = 0; k < n_tiles; ++k) tile(k, omp_get_thread_num());
      best = std::min(best, static_cast<double>(__rdtsc() - t0) * threads / n);
    }
    std::printf("%s %.2f  ", name, best);
  };
  time("plain", [&](int64_t k, int) {
    const int64_t begin = k * tile_rows * L, end = std::min(R, (k + 1) * tile_rows) * L;
    plain_tile(p + begin, g + begin, v + begin, end - begin, false, flags, s);
  });
  time("rows", [&](int64_t k, int tid) { tracked(k, tid, false, false); });
  time("rows+cols", [&](int64_t k, int tid) { tracked(k, tid, true, false); });
  time("rows(6)", [&](int64_t k, int tid) { tracked(k, tid, false, true); });
  time("rows+cols(6)", [&](int64_t k, int tid) { tracked(k, tid, true, true); });
  std::printf("cycles per element and thread (%d threads, %s)\n", threads,
              wide ? "AVX-512 statistics kernels" : "AVX2 / baseline kernels");
  std::free(p);
  std::free(g);
  std::free(v);
  return 0;
}
