//! Tools (function calling): the request's `tools` and `tool_choice` checked and handed to
//! the chat template with the history's calls and results as structured data (the template
//! renders them in the model's own format where it supports tools, in the generic format
//! otherwise: see `flatmesh_runtime::template`); with `required` or a named function the
//! answer is constrained to a call of the functions' schemas; the answer's calls parsed in
//! any of the formats (`parse`). Text that is not a valid
//! call stays content.

mod parse;

use flatmesh_runtime::{
    constrain::{self, Grammar},
    template::{CallChoice, FunctionCall, ToolCall, ToolOffer},
    ChatMessage,
};
use serde_json::{json, Value};

pub use self::parse::{parse_calls, Call};

use crate::api::error::ApiError;

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// What `tool_choice` allows.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The tools are not offered; the answer is text.
    None,
    /// The model answers with text or calls.
    Auto,
    /// The model must call at least one function.
    Required,
    /// The model must call this function.
    Named(String),
}

/// The tools of a chat request.
#[derive(Debug, Clone)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// More than one call in an answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

fn bad(param: impl Into<String>, m: impl Into<String>) -> ApiError {
    ApiError::bad_request(param, m)
}

impl Tools {
    /// The tools of a request body; `None` when it offers none.
    pub fn parse(body: &Value) -> Result<Option<Tools>, ApiError> {
        for legacy in ["functions", "function_call"] {
            if body.get(legacy).is_some_and(|v| !v.is_null()) {
                return Err(bad(legacy, "is not supported; use tools and tool_choice"));
            }
        }
        let functions = match body.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tools)) => tools
                .iter()
                .enumerate()
                .map(|(i, t)| function(i, t))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("tools", "must be an array of tools")),
        };
        let parallel = match body.get("parallel_tool_calls") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(bad(
                    "parallel_tool_calls",
                    format!("must be true or false, got {v}"),
                ))
            }
        };
        let choice = match body.get("tool_choice") {
            None | Some(Value::Null) if functions.is_empty() => return Ok(None),
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(_) if functions.is_empty() => {
                return Err(bad("tool_choice", "is only allowed when tools are given"))
            }
            Some(c) => tool_choice(c, &functions)?,
        };
        if let Some(i) = (1..functions.len())
            .find(|&i| functions[..i].iter().any(|f| f.name == functions[i].name))
        {
            return Err(bad(
                format!("tools[{i}].function.name"),
                format!("{:?} is given twice", functions[i].name),
            ));
        }
        Ok(Some(Tools {
            functions,
            choice,
            parallel,
        }))
    }

    /// Whether the answer may hold calls (to be parsed out of it).
    pub fn offered(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar the answer must follow: `required` and named calls only. The calls may
    /// take any JSON shape the formats share, so that each model can write its own: the
    /// generic `{"tool_calls": [call, …]}`, a bare call (Hermes' tag body, Llama 3's JSON,
    /// which names the arguments `parameters`) or an array of calls (Mistral's body). The
    /// tags and control tokens around them are not forced.
    pub fn grammar(&self) -> Option<Grammar> {
        let items: Vec<Value> = self
            .functions
            .iter()
            .filter(|f| match &self.choice {
                ToolChoice::Required => true,
                ToolChoice::Named(n) => &f.name == n,
                ToolChoice::None | ToolChoice::Auto => false,
            })
            .flat_map(|f| {
                ["arguments", "parameters"].map(|key| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"const": f.name}, key: f.parameters},
                        "required": ["name", key],
                        "additionalProperties": false,
                    })
                })
            })
            .collect();
        if items.is_empty() {
            return None;
        }
        let call = json!({"anyOf": items});
        let mut list = json!({"type": "array", "items": call, "minItems": 1});
        if !self.parallel {
            list["maxItems"] = json!(1);
        }
        let generic = json!({
            "type": "object",
            "properties": {"tool_calls": list},
            "required": ["tool_calls"],
            "additionalProperties": false,
        });
        Some(Grammar::JsonSchema(json!({"anyOf": [generic, call, list]})))
    }

    /// What the chat template is handed: the functions in OpenAI's shape, the choice;
    /// `None` when they are not offered.
    pub fn offer(&self) -> Option<ToolOffer> {
        let choice = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto => CallChoice::Auto,
            ToolChoice::Required => CallChoice::Required,
            ToolChoice::Named(n) => CallChoice::Function(n.clone()),
        };
        let functions = self
            .functions
            .iter()
            .map(|f| {
                let mut d = json!({"name": f.name, "parameters": f.parameters});
                if let Some(desc) = &f.description {
                    d["description"] = json!(desc);
                }
                json!({"type": "function", "function": d})
            })
            .collect();
        Some(ToolOffer {
            functions,
            choice,
            parallel: self.parallel,
        })
    }

    /// Offer the tools with the chat (on its first message).
    pub fn prompt(&self, messages: &mut [ChatMessage]) {
        if let Some(first) = messages.first_mut() {
            first.tools = self.offer();
        }
    }

    /// Whether `name` may be called.
    pub fn allows(&self, name: &str) -> bool {
        match &self.choice {
            ToolChoice::None => false,
            ToolChoice::Named(n) => n == name,
            _ => self.functions.iter().any(|f| f.name == name),
        }
    }

    /// The calls an answer holds, if it is a valid call of offered functions; else `None`
    /// (the text stays content).
    pub fn calls(&self, text: &str) -> Option<Vec<Call>> {
        if !self.offered() {
            return None;
        }
        let calls = parse_calls(text)?;
        let fits = !calls.is_empty()
            && calls.iter().all(|c| self.allows(&c.name))
            && (self.parallel || calls.len() == 1);
        fits.then_some(calls)
    }
}

