// cmd_run.c: `distill RECIPE.toml [--set key=value ...] [--resume [RUN_DIR]] [--dry-run] [--quiet]`.
// Validates the recipe completely (exit 3 listing every problem), checks that this build implements
// every stage kind the recipe uses, prints the plan (--dry-run), or creates the run directory, writes
// recipe.resolved.toml and runs the stages in order (see stage.h for the run-directory contract).
#include <errno.h>
#include <omp.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "distill/command.h"
#include "distill/common.h"
#include "distill/dist.h"
#ifdef DISTILL_NCCL
#include "distill/nccl_comm.h"
#endif
#include "distill/plan.h"
#include "distill/recipe.h"
#include "distill/stage.h"
#include "distill/stage_common.h"

static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESETHAND;  // a second signal uses the default action: the process ends at once
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

// Writes the resolved recipe to path atomically (temporary file, fsync, rename).
static int write_resolved(const Recipe *r, const char *path, DlError *e) {
    DlAtomic a;
    if (dl_atomic_open(&a, path, e)) return -1;
    recipe_write_resolved(r, a.f);
    return dl_atomic_commit(&a, e);
}

__attribute__((noinline)) static char *resolved_text(const Recipe *r) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    recipe_write_resolved(r, f);
    fclose(f);
    return buf;
}

// Body lines of a resolved recipe (its comment header names the source path and --set list, which may
// legitimately differ between the first run and a resume).
static const char *body(const char *s) {
    const char *p = strstr(s, "\n[run]");
    return p ? p : s;
}

// s without the [hardware] lines a run may change when it resumes: "gpus = N" (another number of GPUs: the
// training loop keeps the global batch; train_loop.h), the switches that change where gradients live or when
// they are reduced but not their values (overlap, stage_grads), and gemm_tune (which GEMM kernels run: the last
// bits of a resumed run then differ from the uninterrupted one's), and the optimizer's loss-spike rollbacks (a run
// that stopped after spending them continues with more; train_loop.h). A run directory written before a switch
// existed lacks its line and so resumes too.
static bool resume_may_change(const char *line) {
    return !strncmp(line, "gpus = ", 7) || !strncmp(line, "overlap = ", 10) || !strncmp(line, "stage_grads = ", 14) ||
           !strncmp(line, "gemm_tune = ", 12) || !strncmp(line, "spike_rollbacks = ", 18) ||
           !strncmp(line, "spike_lr_factor = ", 18);
}

static char *without_resumable(const char *s) {
    char *out = dl_malloc(strlen(s) + 1), *o = out;
    for (const char *p = s; *p;) {
        size_t n = strcspn(p, "\n");
        if (!resume_may_change(p)) {
            memcpy(o, p, n);
            o += n;
            if (p[n]) *o++ = '\n';
        }
        p += n + (p[n] ? 1 : 0);
    }
    *o = 0;
    return out;
}

// Stages that run on every rank of a data-parallel group (the others run on rank 0 while the rest wait).
static bool runs_on_every_rank(StageKind k) { return k == STAGE_LAYERWISE || k == STAGE_DISTILL || k == STAGE_SFT; }

static int usage_error(const char *msg) {
    fprintf(stderr, "distill: error: %s\nusage: distill RECIPE.toml [--set key=value ...] [--resume [RUN_DIR]] [--dry-run] [--quiet]\n", msg);
    return DL_EXIT_USAGE;
}

