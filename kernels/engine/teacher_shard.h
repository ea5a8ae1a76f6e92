// teacher_shard.h: the frozen teacher sharded across data-parallel ranks, on the GPU (recipe `[hardware] teacher =
// "sharded"`; the arithmetic is distill/teacher_shard.h, the design docs/MULTIGPU.md "Sharded teacher").
//
// A teacher engine made with ECU_EXTERN_WEIGHTS holds no weights. This object holds, on its GPU: rank's pieces of
// every decoder layer (bf16, rounded from the host's fp32 by the engine's own conversion kernel, so the bits equal
// a whole copy's), the global tensors whole (embedding, final norm, head), and n_slots gather buffers of one layer.
// It installs itself as the engine's forward layer hook: before layer l is enqueued, layer l's tensors are pointed
// into the slot that holds it (gathered then if it is not there yet) and the engine's stream waits for that
// gather's event; then layer l + 1 (if the pass goes on) is gathered into the other slot on the communication
// stream, after an event recorded on the engine's stream there (everything before layer l, so the last reader of
// that slot, layer l - 1, has finished). The gather of l + 1 thus runs while layer l computes. A slot remembers
// its layer (the weights never change), so a 2-layer teacher is gathered once.
// Determinism: an all-gather moves bits; the forward runs the same kernels on the same values: the teacher's
// hidden states and logits are bitwise a replicated teacher's.
// Only compiled here (no GPU on the build machines).
#pragma once
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "distill/common.h"
#include "distill/teacher_shard.h"
#include "kernels/engine/engine_cuda.h"

// The all-gather of layer `layer`: recv[q count .. (q+1) count) = rank q's send (bf16, count elements), for every
// rank q, enqueued on stream. 0 or -1 with e. (distill/teacher_shard.h tshard_nccl_gather: NCCL; below: 1 rank.)
typedef int (*TeacherShardGather)(void *ctx, int layer, const void *send, void *recv, int64_t count, void *stream,
                                  DlError *e);
// One rank: the gather is a device copy of its own piece (ctx unused).
int teacher_shard_copy_gather(void *ctx, int layer, const void *send, void *recv, int64_t count, void *stream, DlError *e);

typedef struct TeacherShard TeacherShard;

// E: the teacher engine (ECU_EXTERN_WEIGHTS) over registry r with n_layer layers; rank of world; params: host fp32,
// registry layout (the whole teacher: only rank's pieces and the global tensors are uploaded). gather runs on
// stream (the communicator's, e.g. nccl_comm_stream; NULL: a stream of this object's own). log: one line of memory
// (NULL: silent). Installs the layer hook and the global tensors' pointers. NULL with e.
TeacherShard *teacher_shard_new(EngineCuda *E, const Registry *r, int n_layer, int rank, int world, const float *params,
                                TeacherShardGather gather, void *gctx, void *stream, FILE *log, DlError *e);
// Removes the hook (the engine must not run a forward after this) and frees the device memory.
void teacher_shard_free(TeacherShard *s);
const TShardPlan *teacher_shard_plan(const TeacherShard *s);
double teacher_shard_bytes(const TeacherShard *s);  // device memory it holds (shards + slots + globals)
int64_t teacher_shard_gathers(const TeacherShard *s);  // gathers launched so far (tests: prefetch, slot reuse)
// Rank q's bf16 shard buffer [shard_total] of plan p from host params, on the device (tests: the other simulated ranks'
// pieces); free with engine_cuda_dfree.
void *teacher_shard_upload(const TShardPlan *p, int q, const float *params);

#ifdef __cplusplus
}
#endif
