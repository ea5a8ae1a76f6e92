// test_model_io.c: model loading from every source. The teacher GGUF gives the expected config and 272
// tensors with Q/K un-permuted; config-only loads are deterministic per seed; HF directories (single,
// sharded, BF16, MambaInLlama hybrid) and GGUF files written here load back exactly; missing, extra and
// mis-shaped tensors are errors naming the tensor and the expected shape; config errors name the key;
// `distill inspect` exits 0 on good files and 3 on bad ones.
#include <math.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/gguf.h"
#include "distill/hfconfig.h"
#include "distill/model_io.h"
#include "distill/quant.h"
#include "distill/safetensors.h"
#include "tests/check.h"

static char tmpdir[256];
static const char *TINY = "recipes/configs/tiny-llama3.json";

static void write_text(const char *path, const char *s) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(s, f);
        fclose(f);
    }
}

static void expect_err(int rc, const DlError *e, const char *want, const char *what) {
    if (rc == 0) {
        check_fail_++;
        fprintf(stderr, "  %s: succeeded, expected an error with '%s'\n", what, want);
    } else if (!strstr(e->msg, want)) {
        check_fail_++;
        fprintf(stderr, "  %s: message '%s' lacks '%s'\n", what, e->msg, want);
    } else
        check_pass_++;
}

