//! The model cache: copies of models paged in and out of the node's devices by LRU and
//! demand, pinned by leases while requests run, scaled to zero when idle.
//!
//! One lock guards all state (`State`); nothing awaits while holding it. Waiters sleep on one
//! `Notify` that fires on every change and re-check. Loads run on the blocking pool, at most
//! `max_parallel_loads` at a time, one per model however many requests want it.

mod admin;
mod advice;
pub mod config;
mod copy;
mod devices;
mod error;
mod evict;
mod history;
mod pin;
mod plan;
mod pool;
pub mod residency;
mod state;
mod status;
#[cfg(test)]
mod tests;
mod warm;

use parking_lot::Mutex;
use std::{sync::Arc, time::Duration};

use flatmesh_runtime::Engine;
use tokio::{
    sync::{Notify, Semaphore},
    time::Instant,
};

pub use self::copy::CopyId;
pub use self::devices::DeviceView;
pub use self::error::CacheError;
pub use self::history::{CacheEvent, EventKind};
use self::state::{Origin, State};
pub use self::status::{CopyDetail, CopyPhase, CopyStatus, ModelSource, ModelState, VmodelStatus};
use self::{
    config::{CacheConfig, ModelConfig},
    state::Load,
};
pub use crate::registry::FileRegistry as Registry;
use crate::{
    metrics::Metrics,
    registry::{ModelRegistry, Saved},
    scheduler::{Scheduler, Slot},
    units::KeepAlive,
};

/// The cloneable handle to the cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Prepared weights of recent loads (its own lock: images are big, the state lock short).
    warm: Mutex<warm::WarmTier>,
    changed: Notify,
    loads: Arc<Semaphore>,
    metrics: Metrics,
    config: CacheConfig,
    registry: Option<Arc<dyn ModelRegistry>>,
    /// Registry writes one at a time, in the order their changes were made; held across the
    /// write, never together with the state lock while awaiting.
    persist: tokio::sync::Mutex<()>,
    /// Who is asked which idle copies leave first (a residency plugin), if anyone.
    advisor: Mutex<Option<Arc<dyn residency::Advisor>>>,
}

/// A pin on a ready copy: while it lives the copy is not evicted. Dropping it unpins.
pub struct Lease {
    pub engine: Arc<dyn Engine>,
    /// The model the lease is on (after resolving a vmodel).
    pub model: String,
    /// The copy it is on, and that copy's device.
    pub copy: CopyId,
    pub device: String,
    gate: Scheduler,
    inner: Arc<Inner>,
    _place: Option<Slot>,
}

impl Lease {
    /// Take one of the copy's `max_concurrency` places if one is free now and nobody waits.
    pub fn try_enter(&mut self, tier: &str, weight: u32) -> bool {
        if self._place.is_none() {
            self._place = self.gate.try_acquire(tier, weight);
        }
        self._place.is_some()
    }

    /// Wait for one of the copy's places, in the tiers' fair order (once; later calls return
    /// at once). The gate came with the pin: nothing is looked up again (the model may be
    /// gone). Its wait has no bound of its own; were it to end, the lease would run without.
    pub async fn enter(&mut self, tier: &str, weight: u32) {
        if self._place.is_none() {
            self._place = self.gate.acquire(tier, weight).await.ok();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock();
        st.unpin(&self.model, self.copy, Instant::now(), &self.inner.metrics);
        drop(st);
        self.inner.changed.notify_waiters();
    }
}

/// A model's footprint, read from its files on the blocking pool.
async fn footprint(
    config: &ModelConfig,
) -> Result<flatmesh_runtime::Footprint, flatmesh_runtime::RuntimeError> {
    let (path, format) = (config.path.clone(), config.format);
    let read = tokio::task::spawn_blocking(move || match format {
        Some(f) => flatmesh_runtime::footprint(&path, f),
        None => Err(flatmesh_runtime::RuntimeError::InvalidRequest(
            "format is not set".into(),
        )),
    });
    read.await.unwrap_or_else(|e| {
        Err(flatmesh_runtime::RuntimeError::Inference(format!(
            "footprint task failed: {e}"
        )))
    })
}

impl Cache {
    /// A cache over the configured devices, with the configured models and those the
    /// registry file remembers (read now: this runs once, before serving).
    pub fn new(
        config: CacheConfig,
        models: &[ModelConfig],
        registry: Option<Registry>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let saved = match &registry {
            Some(reg) => reg.read()?,
            None => Saved::default(),
        };
        let registry = registry.map(|r| Arc::new(r) as Arc<dyn ModelRegistry>);
        Self::build(config, models, saved, registry, metrics)
    }

