// draft_vocab.c: the trimmed head's token list (draft_vocab.h): counting, choosing, writing and reading it.
#include "distill/draft_vocab.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/shards.h"

static int cmp_i32(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

int32_t *head_ids_sorted(const int32_t *ids, int64_t n, int64_t V, const char *who, DlError *e) {
    if (n <= 0 || n > V || !ids) {
        dl_fail(e, "%s: a head subset of %lld ids for a vocabulary of %lld (expected 1 .. %lld)", who, (long long)n,
                (long long)V, (long long)V);
        return NULL;
    }
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V) {
            dl_fail(e, "%s: head id %d (index %lld) is outside the vocabulary 0..%lld", who, ids[i], (long long)i,
                    (long long)V - 1);
            return NULL;
        }
    int32_t *s = dl_malloc((size_t)n * sizeof *s);
    memcpy(s, ids, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_i32);
    for (int64_t i = 1; i < n; i++)
        if (s[i] == s[i - 1]) {
            dl_fail(e, "%s: head id %d appears more than once", who, s[i]);
            free(s);
            return NULL;
        }
    return s;
}

typedef struct {
    const char *shard;
    int64_t V, *counts, sum;
} CountCtx;

static int count_rows(void *ctx, int64_t first, int64_t n, int64_t S, int64_t W, const int32_t *tok, const uint8_t *mask,
                      const uint8_t *reset, DlError *e) {
    (void)S, (void)reset;
    CountCtx *c = ctx;
    for (int64_t i = 0; i < n * W; i++) {
        if (!mask[i]) continue;
        if (tok[i] < 0 || tok[i] >= c->V)
            return dl_fail(e, "%s: token id %d in row %lld is outside the vocabulary 0..%lld", c->shard, tok[i],
                           (long long)(first + i / W), (long long)c->V - 1);
        c->counts[tok[i]]++, c->sum++;
    }
    return 0;
}

int draft_vocab_count(const char *shard, int64_t V, int64_t *counts, int64_t *total, DlError *e) {
    memset(counts, 0, (size_t)V * sizeof *counts);
    CountCtx c = {shard, V, counts, 0};
    const int rc = shard_walk_rows(shard, count_rows, &c, e);
    if (total) *total = c.sum;
    return rc;
}

typedef struct {
    int64_t count;
    int32_t id;
} IdCount;

static int cmp_by_count(const void *a, const void *b) {  // most frequent first, ties: lower id first
    const IdCount *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int draft_vocab_write(const char *dir, const int64_t *counts, int64_t V, int64_t keep, const char *source, int64_t *covered,
                      DlError *e) {
    if (keep <= 0 || keep > V)
        return dl_fail(e, "%s: draft vocabulary of %lld ids for a vocabulary of %lld (expected 1 .. %lld)", dir,
                       (long long)keep, (long long)V, (long long)V);
    IdCount *order = dl_malloc((size_t)V * sizeof *order);
    int64_t total = 0;
    for (int64_t i = 0; i < V; i++) order[i] = (IdCount){counts[i], (int32_t)i}, total += counts[i];
    qsort(order, (size_t)V, sizeof *order, cmp_by_count);
    cJSON *root = cJSON_CreateObject(), *ids = cJSON_CreateArray(), *cnt = cJSON_CreateArray();
    cJSON_AddStringToObject(root, "format", "distill-draft-vocab");
    cJSON_AddNumberToObject(root, "version", 1);
    cJSON_AddNumberToObject(root, "vocab_size", (double)V);
    cJSON_AddNumberToObject(root, "counted_tokens", (double)total);
    cJSON_AddStringToObject(root, "source", source ? source : "");
    int64_t kept = 0;
    for (int64_t i = 0; i < keep; i++) {
        cJSON_AddItemToArray(ids, cJSON_CreateNumber(order[i].id));
        cJSON_AddItemToArray(cnt, cJSON_CreateNumber((double)order[i].count));
        kept += order[i].count;
    }
    if (covered) *covered = kept;
    cJSON_AddItemToObject(root, "ids", ids);
    cJSON_AddItemToObject(root, "counts", cnt);
    char *txt = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    free(order);
    char *path = dl_path_join(dir, DRAFT_VOCAB_FILE);
    const int rc = dl_write_file_atomic(path, txt, strlen(txt), e);
    free(path);
    free(txt);
    return rc;
}

// An array of n integers in [lo, hi] (exact in a double), or -1 with e naming key and index.
static int int_array(const cJSON *root, const char *key, const char *path, int64_t lo, int64_t hi, int64_t **out,
                     int64_t *n, DlError *e) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsArray(a)) return dl_fail(e, "%s: \"%s\" must be an array of integers", path, key);
    *n = cJSON_GetArraySize(a);
    *out = dl_malloc((size_t)(*n > 0 ? *n : 1) * sizeof **out);
    int64_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a) {
        const double v = cJSON_IsNumber(it) ? it->valuedouble : -1.5;
        if (!cJSON_IsNumber(it) || v != (double)(int64_t)v || v < (double)lo || v > (double)hi) {
            free(*out);
            *out = NULL;
            return dl_fail(e, "%s: \"%s\"[%lld] must be an integer in %lld..%lld", path, key, (long long)i,
                           (long long)lo, (long long)hi);
        }
        (*out)[i++] = (int64_t)v;
    }
    return 0;
}

