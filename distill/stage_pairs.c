// stage_pairs.c: the `pairs` stage: preference pairs from teacher samples, for the dpo stage.
//
// Input: an LM data set of prompt + response documents (a generate stage's output, usually with several
// responses per prompt; or chat data): the prompt is the document up to its first loss-masked token, the
// response is the masked span (it must be one span). Documents with identical prompt tokens form a group.
// Every response of a group of >= 2 is scored (docs/RECIPES.md, "Preference pairs from teacher samples"):
//   score = mean over response tokens of log p_teacher(token | prompt, earlier tokens)   (lm_score_rows)
//           - unfinished_penalty   if the response does not end with a stop token (it hit max_new_tokens)
//           - repeat_penalty * the fraction of its 4-grams that already occurred earlier in the response
// chosen = the best score (earliest on ties), rejected = the worst (latest on ties); a group whose
// best - worst < min_margin gives no pair. Output: STAGE_DIR/OUTPUT.train.h5, a preference shard as
// `distill tokenize --format preference` writes (prompt with the assistant header; responses through the
// end-of-turn token), and STAGE_DIR/pairs.jsonl with every group's decision and scores.
//
// Resume: the responses are scored in fixed chunks (4 x batch_size documents in document order); each chunk's
// scores are appended to STAGE_DIR/scores.bin and fsynced, so a restarted stage keeps them, rescores only
// unfinished chunks (exactly the same batches: bit-identical) and writes the same outputs.
// The outputs are written under temporary names and renamed when complete.
// Reuse (`reuse = true`, the default; stage_reuse.h): a complete scores.bin is kept as
// OUTPUT_DIR/.pairs-cache/KEY.bin, KEY a hash of the documents, batch_size, the teacher, device and version; a
// later pairs stage with the same KEY (the 25% demo after the 50% one) starts from it and scores nothing. The
// penalties and min_margin act after scoring, so they may differ.
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/eval_choice.h"
#include "distill/metrics.h"
#include "distill/shards.h"
#include "distill/stage_common.h"
#include "distill/stage_reuse.h"

#define REPEAT_N 4  // n-gram length of the repetition measure

typedef struct {
    int32_t *ids;
    int64_t n;          // tokens of the document
    int64_t p;          // prompt length: the response is ids[p .. n_used)
    int64_t n_used;     // end of the response (the last masked token + 1)
    int64_t group;      // group index, or -1 (bad / not scored)
    bool scored;
    double sum;         // summed teacher log-prob of the response
    double score, mean, repeat;
    bool finished;
} Doc;

// Response tokens of d.
static inline int64_t resp_len(const Doc *d) { return d->n_used - d->p; }

// Fraction of the response's REPEAT_N-grams (positions 0 .. m-REPEAT_N) that occurred at an earlier position.
typedef struct {
    uint64_t h;
    int64_t pos;
} GramKey;
static int cmp_gram(const void *a, const void *b) {
    const GramKey *x = a, *y = b;
    if (x->h != y->h) return x->h < y->h ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}
static double repeat_fraction(const int32_t *r, int64_t m) {
    const int64_t k = m - REPEAT_N + 1;
    if (k < 2) return 0;
    GramKey *g = dl_malloc((size_t)k * sizeof *g);
    for (int64_t i = 0; i < k; i++) {
        uint64_t h = 1469598103934665603ull;
        for (int j = 0; j < REPEAT_N; j++) h = (h ^ (uint32_t)r[i + j]) * 1099511628211ull;
        g[i] = (GramKey){h, i};
    }
    qsort(g, (size_t)k, sizeof *g, cmp_gram);
    int64_t rep = 0;
    for (int64_t i = 1, first = 0; i < k; i++) {
        if (g[i].h != g[first].h) {
            first = i;
            continue;
        }
        rep += !memcmp(r + g[i].pos, r + g[first].pos, REPEAT_N * sizeof *r);  // equal, not only a hash collision
    }
    free(g);
    return (double)rep / (double)k;
}

// Orders documents by prompt tokens (then index), so equal prompts are adjacent.
static int cmp_prompt(const void *a, const void *b, void *ctx) {
    const Doc *d = ctx;
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    const Doc *u = &d[x], *v = &d[y];
    int64_t n = DL_MIN(u->p, v->p);
    int c = memcmp(u->ids, v->ids, (size_t)n * 4);  // any fixed order will do: only equality matters
    if (c) return c;
    if (u->p != v->p) return u->p < v->p ? -1 : 1;
    return x < y ? -1 : x > y;
}

