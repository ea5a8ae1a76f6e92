// test_export.c: MambaInLlama HF export read back by model_load: configs and weights bitwise (f32), bf16
// rounding, sharding with an index, replacing an existing export, a teacher (no mamba_config.json),
// Mamba-2 configs. With --fixture DIR it writes an export of a tiny hybrid plus tokens and the engine's
// logits for tests/py/test_export_reader.py (an independent PyTorch forward).
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/export.h"
#include "distill/model_io.h"
#include "tests/check.h"
#include "tests/tiny_model.h"

static bool same_config(const HybridConfig *a, const HybridConfig *b) {
    const LlamaConfig *x = &a->base, *y = &b->base;
    bool ok = x->n_layer == y->n_layer && x->d_model == y->d_model && x->n_head == y->n_head &&
              x->n_kv_head == y->n_kv_head && x->head_dim == y->head_dim && x->d_ff == y->d_ff && x->vocab == y->vocab &&
              x->max_pos == y->max_pos && x->rope_theta == y->rope_theta && x->rms_eps == y->rms_eps &&
              x->tied_embeddings == y->tied_embeddings && x->rope_factor == y->rope_factor;
    for (int l = 0; ok && l < x->n_layer; l++) ok = a->mixer[l] == b->mixer[l];
    return ok && a->d_inner == b->d_inner && a->d_xb == b->d_xb && a->d_state == b->d_state;
}

// Every tensor of m equals the reference after the dtype's rounding.
static bool same_weights(const TinyModel *m, const LoadedModel *lm, DType dt) {
    if (lm->reg.n != m->r.n) return false;
    for (int i = 0; i < m->r.n; i++) {
        const TensorInfo *t = &m->r.t[i];
        int j = reg_find(&lm->reg, t->name);
        if (j < 0 || lm->reg.t[j].numel != t->numel) return false;
        const float *a = m->p + t->offset, *b = lm->params + lm->reg.t[j].offset;
        for (int64_t k = 0; k < t->numel; k++) {
            float want = dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(a[k])) : dt == DT_F16 ? f16_to_f32(f32_to_f16(a[k])) : a[k];
            if (memcmp(&want, &b[k], 4)) return false;
        }
    }
    return true;
}

