// dist.c: see dist.h. Environment detection, SLURM hostlists, and the TCP / shared-file rendezvous.
#include "distill/dist.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

// ---------------------------------------------------------------- names, options

const char *dist_source_name(DistSource s) {
    static const char *N[] = {"single process", "explicit settings", "torchrun environment", "Open MPI",
                              "SLURM", "PMIx", "MPICH PMI"};
    return (s >= 0 && s <= DIST_SRC_PMI) ? N[s] : "?";
}

int dist_method_parse(const char *s, DistMethod *out, DlError *e) {
    if (!strcmp(s, "tcp")) *out = DIST_RDV_TCP;
    else if (!strcmp(s, "file")) *out = DIST_RDV_FILE;
    else return dl_fail(e, "unknown rendezvous method '%s' (expected tcp or file)", s);
    return 0;
}

void dist_opts_default(DistOpts *o) {
    memset(o, 0, sizeof *o);
    o->rank = o->world_size = o->local_rank = o->master_port = -1;
    o->method = DIST_RDV_TCP;
}

int dist_opts_from_env(DistOpts *o, DlError *e) {
    const char *m = getenv("DISTILL_RDZV"), *f = getenv("DISTILL_RDZV_FILE"), *k = getenv("DISTILL_DIST_KEY"),
               *t = getenv("DISTILL_DIST_TIMEOUT");
    if (m && *m && dist_method_parse(m, &o->method, e)) return dl_fail_prefix(e, "DISTILL_RDZV: ");
    if (f && *f && !o->file_path) {
        o->file_path = f;
        if (!(m && *m)) o->method = DIST_RDV_FILE;
    }
    if (k && *k && !o->key) o->key = k;
    if (t && *t && o->timeout_s <= 0) {
        char *end;
        double v = strtod(t, &end);
        if (*end || !(v > 0)) return dl_fail(e, "DISTILL_DIST_TIMEOUT='%s' is not a positive number of seconds", t);
        o->timeout_s = v;
    }
    return 0;
}

static double opts_timeout(const DistOpts *o) {
    if (o && o->timeout_s > 0) return o->timeout_s;
    const char *s = getenv("DISTILL_DIST_TIMEOUT");
    if (s && *s) {
        char *end;
        double v = strtod(s, &end);
        if (*end == 0 && v > 0) return v;
        dl_warn("DISTILL_DIST_TIMEOUT='%s' is not a positive number of seconds; using 300", s);
    }
    return 300;
}

// ---------------------------------------------------------------- environment

// Reads integer variable `name` into *out (unchanged if unset). -1 with e if set but not an int in [lo, hi].
static int env_int(const char *name, int lo, int hi, int *out, bool *found, DlError *e) {
    const char *s = getenv(name);
    if (found) *found = false;
    if (!s || !*s) return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return dl_fail(e, "environment variable %s='%s' is not an integer in [%d, %d]", name, s, lo, hi);
    *out = (int)v;
    if (found) *found = true;
    return 0;
}

static bool env_set(const char *name) {
    const char *s = getenv(name);
    return s && *s;
}

// The id every rank of an MPI launch shares: Open MPI 4's job id, or the PMIx namespace (Open MPI 5, PRRTE,
// srun --mpi=pmix); NULL for other launchers.
static const char *mpi_job_id(void) {
    const char *v = getenv("OMPI_MCA_ess_base_jobid");
    if (v && *v) return v;
    v = getenv("PMIX_NAMESPACE");
    return v && *v ? v : NULL;
}

