//! Valid small llama GGUF files with random weights, so tests can use dozens of models.

use std::{collections::HashMap, path::Path};

use candle_core::{
    quantized::{gguf_file, GgmlDType, QTensor},
    Device, Tensor,
};

/// The shape of a fixture model. Widths must be multiples of 32 (one Q8_0 block).
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub layers: usize,
    pub embd: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
}

impl Size {
    pub const TINY: Size = Size {
        layers: 1,
        embd: 64,
        ff: 128,
        heads: 2,
        kv_heads: 1,
        context: 128,
    };
    pub const SMALL: Size = Size {
        layers: 2,
        embd: 128,
        ff: 256,
        heads: 4,
        kv_heads: 2,
        context: 128,
    };
    pub const MEDIUM: Size = Size {
        layers: 4,
        embd: 256,
        ff: 512,
        heads: 4,
        kv_heads: 2,
        context: 256,
    };
}

/// GPT-2's printable stand-ins for the 256 byte values (byte-level BPE's base vocabulary).
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut by_byte: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    by_byte.sort();
    by_byte
        .into_iter()
        .map(|(_, c)| char::from_u32(c).expect("valid char").to_string())
        .collect()
}

/// Write a llama-architecture GGUF with random Q8_0 weights, a byte-level BPE vocabulary
/// (256 bytes plus `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and no merges.
pub fn write_llama_gguf(path: &Path, size: Size, seed: u64) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_tokens());
    let vocab = tokens.len();
    let types: Vec<gguf_file::Value> = (0..vocab)
        .map(|i| gguf_file::Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let u32v = |n: usize| gguf_file::Value::U32(n as u32);
    let mut md: HashMap<&str, gguf_file::Value> = HashMap::new();
    md.insert(
        "general.architecture",
        gguf_file::Value::String("llama".into()),
    );
    md.insert(
        "general.name",
        gguf_file::Value::String(format!("fixture-{seed}")),
    );
    md.insert("llama.block_count", u32v(size.layers));
    md.insert("llama.context_length", u32v(size.context));
    md.insert("llama.embedding_length", u32v(size.embd));
    md.insert("llama.feed_forward_length", u32v(size.ff));
    md.insert("llama.attention.head_count", u32v(size.heads));
    md.insert("llama.attention.head_count_kv", u32v(size.kv_heads));
    md.insert("llama.rope.dimension_count", u32v(size.embd / size.heads));
    md.insert(
        "llama.attention.layer_norm_rms_epsilon",
        gguf_file::Value::F32(1e-5),
    );
    md.insert("llama.rope.freq_base", gguf_file::Value::F32(10000.0));
    md.insert(
        "tokenizer.ggml.model",
        gguf_file::Value::String("gpt2".into()),
    );
    md.insert(
        "tokenizer.ggml.pre",
        gguf_file::Value::String("default".into()),
    );
    md.insert(
        "tokenizer.ggml.tokens",
        gguf_file::Value::Array(
            tokens
                .iter()
                .map(|t| gguf_file::Value::String(t.clone()))
                .collect(),
        ),
    );
    md.insert("tokenizer.ggml.token_type", gguf_file::Value::Array(types));
    md.insert("tokenizer.ggml.merges", gguf_file::Value::Array(Vec::new()));
    md.insert("tokenizer.ggml.eos_token_id", u32v(2));
    md.insert("tokenizer.ggml.bos_token_id", u32v(1));

    // A small deterministic generator: fixtures with the same seed are byte-identical.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut random = |rows: usize, cols: usize| -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &dev)
    };
    let q8 = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q8_0);
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev)?,
            GgmlDType::F32,
        )
    };
    let head_dim = size.embd / size.heads;
    let kv = size.kv_heads * head_dim;
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q8(random(vocab, size.embd)?)?),
        ("output_norm.weight".into(), ones(size.embd)?),
        ("output.weight".into(), q8(random(vocab, size.embd)?)?),
    ];
    for l in 0..size.layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.push((p("attn_norm"), ones(size.embd)?));
        tensors.push((p("ffn_norm"), ones(size.embd)?));
        tensors.push((p("attn_q"), q8(random(size.embd, size.embd)?)?));
        tensors.push((p("attn_k"), q8(random(kv, size.embd)?)?));
        tensors.push((p("attn_v"), q8(random(kv, size.embd)?)?));
        tensors.push((p("attn_output"), q8(random(size.embd, size.embd)?)?));
        tensors.push((p("ffn_gate"), q8(random(size.ff, size.embd)?)?));
        tensors.push((p("ffn_up"), q8(random(size.ff, size.embd)?)?));
        tensors.push((p("ffn_down"), q8(random(size.embd, size.ff)?)?));
    }
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut file, &md, &ts)?;
    use std::io::Write;
    file.flush()?;
    Ok(())
}
