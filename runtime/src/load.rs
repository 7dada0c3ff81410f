//! Loading a model from its files into an engine.

use std::{path::Path, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{device::Device, BatchConfig, BertEngine, Engine, LlmEngine, Result};

/// How a model is stored, which also picks the engine that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A llama-family LLM in one GGUF file.
    Gguf,
    /// A BERT-style embedding model: a directory with safetensors, config and tokenizer.
    BertSafetensors,
}

impl Format {
    /// What a model of this format does.
    pub fn kind(self) -> crate::ModelKind {
        match self {
            Format::Gguf => crate::ModelKind::Llm,
            Format::BertSafetensors => crate::ModelKind::Embedding,
        }
    }

    /// Guess the format from the path: a `.gguf` file, or a directory with safetensors.
    pub fn detect(path: &Path) -> Option<Format> {
        if path.extension().is_some_and(|e| e == "gguf") {
            Some(Format::Gguf)
        } else if path.join("model.safetensors").exists() {
            Some(Format::BertSafetensors)
        } else {
            None
        }
    }
}

/// What a model will need in memory, predicted from its files' headers before loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The weights as the engine will hold them.
    pub weights: u64,
    /// KV cache per token of one sequence (0 for models without one).
    pub kv_bytes_per_token: u64,
    /// Tokens one sequence can hold.
    pub context: usize,
}

impl Footprint {
    /// Weights plus a KV pool of `kv_tokens` positions (saturating: a size too large to
    /// count is `u64::MAX`, which fits no device, never a small wrapped number).
    pub fn with_kv_tokens(&self, kv_tokens: usize) -> u64 {
        self.kv_bytes_per_token
            .saturating_mul(kv_tokens as u64)
            .saturating_add(self.weights)
    }
}

/// Predict a model's footprint without loading it (reads headers only).
pub fn footprint(path: &Path, format: Format) -> Result<Footprint> {
    match format {
        Format::Gguf => crate::llm::footprint(path),
        Format::BertSafetensors => {
            let weights = path.join("model.safetensors");
            let meta =
                std::fs::metadata(&weights).map_err(|_| crate::RuntimeError::NotFound(weights))?;
            Ok(Footprint {
                weights: meta.len(),
                kv_bytes_per_token: 0,
                context: 512,
            })
        }
    }
}

/// A model file's bytes in host memory: a page-in from it skips the disk, and the copy uses
/// the weights where they are (the warm tier keeps these). Only GGUF models have one.
#[derive(Clone)]
pub struct Image {
    bytes: Arc<Vec<u8>>,
    text: Option<crate::llm::TextParts>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({} bytes)", self.bytes.len())
    }
}

impl Image {
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Load a model onto `device` and, for GGUF, its image as well.
pub fn load_keeping_image(
    path: &Path,
    format: Format,
    device: &Device,
    batch: BatchConfig,
) -> Result<(Arc<dyn Engine>, Option<Image>)> {
    Ok(match format {
        Format::Gguf => {
            let (engine, bytes) = LlmEngine::load_keeping_image(path, device, batch)?;
            let image = Image {
                bytes,
                text: Some(engine.text_parts()),
            };
            (Arc::new(engine), Some(image))
        }
        Format::BertSafetensors => {
            device.host_lane()?;
            (Arc::new(BertEngine::load(path)?), None)
        }
    })
}

/// Load a model onto `device` from its image (a parse, no disk, no copy of the weights).
pub fn load_image(image: &Image, device: &Device, batch: BatchConfig) -> Result<Arc<dyn Engine>> {
    Ok(Arc::new(LlmEngine::load_image(
        image.bytes.clone(),
        image.text.clone(),
        device,
        batch,
    )?))
}

/// Load a model onto `device`. Blocks while it reads the weights.
pub fn load(
    path: &Path,
    format: Format,
    device: &Device,
    batch: BatchConfig,
) -> Result<Arc<dyn Engine>> {
    Ok(match format {
        Format::Gguf => Arc::new(LlmEngine::load(path, device, batch)?),
        Format::BertSafetensors => {
            device.host_lane()?;
            Arc::new(BertEngine::load(path)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprints_saturate_instead_of_wrapping() {
        let f = Footprint {
            weights: 1 << 30,
            kv_bytes_per_token: 1 << 20,
            context: 1 << 13,
        };
        assert_eq!(f.with_kv_tokens(usize::MAX), u64::MAX);
        assert_eq!(f.with_kv_tokens(1 << 13), (1 << 30) + (1 << 33));
    }
}
