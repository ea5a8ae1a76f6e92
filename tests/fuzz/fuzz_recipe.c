// fuzz_recipe.c: libFuzzer target for the recipe validator (distill/recipe.c) on top of the TOML parser:
// any document must give either a validated Recipe or a list of positioned errors, never a crash, and a
// validated recipe's resolved form must validate again. Run from the repository root (the seeds refer to
// recipes/configs/*.json):  build-fuzz/tests/fuzz_recipe -max_total_time=600 CORPUS recipes/ tests/recipes/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "distill/recipe.h"

static int g_fd = -1, g_fd2 = -1;
static char g_path[64], g_path2[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (g_fd < 0) {
        g_fd = memfd_create("recipe.toml", 0);
        g_fd2 = memfd_create("resolved.toml", 0);
        snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
        snprintf(g_path2, sizeof g_path2, "/proc/self/fd/%d", g_fd2);
    }
    if (ftruncate(g_fd, 0) || pwrite(g_fd, data, size, 0) != (ssize_t)size) abort();
    Recipe r;
    RecipeErrors errs;
    RecipeOptions o = {.dry_run = true};
    if (recipe_load(g_path, NULL, 0, &o, &r, &errs) == 0) {
        char *text = NULL;
        size_t n = 0;
        FILE *f = open_memstream(&text, &n);
        recipe_write_resolved(&r, f);
        fclose(f);
        if (ftruncate(g_fd2, 0) || pwrite(g_fd2, text, n, 0) != (ssize_t)n) abort();
        Recipe r2;
        RecipeErrors e2;
        if (recipe_load(g_path2, NULL, 0, &o, &r2, &e2) != 0) {
            fprintf(stderr, "resolved recipe does not validate: %s\n---\n%s\n", e2.n ? e2.msg[0] : "?", text);
            abort();
        }
        recipe_errors_free(&e2);
        recipe_free(&r2);
        free(text);
    } else if (errs.n == 0) {
        abort();  // failure without a message
    }
    recipe_errors_free(&errs);
    recipe_free(&r);
    return 0;
}
