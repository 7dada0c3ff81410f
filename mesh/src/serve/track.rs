//! Per-request metrics: in flight, latency, time to first token, tokens and the final status.

use std::time::Instant;

use crate::metrics::Metrics;

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
