// test_recipe.c: the recipe schema and validator. Every kind of error gives the right file:line:col:
// message (and all problems are listed together), --set overrides are typed and positioned, layer
// fractions resolve as the paper's layouts, the resolved recipe reads back to the same text, every
// recipe in recipes/ validates, and the plan's parameter counts and memory formula hold.
#include <dirent.h>
#include <string.h>
#include <unistd.h>

#include "distill/plan.h"
#include "distill/recipe.h"
#include "tests/check.h"

static char g_dir[256];
static char g_recipe[300];

// A teacher config of 8 layers (d 64, 4 heads, 2 kv heads) and a small data file, in a temp directory.
static void setup(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_recipe_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        exit(1);
    }
    char p[400];
    snprintf(p, sizeof p, "%s/config.json", g_dir);
    FILE *f = fopen(p, "w");
    fputs("{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 64,\n"
          " \"intermediate_size\": 128, \"num_hidden_layers\": 8, \"num_attention_heads\": 4, \"num_key_value_heads\": 2,\n"
          " \"vocab_size\": 256, \"max_position_embeddings\": 256, \"rope_theta\": 10000.0, \"rms_norm_eps\": 1e-5,\n"
          " \"tie_word_embeddings\": false, \"bos_token_id\": 1, \"eos_token_id\": 2}\n",
          f);
    fclose(f);
    snprintf(p, sizeof p, "%s/train.jsonl", g_dir);
    f = fopen(p, "w");
    fputs("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n", f);
    fclose(f);
    snprintf(p, sizeof p, "%s/tokenizer.json", g_dir);
    f = fopen(p, "w");
    fputs("{}\n", f);
    fclose(f);
    snprintf(g_recipe, sizeof g_recipe, "%s/r.toml", g_dir);
}

static void teardown(void) {
    char p[400];
    const char *files[] = {"config.json", "train.jsonl", "tokenizer.json", "r.toml", "r2.toml"};
    for (size_t i = 0; i < DL_ARRAY_LEN(files); i++) {
        snprintf(p, sizeof p, "%s/%s", g_dir, files[i]);
        unlink(p);
    }
    rmdir(g_dir);
}

// The first 8 lines of every test recipe; a case's own text starts at line 9.
static void write_recipe(const char *path, const char *tail) {
    FILE *f = fopen(path, "w");
    fprintf(f,
            "tokenizer.path = \"%s/tokenizer.json\"\n"  // only checked to exist here
            "run.name = \"t\"\n"
            "[teacher]\n"
            "path = \"%s/config.json\"\n"
            "[data.train]\n"
            "sources = [\"%s/train.jsonl\"]\n"
            "format = \"chat\"\n"
            "seq_len = 64\n"
            "%s",
            g_dir, g_dir, g_dir, tail);
    fclose(f);
}

#define GOOD_STAGES                                                                                                    \
    "[[stage]]\n"                                                                                                      \
    "kind = \"init\"\n"                                                                                                \
    "[[stage]]\n"                                                                                                      \
    "kind = \"layerwise\"\n"                                                                                           \
    "data = \"train\"\n"                                                                                               \
    "steps = 5\n"

static int load(const char *tail, const char *const *sets, int n_sets, bool dry, Recipe *r, RecipeErrors *errs) {
    write_recipe(g_recipe, tail);
    RecipeOptions o = {.dry_run = dry};
    return recipe_load(g_recipe, sets, n_sets, &o, r, errs);
}

static bool has_msg(const RecipeErrors *errs, int line, int col, const char *what) {
    char pre[400];
    if (line > 0) snprintf(pre, sizeof pre, "%s:%d:%d: ", g_recipe, line, col);
    for (int i = 0; i < errs->n; i++)
        if ((line <= 0 || !strncmp(errs->msg[i], pre, strlen(pre))) && strstr(errs->msg[i], what)) return true;
    return false;
}

// The recipe must fail, and one of its errors must be at line:col and contain `what`.
static int expect_err_(const char *tail, const char *const *sets, int n_sets, int line, int col, const char *what, int src) {
    Recipe r;
    RecipeErrors errs;
    int rc = load(tail, sets, n_sets, false, &r, &errs);
    int ok = rc != 0 && has_msg(&errs, line, col, what);
    if (!ok) {
        fprintf(stderr, "test line %d: expected error at %d:%d containing \"%s\"; got %d error(s):\n", src, line, col, what, errs.n);
        for (int i = 0; i < errs.n; i++) fprintf(stderr, "    %s\n", errs.msg[i]);
    }
    recipe_errors_free(&errs);
    recipe_free(&r);
    return ok;
}
#define EXPECT_ERR(tail, line, col, what) CHECK(expect_err_(tail, NULL, 0, line, col, what, __LINE__))
#define EXPECT_SET_ERR(tail, set, what)                                                                                \
    do {                                                                                                               \
        const char *s_[] = {set};                                                                                      \
        CHECK(expect_err_(tail, s_, 1, 0, 0, what, __LINE__));                                                         \
    } while (0)

