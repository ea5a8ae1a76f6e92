// test_zero_overlap: the arithmetic of overlapping the data-parallel reductions with the backward on CUDA
// (train_model.c tm_dp_before_backward: each bucket's reduction goes out when the engine's backward reports,
// through engine_cuda_set_grad_hook, that it reached the bucket's level; zero.h zero_bucket_levels /
// zero_buckets_ready / zero_slice_ranges_split).
//   1. Levels against an independent schedule of the engine's writes, derived from the tensor NAMES only: the
//      loss writes lm_head (or, tied, the embeddings), the backward's first step model.norm.weight, layer l's
//      backward every "model.layers.l." tensor, its last step the embeddings. For real hybrid registries
//      (2-6 layers, tied and untied, five choices of trained tensors), 1-8 ranks and 6 bucket sizes, the engine's
//      sequence of reported levels (n_layer, n_layer - 1, ..., 0, -1) is replayed: every bucket goes out exactly
//      once; when it goes out, every tensor in it has had its last write (never early); it goes out at the first
//      report after its last write (never late: no report at which it was final and stayed back); levels never
//      increase from one bucket to the next, so what goes out is always a prefix of the reduction order.
//   2. A partial backward (no gradient above hidden state 1: the pass starts at layer 0): the same, with the
//      tensors above it final at the first report.
//   3. zero_slice_ranges_split: the same ranges as zero_slice_ranges, first[] splits them by bucket, a bucket's
//      ranges are adjacent and span exactly the bucket's data in the compact buffer; the per-bucket all-reduce
//      runs (ZeRO-0 with overlap) cover every trained element exactly once and nothing outside the buffer.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/model.h"
#include "distill/model_io.h"
#include "distill/zero.h"
#include "tests/check.h"
#include "tests/llama8b_stage1.h"
#include "tests/tiny_model.h"

static int64_t span(int64_t n) { return (n + DL_TENSOR_ALIGN - 1) / DL_TENSOR_ALIGN * DL_TENSOR_ALIGN; }

// The engine's compact gradient layout: trained tensors in registry order at multiples of DL_TENSOR_ALIGN.
static int64_t compact(const Registry *r, int64_t *off) {
    int64_t n = 0;
    for (int i = 0; i < r->n; i++) {
        off[i] = r->t[i].trainable ? n : -1;
        if (r->t[i].trainable) n += span(r->t[i].numel);
    }
    return n;
}

// Which report follows the last write of tensor t's gradient, from its name alone, in a backward that starts
// above layer hi (hi = n_layer: a full pass). The engine reports hi, hi - 1, ..., 0, then -1: report k is level
// hi - k, the last is number hi + 1. The loss (lm_head, a tied head's embeddings) and the backward's first step
// (model.norm.weight) come before report 0; layer l's backward (every "model.layers.l." tensor) right before
// report hi - l; the embeddings' backward before the last. Layers at or above hi are not written by the pass.
static int write_report(const TensorInfo *t, int hi) {
    int l = -1;
    if (sscanf(t->name, "model.layers.%d.", &l) == 1) return l < hi ? hi - l : 0;
    if (!strcmp(t->name, "model.embed_tokens.weight")) return hi + 1;
    return 0;  // model.norm.weight, lm_head.weight
}

typedef struct {
    int cases, buckets, reports;
} Tally;

// Replays the engine's reports hi, ..., 0, -1 over layout L: every bucket must go out exactly at the first
// report after the last write of its gradients (never early, never late), always as a prefix of the order.
static void replay(const Registry *reg, const ZeroLayout *L, int n_layer, int hi, Tally *ty) {
    int *level = malloc((size_t)L->n_bucket * sizeof(int)), *sent = malloc((size_t)L->n_bucket * sizeof(int));
    zero_bucket_levels(L, reg, n_layer, level);
    bool mono = true;
    for (int b = 1; b < L->n_bucket; b++) mono &= level[b] <= level[b - 1];
    CHECK(mono);
    for (int b = 0; b < L->n_bucket; b++) sent[b] = -1;
    int launched = 0;
    bool prefix = true;
    for (int k = 0; k <= hi + 1; k++) {
        const int ready = zero_buckets_ready(level, L->n_bucket, k <= hi ? hi - k : -1);
        prefix &= ready >= launched;
        for (int b = launched; b < ready; b++) sent[b] = k;
        launched = DL_MAX(launched, ready);
        ty->reports++;
    }
    CHECK(prefix);
    CHECK(launched == L->n_bucket);
    bool exact = true;
    for (int b = 0; b < L->n_bucket; b++) {
        int due = 0;
        for (int s = L->bucket[b].seg_begin; s < L->bucket[b].seg_end; s++)
            due = DL_MAX(due, write_report(&reg->t[L->seg[s].tensor], hi));
        if (sent[b] != due) {
            exact = false;
            fprintf(stderr, "bucket %d (%s ..): sent at report %d, due at %d (hi %d)\n", b,
                    reg->t[L->seg[L->bucket[b].seg_begin].tensor].name, sent[b], due, hi);
        }
    }
    CHECK(exact);
    ty->buckets += L->n_bucket;
    ty->cases++;
    free(level);
    free(sent);
}

