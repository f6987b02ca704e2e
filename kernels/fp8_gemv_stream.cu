// One-token FP8 GEMV that keeps DRAM busy across kernel boundaries:
// y[N] = (x . W[n, :]) * x_scale * w_scale[n] (+ bias[n]), W E4M3 [N, K] row-major, x one
// token row (fp8_gemv_common.cuh: X_MODE, X_T, OUT_T).
//
// Why: at batch 1 every decode GEMV (and every row kernel between two of them) leaves DRAM
// idle while it ramps up and drains, ~2 us a boundary on an H200 (PERF_NOTES.md, sessions
// 10-16). The weights depend on nothing earlier kernels compute, so this kernel starts
// streaming them before its programmatic-dependent-launch wait, into shared memory, and lets
// the next kernel launch at its own start. With the row kernels between two GEMVs doing the
// same, the next GEMV is launched while the current one still streams; its CTA takes each SM
// as the current one leaves it and fills its ring during the tail and the row kernels. The
// kernel is persistent (one CTA an SM, a single wave: a successor's CTAs never take a slot
// a later wave of this kernel would need). The ring that streams best is ~200 KB of 2 KB
// copies (PERF_NOTES.md, seventeenth session): smaller rings or copies stream slower, and two
// CTAs an SM did not pay.
//
// Layout: CTA b owns the 16-row units [b * U / G, (b + 1) * U / G) (U = N / 16, G CTAs). A
// producer warp copies each unit's K in stages of 16 rows x KC bytes with TMA bulk copies
// (lane r < 16: row r) into a ring of STAGES stages; NWARPS consumer warps split a stage's K
// in 128-byte steps and feed `mma.m16n8k32.e4m3` straight from shared memory (the fragment
// layout of fp8_gemv_cuda.cu), summing a unit's 16 rows over the warps in a fixed order.
//
// Input modes beyond fp8_gemv_common.cuh's 0-2 (per-token dynamic quantization, the amax
// computed here: every CTA reads the whole row from L2, which replaces a row kernel and its
// boundary while the ring keeps filling; measured slower than the row kernels so far, since
// 132 CTAs reading the same lines under the weight stream wait longer than one row kernel):
//   3  x = RMSNorm(x + residual) * norm_w (HAS_RES; else RMSNorm(x)), the residual sum also
//      written to res_out (each CTA a part); the roundings of kernels/fp8_fused.py's norm
//   4  x = SiLU(gate) * up of a [2K] gate | up row (kernels/activation.py's rounding)
//   5  x in the model dtype as it is
//
// Compile-time parameters (NVRTC -D): K, NWARPS, KC, STAGES, MAXU (units a CTA at most),
// MIN_BLOCKS (register cap: CTAs an SM), PREFILL_STAGES (stages copied before the producer
// waits too; 0: it waits first), EARLY_TRIGGER (1: the next kernel may launch at this one's
// start; 0: after the main loop), X_MODE, X_T, OUT_T, HAS_BIAS, HAS_RES (mode 3), GATED.
//
// GATED: W is a gate | up weight [2I, K] and the output is SiLU(gate) * up [I] (each rounded
// to the model dtype first, kernels/activation.py): a unit is 8 gate rows (MMA rows g) with
// the matching 8 up rows (g + 8), so its epilogue holds both sums; the row's max |output| is
// maxed into `amax_out` (one atomic a CTA) for the next GEMM, which quantizes from it.
//
// ROTARY: W is a fused q | k | v weight [(HQ + 2 HKV) HD, K] and the epilogue does what
// kernels/rotary.py's rotary_and_cache does after the GEMM (a model-dtype cache): a unit is 8
// rows of one head's first half (MMA rows g) with their rotate-half partners HD / 2 on
// (g + 8), so its epilogue holds both values of each pair; q and k heads are rotated at the
// token's position (cos | sin from the float32 table, loaded before the wait: the position
// is a step input), every output is written to `out` (the qkv row), and k and v heads also
// into the paged cache at the token's slot (-1: not written). Cache strides and block size
// are compile-time (KS0-3, VS0-3, BLOCK_SIZE: one layout for every layer of a pool); the
// position and slot are int32 or int64 (POS64, SLOT64). The rounding is the kernels': the
// GEMM's output rounded, rotated in float32, rounded once.

