//! The OpenAI-compatible API: `/v1/models`, chat and text completions, embeddings.

mod generate;
mod types;

use std::{
    convert::Infallible,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Extension, State},
    response::{sse::Event, IntoResponse, Response, Sse},
    routing::{get, post},
    Json, Router,
};
use base64::Engine as _;
use flatmesh_runtime::{
    FinishReason, GenerateEvent, GenerateRequest, Generation, ModelKind, Prompt,
};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::usage::{admit, Bill};
use crate::tenancy::Caller;

use self::{
    generate::{Running, Tracker},
    types::{ChatRequest, Common, CompletionRequest, EmbeddingRequest, Usage},
};
use super::{
    auth,
    error::{parse, ApiError, ApiJson},
    AppState,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
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

/// The two response shapes that share one generation path.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

impl Shape {
    fn endpoint(self) -> &'static str {
        match self {
            Shape::Chat => "chat_completions",
            Shape::Completion => "completions",
        }
    }

    fn chunk(self, head: &Head, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(finish_reason);
        let choice = match self {
            Shape::Chat => {
                let delta = match text {
                    Some(t) => json!({"role": "assistant", "content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Shape::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let object = match self {
            Shape::Chat => "chat.completion.chunk",
            Shape::Completion => "text_completion",
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [choice]})
    }

    fn full(self, head: &Head, g: &Generation) -> Value {
        let finish = finish_reason(g.finish_reason);
        let (object, choice) = match self {
            Shape::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": null, "finish_reason": finish}),
            ),
            Shape::Completion => (
                "text_completion",
                json!({"index": 0, "text": g.text, "logprobs": null, "finish_reason": finish}),
            ),
        };
        json!({
            "id": head.id, "object": object, "created": head.created, "model": head.model,
            "choices": [choice], "usage": Usage::new(g.prompt_tokens, g.completion_tokens),
        })
    }
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// What every response and chunk of one request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
}

impl Head {
    fn new(prefix: &str, model: &str) -> Self {
        Head {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
        }
    }
}

async fn chat(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let req = body.and_then(|ApiJson(v)| {
        let common: Common = parse(&v)?;
        let r: ChatRequest = parse(&v)?;
        let max_tokens = r.max_completion_tokens.or(common.max_tokens);
        Ok((Prompt::Chat(r.messages()?), max_tokens, common))
    });
    run(state, caller, Shape::Chat, req).await
}

async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let req = body.and_then(|ApiJson(v)| {
        let common: Common = parse(&v)?;
        let r: CompletionRequest = parse(&v)?;
        Ok((Prompt::Text(r.prompt()?), common.max_tokens, common))
    });
    run(state, caller, Shape::Completion, req).await
}

async fn run(
    state: AppState,
    caller: Caller,
    shape: Shape,
    req: Result<(Prompt, Option<u32>, Common), ApiError>,
) -> Response {
    let model = match &req {
        Ok((_, _, c)) => state.model_label(&c.model),
        Err(_) => "unknown".to_string(),
    };
    let tracker = Tracker::new(&state.metrics, model.clone(), shape.endpoint());
    let span = tracing::info_span!("generate", otel.kind = "server", gen_ai.request.model = %model, endpoint = shape.endpoint());
    let result = async {
        let (prompt, max_tokens, common) = req?;
        auth::check(&state, &caller, &common.model)?;
        let (held, bill) = admit(&state, &caller, shape.endpoint()).await?;
        let gen = GenerateRequest {
            prompt,
            max_tokens: max_tokens.map(|n| n as usize),
            sampling: common.sampling()?,
            stop: common.stop()?,
        };
        let mut running = Running::start(
            &state.cache,
            &common.model,
            common.keep_alive,
            caller.tier.residency_bonus.0,
            gen,
        )
        .await?;
        running.hold(held);
        Ok::<_, ApiError>((running, common, bill))
    }
    .instrument(span.clone())
    .await;
    let (running, common, bill) = match result {
        Ok(r) => r,
        Err(e) => {
            tracker.finish(e.status.as_u16());
            return e.into_response();
        }
    };
    let head = Head::new(
        match shape {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
        },
        &running.model,
    );
    if common.stream {
        stream(
            shape,
            head,
            running,
            tracker,
            bill,
            common.include_usage(),
            span,
        )
    } else {
        whole(shape, head, running, tracker, bill)
            .instrument(span)
            .await
    }
}

async fn whole(
    shape: Shape,
    head: Head,
    mut running: Running,
    mut tracker: Tracker,
    bill: Bill,
) -> Response {
    while let Some(ev) = running.events.recv().await {
        if let GenerateEvent::Text(_) = ev {
            tracker.first_token();
        }
    }
    match running.finish().await {
        Ok(g) => {
            completed(&tracker, &g);
            if let Err(e) = bill
                .record(&head.id, &head.model, g.prompt_tokens, g.completion_tokens)
                .await
            {
                tracker.finish(e.status.as_u16());
                return e.into_response();
            }
            tracker.finish(200);
            Json(shape.full(&head, &g)).into_response()
        }
        Err(e) => {
            tracker.finish(e.status.as_u16());
            e.into_response()
        }
    }
}

/// Server-sent events, one chunk per text delta, ending with `data: [DONE]`.
fn stream(
    shape: Shape,
    head: Head,
    mut running: Running,
    mut tracker: Tracker,
    bill: Bill,
    include_usage: bool,
    span: tracing::Span,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let send = |v: Value| Ok(Event::default().data(v.to_string()));
    tokio::spawn(
        async move {
            while let Some(ev) = running.events.recv().await {
                if let GenerateEvent::Text(t) = ev {
                    tracker.first_token();
                    if tx
                        .send(send(shape.chunk(&head, Some(&t), None)))
                        .await
                        .is_err()
                    {
                        return; // Client gone: dropping `running` cancels the generation.
                    }
                }
            }
            let tail = match running.finish().await {
                Ok(g) => {
                    completed(&tracker, &g);
                    if let Err(e) = bill.record(&head.id, &head.model, g.prompt_tokens, g.completion_tokens).await {
                        let _ = tx.send(send(json!({"error": {"message": e.message, "type": e.kind, "code": e.code}}))).await;
                        return;
                    }
                    let mut tail = vec![shape.chunk(&head, None, Some(g.finish_reason))];
                    if include_usage {
                        let mut u = shape.chunk(&head, None, None);
                        u["choices"] = json!([]);
                        u["usage"] = json!(Usage::new(g.prompt_tokens, g.completion_tokens));
                        tail.push(u);
                    }
                    tail
                }
                Err(e) => {
                    vec![json!({"error": {"message": e.message, "type": e.kind, "code": e.code}})]
                }
            };
            for v in tail {
                let _ = tx.send(send(v)).await;
            }
            if tx.send(Ok(Event::default().data("[DONE]"))).await.is_ok() {
                tracker.finish(200);
            }
        }
        .instrument(span),
    );
    Sse::new(ReceiverStream::new(rx)).into_response()
}

fn completed(tracker: &Tracker, g: &Generation) {
    tracker.tokens(g.prompt_tokens, g.completion_tokens);
    tracing::info!(
        gen_ai.usage.input_tokens = g.prompt_tokens,
        gen_ai.usage.output_tokens = g.completion_tokens,
        gen_ai.response.finish_reasons = finish_reason(g.finish_reason),
        seconds = tracker.elapsed(),
        "Generated"
    );
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
    let (_held, bill) = admit(state, caller, "embeddings").await?;
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
    let id = format!("emb-{}", uuid::Uuid::new_v4().simple());
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
