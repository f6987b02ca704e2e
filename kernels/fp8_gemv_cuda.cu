// One-token FP8 GEMV on tensor cores: y[N] = (x . W[n, :]) * x_scale * w_scale[n] (+ bias[n]).
//
// W is E4M3 [N, K] row-major (1 byte a weight); x is one token row, either E4M3 with its
// per-token scale (X_MODE 0) or in the model dtype, quantized here per token from the row's
// amax written by the producing kernel (X_MODE 1) or with a static scale (X_MODE 2).
//
// Why tensor cores at M = 1: an FFMA GEMV spends ~60 instructions (E4M3 -> float
// conversions and FMAs) per 16 weight bytes a lane; `mma.m16n8k32.e4m3` takes the bytes as
// they are, 2 MMAs per 32 bytes. The 8 columns of B all hold x (7 are wasted, the tensor
// cores are idle anyway). Products are exact; each MMA's 32-product sum is added into a
// float32 accumulator (see mma_e4m3 on the MMA's own, shorter, accumulation).
//
// Layout: a CTA owns 16 output rows; its NWARPS warps split K into contiguous segments. Lane
// (g = lane / 4, t = lane % 4) loads 16-byte runs of rows g and g + 8. The MMA's k order is
// free (a dot product), so a lane's 16 bytes at offset t * 16 of a 64-byte chunk serve as its
// A registers for two MMAs, and x's bytes at the same offsets (from shared memory) as its B
// registers: the fragment layout of the PTX ISA's m16n8k32 (A: rows g / g + 8, k slots
// t * 4 + {0..3} and 16 + t * 4 + {0..3}; B: the same k slots) is met without shuffles.
//
// Compile-time parameters (NVRTC -D): K, NWARPS, BATCH (128-byte steps of a row loaded at
// once), DOUBLE (load the next batch before this one's MMAs), EARLY (the first batch is
// loaded before the programmatic-dependent-launch wait: the weight does not depend on the
// previous kernel), XDIRECT (X_MODE 0: x read from L2 beside the MMAs, not staged), X_MODE,
// X_T / OUT_T (0 bfloat16, 1 float16), HAS_BIAS, MIN_BLOCKS.

#define NT (NWARPS * 32)
#define STEPS (K / 128 / NWARPS)
#define NBATCH (STEPS / BATCH)
#define SEG (STEPS * 128)

static_assert(K % (128 * NWARPS) == 0, "K must split into 128-byte steps per warp");
static_assert(STEPS % BATCH == 0, "a warp's steps must split into batches");
static_assert(!XDIRECT || X_MODE == 0, "XDIRECT reads E4M3 x as it is");

#include "cuda_common.cuh"
#include "fp8_gemv_common.cuh"  // x / output conversions, per-token quantization

__device__ __forceinline__ uint4 ld_weight(const unsigned char* p) {
    // read once: keep it out of L1
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

struct Batch {
    uint4 r0[BATCH][2];  // row g: [step][64-byte half]
    uint4 r8[BATCH][2];  // row g + 8
};

__device__ __forceinline__ void load_batch(Batch& b, const unsigned char* p0,
                                           const unsigned char* p8, int first_step) {
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int off = (first_step + i) * 128 + h * 64;
            b.r0[i][h] = ld_weight(p0 + off);
            b.r8[i][h] = ld_weight(p8 + off);
        }
    }
}

__device__ __forceinline__ void mma_batch(const Batch& b, const unsigned char* x_lane,
                                          int first_step, float& acc0, float& acc8) {
    uint4 xv[BATCH][2];
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const unsigned char* p = x_lane + (first_step + i) * 128 + h * 64;
#if XDIRECT
            xv[i][h] = ld_cg(p);
#else
            xv[i][h] = *reinterpret_cast<const uint4*>(p);
#endif
        }
    }
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint4 a = b.r0[i][h], a8 = b.r8[i][h], x = xv[i][h];
            mma_e4m3(acc0, acc8, a.x, a8.x, a.y, a8.y, x.x, x.y);
            mma_e4m3(acc0, acc8, a.z, a8.z, a.w, a8.w, x.z, x.w);
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS)
fp8_gemv(const unsigned char* __restrict__ w, const float* __restrict__ w_scale,
         const void* __restrict__ x, const float* __restrict__ x_scale,
         const u16* __restrict__ bias, u16* __restrict__ out) {
#if !XDIRECT
    __shared__ __align__(16) unsigned char xs[K];
#endif
    __shared__ float partial[NWARPS][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const unsigned char* p0 = w + (size_t)(row0 + g) * K + warp * SEG + t * 16;
    const unsigned char* p8 = p0 + (size_t)8 * K;

    // the epilogue's constants first, before the wait (they are weights): loaded after the
    // main loop they cost every CTA one more DRAM round trip at its end
    float wsc = 0.0f;
#if HAS_BIAS
    float bias_v = 0.0f;
#endif
    if (threadIdx.x < 16) {
        wsc = w_scale[row0 + threadIdx.x];
#if HAS_BIAS
        bias_v = bias_to_f32(bias, row0 + threadIdx.x);
#endif
    }
    Batch cur;
#if EARLY
    load_batch(cur, p0, p8, 0);
#endif
    grid_dependency_wait();
#if !EARLY
    load_batch(cur, p0, p8, 0);
#endif

    // stage x as E4M3 in shared memory (quantized here in X_MODE 1 / 2); XDIRECT (X_MODE 0
    // only): no staging, each lane reads its x runs at L2 next to its MMAs
    float scale;
#if XDIRECT
    scale = ld_cg_f32(x_scale);
#else
    scale = stage_x<K, NT>(xs, x, x_scale, threadIdx.x);
#endif
#if XDIRECT
    const unsigned char* xs_lane =
        reinterpret_cast<const unsigned char*>(x) + warp * SEG + t * 16;
#else
    __syncthreads();
    const unsigned char* xs_lane = xs + warp * SEG + t * 16;
#endif
    float acc0 = 0.0f, acc8 = 0.0f;
#pragma unroll
    for (int b = 0; b < NBATCH; ++b) {
#if DOUBLE
        Batch next;
        if (b + 1 < NBATCH) load_batch(next, p0, p8, (b + 1) * BATCH);
        mma_batch(cur, xs_lane, b * BATCH, acc0, acc8);
        if (b + 1 < NBATCH) cur = next;
#else
        if (b > 0) load_batch(cur, p0, p8, b * BATCH);
        mma_batch(cur, xs_lane, b * BATCH, acc0, acc8);
#endif
    }
    launch_dependents();

    if (t == 0) {
        partial[warp][g] = acc0;
        partial[warp][g + 8] = acc8;
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < NWARPS; ++i) s += partial[i][threadIdx.x];  // fixed order
        const int n = row0 + threadIdx.x;
        float y = s * scale * wsc;
#if HAS_BIAS
        y += bias_v;
#endif
        out[n] = to_out(y);
    }
}