// 3. zero_slice_ranges_split over the engine's compact layout.
static void check_split(const Registry *reg, const ZeroLayout *L) {
    int64_t *off = malloc((size_t)reg->n * sizeof(int64_t));
    const int64_t n = compact(reg, off);
    const int cap = zero_slice_ranges_max(L);
    ZeroRange *a = malloc((size_t)cap * sizeof(ZeroRange)), *b = malloc((size_t)cap * sizeof(ZeroRange));
    int *first = malloc((size_t)(L->n_bucket + 1) * sizeof(int));
    int na = 0, nb = 0;
    DlError e;
    CHECK(zero_slice_ranges(L, off, a, &na, &e) == 0);
    CHECK(zero_slice_ranges_split(L, off, b, &nb, first, &e) == 0);
    bool same = na == nb;
    for (int i = 0; same && i < na; i++) same = a[i].off == b[i].off && a[i].n == b[i].n && a[i].root == b[i].root;
    CHECK(same);
    CHECK(first[0] == 0 && first[L->n_bucket] == nb);
    int *cover = calloc((size_t)n, sizeof(int));
    bool adjacent = true, inside = true, ranks = true;
    for (int k = 0; k < L->n_bucket; k++) {
        CHECK(first[k + 1] > first[k]);  // every bucket has data
        if (first[k + 1] <= first[k]) continue;
        const ZeroBucket *bk = &L->bucket[k];
        const ZeroSeg *s0 = &L->seg[bk->seg_begin], *s1 = &L->seg[bk->seg_end - 1];
        const int64_t data0 = off[s0->tensor], data1 = off[s1->tensor] + s1->numel;
        for (int i = first[k]; i < first[k + 1]; i++) {
            if (i > first[k]) adjacent &= b[i].off == b[i - 1].off + b[i - 1].n, ranks &= b[i].root == b[i - 1].root + 1;
            inside &= b[i].off >= data0 && b[i].off + b[i].n <= data1;
        }
        const int64_t run0 = b[first[k]].off, run1 = b[first[k + 1] - 1].off + b[first[k + 1] - 1].n;
        CHECK(run0 == data0 && run1 == data1);
        for (int64_t p = run0; p < run1 && p < n; p++) cover[p]++;
    }
    CHECK(adjacent);
    CHECK(inside);
    CHECK(ranks);
    bool once = true;
    for (int i = 0; i < reg->n; i++)
        if (reg->t[i].trainable)
            for (int64_t j = 0; j < reg->t[i].numel; j++) once &= cover[off[i] + j] == 1;
    CHECK(once);
    free(off), free(a), free(b), free(first), free(cover);
}

