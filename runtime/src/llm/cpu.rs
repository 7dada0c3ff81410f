//! The CPU backend: the forward pass's operations on host memory, split over the device's
//! worker pool, with the quantized kernels chosen for this CPU at run time.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Instant,
};

use half::f16;
use rayon::prelude::*;

use super::{
    forward::{Backend, Batch, Buf},
    kernels::{
        packed,
        profile::{self, Op, Phase},
        Act, ActScales, Kernels,
    },
    kv::KvPool,
    model::{Matrix, Model},
};

/// Rows of a matmul given to one task: enough work to amortise the hand-off, small enough
/// to balance over the cores.
const MIN_TASK_ROWS: usize = 16;

/// From this many tokens in a step (a prefill chunk, a big batch), the per-token operations
/// (norms, rotations, activations, sums, transposes) are split over the cores too.
const PAR_TOKENS: usize = 8;

/// `f(out_row, in_row)` over rows of widths `wo` and `wi`, on the worker pool when `par`.
fn each_row<T: Send, U: Sync>(
    par: bool,
    out: &mut [T],
    wo: usize,
    input: &[U],
    wi: usize,
    f: impl Fn(&mut [T], &[U]) + Sync + Send,
) {
    if par {
        out.par_chunks_mut(wo)
            .zip(input.par_chunks(wi))
            .for_each(|(o, x)| f(o, x));
    } else {
        out.chunks_mut(wo)
            .zip(input.chunks(wi))
            .for_each(|(o, x)| f(o, x));
    }
}

/// A model's matrices repacked for this CPU's kernels ([`packed`]), each found by its offset in
/// the model bytes; matrices not here are read in place.
#[derive(Default)]
struct Packed {
    /// Anonymous memory asking for huge pages: 2 MiB faults instead of 4 KiB ones make the
    /// packing at load several times faster, and the decode step's stream through every
    /// weight misses the TLB less.
    bytes: Option<memmap2::MmapMut>,
    at: HashMap<usize, usize>,
}

impl Packed {
    /// The matrices of `model` that `k` multiplies fastest packed, packed.
    fn of(k: &Kernels, model: &Model) -> std::io::Result<Packed> {
        let layers = model.layers.iter();
        let all = layers.flat_map(|l| [l.wq, l.wk, l.wv, l.wo, l.gate, l.up, l.down]);
        let mut at = HashMap::new();
        let mut chosen = Vec::new();
        let mut len = 0;
        for m in all.chain([model.output]) {
            if k.packs(m.qtype)
                && m.rows.is_multiple_of(packed::ROWS)
                && !at.contains_key(&m.offset)
            {
                at.insert(m.offset, len);
                chosen.push(m);
                len += m.bytes();
            }
        }
        if len == 0 {
            return Ok(Packed::default());
        }
        let mut bytes = memmap2::MmapMut::map_anon(len)?;
        #[cfg(target_os = "linux")]
        // Only advice: where the kernel gives no huge pages, small ones serve the same.
        let _ = bytes.advise(memmap2::Advice::HugePage);
        let mut rest: &mut [u8] = &mut bytes;
        let mut jobs = Vec::new();
        for m in chosen {
            let (dst, tail) = rest.split_at_mut(m.bytes());
            jobs.push((m, dst));
            rest = tail;
        }
        jobs.into_par_iter().for_each(|(m, dst)| {
            let src = &model.bytes[m.offset..m.offset + m.bytes()];
            packed::pack(m.qtype, src, m.rows, m.cols, dst);
        });
        Ok(Packed {
            bytes: Some(bytes),
            at,
        })
    }
}

/// Activations, quantized activations, the KV pool and scratch of one copy.
pub struct Cpu {
    kernels: &'static Kernels,
    packed: Packed,
    threads: usize,
    tokens: usize,
    bufs: [Vec<f32>; Buf::COUNT],
    /// Rows of the input of the current matmul, quantized for each activation type in use,
    /// with their block scales (read once per matmul when there are several rows).
    quantized: Vec<(Act, Vec<u8>, ActScales)>,
    /// Matmul outputs laid out by weight row (`rows × tokens`), before the transpose.
    transposed: Vec<Vec<f32>>,
    pub kv: KvPool,
    logits: Vec<f32>,
    norm: Vec<f32>,
    /// The rotations of this step's positions: per token, `(sin, cos)` of each pair's angle,
    /// for the `(head_dim, base)` they were computed for (shared by Q and K of every layer).
    rope: Vec<(f32, f32)>,
    rope_for: Option<(usize, u32)>,
    /// The current step's phase and start time (profiling only).
    phase: Phase,
    started: Option<Instant>,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cpu({}, {:?})", self.kernels.name(), self.kv)
    }
}