static int run_main(int argc, char **argv) {
    const char *recipe_path = NULL, *resume_dir = NULL;
    bool dry = false, quiet = false, resume = false;
    const char **sets = dl_calloc((size_t)argc, sizeof(char *));
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--schema")) {
            recipe_write_schema(stdout);
            free(sets);
            return DL_EXIT_OK;
        } else if (!strcmp(a, "--set")) {
            if (i + 1 >= argc) return usage_error("--set needs key=value");
            sets[n_sets++] = argv[++i];
        } else if (!strncmp(a, "--set=", 6)) {
            sets[n_sets++] = a + 6;
        } else if (!strcmp(a, "--dry-run")) {
            dry = true;
        } else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) {
            quiet = true;
        } else if (!strcmp(a, "--resume")) {
            resume = true;
            // the optional RUN_DIR: the next argument unless it is an option or the recipe
            if (i + 1 < argc && argv[i + 1][0] != '-' &&
                !(strlen(argv[i + 1]) > 5 && !strcmp(argv[i + 1] + strlen(argv[i + 1]) - 5, ".toml")))
                resume_dir = argv[++i];
        } else if (!strncmp(a, "--resume=", 9)) {
            resume = true;
            resume_dir = a + 9;
        } else if (a[0] == '-') {
            char m[300];
            snprintf(m, sizeof m, "unknown option '%s'", a);
            free(sets);
            return usage_error(m);
        } else if (!recipe_path) {
            recipe_path = a;
        } else {
            char m[300];
            snprintf(m, sizeof m, "unexpected argument '%s' (one recipe per run)", a);
            free(sets);
            return usage_error(m);
        }
    }
    if (!recipe_path) {
        free(sets);
        return usage_error("no recipe given");
    }
    dl_set_quiet(quiet);

    // ---- validate everything before any work
    Recipe r;
    RecipeErrors errs;
    RecipeOptions opt = {.dry_run = dry};
    if (recipe_load(recipe_path, sets, n_sets, &opt, &r, &errs)) {
        for (int i = 0; i < errs.n; i++) fprintf(stderr, "%s\n", errs.msg[i]);
        fprintf(stderr, "distill: error: %s: %d problem%s found, nothing was run\n", recipe_path, errs.n, errs.n > 1 ? "s" : "");
        recipe_errors_free(&errs);
        recipe_free(&r);
        free(sets);
        return DL_EXIT_INPUT;
    }
    free(sets);
    if (dry) {
        plan_print(&r, stdout);
        recipe_free(&r);
        return DL_EXIT_OK;
    }
    for (int i = 0; i < r.n_warnings; i++) dl_warn("%s", r.warnings[i]);
    int missing = 0;
    for (int i = 0; i < r.n_stages; i++)
        if (!dl_find_stage(r.stages[i].kind)) {
            fprintf(stderr, "%s:%d:%d: stage '%s': kind '%s' is not implemented in this build of distill %s\n", r.path,
                    r.stages[i].line, r.stages[i].col, r.stages[i].name, stage_kind_name(r.stages[i].kind), DISTILL_VERSION);
            missing++;
        }
    if (missing) {
        recipe_free(&r);
        dl_die(DL_EXIT_INPUT, "%d stage%s cannot run in this build; nothing was run (see --dry-run for the plan)", missing,
               missing > 1 ? "s" : "");
    }

    char *run_dir = resume_dir ? dl_strdup(resume_dir) : dl_path_join(r.run.output_dir, r.run.name);
    int threads = r.run.threads > 0 ? r.run.threads : omp_get_num_procs();
    RunContext ctx = {.recipe = &r, .run_dir = run_dir, .seed = (uint64_t)r.run.seed, .device = r.run.device,
                      .threads = threads, .quiet = quiet, .stop = &g_stop};
    DlError e;

    // ---- stage checks (all before the first stage runs)
    int bad = 0;
    for (int i = 0; i < r.n_stages; i++) {
        const StageDef *def = dl_find_stage(r.stages[i].kind);
        if (!def->check) continue;
        ctx.stage_index = i;  // run_dir may not exist yet: checks only read
        if (def->check(&ctx, &r.stages[i], &e)) {
            fprintf(stderr, "%s: stage '%s': %s\n", r.path, r.stages[i].name, e.msg);
            bad++;
        }
    }
    if (bad) {
        recipe_free(&r);
        dl_die(DL_EXIT_INPUT, "%d stage check%s failed; nothing was run", bad, bad > 1 ? "s" : "");
    }

    // hardware.gemm_tune reaches the GEMM wrapper (kernels/train/gemm_lt.cu) as DISTILL_GEMM_TUNE; a value already in
    // the environment wins, as for the other hardware switches
    if (r.run.device == DEVICE_CUDA && r.hardware.gemm_tune) setenv("DISTILL_GEMM_TUNE", "1", 0);

    // ---- the process group: one process per GPU (or per CPU process group) from the launcher's environment
    DistOpts dopt;
    DistEnv denv;
    dist_opts_default(&dopt);
    if (dist_opts_from_env(&dopt, &e) || dist_env_detect(&dopt, &denv, &e)) {
        recipe_free(&r);
        dl_die(DL_EXIT_USAGE, "data parallel launch: %s", e.msg);
    }
    DistGroup *group = NULL;
    int rank = 0, world = denv.world_size;
    if (world > 1) {
        if (r.run.device == DEVICE_CUDA && r.hardware.gpus != world) {
            recipe_free(&r);
            dl_die(DL_EXIT_USAGE, "launched as %d processes but hardware.gpus = %d; set --set hardware.gpus=%d", world,
                   r.hardware.gpus, world);
        }
        if (r.hardware.zero > 2) {
            recipe_free(&r);
            dl_die(DL_EXIT_INPUT, "hardware.zero = 3 (sharded weights) is not implemented; use 0, 1 or 2");
        }
        group = dist_init(&denv, &dopt, &e);
        if (!group) {
            recipe_free(&r);
            dl_die(DL_EXIT_RUNTIME, "%s", e.msg);
        }
        rank = dist_rank(group);
        StageDist sdist = {group, rank, world, r.hardware.zero, NULL};
#ifdef DISTILL_NCCL
        if (r.run.device == DEVICE_CUDA && !(sdist.nccl = nccl_comm_init(group, dist_local_rank(group), NULL, &e))) {
            recipe_free(&r);
            dl_die(DL_EXIT_RUNTIME, "NCCL: %s", e.msg);
        }
#endif
        stage_set_dist(&sdist);
        if (rank > 0) dl_set_quiet(true);  // rank 0 prints progress; every rank prints its errors
        dl_info("data parallel: %d ranks (%s), ZeRO-%d for the training stages\n", world, dist_source_name(denv.source),
                r.hardware.zero);
    } else if (r.hardware.gpus > 1) {
        recipe_free(&r);
        dl_die(DL_EXIT_USAGE, "hardware.gpus = %d: launch one process per GPU (scripts/launch-local -n %d, srun, mpirun; "
                              "see docs/MULTIGPU.md)", r.hardware.gpus, r.hardware.gpus);
    }

    // ---- the run directory (rank 0; the others wait for it)
    char *resolved_path = dl_path_join(run_dir, "recipe.resolved.toml");
    char *now = resolved_text(&r);
    if (rank > 0) {
        // nothing to check here: rank 0 compares the recipe or creates the directory
    } else if (resume) {
        size_t n = 0;
        char *old = dl_read_file(resolved_path, &n, &e);
        if (!old) {
            free(now);
            recipe_free(&r);
            dl_die(DL_EXIT_INPUT, "--resume: %s is not a run directory of distill (no recipe.resolved.toml): %s", run_dir, e.msg);
        }
        char *bo = without_resumable(body(old)), *bn = without_resumable(body(now));
        int differs = strcmp(bo, bn);
        free(bo);
        free(bn);
        if (differs) {
            // show the first line that differs
            const char *a = body(old), *b = body(now);
            while (*a && *a == *b) a++, b++;
            while (a > old && a[-1] != '\n') a--;
            while (b > now && b[-1] != '\n') b--;
            fprintf(stderr, "distill: error: --resume: the recipe differs from the one the run started with (%s), first at:\n  was: %.*s\n  now: %.*s\n"
                    "resume with the same recipe and --set options, or start a new run (another run.name)\n",
                    resolved_path, (int)strcspn(a, "\n"), a, (int)strcspn(b, "\n"), b);
            free(old);
            free(now);
            recipe_free(&r);
            return DL_EXIT_INPUT;
        }
        free(old);
    } else {
        if (dl_file_exists(resolved_path)) {
            free(now);
            recipe_free(&r);
            dl_die(DL_EXIT_INPUT, "%s already holds a run; continue it with --resume, or set another run.name (--set run.name=...)",
                   run_dir);
        }
        if (dl_mkdirs(run_dir, &e) || write_resolved(&r, resolved_path, &e)) {
            free(now);
            recipe_free(&r);
            dl_die(DL_EXIT_RUNTIME, "%s", e.msg);
        }
    }
    free(now);
    if (group) {  // rank 0 got here: the run directory is ready (had it failed, its exit closed the group)
        int ready = 1;
        if (dist_bcast(group, &ready, sizeof ready, &e)) dl_die(DL_EXIT_RUNTIME, "rank %d: %s", rank, e.msg);
    }

    omp_set_num_threads(threads);
    install_signals();

    // ---- run
    int rc = DL_EXIT_OK;
    double t0 = dl_now();
    for (int i = 0; i < r.n_stages && rc == DL_EXIT_OK; i++) {
        const StageSpec *st = &r.stages[i];
        char *sdir = run_stage_dir(&ctx, i);
        char *done = dl_path_join(sdir, "DONE");
        if (resume && dl_file_exists(done)) {
            dl_info("stage %d/%d %s '%s': done earlier, skipped\n", i + 1, r.n_stages, stage_kind_name(st->kind), st->name);
            free(sdir);
            free(done);
            continue;
        }
        if (dl_mkdirs(sdir, &e)) {
            rc = DL_EXIT_RUNTIME;
            fprintf(stderr, "distill: error: %s\n", e.msg);
        } else {
            ctx.stage_index = i;
            ctx.stage_dir = sdir;
            ctx.resume = resume;
            dl_info("stage %d/%d %s '%s'%s\n", i + 1, r.n_stages, stage_kind_name(st->kind), st->name, resume ? " (resuming)" : "");
            double ts = dl_now();
            if (!group || runs_on_every_rank(st->kind)) {
                rc = dl_find_stage(st->kind)->run(&ctx, st);
            } else {  // rank 0 runs it, the others wait for its status (within DISTILL_DIST_TIMEOUT)
                int32_t s0 = rank == 0 ? dl_find_stage(st->kind)->run(&ctx, st) : 0;
                if (dist_bcast(group, &s0, sizeof s0, &e)) {
                    fprintf(stderr, "distill: error (rank %d): waiting for rank 0 to run stage '%s': %s\n", rank, st->name, e.msg);
                    s0 = DL_EXIT_RUNTIME;
                }
                rc = s0;
            }
            if (rc == DL_EXIT_OK && g_stop && !group) rc = DL_EXIT_INTERRUPTED;
            if (rc == DL_EXIT_OK && rank == 0) {
                FILE *f = fopen(done, "w");
                if (!f || fprintf(f, "%.3f s\n", dl_now() - ts) < 0 || fsync(fileno(f)) || fclose(f)) {
                    fprintf(stderr, "distill: error: %s: cannot write: %s\n", done, strerror(errno));
                    rc = DL_EXIT_RUNTIME;
                }
                dl_info("stage %d/%d '%s' finished in %.1f s\n", i + 1, r.n_stages, st->name, dl_now() - ts);
            }
            resume = false;  // only the first unfinished stage continues from a checkpoint
        }
        free(sdir);
        free(done);
    }
    ctx.stage_dir = NULL;
    if (ctx.state && ctx.state_free) ctx.state_free(ctx.state);
    if (group) {
        if (rc == DL_EXIT_OK && dist_barrier(group, &e)) {  // every rank saw every stage through
            fprintf(stderr, "distill: error (rank %d): %s\n", rank, e.msg);
            rc = DL_EXIT_RUNTIME;
        }
#ifdef DISTILL_NCCL
        if (stage_dist()->nccl) nccl_comm_free(stage_dist()->nccl);
#endif
        stage_set_dist(NULL);
        dist_close(group);
    }
    if (rc == DL_EXIT_INTERRUPTED && rank == 0)
        fprintf(stderr, "distill: interrupted; continue with: distill %s --resume %s\n", recipe_path, run_dir);
    else if (rc == DL_EXIT_OK)
        dl_info("run '%s' finished in %.1f s: %s\n", r.run.name, dl_now() - t0, run_dir);
    free(run_dir);
    free(resolved_path);
    recipe_free(&r);
    return rc;
}