static void test_good_and_defaults(void) {
    Recipe r;
    RecipeErrors errs;
    int rc = load(GOOD_STAGES, NULL, 0, false, &r, &errs);
    CHECK(rc == 0);
    for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
    if (rc == 0) {
        CHECK(!strcmp(r.run.output_dir, "checkpoints/runs"));
        CHECK_EQ_I64(r.run.seed, 1234);
        CHECK_EQ_I64(r.teacher.seed, 1234);  // follows run.seed
        CHECK_EQ_I64(r.teacher_cfg.base.n_layer, 8);
        CHECK_EQ_I64(r.hybrid.n_attn, 4);  // default attn_fraction 0.5: 1,3,5,7
        CHECK(r.hybrid.attn_layers[0] == 1 && r.hybrid.attn_layers[3] == 7);
        CHECK_EQ_I64(r.n_stages, 2);
        const StageSpec *lw = &r.stages[1];
        CHECK(!strcmp(lw->name, "layerwise") && lw->kind == STAGE_LAYERWISE);
        CHECK(lw->loss.ce == 1.0 && lw->loss.kl == 0.1 && lw->loss.temperature == 1.0);  // the paper's alpha, beta
        CHECK(!strcmp(lw->trainable, "*.mamba.*"));
        CHECK_EQ_I64(lw->n_schedule, 1);
        CHECK_EQ_I64(lw->schedule[0].steps, 5);
        CHECK_EQ_I64(lw->data_index, 0);
        CHECK(lw->opt.lr == 8e-5 && lw->opt.beta1 == 0.9 && lw->opt.beta2 == 0.98);
    }
    recipe_errors_free(&errs);
    recipe_free(&r);

    // a full recipe: every table, schedule, overrides per stage, generate -> data set
    const char *full = "[hybrid]\n"                          // 9
                       "mixer = \"mamba2\"\n"                 // 10
                       "attn_layers = [7, 3]\n"               // 11
                       "[optimizer]\n"                        // 12
                       "lr = 1e-3\n"                          // 13
                       "warmup_ratio = 0.1\n"                 // 14
                       "[hardware]\n"                         // 15
                       "recompute = \"mlp\"\n"                // 16
                       "[data.gen]\n"                         // 17
                       "seq_len = 32\n"                       // 18
                       "[[stage]]\n"                          // 19
                       "kind = \"generate\"\n"                // 20
                       "data = \"train\"\n"                   // 21
                       "output = \"gen\"\n"                   // 22
                       "[[stage]]\n"                          // 23
                       "kind = \"init\"\n"                    // 24
                       "[[stage]]\n"                          // 25
                       "kind = \"layerwise\"\n"               // 26
                       "data = \"gen\"\n"                     // 27
                       "steps = 7\n"                          // 28
                       "[[stage.schedule]]\n"                 // 29
                       "attn_layers = [1, 3, 5, 7]\n"         // 30
                       "steps = 3\n"                          // 31
                       "[[stage.schedule]]\n"                 // 32
                       "attn_fraction = 0.25\n"               // 33
                       "[[stage]]\n"                          // 34
                       "kind = \"sft\"\n"                     // 35
                       "name = \"tune\"\n"                    // 36
                       "data = \"gen\"\n"                     // 37
                       "epochs = 2\n"                         // 38
                       "trainable = [\"*.mamba.*\", \"model.norm.weight\"]\n"
                       "[stage.optimizer]\n"
                       "lr = 2e-5\n"
                       "warmup_steps = 3\n"
                       "[[stage]]\n"
                       "kind = \"eval\"\n"
                       "data = \"gen\"\n"
                       "[[stage]]\n"
                       "kind = \"export\"\n";
    rc = load(full, NULL, 0, false, &r, &errs);
    CHECK(rc == 0);
    for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
    if (rc == 0) {
        CHECK(r.hybrid.mixer == 1 && r.hybrid.n_attn == 2 && r.hybrid.attn_layers[0] == 3 && r.hybrid.attn_layers[1] == 7);
        CHECK(r.hybrid.attn_fraction < 0);
        CHECK(r.optimizer.warmup_steps == -1 && r.optimizer.warmup_ratio == 0.1);
        CHECK(r.data[1].produced_by == 0 && r.data[1].format == FMT_CHAT);
        const StageSpec *lw = &r.stages[2];
        CHECK_EQ_I64(lw->n_schedule, 2);
        CHECK_EQ_I64(lw->schedule[0].steps, 3);
        CHECK_EQ_I64(lw->schedule[1].steps, 7);  // inherits the stage's
        CHECK_EQ_I64(lw->schedule[1].n_attn, 2);  // 0.25 of 8 layers: 3, 7
        const StageSpec *sft = &r.stages[3];
        CHECK(!strcmp(sft->name, "tune") && sft->epochs == 2 && sft->steps == 0);
        CHECK(sft->opt.lr == 2e-5 && sft->opt.warmup_steps == 3 && sft->opt.clip == 1.0);
        CHECK(!strcmp(sft->trainable, "*.mamba.*,model.norm.weight"));
        CHECK(sft->loss.ce == 1 && sft->loss.kl == 0);
        CHECK(r.stages[4].n_eval_sets == 1 && r.stages[4].eval_index[0] == 1);
        // resolved -> read back -> resolved: identical text
        char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        FILE *f = open_memstream(&a, &na);
        recipe_write_resolved(&r, f);
        fclose(f);
        char p2[300];
        snprintf(p2, sizeof p2, "%s/r2.toml", g_dir);
        f = fopen(p2, "w");
        fputs(a, f);
        fclose(f);
        Recipe r2;
        RecipeErrors e2;
        RecipeOptions o = {0};
        int rc2 = recipe_load(p2, NULL, 0, &o, &r2, &e2);
        CHECK(rc2 == 0);
        for (int i = 0; i < e2.n; i++) fprintf(stderr, "  resolved: %s\n", e2.msg[i]);
        if (rc2 == 0) {
            f = open_memstream(&b, &nb);
            recipe_write_resolved(&r2, f);
            fclose(f);
            // the first line names the source file; the rest must match
            CHECK(!strcmp(strchr(a, '\n'), strchr(b, '\n')));
        }
        recipe_errors_free(&e2);
        recipe_free(&r2);
        free(a);
        free(b);
    }
    recipe_errors_free(&errs);
    recipe_free(&r);
}

