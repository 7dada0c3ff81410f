//! AVX2 + FMA + F16C kernels (also the fallback of the AVX-512 level for the types it lacks).
//!
//! 32-value blocks follow llama.cpp's AVX2 `ggml_vec_dot_*` numerics: per block, eight i32
//! partial sums (`maddubs` + `madd`, or the sign trick for signed weights) are converted to
//! f32 and accumulated with `fma(d_w * d_a, ...)`, then summed horizontally; Q4_1/Q5_1 add
//! `sum(m * s)` at the end.

use super::scalar::KBlock;
use super::types::{Act, ActScales, QType};
use half::f16;
use std::arch::x86_64::*;

// Weight kinds of the 32-value block family (const generic tags).
pub(super) const T_Q4_0: u8 = 0;
pub(super) const T_Q4_1: u8 = 1;
pub(super) const T_Q5_0: u8 = 2;
pub(super) const T_Q5_1: u8 = 3;
pub(super) const T_Q8_0: u8 = 4;

/// (weight block bytes, activation block bytes, signed weights, has min).
pub(super) const fn kind(t: u8) -> (usize, usize, bool, bool) {
    match t {
        T_Q4_0 => (18, 34, true, false),
        T_Q4_1 => (20, 36, false, true),
        T_Q5_0 => (22, 34, true, false),
        T_Q5_1 => (24, 36, false, true),
        _ => (34, 34, true, false),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn ld128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at p; loadu has no alignment need.
    unsafe { _mm_loadu_si128(p.cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn ld256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at p; loadu has no alignment need.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[inline]
pub(super) unsafe fn rd_u16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes at p; read_unaligned has no alignment need.
    u16::from_le(unsafe { p.cast::<u16>().read_unaligned() })
}

#[inline]
pub(super) unsafe fn rd_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes at p; read_unaligned has no alignment need.
    u32::from_le(unsafe { p.cast::<u32>().read_unaligned() })
}

/// f16 bits → f32 (exact, F16C).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn h2f(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Horizontal sum of 8 floats, in llama.cpp's `hsum_float_8` order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum8(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// 16 packed bytes → 32 values in 0..15: low nibbles then high nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    let t = unsafe { ld128(p) };
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
        _mm256_set1_epi8(0x0F),
    )
}

/// Bit j of `x` → 0x10 in byte j (0 otherwise).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bits_x10(x: u32) -> __m256i {
    let shuf = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let b = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let m = _mm256_cmpeq_epi8(_mm256_and_si256(b, sel), sel);
    _mm256_and_si256(m, _mm256_set1_epi8(0x10))
}

/// Unpack one weight block: (|w| or unsigned w, signed w for the sign trick, d, m).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn unpack<const T: u8>(p: *const u8) -> (__m256i, __m256i, f32, f32) {
    // SAFETY: the caller guarantees a whole block of kind T at p.
    unsafe {
        let d = h2f(rd_u16(p));
        match T {
            T_Q4_0 => {
                let s = _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8));
                (_mm256_abs_epi8(s), s, d, 0.0)
            }
            T_Q4_1 => (
                nibbles(p.add(4)),
                _mm256_setzero_si256(),
                d,
                h2f(rd_u16(p.add(2))),
            ),
            T_Q5_0 => {
                let q = _mm256_or_si256(nibbles(p.add(6)), bits_x10(rd_u32(p.add(2))));
                let s = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
                (_mm256_abs_epi8(s), s, d, 0.0)
            }
            T_Q5_1 => {
                let q = _mm256_or_si256(nibbles(p.add(8)), bits_x10(rd_u32(p.add(4))));
                (q, _mm256_setzero_si256(), d, h2f(rd_u16(p.add(2))))
            }
            _ => {
                let s = ld256(p.add(2));
                (_mm256_abs_epi8(s), s, d, 0.0)
            }
        }
    }
}

/// Block i against R activation rows; `da`/`sa` point at the first row's scales, and each
/// row's follow `nb` further on.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const T: u8, const R: usize>(
    w: *const u8,
    a: *const u8,
    arow: usize,
    (da, sa, nb): (*const f32, *const f32, usize),
    i: usize,
    acc: &mut [__m256; R],
    summ: &mut [f32; R],
) {
    let (wbb, abb, signed, has_m) = kind(T);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: the caller guarantees block i exists in the weight row at w and in each of the
    // R activation rows at a (row stride arow), and R rows of nb scales at da and sa.
    unsafe {
        let (q, s, d, m) = unpack::<T>(w.add(i * wbb));
        for r in 0..R {
            let ap = a.add(r * arow + i * abb);
            let mut y = ld256(ap.add(abb - 32));
            if signed {
                y = _mm256_sign_epi8(y, s);
            }
            let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * *da.add(r * nb + i)), p, acc[r]);
            if has_m {
                summ[r] += m * *sa.add(r * nb + i);
            }
        }
    }
}

