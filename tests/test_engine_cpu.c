// test_engine_cpu.c: the whole-model engine on tiny random models, a teacher (all attention, tied head,
// llama3 rope scaling) and two hybrids (attention + Mamba-1 layers, attention + Mamba-2 layers; untied head):
//  * gradients of every parameter tensor (sampled elements) against finite differences of the loss
//    (CE + forward KL + reverse KL with temperature, masks, packed documents, plus a hidden-state MSE);
//    the layers are checked against float64 in their own tests, so this checks the wiring;
//  * frozen tensors get no gradient and the trainable ones the same gradient as with everything trainable;
//  * prefill, chunked prefill and token-by-token decode give the logits of the full forward;
//  * a packed row with resets equals its documents run separately (logits and gradients);
//  * chunked head/loss streaming equals one chunk; the teacher-engine path equals given teacher logits;
//  * a repeated step gives bit-identical loss and gradients;
//  * the decoder: a ragged batched prefill (prompts of different lengths) then decode == each prompt alone;
//    a speculative window (feed K tokens, accept keep[b]) leaves the state of feeding only the kept tokens.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/engine.h"
#include "distill/layers_cpu.h"
#include "distill/rng.h"
#include "tests/check.h"

static Rng rng;

typedef struct {
    HybridConfig h;
    Registry r;
    float *p;
} Model;

// mixer: MIXER_ATTN for the teacher, else the hybrid's Mamba kind
static void model_make(Model *m, int mixer) {
    const bool hybrid = mixer != MIXER_ATTN;
    LlamaConfig c = {0};
    c.n_layer = 3;
    c.d_model = 32;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.head_dim = 8;
    c.d_ff = 48;
    c.vocab = 37;
    c.max_pos = 128;
    c.rope_theta = 10000;
    c.rms_eps = 1e-5;
    c.tied_embeddings = !hybrid;
    if (!hybrid) {
        c.rope_factor = 8, c.rope_low_freq_factor = 1, c.rope_high_freq_factor = 4, c.rope_orig_max_pos = 16;
    }
    c.bos_id = c.eos_id = -1;
    DlError e;
    if (hybrid) {
        int attn[1] = {1};
        if (hybrid_config_init(&m->h, &c, (MixerKind)mixer, attn, 1, &e)) {
            fprintf(stderr, "%s\n", e.msg);
            exit(1);
        }
    } else {
        hybrid_config_teacher(&m->h, &c);
    }
    model_build_registry(&m->h, &m->r);
    m->p = calloc((size_t)m->r.numel, sizeof(float));
    for (int i = 0; i < m->r.n; i++) {
        TensorInfo *t = &m->r.t[i];
        float *x = m->p + t->offset;
        for (int64_t k = 0; k < t->numel; k++) {
            double z = rng_normal(&rng);
            if (strstr(t->name, "norm")) x[k] = (float)(1 + 0.2 * z);
            else if (strstr(t->name, "A_log")) x[k] = (float)(log((double)(k % m->h.d_state + 1)) + 0.1 * z);
            else if (strstr(t->name, "dt_proj.bias")) x[k] = (float)(-2 + 0.3 * z);
            else if (strstr(t->name, ".D")) x[k] = (float)(1 + 0.2 * z);
            else if (strstr(t->name, "conv1d")) x[k] = (float)(0.4 * z);
            else x[k] = (float)(0.25 * z);
        }
    }
}

static void model_drop(Model *m) {
    free(m->p);
    reg_free(&m->r);
}

enum { B = 2, T = 9 };
static int32_t tokens[B * T], targets[B * T];
static uint8_t reset[B * T], mask[B * T];
static float *teacher_logits, *hid_target;
static const int HID = 2;  // hidden state with an MSE term

static void make_batch(int V) {
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            targets[b * T + t] = t + 1 < T ? tokens[b * T + t + 1] : -1;
            mask[b * T + t] = (b * T + t) % 5 != 3;
        }
    memset(reset, 0, sizeof reset);
    reset[4] = 1;           // row 0: documents [0,4) [4,9)
    reset[T + 2] = 1;       // row 1: [0,2) [2,7) [7,9)
    reset[T + 7] = 1;
    targets[3] = -1;        // no target across a document boundary
}

static LossSpec spec_for(const float *tl, int64_t chunk) {
    LossSpec s = {0};
    s.w = (LossWeights){1.0f, 0.5f, 0.25f, 1.5f};
    s.norm = 7.0;
    s.teacher_logits = tl;
    s.chunk_rows = chunk;
    return s;
}

