//! The OpenAI-compatible API: `/v1/models`, chat and text completions, embeddings. A codec
//! over the serve path: parse and validate, run, encode.

mod completions;
pub(crate) mod format;
mod logprobs;
mod tools;
mod types;

use axum::{
    extract::{Extension, State},
    routing::{get, post},
    Json, Router,
};
use base64::Engine as _;
use serde_json::{json, Value};

use self::types::EmbeddingRequest;
use super::{
    deadline::Deadline,
    error::{ApiError, ApiJson},
    AppState,
};
use crate::{
    serve::{Endpoint, Output, Request, Work},
    tenancy::{Caller, Tenancy},
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/usage", get(own_usage))
}

/// The models and vmodels the caller's tier may use.
async fn list_models(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let model = |id: &str, extra: Value| {
        let mut m = json!({"id": id, "object": "model", "created": 0, "owned_by": "flatmesh"});
        m.as_object_mut()
            .expect("object")
            .extend(extra.as_object().cloned().unwrap_or_default());
        m
    };
    let allowed = |id: &str| Tenancy::check_model(&caller, id).is_ok();
    let mut data: Vec<Value> = state
        .serve
        .cache
        .status()
        .into_iter()
        .filter(|m| allowed(&m.id))
        .map(|m| model(&m.id, json!({"state": m.state, "kind": m.kind})))
        .collect();
    // vmodels are names clients may use too; each says which model serves it.
    data.extend(
        state
            .serve
            .cache
            .vmodels()
            .into_iter()
            .filter(|v| allowed(&v.target))
            .map(|v| model(&v.name, json!({"target": v.target}))),
    );
    Json(json!({"object": "list", "data": data}))
}

async fn embeddings(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    body: Result<ApiJson<EmbeddingRequest>, ApiError>,
) -> Result<axum::response::Response, ApiError> {
    let parsed = body.and_then(|ApiJson(req)| {
        let inputs = req.inputs()?;
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "encoding_format",
                    format!("{other:?} is not \"float\" or \"base64\""),
                ))
            }
        };
        Ok((req, inputs, base64))
    });
    let (req, inputs, base64) = parsed.inspect_err(|e| {
        state.serve.refused(Endpoint::Embeddings, e.status.as_u16());
    })?;
    let served = state
        .serve
        .run(Request {
            caller,
            model: req.model.clone(),
            endpoint: Endpoint::Embeddings,
            work: Work::Embed {
                inputs,
                dimensions: req.dimensions,
            },
            keep_alive: req.keep_alive,
            client_id: None,
            stream: false,
            forwarded: None,
            deadline: deadline.0,
        })
        .await?;
    let Output::Embeddings(out) = served.output else {
        return Err(ApiError::internal(
            "an embedding request produced text".into(),
        ));
    };
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let usage = json!({"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens});
    let mut resp = axum::response::IntoResponse::into_response(Json(
        json!({"id": served.id, "object": "list", "data": data, "model": served.model, "usage": usage}),
    ));
    super::forward::served_by(&mut resp, served.node);
    Ok(resp)
}

/// A tenant's own usage (never anybody else's), `?from=&to=` in Unix seconds; in a mesh,
/// every live node's records of it, as `/admin/usage` gathers them (with the nodes that
/// could not be reached named).
async fn own_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    axum::extract::Query(p): axum::extract::Query<super::mesh_ledger::Period>,
) -> Result<Json<Value>, ApiError> {
    let got = super::mesh_ledger::gather(&state, Some(&caller.tenant), &p).await?;
    let mut answer = json!({"tenant": caller.tenant, "tier": caller.tier.name, "usage": got.usage});
    if state.cluster.is_some() {
        answer["mesh"] = got.describe();
    }
    Ok(Json(answer))
}
