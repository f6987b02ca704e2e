// One token's decoder layer from the attention output to the MLP output, in one persistent
// launch (FP8 weights, per-token FP8 activations, batch 1, one tensor-parallel rank):
//
//   residual <- (attn . Wo^T) + residual                     (o projection, in place)
//   x        <- RMSNorm(residual) * norm_w                   (post-attention norm)
//   act      <- SiLU(x . Wg^T) * (x . Wu^T)                  (gate | up, SiLU x up)
//   out      <- act . Wd^T                                   (down projection)
//
// Each activation is quantized per token to E4M3 from its row's amax before its GEMV, with
// the formulas and roundings of the separate kernels (the o GEMV of fp8_gemv_cuda.cu in
// X_MODE 1, kernels/fp8_fused.py's add + RMSNorm + quantize, kernels/activation.py's SiLU x
// up): outputs rounded to the model dtype where those kernels store them.
//
// Why one launch: at batch 1 every GEMV is a short weight stream, and each kernel boundary
// (with the row kernels between them) leaves DRAM idle while the next kernel ramps up, ~2 us
// each (PERF_NOTES.md, seventh to tenth sessions). Here one CTA a SM streams all three
// weights through a ring of registers that runs on across the phases: the next phase's first
// weights are loaded before the grid barrier that makes its input ready, so the barrier and
// the row work (the norm) overlap DRAM traffic.
//
// Work split: a CTA takes 16-row tiles (o, down: tiles cta, cta + G, ...; gate | up: pairs of
// a 16-row gate tile and its up tile); its NWARPS warps split each tile's K in 128-byte steps
// (warp w takes steps w, w + NWARPS, ...). A lane's 16-byte runs of rows g / g + 8 feed
// `mma.m16n8k32.e4m3` as in fp8_gemv_cuda.cu. Each warp's per-tile sums go to shared memory
// and are added over the warps in a fixed order after the phase's stream.
//
// Grid barriers: a 64-bit counter in global memory that only grows (2 G a launch), so no
// reset is needed; a CTA derives this launch's base from the value it reads at its start
// (before it arrives anywhere, the counter is within [2 G L, 2 G L + G)). All G CTAs must be
// resident at once: the host launches one CTA a SM, and a CTA takes a whole SM's registers.
//
// Compile-time parameters (NVRTC -D): H (hidden), Q (o input), I (intermediate), NWARPS,
// DEPTH (items in the register ring: one item is a warp's 128-byte step of 16 rows), PREFETCH
// (items a warp asks into L2 beyond the ring before each grid barrier), MAX_TILES
// (tiles a CTA takes in one phase, at most), X_T = OUT_T (0 bfloat16, 1 float16), TIMING
// (1: each CTA's thread 0 writes %globaltimer at 10 points to timing[cta * 10 + k], for
// scripts/bench_decode_mlp.py; 0 in the engine).

#include "fp8_mma.cuh"

#define NT (NWARPS * 32)
static_assert(Q % (128 * NWARPS) == 0 && H % (128 * NWARPS) == 0 && I % (128 * NWARPS) == 0,
              "every K must split into 128-byte steps per warp");
static_assert(H % 16 == 0 && I % 16 == 0, "rows come in tiles of 16");
static_assert(H % (8 * NT) == 0 && Q % 8 == 0 && I % 8 == 0, "rows are read 8 values a thread");
static_assert(X_T == OUT_T, "one model dtype");

typedef unsigned long long u64;

#if TIMING
#define STAMP(k)                                                                         \
    if (threadIdx.x == 0) {                                                              \
        u64 now;                                                                         \
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));                          \
        timing[blockIdx.x * 10 + (k)] = now;                                             \
    }
#else
#define STAMP(k)
#endif

struct Item {
    uint4 v[4];  // rows g, g (+64 bytes), g + 8, g + 8 (+64 bytes)
};

// The weight a phase streams: KIND 0 plain tiles (cta + G m), KIND 1 gate | up pairs (m even:
// the gate tile of pair cta + G (m / 2), m odd: its up tile, I rows further).
template <int K, int KIND>
struct Phase {
    const unsigned char* w;
    int items;   // this warp's real items (tiles x steps a warp)
    int padded;  // items rounded up to DEPTH: every phase starts at ring slot 0
    static constexpr int SPW = K / 128 / NWARPS;  // steps a warp takes of one tile
};

// Row 0 of item i's 16 rows at its 128-byte step.
template <int K, int KIND>
__device__ __forceinline__ const unsigned char* item_base(const Phase<K, KIND>& ph, int i,
                                                          int cta, int G) {
    constexpr int SPW = Phase<K, KIND>::SPW;
    const int m = i / SPW, j = i - m * SPW;
    const int warp = threadIdx.x >> 5;
    const int row0 = KIND == 0 ? 16 * (cta + G * m) : 16 * (cta + G * (m >> 1)) + (m & 1) * I;
    return ph.w + (size_t)row0 * K + (size_t)(warp + NWARPS * j) * 128;
}

