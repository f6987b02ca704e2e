// One decode step of a Llama-family stage at batch 1, every layer in one persistent launch
// (FP8 weights with per-output-channel scales, per-token FP8 activations, a model-dtype
// paged KV cache, one tensor- and pipeline-parallel rank). Per layer:
//
//   x    = quant(RMSNorm(h) * ln1)                          h: the residual stream
//   qkv  = x . Wqkv^T                                       (rounded to the model dtype)
//   q, k = RoPE(q, k); k, v -> the cache slot of the new token
//   a    = softmax(q k^T * scale) v over the cached keys    (flash-decoding partitions)
//   h    = h + a . Wo^T
//   x    = quant(RMSNorm(h) * ln2)
//   act  = SiLU(x . Wg^T) * (x . Wu^T)
//   h    = h + act . Wd^T
//
// with the roundings of the separate kernels the engine otherwise runs (kernels/fp8_fused.py
// norm + quantize, rotary.py, activation.py, the FP8 GEMV epilogues): values are rounded to
// the model dtype where those kernels store them. Attention and GEMV sums run in a different
// order, so results agree to float32 rounding, not bit for bit.
//
// Why one launch: at batch 1 a step is 32 x 4 short weight streams with latency-bound row
// work between them; with one kernel each, DRAM idles at every boundary while the next kernel
// ramps up and the row kernels run (~20 us a layer on an H200, PERF_NOTES.md, sessions 7-15).
// Here a producer warp in every CTA streams the weights of every layer with TMA bulk copies
// into a ring of shared-memory stages from the kernel's first instruction to its last; weights
// depend on nothing the kernel computes, so the producer never waits for the row work, the
// attention or the grid barriers, only for a free stage. The consumer warps do the MMAs, the
// row work and the barriers, and find the next weights already in shared memory.
//
// Work split: the weights come in units of 16 output rows (one m16n8k32 MMA tile) over a
// range of K; a unit's K is copied in stages of KC bytes a row. Producers take units from a
// global counter per (layer, projection), the next one requested while the current one's
// copies are issued, so SMs that stream faster take more (a static split waits for the
// slowest SM at every barrier: PERF_NOTES.md, eleventh session). The row work every phase
// begins with (residual add, norm, quantize, attention merge) is done by every CTA for the
// whole row (a few KB from L2), so it needs no barrier of its own; each CTA keeps the
// residual stream in its shared memory. Five grid barriers a layer: after qkv, attention,
// o, gate | up and down.
//
// Tiles: gate | up units are 8 gate rows (MMA rows g) with the matching 8 up rows (g + 8),
// so a lane holds both sums of an output and SiLU x up is the unit's epilogue. The down
// projection's K is split DS ways (units of 16 rows x I / DS) into float32 partial sums
// that the next phase adds up. Attention: items (KV head, partition of the keys), one CTA
// each; the new token's K / V go to the cache from the item that holds its position.
//
// All CTAs must be resident together (grid barriers): one CTA a SM, launched cooperatively.
// Compile-time parameters (NVRTC -D): H, I, HQ, HKV, D (128), BS (cache block size), NWARPS
// (consumer warps), KC, STAGES, DS, P_MAX (attention partitions at most, HKV * P_MAX <= grid),
// PART_MIN (keys a partition at least). Model dtype bfloat16.

#include "cuda_common.cuh"

#define QD (HQ * D)
#define NQKV (QD + 2 * HKV * D)
#define GQA (HQ / HKV)
#define NTC (NWARPS * 32)
#define STEPS (KC / 128 / NWARPS)
#define PITCH (KC + 64)  // rows g and g + 1 of a stage in other banks
#define STAGE_BYTES (16 * PITCH)

static_assert(D == 128, "attention lanes hold 4 of 128 dims");
static_assert(KC % (128 * NWARPS) == 0, "a stage splits into 128-byte steps per warp");
static_assert(H % KC == 0 && QD % KC == 0 && (I / DS) % KC == 0 && I % DS == 0,
              "every K splits into stages");
static_assert(H % (8 * NTC) == 0 && QD % (8 * NTC) == 0 && I % (8 * NTC) == 0,
              "rows split into 8-value runs a consumer thread");
static_assert(NQKV % 16 == 0 && H % 16 == 0 && I % 8 == 0, "units of 16 rows");
static_assert(GQA * D <= 2 * NTC, "an attention item's outputs: two a thread");

struct LayerWeights {
    const unsigned char* wqkv;
    const float* sqkv;
    const unsigned char* wo;
    const float* so;
    const unsigned char* wgu;
    const float* sgu;
    const unsigned char* wd;
    const float* sd;
    const u16* ln1;
    const u16* ln2;
    u16* kc;
    u16* vc;
};

