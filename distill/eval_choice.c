// eval_choice.c: see eval_choice.h.
#include "distill/eval_choice.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "distill/train_model.h"

// ---------------------------------------------------------------- scoring

#define SCORE_PAD 32

typedef struct {
    const int64_t *len;
} LenOrder;

static int cmp_len_desc(const void *a, const void *b, void *ctx) {
    const int64_t *len = ((const LenOrder *)ctx)->len;
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    if (len[x] != len[y]) return len[x] > len[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static int64_t pad_len(int64_t n, int64_t max_pos) {
    const int64_t t = (n + SCORE_PAD - 1) / SCORE_PAD * SCORE_PAD;
    return max_pos > 0 && t > max_pos ? max_pos : t;
}

int lm_score_rows(const EvalModel *m, const int32_t *const *rows, const int64_t *len, const int64_t *from, int64_t n,
                  int64_t batch, double *sum, double *mean, DlError *e) {
    ScoreKeep k;
    memset(&k, 0, sizeof k);
    const int rc = lm_score_rows_keep(m, rows, len, from, n, batch, sum, mean, &k, e);
    score_keep_free(&k);
    return rc;
}

void score_keep_free(ScoreKeep *k) {
    tm_free(k->eng);
    k->eng = NULL;
    k->B = k->T = 0;
}

int lm_score_rows_keep(const EvalModel *m, const int32_t *const *rows, const int64_t *len, const int64_t *from, int64_t n,
                       int64_t batch, double *sum, double *mean, ScoreKeep *keep, DlError *e) {
    const LlamaConfig *c = &m->hc->base;
    const int64_t V = c->vocab;
    if (batch < 1) batch = 1;
    for (int64_t i = 0; i < n; i++) {
        if (len[i] < 2 || from[i] < 1 || from[i] >= len[i])
            return dl_fail(e, "score: row %lld: scored positions [%lld, %lld) must lie in [1, length) with length >= 2",
                           (long long)i, (long long)from[i], (long long)len[i]);
        if (c->max_pos > 0 && len[i] > c->max_pos)
            return dl_fail(e, "score: row %lld has %lld tokens, more than the model's context %d", (long long)i,
                           (long long)len[i], c->max_pos);
        for (int64_t t = 0; t < len[i]; t++)
            if (rows[i][t] < 0 || rows[i][t] >= V)
                return dl_fail(e, "score: row %lld token %lld: id %d is not in the vocabulary 0..%lld", (long long)i,
                               (long long)t, rows[i][t], (long long)V - 1);
    }
    if (n == 0) return 0;
    // longest first, so each batch is padded to lengths close to its own
    int64_t *order = dl_malloc((size_t)n * sizeof *order);
    for (int64_t i = 0; i < n; i++) order[i] = i;
    LenOrder lo = {len};
    qsort_r(order, (size_t)n, sizeof *order, cmp_len_desc, &lo);
    const int64_t Tmax = pad_len(len[order[0]], c->max_pos), Bmax = DL_MIN(batch, n);
    int32_t *tokens = dl_malloc((size_t)(Bmax * Tmax) * 4), *targets = dl_malloc((size_t)(Bmax * Tmax) * 4);
    double *lp = dl_malloc((size_t)Bmax * sizeof *lp);
    int rc = -1;
    for (int64_t k = 0; k < n; k += batch) {
        // the batch's length rounded up to a multiple of SCORE_PAD (padding is never scored): sorted rows then
        // share a few shapes, so an engine (on CUDA: device buffers, the weights' upload) serves many batches;
        // one engine per exact length made the pairs stage spend most of its time building engines
        const int64_t B = DL_MIN(batch, n - k), T = pad_len(len[order[k]], c->max_pos);
        if (!keep->eng || keep->B != B || keep->T != T) {  // engines are sized per batch shape
            score_keep_free(keep);
            const double t0 = dl_now();
            keep->eng = tm_new(m->device, m->hc, m->reg, (float *)m->params, B, T, TM_FROZEN, NULL, e);
            if (!keep->eng) goto out;
            keep->B = B, keep->T = T;
            keep->built++;
            keep->build_s += dl_now() - t0;
        }
        TrainModel *eng = keep->eng;
        // row b: its tokens padded with 0; position t predicts token t+1 when t+1 is a scored position
        for (int64_t b = 0; b < B; b++) {
            const int64_t i = order[k + b];
            int32_t *tk = tokens + b * T, *tg = targets + b * T;
            memcpy(tk, rows[i], (size_t)len[i] * 4);
            for (int64_t t = len[i]; t < T; t++) tk[t] = 0;
            for (int64_t t = 0; t < T; t++) tg[t] = t + 1 >= from[i] && t + 1 < len[i] ? rows[i][t + 1] : -1;
        }
        if (tm_forward(eng, tokens, NULL, e)) goto out;
        TmLoss spec;
        memset(&spec, 0, sizeof spec);
        spec.w = (LossWeights){1, 0, 0, 1};
        spec.norm = 1;
        tm_loss(eng, targets, NULL, &spec, NULL, lp);
        for (int64_t b = 0; b < B; b++) {
            const int64_t i = order[k + b];
            sum[i] = lp[b];
            if (mean) mean[i] = lp[b] / (double)(len[i] - from[i]);
        }
    }
    rc = 0;
out:
    free(order), free(tokens), free(targets), free(lp);
    return rc;
}

// ---------------------------------------------------------------- multiple-choice files

static void item_free(ChoiceItem *it) {
    free(it->question);
    for (int k = 0; k < it->n_choices; k++) free(it->choices[k]);
    free(it->choices);
    free(it->category);
}

void choice_set_free(ChoiceSet *s) {
    if (!s) return;
    for (int64_t i = 0; i < s->n; i++) item_free(&s->items[i]);
    free(s->items);
    free(s->path);
    memset(s, 0, sizeof *s);
}

// One line -> item; returns 0 or -1 with why filled (what was expected).
static int parse_item(const char *line, ChoiceItem *it, char *why, size_t nw) {
    memset(it, 0, sizeof *it);
    cJSON *o = cJSON_Parse(line);
    int rc = -1;
    if (!o || !cJSON_IsObject(o)) {
        snprintf(why, nw, "expected one JSON object per line: {\"question\": str, \"choices\": [str, ...], \"answer\": int}");
        goto out;
    }
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(o, "question"), *ch = cJSON_GetObjectItemCaseSensitive(o, "choices"),
                *an = cJSON_GetObjectItemCaseSensitive(o, "answer"), *ca = cJSON_GetObjectItemCaseSensitive(o, "category");
    if (!cJSON_IsString(q) || !*q->valuestring) {
        snprintf(why, nw, "\"question\" must be a non-empty string");
        goto out;
    }
    int nc = cJSON_IsArray(ch) ? cJSON_GetArraySize(ch) : -1;
    if (nc < 2 || nc > 16) {
        snprintf(why, nw, "\"choices\" must be an array of 2 to 16 strings%s", nc >= 0 ? "" : " (missing or not an array)");
        goto out;
    }
    it->choices = dl_calloc((size_t)nc, sizeof(char *));
    const cJSON *x;
    cJSON_ArrayForEach(x, ch) {
        if (!cJSON_IsString(x) || !*x->valuestring) {
            snprintf(why, nw, "\"choices\"[%d] must be a non-empty string", it->n_choices);
            goto out;
        }
        it->choices[it->n_choices++] = dl_strdup(x->valuestring);
    }
    if (!cJSON_IsNumber(an) || an->valuedouble != floor(an->valuedouble) || an->valuedouble < 0 || an->valuedouble >= nc) {
        snprintf(why, nw, "\"answer\" must be an integer index 0..%d into \"choices\"", nc - 1);
        goto out;
    }
    it->answer = (int)an->valuedouble;
    if (ca && !cJSON_IsString(ca)) {
        snprintf(why, nw, "\"category\" must be a string when present");
        goto out;
    }
    it->question = dl_strdup(q->valuestring);
    if (ca) it->category = dl_strdup(ca->valuestring);
    rc = 0;
out:
    cJSON_Delete(o);
    if (rc) item_free(it), memset(it, 0, sizeof *it);
    return rc;
}

int choice_set_load(const char *path, ChoiceSet *s, DlError *e) {
    memset(s, 0, sizeof *s);
    size_t len;
    char *text = dl_read_file(path, &len, e);
    if (!text) return -1;
    if (strlen(text) != len) {
        free(text);
        return dl_fail(e, "%s: contains a NUL byte; expected UTF-8 JSONL text", path);
    }
    s->path = dl_strdup(path);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    snprintf(s->name, sizeof s->name, "%s", base);
    char *dot = strrchr(s->name, '.');
    if (dot && dot != s->name) *dot = 0;
    int64_t cap = 0, lineno = 0;
    char *p = text;
    while (*p) {
        char *nl = strchr(p, '\n');
        if (nl) *nl = 0;
        lineno++;
        char *line = p;
        p = nl ? nl + 1 : p + strlen(p);
        while (*line == ' ' || *line == '\t' || *line == '\r') line++;
        if (!*line) continue;
        ChoiceItem it;
        char why[512];
        if (parse_item(line, &it, why, sizeof why)) {
            dl_fail(e, "%s:%lld: %s", path, (long long)lineno, why);
            goto fail;
        }
        it.line = lineno;
        if (s->n == cap) s->items = dl_realloc(s->items, (size_t)(cap = cap ? 2 * cap : 64) * sizeof *s->items);
        s->items[s->n++] = it;
    }
    free(text);
    if (s->n == 0) {
        dl_fail(e, "%s: no questions (expected one JSON object per line)", path);
        choice_set_free(s);
        return -1;
    }
    return 0;
fail:
    free(text);
    choice_set_free(s);
    return -1;
}

// ---------------------------------------------------------------- evaluation

static int encode(const Tokenizer *tok, const char *a, const char *b, const char *c, int32_t **ids, int64_t *n,
                  DlError *e) {
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *s = dl_malloc(la + lb + lc + 1);
    memcpy(s, a, la), memcpy(s + la, b, lb), memcpy(s + la + lb, c, lc);
    s[la + lb + lc] = 0;
    int rc = tokenizer_encode(tok, s, la + lb + lc, ids, n, e);
    free(s);
    return rc;
}

int choice_eval(const EvalModel *m, const Tokenizer *tok, const ChoiceSet *s, int64_t max_items, int64_t batch,
                const char *label, ChoiceResult *out, double *ll_sum, double *ll_mean, DlError *e) {
    memset(out, 0, sizeof *out);
    snprintf(out->label, sizeof out->label, "%s", label);
    snprintf(out->set, sizeof out->set, "%s", s->name);
    const int64_t nq = max_items > 0 && max_items < s->n ? max_items : s->n;
    int64_t nrows = 0;
    for (int64_t q = 0; q < nq; q++) nrows += s->items[q].n_choices;
    int32_t **rows = dl_calloc((size_t)nrows, sizeof *rows);
    int64_t *len = dl_calloc((size_t)nrows, sizeof *len), *from = dl_calloc((size_t)nrows, sizeof *from);
    double *sum = dl_calloc((size_t)nrows, sizeof *sum), *mean = dl_calloc((size_t)nrows, sizeof *mean);
    int rc = -1;
    int64_t r = 0;
    for (int64_t q = 0; q < nq; q++) {
        const ChoiceItem *it = &s->items[q];
        int32_t *ctx = NULL;
        int64_t nctx = 0;
        if (encode(tok, "Question: ", it->question, "\nAnswer:", &ctx, &nctx, e)) {
            dl_fail_prefix(e, "%s:%lld: question: ", s->path, (long long)it->line);
            goto out;
        }
        for (int k = 0; k < it->n_choices; k++, r++) {
            int32_t *cont = NULL;
            int64_t ncont = 0;
            if (encode(tok, " ", it->choices[k], "", &cont, &ncont, e)) {
                free(ctx);
                dl_fail_prefix(e, "%s:%lld: choice %d: ", s->path, (long long)it->line, k);
                goto out;
            }
            rows[r] = dl_malloc((size_t)(nctx + ncont) * 4);
            memcpy(rows[r], ctx, (size_t)nctx * 4);
            memcpy(rows[r] + nctx, cont, (size_t)ncont * 4);
            len[r] = nctx + ncont;
            from[r] = nctx;
            free(cont);
        }
        free(ctx);
    }
    if (lm_score_rows(m, (const int32_t *const *)rows, len, from, nrows, batch, sum, mean, e)) {
        dl_fail_prefix(e, "%s: ", s->path);
        goto out;
    }
    r = 0;
    double chance = 0;
    for (int64_t q = 0; q < nq; q++) {
        const ChoiceItem *it = &s->items[q];
        int best = 0, best_norm = 0;
        for (int k = 1; k < it->n_choices; k++) {
            if (sum[r + k] > sum[r + best]) best = k;
            if (mean[r + k] > mean[r + best_norm]) best_norm = k;
        }
        const char *cat = it->category ? it->category : "other";
        int ci = 0;
        while (ci < out->n_cat && strcmp(out->cat[ci], cat)) ci++;
        if (ci == out->n_cat && out->n_cat < 16) snprintf(out->cat[out->n_cat++], sizeof out->cat[0], "%s", cat);
        else if (ci == out->n_cat) {  // more than 16 categories: the last slot becomes "other"
            ci = 15;
            snprintf(out->cat[15], sizeof out->cat[0], "other");
        }
        out->cat_n[ci]++;
        out->cat_correct[ci] += best == it->answer;
        out->n_correct += best == it->answer;
        out->n_correct_norm += best_norm == it->answer;
        chance += 1.0 / it->n_choices;
        r += it->n_choices;
    }
    out->n_questions = nq;
    out->acc = nq ? (double)out->n_correct / (double)nq : NAN;
    out->acc_norm = nq ? (double)out->n_correct_norm / (double)nq : NAN;
    out->chance = nq ? chance / (double)nq : NAN;
    if (ll_sum) memcpy(ll_sum, sum, (size_t)nrows * sizeof *sum);
    if (ll_mean) memcpy(ll_mean, mean, (size_t)nrows * sizeof *mean);
    rc = 0;
out:
    for (int64_t i = 0; i < nrows; i++) free(rows[i]);
    free(rows), free(len), free(from), free(sum), free(mean);
    return rc;
}

// ---------------------------------------------------------------- output

int choice_add_json(const char *path, const ChoiceResult *r, int n, DlError *e) {
    cJSON *root = NULL;
    if (dl_file_exists(path)) {
        size_t len;
        char *text = dl_read_file(path, &len, e);
        if (!text) return -1;
        root = cJSON_Parse(text);
        free(text);
        if (!root || !cJSON_IsObject(root)) {
            cJSON_Delete(root);
            return dl_fail(e, "%s: not a JSON object; cannot add the multiple-choice results", path);
        }
    } else {
        root = cJSON_CreateObject();
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "choice");
    cJSON *arr = cJSON_AddArrayToObject(root, "choice");
    for (int i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "label", r[i].label);
        cJSON_AddStringToObject(o, "set", r[i].set);
        cJSON_AddNumberToObject(o, "questions", (double)r[i].n_questions);
        cJSON_AddNumberToObject(o, "correct", (double)r[i].n_correct);
        cJSON_AddNumberToObject(o, "correct_norm", (double)r[i].n_correct_norm);
        cJSON_AddNumberToObject(o, "acc", r[i].acc);
        cJSON_AddNumberToObject(o, "acc_norm", r[i].acc_norm);
        cJSON_AddNumberToObject(o, "chance", r[i].chance);
        cJSON *bc = cJSON_AddObjectToObject(o, "by_category");
        for (int k = 0; k < r[i].n_cat; k++) {
            cJSON *c = cJSON_AddObjectToObject(bc, r[i].cat[k]);
            cJSON_AddNumberToObject(c, "questions", (double)r[i].cat_n[k]);
            cJSON_AddNumberToObject(c, "correct", (double)r[i].cat_correct[k]);
            cJSON_AddNumberToObject(c, "acc", r[i].cat_n[k] ? (double)r[i].cat_correct[k] / (double)r[i].cat_n[k] : 0);
        }
        cJSON_AddItemToArray(arr, o);
    }
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    const size_t len = strlen(txt);
    txt[len] = '\n';  // cJSON_Print's terminator becomes the file's last newline
    const int rc = dl_write_file_atomic(path, txt, len + 1, e);
    free(txt);
    return rc;
}

void choice_print_table(FILE *f, const ChoiceResult *r, int n) {
    if (n <= 0) return;
    const char *labels[16], *sets[16];
    int nl = 0, ns = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < nl && strcmp(labels[k], r[i].label)) k++;
        if (k == nl && nl < 16) labels[nl++] = r[i].label;
        k = 0;
        while (k < ns && strcmp(sets[k], r[i].set)) k++;
        if (k == ns && ns < 16) sets[ns++] = r[i].set;
    }
    fprintf(f, "%-28s", "multiple choice (log-lik.)");
    for (int k = 0; k < nl; k++) fprintf(f, " %12s", labels[k]);
    fprintf(f, "\n");
    for (int j = 0; j < ns; j++) {
        for (int metric = 0; metric < 3; metric++) {
            char name[96];
            snprintf(name, sizeof name, "%s%s", metric ? "  " : "", metric == 0 ? sets[j] : metric == 1 ? "accuracy (sum)" : "accuracy (per token)");
            if (metric == 0) {
                double chance = NAN;
                int64_t nq = 0;
                for (int i = 0; i < n; i++)
                    if (!strcmp(r[i].set, sets[j])) chance = r[i].chance, nq = r[i].n_questions;
                snprintf(name, sizeof name, "%.12s: %lld q, chance %.2f", sets[j], (long long)nq, chance);
                fprintf(f, "%s\n", name);
                continue;
            }
            fprintf(f, "%-28s", name);
            for (int k = 0; k < nl; k++) {
                const ChoiceResult *x = NULL;
                for (int i = 0; i < n; i++)
                    if (!strcmp(r[i].set, sets[j]) && !strcmp(r[i].label, labels[k])) x = &r[i];
                if (x) fprintf(f, " %12.4f", metric == 1 ? x->acc : x->acc_norm);
                else fprintf(f, " %12s", "-");
            }
            fprintf(f, "\n");
        }
    }
}

int choice_eval_models(const char *const *files, int n_files, const EvalModel *models, const char *const *labels,
                       int n_models, const Tokenizer *tok, int64_t batch, ChoiceResult **out, int *n_out, DlError *e) {
    ChoiceResult *r = dl_calloc((size_t)(n_files * n_models > 0 ? n_files * n_models : 1), sizeof *r);
    int n = 0;
    for (int f = 0; f < n_files; f++) {
        ChoiceSet s;
        if (choice_set_load(files[f], &s, e)) {
            free(r);
            return -1;
        }
        for (int k = 0; k < n_models; k++) {
            double t0 = dl_now();
            if (choice_eval(&models[k], tok, &s, 0, batch, labels[k], &r[n], NULL, NULL, e)) {
                choice_set_free(&s);
                free(r);
                return -1;
            }
            dl_info("multiple choice %s, %s: %lld questions, accuracy %.4f (per token %.4f, chance %.2f), %.1f s", s.name,
                    labels[k], (long long)r[n].n_questions, r[n].acc, r[n].acc_norm, r[n].chance, dl_now() - t0);
            n++;
        }
        choice_set_free(&s);
    }
    *out = r;
    *n_out = n;
    return 0;
}
