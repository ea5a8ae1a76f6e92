// export_granite.c: see export_granite.h.
#include "distill/export_granite.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/export.h"  // ExportDir
#include "distill/safetensors.h"

int mamba2_std_heads(const HybridConfig *h, int expand, int *heads, int *expand_out, DlError *e) {
    const LlamaConfig *c = &h->base;
    const int64_t P = c->head_dim, need = (int64_t)c->n_head * P;
    if (expand < 0) return dl_fail(e, "export: mamba_expand %d must be >= 0", expand);
    int ex = expand;
    if (ex == 0) {  // smallest integer expand whose d_inner holds every head and is a whole number of heads
        for (ex = 1; ex <= 64; ex++)
            if ((int64_t)ex * c->d_model >= need && ((int64_t)ex * c->d_model) % P == 0) break;
        if (ex > 64) return dl_fail(e, "export: no mamba_expand <= 64 gives a d_inner that is a multiple of head_dim %lld", (long long)P);
    }
    const int64_t di = (int64_t)ex * c->d_model;
    if (di % P)
        return dl_fail(e, "export: d_inner = mamba_expand %d * hidden_size %d = %lld is not a multiple of head_dim %lld", ex,
                       c->d_model, (long long)di, (long long)P);
    if (di < need)
        return dl_fail(e, "export: d_inner = mamba_expand %d * hidden_size %d = %lld is smaller than heads %d * head_dim %lld", ex,
                       c->d_model, (long long)di, c->n_head, (long long)P);
    *heads = (int)(di / P);
    if (expand_out) *expand_out = ex;
    return 0;
}

static const float *tensor(const Registry *r, const float *params, const char *name, int64_t numel, DlError *e) {
    int i = reg_find(r, name);
    if (i < 0) {
        dl_fail(e, "export: tensor %s missing from the model", name);
        return NULL;
    }
    if (r->t[i].numel != numel) {
        dl_fail(e, "export: tensor %s has %lld elements, expected %lld", name, (long long)r->t[i].numel, (long long)numel);
        return NULL;
    }
    return params + r->t[i].offset;
}

void mamba2_std_free(Mamba2Std *s) {
    free(s->in_proj), free(s->conv_w), free(s->conv_b), free(s->dt_bias), free(s->A_log), free(s->D);
    free(s->norm_w), free(s->out_proj);
    memset(s, 0, sizeof *s);
}

