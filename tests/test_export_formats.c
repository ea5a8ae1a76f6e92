// test_export_formats.c: the engine exports (distill/export_granite.h, export_gguf.h, export_mamba2.h) on a small
// random Mamba-2 hybrid: the standard-layout mapping (x/B rows duplicated per KV group, zero heads), the
// GraniteMoeHybrid directory (tensor names, shapes, config keys), the granitehybrid GGUF (keys, per-layer
// head_count_kv, rope-permuted Q/K, ssm_a = -exp(A_log)), and clean failures.
//
// Also the tool the Python engine tests (tests/py/test_export_granite.py, test_export_llamacpp.py) use:
//   test_export_formats --make-hybrid TEACHER ATTN_LAYERS SEED OUTDIR
//       TEACHER (anything model_load reads) -> Mamba-2 hybrid keeping attention at ATTN_LAYERS ("1,3" or "-"),
//       initialized from the teacher as MambaInLlama does, written as a MambaInLlama Mamba-2 export (f32).
//   test_export_formats --make-hybrid1 TEACHER ATTN_LAYERS SEED OUTDIR
//       the same with Mamba-1 layers (MambaInLlama's HF format)
//   test_export_formats --logits MODEL IDS OUT [f16|q8_0]
//       (f16 / q8_0: with the weights rounded exactly as that GGUF export stores them)
//       our reference logits of MODEL on the whitespace-separated token ids in IDS (one sequence): float32
//       [T, V] raw to OUT. Attention + Mamba-2 hybrids run through the reference forward below (the CPU engine
//       does not dispatch Mamba-2 layers yet): embedding, per layer RMSNorm -> (GQA attention with RoPE from
//       distill/layers_cpu.h | mamba2_forward) -> residual -> RMSNorm -> SwiGLU MLP -> residual, final norm,
//       head. Other models (teachers, Mamba-1 hybrids) run through the CPU engine.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/export_gguf.h"
#include "distill/export_granite.h"
#include "distill/export_mamba2.h"
#include "distill/gguf.h"
#include "distill/layers_cpu.h"
#include "distill/mamba2_cpu.h"
#include "distill/mamba_init.h"
#include "distill/model_io.h"
#include "distill/quant.h"
#include "distill/safetensors.h"
#include "tests/check.h"

// ---------------------------------------------------------------- reference forward

static const float *W(const Registry *r, const float *p, const char *fmt, int l) {
    char nm[DL_TENSOR_NAME_MAX];
    snprintf(nm, sizeof nm, fmt, l);
    int i = reg_find(r, nm);
    if (i < 0) {
        fprintf(stderr, "reference forward: tensor %s missing\n", nm);
        exit(1);
    }
    return p + r->t[i].offset;
}

