// test_generate_stage.c: the generate stage through $DISTILL_BIN with the real SmolLM2 tokenizer (skipped
// when scripts/fetch-teacher has not run) and a small random-weight teacher of the same vocabulary:
// every good prompt gets a document = its chat rendering with the assistant header + a response of at
// most max_new_tokens, loss mask exactly on the response; a bad JSONL line is skipped; the output does not
// depend on the batch size; an interrupted run (generated.bin cut inside a record) resumes to the same data.
// samples_per_prompt = 3: three documents per prompt in prompt-major order, sample 0 equal to the single-
// sample run's response, the samples of a prompt not all equal, independent of the batch size, resumable.
// reuse (the default; off above so that they generate): a second run with the same settings takes its
// responses from OUTPUT_DIR/.generate-cache (shown by editing the cached file), other settings do not.
// as_prompts: a generate stage's responses become prompts (trimmed, deduplicated, each one of the responses in
// generated.bin) that a later generate stage answers after the prompt set's own sources; no other stage kind
// may use such a set.
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "distill/chat.h"
#include "distill/shards.h"
#include "distill/tokenizer.h"
#include "tests/check.h"

#define GGUF "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf"
#define MAXD 16

static char g_dir[256];
static const char *g_extra = "--set stage.generate.reuse=false";  // these checks are about generating

static int run_bin_s(const char *bin, const char *recipe, const char *name, bool resume, int batch, int samples) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%s' '%s' --quiet --set run.name=%s --set stage.generate.batch_size=%d "
             "--set stage.generate.samples_per_prompt=%d %s %s >> %s/log.txt 2>&1",
             bin, recipe, name, batch, samples, g_extra, resume ? "--resume" : "", g_dir);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
static int run_bin(const char *bin, const char *recipe, const char *name, bool resume, int batch) {
    return run_bin_s(bin, recipe, name, resume, batch, 1);
}

typedef struct {
    int32_t *ids[MAXD];
    uint8_t *mask[MAXD];
    int64_t n[MAXD];
    int64_t docs;
} Docs;

