//! Leaving the mesh without failing a request: a draining node takes no new work (peers stop
//! forwarding to it, its own arrivals go to peers), its pinned models are loaded elsewhere, and
//! it is drained once nothing runs here and every pinned model here is ready on another node.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{Cluster, PUBLISH_EVERY};

/// Where a drain stands (`/admin/drain`).
#[derive(Debug, Clone, Serialize)]
pub struct DrainStatus {
    pub node: String,
    pub draining: bool,
    /// Nothing runs here and every pinned model here has a ready copy on another node.
    pub drained: bool,
    /// Requests holding a lease on this node's copies.
    pub leases: usize,
    /// Pinned models held here with no ready copy on another live node yet.
    pub pinned_here_only: Vec<String>,
}

impl Cluster {
    /// Stop taking new work: peers stop forwarding here at the next publish, requests that
    /// arrive here go to peers, and other nodes load this node's pinned models.
    pub fn drain(&self) {
        if !self.inner.draining.swap(true, Ordering::Relaxed) {
            tracing::info!("Draining: taking no new work; pinned models go to other nodes");
        }
    }

    /// Where this node's drain stands.
    pub fn drain_status(&self) -> DrainStatus {
        let me = &self.inner.config.node;
        let status = self.inner.cache.status();
        let leases = status
            .iter()
            .flat_map(|m| &m.copies)
            .map(|c| c.leases)
            .sum();
        let nodes = self.inner.nodes.read();
        let pinned_here_only: Vec<String> = status
            .iter()
            .filter(|m| m.pinned && !m.copies.is_empty())
            .filter(|m| {
                !nodes.values().any(|n| {
                    n.node != *me
                        && !n.draining
                        && n.models.iter().any(|c| c.id == m.id && c.ready > 0)
                })
            })
            .map(|m| m.id.clone())
            .collect();
        let draining = self.inner.draining.load(Ordering::Relaxed);
        DrainStatus {
            node: me.clone(),
            draining,
            drained: draining && leases == 0 && pinned_here_only.is_empty(),
            leases,
            pinned_here_only,
        }
    }

    /// Leave: publish the node as draining so peers stop forwarding here, then wait up to
    /// `mesh.drain_notice` until it is drained. Its record goes with its lease after the
    /// process ends.
    pub async fn leave(&self) {
        self.drain();
        tokio::time::sleep(PUBLISH_EVERY * 2).await;
        let notice = self.inner.config.drain_notice.0;
        if notice.is_zero() {
            return;
        }
        let started = Instant::now();
        loop {
            let status = self.drain_status();
            if status.drained {
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "Drained: nothing runs here and the pinned models are ready elsewhere"
                );
                return;
            }
            if started.elapsed() >= notice {
                tracing::warn!(
                    leases = status.leases,
                    pinned_here_only = ?status.pinned_here_only,
                    "The drain notice ran out before the node was drained; stopping"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