// 4. ZeRO-2's staged gradient pages (zero_stage_plan) for one rank: every element of a bucket's data is exactly one
// of owned, on a staged page of that bucket, or in the clear list; staged pages hold no owned element and lie
// inside their bucket; staged and permanent pages partition the buffer; kept buckets (a global tensor) stage
// nothing; replaying the reports with the runtime's rule (map in bucket order into slot sidx % slots, launch each
// final bucket right after mapping it) never evicts a bucket whose reduction was not launched yet.
static void check_stage(const Registry *reg, const ZeroLayout *L, int n_layer, int rank, int64_t page, int64_t *worst_saved) {
    int64_t *off = malloc((size_t)reg->n * sizeof(int64_t));
    const int64_t n = compact(reg, off);
    ZeroStagePlan P;
    DlError e;
    CHECK(zero_stage_plan(L, reg, off, n, n_layer, rank, page, &P, &e) == 0);
    uint8_t *pg = calloc((size_t)P.n_pages, 1), *el = calloc((size_t)n, 1);
    bool pages_ok = true, kept_ok = true, cover_ok = true;
    for (int i = 0; i < P.n_perm; i++)
        for (int64_t q = P.perm[2 * i]; q < P.perm[2 * i + 1]; q++) pg[q]++;
    for (int b = 0; b < P.n_bucket; b++) {
        const ZeroStageBucket *z = &P.b[b];
        bool has_global = false;
        for (int k = L->bucket[b].seg_begin; k < L->bucket[b].seg_end; k++) has_global |= reg->t[L->seg[k].tensor].layer < 0;
        kept_ok &= z->keep == has_global && (!z->keep || (z->a1 == z->a0 && z->b1 == z->b0 && z->sidx < 0));
        const int64_t runs[2][2] = {{z->a0, z->a1}, {z->b0, z->b1}};
        for (int j = 0; j < 2; j++)
            for (int64_t q = runs[j][0]; q < runs[j][1]; q++) {
                pg[q]++;
                for (int64_t x = q * page; x < (q + 1) * page && x < n; x++) el[x] |= 2;
            }
    }
    for (int64_t q = 0; q < P.n_pages; q++) pages_ok &= pg[q] == 1;
    for (int k = 0; k < L->n_seg; k++) {  // owned elements
        int64_t b0, b1;
        zero_seg_owned(L, k, rank, &b0, &b1);
        for (int64_t x = b0; x < b1; x++) el[off[L->seg[k].tensor] + x] |= 1;
    }
    for (int i = 0; i < P.n_clear; i++)
        for (int64_t x = P.clear[i].off; x < P.clear[i].off + P.clear[i].n; x++) el[x] |= 4;
    int *first = malloc((size_t)(L->n_bucket + 1) * sizeof(int));
    ZeroRange *sl = malloc((size_t)zero_slice_ranges_max(L) * sizeof(ZeroRange));
    int ns = 0;
    CHECK(zero_slice_ranges_split(L, off, sl, &ns, first, &e) == 0);
    for (int b = 0; b < L->n_bucket; b++)
        for (int64_t x = sl[first[b]].off; x < sl[first[b + 1] - 1].off + sl[first[b + 1] - 1].n; x++)
            cover_ok &= el[x] == 1 || el[x] == 2 || el[x] == 4;
    CHECK(pages_ok);
    CHECK(kept_ok);
    CHECK(cover_ok);
    // the slot rule over a full pass and a pass starting at layer 0
    int *level = malloc((size_t)L->n_bucket * sizeof(int));
    zero_bucket_levels(L, reg, n_layer, level);
    bool evict_ok = true;
    for (int hi = n_layer; hi >= 1; hi -= n_layer - 1 > 0 ? n_layer - 1 : 1) {
        int *slot_owner = malloc((size_t)(P.slots ? P.slots : 1) * sizeof(int)), mapped = 0, launched = 0;
        for (int s = 0; s < P.slots; s++) slot_owner[s] = -1;
        for (int k = 0; k <= hi + 1; k++) {
            const int lv = k <= hi ? hi - k : -1;
            const int ready = zero_buckets_ready(level, L->n_bucket, lv);
            for (int b = launched; b < L->n_bucket; b++) {
                if (b >= ready && P.b[b].hi < lv - 1) break;
                if (b >= mapped) {  // map b
                    if (P.b[b].sidx >= 0) {
                        const int s = P.b[b].sidx % P.slots;
                        evict_ok &= slot_owner[s] < launched;  // -1 or a launched bucket
                        slot_owner[s] = b;
                    }
                    mapped = b + 1;
                }
                if (b < ready) launched = b + 1;
            }
        }
        CHECK(launched == L->n_bucket && mapped == L->n_bucket);
        free(slot_owner);
    }
    CHECK(evict_ok);
    const int64_t saved = n - (int64_t)(zero_stage_bytes(&P) / 4);
    if (saved < *worst_saved) *worst_saved = saved;
    free(level), free(first), free(sl), free(pg), free(el), free(off);
    zero_stage_plan_free(&P);
}