/// R activation rows (stride `arow` bytes, scales at `sc`) against one weight row of `nb`
/// blocks of kind T. Two independent accumulator sets hide the FMA latency.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile32<const T: u8, const R: usize>(
    w: *const u8,
    a: *const u8,
    arow: usize,
    sc: (*const f32, *const f32, usize),
    out: &mut [f32],
) {
    let nb = sc.2;
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let (mut sm0, mut sm1) = ([0f32; R], [0f32; R]);
    let mut i = 0;
    while i + 2 <= nb {
        // SAFETY: the caller guarantees nb blocks in the weight row and in each activation
        // row, and their scales; indices passed are < nb.
        unsafe {
            block::<T, R>(w, a, arow, sc, i, &mut acc0, &mut sm0);
            block::<T, R>(w, a, arow, sc, i + 1, &mut acc1, &mut sm1);
        }
        i += 2;
    }
    if i < nb {
        // SAFETY: as above, with i < nb.
        unsafe { block::<T, R>(w, a, arow, sc, i, &mut acc0, &mut sm0) };
    }
    for r in 0..R {
        out[r] = hsum8(_mm256_add_ps(acc0[r], acc1[r])) + (sm0[r] + sm1[r]);
    }
}

/// One weight row of kind T against every activation row (`out.len()` rows, stride `arow`),
/// in tiles of up to four.
#[target_feature(enable = "avx2,fma,f16c")]
fn tiles32<const T: u8>(
    w: &[u8],
    acts: &[u8],
    arow: usize,
    sc: &ActScales,
    nb: usize,
    out: &mut [f32],
) {
    let k = out.len();
    assert!(w.len() >= nb * kind(T).0 && acts.len() >= k * arow && sc.d.len() >= k * nb);
    let mut r = 0;
    while r < k {
        let a = acts[r * arow..].as_ptr();
        let s = (sc.d[r * nb..].as_ptr(), sc.s[r * nb..].as_ptr(), nb);
        let o = &mut out[r..];
        let step = match k - r {
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        // SAFETY: checked above: w has nb blocks, acts k rows of arow bytes and sc k rows of
        // nb scales; the tile reads rows r..r + step <= k.
        unsafe {
            match step {
                1 => tile32::<T, 1>(w.as_ptr(), a, arow, s, o),
                2 => tile32::<T, 2>(w.as_ptr(), a, arow, s, o),
                _ => tile32::<T, 4>(w.as_ptr(), a, arow, s, o),
            }
        }
        r += step;
    }
}

/// Consecutive weight rows of kind T against `t` activation rows: `out[r * t + j]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn matmul_t<const T: u8>(
    w: &[u8],
    acts: &[u8],
    sc: &ActScales,
    n: usize,
    t: usize,
    out: &mut [f32],
) {
    let (nb, wb) = (n / 32, n / 32 * kind(T).0);
    let arow = nb * kind(T).1;
    for (r, o) in out.chunks_mut(t).enumerate() {
        tiles32::<T>(&w[r * wb..(r + 1) * wb], acts, arow, sc, nb, o);
    }
}

/// Unpack a K-quant block's values into `kb.q` with SIMD (scales via the scalar code).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_k(qt: QType, b: &[u8], kb: &mut KBlock) {
    kb.unpack_scales(qt, b);
    let m4 = _mm256_set1_epi8(0x0F);
    let p = b.as_ptr();
    let o = kb.q.as_mut_ptr().cast::<__m256i>();
    // SAFETY: b holds a whole block of qt (checked by the caller: 144/176/210 bytes) and
    // kb.q holds 256 bytes; every load/store below stays inside them.
    unsafe {
        match qt {
            QType::Q4K | QType::Q5K => {
                let five = qt == QType::Q5K;
                let qs = if five { p.add(48) } else { p.add(16) };
                let qh = if five {
                    ld256(p.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                let one = _mm256_set1_epi8(1);
                for c in 0..4 {
                    let t = ld256(qs.add(32 * c));
                    let mut lo = _mm256_and_si256(t, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), m4);
                    if five {
                        let sh = _mm_cvtsi32_si128(2 * c as i32);
                        let h = _mm256_srl_epi16(qh, sh);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                        let h = _mm256_srli_epi16(h, 1);
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                    }
                    _mm256_storeu_si256(o.add(2 * c), lo);
                    _mm256_storeu_si256(o.add(2 * c + 1), hi);
                }
            }
            _ => {
                let m2 = _mm256_set1_epi8(3);
                for n in 0..2 {
                    let a = ld256(p.add(64 * n));
                    let c = ld256(p.add(64 * n + 32));
                    let h = ld256(p.add(128 + 32 * n));
                    let hb = |k: i32| {
                        _mm256_slli_epi16(
                            _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(k)), m2),
                            4,
                        )
                    };
                    let v0 = _mm256_or_si256(_mm256_and_si256(a, m4), hb(0));
                    let v1 = _mm256_or_si256(_mm256_and_si256(c, m4), hb(2));
                    let v2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), hb(4));
                    let v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4), hb(6));
                    _mm256_storeu_si256(o.add(4 * n), v0);
                    _mm256_storeu_si256(o.add(4 * n + 1), v1);
                    _mm256_storeu_si256(o.add(4 * n + 2), v2);
                    _mm256_storeu_si256(o.add(4 * n + 3), v3);
                }
            }
        }
    }
}