#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no math.h

// TIMING (scripts/bench_decode_step.py): %globaltimer stamps of layer TIMING_LAYER, NSTAMP a
// CTA (consumers: 0-13 at its phase boundaries; producer: 14 at the layer's first copy, 15
// after its last); 0 in the engine.
#ifndef TIMING
#define TIMING 0
#endif
#define NSTAMP 16
#if TIMING
#define STAMP(k)                                                                           \
    if (li == TIMING_LAYER && (threadIdx.x == 0 || threadIdx.x == NTC)) {                                   \
        u64 now;                                                                           \
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));                            \
        timing[blockIdx.x * NSTAMP + (k)] = now;                                           \
    }
#else
#define STAMP(k)
#endif

enum { PH_QKV = 0, PH_O = 1, PH_GU = 2, PH_DN = 3 };

// ---- memory helpers ------------------------------------------------------------------------
__device__ __forceinline__ uint2 ld_cg2(const void* p) {
    uint2 r;
    asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 to_bf(float y) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(y));
    return r;
}
__device__ __forceinline__ float round_bf(float v) { return bf(to_bf(v)); }
// Eight model-dtype values (16 bytes, lowest address first) as float32.
__device__ __forceinline__ void unpack8(uint4 v, float* y) {
    const u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        y[2 * i] = bf_lo(p[i]);
        y[2 * i + 1] = bf_hi(p[i]);
    }
}
__device__ __forceinline__ u32 pack_bf(float lo, float hi) {
    return (u32)to_bf(lo) | ((u32)to_bf(hi) << 16);
}

// Two float32 values (lo at the lower address) times `inv`, clamped to +-448, as E4M3 codes
// (kernels/fp8_quant.py's formula).
__device__ __forceinline__ u32 e4m3_pair(float lo, float hi, float inv) {
    lo = fminf(fmaxf(__fmul_rn(lo, inv), -448.0f), 448.0f);
    hi = fminf(fmaxf(__fmul_rn(hi, inv), -448.0f), 448.0f);
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// ---- shared-memory pipeline ------------------------------------------------------------------
__device__ __forceinline__ void consumers_sync() { consumers_bar<NTC>(); }

// Every CTA's consumers arrive; returns when all G have. `target` = G x (barriers so far + 1).
__device__ __forceinline__ void grid_barrier(u32* counter, u32 target) {
    consumers_sync();
    if (threadIdx.x == 0) {
        __threadfence();  // this CTA's writes (ordered before thread 0 by the bar) go first
        atomicAdd(counter, 1u);
        while (ld_acquire(counter) < target) {
        }
        __threadfence();
    }
    consumers_sync();
}

__device__ __forceinline__ float dynamic_scale(float amax) {  // kernels/fp8_quant.py
    return fmaxf(__fdiv_rn(amax, 448.0f), 1e-12f);
}

// N values, RUN = N / NTC contiguous ones a consumer thread, held as float32 in `y`: their
// amax over the row, then E4M3 codes into xs. Returns the dequantizing scale.
template <int RUN>
__device__ __forceinline__ float quantize_row(const float (&y)[RUN], unsigned char* xs,
                                              float* red) {
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < RUN; ++e) amax = fmaxf(amax, fabsf(y[e]));
    const float scale = dynamic_scale(consumers_reduce<1, NTC>(amax, red));
    const float inv = __frcp_rn(scale);
#pragma unroll
    for (int e = 0; e < RUN; e += 8) {
        uint2 q;
        q.x = e4m3_pair(y[e], y[e + 1], inv) | (e4m3_pair(y[e + 2], y[e + 3], inv) << 16);
        q.y = e4m3_pair(y[e + 4], y[e + 5], inv) | (e4m3_pair(y[e + 6], y[e + 7], inv) << 16);
        *reinterpret_cast<uint2*>(xs + threadIdx.x * RUN + e) = q;
    }
    return scale;
}

