// spec_decode.c: see spec_decode.h.
#include "distill/spec_decode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/common.h"
#ifdef DISTILL_CUDA
#include "kernels/engine/decode_cuda.h"
#endif

int64_t spec_max_len(int64_t Lmax, int64_t max_tokens, int k) {
    // a step grows a sequence by at most k + 1 (draft: k + 1 with two pending tokens); finished sequences
    // keep stepping until the whole batch is done, at most max_tokens steps
    return Lmax + (int64_t)(k + 2) * (max_tokens + 1) + 4;
}

// ---- the two devices behind one interface (GenDecoder)

int gen_decoder_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t max_len,
                    int cuda, int graph, GenDecoder *g, DlError *e) {
    g->cpu = NULL, g->cuda = NULL;
    if (!cuda) {
        (void)graph;
        return (g->cpu = decoder_new(h, r, params, B, max_len, e)) ? 0 : -1;
    }
#ifdef DISTILL_CUDA
    if (!(g->cuda = decoder_cuda_new(h, r, params, B, max_len, NULL, e))) return -1;
    decoder_cuda_use_graph(g->cuda, graph);
    return decoder_cuda_reset(g->cuda, B, e);
#else
    return dl_fail(e, "this distill was built without CUDA: decode on the CPU");
#endif
}

int gen_decoder_set_head_ids(GenDecoder g, const int32_t *ids, int64_t n, DlError *e) {
    if (g.cpu) return decoder_set_head_ids(g.cpu, ids, n, e);
#ifdef DISTILL_CUDA
    return decoder_cuda_set_head_ids(g.cuda, ids, n, e);
#else
    return dl_fail(e, "this distill was built without CUDA");
#endif
}

void gen_decoder_free(GenDecoder *g) {
    if (g->cpu) decoder_free(g->cpu);
#ifdef DISTILL_CUDA
    if (g->cuda) decoder_cuda_free(g->cuda);
#endif
    g->cpu = NULL, g->cuda = NULL;
}

#ifdef DISTILL_CUDA
#define ON_GPU(g, cuda_expr, cpu_expr) ((g).cuda ? (cuda_expr) : (cpu_expr))
#else
#define ON_GPU(g, cuda_expr, cpu_expr) (cpu_expr)
#endif

static int64_t gd_batch(GenDecoder g) { return ON_GPU(g, decoder_cuda_batch(g.cuda), decoder_batch(g.cpu)); }
static int64_t gd_vocab(GenDecoder g) { return ON_GPU(g, decoder_cuda_vocab(g.cuda), decoder_vocab(g.cpu)); }

static int gd_reset(GenDecoder g, DlError *e) {
    return ON_GPU(g, decoder_cuda_reset(g.cuda, decoder_cuda_batch(g.cuda), e), (decoder_reset(g.cpu), 0));
}

// Feeds tokens [B, L] (n: ragged counts or NULL). The logits of each sequence's last token ([B, V]; all: of every
// token, [B, L, V]) stay with the decoder until gd_logits / gd_argmax; host is where they go on the host (the CPU
// decoder writes there at once; NULL: not needed).
static int gd_feed(GenDecoder g, const int32_t *tok, int64_t L, const int64_t *n, bool all, float *host, DlError *e) {
    return ON_GPU(g, decoder_cuda_feed(g.cuda, tok, L, n, all, e),
                  decoder_feed_ragged(g.cpu, tok, L, n, all ? NULL : host, all ? host : NULL, e));
}

// The last feed's logits rows on the host (the CPU decoder already put them there).
static void gd_logits(GenDecoder g, float *host) {
#ifdef DISTILL_CUDA
    if (g.cuda) decoder_cuda_logits_host(g.cuda, host);
#endif
    (void)g, (void)host;
}

// Argmax of each of the last feed's `rows` logits rows (lowest id on ties).
static int gd_argmax(GenDecoder g, const float *host, int64_t rows, int32_t *out, DlError *e) {
#ifdef DISTILL_CUDA
    if (g.cuda) return decoder_cuda_argmax(g.cuda, out, e);
#endif
    const int64_t V = gd_vocab(g);
    for (int64_t r = 0; r < rows; r++) out[r] = sample_argmax(host + r * V, V);
    (void)e;
    return 0;
}

