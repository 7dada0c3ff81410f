// Choosing the next token on the device, so only token ids come back: greedy (argmax, equal to
// the CPU sampler's), penalties, and temperature / top-k / top-p sampling with a seed.
//
// The random number of a draw: u = (splitmix64(seed + (step + 1) * 0x9E3779B97F4A7C15) >> 40)
// * 2^-24, in [0, 1); step counts the sequence's sampled tokens. It is not the CPU sampler's
// stream (that one is StdRng): the same seed gives the same tokens on the GPU every time, but
// not the CPU's tokens. The token is found by walking the kept tokens in id order until their
// weight passes u times the kept total (the CPU walks them sorted by probability).
#include "common.cuh"

#define FM_SAMPLE_THREADS 256

FM_INLINE u64 fm_splitmix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

FM_INLINE float fm_uniform(u64 seed, u32 step) {
    u64 z = seed + (u64)(step + 1u) * 0x9E3779B97F4A7C15ull;
    return (float)(fm_splitmix64(z) >> 40) * (1.0f / 16777216.0f);
}

// Largest value, lowest index on ties; NaN never wins. Every thread gets the index.
FM_INLINE int fm_argmax(const float* l, int vocab, float* red_v, int* red_i) {
    int tid = threadIdx.x, lane = tid % FM_WARP, warp = tid / FM_WARP;
    float bv = -FM_INF;
    int bi = vocab;
    for (int i = tid; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
    for (int m = FM_WARP / 2; m > 0; m >>= 1) {
        float ov = __shfl_xor_sync(FM_FULL, bv, m);
        int oi = __shfl_xor_sync(FM_FULL, bi, m);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();
    if (lane == 0) {
        red_v[warp] = bv;
        red_i[warp] = bi;
    }
    __syncthreads();
    bv = red_v[0];
    bi = red_i[0];
    for (int w = 1; w < (int)(blockDim.x / FM_WARP); w++) {
        if (red_v[w] > bv || (red_v[w] == bv && red_i[w] < bi)) {
            bv = red_v[w];
            bi = red_i[w];
        }
    }
    return bi < vocab ? bi : 0;
}

// out[r] = the most likely token of row r (the CPU sampler's greedy choice).
// Launch: grid (rows), block 256.
extern "C" __global__ void __launch_bounds__(FM_SAMPLE_THREADS)
    argmax(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
    __shared__ float red_v[FM_SAMPLE_THREADS / FM_WARP];
    __shared__ int red_i[FM_SAMPLE_THREADS / FM_WARP];
    int r = fm_argmax(logits + (size_t)blockIdx.x * vocab, vocab, red_v, red_i);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}

// logits[rows[i] * vocab + tokens[i]] -= amounts[i] (presence + frequency * count, one entry
// per distinct token of a row). Launch: grid (ceil(n / 256)), block 256.
extern "C" __global__ void __launch_bounds__(256)
    apply_penalties(float* __restrict__ logits, int vocab, const int* __restrict__ rows,
                    const int* __restrict__ tokens, const float* __restrict__ amounts, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) logits[(size_t)rows[i] * vocab + tokens[i]] -= amounts[i];
}

// Floats in an order-preserving unsigned encoding.
FM_INLINE u32 fm_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The largest key threshold T with count(key(x) >= T) >= k (the k-th largest key), one bit at
// a time from the top.
FM_INLINE u32 fm_kth_key(const float* l, int vocab, float inv_t, int k, float* red) {
    u32 prefix = 0;
    for (int bit = 31; bit >= 0; bit--) {
        u32 cand = prefix | (1u << bit);
        float n = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            n += fm_key(l[i] * inv_t) >= cand ? 1.0f : 0.0f;
        if (fm_block_sum(n, red) >= (float)k) prefix = cand;
    }
    return prefix;
}

// Weight of token i (0 if cut): exp(scaled - max) when its key passes the threshold.
FM_INLINE float fm_weight(float l, float inv_t, float max, u32 min_key) {
    float s = l * inv_t;
    return fm_key(s) >= min_key ? expf(s - max) : 0.0f;
}

// The smallest set of the largest weights whose total reaches `target`, as a key threshold.
FM_INLINE u32 fm_top_p_key(const float* l, int vocab, float inv_t, float max, u32 min_key,
                           float target, float* red) {
    u32 prefix = 0;
    for (int bit = 31; bit >= 0; bit--) {
        u32 cand = prefix | (1u << bit);
        u32 key = cand > min_key ? cand : min_key;
        float mass = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) mass += fm_weight(l[i], inv_t, max, key);
        if (fm_block_sum(mass, red) >= target) prefix = cand;
    }
    return prefix > min_key ? prefix : min_key;
}

