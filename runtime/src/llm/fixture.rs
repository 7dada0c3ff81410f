//! Small random llama models written as GGUF in any supported quantization, and a plain f32
//! forward pass to check the engine against (tests only).

use std::io::Cursor;

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QTensor};

use super::{
    kernels::{quantize_weights, Kernels, QType},
    model::{Matrix, Model},
};
use crate::bytes::Bytes;

/// The fixture's shape: K-quants need rows of 256, so the widths are multiples of it.
pub const DIM: usize = 256;
pub const HIDDEN: usize = 512;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;
pub const VOCAB: usize = 300;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn fill(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

fn dtype(q: QType) -> GgmlDType {
    match q {
        QType::F32 => GgmlDType::F32,
        QType::F16 => GgmlDType::F16,
        QType::Q4_0 => GgmlDType::Q4_0,
        QType::Q4_1 => GgmlDType::Q4_1,
        QType::Q5_0 => GgmlDType::Q5_0,
        QType::Q5_1 => GgmlDType::Q5_1,
        QType::Q8_0 => GgmlDType::Q8_0,
        QType::Q4K => GgmlDType::Q4K,
        QType::Q5K => GgmlDType::Q5K,
        QType::Q6K => GgmlDType::Q6K,
    }
}

/// A random model with every matrix stored as `q` (norms in f32), as GGUF bytes.
pub fn model_bytes(q: QType, seed: u64, qkv_bias: bool) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let dev = candle_core::Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, rows: usize, cols: usize, q: QType, x: Vec<f32>| {
        let raw = quantize_weights(q, &x);
        let dims = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        let t = ggml_file::qtensor_from_ggml(dtype(q), &raw, dims, &dev).unwrap();
        tensors.push((name, t));
    };
    let kv = KV_HEADS * DIM / HEADS;
    add(
        "token_embd.weight".into(),
        VOCAB,
        DIM,
        q,
        rng.fill(VOCAB * DIM, 2.0, 0.0),
    );
    for l in 0..LAYERS {
        let mut m = |t: &str, rows: usize, cols: usize, rng: &mut Rng| {
            let scale = 2.0 / (cols as f32).sqrt();
            add(
                format!("blk.{l}.{t}"),
                rows,
                cols,
                q,
                rng.fill(rows * cols, scale, 0.0),
            );
        };
        m("attn_q.weight", DIM, DIM, &mut rng);
        m("attn_k.weight", kv, DIM, &mut rng);
        m("attn_v.weight", kv, DIM, &mut rng);
        m("attn_output.weight", DIM, DIM, &mut rng);
        m("ffn_gate.weight", HIDDEN, DIM, &mut rng);
        m("ffn_up.weight", HIDDEN, DIM, &mut rng);
        m("ffn_down.weight", DIM, HIDDEN, &mut rng);
        for (t, n) in [("attn_norm.weight", DIM), ("ffn_norm.weight", DIM)] {
            add(
                format!("blk.{l}.{t}"),
                1,
                n,
                QType::F32,
                rng.fill(n, 0.2, 1.0),
            );
        }
        if qkv_bias {
            for (t, n) in [
                ("attn_q.bias", DIM),
                ("attn_k.bias", kv),
                ("attn_v.bias", kv),
            ] {
                add(
                    format!("blk.{l}.{t}"),
                    1,
                    n,
                    QType::F32,
                    rng.fill(n, 0.2, 0.0),
                );
            }
        }
    }
    add(
        "output_norm.weight".into(),
        1,
        DIM,
        QType::F32,
        rng.fill(DIM, 0.2, 1.0),
    );
    let arch = if qkv_bias { "qwen2" } else { "llama" };
    use gguf_file::Value;
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{arch}.context_length"), Value::U32(512)),
        (format!("{arch}.embedding_length"), Value::U32(DIM as u32)),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(HIDDEN as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}

/// The fixture parsed into a model.
pub fn model(q: QType, seed: u64, qkv_bias: bool) -> Model {
    let bytes = Bytes::Shared(std::sync::Arc::new(model_bytes(q, seed, qkv_bias)));
    Model::parse(bytes, std::path::Path::new("<fixture>"))
        .unwrap()
        .0
}

fn dense(m: &Model, w: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; w.rows * w.cols];
    for (r, row) in out.chunks_mut(w.cols).enumerate() {
        Kernels::scalar().dequantize_row(w.qtype, m.row(w, r), row);
    }
    out
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * s * b).collect()
}

fn rope(x: &mut [f32], hd: usize, base: f32, pos: usize) {
    for head in x.chunks_mut(hd) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / hd as f64);
            let (sin, cos) = (theta.sin() as f32, theta.cos() as f32);
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// Logits after each token of `ids`, from the weights dequantized to f32, activations and
/// KV in f32 throughout: the textbook forward pass.
pub fn reference_logits(m: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let s = &m.shape;
    let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
    let layers: Vec<_> = m
        .layers
        .iter()
        .map(|l| [l.wq, l.wk, l.wv, l.wo, l.gate, l.up, l.down].map(|w| dense(m, &w)))
        .collect();
    let (embed, output) = (dense(m, &m.embed), dense(m, &m.output));
    // Per layer: the K rows and the V rows of every position so far.
    type Rows = Vec<Vec<f32>>;
    let mut cache: Vec<(Rows, Rows)> = vec![Default::default(); s.layers];
    let mut all = Vec::new();
    for (pos, &id) in ids.iter().enumerate() {
        let mut x = embed[id as usize * s.dim..(id as usize + 1) * s.dim].to_vec();
        for (i, l) in m.layers.iter().enumerate() {
            let [wq, wk, wv, wo, gate, up, down] = &layers[i];
            let h = norm(&x, &l.attn_norm, s.eps);
            let (mut q, mut k, mut v) = (matvec(wq, &h), matvec(wk, &h), matvec(wv, &h));
            if let Some([bq, bk, bv]) = &l.bias {
                for (t, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    t.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
            }
            rope(&mut q, hd, s.rope_base, pos);
            rope(&mut k, hd, s.rope_base, pos);
            cache[i].0.push(k);
            cache[i].1.push(v);
            let mut att = vec![0f32; s.q_dim()];
            for h in 0..s.heads {
                let g = (h / group) * hd;
                let qh = &q[h * hd..(h + 1) * hd];
                let scores: Vec<f32> = cache[i]
                    .0
                    .iter()
                    .map(|k| {
                        k[g..g + hd].iter().zip(qh).map(|(a, b)| a * b).sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (p, v) in e.iter().zip(&cache[i].1) {
                    for (o, vv) in att[h * hd..(h + 1) * hd].iter_mut().zip(&v[g..g + hd]) {
                        *o += p / sum * vv;
                    }
                }
            }
            x.iter_mut()
                .zip(matvec(wo, &att))
                .for_each(|(a, b)| *a += b);
            let h = norm(&x, &l.ffn_norm, s.eps);
            let (g, u) = (matvec(gate, &h), matvec(up, &h));
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            x.iter_mut()
                .zip(matvec(down, &act))
                .for_each(|(a, b)| *a += b);
        }
        all.push(matvec(&output, &norm(&x, &m.norm, s.eps)));
    }
    all
}