int draft_vocab_read(const char *dir, int64_t V, int64_t want, DraftVocab *v, DlError *e) {
    memset(v, 0, sizeof *v);
    char *path = dl_path_join(dir, DRAFT_VOCAB_FILE);
    if (!dl_file_exists(path)) {
        free(path);
        return 1;
    }
    size_t len = 0;
    char *txt = dl_read_file(path, &len, e);
    cJSON *root = txt ? cJSON_ParseWithLength(txt, len) : NULL;
    int64_t *ids = NULL, *cnt = NULL, n = 0, nc = 0;
    int rc = -1;
    if (!txt) goto done;
    if (!root || !cJSON_IsObject(root)) {
        dl_fail(e, "%s: not a JSON object", path);
        goto done;
    }
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(root, "format"), *vs = cJSON_GetObjectItemCaseSensitive(root, "vocab_size"),
                *tot = cJSON_GetObjectItemCaseSensitive(root, "counted_tokens");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "distill-draft-vocab")) {
        dl_fail(e, "%s: \"format\" must be \"distill-draft-vocab\"", path);
        goto done;
    }
    if (!cJSON_IsNumber(vs) || vs->valuedouble != (double)V) {
        if (cJSON_IsNumber(vs)) dl_fail(e, "%s: written for a vocabulary of %.17g ids, the draft has %lld", path, vs->valuedouble, (long long)V);
        else dl_fail(e, "%s: \"vocab_size\" must be a number (the draft has %lld ids)", path, (long long)V);
        goto done;
    }
    if (!cJSON_IsNumber(tot) || tot->valuedouble < 0) {
        dl_fail(e, "%s: \"counted_tokens\" must be a non-negative number", path);
        goto done;
    }
    if (int_array(root, "ids", path, 0, V - 1, &ids, &n, e) || int_array(root, "counts", path, 0, INT64_MAX / 2, &cnt, &nc, e))
        goto done;
    if (n == 0 || nc != n) {
        dl_fail(e, "%s: %lld ids and %lld counts (expected the same number, at least 1)", path, (long long)n, (long long)nc);
        goto done;
    }
    if (want < 0 || want > n) {
        dl_fail(e, "%s: %lld ids asked for, the file lists %lld", path, (long long)want, (long long)n);
        goto done;
    }
    const int64_t k = want ? want : n;
    v->ids = dl_malloc((size_t)k * sizeof *v->ids);
    int64_t covered = 0;
    for (int64_t i = 0; i < k; i++) v->ids[i] = (int32_t)ids[i], covered += cnt[i];
    int32_t *chk = head_ids_sorted(v->ids, k, V, path, e);  // repeated ids
    if (!chk) {
        draft_vocab_free(v);
        goto done;
    }
    free(chk);
    v->n = k;
    v->total = (int64_t)tot->valuedouble;
    v->coverage = v->total > 0 ? (double)covered / (double)v->total : 0.0;
    rc = 0;
done:
    free(ids), free(cnt);
    cJSON_Delete(root);
    free(txt);
    free(path);
    return rc;
}

void draft_vocab_free(DraftVocab *v) {
    free(v->ids);
    memset(v, 0, sizeof *v);
}