fn function(i: usize, t: &Value) -> Result<Function, ApiError> {
    let at = |k: &str| format!("tools[{i}].{k}");
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(bad(
                at("type"),
                format!("{other:?} is not supported; only \"function\""),
            ))
        }
        None => return Err(bad(at("type"), "is required (\"function\")")),
    }
    let f = t
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(at("function"), "must be an object with a name"))?;
    if let Some(k) = f
        .keys()
        .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
    {
        return Err(bad(
            at(&format!("function.{k}")),
            "is not a field of a function",
        ));
    }
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name_ok {
        return Err(bad(
            at("function.name"),
            "must be 1 to 64 letters, digits, '_' or '-'",
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                at("function.parameters"),
                "must be a JSON schema object",
            ))
        }
    };
    constrain::check(&Grammar::JsonSchema(parameters.clone()))
        .map_err(|e| bad(at("function.parameters"), e))?;
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => return Err(bad(at("function.description"), "must be a string")),
    };
    Ok(Function {
        name: name.to_string(),
        description,
        parameters,
    })
}

fn tool_choice(c: &Value, functions: &[Function]) -> Result<ToolChoice, ApiError> {
    match c {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(bad(
                "tool_choice",
                format!("{other:?} is not none, auto, required or a function"),
            )),
        },
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(bad(
                    "tool_choice.function.name",
                    format!("{name:?} is not one of the tools"),
                ));
            }
            Ok(ToolChoice::Named(name.to_string()))
        }
        other => Err(bad(
            "tool_choice",
            format!("must be a string or an object, got {other}"),
        )),
    }
}

/// Tool calls and results earlier in the chat, as structured data for the template: an
/// assistant's `tool_calls` (arguments as objects), a `tool` message's `tool_call_id`.
pub fn history(body: &Value, messages: &mut [ChatMessage]) -> Result<(), ApiError> {
    let Some(raw) = body.get("messages").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, (m, raw)) in messages.iter_mut().zip(raw).enumerate() {
        match raw.get("tool_call_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(id)) if m.role == "tool" => m.tool_call_id = Some(id.clone()),
            Some(_) => {
                return Err(bad(
                    format!("messages[{i}].tool_call_id"),
                    "must be a string, on a tool message",
                ))
            }
        }
        match raw.get("tool_calls") {
            None | Some(Value::Null) => {}
            Some(Value::Array(calls)) if m.role == "assistant" => {
                let at = format!("messages[{i}].tool_calls");
                m.tool_calls = calls
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        let call = parse::call(c).ok_or_else(|| {
                            bad(&at, "each call needs a function with a name and arguments")
                        })?;
                        let id = c.get("id").and_then(Value::as_str);
                        Ok(ToolCall {
                            id: id.map_or_else(|| format!("call_{i}_{k}"), str::to_string),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: call.name,
                                arguments: call.arguments,
                            },
                        })
                    })
                    .collect::<Result<_, ApiError>>()?;
            }
            Some(_) => {
                return Err(bad(
                    format!("messages[{i}].tool_calls"),
                    "must be an array, on an assistant message",
                ))
            }
        }
    }
    Ok(())
}

/// A chat request's tools applied: earlier calls and results put into the history, the tools
/// offered with the chat; returns the grammar the answer must follow (the response format's,
/// or the call schema for `required` and named choices) and the tools whose calls are to be
/// parsed out of the answer.
pub fn apply(
    body: &Value,
    messages: &mut [ChatMessage],
    format: Option<Grammar>,
) -> Result<(Option<Grammar>, Option<Tools>), ApiError> {
    history(body, messages)?;
    let Some(tools) = Tools::parse(body)? else {
        return Ok((format, None));
    };
    tools.prompt(messages);
    let grammar = match (tools.grammar(), format) {
        (Some(_), Some(_)) => {
            let m = "cannot be combined with tool_choice required or a named function";
            return Err(bad("response_format", m));
        }
        (calls, format) => calls.or(format),
    };
    Ok((grammar, Some(tools).filter(Tools::offered)))
}

/// Text completions take no tools.
pub fn refuse(body: &Value) -> Result<(), ApiError> {
    for k in [
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
    ] {
        if body.get(k).is_some_and(|v| !v.is_null()) {
            return Err(bad(k, "only /v1/chat/completions takes tools"));
        }
    }
    Ok(())
}

impl Tools {
    /// A whole chat answer: each choice whose text is a valid call gets `tool_calls` instead
    /// of content, and `finish_reason: "tool_calls"`.
    pub fn answer(&self, v: &mut Value, id: &str) {
        let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) else {
            return;
        };
        for c in choices {
            let text = c["message"]["content"].as_str().unwrap_or_default();
            if let Some(calls) = self.calls(text) {
                c["message"]["content"] = Value::Null;
                c["message"]["tool_calls"] = to_openai(&calls, id, false);
                c["finish_reason"] = json!("tool_calls");
            }
        }
    }
}

/// The `tool_calls` of a chat message or delta, OpenAI's shape: arguments as a JSON string.
pub fn to_openai(calls: &[Call], id: &str, with_index: bool) -> Value {
    let list: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut v = json!({
                "id": format!("call_{id}_{k}"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            });
            if with_index {
                v["index"] = json!(k);
            }
            v
        })
        .collect();
    Value::Array(list)
}

#[cfg(test)]
mod tests;
