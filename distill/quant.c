// quant.c: fp32 <-> F16/BF16 and llama.cpp block formats (see quant.h for the layouts).
#include "distill/quant.h"

#include <math.h>
#include <string.h>

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}
static inline void f2h(uint8_t *p, float f) {
    uint16_t h = f32_to_f16(f);
    memcpy(p, &h, 2);
}

bool quant_can_dequantize(DType t) {
    switch (t) {
    case DT_F32: case DT_F16: case DT_BF16: case DT_Q8_0: case DT_Q4_0: case DT_Q4_1: case DT_Q4_K: case DT_Q5_K:
    case DT_Q6_K: return true;
    default: return false;
    }
}

bool quant_can_quantize(DType t) {
    switch (t) {
    case DT_F32: case DT_F16: case DT_BF16: case DT_Q8_0: case DT_Q4_0: case DT_Q4_1: return true;
    default: return false;
    }
}

// Q4_K/Q5_K: 8 sub-blocks of 32 with a 6-bit scale and a 6-bit min each, packed into 12 bytes:
// sub-blocks 0..3 use the low 6 bits of bytes j and j+4; 4..7 combine a nibble of byte j+4 with the
// top 2 bits of bytes j-4 (scale) and j (min).
static inline void k_scale_min(int j, const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// One 256-element Q4_K block (144 bytes: d, dmin, scales[12], qs[128]).
static void deq_q4_k(const uint8_t *b, float *y) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t *sc = b + 4, *q = b + 16;
    for (int j = 0; j < 8; j += 2) {  // 64 elements per step: low nibbles then high nibbles of 32 bytes
        uint8_t s0, m0, s1, m1;
        k_scale_min(j, sc, &s0, &m0);
        k_scale_min(j + 1, sc, &s1, &m1);
        const float d0 = d * s0, n0 = dmin * m0, d1 = d * s1, n1 = dmin * m1;
        for (int l = 0; l < 32; l++) y[l] = d0 * (q[l] & 0xF) - n0;
        for (int l = 0; l < 32; l++) y[32 + l] = d1 * (q[l] >> 4) - n1;
        q += 32;
        y += 64;
    }
}

// One Q5_K block (176 bytes: d, dmin, scales[12], qh[32], qs[128]); bit j of qh[l] is the 5th bit of
// element l of sub-block j.
static void deq_q5_k(const uint8_t *b, float *y) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t *sc = b + 4, *qh = b + 16, *q = b + 48;
    for (int j = 0; j < 8; j += 2) {
        uint8_t s0, m0, s1, m1;
        k_scale_min(j, sc, &s0, &m0);
        k_scale_min(j + 1, sc, &s1, &m1);
        const float d0 = d * s0, n0 = dmin * m0, d1 = d * s1, n1 = dmin * m1;
        for (int l = 0; l < 32; l++) y[l] = d0 * ((q[l] & 0xF) + (((qh[l] >> j) & 1) << 4)) - n0;
        for (int l = 0; l < 32; l++) y[32 + l] = d1 * ((q[l] >> 4) + (((qh[l] >> (j + 1)) & 1) << 4)) - n1;
        q += 32;
        y += 64;
    }
}

// One Q6_K block (210 bytes: ql[128], qh[64], scales[16] int8, d last). Two halves of 128 elements.
static void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = h2f(b + 208);
    for (int half = 0; half < 2; half++) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is + 0] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

