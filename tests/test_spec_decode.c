// test_spec_decode.c: speculative decoding on tiny random models.
//  * greedy speculative output == plain greedy output, token for token, for a teacher target (draft: a 1-layer
//    cut of it) and a Mamba-1 / Mamba-2 hybrid target (draft: a separate tiny model), K = 1, 2, 3, 5, batches
//    of prompts of different lengths; and the target as its own draft (every proposal accepted);
//  * sampled speculative output has the target's distribution: the joint distribution of the first two
//    tokens over 6000 sequences (one batch, fixed seed: deterministic) against the exact target probabilities,
//    Pearson chi-square (cells expecting < 5 pooled) below df + 6 sd; the same samples against the draft's distribution must fail
//    (the test can detect a wrong distribution);
//  * speculative branches (GenParams.branches W = 2, 3, 4; decoders of W rows per sequence): greedy output still
//    equals plain; sample_rank against a sorted reference; decoder_accept_from leaves each row in the state of a
//    decoder fed its source's kept tokens plainly (Mamba-1, Mamba-2, attention), and refuses bad sources;
//  * a draft whose head is trimmed to a subset of ids (decoder_set_head_ids): its logits at the subset equal the full
//    head's, -inf elsewhere; greedy output still equals plain, and sampled output still has the target's distribution.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/engine.h"
#include "distill/spec_decode.h"
#include "tests/check.h"

#define CHECK_MSG(cond, msg)                                        \
    do {                                                            \
        if (cond) check_pass_++;                                    \
        else check_fail_++, fprintf(stderr, "FAILED: %s\n", msg);  \
    } while (0)

static Rng rng;

typedef struct {
    HybridConfig h;
    Registry r;
    float *p;
} Model;

static void model_make(Model *m, int mixer, int n_layer, int vocab, double scale) {
    LlamaConfig c = {0};
    c.n_layer = n_layer, c.d_model = 32, c.n_head = 4, c.n_kv_head = 2, c.head_dim = 8, c.d_ff = 48;
    c.vocab = vocab, c.max_pos = 4096, c.rope_theta = 10000, c.rms_eps = 1e-5, c.bos_id = c.eos_id = -1;
    c.tied_embeddings = true;
    DlError e;
    int attn[1] = {1};
    if (mixer == MIXER_ATTN) hybrid_config_teacher(&m->h, &c);
    else CHECK(hybrid_config_init(&m->h, &c, (MixerKind)mixer, attn, 1, &e) == 0);
    model_build_registry(&m->h, &m->r);
    m->p = calloc((size_t)m->r.numel, sizeof(float));
    for (int i = 0; i < m->r.n; i++) {
        TensorInfo *t = &m->r.t[i];
        for (int64_t k = 0; k < t->numel; k++) {
            double z = rng_normal(&rng);
            float *x = m->p + t->offset + k;
            if (strstr(t->name, "norm") || strstr(t->name, ".D")) *x = 1.0f;
            else if (strstr(t->name, "A_log")) *x = (float)log((double)(k % m->h.d_state + 1));
            else *x = (float)(scale * z);
        }
    }
}

static void model_drop(Model *m) {
    free(m->p);
    reg_free(&m->r);
}

// The same logit from GEMMs of different widths: BLAS kernels may round a dot product differently (the GPU's
// decode_gemm does not: gpu_test_decode checks it bitwise).
static bool near(float a, float b) { return fabsf(a - b) <= 1e-5f * fmaxf(1.0f, fabsf(b)); }

