// quant.h: conversion between fp32 and the element encodings of model files: plain F32/F16/BF16 and
// llama.cpp's block-quantized types (block layouts in shared/research/export.md §2.2, ggml-common.h).
//
//   type  elems/block bytes  layout
//   Q4_0  32   18   fp16 d; u8 qs[16]          x = (nibble - 8) * d   (low nibbles: elems 0..15, high: 16..31)
//   Q4_1  32   20   fp16 d, m; u8 qs[16]       x = nibble * d + m
//   Q8_0  32   34   fp16 d; i8 qs[32]          x = q * d
//   Q4_K  256  144  fp16 d, dmin; u8 scales[12]; u8 qs[128]         8 sub-blocks of 32, 6-bit scale/min
//   Q5_K  256  176  fp16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]  as Q4_K plus a 5th bit from qh
//   Q6_K  256  210  u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d     16 sub-blocks of 16, 6-bit quants
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/dtype.h"

bool quant_can_dequantize(DType t);  // F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K
bool quant_can_quantize(DType t);    // F32 F16 BF16 Q8_0 Q4_0 Q4_1

// dst[0..n) = decode(src). n must be a multiple of the block size. Returns 0, or -1 if t is unsupported
// or n is not a whole number of blocks.
int dequantize(DType t, const void *src, float *dst, int64_t n);
// dst = encode(src[0..n)) in llama.cpp's reference rounding (bit-compatible with its quantize_row_*_ref).
int quantize(DType t, const float *src, void *dst, int64_t n);
