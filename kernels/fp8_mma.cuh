// Device helpers shared by the FP8 decode kernels (fp8_gemv_cuda.cu, fp8_decode_mlp.cu):
// weight / activation loads, the E4M3 MMA, programmatic-dependent-launch control, and the
// per-token E4M3 quantization of model-dtype values. Expects X_T / OUT_T (0 bfloat16,
// 1 float16) defined by the includer.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ uint4 ld_weight(const unsigned char* p) {
    // read once: keep it out of L1
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ uint4 ld_cg(const void* p) {
    // written by the previous kernel: read at L2 (this SM's L1 may hold an older copy)
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

__device__ __forceinline__ void grid_dependency_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ float lo_to_f32(u32 v) {  // the element at the lower address
#if X_T == 0
    return __uint_as_float(v << 16);
#else
    float f;
    asm("{ .reg .b16 h; mov.b32 {h, _}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(v));
    return f;
#endif
}

__device__ __forceinline__ float hi_to_f32(u32 v) {
#if X_T == 0
    return __uint_as_float(v & 0xffff0000u);
#else
    float f;
    asm("{ .reg .b16 h; mov.b32 {_, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(v));
    return f;
#endif
}

__device__ __forceinline__ u32 quantize_pair(u32 v, float inv) {
    // clamp(x * inv, -448, 448) rounded to nearest-even E4M3 (kernels/fp8_quant.py's formula)
    float lo = fminf(fmaxf(__fmul_rn(lo_to_f32(v), inv), -448.0f), 448.0f);
    float hi = fminf(fmaxf(__fmul_rn(hi_to_f32(v), inv), -448.0f), 448.0f);
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bias_to_f32(const u16* b, int i) {
#if OUT_T == 0
    return __uint_as_float(((u32)b[i]) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b[i]));
    return f;
#endif
}

__device__ __forceinline__ u16 to_out(float y) {
    u16 r;
#if OUT_T == 0
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(y));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(y));
#endif
    return r;
}