static uint32_t fnv1a(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

int dist_env_detect(const DistOpts *o, DistEnv *env, DlError *e) {
    memset(env, 0, sizeof *env);
    env->rank = 0;
    env->world_size = 1;
    env->local_rank = -1;
    env->local_size = -1;
    env->master_port = -1;
    env->source = DIST_SRC_SINGLE;
    if (gethostname(env->host, sizeof env->host - 1)) snprintf(env->host, sizeof env->host, "unknown-host");
    const int BIG = 1 << 20;
    bool f1, f2;

    if (o && (o->rank >= 0 || o->world_size >= 0)) {
        if (o->rank < 0 || o->world_size < 1)
            return dl_fail(e, "distributed settings: rank and world size must be given together (got rank %d, world size %d)",
                           o->rank, o->world_size);
        env->rank = o->rank;
        env->world_size = o->world_size;
        env->source = DIST_SRC_OVERRIDE;
    } else if (env_set("RANK") && env_set("WORLD_SIZE")) {
        if (env_int("RANK", 0, BIG, &env->rank, NULL, e) || env_int("WORLD_SIZE", 1, BIG, &env->world_size, NULL, e)) return -1;
        if (env_int("LOCAL_RANK", 0, BIG, &env->local_rank, NULL, e) ||
            env_int("LOCAL_WORLD_SIZE", 1, BIG, &env->local_size, NULL, e)) return -1;
        env->source = DIST_SRC_TORCHRUN;
    } else if (env_set("OMPI_COMM_WORLD_RANK")) {
        if (env_int("OMPI_COMM_WORLD_RANK", 0, BIG, &env->rank, NULL, e) ||
            env_int("OMPI_COMM_WORLD_SIZE", 1, BIG, &env->world_size, &f1, e) ||
            env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, BIG, &env->local_rank, NULL, e) ||
            env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, BIG, &env->local_size, NULL, e)) return -1;
        if (!f1) return dl_fail(e, "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not");
        env->source = DIST_SRC_OMPI;
    } else if (env_set("SLURM_PROCID") && (env_set("SLURM_STEP_NUM_TASKS") || env_set("SLURM_NTASKS"))) {
        if (env_int("SLURM_PROCID", 0, BIG, &env->rank, NULL, e)) return -1;
        // the step's task count (srun) wins over the allocation's
        if (env_int(env_set("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS", 1, BIG, &env->world_size, NULL, e))
            return -1;
        if (env_int("SLURM_LOCALID", 0, BIG, &env->local_rank, NULL, e)) return -1;
        env->source = DIST_SRC_SLURM;
    } else if (env_set("PMIX_RANK")) {
        if (env_int("PMIX_RANK", 0, BIG, &env->rank, NULL, e)) return -1;
        f1 = f2 = false;
        if (env_int("SLURM_NTASKS", 1, BIG, &env->world_size, &f1, e)) return -1;
        if (!f1 && env_int("WORLD_SIZE", 1, BIG, &env->world_size, &f2, e)) return -1;
        if (!f1 && !f2)
            return dl_fail(e, "PMIX_RANK=%d is set but no world size is known (set WORLD_SIZE, or launch with srun)", env->rank);
        if (env_int("SLURM_LOCALID", 0, BIG, &env->local_rank, NULL, e)) return -1;
        env->source = DIST_SRC_PMIX;
    } else if (env_set("PMI_RANK")) {
        if (env_int("PMI_RANK", 0, BIG, &env->rank, NULL, e) || env_int("PMI_SIZE", 1, BIG, &env->world_size, &f1, e) ||
            env_int("MPI_LOCALRANKID", 0, BIG, &env->local_rank, NULL, e) ||
            env_int("MPI_LOCALNRANKS", 1, BIG, &env->local_size, NULL, e)) return -1;
        if (!f1) return dl_fail(e, "PMI_RANK is set but PMI_SIZE is not");
        env->source = DIST_SRC_PMI;
    }
    if (env->rank >= env->world_size)
        return dl_fail(e, "rank %d is out of range for world size %d (from %s)", env->rank, env->world_size,
                       dist_source_name(env->source));
    if (o && o->local_rank >= 0) env->local_rank = o->local_rank;
    if (env->local_size < 0 && env_set("SLURM_NTASKS_PER_NODE") && env->source == DIST_SRC_SLURM) {
        int v;  // "8" or "8(x2)": the leading number is the per-node count when it is uniform
        if (sscanf(getenv("SLURM_NTASKS_PER_NODE"), "%d", &v) == 1 && v > 0) env->local_size = v;
    }

    // rank 0's address
    const char *ma = (o && o->master_addr) ? o->master_addr : getenv("MASTER_ADDR");
    if (ma && *ma) {
        if (strlen(ma) >= sizeof env->master_addr) return dl_fail(e, "MASTER_ADDR '%.40s...' is too long", ma);
        snprintf(env->master_addr, sizeof env->master_addr, "%s", ma);
    } else {
        const char *nl = getenv("SLURM_STEP_NODELIST");
        if (!nl || !*nl) nl = getenv("SLURM_JOB_NODELIST");
        if (nl && *nl && dist_hostlist_first(nl, env->master_addr, sizeof env->master_addr, e))
            return dl_fail_prefix(e, "SLURM_JOB_NODELIST: ");
        // every rank on this host (mpirun -np N on one node, a launcher that says so): rank 0 is local
        if (!env->master_addr[0] && env->world_size > 1 && env->local_size == env->world_size)
            snprintf(env->master_addr, sizeof env->master_addr, "127.0.0.1");
    }
    if (o && o->master_port > 0) env->master_port = o->master_port;
    else {
        if (env_int("MASTER_PORT", 1, 65535, &env->master_port, &f1, e)) return -1;
        if (!f1 && env_set("SLURM_JOB_ID")) {
            int id;
            if (env_int("SLURM_JOB_ID", 0, 2147483647, &id, NULL, e)) return -1;
            env->master_port = 20000 + id % 20000;  // same on every task of the job, spread across jobs
        } else if (!f1 && mpi_job_id()) {
            env->master_port = 20000 + (int)(fnv1a(mpi_job_id()) % 20000);  // likewise for an MPI launch
        }
    }

    // job key
    if (o && o->key) snprintf(env->key, sizeof env->key, "%s", o->key);
    else if (env_set("SLURM_JOB_ID"))
        snprintf(env->key, sizeof env->key, "slurm-%s.%s", getenv("SLURM_JOB_ID"),
                 env_set("SLURM_RESTART_COUNT") ? getenv("SLURM_RESTART_COUNT") : "0");
    else if (env_set("TORCHELASTIC_RUN_ID")) snprintf(env->key, sizeof env->key, "%s", getenv("TORCHELASTIC_RUN_ID"));
    else if (mpi_job_id()) snprintf(env->key, sizeof env->key, "mpi-%.40s", mpi_job_id());
    if (env->world_size == 1) env->local_rank = 0, env->local_size = env->local_size < 0 ? 1 : env->local_size;
    return 0;
}

// ---------------------------------------------------------------- SLURM hostlists

typedef struct {
    char **h;
    int n, cap, max;
} HostVec;

