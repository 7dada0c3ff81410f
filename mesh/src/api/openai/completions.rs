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
use flatmesh_runtime::{
    constrain::Grammar, Choice, FinishReason, GenerateRequest, Generation, Prompt, SamplingParams,
    TextDelta,
};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    format, logprobs,
    tools::{self, Tools},
    types::{ChatRequest, Common, CompletionRequest, Usage},
};
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

    /// One choice's new text (and its tokens' logprobs), or its end.
    fn chunk(self, head: &Head, delta: &TextDelta, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(finish_reason);
        let i = delta.choice;
        let logprobs = match (head.logprobs, self) {
            (false, _) => Value::Null,
            (true, Shape::Chat) => logprobs::chat(&delta.logprobs),
            (true, Shape::Completion) => {
                let mut offsets = head.offsets.lock().unwrap_or_else(|e| e.into_inner());
                logprobs::completion(&delta.logprobs, &mut offsets[i])
            }
        };
        let choice = match self {
            Shape::Chat => {
                let delta = match finish {
                    None => json!({"role": "assistant", "content": delta.text}),
                    Some(_) => json!({}),
                };
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Shape::Completion => {
                json!({"index": i, "text": delta.text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let object = match self {
            Shape::Chat => "chat.completion.chunk",
            Shape::Completion => "text_completion",
        };
        json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [choice]})
    }

    /// What ends a stream: a chunk with each choice's finish reason, and the usage if asked.
    fn tail(self, head: &Head, g: &Generation, include_usage: bool) -> Vec<Value> {
        let mut tail: Vec<Value> = choices(g)
            .into_iter()
            .enumerate()
            .map(|(choice, c)| {
                let end = TextDelta {
                    choice,
                    ..Default::default()
                };
                let mut v = self.chunk(head, &end, Some(c.finish_reason));
                v["choices"][0]["logprobs"] = Value::Null;
                v
            })
            .collect();
        if include_usage {
            let mut u = self.chunk(head, &TextDelta::default(), None);
            u["choices"] = json!([]);
            u["usage"] = json!(Usage::new(g));
            tail.push(u);
        }
        tail
    }

    fn full(self, head: &Head, g: &Generation) -> Value {
        let object = match self {
            Shape::Chat => "chat.completion",
            Shape::Completion => "text_completion",
        };
        let choices: Vec<Value> = choices(g)
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let finish = finish_reason(c.finish_reason);
                let lp = c.logprobs.as_deref().filter(|_| head.logprobs);
                match self {
                    Shape::Chat => {
                        let logprobs = lp.map_or(Value::Null, logprobs::chat);
                        json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs, "finish_reason": finish})
                    }
                    Shape::Completion => {
                        let logprobs = lp.map_or(Value::Null, |l| logprobs::completion(l, &mut 0));
                        json!({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": finish})
                    }
                }
            })
            .collect();
        json!({
            "id": head.id, "object": object, "created": head.created, "model": head.model,
            "choices": choices, "usage": Usage::new(g),
        })
    }
}

/// Every choice of a generation, choice 0 first.
fn choices(g: &Generation) -> Vec<Choice> {
    let first = Choice {
        text: g.text.clone(),
        finish_reason: g.finish_reason,
        completion_tokens: 0,
        logprobs: g.logprobs.clone(),
    };
    std::iter::once(first)
        .chain(g.others.iter().cloned())
        .collect()
}

/// What every response and chunk of one request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
    /// Whether the client asked for logprobs.
    logprobs: bool,
    /// Where each choice's next token starts in its text (completions' `text_offset`).
    offsets: std::sync::Mutex<Vec<usize>>,
    /// The tools offered, whose calls are parsed out of the answer.
    tools: Option<Tools>,
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
        let mut messages = r.messages()?;
        let (grammar, tools) = tools::apply(&v, &mut messages, format::response_format(&v)?)?;
        let asked = Asked {
            max_tokens,
            logprobs: r.top_logprobs()?,
            grammar,
            tools,
        };
        Ok((Prompt::Chat(messages), asked, common))
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
        let asked = Asked {
            max_tokens: common.max_tokens,
            logprobs: r.logprobs(common.n()?)?,
            grammar: format::response_format(&v)?,
            tools: None,
        };
        tools::refuse(&v)?;
        Ok((Prompt::Text(r.prompt()?), asked, common))
    });
    run(state, (caller, deadline), Shape::Completion, req).await
}

