//! The mesh: this node's record in etcd under a lease, the live peers' records, the shared
//! registry, and where a request for a model should run.
//!
//! etcd holds the shared state; nothing here votes. A node publishes what it holds (models
//! with ready copies, their leases, its devices) under `{prefix}/nodes/{node}`, tied to a
//! lease it keeps alive: when the node dies its record leaves with the lease (≤ TTL). Every
//! node watches the others' records. When etcd is unreachable a node keeps serving what it
//! holds and forwarding to the peers it last saw, and joins again when etcd is back.

mod claim;
pub mod config;
pub mod drain;
mod endpoints;
pub mod placement;
mod registry;
mod session;
mod tenancy;
mod watch;

use parking_lot::RwLock;
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::Client;
use serde::{Deserialize, Serialize};

use self::claim::Claims;
pub use self::config::{host_name, MeshConfig};
use self::endpoints::Endpoints;
pub use self::registry::MeshRegistry;
use self::tenancy::SharedTenancy;
use crate::{
    cache::{Cache, CopyPhase},
    metrics::Metrics,
    tenancy::{limits::Limits, Tenancy},
};

/// A model with copies on a node, as that node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelHere {
    pub id: String,
    /// Copies ready to serve.
    pub ready: usize,
    /// Requests holding a lease on its copies.
    pub leases: usize,
    pub bytes: u64,
}

/// A device of a node: capacity and bytes used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHere {
    pub name: String,
    pub capacity: u64,
    pub used: u64,
}

/// A tenant's tokens on a node this month (tenants on tiers with a budget).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    pub tenant: String,
    /// Start of the month, Unix ms.
    pub month: u64,
    pub tokens: u64,
}

/// A node's tokens per tenant: (start of the month, tokens).
type TenantMonths = BTreeMap<String, (u64, u64)>;

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    /// Its HTTP front door, as peers reach it.
    pub http: String,
    /// Its gRPC front door, as peers reach it.
    #[serde(default)]
    pub grpc: String,
    /// Shutting down: finishing what it runs, taking nothing new.
    pub draining: bool,
    pub models: Vec<ModelHere>,
    pub devices: Vec<DeviceHere>,
    #[serde(default)]
    pub usage: Vec<TenantUsage>,
    /// Models with a copy loading here.
    #[serde(default)]
    pub loading: Vec<String>,
    /// Models whose image is in this node's warm tier.
    #[serde(default)]
    pub warm: Vec<String>,
    /// Its pool, labels and cost weight (`[mesh]`).
    #[serde(default = "config::default_pool")]
    pub pool: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "config::default_cost")]
    pub cost: f64,
}

impl NodeRecord {
    /// The most free bytes on one of its devices.
    fn free(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.capacity.saturating_sub(d.used))
            .max()
            .unwrap_or(0)
    }
}

/// The mesh as this node sees it (`/admin/mesh`, the status page). The fields are in the
/// order the JSON has always shown them.
#[derive(Debug, Clone, Serialize)]
pub struct MeshStatus {
    /// Whether etcd answers.
    pub etcd_connected: bool,
    /// This node's name.
    pub node: String,
    /// Every live node's record, this one's included.
    pub nodes: Vec<NodeRecord>,
}

/// A peer to forward to: its front doors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub http: String,
    pub grpc: String,
}

