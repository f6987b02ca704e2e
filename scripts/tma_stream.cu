// Raw weight streaming through a TMA-fed shared-memory ring, no math: how fast can one CTA a
// SM pull an [N, K] byte matrix with stages of R rows x KC bytes (R bulk copies a stage,
// issued by R lanes of a producer warp), S stages, consumers that only wait and release?
// For scripts/bench_tma_stream.py (PERF_NOTES.md, eleventh session). Needs sm_90.
// -D: K, R, KC, STAGES, NWARPS (consumer warps), DYN (1: tiles from a global counter).
#define PITCH (KC + 64)
#define STAGE_BYTES (R * PITCH)
#include "cuda_common.cuh"  // kernels/: mbarriers, bulk copies

extern "C" __global__ void __launch_bounds__(NWARPS * 32 + 32, 1)
tma_stream(const unsigned char* __restrict__ w, int tiles, u64* work, unsigned int* sink) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 ring = (u32)__cvta_generic_to_shared(smem);
    const u32 full = ring + STAGES * STAGE_BYTES, empty = full + 8 * STAGES;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    ring_init(full, empty, STAGES, NWARPS);
    constexpr int CH = K / KC;
    int* unit = reinterpret_cast<int*>(smem + STAGES * STAGE_BYTES + 16 * STAGES);
    if (warp == NWARPS) {
        int u = 0;
        for (int m = 0;; ++m) {
            int tile;
#if DYN
            tile = 0;
            if (lane == 0) tile = (int)atomicAdd(work, 1ull);
            tile = __shfl_sync(0xffffffffu, tile, 0);
#else
            tile = blockIdx.x + gridDim.x * m;
#endif
            if (tile >= tiles) break;
            const unsigned char* src = w + (size_t)(tile * R + (lane % R)) * K;
            for (int kc = 0; kc < CH; ++kc, ++u) {
                const int s = u % STAGES;
                mbar_wait(empty + 8 * s, ((u / STAGES) & 1) ^ 1);
                if (lane == 0) {
                    unit[s] = 1;
                    mbar_expect_tx(full + 8 * s, R * KC);
                }
                __syncwarp();
                if (lane < R) bulk_copy(ring + s * STAGE_BYTES + lane * PITCH, src + kc * KC, KC,
                                        full + 8 * s);
            }
        }
        const int s = u % STAGES;
        mbar_wait(empty + 8 * s, ((u / STAGES) & 1) ^ 1);
        if (lane == 0) {
            unit[s] = -1;
            mbar_arrive(full + 8 * s);
        }
        return;
    }
    unsigned int acc = 0;
    for (int u = 0;; ++u) {
        const int s = u % STAGES;
        mbar_wait(full + 8 * s, (u / STAGES) & 1);
        const int id = unit[s];
        if (id > 0) acc += *reinterpret_cast<const unsigned int*>(smem + s * STAGE_BYTES + lane * 4);
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * s);
        if (id < 0) break;
    }
    if (acc == 0x12345678u) *sink = acc;  // keeps the reads
}
