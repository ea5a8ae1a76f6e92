// stage_eval.c: the `eval` stage: the newest model of the run against the teacher on the held-out part of
// each eval data set (the whole set when holdout = 0): perplexity, KL(teacher||student), top-1 agreement,
// accuracy, each with its ratio to the teacher (eval.h). When the run has an init stage, its untrained
// hybrid is evaluated too, to show what training bought. Writes STAGE_DIR/eval.json and RUN_DIR/eval.json
// and prints the table on stdout. With choice = ["file.jsonl", ...], also the multiple-choice accuracy of the
// teacher, the student and the init (eval_choice.h), under the key "choice" of eval.json.
// With a draft stage before it (or draft = "NAME"), also speculative decoding (spec_eval.h, the measurement of
// `distill eval-spec`): plain vs speculative tokens/s, acceptance per draft position and speedup at batch 1,
// greedy, for the student (and the teacher) as the target and the draft stage's model as the draft, on the
// run's device, under the key "speculative" of eval.json and as a table.
#include <cjson/cJSON.h>
#include <string.h>
#include <unistd.h>

#include "distill/checkpoint.h"
#include "distill/draft_vocab.h"
#include "distill/eval.h"
#include "distill/eval_choice.h"
#include "distill/shards.h"
#include "distill/spec_eval.h"
#include "distill/stage_common.h"

// ---- speculative decoding

#define SPEC_MAX_PROMPT 512  // prompt tokens kept (the end of a longer prompt): the decoders' capacity stays small

typedef struct {
    int32_t **ids;
    int64_t *len;
    int64_t n;
} SpecPrompts;

static void spec_prompts_free(SpecPrompts *p) {
    for (int64_t i = 0; i < p->n; i++) free(p->ids[i]);
    free(p->ids), free(p->len);
    memset(p, 0, sizeof *p);
}

// Up to `want` distinct prompts from the documents of shard: in a document with a loss mask (a chat or generate
// set: the response is masked) the tokens before the first masked one; in plain text (all masked) the first
// quarter of the document (at most 64 tokens). Documents that give no prompt are passed over.
static int spec_prompts_load(const char *shard, int64_t want, SpecPrompts *p, DlError *e) {
    memset(p, 0, sizeof *p);
    ShardReader *r;
    if (shard_open(&r, shard, e)) return -1;
    const int64_t nd = shard_info(r)->n_docs;
    p->ids = dl_calloc((size_t)want, sizeof *p->ids);
    p->len = dl_calloc((size_t)want, sizeof *p->len);
    for (int64_t d = 0; d < nd && p->n < want; d++) {
        int32_t *ids;
        uint8_t *mask;
        int64_t n;
        if (shard_read_doc(r, d, &ids, &mask, &n, e)) {
            shard_close(r);
            spec_prompts_free(p);
            return -1;
        }
        int64_t k = 0;
        while (k < n && !mask[k]) k++;
        int64_t len = k > 0 && k < n ? k : k == 0 ? DL_MIN(n / 4, 64) : 0;
        int64_t from = len > SPEC_MAX_PROMPT ? len - SPEC_MAX_PROMPT : 0;
        len -= from;
        bool dup = len < 1;
        for (int64_t i = 0; i < p->n && !dup; i++)
            dup = p->len[i] == len && !memcmp(p->ids[i], ids + from, (size_t)len * sizeof(int32_t));
        if (!dup) {
            p->ids[p->n] = dl_malloc((size_t)len * sizeof(int32_t));
            memcpy(p->ids[p->n], ids + from, (size_t)len * sizeof(int32_t));
            p->len[p->n++] = len;
        }
        free(ids), free(mask);
    }
    shard_close(r);
    if (p->n == 0) {
        spec_prompts_free(p);
        return dl_fail(e, "%s: no document gives a prompt for the speculative rows", shard);
    }
    return 0;
}

// Adds (replaces) key in the JSON object file path, written to a temporary name and renamed.
static int json_file_set(const char *path, const char *key, cJSON *val, DlError *e) {
    cJSON *root = NULL;
    if (dl_file_exists(path)) {
        size_t len;
        char *text = dl_read_file(path, &len, e);
        if (!text) return cJSON_Delete(val), -1;
        root = cJSON_Parse(text);
        free(text);
        if (!root || !cJSON_IsObject(root)) {
            cJSON_Delete(root), cJSON_Delete(val);
            return dl_fail(e, "%s: not a JSON object; cannot add \"%s\"", path, key);
        }
    } else {
        root = cJSON_CreateObject();
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, key);
    cJSON_AddItemToObject(root, key, val);
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    const size_t n = strlen(txt);
    txt[n] = '\n';  // cJSON_Print's terminator becomes the file's last newline
    const int rc = dl_write_file_atomic(path, txt, n + 1, e);
    free(txt);
    return rc;
}

