// stage_generate.c: the `generate` stage (sequence-level KD pseudo-labels): the teacher answers the
// prompts of a data set; each prompt + response becomes a document of the output data set (loss mask on
// the response, which ends with the stop token), split into train / held-out shards.
//
// Prompts: chat data ({"messages": [...]}, trailing assistant turns dropped, or {"prompt": "..."} as one
// user turn) rendered with the teacher's chat template and the assistant header; jsonl/text data as raw
// text to continue. samples_per_prompt = S gives S responses per prompt (jobs (prompt, sample)), each from
// its own RNG stream and each its own document (prompt-major order). Decoding is continuously batched over
// jobs of any prompt lengths (sorted by length; batch_size slots, each a sequence with its own length: a
// finished job's slot takes the next job, whose prompt is prefilled with the other new ones in a second decoder
// and copied in, decoder_copy_seq), with temperature / top-p / top-k sampling from one RNG stream per job, so the
// output does not depend on batching or on interruptions.
// as_prompts = true: the responses become prompts instead of documents (write_prompt_set: teacher-written
// prompts), STAGE_DIR/OUTPUT.prompts.jsonl, which a later generate stage reads after OUTPUT's own sources.
// Devices: run.device = "cpu" decodes with the CPU Decoder (engine.h) and sample.h (rng.h stream per job);
// "cuda" with DecoderCuda and the GPU sampler (kernels/engine/decode_cuda.h: counter-based draws keyed by
// (seed, prompt, sample, token position)). Each is reproducible; they give different samples.
// Resume: finished responses are appended to STAGE_DIR/generated.bin as they finish (fsynced every
// batch_size / 4 of them); a restarted stage keeps them and generates the rest. The shards are written once all jobs are done.
// Reuse (`reuse = true`, the default; stage_reuse.h): a finished generated.bin is also kept as
// OUTPUT_DIR/.generate-cache/KEY.bin, KEY a hash of everything the responses depend on (program version,
// device, teacher file, tokenizer, the prompt token ids, samples per prompt, sampling settings, batch size,
// seed). A later generate with the same KEY (e.g. the 25% recipe after the 50% one, or a run restarted
// from scratch) starts from that file through the resume path above and generates nothing.
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/chat.h"
#include "distill/engine.h"
#include "distill/metrics.h"
#include "distill/prompt_filter.h"
#include "distill/sample.h"
#include "distill/stage_reuse.h"
#include "distill/shards.h"
#include "distill/stage_common.h"
#ifdef DISTILL_CUDA
#include "kernels/engine/decode_cuda.h"
#endif

typedef struct {
    int32_t *ids;
    int64_t n;
} Prompt;

// One response to produce: job j answers prompt j / S as its sample j % S (S = samples_per_prompt).
typedef struct {
    int32_t *resp;  // generated (NULL until done)
    int64_t n_resp; // -1: skipped (prompt too long)
} Job;

static void prompts_free(Prompt *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) free(p[i].ids);
    free(p);
}
static void jobs_free(Job *j, int64_t n) {
    for (int64_t i = 0; j && i < n; i++) free(j[i].resp);
    free(j);
}

// One JSONL record -> prompt ids; returns 1 (ok), 0 (bad record: why filled), -1 (error in e).
static int record_prompt(const Tokenizer *tok, ChatFamily fam, bool chat, const char *field, const char *line,
                         Prompt *out, char *why, size_t nw, DlError *e) {
    cJSON *o = cJSON_Parse(line);
    int rc = 0;
    if (!o || !cJSON_IsObject(o)) {
        snprintf(why, nw, "not a JSON object");
        goto out;
    }
    if (chat) {
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(o, "messages"), *pr = cJSON_GetObjectItemCaseSensitive(o, "prompt");
        ChatMessage m[64];
        int n = 0;
        if (cJSON_IsArray(msgs)) {
            const cJSON *x;
            cJSON_ArrayForEach(x, msgs) {
                const cJSON *r = cJSON_GetObjectItemCaseSensitive(x, "role"), *c = cJSON_GetObjectItemCaseSensitive(x, "content");
                if (!cJSON_IsString(r) || !cJSON_IsString(c) || n == 64) {
                    snprintf(why, nw, "messages must be {\"role\": str, \"content\": str} (at most 64)");
                    goto out;
                }
                m[n++] = (ChatMessage){r->valuestring, c->valuestring};
            }
            while (n > 0 && !strcmp(m[n - 1].role, "assistant")) n--;  // the teacher writes the answer
        } else if (cJSON_IsString(pr)) {
            m[n++] = (ChatMessage){"user", pr->valuestring};
        }
        if (n == 0) {
            snprintf(why, nw, "no \"messages\" with a non-assistant turn, and no \"prompt\"");
            goto out;
        }
        DlError ce;
        if (chat_render(tok, fam, m, n, true, &out->ids, NULL, &out->n, &ce)) {
            snprintf(why, nw, "%s", ce.msg);
            goto out;
        }
    } else {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, field ? field : "text");
        if (!cJSON_IsString(t) || !*t->valuestring) {
            snprintf(why, nw, "missing string field \"%s\"", field ? field : "text");
            goto out;
        }
        if (tokenizer_encode(tok, t->valuestring, strlen(t->valuestring), &out->ids, &out->n, e)) {
            rc = -1;
            goto out;
        }
    }
    rc = 1;
