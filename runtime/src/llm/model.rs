//! A llama-family model's shape and weights, viewed in place in the GGUF bytes.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType};

use super::kernels::{Kernels, QType};
use crate::bytes::Bytes;
use crate::gguf::bad_gguf;
use crate::{Result, RuntimeError};

/// Architectures whose GGUF files this engine runs: llama itself, and relatives that differ
/// only in optional biases on the Q, K and V projections (read when the file has them).
pub const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

/// The largest vocabulary a model may have (real ones have up to ~260k tokens): every
/// sequence holds a logit per token.
const MAX_VOCAB: usize = 1 << 22;

/// The hyperparameters of a model, from its GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub vocab: usize,
    pub dim: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub eps: f32,
    /// Tokens the model was trained to attend to.
    pub context: usize,
}

impl Shape {
    /// Width of one token's K (or V) across the KV heads.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of one token's Q across the heads.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Bytes of KV cache one token takes in f16 (K and V in every layer).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_dim() * 2) as u64
    }
}

/// A weight matrix of `rows` × `cols` stored as `qtype`, `offset` bytes into the model bytes.
#[derive(Debug, Clone, Copy)]
pub struct Matrix {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
}

impl Matrix {
    pub fn row_bytes(&self) -> usize {
        self.qtype.row_bytes(self.cols)
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }
}

/// One transformer block.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    /// Q, K and V biases, where the architecture has them.
    pub bias: Option<[Vec<f32>; 3]>,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

/// The whole model: its shape, and its weights in place in `bytes`.
#[derive(Debug)]
pub struct Model {
    pub arch: String,
    pub shape: Shape,
    pub bytes: Bytes,
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// The output head (the embedding table itself when the file ties them).
    pub output: Matrix,
}

impl Model {
    /// The model in `bytes` (a whole GGUF file); `path` names it in errors.
    pub fn parse(bytes: Bytes, path: &Path) -> Result<(Model, gguf_file::Content)> {
        let bad = |reason: String| bad_gguf(path, reason);
        let ct = crate::gguf::read(&bytes, path)?;
        let arch = meta_str(&ct, "general.architecture")
            .ok_or_else(|| bad("metadata key general.architecture is missing".into()))?;
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(RuntimeError::UnsupportedArchitecture(arch));
        }
        let shape = shape(&ct, &arch, path)?;
        let tensors = Tensors {
            ct: &ct,
            len: bytes.len(),
            path,
        };
        let d = shape.dim;
        let (q, kv) = (shape.q_dim(), shape.kv_dim());
        let embed = tensors.matrix("token_embd.weight", shape.vocab, d)?;
        let output = match ct.tensor_infos.contains_key("output.weight") {
            true => tensors.matrix("output.weight", shape.vocab, d)?,
            false => embed,
        };
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let name = |t: &str| format!("blk.{i}.{t}");
            let vec = |t: &str, n: usize| tensors.vector(&bytes, &name(t), n);
            let bias = match ct.tensor_infos.contains_key(&name("attn_q.bias")) {
                true => Some([
                    vec("attn_q.bias", q)?,
                    vec("attn_k.bias", kv)?,
                    vec("attn_v.bias", kv)?,
                ]),
                false => None,
            };
            layers.push(Layer {
                attn_norm: vec("attn_norm.weight", d)?,
                wq: tensors.matrix(&name("attn_q.weight"), q, d)?,
                wk: tensors.matrix(&name("attn_k.weight"), kv, d)?,
                wv: tensors.matrix(&name("attn_v.weight"), kv, d)?,
                bias,
                wo: tensors.matrix(&name("attn_output.weight"), d, q)?,
                ffn_norm: vec("ffn_norm.weight", d)?,
                gate: tensors.matrix(&name("ffn_gate.weight"), shape.hidden, d)?,
                up: tensors.matrix(&name("ffn_up.weight"), shape.hidden, d)?,
                down: tensors.matrix(&name("ffn_down.weight"), d, shape.hidden)?,
            });
        }
        let norm = tensors.vector(&bytes, "output_norm.weight", d)?;
        let model = Model {
            arch,
            shape,
            bytes,
            embed,
            layers,
            norm,
            output,
        };
        Ok((model, ct))
    }

    /// The bytes of row `r` of `m`.
    pub fn row(&self, m: &Matrix, r: usize) -> &[u8] {
        let rb = m.row_bytes();
        &self.bytes[m.offset + r * rb..m.offset + (r + 1) * rb]
    }

    /// Bytes of the weights the engine reads (the GGUF tensor data, used in place).
    pub fn weight_bytes(&self) -> u64 {
        let mut n = self.embed.bytes() + self.norm.len() * 4;
        if self.output.offset != self.embed.offset {
            n += self.output.bytes();
        }
        for l in &self.layers {
            n += [l.wq, l.wk, l.wv, l.wo, l.gate, l.up, l.down]
                .iter()
                .map(Matrix::bytes)
                .sum::<usize>();
            n += (l.attn_norm.len() + l.ffn_norm.len()) * 4;
            n += l
                .bias
                .as_ref()
                .map_or(0, |b| b.iter().map(|v| v.len() * 4).sum());
        }
        n as u64
    }
}

