// spec_eval.c: see spec_eval.h.
#include "distill/spec_eval.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

#include "distill/rng.h"

static int64_t sum_i64(const int64_t *n, int64_t B) {
    int64_t s = 0;
    for (int64_t b = 0; b < B; b++) s += n[b];
    return s;
}

// Rows [B, Lmax] of prompts s, s+1, ... (wrapping: a short last batch repeats prompts).
static void fill_batch(const SpecEvalConfig *c, int64_t s, int64_t B, int64_t Lmax, int32_t *pr, int64_t *pl) {
    for (int64_t b = 0; b < B; b++) {
        const int64_t i = (s + b) % c->n_prompts;
        memcpy(pr + b * Lmax, c->prompts[i], (size_t)c->plen[i] * sizeof(int32_t));
        pl[b] = c->plen[i];
    }
}

// The fp32 CPU reference at a divergence: the target's logits after the prompt and the plain output's first
// d->position tokens.
static int analyse_divergence(const SpecEvalConfig *c, const int32_t *plain, SpecDivergence *d, DlError *e) {
    const int64_t np = c->plen[d->prompt], L = np + d->position, V = c->target.hc->base.vocab;
    Decoder *dec = decoder_new(c->target.hc, c->target.reg, c->target.params, 1, L + 1, e);
    if (!dec) return -1;
    int32_t *tok = dl_malloc((size_t)L * sizeof(int32_t));
    float *lg = dl_malloc((size_t)V * sizeof(float));
    memcpy(tok, c->prompts[d->prompt], (size_t)np * sizeof(int32_t));
    memcpy(tok + np, plain, (size_t)d->position * sizeof(int32_t));
    int rc = decoder_feed(dec, tok, L, lg, NULL, e);
    if (rc == 0) {
        int64_t a = 0, b = -1;
        double m = 0;
        for (int64_t v = 0; v < V; v++) {
            m = DL_MAX(m, fabs((double)lg[v]));
            if (lg[v] > lg[a]) b = a, a = v;
            else if (v != a && (b < 0 || lg[v] > lg[b])) b = v;
        }
        d->ref_token = (int32_t)a;
        d->top2_gap = b >= 0 ? (double)lg[a] - (double)lg[b] : 0;
        d->max_abs = m;
        d->gap = (double)lg[d->plain_token] - (double)lg[d->spec_token];
    }
    free(tok), free(lg);
    decoder_free(dec);
    return rc;
}

// Plain generation of every prompt with decoder d, B at a time: tokens/s into *tps; the outputs into ref / nref
// ([batches * B, T] / [batches * B]) when given. pr, pl, out, no: scratch of batch size B.
static int plain_tps(const SpecEvalConfig *c, GenDecoder d, int64_t B, int64_t Lmax, const GenParams *gp, int32_t *pr,
                     int64_t *pl, int32_t *out, int64_t *no, int32_t *ref, int64_t *nref, double *tps, DlError *e) {
    const int64_t T = c->max_tokens;
    double t = 0;
    int64_t n = 0;
    Rng rng;
    rng_init(&rng, 0, 0);
    for (int64_t s = 0; s < c->n_prompts; s += B) {
        fill_batch(c, s, B, Lmax, pr, pl);
        const double t0 = dl_now();
        if (gen_plain(d, pr, pl, Lmax, gp, &rng, out, no, e)) return -1;
        t += dl_now() - t0, n += sum_i64(no, B);
        if (ref) {
            memcpy(ref + (s / B) * B * T, out, (size_t)(B * T) * sizeof(int32_t));
            memcpy(nref + (s / B) * B, no, (size_t)B * sizeof(int64_t));
        }
    }
    *tps = (double)n / t;
    return 0;
}