out:
    cJSON_Delete(o);
    return rc;
}

// STAGE_DIR/NAME.prompts.jsonl of the generate stage that writes prompt set ds (as_prompts; newly allocated).
static char *written_prompts_path(const RunContext *ctx, const DataSpec *ds) {
    char *dir = run_stage_dir(ctx, ds->produced_by), name[300];
    snprintf(name, sizeof name, "%s.prompts.jsonl", ds->name);
    char *p = dl_path_join(dir, name);
    free(dir);
    return p;
}

static int read_prompts(const RunContext *ctx, const StageSpec *st, const DataSpec *ds, const Tokenizer *tok,
                        Prompt **out, int64_t *n_out, DlError *e) {
    ChatFamily fam = CHAT_CHATML;
    bool chat = ds->format == FMT_CHAT;
    if (chat && chat_family_for(tok, &fam, e)) return -1;
    int64_t cap = 64, n = 0, limit = st->max_prompts > 0 ? st->max_prompts : INT64_MAX, bad = 0;
    if (ds->max_records > 0 && ds->max_records < limit) limit = ds->max_records;
    Prompt *p = dl_calloc((size_t)cap, sizeof *p);
    // the files: the sources, then for a prompt set written by an earlier generate stage (as_prompts) its file
    char *written = ds->produced_by >= 0 ? written_prompts_path(ctx, ds) : NULL;
    const int nf = ds->n_sources + (written != NULL);
    for (int s = 0; s < nf && n < limit; s++) {
        const char *file = s < ds->n_sources ? ds->sources[s] : written;
        size_t len;
        char *text = dl_read_file(file, &len, e);
        if (!text) goto fail;
        if (ds->format == FMT_TEXT) {  // the whole file is one prompt
            Prompt q = {0};
            if (tokenizer_encode(tok, text, len, &q.ids, &q.n, e)) {
                free(text);
                goto fail;
            }
            if (n == cap) p = dl_realloc(p, (size_t)(cap *= 2) * sizeof *p);
            p[n++] = q;
            free(text);
            continue;
        }
        int64_t lineno = 0;
        for (char *save = NULL, *line = strtok_r(text, "\n", &save); line && n < limit; line = strtok_r(NULL, "\n", &save)) {
            lineno++;
            while (*line == ' ' || *line == '\t' || *line == '\r') line++;
            if (!*line) continue;
            Prompt q = {0};
            char why[DL_ERR_LEN];
            int r = record_prompt(tok, fam, chat, ds->field, line, &q, why, sizeof why, e);
            if (r < 0) {
                free(text);
                goto fail;
            }
            if (r == 0) {
                if (ds->bad_records == BAD_FAIL) {
                    dl_fail(e, "%s:%lld: %s", file, (long long)lineno, why);
                    free(text);
                    goto fail;
                }
                if (bad++ < 5) dl_warn("%s:%lld: %s; skipped", file, (long long)lineno, why);
                continue;
            }
            if (n == cap) p = dl_realloc(p, (size_t)(cap *= 2) * sizeof *p);
            p[n++] = q;
        }
        free(text);
    }
    if (bad) dl_warn("generate: %lld bad prompt record(s) skipped", (long long)bad);
    if (n == 0) {
        dl_fail(e, "data '%s': no prompts", ds->name);
        goto fail;
    }
    *out = p;
    *n_out = n;
    free(written);
    return 0;
fail:
    free(written);
    prompts_free(p, n);
    return -1;
}

