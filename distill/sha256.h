// sha256.h: SHA-256 (FIPS 180-4), used for checkpoint dataset checksums and completion markers.
// Streaming: init, update any number of times, final.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t nbytes;     // bytes hashed so far
    uint8_t buf[64];     // pending partial block
    int nbuf;
} Sha256;

void sha256_init(Sha256 *s);
void sha256_update(Sha256 *s, const void *data, size_t n);
void sha256_final(Sha256 *s, uint8_t out[32]);
// One-shot digest as 64 lowercase hex characters + NUL.
void sha256_hex(const void *data, size_t n, char out[65]);
void sha256_to_hex(const uint8_t d[32], char out[65]);
// The compressor: the x86 SHA extensions where the CPU has them (about 5x faster), else portable C.
// portable != 0 forces the portable one (tests compare the two). Returns 1 if the extensions are in use.
int sha256_use_portable(int portable);