// greedy: speculative == plain for several K and a ragged batch of prompts; hn > 0: the draft's head trimmed to hid;
// W > 1: that many branches per sequence (self_draft: the draft is the target, so chain 0 is always kept)
static void test_greedy_hw(Model *tg, Model *dr, const int32_t *hid, int64_t hn, int W, bool self_draft, const char *what) {
    DlError e;
    enum { BG = 3, LM = 6, NT = 24 };
    const int64_t plen[BG] = {6, 2, 4};
    int32_t pr[BG * LM];
    for (int i = 0; i < BG * LM; i++) pr[i] = (int32_t)rng_below(&rng, (uint64_t)tg->h.base.vocab);
    GenParams gp = {.k = 1, .sp = {.greedy = true}, .max_tokens = NT, .stop = {-1, -1}, .branches = W};
    int32_t ref[BG * NT], got[BG * NT];
    int64_t nref[BG], ngot[BG];
    const int ks[] = {1, 2, 3, 5};
    for (size_t ki = 0; ki < 4; ki++) {
        gp.k = ks[ki];
        int64_t ml = spec_max_len(LM, NT, gp.k);
        Decoder *T = decoder_new(&tg->h, &tg->r, tg->p, BG * W, ml, &e), *D = decoder_new(&dr->h, &dr->r, dr->p, BG * W, ml, &e);
        Decoder *P = decoder_new(&tg->h, &tg->r, tg->p, BG, ml, &e);  // plain: one row per sequence
        if (hn) CHECK(decoder_set_head_ids(D, hid, hn, &e) == 0);
        Rng r1, r2;
        rng_init(&r1, 1, 0), rng_init(&r2, 1, 0);
        CHECK(gen_plain(gen_cpu(P), pr, plen, LM, &gp, &r1, ref, nref, &e) == 0);
        SpecStats st;
        for (int i = 0; i < BG * NT; i++) got[i] = -7;  // poisoned
        CHECK(gen_speculative(gen_cpu(T), gen_cpu(D), pr, plen, LM, &gp, &r2, got, ngot, &st, &e) == 0);
        bool same = true;
        for (int b = 0; b < BG; b++) same = same && nref[b] == NT && ngot[b] == NT;
        same = same && memcmp(ref, got, sizeof ref) == 0;
        char buf[128];
        snprintf(buf, sizeof buf, "%s: greedy speculative == plain (k=%d, %d branches)", what, gp.k, W);
        CHECK_MSG(same, buf);
        int64_t won = 0;
        for (int w = 0; w < SPEC_MAX_BRANCH; w++) won += st.branch_won[w];
        CHECK(won == st.steps && (W > 1 || st.branch_won[0] == st.steps) && (!self_draft || st.branch_won[0] == st.steps));
        // one round per verification feed; each of the BG sequences is counted in steps until it is done
        CHECK(st.rounds == st.target_feeds - 1 && st.rounds >= (st.steps + BG - 1) / BG && st.rounds <= st.steps);
        CHECK(st.draft_s > 0 && st.verify_s > 0);
        printf("%s k=%d: %lld steps, %.2f tokens/step, accepted at pos0 %.2f\n", what, gp.k, (long long)st.steps,
               (double)st.emitted / (double)st.steps, (double)st.accepted_at[0] / (double)st.steps);
        if (W > 1)
            printf("%s k=%d: kept chain %.2f %.2f%s\n", what, gp.k, (double)st.branch_won[0] / (double)st.steps,
                   (double)st.branch_won[1] / (double)st.steps, W > 2 ? " .." : "");
        decoder_free(T), decoder_free(D), decoder_free(P);
    }
}

static void test_greedy_h(Model *tg, Model *dr, const int32_t *hid, int64_t hn, const char *what) {
    test_greedy_hw(tg, dr, hid, hn, 1, tg == dr, what);
}
static void test_greedy(Model *tg, Model *dr, const char *what) { test_greedy_h(tg, dr, NULL, 0, what); }

// sample_rank against a stable sort of (value descending with NaN as -inf, id ascending), rows with ties, -inf, NaN
static int rank_cmp_v(const void *a, const void *b, const float *x) {
    const int i = *(const int *)a, j = *(const int *)b;
    float u = x[i], v = x[j];
    if (u != u) u = -INFINITY;
    if (v != v) v = -INFINITY;
    if (u != v) return u > v ? -1 : 1;
    return i < j ? -1 : 1;
}
static const float *rank_x;
static int rank_cmp(const void *a, const void *b) { return rank_cmp_v(a, b, rank_x); }

