// export_gguf.c: see export_gguf.h.
#include "distill/export_gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/export_granite.h"
#include "distill/gguf.h"
#include "distill/model_io.h"

#define ARCH "granitehybrid"

// fp32 buffers the writer converts at write time: they must live until gguf_writer_write.
typedef struct {
    float **b;
    int n, cap;
} Owned;

static float *own(Owned *o, float *p) {
    if (o->n == o->cap) {
        o->cap = o->cap ? 2 * o->cap : 64;
        o->b = realloc(o->b, (size_t)o->cap * sizeof *o->b);
        if (!o->b) dl_die(DL_EXIT_RUNTIME, "out of memory");
    }
    return o->b[o->n++] = p;
}

static const float *get(const Registry *r, const float *params, int64_t numel, DlError *e, const char *fmt, int layer) {
    char nm[DL_TENSOR_NAME_MAX];
    snprintf(nm, sizeof nm, fmt, layer);
    int i = reg_find(r, nm);
    if (i < 0) {
        dl_fail(e, "export: tensor %s missing from the model", nm);
        return NULL;
    }
    if (r->t[i].numel != numel) {
        dl_fail(e, "export: tensor %s has %lld elements, expected %lld", nm, (long long)r->t[i].numel, (long long)numel);
        return NULL;
    }
    return params + r->t[i].offset;
}

// A matrix [rows, cols] in the requested type, or F16 when a row is not a whole number of blocks.
static int put_matrix(GgufWriter *w, const char *name, DType t, int64_t rows, int64_t cols, const float *x, DlError *e) {
    const int64_t shape[2] = {rows, cols};
    DType tt = t;
    if ((t == DT_Q8_0 || t == DT_Q4_0 || t == DT_Q4_1) && cols % 32) tt = DT_F16;
    return gguf_w_tensor_f32(w, name, tt, 2, shape, x, e);
}

static int put_f32(GgufWriter *w, const char *name, int ndim, const int64_t *shape, const float *x, DlError *e) {
    return gguf_w_tensor_f32(w, name, DT_F32, ndim, shape, x, e);
}

static int copy_tokenizer(GgufWriter *w, const char *path, int vocab, DlError *e) {
    GgufFile *g;
    if (gguf_open(&g, path, e)) return -1;
    int rc = 0;
    uint64_t n_tok = 0;
    if (gguf_find_arr(g, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, &n_tok, e) < 0) rc = -1;
    else if (n_tok != (uint64_t)vocab)
        rc = dl_fail(e, "%s: tokenizer.ggml.tokens has %llu tokens, the model's vocab_size is %d", path,
                     (unsigned long long)n_tok, vocab);
    for (int kv = 0; !rc && kv < gguf_kv_count(g); kv++) {
        const char *k = gguf_kv_key(g, kv);
        if (strncmp(k, "tokenizer.", 10)) continue;
        if (gguf_w_value(w, k, gguf_kv_value(g, kv), e)) rc = dl_fail_prefix(e, "%s: copying %s: ", path, k);
    }
    gguf_close(g);
    return rc;
}