// RMSNorm of the residual stream hs (model dtype, in shared memory) times w, quantized into
// xs (kernels/fp8_fused.py's roundings: (h * rstd) rounded, times the weight, rounded).
__device__ __forceinline__ float norm_quantize(const u16* hs, const u16* __restrict__ w,
                                               float eps, unsigned char* xs, float* red) {
    constexpr int RUN = H / NTC;
    float y[RUN];
    float ss = 0.0f;
    const int base = threadIdx.x * RUN;
#pragma unroll
    for (int e = 0; e < RUN; e += 8)
        unpack8(*reinterpret_cast<const uint4*>(hs + base + e), y + e);
#pragma unroll
    for (int e = 0; e < RUN; ++e) ss += y[e] * y[e];
    const float rstd = rsqrtf(consumers_reduce<0, NTC>(ss, red) / H + eps);
#pragma unroll
    for (int e = 0; e < RUN; e += 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(w + base + e);
        const u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            y[e + 2 * i] = round_bf(round_bf(y[e + 2 * i] * rstd) * bf_lo(p[i]));
            y[e + 2 * i + 1] = round_bf(round_bf(y[e + 2 * i + 1] * rstd) * bf_hi(p[i]));
        }
    }
    return quantize_row<RUN>(y, xs, red);
}

// hs <- hs + delta (rounded to the model dtype, as `x + residual` in torch); delta is the sum
// of NP float32 rows (rounded first) or, with NP == 0, one model-dtype row.
template <int NP>
__device__ __forceinline__ void residual_add(u16* hs, const void* delta) {
    constexpr int RUN = H / NTC;
    const int base = threadIdx.x * RUN;
#pragma unroll
    for (int e = 0; e < RUN; e += 8) {
        float d[8];
        if (NP == 0) {
            unpack8(ld_cg(reinterpret_cast<const u16*>(delta) + base + e), d);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) d[i] = 0.0f;
#pragma unroll
            for (int s = 0; s < (NP > 0 ? NP : 1); ++s) {
                const float* src = reinterpret_cast<const float*>(delta) + s * H + base + e;
                const uint4 a = ld_cg(src), b = ld_cg(src + 4);
                d[0] += __uint_as_float(a.x); d[1] += __uint_as_float(a.y);
                d[2] += __uint_as_float(a.z); d[3] += __uint_as_float(a.w);
                d[4] += __uint_as_float(b.x); d[5] += __uint_as_float(b.y);
                d[6] += __uint_as_float(b.z); d[7] += __uint_as_float(b.w);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) d[i] = round_bf(d[i]);
        }
        uint4 v = *reinterpret_cast<const uint4*>(hs + base + e);
        v.x = pack_bf(bf_lo(v.x) + d[0], bf_hi(v.x) + d[1]);
        v.y = pack_bf(bf_lo(v.y) + d[2], bf_hi(v.y) + d[3]);
        v.z = pack_bf(bf_lo(v.z) + d[4], bf_hi(v.z) + d[5]);
        v.w = pack_bf(bf_lo(v.w) + d[6], bf_hi(v.w) + d[7]);
        *reinterpret_cast<uint4*>(hs + base + e) = v;
    }
}

// ---- the weight stream -----------------------------------------------------------------------
struct PhaseShape {
    int units, chunks, k;  // units, stages a unit, the weight's row length (bytes)
};

__device__ __forceinline__ PhaseShape phase_shape(int ph) {
    switch (ph) {
        case PH_QKV: return {NQKV / 16, H / KC, H};
        case PH_O: return {H / 16, QD / KC, QD};
        case PH_GU: return {I / 8, H / KC, H};
        default: return {(H / 16) * DS, I / DS / KC, I};
    }
}

// Weight row of MMA row r (0..15) of unit u.
__device__ __forceinline__ int unit_row(int ph, int u, int r) {
    if (ph == PH_GU) return r < 8 ? 8 * u + r : I + 8 * u + r - 8;
    if (ph == PH_DN) return 16 * (u / DS) + r;
    return 16 * u + r;
}

// Byte offset along K where unit u starts (the down projection's K split).
__device__ __forceinline__ int unit_k0(int ph, int u) {
    return ph == PH_DN ? (u % DS) * (I / DS) : 0;
}

__device__ __forceinline__ const unsigned char* phase_weight(const LayerWeights& L, int ph) {
    return ph == PH_QKV ? L.wqkv : ph == PH_O ? L.wo : ph == PH_GU ? L.wgu : L.wd;
}

// The producer warp: every layer's four weights, unit by unit, stage by stage. Lane r < 16
// copies row r of a stage (one bulk copy each, issued together). Each stage's (unit, chunk)
// goes to stage_unit[s] for the consumers; a stage with -1 and no copy ends a phase.
__device__ __forceinline__ const float* phase_scale(const LayerWeights& L, int ph) {
    return ph == PH_QKV ? L.sqkv : ph == PH_O ? L.so : ph == PH_GU ? L.sgu : L.sd;
}

