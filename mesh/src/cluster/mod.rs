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
mod placement;
mod registry;
mod tenancy;
mod watch;

use parking_lot::RwLock;
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};

use self::claim::Claims;
pub use self::config::{host_name, MeshConfig};
pub use self::registry::MeshRegistry;
use self::tenancy::SharedTenancy;
use crate::{
    cache::Cache,
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

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    http: String,
    grpc: String,
    cache: Cache,
    /// Live records by node name, this node's included (as last published).
    nodes: RwLock<BTreeMap<String, NodeRecord>>,
    draining: std::sync::atomic::AtomicBool,
    /// Whether the last etcd call worked.
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
    /// Join the mesh in the background: connect, publish, watch, and keep at it while etcd
    /// comes and goes. `http` is this node's front door as peers reach it.
    pub fn join(
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
        let cluster = Cluster {
            inner: Arc::new(Inner {
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
                metrics,
            }),
        };
        let me = cluster.clone();
        tokio::spawn(async move { me.run().await });
        // Pinned models are looked after on their own task: a slow etcd answering their
        // claims must not hold up the lease's keep-alive.
        let me = cluster.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEP_PINNED_EVERY);
            loop {
                tick.tick().await;
                if me.connected() {
                    me.keep_pinned().await;
                }
            }
        });
        cluster
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

    /// Stop taking new work: peers stop forwarding here at the next publish.
    pub fn drain(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
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
    pub fn status(&self) -> serde_json::Value {
        let nodes = self.inner.nodes.read();
        serde_json::json!({
            "node": self.inner.config.node,
            "etcd_connected": self.inner.connected.load(std::sync::atomic::Ordering::Relaxed),
            "nodes": nodes.values().collect::<Vec<_>>(),
        })
    }

    fn record(&self) -> NodeRecord {
        let cache = &self.inner.cache;
        let models = cache
            .status()
            .into_iter()
            .filter_map(|m| {
                let ready = m.copies.iter().filter(|c| c.state == "ready").count();
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
                .filter(|m| m.copies.iter().any(|c| c.state == "loading"))
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
        }
    }

    /// Sum what the other nodes publish per tenant this month, for the budgets here.
    fn share_usage(&self, nodes: &BTreeMap<String, NodeRecord>) {
        let mut sum: std::collections::HashMap<String, (u64, u64)> = Default::default();
        for n in nodes.values().filter(|n| n.node != self.inner.config.node) {
            for u in &n.usage {
                let e = sum.entry(u.tenant.clone()).or_insert((u.month, 0));
                if e.0 == u.month {
                    e.1 += u.tokens;
                } else if u.month > e.0 {
                    *e = (u.month, u.tokens);
                }
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

    /// Connect, publish and watch until etcd fails; then wait a moment and start again.
    async fn run(self) {
        // The first failure after a success (or at start) is told; the retries are not.
        let mut told = false;
        loop {
            match self.session().await {
                Ok(()) => return,
                Err(e) => {
                    self.inner.claims.disconnect();
                    let was = self
                        .inner
                        .connected
                        .swap(false, std::sync::atomic::Ordering::Relaxed);
                    told &= !was;
                    if was {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "Lost etcd; serving what this node holds and forwarding to known peers"
                        );
                    } else if !told {
                        tracing::warn!(error = format!("{e:#}"), "Cannot join the mesh through etcd; serving alone and trying again every second");
                    } else {
                        tracing::debug!(error = format!("{e:#}"), "etcd still unreachable");
                    }
                    told = true;
                    self.inner
                        .metrics
                        .mesh_etcd_errors
                        .with_label_values(&[&self.inner.config.node])
                        .inc();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One connected session: a fresh lease, the record under it, the registry synced, and
    /// the peers watched, until an etcd call fails.
    async fn session(&self) -> anyhow::Result<()> {
        let cfg = &self.inner.config;
        let options = match &cfg.etcd_tls {
            Some(tls) => Some(etcd_client::ConnectOptions::new().with_tls(tls.options()?)),
            None => None,
        };
        let connect = Client::connect(cfg.etcd.clone(), options);
        let mut client = tokio::time::timeout(Duration::from_secs(3), connect).await??;
        let ttl = cfg.lease_ttl.0.as_secs() as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await?;
        self.inner.claims.connect(client.clone(), lease);
        let me = self.key(&format!("nodes/{}", cfg.node));
        let mut published = self.record();
        let put = |r: &NodeRecord| serde_json::to_vec(r).expect("a record serializes");
        client
            .put(
                me.clone(),
                put(&published),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        self.inner
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(node = %cfg.node, http = %self.inner.http, "Joined the mesh");
        let registry_from = self
            .inner
            .registry
            .sync(&mut client, &self.inner.cache)
            .await?;
        // This node's tenancy changes made while etcd was away go out before what etcd holds
        // comes in, so a key revoked here is not taken back from etcd.
        let mut changes = self.inner.tenancy_changes.lock().await;
        let shared = &self.inner.shared_tenancy;
        let unwritten = self.take_unwritten();
        for change in unwritten
            .into_iter()
            .chain(std::iter::from_fn(|| changes.try_recv().ok()))
        {
            self.write_shared(&mut client, change).await?;
        }
        let tenancy_from = shared.sync(&mut client, &self.inner.tenancy).await?;

        let prefix = self.key("nodes/");
        let found = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        {
            let mut nodes = self.inner.nodes.write();
            nodes.clear();
            for kv in found.kvs() {
                if let Ok(r) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                    nodes.insert(r.node.clone(), r);
                }
            }
            self.share_usage(&nodes);
        }
        let watch_from = found.header().map_or(0, |h| h.revision()) + 1;
        let mut events = watch::watch_prefix(&mut client, &prefix, watch_from).await?;
        let mut registry_events = self
            .inner
            .registry
            .watch(&mut client, registry_from)
            .await?;
        let mut tenancy_events = shared.watch(&mut client, tenancy_from).await?;
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        let keep_every = Duration::from_secs((ttl as u64 / 3).max(1));
        let mut last_keep = Instant::now();
        let mut last_put = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if last_keep.elapsed() >= keep_every {
                        keeper.keep_alive().await?;
                        last_keep = Instant::now();
                    }
                    self.release_claims(&mut client).await?;
                    let now = self.record();
                    if now != published || last_put.elapsed() >= keep_every * 3 {
                        client.put(me.clone(), put(&now), Some(PutOptions::new().with_lease(lease))).await?;
                        last_put = Instant::now();
                        published = now;
                    }
                }
                ka = keep_stream.message() => {
                    match ka? {
                        Some(r) if r.ttl() > 0 => {}
                        _ => anyhow::bail!("the node's lease expired"),
                    }
                }
                ev = events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of the nodes ended") };
                    let mut nodes = self.inner.nodes.write();
                    for e in resp.events() {
                        let Some(kv) = e.kv() else { continue };
                        let name = String::from_utf8_lossy(kv.key()).trim_start_matches(&prefix).to_string();
                        match e.event_type() {
                            EventType::Put => {
                                if let Ok(r) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                                    // Its record now shows what was sent there.
                                    self.inner.placed.lock().remove(&r.node);
                                    nodes.insert(r.node.clone(), r);
                                }
                            }
                            EventType::Delete => {
                                nodes.remove(&name);
                            }
                        }
                    }
                    self.inner.metrics.mesh_nodes.set(nodes.len() as i64);
                    self.share_usage(&nodes);
                    self.count_copies(&nodes);
                }
                ev = registry_events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of the registry ended") };
                    self.inner.registry.apply(&resp, &self.inner.cache).await;
                }
                ev = tenancy_events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of tenancy ended") };
                    shared.apply(&resp, &self.inner.tenancy);
                }
                Some(change) = changes.recv() => {
                    self.write_shared(&mut client, change).await?;
                }
            }
        }
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
        let result = self.inner.shared_tenancy.write(client, &change).await;
        if result.is_err() {
            *self.inner.unwritten.lock() = Some(change);
        }
        result
    }

    /// Leave: publish the node as draining so peers stop forwarding here; its record goes
    /// with its lease after the process ends.
    pub async fn leave(&self) {
        self.drain();
        tokio::time::sleep(PUBLISH_EVERY * 2).await;
    }

    /// A metrics handle for the forwarding layer.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
}