// This lane's 16-byte run of item i: row g = lane / 4, run t = lane % 4.
template <int K, int KIND>
__device__ __forceinline__ const unsigned char* item_address(const Phase<K, KIND>& ph, int i,
                                                             int cta, int G) {
    const int lane = threadIdx.x & 31;
    return item_base(ph, i, cta, G) + (size_t)(lane >> 2) * K + (lane & 3) * 16;
}

// Items [from, to) of this warp into L2 (no registers held): issued before a grid barrier so
// that DRAM keeps streaming the phase's weights while the barrier and the row work resolve
// and the register ring is full. Lane l takes row l / 2's 32-byte sectors (l % 2) and
// (l % 2) + 2.
template <int K, int KIND>
__device__ __forceinline__ void prefetch_l2(const Phase<K, KIND>& ph, int from, int to, int cta,
                                            int G) {
    const int lane = threadIdx.x & 31;
    to = to < ph.items ? to : ph.items;
    for (int i = from; i < to; ++i) {
        const unsigned char* p = item_base(ph, i, cta, G) + (size_t)(lane >> 1) * K + (lane & 1) * 32;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + 64));
    }
}

template <int K>
__device__ __forceinline__ void load_item(Item& it, const unsigned char* p) {
    it.v[0] = ld_weight(p);
    it.v[1] = ld_weight(p + 64);
    it.v[2] = ld_weight(p + 8 * (size_t)K);
    it.v[3] = ld_weight(p + 8 * (size_t)K + 64);
}

// Load virtual item i of the stream "phase A, then phase B" (B's items follow A's padded
// count) into `it`; padding and items past B's end load nothing.
template <int KA, int KINDA, int KB, int KINDB>
__device__ __forceinline__ void load_next(Item& it, const Phase<KA, KINDA>& a,
                                          const Phase<KB, KINDB>& b, int i, int cta, int G) {
    if (i < a.padded) {
        if (i < a.items) load_item<KA>(it, item_address(a, i, cta, G));
    } else if (i - a.padded < b.items) {
        load_item<KB>(it, item_address(b, i - a.padded, cta, G));
    }
}

// Phase A's MMAs over its items (already in flight in `ring`), loading as it goes the items
// DEPTH ahead, which run into phase B's. Per-tile sums of this warp go to partial[m][warp].
template <int KA, int KINDA, int KB, int KINDB>
__device__ __forceinline__ void stream(Item (&ring)[DEPTH], const Phase<KA, KINDA>& a,
                                       const Phase<KB, KINDB>& b, const unsigned char* xs,
                                       float (*partial)[NWARPS][16], int cta, int G) {
    constexpr int SPW = Phase<KA, KINDA>::SPW;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    float acc0 = 0.0f, acc8 = 0.0f;
    for (int i0 = 0; i0 < a.padded; i0 += DEPTH) {
#pragma unroll
        for (int s = 0; s < DEPTH; ++s) {
            const int i = i0 + s;
            if (i < a.items) {
                const int m = i / SPW, j = i - m * SPW;
                const uint4* xp =
                    reinterpret_cast<const uint4*>(xs + (warp + NWARPS * j) * 128 + t * 16);
                const uint4 x0 = xp[0], x1 = xp[4];  // +64 bytes
                const Item& it = ring[s];
                mma_e4m3(acc0, acc8, it.v[0].x, it.v[2].x, it.v[0].y, it.v[2].y, x0.x, x0.y);
                mma_e4m3(acc0, acc8, it.v[0].z, it.v[2].z, it.v[0].w, it.v[2].w, x0.z, x0.w);
                mma_e4m3(acc0, acc8, it.v[1].x, it.v[3].x, it.v[1].y, it.v[3].y, x1.x, x1.y);
                mma_e4m3(acc0, acc8, it.v[1].z, it.v[3].z, it.v[1].w, it.v[3].w, x1.z, x1.w);
                if (j == SPW - 1) {
                    if (t == 0) {
                        partial[m][warp][g] = acc0;
                        partial[m][warp][g + 8] = acc8;
                    }
                    acc0 = acc8 = 0.0f;
                }
            }
            load_next(ring[s], a, b, i + DEPTH, cta, G);
        }
    }
}

// The per-tile sum over the warps, in a fixed order.
__device__ __forceinline__ float tile_sum(float (*partial)[NWARPS][16], int m, int r) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) s += partial[m][w][r];
    return s;
}