// The speculative rows: the draft stage's model against the student (and the teacher) as targets, batch 1,
// greedy. Fills *out (a JSON object for eval.json) and prints the table.
static int spec_measure(RunContext *ctx, const StageSpec *st, const EvalModel *student, const EvalModel *teacher, cJSON **out,
                        DlError *e) {
    const Recipe *rec = ctx->recipe;
    const StageSpec *ds = &rec->stages[st->spec_draft_index];
    const DataSpec *pd = &rec->data[st->spec_data_index];
    char *sdir = run_stage_dir(ctx, st->spec_draft_index), *dpath = dl_path_join(sdir, "model"), *shard = NULL;
    free(sdir);
    LoadedModel dm;
    memset(&dm, 0, sizeof dm);
    SpecPrompts pr = {0};
    DraftVocab dv = {0};
    int rc = -1;
    if (model_load(dpath, 0, &dm, e)) {
        dl_fail_prefix(e, "the draft of stage '%s' (run it first): ", ds->name);
        goto out;
    }
    if (draft_vocab_read(dpath, dm.hc.base.vocab, 0, &dv, e) < 0) goto out;  // a trimmed head if the stage wrote one
    if (stage_data_shard(ctx, st->spec_data_index, pd->holdout > 0 ? SPLIT_HOLDOUT : SPLIT_TRAIN, &shard, e) ||
        spec_prompts_load(shard, st->spec_prompts, &pr, e))
        goto out;
    const int cuda = student->device == 1;
    const int batch1 = 1;
    const EvalModel *targets[2] = {student, teacher};
    const char *labels[2] = {"student", "teacher"};
    const int nt = st->spec_teacher ? 2 : 1;
    const int64_t per = (int64_t)st->n_spec_branches * st->n_spec_k;  // rows per target: by W, then K
    SpecEvalRow *rows = dl_calloc((size_t)(nt * per), sizeof *rows);
    for (int ti = 0; ti < nt; ti++) {
        SpecEvalConfig c = {.target = {targets[ti]->hc, targets[ti]->reg, targets[ti]->params},
                            .draft = {&dm.hc, &dm.reg, dm.params},
                            .prompts = (const int32_t *const *)pr.ids, .plen = pr.len, .n_prompts = pr.n,
                            .ks = st->spec_k, .nk = st->n_spec_k, .batches = &batch1, .nb = 1,
                            .branches = st->spec_branches, .nw = st->n_spec_branches,
                            .max_tokens = st->spec_tokens, .temperature = 0, .cuda = cuda, .graph = 1,
                            .draft_head_ids = dv.ids, .draft_head_n = dv.n};
        if (spec_eval_run(&c, rows + ti * per, e)) {
            free(rows);
            dl_fail_prefix(e, "speculative decoding (target %s): ", labels[ti]);
            goto out;
        }
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "draft", dpath);
    cJSON_AddStringToObject(o, "draft_stage", ds->name);
    cJSON *dl = cJSON_AddArrayToObject(o, "draft_teacher_layers");
    for (int i = 0; i < ds->n_draft_layers; i++) cJSON_AddItemToArray(dl, cJSON_CreateNumber(ds->draft_layers[i]));
    cJSON_AddNumberToObject(o, "draft_vocab", dv.n ? (double)dv.n : (double)dm.hc.base.vocab);
    if (dv.n) cJSON_AddNumberToObject(o, "draft_vocab_coverage", dv.coverage);
    cJSON_AddStringToObject(o, "device", cuda ? "cuda" : "cpu");
    cJSON_AddStringToObject(o, "decoding", "greedy");
    cJSON_AddStringToObject(o, "prompts_from", pd->name);
    cJSON_AddNumberToObject(o, "prompts", (double)pr.n);
    cJSON_AddNumberToObject(o, "max_tokens", st->spec_tokens);
    cJSON *runs = cJSON_AddArrayToObject(o, "runs");
    printf("\nspeculative decoding on %s: draft %s (teacher layers", cuda ? "cuda" : "cpu", dpath);
    for (int i = 0; i < ds->n_draft_layers; i++) printf("%s%d", i ? "," : " ", ds->draft_layers[i]);
    printf("), %lld prompts of '%s', %d new tokens each, greedy, batch 1", (long long)pr.n, pd->name, st->spec_tokens);
    if (dv.n) printf("; head trimmed to %lld ids (%.2f%% of its training tokens)", (long long)dv.n, 100.0 * dv.coverage);
    printf("\n");
    for (int ti = 0; ti < nt; ti++) {
        printf("target %s\n", labels[ti]);
        spec_eval_print_header(stdout);
        for (int64_t k = 0; k < per; k++) {
            const SpecEvalRow *r = &rows[ti * per + k];
            spec_eval_print_row(stdout, r);
            cJSON *j = spec_eval_row_json(r);
            cJSON_AddStringToObject(j, "target", labels[ti]);
            cJSON_AddItemToArray(runs, j);
        }
    }
    free(rows);
    *out = o;
    rc = 0;
out:
    spec_prompts_free(&pr);
    draft_vocab_free(&dv);
    if (dm.params) model_free(&dm);
    free(dpath), free(shard);
    return rc;
}

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
    printf("\nevaluation of %s against the teacher (%s)\n", from, rec->teacher.path);
    eval_print_table(stdout, res, nres);
    if (ncres) printf("\n"), choice_print_table(stdout, cres, ncres);
    fflush(stdout);
    cJSON *spec = NULL;
    if (st->spec_draft_index >= 0 && st->spec_prompts > 0 && spec_measure(ctx, st, &em, &et, &spec, &e)) goto fail;
    fflush(stdout);
    char *p1 = dl_path_join(ctx->stage_dir, "eval.json"), *p2 = dl_path_join(ctx->run_dir, "eval.json");
    int w = eval_write_json(p1, res, nres, &e) || eval_write_json(p2, res, nres, &e);
    if (!w && ncres) w = choice_add_json(p1, cres, ncres, &e) || choice_add_json(p2, cres, ncres, &e);
    if (!w && spec && !(w = json_file_set(p1, "speculative", cJSON_Duplicate(spec, 1), &e))) {
        w = json_file_set(p2, "speculative", spec, &e);  // takes spec
        spec = NULL;
    }
    cJSON_Delete(spec);
    free(p1), free(p2);
    if (w) goto fail;
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
