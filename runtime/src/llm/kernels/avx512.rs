//! AVX-512 (F, BW, VL) + VNNI kernels for the 32-value block types.
//!
//! Two blocks share one 512-bit register. Unsigned weights (Q4_1, Q5_1) go straight into
//! `vpdpbusd` against the signed activations; signed weights (Q4_0, Q5_0, Q8_0) use |w| and
//! negate the activation bytes where w < 0 (a mask computed once per weight block pair).
//! Integer sums are exact; each block's i32 partials are scaled by `d_w * d_a` in f32.

use super::avx2::{kind, rd_u16, rd_u32};
use super::types::QType;
use std::arch::x86_64::*;

const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q5_1: u8 = 3;
const T_Q8_0: u8 = 4;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn ld128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at p; loadu has no alignment need.
    unsafe { _mm_loadu_si128(p.cast()) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn ld256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at p; loadu has no alignment need.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// 32 bytes at p0 then 32 bytes at p1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn ld2x256(p0: *const u8, p1: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 32 readable bytes at p0 and at p1.
    unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ld256(p0)), ld256(p1)) }
}

/// Two f16 fields per block (or one, `pair` false) of two blocks → [a0, b0, a1, b1] as f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn halves(p0: *const u8, p1: *const u8, pair: bool, two: bool) -> __m128 {
    // SAFETY: the caller guarantees 4 (pair) or 2 readable bytes at p0 and p1.
    let (x0, x1) = unsafe {
        if pair {
            (rd_u32(p0) as u64, rd_u32(p1) as u64)
        } else {
            (rd_u16(p0) as u64, rd_u16(p1) as u64)
        }
    };
    let bits = if two { x0 | (x1 << 32) } else { x0 };
    _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64))
}

/// Unpack the weight blocks at p0 and p1 (p1 == p0 and `two` false for a lone last block):
/// (|w| or unsigned w, mask of negative w, [d0, m0, d1, m1]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn unpack2<const T: u8>(
    p0: *const u8,
    p1: *const u8,
    two: bool,
) -> (__m512i, __mmask64, __m128) {
    let (_, _, signed, has_m) = kind(T);
    // SAFETY: the caller guarantees whole blocks of kind T at p0 and p1.
    unsafe {
        let dm = halves(p0, p1, has_m, two);
        let q = match T {
            T_Q8_0 => ld2x256(p0.add(2), p1.add(2)),
            _ => {
                let qoff = match T {
                    T_Q4_0 => 2,
                    T_Q4_1 => 4,
                    T_Q5_0 => 6,
                    _ => 8,
                };
                let t = _mm256_set_m128i(ld128(p1.add(qoff)), ld128(p0.add(qoff)));
                let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4));
                let z = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
                // [lo0, lo1, hi0, hi1] → [lo0, hi0, lo1, hi1]
                let z = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7), z);
                if T == T_Q5_0 || T == T_Q5_1 {
                    let hoff = if T == T_Q5_0 { 2 } else { 4 };
                    let hm = rd_u32(p0.add(hoff)) as u64 | (rd_u32(p1.add(hoff)) as u64) << 32;
                    _mm512_mask_add_epi8(z, hm, z, _mm512_set1_epi8(16))
                } else {
                    z
                }
            }
        };
        if !signed {
            return (q, 0, dm);
        }
        let s = match T {
            T_Q4_0 => _mm512_sub_epi8(q, _mm512_set1_epi8(8)),
            T_Q5_0 => _mm512_sub_epi8(q, _mm512_set1_epi8(16)),
            _ => q,
        };
        (_mm512_abs_epi8(s), _mm512_movepi8_mask(s), dm)
    }
}

/// Blocks i and i1 (i1 == i and `two` false for a lone last block) against R rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pair<const T: u8, const R: usize>(
    w: *const u8,
    a: *const u8,
    arow: usize,
    i: usize,
    two: bool,
    acc: &mut [__m512; R],
    summ: &mut [__m128; R],
) {
    let (wbb, abb, signed, has_m) = kind(T);
    let i1 = if two { i + 1 } else { i };
    let sc_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let zero = _mm512_setzero_si512();
    // SAFETY: the caller guarantees blocks i and i1 exist in the weight row at w and in each
    // of the R activation rows at a (row stride arow).
    unsafe {
        let (q, neg, wdm) = unpack2::<T>(w.add(i * wbb), w.add(i1 * wbb), two);
        for r in 0..R {
            let a0 = a.add(r * arow + i * abb);
            let a1 = a.add(r * arow + i1 * abb);
            let mut y = ld2x256(a0.add(abb - 32), a1.add(abb - 32));
            if signed {
                y = _mm512_mask_sub_epi8(y, neg, zero, y);
            }
            let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, q, y));
            let ds = _mm_mul_ps(wdm, halves(a0, a1, has_m, two));
            let scale = _mm512_permutexvar_ps(sc_idx, _mm512_castps128_ps512(ds));
            acc[r] = _mm512_fmadd_ps(scale, p, acc[r]);
            if has_m {
                summ[r] = _mm_add_ps(summ[r], ds);
            }
        }
    }
}

