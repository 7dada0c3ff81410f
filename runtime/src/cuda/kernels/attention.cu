// Attention of one query token over its sequence's cached positions in the paged KV cache,
// and the writes of new K and V rows into it. The cache is the CPU engine's layout
// (runtime/src/llm/kv.rs): f16 blocks of `block_tokens` positions; in block b, layer l, K of
// slot s starts at ((b * layers + l) * 2 * block_tokens + s) * kv_dim and V block_tokens rows
// further. tables[seq * max_blocks + i] is the i-th block of sequence seq.
#include "common.cuh"

FM_INLINE size_t fm_kv_at(const int* tables, int max_blocks, int seq, int pos, int layers,
                          int layer, int block_tokens, int kv_dim) {
    size_t block = (size_t)tables[(size_t)seq * max_blocks + pos / block_tokens];
    size_t slot = (size_t)(pos % block_tokens);
    return ((block * layers + layer) * 2 * block_tokens + slot) * kv_dim;
}

// K and V of each token (rows of kv_dim) into the cache at its position, rounded to f16.
// Launch: grid (tokens), block 256.
extern "C" __global__ void __launch_bounds__(256)
    kv_store(const float* __restrict__ k, const float* __restrict__ v, int kv_dim,
             const int* __restrict__ positions, const int* __restrict__ seq_of,
             const int* __restrict__ tables, int max_blocks, int layers, int layer,
             int block_tokens, u16* __restrict__ kv) {
    int t = blockIdx.x;
    size_t at = fm_kv_at(tables, max_blocks, seq_of[t], positions[t], layers, layer,
                         block_tokens, kv_dim);
    size_t vat = at + (size_t)block_tokens * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kv[at + i] = fm_f2h(k[(size_t)t * kv_dim + i]);
        kv[vat + i] = fm_f2h(v[(size_t)t * kv_dim + i]);
    }
}

// out[t][h] = softmax(q_h . K / sqrt(hd)) V over positions 0..=pos_t of token t's sequence,
// head h reading KV head h / (heads / kv_heads). As on the CPU: q rounded to f16, the
// exponentials summed in f64, each probability rounded to f16 before it weighs V.
// scores: scratch of tokens * heads * ctx floats (ctx > every position).
// Launch: grid (heads, tokens), block 128; head_dim <= 128 and divides 128.
extern "C" __global__ void __launch_bounds__(128)
    attention(const float* __restrict__ q, const u16* __restrict__ kv,
              const int* __restrict__ positions, const int* __restrict__ seq_of,
              const int* __restrict__ tables, int max_blocks, int layers, int layer,
              int block_tokens, int heads, int kv_heads, int head_dim, float scale,
              float* __restrict__ scores, int ctx, float* __restrict__ out) {
    __shared__ float qh[FM_MAX_HEAD_DIM];
    __shared__ float part[128];
    __shared__ float red_f[4];
    __shared__ double red_d[4];
    int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    int lane = tid % FM_WARP, warp = tid / FM_WARP, warps = blockDim.x / FM_WARP;
    int pos = positions[t], seq = seq_of[t];
    int kv_dim = kv_heads * head_dim;
    int g = (h / (heads / kv_heads)) * head_dim;
    const float* qr = q + ((size_t)t * heads + h) * head_dim;
    for (int i = tid; i < head_dim; i += blockDim.x) qh[i] = fm_round_h(qr[i]);
    __syncthreads();
    float* sc = scores + ((size_t)t * heads + h) * ctx;
    for (int j = warp; j <= pos; j += warps) {
        const u16* kr =
            kv + fm_kv_at(tables, max_blocks, seq, j, layers, layer, block_tokens, kv_dim) + g;
        float s = 0.0f;
        for (int i = lane; i < head_dim; i += FM_WARP) s += fm_h2f(kr[i]) * qh[i];
        s = fm_warp_sum(s);
        if (lane == 0) sc[j] = s * scale;
    }
    __syncthreads();
    float m = -FM_INF;
    for (int j = tid; j <= pos; j += blockDim.x) m = fmaxf(m, sc[j]);
    m = fm_block_max(m, red_f);
    double sum = 0.0;
    for (int j = tid; j <= pos; j += blockDim.x) {
        float e = expf(sc[j] - m);
        sc[j] = e;
        sum += (double)e;
    }
    sum = fm_block_sum(sum, red_d);
    float inv = (float)(1.0 / sum);
    // Each group of head_dim threads takes every groups-th position; the groups' sums are
    // added in group order.
    int groups = blockDim.x / head_dim, grp = tid / head_dim, i = tid % head_dim;
    float acc = 0.0f;
    for (int j = grp; j <= pos; j += groups) {
        const u16* vr = kv + fm_kv_at(tables, max_blocks, seq, j, layers, layer, block_tokens,
                                      kv_dim) +
                        (size_t)block_tokens * kv_dim + g;
        acc += fm_round_h(sc[j] * inv) * fm_h2f(vr[i]);
    }
    part[tid] = acc;
    __syncthreads();
    if (tid < head_dim) {
        float o = 0.0f;
        for (int k = 0; k < groups; k++) o += part[k * head_dim + tid];
        out[((size_t)t * heads + h) * head_dim + tid] = o;
    }
}
