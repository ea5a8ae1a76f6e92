// attention_cudnn.h: causal GQA attention (with document masks) through cuDNN's fused flash-attention
// (SDPA) forward and backward, built from C through the cuDNN backend (graph) API: no cudnn-frontend.
// Same tensor layouts and outputs as attention_fwd_cuda / attention_bwd_cuda (train_cuda.h):
//   q [B*T, nh, hd], k/v [B*T, nkv, hd] token-major; out [B*T, nh*hd]; lse [B, nh, T] fp32 (natural log).
//   doc_start [B*T] int32 (absolute key index of the query's document start within its row; NULL: one
//   document per row): query t of row b sees keys [doc_start[b*T+t], t].
// Activations must be DT_BF16 (the training dtype; fp32 parity runs keep the hand-written kernels) with
// 16-byte aligned pointers; hd a multiple of 8, <= 128.
//
// cuDNN is loaded at run time (dlopen of libcudnn.so.9, or the file named by $DISTILL_CUDNN_LIB), so a
// binary built with the headers runs where no cuDNN is installed: sdpa_cudnn_new then returns NULL with
// the reason, and the caller keeps the hand-written kernels. Every cuDNN failure (no engine for a shape,
// unsupported layout, execution error) is returned as -1 with a message naming the call and attribute;
// nothing exits. A -1 before launch leaves the outputs untouched, so the caller can fall back per call.
//
// Plans: one finalized execution plan per (direction, B, T, nh, nkv, hd, dtype, causal, documents),
// built on first use and cached for the life of the handle, with its workspace sized then (one device
// workspace shared by all plans, grown at build time only; the per-plan buffers of the backward graph
// are allocated with the plan). Calls after the first for a shape allocate nothing. A shape for which no
// engine finalizes is remembered too, and fails fast with the same message on later calls.
//
// Determinism (deterministic = 1): the backward graph writes dQ directly from the dS·K matmul (cuDNN's
// "dP workspace" variant, which keeps dP in the workspace, B*nh*T*T bf16 bytes rounded up to 64-row
// tiles, instead of accumulating dQ with fp32 atomics), and engine configurations carrying the
// CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC note are skipped. deterministic = 0 builds the fp32 dQ-accumulator
// graph (atomics: faster, less memory, bits vary run to run).
//
// Document masks are an additive bias [B, 1, T, T] (0 where a key is in the query's document, a large
// negative number before its start; the causal part stays cuDNN's generated mask), written from doc_start
// by a small kernel into a buffer the handle owns (B*T*T*2 bytes) on every call that passes doc_start.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "distill/dtype.h"

typedef struct CUstream_st *dl_stream_t;  // = cudaStream_t (as in train_cuda.h)
typedef struct SdpaCudnn SdpaCudnn;

// Loads cuDNN, creates a handle and builds a small forward and backward plan as a self-check. NULL (and
// the reason in err) when cuDNN is missing, older than 9.0, the GPU is older than sm_80, or no engine
// accepts the graphs.
SdpaCudnn *sdpa_cudnn_new(int deterministic, char *err, size_t errlen);
void sdpa_cudnn_free(SdpaCudnn *s);

// The attention_fwd_cuda twin (causal = 1 for the decoder; causal = 0 is full attention, documents then
// not allowed). out [B*T, nh*hd], lse [B, nh, T].
int sdpa_cudnn_fwd(SdpaCudnn *s, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal, const void *q,
                   const void *k, const void *v, const int32_t *doc_start, void *out, float *lse, dl_stream_t stream,
                   char *err, size_t errlen);
// The attention_bwd_cuda twin (no caller workspace: the handle owns it). Writes dq, dk, dv.
int sdpa_cudnn_bwd(SdpaCudnn *s, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal, const void *q,
                   const void *k, const void *v, const int32_t *doc_start, const void *out, const float *lse,
                   const void *dout, void *dq, void *dk, void *dv, dl_stream_t stream, char *err, size_t errlen);

// Builds (or finds) the plan of a shape now, so that timing or the first training step does not pay for
// it; docs = 1 is the document-masked variant. 0, or -1 with the reason (no engine for this shape).
int sdpa_cudnn_prepare(SdpaCudnn *s, int backward, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal,
                       int docs, char *err, size_t errlen);
// Offline handle (no GPU used): plans are built for the device described by device_json (cuDNN's
// device-properties JSON, cuDNN >= 9.8) with sdpa_cudnn_prepare; fwd/bwd refuse it. It checks on a machine
// without a GPU that cuDNN's engines accept our graphs (gpu_test_sdpa --offline): with no driver at all the
// engines' support checks stop early, so run it with the toolkit's stub libcuda.so.1 on LD_LIBRARY_PATH;
// prepare then succeeds when an engine passed its support checks and compiled the kernel (only loading it
// fails, CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER), and fails for a graph no engine accepts.
SdpaCudnn *sdpa_cudnn_new_offline(int deterministic, const char *device_json, char *err, size_t errlen);

// Introspection for tests and benchmarks: cuDNN's run-time version (e.g. 91900), the number of cached
// plans, and the engine index / workspace bytes of the plan a shape uses (-1 if not built yet).
long sdpa_cudnn_version(const SdpaCudnn *s);
int sdpa_cudnn_plan_count(const SdpaCudnn *s);
int sdpa_cudnn_plan_info(const SdpaCudnn *s, int backward, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd,
                         int causal, int docs, int64_t *engine, int64_t *workspace_bytes);

#ifdef __cplusplus
}
#endif