// Speculative rows of one batch size B and branch count W for every K (rows [nk]): decoders dt, dd of batch B * W;
// ref / nref the target's plain outputs, tps and draft_tps the plain speeds.
static int spec_rows(const SpecEvalConfig *c, GenDecoder dt, GenDecoder dd, int64_t B, int W, int64_t Lmax,
                     const GenParams *gp0, const int32_t *ref, const int64_t *nref, double tps, double draft_tps,
                     int32_t *pr, int64_t *pl, int32_t *out, int64_t *no, SpecEvalRow *rows, DlError *e) {
    const int64_t T = c->max_tokens, nl = c->n_prompts;
    GenParams gp = *gp0;
    gp.branches = W;
    Rng rng;
    DlError e2;
    if (c->cuda && W > 1) {  // warm-up of these decoders, untimed
        GenParams wp = gp;
        wp.max_tokens = DL_MIN(T, 8), wp.k = c->ks[0];
        fill_batch(c, 0, B, Lmax, pr, pl);
        rng_init(&rng, 0, 0);
        if (gen_speculative(dt, dd, pr, pl, Lmax, &wp, &rng, out, no, NULL, e)) return -1;
    }
    for (int ki = 0; ki < c->nk; ki++) {
        SpecEvalRow *row = &rows[ki];
        memset(row, 0, sizeof *row);  // (row->n_div counts during the loop)
        gp.k = c->ks[ki];
        SpecStats acc;
        memset(&acc, 0, sizeof acc);
        double ts = 0;
        int64_t nts = 0, same = 0, nseq = 0;
        rng_init(&rng, 0, 0);
        for (int64_t s = 0; s < nl; s += B) {
            fill_batch(c, s, B, Lmax, pr, pl);
            SpecStats st;
            double t0 = dl_now();
            if (gen_speculative(dt, dd, pr, pl, Lmax, &gp, &rng, out, no, &st, e)) return -1;
            ts += dl_now() - t0, nts += sum_i64(no, B);
            for (int64_t b = 0; b < B && s + b < nl; b++, nseq++) {  // the repeated prompts of a short batch do not count
                const int64_t r = (s / B) * B + b;
                const bool eq = no[b] == nref[r] && !memcmp(out + b * T, ref + r * T, (size_t)no[b] * sizeof(int32_t));
                same += eq;
                if (!eq && gp.sp.greedy && row->n_div < SPEC_EVAL_MAX_DIV) {
                    SpecDivergence *d = &row->div[row->n_div++];
                    int64_t i = 0;
                    while (i < no[b] && i < nref[r] && out[b * T + i] == ref[r * T + i]) i++;
                    d->prompt = s + b, d->position = i;
                    d->plain_token = i < nref[r] ? ref[r * T + i] : -1;
                    d->spec_token = i < no[b] ? out[b * T + i] : -1;
                    if (d->plain_token < 0 || d->spec_token < 0) row->n_div--;  // a length difference only (no stop: cannot happen)
                    else if (analyse_divergence(c, ref + r * T, d, &e2)) {  // a diagnostic: never fails the measurement
                        d->gap = d->top2_gap = d->max_abs = NAN, d->ref_token = -1;
                        dl_warn("speculative eval: no fp32 reference for the divergence (%s)", e2.msg);
                    }
                }
            }
            acc.steps += st.steps, acc.emitted += st.emitted;
            acc.rounds += st.rounds, acc.draft_s += st.draft_s, acc.verify_s += st.verify_s;
            for (int i = 0; i < gp.k; i++) acc.accepted_at[i] += st.accepted_at[i];
            for (int w = 0; w < W; w++) acc.branch_won[w] += st.branch_won[w];
        }
        const double steps = (double)DL_MAX(acc.steps, 1);
        row->batch = B, row->k = gp.k, row->branches = W;
        row->plain_tps = tps, row->spec_tps = (double)nts / ts;
        row->speedup = row->spec_tps / row->plain_tps;
        row->tokens_per_step = (double)acc.emitted / steps;
        row->draft_tps = draft_tps;
        row->draft_cost = row->plain_tps / row->draft_tps;
        row->model_speedup = row->tokens_per_step / (1 + gp.k * row->draft_cost);
        const double plain_step_s = (double)B / row->plain_tps, rounds = (double)DL_MAX(acc.rounds, 1);
        row->draft_steps = acc.draft_s / rounds / plain_step_s;
        row->verify_steps = acc.verify_s / rounds / plain_step_s;
        for (int i = 0; i < gp.k; i++) {
            row->acceptance[i] = (double)acc.accepted_at[i] / steps;
            row->acceptance_rate += (double)acc.accepted_at[i];
        }
        row->acceptance_rate /= steps * gp.k;
        for (int w = 0; w < W; w++) row->branch_won[w] = (double)acc.branch_won[w] / steps;
        row->same = gp.sp.greedy ? same : -1;
        row->sequences = nseq;
        if (c->progress) spec_eval_print_row(c->progress, row), fflush(c->progress);
    }
    return 0;
}

