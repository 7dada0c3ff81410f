//! Usage of a request: what policies see of it, and its durable ledger record.

use std::time::Instant;

use flatmesh_runtime::GenerateRequest;

use super::{endpoint::Endpoint, error::ServeError};
use crate::{
    ledger::{now_ms, Ledger, Record},
    metrics::Metrics,
    policy::{self, Policies, RequestInfo},
    tenancy::{limits::Limits, Caller},
};

/// Longest client-supplied request id kept beside the ledger's own.
const MAX_CLIENT_ID: usize = 256;

/// A request as policies see it. `generate` is absent for embeddings and v2 tensors.
pub fn request_info(
    id: &str,
    caller: &Caller,
    model: &str,
    endpoint: Endpoint,
    generate: Option<&GenerateRequest>,
    streamed: bool,
) -> RequestInfo {
    let features =
        generate
            .map(|g| policy::features(&g.prompt))
            .unwrap_or(policy::PromptFeatures {
                chars: 0,
                messages: 0,
                code_blocks: 0,
                questions: 0,
            });
    // Every choice may generate `max_tokens`.
    let max_tokens = generate
        .and_then(|g| g.max_tokens.map(|m| m.saturating_mul(g.n)))
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    RequestInfo {
        id: id.to_string(),
        tenant: caller.tenant.clone(),
        tier: caller.tier.name.clone(),
        model: model.to_string(),
        endpoint: endpoint.label().to_string(),
        prompt_tokens: policy::estimate_tokens(&features),
        max_tokens,
        streamed,
        features,
        shape: policy::answer_shape(generate),
    }
}

/// A client's own request id as the ledger keeps it: bounded, beside the ledger's own id.
pub fn client_id(id: Option<&str>) -> Option<String> {
    let id = id?.trim();
    if id.is_empty() {
        return None;
    }
    let mut end = id.len().min(MAX_CLIENT_ID);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    Some(id[..end].to_string())
}

/// Started with an admitted request; records its usage once it has finished.
pub struct Bill {
    pub ledger: Ledger,
    pub limits: Limits,
    pub metrics: Metrics,
    pub policies: Policies,
    pub caller: Caller,
    pub endpoint: Endpoint,
    /// The request as policies saw it (the pricing plugin is charged with it).
    pub info: RequestInfo,
    pub client_id: Option<String>,
    pub cache_hit: bool,
    pub started_ms: u64,
    pub started: Instant,
}

impl Bill {
    /// Make the record durable, then count it and charge it. An error here fails the
    /// request: no answer leaves without its record.
    pub async fn record(
        &self,
        model: &str,
        input_tokens: usize,
        output_tokens: usize,
    ) -> Result<(), ServeError> {
        let record = Record {
            id: self.info.id.clone(),
            client_id: self.client_id.clone(),
            tenant: self.caller.tenant.clone(),
            tier: self.caller.tier.name.clone(),
            model: model.to_string(),
            endpoint: self.endpoint.label().to_string(),
            input_tokens: input_tokens as u64,
            output_tokens: output_tokens as u64,
            device_seconds: self.started.elapsed().as_secs_f64(),
            cache_hit: self.cache_hit,
            started_ms: self.started_ms,
            finished_ms: now_ms(),
        };
        let device_ms = (record.device_seconds * 1000.0) as u64;
        self.ledger.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "Could not write the usage record");
            ServeError::internal(format!("could not record usage: {e}"))
        })?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn client_ids_are_bounded_and_blank_ones_dropped() {
        assert_eq!(super::client_id(None), None);
        assert_eq!(super::client_id(Some("  ")), None);
        let long = "é".repeat(1000);
        let kept = super::client_id(Some(&long)).unwrap();
        assert!(kept.len() <= super::MAX_CLIENT_ID && kept.chars().all(|c| c == 'é'));
    }
}
