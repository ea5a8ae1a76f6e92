// gguf.h: reading and writing GGUF files (llama.cpp's model format, versions 2 and 3).
//
// Reader: the file is memory-mapped (or a caller's buffer is used as is) and fully validated at open:
// every length, count and offset is bounds- and overflow-checked, keys and tensor names must be UTF-8,
// tensor data ranges must be aligned, inside the file and disjoint. After a successful open every
// accessor is safe: strings are NUL-terminated copies, tensor data pointers are in bounds.
//
// Layout (ggml docs/gguf.md): "GGUF" u32 version, u64 n_tensors, u64 n_kv, KV pairs
// (string key, u32 type, value), tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type,
// u64 offset), zero padding to general.alignment (default 32), tensor data. ne[0] is the innermost
// (contiguous) dimension: an HF Linear weight [out, in] has ne = {in, out}.
//
// Some converters wrote array counts as u32 instead of u64; when a file does not parse with u64 counts
// the reader retries with u32 array counts before giving up (the first error is reported).
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/dtype.h"

typedef enum {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT
} GgufType;

#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 64        // tensor name bytes (llama.cpp's GGML_MAX_NAME)
#define GGUF_MAX_KEY 65535      // key bytes
#define GGUF_MAX_DEPTH 8        // array nesting
#define GGUF_DEFAULT_ALIGNMENT 32

// A metadata value. Scalars are widened: unsigned ints in u, signed in i, floats in f, bool in b.
typedef struct GgufValue {
    GgufType type;
    union {
        uint64_t u;
        int64_t i;
        double f;
        bool b;
        struct {
            const char *ptr;  // NUL-terminated copy (may contain NULs; len is authoritative)
            uint64_t len;
        } str;
        struct {
            GgufType elem;
            uint64_t n;
            const uint8_t *data;     // scalar elements: packed little-endian values in the file
            struct GgufValue *items; // STRING and ARRAY elements: n decoded values (NULL otherwise)
        } arr;
    };
} GgufValue;

typedef struct {
    char name[GGUF_MAX_NAME + 1];
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS];  // GGUF order: ne[0] innermost; unused dims are 1
    uint32_t ggml_type;         // llama.cpp type code
    int dtype;                  // our DType, or -1 if we know the type's size but cannot convert it
    int64_t numel;
    uint64_t offset;            // relative to the data section
    uint64_t nbytes;
    const uint8_t *data;        // in the mapping
} GgufTensor;

typedef struct GgufFile GgufFile;

// Opens and validates path (memory-mapped, read-only).
int gguf_open(GgufFile **g, const char *path, DlError *e);
// Same on a caller's buffer, which must outlive g (no copy). label names it in messages.
int gguf_open_memory(GgufFile **g, const uint8_t *buf, size_t n, const char *label, DlError *e);
void gguf_close(GgufFile *g);

uint32_t gguf_version(const GgufFile *g);
uint32_t gguf_alignment(const GgufFile *g);
uint64_t gguf_data_offset(const GgufFile *g);  // file offset of the tensor data section
uint64_t gguf_file_size(const GgufFile *g);
const char *gguf_label(const GgufFile *g);      // the path (or label) for messages

// ---- metadata
int gguf_kv_count(const GgufFile *g);
const char *gguf_kv_key(const GgufFile *g, int kv);
const GgufValue *gguf_kv_value(const GgufFile *g, int kv);
int gguf_find_key(const GgufFile *g, const char *key);  // -1 if absent
GgufType gguf_kv_type(const GgufFile *g, int kv);
const char *gguf_type_name(GgufType t);  // "uint32", "string", "array", ...

// Typed getters by key. Return 0, or -1 with e naming the key when absent or of an incompatible type.
// Integer getters accept any integer type whose value fits; gguf_get_f64 accepts floats and integers.
int gguf_get_i64(const GgufFile *g, const char *key, int64_t *out, DlError *e);
int gguf_get_u64(const GgufFile *g, const char *key, uint64_t *out, DlError *e);
int gguf_get_f64(const GgufFile *g, const char *key, double *out, DlError *e);
int gguf_get_bool(const GgufFile *g, const char *key, bool *out, DlError *e);
// String value of kv (NUL-terminated; *len = bytes), or NULL if kv is not a string.
const char *gguf_get_str(const GgufFile *g, int kv, size_t *len);
// By key with an error: missing key or not a string.
const char *gguf_get_str_key(const GgufFile *g, const char *key, size_t *len, DlError *e);