// loss of one forward (+ hidden MSE), optionally with gradients
static double full_loss(Engine *e, const Model *m, float *grads) {
    LossSpec s = spec_for(teacher_logits, 5);
    engine_forward(e, tokens, reset);
    LossParts p = engine_loss(e, targets, mask, &s, grads, NULL);
    const int64_t n = (int64_t)B * T * m->h.base.d_model;
    float *dh = grads ? calloc((size_t)n, sizeof(float)) : NULL;
    double mse = mse_rows(B * T, m->h.base.d_model, engine_hidden(e, HID), hid_target, mask, 0.05, dh);
    if (grads) {
        engine_add_hidden_grad(e, HID, dh, 1.0f);
        engine_backward(e, grads);
        free(dh);
    }
    return p.loss + mse;
}

static void test_gradients(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab, d = m->h.base.d_model;
    teacher_logits = malloc((size_t)(B * T * V) * sizeof(float));
    for (int64_t i = 0; i < B * T * V; i++) teacher_logits[i] = (float)(2 * rng_normal(&rng));
    hid_target = malloc((size_t)(B * T * d) * sizeof(float));
    for (int64_t i = 0; i < B * T * d; i++) hid_target[i] = (float)rng_normal(&rng);
    Engine *e = engine_new(&m->h, &m->r, m->p, B, T, ENGINE_TRAIN, &err);
    CHECK(e != NULL);
    float *g = calloc((size_t)m->r.numel, sizeof(float));
    full_loss(e, m, g);
    // every tensor: up to 3 random elements and the element of largest |gradient|
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < m->r.n; i++) {
        const TensorInfo *t = &m->r.t[i];
        int64_t idx[4];
        int64_t amax = 0;
        for (int64_t k = 0; k < t->numel; k++)
            if (fabsf(g[t->offset + k]) > fabsf(g[t->offset + amax])) amax = k;
        idx[0] = amax;
        for (int k = 1; k < 4; k++) idx[k] = (int64_t)rng_below(&rng, (uint64_t)t->numel);
        double num = 0, den = 0;
        for (int k = 0; k < 4; k++) {
            float *x = m->p + t->offset + idx[k];
            const float x0 = *x, h = 1e-2f * fmaxf(1.0f, fabsf(x0));
            double f[4];
            const float steps[4] = {-2, -1, 1, 2};
            for (int s = 0; s < 4; s++) {
                *x = x0 + steps[s] * h;
                f[s] = full_loss(e, m, NULL);
            }
            *x = x0;
            double hh = (double)((x0 + h) - (x0 - h)) / 2;  // the step actually taken in fp32
            double fd = (8 * (f[2] - f[1]) - (f[3] - f[0])) / (12 * hh);
            double an = g[t->offset + idx[k]];
            num += (fd - an) * (fd - an);
            den += an * an;
        }
        double rel = sqrt(num / fmax(den, 1e-12));
        if (rel > worst) worst = rel, worst_name = t->name;
        char buf[160];
        snprintf(buf, sizeof buf, "%s: d/d %s vs FD", what, t->name);
        CHECK_REL(rel, 1e-2, buf);
        CHECK(den > 0);  // every tensor receives gradient
    }
    printf("%s: %d tensors, worst FD relative error %.2e (%s)\n", what, m->r.n, worst, worst_name);

    // determinism: the same step twice gives identical bits
    float *g2 = calloc((size_t)m->r.numel, sizeof(float));
    double l1 = full_loss(e, m, NULL);
    memset(g, 0, (size_t)m->r.numel * sizeof(float));
    full_loss(e, m, g);
    double l2 = full_loss(e, m, g2);
    CHECK(l1 == l2 && memcmp(g, g2, (size_t)m->r.numel * sizeof(float)) == 0);

    // freezing: only layer 1's MLP and layer 0's mixer train; the rest must get no gradient, and the
    // trainable ones the same gradient as before
    DlError pe;
    // (the hybrid's layer 2 Mamba mixer is frozen while layer 0's trains)
    const char *pat = hybrid_n_attn(&m->h) == m->h.base.n_layer ? "model.layers.1.mlp.*,model.layers.0.self_attn.*"
                                                                  : "model.layers.1.mlp.*,model.layers.0.mamba.*";
    CHECK(reg_set_trainable(&m->r, pat, &pe) > 0);
    Engine *ef = engine_new(&m->h, &m->r, m->p, B, T, ENGINE_TRAIN, &err);
    memset(g2, 0, (size_t)m->r.numel * sizeof(float));
    full_loss(ef, m, g2);
    double dmax = 0, frozen_abs = 0;
    for (int i = 0; i < m->r.n; i++) {
        const TensorInfo *t = &m->r.t[i];
        for (int64_t k = 0; k < t->numel; k++) {
            if (t->trainable) dmax = fmax(dmax, fabs(g2[t->offset + k] - g[t->offset + k]) / (fabs(g[t->offset + k]) + 1e-6));
            else frozen_abs += fabs(g2[t->offset + k]);
        }
    }
    CHECK_REL(dmax, 1e-5, "trainable grads unchanged by freezing others");
    CHECK(frozen_abs == 0);
    CHECK(reg_set_trainable(&m->r, "*", &pe) > 0);
    engine_free(ef);

    // chunked head/loss streaming == one chunk; teacher engine == teacher logits
    Engine *te = engine_new(&m->h, &m->r, m->p, B, T, 0, &err);
    engine_forward(te, tokens, reset);
    float *tl = malloc((size_t)(B * T * V) * sizeof(float));
    engine_logits(te, 0, B * T, tl);
    engine_forward(e, tokens, reset);
    LossSpec s1 = spec_for(tl, B * T), s2 = spec_for(NULL, 4);
    s2.teacher = te;
    double sl1[B], sl2[B];
    LossParts p1 = engine_loss(e, targets, mask, &s1, NULL, sl1);
    LossParts p2 = engine_loss(e, targets, mask, &s2, NULL, sl2);
    CHECK_REL(fabs(p1.loss - p2.loss) / fabs(p1.loss), 1e-6, "chunked + teacher engine loss");
    CHECK(fabs(p1.kl) < 1e-6 && fabs(p1.rkl) < 1e-6);  // the student is its own teacher
    CHECK_REL(fabs(sl1[0] - sl2[0]) + fabs(sl1[1] - sl2[1]), 1e-5, "sequence log-probs");
    // sequence log-prob = - CE sum of that row
    LossSpec sc = spec_for(NULL, 0);
    sc.w = (LossWeights){1, 0, 0, 1};
    sc.norm = 1;
    LossParts pc = engine_loss(e, targets, mask, &sc, NULL, NULL);
    CHECK_REL(fabs(-(sl1[0] + sl1[1]) - pc.ce) / pc.ce, 1e-6, "sum of seq log-probs == -CE");
    engine_free(te);
    free(tl);
    engine_free(e);
    free(g);
    free(g2);
    free(teacher_logits);
    free(hid_target);
}

