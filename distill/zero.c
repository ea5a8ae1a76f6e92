// zero.c: see zero.h.
#include "distill/zero.h"

#include <math.h>

#include "distill/dist.h"
#include <string.h>

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int zero_layout_build(ZeroLayout *L, const Registry *reg, int world, int stage, int64_t bucket_bytes, DlError *e) {
    memset(L, 0, sizeof *L);
    if (world < 1 || world > 65536) return dl_fail(e, "ZeRO: world size %d out of range [1, 65536]", world);
    if (stage < 0 || stage > 2) return dl_fail(e, "ZeRO: stage %d not supported (0, 1 or 2)", stage);
    L->world = world;
    L->stage = stage;
    L->align = DL_TENSOR_ALIGN;
    L->bucket_bytes = bucket_bytes;
    int nt = 0;
    for (int i = 0; i < reg->n; i++) nt += reg->t[i].trainable;
    if (!nt) return dl_fail(e, "ZeRO: the registry has no trainable tensor");
    int *idx = dl_malloc((size_t)nt * sizeof(int));
    nt = 0;
    for (int i = 0; i < reg->n; i++)
        if (reg->t[i].trainable) idx[nt++] = i;
    L->seg = dl_calloc((size_t)nt, sizeof(ZeroSeg));
    L->bucket = dl_calloc((size_t)nt, sizeof(ZeroBucket));  // at most one bucket per tensor
    const int64_t cap = bucket_bytes > 0 ? DL_MAX(bucket_bytes / 4, 1) : INT64_MAX;
    const int64_t unit = (int64_t)world * L->align;
    int64_t flat = 0, shard = 0;
    int hi = nt - 1;  // walk backwards: bucket = idx[lo..hi]
    while (hi >= 0) {
        int lo = hi;
        int64_t size = round_up(reg->t[idx[hi]].numel, L->align);
        while (lo > 0 && size + round_up(reg->t[idx[lo - 1]].numel, L->align) <= cap) {
            lo--;
            size += round_up(reg->t[idx[lo]].numel, L->align);
        }
        ZeroBucket *b = &L->bucket[L->n_bucket];
        b->flat_begin = flat;
        b->seg_begin = L->n_seg;
        for (int k = lo; k <= hi; k++) {  // registry order inside the bucket
            const TensorInfo *t = &reg->t[idx[k]];
            ZeroSeg *s = &L->seg[L->n_seg++];
            s->tensor = idx[k];
            s->reg_offset = t->offset;
            s->numel = t->numel;
            s->flat_offset = flat;
            s->bucket = L->n_bucket;
            flat = round_up(flat + t->numel, L->align);
            L->trainable_numel += t->numel;
        }
        b->seg_end = L->n_seg;
        flat = b->flat_begin + round_up(flat - b->flat_begin, unit);
        b->flat_end = flat;
        b->slice = (b->flat_end - b->flat_begin) / world;
        b->shard_offset = shard;
        shard += b->slice;
        L->n_bucket++;
        hi = lo - 1;
    }
    L->flat_numel = flat;
    L->shard_numel = shard;
    free(idx);
    return 0;
}

void zero_layout_free(ZeroLayout *L) {
    free(L->seg);
    free(L->bucket);
    memset(L, 0, sizeof *L);
}

bool zero_reduce_every_micro(const ZeroLayout *L) { return L->stage == 2; }

void zero_seg_owned(const ZeroLayout *L, int k, int rank, int64_t *b, int64_t *e) {
    const ZeroSeg *s = &L->seg[k];
    const ZeroBucket *bk = &L->bucket[s->bucket];
    int64_t lo = bk->flat_begin + (int64_t)rank * bk->slice, hi = lo + bk->slice;
    int64_t x0 = DL_MAX(lo, s->flat_offset), x1 = DL_MIN(hi, s->flat_offset + s->numel);
    if (x1 <= x0) *b = *e = 0;
    else {
        *b = x0 - s->flat_offset;
        *e = x1 - s->flat_offset;
    }
}

