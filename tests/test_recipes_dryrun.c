// test_recipes_dryrun.c: the `distill` program on recipes, through fork/exec (no shell): every recipe in
// recipes/ passes --dry-run (exit 0, a plan with every stage), bad recipes exit 3 listing every problem
// with its position, bad command lines exit 2, --schema prints the reference. Needs DISTILL_BIN.
#include <dirent.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/common.h"
#include "tests/check.h"

static const char *g_bin;

// Runs argv (argv[0] is replaced by the distill binary) and returns its exit status; *out gets stdout and
// stderr together.
static int run(char **argv, char **out) {
    int fd[2];
    if (pipe(fd)) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 1);
        dup2(fd[1], 2);
        close(fd[0]);
        close(fd[1]);
        argv[0] = (char *)g_bin;
        execv(g_bin, argv);
        _exit(127);
    }
    close(fd[1]);
    size_t n = 0, cap = 4096;
    char *buf = dl_malloc(cap);
    for (;;) {
        if (n + 1024 > cap) buf = dl_realloc(buf, cap *= 2);
        ssize_t k = read(fd[0], buf + n, cap - n - 1);
        if (k <= 0) break;
        n += (size_t)k;
    }
    buf[n] = 0;
    close(fd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    *out = buf;
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return WEXITSTATUS(st);
}

static int count(const char *s, const char *what) {
    int n = 0;
    for (const char *p = strstr(s, what); p; p = strstr(p + 1, what)) n++;
    return n;
}

static void test_shipped(void) {
    DIR *d = opendir("recipes");
    CHECK(d != NULL);
    if (!d) return;
    int n = 0;
    for (struct dirent *de; (de = readdir(d));) {
        size_t l = strlen(de->d_name);
        if (l < 6 || strcmp(de->d_name + l - 5, ".toml")) continue;
        char path[600];
        snprintf(path, sizeof path, "recipes/%s", de->d_name);
        char *out;
        char *argv[] = {NULL, path, "--dry-run", NULL};
        int rc = run(argv, &out);
        CHECK_EQ_I64(rc, 0);
        if (rc) fprintf(stderr, "%s --dry-run:\n%s\n", path, out);
        CHECK(strstr(out, "stage 1/") && strstr(out, "peak memory estimate"));
        CHECK(strstr(out, "params:") && strstr(out, "layers:"));
        free(out);
        n++;
    }
    closedir(d);
    printf("dry-ran %d recipes\n", n);
    CHECK(n >= 6);
}

static void test_bad(void) {
    char *out;
    char *argv[] = {NULL, "tests/recipes/bad-many.toml", NULL};
    int rc = run(argv, &out);
    CHECK_EQ_I64(rc, 3);
    const char *expect[] = {
        "tests/recipes/bad-many.toml:4:8: run.name 'bad many' may only use",
        "tests/recipes/bad-many.toml:5:10: [run].device = \"gpu\" is not one of: cpu, cuda",
        "tests/recipes/bad-many.toml:6:8: [run].seed = -1 is out of range",
        "tests/recipes/bad-many.toml:9:8: teacher.path is a config .json (random weights, no tokenizer), but "
        "tests/recipes/no-such-file.jsonl needs one",
        "tests/recipes/bad-many.toml:12:19: [hybrid].attn_layers: layer 9 does not exist (the teacher has 4 layers, 0..3)",
        "tests/recipes/bad-many.toml:15:6: [optimizer].lr must be a number, not string",
        "tests/recipes/bad-many.toml:16:1: unknown key 'clipp' in [optimizer] (did you mean 'clip'?)",
        "tests/recipes/bad-many.toml:19:12: [data.train] source 'tests/recipes/no-such-file.jsonl' not found",
        "tests/recipes/bad-many.toml:23:8: stage 'layerwise' (layerwise) works on the hybrid: put an init stage before it",
        "tests/recipes/bad-many.toml:29:8: stage 'sft': no data set 'trian' (define [data.trian]) (did you mean 'train'?)",
        "tests/recipes/bad-many.toml:31:1: key 'beta' does not apply to a sft stage (it is for: dpo)",
        "tests/recipes/bad-many.toml:34:8: [[stage]] #3: unknown kind \"evaluate\"",
        "problems found, nothing was run",
    };
    for (size_t i = 0; i < DL_ARRAY_LEN(expect); i++) {
        bool ok = strstr(out, expect[i]) != NULL;
        CHECK(ok);
        if (!ok) fprintf(stderr, "missing: %s\n", expect[i]);
    }
    CHECK(count(out, "tests/recipes/bad-many.toml:") == 14);  // 13 problems and the summary line
    CHECK(strstr(out, "bad-many.toml: 13 problems found"));
    free(out);

    char *a2[] = {NULL, "tests/recipes/bad-syntax.toml", "--dry-run", NULL};
    CHECK_EQ_I64(run(a2, &out), 3);
    CHECK(strstr(out, "tests/recipes/bad-syntax.toml:4:11: expected a newline after the value, found '3'"));
    free(out);

    char *a3[] = {NULL, "tests/recipes/no-such-recipe.toml", NULL};
    CHECK_EQ_I64(run(a3, &out), 3);
    CHECK(strstr(out, "no-such-recipe.toml: cannot open"));
    free(out);

    // --set errors name the --set; they are listed with the file's problems
    char *a4[] = {NULL, "tests/recipes/good-tiny.toml", "--dry-run", "--set", "optimizer.lr=fast", "--set",
                  "stage.layerwise.stepz=3", NULL};
    CHECK_EQ_I64(run(a4, &out), 3);
    CHECK(strstr(out, "--set optimizer.lr=fast: cannot read the value (a number expected)"));
    CHECK(strstr(out, "--set stage.layerwise.stepz=3: unknown key 'stepz' (did you mean 'steps'?)"));
    free(out);
}

