// engine_cpu.c: whole-model forward/backward orchestration and decoding on the CPU (see engine.h).
// Layer math lives in layers_cpu.c (attention, norms, MLP), mamba1_cpu.c and mamba2_cpu.c (the Mamba mixers).
#include "distill/engine.h"

#include <math.h>
#include <string.h>

#include "distill/draft_vocab.h"
#include "distill/layers_cpu.h"
#include "distill/mamba1_cpu.h"
#include "distill/mamba2_cpu.h"

// ---------------------------------------------------------------- weights by registry name

typedef struct {
    int64_t off;     // element offset in params / grads
    bool trainable;
} WRef;

typedef struct {
    WRef in_norm, q, k, v, o, post_norm, gate, up, down;  // q..o only for attention layers
} LayerW;

typedef struct {
    LayerW *layer;   // [n_layer]
    WRef emb, fnorm, head;  // head == emb when tied
    int lowest;      // lowest layer holding a trainable tensor; -1 if the embedding is trainable
} ModelW;

static int wref(const Registry *r, WRef *w, int64_t numel, DlError *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int i = reg_vlookup(r, numel, "engine", e, fmt, ap);
    va_end(ap);
    if (i < 0) return -1;
    w->off = r->t[i].offset;
    w->trainable = r->t[i].trainable;
    return 0;
}

static int model_w_init(ModelW *mw, const HybridConfig *h, const Registry *r, DlError *e) {
    const LlamaConfig *c = &h->base;
    const int64_t d = c->d_model, qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    const int64_t ff = c->d_ff, V = c->vocab;
    memset(mw, 0, sizeof *mw);
    mw->layer = dl_calloc((size_t)c->n_layer, sizeof(LayerW));
    if (wref(r, &mw->emb, V * d, e, "model.embed_tokens.weight")) return -1;
    if (wref(r, &mw->fnorm, d, e, "model.norm.weight")) return -1;
    if (c->tied_embeddings) mw->head = mw->emb;
    else if (wref(r, &mw->head, V * d, e, "lm_head.weight")) return -1;
    for (int l = 0; l < c->n_layer; l++) {
        LayerW *w = &mw->layer[l];
        // the mixers look their tensors up themselves: check one per kind here so a registry of the wrong
        // variant is an error, not a crash inside the mixer
        WRef probe;
        if (h->mixer[l] == MIXER_MAMBA1 &&
            wref(r, &probe, (int64_t)h->d_inner * d, e, "model.layers.%d.mamba.in_proj_z.weight", l))
            return -1;
        if (h->mixer[l] == MIXER_MAMBA2 && wref(r, &probe, h->d_inner, e, "model.layers.%d.mamba.norm.weight", l))
            return -1;
        if (wref(r, &w->in_norm, d, e, "model.layers.%d.input_layernorm.weight", l) ||
            wref(r, &w->post_norm, d, e, "model.layers.%d.post_attention_layernorm.weight", l) ||
            wref(r, &w->gate, ff * d, e, "model.layers.%d.mlp.gate_proj.weight", l) ||
            wref(r, &w->up, ff * d, e, "model.layers.%d.mlp.up_proj.weight", l) ||
            wref(r, &w->down, d * ff, e, "model.layers.%d.mlp.down_proj.weight", l))
            return -1;
        if (h->mixer[l] == MIXER_ATTN &&
            (wref(r, &w->q, qd * d, e, "model.layers.%d.self_attn.q_proj.weight", l) ||
             wref(r, &w->k, kvd * d, e, "model.layers.%d.self_attn.k_proj.weight", l) ||
             wref(r, &w->v, kvd * d, e, "model.layers.%d.self_attn.v_proj.weight", l) ||
             wref(r, &w->o, d * qd, e, "model.layers.%d.self_attn.o_proj.weight", l)))
            return -1;
    }
    mw->lowest = c->n_layer;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        if (!t->trainable) continue;
        if (t->layer >= 0 && t->layer < mw->lowest) mw->lowest = t->layer;
        if (t->role == ROLE_EMBED) mw->lowest = -1;
    }
    if (mw->lowest < 0) mw->lowest = -1;
    return 0;
}

static float *pw(const float *P, WRef w) { return (float *)P + w.off; }
static float *gw(float *G, WRef w) { return w.trainable ? G + w.off : NULL; }

// ---------------------------------------------------------------- shared layer pieces

// q, k, v [N, qd / kvd] from the normed input, RoPE applied at pos.
static void attn_qkv(const LlamaConfig *c, const LayerW *w, const float *P, const float *inv_freq, int64_t N,
                     const float *xn, const int32_t *pos, float *q, float *k, float *v) {
    const int64_t d = c->d_model, qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    linear_fwd(q, xn, pw(P, w->q), N, d, qd, false);
    linear_fwd(k, xn, pw(P, w->k), N, d, kvd, false);
    linear_fwd(v, xn, pw(P, w->v), N, d, kvd, false);
    rope_apply(q, pos, inv_freq, N, c->n_head, c->head_dim, false);
    rope_apply(k, pos, inv_freq, N, c->n_kv_head, c->head_dim, false);
}

// The MLP half of a decoder layer: out = mid + down(silu(gate(xn2)) * up(xn2)), xn2 = RMSNorm_post(mid).
static void mlp_fwd(const LlamaConfig *c, const LayerW *w, const float *P, int64_t N, const float *mid, float *out,
                    float *xn2, float *rstd2, float *gate, float *up, float *act) {
    const int64_t d = c->d_model, ff = c->d_ff;
    rmsnorm_fwd(xn2, rstd2, mid, pw(P, w->post_norm), N, d, (float)c->rms_eps);
    linear_fwd(gate, xn2, pw(P, w->gate), N, d, ff, false);
    linear_fwd(up, xn2, pw(P, w->up), N, d, ff, false);
    swiglu_fwd(act, gate, up, N * ff);
    memcpy(out, mid, (size_t)(N * d) * sizeof(float));
    linear_fwd(out, act, pw(P, w->down), N, ff, d, true);
}

// ---------------------------------------------------------------- engine

typedef struct {
    float *xn1, *rstd1, *q, *k, *v, *att, *lse, *mid, *xn2, *rstd2, *gate, *up, *act;  // [N, ...]
    Mamba1Acts *mamba;
    Mamba2Acts *mamba2;
} LayerActs;

