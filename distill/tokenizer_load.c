// tokenizer_load.c: the two ways to get a tokenizer: GGUF metadata (tokenizer.ggml.*) and HF
// tokenizer.json (+ tokenizer_config.json beside it for BOS/EOS and the chat template).
#include <cjson/cJSON.h>
#include <string.h>

#include "distill/gguf.h"
#include "distill/tokenizer_internal.h"

// ---- GGUF
// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
int tokenizer_load_gguf(const char *path, Tokenizer **out, DlError *e) {
    GgufFile *g = NULL;
    if (gguf_open(&g, path, e)) return -1;
    int rc = -1;
    const char **toks = NULL;
    size_t *tlens = NULL;
    uint8_t *special = NULL;
    const char **merges = NULL;
    size_t *mlens = NULL;
    size_t n;
    const char *model = gguf_get_str_key(g, "tokenizer.ggml.model", &n, e);
    if (!model) goto done;
    if (strcmp(model, "gpt2") != 0) {
        dl_fail(e, "%s: tokenizer.ggml.model is \"%s\"; only byte-level BPE (\"gpt2\") is supported", path, model);
        goto done;
    }
    const char *pre_name = "gpt2";
    int kv_pre = gguf_find_key(g, "tokenizer.ggml.pre");
    if (kv_pre >= 0 && gguf_get_str(g, kv_pre, &n)) pre_name = gguf_get_str(g, kv_pre, &n);
    int pre = tokenizer_pre_from_name(pre_name);
    if (pre < 0) {
        dl_fail(e, "%s: tokenizer.ggml.pre \"%s\" is not supported (supported: smollm, starcoder, llama-bpe, gpt2)",
                path, pre_name);
        goto done;
    }
    uint64_t ntok, nmerge, ntype = 0;
    if (gguf_find_arr(g, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, &ntok, e) < 0) goto done;
    int kv_tok = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (ntok == 0 || ntok > INT32_MAX) { dl_fail(e, "%s: tokenizer.ggml.tokens has %llu entries", path, (unsigned long long)ntok); goto done; }
    if (gguf_find_arr(g, "tokenizer.ggml.merges", GGUF_TYPE_STRING, &nmerge, e) < 0) goto done;
    int kv_merge = gguf_find_key(g, "tokenizer.ggml.merges");
    int kv_type = gguf_find_key(g, "tokenizer.ggml.token_type");
    if (kv_type >= 0) {
        DlError e2;
        if (gguf_find_arr(g, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, &ntype, &e2) < 0 || ntype != ntok) {
            dl_fail(e, "%s: tokenizer.ggml.token_type must be an integer array of %llu entries", path,
                    (unsigned long long)ntok);
            goto done;
        }
    }
    toks = dl_malloc(ntok * sizeof(char *));
    tlens = dl_malloc(ntok * sizeof(size_t));
    special = dl_calloc(ntok, 1);
    for (uint64_t i = 0; i < ntok; i++) {
        toks[i] = gguf_arr_str(g, kv_tok, i, &tlens[i]);
        if (!toks[i]) { toks[i] = ""; tlens[i] = 0; }
        if (kv_type >= 0) {
            int64_t ty = gguf_arr_int(g, kv_type, i);
            special[i] = (ty == 3 || ty == 4);
        }
    }
    merges = dl_malloc((nmerge ? nmerge : 1) * sizeof(char *));
    mlens = dl_malloc((nmerge ? nmerge : 1) * sizeof(size_t));
    for (uint64_t i = 0; i < nmerge; i++) {
        merges[i] = gguf_arr_str(g, kv_merge, i, &mlens[i]);
        if (!merges[i]) { merges[i] = ""; mlens[i] = 0; }
    }
    int64_t bos = -1, eos = -1, pad = -1, unk = -1;
    DlError ign;
    if (gguf_find_key(g, "tokenizer.ggml.unknown_token_id") >= 0) gguf_get_i64(g, "tokenizer.ggml.unknown_token_id", &unk, &ign);
    if (gguf_find_key(g, "tokenizer.ggml.bos_token_id") >= 0) gguf_get_i64(g, "tokenizer.ggml.bos_token_id", &bos, &ign);
    if (gguf_find_key(g, "tokenizer.ggml.eos_token_id") >= 0) gguf_get_i64(g, "tokenizer.ggml.eos_token_id", &eos, &ign);
    if (gguf_find_key(g, "tokenizer.ggml.padding_token_id") >= 0) gguf_get_i64(g, "tokenizer.ggml.padding_token_id", &pad, &ign);
    const char *tmpl = NULL;
    int kv_tmpl = gguf_find_key(g, "tokenizer.chat_template");
    if (kv_tmpl >= 0) tmpl = gguf_get_str(g, kv_tmpl, &n);
    TokenizerSpec sp = {
        .n_tokens = (int32_t)ntok, .tokens = toks, .token_lens = tlens, .special = special,
        .n_merges = (int64_t)nmerge, .merges = merges, .merge_lens = mlens, .pre = (TokPreType)pre,
        // llama.cpp and HF's Llama-3 tokenizer.json both emit a pre-token that is a vocab entry whole
        .ignore_merges = pre == TOK_PRE_LLAMA3,
        .bos = (int32_t)bos, .eos = (int32_t)eos, .pad = (int32_t)pad, .unk = (int32_t)unk, .chat_template = tmpl,
        .source = path,
    };
    rc = tokenizer_build(&sp, out, e);
done:
    free(toks); free(tlens); free(special); free(merges); free(mlens);
    gguf_close(g);
    return rc;
}

