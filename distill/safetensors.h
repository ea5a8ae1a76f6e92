// safetensors.h: reading (memory-mapped, validated) and writing safetensors files, single or sharded
// with an HF index (shared/research/export.md §4).
//
// File: u64 N (little-endian), N bytes of UTF-8 JSON starting with '{' (may end with spaces),
// then the data buffer. JSON: {"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]},
// ..., "__metadata__": {"k": "v"}}; offsets are relative to the data buffer, which the tensors must
// cover exactly (no holes, no overlaps).
// Sharded: model.safetensors.index.json = {"metadata": {"total_size": N}, "weight_map": {"name": "file"}}.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/dtype.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER 100000000ull  // safetensors' MAX_HEADER_SIZE

typedef struct {
    char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];  // row-major
    int64_t numel;
    uint64_t begin, end;         // data_offsets in its file's data buffer
    const uint8_t *data;         // in the mapping (may be unaligned)
    uint64_t nbytes;
    int shard;                   // index of the file holding it
} StTensor;

typedef struct SafeTensors SafeTensors;

// path: a .safetensors file, a model.safetensors.index.json, or a directory holding either
// (model.safetensors.index.json preferred, then model.safetensors).
int st_open(SafeTensors **s, const char *path, DlError *e);
// One file's bytes from a caller's buffer (no copy; must outlive s).
int st_open_memory(SafeTensors **s, const uint8_t *buf, size_t n, const char *label, DlError *e);
void st_close(SafeTensors *s);

int st_count(const SafeTensors *s);
const StTensor *st_tensor(const SafeTensors *s, int i);
int st_find(const SafeTensors *s, const char *name);  // -1 if absent
// __metadata__ of the (first) file.
int st_metadata_count(const SafeTensors *s);
const char *st_metadata_key(const SafeTensors *s, int i);
const char *st_metadata_value(const SafeTensors *s, int i);
int st_shard_count(const SafeTensors *s);
const char *st_shard_path(const SafeTensors *s, int i);
const char *st_label(const SafeTensors *s);

// Converts a tensor of F32/F16/BF16 to fp32 (dst has numel elements).
int st_to_f32(const StTensor *t, float *dst, DlError *e);

// ---- writer
typedef struct {
    const char *name;
    DType dtype;           // any plain dtype (F32, F16, BF16, F64, integers, BOOL)
    int ndim;              // 0..ST_MAX_DIMS
    const int64_t *shape;
    const void *data;      // numel elements in dtype's encoding
} StWriteTensor;

// Writes one file atomically (path.tmp + rename). meta: n_meta key/value pairs (meta[2i], meta[2i+1]).
// Tensors are laid out largest element size first, then by name (as the reference writer does), and
// the header is padded with spaces to a multiple of 8.
int st_write(const char *path, const StWriteTensor *t, int n, const char *const *meta, int n_meta, DlError *e);
// Writes tensors into dir as model-0000i-of-0000N.safetensors shards of at most max_shard_bytes of data
// (a larger tensor gets its own shard) plus model.safetensors.index.json (written last). If everything
// fits in one shard, writes model.safetensors alone (as HF does). *n_shards gets the count.
int st_write_sharded(const char *dir, const StWriteTensor *t, int n, uint64_t max_shard_bytes, const char *const *meta,
                     int n_meta, int *n_shards, DlError *e);