struct Engine {
    HybridConfig h;
    const Registry *r;
    const float *params;
    int64_t B, T, N;
    int flags;
    ModelW w;
    float inv_freq[512];
    int32_t *tokens, *pos, *doc_start;  // [N]
    uint8_t *reset;                     // [N], or NULL in the last forward
    uint8_t *reset_buf;
    float *resid;      // hidden states [n_states, N, d]: all n_layer+1 when kept, else 2 (ping-pong)
    int n_states;
    LayerActs *acts;   // [n_layer] when training, else [1] shared by all layers
    float *mix;        // [N, d] Mamba mixer output
    float *xf, *rstdf; // final norm output [N, d], 1/rms [N]
    int l0, l1, last_state;
    // backward
    float *dxf;        // [N, d] d loss / d xf, set by engine_loss
    bool have_dxf;
    float **dhid;      // [n_layer+1] gradients added to hidden states (lazily allocated)
    bool *has_dhid;
    float *dres, *dmid, *dxn, *dff1, *dff2, *dq, *dk, *dv, *datt;
    float *lbuf, *tbuf;  // engine_loss: logits chunks of the student and the teacher [lcap]
    int64_t lcap;
};

static float *fbuf(int64_t n) { return dl_malloc((size_t)DL_MAX(n, 1) * sizeof(float)); }

// mamba_train: the Mamba kind whose training activations to keep (MIXER_ATTN: none)
static void acts_alloc(LayerActs *a, const HybridConfig *h, int64_t B, int64_t T, bool attn, int mamba_train) {
    const LlamaConfig *c = &h->base;
    const int64_t N = B * T, d = c->d_model, ff = c->d_ff;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    memset(a, 0, sizeof *a);
    a->xn1 = fbuf(N * d);
    a->rstd1 = fbuf(N);
    a->mid = fbuf(N * d);
    a->xn2 = fbuf(N * d);
    a->rstd2 = fbuf(N);
    a->gate = fbuf(N * ff);
    a->up = fbuf(N * ff);
    a->act = fbuf(N * ff);
    if (attn) {
        a->q = fbuf(N * qd);
        a->k = fbuf(N * kvd);
        a->v = fbuf(N * kvd);
        a->att = fbuf(N * qd);
        a->lse = fbuf(B * c->n_head * T);
    }
    if (mamba_train == MIXER_MAMBA1) a->mamba = mamba1_acts_new(h, B, T);
    if (mamba_train == MIXER_MAMBA2) a->mamba2 = mamba2_acts_new(h, B, T);
}

static void acts_free(LayerActs *a) {
    float *bufs[] = {a->xn1, a->rstd1, a->q, a->k, a->v, a->att, a->lse, a->mid, a->xn2, a->rstd2, a->gate, a->up, a->act};
    for (size_t i = 0; i < DL_ARRAY_LEN(bufs); i++) free(bufs[i]);
    if (a->mamba) mamba1_acts_free(a->mamba);
    if (a->mamba2) mamba2_acts_free(a->mamba2);
}

Engine *engine_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T, int flags,
                   DlError *err) {
    const LlamaConfig *c = &h->base;
    if (B <= 0 || T <= 0) {
        dl_fail(err, "engine: batch %lld x seqlen %lld must be positive", (long long)B, (long long)T);
        return NULL;
    }
    if (c->head_dim > 1024) {
        dl_fail(err, "engine: head_dim %d > 1024 not supported", c->head_dim);
        return NULL;
    }
    Engine *e = dl_calloc(1, sizeof *e);
    e->h = *h;
    e->r = r;
    e->params = params;
    e->B = B;
    e->T = T;
    e->N = B * T;
    e->flags = flags;
    if (model_w_init(&e->w, h, r, err)) {
        free(e->w.layer);
        free(e);
        return NULL;
    }
    rope_inv_freq(c, e->inv_freq);
    const int64_t N = e->N, d = c->d_model;
    const bool train = flags & ENGINE_TRAIN, keep = train || (flags & ENGINE_KEEP_HIDDEN);
    e->tokens = dl_malloc((size_t)N * sizeof(int32_t));
    e->pos = dl_malloc((size_t)N * sizeof(int32_t));
    e->doc_start = dl_malloc((size_t)N * sizeof(int32_t));
    e->reset_buf = dl_malloc((size_t)N);
    e->n_states = keep ? c->n_layer + 1 : 2;
    e->resid = fbuf(e->n_states * N * d);
    e->mix = fbuf(N * d);
    e->xf = fbuf(N * d);
    e->rstdf = fbuf(N);
    bool any_attn = hybrid_n_attn(h) > 0;
    if (train) {
        e->acts = dl_calloc((size_t)c->n_layer, sizeof(LayerActs));
        for (int l = 0; l < c->n_layer; l++) acts_alloc(&e->acts[l], h, B, T, h->mixer[l] == MIXER_ATTN, h->mixer[l]);
    } else {
        e->acts = dl_calloc(1, sizeof(LayerActs));
        acts_alloc(&e->acts[0], h, B, T, any_attn, MIXER_ATTN);
    }
    e->last_state = -1;
    return e;
}

void engine_free(Engine *e) {
    if (!e) return;
    int na = (e->flags & ENGINE_TRAIN) ? e->h.base.n_layer : 1;
    for (int l = 0; l < na; l++) acts_free(&e->acts[l]);
    free(e->acts);
    if (e->dhid) {
        for (int i = 0; i <= e->h.base.n_layer; i++) free(e->dhid[i]);
        free(e->dhid);
        free(e->has_dhid);
    }
    float *bufs[] = {e->resid, e->mix, e->xf, e->rstdf, e->dxf, e->dres, e->dmid, e->dxn, e->dff1, e->dff2,
                     e->dq, e->dk, e->dv, e->datt, e->lbuf, e->tbuf};
    for (size_t i = 0; i < DL_ARRAY_LEN(bufs); i++) free(bufs[i]);
    free(e->tokens);
    free(e->pos);
    free(e->doc_start);
    free(e->reset_buf);
    free(e->w.layer);
    free(e);
}

int64_t engine_batch(const Engine *e) { return e->B; }
int64_t engine_seqlen(const Engine *e) { return e->T; }

static float *state_ptr(const Engine *e, int i) {
    int slot = e->n_states == e->h.base.n_layer + 1 ? i : i % 2;
    return e->resid + (int64_t)slot * e->N * e->h.base.d_model;
}

static LayerActs *layer_acts(Engine *e, int l) { return (e->flags & ENGINE_TRAIN) ? &e->acts[l] : &e->acts[0]; }

