// cmd_eval_spec.c: `distill eval-spec`: plain vs speculative decoding speed of a target with a draft model
// (a file, or a cut of the target's layers), acceptance per draft position, tokens per step and speedup, at
// several batch sizes and K; and plain decode speed at long contexts (the hybrid against its teacher). On the
// CPU (Decoder) or the GPU (DecoderCuda, --device cuda) through the same generation code (spec_decode.h).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "distill/command.h"
#include "distill/common.h"
#include "distill/engine.h"
#include "distill/model_io.h"
#include "distill/spec_decode.h"
#include "distill/tokenizer.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

// "1,2,4" -> values (at most cap); returns the count or -1
static int parse_list(const char *s, int *v, int cap) {
    int n = 0;
    while (s && *s && n < cap) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s) return -1;
        v[n++] = (int)x;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static const char *default_prompts[] = {
    "The history of the printing press begins",
    "Here is a short explanation of how photosynthesis works:",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three most important rules of writing clear code are",
    "In 1969, the first humans landed on the Moon.",
    "A recipe for pancakes: first, mix",
    "The capital of France is Paris. The capital of Germany is",
};

typedef struct {
    int32_t *ids;  // [n, Lmax]
    int64_t *len;  // [n]
    int64_t n, Lmax;
} Prompts;

static int64_t total(const int64_t *n, int64_t B) {
    int64_t s = 0;
    for (int64_t b = 0; b < B; b++) s += n[b];
    return s;
}