static void test_configs(void) {
    HybridConfig hc;
    DlError e;
    CHECK(model_read_config("recipes/configs/llama3-8b.json", &hc, &e) == 0);
    Registry r;
    model_build_registry(&hc, &r);
    CHECK_EQ_I64(reg_params_numel(&r), 8030261248ll);  // Llama-3-8B
    reg_free(&r);
    CHECK(hc.base.n_kv_head == 8 && hc.base.head_dim == 128 && hc.base.vocab == 128256 && hc.base.rope_theta == 500000 && !hc.base.tied_embeddings);
    CHECK(model_read_config("recipes/configs/llama31-8b.json", &hc, &e) == 0);
    CHECK(hc.base.rope_factor == 8 && hc.base.rope_low_freq_factor == 1 && hc.base.rope_high_freq_factor == 4 &&
          hc.base.rope_orig_max_pos == 8192 && hc.base.eos_id == 128001 && hc.base.max_pos == 131072);
    CHECK(model_read_config("recipes/configs/zephyr-7b.json", &hc, &e) == 0);
    model_build_registry(&hc, &r);
    CHECK_EQ_I64(reg_params_numel(&r), 7241732096ll);  // Mistral-7B
    reg_free(&r);
    CHECK(model_read_config("recipes/configs/smollm2-135m.json", &hc, &e) == 0);
    CHECK(hc.base.n_layer == 30 && hc.base.d_model == 576 && hc.base.n_head == 9 && hc.base.n_kv_head == 3 &&
          hc.base.vocab == 49152 && hc.base.tied_embeddings && hc.base.rope_theta == 100000);
    CHECK(model_read_config(TINY, &hc, &e) == 0 && hc.base.rope_factor == 8 && hc.base.rope_orig_max_pos == 32);

    // config errors name the key
    LlamaConfig c;
    const char *base = "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100";
    char buf[1024];
    struct { const char *extra, *want; } bad[] = {
        {",\"model_type\":\"gpt2\"", "model_type \"gpt2\" is not supported"},
        {",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}", "rope_scaling type \"yarn\""},
        {",\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8}", "low_freq_factor"},
        {",\"hidden_act\":\"gelu\"", "silu"},
        {",\"num_key_value_heads\":3", "not a multiple"},
        {",\"rope_theta\":\"big\"", "rope_theta"},
        {",\"tie_word_embeddings\":1", "tie_word_embeddings"},
        {",\"attention_bias\":true", "attention_bias"},
        {",\"eos_token_id\":-3", "eos_token_id"},
    };
    for (size_t i = 0; i < DL_ARRAY_LEN(bad); i++) {
        snprintf(buf, sizeof buf, "{%s%s}", base, bad[i].extra);
        expect_err(hf_config_parse(buf, strlen(buf), "c.json", &c, &e), &e, bad[i].want, bad[i].extra);
    }
    snprintf(buf, sizeof buf, "{%s}", base);
    CHECK(hf_config_parse(buf, strlen(buf), "c.json", &c, &e) == 0 && c.n_kv_head == 4 && c.head_dim == 16 && c.rope_theta == 10000);
    // transformers >= 5 spelling: rope_parameters holds rope_theta and the scaling
    snprintf(buf, sizeof buf, "{%s,\"rope_parameters\":{\"rope_theta\":500000.0,\"rope_type\":\"default\"}}", base);
    CHECK(hf_config_parse(buf, strlen(buf), "c.json", &c, &e) == 0 && c.rope_theta == 500000 && c.rope_factor == 0);
    snprintf(buf, sizeof buf, "{%s,\"rope_parameters\":{\"rope_theta\":5e5,\"rope_type\":\"llama3\",\"factor\":8.0,"
             "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":64}}", base);
    CHECK(hf_config_parse(buf, strlen(buf), "c.json", &c, &e) == 0 && c.rope_theta == 500000 && c.rope_factor == 8 && c.rope_orig_max_pos == 64);
    snprintf(buf, sizeof buf, "{%s,\"rope_theta\":1e4,\"rope_parameters\":{\"rope_theta\":5e5}}", base);
    CHECK(hf_config_parse(buf, strlen(buf), "c.json", &c, &e) == 0 && c.rope_theta == 10000);  // top level wins
    snprintf(buf, sizeof buf, "{%s,\"rope_parameters\":{\"rope_type\":\"yarn\",\"factor\":4}}", base);
    expect_err(hf_config_parse(buf, strlen(buf), "c.json", &c, &e), &e, "rope_parameters type \"yarn\"", "rope_parameters yarn");
    const char *noh = "{\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100}";
    expect_err(hf_config_parse(noh, strlen(noh), "c.json", &c, &e), &e, "\"hidden_size\" is missing", "no hidden_size");
    const char *frac = "{\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2.5,\"num_attention_heads\":4,\"vocab_size\":100}";
    expect_err(hf_config_parse(frac, strlen(frac), "c.json", &c, &e), &e, "must be an integer", "2.5 layers");
    const char *nl = "{\n\"hidden_size\": 64,\n\"x\": [1,,2]\n}";
    expect_err(hf_config_parse(nl, strlen(nl), "c.json", &c, &e), &e, "c.json:3: not valid JSON", "bad JSON line");
    // mamba_config consistency
    snprintf(buf, sizeof buf, "{%s}", base);
    CHECK(hf_config_parse(buf, strlen(buf), "c.json", &c, &e) == 0);
    const char *m1 = "{\"d_model\":64,\"ssm_cfg\":{\"expand\":1},\"d_xb\":64,\"n_layer\":2,\"attn_layers\":[1]}";
    CHECK(hf_mamba_config_parse(m1, strlen(m1), "m.json", &c, &hc, &e) == 0 && hc.mixer[0] == MIXER_MAMBA1 && hc.mixer[1] == MIXER_ATTN);
    const char *m2 = "{\"ssm_cfg\":{\"expand\":1,\"ngroups\":4,\"d_state\":16},\"attn_layers\":[]}";
    CHECK(hf_mamba_config_parse(m2, strlen(m2), "m.json", &c, &hc, &e) == 0 && hc.mixer[1] == MIXER_MAMBA2 && hc.d_state == 16);
    const char *m3 = "{\"d_xb\":32}";
    expect_err(hf_mamba_config_parse(m3, strlen(m3), "m.json", &c, &hc, &e), &e, "d_xb", "wrong d_xb");
    const char *m4 = "{\"attn_layers\":[5]}";
    expect_err(hf_mamba_config_parse(m4, strlen(m4), "m.json", &c, &hc, &e), &e, "attn_layers", "layer out of range");
    const char *m5 = "{\"ssm_cfg\":{\"expand\":2}}";
    expect_err(hf_mamba_config_parse(m5, strlen(m5), "m.json", &c, &hc, &e), &e, "expand", "expand 2");
}