static void layer_fwd(Engine *e, int l, const float *x, float *out) {
    const LlamaConfig *c = &e->h.base;
    const LayerW *w = &e->w.layer[l];
    const float *P = e->params;
    const int64_t N = e->N, d = c->d_model, qd = (int64_t)c->n_head * c->head_dim;
    LayerActs *a = layer_acts(e, l);
    rmsnorm_fwd(a->xn1, a->rstd1, x, pw(P, w->in_norm), N, d, (float)c->rms_eps);
    if (e->h.mixer[l] == MIXER_ATTN) {
        attn_qkv(c, w, P, e->inv_freq, N, a->xn1, e->pos, a->q, a->k, a->v);
        AttnShape s = {e->B, e->T, e->T, 0, c->n_head, c->n_kv_head, c->head_dim};
        attention_fwd(&s, a->q, a->k, a->v, e->doc_start, a->att, a->lse);
        memcpy(a->mid, x, (size_t)(N * d) * sizeof(float));
        linear_fwd(a->mid, a->att, pw(P, w->o), N, qd, d, true);
    } else {
        if (e->h.mixer[l] == MIXER_MAMBA2) mamba2_forward(&e->h, e->r, P, l, e->B, e->T, a->xn1, e->reset, e->mix, a->mamba2);
        else mamba1_forward(&e->h, e->r, P, l, e->B, e->T, a->xn1, e->reset, e->mix, a->mamba);
        for (int64_t i = 0; i < N * d; i++) a->mid[i] = x[i] + e->mix[i];
    }
    mlp_fwd(c, w, P, N, a->mid, out, a->xn2, a->rstd2, a->gate, a->up, a->act);
}

void engine_forward_range(Engine *e, const int32_t *tokens, const uint8_t *reset, int l0, const float *x0, int l1) {
    const LlamaConfig *c = &e->h.base;
    const int64_t N = e->N, d = c->d_model;
    if (l0 < 0) l0 = 0;
    if (l1 > c->n_layer) l1 = c->n_layer;
    for (int64_t i = 0; i < N; i++)  // data readers validate ids; this guards the embedding lookup itself
        if (tokens[i] < 0 || tokens[i] >= c->vocab)
            dl_die(DL_EXIT_INPUT, "engine: token id %d at position %lld is outside the vocabulary 0..%d", tokens[i],
                   (long long)i, c->vocab - 1);
    memcpy(e->tokens, tokens, (size_t)N * sizeof(int32_t));
    e->reset = NULL;
    if (reset) {
        memcpy(e->reset_buf, reset, (size_t)N);
        e->reset = e->reset_buf;
    }
    doc_positions(e->B, e->T, e->reset, e->pos, e->doc_start);
    e->l0 = l0;
    e->l1 = l1;
    float *x = state_ptr(e, l0);
    if (x0) memcpy(x, x0, (size_t)(N * d) * sizeof(float));
    else embedding_fwd(x, tokens, pw(e->params, e->w.emb), N, d);
    for (int l = l0; l < l1; l++) layer_fwd(e, l, state_ptr(e, l), state_ptr(e, l + 1));
    e->last_state = l1;
    if (l1 == c->n_layer)
        rmsnorm_fwd(e->xf, e->rstdf, state_ptr(e, l1), pw(e->params, e->w.fnorm), N, d, (float)c->rms_eps);
    e->have_dxf = false;
    if (e->has_dhid) memset(e->has_dhid, 0, (size_t)(c->n_layer + 1) * sizeof(bool));
}

void engine_forward(Engine *e, const int32_t *tokens, const uint8_t *reset) {
    engine_forward_range(e, tokens, reset, 0, NULL, e->h.base.n_layer);
}

const float *engine_hidden(const Engine *e, int i) {
    if (i < 0 || i > e->h.base.n_layer) return NULL;
    if (e->n_states == 2 && i != e->last_state) return NULL;
    return state_ptr(e, i);
}

const float *engine_final_hidden(const Engine *e) { return e->xf; }

void engine_logits(const Engine *e, int64_t r0, int64_t r1, float *out) {
    const LlamaConfig *c = &e->h.base;
    linear_fwd(out, e->xf + r0 * c->d_model, pw(e->params, e->w.head), r1 - r0, c->d_model, c->vocab, false);
}

LossParts engine_loss(Engine *e, const int32_t *targets, const uint8_t *mask, const LossSpec *spec, float *grads,
                      double *seq_logprob) {
    const LlamaConfig *c = &e->h.base;
    const int64_t N = e->N, T = e->T, d = c->d_model, V = c->vocab;
    const float *W = pw(e->params, e->w.head);
    // rows counted: mask != 0 and, when targets are given, a valid target
    uint8_t *cnt = dl_malloc((size_t)N);
    double n_count = 0;
    for (int64_t r = 0; r < N; r++) {
        cnt[r] = (!mask || mask[r]) && (!targets || (targets[r] >= 0 && targets[r] < V));
        n_count += cnt[r];
    }
    double norm = spec->norm > 0 ? spec->norm : n_count;
    float *rw = NULL;
    if (spec->seq_weight) {
        rw = fbuf(N);
        for (int64_t r = 0; r < N; r++) rw[r] = spec->seq_weight[r / T];
    }
    int64_t chunk = spec->chunk_rows > 0 ? spec->chunk_rows : DL_MAX(1, (16 << 20) / V);
    chunk = DL_MIN(chunk, N);
    // logits chunks are kept between calls (fresh 64 MB buffers would be page-faulted in every step)
    if (chunk * V > e->lcap) {
        free(e->lbuf);
        free(e->tbuf);
        e->lbuf = fbuf(chunk * V);
        e->tbuf = NULL;
        e->lcap = chunk * V;
    }
    if (spec->teacher && !e->tbuf) e->tbuf = fbuf(e->lcap);
    float *lbuf = e->lbuf, *tbuf = e->tbuf;
    float *logp = seq_logprob ? fbuf(chunk) : NULL;
    if (seq_logprob)
        for (int64_t b = 0; b < e->B; b++) seq_logprob[b] = 0;
    if (grads && !e->dxf) e->dxf = fbuf(N * d);
    LossSums sums = {0};
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        int64_t n = DL_MIN(chunk, N - r0);
        linear_fwd(lbuf, e->xf + r0 * d, W, n, d, V, false);  // [n, V]
        const float *tl = NULL;
        if (spec->teacher_logits) tl = spec->teacher_logits + r0 * V;
        else if (spec->teacher) {
            engine_logits(spec->teacher, r0, r0 + n, tbuf);
            tl = tbuf;
        }
        if (spec->teacher_topk > 0) {
            const int k = spec->teacher_topk;
            loss_rows_topk(&spec->w, n, V, lbuf, k, spec->teacher_topk_ids + r0 * k, spec->teacher_topk_logp + r0 * k,
                           targets ? targets + r0 : NULL, cnt + r0, rw ? rw + r0 : NULL, 1.0 / norm, grads ? lbuf : NULL,
                           &sums, logp);
        } else {
            loss_rows(&spec->w, n, V, lbuf, tl, targets ? targets + r0 : NULL, cnt + r0, rw ? rw + r0 : NULL,
                      1.0 / norm, grads ? lbuf : NULL, &sums, logp);
        }
        if (seq_logprob)
            for (int64_t i = 0; i < n; i++) seq_logprob[(r0 + i) / T] += logp[i];
        if (grads)  // dxf = dlogits @ W, dW += dlogits^T xf
            linear_bwd(e->dxf + r0 * d, false, gw(grads, e->w.head), lbuf, e->xf + r0 * d, W, n, d, V);
    }
    e->have_dxf = grads != NULL;
    free(cnt);
    free(rw);
    free(logp);
    LossParts p = {0};
    p.norm = norm;
    p.loss = loss_total(&spec->w, &sums, norm);
    p.ce = sums.ce / norm;
    p.kl = sums.kl / norm;
    p.rkl = sums.rkl / norm;
    p.n_tokens = sums.n_rows;
    return p;
}

