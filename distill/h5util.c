// h5util.c: see h5util.h.
#include "distill/h5util.h"

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