static int hv_push(HostVec *v, const char *s, size_t len, DlError *e) {
    if (v->n >= v->max) return dl_fail(e, "hostlist expands to more than %d hosts", v->max);
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 16;
        v->h = dl_realloc(v->h, (size_t)v->cap * sizeof(char *));
    }
    char *c = dl_malloc(len + 1);
    memcpy(c, s, len);
    c[len] = 0;
    v->h[v->n++] = c;
    return 0;
}

// Expands one item (no top-level commas): prefix + the first [ranges] group + recursively the rest.
// done holds the text expanded so far.
static int expand_item(const char *item, size_t len, char *done, size_t dlen, HostVec *v, DlError *e) {
    const char *lb = memchr(item, '[', len);
    if (!lb) {
        if (memchr(item, ']', len)) return dl_fail(e, "unmatched ']' in '%.*s'", (int)len, item);
        if (dlen + len >= 512) return dl_fail(e, "host name too long");
        memcpy(done + dlen, item, len);
        if (dlen + len == 0) return dl_fail(e, "empty host name");
        return hv_push(v, done, dlen + len, e);
    }
    const char *rb = memchr(lb, ']', (size_t)(item + len - lb));
    if (!rb) return dl_fail(e, "unmatched '[' in '%.*s'", (int)len, item);
    size_t pre = (size_t)(lb - item);
    if (dlen + pre >= 512) return dl_fail(e, "host name too long");
    memcpy(done + dlen, item, pre);
    dlen += pre;
    const char *p = lb + 1;
    if (p == rb) return dl_fail(e, "empty brackets in '%.*s'", (int)len, item);
    while (p < rb) {
        const char *q = p;
        while (q < rb && *q != ',') q++;
        // one range "a" or "a-b" in [p, q)
        const char *dash = memchr(p, '-', (size_t)(q - p));
        const char *aend = dash ? dash : q;
        if (aend == p || (dash && dash + 1 == q)) return dl_fail(e, "bad range '%.*s' in '%.*s'", (int)(q - p), p, (int)len, item);
        for (const char *c = p; c < q; c++)
            if (c != dash && !isdigit((unsigned char)*c))
                return dl_fail(e, "bad range '%.*s' in '%.*s' (expected digits)", (int)(q - p), p, (int)len, item);
        int width = (int)(aend - p);
        if (width > 9 || (dash && q - dash - 1 > 9)) return dl_fail(e, "range number too long in '%.*s'", (int)len, item);
        long a = strtol(p, NULL, 10), b = dash ? strtol(dash + 1, NULL, 10) : a;
        if (b < a) return dl_fail(e, "descending range '%.*s' in '%.*s'", (int)(q - p), p, (int)len, item);
        if (b - a >= v->max) return dl_fail(e, "hostlist expands to more than %d hosts", v->max);
        for (long x = a; x <= b; x++) {
            int k = snprintf(done + dlen, 512 - dlen, "%0*ld", width, x);
            if (k < 0 || dlen + (size_t)k >= 500) return dl_fail(e, "host name too long");
            if (expand_item(rb + 1, (size_t)(item + len - rb - 1), done, dlen + (size_t)k, v, e)) return -1;
        }
        p = q < rb ? q + 1 : q;
    }
    return 0;
}

int dist_hostlist_expand(const char *list, int max_hosts, char ***hosts, int *n, DlError *e) {
    HostVec v = {0};
    v.max = max_hosts > 0 ? max_hosts : 1 << 16;
    char done[512];
    const char *p = list;
    *hosts = NULL;
    *n = 0;
    if (!*p) return dl_fail(e, "hostlist is empty");
    while (*p) {
        const char *q = p;
        int depth = 0;
        while (*q && (depth > 0 || *q != ',')) {
            if (*q == '[') depth++;
            else if (*q == ']') depth--;
            q++;
        }
        if (depth) {
            dl_fail(e, "unbalanced brackets");
            goto fail;
        }
        if (q == p || (*q && !q[1])) {
            dl_fail(e, "empty item");
            goto fail;
        }
        if (expand_item(p, (size_t)(q - p), done, 0, &v, e)) goto fail;
        p = *q ? q + 1 : q;
    }
    *hosts = v.h;
    *n = v.n;
    return 0;
fail:
    dist_hostlist_free(v.h, v.n);
    return dl_fail_prefix(e, "hostlist '%s': ", list);
}

void dist_hostlist_free(char **hosts, int n) {
    for (int i = 0; i < n; i++) free(hosts[i]);
    free(hosts);
}

int dist_hostlist_first(const char *list, char *out, size_t out_n, DlError *e) {
    // the first top-level item, then its first expansion (max 1 host would reject "a[1-2]")
    const char *q = list;
    int depth = 0;
    while (*q && (depth > 0 || *q != ',')) {
        if (*q == '[') depth++;
        else if (*q == ']') depth--;
        q++;
    }
    char item[512];
    if ((size_t)(q - list) >= sizeof item) return dl_fail(e, "hostlist item too long");
    memcpy(item, list, (size_t)(q - list));
    item[q - list] = 0;
    // keep only the first value of every bracket group: "n[03-05,9]x[1-2]" -> "n[03]x[1]"
    char one[512];
    size_t k = 0;
    for (const char *c = item; *c && k + 1 < sizeof one;) {
        if (*c == '[') {
            one[k++] = *c++;
            while (*c && *c != ',' && *c != '-' && *c != ']' && k + 1 < sizeof one) one[k++] = *c++;
            while (*c && *c != ']') c++;
        } else one[k++] = *c++;
    }
    one[k] = 0;
    char **h;
    int n;
    if (dist_hostlist_expand(one, 1, &h, &n, e)) return -1;
    int rc = 0;
    if (strlen(h[0]) >= out_n) rc = dl_fail(e, "host name '%s' too long", h[0]);
    else snprintf(out, out_n, "%s", h[0]);
    dist_hostlist_free(h, n);
    return rc;
}