static void hybrid_logits(const HybridConfig *h, const Registry *r, const float *p, const int32_t *tok, int64_t T,
                          float *logits) {
    const LlamaConfig *c = &h->base;
    const int64_t d = c->d_model, hd = c->head_dim, qd = (int64_t)c->n_head * hd, kvd = (int64_t)c->n_kv_head * hd;
    const int64_t ff = c->d_ff, V = c->vocab;
    const float eps = (float)c->rms_eps;
    float *x = calloc((size_t)(T * d), 4), *xn = calloc((size_t)(T * d), 4), *tmp = calloc((size_t)(T * d), 4);
    float *q = calloc((size_t)(T * qd), 4), *k = calloc((size_t)(T * kvd), 4), *v = calloc((size_t)(T * kvd), 4);
    float *att = calloc((size_t)(T * qd), 4), *g = calloc((size_t)(T * ff), 4), *u = calloc((size_t)(T * ff), 4);
    float *inv = calloc((size_t)hd, 4);
    int32_t *pos = calloc((size_t)T, 4);
    for (int64_t t = 0; t < T; t++) pos[t] = (int32_t)t;
    rope_inv_freq(c, inv);
    embedding_fwd(x, tok, W(r, p, "model.embed_tokens.weight", 0), T, d);
    for (int l = 0; l < c->n_layer; l++) {
        rmsnorm_fwd(xn, NULL, x, W(r, p, "model.layers.%d.input_layernorm.weight", l), T, d, eps);
        if (h->mixer[l] == MIXER_ATTN) {
            linear_fwd(q, xn, W(r, p, "model.layers.%d.self_attn.q_proj.weight", l), T, d, qd, false);
            linear_fwd(k, xn, W(r, p, "model.layers.%d.self_attn.k_proj.weight", l), T, d, kvd, false);
            linear_fwd(v, xn, W(r, p, "model.layers.%d.self_attn.v_proj.weight", l), T, d, kvd, false);
            rope_apply(q, pos, inv, T, c->n_head, (int)hd, false);
            rope_apply(k, pos, inv, T, c->n_kv_head, (int)hd, false);
            AttnShape s = {1, T, T, 0, c->n_head, c->n_kv_head, (int)hd};
            attention_fwd(&s, q, k, v, NULL, att, NULL);
            linear_fwd(tmp, att, W(r, p, "model.layers.%d.self_attn.o_proj.weight", l), T, qd, d, false);
        } else {
            mamba2_forward(h, r, p, l, 1, T, xn, NULL, tmp, NULL);
        }
        vec_add(x, tmp, T * d);
        rmsnorm_fwd(xn, NULL, x, W(r, p, "model.layers.%d.post_attention_layernorm.weight", l), T, d, eps);
        linear_fwd(g, xn, W(r, p, "model.layers.%d.mlp.gate_proj.weight", l), T, d, ff, false);
        linear_fwd(u, xn, W(r, p, "model.layers.%d.mlp.up_proj.weight", l), T, d, ff, false);
        swiglu_fwd(g, g, u, T * ff);
        linear_fwd(tmp, g, W(r, p, "model.layers.%d.mlp.down_proj.weight", l), T, ff, d, false);
        vec_add(x, tmp, T * d);
    }
    rmsnorm_fwd(xn, NULL, x, W(r, p, "model.norm.weight", 0), T, d, eps);
    linear_fwd(logits, xn, W(r, p, c->tied_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", 0), T, d, V, false);
    free(x), free(xn), free(tmp), free(q), free(k), free(v), free(att), free(g), free(u), free(inv), free(pos);
}

static bool has_mamba2(const HybridConfig *h) {
    for (int l = 0; l < h->base.n_layer; l++)
        if (h->mixer[l] == MIXER_MAMBA2) return true;
    return false;
}

// Rounds the weights as a GGUF export of type t stores them: every 2-D matrix through t (F16, or Q8_0 where a
// row is whole blocks, else F16); 1-D tensors and the conv stay F32. Q8_0 blocks run along rows, and the export
// only permutes, duplicates or zero-pads whole rows (or, for out_proj, appends whole zero blocks when d_inner is
// a multiple of 32), so this equals the exported values.
static void round_like_gguf(LoadedModel *m, DType t) {
    for (int i = 0; i < m->reg.n; i++) {
        const TensorInfo *ti = &m->reg.t[i];
        if (ti->ndim != 2) continue;
        DType tt = (t == DT_Q8_0 && ti->shape[1] % 32 == 0) ? DT_Q8_0 : DT_F16;
        float *x = m->params + ti->offset;
        if (tt == DT_F16)
            for (int64_t k = 0; k < ti->numel; k++) x[k] = f16_to_f32(f32_to_f16(x[k]));
        else {
            uint8_t *q = malloc((size_t)(ti->numel / 32 * 34));
            quantize(DT_Q8_0, x, q, ti->numel);
            dequantize(DT_Q8_0, q, x, ti->numel);
            free(q);
        }
    }
}

static int tool_logits(const char *model, const char *ids_path, const char *out, const char *round) {
    DlError e;
    LoadedModel m;
    if (model_load(model, 0, &m, &e)) return fprintf(stderr, "%s\n", e.msg), 1;
    if (round) round_like_gguf(&m, !strcmp(round, "q8_0") ? DT_Q8_0 : DT_F16);
    size_t len;
    char *txt = dl_read_file(ids_path, &len, &e);
    if (!txt) return fprintf(stderr, "%s\n", e.msg), 1;
    int64_t T = 0, cap = 64;
    int32_t *ids = malloc((size_t)cap * 4);
    for (char *s = strtok(txt, " \n\t"); s; s = strtok(NULL, " \n\t")) {
        if (T == cap) ids = realloc(ids, (size_t)(cap *= 2) * 4);
        ids[T] = atoi(s);
        if (ids[T] < 0 || ids[T] >= m.hc.base.vocab) return fprintf(stderr, "token id %d out of range\n", ids[T]), 1;
        T++;
    }
    const int64_t V = m.hc.base.vocab;
    float *logits = malloc((size_t)(T * V) * 4);
    if (has_mamba2(&m.hc)) {
        hybrid_logits(&m.hc, &m.reg, m.params, ids, T, logits);
    } else {
        Engine *eng = engine_new(&m.hc, &m.reg, m.params, 1, T, 0, &e);
        if (!eng) return fprintf(stderr, "%s\n", e.msg), 1;
        engine_forward(eng, ids, NULL);
        engine_logits(eng, 0, T, logits);
        engine_free(eng);
    }
    FILE *f = fopen(out, "wb");
    if (!f || fwrite(logits, 4, (size_t)(T * V), f) != (size_t)(T * V) || fclose(f)) return fprintf(stderr, "cannot write %s\n", out), 1;
    printf("logits: %lld tokens x %lld\n", (long long)T, (long long)V);
    model_free(&m), free(logits), free(ids), free(txt);
    return 0;
}

static int make_hybrid(const char *teacher, const char *attn_s, uint64_t seed, MixerKind kind, const char *outdir,
                       HybridConfig *hc_out, Registry *r_out, float **p_out, DlError *e) {
    LoadedModel t;
    if (model_load(teacher, seed, &t, e)) return -1;
    int attn[DL_MAX_LAYERS], n_attn = 0;
    if (strcmp(attn_s, "-")) {
        char *s = strdup(attn_s);
        for (char *q = strtok(s, ","); q; q = strtok(NULL, ",")) attn[n_attn++] = atoi(q);
        free(s);
    }
    HybridConfig h;
    if (hybrid_config_init(&h, &t.hc.base, kind, attn, n_attn, e)) return -1;
    Registry r;
    model_build_registry(&h, &r);
    float *p = calloc((size_t)r.numel, sizeof(float));
    if (hybrid_init_from_teacher(&h, &r, p, &t.hc, &t.reg, t.params, seed, e)) return -1;
    model_free(&t);
    if (outdir) {
        ExportOptions o = {.dtype = DT_F32};
        if ((kind == MIXER_MAMBA2 ? export_mambainllama_mamba2(outdir, &h, &r, p, &o, e) : export_hf(outdir, &h, &r, p, &o, e)))
            return -1;
    }
    if (hc_out) *hc_out = h, *r_out = r, *p_out = p;
    else reg_free(&r), free(p);
    return 0;
}

// ---------------------------------------------------------------- self-tests

static const char *TINY_CONFIG =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 48,"
    " \"num_hidden_layers\": 3, \"num_attention_heads\": 6, \"num_key_value_heads\": 2, \"head_dim\": 8,"
    " \"intermediate_size\": 64, \"vocab_size\": 40, \"max_position_embeddings\": 64, \"rope_theta\": 50000.0,"
    " \"rms_norm_eps\": 1e-5, \"tie_word_embeddings\": true, \"initializer_range\": 0.2}";

static void test_standard_layout(const HybridConfig *h, const Registry *r, const float *p) {
    DlError e;
    const LlamaConfig *c = &h->base;
    const int64_t d = c->d_model, H = c->n_head, P = c->head_dim, di = H * P, dxb = c->n_kv_head * P, rep = H / c->n_kv_head;
    int heads = 0, ex = 0;
    CHECK(mamba2_std_heads(h, 0, &heads, &ex, &e) == 0);
    CHECK_EQ_I64(heads, 6);
    CHECK_EQ_I64(ex, 1);
    CHECK(mamba2_std_heads(h, 2, &heads, &ex, &e) == 0);
    CHECK_EQ_I64(heads, 12);
    Mamba2Std s;
    CHECK(mamba2_to_standard(h, r, p, 1, 12, &s, &e) == 0);  // layer 1 is Mamba-2 (attention at 0)
    CHECK_EQ_I64(s.n_in, 2 * 96 + 2 * 96 + 12);
    CHECK_EQ_I64(s.conv_dim, 96 * 3);
    char nm[96];
    snprintf(nm, sizeof nm, "model.layers.1.mamba.in_proj.weight");
    const float *win = p + r->t[reg_find(r, nm)].offset;
    snprintf(nm, sizeof nm, "model.layers.1.mamba.conv1d.weight");
    const float *wconv = p + r->t[reg_find(r, nm)].offset;
    const int64_t dio = 96, Ns = 96;
    int bad = 0, nonzero_pad = 0;
    for (int64_t hh = 0; hh < 12; hh++)
        for (int64_t j = 0; j < P; j++)
            for (int64_t k = 0; k < d; k++) {
                float z = s.in_proj[(hh * P + j) * d + k], x = s.in_proj[(dio + hh * P + j) * d + k];
                float B = s.in_proj[(2 * dio + hh * P + j) * d + k], C = s.in_proj[(2 * dio + Ns + hh * P + j) * d + k];
                if (hh >= H) {
                    nonzero_pad += z != 0 || x != 0 || B != 0 || C != 0;
                    continue;
                }
                const int64_t kv = hh / rep;
                bad += z != win[(hh * P + j) * d + k];
                bad += x != win[(di + kv * P + j) * d + k];
                bad += B != win[(di + dxb + kv * P + j) * d + k];
                bad += C != win[(di + 2 * dxb + hh * P + j) * d + k];
            }
    CHECK_EQ_I64(bad, 0);
    CHECK_EQ_I64(nonzero_pad, 0);
    // conv: x channel of head 5 = compact x channel of KV head 5/3 = 1; padded channels zero
    CHECK(!memcmp(s.conv_w + (5 * P + 2) * 4, wconv + (1 * P + 2) * 4, 16));
    float zsum = 0;
    for (int64_t ch = H * P; ch < dio; ch++) zsum += fabsf(s.conv_w[ch * 4]) + fabsf(s.conv_b[ch]);
    for (int64_t o = 0; o < d; o++)
        for (int64_t k = di; k < dio; k++) zsum += fabsf(s.out_proj[o * dio + k]);
    CHECK(zsum == 0);
    mamba2_std_free(&s);
    CHECK(mamba2_to_standard(h, r, p, 0, 6, &s, &e) != 0);  // attention layer
    CHECK(strstr(e.msg, "not a Mamba-2") != NULL);
}

static void test_granite_dir(const HybridConfig *h, const Registry *r, const float *p, const char *dir) {
    DlError e;
    GraniteOptions o = {.dtype = DT_F32};
    CHECK(export_granite(dir, h, r, p, &o, &e) == 0);
    SafeTensors *st;
    if (st_open(&st, dir, &e)) {
        CHECK(!"granite export readable");
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    int i = st_find(st, "model.layers.1.mamba.in_proj.weight");
    CHECK(i >= 0 && st_tensor(st, i)->shape[0] == 2 * 48 + 2 * 48 + 6 && st_tensor(st, i)->shape[1] == 48);
    i = st_find(st, "model.layers.1.mamba.conv1d.weight");
    CHECK(i >= 0 && st_tensor(st, i)->ndim == 3 && st_tensor(st, i)->shape[0] == 144);
    i = st_find(st, "model.layers.0.shared_mlp.input_linear.weight");
    CHECK(i >= 0 && st_tensor(st, i)->shape[0] == 128);
    CHECK(st_find(st, "model.layers.0.self_attn.q_proj.weight") >= 0);
    CHECK(st_find(st, "lm_head.weight") >= 0);  // explicit even though the model is tied
    CHECK(st_find(st, "model.layers.1.mlp.gate_proj.weight") < 0);
    st_close(st);
    char *cfgp = dl_path_join(dir, "config.json");
    size_t n;
    char *cfg = dl_read_file(cfgp, &n, &e);
    CHECK(cfg && strstr(cfg, "\"GraniteMoeHybridForCausalLM\"") && strstr(cfg, "\"mamba_expand\":\t1,") &&
          strstr(cfg, "\"attention_multiplier\":\t0.35355339059327") && strstr(cfg, "\"num_local_experts\":\t0") &&
          strstr(cfg, "\"layer_types\":\t[\"attention\", \"mamba\", \"mamba\"]"));
    free(cfg), free(cfgp);
}

static void test_gguf(const HybridConfig *h, const Registry *r, const float *p, const char *path) {
    DlError e;
    GgufExportOptions o = {.dtype = DT_F32};
    CHECK(export_gguf(path, h, r, p, &o, &e) == 0);
    GgufFile *g;
    if (gguf_open(&g, path, &e)) {
        CHECK(!"gguf readable");
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    size_t len;
    const char *arch = gguf_get_str_key(g, "general.architecture", &len, &e);
    CHECK(arch && !strcmp(arch, "granitehybrid"));
    uint64_t v = 0, nkv = 0;
    CHECK(gguf_get_u64(g, "granitehybrid.ssm.inner_size", &v, &e) == 0 && v == 96);  // expand 2: 12 heads
    CHECK(gguf_get_u64(g, "granitehybrid.ssm.group_count", &v, &e) == 0 && v == 12);
    CHECK(gguf_get_u64(g, "granitehybrid.ssm.time_step_rank", &v, &e) == 0 && v == 12);
    bool b = false;
    CHECK(gguf_get_bool(g, "granitehybrid.rope.scaling.finetuned", &b, &e) == 0 && b);
    int kv = gguf_find_arr(g, "granitehybrid.attention.head_count_kv", GGUF_TYPE_INT32, &nkv, &e);
    CHECK(kv >= 0 && nkv == 3 && gguf_arr_int(g, kv, 0) == 2 && gguf_arr_int(g, kv, 1) == 0 && gguf_arr_int(g, kv, 2) == 0);
    // Q un-permuted back equals ours
    int ti = gguf_find_tensor(g, "blk.0.attn_q.weight");
    const float *q = p + r->t[reg_find(r, "model.layers.0.self_attn.q_proj.weight")].offset;
    if (ti >= 0) {
        float *un = malloc(48 * 48 * 4);
        rope_unpermute_rows(gguf_tensor(g, ti)->data, un, 6, 8, 48 * 4);
        CHECK(!memcmp(un, q, 48 * 48 * 4));
        CHECK(memcmp(gguf_tensor(g, ti)->data, q, 48 * 48 * 4) != 0);  // and it was permuted
        free(un);
    } else CHECK(!"blk.0.attn_q.weight present");
    ti = gguf_find_tensor(g, "blk.2.ssm_a");
    const float *A_log = p + r->t[reg_find(r, "model.layers.2.mamba.A_log")].offset;
    CHECK(ti >= 0 && gguf_tensor(g, ti)->ne[0] == 1 && gguf_tensor(g, ti)->ne[1] == 12 &&
          ((const float *)gguf_tensor(g, ti)->data)[3] == -expf(A_log[3]));
    ti = gguf_find_tensor(g, "blk.2.ssm_norm.weight");
    CHECK(ti >= 0 && gguf_tensor(g, ti)->ne[0] == 8 && gguf_tensor(g, ti)->ne[1] == 12);
    CHECK(gguf_find_tensor(g, "output.weight") < 0);  // tied: llama.cpp reuses token_embd
    gguf_close(g);
    // Q8_0: matrices quantized, conv stays F32
    o.dtype = DT_Q8_0;
    CHECK(export_gguf(path, h, r, p, &o, &e) == 0);
    if (gguf_open(&g, path, &e) == 0) {
        ti = gguf_find_tensor(g, "blk.1.ffn_down.weight");  // rows of 64: Q8_0
        CHECK(ti >= 0 && gguf_tensor(g, ti)->dtype == DT_Q8_0);
        ti = gguf_find_tensor(g, "blk.1.ssm_in.weight");  // rows of 48 are not whole Q8_0 blocks: F16
        CHECK(ti >= 0 && gguf_tensor(g, ti)->dtype == DT_F16);
        ti = gguf_find_tensor(g, "blk.1.ssm_conv1d.weight");
        CHECK(ti >= 0 && gguf_tensor(g, ti)->dtype == DT_F32);
        gguf_close(g);
    }
}

static void test_failures(const char *cfg, const char *tmp) {
    DlError e;
    HybridConfig h;
    Registry r;
    float *p;
    // a Mamba-1 hybrid has no engine format: clear errors, nothing written
    CHECK(make_hybrid(cfg, "0", 3, MIXER_MAMBA1, NULL, &h, &r, &p, &e) == 0);
    char *dir = dl_path_join(tmp, "m1-granite"), *gg = dl_path_join(tmp, "m1.gguf");
    GraniteOptions go = {.dtype = DT_F32};
    CHECK(export_granite(dir, &h, &r, p, &go, &e) != 0 && strstr(e.msg, "Mamba-1"));
    CHECK(!dl_file_exists(dir));
    GgufExportOptions o = {.dtype = DT_F16};
    CHECK(export_gguf(gg, &h, &r, p, &o, &e) != 0 && strstr(e.msg, "Mamba-1"));
    CHECK(!dl_file_exists(gg));
    ExportOptions eo = {.dtype = DT_F32};
    CHECK(export_mambainllama_mamba2(dir, &h, &r, p, &eo, &e) != 0 && strstr(e.msg, "Mamba-1"));
    reg_free(&r), free(p);
    // a tokenizer whose vocabulary does not match the model's
    const char *teacher = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (dl_file_exists(teacher)) {
        CHECK(make_hybrid(cfg, "0", 3, MIXER_MAMBA2, NULL, &h, &r, &p, &e) == 0);
        o.tokenizer_gguf = teacher;
        CHECK(export_gguf(gg, &h, &r, p, &o, &e) != 0 && strstr(e.msg, "49152"));
        CHECK(!dl_file_exists(gg));
        // expand too small for the heads
        GraniteOptions bad = {.dtype = DT_F32, .expand = 0};
        CHECK(export_granite(dir, &h, &r, p, &bad, &e) == 0);  // expand 0 = auto works
        reg_free(&r), free(p);
    }
    free(dir), free(gg);
}

int main(int argc, char **argv) {
    DlError e;
    if (argc == 6 && (!strcmp(argv[1], "--make-hybrid") || !strcmp(argv[1], "--make-hybrid1"))) {
        MixerKind kind = !strcmp(argv[1], "--make-hybrid1") ? MIXER_MAMBA1 : MIXER_MAMBA2;
        if (make_hybrid(argv[2], argv[3], strtoull(argv[4], NULL, 10), kind, argv[5], NULL, NULL, NULL, &e))
            return fprintf(stderr, "%s\n", e.msg), 1;
        return 0;
    }
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "--logits")) return tool_logits(argv[2], argv[3], argv[4], argc == 6 ? argv[5] : NULL);
    if (argc != 1) {
        fprintf(stderr, "usage: %s [--make-hybrid[1] TEACHER ATTN_LAYERS SEED OUTDIR | --logits MODEL IDS OUT [f16|q8_0]]\n", argv[0]);
        return 2;
    }
    char tmp[] = "/tmp/test_export_formats-XXXXXX";
    if (!mkdtemp(tmp)) return perror("mkdtemp"), 1;
    char *cfg = dl_path_join(tmp, "tiny.json");
    FILE *f = fopen(cfg, "w");
    fputs(TINY_CONFIG, f);
    fclose(f);
    HybridConfig h;
    Registry r;
    float *p;
    if (make_hybrid(cfg, "0", 7, MIXER_MAMBA2, NULL, &h, &r, &p, &e)) return fprintf(stderr, "%s\n", e.msg), 1;
    test_standard_layout(&h, &r, p);
    char *dir = dl_path_join(tmp, "granite"), *gg = dl_path_join(tmp, "h.gguf");
    test_granite_dir(&h, &r, p, dir);
    test_gguf(&h, &r, p, gg);
    test_failures(cfg, tmp);
    reg_free(&r), free(p), free(dir), free(gg), free(cfg);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmp);
    return check_report("test_export_formats");
}
