// test_plan_zero: the --dry-run memory plan's data-parallel terms on CUDA (plan.c) for tests/recipes/good-tiny.toml
// (SmolLM2-135M config, 50% Mamba-1) on run.device = "cuda" with 2 GPUs, ZeRO-0/1/2, layerwise and distill
// stages. What data parallel on CUDA allocates per GPU (train_model.c tm_dp_*, docs/MULTIGPU.md): the fp32 master
// and the gradient buffer whole at every stage (the master pieces are broadcast in fp32; the engine's backward
// writes every trained tensor into one buffer), the AdamW moments 1/G from ZeRO-1 on. So: grads = 4 P_t and
// master = 4 P_t + 4 P_f at ZeRO-0, 1 and 2 alike; adamw(ZeRO-1) = adamw(ZeRO-2) = adamw(ZeRO-0) / 2; and the
// moments of one GPU (ZeRO-0) are 8 P_t. With hardware.stage_grads (or DISTILL_DP_STAGE_GRADS=1) the ZeRO-2 gradient
// term is the staged buffer's (zero_stage_plan): below 4 P_t, at least this rank's half; ZeRO-1 unchanged; a
// teacher-forced layerwise stage keeps whole gradients; the switches' recipe errors.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/plan.h"
#include "distill/recipe.h"
#include "tests/check.h"

// good-tiny on 2 GPUs at ZeRO `zero`, with up to 5 more --set options; errs collects the errors (NULL: printed).
static int load_with(int zero, const char *const *more, int n_more, Recipe *r, RecipeErrors *errs) {
    char z[40];
    snprintf(z, sizeof z, "hardware.zero=%d", zero);
    const char *sets[8] = {"run.device=cuda", "hardware.gpus=2", z};
    for (int i = 0; i < n_more && i < 5; i++) sets[3 + i] = more[i];
    RecipeOptions o = {.dry_run = true};
    RecipeErrors own = {0};
    int rc = recipe_load("tests/recipes/good-tiny.toml", sets, 3 + n_more, &o, r, errs ? errs : &own);
    for (int i = 0; i < own.n; i++) fprintf(stderr, "%s\n", own.msg[i]);
    recipe_errors_free(&own);
    return rc;
}

static int load(int zero, Recipe *r) { return load_with(zero, NULL, 0, r, NULL); }

// The plan's gradient bytes per GPU in the layerwise stage (-1: the recipe did not load); *Pt: trained elements.
static double layerwise_grads(int zero, const char *const *more, int n_more, double *Pt) {
    Recipe r;
    if (load_with(zero, more, n_more, &r, NULL)) return -1;
    double g = -1;
    for (int s = 0; s < r.n_stages; s++) {
        if (r.stages[s].kind != STAGE_LAYERWISE) continue;
        StagePlan q;
        DlError e;
        if (plan_stage(&r, &r.stages[s], 0, &q, &e) == 0) g = q.mem.grads, *Pt = (double)q.params_trainable;
        break;
    }
    recipe_free(&r);
    return g;
}

// The recipe is refused with an error containing `want`.
static bool refused(int zero, const char *const *more, int n_more, const char *want) {
    Recipe r;
    RecipeErrors errs = {0};
    int rc = load_with(zero, more, n_more, &r, &errs);
    bool found = false;
    for (int i = 0; i < errs.n; i++) found |= strstr(errs.msg[i], want) != NULL;
    if (!found)
        for (int i = 0; i < errs.n; i++) fprintf(stderr, "unexpected: %s\n", errs.msg[i]);
    recipe_errors_free(&errs);
    if (rc == 0) recipe_free(&r);
    return rc != 0 && found;
}

int main(void) {
    StagePlan p[3][2];  // [zero][layerwise, distill-like first training stage found]
    int n_train = 0;
    for (int z = 0; z < 3; z++) {
        Recipe r;
        if (load(z, &r)) {
            CHECK(0);
            return check_report("test_plan_zero");
        }
        int k = 0;
        for (int s = 0; s < r.n_stages && k < 2; s++) {
            if (r.stages[s].kind != STAGE_LAYERWISE && r.stages[s].kind != STAGE_DISTILL) continue;
            DlError e;
            CHECK(plan_stage(&r, &r.stages[s], 0, &p[z][k], &e) == 0);
            k++;
        }
        n_train = k;
        recipe_free(&r);
    }
    CHECK(n_train >= 1);
    for (int k = 0; k < n_train; k++) {
        const double Pt = (double)p[0][k].params_trainable;
        CHECK(Pt > 0);
        const MemEstimate *m0 = &p[0][k].mem, *m1 = &p[1][k].mem, *m2 = &p[2][k].mem;
        CHECK(m0->grads == 4 * Pt && m1->grads == 4 * Pt && m2->grads == 4 * Pt);
        CHECK(m0->master == m1->master && m1->master == m2->master && m0->master >= 4 * Pt);
        CHECK(m0->optim == 8 * Pt);
        CHECK(m1->optim == m0->optim / 2 && m2->optim == m0->optim / 2);
        CHECK(fabs(m0->total - m1->total - m0->optim / 2) <= 1e-6 * m0->total);
        printf("stage %d: %.0f trained; per GPU grads %.1f MB at ZeRO-0/1/2, master %.1f MB, AdamW %.1f / %.1f / %.1f MB\n", k,
               Pt, m2->grads / 1e6, m2->master / 1e6, m0->optim / 1e6, m1->optim / 1e6, m2->optim / 1e6);
    }
    // ZeRO-2 staged gradients (recipe hardware.stage_grads, or DISTILL_DP_STAGE_GRADS=1/0, read by the plan as by
    // the run): the plan counts less than the whole buffer but at least this rank's half; ZeRO-1 is unaffected
    double Pt = 0;
    const char *key[] = {"hardware.stage_grads=true"};
    const double keyed = layerwise_grads(2, key, 1, &Pt);
    CHECK(keyed < 4 * Pt && keyed >= 2 * Pt);
    printf("ZeRO-2 staged (2 GPUs): grads %.1f MB per GPU instead of %.1f\n", keyed / 1e6, 4 * Pt / 1e6);
    CHECK(layerwise_grads(2, NULL, 0, &Pt) == 4 * Pt);  // off by default
    setenv("DISTILL_DP_STAGE_GRADS", "1", 1);
    CHECK(layerwise_grads(2, NULL, 0, &Pt) == keyed);  // the variable turns it on
    CHECK(layerwise_grads(1, NULL, 0, &Pt) == 4 * Pt);  // (ZeRO-1: nothing to stage)
    setenv("DISTILL_DP_STAGE_GRADS", "0", 1);
    CHECK(layerwise_grads(2, key, 1, &Pt) == 4 * Pt);  // ... or off
    unsetenv("DISTILL_DP_STAGE_GRADS");
    // a teacher-forced layerwise stage (MSE alone) keeps whole gradients, as the run does (train_loop.c)
    const char *forced[] = {"hardware.stage_grads=true", "stage.layerwise.loss.ce=0", "stage.layerwise.loss.kl=0",
                            "stage.layerwise.loss.mse=1"};
    CHECK(layerwise_grads(2, forced, 4, &Pt) == 4 * Pt);
    // the switches' recipe checks
    CHECK(refused(1, key, 1, "needs hardware.zero = 2 and run.device = \"cuda\" (got zero = 1"));
    const char *cpu_overlap[] = {"hardware.overlap=true", "run.device=cpu"};
    CHECK(refused(2, cpu_overlap, 2, "hardware.overlap = true overlaps"));
    return check_report("test_plan_zero");
}
