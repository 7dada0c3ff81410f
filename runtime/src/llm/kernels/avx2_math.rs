//! AVX2 `exp` for the activations and the attention's softmax: eight values at a time,
//! within 2 ulp of `f32::exp` over the range the engine uses (checked in the unit tests).
//!
//! `exp(x) = 2^n · e^r` with `n = round(x / ln 2)` and `r = x − n·ln 2` (ln 2 in two parts,
//! so `r` is exact to a few ulp), `e^r` by its Taylor series to degree 7 (|r| ≤ ln 2 / 2:
//! the first term left out is below 2^-27 of the result), and `2^n` built in the exponent
//! bits. `x` is clamped to [-87, 88] first, so `2^n` stays a normal float: below −87 the
//! result is e^-87 (~1.6e-38) rather than smaller, which no caller can tell from zero.

use std::arch::x86_64::*;

const LO: f32 = -87.0;
const HI: f32 = 88.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1/k! for k = 7 down to 2.
const INV_FACT: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// `exp` of eight values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(INV_FACT[0]);
    for c in &INV_FACT[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
}

/// `exp` of one value, by the same steps.
#[target_feature(enable = "avx2,fma,f16c")]
fn exp1(x: f32) -> f32 {
    _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)))
}

/// `g = silu(g) · u = g / (1 + e^-g) · u`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn silu_mul(g: &mut [f32], u: &[f32]) {
    let n = g.len().min(u.len());
    let (gp, up) = (g.as_mut_ptr(), u.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n values of g and u.
        unsafe {
            let x = _mm256_loadu_ps(gp.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
        }
        i += 8;
    }
    for j in i..n {
        g[j] = g[j] / (1.0 + exp1(-g[j])) * u[j];
    }
}

/// `x = e^(x − max)` in place; returns the sum of the results (in f64).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn exp_shifted(xs: &mut [f32], max: f32) -> f64 {
    let (n, p) = (xs.len(), xs.as_mut_ptr());
    let m = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_pd();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n values of xs.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
        i += 8;
    }
    let mut lanes = [0f64; 4];
    // SAFETY: lanes holds four f64.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), sum) };
    let mut total: f64 = lanes.iter().sum();
    for x in &mut xs[i..] {
        *x = exp1(*x - max);
        total += *x as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        if !super::super::has_avx2() {
            return;
        }
        let mut worst = (0, 0.0);
        let mut x = -87.0f32;
        while x <= 88.0 {
            // SAFETY: AVX2, FMA and F16C were detected above.
            let got = unsafe { exp1(x) };
            let d = ulps(got, x.exp());
            if d > worst.0 {
                worst = (d, x);
            }
            x += 0.000_731;
        }
        assert!(worst.0 <= 2, "exp({}) is {} ulp off", worst.1, worst.0);
        // Clamped below −87: a tiny normal number, never zero, infinite or NaN.
        // SAFETY: as above.
        let tiny = unsafe { exp1(-1000.0) };
        assert!(tiny > 0.0 && tiny < 1e-37, "{tiny}");
    }

    #[test]
    fn silu_and_softmax_match_the_scalar_forms() {
        if !super::super::has_avx2() {
            return;
        }
        let g: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.37).collect();
        let u: Vec<f32> = (0..203).map(|i| 1.0 - i as f32 * 0.01).collect();
        let mut got = g.clone();
        // SAFETY: AVX2, FMA and F16C were detected above.
        unsafe { silu_mul(&mut got, &u) };
        for ((o, g), u) in got.iter().zip(&g).zip(&u) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{o} vs {want}"
            );
        }
        let mut xs = g.clone();
        // SAFETY: as above.
        let sum = unsafe { exp_shifted(&mut xs, 37.0) };
        let want: f64 = g.iter().map(|x| (x - 37.0).exp() as f64).sum();
        assert!((sum - want).abs() <= 1e-6 * want, "{sum} vs {want}");
        for (e, x) in xs.iter().zip(&g) {
            assert!(ulps(*e, (x - 37.0).exp()) <= 2);
        }
    }
}
