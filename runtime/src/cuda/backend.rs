//! The CUDA backend of the forward pass: the kernels of this module on one GPU, through
//! cudarc. UNVERIFIED: it builds in CI and takes the launch configurations and argument lists
//! the emulated backend (`emu.rs`) checks against the CPU, but it has not yet run on a GPU,
//! and no engine uses it.
//!
//! The model's GGUF bytes go to device memory as stored (one allocation; tensors keep their
//! file offsets); norm weights and biases, which the `Backend` trait passes as host slices,
//! are uploaded once and found again by their host address. Logits are copied back.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{nvrtc, suffix, Launch, SOURCES};
use crate::llm::{
    forward::{Backend, Batch, Buf},
    kernels::Act,
    model::{Matrix, Model},
};

/// What went wrong setting up or running the backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error(transparent)]
    Nvrtc(#[from] nvrtc::NvrtcError),
}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

/// Every source compiled for one architecture, once per process.
fn cubins(arch: u32) -> Result<Arc<Vec<nvrtc::Cubin>>, CudaError> {
    type Cache = Mutex<HashMap<u32, Arc<Vec<nvrtc::Cubin>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&arch) {
        return Ok(c.clone());
    }
    let built: Vec<nvrtc::Cubin> = SOURCES
        .iter()
        .map(|s| nvrtc::compile(s, arch))
        .collect::<Result<_, _>>()?;
    let built = Arc::new(built);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    Ok(cache.entry(arch).or_insert(built).clone())
}

/// One GPU with the kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        // SAFETY: only tries to open the driver library by its candidate names (cudarc
        // panics at the first call into a library it cannot open).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::Driver(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = (major * 10 + minor) as u32;
        let mut funcs = HashMap::new();
        for (src, cubin) in SOURCES.iter().zip(cubins(arch)?.iter()) {
            let module = ctx.load_module(Ptx::from_binary(cubin.image.clone()))?;
            for k in src.kernels {
                funcs.insert(*k, module.load_function(k)?);
            }
        }
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream, funcs })
    }
}

/// A kernel argument: a device address, an i32 or an f32.
enum Arg {
    P(u64),
    I(i32),
    F(f32),
}

/// A device buffer that grows to what a step needs.
struct DBuf<T> {
    mem: Option<CudaSlice<T>>,
    ptr: u64,
}

impl<T> Default for DBuf<T> {
    fn default() -> Self {
        DBuf { mem: None, ptr: 0 }
    }
}

/// The forward pass of one copy on one GPU.
pub struct Cuda {
    gpu: Gpu,
    weights: (CudaSlice<u8>, u64),
    vectors: HashMap<usize, (CudaSlice<f32>, u64)>,
    tokens: usize,
    bufs: [DBuf<f32>; Buf::COUNT],
    /// Values per token of each buffer, as last sized.
    widths: [usize; Buf::COUNT],
    act: [DBuf<f32>; 3],
    kv: (CudaSlice<u16>, u64),
    layers: usize,
    block_tokens: usize,
    meta: [DBuf<i32>; 4],
    scores: DBuf<f32>,
    norm: DBuf<f32>,
    out: DBuf<f32>,
    logits: Vec<f32>,
    /// The first failed call; later launches are skipped.
    pub error: Option<CudaError>,
}

impl Cuda {
    /// `model`'s weights uploaded as stored, and a KV cache of `blocks` blocks laid out as
    /// the CPU's `KvPool`.
    pub fn new(
        gpu: Gpu,
        model: &Model,
        blocks: usize,
        block_tokens: usize,
    ) -> Result<Cuda, CudaError> {
        let s = &model.shape;
        let weights = gpu.stream.clone_htod(&model.bytes[..])?;
        let wptr = ptr(&gpu.stream, &weights);
        let mut vectors = HashMap::new();
        let mut host: Vec<&[f32]> = vec![&model.norm];
        for l in &model.layers {
            host.extend([&l.attn_norm[..], &l.ffn_norm[..]]);
            if let Some(b) = &l.bias {
                host.extend(b.iter().map(|v| &v[..]));
            }
        }
        for v in host {
            let d = gpu.stream.clone_htod(v)?;
            let p = ptr(&gpu.stream, &d);
            vectors.insert(v.as_ptr() as usize, (d, p));
        }
        let kv = gpu
            .stream
            .alloc_zeros::<u16>(blocks * s.layers * 2 * block_tokens * s.kv_dim())?;
        let kvp = ptr(&gpu.stream, &kv);
        Ok(Cuda {
            gpu,
            weights: (weights, wptr),
            vectors,
            tokens: 0,
            bufs: Default::default(),
            widths: [0; Buf::COUNT],
            act: Default::default(),
            kv: (kv, kvp),
            layers: s.layers,
            block_tokens,
            meta: Default::default(),
            scores: Default::default(),
            norm: Default::default(),
            out: Default::default(),
            logits: Vec::new(),
            error: None,
        })
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
        match self.gpu.stream.clone_htod(v) {
            Ok(d) => {
                let p = ptr(&self.gpu.stream, &d);
                self.vectors.insert(v.as_ptr() as usize, (d, p));
                p
            }
            Err(e) => {
                self.fail(e);
                0
            }
        }
    }