static int fixture(const char *dir) {
    TinyModel t, s;
    tiny_teacher(&t, 3, false, 21);
    int attn[1] = {1};
    tiny_hybrid(&s, &t, attn, 1, 22);
    // train-like perturbation so no tensor is a plain copy of its init
    Rng g;
    rng_init(&g, 3, 0);
    for (int64_t i = 0; i < s.r.numel; i++) s.p[i] += (float)(0.01 * rng_normal(&g));
    DlError e;
    char *ex = dl_path_join(dir, "export");
    ExportOptions o = {.dtype = DT_F32};
    if (export_hf(ex, &s.h, &s.r, s.p, &o, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    const int64_t B = 2, T = 12;
    int32_t tokens[24];
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)rng_below(&g, (uint64_t)t.h.base.vocab);
    Engine *en = engine_new(&s.h, &s.r, s.p, B, T, 0, &e);
    if (!en) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    engine_forward(en, tokens, NULL);
    const int64_t V = s.h.base.vocab;
    float *logits = malloc((size_t)(B * T * V) * 4);
    engine_logits(en, 0, B * T, logits);
    char *p = dl_path_join(dir, "tokens.i32");
    FILE *f = fopen(p, "wb");
    fwrite(tokens, 4, (size_t)(B * T), f);
    fclose(f);
    free(p);
    p = dl_path_join(dir, "logits.f32");
    f = fopen(p, "wb");
    fwrite(logits, 4, (size_t)(B * T * V), f);
    fclose(f);
    free(p);
    p = dl_path_join(dir, "shape.txt");
    f = fopen(p, "w");
    fprintf(f, "%lld %lld %lld\n", (long long)B, (long long)T, (long long)V);
    fclose(f);
    free(p);
    engine_free(en);
    free(logits);
    free(ex);
    tiny_free(&s);
    tiny_free(&t);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--fixture")) return fixture(argv[2]);
    char dir[] = "/tmp/distill_test_export_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    TinyModel t, s;
    tiny_teacher(&t, 4, false, 1);
    int attn[2] = {1, 3};
    tiny_hybrid(&s, &t, attn, 2, 2);
    DlError e;
    char *ex = dl_path_join(dir, "export");
    ExportOptions o = {.dtype = DT_F32, .name_or_path = "checkpoints/teachers/x.gguf"};
    CHECK(export_hf(ex, &s.h, &s.r, s.p, &o, &e) == 0);
    {
        char *p = dl_path_join(ex, "model.safetensors");
        CHECK(dl_file_exists(p));
        free(p);
        p = dl_path_join(ex, "mamba_config.json");
        size_t len;
        char *txt = dl_read_file(p, &len, &e);
        CHECK(txt && strstr(txt, "\"attn_layers\"") && strstr(txt, "\"d_xb\":\t16") && strstr(txt, "\"expand\":\t1"));
        free(txt);
        free(p);
    }
    LoadedModel lm;
    int rc = model_load(ex, 0, &lm, &e);
    if (rc) fprintf(stderr, "%s\n", e.msg);
    CHECK(rc == 0);
    if (!rc) {
        CHECK(same_config(&s.h, &lm.hc));
        CHECK(same_weights(&s, &lm, DT_F32));
        CHECK(reg_find(&lm.reg, "lm_head.weight") >= 0);
        model_free(&lm);
    }
    // bf16, sharded into many files, replacing the previous export
    o.dtype = DT_BF16;
    o.max_shard_bytes = 16 << 10;
    CHECK(export_hf(ex, &s.h, &s.r, s.p, &o, &e) == 0);
    {
        char *p = dl_path_join(ex, "model.safetensors.index.json"), *q = dl_path_join(ex, "model.safetensors");
        CHECK(dl_file_exists(p) && !dl_file_exists(q));
        free(p), free(q);
        char cmd[300];
        snprintf(cmd, sizeof cmd, "ls %s | grep -c '^model-0.*safetensors$' | grep -qv '^[01]$'", ex);
        CHECK(system(cmd) == 0);  // several shards
        snprintf(cmd, sizeof cmd, "ls -d %s/export.* 2>/dev/null | grep -q .", dir);
        CHECK(system(cmd) != 0);  // no .tmp/.old leftovers
        char *cfg = dl_path_join(ex, "config.json");
        size_t len;
        char *txt = dl_read_file(cfg, &len, &e);
        CHECK(txt && strstr(txt, "bfloat16") && strstr(txt, "checkpoints/teachers/x.gguf"));
        free(txt), free(cfg);
    }
    rc = model_load(ex, 0, &lm, &e);
    if (rc) fprintf(stderr, "%s\n", e.msg);
    CHECK(rc == 0);
    if (!rc) {
        CHECK(same_config(&s.h, &lm.hc));
        CHECK(same_weights(&s, &lm, DT_BF16));
        model_free(&lm);
    }
    // a (tied) teacher: plain Llama export, no mamba_config.json, no lm_head
    TinyModel tt;
    tiny_teacher(&tt, 2, true, 3);
    char *ex2 = dl_path_join(dir, "teacher");
    o = (ExportOptions){.dtype = DT_F16};
    CHECK(export_hf(ex2, &tt.h, &tt.r, tt.p, &o, &e) == 0);
    {
        char *p = dl_path_join(ex2, "mamba_config.json");
        CHECK(!dl_file_exists(p));
        free(p);
    }
    rc = model_load(ex2, 0, &lm, &e);
    CHECK(rc == 0);
    if (!rc) {
        CHECK(same_config(&tt.h, &lm.hc) && hybrid_n_attn(&lm.hc) == 2);
        CHECK(same_weights(&tt, &lm, DT_F16));
        CHECK(reg_find(&lm.reg, "lm_head.weight") < 0);
        model_free(&lm);
    }
    // Mamba-2 hybrid: the config round trip (ngroups, d_state = head_dim)
    HybridConfig h2;
    CHECK(hybrid_config_init(&h2, &t.h.base, MIXER_MAMBA2, attn, 2, &e) == 0);
    Registry r2;
    model_build_registry(&h2, &r2);
    float *p2 = calloc((size_t)r2.numel, 4);
    char *ex3 = dl_path_join(dir, "m2");
    o = (ExportOptions){.dtype = DT_F32};
    CHECK(export_hf(ex3, &h2, &r2, p2, &o, &e) == 0);
    HybridConfig back;
    CHECK(model_read_config(ex3, &back, &e) == 0 && same_config(&h2, &back));
    // a failed export (bad dtype) leaves nothing behind and keeps the previous export
    o.dtype = DT_Q4_0;
    CHECK(export_hf(ex3, &h2, &r2, p2, &o, &e) == -1 && strstr(e.msg, "dtype"));
    CHECK(model_read_config(ex3, &back, &e) == 0);

    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(ex), free(ex2), free(ex3), free(p2);
    reg_free(&r2);
    tiny_free(&s), tiny_free(&t), tiny_free(&tt);
    return check_report("test_export");
}