/// The mesh handle: cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: MeshConfig,
    /// The etcd members, and the one in use.
    etcd: Endpoints,
    http: String,
    grpc: String,
    cache: Cache,
    /// Live records by node name, this node's included (as last published).
    nodes: RwLock<BTreeMap<String, NodeRecord>>,
    draining: std::sync::atomic::AtomicBool,
    /// Whether etcd answers (through any member).
    connected: std::sync::atomic::AtomicBool,
    registry: Arc<MeshRegistry>,
    tenancy: Tenancy,
    limits: Limits,
    shared_tenancy: SharedTenancy,
    /// This node's own tenancy changes, to write to etcd.
    tenancy_changes:
        tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<crate::tenancy::Shared>>,
    claims: Claims,
    /// Loads this node sent to each node since that node's last record: (count, bytes), so
    /// a burst of placements does not pile onto the node that looked emptiest.
    placed: parking_lot::Mutex<std::collections::HashMap<String, (usize, u64)>>,
    /// Every other node's tokens per tenant as it last published them (start of month,
    /// tokens), nodes that left included.
    usage_seen: parking_lot::Mutex<BTreeMap<String, TenantMonths>>,
    /// Pinned models seen without a copy anywhere in the mesh, and since when.
    orphans: parking_lot::Mutex<std::collections::HashMap<String, Instant>>,
    /// A change whose write failed (etcd went away): written first on reconnecting.
    unwritten: parking_lot::Mutex<Option<crate::tenancy::Shared>>,
    metrics: Metrics,
}

/// How often the node's record is rebuilt and, when it changed, published.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// How often pinned models are checked for a copy somewhere in the mesh.
const KEEP_PINNED_EVERY: Duration = Duration::from_secs(1);

impl Cluster {
    /// This node's handle on the mesh, not yet joined: [`Cluster::start`] joins. `http` is
    /// this node's front door as peers reach it.
    pub fn new(
        config: MeshConfig,
        (http, grpc): (String, String),
        cache: Cache,
        registry: Arc<MeshRegistry>,
        tenancy: Tenancy,
        limits: Limits,
        metrics: Metrics,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tenancy.mirror_to(tx);
        let shared_tenancy = SharedTenancy::new(&config.prefix);
        Cluster {
            inner: Arc::new(Inner {
                etcd: Endpoints::new(config.etcd.clone(), config.etcd_tls.clone()),
                config,
                http,
                grpc,
                cache,
                nodes: RwLock::default(),
                draining: Default::default(),
                connected: Default::default(),
                registry,
                tenancy,
                limits,
                shared_tenancy,
                tenancy_changes: tokio::sync::Mutex::new(rx),
                unwritten: Default::default(),
                claims: Claims::default(),
                placed: Default::default(),
                orphans: Default::default(),
                usage_seen: Default::default(),
                metrics,
            }),
        }
    }

