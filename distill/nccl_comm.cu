// nccl_comm.cu: see nccl_comm.h. Host code only (NCCL launches its own kernels); nvcc compiles it so that
// it sits with the CUDA parts and never enters the CPU-only build.
#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define _Noreturn [[noreturn]]  // C11 keyword in distill/common.h
extern "C" {
#include "distill/common.h"
#include "distill/dist.h"
#include "distill/dtype.h"
#include "distill/zero.h"
}
#include "distill/nccl_comm.h"

// Returns -1 from the enclosing function with a message naming the call, the error and a hint.
#define CUDA_OK(call)                                                                                                   \
    do {                                                                                                                \
        cudaError_t err_ = (call);                                                                                      \
        if (err_ != cudaSuccess)                                                                                        \
            return dl_fail(e, "rank %d (host %s): %s failed: %s (is the GPU visible? CUDA_VISIBLE_DEVICES, driver)",   \
                           c->rank, c->host, #call, cudaGetErrorString(err_));                                          \
    } while (0)

#define RING 4096  // pending operations tracked by the watchdog (older ones are dropped only once complete)

struct Pending {
    cudaEvent_t ev;
    double t0;
    uint64_t seq;
    const char *op;
    int64_t count;
    DType dt;
};

struct NcclComm {
    ncclComm_t comm;
    int rank, world, device;
    char host[DIST_HOST_MAX];
    double timeout, grace;
    bool no_exit;
    uint64_t seq;  // collectives issued
    // inside nccl_group_begin/end the operations reach the stream only at the end: tracked as one entry then
    int group_depth, group_ops;
    int64_t group_count;
    DType group_dt;
    cudaStream_t group_stream;
    // watchdog state, under mu
    pthread_mutex_t mu;
    pthread_t thread;
    bool thread_started, stop, aborted;
    double aborted_at;
    char reason[DL_ERR_LEN];
    Pending ring[RING];
    int head, n;  // oldest pending at ring[head]
    cudaEvent_t free_ev[RING];
    int n_free;
    cudaStream_t cst;     // nccl_comm_stream (NULL until asked for)
    cudaEvent_t order_ev; // nccl_stream_order's event (a wait takes the record current at the call: reusable)
};

static double now_s(void) { return dl_now(); }

static void sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000L};
    nanosleep(&ts, NULL);
}
static void sleep_ms(int ms) { sleep_us((long)ms * 1000); }

static const char *dt_name(DType dt) { return dt == DT_BF16 ? "bf16" : "fp32"; }

static int nccl_type(DType dt, ncclDataType_t *out) {
    if (dt == DT_F32) *out = ncclFloat32;
    else if (dt == DT_BF16) *out = ncclBfloat16;
    else return -1;
    return 0;
}

// Marks the communicator aborted (first reason wins) and aborts NCCL. Called with mu held.
static void abort_locked(NcclComm *c, const char *reason) {
    if (c->aborted) return;
    c->aborted = true;
    c->aborted_at = now_s();
    snprintf(c->reason, sizeof c->reason, "%s", reason);
    fprintf(stderr, "distill: error: %s; aborting the NCCL communicator (all ranks do the same)\n", reason);
    fflush(stderr);
    ncclCommAbort(c->comm);  // makes the pending NCCL kernels of this rank return
}