__device__ void produce(const LayerWeights* __restrict__ layers, int num_layers, u32* work,
                        u32 ring, u32 side, u32 full, u32 empty, int* stage_unit,
                        u64* timing) {
    const int lane = threadIdx.x & 31;
    u32 it = 0;
    for (int li = 0; li < num_layers; ++li) {
        STAMP(14);
        const LayerWeights L = layers[li];
        for (int ph = 0; ph < 4; ++ph) {
            const PhaseShape sh = phase_shape(ph);
            const unsigned char* w = phase_weight(L, ph);
            const float* ws = phase_scale(L, ph);
            u32* ctr = work + 4 * li + ph;
            int cur = 0;
            if (lane == 0) cur = (int)atomicAdd(ctr, 1u);
            cur = __shfl_sync(0xffffffffu, cur, 0);
            while (cur < sh.units) {
                int nxt = 0;
                if (lane == 0) nxt = (int)atomicAdd(ctr, 1u);  // in flight while cur streams
                const unsigned char* src =
                    w + (size_t)unit_row(ph, cur, lane & 15) * sh.k + unit_k0(ph, cur);
                for (int c = 0; c < sh.chunks; ++c, ++it) {
                    const int s = it % STAGES;
                    const bool last = c == sh.chunks - 1;
                    mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
                    if (lane == 0) {
                        stage_unit[s] = cur * sh.chunks + c;
                        mbar_expect_tx(full + 8 * s, 16 * KC + (last ? 64 : 0));
                    }
                    __syncwarp();
                    if (lane < 16)
                        bulk_copy(ring + s * STAGE_BYTES + lane * PITCH, src + c * KC, KC,
                                  full + 8 * s);
                    // the unit's 16 weight scales with its last stage: the epilogue then reads
                    // shared memory, not DRAM (a global load there stalled its warp ~1 us a
                    // unit, and the ring with it)
                    if (last && ph == PH_GU && lane >= 16 && lane < 18)
                        bulk_copy(side + s * 64 + (lane - 16) * 32,
                                  ws + 8 * cur + (lane - 16) * I, 32, full + 8 * s);
                    else if (last && ph != PH_GU && lane == 16)
                        bulk_copy(side + s * 64, ws + unit_row(ph, cur, 0), 64, full + 8 * s);
                }
                cur = __shfl_sync(0xffffffffu, nxt, 0);
            }
            const int s = it % STAGES;
            mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
            if (lane == 0) {
                stage_unit[s] = -1;
                mbar_arrive(full + 8 * s);
            }
            __syncwarp();
            ++it;
        }
        STAMP(15);
    }
}

struct Scratch {
    u16* qkv;        // [NQKV] the qkv projection (rotated in the attention phase, not here)
    float* part;     // [P_MAX][HQ][D] attention partials (unnormalised)
    float* part_ml;  // [P_MAX][HQ][2] their running max (log2 domain) and sum
    u16* o;          // [H] the o projection
    u16* act;        // [I] SiLU(gate) x up
    float* down;     // [DS][H] the down projection's partial sums (scaled)
};

// Consumers: one phase's stages until its end mark; each unit's 16 sums over the warps (fixed
// order) go through the phase's epilogue. x: E4M3 at xs, dequantizing scale x_scale.
__device__ __forceinline__ void consume(int ph, u32& it, const unsigned char* ring,
                                        const float* side, u32 full, u32 empty,
                                        const int* stage_unit, const unsigned char* xs,
                                        float x_scale, float (*partial)[NWARPS][16],
                                        const Scratch& S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const PhaseShape sh = phase_shape(ph);
    float acc0 = 0.0f, acc8 = 0.0f;
    int buf = 0;
    for (;; ++it) {
        const int s = it % STAGES;
        mbar_wait(full + 8 * s, (it / STAGES) & 1);
        const int id = stage_unit[s];
        if (id < 0) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + 8 * s);
            ++it;
            return;
        }
        const int u = id / sh.chunks, c = id % sh.chunks;
        stage_mma<PITCH, STEPS>(ring + s * STAGE_BYTES, xs + unit_k0(ph, u) + c * KC, acc0,
                                acc8);
        float ws0 = 0.0f, ws1 = 0.0f;
        const bool last = c == sh.chunks - 1;
        if (last && threadIdx.x < 16) {  // the unit's scales, in the stage's side slot
            ws0 = side[s * 16 + threadIdx.x];
            ws1 = side[s * 16 + ((threadIdx.x + 8) & 15)];
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * s);
        if (last) {
            if (t == 0) {
                partial[buf][warp][g] = acc0;
                partial[buf][warp][g + 8] = acc8;
            }
            acc0 = acc8 = 0.0f;
            consumers_sync();
            if (threadIdx.x < 16) {
                const int r = threadIdx.x;
                float sum = 0.0f, sum8 = 0.0f;
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) {
                    sum += partial[buf][w][r];
                    if (ph == PH_GU) sum8 += partial[buf][w][(r + 8) & 15];
                }
                if (ph == PH_QKV) {
                    S.qkv[unit_row(ph, u, r)] = to_bf(sum * x_scale * ws0);
                } else if (ph == PH_O) {
                    S.o[unit_row(ph, u, r)] = to_bf(sum * x_scale * ws0);
                } else if (ph == PH_GU) {
                    if (r < 8) {  // gate scales are the slot's first 8, up scales its last 8
                        const float gate = round_bf(sum * x_scale * ws0);
                        const float up = round_bf(sum8 * x_scale * ws1);
                        S.act[8 * u + r] = to_bf(gate / (1.0f + __expf(-gate)) * up);
                    }
                } else {
                    S.down[(u % DS) * H + unit_row(ph, u, r)] = sum * x_scale * ws0;
                }
            }
            buf ^= 1;  // the other buffer next: no second barrier before it is rewritten
        }
    }
}

