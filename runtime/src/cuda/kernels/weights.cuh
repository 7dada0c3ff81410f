// The ggml weight blocks, decoded on the device: 8 values at a time as packed signed bytes
// (for __dp4a against Q8 activations), or one value at a time as f32 (embedding rows).
// Type codes are the ggml ids. Layouts as in runtime/src/llm/kernels/scalar.rs.
#pragma once
#include "common.cuh"

#define FM_F32 0
#define FM_F16 1
#define FM_Q4_0 2
#define FM_Q4_1 3
#define FM_Q5_0 6
#define FM_Q5_1 7
#define FM_Q8_0 8
#define FM_Q4_K 12
#define FM_Q5_K 13
#define FM_Q6_K 14

template <int QT> struct Fmt;
// elems: values per block; bytes: bytes per block; parts: 8-value parts per block.
template <> struct Fmt<FM_Q4_0> { enum { elems = 32, bytes = 18 }; };
template <> struct Fmt<FM_Q4_1> { enum { elems = 32, bytes = 20 }; };
template <> struct Fmt<FM_Q5_0> { enum { elems = 32, bytes = 22 }; };
template <> struct Fmt<FM_Q5_1> { enum { elems = 32, bytes = 24 }; };
template <> struct Fmt<FM_Q8_0> { enum { elems = 32, bytes = 34 }; };
template <> struct Fmt<FM_Q4_K> { enum { elems = 256, bytes = 144 }; };
template <> struct Fmt<FM_Q5_K> { enum { elems = 256, bytes = 176 }; };
template <> struct Fmt<FM_Q6_K> { enum { elems = 256, bytes = 210 }; };
template <> struct Fmt<FM_F16> { enum { elems = 1, bytes = 2 }; };
template <> struct Fmt<FM_F32> { enum { elems = 1, bytes = 4 }; };

// Values 8p..8p+7 of a 32-value block as two words of signed bytes (already centred for the
// symmetric types), plus the block's scale d and offset m (x = d*q + m).
template <int QT>
FM_INLINE void fm_part32(const u8* b, int p, int& lo, int& hi, float& d, float& m) {
    d = fm_ldh(b);
    m = 0.0f;
    if (QT == FM_Q8_0) {
        lo = (int)fm_ld32(b + 2 + 8 * p);
        hi = (int)fm_ld32(b + 6 + 8 * p);
        return;
    }
    // 4-bit values: part p reads bytes (p&1)*8.. of qs, low nibbles for p < 2, high above.
    int qs = QT == FM_Q4_0 ? 2 : QT == FM_Q4_1 ? 4 : QT == FM_Q5_0 ? 6 : 8;
    const u8* q = b + qs + (p & 1) * 8;
    int sh = (p >> 1) * 4;
    u32 x0 = (fm_ld32(q) >> sh) & 0x0F0F0F0Fu, x1 = (fm_ld32(q + 4) >> sh) & 0x0F0F0F0Fu;
    if (QT == FM_Q5_0 || QT == FM_Q5_1) {
        // The fifth bit of value j (j < 16) is bit j of qh; of value j + 16, bit j + 16.
        u32 h = fm_ld32(b + (QT == FM_Q5_0 ? 2 : 4)) >> ((p & 1) * 8 + (p >> 1) * 16);
        x0 |= fm_spread4(h & 15u);
        x1 |= fm_spread4((h >> 4) & 15u);
    }
    if (QT == FM_Q4_1 || QT == FM_Q5_1) m = fm_ldh(b + 2);
    u32 off = QT == FM_Q4_0 ? 8 : QT == FM_Q5_0 ? 16 : 0;
    lo = fm_center(x0, off);
    hi = fm_center(x1, off);
}

