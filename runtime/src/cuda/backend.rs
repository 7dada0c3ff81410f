//! The CUDA backend of the forward pass: the kernels of this module on one GPU, through
//! cudarc. UNVERIFIED: it builds in CI and takes the launch configurations and argument lists
//! the emulated backend (`emu.rs`) checks against the CPU, but it has not yet run on a GPU.
//!
//! The model's GGUF bytes go to device memory as stored (one allocation, copied in chunks on
//! the copy's stream; tensors keep their file offsets); norm weights and biases, which the
//! `Backend` trait passes as host slices, are uploaded once and found again by their host
//! address. The KV cache is on the GPU (the `KvPool` keeps only the block tables). Every
//! allocation is counted in the copy's `Held` bytes. Tokens are sampled on the GPU; logits
//! come back only for sequences that need them on the host.
#![allow(unsafe_code)]

use std::collections::HashMap;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::gpu::{addr, grow, DBuf, Mem, Pinned};
pub use super::gpu::{CudaError, Gpu};
use super::pagein::{self, Counted, Held, PageIn, CHUNK_BYTES};
use super::{suffix, Launch};
use crate::llm::batch::StepBackend;
use crate::llm::forward::{Backend, Batch, Buf, DeviceSampling};
use crate::llm::kernels::Act;
use crate::llm::kv::KvPool;
use crate::llm::model::{Matrix, Model};

/// A kernel argument: a device address, an i32 or an f32.
enum Arg {
    P(u64),
    I(i32),
    F(f32),
}

/// The forward pass of one copy on one GPU.
pub struct Cuda {
    gpu: Gpu,
    mem: Mem,
    /// Every byte this copy holds on the GPU.
    held: Held,
    weights: (Counted<cudarc::driver::CudaSlice<u8>>, u64),
    vectors: HashMap<usize, (Counted<cudarc::driver::CudaSlice<u8>>, u64)>,
    tokens: usize,
    bufs: [DBuf; Buf::COUNT],
    /// Values per token of each buffer, as last sized.
    widths: [usize; Buf::COUNT],
    act: [DBuf; 3],
    kv: (Counted<cudarc::driver::CudaSlice<u8>>, u64),
    /// The block tables of the KV cache (its values are in `kv`).
    pool: KvPool,
    kv_block_bytes: usize,
    layers: usize,
    block_tokens: usize,
    meta: [DBuf; 8],
    scores: DBuf,
    norm: DBuf,
    out: DBuf,
    logits: Vec<f32>,
    /// The first failed call; later launches are skipped.
    pub error: Option<CudaError>,
}

impl Cuda {
    /// A copy of `model` on `gpu`: its GGUF bytes paged in as stored (page-locked for the
    /// copy, in chunks on the copy's stream) while the norm vectors, the KV cache of `pool`'s
    /// blocks and a step's buffers for `step_tokens` tokens are allocated. An allocation the
    /// GPU cannot make fails the whole copy, and every byte taken is handed back.
    pub fn new(
        gpu: Gpu,
        model: &Model,
        pool: KvPool,
        step_tokens: usize,
    ) -> Result<Cuda, CudaError> {
        let s = &model.shape;
        let mem = gpu.memory();
        let image: &[u8] = &model.bytes[..];
        let pinned = Pinned::new(&gpu.ctx, image);
        let page = PageIn::start(&mem, image, CHUNK_BYTES)?;
        let mut vectors = HashMap::new();
        let mut host: Vec<&[f32]> = vec![&model.norm];
        for l in &model.layers {
            host.extend([&l.attn_norm[..], &l.ffn_norm[..]]);
            if let Some(b) = &l.bias {
                host.extend(b.iter().map(|v| &v[..]));
            }
        }
        for v in host {
            let bytes = f32_bytes(v);
            let mut d = page.alloc(bytes.len(), "the norm weights and biases")?;
            pagein::DeviceMemory::copy_in(&mem, &mut d.block, 0, &bytes)
                .map_err(|_| CudaError::Driver("copying the norm weights failed".into()))?;
            let p = addr(&mem.0, &d.block);
            vectors.insert(v.as_ptr() as usize, (d, p));
        }
        let kv_block_bytes = s.layers * 2 * pool.block_tokens() * s.kv_dim() * 2;
        let kv = page.alloc(pool.total_blocks() * kv_block_bytes, "the KV cache")?;
        let kvp = addr(&mem.0, &kv.block);
        let (weights, held) = page.finish()?;
        // `vectors`' host sources were copied from pageable memory: the wait above covers them.
        drop(pinned);
        let wptr = addr(&mem.0, &weights.block);
        let mut cuda = Cuda {
            gpu,
            mem,
            held,
            weights: (weights, wptr),
            vectors,
            tokens: 0,
            bufs: Default::default(),
            widths: [0; Buf::COUNT],
            act: Default::default(),
            kv: (kv, kvp),
            block_tokens: pool.block_tokens(),
            pool,
            kv_block_bytes,
            layers: s.layers,
            meta: Default::default(),
            scores: Default::default(),
            norm: Default::default(),
            out: Default::default(),
            logits: Vec::new(),
            error: None,
        };
        cuda.reserve_step(model, step_tokens.max(1));
        match cuda.error.take() {
            Some(e) => Err(e),
            None => Ok(cuda),
        }
    }

