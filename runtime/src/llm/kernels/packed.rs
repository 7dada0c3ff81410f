//! Weight rows repacked eight at a time, so one SIMD register holds the same values of eight rows.
//!
//! A row-major ggml matrix of `Q4_0`, `Q4_1` or `Q8_0` blocks is stored here in groups of eight
//! rows. Block `i` of a group holds block `i` of each of its eight rows, as the same bytes
//! rearranged: first the eight rows' `d` scales (f16), then for `Q4_1` their eight `m` mins,
//! then the packed values in 4-byte chunks, chunk `c` of row 0, of row 1, … of row 7, then
//! chunk `c + 1`. A group takes exactly the bytes of its eight rows, and rows `r0..r1` (both
//! multiples of eight) are bytes `r0 * row_bytes..r1 * row_bytes`, as in the row-major matrix.
//!
//! One 32-byte load is then four values of each of the eight rows, multiplied by one
//! activation's four matching values broadcast to every lane: the integer sums come out one
//! lane per row, and the scale step is one fused multiply-add for eight rows
//! ([`reference`] spells out the arithmetic). Every activation row (a lone decode step or a
//! row of a batch) takes exactly these operations, lane by lane, so a sequence gets the same
//! logits alone and inside any batch.

use super::types::QType;

/// Rows per group.
pub const ROWS: usize = 8;

/// Bytes of one interleaved chunk.
const CHUNK: usize = 4;

/// Whether matrices of `qt` have a packed layout.
pub fn packable(qt: QType) -> bool {
    matches!(qt, QType::Q4_0 | QType::Q4_1 | QType::Q8_0)
}

/// Bytes before the values in a block of `qt`: `d`, and `m` for `Q4_1`.
pub(super) const fn head(qt: QType) -> usize {
    match qt {
        QType::Q4_1 => 4,
        _ => 2,
    }
}

/// `rows` row-major weight rows of `n` values of a [`packable`] type, repacked into `out`
/// (the same length); `rows` must be a multiple of [`ROWS`].
pub fn pack(qt: QType, w: &[u8], rows: usize, n: usize, out: &mut [u8]) {
    assert!(
        packable(qt) && rows.is_multiple_of(ROWS),
        "pack: {qt:?} × {rows} rows"
    );
    let (rb, bb, h) = (qt.row_bytes(n), qt.block_bytes(), head(qt));
    assert!(
        w.len() == rows * rb && out.len() == rows * rb,
        "pack: {} bytes in, {} out, for {rows} rows of {rb}",
        w.len(),
        out.len()
    );
    for (src, dst) in w
        .chunks_exact(ROWS * rb)
        .zip(out.chunks_exact_mut(ROWS * rb))
    {
        for (i, blk) in dst.chunks_exact_mut(ROWS * bb).enumerate() {
            let (scales, vals) = blk.split_at_mut(ROWS * h);
            for r in 0..ROWS {
                let b = &src[r * rb + i * bb..r * rb + (i + 1) * bb];
                // The scales: d of every row, then m of every row.
                for (k, s) in b[..h].chunks_exact(2).enumerate() {
                    scales[2 * (k * ROWS + r)..][..2].copy_from_slice(s);
                }
                for (c, v) in b[h..].chunks_exact(CHUNK).enumerate() {
                    vals[(c * ROWS + r) * CHUNK..][..CHUNK].copy_from_slice(v);
                }
            }
        }
    }
}

/// The arithmetic of the packed kernels, one row and one activation row at a time, in scalar
/// code: `out[r * t + j] = w_r · a_j` over packed `w`, bit for bit what the SIMD kernel gives.
/// Per block: the exact integer sum of the 32 products, then `acc = (d · d_a) · sum + acc`
/// and, for `Q4_1`, `acc = m · s_a + acc`, each one fused multiply-add in f32. (The levels
/// without a packed kernel run this.)
pub(super) fn reference(qt: QType, w: &[u8], acts: &[u8], n: usize, t: usize, out: &mut [f32]) {
    let (rb, bb, h) = (qt.row_bytes(n), qt.block_bytes(), head(qt));
    let (ab, abb) = (qt.act().row_bytes(n), qt.act().block_bytes());
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let rows = out.len() / t;
    for r in 0..rows {
        let group = &w[r / ROWS * ROWS * rb..];
        let lane = r % ROWS;
        for j in 0..t {
            let a = &acts[j * ab..(j + 1) * ab];
            let mut acc = 0f32;
            for i in 0..n / 32 {
                let blk = &group[i * ROWS * bb..(i + 1) * ROWS * bb];
                let ablk = &a[i * abb..(i + 1) * abb];
                let y = &ablk[abb - 32..];
                let mut sum = 0i32;
                for v in 0..32 {
                    let q = match qt {
                        QType::Q8_0 => {
                            blk[ROWS * h + (v / CHUNK * ROWS + lane) * CHUNK + v % CHUNK] as i8
                                as i32
                        }
                        _ => {
                            let k = v % 16;
                            let byte =
                                blk[ROWS * h + (k / CHUNK * ROWS + lane) * CHUNK + k % CHUNK];
                            let q = if v < 16 { byte & 15 } else { byte >> 4 } as i32;
                            if qt == QType::Q4_0 {
                                q - 8
                            } else {
                                q
                            }
                        }
                    };
                    sum += q * y[v] as i8 as i32;
                }
                let d = f16(&blk[2 * lane..]);
                acc = (d * f16(ablk)).mul_add(sum as f32, acc);
                if qt == QType::Q4_1 {
                    acc = f16(&blk[2 * ROWS + 2 * lane..]).mul_add(f16(&ablk[2..]), acc);
                }
            }
            out[r * t + j] = acc;
        }
    }
}
