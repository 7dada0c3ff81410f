//! One connected session with etcd: the lease and this node's record under it, the catch-up, and the watches.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchResponse,
};

use super::{watch, Cluster, NodeRecord, PUBLISH_EVERY};

/// This node's record as published under the session's lease, and the lease kept alive.
struct Published {
    /// The record's key, `{prefix}/nodes/{node}`.
    key: String,
    lease: i64,
    keeper: LeaseKeeper,
    record: NodeRecord,
    /// How often the lease is renewed; the record is written again at thrice that at most.
    keep_every: Duration,
    last_keep: Instant,
    last_put: Instant,
}

fn encode(r: &NodeRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("a record serializes")
}

impl Cluster {
    /// One connected session: a fresh lease, the record under it, the registry synced, and
    /// the peers watched, until an etcd call fails.
    pub(super) async fn session(&self) -> anyhow::Result<()> {
        let (mut client, mut published, mut keep_stream) = self.connect().await?;
        let registry_from = self
            .inner
            .registry
            .sync(&mut client, &self.inner.cache)
            .await?;
        let mut changes = self.inner.tenancy_changes.lock().await;
        let shared = &self.inner.shared_tenancy;
        // This node's tenancy changes made while etcd was away go out before what etcd holds
        // comes in, so a key revoked here is not taken back from etcd.
        let unwritten = self.take_unwritten();
        for change in unwritten
            .into_iter()
            .chain(std::iter::from_fn(|| changes.try_recv().ok()))
        {
            self.write_shared(&mut client, change).await?;
        }
        let tenancy_from = shared.sync(&mut client, &self.inner.tenancy).await?;
        let prefix = self.key("nodes/");
        let watch_from = self.load_nodes(&mut client, &prefix).await?;
        let mut events = watch::watch_prefix(&mut client, &prefix, watch_from).await?;
        let mut registry_events = self
            .inner
            .registry
            .watch(&mut client, registry_from)
            .await?;
        let mut tenancy_events = shared.watch(&mut client, tenancy_from).await?;
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => self.heartbeat(&mut client, &mut published).await?,
                ka = keep_stream.message() => {
                    match ka? {
                        Some(r) if r.ttl() > 0 => {}
                        _ => anyhow::bail!("the node's lease expired"),
                    }
                }
                ev = events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of the nodes ended") };
                    self.apply_nodes(&resp, &prefix);
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

    /// Connect, take a fresh lease, and publish this node's record under it.
    async fn connect(&self) -> anyhow::Result<(Client, Published, LeaseKeepAliveStream)> {
        let cfg = &self.inner.config;
        let options = match &cfg.etcd_tls {
            Some(tls) => Some(etcd_client::ConnectOptions::new().with_tls(tls.options()?)),
            None => None,
        };
        let connect = Client::connect(cfg.etcd.clone(), options);
        let mut client = tokio::time::timeout(Duration::from_secs(3), connect).await??;
        let ttl = cfg.lease_ttl.0.as_secs() as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (keeper, keep_stream) = client.lease_keep_alive(lease).await?;
        self.inner.claims.connect(client.clone(), lease);
        let key = self.key(&format!("nodes/{}", cfg.node));
        let record = self.record();
        client
            .put(
                key.clone(),
                encode(&record),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        self.inner
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(node = %cfg.node, http = %self.inner.http, "Joined the mesh");
        let published = Published {
            key,
            lease,
            keeper,
            record,
            keep_every: Duration::from_secs((ttl as u64 / 3).max(1)),
            last_keep: Instant::now(),
            last_put: Instant::now(),
        };
        Ok((client, published, keep_stream))
    }

    /// Read every node's record; returns the revision to watch from.
    async fn load_nodes(&self, client: &mut Client, prefix: &str) -> anyhow::Result<i64> {
        let found = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut nodes = self.inner.nodes.write();
        nodes.clear();
        for kv in found.kvs() {
            if let Ok(r) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                nodes.insert(r.node.clone(), r);
            }
        }
        self.share_usage(&nodes);
        Ok(found.header().map_or(0, |h| h.revision()) + 1)
    }

    /// Each tick: renew the lease when due, release claims, and publish the record when it
    /// changed (or has not been written for a while).
    async fn heartbeat(&self, client: &mut Client, p: &mut Published) -> anyhow::Result<()> {
        if p.last_keep.elapsed() >= p.keep_every {
            p.keeper.keep_alive().await?;
            p.last_keep = Instant::now();
        }
        self.release_claims(client).await?;
        let now = self.record();
        if now != p.record || p.last_put.elapsed() >= p.keep_every * 3 {
            let options = Some(PutOptions::new().with_lease(p.lease));
            client.put(p.key.clone(), encode(&now), options).await?;
            p.last_put = Instant::now();
            p.record = now;
        }
        Ok(())
    }

    /// Apply a change to the peers' records.
    fn apply_nodes(&self, resp: &WatchResponse, prefix: &str) {
        let mut nodes = self.inner.nodes.write();
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let name = String::from_utf8_lossy(kv.key())
                .trim_start_matches(prefix)
                .to_string();
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
}
