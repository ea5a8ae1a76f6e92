// stage.c: the table of stage implementations (see stage.h).
#include "distill/stage.h"

#include <stdio.h>

static const StageDef *g_stages[STAGE_KIND_COUNT];

void dl_register_stage(const StageDef *def) {
    if ((unsigned)def->kind >= STAGE_KIND_COUNT || !def->run)
        dl_die(DL_EXIT_RUNTIME, "dl_register_stage: bad stage definition (kind %d)", (int)def->kind);
    if (g_stages[def->kind])
        dl_die(DL_EXIT_RUNTIME, "stage kind '%s' is registered twice", stage_kind_name(def->kind));
    g_stages[def->kind] = def;
}

const StageDef *dl_find_stage(StageKind kind) {
    return (unsigned)kind < STAGE_KIND_COUNT ? g_stages[kind] : NULL;
}

const StageDef *dl_override_stage(const StageDef *def) {
    if ((unsigned)def->kind >= STAGE_KIND_COUNT || !def->run)
        dl_die(DL_EXIT_RUNTIME, "dl_override_stage: bad stage definition (kind %d)", (int)def->kind);
    const StageDef *old = g_stages[def->kind];
    g_stages[def->kind] = def;
    return old;
}

char *run_stage_dir(const RunContext *ctx, int stage_index) {
    const StageSpec *st = &ctx->recipe->stages[stage_index];
    char leaf[160];
    snprintf(leaf, sizeof leaf, "%02d-%s", stage_index + 1, st->name);
    return dl_path_join(ctx->run_dir, leaf);
}

bool run_should_stop(const RunContext *ctx) { return ctx->stop && *ctx->stop; }
