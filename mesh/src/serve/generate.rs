//! A generation in flight: the engine on the blocking pool, its text forwarded to the front
//! door, and at its end the usage record, the charge and the response cache.

use std::{
    ops::ControlFlow,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use flatmesh_runtime::{
    Engine, FinishReason, GenerateEvent, GenerateRequest, Generation, TextDelta,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    bill::Bill,
    error::ServeError,
    held::Held,
    track::{Outcome, Tracker},
};
use crate::policy::{self, CachePrompt};

/// What a generation reports to its front door.
#[derive(Debug)]
pub enum Event {
    /// New text of one choice (with its tokens' logprobs when asked for).
    Text(TextDelta),
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
        let _ = tx.try_send(Event::Text(g.text.clone().into()));
        let _ = tx.try_send(Event::Done(Ok(g)));
        Generating { events }
    }
}

/// When the engine must stop — the node's `scheduler.max_run`, or the client's deadline where
/// that is nearer — and the error the request gets then.
#[derive(Debug, Clone)]
pub struct Limit {
    pub until: Instant,
    pub error: ServeError,
}

/// What happens after the engine has finished.
pub struct Finish {
    pub bill: Bill,
    pub tracker: Tracker,
    pub model: String,
    /// Offer the answer to the response cache.
    pub remember: Option<CachePrompt>,
    pub limit: Limit,
}

type EngineTask = JoinHandle<(flatmesh_runtime::Result<Generation>, Held)>;

