// dtype.h: element types of tensors in model files, checkpoints and device buffers, with the block
// geometry of llama.cpp's quantized types (a "block" of 1 element for plain types).
#pragma once
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    DT_F32 = 0,
    DT_F16,
    DT_BF16,
    DT_F64,
    DT_I8,
    DT_I16,
    DT_I32,
    DT_I64,
    DT_U8,
    DT_U16,
    DT_U32,
    DT_U64,
    DT_BOOL,
    DT_Q4_0,
    DT_Q4_1,
    DT_Q8_0,
    DT_Q4_K,
    DT_Q5_K,
    DT_Q6_K,
    DT_COUNT
} DType;

typedef struct {
    const char *name;    // "F32", "BF16", "Q4_1" (GGUF/safetensors spelling)
    int block_elems;     // elements per block (1 for plain types)
    int block_bytes;     // bytes per block
    bool is_float;       // plain floating type
    bool is_quantized;   // llama.cpp block type
} DTypeInfo;

const DTypeInfo *dtype_info(DType t);
const char *dtype_name(DType t);
// Parses a name as written by safetensors/GGUF ("F32", "BF16", "Q8_0"); returns -1 if unknown.
int dtype_from_name(const char *name);
// Bytes for n elements (n must be a multiple of the block size; returns -1 if not, or on overflow).
int64_t dtype_nbytes(DType t, int64_t n);

// Scalar conversions (round to nearest even; NaN stays NaN).
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float bf16_to_f32(uint16_t b);
uint16_t f32_to_bf16(float f);
// x[i] <- x[i] rounded to bf16 (and back to fp32), for i < n: what a bf16 copy of fp32 weights holds.
void bf16_round_array(float *x, int64_t n);

#ifdef __cplusplus
}
#endif