static double max_rel(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += (double)b[i] * b[i];
    return sqrt(num / den);
}

// A batched decoder's logits got [n] against ref [n] from decoders that fed each sequence alone: CHECK_REL at
// 1e-5 under "what: claim", and the error printed as "what: tag vs alone".
static void check_vs_alone(const char *what, const char *claim, const char *tag, const float *got, const float *ref, int64_t n) {
    const double rel = max_rel(got, ref, n);
    char buf[200];
    snprintf(buf, sizeof buf, "%s: %s", what, claim);
    CHECK_REL(rel, 1e-5, buf);
    printf("%s: %s vs alone %.2e\n", what, tag, rel);
}

static void test_decode(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab;
    Engine *e = engine_new(&m->h, &m->r, m->p, B, T, 0, &err);
    engine_forward(e, tokens, NULL);
    float *ref = malloc((size_t)(B * T * V) * sizeof(float));
    engine_logits(e, 0, B * T, ref);
    Decoder *D = decoder_new(&m->h, &m->r, m->p, B, T, &err);
    CHECK(D != NULL);
    float *lg = malloc((size_t)(B * V) * sizeof(float)), *all = malloc((size_t)(B * T * V) * sizeof(float));
    float *got = malloc((size_t)(B * T * V) * sizeof(float));
    int32_t tk[B * T];
    // token by token
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) tk[b] = tokens[b * T + t];
        CHECK(decoder_feed(D, tk, 1, lg, NULL, &err) == 0);
        for (int b = 0; b < B; b++) memcpy(got + (b * T + t) * V, lg + b * V, (size_t)V * sizeof(float));
    }
    char buf[128];
    snprintf(buf, sizeof buf, "%s: token-by-token decode == forward", what);
    CHECK_REL(max_rel(got, ref, B * T * V), 1e-5, buf);
    CHECK(decoder_feed(D, tk, 1, lg, NULL, &err) != 0);  // past max_len: an error, not a crash
    // prefill of 5, then 4 one by one
    decoder_reset(D);
    for (int b = 0; b < B; b++) memcpy(tk + b * 5, tokens + b * T, 5 * sizeof(int32_t));
    CHECK(decoder_feed(D, tk, 5, lg, all, &err) == 0);
    for (int b = 0; b < B; b++) memcpy(got + b * T * V, all + b * 5 * V, (size_t)(5 * V) * sizeof(float));
    for (int t = 5; t < T; t++) {
        for (int b = 0; b < B; b++) tk[b] = tokens[b * T + t];
        decoder_feed(D, tk, 1, lg, NULL, &err);
        for (int b = 0; b < B; b++) memcpy(got + (b * T + t) * V, lg + b * V, (size_t)V * sizeof(float));
    }
    snprintf(buf, sizeof buf, "%s: prefill + decode == forward", what);
    CHECK_REL(max_rel(got, ref, B * T * V), 1e-5, buf);
    printf("%s: decode vs forward relative error %.2e\n", what, max_rel(got, ref, B * T * V));
    decoder_free(D);
    engine_free(e);
    free(ref), free(lg), free(all), free(got);
}

