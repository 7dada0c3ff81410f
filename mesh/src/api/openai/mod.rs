//! The OpenAI-compatible API: `/v1/models`, chat and text completions, embeddings.

mod completions;
mod generate;
mod types;

use axum::{
    extract::{Extension, State},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use base64::Engine as _;
use flatmesh_runtime::ModelKind;
use serde_json::{json, Value};

use self::{generate::Tracker, types::EmbeddingRequest};
use super::{
    auth,
    error::{ApiError, ApiJson},
    usage::{admit, request_info},
    AppState,
};
use crate::tenancy::Caller;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/usage", get(own_usage))
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let model = |id: &str, extra: Value| {
        let mut m = json!({"id": id, "object": "model", "created": 0, "owned_by": "flatmesh"});
        m.as_object_mut()
            .expect("object")
            .extend(extra.as_object().cloned().unwrap_or_default());
        m
    };
    let mut data: Vec<Value> = state
        .cache
        .status()
        .into_iter()
        .map(|m| model(&m.id, json!({"state": m.state, "kind": m.kind})))
        .collect();
    // vmodels are names clients may use too; each says which model serves it.
    data.extend(
        state
            .cache
            .vmodels()
            .into_iter()
            .map(|v| model(&v.name, json!({"target": v.target}))),
    );
    Json(json!({"object": "list", "data": data}))
}

async fn embeddings(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<ApiJson<EmbeddingRequest>, ApiError>,
) -> Response {
    let model = match &body {
        Ok(ApiJson(r)) => state.model_label(&r.model),
        Err(_) => "unknown".to_string(),
    };
    let tracker = Tracker::new(&state.metrics, model, "embeddings");
    match embed(&state, &caller, body).await {
        Ok((v, tokens)) => {
            tracker.tokens(tokens, 0);
            tracker.finish(200);
            Json(v).into_response()
        }
        Err(e) => {
            tracker.finish(e.status.as_u16());
            e.into_response()
        }
    }
}

async fn embed(
    state: &AppState,
    caller: &Caller,
    body: Result<ApiJson<EmbeddingRequest>, ApiError>,
) -> Result<(Value, usize), ApiError> {
    let ApiJson(req) = body?;
    auth::check(state, caller, &req.model)?;
    let id = format!("emb-{}", uuid::Uuid::new_v4().simple());
    let info = request_info(&id, caller, &req.model, "embeddings", None, None, false);
    let (_held, bill) = admit(state, caller, "embeddings", info).await?;
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
    let loaded = state
        .cache
        .acquire_for(&req.model, req.keep_alive, caller.tier.residency_bonus.0)
        .await?;
    let model = loaded.model.clone();
    let info = loaded.engine.info();
    if info.kind != ModelKind::Embedding {
        return Err(ApiError::bad_request(
            "model",
            format!("{:?} is not an embedding model", req.model),
        ));
    }
    if let Some(d) = req
        .dimensions
        .filter(|&d| Some(d as usize) != info.embedding_dims)
    {
        return Err(ApiError::bad_request(
            "dimensions",
            format!(
                "{d} is not supported; this model has {:?}",
                info.embedding_dims.unwrap_or(0)
            ),
        ));
    }
    let out = tokio::task::spawn_blocking(move || loaded.engine.embed(&inputs))
        .await
        .map_err(|e| ApiError::internal(format!("embedding task failed: {e}")))??;
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
    bill.record(&id, &model, out.prompt_tokens, 0).await?;
    let usage = json!({"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens});
    Ok((
        json!({"id": id, "object": "list", "data": data, "model": model, "usage": usage}),
        out.prompt_tokens,
    ))
}

/// A tenant's own usage (never anybody else's), `?from=&to=` in Unix seconds.
async fn own_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    axum::extract::Query(p): axum::extract::Query<super::admin::Period>,
) -> Result<Json<Value>, ApiError> {
    let recs = super::admin::records(&state, Some(&caller.tenant), &p)?;
    Ok(Json(
        json!({"tenant": caller.tenant, "tier": caller.tier.name, "usage": crate::ledger::usage(&recs)}),
    ))
}