static void read_docs(const char *path, Docs *d) {
    memset(d, 0, sizeof *d);
    ShardReader *r;
    DlError e;
    if (shard_open(&r, path, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    d->docs = shard_info(r)->n_docs;
    for (int64_t i = 0; i < d->docs && i < MAXD; i++) shard_read_doc(r, i, &d->ids[i], &d->mask[i], &d->n[i], &e);
    shard_close(r);
}

// The documents of run RUN's generate stage.
static void run_docs(const char *run, Docs *d) {
    char all[700];
    snprintf(all, sizeof all, "%s/runs/%s/01-generate/pseudo.all.h5", g_dir, run);
    read_docs(all, d);
}

static bool same_docs(const Docs *a, const Docs *b) {
    if (a->docs != b->docs) return false;
    for (int64_t i = 0; i < a->docs && i < MAXD; i++)
        if (a->n[i] != b->n[i] || memcmp(a->ids[i], b->ids[i], (size_t)a->n[i] * 4) || memcmp(a->mask[i], b->mask[i], (size_t)a->n[i]))
            return false;
    return true;
}

// A recipe file with the run (NAME), the random-weight teacher, the SmolLM2 tokenizer, the prompts and the
// output set 'pseudo'; the caller adds data sets and stages, and closes it.
static FILE *recipe_head(const char *path, const char *name, const char *cwd) {
    FILE *f = fopen(path, "w");
    if (!f) return NULL;
    fprintf(f,
            "[run]\nname = \"%s\"\noutput_dir = \"%s/runs\"\nseed = 3\n\n[teacher]\npath = \"%s/teacher.json\"\n\n"
            "[tokenizer]\npath = \"%s/%s\"\n\n[hybrid]\nattn_fraction = 0.5\n\n"
            "[data.prompts]\nsources = [\"%s/prompts.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
            "[data.pseudo]\nseq_len = 32\nholdout = 0.2\n\n",
            name, g_dir, g_dir, cwd, GGUF, g_dir);
    return f;
}

// Recipe `base` with `extra` appended: --dry-run refuses it (exit 3) with a message containing `msg`.
static bool refused(const char *bin, const char *base, const char *extra, const char *msg) {
    char path[400], log[400], cmd[1600];
    snprintf(path, sizeof path, "%s/refused.toml", g_dir);
    snprintf(log, sizeof log, "%s/refused.log", g_dir);
    size_t n;
    DlError e;
    char *text = dl_read_file(base, &n, &e);
    FILE *f = text ? fopen(path, "w") : NULL;
    if (!f) return free(text), false;
    fprintf(f, "%s%s", text, extra);
    fclose(f);
    free(text);
    snprintf(cmd, sizeof cmd, "'%s' '%s' --dry-run > '%s' 2>&1", bin, path, log);
    const int st = system(cmd);
    char *out = dl_read_file(log, &n, &e);
    const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 3 && out && strstr(out, msg);
    if (!ok) fprintf(stderr, "refused: exit %d, expected \"%s\" in:\n%s\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1, msg, out ? out : "");
    free(out);
    return ok;
}

int main(void) {
    const char *bin = getenv("DISTILL_BIN");
    if (!bin || access(GGUF, R_OK)) {
        printf("test_generate_stage: skipped (needs DISTILL_BIN and %s; run scripts/fetch-teacher)\n", GGUF);
        return 0;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_gen_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    char cwd[300], path[600], recipe[600];
    if (!getcwd(cwd, sizeof cwd)) return 1;
    const char *prompts[5] = {"What is 2+2?", "Name a color.", "Say hi.", "Count to three.", "What is the capital of Italy?"};
    snprintf(path, sizeof path, "%s/prompts.jsonl", g_dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 5; i++) {
        fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}]}\n", prompts[i]);
        if (i == 2) fprintf(f, "{\"messages\": 5}\n");  // bad record, skipped
    }
    fclose(f);
    snprintf(path, sizeof path, "%s/teacher.json", g_dir);
    f = fopen(path, "w");
    fprintf(f, "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 32, "
               "\"intermediate_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
               "\"head_dim\": 8, \"vocab_size\": 49152, \"max_position_embeddings\": 256, \"rope_theta\": 10000.0, "
               "\"rms_norm_eps\": 1e-05, \"tie_word_embeddings\": true, \"bos_token_id\": 1, \"eos_token_id\": 2}\n");
    fclose(f);
    snprintf(recipe, sizeof recipe, "%s/gen.toml", g_dir);
    f = recipe_head(recipe, "g", cwd);
    fprintf(f, "[[stage]]\nkind = \"generate\"\ndata = \"prompts\"\noutput = \"pseudo\"\nmax_new_tokens = 6\n"
               "temperature = 0.8\ntop_p = 0.95\ntop_k = 50\nbatch_size = 2\n");
    fclose(f);

    CHECK_EQ_I64(run_bin(bin, recipe, "g", false, 2), 0);
    Docs a;
    run_docs("g", &a);
    CHECK_EQ_I64(a.docs, 5);
    // documents: the chat rendering (with the assistant header) + a response of 1..6 tokens, masked exactly
    Tokenizer *tok;
    DlError e;
    CHECK(tokenizer_load(GGUF, &tok, &e) == 0);
    ChatFamily fam;
    chat_family_for(tok, &fam, &e);
    int good = 0;
    for (int i = 0; i < 5 && i < a.docs; i++) {
        ChatMessage m = {"user", prompts[i]};
        int32_t *ids;
        int64_t n;
        chat_render(tok, fam, &m, 1, true, &ids, NULL, &n, &e);
        int64_t resp = a.n[i] - n;
        bool ok = resp >= 1 && resp <= 6 && !memcmp(ids, a.ids[i], (size_t)n * 4);
        for (int64_t j = 0; ok && j < a.n[i]; j++) ok = a.mask[i][j] == (j >= n);
        good += ok;
        free(ids);
    }
    CHECK_EQ_I64(good, 5);
    char tr[700], ho[700];
    snprintf(tr, sizeof tr, "%s/runs/g/01-generate/pseudo.train.h5", g_dir);
    snprintf(ho, sizeof ho, "%s/runs/g/01-generate/pseudo.holdout.h5", g_dir);
    CHECK(dl_file_exists(tr) && dl_file_exists(ho));

    // batch size 1: the same responses (one RNG stream per prompt)
    CHECK_EQ_I64(run_bin(bin, recipe, "g1", false, 1), 0);
    Docs b;
    run_docs("g1", &b);
    CHECK(same_docs(&a, &b));

    // an interruption inside generated.bin: keep the first record and half of the next, drop the outputs
    char gen[700], cmd[1600];
    snprintf(gen, sizeof gen, "%s/runs/g1/01-generate/generated.bin", g_dir);
    f = fopen(gen, "rb");
    int64_t hdr[2] = {0, 0};
    CHECK(f && fread(hdr, 8, 2, f) == 2);
    if (f) fclose(f);
    long keep = 16 + 4 * (long)hdr[1] + 10;
    CHECK(truncate(gen, keep) == 0);
    snprintf(cmd, sizeof cmd, "cd %s/runs/g1/01-generate && rm -f DONE pseudo.*.h5", g_dir);
    CHECK(system(cmd) == 0);
    CHECK_EQ_I64(run_bin(bin, recipe, "g1", true, 1), 0);
    Docs c;
    run_docs("g1", &c);
    CHECK(same_docs(&a, &c));

    // samples_per_prompt = 3: 15 documents, prompt-major; sample 0 = the single-sample response
    CHECK_EQ_I64(run_bin_s(bin, recipe, "s3", false, 4, 3), 0);
    Docs s3;
    run_docs("s3", &s3);
    CHECK_EQ_I64(s3.docs, 15);
    int same0 = 0, prompt_ok = 0, differ = 0;
    for (int i = 0; i < 5 && s3.docs == 15; i++) {
        ChatMessage m = {"user", prompts[i]};
        int32_t *ids;
        int64_t n;
        chat_render(tok, fam, &m, 1, true, &ids, NULL, &n, &e);
        same0 += s3.n[3 * i] == a.n[i] && !memcmp(s3.ids[3 * i], a.ids[i], (size_t)a.n[i] * 4);
        for (int k = 0; k < 3; k++) {
            const int64_t di = 3 * i + k, resp = s3.n[di] - n;
            bool ok = resp >= 1 && resp <= 6 && !memcmp(ids, s3.ids[di], (size_t)n * 4);
            for (int64_t j = 0; ok && j < s3.n[di]; j++) ok = s3.mask[di][j] == (j >= n);
            prompt_ok += ok;
        }
        bool all_same = s3.n[3 * i] == s3.n[3 * i + 1] && s3.n[3 * i] == s3.n[3 * i + 2] &&
                        !memcmp(s3.ids[3 * i], s3.ids[3 * i + 1], (size_t)s3.n[3 * i] * 4) &&
                        !memcmp(s3.ids[3 * i], s3.ids[3 * i + 2], (size_t)s3.n[3 * i] * 4);
        differ += !all_same;
        free(ids);
    }
    CHECK_EQ_I64(same0, 5);
    CHECK_EQ_I64(prompt_ok, 15);
    CHECK(differ >= 4);  // 6 tokens at temperature 0.8 from a random 49k-vocabulary teacher: samples differ
    // batch size 1: the same 15 documents; then an interruption inside generated.bin resumes to them
    CHECK_EQ_I64(run_bin_s(bin, recipe, "s3b", false, 1, 3), 0);
    Docs s3b;
    run_docs("s3b", &s3b);
    CHECK(same_docs(&s3, &s3b));
    snprintf(gen, sizeof gen, "%s/runs/s3b/01-generate/generated.bin", g_dir);
    f = fopen(gen, "rb");
    int64_t rec[2] = {0, 0};
    long off = 0;
    for (int r = 0; f && r < 7; r++) {  // keep 7 whole records and half of the 8th
        CHECK(fseek(f, off, SEEK_SET) == 0 && fread(rec, 8, 2, f) == 2);
        off += 16 + 4 * (long)rec[1];
    }
    if (f) fclose(f);
    CHECK(truncate(gen, off + 10) == 0);
    snprintf(cmd, sizeof cmd, "cd %s/runs/s3b/01-generate && rm -f DONE pseudo.*.h5", g_dir);
    CHECK(system(cmd) == 0);
    CHECK_EQ_I64(run_bin_s(bin, recipe, "s3b", true, 1, 3), 0);
    Docs s3c;
    run_docs("s3b", &s3c);
    CHECK(same_docs(&s3, &s3c));

    // reuse: run r1 fills the cache (one file) with run g's responses; its first response is then edited
    // in the cached file, and run r2 (same settings, another run) gets the edited response; r3 with another
    // temperature and r4 with reuse off generate their own
    g_extra = "";
    CHECK_EQ_I64(run_bin(bin, recipe, "r1", false, 2), 0);
    Docs r1;
    run_docs("r1", &r1);
    CHECK(same_docs(&a, &r1));
    char cached[800] = "";
    snprintf(cmd, sizeof cmd, "ls %s/runs/.generate-cache/*.bin 2>/dev/null | wc -l", g_dir);
    FILE *ls = popen(cmd, "r");
    int n_cached = -1;
    CHECK(ls && fscanf(ls, "%d", &n_cached) == 1);
    if (ls) pclose(ls);
    CHECK_EQ_I64(n_cached, 1);
    snprintf(cmd, sizeof cmd, "ls %s/runs/.generate-cache/*.bin", g_dir);
    ls = popen(cmd, "r");
    CHECK(ls && fscanf(ls, "%799s", cached) == 1);
    if (ls) pclose(ls);
    f = fopen(cached, "r+b");
    int64_t h0[2] = {-1, 0};
    CHECK(f && fread(h0, 8, 2, f) == 2 && h0[1] >= 1);
    const int64_t first = h0[0] & 0xffffffffll;  // the prompt of the first cached record (batches go by length)
    int32_t forty2[8] = {42, 42, 42, 42, 42, 42, 42, 42};
    CHECK(f && h0[1] <= 8 && fseek(f, 16, SEEK_SET) == 0 && fwrite(forty2, 4, (size_t)h0[1], f) == (size_t)h0[1]);
    if (f) fclose(f);
    CHECK_EQ_I64(run_bin(bin, recipe, "r2", false, 2), 0);
    Docs r2;
    run_docs("r2", &r2);
    CHECK_EQ_I64(r2.docs, 5);
    int edited = 0, same_rest = 0;
    for (int64_t i = 0; i < 5 && r2.docs == 5 && a.docs == 5; i++) {
        if (i == first) {
            const int64_t resp = h0[1], np = r2.n[i] - resp;
            bool ok = r2.n[i] == a.n[i] && !memcmp(r2.ids[i], a.ids[i], (size_t)np * 4);
            for (int64_t j = np; ok && j < r2.n[i]; j++) ok = r2.ids[i][j] == 42;
            edited += ok;
        } else {
            same_rest += r2.n[i] == a.n[i] && !memcmp(r2.ids[i], a.ids[i], (size_t)a.n[i] * 4);
        }
    }
    CHECK_EQ_I64(edited, 1);
    CHECK_EQ_I64(same_rest, 4);
    snprintf(cmd, sizeof cmd,
             "'%s' '%s' --quiet --set run.name=r3 --set stage.generate.batch_size=2 --set stage.generate.temperature=0.5 "
             ">> %s/log.txt 2>&1",
             bin, recipe, g_dir);
    CHECK(system(cmd) == 0);
    Docs r3;
    run_docs("r3", &r3);
    CHECK_EQ_I64(r3.docs, 5);
    CHECK(!same_docs(&r2, &r3));
    g_extra = "--set stage.generate.reuse=false";
    CHECK_EQ_I64(run_bin(bin, recipe, "r4", false, 2), 0);
    Docs r4;
    run_docs("r4", &r4);
    CHECK(same_docs(&a, &r4));

    // as_prompts: stage 'write' turns 2 responses per prompt into prompts; stage 'answer' answers the set: its own
    // source (the 5 prompts), then the written ones in file order
    char sp[600];
    snprintf(sp, sizeof sp, "%s/sp.toml", g_dir);
    f = recipe_head(sp, "sp", cwd);
    fprintf(f,
            "[data.made]\nsources = [\"%s/prompts.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
            "[[stage]]\nkind = \"generate\"\nname = \"write\"\ndata = \"prompts\"\noutput = \"made\"\nas_prompts = true\n"
            "prompt_filter = false\n"
            "max_new_tokens = 6\ntemperature = 1.0\ntop_p = 1.0\nsamples_per_prompt = 2\nbatch_size = 4\n\n"
            "[[stage]]\nkind = \"generate\"\nname = \"answer\"\ndata = \"made\"\noutput = \"pseudo\"\nmax_new_tokens = 4\n"
            "temperature = 0.8\nbatch_size = 4\n",
            g_dir);
    fclose(f);
    snprintf(cmd, sizeof cmd, "'%s' '%s' --quiet >> %s/log.txt 2>&1", bin, sp, g_dir);
    CHECK(system(cmd) == 0);
    {
        // the responses of 'write', decoded without a final stop token and trimmed
        char texts[10][256];
        int nt = 0;
        snprintf(gen, sizeof gen, "%s/runs/sp/01-write/generated.bin", g_dir);
        f = fopen(gen, "rb");
        int64_t rh[2];
        int32_t ids[64];
        while (f && nt < 10 && fread(rh, 8, 2, f) == 2 && rh[1] <= 64 && fread(ids, 4, (size_t)rh[1], f) == (size_t)rh[1]) {
            int64_t n = rh[1];
            if (n && (ids[n - 1] == tokenizer_eos(tok) || ids[n - 1] == tokenizer_token_id(tok, "<|im_end|>"))) n--;
            char *t;
            size_t len;
            CHECK(tokenizer_decode(tok, ids, n, &t, &len) == 0);
            char *x = t, *y = t + len;
            while (x < y && strchr(" \n\t\r", *x)) x++;
            while (y > x && strchr(" \n\t\r", y[-1])) y--;
            snprintf(texts[nt++], sizeof texts[0], "%.*s", (int)(y - x), x);
            free(t);
        }
        if (f) fclose(f);
        CHECK_EQ_I64(nt, 10);
        // the written prompt set: each line one of those texts, none twice
        char mp[700];
        snprintf(mp, sizeof mp, "%s/runs/sp/01-write/made.prompts.jsonl", g_dir);
        size_t ml;
        char *mt = dl_read_file(mp, &ml, &e), *contents[10];
        int nl = 0, member = 0, distinct = 1;
        for (char *sv = NULL, *ln = mt ? strtok_r(mt, "\n", &sv) : NULL; ln && nl < 10; ln = strtok_r(NULL, "\n", &sv)) {
            cJSON *o = cJSON_Parse(ln);
            const cJSON *m = o ? cJSON_GetArrayItem(cJSON_GetObjectItem(o, "messages"), 0) : NULL;
            const cJSON *r = m ? cJSON_GetObjectItem(m, "role") : NULL, *c = m ? cJSON_GetObjectItem(m, "content") : NULL;
            CHECK(cJSON_IsString(r) && !strcmp(r->valuestring, "user") && cJSON_IsString(c) && *c->valuestring);
            contents[nl] = dl_strdup(cJSON_IsString(c) ? c->valuestring : "");
            for (int k = 0; k < nt; k++)
                if (!strcmp(contents[nl], texts[k])) {
                    member++;
                    break;
                }
            for (int k = 0; k < nl; k++) distinct &= strcmp(contents[k], contents[nl]) != 0;
            nl++;
            cJSON_Delete(o);
        }
        CHECK(nl >= 8);  // 6 random tokens from a 49k vocabulary: repeats or empty texts are rare
        CHECK_EQ_I64(member, nl);
        CHECK(distinct);
        // 'answer': the 5 source prompts, then the written ones, each rendered as a chat prompt
        Docs sd;
        char all[700];
        snprintf(all, sizeof all, "%s/runs/sp/02-answer/pseudo.all.h5", g_dir);
        read_docs(all, &sd);
        CHECK_EQ_I64(sd.docs, 5 + nl);
        int rendered = 0;
        for (int i = 0; i < nl && 5 + i < sd.docs && 5 + i < MAXD; i++) {
            ChatMessage m = {"user", contents[i]};
            int32_t *rid;
            int64_t rn;
            chat_render(tok, fam, &m, 1, true, &rid, NULL, &rn, &e);
            rendered += rn < sd.n[5 + i] && !memcmp(rid, sd.ids[5 + i], (size_t)rn * 4);
            free(rid);
        }
        CHECK_EQ_I64(rendered, DL_MIN(nl, MAXD - 5));
        for (int i = 0; i < nl; i++) free(contents[i]);
        free(mt);
    }
    // prompt_filter on: the random teacher's 6-token replies never stop, so every one is dropped as unfinished
    // and the stage fails saying so, writing no prompt set
    snprintf(cmd, sizeof cmd, "'%s' '%s' --quiet --set run.name=spf --set stage.write.prompt_filter=true > %s/spf.txt 2>&1",
             bin, sp, g_dir);
    CHECK(system(cmd) != 0);
    {
        char lp[700], mp[700];
        snprintf(lp, sizeof lp, "%s/spf.txt", g_dir);
        snprintf(mp, sizeof mp, "%s/runs/spf/01-write/made.prompts.jsonl", g_dir);
        size_t ll;
        char *lt = dl_read_file(lp, &ll, &e);
        CHECK(lt && strstr(lt, "no usable prompt among 10 responses") && strstr(lt, "10 dropped by prompt_filter"));
        CHECK(!dl_file_exists(mp));
        free(lt);
    }
    // only a generate stage reads a prompt set; a generate stage does not read prompt + response documents
    CHECK(refused(bin, sp, "\n[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"layerwise\"\ndata = \"made\"\nsteps = 1\n",
                  "cannot use 'made': it is a prompt set"));
    CHECK(refused(bin, sp,
                  "\n[data.more]\nseq_len = 32\n\n[[stage]]\nkind = \"generate\"\nname = \"again\"\ndata = \"pseudo\"\n"
                  "output = \"more\"\n",
                  "holds prompt + response documents"));

    tokenizer_free(tok);
    if (check_fail_ == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
        CHECK(system(cmd) == 0);
    } else {
        printf("test_generate_stage: kept %s\n", g_dir);
    }
    return check_report("test_generate_stage");
}
