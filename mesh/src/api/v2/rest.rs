//! The v2 protocol over HTTP/REST, with the binary tensor data, generate and repository
//! extensions.

use std::{collections::BTreeMap, convert::Infallible};

use axum::{
    body::Bytes,
    extract::{Extension, Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{sse::Event, IntoResponse, Response, Sse},
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::codec::{data_json, decode_request, encode_binary};
use super::{generate_request, infer, is_ready, metadata, model_status, require_llm, V2Error};
use crate::{api::AppState, tenancy::Caller};

const HEADER_LENGTH: &str = "inference-header-content-length";
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "generate",
    "model_repository",
    "statistics",
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{m}", get(model_metadata))
        .route("/v2/models/{m}/versions/{v}", get(model_metadata_v))
        .route("/v2/models/{m}/ready", get(model_ready))
        .route("/v2/models/{m}/versions/{v}/ready", get(model_ready_v))
        .route("/v2/models/{m}/config", get(model_config))
        .route("/v2/models/{m}/stats", get(model_stats))
        .route("/v2/models/{m}/infer", post(model_infer))
        .route("/v2/models/{m}/versions/{v}/infer", post(model_infer_v))
        .route("/v2/models/{m}/generate", post(generate))
        .route("/v2/models/{m}/generate_stream", post(generate_stream))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{m}/load", post(repository_load))
        .route("/v2/repository/models/{m}/unload", post(repository_unload))
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let status = match &self {
            V2Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            V2Error::NotFound(_) => StatusCode::NOT_FOUND,
            V2Error::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            V2Error::TooMany(..) => StatusCode::TOO_MANY_REQUESTS,
            V2Error::Forbidden(_) => StatusCode::FORBIDDEN,
            V2Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (status, Json(json!({"error": self.message()}))).into_response();
        if let V2Error::Unavailable(_, secs) | V2Error::TooMany(_, secs) = self {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

async fn server_metadata() -> Json<Value> {
    Json(
        json!({"name": "flatmesh", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS}),
    )
}

async fn server_ready(State(state): State<AppState>) -> Response {
    let ready = !state.is_draining() && state.cache.status().iter().all(|m| m.state != "loading");
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready}))).into_response()
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    let (name, inputs, outputs) = metadata(&state, &m).await?;
    let t =
        |s: &super::Signature| json!({"name": s.name, "datatype": s.datatype, "shape": s.shape});
    Ok(Json(json!({
        "name": name, "versions": ["1"], "platform": "flatmesh",
        "inputs": inputs.iter().map(t).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(t).collect::<Vec<_>>(),
    })))
}

async fn model_metadata_v(
    state: State<AppState>,
    Path((m, _v)): Path<(String, String)>,
) -> Result<Json<Value>, V2Error> {
    model_metadata(state, Path(m)).await
}

async fn model_ready(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Response, V2Error> {
    let s = model_status(&state, &m)?;
    let ready = is_ready(&s);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(json!({"name": m, "ready": ready}))).into_response())
}

async fn model_ready_v(
    state: State<AppState>,
    Path((m, _v)): Path<(String, String)>,
) -> Result<Response, V2Error> {
    model_ready(state, Path(m)).await
}

async fn model_config(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    let (name, inputs, outputs) = metadata(&state, &m).await?;
    let t = |s: &super::Signature| json!({"name": s.name, "data_type": triton_type(s.datatype), "dims": s.shape});
    Ok(Json(json!({
        "name": name, "platform": "flatmesh", "backend": "flatmesh", "max_batch_size": 0,
        "input": inputs.iter().map(t).collect::<Vec<_>>(),
        "output": outputs.iter().map(t).collect::<Vec<_>>(),
    })))
}

/// Triton's model-config name of a v2 datatype.
pub fn triton_type(datatype: &str) -> &'static str {
    match datatype {
        "BYTES" => "TYPE_STRING",
        "FP32" => "TYPE_FP32",
        _ => "TYPE_INVALID",
    }
}

