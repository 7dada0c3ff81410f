//! Sessions with etcd, one member at a time: the loop that moves to another member or serves
//! alone, the lease and this node's record under it, the catch-up, and the watches.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchResponse,
};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    endpoints::Unreachable,
    watch::{self, Revisions},
    Cluster, NodeRecord, PUBLISH_EVERY,
};
use crate::tenancy::Shared;

/// How long one call of the session's own (publishing the record, a tenancy write) may take
/// before the member counts as failed.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What outlives one session: the lease (it belongs to the etcd cluster, not to the member
/// that granted it, so another member keeps it alive) and how far each watch got.
pub(super) struct Carry {
    lease: Option<i64>,
    from: Option<Revisions>,
    /// When etcd last answered this node.
    pub last_ok: Instant,
    /// Why the last session ended, told when the next one moves to another member.
    pub why: Option<String>,
    /// Sessions that ended in a row before their lease was renewed (the pause before the next
    /// grows with them).
    pub retries: u32,
}

impl Carry {
    pub fn new() -> Self {
        Carry {
            lease: None,
            from: None,
            last_ok: Instant::now(),
            why: None,
            retries: 0,
        }
    }

    /// Note a watch's answer; `at` picks that watch's revision.
    fn seen(
        &mut self,
        resp: &WatchResponse,
        at: fn(&mut Revisions) -> &mut i64,
    ) -> anyhow::Result<()> {
        let Some(from) = self.from.as_mut() else {
            return Ok(());
        };
        match watch::advance(*at(from), resp) {
            Ok(next) => {
                *at(from) = next;
                self.last_ok = Instant::now();
                Ok(())
            }
            Err(e) => {
                // Read everything again next time.
                self.from = None;
                Err(e)
            }
        }
    }
}

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

fn within<T>(
    what: &str,
    result: Result<anyhow::Result<T>, tokio::time::error::Elapsed>,
) -> anyhow::Result<T> {
    result.map_err(|_| anyhow::anyhow!("etcd did not answer {what} within {CALL_TIMEOUT:?}"))?
}

impl Cluster {
    /// How long the node goes on through the other etcd members, under the same lease and
    /// still counted as connected, before it takes etcd as lost: the lease's TTL (at least 3 s,
    /// time for the members to elect a new leader).
    pub(super) fn failover_window(&self) -> Duration {
        self.inner.config.lease_ttl.0.max(Duration::from_secs(3))
    }