void engine_add_hidden_grad(Engine *e, int i, const float *dh, float scale) {
    const int nl = e->h.base.n_layer;
    const int64_t n = e->N * e->h.base.d_model;
    if (i < 0 || i > nl) return;
    if (!e->dhid) {
        e->dhid = dl_calloc((size_t)nl + 1, sizeof(float *));
        e->has_dhid = dl_calloc((size_t)nl + 1, sizeof(bool));
    }
    if (!e->dhid[i]) e->dhid[i] = fbuf(n);
    if (!e->has_dhid[i]) {
        memset(e->dhid[i], 0, (size_t)n * sizeof(float));
        e->has_dhid[i] = true;
    }
    float *g = e->dhid[i];
    for (int64_t k = 0; k < n; k++) g[k] += scale * dh[k];
}

static void bwd_alloc(Engine *e) {
    if (e->dres) return;
    const LlamaConfig *c = &e->h.base;
    const int64_t N = e->N, d = c->d_model, ff = c->d_ff;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    e->dres = fbuf(N * d);
    e->dmid = fbuf(N * d);
    e->dxn = fbuf(N * d);
    e->dff1 = fbuf(N * ff);
    e->dff2 = fbuf(N * ff);
    if (hybrid_n_attn(&e->h) > 0) {
        e->dq = fbuf(N * qd);
        e->datt = fbuf(N * qd);
        e->dk = fbuf(N * kvd);
        e->dv = fbuf(N * kvd);
    }
}

// dres: in, d loss / d (output of layer l); out, d loss / d (input of layer l).
static void layer_bwd(Engine *e, int l, float *dres, float *G) {
    const LlamaConfig *c = &e->h.base;
    const LayerW *w = &e->w.layer[l];
    const float *P = e->params;
    const int64_t N = e->N, d = c->d_model, ff = c->d_ff;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    LayerActs *a = &e->acts[l];
    const float *x = state_ptr(e, l);
    // MLP half: out = mid + down(act)
    linear_bwd(e->dff1, false, gw(G, w->down), dres, a->act, pw(P, w->down), N, ff, d);  // dact
    swiglu_bwd(e->dff1, e->dff2, e->dff1, a->gate, a->up, N * ff);                       // dgate, dup
    linear_bwd(e->dxn, false, gw(G, w->gate), e->dff1, a->xn2, pw(P, w->gate), N, d, ff);
    linear_bwd(e->dxn, true, gw(G, w->up), e->dff2, a->xn2, pw(P, w->up), N, d, ff);
    memcpy(e->dmid, dres, (size_t)(N * d) * sizeof(float));
    rmsnorm_bwd(e->dmid, gw(G, w->post_norm), e->dxn, a->mid, pw(P, w->post_norm), a->rstd2, N, d);
    // mixer half: mid = x + mixer(xn1)
    memcpy(dres, e->dmid, (size_t)(N * d) * sizeof(float));
    if (e->h.mixer[l] == MIXER_ATTN) {
        linear_bwd(e->datt, false, gw(G, w->o), e->dmid, a->att, pw(P, w->o), N, qd, d);
        AttnShape s = {e->B, e->T, e->T, 0, c->n_head, c->n_kv_head, c->head_dim};
        attention_bwd(&s, a->q, a->k, a->v, e->doc_start, a->att, a->lse, e->datt, e->dq, e->dk, e->dv);
        rope_apply(e->dq, e->pos, e->inv_freq, N, c->n_head, c->head_dim, true);
        rope_apply(e->dk, e->pos, e->inv_freq, N, c->n_kv_head, c->head_dim, true);
        linear_bwd(e->dxn, false, gw(G, w->q), e->dq, a->xn1, pw(P, w->q), N, d, qd);
        linear_bwd(e->dxn, true, gw(G, w->k), e->dk, a->xn1, pw(P, w->k), N, d, kvd);
        linear_bwd(e->dxn, true, gw(G, w->v), e->dv, a->xn1, pw(P, w->v), N, d, kvd);
    } else {
        // the mixer's backward adds into all its tensors: keep frozen ones untouched
        const Registry *r = e->r;
        int64_t nsave = 0, ntrain = 0;
        for (int i = 0; i < r->n; i++)
            if (r->t[i].layer == l && r->t[i].role == ROLE_MAMBA) *(r->t[i].trainable ? &ntrain : &nsave) += r->t[i].numel;
        float *save = nsave && ntrain ? fbuf(nsave) : NULL;  // all frozen: no grads at all (NULL below)
        for (int i = 0, k = 0; i < r->n && save; i++)
            if (r->t[i].layer == l && r->t[i].role == ROLE_MAMBA && !r->t[i].trainable) {
                memcpy(save + k, G + r->t[i].offset, (size_t)r->t[i].numel * sizeof(float));
                k += r->t[i].numel;
            }
        if (e->h.mixer[l] == MIXER_MAMBA2)
            mamba2_backward(&e->h, e->r, P, l, e->B, e->T, e->reset, e->dmid, e->dxn, ntrain ? G : NULL, a->mamba2);
        else
            mamba1_backward(&e->h, e->r, P, l, e->B, e->T, e->reset, e->dmid, e->dxn, ntrain ? G : NULL, a->mamba);
        for (int i = 0, k = 0; i < r->n && save; i++)
            if (r->t[i].layer == l && r->t[i].role == ROLE_MAMBA && !r->t[i].trainable) {
                memcpy(G + r->t[i].offset, save + k, (size_t)r->t[i].numel * sizeof(float));
                k += r->t[i].numel;
            }
        free(save);
    }
    rmsnorm_bwd(dres, gw(G, w->in_norm), e->dxn, x, pw(P, w->in_norm), a->rstd1, N, d);
}