static void gd_window_begin(GenDecoder g) {
#ifdef DISTILL_CUDA
    if (g.cuda) {
        decoder_cuda_window_begin(g.cuda);
        return;
    }
#endif
    decoder_window_begin(g.cpu);
}

// decoder_accept_from: src NULL keeps each sequence's own window
static int gd_accept(GenDecoder g, const int32_t *keep, const int32_t *src, DlError *e) {
    return ON_GPU(g, decoder_cuda_accept_from(g.cuda, keep, src, e), decoder_accept_from(g.cpu, keep, src, e));
}

static int gd_seek(GenDecoder g, int64_t len, DlError *e) {
    return ON_GPU(g, decoder_cuda_seek(g.cuda, len, e), decoder_seek(g.cpu, len, e));
}

// One token per row of the last feed's logits (rows of host [rows, V]): the argmax when greedy, else a draw
// from sample_probs (probs [V] scratch; q [rows, V] optional: keeps each row's distribution).
static int gd_pick(GenDecoder g, float *host, int64_t rows, const SampleParams *sp, Rng *rng, double *probs, double *q,
                   int32_t *out, DlError *e) {
    if (sp->greedy) return gd_argmax(g, host, rows, out, e);
    const int64_t V = gd_vocab(g);
    gd_logits(g, host);
    for (int64_t r = 0; r < rows; r++) {
        double *p = q ? q + r * V : probs;
        sample_probs(host + r * V, V, sp, p);
        out[r] = sample_from_probs(p, V, rng_uniform_f64(rng));
    }
    return 0;
}

// n greedy picks per sequence into out [B, n]: pick i is the argmax of the current logits (host lg on the CPU), fed
// back as a one-token step unless it is the last and !feed_last; with W > 1 branches the first pick of row b is the
// rank-(b % W) id (sample_rank). On the GPU one launch and one host round trip (decoder_cuda_branch_chain); col [B]
// is scratch.
static int gd_greedy_chain(GenDecoder g, float *lg, int W, int n, bool feed_last, int32_t *col, int32_t *out, DlError *e) {
#ifdef DISTILL_CUDA
    if (g.cuda) return decoder_cuda_branch_chain(g.cuda, W, n, feed_last, out, e);
#endif
    const int64_t B = gd_batch(g), V = gd_vocab(g);
    for (int i = 0; i < n; i++) {
        if (i == 0 && W > 1) {
            for (int64_t b = 0; b < B; b++) col[b] = sample_rank(lg + b * V, V, (int)(b % W));
        } else if (gd_argmax(g, lg, B, col, e)) {
            return -1;
        }
        for (int64_t b = 0; b < B; b++) out[b * n + i] = col[b];
        if ((i + 1 < n || feed_last) && gd_feed(g, col, 1, NULL, false, lg, e)) return -1;
    }
    return 0;
}

// Greedy rounds with both decoders on the GPU keep the draft's picks there: the target's verification feed copies
// them in (decoder_cuda_feed_picks) and they reach the host with the target's picks, one host synchronization per
// round instead of two. DISTILL_SPEC_HOST=1 takes them through the host (the previous path; the same tokens), for
// A/B timing.
static bool picks_on_device(GenDecoder T, GenDecoder Dr) {
#ifdef DISTILL_CUDA
    const char *v = getenv("DISTILL_SPEC_HOST");
    return T.cuda && Dr.cuda && !(v && !strcmp(v, "1"));
#else
    (void)T, (void)Dr;
    return false;
#endif
}

// The draft's K greedy picks (d1..d_{K-1} fed; W branches: gd_greedy_chain), left on the device (picks_on_device only).
static int gd_chain_on_device(GenDecoder Dr, int W, int K, DlError *e) {
#ifdef DISTILL_CUDA
    if (Dr.cuda) return decoder_cuda_branch_chain(Dr.cuda, W, K, 0, NULL, e);
#endif
    (void)Dr, (void)W, (void)K;
    return dl_fail(e, "speculative: device picks need a GPU draft");
}

// Verifies [t0, the draft's device picks] with all logits: ver [B, K+1] gets the fed tokens, am [B, K+1] the
// target's argmax per position (picks_on_device only).
static int gd_verify_device_picks(GenDecoder T, GenDecoder Dr, const int32_t *t0, int32_t *ver, int32_t *am, DlError *e) {
#ifdef DISTILL_CUDA
    if (T.cuda && Dr.cuda)
        return decoder_cuda_feed_picks(T.cuda, t0, Dr.cuda, 1, e) || decoder_cuda_argmax_fed(T.cuda, am, ver, e) ? -1 : 0;
#endif
    (void)T, (void)Dr, (void)t0, (void)ver, (void)am;
    return dl_fail(e, "speculative: device picks need a GPU target and draft");
}

