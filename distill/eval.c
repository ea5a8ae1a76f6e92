// eval.c: see eval.h.
#include "distill/eval.h"

#include <errno.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/train_model.h"

// log-softmax statistics of one row of V logits: max, log-sum-exp, argmax (lowest index on ties).
static void row_stats(const float *x, int64_t V, double *lse, int64_t *arg) {
    double m = x[0];
    int64_t a = 0;
    for (int64_t i = 1; i < V; i++)
        if (x[i] > m) m = x[i], a = i;
    double s = 0;
    for (int64_t i = 0; i < V; i++) s += exp((double)x[i] - m);
    *lse = m + log(s);
    *arg = a;
}

int eval_run(const EvalModel *student, const EvalModel *teacher, BatchSource *src, int64_t B, int64_t T,
             int64_t n_batches, const char *label, EvalResult *out, DlError *e) {
    memset(out, 0, sizeof *out);
    snprintf(out->label, sizeof out->label, "%s", label);
    if (student->hc->base.vocab != teacher->hc->base.vocab)
        return dl_fail(e, "eval: student vocabulary %d differs from the teacher's %d", student->hc->base.vocab,
                       teacher->hc->base.vocab);
    const int64_t V = student->hc->base.vocab, N = B * T;
    TrainModel *se = tm_new(student->device, student->hc, student->reg, (float *)student->params, B, T, TM_FROZEN, NULL, e);
    if (!se) return -1;
    TrainModel *te = tm_new(teacher->device, teacher->hc, teacher->reg, (float *)teacher->params, B, T, TM_FROZEN, NULL, e);
    if (!te) {
        tm_free(se);
        return -1;
    }
    TrainBatch b = {B, T, dl_malloc((size_t)N * 4), dl_malloc((size_t)N * 4), dl_malloc((size_t)N), dl_malloc((size_t)N)};
    const int64_t chunk = DL_MAX(1, DL_MIN(N, (int64_t)(32 << 20) / V));
    float *ls = dl_malloc((size_t)(chunk * V) * 4), *lt = dl_malloc((size_t)(chunk * V) * 4);
    double *st = dl_malloc((size_t)chunk * 8 * sizeof(double));  // per row: counted, nll, tnll, kl, ent, agree, acc, tacc
    double nll = 0, tnll = 0, kl = 0, ent = 0, agree = 0, acc = 0, tacc = 0, count = 0;
    int rc = -1;
    for (int64_t k = 0; k < n_batches; k++) {
        if (src->next(src->ctx, &b, e)) goto out;
        if (tm_forward(te, b.tokens, b.reset, e) || tm_forward(se, b.tokens, b.reset, e)) goto out;
        for (int64_t r0 = 0; r0 < N; r0 += chunk) {
            int64_t n = DL_MIN(chunk, N - r0);
            tm_logits(se, r0, r0 + n, ls);
            tm_logits(te, r0, r0 + n, lt);
            // rows in parallel, each into its own slot; summed below in row order (thread-count independent)
#pragma omp parallel for schedule(dynamic, 4)
            for (int64_t i = 0; i < n; i++) {
                double *o = st + i * 8;
                memset(o, 0, 8 * sizeof(double));
                int64_t r = r0 + i;
                int32_t y = b.targets[r];
                if (y < 0 || y >= V || !b.mask[r]) continue;
                const float *s = ls + i * V, *t = lt + i * V;
                double lse_s, lse_t;
                int64_t as, at;
                row_stats(s, V, &lse_s, &as);
                row_stats(t, V, &lse_t, &at);
                double klr = 0, h = 0;
                for (int64_t j = 0; j < V; j++) {
                    double lpt = (double)t[j] - lse_t, lps = (double)s[j] - lse_s, pt = exp(lpt);
                    klr += pt * (lpt - lps);
                    h -= pt * lpt;
                }
                o[0] = 1, o[1] = lse_s - s[y], o[2] = lse_t - t[y], o[3] = klr, o[4] = h;
                o[5] = as == at, o[6] = as == y, o[7] = at == y;
            }
            for (int64_t i = 0; i < n; i++) {
                const double *o = st + i * 8;
                if (o[0] == 0) continue;
                nll += o[1], tnll += o[2], kl += o[3], ent += o[4], agree += o[5], acc += o[6], tacc += o[7];
                count++;
            }
        }
        out->n_rows += B;
    }
    if (count == 0) {
        dl_fail(e, "eval: no counted positions in %lld batches (all masked?)", (long long)n_batches);
        goto out;
    }
    out->n_tokens = (int64_t)count;
    out->nll = nll / count;
    out->teacher_nll = tnll / count;
    out->ppl = exp(out->nll);
    out->teacher_ppl = exp(out->teacher_nll);
    out->ppl_ratio = out->ppl / out->teacher_ppl;
    out->kl = kl / count;
    out->teacher_entropy = ent / count;
    out->kl_ratio = out->teacher_entropy > 0 ? out->kl / out->teacher_entropy : NAN;
    out->top1_agreement = agree / count;
    out->acc = acc / count;
    out->teacher_acc = tacc / count;
    out->acc_ratio = out->teacher_acc > 0 ? out->acc / out->teacher_acc : NAN;
    rc = 0;
out:
    free(b.tokens), free(b.targets), free(b.mask), free(b.reset);
    free(ls), free(lt), free(st);
    tm_free(se);
    tm_free(te);
    return rc;
}

