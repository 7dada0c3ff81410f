//! What the ledger holds and sums: one record per finished request, usage per tenant.

use serde::{Deserialize, Serialize};

/// One finished request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The agent's own unique id of the request (also the OpenAI response's id).
    pub id: String,
    /// The id the client gave its request (v2 `id`), bounded; never relied on as unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub tenant: String,
    pub tier: String,
    pub model: String,
    pub endpoint: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Seconds the request held its model copy.
    pub device_seconds: f64,
    pub cache_hit: bool,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub finished_ms: u64,
}

/// Usage of one tenant over a period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub tenant: String,
    pub tier: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub device_seconds: f64,
}
