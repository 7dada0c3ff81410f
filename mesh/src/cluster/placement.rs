//! Placement in the mesh: here, forward to a holder, or claim the one load in the mesh for
//! the node that should load it (chosen by room, cost, warm tier, fewest copies, then a hash).

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use etcd_client::Client;

use super::{claim::Claimed, Cluster, ModelHere, NodeRecord, Peer};
use crate::{cache::CopyPhase, tenancy::Tier};

/// What this node has of a model.
#[derive(Default)]
struct Local {
    ready: bool,
    loading: bool,
    /// Bytes of one copy (measured, or predicted before a load).
    bytes: u64,
}

/// How long a request waits for another node's claimed load before placing it itself (the
/// claim is asked about again every 250 ms: gone without a copy, the request places anew).
const CLAIM_WAIT: Duration = Duration::from_secs(120);

/// How long a pinned model may go without a copy before any node, chosen or not, loads it.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);

/// No live node of the mesh may serve the request: its tier is held to pools or labels that
/// no live node (able to take work) has.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "tier {tier:?} may run only on {confinement}, and no live node of the mesh there can take \
     work now (this node is in pool {pool:?})"
)]
pub struct Confined {
    pub tier: String,
    pub confinement: String,
    pub pool: String,
}

/// A cost weight as a key that orders (validated finite and ≥ 0 where it is configured).
fn cost_key(cost: f64) -> u64 {
    (cost * 1e6).round() as u64
}

impl Cluster {
    /// Whether this node may serve `tier` at all (its pool and labels).
    pub fn runs_here(&self, tier: &Tier) -> bool {
        let c = &self.inner.config;
        tier.runs_on(&c.pool, &c.labels)
    }

    /// Why `tier` cannot be served here, as the serve path reports it.
    pub fn confined(&self, tier: &Tier) -> Confined {
        Confined {
            tier: tier.name.clone(),
            confinement: tier.confinement(),
            pool: self.inner.config.pool.clone(),
        }
    }

    fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Where a request of `tier` for `model` (a model id, vmodels resolved) should run: `None`
    /// here, or the front door of the peer to forward it to; only nodes of the tier's pools and
    /// labels count. Here when a copy is ready or loading here (unless a cheaper node's copy is
    /// not queueing); else the holder with the cheapest copy that is not queueing, least leased
    /// first; else the node that claims the load in etcd first loads it (one load in the mesh
    /// per model, per tier for a tier held to pools) and the others wait for its copy and
    /// forward there (or place again if its claim goes away). A draining node takes new work
    /// only when no other node can.
    pub async fn place(&self, model: &str, tier: &Tier) -> Result<Option<Peer>, Confined> {
        let me = self.inner.config.node.clone();
        let allowed = |n: &NodeRecord| tier.runs_on(&n.pool, &n.labels);
        let key = match tier.confined() {
            false => self.key(&format!("loading/{model}")),
            // Another tier's load may land where this one may not run: a load of its own
            // (`@` is not allowed in ids).
            true => self.key(&format!("loading/{model}@{}", tier.name)),
        };
        let started = Instant::now();
        let mut waiting = false;
        loop {
            // Read again each pass: a drain that begins while a request waits counts.
            let here_ok = self.runs_here(tier) && !self.draining();
            let here = self.local_state(model);
            let holder = self.holder(model, &allowed);
            if here_ok && (here.ready || here.loading) {
                match holder {
                    Some((peer, cost, false)) if cost < self.inner.config.cost => {
                        self.placed_by("cheaper_holder");
                        return Ok(Some(peer));
                    }
                    _ => {
                        self.placed_by("here");
                        return Ok(None);
                    }
                }
            }
            if let Some((peer, _, _)) = holder {
                // Copies follow demand: when every copy in the mesh has more requests waiting
                // than its batch runs, and this node has room without evicting, a copy is added
                // here (at most one a node; an idle one leaves after its keep_alive).
                if here_ok
                    && self.all_queueing(model, &allowed)
                    && self.record().free() >= here.bytes
                {
                    tracing::info!(%model, "Every copy is queueing; adding one here");
                    self.placed_by("scale_out");
                    return Ok(None);
                }
                self.placed_by("holder");
                return Ok(Some(peer));
            }
            let Some(loader) = self.choose_loader(model, here.bytes, &allowed) else {
                return self.last_resort(tier);
            };
            let taken = match self
                .inner
                .claims
                .claim(key.clone(), model, &loader.node)
                .await
            {
                Claimed::Unknown if here_ok => {
                    self.placed_by("load_here");
                    return Ok(None);
                }
                Claimed::Unknown => {
                    self.placed_by("load_peer");
                    return Ok(Some(loader));
                }
                Claimed::Won => {
                    self.count_placement(&loader.node, here.bytes);
                    let here = loader.node == me;
                    self.placed_by(if here { "load_here" } else { "load_peer" });
                    return Ok((!here).then_some(loader));
                }
                Claimed::Taken(node) => node,
            };
            if taken == me && here_ok {
                self.placed_by("load_here");
                return Ok(None); // another node chose this one to load it
            }
            // (Chosen before it began draining, a draining node waits like the others: with no
            // load here the claim is given back within a second and placed anew.)
            if !waiting {
                waiting = true;
                self.placed_by("wait");
                tracing::debug!(%model, loader = %taken, "Another node is loading it; waiting for its copy");
            }
            if started.elapsed() >= CLAIM_WAIT {
                // Its load never came: forward to the node named, or serve here.
                return match self.live_peer(&taken, &allowed) {
                    Some(peer) => Ok(Some(peer)),
                    None if here_ok => Ok(None),
                    None => self.last_resort(tier),
                };
            }
            // Look for its copy; then ask about the claim again (gone without a copy: the load
            // failed, the copy was evicted, or its claimant died — place it anew).
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_millis(250) {
                tokio::time::sleep(Duration::from_millis(25)).await;
                if let Some((peer, _, _)) = self.holder(model, &allowed) {
                    return Ok(Some(peer));
                }
            }
        }
    }

