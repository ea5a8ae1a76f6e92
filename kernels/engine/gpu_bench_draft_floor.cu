// gpu_bench_draft_floor: how fast could the speculative decoder's 2-layer draft step run at batch 1? The draft (teacher
// layers 0 and 29 of SmolLM2-135M with its embeddings and tied head) costs ~0.12 of a target step (docs/DECODE_CUDA.md),
// and at that cost the demos' speculative speedup stops near 1.45x (issue #9 asks for 2x). Its step is ~22 small
// dependent kernels replayed from a CUDA graph; this program times the same work, written once as phase functions
// (fused RMSNorm + GEMV, attention over the KV cache in splits, SwiGLU, the head with its argmax), launched two ways:
//   graph:  one kernel per phase (11 per step: 5 per layer and the head), K steps captured in a CUDA graph;
//   fused:  one cooperative kernel for the whole chain of K steps, a grid-wide barrier between phases.
// SmolLM2-135M shapes: d 576, 9 query / 3 KV heads of 64, d_ff 1536, vocab 49152, random bf16 weights, a KV cache of
// `ctx` tokens. RoPE is left out (a few hundred flops per step) and nothing is checked against a reference: the phases
// move the real bytes and do the real arithmetic, but this is a measurement behind a decision, not a decoder.
// Output: RESULT lines (us per step for each form, the step's bytes and the bandwidth they imply).
//   gpu_bench_draft_floor [ctx 512] [K 3] [reps 200] [blocks per SM 2]
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>

#include "kernels/train/train_check.cuh"

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

constexpr int D = 576, NQ = 9, NKV = 3, HD = 64, QKV = D + 2 * NKV * HD, FF = 1536, V = 49152, NL = 2, KVD = NKV * HD;
constexpr int SPLITS = 8, THREADS = 256, WARPS = THREADS / 32;

struct Net {
    const bf16 *wqkv[NL], *wo[NL], *wgu[NL], *wd[NL], *emb;  // [QKV, D], [D, D], [2 FF, D] (gate rows, then up), [D, FF]
    const float *n1[NL], *n2[NL], *nf;                      // RMSNorm weights
    bf16 *kc[NL], *vc[NL];                                  // [cap, KVD]
    float *x, *q, *act, *part;                              // [D], [D], [FF], [NQ * SPLITS][HD + 2]
    float2 *best;                                           // per block: (logit, id) of its best row
    int tok0;                                               // the chain's first input token
};

__device__ __forceinline__ float block_sum(float v, float *red) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < WARPS; w++) s += red[w];
    __syncthreads();
    return s;
}

// xs = rmsnorm(src) * w, in shared memory (every block computes the whole vector: 576 values).
__device__ void norm_into(float *xs, const float *src, const float *w, float *red) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += THREADS) ss += src[i] * src[i];
    const float r = rsqrtf(block_sum(ss, red) / D + 1e-5f);
    for (int i = threadIdx.x; i < D; i += THREADS) xs[i] = src[i] * r * w[i];
    __syncthreads();
}