// a packed batch with resets == each document run alone (logits and gradients)
static void test_packed(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab;
    Engine *e = engine_new(&m->h, &m->r, m->p, B, T, ENGINE_TRAIN, &err);
    engine_forward(e, tokens, reset);
    float *ref = malloc((size_t)(B * T * V) * sizeof(float));
    engine_logits(e, 0, B * T, ref);
    LossSpec s = {0};
    s.w = (LossWeights){1, 0, 0, 1};
    s.norm = 1;
    float *gp = calloc((size_t)m->r.numel, sizeof(float)), *gs = calloc((size_t)m->r.numel, sizeof(float));
    engine_loss(e, targets, mask, &s, gp, NULL);
    engine_backward(e, gp);
    float *got = malloc((size_t)(B * T * V) * sizeof(float));
    for (int b = 0; b < B; b++) {
        int t0 = 0;
        for (int t = 1; t <= T; t++) {
            if (t < T && !reset[b * T + t]) continue;
            int L = t - t0;
            Engine *ed = engine_new(&m->h, &m->r, m->p, 1, L, ENGINE_TRAIN, &err);
            engine_forward(ed, tokens + b * T + t0, NULL);
            engine_logits(ed, 0, L, got + (b * T + t0) * V);
            engine_loss(ed, targets + b * T + t0, mask + b * T + t0, &s, gs, NULL);
            engine_backward(ed, gs);
            engine_free(ed);
            t0 = t;
        }
    }
    char buf[128];
    snprintf(buf, sizeof buf, "%s: packed logits == documents alone", what);
    CHECK_REL(max_rel(got, ref, B * T * V), 1e-5, buf);
    snprintf(buf, sizeof buf, "%s: packed grads == sum over documents", what);
    CHECK_REL(max_rel(gp, gs, m->r.numel), 1e-5, buf);
    printf("%s: packed vs separate: logits %.2e, grads %.2e\n", what, max_rel(got, ref, B * T * V), max_rel(gp, gs, m->r.numel));
    engine_free(e);
    free(ref), free(got), free(gp), free(gs);
}