static void test_cli(void) {
    char *out;
    char *a1[] = {NULL, "tests/recipes/good-tiny.toml", "--dry-run", "--set", "stage.layerwise.steps=7", "--set=optimizer.lr=1e-3", NULL};
    CHECK_EQ_I64(run(a1, &out), 0);
    CHECK(strstr(out, "schedule step 1/1: 7 steps") && strstr(out, "AdamW lr 0.001"));
    free(out);
    char *a2[] = {NULL, "tests/recipes/good-tiny.toml", "--frobnicate", NULL};
    CHECK_EQ_I64(run(a2, &out), 2);
    CHECK(strstr(out, "unknown option '--frobnicate'"));
    free(out);
    char *a3[] = {NULL, "tests/recipes/good-tiny.toml", "--set", NULL};
    CHECK_EQ_I64(run(a3, &out), 2);
    free(out);
    char *a4[] = {NULL, "run", NULL};
    CHECK_EQ_I64(run(a4, &out), 2);
    CHECK(strstr(out, "no recipe given"));
    free(out);
    char *a5[] = {NULL, "run", "--schema", NULL};
    CHECK_EQ_I64(run(a5, &out), 0);
    const char *tables[] = {"### [run]", "### [teacher]", "### [tokenizer]", "### [hybrid]", "### [optimizer]", "### [hardware]",
                            "### [data.NAME]", "### [[stage]]", "### [stage.loss]", "### [[stage.schedule]]", "`attn_fraction`",
                            "`warmup_ratio`", "`teacher_logits`"};
    for (size_t i = 0; i < DL_ARRAY_LEN(tables); i++) CHECK(strstr(out, tables[i]) != NULL);
    // docs/RECIPES.md carries the same reference (regenerate it with distill run --schema when keys change)
    size_t dn = 0;
    DlError de;
    char *doc = dl_read_file("docs/RECIPES.md", &dn, &de);
    CHECK(doc != NULL);
    if (doc) {
        char *b = strstr(doc, "<!-- schema:begin -->\n"), *e = strstr(doc, "<!-- schema:end -->");
        CHECK(b && e && e > b);
        if (b && e && e > b) {
            b += strlen("<!-- schema:begin -->\n");
            bool same = (size_t)(e - b) == strlen(out) && !memcmp(b, out, strlen(out));
            CHECK(same);
            if (!same) fprintf(stderr, "docs/RECIPES.md: the reference differs from `distill run --schema`; regenerate it\n");
        }
        free(doc);
    }
    free(out);
    char *a6[] = {NULL, "run", "--help", NULL};
    CHECK_EQ_I64(run(a6, &out), 0);
    CHECK(strstr(out, "--resume [RUN_DIR]") && strstr(out, "--dry-run"));
    free(out);
}

int main(void) {
    g_bin = getenv("DISTILL_BIN");
    if (!g_bin) {
        fprintf(stderr, "DISTILL_BIN is not set (ctest sets it)\n");
        return 1;
    }
    test_shipped();
    test_bad();
    test_cli();
    return check_report("test_recipes_dryrun");
}
