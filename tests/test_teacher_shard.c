// test_teacher_shard: the sharded teacher's arithmetic (distill/teacher_shard.h) with simulated ranks, on the CPU.
//   1. Plans over real teacher registries (tiny tied / untied, odd sizes, SmolLM2-135M, Llama-3-8B shapes) for
//      worlds 1-8: each layer's span is its tensors exactly; pieces are 16-element aligned, minimal, in rank order,
//      disjoint and cover the span; tshard_owner / tshard_layer_of agree with the ranges; the buffers' offsets and
//      the gather-buffer size follow; the global tensors (and only they) are kept whole, compact.
//   2. Simulated ranks: each packs its pieces from random fp32 weights (poisoned output buffers); the host all-gather
//      of every layer rebuilds the layer's span bitwise, the padding is zeros, every element of every layer tensor
//      is kept by exactly one rank; uneven splits occur and are covered.
//   3. Bytes per GPU (tshard_bytes) against a count made here; the 8B figures.
//   4. Errors: world 0, a global tensor inside a layer's span, a tensor of a layer past n_layer, a layer without
//      tensors.
//   5. The --dry-run plan (plan.c) counts hardware.teacher = "sharded" as this arithmetic says; recipe errors.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "distill/model.h"
#include "distill/plan.h"
#include "distill/recipe.h"
#include "distill/registry.h"
#include "distill/rng.h"
#include "distill/teacher_shard.h"
#include "tests/check.h"

static void cfg(LlamaConfig *c, int L, int d, int H, int KV, int hd, int ff, int V, bool tied) {
    memset(c, 0, sizeof *c);
    c->n_layer = L, c->d_model = d, c->n_head = H, c->n_kv_head = KV, c->head_dim = hd, c->d_ff = ff, c->vocab = V;
    c->max_pos = 128, c->rope_theta = 10000, c->rms_eps = 1e-5, c->tied_embeddings = tied, c->bos_id = c->eos_id = -1;
}

static int64_t up16(int64_t x) { return (x + 15) / 16 * 16; }

// 1. the layout invariants of one plan
static void check_plan(const Registry *r, int L, int W, const char *name) {
    TShardPlan p;
    DlError e;
    int rc = tshard_plan(&p, r, L, W, &e);
    CHECK(rc == 0);
    if (rc) {
        fprintf(stderr, "%s W=%d: %s\n", name, W, e.msg);
        return;
    }
    int64_t off = 0, slot = 0;
    bool ok = true;
    for (int l = 0; l < L; l++) {
        const TShardLayer *S = &p.layer[l];
        // the span is exactly the layer's tensors (min offset, aligned max end)
        int64_t lo = INT64_MAX, hi = 0;
        for (int i = 0; i < r->n; i++)
            if (r->t[i].layer == l) {
                lo = DL_MIN(lo, r->t[i].offset);
                hi = DL_MAX(hi, up16(r->t[i].offset + r->t[i].numel));
            }
        ok &= S->lo == lo && S->hi == hi && lo % 16 == 0;
        const int64_t span = hi - lo;
        ok &= S->shard % 16 == 0 && W * S->shard >= span && W * (S->shard - 16) < span;  // aligned and minimal
        ok &= S->off == off;
        off += S->shard;
        slot = DL_MAX(slot, W * S->shard);
        int64_t prev = lo;
        for (int q = 0; q < W; q++) {
            int64_t b, en;
            tshard_range(&p, l, q, &b, &en);
            ok &= b == DL_MIN(lo + q * S->shard, hi) && en >= b && en - b <= S->shard && b == prev;  // in rank order
            prev = en;
            if (en > b) ok &= tshard_owner(&p, l, b) == q && tshard_owner(&p, l, en - 1) == q;
            if (en > b) ok &= tshard_layer_of(&p, b) == l && tshard_layer_of(&p, en - 1) == l;
        }
        ok &= prev == hi;  // covered
    }
    ok &= p.shard_total == off && p.slot == slot && p.n_slots == (L > 1 ? 2 : 1) && p.numel == r->numel;
    // globals: exactly the layer -1 tensors, compact and aligned, in registry order
    int ng = 0;
    int64_t gn = 0;
    for (int i = 0; i < r->n; i++)
        if (r->t[i].layer < 0) {
            ok &= ng < p.n_global && p.global[ng] == i && p.global_off[ng] == gn;
            ok &= tshard_layer_of(&p, r->t[i].offset) == -1;
            gn += up16(r->t[i].numel);
            ng++;
        }
    ok &= ng == p.n_global && gn == p.global_numel;
    if (!ok) fprintf(stderr, "%s W=%d: layout invariants broken\n", name, W);
    CHECK(ok);
    tshard_plan_free(&p);
}

