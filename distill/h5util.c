// h5util.c: see h5util.h.
#include "distill/h5util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/common.h"

H5Quiet h5_quiet_begin(void) {
    H5Quiet q;
    H5Eget_auto2(H5E_DEFAULT, &q.fn, &q.data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    return q;
}

void h5_quiet_end(H5Quiet q) { H5Eset_auto2(H5E_DEFAULT, q.fn, q.data); }

hid_t h5_fapl(bool lock) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
#if H5_VERSION_GE(1, 10, 7)
    H5Pset_file_locking(fapl, lock ? 1 : 0, 1);
#endif
    return fapl;
}

int h5_attr_put(hid_t obj, const char *name, hid_t ftype, hid_t mtype, const void *v) {
    if (H5Aexists(obj, name) > 0) H5Adelete(obj, name);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Awrite(a, mtype, v);
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return rc < 0 ? -1 : 0;
}
int h5_attr_put_i64(hid_t obj, const char *name, int64_t v) { return h5_attr_put(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v); }
int h5_attr_put_u64(hid_t obj, const char *name, uint64_t v) { return h5_attr_put(obj, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &v); }
int h5_attr_put_f64(hid_t obj, const char *name, double v) { return h5_attr_put(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v); }

int h5_attr_get(hid_t obj, const char *name, hid_t mtype, void *v) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    herr_t rc = H5Aread(a, mtype, v);
    H5Aclose(a);
    return rc < 0 ? -1 : 0;
}
int h5_attr_get_i64(hid_t obj, const char *name, int64_t *v) { return h5_attr_get(obj, name, H5T_NATIVE_INT64, v); }
int h5_attr_get_u64(hid_t obj, const char *name, uint64_t *v) { return h5_attr_get(obj, name, H5T_NATIVE_UINT64, v); }
int h5_attr_get_f64(hid_t obj, const char *name, double *v) { return h5_attr_get(obj, name, H5T_NATIVE_DOUBLE, v); }

int h5_attr_put_str(hid_t obj, const char *name, const char *s) {
    const size_t n = strlen(s);
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, n ? n : 1);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    H5Tset_cset(t, H5T_CSET_UTF8);
    const int rc = h5_attr_put(obj, name, t, t, n ? s : "");
    H5Tclose(t);
    return rc;
}

char *h5_attr_get_str(hid_t obj, const char *name) {
    if (H5Aexists(obj, name) <= 0) return NULL;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return NULL;
    hid_t ft = H5Aget_type(a);
    char *out = NULL;
    if (H5Tget_class(ft) == H5T_STRING) {
        if (H5Tis_variable_str(ft) > 0) {
            hid_t mt = H5Tcopy(H5T_C_S1);
            H5Tset_size(mt, H5T_VARIABLE);
            H5Tset_cset(mt, H5Tget_cset(ft));  // HDF5 does not convert between ASCII and UTF-8
            char *p = NULL;
            if (H5Aread(a, mt, &p) >= 0 && p) {
                out = dl_strdup(p);
                H5free_memory(p);
            }
            H5Tclose(mt);
        } else {  // read as stored (size, padding, character set), then terminated here
            out = dl_calloc(H5Tget_size(ft) + 1, 1);
            hid_t mt = H5Tcopy(ft);
            if (H5Aread(a, mt, out) < 0) free(out), out = NULL;
            H5Tclose(mt);
        }
    }
    H5Tclose(ft);
    H5Aclose(a);
    return out;
}

int h5_attr_get_strn(hid_t obj, const char *name, char *buf, size_t n) {
    char *v = h5_attr_get_str(obj, name);
    if (!v) return -1;
    snprintf(buf, n, "%s", v);
    free(v);
    return 0;
}
