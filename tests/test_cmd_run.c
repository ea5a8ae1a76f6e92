// test_cmd_run.c: the recipe runner (cmd_run.c) with recording stages put in place of the real ones
// (dl_override_stage): stages run in order in RUN_DIR/NN-NAME with DONE markers, recipe.resolved.toml is
// written, an existing run is not overwritten, SIGINT stops a run with exit 4, --resume skips finished
// stages and resumes the interrupted one, a changed recipe cannot resume, a failing stage check stops
// everything before any stage runs, a failing stage exits 1. Each run is a forked child (dl_die exits).
#include <ftw.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/command.h"
#include "distill/stage.h"
#include "tests/check.h"

static char g_out[256];
static const char *g_interrupt_at = NULL;  // stage name that receives SIGINT while running
static const char *g_fail_at = NULL;       // stage name that fails with DL_EXIT_RUNTIME

static void log_line(const RunContext *ctx, const char *fmt, const char *a, int b) {
    char *p = dl_path_join(ctx->run_dir, "log.txt");
    FILE *f = fopen(p, "a");
    fprintf(f, fmt, a, b);
    fclose(f);
    free(p);
}

static int rec_run(RunContext *ctx, const StageSpec *st) {
    // the context the runner promises
    if (!ctx->recipe || !ctx->stage_dir || !dl_is_dir(ctx->stage_dir) || ctx->threads < 1 || ctx->seed != 1234 ||
        &ctx->recipe->stages[ctx->stage_index] != st)
        return 77;
    char *expect = run_stage_dir(ctx, ctx->stage_index);
    int same = !strcmp(expect, ctx->stage_dir);
    free(expect);
    if (!same) return 78;
    log_line(ctx, "%s resume=%d\n", st->name, ctx->resume);
    if (g_interrupt_at && !strcmp(g_interrupt_at, st->name)) {
        raise(SIGINT);  // as a user's Ctrl-C during a step
        if (run_should_stop(ctx)) return DL_EXIT_INTERRUPTED;
        return 79;
    }
    if (g_fail_at && !strcmp(g_fail_at, st->name)) return DL_EXIT_RUNTIME;
    return DL_EXIT_OK;
}

static int bad_check(const RunContext *ctx, const StageSpec *st, DlError *e) {
    return dl_fail(e, "data.jsonl:1: not what this stage expects");
}

static const StageDef REC[] = {
    {.kind = STAGE_INIT, .summary = "test", .run = rec_run},
    {.kind = STAGE_LAYERWISE, .summary = "test", .run = rec_run},
    {.kind = STAGE_EXPORT, .summary = "test", .run = rec_run},
};
static const StageDef CHECKED = {.kind = STAGE_EXPORT, .summary = "test", .run = rec_run, .check = bad_check};

static char g_recipe[400];

// A valid recipe on a 4-layer config teacher (random weights; the recording stages never load it).
static void write_recipe(void) {
    char p[400];
    snprintf(p, sizeof p, "%s/config.json", g_out);
    FILE *f = fopen(p, "w");
    fputs("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"intermediate_size\": 128,\n"
          " \"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 256,\n"
          " \"rope_theta\": 10000.0, \"rms_norm_eps\": 1e-5, \"max_position_embeddings\": 256}\n",
          f);
    fclose(f);
    snprintf(p, sizeof p, "%s/data.jsonl", g_out);
    f = fopen(p, "w");
    fputs("{\"text\": \"hello\"}\n", f);
    fclose(f);
    snprintf(p, sizeof p, "%s/tokenizer.json", g_out);
    f = fopen(p, "w");
    fputs("{}\n", f);
    fclose(f);
    snprintf(g_recipe, sizeof g_recipe, "%s/tiny.toml", g_out);
    f = fopen(g_recipe, "w");
    fprintf(f,
            "[run]\nname = \"tiny\"\nthreads = 1\n"
            "[teacher]\npath = \"%s/config.json\"\n"
            "[tokenizer]\npath = \"%s/tokenizer.json\"\n"
            "[data.train]\nsources = [\"%s/data.jsonl\"]\nseq_len = 16\n"
            "[[stage]]\nkind = \"init\"\n"
            "[[stage]]\nkind = \"layerwise\"\ndata = \"train\"\nsteps = 2\n"
            "[[stage]]\nkind = \"export\"\n",
            g_out, g_out, g_out);
    fclose(f);
}

// Runs `distill RECIPE --set run.output_dir=OUT args...` in a child; returns its exit status.
static int run_recipe(const char *const *args, int n) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        char outset[400];
        snprintf(outset, sizeof outset, "run.output_dir=%s", g_out);
        char *argv[32] = {"run", g_recipe, "--quiet", "--set", outset};
        int argc = 5;
        for (int i = 0; i < n && argc < 31; i++) argv[argc++] = (char *)args[i];
        argv[argc] = NULL;
        int devnull_ok = freopen("/dev/null", "w", stdout) != NULL;
        (void)devnull_ok;
        _exit(dl_find_command("run")->run(argc, argv));
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char *read_log(const char *name) {
    char p[600];
    snprintf(p, sizeof p, "%s/%s/log.txt", g_out, name);
    size_t n;
    DlError e;
    char *s = dl_read_file(p, &n, &e);
    return s ? s : dl_strdup("");
}

static bool exists(const char *name, const char *rel) {
    char p[700];
    snprintf(p, sizeof p, "%s/%s/%s", g_out, name, rel);
    return dl_file_exists(p);
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw) { return remove(p); }

