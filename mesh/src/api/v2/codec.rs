//! Tensor data of the v2 REST protocol: JSON tensors and the binary tensor data extension.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::{Data, InferRequest, Tensor};
use crate::serve::ServeError;

/// Decode a JSON request (and its binary tail); returns which outputs want binary data.
pub fn decode_request<'a>(
    json: &'a Value,
    mut tail: &[u8],
) -> Result<(InferRequest, impl Fn(&str) -> bool + 'a), ServeError> {
    let obj = json
        .as_object()
        .ok_or_else(|| ServeError::invalid("request must be a JSON object"))?;
    let params: BTreeMap<String, Value> = obj
        .get("parameters")
        .and_then(Value::as_object)
        .map(|m| m.clone().into_iter().collect())
        .unwrap_or_default();
    let inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| ServeError::invalid("missing \"inputs\""))?;
    let mut tensors = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let name = input
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ServeError::invalid(format!("inputs[{i}].name is missing")))?;
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| ServeError::invalid(format!("input {name:?}: datatype is missing")))?;
        let shape: Vec<i64> = input
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_i64).collect())
            .ok_or_else(|| {
                ServeError::invalid(format!("input {name:?}: shape must be a list of integers"))
            })?;
        let binary_size = input
            .pointer("/parameters/binary_data_size")
            .and_then(Value::as_u64);
        let data = match binary_size {
            Some(n) => {
                let n = n as usize;
                if n > tail.len() {
                    return Err(ServeError::invalid(format!(
                        "input {name:?}: binary_data_size {n} exceeds the binary data left ({})",
                        tail.len()
                    )));
                }
                let (mine, rest) = tail.split_at(n);
                tail = rest;
                decode_binary(name, datatype, mine)?
            }
            None => decode_json(
                name,
                datatype,
                input.get("data").ok_or_else(|| {
                    ServeError::invalid(format!("input {name:?}: data is missing"))
                })?,
            )?,
        };
        tensors.push(Tensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            data,
        });
    }
    let all_binary = params
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let requested: Map<String, Value> = obj
        .get("outputs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|o| {
                    Some((
                        o.get("name")?.as_str()?.to_string(),
                        o.pointer("/parameters/binary_data")
                            .cloned()
                            .unwrap_or(Value::Bool(false)),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let req = InferRequest {
        id: obj.get("id").and_then(Value::as_str).map(String::from),
        parameters: params,
        inputs: tensors,
    };
    Ok((req, move |name: &str| {
        requested
            .get(name)
            .and_then(Value::as_bool)
            .unwrap_or(all_binary)
    }))
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.clone()),
    }
}

fn decode_json(name: &str, datatype: &str, data: &Value) -> Result<Data, ServeError> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    match datatype {
        "BYTES" => flat
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.into_bytes()),
                other => Err(ServeError::invalid(format!(
                    "input {name:?}: BYTES data must be strings, got {other}"
                ))),
            })
            .collect::<Result<_, _>>()
            .map(Data::Bytes),
        "FP32" => flat
            .into_iter()
            .map(|v| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    ServeError::invalid(format!("input {name:?}: FP32 data must be numbers"))
                })
            })
            .collect::<Result<_, _>>()
            .map(Data::F32),
        other => Ok(Data::Other(other.to_string())),
    }
}

pub fn decode_binary(name: &str, datatype: &str, raw: &[u8]) -> Result<Data, ServeError> {
    match datatype {
        "BYTES" => {
            let mut items = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err(ServeError::invalid(format!(
                        "input {name:?}: truncated BYTES element length"
                    )));
                }
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                if rest.len() < 4 + n {
                    return Err(ServeError::invalid(format!(
                        "input {name:?}: BYTES element of {n} bytes is truncated"
                    )));
                }
                items.push(rest[4..4 + n].to_vec());
                rest = &rest[4 + n..];
            }
            Ok(Data::Bytes(items))
        }
        "FP32" => {
            if !raw.len().is_multiple_of(4) {
                return Err(ServeError::invalid(format!(
                    "input {name:?}: FP32 binary data is not a multiple of 4 bytes"
                )));
            }
            Ok(Data::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ))
        }
        other => Ok(Data::Other(other.to_string())),
    }
}

pub fn encode_binary(data: &Data, out: &mut Vec<u8>) {
    match data {
        Data::Bytes(items) => {
            for b in items {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
        Data::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Data::Other(_) => {}
    }
}

pub fn data_json(data: &Data) -> Value {
    match data {
        Data::Bytes(items) => json!(items
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()),
        Data::F32(v) => json!(v),
        Data::Other(_) => json!([]),
    }
}
