// sample.h: choosing the next token from logits: greedy (argmax, lowest id on ties), or temperature
// sampling with optional nucleus (top-p) truncation, drawn from a deterministic rng.h stream.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/rng.h"

typedef struct {
    bool greedy;        // argmax; temperature and top_p are ignored
    float temperature;  // > 0; softmax(logits / temperature)
    float top_p;        // in (0, 1]: sample from the smallest set of most likely tokens with mass >= top_p
} SampleParams;

// Index of the largest logit (the lowest index among equal maxima).
int32_t sample_argmax(const float *logits, int64_t V);
// The token of rank `rank` (0: the argmax) in the order largest logit first, lower id first among equal logits,
// NaN counted as -inf: speculative branches (GenParams.branches) start their chains from ranks 0, 1, ...
int32_t sample_rank(const float *logits, int64_t V, int rank);
// One token from logits [V]. Deterministic for a given rng state; uses exactly one uniform draw unless greedy.
int32_t sample_token(const float *logits, int64_t V, const SampleParams *p, Rng *rng);

// The distribution sample_token draws from, as probabilities probs [V] (double, summing to 1): greedy gives
// one-hot at sample_argmax; otherwise softmax(logits / temperature) restricted to the top-p nucleus (the same
// nucleus as sample_token: most likely first, ties by lower id) and renormalized. Speculative sampling works
// on these, so greedy speculative decoding reduces to exact argmax matching.
void sample_probs(const float *logits, int64_t V, const SampleParams *p, double *probs);
// The token i with cumsum(probs)[i-1] <= u * sum(probs) < cumsum(probs)[i] (ids in order); u in [0, 1).
// Zero-probability tokens are never returned.
int32_t sample_from_probs(const double *probs, int64_t V, double u);