/// R activation rows (stride `arow` bytes) against one weight row of `nb` blocks of kind T.
/// Two independent accumulator sets hide the FMA latency.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile32<const T: u8, const R: usize>(
    w: *const u8,
    a: *const u8,
    arow: usize,
    nb: usize,
    out: &mut [f32],
) {
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
    let (mut sm0, mut sm1) = ([_mm_setzero_ps(); R], [_mm_setzero_ps(); R]);
    let mut i = 0;
    while i + 4 <= nb {
        // SAFETY: the caller guarantees nb blocks in the weight row and in each activation row; indices passed are < nb.
        unsafe { pair::<T, R>(w, a, arow, i, true, &mut acc0, &mut sm0) };
        // SAFETY: the caller guarantees nb blocks in the weight row and in each activation row; indices passed are < nb.
        unsafe { pair::<T, R>(w, a, arow, i + 2, true, &mut acc1, &mut sm1) };
        i += 4;
    }
    while i < nb {
        // SAFETY: the caller guarantees nb blocks in the weight row and in each activation row; indices passed are < nb.
        unsafe { pair::<T, R>(w, a, arow, i, i + 1 < nb, &mut acc0, &mut sm0) };
        i += 2;
    }
    for r in 0..R {
        let s = _mm_add_ps(sm0[r], sm1[r]);
        let m = _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(s, s))
            + _mm_cvtss_f32(_mm_shuffle_ps::<0b11>(s, s));
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + m;
    }
}

macro_rules! tiles32 {
    ($t:expr, $w:expr, $acts:expr, $arow:expr, $nb:expr, $out:expr) => {{
        let k = $out.len();
        let mut r = 0;
        while r < k {
            let a = $acts[r * $arow..].as_ptr();
            let o = &mut $out[r..];
            let step = match k - r {
                1 => 1,
                2 | 3 => 2,
                4..=7 => 4,
                _ => 8,
            };
            // SAFETY: the entry point checked w (nb blocks) and acts (k rows of arow bytes);
            // the tile reads rows r..r + step <= k.
            unsafe {
                match step {
                    1 => tile32::<{ $t }, 1>($w.as_ptr(), a, $arow, $nb, o),
                    2 => tile32::<{ $t }, 2>($w.as_ptr(), a, $arow, $nb, o),
                    4 => tile32::<{ $t }, 4>($w.as_ptr(), a, $arow, $nb, o),
                    _ => tile32::<{ $t }, 8>($w.as_ptr(), a, $arow, $nb, o),
                }
            }
            r += step;
        }
    }};
}

/// `out[r] = w · acts[r]`; false when this level has no kernel for `qt` (the caller then
/// uses the AVX2 level).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn dot_many(qt: QType, w: &[u8], acts: &[u8], n: usize, out: &mut [f32]) -> bool {
    let arow = qt.act().row_bytes(n);
    assert!(w.len() >= qt.row_bytes(n) && acts.len() >= arow * out.len());
    let nb = n / 32;
    match qt {
        QType::Q4_0 => tiles32!(T_Q4_0, w, acts, arow, nb, out),
        QType::Q4_1 => tiles32!(T_Q4_1, w, acts, arow, nb, out),
        QType::Q5_0 => tiles32!(T_Q5_0, w, acts, arow, nb, out),
        QType::Q5_1 => tiles32!(T_Q5_1, w, acts, arow, nb, out),
        QType::Q8_0 => tiles32!(T_Q8_0, w, acts, arow, nb, out),
        _ => return false,
    }
    true
}

