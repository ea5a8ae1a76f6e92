// engine_ops.cuh: the few element-wise kernels engine_cuda needs beyond kernels/train and kernels/scan
// (MambaInLlama's x repeat over KV groups, A = -exp(A_log), Mamba parameter-gradient folds, axpy). Each is the
// device form of a loop in distill/mamba1_cpu.c or engine_cpu.c, with the same order of fp32 operations.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "distill/dtype.h"

// xr [T, di] = repeat of xs [T, dxb] over groups of ds channels (mamba1_cpu.c repeat_groups)
void eng_repeat_fwd(DType dt, void *xr, const void *xs, int64_t T, int64_t di, int64_t dxb, int64_t ds, cudaStream_t s);
// dxs [T, dxb] = sum over the di/dxb copies in order (repeat_groups_bwd)
void eng_repeat_bwd(DType dt, void *dxs, const void *dxr, int64_t T, int64_t di, int64_t dxb, int64_t ds, cudaStream_t s);
// A [n] = -exp(alog)
void eng_neg_exp(float *A, const float *alog, int64_t n, cudaStream_t s);
// g [n] += a [n] * b [n]   (A_log's gradient: dA * A)
void eng_add_mul(float *g, const float *a, const float *b, int64_t n, cudaStream_t s);
// y [n] += a * x [n] (fp32; a = 1 adds exactly)
void eng_add_f32(float *y, const float *x, float a, int64_t n, cudaStream_t s);
// y [n] += scale * x [n] in dt
void eng_axpy(DType dt, void *y, const void *x, float scale, int64_t n, cudaStream_t s);
// dst [rows, dc] += src [rows, sc] (first dc columns; fp32): a gradient of a padded weight into its tensor
void eng_add_cols(float *dst, int64_t dc, const float *src, int64_t sc, int64_t rows, cudaStream_t s);
// Hidden-state MSE (losses.c mse_rows): rows [n] (fp64) gets, per row with mask[r] != 0 (mask device [n] or
// NULL: all), the sum over d columns of (a - b)^2, summed in a fixed order; da [n, d] (dt, may be NULL) gets
// += 2 scale (a - b) on those rows.
void eng_mse_rows(DType dt, int64_t n, int64_t d, const void *a, const void *b, const uint8_t *mask, double scale,
                  void *da, double *rows, cudaStream_t s);
// acc [0] = sum of rows [n] in order (one thread: n is a batch's row count)
void eng_sum_rows(const double *rows, int64_t n, double *acc, cudaStream_t s);
