// h5util.h: the few HDF5 habits every HDF5 file of distill shares (checkpoints, optimizer shards, token
// shards, the teacher cache).
#pragma once
#include <hdf5.h>
#include <stdbool.h>

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