// Determinism at shapes large enough that every parallel path runs (hybrid: attention + Mamba-1, 160 tokens
// per row, packed documents): two fresh engines give bit-identical loss and gradients. (Bits do depend on
// the OpenBLAS thread count: its threaded sgemm rounds differently from the serial one.)
static void test_determinism(void) {
    LlamaConfig c = {0};
    c.n_layer = 2, c.d_model = 128, c.n_head = 4, c.n_kv_head = 2, c.head_dim = 32, c.d_ff = 256, c.vocab = 300;
    c.max_pos = 512, c.rope_theta = 10000, c.rms_eps = 1e-5, c.bos_id = c.eos_id = -1;
    int attn[1] = {0};
    Model m;
    DlError err;
    CHECK(hybrid_config_init(&m.h, &c, MIXER_MAMBA1, attn, 1, &err) == 0);
    model_build_registry(&m.h, &m.r);
    m.p = calloc((size_t)m.r.numel, sizeof(float));
    for (int i = 0; i < m.r.n; i++) {
        TensorInfo *t = &m.r.t[i];
        for (int64_t k = 0; k < t->numel; k++)
            m.p[t->offset + k] = strstr(t->name, "norm") || strstr(t->name, ".D") ? 1.0f
                                 : strstr(t->name, "A_log") ? (float)log((double)(k % 16 + 1))
                                 : (float)(0.1 * rng_normal(&rng));
    }
    enum { BB = 2, TT = 160 };
    int32_t *tk = malloc(sizeof(int32_t) * BB * TT), *tg = malloc(sizeof(int32_t) * BB * TT);
    uint8_t *rs = calloc(BB * TT, 1);
    for (int i = 0; i < BB * TT; i++) tk[i] = (int32_t)rng_below(&rng, 300);
    for (int i = 0; i < BB * TT; i++) tg[i] = i % TT + 1 < TT ? tk[i + 1] : -1;
    rs[70] = rs[TT + 100] = 1;
    LossSpec s = {0};
    s.w = (LossWeights){1, 0.5f, 0, 1};  // CE + KL against the engine's own teacher logits of a shifted copy
    float *g1 = calloc((size_t)m.r.numel, sizeof(float)), *g2 = calloc((size_t)m.r.numel, sizeof(float));
    LossParts p[2];
    float *g[2] = {g1, g2};
    for (int k = 0; k < 2; k++) {
        Engine *te = engine_new(&m.h, &m.r, m.p, BB, TT, 0, &err), *e = engine_new(&m.h, &m.r, m.p, BB, TT, ENGINE_TRAIN, &err);
        engine_forward(te, tk, NULL);  // teacher: same tokens without document resets
        s.teacher = te;
        p[k] = engine_step(e, tk, rs, tg, NULL, &s, g[k]);
        engine_free(e);
        engine_free(te);
    }
    CHECK(p[0].loss == p[1].loss && p[0].kl > 0);
    CHECK(memcmp(g1, g2, (size_t)m.r.numel * sizeof(float)) == 0);
    free(g1), free(g2), free(tk), free(tg), free(rs);
    model_drop(&m);
}

// layer-range forward (layerwise alignment): layers [1, 3) from hidden state 1 == the full forward
static void test_range(Model *m) {
    DlError err;
    const int64_t d = m->h.base.d_model, V = m->h.base.vocab;
    Engine *e = engine_new(&m->h, &m->r, m->p, B, T, ENGINE_KEEP_HIDDEN, &err);
    engine_forward(e, tokens, reset);
    float *h1 = malloc((size_t)(B * T * d) * sizeof(float)), *l1 = malloc((size_t)(B * T * V) * sizeof(float));
    float *l2 = malloc((size_t)(B * T * V) * sizeof(float));
    memcpy(h1, engine_hidden(e, 1), (size_t)(B * T * d) * sizeof(float));
    engine_logits(e, 0, B * T, l1);
    engine_forward_range(e, tokens, reset, 1, h1, m->h.base.n_layer);
    engine_logits(e, 0, B * T, l2);
    CHECK(memcmp(l1, l2, (size_t)(B * T * V) * sizeof(float)) == 0);
    engine_free(e);
    free(h1), free(l1), free(l2);
}