#include "cuda_common.cuh"
#include "fp8_gemv_common.cuh"

#define NTC (NWARPS * 32)
#define STEPS (KC / 128 / NWARPS)
#define CHUNKS (K / KC)
#define PITCH (KC + 64)  // rows g and g + 1 of a stage in other banks
#define STAGE_BYTES (16 * PITCH)

static_assert(K % KC == 0, "K must split into stages");
static_assert(KC % (128 * NWARPS) == 0, "a stage must split into 128-byte steps per warp");
static_assert(KC % 16 == 0 && KC <= 65536, "bulk copies: 16-byte multiples");

__device__ __forceinline__ void consumers_sync() { consumers_bar<NTC>(); }

#if X_MODE >= 3
static_assert(X_T == OUT_T, "modes 3-5: x in the model dtype");
// 16-byte runs of 8 values: thread t holds runs t, t + NTC, ... (coalesced loads; a run per
// thread each, a warp's 32 runs contiguous), RUNS_T of them
#define RUN (K / NTC)  // row elements a consumer thread
#define RUNS_T (RUN / 8)
#define RUN_AT(j) (threadIdx.x + (j) * NTC)  // the thread's j-th run
static_assert(K % (8 * NTC) == 0, "modes 3-5: 16-byte runs a consumer thread");

__device__ __forceinline__ float to_x(u16 v) {  // a model-dtype value as float32
    return lo_to_f32((u32)v);
}
__device__ __forceinline__ float round_x(float v) {  // rounded to the model dtype
    return to_x(to_out(v));
}
__device__ __forceinline__ void unpack8(uint4 v, float* y) {
    const u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        y[2 * i] = lo_to_f32(p[i]);
        y[2 * i + 1] = hi_to_f32(p[i]);
    }
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)to_out(lo) | ((u32)to_out(hi) << 16);
}

// The row (model dtype, packed in pairs: run RUN_AT(j) in y[4 j .. 4 j + 3]) as E4M3 into xs,
// scaled per token from its amax (kernels/fp8_quant.py's formula); returns the scale.
__device__ __forceinline__ float quantize_run(const u32 (&y)[RUN / 2], unsigned char* xs,
                                              float* red) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < RUN / 2; ++i)
        amax = fmaxf(amax, fmaxf(fabsf(lo_to_f32(y[i])), fabsf(hi_to_f32(y[i]))));
    const float scale = fmaxf(__fdiv_rn(consumers_reduce<1, NTC>(amax, red), 448.0f), 1e-12f);
    const float inv = __frcp_rn(scale);
#pragma unroll
    for (int j = 0; j < RUNS_T; ++j) {
        uint2 q;
        q.x = quantize_pair(y[4 * j], inv) | (quantize_pair(y[4 * j + 1], inv) << 16);
        q.y = quantize_pair(y[4 * j + 2], inv) | (quantize_pair(y[4 * j + 3], inv) << 16);
        *reinterpret_cast<uint2*>(xs + 8 * RUN_AT(j)) = q;
    }
    return scale;
}
#endif

#ifndef ROTARY
#define ROTARY 0
#endif
static_assert(!(GATED && ROTARY), "one epilogue a launch");
#if ROTARY
static_assert(HD % 16 == 0, "rotary units: 8 rows of each half of a head");
#endif

// Weight row of MMA row r (0..15) of unit u (of `units`).
__device__ __forceinline__ int unit_row(int u, int r, int units) {
#if GATED
    return r < 8 ? 8 * u + r : 8 * units + 8 * u + r - 8;  // gate rows, then the up rows
#elif ROTARY
    // head u / (HD / 16), rows 8 j .. 8 j + 7 of its first half and their partners HD / 2 on
    return (u / (HD / 16)) * HD + 8 * (u % (HD / 16)) + (r & 7) + (r < 8 ? 0 : HD / 2);
#else
    return 16 * u + r;
#endif
}