static void test_random_init(void) {
    LoadedModel a, b, c;
    DlError e;
    CHECK(model_load(TINY, 7, &a, &e) == 0);
    CHECK(model_load(TINY, 7, &b, &e) == 0);
    CHECK(model_load(TINY, 8, &c, &e) == 0);
    CHECK(a.reg.numel == b.reg.numel && !memcmp(a.params, b.params, sizeof(float) * (size_t)a.reg.numel));
    CHECK(memcmp(a.params, c.params, sizeof(float) * (size_t)a.reg.numel) != 0);
    int ones = 1;
    double s2 = 0;
    int64_t nm = 0;
    for (int i = 0; i < a.reg.n; i++) {
        const TensorInfo *t = &a.reg.t[i];
        for (int64_t j = 0; j < t->numel; j++) {
            float v = a.params[t->offset + j];
            if (t->role == ROLE_NORM) ones &= v == 1.0f;
            else s2 += (double)v * v, nm++;
        }
    }
    CHECK(ones);
    double sd = sqrt(s2 / (double)nm);
    CHECK(fabs(sd - 0.02) < 0.001);  // initializer_range of the config
    CHECK(a.hc.base.rope_factor == 8 && strstr(a.source, "random weights"));
    model_free(&b);
    model_free(&c);
    model_free(&a);
}

// Writes every registry tensor of m (as dtype) into an HF directory with config text cfg.
static int write_hf_dir(const char *dir, const char *cfg, const char *mamba_cfg, const LoadedModel *m, DType dt,
                        uint64_t shard_bytes, const char *skip, const char *extra, const char *bad_shape, DlError *e) {
    dl_mkdirs(dir, e);
    char *p = dl_path_join(dir, "config.json");
    write_text(p, cfg);
    free(p);
    if (mamba_cfg) {
        p = dl_path_join(dir, "mamba_config.json");
        write_text(p, mamba_cfg);
        free(p);
    }
    const Registry *r = &m->reg;
    StWriteTensor *t = calloc((size_t)r->n + 1, sizeof *t);
    uint16_t *half = malloc(sizeof(uint16_t) * (size_t)r->numel);
    int64_t (*shapes)[4] = calloc((size_t)r->n + 1, sizeof *shapes);
    int n = 0;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *ti = &r->t[i];
        if (skip && !strcmp(ti->name, skip)) continue;
        memcpy(shapes[n], ti->shape, sizeof ti->shape);
        t[n] = (StWriteTensor){ti->name, dt, ti->ndim, shapes[n], m->params + ti->offset};
        if (bad_shape && !strcmp(ti->name, bad_shape)) shapes[n][0] /= 2;  // half the rows
        if (dt == DT_BF16) {
            for (int64_t j = 0; j < ti->numel; j++) half[ti->offset + j] = f32_to_bf16(m->params[ti->offset + j]);
            t[n].data = half + ti->offset;
        }
        n++;
    }
    if (extra) t[n++] = (StWriteTensor){extra, DT_F32, 1, shapes[0], m->params};
    int rc = st_write_sharded(dir, t, n, shard_bytes, (const char *[]){"format", "pt"}, 1, NULL, e);
    free(shapes);
    free(half);
    free(t);
    return rc;
}

