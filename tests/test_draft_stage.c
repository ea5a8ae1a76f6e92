// test_draft_stage.c: the draft stage and the eval stage's speculative rows through $DISTILL_BIN, with the real
// SmolLM2 tokenizer (skipped when scripts/fetch-teacher has not run) and a small random-weight 4-layer teacher
// of the same vocabulary.
//   * pipeline: generate -> init -> layerwise -> draft "cut" (layers [1, 3], lr 1e-30: the weights stay the
//     cut, checked tensor by tensor against teacher layers 1 and 3) -> draft "draft" (layers [0, 3], CE + KL,
//     only model.layers.* train: embeddings and norm equal the teacher's, layer weights moved) -> eval with
//     draft = "draft": eval.json's "speculative" rows (student and teacher targets, K 1 and 3): greedy output
//     equal to plain for every prompt, acceptance in [0, 1] and falling with the position, tokens per step =
//     1 + the summed acceptance; draft "same" (all 4 layers, lr 1e-30: the teacher itself) -> an eval that
//     picks the last draft by default: with the teacher as the target, acceptance >= 0.9.
//   * `distill eval-spec --draft RUN/NN-draft/model --json`: the same library, the same exactness; prompts from a
//     .jsonl of chats, raw lines with --chat, and raw lines: prompt_tokens = what chat_render / encode give; a bad
//     .jsonl line -> exit 3 naming file:line, no JSON written.
//   * vocab = 300 on "draft": draft_vocab.json lists the 300 ids its training rows teach most often (against a
//     count of the shard made here), the eval stage and eval-spec use it (still equal to plain); --draft-vocab
//     full / N; refusals: N past the list, a draft without a list, spoiled lists (exit 3 naming the file and fault).
//   * resume: a draft stage stopped after 2 of 5 steps and resumed writes the same bytes as an uninterrupted run (its
//     vocab = 40 list too, which names no paths); a draft killed between its weights and its list writes both
//     again on --resume.
//   * reuse: an identical draft stage in another run copies the cached model and trains nothing; other settings
//     train; a spoiled cache is dropped with a warning; kl_from = "student" drafts are never reused.
//   * kl_from: the teacher-identical draft starts at KL 0 to the teacher and at KL > 0 to the student.
//   * bad recipes: layer out of range, layers not ascending, layers on a layerwise stage, loss.mse on a draft,
//     an eval's draft naming no stage / a non-draft stage / a later stage, spec_k outside 1..8, a draft without
//     data: exit 3, every message, nothing run.
#include <cjson/cJSON.h>
#include <dirent.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/chat.h"
#include "distill/model_io.h"
#include "distill/shards.h"
#include "distill/tokenizer.h"
#include "tests/check.h"

#define GGUF "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf"

static char g_dir[256];

static int run_cmd(const char *cmd_fmt, const char *a, const char *b, const char *c) {
    char cmd[4096], full[4400];
    snprintf(cmd, sizeof cmd, cmd_fmt, a, b, c);
    snprintf(full, sizeof full, "%s >> %s/log.txt 2>&1", cmd, g_dir);
    int st = system(full);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static char *slurp(const char *path) {
    size_t n;
    DlError e;
    return dl_read_file(path, &n, &e);
}

// log.txt holds `what` (quietly: also for checks that something is absent)
static bool log_contains(const char *what) {
    char p[400];
    snprintf(p, sizeof p, "%s/log.txt", g_dir);
    char *t = slurp(p);
    bool ok = t && strstr(t, what);
    free(t);
    return ok;
}

static bool log_has(const char *what) {
    bool ok = log_contains(what);
    if (!ok) fprintf(stderr, "log.txt lacks: %s\n", what);
    return ok;
}

// The parsed JSON file at path, or NULL.
static cJSON *read_json(const char *path) {
    char *js = slurp(path);
    cJSON *root = js ? cJSON_Parse(js) : NULL;
    free(js);
    return root;
}

// Files pa and pb exist, are not empty and hold the same bytes (complain: say so on stderr when not).
static bool files_equal(const char *pa, const char *pb, bool complain) {
    size_t na = 0, nb = 0;
    DlError e;
    char *ta = dl_read_file(pa, &na, &e), *tb = dl_read_file(pb, &nb, &e);
    bool ok = ta && tb && na == nb && na > 0 && !memcmp(ta, tb, na);
    if (!ok && complain) fprintf(stderr, "%s and %s differ (%zu and %zu bytes)\n", pa, pb, na, nb);
    free(ta), free(tb);
    return ok;
}

// Entries of a directory, dot files aside; 0 when it does not exist (the cache folder comes with its first entry).
static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    for (struct dirent *x; (x = readdir(d));) n += x->d_name[0] != '.';
    closedir(d);
    return n;
}

// The name of the cache entry holding run "ra"'s draft (its model.safetensors bytes), into out.
static void cache_entry_of_ra(const char *dir, const char *root, char *out, size_t cap) {
    DIR *d = opendir(dir);
    if (!d) return;
    char ref[600];
    snprintf(ref, sizeof ref, "%s/runs/ra/02-draft/model/model.safetensors", root);
    for (struct dirent *x; (x = readdir(d));) {
        char p[900];
        snprintf(p, sizeof p, "%s/%s/model.safetensors", dir, x->d_name);
        if (x->d_name[0] != '.' && files_equal(ref, p, false)) snprintf(out, cap, "%s", x->d_name);
    }
    closedir(d);
}

// Runs a and b (a generate + draft recipe) wrote the same draft bytes.
static bool same_file_bytes(const char *a, const char *b) {
    char pa[600], pb[600];
    snprintf(pa, sizeof pa, "%s/runs/%s/02-draft/model/model.safetensors", g_dir, a);
    snprintf(pb, sizeof pb, "%s/runs/%s/02-draft/model/model.safetensors", g_dir, b);
    return files_equal(pa, pb, true);
}