// ---------------------------------------------------------------- group

enum { OP_HELLO = 1, OP_WELCOME, OP_BCAST, OP_GATHER, OP_ALL, OP_ABORT };
#define DIST_MAGIC 0x444c5354u  // "DLST"

typedef struct {
    uint32_t magic, op;
    uint64_t seq, len;
} Frame;

typedef struct {
    int32_t rank, world;
    char key[DIST_KEY_MAX];
    char host[DIST_HOST_MAX];
} Hello;

struct DistGroup {
    int rank, world, local_rank, local_size;
    DistMethod method;
    double timeout;
    char key[DIST_KEY_MAX];
    char *hosts;      // [world * DIST_HOST_MAX]
    uint64_t seq;     // operations done
    bool broken;
    // tcp
    int *fd;          // rank 0: [world] (fd[0] = -1); others: fd[0] = connection to rank 0
    char where[300];  // "host:port" of rank 0
    // file
    char *path;       // the rendezvous path P
    uint64_t nonce;
    int64_t last_gather;  // seq of the last completed allgather (older own files can be deleted)
};

int dist_rank(const DistGroup *g) { return g->rank; }
int dist_world(const DistGroup *g) { return g->world; }
int dist_local_rank(const DistGroup *g) { return g->local_rank; }
int dist_local_size(const DistGroup *g) { return g->local_size; }
double dist_timeout(const DistGroup *g) { return g->timeout; }
const char *dist_host_of(const DistGroup *g, int rank) {
    if (!g->hosts || rank < 0 || rank >= g->world || !g->hosts[(size_t)rank * DIST_HOST_MAX]) return "?";
    return g->hosts + (size_t)rank * DIST_HOST_MAX;
}

static const char *my_host(const DistGroup *g) { return dist_host_of(g, g->rank); }

static int remaining_ms(double deadline) {
    double r = deadline - dl_now();
    if (r <= 0) return 0;
    return r > 1e6 ? 1000000000 : (int)(r * 1000) + 1;
}

// ---- TCP framing

static int send_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

// 0 ok; -1 peer closed / error (errno_out); -2 deadline
static int recv_all(int fd, void *buf, size_t n, double deadline, int *err_out) {
    char *p = buf;
    *err_out = 0;
    while (n) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int ms = remaining_ms(deadline);
        if (ms == 0) return -2;
        int r = poll(&pf, 1, ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { *err_out = errno; return -1; }
        if (r == 0) return -2;
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k <= 0) { *err_out = k < 0 ? errno : 0; return -1; }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int send_frame(int fd, uint32_t op, uint64_t seq, const void *data, uint64_t len) {
    Frame f = {DIST_MAGIC, op, seq, len};
    if (send_all(fd, &f, sizeof f)) return -1;
    return len ? send_all(fd, data, len) : 0;
}

// Receives one frame whose payload must have length `want` (or an ABORT, whose text goes into e).
// what: "the allgather" etc., for the message; peer: rank whose connection fd is.
static int recv_frame(DistGroup *g, int fd, int peer, uint32_t op, void *buf, uint64_t want, double deadline,
                      const char *what, DlError *e) {
    Frame f;
    int err;
    int r = recv_all(fd, &f, sizeof f, deadline, &err);
    if (r == -2)
        return dl_fail(e, "rank %d (host %s): timed out after %.1f s waiting for rank %d (host %s) in %s", g->rank,
                       my_host(g), g->timeout, peer, dist_host_of(g, peer), what);
    if (r == -1)
        return dl_fail(e, "rank %d (host %s): rank %d (host %s) closed its connection during %s (%s)", g->rank, my_host(g),
                       peer, dist_host_of(g, peer), what, err ? strerror(err) : "the process exited or was killed?");
    if (f.magic != DIST_MAGIC) return dl_fail(e, "rank %d: garbage on the connection to rank %d during %s", g->rank, peer, what);
    if (f.op == OP_ABORT) {
        char msg[DL_ERR_LEN];
        uint64_t n = f.len < sizeof msg - 1 ? f.len : sizeof msg - 1;
        if (recv_all(fd, msg, n, dl_now() + 2.0, &err)) n = 0;  // the reason follows at once, even past our deadline
        msg[n] = 0;
        return dl_fail(e, "rank %d (host %s): rank %d aborted %s: %s", g->rank, my_host(g), peer, what, msg);
    }
    if (f.op != op || f.seq != g->seq || f.len != want)
        return dl_fail(e, "rank %d (host %s): rank %d sent operation %u #%llu (%llu bytes) during %s (operation %u #%llu, "
                          "%llu bytes expected): the ranks are not running the same program",
                       g->rank, my_host(g), peer, f.op, (unsigned long long)f.seq, (unsigned long long)f.len, what, op,
                       (unsigned long long)g->seq, (unsigned long long)want);
    if (want && (r = recv_all(fd, buf, want, deadline, &err)))
        return dl_fail(e, "rank %d (host %s): %s from rank %d (host %s) during %s", g->rank, my_host(g),
                       r == -2 ? "timed out receiving data" : "lost the connection", peer, dist_host_of(g, peer), what);
    return 0;
}

// Rank 0, after an error: tells every connected rank why, then marks the group broken.
static void tcp_abort_all(DistGroup *g, const DlError *e) {
    if (g->rank == 0 && g->fd)
        for (int r = 1; r < g->world; r++)
            if (g->fd[r] >= 0) send_frame(g->fd[r], OP_ABORT, g->seq, e->msg, strlen(e->msg));
    g->broken = true;
}

static int tcp_listen(DistGroup *g, int port, DlError *e) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    bool v6 = fd >= 0;
    if (!v6) fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return dl_fail(e, "rank 0: socket: %s", strerror(errno));
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc;
    if (v6) {  // dual stack: any IPv4 or IPv6 address of this host
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port), .sin6_addr = in6addr_any};
        rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
        rc = bind(fd, (struct sockaddr *)&a, sizeof a);
    }
    if (rc || listen(fd, 1024)) {
        int er = errno;
        close(fd);
        return dl_fail(e, "rank 0 (host %s): cannot listen on port %d: %s (another job on this node using the port? "
                          "set MASTER_PORT, or use the file rendezvous)", my_host(g), port, strerror(er));
    }
    return fd;
}

