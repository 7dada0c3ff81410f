//! KServe v2 / Open Inference Protocol: the tensor contracts of our models, shared by the
//! REST (`rest.rs`) and gRPC (`grpc.rs`) front ends.
//!
//! Embedding models: BYTES `text` [N] → FP32 `embedding` [N, D].
//! LLMs: BYTES `text_input` [1] with parameters `max_tokens`, `temperature`, `top_p`, `top_k`,
//! `seed`, `stop` → BYTES `text_output` [1].

mod codec;
pub mod grpc;
pub mod rest;

use std::collections::BTreeMap;

use flatmesh_runtime::{Engine, GenerateRequest, ModelKind, Prompt, SamplingParams};
use serde_json::Value;

use super::AppState;
use crate::cache::{CacheError, CopyStatus};

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
}

/// An error of the v2 protocol; each front end maps it once.
#[derive(Debug)]
pub enum V2Error {
    BadRequest(String),
    NotFound(String),
    Unavailable(String, u64),
    /// Over a tier's limit or queue: 429 / RESOURCE_EXHAUSTED.
    TooMany(String, u64),
    Forbidden(String),
    Internal(String),
}

impl From<crate::tenancy::limits::LimitError> for V2Error {
    fn from(e: crate::tenancy::limits::LimitError) -> Self {
        V2Error::TooMany(e.message, e.retry_after)
    }
}

impl From<crate::policy::Refusal> for V2Error {
    fn from(r: crate::policy::Refusal) -> Self {
        let retry = r.retry_after.unwrap_or(1);
        match r.status {
            429 => V2Error::TooMany(r.message, retry),
            401 | 403 => V2Error::Forbidden(r.message),
            400..=499 => V2Error::BadRequest(r.message),
            _ => V2Error::Unavailable(r.message, retry),
        }
    }
}

impl From<crate::scheduler::Rejected> for V2Error {
    fn from(e: crate::scheduler::Rejected) -> Self {
        V2Error::TooMany(e.to_string(), 1)
    }
}

impl From<crate::tenancy::AuthError> for V2Error {
    fn from(e: crate::tenancy::AuthError) -> Self {
        V2Error::Forbidden(e.to_string())
    }
}

impl From<crate::api::error::ApiError> for V2Error {
    fn from(e: crate::api::error::ApiError) -> Self {
        V2Error::Internal(e.message)
    }
}

impl From<CacheError> for V2Error {
    fn from(e: CacheError) -> Self {
        let m = e.to_string();
        match &e {
            CacheError::NotFound(_) => V2Error::NotFound(m),
            CacheError::Failed { .. } | CacheError::NoRoom { .. } => {
                V2Error::Unavailable(m, e.retry_after().unwrap_or(1))
            }
            _ => V2Error::BadRequest(m),
        }
    }
}

impl From<flatmesh_runtime::RuntimeError> for V2Error {
    fn from(e: flatmesh_runtime::RuntimeError) -> Self {
        if e.is_client_error() {
            V2Error::BadRequest(e.to_string())
        } else {
            V2Error::Internal(e.to_string())
        }
    }
}

impl V2Error {
    pub fn message(&self) -> &str {
        match self {
            V2Error::BadRequest(m)
            | V2Error::NotFound(m)
            | V2Error::Unavailable(m, _)
            | V2Error::TooMany(m, _)
            | V2Error::Forbidden(m)
            | V2Error::Internal(m) => m,
        }
    }
}