// todo order: longest scored length first, then document order
static int cmp_used_desc(const void *a, const void *b, void *ctx) {
    const Doc *d = ctx;
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    if (d[x].n_used != d[y].n_used) return d[x].n_used > d[y].n_used ? -1 : 1;
    return x < y ? -1 : x > y;
}

// scores.bin records: int64 doc, int64 response tokens, double summed log-prob. A torn last record is cut;
// a record that does not fit the data (index or length) means the file belongs to other data: an error.
static int64_t load_scores(const char *path, Doc *d, int64_t n, DlError *e) {
    if (!dl_file_exists(path)) return 0;
    size_t len;
    char *buf = dl_read_file(path, &len, e);
    if (!buf) return -1;
    size_t off = 0;
    int64_t got = 0;
    for (; off + 24 <= len; off += 24) {
        int64_t i, m;
        double s;
        memcpy(&i, buf + off, 8), memcpy(&m, buf + off + 8, 8), memcpy(&s, buf + off + 16, 8);
        if (i < 0 || i >= n || d[i].group < 0 || m != resp_len(&d[i])) {
            free(buf);
            return dl_fail(e, "%s: record %lld (document %lld, %lld tokens) does not match the data set; it was written "
                           "for other data: delete it (or the stage directory) to rescore", path, (long long)(off / 24),
                           (long long)i, (long long)m);
        }
        if (!d[i].scored) got++;
        d[i].scored = true, d[i].sum = s;
    }
    free(buf);
    if (off < len && truncate(path, (off_t)off) != 0)
        return dl_fail(e, "%s: cannot cut a torn record: %s", path, strerror(errno));
    return got;
}

// Reads the documents, checks that each is prompt + one response span, groups equal prompts. Bad documents
// are errors (bad_records = "fail") or skipped with a warning naming shard and document.
static int read_docs(const char *shard, const DataSpec *ds, int64_t max_pos, Doc **out, int64_t *n_out, ShardInfo *info,
                     char **pre, int64_t *n_bad, DlError *e) {
    ShardReader *r = NULL;
    if (shard_open(&r, shard, e)) return -1;
    *info = *shard_info(r);
    *pre = shard_attr_str(r, "tokenizer_pre");
    if (info->kind != SHARD_LM) {
        shard_close(r);
        return dl_fail(e, "%s: a preference shard; the pairs stage reads prompt + response documents", shard);
    }
    const int64_t n = info->n_docs;
    Doc *d = dl_calloc((size_t)(n ? n : 1), sizeof *d);
    *n_bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint8_t *mask = NULL;
        d[i].group = -1;
        if (shard_read_doc(r, i, &d[i].ids, &mask, &d[i].n, e)) {
            free(mask);
            goto fail;
        }
        int64_t p = 0, q = d[i].n;
        while (p < d[i].n && !mask[p]) p++;
        while (q > p && !mask[q - 1]) q--;
        int64_t gap = -1;
        for (int64_t t = p; t < q && gap < 0; t++)
            if (!mask[t]) gap = t;
        free(mask);
        char why[256] = "";
        if (p == d[i].n) snprintf(why, sizeof why, "no response (the loss mask is 0 everywhere)");
        else if (p == 0) snprintf(why, sizeof why, "no prompt (the loss mask starts at token 0)");
        else if (gap >= 0)
            snprintf(why, sizeof why, "the response is not one span (unmasked token %lld inside it: a multi-turn "
                     "conversation?); expected prompt + one response", (long long)gap);
        else if (max_pos > 0 && q > max_pos)
            snprintf(why, sizeof why, "%lld tokens, more than the teacher's context %lld", (long long)q, (long long)max_pos);
        if (*why) {
            if (ds->bad_records == BAD_FAIL) {
                dl_fail(e, "%s: document %lld: %s", shard, (long long)i, why);
                goto fail;
            }
            if ((*n_bad)++ < 5) dl_warn("%s: document %lld: %s; skipped", shard, (long long)i, why);
            continue;
        }
        d[i].p = p, d[i].n_used = q, d[i].group = 0;
    }
    shard_close(r);
    *out = d;
    *n_out = n;
    return 0;
fail:
    shard_close(r);
    for (int64_t i = 0; i < n; i++) free(d[i].ids);
    free(d);
    return -1;
}

static void docs_free(Doc *d, int64_t n) {
    if (!d) return;
    for (int64_t i = 0; i < n; i++) free(d[i].ids);
    free(d);
}

