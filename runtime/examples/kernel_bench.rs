//! Times one quantized matrix × one activation row on one thread, per weight type and shape:
//! the decode step's kernel alone, in GB/s of weights read — with the rows in place (the row
//! kernel) and, where this CPU's kernels take them so, packed eight rows at a time.
//!
//! `cargo run --release -p flatmesh-runtime --example kernel_bench`

use std::time::Instant;

use flatmesh_runtime::kernels::{packed, quantize_weights, Kernels, QType};

fn main() {
    let k = Kernels::best();
    let shapes = [
        ("q4_1 576x1536 (gate/up)", QType::Q4_1, 576, 1536),
        ("q4_1 1536x576 (down)", QType::Q4_1, 1536, 576),
        ("q4_1 576x576 (q/o)", QType::Q4_1, 576, 576),
        ("q8_0 576x49152 (output)", QType::Q8_0, 576, 49152),
    ];
    for (name, qt, cols, rows) in shapes {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Enough copies of the matrix that they do not stay in the caches.
        let copies = match std::env::var("HOT") {
            Ok(_) => 1,
            Err(_) => (256 << 20) / (qt.row_bytes(cols) * rows) + 1,
        };
        let w: Vec<Vec<u8>> = (0..copies)
            .map(|_| quantize_weights(qt, &(0..cols * rows).map(|_| rnd()).collect::<Vec<_>>()))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rnd()).collect();
        let mut a = vec![0u8; qt.act().row_bytes(cols)];
        k.quantize_act(qt.act(), &x, &mut a);
        let mut out = vec![0f32; rows];
        let reps = 20 * copies;
        let time = |f: &mut dyn FnMut(usize)| {
            let t0 = Instant::now();
            for i in 0..reps {
                f(i % copies);
            }
            t0.elapsed().as_secs_f64() / reps as f64
        };
        let s = time(&mut |i| k.matmul(qt, &w[i], &a, cols, 1, &mut out));
        let gb = |s: f64| (w[0].len() as f64) / s / 1e9;
        println!("{name:28} rows   {:8.1} us  {:5.1} GB/s", s * 1e6, gb(s));
        if k.packs(qt) {
            let p: Vec<Vec<u8>> = w
                .iter()
                .map(|m| {
                    let mut p = vec![0u8; m.len()];
                    packed::pack(qt, m, rows, cols, &mut p);
                    p
                })
                .collect();
            let s = time(&mut |i| k.matmul_packed(qt, &p[i], &a, cols, 1, &mut out));
            println!("{name:28} packed {:8.1} us  {:5.1} GB/s", s * 1e6, gb(s));
        }
    }
}