// One warp's dot products of R bf16 rows (n a multiple of 8) with a shared-memory vector: every lane's 16-byte loads
// of all R rows are issued before the sums, so a warp has R times the bytes in flight (weight streaming).
template <int R>
__device__ __forceinline__ void warp_dots(float (&s)[R], const bf16 *const (&row)[R], const float *xs, int n) {
    const int lane = threadIdx.x % 32, n8 = n / 8;
#pragma unroll
    for (int r = 0; r < R; r++) s[r] = 0.f;
    for (int c0 = 0; c0 < n8; c0 += 64) {  // two 16-byte pieces per lane and row per round
        uint4 u[R][2];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int c = c0 + lane + 32 * h;
                u[r][h] = c < n8 ? reinterpret_cast<const uint4 *>(row[r])[c] : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int c = c0 + lane + 32 * h;
            if (c >= n8) continue;
            const float4 xa = reinterpret_cast<const float4 *>(xs)[2 * c], xb = reinterpret_cast<const float4 *>(xs)[2 * c + 1];
#pragma unroll
            for (int r = 0; r < R; r++) {
                const __nv_bfloat162 *b = reinterpret_cast<const __nv_bfloat162 *>(&u[r][h]);
                const float2 p0 = __bfloat1622float2(b[0]), p1 = __bfloat1622float2(b[1]), p2 = __bfloat1622float2(b[2]),
                             p3 = __bfloat1622float2(b[3]);
                s[r] += p0.x * xa.x + p0.y * xa.y + p1.x * xa.z + p1.y * xa.w + p2.x * xb.x + p2.y * xb.y + p3.x * xb.z +
                        p3.y * xb.w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
        for (int o = 16; o; o >>= 1) s[r] += __shfl_xor_sync(~0u, s[r], o);
}
__device__ __forceinline__ float warp_dot(const bf16 *row, const float *xs, int n) {
    float s[1];
    const bf16 *const rr[1] = {row};
    warp_dots<1>(s, rr, xs, n);
    return s[0];
}

__device__ __forceinline__ int gwarp() { return blockIdx.x * WARPS + threadIdx.x / 32; }
__device__ __forceinline__ int nwarps() { return gridDim.x * WARPS; }

// Layer 0 of a step first takes the previous step's pick (every block reduces the blocks' bests; ties: lowest id) and
// its embedding row as x; block 0 stores x for the residual adds of the later phases.
__device__ void phase_qkv(const Net &n, int l, int pos, bool first_step, float *xs, float *red) {
    __shared__ float xin[D];
    __shared__ int tok;
    const float *src = n.x;
    if (l == 0) {
        __shared__ float2 wb[WARPS];
        float2 b = make_float2(-INFINITY, (float)n.tok0);  // (logit, id): the larger logit, then the lower id
        for (int i = threadIdx.x; !first_step && i < (int)gridDim.x; i += THREADS) {
            const float2 e = n.best[i];
            if (e.x > b.x || (e.x == b.x && e.y < b.y)) b = e;
        }
        for (int o = 16; o; o >>= 1) {
            const float2 e = make_float2(__shfl_xor_sync(~0u, b.x, o), __shfl_xor_sync(~0u, b.y, o));
            if (e.x > b.x || (e.x == b.x && e.y < b.y)) b = e;
        }
        if (threadIdx.x % 32 == 0) wb[threadIdx.x / 32] = b;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < WARPS; w++)
                if (wb[w].x > b.x || (wb[w].x == b.x && wb[w].y < b.y)) b = wb[w];
            tok = first_step ? n.tok0 : (int)b.y;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < D; i += THREADS) {
            xin[i] = __bfloat162float(n.emb[(size_t)tok * D + i]);
            if (blockIdx.x == 0) n.x[i] = xin[i];
        }
        __syncthreads();
        src = xin;
    }
    norm_into(xs, src, n.n1[l], red);
    for (int r = gwarp(); r < QKV; r += nwarps()) {
        const float y = warp_dot(n.wqkv[l] + (size_t)r * D, xs, D);
        if (threadIdx.x % 32) continue;
        if (r < D) n.q[r] = y;
        else if (r < D + KVD) n.kc[l][(size_t)pos * KVD + r - D] = __float2bfloat16(y);
        else n.vc[l][(size_t)pos * KVD + r - D - KVD] = __float2bfloat16(y);
    }
}

// Attention of the 9 query heads over keys 0..pos, each head's keys in SPLITS parts: (max, sum, unnormalized out).
__device__ void phase_attn(const Net &n, int l, int pos, float *red) {
    __shared__ float qs[HD], p[THREADS];
    const int len = pos + 1, chunk = (len + SPLITS - 1) / SPLITS;
    for (int it = blockIdx.x; it < NQ * SPLITS; it += gridDim.x) {
        const int h = it / SPLITS, s = it % SPLITS, kvh = h / (NQ / NKV), j0 = s * chunk, j1 = min(len, j0 + chunk);
        if (threadIdx.x < HD) qs[threadIdx.x] = n.q[h * HD + threadIdx.x] * 0.125f;
        __syncthreads();
        float m = -INFINITY;
        for (int j = j0 + threadIdx.x; j < j1; j += THREADS) {  // chunk <= THREADS for ctx <= 2048
            const bf16 *k = n.kc[l] + (size_t)j * KVD + kvh * HD;
            float sc = 0.f;
            for (int d = 0; d < HD; d++) sc += qs[d] * __bfloat162float(k[d]);
            p[j - j0] = sc, m = fmaxf(m, sc);
        }
        for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(~0u, m, o));
        if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
        __syncthreads();
        m = -INFINITY;
        for (int w = 0; w < WARPS; w++) m = fmaxf(m, red[w]);
        __syncthreads();
        float sum = 0.f;
        for (int j = j0 + threadIdx.x; j < j1; j += THREADS) sum += (p[j - j0] = __expf(p[j - j0] - m));
        sum = block_sum(sum, red);
        float *o = n.part + (size_t)it * (HD + 2);
        if (threadIdx.x < HD) {
            float acc = 0.f;
            for (int j = j0; j < j1; j++) acc += p[j - j0] * __bfloat162float(n.vc[l][(size_t)j * KVD + kvh * HD + threadIdx.x]);
            o[2 + threadIdx.x] = acc;
        }
        if (threadIdx.x == 0) o[0] = m, o[1] = sum;
        __syncthreads();
    }
}

