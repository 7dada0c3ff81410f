//! Chat and text completions: parse and validate, run on the serve path, and encode the
//! answer whole or as server-sent events.

use std::{
    convert::Infallible,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Extension, State},
    http::HeaderValue,
    response::{sse::Event, IntoResponse, Response, Sse},
    Json,
};
use flatmesh_runtime::{FinishReason, GenerateRequest, Generation, Prompt};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::types::{ChatRequest, Common, CompletionRequest, Usage};
use crate::{
    api::{
        deadline::Deadline,
        error::{parse, ApiError, ApiJson},
        AppState,
    },
    serve::{self, check, finish_reason, Endpoint, Generating, Output, Request, Work},
    tenancy::Caller,
};

/// The two response shapes that share one generation path.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

impl Shape {
    /// An error about the prompt names this shape's field (`messages` or `prompt`).
    fn name_the_prompt(self, mut e: serve::ServeError) -> serve::ServeError {
        if let (Shape::Completion, Some("messages")) = (self, e.param.as_deref()) {
            e.param = Some("prompt".into());
        }
        e
    }

    fn endpoint(self) -> Endpoint {
        match self {
            Shape::Chat => Endpoint::ChatCompletions,
            Shape::Completion => Endpoint::Completions,
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

    /// What ends a stream: the chunk with the finish reason, and the usage if asked for.
    fn tail(self, head: &Head, g: &Generation, include_usage: bool) -> Vec<Value> {
        let mut tail = vec![self.chunk(head, None, Some(g.finish_reason))];
        if include_usage {
            let mut u = self.chunk(head, None, None);
            u["choices"] = json!([]);
            u["usage"] = json!(Usage::new(g.prompt_tokens, g.completion_tokens));
            tail.push(u);
        }
        tail
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

/// What every response and chunk of one request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
}

pub async fn chat(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let req = body.and_then(|ApiJson(v)| {
        let common: Common = parse(&v)?;
        let r: ChatRequest = parse(&v)?;
        if r.max_completion_tokens == Some(0) {
            return Err(ApiError::bad_request(
                "max_completion_tokens",
                "must be at least 1",
            ));
        }
        let max_tokens = r.max_completion_tokens.or(common.max_tokens);
        Ok((Prompt::Chat(r.messages()?), max_tokens, common))
    });
    run(state, (caller, deadline), Shape::Chat, req).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let req = body.and_then(|ApiJson(v)| {
        let common: Common = parse(&v)?;
        let r: CompletionRequest = parse(&v)?;
        Ok((Prompt::Text(r.prompt()?), common.max_tokens, common))
    });
    run(state, (caller, deadline), Shape::Completion, req).await
}

/// A validated request on the serve path.
fn request(
    (caller, deadline): (Caller, Deadline),
    shape: Shape,
    prompt: Prompt,
    max_tokens: Option<u32>,
    common: &Common,
) -> Result<Request, ApiError> {
    let gen = GenerateRequest {
        prompt,
        max_tokens: max_tokens.map(|n| n as usize),
        sampling: common.sampling()?,
        stop: common.stop(),
    };
    check::generate(&gen, &check::plain)?;
    Ok(Request {
        caller,
        model: common.model.clone(),
        endpoint: shape.endpoint(),
        work: Work::Generate(gen),
        keep_alive: common.keep_alive,
        client_id: None,
        stream: common.stream,
        forwarded: None,
        deadline: deadline.0,
    })
}

async fn run(
    state: AppState,
    client: (Caller, Deadline),
    shape: Shape,
    req: Result<(Prompt, Option<u32>, Common), ApiError>,
) -> Response {
    let parsed = req.and_then(|(prompt, max_tokens, common)| {
        Ok((request(client, shape, prompt, max_tokens, &common)?, common))
    });
    let (r, common) = match parsed {
        Ok(p) => p,
        Err(e) => {
            state.serve.refused(shape.endpoint(), e.status.as_u16());
            return e.into_response();
        }
    };
    let served = match state.serve.run(r).await {
        Ok(s) => s,
        Err(e) => return ApiError::from(shape.name_the_prompt(e)).into_response(),
    };
    let Output::Text(generating) = served.output else {
        return ApiError::internal("a generation request produced embeddings".into())
            .into_response();
    };
    let head = Head {
        id: served.id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: served.model,
    };
    let mut response = if common.stream {
        stream(shape, head, generating, common.include_usage())
    } else {
        match generating.collect().await {
            Ok(g) => Json(shape.full(&head, &g)).into_response(),
            Err(e) => ApiError::from(shape.name_the_prompt(e)).into_response(),
        }
    };
    super::super::forward::served_by(&mut response, served.node);
    let headers = response.headers_mut();
    if let Some(c) = served.cache {
        headers.insert("x-flatmesh-cache", HeaderValue::from_static(c));
    }
    if let Some(v) = served.route.and_then(|r| HeaderValue::from_str(&r).ok()) {
        headers.insert("x-flatmesh-route", v);
    }
    response
}

/// An error in the middle of a stream, as OpenAI sends it.
fn error_chunk(e: serve::ServeError) -> Value {
    let e = ApiError::from(e);
    json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
}

/// Server-sent events, one chunk per text delta, ending with `data: [DONE]`. When the client
/// leaves, the stream is dropped, which cancels the generation.
fn stream(shape: Shape, head: Head, mut generating: Generating, include_usage: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let send = |v: Value| Ok(Event::default().data(v.to_string()));
    tokio::spawn(async move {
        while let Some(ev) = generating.next_for(&tx).await {
            let chunks = match ev {
                serve::Event::Text(t) => vec![shape.chunk(&head, Some(&t), None)],
                serve::Event::Done(Ok(g)) => shape.tail(&head, &g, include_usage),
                serve::Event::Done(Err(e)) => vec![error_chunk(e)],
            };
            for v in chunks {
                if tx.send(send(v)).await.is_err() {
                    return; // Client gone: dropping `generating` cancels the generation.
                }
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}