    /// Join the mesh in the background: connect, publish, watch, and keep at it while etcd
    /// comes and goes.
    pub fn start(&self) {
        let me = self.clone();
        tokio::spawn(async move { me.run().await });
        // Pinned models are looked after on their own task: a slow etcd answering their
        // claims must not hold up the lease's keep-alive.
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEP_PINNED_EVERY);
            loop {
                tick.tick().await;
                if me.connected() {
                    me.keep_pinned().await;
                }
            }
        });
    }

    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// Whether this node's etcd session is up.
    pub fn connected(&self) -> bool {
        self.inner
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The front doors of the other live nodes, by node name.
    pub fn peers(&self) -> Vec<(String, String)> {
        let nodes = self.inner.nodes.read();
        nodes
            .values()
            .filter(|n| n.node != self.inner.config.node)
            .map(|n| (n.node.clone(), n.http.clone()))
            .collect()
    }

    /// Every live node's record, and whether etcd answers.
    pub fn status(&self) -> MeshStatus {
        let nodes = self.inner.nodes.read();
        MeshStatus {
            etcd_connected: self.connected(),
            node: self.inner.config.node.clone(),
            nodes: nodes.values().cloned().collect(),
        }
    }

    fn record(&self) -> NodeRecord {
        let cache = &self.inner.cache;
        let models = cache
            .status()
            .into_iter()
            .filter_map(|m| {
                let ready = m
                    .copies
                    .iter()
                    .filter(|c| c.state == CopyPhase::Ready)
                    .count();
                (ready > 0).then(|| ModelHere {
                    id: m.id,
                    ready,
                    leases: m.copies.iter().map(|c| c.leases).sum(),
                    bytes: m.copies.iter().map(|c| c.bytes).sum(),
                })
            })
            .collect();
        NodeRecord {
            node: self.inner.config.node.clone(),
            http: self.inner.http.clone(),
            grpc: self.inner.grpc.clone(),
            draining: self
                .inner
                .draining
                .load(std::sync::atomic::Ordering::Relaxed),
            models,
            devices: cache
                .devices()
                .into_iter()
                .map(|(name, used, capacity)| DeviceHere {
                    name,
                    capacity,
                    used,
                })
                .collect(),
            loading: cache
                .status()
                .into_iter()
                .filter(|m| m.copies.iter().any(|c| c.state == CopyPhase::Loading))
                .map(|m| m.id)
                .collect(),
            warm: cache.warm_models(),
            usage: self
                .inner
                .limits
                .month_usage_here()
                .into_iter()
                .map(|(tenant, month, tokens)| TenantUsage {
                    tenant,
                    month,
                    tokens,
                })
                .collect(),
            pool: self.inner.config.pool.clone(),
            labels: self.inner.config.labels.clone(),
            cost: self.inner.config.cost,
        }
    }

    /// Sum what the other nodes publish per tenant this month, for the budgets here. A node
    /// that left (stopped, or cut off), or restarted and has not admitted a tenant since, is
    /// counted as it last published: its tokens were spent (a node's month only grows).
    fn share_usage(&self, nodes: &BTreeMap<String, NodeRecord>) {
        let mut seen = self.inner.usage_seen.lock();
        for n in nodes.values().filter(|n| n.node != self.inner.config.node) {
            let known = seen.entry(n.node.clone()).or_default();
            for u in &n.usage {
                let e = known.entry(u.tenant.clone()).or_insert((u.month, u.tokens));
                *e = (*e).max((u.month, u.tokens));
            }
        }
        let mut sum: std::collections::HashMap<String, (u64, u64)> = Default::default();
        for (tenant, &(month, tokens)) in seen.values().flatten() {
            let e = sum.entry(tenant.clone()).or_insert((month, 0));
            if e.0 == month {
                e.1 += tokens;
            } else if month > e.0 {
                *e = (month, tokens);
            }
        }
        self.inner.limits.set_peer_usage(sum);
    }

    /// Ready copies per model over the live nodes, for the metrics (every registered model,
    /// so a model whose last copy left shows 0).
    fn count_copies(&self, nodes: &BTreeMap<String, NodeRecord>) {
        let mut copies: std::collections::HashMap<&str, usize> = Default::default();
        for m in nodes.values().flat_map(|n| &n.models) {
            *copies.entry(&m.id).or_default() += m.ready;
        }
        for m in self.inner.cache.status() {
            self.inner
                .metrics
                .mesh_copies
                .with_label_values(&[&m.id])
                .set(copies.get(m.id.as_str()).copied().unwrap_or(0) as i64);
        }
    }

    fn key(&self, what: &str) -> String {
        format!("{}/{what}", self.inner.config.prefix)
    }

    fn take_unwritten(&self) -> Option<crate::tenancy::Shared> {
        self.inner.unwritten.lock().take()
    }

    /// Write one of this node's tenancy changes; a failed one is kept for the next session
    /// (a revocation must never be lost, or the key would come back from etcd).
    async fn write_shared(
        &self,
        client: &mut Client,
        change: crate::tenancy::Shared,
    ) -> anyhow::Result<()> {
        // Bounded like the session's own calls: a write held by a member that lost its leader
        // must not hold up the lease's keep-alive.
        let write = self.inner.shared_tenancy.write(client, &change);
        let result = tokio::time::timeout(session::CALL_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "etcd did not answer a tenancy write within {:?}",
                    session::CALL_TIMEOUT
                ))
            });
        if result.is_err() {
            *self.inner.unwritten.lock() = Some(change);
        }
        result
    }

    /// A metrics handle for the forwarding layer.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
}