static void test_errors(void) {
    // unknown keys, with hints
    EXPECT_ERR("[optimizer]\nlrr = 1e-4\n" GOOD_STAGES, 10, 1, "unknown key 'lrr' in [optimizer] (did you mean 'lr'?)");
    EXPECT_ERR("[optimiser]\nlr = 1e-4\n" GOOD_STAGES, 9, 2, "unknown table or key 'optimiser' (did you mean 'optimizer'?)");
    EXPECT_ERR("[data.x]\nsource = [\"a\"]\n" GOOD_STAGES, 10, 1, "unknown key 'source' in [data.x] (did you mean 'sources'?)");
    // types
    EXPECT_ERR("[run]\n", 9, 1, "table [run] is defined twice");  // TOML errors come alone, with position
    EXPECT_ERR("[optimizer]\nlr = \"fast\"\n" GOOD_STAGES, 10, 6, "[optimizer].lr must be a number, not string");
    EXPECT_ERR("[optimizer]\nmicro_batch = 2.0\n" GOOD_STAGES, 10, 15, "must be an integer: write 2 without a fraction");
    EXPECT_ERR("[optimizer]\nbetas = [0.9]\n" GOOD_STAGES, 10, 9, "must be an array of two numbers");
    EXPECT_ERR("[optimizer]\nbetas = [0.9, 1.5]\n" GOOD_STAGES, 10, 15, "beta2 must be a number in [0, 1)");
    EXPECT_ERR("[hybrid]\nattn_layers = [1, \"3\"]\n" GOOD_STAGES, 10, 19, "element 2 must be an integer layer index");
    EXPECT_ERR("[data.train.x]\n" GOOD_STAGES, 9, 13, "unknown key 'x' in [data.train]");
    // ranges and choices
    EXPECT_ERR("[optimizer]\nlr = -1\n" GOOD_STAGES, 10, 6, "[optimizer].lr = -1 is out of range (expected in (0, 1])");
    EXPECT_ERR("[hardware]\nzero = 4\n" GOOD_STAGES, 10, 8, "[hardware].zero = 4 is out of range (expected in [0, 3])");
    EXPECT_ERR("[hardware]\nrecompute = \"ful\"\n" GOOD_STAGES, 10, 13, "is not one of: none, mlp, full (did you mean 'full'?)");
    EXPECT_ERR("[optimizer]\nwarmup_steps = 5\nwarmup_ratio = 0.1\n" GOOD_STAGES, 11, 16, "give warmup_steps or warmup_ratio, not both");
    // layers
    EXPECT_ERR("[hybrid]\nattn_layers = [1, 8]\n" GOOD_STAGES, 10, 19, "layer 8 does not exist (the teacher has 8 layers, 0..7)");
    EXPECT_ERR("[hybrid]\nattn_layers = [1, 1]\n" GOOD_STAGES, 10, 19, "layer 1 is listed twice");
    EXPECT_ERR("[hybrid]\nattn_fraction = 0.3\n" GOOD_STAGES, 10, 17, "attn_fraction = 0.3: use 0, 1, 1/k");
    EXPECT_ERR("[hybrid]\nattn_fraction = 0.5\nattn_layers = [1]\n" GOOD_STAGES, 10, 17, "give attn_layers or attn_fraction, not both");
    // stages
    EXPECT_ERR("[[stage]]\nkind = \"layerwse\"\n", 10, 8, "unknown kind \"layerwse\"");
    EXPECT_ERR("[[stage]]\nkind = \"layerwse\"\n", 10, 8, "(did you mean 'layerwise'?)");
    EXPECT_ERR("[[stage]]\nname = \"x\"\n", 9, 1, "[[stage]] #1 has no kind");
    EXPECT_ERR("[stage]\nkind = \"init\"\n", 9, 2, "write [[stage]] (two brackets)");
    EXPECT_ERR("", 0, 0, "the recipe has no [[stage]]");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\nsteps = 1\nbeta = 0.1\n", 19, 1,
               "key 'beta' does not apply to a sft stage (it is for: dpo)");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"trian\"\nsteps = 1\n", 17, 8,
               "no data set 'trian' (define [data.trian]) (did you mean 'train'?)");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\n", 15, 1, "needs a length: steps = N or epochs = X");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\nsteps = 1\nepochs = 1\n", 19, 10, "give steps or epochs, not both");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\nsteps = 0\n", 18, 9, "steps = 0 is out of range (expected >= 1)");
    EXPECT_ERR("[[stage]]\nkind = \"layerwise\"\ndata = \"train\"\nsteps = 5\n", 10, 8, "works on the hybrid: put an init stage before it");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"init\"\n", 16, 8, "a recipe has one init stage");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"eval\"\nname = \"layerwise\"\ndata = \"train\"\n", 17, 8, "stage name 'layerwise' is used twice");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"dpo\"\ndata = \"train\"\nsteps = 1\n", 17, 8, "needs a data set with format = \"preference\"");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\nsteps = 1\ntrainable = \"*.mambaa.*\"\n", 19, 13,
               "trainable pattern '*.mambaa.*' matches no tensor");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\nsteps = 1\nteacher_logits = \"cache\"\n", 19, 18,
               "needs an earlier teacher_cache stage on data 'train'");
    EXPECT_ERR(GOOD_STAGES "[[stage]]\nkind = \"sft\"\ndata = \"train\"\nsteps = 1\n[stage.loss]\nce = 0\n", 19, 1,
               "every loss weight is 0");
    // generate and produced data
    EXPECT_ERR("[data.gen]\n[[stage]]\nkind = \"init\"\n[[stage]]\nkind = \"sft\"\ndata = \"gen\"\nsteps = 1\n", 9, 1,
               "[data.gen] has no sources and no generate stage writes it");
    EXPECT_ERR("[data.gen]\n[[stage]]\nkind = \"init\"\n[[stage]]\nkind = \"sft\"\ndata = \"gen\"\nsteps = 1\n"
               "[[stage]]\nkind = \"generate\"\ndata = \"train\"\noutput = \"gen\"\n",
               14, 8, "uses data 'gen' before stage 'generate' writes it");
    EXPECT_ERR("[[stage]]\nkind = \"generate\"\ndata = \"train\"\noutput = \"train\"\n", 12, 10, "already has sources");
    // layerwise schedules
    EXPECT_ERR("[[stage]]\nkind = \"init\"\n[[stage]]\nkind = \"layerwise\"\ndata = \"train\"\nsteps = 1\n"
               "[[stage.schedule]]\nattn_fraction = 0.25\n",
               16, 17, "keeps fewer attention layers than [hybrid]");
    EXPECT_ERR("[[stage]]\nkind = \"init\"\n[[stage]]\nkind = \"layerwise\"\ndata = \"train\"\nsteps = 1\n"
               "[[stage.schedule]]\nattn_fraction = 0.5\n[[stage.schedule]]\nattn_layers = [1, 2, 3, 5, 7]\n",
               18, 15, "turns a Mamba layer of step 1 back into attention");
    EXPECT_ERR("[[stage]]\nkind = \"init\"\n[[stage]]\nkind = \"layerwise\"\ndata = \"train\"\nsteps = 1\n[[stage.schedule]]\nsteps = 2\n",
               15, 1, "give attn_layers or attn_fraction");
    // files and the teacher
    EXPECT_ERR("[data.more]\nsources = [\"/nonexistent/x.jsonl\"]\n" GOOD_STAGES, 10, 12, "[data.more] source '/nonexistent/x.jsonl' not found");
    EXPECT_SET_ERR(GOOD_STAGES, "tokenizer.path=/nonexistent/tok.json",
                   "--set tokenizer.path=/nonexistent/tok.json: tokenizer.path '/nonexistent/tok.json' not found");
    EXPECT_ERR("[run]\n" GOOD_STAGES, 9, 1, "defined twice");
}

