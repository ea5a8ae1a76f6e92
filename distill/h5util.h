// h5util.h: the few HDF5 habits every HDF5 file of distill shares (checkpoints, optimizer shards, token
// shards, the teacher cache).
#pragma once
#include <hdf5.h>
#include <stdbool.h>
#include <stdint.h>

// HDF5 prints its error stack on every failure by default; our messages say what went wrong instead.
// Silence it between begin and end (restores the previous handler).
typedef struct {
    H5E_auto2_t fn;
    void *data;
} H5Quiet;
H5Quiet h5_quiet_begin(void);
void h5_quiet_end(H5Quiet q);

// A file-access property list. NFS and some Lustre mounts have no working flock: readers and single-writer
// files turn locking off (lock = false); with lock = true HDF5 locks but tolerates file systems that cannot.
// HDF5_USE_FILE_LOCKING=FALSE in the environment overrides both. Close with H5Pclose.
hid_t h5_fapl(bool lock);

// Scalar attributes of obj (a file, group or dataset). A put replaces an attribute of the same name; a get
// fails when the attribute is missing or unreadable. 0 on success, -1 on failure. ftype: the type in the file
// (little-endian standard types), mtype: the type in memory.
int h5_attr_put(hid_t obj, const char *name, hid_t ftype, hid_t mtype, const void *v);
int h5_attr_put_i64(hid_t obj, const char *name, int64_t v);
int h5_attr_put_u64(hid_t obj, const char *name, uint64_t v);
int h5_attr_put_f64(hid_t obj, const char *name, double v);
int h5_attr_get(hid_t obj, const char *name, hid_t mtype, void *v);
int h5_attr_get_i64(hid_t obj, const char *name, int64_t *v);
int h5_attr_get_u64(hid_t obj, const char *name, uint64_t *v);
int h5_attr_get_f64(hid_t obj, const char *name, double *v);

// String attributes. A put writes a fixed-length, null-padded UTF-8 string (an empty one as one NUL byte),
// replacing an attribute of the same name. h5_attr_get_str reads any string attribute (fixed or variable length,
// ASCII or UTF-8) into a malloc'd string, NULL when it is missing or not a string; h5_attr_get_strn copies it
// into buf, truncated to n - 1 bytes (-1 when missing or not a string).
int h5_attr_put_str(hid_t obj, const char *name, const char *s);
char *h5_attr_get_str(hid_t obj, const char *name);
int h5_attr_get_strn(hid_t obj, const char *name, char *buf, size_t n);