DL_COMMAND(cmd_run, {
    .name = "run",
    .usage = "RECIPE.toml [--set key=value ...] [--resume [RUN_DIR]] [--dry-run] [--quiet]",
    .summary = "run a recipe (also: distill RECIPE.toml ...)",
    .help = "Validates RECIPE.toml completely (every problem is listed as file:line:col: message, exit 3), then runs\n"
            "its [[stage]] tables in order in the run directory output_dir/name (recipe.resolved.toml, one\n"
            "directory per stage). See docs/RECIPES.md.\n\n"
            "options:\n"
            "  --set key=value   override a recipe value, typed by the schema: --set optimizer.lr=1e-4,\n"
            "                    --set stage.layerwise.steps=10 (stage.NAME or stage.KIND), --set run.device=cuda,\n"
            "                    --set stage.NAME.loss.kl=0.2, --set data.NAME.seq_len=512; repeatable\n"
            "  --resume [RUN_DIR] continue the run (default RUN_DIR: output_dir/name): finished stages are skipped,\n"
            "                    the unfinished one continues from its newest complete checkpoint\n"
            "  --dry-run         print the plan (stages, layouts, parameters, tokens/step, memory) and exit;\n"
            "                    missing inputs are warnings, and teacher.config stands in for a missing teacher\n"
            "  --quiet           no progress output\n"
            "  --schema          print the recipe reference (every key, type, default, range) as Markdown\n\n"
            "SIGINT/SIGTERM stop the run after the current step (exit 4); a second signal kills it at once.\n\n"
            "Data parallel: start one process per GPU (scripts/launch-local -n N, srun, mpirun, torchrun-style\n"
            "RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT); the training stages split each global batch\n"
            "(micro_batch x grad_accum x N) over the ranks with ZeRO hardware.zero = 0, 1 or 2; a run may resume\n"
            "on another number of processes. See docs/MULTIGPU.md.\n",
    .run = run_main,
})