static void test_teacher_errors(void) {
    // a recipe without a usable teacher: its own file, since the common prefix has one
    FILE *f = fopen(g_recipe, "w");
    fprintf(f, "[teacher]\npath = \"/nonexistent/model.gguf\"\nconfig = \"%s/config.json\"\n"
               "[data.train]\nsources = [\"%s/train.jsonl\"]\nformat = \"chat\"\n" GOOD_STAGES, g_dir, g_dir);
    fclose(f);
    Recipe r;
    RecipeErrors errs;
    RecipeOptions o = {.dry_run = false};
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) != 0 && has_msg(&errs, 2, 8, "teacher.path '/nonexistent/model.gguf' not found"));
    recipe_errors_free(&errs);
    recipe_free(&r);
    // a dry run plans from the config and only warns
    o.dry_run = true;
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) == 0);
    CHECK(r.n_warnings == 1 && strstr(r.warnings[0], "not found, plan uses the config in"));
    CHECK(!r.teacher_found && r.teacher_cfg.base.n_layer == 8);
    recipe_errors_free(&errs);
    recipe_free(&r);
    // no config fallback: an error even in a dry run, with the hint
    f = fopen(g_recipe, "w");
    fprintf(f, "[teacher]\npath = \"/nonexistent/model.gguf\"\n" GOOD_STAGES);
    fclose(f);
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) != 0 && has_msg(&errs, 2, 8, "add config ="));
    recipe_errors_free(&errs);
    recipe_free(&r);
    // a teacher file that is not a model
    f = fopen(g_recipe, "w");
    fprintf(f, "[teacher]\npath = \"%s/train.jsonl\"\n" GOOD_STAGES, g_dir);
    fclose(f);
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) != 0 && has_msg(&errs, 2, 8, "cannot read the model config"));
    recipe_errors_free(&errs);
    recipe_free(&r);
    // a config-only teacher has no tokenizer: text data needs [tokenizer] path
    f = fopen(g_recipe, "w");
    fprintf(f, "[teacher]\npath = \"%s/config.json\"\n[data.train]\nsources = [\"%s/train.jsonl\"]\nformat = \"chat\"\n" GOOD_STAGES,
            g_dir, g_dir);
    fclose(f);
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) != 0 &&
          has_msg(&errs, 2, 8, "teacher.path is a config .json (random weights, no tokenizer), but"));
    recipe_errors_free(&errs);
    recipe_free(&r);
    // stages written as an array with a non-table element
    f = fopen(g_recipe, "w");
    fprintf(f, "stage = [{kind = \"init\"}, 3]\n[teacher]\npath = \"%s/config.json\"\n", g_dir);
    fclose(f);
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) != 0 && has_msg(&errs, 1, 27, "stage #2 must be a table"));
    recipe_errors_free(&errs);
    recipe_free(&r);
    // missing [teacher]
    f = fopen(g_recipe, "w");
    fprintf(f, GOOD_STAGES);
    fclose(f);
    CHECK(recipe_load(g_recipe, NULL, 0, &o, &r, &errs) != 0 && has_msg(&errs, 0, 0, "missing [teacher]"));
    recipe_errors_free(&errs);
    recipe_free(&r);
}