void zero_apply_shards(const ZeroLayout *L, Registry *reg, int rank) {
    for (int k = 0; k < L->n_seg; k++) {
        TensorInfo *t = &reg->t[L->seg[k].tensor];
        if (L->stage == 0) {
            t->shard_begin = 0;
            t->shard_end = t->numel;
        } else zero_seg_owned(L, k, rank, &t->shard_begin, &t->shard_end);
    }
}

void zero_memory(const ZeroLayout *L, int64_t *optim_bytes, int64_t *grad_bytes) {
    int64_t owned = L->stage >= 1 ? L->shard_numel : L->flat_numel;
    int64_t biggest = 0;
    for (int b = 0; b < L->n_bucket; b++) biggest = DL_MAX(biggest, L->bucket[b].flat_end - L->bucket[b].flat_begin);
    *optim_bytes = 2 * 4 * owned;
    // stage 2: the shard accumulator plus one bucket of staging for the micro-batch being reduced
    *grad_bytes = 4 * (L->stage == 2 ? L->shard_numel + biggest : L->flat_numel);
}

void zero_plan_print(const ZeroLayout *L, const Registry *reg, FILE *f) {
    static const char *OPS[] = {"all-reduce after the last micro-batch", "reduce-scatter after the last micro-batch",
                                "reduce-scatter after every micro-batch"};
    int64_t ob, gb;
    zero_memory(L, &ob, &gb);
    fprintf(f, "ZeRO-%d over %d rank%s: %lld trainable elements, flat %lld (padding %lld), shard %lld per rank, %d bucket%s\n",
            L->stage, L->world, L->world > 1 ? "s" : "", (long long)L->trainable_numel, (long long)L->flat_numel,
            (long long)(L->flat_numel - L->trainable_numel), (long long)L->shard_numel, L->n_bucket, L->n_bucket > 1 ? "s" : "");
    fprintf(f, "per rank: optimizer state %.3f GB, gradients %.3f GB; each bucket: %s%s\n", ob / 1e9, gb / 1e9, OPS[L->stage],
            L->stage ? ", all-gather of parameters after the step" : "");
    for (int b = 0; b < L->n_bucket; b++) {
        const ZeroBucket *k = &L->bucket[b];
        fprintf(f, "  bucket %3d  %9.2f MB  %3d tensor%s  %s .. %s\n", b, 4.0 * (double)(k->flat_end - k->flat_begin) / 1e6,
                k->seg_end - k->seg_begin, k->seg_end - k->seg_begin > 1 ? "s" : " ", reg->t[L->seg[k->seg_begin].tensor].name,
                reg->t[L->seg[k->seg_end - 1].tensor].name);
    }
}

// ---- layout conversions

void zero_pack(const ZeroLayout *L, const float *reg_buf, float *flat) {
    memset(flat, 0, (size_t)L->flat_numel * sizeof(float));
    for (int k = 0; k < L->n_seg; k++)
        memcpy(flat + L->seg[k].flat_offset, reg_buf + L->seg[k].reg_offset, (size_t)L->seg[k].numel * sizeof(float));
}

void zero_unpack(const ZeroLayout *L, const float *flat, float *reg_buf) {
    for (int k = 0; k < L->n_seg; k++)
        memcpy(reg_buf + L->seg[k].reg_offset, flat + L->seg[k].flat_offset, (size_t)L->seg[k].numel * sizeof(float));
}

// Calls copy for each owned piece of rank: (reg element offset, shard index, count).
#define FOR_OWNED(L, rank, BODY)                                                               \
    for (int k_ = 0; k_ < (L)->n_seg; k_++) {                                                   \
        const ZeroSeg *s_ = &(L)->seg[k_];                                                      \
        const ZeroBucket *b_ = &(L)->bucket[s_->bucket];                                        \
        int64_t ob_, oe_;                                                                       \
        zero_seg_owned((L), k_, (rank), &ob_, &oe_);                                            \
        if (oe_ <= ob_) continue;                                                               \
        int64_t reg_at = s_->reg_offset + ob_;                                                  \
        int64_t shard_at = b_->shard_offset + (s_->flat_offset + ob_ - b_->flat_begin - (int64_t)(rank) * b_->slice); \
        int64_t count = oe_ - ob_;                                                              \
        BODY                                                                                    \
    }

