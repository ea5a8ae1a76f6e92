// engine_cuda.cu: the CUDA engine (see engine_cuda.h): the CPU engine's orchestration (distill/engine_cpu.c,
// mamba1_cpu.c) with the kernels of kernels/train and kernels/scan. Activations are token-major [N, C] with
// N = B*T rows, in the engine dtype dt (bf16 or fp32).
#include "kernels/engine/engine_cuda.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "distill/layers_cpu.h"
}
#include "kernels/engine/engine_ops.cuh"
#include "kernels/scan/selective_scan_cuda.h"
#include "kernels/train/train_check.cuh"
#include "kernels/train/train_cuda.h"

#include "kernels/engine/engine_cuda_internal.cuh"

static void prof_print(const EngineCuda *E);  // DISTILL_ENGINE_PROFILE's table (with the step's regions, below)
static void live_set(EngineCuda *E, bool on);   // the live-engine list of wait_hidden (below)

static int wref(const Registry *r, WRef *w, int64_t numel, DlError *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int i = reg_vlookup(r, numel, "engine_cuda", e, fmt, ap);
    va_end(ap);
    if (i < 0) return -1;
    w->off = r->t[i].offset;
    w->idx = i;
    w->moff = w->goff = -1;  // set by engine_layout
    return 0;
}

static void tab_add(ActTable *t, void **slot, const char *name, int layer, size_t bytes) {
    if (bytes == 0) {
        *slot = NULL;
        return;
    }
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->e = (ActEntry *)realloc(t->e, (size_t)t->cap * sizeof(ActEntry));
    }
    ActEntry *a = &t->e[t->n++];
    snprintf(a->name, sizeof a->name, "%s", name);
    a->layer = layer;
    a->bytes = bytes;
    a->off = t->total;
    a->slot = slot;
    t->total += (bytes + 255) & ~(size_t)255;  // 256-byte aligned entries (GEMM operands need 16)
}
#define TADD(t, ptr, name, layer, bytes) tab_add((t), (void **)&(ptr), (name), (layer), (size_t)(bytes))


static int layer_w_init(EngineCuda *E, DlError *e) {
    const HybridConfig *h = &E->h;
    const LlamaConfig *c = &h->base;
    const Registry *r = E->r;
    const int64_t d = c->d_model, qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    const int64_t ff = c->d_ff, V = c->vocab, di = h->d_inner, dxb = h->d_xb, ds = h->d_state, R = h->dt_rank;
    if (wref(r, &E->emb, V * d, e, "model.embed_tokens.weight")) return -1;
    if (wref(r, &E->fnorm, d, e, "model.norm.weight")) return -1;
    if (c->tied_embeddings) E->head = E->emb;
    else if (wref(r, &E->head, V * d, e, "lm_head.weight")) return -1;
    E->wpad_n = 0;
    for (int l = 0; l < c->n_layer; l++) {
        LayerW *w = &E->w[l];
        memset(w, 0xff, sizeof *w);
        if (wref(r, &w->in_norm, d, e, "model.layers.%d.input_layernorm.weight", l) ||
            wref(r, &w->post_norm, d, e, "model.layers.%d.post_attention_layernorm.weight", l) ||
            wref(r, &w->gate, ff * d, e, "model.layers.%d.mlp.gate_proj.weight", l) ||
            wref(r, &w->up, ff * d, e, "model.layers.%d.mlp.up_proj.weight", l) ||
            wref(r, &w->down, d * ff, e, "model.layers.%d.mlp.down_proj.weight", l))
            return -1;
        if (h->mixer[l] == MIXER_ATTN) {
            if (wref(r, &w->q, qd * d, e, "model.layers.%d.self_attn.q_proj.weight", l) ||
                wref(r, &w->k, kvd * d, e, "model.layers.%d.self_attn.k_proj.weight", l) ||
                wref(r, &w->v, kvd * d, e, "model.layers.%d.self_attn.v_proj.weight", l) ||
                wref(r, &w->o, d * qd, e, "model.layers.%d.self_attn.o_proj.weight", l))
                return -1;
        } else if (h->mixer[l] == MIXER_MAMBA2) {  // kernels/engine/mamba2_cuda.h
            const int64_t H = c->n_head, xbc = 2 * dxb + di;
            const char *m = "model.layers.%d.mamba.";
            char f[128];
#define MW(field, numel, suffix) (snprintf(f, sizeof f, "%s%s", m, suffix), wref(r, &w->field, numel, e, f, l))
            if (MW(m2in, (di + xbc + H) * d, "in_proj.weight") || MW(cw, xbc * h->d_conv, "conv1d.weight") ||
                MW(cb, xbc, "conv1d.bias") || MW(dtb, H, "dt_bias") || MW(alog, H, "A_log") || MW(D, H, "D") ||
                MW(m2norm, di, "norm.weight") || MW(out, d * di, "out_proj.weight"))
                return -1;
#undef MW
            // the conv and SSD kernels read these in fp32 (PM operands)
            E->f32read[w->dtb.idx] = E->f32read[w->cw.idx] = E->f32read[w->cb.idx] = true;
            E->f32read[w->alog.idx] = E->f32read[w->D.idx] = true;
            E->has_mamba2 = true;
        } else {
            const char *m = "model.layers.%d.mamba.";
            char f[128];
#define MW(field, numel, suffix) (snprintf(f, sizeof f, "%s%s", m, suffix), wref(r, &w->field, numel, e, f, l))
            if (MW(z, di * d, "in_proj_z.weight") || MW(x, dxb * d, "in_proj_x.weight") ||
                MW(Bp, dxb * d, "B_proj.weight") || MW(Cp, di * d, "C_proj.weight") ||
                MW(dtd, R * d, "dt_proj_down.weight") || MW(dtw, di * R, "dt_proj.weight") ||
                MW(dtb, di, "dt_proj.bias") || MW(cw, di * h->d_conv, "conv1d.weight") ||
                MW(cb, di, "conv1d.bias") || MW(alog, di * ds, "A_log") || MW(D, di, "D") ||
                MW(out, d * di, "out_proj.weight"))
                return -1;
#undef MW
            // the PM(E, w) operands: the conv and scan kernels take these in fp32
            E->f32read[w->dtb.idx] = E->f32read[w->cw.idx] = E->f32read[w->cb.idx] = true;
            E->f32read[w->alog.idx] = E->f32read[w->D.idx] = true;
            w->pad_dtd = E->wpad_n;
            E->wpad_n += ((int64_t)E->Rp * d + 15) / 16 * 16;
            w->pad_dtw = E->wpad_n;
            E->wpad_n += (di * E->Rp + 15) / 16 * 16;
            E->has_mamba = true;
        }
    }
    return 0;
}

#define LAYER_REFS(w)                                                                                          \
    &(w)->in_norm, &(w)->post_norm, &(w)->gate, &(w)->up, &(w)->down, &(w)->q, &(w)->k, &(w)->v, &(w)->o, &(w)->z, \
        &(w)->x, &(w)->Bp, &(w)->Cp, &(w)->dtd, &(w)->dtw, &(w)->dtb, &(w)->cw, &(w)->cb, &(w)->alog, &(w)->D, &(w)->out, \
        &(w)->m2in, &(w)->m2norm

static void wref_place(const EngineCuda *E, WRef *w) {
    if (w->idx < 0) {
        w->moff = w->goff = -1;
        return;
    }
    w->moff = E->moff[w->idx];
    w->goff = E->goff[w->idx];
}

// The compact layout of the fp32 master and of the gradients (after layer_w_init marked the fp32-read tensors).
// A frozen engine (ECU_NO_MASTER) trains nothing, whatever the registry's flags say. bf16 mode: the master holds
// the trained tensors and the fp32-read Mamba tensors; the gradients hold the trained tensors; both in registry
// order, each tensor at a multiple of DL_TENSOR_ALIGN elements (as the registry). fp32 mode: the master is the
// compute copy, in registry layout.
static void engine_layout(EngineCuda *E) {
    const Registry *r = E->r;
    const LlamaConfig *c = &E->h.base;
    const bool frozen = E->flags & ECU_NO_MASTER;
    int64_t mn = 0, gn = 0;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        const bool train = !frozen && t->trainable;
        const int64_t span = (t->numel + DL_TENSOR_ALIGN - 1) / DL_TENSOR_ALIGN * DL_TENSOR_ALIGN;
        E->goff[i] = train ? gn : -1;
        if (train) gn += span;
        if (E->dt == DT_F32) {
            E->moff[i] = t->offset;
        } else {
            E->moff[i] = train || E->f32read[i] ? mn : -1;
            if (E->moff[i] >= 0) mn += span;
        }
    }
    E->master_n = E->dt == DT_F32 ? r->numel : mn;
    E->grad_n = gn;
    wref_place(E, &E->emb);
    wref_place(E, &E->fnorm);
    wref_place(E, &E->head);
    const int64_t gu = (int64_t)c->d_ff * c->d_model;
    for (int l = 0; l < c->n_layer; l++) {
        LayerW *w = &E->w[l];
        WRef *refs[] = {LAYER_REFS(w)};
        for (size_t k = 0; k < sizeof refs / sizeof refs[0]; k++) wref_place(E, refs[k]);
        // one [2ff, d] GEMM (and one [2ff, d] weight gradient) when gate and up are adjacent in both layouts
        w->fused_gu = w->up.off == w->gate.off + gu && (w->up.goff < 0) == (w->gate.goff < 0) &&
                      (w->up.goff < 0 || w->up.goff == w->gate.goff + gu);
        // z|x|B|C as one [2di + 2dxb, d] projection: its output (or its gradient) passes through the [N, 2ff]
        // gate|up buffer (or its gradient), free while the mixer runs, so it must fit there
        w->fused_in = w->fused_in_grad = false;
        if (E->h.mixer[l] == MIXER_MAMBA1 && 2 * E->h.d_inner + 2 * E->h.d_xb <= 2 * (int64_t)c->d_ff) {
            const int64_t d = c->d_model, nz = (int64_t)E->h.d_inner * d, nx = (int64_t)E->h.d_xb * d;
            w->fused_in = w->x.off == w->z.off + nz && w->Bp.off == w->x.off + nx && w->Cp.off == w->Bp.off + nx;
            w->fused_in_grad = w->z.goff >= 0 && w->x.goff == w->z.goff + nz && w->Bp.goff == w->x.goff + nx &&
                               w->Cp.goff == w->Bp.goff + nx;
        }
    }
    E->lowest = c->n_layer;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        if (E->goff[i] < 0) continue;
        if (t->layer >= 0 && t->layer < E->lowest) E->lowest = t->layer;
        if (t->role == ROLE_EMBED) E->lowest = -1;
    }
}

// The shapes every kernel accepts, checked once here so a step never meets a refusal.
static int check_shapes(const EngineCuda *E, DlError *e) {
    const HybridConfig *h = &E->h;
    const LlamaConfig *c = &h->base;
    const int64_t d = c->d_model, ff = c->d_ff, V = c->vocab;
    if (E->dt != DT_BF16 && E->dt != DT_F32) return dl_fail(e, "engine_cuda: dtype must be bf16 or fp32");
    if (d % 8 || ff % 8 || V % 8 || c->head_dim % 8)
        return dl_fail(e, "engine_cuda: d_model %lld, d_ff %lld, vocab %lld and head_dim %d must be multiples of 8 "
                          "(cuBLASLt needs 16-byte rows)", (long long)d, (long long)ff, (long long)V, c->head_dim);
    if (d > 16384) return dl_fail(e, "engine_cuda: d_model %lld > 16384 (RMSNorm kernel limit)", (long long)d);
    if (hybrid_n_attn(h) > 0 && c->head_dim != 64 && c->head_dim != 128)
        return dl_fail(e, "engine_cuda: head_dim %d; the attention kernels take 64 or 128", c->head_dim);
    if (E->has_mamba) {
        if (E->dt != DT_BF16)
            return dl_fail(e, "engine_cuda: fp32 mode with Mamba layers: the selective-scan and conv kernels are bf16-only");
        int ds = h->d_state;
        if (ds != 4 && ds != 8 && ds != 16 && ds != 32 && ds != 64)
            return dl_fail(e, "engine_cuda: d_state %d; the scan kernels take 4, 8, 16, 32 or 64", ds);
        if (h->d_inner % ds || h->d_xb % ds || 64 % ds || h->d_inner % h->d_xb || h->d_inner % 8 || h->d_xb % 8)
            return dl_fail(e, "engine_cuda: d_inner %d / d_xb %d / d_state %d do not fit the scan kernels", h->d_inner,
                           h->d_xb, ds);
        if (h->d_conv < 1 || h->d_conv > 4) return dl_fail(e, "engine_cuda: d_conv %d; the conv kernel takes 1..4", h->d_conv);
    }
    if (E->has_mamba2) {
        if (E->dt != DT_BF16)
            return dl_fail(e, "engine_cuda: fp32 mode with Mamba-2 layers: the SSD and conv kernels are bf16-only");
        char m[256];
        Mamba2CudaShape s;
        if (mamba2_cuda_shape(h, E->B, E->T, &s, m, sizeof m)) return dl_fail(e, "engine_cuda: %s", m);
    }
    return 0;
}