// ---- attention ---------------------------------------------------------------------------------
__device__ __forceinline__ int num_partitions(int seq_len) {
    const int p = (seq_len + PART_MIN - 1) / PART_MIN;
    return p < 1 ? 1 : (p > P_MAX ? P_MAX : p);
}

// RoPE on the 4 dims [4 lane, 4 lane + 4) of a head (the rotate-half partner is lane ^ 16),
// float32, rounded to the model dtype (rotary.py).
__device__ __forceinline__ void rope4(float (&x)[4], const float* cs, int lane) {
    const int half = D / 2, d0 = (lane * 4) % half;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float other = __shfl_xor_sync(0xffffffffu, x[i], 16);
        const float c = cs[d0 + i], s = cs[half + d0 + i];
        x[i] = round_bf(lane < 16 ? x[i] * c - other * s : x[i] * c + other * s);
    }
}

__device__ __forceinline__ void load4(float (&x)[4], const u16* p) {
    const uint2 v = ld_cg2(p);
    x[0] = bf_lo(v.x); x[1] = bf_hi(v.x); x[2] = bf_lo(v.y); x[3] = bf_hi(v.y);
}

__device__ __forceinline__ void unpack4(float (&x)[4], uint2 v) {
    x[0] = bf_lo(v.x); x[1] = bf_hi(v.x); x[2] = bf_lo(v.y); x[3] = bf_hi(v.y);
}

// The first KPRE cached keys a warp attends to are loaded before the layer's qkv phase (their
// block ids once a launch): cached rows do not depend on this step, and under the weight
// stream each DRAM round trip after the barrier cost ~2-3 us (stamps, PERF_NOTES.md).
#define KPRE 4
struct AttnItem {
    int j, p, start, end, cend;  // KV head, partition, keys [start, end), cached below cend
    long long off[KPRE];         // element offset of cached key i's row (-1: none)
};

struct KeyRows {
    uint2 k[KPRE], v[KPRE];
};

__device__ __forceinline__ void prefetch_keys(const LayerWeights& L, const AttnItem& it,
                                              KeyRows& rows) {
#pragma unroll
    for (int i = 0; i < KPRE; ++i) {
        if (it.off[i] >= 0) {
            rows.k[i] = ld_cg2(L.kc + it.off[i]);
            rows.v[i] = ld_cg2(L.vc + it.off[i]);
        }
    }
}

// Online softmax over one key for the warp's GQA heads (scores in the log2 domain).
__device__ __forceinline__ void attend(const float (&q)[GQA][4], const float (&kf)[4],
                                       const float (&vf)[4], float (&m)[GQA], float (&l)[GQA],
                                       float (&acc)[GQA][4]) {
    float sc[GQA];
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        float d = q[h][0] * kf[0];
#pragma unroll
        for (int i = 1; i < 4; ++i) d += q[h][i] * kf[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        sc[h] = d;
    }
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        const float mn = fmaxf(m[h], sc[h]);
        const float corr = exp2f(m[h] - mn), w = exp2f(sc[h] - mn);
        l[h] = l[h] * corr + w;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[h][i] = acc[h][i] * corr + w * vf[i];
        m[h] = mn;
    }
}

