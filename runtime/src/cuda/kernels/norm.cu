// Element-wise and per-row kernels of the forward pass: RMSNorm, RoPE, SiLU-gate, residual
// add and bias, written to give the CPU backend's numbers (runtime/src/llm/cpu.rs).
#include "common.cuh"

// out[r] = RMSNorm(x[src]) * w for each output row r, src = rows ? rows[r] : r.
// Squares in f32 summed in f64, as on the CPU. Launch: grid (out rows), block 256.
extern "C" __global__ void __launch_bounds__(256)
    rms_norm(const float* __restrict__ x, const int* __restrict__ rows, int d,
             const float* __restrict__ w, float eps, float* __restrict__ out) {
    __shared__ double red[8];
    int r = blockIdx.x;
    const float* xr = x + (size_t)(rows ? rows[r] : r) * d;
    double sum = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) sum += (double)(xr[i] * xr[i]);
    sum = fm_block_sum(sum, red);
    float scale = 1.0f / sqrtf((float)(sum / (double)d) + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[(size_t)r * d + i] = xr[i] * scale * w[i];
}

// Rotate each head's pairs (2i, 2i+1) of token t by pos_t * theta_scale^i, the angle built by
// repeated multiplication as on the CPU; theta_scale = base^(-2 / head_dim), computed by the
// caller. Launch: grid (tokens), block 256.
extern "C" __global__ void __launch_bounds__(256)
    rope(float* __restrict__ x, int width, int head_dim, float theta_scale,
         const int* __restrict__ positions) {
    int t = blockIdx.x;
    float* row = x + (size_t)t * width;
    int half = head_dim / 2;
    for (int q = threadIdx.x; q < width / 2; q += blockDim.x) {
        int i = q % half;
        float theta = (float)positions[t];
        for (int k = 0; k < i; k++) theta *= theta_scale;
        float s = sinf(theta), c = cosf(theta);
        float* pair = row + (q / half) * head_dim + 2 * i;
        float x0 = pair[0], x1 = pair[1];
        pair[0] = x0 * c - x1 * s;
        pair[1] = x0 * s + x1 * c;
    }
}

// g = SiLU(g) * u. Launch: grid (ceil(n / 256)), block 256.
extern "C" __global__ void __launch_bounds__(256)
    silu_mul(float* __restrict__ g, const float* __restrict__ u, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

// x += y. Launch: grid (ceil(n / 256)), block 256.
extern "C" __global__ void __launch_bounds__(256)
    add(float* __restrict__ x, const float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[t][i] += b[i] on rows of `width`. Launch: grid (ceil(n / 256)), block 256.
extern "C" __global__ void __launch_bounds__(256)
    add_bias(float* __restrict__ x, const float* __restrict__ b, int width, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += b[i % width];
}
