// tiny_model.h: a small random teacher (Llama, GQA) and its Mamba-1 hybrid made by hybrid_init_from_teacher,
// plus a deterministic synthetic batch source with a savable position. Shared by the pipeline tests.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/mamba_init.h"
#include "distill/model.h"
#include "distill/rng.h"
#include "distill/train_loop.h"

typedef struct {
    HybridConfig h;
    Registry r;
    float *p;
} TinyModel;

static inline void tiny_config(LlamaConfig *c, int n_layer, bool tied) {
    memset(c, 0, sizeof *c);
    c->n_layer = n_layer;
    c->d_model = 32;
    c->n_head = 4;
    c->n_kv_head = 2;
    c->head_dim = 8;  // d_inner 32, d_xb 16: multiples of d_state 16
    c->d_ff = 48;
    c->vocab = 37;
    c->max_pos = 128;
    c->rope_theta = 10000;
    c->rms_eps = 1e-5;
    c->tied_embeddings = tied;
    c->bos_id = 1;
    c->eos_id = 2;
}

// A teacher with N(0, 0.2) matrices and norms near 1.
static inline void tiny_teacher(TinyModel *m, int n_layer, bool tied, uint64_t seed) {
    LlamaConfig c;
    tiny_config(&c, n_layer, tied);
    hybrid_config_teacher(&m->h, &c);
    model_build_registry(&m->h, &m->r);
    m->p = calloc((size_t)m->r.numel, sizeof(float));
    Rng g;
    rng_init(&g, seed, 99);
    for (int i = 0; i < m->r.n; i++) {
        TensorInfo *t = &m->r.t[i];
        for (int64_t k = 0; k < t->numel; k++)
            m->p[t->offset + k] = (float)(t->role == ROLE_NORM ? 1.0 + 0.1 * rng_normal(&g) : 0.2 * rng_normal(&g));
    }
}

// The hybrid of teacher t keeping attention at attn[0..n_attn), initialized from it.
static inline void tiny_hybrid(TinyModel *m, const TinyModel *t, const int *attn, int n_attn, uint64_t seed) {
    DlError e;
    if (hybrid_config_init(&m->h, &t->h.base, MIXER_MAMBA1, attn, n_attn, &e)) {
        fprintf(stderr, "tiny_hybrid: %s\n", e.msg);
        exit(1);
    }
    model_build_registry(&m->h, &m->r);
    m->p = calloc((size_t)m->r.numel, sizeof(float));
    if (hybrid_init_from_teacher(&m->h, &m->r, m->p, &t->h, &t->r, t->p, seed, &e)) {
        fprintf(stderr, "tiny_hybrid: %s\n", e.msg);
        exit(1);
    }
}

static inline void tiny_free(TinyModel *m) {
    reg_free(&m->r);
    free(m->p);
}

// Synthetic data: documents of random length drawn from a fixed "language" (each token usually followed by
// (3*tok+1) mod V), packed into rows with resets; the position is the RNG state plus a counter.
typedef struct {
    Rng rng;
    int64_t batches;
    int V;
} SynthSource;

static inline int synth_next(void *ctx, TrainBatch *b, DlError *e) {
    SynthSource *s = ctx;
    (void)e;
    for (int64_t r = 0; r < b->B; r++) {
        int32_t *tk = b->tokens + r * b->T;
        int64_t left = 0;
        for (int64_t t = 0; t < b->T; t++) {
            bool start = left == 0;
            if (start) left = 3 + (int64_t)rng_below(&s->rng, 8);
            tk[t] = start ? 1 : (rng_uniform(&s->rng) < 0.8f ? (3 * tk[t - 1] + 1) % s->V : (int32_t)rng_below(&s->rng, (uint64_t)s->V));
            b->reset[r * b->T + t] = start;
            left--;
        }
        for (int64_t t = 0; t < b->T; t++) {
            bool has_next = t + 1 < b->T && !b->reset[r * b->T + t + 1];
            b->targets[r * b->T + t] = has_next ? tk[t + 1] : -1;
            b->mask[r * b->T + t] = has_next;
        }
    }
    s->batches++;
    return 0;
}

static inline void synth_save(void *ctx, CkptState *st) {
    SynthSource *s = ctx;
    ckpt_state_set_rng(st, "synth", &s->rng);
    ckpt_state_set_int(st, "synth.batches", s->batches);
}

static inline int synth_restore(void *ctx, const CkptState *st, DlError *e) {
    SynthSource *s = ctx;
    if (ckpt_state_get_rng(st, "synth", &s->rng, e)) return -1;
    return ckpt_state_get_int(st, "synth.batches", &s->batches, e);
}

static inline BatchSource synth_source(SynthSource *s, uint64_t seed, int V) {
    rng_init(&s->rng, seed, 7);
    s->batches = 0;
    s->V = V;
    return (BatchSource){s, synth_next, synth_save, synth_restore, NULL};
}
