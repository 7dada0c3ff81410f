//! Placement in the mesh: here, forward to a holder, or claim the one load in the mesh for
//! the node that should load it (chosen by room, warm tier, loads in flight, free bytes).

use std::time::{Duration, Instant};

use etcd_client::Client;

use super::{claim::Claimed, Cluster, Peer};
use crate::cache::CopyPhase;

/// What this node has of a model.
#[derive(Default)]
struct Local {
    ready: bool,
    loading: bool,
    /// Bytes of one copy (measured, or predicted before a load).
    bytes: u64,
}

/// How long a request waits for another node's claimed load before loading here (the
/// claim is asked about again every 250 ms: gone without a copy, the request places anew).
const CLAIM_WAIT: Duration = Duration::from_secs(120);

/// How long a pinned model may go without a copy before any node, chosen or not, loads it.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);

impl Cluster {
    /// Where a request for `model` (a model id, vmodels resolved) should run: `None` here,
    /// or the front door of the peer to forward it to. Here when a copy is ready or loading
    /// here; else the least leased peer with a ready copy that is not draining; else the
    /// node that claims the load in etcd first loads it (one load in the mesh) and the
    /// others wait for its copy and forward there (or load here if its claim goes away).
    pub async fn place(&self, model: &str) -> Option<Peer> {
        let here = self.local_state(model);
        if here.ready || here.loading {
            self.placed_by("here");
            return None;
        }
        if let Some(peer) = self.holder(model) {
            // Copies follow demand: when every copy in the mesh has more requests waiting
            // than its batch runs, and this node has room without evicting, a copy is added here
            // (at most one a node; an idle one leaves after its keep_alive).
            if self.all_queueing(model) && self.record().free() >= here.bytes {
                tracing::info!(%model, "Every copy is queueing; adding one here");
                self.placed_by("scale_out");
                return None;
            }
            self.placed_by("holder");
            return Some(peer);
        }
        let key = self.key(&format!("loading/{model}"));
        let me = self.inner.config.node.clone();
        let loader = self.choose_loader(model, here.bytes);
        let taken = match self
            .inner
            .claims
            .claim(key.clone(), model, &loader.node)
            .await
        {
            Claimed::Unknown => {
                self.placed_by("load_here");
                return None;
            }
            Claimed::Won => {
                self.count_placement(&loader.node, here.bytes);
                let here = loader.node == me;
                self.placed_by(if here { "load_here" } else { "load_peer" });
                return (!here).then_some(loader);
            }
            Claimed::Taken(node) => node,
        };
        if taken == me {
            self.placed_by("load_here");
            return None; // another node chose this one to load it
        }
        self.placed_by("wait");
        tracing::debug!(%model, loader = %taken, "Another node is loading it; waiting for its copy");
        let started = Instant::now();
        let mut asked = Instant::now();
        while started.elapsed() < CLAIM_WAIT {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if let Some(peer) = self.holder(model) {
                return Some(peer);
            }
            if asked.elapsed() >= Duration::from_millis(250) {
                asked = Instant::now();
                // The claim gone without a copy (the load failed, the copy was evicted, or its
                // claimant died):
                // place it again.
                match self.inner.claims.claim(key.clone(), model, &me).await {
                    Claimed::Taken(_) => {}
                    Claimed::Won | Claimed::Unknown => return None,
                }
            }
        }
        None
    }

