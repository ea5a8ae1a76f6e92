// spec_decode.c: see spec_decode.h.
#include "distill/spec_decode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/common.h"

int64_t spec_max_len(int64_t Lmax, int64_t max_tokens, int k) {
    // a step grows a sequence by at most k + 1 (draft: k + 1 with two pending tokens); finished sequences
    // keep stepping until the whole batch is done, at most max_tokens steps
    return Lmax + (int64_t)(k + 2) * (max_tokens + 1) + 4;
}

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

static int check_prompts(const Decoder *d, const int64_t *plen, int64_t Lmax, const GenParams *gp, DlError *e) {
    const int64_t B = decoder_batch(d);
    if (gp->max_tokens <= 0) return dl_fail(e, "generate: max_tokens %lld must be positive", (long long)gp->max_tokens);
    for (int64_t b = 0; b < B; b++)
        if (plen[b] < 1 || plen[b] > Lmax)
            return dl_fail(e, "generate: prompt %lld has %lld tokens, expected 1..%lld", (long long)b, (long long)plen[b],
                           (long long)Lmax);
    return 0;
}

int gen_plain(Decoder *T, const int32_t *prompts, const int64_t *plen, int64_t Lmax, const GenParams *gp, Rng *rng,
              int32_t *out, int64_t *n_out, DlError *e) {
    const int64_t B = decoder_batch(T), V = decoder_vocab(T);
    if (check_prompts(T, plen, Lmax, gp, e)) return -1;
    float *lg = dl_malloc((size_t)(B * V) * sizeof(float));
    double *pr = dl_malloc((size_t)V * sizeof(double));
    int32_t *tok = dl_malloc((size_t)B * sizeof(int32_t));
    uint8_t *done = dl_calloc((size_t)B, 1);
    Emit em = {out, n_out, done, gp->max_tokens, gp->stop};
    memset(n_out, 0, (size_t)B * sizeof(int64_t));
    decoder_reset(T);
    int rc = decoder_feed_ragged(T, prompts, Lmax, plen, lg, NULL, e);
    while (rc == 0) {
        for (int64_t b = 0; b < B; b++) {
            sample_probs(lg + b * V, V, &gp->sp, pr);
            tok[b] = sample_from_probs(pr, V, rng_uniform_f64(rng));
            emit(&em, b, tok[b]);
        }
        if (all_done(&em, B)) break;
        rc = decoder_feed(T, tok, 1, lg, NULL, e);
    }
    free(lg), free(pr), free(tok), free(done);
    return rc;
}

