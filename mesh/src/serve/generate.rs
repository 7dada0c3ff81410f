//! A generation in flight: the engine on the blocking pool, its text forwarded to the front
//! door, and at its end the usage record, the charge and the response cache.

use std::{
    ops::ControlFlow,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use flatmesh_runtime::{Engine, FinishReason, GenerateEvent, GenerateRequest, Generation};
use tokio::sync::mpsc;

use super::{
    bill::Bill,
    error::{ErrorKind, ServeError},
    held::Held,
    track::Tracker,
};
use crate::policy::{self, CachePrompt};

/// What a generation reports to its front door.
#[derive(Debug)]
pub enum Event {
    /// New text.
    Text(String),
    /// The end: the generation (recorded) or why it failed.
    Done(Result<Generation, ServeError>),
}

/// The stream of a generation's events. Dropping it cancels the generation at its next token
/// and frees its lease and execution slot.
pub struct Generating {
    events: mpsc::Receiver<Event>,
}

impl Generating {
    /// The next event; `None` after `Done`.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, or `None` as soon as `to` (where a front door sends the events on)
    /// closes: a client that leaves is noticed at once, not at the next token.
    pub async fn next_for<T>(&mut self, to: &mpsc::Sender<T>) -> Option<Event> {
        tokio::select! {
            ev = self.events.recv() => ev,
            _ = to.closed() => None,
        }
    }

    /// Wait for the whole generation.
    pub async fn collect(mut self) -> Result<Generation, ServeError> {
        while let Some(ev) = self.events.recv().await {
            if let Event::Done(r) = ev {
                return r;
            }
        }
        Err(ServeError::internal(
            "the generation ended without a result",
        ))
    }

    /// The events another task sends (a generation relayed from a peer).
    pub(super) fn from_events(events: mpsc::Receiver<Event>) -> Self {
        Generating { events }
    }

    /// A generation that is already complete (an answer from the response cache).
    pub fn ready(g: Generation) -> Self {
        let (tx, events) = mpsc::channel(2);
        let _ = tx.try_send(Event::Text(g.text.clone()));
        let _ = tx.try_send(Event::Done(Ok(g)));
        Generating { events }
    }
}

/// What happens after the engine has finished.
pub struct Finish {
    pub bill: Bill,
    pub tracker: Tracker,
    pub model: String,
    /// Offer the answer to the response cache.
    pub remember: Option<CachePrompt>,
    /// The longest the engine may run.
    pub limit: Duration,
}

/// Start generating on `engine`. Returns once the prompt is prefilled, so prompt errors (too
/// long, bad template) come back as errors rather than as a broken stream.
pub async fn start(
    engine: Arc<dyn Engine>,
    gen: GenerateRequest,
    held: Held,
    finish: Finish,
) -> Result<Generating, (ServeError, Finish)> {
    let (tx, mut from_engine) = mpsc::channel(64);
    let deadline = Instant::now() + finish.limit;
    let overran = Arc::new(AtomicBool::new(false));
    let flag = overran.clone();
    // `held` lives with the engine: lease, slot and admission go back when the engine returns,
    // never while it still computes (a client that leaves mid-prefill included).
    let task = tokio::task::spawn_blocking(move || {
        let r = engine.generate(&gen, &mut |ev| {
            if Instant::now() >= deadline {
                flag.store(true, Ordering::Relaxed);
                return ControlFlow::Break(());
            }
            match tx.blocking_send(ev) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        (r, held)
    });
    let timeout = |limit: Duration| {
        ServeError::new(
            ErrorKind::Timeout,
            "request_timeout",
            format!("the request ran past its limit of {limit:?}"),
        )
    };
    match from_engine.recv().await {
        Some(GenerateEvent::Started { .. }) => {}
        _ => {
            let e = match task.await {
                Err(e) => ServeError::internal(format!("generation task failed: {e}")),
                Ok((r, held)) => {
                    let e = match r {
                        Err(e) => ServeError::from(e),
                        Ok(_) if overran.load(Ordering::Relaxed) => timeout(finish.limit),
                        Ok(_) => ServeError::internal("generation ended before it started"),
                    };
                    if e.is_client_error() {
                        held.refund();
                    }
                    e
                }
            };
            return Err((e, finish));
        }
    }
    let (to_client, events) = mpsc::channel(64);
    let span = finish.tracker.span().clone();
    let relay = async move {
        let Finish {
            bill,
            mut tracker,
            model,
            remember,
            limit,
        } = finish;
        // Until the engine ends, the client leaves, or the time is up (a client that stops
        // reading must not hold the slot): dropping the receiver stops the engine at its next
        // token.
        let until = tokio::time::Instant::from_std(deadline);
        loop {
            let ev = tokio::select! {
                ev = from_engine.recv() => ev,
                _ = to_client.closed() => break,
                _ = tokio::time::sleep_until(until) => {
                    overran.store(true, Ordering::Relaxed);
                    break;
                }
            };
            match ev {
                Some(GenerateEvent::Text(t)) => {
                    tracker.first_token();
                    let sent = tokio::select! {
                        r = to_client.send(Event::Text(t)) => r.is_ok(),
                        _ = tokio::time::sleep_until(until) => {
                            overran.store(true, Ordering::Relaxed);
                            false
                        }
                    };
                    if !sent {
                        break;
                    }
                }
                Some(GenerateEvent::Started { .. }) => {}
                None => break,
            }
        }
        drop(from_engine);
        // Lease, slot and admission went back with the engine, before the ledger write.
        let result = match task.await {
            Ok((r, _held)) => r.map_err(ServeError::from),
            Err(e) => Err(ServeError::internal(format!("generation task failed: {e}"))),
        };
        let result = match result {
            Ok(g) => {
                // Whatever the end, the tokens computed are recorded.
                match bill
                    .record(&model, g.prompt_tokens, g.completion_tokens)
                    .await
                {
                    Err(e) => Err(e),
                    Ok(()) if overran.load(Ordering::Relaxed) => Err(timeout(limit)),
                    Ok(()) => {
                        tracker.tokens(g.prompt_tokens, g.completion_tokens);
                        if g.finish_reason != FinishReason::Cancelled {
                            if let Some(cp) = &remember {
                                offer(&bill.policies, cp, &g).await;
                            }
                        }
                        Ok(g)
                    }
                }
            }
            Err(e) => Err(e),
        };
        let status = match &result {
            Ok(g) if g.finish_reason == FinishReason::Cancelled => 499,
            Ok(_) => 200,
            Err(e) => e.http_status(),
        };
        if let Ok(g) = &result {
            crate::telemetry::attr(
                tracker.span(),
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(
                    vec![opentelemetry::StringValue::from(finish_reason(
                        g.finish_reason,
                    ))]
                    .into(),
                ),
            );
            tracing::info!(
                gen_ai.usage.input_tokens = g.prompt_tokens,
                gen_ai.usage.output_tokens = g.completion_tokens,
                finish_reason = ?g.finish_reason,
                seconds = tracker.elapsed(),
                "Generated"
            );
        }
        if to_client.send(Event::Done(result)).await.is_ok() {
            tracker.finish(status);
        }
    };
    tokio::spawn(tracing::Instrument::instrument(relay, span));
    Ok(Generating { events })
}

/// The words OpenAI and the cache use for a finish reason.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Offer a finished generation to the response cache.
pub(super) async fn offer(policies: &policy::Policies, cp: &CachePrompt, g: &Generation) {
    let answer = policy::Answer {
        text: g.text.clone(),
        finish_reason: finish_reason(g.finish_reason).to_string(),
        completion_tokens: u32::try_from(g.completion_tokens).unwrap_or(u32::MAX),
    };
    policies.store(cp, &answer).await;
}