// One item: KV head j, keys [start, end) of the sequence; the GQA query heads of j. The new
// token (position pos, if in range) comes from the qkv row, rotated, and warp 0 writes it to
// the cache. Writes the item's partial (unnormalised sums, running max in the log2 domain,
// sum of weights).
__device__ __forceinline__ void attention_item(const LayerWeights& L, const AttnItem& it, const KeyRows& rows,
                               int pos, long long slot, const float* __restrict__ cos_sin,
                               const int* __restrict__ table, int kc_s0, int kc_s1,
                               float qk_scale, const Scratch& S, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = it.j;
    const float* cs = cos_sin + (size_t)pos * D;
    float q[GQA][4];
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        load4(q[h], S.qkv + (j * GQA + h) * D + lane * 4);
        rope4(q[h], cs, lane);
#pragma unroll
        for (int i = 0; i < 4; ++i) q[h][i] *= qk_scale;
    }
    float m[GQA], l[GQA], acc[GQA][4];
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        m[h] = NEG_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[h][i] = 0.0f;
    }
    if (warp == 0 && pos >= it.start && pos < it.end) {  // the new token's K / V
        float k[4], v[4];
        load4(k, S.qkv + QD + j * D + lane * 4);
        rope4(k, cs, lane);
        load4(v, S.qkv + QD + HKV * D + j * D + lane * 4);
        if (slot >= 0) {
            const long long blk = slot / BS, off = slot % BS;
            uint2 kw, vw;
            kw.x = pack_bf(k[0], k[1]); kw.y = pack_bf(k[2], k[3]);
            vw.x = pack_bf(v[0], v[1]); vw.y = pack_bf(v[2], v[3]);
            *reinterpret_cast<uint2*>(L.kc + blk * kc_s0 + off * kc_s1 + j * D + lane * 4) = kw;
            *reinterpret_cast<uint2*>(L.vc + blk * kc_s0 + off * kc_s1 + j * D + lane * 4) = vw;
        }
        attend(q, k, v, m, l, acc);
    }
#pragma unroll
    for (int i = 0; i < KPRE; ++i) {
        if (it.off[i] >= 0) {
            float kf[4], vf[4];
            unpack4(kf, rows.k[i]);
            unpack4(vf, rows.v[i]);
            attend(q, kf, vf, m, l, acc);
        }
    }
    // keys past the prefetched ones (long contexts): loaded here, U at a time
    constexpr int U = 4;
    for (int t0 = it.start + warp + KPRE * NWARPS; t0 < it.cend; t0 += U * NWARPS) {
        float kf[U][4], vf[U][4];
#pragma unroll
        for (int uu = 0; uu < U; ++uu) {
            const int t = t0 + uu * NWARPS;
            if (t < it.cend) {
                const long long off = (long long)table[t / BS] * kc_s0 + (t % BS) * kc_s1 +
                                      j * D + lane * 4;
                load4(kf[uu], L.kc + off);
                load4(vf[uu], L.vc + off);
            }
        }
#pragma unroll
        for (int uu = 0; uu < U; ++uu) {
            if (t0 + uu * NWARPS >= it.cend) break;
            attend(q, kf[uu], vf[uu], m, l, acc);
        }
    }
    // the warps' partials -> the item's (fixed order)
    float* sm = scratch;                      // [NWARPS][GQA]
    float* sl = sm + NWARPS * GQA;            // [NWARPS][GQA]
    float* sa = sl + NWARPS * GQA;            // [NWARPS][GQA][D]
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        if (lane == 0) {
            sm[warp * GQA + h] = m[h];
            sl[warp * GQA + h] = l[h];
        }
        *reinterpret_cast<float4*>(sa + (warp * GQA + h) * D + lane * 4) =
            make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    }
    consumers_sync();
    for (int e = threadIdx.x; e < GQA * D; e += NTC) {
        const int h = e / D, d = e % D;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, sm[w * GQA + h]);
        float num = 0.0f, den = 0.0f;
        if (mx != NEG_INF) {
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const float mw = sm[w * GQA + h];
                const float c = mw == NEG_INF ? 0.0f : exp2f(mw - mx);
                num += sa[(w * GQA + h) * D + d] * c;
                den += sl[w * GQA + h] * c;
            }
        }
        const int head = j * GQA + h;
        S.part[((size_t)it.p * HQ + head) * D + d] = num;
        if (d == 0) {
            S.part_ml[(it.p * HQ + head) * 2] = mx;
            S.part_ml[(it.p * HQ + head) * 2 + 1] = den;
        }
    }
}