// The heads' parts combined (every block, into shared memory), then x += W_o attn.
__device__ void phase_o(const Net &n, int l, float *xs) {
    for (int i = threadIdx.x; i < D; i += THREADS) {
        const int h = i / HD, d = i % HD;
        float M = -INFINITY, S = 0.f, A = 0.f;
        for (int s = 0; s < SPLITS; s++) M = fmaxf(M, n.part[(size_t)(h * SPLITS + s) * (HD + 2)]);
        for (int s = 0; s < SPLITS; s++) {
            const float *o = n.part + (size_t)(h * SPLITS + s) * (HD + 2);
            if (o[0] == -INFINITY) continue;
            const float f = __expf(o[0] - M);
            S += f * o[1], A += f * o[2 + d];
        }
        xs[i] = A / S;
    }
    __syncthreads();
    for (int r = gwarp(); r < D; r += nwarps()) {
        const float y = warp_dot(n.wo[l] + (size_t)r * D, xs, D);
        if (threadIdx.x % 32 == 0) n.x[r] += y;
    }
}

__device__ void phase_gu(const Net &n, int l, float *xs, float *red) {
    norm_into(xs, n.x, n.n2[l], red);
    for (int r = gwarp(); r < FF; r += nwarps()) {
        const float g = warp_dot(n.wgu[l] + (size_t)r * D, xs, D), u = warp_dot(n.wgu[l] + (size_t)(FF + r) * D, xs, D);
        if (threadIdx.x % 32 == 0) n.act[r] = g / (1.f + __expf(-g)) * u;
    }
}

__device__ void phase_down(const Net &n, int l) {
    __shared__ __align__(16) float as[FF];
    for (int i = threadIdx.x; i < FF; i += THREADS) as[i] = n.act[i];
    __syncthreads();
    for (int r = gwarp(); r < D; r += nwarps()) {
        const float y = warp_dot(n.wd[l] + (size_t)r * FF, as, FF);
        if (threadIdx.x % 32 == 0) n.x[r] += y;
    }
}

// Final norm, the tied head over the vocabulary, each block's best (logit, id).
__device__ void phase_head(const Net &n, float *xs, float *red) {
    __shared__ float2 wb[WARPS];
    norm_into(xs, n.x, n.nf, red);
    float bv = -INFINITY;
    int bi = 0;
    constexpr int R = 4;  // rows per warp and round (V is a multiple of 4)
    for (int r0 = R * gwarp(); r0 < V; r0 += R * nwarps()) {
        const bf16 *const rows[R] = {n.emb + (size_t)r0 * D, n.emb + (size_t)(r0 + 1) * D, n.emb + (size_t)(r0 + 2) * D,
                                     n.emb + (size_t)(r0 + 3) * D};
        float y[R];
        warp_dots<R>(y, rows, xs, D);
#pragma unroll
        for (int k = 0; k < R; k++)
            if (y[k] > bv) bv = y[k], bi = r0 + k;  // rows ascend per warp: the first of equal logits is kept
    }
    if (threadIdx.x % 32 == 0) wb[threadIdx.x / 32] = make_float2(bv, (float)bi);
    __syncthreads();
    if (threadIdx.x == 0) {
        float2 b = wb[0];
        for (int w = 1; w < WARPS; w++)
            if (wb[w].x > b.x || (wb[w].x == b.x && wb[w].y < b.y)) b = wb[w];
        n.best[blockIdx.x] = b;
    }
}

