// main.c: the distill program. `distill RECIPE.toml [options]` runs a recipe; `distill CMD ...` runs a
// subcommand registered in a cmd_*.c file.
#include <string.h>

#include "distill/command.h"
#include "distill/common.h"

static const char *EXIT_CODES =
    "exit status:\n"
    "  0  success\n"
    "  1  a run failed (numerical trouble, I/O error while writing, CUDA/NCCL error)\n"
    "  2  bad command line\n"
    "  3  bad input (recipe, model file, data file, checkpoint): the message names the file and what was expected\n"
    "  4  interrupted by a signal; the last complete checkpoint is kept, resume with --resume\n";

static void usage(FILE *f) {
    fprintf(f,
            "usage: distill RECIPE.toml [--set key=value ...] [--resume [RUN_DIR]] [--dry-run] [--quiet]\n"
            "       distill COMMAND [args] (distill COMMAND --help for its options)\n"
            "       distill --help | --version\n\n"
            "Turns a Llama-family Transformer into a Mamba/attention hybrid (\"The Mamba in the Llama\").\n\n"
            "commands:\n");
    for (int i = 0; i < dl_command_count(); i++) {
        const DlCommand *c = dl_command_at(i);
        fprintf(f, "  %-10s %s\n", c->name, c->summary);
    }
    fprintf(f, "\n%s", EXIT_CODES);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return DL_EXIT_USAGE;
    }
    const char *a = argv[1];
    if (!strcmp(a, "--help") || !strcmp(a, "-h") || !strcmp(a, "help")) {
        if (!strcmp(a, "help") && argc > 2) {
            const DlCommand *c = dl_find_command(argv[2]);
            if (!c) dl_die(DL_EXIT_USAGE, "unknown command '%s' (see distill --help)", argv[2]);
            dl_command_help(c, stdout);
            return DL_EXIT_OK;
        }
        usage(stdout);
        return DL_EXIT_OK;
    }
    if (!strcmp(a, "--version") || !strcmp(a, "-V")) {
        printf("distill %s%s\n", DISTILL_VERSION,
#ifdef DISTILL_CUDA
               " (CUDA)"
#else
               " (CPU only)"
#endif
        );
        return DL_EXIT_OK;
    }
    const DlCommand *c = dl_find_command(a);
    int first = 1;
    if (!c) {
        // `distill RECIPE.toml ...`: anything that is not a command name is a recipe path
        size_t n = strlen(a);
        if (a[0] == '-' || !(n > 5 && !strcmp(a + n - 5, ".toml")))
            dl_die(DL_EXIT_USAGE, "unknown command or option '%s' (see distill --help)", a);
        c = dl_find_command("run");
        if (!c) dl_die(DL_EXIT_RUNTIME, "this build has no recipe runner");
        first = 0;  // the runner sees argv[0] = "run"-like slot, argv[1] = recipe
        argv[0] = (char *)"run";
        return c->run(argc, argv);
    }
    for (int i = first + 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            dl_command_help(c, stdout);
            return DL_EXIT_OK;
        }
    return c->run(argc - first, argv + first);
}