// generated.bin records: int64 key, int64 n_resp, int32 ids[n_resp], key = sample << 32 | prompt (= the
// prompt index when S = 1). A record's RNG stream depends only on (seed, prompt, sample), so records stay
// valid when samples_per_prompt changes between runs (samples >= S are ignored). A torn last record is dropped.
static int64_t load_done(const char *path, Job *jobs, int64_t np, int64_t S, DlError *e) {
    if (!dl_file_exists(path)) return 0;
    size_t len;
    char *buf = dl_read_file(path, &len, e);
    if (!buf) return -1;
    size_t off = 0, good = 0;
    int64_t done = 0;
    while (off + 16 <= len) {
        int64_t key, nr;
        memcpy(&key, buf + off, 8);
        memcpy(&nr, buf + off + 8, 8);
        const int64_t pi = key & 0xffffffffll, si = (int64_t)((uint64_t)key >> 32);
        if (key < 0 || pi >= np || nr < 0 || nr > (1 << 24) || off + 16 + (size_t)nr * 4 > len) break;
        Job *j = si < S ? &jobs[pi * S + si] : NULL;
        if (j && !j->resp) {
            j->resp = dl_malloc((size_t)(nr ? nr : 1) * 4);
            memcpy(j->resp, buf + off + 16, (size_t)nr * 4);
            j->n_resp = nr;
            done++;
        }
        off += 16 + (size_t)nr * 4;
        good = off;
    }
    free(buf);
    if (good < len && truncate(path, (off_t)good) != 0) return dl_fail(e, "%s: cannot truncate a torn record: %s", path, strerror(errno));
    return done;
}

static int append_done(FILE *f, int64_t idx, const int32_t *ids, int64_t n, DlError *e) {
    if (fwrite(&idx, 8, 1, f) != 1 || fwrite(&n, 8, 1, f) != 1 || (n && fwrite(ids, 4, (size_t)n, f) != (size_t)n))
        return dl_fail(e, "generated.bin: write failed: %s", strerror(errno));
    return 0;
}