// The 6-bit scale and min of 32-value sub-block j of a Q4_K / Q5_K block (get_scale_min_k4).
FM_INLINE void fm_scale_min_k4(int j, const u8* s, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Values 8p..8p+7 (p < 32) of a K-quant super-block as unsigned bytes in two words, with the
// scale and min-coefficient of their 16-value group (Q6_K: x = d*sc*(q - 32), mn = 32*sc).
template <int QT>
FM_INLINE void fm_part_k(const u8* b, int p, u32& x0, u32& x1, int& sc, int& mn) {
    if (QT == FM_Q6_K) {
        int n = p >> 4, within = (p & 15) * 8, quarter = within >> 5, l = within & 31;
        const u8* ql = b + 64 * n + l + (quarter & 1) * 32;
        const u8* qh = b + 128 + 32 * n + l;
        int sh = (quarter >> 1) * 4, hs = 2 * quarter;
        x0 = ((fm_ld32(ql) >> sh) & 0x0F0F0F0Fu) | (((fm_ld32(qh) >> hs) & 0x03030303u) << 4);
        x1 = ((fm_ld32(ql + 4) >> sh) & 0x0F0F0F0Fu) |
             (((fm_ld32(qh + 4) >> hs) & 0x03030303u) << 4);
        sc = (int)(i8)b[192 + (p >> 1)];
        mn = 32 * sc;
        return;
    }
    fm_scale_min_k4(p >> 2, b + 4, sc, mn);
    int c = p >> 3, w = (p & 7) * 8;
    int sh = w >= 32 ? 4 : 0;
    const u8* q = b + (QT == FM_Q5_K ? 48 : 16) + 32 * c + (w & 31);
    x0 = (fm_ld32(q) >> sh) & 0x0F0F0F0Fu;
    x1 = (fm_ld32(q + 4) >> sh) & 0x0F0F0F0Fu;
    if (QT == FM_Q5_K) {
        const u8* h = b + 16 + (w & 31);
        int hb = 2 * c + (w >= 32 ? 1 : 0);
        x0 |= ((fm_ld32(h) >> hb) & 0x01010101u) << 4;
        x1 |= ((fm_ld32(h + 4) >> hb) & 0x01010101u) << 4;
    }
}

FM_INLINE int fm_byte(u32 x, int k) { return (int)((x >> (8 * k)) & 0xFFu); }

// Value i of a weight row, as the CPU's dequantize_row computes it.
template <int QT>
FM_INLINE float fm_dequant(const u8* row, int i) {
    if (QT == FM_F32) return fm_f32_at(row + 4 * i);
    if (QT == FM_F16) return fm_ldh(row + 2 * i);
    const u8* b = row + (i / Fmt<QT>::elems) * Fmt<QT>::bytes;
    int v = i % Fmt<QT>::elems;
    int p = v / 8, k = v % 8;
    if (Fmt<QT>::elems == 32) {
        int lo, hi;
        float d, m;
        fm_part32<QT>(b, p, lo, hi, d, m);
        int q = (int)(i8)fm_byte(k < 4 ? (u32)lo : (u32)hi, k & 3);
        return (float)q * d + m;
    }
    u32 x0, x1;
    int sc, mn;
    fm_part_k<QT>(b, p, x0, x1, sc, mn);
    int q = fm_byte(k < 4 ? x0 : x1, k & 3);
    if (QT == FM_Q6_K) return fm_ldh(b + 208) * (float)sc * (float)(q - 32);
    return fm_ldh(b) * (float)sc * (float)q - fm_ldh(b + 2) * (float)mn;
}

// Activations for the quantized weight types, one row per token (see quant.cu):
// aq: i8 values, `cols` a row; ad: the f32 scale of each 32 (Q8_0, Q8_1) or 256 (Q8_K) values;
// ax: Q8_1: d * sum(q) of each 32 values (f16-rounded); Q8_K: sum(q) of each 16 values.
//
// Part `it` of a weight row (8 values), decoded once and then multiplied with the same 8
// values of each token's activations.
struct FmPart {
    int lo, hi;   // the 8 values (signed bytes; unsigned for the K-quants)
    float d, m;   // 32-value types: x = d*q + m; K-quants: the super-block's d and dmin
    int sc, mn;   // K-quants: the 16-value group's scale and min-coefficient
    int blk, p;   // block and part within it
};

template <int QT>
FM_INLINE FmPart fm_decode(const u8* row, int it) {
    FmPart w;
    if (Fmt<QT>::elems == 32) {
        w.blk = it >> 2;
        w.p = it & 3;
        fm_part32<QT>(row + w.blk * Fmt<QT>::bytes, w.p, w.lo, w.hi, w.d, w.m);
        w.sc = w.mn = 0;
        return w;
    }
    w.blk = it >> 5;
    w.p = it & 31;
    const u8* b = row + w.blk * Fmt<QT>::bytes;
    u32 x0, x1;
    fm_part_k<QT>(b, w.p, x0, x1, w.sc, w.mn);
    w.lo = (int)x0;
    w.hi = (int)x1;
    w.d = fm_ldh(b + (QT == FM_Q6_K ? 208 : 0));
    w.m = QT == FM_Q6_K ? w.d : fm_ldh(b + 2);
    return w;
}

// A decoded part times one token's activations, as the CPU's dot product computes it.
template <int QT>
FM_INLINE float fm_apply(const FmPart& w, const i8* aq, const float* ad, const float* ax) {
    if (Fmt<QT>::elems == 32) {
        const int* a = (const int*)(aq + w.blk * 32 + w.p * 8);
        int s = __dp4a(w.hi, a[1], __dp4a(w.lo, a[0], 0));
        float r = (w.d * ad[w.blk]) * (float)s;
        if ((QT == FM_Q4_1 || QT == FM_Q5_1) && w.p == 0) r += w.m * ax[w.blk];
        return r;
    }
    const int* a = (const int*)(aq + w.blk * 256 + w.p * 8);
    int sumi = w.sc * __dp4a(w.hi, a[1], __dp4a(w.lo, a[0], 0));
    int summ = (w.p & 1) == 0 ? w.mn * (int)ax[w.blk * 16 + (w.p >> 1)] : 0;
    float da = ad[w.blk];
    if (QT == FM_Q6_K) return da * w.d * (float)(sumi - summ);
    return da * w.d * (float)sumi - da * w.m * (float)summ;
}