// A target and draft decoder pair for B sequences of W rows each (the draft with its trimmed head, if any).
static int decoder_pair(const SpecEvalConfig *c, int64_t rows, int64_t cap, GenDecoder *dt, GenDecoder *dd, DlError *e) {
    if (gen_decoder_new(c->target.hc, c->target.reg, c->target.params, rows, cap, c->cuda, c->graph, dt, e) ||
        gen_decoder_new(c->draft.hc, c->draft.reg, c->draft.params, rows, cap, c->cuda, c->graph, dd, e) ||
        (c->draft_head_n > 0 && gen_decoder_set_head_ids(*dd, c->draft_head_ids, c->draft_head_n, e)))
        return -1;
    return 0;
}

// One batch size: plain once per prompt (the reference outputs) and the draft's plain speed, then speculative
// for each branch count and K.
static int run_batch(const SpecEvalConfig *c, int64_t B, int64_t Lmax, const GenParams *gp0, SpecEvalRow *rows, DlError *e) {
    const int64_t T = c->max_tokens, nl = c->n_prompts, nbatches = (nl + B - 1) / B;
    int32_t *pr = dl_calloc((size_t)(B * Lmax), sizeof(int32_t)), *out = dl_malloc((size_t)(B * T) * sizeof(int32_t));
    int64_t *pl = dl_malloc((size_t)B * sizeof(int64_t)), *no = dl_malloc((size_t)B * sizeof(int64_t));
    int32_t *ref = dl_malloc((size_t)(nbatches * B * T) * sizeof(int32_t));  // plain outputs [nbatches * B, T]
    int64_t *nref = dl_malloc((size_t)(nbatches * B) * sizeof(int64_t));
    GenDecoder dt = {0}, dd = {0};
    GenParams gp = *gp0;
    Rng rng;
    int rc = -1;
    const int64_t cap = spec_max_len(Lmax, T, SPEC_EVAL_MAX_K);
    const int one = 1, nw = c->nw > 0 ? c->nw : 1;
    const int *ws = c->nw > 0 ? c->branches : &one;
    if (decoder_pair(c, B, cap, &dt, &dd, e)) goto out;
    if (c->cuda) {  // warm-up: one short run of each, untimed
        GenParams wp = gp;
        wp.max_tokens = DL_MIN(T, 8), wp.k = c->ks[0];
        fill_batch(c, 0, B, Lmax, pr, pl);
        rng_init(&rng, 0, 0);
        if (gen_plain(dt, pr, pl, Lmax, &wp, &rng, out, no, e) || gen_plain(dd, pr, pl, Lmax, &wp, &rng, out, no, e) ||
            gen_speculative(dt, dd, pr, pl, Lmax, &wp, &rng, out, no, NULL, e))
            goto out;
    }
    double tps, draft_tps;  // the target's plain outputs kept as the reference; the draft alone: its cost per token
    if (plain_tps(c, dt, B, Lmax, &gp, pr, pl, out, no, ref, nref, &tps, e) ||
        plain_tps(c, dd, B, Lmax, &gp, pr, pl, out, no, NULL, NULL, &draft_tps, e))
        goto out;
    for (int wi = 0; wi < nw; wi++) {
        GenDecoder bt = dt, bd = dd;  // W > 1: a pair with W rows per sequence, for these rows only
        if (ws[wi] > 1 && decoder_pair(c, B * ws[wi], cap, &bt, &bd, e)) {
            gen_decoder_free(&bt), gen_decoder_free(&bd);
            goto out;
        }
        const int r = spec_rows(c, bt, bd, B, ws[wi], Lmax, &gp, ref, nref, tps, draft_tps, pr, pl, out, no,
                                rows + (int64_t)wi * c->nk, e);
        if (ws[wi] > 1) gen_decoder_free(&bt), gen_decoder_free(&bd);
        if (r) goto out;
    }
    rc = 0;
out:
    gen_decoder_free(&dt), gen_decoder_free(&dd);
    free(pr), free(out), free(pl), free(no), free(ref), free(nref);
    return rc;
}

