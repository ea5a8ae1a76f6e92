// stage_eval.c: the `eval` stage: the newest model of the run against the teacher on the held-out part of
// each eval data set (the whole set when holdout = 0): perplexity, KL(teacher||student), top-1 agreement,
// accuracy, each with its ratio to the teacher (eval.h). When the run has an init stage, its untrained
// hybrid is evaluated too, to show what training bought. Writes STAGE_DIR/eval.json and RUN_DIR/eval.json
// and prints the table on stdout. With choice = ["file.jsonl", ...], also the multiple-choice accuracy of the
// teacher, the student and the init (eval_choice.h), under the key "choice" of eval.json.
#include <string.h>

#include "distill/checkpoint.h"
#include "distill/eval.h"
#include "distill/eval_choice.h"
#include "distill/stage_common.h"

static int run_eval(RunContext *ctx, const StageSpec *st) {
    const Recipe *rec = ctx->recipe;
    DlError e;
    int rc = DL_EXIT_RUNTIME;
    StageModel m, init;
    memset(&m, 0, sizeof m);
    memset(&init, 0, sizeof init);
    LoadedModel t;
    memset(&t, 0, sizeof t);
    bool have_t = false, have_init = false;
    EvalResult *res = dl_calloc((size_t)(2 * st->n_eval_sets + 1), sizeof *res);
    int nres = 0;
    char from[1100], init_path[1024] = "";
    ChoiceResult *cres = NULL;  // multiple-choice accuracy per model (choice = [...])
    int ncres = 0;
    if (stage_load_input_model(ctx, &m, from, sizeof from, &e) || stage_load_teacher(ctx, &t, &e)) goto fail;
    have_t = true;
    for (int i = 0; i < st->index; i++)  // the init stage's model, if it is not the model evaluated
        if (rec->stages[i].kind == STAGE_INIT) {
            char *d = run_stage_dir(ctx, i);
            if (checkpoint_find_latest(d, init_path, sizeof init_path, &e) == 1 && strcmp(init_path, from) &&
                stage_load_model(ctx, init_path, &init, &e) == 0)
                have_init = true;
            free(d);
        }
    const int dev = stage_device(ctx);
    EvalModel em = {&m.hc, &m.reg, m.params, dev}, et = {&t.hc, &t.reg, t.params, dev},
              ei = {&init.hc, &init.reg, init.params, dev};
    for (int k = 0; k < st->n_eval_sets; k++) {
        int di = st->eval_index[k];
        const DataSpec *ds = &rec->data[di];
        char *shard = NULL;
        if (stage_data_shard(ctx, di, ds->holdout > 0 ? SPLIT_HOLDOUT : SPLIT_TRAIN, &shard, &e)) {
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        const int64_t T = ds->seq_len;
        int64_t B = st->opt.micro_batch > 0 ? st->opt.micro_batch : 1;
        {  // a small held-out set: shrink the batch to its rows
            LoaderSource probe;
            if (loader_source_open(&probe, shard, 1, T, (uint64_t)ctx->seed, false, &e)) {
                free(shard);
                rc = DL_EXIT_INPUT;
                goto fail;
            }
            int64_t rows = dataloader_rows(probe.dl);
            loader_source_close(&probe);
            if (rows < B) B = rows > 0 ? rows : 1;
        }
        for (int which = have_init ? 0 : 1; which < 2; which++) {
            LoaderSource ls;
            if (loader_source_open(&ls, shard, B, T, (uint64_t)ctx->seed, false, &e)) {
                free(shard);
                rc = DL_EXIT_INPUT;
                goto fail;
            }
            int64_t rows = dataloader_rows(ls.dl);
            if (st->max_sequences > 0 && st->max_sequences < rows) rows = st->max_sequences;
            int64_t nb = rows / B > 0 ? rows / B : 1;
            if (nb > dataloader_steps_per_epoch(ls.dl)) nb = dataloader_steps_per_epoch(ls.dl);
            BatchSource src = loader_source(&ls);
            char label[64];
            snprintf(label, sizeof label, "%s%s%s", which ? "student" : "init", st->n_eval_sets > 1 ? ":" : "",
                     st->n_eval_sets > 1 ? ds->name : "");
            int r = nb < 1 ? dl_fail(&e, "data '%s': fewer rows (%lld) than one batch of %lld", ds->name,
                                     (long long)dataloader_rows(ls.dl), (long long)B)
                           : eval_run(which ? &em : &ei, &et, &src, B, T, nb, label, &res[nres], &e);
            loader_source_close(&ls);
            if (r) {
                free(shard);
                goto fail;
            }
            nres++;
        }
        free(shard);
    }
    if (st->n_choice_sets > 0) {
        Tokenizer *tok = NULL;
        EvalModel cm[3] = {et, em, ei};
        const char *cl[3] = {"teacher", "student", "init"};
        int cr = stage_load_tokenizer(ctx, &tok, &e) ||
                 choice_eval_models((const char *const *)st->choice_sets, st->n_choice_sets, cm, cl, have_init ? 3 : 2, tok,
                                    st->batch_size, &cres, &ncres, &e);
        tokenizer_free(tok);
        if (cr) goto fail;
    }
    char *p1 = dl_path_join(ctx->stage_dir, "eval.json"), *p2 = dl_path_join(ctx->run_dir, "eval.json");
    int w = eval_write_json(p1, res, nres, &e) || eval_write_json(p2, res, nres, &e);
    if (!w && ncres) w = choice_add_json(p1, cres, ncres, &e) || choice_add_json(p2, cres, ncres, &e);
    free(p1), free(p2);
    if (w) goto fail;
    printf("\nevaluation of %s against the teacher (%s)\n", from, rec->teacher.path);
    eval_print_table(stdout, res, nres);
    if (ncres) printf("\n"), choice_print_table(stdout, cres, ncres);
    fflush(stdout);
    rc = DL_EXIT_OK;
    goto out;
fail:
    fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    free(res);
    free(cres);
    stage_model_free(&m);
    if (have_init) stage_model_free(&init);
    if (have_t) model_free(&t);
    return rc;
}

// Before anything runs: every choice file parses (a bad line should not wait for the end of training).
static int check_eval(const RunContext *ctx, const StageSpec *st, DlError *e) {
    (void)ctx;
    for (int k = 0; k < st->n_choice_sets; k++) {
        ChoiceSet s;
        if (choice_set_load(st->choice_sets[k], &s, e)) return -1;
        choice_set_free(&s);
    }
    return 0;
}

DL_STAGE(stage_eval_def, {.kind = STAGE_EVAL,
                          .summary = "perplexity, KL to the teacher and top-1 agreement on held-out data",
                          .run = run_eval, .check = check_eval})
