//! Portable reference kernels: activation quantization, dot products, dequantization.

use super::types::{Act, QType, QK_K};
use half::f16;

/// Read a little-endian f16 at `off` as f32.
#[inline]
pub(super) fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline]
fn rd_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn wr_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// ggml's `nearest_int`: round half to even (valid for |v| < 2^22).
#[inline]
pub(super) fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

// ---------------------------------------------------------------- activations

/// Quantize one activation row (same numerics on every level).
pub(super) fn quantize_act(act: Act, x: &[f32], out: &mut [u8]) {
    match act {
        Act::Q8_0 => q8_blocks(x, out, false),
        Act::Q8_1 => q8_blocks(x, out, true),
        Act::Q8K => quantize_q8k(x, out),
        Act::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        Act::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Q8_0 / Q8_1 as llama.cpp's x86 `quantize_row_q8_0/1`: d = amax/127 (stored f16),
/// q = round_half_even(x * (127/amax)), s = d * sum(q) (stored f16).
fn q8_blocks(x: &[f32], out: &mut [u8], with_sum: bool) {
    let bb = if with_sum { 36 } else { 34 };
    let qoff = bb - 32;
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(bb)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in ob[qoff..].iter_mut().zip(xb) {
            let q = (v * id).round_ties_even().clamp(-128.0, 127.0) as i8;
            sum += q as i32;
            *o = q as u8;
        }
        wr_f16(ob, 0, d);
        if with_sum {
            wr_f16(ob, 2, d * sum as f32);
        }
    }
}

/// Q8_K as llama.cpp's `quantize_row_q8_K_ref`: scale from the signed value of largest
/// magnitude, iscale = -127/max, q = min(127, nearest_int(iscale*x)), d = 1/iscale (f32).
fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(292)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            ob.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (o, &v) in ob[4..260].iter_mut().zip(xb) {
            *o = nearest_int(iscale * v).min(127) as i8 as u8;
        }
        for j in 0..16 {
            let s: i32 = ob[4 + 16 * j..4 + 16 * j + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            ob[260 + 2 * j..262 + 2 * j].copy_from_slice(&(s as i16).to_le_bytes());
        }
        ob[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

// ---------------------------------------------------------------- block unpacking

/// One 32-value block unpacked: integer values (signed for Q4_0/Q5_0/Q8_0, 0..31 otherwise),
/// scale d and offset m (0 for symmetric types).
pub(super) fn unpack32(qt: QType, b: &[u8], q: &mut [i8; 32]) -> (f32, f32) {
    let d = rd_f16(b, 0);
    match qt {
        QType::Q4_0 | QType::Q4_1 => {
            let (qs, m, off) = if qt == QType::Q4_0 {
                (&b[2..18], 0.0, 8)
            } else {
                (&b[4..20], rd_f16(b, 2), 0)
            };
            for j in 0..16 {
                q[j] = (qs[j] & 15) as i8 - off;
                q[j + 16] = (qs[j] >> 4) as i8 - off;
            }
            (d, m)
        }
        QType::Q5_0 | QType::Q5_1 => {
            let (h, m, off) = if qt == QType::Q5_0 {
                (2, 0.0, 16)
            } else {
                (4, rd_f16(b, 2), 0)
            };
            let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
            let qs = &b[h + 4..h + 20];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                q[j] = ((qs[j] & 15) | h0) as i8 - off;
                q[j + 16] = ((qs[j] >> 4) | h1) as i8 - off;
            }
            (d, m)
        }
        QType::Q8_0 => {
            for (o, &v) in q.iter_mut().zip(&b[2..34]) {
                *o = v as i8;
            }
            (d, 0.0)
        }
        _ => unreachable!("unpack32 on {qt:?}"),
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K / Q5_K block (ggml `get_scale_min_k4`).
#[inline]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// A K-quant super-block unpacked to 256 unsigned values in natural order plus one scale
/// and one min-coefficient per 16 values.
/// Q4_K/Q5_K: x = d*sc*q - dmin*mn. Q6_K: x = d*sc*(q - 32), mn = 32*sc, `q6` set.
pub(super) struct KBlock {
    pub q: [u8; QK_K],
    pub sc: [i16; 16],
    pub mn: [i16; 16],
    pub d: f32,
    pub dmin: f32,
    pub q6: bool,
}

impl KBlock {
    pub(super) fn new() -> Self {
        KBlock {
            q: [0; QK_K],
            sc: [0; 16],
            mn: [0; 16],
            d: 0.0,
            dmin: 0.0,
            q6: false,
        }
    }

    /// Fill d, dmin, sc and mn (everything but the values).
    pub(super) fn unpack_scales(&mut self, qt: QType, b: &[u8]) {
        if qt == QType::Q6K {
            self.d = rd_f16(b, 208);
            self.dmin = self.d;
            self.q6 = true;
            for j in 0..16 {
                let s = b[192 + j] as i8 as i16;
                self.sc[j] = s;
                self.mn[j] = 32 * s;
            }
            return;
        }
        self.d = rd_f16(b, 0);
        self.dmin = rd_f16(b, 2);
        self.q6 = false;
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            self.sc[2 * j] = sc as i16;
            self.sc[2 * j + 1] = sc as i16;
            self.mn[2 * j] = m as i16;
            self.mn[2 * j + 1] = m as i16;
        }
    }

    pub(super) fn unpack(&mut self, qt: QType, b: &[u8]) {
        self.unpack_scales(qt, b);
        match qt {
            QType::Q4K | QType::Q5K => {
                let five = qt == QType::Q5K;
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                for c in 0..4 {
                    for l in 0..32 {
                        let v = qs[32 * c + l];
                        let (mut lo, mut hi) = (v & 15, v >> 4);
                        if five {
                            lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                            hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        }
                        self.q[64 * c + l] = lo;
                        self.q[64 * c + 32 + l] = hi;
                    }
                }
            }
            QType::Q6K => {
                let (ql, qh) = (&b[0..128], &b[128..192]);
                for n in 0..2 {
                    for l in 0..32 {
                        let (a, c, h) = (ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]);
                        let y = &mut self.q[128 * n..];
                        y[l] = (a & 15) | ((h & 3) << 4);
                        y[l + 32] = (c & 15) | (((h >> 2) & 3) << 4);
                        y[l + 64] = (a >> 4) | (((h >> 4) & 3) << 4);
                        y[l + 96] = (c >> 4) | (((h >> 6) & 3) << 4);
                    }
                }
            }
            _ => unreachable!("KBlock::unpack on {qt:?}"),
        }
    }

    /// This block · one Q8_K activation block (292 bytes).
    pub(super) fn dot(&self, a: &[u8]) -> f32 {
        let da = rd_f32(a, 0);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..16 {
            let mut s = 0i32;
            for l in 16 * j..16 * j + 16 {
                s += self.q[l] as i32 * a[4 + l] as i8 as i32;
            }
            sumi += self.sc[j] as i32 * s;
            let bs = i16::from_le_bytes([a[260 + 2 * j], a[261 + 2 * j]]) as i32;
            summ += self.mn[j] as i32 * bs;
        }
        self.finish(da, sumi, summ)
    }

    /// Combine the integer sums of one super-block into its f32 contribution.
    #[inline]
    pub(super) fn finish(&self, da: f32, sumi: i32, summ: i32) -> f32 {
        if self.q6 {
            da * self.d * (sumi - summ) as f32
        } else {
            da * self.d * sumi as f32 - da * self.dmin * summ as f32
        }
    }
}

// ---------------------------------------------------------------- dot products

/// `out[r] = w · acts[r]` for every activation row.
pub(super) fn dot_many(qt: QType, w: &[u8], acts: &[u8], n: usize, out: &mut [f32]) {
    let arow = qt.act().row_bytes(n);
    match qt {
        QType::F32 => {
            for (o, a) in out.iter_mut().zip(acts.chunks_exact(arow)) {
                *o = (0..n).map(|i| rd_f32(w, 4 * i) * rd_f32(a, 4 * i)).sum();
            }
        }
        QType::F16 => {
            for (o, a) in out.iter_mut().zip(acts.chunks_exact(arow)) {
                *o = (0..n).map(|i| rd_f16(w, 2 * i) * rd_f16(a, 2 * i)).sum();
            }
        }
        QType::Q4K | QType::Q5K | QType::Q6K => {
            out.fill(0.0);
            let mut kb = KBlock::new();
            for (i, wb) in w.chunks_exact(qt.block_bytes()).enumerate() {
                kb.unpack(qt, wb);
                for (o, a) in out.iter_mut().zip(acts.chunks_exact(arow)) {
                    *o += kb.dot(&a[i * 292..(i + 1) * 292]);
                }
            }
        }
        _ => {
            out.fill(0.0);
            let ab = qt.act().block_bytes();
            let qoff = ab - 32;
            let mut q = [0i8; 32];
            for (i, wb) in w.chunks_exact(qt.block_bytes()).enumerate() {
                let (d, m) = unpack32(qt, wb, &mut q);
                for (o, a) in out.iter_mut().zip(acts.chunks_exact(arow)) {
                    let a = &a[i * ab..(i + 1) * ab];
                    let sumi: i32 = q
                        .iter()
                        .zip(&a[qoff..])
                        .map(|(&x, &y)| x as i32 * y as i8 as i32)
                        .sum();
                    *o += (d * rd_f16(a, 0)) * sumi as f32;
                    if ab == 36 {
                        *o += m * rd_f16(a, 2);
                    }
                }
            }
        }
    }
}

/// Dequantize one weight row.
pub(super) fn dequantize_row(qt: QType, w: &[u8], out: &mut [f32]) {
    match qt {
        QType::F32 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = rd_f32(w, 4 * i);
            }
        }
        QType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = rd_f16(w, 2 * i);
            }
        }
        QType::Q4K | QType::Q5K | QType::Q6K => {
            let mut kb = KBlock::new();
            for (wb, ob) in w
                .chunks_exact(qt.block_bytes())
                .zip(out.chunks_exact_mut(QK_K))
            {
                kb.unpack(qt, wb);
                for (l, o) in ob.iter_mut().enumerate() {
                    let j = l / 16;
                    *o = if kb.q6 {
                        kb.d * kb.sc[j] as f32 * (kb.q[l] as i32 - 32) as f32
                    } else {
                        kb.d * kb.sc[j] as f32 * kb.q[l] as f32 - kb.dmin * kb.mn[j] as f32
                    };
                }
            }
        }
        _ => {
            let mut q = [0i8; 32];
            for (wb, ob) in w
                .chunks_exact(qt.block_bytes())
                .zip(out.chunks_exact_mut(32))
            {
                let (d, m) = unpack32(qt, wb, &mut q);
                for (o, &v) in ob.iter_mut().zip(&q) {
                    *o = v as f32 * d + m;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- f16 helpers

pub(super) fn dot_f16(k: &[f16], q: &[f32]) -> f32 {
    k.iter().zip(q).map(|(a, b)| a.to_f32() * b).sum()
}

pub(super) fn axpy_f16(y: &mut [f32], a: f32, v: &[f16]) {
    for (y, v) in y.iter_mut().zip(v) {
        *y += a * v.to_f32();
    }
}

pub(super) fn to_f16(x: &[f32], out: &mut [f16]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = f16::from_f32(*v);
    }
}