double gen_decode_speed(GenDecoder g, int64_t ctx, int steps, DlError *e) {
    const int64_t B = gd_batch(g), V = gd_vocab(g);
    float *lg = dl_malloc((size_t)(B * V) * sizeof(float));
    int32_t *tk = dl_calloc((size_t)B, sizeof(int32_t));
    double r = -1;
    if (gd_reset(g, e) == 0 && gd_seek(g, ctx, e) == 0 && gd_feed(g, tk, 1, NULL, false, lg, e) == 0 &&
        gd_argmax(g, lg, B, tk, e) == 0) {  // a warm-up step (graph capture, GEMM heuristics)
        const double t0 = dl_now();
        int s = 0;
        for (; s < steps; s++)
            if (gd_feed(g, tk, 1, NULL, false, lg, e) || gd_argmax(g, lg, B, tk, e)) break;
        if (s == steps) r = (double)(B * steps) / (dl_now() - t0);
    }
    free(lg), free(tk);
    return r;
}

// ---- generation

typedef struct {
    int32_t *out;
    int64_t *n_out;
    uint8_t *done;
    int64_t max_tokens;
    const int32_t *stop;
} Emit;

// appends token t to sequence b unless it is finished; ends it at a stop token or max_tokens
static void emit(Emit *em, int64_t b, int32_t t) {
    if (em->done[b]) return;
    em->out[b * em->max_tokens + em->n_out[b]++] = t;
    if (em->n_out[b] >= em->max_tokens || t == em->stop[0] || t == em->stop[1]) em->done[b] = 1;
}

static bool all_done(const Emit *em, int64_t B) {
    for (int64_t b = 0; b < B; b++)
        if (!em->done[b]) return false;
    return true;
}

// B prompts' lengths
static int check_prompts(int64_t B, const int64_t *plen, int64_t Lmax, const GenParams *gp, DlError *e) {
    if (gp->max_tokens <= 0) return dl_fail(e, "generate: max_tokens %lld must be positive", (long long)gp->max_tokens);
    for (int64_t b = 0; b < B; b++)
        if (plen[b] < 1 || plen[b] > Lmax)
            return dl_fail(e, "generate: prompt %lld has %lld tokens, expected 1..%lld", (long long)b, (long long)plen[b],
                           (long long)Lmax);
    return 0;
}

// Greedy plain decoding picks this many tokens per chain (gd_greedy_chain): fewer host round trips, at the cost of
// up to PLAIN_CHAIN - 1 wasted steps after a sequence's stop token.
#define PLAIN_CHAIN 4

int gen_plain(GenDecoder T, const int32_t *prompts, const int64_t *plen, int64_t Lmax, const GenParams *gp, Rng *rng,
              int32_t *out, int64_t *n_out, DlError *e) {
    const int64_t B = gd_batch(T), V = gd_vocab(T);
    if (check_prompts(B, plen, Lmax, gp, e)) return -1;
    float *lg = dl_malloc((size_t)(B * V) * sizeof(float));
    double *pr = dl_malloc((size_t)V * sizeof(double));
    int32_t *tok = dl_malloc((size_t)B * sizeof(int32_t)), *picks = dl_malloc((size_t)(B * PLAIN_CHAIN) * sizeof(int32_t));
    uint8_t *done = dl_calloc((size_t)B, 1);
    Emit em = {out, n_out, done, gp->max_tokens, gp->stop};
    memset(n_out, 0, (size_t)B * sizeof(int64_t));
    int rc = gd_reset(T, e);
    if (rc == 0) rc = gd_feed(T, prompts, Lmax, plen, false, lg, e);
    while (rc == 0 && gp->sp.greedy) {
        int64_t left = 0;  // tokens the longest-running unfinished sequence may still emit
        for (int64_t b = 0; b < B; b++)
            if (!done[b]) left = DL_MAX(left, gp->max_tokens - n_out[b]);
        const int n = (int)DL_MIN(left, PLAIN_CHAIN);
        if ((rc = gd_greedy_chain(T, lg, 1, n, n < left, tok, picks, e)) != 0) break;
        for (int i = 0; i < n; i++)
            for (int64_t b = 0; b < B; b++) emit(&em, b, picks[b * n + i]);
        if (all_done(&em, B)) break;
    }
    while (rc == 0 && !gp->sp.greedy) {
        if ((rc = gd_pick(T, lg, B, &gp->sp, rng, pr, NULL, tok, e)) != 0) break;
        for (int64_t b = 0; b < B; b++) emit(&em, b, tok[b]);
        if (all_done(&em, B)) break;
        rc = gd_feed(T, tok, 1, NULL, false, lg, e);
    }
    free(lg), free(pr), free(tok), free(picks), free(done);
    return rc;
}

