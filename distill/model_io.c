// model_io.c: config + weights from a GGUF file, an HF directory or a config .json (see model_io.h).
#include "distill/model_io.h"

#include <stdio.h>
#include <string.h>

#include "distill/hfconfig.h"
#include "distill/quant.h"
#include "distill/rng.h"
#include "distill/safetensors.h"

// ---------------------------------------------------------------- names

// Per-layer GGUF <-> HF suffixes of the llama architecture (llama.cpp src/llama-arch.cpp).
static const char *const LAYER_NAMES[][2] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
};
static const char *const GLOBAL_NAMES[][2] = {
    {"token_embd.weight", "model.embed_tokens.weight"},
    {"output_norm.weight", "model.norm.weight"},
    {"output.weight", "lm_head.weight"},
};

// Parses "<prefix><int>.<rest>"; returns rest or NULL.
static const char *layer_prefix(const char *name, const char *prefix, int *layer) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n)) return NULL;
    const char *p = name + n;
    if (*p < '0' || *p > '9') return NULL;
    long l = 0;
    while (*p >= '0' && *p <= '9' && l < 1000000) l = l * 10 + (*p++ - '0');
    if (*p != '.') return NULL;
    *layer = (int)l;
    return p + 1;
}

int gguf_name_to_hf(const char *g, char *out, size_t n) {
    for (size_t i = 0; i < DL_ARRAY_LEN(GLOBAL_NAMES); i++)
        if (!strcmp(g, GLOBAL_NAMES[i][0])) return snprintf(out, n, "%s", GLOBAL_NAMES[i][1]) < (int)n ? 0 : -1;
    int l;
    const char *rest = layer_prefix(g, "blk.", &l);
    if (!rest) return -1;
    for (size_t i = 0; i < DL_ARRAY_LEN(LAYER_NAMES); i++)
        if (!strcmp(rest, LAYER_NAMES[i][0])) return snprintf(out, n, "model.layers.%d.%s", l, LAYER_NAMES[i][1]) < (int)n ? 0 : -1;
    return -1;
}

int hf_name_to_gguf(const char *h, char *out, size_t n) {
    for (size_t i = 0; i < DL_ARRAY_LEN(GLOBAL_NAMES); i++)
        if (!strcmp(h, GLOBAL_NAMES[i][1])) return snprintf(out, n, "%s", GLOBAL_NAMES[i][0]) < (int)n ? 0 : -1;
    int l;
    const char *rest = layer_prefix(h, "model.layers.", &l);
    if (!rest) return -1;
    for (size_t i = 0; i < DL_ARRAY_LEN(LAYER_NAMES); i++)
        if (!strcmp(rest, LAYER_NAMES[i][1])) return snprintf(out, n, "blk.%d.%s", l, LAYER_NAMES[i][0]) < (int)n ? 0 : -1;
    return -1;
}

// ---------------------------------------------------------------- rope permutation
// convert_hf_to_gguf.py permutes Q/K rows per head so that HF's rotate-half pairs (r, r + d/2) become
// adjacent pairs (2j, 2j+1): HF row h*d + t*(d/2) + j -> GGUF row h*d + 2j + t (export.md §2.3).
static int64_t gguf_row_of_hf(int64_t r, int head_dim) {
    const int64_t h = r / head_dim, o = r % head_dim, half = head_dim / 2;
    return h * head_dim + (o < half ? 2 * o : 2 * (o - half) + 1);
}

void rope_permute_rows(const void *src, void *dst, int n_head, int head_dim, int64_t row_bytes) {
    for (int64_t r = 0; r < (int64_t)n_head * head_dim; r++)
        memcpy((char *)dst + gguf_row_of_hf(r, head_dim) * row_bytes, (const char *)src + r * row_bytes, (size_t)row_bytes);
}

