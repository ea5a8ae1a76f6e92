// test_atomic_write.c: dl_atomic_open / commit / abort, dl_write_file_atomic and dl_copy_file (common.h): the
// target is either its old self or the whole new file, no temporary is left behind, two writers of one path get
// two temporaries, and a failure names the file.
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "distill/common.h"
#include "tests/check.h"

static char g_dir[256];

static int count_entries(void) {  // files in g_dir
    DIR *d = opendir(g_dir);
    int n = 0;
    for (struct dirent *de; d && (de = readdir(d));) n += de->d_name[0] != '.';
    if (d) closedir(d);
    return n;
}

static bool file_is(const char *path, const char *want) {
    DlError e;
    size_t n;
    char *t = dl_read_file(path, &n, &e);
    const bool ok = t && n == strlen(want) && !memcmp(t, want, n);
    free(t);
    return ok;
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_atomic_XXXXXX");
    CHECK(mkdtemp(g_dir) != NULL);
    char *p = dl_path_join(g_dir, "out.json"), *q = dl_path_join(g_dir, "copy.json");
    DlError e;
    // a whole file, then a replacement
    CHECK_EQ_I64(dl_write_file_atomic(p, "first\n", 6, &e), 0);
    CHECK(file_is(p, "first\n"));
    CHECK_EQ_I64(dl_write_file_atomic(p, "second, longer\n", 15, &e), 0);
    CHECK(file_is(p, "second, longer\n"));
    CHECK_EQ_I64(count_entries(), 1);
    // two writers at once: two temporaries; the one committed last wins; abort keeps the old file
    DlAtomic a, b;
    CHECK(dl_atomic_open(&a, p, &e) == 0 && dl_atomic_open(&b, p, &e) == 0);
    CHECK(strcmp(a.tmp, b.tmp) != 0);
    fputs("from a\n", a.f), fputs("from b\n", b.f);
    CHECK_EQ_I64(count_entries(), 3);
    CHECK(file_is(p, "second, longer\n"));  // nothing visible before the commit
    dl_atomic_abort(&b);
    CHECK(file_is(p, "second, longer\n"));
    CHECK_EQ_I64(dl_atomic_commit(&a, &e), 0);
    CHECK(file_is(p, "from a\n"));
    CHECK_EQ_I64(count_entries(), 1);
    // a copy
    CHECK_EQ_I64(dl_copy_file(p, q, &e), 0);
    CHECK(file_is(q, "from a\n"));
    CHECK_EQ_I64(count_entries(), 2);
    // failures name the file and leave nothing behind
    char *bad = dl_path_join(g_dir, "missing-dir/out.json");
    CHECK(dl_write_file_atomic(bad, "x", 1, &e) != 0 && strstr(e.msg, "missing-dir/out.json.tmp.") && strstr(e.msg, "cannot create"));
    CHECK(dl_copy_file(bad, q, &e) != 0 && strstr(e.msg, "missing-dir/out.json") && strstr(e.msg, "cannot open"));
    CHECK(file_is(q, "from a\n"));
    CHECK(dl_copy_file(p, bad, &e) != 0 && strstr(e.msg, "cannot create"));
    CHECK_EQ_I64(count_entries(), 2);
    free(bad), free(p), free(q);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    CHECK(system(cmd) == 0);
    return check_report("test_atomic_write");
}