/// Start generating on `engine`. Returns once the prompt is prefilled, so prompt errors (too
/// long, bad template) come back as errors rather than as a broken stream — or as soon as the
/// limit passes while the prompt is still being prefilled. What the engine computed is
/// recorded when it ends, whether or not the client is still there.
pub async fn start(
    engine: Arc<dyn Engine>,
    gen: GenerateRequest,
    held: Held,
    finish: Finish,
) -> Result<Generating, ServeError> {
    let (tx, from_engine) = mpsc::channel(64);
    let until = finish.limit.until;
    let overran = Arc::new(AtomicBool::new(false));
    let flag = overran.clone();
    // `held` lives with the engine: lease, slot and admission go back when the engine returns,
    // never while it still computes (a client that leaves mid-prefill included).
    let task = tokio::task::spawn_blocking(move || {
        let r = engine.generate(&gen, &mut |ev| {
            if Instant::now() >= until {
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
    let (ready, answer) = oneshot::channel();
    let span = finish.tracker.span().clone();
    let follow = follow(task, from_engine, overran, finish, ready);
    tokio::spawn(tracing::Instrument::instrument(follow, span));
    answer.await.unwrap_or_else(|_| {
        Err(ServeError::internal(
            "the generation ended without an answer",
        ))
    })
}

/// Who hears how a generation ends.
enum Waiter {
    /// The front door, still waiting for the prompt to be prefilled.
    Start(oneshot::Sender<Result<Generating, ServeError>>),
    /// The front door, reading the text.
    Stream(mpsc::Sender<Event>),
    /// Nobody: the client left, or was told its time was up — how the request ended.
    Told(Outcome),
}

/// A generation from its prompt to its record: the answer to `start` once the engine has
/// started (or why it has not), the text relayed until the engine ends, the client leaves or
/// the time is up, and then the record of what the engine computed.
async fn follow(
    task: EngineTask,
    mut from_engine: mpsc::Receiver<GenerateEvent>,
    overran: Arc<AtomicBool>,
    finish: Finish,
    ready: oneshot::Sender<Result<Generating, ServeError>>,
) {
    let Finish {
        bill,
        mut tracker,
        model,
        remember,
        limit,
    } = finish;
    let (started, waiter) = answer(&mut from_engine, &overran, &limit, &mut tracker, ready).await;
    drop(from_engine);
    // Lease, slot and admission go back with the engine, before the ledger write; a prompt
    // refused for its own content (too long) keeps its rate count: the engine read it.
    let result = match engine_result(task).await {
        // Whatever the end, the tokens computed are recorded.
        Ok(g) => record(g, &bill, &model, &tracker).await.and_then(|g| {
            if overran.load(Ordering::Relaxed) {
                Err(limit.error.clone())
            } else if !started {
                Err(ServeError::internal("generation ended before it started"))
            } else {
                Ok(g)
            }
        }),
        Err(e) => Err(e),
    };
    if let (Ok(g), Some(cp)) = (&result, &remember) {
        if g.finish_reason != FinishReason::Cancelled {
            offer(&bill.policies, cp, g).await;
        }
    }
    let outcome = match &result {
        Ok(g) if g.finish_reason == FinishReason::Cancelled => Outcome::ClientLeft,
        r => Outcome::of(r),
    };
    if let Ok(g) = &result {
        describe_end(&tracker, g);
    }
    tracker.finish(tell(waiter, result, outcome).await);
}

/// Answer `start` once the engine has started and relay its text, or tell the front door why
/// it has not: whether it started, and who is left to hear how it ends.
async fn answer(
    from_engine: &mut mpsc::Receiver<GenerateEvent>,
    overran: &AtomicBool,
    limit: &Limit,
    tracker: &mut Tracker,
    mut ready: oneshot::Sender<Result<Generating, ServeError>>,
) -> (bool, Waiter) {
    let until = tokio::time::Instant::from_std(limit.until);
    let started = tokio::select! {
        ev = from_engine.recv() => matches!(ev, Some(GenerateEvent::Started { .. })),
        _ = ready.closed() => false,
        _ = tokio::time::sleep_until(until) => false,
    };
    let waiter = if started {
        let (to_client, events) = mpsc::channel(64);
        match ready.send(Ok(Generating { events })) {
            Ok(()) => stream(from_engine, to_client, overran, limit, tracker).await,
            Err(_) => Waiter::Told(Outcome::ClientLeft),
        }
    } else if ready.is_closed() {
        Waiter::Told(Outcome::ClientLeft)
    } else if tokio::time::Instant::now() >= until {
        // Still prefilling: the client hears it now; the record follows when the engine ends.
        overran.store(true, Ordering::Relaxed);
        let _ = ready.send(Err(limit.error.clone()));
        Waiter::Told(Outcome::failed(&limit.error))
    } else {
        Waiter::Start(ready)
    };
    (started, waiter)
}

/// Stream the text to the client; when the limit passes, stop the engine and tell the client.
async fn stream(
    from_engine: &mut mpsc::Receiver<GenerateEvent>,
    to_client: mpsc::Sender<Event>,
    overran: &AtomicBool,
    limit: &Limit,
    tracker: &mut Tracker,
) -> Waiter {
    let until = tokio::time::Instant::from_std(limit.until);
    match relay(from_engine, &to_client, tracker, until).await {
        Relayed::Ended => Waiter::Stream(to_client),
        Relayed::Left => Waiter::Told(Outcome::ClientLeft),
        Relayed::TimeUp => {
            overran.store(true, Ordering::Relaxed);
            // The engine stops now (its blocked send fails) or at its next token.
            from_engine.close();
            // The client hears it at once where its queue has room, else after the record.
            match to_client.try_send(Event::Done(Err(limit.error.clone()))) {
                Ok(()) => Waiter::Told(Outcome::failed(&limit.error)),
                Err(mpsc::error::TrySendError::Full(_)) => Waiter::Stream(to_client),
                Err(mpsc::error::TrySendError::Closed(_)) => Waiter::Told(Outcome::ClientLeft),
            }
        }
    }
}

/// What the engine returned, its lease, slot and admission given back.
async fn engine_result(task: EngineTask) -> Result<Generation, ServeError> {
    match task.await {
        Ok((Err(e), held)) => {
            drop(held);
            Err(ServeError::from(e))
        }
        Ok((Ok(g), _)) => Ok(g),
        Err(e) => Err(ServeError::internal(format!("generation task failed: {e}"))),
    }
}

/// Record what the engine computed: the ledger, the charge, the token metrics.
async fn record(
    g: Generation,
    bill: &Bill,
    model: &str,
    tracker: &Tracker,
) -> Result<Generation, ServeError> {
    bill.record(model, g.prompt_tokens, g.completion_tokens)
        .await?;
    tracker.tokens(g.prompt_tokens, g.completion_tokens);
    tracker.prefix_cache(g.cached_tokens);
    Ok(g)
}

/// The end of a generation on its span and in the log.
fn describe_end(tracker: &Tracker, g: &Generation) {
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

/// Tell the waiter how the generation ended. Returns the outcome to count: a client no longer
/// there to hear it left.
async fn tell(waiter: Waiter, result: Result<Generation, ServeError>, outcome: Outcome) -> Outcome {
    let heard = match waiter {
        Waiter::Start(ready) => {
            let e = result
                .err()
                .unwrap_or_else(|| ServeError::internal("no generation"));
            ready.send(Err(e)).is_ok()
        }
        Waiter::Stream(to_client) => to_client.send(Event::Done(result)).await.is_ok(),
        Waiter::Told(told) => return told,
    };
    if heard {
        outcome
    } else {
        Outcome::ClientLeft
    }
}

/// How relaying a generation's text ended.
enum Relayed {
    /// The engine ended by itself.
    Ended,
    /// The client went away.
    Left,
    /// The limit passed (a client that stops reading must not hold the slot).
    TimeUp,
}

/// Relay the engine's text to the client until the engine ends, the client leaves, or the
/// limit passes.
async fn relay(
    from_engine: &mut mpsc::Receiver<GenerateEvent>,
    to_client: &mpsc::Sender<Event>,
    tracker: &mut Tracker,
    until: tokio::time::Instant,
) -> Relayed {
    loop {
        let ev = tokio::select! {
            ev = from_engine.recv() => ev,
            _ = to_client.closed() => return Relayed::Left,
            _ = tokio::time::sleep_until(until) => return Relayed::TimeUp,
        };
        let text = match ev {
            Some(GenerateEvent::Text(t)) => t,
            Some(GenerateEvent::Started { .. }) => continue,
            // The engine ended, by itself or at its own check of the limit.
            None if tokio::time::Instant::now() >= until => return Relayed::TimeUp,
            None => return Relayed::Ended,
        };
        tracker.first_token();
        tokio::select! {
            sent = to_client.send(Event::Text(text)) => if sent.is_err() {
                return Relayed::Left;
            },
            _ = tokio::time::sleep_until(until) => return Relayed::TimeUp,
        }
    }
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