/// Per-model counts and total nanoseconds of v2 inferences (Triton's statistics extension).
#[derive(Debug, Default)]
pub struct Stats {
    models: std::sync::Mutex<BTreeMap<String, ModelStats>>,
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
        let mut m = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let s = m.entry(model.to_string()).or_default();
        let slot = if ok { &mut s.success } else { &mut s.fail };
        slot.0 += 1;
        slot.1 += took.as_nanos() as u64;
        s.last_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
    }

    pub fn get(&self, model: &str) -> ModelStats {
        self.models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .copied()
            .unwrap_or_default()
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
pub fn model_status(state: &AppState, name: &str) -> Result<CopyStatus, V2Error> {
    let all = state.cache.status();
    let target = state
        .cache
        .resolve(name)
        .ok_or_else(|| V2Error::NotFound(format!("model {name:?} does not exist")))?;
    all.into_iter()
        .find(|m| m.id == target)
        .ok_or_else(|| V2Error::NotFound(format!("model {name:?} does not exist")))
}

/// A model is ready when it can serve: registered and not failed (a cold model loads on use).
pub fn is_ready(status: &CopyStatus) -> bool {
    status.state != "failed"
}

/// Metadata of a model: its kind needs a loaded copy, so this loads a cold model.
pub async fn metadata(
    state: &AppState,
    name: &str,
) -> Result<(String, Vec<Signature>, Vec<Signature>), V2Error> {
    let lease = state.cache.acquire(name, None).await?;
    let info = lease.engine.info().clone();
    let (i, o) = signature(info.kind, info.embedding_dims);
    Ok((lease.model.clone(), i, o))
}

/// Run one inference request against its model.
pub async fn infer(
    state: &AppState,
    caller: &crate::tenancy::Caller,
    name: &str,
    req: InferRequest,
) -> Result<InferResponse, V2Error> {
    crate::api::auth::check(state, caller, name)?;
    let info = crate::api::usage::request_info(
        req.id.as_deref().unwrap_or(""),
        caller,
        name,
        "v2_infer",
        None,
        None,
        false,
    );
    let (_held, bill) = crate::api::usage::admit(state, caller, "v2_infer", info).await?;
    let lease = state
        .cache
        .acquire_for(name, None, caller.tier.residency_bonus.0)
        .await?;
    let model = lease.model.clone();
    let kind = lease.engine.info().kind;
    let (inputs, _) = signature(kind, None);
    let input = take_input(&req.inputs, inputs[0].name, &model)?;
    let Data::Bytes(items) = &input.data else {
        return Err(V2Error::BadRequest(format!(
            "input {:?} must be BYTES, got {}",
            input.name, input.datatype
        )));
    };
    let texts = items
        .iter()
        .enumerate()
        .map(|(i, b)| {
            String::from_utf8(b.clone()).map_err(|_| {
                V2Error::BadRequest(format!("input {:?}[{i}] is not UTF-8", input.name))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let engine = lease.engine.clone();
    let (outputs, input_tokens, output_tokens) = match kind {
        ModelKind::Embedding => {
            let out = tokio::task::spawn_blocking(move || engine.embed(&texts))
                .await
                .map_err(|e| V2Error::Internal(e.to_string()))??;
            let dims = out.vectors.first().map_or(0, Vec::len);
            let n = out.vectors.len();
            let tokens = out.prompt_tokens;
            let t = Tensor {
                name: "embedding".into(),
                datatype: "FP32".into(),
                shape: vec![n as i64, dims as i64],
                data: Data::F32(out.vectors.into_iter().flatten().collect()),
            };
            (vec![t], tokens, 0)
        }
        ModelKind::Llm => {
            if texts.len() != 1 {
                return Err(V2Error::BadRequest(format!(
                    "input \"text_input\" must hold one element, got {}",
                    texts.len()
                )));
            }
            let gen = generate_request(texts.into_iter().next().expect("one"), &req.parameters)?;
            let g = tokio::task::spawn_blocking(move || {
                engine.generate(&gen, &mut |_| std::ops::ControlFlow::Continue(()))
            })
            .await
            .map_err(|e| V2Error::Internal(e.to_string()))??;
            let (pt, ct) = (g.prompt_tokens, g.completion_tokens);
            let t = Tensor {
                name: "text_output".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                data: Data::Bytes(vec![g.text.into_bytes()]),
            };
            (vec![t], pt, ct)
        }
    };
    drop(lease);
    let record_id = req
        .id
        .clone()
        .unwrap_or_else(|| format!("v2-{}", uuid::Uuid::new_v4().simple()));
    bill.record(&record_id, &model, input_tokens, output_tokens)
        .await?;
    Ok(InferResponse {
        model,
        id: req.id,
        outputs,
    })
}

/// The one input a model expects: unknown, missing and misshapen inputs are clear errors.
fn take_input<'a>(
    inputs: &'a [Tensor],
    expected: &str,
    model: &str,
) -> Result<&'a Tensor, V2Error> {
    if let Some(other) = inputs.iter().find(|t| t.name != expected) {
        return Err(V2Error::BadRequest(format!(
            "unknown input {:?}: model {model:?} takes {expected:?}",
            other.name
        )));
    }
    let t = inputs
        .iter()
        .find(|t| t.name == expected)
        .ok_or_else(|| V2Error::BadRequest(format!("missing input {expected:?}")))?;
    if t.datatype != "BYTES" {
        return Err(V2Error::BadRequest(format!(
            "input {expected:?} must be BYTES, got {}",
            t.datatype
        )));
    }
    let elems: i64 = t.shape.iter().product();
    let n = match &t.data {
        Data::Bytes(b) => b.len() as i64,
        Data::F32(v) => v.len() as i64,
        Data::Other(_) => -1,
    };
    if t.shape.iter().any(|&d| d < 0) || elems != n {
        return Err(V2Error::BadRequest(format!(
            "input {expected:?} has shape {:?} ({elems} elements) but {n} data elements",
            t.shape
        )));
    }
    Ok(t)
}

/// Generation settings from v2 request parameters.
pub fn generate_request(
    prompt: String,
    p: &BTreeMap<String, Value>,
) -> Result<GenerateRequest, V2Error> {
    let num = |k: &str| -> Result<Option<f64>, V2Error> {
        match p.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .map(Some)
                .ok_or_else(|| {
                    V2Error::BadRequest(format!("parameter {k:?} must be a number, got {v}"))
                }),
        }
    };
    let stop = match p.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => match serde_json::from_str::<Vec<String>>(s) {
            Ok(list) => list,
            Err(_) => vec![s.clone()],
        },
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(v) => {
            return Err(V2Error::BadRequest(format!(
                "parameter \"stop\" must be a string or list, got {v}"
            )))
        }
    };
    let temperature = num("temperature")?.unwrap_or(1.0) as f32;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(V2Error::BadRequest(format!(
            "parameter \"temperature\" {temperature} is not between 0 and 2"
        )));
    }
    let top_p = num("top_p")?.unwrap_or(1.0) as f32;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(V2Error::BadRequest(format!(
            "parameter \"top_p\" {top_p} is not in (0, 1]"
        )));
    }
    let max_tokens = num("max_tokens")?.map(|n| n as usize);
    if max_tokens == Some(0) {
        return Err(V2Error::BadRequest(
            "parameter \"max_tokens\" must be at least 1".into(),
        ));
    }
    Ok(GenerateRequest {
        prompt: Prompt::Text(prompt),
        max_tokens: Some(max_tokens.unwrap_or(128)),
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k: num("top_k")?.unwrap_or(0.0) as usize,
            seed: num("seed")?.map(|s| s as u64),
            ..Default::default()
        },
        stop,
    })
}

/// Whether an engine is an LLM (for the generate extension).
pub fn require_llm(engine: &dyn Engine, model: &str) -> Result<(), V2Error> {
    if engine.info().kind == ModelKind::Llm {
        Ok(())
    } else {
        Err(V2Error::BadRequest(format!(
            "model {model:?} is not an LLM; use /infer"
        )))
    }
}