enum { PH_QKV, PH_ATTN, PH_O, PH_GU, PH_DOWN, PH_HEAD };
// A step's phases in order, one list for both forms: i < 5 NL: phase i % 5 of layer i / 5; then the head (layer NL).
constexpr int STEP_PHASES = 5 * NL + 1;
__host__ __device__ inline void step_phase(int i, int *ph, int *l) { *ph = i < 5 * NL ? i % 5 : PH_HEAD, *l = i / 5; }

__device__ void run_phase(const Net &n, int ph, int l, int pos, bool first_step) {
    __shared__ __align__(16) float xs[D];
    __shared__ float red[WARPS];
    switch (ph) {
    case PH_QKV: phase_qkv(n, l, pos, first_step, xs, red); break;
    case PH_ATTN: phase_attn(n, l, pos, red); break;
    case PH_O: phase_o(n, l, xs); break;
    case PH_GU: phase_gu(n, l, xs, red); break;
    case PH_DOWN: phase_down(n, l); break;
    default: phase_head(n, xs, red); break;
    }
}

__global__ void __launch_bounds__(THREADS) phase_kernel(Net n, int ph, int l, int pos, int first_step) {
    run_phase(n, ph, l, pos, first_step != 0);
}

__global__ void __launch_bounds__(THREADS) chain_kernel(Net n, int pos0, int K) {
    cg::grid_group grid = cg::this_grid();
    for (int k = 0; k < K; k++)
        for (int i = 0; i < STEP_PHASES; i++) {
            int ph, l;
            step_phase(i, &ph, &l);
            run_phase(n, ph, l, pos0 + k, k == 0);
            grid.sync();
        }
}

static bf16 *rand_bf16(size_t n, unsigned seed, float scale) {
    std::vector<bf16> h(n);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        h[i] = __float2bfloat16(((seed >> 8) * (1.f / 16777216.f) - 0.5f) * scale);
    }
    bf16 *d;
    cudaCheck(cudaMalloc(&d, n * 2));
    cudaCheck(cudaMemcpy(d, h.data(), n * 2, cudaMemcpyHostToDevice));
    return d;
}
static float *ones(int n) {
    std::vector<float> h(n, 1.f);
    float *d;
    cudaCheck(cudaMalloc(&d, n * 4));
    cudaCheck(cudaMemcpy(d, h.data(), n * 4, cudaMemcpyHostToDevice));
    return d;
}

