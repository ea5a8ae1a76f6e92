// stage_init.c: the `init` stage: the hybrid of the recipe's layout built from the teacher, Mamba layers
// from the attention weights they replace (MambaInLlama init_with_kqvo; mamba_init.h), everything else
// copied. The result is a weights-only checkpoint in the stage directory.
#include <math.h>
#include <string.h>

#include "distill/checkpoint.h"
#include "distill/mamba_init.h"
#include "distill/stage_common.h"

// init_method = "random": the copied projections (x, B, C, out) get nn.Linear's default U(+-1/sqrt(fan_in))
// instead, as an ablation of the attention initialization.
static void randomize_copied(const StageModel *m, uint64_t seed) {
    static const char *const copied[] = {"in_proj_x.weight", "B_proj.weight", "C_proj.weight", "out_proj.weight"};
    for (int i = 0; i < m->reg.n; i++) {
        const TensorInfo *t = &m->reg.t[i];
        if (t->role != ROLE_MAMBA || t->ndim != 2) continue;
        for (size_t k = 0; k < DL_ARRAY_LEN(copied); k++) {
            size_t ln = strlen(t->name), lc = strlen(copied[k]);
            if (ln < lc || strcmp(t->name + ln - lc, copied[k])) continue;
            Rng g;
            rng_init(&g, seed, 0x1a17u + (uint64_t)i);
            double b = 1.0 / sqrt((double)t->shape[1]);
            for (int64_t j = 0; j < t->numel; j++) m->params[t->offset + j] = (float)((2 * rng_uniform_f64(&g) - 1) * b);
        }
    }
}

static int run_init(RunContext *ctx, const StageSpec *st) {
    DlError e;
    char latest[1024];
    if (ctx->resume && checkpoint_find_latest(ctx->stage_dir, latest, sizeof latest, &e) == 1) {
        dl_info("init: already complete (%s)", latest);
        return DL_EXIT_OK;
    }
    LoadedModel t;
    if (stage_load_teacher(ctx, &t, &e)) {
        fprintf(stderr, "distill: error: init: %s\n", e.msg);
        return DL_EXIT_INPUT;
    }
    StageModel m;
    memset(&m, 0, sizeof m);
    int rc = DL_EXIT_RUNTIME;
    if (recipe_stage_layout(ctx->recipe, st, 0, &m.hc, &e)) goto fail;
    model_build_registry(&m.hc, &m.reg);
    m.params = dl_calloc((size_t)m.reg.numel, sizeof(float));
    double t0 = dl_now();
    if (hybrid_init_from_teacher(&m.hc, &m.reg, m.params, &t.hc, &t.reg, t.params, ctx->seed, &e)) goto fail;
    if (st->init_method == INIT_RANDOM) randomize_copied(&m, ctx->seed);
    if (stage_save_model(ctx, ctx->stage_dir, &m, 0, &e)) goto fail;
    dl_info("init: %d of %d layers are Mamba (%s), %lld parameters (teacher %lld), %.1f s", m.hc.base.n_layer - hybrid_n_attn(&m.hc),
            m.hc.base.n_layer, st->init_method == INIT_RANDOM ? "random projections" : "from attention",
            (long long)reg_params_numel(&m.reg), (long long)reg_params_numel(&t.reg), dl_now() - t0);
    rc = DL_EXIT_OK;
    goto out;
fail:
    fprintf(stderr, "distill: error: init: %s\n", e.msg);
out:
    stage_model_free(&m);
    model_free(&t);
    return rc;
}

DL_STAGE(stage_init_def, {.kind = STAGE_INIT, .summary = "hybrid from the teacher: Mamba layers from attention", .run = run_init})
