// test_modelfile_regress.c: replays every input under tests/fuzz/regress/{gguf,safetensors,hfconfig}
// through its reader. Each one once crashed or was wrongly accepted; each must now be rejected with a
// message (and no crash: this test also runs under the fuzz build's sanitizers). See tests/fuzz/README.md.
#include <dirent.h>
#include <string.h>

#include "distill/gguf.h"
#include "distill/hfconfig.h"
#include "distill/safetensors.h"
#include "tests/check.h"

typedef int (*Reader)(const uint8_t *buf, size_t n, DlError *e);

static int read_gguf(const uint8_t *b, size_t n, DlError *e) {
    GgufFile *g;
    if (gguf_open_memory(&g, b, n, "regress", e)) return -1;
    gguf_close(g);
    return 0;
}
static int read_st(const uint8_t *b, size_t n, DlError *e) {
    SafeTensors *s;
    if (st_open_memory(&s, b, n, "regress", e)) return -1;
    st_close(s);
    return 0;
}
static int read_cfg(const uint8_t *b, size_t n, DlError *e) {
    LlamaConfig c;
    return hf_config_parse((const char *)b, n, "regress", &c, e);
}

static int replay(const char *dir, Reader rd) {
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "  cannot open %s (run from the repository root)\n", dir);
        check_fail_++;
        return 0;
    }
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char *p = dl_path_join(dir, de->d_name);
        size_t len;
        DlError e = {{0}};
        char *buf = dl_read_file(p, &len, &e);
        CHECK(buf != NULL);
        if (buf) {
            uint8_t *exact = malloc(len ? len : 1);  // exact size so an over-read is caught by ASan
            memcpy(exact, buf, len);
            e.msg[0] = 0;
            int rc = rd(exact, len, &e);
            if (rc == 0 || !e.msg[0]) {
                check_fail_++;
                fprintf(stderr, "  %s: %s\n", p, rc == 0 ? "accepted, expected a rejection" : "rejected without a message");
            } else
                check_pass_++;
            free(exact);
            free(buf);
            n++;
        }
        free(p);
    }
    closedir(d);
    return n;
}

int main(void) {
    int n = replay("tests/fuzz/regress/gguf", read_gguf);
    n += replay("tests/fuzz/regress/safetensors", read_st);
    n += replay("tests/fuzz/regress/hfconfig", read_cfg);
    printf("replayed %d regression inputs\n", n);
    CHECK(n >= 3);
    return check_report("test_modelfile_regress");
}
