//! Request and response bodies of the OpenAI-compatible API, and their validation.

use flatmesh_runtime::{ChatMessage, SamplingParams, MAX_CHOICES, MAX_TOP_LOGPROBS};
use serde::{Deserialize, Serialize};

use crate::{api::error::ApiError, serve::check, units::KeepAlive};

/// A string or a list of strings (`stop`, `prompt`, embeddings `input`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which only text is supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and text completions (parsed from the same body as either).
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; common in compatible servers.
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Not in OpenAI's API; as vLLM: generate to `max_tokens` (or a stop string), never
    /// ending at an end-of-generation token.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// How long the model stays loaded after this request (Ollama's field): `5m`, `0`, `-1`.
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Report the log-probability of each token of the answer.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// And this many most likely alternatives at each (0 to 20; needs `logprobs: true`).
    #[serde(default)]
    pub top_logprobs: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    /// Report each token's log-probability and this many alternatives (0 to 5).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Refused when true: the prompt's own logprobs are not computed.
    #[serde(default)]
    pub echo: bool,
    /// Refused unless it equals `n`: every choice generated is returned.
    #[serde(default)]
    pub best_of: Option<u32>,
}

/// Most alternatives `/v1/completions` reports beside each token (as OpenAI allows).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: serde_json::Value,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

impl ChatRequest {
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(
                "messages",
                "must contain at least one message",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ApiError::bad_request(
                        format!("messages[{i}].role"),
                        format!("{:?} is not one of {}", m.role, ROLES.join(", ")),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::bad_request(
                                        format!("messages[{i}].content[{j}]"),
                                        format!(
                                            "content parts of type {:?} are not supported",
                                            p.kind
                                        ),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage::new(m.role.clone(), content))
            })
            .collect()
    }
}

impl ChatRequest {
    /// Alternatives to report beside each token; `None` when no logprobs are asked for.
    pub fn top_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if top as usize > MAX_TOP_LOGPROBS {
            let m = format!("{top} is more than {MAX_TOP_LOGPROBS}");
            return Err(ApiError::bad_request("top_logprobs", m));
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as usize)),
            _ if self.top_logprobs.is_some() => Err(ApiError::bad_request(
                "top_logprobs",
                "needs logprobs: true",
            )),
            _ => Ok(None),
        }
    }
}

impl CompletionRequest {
    /// Alternatives to report beside each token; `None` when no logprobs are asked for.
    /// `echo` and a `best_of` other than `n` (which would change the answer) are refused.
    pub fn logprobs(&self, n: usize) -> Result<Option<usize>, ApiError> {
        if self.echo {
            return Err(ApiError::bad_request("echo", "is not supported"));
        }
        if let Some(b) = self.best_of.filter(|&b| b as usize != n) {
            let m = format!("{b} is not supported: every choice is returned (best_of = n)");
            return Err(ApiError::bad_request("best_of", m));
        }
        match self.logprobs {
            Some(k) if k > MAX_COMPLETION_LOGPROBS => Err(ApiError::bad_request(
                "logprobs",
                format!("{k} is more than {MAX_COMPLETION_LOGPROBS}"),
            )),
            k => Ok(k.map(|k| k as usize)),
        }
    }

    pub fn prompt(&self) -> Result<String, ApiError> {
        match self.prompt.clone().into_vec().as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(ApiError::bad_request(
                "prompt",
                "exactly one prompt string is supported",
            )),
        }
    }
}

impl Common {
    /// The request's sampling settings; their ranges are checked with the rest of the
    /// generation (`serve::check::generate`).
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        if self.model.is_empty() {
            return Err(ApiError::bad_request("model", "must not be empty"));
        }

        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            seed: self.seed,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            ignore_eos: self.ignore_eos,
            // `response_format`, parsed from the body by `format`.
            grammar: None,
        })
    }

    /// Choices to generate (1 to 16).
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) as usize {
            n @ 1..=MAX_CHOICES => Ok(n),
            n => Err(ApiError::bad_request(
                "n",
                format!("{n} is not between 1 and {MAX_CHOICES}"),
            )),
        }
    }

    pub fn stop(&self) -> Vec<String> {
        self.stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl EmbeddingRequest {
    pub fn inputs(&self) -> Result<Vec<String>, ApiError> {
        let bad = |m: &str| ApiError::bad_request("input", m);
        let inputs = match &self.input {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    serde_json::Value::String(s) => Ok(s.clone()),
                    serde_json::Value::Number(_) | serde_json::Value::Array(_) => {
                        Err(bad("token id arrays are not supported; send strings"))
                    }
                    _ => Err(ApiError::bad_request(
                        format!("input[{i}]"),
                        "must be a string",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad("must be a string or an array of strings")),
        };
        if inputs.is_empty() {
            return Err(bad("must not be empty"));
        }
        check::inputs(inputs.len(), "input")?;
        if let Some(i) = inputs.iter().position(String::is_empty) {
            return Err(ApiError::bad_request(
                format!("input[{i}]"),
                "must not be empty",
            ));
        }
        Ok(inputs)
    }
}

/// Tokens of a generation: the prompt once, the completions of every choice.
#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Debug, Serialize)]
pub struct PromptDetails {
    /// Prompt tokens read from the copy's prefix cache instead of computed.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(g: &flatmesh_runtime::Generation) -> Self {
        Usage {
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.completion_tokens,
            total_tokens: g.prompt_tokens + g.completion_tokens,
            prompt_tokens_details: PromptDetails {
                cached_tokens: g.cached_tokens,
            },
        }
    }
}
