//! Calls in a model's answer, in any of the formats: generic (`{"tool_calls": [call, …]}`),
//! Hermes / Qwen 2.5 (`<tool_call>call</tool_call>`, one or more), Llama 3 (a bare call,
//! `{"name", "parameters"}`, perhaps after `<|python_tag|>`) and Mistral (`[TOOL_CALLS]` and
//! an array of calls). The control tokens are usually gone from the text already (special
//! tokens are not detokenized); they are accepted where they remain. A call is
//! `{"name", "arguments"}` (or `"parameters"`, or OpenAI's `{"function": {…}}`), arguments an
//! object or a JSON string of one.

use serde_json::{json, Map, Value};

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

/// Markers a format may put before its calls.
const PREFIXES: [&str; 2] = ["<|python_tag|>", "[TOOL_CALLS]"];
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The calls `text` holds when it is nothing but calls; `None` otherwise.
pub fn parse_calls(text: &str) -> Option<Vec<Call>> {
    let mut t = unfence(text.trim());
    while let Some(rest) = PREFIXES.iter().find_map(|p| t.strip_prefix(p)) {
        t = rest.trim_start();
    }
    if t.starts_with(OPEN) {
        return hermes(t);
    }
    let v: Value = serde_json::from_str(t).ok()?;
    let list = match v {
        Value::Object(ref o) => match o.get("tool_calls") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return None,
            None => vec![v],
        },
        Value::Array(list) => list,
        _ => return None,
    };
    list.iter().map(call).collect()
}

/// The text inside a Markdown code fence (```json … ```), or the text itself.
fn unfence(t: &str) -> &str {
    t.strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|t| t.trim_end().strip_suffix("```"))
        .map_or(t, str::trim)
}

/// `<tool_call>call</tool_call>` blocks with only white space between them (the last one's
/// closing tag may be missing: the answer ended there).
fn hermes(mut t: &str) -> Option<Vec<Call>> {
    let mut calls = Vec::new();
    while let Some(rest) = t.strip_prefix(OPEN) {
        let (body, after) = rest.split_once(CLOSE).unwrap_or((rest, ""));
        calls.push(call(&serde_json::from_str(body.trim()).ok()?)?);
        t = after.trim_start();
    }
    t.is_empty().then_some(calls)
}

/// One call object.
pub fn call(v: &Value) -> Option<Call> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Option<Vec<(String, Value)>> {
        parse_calls(text).map(|c| c.into_iter().map(|c| (c.name, c.arguments)).collect())
    }

    fn oslo() -> Option<Vec<(String, Value)>> {
        Some(vec![("get_weather".into(), json!({"city": "Oslo"}))])
    }

    #[test]
    fn generic_calls_parse() {
        let t = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#;
        assert_eq!(names(t), oslo());
        let fenced = "```json\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}\n```";
        assert_eq!(names(fenced), oslo());
        assert_eq!(names(r#"{"tool_calls": {"name": "x"}}"#), None);
    }

    #[test]
    fn hermes_calls_parse() {
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        assert_eq!(names(one), oslo());
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>\n"
        );
        let got = names(&two).unwrap();
        assert_eq!(got[1], ("get_time".into(), json!({})));
        // Cut before the closing tag: still the call that was written.
        assert_eq!(names(&one[..one.len() - CLOSE.len()]), oslo());
        // Text after the calls, or a broken body: not calls.
        assert_eq!(names(&format!("{one} It is sunny.")), None);
        assert_eq!(
            names("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\n</tool_call>"),
            None
        );
    }

    #[test]
    fn llama3_calls_parse_with_or_without_the_python_tag() {
        let body = r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#;
        assert_eq!(names(body), oslo());
        assert_eq!(names(&format!("<|python_tag|>{body}")), oslo());
        // OpenAI's own shape, as some models echo it.
        let nested = r#"{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}"#;
        assert_eq!(names(nested), oslo());
    }

    #[test]
    fn mistral_calls_parse_with_or_without_the_control_token() {
        let body = r#"[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]"#;
        for t in [body.to_string(), format!("[TOOL_CALLS] {body}")] {
            let got = names(&t).unwrap();
            assert_eq!(got[0], oslo().unwrap()[0]);
            assert_eq!(got[1], ("get_time".into(), json!({"tz": "UTC"})));
        }
    }

    #[test]
    fn text_is_not_a_call() {
        for t in [
            "It is sunny in Oslo.",
            "[1, 2]",
            r#"{"name": "get_weather", "arguments": 3}"#,
            r#"{"name": 7}"#,
            "<tool_call>not json</tool_call>",
            r#"{"name": "get_weather", "arguments": {}} and more"#,
        ] {
            assert_eq!(names(t), None, "{t}");
        }
    }
}