int main(void) {
    snprintf(g_out, sizeof g_out, "/tmp/distill_test_cmd_run_XXXXXX");
    if (!mkdtemp(g_out)) return 1;
    write_recipe();
    for (size_t i = 0; i < DL_ARRAY_LEN(REC); i++) dl_override_stage(&REC[i]);

    // a whole run
    const char *a1[] = {"--set", "run.name=full"};
    CHECK_EQ_I64(run_recipe(a1, 2), 0);
    char *log = read_log("full");
    CHECK(!strcmp(log, "init resume=0\nlayerwise resume=0\nexport resume=0\n"));
    free(log);
    CHECK(exists("full", "recipe.resolved.toml") && exists("full", "01-init/DONE") && exists("full", "02-layerwise/DONE") &&
          exists("full", "03-export/DONE"));
    // the same run again is refused: nothing is overwritten
    CHECK_EQ_I64(run_recipe(a1, 2), 3);

    // interrupted in layerwise: exit 4, init done, layerwise not
    g_interrupt_at = "layerwise";
    const char *a2[] = {"--set", "run.name=cut"};
    CHECK_EQ_I64(run_recipe(a2, 2), 4);
    g_interrupt_at = NULL;
    CHECK(exists("cut", "01-init/DONE") && !exists("cut", "02-layerwise/DONE") && !exists("cut", "03-export"));
    // resumed: init skipped, layerwise continues (resume=1), export runs fresh
    const char *a3[] = {"--set", "run.name=cut", "--resume"};
    CHECK_EQ_I64(run_recipe(a3, 3), 0);
    log = read_log("cut");
    CHECK(!strcmp(log, "init resume=0\nlayerwise resume=0\nlayerwise resume=1\nexport resume=0\n"));
    free(log);
    // resuming with another recipe (a changed value) is refused
    const char *a4[] = {"--set", "run.name=cut", "--set", "stage.layerwise.steps=3", "--resume"};
    CHECK_EQ_I64(run_recipe(a4, 5), 3);
    // --resume RUN_DIR of a directory that is not a run
    char notrun[400];
    snprintf(notrun, sizeof notrun, "%s/nothing-here", g_out);
    const char *a5[] = {"--resume", notrun};
    CHECK_EQ_I64(run_recipe(a5, 2), 3);
    // --resume with the run dir named explicitly
    char cutdir[400];
    snprintf(cutdir, sizeof cutdir, "%s/cut", g_out);
    const char *a6[] = {"--set", "run.name=cut", "--resume", cutdir};
    CHECK_EQ_I64(run_recipe(a6, 4), 0);
    log = read_log("cut");
    CHECK(!strcmp(log, "init resume=0\nlayerwise resume=0\nlayerwise resume=1\nexport resume=0\n"));  // all done: nothing ran
    free(log);
    // a run directory written before the hardware switches and the spike rollbacks existed (no overlap /
    // stage_grads / gemm_tune / spike_* lines) still resumes, and those keys may change on --resume
    {
        char rp[500];
        snprintf(rp, sizeof rp, "%s/recipe.resolved.toml", cutdir);
        DlError e;
        size_t n = 0;
        char *txt = dl_read_file(rp, &n, &e), *o = txt;
        CHECK(txt && strstr(txt, "\ngemm_tune = ") && strstr(txt, "\noverlap = ") && strstr(txt, "\nspike_rollbacks = 2\n"));
        for (const char *p = txt; txt && *p;) {  // drop those lines in place
            const size_t len = strcspn(p, "\n") + (p[strcspn(p, "\n")] ? 1 : 0);
            if (strncmp(p, "gemm_tune = ", 12) && strncmp(p, "overlap = ", 10) && strncmp(p, "stage_grads = ", 14) &&
                strncmp(p, "spike_rollbacks = ", 18) && strncmp(p, "spike_lr_factor = ", 18))
                memmove(o, p, len), o += len;
            p += len;
        }
        if (txt) {
            *o = 0;
            FILE *f = fopen(rp, "w");
            CHECK(f != NULL);
            if (f) fputs(txt, f), fclose(f);
        }
        free(txt);
        const char *a9[] = {"--set", "run.name=cut", "--resume", cutdir};
        CHECK_EQ_I64(run_recipe(a9, 4), 0);
        const char *a10[] = {"--set", "run.name=cut", "--set", "hardware.gemm_tune=true", "--resume", cutdir};
        CHECK_EQ_I64(run_recipe(a10, 6), 0);
        const char *a11[] = {"--set", "run.name=cut", "--set", "optimizer.spike_rollbacks=5", "--resume", cutdir};
        CHECK_EQ_I64(run_recipe(a11, 6), 0);
        // ... while the learning rate may not
        const char *a12[] = {"--set", "run.name=cut", "--set", "optimizer.lr=1e-5", "--resume", cutdir};
        CHECK_EQ_I64(run_recipe(a12, 6), 3);
    }

    // a failing stage: exit 1, no DONE for it
    g_fail_at = "layerwise";
    const char *a7[] = {"--set", "run.name=fails"};
    CHECK_EQ_I64(run_recipe(a7, 2), 1);
    g_fail_at = NULL;
    CHECK(exists("fails", "01-init/DONE") && !exists("fails", "02-layerwise/DONE"));

    // a stage check that fails: exit 3 before anything runs or is created
    dl_override_stage(&CHECKED);
    const char *a8[] = {"--set", "run.name=checked"};
    CHECK_EQ_I64(run_recipe(a8, 2), 3);
    CHECK(!exists("checked", "recipe.resolved.toml") && !exists("checked", "log.txt"));

    nftw(g_out, rm_entry, 16, FTW_DEPTH | FTW_PHYS);  // the test's scratch directory
    return check_report("test_cmd_run");
}