static int tcp_connect(DistGroup *g, const char *addr, int port, double deadline, DlError *e) {
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int last = 0;
    double pause = 0.05;
    for (;;) {
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
        int gr = getaddrinfo(addr, ps, &hints, &res);
        if (gr == 0) {
            for (struct addrinfo *a = res; a; a = a->ai_next) {
                int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
                if (fd < 0) { last = errno; continue; }
                if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
                    freeaddrinfo(res);
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    return fd;
                }
                last = errno;
                close(fd);
            }
            freeaddrinfo(res);
        }
        if (dl_now() + pause > deadline) {
            if (gr) return dl_fail(e, "rank %d (host %s): cannot resolve rank 0's address '%s': %s", g->rank, my_host(g), addr, gai_strerror(gr));
            return dl_fail(e, "rank %d (host %s): timed out after %.1f s connecting to rank 0 at %s (last error: %s); is rank 0 "
                              "running, and are MASTER_ADDR/MASTER_PORT the same on every rank?",
                           g->rank, my_host(g), g->timeout, g->where, last ? strerror(last) : "none");
        }
        struct timespec ts = {0, (long)(pause * 1e9)};
        nanosleep(&ts, NULL);
        if (pause < 0.5) pause *= 1.5;
    }
}

static int tcp_rendezvous(DistGroup *g, const DistEnv *env, DlError *e) {
    double deadline = dl_now() + g->timeout;
    if (!env->master_addr[0] && g->rank != 0)
        return dl_fail(e, "rank %d (host %s): no address for rank 0 (launched by %s over several hosts): set MASTER_ADDR to rank "
                          "0's host (mpirun: -x MASTER_ADDR=HOST), or use the file rendezvous (DISTILL_RDZV=file)",
                       g->rank, my_host(g), dist_source_name(env->source));
    if (env->master_port <= 0)
        return dl_fail(e, "rank %d (host %s): no port for rank 0: set MASTER_PORT (launched by %s)", g->rank, my_host(g),
                       dist_source_name(env->source));
    snprintf(g->where, sizeof g->where, "%s:%d", env->master_addr[0] ? env->master_addr : "(any)", env->master_port);
    g->fd = dl_malloc((size_t)g->world * sizeof(int));
    for (int r = 0; r < g->world; r++) g->fd[r] = -1;
    Hello me = {.rank = g->rank, .world = g->world};
    snprintf(me.key, sizeof me.key, "%s", g->key);
    snprintf(me.host, sizeof me.host, "%s", env->host);
    if (g->rank != 0) {
        int fd = tcp_connect(g, env->master_addr, env->master_port, deadline, e);
        if (fd < 0) return -1;
        g->fd[0] = fd;
        if (send_frame(fd, OP_HELLO, 0, &me, sizeof me))
            return dl_fail(e, "rank %d (host %s): lost the connection to rank 0 at %s while greeting it", g->rank, my_host(g), g->where);
        return recv_frame(g, fd, 0, OP_WELCOME, g->hosts, (uint64_t)g->world * DIST_HOST_MAX, deadline,
                          "the rendezvous (waiting for every rank to connect)", e);
    }
    int lfd = tcp_listen(g, env->master_port, e);
    if (lfd < 0) return -1;
    memcpy(g->hosts, me.host, DIST_HOST_MAX);
    int joined = 1, rc = 0;
    while (joined < g->world) {
        struct pollfd pf = {.fd = lfd, .events = POLLIN};
        int ms = remaining_ms(deadline);
        int pr = ms ? poll(&pf, 1, ms) : 0;
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) {
            char missing[256] = "";
            size_t k = 0;
            int nmiss = 0;
            for (int r = 1; r < g->world; r++)
                if (g->fd[r] < 0) {
                    if (nmiss < 16 && k < sizeof missing - 16) k += (size_t)snprintf(missing + k, sizeof missing - k, "%s%d", nmiss ? ", " : "", r);
                    nmiss++;
                }
            if (nmiss > 16) snprintf(missing + k, sizeof missing - k, ", ... (%d in all)", nmiss);
            rc = dl_fail(e, "rank 0 (host %s): timed out after %.1f s waiting for rank%s %s of %d to connect to %s (tcp "
                            "rendezvous, key '%s'); were they launched, with the same MASTER_ADDR/MASTER_PORT?%s",
                         my_host(g), g->timeout, nmiss > 1 ? "s" : "", missing, g->world, g->where, g->key,
                         env->source == DIST_SRC_SLURM ? " (under SLURM: start distill with srun, one task per GPU, "
                                                         "not directly in the batch script)" : "");
            break;
        }
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) continue;
        int one = 1;
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        Frame f;
        Hello h;
        int err;
        double hd = DL_MIN(deadline, dl_now() + 5.0);  // a silent stray connection cannot stall the rendezvous
        if (recv_all(cfd, &f, sizeof f, hd, &err) || f.magic != DIST_MAGIC || f.op != OP_HELLO || f.len != sizeof h ||
            recv_all(cfd, &h, sizeof h, hd, &err)) {
            close(cfd);  // not one of ours (port scanner, other program): ignore it
            continue;
        }
        h.key[DIST_KEY_MAX - 1] = h.host[DIST_HOST_MAX - 1] = 0;
        DlError bad = {{0}};
        if (strcmp(h.key, g->key))
            dl_fail(&bad, "a process on host %s (rank %d) has job key '%s', rank 0 has '%s': it belongs to another launch",
                    h.host, h.rank, h.key, g->key);
        else if (h.world != g->world)
            dl_fail(&bad, "rank %d (host %s) was launched with world size %d, rank 0 (host %s) with %d", h.rank, h.host,
                    h.world, my_host(g), g->world);
        else if (h.rank <= 0 || h.rank >= g->world)
            dl_fail(&bad, "a process on host %s claims rank %d (world size %d)", h.host, h.rank, g->world);
        else if (g->fd[h.rank] >= 0)
            dl_fail(&bad, "rank %d connected twice (hosts %s and %s): two processes were given the same rank", h.rank,
                    dist_host_of(g, h.rank), h.host);
        if (bad.msg[0]) {
            send_frame(cfd, OP_ABORT, 0, bad.msg, strlen(bad.msg));
            close(cfd);
            if (strcmp(h.key, g->key)) {  // another job's process: refuse it, keep waiting for ours
                dl_warn("rank 0: %s", bad.msg);
                continue;
            }
            rc = dl_fail(e, "rank 0 (host %s): %s", my_host(g), bad.msg);
            break;
        }
        g->fd[h.rank] = cfd;
        memcpy(g->hosts + (size_t)h.rank * DIST_HOST_MAX, h.host, DIST_HOST_MAX);
        joined++;
    }
    close(lfd);
    if (rc) {
        tcp_abort_all(g, e);
        return -1;
    }
    for (int r = 1; r < g->world; r++)
        if (send_frame(g->fd[r], OP_WELCOME, 0, g->hosts, (uint64_t)g->world * DIST_HOST_MAX)) {
            dl_fail(e, "rank 0 (host %s): lost rank %d (host %s) right after the rendezvous", my_host(g), r, dist_host_of(g, r));
            tcp_abort_all(g, e);
            return -1;
        }
    return 0;
}