static ScanShape scan_shape(const EngineCuda *E) {
    const HybridConfig *h = &E->h;
    ScanShape s = {E->B, E->T, h->d_inner, h->d_state, h->d_inner / h->d_state, h->d_xb / h->d_state};
    return s;
}

static void build_table(EngineCuda *E, ActTable *t) {
    const HybridConfig *h = &E->h;
    const LlamaConfig *c = &h->base;
    const int64_t N = E->N, d = c->d_model, ff = c->d_ff, V = c->vocab, di = h->d_inner, dxb = h->d_xb, Rp = E->Rp;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    const size_t es = E->es;
    const bool train = E->flags & ECU_TRAIN, keep = train || (E->flags & ECU_KEEP_HIDDEN);
    const bool rmlp = train && (E->flags & ECU_RECOMPUTE_MLP);
    const bool attn = hybrid_n_attn(h) > 0;
    const ScanShape ss = scan_shape(E);
    // Mamba-2 buffers (mamba2_cuda.h) for this table's B (table_bytes re-runs this with other batch sizes)
    Mamba2CudaShape m2 = {};
    if (E->has_mamba2) mamba2_cuda_shape(h, E->B, E->T, &m2, NULL, 0);  // valid: check_shapes accepted B, and B' <= B
    Mamba2CudaBuf m2b[MAMBA2_CUDA_MAX_BUFS];
    memset(t, 0, sizeof *t);
    E->n_states = keep ? c->n_layer + 1 : 2;
    TADD(t, E->states, "hidden states", -1, E->n_states * N * d * es);
    // training: one set per layer (as the CPU engine); inference: one set shared by all layers
    const int na = train ? c->n_layer : 1;
    for (int l = 0; l < na; l++) {
        LayerActs *a = &E->acts[l];
        const bool lat = train ? h->mixer[l] == MIXER_ATTN : attn;
        const bool lm = train ? h->mixer[l] == MIXER_MAMBA1 : E->has_mamba;
        const bool lm2 = train ? h->mixer[l] == MIXER_MAMBA2 : E->has_mamba2;
        const int L = train ? l : -1;
        if (lm2)
            for (int i = 0, n = mamba2_cuda_acts_bufs(&m2, &a->m2, m2b); i < n; i++) tab_add(t, m2b[i].slot, m2b[i].name, L, m2b[i].bytes);
        TADD(t, a->xn1, "xn1 (input norm out)", L, N * d * es);
        TADD(t, a->rstd1, "rstd1", L, N * 4);
        TADD(t, a->mid, "mid (x + mixer)", L, N * d * es);
        TADD(t, a->xn2, "xn2 (post norm out)", L, N * d * es);
        TADD(t, a->rstd2, "rstd2", L, N * 4);
        if (!rmlp) {
            TADD(t, a->gu, "gate|up", L, N * 2 * ff * es);
            TADD(t, a->act, "silu(gate)*up", L, N * ff * es);
        }
        if (lat) {
            TADD(t, a->q, "q", L, N * qd * es);
            TADD(t, a->k, "k", L, N * kvd * es);
            TADD(t, a->v, "v", L, N * kvd * es);
            TADD(t, a->att, "attention out", L, N * qd * es);
            TADD(t, a->lse, "lse", L, E->B * c->n_head * E->T * 4);
        }
        if (lm) {
            TADD(t, a->z, "mamba z", L, N * di * es);
            TADD(t, a->xs, "mamba x", L, N * dxb * es);
            TADD(t, a->Bs, "mamba B", L, N * dxb * es);
            TADD(t, a->Cs, "mamba C", L, N * di * es);
            TADD(t, a->dtl, "mamba dt_low", L, N * Rp * es);
            TADD(t, a->y, "mamba y", L, N * di * es);
            if (train) TADD(t, a->ckpt, "scan checkpoints", L, selective_scan_ckpt_elems(&ss) * 4);
        }
    }
    if (rmlp) {  // recomputed in the backward: one set shared by all layers
        TADD(t, E->gu_sh, "gate|up (recomputed)", -1, N * 2 * ff * es);
        TADD(t, E->act_sh, "silu(gate)*up (recomputed)", -1, N * ff * es);
    }
    TADD(t, E->mix, "mixer out", -1, N * d * es);
    TADD(t, E->xf, "final norm out", -1, N * d * es);
    TADD(t, E->rstdf, "final rstd", -1, N * 4);
    if (E->has_mamba) {
        TADD(t, E->mdt, "mamba dt (recomputed)", -1, N * di * es);
        TADD(t, E->xr, "mamba x repeated", -1, N * di * es);
        TADD(t, E->xc, "mamba conv out", -1, N * di * es);
        TADD(t, E->A, "mamba A", -1, di * h->d_state * 4);
        TADD(t, E->scan_ws, "scan fwd workspace", -1, selective_scan_fwd_workspace(&ss, 0));
    }
    if (E->has_mamba2)
        for (int i = 0, n = mamba2_cuda_scratch_bufs(&m2, train, &E->m2s, m2b); i < n; i++)
            tab_add(t, m2b[i].slot, m2b[i].name, -1, m2b[i].bytes);
    TADD(t, E->tok, "tokens", -1, N * 4);
    TADD(t, E->pos, "positions", -1, N * 4);
    TADD(t, E->docs, "doc starts", -1, N * 4);
    TADD(t, E->reset_d, "resets", -1, N);
    TADD(t, E->lbuf, "logits chunk", -1, E->chunk * V * es);
    if (E->flags & ECU_TEACHER_KL) TADD(t, E->tbuf, "teacher logits chunk", -1, E->chunk * V * es);
    TADD(t, E->rows, "loss rows", -1, E->chunk * 4 * 8);
    TADD(t, E->acc, "loss sums", -1, 8 * 8);
    TADD(t, E->logp, "logp target", -1, N * 4);
    TADD(t, E->rw, "row weights", -1, N * 4);
    TADD(t, E->targ, "targets", -1, N * 4);
    TADD(t, E->cnt, "counted rows", -1, N);
    if (train) {
        TADD(t, E->dxf, "d final hidden", -1, N * d * es);
        TADD(t, E->dres, "d residual", -1, N * d * es);
        TADD(t, E->dxn, "d normed", -1, N * d * es);
        TADD(t, E->dgu, "d gate|up", -1, N * 2 * ff * es);
        TADD(t, E->dact, "d act", -1, N * ff * es);
        TADD(t, E->rms_ws, "rmsnorm bwd workspace", -1, rmsnorm_bwd_workspace(N, d));
        TADD(t, E->eorder, "emb order", -1, N * 4);
        TADD(t, E->eseg, "emb segments", -1, (N + 1) * 4);
        TADD(t, E->euniq, "emb uniq", -1, N * 4);
        if (attn) {
            TADD(t, E->dq, "dq", -1, N * qd * es);
            TADD(t, E->datt, "d attention out", -1, N * qd * es);
            TADD(t, E->dk, "dk", -1, N * kvd * es);
            TADD(t, E->dv, "dv", -1, N * kvd * es);
            TADD(t, E->attn_ws, "attention bwd workspace", -1, attention_bwd_workspace(E->B, E->T, c->n_head));
        }
        if (E->has_mamba) {
            TADD(t, E->dy, "mamba dy", -1, N * di * es);
            TADD(t, E->dxc, "mamba d conv out", -1, N * di * es);
            TADD(t, E->ddt, "mamba d dt", -1, N * di * es);
            TADD(t, E->dC, "mamba dC", -1, N * di * es);
            TADD(t, E->dz, "mamba dz", -1, N * di * es);
            TADD(t, E->dxr, "mamba d x repeated", -1, N * di * es);
            TADD(t, E->dB, "mamba dB", -1, N * dxb * es);
            TADD(t, E->dxs, "mamba dx", -1, N * dxb * es);
            TADD(t, E->ddtl, "mamba d dt_low", -1, N * Rp * es);
            TADD(t, E->dA, "mamba dA", -1, di * h->d_state * 4);
            TADD(t, E->dD, "mamba dD", -1, di * 4);
            TADD(t, E->ddb, "mamba d delta_bias", -1, di * 4);
            TADD(t, E->dcw, "mamba d conv w", -1, di * h->d_conv * 4);
            TADD(t, E->dcb, "mamba d conv b", -1, di * 4);
            TADD(t, E->scanb_ws, "scan bwd workspace", -1, selective_scan_bwd_workspace(&ss));
            TADD(t, E->conv_ws, "conv bwd workspace", -1, conv1d_silu_bwd_workspace(E->B, E->T, di));
        }
    }
}

// ---------------------------------------------------------------- creation, memory

const char *ecu_gib(double b, char *buf, size_t n) {
    if (b >= 1024.0 * 1024 * 1024) snprintf(buf, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
    else snprintf(buf, n, "%.1f MiB", b / (1024.0 * 1024));
    return buf;
}

// Bytes of the activation table of a configuration (for the out-of-memory advice).
static size_t table_bytes(EngineCuda *E, int64_t B, int flags) {
    EngineCuda tmp = *E;
    tmp.B = B;
    tmp.N = B * E->T;
    tmp.chunk = DL_MIN(E->chunk, tmp.N);
    tmp.flags = flags;
    tmp.acts = (LayerActs *)calloc((size_t)E->h.base.n_layer, sizeof(LayerActs));
    ActTable t;
    build_table(&tmp, &t);
    size_t b = t.total;
    free(t.e);
    free(tmp.acts);
    return b;
}

void engine_cuda_print_memory(const EngineCuda *E, FILE *f) {
    if (!f) return;
    char b1[32], b2[32], b3[32], b4[32];
    const ActTable *t = &E->tab;
    EngineCudaMemory m;
    engine_cuda_memory_parts(E, &m);
    fprintf(f, "engine_cuda: %s, B %lld x T %lld, %d layers (%d attention), %s\n", E->dt == DT_BF16 ? "bf16" : "fp32",
            (long long)E->B, (long long)E->T, E->h.base.n_layer, hybrid_n_attn(&E->h),
            (E->flags & ECU_TRAIN) ? ((E->flags & ECU_RECOMPUTE_MLP) ? "training, MLP recomputed" : "training")
                                   : "inference");
    fprintf(f, "  weights %s: compute copy %s (%s), fp32 master %s (%s), padded dt copies %s\n",
            ecu_gib(E->weight_bytes, b1, sizeof b1), ecu_gib(m.compute, b2, sizeof b2),
            E->flags & ECU_EXTERN_WEIGHTS ? "held outside the engine" : E->dt == DT_BF16 ? "bf16" : "fp32, = master",
            ecu_gib(m.master, b3, sizeof b3),
            E->dt == DT_F32 ? "the compute copy" : E->master_n ? "trained tensors + fp32-read Mamba tensors" : "none",
            ecu_gib(m.padded, b4, sizeof b4));
    if (E->grad_n) fprintf(f, "  gradients %s per buffer (engine_cuda_grads_new: trained tensors only)\n", ecu_gib(m.grads, b1, sizeof b1));
    // group the table by name (layers summed)
    fprintf(f, "  activations %s in one allocation:\n", ecu_gib((double)t->total, b1, sizeof b1));
    for (int i = 0; i < t->n; i++) {
        bool first = true;
        for (int j = 0; j < i; j++)
            if (!strcmp(t->e[j].name, t->e[i].name)) first = false;
        if (!first) continue;
        double sum = 0;
        int cnt = 0;
        for (int j = i; j < t->n; j++)
            if (!strcmp(t->e[j].name, t->e[i].name)) sum += (double)t->e[j].bytes, cnt++;
        if (cnt > 1) fprintf(f, "    %-34s %10s  (%d x %s)\n", t->e[i].name, ecu_gib(sum, b1, sizeof b1), cnt, ecu_gib(sum / cnt, b2, sizeof b2));
        else fprintf(f, "    %-34s %10s\n", t->e[i].name, ecu_gib(sum, b1, sizeof b1));
    }
}

static size_t al256(size_t b) { return (b + 255) & ~(size_t)255; }  // tab_add's entry alignment

void engine_cuda_memory_parts(const EngineCuda *E, EngineCudaMemory *m) {
    const int64_t n = E->r->numel;
    memset(m, 0, sizeof *m);
    m->compute = E->flags & ECU_EXTERN_WEIGHTS ? 0 : (double)n * (double)E->es;  // fp32 mode: the compute copy is the master
    m->master = E->dt == DT_F32 ? 0 : (double)E->master_n * 4;
    m->padded = (double)E->wpad_n * (double)E->es + (double)E->gpad_n * 4;
    m->activations = (double)E->tab.total;
    m->logits = (double)al256((size_t)(E->chunk * E->h.base.vocab) * E->es) * ((E->flags & ECU_TEACHER_KL) ? 2 : 1);
    m->grads = (double)E->grad_n * 4;
}

void engine_cuda_memory(const EngineCuda *E, double *weights, double *activations) {
    if (weights) *weights = E->weight_bytes;
    if (activations) *activations = (double)E->tab.total;
}

// cudaMalloc that reports instead of exiting (the caller prints the plan).
void *ecu_try_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) return NULL;
    cudaError_t rc = cudaMalloc(&p, bytes);
    if (rc != cudaSuccess) {
        cudaGetLastError();  // clear the (non-sticky) allocation error
        return NULL;
    }
    return p;
}