void engine_backward(Engine *e, float *G) {
    const LlamaConfig *c = &e->h.base;
    const int64_t N = e->N, d = c->d_model;
    if (!(e->flags & ENGINE_TRAIN)) dl_die(DL_EXIT_RUNTIME, "engine_backward on an engine made without ENGINE_TRAIN");
    bwd_alloc(e);
    // the highest layer whose output has a gradient
    int top = -1;
    if (e->have_dxf) top = e->l1 - 1;
    for (int i = e->l1; i > e->l0 && e->has_dhid; i--)
        if (e->has_dhid[i] && i - 1 > top) top = i - 1;
    memset(e->dres, 0, (size_t)(N * d) * sizeof(float));
    if (e->have_dxf)
        rmsnorm_bwd(e->dres, gw(G, e->w.fnorm), e->dxf, state_ptr(e, e->l1), pw(e->params, e->w.fnorm), e->rstdf, N, d);
    const int stop = DL_MAX(e->l0, e->w.lowest);
    for (int l = top; l >= stop; l--) {
        if (e->has_dhid && e->has_dhid[l + 1]) vec_add(e->dres, e->dhid[l + 1], N * d);
        layer_bwd(e, l, e->dres, G);
    }
    if (e->l0 == 0 && e->w.emb.trainable && e->w.lowest < 0) {
        if (e->has_dhid && e->has_dhid[0]) vec_add(e->dres, e->dhid[0], N * d);
        embedding_bwd(G + e->w.emb.off, e->dres, e->tokens, N, d);
    }
    e->have_dxf = false;
    if (e->has_dhid) memset(e->has_dhid, 0, (size_t)(c->n_layer + 1) * sizeof(bool));
}

LossParts engine_step(Engine *e, const int32_t *tokens, const uint8_t *reset, const int32_t *targets,
                      const uint8_t *mask, const LossSpec *spec, float *grads) {
    engine_forward(e, tokens, reset);
    LossParts p = engine_loss(e, targets, mask, spec, grads, NULL);
    if (grads) engine_backward(e, grads);
    return p;
}

// ---------------------------------------------------------------- decoder

// Recurrent state of one Mamba layer of either kind.
typedef struct {
    int kind;  // MIXER_MAMBA1 / MIXER_MAMBA2
    Mamba1State m1;
    Mamba2State m2;
} MState;

static MState mstate_new(const HybridConfig *h, int kind, int64_t B) {
    MState m = {.kind = kind};
    if (kind == MIXER_MAMBA1) m.m1 = mamba1_state_new(h, B);
    else m.m2 = mamba2_state_new(h, B);
    return m;
}
static void mstate_free(MState *m) {
    if (m->kind == MIXER_MAMBA1) mamba1_state_free(&m->m1);
    else mamba2_state_free(&m->m2);
}
static void mstate_reset(MState *m, int64_t b) {  // b = -1: every sequence
    if (m->kind == MIXER_MAMBA1) mamba1_state_reset(&m->m1, b);
    else mamba2_state_reset(&m->m2, b);
}
static void mstate_copy(MState *dst, const MState *src) {
    if (src->kind == MIXER_MAMBA1) mamba1_state_copy(&dst->m1, &src->m1);
    else mamba2_state_copy(&dst->m2, &src->m2);
}
// L tokens x [B, L, d] -> out [B, L, d] from the state in m; keep [B] (or NULL: all L) as *_multistep.
static void mstate_run(const HybridConfig *h, const Registry *r, const float *P, int l, MState *m, int64_t B,
                       int64_t L, const float *x, const int32_t *keep, float *out) {
    const bool m1 = m->kind == MIXER_MAMBA1;
    if (keep) {
        if (m1) mamba1_multistep(h, r, P, l, B, L, x, keep, out, &m->m1);
        else mamba2_multistep(h, r, P, l, B, L, x, keep, out, &m->m2);
    } else if (L == 1) {
        if (m1) mamba1_step(h, r, P, l, B, x, &m->m1, out);
        else mamba2_step(h, r, P, l, B, x, &m->m2, out);
    } else {
        if (m1) mamba1_prefill(h, r, P, l, B, L, x, NULL, out, &m->m1);
        else mamba2_prefill(h, r, P, l, B, L, x, NULL, out, &m->m2);
    }
}

struct Decoder {
    HybridConfig h;
    const Registry *r;
    const float *params;
    int64_t B, max_len;
    int64_t *len;         // [B] tokens fed per sequence
    ModelW w;
    float inv_freq[512];
    float **kc, **vc;     // per attention layer: [B, max_len, kvd]; rows past len[b] are dead (rollback = len reset)
    MState *ms;           // per Mamba layer
    // speculative window (decoder_window_begin .. decoder_accept): the Mamba states and lengths at its start
    // and every Mamba layer's mixer inputs fed since, so the state after any accepted prefix is replayed
    // from the cached state by one multi-step run (no per-token states stored)
    bool win;
    int64_t win_n, win_cap;  // tokens per sequence fed in the window; capacity of win_x
    int64_t *win_len0;       // [B]
    MState *ms0;             // per Mamba layer: state at the window start
    float **win_x;           // per Mamba layer: [B, win_cap, d] mixer inputs
    int64_t cap;          // rows the scratch below holds
    float *x, *y, *xn, *rstd, *q, *k, *v, *att, *mid, *gate, *up, *act, *mix, *last;
    int32_t *pos, *keep;
    // a trimmed head (decoder_set_head_ids): hn rows of the head, ids ascending; hout [hcap, hn] scratch
    int64_t hn, hcap;
    int32_t *hid;
    float *hw, *hout;
};