void zero_shard_pack(const ZeroLayout *L, int rank, const float *reg_buf, float *shard) {
    memset(shard, 0, (size_t)L->shard_numel * sizeof(float));
    FOR_OWNED(L, rank, { memcpy(shard + shard_at, reg_buf + reg_at, (size_t)count * sizeof(float)); })
}

void zero_shard_unpack(const ZeroLayout *L, int rank, const float *shard, float *reg_buf) {
    FOR_OWNED(L, rank, { memcpy(reg_buf + reg_at, shard + shard_at, (size_t)count * sizeof(float)); })
}

// ---- simulated ranks

void zsim_reduce_scatter(const ZeroLayout *L, const float *const *flat, float *const *shard, bool accumulate) {
    const int R = L->world;
    for (int r = 0; r < R; r++)
        for (int b = 0; b < L->n_bucket; b++) {
            const ZeroBucket *k = &L->bucket[b];
            const int64_t base = k->flat_begin + (int64_t)r * k->slice;
            float *out = shard[r] + k->shard_offset;
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < k->slice; i++) {
                float s = flat[0][base + i];
                for (int q = 1; q < R; q++) s += flat[q][base + i];
                out[i] = accumulate ? out[i] + s : s;
            }
        }
}

void zsim_all_gather(const ZeroLayout *L, const float *const *shard, float *const *flat) {
    for (int r = 0; r < L->world; r++)
        for (int q = 0; q < L->world; q++)
            for (int b = 0; b < L->n_bucket; b++) {
                const ZeroBucket *k = &L->bucket[b];
                memcpy(flat[r] + k->flat_begin + (int64_t)q * k->slice, shard[q] + k->shard_offset, (size_t)k->slice * sizeof(float));
            }
}

void zsim_all_reduce(int R, int64_t n, float *const *buf) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float s = buf[0][i];
        for (int q = 1; q < R; q++) s += buf[q][i];
        for (int q = 0; q < R; q++) buf[q][i] = s;
    }
}

double zsim_all_reduce_f64(int R, const double *x) {
    double s = x[0];
    for (int q = 1; q < R; q++) s += x[q];
    return s;
}

// ---- over real processes (dist.h)

int zdist_reduce_scatter(DistGroup *g, const ZeroLayout *L, const float *flat, float *shard, bool accumulate, DlError *e) {
    const int R = L->world, me = dist_rank(g);
    if (dist_world(g) != R) return dl_fail(e, "ZeRO layout for %d ranks used in a group of %d", R, dist_world(g));
    float *all = dl_malloc((size_t)R * (size_t)L->flat_numel * sizeof(float));
    if (dist_allgather(g, flat, (size_t)L->flat_numel * sizeof(float), all, e)) {
        free(all);
        return -1;
    }
    for (int b = 0; b < L->n_bucket; b++) {
        const ZeroBucket *k = &L->bucket[b];
        const int64_t base = k->flat_begin + (int64_t)me * k->slice;
        float *out = shard + k->shard_offset;
        for (int64_t i = 0; i < k->slice; i++) {
            float s = all[base + i];
            for (int q = 1; q < R; q++) s += all[(size_t)q * (size_t)L->flat_numel + (size_t)(base + i)];
            out[i] = accumulate ? out[i] + s : s;
        }
    }
    free(all);
    return 0;
}

