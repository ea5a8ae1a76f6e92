// grad_stage.h: ZeRO-2's gradient memory on CUDA (opt-in, train_model.c tm_dp_stage_grads). The engine's compact
// gradient buffer keeps its addresses, so the backward writes it exactly as before, but it is a reserved virtual
// range in which only some pages have memory (CUDA virtual memory management: cuMemAddressReserve, cuMemCreate,
// cuMemMap): the permanent pages of zero.h's zero_stage_plan (this rank's slices and the pages it shares) for
// good, and each bucket's staged pages only from just before the backward writes the bucket until its reduction
// onto the owners has completed, in one of K slots (physical allocations reused round robin). The reports of the
// engine's backward (engine_cuda_set_grad_hook, zero.h's levels) drive it through grad_stage_report: at each report
// the buckets the next layer writes are mapped (their staged pages zeroed on the compute stream: what the whole
// buffer held there after the last micro-batch's clear) and each final bucket's reduction is handed to the
// caller's launch function on the communication stream, ordered after the compute stream's work by an event; the
// slot's release event is recorded after it. A slot is taken from a bucket only once that event has completed
// (the host waits for it), never from a bucket whose reduction was not launched (zero_stage_plan's K).
// Values: the staged pages hold zeros when the backward adds into them, as the whole buffer does after
// engine_cuda_optim_keep_owned; the permanent non-owned elements are cleared after each micro-batch
// (grad_stage_clear); so the owned sums and every reduction see the same numbers, bit for bit.
// Only compiled here (no GPU on the build machines).
#pragma once
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "distill/common.h"
#include "distill/zero.h"

typedef struct GradStage GradStage;

// Elements per page on CUDA device `device` (its allocation granularity / 4); -1 with e without VMM support.
int64_t grad_stage_page(int device, DlError *e);
// The buffer of n floats for plan P (whose page is grad_stage_page(device)); its permanent pages mapped and zeroed.
GradStage *grad_stage_new(const ZeroStagePlan *P, int64_t n, int device, DlError *e);
void grad_stage_free(GradStage *g);   // synchronizes the device first
float *grad_stage_ptr(GradStage *g);  // the buffer's base (the engine's compact gradient layout)
double grad_stage_bytes(const GradStage *g);  // device memory it holds (permanent pages + the slots)
// Zeroes the permanent pages on stream (a step's start; the staged ones are zeroed when mapped).
int grad_stage_zero(GradStage *g, void *stream, DlError *e);
// Zeroes the elements this rank does not own on permanent pages (after a micro-batch's reductions completed on
// stream's view): engine_cuda_optim_keep_owned's job for the pages that exist.
int grad_stage_clear(GradStage *g, void *stream, DlError *e);
// The start of a backward: no bucket mapped or launched for it yet (mappings of the last one stay until needed).
void grad_stage_begin(GradStage *g);
// Enqueues the reduction of bucket b on the communication stream `comm`; 0 or -1 with e.
typedef int (*GradStageLaunch)(void *ctx, int b, void *comm, DlError *e);
// The backward reported level lv (zero.h; level: zero_bucket_levels): maps what layer lv - 1 writes and launches
// what is final, in bucket order (see the header comment). Returns the buckets launched so far in this backward.
int grad_stage_report(GradStage *g, const int *level, int lv, void *compute, void *comm, GradStageLaunch launch,
                      void *ctx, DlError *e);
// Buckets mapped in this backward so far (tests).
int grad_stage_mapped(const GradStage *g);

#ifdef __cplusplus
}
#endif