// Ragged batched prefill: prompts of lengths 3, 7, 5 (padded to 7 with junk) prefilled together, then 2
// decode steps, give each prompt's logits alone (a batch of 1) — attention masks each sequence's padding
// and the Mamba state stops at each sequence's own length.
static void test_ragged(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab;
    enum { BR = 3, LM = 7, STEPS = 2 };
    const int64_t n[BR] = {3, 7, 5};
    int32_t tk[BR * LM], nxt[STEPS][BR];
    for (int i = 0; i < BR * LM; i++) tk[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int s = 0; s < STEPS; s++)
        for (int b = 0; b < BR; b++) nxt[s][b] = (int32_t)rng_below(&rng, (uint64_t)V);
    Decoder *D = decoder_new(&m->h, &m->r, m->p, BR, LM + STEPS, &err);
    float *lg = malloc((size_t)(BR * V) * sizeof(float)), *got = malloc((size_t)((STEPS + 1) * BR * V) * sizeof(float));
    float *ref = malloc((size_t)((STEPS + 1) * BR * V) * sizeof(float));
    CHECK(decoder_feed_ragged(D, tk, LM, n, got, NULL, &err) == 0);
    for (int b = 0; b < BR; b++) CHECK(decoder_seq_len(D, b) == n[b]);
    for (int s = 0; s < STEPS; s++) CHECK(decoder_feed(D, nxt[s], 1, got + (s + 1) * BR * V, NULL, &err) == 0);
    const int64_t bad[BR] = {0, 7, 5};
    CHECK(decoder_feed_ragged(D, tk, LM, bad, lg, NULL, &err) != 0);  // n[b] outside 1..L: an error
    Decoder *D1 = decoder_new(&m->h, &m->r, m->p, 1, LM + STEPS, &err);
    for (int b = 0; b < BR; b++) {
        decoder_reset(D1);
        decoder_feed(D1, tk + b * LM, n[b], ref + b * V, NULL, &err);
        for (int s = 0; s < STEPS; s++) decoder_feed(D1, &nxt[s][b], 1, ref + ((s + 1) * BR + b) * V, NULL, &err);
    }
    check_vs_alone(what, "ragged batched prefill + decode == each prompt alone", "ragged batch", got, ref, (STEPS + 1) * BR * V);
    decoder_free(D), decoder_free(D1);
    free(lg), free(got), free(ref);
}

// Continuous batching (the generate stage): sequence 1 is emptied with decoder_reset_seq while 0 and 2 keep
// running; its new prompt is prefilled in a ragged feed beside their next tokens. Every sequence's logits equal
// those of a decoder that fed it alone (for 1: only the new prompt, so no trace of the old one is left).
static void test_reset_seq(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab;
    enum { BR = 3, LM = 6, LN = 5, ML = 24 };
    const int64_t n[BR] = {4, 6, 2};
    int32_t tk[BR * LM], np[LN], s1[BR], s2[BR], s3[BR];
    for (int i = 0; i < BR * LM; i++) tk[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int i = 0; i < LN; i++) np[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int b = 0; b < BR; b++)
        s1[b] = (int32_t)rng_below(&rng, (uint64_t)V), s2[b] = (int32_t)rng_below(&rng, (uint64_t)V),
        s3[b] = (int32_t)rng_below(&rng, (uint64_t)V);
    Decoder *D = decoder_new(&m->h, &m->r, m->p, BR, ML, &err), *D1 = decoder_new(&m->h, &m->r, m->p, 1, ML, &err);
    float *got = malloc((size_t)(2 * BR * V) * sizeof(float)), *ref = malloc((size_t)(2 * BR * V) * sizeof(float));
    float *tmp = malloc((size_t)V * sizeof(float));
    CHECK(decoder_feed_ragged(D, tk, LM, n, got, NULL, &err) == 0);
    CHECK(decoder_feed(D, s1, 1, got, NULL, &err) == 0);
    CHECK(decoder_reset_seq(D, 3, &err) != 0);  // outside the batch: an error
    CHECK(decoder_reset_seq(D, 1, &err) == 0);
    CHECK(decoder_seq_len(D, 1) == 0 && decoder_seq_len(D, 0) == n[0] + 1);
    int32_t mix[BR * LN] = {0};
    const int64_t nm[BR] = {1, LN, 1};
    mix[0] = s2[0], mix[2 * LN] = s2[2];
    memcpy(mix + LN, np, sizeof np);
    CHECK(decoder_feed_ragged(D, mix, LN, nm, got, NULL, &err) == 0);
    CHECK(decoder_feed(D, s3, 1, got + BR * V, NULL, &err) == 0);
    for (int b = 0; b < BR; b++) {
        decoder_reset(D1);
        if (b == 1) {
            decoder_feed(D1, np, LN, ref + b * V, NULL, &err);
        } else {
            decoder_feed(D1, tk + b * LM, n[b], tmp, NULL, &err);
            decoder_feed(D1, &s1[b], 1, tmp, NULL, &err);
            decoder_feed(D1, &s2[b], 1, ref + b * V, NULL, &err);
        }
        decoder_feed(D1, &s3[b], 1, ref + (BR + b) * V, NULL, &err);
    }
    check_vs_alone(what, "a sequence emptied and refilled beside running ones == each alone", "reset_seq + refill", got, ref,
                   2 * BR * V);
    decoder_free(D), decoder_free(D1);
    free(got), free(ref), free(tmp);
}