Decoder *decoder_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t max_len,
                     DlError *err) {
    const LlamaConfig *c = &h->base;
    if (B <= 0 || max_len <= 0) {
        dl_fail(err, "decoder: batch %lld x length %lld must be positive", (long long)B, (long long)max_len);
        return NULL;
    }
    if (c->head_dim > 1024) {
        dl_fail(err, "decoder: head_dim %d > 1024 not supported", c->head_dim);
        return NULL;
    }
    Decoder *D = dl_calloc(1, sizeof *D);
    D->h = *h;
    D->r = r;
    D->params = params;
    D->B = B;
    D->max_len = max_len;
    if (model_w_init(&D->w, h, r, err)) {
        free(D->w.layer);
        free(D);
        return NULL;
    }
    rope_inv_freq(c, D->inv_freq);
    const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim;
    D->len = dl_calloc((size_t)B, sizeof(int64_t));
    D->win_len0 = dl_calloc((size_t)B, sizeof(int64_t));
    D->keep = dl_calloc((size_t)B, sizeof(int32_t));
    D->kc = dl_calloc((size_t)c->n_layer, sizeof(float *));
    D->vc = dl_calloc((size_t)c->n_layer, sizeof(float *));
    D->ms = dl_calloc((size_t)c->n_layer, sizeof(MState));
    D->ms0 = dl_calloc((size_t)c->n_layer, sizeof(MState));
    D->win_x = dl_calloc((size_t)c->n_layer, sizeof(float *));
    for (int l = 0; l < c->n_layer; l++) {
        if (h->mixer[l] == MIXER_ATTN) {
            D->kc[l] = fbuf(B * max_len * kvd);
            D->vc[l] = fbuf(B * max_len * kvd);
        } else {
            D->ms[l] = mstate_new(h, h->mixer[l], B);
            D->ms0[l] = mstate_new(h, h->mixer[l], B);
        }
    }
    return D;
}

static void dec_scratch_free(Decoder *D) {
    float *bufs[] = {D->x, D->y, D->xn, D->rstd, D->q, D->k, D->v, D->att, D->mid, D->gate, D->up, D->act, D->mix, D->last};
    for (size_t i = 0; i < DL_ARRAY_LEN(bufs); i++) free(bufs[i]);
    free(D->pos);
}

void decoder_free(Decoder *D) {
    if (!D) return;
    for (int l = 0; l < D->h.base.n_layer; l++) {
        free(D->kc[l]);
        free(D->vc[l]);
        free(D->win_x[l]);
        if (D->h.mixer[l] != MIXER_ATTN) mstate_free(&D->ms[l]), mstate_free(&D->ms0[l]);
    }
    free(D->kc);
    free(D->vc);
    free(D->ms);
    free(D->ms0);
    free(D->win_x);
    free(D->len);
    free(D->win_len0);
    free(D->keep);
    free(D->hid), free(D->hw), free(D->hout);
    dec_scratch_free(D);
    free(D->w.layer);
    free(D);
}

void decoder_reset(Decoder *D) {
    memset(D->len, 0, (size_t)D->B * sizeof(int64_t));
    D->win = false;
    for (int l = 0; l < D->h.base.n_layer; l++)
        if (D->h.mixer[l] != MIXER_ATTN) mstate_reset(&D->ms[l], -1);
}

int decoder_reset_seq(Decoder *D, int64_t b, DlError *err) {
    if (b < 0 || b >= D->B) return dl_fail(err, "decoder_reset_seq: sequence %lld outside 0..%lld", (long long)b, (long long)D->B - 1);
    if (D->win) return dl_fail(err, "decoder_reset_seq: not allowed inside a speculative window");
    D->len[b] = 0;
    for (int l = 0; l < D->h.base.n_layer; l++)
        if (D->h.mixer[l] != MIXER_ATTN) mstate_reset(&D->ms[l], b);
    return 0;
}

int decoder_copy_seq(Decoder *D, int64_t b, const Decoder *S, int64_t j, DlError *err) {
    const LlamaConfig *c = &D->h.base;
    if (b < 0 || b >= D->B || j < 0 || j >= S->B)
        return dl_fail(err, "decoder_copy_seq: sequence %lld -> %lld outside the batches (%lld, %lld)", (long long)j, (long long)b,
                       (long long)S->B, (long long)D->B);
    if (S->h.base.n_layer != c->n_layer || S->len[j] > D->max_len)
        return dl_fail(err, "decoder_copy_seq: another model, or %lld tokens past the context of %lld", (long long)S->len[j],
                       (long long)D->max_len);
    if (D->win) return dl_fail(err, "decoder_copy_seq: not allowed inside a speculative window");
    const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim, n = S->len[j];
    for (int l = 0; l < c->n_layer; l++) {
        if (D->h.mixer[l] == MIXER_ATTN) {
            memcpy(D->kc[l] + b * D->max_len * kvd, S->kc[l] + j * S->max_len * kvd, (size_t)(n * kvd) * sizeof(float));
            memcpy(D->vc[l] + b * D->max_len * kvd, S->vc[l] + j * S->max_len * kvd, (size_t)(n * kvd) * sizeof(float));
        } else if (D->h.mixer[l] == MIXER_MAMBA1) {
            const Mamba1State *s = &S->ms[l].m1;
            Mamba1State *d = &D->ms[l].m1;
            const int64_t nc = (int64_t)(s->d_conv - 1) * s->d_inner, ns = s->d_inner * s->d_state;
            memcpy(d->conv + b * nc, s->conv + j * nc, (size_t)nc * sizeof(float));
            memcpy(d->ssm + b * ns, s->ssm + j * ns, (size_t)ns * sizeof(float));
        } else {
            const Mamba2State *s = &S->ms[l].m2;
            Mamba2State *d = &D->ms[l].m2;
            const int64_t nc = (int64_t)(s->d_conv - 1) * s->xbc, ns = s->nheads * s->headdim * s->d_state;
            memcpy(d->conv + b * nc, s->conv + j * nc, (size_t)nc * sizeof(float));
            memcpy(d->ssm + b * ns, s->ssm + j * ns, (size_t)ns * sizeof(float));
        }
    }
    D->len[b] = n;
    return 0;
}

int64_t decoder_len(const Decoder *D) {
    int64_t m = 0;
    for (int64_t b = 0; b < D->B; b++) m = DL_MAX(m, D->len[b]);
    return m;
}

int64_t decoder_seq_len(const Decoder *D, int64_t b) { return b >= 0 && b < D->B ? D->len[b] : -1; }
int64_t decoder_batch(const Decoder *D) { return D->B; }
int64_t decoder_vocab(const Decoder *D) { return D->h.base.vocab; }

int decoder_set_head_ids(Decoder *D, const int32_t *ids, int64_t n, DlError *err) {
    const int64_t V = D->h.base.vocab, d = D->h.base.d_model;
    int32_t *sorted = NULL;
    if (n > 0 && !(sorted = head_ids_sorted(ids, n, V, "decoder", err))) return -1;
    free(D->hid), free(D->hw), free(D->hout);
    D->hid = sorted, D->hw = D->hout = NULL, D->hn = n > 0 ? n : 0, D->hcap = 0;
    if (!D->hn) return 0;
    const float *W = pw(D->params, D->w.head);
    D->hw = fbuf(n * d);  // [n, d]: the kept rows of the head, so one GEMM computes exactly their logits
    for (int64_t j = 0; j < n; j++) memcpy(D->hw + j * d, W + (int64_t)sorted[j] * d, (size_t)d * sizeof(float));
    return 0;
}

