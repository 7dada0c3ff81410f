//! The kernels, run on the host under the launch emulation, against the CPU backend: every op
//! of forward passes over a batch for every weight type, greedy tokens, quantization, sampling.

use half::f16;

use super::emu::{matvec, run, Emu, Quantized};
use super::Launch;
use crate::llm::{
    cpu::Cpu,
    fixture,
    forward::{forward, Backend, Batch, Buf},
    kernels::{quantize_weights, Act, Kernels, QType},
    kv::{BlockTable, KvPool},
    model::{Matrix, Model},
};
use flatmesh_cuda_emu::params;

const BLOCK_TOKENS: usize = 4;

/// Largest |a - b| over the largest |b| (0 when both are all zeros).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

struct Rng(u64);

impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.f()).collect()
    }
}

/// Runs each op on the CPU backend and on the emulated kernels from the CPU's inputs, and
/// keeps the largest relative difference of each op's output.
struct Lockstep {
    cpu: Cpu,
    emu: Emu,
    worst: Vec<(&'static str, f32)>,
}

const ALL_BUFS: [Buf; Buf::COUNT] = [
    Buf::X,
    Buf::H,
    Buf::Q,
    Buf::K,
    Buf::V,
    Buf::Att,
    Buf::Gate,
    Buf::Up,
];

impl Lockstep {
    fn sync(&mut self) {
        for b in ALL_BUFS {
            self.emu.set_buf(b, self.cpu.buf(b));
        }
    }

    fn check(&mut self, op: &'static str, b: Buf) {
        let e = rel_err(self.emu.buf(b), self.cpu.buf(b));
        self.note(op, e);
    }

    fn note(&mut self, op: &'static str, e: f32) {
        match self.worst.iter_mut().find(|(o, _)| *o == op) {
            Some((_, w)) => *w = w.max(e),
            None => self.worst.push((op, e)),
        }
    }

    fn worst(&self, op: &str) -> f32 {
        self.worst
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(0.0, |w| w.1)
    }
}

impl Backend for Lockstep {
    fn begin(&mut self, tokens: usize) {
        self.cpu.begin(tokens);
        self.emu.begin(tokens);
    }

    fn embed(&mut self, model: &Model, ids: &[u32]) {
        self.cpu.embed(model, ids);
        self.emu.embed(model, ids);
        self.check("embed", Buf::X);
    }

    fn rms_norm(&mut self, from: Buf, weight: &[f32], eps: f32, to: Buf) {
        self.sync();
        self.cpu.rms_norm(from, weight, eps, to);
        self.emu.rms_norm(from, weight, eps, to);
        self.check("rms_norm", to);
    }

    fn matmul(&mut self, model: &Model, from: Buf, outs: &[(&Matrix, Buf)]) {
        self.sync();
        self.cpu.matmul(model, from, outs);
        self.emu.matmul(model, from, outs);
        for (_, to) in outs {
            self.check("matmul", *to);
        }
    }

    fn add_bias(&mut self, to: Buf, bias: &[f32]) {
        self.sync();
        self.cpu.add_bias(to, bias);
        self.emu.add_bias(to, bias);
        self.check("add_bias", to);
    }

    fn rope(&mut self, buf: Buf, head_dim: usize, base: f32, positions: &[usize]) {
        self.sync();
        self.cpu.rope(buf, head_dim, base, positions);
        self.emu.rope(buf, head_dim, base, positions);
        self.check("rope", buf);
    }

    fn attention(&mut self, model: &Model, layer: usize, batch: &Batch) {
        self.sync();
        self.cpu.attention(model, layer, batch);
        self.emu.attention(model, layer, batch);
        self.check("attention", Buf::Att);
    }

    fn silu_mul(&mut self) {
        self.sync();
        self.cpu.silu_mul();
        self.emu.silu_mul();
        self.check("silu_mul", Buf::Gate);
    }

    fn add(&mut self, to: Buf, from: Buf) {
        self.sync();
        self.cpu.add(to, from);
        self.emu.add(to, from);
        self.check("add", to);
    }

    fn logits(&mut self, model: &Model, rows: &[usize]) -> &[f32] {
        self.sync();
        let cpu = self.cpu.logits(model, rows).to_vec();
        let emu = self.emu.logits(model, rows).to_vec();
        self.note("logits", rel_err(&emu, &cpu));
        self.emu.logits(model, rows)
    }
}

/// A step's batch: each sequence's `(first position, tokens)` run, logits at each run's end.
fn batch<'a>(runs: &[(usize, Vec<u32>)], tables: &'a [BlockTable]) -> Batch<'a> {
    let mut b = Batch {
        tables: tables.iter().collect(),
        ..Default::default()
    };
    for (s, (start, ids)) in runs.iter().enumerate() {
        for (i, &id) in ids.iter().enumerate() {
            b.tokens.push(id);
            b.positions.push(start + i);
            b.seq_of.push(s);
        }
        b.logits_for.push(b.tokens.len() - 1);
    }
    b
}

