//! Tests: SIMD levels against the scalar reference, numerics, round trips and layouts.

use super::*;
use half::f16;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// Random weight rows: quantized from random floats, or (for quantized types) random bytes
/// with sane f16 scales, so every bit pattern of the packed values is exercised.
fn random_weights(qt: QType, n: usize, rng: &mut Rng, raw: bool) -> Vec<u8> {
    if !raw || qt.block_elems() == 1 {
        let mut x = rng.vec(n, 2.0);
        // A few outliers, as real weights have.
        for i in (0..n).step_by(97) {
            x[i] *= 6.0;
        }
        return quantize_weights(qt, &x);
    }
    let mut w: Vec<u8> = (0..qt.row_bytes(n)).map(|_| rng.next() as u8).collect();
    for b in w.chunks_exact_mut(qt.block_bytes()) {
        let (d, m) = (rng.f() * 0.1, rng.f());
        match qt {
            QType::Q6K => b[208..210].copy_from_slice(&h(d)),
            _ => {
                b[0..2].copy_from_slice(&h(d));
                if matches!(qt, QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K) {
                    b[2..4].copy_from_slice(&h(m * 0.1));
                }
            }
        }
    }
    w
}

fn acts_for(qt: QType, rows: usize, n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
    let x = rng.vec(rows * n, 3.0);
    let ab = qt.act().row_bytes(n);
    let mut a = vec![0u8; rows * ab];
    for (xr, ar) in x.chunks_exact(n).zip(a.chunks_exact_mut(ab)) {
        Kernels::scalar().quantize_act(qt.act(), xr, ar);
    }
    (x, a)
}

