//! One copy of a model on one device: loading, then ready, leased by the requests it runs.

use std::{sync::Arc, time::Duration};

use flatmesh_runtime::Engine;
use serde::Serialize;
use tokio::time::Instant;

use crate::scheduler::Scheduler;

use crate::units::KeepAlive;

/// Names one copy for as long as the process runs (never reused, also across re-registering
/// a model under the same id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CopyId(pub u64);

impl std::fmt::Display for CopyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "copy-{}", self.0)
    }
}

/// Where a copy is in its life.
pub enum CopyState {
    /// Being loaded; `reserved` bytes are counted on its device meanwhile.
    Loading {
        reserved: u64,
    },
    Ready(Ready),
}

/// A loaded copy.
pub struct Ready {
    pub engine: Arc<dyn Engine>,
    /// Measured weights plus the KV reservation, counted on the device.
    pub bytes: u64,
    pub loaded_at: Instant,
    pub last_used: Instant,
    /// Under memory pressure the copy ranks as if last used at this time (tier bonus).
    pub valued_until: Instant,
    /// Whether any request has pinned it since it loaded.
    pub used: bool,
    pub keep_alive: KeepAlive,
    /// Unload as soon as the last lease ends (an admin unload while leased).
    pub unload_when_idle: bool,
}

/// One copy of a model on one device.
pub struct ModelCopy {
    pub id: CopyId,
    /// Index into the cache's devices.
    pub device: usize,
    /// Leases on it (running, or waiting for one of its concurrency permits).
    pub pins: usize,
    /// `max_concurrency` places in the copy's batch, given out by the tiers' weights.
    pub gate: Scheduler,
    pub state: CopyState,
}

impl ModelCopy {
    pub fn loading(id: CopyId, device: usize, reserved: u64, concurrency: usize) -> Self {
        ModelCopy {
            id,
            device,
            pins: 0,
            gate: Scheduler::gate(concurrency),
            state: CopyState::Loading { reserved },
        }
    }

    pub fn ready(&self) -> Option<&Ready> {
        match &self.state {
            CopyState::Ready(r) => Some(r),
            CopyState::Loading { .. } => None,
        }
    }

    pub fn is_loading(&self) -> bool {
        matches!(self.state, CopyState::Loading { .. })
    }

    /// A ready copy nobody leases.
    pub fn is_idle(&self) -> bool {
        self.pins == 0 && self.ready().is_some()
    }

    /// When this idle copy's keep-alive runs out (`None`: never). A copy nobody has used yet
    /// gets at least a second for its waiters to pin it.
    pub fn expires_at(&self, min_residency: Duration) -> Option<Instant> {
        let r = self.ready()?;
        let KeepAlive::For(keep) = r.keep_alive else {
            return None;
        };
        Some((r.last_used + keep).max(r.loaded_at + floor(r, min_residency)))
    }

    /// Whether an idle copy may leave for room now: loaded at least `min_residency` ago (a
    /// second for one nobody has used yet, so its waiters can pin it before another load
    /// takes its room).
    pub fn settled(&self, now: Instant, min_residency: Duration) -> bool {
        self.ready()
            .is_some_and(|r| now >= r.loaded_at + floor(r, min_residency))
    }

    pub fn phase(&self) -> CopyPhase {
        match self.state {
            CopyState::Loading { .. } => CopyPhase::Loading,
            CopyState::Ready(_) => CopyPhase::Ready,
        }
    }
}

/// A copy's phase as status shows it (`loading`, `ready`, `draining` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyPhase {
    Loading,
    Ready,
    /// Its model was removed while leased: it serves its leases, then leaves.
    Draining,
}

impl CopyPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyPhase::Loading => "loading",
            CopyPhase::Ready => "ready",
            CopyPhase::Draining => "draining",
        }
    }
}

impl std::fmt::Display for CopyPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model's state as status shows it, from its copies (`cold`, `loading`, `ready`, `failed`
/// in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// No copy.
    Cold,
    /// A copy is loading, none is ready.
    Loading,
    /// At least one copy is ready.
    Ready,
    /// The last load failed; retried on use after a back-off.
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Cold => "cold",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A copy of a removed model that is still leased: its bytes stay counted on its device
/// until the last lease ends.
pub struct Draining {
    pub model: String,
    pub device: usize,
    pub bytes: u64,
    pub pins: usize,
}

/// How long a copy stays at least, whatever else happens to it.
fn floor(r: &Ready, min_residency: Duration) -> Duration {
    if r.used {
        min_residency
    } else {
        min_residency.max(Duration::from_secs(1))
    }
}
