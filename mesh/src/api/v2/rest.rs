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
use super::{generate_request, infer, infer_request, is_ready, metadata, model_status};
use crate::{
    api::deadline::Deadline,
    api::AppState,
    cache::ModelState,
    serve::{self, Endpoint, Generating, Output, Request, ServeError, Work},
    tenancy::{Caller, Tenancy},
};

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

/// The v2 REST mapping of the serve path's errors: its status, `{"error": message}`, and
/// `Retry-After` / `x-ratelimit-*` where the client should back off.
#[derive(Debug)]
pub struct V2Error(pub ServeError);

impl<E: Into<ServeError>> From<E> for V2Error {
    fn from(e: E) -> Self {
        V2Error(e.into())
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = crate::api::error::http_status(&e);
        let mut resp = (status, Json(json!({"error": e.message}))).into_response();
        crate::api::error::back_off(resp.headers_mut(), e.quotas.as_deref(), e.retry_after);
        resp
    }
}

async fn server_metadata() -> Json<Value> {
    Json(
        json!({"name": "flatmesh", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS}),
    )
}

async fn server_ready(State(state): State<AppState>) -> Response {
    let ready = !state.is_draining()
        && state
            .serve
            .cache
            .status()
            .iter()
            .all(|m| m.state != ModelState::Loading);
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
    deadline: Extension<Deadline>,
    Path(m): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match infer_rest(&state, (caller, deadline.0), &m, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn model_infer_v(
    state: State<AppState>,
    caller: Extension<Caller>,
    deadline: Extension<Deadline>,
    Path((m, _v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    model_infer(state, caller, deadline, Path(m), headers, body).await
}

async fn infer_rest(
    state: &AppState,
    client: (Caller, Deadline),
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
                    ServeError::invalid(format!("header {HEADER_LENGTH} must be a byte count"))
                })?;
            if n > body.len() {
                return Err(V2Error(ServeError::invalid(format!(
                    "{HEADER_LENGTH} {n} is larger than the body ({} bytes)",
                    body.len()
                ))));
            }
            n
        }
        None => body.len(),
    };
    let json: Value = serde_json::from_slice(&body[..header_len])
        .map_err(|e| ServeError::invalid(format!("request body is not valid JSON: {e}")))?;
    let (req, binary_out) = decode_request(&json, &body[header_len..])?;
    let request = infer_request(state, client, model, Endpoint::V2Infer, req)?;
    let started = std::time::Instant::now();
    let result = infer(state, request).await;
    state.v2_stats.record(
        &state.serve.cache.resolve(model).unwrap_or_default(),
        result.is_ok(),
        started.elapsed(),
    );
    let resp = result?;
    let node = resp.node.clone();
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
    let mut resp = if binary.is_empty() {
        ([(header::CONTENT_TYPE, "application/json")], head).into_response()
    } else {
        let len = head.len();
        let mut body = head;
        body.extend_from_slice(&binary);
        (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::HeaderName::from_static(HEADER_LENGTH),
                    len.to_string(),
                ),
            ],
            body,
        )
            .into_response()
    };
    crate::api::forward::served_by(&mut resp, node);
    Ok(resp)
}

/// The models the caller's tier may use, with their states.
async fn repository_index(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let models: Vec<Value> = state
        .serve
        .cache
        .status()
        .into_iter()
        .filter(|m| Tenancy::check_model(&caller, &m.id).is_ok())
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
        ModelState::Ready => ("READY", String::new()),
        ModelState::Loading => ("LOADING", String::new()),
        ModelState::Failed => ("UNAVAILABLE", m.error.clone().unwrap_or_default()),
        ModelState::Cold => ("UNAVAILABLE", "unloaded".into()),
    }
}

async fn repository_load(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    state.serve.cache.load(&m).await?;
    Ok(Json(json!({})))
}

async fn repository_unload(
    State(state): State<AppState>,
    Path(m): Path<String>,
) -> Result<Json<Value>, V2Error> {
    state.serve.cache.unload(&m)?;
    Ok(Json(json!({})))
}

/// The generate extension: `{"text_input": "...", "parameters": {...}}`.
fn parse_generate(body: &[u8]) -> Result<(String, BTreeMap<String, Value>), ServeError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ServeError::invalid(format!("request body is not valid JSON: {e}")))?;
    let text = v
        .get("text_input")
        .and_then(Value::as_str)
        .ok_or_else(|| ServeError::invalid("missing \"text_input\" (a string)"))?;
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

/// A generate request on the serve path, its text streaming back.
async fn start_generate(
    state: &AppState,
    (caller, deadline): (Caller, Deadline),
    model: &str,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(String, String, Generating, Option<String>), V2Error> {
    let (text, params) = parse_generate(body)?;
    let gen = generate_request(text, &params)?;
    let served = state
        .serve
        .run(Request {
            caller,
            model: model.to_string(),
            endpoint,
            work: Work::Generate(gen),
            keep_alive: None,
            client_id: None,
            stream: endpoint == Endpoint::V2GenerateStream,
            forwarded: None,
            deadline: deadline.0,
        })
        .await?;
    match served.output {
        Output::Text(g) => Ok((served.id, served.model, g, served.node)),
        Output::Embeddings(_) => Err(ServeError::internal("generate produced embeddings").into()),
    }
}

async fn generate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    Path(m): Path<String>,
    body: Bytes,
) -> Result<Response, V2Error> {
    let (id, model, generating, node) =
        start_generate(&state, (caller, deadline), &m, Endpoint::V2Generate, &body).await?;
    let g = generating.collect().await?;
    let mut resp =
        Json(json!({"id": id, "model_name": model, "model_version": "1", "text_output": g.text}))
            .into_response();
    crate::api::forward::served_by(&mut resp, node);
    Ok(resp)
}

/// Server-sent events, one per text delta; an error ends the stream as `{"error": ...}`.
/// A client that leaves drops the stream, which cancels the generation.
async fn generate_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    Path(m): Path<String>,
    body: Bytes,
) -> Result<Response, V2Error> {
    let (_, model, mut generating, node) = start_generate(
        &state,
        (caller, deadline),
        &m,
        Endpoint::V2GenerateStream,
        &body,
    )
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        while let Some(ev) = generating.next_for(&tx).await {
            let data = match ev {
                serve::Event::Text(t) => {
                    json!({"model_name": model, "model_version": "1", "text_output": t.text})
                }
                serve::Event::Done(Ok(_)) => break,
                serve::Event::Done(Err(e)) => json!({"error": e.message}),
            };
            if tx
                .send(Ok(Event::default().data(data.to_string())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut resp = Sse::new(ReceiverStream::new(rx)).into_response();
    crate::api::forward::served_by(&mut resp, node);
    Ok(resp)
}
