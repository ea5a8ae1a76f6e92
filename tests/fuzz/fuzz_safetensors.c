// fuzz_safetensors.c: libFuzzer target for the safetensors reader (header length, header JSON, dtypes,
// shapes, data_offsets, coverage of the data buffer). After a successful open it touches every byte
// of every tensor through st_to_f32 so an out-of-bounds range shows up under ASan.
#include <stdint.h>
#include <stdlib.h>

#include "distill/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    SafeTensors *s;
    DlError e;
    if (st_open_memory(&s, data, size, "fuzz", &e)) return 0;
    for (int i = 0; i < st_metadata_count(s); i++) {
        volatile const char *k = st_metadata_key(s, i), *v = st_metadata_value(s, i);
        (void)k, (void)v;
    }
    for (int i = 0; i < st_count(s); i++) {
        const StTensor *t = st_tensor(s, i);
        if (st_find(s, t->name) < 0) abort();  // every listed tensor must be findable
        if (t->numel > (1 << 16)) continue;
        float *x = malloc((size_t)(t->numel ? t->numel : 1) * sizeof(float));
        if (st_to_f32(t, x, &e)) {  // other dtypes: read the raw bytes instead
            volatile uint8_t acc = 0;
            for (uint64_t j = 0; j < t->nbytes; j++) acc ^= t->data[j];
        }
        free(x);
    }
    st_close(s);
    return 0;
}
