// check.h: minimal assertions for the C tests. A failed CHECK prints file:line and the expression and
// counts; check_report() prints "N passed, N failed" and returns the exit status.
#pragma once
#include <math.h>
#include <stdio.h>

static int check_pass_ = 0, check_fail_ = 0;

#define CHECK(cond)                                                               \
    do {                                                                          \
        if (cond) check_pass_++;                                                  \
        else {                                                                    \
            check_fail_++;                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                         \
    } while (0)

#define CHECK_EQ_I64(a, b)                                                                          \
    do {                                                                                            \
        long long a_ = (long long)(a), b_ = (long long)(b);                                         \
        if (a_ == b_) check_pass_++;                                                                \
        else {                                                                                      \
            check_fail_++;                                                                          \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, a_, b_); \
        }                                                                                           \
    } while (0)

// relative error check: err <= tol
#define CHECK_REL(err, tol, what)                                                                   \
    do {                                                                                            \
        double e_ = (err);                                                                          \
        if (e_ <= (tol) && e_ == e_) check_pass_++;                                                 \
        else {                                                                                      \
            check_fail_++;                                                                          \
            fprintf(stderr, "%s:%d: %s: relative error %.3e > %.1e\n", __FILE__, __LINE__, what, e_, (double)(tol)); \
        }                                                                                           \
    } while (0)

static inline int check_report(const char *name) {
    printf("%s: %d passed, %d failed\n", name, check_pass_, check_fail_);
    return check_fail_ ? 1 : 0;
}