/// Sum of |w_i * x_i| with w dequantized: the scale for float-order tolerances.
fn magnitude(qt: QType, w: &[u8], x: &[f32]) -> f32 {
    let mut wf = vec![0f32; x.len()];
    Kernels::scalar().dequantize_row(qt, w, &mut wf);
    wf.iter().zip(x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-6
}

fn sizes(qt: QType) -> Vec<usize> {
    if qt.block_elems() == 256 {
        vec![256, 512, 1536, 2304]
    } else {
        vec![32, 64, 96, 192, 576, 1536, 8192, 37]
            .into_iter()
            .filter(|n| n % qt.block_elems() == 0)
            .collect()
    }
}

#[test]
fn simd_matches_scalar() {
    for qt in QType::ALL {
        for n in sizes(qt) {
            for seed in 1..9u64 {
                let mut rng = Rng(seed * 7919 + n as u64);
                let w = random_weights(qt, n, &mut rng, seed % 2 == 0);
                let rows = 5;
                let (x, a) = acts_for(qt, rows, n, &mut rng);
                let ab = qt.act().row_bytes(n);
                for r in 0..rows {
                    let ar = &a[r * ab..(r + 1) * ab];
                    let want = Kernels::scalar().dot(qt, &w, ar, n);
                    let mag = magnitude(qt, &w, &x[r * n..(r + 1) * n]);
                    for k in Kernels::all() {
                        let got = k.dot(qt, &w, ar, n);
                        assert!(
                            (got - want).abs() <= 2e-5 * mag.max(want.abs()),
                            "{} {} n={n} seed={seed}: {got} vs {want} (mag {mag})",
                            k.name(),
                            qt.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dot_many_equals_dot() {
    for qt in QType::ALL {
        let n = if qt.block_elems() == 256 { 512 } else { 192 };
        let mut rng = Rng(99);
        let w = random_weights(qt, n, &mut rng, true);
        let (_, a) = acts_for(qt, 11, n, &mut rng);
        let ab = qt.act().row_bytes(n);
        for k in Kernels::all() {
            for rows in 1..=11 {
                let mut out = vec![0f32; rows];
                k.dot_many(qt, &w, &a, n, &mut out);
                for (r, o) in out.iter().enumerate() {
                    let one = k.dot(qt, &w, &a[r * ab..(r + 1) * ab], n);
                    assert_eq!(
                        o.to_bits(),
                        one.to_bits(),
                        "{} {} rows={rows} r={r}",
                        k.name(),
                        qt.name()
                    );
                }
            }
        }
    }
}

#[test]
fn scalar_dot_close_to_f32() {
    for qt in QType::ALL {
        for n in sizes(qt) {
            let mut rng = Rng(5 + n as u64);
            let w = random_weights(qt, n, &mut rng, false);
            let (x, a) = acts_for(qt, 1, n, &mut rng);
            let mut wf = vec![0f32; n];
            Kernels::scalar().dequantize_row(qt, &w, &mut wf);
            let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
            let mag = magnitude(qt, &w, &x);
            let got = Kernels::scalar().dot(qt, &w, &a, n);
            let tol = match qt.act() {
                Act::F32 => 1e-5,
                Act::F16 => 1e-3,
                _ => 1e-2,
            };
            assert!(
                (got - exact).abs() <= tol * mag,
                "{} n={n}: {got} vs {exact} (mag {mag})",
                qt.name()
            );
        }
    }
}

#[test]
fn quantize_round_trip() {
    for qt in QType::ALL {
        // Max abs error as a fraction of the block's abs max.
        let frac = match qt {
            QType::F32 => 0.0,
            QType::F16 => 1e-3,
            QType::Q4_0 => 0.14,
            QType::Q4_1 => 0.075,
            QType::Q5_0 => 0.07,
            QType::Q5_1 => 0.04,
            QType::Q8_0 => 0.005,
            QType::Q4K => 0.12,
            QType::Q5K => 0.06,
            QType::Q6K => 0.04,
        };
        let mut rng = Rng(1234);
        let n = 1024;
        let x = rng.vec(n, 1.5);
        let w = quantize_weights(qt, &x);
        assert_eq!(w.len(), qt.row_bytes(n));
        let mut y = vec![0f32; n];
        Kernels::scalar().dequantize_row(qt, &w, &mut y);
        let be = qt.block_elems().max(32);
        for (xb, yb) in x.chunks(be).zip(y.chunks(be)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                assert!(
                    (a - b).abs() <= frac * amax + 1e-6,
                    "{}: {a} -> {b} (amax {amax})",
                    qt.name()
                );
            }
        }
        let rms = (x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / n as f32)
            .sqrt();
        assert!(rms <= frac * 0.6 * 1.5 + 1e-6, "{}: rms {rms}", qt.name());
    }
}

#[test]
fn qtype_table() {
    for qt in QType::ALL {
        assert_eq!(QType::from_ggml(qt.ggml_id()), Some(qt));
        assert_eq!(
            qt.row_bytes(256 * 3),
            256 * 3 / qt.block_elems() * qt.block_bytes()
        );
    }
    assert_eq!(QType::from_ggml(10), None);
    assert_eq!(QType::Q4K.name(), "Q4_K");
    assert_eq!(Act::Q8_1.row_bytes(64), 72);
    assert_eq!(Act::Q8K.row_bytes(512), 584);
    assert_eq!(Kernels::scalar().name(), "scalar");
    assert!(Kernels::all()
        .iter()
        .any(|k| k.name() == Kernels::best().name()));
}

fn deq(qt: QType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; qt.block_elems()];
    Kernels::scalar().dequantize_row(qt, b, &mut y);
    y
}

#[test]
fn layout_32_blocks() {
    let nib: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    // Q4_0: d=0.5, x[j] = (lo-8)*d, x[j+16] = (hi-8)*d.
    let b = [&h(0.5)[..], &nib].concat();
    let y = deq(QType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (15.0 - j as f32 - 8.0) * 0.5);
    }
    // Q4_1: d=0.25, m=-1.
    let b = [&h(0.25)[..], &h(-1.0), &nib].concat();
    let y = deq(QType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * 0.25 - 1.0);
        assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
    }
    // Q5_0: d=1, qh bit j is the 5th bit of value j; minus 16.
    let qh: u32 = 0xAAAA_5555;
    let b = [&h(1.0)[..], &qh.to_le_bytes(), &nib].concat();
    let y = deq(QType::Q5_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], ((j as u32 | ((qh >> j) & 1) << 4) as f32) - 16.0);
        assert_eq!(
            y[j + 16],
            (((15 - j) as u32 | ((qh >> (j + 16)) & 1) << 4) as f32) - 16.0
        );
    }
    // Q5_1: d=0.5, m=2.
    let qh: u32 = 0x0F0F_F0F0;
    let b = [&h(0.5)[..], &h(2.0), &qh.to_le_bytes(), &nib].concat();
    let y = deq(QType::Q5_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], (j as u32 | ((qh >> j) & 1) << 4) as f32 * 0.5 + 2.0);
        assert_eq!(
            y[j + 16],
            ((15 - j) as u32 | ((qh >> (j + 16)) & 1) << 4) as f32 * 0.5 + 2.0
        );
    }
    // Q8_0: d=0.125, qs[j] = j - 16.
    let qs: Vec<u8> = (0..32).map(|j| (j as i8 - 16) as u8).collect();
    let b = [&h(0.125)[..], &qs].concat();
    let y = deq(QType::Q8_0, &b);
    for (j, v) in y.iter().enumerate() {
        assert_eq!(*v, (j as f32 - 16.0) * 0.125);
    }
    // F16 / F32 rows.
    assert_eq!(deq(QType::F16, &h(-2.5)), vec![-2.5]);
    assert_eq!(deq(QType::F32, &1.75f32.to_le_bytes()), vec![1.75]);
}

