// mamba_init.c: attention -> Mamba-1 initialization and the copy of shared tensors (see mamba_init.h).
#include "distill/mamba_init.h"

#include <math.h>
#include <string.h>

#include "distill/mamba2_cpu.h"
#include "distill/rng.h"

// RNG streams: base + layer * 16 + tensor id, so every random tensor has its own stream.
#define INIT_STREAM_BASE 0x4d616d6261000000ull  // "Mamba"
enum { T_Z = 0, T_DTDOWN, T_DTW, T_DTB, T_CONVW, T_CONVB, T_MAMBA2 = 15 };

static void fill_uniform(float *p, int64_t n, double bound, uint64_t seed, int layer, int tensor) {
    Rng rng;
    rng_init(&rng, seed, INIT_STREAM_BASE + (uint64_t)layer * 16 + (uint64_t)tensor);
    for (int64_t i = 0; i < n; i++) p[i] = (float)((2.0 * rng_uniform_f64(&rng) - 1.0) * bound);
}

static const TensorInfo *find_tensor(const Registry *r, const char *name) {
    int i = reg_find(r, name);
    return i < 0 ? NULL : &r->t[i];
}

static int same_shape(const TensorInfo *a, const TensorInfo *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

// Copies source tensor `sname` into destination tensor `dname`, checking the shapes.
static int copy_tensor(const Registry *hr, float *hp, const char *dname, const Registry *tr, const float *tp,
                       const char *sname, DlError *e) {
    const TensorInfo *d = find_tensor(hr, dname), *s = find_tensor(tr, sname);
    char b1[64], b2[64];
    if (!d) return dl_fail(e, "init: hybrid has no tensor %s", dname);
    if (!s) return dl_fail(e, "init: source has no tensor %s (needed for %s)", sname, dname);
    if (!same_shape(d, s))
        return dl_fail(e, "init: %s has shape %s in the source but %s expects %s", sname, reg_shape_str(s, b1, sizeof b1),
                       dname, reg_shape_str(d, b2, sizeof b2));
    memcpy(hp + d->offset, tp + s->offset, (size_t)d->numel * sizeof(float));
    return 0;
}

static float *layer_tensor(const Registry *hr, float *hp, int l, const char *suffix, int64_t numel, DlError *e) {
    char name[DL_TENSOR_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.mamba.%s", l, suffix);
    const TensorInfo *t = find_tensor(hr, name);
    if (!t) {
        dl_fail(e, "init: hybrid has no tensor %s", name);
        return NULL;
    }
    if (t->numel != numel) {
        dl_fail(e, "init: %s has %lld elements, expected %lld", name, (long long)t->numel, (long long)numel);
        return NULL;
    }
    return hp + t->offset;
}

// Mamba-1 layer l from the attention of source layer l (mambainllama.md §1a table).
static int init_mamba1_from_attn(const HybridConfig *h, const Registry *hr, float *hp, const Registry *tr,
                                 const float *tp, int l, uint64_t seed, DlError *e) {
    static const char *pairs[4][2] = {
        {"mamba.in_proj_x.weight", "self_attn.v_proj.weight"},
        {"mamba.B_proj.weight", "self_attn.k_proj.weight"},
        {"mamba.C_proj.weight", "self_attn.q_proj.weight"},
        {"mamba.out_proj.weight", "self_attn.o_proj.weight"},
    };
    for (int k = 0; k < 4; k++) {
        char dn[DL_TENSOR_NAME_MAX], sn[DL_TENSOR_NAME_MAX];
        snprintf(dn, sizeof dn, "model.layers.%d.%s", l, pairs[k][0]);
        snprintf(sn, sizeof sn, "model.layers.%d.%s", l, pairs[k][1]);
        if (copy_tensor(hr, hp, dn, tr, tp, sn, e)) return -1;
    }
    const int64_t d = h->base.d_model, di = h->d_inner, N = h->d_state, R = h->dt_rank, W = h->d_conv;
    float *z = layer_tensor(hr, hp, l, "in_proj_z.weight", di * d, e);
    float *dtd = z ? layer_tensor(hr, hp, l, "dt_proj_down.weight", R * d, e) : NULL;
    float *dtw = dtd ? layer_tensor(hr, hp, l, "dt_proj.weight", di * R, e) : NULL;
    float *dtb = dtw ? layer_tensor(hr, hp, l, "dt_proj.bias", di, e) : NULL;
    float *cw = dtb ? layer_tensor(hr, hp, l, "conv1d.weight", di * W, e) : NULL;
    float *cb = cw ? layer_tensor(hr, hp, l, "conv1d.bias", di, e) : NULL;
    float *alog = cb ? layer_tensor(hr, hp, l, "A_log", di * N, e) : NULL;
    float *D = alog ? layer_tensor(hr, hp, l, "D", di, e) : NULL;
    if (!D) return -1;

    // nn.Linear default: kaiming_uniform(a = sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    fill_uniform(z, di * d, 1.0 / sqrt((double)d), seed, l, T_Z);
    fill_uniform(dtd, R * d, 1.0 / sqrt((double)d), seed, l, T_DTDOWN);
    // dt_init "random", dt_scale 1: U(-dt_rank^-0.5, dt_rank^-0.5).
    fill_uniform(dtw, di * R, 1.0 / sqrt((double)R), seed, l, T_DTW);
    // dt log-uniform in [1e-3, 1e-1], floored at 1e-4; the bias is its inverse softplus.
    Rng rng;
    rng_init(&rng, seed, INIT_STREAM_BASE + (uint64_t)l * 16 + T_DTB);
    const double lo = log(1e-3), hi = log(1e-1);
    for (int64_t c = 0; c < di; c++) {
        double dt = exp(rng_uniform_f64(&rng) * (hi - lo) + lo);
        if (dt < 1e-4) dt = 1e-4;
        dtb[c] = (float)(dt + log(-expm1(-dt)));
    }
    // Conv1d default with groups = channels: fan_in = 1 * kernel width.
    fill_uniform(cw, di * W, 1.0 / sqrt((double)W), seed, l, T_CONVW);
    fill_uniform(cb, di, 1.0 / sqrt((double)W), seed, l, T_CONVB);
    // S4D-real: A = -(1..N) for every channel; D = 1.
    for (int64_t c = 0; c < di; c++) {
        for (int64_t n = 0; n < N; n++) alog[c * N + n] = (float)log((double)(n + 1));
        D[c] = 1.0f;
    }
    return 0;
}

int hybrid_init_from_teacher(const HybridConfig *h, const Registry *hr, float *hparams, const HybridConfig *teacher_hc,
                             const Registry *tr, const float *tparams, uint64_t seed, DlError *e) {
    const LlamaConfig *a = &h->base, *b = &teacher_hc->base;
    if (a->n_layer != b->n_layer || a->d_model != b->d_model || a->n_head != b->n_head || a->n_kv_head != b->n_kv_head ||
        a->head_dim != b->head_dim || a->d_ff != b->d_ff || a->vocab != b->vocab)
        return dl_fail(e,
                       "init: hybrid config (layers %d, hidden %d, heads %d/%d, head_dim %d, ff %d, vocab %d) does not match "
                       "the source (layers %d, hidden %d, heads %d/%d, head_dim %d, ff %d, vocab %d)",
                       a->n_layer, a->d_model, a->n_head, a->n_kv_head, a->head_dim, a->d_ff, a->vocab, b->n_layer,
                       b->d_model, b->n_head, b->n_kv_head, b->head_dim, b->d_ff, b->vocab);
    if (a->tied_embeddings && !b->tied_embeddings)
        return dl_fail(e, "init: the source has its own lm_head.weight but the hybrid ties the head to the embeddings "
                          "(tie_word_embeddings must match, or be false in the hybrid)");
    // Padding between tensors is zeroed so the buffer (and its checksum) depends only on the seed.
    memset(hparams, 0, (size_t)hr->numel * sizeof(float));
    for (int l = 0; l < a->n_layer; l++) {
        MixerKind dk = h->mixer[l], sk = teacher_hc->mixer[l];
        if (dk == sk) continue;  // copied by name below
        if (dk == MIXER_MAMBA1 && sk == MIXER_ATTN) {
            if (init_mamba1_from_attn(h, hr, hparams, tr, tparams, l, seed, e)) return -1;
        } else if (dk == MIXER_MAMBA2 && sk == MIXER_ATTN) {
            Rng rng;  // the Mamba-2 init derives its per-tensor streams from one draw of this layer's stream
            rng_init(&rng, seed, INIT_STREAM_BASE + (uint64_t)l * 16 + T_MAMBA2);
            if (mamba2_init_layer_from_attention(h, hr, hparams, tr, tparams, l, &rng, e)) return -1;
        } else {
            return dl_fail(e, "init: layer %d is %s in the source; a %s layer cannot be initialized from it", l,
                           mixer_name(sk), mixer_name(dk));
        }
    }
    for (int i = 0; i < hr->n; i++) {
        const TensorInfo *t = &hr->t[i];
        if (t->layer >= 0 && h->mixer[t->layer] != teacher_hc->mixer[t->layer] && t->role == ROLE_MAMBA) continue;
        if (find_tensor(tr, t->name)) {
            if (copy_tensor(hr, hparams, t->name, tr, tparams, t->name, e)) return -1;
        } else if (strcmp(t->name, "lm_head.weight") == 0 && b->tied_embeddings) {
            if (copy_tensor(hr, hparams, t->name, tr, tparams, "model.embed_tokens.weight", e)) return -1;
        } else {
            return dl_fail(e, "init: the source has no tensor %s (source layer %d is %s)", t->name, t->layer,
                           t->layer >= 0 ? mixer_name(teacher_hc->mixer[t->layer]) : "-");
        }
    }
    return 0;
}