static void jnum(FILE *f, const char *k, double v, bool comma) {
    if (isfinite(v)) fprintf(f, "\"%s\": %.9g%s", k, v, comma ? ", " : "");
    else fprintf(f, "\"%s\": null%s", k, comma ? ", " : "");
}

int eval_write_json(const char *path, const EvalResult *r, int n, DlError *e) {
    DlAtomic a;
    if (dl_atomic_open(&a, path, e)) return -1;
    FILE *f = a.f;
    fprintf(f, "{\"results\": [\n");
    for (int i = 0; i < n; i++) {
        const EvalResult *x = &r[i];
        fprintf(f, "  {\"label\": \"%s\", \"tokens\": %lld, \"rows\": %lld, ", x->label, (long long)x->n_tokens,
                (long long)x->n_rows);
        jnum(f, "ppl", x->ppl, 1), jnum(f, "teacher_ppl", x->teacher_ppl, 1), jnum(f, "ppl_ratio", x->ppl_ratio, 1);
        jnum(f, "nll", x->nll, 1), jnum(f, "teacher_nll", x->teacher_nll, 1);
        jnum(f, "kl", x->kl, 1), jnum(f, "teacher_entropy", x->teacher_entropy, 1), jnum(f, "kl_ratio", x->kl_ratio, 1);
        jnum(f, "top1_agreement", x->top1_agreement, 1), jnum(f, "acc", x->acc, 1);
        jnum(f, "teacher_acc", x->teacher_acc, 1), jnum(f, "acc_ratio", x->acc_ratio, 0);
        fprintf(f, "}%s\n", i + 1 < n ? "," : "");
    }
    fprintf(f, "]}\n");
    return dl_atomic_commit(&a, e);
}

void eval_print_table(FILE *f, const EvalResult *r, int n) {
    if (n <= 0) return;
    fprintf(f, "%-28s %12s", "metric", "teacher");
    for (int i = 0; i < n; i++) fprintf(f, " %12s", r[i].label);
    fprintf(f, "\n");
    fprintf(f, "%-28s %12.4f", "perplexity", r[0].teacher_ppl);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].ppl);
    fprintf(f, "\n%-28s %12.4f", "  ratio to teacher", 1.0);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].ppl_ratio);
    fprintf(f, "\n%-28s %12.4f", "KL(teacher||model) nats/tok", 0.0);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].kl);
    fprintf(f, "\n%-28s %12.4f", "  ratio to teacher entropy", 0.0);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].kl_ratio);
    fprintf(f, "\n%-28s %12.4f", "top-1 agreement w/ teacher", 1.0);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].top1_agreement);
    fprintf(f, "\n%-28s %12.4f", "next-token accuracy", r[0].teacher_acc);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].acc);
    fprintf(f, "\n%-28s %12.4f", "  ratio to teacher", 1.0);
    for (int i = 0; i < n; i++) fprintf(f, " %12.4f", r[i].acc_ratio);
    fprintf(f, "\n%-28s %12lld", "tokens evaluated", (long long)r[0].n_tokens);
    for (int i = 0; i < n; i++) fprintf(f, " %12lld", (long long)r[i].n_tokens);
    fprintf(f, "\n");
}
