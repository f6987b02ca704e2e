// The one-token FP8 GEMVs' input and output conventions (fp8_gemv_cuda.cu, fp8_gemv_stream.cu):
// x in the model dtype (X_T: 0 bfloat16, 1 float16) or E4M3, outputs and bias in OUT_T, and
// x staged once per CTA as E4M3 in shared memory: X_MODE 0 E4M3 x with its float32 scale, 1
// model-dtype x quantized per token from the row amax the producing kernel wrote, 2 with a
// static scale. Needs cuda_common.cuh first.
#pragma once

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

__device__ __forceinline__ float out_to_f32(u16 v) {  // an output-dtype value
#if OUT_T == 0
    return __uint_as_float(((u32)v) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#endif
}

__device__ __forceinline__ float bias_to_f32(const u16* b, int i) { return out_to_f32(b[i]); }

__device__ __forceinline__ u16 to_out(float y) {
    u16 r;
#if OUT_T == 0
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(y));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(y));
#endif
    return r;
}

// x [KX] as E4M3 into xs, by threads tid = 0 .. NTHREADS - 1 (the caller synchronizes them
// after); returns x's dequantizing scale. x is the previous kernel's output: call after the
// wait. Every load is issued before any is used: one L2 round trip, not one a 16-byte run.
template <int KX, int NTHREADS>
__device__ __forceinline__ float stage_x(unsigned char* xs, const void* __restrict__ x,
                                         const float* __restrict__ x_scale, int tid) {
    constexpr int RUNS = X_MODE == 0 ? KX / 16 : KX / 8;  // 16-byte runs of x
    constexpr int IT = (RUNS + NTHREADS - 1) / NTHREADS;
    uint4 v[IT];
#pragma unroll
    for (int j = 0; j < IT; ++j) {
        const int i = tid + j * NTHREADS;
        if (i < RUNS) v[j] = ld_cg(reinterpret_cast<const uint4*>(x) + i);
    }
    float scale;
#if X_MODE == 0
    scale = ld_cg_f32(x_scale);
#pragma unroll
    for (int j = 0; j < IT; ++j) {
        const int i = tid + j * NTHREADS;
        if (i < RUNS) reinterpret_cast<uint4*>(xs)[i] = v[j];
    }
#else
#if X_MODE == 1
    scale = fmaxf(__fdiv_rn(ld_cg_f32(x_scale), 448.0f), 1e-12f);
#else
    scale = ld_cg_f32(x_scale);
#endif
    const float inv = __frcp_rn(scale);
#pragma unroll
    for (int j = 0; j < IT; ++j) {
        const int i = tid + j * NTHREADS;
        if (i < RUNS) {
            uint2 q;
            q.x = quantize_pair(v[j].x, inv) | (quantize_pair(v[j].y, inv) << 16);
            q.y = quantize_pair(v[j].z, inv) | (quantize_pair(v[j].w, inv) << 16);
            reinterpret_cast<uint2*>(xs)[i] = q;
        }
    }
#endif
    return scale;
}
