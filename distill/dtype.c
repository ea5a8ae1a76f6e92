// dtype.c: see dtype.h.
#include "distill/dtype.h"

#include <string.h>

static const DTypeInfo INFO[DT_COUNT] = {
    [DT_F32] = {"F32", 1, 4, true, false},     [DT_F16] = {"F16", 1, 2, true, false},
    [DT_BF16] = {"BF16", 1, 2, true, false},   [DT_F64] = {"F64", 1, 8, true, false},
    [DT_I8] = {"I8", 1, 1, false, false},      [DT_I16] = {"I16", 1, 2, false, false},
    [DT_I32] = {"I32", 1, 4, false, false},    [DT_I64] = {"I64", 1, 8, false, false},
    [DT_U8] = {"U8", 1, 1, false, false},      [DT_U16] = {"U16", 1, 2, false, false},
    [DT_U32] = {"U32", 1, 4, false, false},    [DT_U64] = {"U64", 1, 8, false, false},
    [DT_BOOL] = {"BOOL", 1, 1, false, false},  [DT_Q4_0] = {"Q4_0", 32, 18, false, true},
    [DT_Q4_1] = {"Q4_1", 32, 20, false, true}, [DT_Q8_0] = {"Q8_0", 32, 34, false, true},
    [DT_Q4_K] = {"Q4_K", 256, 144, false, true}, [DT_Q5_K] = {"Q5_K", 256, 176, false, true},
    [DT_Q6_K] = {"Q6_K", 256, 210, false, true},
};

const DTypeInfo *dtype_info(DType t) { return (t >= 0 && t < DT_COUNT) ? &INFO[t] : NULL; }
const char *dtype_name(DType t) { return (t >= 0 && t < DT_COUNT) ? INFO[t].name : "?"; }

int dtype_from_name(const char *name) {
    for (int i = 0; i < DT_COUNT; i++)
        if (strcmp(INFO[i].name, name) == 0) return i;
    return -1;
}

int64_t dtype_nbytes(DType t, int64_t n) {
    const DTypeInfo *d = dtype_info(t);
    if (!d || n < 0 || n % d->block_elems) return -1;
    int64_t out;
    if (__builtin_mul_overflow(n / d->block_elems, (int64_t)d->block_bytes, &out)) return -1;
    return out;
}

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return u2f(sign | 0x7f800000u | (man << 13));  // inf / nan
    return u2f(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);  // nan
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // overflow to inf (rounding included)
    if (a < 0x38800000u) {  // subnormal or zero in half: round(a * 2^24) with ties to even
        float v = u2f(a) * 16777216.0f;
        uint32_t r = (uint32_t)v;
        float frac = v - (float)r;
        if (frac > 0.5f || (frac == 0.5f && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t mant = a & 0x7fffff, e = (a >> 23) - 112;
    uint32_t h = (e << 10) | (mant >> 13), rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

float bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);  // quiet nan
    return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

void bf16_round_array(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}