// One collective through rank 0: bcast (only rank 0's data matters) or allgather.
static int tcp_collective(DistGroup *g, bool bcast, const void *mine, size_t len, void *out, DlError *e) {
    double deadline = dl_now() + g->timeout;
    const char *what = bcast ? "a broadcast from rank 0" : "an allgather";
    size_t total = bcast ? len : len * (size_t)g->world;
    uint32_t op_up = OP_GATHER, op_down = bcast ? OP_BCAST : OP_ALL;
    if (g->rank != 0) {
        // everyone reports in (also for bcast, so that a dead rank is noticed by everyone at once)
        if (send_frame(g->fd[0], op_up, g->seq, bcast ? NULL : mine, bcast ? 0 : len))
            return dl_fail(e, "rank %d (host %s): lost the connection to rank 0 (host %s) during %s: did it exit?", g->rank,
                           my_host(g), dist_host_of(g, 0), what);
        if (recv_frame(g, g->fd[0], 0, op_down, out, total, deadline, what, e)) return -1;
        return 0;
    }
    if (bcast) memmove(out, mine, len);
    else memmove((char *)out, mine, len);
    for (int r = 1; r < g->world; r++)
        if (recv_frame(g, g->fd[r], r, op_up, bcast ? NULL : (char *)out + (size_t)r * len, bcast ? 0 : len, deadline, what, e)) {
            tcp_abort_all(g, e);
            return -1;
        }
    for (int r = 1; r < g->world; r++)
        if (send_frame(g->fd[r], op_down, g->seq, out, total)) {
            dl_fail(e, "rank 0 (host %s): lost rank %d (host %s) during %s", my_host(g), r, dist_host_of(g, r), what);
            tcp_abort_all(g, e);
            return -1;
        }
    return 0;
}

// ---- file rendezvous