    /// `new` over any registry store.
    pub async fn open(
        config: CacheConfig,
        models: &[ModelConfig],
        registry: Option<Arc<dyn ModelRegistry>>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let saved = match &registry {
            Some(reg) => reg.load().await?,
            None => Saved::default(),
        };
        Self::build(config, models, saved, registry, metrics)
    }

    fn build(
        config: CacheConfig,
        models: &[ModelConfig],
        saved: Saved,
        registry: Option<Arc<dyn ModelRegistry>>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let mut state = State::new(&config.devices, config.keep_alive, &metrics);
        state.residency = config.residency;
        state.min_residency = config.min_residency.0;
        state.check_gpus(&config::gpu_memory);
        let size = |m: &ModelConfig| match m.format {
            Some(f) => flatmesh_runtime::footprint(&m.path, f),
            None => Err(flatmesh_runtime::RuntimeError::InvalidRequest(
                "format is not set".into(),
            )),
        };
        for m in models {
            state
                .add(m.clone(), Origin::Config, size(m))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        for m in saved.models {
            let id = m.id.clone();
            let footprint = size(&m);
            if let Err(e) = state.add(m, Origin::Saved, footprint) {
                tracing::warn!(model = %id, error = %e, "Skipping a registered model");
            }
        }
        for (name, target) in saved.vmodels {
            state.vmodels.insert(name, target);
        }
        Ok(Cache {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                warm: Mutex::new(warm::WarmTier::new(config.warm_capacity.0)),
                changed: Notify::new(),
                loads: Arc::new(Semaphore::new(config.max_parallel_loads)),
                metrics,
                config,
                registry,
                persist: tokio::sync::Mutex::new(()),
                advisor: Mutex::new(None),
            }),
        })
    }

    /// Ask `advisor` which idle copies leave first whenever a load needs room.
    pub fn set_advisor(&self, advisor: Arc<dyn residency::Advisor>) {
        *self.inner.advisor.lock() = Some(advisor);
    }

    /// Whether `id` names a model or a vmodel.
    pub fn contains(&self, id: &str) -> bool {
        self.inner.state.lock().resolve(id).is_some()
    }

    /// The model a name means: itself, or a vmodel's target.
    pub fn resolve(&self, id: &str) -> Option<String> {
        self.inner.state.lock().resolve(id)
    }

    /// What a model (not a vmodel) does, known from its format without loading it.
    pub fn kind(&self, model: &str) -> Option<flatmesh_runtime::ModelKind> {
        let st = self.inner.state.lock();
        st.models.get(model)?.config.format.map(|f| f.kind())
    }

