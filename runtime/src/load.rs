//! Loading a model from its files into an engine.

use std::{path::Path, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{BertEngine, Engine, LlamaEngine, Result};

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

/// Load a model. Blocks while it reads the weights.
pub fn load(path: &Path, format: Format) -> Result<Arc<dyn Engine>> {
    Ok(match format {
        Format::Gguf => Arc::new(LlamaEngine::load(path)?),
        Format::BertSafetensors => Arc::new(BertEngine::load(path)?),
    })
}