// The generate stage's refill: a prompt prefilled in a decoder of its own (row 1 of 2) is copied into slot 0 of a
// running batch (decoder_copy_seq); the next steps' logits equal those of a decoder that fed it alone, and the
// other slot is untouched.
static void test_copy_seq(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab;
    enum { LN = 5, ML = 16 };
    int32_t np[LN], pad[2 * LN] = {0}, run0[2], st1[2], st2[2];
    for (int i = 0; i < LN; i++) np[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int b = 0; b < 2; b++)
        run0[b] = (int32_t)rng_below(&rng, (uint64_t)V), st1[b] = (int32_t)rng_below(&rng, (uint64_t)V),
        st2[b] = (int32_t)rng_below(&rng, (uint64_t)V);
    Decoder *D = decoder_new(&m->h, &m->r, m->p, 2, ML, &err), *P = decoder_new(&m->h, &m->r, m->p, 2, LN, &err),
            *D1 = decoder_new(&m->h, &m->r, m->p, 1, ML, &err);
    float *got = malloc((size_t)(4 * V) * sizeof(float)), *ref = malloc((size_t)(4 * V) * sizeof(float)), *tmp = malloc((size_t)(2 * V) * sizeof(float));
    CHECK(decoder_feed(D, run0, 1, tmp, NULL, &err) == 0 && decoder_feed(D, run0, 1, tmp, NULL, &err) == 0);
    memcpy(pad + LN, np, sizeof np);
    const int64_t pn[2] = {1, LN};
    CHECK(decoder_feed_ragged(P, pad, LN, pn, tmp, NULL, &err) == 0);
    CHECK(decoder_copy_seq(D, 0, P, 2, &err) != 0);  // outside the source batch: an error
    CHECK(decoder_copy_seq(D, 0, P, 1, &err) == 0);
    CHECK(decoder_seq_len(D, 0) == LN && decoder_seq_len(D, 1) == 2);
    CHECK(decoder_feed(D, st1, 1, got, NULL, &err) == 0 && decoder_feed(D, st2, 1, got + 2 * V, NULL, &err) == 0);
    decoder_feed(D1, np, LN, tmp, NULL, &err);  // slot 0 alone: the prompt, then st1[0], st2[0]
    decoder_feed(D1, &st1[0], 1, ref, NULL, &err);
    decoder_feed(D1, &st2[0], 1, ref + 2 * V, NULL, &err);
    decoder_reset(D1);  // slot 1 alone: run0 twice, then st1[1], st2[1]
    decoder_feed(D1, &run0[1], 1, tmp, NULL, &err);
    decoder_feed(D1, &run0[1], 1, tmp, NULL, &err);
    decoder_feed(D1, &st1[1], 1, ref + V, NULL, &err);
    decoder_feed(D1, &st2[1], 1, ref + 3 * V, NULL, &err);
    check_vs_alone(what, "a prompt prefilled apart and copied into a running batch == each alone", "copy_seq", got, ref, 4 * V);
    decoder_free(D), decoder_free(P), decoder_free(D1);
    free(got), free(ref), free(tmp);
}

