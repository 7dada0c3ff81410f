//! Weight quantizers (f32 → each format), for fixtures and tests.
//!
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 follow llama.cpp's reference `quantize_row_*_ref`
//! exactly. The K-quants use llama.cpp's packing and scale quantization but a plain
//! min/max (Q4_K, Q5_K) or abs-max (Q6_K) fit per sub-block instead of ggml's iterative
//! search, so they are valid but slightly less accurate than llama-quantize's output.

use super::scalar::{nearest_int, scale_min_k4};
use super::types::{QType, QK_K};
use half::f16;

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Quantize rows of `x` (length a multiple of the type's block) to `qt`.
pub fn quantize_weights(qt: QType, x: &[f32]) -> Vec<u8> {
    let be = qt.block_elems();
    assert!(
        x.len().is_multiple_of(be),
        "quantize_weights: {} values is not a multiple of {be}",
        x.len()
    );
    let mut out = vec![0u8; qt.row_bytes(x.len())];
    for (xb, ob) in x
        .chunks_exact(be)
        .zip(out.chunks_exact_mut(qt.block_bytes()))
    {
        match qt {
            QType::F32 => ob.copy_from_slice(&xb[0].to_le_bytes()),
            QType::F16 => ob.copy_from_slice(&f16_bytes(xb[0])),
            QType::Q4_0 | QType::Q5_0 => sym_block(qt, xb, ob),
            QType::Q4_1 | QType::Q5_1 => asym_block(qt, xb, ob),
            QType::Q8_0 => q8_0_block(xb, ob),
            QType::Q4K | QType::Q5K => k45_block(qt, xb, ob),
            QType::Q6K => q6k_block(xb, ob),
        }
    }
    out
}

/// Q4_0 / Q5_0 (`quantize_row_q4_0_ref`, `quantize_row_q5_0_ref`).
fn sym_block(qt: QType, x: &[f32], ob: &mut [u8]) {
    let (half, top) = if qt == QType::Q4_0 {
        (8.0f32, 15)
    } else {
        (16.0f32, 31)
    };
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -half;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    ob[0..2].copy_from_slice(&f16_bytes(d));
    let qs_off = if qt == QType::Q4_0 { 2 } else { 6 };
    let mut qh = 0u32;
    for j in 0..16 {
        // C: MIN(top, (int8_t)(x*id + half + 0.5)); the cast truncates toward zero.
        let q0 = ((x[j] * id + half + 0.5) as i8).min(top) as u8;
        let q1 = ((x[j + 16] * id + half + 0.5) as i8).min(top) as u8;
        ob[qs_off + j] = (q0 & 15) | ((q1 & 15) << 4);
        qh |= (((q0 & 0x10) as u32) >> 4) << j;
        qh |= (((q1 & 0x10) as u32) >> 4) << (j + 16);
    }
    if qt == QType::Q5_0 {
        ob[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Q4_1 / Q5_1 (`quantize_row_q4_1_ref`, `quantize_row_q5_1_ref`).
fn asym_block(qt: QType, x: &[f32], ob: &mut [u8]) {
    let top = if qt == QType::Q4_1 { 15u8 } else { 31u8 };
    let min = x.iter().fold(f32::MAX, |a, &b| a.min(b));
    let max = x.iter().fold(-f32::MAX, |a, &b| a.max(b));
    let d = (max - min) / top as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    ob[0..2].copy_from_slice(&f16_bytes(d));
    ob[2..4].copy_from_slice(&f16_bytes(min));
    let qs_off = if qt == QType::Q4_1 { 4 } else { 8 };
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as u8).min(top);
        let q1 = (((x[j + 16] - min) * id + 0.5) as u8).min(top);
        ob[qs_off + j] = (q0 & 15) | ((q1 & 15) << 4);
        qh |= (((q0 & 0x10) as u32) >> 4) << j;
        qh |= (((q1 & 0x10) as u32) >> 4) << (j + 16);
    }
    if qt == QType::Q5_1 {
        ob[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Q8_0 (`quantize_row_q8_0_ref`: d = amax/127, q = roundf(x/d), half away from zero).
fn q8_0_block(x: &[f32], ob: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    ob[0..2].copy_from_slice(&f16_bytes(d));
    for (o, &v) in ob[2..34].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Q4_K / Q5_K: per 32-value sub-block scale = (max - min) / nmax and min = -min(0, min),
/// both quantized to 6 bits against the block maxima as in `quantize_row_q4_K_ref`.
fn k45_block(qt: QType, x: &[f32], ob: &mut [u8]) {
    let nmax = if qt == QType::Q4K { 15.0f32 } else { 31.0 };
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for j in 0..8 {
        let xb = &x[32 * j..32 * j + 32];
        let lo = xb.iter().fold(0f32, |a, &b| a.min(b));
        let hi = xb.iter().fold(lo, |a, &b| a.max(b));
        scales[j] = (hi - lo) / nmax;
        mins[j] = -lo;
    }
    let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
    let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let s = &mut ob[4..16];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    ob[0..2].copy_from_slice(&f16_bytes(max_scale / 63.0));
    ob[2..4].copy_from_slice(&f16_bytes(max_min / 63.0));
    let (d, dmin) = (f16_round(max_scale / 63.0), f16_round(max_min / 63.0));
    let mut l = [0u8; QK_K];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &ob[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, nmax as i32) as u8;
        }
    }
    let five = qt == QType::Q5K;
    let qs_off = if five { 48 } else { 16 };
    for c in 0..4 {
        for i in 0..32 {
            let (mut l1, mut l2) = (l[64 * c + i], l[64 * c + 32 + i]);
            if five {
                if l1 > 15 {
                    l1 -= 16;
                    ob[16 + i] |= 1 << (2 * c);
                }
                if l2 > 15 {
                    l2 -= 16;
                    ob[16 + i] |= 2 << (2 * c);
                }
            }
            ob[qs_off + 32 * c + i] = l1 | (l2 << 4);
        }
    }
}

/// Q6_K: per 16-value sub-block scale = (signed abs-max) / -32, quantized to i8 against
/// the block maximum as in `quantize_row_q6_K_ref`.
fn q6k_block(x: &[f32], ob: &mut [u8]) {
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for (j, s) in scales.iter_mut().enumerate() {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in &x[16 * j..16 * j + 16] {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        *s = max / -32.0;
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = *s;
        }
    }
    ob.fill(0);
    if max_abs < 1e-15 {
        return;
    }
    let iscale = -128.0 / max_scale;
    ob[208..210].copy_from_slice(&f16_bytes(1.0 / iscale));
    let d = f16_round(1.0 / iscale);
    let mut l = [0u8; QK_K];
    for j in 0..16 {
        let sc = nearest_int(iscale * scales[j]).min(127) as i8;
        ob[192 + j] = sc as u8;
        let dj = d * sc as f32;
        if dj == 0.0 {
            l[16 * j..16 * j + 16].fill(32);
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    for n in 0..2 {
        let lb = &l[128 * n..128 * n + 128];
        for i in 0..32 {
            ob[64 * n + i] = (lb[i] & 15) | ((lb[i + 64] & 15) << 4);
            ob[64 * n + i + 32] = (lb[i + 32] & 15) | ((lb[i + 96] & 15) << 4);
            ob[128 + 32 * n + i] = (lb[i] >> 4)
                | ((lb[i + 32] >> 4) << 2)
                | ((lb[i + 64] >> 4) << 4)
                | ((lb[i + 96] >> 4) << 6);
        }
    }
}