// Many problems in one file: all reported, in file order.
static void test_all_at_once(void) {
    const char *tail = "[optimizer]\n"                  // 9
                       "lr = 0\n"                       // 10
                       "clipp = 1\n"                    // 11
                       "[run]\n";                       // 12: TOML error would stop everything, so not this
    (void)tail;
    Recipe r;
    RecipeErrors errs;
    int rc = load("[optimizer]\n"                       // 9
                  "lr = 0\n"                            // 10
                  "clipp = 1\n"                         // 11
                  "[hardware]\n"                        // 12
                  "gpus = 2\n"                          // 13 (device cpu)
                  "[[stage]]\n"                         // 14
                  "kind = \"init\"\n"                   // 15
                  "[[stage]]\n"                         // 16
                  "kind = \"distil\"\n",                // 17
                  NULL, 0, false, &r, &errs);
    CHECK(rc != 0);
    CHECK_EQ_I64(errs.n, 4);
    if (errs.n == 4) {
        CHECK(strstr(errs.msg[0], ":10:6: [optimizer].lr = 0 is out of range"));
        CHECK(strstr(errs.msg[1], ":11:1: unknown key 'clipp' in [optimizer] (did you mean 'clip'?)"));
        CHECK(strstr(errs.msg[2], ":13:8: hardware.gpus = 2 needs run.device = \"cuda\""));
        CHECK(strstr(errs.msg[3], ":17:8: [[stage]] #2: unknown kind \"distil\"") && strstr(errs.msg[3], "did you mean 'distill'"));
    }
    for (int i = 0; i < errs.n; i++) fprintf(stderr, "  (expected) %s\n", errs.msg[i]);
    recipe_errors_free(&errs);
    recipe_free(&r);
}

