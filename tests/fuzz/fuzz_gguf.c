// fuzz_gguf.c: libFuzzer target for the GGUF reader. Opens the input from memory, then walks everything
// a caller can reach (metadata values including nested arrays, typed getters, tensor infos, dequantization
// of small tensors) so that any over-read after a successful open shows up under ASan.
#include <stdint.h>
#include <stdlib.h>

#include "distill/gguf.h"
#include "distill/model_io.h"
#include "distill/quant.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    GgufFile *g;
    DlError e;
    if (gguf_open_memory(&g, data, size, "fuzz", &e)) return 0;
    char buf[256];
    for (int i = 0; i < gguf_kv_count(g); i++) {
        const char *k = gguf_kv_key(g, i);
        gguf_value_format(gguf_kv_value(g, i), buf, sizeof buf, 4);
        int64_t iv;
        uint64_t uv;
        double fv;
        bool bv;
        size_t len;
        gguf_get_i64(g, k, &iv, &e);
        gguf_get_u64(g, k, &uv, &e);
        gguf_get_f64(g, k, &fv, &e);
        gguf_get_bool(g, k, &bv, &e);
        gguf_get_str(g, i, &len);
        uint64_t n = gguf_arr_len(g, i);
        for (uint64_t j = 0; j < n && j < 64; j++) {
            gguf_arr_str(g, i, j, &len);
            gguf_arr_int(g, i, j);
            gguf_arr_float(g, i, j);
        }
        gguf_arr_str(g, i, n, &len);  // one past the end must be refused
    }
    float out[1024];
    for (int i = 0; i < gguf_tensor_count(g); i++) {
        const GgufTensor *t = gguf_tensor(g, i);
        int64_t shape[GGUF_MAX_DIMS];
        gguf_tensor_shape(t, shape);
        if (t->dtype >= 0 && quant_can_dequantize((DType)t->dtype) && t->numel <= 1024)
            dequantize((DType)t->dtype, t->data, out, t->numel);
    }
    HybridConfig hc;
    model_gguf_config(g, &hc, &e);
    gguf_close(g);
    return 0;
}
