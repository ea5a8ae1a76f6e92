// test_zero_ranges: the arithmetic of data parallel on CUDA (train_model.c's tm_dp_*) on compact buffers,
// with simulated ranks on the CPU. The CUDA engine keeps its gradients (and AdamW moments) for the trained
// tensors only, in registry order, each at a multiple of DL_TENSOR_ALIGN elements, with no padding between
// zero.h's buckets; its fp32 master has the same rule with extra (fp32-read, frozen) tensors in between.
//   1. zero_slice_ranges: for random registries (sizes 1..5000, frozen tensors anywhere), worlds 1..8 and
//      bucket sizes from one element to one bucket: the ranges of a bucket are in rank order, inside the
//      bucket's data, disjoint, and cover every trained element exactly once; the element a range gives to
//      rank q is one q owns by zero_seg_owned (so the device sums land where the CPU path's shard ranges
//      and the checkpoint files expect them); the alignment gaps of the buffer are the only other elements.
//   2. zero_piece_ranges in a master-like layout: every trained element in exactly one piece, of its owner.
//   3. the protocol over W simulated ranks (reduce each range onto its root, in rank order):
//      ZeRO-1: after accumulating every micro-batch locally, the owned elements hold the sum over ranks of
//      the local sums, bitwise; ZeRO-2: reduce after every micro-batch and zero what is not owned (the
//      engine_cuda_optim_keep_owned rule): equal within fp32 rounding, bitwise with one micro-batch; the
//      owned squared norms summed over ranks give the full squared norm; broadcasting every owned piece
//      of an updated master from its owner gives every rank the full update, bitwise.
//   4. errors: a buffer whose offsets break a bucket (a gap, another order) and a trained tensor without a
//      place are refused with messages naming the tensor.
#include <math.h>
#include <string.h>

#include "distill/rng.h"
#include "distill/zero.h"
#include "tests/check.h"

static int64_t span(int64_t n) { return (n + DL_TENSOR_ALIGN - 1) / DL_TENSOR_ALIGN * DL_TENSOR_ALIGN; }

// n tensors of random sizes; frozen ones with probability 1/4 (at least one trainable).
static void random_reg(Registry *r, Rng *g, int n) {
    reg_init(r);
    for (int i = 0; i < n; i++) {
        int64_t d[2] = {1 + (int64_t)rng_below(g, 70), 1 + (int64_t)rng_below(g, 70)};
        int nd = rng_below(g, 3) == 0 ? 1 : 2;
        reg_addf(r, ROLE_MLP, i, nd, d, "t%d.weight", i);
        r->t[i].trainable = rng_below(g, 4) != 0;
    }
    r->t[rng_below(g, (uint64_t)n)].trainable = true;
}

// The engine's compact layout: trained tensors (with_extra: also every other frozen one, like the fp32-read
// Mamba tensors in the master) in registry order at multiples of DL_TENSOR_ALIGN. Returns the buffer size.
static int64_t compact(const Registry *r, bool with_extra, int64_t *off) {
    int64_t n = 0;
    for (int i = 0; i < r->n; i++) {
        bool in = r->t[i].trainable || (with_extra && i % 2 == 0);
        off[i] = in ? n : -1;
        if (in) n += span(r->t[i].numel);
    }
    return n;
}

typedef struct {
    int n_cases, n_exact_z2;
    double worst_z2, worst_norm;
} Stats;

// Which tensor and element of the compact buffer position p holds (-1: an alignment gap).
static int locate(const Registry *r, const int64_t *off, int64_t p, int64_t *j) {
    for (int i = 0; i < r->n; i++)
        if (off[i] >= 0 && p >= off[i] && p < off[i] + r->t[i].numel) {
            *j = p - off[i];
            return i;
        }
    return -1;
}

