//! Embedding engine for BERT-style safetensors models (sentence-transformers layout).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::{
    engine::{Embeddings, Engine, ModelInfo, ModelKind},
    error::{first_line, message},
    Result, RuntimeError,
};

/// An input longer than this many bytes per token of the context is refused before it is
/// tokenized: text runs ~4 bytes per token, and tokenizing megabytes only to refuse them
/// would let any caller burn the node's CPU.
pub const MAX_BYTES_PER_TOKEN: usize = 32;

/// Inputs are run through the model in batches of at most this many.
const BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

/// A loaded BERT-style encoder with its tokenizer and pooling.
pub struct BertEngine {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    info: ModelInfo,
    size_bytes: u64,
    device: Device,
}

/// sentence-transformers' `1_Pooling/config.json`.
#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
}

impl BertEngine {
    /// Load from a directory holding `config.json`, `model.safetensors`, `tokenizer.json`
    /// and optionally `pooling.json` (mean pooling when absent).
    pub fn load(dir: &Path) -> Result<Self> {
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.exists() {
                Ok(p)
            } else {
                Err(RuntimeError::NotFound(p))
            }
        };
        let bad = |path: &Path, reason: String| RuntimeError::BadFormat {
            path: path.to_path_buf(),
            format: "BERT safetensors",
            reason,
        };
        let config_path = file("config.json")?;
        let config: Config = read_json(&config_path).map_err(|e| bad(&config_path, e))?;
        let pooling = match dir.join("pooling.json") {
            p if p.exists() => {
                let pc: PoolingConfig = read_json(&p).map_err(|e| bad(&p, e))?;
                match (pc.pooling_mode_mean_tokens, pc.pooling_mode_cls_token) {
                    (true, _) => Pooling::Mean,
                    (false, true) => Pooling::Cls,
                    _ => return Err(bad(&p, "only mean or CLS pooling is supported".into())),
                }
            }
            _ => Pooling::Mean,
        };
        let tok_path = file("tokenizer.json")?;
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| bad(&tok_path, first_line(&e.to_string())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| bad(&tok_path, first_line(&e.to_string())))?;

        let weights = file("model.safetensors")?;
        let device = Device::Cpu;
        let tensors = candle_core::safetensors::load(&weights, &device)
            .map_err(|e| bad(&weights, message(e)))?;
        let size_bytes = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = BertModel::load(vb, &config).map_err(|e| bad(&weights, message(e)))?;
        Ok(BertEngine {
            model,
            tokenizer,
            pooling,
            info: ModelInfo {
                kind: ModelKind::Embedding,
                architecture: "bert".into(),
                context_length: config.max_position_embeddings,
                embedding_dims: Some(config.hidden_size),
            },
            size_bytes,
            device,
        })
    }

    fn embed_batch(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut input = Vec::with_capacity(ids.len() * len);
        let mut mask = Vec::with_capacity(ids.len() * len);
        for seq in ids {
            input.extend(seq.iter().copied().chain(std::iter::repeat(0)).take(len));
            mask.extend((0..len).map(|i| u32::from(i < seq.len())));
        }
        let shape = (ids.len(), len);
        let input = Tensor::from_vec(input, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &types, Some(&mask))?; // [n, len, dims]
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [n, len, 1]
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                sum.broadcast_div(&m.sum(1)?)?
            }
        };
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        Ok(pooled.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

impl Engine for BertEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(std::slice::from_ref(&text.to_string()))?[0].len())
    }

    fn embed(&self, inputs: &[String]) -> Result<Embeddings> {
        if inputs.is_empty() {
            return Err(RuntimeError::InvalidRequest(
                "input: must not be empty".into(),
            ));
        }
        let max = self.info.context_length;
        let max_bytes = max.saturating_mul(MAX_BYTES_PER_TOKEN);
        if let Some((i, text)) = inputs.iter().enumerate().find(|(_, t)| t.len() > max_bytes) {
            return Err(RuntimeError::InvalidRequest(format!(
                "input[{i}]: {} bytes is longer than this model's context of {max} tokens \
                 can hold (at most {max_bytes} bytes)",
                text.len()
            )));
        }
        // A batch at a time, so the first batch with an input over the context ends the work.
        let mut ids = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(BATCH) {
            let start = ids.len();
            ids.extend(self.encode(chunk)?);
            if let Some((i, seq)) = ids
                .iter()
                .enumerate()
                .skip(start)
                .find(|(_, s)| s.len() > max)
            {
                return Err(RuntimeError::InvalidRequest(format!(
                    "input[{i}]: {} tokens, but this model accepts at most {max}",
                    seq.len()
                )));
            }
        }
        // Batch inputs of similar length together so padding stays small.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut vectors = vec![Vec::new(); ids.len()];
        for group in order.chunks(BATCH) {
            let batch: Vec<Vec<u32>> = group.iter().map(|&i| ids[i].clone()).collect();
            for (&i, v) in group.iter().zip(self.embed_batch(&batch)?) {
                vectors[i] = v;
            }
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: ids.iter().map(Vec::len).sum(),
        })
    }
}

impl BertEngine {
    fn encode(&self, inputs: &[String]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| RuntimeError::Inference(format!("tokenize: {e}")))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::result::Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> BertEngine {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
        assert!(
            dir.exists(),
            "{} is missing: run deploy/fetch-models",
            dir.display()
        );
        BertEngine::load(&dir).unwrap()
    }

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn embeds_normalised_384_dim_vectors_that_capture_meaning() {
        let e = demo();
        let inputs: Vec<String> = [
            "A man is playing a guitar.",
            "Someone plays an instrument.",
            "The stock market fell sharply today.",
        ]
        .map(String::from)
        .to_vec();
        let out = e.embed(&inputs).unwrap();
        assert_eq!(out.vectors.len(), 3);
        for v in &out.vectors {
            assert_eq!(v.len(), 384);
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        let related = cos(&out.vectors[0], &out.vectors[1]);
        let unrelated = cos(&out.vectors[0], &out.vectors[2]);
        assert!(related > unrelated + 0.2, "{related} vs {unrelated}");
    }

    #[test]
    fn batching_does_not_change_a_vector() {
        let e = demo();
        let one = e.embed(&["short".to_string()]).unwrap().vectors[0].clone();
        let many: Vec<String> = vec!["short".into(), "a much longer sentence with padding".into()];
        let batched = e.embed(&many).unwrap().vectors[0].clone();
        assert!(cos(&one, &batched) > 0.9999);
    }

    #[test]
    fn too_long_input_names_its_index() {
        let e = demo();
        let err = e.embed(&["ok".into(), "word ".repeat(600)]).unwrap_err();
        assert!(err.to_string().starts_with("input[1]:"), "{err}");
    }
}