    /// Allocate a step's buffers for `tokens` tokens up front, so that the copy's bytes are
    /// known at load (attention's scratch for the whole KV capacity; longer prefills are
    /// chunked by the step budget).
    fn reserve_step(&mut self, model: &Model, tokens: usize) {
        let s = &model.shape;
        let widest = [s.dim, s.q_dim(), s.kv_dim(), s.hidden]
            .into_iter()
            .max()
            .unwrap_or(1);
        self.tokens = tokens;
        for b in 0..Buf::COUNT {
            grow(
                &self.mem,
                &self.held,
                &mut self.bufs[b],
                tokens * widest * 4,
                &mut self.error,
            );
        }
        for a in 0..3 {
            grow(
                &self.mem,
                &self.held,
                &mut self.act[a],
                tokens * widest * 4,
                &mut self.error,
            );
        }
        let ctx = self.pool.capacity();
        let scores = tokens * s.heads * ctx.min(s.context.max(1)) * 4;
        grow(
            &self.mem,
            &self.held,
            &mut self.scores,
            scores,
            &mut self.error,
        );
        grow(
            &self.mem,
            &self.held,
            &mut self.norm,
            tokens * s.dim * 4,
            &mut self.error,
        );
        grow(
            &self.mem,
            &self.held,
            &mut self.out,
            tokens * s.vocab * 4,
            &mut self.error,
        );
        self.tokens = 0;
    }

    /// Bytes this copy holds on its GPU (weights, vectors, KV cache, a step's buffers).
    pub fn held_bytes(&self) -> u64 {
        self.held.bytes()
    }

    /// The GPU back, for another copy (the copy's memory is freed).
    pub fn into_gpu(self) -> Gpu {
        self.gpu
    }

    fn fail(&mut self, e: impl Into<CudaError>) {
        self.error.get_or_insert(e.into());
    }