    fn upload_meta(&mut self, slot: usize, v: &[i32]) -> u64 {
        let stream = self.gpu.stream.clone();
        match stream.clone_htod(v) {
            Ok(d) => {
                let p = ptr(&stream, &d);
                self.meta[slot] = DBuf {
                    mem: Some(d),
                    ptr: p,
                };
                p
            }
            Err(e) => {
                self.fail(e);
                0
            }
        }
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
        let pa = grow(&self.gpu.stream, &mut self.act[0], pa, &mut self.error);
        let pd = grow(&self.gpu.stream, &mut self.act[1], pd, &mut self.error);
        let px = grow(&self.gpu.stream, &mut self.act[2], px, &mut self.error);
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
            &self.gpu.stream,
            &mut self.bufs[b as usize],
            n,
            &mut self.error,
        )
    }

    fn buf(&self, b: Buf) -> u64 {
        self.bufs[b as usize].ptr
    }
}

fn ptr<T>(stream: &CudaStream, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(stream).0
}

/// `b` with room for `n` values (reallocated, contents lost, when smaller); its address.
fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    b: &mut DBuf<T>,
    n: usize,
    error: &mut Option<CudaError>,
) -> u64 {
    if b.mem.as_ref().is_some_and(|m| m.len() >= n) {
        return b.ptr;
    }
    match stream.alloc_zeros::<T>(n) {
        Ok(m) => {
            b.ptr = ptr(stream, &m);
            b.mem = Some(m);
        }
        Err(e) => {
            error.get_or_insert(e.into());
        }
    }
    b.ptr
}

impl Backend for Cuda {
    fn begin(&mut self, tokens: usize) {
        self.tokens = tokens;
    }

    fn embed(&mut self, model: &Model, ids: &[u32]) {
        let x = self.sized(Buf::X, model.shape.dim);
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let p = self.upload_meta(0, &ids);
        let args = [
            Arg::P(self.weight(&model.embed)),
            Arg::I(model.shape.dim as i32),
            Arg::P(p),
            Arg::P(x),
        ];
        let name = format!("embed_{}", suffix(model.embed.qtype));
        self.run(&name, Launch::per_row(ids.len()), &args);
    }

    fn rms_norm(&mut self, from: Buf, weight: &[f32], eps: f32, to: Buf) {
        let w = self.vector(weight);
        let out = self.sized(to, weight.len());
        let args = [
            Arg::P(self.buf(from)),
            Arg::P(0),
            Arg::I(weight.len() as i32),
            Arg::P(w),
            Arg::F(eps),
            Arg::P(out),
        ];
        self.run("rms_norm", Launch::per_row(self.tokens), &args);
    }

    fn matmul(&mut self, _model: &Model, from: Buf, outs: &[(&Matrix, Buf)]) {
        let input = self.buf(from);
        for (w, to) in outs {
            let out = self.sized(*to, w.rows);
            self.matvec(w, input, self.tokens, out);
        }
    }

    fn add_bias(&mut self, to: Buf, bias: &[f32]) {
        let b = self.vector(bias);
        let n = self.tokens * bias.len();
        let args = [
            Arg::P(self.buf(to)),
            Arg::P(b),
            Arg::I(bias.len() as i32),
            Arg::I(n as i32),
        ];
        self.run("add_bias", Launch::elementwise(n), &args);
    }

    fn rope(&mut self, buf: Buf, head_dim: usize, base: f32, positions: &[usize]) {
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let p = self.upload_meta(1, &pos);
        let width = self.widths[buf as usize];
        let args = [
            Arg::P(self.buf(buf)),
            Arg::I(width as i32),
            Arg::I(head_dim as i32),
            Arg::F(base.powf(-2.0 / head_dim as f32)),
            Arg::P(p),
        ];
        self.run("rope", Launch::per_row(self.tokens), &args);
    }

