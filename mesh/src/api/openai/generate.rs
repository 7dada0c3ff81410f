//! Runs one generation on the blocking pool and hands its events to an async caller.

use std::{ops::ControlFlow, time::Instant};

use flatmesh_runtime::{GenerateEvent, GenerateRequest, Generation, ModelKind, RuntimeError};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{api::error::ApiError, cache::Cache, metrics::Metrics, units::KeepAlive};

/// A generation that has accepted its prompt and is producing text.
pub struct Running {
    /// The tenant's admission and the execution slot, held until the generation ends.
    held: Option<crate::api::usage::Held>,
    /// The model that serves the request (a vmodel resolved to its target).
    pub model: String,
    pub events: mpsc::Receiver<GenerateEvent>,
    task: JoinHandle<Result<Generation, RuntimeError>>,
}

impl Running {
    /// Start generating. Returns once the prompt is prefilled, so prompt errors (too long,
    /// bad template) come back as errors rather than as a broken stream. Dropping `events`
    /// cancels the generation at its next token.
    pub async fn start(
        cache: &Cache,
        model: &str,
        keep_alive: Option<KeepAlive>,
        residency_bonus: std::time::Duration,
        req: GenerateRequest,
    ) -> Result<Self, ApiError> {
        let loaded = cache
            .acquire_for(model, keep_alive, residency_bonus)
            .await?;
        let served_by = loaded.model.clone();
        if loaded.engine.info().kind != ModelKind::Llm {
            return Err(ApiError::bad_request(
                "model",
                format!("{model:?} is an embedding model; use /v1/embeddings"),
            ));
        }
        let (tx, mut events) = mpsc::channel(64);
        let task = tokio::task::spawn_blocking(move || {
            loaded
                .engine
                .generate(&req, &mut |ev| match tx.blocking_send(ev) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                })
        });
        match events.recv().await {
            Some(GenerateEvent::Started { .. }) => Ok(Running {
                held: None,
                model: served_by,
                events,
                task,
            }),
            _ => Err(match task.await {
                Ok(Err(e)) => e.into(),
                Ok(Ok(_)) => ApiError::internal("generation ended before it started".into()),
                Err(e) => ApiError::internal(format!("generation task failed: {e}")),
            }),
        }
    }

    /// Keep the admission and slot until the generation ends.
    pub fn hold(&mut self, held: crate::api::usage::Held) {
        self.held = Some(held);
    }

    /// Wait for the end of the generation (after `events` is drained or dropped).
    pub async fn finish(self) -> Result<Generation, ApiError> {
        drop(self.events);
        match self.task.await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => Err(ApiError::internal(format!("generation task failed: {e}"))),
        }
    }
}

/// Records one request in the metrics, once, however it ends.
pub struct Tracker {
    metrics: Metrics,
    model: String,
    endpoint: &'static str,
    started: Instant,
    first_token: bool,
    done: bool,
}

impl Tracker {
    /// `model` must already be bounded (a configured id or "unknown").
    pub fn new(metrics: &Metrics, model: String, endpoint: &'static str) -> Self {
        metrics.in_flight.with_label_values(&[&model]).inc();
        Tracker {
            metrics: metrics.clone(),
            model,
            endpoint,
            started: Instant::now(),
            first_token: false,
            done: false,
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn first_token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            self.metrics
                .time_to_first_token_seconds
                .with_label_values(&[&self.model])
                .observe(self.elapsed());
        }
    }

    pub fn tokens(&self, input: usize, output: usize) {
        self.metrics
            .input_tokens
            .with_label_values(&[&self.model])
            .inc_by(input as u64);
        self.metrics
            .output_tokens
            .with_label_values(&[&self.model])
            .inc_by(output as u64);
    }

    pub fn finish(mut self, status: u16) {
        self.record(status);
    }

    fn record(&mut self, status: u16) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = [self.model.as_str(), self.endpoint];
        self.metrics
            .request_seconds
            .with_label_values(&labels)
            .observe(self.elapsed());
        self.metrics
            .requests
            .with_label_values(&[&self.model, self.endpoint, &status.to_string()])
            .inc();
        self.metrics
            .in_flight
            .with_label_values(&[&self.model])
            .dec();
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Dropped unfinished: the client went away mid-response.
        self.record(499);
    }
}
