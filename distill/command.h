// command.h: subcommands register themselves here, one file each (cmd_*.c), so adding a command touches
// no other file. `distill RECIPE.toml ...` is the "run" command.
#pragma once
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *name;     // "inspect"
    const char *usage;    // "FILE" (arguments after the name, for the usage line)
    const char *summary;  // one line for `distill --help`
    const char *help;     // full text for `distill CMD --help` (options, examples)
    int (*run)(int argc, char **argv);  // argv[0] is the command name; returns an exit code
} DlCommand;

void dl_register_command(const DlCommand *cmd);
const DlCommand *dl_find_command(const char *name);
int dl_command_count(void);
const DlCommand *dl_command_at(int i);
// Prints the usage line and help text of cmd to f.
void dl_command_help(const DlCommand *cmd, FILE *f);

// DL_COMMAND(var, {.name = ..., ...}) defines and registers a command at program start.
#define DL_COMMAND(var, ...)                                                          \
    static const DlCommand var = __VA_ARGS__;                                         \
    __attribute__((constructor)) static void var##_register(void) { dl_register_command(&var); }

#ifdef __cplusplus
}
#endif