impl Cpu {
    pub fn new(kv: KvPool, threads: usize) -> Cpu {
        Cpu {
            kernels: Kernels::best(),
            packed: Packed::default(),
            threads: threads.max(1),
            tokens: 0,
            bufs: Default::default(),
            quantized: Vec::new(),
            transposed: Vec::new(),
            kv,
            logits: Vec::new(),
            norm: Vec::new(),
            rope: Vec::new(),
            rope_for: None,
            phase: Phase::Decode,
            started: None,
        }
    }

    /// The same, with `model`'s matrices repacked for this CPU's kernels where they have a
    /// faster layout (the copy then reads those from its own memory, the rest in place).
    pub fn packing(mut self, model: &Model) -> std::io::Result<Cpu> {
        self.packed = Packed::of(self.kernels, model)?;
        Ok(self)
    }

    /// Bytes of the weights this backend holds repacked.
    #[cfg(test)]
    pub(crate) fn packed_bytes(&self) -> usize {
        self.packed.bytes.as_ref().map_or(0, |b| b.len())
    }

    /// A buffer's values (tests compare other backends with them).
    #[cfg(test)]
    pub(crate) fn buf(&self, b: Buf) -> &[f32] {
        &self.bufs[b as usize]
    }

    /// Buffer `buf` taken out, `tokens × width` long; what it holds is left from earlier
    /// steps (not zeroed: every caller writes each value).
    fn sized(&mut self, buf: Buf, width: usize) -> Vec<f32> {
        let mut v = std::mem::take(&mut self.bufs[buf as usize]);
        resize(&mut v, self.tokens * width);
        v
    }

    /// Quantize the rows of `from` for activation type `act` (once per matmul input).
    fn quantize(&mut self, from: &[f32], cols: usize, act: Act) -> usize {
        if let Some(i) = self.quantized.iter().position(|(a, ..)| *a == act) {
            return i;
        }
        let t0 = profile::start();
        let rb = act.row_bytes(cols);
        let mut out = vec![0u8; rb * self.tokens];
        let k = self.kernels;
        if self.tokens >= 8 {
            out.par_chunks_mut(rb)
                .zip(from.par_chunks(cols))
                .for_each(|(o, x)| k.quantize_act(act, x, o));
        } else {
            for (o, x) in out.chunks_mut(rb).zip(from.chunks(cols)) {
                k.quantize_act(act, x, o);
            }
        }
        let scales = match self.tokens {
            1 => ActScales::default(),
            t => ActScales::of(act, &out, cols, t),
        };
        self.quantized.push((act, out, scales));
        profile::add(self.phase, Op::Quantize, t0);
        self.quantized.len() - 1
    }
}

/// Multiply the `out.len() / t` rows of `w` from `r0` by the quantized inputs, writing
/// `out[r][t]`.
fn matmul_rows(
    (k, model, packed): (&Kernels, &Model, &Packed),
    w: &Matrix,
    (x, scales): (&[u8], &ActScales),
    r0: usize,
    out: &mut [f32],
    t: usize,
) {
    let (rb, rows) = (w.row_bytes(), out.len() / t);
    let span = |at: usize| at + r0 * rb..at + (r0 + rows) * rb;
    match packed.at.get(&w.offset) {
        Some(&at) => {
            let bytes = packed.bytes.as_deref().unwrap_or_default();
            k.matmul_packed(w.qtype, &bytes[span(at)], x, w.cols, t, out)
        }
        None => k.matmul_scaled(
            w.qtype,
            &model.bytes[span(w.offset)],
            x,
            scales,
            w.cols,
            t,
            out,
        ),
    }
}

impl Backend for Cpu {
    fn begin(&mut self, tokens: usize) {
        self.tokens = tokens;
        self.rope_for = None;
        self.phase = Phase::of(tokens);
        self.started = profile::start();
    }

