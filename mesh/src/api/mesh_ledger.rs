//! The ledger's queries: a period, this node's records, and usage and invoices over the
//! whole mesh: every node's ledger stays its own durable record;
//! a query on any node sums the usage of every live node (each node sums its own in SQL) and
//! says which it could not reach, instead of answering a silently short total.

use std::time::Duration;

use axum::{
    extract::{Query, State},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error::ApiError, AppState};
use crate::ledger::{Ledger, Usage};

/// Where a node asks a peer for its records (with the mesh token).
pub const PATH: &str = "/internal/v1/ledger/records";
/// Where a node asks a peer for its usage of a period, per tenant (with the mesh token).
pub const USAGE_PATH: &str = "/internal/v1/ledger/usage";

/// A period in Unix seconds, `[from, to)`; defaults to everything.
#[derive(Deserialize)]
pub struct Period {
    #[serde(default)]
    pub from: Option<u64>,
    #[serde(default)]
    pub to: Option<u64>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub format: Option<String>,
}

impl Period {
    pub fn millis(&self) -> (u64, u64) {
        (
            self.from.map_or(0, |s| s.saturating_mul(1000)),
            self.to.map_or(u64::MAX, |s| s.saturating_mul(1000)),
        )
    }
}

/// Run a ledger query off the async runtime (it reads the disk).
async fn query<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Ledger) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let ledger = state.serve.ledger.clone();
    tokio::task::spawn_blocking(move || f(&ledger))
        .await
        .map_err(|e| ApiError::internal(format!("the ledger query failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("cannot read the ledger: {e:#}")))
}

/// This node's own usage of a period, per tenant.
async fn usage_here(
    state: &AppState,
    tenant: Option<&str>,
    p: &Period,
) -> Result<Vec<Usage>, ApiError> {
    let (from, to) = p.millis();
    let tenant = tenant.map(str::to_string);
    query(state, move |l| l.usage(tenant.as_deref(), from, to)).await
}

/// What a mesh-wide query gathered.
pub struct Gathered {
    /// Usage per tenant, every reachable node's summed.
    pub usage: Vec<Usage>,
    /// Nodes whose records are in.
    pub nodes: Vec<String>,
    /// Live nodes that did not answer.
    pub unreachable: Vec<String>,
    /// Summed from the shared ledger (PostgreSQL) rather than asked of the nodes.
    pub shared: bool,
}

impl Gathered {
    /// The `nodes` and `unreachable` fields of an answer.
    pub fn describe(&self) -> Value {
        let ledger = if self.shared { "postgres" } else { "nodes" };
        json!({"nodes": self.nodes, "unreachable": self.unreachable, "ledger": ledger})
    }
}

/// This node's own records of a period: `GET /admin/ledger/records` for operators, and
/// `GET /internal/v1/ledger/records` for the peers that gather them.
pub async fn own_records(
    State(state): State<AppState>,
    Query(p): Query<Period>,
) -> Result<Json<Value>, ApiError> {
    let (from, to) = p.millis();
    let tenant = p.tenant.clone();
    let records = query(&state, move |l| l.records(tenant.as_deref(), from, to)).await?;
    Ok(Json(json!({ "records": records })))
}

/// This node's own usage of a period: `GET /internal/v1/ledger/usage` for the peers that sum
/// it.
pub async fn own_usage(
    State(state): State<AppState>,
    Query(p): Query<Period>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"usage": usage_here(&state, p.tenant.as_deref(), &p).await?}),
    ))
}

/// The usage of a period: from the shared ledger plus this node's records not shipped yet
/// when there is one (and it answers); otherwise on this node and, in a mesh, on every other
/// live node, summed.
pub async fn gather(
    state: &AppState,
    tenant: Option<&str>,
    p: &Period,
) -> Result<Gathered, ApiError> {
    let (from, to) = p.millis();
    match state.serve.ledger.shared_usage(tenant, from, to).await {
        Some(Ok(usage)) => {
            return Ok(Gathered {
                usage,
                nodes: vec![],
                unreachable: vec![],
                shared: true,
            })
        }
        Some(Err(e)) => tracing::warn!(
            error = format!("{e:#}"),
            "The shared ledger cannot be read; asking the nodes instead"
        ),
        None => {}
    }
    let mut all = usage_here(state, tenant, p).await?;
    let Some(cluster) = &state.cluster else {
        return Ok(Gathered {
            usage: all,
            nodes: vec![],
            unreachable: vec![],
            shared: false,
        });
    };
    let mut nodes = vec![cluster.node().to_string()];
    let mut unreachable = Vec::new();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(f) = p.from {
        query.push(("from", f.to_string()));
    }
    if let Some(t) = p.to {
        query.push(("to", t.to_string()));
    }
    if let Some(t) = tenant {
        query.push(("tenant", t.to_string()));
    }
    let asks = cluster.peers().into_iter().map(|(node, http)| {
        let mut req = client
            .get(format!("{}{USAGE_PATH}", http.trim_end_matches('/')))
            .query(&query);
        if let Some(token) = &state.mesh_token {
            req = req.header(crate::serve::peer::MESH_TOKEN, token);
        }
        async move {
            let got = async { req.send().await?.error_for_status()?.json::<Value>().await }.await;
            (node, got)
        }
    });
    for (node, got) in futures::future::join_all(asks).await {
        let usage = got
            .ok()
            .and_then(|v| serde_json::from_value::<Vec<Usage>>(v["usage"].clone()).ok());
        match usage {
            // Each request is recorded by the node that served it alone: summing the nodes'
            // usage counts it once.
            Some(usage) => {
                all = crate::ledger::merge_usage(all, usage);
                nodes.push(node);
            }
            None => unreachable.push(node),
        }
    }
    Ok(Gathered {
        usage: all,
        nodes,
        unreachable,
        shared: false,
    })
}