void rope_unpermute_rows(const void *src, void *dst, int n_head, int head_dim, int64_t row_bytes) {
    for (int64_t r = 0; r < (int64_t)n_head * head_dim; r++)
        memcpy((char *)dst + r * row_bytes, (const char *)src + gguf_row_of_hf(r, head_dim) * row_bytes, (size_t)row_bytes);
}

// ---------------------------------------------------------------- GGUF

static int gguf_int(const GgufFile *g, const char *key, bool required, int64_t def, int64_t lo, int64_t hi, int *out,
                    DlError *e) {
    int64_t v = def;
    if (gguf_find_key(g, key) >= 0 || required) {
        if (gguf_get_i64(g, key, &v, e)) return -1;
    }
    if (v < lo || v > hi) return dl_fail(e, "%s: %s = %lld is out of range (expected %lld..%lld)", gguf_label(g), key, (long long)v, (long long)lo, (long long)hi);
    *out = (int)v;
    return 0;
}

int model_gguf_config(const GgufFile *g, HybridConfig *hc, DlError *e) {
    size_t alen;
    const char *arch = gguf_get_str_key(g, "general.architecture", &alen, e);
    if (!arch) return -1;
    if (strcmp(arch, "llama"))
        return dl_fail(e, "%s: general.architecture is \"%s\" (only \"llama\" teachers are supported)", gguf_label(g), arch);
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    const int64_t BIG = (int64_t)1 << 30;
    if (gguf_int(g, "llama.block_count", true, 0, 1, DL_MAX_LAYERS, &c.n_layer, e) ||
        gguf_int(g, "llama.embedding_length", true, 0, 1, BIG, &c.d_model, e) ||
        gguf_int(g, "llama.feed_forward_length", true, 0, 1, BIG, &c.d_ff, e) ||
        gguf_int(g, "llama.attention.head_count", true, 0, 1, 1 << 16, &c.n_head, e) ||
        gguf_int(g, "llama.attention.head_count_kv", false, c.n_head, 1, 1 << 16, &c.n_kv_head, e) ||
        gguf_int(g, "llama.context_length", false, 2048, 1, BIG, &c.max_pos, e))
        return -1;
    if (gguf_int(g, "llama.attention.key_length", false, c.d_model / c.n_head, 1, 1 << 16, &c.head_dim, e)) return -1;
    int rope_dim;
    if (gguf_int(g, "llama.rope.dimension_count", false, c.head_dim, 1, 1 << 16, &rope_dim, e)) return -1;
    if (rope_dim != c.head_dim)
        return dl_fail(e, "%s: llama.rope.dimension_count = %d differs from the head size %d (partial rotary is not supported)",
                       gguf_label(g), rope_dim, c.head_dim);
    c.rope_theta = 10000.0;
    if (gguf_find_key(g, "llama.rope.freq_base") >= 0 && gguf_get_f64(g, "llama.rope.freq_base", &c.rope_theta, e)) return -1;
    if (gguf_get_f64(g, "llama.attention.layer_norm_rms_epsilon", &c.rms_eps, e)) return -1;
    // vocab: the token list, else llama.vocab_size, else the embedding's rows
    int tk = gguf_find_key(g, "tokenizer.ggml.tokens");
    int te = gguf_find_tensor(g, "token_embd.weight");
    if (tk >= 0 && gguf_arr_type(g, tk) == GGUF_TYPE_STRING) c.vocab = (int)DL_MIN(gguf_arr_len(g, tk), (uint64_t)BIG + 1);
    else if (gguf_find_key(g, "llama.vocab_size") >= 0) {
        if (gguf_int(g, "llama.vocab_size", true, 0, 1, BIG, &c.vocab, e)) return -1;
    } else if (te >= 0 && gguf_tensor(g, te)->n_dims == 2) c.vocab = (int)DL_MIN(gguf_tensor(g, te)->ne[1], BIG + 1);
    if (c.vocab < 1 || c.vocab > BIG) return dl_fail(e, "%s: cannot determine the vocabulary size (no tokenizer.ggml.tokens, llama.vocab_size or token_embd.weight)", gguf_label(g));
    c.tied_embeddings = gguf_find_tensor(g, "output.weight") < 0;
    c.bos_id = c.eos_id = -1;
    if (gguf_find_key(g, "tokenizer.ggml.bos_token_id") >= 0 && gguf_int(g, "tokenizer.ggml.bos_token_id", true, 0, 0, c.vocab - 1, &c.bos_id, e)) return -1;
    if (gguf_find_key(g, "tokenizer.ggml.eos_token_id") >= 0 && gguf_int(g, "tokenizer.ggml.eos_token_id", true, 0, 0, c.vocab - 1, &c.eos_id, e)) return -1;
    if (gguf_find_tensor(g, "rope_freqs.weight") >= 0)
        return dl_fail(e, "%s: has rope_freqs.weight (Llama-3.1 rope scaling baked into frequencies); load this model from its HF directory instead", gguf_label(g));
    if ((int64_t)c.n_head * c.head_dim > BIG || (int64_t)c.n_kv_head * c.head_dim > BIG)
        return dl_fail(e, "%s: head_count * key_length is absurdly large", gguf_label(g));
    if (llama_config_validate(&c, e)) return dl_fail_prefix(e, "%s: ", gguf_label(g));
    hybrid_config_teacher(hc, &c);
    return 0;
}