int mamba2_to_standard(const HybridConfig *h, const Registry *r, const float *params, int layer, int H_out,
                       Mamba2Std *s, DlError *e) {
    const LlamaConfig *c = &h->base;
    memset(s, 0, sizeof *s);
    if (layer < 0 || layer >= c->n_layer || h->mixer[layer] != MIXER_MAMBA2)
        return dl_fail(e, "export: layer %d is not a Mamba-2 layer", layer);
    const int64_t d = c->d_model, H = c->n_head, P = c->head_dim, N = h->d_state, W = h->d_conv;
    const int64_t di = H * P, dxb = (int64_t)c->n_kv_head * P, xbc = 2 * dxb + di, rep = H / c->n_kv_head;
    if (N != P) return dl_fail(e, "export: layer %d: d_state %lld != head_dim %lld (MambaInLlama Mamba-2 has d_state = head_dim)", layer, (long long)N, (long long)P);
    if (H_out < H) return dl_fail(e, "export: %d heads requested, the model has %lld", H_out, (long long)H);
    char nm[DL_TENSOR_NAME_MAX];
#define GET(var, suffix, n)                                                      \
    snprintf(nm, sizeof nm, "model.layers.%d.mamba." suffix, layer);             \
    const float *var = tensor(r, params, nm, (n), e);                            \
    if (!var) return -1;
    GET(w_in, "in_proj.weight", (di + xbc + H) * d);
    GET(w_conv, "conv1d.weight", xbc * W);
    GET(b_conv, "conv1d.bias", xbc);
    GET(dt_bias, "dt_bias", H);
    GET(A_log, "A_log", H);
    GET(Dv, "D", H);
    GET(norm_w, "norm.weight", di);
    GET(w_out, "out_proj.weight", d * di);
#undef GET
    const int64_t Ho = H_out, dio = Ho * P, Ns = Ho * N;
    s->H = Ho, s->P = P, s->N = N, s->d_model = d, s->d_conv = W, s->d_inner = dio;
    s->conv_dim = dio + 2 * Ns;
    s->n_in = 2 * dio + 2 * Ns + Ho;
    s->in_proj = dl_calloc((size_t)(s->n_in * d), sizeof(float));
    s->conv_w = dl_calloc((size_t)(s->conv_dim * W), sizeof(float));
    s->conv_b = dl_calloc((size_t)s->conv_dim, sizeof(float));
    s->dt_bias = dl_calloc((size_t)Ho, sizeof(float));
    s->A_log = dl_calloc((size_t)Ho, sizeof(float));
    s->D = dl_calloc((size_t)Ho, sizeof(float));
    s->norm_w = dl_calloc((size_t)dio, sizeof(float));
    s->out_proj = dl_calloc((size_t)(d * dio), sizeof(float));
    // Source rows of the compact xBC block (in_proj rows di.., conv channels 0..) for standard channel ch of
    // a real head hd and offset j: x -> KV head hd/rep, B -> KV head hd/rep, C -> head hd.
    // copy(dst_row_std, src_row_compact) for in_proj (offset di in both: z comes first) and the conv.
#define COPY_CH(std_ch, src_ch)                                                                               \
    do {                                                                                                      \
        memcpy(s->in_proj + (dio + (std_ch)) * d, w_in + (di + (src_ch)) * d, (size_t)d * sizeof(float));     \
        memcpy(s->conv_w + (std_ch) * W, w_conv + (src_ch) * W, (size_t)W * sizeof(float));                   \
        s->conv_b[std_ch] = b_conv[src_ch];                                                                   \
    } while (0)
    for (int64_t hd = 0; hd < H; hd++) {
        const int64_t kv = hd / rep;
        for (int64_t j = 0; j < P; j++) {
            // z rows: standard z of head hd = compact z of head hd
            memcpy(s->in_proj + (hd * P + j) * d, w_in + (hd * P + j) * d, (size_t)d * sizeof(float));
            COPY_CH(hd * P + j, kv * P + j);                   // x
            COPY_CH(dio + hd * N + j, dxb + kv * N + j);       // B
            COPY_CH(dio + Ns + hd * N + j, 2 * dxb + hd * N + j);  // C
            s->norm_w[hd * P + j] = norm_w[hd * P + j];
        }
        // dt row of head hd
        memcpy(s->in_proj + (2 * dio + 2 * Ns + hd) * d, w_in + (di + xbc + hd) * d, (size_t)d * sizeof(float));
        s->dt_bias[hd] = dt_bias[hd];
        s->A_log[hd] = A_log[hd];
        s->D[hd] = Dv[hd];
    }
#undef COPY_CH
    // padded heads: all-zero projections, conv and output columns; norm weight 1 (any value is exact)
    for (int64_t k = di; k < dio; k++) s->norm_w[k] = 1.0f;
    for (int64_t o = 0; o < d; o++) memcpy(s->out_proj + o * dio, w_out + o * di, (size_t)di * sizeof(float));
    return 0;
}

int granite_check(const HybridConfig *h, DlError *e) {
    const LlamaConfig *c = &h->base;
    bool attn = false;
    for (int l = 0; l < c->n_layer; l++) {
        if (h->mixer[l] == MIXER_MAMBA1)
            return dl_fail(e, "export: layer %d is a Mamba-1 layer; no engine implements MambaInLlama's Mamba-1 "
                              "(use --format mambainllama with the HF modeling code, docs/EXPORTS.md)", l);
        if (h->mixer[l] == MIXER_ATTN) attn = true;
    }
    if (attn && (int64_t)c->head_dim * c->n_head != c->d_model)
        return dl_fail(e, "export: attention head_dim %d != hidden_size %d / heads %d; GraniteMoeHybrid engines derive "
                          "head_dim as hidden_size / heads", c->head_dim, c->d_model, c->n_head);
    return 0;
}