// Shared memory: the ring, x (E4M3), the CTA's weight scales and bias, (ROTARY) the cos | sin
// of its rows, the units' partial sums (two buffers), the full / empty mbarriers. Must match
// fp8_gemv_stream.py's smem_bytes.
#define XS_OFF (STAGES * STAGE_BYTES)
#define WS_OFF (XS_OFF + K)
#define BS_OFF (WS_OFF + MAXU * 16 * 4)
#define CS_OFF (BS_OFF + MAXU * 16 * 4)
#define PART_OFF (CS_OFF + ROTARY * MAXU * 16 * 4)
#define RED_OFF (PART_OFF + 2 * NWARPS * 16 * 4)
#define BAR_OFF (RED_OFF + 8 * ((NWARPS + 1) / 2))  // mbarriers: 8-byte aligned

// The GEMM output of the CTA's row r (MMA row i of its unit): the consumer warps' partial
// sums in a fixed order, scaled, plus the bias; not yet rounded to the output dtype.
__device__ __forceinline__ float unit_output(const float (*part)[16], int i, int r, float scale,
                                             const float* wss, const float* bss) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) sum += part[w][i];
    float y = sum * scale * wss[r];
#if HAS_BIAS
    y += bss[r];
#endif
    return y;
}

// `x_scale`: modes 0-2 (fp8_gemv_common.cuh); `res`, `res_out`, `norm_w`, `eps`: mode 3;
// `amax_out`: GATED; `pos`, `slot`, `cos_sin` (row stride `cs_stride`), `k_cache`, `v_cache`:
// ROTARY.
extern "C" __global__ void __launch_bounds__(NTC + 32, MIN_BLOCKS)
fp8_gemv_stream(const unsigned char* __restrict__ w, const float* __restrict__ w_scale,
                const void* __restrict__ x, const float* __restrict__ x_scale,
                const u16* __restrict__ bias, u16* __restrict__ out, int units,
                const u16* __restrict__ res, u16* __restrict__ res_out,
                const u16* __restrict__ norm_w, float eps, float* __restrict__ amax_out,
                const void* __restrict__ pos, const void* __restrict__ slot,
                const float* __restrict__ cos_sin, int cs_stride, u16* __restrict__ k_cache,
                u16* __restrict__ v_cache) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* xs = smem + XS_OFF;
    float* wss = reinterpret_cast<float*>(smem + WS_OFF);
    float* bss = reinterpret_cast<float*>(smem + BS_OFF);  // HAS_BIAS only
    float(*partial)[NWARPS][16] = reinterpret_cast<float(*)[NWARPS][16]>(smem + PART_OFF);
    const u32 ring = smem_addr(smem), full = smem_addr(smem + BAR_OFF);
    const u32 empty = full + 8 * STAGES;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int u0 = (int)((long long)blockIdx.x * units / gridDim.x);
    const int u1 = (int)((long long)(blockIdx.x + 1) * units / gridDim.x);
#if EARLY_TRIGGER
    launch_dependents();
#endif
    ring_init(full, empty, STAGES, NWARPS);

    if (warp == NWARPS) {  // the producer: weights only, so it need not wait
#if PREFILL_STAGES == 0
        grid_dependency_wait();
#endif
        int s = 0, issued = 0;
        u32 phase = 0;
        for (int u = u0; u < u1; ++u) {
            const unsigned char* src = w + (size_t)unit_row(u, lane & 15, units) * K;
            for (int c = 0; c < CHUNKS; ++c) {
#if PREFILL_STAGES > 0
                // past its prefill the producer waits for the previous kernel too: a smaller
                // burst in front of the row kernels' loads
                if (issued++ == PREFILL_STAGES) grid_dependency_wait();
#endif
                mbar_wait(empty + 8 * s, phase ^ 1);
                if (lane == 0) mbar_expect_tx(full + 8 * s, 16 * KC);
                __syncwarp();
                if (lane < 16)
                    bulk_copy(ring + s * STAGE_BYTES + lane * PITCH, src + c * KC, KC,
                              full + 8 * s);
                if (++s == STAGES) {
                    s = 0;
                    phase ^= 1;
                }
            }
        }
        return;
    }

    // the epilogue's constants before the wait (weights and step inputs, not the previous
    // kernel's output)
#if ROTARY
    float* css = reinterpret_cast<float*>(smem + CS_OFF);
#if POS64
    const long long p = *reinterpret_cast<const long long*>(pos);
#else
    const long long p = *reinterpret_cast<const int*>(pos);
#endif
#if SLOT64
    const long long slot_id = *reinterpret_cast<const long long*>(slot);