static void *watchdog(void *arg) {
    NcclComm *c = (NcclComm *)arg;
    cudaSetDevice(c->device);
    for (;;) {
        sleep_ms(50);
        pthread_mutex_lock(&c->mu);
        if (c->stop) {
            pthread_mutex_unlock(&c->mu);
            return NULL;
        }
        if (!c->aborted) {
            // retire completed operations, oldest first; check the oldest pending one's age
            while (c->n > 0) {
                Pending *p = &c->ring[c->head];
                cudaError_t q = cudaEventQuery(p->ev);
                if (q == cudaErrorNotReady) {
                    double age = now_s() - p->t0;
                    if (age > c->timeout) {
                        char msg[DL_ERR_LEN];
                        snprintf(msg, sizeof msg,
                                 "rank %d (host %s, GPU %d): NCCL %s #%llu (%lld %s elements) did not complete within %.0f s: a "
                                 "peer rank died, stalled, or runs a different collective",
                                 c->rank, c->host, c->device, p->op, (unsigned long long)p->seq, (long long)p->count,
                                 dt_name(p->dt), c->timeout);
                        abort_locked(c, msg);
                    }
                    break;
                }
                if (q != cudaSuccess) {
                    char msg[DL_ERR_LEN];
                    snprintf(msg, sizeof msg, "rank %d (host %s, GPU %d): CUDA error while NCCL %s #%llu ran: %s", c->rank,
                             c->host, c->device, p->op, (unsigned long long)p->seq, cudaGetErrorString(q));
                    abort_locked(c, msg);
                    break;
                }
                c->free_ev[c->n_free++] = p->ev;
                c->head = (c->head + 1) % RING;
                c->n--;
            }
            ncclResult_t as = ncclSuccess;
            if (!c->aborted && ncclCommGetAsyncError(c->comm, &as) == ncclSuccess && as != ncclSuccess && as != ncclInProgress) {
                char msg[DL_ERR_LEN];
                snprintf(msg, sizeof msg, "rank %d (host %s, GPU %d): NCCL reported an asynchronous error: %s (%s)", c->rank,
                         c->host, c->device, ncclGetErrorString(as), ncclGetLastError(c->comm));
                abort_locked(c, msg);
            }
        } else if (!c->no_exit && now_s() - c->aborted_at > c->grace) {
            fprintf(stderr, "distill: error: %s; the process did not stop within %.0f s of the abort, exiting\n", c->reason,
                    c->grace);
            fflush(stderr);
            _exit(DL_EXIT_RUNTIME);
        }
        pthread_mutex_unlock(&c->mu);
    }
}

// Polls a non-blocking NCCL call to completion (ncclInProgress), with the deadline.
static int wait_nccl(NcclComm *c, ncclResult_t r, const char *what, double deadline, DlError *e) {
    // A non-blocking communicator's calls often return ncclInProgress while NCCL finishes enqueueing, which takes
    // microseconds: polling every 5 ms from the start held the host ~5 ms per call, longer than the GPU's work
    // when a backward enqueues a reduction per bucket (96 per step at the 8B shape: 730 instead of 370 ms per step,
    // 2 x H200, 2026-11-24). So the wait starts at 10 us and doubles up to 5 ms.
    long wait_us = 10;
    while (r == ncclInProgress) {
        if (now_s() > deadline) {
            pthread_mutex_lock(&c->mu);
            char msg[DL_ERR_LEN];
            snprintf(msg, sizeof msg, "rank %d (host %s, GPU %d): %s did not complete within %.0f s (a rank missing or stuck?)",
                     c->rank, c->host, c->device, what, c->timeout);
            abort_locked(c, msg);
            pthread_mutex_unlock(&c->mu);
            return dl_fail(e, "%s", msg);
        }
        sleep_us(wait_us);
        wait_us = wait_us < 5000 ? wait_us * 2 : 5000;
        ncclResult_t as = ncclSuccess;
        pthread_mutex_lock(&c->mu);  // the watchdog may abort (and so release) the communicator meanwhile
        if (c->aborted) {
            pthread_mutex_unlock(&c->mu);
            return dl_fail(e, "%s", c->reason);
        }
        ncclResult_t q = ncclCommGetAsyncError(c->comm, &as);
        pthread_mutex_unlock(&c->mu);
        if (q != ncclSuccess) break;
        r = as;
    }
    if (r != ncclSuccess && nccl_comm_check(c, e)) return -1;
    if (r != ncclSuccess)
        return dl_fail(e, "rank %d (host %s, GPU %d): %s failed: %s (%s); NCCL_DEBUG=INFO shows why", c->rank, c->host, c->device,
                       what, ncclGetErrorString(r), c->comm ? ncclGetLastError(c->comm) : "");
    return 0;
}

