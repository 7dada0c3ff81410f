//! The `Engine` trait: one loaded model, ready to generate or embed.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::{
    sampling::SamplingParams,
    template::{ToolCall, ToolOffer},
    Result, RuntimeError,
};

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

/// One message of a chat. The tool fields are optional on the wire (older payloads, which
/// lack them, still read) and are handed to the chat template as structured data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The functions offered to the model: carried by the chat's first message (OpenAI sends
    /// them beside the messages); the template renders them where the model expects them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolOffer>,
}

impl ChatMessage {
    /// A message of text only.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
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
    /// Choices to generate from the one prompt (1 to `MAX_CHOICES`): the prompt is prefilled
    /// once and its KV blocks shared; choice `i` samples with `seed + i` when a seed is given.
    #[serde(default = "one_choice")]
    pub n: usize,
    /// Report each sampled token's log-probability and this many most likely alternatives
    /// (0 to `MAX_TOP_LOGPROBS`); `None` computes none.
    #[serde(default)]
    pub logprobs: Option<usize>,
}

/// Most choices one request may ask for.
pub const MAX_CHOICES: usize = 16;
/// Most alternatives reported beside each sampled token.
pub const MAX_TOP_LOGPROBS: usize = 20;

fn one_choice() -> usize {
    1
}

impl GenerateRequest {
    /// One choice of `prompt`, no logprobs.
    pub fn new(
        prompt: Prompt,
        max_tokens: Option<usize>,
        sampling: SamplingParams,
        stop: Vec<String>,
    ) -> Self {
        GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
            n: 1,
            logprobs: None,
        }
    }
}

/// A token as text and as its exact bytes (a token may hold part of a UTF-8 character, which
/// `token` shows as U+FFFD).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenText {
    pub token: String,
    pub bytes: Vec<u8>,
    /// Natural log of the token's probability, from the log-softmax of the logits the sampler
    /// saw after penalties and masks, before temperature, top-k and top-p.
    pub logprob: f32,
}

/// One sampled token's log-probability and the most likely tokens at its step, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    #[serde(flatten)]
    pub chosen: TokenText,
    pub top: Vec<TokenText>,
}

/// New text of one choice, with the log-probabilities of the tokens it came from (when asked
/// for; a token whose text is held back, for a stop string or a split character, is reported
/// with the text that follows it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextDelta {
    #[serde(default)]
    pub choice: usize,
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
}

impl From<String> for TextDelta {
    fn from(text: String) -> Self {
        TextDelta {
            text,
            ..Default::default()
        }
    }
}

/// What `generate` reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// The prompt was accepted and prefilled; the first token follows.
    Started { prompt_tokens: usize },
    /// New text of one choice (never splits a UTF-8 character, never contains a stop string).
    Text(TextDelta),
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
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    #[serde(default)]
    pub cached_tokens: usize,
    /// The log-probabilities of choice 0's tokens, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Choices 1 to n-1 (the fields above are choice 0, except `completion_tokens`, which
    /// counts the tokens of every choice).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<Choice>,
}

impl Generation {
    /// A generation of one choice, no logprobs, nothing from the prefix cache.
    pub fn new(
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: FinishReason,
    ) -> Self {
        Generation {
            text,
            prompt_tokens,
            completion_tokens,
            finish_reason,
            cached_tokens: 0,
            logprobs: None,
            others: Vec::new(),
        }
    }
}

/// One more choice of a generation with `n > 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub text: String,
    pub finish_reason: FinishReason,
    /// This choice's own tokens (also counted in the generation's `completion_tokens`).
    pub completion_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
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