static int write_atomic(const char *path, const void *data, size_t len, DlError *e) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return dl_fail(e, "cannot create %s: %s", tmp, strerror(errno));
    const char *p = data;
    size_t n = len;
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            int er = errno;
            close(fd);
            unlink(tmp);
            return dl_fail(e, "writing %s: %s", tmp, strerror(er));
        }
        p += k;
        n -= (size_t)k;
    }
    if (fsync(fd) || close(fd)) {
        unlink(tmp);
        return dl_fail(e, "writing %s: %s", tmp, strerror(errno));
    }
    if (rename(tmp, path)) {
        int er = errno;
        unlink(tmp);
        return dl_fail(e, "renaming %s to %s: %s", tmp, path, strerror(er));
    }
    return 0;
}

// Reads the whole file if it exists: 1 (data, len: malloc'd), 0 absent, -1 error.
static int try_read(const char *path, char **data, size_t *len, DlError *e) {
    if (!dl_file_exists(path)) return 0;
    *data = dl_read_file(path, len, e);
    if (!*data) return dl_file_exists(path) ? -1 : 0;
    return 1;
}

static void msg_path(const DistGroup *g, uint64_t seq, int rank, char *out, size_t n) {
    snprintf(out, n, "%s.%016llx.%llu.%d", g->path, (unsigned long long)g->nonce, (unsigned long long)seq, rank);
}

static void sleep_poll(double *pause) {
    struct timespec ts = {0, (long)(*pause * 1e9)};
    nanosleep(&ts, NULL);
    if (*pause < 0.2) *pause *= 1.5;
}

// Waits for rank `from`'s message of operation g->seq (exactly len bytes) into out.
static int file_wait(DistGroup *g, int from, void *out, size_t len, double deadline, const char *what, DlError *e) {
    char p[4200];
    msg_path(g, g->seq, from, p, sizeof p);
    double pause = 0.01;
    for (;;) {
        char *d = NULL;
        size_t n = 0;
        int r = try_read(p, &d, &n, e);
        if (r < 0) return dl_fail_prefix(e, "rank %d (host %s) during %s: ", g->rank, my_host(g), what);
        if (r == 1) {
            int rc = 0;
            if (n != len)
                rc = dl_fail(e, "rank %d (host %s): %s holds %zu bytes, %zu expected during %s: the ranks are not running the same program",
                             g->rank, my_host(g), p, n, len, what);
            else memcpy(out, d, len);
            free(d);
            return rc;
        }
        if (dl_now() > deadline)
            return dl_fail(e, "rank %d (host %s): timed out after %.1f s waiting for rank %d (host %s) to write %s during %s (file rendezvous)",
                           g->rank, my_host(g), g->timeout, from, dist_host_of(g, from), p, what);
        sleep_poll(&pause);
    }
}

// Own message files older than the last completed allgather were read by everyone: delete them.
static void file_cleanup(DistGroup *g, uint64_t before) {
    for (uint64_t s = (uint64_t)(g->last_gather < 0 ? 0 : g->last_gather); s < before; s++) {
        char p[4200];
        msg_path(g, s, g->rank, p, sizeof p);
        unlink(p);
    }
}

static int file_collective(DistGroup *g, bool bcast, const void *mine, size_t len, void *out, DlError *e) {
    double deadline = dl_now() + g->timeout;
    const char *what = bcast ? "a broadcast from rank 0" : "an allgather";
    char p[4200];
    if (!bcast || g->rank == 0) {
        msg_path(g, g->seq, g->rank, p, sizeof p);
        if (write_atomic(p, mine, len, e)) return dl_fail_prefix(e, "rank %d (host %s) during %s: ", g->rank, my_host(g), what);
    }
    if (bcast) {
        if (g->rank == 0) memmove(out, mine, len);
        else if (file_wait(g, 0, out, len, deadline, what, e)) return -1;
        return 0;
    }
    memmove((char *)out + (size_t)g->rank * len, mine, len);
    for (int r = 0; r < g->world; r++)
        if (r != g->rank && file_wait(g, r, (char *)out + (size_t)r * len, len, deadline, what, e)) return -1;
    // everyone wrote this allgather's file, so everyone finished every earlier operation
    file_cleanup(g, g->seq);
    g->last_gather = (int64_t)g->seq;
    return 0;
}

static uint64_t random_nonce(void) {
    uint64_t x = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &x, sizeof x) != (ssize_t)sizeof x) x = 0;
        close(fd);
    }
    return x ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(dl_now() * 1e9);
}