int64_t spec_eval_n_rows(const SpecEvalConfig *c) { return (int64_t)c->nb * (c->nw > 0 ? c->nw : 1) * c->nk; }

int spec_eval_run(const SpecEvalConfig *c, SpecEvalRow *rows, DlError *e) {
    if (c->n_prompts < 1 || !c->prompts || !c->plen) return dl_fail(e, "speculative eval: no prompts");
    if (c->nk < 1 || c->nb < 1) return dl_fail(e, "speculative eval: no K or batch size given");
    if (c->max_tokens < 1) return dl_fail(e, "speculative eval: max_tokens = %lld must be positive", (long long)c->max_tokens);
    for (int i = 0; i < c->nk; i++)
        if (c->ks[i] < 1 || c->ks[i] > SPEC_EVAL_MAX_K)
            return dl_fail(e, "speculative eval: K = %d outside 1..%d", c->ks[i], SPEC_EVAL_MAX_K);
    for (int i = 0; i < c->nb; i++)
        if (c->batches[i] < 1) return dl_fail(e, "speculative eval: batch size %d must be positive", c->batches[i]);
    for (int i = 0; i < c->nw; i++)
        if (c->branches[i] < 1 || c->branches[i] > SPEC_MAX_BRANCH || (c->branches[i] > 1 && c->temperature > 0))
            return dl_fail(e, "speculative eval: %d branches: expected 1..%d, and more than 1 only with greedy decoding",
                           c->branches[i], SPEC_MAX_BRANCH);
    if (c->draft.hc->base.vocab != c->target.hc->base.vocab)
        return dl_fail(e, "speculative eval: draft vocabulary %d != target vocabulary %d", c->draft.hc->base.vocab,
                       c->target.hc->base.vocab);
    int64_t Lmax = 1;
    for (int64_t i = 0; i < c->n_prompts; i++) {
        if (c->plen[i] < 1) return dl_fail(e, "speculative eval: prompt %lld is empty", (long long)i + 1);
        Lmax = DL_MAX(Lmax, c->plen[i]);
    }
    // no stop tokens: every run generates exactly max_tokens (comparable timings)
    GenParams gp = {.sp = {.greedy = c->temperature <= 0, .temperature = (float)c->temperature, .top_p = 1},
                    .max_tokens = c->max_tokens, .stop = {-1, -1}};
    const int64_t per_batch = (c->nw > 0 ? c->nw : 1) * c->nk;
    for (int bi = 0; bi < c->nb; bi++)
        if (run_batch(c, c->batches[bi], Lmax, &gp, rows + (int64_t)bi * per_batch, e)) return -1;
    return 0;
}

void spec_eval_print_header(FILE *f) {
    fprintf(f, "%5s %3s %3s %10s %10s %8s %8s %7s %7s %6s %6s %6s %6s  %s\n", "batch", "k", "W", "plain t/s", "spec t/s", "speedup",
            "tok/step", "accept", "same", "cost", "model", "draft", "verify", "acceptance per draft position");
}

