//! The forward pass's operations computed by the CUDA kernels on the host, under the launch
//! emulation of `flatmesh-cuda-emu` (tests only): a `Backend` as the GPU's will be, with the
//! same kernels, launch configurations and argument lists, over host memory.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use flatmesh_cuda_emu::params;

use super::{suffix, Launch};
use crate::llm::{
    batch::StepBackend,
    forward::{Backend, Batch, Buf, DeviceSampling},
    kernels::Act,
    kv::KvPool,
    model::{Matrix, Model},
};

/// Launch kernel `name`; a failed launch (a barrier some threads never reach) panics.
pub fn run(name: &str, l: Launch, p: &mut [*mut c_void]) {
    // SAFETY: every caller in this module passes the kernel's parameters in its order and
    // types, with buffers sized for the launch's rows, tokens and widths.
    unsafe { flatmesh_cuda_emu::launch(name, l.grid, l.block, p) }
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Activations quantized for one weight type, in the kernels' layout.
#[derive(Debug, Default)]
pub struct Quantized {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub x: Vec<f32>,
    pub h: Vec<u16>,
}

impl Quantized {
    /// Quantize `tokens` rows of `cols` values of `x` for activation type `act`.
    pub fn new(x: &[f32], cols: usize, tokens: usize, act: Act) -> Quantized {
        let mut out = Quantized::default();
        let mut xp = x.as_ptr();
        match act {
            Act::Q8_0 | Act::Q8_1 | Act::Q8K => {
                let k = act == Act::Q8K;
                out.q = vec![0; tokens * cols];
                out.d = vec![0.0; tokens * cols / if k { 256 } else { 32 }];
                out.x = match act {
                    Act::Q8_0 => Vec::new(),
                    Act::Q8_1 => vec![0.0; tokens * cols / 32],
                    _ => vec![0.0; tokens * cols / 16],
                };
                let (mut q, mut d) = (out.q.as_mut_ptr(), out.d.as_mut_ptr());
                let mut s = if out.x.is_empty() {
                    null_mut()
                } else {
                    out.x.as_mut_ptr()
                };
                let name = if k { "quantize_q8k" } else { "quantize_q8" };
                let mut c = cols as i32;
                run(
                    name,
                    Launch::quantize(cols, tokens),
                    &mut params![xp, c, q, d, s],
                );
            }
            Act::F16 => {
                out.h = vec![0; tokens * cols];
                let mut h = out.h.as_mut_ptr();
                let mut c = (tokens * cols) as i32;
                run(
                    "to_f16",
                    Launch::elementwise(tokens * cols),
                    &mut params![xp, c, h],
                );
            }
            // F32 weights take the f32 rows themselves.
            Act::F32 => {}
        }
        out
    }

    /// The `act` argument of a mat-vec: the quantized values, or `x` itself for F32.
    fn act(&self, x: &[f32]) -> *const c_void {
        if !self.q.is_empty() {
            self.q.as_ptr().cast()
        } else if !self.h.is_empty() {
            self.h.as_ptr().cast()
        } else {
            x.as_ptr().cast()
        }
    }
}

/// `tokens` rows of `out` ← `w` · each row of `x` (quantized for `w`'s type).
pub fn matvec(model: &Model, w: &Matrix, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
    let a = Quantized::new(x, w.cols, tokens, w.qtype.act());
    out.clear();
    out.resize(tokens * w.rows, 0.0);
    let mut wp = model.bytes[w.offset..].as_ptr();
    let (mut rows, mut cols) = (w.rows as i32, w.cols as i32);
    let mut act = a.act(x);
    let (mut ad, mut ax) = (a.d.as_ptr(), a.x.as_ptr());
    let (mut t, mut o) = (tokens as i32, out.as_mut_ptr());
    run(
        &format!("matvec_{}", suffix(w.qtype)),
        Launch::matvec(w.rows, tokens),
        &mut params![wp, rows, cols, act, ad, ax, t, o],
    );
}

/// The emulated GPU backend of one copy: activations and a KV cache in the CPU's layout.
pub struct Emu {
    tokens: usize,
    bufs: [Vec<f32>; Buf::COUNT],
    kv: Vec<u16>,
    layers: usize,
    block_tokens: usize,
    scores: Vec<f32>,
    norm: Vec<f32>,
    logits: Vec<f32>,
    ids: Vec<i32>,
    /// The block tables a step loop drives (`with_pool`); the values are in `kv`.
    pool: Option<KvPool>,
    kv_block: usize,
}

impl Emu {
    /// A cache of `blocks` blocks, laid out as `KvPool::new` lays its blocks.
    pub fn new(blocks: usize, block_tokens: usize, layers: usize, kv_dim: usize) -> Emu {
        Emu {
            tokens: 0,
            bufs: Default::default(),
            kv: vec![0; blocks * layers * 2 * block_tokens * kv_dim],
            layers,
            block_tokens,
            scores: Vec::new(),
            norm: Vec::new(),
            logits: Vec::new(),
            ids: Vec::new(),
            pool: None,
            kv_block: layers * 2 * block_tokens * kv_dim,
        }
    }

    /// The backend of a step loop over `pool` (a `KvPool::blocks_only`): its KV values here,
    /// as a GPU backend holds them in device memory.
    pub fn with_pool(pool: KvPool, layers: usize, kv_dim: usize) -> Emu {
        let mut emu = Emu::new(pool.total_blocks(), pool.block_tokens(), layers, kv_dim);
        emu.pool = Some(pool);
        emu
    }

    pub fn buf(&self, b: Buf) -> &[f32] {
        &self.bufs[b as usize]
    }

    pub fn set_buf(&mut self, b: Buf, v: &[f32]) {
        self.bufs[b as usize].clear();
        self.bufs[b as usize].extend_from_slice(v);
    }

    fn sized(&mut self, buf: Buf, width: usize) -> Vec<f32> {
        let mut v = std::mem::take(&mut self.bufs[buf as usize]);
        v.clear();
        v.resize(self.tokens * width, 0.0);
        v
    }

    /// The greedy token of each logits row, by the `argmax` kernel.
    pub fn argmax(logits: &[f32], vocab: usize) -> Vec<u32> {
        let rows = logits.len() / vocab;
        let mut out = vec![0i32; rows];
        let (mut l, mut v, mut o) = (logits.as_ptr(), vocab as i32, out.as_mut_ptr());
        run("argmax", Launch::per_row(rows), &mut params![l, v, o]);
        out.into_iter().map(|t| t as u32).collect()
    }
}

/// The batch's block tables, flattened to `max_blocks` entries a sequence.
fn tables(batch: &Batch) -> (Vec<i32>, usize) {
    let max = batch
        .tables
        .iter()
        .map(|t| t.blocks.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut flat = vec![0i32; batch.tables.len() * max];
    for (row, t) in flat.chunks_mut(max).zip(&batch.tables) {
        for (o, b) in row.iter_mut().zip(&t.blocks) {
            *o = *b as i32;
        }
    }
    (flat, max)
}

impl Backend for Emu {
    fn begin(&mut self, tokens: usize) {
        self.tokens = tokens;
    }

    fn embed(&mut self, model: &Model, ids: &[u32]) {
        let d = model.shape.dim;
        let mut x = self.sized(Buf::X, d);
        self.ids = ids.iter().map(|&i| i as i32).collect();
        let mut w = model.bytes[model.embed.offset..].as_ptr();
        let (mut cols, mut idp, mut o) = (d as i32, self.ids.as_ptr(), x.as_mut_ptr());
        let name = format!("embed_{}", suffix(model.embed.qtype));
        run(
            &name,
            Launch::per_row(ids.len()),
            &mut params![w, cols, idp, o],
        );
        self.bufs[Buf::X as usize] = x;
    }

    fn rms_norm(&mut self, from: Buf, weight: &[f32], eps: f32, to: Buf) {
        let d = weight.len();
        let mut out = self.sized(to, d);
        let mut x = self.bufs[from as usize].as_ptr();
        let (mut rows, mut dd, mut w, mut e) = (null::<i32>(), d as i32, weight.as_ptr(), eps);
        let mut o = out.as_mut_ptr();
        run(
            "rms_norm",
            Launch::per_row(self.tokens),
            &mut params![x, rows, dd, w, e, o],
        );
        self.bufs[to as usize] = out;
    }

    fn matmul(&mut self, model: &Model, from: Buf, outs: &[(&Matrix, Buf)]) {
        let input = std::mem::take(&mut self.bufs[from as usize]);
        for (w, to) in outs {
            let mut out = std::mem::take(&mut self.bufs[*to as usize]);
            matvec(model, w, &input, self.tokens, &mut out);
            self.bufs[*to as usize] = out;
        }
        self.bufs[from as usize] = input;
    }

    fn add_bias(&mut self, to: Buf, bias: &[f32]) {
        let x = &mut self.bufs[to as usize];
        let n = x.len();
        let (mut xp, mut b, mut w, mut nn) =
            (x.as_mut_ptr(), bias.as_ptr(), bias.len() as i32, n as i32);
        run(
            "add_bias",
            Launch::elementwise(n),
            &mut params![xp, b, w, nn],
        );
    }

    fn rope(&mut self, buf: Buf, head_dim: usize, base: f32, positions: &[usize]) {
        let tokens = self.tokens;
        let x = &mut self.bufs[buf as usize];
        let width = x.len() / tokens.max(1);
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        // The same expression as the CPU backend's, so both rotate by the same angles.
        let mut theta_scale = base.powf(-2.0 / head_dim as f32);
        let (mut xp, mut w, mut hd, mut pp) =
            (x.as_mut_ptr(), width as i32, head_dim as i32, pos.as_ptr());
        run(
            "rope",
            Launch::per_row(tokens),
            &mut params![xp, w, hd, theta_scale, pp],
        );
    }

    fn attention(&mut self, model: &Model, layer: usize, batch: &Batch) {
        let s = &model.shape;
        let (flat, max_blocks) = tables(batch);
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        let seq: Vec<i32> = batch.seq_of.iter().map(|&p| p as i32).collect();
        let (mut pp, mut sp, mut tp) = (pos.as_ptr(), seq.as_ptr(), flat.as_ptr());
        let (mut mb, mut layers, mut l) = (max_blocks as i32, self.layers as i32, layer as i32);
        let mut bt = self.block_tokens as i32;
        let mut kv = self.kv.as_mut_ptr();
        let (mut k, mut v) = (
            self.bufs[Buf::K as usize].as_ptr(),
            self.bufs[Buf::V as usize].as_ptr(),
        );
        let mut kv_dim = s.kv_dim() as i32;
        run(
            "kv_store",
            Launch::per_row(self.tokens),
            &mut params![k, v, kv_dim, pp, sp, tp, mb, layers, l, bt, kv],
        );
        let ctx = pos.iter().max().map_or(1, |&p| p as usize + 1);
        self.scores.clear();
        self.scores.resize(self.tokens * s.heads * ctx, 0.0);
        let mut att = self.sized(Buf::Att, s.q_dim());
        let mut q = self.bufs[Buf::Q as usize].as_ptr();
        let mut kvc = self.kv.as_ptr();
        let (mut heads, mut kvh, mut hd) = (s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
        let mut scale = 1.0 / (s.head_dim as f32).sqrt();
        let (mut sc, mut c, mut o) = (self.scores.as_mut_ptr(), ctx as i32, att.as_mut_ptr());
        run(
            "attention",
            Launch::attention(s.heads, self.tokens),
            &mut params![q, kvc, pp, sp, tp, mb, layers, l, bt, heads, kvh, hd, scale, sc, c, o],
        );
        self.bufs[Buf::Att as usize] = att;
    }

    fn silu_mul(&mut self) {
        let n = self.bufs[Buf::Gate as usize].len();
        let mut g = self.bufs[Buf::Gate as usize].as_mut_ptr();
        let (mut u, mut nn) = (self.bufs[Buf::Up as usize].as_ptr(), n as i32);
        run("silu_mul", Launch::elementwise(n), &mut params![g, u, nn]);
    }

    fn add(&mut self, to: Buf, from: Buf) {
        let n = self.bufs[to as usize].len();
        let mut y = self.bufs[from as usize].as_ptr();
        let (mut x, mut nn) = (self.bufs[to as usize].as_mut_ptr(), n as i32);
        run("add", Launch::elementwise(n), &mut params![x, y, nn]);
    }

    fn logits(&mut self, model: &Model, rows: &[usize]) -> &[f32] {
        if rows.is_empty() {
            return &[];
        }
        let d = model.shape.dim;
        self.norm.clear();
        self.norm.resize(rows.len() * d, 0.0);
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let mut x = self.bufs[Buf::X as usize].as_ptr();
        let (mut ip, mut dd, mut w, mut e) =
            (idx.as_ptr(), d as i32, model.norm.as_ptr(), model.shape.eps);
        let mut o = self.norm.as_mut_ptr();
        run(
            "rms_norm",
            Launch::per_row(rows.len()),
            &mut params![x, ip, dd, w, e, o],
        );
        let mut logits = std::mem::take(&mut self.logits);
        matvec(model, &model.output, &self.norm, rows.len(), &mut logits);
        self.logits = logits;
        &self.logits
    }

    fn samples(&self) -> bool {
        true
    }

    fn sample(&mut self, model: &Model, rows: &[usize], how: &[DeviceSampling]) -> Vec<u32> {
        let vocab = model.shape.vocab;
        self.logits(model, rows);
        Emu::sample_rows(&self.logits, vocab, how)
    }

    fn copy_blocks(&mut self, copies: &[(u32, u32)]) {
        let len = self.kv_block;
        for &(from, to) in copies {
            let (from, to) = (from as usize * len, to as usize * len);
            self.kv.copy_within(from..from + len, to);
        }
    }
}

impl Emu {
    /// The `sample` kernel over rows of logits, one `how` each.
    pub fn sample_rows(logits: &[f32], vocab: usize, how: &[DeviceSampling]) -> Vec<u32> {
        let rows = how.len();
        let t: Vec<f32> = how.iter().map(|h| h.temperature).collect();
        let k: Vec<i32> = how
            .iter()
            .map(|h| h.top_k.min(i32::MAX as u32) as i32)
            .collect();
        let p: Vec<f32> = how.iter().map(|h| h.top_p).collect();
        let seeds: Vec<u64> = how.iter().map(|h| h.seed).collect();
        let steps: Vec<u32> = how.iter().map(|h| h.step).collect();
        let mut out = vec![0i32; rows];
        let (mut lp, mut v) = (logits.as_ptr(), vocab as i32);
        let (mut tp, mut kp, mut pp) = (t.as_ptr(), k.as_ptr(), p.as_ptr());
        let (mut sp, mut stp, mut o) = (seeds.as_ptr(), steps.as_ptr(), out.as_mut_ptr());
        run(
            "sample",
            Launch::per_row(rows),
            &mut params![lp, v, tp, kp, pp, sp, stp, o],
        );
        out.into_iter().map(|t| t.max(0) as u32).collect()
    }
}

impl StepBackend for Emu {
    fn kv(&mut self) -> &mut KvPool {
        self.pool.as_mut().expect("an Emu made with_pool")
    }
}

/// Whether every kernel the sources define is one the emulation can launch.
pub fn kernels_match() -> Result<(), String> {
    let mut emu: Vec<String> = flatmesh_cuda_emu::kernels()
        .into_iter()
        .filter(|k| !k.starts_with("emu_selftest"))
        .collect();
    let mut src: Vec<String> = super::SOURCES
        .iter()
        .flat_map(|s| s.kernels.iter().map(|k| k.to_string()))
        .collect();
    emu.sort();
    src.sort();
    match emu == src {
        true => Ok(()),
        false => Err(format!("emulated {emu:?}, sources {src:?}")),
    }
}
