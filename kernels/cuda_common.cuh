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
