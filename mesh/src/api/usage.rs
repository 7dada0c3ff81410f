//! Usage records of finished requests: written to the ledger before the response completes.

use std::time::Instant;

use super::{error::ApiError, AppState};
use crate::{
    ledger::{now_ms, Ledger, Record},
    tenancy::Caller,
};

/// Started with a request; records its usage once it has finished.
pub struct Bill {
    ledger: Ledger,
    limits: crate::tenancy::limits::Limits,
    metrics: crate::metrics::Metrics,
    caller: Caller,
    endpoint: &'static str,
    started_ms: u64,
    started: Instant,
}

impl Bill {
    pub fn new(state: &AppState, caller: &Caller, endpoint: &'static str) -> Self {
        Bill {
            ledger: state.ledger.clone(),
            limits: state.limits.clone(),
            metrics: state.metrics.clone(),
            caller: caller.clone(),
            endpoint,
            started_ms: now_ms(),
            started: Instant::now(),
        }
    }

    /// Make the record durable. An error here fails the request: no answer leaves without
    /// its record.
    pub async fn record(
        &self,
        id: &str,
        model: &str,
        input_tokens: usize,
        output_tokens: usize,
    ) -> Result<(), ApiError> {
        let record = Record {
            id: id.to_string(),
            tenant: self.caller.tenant.clone(),
            tier: self.caller.tier.name.clone(),
            model: model.to_string(),
            endpoint: self.endpoint.to_string(),
            input_tokens: input_tokens as u64,
            output_tokens: output_tokens as u64,
            device_seconds: self.started.elapsed().as_secs_f64(),
            cache_hit: false,
            started_ms: self.started_ms,
            finished_ms: now_ms(),
        };
        let tier = self.caller.tier.name.as_str();
        self.limits
            .add_tokens(&self.caller.tenant, (input_tokens + output_tokens) as u64);
        self.metrics.tier_requests.with_label_values(&[tier]).inc();
        self.metrics
            .tier_tokens
            .with_label_values(&[tier, "input"])
            .inc_by(input_tokens as u64);
        self.metrics
            .tier_tokens
            .with_label_values(&[tier, "output"])
            .inc_by(output_tokens as u64);
        self.ledger.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "Could not write the usage record");
            ApiError::internal(format!("could not record usage: {e}"))
        })
    }
}
