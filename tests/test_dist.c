// test_dist: environment detection, SLURM hostlists, and the TCP / shared-file rendezvous with real
// processes (fork) on 127.0.0.1: broadcast, allgather, barrier; a rank that never shows up, a rank that
// dies, mismatched world sizes and job keys all end every process with an error naming the rank (no hang).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/dist.h"
#include "tests/check.h"

// ---------------------------------------------------------------- hostlists

static void check_expand(const char *list, const char *want) {  // want: space-separated
    char **h;
    int n;
    DlError e = {{0}};
    if (dist_hostlist_expand(list, 0, &h, &n, &e)) {
        fprintf(stderr, "expand '%s' failed: %s\n", list, e.msg);
        CHECK(0);
        return;
    }
    char got[2048] = "";
    size_t k = 0;
    for (int i = 0; i < n; i++) k += (size_t)snprintf(got + k, sizeof got - k, "%s%s", i ? " " : "", h[i]);
    if (strcmp(got, want)) fprintf(stderr, "expand '%s': got '%s', want '%s'\n", list, got, want);
    CHECK(!strcmp(got, want));
    char first[256];
    CHECK(dist_hostlist_first(list, first, sizeof first, &e) == 0);
    CHECK(!strncmp(first, want, strlen(first)) && (want[strlen(first)] == ' ' || want[strlen(first)] == 0));
    dist_hostlist_free(h, n);
}

static void check_expand_bad(const char *list, const char *needle) {
    char **h = NULL;
    int n = 0;
    DlError e = {{0}};
    int rc = dist_hostlist_expand(list, 1000, &h, &n, &e);
    CHECK(rc == -1);
    if (rc == 0) dist_hostlist_free(h, n);
    if (!strstr(e.msg, needle)) fprintf(stderr, "expand '%s': error '%s' lacks '%s'\n", list, e.msg, needle);
    CHECK(strstr(e.msg, needle) != NULL);
}

static void test_hostlists(void) {
    check_expand("node1", "node1");
    check_expand("gpu[01-03,07]", "gpu01 gpu02 gpu03 gpu07");
    check_expand("a[8-11],login", "a8 a9 a10 a11 login");
    check_expand("rack[1-2]-n[1-2]", "rack1-n1 rack1-n2 rack2-n1 rack2-n2");
    check_expand("x[009-011].ib,y", "x009.ib x010.ib x011.ib y");
    check_expand("n[5],m[0-1]", "n5 m0 m1");
    check_expand_bad("gpu[01-03", "unbalanced");
    check_expand_bad("gpu[3-1]", "descending");
    check_expand_bad("gpu[a-b]", "expected digits");
    check_expand_bad("gpu[]", "empty brackets");
    check_expand_bad("a,,b", "empty item");
    check_expand_bad("a,", "empty item");
    check_expand_bad("n[1-5000]", "more than 1000");
    char first[64];
    DlError e;
    CHECK(dist_hostlist_first("big[00001-99999999],z", first, sizeof first, &e) == 0 && !strcmp(first, "big00001"));
}

// ---------------------------------------------------------------- environment

static const char *VARS[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                             "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                             "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                             "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
                             "SLURM_NTASKS_PER_NODE", "SLURM_RESTART_COUNT", "PMIX_RANK", "PMI_RANK", "PMI_SIZE",
                             "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "TORCHELASTIC_RUN_ID", "DISTILL_DIST_TIMEOUT",
                             "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"};

static void clear_env(void) {
    for (size_t i = 0; i < DL_ARRAY_LEN(VARS); i++) unsetenv(VARS[i]);
}

