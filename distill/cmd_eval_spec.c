// cmd_eval_spec.c: `distill eval-spec`: plain vs speculative decoding speed of a target with a draft model
// (a file, or a cut of the target's layers), acceptance per draft position, tokens per step and speedup, at
// several batch sizes and K (spec_eval.h, the measurement the pipeline's eval stage runs too); and plain decode
// speed at long contexts (the hybrid against its teacher). On the CPU (Decoder) or the GPU (DecoderCuda,
// --device cuda) through the same generation code (spec_decode.h).
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/chat.h"
#include "distill/command.h"
#include "distill/common.h"
#include "distill/draft_vocab.h"
#include "distill/engine.h"
#include "distill/ingest.h"
#include "distill/model_io.h"
#include "distill/spec_decode.h"
#include "distill/spec_eval.h"
#include "distill/tokenizer.h"

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

static bool is_jsonl(const char *path) {
    size_t n = path ? strlen(path) : 0;
    return n > 6 && !strcmp(path + n - 6, ".jsonl");
}

static void add_prompt(int32_t ***enc, int64_t **elen, int64_t i, int32_t *ids, int64_t n) {
    *enc = dl_realloc(*enc, (size_t)(i + 1) * sizeof(int32_t *));
    *elen = dl_realloc(*elen, (size_t)(i + 1) * sizeof(int64_t));
    (*enc)[i] = ids, (*elen)[i] = n;
}