char *export_granite_config_json(const HybridConfig *h, int H_out, int expand, DType dtype, const char *name_or_path) {
    const LlamaConfig *c = &h->base;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "_name_or_path", name_or_path ? name_or_path : "distill");
    cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "architectures"), cJSON_CreateString("GraniteMoeHybridForCausalLM"));
    cJSON_AddStringToObject(o, "model_type", "granitemoehybrid");
    cJSON_AddBoolToObject(o, "attention_bias", false);
    cJSON_AddNumberToObject(o, "attention_dropout", 0.0);
    // Granite's softmax scale; Llama's is 1/sqrt(head_dim)
    cJSON_AddNumberToObject(o, "attention_multiplier", 1.0 / sqrt((double)c->head_dim));
    if (c->bos_id >= 0) cJSON_AddNumberToObject(o, "bos_token_id", c->bos_id);
    if (c->eos_id >= 0) cJSON_AddNumberToObject(o, "eos_token_id", c->eos_id);
    cJSON_AddNumberToObject(o, "embedding_multiplier", 1.0);
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    cJSON_AddNumberToObject(o, "hidden_size", c->d_model);
    cJSON_AddNumberToObject(o, "initializer_range", 0.02);
    cJSON_AddNumberToObject(o, "intermediate_size", c->d_ff);
    cJSON *lt = cJSON_AddArrayToObject(o, "layer_types");
    for (int l = 0; l < c->n_layer; l++)
        cJSON_AddItemToArray(lt, cJSON_CreateString(h->mixer[l] == MIXER_ATTN ? "attention" : "mamba"));
    cJSON_AddNumberToObject(o, "logits_scaling", 1.0);
    cJSON_AddBoolToObject(o, "mamba_conv_bias", true);
    cJSON_AddNumberToObject(o, "mamba_chunk_size", 256);
    cJSON_AddNumberToObject(o, "mamba_d_conv", h->d_conv);
    cJSON_AddNumberToObject(o, "mamba_d_head", c->head_dim);
    cJSON_AddNumberToObject(o, "mamba_d_state", c->head_dim);
    cJSON_AddNumberToObject(o, "mamba_expand", expand);
    cJSON_AddNumberToObject(o, "mamba_n_groups", H_out);
    cJSON_AddNumberToObject(o, "mamba_n_heads", H_out);
    cJSON_AddBoolToObject(o, "mamba_proj_bias", false);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->max_pos);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->n_head);
    cJSON_AddNumberToObject(o, "num_experts_per_tok", 0);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->n_layer);
    cJSON_AddNumberToObject(o, "num_key_value_heads", c->n_kv_head);
    cJSON_AddNumberToObject(o, "num_local_experts", 0);
    cJSON_AddStringToObject(o, "position_embedding_type", "rope");
    cJSON_AddNumberToObject(o, "residual_multiplier", 1.0);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->rms_eps);
    // rope: the legacy keys (vLLM, SGLang, older transformers) and rope_parameters (transformers >= 5)
    cJSON *rp = cJSON_AddObjectToObject(o, "rope_parameters");
    cJSON_AddNumberToObject(rp, "rope_theta", c->rope_theta);
    if (c->rope_factor > 0) {
        cJSON_AddStringToObject(rp, "rope_type", "llama3");
        cJSON_AddNumberToObject(rp, "factor", c->rope_factor);
        cJSON_AddNumberToObject(rp, "high_freq_factor", c->rope_high_freq_factor);
        cJSON_AddNumberToObject(rp, "low_freq_factor", c->rope_low_freq_factor);
        cJSON_AddNumberToObject(rp, "original_max_position_embeddings", c->rope_orig_max_pos);
        cJSON_AddItemToObject(o, "rope_scaling", cJSON_Duplicate(rp, true));
    } else {
        cJSON_AddStringToObject(rp, "rope_type", "default");
        cJSON_AddNullToObject(o, "rope_scaling");
    }
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddNumberToObject(o, "shared_intermediate_size", c->d_ff);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", false);  // lm_head written explicitly
    // time_step_limit is left at its default (0, inf): JSON has no infinity
    cJSON_AddStringToObject(o, "torch_dtype", dtype == DT_BF16 ? "bfloat16" : dtype == DT_F16 ? "float16" : "float32");
    cJSON_AddBoolToObject(o, "use_cache", true);
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab);
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