// logits [rows, V] of the normed rows xn [rows, d]: the full head, or the kept rows' logits and -inf elsewhere.
static void dec_head(Decoder *D, float *logits, const float *xn, int64_t rows) {
    const int64_t V = D->h.base.vocab, d = D->h.base.d_model, n = D->hn;
    if (!n) {
        linear_fwd(logits, xn, pw(D->params, D->w.head), rows, d, V, false);
        return;
    }
    if (rows > D->hcap) {
        free(D->hout);
        D->hout = fbuf(rows * n);
        D->hcap = rows;
    }
    linear_fwd(D->hout, xn, D->hw, rows, d, n, false);
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * V;
        for (int64_t i = 0; i < V; i++) row[i] = -INFINITY;
        for (int64_t j = 0; j < n; j++) row[D->hid[j]] = D->hout[r * n + j];
    }
}

static void dec_scratch(Decoder *D, int64_t N) {
    if (N <= D->cap) return;
    dec_scratch_free(D);
    const LlamaConfig *c = &D->h.base;
    const int64_t d = c->d_model, ff = c->d_ff;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    D->x = fbuf(N * d);
    D->y = fbuf(N * d);
    D->xn = fbuf(N * d);
    D->rstd = fbuf(N);
    D->q = fbuf(N * qd);
    D->k = fbuf(N * kvd);
    D->v = fbuf(N * kvd);
    D->att = fbuf(N * qd);
    D->mid = fbuf(N * d);
    D->gate = fbuf(N * ff);
    D->up = fbuf(N * ff);
    D->act = fbuf(N * ff);
    D->mix = fbuf(N * d);
    D->last = fbuf(D->B * d);
    D->pos = dl_malloc((size_t)N * sizeof(int32_t));
    D->cap = N;
}

// Appends the Mamba layer l's mixer inputs xn [B, L, d] to the window cache.
static void win_append(Decoder *D, int l, const float *xn, int64_t L) {
    const int64_t B = D->B, d = D->h.base.d_model;
    if (D->win_n + L > D->win_cap) {  // grow every layer's cache together
        int64_t cap = DL_MAX(2 * D->win_cap, D->win_n + L);
        cap = DL_MAX(cap, 8);
        for (int j = 0; j < D->h.base.n_layer; j++) {
            if (D->h.mixer[j] == MIXER_ATTN) continue;
            float *nb = fbuf(B * cap * d);
            for (int64_t b = 0; b < B && D->win_x[j]; b++)
                memcpy(nb + b * cap * d, D->win_x[j] + b * D->win_cap * d, (size_t)(D->win_n * d) * sizeof(float));
            free(D->win_x[j]);
            D->win_x[j] = nb;
        }
        D->win_cap = cap;
    }
    for (int64_t b = 0; b < B; b++)
        memcpy(D->win_x[l] + (b * D->win_cap + D->win_n) * d, xn + b * L * d, (size_t)(L * d) * sizeof(float));
}

int decoder_feed_ragged(Decoder *D, const int32_t *tokens, int64_t L, const int64_t *n, float *logits,
                        float *all_logits, DlError *err) {
    const LlamaConfig *c = &D->h.base;
    const float *P = D->params;
    const int64_t B = D->B, N = B * L, d = c->d_model, V = c->vocab;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    if (L <= 0) return dl_fail(err, "decoder: feeding %lld tokens", (long long)L);
    bool ragged = false;
    for (int64_t b = 0; b < B; b++) {
        if (n && (n[b] < 1 || n[b] > L))
            return dl_fail(err, "decoder: sequence %lld feeds %lld tokens, expected 1..%lld", (long long)b,
                           (long long)n[b], (long long)L);
        if (n && n[b] != L) ragged = true;
        if (D->len[b] + L > D->max_len)
            return dl_fail(err, "decoder: sequence %lld: %lld + %lld tokens exceed the context of %lld", (long long)b,
                           (long long)D->len[b], (long long)L, (long long)D->max_len);
    }
    if (ragged && D->win) return dl_fail(err, "decoder: ragged feeds are not allowed inside a speculative window");
    for (int64_t i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= V) return dl_fail(err, "decoder: token id %d out of range 0..%lld", tokens[i], (long long)V - 1);
    dec_scratch(D, N);
    // A decode step (few rows) is a handful of memory-bound GEMVs: run it on one thread. With OpenBLAS's OpenMP
    // build this pins our OpenMP loops too, deliberately: measured on SmolLM2 (2 shared cores, load ~10),
    // 32 greedy tokens ran at 16 tok/s pinned vs 1.5 tok/s with 2 spinning threads (8.9 with passive waits).
    const int blas_prev = N < 16 ? blas_set_threads(1) : -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < L; t++) D->pos[b * L + t] = (int32_t)(D->len[b] + t);
    if (ragged)
        for (int64_t b = 0; b < B; b++) D->keep[b] = (int32_t)n[b];
    embedding_fwd(D->x, tokens, pw(P, D->w.emb), N, d);
    for (int l = 0; l < c->n_layer; l++) {
        const LayerW *w = &D->w.layer[l];
        rmsnorm_fwd(D->xn, NULL, D->x, pw(P, w->in_norm), N, d, (float)c->rms_eps);
        if (D->h.mixer[l] == MIXER_ATTN) {
            attn_qkv(c, w, P, D->inv_freq, N, D->xn, D->pos, D->q, D->k, D->v);
            for (int64_t b = 0; b < B; b++) {  // append to the cache at each sequence's own length
                memcpy(D->kc[l] + (b * D->max_len + D->len[b]) * kvd, D->k + b * L * kvd, (size_t)(L * kvd) * sizeof(float));
                memcpy(D->vc[l] + (b * D->max_len + D->len[b]) * kvd, D->v + b * L * kvd, (size_t)(L * kvd) * sizeof(float));
            }
            bool same = true;
            for (int64_t b = 1; b < B; b++) same = same && D->len[b] == D->len[0];
            if (same) {
                AttnShape s = {B, L, D->max_len, D->len[0], c->n_head, c->n_kv_head, c->head_dim};
                attention_fwd(&s, D->q, D->kc[l], D->vc[l], NULL, D->att, NULL);
            } else {  // query t of sequence b sits at key index len[b] + t: keys past it are masked causally
                for (int64_t b = 0; b < B; b++) {
                    AttnShape s = {1, L, D->max_len, D->len[b], c->n_head, c->n_kv_head, c->head_dim};
                    attention_fwd(&s, D->q + b * L * qd, D->kc[l] + b * D->max_len * kvd, D->vc[l] + b * D->max_len * kvd,
                                  NULL, D->att + b * L * qd, NULL);
                }
            }
            memcpy(D->mid, D->x, (size_t)(N * d) * sizeof(float));
            linear_fwd(D->mid, D->att, pw(P, w->o), N, qd, d, true);
        } else {
            if (D->win) win_append(D, l, D->xn, L);
            // ragged: the state stops after each sequence's n[b] tokens (its padding never enters it)
            mstate_run(&D->h, D->r, P, l, &D->ms[l], B, L, D->xn, ragged ? D->keep : NULL, D->mix);
            for (int64_t i = 0; i < N * d; i++) D->mid[i] = D->x[i] + D->mix[i];
        }
        mlp_fwd(c, w, P, N, D->mid, D->y, D->xn, D->rstd, D->gate, D->up, D->act);
        float *t = D->x;
        D->x = D->y;
        D->y = t;
    }
    for (int64_t b = 0; b < B; b++) D->len[b] += n ? n[b] : L;
    if (D->win) D->win_n += L;
    if (all_logits) {
        rmsnorm_fwd(D->xn, NULL, D->x, pw(P, D->w.fnorm), N, d, (float)c->rms_eps);
        dec_head(D, all_logits, D->xn, N);
    }
    if (logits) {
        for (int64_t b = 0; b < B; b++) {
            int64_t t = (n ? n[b] : L) - 1;
            memcpy(D->last + b * d, D->x + (b * L + t) * d, (size_t)d * sizeof(float));
        }
        rmsnorm_fwd(D->xn, NULL, D->last, pw(P, D->w.fnorm), B, d, (float)c->rms_eps);
        dec_head(D, logits, D->xn, B);
    }
    if (blas_prev > 0) blas_set_threads(blas_prev);
    return 0;
}