// The fp32 parameter buffer; a clean error (not an exit) when the config asks for more than memory holds.
static int alloc_params(LoadedModel *m, const char *path, DlError *e) {
    m->params = calloc((size_t)m->reg.numel, sizeof(float));
    if (!m->params)
        return dl_fail(e, "%s: cannot allocate %.1f GB for the %lld fp32 parameters of this model", path,
                       (double)m->reg.numel * 4e-9, (long long)m->reg.numel);
    return 0;
}

static int load_gguf(const char *path, LoadedModel *m, DlError *e) {
    GgufFile *g;
    if (gguf_open(&g, path, e)) return -1;
    int rc = model_gguf_config(g, &m->hc, e);
    if (rc) {
        gguf_close(g);
        return rc;
    }
    model_build_registry(&m->hc, &m->reg);
    if (alloc_params(m, path, e)) {
        gguf_close(g);
        return -1;
    }
    bool *used = dl_calloc((size_t)gguf_tensor_count(g) + 1, 1);
    float *tmp = NULL;
    char gname[128], shp[64];
    for (int i = 0; i < m->reg.n && !rc; i++) {
        const TensorInfo *ti = &m->reg.t[i];
        if (hf_name_to_gguf(ti->name, gname, sizeof gname)) {
            rc = dl_fail(e, "%s: tensor '%s' has no GGUF llama name", path, ti->name);
            break;
        }
        int k = gguf_find_tensor(g, gname);
        if (k < 0) {
            rc = dl_fail(e, "%s: tensor '%s' (%s, shape %s) is missing", path, gname, ti->name, reg_shape_str(ti, shp, sizeof shp));
            break;
        }
        used[k] = true;
        const GgufTensor *t = gguf_tensor(g, k);
        int64_t shape[GGUF_MAX_DIMS];
        int nd = gguf_tensor_shape(t, shape);
        bool same = nd == ti->ndim;
        for (int d = 0; same && d < nd; d++) same = shape[d] == ti->shape[d];
        if (!same) {
            char got[64] = "[";
            for (int d = 0; d < nd; d++) snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)shape[d]);
            strcat(got, "]");
            rc = dl_fail(e, "%s: tensor '%s' has shape %s, expected %s (for %s)", path, gname, got, reg_shape_str(ti, shp, sizeof shp), ti->name);
            break;
        }
        if (t->dtype < 0 || !quant_can_dequantize((DType)t->dtype)) {
            const char *tn = "?";
            ggml_type_info(t->ggml_type, &tn, NULL, NULL);
            rc = dl_fail(e, "%s: tensor '%s' has type %s, which distill cannot dequantize (supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K)", path, gname, tn);
            break;
        }
        float *dst = m->params + ti->offset;
        bool is_q = strstr(ti->name, "self_attn.q_proj"), is_k = strstr(ti->name, "self_attn.k_proj");
        if (is_q || is_k) {
            tmp = dl_realloc(tmp, (size_t)ti->numel * sizeof(float));
            dequantize((DType)t->dtype, t->data, tmp, ti->numel);
            rope_unpermute_rows(tmp, dst, is_q ? m->hc.base.n_head : m->hc.base.n_kv_head, m->hc.base.head_dim, ti->shape[1] * (int64_t)sizeof(float));
        } else {
            dequantize((DType)t->dtype, t->data, dst, ti->numel);
        }
    }
    for (int k = 0; k < gguf_tensor_count(g) && !rc; k++)
        if (!used[k]) rc = dl_fail(e, "%s: unexpected tensor '%s' (not part of a %d-layer llama model)", path, gguf_tensor(g, k)->name, m->hc.base.n_layer);
    free(tmp);
    free(used);
    gguf_close(g);
    snprintf(m->source, sizeof m->source, "%s (GGUF)", path);
    return rc;
}

