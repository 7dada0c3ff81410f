//! Chat and text completions: one generation path from request to response (routing,
//! admission, the response cache, the engine, the usage record), whole or streamed.

use std::{
    convert::Infallible,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Extension, State},
    http::{HeaderValue, StatusCode},
    response::{sse::Event, IntoResponse, Response, Sse},
    Json,
};
use flatmesh_runtime::{
    FinishReason, GenerateEvent, GenerateRequest, Generation, ModelKind, Prompt,
};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::{
    generate::{Running, Tracker},
    types::{ChatRequest, Common, CompletionRequest, Usage},
};
use crate::{
    api::{
        auth,
        error::{parse, ApiError, ApiJson},
        usage::{admit, request_info, Bill},
        AppState,
    },
    policy::{self, CachePrompt, Policies},
    tenancy::Caller,
};

/// The two response shapes that share one generation path.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

impl Shape {
    fn id_prefix(self) -> &'static str {
        match self {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
        }
    }

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

pub async fn chat(
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

pub async fn completions(
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

/// How a generation request goes on once it is admitted (one per request, briefly).
#[allow(clippy::large_enum_variant)]
enum Started {
    /// The response cache had an answer.
    Hit(Generation, Bill),
    /// The model runs; `remember` offers the answer to the cache once it is made.
    Running(Running, Bill, Option<CachePrompt>),
}

/// The models a tier may use, as candidates for the router.
fn candidates(state: &AppState, caller: &Caller) -> Vec<policy::Candidate> {
    state
        .cache
        .status()
        .into_iter()
        .filter(|m| crate::tenancy::Tenancy::check_model(caller, &m.id).is_ok())
        .map(|m| policy::Candidate {
            kind: match m.kind {
                Some(ModelKind::Llm) => "llm".into(),
                Some(ModelKind::Embedding) => "embedding".into(),
                None => String::new(),
            },
            loaded: m.state == "ready",
            queue_depth: u32::try_from(m.leases).unwrap_or(u32::MAX),
            size_bytes: m.bytes.unwrap_or(0),
            context_length: 0,
            name: m.id,
        })
        .collect()
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
    let id = format!("{}-{}", shape.id_prefix(), uuid::Uuid::new_v4().simple());
    let mut route_header = None;
    let result = async {
        let (prompt, max_tokens, common) = req?;
        let info = request_info(
            &id,
            &caller,
            &common.model,
            shape.endpoint(),
            Some(&prompt),
            max_tokens,
            common.stream,
        );
        let mut targets = vec![common.model.clone()];
        let route = if state.policies.routes() {
            let known = state.cache.contains(&common.model);
            state
                .policies
                .route(&info, candidates(&state, &caller), known)
                .await?
        } else {
            None
        };
        if let Some(route) = route {
            tracing::info!(target = %route.target, reason = %route.reason, "Routed");
            targets = std::iter::once(route.target).chain(route.fallbacks).collect();
            route_header = Some(route.reason);
        }
        auth::check(&state, &caller, &targets[0])?;
        let sampling = common.sampling()?;
        let (held, mut bill) = admit(&state, &caller, shape.endpoint(), info).await?;
        let mut remember = None;
        if state.policies.caches() {
            let cp = CachePrompt {
                request: bill.info.clone(),
                target: targets[0].clone(),
                text: policy::prompt_text(&prompt),
                temperature: sampling.temperature,
                seed: sampling.seed,
            };
            let hit = state.policies.lookup(&cp).await?;
            let result = if hit.is_some() { "hit" } else { "miss" };
            state.metrics.response_cache.with_label_values(&[result]).inc();
            if let Some(answer) = hit {
                bill.cache_hit();
                // The plugin's count is checked against the text (a token is at least one
                // byte, and any text is at least one token); the prompt was not tokenized,
                // so its tokens are the estimate policies saw.
                let completion_tokens = (answer.completion_tokens as usize)
                    .clamp(usize::from(!answer.text.is_empty()), answer.text.len().max(1));
                let g = Generation {
                    prompt_tokens: cp.request.prompt_tokens as usize,
                    completion_tokens,
                    finish_reason: match answer.finish_reason.as_str() {
                        "length" => FinishReason::Length,
                        _ => FinishReason::Stop,
                    },
                    text: answer.text,
                };
                return Ok((Started::Hit(g, bill), common, targets.swap_remove(0)));
            }
            remember = Some(cp);
        }
        let gen = GenerateRequest {
            prompt,
            max_tokens: max_tokens.map(|n| n as usize),
            sampling,
            stop: common.stop()?,
        };
        // The router's fallbacks are tried in turn while a model cannot be loaded.
        let mut targets = targets.into_iter().peekable();
        let mut running = loop {
            let target = targets.next().expect("at least one target");
            let started = Running::start(
                &state.cache,
                &target,
                common.keep_alive,
                caller.tier.residency_bonus.0,
                gen.clone(),
            )
            .await;
            match started {
                Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE && targets.peek().is_some() => {
                    tracing::warn!(%target, error = %e.message, "Trying the router's next fallback");
                }
                other => break other?,
            }
        };
        running.hold(held);
        let served = running.model.clone();
        // A fallback may have served it: its answer belongs to its own namespace.
        if let Some(cp) = &mut remember {
            cp.target = served.clone();
        }
        Ok::<_, ApiError>((Started::Running(running, bill, remember), common, served))
    }
    .instrument(span.clone())
    .await;
    let (started, common, served) = match result {
        Ok(r) => r,
        Err(e) => {
            tracker.finish(e.status.as_u16());
            return e.into_response();
        }
    };
    let head = Head {
        id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: served,
    };
    let cache_header = match &started {
        Started::Hit(..) => Some("hit"),
        Started::Running(_, _, Some(_)) => Some("miss"),
        Started::Running(_, _, None) => None,
    };
    let mut response = match (started, common.stream) {
        (Started::Hit(g, bill), stream) => {
            replay(
                shape,
                head,
                g,
                tracker,
                bill,
                stream,
                common.include_usage(),
            )
            .instrument(span)
            .await
        }
        (Started::Running(running, bill, remember), true) => {
            let remember = remember.map(|cp| (state.policies.clone(), cp));
            let usage = common.include_usage();
            self::stream(shape, head, running, tracker, bill, remember, usage, span)
        }
        (Started::Running(running, bill, remember), false) => {
            let remember = remember.map(|cp| (state.policies.clone(), cp));
            whole(shape, head, running, tracker, bill, remember)
                .instrument(span)
                .await
        }
    };
    let headers = response.headers_mut();
    if let Some(c) = cache_header {
        headers.insert("x-flatmesh-cache", HeaderValue::from_static(c));
    }
    if let Some(v) = route_header.and_then(|r| HeaderValue::from_str(&r).ok()) {
        headers.insert("x-flatmesh-route", v);
    }
    response
}

/// Where a fresh answer goes to be cached.
type Remember = Option<(Policies, CachePrompt)>;

async fn remember(remember: Remember, g: &Generation) {
    if let Some((policies, cp)) = remember {
        let answer = policy::Answer {
            text: g.text.clone(),
            finish_reason: finish_reason(g.finish_reason).to_string(),
            completion_tokens: u32::try_from(g.completion_tokens).unwrap_or(u32::MAX),
        };
        policies.store(&cp, &answer).await;
    }
}

/// An answer from the cache, as a whole response or as a stream of one chunk.
async fn replay(
    shape: Shape,
    head: Head,
    g: Generation,
    mut tracker: Tracker,
    bill: Bill,
    stream: bool,
    include_usage: bool,
) -> Response {
    tracker.first_token();
    if let Err(e) = record(&tracker, &bill, &head, &g).await {
        tracker.finish(e.status.as_u16());
        return e.into_response();
    }
    tracker.finish(200);
    if !stream {
        return Json(shape.full(&head, &g)).into_response();
    }
    let events: Vec<Result<Event, Infallible>> =
        std::iter::once(shape.chunk(&head, Some(&g.text), None))
            .chain(shape.tail(&head, &g, include_usage))
            .map(|v| Ok(Event::default().data(v.to_string())))
            .chain(std::iter::once(Ok(Event::default().data("[DONE]"))))
            .collect();
    Sse::new(futures::stream::iter(events)).into_response()
}

/// Log and count a finished generation and make its usage record durable.
async fn record(
    tracker: &Tracker,
    bill: &Bill,
    head: &Head,
    g: &Generation,
) -> Result<(), ApiError> {
    completed(tracker, g);
    bill.record(&head.id, &head.model, g.prompt_tokens, g.completion_tokens)
        .await
}

/// An error in the middle of a stream, as OpenAI sends it.
fn error_chunk(e: &ApiError) -> Value {
    json!({"error": {"message": e.message, "type": e.kind, "code": e.code}})
}

async fn whole(
    shape: Shape,
    head: Head,
    mut running: Running,
    mut tracker: Tracker,
    bill: Bill,
    cache: Remember,
) -> Response {
    while let Some(ev) = running.events.recv().await {
        if let GenerateEvent::Text(_) = ev {
            tracker.first_token();
        }
    }
    match running.finish().await {
        Ok(g) => {
            if let Err(e) = record(&tracker, &bill, &head, &g).await {
                tracker.finish(e.status.as_u16());
                return e.into_response();
            }
            remember(cache, &g).await;
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
#[allow(clippy::too_many_arguments)]
fn stream(
    shape: Shape,
    head: Head,
    mut running: Running,
    mut tracker: Tracker,
    bill: Bill,
    cache: Remember,
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
                    if let Err(e) = record(&tracker, &bill, &head, &g).await {
                        let _ = tx.send(send(error_chunk(&e))).await;
                        return;
                    }
                    remember(cache, &g).await;
                    shape.tail(&head, &g, include_usage)
                }
                Err(e) => vec![error_chunk(&e)],
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