int zdist_all_gather(DistGroup *g, const ZeroLayout *L, const float *shard, float *flat, DlError *e) {
    const int R = L->world;
    if (dist_world(g) != R) return dl_fail(e, "ZeRO layout for %d ranks used in a group of %d", R, dist_world(g));
    float *all = dl_malloc((size_t)R * (size_t)L->shard_numel * sizeof(float));
    if (dist_allgather(g, shard, (size_t)L->shard_numel * sizeof(float), all, e)) {
        free(all);
        return -1;
    }
    for (int q = 0; q < R; q++)
        for (int b = 0; b < L->n_bucket; b++) {
            const ZeroBucket *k = &L->bucket[b];
            memcpy(flat + k->flat_begin + (int64_t)q * k->slice, all + (size_t)q * (size_t)L->shard_numel + (size_t)k->shard_offset,
                   (size_t)k->slice * sizeof(float));
        }
    free(all);
    return 0;
}

int zdist_all_reduce_f64(DistGroup *g, double x, double *sum, DlError *e) {
    double *all = dl_malloc((size_t)dist_world(g) * sizeof(double));
    int rc = dist_allgather(g, &x, sizeof x, all, e);
    if (rc == 0) *sum = zsim_all_reduce_f64(dist_world(g), all);
    free(all);
    return rc;
}

// ---- sharded optimizer step

double zero_local_sq_norm(const Registry *reg, const float *grads) {
    double total = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable) continue;
        const float *g = grads + t->offset;
        double s = 0;
        for (int64_t j = t->shard_begin; j < t->shard_end; j++) s += (double)g[j] * (double)g[j];
        total += s;
    }
    return total;
}

int zero_optim_check(const OptimConfig *c, int world, int stage, DlError *e) {
    // every decision of the step (skip, outlier window, clip) is taken on the global norm, which every rank
    // holds (optim_step_norm): any config runs sharded
    if (world < 1 || stage < 0 || stage > 2)
        return dl_fail(e, "ZeRO: stage %d over %d ranks is not supported (stage 0..2, world >= 1)", stage, world);
    return optim_config_validate(c, e);
}

double zero_global_norm(const OptimConfig *c, double loss, double global_sq) {
    return isfinite(loss) ? sqrt(global_sq) * (1.0 / c->grad_accum) : NAN;
}

void zero_optim_step(Optim *o, int world, float *params, float *grads, double loss, double global_sq, OptimResult *r) {
    (void)world;  // the global norm makes the step rank-count independent
    optim_step_norm(o, params, grads, loss, zero_global_norm(&o->cfg, loss, global_sq), r);
}

// ---- compact buffers

int zero_slice_ranges_max(const ZeroLayout *L) { return L->n_bucket * L->world; }
int zero_piece_ranges_max(const ZeroLayout *L) { return L->n_seg + L->n_bucket * (L->world - 1); }

int zero_slice_ranges(const ZeroLayout *L, const int64_t *off, ZeroRange *out, int *n_out, DlError *e) {
    return zero_slice_ranges_split(L, off, out, n_out, NULL, e);
}

int zero_slice_ranges_split(const ZeroLayout *L, const int64_t *off, ZeroRange *out, int *n_out, int *first, DlError *e) {
    int n = 0;
    for (int b = 0; b < L->n_bucket; b++) {
        if (first) first[b] = n;
        const ZeroBucket *k = &L->bucket[b];
        const ZeroSeg *s0 = &L->seg[k->seg_begin], *s1 = &L->seg[k->seg_end - 1];
        const int64_t base = off[s0->tensor];  // where the bucket's flat_begin falls in the buffer
        for (int q = k->seg_begin; q < k->seg_end; q++) {
            const ZeroSeg *s = &L->seg[q];
            if (off[s->tensor] < 0 || off[s->tensor] - base != s->flat_offset - k->flat_begin)
                return dl_fail(e, "ZeRO: tensor %d (bucket %d) lies at element %lld of the compact buffer, where the layout "
                                  "expects %lld (the buffer must hold the trained tensors in registry order, each at a "
                                  "multiple of %lld elements)", s->tensor, b, (long long)off[s->tensor],
                               (long long)(base + s->flat_offset - k->flat_begin), (long long)L->align);
        }
        const int64_t end = base + (s1->flat_offset - k->flat_begin) + s1->numel;  // the bucket's data, unpadded
        for (int q = 0; q < L->world; q++) {
            const int64_t lo = base + (int64_t)q * k->slice, hi = DL_MIN(lo + k->slice, end);
            if (hi > lo) out[n++] = (ZeroRange){lo, hi - lo, q};
        }
    }
    if (first) first[L->n_bucket] = n;
    *n_out = n;
    return 0;
}