// 2. simulated ranks: pack, gather, compare bitwise; returns the number of layers with padding (uneven splits)
static int check_ranks(const Registry *r, int L, int W, uint64_t seed) {
    TShardPlan p;
    DlError e;
    if (tshard_plan(&p, r, L, W, &e)) {
        CHECK(0);
        return 0;
    }
    float *params = malloc((size_t)r->numel * sizeof(float));
    Rng g;
    rng_init(&g, seed, 0);
    for (int64_t i = 0; i < r->numel; i++) params[i] = rng_normal(&g);
    float **sh = malloc((size_t)W * sizeof(float *));
    for (int q = 0; q < W; q++) {
        sh[q] = malloc((size_t)p.shard_total * sizeof(float));
        for (int64_t i = 0; i < p.shard_total; i++) sh[q][i] = NAN;  // poison: the pack must write every element
        tshard_pack(&p, q, params, sh[q]);
    }
    uint8_t *kept = calloc((size_t)r->numel, 1);
    float *slot = malloc((size_t)p.slot * sizeof(float));
    bool bitwise = true, pad_zero = true, no_nan = true;
    int padded = 0;
    for (int l = 0; l < L; l++) {
        const TShardLayer *S = &p.layer[l];
        for (int64_t i = 0; i < p.slot; i++) slot[i] = NAN;
        tshard_gather_host(&p, l, (const float *const *)sh, slot);
        const int64_t span = S->hi - S->lo;
        bitwise &= memcmp(slot, params + S->lo, (size_t)span * sizeof(float)) == 0;
        for (int64_t j = span; j < W * S->shard; j++) pad_zero &= slot[j] == 0 && !signbit(slot[j]);
        padded += W * S->shard > span;
        for (int q = 0; q < W; q++) {
            int64_t b, en;
            tshard_range(&p, l, q, &b, &en);
            for (int64_t x = b; x < en; x++) kept[x]++;
            for (int64_t i = 0; i < S->shard; i++) no_nan &= !isnan(sh[q][S->off + i]);
        }
    }
    bool once = true;
    for (int i = 0; i < r->n; i++)
        for (int64_t x = r->t[i].offset; x < r->t[i].offset + r->t[i].numel; x++)
            once &= r->t[i].layer < 0 ? kept[x] == 0 : kept[x] == 1;
    CHECK(bitwise);
    CHECK(pad_zero);
    CHECK(no_nan);
    CHECK(once);
    // the globals' compact copy
    float *gl = malloc((size_t)DL_MAX(p.global_numel, 1) * sizeof(float));
    tshard_pack_globals(&p, r, params, gl);
    bool gok = true;
    for (int k = 0; k < p.n_global; k++) {
        const TensorInfo *t = &r->t[p.global[k]];
        gok &= memcmp(gl + p.global_off[k], params + t->offset, (size_t)t->numel * sizeof(float)) == 0;
    }
    CHECK(gok);
    free(gl);
    free(slot);
    free(kept);
    for (int q = 0; q < W; q++) free(sh[q]);
    free(sh);
    free(params);
    tshard_plan_free(&p);
    return padded;
}

// 3. bytes against a count made here
static void check_bytes(const Registry *r, int L, int W, TShardBytes *out) {
    TShardPlan p;
    DlError e;
    if (tshard_plan(&p, r, L, W, &e)) {
        CHECK(0);
        return;
    }
    double sh = 0, mx = 0, gl = 0;
    for (int l = 0; l < L; l++) {
        const int64_t span = p.layer[l].hi - p.layer[l].lo, s = up16((span + W - 1) / W);
        sh += (double)s;
        mx = fmax(mx, (double)(W * s));
    }
    for (int i = 0; i < r->n; i++)
        if (r->t[i].layer < 0) gl += (double)up16(r->t[i].numel);
    TShardBytes b;
    tshard_bytes(&p, 2, &b);
    CHECK(b.shards == 2 * sh && b.slots == 2 * (L > 1 ? 2 : 1) * mx && b.globals == 2 * gl);
    CHECK(b.total == b.shards + b.slots + b.globals && b.replicated == 2.0 * (double)r->numel);
    if (out) *out = b;
    tshard_plan_free(&p);
}