void spec_eval_print_row(FILE *f, const SpecEvalRow *r) {
    char sm[48] = "-";
    if (r->same >= 0) snprintf(sm, sizeof sm, "%lld/%lld", (long long)r->same, (long long)r->sequences);
    fprintf(f, "%5lld %3d %3d %10.1f %10.1f %7.2fx %8.2f %7.3f %7s %6.3f %5.2fx %6.3f %6.3f ", (long long)r->batch, r->k,
            r->branches, r->plain_tps, r->spec_tps, r->speedup, r->tokens_per_step, r->acceptance_rate, sm, r->draft_cost,
            r->model_speedup, r->draft_steps, r->verify_steps);
    for (int i = 0; i < r->k; i++) fprintf(f, " %.2f", r->acceptance[i]);
    if (r->branches > 1) {
        fprintf(f, "  kept chain:");
        for (int w = 0; w < r->branches; w++) fprintf(f, " %.2f", r->branch_won[w]);
    }
    fputc('\n', f);
    for (int i = 0; i < r->n_div; i++) {
        const SpecDivergence *d = &r->div[i];
        fprintf(f, "      differs: prompt %lld, new token %lld: plain %d, speculative %d; fp32 reference: logit gap %.4g, "
                   "top-2 gap %.4g, max |logit| %.3g, argmax %d\n",
                (long long)d->prompt + 1, (long long)d->position, d->plain_token, d->spec_token, d->gap, d->top2_gap, d->max_abs,
                d->ref_token);
    }
}

// numbers rounded to 1/scale (as the old fprintf JSON wrote them: no 17-digit noise)
static double rounded(double x, double scale) { return (double)(int64_t)(x * scale + (x >= 0 ? 0.5 : -0.5)) / scale; }
static void add_num(cJSON *o, const char *key, double x, double scale) { cJSON_AddNumberToObject(o, key, rounded(x, scale)); }

cJSON *spec_eval_row_json(const SpecEvalRow *r) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "batch", (double)r->batch);
    cJSON_AddNumberToObject(o, "k", r->k);
    cJSON_AddNumberToObject(o, "branches", r->branches);
    if (r->branches > 1) {
        cJSON *bw = cJSON_AddArrayToObject(o, "kept_chain");
        for (int w = 0; w < r->branches; w++) cJSON_AddItemToArray(bw, cJSON_CreateNumber(rounded(r->branch_won[w], 1e4)));
    }
    add_num(o, "plain_tokens_per_s", r->plain_tps, 1e3);
    add_num(o, "spec_tokens_per_s", r->spec_tps, 1e3);
    add_num(o, "speedup", r->speedup, 1e4);
    add_num(o, "tokens_per_step", r->tokens_per_step, 1e4);
    add_num(o, "acceptance_rate", r->acceptance_rate, 1e4);
    add_num(o, "draft_tokens_per_s", r->draft_tps, 1e3);
    add_num(o, "draft_cost", r->draft_cost, 1e4);
    add_num(o, "model_speedup", r->model_speedup, 1e4);
    add_num(o, "round_draft_steps", r->draft_steps, 1e4);
    add_num(o, "round_verify_steps", r->verify_steps, 1e4);
    if (r->same >= 0) {
        cJSON_AddNumberToObject(o, "greedy_equal_sequences", (double)r->same);
        cJSON_AddNumberToObject(o, "sequences", (double)r->sequences);
    }
    if (r->n_div > 0) {
        cJSON *dv = cJSON_AddArrayToObject(o, "divergences");
        for (int i = 0; i < r->n_div; i++) {
            const SpecDivergence *d = &r->div[i];
            cJSON *x = cJSON_CreateObject();
            cJSON_AddNumberToObject(x, "prompt", (double)d->prompt);
            cJSON_AddNumberToObject(x, "position", (double)d->position);
            cJSON_AddNumberToObject(x, "plain_token", d->plain_token);
            cJSON_AddNumberToObject(x, "spec_token", d->spec_token);
            cJSON_AddNumberToObject(x, "ref_token", d->ref_token);
            cJSON_AddNumberToObject(x, "ref_logit_gap", d->gap);
            cJSON_AddNumberToObject(x, "ref_top2_gap", d->top2_gap);
            cJSON_AddNumberToObject(x, "ref_max_abs_logit", d->max_abs);
            cJSON_AddItemToArray(dv, x);
        }
    }
    cJSON *a = cJSON_AddArrayToObject(o, "acceptance");
    for (int i = 0; i < r->k; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(rounded(r->acceptance[i], 1e4)));
    return o;
}