    /// The node that should load `model` (`need` bytes): one with room without evicting, then
    /// one with the model in its warm tier, then the fewest loads in flight, then the most free
    /// bytes — counting the loads this node sent each node since its last record; this node
    /// on a tie (no hop).
    fn choose_loader(&self, model: &str, need: u64) -> Peer {
        let mine = self.record();
        let nodes = self.inner.nodes.read();
        let placed = self.inner.placed.lock();
        let me = &self.inner.config.node;
        let candidates = nodes
            .values()
            .filter(|n| n.node != *me && !n.draining)
            .chain(std::iter::once(&mine));
        let best = candidates
            .map(|n| {
                let (count, bytes) = placed.get(&n.node).copied().unwrap_or_default();
                let free = n.free().saturating_sub(bytes);
                let key = (
                    free >= need,
                    n.warm.iter().any(|w| w == model),
                    std::cmp::Reverse(n.loading.len() + count),
                    free,
                    n.node == *me,
                );
                (key, n)
            })
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, n)| n)
            .unwrap_or(&mine);
        Peer {
            node: best.node.clone(),
            http: best.http.clone(),
            grpc: best.grpc.clone(),
        }
    }

    /// Whether every live copy of `model` on other nodes has more requests waiting than its
    /// batch runs (leases over twice `max_concurrency`).
    fn all_queueing(&self, model: &str) -> bool {
        let Some(batch) = self.inner.cache.max_concurrency(model) else {
            return false;
        };
        let nodes = self.inner.nodes.read();
        let mut copies = nodes
            .values()
            .filter(|n| n.node != self.inner.config.node && !n.draining)
            .filter_map(|n| n.models.iter().find(|m| m.id == model && m.ready > 0))
            .peekable();
        copies.peek().is_some() && copies.all(|m| m.leases > 2 * batch * m.ready)
    }

    fn placed_by(&self, reason: &str) {
        self.inner
            .metrics
            .mesh_placements
            .with_label_values(&[reason])
            .inc();
    }

    /// Pinned models keep a copy somewhere in the mesh: a pinned model with no copy ready or
    /// loading on any live node (its holder died, or it was registered pinned) is loaded at
    /// once by the node placement would choose — or, when that node has not done it within
    /// a few seconds, by any node — under the same one-load claim as a request's.
    pub(super) async fn keep_pinned(&self) {
        if self
            .inner
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let me = self.inner.config.node.clone();
        let pinned: Vec<(String, u64)> = self
            .inner
            .cache
            .status()
            .into_iter()
            .filter(|m| m.pinned)
            .map(|m| (m.id, m.bytes.unwrap_or(0)))
            .collect();
        for (model, bytes) in pinned {
            let here = self.local_state(&model);
            let elsewhere = {
                let nodes = self.inner.nodes.read();
                nodes.values().any(|n| {
                    n.node != me
                        && !n.draining
                        && (n.loading.contains(&model)
                            || n.models.iter().any(|m| m.id == model && m.ready > 0))
                })
            };
            let since = {
                let mut orphans = self.inner.orphans.lock();
                if here.ready || here.loading || elsewhere {
                    orphans.remove(&model);
                    None
                } else {
                    Some(*orphans.entry(model.clone()).or_insert_with(Instant::now))
                }
            };
            let Some(since) = since else { continue };
            let chosen = self.choose_loader(&model, bytes).node == me;
            if !chosen && since.elapsed() < ORPHAN_GRACE {
                continue;
            }
            let key = self.key(&format!("loading/{model}"));
            if self.inner.claims.claim(key, &model, &me).await == Claimed::Won {
                tracing::info!(%model, "A pinned model has no copy in the mesh; loading it here");
                self.placed_by("pinned");
                let cache = self.inner.cache.clone();
                tokio::spawn(async move {
                    if let Err(e) = cache.load(&model).await {
                        tracing::warn!(%model, error = %e, "Loading a pinned model failed");
                    }
                });
            }
        }
    }

    fn count_placement(&self, node: &str, bytes: u64) {
        let mut placed = self.inner.placed.lock();
        let e = placed.entry(node.to_string()).or_default();
        e.0 += 1;
        e.1 += bytes;
    }

    /// The least leased peer (not this node, not draining) with a ready copy of `model`.
    fn holder(&self, model: &str) -> Option<Peer> {
        let nodes = self.inner.nodes.read();
        nodes
            .values()
            .filter(|n| n.node != self.inner.config.node && !n.draining)
            .filter_map(|n| {
                let m = n.models.iter().find(|m| m.id == model && m.ready > 0)?;
                Some((m.leases as f64 / m.ready as f64, n))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| Peer {
                node: n.node.clone(),
                http: n.http.clone(),
                grpc: n.grpc.clone(),
            })
    }

    fn local_state(&self, model: &str) -> Local {
        let status = self.inner.cache.status();
        let Some(m) = status.into_iter().find(|m| m.id == model) else {
            return Local::default();
        };
        Local {
            ready: m.copies.iter().any(|c| c.state == CopyPhase::Ready),
            loading: m.copies.iter().any(|c| c.state == CopyPhase::Loading),
            bytes: m.bytes.unwrap_or(0),
        }
    }

    /// Give back the claims whose load is over: a copy ready anywhere (as published), or no
    /// node loading it for a while (the load failed, or never started).
    pub(super) async fn release_claims(&self, client: &mut Client) -> anyhow::Result<()> {
        for (model, held) in self.inner.claims.held() {
            let here = self.local_state(&model);
            let (ready, loading) = {
                let nodes = self.inner.nodes.read();
                let ready = nodes
                    .values()
                    .any(|n| n.models.iter().any(|m| m.id == model && m.ready > 0));
                (ready, nodes.values().any(|n| n.loading.contains(&model)))
            };
            // A ready copy must be in the published records (this node's own included) before
            // the claim goes, and have been there a moment: a node whose view lags must see
            // the copy, not a free claim, or it would load a second one.
            let over = (ready && held > Duration::from_millis(500))
                || (!here.loading && !loading && held > Duration::from_secs(1));
            if over {
                let key = self.key(&format!("loading/{model}"));
                self.inner.claims.release(client, key, &model).await?;
            }
        }
        Ok(())
    }
}