// The decision on one group (see the header comment).
typedef struct {
    int64_t first, n;   // first document (in document order) and size
    int64_t chosen, rejected;
    double margin;
    bool pair;
} Group;

static void json_resp(cJSON *o, const char *key, const Doc *d, int64_t i) {
    cJSON *x = cJSON_AddObjectToObject(o, key);
    cJSON_AddNumberToObject(x, "doc", (double)i);
    cJSON_AddNumberToObject(x, "tokens", (double)resp_len(&d[i]));
    cJSON_AddNumberToObject(x, "score", d[i].score);
    cJSON_AddNumberToObject(x, "mean_logprob", d[i].mean);
    cJSON_AddBoolToObject(x, "finished", d[i].finished);
    cJSON_AddNumberToObject(x, "repeat", d[i].repeat);
}

static int run_pairs(RunContext *ctx, const StageSpec *st) {
    const Recipe *rec = ctx->recipe;
    DlError e;
    int rc = DL_EXIT_RUNTIME;
    Tokenizer *tok = NULL;
    LoadedModel t;
    memset(&t, 0, sizeof t);
    bool have_t = false;
    Doc *d = NULL;
    int64_t nd = 0, n_bad = 0;
    ShardInfo info;
    char *pre = NULL, *shard = NULL, *out_path = NULL, *jpath = NULL;
    char *spath = dl_path_join(ctx->stage_dir, "scores.bin"), *cache = NULL;
    ScoreKeep keep;  // the scoring engine, kept across chunks
    memset(&keep, 0, sizeof keep);
    FILE *sf = NULL;
    DlAtomic ja = {0};  // pairs.jsonl, written atomically (ja.f open until committed)
    int64_t *order = NULL, *todo = NULL, *len = NULL, *from = NULL;
    const int32_t **rows = NULL;
    double *sum = NULL;
    Group *g = NULL;
    ShardWriter *w = NULL;
    const DataSpec *in = &rec->data[st->data_index], *outd = &rec->data[st->output_index];

    if (stage_data_shard(ctx, st->data_index, SPLIT_TRAIN, &shard, &e) ||
        read_docs(shard, in, rec->teacher_cfg.base.max_pos, &d, &nd, &info, &pre, &n_bad, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (stage_load_teacher(ctx, &t, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    have_t = true;
    if (info.vocab_size > t.hc.base.vocab) {
        dl_fail(&e, "%s: vocabulary %d is larger than the teacher's %d", shard, info.vocab_size, t.hc.base.vocab);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    // stop tokens: eos and the end-of-turn tokens of the chat families (as the generate stage); without a
    // tokenizer (a config-only teacher and tokenized data) the teacher's eos id
    int32_t stops[3] = {t.hc.base.eos_id, -1, -1};
    {
        DlError te;
        if (stage_load_tokenizer(ctx, &tok, &te) == 0) {
            if (tokenizer_hash(tok) != info.tokenizer_hash) {
                dl_fail(&e, "%s was written with another tokenizer (hash %016llx) than the recipe's (%016llx)", shard,
                        (unsigned long long)info.tokenizer_hash, (unsigned long long)tokenizer_hash(tok));
                rc = DL_EXIT_INPUT;
                goto fail;
            }
            stops[0] = tokenizer_eos(tok), stops[1] = tokenizer_token_id(tok, "<|im_end|>");
            stops[2] = tokenizer_token_id(tok, "<|eot_id|>");
        } else {
            dl_warn("%s: no tokenizer (%s); a response counts as finished when it ends with eos id %d", st->name, te.msg,
                    stops[0]);
        }
    }

    // groups of equal prompts, numbered in the order of their first document
    order = dl_malloc((size_t)(nd ? nd : 1) * sizeof *order);
    int64_t ngood = 0;
    for (int64_t i = 0; i < nd; i++)
        if (d[i].group >= 0) order[ngood++] = i;
    qsort_r(order, (size_t)ngood, sizeof *order, cmp_prompt, d);
    int64_t ng = 0;
    g = dl_calloc((size_t)(ngood ? ngood : 1), sizeof *g);
    for (int64_t k = 0; k < ngood;) {
        int64_t j = k + 1;
        while (j < ngood && d[order[j]].p == d[order[k]].p && !memcmp(d[order[j]].ids, d[order[k]].ids, (size_t)d[order[k]].p * 4)) j++;
        g[ng].first = order[k];  // smallest index of the run (ties in cmp_prompt go by index)
        g[ng].n = j - k;
        for (int64_t x = k; x < j; x++) d[order[x]].group = ng;
        ng++;
        k = j;
    }
    {  // renumber by first document
        int64_t *rank = dl_malloc((size_t)(ng ? ng : 1) * sizeof *rank), *byfirst = dl_malloc((size_t)(ng ? ng : 1) * sizeof *byfirst);
        int64_t m = 0;
        for (int64_t i = 0; i < nd; i++)
            if (d[i].group >= 0 && g[d[i].group].first == i) byfirst[m] = d[i].group, rank[d[i].group] = m, m++;
        Group *g2 = dl_calloc((size_t)(ng ? ng : 1), sizeof *g2);
        for (int64_t x = 0; x < ng; x++) g2[x] = g[byfirst[x]];
        for (int64_t i = 0; i < nd; i++)
            if (d[i].group >= 0) d[i].group = rank[d[i].group];
        free(g), free(rank), free(byfirst);
        g = g2;
    }
    // the documents to score: those in groups of >= 2, longest first (then in document order), in fixed chunks:
    // consecutive chunks then share batch shapes, and the kept engine (ScoreKeep) serves them all
    todo = dl_malloc((size_t)(nd ? nd : 1) * sizeof *todo);
    int64_t ntodo = 0, n_single = 0;
    for (int64_t x = 0; x < ng; x++) n_single += g[x].n == 1;
    for (int64_t i = 0; i < nd; i++)
        if (d[i].group >= 0 && g[d[i].group].n >= 2) todo[ntodo++] = i;
        else if (d[i].group >= 0) d[i].group = -2 - d[i].group;  // a single response: kept out of scoring
    qsort_r(todo, (size_t)ntodo, sizeof *todo, cmp_used_desc, d);
    const int64_t B = st->batch_size > 0 ? st->batch_size : 8, CH = 4 * B;
    int64_t done = 0;
    if (!ctx->resume) unlink(spath);
    bool reused = false;
    if (st->reuse) {
        ReuseKey k;
        reuse_key_begin(&k, ctx, "pairs");
        reuse_key_add(&k, &B, sizeof B);
        reuse_key_add(&k, "pad32-sorted", 12);  // the batches since session 9: lengths rounded up to 32, longest first
        reuse_key_add(&k, &nd, sizeof nd);
        for (int64_t i = 0; i < nd; i++) {
            const int64_t h[4] = {d[i].n, d[i].p, d[i].n_used, d[i].group >= 0};
            reuse_key_add(&k, h, sizeof h);
            reuse_key_add(&k, d[i].ids, (size_t)d[i].n * 4);
        }
        cache = reuse_key_path(&k, ctx);
        const int f = reuse_fetch(cache, spath, &e);
        if (f < 0) goto fail;
        reused = f == 1;
    }
    if (ctx->resume || reused) {
        // single-response documents are never in scores.bin: mark them invalid while loading
        done = load_scores(spath, d, nd, &e);
        if (done < 0 && reused) {  // the cache only saves time: a file that does not fit is dropped and rescored
            reuse_drop(cache, spath, st->name, e.msg);
            for (int64_t i = 0; i < nd; i++) d[i].scored = false;
            done = 0, reused = false;
        }
        if (done < 0) {
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        if (reused) dl_info("%s: %lld scores reused from %s", st->name, (long long)done, cache);
    }
    sf = fopen(spath, "ab");
    if (!sf) {
        dl_fail(&e, "%s: cannot open: %s", spath, strerror(errno));
        goto fail;
    }
    rows = dl_malloc((size_t)CH * sizeof *rows);
    len = dl_malloc((size_t)CH * sizeof *len), from = dl_malloc((size_t)CH * sizeof *from);
    sum = dl_malloc((size_t)CH * sizeof *sum);
    if (ngood == 0) {
        dl_fail(&e, "data '%s': no usable document (%lld bad: see the warnings above; expected prompt + one response span)",
                in->name, (long long)n_bad);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (ng == n_single) {
        dl_fail(&e, "data '%s': every prompt has a single response (%lld prompts): a pair needs >= 2 responses per prompt "
                "(sample several per prompt in the generate stage)", in->name, (long long)ng);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    dl_info("%s: %lld documents, %lld prompts with >= 2 responses (%lld responses to score, %lld %s), %lld with one, "
            "%lld bad documents skipped", st->name, (long long)nd, (long long)(ng - n_single), (long long)ntodo, (long long)done,
            reused ? "reused" : "kept from the interrupted run", (long long)n_single, (long long)n_bad);
    EvalModel em = {&t.hc, &t.reg, t.params, stage_device(ctx)};
    Progress prog;
    progress_begin(&prog, st->name, done, ntodo);
    int64_t n_scored = done, ntok = 0;
    double t0 = dl_now();
    for (int64_t c0 = 0; c0 < ntodo; c0 += CH) {
        const int64_t m = DL_MIN(CH, ntodo - c0);
        bool all = true;
        for (int64_t k = 0; k < m; k++) all &= d[todo[c0 + k]].scored;
        if (all) continue;
        if (run_should_stop(ctx)) {
            progress_end(&prog);
            rc = DL_EXIT_INTERRUPTED;
            goto out;
        }
        for (int64_t k = 0; k < m; k++) {
            const Doc *x = &d[todo[c0 + k]];
            rows[k] = x->ids, len[k] = x->n_used, from[k] = x->p;
            ntok += x->n_used;
        }
        if (lm_score_rows_keep(&em, rows, len, from, m, B, sum, NULL, &keep, &e)) goto fail;
        for (int64_t k = 0; k < m; k++) {
            Doc *x = &d[todo[c0 + k]];
            int64_t i = todo[c0 + k], rl = resp_len(x);
            if (!x->scored) n_scored++;
            x->scored = true, x->sum = sum[k];
            if (fwrite(&i, 8, 1, sf) != 1 || fwrite(&rl, 8, 1, sf) != 1 || fwrite(&sum[k], 8, 1, sf) != 1) {
                dl_fail(&e, "%s: write failed: %s", spath, strerror(errno));
                goto fail;
            }
        }
        if (fflush(sf) || fsync(fileno(sf))) {
            dl_fail(&e, "%s: write failed: %s", spath, strerror(errno));
            goto fail;
        }
        progress_update(&prog, n_scored, NAN, (double)ntok / (dl_now() - t0 + 1e-9));
    }
    progress_end(&prog);
    if (keep.built)
        dl_info("%s: scored with %lld engine shapes (%.1f s building them)", st->name, (long long)keep.built, keep.build_s);
    score_keep_free(&keep);
    fclose(sf);
    sf = NULL;
    if (cache && (!reused || done < ntodo)) reuse_keep(cache, spath, st->name);  // every response is scored

    // scores and decisions
    for (int64_t k = 0; k < ntodo; k++) {
        Doc *x = &d[todo[k]];
        const int64_t rl = resp_len(x);
        const int32_t last = x->ids[x->n_used - 1];
        x->mean = x->sum / (double)rl;
        x->finished = last == stops[0] || last == stops[1] || last == stops[2];
        x->repeat = repeat_fraction(x->ids + x->p, rl);
        x->score = x->mean - (x->finished ? 0 : st->unfinished_penalty) - st->repeat_penalty * x->repeat;
    }
    for (int64_t x = 0; x < ng; x++) g[x].chosen = g[x].rejected = -1;
    for (int64_t k = 0; k < ntodo; k++) {  // document order: ties keep the earliest best and the latest worst
        const int64_t i = todo[k];
        Group *G = &g[d[i].group];
        if (G->chosen < 0 || d[i].score > d[G->chosen].score) G->chosen = i;
        if (G->rejected < 0 || d[i].score <= d[G->rejected].score) G->rejected = i;
    }
    ShardWriterOpts o = {.kind = SHARD_PREF, .tokenizer_hash = info.tokenizer_hash, .tokenizer_pre = pre ? pre : "",
                         .vocab_size = info.vocab_size, .deflate = 1};
    char name[300];
    snprintf(name, sizeof name, "%s.train.h5", outd->name);
    out_path = dl_path_join(ctx->stage_dir, name);
    jpath = dl_path_join(ctx->stage_dir, "pairs.jsonl");
    if (dl_atomic_open(&ja, jpath, &e)) goto fail;
    if (shard_writer_open(&w, out_path, &o, &e)) goto fail;
    int64_t n_pairs = 0, n_low = 0, n_unfin = 0;
    double sum_margin = 0, sum_ch = 0, sum_rj = 0;
    for (int64_t x = 0; x < ng; x++) {
        Group *G = &g[x];
        if (G->n < 2) continue;
        const Doc *c = &d[G->chosen], *r = &d[G->rejected];
        G->margin = c->score - r->score;
        G->pair = G->chosen != G->rejected && G->margin >= st->min_margin && G->margin > 0;
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "group", (double)x);
        cJSON_AddNumberToObject(j, "first_doc", (double)G->first);
        cJSON_AddNumberToObject(j, "responses", (double)G->n);
        cJSON_AddNumberToObject(j, "prompt_tokens", (double)c->p);
        cJSON_AddNumberToObject(j, "margin", G->margin);
        cJSON_AddBoolToObject(j, "pair", G->pair);
        json_resp(j, "chosen", d, G->chosen);
        json_resp(j, "rejected", d, G->rejected);
        char *txt = cJSON_PrintUnformatted(j);
        cJSON_Delete(j);
        int bad = fprintf(ja.f, "%s\n", txt) < 0;
        free(txt);
        if (bad) {
            dl_fail(&e, "%s: write failed: %s", ja.tmp, strerror(errno));
            goto fail;
        }
        if (!G->pair) {
            n_low++;
            continue;
        }
        if (shard_add_pair(w, c->ids, c->p, c->ids + c->p, resp_len(c), r->ids + r->p, resp_len(r), &e)) goto fail;
        n_pairs++;
        sum_margin += G->margin, sum_ch += c->score, sum_rj += r->score;
        n_unfin += !r->finished;
    }
    if (dl_atomic_commit(&ja, &e)) goto fail;  // the decisions are kept, also when there is no pair (to audit)
    if (n_pairs == 0) {
        dl_fail(&e, "no pairs: all %lld prompts with >= 2 responses have a score margin below min_margin = %g (see %s)",
                (long long)n_low, st->min_margin, jpath);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (shard_writer_attr_str(w, "sources", shard, &e) || shard_writer_attr_str(w, "input_format", "pairs", &e) ||
        shard_writer_attr_i64(w, "n_prompts", ng, &e) || shard_writer_attr_i64(w, "n_single_response", n_single, &e) ||
        shard_writer_attr_i64(w, "n_below_margin", n_low, &e) || shard_writer_attr_i64(w, "n_bad_docs", n_bad, &e))
        goto fail;
    {
        ShardWriter *w1 = w;
        w = NULL;
        if (shard_writer_close(w1, &e)) goto fail;
    }
    dl_info("%s: %lld pairs -> data '%s' (%s); %lld prompts below min_margin %g; mean margin %.3f, chosen score %.3f, "
            "rejected %.3f (%lld rejected did not finish)", st->name, (long long)n_pairs, outd->name, out_path,
            (long long)n_low, st->min_margin, sum_margin / n_pairs, sum_ch / n_pairs, sum_rj / n_pairs, (long long)n_unfin);
    rc = DL_EXIT_OK;
    goto out;
fail:
    fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    score_keep_free(&keep);
    if (w) shard_writer_abort(w);
    if (ja.f) dl_atomic_abort(&ja);
    if (sf) fclose(sf);
    docs_free(d, nd);
    free(order), free(todo), free(g), free(rows), free(len), free(from), free(sum);
    free(pre), free(shard), free(out_path), free(jpath), free(spath), free(cache);
    tokenizer_free(tok);
    if (have_t) model_free(&t);
    return rc;
}

// Peak host bytes of the CPU engine: fp32 teacher weights, one layer's activations of a batch of
// batch_size rows of the input set's seq_len tokens (hidden states, MLP, attention scores), the logits chunk.
static double estimate_pairs(const Recipe *r, const StageSpec *st, int step) {
    (void)step;
    const LlamaConfig *c = &r->teacher_cfg.base;
    HybridConfig h;
    hybrid_config_teacher(&h, c);
    Registry reg;
    model_build_registry(&h, &reg);
    double P = (double)reg_params_numel(&reg);
    reg_free(&reg);
    double T = st->data_index >= 0 ? r->data[st->data_index].seq_len : 2048, B = st->batch_size > 0 ? st->batch_size : 8;
    double V = c->vocab, act = B * T * (10.0 * c->d_model + 3.0 * c->d_ff + (double)c->n_head * T);
    double chunk = DL_MIN(B * T, DL_MAX(1.0, (double)(16 << 20) / V));
    return 4 * P + 4 * act + 4 * chunk * V;
}

DL_STAGE(stage_pairs_def, {.kind = STAGE_PAIRS,
                           .summary = "preference pairs: the teacher scores sampled responses, best vs worst per prompt",
                           .run = run_pairs, .estimate_bytes = estimate_pairs})
