// rng.h: deterministic random numbers (xoshiro256**, seeded by splitmix64). The whole state is four
// uint64 values, saved in checkpoints so a resumed run draws the same numbers. Streams: derive an
// independent generator per purpose with rng_init(&r, seed, stream) (init, data order, sampling, ...).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint64_t s[4];
} Rng;

// Seeds from (seed, stream): different streams of one seed are independent.
void rng_init(Rng *r, uint64_t seed, uint64_t stream);
uint64_t rng_u64(Rng *r);
// Uniform in [0, 1) with 24 (float) or 53 (double) random bits.
float rng_uniform(Rng *r);
double rng_uniform_f64(Rng *r);
// Uniform integer in [0, n), without modulo bias.
uint64_t rng_below(Rng *r, uint64_t n);
// Standard normal (Box-Muller; uses two uniforms per call, no cached spare, so the state is all there is).
double rng_normal(Rng *r);

#ifdef __cplusplus
}
#endif
