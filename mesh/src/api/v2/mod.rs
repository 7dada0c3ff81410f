//! KServe v2 / Open Inference Protocol: the tensor contracts of our models, shared by the
//! REST (`rest.rs`) and gRPC (`grpc.rs`) codecs over the serve path.
//!
//! Embedding models: BYTES `text` [N] → FP32 `embedding` [N, D].
//! LLMs: BYTES `text_input` [1] with parameters `max_tokens`, `temperature`, `top_p`, `top_k`,
//! `seed`, `stop` → BYTES `text_output` [1].

mod codec;
pub mod grpc;
pub mod incoming;
pub mod pb;
pub mod rest;
pub mod status;

use std::collections::BTreeMap;

use flatmesh_runtime::{Embeddings, GenerateRequest, ModelKind, Prompt, SamplingParams};
use serde_json::Value;

use super::{deadline::Deadline, AppState};
use crate::{
    cache::{CopyStatus, ModelState},
    serve::{check, Endpoint, Output, Request, ServeError, Work},
    tenancy::Caller,
};

/// Element data of a tensor, by datatype family.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Bytes(Vec<Vec<u8>>),
    F32(Vec<f32>),
    Other(String),
}

#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

/// A v2 inference request after decoding from JSON, binary or protobuf.
#[derive(Debug, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: BTreeMap<String, Value>,
    pub inputs: Vec<Tensor>,
}

#[derive(Debug)]
pub struct InferResponse {
    pub model: String,
    pub id: Option<String>,
    pub outputs: Vec<Tensor>,
    /// The peer that served it, when not this node.
    pub node: Option<String>,
}

/// Per-model counts and total nanoseconds of v2 inferences (Triton's statistics extension).
#[derive(Debug, Default)]
pub struct Stats {
    models: parking_lot::Mutex<BTreeMap<String, ModelStats>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ModelStats {
    /// (count, nanoseconds)
    pub success: (u64, u64),
    pub fail: (u64, u64),
    /// Milliseconds since the epoch of the last inference.
    pub last_ms: u64,
}

impl Stats {
    pub fn record(&self, model: &str, ok: bool, took: std::time::Duration) {
        let mut m = self.models.lock();
        let s = m.entry(model.to_string()).or_default();
        let slot = if ok { &mut s.success } else { &mut s.fail };
        slot.0 += 1;
        slot.1 += took.as_nanos() as u64;
        s.last_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
    }

