// nccl_comm.h: the NCCL communicator of a data-parallel run, one process per GPU, with a watchdog.
//
// Bootstrap: dist.h's process group (no MPI). Rank 0 calls ncclGetUniqueId, dist_bcast hands the 128-byte id
// to every rank, and each rank runs ncclCommInitRankConfig in non-blocking mode on its GPU, so that even the
// initialisation can time out instead of hanging. NCCL_NVLS_ENABLE=0 is set unless the environment sets it
// (NVLink multicast must stay off on the lent machines, see KINDS.md).
//
// Collectives (sum or average; fp32 or bf16 device buffers) are enqueued on the caller's stream. After each,
// an event is recorded and handed to the watchdog thread, which polls the events and ncclCommGetAsyncError
// every 50 ms. If an operation does not complete within timeout_s (a peer died, stalled, or is stuck in a
// different collective) or NCCL reports an asynchronous error (a peer's connection broke), the watchdog
// calls ncclCommAbort, which makes the pending NCCL kernels return; every later call and nccl_sync then
// return -1 with a message naming this rank, its host, the operation (kind, sequence number, size) and how
// long it waited. If the process does not leave within grace_s after that (a thread stuck in a CUDA call),
// the watchdog prints the message and exits with DL_EXIT_RUNTIME: no rank ever hangs, and since every rank's
// watchdog fires, all ranks exit, and the job can resume from its last checkpoint.
//
// Waiting: nccl_sync polls an event rather than blocking in cudaStreamSynchronize, so it returns as soon
// as the communicator is aborted.
//
// Only compiled here (no GPU on the build machines); it runs on GPUs through tests/gpu_nccl_comm.c.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/dist.h"
#include "distill/dtype.h"
#include "distill/zero.h"  // ZeroRange

#ifdef __cplusplus
extern "C" {
#endif

typedef struct NcclComm NcclComm;

typedef struct {
    double timeout_s;  // an operation (or the init) pending longer than this aborts the communicator; <= 0: 600
    double grace_s;    // after an abort, the process exits by itself if still alive after this; <= 0: 60
    bool no_exit;      // never exit from the watchdog (tests that check the error path)
} NcclCommOpts;

// The communicator over all ranks of g, on CUDA device `device` (usually dist_local_rank(g)).
NcclComm *nccl_comm_init(DistGroup *g, int device, const NcclCommOpts *o, DlError *e);
// The CUDA device the communicator runs on.
int nccl_comm_device(const NcclComm *c);
// Clean finish: ncclCommDestroy (ncclCommAbort if it was aborted), stops the watchdog.
void nccl_comm_free(NcclComm *c);
// -1 with the reason once the communicator was aborted (by the watchdog or an NCCL error).
int nccl_comm_check(NcclComm *c, DlError *e);

// recv[i] = sum (or mean) over ranks of send[i], count elements. In place if send == recv.
int nccl_all_reduce(NcclComm *c, const void *send, void *recv, int64_t count, DType dt, bool average, void *stream,
                    DlError *e);
// recv[0..recv_count) = rank's slice r of the reduced send[0..world*recv_count). In place if
// recv == send + rank * recv_count (the ZeRO bucket layout of zero.h).
int nccl_reduce_scatter(NcclComm *c, const void *send, void *recv, int64_t recv_count, DType dt, bool average,
                        void *stream, DlError *e);
// recv[r*send_count ..] = rank r's send, for every r. In place if send == recv + rank * send_count.
int nccl_all_gather(NcclComm *c, const void *send, void *recv, int64_t send_count, DType dt, void *stream, DlError *e);
// Several collectives as one group (ncclGroupStart/End), e.g. every bucket of a layer.
int nccl_group_begin(NcclComm *c, DlError *e);
int nccl_group_end(NcclComm *c, DlError *e);
// ZeRO on compact device buffers (zero.h's ZeroRange lists; every rank passes the same list), in place, fp32,
// issued in groups: nccl_reduce_ranges sums each range over the ranks onto its root (ncclReduce; the other
// ranks' copies are left as they were), nccl_bcast_ranges copies each range from its root to every rank
// (ncclBroadcast). A group's operations run concurrently, so the ranges of one call must not overlap.
int nccl_reduce_ranges(NcclComm *c, float *buf, const ZeroRange *r, int n, void *stream, DlError *e);
int nccl_bcast_ranges(NcclComm *c, float *buf, const ZeroRange *r, int n, void *stream, DlError *e);
// Waits for everything enqueued on stream (watchdog-aware). -1 if the communicator was aborted.
int nccl_sync(NcclComm *c, void *stream, DlError *e);
// The communicator's own stream (non-blocking, made at the first call, destroyed by nccl_comm_free): collectives
// overlapped with the compute stream's work go there (tm_dp_*: each bucket's reduction during the backward).
void *nccl_comm_stream(NcclComm *c, DlError *e);
// Orders two streams without blocking the host: work enqueued on `waiter` after this call starts only once
// everything enqueued on `signaler` before it has finished (an event recorded on signaler, waited for by waiter).
int nccl_stream_order(NcclComm *c, void *waiter, void *signaler, DlError *e);

#ifdef __cplusplus
}
#endif