// ---------------------------------------------------------------- HF directory / config json

static int read_hf_dir_config(const char *dir, HybridConfig *hc, DlError *e) {
    char *cfg = dl_path_join(dir, "config.json"), *mcfg = dl_path_join(dir, "mamba_config.json");
    LlamaConfig c;
    int rc = 0;
    if (!dl_file_exists(cfg)) rc = dl_fail(e, "%s: no config.json in this directory (expected an HF model directory)", dir);
    else rc = hf_config_load(cfg, &c, e);
    if (!rc) {
        if (dl_file_exists(mcfg)) {
            size_t len;
            char *txt = dl_read_file(mcfg, &len, e);
            rc = txt ? hf_mamba_config_parse(txt, len, mcfg, &c, hc, e) : -1;
            free(txt);
        } else hybrid_config_teacher(hc, &c);
    }
    free(cfg);
    free(mcfg);
    return rc;
}

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

const char *model_source_kind(const char *path, DlError *e) {
    if (dl_is_dir(path)) return "hf-dir";
    FILE *f = fopen(path, "rb");
    if (!f) {
        dl_fail(e, "%s: cannot open", path);
        return NULL;
    }
    char magic[4] = {0};
    size_t n = fread(magic, 1, 4, f);
    fclose(f);
    if (n == 4 && !memcmp(magic, "GGUF", 4)) return "gguf";
    if (ends_with(path, ".gguf")) return "gguf";  // let the reader explain what is wrong with it
    if (ends_with(path, ".json")) return "config-json";
    dl_fail(e, "%s: not a model (expected a GGUF file, an HF model directory or a config .json)", path);
    return NULL;
}

int model_read_config(const char *path, HybridConfig *hc, DlError *e) {
    const char *kind = model_source_kind(path, e);
    if (!kind) return -1;
    if (!strcmp(kind, "hf-dir")) return read_hf_dir_config(path, hc, e);
    if (!strcmp(kind, "config-json")) {
        LlamaConfig c;
        if (hf_config_load(path, &c, e)) return -1;
        hybrid_config_teacher(hc, &c);
        return 0;
    }
    GgufFile *g;
    if (gguf_open(&g, path, e)) return -1;
    int rc = model_gguf_config(g, hc, e);
    gguf_close(g);
    return rc;
}

