//! The `Engine` trait: one loaded model, ready to generate or embed.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::{sampling::SamplingParams, Result, RuntimeError};

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Llm,
    Embedding,
}

/// Facts about a loaded model that the layers above need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub kind: ModelKind,
    pub architecture: String,
    /// Tokens the model can attend to (prompt plus completion, or one embedding input).
    pub context_length: usize,
    /// Width of an embedding vector (embedding models only).
    pub embedding_dims: Option<usize>,
}

/// One message of a chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw text, tokenized as it is.
    Text(String),
    /// A chat, rendered through the model's chat template first.
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// At most this many new tokens; `None` means up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
}

/// What `generate` reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// The prompt was accepted and prefilled; the first token follows.
    Started { prompt_tokens: usize },
    /// New text (never splits a UTF-8 character, never contains a stop string).
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
    /// The caller stopped listening.
    Cancelled,
}

/// The outcome of one generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Embeddings {
    /// One L2-normalised vector per input.
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
}

/// A loaded model. Unloading is dropping it.
///
/// Calls block the calling thread while they compute: run them on a blocking pool.
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// Bytes of memory the loaded model holds, measured from its tensors.
    fn size_bytes(&self) -> u64;

    /// Generate text. `on_event` sees each event; returning `Break` cancels the generation
    /// (the client went away), which then ends with `FinishReason::Cancelled`.
    fn generate(
        &self,
        _req: &GenerateRequest,
        _on_event: &mut dyn FnMut(GenerateEvent) -> ControlFlow<()>,
    ) -> Result<Generation> {
        Err(RuntimeError::Unsupported("text generation"))
    }

    /// Embed each input into one vector.
    fn embed(&self, _inputs: &[String]) -> Result<Embeddings> {
        Err(RuntimeError::Unsupported("embeddings"))
    }

    /// Count the tokens of a text, as the model sees it.
    fn count_tokens(&self, text: &str) -> Result<usize>;
}