    fn embed(&mut self, model: &Model, ids: &[u32]) {
        let t0 = profile::start();
        let d = model.shape.dim;
        let mut x = self.sized(Buf::X, d);
        for (row, &id) in x.chunks_mut(d).zip(ids) {
            self.kernels.dequantize_row(
                model.embed.qtype,
                model.row(&model.embed, id as usize),
                row,
            );
        }
        self.bufs[Buf::X as usize] = x;
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn rms_norm(&mut self, from: Buf, weight: &[f32], eps: f32, to: Buf) {
        let t0 = profile::start();
        let d = weight.len();
        let mut out = self.sized(to, d);
        let par = self.tokens >= PAR_TOKENS;
        each_row(par, &mut out, d, &self.bufs[from as usize], d, |o, x| {
            rms_norm(x, weight, eps, o)
        });
        self.bufs[to as usize] = out;
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn matmul(&mut self, model: &Model, from: Buf, outs: &[(&Matrix, Buf)]) {
        let t = self.tokens;
        let input = std::mem::take(&mut self.bufs[from as usize]);
        let cols = outs[0].0.cols;
        self.quantized.clear();
        let which: Vec<usize> = outs
            .iter()
            .map(|(w, _)| self.quantize(&input, cols, w.qtype.act()))
            .collect();
        self.bufs[from as usize] = input;
        let total: usize = outs.iter().map(|(w, _)| w.rows).sum();
        // Whole groups of packed rows per task.
        let per = (total / (self.threads * 4))
            .max(MIN_TASK_ROWS)
            .next_multiple_of(packed::ROWS);
        let mut tmp = std::mem::take(&mut self.transposed);
        tmp.resize_with(outs.len(), Vec::new);
        let mut jobs = Vec::new();
        for (((w, _), q), buf) in outs.iter().zip(&which).zip(tmp.iter_mut()) {
            resize(buf, w.rows * t);
            for (c, chunk) in buf.chunks_mut(per * t).enumerate() {
                let (_, x, scales) = &self.quantized[*q];
                jobs.push((*w, (&x[..], scales), c * per, chunk));
            }
        }
        let k = (self.kernels, model, &self.packed);
        let t0 = profile::start();
        if t0.is_some() {
            let busy = AtomicU64::new(0);
            jobs.into_par_iter().for_each(|(w, x, r0, out)| {
                let began = Instant::now();
                matmul_rows(k, w, x, r0, out, t);
                busy.fetch_add(began.elapsed().as_nanos() as u64, Relaxed);
            });
            let (wall, busy) = (profile::since(t0), busy.load(Relaxed) / self.threads as u64);
            profile::add_ns(self.phase, Op::MatVec, busy.min(wall));
            profile::add_ns(self.phase, Op::Pool, wall.saturating_sub(busy));
        } else {
            jobs.into_par_iter()
                .for_each(|(w, x, r0, out)| matmul_rows(k, w, x, r0, out, t));
        }
        let t0 = profile::start();
        for ((w, to), src) in outs.iter().zip(&tmp) {
            let mut out = self.sized(*to, w.rows);
            if t == 1 {
                out.copy_from_slice(src);
            } else {
                // Tokens i0.. gather their columns of the row-major result: eight tokens at a
                // time, so each weight row's eight values are read together.
                let rows = w.rows;
                let gather = |(c, band): (usize, &mut [f32])| {
                    let i0 = c * 8;
                    let n = band.len() / rows;
                    for r in 0..rows {
                        let col = &src[r * t + i0..r * t + i0 + n];
                        for (k, v) in col.iter().enumerate() {
                            band[k * rows + r] = *v;
                        }
                    }
                };
                match t >= PAR_TOKENS {
                    true => out.par_chunks_mut(rows * 8).enumerate().for_each(gather),
                    false => out.chunks_mut(rows * 8).enumerate().for_each(gather),
                }
            }
            self.bufs[*to as usize] = out;
        }
        self.transposed = tmp;
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn add_bias(&mut self, to: Buf, bias: &[f32]) {
        let t0 = profile::start();
        for row in self.bufs[to as usize].chunks_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn rope(&mut self, buf: Buf, head_dim: usize, base: f32, positions: &[usize]) {
        let t0 = profile::start();
        let half = head_dim / 2;
        if self.rope_for != Some((head_dim, base.to_bits())) {
            // The angles of one position: pos · base^(-2i/head_dim), by repeated products.
            let theta_scale = base.powf(-2.0 / head_dim as f32);
            self.rope.clear();
            for &pos in positions {
                let mut theta = pos as f32;
                for _ in 0..half {
                    self.rope.push(theta.sin_cos());
                    theta *= theta_scale;
                }
            }
            self.rope_for = Some((head_dim, base.to_bits()));
        }
        let x = &mut self.bufs[buf as usize];
        let width = x.len() / self.tokens.max(1);
        let par = self.tokens >= PAR_TOKENS;
        each_row(par, x, width, &self.rope, half, |row, rot| {
            for head in row.chunks_mut(head_dim) {
                for (pair, &(sin, cos)) in head.chunks_exact_mut(2).zip(rot) {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * cos - x1 * sin;
                    pair[1] = x0 * sin + x1 * cos;
                }
            }
        });
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn attention(&mut self, model: &Model, layer: usize, batch: &Batch) {
        let t0 = profile::start();
        let s = &model.shape;
        let (hd, kv_dim) = (s.head_dim, s.kv_dim());
        let k = std::mem::take(&mut self.bufs[Buf::K as usize]);
        let v = std::mem::take(&mut self.bufs[Buf::V as usize]);
        for (i, &pos) in batch.positions.iter().enumerate() {
            let table = batch.tables[batch.seq_of[i]];
            let (kd, vd) = self.kv.kv_mut(table, layer, pos);
            self.kernels.to_f16(&k[i * kv_dim..(i + 1) * kv_dim], kd);
            self.kernels.to_f16(&v[i * kv_dim..(i + 1) * kv_dim], vd);
        }
        self.bufs[Buf::K as usize] = k;
        self.bufs[Buf::V as usize] = v;
        let mut att = self.sized(Buf::Att, s.q_dim());
        let q = &self.bufs[Buf::Q as usize];
        let (kv, kern) = (&self.kv, self.kernels);
        let group = s.heads / s.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        att.par_chunks_mut(hd).enumerate().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(scores, qh, rows), (idx, out)| {
                let (t, h) = (idx / s.heads, idx % s.heads);
                let (table, pos) = (batch.tables[batch.seq_of[t]], batch.positions[t]);
                let g = (h / group) * hd;
                // Q rounded to f16 and probabilities rounded to f16, as the reference
                // engine's f16 KV matmuls do, so greedy outputs agree token for token.
                qh.clear();
                qh.extend(
                    q[idx * hd..(idx + 1) * hd]
                        .iter()
                        .map(|x| f16::from_f32(*x).to_f32()),
                );
                rows.clear();
                kv.rows(table, layer, pos + 1, false, g..g + hd, rows);
                scores.clear();
                scores.resize(pos + 1, 0.0);
                kern.dot_f16_rows(rows, qh, scores);
                let mut max = f32::NEG_INFINITY;
                for x in scores.iter_mut() {
                    *x *= scale;
                    max = max.max(*x);
                }
                let sum = kern.exp_shifted(scores, max);
                let inv = (1.0 / sum) as f32;
                for p in scores.iter_mut() {
                    *p = f16::from_f32(*p * inv).to_f32();
                }
                rows.clear();
                kv.rows(table, layer, pos + 1, true, g..g + hd, rows);
                out.fill(0.0);
                kern.axpy_f16_rows(out, scores, rows);
            },
        );
        self.bufs[Buf::Att as usize] = att;
        profile::add(self.phase, Op::Attention, t0);
    }

    fn silu_mul(&mut self) {
        let t0 = profile::start();
        let up = std::mem::take(&mut self.bufs[Buf::Up as usize]);
        let gate = &mut self.bufs[Buf::Gate as usize];
        let width = gate.len() / self.tokens.max(1);
        let k = self.kernels;
        each_row(
            self.tokens >= PAR_TOKENS,
            gate,
            width,
            &up,
            width,
            |g, u| k.silu_mul(g, u),
        );
        self.bufs[Buf::Up as usize] = up;
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn add(&mut self, to: Buf, from: Buf) {
        let t0 = profile::start();
        let src = std::mem::take(&mut self.bufs[from as usize]);
        let to = &mut self.bufs[to as usize];
        let width = to.len() / self.tokens.max(1);
        each_row(self.tokens >= PAR_TOKENS, to, width, &src, width, |x, y| {
            x.iter_mut().zip(y).for_each(|(x, y)| *x += y)
        });
        self.bufs[from as usize] = src;
        profile::add(self.phase, Op::Elementwise, t0);
    }

    fn logits(&mut self, model: &Model, rows: &[usize]) -> &[f32] {
        if rows.is_empty() {
            profile::step(self.phase, self.tokens, self.started);
            return &[];
        }
        let t0 = profile::start();
        let d = model.shape.dim;
        self.norm.clear();
        self.norm.resize(rows.len() * d, 0.0);
        let x = &self.bufs[Buf::X as usize];
        for (o, &r) in self.norm.chunks_mut(d).zip(rows) {
            rms_norm(&x[r * d..(r + 1) * d], &model.norm, model.shape.eps, o);
        }
        // The head runs over the selected rows only: borrow `H` as the input buffer.
        profile::add(self.phase, Op::Elementwise, t0);
        let (tokens, h) = (self.tokens, std::mem::take(&mut self.norm));
        self.tokens = rows.len();
        let saved = std::mem::replace(&mut self.bufs[Buf::H as usize], h);
        self.matmul(model, Buf::H, &[(&model.output, Buf::Gate)]);
        self.norm = std::mem::replace(&mut self.bufs[Buf::H as usize], saved);
        self.tokens = tokens;
        self.logits = std::mem::take(&mut self.bufs[Buf::Gate as usize]);
        profile::step(self.phase, tokens, self.started);
        &self.logits
    }
}

/// `v` made `len` long; values already there stay (only new room is zeroed).
fn resize(v: &mut Vec<f32>, len: usize) {
    v.truncate(len);
    v.resize(len, 0.0);
}

/// RMSNorm with squares in f32 summed in f64, as the reference engine computes it.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|v| (v * v) as f64).sum();
    let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * w;
    }
}