static void test_hf_dirs(void) {
    DlError e;
    size_t len;
    char *cfg = dl_read_file(TINY, &len, &e);
    LoadedModel ref, got;
    CHECK(model_load(TINY, 3, &ref, &e) == 0);
    char dir[300];
    // single F32 file, sharded F32, single BF16
    for (int v = 0; v < 3; v++) {
        snprintf(dir, sizeof dir, "%s/hf%d", tmpdir, v);
        CHECK(write_hf_dir(dir, cfg, NULL, &ref, v == 2 ? DT_BF16 : DT_F32, v == 1 ? 20000 : 1ull << 40, NULL, NULL, NULL, &e) == 0);
        CHECK(model_load(dir, 0, &got, &e) == 0);
        if (!got.params) {
            fprintf(stderr, "  hf%d: %s\n", v, e.msg);
            continue;
        }
        CHECK(got.reg.numel == ref.reg.numel && got.hc.base.rope_factor == 8);
        if (v < 2) CHECK(!memcmp(got.params, ref.params, sizeof(float) * (size_t)ref.reg.numel));
        else {
            int ok = 1;
            for (int64_t i = 0; i < ref.reg.numel; i++) ok &= got.params[i] == bf16_to_f32(f32_to_bf16(ref.params[i]));
            CHECK(ok);
        }
        model_free(&got);
    }
    snprintf(dir, sizeof dir, "%s/hf1/model.safetensors.index.json", tmpdir);
    CHECK(dl_file_exists(dir));  // the sharded case really is sharded
    SafeTensors *st;
    snprintf(dir, sizeof dir, "%s/hf1", tmpdir);
    CHECK(st_open(&st, dir, &e) == 0 && st_shard_count(st) > 2);
    if (st) st_close(st);
    // errors
    snprintf(dir, sizeof dir, "%s/missing", tmpdir);
    write_hf_dir(dir, cfg, NULL, &ref, DT_F32, 1ull << 40, "model.norm.weight", NULL, NULL, &e);
    expect_err(model_load(dir, 0, &got, &e), &e, "tensor 'model.norm.weight' (shape [64]) is missing", "missing tensor");
    snprintf(dir, sizeof dir, "%s/extra", tmpdir);
    write_hf_dir(dir, cfg, NULL, &ref, DT_F32, 1ull << 40, NULL, "model.layers.0.self_attn.rotary_emb.bogus", NULL, &e);
    expect_err(model_load(dir, 0, &got, &e), &e, "unexpected tensor 'model.layers.0.self_attn.rotary_emb.bogus'", "extra tensor");
    snprintf(dir, sizeof dir, "%s/shape", tmpdir);
    write_hf_dir(dir, cfg, NULL, &ref, DT_F32, 1ull << 40, NULL, NULL, "model.layers.2.self_attn.k_proj.weight", &e);
    expect_err(model_load(dir, 0, &got, &e), &e, "'model.layers.2.self_attn.k_proj.weight' has shape [16, 64], expected [32, 64]", "shape mismatch");
    snprintf(dir, sizeof dir, "%s/noconfig", tmpdir);
    dl_mkdirs(dir, &e);
    expect_err(model_load(dir, 0, &got, &e), &e, "no config.json", "no config");

    // MambaInLlama hybrid export: names are the registry's, layout from mamba_config.json
    const char *mcfg = "{\"d_model\":64,\"ssm_cfg\":{\"expand\":1},\"d_inner\":null,\"d_xb\":32,\"n_layer\":4,\"attn_layers\":[1,3]}";
    LoadedModel hyb;
    memset(&hyb, 0, sizeof hyb);
    LlamaConfig c = ref.hc.base;
    int attn[2] = {1, 3};
    CHECK(hybrid_config_init(&hyb.hc, &c, MIXER_MAMBA1, attn, 2, &e) == 0);
    model_build_registry(&hyb.hc, &hyb.reg);
    hyb.params = malloc(sizeof(float) * (size_t)hyb.reg.numel);
    for (int64_t i = 0; i < hyb.reg.numel; i++) hyb.params[i] = (float)((i * 7919) % 1000) * 1e-3f;
    snprintf(dir, sizeof dir, "%s/hybrid", tmpdir);
    CHECK(write_hf_dir(dir, cfg, mcfg, &hyb, DT_F32, 1ull << 40, NULL, NULL, NULL, &e) == 0);
    CHECK(model_load(dir, 0, &got, &e) == 0);
    if (got.params) {
        CHECK(got.hc.mixer[0] == MIXER_MAMBA1 && got.hc.mixer[1] == MIXER_ATTN && got.hc.mixer[2] == MIXER_MAMBA1 && got.hc.mixer[3] == MIXER_ATTN);
        CHECK(got.reg.numel == hyb.reg.numel && reg_find(&got.reg, "model.layers.0.mamba.A_log") >= 0);
        bool same = true;
        for (int i = 0; i < got.reg.n; i++) {
            const TensorInfo *t = &got.reg.t[i];
            same &= !memcmp(got.params + t->offset, hyb.params + hyb.reg.t[i].offset, sizeof(float) * (size_t)t->numel);
        }
        CHECK(same);
        model_free(&got);
    } else fprintf(stderr, "  hybrid: %s\n", e.msg);
    HybridConfig hc;
    CHECK(model_read_config(dir, &hc, &e) == 0 && hybrid_n_attn(&hc) == 2);
    model_free(&hyb);
    model_free(&ref);
    free(cfg);
}