/// Blocks i and i1 of R weight rows (stride `wrow` bytes) against one activation row: the
/// activation pair is loaded once for all R rows. Per row, the same operations as `pair`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_rows<const T: u8, const R: usize>(
    w: *const u8,
    wrow: usize,
    a: *const u8,
    i: usize,
    two: bool,
    acc: &mut [__m512; R],
    summ: &mut [__m128; R],
) {
    let (wbb, abb, signed, has_m) = kind(T);
    let i1 = if two { i + 1 } else { i };
    let sc_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let zero = _mm512_setzero_si512();
    // SAFETY: the caller guarantees blocks i and i1 in each of the R weight rows at w (stride
    // wrow) and in the activation row at a.
    unsafe {
        let (a0, a1) = (a.add(i * abb), a.add(i1 * abb));
        let y0 = ld2x256(a0.add(abb - 32), a1.add(abb - 32));
        let adm = halves(a0, a1, has_m, two);
        for r in 0..R {
            let wr = w.add(r * wrow);
            let (q, neg, wdm) = unpack2::<T>(wr.add(i * wbb), wr.add(i1 * wbb), two);
            let y = if signed {
                _mm512_mask_sub_epi8(y0, neg, zero, y0)
            } else {
                y0
            };
            let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, q, y));
            let ds = _mm_mul_ps(wdm, adm);
            let scale = _mm512_permutexvar_ps(sc_idx, _mm512_castps128_ps512(ds));
            acc[r] = _mm512_fmadd_ps(scale, p, acc[r]);
            if has_m {
                summ[r] = _mm_add_ps(summ[r], ds);
            }
        }
    }
}

/// R weight rows (stride `wrow`) of `nb` blocks against one activation row; per row the
/// block order and sums of `tile32::<T, 1>`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows<const T: u8, const R: usize>(
    w: *const u8,
    wrow: usize,
    a: *const u8,
    nb: usize,
    out: &mut [f32],
) {
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
    let (mut sm0, mut sm1) = ([_mm_setzero_ps(); R], [_mm_setzero_ps(); R]);
    let mut i = 0;
    while i + 4 <= nb {
        // SAFETY: the caller guarantees nb blocks in each weight row and in the activation
        // row; indices passed are < nb.
        unsafe {
            pair_rows::<T, R>(w, wrow, a, i, true, &mut acc0, &mut sm0);
            pair_rows::<T, R>(w, wrow, a, i + 2, true, &mut acc1, &mut sm1);
        }
        i += 4;
    }
    while i < nb {
        // SAFETY: as above, with i < nb (and i + 1 < nb when two blocks are read).
        unsafe { pair_rows::<T, R>(w, wrow, a, i, i + 1 < nb, &mut acc0, &mut sm0) };
        i += 2;
    }
    for r in 0..R {
        let s = _mm_add_ps(sm0[r], sm1[r]);
        let m = _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(s, s))
            + _mm_cvtss_f32(_mm_shuffle_ps::<0b11>(s, s));
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + m;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn gemv_t<const T: u8>(w: &[u8], a: &[u8], nb: usize, out: &mut [f32]) {
    let wrow = nb * kind(T).0;
    let n = out.len();
    let mut r = 0;
    while r + 4 <= n {
        // SAFETY: w holds n rows of wrow bytes and a one row of nb blocks (checked by the
        // caller); this reads rows r..r + 4 <= n.
        unsafe { rows::<T, 4>(w[r * wrow..].as_ptr(), wrow, a.as_ptr(), nb, &mut out[r..]) };
        r += 4;
    }
    while r < n {
        // SAFETY: as above, for row r < n.
        unsafe { rows::<T, 1>(w[r * wrow..].as_ptr(), wrow, a.as_ptr(), nb, &mut out[r..]) };
        r += 1;
    }
}

/// `out[r] = w_r · a` for the `out.len()` rows of `w` and one activation row; false when
/// this level has no kernel for `qt`. Bit-identical to `dot_many` row by row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) fn gemv(qt: QType, w: &[u8], a: &[u8], n: usize, out: &mut [f32]) -> bool {
    if qt.block_elems() != 32 {
        return false;
    }
    let nb = n / 32;
    assert!(w.len() >= out.len() * qt.row_bytes(n) && a.len() >= qt.act().row_bytes(n));
    match qt {
        QType::Q4_0 => gemv_t::<T_Q4_0>(w, a, nb, out),
        QType::Q4_1 => gemv_t::<T_Q4_1>(w, a, nb, out),
        QType::Q5_0 => gemv_t::<T_Q5_0>(w, a, nb, out),
        QType::Q5_1 => gemv_t::<T_Q5_1>(w, a, nb, out),
        QType::Q8_0 => gemv_t::<T_Q8_0>(w, a, nb, out),
        _ => return false,
    }
    true
}