// ---- HF tokenizer.json
static const char *json_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}
// bos_token etc. in tokenizer_config.json: a string or {"content": ...}
static const char *json_token_text(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) return json_str(v, "content");
    return NULL;
}

// Classifies pre_tokenizer into one of ours; -1 with e filled if it is something else.
static int json_pre_type(const cJSON *pre, const char *path, DlError *e) {
    if (!cJSON_IsObject(pre)) return dl_fail(e, "%s: pre_tokenizer missing (expected ByteLevel, Digits+ByteLevel or the Llama-3 Split+ByteLevel)", path);
    const char *type = json_str(pre, "type");
    const cJSON *items[4] = {0};
    int k = 0;
    if (type && !strcmp(type, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers")) {
            if (k == 4) return dl_fail(e, "%s: unsupported pre_tokenizer sequence (too long)", path);
            items[k++] = it;
        }
    } else {
        items[k++] = pre;
    }
    const cJSON *last = items[k - 1];
    const char *lt = json_str(last, "type");
    if (k == 0 || !lt || strcmp(lt, "ByteLevel") != 0) return dl_fail(e, "%s: unsupported pre_tokenizer: the last step must be ByteLevel", path);
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(last, "add_prefix_space")))
        return dl_fail(e, "%s: unsupported pre_tokenizer: ByteLevel add_prefix_space=true", path);
    const cJSON *ur = cJSON_GetObjectItemCaseSensitive(last, "use_regex");
    bool use_regex = !ur || cJSON_IsTrue(ur);
    if (k == 1 && use_regex) return TOK_PRE_GPT2;
    if (k == 2) {
        const char *ft = json_str(items[0], "type");
        if (ft && !strcmp(ft, "Digits") && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(items[0], "individual_digits")) && use_regex)
            return TOK_PRE_SMOLLM;
        if (ft && !strcmp(ft, "Split") && !use_regex) {
            const cJSON *pat = cJSON_GetObjectItemCaseSensitive(items[0], "pattern");
            const char *re = pat ? json_str(pat, "Regex") : NULL;
            if (re && strstr(re, "\\p{N}{1,3}") && strstr(re, "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+")) return TOK_PRE_LLAMA3;
        }
    }
    return dl_fail(e, "%s: unsupported pre_tokenizer (supported: ByteLevel [GPT-2], Digits(individual)+ByteLevel [SmolLM2], "
                      "Split(Llama-3 pattern)+ByteLevel [Llama-3])", path);
}