// A growing list of tensors to write; every buffer is owned (freed at the end).
typedef struct {
    StWriteTensor *t;
    char **names;
    int64_t (*shapes)[4];
    void **bufs;
    int n, cap;
    DType dtype;
} TList;

static void tl_add(TList *l, const char *name, int ndim, const int64_t *shape, const float *src) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = realloc(l->t, (size_t)l->cap * sizeof *l->t);
        l->names = realloc(l->names, (size_t)l->cap * sizeof *l->names);
        l->shapes = realloc(l->shapes, (size_t)l->cap * sizeof *l->shapes);
        l->bufs = realloc(l->bufs, (size_t)l->cap * sizeof *l->bufs);
        if (!l->t || !l->names || !l->shapes || !l->bufs) dl_die(DL_EXIT_RUNTIME, "out of memory");
    }
    int64_t n = 1;
    for (int k = 0; k < ndim; k++) n *= shape[k], l->shapes[l->n][k] = shape[k];
    void *b;
    if (l->dtype == DT_F32) {
        b = dl_malloc((size_t)n * sizeof(float));
        memcpy(b, src, (size_t)n * sizeof(float));
    } else {
        uint16_t *u = dl_malloc((size_t)n * 2);
        for (int64_t k = 0; k < n; k++) u[k] = l->dtype == DT_BF16 ? f32_to_bf16(src[k]) : f32_to_f16(src[k]);
        b = u;
    }
    l->names[l->n] = strdup(name);
    l->bufs[l->n] = b;
    l->t[l->n] = (StWriteTensor){l->names[l->n], l->dtype, ndim, NULL, b};  // shape pointer set before writing
    l->n++;
}

static void tl_free(TList *l) {
    for (int i = 0; i < l->n; i++) free(l->names[i]), free(l->bufs[i]);
    free(l->t), free(l->names), free(l->shapes), free(l->bufs);
}

// Copies registry tensor `name` under out_name (its registry shape).
static int tl_copy(TList *l, const Registry *r, const float *params, const char *name, const char *out_name, DlError *e) {
    int i = reg_find(r, name);
    if (i < 0) return dl_fail(e, "export: tensor %s missing from the model", name);
    tl_add(l, out_name ? out_name : name, r->t[i].ndim, r->t[i].shape, params + r->t[i].offset);
    return 0;
}