static void test_env(void) {
    DistEnv env;
    DistOpts o;
    DlError e = {{0}};
    dist_opts_default(&o);
    clear_env();
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(env.source == DIST_SRC_SINGLE && env.rank == 0 && env.world_size == 1 && env.local_rank == 0);

    // srun: 2 nodes x 4 tasks, this is task 6
    setenv("SLURM_PROCID", "6", 1);
    setenv("SLURM_NTASKS", "8", 1);
    setenv("SLURM_LOCALID", "2", 1);
    setenv("SLURM_JOB_ID", "123456", 1);
    setenv("SLURM_JOB_NODELIST", "gpu[07-08]", 1);
    setenv("SLURM_NTASKS_PER_NODE", "4(x2)", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(env.source == DIST_SRC_SLURM && env.rank == 6 && env.world_size == 8 && env.local_rank == 2 && env.local_size == 4);
    CHECK(!strcmp(env.master_addr, "gpu07") && env.master_port == 20000 + 123456 % 20000);
    CHECK(!strcmp(env.key, "slurm-123456.0"));
    setenv("SLURM_RESTART_COUNT", "2", 1);  // a requeued job is another launch
    setenv("MASTER_PORT", "29500", 1);
    setenv("SLURM_STEP_NUM_TASKS", "4", 1);  // the step's task count wins over the allocation's
    setenv("SLURM_PROCID", "3", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(!strcmp(env.key, "slurm-123456.2") && env.master_port == 29500 && env.world_size == 4);
    setenv("SLURM_PROCID", "4", 1);
    CHECK(dist_env_detect(&o, &env, &e) == -1 && strstr(e.msg, "rank 4 is out of range for world size 4"));
    setenv("SLURM_PROCID", "x1", 1);
    CHECK(dist_env_detect(&o, &env, &e) == -1 && strstr(e.msg, "SLURM_PROCID='x1'"));

    // torchrun env wins over SLURM's (a torchrun-style launcher inside an allocation)
    setenv("RANK", "1", 1);
    setenv("WORLD_SIZE", "2", 1);
    setenv("LOCAL_RANK", "1", 1);
    setenv("MASTER_ADDR", "10.0.0.5", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(env.source == DIST_SRC_TORCHRUN && env.rank == 1 && env.world_size == 2 && env.local_rank == 1);
    CHECK(!strcmp(env.master_addr, "10.0.0.5") && env.master_port == 29500);
    setenv("MASTER_PORT", "70000", 1);
    CHECK(dist_env_detect(&o, &env, &e) == -1 && strstr(e.msg, "MASTER_PORT"));

    clear_env();
    setenv("OMPI_COMM_WORLD_RANK", "3", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "16", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(env.source == DIST_SRC_OMPI && env.rank == 3 && env.world_size == 16 && env.local_rank == 3 && env.local_size == 8);
    CHECK(env.master_addr[0] == 0 && env.master_port == -1);
    // mpirun's job id gives every rank the same port and job key; over 2 hosts rank 0's address stays unknown
    setenv("OMPI_MCA_ess_base_jobid", "1469972481", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    const int port = env.master_port;
    CHECK(env.master_addr[0] == 0 && port >= 20000 && port < 40000 && !strcmp(env.key, "mpi-1469972481"));
    // all ranks on one host (mpirun -np 2 on one node): rank 0 is 127.0.0.1
    setenv("OMPI_COMM_WORLD_SIZE", "2", 1), setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2", 1), setenv("OMPI_COMM_WORLD_RANK", "1", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(!strcmp(env.master_addr, "127.0.0.1") && env.master_port == port);
    setenv("OMPI_MCA_ess_base_jobid", "1469972482", 1);  // another job: another port (spread by a hash)
    CHECK(dist_env_detect(&o, &env, &e) == 0 && env.master_port != port && !strcmp(env.key, "mpi-1469972482"));
    setenv("MASTER_ADDR", "10.1.2.3", 1), setenv("MASTER_PORT", "29400", 1);  // the explicit ones win
    CHECK(dist_env_detect(&o, &env, &e) == 0 && !strcmp(env.master_addr, "10.1.2.3") && env.master_port == 29400);
    unsetenv("MASTER_ADDR"), unsetenv("MASTER_PORT"), unsetenv("OMPI_MCA_ess_base_jobid");
    unsetenv("OMPI_COMM_WORLD_SIZE");
    CHECK(dist_env_detect(&o, &env, &e) == -1 && strstr(e.msg, "OMPI_COMM_WORLD_SIZE"));

    clear_env();
    setenv("PMI_RANK", "2", 1);
    setenv("PMI_SIZE", "3", 1);
    setenv("MPI_LOCALRANKID", "0", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(env.source == DIST_SRC_PMI && env.rank == 2 && env.world_size == 3 && env.local_rank == 0);

    clear_env();
    setenv("PMIX_RANK", "1", 1);
    CHECK(dist_env_detect(&o, &env, &e) == -1 && strstr(e.msg, "no world size"));
    setenv("SLURM_NTASKS", "2", 1);
    CHECK(dist_env_detect(&o, &env, &e) == 0 && env.source == DIST_SRC_PMIX && env.rank == 1 && env.world_size == 2);

    // explicit settings beat everything
    o.rank = 0;
    o.world_size = 4;
    o.master_addr = "127.0.0.1";
    o.master_port = 1234;
    o.key = "mykey";
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    CHECK(env.source == DIST_SRC_OVERRIDE && env.world_size == 4 && env.master_port == 1234 && !strcmp(env.key, "mykey"));
    o.world_size = -1;
    CHECK(dist_env_detect(&o, &env, &e) == -1 && strstr(e.msg, "given together"));
    clear_env();
    // launcher settings
    dist_opts_default(&o);
    setenv("DISTILL_RDZV_FILE", "/shared/rdzv", 1);
    setenv("DISTILL_DIST_KEY", "job7", 1);
    setenv("DISTILL_DIST_TIMEOUT", "12.5", 1);
    CHECK(dist_opts_from_env(&o, &e) == 0 && o.method == DIST_RDV_FILE && !strcmp(o.file_path, "/shared/rdzv") &&
          !strcmp(o.key, "job7") && o.timeout_s == 12.5);
    setenv("DISTILL_RDZV", "udp", 1);
    CHECK(dist_opts_from_env(&o, &e) == -1 && strstr(e.msg, "DISTILL_RDZV: unknown rendezvous method 'udp'"));
    unsetenv("DISTILL_RDZV");
    setenv("DISTILL_DIST_TIMEOUT", "-3", 1);
    dist_opts_default(&o);
    CHECK(dist_opts_from_env(&o, &e) == -1 && strstr(e.msg, "DISTILL_DIST_TIMEOUT"));
    unsetenv("DISTILL_RDZV_FILE");
    unsetenv("DISTILL_DIST_KEY");
    clear_env();
}

// ---------------------------------------------------------------- real processes

static char g_dir[256];

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &l)) return 29000 + getpid() % 1000;
    int p = ntohs(a.sin_port);
    close(fd);
    return p;
}

typedef enum { BEHAVE_OK = 0, BEHAVE_DIE_AFTER_INIT, BEHAVE_WRONG_WORLD, BEHAVE_WRONG_KEY } Behave;

typedef struct {
    DistMethod method;
    int world, port;
    double timeout;
    char path[300];
} Setup;

// The program of one rank: init, bcast, allgather, barrier, a second bcast; checks the data.
static int rank_main(const Setup *s, int rank, Behave b, char *err, size_t err_n) {
    DistOpts o;
    dist_opts_default(&o);
    o.rank = rank;
    o.world_size = b == BEHAVE_WRONG_WORLD ? s->world + 1 : s->world;
    o.master_addr = "127.0.0.1";
    o.master_port = s->port;
    o.method = s->method;
    o.file_path = s->path;
    o.timeout_s = s->timeout;
    o.key = b == BEHAVE_WRONG_KEY ? "other-job" : "test-job";
    DistEnv env;
    DlError e = {{0}};
    if (dist_env_detect(&o, &env, &e)) goto fail;
    DistGroup *g = dist_init(&env, &o, &e);
    if (!g) goto fail;
    if (b == BEHAVE_DIE_AFTER_INIT) _exit(9);  // as if killed: no goodbye
    if (dist_local_rank(g) != rank || dist_local_size(g) != s->world || dist_world(g) != s->world) {
        snprintf(e.msg, sizeof e.msg, "rank %d: local rank %d / local size %d / world %d", rank, dist_local_rank(g),
                 dist_local_size(g), dist_world(g));
        goto fail_g;
    }
    unsigned char id[128];  // the size of an ncclUniqueId
    for (int i = 0; i < 128; i++) id[i] = rank == 0 ? (unsigned char)(i * 7 + 3) : 0;
    if (dist_bcast(g, id, sizeof id, &e)) goto fail_g;
    for (int i = 0; i < 128; i++)
        if (id[i] != (unsigned char)(i * 7 + 3)) {
            snprintf(e.msg, sizeof e.msg, "rank %d: broadcast byte %d wrong", rank, i);
            goto fail_g;
        }
    int64_t mine[2] = {rank * 1000 + 1, -rank}, all[2 * 16];
    if (dist_allgather(g, mine, sizeof mine, all, &e)) goto fail_g;
    for (int r = 0; r < s->world; r++)
        if (all[2 * r] != r * 1000 + 1 || all[2 * r + 1] != -r) {
            snprintf(e.msg, sizeof e.msg, "rank %d: allgather slot %d wrong", rank, r);
            goto fail_g;
        }
    for (int k = 0; k < 3; k++)
        if (dist_barrier(g, &e)) goto fail_g;
    double x = rank == 0 ? 3.25 : 0;
    if (dist_bcast(g, &x, sizeof x, &e)) goto fail_g;
    if (x != 3.25) {
        snprintf(e.msg, sizeof e.msg, "rank %d: second broadcast wrong", rank);
        goto fail_g;
    }
    if (dist_barrier(g, &e)) goto fail_g;
    dist_close(g);
    return 0;
fail_g:
    dist_close(g);
fail:
    snprintf(err, err_n, "%s", e.msg);
    return 3;
}

typedef struct {
    int status[16];   // exit status per rank, -1 not launched, -2 killed by the watchdog (hang)
    char err[16][DL_ERR_LEN];
    double seconds;
} Outcome;

// Forks one process per launched rank (launched[r] != 0), waits with a deadline; kills stragglers.
static void run_ranks(const Setup *s, const int *launched, const Behave *behave, double limit, Outcome *out) {
    pid_t pid[16];
    int fds[16][2];
    memset(out, 0, sizeof *out);
    double t0 = dl_now();
    for (int r = 0; r < s->world; r++) {
        out->status[r] = -1;
        pid[r] = -1;
        if (!launched[r]) continue;
        if (pipe(fds[r])) abort();
        pid[r] = fork();
        if (pid[r] == 0) {
            close(fds[r][0]);
            char err[DL_ERR_LEN] = "";
            int rc = rank_main(s, r, behave ? behave[r] : BEHAVE_OK, err, sizeof err);
            if (write(fds[r][1], err, strlen(err))) {}
            _exit(rc);
        }
        close(fds[r][1]);
    }
    int left = 0;
    for (int r = 0; r < s->world; r++) left += pid[r] > 0;
    while (left > 0) {
        for (int r = 0; r < s->world; r++) {
            if (pid[r] <= 0) continue;
            int st;
            if (waitpid(pid[r], &st, WNOHANG) == pid[r]) {
                out->status[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                ssize_t n = read(fds[r][0], out->err[r], DL_ERR_LEN - 1);
                out->err[r][n > 0 ? n : 0] = 0;
                close(fds[r][0]);
                pid[r] = 0;
                left--;
            }
        }
        if (left && dl_now() - t0 > limit) {  // a hang: the test fails, and leaves no process behind
            for (int r = 0; r < s->world; r++)
                if (pid[r] > 0) {
                    kill(pid[r], SIGKILL);
                    waitpid(pid[r], NULL, 0);
                    close(fds[r][0]);
                    out->status[r] = -2;
                    pid[r] = 0;
                    left--;
                }
        }
        usleep(5000);
    }
    out->seconds = dl_now() - t0;
}

static void setup(Setup *s, DistMethod m, int world, double timeout, const char *name) {
    memset(s, 0, sizeof *s);
    s->method = m;
    s->world = world;
    s->timeout = timeout;
    s->port = free_port();
    snprintf(s->path, sizeof s->path, "%s/%s", g_dir, name);
}

static void report(const char *what, const Setup *s, const Outcome *o) {
    printf("%-44s %.2f s:", what, o->seconds);
    for (int r = 0; r < s->world; r++) printf(" %d", o->status[r]);
    printf("\n");
    for (int r = 0; r < s->world; r++)
        if (o->err[r][0]) printf("    rank %d: %s\n", r, o->err[r]);
}

static void test_ok(DistMethod m, int world) {
    Setup s;
    setup(&s, m, world, 10, m == DIST_RDV_FILE ? "rdv-ok" : "");
    int all[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    Outcome o;
    run_ranks(&s, all, NULL, 20, &o);
    char what[64];
    snprintf(what, sizeof what, "%s, %d ranks, all present", m == DIST_RDV_FILE ? "file" : "tcp", world);
    report(what, &s, &o);
    for (int r = 0; r < world; r++) CHECK(o.status[r] == 0);
    if (m == DIST_RDV_FILE) {  // the rendezvous file itself is gone once everyone read it
        CHECK(!dl_file_exists(s.path));
    }
}

// A rank that never shows up: every launched rank fails within about the timeout, naming what it waited for.
static void test_missing(DistMethod m, int missing) {
    Setup s;
    setup(&s, m, 3, 1.0, "rdv-missing");
    int launched[3] = {1, 1, 1};
    launched[missing] = 0;
    Outcome o;
    run_ranks(&s, launched, NULL, 15, &o);
    char what[64];
    snprintf(what, sizeof what, "%s, rank %d of 3 never starts", m == DIST_RDV_FILE ? "file" : "tcp", missing);
    report(what, &s, &o);
    CHECK(o.seconds < 8);
    for (int r = 0; r < 3; r++) {
        if (r == missing) continue;
        CHECK(o.status[r] == 3);
        char me[32];
        snprintf(me, sizeof me, "rank %d (host ", r);
        CHECK(strstr(o.err[r], "timed out") || strstr(o.err[r], "aborted"));
        CHECK(strstr(o.err[r], me) != NULL);  // names the rank and host reporting
    }
    if (missing != 0) {  // rank 0 names the absent rank
        char need[64];
        snprintf(need, sizeof need, m == DIST_RDV_FILE ? "waiting for rank %d" : "rank %d of 3", missing);
        CHECK(strstr(o.err[0], need) != NULL);
        if (m == DIST_RDV_TCP && strstr(o.err[1], "aborted")) CHECK(strstr(o.err[1], need) != NULL);  // rank 0's diagnosis
    } else {
        CHECK(strstr(o.err[1], m == DIST_RDV_FILE ? "waiting for rank 0 to write" : "connecting to rank 0") != NULL);
    }
}

static void test_death(DistMethod m) {
    Setup s;
    setup(&s, m, 3, m == DIST_RDV_FILE ? 1.5 : 30, "rdv-death");
    int all[3] = {1, 1, 1};
    Behave b[3] = {BEHAVE_OK, BEHAVE_OK, BEHAVE_DIE_AFTER_INIT};
    Outcome o;
    run_ranks(&s, all, b, 15, &o);
    report(m == DIST_RDV_FILE ? "file, rank 2 dies after the rendezvous" : "tcp, rank 2 dies after the rendezvous", &s, &o);
    CHECK(o.status[2] == 9);
    CHECK(o.status[0] == 3 && o.status[1] == 3);
    CHECK(strstr(o.err[0], "rank 2") != NULL && strstr(o.err[1], "rank 2") != NULL);
    if (m == DIST_RDV_TCP) {  // noticed at once (connection closed), not after the 30 s timeout
        CHECK(o.seconds < 10);
        CHECK(strstr(o.err[0], "closed its connection") != NULL);
    }
}

static void test_mismatch(Behave b) {
    Setup s;
    setup(&s, DIST_RDV_TCP, 2, b == BEHAVE_WRONG_KEY ? 1.5 : 10, "");
    int all[2] = {1, 1};
    Behave bb[2] = {BEHAVE_OK, b};
    Outcome o;
    run_ranks(&s, all, bb, 15, &o);
    report(b == BEHAVE_WRONG_KEY ? "tcp, rank 1 from another job" : "tcp, rank 1 with another world size", &s, &o);
    CHECK(o.status[0] == 3 && o.status[1] == 3);
    if (b == BEHAVE_WRONG_WORLD) {
        CHECK(strstr(o.err[0], "world size 3") != NULL);
        CHECK(strstr(o.err[1], "world size 3") != NULL);  // rank 0 forwarded its diagnosis
    } else {
        CHECK(strstr(o.err[1], "another launch") != NULL);
        CHECK(strstr(o.err[0], "timed out") != NULL);  // it kept waiting for its own rank 1
    }
}

static void test_single(void) {
    DistOpts o;
    dist_opts_default(&o);
    DistEnv env;
    DlError e;
    clear_env();
    CHECK(dist_env_detect(&o, &env, &e) == 0);
    DistGroup *g = dist_init(&env, &o, &e);
    CHECK(g != NULL);
    if (!g) return;
    int x = 5, all = 0;
    CHECK(dist_bcast(g, &x, sizeof x, &e) == 0 && x == 5);
    CHECK(dist_allgather(g, &x, sizeof x, &all, &e) == 0 && all == 5);
    CHECK(dist_barrier(g, &e) == 0 && dist_local_rank(g) == 0 && dist_local_size(g) == 1);
    dist_close(g);
}

// A rank started by scripts/launch-local: everything from the torchrun-style environment.
static int launched_rank(void) {
    DistOpts o;
    dist_opts_default(&o);
    DistEnv env;
    DlError e = {{0}};
    if (dist_opts_from_env(&o, &e) || dist_env_detect(&o, &env, &e)) goto fail;
    DistGroup *g = dist_init(&env, &o, &e);
    if (!g) goto fail;
    int mine = 100 + env.rank, all[64];
    int rc = dist_allgather(g, &mine, sizeof mine, all, &e);
    for (int r = 0; rc == 0 && r < env.world_size; r++)
        if (all[r] != 100 + r) rc = dl_fail(&e, "allgather slot %d", r);
    printf("rank %d of %d (%s, local rank %d): %s\n", env.rank, env.world_size, dist_source_name(env.source), dist_local_rank(g),
           rc ? e.msg : "ok");
    dist_close(g);
    return rc ? 3 : 0;
fail:
    printf("rank ?: %s\n", e.msg);
    return 3;
}

// scripts/launch-local starting this program as 3 ranks, TCP and file rendezvous.
static void test_launcher(const char *self) {
    if (!dl_file_exists("scripts/launch-local")) {
        printf("scripts/launch-local not found from %s: launcher test skipped\n", getcwd(NULL, 0));
        return;
    }
    for (int file = 0; file < 2; file++) {
        char cmd[1024], log[300];
        snprintf(log, sizeof log, "%s/launch.log", g_dir);
        snprintf(cmd, sizeof cmd, "timeout 60 scripts/launch-local -n 3 --timeout 10 %s%s%s -- %s --launched-rank > %s 2>&1",
                 file ? "--rdzv file:" : "", file ? g_dir : "", file ? "/rdzv-launch" : "", self, log);
        int st = system(cmd);
        size_t n = 0;
        DlError e;
        char *out = dl_read_file(log, &n, &e);
        bool ok = st == 0 && out && strstr(out, "[0] rank 0 of 3 (torchrun environment, local rank 0): ok") &&
                  strstr(out, "[2] rank 2 of 3 (torchrun environment, local rank 2): ok");
        printf("launch-local, 3 ranks, %s rendezvous: %s\n", file ? "file" : "tcp", ok ? "ok" : "FAILED");
        if (!ok) fprintf(stderr, "status %d, output:\n%s\n", st, out ? out : "(none)");
        CHECK(ok);
        free(out);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--launched-rank")) return launched_rank();
    signal(SIGPIPE, SIG_IGN);
    snprintf(g_dir, sizeof g_dir, "/tmp/test_dist.XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    test_hostlists();
    test_env();
    test_single();
    test_ok(DIST_RDV_TCP, 2);
    test_ok(DIST_RDV_TCP, 8);
    test_ok(DIST_RDV_FILE, 3);
    test_missing(DIST_RDV_TCP, 2);
    test_missing(DIST_RDV_TCP, 0);
    test_missing(DIST_RDV_FILE, 2);
    test_missing(DIST_RDV_FILE, 0);
    test_death(DIST_RDV_TCP);
    test_death(DIST_RDV_FILE);
    test_mismatch(BEHAVE_WRONG_WORLD);
    test_mismatch(BEHAVE_WRONG_KEY);
    test_launcher(argv[0]);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd)) {}
    return check_report("test_dist");
}