NcclComm *nccl_comm_init(DistGroup *g, int device, const NcclCommOpts *o, DlError *e) {
    setenv("NCCL_NVLS_ENABLE", "0", 0);  // keep NVLink multicast off unless the user says otherwise
    NcclComm *c = (NcclComm *)dl_calloc(1, sizeof *c);
    c->rank = dist_rank(g);
    c->world = dist_world(g);
    c->device = device;
    snprintf(c->host, sizeof c->host, "%s", dist_host_of(g, c->rank));
    c->timeout = o && o->timeout_s > 0 ? o->timeout_s : 600;
    c->grace = o && o->grace_s > 0 ? o->grace_s : 60;
    c->no_exit = o && o->no_exit;
    pthread_mutex_init(&c->mu, NULL);
    cudaError_t ce = cudaSetDevice(device);
    if (ce != cudaSuccess) {
        dl_fail(e, "rank %d (host %s): cudaSetDevice(%d) failed: %s (local rank %d of %d; are there enough GPUs on this node?)",
                c->rank, c->host, device, cudaGetErrorString(ce), dist_local_rank(g), dist_local_size(g));
        free(c);
        return NULL;
    }
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (c->rank == 0) {
        ncclResult_t r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) {
            dl_fail(e, "rank 0 (host %s): ncclGetUniqueId failed: %s (no usable network interface? NCCL_SOCKET_IFNAME)", c->host,
                    ncclGetErrorString(r));
            memset(&id, 0, sizeof id);  // the others still need the broadcast to fail cleanly
        }
    }
    DlError be = {{0}};
    if (dist_bcast(g, &id, sizeof id, &be)) {
        dl_fail(e, "%s", be.msg);
        free(c);
        return NULL;
    }
    static const ncclUniqueId zero_id = {{0}};
    if (!memcmp(&id, &zero_id, sizeof id)) {
        if (c->rank != 0) dl_fail(e, "rank %d (host %s): rank 0 could not create the NCCL id (see its error)", c->rank, c->host);
        free(c);
        return NULL;
    }
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;  // the init returns at once and is polled, so it can time out
    double deadline = now_s() + c->timeout;
    ncclResult_t r = ncclCommInitRankConfig(&c->comm, c->world, id, c->rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        dl_fail(e, "rank %d (host %s, GPU %d): ncclCommInitRankConfig failed: %s", c->rank, c->host, device, ncclGetErrorString(r));
        free(c);
        return NULL;
    }
    char what[128];
    snprintf(what, sizeof what, "ncclCommInitRank of %d ranks", c->world);
    if (wait_nccl(c, r, what, deadline, e)) {
        if (!c->aborted) ncclCommAbort(c->comm);
        free(c);
        return NULL;
    }
    for (int i = 0; i < RING; i++) c->free_ev[i] = NULL;
    if (pthread_create(&c->thread, NULL, watchdog, c)) {
        dl_fail(e, "rank %d: cannot start the NCCL watchdog thread", c->rank);
        ncclCommAbort(c->comm);
        free(c);
        return NULL;
    }
    c->thread_started = true;
    return c;
}

void nccl_comm_free(NcclComm *c) {
    if (!c) return;
    if (c->thread_started) {
        pthread_mutex_lock(&c->mu);
        c->stop = true;
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->thread, NULL);
    }
    if (!c->aborted) ncclCommDestroy(c->comm);  // an aborted communicator was released by ncclCommAbort
    for (int i = 0; i < c->n; i++) cudaEventDestroy(c->ring[(c->head + i) % RING].ev);
    for (int i = 0; i < c->n_free; i++) cudaEventDestroy(c->free_ev[i]);
    if (c->order_ev) cudaEventDestroy(c->order_ev);
    if (c->cst) cudaStreamDestroy(c->cst);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