static void test_set(void) {
    Recipe r;
    RecipeErrors errs;
    const char *sets[] = {"optimizer.lr=1e-4", "stage.layerwise.steps=10", "run.device=cuda", "hybrid.attn_layers=[0, 7]",
                          "stage.layerwise.loss.kl=0.5", "stage.layerwise.optimizer.clip=0.1", "data.train.seq_len=128",
                          "hardware.zero=0", "run.name=\"quoted\""};
    int rc = load("[hybrid]\nattn_fraction = 0.5\n" GOOD_STAGES, sets, DL_ARRAY_LEN(sets), true, &r, &errs);
    CHECK(rc == 0);
    for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
    if (rc == 0) {
        CHECK(r.optimizer.lr == 1e-4);
        CHECK(r.stages[1].opt.lr == 1e-4 && r.stages[1].opt.clip == 0.1);
        CHECK_EQ_I64(r.stages[1].steps, 10);
        CHECK_EQ_I64(r.stages[1].schedule[0].steps, 10);
        CHECK(r.stages[1].loss.kl == 0.5);
        CHECK(r.run.device == DEVICE_CUDA);
        CHECK(r.hybrid.n_attn == 2 && r.hybrid.attn_layers[1] == 7 && r.hybrid.attn_fraction < 0);
        CHECK_EQ_I64(r.data[0].seq_len, 128);
        CHECK(r.hardware.zero == 0);
        CHECK(!strcmp(r.run.name, "quoted"));
    }
    recipe_errors_free(&errs);
    recipe_free(&r);
    // --set epochs replaces steps (exclusive keys)
    const char *s2[] = {"stage.layerwise.epochs=2"};
    CHECK(load(GOOD_STAGES, s2, 1, false, &r, &errs) == 0 && r.stages[1].steps == 0 && r.stages[1].epochs == 2);
    recipe_errors_free(&errs);
    recipe_free(&r);

    // a repeated kind is selected by its default name kind-N
    const char *s3[] = {"stage.eval-2.max_sequences=5"};
    CHECK(load(GOOD_STAGES "[[stage]]\nkind = \"eval\"\ndata = \"train\"\n[[stage]]\nkind = \"eval\"\ndata = \"train\"\n", s3, 1,
               false, &r, &errs) == 0 &&
          r.stages[3].max_sequences == 5 && r.stages[2].max_sequences == 0 && !strcmp(r.stages[3].name, "eval-2"));
    recipe_errors_free(&errs);
    recipe_free(&r);

    // a whole schedule or sub-table as TOML
    const char *s4[] = {"stage.layerwise.schedule=[{attn_fraction = 0.5, steps = 3}, {attn_layers = [3, 7]}]",
                        "stage.layerwise.loss={ce = 0.5, kl = 1.0}", "hybrid.attn_layers=[3, 7]"};
    CHECK(load(GOOD_STAGES, s4, 3, false, &r, &errs) == 0 && r.stages[1].n_schedule == 2 && r.stages[1].schedule[0].steps == 3 &&
          r.stages[1].schedule[1].steps == 5 && r.stages[1].schedule[1].n_attn == 2 && r.stages[1].loss.ce == 0.5 &&
          r.stages[1].loss.temperature == 1.0);
    for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
    recipe_errors_free(&errs);
    recipe_free(&r);
    EXPECT_SET_ERR(GOOD_STAGES, "stage.layerwise.schedule=[{attn_fraction = 0.3}]",
                   "--set stage.layerwise.schedule=[{attn_fraction = 0.3}]: stage 'layerwise' schedule step 1.attn_fraction = 0.3");
    EXPECT_SET_ERR(GOOD_STAGES, "stage.init.kind=sft", "the kind of a stage cannot be changed");

    EXPECT_SET_ERR(GOOD_STAGES, "optimizer.lrr=1", "--set optimizer.lrr=1: unknown key 'lrr' (did you mean 'lr'?)");
    EXPECT_SET_ERR(GOOD_STAGES, "optimizer.lr=abc", "--set optimizer.lr=abc: cannot read the value (a number expected)");
    EXPECT_SET_ERR(GOOD_STAGES, "optimizer.lr=-5", "--set optimizer.lr=-5: [optimizer].lr = -5 is out of range");
    EXPECT_SET_ERR(GOOD_STAGES, "stage.nosuch.steps=1", "--set stage.nosuch.steps=1: no stage named 'nosuch'");
    EXPECT_SET_ERR(GOOD_STAGES, "stage.init.steps=1", "--set stage.init.steps=1: key 'steps' does not apply to a init stage");
    EXPECT_SET_ERR(GOOD_STAGES, "optimiser.lr=1", "--set optimiser.lr=1: unknown table 'optimiser' (did you mean 'optimizer'?)");
    EXPECT_SET_ERR(GOOD_STAGES, "run.device=gpu", "--set run.device=gpu: [run].device = \"gpu\" is not one of: cpu, cuda");
    EXPECT_SET_ERR(GOOD_STAGES, "lr", "--set lr: expected key=value");
    EXPECT_SET_ERR(GOOD_STAGES, "data.nope.seq_len=1", "no data set [data.nope]");
    EXPECT_SET_ERR(GOOD_STAGES, "hybrid.attn_layers=[1, 99]", "--set hybrid.attn_layers=[1, 99]: [hybrid].attn_layers: layer 99 does not exist");
    EXPECT_SET_ERR(GOOD_STAGES "[[stage]]\nkind = \"eval\"\ndata = \"train\"\n[[stage]]\nkind = \"eval\"\ndata = \"train\"\n",
                   "stage.eval.max_sequences=1", "2 stages have kind 'eval'");
}