// The Llama-3-8B shape, 50% Mamba-1, the Mamba mixers trained (issue 8's benchmark), 25 MiB buckets, 2 MiB pages:
// the gradient memory of one rank with and without staging, for 2, 4 and 8 ranks.
static void stage_8b(void) {
    HybridConfig hc;
    Registry reg;
    DlError e;
    if (llama8b_stage1(&hc, &reg)) {
        CHECK(0);
        return;
    }
    int64_t *off = malloc((size_t)reg.n * sizeof(int64_t));
    const int64_t n = compact(&reg, off);
    for (int w = 2; w <= 8; w *= 2) {
        ZeroLayout L;
        CHECK(zero_layout_build(&L, &reg, w, 2, 25 << 20, &e) == 0);
        ZeroStagePlan P;
        CHECK(zero_stage_plan(&L, &reg, off, n, hc.base.n_layer, 0, 1 << 19, &P, &e) == 0);
        const double full = 4.0 * (double)n, st = zero_stage_bytes(&P), shard = 4.0 * (double)L.shard_numel;
        CHECK(st < full && st >= shard);
        printf("8B shape, %d ranks: gradient memory per rank %.2f GB staged (%lld permanent pages, %d slots x %lld pages) "
               "vs %.2f GB whole; the owned slices alone %.2f GB\n", w, st / 1e9, (long long)P.perm_pages, P.slots,
               (long long)P.slot_pages, full / 1e9, shard / 1e9);
        if (w == 2) CHECK(st < 0.7 * full);
        zero_stage_plan_free(&P);
        zero_layout_free(&L);
    }
    free(off);
    reg_free(&reg);
}

int main(void) {
    static const char *TRAIN[] = {"*", "*.mamba.*", "model.layers.1.*", "model.norm.weight,model.embed_tokens.weight",
                                  "model.embed_tokens.weight,*.mamba.*,model.norm.weight"};
    static const int64_t BUCKETS[] = {0, 4, 4096, 20000, 1 << 16, 1 << 20};
    Tally ty = {0, 0, 0};
    int64_t worst = INT64_MAX;
    for (int nl = 2; nl <= 6; nl += 2)
        for (int tied = 0; tied < 2; tied++) {
            LlamaConfig c;
            tiny_config(&c, nl, tied);
            int attn[DL_MAX_LAYERS], na = 0;
            for (int l = 0; l < nl; l += 2) attn[na++] = l;
            HybridConfig h;
            DlError e;
            CHECK(hybrid_config_init(&h, &c, MIXER_MAMBA1, attn, na, &e) == 0);
            for (size_t t = 0; t < DL_ARRAY_LEN(TRAIN); t++) {
                Registry reg;
                model_build_registry(&h, &reg);
                CHECK(reg_set_trainable(&reg, TRAIN[t], &e) > 0);
                // 1. the tensor levels agree with the name-derived write schedule of a full pass
                bool lv_ok = true;
                for (int i = 0; i < reg.n; i++) {
                    const int lv = zero_tensor_level(&reg.t[i], nl);
                    lv_ok &= write_report(&reg.t[i], nl) == (lv == -1 ? nl + 1 : nl - lv);
                }
                CHECK(lv_ok);
                for (int w = 1; w <= 8; w = w < 3 ? w + 1 : w * 2 + 2)  // 1, 2, 3, 8
                    for (size_t bb = 0; bb < DL_ARRAY_LEN(BUCKETS); bb++) {
                        ZeroLayout L;
                        CHECK(zero_layout_build(&L, &reg, w, w > 1 ? 2 : 0, BUCKETS[bb], &e) == 0);
                        for (int hi = nl; hi >= 1; hi -= nl - 1 > 0 ? nl - 1 : 1)  // full pass, then from layer 0
                            replay(&reg, &L, nl, hi, &ty);
                        check_split(&reg, &L);
                        for (int rk = 0; rk < w && w > 1; rk += w > 2 ? w - 1 : 1)
                            for (int64_t pgs = 16; pgs <= 4096; pgs *= 16) check_stage(&reg, &L, nl, rk, pgs, &worst);
                        zero_layout_free(&L);
                    }
                reg_free(&reg);
            }
        }
    printf("%d layouts, %d buckets, %d reported levels: every bucket sent once, never before its last gradient "
           "write, never held past it; slice ranges split by bucket cover the trained elements once\n",
           ty.cases, ty.buckets, ty.reports);
    printf("ZeRO-2 staging plans: pages partition the buffer, every element owned / staged / cleared once, no slot "
           "evicted before its bucket's reduction was launched\n");
    stage_8b();
    return check_report("test_zero_overlap");
}