int nccl_comm_check(NcclComm *c, DlError *e) {
    pthread_mutex_lock(&c->mu);
    int rc = c->aborted ? dl_fail(e, "%s", c->reason) : 0;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

// After an enqueue: an event for the watchdog.
static int track(NcclComm *c, const char *op, int64_t count, DType dt, cudaStream_t s, DlError *e) {
    if (c->group_depth > 0) {  // recorded at nccl_group_end, once the group is on the stream
        c->group_ops++;
        c->group_count += count;
        c->group_dt = dt;
        c->group_stream = s;
        return 0;
    }
    pthread_mutex_lock(&c->mu);
    if (c->n == RING) {
        pthread_mutex_unlock(&c->mu);
        return dl_fail(e, "rank %d: more than %d NCCL operations pending (call nccl_sync now and then)", c->rank, RING);
    }
    cudaEvent_t ev = c->n_free ? c->free_ev[--c->n_free] : NULL;
    pthread_mutex_unlock(&c->mu);
    if (!ev) CUDA_OK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CUDA_OK(cudaEventRecord(ev, s));
    pthread_mutex_lock(&c->mu);
    Pending *p = &c->ring[(c->head + c->n) % RING];
    p->ev = ev;
    p->t0 = now_s();
    p->seq = ++c->seq;
    p->op = op;
    p->count = count;
    p->dt = dt;
    c->n++;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

// Runs an NCCL call under the lock, unless the watchdog aborted (and released) the communicator.
#define ENQUEUE(stmt)                                  \
    do {                                               \
        pthread_mutex_lock(&c->mu);                    \
        if (c->aborted) {                              \
            pthread_mutex_unlock(&c->mu);              \
            return dl_fail(e, "%s", c->reason);        \
        }                                              \
        stmt;                                          \
        pthread_mutex_unlock(&c->mu);                  \
    } while (0)

static int pre(NcclComm *c, DType dt, ncclDataType_t *t, DlError *e) {
    if (nccl_comm_check(c, e)) return -1;
    if (nccl_type(dt, t)) return dl_fail(e, "rank %d: NCCL collectives take fp32 or bf16 buffers, not %s", c->rank, dtype_name(dt));
    return 0;
}

int nccl_all_reduce(NcclComm *c, const void *send, void *recv, int64_t count, DType dt, bool average, void *stream,
                    DlError *e) {
    ncclDataType_t t;
    if (pre(c, dt, &t, e)) return -1;
    ncclResult_t r;
    ENQUEUE(r = ncclAllReduce(send, recv, (size_t)count, t, average ? ncclAvg : ncclSum, c->comm, (cudaStream_t)stream));
    if (wait_nccl(c, r, "ncclAllReduce", now_s() + c->timeout, e)) return -1;
    return track(c, "all-reduce", count, dt, (cudaStream_t)stream, e);
}

int nccl_reduce_scatter(NcclComm *c, const void *send, void *recv, int64_t recv_count, DType dt, bool average,
                        void *stream, DlError *e) {
    ncclDataType_t t;
    if (pre(c, dt, &t, e)) return -1;
    ncclResult_t r;
    ENQUEUE(r = ncclReduceScatter(send, recv, (size_t)recv_count, t, average ? ncclAvg : ncclSum, c->comm, (cudaStream_t)stream));
    if (wait_nccl(c, r, "ncclReduceScatter", now_s() + c->timeout, e)) return -1;
    return track(c, "reduce-scatter", recv_count * c->world, dt, (cudaStream_t)stream, e);
}

int nccl_all_gather(NcclComm *c, const void *send, void *recv, int64_t send_count, DType dt, void *stream, DlError *e) {
    ncclDataType_t t;
    if (pre(c, dt, &t, e)) return -1;
    ncclResult_t r;
    ENQUEUE(r = ncclAllGather(send, recv, (size_t)send_count, t, c->comm, (cudaStream_t)stream));
    if (wait_nccl(c, r, "ncclAllGather", now_s() + c->timeout, e)) return -1;
    return track(c, "all-gather", send_count * c->world, dt, (cudaStream_t)stream, e);
}

int nccl_group_begin(NcclComm *c, DlError *e) {
    if (nccl_comm_check(c, e)) return -1;
    ncclResult_t r;
    ENQUEUE(r = ncclGroupStart());
    if (r != ncclSuccess) return dl_fail(e, "rank %d: ncclGroupStart failed: %s", c->rank, ncclGetErrorString(r));
    if (c->group_depth++ == 0) c->group_ops = 0, c->group_count = 0;
    return 0;
}

int nccl_group_end(NcclComm *c, DlError *e) {
    ncclResult_t r;
    ENQUEUE(r = ncclGroupEnd());
    if (c->group_depth > 0) c->group_depth--;
    if (wait_nccl(c, r, "ncclGroupEnd", now_s() + c->timeout, e)) return -1;
    if (c->group_depth == 0 && c->group_ops > 0) {
        c->group_ops = 0;
        return track(c, "group of collectives", c->group_count, c->group_dt, c->group_stream, e);
    }
    return 0;
}

#define GROUP_MAX 256  // operations per ncclGroupStart/End of the range calls

static int ranges_op(NcclComm *c, float *buf, const ZeroRange *rg, int n, bool reduce, void *stream, DlError *e) {
    if (nccl_comm_check(c, e)) return -1;
    cudaStream_t s = (cudaStream_t)stream;
    for (int i0 = 0; i0 < n; i0 += GROUP_MAX) {
        const int i1 = n - i0 < GROUP_MAX ? n : i0 + GROUP_MAX;
        if (nccl_group_begin(c, e)) return -1;
        for (int i = i0; i < i1; i++) {
            float *p = buf + rg[i].off;
            ncclResult_t r;
            ENQUEUE(r = reduce ? ncclReduce(p, p, (size_t)rg[i].n, ncclFloat32, ncclSum, rg[i].root, c->comm, s)
                               : ncclBroadcast(p, p, (size_t)rg[i].n, ncclFloat32, rg[i].root, c->comm, s));
            if (r != ncclSuccess && r != ncclInProgress) {
                DlError e2;
                nccl_group_end(c, &e2);
                return dl_fail(e, "rank %d (host %s, GPU %d): %s of %lld elements onto/from rank %d failed: %s", c->rank,
                               c->host, c->device, reduce ? "ncclReduce" : "ncclBroadcast", (long long)rg[i].n, rg[i].root,
                               ncclGetErrorString(r));
            }
            if (track(c, reduce ? "reduce" : "broadcast", rg[i].n, DT_F32, s, e)) return -1;
        }
        if (nccl_group_end(c, e)) return -1;
    }
    return 0;
}

int nccl_reduce_ranges(NcclComm *c, float *buf, const ZeroRange *r, int n, void *stream, DlError *e) {
    return ranges_op(c, buf, r, n, true, stream, e);
}

int nccl_bcast_ranges(NcclComm *c, float *buf, const ZeroRange *r, int n, void *stream, DlError *e) {
    return ranges_op(c, buf, r, n, false, stream, e);
}

int nccl_sync(NcclComm *c, void *stream, DlError *e) {
    cudaEvent_t ev;
    CUDA_OK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CUDA_OK(cudaEventRecord(ev, (cudaStream_t)stream));
    int rc = 0;
    for (;;) {
        cudaError_t q = cudaEventQuery(ev);
        if (q == cudaSuccess) break;
        if (q != cudaErrorNotReady) {
            rc = dl_fail(e, "rank %d (host %s, GPU %d): waiting for the stream: %s", c->rank, c->host, c->device,
                         cudaGetErrorString(q));
            break;
        }
        if (nccl_comm_check(c, e)) {  // the watchdog aborted: the stream will not finish normally
            rc = -1;
            break;
        }
        sleep_us(20);  // (1 ms added up to a millisecond to every step)
    }
    cudaEventDestroy(ev);
    if (rc == 0) rc = nccl_comm_check(c, e);
    return rc;
}

void *nccl_comm_stream(NcclComm *c, DlError *e) {
    if (!c->cst) {
        cudaError_t err = cudaStreamCreateWithFlags(&c->cst, cudaStreamNonBlocking);
        if (err != cudaSuccess) {
            c->cst = NULL;
            dl_fail(e, "rank %d (host %s): cudaStreamCreateWithFlags failed: %s", c->rank, c->host, cudaGetErrorString(err));
            return NULL;
        }
    }
    return (void *)c->cst;
}

int nccl_stream_order(NcclComm *c, void *waiter, void *signaler, DlError *e) {
    if (!c->order_ev) CUDA_OK(cudaEventCreateWithFlags(&c->order_ev, cudaEventDisableTiming));
    CUDA_OK(cudaEventRecord(c->order_ev, (cudaStream_t)signaler));
    CUDA_OK(cudaStreamWaitEvent((cudaStream_t)waiter, c->order_ev, 0));
    return 0;
}

int nccl_comm_device(const NcclComm *c) { return c->device; }
