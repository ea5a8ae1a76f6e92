// stage_export.c: the `export` stage: the newest model of the run (the last model-producing stage before
// this one) in MambaInLlama's HF format (export.h), in export_dir or RUN_DIR/export.
#include <string.h>

#include "distill/export.h"
#include "distill/stage_common.h"

static int run_export(RunContext *ctx, const StageSpec *st) {
    DlError e;
    StageModel m;
    char from[1100];
    if (stage_load_input_model(ctx, &m, from, sizeof from, &e)) {
        fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
        return DL_EXIT_INPUT;
    }
    char *dir = st->export_dir ? dl_strdup(st->export_dir) : dl_path_join(ctx->run_dir, "export");
    ExportOptions o = {.dtype = st->export_dtype == EXPORT_F32 ? DT_F32 : st->export_dtype == EXPORT_F16 ? DT_F16 : DT_BF16,
                       .max_shard_bytes = (uint64_t)st->shard_mb << 20, .name_or_path = ctx->recipe->teacher.path};
    double t0 = dl_now();
    int rc = export_hf(dir, &m.hc, &m.reg, m.params, &o, &e);
    if (rc) fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
    else
        dl_info("export: %s -> %s (%s, %d of %d layers attention, %.1f s)", from, dir, dtype_name(o.dtype),
                hybrid_n_attn(&m.hc), m.hc.base.n_layer, dl_now() - t0);
    free(dir);
    stage_model_free(&m);
    return rc ? DL_EXIT_RUNTIME : DL_EXIT_OK;
}

DL_STAGE(stage_export_def, {.kind = STAGE_EXPORT, .summary = "MambaInLlama HF export (config.json, mamba_config.json, safetensors)",
                            .run = run_export})