// Rows of metrics.jsonl of run `run` whose "stage" is `stage`.
static int metrics_rows(const char *root, const char *run, const char *stage) {
    char p[600], want[200];
    snprintf(p, sizeof p, "%s/runs/%s/metrics.jsonl", root, run);
    snprintf(want, sizeof want, "\"stage\":\"%s\",\"step\"", stage);  // step rows (events have no step)
    char *t = slurp(p);  // NULL: no metrics file (a run that trained nothing), 0 rows
    int n = 0;
    for (char *q = t; q && (q = strstr(q, want)); q += strlen(want)) n++;
    free(t);
    return n;
}

static void clear_log(void) {
    char p[400];
    snprintf(p, sizeof p, "%s/log.txt", g_dir);
    FILE *f = fopen(p, "w");
    if (f) fclose(f);
}

static void dump_log(void) {
    char cmd[400];
    snprintf(cmd, sizeof cmd, "cat %s/log.txt >&2", g_dir);
    if (system(cmd)) {}
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

// path <- the recipe head (teacher, data, the generate stage), then stages.
static void write_recipe(const char *path, const char *head, const char *stages) {
    FILE *f = fopen(path, "w");
    fputs(head, f);
    fputs(stages, f);
    fclose(f);
}

// Max |a - b| over tensor `an` of a and `bn` of b (same numel), or -1 when either is missing.
// A fresh log, the recipe head + stages written to path, and `distill path --set run.name=name`: its exit status.
static int run_recipe_fresh(const char *bin, const char *path, const char *head, const char *stages, const char *name) {
    clear_log();
    write_recipe(path, head, stages);
    return run_cmd("'%s' '%s' --set run.name=%s", bin, path, name);
}

static double tensor_diff(const LoadedModel *a, const char *an, const LoadedModel *b, const char *bn) {
    int i = reg_find(&a->reg, an), j = reg_find(&b->reg, bn);
    if (i < 0 || j < 0 || a->reg.t[i].numel != b->reg.t[j].numel) return -1;
    double m = 0;
    for (int64_t k = 0; k < a->reg.t[i].numel; k++) {
        double d = fabs((double)a->params[a->reg.t[i].offset + k] - (double)b->params[b->reg.t[j].offset + k]);
        if (d > m) m = d;
    }
    return m;
}

// Every layer tensor of draft layer dl equals teacher layer tl (exactly), and the shared tensors equal.
static void check_cut(const LoadedModel *d, const LoadedModel *t, int dl, int tl) {
    int n = 0;
    for (int i = 0; i < d->reg.n; i++) {
        int li, off = 0;
        const char *nm = d->reg.t[i].name;
        char tn[DL_TENSOR_NAME_MAX];
        if (sscanf(nm, "model.layers.%d.%n", &li, &off) == 1 && off > 0) {
            if (li != dl) continue;
            snprintf(tn, sizeof tn, "model.layers.%d.%s", tl, nm + off);
        } else {
            snprintf(tn, sizeof tn, "%s", nm);
        }
        double df = tensor_diff(d, nm, t, tn);
        if (df != 0) fprintf(stderr, "cut: %s vs teacher %s: %g\n", nm, tn, df);
        CHECK(df == 0);
        n++;
    }
    CHECK(n >= 9);  // norms, q, k, v, o, gate, up, down (+ shared tensors)
}

// The "speculative" object of eval.json: every row's invariants; returns the number of rows.
static int check_spec_rows(const cJSON *runs, int want_prompts) {
    int n = 0;
    const cJSON *r;
    cJSON_ArrayForEach(r, runs) {
        n++;
        int k = (int)cJSON_GetObjectItem(r, "k")->valuedouble;
        const cJSON *acc = cJSON_GetObjectItem(r, "acceptance");
        CHECK(cJSON_GetArraySize(acc) == k);
        double sum = 0;
        bool in01 = true, mono = true;
        double prev = 1;
        for (int i = 0; i < k; i++) {
            double a = cJSON_GetArrayItem(acc, i)->valuedouble;
            in01 &= a >= 0 && a <= 1;
            mono &= a <= prev + 1e-9;  // position i+1 is accepted only after position i
            prev = a;
            sum += a;
        }
        CHECK(in01);
        CHECK(mono);
        double tps = cJSON_GetObjectItem(r, "tokens_per_step")->valuedouble;
        // greedy: each verification step emits the accepted draft tokens plus one target token
        CHECK(fabs(tps - (1 + sum)) < 2e-3 * k + 1e-4);
        CHECK_EQ_I64(cJSON_GetObjectItem(r, "greedy_equal_sequences")->valuedouble, cJSON_GetObjectItem(r, "sequences")->valuedouble);
        if (want_prompts > 0) CHECK_EQ_I64(cJSON_GetObjectItem(r, "sequences")->valuedouble, want_prompts);
        const int w = (int)cJSON_GetObjectItem(r, "branches")->valuedouble;
        const cJSON *kc = cJSON_GetObjectItem(r, "kept_chain");  // W > 1: how often each chain was kept, summing to 1
        CHECK(w >= 1 && (w == 1) == (kc == NULL));
        if (kc) {
            double ks = 0;
            for (int i = 0; i < cJSON_GetArraySize(kc); i++) ks += cJSON_GetArrayItem(kc, i)->valuedouble;
            CHECK(cJSON_GetArraySize(kc) == w && fabs(ks - 1) < 1e-3);
        }
        CHECK(cJSON_GetObjectItem(r, "plain_tokens_per_s")->valuedouble > 0);
        CHECK(cJSON_GetObjectItem(r, "spec_tokens_per_s")->valuedouble > 0);
    }
    return n;
}

// The draft stage's trimmed-head list (vocab = keep) against a count of the shard's trained tokens made here: the
// keep most frequent ids, most frequent first (ties: lower id), each with its count, counted_tokens their total.
static void check_vocab_file(const char *model_dir, const char *shard, int keep) {
    char path[800];
    snprintf(path, sizeof path, "%s/draft_vocab.json", model_dir);
    cJSON *root = read_json(path);
    CHECK(root != NULL);
    if (!root) return;
    enum { V = 49152 };
    static int64_t cnt[V];
    memset(cnt, 0, sizeof cnt);
    int64_t total = 0;
    ShardReader *r = NULL;
    DlError e;
    CHECK(shard_open(&r, shard, &e) == 0);
    if (r) {
        const ShardInfo *in = shard_info(r);
        const int64_t W = in->seq_len + 1;
        int32_t *tok = malloc(sizeof(int32_t) * W);
        uint8_t *mask = malloc(W), *reset = malloc(W);
        for (int64_t row = 0; row < in->n_seqs; row++) {
            CHECK(shard_read_rows(r, row, 1, tok, mask, reset, &e) == 0);
            for (int64_t t = 0; t < W; t++)
                if (mask[t]) cnt[tok[t]]++, total++;
        }
        free(tok), free(mask), free(reset);
        shard_close(r);
    }
    const cJSON *ids = cJSON_GetObjectItem(root, "ids"), *cs = cJSON_GetObjectItem(root, "counts");
    CHECK(!strcmp(cJSON_GetObjectItem(root, "format")->valuestring, "distill-draft-vocab"));
    CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(root, "vocab_size")->valuedouble, V);
    CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(root, "counted_tokens")->valuedouble, total);
    CHECK(total > 20);  // (12-token responses to 6 prompts, twice)
    CHECK_EQ_I64(cJSON_GetArraySize(ids), keep);
    CHECK_EQ_I64(cJSON_GetArraySize(cs), keep);
    static bool listed[V];
    memset(listed, 0, sizeof listed);
    int bad = 0;
    int64_t prev_c = INT64_MAX, prev_id = -1, last_c = 0, last_id = -1;
    for (int i = 0; i < keep && i < cJSON_GetArraySize(ids); i++) {
        const int64_t id = (int64_t)cJSON_GetArrayItem(ids, i)->valuedouble, c = (int64_t)cJSON_GetArrayItem(cs, i)->valuedouble;
        bad += id < 0 || id >= V || listed[id] || c != cnt[id] || c > prev_c || (c == prev_c && id < prev_id);
        if (id >= 0 && id < V) listed[id] = true;
        prev_c = c, prev_id = id, last_c = c, last_id = id;
    }
    for (int64_t id = 0; id < V; id++)  // nothing left out beats the last one kept
        if (!listed[id]) bad += cnt[id] > last_c || (cnt[id] == last_c && id < last_id);
    if (bad) fprintf(stderr, "%s: %d entries disagree with the shard's counts\n", path, bad);
    CHECK_EQ_I64(bad, 0);
    cJSON_Delete(root);
}