int zero_tensor_level(const TensorInfo *t, int n_layer) {
    if (t->layer >= 0) return t->layer;
    return t->role == ROLE_EMBED ? -1 : n_layer;
}

void zero_bucket_levels(const ZeroLayout *L, const Registry *reg, int n_layer, int *level) {
    for (int b = 0; b < L->n_bucket; b++) {
        int lv = n_layer;
        for (int k = L->bucket[b].seg_begin; k < L->bucket[b].seg_end; k++)
            lv = DL_MIN(lv, zero_tensor_level(&reg->t[L->seg[k].tensor], n_layer));
        level[b] = lv;
    }
}

int zero_buckets_ready(const int *level, int n_bucket, int reached) {
    int n = 0;
    while (n < n_bucket && level[n] >= reached) n++;
    return n;
}

int zero_piece_ranges(const ZeroLayout *L, const int64_t *off, ZeroRange *out, int *n_out, DlError *e) {
    int n = 0;
    for (int k = 0; k < L->n_seg; k++) {
        const int t = L->seg[k].tensor;
        if (off[t] < 0) return dl_fail(e, "ZeRO: trainable tensor %d has no place in the compact buffer", t);
        for (int q = 0; q < L->world; q++) {
            int64_t b, en;
            zero_seg_owned(L, k, q, &b, &en);
            if (en > b) out[n++] = (ZeroRange){off[t] + b, en - b, q};
        }
    }
    *n_out = n;
    return 0;
}

// ---- ZeRO-2's staged gradient pages (see zero.h)

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Appends [x0, x1) minus the element intervals cut[0..n) (sorted, disjoint) to out.
static void add_minus(ZeroRange *out, int *n_out, int64_t x0, int64_t x1, const int64_t *cut, int n) {
    for (int i = 0; i < n && x0 < x1; i++) {
        const int64_t c0 = cut[2 * i], c1 = cut[2 * i + 1];
        if (c1 <= c0 || c1 <= x0 || c0 >= x1) continue;
        if (c0 > x0) out[(*n_out)++] = (ZeroRange){x0, c0 - x0, -1};
        x0 = DL_MAX(x0, c1);
    }
    if (x1 > x0) out[(*n_out)++] = (ZeroRange){x0, x1 - x0, -1};
}

