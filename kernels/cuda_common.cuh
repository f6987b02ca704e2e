// Device helpers shared by the hand-written CUDA kernels (fp8_gemv_cuda.cu, fp8_decode_step.cu,
// scripts/tma_stream.cu). cuda_jit.py compiles every source with this directory on the include
// path.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// ---- global memory -------------------------------------------------------------------------
__device__ __forceinline__ uint4 ld_cg(const void* p) {
    // written by an earlier kernel or another CTA: read at L2 (L1 may hold an older copy)
    uint4 r;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ float ld_cg_f32(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}

// ---- E4M3 tensor-core products ---------------------------------------------------------------
// acc0 / acc8 += rows g / g + 8 of one m16n8k32 product (C = 0). NOTE: the MMA adds its E4M3
// products at less than float32 precision (Hopper aligns them to the largest and keeps ~14
// bits, truncating); chained through C, the truncation of a long running sum gave errors of
// ~1e-3 of the sum of |products| on an H200. Started from zero, each MMA's error is bounded by
// its own 32 products, and the running sum is float32.
__device__ __forceinline__ void mma_e4m3(float& acc0, float& acc8, u32 a0, u32 a1, u32 a2,
                                         u32 a3, u32 b0, u32 b1) {
    float d0, d1, d2, d3;
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.0f));
    acc0 += d0;  // every column holds the same product: d0 / d2 are rows g / g + 8
    acc8 += d2;
}

// ---- shared-memory pipelines: mbarriers and TMA bulk copies (sm_90) --------------------------
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

// A ring of `stages` stages (8-byte mbarriers at full + 8 s / empty + 8 s): a stage is full
// once its producer's one arrival and its bytes land, empty once each of `consumers` warps
// arrived. Thread 0 sets them up; the CTA synchronizes before any use.
__device__ __forceinline__ void ring_init(u32 full, u32 empty, int stages, u32 consumers) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, consumers);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
}

__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Wait until the phase of parity `parity` has completed (a fresh barrier: parity 1 passes).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
            "selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}

// ---- programmatic dependent launch (sm_90) ----------------------------------------------------
// Wait until the previous kernel on the stream has completed and its writes are visible.
__device__ __forceinline__ void grid_dependency_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Let the next kernel on the stream launch once every CTA of this one has said so (or exited).
__device__ __forceinline__ void launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ---- warp-specialised kernels: the consumer warps (threads 0 .. NT_ - 1, a producer warp after
// them) -------------------------------------------------------------------------------------
template <int NT_>
__device__ __forceinline__ void consumers_bar() {  // named barrier 1: the consumers only
    asm volatile("bar.sync 1, %0;" ::"r"(NT_) : "memory");
}

// Consumer-wide sum (OP 0) or max (OP 1), the same value to every consumer thread, in a fixed
// order (so that every CTA doing the same row work gets the same bits). `red`: NT_ / 32 floats.
template <int OP, int NT_>
__device__ __forceinline__ float consumers_reduce(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = OP == 0 ? v + u : fmaxf(v, u);
    }
    consumers_bar<NT_>();  // red may still be read by a previous reduction
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    consumers_bar<NT_>();
    float r = red[0];
#pragma unroll
    for (int w = 1; w < NT_ / 32; ++w) r = OP == 0 ? r + red[w] : fmaxf(r, red[w]);
    return r;
}

// This warp's STEPS 128-byte steps of one ring stage (16 weight rows PITCH bytes apart, MMA
// rows g / g + 8, the fragment layout of fp8_gemv_cuda.cu) against x's bytes at `xs`.
template <int PITCH_, int STEPS_>
__device__ __forceinline__ void stage_mma(const unsigned char* stage, const unsigned char* xs,
                                          float& acc0, float& acc8) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned char* st = stage + g * PITCH_ + t * 16;
#pragma unroll
    for (int j = 0; j < STEPS_; ++j) {
        const int off = (warp * STEPS_ + j) * 128;
        const uint4 a0 = *reinterpret_cast<const uint4*>(st + off);
        const uint4 a1 = *reinterpret_cast<const uint4*>(st + off + 64);
        const uint4 b0 = *reinterpret_cast<const uint4*>(st + 8 * PITCH_ + off);
        const uint4 b1 = *reinterpret_cast<const uint4*>(st + 8 * PITCH_ + off + 64);
        const uint4* xp = reinterpret_cast<const uint4*>(xs + off + t * 16);
        const uint4 x0 = xp[0], x1 = xp[4];  // +64 bytes
        mma_e4m3(acc0, acc8, a0.x, b0.x, a0.y, b0.y, x0.x, x0.y);
        mma_e4m3(acc0, acc8, a0.z, b0.z, a0.w, b0.w, x0.z, x0.w);
        mma_e4m3(acc0, acc8, a1.x, b1.x, a1.y, b1.y, x1.x, x1.y);
        mma_e4m3(acc0, acc8, a1.z, b1.z, a1.w, b1.w, x1.z, x1.w);
    }
}