static void check_layout(const Registry *reg, const ZeroLayout *L, Rng *g, Stats *st) {
    const int W = L->world;
    int64_t *goff = dl_malloc((size_t)reg->n * sizeof(int64_t)), *moff = dl_malloc((size_t)reg->n * sizeof(int64_t));
    const int64_t gn = compact(reg, false, goff), mn = compact(reg, true, moff);
    DlError e;
    ZeroRange *sl = dl_malloc((size_t)zero_slice_ranges_max(L) * sizeof(ZeroRange));
    ZeroRange *pc = dl_malloc((size_t)zero_piece_ranges_max(L) * sizeof(ZeroRange));
    int ns = 0, np = 0;
    CHECK(zero_slice_ranges(L, goff, sl, &ns, &e) == 0);
    CHECK(zero_piece_ranges(L, moff, pc, &np, &e) == 0);
    // 1. slices: disjoint, covering every trained element once, each element given to its owner
    int *cover = dl_calloc((size_t)gn, sizeof(int));
    bool owner_ok = true, order_ok = true;
    for (int k = 0; k < ns; k++) {
        if (k > 0 && sl[k].root > sl[k - 1].root && sl[k].off < sl[k - 1].off + sl[k - 1].n) order_ok = false;
        for (int64_t p = sl[k].off; p < sl[k].off + sl[k].n; p++) {
            if (p < 0 || p >= gn) {
                owner_ok = false;
                continue;
            }
            cover[p]++;
            int64_t j;
            int t = locate(reg, goff, p, &j);
            if (t < 0) continue;
            int kseg = -1;
            for (int q = 0; q < L->n_seg; q++)
                if (L->seg[q].tensor == t) kseg = q;
            int64_t b, en;
            zero_seg_owned(L, kseg, sl[k].root, &b, &en);
            if (j < b || j >= en) owner_ok = false;
        }
    }
    bool once = true;
    for (int64_t p = 0; p < gn; p++) {
        int64_t j;
        bool data = locate(reg, goff, p, &j) >= 0;
        if (data ? cover[p] != 1 : cover[p] > 1) once = false;
    }
    CHECK(owner_ok);
    CHECK(order_ok);
    CHECK(once);
    // 2. pieces in the master layout: each trained element once, of its owner
    int *mcov = dl_calloc((size_t)mn, sizeof(int));
    bool piece_ok = true;
    for (int k = 0; k < np; k++)
        for (int64_t p = pc[k].off; p < pc[k].off + pc[k].n; p++) {
            mcov[p]++;
            int64_t j;
            int t = locate(reg, moff, p, &j);
            if (t < 0 || !reg->t[t].trainable) {
                piece_ok = false;
                continue;
            }
            int kseg = -1;
            for (int q = 0; q < L->n_seg; q++)
                if (L->seg[q].tensor == t) kseg = q;
            int64_t b, en;
            zero_seg_owned(L, kseg, pc[k].root, &b, &en);
            if (j < b || j >= en) piece_ok = false;
        }
    for (int i = 0; i < reg->n; i++)
        if (reg->t[i].trainable)
            for (int64_t j = 0; j < reg->t[i].numel; j++) piece_ok &= mcov[moff[i] + j] == 1;
    CHECK(piece_ok);
    if (!(owner_ok && once && piece_ok)) {  // the simulation below would write out of bounds
        free(cover), free(mcov), free(sl), free(pc), free(goff), free(moff);
        return;
    }
    // 3. the protocol with W simulated ranks and A micro-batches
    const int A = 1 + (int)rng_below(g, 3);
    float *grad[8], *z1[8], *z2[8];
    double *abssum = dl_calloc((size_t)gn, sizeof(double));
    for (int q = 0; q < W; q++) {
        z1[q] = dl_calloc((size_t)gn, sizeof(float));
        z2[q] = dl_calloc((size_t)gn, sizeof(float));
        grad[q] = dl_calloc((size_t)gn, sizeof(float));
    }
    // owned range of rank q per tensor, as the optimizer's registry carries it (zero_apply_shards)
    Registry own[8];
    for (int q = 0; q < W; q++) {
        own[q] = *reg;
        own[q].t = dl_malloc((size_t)reg->n * sizeof(TensorInfo));
        memcpy(own[q].t, reg->t, (size_t)reg->n * sizeof(TensorInfo));
        zero_apply_shards(L, &own[q], q);
    }
    for (int a = 0; a < A; a++) {
        for (int q = 0; q < W; q++)  // this micro-batch's gradient, added by "backward"
            for (int i = 0; i < reg->n; i++)
                if (goff[i] >= 0)
                    for (int64_t j = 0; j < reg->t[i].numel; j++) {
                        float x = (float)(rng_normal(g) * exp(3 * rng_uniform_f64(g)));
                        grad[q][goff[i] + j] = x;
                        z1[q][goff[i] + j] += x;
                        z2[q][goff[i] + j] += x;
                        abssum[goff[i] + j] += fabs(x);
                    }
        for (int k = 0; k < ns; k++)  // ZeRO-2: reduce now, then keep only what each rank owns
            for (int64_t p = sl[k].off; p < sl[k].off + sl[k].n; p++) {
                float s = z2[0][p];
                for (int q = 1; q < W; q++) s += z2[q][p];
                z2[sl[k].root][p] = s;
            }
        for (int q = 0; q < W; q++)
            for (int i = 0; i < reg->n; i++)
                if (goff[i] >= 0) {
                    const TensorInfo *t = &own[q].t[i];
                    for (int64_t j = 0; j < t->numel; j++)
                        if (j < t->shard_begin || j >= t->shard_end) z2[q][goff[i] + j] = 0;
                }
    }
    // ZeRO-1: one reduction after the last micro-batch; the reference is the rank-order sum of local sums
    float *ref = dl_malloc((size_t)gn * sizeof(float));
    for (int64_t p = 0; p < gn; p++) {
        float s = z1[0][p];
        for (int q = 1; q < W; q++) s += z1[q][p];
        ref[p] = s;
    }
    for (int k = 0; k < ns; k++)
        for (int64_t p = sl[k].off; p < sl[k].off + sl[k].n; p++) {
            float s = z1[0][p];
            for (int q = 1; q < W; q++) s += z1[q][p];
            z1[sl[k].root][p] = s;
        }
    bool z1_exact = true, z2_exact = true, gaps_zero = true;
    double worst = 0, sq_full = 0, sq_ranks = 0;
    for (int q = 0; q < W; q++) {
        double sq = 0;
        for (int i = 0; i < reg->n; i++) {
            if (goff[i] < 0) continue;
            const TensorInfo *t = &own[q].t[i];
            for (int64_t j = t->shard_begin; j < t->shard_end; j++) {
                const int64_t p = goff[i] + j;
                z1_exact &= z1[q][p] == ref[p];
                z2_exact &= z2[q][p] == z1[q][p];
                worst = fmax(worst, fabs((double)z2[q][p] - ref[p]) / abssum[p]);  // rounding, cancellations aside
                sq += (double)z1[q][p] * z1[q][p];
            }
        }
        sq_ranks += sq;  // each rank's share of the global norm, summed over ranks (one all-reduce)
        for (int64_t p = 0; p < gn; p++) {
            int64_t j;
            if (locate(reg, goff, p, &j) < 0) gaps_zero &= z2[q][p] == 0 && z1[q][p] == 0;
        }
    }
    for (int64_t p = 0; p < gn; p++) sq_full += (double)ref[p] * ref[p];
    CHECK(z1_exact);
    CHECK(gaps_zero);
    if (A == 1) CHECK(z2_exact);  // one micro-batch: ZeRO-2 is ZeRO-1
    CHECK_REL(worst, A == 1 ? 0 : 1e-6, "ZeRO-2 vs ZeRO-1 sums (relative to the sum of magnitudes)");
    CHECK_REL(fabs(sq_ranks - sq_full) / sq_full, 1e-12, "owned squared norms summed over ranks");
    st->worst_z2 = fmax(st->worst_z2, worst);
    st->worst_norm = fmax(st->worst_norm, fabs(sq_ranks - sq_full) / sq_full);
    st->n_exact_z2 += z2_exact;
    // the gather: each rank updates its owned master pieces, then every piece is broadcast from its owner
    float *mst[8], *want = dl_malloc((size_t)mn * sizeof(float));
    for (int64_t p = 0; p < mn; p++) want[p] = (float)p * 0.5f;
    for (int i = 0; i < reg->n; i++)
        if (reg->t[i].trainable)
            for (int64_t j = 0; j < reg->t[i].numel; j++) want[moff[i] + j] = -1.0f - (float)(i * 7 + j);  // "updated"
    for (int q = 0; q < W; q++) {
        mst[q] = dl_malloc((size_t)mn * sizeof(float));
        for (int64_t p = 0; p < mn; p++) mst[q][p] = (float)p * 0.5f;  // the old weights, identical on every rank
        for (int i = 0; i < reg->n; i++)
            if (reg->t[i].trainable)
                for (int64_t j = own[q].t[i].shard_begin; j < own[q].t[i].shard_end; j++) mst[q][moff[i] + j] = want[moff[i] + j];
    }
    for (int k = 0; k < np; k++)
        for (int q = 0; q < W; q++)
            if (q != pc[k].root) memcpy(mst[q] + pc[k].off, mst[pc[k].root] + pc[k].off, (size_t)pc[k].n * sizeof(float));
    bool gathered = true;
    for (int q = 0; q < W; q++) gathered &= memcmp(mst[q], want, (size_t)mn * sizeof(float)) == 0;
    CHECK(gathered);
    for (int q = 0; q < W; q++) {
        free(z1[q]), free(z2[q]), free(grad[q]), free(mst[q]);
        free(own[q].t);
    }
    free(abssum), free(want), free(ref), free(cover), free(mcov), free(sl), free(pc), free(goff), free(moff);
    st->n_cases++;
}