/// What the two shapes ask for in fields of their own.
struct Asked {
    max_tokens: Option<u32>,
    /// Alternatives to report beside each token, when logprobs are asked for.
    logprobs: Option<usize>,
    /// What the answer must be (`response_format`); `None`: free text.
    grammar: Option<Grammar>,
    /// Tools whose calls are parsed out of the answer.
    tools: Option<Tools>,
}

/// A validated request on the serve path.
fn request(
    (caller, deadline): (Caller, Deadline),
    shape: Shape,
    prompt: Prompt,
    asked: &Asked,
    common: &Common,
) -> Result<Request, ApiError> {
    let gen = GenerateRequest {
        prompt,
        max_tokens: asked.max_tokens.map(|n| n as usize),
        sampling: SamplingParams {
            grammar: asked.grammar.clone(),
            ..common.sampling()?
        },
        stop: common.stop(),
        n: common.n()?,
        logprobs: asked.logprobs,
    };
    check::generate(&gen, &check::plain)?;
    if gen.sampling.ignore_eos && gen.sampling.grammar.is_some() {
        return Err(ApiError::bad_request(
            "ignore_eos",
            "cannot be combined with a JSON response_format (the JSON ends the answer)",
        ));
    }
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
    req: Result<(Prompt, Asked, Common), ApiError>,
) -> Response {
    let parsed = req.and_then(|(prompt, asked, common)| {
        let r = request(client, shape, prompt, &asked, &common)?;
        Ok((r, asked, common))
    });
    let (r, asked, common) = match parsed {
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
        logprobs: asked.logprobs.is_some(),
        offsets: std::sync::Mutex::new(vec![0; common.n().unwrap_or(1)]),
        tools: asked.tools,
    };
    let mut response = if common.stream {
        stream(shape, head, generating, common.include_usage())
    } else {
        match generating.collect().await {
            Ok(g) => {
                let mut v = shape.full(&head, &g);
                if let Some(t) = &head.tools {
                    t.answer(&mut v, &head.id);
                }
                Json(v).into_response()
            }
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

/// The end of a stream that offered tools: each choice's calls as one delta (or its text as
/// content), then the finish reasons (`tool_calls` where there were calls) and the usage.
fn tool_tail(shape: Shape, head: &Head, g: &Generation, usage: bool, tools: &Tools) -> Vec<Value> {
    let mut tail = shape.tail(head, g, usage);
    let mut out = Vec::new();
    for (i, c) in choices(g).into_iter().enumerate() {
        let delta = TextDelta {
            choice: i,
            text: c.text.clone(),
            ..Default::default()
        };
        let mut v = shape.chunk(head, &delta, None);
        if let Some(calls) = tools.calls(&c.text) {
            let calls = tools::to_openai(&calls, &head.id, true);
            v["choices"][0]["delta"] =
                json!({"role": "assistant", "content": null, "tool_calls": calls});
            tail[i]["choices"][0]["finish_reason"] = json!("tool_calls");
        }
        out.push(v);
    }
    out.extend(tail);
    out
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
    let n = head.offsets.lock().map_or(1, |o| o.len());
    tokio::spawn(async move {
        while let Some(ev) = generating.next_for(&tx).await {
            let chunks = match ev {
                serve::Event::Text(t) if t.choice >= n => continue,
                // With tools the text is held back until it is known to be a call or not.
                serve::Event::Text(_) if head.tools.is_some() => continue,
                serve::Event::Text(t) => vec![shape.chunk(&head, &t, None)],
                serve::Event::Done(Ok(g)) => match &head.tools {
                    Some(tools) => tool_tail(shape, &head, &g, include_usage, tools),
                    None => shape.tail(&head, &g, include_usage),
                },
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
