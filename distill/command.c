// command.c: the table of subcommands (see command.h).
#include "distill/command.h"

#include <string.h>

#include "distill/common.h"

#define MAX_COMMANDS 64
static const DlCommand *g_commands[MAX_COMMANDS];
static int g_ncommands = 0;

void dl_register_command(const DlCommand *cmd) {
    if (g_ncommands == MAX_COMMANDS) dl_die(DL_EXIT_RUNTIME, "too many commands registered");
    // keep the table sorted by name so help output is stable whatever the link order
    int i = g_ncommands++;
    while (i > 0 && strcmp(g_commands[i - 1]->name, cmd->name) > 0) {
        g_commands[i] = g_commands[i - 1];
        i--;
    }
    g_commands[i] = cmd;
}

const DlCommand *dl_find_command(const char *name) {
    for (int i = 0; i < g_ncommands; i++)
        if (strcmp(g_commands[i]->name, name) == 0) return g_commands[i];
    return NULL;
}

int dl_command_count(void) { return g_ncommands; }
const DlCommand *dl_command_at(int i) { return g_commands[i]; }

void dl_command_help(const DlCommand *cmd, FILE *f) {
    fprintf(f, "usage: distill %s %s\n\n%s\n", cmd->name, cmd->usage ? cmd->usage : "", cmd->summary);
    if (cmd->help) fprintf(f, "\n%s", cmd->help);
    if (cmd->help && cmd->help[0] && cmd->help[strlen(cmd->help) - 1] != '\n') fputc('\n', f);
}