static void check_errors(void) {
    Registry r;
    reg_init(&r);
    int64_t d[1] = {40};
    for (int i = 0; i < 4; i++) reg_addf(&r, ROLE_MLP, i, 1, d, "layer%d.w", i);
    ZeroLayout L;
    DlError e;
    CHECK(zero_layout_build(&L, &r, 2, 1, 0, &e) == 0);  // one bucket
    int64_t off[4];
    compact(&r, false, off);
    ZeroRange rg[16];
    int n = 0;
    CHECK(zero_slice_ranges(&L, off, rg, &n, &e) == 0);
    CHECK_EQ_I64(n, 2);
    off[2] += DL_TENSOR_ALIGN;  // a gap the layout does not have
    off[3] += DL_TENSOR_ALIGN;
    CHECK(zero_slice_ranges(&L, off, rg, &n, &e) == -1);
    CHECK(strstr(e.msg, "tensor 2") && strstr(e.msg, "registry order"));
    compact(&r, false, off);
    int64_t t = off[1];  // two tensors swapped
    off[1] = off[2], off[2] = t;
    CHECK(zero_slice_ranges(&L, off, rg, &n, &e) == -1);
    compact(&r, false, off);
    off[3] = -1;
    CHECK(zero_slice_ranges(&L, off, rg, &n, &e) == -1);
    CHECK(zero_piece_ranges(&L, off, rg, &n, &e) == -1);
    CHECK(strstr(e.msg, "tensor 3") != NULL);
    zero_layout_free(&L);
    reg_free(&r);
}