// A llama GGUF written here: Q/K rows permuted as llama.cpp's converter does, one tensor Q8_0.
static int write_gguf(const char *path, const LoadedModel *m, const char *skip, const char *extra, bool bad_shape, DlError *e) {
    const LlamaConfig *c = &m->hc.base;
    GgufWriter *w = gguf_writer_new();
    gguf_w_str(w, "general.architecture", "llama", e);
    gguf_w_u32(w, "llama.block_count", (uint32_t)c->n_layer, e);
    gguf_w_u32(w, "llama.context_length", (uint32_t)c->max_pos, e);
    gguf_w_u32(w, "llama.embedding_length", (uint32_t)c->d_model, e);
    gguf_w_u32(w, "llama.feed_forward_length", (uint32_t)c->d_ff, e);
    gguf_w_u32(w, "llama.attention.head_count", (uint32_t)c->n_head, e);
    gguf_w_u32(w, "llama.attention.head_count_kv", (uint32_t)c->n_kv_head, e);
    gguf_w_f32(w, "llama.rope.freq_base", (float)c->rope_theta, e);
    gguf_w_f32(w, "llama.attention.layer_norm_rms_epsilon", (float)c->rms_eps, e);
    gguf_w_u32(w, "llama.vocab_size", (uint32_t)c->vocab, e);
    gguf_w_u32(w, "tokenizer.ggml.bos_token_id", 1, e);
    gguf_w_u32(w, "tokenizer.ggml.eos_token_id", 2, e);
    float *perm = malloc(sizeof(float) * (size_t)m->reg.numel);
    char gname[128];
    for (int i = 0; i < m->reg.n; i++) {
        const TensorInfo *t = &m->reg.t[i];
        if (skip && !strcmp(t->name, skip)) continue;
        hf_name_to_gguf(t->name, gname, sizeof gname);
        const float *src = m->params + t->offset;
        bool q = strstr(t->name, "q_proj"), k = strstr(t->name, "k_proj");
        if (q || k) {
            rope_permute_rows(src, perm + t->offset, q ? c->n_head : c->n_kv_head, c->head_dim, t->shape[1] * 4);
            src = perm + t->offset;
        }
        int64_t shape[2] = {t->shape[0], t->ndim > 1 ? t->shape[1] : 0};
        if (bad_shape && strstr(t->name, "layers.1.mlp.up_proj")) shape[0] -= 1;
        DType dt = strstr(t->name, "layers.0.mlp.gate_proj") ? DT_Q8_0 : DT_F32;
        gguf_w_tensor_f32(w, gname, dt, t->ndim, shape, src, e);
    }
    if (extra) gguf_w_tensor_f32(w, extra, DT_F32, 1, (int64_t[]){4}, m->params, e);
    int rc = gguf_writer_write(w, path, e);
    gguf_writer_free(w);
    free(perm);
    return rc;
}