static void test_rank(void) {
    enum { V = 37 };
    float x[V];
    int idx[V], bad = 0, n = 0;
    for (int trial = 0; trial < 200; trial++) {
        for (int i = 0; i < V; i++) {
            const uint64_t k = rng_below(&rng, 10);
            x[i] = k == 0 ? -INFINITY : k == 1 ? NAN : k < 5 ? (float)rng_below(&rng, 3) : (float)rng_normal(&rng);
            idx[i] = i;
        }
        rank_x = x;
        qsort(idx, V, sizeof idx[0], rank_cmp);
        for (int r = 0; r < 8; r++, n++) bad += sample_rank(x, V, r) != idx[r];
    }
    char buf[96];
    snprintf(buf, sizeof buf, "sample_rank = sorted order at ranks 0..7 (%d of %d differ)", bad, n);
    CHECK_MSG(bad == 0, buf);
    CHECK(sample_rank(x, V, 0) == sample_argmax(x, V) || x[sample_argmax(x, V)] != x[sample_argmax(x, V)]);
}

// decoder_accept_from: R rows share a prefix, then a window with a different continuation per row; afterwards row b
// must be in the state of its source's kept prefix: its next logits equal a reference decoder fed those tokens
// plainly. Bad sources are refused.
static void test_accept_from(Model *m, const char *what) {
    DlError e;
    enum { R = 4, LP = 3, LW = 4 };
    const int64_t V = m->h.base.vocab;
    Decoder *D = decoder_new(&m->h, &m->r, m->p, R, 32, &e), *Q = decoder_new(&m->h, &m->r, m->p, 1, 32, &e);
    int32_t pre[R * LP], win[R * LW], nxt[R];
    for (int i = 0; i < LP; i++) pre[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int b = 1; b < R; b++) memcpy(pre + b * LP, pre, sizeof(int32_t) * LP);
    for (int i = 0; i < R * LW; i++) win[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    for (int b = 0; b < R; b++) nxt[b] = (int32_t)rng_below(&rng, (uint64_t)V);
    const int32_t src[R] = {2, 1, 2, 1}, keep[R] = {0, 3, 2, 4};  // rows 0, 2 continue from 2 (2 kept), 1, 3 from 1 (3)
    float *lg = malloc(sizeof(float) * R * V), *lq = malloc(sizeof(float) * V);
    CHECK(decoder_feed(D, pre, LP, NULL, NULL, &e) == 0);
    decoder_window_begin(D);
    int32_t w1[R * 2], w2[R * 2];  // the window in two feeds of 2 columns
    for (int b = 0; b < R; b++)
        w1[b * 2] = win[b * LW], w1[b * 2 + 1] = win[b * LW + 1], w2[b * 2] = win[b * LW + 2], w2[b * 2 + 1] = win[b * LW + 3];
    CHECK(decoder_feed(D, w1, 2, NULL, NULL, &e) == 0);
    CHECK(decoder_feed(D, w2, 2, NULL, NULL, &e) == 0);
    const int32_t chain_src[R] = {1, 2, 2, 3};  // 0 takes 1, which takes 2: refused
    CHECK(decoder_accept_from(D, keep, chain_src, &e) != 0);
    CHECK(decoder_accept_from(D, keep, src, &e) == 0);
    for (int i = 0; i < R * (int)V; i++) lg[i] = NAN;  // poisoned
    CHECK(decoder_feed(D, nxt, 1, lg, NULL, &e) == 0);
    int bad = 0;
    for (int b = 0; b < R; b++) {
        int32_t tok[LP + LW + 1];
        const int kp = keep[src[b]];
        memcpy(tok, pre, sizeof(int32_t) * LP);
        memcpy(tok + LP, win + src[b] * LW, sizeof(int32_t) * (size_t)kp);
        tok[LP + kp] = nxt[b];
        decoder_reset(Q);
        for (int64_t v = 0; v < V; v++) lq[v] = NAN;
        CHECK(decoder_feed(Q, tok, LP + kp + 1, lq, NULL, &e) == 0);
        CHECK(decoder_seq_len(D, b) == LP + kp + 1);
        for (int64_t v = 0; v < V; v++) bad += !near(lg[b * V + v], lq[v]);
    }
    char buf[160];
    snprintf(buf, sizeof buf, "%s: decoder_accept_from = plain feed of the source's kept tokens (%d of %lld logits differ)", what,
             bad, (long long)(R * V));
    CHECK_MSG(bad == 0, buf);
    // rows that began the window at different lengths cannot share one
    decoder_reset(D);
    const int64_t n2[R] = {3, 2, 3, 3};
    CHECK(decoder_feed_ragged(D, pre, LP, n2, NULL, NULL, &e) == 0);
    decoder_window_begin(D);
    CHECK(decoder_feed(D, nxt, 1, NULL, NULL, &e) == 0);
    const int32_t k1[R] = {1, 1, 1, 1}, s1[R] = {0, 0, 2, 3};
    CHECK(decoder_accept_from(D, k1, s1, &e) != 0);
    CHECK(strstr(e.msg, "same length") != NULL);
    free(lg), free(lq);
    decoder_free(D), decoder_free(Q);
}


// A trimmed head (decoder_set_head_ids): the kept ids' logits equal the full head's (last-token and all-token
// logits, a prefill, a step, a window and its accept), every other logit is -inf; bad subsets are refused with
// the decoder unchanged; n = 0 restores the full head.
static void test_head_ids(Model *m, const char *what) {
    DlError e;
    const int64_t V = m->h.base.vocab, B = 2, L = 5;
    const int32_t hid[] = {17, 3, 0, 28, 9, 11, 4};  // any order
    const int64_t hn = 7;
    bool kept[64] = {false};
    for (int64_t j = 0; j < hn; j++) kept[hid[j]] = true;
    Decoder *F = decoder_new(&m->h, &m->r, m->p, B, 16, &e), *H = decoder_new(&m->h, &m->r, m->p, B, 16, &e);
    CHECK(decoder_set_head_ids(H, hid, hn, &e) == 0);
    int32_t tok[B * L];
    for (int i = 0; i < B * L; i++) tok[i] = (int32_t)rng_below(&rng, (uint64_t)V);
    float *lf = malloc(sizeof(float) * B * L * V), *lh = malloc(sizeof(float) * B * L * V);
    float *af = malloc(sizeof(float) * B * L * V), *ah = malloc(sizeof(float) * B * L * V);
    int bad = 0, checked = 0;
    for (int round = 0; round < 3; round++) {  // prefill of L; a 1-token step; a window of 3 then accept 1, a step
        const int64_t n = round == 0 ? L : round == 1 ? 1 : 3;
        for (int i = 0; i < B * L; i++) lf[i] = lh[i] = af[i] = ah[i] = NAN;  // poisoned
        if (round == 2) decoder_window_begin(F), decoder_window_begin(H);
        CHECK(decoder_feed(F, tok, n, lf, af, &e) == 0 && decoder_feed(H, tok, n, lh, ah, &e) == 0);
        for (int64_t r = 0; r < B * n; r++)
            for (int64_t v = 0; v < V; v++) {
                const int64_t i = r * V + v;
                checked++;
                if (kept[v] ? !(near(ah[i], af[i]) && (r >= B || near(lh[i], lf[i])))
                            : (ah[i] != -INFINITY || (r < B && lh[i] != -INFINITY)))
                    bad++;
            }
        if (round == 2) {
            const int32_t keep[2] = {1, 3};
            CHECK(decoder_accept(F, keep, &e) == 0 && decoder_accept(H, keep, &e) == 0);
        }
    }
    char buf[160];
    snprintf(buf, sizeof buf, "%s: trimmed head = full head (1e-5) at the %lld kept ids, -inf elsewhere (%d of %d differ)", what,
             (long long)hn, bad, checked);
    CHECK_MSG(bad == 0, buf);
    // refused: a repeated id, an id out of range, an empty or too large subset; the decoder keeps its subset
    const int32_t dup[] = {1, 2, 1}, oor[] = {1, (int32_t)V};
    CHECK(decoder_set_head_ids(H, dup, 3, &e) != 0 && strstr(e.msg, "more than once"));
    CHECK(decoder_set_head_ids(H, oor, 2, &e) != 0 && strstr(e.msg, "outside the vocabulary"));
    CHECK(decoder_set_head_ids(H, hid, V + 1, &e) != 0);
    CHECK(decoder_feed(F, tok, 1, lf, NULL, &e) == 0 && decoder_feed(H, tok, 1, lh, NULL, &e) == 0);
    bad = 0;
    for (int64_t i = 0; i < B * V; i++) bad += kept[i % V] ? !near(lh[i], lf[i]) : lh[i] != -INFINITY;
    CHECK_MSG(bad == 0, "trimmed head kept after refused subsets");
    CHECK(decoder_set_head_ids(H, NULL, 0, &e) == 0);  // the full head again
    CHECK(decoder_feed(F, tok, 1, lf, NULL, &e) == 0 && decoder_feed(H, tok, 1, lh, NULL, &e) == 0);
    CHECK_MSG(memcmp(lf, lh, sizeof(float) * B * V) == 0, "n = 0 restores the full head");
    decoder_free(F), decoder_free(H);
    free(lf), free(lh), free(af), free(ah);
}

// exact probabilities of the first two sampled tokens after prompt: joint [V, V] (hn > 0: a trimmed head)
static void exact_joint_h(Model *m, const int32_t *hid, int64_t hn, const int32_t *prompt, int64_t L, const SampleParams *sp,
                          double *joint) {
    DlError e;
    const int64_t V = m->h.base.vocab;
    Decoder *D = decoder_new(&m->h, &m->r, m->p, 1, L + 2, &e);
    if (hn) CHECK(decoder_set_head_ids(D, hid, hn, &e) == 0);
    float *lg = malloc((size_t)V * sizeof(float));
    double *p1 = malloc((size_t)V * sizeof(double)), *p2 = malloc((size_t)V * sizeof(double));
    decoder_feed(D, prompt, L, lg, NULL, &e);
    sample_probs(lg, V, sp, p1);
    for (int32_t a = 0; a < V; a++) {
        decoder_reset(D);
        decoder_feed(D, prompt, L, NULL, NULL, &e);
        decoder_feed(D, &a, 1, lg, NULL, &e);
        sample_probs(lg, V, sp, p2);
        for (int64_t c = 0; c < V; c++) joint[a * V + c] = p1[a] * p2[c];
    }
    decoder_free(D);
    free(lg), free(p1), free(p2);
}
static void exact_joint(Model *m, const int32_t *prompt, int64_t L, const SampleParams *sp, double *joint) {
    exact_joint_h(m, NULL, 0, prompt, L, sp, joint);
}

// Pearson chi-square; cells expecting fewer than 5 samples are pooled into one (the usual validity rule).
// *df gets the degrees of freedom (cells used - 1).
static double chi2(const int64_t *count, const double *prob, int64_t cells, int64_t n, int *df) {
    double x = 0, pool_ex = 0;
    int64_t pool_n = 0;
    int used = 0;
    for (int64_t i = 0; i < cells; i++) {
        double ex = prob[i] * (double)n;
        if (ex < 5) {
            pool_ex += ex, pool_n += count[i];
            continue;
        }
        x += (count[i] - ex) * (count[i] - ex) / ex, used++;
    }
    if (pool_ex > 0) x += (pool_n - pool_ex) * (pool_n - pool_ex) / pool_ex, used++;
    else if (pool_n) x += 1e30;
    *df = used - 1;
    return x;
}

// hn > 0: the draft's head is trimmed to its first hn ids {7, 2, 5, 0, 3} (q = 0 outside them)
static void test_distribution_h(int mixer, int k, bool cut, int64_t hn, const char *what) {
    static const int32_t hid[] = {7, 2, 5, 0, 3};
    DlError e;
    enum { V = 8, NS = 6000, LP = 3 };
    Model tg, dr;
    model_make(&tg, mixer, 3, V, 0.5);
    if (cut) {  // a 2-layer cut of the target: frequent acceptances of several tokens
        int ls[2] = {0, 2};
        CHECK(spec_draft_from_layers(&tg.h, &tg.r, tg.p, ls, 2, &dr.h, &dr.r, &dr.p, &e) == 0);
    } else {
        model_make(&dr, MIXER_ATTN, 1, V, 0.5);  // an unrelated draft: many rejections exercise the residual
    }
    int32_t prompt[LP] = {1, 5, 2}, *pr = malloc(sizeof(int32_t) * NS * LP);
    int64_t *plen = malloc(sizeof(int64_t) * NS), *nout = malloc(sizeof(int64_t) * NS);
    for (int i = 0; i < NS; i++) memcpy(pr + i * LP, prompt, sizeof prompt), plen[i] = LP;
    GenParams gp = {.k = k, .sp = {.greedy = false, .temperature = 1.0f, .top_p = 1.0f}, .max_tokens = 2, .stop = {-1, -1}};
    int64_t ml = spec_max_len(LP, 2, k);
    Decoder *T = decoder_new(&tg.h, &tg.r, tg.p, NS, ml, &e), *D = decoder_new(&dr.h, &dr.r, dr.p, NS, ml, &e);
    if (hn) CHECK(decoder_set_head_ids(D, hid, hn, &e) == 0);
    int32_t *out = malloc(sizeof(int32_t) * NS * 2);
    Rng r;
    rng_init(&r, 777, 0);
    SpecStats st;
    CHECK(gen_speculative(gen_cpu(T), gen_cpu(D), pr, plen, LP, &gp, &r, out, nout, &st, &e) == 0);
    int64_t count[V * V] = {0};
    for (int i = 0; i < NS; i++) count[out[i * 2] * V + out[i * 2 + 1]]++;
    double pt[V * V], pd[V * V];
    exact_joint(&tg, prompt, LP, &gp.sp, pt);
    exact_joint_h(&dr, hid, hn, prompt, LP, &gp.sp, pd);
    int df, dfd;
    double xt = chi2(count, pt, V * V, NS, &df), xd = chi2(count, pd, V * V, NS, &dfd);
    // bound: df + 6 sd (sd = sqrt(2 df)), p < 1e-6 for these df (fixed seed: the samples never change)
    const double bound = df + 6 * sqrt(2.0 * df);
    char buf[128];
    snprintf(buf, sizeof buf, "%s k=%d: sampled speculative output ~ target (chi2 %.1f, df %d)", what, k, xt, df);
    CHECK_MSG(xt < bound, buf);
    snprintf(buf, sizeof buf, "%s k=%d: the same samples reject the draft's distribution (chi2 %.1f)", what, k, xd);
    if (!cut) CHECK_MSG(xd > 4 * bound, buf);  // (a cut may be close to the target)
    printf("%s k=%d: chi2 vs target %.1f (df %d, bound %.1f), vs draft %.1f, acceptance at pos0 %.2f\n", what, k, xt, df, bound, xd,
           (double)st.accepted_at[0] / (double)st.steps);
    decoder_free(T), decoder_free(D);
    free(pr), free(plen), free(nout), free(out);
    model_drop(&tg), model_drop(&dr);
}
static void test_distribution(int mixer, int k, bool cut, const char *what) { test_distribution_h(mixer, k, cut, 0, what); }

int main(void) {
    rng_init(&rng, 3, 0);
    Model teacher, cut, hyb1, hyb2, small;
    DlError e;
    model_make(&teacher, MIXER_ATTN, 3, 29, 0.3);
    int layers[1] = {0};
    CHECK(spec_draft_from_layers(&teacher.h, &teacher.r, teacher.p, layers, 1, &cut.h, &cut.r, &cut.p, &e) == 0);
    int bad[1] = {7};
    Model tmp;
    CHECK(spec_draft_from_layers(&teacher.h, &teacher.r, teacher.p, bad, 1, &tmp.h, &tmp.r, &tmp.p, &e) != 0);
    test_greedy(&teacher, &cut, "teacher target, 1-layer cut draft");
    model_make(&hyb1, MIXER_MAMBA1, 3, 29, 0.3);
    model_make(&hyb2, MIXER_MAMBA2, 3, 29, 0.3);
    model_make(&small, MIXER_ATTN, 1, 29, 0.3);
    test_greedy(&hyb1, &small, "mamba1 hybrid target");
    test_greedy(&hyb2, &cut, "mamba2 hybrid target");
    test_greedy(&hyb1, &hyb1, "mamba1 hybrid, itself as draft");  // all accepted: bonus tokens, 2 pending
    // speculative branches
    test_rank();
    test_accept_from(&hyb1, "mamba1 hybrid");
    test_accept_from(&hyb2, "mamba2 hybrid");
    test_accept_from(&teacher, "teacher");
    for (int W = 2; W <= 4; W++) {
        test_greedy_hw(&hyb1, &small, NULL, 0, W, false, "mamba1 hybrid target, branches");
        test_greedy_hw(&hyb2, &cut, NULL, 0, W, false, "mamba2 hybrid target, branches");
    }
    test_greedy_hw(&teacher, &cut, NULL, 0, 3, false, "teacher target, branches");
    test_greedy_hw(&hyb1, &hyb1, NULL, 0, 2, true, "mamba1 hybrid, itself as draft, branches");
    {
        const int32_t hid2[] = {3, 0, 11, 28, 17, 5, 22, 9, 14, 1, 26, 7};
        test_greedy_hw(&hyb1, &cut, hid2, 12, 4, false, "mamba1 hybrid target, trimmed cut draft, branches");
    }
    {  // sampled decoding with branches is refused
        Decoder *T = decoder_new(&hyb1.h, &hyb1.r, hyb1.p, 4, 64, &e), *D = decoder_new(&small.h, &small.r, small.p, 4, 64, &e);
        GenParams gp = {.k = 2, .sp = {.greedy = false, .temperature = 1, .top_p = 1}, .max_tokens = 4, .stop = {-1, -1}, .branches = 2};
        const int32_t pr[2] = {1, 2};
        const int64_t pl[2] = {1, 1};
        int32_t out[8];
        int64_t no[2];
        Rng r;
        rng_init(&r, 0, 0);
        CHECK(gen_speculative(gen_cpu(T), gen_cpu(D), pr, pl, 1, &gp, &r, out, no, NULL, &e) != 0);
        CHECK(strstr(e.msg, "greedy") != NULL);
        gp.sp.greedy = true, gp.branches = 3;  // 4 rows are not 3 per sequence
        CHECK(gen_speculative(gen_cpu(T), gen_cpu(D), pr, pl, 1, &gp, &r, out, no, NULL, &e) != 0);
        decoder_free(T), decoder_free(D);
    }
    test_distribution(MIXER_ATTN, 3, false, "teacher target");
    test_distribution(MIXER_MAMBA2, 2, false, "mamba2 hybrid target");
    test_distribution(MIXER_MAMBA1, 4, true, "mamba1 hybrid target, cut draft");
    // a draft with a trimmed head: proposals only from its subset, the output still exactly the target's
    test_head_ids(&teacher, "teacher");
    test_head_ids(&hyb1, "mamba1 hybrid");
    const int32_t hid[] = {3, 0, 11, 28, 17, 5, 22, 9, 14, 1, 26, 7};
    test_greedy_h(&hyb1, &cut, hid, 12, "mamba1 hybrid target, cut draft with 12 of 29 head rows");
    test_greedy_h(&teacher, &teacher, hid, 12, "teacher, itself with 12 of 29 head rows as draft");
    test_distribution_h(MIXER_MAMBA1, 3, true, 5, "mamba1 hybrid target, cut draft with 5 of 8 head rows");
    test_distribution_h(MIXER_ATTN, 2, false, 5, "teacher target, unrelated draft with 5 of 8 head rows");
    model_drop(&teacher), model_drop(&cut), model_drop(&hyb1), model_drop(&hyb2), model_drop(&small);
    return check_report("test_spec_decode");
}