    fn run(&mut self, name: &str, l: Launch, args: &[Arg]) {
        if self.error.is_some() {
            return;
        }
        let Some(f) = self.gpu.funcs.get(name) else {
            return self.fail(CudaError::Driver(format!("no kernel {name}")));
        };
        let cfg = LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block[0], l.block[1], l.block[2]),
            shared_mem_bytes: 0,
        };
        let launched = {
            let mut b = self.gpu.stream.launch_builder(f);
            for a in args {
                match a {
                    Arg::P(p) => b.arg(p),
                    Arg::I(i) => b.arg(i),
                    Arg::F(x) => b.arg(x),
                };
            }
            // SAFETY: each kernel's arguments are given in its order and types (the same
            // lists the emulated backend checks), with device buffers sized for the launch.
            unsafe { b.launch(cfg) }
        };
        if let Err(e) = launched {
            self.fail(e);
        }
    }

    /// The device address of a host vector uploaded at load (or uploaded now).
    fn vector(&mut self, v: &[f32]) -> u64 {
        if let Some((_, p)) = self.vectors.get(&(v.as_ptr() as usize)) {
            return *p;
        }
        let bytes = f32_bytes(v);
        let uploaded =
            pagein::alloc(&self.mem, &self.held, bytes.len(), "a vector").and_then(|mut d| {
                pagein::DeviceMemory::copy_in(&self.mem, &mut d.block, 0, &bytes).map_err(|f| {
                    pagein::MemError::Driver {
                        what: "a vector's copy",
                        reason: format!("{f:?}"),
                    }
                })?;
                Ok(d)
            });
        match uploaded {
            Ok(d) => {
                let p = addr(&self.mem.0, &d.block);
                self.vectors.insert(v.as_ptr() as usize, (d, p));
                p
            }
            Err(e) => {
                self.fail(e);
                0
            }
        }
    }

    /// Copy `bytes` into the step's argument buffer `slot`; its device address.
    fn upload(&mut self, slot: usize, bytes: &[u8]) -> u64 {
        let p = grow(
            &self.mem,
            &self.held,
            &mut self.meta[slot],
            bytes.len(),
            &mut self.error,
        );
        if self.error.is_some() {
            return p;
        }
        let Some(m) = self.meta[slot].mem.as_mut() else {
            return p;
        };
        let mut view = m.block.slice_mut(0..bytes.len());
        if let Err(e) = self.mem.0.memcpy_htod(bytes, &mut view) {
            self.fail(e);
        }
        p
    }

    fn upload_meta(&mut self, slot: usize, v: &[i32]) -> u64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
        self.upload(slot, &bytes)
    }

    fn weight(&self, m: &Matrix) -> u64 {
        self.weights.1 + m.offset as u64
    }

    /// Quantize `tokens` rows of `from` for `act`; the matvec's `act`, `ad` and `ax`.
    fn quantize(&mut self, from: u64, cols: usize, tokens: usize, act: Act) -> [u64; 3] {
        let n = tokens * cols;
        let (a, d, x) = match act {
            Act::F32 => return [from, 0, 0],
            Act::F16 => (n.div_ceil(2), 0, 0),
            Act::Q8_0 => (n.div_ceil(4), n / 32, 0),
            Act::Q8_1 => (n.div_ceil(4), n / 32, n / 32),
            Act::Q8K => (n.div_ceil(4), n / 256, n / 16),
        };
        let [pa, pd, px] = [a, d, x].map(|len| len.max(1));
        let (m, h, e) = (&self.mem, &self.held, &mut self.error);
        let pa = grow(m, h, &mut self.act[0], pa * 4, e);
        let pd = grow(m, h, &mut self.act[1], pd * 4, e);
        let px = grow(m, h, &mut self.act[2], px * 4, e);
        let c = Arg::I(cols as i32);
        match act {
            Act::F16 => self.run(
                "to_f16",
                Launch::elementwise(n),
                &[Arg::P(from), Arg::I(n as i32), Arg::P(pa)],
            ),
            Act::Q8K => self.run(
                "quantize_q8k",
                Launch::quantize(cols, tokens),
                &[Arg::P(from), c, Arg::P(pa), Arg::P(pd), Arg::P(px)],
            ),
            _ => {
                let s = if act == Act::Q8_1 { px } else { 0 };
                self.run(
                    "quantize_q8",
                    Launch::quantize(cols, tokens),
                    &[Arg::P(from), c, Arg::P(pa), Arg::P(pd), Arg::P(s)],
                )
            }
        }
        [pa, pd, px]
    }

    fn matvec(&mut self, w: &Matrix, from: u64, tokens: usize, out: u64) {
        let [a, d, x] = self.quantize(from, w.cols, tokens, w.qtype.act());
        let args = [
            Arg::P(self.weight(w)),
            Arg::I(w.rows as i32),
            Arg::I(w.cols as i32),
            Arg::P(a),
            Arg::P(d),
            Arg::P(x),
            Arg::I(tokens as i32),
            Arg::P(out),
        ];
        let name = format!("matvec_{}", suffix(w.qtype));
        self.run(&name, Launch::matvec(w.rows, tokens), &args);
    }

    fn sized(&mut self, b: Buf, width: usize) -> u64 {
        self.widths[b as usize] = width;
        let n = (self.tokens * width).max(1);
        grow(
            &self.mem,
            &self.held,
            &mut self.bufs[b as usize],
            n * 4,
            &mut self.error,
        )
    }

    fn buf(&self, b: Buf) -> u64 {
        self.bufs[b as usize].ptr
    }
}

mod ops;

/// A vector's bytes as the device reads them.
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}
