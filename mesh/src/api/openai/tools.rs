//! Tools (function calling) in the generic format: the functions are listed in a system
//! prompt section that asks for a `{"tool_calls": [{"name": …, "arguments": {…}}]}` answer;
//! with `tool_choice` `required` or a named function the answer is constrained to that shape
//! and the functions' parameter schemas; with `auto` it is parsed, and text that is not a
//! valid call stays content. Works with any chat template (SmolLM2's has no tool support).

use flatmesh_runtime::{
    constrain::{self, Grammar},
    ChatMessage,
};
use serde_json::{json, Map, Value};

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

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
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

    /// The grammar the answer must follow: `required` and named calls only.
    pub fn grammar(&self) -> Option<Grammar> {
        let items: Vec<Value> = self
            .functions
            .iter()
            .filter(|f| match &self.choice {
                ToolChoice::Required => true,
                ToolChoice::Named(n) => &f.name == n,
                ToolChoice::None | ToolChoice::Auto => false,
            })
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let item = match items.len() {
            0 => return None,
            1 => items.into_iter().next().expect("one"),
            _ => json!({"anyOf": items}),
        };
        let mut calls = json!({"type": "array", "items": item, "minItems": 1});
        if !self.parallel {
            calls["maxItems"] = json!(1);
        }
        Some(Grammar::JsonSchema(json!({
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": false,
        })))
    }

    /// Offer the tools in the system prompt (its first message, or a new one).
    pub fn prompt(&self, messages: &mut Vec<ChatMessage>) {
        if !self.offered() {
            return;
        }
        let section = self.section();
        match messages.first_mut() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                m.content = format!("{}\n\n{section}", m.content);
            }
            _ => messages.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: section,
                },
            ),
        }
    }

    /// The generic format's system prompt section.
    fn section(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou can call these functions. Each is a JSON object with its name, \
             description and the JSON schema of its arguments:\n",
        );
        for f in &self.functions {
            let mut d = json!({"name": f.name, "parameters": f.parameters});
            if let Some(desc) = &f.description {
                d["description"] = json!(desc);
            }
            s.push('\n');
            s.push_str(&d.to_string());
        }
        s.push_str(
            "\n\nTo call functions, answer with only a JSON object of this form:\n\
             {\"tool_calls\": [{\"name\": \"<function name>\", \"arguments\": {<the arguments>}}]}\n",
        );
        s.push_str(match &self.choice {
            ToolChoice::Named(_) | ToolChoice::Required => "You must call a function now.",
            _ => "If no function is needed, answer in plain text.",
        });
        if let ToolChoice::Named(n) = &self.choice {
            s.push_str(&format!(" Call {n}."));
        }
        if !self.parallel {
            s.push_str(" Make at most one call.");
        }
        s
    }

    /// The calls an answer holds, if it is a valid call of offered functions; else `None`
    /// (the text stays content).
    pub fn calls(&self, text: &str) -> Option<Vec<Call>> {
        if !self.offered() {
            return None;
        }
        let calls = parse_calls(text)?;
        let known = |c: &Call| match &self.choice {
            ToolChoice::Named(n) => &c.name == n,
            _ => self.functions.iter().any(|f| f.name == c.name),
        };
        let fits =
            !calls.is_empty() && calls.iter().all(known) && (self.parallel || calls.len() == 1);
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

/// Calls in an answer: `{"tool_calls": [{"name", "arguments"}]}`, or one bare
/// `{"name", "arguments"}`, optionally in a ```json fence; arguments an object or a JSON
/// string of one.
pub fn parse_calls(text: &str) -> Option<Vec<Call>> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|t| t.trim_end().strip_suffix("```"))
        .unwrap_or(t)
        .trim();
    let v: Value = serde_json::from_str(t).ok()?;
    let list = match v.get("tool_calls") {
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return None,
        None => vec![v],
    };
    list.iter().map(call).collect()
}

fn call(v: &Value) -> Option<Call> {
    let o = v.as_object()?;
    let f = o.get("function").and_then(Value::as_object).unwrap_or(o);
    let name = f.get("name")?.as_str()?.to_string();
    let arguments = match f.get("arguments").or_else(|| f.get("parameters")) {
        Some(a @ Value::Object(_)) => a.clone(),
        Some(Value::String(s)) => serde_json::from_str::<Map<String, Value>>(s)
            .ok()
            .map(Value::Object)?,
        None => json!({}),
        Some(_) => return None,
    };
    Some(Call { name, arguments })
}

/// Tool calls and results earlier in the chat, written into the messages' text as the generic
/// format has them: an assistant's `tool_calls` as the JSON answer it gave, a `tool`
/// message's result as its content.
pub fn history(body: &Value, messages: &mut [ChatMessage]) -> Result<(), ApiError> {
    let Some(raw) = body.get("messages").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, (m, raw)) in messages.iter_mut().zip(raw).enumerate() {
        match raw.get("tool_calls") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(calls)) if m.role == "assistant" => {
                let calls = calls
                    .iter()
                    .map(call)
                    .collect::<Option<Vec<Call>>>()
                    .ok_or_else(|| {
                        bad(
                            format!("messages[{i}].tool_calls"),
                            "each call needs a function with a name and arguments",
                        )
                    })?;
                let list: Vec<Value> = calls
                    .into_iter()
                    .map(|c| json!({"name": c.name, "arguments": c.arguments}))
                    .collect();
                let answer = json!({"tool_calls": list}).to_string();
                m.content = if m.content.is_empty() {
                    answer
                } else {
                    format!("{}\n{answer}", m.content)
                };
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

/// A chat request's tools applied: earlier calls written into the history, the tools offered
/// in the system prompt; returns the grammar the answer must follow (the response format's,
/// or the call schema for `required` and named choices) and the tools whose calls are to be
/// parsed out of the answer.
pub fn apply(
    body: &Value,
    messages: &mut Vec<ChatMessage>,
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
#[path = "tools_tests.rs"]
mod tests;
