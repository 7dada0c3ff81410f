//! Q4_1 → Q8_0 widening straight from the file's bytes, block by block on every core.
//!
//! Gives the same bytes as dequantizing with candle and quantizing again, without the f32
//! round trip through tensors (the load of the demo LLM spent most of its time there).

use half::f16;

/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of 4-bit values.
pub const Q4_1_BLOCK: usize = 20;
/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
pub const Q8_0_BLOCK: usize = 34;

fn widen_block(q4: &[u8], q8: &mut [u8]) {
    let d = f16::from_le_bytes([q4[0], q4[1]]).to_f32();
    let m = f16::from_le_bytes([q4[2], q4[3]]).to_f32();
    let mut x = [0f32; 32];
    for (j, &b) in q4[4..20].iter().enumerate() {
        x[j] = (b & 0x0F) as f32 * d + m;
        x[j + 16] = (b >> 4) as f32 * d + m;
    }
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    q8[..2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
    for (y, v) in q8[2..].iter_mut().zip(x) {
        *y = (v * inv).round() as i8 as u8;
    }
}

/// Widen a run of Q4_1 blocks to Q8_0 blocks.
pub fn q4_1_to_q8_0(q4: &[u8]) -> Vec<u8> {
    let blocks = q4.len() / Q4_1_BLOCK;
    let mut out = vec![0u8; blocks * Q8_0_BLOCK];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(blocks.max(1));
    let per = blocks.div_ceil(threads);
    std::thread::scope(|s| {
        for (src, dst) in q4
            .chunks(per * Q4_1_BLOCK)
            .zip(out.chunks_mut(per * Q8_0_BLOCK))
        {
            s.spawn(move || {
                for (a, b) in src
                    .chunks_exact(Q4_1_BLOCK)
                    .zip(dst.chunks_exact_mut(Q8_0_BLOCK))
                {
                    widen_block(a, b);
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{
        quantized::{GgmlDType, QTensor},
        Device, Tensor,
    };

    #[test]
    fn same_bytes_as_the_round_trip_through_candle() {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 1.0, (64, 256), &dev).unwrap();
        let q4 = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let slow = QTensor::quantize(&q4.dequantize(&dev).unwrap(), GgmlDType::Q8_0).unwrap();
        let fast = super::q4_1_to_q8_0(&q4.data().unwrap());
        assert_eq!(fast, slow.data().unwrap().as_ref());
    }
}
