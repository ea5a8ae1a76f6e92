// sample.c: see sample.h.
#include "distill/sample.h"

#include <math.h>
#include <stdlib.h>

#include "distill/common.h"

int32_t sample_argmax(const float *logits, int64_t V) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return (int32_t)best;
}

// (value, id) a comes before (value, id) b in sample_rank's order
static bool rank_before(float a, int64_t ia, float b, int64_t ib) {
    if (a != a) a = -INFINITY;
    if (b != b) b = -INFINITY;
    return a > b || (a == b && ia < ib);
}

int32_t sample_rank(const float *logits, int64_t V, int rank) {
    // rank + 1 passes: each finds the first element of the order after the previous pass's pick
    int64_t prev = -1;
    for (int r = 0; r <= rank && r < V; r++) {
        int64_t best = -1;
        for (int64_t i = 0; i < V; i++) {
            if (prev >= 0 && !rank_before(logits[prev], prev, logits[i], i)) continue;
            if (best < 0 || rank_before(logits[i], i, logits[best], best)) best = i;
        }
        prev = best;
    }
    return (int32_t)prev;
}

typedef struct {
    double p;
    int32_t id;
} Cand;

// descending probability, then ascending id: a total order, so the nucleus is reproducible
static int cand_cmp(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t sample_token(const float *logits, int64_t V, const SampleParams *p, Rng *rng) {
    if (p->greedy || !(p->temperature > 0)) return sample_argmax(logits, V);
    const double invT = 1.0 / p->temperature;
    const double top_p = p->top_p > 0 && p->top_p < 1 ? p->top_p : 1.0;
    double mx = -INFINITY;
    for (int64_t i = 0; i < V; i++) mx = fmax(mx, (double)logits[i] * invT);
    Cand *c = dl_malloc((size_t)V * sizeof(Cand));
    double sum = 0;
    for (int64_t i = 0; i < V; i++) {
        c[i].p = exp((double)logits[i] * invT - mx);
        c[i].id = (int32_t)i;
        sum += c[i].p;
    }
    int64_t n = V;
    double mass = sum;
    if (top_p < 1.0) {
        qsort(c, (size_t)V, sizeof(Cand), cand_cmp);
        double acc = 0;
        for (n = 0; n < V;) {
            acc += c[n].p;
            n++;
            if (acc >= top_p * sum) break;
        }
        mass = acc;
    }
    double u = rng_uniform_f64(rng) * mass, acc = 0;
    int32_t out = c[n - 1].id;
    for (int64_t i = 0; i < n; i++) {
        acc += c[i].p;
        if (u < acc) {
            out = c[i].id;
            break;
        }
    }
    free(c);
    return out;
}

void sample_probs(const float *logits, int64_t V, const SampleParams *p, double *probs) {
    if (p->greedy || !(p->temperature > 0)) {
        for (int64_t i = 0; i < V; i++) probs[i] = 0;
        probs[sample_argmax(logits, V)] = 1;
        return;
    }
    const double invT = 1.0 / p->temperature;
    const double top_p = p->top_p > 0 && p->top_p < 1 ? p->top_p : 1.0;
    double mx = -INFINITY, sum = 0;
    for (int64_t i = 0; i < V; i++) mx = fmax(mx, (double)logits[i] * invT);
    for (int64_t i = 0; i < V; i++) sum += probs[i] = exp((double)logits[i] * invT - mx);
    if (top_p < 1.0) {  // zero everything outside the nucleus
        Cand *c = dl_malloc((size_t)V * sizeof(Cand));
        for (int64_t i = 0; i < V; i++) c[i].p = probs[i], c[i].id = (int32_t)i;
        qsort(c, (size_t)V, sizeof(Cand), cand_cmp);
        double acc = 0;
        int64_t n = 0;
        while (n < V) {
            acc += c[n++].p;
            if (acc >= top_p * sum) break;
        }
        for (int64_t i = n; i < V; i++) probs[c[i].id] = 0;
        sum = acc;
        free(c);
    }
    for (int64_t i = 0; i < V; i++) probs[i] /= sum;
}

int32_t sample_from_probs(const double *probs, int64_t V, double u) {
    double sum = 0;
    for (int64_t i = 0; i < V; i++) sum += probs[i];
    double target = u * sum, acc = 0;
    int32_t last = -1;
    for (int64_t i = 0; i < V; i++) {
        if (probs[i] <= 0) continue;
        acc += probs[i];
        last = (int32_t)i;
        if (target < acc) return last;
    }
    return last < 0 ? 0 : last;  // rounding at the top end: the last token with mass
}
