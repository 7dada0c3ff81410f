//! Usage records of finished requests: written to the ledger before the response completes.

use std::time::Instant;

use super::{error::ApiError, AppState};
use crate::{
    ledger::{now_ms, Ledger, Record},
    scheduler::{Rejected, Slot},
    tenancy::{
        limits::{Admission, LimitError},
        Caller,
    },
};

/// What a running request holds: its tenant's admission and its execution slot.
pub type Held = (Admission, Slot);

/// Why a request was refused before it ran.
#[derive(Debug)]
pub enum Refused {
    Limit(LimitError),
    Queue(Rejected),
}

/// Admit a caller's request, as every endpoint does: the tier's limits, then a fair execution
/// slot; and start its bill.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    endpoint: &'static str,
) -> Result<(Held, Bill), Refused> {
    let admission = state.limits.admit(caller).map_err(Refused::Limit)?;
    let slot = state
        .scheduler
        .acquire(&caller.tier.name, caller.tier.weight)
        .await
        .map_err(Refused::Queue)?;
    Ok(((admission, slot), Bill::new(state, caller, endpoint)))
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Limit(e) => e.into(),
            Refused::Queue(e) => e.into(),
        }
    }
}

impl From<Refused> for crate::api::v2::V2Error {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Limit(e) => e.into(),
            Refused::Queue(e) => e.into(),
        }
    }
}

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