// The prompts, tokenized: enc[i] has elen[i] >= 1 tokens. path *.jsonl: one chat per line ({"messages": [...]} or
// {"prompt": "..."}, the data/ prompt format), rendered with the tokenizer's chat template and the assistant
// header, as the pipeline's generate and eval stages do; any other file: one raw-text prompt per line (chat: each
// line as the user turn of a chat); no file: the built-in ones. An instruct model answers chats, so raw text
// measures the draft off the distribution both models were trained on.
static int64_t load_prompts(const char *path, Tokenizer *tok, bool chat, int32_t ***enc, int64_t **elen) {
    DlError e;
    const char *src = path ? path : "built-in";
    ChatFamily fam = CHAT_CHATML;
    const bool jsonl = is_jsonl(path);
    if ((chat || jsonl) && chat_family_for(tok, &fam, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s: chat prompts: %s", src, e.msg);
    *enc = NULL, *elen = NULL;
    int64_t np = 0;
    if (jsonl) {
        PromptSet ps;
        if (prompts_load(path, INGEST_FAIL, 1, &ps, NULL, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
        for (int64_t i = 0; i < ps.n; i++) {
            int32_t *ids;
            int64_t n;
            if (chat_render(tok, fam, ps.items[i].msgs, ps.items[i].n_msgs, true, &ids, NULL, &n, &e))
                dl_die(DL_EXIT_INPUT, "eval-spec: %s line %lld: %s", path, (long long)ps.items[i].line, e.msg);
            add_prompt(enc, elen, np++, ids, n);
        }
        prompts_free(&ps);
        return np;
    }
    FILE *f = path ? fopen(path, "r") : NULL;
    if (path && !f) dl_die(DL_EXIT_INPUT, "eval-spec: cannot read %s", path);
    char buf[8192];
    for (int64_t ln = 1;; ln++) {
        if (f ? !fgets(buf, sizeof buf, f) : ln > (int64_t)DL_ARRAY_LEN(default_prompts)) break;
        if (!f) snprintf(buf, sizeof buf, "%s", default_prompts[ln - 1]);
        buf[strcspn(buf, "\r\n")] = 0;
        if (!buf[0]) continue;
        int32_t *ids = NULL;
        int64_t n = 0;
        ChatMessage m = {"user", buf};
        if (chat ? chat_render(tok, fam, &m, 1, true, &ids, NULL, &n, &e) : tokenizer_encode(tok, buf, strlen(buf), &ids, &n, &e))
            dl_die(DL_EXIT_INPUT, "eval-spec: %s prompt line %lld: cannot encode: %s", src, (long long)ln, e.msg);
        if (n < 1) dl_die(DL_EXIT_INPUT, "eval-spec: %s prompt line %lld: no tokens", src, (long long)ln);
        add_prompt(enc, elen, np++, ids, n);
    }
    if (f) fclose(f);
    if (np == 0) dl_die(DL_EXIT_INPUT, "eval-spec: %s has no prompts (one per line)", src);
    return np;
}

static void write_json(const char *path, cJSON *root) {
    char *txt = cJSON_Print(root);
    FILE *f = fopen(path, "w");
    if (!f || fputs(txt, f) < 0 || fputc('\n', f) == EOF || fclose(f)) dl_die(DL_EXIT_RUNTIME, "eval-spec: cannot write %s", path);
    free(txt);
}

static int run_eval_spec(int argc, char **argv) {
    const char *target = NULL, *draft = NULL, *draft_layers = NULL, *prompts_path = NULL, *json = NULL;
    const char *teacher = NULL, *tokenizer = NULL, *ks = "4", *batches = "1", *branches = "1", *contexts = NULL, *device = "cpu";
    const char *draft_vocab = NULL;  // NULL: the draft's draft_vocab.json if it has one; "full"; or a count N
    int64_t max_tokens = 64;
    int graph = 1, chat = 0;
    double temperature = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--target") && has) target = argv[++i];
        else if (!strcmp(a, "--draft") && has) draft = argv[++i];
        else if (!strcmp(a, "--draft-layers") && has) draft_layers = argv[++i];
        else if (!strcmp(a, "--draft-vocab") && has) draft_vocab = argv[++i];
        else if (!strcmp(a, "--teacher") && has) teacher = argv[++i];
        else if (!strcmp(a, "--tokenizer") && has) tokenizer = argv[++i];
        else if (!strcmp(a, "--k") && has) ks = argv[++i];
        else if (!strcmp(a, "--batch") && has) batches = argv[++i];
        else if (!strcmp(a, "--branches") && has) branches = argv[++i];
        else if (!strcmp(a, "--prompts") && has) prompts_path = argv[++i];
        else if (!strcmp(a, "--max-tokens") && has) max_tokens = atoll(argv[++i]);
        else if (!strcmp(a, "--temperature") && has) temperature = atof(argv[++i]);
        else if (!strcmp(a, "--contexts") && has) contexts = argv[++i];
        else if (!strcmp(a, "--json") && has) json = argv[++i];
        else if (!strcmp(a, "--device") && has) device = argv[++i];
        else if (!strcmp(a, "--no-graph")) graph = 0;
        else if (!strcmp(a, "--chat")) chat = 1;
        else dl_die(DL_EXIT_USAGE, "eval-spec: unknown or incomplete option %s (see distill eval-spec --help)", a);
    }
    if (!target) dl_die(DL_EXIT_USAGE, "eval-spec: --target MODEL is required");
    if (!contexts && !draft == !draft_layers) dl_die(DL_EXIT_USAGE, "eval-spec: give exactly one of --draft MODEL, --draft-layers L,..");
    int kv[16], bv[16], cv[16], wv[16];
    int nk = parse_list(ks, kv, 16), nb = parse_list(batches, bv, 16), nc = contexts ? parse_list(contexts, cv, 16) : 0;
    int nw = parse_list(branches, wv, 16);
    if (nk <= 0 || nb <= 0 || nc < 0 || nw <= 0)
        dl_die(DL_EXIT_USAGE, "eval-spec: --k, --batch, --branches and --contexts take lists like 1,2,4");
    for (int i = 0; i < nw; i++)
        if (wv[i] < 1 || wv[i] > SPEC_MAX_BRANCH || (wv[i] > 1 && temperature > 0))
            dl_die(DL_EXIT_USAGE, "eval-spec: --branches %d: expected 1..%d, and more than 1 only with greedy decoding", wv[i],
                   SPEC_MAX_BRANCH);
    for (int i = 0; i < nk; i++)
        if (kv[i] < 1 || kv[i] > SPEC_EVAL_MAX_K) dl_die(DL_EXIT_USAGE, "eval-spec: --k %d outside 1..%d", kv[i], SPEC_EVAL_MAX_K);
    for (int i = 0; i < nb; i++)
        if (bv[i] < 1) dl_die(DL_EXIT_USAGE, "eval-spec: --batch %d must be positive", bv[i]);
    if (max_tokens < 1) dl_die(DL_EXIT_USAGE, "eval-spec: --max-tokens must be positive");
    if (strcmp(device, "cpu") && strcmp(device, "cuda")) dl_die(DL_EXIT_USAGE, "eval-spec: --device %s: expected cpu or cuda", device);
    const int cuda = !strcmp(device, "cuda");
    DlError e;
    LoadedModel T, Dm = {0};
    if (model_load(target, 0, &T, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
    cJSON *js = cJSON_CreateObject();
    cJSON_AddStringToObject(js, "target", target);
    cJSON_AddStringToObject(js, "device", device);
    cJSON_AddBoolToObject(js, "cuda_graphs", cuda && graph);
    cJSON_AddNumberToObject(js, "max_tokens", (double)max_tokens);
    cJSON_AddNumberToObject(js, "temperature", temperature);
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
        // the draft's trimmed head: its draft_vocab.json (all of it, or the first N ids), unless --draft-vocab full
        DraftVocab dv = {0};
        if (!(draft_vocab && !strcmp(draft_vocab, "full"))) {
            int64_t want = 0;
            if (draft_vocab) {
                char *end;
                want = strtoll(draft_vocab, &end, 10);
                if (*end || want < 1) dl_die(DL_EXIT_USAGE, "eval-spec: --draft-vocab %s: expected full or a count >= 1", draft_vocab);
            }
            const int r = draft ? draft_vocab_read(draft, Dm.hc.base.vocab, want, &dv, &e) : 1;
            if (r < 0) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
            if (r == 1 && draft_vocab)
                dl_die(DL_EXIT_INPUT, "eval-spec: --draft-vocab %s: the draft %s has no %s (a draft stage with `vocab` writes one)",
                       draft_vocab, draft ? draft : draft_layers, DRAFT_VOCAB_FILE);
        }
        Tokenizer *tok = NULL;
        // a run's export carries no tokenizer files: --tokenizer (or the teacher's) names one
        const char *tpath = tokenizer ? tokenizer : target;
        if (tokenizer_load(tpath, &tok, &e) && !(tokenizer == NULL && teacher && tokenizer_load(teacher, &tok, &e) == 0))
            dl_die(DL_EXIT_INPUT, "eval-spec: no tokenizer in %s (%s); pass --tokenizer GGUF|tokenizer.json", tpath, e.msg);
        int32_t **enc;
        int64_t *elen;
        const int64_t np = load_prompts(prompts_path, tok, chat, &enc, &elen);
        tokenizer_free(tok);
        int64_t ptok = 0;
        for (int64_t i = 0; i < np; i++) ptok += elen[i];
        cJSON_AddNumberToObject(js, "prompts", (double)np);
        cJSON_AddNumberToObject(js, "prompt_tokens", (double)ptok);
        cJSON_AddStringToObject(js, "prompt_format", is_jsonl(prompts_path) ? "chat (jsonl)" : chat ? "chat" : "raw text");
        printf("eval-spec: target %s (%d layers), draft %s (%d layers), %lld prompts (%lld tokens), %lld new tokens each, %s, on %s%s\n",
               target, T.hc.base.n_layer, draft ? draft : draft_layers, Dm.hc.base.n_layer, (long long)np, (long long)ptok,
               (long long)max_tokens, temperature <= 0 ? "greedy" : "sampled", device, cuda && graph ? " (CUDA graphs)" : "");
        if (dv.n) printf("eval-spec: draft head trimmed to %lld ids (%s; %.2f%% of its counted training tokens)\n",
                         (long long)dv.n, DRAFT_VOCAB_FILE, 100.0 * dv.coverage);
        spec_eval_print_header(stdout);
        SpecEvalConfig c = {.target = {&T.hc, &T.reg, T.params}, .draft = {&Dm.hc, &Dm.reg, Dm.params},
                            .prompts = (const int32_t *const *)enc, .plen = elen, .n_prompts = np, .ks = kv, .nk = nk,
                            .batches = bv, .nb = nb, .branches = wv, .nw = nw, .max_tokens = max_tokens, .temperature = temperature, .cuda = cuda,
                            .graph = graph, .progress = stdout, .draft_head_ids = dv.ids, .draft_head_n = dv.n};
        const int64_t nrows = spec_eval_n_rows(&c);
        SpecEvalRow *rows = dl_calloc((size_t)nrows, sizeof *rows);
        if (spec_eval_run(&c, rows, &e)) dl_die(DL_EXIT_RUNTIME, "eval-spec: %s", e.msg);
        cJSON_AddStringToObject(js, "draft", draft ? draft : draft_layers);
        cJSON_AddNumberToObject(js, "draft_layers", Dm.hc.base.n_layer);
        cJSON_AddNumberToObject(js, "draft_vocab", dv.n ? (double)dv.n : (double)Dm.hc.base.vocab);
        if (dv.n) cJSON_AddNumberToObject(js, "draft_vocab_coverage", dv.coverage);
        draft_vocab_free(&dv);
        cJSON *runs = cJSON_AddArrayToObject(js, "runs");
        for (int64_t i = 0; i < nrows; i++) cJSON_AddItemToArray(runs, spec_eval_row_json(&rows[i]));
        free(rows);
        for (int64_t i = 0; i < np; i++) free(enc[i]);
        free(enc), free(elen);
    }
    if (nc > 0) {  // plain decode speed at long contexts: the target (a hybrid) vs --teacher
        LoadedModel Te = {0};
        if (teacher && model_load(teacher, 0, &Te, &e)) dl_die(DL_EXIT_INPUT, "eval-spec: %s", e.msg);
        printf("decode speed at context on %s (batch 1, 32 steps, cache filled by seek):\n%8s %14s %14s\n", device,
               "context", "target t/s", teacher ? "teacher t/s" : "");
        cJSON *ctxs = cJSON_AddArrayToObject(js, "contexts");
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
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "context", cv[ci]);
            cJSON_AddNumberToObject(o, "target_tokens_per_s", r[0]);
            cJSON_AddNumberToObject(o, "teacher_tokens_per_s", r[1]);
            cJSON_AddItemToArray(ctxs, o);
        }
        if (teacher) model_free(&Te);
    }
    if (json) write_json(json, js);
    cJSON_Delete(js);
    if (Dm.params) {
        if (draft) model_free(&Dm);
        else free(Dm.params), reg_free(&Dm.reg);
    }
    model_free(&T);
    return DL_EXIT_OK;
}

DL_COMMAND(eval_spec_cmd, {
    .name = "eval-spec",
    .usage = "--target MODEL (--draft MODEL | --draft-layers L,..) [--k 1,2,4] [--batch 1,4] [--branches 1,4] [--prompts FILE] "
             "[--max-tokens N] [--temperature T] [--contexts 1024,8192 --teacher MODEL] [--tokenizer T] [--json OUT] "
             "[--device cpu|cuda] [--no-graph] [--chat] [--draft-vocab full|N]",
    .summary = "plain vs speculative decoding speed, acceptance per draft position; decode speed at long contexts",
    .help =
        "Times plain and speculative generation of --max-tokens tokens (no early stop) for every prompt (one per\n"
        "line of --prompts; default: 8 built-in prompts), batched --batch at a time (prompts of any lengths).\n"
        "A --prompts file named *.jsonl holds chats ({\"messages\": [...]} or {\"prompt\": \"...\"} per line, as\n"
        "data/heldout-prompts.jsonl), rendered with the tokenizer's chat template and the assistant header, as\n"
        "the pipeline's eval stage does; other files hold raw text, one prompt per line.\n"
        "Each K in --k (1..8) is timed. The draft is a model file or a cut of the target (--draft-layers 0,29: those\n"
        "layers + embeddings + head). Greedy unless --temperature T > 0. Reports tokens/s, speedup, mean tokens\n"
        "per target step, the acceptance rate (accepted / proposed draft tokens), with greedy decoding how many\n"
        "sequences equal the plain output token for token (\"same\"), per draft position i the fraction of\n"
        "steps that accepted it, the draft's cost per token in target tokens (\"cost\": its own plain generation\n"
        "timed the same way) and the speedup acceptance and cost allow (\"model\": tokens per step / (1 + K cost),\n"
        "reached if verifying K + 1 tokens cost one plain step), and where a round's time goes, in plain target\n"
        "steps: \"draft\" (its pending token and K proposals) and \"verify\" (the K + 1 tokens' feed, picks and\n"
        "acceptance); the speedup is about tok/step / (draft + verify).\n"
        "  --branches W,..      greedy only: W draft chains per sequence (1..8), chain w starting from the draft's\n"
        "                       rank-w token; the target verifies all W in one feed and keeps the longest accepted\n"
        "                       (output still equals plain greedy); \"kept chain\" gives how often each was kept\n"
        "  --device cuda        decode on the GPU (DecoderCuda, bf16; the same generation code as the CPU);\n"
        "                       short feeds replay CUDA graphs unless --no-graph; one untimed warm-up run\n"
        "  --contexts C,..      plain decode speed (batch 1) of the target, and of --teacher if given, at\n"
        "                       these context lengths (the cache is zero-filled: speed only)\n"
        "  --tokenizer T        tokenizer for the prompts (default: the target's, else --teacher's; a run's\n"
        "                       export has none)\n"
        "  --chat               render each raw-text prompt as the user turn of a chat (an instruct model and\n"
        "                       its drafts were trained on chats: raw text measures them off that distribution)\n"
        "  --draft-vocab full|N the draft's head: by default, when the draft directory holds draft_vocab.json\n"
        "                       (a draft stage with `vocab` writes it), only those ids' head rows are computed\n"
        "                       (the draft proposes only them; output stays exact); N: its N most frequent ids;\n"
        "                       full: every id\n"
        "  --json OUT           also write the results as JSON\n"
        "Example: distill eval-spec --target checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf \\\n"
        "           --draft-layers 0,29 --k 1,2,4 --batch 1,4 --max-tokens 32\n",
    .run = run_eval_spec,
})