int gen_speculative(GenDecoder T, GenDecoder Dr, const int32_t *prompts, const int64_t *plen, int64_t Lmax,
                    const GenParams *gp, Rng *rng, int32_t *out, int64_t *n_out, SpecStats *stats, DlError *e) {
    const int64_t R = gd_batch(T), V = gd_vocab(T);  // R decoder rows: W per sequence
    const int K = gp->k, W = gp->branches > 1 ? gp->branches : 1;
    const bool greedy = gp->sp.greedy, dev = greedy && picks_on_device(T, Dr);
    if (K < 1 || K > SPEC_MAX_K) return dl_fail(e, "speculative: k = %d, expected 1..%d", K, SPEC_MAX_K);
    if (W > SPEC_MAX_BRANCH) return dl_fail(e, "speculative: %d branches, expected 1..%d", W, SPEC_MAX_BRANCH);
    if (W > 1 && !greedy)
        return dl_fail(e, "speculative: branches (%d) need greedy decoding; sampled decoding verifies one chain", W);
    if (R % W) return dl_fail(e, "speculative: the decoders' batch %lld is not a multiple of the %d branches", (long long)R, W);
    if (gd_batch(Dr) != R || gd_vocab(Dr) != V)
        return dl_fail(e, "speculative: draft has batch %lld and vocabulary %lld, the target %lld and %lld",
                       (long long)gd_batch(Dr), (long long)gd_vocab(Dr), (long long)R, (long long)V);
    const int64_t B = R / W;  // sequences
    if (check_prompts(B, plen, Lmax, gp, e)) return -1;
    int32_t *rp = NULL;       // the prompts once per row
    int64_t *rpl = NULL;
    if (W > 1) {
        rp = dl_malloc((size_t)(R * Lmax) * sizeof(int32_t)), rpl = dl_malloc((size_t)R * sizeof(int64_t));
        for (int64_t r = 0; r < R; r++) {
            memcpy(rp + r * Lmax, prompts + (r / W) * Lmax, (size_t)Lmax * sizeof(int32_t));
            rpl[r] = plen[r / W];
        }
    }
    const int32_t *rprompts = W > 1 ? rp : prompts;
    const int64_t *rplen = W > 1 ? rpl : plen;
    SpecStats st = {0};
    float *lg = dl_malloc((size_t)(R * V) * sizeof(float));                     // draft logits [R, V]
    float *tl = dl_malloc((size_t)(R * (K + 1) * V) * sizeof(float));           // target logits [R, K+1, V]
    double *q = greedy ? NULL : dl_malloc((size_t)(R * K * V) * sizeof(double)); // draft distributions [R, K, V]
    double *qs = greedy ? NULL : dl_malloc((size_t)(R * V) * sizeof(double));   // [R, V]: position i of each
    double *p = dl_malloc((size_t)V * sizeof(double)), *res = dl_malloc((size_t)V * sizeof(double));
    int32_t *dtok = dl_malloc((size_t)(R * K) * sizeof(int32_t));      // proposals [R, K]
    int32_t *ver = dl_malloc((size_t)(R * (K + 1)) * sizeof(int32_t)); // [pending, d1..dK] per row
    int32_t *am = dl_malloc((size_t)(R * (K + 1)) * sizeof(int32_t));  // greedy: the target's argmax per position
    int32_t *pend = dl_malloc((size_t)(R * 2) * sizeof(int32_t));      // draft's unfed tokens [R, 2]
    int64_t *npend = dl_malloc((size_t)R * sizeof(int64_t));
    int32_t *t0 = dl_malloc((size_t)R * sizeof(int32_t)), *col = dl_malloc((size_t)R * sizeof(int32_t));
    int32_t *keep_t = dl_malloc((size_t)R * sizeof(int32_t)), *keep_d = dl_malloc((size_t)R * sizeof(int32_t));
    int32_t *src = dl_malloc((size_t)R * sizeof(int32_t));             // the row each row continues from
    uint8_t *done = dl_calloc((size_t)B, 1);
    Emit em = {out, n_out, done, gp->max_tokens, gp->stop};
    memset(n_out, 0, (size_t)B * sizeof(int64_t));
    // prefill both; the target's first token is picked from its own prompt logits (a sequence's rows are equal)
    int rc = gd_reset(T, e);
    if (rc == 0) rc = gd_reset(Dr, e);
    if (rc == 0) rc = gd_feed(T, rprompts, Lmax, rplen, false, lg, e);
    if (rc == 0) rc = gd_pick(T, lg, R, &gp->sp, rng, p, NULL, t0, e);
    if (rc == 0) rc = gd_feed(Dr, rprompts, Lmax, rplen, false, NULL, e);
    st.target_feeds++, st.draft_feeds++;
    if (rc == 0)
        for (int64_t r = 0; r < R; r++) {
            if (r % W == 0) emit(&em, r / W, t0[r]);
            pend[r * 2] = t0[r];
            npend[r] = 1;
        }
    while (rc == 0 && !all_done(&em, B)) {
        const double t_round = dl_now();
        // draft: feed its pending tokens (1 or 2 per sequence), then propose d1..dK one by one inside a window
        int64_t Lp = 1;
        for (int64_t r = 0; r < R; r++) Lp = DL_MAX(Lp, npend[r]);
        if (Lp == 1) {  // the usual case: one pending token each
            for (int64_t r = 0; r < R; r++) col[r] = pend[r * 2];
            rc = gd_feed(Dr, col, 1, NULL, false, lg, e);
        } else {        // pend [R, 2], ragged: sequences with one pending token ignore column 1
            rc = gd_feed(Dr, pend, 2, npend, false, lg, e);
        }
        if (rc) break;
        st.draft_feeds++;
        gd_window_begin(Dr);
        if (greedy) {  // d1..dK in one chain (d1..d_{K-1} fed); dev: they stay on the GPU until the target has them
            rc = dev ? gd_chain_on_device(Dr, W, K, e) : gd_greedy_chain(Dr, lg, W, K, false, col, dtok, e);
            st.draft_feeds += K - 1;
        }
        for (int i = 0; i < K && rc == 0 && !greedy; i++) {
            if ((rc = gd_pick(Dr, lg, R, &gp->sp, rng, NULL, qs, col, e)) != 0) break;
            for (int64_t r = 0; r < R; r++) {
                dtok[r * K + i] = col[r];
                if (q) memcpy(q + (r * K + i) * V, qs + r * V, (size_t)V * sizeof(double));
            }
            if (i + 1 < K) rc = gd_feed(Dr, col, 1, NULL, false, lg, e), st.draft_feeds++;
        }
        if (rc) break;
        const double t_verify = dl_now();
        st.draft_s += t_verify - t_round;
        // target: verify [t0, d1..dK] of every row in one feed
        gd_window_begin(T);
        if (dev) {
            if ((rc = gd_verify_device_picks(T, Dr, t0, ver, am, e)) != 0) break;
            for (int64_t r = 0; r < R; r++) memcpy(dtok + r * K, ver + r * (K + 1) + 1, (size_t)K * sizeof(int32_t));
        } else {
            for (int64_t r = 0; r < R; r++) {
                ver[r * (K + 1)] = t0[r];
                memcpy(ver + r * (K + 1) + 1, dtok + r * K, (size_t)K * sizeof(int32_t));
            }
            if ((rc = gd_feed(T, ver, K + 1, NULL, true, tl, e)) != 0) break;
            if (greedy) rc = gd_argmax(T, tl, R * (K + 1), am, e);
            else gd_logits(T, tl);
            if (rc) break;
        }
        st.target_feeds++;
        for (int64_t s = 0; s < B; s++) {
            int j = 0, w = 0;  // accepted draft tokens, of the kept row s * W + w
            int32_t next = -1;
            if (greedy) {  // exact argmax matching (speculative sampling with one-hot p and q); the longest match wins
                for (int c = 0; c < W; c++) {
                    const int64_t r = s * W + c;
                    int jc = 0;
                    while (jc < K && am[r * (K + 1) + jc] == dtok[r * K + jc]) jc++;
                    if (c == 0 || jc > j) j = jc, w = c;
                }
                next = am[(s * W + w) * (K + 1) + j];
            } else {  // W == 1: row s
                for (; j < K; j++) {
                    sample_probs(tl + (s * (K + 1) + j) * V, V, &gp->sp, p);
                    const double *qi = q + (s * K + j) * V;
                    const int32_t d = dtok[s * K + j];
                    const double u = rng_uniform_f64(rng);
                    if (qi[d] > 0 && u * qi[d] < p[d]) continue;  // accepted with probability min(1, p/q)
                    double sum = 0;
                    for (int64_t v = 0; v < V; v++) sum += res[v] = p[v] > qi[v] ? p[v] - qi[v] : 0;
                    next = sample_from_probs(sum > 0 ? res : p, V, rng_uniform_f64(rng));
                    break;
                }
                if (j == K) {  // all accepted: a bonus token from the target's last distribution
                    sample_probs(tl + (s * (K + 1) + K) * V, V, &gp->sp, p);
                    next = sample_from_probs(p, V, rng_uniform_f64(rng));
                }
            }
            const int64_t kr = s * W + w;  // the kept row
            if (!done[s]) {
                st.steps++;
                for (int i = 0; i < j; i++) st.accepted_at[i]++;
                st.emitted += j + 1;
                st.branch_won[w]++;
            }
            for (int i = 0; i < j; i++) emit(&em, s, dtok[kr * K + i]);
            emit(&em, s, next);
            for (int64_t r = s * W; r < (s + 1) * W; r++) {  // every row continues from the kept one
                src[r] = (int32_t)kr;
                keep_t[r] = 1 + j;             // t0, d1..dj
                keep_d[r] = DL_MIN(j, K - 1);  // the draft fed d1..d_{K-1}
                npend[r] = 0;
                if (j == K) pend[r * 2 + npend[r]++] = dtok[kr * K + K - 1];
                pend[r * 2 + npend[r]++] = next;
                if (npend[r] == 1) pend[r * 2 + 1] = next;  // padding column
                t0[r] = next;
            }
        }
        if ((rc = gd_accept(T, keep_t, src, e)) != 0) break;  // W 1: every row its own source, a plain accept
        if ((rc = gd_accept(Dr, keep_d, src, e)) != 0) break;
        st.verify_s += dl_now() - t_verify;
        st.rounds++;
    }
    if (stats) *stats = st;
    free(lg), free(tl), free(q), free(qs), free(p), free(res), free(dtok), free(ver), free(am), free(pend), free(npend);
    free(t0), free(col), free(keep_t), free(keep_d), free(src), free(done), free(rp), free(rpl);
    return rc;
}