/// The 12 packed bytes of 8 six-bit scales and mins.
fn pack_k_scales(sc: [u8; 8], m: [u8; 8]) -> Vec<u8> {
    let mut s = vec![0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    s
}

#[test]
fn layout_k_blocks() {
    let sc = [1u8, 2, 3, 4, 33, 34, 35, 63];
    let m = [5u8, 6, 7, 8, 40, 41, 42, 60];
    let qs: Vec<u8> = (0..128).map(|i| ((i * 7) % 256) as u8).collect();
    let qh: Vec<u8> = (0..32).map(|i| (i * 37 % 256) as u8).collect();
    let (d, dmin) = (1.0f32, 0.5f32);
    for five in [false, true] {
        let qt = if five { QType::Q5K } else { QType::Q4K };
        let b = if five {
            [&h(d)[..], &h(dmin), &pack_k_scales(sc, m), &qh, &qs].concat()
        } else {
            [&h(d)[..], &h(dmin), &pack_k_scales(sc, m), &qs].concat()
        };
        assert_eq!(b.len(), qt.block_bytes());
        let y = deq(qt, &b);
        for c in 0..4 {
            for l in 0..32 {
                let (mut lo, mut hi) = ((qs[32 * c + l] & 15) as u32, (qs[32 * c + l] >> 4) as u32);
                if five {
                    lo += 16 * ((qh[l] >> (2 * c)) & 1) as u32;
                    hi += 16 * ((qh[l] >> (2 * c + 1)) & 1) as u32;
                }
                let (j0, j1) = (2 * c, 2 * c + 1);
                assert_eq!(
                    y[64 * c + l],
                    d * sc[j0] as f32 * lo as f32 - dmin * m[j0] as f32
                );
                assert_eq!(
                    y[64 * c + 32 + l],
                    d * sc[j1] as f32 * hi as f32 - dmin * m[j1] as f32
                );
            }
        }
    }
    // Q6_K: ql[128], qh[64], i8 scales[16], f16 d.
    let ql: Vec<u8> = (0..128).map(|i| (i * 29 % 256) as u8).collect();
    let qh6: Vec<u8> = (0..64).map(|i| (i * 13 % 256) as u8).collect();
    let s6: Vec<u8> = (0..16i32).map(|j| (j * 9 - 70) as i8 as u8).collect();
    let b = [&ql[..], &qh6, &s6, &h(0.0625)].concat();
    assert_eq!(b.len(), 210);
    let y = deq(QType::Q6K, &b);
    for half in 0..2 {
        for l in 0..32 {
            let (a, c, hb) = (
                ql[64 * half + l] as i32,
                ql[64 * half + 32 + l] as i32,
                qh6[32 * half + l] as i32,
            );
            let vals = [
                (a & 15) | ((hb & 3) << 4),
                (c & 15) | (((hb >> 2) & 3) << 4),
                (a >> 4) | (((hb >> 4) & 3) << 4),
                (c >> 4) | (((hb >> 6) & 3) << 4),
            ];
            for (k, v) in vals.iter().enumerate() {
                let idx = 128 * half + l + 32 * k;
                let s = s6[8 * half + l / 16 + 2 * k] as i8 as f32;
                assert_eq!(y[idx], 0.0625 * s * (v - 32) as f32, "q6k value {idx}");
            }
        }
    }
}

#[test]
fn activation_layouts() {
    for k in Kernels::all() {
        // Q8_0 / Q8_1: amax 127 → d = 1, id = 1; ties round to even.
        let mut x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
        x[0] = -127.0;
        x[1] = 2.5;
        x[2] = -0.5;
        x[3] = 3.5;
        let mut o = vec![0u8; 34];
        k.quantize_act(Act::Q8_0, &x, &mut o);
        assert_eq!(&o[0..2], &h(1.0));
        let q: Vec<i8> = o[2..].iter().map(|&b| b as i8).collect();
        assert_eq!(&q[..4], &[-127, 2, 0, 4]);
        assert_eq!(
            &q[4..],
            &x[4..].iter().map(|&v| v as i8).collect::<Vec<_>>()[..]
        );
        let mut o1 = vec![0u8; 36];
        k.quantize_act(Act::Q8_1, &x, &mut o1);
        assert_eq!(&o1[0..2], &h(1.0));
        let sum: i32 = q.iter().map(|&v| v as i32).sum();
        assert_eq!(&o1[2..4], &h(sum as f32));
        assert_eq!(&o1[4..], &o[2..]);
        // Q8_K: iscale = -127/max (signed), d = 1/iscale, bsums per 16.
        let x: Vec<f32> = (0..256)
            .map(|j| ((j * 37) % 255) as f32 / 10.0 - 12.7)
            .collect();
        let mut o = vec![0u8; 292];
        k.quantize_act(Act::Q8K, &x, &mut o);
        let iscale = -127.0f32 / -12.7;
        assert_eq!(
            f32::from_le_bytes(o[0..4].try_into().unwrap()),
            1.0 / iscale
        );
        for j in 0..16 {
            let mut s = 0i32;
            for i in 16 * j..16 * j + 16 {
                let q = ((iscale * x[i]).round_ties_even() as i32).min(127);
                assert_eq!(o[4 + i] as i8 as i32, q);
                s += q;
            }
            assert_eq!(
                i16::from_le_bytes([o[260 + 2 * j], o[261 + 2 * j]]) as i32,
                s
            );
        }
        // F16 / F32 rows.
        let mut o = vec![0u8; 4];
        k.quantize_act(Act::F16, &[1.0, -0.333], &mut o);
        assert_eq!(o, [h(1.0), h(-0.333)].concat());
        let mut o = vec![0u8; 4];
        k.quantize_act(Act::F32, &[0.1], &mut o);
        assert_eq!(o, 0.1f32.to_le_bytes());
    }
}

#[test]
fn f16_helpers() {
    let mut rng = Rng(77);
    for n in [1usize, 7, 8, 16, 64, 67, 1000] {
        let kx = rng.vec(n, 2.0);
        let q = rng.vec(n, 2.0);
        let kh: Vec<f16> = kx.iter().map(|&v| f16::from_f32(v)).collect();
        let want: f32 = kh.iter().zip(&q).map(|(a, b)| a.to_f32() * b).sum();
        let mag: f32 = kh.iter().zip(&q).map(|(a, b)| (a.to_f32() * b).abs()).sum();
        for k in Kernels::all() {
            let got = k.dot_f16(&kh, &q);
            assert!(
                (got - want).abs() <= 1e-5 * mag + 1e-6,
                "{} n={n}",
                k.name()
            );
            let mut y = q.clone();
            k.axpy_f16(&mut y, 0.75, &kh);
            for i in 0..n {
                assert!((y[i] - (q[i] + 0.75 * kh[i].to_f32())).abs() <= 1e-6 * (1.0 + y[i].abs()));
            }
            let mut out = vec![f16::ZERO; n];
            k.to_f16(&kx, &mut out);
            assert_eq!(
                out,
                kx.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
                "{}",
                k.name()
            );
        }
    }
}

#[test]
fn simd_activation_quantization_is_bit_identical() {
    let mut rng = Rng(4242);
    for act in [Act::Q8_0, Act::Q8_1, Act::Q8K, Act::F16, Act::F32] {
        for case in 0..40 {
            let n = if act == Act::Q8K {
                512
            } else {
                32 * (1 + case % 7)
            };
            let mut x = rng.vec(n, 1.0 + case as f32);
            match case % 5 {
                // Ties on the largest magnitude with both signs (Q8_K keeps the first).
                0 => {
                    x[5] = 9.0;
                    x[3] = -9.0;
                    x[200 % n] = 9.0;
                }
                // All-zero first block.
                1 => x[..32.min(n)].fill(0.0),
                // Values on exact rounding ties for amax = 127.
                2 => {
                    for (i, v) in x.iter_mut().enumerate() {
                        *v = (i % 255) as f32 / 2.0 - 63.5;
                    }
                    x[0] = 127.0;
                }
                _ => {}
            }
            let rb = act.row_bytes(n);
            let mut want = vec![0u8; rb];
            Kernels::scalar().quantize_act(act, &x, &mut want);
            for k in Kernels::all() {
                let mut got = vec![0u8; rb];
                k.quantize_act(act, &x, &mut got);
                assert_eq!(got, want, "{} {act:?} case {case}", k.name());
            }
        }
    }
}

#[test]
fn matmul_equals_dot_many_row_by_row() {
    for qt in QType::ALL {
        let n = if qt.block_elems() == 256 { 512 } else { 96 };
        let mut rng = Rng(31 + qt.ggml_id() as u64);
        let rows = 11;
        let w: Vec<u8> = (0..rows)
            .flat_map(|_| random_weights(qt, n, &mut rng, true))
            .collect();
        let (_, a) = acts_for(qt, 9, n, &mut rng);
        let wb = qt.row_bytes(n);
        for k in Kernels::all() {
            for t in [1, 3, 9] {
                for r in [1, 4, 7, 11] {
                    let mut got = vec![0f32; r * t];
                    k.matmul(qt, &w[..r * wb], &a, n, t, &mut got);
                    for (i, o) in got.chunks(t).enumerate() {
                        let mut want = vec![0f32; t];
                        k.dot_many(qt, &w[i * wb..(i + 1) * wb], &a, n, &mut want);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(o),
                            bits(&want),
                            "{} {} t={t} row {i}",
                            k.name(),
                            qt.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn packed_rows_match_their_reference_bit_for_bit_and_the_row_kernels_closely() {
    for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        for n in [32, 96, 576, 1536] {
            let mut rng = Rng(977 + n as u64 + qt.ggml_id() as u64);
            let rows = 16;
            let w: Vec<u8> = (0..rows)
                .flat_map(|r| random_weights(qt, n, &mut rng, r % 2 == 0))
                .collect();
            let mut packed = vec![0u8; w.len()];
            packed::pack(qt, &w, rows, n, &mut packed);
            let t = 9;
            let (x, a) = acts_for(qt, t, n, &mut rng);
            let mut want = vec![0f32; rows * t];
            packed::reference(qt, &packed, &a, n, t, &mut want);
            let (wb, ab) = (qt.row_bytes(n), qt.act().row_bytes(n));
            for (i, o) in want.chunks(t).enumerate() {
                for (j, v) in o.iter().enumerate() {
                    let row = &w[i * wb..(i + 1) * wb];
                    let exact = Kernels::scalar().dot(qt, row, &a[j * ab..(j + 1) * ab], n);
                    let mag = magnitude(qt, row, &x[j * n..(j + 1) * n]);
                    assert!(
                        (v - exact).abs() <= 2e-5 * mag.max(exact.abs()),
                        "{} n={n} row {i} act {j}: {v} vs {exact}",
                        qt.name()
                    );
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for k in Kernels::all() {
                for t in [1, 2, 3, 5, 9] {
                    let mut got = vec![0f32; rows * t];
                    k.matmul_packed(qt, &packed, &a, n, t, &mut got);
                    // Each activation row alone gives the same bits as inside the batch.
                    for (i, o) in got.chunks(t).enumerate() {
                        assert_eq!(
                            bits(o),
                            bits(&want[i * 9..i * 9 + t]),
                            "{} {} n={n} t={t} row {i}",
                            k.name(),
                            qt.name()
                        );
                    }
                }
            }
        }
    }
}