    pub fn get(&self, model: &str) -> ModelStats {
        self.models.lock().get(model).copied().unwrap_or_default()
    }
}

/// One tensor of a model's signature.
pub struct Signature {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// Inputs and outputs a model kind accepts and produces.
pub fn signature(kind: ModelKind, dims: Option<usize>) -> (Vec<Signature>, Vec<Signature>) {
    match kind {
        ModelKind::Embedding => (
            vec![Signature {
                name: "text",
                datatype: "BYTES",
                shape: vec![-1],
            }],
            vec![Signature {
                name: "embedding",
                datatype: "FP32",
                shape: vec![-1, dims.map_or(-1, |d| d as i64)],
            }],
        ),
        ModelKind::Llm => (
            vec![Signature {
                name: "text_input",
                datatype: "BYTES",
                shape: vec![1],
            }],
            vec![Signature {
                name: "text_output",
                datatype: "BYTES",
                shape: vec![1],
            }],
        ),
    }
}

/// A model's status by name (model or vmodel).
pub fn model_status(state: &AppState, name: &str) -> Result<CopyStatus, ServeError> {
    let missing = || ServeError::not_found(format!("model {name:?} does not exist"));
    let target = state.serve.cache.resolve(name).ok_or_else(missing)?;
    state
        .serve
        .cache
        .status()
        .into_iter()
        .find(|m| m.id == target)
        .ok_or_else(missing)
}

/// A model is ready when it can serve: registered and not failed (a cold model loads on use).
pub fn is_ready(status: &CopyStatus) -> bool {
    status.state != ModelState::Failed
}

/// Metadata of a model: its kind is known from its format; an embedding model's width
/// needs a loaded copy, so this loads a cold one.
pub async fn metadata(
    state: &AppState,
    name: &str,
) -> Result<(String, Vec<Signature>, Vec<Signature>), ServeError> {
    // A pin, without one of the model's concurrency slots: only its facts are read.
    let lease = state
        .serve
        .cache
        .pin_for(name, None, std::time::Duration::ZERO)
        .await?;
    let info = lease.engine.info().clone();
    let (i, o) = signature(info.kind, info.embedding_dims);
    Ok((lease.model.clone(), i, o))
}

/// Check a v2 inference request and turn it into work for the serve path: the input the
/// model's kind expects (at most `serve::MAX_INPUTS` texts, UTF-8) and valid parameters.
pub fn infer_request(
    state: &AppState,
    (caller, deadline): (Caller, Deadline),
    name: &str,
    endpoint: Endpoint,
    req: InferRequest,
) -> Result<Request, ServeError> {
    let kind = state
        .serve
        .cache
        .resolve(name)
        .and_then(|m| state.serve.cache.kind(&m))
        .ok_or_else(|| ServeError::not_found(format!("model {name:?} does not exist")))?;
    let (inputs, _) = signature(kind, None);
    let input = take_input(&req.inputs, inputs[0].name, name)?;
    let Data::Bytes(items) = &input.data else {
        return Err(ServeError::invalid(format!(
            "input {:?} must be BYTES, got {}",
            input.name, input.datatype
        )));
    };
    check::inputs(items.len(), &format!("inputs.{}", input.name))?;
    let texts = items
        .iter()
        .enumerate()
        .map(|(i, b)| {
            String::from_utf8(b.clone()).map_err(|_| {
                ServeError::invalid(format!("input {:?}[{i}] is not UTF-8", input.name))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prompt = texts.first().cloned().unwrap_or_default();
    let generate = generate_request(prompt, &req.parameters)?;
    Ok(Request {
        caller,
        model: name.to_string(),
        endpoint,
        work: Work::Infer { texts, generate },
        keep_alive: None,
        client_id: check_id(req.id.as_deref())?,
        stream: false,
        forwarded: None,
        deadline: deadline.0,
    })
}

/// Longest request id a client may send.
const MAX_ID: usize = 256;

/// A client's request id, bounded.
pub fn check_id(id: Option<&str>) -> Result<Option<String>, ServeError> {
    match id {
        Some(id) if id.len() > MAX_ID => Err(ServeError::bad_request(
            "id",
            format!("is {} bytes long; at most {MAX_ID}", id.len()),
        )),
        other => Ok(crate::serve::client_id(other)),
    }
}

/// Run a v2 inference request on the serve path and give back its output tensors.
pub async fn infer(state: &AppState, request: Request) -> Result<InferResponse, ServeError> {
    let client_id = request.client_id.clone();
    let served = state.serve.run(request).await?;
    let outputs = match served.output {
        Output::Embeddings(out) => vec![embedding_tensor(out)],
        Output::Text(g) => {
            let g = g.collect().await?;
            vec![Tensor {
                name: "text_output".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                data: Data::Bytes(vec![g.text.into_bytes()]),
            }]
        }
    };
    Ok(InferResponse {
        model: served.model,
        id: client_id,
        outputs,
        node: served.node,
    })
}

/// Embeddings as the `embedding` output tensor, FP32 [N, D].
pub fn embedding_tensor(out: Embeddings) -> Tensor {
    let dims = out.vectors.first().map_or(0, Vec::len);
    let n = out.vectors.len();
    Tensor {
        name: "embedding".into(),
        datatype: "FP32".into(),
        shape: vec![n as i64, dims as i64],
        data: Data::F32(out.vectors.into_iter().flatten().collect()),
    }
}

/// The one input a model expects: unknown, missing and misshapen inputs are clear errors.
fn take_input<'a>(
    inputs: &'a [Tensor],
    expected: &str,
    model: &str,
) -> Result<&'a Tensor, ServeError> {
    if let Some(other) = inputs.iter().find(|t| t.name != expected) {
        return Err(ServeError::invalid(format!(
            "unknown input {:?}: model {model:?} takes {expected:?}",
            other.name
        )));
    }
    let t = inputs
        .iter()
        .find(|t| t.name == expected)
        .ok_or_else(|| ServeError::invalid(format!("missing input {expected:?}")))?;
    if t.datatype != "BYTES" {
        return Err(ServeError::invalid(format!(
            "input {expected:?} must be BYTES, got {}",
            t.datatype
        )));
    }
    let n = match &t.data {
        Data::Bytes(b) => b.len() as i64,
        Data::F32(v) => v.len() as i64,
        Data::Other(_) => -1,
    };
    let elems = t.shape.iter().try_fold(
        1i64,
        |acc, &d| if d < 0 { None } else { acc.checked_mul(d) },
    );
    if elems != Some(n) {
        return Err(ServeError::invalid(format!(
            "input {expected:?} has shape {:?} but {n} data elements",
            t.shape
        )));
    }
    Ok(t)
}

/// Generation settings from v2 request parameters; every number is range-checked.
pub fn generate_request(
    prompt: String,
    p: &BTreeMap<String, Value>,
) -> Result<GenerateRequest, ServeError> {
    let bad = |k: &str, m: String| ServeError::bad_request(format!("parameters.{k}"), m);
    let num = |k: &str| -> Result<Option<f64>, ServeError> {
        match p.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| bad(k, format!("must be a number, got {v}"))),
        }
    };
    // A whole number in `lo..=hi`.
    let int = |k: &str, lo: f64, hi: f64| -> Result<Option<u64>, ServeError> {
        match num(k)? {
            None => Ok(None),
            Some(x) if x.fract() == 0.0 && (lo..=hi).contains(&x) => Ok(Some(x as u64)),
            Some(x) => Err(bad(
                k,
                format!("{x} is not a whole number from {lo} to {hi}"),
            )),
        }
    };
    let stop = match p.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.trim_start().starts_with('[') => {
            serde_json::from_str::<Vec<String>>(s)
                .map_err(|e| bad("stop", format!("is not a JSON list of strings: {e}")))?
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop", "must hold only strings".into()))?,
        Some(v) => return Err(bad("stop", format!("must be a string or list, got {v}"))),
    };
    let temperature = num("temperature")?.unwrap_or(1.0);
    let top_p = num("top_p")?.unwrap_or(1.0);
    let max_tokens = int("max_tokens", 1.0, u32::MAX as f64)?.unwrap_or(128);
    let top_k = int("top_k", 0.0, u32::MAX as f64)?.unwrap_or(0);
    // Seeds are whole numbers that JSON carries exactly (up to 2^53).
    let seed = int("seed", 0.0, 9_007_199_254_740_992.0)?;
    let ignore_eos = match p.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad("ignore_eos", format!("must be true or false, got {v}"))),
    };
    let grammar = match p.get("response_format") {
        None | Some(Value::Null) => None,
        Some(v) => crate::api::openai::format::from_parameter(v)
            .map_err(|e| bad(e.param.as_deref().unwrap_or("response_format"), e.message))?,
    };
    if ignore_eos && grammar.is_some() {
        let m = "cannot be combined with a JSON response_format".to_string();
        return Err(bad("ignore_eos", m));
    }
    let g = GenerateRequest {
        prompt: Prompt::Text(prompt),
        max_tokens: Some(max_tokens as usize),
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k as usize,
            seed,
            ignore_eos,
            grammar,
            ..Default::default()
        },
        stop,
        n: 1,
        logprobs: None,
    };
    check::generate(&g, &|k| format!("parameters.{k}"))?;
    Ok(g)
}

#[cfg(test)]
mod tests;
