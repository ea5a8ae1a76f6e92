// test_resume.c: the pipeline survives being killed, end to end through the real program ($DISTILL_BIN):
// a tiny recipe (random-weight teacher from recipes/configs/tiny-llama3.json, a token shard written here,
// init -> layerwise with two schedule steps -> eval -> export) is run
//   A: uninterrupted;
//   B: killed with SIGKILL in the middle of layerwise (right after a checkpoint appeared), then --resume;
//   C: aborted inside a checkpoint write (DISTILL_TEST_CRASH_IN_CHECKPOINT, between the temporary file and
//      the rename), then --resume from the previous checkpoint;
//   D: stopped by SIGTERM (exit 4 after writing a checkpoint of the finished step), then --resume;
// and every training loss of B, C and D equals A's bit for bit (metrics.jsonl, 17 digits), as do the exports.
#include <cjson/cJSON.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "distill/checkpoint.h"
#include "distill/model_io.h"
#include "distill/rng.h"
#include "distill/shards.h"
#include "tests/check.h"
#include "tests/toy_corpus.h"

static char g_dir[256];
static const char *g_bin;

static void write_recipe(const char *path, const char *shard, const char *teacher) {
    FILE *f = fopen(path, "w");
    fprintf(f,
            "[run]\nname = \"a\"\noutput_dir = \"%s/runs\"\nseed = 7\ndevice = \"cpu\"\nthreads = 2\n"
            "checkpoint_every = 2\nkeep_checkpoints = 2\nlog_every = 1\n\n"
            "[teacher]\npath = \"%s\"\n\n[hybrid]\nmixer = \"mamba1\"\nattn_fraction = 0.5\n\n"
            "[optimizer]\nlr = 3e-3\nbetas = [0.9, 0.98]\nwarmup_steps = 2\nschedule = \"cosine\"\nclip = 1.0\n"
            "micro_batch = 2\ngrad_accum = 2\n\n"
            "[data.tokens]\nsources = [\"%s\"]\nformat = \"text\"\nseq_len = 32\nholdout = 0.2\n\n"
            "[[stage]]\nkind = \"init\"\n\n"
            "[[stage]]\nkind = \"layerwise\"\ndata = \"tokens\"\n[stage.loss]\nce = 1.0\nkl = 0.1\n"
            "[[stage.schedule]]\nattn_fraction = 0.75\nsteps = 6\n[[stage.schedule]]\nattn_fraction = 0.5\nsteps = 6\n\n"
            "[[stage]]\nkind = \"eval\"\ndata = [\"tokens\"]\nmax_sequences = 8\n\n"
            "[[stage]]\nkind = \"export\"\nformat = \"hf\"\ndtype = \"f32\"\n",
            g_dir, teacher, shard);
    fclose(f);
}

// Runs distill with args; returns its exit status (or 128+signal). env: "K=V" or NULL.
static int run(const char *const *args, const char *env, pid_t *pid_out) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        char logp[400];
        snprintf(logp, sizeof logp, "%s/log.txt", g_dir);
        freopen(logp, "a", stdout);
        freopen(logp, "a", stderr);
        if (env) putenv((char *)env);
        char *argv[16];
        int n = 0;
        argv[n++] = (char *)g_bin;
        for (; args[n - 1]; n++) argv[n] = (char *)args[n - 1];
        argv[n] = NULL;
        execv(g_bin, argv);
        _exit(127);
    }
    if (pid_out) {
        *pid_out = pid;
        return 0;
    }
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// Losses of metrics.jsonl as (stage_index, step) -> loss text; returns the count.
typedef struct {
    int stage;
    long step;
    double loss;
} Row;

static int read_losses(const char *run, Row *rows, int max) {
    char p[512];
    snprintf(p, sizeof p, "%s/metrics.jsonl", run);
    DlError e;
    size_t len;
    char *t = dl_read_file(p, &len, &e);
    int n = 0;
    for (char *save = NULL, *l = t ? strtok_r(t, "\n", &save) : NULL; l && n < max; l = strtok_r(NULL, "\n", &save)) {
        cJSON *o = cJSON_Parse(l);
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "step"), *si = cJSON_GetObjectItemCaseSensitive(o, "stage_index"),
                    *lo = cJSON_GetObjectItemCaseSensitive(o, "loss");
        if (cJSON_IsNumber(s) && cJSON_IsNumber(lo)) rows[n++] = (Row){si->valueint, (long)s->valuedouble, lo->valuedouble};
        cJSON_Delete(o);
    }
    free(t);
    return n;
}