static void test_gguf_load(void) {
    DlError e;
    LoadedModel ref, got;
    const char *cfg = "{\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                      "\"num_key_value_heads\":2,\"vocab_size\":96,\"rms_norm_eps\":1e-5,\"rope_theta\":10000,\"max_position_embeddings\":128}";
    char p[300];
    snprintf(p, sizeof p, "%s/small.json", tmpdir);
    write_text(p, cfg);
    CHECK(model_load(p, 11, &ref, &e) == 0);
    snprintf(p, sizeof p, "%s/small.gguf", tmpdir);
    CHECK(write_gguf(p, &ref, NULL, NULL, false, &e) == 0);
    CHECK(model_load(p, 0, &got, &e) == 0);
    if (got.params) {
        const LlamaConfig *c = &got.hc.base;
        CHECK(c->n_layer == 2 && c->d_model == 64 && c->n_head == 4 && c->n_kv_head == 2 && c->vocab == 96 && !c->tied_embeddings &&
              c->bos_id == 1 && c->eos_id == 2 && c->max_pos == 128);
        // everything exact (un-permuted Q/K included) except the Q8_0 tensor, which equals its round trip
        int bad = 0;
        for (int i = 0; i < got.reg.n; i++) {
            const TensorInfo *t = &got.reg.t[i];
            if (strstr(t->name, "layers.0.mlp.gate_proj")) {
                uint8_t *q = malloc((size_t)dtype_nbytes(DT_Q8_0, t->numel));
                float *y = malloc(sizeof(float) * (size_t)t->numel);
                quantize(DT_Q8_0, ref.params + t->offset, q, t->numel);
                dequantize(DT_Q8_0, q, y, t->numel);
                bad += memcmp(y, got.params + t->offset, sizeof(float) * (size_t)t->numel) != 0;
                free(q), free(y);
            } else
                bad += memcmp(ref.params + t->offset, got.params + t->offset, sizeof(float) * (size_t)t->numel) != 0;
        }
        CHECK(bad == 0);
        model_free(&got);
    } else fprintf(stderr, "  gguf: %s\n", e.msg);
    snprintf(p, sizeof p, "%s/missing.gguf", tmpdir);
    write_gguf(p, &ref, "model.layers.1.self_attn.v_proj.weight", NULL, false, &e);
    expect_err(model_load(p, 0, &got, &e), &e, "'blk.1.attn_v.weight' (model.layers.1.self_attn.v_proj.weight, shape [32, 64]) is missing", "gguf missing");
    snprintf(p, sizeof p, "%s/extra.gguf", tmpdir);
    write_gguf(p, &ref, NULL, "blk.7.attn_q.weight", false, &e);
    expect_err(model_load(p, 0, &got, &e), &e, "unexpected tensor 'blk.7.attn_q.weight'", "gguf extra");
    snprintf(p, sizeof p, "%s/shape.gguf", tmpdir);
    write_gguf(p, &ref, NULL, NULL, true, &e);
    expect_err(model_load(p, 0, &got, &e), &e, "'blk.1.ffn_up.weight' has shape [127, 64], expected [128, 64]", "gguf shape");
    model_free(&ref);

    // names both ways
    char out[128];
    CHECK(gguf_name_to_hf("blk.12.ffn_down.weight", out, sizeof out) == 0 && !strcmp(out, "model.layers.12.mlp.down_proj.weight"));
    CHECK(hf_name_to_gguf("model.layers.3.post_attention_layernorm.weight", out, sizeof out) == 0 && !strcmp(out, "blk.3.ffn_norm.weight"));
    CHECK(gguf_name_to_hf("blk.x.attn_q.weight", out, sizeof out) != 0 && gguf_name_to_hf("rope_freqs.weight", out, sizeof out) != 0);
    // permutation: known row mapping for head_dim 4 (HF rows 0,1,2,3 -> GGUF rows 0,2,1,3)
    float src[8] = {0, 1, 2, 3, 4, 5, 6, 7}, dst[8], back[8];
    rope_permute_rows(src, dst, 2, 4, sizeof(float));
    CHECK(dst[0] == 0 && dst[1] == 2 && dst[2] == 1 && dst[3] == 3 && dst[4] == 4 && dst[5] == 6);
    rope_unpermute_rows(dst, back, 2, 4, sizeof(float));
    CHECK(!memcmp(back, src, sizeof src));
}