// One token per row: greedy where temperature <= 0, else a draw from softmax(logits / T) over
// the top_k largest (0: all; ties at the cut are kept) cut further to the smallest set whose
// probability reaches top_p (ties at the cut kept). Launch: grid (rows), block 256.
extern "C" __global__ void __launch_bounds__(FM_SAMPLE_THREADS)
    sample(const float* __restrict__ logits, int vocab, const float* __restrict__ temperature,
           const int* __restrict__ top_k, const float* __restrict__ top_p,
           const u64* __restrict__ seeds, const u32* __restrict__ steps, int* __restrict__ out) {
    __shared__ float red_v[FM_SAMPLE_THREADS / FM_WARP];
    __shared__ int red_i[FM_SAMPLE_THREADS / FM_WARP];
    __shared__ float chunk_mass[FM_SAMPLE_THREADS];
    __shared__ int chosen;
    int r = blockIdx.x, tid = threadIdx.x;
    const float* l = logits + (size_t)r * vocab;
    int best = fm_argmax(l, vocab, red_v, red_i);
    float temp = temperature[r];
    if (!(temp > 0.0f)) {
        if (tid == 0) out[r] = best;
        return;
    }
    float inv_t = 1.0f / temp;
    float max = l[best] * inv_t;
    int k = top_k[r];
    u32 min_key = k > 0 && k < vocab ? fm_kth_key(l, vocab, inv_t, k, red_v) : 0u;
    float p = fminf(fmaxf(top_p[r], 0.0f), 1.0f);
    if (p < 1.0f) {
        float total = 0.0f;
        for (int i = tid; i < vocab; i += blockDim.x) total += fm_weight(l[i], inv_t, max, min_key);
        total = fm_block_sum(total, red_v);
        min_key = fm_top_p_key(l, vocab, inv_t, max, min_key, p * total, red_v);
    }
    // Each thread owns a contiguous chunk of ids; the chunks' totals are scanned in order.
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int lo = tid * per, hi = min(vocab, lo + per);
    float mass = 0.0f;
    for (int i = lo; i < hi; i++) mass += fm_weight(l[i], inv_t, max, min_key);
    chunk_mass[tid] = mass;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (int c = 0; c < (int)blockDim.x; c++) total += chunk_mass[c];
        float target = fm_uniform(seeds[r], steps[r]) * total;
        float acc = 0.0f;
        int c = 0, last = 0;
        for (; c < (int)blockDim.x; c++) {
            if (chunk_mass[c] > 0.0f) last = c;
            if (chunk_mass[c] > 0.0f && target < acc + chunk_mass[c]) break;
            acc += chunk_mass[c];
        }
        if (c == (int)blockDim.x) {
            c = last;
            target = -1.0f;  // past the end by rounding: the chunk's last kept token
        } else {
            target -= acc;
        }
        chunk_mass[0] = target;
        chosen = c;
    }
    __syncthreads();
    if (tid == chosen) {
        float target = chunk_mass[0], acc = 0.0f;
        int pick = -1;
        for (int i = lo; i < hi; i++) {
            float w = fm_weight(l[i], inv_t, max, min_key);
            if (w <= 0.0f) continue;
            pick = i;
            acc += w;
            if (target >= 0.0f && target < acc) break;
        }
        out[r] = pick >= 0 ? pick : best;
    }
}
