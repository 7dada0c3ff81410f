//! `response_format`: what the answer must be (free text, any JSON object, or JSON valid under
//! a schema), parsed into the engine's grammar and checked before the request is admitted.

use flatmesh_runtime::constrain::{self, Grammar};
use serde_json::Value;

use crate::api::error::ApiError;

/// The grammar a request body's `response_format` asks for; `None` for free text.
pub fn response_format(body: &Value) -> Result<Option<Grammar>, ApiError> {
    let rf = match body.get("response_format") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(rf)) => rf,
        Some(other) => {
            return Err(ApiError::bad_request(
                "response_format",
                format!("must be an object, got {other}"),
            ))
        }
    };
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request(
            "response_format.type",
            "is required: \"text\", \"json_object\" or \"json_schema\"",
        )
    })?;
    let allowed: &[&str] = match kind {
        "json_schema" => &["type", "json_schema"],
        _ => &["type"],
    };
    if let Some(k) = rf.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            format!("response_format.{k}"),
            format!("is not a field of a {kind:?} response format"),
        ));
    }
    let grammar = match kind {
        "text" => return Ok(None),
        "json_object" => Grammar::JsonObject,
        "json_schema" => Grammar::JsonSchema(schema(rf.get("json_schema"))?),
        other => {
            return Err(ApiError::bad_request(
                "response_format.type",
                format!("{other:?} is not \"text\", \"json_object\" or \"json_schema\""),
            ))
        }
    };
    constrain::check(&grammar)
        .map_err(|e| ApiError::bad_request("response_format.json_schema", e))?;
    Ok(Some(grammar))
}

/// A v2 `response_format` parameter: the OpenAI object, or that object as a JSON string
/// (gRPC parameters carry only strings, numbers and booleans).
pub fn from_parameter(v: &Value) -> Result<Option<Grammar>, ApiError> {
    let rf = match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            ApiError::bad_request("response_format", format!("is not a JSON object: {e}"))
        })?,
        other => other.clone(),
    };
    response_format(&serde_json::json!({ "response_format": rf }))
}

/// The schema of a `json_schema` response format: `{name, description?, schema, strict?}`.
/// `strict` false is honoured as true: the output always follows the schema.
fn schema(js: Option<&Value>) -> Result<Value, ApiError> {
    let field = "response_format.json_schema";
    let js = match js {
        Some(Value::Object(js)) => js,
        _ => {
            return Err(ApiError::bad_request(
                field,
                "must be an object with a \"schema\"",
            ))
        }
    };
    if let Some(k) = js
        .keys()
        .find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(
            format!("{field}.{k}"),
            "is not a field of json_schema (name, description, schema, strict)",
        ));
    }
    if let Some(name) = js.get("name") {
        let ok = name.as_str().is_some_and(|n| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        if !ok {
            return Err(ApiError::bad_request(
                format!("{field}.name"),
                "must be 1 to 64 letters, digits, '_' or '-'",
            ));
        }
    }
    if let Some(strict) = js.get("strict").filter(|s| !s.is_boolean() && !s.is_null()) {
        return Err(ApiError::bad_request(
            format!("{field}.strict"),
            format!("must be true or false, got {strict}"),
        ));
    }
    match js.get("schema") {
        Some(s @ Value::Object(_)) => Ok(s.clone()),
        Some(other) => Err(ApiError::bad_request(
            field,
            format!("schema must be a JSON object, got {other}"),
        )),
        None => Err(ApiError::bad_request(field, "schema is required")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn param(body: Value) -> String {
        let e = response_format(&body).unwrap_err();
        format!("{} {}", e.param.unwrap_or_default(), e.message)
    }

    #[test]
    fn text_and_absent_are_free_text() {
        assert_eq!(response_format(&json!({})).unwrap(), None);
        assert_eq!(
            response_format(&json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
    }

    #[test]
    fn json_modes_become_grammars() {
        let g = response_format(&json!({"response_format": {"type": "json_object"}})).unwrap();
        assert_eq!(g, Some(Grammar::JsonObject));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let body = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}});
        assert_eq!(
            response_format(&body).unwrap(),
            Some(Grammar::JsonSchema(schema))
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_field() {
        let p = param(json!({"response_format": {"type": "xml"}}));
        assert!(p.starts_with("response_format.type "), "{p}");
        let p = param(json!({"response_format": {"type": "json_schema"}}));
        assert!(p.starts_with("response_format.json_schema "), "{p}");
        let p = param(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}),
        );
        assert!(
            p.starts_with("response_format.json_schema ") && p.contains("objekt"),
            "{p}"
        );
        let p = param(json!({"response_format": {"type": "json_object", "schema": {}}}));
        assert!(p.starts_with("response_format.schema "), "{p}");
        let p = param(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}),
        );
        assert!(p.starts_with("response_format.json_schema.name "), "{p}");
    }
}
