// test_pairs_stage.c: the pairs stage through $DISTILL_BIN, with the real SmolLM2 tokenizer (skipped when
// scripts/fetch-teacher has not run) and a small random-weight teacher of the same vocabulary.
//   * recipe 1: generate (samples_per_prompt = 2, one prompt given twice so its group has 4 responses, short
//     max_new_tokens so most are cut) -> pairs; pairs on chat data with several answers per prompt (one repetitive, one multi-turn bad
//     record skipped, one prompt with a single answer); init; dpo on the pairs (the shard is what DPO reads).
//     Every pair is checked against an independent computation: the teacher's log-likelihood of each
//     response run alone through the CPU engine (float64 log-softmax), the stop token, the repeated 4-grams,
//     the penalties, best vs worst per prompt, min_margin.
//   * resume: scores.bin cut inside its second record, outputs removed, --resume: the same bytes.
//   * reuse: a second run takes its scores from OUTPUT_DIR/.pairs-cache (shown by editing the cached file);
//     with reuse = false it scores again, to the first run's decisions; a cached file that does not fit the data
//     is dropped with a warning and the stage scores again.
//   * bad input: an invalid JSONL line (bad_records = "fail") stops the run with exit 3 naming FILE:LINE; a
//     multi-turn record with bad_records = "fail" names the shard and document; a data set with one response
//     per prompt is refused with a hint; so is a set where no prompt reaches min_margin (no
//     shard left; pairs.jsonl shows the margins); a bad line in an eval stage's choice file stops the run
//     before anything runs, naming FILE:LINE.
#include <math.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/model_io.h"
#include "distill/shards.h"
#include "distill/tokenizer.h"
#include "tests/check.h"

#define GGUF "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf"

static char g_dir[256];

static int run_bin(const char *bin, const char *recipe, const char *name, const char *extra) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' '%s' --quiet --set run.name=%s %s >> %s/log.txt 2>&1", bin, recipe, name, extra, g_dir);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static bool log_has(const char *what) {
    char p[400];
    snprintf(p, sizeof p, "%s/log.txt", g_dir);
    size_t n;
    DlError e;
    char *t = dl_read_file(p, &n, &e);
    bool ok = t && strstr(t, what);
    if (!ok) fprintf(stderr, "log.txt lacks: %s\n", what);
    free(t);
    return ok;
}

static void clear_log(void) {
    char p[400];
    snprintf(p, sizeof p, "%s/log.txt", g_dir);
    FILE *f = fopen(p, "w");
    if (f) fclose(f);
}

// Direct: sum of log p(row[t] | row[<t]) for t in [from, len), the row alone, float64 log-softmax.
static double direct_ll(const LoadedModel *m, const int32_t *row, int64_t len, int64_t from) {
    DlError e;
    const int64_t V = m->hc.base.vocab;
    Engine *eng = engine_new(&m->hc, &m->reg, m->params, 1, len, 0, &e);
    if (!eng) return NAN;
    engine_forward(eng, row, NULL);
    float *lg = malloc((size_t)(len * V) * sizeof(float));
    engine_logits(eng, 0, len, lg);
    double s = 0;
    for (int64_t t = from; t < len; t++) {
        const float *x = lg + (t - 1) * V;
        double mx = x[0], z = 0;
        for (int64_t j = 1; j < V; j++) mx = fmax(mx, x[j]);
        for (int64_t j = 0; j < V; j++) z += exp((double)x[j] - mx);
        s += (double)x[row[t]] - mx - log(z);
    }
    free(lg);
    engine_free(eng);
    return s;
}

// Fraction of 4-grams at positions 1.. that equal one at an earlier position (quadratic, independent of the stage's).
static double repeat_frac(const int32_t *r, int64_t m) {
    int64_t k = m - 3, rep = 0;
    if (k < 2) return 0;
    for (int64_t i = 1; i < k; i++) {
        bool seen = false;
        for (int64_t j = 0; j < i && !seen; j++) seen = !memcmp(r + i, r + j, 16);
        rep += seen;
    }
    return (double)rep / (double)k;
}