#else
    const long long slot_id = *reinterpret_cast<const int*>(slot);
#endif
#endif
    for (int i = threadIdx.x; i < (u1 - u0) * 16; i += NTC) {
        const int row = unit_row(u0 + i / 16, i % 16, units);
        wss[i] = w_scale[row];
#if HAS_BIAS
        bss[i] = bias_to_f32(bias, row);
#endif
#if ROTARY
        // row d of a head's first half: cos(p f_d), its partner d + HD / 2: sin(p f_d)
        css[i] = cos_sin[p * cs_stride + row % HD];
#endif
    }
#if X_MODE == 3
    u32 nw[RUN / 2];  // the norm weight (a constant) before the wait too
#pragma unroll
    for (int j = 0; j < RUNS_T; ++j) {
        const uint4 v = *reinterpret_cast<const uint4*>(norm_w + 8 * RUN_AT(j));
        nw[4 * j] = v.x; nw[4 * j + 1] = v.y; nw[4 * j + 2] = v.z; nw[4 * j + 3] = v.w;
    }
#endif
    grid_dependency_wait();
#if X_MODE < 3
    const float scale = stage_x<K, NTC>(xs, x, x_scale, threadIdx.x);
#else
    float* red = reinterpret_cast<float*>(smem + RED_OFF);
    u32 y[RUN / 2];
    // every load before any use: one L2 round trip for the row, not one a 16-byte run
#if X_MODE == 3
    uint4 xv[RUN / 8];
#if HAS_RES
    uint4 rv[RUN / 8];
#endif
#pragma unroll
    for (int j = 0; j < RUN / 8; ++j) {
        xv[j] = ld_cg(reinterpret_cast<const u16*>(x) + 8 * RUN_AT(j));
#if HAS_RES
        rv[j] = ld_cg(res + 8 * RUN_AT(j));
#endif
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < RUN / 8; ++j) {
        float h[8];
        unpack8(xv[j], h);
#if HAS_RES
        float r[8];
        unpack8(rv[j], r);
#pragma unroll
        for (int i = 0; i < 8; ++i) h[i] = round_x(h[i] + r[i]);  // as `x + residual`
#endif
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
            ss += h[i] * h[i] + h[i + 1] * h[i + 1];
            y[4 * j + i / 2] = pack2(h[i], h[i + 1]);
        }
#if HAS_RES
        // every CTA holds the sum; CTA b stores runs b, b + G, ...
        if (RUN_AT(j) % gridDim.x == blockIdx.x)
            *reinterpret_cast<uint4*>(res_out + 8 * RUN_AT(j)) =
                make_uint4(y[4 * j], y[4 * j + 1], y[4 * j + 2], y[4 * j + 3]);
#endif
    }
    const float rstd = rsqrtf(consumers_reduce<0, NTC>(ss, red) / K + eps);
#pragma unroll
    for (int i = 0; i < RUN / 2; ++i) {
        const float lo = round_x(round_x(lo_to_f32(y[i]) * rstd) * lo_to_f32(nw[i]));
        const float hi = round_x(round_x(hi_to_f32(y[i]) * rstd) * hi_to_f32(nw[i]));
        y[i] = pack2(lo, hi);
    }
#elif X_MODE == 4
    uint4 gv[RUN / 8], uv[RUN / 8];
#pragma unroll
    for (int j = 0; j < RUN / 8; ++j) {
        gv[j] = ld_cg(reinterpret_cast<const u16*>(x) + 8 * RUN_AT(j));
        uv[j] = ld_cg(reinterpret_cast<const u16*>(x) + K + 8 * RUN_AT(j));
    }
#pragma unroll
    for (int j = 0; j < RUN / 8; ++j) {
        float g[8], u[8];
        unpack8(gv[j], g);
        unpack8(uv[j], u);
#pragma unroll
        for (int i = 0; i < 8; i += 2)  // fast division, as Triton's (kernels/activation.py)
            y[4 * j + i / 2] = pack2(__fdividef(g[i], 1.0f + __expf(-g[i])) * u[i],
                                     __fdividef(g[i + 1], 1.0f + __expf(-g[i + 1])) * u[i + 1]);
    }