int gen_speculative(Decoder *T, Decoder *Dr, const int32_t *prompts, const int64_t *plen, int64_t Lmax,
                    const GenParams *gp, Rng *rng, int32_t *out, int64_t *n_out, SpecStats *stats, DlError *e) {
    const int64_t B = decoder_batch(T), V = decoder_vocab(T);
    const int K = gp->k;
    if (K < 1 || K > SPEC_MAX_K) return dl_fail(e, "speculative: k = %d, expected 1..%d", K, SPEC_MAX_K);
    if (decoder_batch(Dr) != B || decoder_vocab(Dr) != V)
        return dl_fail(e, "speculative: draft has batch %lld and vocabulary %lld, the target %lld and %lld",
                       (long long)decoder_batch(Dr), (long long)decoder_vocab(Dr), (long long)B, (long long)V);
    if (check_prompts(T, plen, Lmax, gp, e)) return -1;
    SpecStats st = {0};
    float *lg = dl_malloc((size_t)(B * V) * sizeof(float));             // draft logits [B, V]
    float *tl = dl_malloc((size_t)(B * (K + 1) * V) * sizeof(float));   // target logits [B, K+1, V]
    double *q = dl_malloc((size_t)(B * K * V) * sizeof(double));        // draft distributions [B, K, V]
    double *p = dl_malloc((size_t)V * sizeof(double)), *res = dl_malloc((size_t)V * sizeof(double));
    int32_t *dtok = dl_malloc((size_t)(B * K) * sizeof(int32_t));      // proposals [B, K]
    int32_t *ver = dl_malloc((size_t)(B * (K + 1)) * sizeof(int32_t)); // [pending, d1..dK] per sequence
    int32_t *pend = dl_malloc((size_t)(B * 2) * sizeof(int32_t));      // draft's unfed tokens [B, 2]
    int64_t *npend = dl_malloc((size_t)B * sizeof(int64_t));
    int32_t *t0 = dl_malloc((size_t)B * sizeof(int32_t)), *col = dl_malloc((size_t)B * sizeof(int32_t));
    int32_t *keep_t = dl_malloc((size_t)B * sizeof(int32_t)), *keep_d = dl_malloc((size_t)B * sizeof(int32_t));
    uint8_t *done = dl_calloc((size_t)B, 1);
    Emit em = {out, n_out, done, gp->max_tokens, gp->stop};
    memset(n_out, 0, (size_t)B * sizeof(int64_t));
    decoder_reset(T);
    decoder_reset(Dr);
    // prefill both; the target's first token is sampled from its own prompt logits
    int rc = decoder_feed_ragged(T, prompts, Lmax, plen, lg, NULL, e);
    if (rc == 0) rc = decoder_feed_ragged(Dr, prompts, Lmax, plen, NULL, NULL, e);
    st.target_feeds++, st.draft_feeds++;
    if (rc == 0)
        for (int64_t b = 0; b < B; b++) {
            sample_probs(lg + b * V, V, &gp->sp, p);
            t0[b] = sample_from_probs(p, V, rng_uniform_f64(rng));
            emit(&em, b, t0[b]);
            pend[b * 2] = t0[b];
            npend[b] = 1;
        }
    while (rc == 0 && !all_done(&em, B)) {
        // draft: feed its pending tokens (1 or 2 per sequence), then propose d1..dK one by one inside a window
        int64_t Lp = 1;
        for (int64_t b = 0; b < B; b++) Lp = DL_MAX(Lp, npend[b]);
        if (Lp == 1) {  // the usual case: one pending token each
            for (int64_t b = 0; b < B; b++) col[b] = pend[b * 2];
            rc = decoder_feed(Dr, col, 1, lg, NULL, e);
        } else {        // pend [B, 2], ragged: sequences with one pending token ignore column 1
            rc = decoder_feed_ragged(Dr, pend, 2, npend, lg, NULL, e);
        }
        if (rc) break;
        st.draft_feeds++;
        decoder_window_begin(Dr);
        for (int i = 0; i < K && rc == 0; i++) {
            for (int64_t b = 0; b < B; b++) {
                double *qi = q + (b * K + i) * V;
                sample_probs(lg + b * V, V, &gp->sp, qi);
                dtok[b * K + i] = col[b] = sample_from_probs(qi, V, rng_uniform_f64(rng));
            }
            if (i + 1 < K) rc = decoder_feed(Dr, col, 1, lg, NULL, e), st.draft_feeds++;
        }
        if (rc) break;
        // target: verify [t0, d1..dK] in one feed
        for (int64_t b = 0; b < B; b++) {
            ver[b * (K + 1)] = t0[b];
            memcpy(ver + b * (K + 1) + 1, dtok + b * K, (size_t)K * sizeof(int32_t));
        }
        decoder_window_begin(T);
        if ((rc = decoder_feed(T, ver, K + 1, NULL, tl, e)) != 0) break;
        st.target_feeds++;
        for (int64_t b = 0; b < B; b++) {
            int j = 0;
            int32_t next = -1;
            for (; j < K; j++) {
                sample_probs(tl + (b * (K + 1) + j) * V, V, &gp->sp, p);
                const double *qi = q + (b * K + j) * V;
                const int32_t d = dtok[b * K + j];
                const double u = rng_uniform_f64(rng);
                if (qi[d] > 0 && u * qi[d] < p[d]) continue;  // accepted with probability min(1, p/q)
                double s = 0;
                for (int64_t v = 0; v < V; v++) s += res[v] = p[v] > qi[v] ? p[v] - qi[v] : 0;
                next = sample_from_probs(s > 0 ? res : p, V, rng_uniform_f64(rng));
                break;
            }
            if (j == K) {  // all accepted: a bonus token from the target's last distribution
                sample_probs(tl + (b * (K + 1) + K) * V, V, &gp->sp, p);
                next = sample_from_probs(p, V, rng_uniform_f64(rng));
            }
            if (!done[b]) {
                st.steps++;
                for (int i = 0; i < j; i++) st.accepted_at[i]++;
                st.emitted += j + 1;
            }
            for (int i = 0; i < j; i++) emit(&em, b, dtok[b * K + i]);
            emit(&em, b, next);
            keep_t[b] = 1 + j;              // t0, d1..dj
            keep_d[b] = DL_MIN(j, K - 1);   // the draft fed d1..d_{K-1}
            npend[b] = 0;
            if (j == K) pend[b * 2 + npend[b]++] = dtok[b * K + K - 1];
            pend[b * 2 + npend[b]++] = next;
            if (npend[b] == 1) pend[b * 2 + 1] = next;  // padding column
            t0[b] = next;
        }
        if ((rc = decoder_accept(T, keep_t, e)) != 0) break;
        if ((rc = decoder_accept(Dr, keep_d, e)) != 0) break;
    }
    if (stats) *stats = st;
    free(lg), free(tl), free(q), free(p), free(res), free(dtok), free(ver), free(pend), free(npend);
    free(t0), free(col), free(keep_t), free(keep_d), free(done);
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
