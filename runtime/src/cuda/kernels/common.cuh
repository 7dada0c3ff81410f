// Portable definitions every kernel file includes: fixed-width types, f16 conversions and
// warp / block reductions. Under NVRTC (`__CUDACC__`) they map to the CUDA built-ins; on the
// host, the launch emulation's header (runtime/cuda-emu/include/cuda_emu.h) provides the same
// built-ins (threadIdx, __syncthreads, __shfl_xor_sync, __dp4a, ...) before this file.
#pragma once

#ifndef __CUDACC__
#include "cuda_emu.h"
#endif

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FM_INLINE static __device__ __forceinline__
#define FM_WARP 32
#define FM_FULL 0xffffffffu

// +infinity (NVRTC has no math.h).
#define FM_INF __uint_as_float(0x7f800000u)

// Largest head width the attention kernel takes (its block holds one head's query).
#define FM_MAX_HEAD_DIM 128

#ifdef __CUDACC__
// f16 bits <-> f32 with round-to-nearest-even, without cuda_fp16.h.
FM_INLINE float fm_h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
FM_INLINE u16 fm_f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// `x` rounded to the nearest f16 value, as f32.
FM_INLINE float fm_round_h(float x) { return fm_h2f(fm_f2h(x)); }

// A little-endian f16 at a 2-byte aligned address.
FM_INLINE float fm_ldh(const u8* p) { return fm_h2f(*(const u16*)p); }

// A 32-bit little-endian word at a 2-byte aligned address (ggml blocks are 2-byte aligned).
FM_INLINE u32 fm_ld32(const u8* p) {
    const u16* h = (const u16*)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}

FM_INLINE float fm_f32_at(const u8* p) { return __uint_as_float(fm_ld32(p)); }

// Each byte b of `v` (b < 0x80) minus `off` (<= 0x80), as signed bytes, without carries.
FM_INLINE int fm_center(u32 v, u32 off) {
    return (int)(((v | 0x80808080u) - off * 0x01010101u) ^ 0x80808080u);
}

// Bits 0..3 of `b` moved to bit 4 of bytes 0..3.
FM_INLINE u32 fm_spread4(u32 b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

template <typename T>
FM_INLINE T fm_warp_sum(T v) {
    for (int m = FM_WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(FM_FULL, v, m);
    return v;
}

FM_INLINE float fm_warp_max(float v) {
    for (int m = FM_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(FM_FULL, v, m));
    return v;
}

// Sum over the block (every thread gets it). `red` holds one value per warp; the warps'
// sums are added in warp order, so the result does not depend on timing.
template <typename T>
FM_INLINE T fm_block_sum(T v, T* red) {
    int lane = threadIdx.x % FM_WARP, warp = threadIdx.x / FM_WARP;
    v = fm_warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T s = 0;
    for (int w = 0; w < (int)(blockDim.x / FM_WARP); w++) s += red[w];
    return s;
}

FM_INLINE float fm_block_max(float v, float* red) {
    int lane = threadIdx.x % FM_WARP, warp = threadIdx.x / FM_WARP;
    v = fm_warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < (int)(blockDim.x / FM_WARP); w++) m = fmaxf(m, red[w]);
    return m;
}