int dequantize(DType t, const void *src, float *dst, int64_t n) {
    const DTypeInfo *di = dtype_info(t);
    if (!di || !quant_can_dequantize(t) || n < 0 || n % di->block_elems) return -1;
    const uint8_t *p = src;
    const int64_t nb = n / di->block_elems;
    switch (t) {
    case DT_F32: memcpy(dst, src, (size_t)n * 4); break;
    case DT_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = h2f(p + 2 * i);
        break;
    case DT_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t b;
            memcpy(&b, p + 2 * i, 2);
            dst[i] = bf16_to_f32(b);
        }
        break;
    case DT_Q8_0:
        for (int64_t k = 0; k < nb; k++, p += 34, dst += 32) {
            const float d = h2f(p);
            for (int j = 0; j < 32; j++) dst[j] = (float)(int8_t)p[2 + j] * d;
        }
        break;
    case DT_Q4_0:
        for (int64_t k = 0; k < nb; k++, p += 18, dst += 32) {
            const float d = h2f(p);
            for (int j = 0; j < 16; j++) {
                dst[j] = (float)((p[2 + j] & 0xF) - 8) * d;
                dst[j + 16] = (float)((p[2 + j] >> 4) - 8) * d;
            }
        }
        break;
    case DT_Q4_1:
        for (int64_t k = 0; k < nb; k++, p += 20, dst += 32) {
            const float d = h2f(p), m = h2f(p + 2);
            for (int j = 0; j < 16; j++) {
                dst[j] = (float)(p[4 + j] & 0xF) * d + m;
                dst[j + 16] = (float)(p[4 + j] >> 4) * d + m;
            }
        }
        break;
    case DT_Q4_K:
        for (int64_t k = 0; k < nb; k++) deq_q4_k(p + k * 144, dst + k * 256);
        break;
    case DT_Q5_K:
        for (int64_t k = 0; k < nb; k++) deq_q5_k(p + k * 176, dst + k * 256);
        break;
    case DT_Q6_K:
        for (int64_t k = 0; k < nb; k++) deq_q6_k(p + k * 210, dst + k * 256);
        break;
    default: return -1;
    }
    return 0;
}

// The reference's MIN(15, (int8_t)v) for v >= 0, with NaN/inf kept out of the int conversion (UB).
static inline int q4(float v) { return (int)fminf(fmaxf(v, 0.0f), 15.0f); }

int quantize(DType t, const float *x, void *dst, int64_t n) {
    const DTypeInfo *di = dtype_info(t);
    if (!di || !quant_can_quantize(t) || n < 0 || n % di->block_elems) return -1;
    uint8_t *p = dst;
    const int64_t nb = n / di->block_elems;
    switch (t) {
    case DT_F32: memcpy(dst, x, (size_t)n * 4); break;
    case DT_F16:
        for (int64_t i = 0; i < n; i++) f2h(p + 2 * i, x[i]);
        break;
    case DT_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t b = f32_to_bf16(x[i]);
            memcpy(p + 2 * i, &b, 2);
        }
        break;
    case DT_Q8_0:  // d = amax/127, q = round(x/d)
        for (int64_t k = 0; k < nb; k++, p += 34, x += 32) {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
            const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
            f2h(p, d);
            // |x*id| <= 127 for finite x; the clamp only keeps NaN/inf out of the int conversion (UB)
            for (int j = 0; j < 32; j++) p[2 + j] = (uint8_t)(int8_t)roundf(fminf(fmaxf(x[j] * id, -127.0f), 127.0f));
        }
        break;
    case DT_Q4_0:  // d = (value of largest magnitude) / -8, q = min(15, (int)(x/d + 8.5))
        for (int64_t k = 0; k < nb; k++, p += 18, x += 32) {
            float amax = 0, mx = 0;
            for (int j = 0; j < 32; j++)
                if (fabsf(x[j]) > amax) amax = fabsf(x[j]), mx = x[j];
            const float d = mx / -8.0f, id = d ? 1.0f / d : 0.0f;
            f2h(p, d);
            for (int j = 0; j < 16; j++) {
                int a = q4(x[j] * id + 8.5f), b = q4(x[j + 16] * id + 8.5f);
                p[2 + j] = (uint8_t)(a | (b << 4));
            }
        }
        break;
    case DT_Q4_1:  // d = (max - min)/15, m = min, q = min(15, (int)((x - min)/d + 0.5))
        for (int64_t k = 0; k < nb; k++, p += 20, x += 32) {
            float mn = INFINITY, mx = -INFINITY;
            for (int j = 0; j < 32; j++) mn = fminf(mn, x[j]), mx = fmaxf(mx, x[j]);
            const float d = (mx - mn) / 15.0f, id = d ? 1.0f / d : 0.0f;
            f2h(p, d);
            f2h(p + 2, mn);
            for (int j = 0; j < 16; j++) {
                int a = q4((x[j] - mn) * id + 0.5f), b = q4((x[j + 16] - mn) * id + 0.5f);
                p[4 + j] = (uint8_t)(a | (b << 4));
            }
        }
        break;
    default: return -1;
    }
    return 0;
}
