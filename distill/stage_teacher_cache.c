// stage_teacher_cache.c: the `teacher_cache` stage: the teacher's top-k log-probs (and the log of the rest
// mass) for every packed row of a data set's training part, to STAGE_DIR/NAME.cache.h5 (teacher_cache.h).
// Student stages on the same data with teacher_logits = "cache" then train without loading the teacher.
// Interrupted, it starts over (the file is written to a temporary name and renamed when complete).
#include <string.h>

#include "distill/stage_common.h"
#include "distill/teacher_cache.h"

static int run_teacher_cache(RunContext *ctx, const StageSpec *st) {
    const DataSpec *ds = &ctx->recipe->data[st->data_index];
    DlError e;
    char nm[300];
    snprintf(nm, sizeof nm, "%s.cache.h5", ds->name);
    char *out = dl_path_join(ctx->stage_dir, nm), *shard = NULL;
    int rc = DL_EXIT_RUNTIME;
    LoadedModel t;
    memset(&t, 0, sizeof t);
    bool have_t = false;
    if (dl_file_exists(out)) {
        dl_info("%s: %s already complete", st->name, out);
        free(out);
        return DL_EXIT_OK;
    }
    if (stage_data_shard(ctx, st->data_index, SPLIT_TRAIN, &shard, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (stage_load_teacher(ctx, &t, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    have_t = true;
    int k = st->top_k > 0 ? st->top_k : 32;
    if (k > t.hc.base.vocab) k = t.hc.base.vocab;
    int64_t B = st->batch_size > 0 ? st->batch_size : 4;
    double t0 = dl_now();
    int r = tcache_write(out, &t.hc, &t.reg, t.params, shard, B, k, ctx->stop, &e);
    if (r < 0) goto fail;
    if (r == 1) {
        rc = DL_EXIT_INTERRUPTED;
        goto out;
    }
    dl_info("%s: top-%d teacher log-probs of data '%s' -> %s (%.1f s)", st->name, k, ds->name, out, dl_now() - t0);
    rc = DL_EXIT_OK;
    goto out;
fail:
    fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    if (have_t) model_free(&t);
    free(shard);
    free(out);
    return rc;
}

DL_STAGE(stage_teacher_cache_def, {.kind = STAGE_TEACHER_CACHE,
                                   .summary = "the teacher's top-k log-probs per position to HDF5 (offline KL)",
                                   .run = run_teacher_cache})
