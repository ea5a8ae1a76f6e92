// train_check.cuh: one check macro per library for the training backend's library code, llm.c style.
// A failing CUDA / cuBLAS / cuDNN / NCCL call is unrecoverable for a training step (sticky device errors,
// lost streams), so the macros print the call or kernel, file:line, the library's message and a hint, and
// exit with DL_EXIT_RUNTIME (1). Shape and dtype errors are not CUDA errors: functions return -1 with a
// message instead (train_fail), so callers can report them against the recipe or tensor.
// (kernels/scan/gpu_common.cuh's CK serves the test programs; it defines kernels, so library files do not
// include it.)
#pragma once
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static inline const char *cuda_hint(cudaError_t e) {
    switch (e) {
    case cudaErrorMemoryAllocation:
        return "out of GPU memory: lower the micro-batch or sequence length, enable activation recomputation, "
               "or shard over more GPUs (distill --dry-run prints the memory plan)";
    case cudaErrorInvalidConfiguration:
        return "bad launch configuration: a shape outside the kernel's limits reached the launch";
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
        return "a kernel touched memory it does not own: run under compute-sanitizer to locate it";
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
        return "binary not built for this GPU: build with -gencode arch=compute_90,code=sm_90 (Hopper)";
    case cudaErrorInsufficientDriver:
        return "the NVIDIA driver is older than the CUDA runtime this was built with";
    case cudaErrorNoDevice:
        return "no GPU visible: check CUDA_VISIBLE_DEVICES and the SLURM allocation";
    default:
        return "see the CUDA error above; CUDA_LAUNCH_BLOCKING=1 makes it point at the failing kernel";
    }
}
static inline void cuda_check_(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "%s:%d: CUDA error in %s: %s (%s)\n  hint: %s\n", file, line, what, cudaGetErrorName(e),
            cudaGetErrorString(e), cuda_hint(e));
    exit(1);
}
// cudaCheck(call): a runtime call. kernelCheck("name"): the launch just made (configuration errors only
// show here; faults inside the kernel appear at the next synchronizing call).
#define cudaCheck(call) cuda_check_((call), #call, __FILE__, __LINE__)
#define kernelCheck(name) cuda_check_(cudaGetLastError(), "kernel " name, __FILE__, __LINE__)

// The library macros exist when the library's header was included before this one.
#if defined(CUBLAS_API_H_)
static inline void cublas_check_(cublasStatus_t s, const char *what, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    const char *hint = s == CUBLAS_STATUS_NOT_SUPPORTED
                           ? "no cuBLASLt kernel for this shape/dtype/alignment: pointers must be 16-byte aligned and "
                             "leading dimensions multiples of 8"
                       : s == CUBLAS_STATUS_ALLOC_FAILED ? "out of GPU memory for the cuBLAS workspace"
                       : s == CUBLAS_STATUS_NOT_INITIALIZED ? "cuBLAS could not start: no GPU or driver mismatch"
                                                            : "see the cuBLAS status above";
    fprintf(stderr, "%s:%d: cuBLAS error in %s: status %d (%s)\n  hint: %s\n", file, line, what, (int)s,
            cublasLtGetStatusString(s), hint);
    exit(1);
}
#define cublasCheck(call) cublas_check_((call), #call, __FILE__, __LINE__)
#endif

#if defined(CUDNN_MAJOR)
static inline void cudnn_check_(cudnnStatus_t s, const char *what, const char *file, int line) {
    if (s == CUDNN_STATUS_SUCCESS) return;
    char msg[512] = "";
    cudnnGetLastErrorString(msg, sizeof msg);
    fprintf(stderr, "%s:%d: cuDNN error in %s: %s %s\n  hint: %s\n", file, line, what, cudnnGetErrorString(s), msg,
            s == CUDNN_STATUS_NOT_SUPPORTED ? "no cuDNN engine supports this graph on this GPU/cuDNN version"
                                            : "check the cuDNN version (9.x) and the tensor shapes/strides");
    exit(1);
}
#define cudnnCheck(call) cudnn_check_((call), #call, __FILE__, __LINE__)
#endif

#if defined(NCCL_MAJOR)
static inline void nccl_check_(ncclResult_t r, const char *what, const char *file, int line) {
    if (r == ncclSuccess) return;
    fprintf(stderr, "%s:%d: NCCL error in %s: %s\n  hint: %s\n", file, line, what, ncclGetErrorString(r),
            r == ncclSystemError || r == ncclRemoteError
                ? "a peer process or the network failed: check every rank's log (NCCL_DEBUG=WARN)"
                : "check that all ranks call the same collectives in the same order with the same sizes");
    exit(1);
}
#define ncclCheck(call) nccl_check_((call), #call, __FILE__, __LINE__)
#endif

// Shape/dtype errors: message into err (may be NULL), return -1.
static inline int train_fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}
