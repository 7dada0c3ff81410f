//! AVX2 products of packed weights (eight rows per register, one per lane) and activation rows.
//!
//! The arithmetic is [`super::packed::reference`]'s, lane by lane: each block's integer sum is
//! exact (the 4-bit types add eight `maddubs` results in i16, at most 8 · 2 · 15 · 127 = 30,480,
//! before one `madd`; `Q8_0` widens every `maddubs` at once), then one fused multiply-add by
//! `d · d_a` and, for `Q4_1`, one by `m · s_a`.

use super::avx2::{h2f, kind, ld256, rd_u16, rd_u32, T_Q4_0, T_Q4_1, T_Q8_0};
use super::packed::ROWS;
use super::types::QType;
use std::arch::x86_64::*;

/// How far ahead of the block being read the weights are prefetched, in bytes (the packed
/// matrix is one sequential stream, so a fixed distance covers group boundaries too).
const AHEAD: usize = 2048;

/// 8 f16 at p → 8 f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// Four activation bytes at p, in every 32-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bcast4(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes at p.
    _mm256_set1_epi32(unsafe { rd_u32(p) } as i32)
}

/// One group of eight packed rows (`nb` blocks of kind T from `w`) against R activation rows
/// (stride `arow` bytes from `a`); row `lane`'s product with activation row `j` goes to
/// `out[lane * t + j]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group<const T: u8, const R: usize>(
    w: *const u8,
    nb: usize,
    a: *const u8,
    arow: usize,
    out: *mut f32,
    t: usize,
    prefetch: bool,
) {
    let (wbb, abb, _, has_m) = kind(T);
    let gb = ROWS * wbb;
    let vals = ROWS * if has_m { 4 } else { 2 };
    let (m4, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        // SAFETY: the caller guarantees nb group-blocks at w and nb activation blocks in each
        // of the R rows at a; a prefetch never faults, wherever it points.
        unsafe {
            let p = w.add(i * gb);
            if prefetch {
                let mut line = 0;
                while line < gb {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + line).cast());
                    line += 64;
                }
            }
            let y = |r: usize, v: usize| a.add(r * arow + i * abb + (abb - 32) + v);
            let mut sum = [_mm256_setzero_si256(); R];
            if T == T_Q8_0 {
                for c in 0..8 {
                    let s = ld256(p.add(vals + 32 * c));
                    let u = _mm256_abs_epi8(s);
                    for (r, sum) in sum.iter_mut().enumerate() {
                        let ys = _mm256_sign_epi8(bcast4(y(r, 4 * c)), s);
                        let p16 = _mm256_maddubs_epi16(u, ys);
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p16, ones));
                    }
                }
            } else {
                for c in 0..4 {
                    let raw = ld256(p.add(vals + 32 * c));
                    let lo = _mm256_and_si256(raw, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    let signed = T == T_Q4_0;
                    let (slo, shi) = match signed {
                        true => {
                            let eight = _mm256_set1_epi8(8);
                            (_mm256_sub_epi8(lo, eight), _mm256_sub_epi8(hi, eight))
                        }
                        false => (lo, hi),
                    };
                    let (ulo, uhi) = match signed {
                        true => (_mm256_abs_epi8(slo), _mm256_abs_epi8(shi)),
                        false => (lo, hi),
                    };
                    for (r, sum) in sum.iter_mut().enumerate() {
                        let (mut ya, mut yb) = (bcast4(y(r, 4 * c)), bcast4(y(r, 16 + 4 * c)));
                        if signed {
                            ya = _mm256_sign_epi8(ya, slo);
                            yb = _mm256_sign_epi8(yb, shi);
                        }
                        let p16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(ulo, ya),
                            _mm256_maddubs_epi16(uhi, yb),
                        );
                        *sum = _mm256_add_epi16(*sum, p16);
                    }
                }
                for sum in sum.iter_mut() {
                    *sum = _mm256_madd_epi16(*sum, ones);
                }
            }
            let d = f16x8(p);
            for (r, acc) in acc.iter_mut().enumerate() {
                let ab = a.add(r * arow + i * abb);
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(h2f(rd_u16(ab))));
                *acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum[r]), *acc);
                if has_m {
                    let m = f16x8(p.add(2 * ROWS));
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(h2f(rd_u16(ab.add(2)))), *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees out[lane * t + r] for every lane < 8 and r < R.
        unsafe {
            if t == 1 {
                _mm256_storeu_ps(out, *acc);
            } else {
                let mut v = [0f32; ROWS];
                _mm256_storeu_ps(v.as_mut_ptr(), *acc);
                for (lane, v) in v.iter().enumerate() {
                    *out.add(lane * t + r) = *v;
                }
            }
        }
    }
}

/// Packed rows of kind T against `t` activation rows: `out[r * t + j]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn matmul_t<const T: u8>(w: &[u8], acts: &[u8], n: usize, t: usize, out: &mut [f32]) {
    let (wbb, abb, _, _) = kind(T);
    let (nb, rows) = (n / 32, out.len() / t);
    let (gbytes, arow) = (ROWS * nb * wbb, nb * abb);
    assert!(rows.is_multiple_of(ROWS) && w.len() >= rows / ROWS * gbytes && acts.len() >= t * arow);
    for g in 0..rows / ROWS {
        let wg = w[g * gbytes..].as_ptr();
        let o = out[g * ROWS * t..].as_mut_ptr();
        let mut j = 0;
        while j < t {
            let a = acts[j * arow..].as_ptr();
            let step = match t - j {
                1 => 1,
                2 | 3 => 2,
                _ => 4,
            };
            let (o, first) = (o.wrapping_add(j), j == 0);
            // SAFETY: checked above: the group's nb blocks are in w, activation rows
            // j..j + step <= t in acts, and out holds this group's 8 rows × t results.
            unsafe {
                match step {
                    1 => group::<T, 1>(wg, nb, a, arow, o, t, first),
                    2 => group::<T, 2>(wg, nb, a, arow, o, t, first),
                    _ => group::<T, 4>(wg, nb, a, arow, o, t, first),
                }
            }
            j += step;
        }
    }
}

/// `out[r * t + j] = w_r · a_j` over packed rows of `qt`; false for a type without a packed
/// layout. Lengths as `Kernels::matmul_packed` checks them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn matmul(
    qt: QType,
    w: &[u8],
    acts: &[u8],
    n: usize,
    t: usize,
    out: &mut [f32],
) -> bool {
    match qt {
        QType::Q4_0 => matmul_t::<T_Q4_0>(w, acts, n, t, out),
        QType::Q4_1 => matmul_t::<T_Q4_1>(w, acts, n, t, out),
        QType::Q8_0 => matmul_t::<T_Q8_0>(w, acts, n, t, out),
        _ => return false,
    }
    true
}