static int count_steps(const char *run) {
    Row rows[64];
    return read_losses(run, rows, 64);
}

static bool same_rows(const Row *a, int na, const Row *b, int nb) {
    if (na != nb) return false;
    for (int i = 0; i < na; i++)
        if (a[i].stage != b[i].stage || a[i].step != b[i].step || memcmp(&a[i].loss, &b[i].loss, sizeof(double))) {
            fprintf(stderr, "row %d: (%d, %ld, %.17g) vs (%d, %ld, %.17g)\n", i, a[i].stage, a[i].step, a[i].loss, b[i].stage,
                    b[i].step, b[i].loss);
            return false;
        }
    return true;
}

static bool same_file(const char *a, const char *b) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", a, b);
    return system(cmd) == 0;
}

int main(void) {
    g_bin = getenv("DISTILL_BIN");
    if (!g_bin || access(g_bin, X_OK)) {
        printf("test_resume: DISTILL_BIN not set or not executable; run through ctest\n");
        return 1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_resume_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    char shard[400], recipe[400], teacher[600], cwd[300];
    if (!getcwd(cwd, sizeof cwd)) return 1;
    snprintf(teacher, sizeof teacher, "%s/recipes/configs/tiny-llama3.json", cwd);
    snprintf(shard, sizeof shard, "%s/tokens.h5", g_dir);
    snprintf(recipe, sizeof recipe, "%s/tiny.toml", g_dir);
    toy_corpus_write(shard);
    write_recipe(recipe, shard, teacher);
    char run_a[400], run_b[400], run_c[400];
    snprintf(run_a, sizeof run_a, "%s/runs/a", g_dir);
    snprintf(run_b, sizeof run_b, "%s/runs/b", g_dir);
    snprintf(run_c, sizeof run_c, "%s/runs/c", g_dir);

    // A: uninterrupted
    const char *a_args[] = {recipe, "--quiet", NULL};
    int rc = run(a_args, NULL, NULL);
    CHECK_EQ_I64(rc, 0);
    Row ra[64], rb[64], rcr[64];
    int na = read_losses(run_a, ra, 64);
    CHECK_EQ_I64(na, 12);  // two schedule steps of 6
    char eval_a[500];
    snprintf(eval_a, sizeof eval_a, "%s/eval.json", run_a);
    CHECK(dl_file_exists(eval_a));

    // B: SIGKILL once step 5 is logged (checkpoint 4 exists), then resume. The run stops itself after step 5
    // (DISTILL_TEST_PAUSE_AFTER: SIGSTOP) so the kill lands there on a fast idle machine too, not a race.
    const char *b_args[] = {recipe, "--quiet", "--set", "run.name=b", NULL};
    pid_t pid;
    run(b_args, "DISTILL_TEST_PAUSE_AFTER=5", &pid);
    int st, killed = 0;
    if (waitpid(pid, &st, WUNTRACED) == pid && WIFSTOPPED(st)) {
        kill(pid, SIGKILL);
        killed = 1;
        waitpid(pid, &st, 0);
    }
    CHECK(killed && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    int before = count_steps(run_b);
    printf("B killed after %d logged steps\n", before);
    CHECK(before >= 5 && before < 12);
    const char *b_res[] = {recipe, "--quiet", "--set", "run.name=b", "--resume", NULL};
    rc = run(b_res, NULL, NULL);
    CHECK_EQ_I64(rc, 0);
    int nb = read_losses(run_b, rb, 64);
    CHECK(same_rows(ra, na, rb, nb));

    // C: crash inside the 3rd checkpoint write (init writes the 1st; layerwise step 2 the 2nd, step 4 the 3rd)
    const char *c_args[] = {recipe, "--quiet", "--set", "run.name=c", NULL};
    rc = run(c_args, "DISTILL_TEST_CRASH_IN_CHECKPOINT=3", NULL);
    CHECK_EQ_I64(rc, 128 + SIGABRT);
    char tmpf[600];
    snprintf(tmpf, sizeof tmpf, "ls %s/runs/c/02-layerwise/*.h5.tmp > /dev/null 2>&1", g_dir);
    CHECK(system(tmpf) == 0);  // the interrupted write left its temporary file, nothing else
    const char *c_res[] = {recipe, "--quiet", "--set", "run.name=c", "--resume", NULL};
    rc = run(c_res, NULL, NULL);
    CHECK_EQ_I64(rc, 0);
    int nc = read_losses(run_c, rcr, 64);
    CHECK(same_rows(ra, na, rcr, nc));

    // D: SIGTERM (a SLURM preemption) mid-layerwise: the step finishes, a checkpoint is written, exit 4
    char run_d[400];
    snprintf(run_d, sizeof run_d, "%s/runs/d", g_dir);
    const char *d_args[] = {recipe, "--quiet", "--set", "run.name=d", NULL};
    run(d_args, NULL, &pid);
    int sent = 0;
    for (int w = 0; w < 6000; w++) {
        if (count_steps(run_d) >= 3) {
            kill(pid, SIGTERM);
            sent = 1;
            break;
        }
        if (waitpid(pid, &st, WNOHANG) == pid) break;
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    waitpid(pid, &st, 0);
    CHECK(sent && WIFEXITED(st) && WEXITSTATUS(st) == 4);
    int at = count_steps(run_d);
    printf("D stopped by SIGTERM after %d steps\n", at);
    {
        char lw[500], latest[1024];
        DlError e;
        snprintf(lw, sizeof lw, "%s/02-layerwise", run_d);
        CkptState cs;
        ckpt_state_init(&cs);
        CHECK(checkpoint_find_latest(lw, latest, sizeof latest, &e) == 1 && checkpoint_read_state(latest, &cs, &e) == 0 &&
              cs.step == at);  // the checkpoint is of the last logged step
        ckpt_state_free(&cs);
    }
    const char *d_res[] = {recipe, "--quiet", "--set", "run.name=d", "--resume", NULL};
    CHECK_EQ_I64(run(d_res, NULL, NULL), 0);
    Row rd[64];
    int nd = read_losses(run_d, rd, 64);
    CHECK(same_rows(ra, na, rd, nd));

    // the exports are byte-identical
    char ea[600], eb[600], ec[600];
    snprintf(ea, sizeof ea, "%s/export/model.safetensors", run_a);
    snprintf(eb, sizeof eb, "%s/export/model.safetensors", run_b);
    snprintf(ec, sizeof ec, "%s/export/model.safetensors", run_c);
    char ed[600];
    snprintf(ed, sizeof ed, "%s/export/model.safetensors", run_d);
    CHECK(dl_file_exists(ea) && same_file(ea, eb) && same_file(ea, ec) && same_file(ea, ed));
    // the export holds exactly the weights of the run's last checkpoint (so its logits are the run's)
    {
        char exdir[600], lw[600], last[1024];
        snprintf(exdir, sizeof exdir, "%s/export", run_a);
        snprintf(lw, sizeof lw, "%s/02-layerwise", run_a);
        LoadedModel m;
        DlError e;
        int lrc = model_load(exdir, 0, &m, &e);
        if (lrc) fprintf(stderr, "%s\n", e.msg);
        CHECK(lrc == 0 && checkpoint_find_latest(lw, last, sizeof last, &e) == 1);
        if (!lrc) {
            float *w = calloc((size_t)m.reg.numel, 4);
            CHECK(checkpoint_load_weights(last, &m.reg, w, 0, &e) == m.reg.n);
            bool same = true;
            for (int i = 0; i < m.reg.n; i++)
                same &= !memcmp(w + m.reg.t[i].offset, m.params + m.reg.t[i].offset, (size_t)m.reg.t[i].numel * 4);
            CHECK(same && hybrid_n_attn(&m.hc) == 2);
            free(w);
            model_free(&m);
        }
    }

    if (check_fail_ == 0) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
        CHECK(system(cmd) == 0);
    } else {
        printf("test_resume: kept %s (log.txt has the runs' output)\n", g_dir);
    }
    return check_report("test_resume");
}
