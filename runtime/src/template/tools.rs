//! Tools in chat templates: which tool format a template speaks, the structured data it is
//! handed (the offer, earlier calls, tool results), and the generic format for templates
//! without tool support.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ChatMessage;

/// A call an assistant made, in the shape chat templates expect (OpenAI's, with the
/// arguments as a JSON object rather than a string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function() -> String {
    "function".into()
}

/// The function and arguments of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object.
    pub arguments: Value,
}

/// The functions a chat offers and how the model may use them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOffer {
    /// OpenAI's `tools`: `{"type": "function", "function": {"name", "description",
    /// "parameters"}}` each.
    pub functions: Vec<Value>,
    /// Whether the model must call a function.
    #[serde(default)]
    pub choice: CallChoice,
    /// More than one call in an answer.
    #[serde(default = "yes")]
    pub parallel: bool,
}

fn yes() -> bool {
    true
}

/// `tool_choice`, less `none` (then no tools are offered).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallChoice {
    /// Text or calls, as the model decides.
    #[default]
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// The tool format of a chat template, from its source: whether it renders `tools` at all
/// and, if so, which call syntax its markers show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// The template does not use `tools`: the generic format (a system prompt section asking
    /// for `{"tool_calls": [{"name", "arguments"}]}`, earlier calls written as that JSON).
    Generic,
    /// Hermes and Qwen 2.5: `<tool_call>{"name", "arguments"}</tool_call>`.
    Hermes,
    /// Llama 3.x: a JSON object `{"name", "parameters"}`, perhaps after `<|python_tag|>`.
    Llama3,
    /// Mistral: `[TOOL_CALLS]` and a JSON array of `{"name", "arguments"}`.
    Mistral,
    /// A template that renders `tools` with markers of none of the above.
    Other,
}

impl ToolFormat {
    pub fn detect(source: &str) -> ToolFormat {
        if !uses_name(source, "tools") {
            ToolFormat::Generic
        } else if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("[TOOL_CALLS]") || source.contains("[AVAILABLE_TOOLS]") {
            ToolFormat::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Other
        }
    }

    /// Whether the template itself renders tools, calls and results.
    pub fn native(self) -> bool {
        self != ToolFormat::Generic
    }
}

/// Whether `name` occurs in `source` as a name of its own (not inside `tool_calls` or
/// `my_tools`).
fn uses_name(source: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    source.match_indices(name).any(|(i, _)| {
        let before = source[..i].chars().next_back().is_none_or(|c| !word(c));
        let after = source[i + name.len()..]
            .chars()
            .next()
            .is_none_or(|c| !word(c));
        before && after
    })
}

/// The offer of a chat: the first message's.
pub fn offer(messages: &[ChatMessage]) -> Option<&ToolOffer> {
    messages.first().and_then(|m| m.tools.as_ref())
}

/// The messages as a template without tool support sees them: the offer as a system prompt
/// section (in the first system message, or a new one), each earlier call as the JSON
/// answer the model gave, tool results as the `tool` messages' content.
pub fn generic(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| {
            let mut content = m.content.clone();
            if !m.tool_calls.is_empty() {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| json!({"name": c.function.name, "arguments": c.function.arguments}))
                    .collect();
                let answer = json!({"tool_calls": calls}).to_string();
                content = match content.is_empty() {
                    true => answer,
                    false => format!("{content}\n{answer}"),
                };
            }
            ChatMessage::new(m.role.clone(), content)
        })
        .collect();
    if let Some(offer) = offer(messages) {
        let section = section(offer);
        match out.first_mut() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                m.content = format!("{}\n\n{section}", m.content);
            }
            _ => out.insert(0, ChatMessage::new("system", section)),
        }
    }
    out
}

/// The generic format's system prompt section.
pub fn section(offer: &ToolOffer) -> String {
    let mut s = String::from(
        "# Tools\n\nYou can call these functions. Each is a JSON object with its name, \
         description and the JSON schema of its arguments:\n",
    );
    for t in &offer.functions {
        let f = t.get("function").unwrap_or(t);
        let mut d =
            json!({"name": f["name"], "parameters": f.get("parameters").unwrap_or(&json!({}))});
        if let Some(desc) = f.get("description").filter(|d| !d.is_null()) {
            d["description"] = desc.clone();
        }
        s.push('\n');
        s.push_str(&d.to_string());
    }
    s.push_str(
        "\n\nTo call functions, answer with only a JSON object of this form:\n\
         {\"tool_calls\": [{\"name\": \"<function name>\", \"arguments\": {<the arguments>}}]}\n",
    );
    s.push_str(match &offer.choice {
        CallChoice::Auto => "If no function is needed, answer in plain text.",
        CallChoice::Required | CallChoice::Function(_) => "You must call a function now.",
    });
    if let CallChoice::Function(n) = &offer.choice {
        s.push_str(&format!(" Call {n}."));
    }
    if !offer.parallel {
        s.push_str(" Make at most one call.");
    }
    s
}

/// The messages as a template with tool support sees them (the offer goes in `tools`).
pub fn native(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage {
            tools: None,
            ..m.clone()
        })
        .collect()
}
