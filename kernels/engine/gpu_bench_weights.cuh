// gpu_bench_weights.cuh: random weights for the engine benchmarks (gpu_bench_engine, gpu_bench_dp), header-only
// and not part of the library: an 8B-shaped model is 8G elements, so the fill runs over host threads. Include it
// after distill/registry.h (inside the includer's extern "C" block).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

// Random weights of the scale a trained model has (uniform, std 1/sqrt(fan-in)); the Mamba tensors as an init.
// In chunks of 4M elements, each with its own seed, over host threads (an 8B model is 8G elements per model).
#define FILL_CHUNK ((int64_t)4 << 20)
static void fill_chunk(const TensorInfo *t, float *x, int i, int64_t j0, int64_t j1, uint64_t seed) {
    uint64_t x64 = seed * 0x9E3779B97F4A7C15ull + (uint64_t)i * 0xBF58476D1CE4E5B9ull + (uint64_t)(j0 / FILL_CHUNK + 1) * 0x94D049BB133111EBull;
    const double sd = t->ndim >= 2 ? 1.0 / sqrt((double)t->shape[t->ndim - 1]) : 0.0;
    const bool alog = strstr(t->name, "A_log"), dtb = strstr(t->name, "dt_proj.bias"), conv = strstr(t->name, "conv1d");
    for (int64_t j = j0; j < j1; j++) {
        if (alog) x[j] = logf(1.0f + (float)(j % t->shape[t->ndim - 1]));
        else if (dtb) x[j] = -4.0f;
        else if (t->ndim == 1 || conv) x[j] = conv ? 0.25f : 1.0f;
        else {
            x64 ^= x64 << 13, x64 ^= x64 >> 7, x64 ^= x64 << 17;
            x[j] = (float)(sd * (2.0 * ((x64 >> 11) * 0x1.0p-53) - 1.0) * 1.7320508);
        }
    }
}

static void bench_fill_random(const Registry *r, float *p, uint64_t seed) {
    std::vector<std::pair<int, int64_t>> work;  // (tensor, first element) of each chunk
    for (int i = 0; i < r->n; i++)
        for (int64_t j = 0; j < r->t[i].numel; j += FILL_CHUNK) work.push_back({i, j});
    std::atomic<size_t> next(0);
    auto run = [&]() {
        for (size_t w; (w = next++) < work.size();) {
            const TensorInfo *t = &r->t[work[w].first];
            fill_chunk(t, p + t->offset, work[w].first, work[w].second, std::min(t->numel, work[w].second + FILL_CHUNK), seed);
        }
    };
    unsigned nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency() / 2));
    std::vector<std::thread> th;
    for (unsigned k = 0; k < nt; k++) th.emplace_back(run);
    for (auto &x : th) x.join();
}