int export_granite(const char *dir, const HybridConfig *h, const Registry *r, const float *params,
                   const GraniteOptions *o, DlError *e) {
    const LlamaConfig *c = &h->base;
    if (o->dtype != DT_F32 && o->dtype != DT_BF16 && o->dtype != DT_F16)
        return dl_fail(e, "export: dtype %s not supported (f32, bf16 or f16)", dtype_name(o->dtype));
    if (granite_check(h, e)) return -1;
    int H_out = c->n_head, expand = 1;
    if (mamba2_std_heads(h, o->expand, &H_out, &expand, e)) return -1;

    TList l = {.dtype = o->dtype};
    int rc = -1;
    char *cfg = NULL;
    ExportDir d;
    if (export_dir_begin(&d, dir, e)) goto out;

    char nm[DL_TENSOR_NAME_MAX], on[DL_TENSOR_NAME_MAX];
    if (tl_copy(&l, r, params, "model.embed_tokens.weight", NULL, e)) goto out;
    for (int L = 0; L < c->n_layer; L++) {
        snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", L);
        if (tl_copy(&l, r, params, nm, NULL, e)) goto out;
        if (h->mixer[L] == MIXER_ATTN) {
            const char *pr[4] = {"q", "k", "v", "o"};
            for (int k = 0; k < 4; k++) {
                snprintf(nm, sizeof nm, "model.layers.%d.self_attn.%s_proj.weight", L, pr[k]);
                if (tl_copy(&l, r, params, nm, NULL, e)) goto out;
            }
        } else {
            Mamba2Std s;
            if (mamba2_to_standard(h, r, params, L, H_out, &s, e)) goto out;
            const int64_t sh_in[2] = {s.n_in, s.d_model}, sh_conv[3] = {s.conv_dim, 1, s.d_conv};
            const int64_t sh_c[1] = {s.conv_dim}, sh_h[1] = {s.H}, sh_di[1] = {s.d_inner};
            const int64_t sh_out[2] = {s.d_model, s.d_inner};
#define ADD(suffix, nd, shape, src)                                           \
    snprintf(on, sizeof on, "model.layers.%d.mamba." suffix, L);              \
    tl_add(&l, on, nd, shape, src);
            ADD("in_proj.weight", 2, sh_in, s.in_proj);
            ADD("conv1d.weight", 3, sh_conv, s.conv_w);
            ADD("conv1d.bias", 1, sh_c, s.conv_b);
            ADD("dt_bias", 1, sh_h, s.dt_bias);
            ADD("A_log", 1, sh_h, s.A_log);
            ADD("D", 1, sh_h, s.D);
            ADD("norm.weight", 1, sh_di, s.norm_w);
            ADD("out_proj.weight", 2, sh_out, s.out_proj);
#undef ADD
            mamba2_std_free(&s);
        }
        snprintf(nm, sizeof nm, "model.layers.%d.post_attention_layernorm.weight", L);
        if (tl_copy(&l, r, params, nm, NULL, e)) goto out;
        // shared_mlp.input_linear = cat([gate, up], 0); output_linear = down
        const int64_t ff = c->d_ff, d = c->d_model;
        snprintf(nm, sizeof nm, "model.layers.%d.mlp.gate_proj.weight", L);
        const float *gate = tensor(r, params, nm, ff * d, e);
        snprintf(nm, sizeof nm, "model.layers.%d.mlp.up_proj.weight", L);
        const float *up = gate ? tensor(r, params, nm, ff * d, e) : NULL;
        if (!up) goto out;
        float *gu = dl_malloc((size_t)(2 * ff * d) * sizeof(float));
        memcpy(gu, gate, (size_t)(ff * d) * sizeof(float));
        memcpy(gu + ff * d, up, (size_t)(ff * d) * sizeof(float));
        const int64_t sh_gu[2] = {2 * ff, d};
        snprintf(on, sizeof on, "model.layers.%d.shared_mlp.input_linear.weight", L);
        tl_add(&l, on, 2, sh_gu, gu);
        free(gu);
        snprintf(nm, sizeof nm, "model.layers.%d.mlp.down_proj.weight", L);
        snprintf(on, sizeof on, "model.layers.%d.shared_mlp.output_linear.weight", L);
        if (tl_copy(&l, r, params, nm, on, e)) goto out;
    }
    if (tl_copy(&l, r, params, "model.norm.weight", NULL, e)) goto out;
    if (tl_copy(&l, r, params, c->tied_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", "lm_head.weight", e))
        goto out;

    for (int i = 0; i < l.n; i++) l.t[i].shape = l.shapes[i];  // l.shapes moved while growing
    const char *meta[2] = {"format", "pt"};
    int n_shards = 0;
    if (st_write_sharded(d.tmp, l.t, l.n, o->max_shard_bytes ? o->max_shard_bytes : UINT64_MAX / 4, meta, 1, &n_shards, e))
        goto out;
    cfg = export_granite_config_json(h, H_out, expand, o->dtype, o->name_or_path);
    if (export_dir_write_text(&d, "config.json", cfg, e)) goto out;
    rc = export_dir_commit(&d, e);
out:
    export_dir_end(&d);
    tl_free(&l);
    cJSON_free(cfg);
    return rc;
}