void ecu_oom_report(EngineCuda *E, const char *what, size_t want, FILE *f) {
    if (!f) f = stderr;
    char b1[32], b2[32], b3[32];
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    fprintf(f, "engine_cuda: out of GPU memory allocating %s (%s; %s free of %s)\n", what, ecu_gib((double)want, b1, sizeof b1),
            ecu_gib((double)fr, b2, sizeof b2), ecu_gib((double)tot, b3, sizeof b3));
    engine_cuda_print_memory(E, f);
    // what would fit: the weights stay, activations scale with the micro-batch
    double avail = (double)fr + (E->arena ? (double)E->tab.total : 0);
    double full = (double)table_bytes(E, E->B, E->flags);
    fprintf(f, "  what would fit (activations must fit in %s):\n", ecu_gib(avail, b1, sizeof b1));
    int64_t fit = 0;
    for (int64_t b = E->B - 1; b >= 1 && !fit; b--)
        if ((double)table_bytes(E, b, E->flags) <= avail) fit = b;
    if (fit) fprintf(f, "    micro_batch %lld (activations %s)\n", (long long)fit, ecu_gib((double)table_bytes(E, fit, E->flags), b1, sizeof b1));
    else fprintf(f, "    no micro-batch fits at seq_len %lld: shorten the sequences\n", (long long)E->T);
    if ((E->flags & ECU_TRAIN) && !(E->flags & ECU_RECOMPUTE_MLP)) {
        double r = (double)table_bytes(E, E->B, E->flags | ECU_RECOMPUTE_MLP);
        fprintf(f, "    recompute = \"mlp\": activations %s instead of %s%s\n", ecu_gib(r, b1, sizeof b1), ecu_gib(full, b2, sizeof b2),
                r <= avail ? " (fits)" : "");
    }
    fprintf(f, "    more GPUs with ZeRO: master weights, gradients and AdamW moments shard over the GPUs "
               "(hardware.gpus, hardware.zero = 1/2/3)\n");
}

