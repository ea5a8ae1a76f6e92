// registry.h: the tensor registry. Every parameter of a model is one entry (name, shape, dtype, role,
// layer, trainable, decay, shard); all parameters live in one contiguous buffer at the entry's offset.
// The registry drives allocation, optimizer groups, ZeRO sharding, checkpoint I/O and export, so no code
// anywhere indexes tensors by hard-coded slots.
#pragma once
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DL_TENSOR_NAME_MAX 96
#define DL_MAX_DIMS 4
// Offsets are aligned to this many elements (64 bytes in fp32) for vector loads and device copies.
#define DL_TENSOR_ALIGN 16

typedef enum {
    ROLE_EMBED = 0,  // token embeddings
    ROLE_NORM,       // RMSNorm weights
    ROLE_ATTN,       // q/k/v/o projections
    ROLE_MLP,        // gate/up/down
    ROLE_MAMBA,      // every tensor of a Mamba mixer
    ROLE_HEAD,       // untied lm_head
    ROLE_COUNT
} TensorRole;

typedef struct {
    char name[DL_TENSOR_NAME_MAX];  // HF-style name, e.g. "model.layers.3.mamba.A_log"
    int ndim;
    int64_t shape[DL_MAX_DIMS];     // row-major, HF layout: a Linear weight is [out, in]
    int64_t numel;
    int64_t offset;                 // element offset in the parameter buffer
    DType dtype;                    // dtype of the master copy (F32)
    TensorRole role;
    int layer;                      // decoder layer, or -1 for global tensors
    bool trainable;
    bool decay;                     // AdamW weight decay applies (matrices; not norms, biases, A_log, D)
    int64_t shard_begin, shard_end; // element range [begin, end) of this tensor owned by this rank (ZeRO)
} TensorInfo;

typedef struct {
    TensorInfo *t;
    int n, cap;
    int64_t numel;  // total elements of the buffer, padding included
} Registry;

void reg_init(Registry *r);
void reg_free(Registry *r);
// Appends a tensor with shape dims[0..ndim) (trainable, decay = ndim >= 2); returns its index.
int reg_add(Registry *r, const char *name, TensorRole role, int layer, int ndim, const int64_t *dims);
// printf-style name, up to 4 dims given as varargs int64_t.
int reg_addf(Registry *r, TensorRole role, int layer, int ndim, const int64_t *dims, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
int reg_find(const Registry *r, const char *name);  // index or -1
// Index of the tensor named by the printf-style fmt, which must hold numel elements; -1 with e filled
// ("<who>: tensor X missing from the registry" / "... has N elements, expected M") otherwise.
int reg_vlookup(const Registry *r, int64_t numel, const char *who, DlError *e, const char *fmt, va_list ap);
const char *role_name(TensorRole role);

// Calls fn(index, ctx) for every tensor whose name matches one of the comma-separated glob patterns
// (fnmatch; spaces around patterns ignored). Returns the number of calls, or -1 (e filled, naming `what`)
// if a pattern matches nothing, so recipe typos do not silently select nothing.
int reg_match(const Registry *r, const char *patterns, const char *what, void (*fn)(int index, void *ctx), void *ctx,
              DlError *e);

// Sets trainable on every tensor whose name matches one of the comma-separated glob patterns
// (fnmatch, e.g. "*.mamba.*,model.norm.weight"), and clears it on the rest. Returns the count matched;
// a pattern that matches nothing is an error (so recipe typos do not silently freeze everything).
int reg_set_trainable(Registry *r, const char *patterns, DlError *e);
int64_t reg_trainable_numel(const Registry *r);
int64_t reg_params_numel(const Registry *r);  // sum of numel, padding excluded

// Shape as "[576, 49152]" into buf.
const char *reg_shape_str(const TensorInfo *t, char *buf, size_t n);
void reg_print(const Registry *r, FILE *f);

#ifdef __cplusplus
}
#endif