// Every CTA: the partitions' partials -> the attention row (model dtype) -> E4M3 in xs.
// Returns the dequantizing scale.
__device__ __forceinline__ float merge_quantize(const Scratch& S, int np, unsigned char* xs,
                                                float* red) {
    constexpr int RUN = QD / NTC;
    const int base = threadIdx.x * RUN, head = base / D;
    // this thread's head: each partition's weight exp2(m_p - M) / sum_p l_p exp2(m_p - M)
    // (every thread of the head computes the same; one round trip for all partitions)
    float mp[P_MAX], lp[P_MAX];
#pragma unroll
    for (int p = 0; p < P_MAX; ++p) {
        if (p < np) {
            const uint2 v = ld_cg2(S.part_ml + (p * HQ + head) * 2);
            mp[p] = __uint_as_float(v.x);
            lp[p] = __uint_as_float(v.y);
        }
    }
    float mx = NEG_INF;
#pragma unroll
    for (int p = 0; p < P_MAX; ++p)
        if (p < np) mx = fmaxf(mx, mp[p]);
    float den = 0.0f;
#pragma unroll
    for (int p = 0; p < P_MAX; ++p) {
        if (p < np) {
            mp[p] = mp[p] == NEG_INF ? 0.0f : exp2f(mp[p] - mx);
            den += lp[p] * mp[p];
        }
    }
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;
    float y[RUN];
#pragma unroll
    for (int e = 0; e < RUN; ++e) y[e] = 0.0f;
#pragma unroll 4
    for (int p = 0; p < np; ++p) {
        float c = 0.0f;
#pragma unroll
        for (int q = 0; q < P_MAX; ++q)
            if (q == p) c = mp[q] * inv;
        const float* src = S.part + (size_t)p * QD + base;
#pragma unroll
        for (int e = 0; e < RUN; e += 4) {
            const uint4 v = ld_cg(src + e);
            y[e] += __uint_as_float(v.x) * c;
            y[e + 1] += __uint_as_float(v.y) * c;
            y[e + 2] += __uint_as_float(v.z) * c;
            y[e + 3] += __uint_as_float(v.w) * c;
        }
    }
#pragma unroll
    for (int e = 0; e < RUN; ++e) y[e] = round_bf(y[e]);
    return quantize_row<RUN>(y, xs, red);
}

// ---- shared memory -------------------------------------------------------------------------
#define ATT_SCRATCH (NWARPS * GQA * (D + 2) * 4)
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define XS_BYTES ((MAX2(MAX2(I, H), MAX2(QD, ATT_SCRATCH)) + 127) / 128 * 128)
#define OFF_SIDE (STAGES * STAGE_BYTES)
#define OFF_XS (OFF_SIDE + STAGES * 64)
#define OFF_HS (OFF_XS + XS_BYTES)
#define OFF_PARTIAL (OFF_HS + H * 2)
#define OFF_RED (OFF_PARTIAL + 2 * NWARPS * 16 * 4)
#define OFF_UNITS (OFF_RED + NWARPS * 4)
#define OFF_BARS ((OFF_UNITS + STAGES * 4 + 7) / 8 * 8)
#define SMEM_BYTES (OFF_BARS + 2 * STAGES * 8)

// The dynamic shared memory a launch needs (the host reads it from here).
extern "C" __global__ void decode_step_smem_bytes(int* out) { *out = SMEM_BYTES; }

