// dpo.c: see dpo.h.
#include "distill/dpo.h"

#include <math.h>
#include <string.h>

#include "distill/train_model.h"
#include "distill/losses.h"

static void make_perm(PairSource *ps) {
    for (int64_t i = 0; i < ps->n_pairs; i++) ps->perm[i] = i;
    Rng g;
    rng_init(&g, ps->seed, 0xd90000ull + (uint64_t)ps->epoch);
    for (int64_t i = ps->n_pairs - 1; i > 0; i--) {  // Fisher-Yates
        int64_t j = (int64_t)rng_below(&g, (uint64_t)(i + 1)), t = ps->perm[i];
        ps->perm[i] = ps->perm[j], ps->perm[j] = t;
    }
}

int pair_source_open(PairSource *ps, const char *path, int64_t max_prompt, uint64_t seed, DlError *e) {
    memset(ps, 0, sizeof *ps);
    if (shard_open(&ps->r, path, e)) return -1;
    const ShardInfo *in = shard_info(ps->r);
    if (in->kind != SHARD_PREF || in->n_pairs < 1) {
        shard_close(ps->r);
        ps->r = NULL;
        return dl_fail(e, "%s: expected a preference shard with pairs (format = \"preference\")", path);
    }
    ps->n_pairs = in->n_pairs;
    ps->max_prompt = max_prompt;
    ps->seed = seed;
    ps->perm = dl_malloc((size_t)ps->n_pairs * sizeof *ps->perm);
    make_perm(ps);
    return 0;
}

void pair_source_close(PairSource *ps) {
    if (ps->r) shard_close(ps->r);
    free(ps->perm);
    memset(ps, 0, sizeof *ps);
}

// One row: prompt (its last P tokens) + response, cut to T+1 tokens.
static void fill_row(const TrainBatch *b, int64_t row, const int32_t *pr, int64_t np, const int32_t *rs, int64_t nr,
                     int64_t P, int32_t pad) {
    const int64_t T = b->T;
    if (np > P) pr += np - P, np = P;
    int64_t n = DL_MIN(np + nr, T + 1);
    int32_t *tk = b->tokens + row * T, *tg = b->targets + row * T;
    uint8_t *m = b->mask + row * T, *rs_ = b->reset + row * T;
    for (int64_t t = 0; t < T; t++) {
        int64_t i = t, j = t + 1;
        tk[t] = i < n ? (i < np ? pr[i] : rs[i - np]) : pad;
        tg[t] = j < n ? (j < np ? pr[j] : rs[j - np]) : -1;
        m[t] = j < n && j >= np;  // the target is a response token
        rs_[t] = t == 0;
    }
}

static int ps_next(void *ctx, TrainBatch *b, DlError *e) {
    PairSource *ps = ctx;
    if (b->B % 2) return dl_fail(e, "DPO batches need an even number of rows (2 per pair), got %lld", (long long)b->B);
    int64_t P = ps->max_prompt > 0 ? ps->max_prompt : b->T / 2;
    for (int64_t i = 0; i < b->B / 2; i++) {
        if (ps->next >= ps->n_pairs) {
            ps->epoch++;
            ps->next = 0;
            make_perm(ps);
        }
        int32_t *pr = NULL, *ch = NULL, *rj = NULL;
        int64_t np, nc, nr;
        if (shard_read_pair(ps->r, ps->perm[ps->next++], &pr, &np, &ch, &nc, &rj, &nr, e)) return -1;
        fill_row(b, 2 * i, pr, np, ch, nc, P, ps->pad_id);
        fill_row(b, 2 * i + 1, pr, np, rj, nr, P, ps->pad_id);
        free(pr), free(ch), free(rj);
    }
    return 0;
}

static void ps_save(void *ctx, CkptState *st) {
    PairSource *ps = ctx;
    ckpt_state_set_int(st, "pairs.seed", (int64_t)ps->seed);
    ckpt_state_set_int(st, "pairs.epoch", ps->epoch);
    ckpt_state_set_int(st, "pairs.next", ps->next);
}