// Host params (fp32, registry layout) -> the compute copy (every tensor) and the master (its tensors).
static void upload_params(EngineCuda *E, const float *params) {
    const Registry *r = E->r;
    const int64_t n = r->numel;
    cudaCheck(cudaDeviceSynchronize());  // the engine's stream does not order against legacy-stream copies
    if (E->dt == DT_F32) {  // the master is the compute copy, in registry layout
        cudaCheck(cudaMemcpy(E->master, params, (size_t)n * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaDeviceSynchronize());
        return;
    }
    // the compute copy through a staging buffer of up to 16M floats; without room for one, through the
    // activation arena (scratch between steps: nothing in it outlives a forward/backward pair)
    int64_t chunk = DL_MIN(n, (int64_t)16 << 20);
    float *stage = (float *)ecu_try_alloc((size_t)chunk * 4);
    const bool own = stage != NULL;
    if (!own) {
        if (!E->arena || E->tab.total < 4) dl_die(DL_EXIT_RUNTIME, "engine_cuda: no GPU memory left for staging the weights");
        stage = (float *)E->arena;
        chunk = DL_MIN(chunk, (int64_t)(E->tab.total / 4));
    }
    for (int64_t i = 0; i < n; i += chunk) {
        int64_t k = DL_MIN(chunk, n - i);
        cudaCheck(cudaStreamSynchronize(E->st));
        cudaCheck(cudaMemcpy(stage, params + i, (size_t)k * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaDeviceSynchronize());
        TC(convert_cuda(E->dt, at(E->wc, i, E->es), DT_F32, stage, k, E->st, EA));
    }
    cudaCheck(cudaStreamSynchronize(E->st));
    if (own) cudaCheck(cudaFree(stage));
    // the master's tensors at their compact offsets (the same fp32 values the compute copy was rounded from)
    for (int i = 0; i < r->n; i++)
        if (E->moff[i] >= 0)
            cudaCheck(cudaMemcpy(E->master + E->moff[i], params + r->t[i].offset, (size_t)r->t[i].numel * 4,
                                 cudaMemcpyHostToDevice));
    cudaCheck(cudaDeviceSynchronize());
}

// The padded copies of dt_proj_down [R, d] -> [Rp, d] and dt_proj [di, R] -> [di, Rp] (zeros in the padding).
void ecu_refresh_pad(EngineCuda *E) {
    const HybridConfig *h = &E->h;
    const int64_t d = h->base.d_model, di = h->d_inner, R = h->dt_rank, es = E->es;
    for (int l = 0; l < h->base.n_layer; l++) {
        if (h->mixer[l] != MIXER_MAMBA1) continue;
        const LayerW *w = &E->w[l];
        cudaCheck(cudaMemcpyAsync(at(E->wpad, w->pad_dtd, es), P(E, w->dtd), (size_t)(R * d * es), cudaMemcpyDeviceToDevice, E->st));
        cudaCheck(cudaMemcpy2DAsync(at(E->wpad, w->pad_dtw, es), (size_t)(E->Rp * es), P(E, w->dtw), (size_t)(R * es),
                                    (size_t)(R * es), (size_t)di, cudaMemcpyDeviceToDevice, E->st));
    }
}

void engine_cuda_set_params(EngineCuda *E, const float *params) {
    if (E->wext) dl_die(DL_EXIT_RUNTIME, "engine_cuda_set_params: this engine holds no weights (ECU_EXTERN_WEIGHTS)");
    upload_params(E, params);
    ecu_refresh_pad(E);
    cudaCheck(cudaStreamSynchronize(E->st));
}

// Only the master's tensors come back (trained tensors, and the fp32-read Mamba tensors, which never change):
// a frozen tensor's device copy is bf16, so writing it back would round the host's values, and the host copy
// of a tensor the engine never updates is already the truth.
void engine_cuda_get_params(const EngineCuda *E, float *params) {
    const Registry *r = E->r;
    if (!E->master) return;
    cudaCheck(cudaDeviceSynchronize());
    for (int i = 0; i < r->n; i++)
        if (E->moff[i] >= 0)
            cudaCheck(cudaMemcpy(params + r->t[i].offset, E->master + E->moff[i], (size_t)r->t[i].numel * 4,
                                 cudaMemcpyDeviceToHost));
}

float *engine_cuda_master(EngineCuda *E) { return E->master; }
int64_t engine_cuda_master_offset(const EngineCuda *E, int i) { return i >= 0 && i < E->r->n ? E->moff[i] : -1; }

// ---------------------------------------------------------------- gradient buffers (compact layout)

int64_t engine_cuda_grads_numel(const EngineCuda *E) { return E->grad_n; }
int64_t engine_cuda_grad_offset(const EngineCuda *E, int i) { return i >= 0 && i < E->r->n ? E->goff[i] : -1; }
float *engine_cuda_grads_new(EngineCuda *E) { return (float *)engine_cuda_alloc((size_t)E->grad_n * 4); }

void engine_cuda_grads_to_host(const EngineCuda *E, const float *grads, float *host) {
    const Registry *r = E->r;
    memset(host, 0, (size_t)r->numel * sizeof(float));
    cudaCheck(cudaDeviceSynchronize());
    for (int i = 0; i < r->n; i++)
        if (E->goff[i] >= 0)
            cudaCheck(cudaMemcpy(host + r->t[i].offset, grads + E->goff[i], (size_t)r->t[i].numel * 4, cudaMemcpyDeviceToHost));
}

void engine_cuda_grads_from_host(const EngineCuda *E, float *grads, const float *host) {
    const Registry *r = E->r;
    cudaCheck(cudaDeviceSynchronize());
    if (E->grad_n) cudaCheck(cudaMemset(grads, 0, (size_t)E->grad_n * 4));  // the alignment gaps stay zero
    for (int i = 0; i < r->n; i++)
        if (E->goff[i] >= 0)
            cudaCheck(cudaMemcpy(grads + E->goff[i], host + r->t[i].offset, (size_t)r->t[i].numel * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaDeviceSynchronize());
}

// ---------------------------------------------------------------- creation

// Host memory of an engine (engine_setup's part; no CUDA calls).
static void engine_host_free(EngineCuda *E) {
    free(E->tab.e);
    free(E->acts);
    free(E->w);
    free(E->moff);
    free(E->goff);
    free(E->f32read);
    free(E->tok_h);
    free(E->reset_h);
    free(E->wext);
    free(E);
}

void engine_cuda_free(EngineCuda *E) {
    if (!E) return;
    if (E->gemm) dl_gemm_free(E->gemm);
    sdpa_cudnn_free(E->sdpa);
    live_set(E, false);
    for (int i = 0; E->ev_state && i < E->h.base.n_layer + 2; i++) cudaEventDestroy(E->ev_state[i]);
    free(E->ev_state);
    prof_print(E);
    if (E->prof) cudaEventDestroy(E->pev[0]), cudaEventDestroy(E->pev[1]);
    cudaFree(E->arena);
    if (E->wc != (void *)E->master) cudaFree(E->wc);
    cudaFree(E->master);
    cudaFree(E->wpad);
    cudaFree(E->gpad);
    cudaFree(E->inv_freq);
    if (E->dhid) {
        for (int i = 0; i <= E->h.base.n_layer; i++) cudaFree(E->dhid[i]);
        free(E->dhid);
        free(E->has_dhid);
    }
    cudaFree(E->mse_mask);
    cudaFree(E->mse_rows);
    cudaFree(E->mse_acc);
    if (E->st) cudaStreamDestroy(E->st);
    engine_host_free(E);
}

// Everything engine_cuda_new decides before touching the GPU: weight lookups, shape checks, the compact layout,
// the padded-weight sizes and the activation table (sizes only; the pointers are set once the arena exists).
// engine_cuda_plan runs exactly this, so its numbers are the engine's.
static EngineCuda *engine_setup(const HybridConfig *h, const Registry *r, int64_t B, int64_t T, int flags, DType dt,
                                int64_t chunk_rows, DlError *err) {
    const LlamaConfig *c = &h->base;
    if (B <= 0 || T <= 0) {
        dl_fail(err, "engine_cuda: batch %lld x seqlen %lld must be positive", (long long)B, (long long)T);
        return NULL;
    }
    EngineCuda *E = (EngineCuda *)calloc(1, sizeof *E);
    E->h = *h;
    E->r = r;
    E->B = B;
    E->T = T;
    E->N = B * T;
    E->flags = flags;
    E->dt = dt;
    E->es = dt == DT_BF16 ? 2 : 4;
    E->Rp = (h->dt_rank + 7) / 8 * 8;
    E->w = (LayerW *)calloc((size_t)DL_MAX(c->n_layer, 1), sizeof(LayerW));
    E->acts = (LayerActs *)calloc((size_t)DL_MAX(c->n_layer, 1), sizeof(LayerActs));
    const size_t nt = (size_t)DL_MAX(r->n, 1);
    E->moff = (int64_t *)malloc(nt * sizeof(int64_t));
    E->goff = (int64_t *)malloc(nt * sizeof(int64_t));
    E->f32read = (bool *)calloc(nt, sizeof(bool));
    if (layer_w_init(E, err) || check_shapes(E, err)) {
        engine_host_free(E);
        return NULL;
    }
    engine_layout(E);
    if (flags & ECU_EXTERN_WEIGHTS && (!(flags & ECU_NO_MASTER) || dt != DT_BF16 || E->has_mamba || E->has_mamba2)) {
        // the caller's pointers replace the compute copy only; a master, fp32 weights or the Mamba kernels' fp32 and
        // padded copies would still need the whole model on this GPU
        dl_fail(err, "engine_cuda: ECU_EXTERN_WEIGHTS (weights held outside the engine, e.g. a sharded teacher) needs a "
                     "frozen (ECU_NO_MASTER) bf16 model without Mamba layers");
        engine_host_free(E);
        return NULL;
    }
    if (E->has_mamba2) mamba2_cuda_shape(h, B, T, &E->m2shape, NULL, 0);  // accepted by check_shapes
    const int64_t V = c->vocab;
    int64_t chunk = chunk_rows > 0 ? chunk_rows : DL_MAX(1, (int64_t)ECU_CHUNK_LOGITS / V);
    E->chunk = DL_MIN(chunk, E->N);
    if (E->wpad_n) E->gpad_n = (int64_t)E->Rp * DL_MAX((int64_t)c->d_model, (int64_t)h->d_inner);
    build_table(E, &E->tab);
    EngineCudaMemory m;
    engine_cuda_memory_parts(E, &m);
    E->weight_bytes = m.compute + m.master + m.padded;
    return E;
}

int engine_cuda_plan(const HybridConfig *h, const Registry *r, int64_t B, int64_t T, int flags, DType dt,
                     int64_t chunk_rows, EngineCudaMemory *m, DlError *err) {
    EngineCuda *E = engine_setup(h, r, B, T, flags, dt, chunk_rows, err);
    if (!E) return -1;
    engine_cuda_memory_parts(E, m);
    engine_host_free(E);
    return 0;
}

// The attention kernels, from DISTILL_ATTN: "cudnn" (cuDNN's fused SDPA through attention_cudnn.h, with its
// deterministic backward so that training stays bit-reproducible) or "native" (the hand-written kernels of
// attention.cu); unset: ECU_ATTN_DEFAULT. cuDNN serves bf16 engines with attention layers; where it cannot be
// loaded or has no engine for this model's shapes, one line says so and the hand-written kernels run. The plans
// of the engine's shapes (forward; backward when training; one document per row) are built here, so that the
// first step does not pay for their compilation and their workspace exists from the start. cuDNN is the default
// (8 Llama-3-8B-shaped layers: 106 vs 124 ms per step on an H100). Its P·V product takes P in bf16, as flash
// attention does; on the freshly initialized SmolLM2 hybrid, whose gradient is ill-conditioned, that alone moves the
// CPU's own fp32 gradient norm by 58% (DISTILL_CPU_ATTN_ROUND=p), and one step's gradient differs from the
// hand-written kernels' far more than their per-call agreement suggests; trained through the 50% recipe, both paths
// give the same losses and model (docs/ENGINE_CUDA.md, "Attention kernels").
#define ECU_ATTN_DEFAULT "cudnn"
static int attn_select(EngineCuda *E, FILE *log, DlError *err) {
    const LlamaConfig *c = &E->h.base;
    const char *env = getenv("DISTILL_ATTN");
    const char *want = env && *env ? env : ECU_ATTN_DEFAULT;
    if (strcmp(want, "cudnn") && strcmp(want, "native"))
        return dl_fail(err, "engine_cuda: DISTILL_ATTN=%s: expected cudnn or native", want);
    if (strcmp(want, "cudnn") || hybrid_n_attn(&E->h) == 0) return 0;
    FILE *f = log ? log : stderr;
    if (E->dt != DT_BF16) {
        if (env && *env) fprintf(f, "engine_cuda: DISTILL_ATTN=cudnn: the cuDNN path is bf16; this fp32 engine uses the hand-written attention\n");
        return 0;
    }
    char why[512];
    E->sdpa = sdpa_cudnn_new(1, why, sizeof why);
    const int train = (E->flags & ECU_TRAIN) != 0;
    if (E->sdpa && (sdpa_cudnn_prepare(E->sdpa, 0, E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, 1, 0, why, sizeof why) ||
                    (train && sdpa_cudnn_prepare(E->sdpa, 1, E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, 1, 0, why,
                                                 sizeof why)))) {
        sdpa_cudnn_free(E->sdpa);
        E->sdpa = NULL;
    }
    if (!E->sdpa) {
        fprintf(f, "engine_cuda: cuDNN attention unavailable (%s); using the hand-written kernels\n", why);
        return 0;
    }
    if (log) {
        int64_t wf = 0, wb = 0;
        sdpa_cudnn_plan_info(E->sdpa, 0, E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, 1, 0, NULL, &wf);
        if (train) sdpa_cudnn_plan_info(E->sdpa, 1, E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, 1, 0, NULL, &wb);
        char b1[32];
        fprintf(log, "engine_cuda: attention through cuDNN %ld fused SDPA (%sworkspace %s, outside the activation table)\n",
                sdpa_cudnn_version(E->sdpa), train ? "deterministic backward, " : "",
                ecu_gib((double)DL_MAX(wf, wb), b1, sizeof b1));
    }
    return 0;
}

EngineCuda *engine_cuda_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T,
                            int flags, DType dt, int64_t chunk_rows, FILE *log, DlError *err) {
    EngineCuda *E = engine_setup(h, r, B, T, flags, dt, chunk_rows, err);
    if (!E) return NULL;
    const LlamaConfig *c = &h->base;
    cudaCheck(cudaStreamCreateWithFlags(&E->st, cudaStreamNonBlocking));
    // ---- parameters: the compact fp32 master (engine_layout) and the compute copy
    const int64_t n = r->numel;
    FILE *lf = log ? log : stderr;
    char b1[32];
    if (E->master_n && !(E->master = (float *)ecu_try_alloc((size_t)E->master_n * 4))) {
        ecu_oom_report(E, "fp32 master weights", (size_t)E->master_n * 4, lf);
        dl_fail(err, "engine_cuda: out of GPU memory for the fp32 master weights (%s)",
                ecu_gib((double)E->master_n * 4, b1, sizeof b1));
        engine_cuda_free(E);
        return NULL;
    }
    if (E->master) cudaCheck(cudaMemset(E->master, 0, (size_t)E->master_n * 4));  // the alignment gaps stay zero
    if (dt == DT_F32) E->wc = E->master;  // fp32 mode: master_n = numel, registry layout
    else if (flags & ECU_EXTERN_WEIGHTS) E->wext = (const void **)calloc((size_t)DL_MAX(r->n, 1), sizeof(void *));
    else if (!(E->wc = ecu_try_alloc((size_t)n * E->es))) {
        ecu_oom_report(E, "compute copy of the weights", (size_t)n * E->es, lf);
        dl_fail(err, "engine_cuda: out of GPU memory for the weights");
        engine_cuda_free(E);
        return NULL;
    }
    if (E->wpad_n) {
        E->wpad = ecu_try_alloc((size_t)E->wpad_n * E->es);
        E->gpad = (float *)ecu_try_alloc((size_t)E->gpad_n * 4);
        if (!E->wpad || !E->gpad) {
            ecu_oom_report(E, "padded dt_proj weights", (size_t)E->wpad_n * E->es, lf);
            dl_fail(err, "engine_cuda: out of GPU memory for the padded dt weights");
            engine_cuda_free(E);
            return NULL;
        }
        cudaCheck(cudaMemset(E->wpad, 0, (size_t)E->wpad_n * E->es));
    }
    cudaCheck(cudaDeviceSynchronize());
    if (!(E->gemm = dl_gemm_new(0, err ? err->msg : NULL, err ? sizeof err->msg : 0))) {
        engine_cuda_free(E);
        return NULL;
    }
    E->ev_state = (cudaEvent_t *)calloc((size_t)c->n_layer + 2, sizeof(cudaEvent_t));
    for (int i = 0; i < c->n_layer + 2; i++) cudaCheck(cudaEventCreateWithFlags(&E->ev_state[i], cudaEventDisableTiming));
    live_set(E, true);
    const char *pe = getenv("DISTILL_ENGINE_PROFILE");
    if ((E->prof = pe && *pe == '1')) {
        cudaCheck(cudaEventCreate(&E->pev[0]));
        cudaCheck(cudaEventCreate(&E->pev[1]));
    }
    if (attn_select(E, log, err)) {
        engine_cuda_free(E);
        return NULL;
    }
    float invf[512];
    rope_inv_freq(c, invf);
    cudaCheck(cudaMalloc(&E->inv_freq, 512 * sizeof(float)));
    cudaCheck(cudaMemcpy(E->inv_freq, invf, sizeof invf, cudaMemcpyHostToDevice));
    // ---- the activation table (built by engine_setup), one allocation
    if (!(E->arena = (char *)ecu_try_alloc(E->tab.total))) {
        ecu_oom_report(E, "the activation table", E->tab.total, lf);
        dl_fail(err, "engine_cuda: out of GPU memory for activations (%s at micro-batch %lld)",
                ecu_gib((double)E->tab.total, b1, sizeof b1), (long long)B);
        engine_cuda_free(E);
        return NULL;
    }
    for (int i = 0; i < E->tab.n; i++) *E->tab.e[i].slot = E->arena + E->tab.e[i].off;
    if (E->flags & ECU_TRAIN && E->flags & ECU_RECOMPUTE_MLP)
        for (int l = 0; l < c->n_layer; l++) E->acts[l].gu = E->gu_sh, E->acts[l].act = E->act_sh;
    E->tok_h = (int32_t *)malloc((size_t)E->N * 4);
    E->reset_h = (uint8_t *)malloc((size_t)E->N);
    if (!E->wext) {  // (ECU_EXTERN_WEIGHTS: the caller provides the weights)
        upload_params(E, params);
        ecu_refresh_pad(E);
    }
    cudaCheck(cudaStreamSynchronize(E->st));
    E->last_state = -1;
    if (log) engine_cuda_print_memory(E, log);
    return E;
}

bool engine_cuda_cudnn_attention(const EngineCuda *E) { return E && E->sdpa; }

// ---------------------------------------------------------------- forward

static void *state_ptr(const EngineCuda *E, int i) {
    int slot = E->n_states == E->h.base.n_layer + 1 ? i : i % 2;
    return at(E->states, (int64_t)slot * E->N * E->h.base.d_model, E->es);
}
// ---- reading another engine's hidden states (teacher forcing, hidden-state MSE, the teacher's logits): the reader's
// stream waits for the event the writer recorded after that state, not for the whole device. Engines register
// themselves here; a pointer that is no live engine's hidden state makes the reader wait for the device.
#define ECU_MAX_LIVE 64
static EngineCuda *g_live[ECU_MAX_LIVE];
static void live_set(EngineCuda *E, bool on) {
    for (int i = 0; i < ECU_MAX_LIVE; i++)
        if (g_live[i] == (on ? NULL : E)) {
            g_live[i] = on ? E : NULL;
            return;
        }
}
static void wait_hidden(EngineCuda *E, const void *p) {
    const char *q = (const char *)p;
    for (int k = 0; k < ECU_MAX_LIVE; k++) {
        const EngineCuda *o = g_live[k];
        if (!o || o == E) continue;
        const int nl = o->h.base.n_layer;
        const size_t one = (size_t)(o->N * o->h.base.d_model) * o->es;
        int i = -1;
        if (q == (const char *)o->xf) i = nl + 1;
        else if (q >= (const char *)o->states && q < (const char *)o->states + one * o->n_states)
            i = o->n_states == nl + 1 ? (int)((size_t)(q - (const char *)o->states) / one) : o->last_state;
        if (i < 0) continue;
        cudaCheck(cudaStreamWaitEvent(E->st, o->ev_state[i], 0));
        return;
    }
    cudaCheck(cudaDeviceSynchronize());
}

static LayerActs *acts_of(EngineCuda *E, int l) { return (E->flags & ECU_TRAIN) ? &E->acts[l] : &E->acts[0]; }
static void lin(EngineCuda *E, void *y, const void *x, const void *W, const void *bias, int64_t N, int64_t In, int64_t O, int acc) {
    TC(dl_linear_fwd(E->gemm, E->dt, y, x, W, bias, N, In, O, acc, E->st, EA));
}

// gate|up into gu ([N, 2ff] with ld 2ff when fused, else two [N, ff] halves with ld ff), act = silu(gate)*up
static void mlp_up(EngineCuda *E, const LayerW *w, const void *xn2, void *gu, void *act, int64_t *ld_out) {
    const int64_t N = E->N, d = E->h.base.d_model, ff = E->h.base.d_ff;
    if (w->fused_gu) {
        lin(E, gu, xn2, P(E, w->gate), NULL, N, d, 2 * ff, 0);
        TC(swiglu_fwd_cuda(E->dt, act, gu, at(gu, ff, E->es), N, ff, 2 * ff, E->st, EA));
        *ld_out = 2 * ff;
    } else {
        lin(E, gu, xn2, P(E, w->gate), NULL, N, d, ff, 0);
        lin(E, at(gu, N * ff, E->es), xn2, P(E, w->up), NULL, N, d, ff, 0);
        TC(swiglu_fwd_cuda(E->dt, act, gu, at(gu, N * ff, E->es), N, ff, ff, E->st, EA));
        *ld_out = ff;
    }
}

// ---- profiling (DISTILL_ENGINE_PROFILE=1): prof(E, name) charges the GPU time since the
// previous boundary on the engine's stream to region name. Every boundary synchronizes the stream, so the teacher
// and student streams stop overlapping and launch gaps are counted: for attribution, not for the step time.
static void prof_start(EngineCuda *E) {
    if (E->prof && E->nfwd >= 2) cudaCheck(cudaEventRecord(E->pev[0], E->st));
}
static void prof(EngineCuda *E, const char *name) {
    if (!E->prof || E->nfwd < 2) return;  // the first step is cold (lazy module loading, GEMM heuristics)
    cudaCheck(cudaEventRecord(E->pev[1], E->st));
    cudaCheck(cudaEventSynchronize(E->pev[1]));
    float ms = 0;
    cudaCheck(cudaEventElapsedTime(&ms, E->pev[0], E->pev[1]));
    cudaEvent_t t = E->pev[0];
    E->pev[0] = E->pev[1], E->pev[1] = t;
    int i = 0;
    while (i < E->nprow && strcmp(E->prow[i].name, name)) i++;
    if (i == ECU_PROF_ROWS) return;
    if (i == E->nprow) E->prow[E->nprow++] = (ProfRow){name, 0, 0};
    E->prow[i].ms += ms, E->prow[i].n++;
}
static void prof_print(const EngineCuda *E) {
    if (!E->prof || !E->nprow) return;
    FILE *f = stdout;  // at engine_cuda_free the caller's log may be closed
    double tot = 0;
    for (int i = 0; i < E->nprow; i++) tot += E->prow[i].ms;
    fprintf(f, "engine_cuda profile (%s engine, %d layers, B %lld x T %lld; GPU time per step over the %ld steps after the "
               "first):\n", (E->flags & ECU_TRAIN) ? "training" : "frozen", E->h.base.n_layer, (long long)E->B,
            (long long)E->T, E->nfwd - 1);
    for (int i = 0; i < E->nprow; i++)
        fprintf(f, "  %-28s %8.3f ms/step %6.1f%%  (%ld calls, %.3f ms each)\n", E->prow[i].name,
                E->prow[i].ms / (E->nfwd - 1), 100 * E->prow[i].ms / tot, E->prow[i].n, E->prow[i].ms / E->prow[i].n);
}

// ---- attention: cuDNN's fused SDPA or the hand-written kernels (attn_select). Both write the same out and lse
// (the natural-log softmax statistics of the scaled scores, [B, nh, T]), so either backward can follow either
// forward, and a call cuDNN refuses (no engine for a shape: it launches nothing) falls back to the hand-written
// kernel. Refusals are remembered per shape inside the handle, so a run keeps one choice per shape: deterministic.
static void sdpa_refused(EngineCuda *E, const char *why) {
    if (E->sdpa_warned) return;
    E->sdpa_warned = true;
    fprintf(stderr, "engine_cuda: cuDNN attention refused a call (%s); such calls use the hand-written "
                                      "kernels\n", why);
}
// One document per row needs no document bias: cuDNN's causal mask alone (the hand-written kernels take doc
// starts either way).
static const int32_t *sdpa_docs(const EngineCuda *E) { return E->multi_doc ? E->docs : NULL; }

// DISTILL_ATTN_CHECK=1 (diagnostic): after every cuDNN call, the hand-written kernels run on the same inputs into
// scratch buffers and one line per call on stderr gives the relative error norms of cuDNN's outputs against them.
static double check_rel(const EngineCuda *E, const void *a, const void *b, int64_t n, bool f32) {
    const size_t bytes = (size_t)n * (f32 ? 4 : E->es);
    char *ha = (char *)malloc(bytes), *hb = (char *)malloc(bytes);
    cudaCheck(cudaStreamSynchronize(E->st));
    cudaCheck(cudaMemcpy(ha, a, bytes, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(hb, b, bytes, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double x = f32 || E->es == 4 ? ((float *)ha)[i] : bf16_to_f32(((uint16_t *)ha)[i]);
        const double y = f32 || E->es == 4 ? ((float *)hb)[i] : bf16_to_f32(((uint16_t *)hb)[i]);
        num += (x - y) * (x - y), den += y * y;
    }
    free(ha), free(hb);
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static bool attn_check_on(void) {
    const char *v = getenv("DISTILL_ATTN_CHECK");
    return v && *v == '1';
}
static void *check_buf(void **slot, size_t bytes) {
    if (!*slot) cudaCheck(cudaMalloc(slot, bytes));
    return *slot;
}
static void *g_chk[5];  // out, lse, dq, dk, dv of the hand-written kernels (diagnostic only, never freed)

static void attn_fwd(EngineCuda *E, LayerActs *a, int l) {
    const LlamaConfig *c = &E->h.base;
    if (E->sdpa) {
        char why[512];
        if (!sdpa_cudnn_fwd(E->sdpa, E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, 1, a->q, a->k, a->v,
                            sdpa_docs(E), a->att, a->lse, E->st, why, sizeof why)) {
            if (attn_check_on()) {
                const int64_t no = E->N * c->n_head * c->head_dim, nl = E->B * c->n_head * E->T;
                void *o2 = check_buf(&g_chk[0], (size_t)no * E->es);
                float *l2 = (float *)check_buf(&g_chk[1], (size_t)nl * 4);
                TC(attention_fwd_cuda(E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, a->q, a->k, a->v, E->docs, o2,
                                      l2, E->st, EA));
                fprintf(stderr, "attn check layer %d forward%s: out %.3g lse %.3g\n", l, E->multi_doc ? " (documents)" : "",
                        check_rel(E, a->att, o2, no, false), check_rel(E, a->lse, l2, nl, true));
            }
            return;
        }
        sdpa_refused(E, why);
    }
    TC(attention_fwd_cuda(E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, a->q, a->k, a->v, E->docs, a->att,
                          a->lse, E->st, EA));
}

// dq, dk, dv from datt (d loss / d attention out)
static void attn_bwd(EngineCuda *E, LayerActs *a, int l) {
    const LlamaConfig *c = &E->h.base;
    if (E->sdpa) {
        char why[512];
        if (!sdpa_cudnn_bwd(E->sdpa, E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, 1, a->q, a->k, a->v,
                            sdpa_docs(E), a->att, a->lse, E->datt, E->dq, E->dk, E->dv, E->st, why, sizeof why)) {
            if (attn_check_on()) {
                const int64_t nq = E->N * c->n_head * c->head_dim, nk = E->N * c->n_kv_head * c->head_dim;
                void *q2 = check_buf(&g_chk[2], (size_t)nq * E->es), *k2 = check_buf(&g_chk[3], (size_t)nk * E->es);
                void *v2 = check_buf(&g_chk[4], (size_t)nk * E->es);
                TC(attention_bwd_cuda(E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, a->q, a->k, a->v, E->docs,
                                      a->att, a->lse, E->datt, q2, k2, v2, E->attn_ws, E->st, EA));
                fprintf(stderr, "attn check layer %d backward%s: dq %.3g dk %.3g dv %.3g\n", l,
                        E->multi_doc ? " (documents)" : "", check_rel(E, E->dq, q2, nq, false),
                        check_rel(E, E->dk, k2, nk, false), check_rel(E, E->dv, v2, nk, false));
            }
            return;
        }
        sdpa_refused(E, why);
    }
    TC(attention_bwd_cuda(E->dt, E->B, E->T, c->n_head, c->n_kv_head, c->head_dim, a->q, a->k, a->v, E->docs, a->att,
                          a->lse, E->datt, E->dq, E->dk, E->dv, E->attn_ws, E->st, EA));
}

// Columns [c0, c0 + w) of the [N, ld] matrix src into the [N, w] matrix dst (to = 0), or back (to = 1).
static void cols_copy(EngineCuda *E, void *dense, int64_t w, void *wide, int64_t ld, int64_t c0, int to) {
    const size_t es = E->es;
    void *d = to ? at(wide, c0, es) : dense;
    const void *s = to ? dense : at(wide, c0, es);
    cudaCheck(cudaMemcpy2DAsync(d, (size_t)(to ? ld : w) * es, s, (size_t)(to ? w : ld) * es, (size_t)w * es, (size_t)E->N,
                                cudaMemcpyDeviceToDevice, E->st));
}

// Mamba-2 weights of layer w for mamba2_cuda.h: matrices and norm from the compute copy, the per-channel tensors fp32
static Mamba2CudaW m2_weights(const EngineCuda *E, const LayerW *w) {
    Mamba2CudaW m = {(const uint16_t *)P(E, w->m2in), PM(E, w->cw),   PM(E, w->cb), PM(E, w->dtb),
                     PM(E, w->alog), PM(E, w->D), (const uint16_t *)P(E, w->m2norm), (const uint16_t *)P(E, w->out)};
    return m;
}

static void mamba_fwd(EngineCuda *E, int l, LayerActs *a, const void *u, void *out) {
    const HybridConfig *h = &E->h;
    const LayerW *w = &E->w[l];
    if (h->mixer[l] == MIXER_MAMBA2) {
        const Mamba2CudaW w2 = m2_weights(E, w);
        TC(mamba2_cuda_fwd(E->gemm, &E->m2shape, &w2, u, E->have_reset ? E->reset_d : NULL, out, &a->m2, &E->m2s, E->st, EA));
        prof(E, "fwd mamba2");
        return;
    }
    const int64_t N = E->N, d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, ds = h->d_state, Rp = E->Rp;
    const ScanShape s = scan_shape(E);
    const uint8_t *rs = E->have_reset ? E->reset_d : NULL;
    if (w->fused_in) {  // one [N, 2di + 2dxb] GEMM into the layer's gate|up buffer (its MLP writes it later), split
        const int64_t W4 = 2 * di + 2 * dxb;
        void *cat = a->gu ? a->gu : E->gu_sh;
        lin(E, cat, u, P(E, w->z), NULL, N, d, W4, 0);
        cols_copy(E, a->z, di, cat, W4, 0, 0);
        cols_copy(E, a->xs, dxb, cat, W4, di, 0);
        cols_copy(E, a->Bs, dxb, cat, W4, di + dxb, 0);
        cols_copy(E, a->Cs, di, cat, W4, di + 2 * dxb, 0);
    } else {
        lin(E, a->z, u, P(E, w->z), NULL, N, d, di, 0);
        lin(E, a->xs, u, P(E, w->x), NULL, N, d, dxb, 0);
        lin(E, a->Bs, u, P(E, w->Bp), NULL, N, d, dxb, 0);
        lin(E, a->Cs, u, P(E, w->Cp), NULL, N, d, di, 0);
    }
    lin(E, a->dtl, u, at(E->wpad, w->pad_dtd, E->es), NULL, N, d, Rp, 0);
    prof(E, "fwd mamba in_proj");
    // dt = dt_proj(dtl) with its bias (the scan adds the bias again as delta_bias: MambaInLlama's double bias)
    lin(E, E->mdt, a->dtl, at(E->wpad, w->pad_dtw, E->es), P(E, w->dtb), N, Rp, di, 0);
    eng_repeat_fwd(E->dt, E->xr, a->xs, N, di, dxb, ds, E->st);
    TC(conv1d_silu_fwd_cuda(E->B, E->T, di, h->d_conv, (const uint16_t *)E->xr, PM(E, w->cw), PM(E, w->cb), rs, NULL, 1,
                            (uint16_t *)E->xc, E->st, EA));
    eng_neg_exp(E->A, PM(E, w->alog), di * ds, E->st);
    prof(E, "fwd mamba dt, repeat, conv");
    TC(selective_scan_fwd_cuda(&s, (const uint16_t *)E->xc, (const uint16_t *)E->mdt, E->A, (const uint16_t *)a->Bs,
                               (const uint16_t *)a->Cs, PM(E, w->D), (const uint16_t *)a->z, PM(E, w->dtb), rs, NULL,
                               (uint16_t *)a->y, NULL, a->ckpt, 0, E->scan_ws, E->st, EA));
    prof(E, "fwd mamba scan");
    lin(E, out, a->y, P(E, w->out), NULL, N, di, d, 0);
    prof(E, "fwd mamba out_proj");
}

static void layer_fwd(EngineCuda *E, int l, const void *x, void *out) {
    const LlamaConfig *c = &E->h.base;
    const LayerW *w = &E->w[l];
    const int64_t N = E->N, d = c->d_model, qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    const float eps = (float)c->rms_eps;
    LayerActs *a = acts_of(E, l);
    TC(rmsnorm_fwd_cuda(E->dt, a->xn1, a->rstd1, NULL, x, NULL, P(E, w->in_norm), N, d, eps, E->st, EA));
    prof(E, "fwd norms");
    if (E->h.mixer[l] == MIXER_ATTN) {
        lin(E, a->q, a->xn1, P(E, w->q), NULL, N, d, qd, 0);
        lin(E, a->k, a->xn1, P(E, w->k), NULL, N, d, kvd, 0);
        lin(E, a->v, a->xn1, P(E, w->v), NULL, N, d, kvd, 0);
        TC(rope_cuda(E->dt, a->q, E->pos, E->inv_freq, N, c->n_head, c->head_dim, 0, E->st, EA));
        TC(rope_cuda(E->dt, a->k, E->pos, E->inv_freq, N, c->n_kv_head, c->head_dim, 0, E->st, EA));
        prof(E, "fwd attn qkv + rope");
        attn_fwd(E, a, l);
        prof(E, "fwd attn core");
        lin(E, E->mix, a->att, P(E, w->o), NULL, N, qd, d, 0);
        prof(E, "fwd attn o_proj");
    } else {
        mamba_fwd(E, l, a, a->xn1, E->mix);
    }
    // mid = x + mixer, xn2 = norm(mid), fused
    TC(rmsnorm_fwd_cuda(E->dt, a->xn2, a->rstd2, a->mid, E->mix, x, P(E, w->post_norm), N, d, eps, E->st, EA));
    prof(E, "fwd norms");
    int64_t ld;
    void *gu = a->gu ? a->gu : E->gu_sh, *act = a->act ? a->act : E->act_sh;
    mlp_up(E, w, a->xn2, gu, act, &ld);
    prof(E, "fwd mlp gate|up + swiglu");
    cudaCheck(cudaMemcpyAsync(out, a->mid, (size_t)(N * d) * E->es, cudaMemcpyDeviceToDevice, E->st));
    lin(E, out, act, P(E, w->down), NULL, N, c->d_ff, d, 1);  // out = mid + down(act)
    prof(E, "fwd mlp down");
}

int engine_cuda_forward_range(EngineCuda *E, const int32_t *tokens, const uint8_t *reset, int l0, const void *x0, int l1,
                              DlError *err) {
    const LlamaConfig *c = &E->h.base;
    const int64_t N = E->N, d = c->d_model;
    if (l0 < 0) l0 = 0;
    if (l1 > c->n_layer) l1 = c->n_layer;
    if (!x0 && l0 != 0) return dl_fail(err, "engine_cuda_forward_range: l0 = %d needs x0", l0);
    for (int64_t i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab)
            return dl_fail(err, "engine_cuda: token id %d at position %lld outside the vocabulary 0..%d", tokens[i],
                           (long long)i, c->vocab - 1);
    memcpy(E->tok_h, tokens, (size_t)N * 4);
    E->have_reset = reset != NULL;
    E->multi_doc = false;
    if (reset) memcpy(E->reset_h, reset, (size_t)N);
    for (int64_t i = 0; reset && i < N && !E->multi_doc; i++) E->multi_doc = reset[i] && i % E->T != 0;
    int32_t *pos = (int32_t *)malloc((size_t)N * 4), *docs = (int32_t *)malloc((size_t)N * 4);
    doc_positions(E->B, E->T, reset, pos, docs);
    cudaCheck(cudaMemcpyAsync(E->tok, tokens, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
    cudaCheck(cudaMemcpyAsync(E->pos, pos, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
    cudaCheck(cudaMemcpyAsync(E->docs, docs, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
    if (reset) cudaCheck(cudaMemcpyAsync(E->reset_d, reset, (size_t)N, cudaMemcpyHostToDevice, E->st));
    cudaCheck(cudaStreamSynchronize(E->st));  // the host arrays are freed below
    free(pos);
    free(docs);
    if (E->wext) {  // every weight this pass reads must have been given (the hook gives the layers')
        const WRef need[] = {x0 ? E->fnorm : E->emb, E->fnorm, E->head};
        for (int k = 0; k < 3; k++)
            if (!E->wext[need[k].idx])
                return dl_fail(err, "engine_cuda: tensor %s has no weights (ECU_EXTERN_WEIGHTS: engine_cuda_set_weight)",
                               E->r->t[need[k].idx].name);
        for (int i = 0; i < E->r->n && !E->layer_hook; i++)
            if (!E->wext[i] && E->r->t[i].layer >= l0 && E->r->t[i].layer < l1)
                return dl_fail(err, "engine_cuda: tensor %s has no weights (ECU_EXTERN_WEIGHTS without a layer hook)",
                               E->r->t[i].name);
    }
    E->l0 = l0;
    E->l1 = l1;
    void *x = state_ptr(E, l0);
    E->nfwd++;
    prof_start(E);
    if (x0) {
        wait_hidden(E, x0);  // usually another engine's hidden state (teacher forcing), written on its stream
        cudaCheck(cudaMemcpyAsync(x, x0, (size_t)(N * d) * E->es, cudaMemcpyDeviceToDevice, E->st));
    }
    else TC(embedding_fwd_cuda(E->dt, x, E->tok, P(E, E->emb), N, c->vocab, d, E->st, EA));
    cudaCheck(cudaEventRecord(E->ev_state[l0], E->st));
    for (int l = l0; l < l1; l++) {
        if (E->layer_hook && E->layer_hook(E->layer_hook_ctx, l, l1, err)) return -1;
        layer_fwd(E, l, state_ptr(E, l), state_ptr(E, l + 1));
        cudaCheck(cudaEventRecord(E->ev_state[l + 1], E->st));
    }
    E->last_state = l1;
    if (l1 == c->n_layer) {
        TC(rmsnorm_fwd_cuda(E->dt, E->xf, E->rstdf, NULL, state_ptr(E, l1), NULL, P(E, E->fnorm), N, d, (float)c->rms_eps,
                            E->st, EA));
        cudaCheck(cudaEventRecord(E->ev_state[c->n_layer + 1], E->st));
    }
    prof(E, "fwd norms");
    E->have_dxf = false;
    if (E->has_dhid) memset(E->has_dhid, 0, (size_t)(c->n_layer + 1) * sizeof(bool));
    return 0;
}

int engine_cuda_set_weight(EngineCuda *E, int i, const void *dev, DlError *err) {
    if (!E->wext) return dl_fail(err, "engine_cuda_set_weight: the engine was made without ECU_EXTERN_WEIGHTS");
    if (i < 0 || i >= E->r->n) return dl_fail(err, "engine_cuda_set_weight: tensor index %d outside 0..%d", i, E->r->n - 1);
    if ((uintptr_t)dev & 15) return dl_fail(err, "engine_cuda_set_weight: %s's weights are not 16-byte aligned", E->r->t[i].name);
    E->wext[i] = dev;
    return 0;
}

void engine_cuda_set_layer_hook(EngineCuda *E, EngineCudaLayerHook fn, void *ctx) {
    E->layer_hook = fn;
    E->layer_hook_ctx = ctx;
}

int engine_cuda_forward(EngineCuda *E, const int32_t *tokens, const uint8_t *reset, DlError *err) {
    return engine_cuda_forward_range(E, tokens, reset, 0, NULL, E->h.base.n_layer, err);
}

const void *engine_cuda_hidden(const EngineCuda *E, int i) {
    if (i < 0 || i > E->h.base.n_layer) return NULL;
    // only the last forward's output is kept unless every state is (n_states == L + 1, which is also 2 at L = 1)
    if (E->n_states != E->h.base.n_layer + 1 && i != E->last_state) return NULL;
    return state_ptr(E, i);
}
const void *engine_cuda_final_hidden(const EngineCuda *E) { return E->xf; }

void engine_cuda_logits(const EngineCuda *E, int64_t r0, int64_t r1, void *out) {
    const LlamaConfig *c = &E->h.base;
    TC(dl_linear_fwd(E->gemm, E->dt, out, at(E->xf, r0 * c->d_model, E->es), P(E, E->head), NULL, r1 - r0, c->d_model,
                     c->vocab, 0, E->st, EA));
}

void engine_cuda_logits_host(const EngineCuda *E, int64_t r0, int64_t r1, float *out) {
    const int64_t V = E->h.base.vocab;
    for (int64_t a = r0; a < r1; a += E->chunk) {  // through the loss's logits buffer, a chunk at a time
        const int64_t n = DL_MIN(E->chunk, r1 - a);
        engine_cuda_logits(E, a, a + n, E->lbuf);
        void *f32 = E->lbuf;
        if (E->dt != DT_F32) {
            float *tmp = NULL;
            cudaCheck(cudaMallocAsync((void **)&tmp, (size_t)(n * V) * 4, E->st));
            TC(convert_cuda(DT_F32, tmp, E->dt, E->lbuf, n * V, E->st, EA));
            f32 = tmp;
        }
        cudaCheck(cudaMemcpyAsync(out + (a - r0) * V, f32, (size_t)(n * V) * 4, cudaMemcpyDeviceToHost, E->st));
        if (f32 != E->lbuf) cudaCheck(cudaFreeAsync(f32, E->st));
        cudaCheck(cudaStreamSynchronize(E->st));
    }
}

// ---------------------------------------------------------------- loss

LossParts engine_cuda_loss(EngineCuda *E, const int32_t *targets, const uint8_t *mask, const LossSpecCuda *spec,
                           float *grads, double *seq_logprob) {
    const LlamaConfig *c = &E->h.base;
    const int64_t N = E->N, T = E->T, d = c->d_model, V = c->vocab;
    uint8_t *cnt = (uint8_t *)malloc((size_t)N);
    float *rw = NULL;
    double n_count = 0;
    for (int64_t r = 0; r < N; r++) {
        cnt[r] = (!mask || mask[r]) && (!targets || (targets[r] >= 0 && targets[r] < V));
        n_count += cnt[r];
    }
    const double norm = spec->norm > 0 ? spec->norm : n_count;
    if (spec->seq_weight) {
        rw = (float *)malloc((size_t)N * 4);
        for (int64_t r = 0; r < N; r++) rw[r] = spec->seq_weight[r / T];
    }
    if (spec->teacher && !E->tbuf) dl_die(DL_EXIT_RUNTIME, "engine_cuda_loss: a teacher needs ECU_TEACHER_KL at engine_cuda_new");
    if (spec->teacher && spec->teacher->dt != E->dt) dl_die(DL_EXIT_RUNTIME, "engine_cuda_loss: teacher and student dtypes differ");
    cudaCheck(cudaMemcpyAsync(E->cnt, cnt, (size_t)N, cudaMemcpyHostToDevice, E->st));
    if (targets) cudaCheck(cudaMemcpyAsync(E->targ, targets, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
    if (rw) cudaCheck(cudaMemcpyAsync(E->rw, rw, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
    cudaCheck(cudaMemsetAsync(E->acc, 0, 4 * sizeof(double), E->st));
    if (grads && !(E->flags & ECU_TRAIN)) dl_die(DL_EXIT_RUNTIME, "engine_cuda_loss with grads on an engine made without ECU_TRAIN");
    const void *W = P(E, E->head);
    prof_start(E);
    for (int64_t r0 = 0; r0 < N; r0 += E->chunk) {
        const int64_t n = DL_MIN(E->chunk, N - r0);
        const void *xr = at(E->xf, r0 * d, E->es);
        lin(E, E->lbuf, xr, W, NULL, n, d, V, 0);
        prof(E, "loss student head");
        const void *tl = NULL;
        if (spec->teacher && (spec->w.kl != 0 || spec->w.rkl != 0)) {
            // the teacher's final hidden state comes from its own stream: order the two streams
            wait_hidden(E, spec->teacher->xf);
            TC(dl_linear_fwd(E->gemm, E->dt, E->tbuf, at(spec->teacher->xf, r0 * d, E->es), P(spec->teacher, spec->teacher->head),
                             NULL, n, d, V, 0, E->st, EA));
            tl = E->tbuf;
            prof(E, "loss teacher head");
        }
        TC(loss_rows_cuda(E->dt, &spec->w, n, V, E->lbuf, tl, targets ? E->targ + r0 : NULL, E->cnt + r0, rw ? E->rw + r0 : NULL,
                          1.0 / norm, grads ? E->lbuf : NULL, E->rows, seq_logprob ? E->logp + r0 : NULL, E->st, EA));
        TC(loss_sum_cuda(E->rows, n, E->acc, E->st, EA));
        prof(E, "loss rows");
        if (grads) {
            TC(dl_linear_dgrad(E->gemm, E->dt, at(E->dxf, r0 * d, E->es), E->lbuf, W, n, d, V, 0, E->st, EA));
            if (G(grads, E->head))
                TC(dl_linear_wgrad(E->gemm, E->dt, DT_F32, G(grads, E->head), E->lbuf, xr, n, d, V, 1, E->st, EA));
            prof(E, "loss head backward");
        }
    }
    double acc[4];
    cudaCheck(cudaMemcpyAsync(acc, E->acc, sizeof acc, cudaMemcpyDeviceToHost, E->st));
    float *logp = NULL;
    if (seq_logprob) {
        logp = (float *)malloc((size_t)N * 4);
        cudaCheck(cudaMemcpyAsync(logp, E->logp, (size_t)N * 4, cudaMemcpyDeviceToHost, E->st));
    }
    cudaCheck(cudaStreamSynchronize(E->st));
    if (seq_logprob) {
        for (int64_t b = 0; b < E->B; b++) seq_logprob[b] = 0;
        for (int64_t r = 0; r < N; r++) seq_logprob[r / T] += logp[r];
    }
    E->have_dxf = grads != NULL;
    LossSums sums = {acc[0], acc[1], acc[2], acc[3]};
    LossParts p;
    memset(&p, 0, sizeof p);
    p.norm = norm;
    p.loss = loss_total(&spec->w, &sums, norm);
    p.ce = sums.ce / norm;
    p.kl = sums.kl / norm;
    p.rkl = sums.rkl / norm;
    p.n_tokens = sums.n_rows;
    free(cnt);
    free(rw);
    free(logp);
    return p;
}

// The gradient buffer of hidden state i, zeroed at its first use after a backward.
static void *dhid_slot(EngineCuda *E, int i) {
    const int nl = E->h.base.n_layer;
    const int64_t n = E->N * E->h.base.d_model;
    if (!E->dhid) {
        E->dhid = (void **)calloc((size_t)nl + 1, sizeof(void *));
        E->has_dhid = (bool *)calloc((size_t)nl + 1, sizeof(bool));
    }
    if (!E->dhid[i]) cudaCheck(cudaMalloc(&E->dhid[i], (size_t)n * E->es));
    if (!E->has_dhid[i]) {
        cudaCheck(cudaMemsetAsync(E->dhid[i], 0, (size_t)n * E->es, E->st));
        E->has_dhid[i] = true;
    }
    return E->dhid[i];
}

void engine_cuda_add_hidden_grad(EngineCuda *E, int i, const void *dh, float scale) {
    if (i < 0 || i > E->h.base.n_layer) return;
    eng_axpy(E->dt, dhid_slot(E, i), dh, scale, E->N * E->h.base.d_model, E->st);
}

double engine_cuda_mse_hidden(EngineCuda *E, int i, const void *target, const uint8_t *mask, double scale, bool grad) {
    const int64_t N = E->N, d = E->h.base.d_model;
    const void *h = engine_cuda_hidden(E, i);
    if (!h) dl_die(DL_EXIT_RUNTIME, "engine_cuda_mse_hidden: hidden state %d is not kept (ECU_KEEP_HIDDEN, or outside the last forward's range)", i);
    if (!E->mse_rows) {
        cudaCheck(cudaMalloc(&E->mse_mask, (size_t)N));
        cudaCheck(cudaMalloc(&E->mse_rows, (size_t)N * sizeof(double)));
        cudaCheck(cudaMalloc(&E->mse_acc, sizeof(double)));
    }
    if (mask) cudaCheck(cudaMemcpyAsync(E->mse_mask, mask, (size_t)N, cudaMemcpyHostToDevice, E->st));
    wait_hidden(E, target);  // another engine's hidden state, written on that engine's stream
    void *da = grad ? dhid_slot(E, i) : NULL;
    eng_mse_rows(E->dt, N, d, h, target, mask ? E->mse_mask : NULL, scale, da, E->mse_rows, E->st);
    eng_sum_rows(E->mse_rows, N, E->mse_acc, E->st);
    double tot = 0;
    cudaCheck(cudaMemcpyAsync(&tot, E->mse_acc, sizeof tot, cudaMemcpyDeviceToHost, E->st));
    cudaCheck(cudaStreamSynchronize(E->st));
    return scale * tot;
}

// ---------------------------------------------------------------- backward

static void dgrad(EngineCuda *E, void *dx, const void *dy, const void *W, int64_t N, int64_t In, int64_t O, int acc) {
    TC(dl_linear_dgrad(E->gemm, E->dt, dx, dy, W, N, In, O, acc, E->st, EA));
}
static void wgrad(EngineCuda *E, float *dW, const void *dy, const void *x, int64_t N, int64_t In, int64_t O) {
    if (dW) TC(dl_linear_wgrad(E->gemm, E->dt, DT_F32, dW, dy, x, N, In, O, 1, E->st, EA));
}

// dy: d loss / d mixer output [N, d]; writes dxn (d loss / d mixer input) when need_dx.
static void mamba_bwd(EngineCuda *E, int l, LayerActs *a, const void *dy_mix, float *Gr, bool need_dx) {
    const HybridConfig *h = &E->h;
    const LayerW *w = &E->w[l];
    if (h->mixer[l] == MIXER_MAMBA2) {  // u = xn1 (the forward's mixer input)
        const Mamba2CudaW w2 = m2_weights(E, w);
        const Mamba2CudaG g2 = {G(Gr, w->m2in), G(Gr, w->cw),   G(Gr, w->cb),     G(Gr, w->dtb),
                                G(Gr, w->alog), G(Gr, w->D),    G(Gr, w->m2norm), G(Gr, w->out)};
        TC(mamba2_cuda_bwd(E->gemm, &E->m2shape, &w2, &g2, a->xn1, E->have_reset ? E->reset_d : NULL, dy_mix,
                           need_dx ? E->dxn : NULL, &a->m2, &E->m2s, E->st, EA));
        prof(E, "bwd mamba2");
        return;
    }
    const int64_t N = E->N, d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, ds = h->d_state, Rp = E->Rp;
    const int64_t R = h->dt_rank;
    const ScanShape s = scan_shape(E);
    const uint8_t *rs = E->have_reset ? E->reset_d : NULL;
    const size_t es = E->es;
    // out = y W_out^T
    dgrad(E, E->dy, dy_mix, P(E, w->out), N, di, d, 0);
    wgrad(E, G(Gr, w->out), dy_mix, a->y, N, di, d);
    prof(E, "bwd mamba out_proj");
    // recompute the scan inputs: dt, repeated x, conv output, A
    lin(E, E->mdt, a->dtl, at(E->wpad, w->pad_dtw, es), P(E, w->dtb), N, Rp, di, 0);
    eng_repeat_fwd(E->dt, E->xr, a->xs, N, di, dxb, ds, E->st);
    TC(conv1d_silu_fwd_cuda(E->B, E->T, di, h->d_conv, (const uint16_t *)E->xr, PM(E, w->cw), PM(E, w->cb), rs, NULL, 1,
                            (uint16_t *)E->xc, E->st, EA));
    eng_neg_exp(E->A, PM(E, w->alog), di * ds, E->st);
    prof(E, "bwd mamba recompute dt, conv");
    TC(selective_scan_bwd_cuda(&s, (const uint16_t *)E->xc, (const uint16_t *)E->mdt, E->A, (const uint16_t *)a->Bs,
                               (const uint16_t *)a->Cs, PM(E, w->D), (const uint16_t *)a->z, PM(E, w->dtb), rs, NULL, a->ckpt,
                               (const uint16_t *)E->dy, NULL, (uint16_t *)E->dxc, (uint16_t *)E->ddt, E->dA,
                               (uint16_t *)E->dB, (uint16_t *)E->dC, E->dD, (uint16_t *)E->dz, E->ddb, NULL, E->scanb_ws,
                               E->st, EA));
    prof(E, "bwd mamba scan");
    TC(conv1d_silu_bwd_cuda(E->B, E->T, di, h->d_conv, (const uint16_t *)E->xr, PM(E, w->cw), PM(E, w->cb), rs, NULL, 1,
                            (const uint16_t *)E->dxc, (uint16_t *)E->dxr, E->dcw, E->dcb, E->conv_ws, E->st, EA));
    eng_repeat_bwd(E->dt, E->dxs, E->dxr, N, di, dxb, ds, E->st);
    prof(E, "bwd mamba conv, repeat");
    dgrad(E, E->ddtl, E->ddt, at(E->wpad, w->pad_dtw, es), N, Rp, di, 0);  // [N, Rp]
    if (G(Gr, w->alog)) eng_add_mul(G(Gr, w->alog), E->dA, E->A, di * ds, E->st);  // A = -exp(A_log): dA/dA_log = A
    if (G(Gr, w->D)) eng_add_f32(G(Gr, w->D), E->dD, 1.0f, di, E->st);
    // dt_proj.bias enters twice: through dt_proj (its gradient: ddt summed over tokens) and as delta_bias (ddb). The
    // scan sees dt and delta_bias only as their sum, so ddb IS that token sum of ddt, taken in fp32 before ddt is
    // rounded to bf16: add it twice (the CPU engine's sum + ddb up to summation order; no [N, di] pass).
    if (G(Gr, w->dtb)) eng_add_f32(G(Gr, w->dtb), E->ddb, 2.0f, di, E->st);
    if (G(Gr, w->cw)) eng_add_f32(G(Gr, w->cw), E->dcw, 1.0f, di * h->d_conv, E->st);
    if (G(Gr, w->cb)) eng_add_f32(G(Gr, w->cb), E->dcb, 1.0f, di, E->st);
    if (G(Gr, w->dtw)) {  // through the padded [di, Rp] copy
        TC(dl_linear_wgrad(E->gemm, E->dt, DT_F32, E->gpad, E->ddt, a->dtl, N, Rp, di, 0, E->st, EA));
        eng_add_cols(G(Gr, w->dtw), R, E->gpad, Rp, di, E->st);
    }
    prof(E, "bwd mamba dt, param folds");
    // z|x|B|C gradients side by side in the [N, 2ff] MLP gradient buffer (free in the mixer's backward): one
    // weight-gradient GEMM and one input-gradient GEMM instead of four each
    const int64_t W4 = 2 * di + 2 * dxb;
    const bool cat_dx = need_dx && w->fused_in, cat_w = w->fused_in_grad && G(Gr, w->z);
    if (cat_dx || cat_w) {
        cols_copy(E, E->dz, di, E->dgu, W4, 0, 1);
        cols_copy(E, E->dxs, dxb, E->dgu, W4, di, 1);
        cols_copy(E, E->dB, dxb, E->dgu, W4, di + dxb, 1);
        cols_copy(E, E->dC, di, E->dgu, W4, di + 2 * dxb, 1);
    }
    if (cat_w) {
        wgrad(E, G(Gr, w->z), E->dgu, a->xn1, N, d, W4);
    } else {
        wgrad(E, G(Gr, w->z), E->dz, a->xn1, N, d, di);
        wgrad(E, G(Gr, w->x), E->dxs, a->xn1, N, d, dxb);
        wgrad(E, G(Gr, w->Bp), E->dB, a->xn1, N, d, dxb);
        wgrad(E, G(Gr, w->Cp), E->dC, a->xn1, N, d, di);
    }
    if (G(Gr, w->dtd)) {  // [Rp, d]; the padding rows are zero and dropped
        TC(dl_linear_wgrad(E->gemm, E->dt, DT_F32, E->gpad, E->ddtl, a->xn1, N, d, Rp, 0, E->st, EA));
        eng_add_f32(G(Gr, w->dtd), E->gpad, 1.0f, R * d, E->st);
    }
    prof(E, "bwd mamba in_proj wgrad");
    if (need_dx) {
        if (cat_dx) {
            dgrad(E, E->dxn, E->dgu, P(E, w->z), N, d, W4, 0);
        } else {
            dgrad(E, E->dxn, E->dz, P(E, w->z), N, d, di, 0);
            dgrad(E, E->dxn, E->dxs, P(E, w->x), N, d, dxb, 1);
            dgrad(E, E->dxn, E->dB, P(E, w->Bp), N, d, dxb, 1);
            dgrad(E, E->dxn, E->dC, P(E, w->Cp), N, d, di, 1);
        }
        dgrad(E, E->dxn, E->ddtl, at(E->wpad, w->pad_dtd, es), N, d, Rp, 1);
        prof(E, "bwd mamba in_proj dgrad");
    }
}

// dres: in, d loss / d (output of layer l); out, d loss / d (input of layer l) (when need_dx).
static void layer_bwd(EngineCuda *E, int l, float *Gr, bool need_dx) {
    const LlamaConfig *c = &E->h.base;
    const LayerW *w = &E->w[l];
    const int64_t N = E->N, d = c->d_model, ff = c->d_ff;
    const int64_t qd = (int64_t)c->n_head * c->head_dim, kvd = (int64_t)c->n_kv_head * c->head_dim;
    const size_t es = E->es;
    LayerActs *a = &E->acts[l];
    const void *x = state_ptr(E, l);
    void *gu = a->gu, *act = a->act;
    int64_t ld = w->fused_gu ? 2 * ff : ff;
    if (E->flags & ECU_RECOMPUTE_MLP) mlp_up(E, w, a->xn2, gu, act, &ld), prof(E, "bwd mlp recompute");
    void *gate = gu, *up = w->fused_gu ? at(gu, ff, es) : at(gu, N * ff, es);
    void *dgate = E->dgu, *dup = w->fused_gu ? at(E->dgu, ff, es) : at(E->dgu, N * ff, es);
    // MLP half: out = mid + down(act)
    dgrad(E, E->dact, E->dres, P(E, w->down), N, ff, d, 0);
    wgrad(E, G(Gr, w->down), E->dres, act, N, ff, d);
    TC(swiglu_bwd_cuda(E->dt, dgate, dup, E->dact, gate, up, N, ff, ld, E->st, EA));
    if (w->fused_gu) {
        dgrad(E, E->dxn, E->dgu, P(E, w->gate), N, d, 2 * ff, 0);
        wgrad(E, G(Gr, w->gate), E->dgu, a->xn2, N, d, 2 * ff);  // gate and up gradients are adjacent too
    } else {
        dgrad(E, E->dxn, dgate, P(E, w->gate), N, d, ff, 0);
        dgrad(E, E->dxn, dup, P(E, w->up), N, d, ff, 1);
        wgrad(E, G(Gr, w->gate), dgate, a->xn2, N, d, ff);
        wgrad(E, G(Gr, w->up), dup, a->xn2, N, d, ff);
    }
    prof(E, "bwd mlp");
    // dres becomes d loss / d mid in place: the norm's input gradient adds onto the residual's (din +=)
    TC(rmsnorm_bwd_cuda(E->dt, E->dres, G(Gr, w->post_norm), E->dxn, a->mid, P(E, w->post_norm), a->rstd2, N, d, E->rms_ws,
                        E->st, EA));
    prof(E, "bwd norms");
    // mixer half: mid = x + mixer(xn1)
    const bool mixer_dx = need_dx || G(Gr, w->in_norm);
    if (E->h.mixer[l] == MIXER_ATTN) {
        dgrad(E, E->datt, E->dres, P(E, w->o), N, qd, d, 0);
        wgrad(E, G(Gr, w->o), E->dres, a->att, N, qd, d);
        prof(E, "bwd attn o_proj");
        attn_bwd(E, a, l);
        prof(E, "bwd attn core");
        TC(rope_cuda(E->dt, E->dq, E->pos, E->inv_freq, N, c->n_head, c->head_dim, 1, E->st, EA));
        TC(rope_cuda(E->dt, E->dk, E->pos, E->inv_freq, N, c->n_kv_head, c->head_dim, 1, E->st, EA));
        wgrad(E, G(Gr, w->q), E->dq, a->xn1, N, d, qd);
        wgrad(E, G(Gr, w->k), E->dk, a->xn1, N, d, kvd);
        wgrad(E, G(Gr, w->v), E->dv, a->xn1, N, d, kvd);
        if (mixer_dx) {
            dgrad(E, E->dxn, E->dq, P(E, w->q), N, d, qd, 0);
            dgrad(E, E->dxn, E->dk, P(E, w->k), N, d, kvd, 1);
            dgrad(E, E->dxn, E->dv, P(E, w->v), N, d, kvd, 1);
        }
        prof(E, "bwd attn rope, qkv");
    } else {
        mamba_bwd(E, l, a, E->dres, Gr, mixer_dx);
    }
    if (mixer_dx) {
        // and d loss / d (layer input) in place (the mixer's consumers of d mid ran before)
        TC(rmsnorm_bwd_cuda(E->dt, E->dres, G(Gr, w->in_norm), E->dxn, x, P(E, w->in_norm), a->rstd1, N, d, E->rms_ws,
                            E->st, EA));
        prof(E, "bwd norms");
    }
}

// DISTILL_BWD_TRACE=1 (diagnostic): the backward snapshots the activation table when it starts; after each layer's
// backward it prints the layer, its mixer and |d residual|, and names every saved entry of a lower layer (and every
// hidden state 0..l) whose bytes changed since the snapshot: what the rest of the backward will read must not change.
typedef struct {
    char *snap;  // host copy of the arena at the start of the backward
    char *cur;   // host scratch
} BwdTrace;
static bool bwd_trace_on(void) {
    const char *v = getenv("DISTILL_BWD_TRACE");
    return v && *v == '1';
}
static void bwd_trace_start(EngineCuda *E, BwdTrace *t) {
    t->snap = (char *)malloc(E->tab.total), t->cur = (char *)malloc(E->tab.total);
    if (!t->snap || !t->cur) dl_die(DL_EXIT_RUNTIME, "DISTILL_BWD_TRACE: no host memory for %zu bytes", E->tab.total);
    cudaCheck(cudaStreamSynchronize(E->st));
    cudaCheck(cudaMemcpy(t->snap, E->arena, E->tab.total, cudaMemcpyDeviceToHost));
}
static void bwd_trace_changed(const BwdTrace *t, const char *name, int layer, size_t off, size_t bytes, int after) {
    size_t lo = bytes, hi = 0, n = 0;
    for (size_t i = 0; i < bytes; i++)
        if (t->snap[off + i] != t->cur[off + i]) lo = i < lo ? i : lo, hi = i, n++;
    if (n)
        fprintf(stderr, "bwd trace: after layer %d's backward, saved '%s' of layer %d changed: %zu of %zu bytes, +%zu..+%zu\n",
                after, name, layer, n, bytes, lo, hi);
}
static void bwd_trace_layer(EngineCuda *E, BwdTrace *t, int l) {
    const LlamaConfig *c = &E->h.base;
    cudaCheck(cudaStreamSynchronize(E->st));
    cudaCheck(cudaMemcpy(t->cur, E->arena, E->tab.total, cudaMemcpyDeviceToHost));
    const int64_t nd = E->N * c->d_model;
    double s2 = 0;
    const size_t dro = (size_t)((char *)E->dres - E->arena);
    for (int64_t i = 0; i < nd; i++) {
        const double v = E->es == 4 ? ((float *)(t->cur + dro))[i] : bf16_to_f32(((uint16_t *)(t->cur + dro))[i]);
        s2 += v * v;
    }
    fprintf(stderr, "bwd trace: layer %d (%s) |d residual| %.6g\n", l, E->h.mixer[l] == MIXER_ATTN ? "attention" : "mamba",
            sqrt(s2));
    for (int i = 0; i < E->tab.n; i++) {
        const ActEntry *a = &E->tab.e[i];
        if (a->layer >= 0 && a->layer < l) bwd_trace_changed(t, a->name, a->layer, a->off, a->bytes, l);
        if (a->slot == (void **)&E->states && E->n_states == c->n_layer + 1) {
            const size_t sb = (size_t)nd * E->es;
            for (int s = 0; s <= l; s++) {
                char nm[40];
                snprintf(nm, sizeof nm, "hidden state %d", s);
                bwd_trace_changed(t, nm, s, a->off + (size_t)s * sb, sb, l);
            }
        }
    }
}

void engine_cuda_backward(EngineCuda *E, float *Gr) {
    const LlamaConfig *c = &E->h.base;
    const int64_t N = E->N, d = c->d_model;
    if (!(E->flags & ECU_TRAIN)) dl_die(DL_EXIT_RUNTIME, "engine_cuda_backward on an engine made without ECU_TRAIN");
    int top = -1;
    if (E->have_dxf) top = E->l1 - 1;
    for (int i = E->l1; i > E->l0 && E->has_dhid; i--)
        if (E->has_dhid[i] && i - 1 > top) top = i - 1;
    prof_start(E);
    cudaCheck(cudaMemsetAsync(E->dres, 0, (size_t)(N * d) * E->es, E->st));
    if (E->have_dxf)
        TC(rmsnorm_bwd_cuda(E->dt, E->dres, G(Gr, E->fnorm), E->dxf, state_ptr(E, E->l1), P(E, E->fnorm), E->rstdf, N, d,
                            E->rms_ws, E->st, EA));
    prof(E, "bwd norms");
    if (E->grad_hook) E->grad_hook(E->grad_hook_ctx, top + 1);  // head, final norm, layers above top: final
    const int stop = DL_MAX(E->l0, E->lowest);
    const bool emb_grad = E->l0 == 0 && E->emb.goff >= 0 && E->lowest < 0;
    BwdTrace tr = {NULL, NULL};
    if (bwd_trace_on()) bwd_trace_start(E, &tr);
    for (int l = top; l >= stop; l--) {
        if (E->has_dhid && E->has_dhid[l + 1]) eng_axpy(E->dt, E->dres, E->dhid[l + 1], 1.0f, N * d, E->st);
        // the input gradient of the lowest layer is needed only for the embedding
        layer_bwd(E, l, Gr, l > stop || emb_grad);
        if (E->grad_hook) E->grad_hook(E->grad_hook_ctx, l);
        if (tr.snap) bwd_trace_layer(E, &tr, l);
    }
    free(tr.snap), free(tr.cur);
    if (emb_grad) {
        if (E->has_dhid && E->has_dhid[0]) eng_axpy(E->dt, E->dres, E->dhid[0], 1.0f, N * d, E->st);
        int32_t *plan = (int32_t *)malloc((size_t)(3 * N + 1) * 4);
        int32_t *order = plan, *seg = plan + N, *uniq = plan + 2 * N + 1;
        int64_t U = embedding_bwd_plan(E->tok_h, N, c->vocab, order, seg, uniq, EA);
        if (U < 0) dl_die(DL_EXIT_RUNTIME, "engine_cuda: embedding_bwd_plan: %s", g_err);
        cudaCheck(cudaMemcpyAsync(E->eorder, order, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
        cudaCheck(cudaMemcpyAsync(E->eseg, seg, (size_t)(N + 1) * 4, cudaMemcpyHostToDevice, E->st));
        cudaCheck(cudaMemcpyAsync(E->euniq, uniq, (size_t)N * 4, cudaMemcpyHostToDevice, E->st));
        TC(embedding_bwd_cuda(E->dt, G(Gr, E->emb), E->dres, E->eorder, E->eseg, E->euniq, U, d, E->st, EA));
        cudaCheck(cudaStreamSynchronize(E->st));
        free(plan);
    }
    if (E->grad_hook) E->grad_hook(E->grad_hook_ctx, -1);
    E->have_dxf = false;
    if (E->has_dhid) memset(E->has_dhid, 0, (size_t)(c->n_layer + 1) * sizeof(bool));
}

void engine_cuda_set_grad_hook(EngineCuda *E, EngineCudaGradHook fn, void *ctx) {
    E->grad_hook = fn;
    E->grad_hook_ctx = ctx;
}

// ---------------------------------------------------------------- helpers for C programs

void *engine_cuda_alloc(size_t bytes) {
    void *p = NULL;
    cudaCheck(cudaMalloc(&p, DL_MAX(bytes, (size_t)16)));
    cudaCheck(cudaMemset(p, 0, DL_MAX(bytes, (size_t)16)));
    cudaCheck(cudaDeviceSynchronize());
    return p;
}
void engine_cuda_dfree(void *p) { cudaFree(p); }
void engine_cuda_memset0(void *p, size_t bytes) {
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemset(p, 0, bytes));
    cudaCheck(cudaDeviceSynchronize());
}

void engine_cuda_zero_trainable(EngineCuda *E, float *grads) {
    if (E->grad_n) cudaCheck(cudaMemsetAsync(grads, 0, (size_t)E->grad_n * 4, E->st));  // the whole compact buffer
}
void engine_cuda_copy_to_host(void *dst, const void *src, size_t bytes) {
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
void *engine_cuda_stream(EngineCuda *E) { return (void *)E->st; }
void engine_cuda_sync(void) { cudaCheck(cudaDeviceSynchronize()); }