    fn attention(&mut self, model: &Model, layer: usize, batch: &Batch) {
        let s = &model.shape;
        let max_blocks = batch
            .tables
            .iter()
            .map(|t| t.blocks.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut flat = vec![0i32; batch.tables.len() * max_blocks];
        for (row, t) in flat.chunks_mut(max_blocks).zip(&batch.tables) {
            for (o, b) in row.iter_mut().zip(&t.blocks) {
                *o = *b as i32;
            }
        }
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        let seq: Vec<i32> = batch.seq_of.iter().map(|&p| p as i32).collect();
        let (pp, sp, tp) = (
            self.upload_meta(1, &pos),
            self.upload_meta(2, &seq),
            self.upload_meta(3, &flat),
        );
        let common = |k: &Self| {
            [pp, sp, tp].map(Arg::P).into_iter().chain([
                Arg::I(max_blocks as i32),
                Arg::I(k.layers as i32),
                Arg::I(layer as i32),
                Arg::I(k.block_tokens as i32),
            ])
        };
        let mut args = vec![
            Arg::P(self.buf(Buf::K)),
            Arg::P(self.buf(Buf::V)),
            Arg::I(s.kv_dim() as i32),
        ];
        args.extend(common(self));
        args.push(Arg::P(self.kv.1));
        self.run("kv_store", Launch::per_row(self.tokens), &args);
        let ctx = pos.iter().max().map_or(1, |&p| p as usize + 1);
        let scores = grow(
            &self.gpu.stream,
            &mut self.scores,
            self.tokens * s.heads * ctx,
            &mut self.error,
        );
        let out = self.sized(Buf::Att, s.q_dim());
        let mut args = vec![Arg::P(self.buf(Buf::Q)), Arg::P(self.kv.1)];
        args.extend(common(self));
        args.extend([
            Arg::I(s.heads as i32),
            Arg::I(s.kv_heads as i32),
            Arg::I(s.head_dim as i32),
            Arg::F(1.0 / (s.head_dim as f32).sqrt()),
            Arg::P(scores),
            Arg::I(ctx as i32),
            Arg::P(out),
        ]);
        self.run("attention", Launch::attention(s.heads, self.tokens), &args);
    }

    fn silu_mul(&mut self) {
        let n = self.tokens * self.widths[Buf::Gate as usize];
        let args = [
            Arg::P(self.buf(Buf::Gate)),
            Arg::P(self.buf(Buf::Up)),
            Arg::I(n as i32),
        ];
        self.run("silu_mul", Launch::elementwise(n), &args);
    }

    fn add(&mut self, to: Buf, from: Buf) {
        let n = self.widths[to as usize] * self.tokens;
        let args = [
            Arg::P(self.buf(to)),
            Arg::P(self.buf(from)),
            Arg::I(n as i32),
        ];
        self.run("add", Launch::elementwise(n), &args);
    }

    fn logits(&mut self, model: &Model, rows: &[usize]) -> &[f32] {
        self.logits.clear();
        if rows.is_empty() {
            return &self.logits;
        }
        let d = model.shape.dim;
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let ip = self.upload_meta(0, &idx);
        let w = self.vector(&model.norm);
        let norm = grow(
            &self.gpu.stream,
            &mut self.norm,
            rows.len() * d,
            &mut self.error,
        );
        let args = [
            Arg::P(self.buf(Buf::X)),
            Arg::P(ip),
            Arg::I(d as i32),
            Arg::P(w),
            Arg::F(model.shape.eps),
            Arg::P(norm),
        ];
        self.run("rms_norm", Launch::per_row(rows.len()), &args);
        let n = rows.len() * model.output.rows;
        let out = grow(&self.gpu.stream, &mut self.out, n, &mut self.error);
        self.matvec(&model.output, norm, rows.len(), out);
        self.logits.resize(n, 0.0);
        if self.error.is_none() {
            let stream = self.gpu.stream.clone();
            let copied = match &self.out.mem {
                Some(m) => stream.memcpy_dtoh(&m.slice(0..n), &mut self.logits[..]),
                None => Ok(()),
            };
            if let Err(e) = copied.and_then(|_| stream.synchronize()) {
                self.fail(e);
            }
        }
        &self.logits
    }
}