    /// No node able to take work may serve the tier: a draining node still serves it itself
    /// when it may; else the request is refused.
    fn last_resort(&self, tier: &Tier) -> Result<Option<Peer>, Confined> {
        if self.runs_here(tier) {
            self.placed_by("here");
            Ok(None)
        } else {
            self.placed_by("confined");
            Err(self.confined(tier))
        }
    }

    /// `node`'s front doors, when it is a live peer that `allowed` admits and not draining.
    fn live_peer(&self, node: &str, allowed: &dyn Fn(&NodeRecord) -> bool) -> Option<Peer> {
        let nodes = self.inner.nodes.read();
        nodes
            .get(node)
            .filter(|n| n.node != self.inner.config.node && !n.draining && allowed(n))
            .map(peer_of)
    }

    /// The node that should load `model` (`need` bytes), of those `allowed` admits and not
    /// draining: of the nodes with room without evicting, the cheapest, with the model in its
    /// warm tier, those with the fewest copies (ready, loading, and the loads this node sent
    /// each since its last record) or one more; of those this node (no hop), else the one the
    /// model hashes to (rendezvous hashing: a burst of cold models spreads over them instead of
    /// herding onto the emptiest, even when many nodes choose at once from records a moment
    /// old). None when no node qualifies.
    fn choose_loader(
        &self,
        model: &str,
        need: u64,
        allowed: &dyn Fn(&NodeRecord) -> bool,
    ) -> Option<Peer> {
        let mine = self.record();
        let nodes = self.inner.nodes.read();
        let placed = self.inner.placed.lock();
        let me = &self.inner.config.node;
        let candidates: Vec<(&NodeRecord, u64, usize)> = nodes
            .values()
            .filter(|n| n.node != *me)
            .chain(std::iter::once(&mine))
            .filter(|n| !n.draining && allowed(n))
            .map(|n| {
                let (count, bytes) = placed.get(&n.node).copied().unwrap_or_default();
                let copies = n.models.len() + n.loading.len() + count;
                (n, n.free().saturating_sub(bytes), copies)
            })
            .collect();
        let class = |(n, free, _): &(&NodeRecord, u64, usize)| {
            (
                *free >= need,
                std::cmp::Reverse(cost_key(n.cost)),
                n.warm.iter().any(|w| w == model),
            )
        };
        let best = candidates.iter().map(class).max()?;
        let top: Vec<_> = candidates.iter().filter(|c| class(c) == best).collect();
        let fewest = top.iter().map(|c| c.2).min()?;
        let near = top.into_iter().filter(|c| c.2 <= fewest + 1);
        let rank = |n: &NodeRecord| (n.node != *me, rendezvous(model, &n.node));
        near.map(|c| c.0).min_by_key(|n| rank(n)).map(peer_of)
    }

    /// Whether a copy of `model` with `ready` copies and `leases` leases has more requests
    /// waiting than its batch runs (leases over twice `max_concurrency` a copy).
    fn queueing(&self, model: &str, m: &ModelHere) -> bool {
        self.inner
            .cache
            .max_concurrency(model)
            .is_some_and(|batch| m.leases > 2 * batch * m.ready)
    }