/// K-quant rows: unpack each super-block once, then every activation row.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_many_k(qt: QType, w: &[u8], acts: &[u8], n: usize, out: &mut [f32]) {
    let arow = Act::Q8K.row_bytes(n);
    let mut kb = KBlock::new();
    let mut scv = [_mm256_setzero_si256(); 8];
    for (ci, oc) in out.chunks_mut(8).enumerate() {
        let acts = &acts[ci * 8 * arow..];
        let mut acc = [_mm256_setzero_ps(); 8];
        for (i, wb) in w.chunks_exact(qt.block_bytes()).enumerate() {
            // SAFETY: wb is one whole block of qt (chunks_exact).
            unsafe { unpack_k(qt, wb, &mut kb) };
            for (g, s) in scv.iter_mut().enumerate() {
                let (lo, hi) = (kb.sc[2 * g], kb.sc[2 * g + 1]);
                *s = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
            }
            let qp = kb.q.as_ptr();
            // SAFETY: kb.mn holds 16 i16 = 32 bytes.
            let mn = unsafe { ld256(kb.mn.as_ptr().cast()) };
            for (r, accr) in acc.iter_mut().take(oc.len()).enumerate() {
                let ab = &acts[r * arow + i * 292..r * arow + (i + 1) * 292];
                let ap = ab.as_ptr();
                let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
                // SAFETY: ab is one whole 292-byte Q8_K block (slice-checked above); kb.q has
                // 256 bytes.
                unsafe {
                    let mut si = _mm256_setzero_si256();
                    for (g, s) in scv.iter().enumerate() {
                        let p16 =
                            _mm256_maddubs_epi16(ld256(qp.add(32 * g)), ld256(ap.add(4 + 32 * g)));
                        si = _mm256_add_epi32(si, _mm256_madd_epi16(p16, *s));
                    }
                    let sm = _mm256_madd_epi16(mn, ld256(ap.add(260)));
                    let d = _mm256_set1_ps(da * kb.d);
                    if kb.q6 {
                        let t = _mm256_cvtepi32_ps(_mm256_sub_epi32(si, sm));
                        *accr = _mm256_fmadd_ps(d, t, *accr);
                    } else {
                        *accr = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(si), *accr);
                        let dm = _mm256_set1_ps(-(da * kb.dmin));
                        *accr = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(sm), *accr);
                    }
                }
            }
        }
        for (o, a) in oc.iter_mut().zip(&acc) {
            *o = hsum8(*a);
        }
    }
}

