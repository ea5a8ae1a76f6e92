// dist.h: process-group bootstrap for data-parallel training, one process per GPU, without MPI.
//
// 1. dist_env_detect: who am I? rank, world size, local rank, and where rank 0 listens, from (first match)
//      explicit overrides (recipe / command line, DistOpts)
//      torchrun style      RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//      Open MPI (mpirun)   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
//      SLURM (srun)        SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_ID, SLURM_JOB_NODELIST
//      PMIx (srun --mpi=pmix, prterun)  PMIX_RANK (+ a world size from SLURM or WORLD_SIZE)
//      MPICH / Hydra PMI   PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
//    and otherwise a single process (world 1). Under SLURM rank 0's address defaults to the first host of
//    SLURM_JOB_NODELIST and the port to 20000 + SLURM_JOB_ID % 20000 (MASTER_ADDR/MASTER_PORT win).
// 2. dist_init: rendezvous of all ranks, then a small control channel:
//      TCP   rank 0 listens on MASTER_ADDR:MASTER_PORT; every other rank connects (retrying until the
//            deadline, so launch order does not matter) and stays connected (a star through rank 0).
//      file  a shared filesystem path P: rank 0 atomically writes P (key, world size, a random nonce);
//            the others poll for it; every later message is a file P.<nonce>.<seq>.<rank>, written
//            atomically (tmp + rename) and polled for. For clusters where no port can be opened.
//    Then every rank learns every rank's host name (an allgather), which gives the local rank when the
//    launcher did not say, and lets error messages name the host of a rank.
// 3. dist_bcast (from rank 0: the ncclUniqueId), dist_allgather (fixed-size blobs), dist_barrier. They are
//    for bootstrap and small control data only; tensors go through NCCL (nccl_comm.h).
//
// Every wait has a deadline (DistOpts.timeout_s, default 300 s or $DISTILL_DIST_TIMEOUT); a rank that never
// shows up, dies, or is launched with another world size or job key makes every rank return an error that
// names the rank, its host and what it waited for. Rank 0 forwards its error to the others over TCP.
// The job key (SLURM_JOB_ID.SLURM_RESTART_COUNT, TORCHELASTIC_RUN_ID, or DistOpts.key) keeps ranks of
// another launch (a requeued job, a stale rendezvous file) from joining.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "distill/common.h"

#define DIST_HOST_MAX 64
#define DIST_KEY_MAX 64

typedef enum {
    DIST_SRC_SINGLE = 0,  // nothing found: one process
    DIST_SRC_OVERRIDE,    // DistOpts.rank/world_size
    DIST_SRC_TORCHRUN,
    DIST_SRC_OMPI,
    DIST_SRC_SLURM,
    DIST_SRC_PMIX,
    DIST_SRC_PMI,
} DistSource;
const char *dist_source_name(DistSource s);

typedef enum { DIST_RDV_TCP = 0, DIST_RDV_FILE } DistMethod;
// "tcp" | "file"
int dist_method_parse(const char *s, DistMethod *out, DlError *e);

// Explicit settings (recipe, command line). Unset: -1 for numbers, NULL for strings.
typedef struct {
    int rank, world_size, local_rank;
    const char *master_addr;
    int master_port;
    DistMethod method;
    const char *file_path;  // file rendezvous: a path on a filesystem every rank sees
    const char *key;        // job key; NULL: from the environment
    double timeout_s;       // every wait; <= 0: $DISTILL_DIST_TIMEOUT or 300
} DistOpts;
void dist_opts_default(DistOpts *o);
// Launcher settings from the environment, for settings the recipe leaves unset (NULL / defaults):
//   DISTILL_RDZV=tcp|file, DISTILL_RDZV_FILE=PATH (implies file), DISTILL_DIST_KEY=KEY,
//   DISTILL_DIST_TIMEOUT=SECONDS. Strings point into the environment. Errors: a bad method or timeout.
int dist_opts_from_env(DistOpts *o, DlError *e);

typedef struct {
    int rank, world_size;
    int local_rank;               // -1 if the launcher did not say (dist_init computes it from host names)
    int local_size;               // -1 if unknown
    char master_addr[256];        // "" if unknown (only needed by TCP with world > 1)
    int master_port;              // -1 if unknown
    char key[DIST_KEY_MAX];       // job key, "" if none
    char host[DIST_HOST_MAX];     // this host's name
    DistSource source;
} DistEnv;

// Fills env from o and the environment (see the header comment). Errors: a malformed or out-of-range
// variable (named, with its value), rank >= world size.
int dist_env_detect(const DistOpts *o, DistEnv *env, DlError *e);

// SLURM hostlists: "gpu[01-03,07],login,rack[1-2]-n[1-2]" -> gpu01 gpu02 gpu03 gpu07 login rack1-n1
// rack1-n2 rack2-n1 rack2-n2 (zero padding kept, brackets nest as a product). *hosts is an array of
// *n strings (free with dist_hostlist_free). max_hosts bounds the expansion (a typo like [1-99999999]).
int dist_hostlist_expand(const char *list, int max_hosts, char ***hosts, int *n, DlError *e);
void dist_hostlist_free(char **hosts, int n);
// The first host of a hostlist, without expanding the rest.
int dist_hostlist_first(const char *list, char *out, size_t out_n, DlError *e);

typedef struct DistGroup DistGroup;

// Rendezvous of env->world_size ranks (world 1 returns at once). NULL with e on failure.
DistGroup *dist_init(const DistEnv *env, const DistOpts *o, DlError *e);
// Shuts the control channel; the group is unusable after an error and must still be closed.
void dist_close(DistGroup *g);
int dist_rank(const DistGroup *g);
int dist_world(const DistGroup *g);
int dist_local_rank(const DistGroup *g);   // from the launcher, or the count of lower ranks on this host
int dist_local_size(const DistGroup *g);   // ranks on this host
const char *dist_host_of(const DistGroup *g, int rank);
double dist_timeout(const DistGroup *g);

// Rank 0's len bytes of buf are copied into buf on every rank.
int dist_bcast(DistGroup *g, void *buf, size_t len, DlError *e);
// all[r*len .. (r+1)*len) = rank r's mine, on every rank.
int dist_allgather(DistGroup *g, const void *mine, size_t len, void *all, DlError *e);
int dist_barrier(DistGroup *g, DlError *e);