async fn model_stats(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    let name = model_status(&state, &m)?.id;
    let s = state.v2_stats.get(&name);
    Ok(Json(json!({"model_stats": [{
        "name": name, "version": "1", "last_inference": s.last_ms, "inference_count": s.success.0, "execution_count": s.success.0,
        "inference_stats": {"success": {"count": s.success.0, "ns": s.success.1}, "fail": {"count": s.fail.0, "ns": s.fail.1}},
    }]})))
}

async fn model_infer(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(m): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match infer_rest(&state, &caller, &m, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn model_infer_v(
    state: State<AppState>,
    caller: Extension<Caller>,
    Path((m, _v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    model_infer(state, caller, Path(m), headers, body).await
}

async fn infer_rest(
    state: &AppState,
    caller: &Caller,
    model: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, V2Error> {
    let header_len = match headers.get(HEADER_LENGTH) {
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    V2Error::BadRequest(format!("header {HEADER_LENGTH} must be a byte count"))
                })?;
            if n > body.len() {
                return Err(V2Error::BadRequest(format!(
                    "{HEADER_LENGTH} {n} is larger than the body ({} bytes)",
                    body.len()
                )));
            }
            n
        }
        None => body.len(),
    };
    let json: Value = serde_json::from_slice(&body[..header_len])
        .map_err(|e| V2Error::BadRequest(format!("request body is not valid JSON: {e}")))?;
    let (req, binary_out) = decode_request(&json, &body[header_len..])?;
    let started = std::time::Instant::now();
    let result = infer(state, caller, model, req).await;
    state.v2_stats.record(
        &state.cache.resolve(model).unwrap_or_default(),
        result.is_ok(),
        started.elapsed(),
    );
    let resp = result?;
    let mut binary = Vec::new();
    let outputs: Vec<Value> = resp
        .outputs
        .iter()
        .map(|t| {
            let mut o = json!({"name": t.name, "datatype": t.datatype, "shape": t.shape});
            if binary_out(&t.name) {
                let start = binary.len();
                encode_binary(&t.data, &mut binary);
                o["parameters"] = json!({"binary_data_size": binary.len() - start});
            } else {
                o["data"] = data_json(&t.data);
            }
            o
        })
        .collect();
    let mut out = json!({"model_name": resp.model, "model_version": "1", "outputs": outputs});
    if let Some(id) = resp.id {
        out["id"] = json!(id);
    }
    let head = serde_json::to_vec(&out).expect("JSON");
    if binary.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], head).into_response());
    }
    let len = head.len();
    let mut body = head;
    body.extend_from_slice(&binary);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                len.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

async fn repository_index(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = state
        .cache
        .status()
        .into_iter()
        .map(|m| {
            let (st, reason) = repo_state(&m);
            json!({"name": m.id, "version": "1", "state": st, "reason": reason})
        })
        .collect();
    Json(json!(models))
}

/// A cache state in the repository extension's words.
pub fn repo_state(m: &crate::cache::CopyStatus) -> (&'static str, String) {
    match m.state {
        "ready" => ("READY", String::new()),
        "loading" => ("LOADING", String::new()),
        "failed" => ("UNAVAILABLE", m.error.clone().unwrap_or_default()),
        _ => ("UNAVAILABLE", "unloaded".into()),
    }
}

async fn repository_load(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    state.cache.load(&m).await?;
    Ok(Json(json!({})))
}

async fn repository_unload(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    state.cache.unload(&m)?;
    Ok(Json(json!({})))
}

