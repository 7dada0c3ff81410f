//! Usage records of finished requests: written to the ledger before the response completes.

use std::time::Instant;

use flatmesh_runtime::Prompt;

use super::{error::ApiError, AppState};
use crate::{
    ledger::{now_ms, Ledger, Record},
    policy::{self, Policies, RequestInfo},
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
    Policy(policy::Refusal),
    Limit(LimitError),
    Queue(Rejected),
}

/// A request as policies see it. `prompt` is absent for embeddings and v2 tensors.
pub fn request_info(
    id: &str,
    caller: &Caller,
    model: &str,
    endpoint: &str,
    prompt: Option<&Prompt>,
    max_tokens: Option<u32>,
    streamed: bool,
) -> RequestInfo {
    let features = prompt
        .map(policy::features)
        .unwrap_or(policy::PromptFeatures {
            chars: 0,
            messages: 0,
            code_blocks: 0,
            questions: 0,
        });
    RequestInfo {
        id: id.to_string(),
        tenant: caller.tenant.clone(),
        tier: caller.tier.name.clone(),
        model: model.to_string(),
        endpoint: endpoint.to_string(),
        prompt_tokens: policy::estimate_tokens(&features),
        max_tokens: max_tokens.unwrap_or(0),
        streamed,
        features,
    }
}

/// Admit a caller's request, as every endpoint does: the pricing policy, the tier's limits,
/// then a fair execution slot; and start its bill.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    endpoint: &'static str,
    info: RequestInfo,
) -> Result<(Held, Bill), Refused> {
    state
        .policies
        .admit(&info, || state.limits.period_use(&caller.tier.name))
        .await
        .map_err(Refused::Policy)?;
    let admission = state.limits.admit(caller).map_err(Refused::Limit)?;
    let slot = state
        .scheduler
        .acquire(&caller.tier.name, caller.tier.weight)
        .await
        .map_err(Refused::Queue)?;
    Ok(((admission, slot), Bill::new(state, caller, endpoint, info)))
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Policy(e) => e.into(),
            Refused::Limit(e) => e.into(),
            Refused::Queue(e) => e.into(),
        }
    }
}

impl From<Refused> for crate::api::v2::V2Error {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Policy(e) => e.into(),
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
    policies: Policies,
    caller: Caller,
    endpoint: &'static str,
    /// The request as policies saw it (the pricing plugin is charged with it).
    pub info: RequestInfo,
    cache_hit: bool,
    started_ms: u64,
    started: Instant,
}

impl Bill {
    pub fn new(
        state: &AppState,
        caller: &Caller,
        endpoint: &'static str,
        info: RequestInfo,
    ) -> Self {
        Bill {
            ledger: state.ledger.clone(),
            limits: state.limits.clone(),
            metrics: state.metrics.clone(),
            policies: state.policies.clone(),
            caller: caller.clone(),
            endpoint,
            info,
            cache_hit: false,
            started_ms: now_ms(),
            started: Instant::now(),
        }
    }

    /// The answer came from the response cache.
    pub fn cache_hit(&mut self) {
        self.cache_hit = true;
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
            cache_hit: self.cache_hit,
            started_ms: self.started_ms,
            finished_ms: now_ms(),
        };
        let tier = self.caller.tier.name.as_str();
        self.limits.add_tokens(
            &self.caller.tenant,
            tier,
            (input_tokens + output_tokens) as u64,
        );
        self.metrics.tier_requests.with_label_values(&[tier]).inc();
        self.metrics
            .tier_tokens
            .with_label_values(&[tier, "input"])
            .inc_by(input_tokens as u64);
        self.metrics
            .tier_tokens
            .with_label_values(&[tier, "output"])
            .inc_by(output_tokens as u64);
        let device_ms = (record.device_seconds * 1000.0) as u64;
        self.ledger.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "Could not write the usage record");
            ApiError::internal(format!("could not record usage: {e}"))
        })?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let usage = policy::Usage {
            prompt_tokens: count(input_tokens),
            completion_tokens: count(output_tokens),
            device_ms,
            cache_hit: self.cache_hit,
        };
        self.policies.charge(&self.info, usage).await;
        Ok(())
    }
}