static void test_teacher(void) {
    const char *path = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!dl_file_exists(path)) {
        printf("teacher not fetched; skipping the teacher checks\n");
        return;
    }
    LoadedModel m;
    DlError e;
    CHECK(model_load(path, 0, &m, &e) == 0);
    if (!m.params) {
        fprintf(stderr, "  teacher: %s\n", e.msg);
        return;
    }
    const LlamaConfig *c = &m.hc.base;
    CHECK(c->n_layer == 30 && c->d_model == 576 && c->n_head == 9 && c->n_kv_head == 3 && c->head_dim == 64 && c->d_ff == 1536 &&
          c->vocab == 49152 && c->tied_embeddings && c->bos_id == 1 && c->eos_id == 2 && c->max_pos == 8192 && c->rope_theta == 100000);
    CHECK(m.reg.n == 272 && reg_params_numel(&m.reg) == 134515008);
    // q_proj of layer 29 is the raw GGUF tensor with rows un-permuted
    GgufFile *g;
    CHECK(gguf_open(&g, path, &e) == 0);
    const GgufTensor *t = gguf_tensor(g, gguf_find_tensor(g, "blk.29.attn_q.weight"));
    float *raw = malloc(sizeof(float) * (size_t)t->numel), *un = malloc(sizeof(float) * (size_t)t->numel);
    dequantize((DType)t->dtype, t->data, raw, t->numel);
    rope_unpermute_rows(raw, un, 9, 64, 576 * 4);
    const TensorInfo *ti = &m.reg.t[reg_find(&m.reg, "model.layers.29.self_attn.q_proj.weight")];
    CHECK(!memcmp(un, m.params + ti->offset, sizeof(float) * (size_t)t->numel));
    CHECK(memcmp(raw, m.params + ti->offset, sizeof(float) * (size_t)t->numel) != 0);
    int finite = 1;
    for (int64_t i = 0; i < m.reg.numel; i++) finite &= isfinite(m.params[i]);
    CHECK(finite);
    free(raw), free(un);
    gguf_close(g);
    model_free(&m);
}

// Runs `distill inspect ARGS`, returns its exit status; stderr goes to a file checked for want.
static int inspect_status(const char *args, const char *want) {
    const char *bin = getenv("DISTILL_BIN");
    if (!bin) return -1;
    char cmd[1024], errf[300];
    snprintf(errf, sizeof errf, "%s/inspect.err", tmpdir);
    snprintf(cmd, sizeof cmd, "%s inspect %s > /dev/null 2> %s", bin, args, errf);
    int st = system(cmd);
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (want) {
        size_t n;
        DlError e;
        char *txt = dl_read_file(errf, &n, &e);
        if (!txt || !strstr(txt, want)) {
            check_fail_++;
            fprintf(stderr, "  inspect %s: stderr '%s' lacks '%s'\n", args, txt ? txt : "", want);
        }
        free(txt);
    }
    return code;
}

static void test_inspect_status(void) {
    if (!getenv("DISTILL_BIN")) {
        printf("DISTILL_BIN not set; skipping the inspect exit-status checks\n");
        return;
    }
    char a[400], p[300];
    CHECK(inspect_status(TINY, NULL) == 0);
    snprintf(a, sizeof a, "%s/small.gguf", tmpdir);
    CHECK(inspect_status(a, NULL) == 0);
    snprintf(a, sizeof a, "%s/hf0", tmpdir);
    CHECK(inspect_status(a, NULL) == 0);
    snprintf(a, sizeof a, "%s/hf1/model.safetensors.index.json", tmpdir);
    CHECK(inspect_status(a, NULL) == 0);
    snprintf(p, sizeof p, "%s/garbage.bin", tmpdir);
    write_text(p, "this is not a model");
    CHECK(inspect_status(p, "not a recognized model file") == 3);
    snprintf(p, sizeof p, "%s/trunc.gguf", tmpdir);
    write_text(p, "GGUF\x03");
    CHECK(inspect_status(p, "truncated") == 3);
    snprintf(p, sizeof p, "%s/bad.safetensors", tmpdir);
    FILE *f = fopen(p, "wb");
    if (f) {
        fwrite("\x05\0\0\0\0\0\0\0{\"a\":", 1, 13, f);
        fclose(f);
    }
    CHECK(inspect_status(p, "not valid JSON") == 3);
    snprintf(p, sizeof p, "%s/bad.json", tmpdir);
    write_text(p, "{\"hidden_size\": 64}");
    CHECK(inspect_status(p, "is missing") == 3);
    snprintf(a, sizeof a, "%s/missing", tmpdir);
    CHECK(inspect_status(a, "model.norm.weight") == 3);
    CHECK(inspect_status("/nonexistent/model.gguf", "no such file") == 3);
    CHECK(inspect_status("", "missing FILE") == 2);
    CHECK(inspect_status("--bogus x", "unknown option") == 2);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/distill_test_model_io_%d", (int)getpid());
    DlError e;
    dl_mkdirs(tmpdir, &e);
    test_configs();
    test_random_init();
    test_hf_dirs();
    test_gguf_load();
    test_teacher();
    test_inspect_status();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    return check_report("test_model_io");
}