/// The generate extension: `{"text_input": "...", "parameters": {...}}`.
fn parse_generate(body: &[u8]) -> Result<(String, BTreeMap<String, Value>), V2Error> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| V2Error::BadRequest(format!("request body is not valid JSON: {e}")))?;
    let text = v
        .get("text_input")
        .and_then(Value::as_str)
        .ok_or_else(|| V2Error::BadRequest("missing \"text_input\" (a string)".into()))?;
    let mut params: BTreeMap<String, Value> = v
        .get("parameters")
        .and_then(Value::as_object)
        .map(|m| m.clone().into_iter().collect())
        .unwrap_or_default();
    // Parameters may also sit at the top level, as Triton's generate endpoint allows.
    for k in [
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
    ] {
        if let Some(x) = v.get(k) {
            params.insert(k.to_string(), x.clone());
        }
    }
    Ok((text.to_string(), params))
}

/// Everything a generate call needs before it runs: the request, the caller's admission and
/// execution slot (held until the end), its bill, and a lease on an LLM copy.
struct Prepared {
    gen: flatmesh_runtime::GenerateRequest,
    held: crate::api::usage::Held,
    bill: crate::api::usage::Bill,
    lease: crate::cache::Lease,
}

async fn prepare(
    state: &AppState,
    caller: &Caller,
    model: &str,
    body: &[u8],
) -> Result<Prepared, V2Error> {
    let (text, params) = parse_generate(body)?;
    let gen = generate_request(text, &params)?;
    let info = crate::api::usage::request_info(
        &format!("gen-{}", uuid::Uuid::new_v4().simple()),
        caller,
        model,
        "v2_generate",
        Some(&gen.prompt),
        gen.max_tokens.map(|n| n as u32),
        false,
    );
    let (held, bill) = crate::api::usage::admit(state, caller, "v2_generate", info).await?;
    let lease = state
        .cache
        .acquire_for(model, None, caller.tier.residency_bonus.0)
        .await?;
    require_llm(lease.engine.as_ref(), model)?;
    Ok(Prepared {
        gen,
        held,
        bill,
        lease,
    })
}

async fn generate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(m): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, V2Error> {
    let Prepared {
        gen,
        held: _held,
        bill,
        lease,
    } = prepare(&state, &caller, &m, &body).await?;
    let engine = lease.engine.clone();
    let g = tokio::task::spawn_blocking(move || {
        engine.generate(&gen, &mut |_| std::ops::ControlFlow::Continue(()))
    })
    .await
    .map_err(|e| V2Error::Internal(e.to_string()))??;
    let id = format!("gen-{}", uuid::Uuid::new_v4().simple());
    bill.record(&id, &lease.model, g.prompt_tokens, g.completion_tokens)
        .await?;
    Ok(Json(
        json!({"id": id, "model_name": lease.model, "model_version": "1", "text_output": g.text}),
    ))
}

async fn generate_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(m): Path<String>,
    body: Bytes,
) -> Result<Response, V2Error> {
    let Prepared {
        gen,
        held,
        bill,
        lease,
    } = prepare(&state, &caller, &m, &body).await?;
    let model = lease.model.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::task::spawn_blocking(move || {
        let engine = lease.engine.clone();
        let result = engine.generate(&gen, &mut |ev| {
            if let flatmesh_runtime::GenerateEvent::Text(t) = ev {
                let data = json!({"model_name": model, "model_version": "1", "text_output": t});
                if tx
                    .blocking_send(Ok(Event::default().data(data.to_string())))
                    .is_err()
                {
                    return std::ops::ControlFlow::Break(());
                }
            }
            std::ops::ControlFlow::Continue(())
        });
        let outcome = result.map_err(|e| e.to_string()).and_then(|g| {
            // The record is durable before the stream ends.
            let id = format!("gen-{}", uuid::Uuid::new_v4().simple());
            tokio::runtime::Handle::current()
                .block_on(bill.record(&id, &model, g.prompt_tokens, g.completion_tokens))
                .map_err(|e| e.message)
        });
        if let Err(e) = outcome {
            let _ = tx.blocking_send(Ok(Event::default().data(json!({"error": e}).to_string())));
        }
        drop((lease, held));
    });
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}