// Keeps the top_k largest logits (the rest -inf).
static void apply_top_k(float *x, int64_t V, int k, float *tmp) {
    if (k <= 0 || k >= V) return;
    memcpy(tmp, x, (size_t)V * 4);
    // k-th largest by partial selection (quickselect on a copy)
    int64_t lo = 0, hi = V - 1, want = k - 1;
    while (lo < hi) {
        float pv = tmp[(lo + hi) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (tmp[i] > pv) i++;
            while (tmp[j] < pv) j--;
            if (i <= j) {
                float t = tmp[i];
                tmp[i] = tmp[j], tmp[j] = t;
                i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    float kth = tmp[want];
    for (int64_t i = 0; i < V; i++)
        if (x[i] < kth) x[i] = -INFINITY;
}

typedef struct {
    const Prompt *p;
    int64_t S;
} SortCtx;
// jobs by prompt length, then job index
static int cmp_len(const void *a, const void *b, void *ctx) {
    const SortCtx *c = ctx;
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b, nx = c->p[x / c->S].n, ny = c->p[y / c->S].n;
    if (nx != ny) return nx < ny ? -1 : 1;
    return x < y ? -1 : x > y;
}

// OUTPUT_DIR/.generate-cache/KEY.bin for this stage's jobs (stage_reuse.h; newly allocated).
static char *cache_path(const RunContext *ctx, const StageSpec *st, const Tokenizer *tok, const Prompt *p, int64_t np,
                        int64_t S) {
    ReuseKey k;
    reuse_key_begin(&k, ctx, "generate");
    char head[512];
    const int n = snprintf(head, sizeof head, "samples %lld\nmax_new %lld\ntemperature %.17g\ntop_p %.17g\ntop_k %d\nbatch %d\n"
                           "tokenizer %016llx\n", (long long)S, (long long)st->max_new_tokens, st->sample_temperature,
                           st->top_p, st->top_k, st->batch_size, (unsigned long long)tokenizer_hash(tok));
    reuse_key_add(&k, head, (size_t)n);
    reuse_key_add(&k, &np, sizeof np);
    for (int64_t i = 0; i < np; i++) {
        reuse_key_add(&k, &p[i].n, sizeof p[i].n);
        reuse_key_add(&k, p[i].ids, (size_t)p[i].n * 4);
    }
    return reuse_key_path(&k, ctx);
}

// FNV-1a of the text lowercased, letters, digits and non-ASCII bytes only: equal for texts that differ in case,
// spacing or punctuation; 0 for a text with none of them.
static uint64_t norm_hash(const char *t) {
    uint64_t h = 1469598103934665603ull;
    int any = 0;
    for (const unsigned char *c = (const unsigned char *)t; *c; c++) {
        unsigned char x = *c;
        if (x >= 'A' && x <= 'Z') x = (unsigned char)(x - 'A' + 'a');
        if (!((x >= 'a' && x <= 'z') || (x >= '0' && x <= '9') || x >= 0x80)) continue;
        h = (h ^ x) * 1099511628211ull, any = 1;
    }
    return any ? (h ? h : 1) : 0;  // 0: nothing but punctuation and space
}

// as_prompts: each response, decoded without its stop token and trimmed (with prompt_filter on: only a finished
// response, as the clean prompt prompt_filter finds in it, or nothing), becomes one prompt
// {"messages": [{"role": "user", "content": TEXT}]} of STAGE_DIR/OUTPUT.prompts.jsonl, in job order; empty texts
// and repeats (equal norm_hash) are dropped. Written atomically (dl_atomic_open / commit).
static int write_prompt_set(const RunContext *ctx, const StageSpec *st, const DataSpec *outd, const Tokenizer *tok,
                            const Job *jobs, int64_t nj, const int32_t stops[3], DlError *e) {
    char name[300];
    snprintf(name, sizeof name, "%s.prompts.jsonl", outd->name);
    char *path = dl_path_join(ctx->stage_dir, name);
    DlAtomic af = {0};  // af.f: open until committed or aborted
    int64_t cap = 1, n_out = 0, n_cut = 0, n_empty = 0, n_dup = 0, n_filtered = 0;
    while (cap < 2 * nj + 2) cap *= 2;
    uint64_t *seen = dl_calloc((size_t)cap, sizeof *seen);  // open addressing on the normalized-text hash
    int rc = 0;
    if (dl_atomic_open(&af, path, e)) {
        rc = -1;
        goto out;
    }
    for (int64_t j = 0; j < nj; j++) {
        const Job *jb = &jobs[j];
        if (jb->n_resp <= 0) continue;
        const int32_t last = jb->resp[jb->n_resp - 1];
        const bool stopped = last == stops[0] || last == stops[1] || last == stops[2];
        n_cut += !stopped;
        char *text = NULL;
        size_t len = 0;
        if (tokenizer_decode(tok, jb->resp, jb->n_resp - !!stopped, &text, &len)) {
            rc = dl_fail(e, "%s: cannot decode response %lld", st->name, (long long)j);
            goto out;
        }
        char *a = text, *b = text + len, *clean = NULL;
        while (a < b && (*a == ' ' || *a == '\n' || *a == '\t' || *a == '\r')) a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\n' || b[-1] == '\t' || b[-1] == '\r')) b--;
        *b = 0;
        if (st->prompt_filter) {  // only the clean prompt a reply holds; a reply cut at max_new_tokens is unfinished
            if (!stopped || !prompt_filter(a, &clean, NULL)) {
                n_filtered++;
                free(text);
                continue;
            }
            a = clean;
        }
        const uint64_t h = norm_hash(a);
        bool dup = false;
        if (h) {
            int64_t k = (int64_t)(h & (uint64_t)(cap - 1));
            while (seen[k] && seen[k] != h) k = (k + 1) & (cap - 1);
            dup = seen[k] == h;
            seen[k] = h;
        }
        if (!h) n_empty++;
        else if (dup) n_dup++;
        else {
            cJSON *o = cJSON_CreateObject(), *m = cJSON_AddArrayToObject(o, "messages"), *u = cJSON_CreateObject();
            cJSON_AddStringToObject(u, "role", "user");
            cJSON_AddStringToObject(u, "content", a);
            cJSON_AddItemToArray(m, u);
            char *js = cJSON_PrintUnformatted(o);
            if (fprintf(af.f, "%s\n", js) < 0) rc = dl_fail(e, "%s: write failed: %s", af.tmp, strerror(errno));
            free(js);
            cJSON_Delete(o);
            n_out++;
        }
        free(text), free(clean);
        if (rc) goto out;
    }
out:
    if (!rc && n_out == 0)
        rc = dl_fail(e, "%s: no usable prompt among %lld responses (%lld empty, %lld repeated, %lld dropped by prompt_filter)",
                     st->name, (long long)nj, (long long)n_empty, (long long)n_dup, (long long)n_filtered);
    if (af.f) {  // committed whole, or nothing is left behind
        if (rc) dl_atomic_abort(&af);
        else rc = dl_atomic_commit(&af, e);
    }
    if (!rc)
        dl_info("generate: %lld prompts written to %s (of %lld responses: %lld dropped by prompt_filter, %lld empty, %lld "
                "repeated; %lld cut at max_new_tokens, %s)", (long long)n_out, path, (long long)nj, (long long)n_filtered,
                (long long)n_empty, (long long)n_dup, (long long)n_cut, st->prompt_filter ? "dropped" : "kept");
    free(seen), free(path);
    return rc;
}

static int run_generate(RunContext *ctx, const StageSpec *st) {
    const Recipe *rec = ctx->recipe;
    DlError e;
    int rc = DL_EXIT_RUNTIME;
    Tokenizer *tok = NULL;
    LoadedModel t;
    memset(&t, 0, sizeof t);
    bool have_t = false;
    Prompt *p = NULL;
    Job *jobs = NULL;
    int64_t np = 0, nj = 0;
    const int64_t S = st->samples_per_prompt > 0 ? st->samples_per_prompt : 1;
    FILE *gf = NULL;
    Decoder *dcpu = NULL, *pcpu = NULL;  // the running slots; new prompts' prefill
    int64_t *order = NULL;
    float *logits = NULL, *tmp = NULL;
    int32_t *feed = NULL, *ytok = NULL, **resp = NULL;
    int64_t *nresp = NULL;
    uint64_t *streams = NULL, *counters = NULL;
    bool *fin = NULL;
    Rng *rngs = NULL;
    int64_t *slot_job = NULL, *capb = NULL, *nfeed = NULL, *slot_of = NULL, *row_of = NULL;
    uint64_t *pstreams = NULL, *pcounters = NULL;
    int32_t *pr = NULL;
    ShardWriter *w = NULL;
    const bool gpu = ctx->device == DEVICE_CUDA;
#ifdef DISTILL_CUDA
    DecoderCuda *dgpu = NULL, *pgpu = NULL;
#endif
    char *gen_path = dl_path_join(ctx->stage_dir, "generated.bin"), *all = NULL, *tr = NULL, *ho = NULL, *cache = NULL;
    const DataSpec *in = &rec->data[st->data_index], *outd = &rec->data[st->output_index];
    if (stage_load_tokenizer(ctx, &tok, &e) || read_prompts(ctx, st, in, tok, &p, &np, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (stage_load_teacher(ctx, &t, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    have_t = true;
    const int64_t V = t.hc.base.vocab, maxnew = st->max_new_tokens, max_pos = t.hc.base.max_pos;
    if (tokenizer_vocab_size(tok) > V) {
        dl_fail(&e, "tokenizer has %d tokens but the teacher's vocabulary is %lld", tokenizer_vocab_size(tok), (long long)V);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (np > 0xffffffffll) {
        dl_fail(&e, "generate: %lld prompts, at most 2^32 supported", (long long)np);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    nj = np * S;
    jobs = dl_calloc((size_t)nj, sizeof *jobs);
    // stop tokens: eos and the end-of-turn tokens of the chat families
    int32_t stops[3] = {tokenizer_eos(tok), tokenizer_token_id(tok, "<|im_end|>"), tokenizer_token_id(tok, "<|eot_id|>")};
    if (!ctx->resume) unlink(gen_path);
    bool reused = false;
    if (st->reuse) {
        cache = cache_path(ctx, st, tok, p, np, S);
        const int f = reuse_fetch(cache, gen_path, &e);  // a finished generate with the same key: its responses
        if (f < 0) goto fail;
        reused = f == 1;
    }
    int64_t done = ctx->resume || reused ? load_done(gen_path, jobs, np, S, &e) : 0;
    if (done < 0) goto fail;
    if (reused) dl_info("generate: %lld of %lld responses reused from %s", (long long)done, (long long)nj, cache);
    gf = fopen(gen_path, "ab");
    if (!gf) {
        dl_fail(&e, "%s: cannot open: %s", gen_path, strerror(errno));
        goto fail;
    }
    order = dl_malloc((size_t)nj * sizeof *order);
    int64_t todo = 0, longest = 0;
    for (int64_t i = 0; i < np; i++)
        if (p[i].n >= max_pos) {  // too long for the teacher's context (shorter ones get shortened answers)
            dl_warn("generate: prompt %lld has %lld tokens, more than the teacher's context %lld; skipped", (long long)i,
                    (long long)p[i].n, (long long)max_pos);
            for (int64_t s = 0; s < S; s++)
                if (!jobs[i * S + s].resp) jobs[i * S + s].resp = dl_malloc(4), jobs[i * S + s].n_resp = -1;
        }
    for (int64_t j = 0; j < nj; j++)
        if (!jobs[j].resp) {
            order[todo++] = j;
            longest = DL_MAX(longest, p[j / S].n);
        }
    SortCtx sc = {p, S};
    qsort_r(order, (size_t)todo, sizeof *order, cmp_len, &sc);
    // Continuous batching: Bs slots decode one job each; a finished job's slot takes the next job (by prompt
    // length) once at least `refill` slots are free (or none is decoding). The new prompts are prefilled in a
    // decoder of their own (pre: only their rows, so the cost is theirs alone; a ragged feed in the main decoder
    // computed every slot's padding columns too, 9x the time on the H100) and copied into the free slots
    // (decoder_copy_seq). Before, a batch ran until its longest response ended while finished slots idled.
    // The output is unchanged: every job keeps its own sampling stream and the decoders' logits do not depend
    // on the batch (decode_cuda.h; the CPU decoder computes each sequence's rows alike).
    const int Bmax = st->batch_size > 0 ? st->batch_size : 1;
    const int64_t Bs = DL_MIN((int64_t)Bmax, todo), refill = DL_MAX((int64_t)1, Bs / 4);
    logits = dl_malloc((size_t)(gpu ? 1 : DL_MAX(Bs, (int64_t)1) * V) * 4);
    tmp = dl_malloc((size_t)V * 4);
    feed = dl_malloc((size_t)Bmax * 4);
    ytok = dl_malloc((size_t)Bmax * 4);
    resp = dl_calloc((size_t)Bmax, sizeof *resp);
    nresp = dl_calloc((size_t)Bmax, sizeof *nresp);
    streams = dl_calloc((size_t)Bmax, sizeof *streams);
    counters = dl_calloc((size_t)Bmax, sizeof *counters);
    fin = dl_calloc((size_t)Bmax, sizeof *fin);  // the slot is free (no job, or its job just finished)
    rngs = dl_calloc((size_t)Bmax, sizeof *rngs);
    slot_job = dl_malloc((size_t)Bmax * sizeof *slot_job);
    capb = dl_calloc((size_t)Bmax, sizeof *capb);
    nfeed = dl_calloc((size_t)Bmax, sizeof *nfeed);
    slot_of = dl_calloc((size_t)Bmax, sizeof *slot_of), row_of = dl_calloc((size_t)Bmax, sizeof *row_of);
    pstreams = dl_calloc((size_t)Bmax, sizeof *pstreams), pcounters = dl_calloc((size_t)Bmax, sizeof *pcounters);
    for (int64_t b = 0; b < Bmax; b++) slot_job[b] = -1, fin[b] = true, row_of[b] = b;  // pre's rows 0..nnew-1 in order
    // (pcounters stay 0: a new job's first token is its counter 0)
    SampleParams sp = {.greedy = st->sample_temperature <= 0, .temperature = (float)st->sample_temperature,
                       .top_p = st->top_p > 0 ? (float)st->top_p : 1.0f};
    if (todo > 0) {
        if (gpu) {
#ifdef DISTILL_CUDA
            dgpu = decoder_cuda_new(&t.hc, &t.reg, t.params, Bs, longest + maxnew, ctx->quiet ? NULL : stdout, &e);
            if (!dgpu || decoder_cuda_reset(dgpu, Bs, &e)) goto fail;
            pgpu = decoder_cuda_new(&t.hc, &t.reg, t.params, Bs, longest, ctx->quiet ? NULL : stdout, &e);
            if (!pgpu) goto fail;
#else
            dl_fail(&e, "run.device = \"cuda\" but this build has no CUDA");
            goto fail;
#endif
        } else {
            dcpu = decoder_new(&t.hc, &t.reg, t.params, Bs, longest + maxnew, &e);  // (pcpu: per refill)
            if (!dcpu) goto fail;
        }
    }
    Progress prog;
    progress_begin(&prog, st->name, done, nj);
    int64_t n_gen = done, new_tokens = 0, next = 0, live = 0, unsynced = 0;
    double t0 = dl_now();
    if (done && !reused) dl_info("generate: %lld of %lld responses kept from the interrupted run", (long long)done, (long long)nj);
    while (next < todo || live > 0) {
        if (run_should_stop(ctx)) {  // the finished responses are on disk; the running ones start again
            rc = DL_EXIT_INTERRUPTED;
            progress_end(&prog);
            if (fflush(gf) || fsync(fileno(gf))) dl_fail(&e, "%s: write failed: %s", gen_path, strerror(errno)), rc = DL_EXIT_RUNTIME;
            goto out;
        }
        // refill: the next jobs take the free slots; pre prefills their prompts (row r -> slot slot_of[r])
        int64_t nnew = 0, L = 1;
        if (next < todo && (Bs - live >= refill || live == 0 || Bs - live >= todo - next)) {
            for (int64_t b = 0; b < Bs && next < todo; b++) {
                if (!fin[b]) continue;
                const int64_t j = order[next++], pi = j / S, si = j % S;
                slot_job[b] = j;
                fin[b] = false;
                capb[b] = DL_MIN(maxnew, max_pos - p[pi].n);
                free(resp[b]);
                resp[b] = dl_malloc((size_t)DL_MAX(capb[b], (int64_t)1) * 4);
                nresp[b] = 0;
                // sample 0 keeps the stream of the single-sample stage (resumable across the change)
                rng_init(&rngs[b], (uint64_t)ctx->seed, 0x6e000000ull + (uint64_t)pi + ((uint64_t)si << 40));
                streams[b] = ((uint64_t)si << 32) | (uint64_t)pi;
                slot_of[nnew] = b;
                pstreams[nnew] = streams[b];
                nfeed[nnew] = p[pi].n;
                L = DL_MAX(L, p[pi].n);
                nnew++;
                live++;
            }
        }
        // one round: the new jobs' first tokens from pre, then (if any job runs on) one step of the running ones
        for (int round = nnew ? 0 : 1; round < 2; round++) {
            int frc = 0;
            if (round == 0) {
                free(pr);
                pr = dl_calloc((size_t)(nnew * L), 4);
                for (int64_t r = 0; r < nnew; r++) memcpy(pr + r * L, p[slot_job[slot_of[r]] / S].ids, (size_t)nfeed[r] * 4);
#ifdef DISTILL_CUDA
                if (gpu) frc = decoder_cuda_reset(pgpu, nnew, &e) || decoder_cuda_feed_ragged(pgpu, pr, L, nfeed, &e);
                else
#endif
                {  // the CPU decoder computes all of its rows: one sized for this refill
                    decoder_free(pcpu);
                    pcpu = decoder_new(&t.hc, &t.reg, t.params, nnew, L, &e);
                    frc = pcpu ? decoder_feed_ragged(pcpu, pr, L, nfeed, logits, NULL, &e) : -1;
                }
            } else {
                if (!live) break;
                for (int64_t b = 0; b < Bs && !frc; b++)  // a free slot is emptied and fed one padding token
                    if (fin[b]) {
#ifdef DISTILL_CUDA
                        if (gpu) frc = decoder_cuda_reset_seq(dgpu, b, &e);
                        else
#endif
                            frc = decoder_reset_seq(dcpu, b, &e);
                        feed[b] = 0;
                    }
#ifdef DISTILL_CUDA
                if (!frc && gpu) frc = decoder_cuda_step(dgpu, feed, &e);
                else
#endif
                    if (!frc) frc = decoder_feed(dcpu, feed, 1, logits, NULL, &e);
            }
            if (frc) goto fail;
            // rows of this round: round 0 row r is slot slot_of[r]; round 1 row b is slot b
            const int64_t nrows = round == 0 ? nnew : Bs;
#ifdef DISTILL_CUDA
            if (gpu) {
                DecodeSampling ds = {.temperature = (float)st->sample_temperature, .top_k = st->top_k,
                                     .top_p = (float)st->top_p, .seed = (uint64_t)ctx->seed};
                if (round == 0) {
                    if (decoder_cuda_sample(pgpu, &ds, pstreams, pcounters, ytok, &e)) goto fail;
                } else {
                    for (int64_t b = 0; b < Bs; b++) counters[b] = (uint64_t)nresp[b];
                    if (decoder_cuda_sample(dgpu, &ds, streams, counters, ytok, &e)) goto fail;
                }
            }
#endif
            for (int64_t r = 0; r < nrows; r++) {
                const int64_t b = round == 0 ? slot_of[r] : r;
                if (fin[b]) continue;  // a free slot
                int32_t y;
                if (gpu) {
                    y = ytok[r];
                } else {
                    float *lg = logits + r * V;
                    if (st->top_k > 0 && !sp.greedy) apply_top_k(lg, V, st->top_k, tmp);
                    y = sample_token(lg, V, &sp, &rngs[b]);
                }
                resp[b][nresp[b]++] = y;
                feed[b] = y;
                new_tokens++;
                if (y == stops[0] || y == stops[1] || y == stops[2] || nresp[b] >= capb[b]) {
                    const int64_t j = slot_job[b], key = (int64_t)(((uint64_t)(j % S) << 32) | (uint64_t)(j / S));
                    jobs[j].resp = resp[b], jobs[j].n_resp = nresp[b];
                    resp[b] = NULL;
                    if (append_done(gf, key, jobs[j].resp, jobs[j].n_resp, &e)) goto fail;
                    fin[b] = true, slot_job[b] = -1;
                    live--, n_gen++, unsynced++;
                }
            }
            if (round == 0) {  // the prompts' caches join the main decoder (finished ones too: their slots are reset)
#ifdef DISTILL_CUDA
                if (gpu) {
                    if (decoder_cuda_copy_seqs(dgpu, slot_of, pgpu, row_of, nnew, &e)) goto fail;
                } else
#endif
                {
                    for (int64_t r = 0; r < nnew; r++)
                        if (decoder_copy_seq(dcpu, slot_of[r], pcpu, r, &e)) goto fail;
                }
            }
        }
        if (unsynced >= refill || (next == todo && live == 0)) {  // finished responses survive an interruption
            if (fflush(gf) || fsync(fileno(gf))) {
                dl_fail(&e, "%s: write failed: %s", gen_path, strerror(errno));
                goto fail;
            }
            unsynced = 0;
            progress_update(&prog, n_gen, NAN, new_tokens / (dl_now() - t0 + 1e-9));
        }
    }
    progress_end(&prog);
    fclose(gf);
    gf = NULL;
    if (cache && (!reused || done < nj)) reuse_keep(cache, gen_path, st->name);  // every job is done
    if (st->as_prompts) {  // teacher-written prompts for a later generate stage, instead of documents
        if (write_prompt_set(ctx, st, outd, tok, jobs, nj, stops, &e)) goto fail;
        rc = DL_EXIT_OK;
        goto out;
    }
    // the output data set: prompt + response, loss on the response (prompt-major, then sample)
    char name[300];
    snprintf(name, sizeof name, "%s.all.h5", outd->name);
    all = dl_path_join(ctx->stage_dir, name);
    ShardWriterOpts o = {.kind = SHARD_LM, .tokenizer_hash = tokenizer_hash(tok), .tokenizer_pre = tokenizer_pre_name(tok),
                         .vocab_size = (int32_t)V, .seq_len = 0, .pad_id = 0, .deflate = 1};
    if (shard_writer_open(&w, all, &o, &e)) goto fail;
    int64_t n_docs = 0, n_resp_tok = 0, n_stopped = 0;
    for (int64_t j = 0; j < nj; j++) {
        const Prompt *q = &p[j / S];
        const Job *jb = &jobs[j];
        if (jb->n_resp < 0) continue;
        int64_t n = q->n + jb->n_resp;
        int32_t *ids = dl_malloc((size_t)n * 4);
        uint8_t *mask = dl_calloc((size_t)n, 1);
        memcpy(ids, q->ids, (size_t)q->n * 4);
        memcpy(ids + q->n, jb->resp, (size_t)jb->n_resp * 4);
        memset(mask + q->n, 1, (size_t)jb->n_resp);
        int r = shard_add_doc(w, ids, mask, n, &e);
        free(ids), free(mask);
        if (r) goto fail;
        n_docs++;
        n_resp_tok += jb->n_resp;
        int32_t last = jb->n_resp ? jb->resp[jb->n_resp - 1] : -1;
        n_stopped += jb->n_resp && (last == stops[0] || last == stops[1] || last == stops[2]);
    }
    shard_writer_attr_i64(w, "generated_responses", n_docs, NULL);
    shard_writer_attr_i64(w, "samples_per_prompt", S, NULL);
    {
        ShardWriter *w1 = w;
        w = NULL;
        if (shard_writer_close(w1, &e)) goto fail;
    }
    char trn[300], hon[300];
    snprintf(trn, sizeof trn, "%s.train.h5", outd->name);
    snprintf(hon, sizeof hon, "%s.holdout.h5", outd->name);
    tr = dl_path_join(ctx->stage_dir, trn);
    ho = dl_path_join(ctx->stage_dir, hon);
    if (stage_split_shard(all, tr, ho, outd->holdout, (uint64_t)ctx->seed, outd->seq_len, 0, true, &e)) goto fail;
    dl_info("generate: %lld responses (%lld per prompt, %s), %lld tokens (mean %.1f, %lld ended by a stop token) -> "
            "data '%s' (%s)",
            (long long)n_docs, (long long)S, gpu ? "cuda" : "cpu", (long long)n_resp_tok,
            n_docs ? (double)n_resp_tok / n_docs : 0.0, (long long)n_stopped, outd->name, ctx->stage_dir);
    rc = DL_EXIT_OK;
    goto out;
fail:
    fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    if (w) shard_writer_abort(w);
    if (gf) fclose(gf);
    decoder_free(dcpu), decoder_free(pcpu);
#ifdef DISTILL_CUDA
    decoder_cuda_free(dgpu), decoder_cuda_free(pgpu);
#endif
    if (resp)
        for (int i = 0; i < (st->batch_size > 0 ? st->batch_size : 1); i++) free(resp[i]);
    free(resp), free(nresp), free(fin), free(rngs), free(feed), free(ytok), free(streams), free(counters);
    free(logits), free(tmp), free(order), free(pr), free(slot_job), free(capb), free(nfeed);
    free(slot_of), free(row_of), free(pstreams), free(pcounters);
    jobs_free(jobs, nj);
    if (p) prompts_free(p, np);
    if (have_t) model_free(&t);
    tokenizer_free(tok);
    free(gen_path), free(all), free(tr), free(ho), free(cache);
    return rc;
}

DL_STAGE(stage_generate_def, {.kind = STAGE_GENERATE, .summary = "the teacher answers prompts (SeqKD pseudo-labels)",
                              .run = run_generate})