// Speculative window: after a prefill of 4, feed K = 4 tokens in a window (as verification does: one
// multi-token feed), accept keep = {1, 4} and {0, 2}, then decode 2 tokens: the logits equal those of a
// decoder fed only the kept tokens. Also a window of single-token feeds (a draft model's proposals).
static void test_window(Model *m, const char *what) {
    DlError err;
    const int64_t V = m->h.base.vocab;
    enum { BW = 2, P0 = 4, K = 4, AFTER = 2, ML = P0 + K + AFTER };
    int32_t pr[BW * P0], win[BW * K], aft[AFTER][BW];
    for (int i = 0; i < BW * P0; i++) pr[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int i = 0; i < BW * K; i++) win[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int s = 0; s < AFTER; s++)
        for (int b = 0; b < BW; b++) aft[s][b] = (int32_t)rng_below(&rng, (uint64_t)V);
    const int32_t keeps[3][BW] = {{1, 4}, {0, 2}, {3, 3}};
    float *got = malloc((size_t)(AFTER * BW * V) * sizeof(float)), *ref = malloc((size_t)(AFTER * BW * V) * sizeof(float));
    float *all = malloc((size_t)(BW * K * V) * sizeof(float));
    Decoder *D = decoder_new(&m->h, &m->r, m->p, BW, ML, &err), *D1 = decoder_new(&m->h, &m->r, m->p, 1, ML, &err);
    double worst = 0;
    for (int c = 0; c < 3; c++)
        for (int single = 0; single < 2; single++) {
            decoder_reset(D);
            CHECK(decoder_feed(D, pr, P0, NULL, NULL, &err) == 0);
            decoder_window_begin(D);
            if (single) {
                for (int t = 0; t < K; t++) {
                    int32_t col[BW];
                    for (int b = 0; b < BW; b++) col[b] = win[b * K + t];
                    CHECK(decoder_feed(D, col, 1, NULL, NULL, &err) == 0);
                }
            } else {
                CHECK(decoder_feed(D, win, K, NULL, all, &err) == 0);
            }
            CHECK(decoder_accept(D, keeps[c], &err) == 0);
            for (int b = 0; b < BW; b++) CHECK(decoder_seq_len(D, b) == P0 + keeps[c][b]);
            for (int s = 0; s < AFTER; s++) CHECK(decoder_feed(D, aft[s], 1, got + s * BW * V, NULL, &err) == 0);
            for (int b = 0; b < BW; b++) {
                decoder_reset(D1);
                int32_t seq[ML];
                memcpy(seq, pr + b * P0, P0 * sizeof(int32_t));
                memcpy(seq + P0, win + b * K, (size_t)keeps[c][b] * sizeof(int32_t));
                decoder_feed(D1, seq, P0 + keeps[c][b], NULL, NULL, &err);
                for (int s = 0; s < AFTER; s++) decoder_feed(D1, &aft[s][b], 1, ref + (s * BW + b) * V, NULL, &err);
            }
            double rel = max_rel(got, ref, AFTER * BW * V);
            worst = fmax(worst, rel);
            char buf[128];
            snprintf(buf, sizeof buf, "%s: window accept {%d,%d} (%s) == kept tokens only", what, keeps[c][0],
                     keeps[c][1], single ? "single feeds" : "one feed");
            CHECK_REL(rel, 1e-5, buf);
        }
    int32_t over[BW] = {5, 0};
    decoder_window_begin(D);
    CHECK(decoder_accept(D, over, &err) != 0);  // more than the window fed: an error
    printf("%s: speculative window accept vs kept-only worst %.2e\n", what, worst);
    decoder_free(D), decoder_free(D1);
    free(got), free(ref), free(all);
}

int main(void) {
    rng_init(&rng, 7, 0);
    Model teacher, hybrid, hybrid2;
    model_make(&teacher, MIXER_ATTN);
    model_make(&hybrid, MIXER_MAMBA1);
    model_make(&hybrid2, MIXER_MAMBA2);
    make_batch(teacher.h.base.vocab);
    test_gradients(&teacher, "teacher");
    test_gradients(&hybrid, "hybrid");
    test_gradients(&hybrid2, "hybrid-mamba2");
    test_decode(&teacher, "teacher");
    test_decode(&hybrid, "hybrid");
    test_decode(&hybrid2, "hybrid-mamba2");
    test_packed(&teacher, "teacher");
    test_packed(&hybrid, "hybrid");
    test_packed(&hybrid2, "hybrid-mamba2");
    test_range(&hybrid);
    test_range(&hybrid2);
    test_ragged(&teacher, "teacher");
    test_ragged(&hybrid, "hybrid");
    test_ragged(&hybrid2, "hybrid-mamba2");
    test_reset_seq(&teacher, "teacher");
    test_reset_seq(&hybrid, "hybrid");
    test_reset_seq(&hybrid2, "hybrid-mamba2");
    test_copy_seq(&teacher, "teacher");
    test_copy_seq(&hybrid, "hybrid");
    test_copy_seq(&hybrid2, "hybrid-mamba2");
    test_window(&teacher, "teacher");
    test_window(&hybrid, "hybrid");
    test_window(&hybrid2, "hybrid-mamba2");
    test_determinism();
    DlError err;
    HybridConfig h2 = hybrid.h;
    h2.mixer[0] = MIXER_MAMBA2;
    CHECK(engine_new(&h2, &hybrid.r, hybrid.p, 1, 4, 0, &err) == NULL);  // Mamba-1 registry, Mamba-2 config: an error
    CHECK(decoder_new(&h2, &hybrid.r, hybrid.p, 1, 4, &err) == NULL);
    model_drop(&hybrid2);
    model_drop(&teacher);
    model_drop(&hybrid);
    return check_report("test_engine_cpu");
}
