// test_sha256.c: SHA-256 against the FIPS 180-4 / NIST example vectors, streaming in odd pieces, and
// against coreutils sha256sum on random data — with each compressor (portable C, and the x86 SHA extensions
// where this CPU has them), and the two against each other on random data of many lengths.
#include <string.h>

#include "distill/rng.h"
#include "distill/sha256.h"
#include "tests/check.h"

static void vectors(void) {
    char hex[65];
    sha256_hex("", 0, hex);
    CHECK(!strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    sha256_hex("abc", 3, hex);
    CHECK(!strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    const char *m2 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";  // 56 bytes: padding spills a block
    sha256_hex(m2, strlen(m2), hex);
    CHECK(!strcmp(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
    const char *m3 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
    sha256_hex(m3, strlen(m3), hex);
    CHECK(!strcmp(hex, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"));
    // one million 'a', fed in pieces of varying size
    Sha256 s;
    sha256_init(&s);
    char a[1000];
    memset(a, 'a', sizeof a);
    int fed = 0;
    for (int k = 1; fed < 1000000; k = k % 997 + 1) {
        int n = k < 1000000 - fed ? k : 1000000 - fed;
        sha256_update(&s, a, (size_t)n);
        fed += n;
    }
    uint8_t d[32];
    sha256_final(&s, d);
    sha256_to_hex(d, hex);
    CHECK(!strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
    // random data of every length 0..200 plus a large one: one-shot vs byte-by-byte, and vs sha256sum
    Rng r;
    rng_init(&r, 1, 0);
    uint8_t buf[5000];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)rng_u64(&r);
    int same = 1;
    for (size_t n = 0; n <= 200; n++) {
        char h1[65], h2[65];
        sha256_hex(buf, n, h1);
        sha256_init(&s);
        for (size_t i = 0; i < n; i++) sha256_update(&s, buf + i, 1);
        sha256_final(&s, d);
        sha256_to_hex(d, h2);
        same &= !strcmp(h1, h2);
    }
    CHECK(same);
    FILE *f = fopen("/tmp/distill_test_sha256.bin", "wb");
    CHECK(f != NULL);
    if (f) {
        fwrite(buf, 1, sizeof buf, f);
        fclose(f);
        FILE *p = popen("sha256sum /tmp/distill_test_sha256.bin", "r");
        char line[256] = "";
        if (p && fgets(line, sizeof line, p)) {
            sha256_hex(buf, sizeof buf, hex);
            CHECK(!strncmp(line, hex, 64));
        } else {
            printf("sha256sum not available; skipped the coreutils comparison\n");
        }
        if (p) pclose(p);
        remove("/tmp/distill_test_sha256.bin");
    }
}

int main(void) {
    sha256_use_portable(1);
    vectors();
    const int accel = sha256_use_portable(0);
    printf("x86 SHA extensions: %s\n", accel ? "in use" : "not on this CPU (portable only)");
    if (accel) vectors();
    // portable vs accelerated on random data, lengths across block boundaries, fed whole and in pieces
    Rng r;
    rng_init(&r, 7, 0);
    static uint8_t big[70000];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (uint8_t)rng_u64(&r);
    int same = 1;
    for (size_t n = 0; n < sizeof big; n = n < 300 ? n + 1 : n * 3 / 2 + 17) {
        char a[65], b[65];
        sha256_use_portable(1);
        sha256_hex(big, n, a);
        sha256_use_portable(0);
        Sha256 s;
        uint8_t d[32];
        sha256_init(&s);
        for (size_t i = 0; i < n;) {  // pieces of 1..200 bytes
            size_t k = 1 + (size_t)(rng_u64(&r) % 200);
            if (k > n - i) k = n - i;
            sha256_update(&s, big + i, k);
            i += k;
        }
        sha256_final(&s, d);
        sha256_to_hex(d, b);
        same &= !strcmp(a, b);
    }
    CHECK(same);
    return check_report("test_sha256");
}