int main(void) {
    Rng g;
    rng_init(&g, 20261123, 8);
    Stats st = {0};
    const int worlds[] = {1, 2, 3, 4, 8};
    const int64_t buckets[] = {0, 4, 3000, 20000};
    for (int rep = 0; rep < 6; rep++) {
        Registry r;
        random_reg(&r, &g, 3 + (int)rng_below(&g, 14));
        for (size_t w = 0; w < sizeof worlds / sizeof *worlds; w++)
            for (size_t b = 0; b < sizeof buckets / sizeof *buckets; b++)
                for (int stage = 1; stage <= 2; stage++) {
                    ZeroLayout L;
                    DlError e;
                    if (zero_layout_build(&L, &r, worlds[w], stage, buckets[b], &e)) {
                        fprintf(stderr, "%s\n", e.msg);
                        CHECK(0);
                        continue;
                    }
                    check_layout(&r, &L, &g, &st);
                    zero_layout_free(&L);
                }
        reg_free(&r);
    }
    check_errors();
    printf("test_zero_ranges: %d layouts (worlds 1-8, 4 bucket sizes, ZeRO-1/2); ZeRO-2 vs ZeRO-1 worst %.2e relative "
           "(bitwise in %d), owned norms vs full %.2e\n", st.n_cases, st.worst_z2, st.n_exact_z2, st.worst_norm);
    return check_report("test_zero_ranges");
}