int main(int argc, char **argv) {
    const int ctx = argc > 1 ? atoi(argv[1]) : 512, K = argc > 2 ? atoi(argv[2]) : 3, reps = argc > 3 ? atoi(argv[3]) : 200;
    const int want_per_sm = argc > 4 ? atoi(argv[4]) : 2;
    if (ctx < 1 || ctx + K > 2048 || K < 1 || K > 16 || reps < 1) {
        fprintf(stderr, "usage: gpu_bench_draft_floor [ctx 1..2047-K] [K 1..16] [reps] [blocks per SM]\n");
        return 2;
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    int per_sm = 0;
    cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, chain_kernel, THREADS, 0));
    const int nb = prop.multiProcessorCount * std::max(1, std::min(per_sm, want_per_sm));
    printf("gpu_bench_draft_floor: %s, %d SMs, %d blocks of %d threads (%d per SM possible), ctx %d, K %d\n", prop.name,
           prop.multiProcessorCount, nb, THREADS, per_sm, ctx, K);
    Net n = {};
    unsigned seed = 1;
    for (int l = 0; l < NL; l++) {
        n.wqkv[l] = rand_bf16((size_t)QKV * D, seed++, 0.08f);
        n.wo[l] = rand_bf16((size_t)D * D, seed++, 0.08f);
        n.wgu[l] = rand_bf16((size_t)2 * FF * D, seed++, 0.08f);
        n.wd[l] = rand_bf16((size_t)D * FF, seed++, 0.05f);
        n.n1[l] = ones(D), n.n2[l] = ones(D);
        n.kc[l] = rand_bf16((size_t)2048 * KVD, seed++, 1.f);
        n.vc[l] = rand_bf16((size_t)2048 * KVD, seed++, 1.f);
    }
    n.emb = rand_bf16((size_t)V * D, seed++, 0.1f);
    n.nf = ones(D);
    cudaCheck(cudaMalloc(&n.x, D * 4));
    cudaCheck(cudaMalloc(&n.q, D * 4));
    cudaCheck(cudaMalloc(&n.act, FF * 4));
    cudaCheck(cudaMalloc(&n.part, (size_t)NQ * SPLITS * (HD + 2) * 4));
    cudaCheck(cudaMalloc(&n.best, (size_t)nb * sizeof(float2)));
    n.tok0 = 42;
    // bytes a step must read at least: both layers' weights, the head, the KV cache rows it attends over
    const double wbytes = 2.0 * NL * ((double)QKV * D + D * D + 2.0 * FF * D + (double)D * FF) + 2.0 * V * D;
    const double step_bytes = wbytes + NL * 2.0 * 2.0 * KVD * (ctx + (K + 1) / 2.0);
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    // graph: one kernel per phase
    cudaGraph_t g;
    cudaGraphExec_t ex;
    cudaCheck(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    const int launches = K * STEP_PHASES;
    for (int k = 0; k < K; k++)
        for (int i = 0; i < STEP_PHASES; i++) {
            int ph, l;
            step_phase(i, &ph, &l);
            phase_kernel<<<nb, THREADS, 0, st>>>(n, ph, l, ctx + k, k == 0);
        }
    cudaCheck(cudaStreamEndCapture(st, &g));
    cudaCheck(cudaGraphInstantiate(&ex, g, 0));
    float t_graph = 0, t_fused = 0;
    for (int form = 0; form < 2; form++) {
        int pos0 = ctx;
        void *args[] = {&n, &pos0, (void *)&K};
        auto launch = [&]() {
            if (form == 0) cudaCheck(cudaGraphLaunch(ex, st));
            else cudaCheck(cudaLaunchCooperativeKernel((void *)chain_kernel, dim3(nb), dim3(THREADS), args, 0, st));
        };
        for (int w = 0; w < 10; w++) launch();
        cudaCheck(cudaStreamSynchronize(st));
        std::vector<float> ms(5);
        for (int rep = 0; rep < 5; rep++) {
            cudaCheck(cudaEventRecord(e0, st));
            for (int i = 0; i < reps; i++) launch();
            cudaCheck(cudaEventRecord(e1, st));
            cudaCheck(cudaEventSynchronize(e1));
            cudaCheck(cudaEventElapsedTime(&ms[rep], e0, e1));
        }
        std::sort(ms.begin(), ms.end());
        const float us_step = ms[2] * 1e3f / reps / K;
        (form == 0 ? t_graph : t_fused) = us_step;
        std::vector<float2> best(nb);  // the chain's last pick, printed so that both forms can be compared by eye
        cudaCheck(cudaMemcpy(best.data(), n.best, (size_t)nb * sizeof(float2), cudaMemcpyDeviceToHost));
        int bb = 0;
        for (int b = 1; b < nb; b++)
            if (best[b].x > best[bb].x) bb = b;
        printf("RESULT form=%s ctx=%d K=%d launches_per_chain=%d us_per_step=%.2f step_MB=%.1f GB_per_s=%.0f last_pick=%d\n",
               form == 0 ? "graph" : "fused", ctx, K, form == 0 ? launches : 1, us_step, step_bytes / 1e6,
               step_bytes / (us_step * 1e-6) / 1e9, (int)best[bb].y);
    }
    printf("RESULT fused_vs_graph=%.3f\n", t_fused / t_graph);
    // each phase alone: `reps` launches of it back to back (layer 0; the same inputs each time)
    const char *names[] = {"qkv", "attn", "o", "gate_up", "down", "head"};
    for (int ph = PH_QKV; ph <= PH_HEAD; ph++) {
        for (int w = 0; w < 5; w++) phase_kernel<<<nb, THREADS, 0, st>>>(n, ph, 0, ctx, 0);
        cudaCheck(cudaEventRecord(e0, st));
        for (int i = 0; i < reps; i++) phase_kernel<<<nb, THREADS, 0, st>>>(n, ph, 0, ctx, 0);
        cudaCheck(cudaEventRecord(e1, st));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        printf("RESULT phase=%s us=%.2f\n", names[ph], ms * 1e3f / reps);
    }
    return 0;
}