static int file_rendezvous(DistGroup *g, const DistEnv *env, DlError *e) {
    double deadline = dl_now() + g->timeout;
    char text[512];
    if (g->rank == 0) {
        g->nonce = random_nonce();
        unlink(g->path);  // a stale file of an earlier launch
        int n = snprintf(text, sizeof text, "distill-rendezvous 1\nkey %s\nworld %d\nnonce %016llx\nhost %s\n", g->key, g->world,
                         (unsigned long long)g->nonce, env->host);
        if (write_atomic(g->path, text, (size_t)n, e)) return dl_fail_prefix(e, "rank 0 (host %s): ", env->host);
    } else {
        double pause = 0.01;
        bool warned = false;
        for (;;) {
            char *d = NULL;
            size_t n = 0;
            int r = try_read(g->path, &d, &n, e);
            if (r < 0) return dl_fail_prefix(e, "rank %d (host %s): ", g->rank, env->host);
            if (r == 1) {
                // lines "distill-rendezvous 1", "key K", "world N", "nonce HEX", "host H"
                char key[DIST_KEY_MAX] = "", host[DIST_HOST_MAX] = "";
                int world = -1, got = 0;
                unsigned long long nonce = 0;
                char *save = NULL;
                for (char *ln = strtok_r(d, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
                    if (!strcmp(ln, "distill-rendezvous 1")) got |= 1;
                    else if (!strncmp(ln, "key ", 4)) snprintf(key, sizeof key, "%s", ln + 4), got |= 2;
                    else if (sscanf(ln, "world %d", &world) == 1) got |= 4;
                    else if (sscanf(ln, "nonce %llx", &nonce) == 1) got |= 8;
                    else if (!strncmp(ln, "host ", 5)) snprintf(host, sizeof host, "%s", ln + 5);
                }
                free(d);
                got = got == 15 ? 4 : 0;
                if (got != 4) return dl_fail(e, "rank %d (host %s): %s is not a distill rendezvous file", g->rank, env->host, g->path);
                if (!strcmp(key, g->key)) {
                    if (world != g->world)
                        return dl_fail(e, "rank %d (host %s) was launched with world size %d, rank 0 (host %s) with %d (%s)", g->rank,
                                       env->host, g->world, host, world, g->path);
                    g->nonce = nonce;
                    break;
                }
                if (!warned) {  // another launch's file: rank 0 of ours will replace it
                    dl_warn("rank %d: %s has job key '%s', ours is '%s'; waiting for our rank 0", g->rank, g->path, key, g->key);
                    warned = true;
                }
            }
            if (dl_now() > deadline)
                return dl_fail(e, "rank %d (host %s): timed out after %.1f s waiting for rank 0 to write the rendezvous file %s "
                                  "(key '%s'); was rank 0 launched, and do all ranks see this path?",
                               g->rank, env->host, g->timeout, g->path, g->key);
            sleep_poll(&pause);
        }
    }
    char me[DIST_HOST_MAX] = {0};
    snprintf(me, sizeof me, "%s", env->host);
    if (file_collective(g, false, me, DIST_HOST_MAX, g->hosts, e)) {
        if (g->rank == 0) unlink(g->path);
        return -1;
    }
    if (g->rank == 0) unlink(g->path);  // every rank has read it
    return 0;
}

// ---- public

DistGroup *dist_init(const DistEnv *env, const DistOpts *o, DlError *e) {
    DistGroup *g = dl_calloc(1, sizeof *g);
    g->rank = env->rank;
    g->world = env->world_size;
    g->method = o ? o->method : DIST_RDV_TCP;
    g->timeout = opts_timeout(o);
    g->last_gather = -1;
    snprintf(g->key, sizeof g->key, "%s", env->key);
    g->hosts = dl_calloc((size_t)g->world, DIST_HOST_MAX);
    snprintf(g->hosts + (size_t)g->rank * DIST_HOST_MAX, DIST_HOST_MAX, "%s", env->host);
    if (g->rank < 0 || g->rank >= g->world) {
        dl_fail(e, "rank %d is out of range for world size %d", g->rank, g->world);
        goto fail;
    }
    if (g->world > 1) {
        int rc;
        if (g->method == DIST_RDV_FILE) {
            if (!o || !o->file_path || !*o->file_path) {
                dl_fail(e, "rank %d: the file rendezvous needs a path on a filesystem that every rank sees", g->rank);
                goto fail;
            }
            g->path = dl_strdup(o->file_path);
            rc = file_rendezvous(g, env, e);
        } else rc = tcp_rendezvous(g, env, e);
        if (rc) goto fail;
        g->seq = 1;
    }
    // local rank: the launcher's, else the number of lower ranks on the same host
    int below = 0, same = 0;
    for (int r = 0; r < g->world; r++)
        if (!strcmp(dist_host_of(g, r), env->host)) {
            same++;
            if (r < g->rank) below++;
        }
    g->local_rank = env->local_rank >= 0 ? env->local_rank : below;
    g->local_size = same;
    return g;
fail:
    g->broken = true;
    dist_close(g);
    return NULL;
}

void dist_close(DistGroup *g) {
    if (!g) return;
    if (g->fd) {
        for (int r = 0; r < g->world; r++)
            if (g->fd[r] >= 0) close(g->fd[r]);
        free(g->fd);
    }
    free(g->path);
    free(g->hosts);
    free(g);
}

static int collective(DistGroup *g, bool bcast, const void *mine, size_t len, void *out, DlError *e) {
    if (g->broken) return dl_fail(e, "rank %d: the process group failed earlier; it cannot be used", g->rank);
    if (g->world == 1) {
        memmove(out, mine, len);
        return 0;
    }
    int rc = g->method == DIST_RDV_FILE ? file_collective(g, bcast, mine, len, out, e) : tcp_collective(g, bcast, mine, len, out, e);
    if (rc) g->broken = true;
    g->seq++;
    return rc;
}

int dist_bcast(DistGroup *g, void *buf, size_t len, DlError *e) { return collective(g, true, buf, len, buf, e); }

int dist_allgather(DistGroup *g, const void *mine, size_t len, void *all, DlError *e) {
    return collective(g, false, mine, len, all, e);
}

int dist_barrier(DistGroup *g, DlError *e) {
    char one = 1, *all = dl_malloc((size_t)g->world);
    int rc = dist_allgather(g, &one, 1, all, e);
    free(all);
    return rc;
}