    /// Connect, publish and watch. When a call fails, the next session goes on through another
    /// etcd member under the same lease, at once; when no member answers within the failover
    /// window, the node serves alone and tries again every second.
    pub(super) async fn run(self) {
        let mut carry = Carry::new();
        // The first loss after a success (or at start) is told; the retries are not.
        let mut told = false;
        loop {
            let Err(e) = self.session(&mut carry).await else {
                return;
            };
            self.inner
                .metrics
                .mesh_etcd_errors
                .with_label_values(&[&self.inner.config.node])
                .inc();
            let lost = e.downcast_ref::<Unreachable>().is_some()
                || carry.last_ok.elapsed() >= self.failover_window();
            if !lost {
                tracing::debug!(
                    error = format!("{e:#}"),
                    "An etcd call failed; going on through another member"
                );
                carry.why = Some(format!("{e:#}"));
                // Soon the first time (100 ms); a member that keeps failing is not hammered.
                let pause = Duration::from_millis(100 << carry.retries.min(4));
                carry.retries += 1;
                tokio::time::sleep(pause).await;
                continue;
            }
            carry.why = None;
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
                // Blind to the others' usage: budgets admit only this node's share of what
                // is left.
                let me = &self.inner.config.node;
                let others = self.inner.nodes.read().keys().filter(|n| *n != me).count();
                self.inner.limits.lost_sight(others + 1);
            } else if !told {
                tracing::warn!(error = format!("{e:#}"), "Cannot join the mesh through etcd; serving alone and trying again every second");
            } else {
                tracing::debug!(error = format!("{e:#}"), "etcd still unreachable");
            }
            told = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One session through one etcd member: the lease kept (or a fresh one), the record under
    /// it, the registry, tenancy and peers caught up (or their watches resumed at the revision
    /// they had reached), until an etcd call fails.
    pub(super) async fn session(&self, carry: &mut Carry) -> anyhow::Result<()> {
        let prefix = self.key("nodes/");
        let etcd = &self.inner.etcd;
        // Members are tried for the failover window only while the node is in the mesh (its
        // lease to keep); else one round, and the run loop tries again every second.
        let window = match self.connected() {
            true => self.failover_window(),
            false => Duration::ZERO,
        };
        let mut client = etcd.connect(&prefix, window, carry.why.as_deref()).await?;
        let publish = tokio::time::timeout(CALL_TIMEOUT, self.publish(&mut client, carry)).await;
        let (mut published, mut keep_stream) = within("the node's record", publish)?;
        carry.last_ok = Instant::now();
        let mut changes = self.inner.tenancy_changes.lock().await;
        let from = match carry.from {
            Some(from) => {
                self.inner.registry.resume(&client).await?;
                self.write_pending(&mut client, &mut changes).await?;
                from
            }
            None => self.catch_up(&mut client, &mut changes, &prefix).await?,
        };
        carry.from = Some(from);
        let shared = &self.inner.shared_tenancy;
        let mut events = watch::watch_prefix(&mut client, &prefix, from.nodes).await?;
        let mut registry_events = self
            .inner
            .registry
            .watch(&mut client, from.registry)
            .await?;
        let mut tenancy_events = shared.watch(&mut client, from.tenancy).await?;
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let beat = tokio::time::timeout(CALL_TIMEOUT, self.heartbeat(&mut client, &mut published)).await;
                    within("the heartbeat", beat)?;
                }
                ka = keep_stream.message() => {
                    match ka? {
                        Some(r) if r.ttl() > 0 => {
                            carry.last_ok = Instant::now();
                            carry.retries = 0;
                        }
                        _ => anyhow::bail!("the node's lease expired"),
                    }
                }
                ev = events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of the nodes ended") };
                    carry.seen(&resp, |r| &mut r.nodes)?;
                    self.apply_nodes(&resp, &prefix);
                }
                ev = registry_events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of the registry ended") };
                    carry.seen(&resp, |r| &mut r.registry)?;
                    self.inner.registry.apply(&resp, &self.inner.cache).await;
                }
                ev = tenancy_events.message() => {
                    let Some(resp) = ev? else { anyhow::bail!("the watch of tenancy ended") };
                    carry.seen(&resp, |r| &mut r.tenancy)?;
                    shared.apply(&resp, &self.inner.tenancy);
                }
                Some(change) = changes.recv() => {
                    self.write_shared(&mut client, change).await?;
                }
            }
        }
    }

    /// Everything read afresh: the registry, tenancy and the peers' records; the revisions
    /// to watch from.
    async fn catch_up(
        &self,
        client: &mut Client,
        changes: &mut UnboundedReceiver<Shared>,
        prefix: &str,
    ) -> anyhow::Result<Revisions> {
        let registry = self.inner.registry.sync(client, &self.inner.cache).await?;
        // This node's tenancy changes made while etcd was away go out before what etcd holds
        // comes in, so a key revoked here is not taken back from etcd.
        self.write_pending(client, changes).await?;
        let tenancy = self
            .inner
            .shared_tenancy
            .sync(client, &self.inner.tenancy)
            .await?;
        let nodes = self.load_nodes(client, prefix).await?;
        Ok(Revisions {
            nodes,
            registry,
            tenancy,
        })
    }

    /// Write this node's tenancy changes not yet in etcd.
    async fn write_pending(
        &self,
        client: &mut Client,
        changes: &mut UnboundedReceiver<Shared>,
    ) -> anyhow::Result<()> {
        let unwritten = self.take_unwritten();
        for change in unwritten
            .into_iter()
            .chain(std::iter::from_fn(|| changes.try_recv().ok()))
        {
            self.write_shared(client, change).await?;
        }
        Ok(())
    }

    /// Keep the lease when etcd still has it (another member took over), else take a fresh
    /// one, and publish this node's record under it.
    async fn publish(
        &self,
        client: &mut Client,
        carry: &mut Carry,
    ) -> anyhow::Result<(Published, LeaseKeepAliveStream)> {
        let cfg = &self.inner.config;
        let ttl = cfg.lease_ttl.0.as_secs() as i64;
        let kept = match carry.lease {
            Some(id) => (client.lease_time_to_live(id, None).await?.ttl() > 0).then_some(id),
            None => None,
        };
        let lease = match kept {
            Some(id) => id,
            None => client.lease_grant(ttl, None).await?.id(),
        };
        carry.lease = Some(lease);
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
        let was = self
            .inner
            .connected
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.limits.regained_sight();
        let endpoint = self.inner.etcd.current().unwrap_or_default();
        match (kept, was) {
            (None, _) => {
                tracing::info!(node = %cfg.node, http = %self.inner.http, etcd = %endpoint, "Joined the mesh")
            }
            (Some(_), false) => {
                tracing::info!(node = %cfg.node, etcd = %endpoint, "Back in the mesh under the same lease")
            }
            // Another member took over: the switch was told.
            (Some(_), true) => {}
        }
        let published = Published {
            key,
            lease,
            keeper,
            record,
            keep_every: Duration::from_secs((ttl as u64 / 3).max(1)),
            last_keep: Instant::now(),
            last_put: Instant::now(),
        };
        Ok((published, keep_stream))
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