int zero_stage_plan(const ZeroLayout *L, const Registry *reg, const int64_t *off, int64_t n_elems, int n_layer,
                    int rank, int64_t page, ZeroStagePlan *P, DlError *e) {
    memset(P, 0, sizeof *P);
    if (page < 1 || n_elems < 1) return dl_fail(e, "ZeRO-2 staging: page %lld and buffer %lld elements must be >= 1",
                                                (long long)page, (long long)n_elems);
    ZeroRange *sl = dl_malloc((size_t)zero_slice_ranges_max(L) * sizeof(ZeroRange));
    int *first = dl_malloc((size_t)(L->n_bucket + 1) * sizeof(int)), ns = 0;
    if (zero_slice_ranges_split(L, off, sl, &ns, first, e)) {
        free(sl), free(first);
        return -1;
    }
    P->page = page;
    P->n_pages = cdiv(n_elems, page);
    P->n_bucket = L->n_bucket;
    P->b = dl_calloc((size_t)(L->n_bucket ? L->n_bucket : 1), sizeof(ZeroStageBucket));
    P->clear = dl_malloc((size_t)(4 * L->n_bucket + 1) * sizeof(ZeroRange));
    uint8_t *staged = dl_calloc((size_t)P->n_pages, 1);
    int n_staged_buckets = 0;
    for (int b = 0; b < L->n_bucket; b++) {
        ZeroStageBucket *z = &P->b[b];
        z->lo = n_layer, z->hi = -1;
        for (int k = L->bucket[b].seg_begin; k < L->bucket[b].seg_end; k++) {
            const TensorInfo *t = &reg->t[L->seg[k].tensor];
            const int lv = zero_tensor_level(t, n_layer);
            z->lo = DL_MIN(z->lo, lv), z->hi = DL_MAX(z->hi, lv);
            z->keep |= t->layer < 0;
        }
        const ZeroRange *r0 = &sl[first[b]], *r1 = &sl[first[b + 1] - 1];
        const int64_t run0 = r0->off, run1 = r1->off + r1->n;
        int64_t own0 = run0, own1 = run0;  // none
        for (int i = first[b]; i < first[b + 1]; i++)
            if (sl[i].root == rank) own0 = sl[i].off, own1 = sl[i].off + sl[i].n;
        if (!z->keep) {
            if (own1 > own0) {
                z->a0 = cdiv(run0, page), z->a1 = own0 / page;
                z->b0 = cdiv(own1, page), z->b1 = run1 / page;
            } else {
                z->a0 = cdiv(run0, page), z->a1 = run1 / page;
            }
            if (z->a1 <= z->a0) z->a0 = z->a1 = 0;
            if (z->b1 <= z->b0) z->b0 = z->b1 = 0;
        }
        const int64_t np = (z->a1 - z->a0) + (z->b1 - z->b0);
        for (int64_t p = z->a0; p < z->a1; p++) staged[p] = 1;
        for (int64_t p = z->b0; p < z->b1; p++) staged[p] = 1;
        z->sidx = np > 0 ? n_staged_buckets++ : -1;
        P->slot_pages = DL_MAX(P->slot_pages, np);
        P->staged_pages += np;
        // the non-owned elements left on permanent pages
        const int64_t cut[4] = {z->a0 * page, z->a1 * page, z->b0 * page, z->b1 * page};
        if (own1 > own0) {
            add_minus(P->clear, &P->n_clear, run0, own0, cut, 2);
            add_minus(P->clear, &P->n_clear, own1, run1, cut, 2);
        } else {
            add_minus(P->clear, &P->n_clear, run0, run1, cut, 2);
        }
    }
    // permanent runs: the complement of the staged pages
    P->perm = dl_malloc((size_t)(2 * (L->n_bucket * 2 + 2)) * sizeof(int64_t));
    for (int64_t p = 0; p < P->n_pages;) {
        if (staged[p]) {
            p++;
            continue;
        }
        int64_t q = p;
        while (q < P->n_pages && !staged[q]) q++;
        P->perm[2 * P->n_perm] = p, P->perm[2 * P->n_perm + 1] = q;
        P->n_perm++;
        P->perm_pages += q - p;
        p = q;
    }
    // slots: the most staged buckets mapped and not yet launched at any report lv (lowest level < lv, highest
    // level >= lv - 1), plus one
    int most = 0;
    for (int lv = n_layer; lv >= 0; lv--) {
        int live = 0;
        for (int b = 0; b < L->n_bucket; b++) live += P->b[b].sidx >= 0 && P->b[b].lo < lv && P->b[b].hi >= lv - 1;
        most = DL_MAX(most, live);
    }
    P->slots = n_staged_buckets ? DL_MIN(most + 1, n_staged_buckets) : 0;
    free(staged), free(sl), free(first);
    return 0;
}

void zero_stage_plan_free(ZeroStagePlan *P) {
    free(P->b), free(P->perm), free(P->clear);
    memset(P, 0, sizeof *P);
}

double zero_stage_bytes(const ZeroStagePlan *P) {
    return 4.0 * (double)P->page * (double)(P->perm_pages + (int64_t)P->slots * P->slot_pages);
}
