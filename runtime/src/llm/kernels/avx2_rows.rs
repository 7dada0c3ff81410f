//! AVX2 matrix × one activation row (the decode step): four weight rows at a time share
//! each activation block's load and its scales, converted to f32 once per call.
//!
//! Each (weight row, activation row) pair goes through exactly the operations of
//! `avx2::tile32` (two accumulator sets over even and odd blocks, the same fused scale step,
//! the same final sums), so results are bit-identical to `dot_many` on this level: a lone
//! sequence and the same sequence inside a batch get the same logits.

use super::avx2::{hsum8, kind, ld256, rd_u16, unpack, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0};
use super::types::QType;
use std::arch::x86_64::*;

/// Most blocks per row this kernel takes (the scales live on the stack).
const MAX_BLOCKS: usize = 256;

/// How many groups of rows ahead the weights are prefetched (measured: 2 reads the decode
/// step's matrices at 5–10 GB/s per core where 1 reads them at 4.5–9, none at 3.3–4.6).
const AHEAD: usize = 2;

/// Block i of R weight rows (stride `wrow` bytes) against the activation block at `ap`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const T: u8, const R: usize>(
    w: *const u8,
    wrow: usize,
    ap: *const u8,
    i: usize,
    da: f32,
    sa: f32,
    acc: &mut [__m256; R],
    summ: &mut [f32; R],
) {
    let (wbb, abb, signed, has_m) = kind(T);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: the caller guarantees block i in each of the R weight rows and a whole
    // activation block at ap.
    unsafe {
        let y = ld256(ap.add(abb - 32));
        for r in 0..R {
            let (q, s, d, m) = unpack::<T>(w.add(r * wrow + i * wbb));
            let y = if signed { _mm256_sign_epi8(y, s) } else { y };
            let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), p, acc[r]);
            if has_m {
                summ[r] += m * sa;
            }
        }
    }
}

/// R weight rows (stride `wrow`) of `nb` blocks against one activation row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const T: u8, const R: usize>(
    w: *const u8,
    wrow: usize,
    a: *const u8,
    nb: usize,
    da: &[f32],
    sa: &[f32],
    out: &mut [f32],
) {
    let (wbb, abb, _, _) = kind(T);
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let (mut sm0, mut sm1) = ([0f32; R], [0f32; R]);
    // The next groups of R rows follow these in memory: while two blocks of each row here are
    // read, the lines of two blocks' worth of the group AHEAD groups on are fetched, so it
    // finds its weights in the cache (the hardware prefetcher alone leaves the decode step
    // waiting on memory). A prefetch past the matrix's end is harmless: it never faults.
    let ahead = w.wrapping_add(AHEAD * R * wrow);
    let mut i = 0;
    while i + 2 <= nb {
        let mut line = 0;
        while line < 2 * R * wbb {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(i * R * wbb + line).cast());
            line += 64;
        }
        // SAFETY: the caller guarantees nb blocks in each weight row and in the activation
        // row; indices passed are < nb, and da/sa hold nb entries.
        unsafe {
            block::<T, R>(
                w,
                wrow,
                a.add(i * abb),
                i,
                da[i],
                sa[i],
                &mut acc0,
                &mut sm0,
            );
            let j = i + 1;
            block::<T, R>(
                w,
                wrow,
                a.add(j * abb),
                j,
                da[j],
                sa[j],
                &mut acc1,
                &mut sm1,
            );
        }
        i += 2;
    }
    if i < nb {
        // SAFETY: as above, with i < nb.
        unsafe {
            block::<T, R>(
                w,
                wrow,
                a.add(i * abb),
                i,
                da[i],
                sa[i],
                &mut acc0,
                &mut sm0,
            )
        };
    }
    for r in 0..R {
        out[r] = hsum8(_mm256_add_ps(acc0[r], acc1[r])) + (sm0[r] + sm1[r]);
    }
}

/// All weight rows of `w` (`out.len()` rows of `nb` blocks of kind T) against one activation row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_t<const T: u8>(w: &[u8], a: &[u8], nb: usize, out: &mut [f32]) {
    let (wbb, abb, _, has_m) = kind(T);
    let wrow = nb * wbb;
    let mut da = [0f32; MAX_BLOCKS];
    let mut sa = [0f32; MAX_BLOCKS];
    for i in 0..nb {
        let b = &a[i * abb..];
        // SAFETY: b holds a whole activation block (a has nb blocks, checked by the caller).
        unsafe {
            da[i] = super::avx2::h2f(rd_u16(b.as_ptr()));
            if has_m {
                sa[i] = super::avx2::h2f(rd_u16(b.as_ptr().add(2)));
            }
        }
    }
    let (da, sa) = (&da[..nb], &sa[..nb]);
    let rows_n = out.len();
    let mut r = 0;
    while r + 4 <= rows_n {
        // SAFETY: w holds rows_n rows of wrow bytes (checked by the caller); this reads rows
        // r..r + 4 <= rows_n and nb activation blocks.
        unsafe {
            rows::<T, 4>(
                w[r * wrow..].as_ptr(),
                wrow,
                a.as_ptr(),
                nb,
                da,
                sa,
                &mut out[r..],
            )
        };
        r += 4;
    }
    while r < rows_n {
        // SAFETY: as above, for row r < rows_n.
        unsafe {
            rows::<T, 1>(
                w[r * wrow..].as_ptr(),
                wrow,
                a.as_ptr(),
                nb,
                da,
                sa,
                &mut out[r..],
            )
        };
        r += 1;
    }
}

/// `out[r] = w_r · a` for the `out.len()` rows of `w`; false when this kernel does not
/// take `qt` (or rows this long). Lengths: w = out.len() * qt.row_bytes(n),
/// a = qt.act().row_bytes(n) (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn gemv(qt: QType, w: &[u8], a: &[u8], n: usize, out: &mut [f32]) -> bool {
    let nb = n / 32;
    if qt.block_elems() != 32 || nb > MAX_BLOCKS {
        return false;
    }
    assert!(w.len() >= out.len() * qt.row_bytes(n) && a.len() >= qt.act().row_bytes(n));
    // SAFETY: lengths checked just above.
    unsafe {
        match qt {
            QType::Q4_0 => gemv_t::<T_Q4_0>(w, a, nb, out),
            QType::Q4_1 => gemv_t::<T_Q4_1>(w, a, nb, out),
            QType::Q5_0 => gemv_t::<T_Q5_0>(w, a, nb, out),
            QType::Q5_1 => gemv_t::<T_Q5_1>(w, a, nb, out),
            QType::Q8_0 => gemv_t::<T_Q8_0>(w, a, nb, out),
            _ => return false,
        }
    }
    true
}