typedef struct {
    int32_t *ids;
    int64_t n, p, q;  // length, prompt end, response end
    double score;
    bool ok;
} TDoc;

// Expected pairs of an LM shard: returns the number of pairs; pairs[k] = {chosen doc, rejected doc}.
static int expected_pairs(const char *shard, const LoadedModel *t, const int32_t stops[3], double upen, double rpen,
                          double min_margin, int64_t pairs[][2], int maxp, TDoc **docs_out, int64_t *nd_out) {
    ShardReader *r;
    DlError e;
    if (shard_open(&r, shard, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    int64_t nd = shard_info(r)->n_docs;
    TDoc *d = calloc((size_t)nd, sizeof *d);
    for (int64_t i = 0; i < nd; i++) {
        uint8_t *mask;
        shard_read_doc(r, i, &d[i].ids, &mask, &d[i].n, &e);
        int64_t p = 0, q = d[i].n;
        while (p < d[i].n && !mask[p]) p++;
        while (q > p && !mask[q - 1]) q--;
        bool span = p > 0 && p < q;
        for (int64_t k = p; k < q; k++) span &= mask[k] != 0;
        free(mask);
        d[i].p = p, d[i].q = q, d[i].ok = span;
        if (!span) continue;
        int64_t m = q - p;
        double mean = direct_ll(t, d[i].ids, q, p) / (double)m;
        int32_t last = d[i].ids[q - 1];
        bool fin = last == stops[0] || last == stops[1] || last == stops[2];
        d[i].score = mean - (fin ? 0 : upen) - rpen * repeat_frac(d[i].ids + p, m);
    }
    shard_close(r);
    int np = 0;
    bool *done = calloc((size_t)nd, 1);
    for (int64_t i = 0; i < nd; i++) {
        if (!d[i].ok || done[i]) continue;
        int64_t best = i, worst = i, cnt = 0;
        for (int64_t j = i; j < nd; j++) {
            if (!d[j].ok || d[j].p != d[i].p || memcmp(d[j].ids, d[i].ids, (size_t)d[i].p * 4)) continue;
            done[j] = true;
            cnt++;
            if (d[j].score > d[best].score) best = j;
            if (d[j].score <= d[worst].score) worst = j;
        }
        if (cnt >= 2 && best != worst && d[best].score - d[worst].score >= min_margin && np < maxp) {
            pairs[np][0] = best, pairs[np][1] = worst;
            np++;
        }
    }
    free(done);
    *docs_out = d;
    *nd_out = nd;
    return np;
}

// The output shard's pairs equal the expected ones (tokens of prompt, chosen, rejected).
static void check_pairs(const char *out, const TDoc *d, int64_t pairs[][2], int np) {
    ShardReader *r;
    DlError e;
    int rc = shard_open(&r, out, &e);
    CHECK(rc == 0);
    if (rc) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    CHECK(shard_info(r)->kind == SHARD_PREF);
    CHECK_EQ_I64(shard_info(r)->n_pairs, np);
    int good = 0;
    for (int k = 0; k < np && k < shard_info(r)->n_pairs; k++) {
        int32_t *p, *c, *j;
        int64_t npr, nc, nj;
        shard_read_pair(r, k, &p, &npr, &c, &nc, &j, &nj, &e);
        const TDoc *C = &d[pairs[k][0]], *R = &d[pairs[k][1]];
        bool ok = npr == C->p && !memcmp(p, C->ids, (size_t)npr * 4) && nc == C->q - C->p &&
                  !memcmp(c, C->ids + C->p, (size_t)nc * 4) && nj == R->q - R->p && !memcmp(j, R->ids + R->p, (size_t)nj * 4);
        if (!ok) fprintf(stderr, "%s: pair %d differs from the expected (chosen doc %lld, rejected doc %lld)\n", out, k,
                         (long long)pairs[k][0], (long long)pairs[k][1]);
        good += ok;
        free(p), free(c), free(j);
    }
    CHECK_EQ_I64(good, np);
    shard_close(r);
}

static char *slurp(const char *path) {
    size_t n;
    DlError e;
    return dl_read_file(path, &n, &e);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

int main(void) {
    const char *bin = getenv("DISTILL_BIN");
    if (!bin || access(GGUF, R_OK)) {
        printf("test_pairs_stage: skipped (needs DISTILL_BIN and %s; run scripts/fetch-teacher)\n", GGUF);
        return 0;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_pairs_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    char cwd[300], path[600], recipe[600], buf[8192];
    if (!getcwd(cwd, sizeof cwd)) return 1;
    // prompts: the first twice (its 2 x 2 samples form one group of 4), two more (2 samples each)
    const char *prompts[4] = {"Name a fruit.", "Name a fruit.", "Say hi.", "Count to three."};
    snprintf(path, sizeof path, "%s/prompts.jsonl", g_dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 4; i++) fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}]}\n", prompts[i]);
    fclose(f);
    // chat answers: 3 for the first prompt (one repetitive), 2 for the second, 1 for the third; a multi-turn record
    snprintf(path, sizeof path, "%s/answers.jsonl", g_dir);
    write_file(path,
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Name a fruit.\"}, {\"role\": \"assistant\", \"content\": \"An apple.\"}]}\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Name a fruit.\"}, {\"role\": \"assistant\", \"content\": "
               "\"apple pear apple pear apple pear apple pear apple pear apple pear apple pear\"}]}\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Name a fruit.\"}, {\"role\": \"assistant\", \"content\": \"A ripe banana.\"}]}\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}, {\"role\": \"assistant\", \"content\": \"Hi!\"}]}\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}, "
               "{\"role\": \"user\", \"content\": \"Bye\"}, {\"role\": \"assistant\", \"content\": \"Bye\"}]}\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}, {\"role\": \"assistant\", \"content\": \"Hello there, friend.\"}]}\n"
               "{\"messages\": [{\"role\": \"user\", \"content\": \"Count to three.\"}, {\"role\": \"assistant\", \"content\": \"1 2 3\"}]}\n");
    snprintf(path, sizeof path, "%s/mc.jsonl", g_dir);
    write_file(path, "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\", \"5\"], \"answer\": 1}\n"
                     "{\"question\": \"Sky color?\", \"choices\": [\"blue\", \"green\"], \"answer\": 0}\n");
    snprintf(path, sizeof path, "%s/teacher.json", g_dir);
    write_file(path, "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 32, "
                     "\"intermediate_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                     "\"head_dim\": 8, \"vocab_size\": 49152, \"max_position_embeddings\": 256, \"rope_theta\": 10000.0, "
                     "\"rms_norm_eps\": 1e-05, \"tie_word_embeddings\": true, \"bos_token_id\": 1, \"eos_token_id\": 2, "
                     "\"initializer_range\": 0.3}\n");
    const char *head =
        "[run]\nname = \"p\"\noutput_dir = \"%s/runs\"\nseed = 3\ncheckpoint_every = 0\n\n[teacher]\npath = \"%s/teacher.json\"\n\n"
        "[tokenizer]\npath = \"%s/%s\"\n\n[hybrid]\nattn_fraction = 0.5\n\n";
    snprintf(recipe, sizeof recipe, "%s/pairs.toml", g_dir);
    f = fopen(recipe, "w");
    fprintf(f, head, g_dir, g_dir, cwd, GGUF);
    fprintf(f,
            "[data.prompts]\nsources = [\"%s/prompts.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
            "[data.samples]\nseq_len = 64\n\n"
            "[data.answers]\nsources = [\"%s/answers.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
            "[data.prefs]\nseq_len = 64\n\n[data.prefs2]\nseq_len = 64\n\n"
            "[[stage]]\nkind = \"generate\"\ndata = \"prompts\"\noutput = \"samples\"\nmax_new_tokens = 8\ntemperature = 1.0\n"
            "top_p = 1.0\nbatch_size = 4\nsamples_per_prompt = 2\n\n"
            "[[stage]]\nkind = \"pairs\"\nname = \"pairs-gen\"\ndata = \"samples\"\noutput = \"prefs\"\nmin_margin = 0.001\nbatch_size = 2\n\n"
            "[[stage]]\nkind = \"pairs\"\nname = \"pairs-chat\"\ndata = \"answers\"\noutput = \"prefs2\"\nmin_margin = 0\n"
            "repeat_penalty = 3.0\nunfinished_penalty = 0.5\n\n"
            "[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"dpo\"\ndata = \"prefs\"\nsteps = 2\n\n"
            "[[stage]]\nkind = \"eval\"\ndata = [\"answers\"]\nchoice = [\"%s/mc.jsonl\"]\n",
            g_dir, g_dir, g_dir);
    fclose(f);
    int rc = run_bin(bin, recipe, "p", "");
    CHECK_EQ_I64(rc, 0);
    if (rc) {
        snprintf(buf, sizeof buf, "cat %s/log.txt >&2", g_dir);
        if (system(buf)) {}
    }
    CHECK(log_has("document 4: the response is not one span"));  // the multi-turn record, skipped

    LoadedModel t;
    Tokenizer *tok;
    DlError e;
    if (model_load(path, 3, &t, &e) || tokenizer_load(GGUF, &tok, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    int32_t stops[3] = {tokenizer_eos(tok), tokenizer_token_id(tok, "<|im_end|>"), tokenizer_token_id(tok, "<|eot_id|>")};
    int64_t pairs[16][2];
    TDoc *d;
    int64_t nd;
    // 1. generated samples: 3 distinct prompts, 4 + 2 + 2 responses -> up to 3 pairs; default penalties
    char in1[700], out1[700], in2[700], out2[700], js1[700];
    snprintf(in1, sizeof in1, "%s/runs/p/01-generate/samples.train.h5", g_dir);
    snprintf(out1, sizeof out1, "%s/runs/p/02-pairs-gen/prefs.train.h5", g_dir);
    snprintf(js1, sizeof js1, "%s/runs/p/02-pairs-gen/pairs.jsonl", g_dir);
    int np = expected_pairs(in1, &t, stops, 1.0, 2.0, 0.001, pairs, 16, &d, &nd);
    CHECK_EQ_I64(nd, 8);
    CHECK(np >= 2);
    check_pairs(out1, d, pairs, np);
    for (int64_t i = 0; i < nd; i++) free(d[i].ids);
    free(d);
    char *j1 = slurp(js1);
    CHECK(j1 && strstr(j1, "\"responses\":4") && strstr(j1, "\"responses\":2") && strstr(j1, "\"mean_logprob\":"));
    // 2. chat answers: the repetitive answer is the rejected one of the first prompt
    snprintf(in2, sizeof in2, "%s/runs/p/data/answers.train.h5", g_dir);
    snprintf(out2, sizeof out2, "%s/runs/p/03-pairs-chat/prefs2.train.h5", g_dir);
    np = expected_pairs(in2, &t, stops, 0.5, 3.0, 0, pairs, 16, &d, &nd);
    CHECK_EQ_I64(nd, 7);
    CHECK_EQ_I64(np, 2);
    CHECK(np >= 1 && pairs[0][1] == 1);
    check_pairs(out2, d, pairs, np);
    for (int64_t i = 0; i < nd; i++) free(d[i].ids);
    free(d);
    snprintf(buf, sizeof buf, "%s/runs/p/05-dpo/DONE", g_dir);
    CHECK(dl_file_exists(buf));  // DPO trained on the pairs
    // the eval stage's multiple-choice results: one per model, in RUN_DIR/eval.json
    snprintf(buf, sizeof buf, "%s/runs/p/eval.json", g_dir);
    char *ej = slurp(buf);
    CHECK(ej && strstr(ej, "\"results\"") && strstr(ej, "\"choice\""));
    CHECK(ej && strstr(ej, "\"label\":\t\"teacher\"") && strstr(ej, "\"label\":\t\"student\"") &&
          strstr(ej, "\"label\":\t\"init\"") && strstr(ej, "\"questions\":\t2") && strstr(ej, "\"chance\":\t0.41666") &&
          strstr(ej, "\"by_category\":\t{\n\t\t\t\t\"other\":\t{"));
    free(ej);

    // resume: cut scores.bin inside its second record, drop the outputs and the later stages' markers
    char sb[700];
    snprintf(sb, sizeof sb, "%s/runs/p/02-pairs-gen/scores.bin", g_dir);
    CHECK(truncate(sb, 24 + 10) == 0);
    ShardReader *r0;
    int64_t before_pairs = -1;
    if (shard_open(&r0, out1, &e) == 0) before_pairs = shard_info(r0)->n_pairs, shard_close(r0);
    snprintf(buf, sizeof buf, "rm -r %s/runs/.pairs-cache && cd %s/runs/p && rm -f 02-pairs-gen/DONE 02-pairs-gen/prefs.train.h5 02-pairs-gen/pairs.jsonl "
             "03-pairs-chat/DONE 04-init/DONE 05-dpo/DONE 06-eval/DONE && rm -rf 04-init/ckpt* 05-dpo/ckpt*", g_dir, g_dir);
    CHECK(system(buf) == 0);
    clear_log();
    rc = run_bin(bin, recipe, "p", "--resume");  // the resume path: the cache was removed
    CHECK_EQ_I64(rc, 0);
    {  // the kept record was loaded, not discarded: the 8 scores follow it (its chunk is rescored whole)
        FILE *g = fopen(sb, "rb");
        long sz = -1;
        if (g) fseek(g, 0, SEEK_END), sz = ftell(g), fclose(g);
        CHECK_EQ_I64(sz, 24 * (1 + 8));
    }
    char *j2 = slurp(js1);
    CHECK(j1 && j2 && !strcmp(j1, j2));  // the same decisions and the same scores, to the last digit
    free(j2);

    // reuse: the cached copy of run p's scores gets its last score changed; run q (same recipe) takes it
    {
        size_t orig_n = 0;
        char *orig = dl_read_file(sb, &orig_n, &e);  // kept for reuse when the resumed stage finished
        char cached[800] = "", line[800];
        snprintf(buf, sizeof buf, "ls %s/runs/.pairs-cache/*.bin", g_dir);
        FILE *ls = popen(buf, "r");
        int n_cache = 0;
        while (ls && fscanf(ls, "%799s", line) == 1) {
            n_cache++;
            size_t n;
            DlError ce;
            char *c = dl_read_file(line, &n, &ce);
            if (c && orig && n == orig_n && !memcmp(c, orig, n)) snprintf(cached, sizeof cached, "%s", line);
            free(c);
        }
        if (ls) pclose(ls);
        CHECK_EQ_I64(n_cache, 2);  // pairs-gen and pairs-chat
        CHECK(cached[0]);
        const double low = -1e4;
        FILE *g = fopen(cached, "r+b");
        // the last record (the resumed file repeats its first document in a later record, which would win)
        CHECK(g && orig_n >= 24 && fseek(g, (long)orig_n - 8, SEEK_SET) == 0 && fwrite(&low, 8, 1, g) == 1);
        if (g) fclose(g);
        CHECK_EQ_I64(run_bin(bin, recipe, "q", ""), 0);
        snprintf(buf, sizeof buf, "%s/runs/q/02-pairs-gen/scores.bin", g_dir);
        size_t nq;
        char *sq = dl_read_file(buf, &nq, &e), *ed = dl_read_file(cached, &orig_n, &e);
        CHECK(sq && ed && nq == orig_n && !memcmp(sq, ed, nq));
        snprintf(buf, sizeof buf, "%s/runs/q/02-pairs-gen/pairs.jsonl", g_dir);
        char *jq = slurp(buf);
        CHECK(jq && j1 && strcmp(jq, j1));  // the edited score changed a decision or a printed score
        free(sq), free(ed), free(jq);
        CHECK_EQ_I64(run_bin(bin, recipe, "q2", "--set stage.pairs-gen.reuse=false"), 0);
        snprintf(buf, sizeof buf, "%s/runs/q2/02-pairs-gen/pairs.jsonl", g_dir);
        jq = slurp(buf);
        CHECK(jq && j1 && !strcmp(jq, j1));
        free(jq);
        // a cached file that does not fit the data (its first record names a document that does not exist) is
        // dropped with a warning: run q3 scores again, to the first run's decisions, and keeps a fitting file
        const int64_t bad_doc = 999999;
        g = fopen(cached, "r+b");
        CHECK(g && fwrite(&bad_doc, 8, 1, g) == 1);
        if (g) fclose(g);
        clear_log();
        CHECK_EQ_I64(run_bin(bin, recipe, "q3", ""), 0);
        CHECK(log_has("does not fit this stage"));
        snprintf(buf, sizeof buf, "%s/runs/q3/02-pairs-gen/pairs.jsonl", g_dir);
        jq = slurp(buf);
        CHECK(jq && j1 && !strcmp(jq, j1));
        int64_t first_doc = -1;
        g = fopen(cached, "rb");
        CHECK(g && fread(&first_doc, 8, 1, g) == 1 && first_doc >= 0 && first_doc < bad_doc);
        if (g) fclose(g);
        free(jq), free(orig);
    }
    free(j1);
    np = expected_pairs(in1, &t, stops, 1.0, 2.0, 0.001, pairs, 16, &d, &nd);
    CHECK_EQ_I64(np, before_pairs);
    check_pairs(out1, d, pairs, np);
    for (int64_t i = 0; i < nd; i++) free(d[i].ids);
    free(d);

    // bad input 1: an invalid JSONL line with bad_records = "fail": exit 3, FILE:LINE
    snprintf(path, sizeof path, "%s/bad.jsonl", g_dir);
    write_file(path, "{\"messages\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n"
                     "{\"messages\": [oops\n");
    snprintf(recipe, sizeof recipe, "%s/bad1.toml", g_dir);
    f = fopen(recipe, "w");
    fprintf(f, head, g_dir, g_dir, cwd, GGUF);
    fprintf(f, "[data.a]\nsources = [\"%s/bad.jsonl\"]\nformat = \"chat\"\nseq_len = 64\nbad_records = \"fail\"\n\n"
               "[data.prefs]\nseq_len = 64\n\n[[stage]]\nkind = \"pairs\"\ndata = \"a\"\noutput = \"prefs\"\n",
            g_dir);
    fclose(f);
    clear_log();
    CHECK_EQ_I64(run_bin(bin, recipe, "b1", ""), 3);
    snprintf(buf, sizeof buf, "%s/bad.jsonl:3:", g_dir);
    CHECK(log_has(buf));
    // bad input 2: the multi-turn record with bad_records = "fail": the shard and the document are named
    snprintf(recipe, sizeof recipe, "%s/bad2.toml", g_dir);
    f = fopen(recipe, "w");
    fprintf(f, head, g_dir, g_dir, cwd, GGUF);
    fprintf(f, "[data.answers]\nsources = [\"%s/answers.jsonl\"]\nformat = \"chat\"\nseq_len = 64\nbad_records = \"fail\"\n\n"
               "[data.prefs]\nseq_len = 64\n\n[[stage]]\nkind = \"pairs\"\ndata = \"answers\"\noutput = \"prefs\"\n",
            g_dir);
    fclose(f);
    clear_log();
    CHECK_EQ_I64(run_bin(bin, recipe, "b2", ""), 3);
    CHECK(log_has("answers.train.h5: document 4: the response is not one span"));
    snprintf(buf, sizeof buf, "%s/runs/b2/01-pairs/prefs.train.h5", g_dir);
    CHECK(!dl_file_exists(buf));
    // bad input 3: one response per prompt
    snprintf(path, sizeof path, "%s/single.jsonl", g_dir);
    write_file(path, "{\"messages\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}\n"
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"B\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n");
    snprintf(recipe, sizeof recipe, "%s/bad3.toml", g_dir);
    f = fopen(recipe, "w");
    fprintf(f, head, g_dir, g_dir, cwd, GGUF);
    fprintf(f, "[data.s]\nsources = [\"%s/single.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
               "[data.prefs]\nseq_len = 64\n\n[[stage]]\nkind = \"pairs\"\ndata = \"s\"\noutput = \"prefs\"\n",
            g_dir);
    fclose(f);
    clear_log();
    CHECK_EQ_I64(run_bin(bin, recipe, "b3", ""), 3);
    CHECK(log_has("every prompt has a single response (2 prompts)"));

    // no pair above min_margin: refused, no output left
    snprintf(recipe, sizeof recipe, "%s/bad4.toml", g_dir);
    f = fopen(recipe, "w");
    fprintf(f, head, g_dir, g_dir, cwd, GGUF);
    fprintf(f, "[data.answers]\nsources = [\"%s/answers.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
               "[data.prefs]\nseq_len = 64\n\n[[stage]]\nkind = \"pairs\"\ndata = \"answers\"\noutput = \"prefs\"\n"
               "min_margin = 1000\n",
            g_dir);
    fclose(f);
    clear_log();
    CHECK_EQ_I64(run_bin(bin, recipe, "b4", ""), 3);
    CHECK(log_has("no pairs: all 2 prompts with >= 2 responses have a score margin below min_margin = 1000"));
    snprintf(buf, sizeof buf, "%s/runs/b4/01-pairs/prefs.train.h5", g_dir);
    CHECK(!dl_file_exists(buf));
    snprintf(buf, sizeof buf, "%s/runs/b4/01-pairs/pairs.jsonl", g_dir);  // the decisions, to see why
    char *j4 = slurp(buf);
    CHECK(j4 && strstr(j4, "\"pair\":false") && !strstr(j4, "\"pair\":true"));
    free(j4);

    // a bad line in an eval stage's choice file stops the run before any stage runs
    snprintf(path, sizeof path, "%s/mcbad.jsonl", g_dir);
    write_file(path, "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\"], \"answer\": 1}\n"
                     "{\"question\": \"3+3?\", \"choices\": [\"6\", \"7\"], \"answer\": 2}\n");
    snprintf(recipe, sizeof recipe, "%s/bad5.toml", g_dir);
    f = fopen(recipe, "w");
    fprintf(f, head, g_dir, g_dir, cwd, GGUF);
    fprintf(f, "[data.answers]\nsources = [\"%s/answers.jsonl\"]\nformat = \"chat\"\nseq_len = 64\n\n"
               "[[stage]]\nkind = \"init\"\n\n[[stage]]\nkind = \"eval\"\ndata = [\"answers\"]\nchoice = [\"%s\"]\n",
            g_dir, path);
    fclose(f);
    clear_log();
    CHECK_EQ_I64(run_bin(bin, recipe, "b5", ""), 3);
    snprintf(buf, sizeof buf, "%s:2: \"answer\" must be an integer index 0..1", path);
    CHECK(log_has(buf));
    snprintf(buf, sizeof buf, "%s/runs/b5", g_dir);
    CHECK(!dl_file_exists(buf));  // nothing ran

    tokenizer_free(tok);
    model_free(&t);
    if (check_fail_ == 0) {
        snprintf(buf, sizeof buf, "rm -rf %s", g_dir);
        CHECK(system(buf) == 0);
    } else {
        printf("test_pairs_stage: kept %s\n", g_dir);
    }
    return check_report("test_pairs_stage");
}