fn meta_str(ct: &gguf_file::Content, key: &str) -> Option<String> {
    ct.metadata.get(key)?.to_string().ok().cloned()
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<usize> {
    ct.metadata.get(key)?.to_u32().ok().map(|v| v as usize)
}

/// The shape from the metadata, every value checked for sense before it sizes anything.
pub fn shape(ct: &gguf_file::Content, arch: &str, path: &Path) -> Result<Shape> {
    let bad = |reason: String| bad_gguf(path, reason);
    let need = |key: &str| {
        let key = format!("{arch}.{key}");
        match meta_u32(ct, &key) {
            Some(v) if (1..=1 << 20).contains(&v) => Ok(v),
            Some(v) => Err(bad(format!("metadata {key} = {v} is out of range"))),
            None => Err(bad(format!("metadata key {key} is missing"))),
        }
    };
    let dim = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = meta_u32(ct, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads);
    if dim % heads != 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(bad(format!(
            "{heads} heads and {kv_heads} KV heads do not divide a width of {dim}"
        )));
    }
    let vocab = match ct.tensor_infos.get("token_embd.weight") {
        Some(t) => t.shape.dims().first().copied().unwrap_or(0),
        None => return Err(bad("tensor token_embd.weight is missing".into())),
    };
    if !(1..=MAX_VOCAB).contains(&vocab) {
        return Err(bad(format!(
            "a vocabulary of {vocab} tokens is out of range (1 to {MAX_VOCAB})"
        )));
    }
    let f32_or = |key: &str, default: f32| {
        ct.metadata
            .get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(default)
    };
    let eps = f32_or("attention.layer_norm_rms_epsilon", 1e-5);
    let rope_base = f32_or("rope.freq_base", 10_000.0);
    if !(eps > 0.0 && eps < 1.0 && rope_base > 1.0 && rope_base.is_finite()) {
        return Err(bad(format!(
            "rms epsilon {eps} or rope base {rope_base} is out of range"
        )));
    }
    Ok(Shape {
        vocab,
        dim,
        hidden: need("feed_forward_length")?,
        layers: need("block_count")?,
        heads,
        kv_heads,
        head_dim: dim / heads,
        rope_base,
        eps,
        context: need("context_length")?,
    })
}

/// The tensor index, checked against the bytes it points into.
struct Tensors<'a> {
    ct: &'a gguf_file::Content,
    len: usize,
    path: &'a Path,
}

impl Tensors<'_> {
    /// `name` as a matrix of `rows` × `cols`.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.locate(name, &[rows, cols], rows, cols)
    }

    /// `name` as `n` f32 values (norms and biases: small, so copied out as f32).
    fn vector(&self, bytes: &[u8], name: &str, n: usize) -> Result<Vec<f32>> {
        let m = self.locate(name, &[n], 1, n)?;
        let mut out = vec![0f32; n];
        Kernels::scalar().dequantize_row(m.qtype, &bytes[m.offset..m.offset + m.bytes()], &mut out);
        Ok(out)
    }

    /// `name`, of the given dims, in a type the kernels know, inside the file.
    fn locate(&self, name: &str, dims: &[usize], rows: usize, cols: usize) -> Result<Matrix> {
        let bad = |reason: String| bad_gguf(self.path, format!("tensor {name}: {reason}"));
        let info = self
            .ct
            .tensor_infos
            .get(name)
            .ok_or_else(|| bad_gguf(self.path, format!("tensor {name} is missing")))?;
        if info.shape.dims() != dims {
            return Err(bad(format!(
                "shape {:?}, expected {dims:?}",
                info.shape.dims()
            )));
        }
        let qtype = qtype(info.ggml_dtype)
            .ok_or_else(|| bad(format!("type {:?} is not supported", info.ggml_dtype)))?;
        if !cols.is_multiple_of(qtype.block_elems()) {
            return Err(bad(format!(
                "{cols} columns do not fill {} blocks",
                qtype.name()
            )));
        }
        // The reader checked the tensor against the file; checked again here, where the
        // sizes the engine will index by are computed.
        let end = (self.ct.tensor_data_offset.checked_add(info.offset))
            .and_then(|start| usize::try_from(start).ok())
            .and_then(|start| {
                let bytes = rows.checked_mul(qtype.row_bytes(cols))?;
                Some((start, start.checked_add(bytes)?))
            });
        match end {
            Some((offset, end)) if end <= self.len => Ok(Matrix {
                qtype,
                rows,
                cols,
                offset,
            }),
            _ => Err(bad("its data runs past the end of the file".into())),
        }
    }
}

/// The kernels' name for a GGUF tensor type; `None` for types they do not run.
pub fn qtype(t: GgmlDType) -> Option<QType> {
    Some(match t {
        GgmlDType::F32 => QType::F32,
        GgmlDType::F16 => QType::F16,
        GgmlDType::Q4_0 => QType::Q4_0,
        GgmlDType::Q4_1 => QType::Q4_1,
        GgmlDType::Q5_0 => QType::Q5_0,
        GgmlDType::Q5_1 => QType::Q5_1,
        GgmlDType::Q8_0 => QType::Q8_0,
        GgmlDType::Q4K => QType::Q4K,
        GgmlDType::Q5K => QType::Q5K,
        GgmlDType::Q6K => QType::Q6K,
        _ => return None,
    })
}