// NOTE: one CTA a SM; with 8 + 1 warps three share one of the SM's four register-file
// quarters, so 168 registers a thread is the most (224 was refused by the cooperative launch).
extern "C" __global__ void __launch_bounds__(NTC + 32, 1)
fp8_decode_step(const LayerWeights* __restrict__ layers, int num_layers,
                const u16* __restrict__ hidden_in, u16* hidden_out, u16* residual_out,
                const int* __restrict__ seq_lens, const int* __restrict__ block_table,
                const long long* __restrict__ slot_mapping, const float* __restrict__ cos_sin,
                int kc_s0, int kc_s1, float eps, float qk_scale,
                u16* qkv, float* part, float* part_ml, u16* o, u16* act, float* down,
                u32* sync, u64* timing) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* xs = smem + OFF_XS;
    u16* hs = reinterpret_cast<u16*>(smem + OFF_HS);
    float (*partial)[NWARPS][16] = reinterpret_cast<float (*)[NWARPS][16]>(smem + OFF_PARTIAL);
    float* red = reinterpret_cast<float*>(smem + OFF_RED);
    int* stage_unit = reinterpret_cast<int*>(smem + OFF_UNITS);
    const float* side = reinterpret_cast<const float*>(smem + OFF_SIDE);
    const u32 ring = smem_addr(smem), full = smem_addr(smem + OFF_BARS);
    const u32 empty = full + 8 * STAGES;
    u32* barrier = sync;  // sync: [0] grid barrier, [1] CTAs done, [2 ...] work per (layer, ph)
    u32* work = sync + 2;
    const int G = gridDim.x, cta = blockIdx.x, warp = threadIdx.x >> 5;

    ring_init(full, empty, STAGES, NWARPS);

    if (warp == NWARPS) {
        produce(layers, num_layers, work, ring, smem_addr(smem + OFF_SIDE), full, empty, stage_unit,
                timing);
    } else {
        const Scratch S{qkv, part, part_ml, o, act, down};
        const int seq_len = seq_lens[0];
        const int pos = seq_len > 0 ? seq_len - 1 : 0;
        const long long slot = slot_mapping[0];
        const int np = num_partitions(seq_len);
        const int span = (seq_len + np - 1) / np;
        const bool attends = cta < HKV * np;
        AttnItem item;
        item.j = cta % HKV;
        item.p = cta / HKV;
        item.start = item.p * span;
        item.end = min(seq_len, item.start + span);
        item.cend = min(item.end, pos);  // the new token is not in the cache yet
#pragma unroll
        for (int i = 0; i < KPRE; ++i) {
            const int t = item.start + warp + i * NWARPS;
            item.off[i] = attends && t < item.cend
                              ? (long long)block_table[t / BS] * kc_s0 + (t % BS) * kc_s1 +
                                    item.j * D + (threadIdx.x & 31) * 4
                              : -1;
        }
        KeyRows rows;
        u32 it = 0, nbar = 0;
        {  // the residual stream starts as the embedding row
            const int base = threadIdx.x * (H / NTC);
            for (int e = 0; e < H / NTC; e += 8)
                *reinterpret_cast<uint4*>(hs + base + e) = ld_cg(hidden_in + base + e);
        }
        for (int li = 0; li < num_layers; ++li) {
            const LayerWeights L = layers[li];
            STAMP(0);
            if (li > 0) residual_add<DS>(hs, down);
            float scale = norm_quantize(hs, L.ln1, eps, xs, red);
            if (attends) prefetch_keys(L, item, rows);  // held across the qkv phase
            consumers_sync();
            consume(PH_QKV, it, smem, side, full, empty, stage_unit, xs, scale, partial, S);
            STAMP(1);
            grid_barrier(barrier, G * ++nbar);
            STAMP(2);

            if (attends)
                attention_item(L, item, rows, pos, slot, cos_sin, block_table, kc_s0, kc_s1,
                               qk_scale, S, reinterpret_cast<float*>(xs));
            STAMP(3);
            grid_barrier(barrier, G * ++nbar);
            STAMP(4);

            scale = merge_quantize(S, np, xs, red);
            consumers_sync();
            STAMP(5);
            consume(PH_O, it, smem, side, full, empty, stage_unit, xs, scale, partial, S);
            STAMP(6);
            grid_barrier(barrier, G * ++nbar);
            STAMP(7);

            residual_add<0>(hs, o);
            scale = norm_quantize(hs, L.ln2, eps, xs, red);
            consumers_sync();
            STAMP(8);
            consume(PH_GU, it, smem, side, full, empty, stage_unit, xs, scale, partial, S);
            STAMP(9);
            grid_barrier(barrier, G * ++nbar);
            STAMP(10);

            {  // SiLU x up, quantized
                constexpr int RUN = I / NTC;
                float y[RUN];
                const u16* src = act + threadIdx.x * RUN;
#pragma unroll
                for (int e = 0; e < RUN; e += 8) unpack8(ld_cg(src + e), y + e);
                scale = quantize_row<RUN>(y, xs, red);
            }
            consumers_sync();
            STAMP(11);
            consume(PH_DN, it, smem, side, full, empty, stage_unit, xs, scale, partial, S);
            STAMP(12);
            grid_barrier(barrier, G * ++nbar);
            STAMP(13);
        }
        if (cta == 0) {  // the last MLP output and the residual stream before it
            const int base = threadIdx.x * (H / NTC);
            for (int e = 0; e < H / NTC; ++e) {
                float d = 0.0f;
                for (int s = 0; s < DS; ++s) d += ld_cg_f32(down + s * H + base + e);
                hidden_out[base + e] = to_bf(d);
                residual_out[base + e] = hs[base + e];
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the last CTA out readies the counters for the next launch
        __threadfence();
        if (atomicAdd(sync + 1, 1u) == (u32)G - 1) {
            for (int i = 0; i < 2 + 4 * num_layers; ++i) sync[i] = 0u;
            __threadfence();
        }
    }
}