static void errors(void) {
    DlError e;
    TShardPlan p;
    Registry r;
    LlamaConfig c;
    HybridConfig h;
    cfg(&c, 2, 32, 4, 2, 8, 48, 37, true);
    hybrid_config_teacher(&h, &c);
    model_build_registry(&h, &r);
    CHECK(tshard_plan(&p, &r, 2, 0, &e) == -1 && strstr(e.msg, "world size 0"));
    CHECK(tshard_plan(&p, &r, 1, 2, &e) == -1 && strstr(e.msg, "layer 1 outside 0..0"));  // a tensor past n_layer
    CHECK(tshard_plan(&p, &r, 3, 2, &e) == -1 && strstr(e.msg, "layer 2 has no tensors"));
    reg_free(&r);
    // a global tensor between two tensors of layer 0
    reg_init(&r);
    reg_add(&r, "a.weight", ROLE_MLP, 0, 1, (const int64_t[]){40});
    reg_add(&r, "g.weight", ROLE_NORM, -1, 1, (const int64_t[]){8});
    reg_add(&r, "b.weight", ROLE_MLP, 0, 1, (const int64_t[]){40});
    CHECK(tshard_plan(&p, &r, 1, 2, &e) == -1 && strstr(e.msg, "g.weight") && strstr(e.msg, "inside layer 0"));
    reg_free(&r);
}

// 5. the --dry-run plan with hardware.teacher
static int load(const char *const *sets, int n, Recipe *r, RecipeErrors *errs) {
    RecipeOptions o = {.dry_run = true};
    return recipe_load("tests/recipes/good-tiny.toml", sets, n, &o, r, errs);
}

static void plan_terms(void) {
    double frozen[2][3] = {{0}};  // [replicated, sharded][gpus 1, 2, 4]
    const int gpus[3] = {1, 2, 4};
    for (int s = 0; s < 2; s++)
        for (int k = 0; k < 3; k++) {
            char g[40];
            snprintf(g, sizeof g, "hardware.gpus=%d", gpus[k]);
            const char *sets[] = {"run.device=cuda", g, s ? "hardware.teacher=sharded" : "hardware.teacher=replicated"};
            Recipe r;
            RecipeErrors errs = {0};
            int rc = load(sets, 3, &r, &errs);
            for (int i = 0; i < errs.n; i++) fprintf(stderr, "%s\n", errs.msg[i]);
            recipe_errors_free(&errs);
            CHECK(rc == 0);
            if (rc) continue;
            CHECK(r.hardware.teacher_sharded == (s == 1));
            if (k == 0) {  // the resolved recipe (compared on --resume) carries the key as given
                char *txt = NULL;
                size_t len = 0;
                FILE *f = open_memstream(&txt, &len);
                recipe_write_resolved(&r, f);
                fclose(f);
                CHECK(strstr(txt, s ? "teacher = \"sharded\"" : "teacher = \"replicated\"") != NULL);
                free(txt);
            }
            for (int i = 0; i < r.n_stages; i++) {
                if (r.stages[i].kind != STAGE_LAYERWISE) continue;
                StagePlan sp;
                DlError e;
                CHECK(plan_stage(&r, &r.stages[i], 0, &sp, &e) == 0);
                frozen[s][k] = sp.mem.frozen_model;
                // the same arithmetic, directly
                HybridConfig t;
                Registry treg;
                hybrid_config_teacher(&t, &r.teacher_cfg.base);
                model_build_registry(&t, &treg);
                TShardPlan tp;
                TShardBytes tb;
                CHECK(tshard_plan(&tp, &treg, t.base.n_layer, gpus[k], &e) == 0);
                tshard_bytes(&tp, 2, &tb);
                if (s) CHECK(sp.mem.frozen_model == tb.total);
                else CHECK(sp.mem.frozen_model == 2.0 * (double)reg_params_numel(&treg));
                tshard_plan_free(&tp);
                reg_free(&treg);
                break;
            }
            recipe_free(&r);
        }
    printf("plan (SmolLM2-135M teacher, layerwise): frozen teacher per GPU replicated %.1f MB; sharded over 1 / 2 / 4 "
           "GPUs %.1f / %.1f / %.1f MB\n", frozen[0][1] / 1e6, frozen[1][0] / 1e6, frozen[1][1] / 1e6, frozen[1][2] / 1e6);
    CHECK(frozen[0][0] > 0 && frozen[0][0] == frozen[0][1] && frozen[0][1] == frozen[0][2]);
    CHECK(frozen[1][0] > frozen[0][0]);                  // one GPU: the whole teacher plus two gather buffers
    CHECK(frozen[1][1] < frozen[0][1] && frozen[1][2] < frozen[1][1]);
    {  // without the key, the resolved recipe is what it was before the key existed (older runs resume)
        const char *sets[] = {"run.device=cuda"};
        Recipe r;
        RecipeErrors errs = {0};
        if (load(sets, 1, &r, &errs) == 0) {
            char *txt = NULL;
            size_t len = 0;
            FILE *f = open_memstream(&txt, &len);
            recipe_write_resolved(&r, f);
            fclose(f);
            const char *hw = strstr(txt, "[hardware]");
            CHECK(hw && !strstr(hw, "\nteacher = ") && !r.hardware.teacher_sharded);
            free(txt);
            recipe_free(&r);
        } else CHECK(0);
        recipe_errors_free(&errs);
    }
    // recipe errors: a bad value, and sharded on the CPU
    const char *bad[][2] = {{"run.device=cuda", "hardware.teacher=halved"}, {"run.device=cpu", "hardware.teacher=sharded"}};
    const char *want[] = {"expected \"replicated\" or \"sharded\"", "needs run.device = \"cuda\""};
    for (int k = 0; k < 2; k++) {
        Recipe r;
        RecipeErrors errs = {0};
        int rc = load(bad[k], 2, &r, &errs);
        bool found = false;
        for (int i = 0; i < errs.n; i++) found |= strstr(errs.msg[i], want[k]) != NULL;
        if (!found)
            for (int i = 0; i < errs.n; i++) fprintf(stderr, "unexpected: %s\n", errs.msg[i]);
        CHECK(rc != 0 && found);
        recipe_errors_free(&errs);
        if (rc == 0) recipe_free(&r);
    }
}

