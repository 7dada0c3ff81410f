//! AVX2 attention helpers over rows of the f16 KV cache: all scores of a head in one call,
//! and the probability-weighted sum of V rows with the output held in registers.
//!
//! Each score is computed exactly as `avx2::dot_f16` computes it, and each output value
//! takes the same fused multiply-adds in the same order as repeated `avx2::axpy_f16`, so
//! the results are bit-identical to the one-row-at-a-time calls.

use super::avx2::dot_f16;
use half::f16;
use std::arch::x86_64::*;

/// `out[j] = rows[j] · q`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_f16_rows(rows: &[&[f16]], q: &[f32], out: &mut [f32]) {
    for (o, k) in out.iter_mut().zip(rows) {
        *o = dot_f16(k, q);
    }
}

/// `y += p[j] * rows[j]` for every j in order.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn axpy_f16_rows(y: &mut [f32], p: &[f32], rows: &[&[f16]]) {
    let n = y.len();
    assert!(
        rows.iter().all(|r| r.len() >= n),
        "axpy_f16_rows: short row"
    );
    let yp = y.as_mut_ptr();
    let mut c = 0;
    // 32 outputs at a time stay in four registers across all rows.
    while c + 32 <= n {
        // SAFETY: c + 32 <= n elements of y and of every row (checked above).
        unsafe {
            let mut acc = [
                _mm256_loadu_ps(yp.add(c)),
                _mm256_loadu_ps(yp.add(c + 8)),
                _mm256_loadu_ps(yp.add(c + 16)),
                _mm256_loadu_ps(yp.add(c + 24)),
            ];
            for (&a, v) in p.iter().zip(rows) {
                let av = _mm256_set1_ps(a);
                let vp = v.as_ptr().add(c).cast::<__m128i>();
                for (k, s) in acc.iter_mut().enumerate() {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(k)));
                    *s = _mm256_fmadd_ps(av, x, *s);
                }
            }
            for (k, s) in acc.iter().enumerate() {
                _mm256_storeu_ps(yp.add(c + 8 * k), *s);
            }
        }
        c += 32;
    }
    while c + 8 <= n {
        // SAFETY: c + 8 <= n elements of y and of every row.
        unsafe {
            let mut s = _mm256_loadu_ps(yp.add(c));
            for (&a, v) in p.iter().zip(rows) {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(c).cast()));
                s = _mm256_fmadd_ps(_mm256_set1_ps(a), x, s);
            }
            _mm256_storeu_ps(yp.add(c), s);
        }
        c += 8;
    }
    for (j, yj) in y.iter_mut().enumerate().skip(c) {
        for (&a, v) in p.iter().zip(rows) {
            *yj += a * v[j].to_f32();
        }
    }
}
