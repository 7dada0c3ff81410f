// Activation quantization, as the CPU engine does it (runtime/src/llm/kernels/scalar.rs):
// Q8_0 / Q8_1 for the 32-value weight types, Q8_K for the K-quants, f16 for F16 weights.
// The numbers are the CPU's exactly; the layout is the GPU's own (values, scales and sums in
// separate aligned arrays, see weights.cuh).
#include "common.cuh"

// One warp per 32 values. Launch: grid (ceil(cols / 256), tokens), block 256.
// d = amax / 127 rounded to f16; q = round_half_even(x * (127 / amax)); with `s` (Q8_1)
// also s = d * sum(q) rounded to f16, d unrounded as on the CPU.
extern "C" __global__ void __launch_bounds__(256)
    quantize_q8(const float* __restrict__ x, int cols, i8* __restrict__ qs, float* __restrict__ d,
                float* __restrict__ s) {
    int nb = cols / 32;
    int b = blockIdx.x * (blockDim.x / FM_WARP) + threadIdx.x / FM_WARP;
    int lane = threadIdx.x % FM_WARP, t = blockIdx.y;
    if (b >= nb) return;
    size_t i = (size_t)t * cols + b * 32 + lane;
    float v = x[i];
    float amax = fm_warp_max(fabsf(v));
    float dd = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    float qf = fminf(fmaxf(rintf(v * id), -128.0f), 127.0f);
    int q = (int)qf;
    qs[i] = (i8)q;
    int sum = fm_warp_sum(q);
    if (lane == 0) {
        d[(size_t)t * nb + b] = fm_round_h(dd);
        if (s) s[(size_t)t * nb + b] = fm_round_h(dd * (float)sum);
    }
}

// One block per 256 values. Launch: grid (cols / 256, tokens), block 256.
// max = the value of largest magnitude (the first, on ties); iscale = -127 / max;
// q = min(127, round_half_even(iscale * x)); d = 1 / iscale; bsums: sum(q) of each 16.
extern "C" __global__ void __launch_bounds__(256)
    quantize_q8k(const float* __restrict__ x, int cols, i8* __restrict__ qs, float* __restrict__ d,
                 float* __restrict__ bsums) {
    __shared__ float red_a[8];
    __shared__ int red_i[8];
    int nb = cols / 256;
    int b = blockIdx.x, t = blockIdx.y;
    int tid = threadIdx.x, lane = tid % FM_WARP, warp = tid / FM_WARP;
    const float* xb = x + (size_t)t * cols + b * 256;
    float v = xb[tid];
    float a = fabsf(v);
    int at = tid;
    for (int m = FM_WARP / 2; m > 0; m >>= 1) {
        float oa = __shfl_xor_sync(FM_FULL, a, m);
        int oi = __shfl_xor_sync(FM_FULL, at, m);
        if (oa > a || (oa == a && oi < at)) {
            a = oa;
            at = oi;
        }
    }
    if (lane == 0) {
        red_a[warp] = a;
        red_i[warp] = at;
    }
    __syncthreads();
    a = red_a[0];
    at = red_i[0];
    for (int w = 1; w < 8; w++) {
        if (red_a[w] > a) {
            a = red_a[w];
            at = red_i[w];
        }
    }
    size_t o = (size_t)t * cols + b * 256 + tid;
    int q = 0;
    float iscale = 0.0f;
    if (a != 0.0f) {
        iscale = -127.0f / xb[at];
        q = min(127, (int)rintf(iscale * v));
    }
    qs[o] = (i8)q;
    int s = q;
    for (int m = 8; m > 0; m >>= 1) s += __shfl_xor_sync(FM_FULL, s, m);
    if (tid % 16 == 0) bsums[(size_t)t * (cols / 16) + b * 16 + tid / 16] = (float)s;
    if (tid == 0) d[(size_t)t * nb + b] = a != 0.0f ? 1.0f / iscale : 0.0f;
}

// out[i] = x[i] rounded to f16 (the activations of F16 weights; K and V rows of the cache).
// Launch: grid (ceil(n / 256)), block 256.
extern "C" __global__ void __launch_bounds__(256)
    to_f16(const float* __restrict__ x, int n, u16* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = fm_f2h(x[i]);
}