static void test_fractions(void) {
    int out[DL_MAX_LAYERS];
    DlError e;
    int n = recipe_layers_from_fraction(0.5, 32, out, &e);
    CHECK(n == 16 && out[0] == 1 && out[15] == 31);
    n = recipe_layers_from_fraction(0.25, 32, out, &e);
    CHECK(n == 8 && out[0] == 3 && out[1] == 7 && out[7] == 31);
    n = recipe_layers_from_fraction(0.125, 32, out, &e);
    CHECK(n == 4 && out[0] == 7 && out[1] == 15 && out[2] == 23 && out[3] == 31);  // the paper's 12.5%
    n = recipe_layers_from_fraction(0.75, 32, out, &e);  // Mamba at 0, 4, ..., 28 (llama3_0.25_mamba.yaml)
    CHECK(n == 24 && out[0] == 1 && out[2] == 3 && out[3] == 5);
    CHECK(recipe_layers_from_fraction(0, 32, out, &e) == 0);
    CHECK(recipe_layers_from_fraction(1, 30, out, &e) == 30);
    n = recipe_layers_from_fraction(0.5, 28, out, &e);  // Llama-3.2-3B: 1, 3, ..., 27
    CHECK(n == 14 && out[13] == 27);
    CHECK(recipe_layers_from_fraction(0.3, 32, out, &e) < 0 && strstr(e.msg, "1/k"));
}

static void test_plan(void) {
    Recipe r;
    RecipeErrors errs;
    int rc = load("[hardware]\nzero = 1\n" GOOD_STAGES, NULL, 0, true, &r, &errs);
    CHECK(rc == 0);
    if (rc) return;
    StagePlan p;
    DlError e;
    CHECK(plan_stage(&r, &r.stages[1], 0, &p, &e) == 0);
    // the layout of the plan: 8 layers, attention at 1,3,5,7, Mamba-1 elsewhere
    HybridConfig h;
    CHECK(recipe_stage_layout(&r, &r.stages[1], 0, &h, &e) == 0);
    Registry reg;
    model_build_registry(&h, &reg);
    int64_t mamba = 0;
    for (int i = 0; i < reg.n; i++)
        if (reg.t[i].role == ROLE_MAMBA) mamba += reg.t[i].numel;
    CHECK_EQ_I64(p.params_total, reg_params_numel(&reg));
    CHECK_EQ_I64(p.params_trainable, mamba);
    CHECK(mamba > 0);
    CHECK(h.mixer[0] == MIXER_MAMBA1 && h.mixer[1] == MIXER_ATTN);
    // cpu: fp32 weights, fp32 grads and two moments of the trainable tensors
    CHECK(p.mem.weights == 4.0 * p.params_total);
    CHECK(p.mem.grads == 4.0 * mamba && p.mem.optim == 8.0 * mamba && p.mem.master == 0);
    CHECK(p.mem.frozen_model > 0 && p.mem.activations > 0 && p.mem.logits == 4.0 * 1 * 64 * 256 * 2);  // + teacher logits
    CHECK_EQ_I64(p.tokens_per_step, 64);
    reg_free(&reg);
    recipe_errors_free(&errs);
    recipe_free(&r);
    // cuda, 4 GPUs, ZeRO-1: bf16 weights whole, fp32 master whole (tm_dp_* broadcasts it), moments sharded, grads whole
    const char *sets[] = {"run.device=cuda", "hardware.gpus=4", "hardware.zero=1", "optimizer.grad_accum=2"};
    rc = load(GOOD_STAGES, sets, 4, true, &r, &errs);
    CHECK(rc == 0);
    if (rc) return;
    StagePlan q;
    CHECK(plan_stage(&r, &r.stages[1], 0, &q, &e) == 0);
    CHECK(q.mem.weights == 2.0 * q.params_total);
    CHECK(q.mem.master == 4.0 * q.params_trainable && q.mem.optim == 8.0 * q.params_trainable / 4);
    CHECK(q.mem.grads == 4.0 * q.params_trainable);
    CHECK_EQ_I64(q.tokens_per_step, 1 * 2 * 4 * 64);
    CHECK(q.mem.activations < p.mem.activations);  // bf16, and no T^2 attention probabilities
    recipe_errors_free(&errs);
    recipe_free(&r);
}

// Every recipe shipped in recipes/ validates (as a dry run) and its resolved form reads back identically.
static void test_shipped_recipes(void) {
    DIR *d = opendir("recipes");
    CHECK(d != NULL);
    if (!d) return;
    int n = 0;
    for (struct dirent *de; (de = readdir(d));) {
        size_t l = strlen(de->d_name);
        if (l < 6 || strcmp(de->d_name + l - 5, ".toml")) continue;
        char path[600];
        snprintf(path, sizeof path, "recipes/%s", de->d_name);
        Recipe r;
        RecipeErrors errs;
        RecipeOptions o = {.dry_run = true};
        int rc = recipe_load(path, NULL, 0, &o, &r, &errs);
        if (rc) fprintf(stderr, "%s:\n", path);
        for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
        CHECK(rc == 0);
        if (rc == 0) {
            char *a = NULL, *b = NULL;
            size_t na = 0, nb = 0;
            FILE *f = open_memstream(&a, &na);
            recipe_write_resolved(&r, f);
            fclose(f);
            char p2[300];
            snprintf(p2, sizeof p2, "%s/r2.toml", g_dir);
            f = fopen(p2, "w");
            fputs(a, f);
            fclose(f);
            Recipe r2;
            RecipeErrors e2;
            int rc2 = recipe_load(p2, NULL, 0, &o, &r2, &e2);
            for (int i = 0; i < e2.n; i++) fprintf(stderr, "  %s resolved: %s\n", path, e2.msg[i]);
            CHECK(rc2 == 0);
            if (rc2 == 0) {
                f = open_memstream(&b, &nb);
                recipe_write_resolved(&r2, f);
                fclose(f);
                bool same = !strcmp(strchr(a, '\n'), strchr(b, '\n'));
                CHECK(same);
                if (!same) fprintf(stderr, "%s: resolved recipe does not read back identically:\n%s\n---\n%s\n", path, a, b);
            }
            recipe_errors_free(&e2);
            recipe_free(&r2);
            free(a);
            free(b);
        }
        recipe_errors_free(&errs);
        recipe_free(&r);
        n++;
    }
    closedir(d);
    printf("validated %d shipped recipes\n", n);
    CHECK(n >= 6);
}