static int run_eval_spec(int argc, char **argv) {
    const char *target = NULL, *draft = NULL, *draft_layers = NULL, *prompts_path = NULL, *json = NULL;
    const char *teacher = NULL, *tokenizer = NULL, *ks = "4", *batches = "1", *contexts = NULL, *device = "cpu";
    int64_t max_tokens = 64;
    int graph = 1;
    double temperature = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--target") && has) target = argv[++i];
        else if (!strcmp(a, "--draft") && has) draft = argv[++i];
        else if (!strcmp(a, "--draft-layers") && has) draft_layers = argv[++i];
        else if (!strcmp(a, "--teacher") && has) teacher = argv[++i];
        else if (!strcmp(a, "--tokenizer") && has) tokenizer = argv[++i];
        else if (!strcmp(a, "--k") && has) ks = argv[++i];
        else if (!strcmp(a, "--batch") && has) batches = argv[++i];
        else if (!strcmp(a, "--prompts") && has) prompts_path = argv[++i];
        else if (!strcmp(a, "--max-tokens") && has) max_tokens = atoll(argv[++i]);
        else if (!strcmp(a, "--temperature") && has) temperature = atof(argv[++i]);
        else if (!strcmp(a, "--contexts") && has) contexts = argv[++i];
        else if (!strcmp(a, "--json") && has) json = argv[++i];
        else if (!strcmp(a, "--device") && has) device = argv[++i];
        else if (!strcmp(a, "--no-graph")) graph = 0;
        else dl_die(DL_EXIT_USAGE, "eval-spec: unknown or incomplete option %s (see distill eval-spec --help)", a);
    }
    if (!target) dl_die(DL_EXIT_USAGE, "eval-spec: --target MODEL is required");
    if (!contexts && !draft == !draft_layers) dl_die(DL_EXIT_USAGE, "eval-spec: give exactly one of --draft MODEL, --draft-layers L,..");
    int kv[16], bv[16], cv[16];
    int nk = parse_list(ks, kv, 16), nb = parse_list(batches, bv, 16), nc = contexts ? parse_list(contexts, cv, 16) : 0;
    if (nk <= 0 || nb <= 0 || nc < 0) dl_die(DL_EXIT_USAGE, "eval-spec: --k, --batch and --contexts take lists like 1,2,4");
    for (int i = 0; i < nk; i++)
        if (kv[i] < 1 || kv[i] > 8) dl_die(DL_EXIT_USAGE, "eval-spec: --k %d outside 1..8", kv[i]);
    for (int i = 0; i < nb; i++)
        if (bv[i] < 1) dl_die(DL_EXIT_USAGE, "eval-spec: --batch %d must be positive", bv[i]);
    if (max_tokens < 1) dl_die(DL_EXIT_USAGE, "eval-spec: --max-tokens must be positive");
    if (strcmp(device, "cpu") && strcmp(device, "cuda")) dl_die(DL_EXIT_USAGE, "eval-spec: --device %s: expected cpu or cuda", device);
    const int cuda = !strcmp(device, "cuda");
    DlError e;
    LoadedModel T, Dm = {0};
    if (model_load(target, 0, &T, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
    FILE *js = NULL;
    if (json && !(js = fopen(json, "w"))) dl_die(DL_EXIT_RUNTIME, "eval-spec: cannot write %s", json);
    if (js)
        fprintf(js, "{\"target\": \"%s\", \"device\": \"%s\", \"cuda_graphs\": %s, \"max_tokens\": %lld, \"temperature\": %g", target,
                device, cuda && graph ? "true" : "false", (long long)max_tokens, temperature);
    GenParams gp = {.sp = {.greedy = temperature <= 0, .temperature = (float)temperature, .top_p = 1}, .max_tokens = max_tokens,
                    .stop = {-1, -1}};  // no stop: every run generates exactly max_tokens (comparable timings)
    if (draft || draft_layers) {
        if (draft) {
            if (model_load(draft, 0, &Dm, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
        } else {
            int lay[DL_MAX_LAYERS];
            int nl = parse_list(draft_layers, lay, DL_MAX_LAYERS);
            if (nl <= 0) dl_die(DL_EXIT_USAGE, "eval-spec: --draft-layers takes a list like 0,29");
            if (spec_draft_from_layers(&T.hc, &T.reg, T.params, lay, nl, &Dm.hc, &Dm.reg, &Dm.params, &e))
                dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
        }
        if (Dm.hc.base.vocab != T.hc.base.vocab)
            dl_die(DL_EXIT_INPUT, "eval-spec: draft vocabulary %d != target vocabulary %d", Dm.hc.base.vocab, T.hc.base.vocab);
        // prompts
        Tokenizer *tok = NULL;
        // a run's export carries no tokenizer files: --tokenizer (or the teacher's) names one
        const char *tpath = tokenizer ? tokenizer : target;
        if (tokenizer_load(tpath, &tok, &e) && !(tokenizer == NULL && teacher && tokenizer_load(teacher, &tok, &e) == 0))
            dl_die(DL_EXIT_INPUT, "eval-spec: no tokenizer in %s (%s); pass --tokenizer GGUF|tokenizer.json", tpath, e.msg);
        char **lines = NULL;
        int64_t nl = 0;
        if (prompts_path) {
            FILE *f = fopen(prompts_path, "r");
            if (!f) dl_die(DL_EXIT_INPUT, "eval-spec: cannot read %s", prompts_path);
            char buf[8192];
            while (fgets(buf, sizeof buf, f)) {
                buf[strcspn(buf, "\r\n")] = 0;
                if (!buf[0]) continue;
                lines = realloc(lines, (size_t)(nl + 1) * sizeof(char *));
                lines[nl++] = dl_strdup(buf);
            }
            fclose(f);
            if (nl == 0) dl_die(DL_EXIT_INPUT, "eval-spec: %s has no prompts (one per line)", prompts_path);
        } else {
            nl = (int64_t)DL_ARRAY_LEN(default_prompts);
            lines = malloc((size_t)nl * sizeof(char *));
            for (int64_t i = 0; i < nl; i++) lines[i] = dl_strdup(default_prompts[i]);
        }
        int32_t **enc = malloc((size_t)nl * sizeof(int32_t *));
        int64_t *elen = malloc((size_t)nl * sizeof(int64_t)), Lmax = 1;
        for (int64_t i = 0; i < nl; i++) {
            if (tokenizer_encode(tok, lines[i], strlen(lines[i]), &enc[i], &elen[i], &e) || elen[i] < 1)
                dl_die(DL_EXIT_INPUT, "eval-spec: prompt %lld: cannot encode", (long long)i + 1);
            Lmax = DL_MAX(Lmax, elen[i]);
        }
        printf("eval-spec: target %s (%d layers), draft %s (%d layers), %lld prompts, %lld new tokens each, %s, on %s%s\n",
               target, T.hc.base.n_layer, draft ? draft : draft_layers, Dm.hc.base.n_layer, (long long)nl,
               (long long)max_tokens, gp.sp.greedy ? "greedy" : "sampled", device, cuda && graph ? " (CUDA graphs)" : "");
        printf("%5s %3s %10s %10s %8s %8s %7s %7s  %s\n", "batch", "k", "plain t/s", "spec t/s", "speedup", "tok/step", "accept",
               "same", "acceptance per draft position");
        if (js) fprintf(js, ", \"draft\": \"%s\", \"draft_layers\": %d, \"runs\": [", draft ? draft : draft_layers, Dm.hc.base.n_layer);
        bool first = true;
        for (int bi = 0; bi < nb; bi++) {
            const int64_t B = bv[bi];
            int32_t *pr = dl_calloc((size_t)(B * Lmax), sizeof(int32_t)), *out = dl_malloc((size_t)(B * max_tokens) * sizeof(int32_t));
            int64_t *pl = dl_malloc((size_t)B * sizeof(int64_t)), *no = dl_malloc((size_t)B * sizeof(int64_t));
            const int64_t kmax = 8, nbatches = (nl + B - 1) / B;
            int32_t *ref = dl_malloc((size_t)(nbatches * B * max_tokens) * sizeof(int32_t));  // plain outputs
            int64_t *nref = dl_malloc((size_t)(nbatches * B) * sizeof(int64_t));
            GenDecoder dt, dd;
            if (gen_decoder_new(&T.hc, &T.reg, T.params, B, spec_max_len(Lmax, max_tokens, kmax), cuda, graph, &dt, &e) ||
                gen_decoder_new(&Dm.hc, &Dm.reg, Dm.params, B, spec_max_len(Lmax, max_tokens, kmax), cuda, graph, &dd, &e))
                dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
            Rng rng;
            if (cuda) {  // warm-up (cuBLASLt heuristics, graph captures): one short run of each, untimed
                GenParams wp = gp;
                wp.max_tokens = DL_MIN(max_tokens, 8), wp.k = kv[0];
                for (int64_t b = 0; b < B; b++) memcpy(pr + b * Lmax, enc[b % nl], (size_t)elen[b % nl] * sizeof(int32_t)), pl[b] = elen[b % nl];
                rng_init(&rng, 0, 0);
                if (gen_plain(dt, pr, pl, Lmax, &wp, &rng, out, no, &e) ||
                    gen_speculative(dt, dd, pr, pl, Lmax, &wp, &rng, out, no, NULL, &e))
                    dl_die(DL_EXIT_RUNTIME, "eval-spec: %s", e.msg);
            }
            // plain: every prompt once, in batches of B
            double tp = 0;
            int64_t ntp = 0;
            rng_init(&rng, 0, 0);
            for (int64_t s = 0; s < nl; s += B) {
                for (int64_t b = 0; b < B; b++) {  // a short last batch repeats prompts
                    int64_t i = (s + b) % nl;
                    memcpy(pr + b * Lmax, enc[i], (size_t)elen[i] * sizeof(int32_t));
                    pl[b] = elen[i];
                }
                double t0 = now_s();
                if (gen_plain(dt, pr, pl, Lmax, &gp, &rng, out, no, &e)) dl_die(DL_EXIT_RUNTIME, "eval-spec: %s", e.msg);
                tp += now_s() - t0, ntp += total(no, B);
                memcpy(ref + (s / B) * B * max_tokens, out, (size_t)(B * max_tokens) * sizeof(int32_t));
                memcpy(nref + (s / B) * B, no, (size_t)B * sizeof(int64_t));
            }
            for (int ki = 0; ki < nk; ki++) {
                gp.k = kv[ki];
                SpecStats acc = {0};
                double ts = 0;
                int64_t nts = 0, same = 0, nseq = 0;  // greedy: sequences equal to the plain output
                rng_init(&rng, 0, 0);
                for (int64_t s = 0; s < nl; s += B) {
                    for (int64_t b = 0; b < B; b++) {
                        int64_t i = (s + b) % nl;
                        memcpy(pr + b * Lmax, enc[i], (size_t)elen[i] * sizeof(int32_t));
                        pl[b] = elen[i];
                    }
                    SpecStats st;
                    double t0 = now_s();
                    if (gen_speculative(dt, dd, pr, pl, Lmax, &gp, &rng, out, no, &st, &e))
                        dl_die(DL_EXIT_RUNTIME, "eval-spec: %s", e.msg);
                    ts += now_s() - t0, nts += total(no, B);
                    for (int64_t b = 0; b < B && s + b < nl; b++, nseq++) {
                        const int64_t r = (s / B) * B + b;
                        same += no[b] == nref[r] && !memcmp(out + b * max_tokens, ref + r * max_tokens, (size_t)no[b] * sizeof(int32_t));
                    }
                    acc.steps += st.steps, acc.emitted += st.emitted;
                    for (int i = 0; i < gp.k; i++) acc.accepted_at[i] += st.accepted_at[i];
                }
                double ptps = ntp / tp, stps = nts / ts, tps = (double)acc.emitted / (double)DL_MAX(acc.steps, 1);
                double rate = 0;  // accepted draft tokens / proposed
                for (int i = 0; i < gp.k; i++) rate += (double)acc.accepted_at[i];
                rate /= (double)DL_MAX(acc.steps, 1) * gp.k;
                char sm[32] = "-";
                if (gp.sp.greedy) snprintf(sm, sizeof sm, "%lld/%lld", (long long)same, (long long)nseq);
                printf("%5lld %3d %10.1f %10.1f %7.2fx %8.2f %7.3f %7s ", (long long)B, gp.k, ptps, stps, stps / ptps, tps, rate, sm);
                for (int i = 0; i < gp.k; i++) printf(" %.2f", (double)acc.accepted_at[i] / (double)DL_MAX(acc.steps, 1));
                printf("\n");
                if (js) {
                    fprintf(js, "%s{\"batch\": %lld, \"k\": %d, \"plain_tokens_per_s\": %.3f, \"spec_tokens_per_s\": %.3f, "
                                "\"speedup\": %.4f, \"tokens_per_step\": %.4f, \"acceptance_rate\": %.4f, ",
                            first ? "" : ", ", (long long)B, gp.k, ptps, stps, stps / ptps, tps, rate);
                    if (gp.sp.greedy)
                        fprintf(js, "\"greedy_equal_sequences\": %lld, \"sequences\": %lld, ", (long long)same, (long long)nseq);
                    fprintf(js, "\"acceptance\": [");
                    for (int i = 0; i < gp.k; i++)
                        fprintf(js, "%s%.4f", i ? ", " : "", (double)acc.accepted_at[i] / (double)DL_MAX(acc.steps, 1));
                    fprintf(js, "]}");
                    first = false;
                }
            }
            gen_decoder_free(&dt), gen_decoder_free(&dd);
            free(pr), free(out), free(pl), free(no), free(ref), free(nref);
        }
        if (js) fprintf(js, "]");
        for (int64_t i = 0; i < nl; i++) free(lines[i]), free(enc[i]);
        free(lines), free(enc), free(elen);
        tokenizer_free(tok);
    }
    if (nc > 0) {  // plain decode speed at long contexts: the target (a hybrid) vs --teacher
        LoadedModel Te = {0};
        if (teacher && model_load(teacher, 0, &Te, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
        printf("decode speed at context on %s (batch 1, 32 steps, cache filled by seek):\n%8s %14s %14s\n", device,
               "context", "target t/s", teacher ? "teacher t/s" : "");
        if (js) fprintf(js, ", \"contexts\": [");
        for (int ci = 0; ci < nc; ci++) {
            double r[2] = {0, 0};
            for (int m = 0; m < (teacher ? 2 : 1); m++) {
                LoadedModel *M = m ? &Te : &T;
                GenDecoder d;
                if (gen_decoder_new(&M->hc, &M->reg, M->params, 1, cv[ci] + 40, cuda, graph, &d, &e))
                    dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
                if ((r[m] = gen_decode_speed(d, cv[ci], 32, &e)) < 0) dl_die(DL_EXIT_RUNTIME, "eval-spec: %s", e.msg);
                gen_decoder_free(&d);
            }
            if (teacher) printf("%8d %14.1f %14.1f\n", cv[ci], r[0], r[1]);
            else printf("%8d %14.1f\n", cv[ci], r[0]);
            if (js) fprintf(js, "%s{\"context\": %d, \"target_tokens_per_s\": %.3f, \"teacher_tokens_per_s\": %.3f}",
                            ci ? ", " : "", cv[ci], r[0], r[1]);
        }
        if (js) fprintf(js, "]");
        if (teacher) model_free(&Te);
    }
    if (js) {
        fprintf(js, "}\n");
        fclose(js);
    }
    if (Dm.params) {
        if (draft) model_free(&Dm);
        else free(Dm.params), reg_free(&Dm.reg);
    }
    model_free(&T);
    return DL_EXIT_OK;
}

DL_COMMAND(eval_spec_cmd, {
    .name = "eval-spec",
    .usage = "--target MODEL (--draft MODEL | --draft-layers L,..) [--k 1,2,4] [--batch 1,4] [--prompts FILE] "
             "[--max-tokens N] [--temperature T] [--contexts 1024,8192 --teacher MODEL] [--tokenizer T] [--json OUT] "
             "[--device cpu|cuda] [--no-graph]",
    .summary = "plain vs speculative decoding speed, acceptance per draft position; decode speed at long contexts",
    .help =
        "Times plain and speculative generation of --max-tokens tokens (no early stop) for every prompt (one per\n"
        "line of --prompts; default: 8 built-in prompts), batched --batch at a time (prompts of any lengths),\n"
        "for each K in --k (1..8). The draft is a model file or a cut of the target (--draft-layers 0,29: those\n"
        "layers + embeddings + head). Greedy unless --temperature T > 0. Reports tokens/s, speedup, mean tokens\n"
        "per target step, the acceptance rate (accepted / proposed draft tokens), with greedy decoding how many\n"
        "sequences equal the plain output token for token (\"same\"), and per draft position i the fraction of\n"
        "steps that accepted it.\n"
        "  --device cuda        decode on the GPU (DecoderCuda, bf16; the same generation code as the CPU);\n"
        "                       short feeds replay CUDA graphs unless --no-graph; one untimed warm-up run\n"
        "  --contexts C,..      plain decode speed (batch 1) of the target, and of --teacher if given, at\n"
        "                       these context lengths (the cache is zero-filled: speed only)\n"
        "  --tokenizer T        tokenizer for the prompts (default: the target's, else --teacher's; a run's\n"
        "                       export has none)\n"
        "  --json OUT           also write the results as JSON\n"
        "Example: distill eval-spec --target checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf \\\n"
        "           --draft-layers 0,29 --k 1,2,4 --batch 1,4 --max-tokens 32\n",
    .run = run_eval_spec,
})