int tokenizer_load_json(const char *path, Tokenizer **out, DlError *e) {
    size_t len;
    char *txt = dl_read_file(path, &len, e);
    if (!txt) return -1;
    cJSON *root = cJSON_ParseWithLength(txt, len);
    free(txt);
    if (!root) return dl_fail(e, "%s: not valid JSON", path);
    int rc = -1;
    const char **toks = NULL;
    uint8_t *special = NULL;
    const char **merges = NULL;
    char **merge_own = NULL;
    int64_t nmerge = 0;
    cJSON *cfg = NULL;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const char *mtype = model ? json_str(model, "type") : NULL;
    if (!mtype || strcmp(mtype, "BPE") != 0) { dl_fail(e, "%s: model.type must be \"BPE\"", path); goto done; }
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback"))) { dl_fail(e, "%s: byte_fallback BPE is not supported", path); goto done; }
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (norm && !cJSON_IsNull(norm)) { dl_fail(e, "%s: a normalizer is not supported (byte-level BPE has none)", path); goto done; }
    int pre = json_pre_type(cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), path, e);
    if (pre < 0) goto done;
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (!cJSON_IsObject(vocab)) { dl_fail(e, "%s: model.vocab must be an object", path); goto done; }
    int64_t maxid = -1;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble >= INT32_MAX) { dl_fail(e, "%s: vocab entry \"%s\" has no valid id", path, it->string); goto done; }
        maxid = DL_MAX(maxid, (int64_t)it->valuedouble);
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= INT32_MAX || !json_str(it, "content")) { dl_fail(e, "%s: added_tokens entry without id/content", path); goto done; }
        maxid = DL_MAX(maxid, (int64_t)id->valuedouble);
    }
    int32_t n = (int32_t)(maxid + 1);
    toks = dl_calloc((size_t)n + 1, sizeof(char *));
    special = dl_calloc((size_t)n + 1, 1);
    cJSON_ArrayForEach(it, vocab) toks[(int64_t)it->valuedouble] = it->string;
    cJSON_ArrayForEach(it, added) {
        int64_t id = (int64_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        toks[id] = json_str(it, "content");
        special[id] = 1;  // HF matches every added token as a unit
    }
    const cJSON *mj = cJSON_GetObjectItemCaseSensitive(model, "merges");
    nmerge = cJSON_GetArraySize(mj);
    merges = dl_calloc((size_t)nmerge + 1, sizeof(char *));
    merge_own = dl_calloc((size_t)nmerge + 1, sizeof(char *));
    int64_t r = 0;
    cJSON_ArrayForEach(it, mj) {
        if (cJSON_IsString(it)) merges[r] = it->valuestring;
        else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                 cJSON_IsString(cJSON_GetArrayItem(it, 1))) {  // newer format: ["A", "B"]
            const char *a = cJSON_GetArrayItem(it, 0)->valuestring, *b = cJSON_GetArrayItem(it, 1)->valuestring;
            size_t la = strlen(a), lb = strlen(b);
            merge_own[r] = dl_malloc(la + lb + 2);
            memcpy(merge_own[r], a, la);
            merge_own[r][la] = ' ';
            memcpy(merge_own[r] + la + 1, b, lb + 1);
            merges[r] = merge_own[r];
        } else { dl_fail(e, "%s: merges[%lld] is neither \"A B\" nor [\"A\", \"B\"]", path, (long long)r); goto done; }
        r++;
    }
    // BOS/EOS/PAD and chat template from tokenizer_config.json next to tokenizer.json, if present
    int32_t bos = -1, eos = -1, pad = -1;
    const char *tmpl = NULL;
    {
        char *dir = dl_strdup(path);
        char *slash = strrchr(dir, '/');
        char *cfg_path = slash ? (slash[1] = 0, dl_path_join(dir, "tokenizer_config.json")) : dl_strdup("tokenizer_config.json");
        free(dir);
        if (dl_file_exists(cfg_path)) {
            size_t cl;
            DlError ce;
            char *ct = dl_read_file(cfg_path, &cl, &ce);
            if (ct) cfg = cJSON_ParseWithLength(ct, cl);
            free(ct);
            if (!cfg) { dl_fail(e, "%s: not valid JSON", cfg_path); free(cfg_path); goto done; }
        }
        free(cfg_path);
    }
    TokenizerSpec sp = {
        .n_tokens = n, .tokens = toks, .special = special, .n_merges = nmerge, .merges = merges,
        .pre = (TokPreType)pre, .ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges")),
        .bos = -1, .eos = -1, .pad = -1, .unk = -1, .source = path,
    };
    const char *unk_text = json_str(model, "unk_token");
    if (unk_text)
        for (int32_t i = 0; i < n; i++)
            if (toks[i] && !strcmp(toks[i], unk_text)) { sp.unk = i; break; }
    if (cfg) tmpl = json_str(cfg, "chat_template");
    sp.chat_template = tmpl;
    if (tokenizer_build(&sp, out, e)) goto done;
    if (cfg) {
        const char *b = json_token_text(cfg, "bos_token"), *s = json_token_text(cfg, "eos_token"), *p = json_token_text(cfg, "pad_token");
        if (b) bos = tokenizer_token_id(*out, b);
        if (s) eos = tokenizer_token_id(*out, s);
        if (p) pad = tokenizer_token_id(*out, p);
        (*out)->bos = bos; (*out)->eos = eos; (*out)->pad = pad;
    }
    rc = 0;
done:
    if (merge_own) for (int64_t i = 0; i < nmerge; i++) free(merge_own[i]);
    free(merge_own); free(merges); free(toks); free(special);
    cJSON_Delete(cfg);
    cJSON_Delete(root);
    return rc;
}

int tokenizer_load(const char *path, Tokenizer **out, DlError *e) {
    *out = NULL;
    if (dl_is_dir(path)) {
        char *p = dl_path_join(path, "tokenizer.json");
        if (!dl_file_exists(p)) {
            free(p);
            return dl_fail(e, "%s: directory has no tokenizer.json", path);
        }
        int rc = tokenizer_load_json(p, out, e);
        free(p);
        return rc;
    }
    FILE *f = fopen(path, "rb");
    if (!f) return dl_fail(e, "%s: cannot open tokenizer (expected a GGUF file, tokenizer.json or a directory holding it)", path);
    char magic[4] = {0};
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    if (got == 4 && memcmp(magic, "GGUF", 4) == 0) return tokenizer_load_gguf(path, out, e);
    return tokenizer_load_json(path, out, e);
}