__device__ __forceinline__ float to_f32(u16 v) {
#if X_T == 0
    return __uint_as_float(((u32)v) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#endif
}

__device__ __forceinline__ float round_model(float v) { return to_f32(to_out(v)); }

__device__ __forceinline__ u16 ld_cg_u16(const u16* p) {
    u16 r;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}

// Two float32 values (lo at the lower address) times `inv`, clamped to +-448, as E4M3 codes.
__device__ __forceinline__ u32 e4m3_pair(float lo, float hi, float inv) {
    lo = fminf(fmaxf(__fmul_rn(lo, inv), -448.0f), 448.0f);
    hi = fminf(fmaxf(__fmul_rn(hi, inv), -448.0f), 448.0f);
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// Block-wide sum (op 0) or max (op 1) of one float a thread, the same value to every thread,
// in a fixed order (deterministic). `red` holds NWARPS floats.
template <int OP>
__device__ __forceinline__ float block_reduce(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = OP == 0 ? v + u : fmaxf(v, u);
    }
    __syncthreads();  // red may still be read by a previous reduction
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
#pragma unroll
    for (int w = 1; w < NWARPS; ++w) r = OP == 0 ? r + red[w] : fmaxf(r, red[w]);
    return r;
}

// The per-token scale from a row amax: max(amax / 448, 1e-12) (kernels/fp8_quant.py).
__device__ __forceinline__ float dynamic_scale(float amax) {
    return fmaxf(__fdiv_rn(amax, 448.0f), 1e-12f);
}

// Quantize n model-dtype values (8 a thread per pass, read at L2) into E4M3 in shared memory.
__device__ __forceinline__ void quantize_row(const u16* src, unsigned char* dst, int n,
                                             float inv) {
    for (int i = threadIdx.x; i < n / 8; i += NT) {
        const uint4 v = ld_cg(reinterpret_cast<const uint4*>(src) + i);
        uint2 q;
        q.x = quantize_pair(v.x, inv) | (quantize_pair(v.y, inv) << 16);
        q.y = quantize_pair(v.z, inv) | (quantize_pair(v.w, inv) << 16);
        reinterpret_cast<uint2*>(dst)[i] = q;
    }
}

__device__ __forceinline__ void grid_barrier(u64* counter, u64 target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // this CTA's writes (made visible to thread 0 by the bar) go first
        atomicAdd(counter, 1ull);
        u64 v;
        do {
            asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(counter) : "memory");
        } while (v < target);
        __threadfence();
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(NT, 1)
fp8_decode_mlp(const u16* __restrict__ attn, const float* __restrict__ attn_amax,
               const unsigned char* __restrict__ wo, const float* __restrict__ wo_s,
               u16* residual, const u16* __restrict__ norm_w, float eps,
               const unsigned char* __restrict__ wgu, const float* __restrict__ wgu_s,
               const unsigned char* __restrict__ wd, const float* __restrict__ wd_s,
               u16* act, float* act_amax, u64* counter, u16* __restrict__ out,
               u64* timing) {
    __shared__ __align__(16) unsigned char xs_od[Q > I ? Q : I];  // o's input, later down's
    __shared__ __align__(16) unsigned char xs_gu[H];
    __shared__ float partial[MAX_TILES][NWARPS][16];
    __shared__ float red[NWARPS];
    const int cta = blockIdx.x, G = gridDim.x;

    // this CTA's tiles in each phase, and this warp's items (every warp takes SPW steps of
    // every tile)
    const int o_tiles = (H / 16 - cta + G - 1) / G;
    const int gu_tiles = 2 * ((I / 16 - cta + G - 1) / G);
    const int d_tiles = o_tiles;
    const Phase<Q, 0> po{wo, o_tiles * Phase<Q, 0>::SPW,
                         (o_tiles * Phase<Q, 0>::SPW + DEPTH - 1) / DEPTH * DEPTH};
    const Phase<H, 1> pgu{wgu, gu_tiles * Phase<H, 1>::SPW,
                          (gu_tiles * Phase<H, 1>::SPW + DEPTH - 1) / DEPTH * DEPTH};
    const Phase<I, 0> pd{wd, d_tiles * Phase<I, 0>::SPW,
                         (d_tiles * Phase<I, 0>::SPW + DEPTH - 1) / DEPTH * DEPTH};
    const Phase<I, 0> none{wd, 0, 0};

    // the weights do not depend on the previous kernel: the ring fills before the wait
    STAMP(0);
    Item ring[DEPTH];
#pragma unroll
    for (int s = 0; s < DEPTH; ++s) load_next(ring[s], po, pgu, s, cta, G);
    grid_dependency_wait();
    STAMP(1);

    u64 base = 0;
    if (threadIdx.x == 0) {
        u64 v;
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(counter) : "memory");
        base = v - v % (2ull * G);
        if (cta == 0) *act_amax = 0.0f;  // read after barrier 2, maxed into after barrier 1
    }

    // ---- o projection: attn quantized from its row amax, residual added in place ----------
    const float o_scale = dynamic_scale(ld_cg_f32(attn_amax));
    quantize_row(attn, xs_od, Q, __frcp_rn(o_scale));
    __syncthreads();
    stream(ring, po, pgu, xs_od, partial, cta, G);
    prefetch_l2(pgu, DEPTH, DEPTH + PREFETCH, cta, G);
    __syncthreads();
    STAMP(2);
    for (int r = threadIdx.x; r < 16 * o_tiles; r += NT) {
        const int m = r >> 4, n = 16 * (cta + G * m) + (r & 15);
        const float y = round_model(tile_sum(partial, m, r & 15) * o_scale * wo_s[n]);
        residual[n] = to_out(y + to_f32(ld_cg_u16(residual + n)));
    }
    grid_barrier(counter, base + G);
    STAMP(3);

    // ---- post-attention RMSNorm of the new residual, quantized for gate | up ----------------
    // (kernels/fp8_fused.py's roundings: normed = (h * rstd) in the model dtype, times the
    // weight, rounded again; the row's amax of that; E4M3 codes of y * (1 / scale))
    float gu_scale;
    {
        constexpr int RUNS = H / (8 * NT);  // 16-byte runs of the row a thread
        float y[RUNS][8];
        float ss = 0.0f;
#pragma unroll
        for (int r = 0; r < RUNS; ++r) {
            const uint4 v = ld_cg(reinterpret_cast<const uint4*>(residual) + threadIdx.x + r * NT);
            const u32 w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                y[r][2 * e] = lo_to_f32(w4[e]);
                y[r][2 * e + 1] = hi_to_f32(w4[e]);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += y[r][e] * y[r][e];
        }
        const float rstd = rsqrtf(block_reduce<0>(ss, red) / H + eps);
        float amax = 0.0f;
#pragma unroll
        for (int r = 0; r < RUNS; ++r) {
            const uint4 wv = reinterpret_cast<const uint4*>(norm_w)[threadIdx.x + r * NT];
            const u32 ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                y[r][2 * e] = round_model(round_model(y[r][2 * e] * rstd) * lo_to_f32(ww[e]));
                y[r][2 * e + 1] =
                    round_model(round_model(y[r][2 * e + 1] * rstd) * hi_to_f32(ww[e]));
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(y[r][e]));
        }
        gu_scale = dynamic_scale(block_reduce<1>(amax, red));
        const float inv = __frcp_rn(gu_scale);
#pragma unroll
        for (int r = 0; r < RUNS; ++r) {
            uint2 q;
            q.x = e4m3_pair(y[r][0], y[r][1], inv) | (e4m3_pair(y[r][2], y[r][3], inv) << 16);
            q.y = e4m3_pair(y[r][4], y[r][5], inv) | (e4m3_pair(y[r][6], y[r][7], inv) << 16);
            reinterpret_cast<uint2*>(xs_gu)[threadIdx.x + r * NT] = q;
        }
    }
    __syncthreads();
    STAMP(4);

    // ---- gate | up, SiLU x up, its amax ---------------------------------------------------
    stream(ring, pgu, pd, xs_gu, partial, cta, G);
    prefetch_l2(pd, DEPTH, DEPTH + PREFETCH, cta, G);
    __syncthreads();
    STAMP(5);
    float amax = 0.0f;
    for (int r = threadIdx.x; r < 8 * gu_tiles; r += NT) {  // 16 rows a pair of tiles
        const int p = r >> 4, k = 16 * (cta + G * p) + (r & 15);
        const float gate = round_model(tile_sum(partial, 2 * p, r & 15) * gu_scale * wgu_s[k]);
        const float up =
            round_model(tile_sum(partial, 2 * p + 1, r & 15) * gu_scale * wgu_s[I + k]);
        const float a = round_model(gate / (1.0f + __expf(-gate)) * up);
        act[k] = to_out(a);
        amax = fmaxf(amax, fabsf(a));
    }
    amax = block_reduce<1>(amax, red);
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(act_amax), __float_as_int(amax));
    grid_barrier(counter, base + 2ull * G);
    STAMP(6);

    // ---- down projection: act quantized from its amax --------------------------------------
    const float d_scale = dynamic_scale(ld_cg_f32(act_amax));
    quantize_row(act, xs_od, I, __frcp_rn(d_scale));
    __syncthreads();
    STAMP(7);
    stream(ring, pd, none, xs_od, partial, cta, G);
    launch_dependents();
    __syncthreads();
    STAMP(8);
    for (int r = threadIdx.x; r < 16 * d_tiles; r += NT) {
        const int m = r >> 4, n = 16 * (cta + G * m) + (r & 15);
        out[n] = to_out(tile_sum(partial, m, r & 15) * d_scale * wd_s[n]);
    }
    STAMP(9);
}