static int load_hf_dir(const char *dir, LoadedModel *m, DlError *e) {
    if (read_hf_dir_config(dir, &m->hc, e)) return -1;
    SafeTensors *s;
    if (st_open(&s, dir, e)) return -1;
    model_build_registry(&m->hc, &m->reg);
    if (alloc_params(m, dir, e)) {
        st_close(s);
        return -1;
    }
    bool *used = dl_calloc((size_t)st_count(s) + 1, 1);
    int rc = 0;
    char shp[64];
    for (int i = 0; i < m->reg.n && !rc; i++) {
        const TensorInfo *ti = &m->reg.t[i];
        int k = st_find(s, ti->name);
        if (k < 0) {
            rc = dl_fail(e, "%s: tensor '%s' (shape %s) is missing", dir, ti->name, reg_shape_str(ti, shp, sizeof shp));
            break;
        }
        used[k] = true;
        const StTensor *t = st_tensor(s, k);
        bool same = t->ndim == ti->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = t->shape[d] == ti->shape[d];
        if (!same) {
            char got[128] = "[";
            for (int d = 0; d < t->ndim; d++) snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)t->shape[d]);
            strcat(got, "]");
            rc = dl_fail(e, "%s: tensor '%s' has shape %s, expected %s", st_shard_path(s, t->shard), ti->name, got, reg_shape_str(ti, shp, sizeof shp));
            break;
        }
        if (st_to_f32(t, m->params + ti->offset, e)) rc = dl_fail_prefix(e, "%s: ", st_shard_path(s, t->shard));
    }
    for (int k = 0; k < st_count(s) && !rc; k++) {
        if (used[k]) continue;
        const char *nm = st_tensor(s, k)->name;
        if (strstr(nm, "rotary_emb.inv_freq")) continue;  // a buffer old exports saved; recomputed from the config
        if (!strcmp(nm, "lm_head.weight") && m->hc.base.tied_embeddings) continue;  // tied: the embedding is used
        rc = dl_fail(e, "%s: unexpected tensor '%s' (not part of this model's layout)", st_shard_path(s, st_tensor(s, k)->shard), nm);
    }
    free(used);
    st_close(s);
    snprintf(m->source, sizeof m->source, "%s (HF safetensors)", dir);
    return rc;
}

// Random weights: normal(0, initializer_range) for matrices, ones for norms. Each tensor draws from its
// own stream (seed, registry index), so the result is deterministic and tensors fill in parallel.
static int load_config_json(const char *path, uint64_t seed, LoadedModel *m, DlError *e) {
    size_t len;
    char *txt = dl_read_file(path, &len, e);
    if (!txt) return -1;
    LlamaConfig c;
    double std;
    int rc = hf_config_parse(txt, len, path, &c, e);
    if (!rc) hf_config_init_range(txt, len, &std);
    free(txt);
    if (rc) return rc;
    hybrid_config_teacher(&m->hc, &c);
    model_build_registry(&m->hc, &m->reg);
    if (alloc_params(m, path, e)) return -1;
    const Registry *r = &m->reg;
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *ti = &r->t[i];
        float *p = m->params + ti->offset;
        if (ti->role == ROLE_NORM) {
            for (int64_t j = 0; j < ti->numel; j++) p[j] = 1.0f;
        } else {
            Rng g;
            rng_init(&g, seed, 0x696e6974ull + (uint64_t)i);  // "init" + tensor index
            for (int64_t j = 0; j < ti->numel; j++) p[j] = (float)(std * rng_normal(&g));
        }
    }
    snprintf(m->source, sizeof m->source, "%s (config, random weights, seed %llu)", path, (unsigned long long)seed);
    return 0;
}

int model_load(const char *path, uint64_t seed, LoadedModel *m, DlError *e) {
    memset(m, 0, sizeof *m);
    const char *kind = model_source_kind(path, e);
    if (!kind) return -1;
    int rc;
    if (!strcmp(kind, "gguf")) rc = load_gguf(path, m, e);
    else if (!strcmp(kind, "hf-dir")) rc = load_hf_dir(path, m, e);
    else rc = load_config_json(path, seed, m, e);
    if (rc) model_free(m);
    return rc;
}

void model_free(LoadedModel *m) {
    if (!m) return;
    free(m->params);
    if (m->reg.t) reg_free(&m->reg);
    memset(m, 0, sizeof *m);
}