    /// Whether every live copy of `model` on other nodes that `allowed` admits is queueing.
    fn all_queueing(&self, model: &str, allowed: &dyn Fn(&NodeRecord) -> bool) -> bool {
        let nodes = self.inner.nodes.read();
        let mut copies = nodes
            .values()
            .filter(|n| n.node != self.inner.config.node && !n.draining && allowed(n))
            .filter_map(|n| n.models.iter().find(|m| m.id == model && m.ready > 0))
            .peekable();
        copies.peek().is_some() && copies.all(|m| self.queueing(model, m))
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
        if self.draining() {
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
        let tiers = self.inner.tenancy.tiers();
        for (model, bytes) in pinned {
            // Only where a tier that may use it may run (anywhere when no tier is held).
            let users: Vec<&Tier> = tiers
                .iter()
                .filter(|t| t.models.iter().any(|p| crate::tenancy::glob(p, &model)))
                .map(|t| &**t)
                .collect();
            let allowed = |n: &NodeRecord| {
                users.is_empty() || users.iter().any(|t| t.runs_on(&n.pool, &n.labels))
            };
            let here = self.local_state(&model);
            let elsewhere = {
                let nodes = self.inner.nodes.read();
                nodes.values().any(|n| {
                    n.node != me
                        && !n.draining
                        && allowed(n)
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
            if !allowed(&self.record()) {
                continue;
            }
            let chosen = self
                .choose_loader(&model, bytes, &allowed)
                .is_some_and(|p| p.node == me);
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

    /// The peer (not this node, not draining, admitted by `allowed`) whose copy of `model`
    /// should take a request: not queueing first, then the cheapest, then the least leased;
    /// with its cost and whether it is queueing.
    fn holder(
        &self,
        model: &str,
        allowed: &dyn Fn(&NodeRecord) -> bool,
    ) -> Option<(Peer, f64, bool)> {
        let nodes = self.inner.nodes.read();
        nodes
            .values()
            .filter(|n| n.node != self.inner.config.node && !n.draining && allowed(n))
            .filter_map(|n| {
                let m = n.models.iter().find(|m| m.id == model && m.ready > 0)?;
                let queueing = self.queueing(model, m);
                let load = m.leases as f64 / m.ready as f64;
                Some(((queueing, cost_key(n.cost), load), n))
            })
            .min_by(|a, b| {
                let ((qa, ca, la), (qb, cb, lb)) = (a.0, b.0);
                (qa, ca).cmp(&(qb, cb)).then(la.total_cmp(&lb))
            })
            .map(|((queueing, _, _), n)| (peer_of(n), n.cost, queueing))
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
        for (key, held) in self.inner.claims.held() {
            let model = &held.model;
            let here = self.local_state(model);
            // Only the loader's own state counts: an unrelated load of the same model (another
            // tier's, outside this claim's pools) must not keep a failed claim held.
            let (ready, loading) = {
                let nodes = self.inner.nodes.read();
                let loader = nodes.get(&held.loader);
                let ready =
                    loader.is_some_and(|n| n.models.iter().any(|m| m.id == *model && m.ready > 0));
                let loading = loader.is_some_and(|n| n.loading.contains(model))
                    || (held.loader == self.inner.config.node && here.loading);
                (ready, loading)
            };
            // The loader's ready copy must be in the published records (this node's own
            // included) before the claim goes, and have been there a moment: a node whose view
            // lags must see the copy, not a free claim, or it would load a second one.
            let held_for = held.since.elapsed();
            let over = (ready && held_for > Duration::from_millis(500))
                || (!loading && held_for > Duration::from_secs(1));
            if over {
                self.inner.claims.release(client, key).await?;
            }
        }
        Ok(())
    }
}

/// The rendezvous weight of `node` for `model`: FNV-1a over both, the same on every node
/// whatever compiler built it (the standard hasher may change between releases).
fn rendezvous(model: &str, node: &str) -> u64 {
    let bytes = model
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(node.bytes());
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A node's front doors.
fn peer_of(n: &NodeRecord) -> Peer {
    Peer {
        node: n.node.clone(),
        http: n.http.clone(),
        grpc: n.grpc.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::rendezvous;

    #[test]
    fn rendezvous_weights_are_fixed_and_spread_models_over_nodes() {
        // Fixed values (FNV-1a 64 of b"\xff" and b"m\xffn"): a weight never depends on the build.
        assert_eq!(rendezvous("", ""), 0xaf64724c8602eb6e);
        assert_eq!(rendezvous("m", "n"), 0x985431918aaee91);
        assert_ne!(rendezvous("m", "n"), rendezvous("n", "m"));
        // Forty models over eight nodes: each node is first for some, none for most.
        let nodes: Vec<String> = (0..8).map(|i| format!("n{i:02}")).collect();
        let mut firsts = vec![0; nodes.len()];
        for m in 0..40 {
            let model = format!("cold{m:03}");
            let best = (0..nodes.len())
                .min_by_key(|&i| rendezvous(&model, &nodes[i]))
                .unwrap();
            firsts[best] += 1;
        }
        assert!(firsts.iter().all(|&n| (1..=12).contains(&n)), "{firsts:?}");
    }
}
