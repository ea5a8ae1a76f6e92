// gpu_bench_pdl: what programmatic dependent launch (PDL, sm_90) would save the decoder. A batch-1 decode step is
// ~300 small dependent kernels replayed from a CUDA graph (docs/DECODE_CUDA.md); this times a graph of 300 dependent
// GEMV-sized kernels (72 blocks, each reading a 576 x 576 fp32 matrix, 1.3 MB) captured with plain launches and with
// PDL (each kernel waits on griddepcontrol.wait before touching memory, then lets its dependent launch).
// Output: RESULT lines, time per graph and per kernel. Not used by the product: a measurement behind a decision.
#include <cstdio>
#include <cuda_runtime.h>

#include "kernels/train/train_check.cuh"

template <int PDL>
__global__ void gemv_kernel(const float4 *w, const float *x, float *y, int rows, int k4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (PDL) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;");
    }
#endif
    const int r = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;  // one warp per row
    if (r >= rows) return;
    float s = 0;
    for (int i = lane; i < k4; i += 32) {
        const float4 v = w[(size_t)r * k4 + i];
        s += v.x * x[4 * i] + v.y * x[4 * i + 1] + v.z * x[4 * i + 2] + v.w * x[4 * i + 3];
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    if (lane == 0) y[r] = s * 1e-3f;
}

int main() {
    const int rows = 576, k = 576, k4 = k / 4, N = 300, reps = 50;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("gpu_bench_pdl: %s\n", prop.name);
    float *w, *a, *b;  // w: 4 matrices, used in turn; a, b: ping-pong vectors
    cudaCheck(cudaMalloc(&w, (size_t)4 * rows * k * 4));
    cudaCheck(cudaMalloc(&a, (size_t)k * 4));
    cudaCheck(cudaMalloc(&b, (size_t)k * 4));
    cudaCheck(cudaMemset(w, 0, (size_t)4 * rows * k * 4));
    cudaCheck(cudaMemset(a, 0, (size_t)k * 4));
    cudaCheck(cudaMemset(b, 0, (size_t)k * 4));
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (int pdl = 0; pdl < 2; pdl++) {
        cudaGraph_t g;
        cudaGraphExec_t ex;
        cudaCheck(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < N; i++) {
            cudaLaunchAttribute at[1];
            at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            at[0].val.programmaticStreamSerializationAllowed = pdl;
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3(rows / 8), cfg.blockDim = dim3(256), cfg.stream = st, cfg.attrs = at, cfg.numAttrs = 1;
            const float4 *wi = (const float4 *)w + (size_t)(i % 4) * rows * k4;
            const float *x = (i & 1) ? b : a;
            float *y = (i & 1) ? a : b;
            cudaCheck(cudaLaunchKernelEx(&cfg, pdl ? gemv_kernel<1> : gemv_kernel<0>, wi, x, y, rows, k4));
        }
        cudaCheck(cudaStreamEndCapture(st, &g));
        cudaCheck(cudaGraphInstantiate(&ex, g, 0));
        for (int i = 0; i < 5; i++) cudaCheck(cudaGraphLaunch(ex, st));  // warm-up
        cudaEvent_t e0, e1;
        cudaCheck(cudaEventCreate(&e0));
        cudaCheck(cudaEventCreate(&e1));
        cudaCheck(cudaEventRecord(e0, st));
        for (int i = 0; i < reps; i++) cudaCheck(cudaGraphLaunch(ex, st));
        cudaCheck(cudaEventRecord(e1, st));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        printf("RESULT pdl_chain pdl=%d kernels=%d ms_per_graph=%.3f us_per_kernel=%.2f\n", pdl, N, ms / reps,
               ms / reps / N * 1000);
        cudaCheck(cudaGraphExecDestroy(ex));
        cudaCheck(cudaGraphDestroy(g));
        cudaCheck(cudaEventDestroy(e0));
        cudaCheck(cudaEventDestroy(e1));
    }
    cudaCheck(cudaFree(w)), cudaCheck(cudaFree(a)), cudaCheck(cudaFree(b));
    cudaCheck(cudaStreamDestroy(st));
    return 0;
}