/// Pools for the CPU and the emulation with the same blocks, and a table per sequence grown
/// to `lens`.
fn pools(m: &Model, lens: &[usize]) -> (Cpu, Emu, Vec<BlockTable>) {
    let s = &m.shape;
    let mut kv = KvPool::new(64, BLOCK_TOKENS, s.layers, s.kv_dim());
    let tables: Vec<BlockTable> = lens
        .iter()
        .map(|&n| {
            let mut t = BlockTable::default();
            assert!(kv.grow(&mut t, n));
            t
        })
        .collect();
    let emu = Emu::new(kv.total_blocks(), BLOCK_TOKENS, s.layers, s.kv_dim());
    (Cpu::new(kv, 2), emu, tables)
}

const PROMPTS: [&[u32]; 3] = [&[1, 17, 42, 99, 7], &[250], &[3, 1, 4, 1, 5, 9, 2, 6, 5]];

#[test]
fn every_op_of_a_batched_forward_pass_matches_the_cpu_for_every_type() {
    for q in QType::ALL {
        let m = fixture::model(q, 5, q == QType::Q8_0);
        let (cpu, emu, tables) = pools(&m, &[8, 4, 12]);
        let mut ls = Lockstep {
            cpu,
            emu,
            worst: Vec::new(),
        };
        // A prefill of three sequences of different lengths, then two decode steps.
        let mut runs: Vec<(usize, Vec<u32>)> = PROMPTS.iter().map(|p| (0, p.to_vec())).collect();
        for step in 0..3 {
            let b = batch(&runs, &tables);
            forward(&mut ls, &m, &b);
            runs = runs
                .iter()
                .enumerate()
                .map(|(i, (s, ids))| (s + ids.len(), vec![(step * 31 + i * 7) as u32 % 300]))
                .collect();
        }
        println!("{:>5}: {:?}", q.name(), ls.worst);
        // Exactly the CPU's arithmetic: the same formulas in the same order, no FMA.
        for op in ["embed", "add", "add_bias", "rope"] {
            assert_eq!(ls.worst(op), 0.0, "{} {op}", q.name());
        }
        // `exp` within 2 ulp: the CPU's in SIMD, the GPU's `expf`.
        assert!(ls.worst("silu_mul") < 1e-6, "{} silu_mul", q.name());
        // Sums in another order: f64 (RMSNorm), f32 (dot products, attention).
        assert!(ls.worst("rms_norm") < 1e-6, "{} rms_norm", q.name());
        assert!(ls.worst("matmul") < 2e-5, "{} matmul", q.name());
        assert!(ls.worst("attention") < 2e-5, "{} attention", q.name());
        assert!(ls.worst("logits") < 2e-5, "{} logits", q.name());
    }
}

#[test]
fn greedy_tokens_of_a_batch_equal_the_cpu_engines_for_every_type() {
    for q in QType::ALL {
        let m = fixture::model(q, 9, false);
        let (mut cpu, mut emu, tables) = pools(&m, &[16, 16, 16]);
        let mut runs: Vec<(usize, Vec<u32>)> = PROMPTS.iter().map(|p| (0, p.to_vec())).collect();
        let (mut got_cpu, mut got_emu, mut worst) = (Vec::new(), Vec::new(), 0f32);
        for _ in 0..6 {
            let b = batch(&runs, &tables);
            let lc = forward(&mut cpu, &m, &b).to_vec();
            let le = forward(&mut emu, &m, &b).to_vec();
            // Free-running, a last-bit difference can round an activation to a neighbouring
            // quantized (or f16) value, and the difference grows from layer to layer.
            let e = rel_err(&le, &lc);
            worst = worst.max(e);
            assert!(e < 1e-2, "{} logits differ by {e}", q.name());
            let tc: Vec<u32> = lc.chunks(m.shape.vocab).map(cpu_greedy).collect();
            let te = Emu::argmax(&le, m.shape.vocab);
            got_cpu.push(tc.clone());
            got_emu.push(te);
            // Both continue from the CPU's tokens, so a near tie cannot fork the comparison.
            runs = runs
                .iter()
                .zip(tc)
                .map(|((s, ids), t)| (s + ids.len(), vec![t]))
                .collect();
        }
        println!("{:>5}: logits within {worst:.1e} of the CPU's", q.name());
        assert_eq!(got_emu, got_cpu, "{}", q.name());
    }
}

/// The CPU engine's greedy choice.
fn cpu_greedy(logits: &[f32]) -> u32 {
    let mut s = crate::sampling::Sampler::new(crate::SamplingParams {
        temperature: 0.0,
        ..Default::default()
    });
    s.sample(&mut logits.to_vec())
}