// Arrays. gguf_find_arr checks that key holds an array of elements compatible with want (an integer
// type accepts every integer type, a float type both float types) and returns its kv and length.
int gguf_find_arr(const GgufFile *g, const char *key, GgufType want, uint64_t *n, DlError *e);
uint64_t gguf_arr_len(const GgufFile *g, int kv);      // 0 if kv is not an array
GgufType gguf_arr_type(const GgufFile *g, int kv);     // element type (GGUF_TYPE_COUNT if not an array)
// Element i. Out of range or the wrong type gives NULL / 0 (never reads out of bounds).
const char *gguf_arr_str(const GgufFile *g, int kv, uint64_t i, size_t *len);
int64_t gguf_arr_int(const GgufFile *g, int kv, uint64_t i);   // any integer or bool element type
double gguf_arr_float(const GgufFile *g, int kv, uint64_t i);  // any numeric element type
// Element i of any array value (nested arrays included) as a widened scalar value.
bool gguf_value_elem(const GgufValue *arr, uint64_t i, GgufValue *out);
// Human-readable rendering of a value, arrays summarized to max_items elements; returns buf.
const char *gguf_value_format(const GgufValue *v, char *buf, size_t n, int max_items);

// ---- tensors
int gguf_tensor_count(const GgufFile *g);
const GgufTensor *gguf_tensor(const GgufFile *g, int i);
int gguf_find_tensor(const GgufFile *g, const char *name);  // -1 if absent
// Row-major (numpy/HF) shape of t: ne reversed. Returns ndim.
int gguf_tensor_shape(const GgufTensor *t, int64_t shape[GGUF_MAX_DIMS]);

// ---- ggml type codes
// Name ("Q4_1") and block geometry of a ggml type; false if the code is unknown to us.
bool ggml_type_info(uint32_t ggml_type, const char **name, int *block_elems, int *block_bytes);
int ggml_type_to_dtype(uint32_t ggml_type);  // DType or -1
int dtype_to_ggml_type(DType t);             // ggml code or -1

// Strict UTF-8 (no overlong forms, surrogates, code points > U+10FFFF, or NUL bytes). Shared with the
// safetensors reader.
bool gguf_valid_utf8(const uint8_t *s, uint64_t n);

// ---- writer
// Build the metadata and tensor list, then gguf_writer_write(). Keys are written in the order added;
// adding a key twice is an error. Tensor data given as raw bytes is referenced, not copied: it must stay
// valid until the write. fp32 data given for conversion is converted tensor by tensor while writing.
// The alignment is the value of "general.alignment" if set (uint32, power of two), else 32.
typedef struct GgufWriter GgufWriter;

GgufWriter *gguf_writer_new(void);
void gguf_writer_free(GgufWriter *w);
// Any value, nested arrays included (deep-copied). Scalars use the widened fields of GgufValue; for
// arrays of scalars set arr.data to n packed little-endian elements of arr.elem.
int gguf_w_value(GgufWriter *w, const char *key, const GgufValue *v, DlError *e);
int gguf_w_u32(GgufWriter *w, const char *key, uint32_t v, DlError *e);
int gguf_w_i32(GgufWriter *w, const char *key, int32_t v, DlError *e);
int gguf_w_u64(GgufWriter *w, const char *key, uint64_t v, DlError *e);
int gguf_w_f32(GgufWriter *w, const char *key, float v, DlError *e);
int gguf_w_bool(GgufWriter *w, const char *key, bool v, DlError *e);
int gguf_w_str(GgufWriter *w, const char *key, const char *s, DlError *e);
// Array of n scalars of type elem, packed little-endian in data.
int gguf_w_arr(GgufWriter *w, const char *key, GgufType elem, uint64_t n, const void *data, DlError *e);
int gguf_w_arr_str(GgufWriter *w, const char *key, uint64_t n, const char *const *strs, DlError *e);
// A tensor of row-major shape[0..ndim) (reversed into ne) stored as dtype t, from raw bytes in t's
// encoding (nbytes must match the shape).
int gguf_w_tensor(GgufWriter *w, const char *name, DType t, int ndim, const int64_t *shape, const void *data,
                  uint64_t nbytes, DlError *e);
// The same from fp32 values converted to t when written (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
int gguf_w_tensor_f32(GgufWriter *w, const char *name, DType t, int ndim, const int64_t *shape, const float *x,
                      DlError *e);
// Writes path atomically (path.tmp, fsync, rename); on failure nothing is left at path.
int gguf_writer_write(GgufWriter *w, const char *path, DlError *e);
