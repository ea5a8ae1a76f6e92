// test_cmd_parity.c: `distill parity` through the real program ($DISTILL_BIN) on the CPU, where CI can run it:
// central finite differences of the CPU loss along every kind of tensor's gradient (--fd) for a small
// Mamba-1 and Mamba-2 hybrid (random weights from recipes/configs/tiny-llama3.json, CE + KL to the loaded
// model as teacher), so the whole chain the GPU comparison relies on (the command, TrainModel, the CPU
// engine's gradient) is checked end to end; and bad command lines exit 2 with a message.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/check.h"

static const char *g_bin;

// Runs `$DISTILL_BIN parity ARGS`; returns the exit status, out gets the combined output (truncated).
static int run(const char *args, char *out, size_t n) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s parity %s 2>&1", g_bin, args);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t k = fread(out, 1, n - 1, p);
    out[k] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int main(void) {
    g_bin = getenv("DISTILL_BIN");
    if (!g_bin || access(g_bin, X_OK)) {
        printf("test_cmd_parity: DISTILL_BIN not set or not executable; run through ctest\n");
        return 1;
    }
    static char out[1 << 16];
    const char *base = "recipes/configs/tiny-llama3.json --cpu-only --fd 40 --batch 2 --seq 32 --ce 1 --kl 0.5";
    char args[512];
    for (int m2 = 0; m2 < 2; m2++) {
        snprintf(args, sizeof args, "%s --attn-layers odd%s", base, m2 ? " --mamba2" : "");
        int rc = run(args, out, sizeof out);
        CHECK(rc == 0);
        CHECK(strstr(out, "parity: ok") != NULL);
        CHECK(strstr(out, "differs") == NULL);
        // every kind is listed, and the Mamba projections and the MLP are judged (large enough to resolve)
        CHECK(strstr(out, "finite differences") != NULL);
        CHECK(strstr(out, "mlp.down_proj.weight") != NULL);
        CHECK(strstr(out, m2 ? "mamba.in_proj.weight" : "mamba.in_proj_x.weight") != NULL);
        if (rc != 0) printf("%s\n", out);
    }
    // the teacher itself (all attention, untied head), CE only
    CHECK(run("recipes/configs/tiny-llama3.json --cpu-only --fd 40 --batch 1 --seq 24", out, sizeof out) == 0);
    CHECK(strstr(out, "parity: ok") != NULL);
    // bad command lines: exit 2 and say what was expected
    CHECK(run("recipes/configs/tiny-llama3.json --cpu-only --attn-layers 99", out, sizeof out) == 2);
    CHECK(strstr(out, "--attn-layers") != NULL);
    CHECK(run("recipes/configs/tiny-llama3.json --against gpu", out, sizeof out) == 2);
    CHECK(strstr(out, "expected cuda or cpu-bf16") != NULL);
    CHECK(run("--cpu-only", out, sizeof out) == 2);
    CHECK(run("recipes/configs/tiny-llama3.json --cpu-only --batch 0", out, sizeof out) == 2);
    // a missing model is bad input (3) naming the file
    CHECK(run("no/such/model.gguf --cpu-only", out, sizeof out) == 3);
    CHECK(strstr(out, "no/such/model.gguf") != NULL);
    return check_report("test_cmd_parity");
}