/// Plain f32 or f16 rows.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_float(f16w: bool, w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let es = if f16w { 2 } else { 4 };
    let ld = |p: *const u8| -> __m256 {
        // SAFETY: callers below only pass offsets with 8 whole elements left in w / a.
        unsafe {
            if f16w {
                _mm256_cvtph_ps(ld128(p))
            } else {
                _mm256_loadu_ps(p.cast())
            }
        }
    };
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut i = 0;
    while i + 32 <= n {
        for (k, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= n elements, within w and a (both n elements).
            let (x, y) = unsafe { (ld(wp.add((i + 8 * k) * es)), ld(ap.add((i + 8 * k) * es))) };
            *s = _mm256_fmadd_ps(x, y, *s);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements.
        let (x, y) = unsafe { (ld(wp.add(i * es)), ld(ap.add(i * es))) };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum8(s);
    for j in i..n {
        sum += if f16w {
            super::scalar::rd_f16(w, 2 * j) * super::scalar::rd_f16(a, 2 * j)
        } else {
            f32::from_le_bytes(w[4 * j..4 * j + 4].try_into().unwrap_or_default())
                * f32::from_le_bytes(a[4 * j..4 * j + 4].try_into().unwrap_or_default())
        };
    }
    sum
}

/// `out[r] = w · acts[r]`; false when this level has no kernel for `qt`.
/// Lengths: w = qt.row_bytes(n), acts = out.len() * qt.act().row_bytes(n) (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_many(qt: QType, w: &[u8], acts: &[u8], n: usize, out: &mut [f32]) -> bool {
    let arow = qt.act().row_bytes(n);
    assert!(w.len() >= qt.row_bytes(n) && acts.len() >= arow * out.len());
    let nb = n / 32;
    match qt {
        QType::F32 | QType::F16 => {
            for (o, a) in out.iter_mut().zip(acts.chunks_exact(arow)) {
                *o = dot_float(qt == QType::F16, w, a, n);
            }
        }
        QType::Q4K | QType::Q5K | QType::Q6K => dot_many_k(qt, w, acts, n, out),
        QType::Q4_0 => dot_rows::<T_Q4_0>(w, acts, arow, nb, out),
        QType::Q4_1 => dot_rows::<T_Q4_1>(w, acts, arow, nb, out),
        QType::Q5_0 => dot_rows::<T_Q5_0>(w, acts, arow, nb, out),
        QType::Q5_1 => dot_rows::<T_Q5_1>(w, acts, arow, nb, out),
        QType::Q8_0 => dot_rows::<T_Q8_0>(w, acts, arow, nb, out),
    }
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_rows<const T: u8>(w: &[u8], acts: &[u8], arow: usize, nb: usize, out: &mut [f32]) {
    let act = if kind(T).3 { Act::Q8_1 } else { Act::Q8_0 };
    let sc = ActScales::of(act, acts, nb * 32, out.len());
    tiles32::<T>(w, acts, arow, &sc, nb, out);
}

/// `out[r * t + j] = w_r · a_j` for consecutive weight rows of a 32-value block type, with
/// the activations' scales `sc`; false for other types. Bit-identical to `dot_many` row by
/// row. Lengths as `Kernels::matmul` checks them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn matmul(
    qt: QType,
    w: &[u8],
    acts: &[u8],
    sc: &ActScales,
    n: usize,
    t: usize,
    out: &mut [f32],
) -> bool {
    match qt {
        QType::Q4_0 => matmul_t::<T_Q4_0>(w, acts, sc, n, t, out),
        QType::Q4_1 => matmul_t::<T_Q4_1>(w, acts, sc, n, t, out),
        QType::Q5_0 => matmul_t::<T_Q5_0>(w, acts, sc, n, t, out),
        QType::Q5_1 => matmul_t::<T_Q5_1>(w, acts, sc, n, t, out),
        QType::Q8_0 => matmul_t::<T_Q8_0>(w, acts, sc, n, t, out),
        _ => return false,
    }
    true
}

/// `sum k[i] * q[i]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn dot_f16(k: &[f16], q: &[f32]) -> f32 {
    let n = k.len().min(q.len());
    let (kp, qp) = (k.as_ptr().cast::<u8>(), q.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= n elements of k and q.
            let (x, y) = unsafe {
                (
                    _mm256_cvtph_ps(ld128(kp.add(2 * (i + 8 * j)))),
                    _mm256_loadu_ps(qp.add(i + 8 * j)),
                )
            };
            *s = _mm256_fmadd_ps(x, y, *s);
        }
        i += 16;
    }
    let mut sum = hsum8(_mm256_add_ps(acc[0], acc[1]));
    for j in i..n {
        sum += k[j].to_f32() * q[j];
    }
    sum
}

/// `y += a * v`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn axpy_f16(y: &mut [f32], a: f32, v: &[f16]) {
    let n = y.len().min(v.len());
    let (yp, vp) = (y.as_mut_ptr(), v.as_ptr().cast::<u8>());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements of y and v.
        unsafe {
            let x = _mm256_cvtph_ps(ld128(vp.add(2 * i)));
            _mm256_storeu_ps(
                yp.add(i),
                _mm256_fmadd_ps(av, x, _mm256_loadu_ps(yp.add(i))),
            );
        }
        i += 8;
    }
    for j in i..n {
        y[j] += a * v[j].to_f32();
    }
}

/// f32 → f16, round to nearest even.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn to_f16(x: &[f32], out: &mut [f16]) {
    let n = x.len().min(out.len());
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr().cast::<u8>());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements of x and out.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(xp.add(i)));
            _mm_storeu_si128(op.add(2 * i).cast(), h);
        }
        i += 8;
    }
    for j in i..n {
        out[j] = f16::from_f32(x[j]);
    }
}