int main(void) {
    struct {
        const char *name;
        LlamaConfig c;
    } m[5];
    cfg(&m[0].c, 3, 32, 4, 2, 8, 48, 37, true), m[0].name = "tiny tied";
    cfg(&m[1].c, 4, 40, 5, 1, 8, 72, 53, false), m[1].name = "tiny untied, odd sizes";
    cfg(&m[2].c, 1, 24, 3, 3, 8, 40, 11, false), m[2].name = "one layer";
    cfg(&m[3].c, 30, 576, 9, 3, 64, 1536, 49152, true), m[3].name = "SmolLM2-135M";
    cfg(&m[4].c, 32, 4096, 32, 8, 128, 14336, 128256, false), m[4].name = "Llama-3-8B";
    const int worlds[] = {1, 2, 3, 4, 5, 7, 8};
    int padded = 0;
    for (int k = 0; k < 5; k++) {
        HybridConfig h;
        Registry r;
        hybrid_config_teacher(&h, &m[k].c);
        model_build_registry(&h, &r);
        for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
            check_plan(&r, m[k].c.n_layer, worlds[w], m[k].name);
            if (k < 3) padded += check_ranks(&r, m[k].c.n_layer, worlds[w], 1000 + 10 * k + worlds[w]);
            check_bytes(&r, m[k].c.n_layer, worlds[w], NULL);
        }
        if (k == 4) {
            TShardBytes b1, b2, b4, b8;
            check_bytes(&r, 32, 1, &b1);
            check_bytes(&r, 32, 2, &b2);
            check_bytes(&r, 32, 4, &b4);
            check_bytes(&r, 32, 8, &b8);
            printf("Llama-3-8B teacher per GPU (bf16): replicated %.2f GB; sharded over 1 GPU %.2f GB, over 2 GPUs %.2f GB "
                   "(pieces %.2f, 2 layer buffers %.2f, globals %.2f), over 4 GPUs %.2f GB, over 8 GPUs %.2f GB\n",
                   b2.replicated / 1e9, b1.total / 1e9, b2.total / 1e9, b2.shards / 1e9, b2.slots / 1e9, b2.globals / 1e9,
                   b4.total / 1e9, b8.total / 1e9);
            CHECK(b1.total > b1.replicated);                 // one GPU: no saving
            // the layers' pieces are 1/world of the layers (plus at most 16 elements of padding per layer and rank)
            CHECK(b2.shards * 2 >= b2.replicated - b2.globals && b2.shards * 2 <= b2.replicated - b2.globals + 2 * 2 * 16 * 32 * 2);
            CHECK(b8.shards * 8 >= b8.replicated - b8.globals && b8.shards * 8 <= b8.replicated - b8.globals + 2 * 8 * 16 * 32 * 2);
            CHECK(b8.total < b2.total && b2.total < b2.replicated);
            CHECK(b2.globals == 2.0 * (2.0 * 128256 * 4096 + 4096));
        }
        reg_free(&r);
    }
    printf("uneven splits (zero padding) in %d simulated layer gathers\n", padded);
    CHECK(padded > 10);
    errors();
    plan_terms();
    return check_report("test_teacher_shard");
}