    /// A lease on a loaded copy of `id` (a model or vmodel), loading it first if needed.
    /// Waits for a concurrency slot of the model too. `keep_alive` overrides the model's
    /// idle time from this request on.
    pub async fn acquire(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, CacheError> {
        self.acquire_for(id, keep_alive, Duration::ZERO).await
    }

    /// `acquire` for a caller whose tier keeps models resident longer: under memory pressure
    /// the copy counts as used `residency_bonus` later than it was.
    pub async fn acquire_for(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
        residency_bonus: Duration,
    ) -> Result<Lease, CacheError> {
        let mut lease = self.pin_for(id, keep_alive, residency_bonus).await?;
        // Outside the serve path (operators, a plugin's embedder on behalf of a request
        // already admitted): one tier of its own in the copy's fair order.
        lease.enter("", 1).await;
        Ok(lease)
    }

    /// A pin on a loaded copy of `id` (loading it first if needed), without its concurrency
    /// slot: `Lease::enter` takes that. The serve path pins, then waits for a fair execution
    /// slot, then enters, so the model's gate never reorders the tiers' fair queue.
    pub async fn pin_for(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
        residency_bonus: Duration,
    ) -> Result<Lease, CacheError> {
        self.pin(id, keep_alive, residency_bonus).await
    }

    fn spawn_load(&self, load: Load) {
        let inner = self.inner.clone();
        // A child of the request that needed the copy, when traced.
        let span = tracing::info_span!(target: crate::telemetry::TARGET, "page-in", flatmesh.model = %load.config.id, flatmesh.copy = %load.copy, flatmesh.device = %load.device.name());
        let work = async move {
            let _permit = inner.loads.clone().acquire_owned().await;
            let started = Instant::now();
            let (path, format) = (load.config.path.clone(), load.format);
            let (image, keep) = {
                let mut warm = inner.warm.lock();
                (warm.get(&load.config.id, &path), warm.enabled())
            };
            let source = if image.is_some() { "warm" } else { "disk" };
            crate::telemetry::attr(&tracing::Span::current(), "flatmesh.source", source);
            tracing::info!(model = %load.config.id, copy = %load.copy, device = %load.device.name(), predicted_bytes = load.reserved, source, "Loading model");
            let (from, device, batch) = (path.clone(), load.device.clone(), load.config.batch());
            let result = tokio::task::spawn_blocking(move || match image {
                Some(image) => {
                    flatmesh_runtime::load_image(&image, &device, batch).map(|e| (e, None))
                }
                None if keep => flatmesh_runtime::load_keeping_image(&from, format, &device, batch),
                None => flatmesh_runtime::load(&from, format, &device, batch).map(|e| (e, None)),
            })
            .await
            .unwrap_or_else(|e| {
                Err(flatmesh_runtime::RuntimeError::Inference(format!(
                    "load task failed: {e}"
                )))
            });
            let result = result.map(|(engine, image)| {
                if let Some(image) = image {
                    let mut warm = inner.warm.lock();
                    warm.put(&load.config.id, &path, image);
                    inner.metrics.warm_bytes.set(warm.used() as i64);
                }
                engine
            });
            inner
                .metrics
                .page_ins
                .with_label_values(&[source, if result.is_ok() { "ok" } else { "failed" }])
                .inc();
            if let Err(e) = &result {
                crate::telemetry::failed(&tracing::Span::current(), "load_failed", &e.to_string());
            }
            let seconds = started.elapsed().as_secs_f64();
            let (kind, detail) = match &result {
                Ok(_) => (
                    EventKind::PageIn,
                    format!("from {source} in {seconds:.2} s"),
                ),
                Err(e) => (EventKind::PageInFailed, e.to_string()),
            };
            let what = (
                load.config.id.clone(),
                load.copy.to_string(),
                load.device.clone(),
            );
            let mut st = inner.state.lock();
            st.finish_load(load, result, Instant::now(), seconds, &inner.metrics);
            st.history
                .push(kind, (&what.0, what.1, what.2.name()), detail);
            drop(st);
            inner.changed.notify_waiters();
        };
        tokio::spawn(tracing::Instrument::instrument(work, span));
    }

    /// The recent page-ins and evictions, newest first.
    pub fn recent_events(&self) -> Vec<CacheEvent> {
        self.inner.state.lock().history.recent()
    }

    /// Load `id` now if it is not loaded, and wait until it is (or fails).
    pub async fn load(&self, id: &str) -> Result<(), CacheError> {
        self.pin(id, None, Duration::ZERO).await.map(drop)
    }

    /// Unload `id` now if idle, or as soon as its last lease ends.
    pub fn unload(&self, id: &str) -> Result<(), CacheError> {
        let mut st = self.inner.state.lock();
        let model = st
            .resolve(id)
            .ok_or_else(|| CacheError::NotFound(id.to_string()))?;
        st.unload(&model, Instant::now(), &self.inner.metrics);
        drop(st);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Load the pinned models (and, with `cache.preload`, every model that fits).
    /// Only as many as fit in the pool together: preloading never evicts.
    pub async fn preload(&self) {
        let ids: Vec<String> = {
            let st = self.inner.state.lock();
            let mut room: u64 = st.devices.iter().map(|d| d.capacity()).sum();
            let mut ids = Vec::new();
            let pinned_first = st.models.values().filter(|e| e.config.pinned).chain(
                st.models
                    .values()
                    .filter(|e| !e.config.pinned && self.inner.config.preload),
            );
            for e in pinned_first {
                let need = st.predicted(&e.config.id).unwrap_or(0);
                if e.config.pinned || need <= room {
                    room = room.saturating_sub(need);
                    ids.push(e.config.id.clone());
                }
            }
            ids
        };
        let loads = ids.iter().map(|id| async move {
            if let Err(e) = self.load(id).await {
                tracing::warn!(model = %id, error = %e, "Preload did not complete");
            }
        });
        futures::future::join_all(loads).await;
    }

    /// Unload idle copies whose keep-alive ran out; runs until `shutdown` resolves.
    pub async fn run_reaper(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut st = self.inner.state.lock();
                st.expire(
                    Instant::now(),
                    self.inner.config.min_residency.0,
                    &self.inner.metrics,
                )
            };
            let sleep = tokio::time::sleep_until(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                _ = &mut shutdown => return,
                _ = sleep => {}
                _ = notified => {}
            }
        }
    }
}

impl Inner {
    fn advisor(&self) -> Option<Arc<dyn residency::Advisor>> {
        self.advisor.lock().clone()
    }
}