int main(void) {
    const char *bin = getenv("DISTILL_BIN");
    if (!bin || access(GGUF, R_OK)) {
        printf("test_draft_stage: skipped (needs DISTILL_BIN and %s; run scripts/fetch-teacher)\n", GGUF);
        return 0;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_draft_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    char cwd[300], path[700], recipe[700], recipe2[700], bad[700];
    if (!getcwd(cwd, sizeof cwd)) return 1;
    snprintf(path, sizeof path, "%s/prompts.jsonl", g_dir);
    write_file(path, "{\"messages\": [{\"role\": \"user\", \"content\": \"Name a fruit.\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"Count to three.\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"What is the sky?\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell a joke.\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"Why is water wet?\"}]}\n");
    snprintf(path, sizeof path, "%s/teacher.json", g_dir);
    write_file(path, "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 32, "
                     "\"intermediate_size\": 64, \"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                     "\"head_dim\": 8, \"vocab_size\": 49152, \"max_position_embeddings\": 512, \"rope_theta\": 10000.0, "
                     "\"rms_norm_eps\": 1e-05, \"tie_word_embeddings\": true, \"bos_token_id\": 1, \"eos_token_id\": 2, "
                     "\"initializer_range\": 0.3}\n");
    char head[1200];
    snprintf(head, sizeof head,
             "[run]\noutput_dir = \"%s/runs\"\nseed = 5\ncheckpoint_every = 2\nthreads = 2\n\n[teacher]\npath = \"%s/teacher.json\"\n\n"
             "[tokenizer]\npath = \"%s/%s\"\n\n[hybrid]\nattn_fraction = 0.5\n\n[optimizer]\nlr = 1e-2\nmicro_batch = 2\n\n"
             "[data.prompts]\nsources = [\"%s/prompts.jsonl\"]\nformat = \"chat\"\nseq_len = 48\n\n"
             "[data.samples]\nseq_len = 48\nholdout = 0.3\n\n"
             "[[stage]]\nkind = \"generate\"\ndata = \"prompts\"\noutput = \"samples\"\nmax_new_tokens = 12\ntemperature = 1.0\n"
             "top_p = 1.0\nbatch_size = 6\nsamples_per_prompt = 2\n\n",
             g_dir, g_dir, cwd, GGUF, g_dir);
    // ---- the pipeline
    snprintf(recipe, sizeof recipe, "%s/draft.toml", g_dir);
    write_recipe(recipe, head, "[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"layerwise\"\ndata = \"samples\"\nsteps = 2\n\n"
                               "[[stage]]\nkind = \"draft\"\nname = \"cut\"\ndata = \"samples\"\nlayers = [1, 3]\nsteps = 1\n"
                               "[stage.optimizer]\nlr = 1e-30\n\n"
                               "[[stage]]\nkind = \"draft\"\nname = \"draft\"\ndata = \"samples\"\nlayers = [0, 3]\nsteps = 4\n"
                               "trainable = \"model.layers.*\"\nvocab = 300\n[stage.loss]\nce = 1.0\nkl = 0.5\n\n"
                               "[[stage]]\nkind = \"draft\"\nname = \"same\"\ndata = \"samples\"\nlayers = [0, 1, 2, 3]\nsteps = 1\n"
                               "[stage.optimizer]\nlr = 1e-30\n\n"
                               "[[stage]]\nkind = \"eval\"\nname = \"eval\"\ndata = [\"samples\"]\ndraft = \"draft\"\nspec_k = [1, 3]\nspec_branches = [1, 2]\n"
                               "spec_tokens = 10\nspec_prompts = 3\n\n"
                               "[[stage]]\nkind = \"eval\"\nname = \"eval-same\"\ndata = [\"samples\"]\nspec_k = [3]\nspec_tokens = 12\nspec_prompts = 2\n");
    int rc = run_cmd("'%s' '%s' --set run.name=%s", bin, recipe, "p");
    CHECK_EQ_I64(rc, 0);
    if (rc) dump_log();
    LoadedModel t, cut, dr;
    DlError e;
    snprintf(path, sizeof path, "%s/teacher.json", g_dir);
    if (model_load(path, 5, &t, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    snprintf(path, sizeof path, "%s/runs/p/04-cut/model", g_dir);
    int lc = model_load(path, 0, &cut, &e);
    CHECK(lc == 0);
    if (lc == 0) {
        CHECK_EQ_I64(cut.hc.base.n_layer, 2);
        check_cut(&cut, &t, 0, 1);
        check_cut(&cut, &t, 1, 3);
        model_free(&cut);
    } else fprintf(stderr, "%s\n", e.msg);
    snprintf(path, sizeof path, "%s/runs/p/05-draft/model", g_dir);
    int ld = model_load(path, 0, &dr, &e);
    CHECK(ld == 0);
    if (ld == 0) {
        CHECK_EQ_I64(dr.hc.base.n_layer, 2);
        CHECK(dr.hc.mixer[0] == MIXER_ATTN && dr.hc.mixer[1] == MIXER_ATTN);
        CHECK(tensor_diff(&dr, "model.embed_tokens.weight", &t, "model.embed_tokens.weight") == 0);  // frozen
        CHECK(tensor_diff(&dr, "model.norm.weight", &t, "model.norm.weight") == 0);
        CHECK(tensor_diff(&dr, "model.layers.1.mlp.down_proj.weight", &t, "model.layers.3.mlp.down_proj.weight") > 1e-4);  // trained
        CHECK(tensor_diff(&dr, "model.layers.0.self_attn.q_proj.weight", &t, "model.layers.0.self_attn.q_proj.weight") > 1e-4);
        model_free(&dr);
    } else fprintf(stderr, "%s\n", e.msg);
    model_free(&t);
    // the "draft" stage's trimmed-head list (vocab = 300) from its training rows
    {
        char shard[700];
        snprintf(path, sizeof path, "%s/runs/p/05-draft/model", g_dir);
        snprintf(shard, sizeof shard, "%s/runs/p/01-generate/samples.train.h5", g_dir);
        if (!dl_file_exists(shard)) snprintf(shard, sizeof shard, "%s/runs/p/data/samples.train.h5", g_dir);
        check_vocab_file(path, shard, 300);
        snprintf(path, sizeof path, "%s/runs/p/04-cut/model/draft_vocab.json", g_dir);
        CHECK(!dl_file_exists(path));  // vocab 0: no list, the full head
        CHECK(log_has("draft: head trimmed to 300 ids"));
    }
    // eval.json's speculative rows
    snprintf(path, sizeof path, "%s/runs/p/07-eval/eval.json", g_dir);
    cJSON *root = read_json(path);
    const cJSON *sp = cJSON_GetObjectItem(root, "speculative");
    CHECK(sp != NULL);
    if (sp) {
        CHECK(!strcmp(cJSON_GetObjectItem(sp, "draft_stage")->valuestring, "draft"));
        CHECK(!strcmp(cJSON_GetObjectItem(sp, "device")->valuestring, "cpu"));
        CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(sp, "draft_vocab")->valuedouble, 300);  // its list, trimmed head
        const double cov = cJSON_GetObjectItem(sp, "draft_vocab_coverage")->valuedouble;
        CHECK(cov > 0.3 && cov <= 1.0);
        int np = (int)cJSON_GetObjectItem(sp, "prompts")->valuedouble;
        CHECK(np >= 1 && np <= 3);  // distinct prompts of the held-out documents (2 samples of each prompt), at most spec_prompts
        int nrows = check_spec_rows(cJSON_GetObjectItem(sp, "runs"), np);
        CHECK_EQ_I64(nrows, 8);  // student and teacher x W 1, 2 x K 1, 3
        int nw2 = 0;
        const cJSON *r;
        cJSON_ArrayForEach(r, cJSON_GetObjectItem(sp, "runs")) nw2 += cJSON_GetObjectItem(r, "branches")->valuedouble == 2;
        CHECK_EQ_I64(nw2, 4);
        CHECK(cJSON_GetObjectItem(root, "results") != NULL || cJSON_GetArraySize(root) > 1);  // the eval results stay
    }
    cJSON_Delete(root);
    // the last eval (the run's eval.json): its draft is the teacher itself (all layers, unchanged), so with the
    // teacher as the target nearly every draft token is accepted (exact ties aside: batched vs one-token sums)
    snprintf(path, sizeof path, "%s/runs/p/eval.json", g_dir);
    root = read_json(path);
    sp = cJSON_GetObjectItem(root, "speculative");
    CHECK(sp != NULL);
    if (sp) {
        CHECK(!strcmp(cJSON_GetObjectItem(sp, "draft_stage")->valuestring, "same"));  // the last draft before it
        const cJSON *runs = cJSON_GetObjectItem(sp, "runs");
        CHECK_EQ_I64(check_spec_rows(runs, (int)cJSON_GetObjectItem(sp, "prompts")->valuedouble), 2);
        const cJSON *tr = cJSON_GetArrayItem(runs, 1);
        CHECK(tr && !strcmp(cJSON_GetObjectItem(tr, "target")->valuestring, "teacher"));
        if (tr) {
            double ar = cJSON_GetObjectItem(tr, "acceptance_rate")->valuedouble;
            if (!(ar >= 0.9)) fprintf(stderr, "identical draft: acceptance %g\n", ar);
            CHECK(ar >= 0.9);
            CHECK(cJSON_GetObjectItem(tr, "tokens_per_step")->valuedouble >= 3.6);  // of at most K + 1 = 4
        }
    }
    cJSON_Delete(root);
    CHECK(log_has("speculative decoding on cpu"));
    CHECK(log_has("target teacher"));
    // ---- the command, on the stage's draft
    char args[1600];
    snprintf(args, sizeof args, "--target %s/teacher.json --draft %s/runs/p/05-draft/model --tokenizer %s/%s --k 2 --batch 1,2 "
             "--max-tokens 9 --json %s/spec.json", g_dir, g_dir, cwd, GGUF, g_dir);
    rc = run_cmd("'%s' eval-spec %s%s", bin, args, "");
    CHECK_EQ_I64(rc, 0);
    snprintf(path, sizeof path, "%s/spec.json", g_dir);
    root = read_json(path);
    CHECK(root != NULL);
    if (root) CHECK_EQ_I64(check_spec_rows(cJSON_GetObjectItem(root, "runs"), 8), 2);  // 8 built-in prompts, batch 1 and 2
    if (root) CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(root, "draft_vocab")->valuedouble, 300);  // the draft's list
    cJSON_Delete(root);
    // --draft-vocab: full head, the first N of the list; more than the list, a list a draft lacks, a spoiled list:
    // exit 3 with the reason, no JSON
    {
        static const struct {
            const char *opt, *draft;
            int rc;
            int64_t vocab;
            const char *msg;
        } cases[] = {
            {"full", "05-draft", 0, 49152, NULL},
            {"100", "05-draft", 0, 100, NULL},
            {"301", "05-draft", 3, 0, "301 ids asked for, the file lists 300"},
            {"0", "05-draft", 2, 0, "expected full or a count >= 1"},
            {"50", "04-cut", 3, 0, "has no draft_vocab.json"},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            snprintf(path, sizeof path, "%s/spec-v.json", g_dir);
            remove(path);
            snprintf(args, sizeof args, "--target %s/teacher.json --draft %s/runs/p/%s/model --tokenizer %s/%s --k 2 --max-tokens 5 "
                     "--draft-vocab %s --json %s/spec-v.json", g_dir, g_dir, cases[i].draft, cwd, GGUF, cases[i].opt, g_dir);
            rc = run_cmd("'%s' eval-spec %s%s", bin, args, "");
            CHECK_EQ_I64(rc, cases[i].rc);
            if (cases[i].msg) {
                if (!log_contains(cases[i].msg)) fprintf(stderr, "eval-spec --draft-vocab %s: no \"%s\" in the log\n", cases[i].opt, cases[i].msg);
                CHECK(log_contains(cases[i].msg));
                CHECK(!dl_file_exists(path));
                continue;
            }
            root = read_json(path);
            CHECK(root != NULL);
            if (root) {
                CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(root, "draft_vocab")->valuedouble, cases[i].vocab);
                CHECK_EQ_I64(check_spec_rows(cJSON_GetObjectItem(root, "runs"), 8), 1);  // still equal to plain
            }
            cJSON_Delete(root);
        }
        // spoiled lists in a copy of the draft: each refused naming the file and the fault
        static const struct {
            const char *json, *msg;
        } spoiled[] = {
            {"{\"format\": \"distill-draft-vocab\", \"version\": 1, \"vocab_size\": 49152, \"counted_tokens\": 9, \"ids\": [5, 7, 5], \"counts\": [3, 2, 1]}",
             "appears more than once"},
            {"{\"format\": \"distill-draft-vocab\", \"version\": 1, \"vocab_size\": 49152, \"counted_tokens\": 9, \"ids\": [5, 49152], \"counts\": [3, 2]}",
             "\"ids\"[1] must be an integer in 0..49151"},
            {"{\"format\": \"distill-draft-vocab\", \"version\": 1, \"vocab_size\": 32000, \"counted_tokens\": 9, \"ids\": [5], \"counts\": [3]}",
             "written for a vocabulary of 32000 ids"},
            {"{\"format\": \"distill-draft-vocab\", \"version\": 1, \"vocab_size\": 49152, \"counted_tokens\": 9, \"ids\": [5, 6], \"counts\": [3]}",
             "2 ids and 1 counts"},
            {"[1, 2", "not a JSON object"},
        };
        char cmd[2400];
        snprintf(cmd, sizeof cmd, "rm -rf %s/spoiled && cp -r %s/runs/p/05-draft/model %s/spoiled", g_dir, g_dir, g_dir);
        CHECK(system(cmd) == 0);
        for (size_t i = 0; i < sizeof spoiled / sizeof spoiled[0]; i++) {
            snprintf(path, sizeof path, "%s/spoiled/draft_vocab.json", g_dir);
            write_file(path, spoiled[i].json);
            snprintf(path, sizeof path, "%s/spec-v.json", g_dir);
            remove(path);
            snprintf(args, sizeof args, "--target %s/teacher.json --draft %s/spoiled --tokenizer %s/%s --k 2 --max-tokens 5 "
                     "--json %s/spec-v.json", g_dir, g_dir, cwd, GGUF, g_dir);
            rc = run_cmd("'%s' eval-spec %s%s", bin, args, "");
            CHECK_EQ_I64(rc, 3);
            if (!log_contains(spoiled[i].msg)) fprintf(stderr, "spoiled draft_vocab.json %zu: no \"%s\" in the log\n", i, spoiled[i].msg);
            CHECK(log_contains(spoiled[i].msg) && log_contains("spoiled/draft_vocab.json"));
            CHECK(!dl_file_exists(path));
        }
    }
    // ---- prompt formats: a .jsonl file holds chats (rendered with the chat template and the assistant header),
    // --chat wraps raw lines as the user turn; prompt_tokens counts what the models saw
    {
        static const char *user[2] = {"Name a prime number.", "What is 2 + 2?"};
        char jl[400], txt[400], badp[400];
        snprintf(jl, sizeof jl, "%s/chats.jsonl", g_dir);
        snprintf(txt, sizeof txt, "%s/raw.txt", g_dir);
        snprintf(badp, sizeof badp, "%s/bad.jsonl", g_dir);
        FILE *f = fopen(jl, "w");
        fprintf(f, "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"%s\"}]}\n"
                   "\n{\"prompt\": \"%s\"}\n", user[0], user[1]);
        fclose(f);
        f = fopen(txt, "w");
        fprintf(f, "%s\n%s\n", user[0], user[1]);
        fclose(f);
        f = fopen(badp, "w");
        fprintf(f, "{\"prompt\": \"%s\"}\n{\"messages\": 3}\n", user[0]);
        fclose(f);
        char gg[700];
        snprintf(gg, sizeof gg, "%s/%s", cwd, GGUF);
        Tokenizer *tok = NULL;
        ChatFamily fam;
        CHECK(tokenizer_load(gg, &tok, &e) == 0 && chat_family_for(tok, &fam, &e) == 0);
        int64_t want_chat = 0, want_jsonl = 0, want_raw = 0;
        for (int i = 0; tok && i < 2; i++) {
            int32_t *ids = NULL;
            int64_t n = 0;
            ChatMessage m[2] = {{"system", "Be brief."}, {"user", user[i]}};
            CHECK(chat_render(tok, fam, m + 1, 1, true, &ids, NULL, &n, &e) == 0);
            want_chat += n, free(ids);
            CHECK(chat_render(tok, fam, i == 0 ? m : m + 1, i == 0 ? 2 : 1, true, &ids, NULL, &n, &e) == 0);
            want_jsonl += n, free(ids);
            CHECK(tokenizer_encode(tok, user[i], strlen(user[i]), &ids, &n, &e) == 0);
            want_raw += n, free(ids);
        }
        tokenizer_free(tok);
        if (!(want_chat > want_raw + 10 && want_jsonl > want_raw + 10 && want_jsonl != want_chat))
            fprintf(stderr, "prompt tokens: raw %lld, chat %lld, jsonl %lld\n", (long long)want_raw, (long long)want_chat, (long long)want_jsonl);
        CHECK(want_chat > want_raw + 10 && want_jsonl > want_raw + 10 && want_jsonl != want_chat);
        const char *modes[3][2] = {{jl, ""}, {txt, " --chat"}, {txt, ""}};
        const int64_t want[3] = {want_jsonl, want_chat, want_raw};
        const char *fmt_name[3] = {"chat (jsonl)", "chat", "raw text"};
        for (int m = 0; m < 3; m++) {
            snprintf(args, sizeof args, "--target %s/teacher.json --draft-layers 0,3 --tokenizer %s --k 1 --max-tokens 3 "
                     "--prompts %s --json %s/spec-fmt.json%s", g_dir, gg, modes[m][0], g_dir, modes[m][1]);
            rc = run_cmd("'%s' eval-spec %s%s", bin, args, "");
            CHECK_EQ_I64(rc, 0);
            snprintf(path, sizeof path, "%s/spec-fmt.json", g_dir);
            root = read_json(path);
            CHECK(root != NULL);
            if (root) {
                CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(root, "prompts")->valuedouble, 2);
                CHECK_EQ_I64((int64_t)cJSON_GetObjectItem(root, "prompt_tokens")->valuedouble, want[m]);
                CHECK(!strcmp(cJSON_GetObjectItem(root, "prompt_format")->valuestring, fmt_name[m]));
                CHECK_EQ_I64(check_spec_rows(cJSON_GetObjectItem(root, "runs"), 2), 1);
            }
            cJSON_Delete(root);
            remove(path);
        }
        snprintf(args, sizeof args, "--target %s/teacher.json --draft-layers 0,3 --tokenizer %s --k 1 --max-tokens 3 "
                 "--prompts %s --json %s/spec-bad.json", g_dir, gg, badp, g_dir);
        rc = run_cmd("'%s' eval-spec %s%s", bin, args, "");
        CHECK_EQ_I64(rc, 3);
        CHECK(log_has("bad.jsonl:2: \"messages\""));
        snprintf(path, sizeof path, "%s/spec-bad.json", g_dir);
        CHECK(!dl_file_exists(path));
    }
    // ---- resume: generate -> draft, stopped after 2 of 5 steps, resumed; against an uninterrupted run (reuse off:
    // the second run would otherwise take the first one's draft)
    snprintf(recipe2, sizeof recipe2, "%s/resume.toml", g_dir);
    write_recipe(recipe2, head, "[[stage]]\nkind = \"draft\"\ndata = \"samples\"\nsteps = 5\nreuse = false\nvocab = 40\n[stage.loss]\nce = 1.0\nkl = 1.0\n");
    rc = run_cmd("'%s' '%s' --quiet --set run.name=%s", bin, recipe2, "whole");
    CHECK_EQ_I64(rc, 0);
    rc = run_cmd("DISTILL_TEST_STOP_AFTER=2 '%s' '%s' --quiet --set run.name=%s", bin, recipe2, "cut");
    CHECK_EQ_I64(rc, 4);
    snprintf(path, sizeof path, "%s/runs/cut/02-draft/model", g_dir);
    CHECK(!dl_is_dir(path));  // no export of an unfinished fine-tune
    rc = run_cmd("'%s' '%s' --quiet --resume --set run.name=%s", bin, recipe2, "cut");
    CHECK_EQ_I64(rc, 0);
    CHECK(same_file_bytes("whole", "cut"));
    {  // the trimmed-head list too; a finished draft that lost its list (a kill between the two) exports both again
        char la[600], lb[600];
        snprintf(la, sizeof la, "%s/runs/whole/02-draft/model/draft_vocab.json", g_dir);
        snprintf(lb, sizeof lb, "%s/runs/cut/02-draft/model/draft_vocab.json", g_dir);
        CHECK(files_equal(la, lb, true));
        remove(lb);  // as if killed after the weights, before the list and the stage's DONE marker
        snprintf(lb, sizeof lb, "%s/runs/cut/02-draft/DONE", g_dir);
        CHECK(remove(lb) == 0);
        snprintf(lb, sizeof lb, "%s/runs/cut/02-draft/model/draft_vocab.json", g_dir);
        rc = run_cmd("'%s' '%s' --quiet --resume --set run.name=%s", bin, recipe2, "cut");
        CHECK_EQ_I64(rc, 0);
        CHECK(files_equal(la, lb, true) && same_file_bytes("whole", "cut"));
    }
    // ---- reuse: the same draft stage in another run (its data shard written anew) copies the first run's model
    // from runs/.draft-cache and trains nothing; other steps train; a cache that does not load is dropped with a
    // warning and the stage trains to the same bytes; kl_from = "student" drafts are never reused (below)
    {
        snprintf(recipe2, sizeof recipe2, "%s/reuse.toml", g_dir);
        write_recipe(recipe2, head, "[[stage]]\nkind = \"draft\"\ndata = \"samples\"\nsteps = 5\n[stage.loss]\nce = 1.0\nkl = 1.0\n");
        char cdir[400];
        snprintf(cdir, sizeof cdir, "%s/runs/.draft-cache", g_dir);
        const int n0 = count_entries(cdir);  // the pipeline's three drafts (the resume runs had reuse = false)
        CHECK_EQ_I64(n0, 3);
        clear_log();
        CHECK_EQ_I64(run_cmd("'%s' '%s' --set run.name=%s", bin, recipe2, "ra"), 0);
        CHECK(!log_contains("reused from .draft") && !log_contains("draft reused"));
        CHECK_EQ_I64(count_entries(cdir), n0 + 1);
        clear_log();
        CHECK_EQ_I64(run_cmd("'%s' '%s' --set run.name=%s", bin, recipe2, "rb"), 0);
        CHECK(log_has("draft: draft reused from"));
        CHECK(same_file_bytes("ra", "rb"));
        CHECK_EQ_I64(metrics_rows(g_dir, "rb", "draft"), 0);  // nothing trained
        CHECK(metrics_rows(g_dir, "ra", "draft") >= 5);
        clear_log();
        CHECK_EQ_I64(run_cmd("'%s' '%s' --set run.name=%s --set stage.draft.steps=4", bin, recipe2, "rc"), 0);
        CHECK(!log_contains("draft reused"));
        CHECK_EQ_I64(count_entries(cdir), n0 + 2);
        // spoil the first key's cached weights: the next run warns, drops them, trains, and keeps its own
        char key[300] = "", spoil[800];
        cache_entry_of_ra(cdir, g_dir, key, sizeof key);
        CHECK(key[0] != 0);
        snprintf(spoil, sizeof spoil, "%s/%s/model.safetensors", cdir, key);
        write_file(spoil, "not safetensors");
        clear_log();
        CHECK_EQ_I64(run_cmd("'%s' '%s' --set run.name=%s", bin, recipe2, "rd"), 0);
        CHECK(log_has("does not fit this stage"));
        CHECK(!log_contains("draft reused"));
        CHECK(same_file_bytes("ra", "rd"));
        CHECK_EQ_I64(count_entries(cdir), n0 + 2);
        clear_log();
        CHECK_EQ_I64(run_cmd("'%s' '%s' --set run.name=%s", bin, recipe2, "re"), 0);
        CHECK(log_has("draft: draft reused from"));  // the kept copy is whole again
        CHECK(same_file_bytes("ra", "re"));
    }
    // ---- kl_from: a draft of all 4 teacher layers (the teacher itself, lr 1e-30) starts at KL 0 to the teacher;
    // with kl_from = "student" its KL at step 1 is the student's distance from the teacher, > 0
    snprintf(recipe2, sizeof recipe2, "%s/klfrom.toml", g_dir);
    write_recipe(recipe2, head, "[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"layerwise\"\ndata = \"samples\"\nsteps = 2\n\n"
                                "[[stage]]\nkind = \"draft\"\nname = \"kt\"\ndata = \"samples\"\nlayers = [0, 1, 2, 3]\nsteps = 1\n"
                                "[stage.loss]\nce = 0.0\nkl = 1.0\n[stage.optimizer]\nlr = 1e-30\n\n"
                                "[[stage]]\nkind = \"draft\"\nname = \"ks\"\ndata = \"samples\"\nlayers = [0, 1, 2, 3]\nsteps = 1\nkl_from = \"student\"\n"
                                "[stage.loss]\nce = 0.0\nkl = 1.0\n[stage.optimizer]\nlr = 1e-30\n");
    clear_log();
    rc = run_cmd("'%s' '%s' --set run.name=%s", bin, recipe2, "kl");
    CHECK_EQ_I64(rc, 0);
    CHECK(log_has("ks: KL to the student"));
    clear_log();
    rc = run_cmd("'%s' '%s' --set run.name=%s", bin, recipe2, "kl2");
    CHECK_EQ_I64(rc, 0);
    CHECK(log_has("kt: draft reused from"));
    CHECK(!log_contains("ks: draft reused") && log_has("ks: KL to the student"));
    {
        double kl[2] = {-1, -1};  // step 1 of kt, ks
        snprintf(path, sizeof path, "%s/runs/kl/metrics.jsonl", g_dir);
        char *mt = slurp(path);
        for (char *sv = NULL, *ln = mt ? strtok_r(mt, "\n", &sv) : NULL; ln; ln = strtok_r(NULL, "\n", &sv)) {
            cJSON *o = cJSON_Parse(ln);
            const cJSON *stg = cJSON_GetObjectItem(o, "stage"), *step = cJSON_GetObjectItem(o, "step");
            const cJSON *k = cJSON_GetObjectItem(cJSON_GetObjectItem(o, "parts"), "kl");
            if (cJSON_IsString(stg) && cJSON_IsNumber(step) && step->valuedouble == 1 && cJSON_IsNumber(k)) {
                if (!strcmp(stg->valuestring, "kt")) kl[0] = k->valuedouble;
                if (!strcmp(stg->valuestring, "ks")) kl[1] = k->valuedouble;
            }
            cJSON_Delete(o);
        }
        free(mt);
        if (!(kl[0] >= 0 && kl[0] < 1e-5 && kl[1] > 1e-2)) fprintf(stderr, "kl_from: step-1 KL teacher %g, student %g\n", kl[0], kl[1]);
        CHECK(kl[0] >= 0 && kl[0] < 1e-5);
        CHECK(kl[1] > 1e-2);
    }
    // ---- bad recipes: every problem at once, nothing run
    snprintf(bad, sizeof bad, "%s/bad.toml", g_dir);
    rc = run_recipe_fresh(bin, bad, head, "[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"layerwise\"\ndata = \"samples\"\nsteps = 2\nlayers = [0, 1]\n\n"
                            "[[stage]]\nkind = \"draft\"\nname = \"d1\"\ndata = \"samples\"\nlayers = [0, 9]\nsteps = 2\n\n"
                            "[[stage]]\nkind = \"draft\"\nname = \"d2\"\ndata = \"samples\"\nlayers = [3, 1]\nsteps = 2\n[stage.loss]\nmse = 1.0\n\n"
                            "[[stage]]\nkind = \"draft\"\nname = \"d3\"\nsteps = 2\n\n"
                            "[[stage]]\nkind = \"draft\"\nname = \"d5\"\ndata = \"samples\"\nsteps = 2\nkl_from = \"student\"\n[stage.loss]\nkl = 0.0\n\n"
                            "[[stage]]\nkind = \"eval\"\nname = \"e1\"\ndata = [\"samples\"]\ndraft = \"d4\"\nspec_k = [2, 9]\nspec_branches = [0]\n\n"
                            "[[stage]]\nkind = \"eval\"\nname = \"e2\"\ndata = [\"samples\"]\ndraft = \"init\"\n\n"
                            "[[stage]]\nkind = \"eval\"\nname = \"e3\"\ndata = [\"samples\"]\ndraft = \"d4\"\n\n"
                            "[[stage]]\nkind = \"draft\"\nname = \"d4\"\ndata = \"samples\"\nsteps = 2\n", "bad");
    CHECK_EQ_I64(rc, 3);
    CHECK(log_has("key 'layers' does not apply to a layerwise stage (it is for: draft)"));
    CHECK(log_has("stage 'd1'.layers: layer 9 does not exist (the teacher has 4 layers, 0..3)"));
    CHECK(log_has("stage 'd2'.layers must be ascending, each layer once (1 after 3)"));
    CHECK(log_has("stage 'd2' (draft): loss.mse aligns Mamba layers; a draft has none"));
    CHECK(log_has("stage 'd3' needs data = \"NAME\""));
    CHECK(log_has("stage 'd5': kl_from = \"student\" needs [stage.loss] kl or reverse_kl > 0"));
    CHECK(log_has("stage 'e1'.spec_k: K = 9 is outside 1..8"));
    CHECK(log_has("stage 'e1'.spec_branches: W = 0 is outside 1..8"));
    CHECK(log_has("stage 'e1' uses the draft of stage 'd4', which runs after it"));
    CHECK(log_has("stage 'e2': draft = 'init' is not a draft stage (its kind is init)"));
    CHECK(log_has("stage 'e3' uses the draft of stage 'd4', which runs after it"));
    snprintf(path, sizeof path, "%s/runs/bad", g_dir);
    CHECK(!dl_is_dir(path));
    rc = run_recipe_fresh(bin, bad, head, "[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"eval\"\ndata = [\"samples\"]\ndraft = \"drfat\"\n\n"
                          "[[stage]]\nkind = \"draft\"\nname = \"draft\"\ndata = \"samples\"\nsteps = 2\n", "bad2");
    CHECK_EQ_I64(rc, 3);
    CHECK(log_has("stage 'eval': no stage named 'drfat' (draft = the name of a draft stage) (did you mean 'draft'?)"));
    rc = run_recipe_fresh(bin, bad, head, "[[stage]]\nkind = \"draft\"\nname = \"early\"\ndata = \"samples\"\nsteps = 2\nkl_from = \"student\"\n"
                          "[stage.loss]\nkl = 1.0\n\n[[stage]]\nkind = \"init\"\n", "bad3");
    CHECK_EQ_I64(rc, 3);
    CHECK(log_has("stage 'early': kl_from = \"student\" needs an earlier stage that makes the student"));
    if (check_fail_) dump_log();
    else if (getenv("DISTILL_TEST_KEEP")) printf("kept %s\n", g_dir);  // to look at the runs
    else {
        snprintf(args, sizeof args, "rm -rf '%s'", g_dir);
        if (system(args)) {}
    }
    return check_report("test_draft_stage");
}