#else
#pragma unroll
    for (int j = 0; j < RUN / 8; ++j) {
        const uint4 v = ld_cg(reinterpret_cast<const u16*>(x) + 8 * RUN_AT(j));
        y[4 * j] = v.x; y[4 * j + 1] = v.y; y[4 * j + 2] = v.z; y[4 * j + 3] = v.w;
    }
#endif
    const float scale = quantize_run(y, xs, red);
#endif
    consumers_sync();

    const int g = lane >> 2, t = lane & 3;
    int s = 0, buf = 0;
    u32 phase = 0;
#if GATED
    float amax = 0.0f;  // threads 0-7: their outputs' max |value|
#endif
    for (int u = u0; u < u1; ++u) {
        float acc0 = 0.0f, acc8 = 0.0f;
        for (int c = 0; c < CHUNKS; ++c) {
            mbar_wait(full + 8 * s, phase);
            stage_mma<PITCH, STEPS>(smem + s * STAGE_BYTES, xs + c * KC, acc0, acc8);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + 8 * s);
            if (++s == STAGES) {
                s = 0;
                phase ^= 1;
            }
        }
        if (t == 0) {
            partial[buf][warp][g] = acc0;
            partial[buf][warp][g + 8] = acc8;
        }
        consumers_sync();
#if GATED
        if (threadIdx.x < 8) {
            const int r = (u - u0) * 16 + threadIdx.x;
            // the GEMM's output rounding, then SiLU x up's
            const float gate = out_to_f32(to_out(
                unit_output(partial[buf], threadIdx.x, r, scale, wss, bss)));
            const float up = out_to_f32(to_out(
                unit_output(partial[buf], threadIdx.x + 8, r + 8, scale, wss, bss)));
            const u16 a = to_out(__fdividef(gate, 1.0f + __expf(-gate)) * up);
            out[8 * u + threadIdx.x] = a;
            amax = fmaxf(amax, fabsf(out_to_f32(a)));
        }
#elif ROTARY
        if (threadIdx.x < 8) {
            const int r = (u - u0) * 16 + threadIdx.x;
            // the GEMM's output rounding, then the rotation's
            float a = out_to_f32(to_out(
                unit_output(partial[buf], threadIdx.x, r, scale, wss, bss)));
            float b = out_to_f32(to_out(
                unit_output(partial[buf], threadIdx.x + 8, r + 8, scale, wss, bss)));
            const int row = unit_row(u, threadIdx.x, units), head = row / HD, d = row % HD;
            if (head < HQ + HKV) {  // q and k: rotate-half, x * cos + cat(-x2, x1) * sin
                const float c = css[r], sn = css[r + 8];
                const float r1 = __fmaf_rn(a, c, -__fmul_rn(b, sn));
                const float r2 = __fmaf_rn(b, c, __fmul_rn(a, sn));
                a = r1;
                b = r2;
            }
            const u16 o1 = to_out(a), o2 = to_out(b);
            out[row] = o1;
            out[row + HD / 2] = o2;
            if (head >= HQ && slot_id >= 0) {  // k and v heads into the cache
                const long long blk = slot_id / BLOCK_SIZE, off = slot_id % BLOCK_SIZE;
                u16* dst;
                if (head < HQ + HKV)
                    dst = k_cache + blk * (long long)KS0 + off * (long long)KS1
                          + (long long)(head - HQ) * KS2 + (long long)d * KS3;
                else
                    dst = v_cache + blk * (long long)VS0 + off * (long long)VS1
                          + (long long)(head - HQ - HKV) * VS2 + (long long)d * VS3;
                dst[0] = o1;
                dst[(long long)(HD / 2) * (head < HQ + HKV ? KS3 : VS3)] = o2;
            }
        }
#else
        if (threadIdx.x < 16)
            out[16 * u + threadIdx.x] = to_out(unit_output(
                partial[buf], threadIdx.x, (u - u0) * 16 + threadIdx.x, scale, wss, bss));
#endif
        buf ^= 1;  // the other buffer next: no second barrier before this one is rewritten
    }
#if GATED
    if (warp == 0) {  // |values| order as their bits: one integer max a CTA
#pragma unroll
        for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (lane == 0 && u1 > u0)
            atomicMax(reinterpret_cast<int*>(amax_out), __float_as_int(amax));
    }
#endif
#if !EARLY_TRIGGER
    launch_dependents();
#endif
}