int spec_draft_from_layers(const HybridConfig *h, const Registry *r, const float *params, const int *layers, int n,
                           HybridConfig *dh, Registry *dr, float **dparams, DlError *e) {
    if (n < 1) return dl_fail(e, "draft: no layers given");
    for (int i = 0; i < n; i++)
        if (layers[i] < 0 || layers[i] >= h->base.n_layer)
            return dl_fail(e, "draft: layer %d outside 0..%d", layers[i], h->base.n_layer - 1);
    *dh = *h;
    dh->base.n_layer = n;
    for (int i = 0; i < n; i++) dh->mixer[i] = h->mixer[layers[i]];
    model_build_registry(dh, dr);
    float *P = dl_calloc((size_t)dr->numel, sizeof(float));
    for (int i = 0; i < dr->n; i++) {
        const TensorInfo *t = &dr->t[i];
        char src[DL_TENSOR_NAME_MAX];
        int li, off = 0;
        if (sscanf(t->name, "model.layers.%d.%n", &li, &off) == 1 && off > 0)
            snprintf(src, sizeof src, "model.layers.%d.%s", layers[li], t->name + off);
        else
            snprintf(src, sizeof src, "%s", t->name);
        int k = reg_find(r, src);
        if (k < 0 || r->t[k].numel != t->numel) {
            free(P);
            reg_free(dr);
            return dl_fail(e, "draft: tensor %s (%lld elements) not in the source model", src, (long long)t->numel);
        }
        memcpy(P + t->offset, params + r->t[k].offset, (size_t)t->numel * sizeof(float));
    }
    *dparams = P;
    return 0;
}