// optimizer.moments: fp32 by default, bf16 on CUDA (per stage too), refused on the CPU naming the key; the
// --dry-run plan counts 4 instead of 8 bytes of AdamW state per trained parameter.
static void test_moments(void) {
    Recipe r;
    RecipeErrors errs;
    CHECK(load(GOOD_STAGES, NULL, 0, false, &r, &errs) == 0);
    CHECK(r.n_stages == 2 && r.stages[1].opt.moments == MOMENTS_FP32);
    recipe_errors_free(&errs);
    recipe_free(&r);
    EXPECT_ERR("[optimizer]\n"            // 9
               "moments = \"bf16\"\n"   // 10
               GOOD_STAGES,
               10, 11, "optimizer.moments = \"bf16\" (stage 'layerwise') needs run.device = \"cuda\"");
    EXPECT_ERR("[optimizer]\n"            // 9
               "moments = \"fp16\"\n"   // 10
               GOOD_STAGES,
               10, 11, "moments");
    const char *cuda[] = {"run.device=cuda"};
    double optim[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        const char *tail = k ? GOOD_STAGES "[stage.optimizer]\nmoments = \"bf16\"\n" : GOOD_STAGES;
        int rc = load(tail, cuda, 1, true, &r, &errs);
        CHECK(rc == 0);
        for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
        if (rc == 0) {
            CHECK(r.stages[1].opt.moments == (k ? MOMENTS_BF16 : MOMENTS_FP32));
            StagePlan p;
            DlError e;
            if (plan_stage(&r, &r.stages[1], 0, &p, &e) == 0) optim[k] = p.mem.optim;
            else fprintf(stderr, "  plan: %s\n", e.msg);
        }
        recipe_errors_free(&errs);
        recipe_free(&r);
    }
    CHECK(optim[0] > 0 && optim[1] == optim[0] / 2);
}

// A Mamba-2 hybrid trains and evaluates on CUDA; only speculative decoding (the CUDA decoder has attention and
// Mamba-1 layers) is refused up front, naming the eval stage's spec_prompts; spec_prompts = 0 or the CPU is fine.
static void test_mamba2_device(void) {
    const char *cuda[] = {"run.device=cuda"};
#define M2_SPEC(n)                                                                                                     \
    "[hybrid]\n"                  /* 9 */                                                                              \
    "mixer = \"mamba2\"\n"        /* 10 */                                                                             \
    GOOD_STAGES                   /* 11-16 */                                                                          \
    "[[stage]]\n"                 /* 17 */                                                                             \
    "kind = \"draft\"\n"          /* 18 */                                                                             \
    "data = \"train\"\n"          /* 19 */                                                                             \
    "layers = [0, 1]\n"           /* 20 */                                                                             \
    "steps = 2\n"                 /* 21 */                                                                             \
    "[[stage]]\n"                 /* 22 */                                                                             \
    "kind = \"eval\"\n"           /* 23 */                                                                             \
    "data = \"train\"\n"          /* 24 */                                                                             \
    "spec_prompts = " #n "\n"     /* 25 */
    CHECK(expect_err_(M2_SPEC(4), cuda, 1, 25, 16, "measures speculative decoding of a hybrid.mixer = \"mamba2\"", __LINE__));
    const char *tails[3] = {"[hybrid]\nmixer = \"mamba2\"\n" GOOD_STAGES, M2_SPEC(0), M2_SPEC(4)};
    for (int k = 0; k < 3; k++) {  // training on CUDA; no speculative rows on CUDA; speculative rows on the CPU
        Recipe r;
        RecipeErrors errs;
        CHECK(load(tails[k], k < 2 ? cuda : NULL, k < 2, true, &r, &errs) == 0);
        for (int i = 0; i < errs.n; i++) fprintf(stderr, "  %s\n", errs.msg[i]);
        recipe_errors_free(&errs);
        recipe_free(&r);
    }
#undef M2_SPEC
}

int main(void) {
    setup();
    test_good_and_defaults();
    test_errors();
    test_teacher_errors();
    test_all_at_once();
    test_set();
    test_fractions();
    test_plan();
    test_moments();
    test_mamba2_device();
    test_shipped_recipes();
    teardown();
    return check_report("test_recipe");
}
