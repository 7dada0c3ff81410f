// Quantized matrix-vector products (one warp per weight row and token, integer dot products
// on the quantized activations) and embedding-row lookups, for every weight type.
#include "weights.cuh"

// Tokens a warp takes at once: each weight part is decoded once for all of them.
#define FM_TILE 8

// out[t * rows + r] = W[r] . x_t.  Launch: grid (ceil(rows / 4), ceil(tokens / 8)), block
// 128: each of the 4 warps takes one row for up to 8 tokens; its lanes take 8-value parts of
// the row in turn. act: the quantized activations (i8, see weights.cuh), f16 values (F16
// weights) or the f32 input itself (F32 weights).
template <int QT>
FM_INLINE void fm_matvec(const u8* __restrict__ w, int rows, int cols, const void* act,
                         const float* __restrict__ ad, const float* __restrict__ ax, int tokens,
                         float* __restrict__ out) {
    int lane = threadIdx.x % FM_WARP;
    int r = blockIdx.x * (blockDim.x / FM_WARP) + threadIdx.x / FM_WARP;
    int t0 = blockIdx.y * FM_TILE;
    int nt = min(FM_TILE, tokens - t0);
    if (r >= rows) return;
    size_t row_bytes = (size_t)(cols / Fmt<QT>::elems) * Fmt<QT>::bytes;
    const u8* row = w + (size_t)r * row_bytes;
    float acc[FM_TILE];
    for (int j = 0; j < FM_TILE; j++) acc[j] = 0.0f;
    if (QT == FM_F32 || QT == FM_F16) {
        for (int i = lane; i < cols; i += FM_WARP) {
            float wv = QT == FM_F32 ? fm_f32_at(row + 4 * i) : fm_ldh(row + 2 * i);
            for (int j = 0; j < FM_TILE; j++) {
                if (j >= nt) break;
                size_t at = (size_t)(t0 + j) * cols + i;
                acc[j] += wv * (QT == FM_F32 ? ((const float*)act)[at] : fm_h2f(((const u16*)act)[at]));
            }
        }
    } else {
        int nb = cols / Fmt<QT>::elems;
        // Per token: Q8_1 has a sum per 32 values, Q8_K one per 16.
        int ax_row = QT == FM_Q4_1 || QT == FM_Q5_1 ? nb : Fmt<QT>::elems == 256 ? cols / 16 : 0;
        for (int it = lane; it < cols / 8; it += FM_WARP) {
            FmPart p = fm_decode<QT>(row, it);
            for (int j = 0; j < FM_TILE; j++) {
                if (j >= nt) break;
                int t = t0 + j;
                acc[j] += fm_apply<QT>(p, (const i8*)act + (size_t)t * cols, ad + (size_t)t * nb,
                                       ax + (size_t)t * ax_row);
            }
        }
    }
    for (int j = 0; j < nt; j++) {
        float v = fm_warp_sum(acc[j]);
        if (lane == 0) out[(size_t)(t0 + j) * rows + r] = v;
    }
}

// out[t * cols + i] = row ids[t] of the table, dequantized. Launch: grid (tokens), block 256.
template <int QT>
FM_INLINE void fm_embed(const u8* __restrict__ w, int cols, const int* __restrict__ ids,
                        float* __restrict__ out) {
    int t = blockIdx.x;
    size_t row_bytes = (size_t)(cols / Fmt<QT>::elems) * Fmt<QT>::bytes;
    const u8* row = w + (size_t)ids[t] * row_bytes;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        out[(size_t)t * cols + i] = fm_dequant<QT>(row, i);
}

#define FM_WEIGHT_KERNELS(suffix, QT)                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        matvec_##suffix(const u8* w, int rows, int cols, const void* act, const float* ad,     \
                        const float* ax, int tokens, float* out) {                             \
        fm_matvec<QT>(w, rows, cols, act, ad, ax, tokens, out);                                \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        embed_##suffix(const u8* w, int cols, const int* ids, float* out) {                    \
        fm_embed<QT>(w, cols, ids, out);                                                       \
    }

FM_WEIGHT_KERNELS(f32, FM_F32)
FM_WEIGHT_KERNELS(f16, FM_F16)
FM_WEIGHT_KERNELS(q4_0, FM_Q4_0)
FM_WEIGHT_KERNELS(q4_1, FM_Q4_1)
FM_WEIGHT_KERNELS(q5_0, FM_Q5_0)
FM_WEIGHT_KERNELS(q5_1, FM_Q5_1)
FM_WEIGHT_KERNELS(q8_0, FM_Q8_0)
FM_WEIGHT_KERNELS(q4_k, FM_Q4_K)
FM_WEIGHT_KERNELS(q5_k, FM_Q5_K)
FM_WEIGHT_KERNELS(q6_k, FM_Q6_K)