static int ps_restore(void *ctx, const CkptState *st, DlError *e) {
    PairSource *ps = ctx;
    int64_t seed, epoch, next;
    if (ckpt_state_get_int(st, "pairs.seed", &seed, e) || ckpt_state_get_int(st, "pairs.epoch", &epoch, e) ||
        ckpt_state_get_int(st, "pairs.next", &next, e))
        return -1;
    if ((uint64_t)seed != ps->seed || next < 0 || next > ps->n_pairs || epoch < 0)
        return dl_fail(e, "saved pair position (seed %lld, epoch %lld, pair %lld) does not fit this data (%lld pairs)",
                       (long long)seed, (long long)epoch, (long long)next, (long long)ps->n_pairs);
    ps->epoch = epoch;
    ps->next = next;
    make_perm(ps);
    return 0;
}

BatchSource pair_source(PairSource *ps) { return (BatchSource){ps, ps_next, ps_save, ps_restore, NULL}; }

int dpo_train_loss(void *ctx, TrainModel *student, const TrainBatch *b, float *grads, double *loss, MetricPart *parts,
                   int *n_parts, DlError *e) {
    DpoLoss *d = ctx;
    const int64_t B = b->B, P = B / 2;
    if (!d->ref) {  // on the student's device
        d->ref = tm_new(tm_device(student), d->hc, d->reg, (float *)d->ref_params, B, b->T, TM_FROZEN, NULL, e);
        if (!d->ref) return -1;
        d->lp = dl_malloc((size_t)(4 * B) * sizeof(double));
        d->w = dl_malloc((size_t)B * sizeof(float));
    }
    double *pol = d->lp, *ref = d->lp + B, *pc = d->lp + 2 * B, *pr = pc + P, *dc = d->lp + 3 * B, *dr = dc + P;
    // sequence log-probs: sum over the response's targets of log softmax(logits)[target]
    TmLoss ls = {.w = {.ce = 1}, .norm = 1};
    if (tm_forward(d->ref, b->tokens, b->reset, e)) return -1;
    tm_loss(d->ref, b->targets, b->mask, &ls, NULL, ref);
    if (tm_forward(student, b->tokens, b->reset, e)) return -1;
    tm_loss(student, b->targets, b->mask, &ls, NULL, pol);
    double rcx[4096], rrx[4096];
    if (P > 4096) return dl_fail(e, "DPO: at most 4096 pairs per micro-batch");
    for (int64_t i = 0; i < P; i++) {
        pc[i] = pol[2 * i], pr[i] = pol[2 * i + 1];
        rcx[i] = ref[2 * i], rrx[i] = ref[2 * i + 1];
    }
    double acc = 0;
    double l = dpo_loss(P, d->beta, pc, pr, rcx, rrx, dc, dr, &acc);
    if (!isfinite(l)) {  // let the optimizer skip it; no gradient
        *loss = l;
        return 0;
    }
    // d loss / d logp -> row weights of the CE (= -logp): w = -dL/dlogp
    for (int64_t i = 0; i < P; i++) d->w[2 * i] = (float)-dc[i], d->w[2 * i + 1] = (float)-dr[i];
    TmLoss lg = {.w = {.ce = 1}, .norm = 1, .seq_weight = d->w};
    tm_loss(student, b->targets, b->mask, &lg, grads, NULL);
    tm_backward(student, grads);
    double margin = 0;
    for (int64_t i = 0; i < P; i++) margin += d->beta * ((pc[i] - rcx[i]) - (pr[i] - rrx[i]));
    *loss = l;
    parts[0] = (MetricPart){"dpo", l};
    parts[1] = (MetricPart){"reward_acc", acc};
    parts[2] = (MetricPart){"margin", margin / P};
    *n_parts = 3;
    return 0;
}

void dpo_loss_free(DpoLoss *d) {
    tm_free(d->ref);
    free(d->lp);
    free(d->w);
    d->ref = NULL, d->lp = NULL, d->w = NULL;
}