int decoder_feed(Decoder *D, const int32_t *tokens, int64_t L, float *logits, float *all_logits, DlError *err) {
    return decoder_feed_ragged(D, tokens, L, NULL, logits, all_logits, err);
}

void decoder_window_begin(Decoder *D) {
    D->win = true;
    D->win_n = 0;
    memcpy(D->win_len0, D->len, (size_t)D->B * sizeof(int64_t));
    for (int l = 0; l < D->h.base.n_layer; l++)
        if (D->h.mixer[l] != MIXER_ATTN) mstate_copy(&D->ms0[l], &D->ms[l]);
}

int decoder_accept(Decoder *D, const int32_t *keep, DlError *err) { return decoder_accept_from(D, keep, NULL, err); }

int decoder_accept_from(Decoder *D, const int32_t *keep, const int32_t *src, DlError *err) {
    if (!D->win) return dl_fail(err, "decoder_accept without decoder_window_begin");
    bool all = true, moved = false;
    for (int64_t b = 0; b < D->B; b++) {
        if (keep[b] < 0 || keep[b] > D->win_n)
            return dl_fail(err, "decoder_accept: sequence %lld keeps %d of %lld window tokens", (long long)b, keep[b],
                           (long long)D->win_n);
        all = all && keep[b] == D->win_n;
        if (!src || src[b] == b) continue;
        if (src[b] < 0 || src[b] >= D->B || src[src[b]] != src[b] || D->win_len0[src[b]] != D->win_len0[b])
            return dl_fail(err, "decoder_accept: sequence %lld cannot take sequence %d's window (a source must keep its own, "
                                "and both must have started the window at the same length)", (long long)b, src[b]);
        moved = true;
    }
    D->win = false;
    const LlamaConfig *c = &D->h.base;
    const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim, d = c->d_model;
    for (int64_t b = 0; b < D->B; b++) {
        const int64_t j = src ? src[b] : b;
        D->keep[b] = keep[j];
        D->len[b] = D->win_len0[b] + keep[j];  // attention: rollback = length reset
        if (j == b) continue;
        // a branch takes its source's window: the kept keys and values, and the Mamba inputs that the replay reads
        const size_t kv = (size_t)(keep[j] * kvd) * sizeof(float), o = (size_t)(D->win_len0[b] * kvd);
        for (int l = 0; l < c->n_layer; l++) {
            if (D->h.mixer[l] == MIXER_ATTN) {
                memcpy(D->kc[l] + b * D->max_len * kvd + o, D->kc[l] + j * D->max_len * kvd + o, kv);
                memcpy(D->vc[l] + b * D->max_len * kvd + o, D->vc[l] + j * D->max_len * kvd + o, kv);
            } else {
                memcpy(D->win_x[l] + b * D->win_cap * d, D->win_x[l] + j * D->win_cap * d, (size_t)(D->win_n * d) * sizeof(float));
            }
        }
    }
    if ((all && !moved) || D->win_n == 0) return 0;  // the Mamba states already are the states after every window token
    const int64_t N = D->B * D->win_n;
    dec_scratch(D, N);
    for (int l = 0; l < D->h.base.n_layer; l++) {
        if (D->h.mixer[l] == MIXER_ATTN) continue;
        // replay the window from the cached state; the multi-step run stops each sequence at its keep
        float *x = D->win_x[l];
        if (D->win_cap != D->win_n) {  // compact [B, win_cap, d] -> [B, win_n, d]
            for (int64_t b = 0; b < D->B; b++) memcpy(D->xn + b * D->win_n * d, x + b * D->win_cap * d, (size_t)(D->win_n * d) * sizeof(float));
            x = D->xn;
        }
        mstate_copy(&D->ms[l], &D->ms0[l]);
        mstate_run(&D->h, D->r, D->params, l, &D->ms[l], D->B, D->win_n, x, D->keep, D->mix);
    }
    return 0;
}

int decoder_seek(Decoder *D, int64_t len, DlError *err) {
    if (len < 0 || len >= D->max_len)
        return dl_fail(err, "decoder_seek: length %lld outside 0..%lld", (long long)len, (long long)D->max_len - 1);
    const LlamaConfig *c = &D->h.base;
    const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim;
    for (int l = 0; l < c->n_layer; l++)
        if (D->h.mixer[l] == MIXER_ATTN)
            for (int64_t b = 0; b < D->B; b++) {
                memset(D->kc[l] + b * D->max_len * kvd, 0, (size_t)(len * kvd) * sizeof(float));
                memset(D->vc[l] + b * D->max_len * kvd, 0, (size_t)(len * kvd) * sizeof(float));
            }
    for (int64_t b = 0; b < D->B; b++) D->len[b] = len;
    D->win = false;
    return 0;
}