#[test]
fn activations_are_quantized_exactly_as_on_the_cpu() {
    let mut rng = Rng(77);
    let (cols, tokens) = (512, 3);
    let mut x = rng.vec(cols * tokens, 4.0);
    x[256..288].fill(0.0); // an all-zero block
    x[300] = 3.0; // ties of magnitude: the first is the scale
    x[301] = -3.0;
    x[600] = -2.5;
    x[601] = 2.5;
    for act in [Act::Q8_0, Act::Q8_1, Act::Q8K] {
        let gpu = Quantized::new(&x, cols, tokens, act);
        let k = Kernels::scalar();
        for (t, row) in x.chunks(cols).enumerate() {
            let mut cpu = vec![0u8; act.row_bytes(cols)];
            k.quantize_act(act, row, &mut cpu);
            let be = act.block_elems();
            for (b, blk) in cpu.chunks(act.block_bytes()).enumerate() {
                let nb = cols / be;
                let (d, qs) = match act {
                    Act::Q8K => (
                        f32::from_le_bytes(blk[0..4].try_into().unwrap()),
                        &blk[4..260],
                    ),
                    _ => (
                        f16::from_le_bytes([blk[0], blk[1]]).to_f32(),
                        &blk[blk.len() - 32..],
                    ),
                };
                assert_eq!(gpu.d[t * nb + b], d, "{act:?} d of block {b}");
                let at = t * cols + b * be;
                let q: Vec<u8> = gpu.q[at..at + be].iter().map(|&v| v as u8).collect();
                assert_eq!(q, qs, "{act:?} values of block {b}");
                if act == Act::Q8_1 {
                    let s = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    assert_eq!(gpu.x[t * nb + b], s, "Q8_1 sum of block {b}");
                }
                if act == Act::Q8K {
                    for j in 0..16 {
                        let s = i16::from_le_bytes([blk[260 + 2 * j], blk[261 + 2 * j]]);
                        assert_eq!(gpu.x[t * cols / 16 + b * 16 + j], s as f32, "Q8_K bsum {j}");
                    }
                }
            }
        }
    }
}

/// A model-free matrix of `rows` × `cols` as `q`, with its bytes.
fn matrix(q: QType, rows: usize, cols: usize, rng: &mut Rng) -> (Model, Matrix) {
    let mut m = fixture::model(q, 3, false);
    let bytes = quantize_weights(q, &rng.vec(rows * cols, 1.0));
    let w = Matrix {
        qtype: q,
        rows,
        cols,
        offset: 0,
    };
    m.bytes = crate::bytes::Bytes::Shared(std::sync::Arc::new(bytes));
    (m, w)
}

#[test]
fn mat_vec_and_embedding_rows_match_the_cpu_kernels_for_every_type() {
    let mut rng = Rng(5);
    let (rows, cols, tokens) = (37, 512, 3);
    for q in QType::ALL {
        let (m, w) = matrix(q, rows, cols, &mut rng);
        let x = rng.vec(tokens * cols, 2.0);
        let mut gpu = Vec::new();
        matvec(&m, &w, &x, tokens, &mut gpu);
        let k = Kernels::scalar();
        let act = q.act();
        let mut a = vec![0u8; act.row_bytes(cols) * tokens];
        for (o, r) in a.chunks_mut(act.row_bytes(cols)).zip(x.chunks(cols)) {
            k.quantize_act(act, r, o);
        }
        let mut cpu = vec![0f32; tokens * rows];
        for r in 0..rows {
            let mut out = vec![0f32; tokens];
            k.dot_many(q, m.row(&w, r), &a, cols, &mut out);
            for t in 0..tokens {
                cpu[t * rows + r] = out[t];
            }
        }
        let e = rel_err(&gpu, &cpu);
        assert!(e < 1e-5, "{} matvec: {e}", q.name());
        let ids: Vec<i32> = vec![36, 0, 17, 36];
        let mut out = vec![0f32; ids.len() * cols];
        let mut wp = m.bytes.as_ptr();
        let (mut c, mut ip, mut o) = (cols as i32, ids.as_ptr(), out.as_mut_ptr());
        let name = format!("embed_{}", super::suffix(q));
        run(
            &name,
            Launch::per_row(ids.len()),
            &mut params![wp, c, ip, o],
        );
        for (row, &id) in out.chunks(cols).zip(&ids) {
            let mut want = vec![0f32; cols];
            k.dequantize_row(q, m.row(&w, id as usize), &mut want);
            assert_eq!(row, &want[..], "{} embedding row {id}", q.name());
        }
    }
}

#[test]
fn the_emulation_launches_every_kernel_the_sources_define() {
    super::emu::kernels_match().unwrap();
}