int export_gguf(const char *path, const HybridConfig *h, const Registry *r, const float *params,
                const GgufExportOptions *o, DlError *e) {
    const LlamaConfig *c = &h->base;
    const DType mt = o->dtype;
    if (mt != DT_F16 && mt != DT_Q8_0 && mt != DT_F32 && mt != DT_BF16)
        return dl_fail(e, "export: GGUF dtype %s not supported (f16, q8_0, f32, bf16)", dtype_name(mt));
    if (granite_check(h, e)) return -1;
    if (c->rope_factor > 0)
        return dl_fail(e, "export: Llama-3.1 rope scaling (rope_type llama3) is not written to granitehybrid GGUFs yet "
                          "(llama.cpp needs a rope_freqs tensor); use --format granite");
    int H_out = 0, expand = 0;
    if (mamba2_std_heads(h, o->expand ? o->expand : 2, &H_out, &expand, e)) return -1;
    const int64_t d = c->d_model, hd = c->head_dim, ff = c->d_ff, V = c->vocab;
    const int64_t qd = (int64_t)c->n_head * hd, kvd = (int64_t)c->n_kv_head * hd;

    GgufWriter *w = gguf_writer_new();
    Owned own_bufs = {0};
    int rc = -1;
    int32_t *kv_heads = dl_calloc((size_t)c->n_layer, sizeof(int32_t));
    for (int l = 0; l < c->n_layer; l++) kv_heads[l] = h->mixer[l] == MIXER_ATTN ? c->n_kv_head : 0;
    const uint32_t file_type = mt == DT_Q8_0 ? 7 : mt == DT_F16 ? 1 : mt == DT_BF16 ? 32 : 0;
    if (gguf_w_str(w, "general.architecture", ARCH, e) || gguf_w_str(w, "general.name", o->name ? o->name : "distill hybrid", e) ||
        gguf_w_u32(w, "general.file_type", file_type, e) || gguf_w_u32(w, "general.quantization_version", 2, e) ||
        gguf_w_u32(w, ARCH ".block_count", (uint32_t)c->n_layer, e) ||
        gguf_w_u32(w, ARCH ".context_length", (uint32_t)c->max_pos, e) ||
        gguf_w_u32(w, ARCH ".embedding_length", (uint32_t)d, e) ||
        gguf_w_u32(w, ARCH ".feed_forward_length", (uint32_t)ff, e) ||
        gguf_w_u32(w, ARCH ".vocab_size", (uint32_t)V, e) ||
        gguf_w_u32(w, ARCH ".attention.head_count", (uint32_t)c->n_head, e) ||
        gguf_w_arr(w, ARCH ".attention.head_count_kv", GGUF_TYPE_INT32, (uint64_t)c->n_layer, kv_heads, e) ||
        gguf_w_u32(w, ARCH ".attention.key_length", (uint32_t)hd, e) ||
        gguf_w_u32(w, ARCH ".attention.value_length", (uint32_t)hd, e) ||
        gguf_w_f32(w, ARCH ".attention.layer_norm_rms_epsilon", (float)c->rms_eps, e) ||
        gguf_w_f32(w, ARCH ".attention.scale", (float)(1.0 / sqrt((double)hd)), e) ||
        gguf_w_u32(w, ARCH ".rope.dimension_count", (uint32_t)hd, e) ||
        gguf_w_f32(w, ARCH ".rope.freq_base", (float)c->rope_theta, e) ||
        gguf_w_bool(w, ARCH ".rope.scaling.finetuned", true, e) ||
        gguf_w_u32(w, ARCH ".ssm.conv_kernel", (uint32_t)h->d_conv, e) ||
        gguf_w_u32(w, ARCH ".ssm.inner_size", (uint32_t)(H_out * hd), e) ||
        gguf_w_u32(w, ARCH ".ssm.state_size", (uint32_t)hd, e) ||
        gguf_w_u32(w, ARCH ".ssm.time_step_rank", (uint32_t)H_out, e) ||
        gguf_w_u32(w, ARCH ".ssm.group_count", (uint32_t)H_out, e) ||
        gguf_w_f32(w, ARCH ".logit_scale", 1.0f, e) || gguf_w_f32(w, ARCH ".residual_scale", 1.0f, e) ||
        gguf_w_f32(w, ARCH ".embedding_scale", 1.0f, e))
        goto out;
    if (c->bos_id >= 0 && !o->tokenizer_gguf && gguf_w_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)c->bos_id, e)) goto out;
    if (c->eos_id >= 0 && !o->tokenizer_gguf && gguf_w_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)c->eos_id, e)) goto out;
    if (o->tokenizer_gguf && copy_tokenizer(w, o->tokenizer_gguf, c->vocab, e)) goto out;

    const float *emb = get(r, params, V * d, e, "model.embed_tokens.weight", 0);
    const float *fnorm = emb ? get(r, params, d, e, "model.norm.weight", 0) : NULL;
    if (!fnorm) goto out;
    const int64_t sh_d[1] = {d};
    if (put_matrix(w, "token_embd.weight", mt, V, d, emb, e) || put_f32(w, "output_norm.weight", 1, sh_d, fnorm, e)) goto out;
    if (!c->tied_embeddings) {
        const float *head = get(r, params, V * d, e, "lm_head.weight", 0);
        if (!head || put_matrix(w, "output.weight", mt, V, d, head, e)) goto out;
    }
    char nm[GGUF_MAX_NAME + 1];
    for (int L = 0; L < c->n_layer; L++) {
        const float *in_norm = get(r, params, d, e, "model.layers.%d.input_layernorm.weight", L);
        const float *post_norm = in_norm ? get(r, params, d, e, "model.layers.%d.post_attention_layernorm.weight", L) : NULL;
        const float *gate = post_norm ? get(r, params, ff * d, e, "model.layers.%d.mlp.gate_proj.weight", L) : NULL;
        const float *up = gate ? get(r, params, ff * d, e, "model.layers.%d.mlp.up_proj.weight", L) : NULL;
        const float *down = up ? get(r, params, d * ff, e, "model.layers.%d.mlp.down_proj.weight", L) : NULL;
        if (!down) goto out;
#define NAME(s) (snprintf(nm, sizeof nm, "blk.%d." s, L), nm)
        if (put_f32(w, NAME("attn_norm.weight"), 1, sh_d, in_norm, e) || put_f32(w, NAME("ffn_norm.weight"), 1, sh_d, post_norm, e) ||
            put_matrix(w, NAME("ffn_gate.weight"), mt, ff, d, gate, e) || put_matrix(w, NAME("ffn_up.weight"), mt, ff, d, up, e) ||
            put_matrix(w, NAME("ffn_down.weight"), mt, d, ff, down, e))
            goto out;
        if (h->mixer[L] == MIXER_ATTN) {
            const float *q = get(r, params, qd * d, e, "model.layers.%d.self_attn.q_proj.weight", L);
            const float *k = q ? get(r, params, kvd * d, e, "model.layers.%d.self_attn.k_proj.weight", L) : NULL;
            const float *v = k ? get(r, params, kvd * d, e, "model.layers.%d.self_attn.v_proj.weight", L) : NULL;
            const float *ow = v ? get(r, params, d * qd, e, "model.layers.%d.self_attn.o_proj.weight", L) : NULL;
            if (!ow) goto out;
            // llama.cpp's NORM rope: HF row h*d + t*d/2 + j goes to GGUF row h*d + 2j + t (export.md §2.3)
            float *qp = own(&own_bufs, dl_malloc((size_t)(qd * d) * sizeof(float)));
            float *kp = own(&own_bufs, dl_malloc((size_t)(kvd * d) * sizeof(float)));
            rope_permute_rows(q, qp, c->n_head, c->head_dim, d * (int64_t)sizeof(float));
            rope_permute_rows(k, kp, c->n_kv_head, c->head_dim, d * (int64_t)sizeof(float));
            if (put_matrix(w, NAME("attn_q.weight"), mt, qd, d, qp, e) || put_matrix(w, NAME("attn_k.weight"), mt, kvd, d, kp, e) ||
                put_matrix(w, NAME("attn_v.weight"), mt, kvd, d, v, e) || put_matrix(w, NAME("attn_output.weight"), mt, d, qd, ow, e))
                goto out;
        } else {
            Mamba2Std s;
            if (mamba2_to_standard(h, r, params, L, H_out, &s, e)) goto out;
            own(&own_bufs, s.in_proj), own(&own_bufs, s.conv_w), own(&own_bufs, s.conv_b), own(&own_bufs, s.dt_bias);
            own(&own_bufs, s.D), own(&own_bufs, s.norm_w), own(&own_bufs, s.out_proj);
            float *A = own(&own_bufs, s.A_log);
            for (int64_t i = 0; i < s.H; i++) A[i] = -expf(A[i]);  // ssm_a stores A = -exp(A_log)
            const int64_t sh_conv[2] = {s.conv_dim, s.d_conv}, sh_c[1] = {s.conv_dim}, sh_h[1] = {s.H};
            const int64_t sh_h1[2] = {s.H, 1}, sh_norm[2] = {s.H, s.P};
            if (put_matrix(w, NAME("ssm_in.weight"), mt, s.n_in, d, s.in_proj, e) ||
                put_f32(w, NAME("ssm_conv1d.weight"), 2, sh_conv, s.conv_w, e) ||
                put_f32(w, NAME("ssm_conv1d.bias"), 1, sh_c, s.conv_b, e) ||
                put_f32(w, NAME("ssm_dt.bias"), 1, sh_h, s.dt_bias, e) || put_f32(w, NAME("ssm_a"), 2, sh_h1, A, e) ||
                put_f32(w, NAME("ssm_d"), 2, sh_h1, s.D, e) || put_f32(w, NAME("ssm_norm.weight"), 2, sh_norm, s.norm_w, e) ||
                put_matrix(w, NAME("ssm_out.weight"), mt, d, s.d_inner, s.out_proj, e))
                goto out;
        }
#undef NAME
    }
    if (gguf_writer_write(w, path, e)) goto out;
    rc = 0;
out:
    gguf_writer_free(w);
    for (int i = 0; i < own_bufs.n; i++) free(own_bufs.b[i]);
    free(own_bufs.b);
    free(kv_heads);
    return rc;
}
