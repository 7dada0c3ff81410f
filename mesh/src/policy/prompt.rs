//! What policies learn of a prompt before any model has seen it.

use flatmesh_runtime::{constrain::Grammar, GenerateRequest, Prompt};

use super::host::types::{AnswerShape, PromptFeatures, ResponseFormat};

/// Cheap facts about a prompt for policies.
pub fn features(prompt: &Prompt) -> PromptFeatures {
    let (texts, last_user): (Vec<&str>, &str) = match prompt {
        Prompt::Text(t) => (vec![t.as_str()], t.as_str()),
        Prompt::Chat(messages) => (
            messages.iter().map(|m| m.content.as_str()).collect(),
            messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map_or("", |m| m.content.as_str()),
        ),
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    PromptFeatures {
        chars: count(texts.iter().map(|t| t.chars().count()).sum()),
        messages: count(texts.len()),
        code_blocks: count(
            texts
                .iter()
                .map(|t| t.matches("```").count())
                .sum::<usize>()
                / 2,
        ),
        questions: count(last_user.matches('?').count()),
    }
}

/// The prompt as one text: chat messages as `role: content` lines, each followed by the
/// tools it offers, the calls it made or the call it answers, as JSON.
pub fn prompt_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| {
                let mut line = format!("{}: {}", m.role, m.content);
                let tools = m.tools.as_ref().and_then(|t| serde_json::to_string(t).ok());
                let calls = (!m.tool_calls.is_empty())
                    .then(|| serde_json::to_string(&m.tool_calls).ok())
                    .flatten();
                let answers = m.tool_call_id.clone();
                for (key, v) in [
                    ("tools", tools),
                    ("tool_calls", calls),
                    ("tool_call_id", answers),
                ] {
                    if let Some(v) = v {
                        line.push_str(&format!("\n{key}: {v}"));
                    }
                }
                line
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// The prompt as the response cache sees it: its text, then what else changes the answer
/// (`response_format: <grammar as JSON>` on a line of its own when the output is constrained;
/// tools and calls are part of the prompt text), so that an answer to one schema or one set of
/// tools is never served for another.
pub fn cache_text(gen: &GenerateRequest) -> String {
    let mut text = prompt_text(&gen.prompt);
    if let Some(g) = &gen.sampling.grammar {
        let g = serde_json::to_string(g).unwrap_or_default();
        text.push_str("\nresponse_format: ");
        text.push_str(&g);
    }
    text
}

/// What a request asks of its answer beyond the prompt; `None` (embeddings, v2 tensors)
/// asks for no choices.
pub fn answer_shape(generate: Option<&GenerateRequest>) -> AnswerShape {
    let Some(g) = generate else {
        return AnswerShape {
            choices: 0,
            logprobs: None,
            format: ResponseFormat::Text,
            tools: Vec::new(),
        };
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    AnswerShape {
        choices: count(g.n),
        logprobs: g.logprobs.map(count),
        format: match &g.sampling.grammar {
            None => ResponseFormat::Text,
            Some(Grammar::JsonObject) => ResponseFormat::JsonObject,
            Some(Grammar::JsonSchema(s)) => ResponseFormat::JsonSchema(s.to_string()),
        },
        tools: offered_tools(&g.prompt),
    }
}

/// The names of the functions a chat offers (on its first message); none for text.
fn offered_tools(prompt: &Prompt) -> Vec<String> {
    let Prompt::Chat(messages) = prompt else {
        return Vec::new();
    };
    let offer = messages.first().and_then(|m| m.tools.as_ref());
    offer
        .map(|o| o.functions.iter())
        .into_iter()
        .flatten()
        .filter_map(|f| f["function"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Prompt tokens before the model's tokenizer is at hand: about four characters a token.
pub fn estimate_tokens(features: &PromptFeatures) -> u32 {
    features.chars.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_sees_the_response_format() {
        let text = Prompt::Text("A person:".into());
        let mut gen = GenerateRequest::new(text, Some(8), Default::default(), vec![]);
        assert_eq!(cache_text(&gen), "A person:");
        gen.sampling.grammar = Some(flatmesh_runtime::constrain::Grammar::JsonObject);
        let json_mode = cache_text(&gen);
        let schema = serde_json::json!({"type": "object", "required": ["a"]});
        gen.sampling.grammar = Some(flatmesh_runtime::constrain::Grammar::JsonSchema(schema));
        let with_schema = cache_text(&gen);
        assert!(
            json_mode.starts_with("A person:\nresponse_format: "),
            "{json_mode}"
        );
        assert_ne!(json_mode, with_schema);
        assert!(
            with_schema.contains("\"required\":[\"a\"]"),
            "{with_schema}"
        );
    }

    #[test]
    fn prompt_features_count_what_routers_use() {
        let chat = Prompt::Chat(vec![
            flatmesh_runtime::ChatMessage::new("system", "Be brief."),
            flatmesh_runtime::ChatMessage::new("user", "Why? And how?\n```rust\nfn main() {}\n```"),
        ]);
        let f = features(&chat);
        assert_eq!((f.messages, f.code_blocks, f.questions), (2, 1, 2));
        assert_eq!(f.chars, 9 + 38);
        assert_eq!(estimate_tokens(&f), 12);
        assert_eq!(
            prompt_text(&chat),
            "system: Be brief.\nuser: Why? And how?\n```rust\nfn main() {}\n```"
        );
    }
}
