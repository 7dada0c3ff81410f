//! Per-request metrics and the request's span: in flight, latency, time to first token,
//! tokens and the final status.

use std::time::Instant;

use super::{
    endpoint::Endpoint,
    error::{ErrorKind, ServeError},
};
use crate::{metrics::Metrics, telemetry};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered in full.
    Done,
    /// The client went away before it was answered.
    ClientLeft,
    /// Answered with an error (a policy denial with the status its policy chose).
    Failed {
        kind: ErrorKind,
        policy_status: Option<u16>,
    },
}

impl Outcome {
    pub fn failed(e: &ServeError) -> Self {
        Outcome::Failed {
            kind: e.kind,
            policy_status: e.policy_status,
        }
    }

    pub fn of<T>(result: &Result<T, ServeError>) -> Self {
        result
            .as_ref()
            .map_or_else(Outcome::failed, |_| Outcome::Done)
    }

    /// The `status` label of the request metrics (and the span's `flatmesh.status`): the HTTP
    /// status the outcome answers with, whatever the protocol, and 499 for a client that
    /// left. The one place an outcome becomes a number; `api::error::http_status` answers with it.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Done => 200,
            Outcome::ClientLeft => 499,
            Outcome::Failed {
                kind,
                policy_status,
            } => match kind {
                ErrorKind::InvalidRequest => 400,
                ErrorKind::Unauthenticated => 401,
                ErrorKind::Forbidden => 403,
                ErrorKind::NotFound => 404,
                ErrorKind::Conflict => 409,
                ErrorKind::TooLarge => 413,
                ErrorKind::RateLimited => 429,
                ErrorKind::PolicyDenied => policy_status.unwrap_or(429),
                ErrorKind::Cancelled => 499,
                ErrorKind::Internal => 500,
                ErrorKind::Unavailable => 503,
                ErrorKind::Timeout => 504,
            },
        }
    }
}

/// Records one request in the metrics, once, however it ends.
pub struct Tracker {
    metrics: Metrics,
    model: String,
    endpoint: Endpoint,
    tier: String,
    started: Instant,
    first_token: bool,
    done: bool,
    /// A peer of the mesh served it and counts it: here it only leaves the in-flight gauge.
    handed_off: bool,
    /// The serve span: it ends when the last handle (this one, for a stream) is dropped.
    span: tracing::Span,
}

impl Tracker {
    /// `model` must already be bounded (a configured id or "unknown").
    pub fn new(
        metrics: &Metrics,
        model: String,
        endpoint: Endpoint,
        tier: String,
        span: tracing::Span,
    ) -> Self {
        metrics.in_flight.with_label_values(&[&model]).inc();
        Tracker {
            metrics: metrics.clone(),
            model,
            endpoint,
            tier,
            started: Instant::now(),
            first_token: false,
            done: false,
            handed_off: false,
            span,
        }
    }

    /// Count the request under the model it resolved to (a vmodel's target, a router's
    /// choice) rather than the name it asked for; `model` must be bounded.
    pub fn relabel(&mut self, model: String) {
        if model != self.model && !self.done {
            self.metrics
                .in_flight
                .with_label_values(&[&self.model])
                .dec();
            self.metrics.in_flight.with_label_values(&[&model]).inc();
            self.model = model;
        }
    }

    /// A peer serves the request and counts it there (once in the mesh's sums).
    pub fn hand_off(&mut self) {
        self.handed_off = true;
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn first_token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            let seconds = self.elapsed();
            telemetry::attr(&self.span, "flatmesh.time_to_first_token_s", seconds);
            if self.handed_off {
                return;
            }
            self.metrics
                .time_to_first_token_seconds
                .with_label_values(&[&self.model])
                .observe(seconds);
        }
    }

    pub fn tokens(&self, input: usize, output: usize) {
        self.counter().count(input, output);
    }

    /// A prompt that started with `tokens` tokens from the copy's prefix cache.
    pub fn prefix_cache(&self, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let model = [self.model.as_str()];
        self.metrics
            .prefix_cache_hits
            .with_label_values(&model)
            .inc();
        self.metrics
            .prefix_cache_tokens
            .with_label_values(&model)
            .inc_by(tokens as u64);
    }

    /// Counts the request's tokens where the tracker cannot go (an embedding recorded after
    /// its client was answered).
    pub fn counter(&self) -> TokenCounter {
        TokenCounter {
            metrics: self.metrics.clone(),
            model: self.model.clone(),
            span: self.span.clone(),
        }
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let status = outcome.status();
        telemetry::attr(&self.span, "flatmesh.status", i64::from(status));
        match status {
            500.. => telemetry::failed(&self.span, &status.to_string(), "server error"),
            499 => telemetry::attr(&self.span, "error.type", "cancelled"),
            400.. => telemetry::attr(&self.span, "error.type", status.to_string()),
            _ => {}
        }
        self.metrics
            .in_flight
            .with_label_values(&[&self.model])
            .dec();
        if self.handed_off {
            return;
        }
        let labels = [self.model.as_str(), self.endpoint.label()];
        self.metrics
            .request_seconds
            .with_label_values(&labels)
            .observe(self.elapsed());
        self.metrics
            .requests
            .with_label_values(&[&self.model, self.endpoint.label(), &status.to_string()])
            .inc();
        self.metrics
            .tier_responses
            .with_label_values(&[&self.tier, &status.to_string()])
            .inc();
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Dropped unfinished: the client went away mid-response.
        self.record(Outcome::ClientLeft);
    }
}

/// Counts the tokens of one request, in the metrics and on its span.
pub struct TokenCounter {
    metrics: Metrics,
    model: String,
    span: tracing::Span,
}

impl TokenCounter {
    pub fn count(&self, input: usize, output: usize) {
        telemetry::attr(&self.span, "gen_ai.usage.input_tokens", input as i64);
        telemetry::attr(&self.span, "gen_ai.usage.output_tokens", output as i64);
        self.metrics
            .input_tokens
            .with_label_values(&[&self.model])
            .inc_by(input as u64);
        self.metrics
            .output_tokens
            .with_label_values(&[&self.model])
            .inc_by(output as u64);
    }
}

/// Counts a request in its tier's queue depth while it waits.
pub(super) struct Waiting(prometheus::IntGauge);

impl Waiting {
    pub(super) fn new(metrics: &Metrics, tier: &str) -> Self {
        let gauge = metrics.queue_depth.with_label_values(&[tier]);
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}
