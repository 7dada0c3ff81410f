//! AVX2 activation quantization (Q8_0, Q8_1, Q8_K, F16), bit-identical to the scalar level.
//!
//! Every step is exact or the same IEEE operation as the scalar code: the block maximum of
//! |x| (order-free), one f32 multiply per value, round half to even (`vroundps`), saturating
//! packs (the scalar clamp), integer sums, and the same scalar f16 stores of the scales.

use super::types::{Act, QK_K};
use half::f16;
use std::arch::x86_64::*;

/// Load 32 floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn ld32(p: *const f32) -> [__m256; 4] {
    // SAFETY: the caller guarantees 32 readable floats at p.
    unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

/// max |v| over 8-lane vectors, as a scalar.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn amax(v: &[__m256]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
    }
    let h = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

/// round_half_even(v * k) as i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn round_mul(v: __m256, k: __m256) -> __m256i {
    let r =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, k));
    _mm256_cvtps_epi32(r)
}

/// Four vectors of i32 (32 values in order) → 32 i8 with saturation, in order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn pack32(q: [__m256i; 4]) -> __m256i {
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    let c = _mm256_packs_epi16(a, b);
    // packs work per 128-bit lane: dwords come out as 0 2 4 6 1 3 5 7 of the wanted order.
    _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Horizontal sum of 8 i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_i32(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_extracti128_si256(x, 1), _mm256_castsi256_si128(x));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

fn wr_f16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Q8_0 / Q8_1 blocks (see `scalar::q8_blocks`).
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_blocks(x: &[f32], out: &mut [u8], with_sum: bool) {
    let bb = if with_sum { 36 } else { 34 };
    let qoff = bb - 32;
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(bb)) {
        // SAFETY: xb has 32 floats (chunks_exact).
        let v = unsafe { ld32(xb.as_ptr()) };
        let am = amax(&v);
        let d = am / 127.0;
        let id = _mm256_set1_ps(if am != 0.0 { 127.0 / am } else { 0.0 });
        let q = [
            round_mul(v[0], id),
            round_mul(v[1], id),
            round_mul(v[2], id),
            round_mul(v[3], id),
        ];
        let packed = pack32(q);
        // SAFETY: ob[qoff..] has 32 bytes (bb - qoff).
        unsafe { _mm256_storeu_si256(ob[qoff..].as_mut_ptr().cast(), packed) };
        wr_f16(ob, d);
        if with_sum {
            // |q| <= 127 before the pack, so the sums of the i32 lanes equal the stored bytes'.
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            wr_f16(&mut ob[2..], d * hsum_i32(s) as f32);
        }
    }
}

/// Q8_K blocks (see `scalar::quantize_q8k`).
#[target_feature(enable = "avx2,fma,f16c")]
fn q8k_blocks(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(292)) {
        let mut v = [_mm256_setzero_ps(); 32];
        for (c, vc) in v.chunks_exact_mut(4).enumerate() {
            // SAFETY: xb has 256 floats; c < 8 reads floats 32c..32c + 32.
            vc.copy_from_slice(&unsafe { ld32(xb.as_ptr().add(32 * c)) });
        }
        let am = amax(&v);
        if am == 0.0 {
            ob.fill(0);
            continue;
        }
        // The first value of largest magnitude, with its sign (the scalar scan's choice).
        let sign = _mm256_set1_ps(-0.0);
        let target = _mm256_set1_ps(am);
        let mut max = am;
        for (c, x8) in v.iter().enumerate() {
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                _mm256_andnot_ps(sign, *x8),
                target,
            ));
            if hit != 0 {
                max = xb[8 * c + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let k = _mm256_set1_ps(iscale);
        for c in 0..8 {
            let q = [
                round_mul(v[4 * c], k),
                round_mul(v[4 * c + 1], k),
                round_mul(v[4 * c + 2], k),
                round_mul(v[4 * c + 3], k),
            ];
            // SAFETY: ob has 292 bytes; bytes 4 + 32c .. 4 + 32c + 32 lie inside the values.
            unsafe { _mm256_storeu_si256(ob[4 + 32 * c..].as_mut_ptr().cast(), pack32(q)) };
            // |q| <= 127 (|iscale * v| <= 127), so the i32 sums are the stored values' sums.
            let s0 = hsum_i32(_mm256_add_epi32(q[0], q[1]));
            let s1 = hsum_i32(_mm256_add_epi32(q[2], q[3]));
            ob[260 + 4 * c..262 + 4 * c].copy_from_slice(&(s0 as i16).to_le_bytes());
            ob[262 + 4 * c..264 + 4 * c].copy_from_slice(&(s1 as i16).to_le_bytes());
        }
        ob[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// Quantize one activation row; false for formats this level leaves to the scalar code.
/// `out` has `act.row_bytes(x.len())` bytes (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_act(act: Act, x: &[f32], out: &mut [u8]) -> bool {
    match act {
        Act::Q8_0 => q8_blocks(x, out, false),
        Act::Q8_1 => q8_blocks(x, out, true),
        Act::Q8K => q8k_blocks(x, out),
        Act::F16 => {
            let n = x.len();
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: i + 8 <= n floats in x and 2n bytes in out.
                unsafe {
                    let h =
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(xp.add(i)));
                    _mm_storeu_si128(op.add(2 * i).cast(), h);
                }
                i += 8;
            }
            for j in i..n {
                out[2 * j..2 * j + 2].copy_from_slice(&f16::from_f32(x[j]).to_le_bytes());
            }
        }
        Act::F32 => return false,
    }
    true
}
