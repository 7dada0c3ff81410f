//! The model cache: copies of models paged in and out of the node's devices by LRU and
//! demand, pinned by leases while requests run, scaled to zero when idle.
//!
//! One lock guards all state (`State`); nothing awaits while holding it. Waiters sleep on one
//! `Notify` that fires on every change and re-check. Loads run on the blocking pool, at most
//! `max_parallel_loads` at a time, one per model however many requests want it.

mod plan;
mod registry;
pub mod residency;
mod state;
#[cfg(test)]
mod tests;
mod warm;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use flatmesh_runtime::Engine;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

pub use self::registry::Registry;
pub use self::state::{CopyStatus, VmodelStatus};
use self::state::{Slot, State};
use crate::{
    config::{CacheConfig, ModelConfig},
    metrics::Metrics,
    units::KeepAlive,
};

/// Why the cache cannot hand out a copy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("model {0:?} does not exist")]
    NotFound(String),
    #[error("model {id:?} failed to load: {reason}")]
    Failed {
        id: String,
        reason: String,
        retry_after: Duration,
    },
    #[error("no room for model {id:?}: every device is full of copies in use (waited {waited:?})")]
    NoRoom { id: String, waited: Duration },
    #[error("model {id:?} needs {need} bytes but the largest device holds {largest}")]
    TooLarge { id: String, need: u64, largest: u64 },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

impl CacheError {
    /// Seconds a client should wait before trying again, where that makes sense.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            CacheError::Failed { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            CacheError::NoRoom { .. } => Some(5),
            _ => None,
        }
    }
}

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
    registry: Option<Registry>,
}

/// A pin on a loaded copy: while it lives the copy is not evicted. Dropping it unpins.
pub struct Lease {
    pub engine: Arc<dyn Engine>,
    /// The model the lease is on (after resolving a vmodel).
    pub model: String,
    inner: Arc<Inner>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    /// Wait for one of the model's `max_concurrency` slots (once; later calls return at once).
    pub async fn enter(&mut self) {
        if self._permit.is_some() {
            return;
        }
        let gate = self.inner.lock().gate(&self.model);
        let permit = gate.acquire_owned().await.expect("gates are never closed");
        self._permit = Some(permit);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.unpin(&self.model, Instant::now(), &self.inner.metrics);
        drop(st);
        self.inner.changed.notify_waiters();
    }
}

impl Cache {
    /// A cache over the configured devices, with the configured models and those the
    /// registry remembers.
    pub fn new(
        config: CacheConfig,
        models: &[ModelConfig],
        registry: Option<Registry>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let mut state = State::new(&config.devices, config.keep_alive, &metrics);
        for m in models {
            state
                .add(m.clone(), true)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(reg) = &registry {
            let saved = reg.read()?;
            for m in saved.models {
                if let Err(e) = state.add(m.clone(), false) {
                    tracing::warn!(model = %m.id, error = %e, "Skipping a registered model");
                }
            }
            for (name, target) in saved.vmodels {
                state.vmodels.insert(name, target);
            }
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
            }),
        })
    }

    /// Whether `id` names a model or a vmodel.
    pub fn contains(&self, id: &str) -> bool {
        self.inner.lock().resolve(id).is_some()
    }

    /// The model a name means: itself, or a vmodel's target.
    pub fn resolve(&self, id: &str) -> Option<String> {
        self.inner.lock().resolve(id)
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
        lease.enter().await;
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

    /// Pin a copy without taking a concurrency slot.
    async fn pin(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
        residency_bonus: Duration,
    ) -> Result<Lease, CacheError> {
        let inner = &self.inner;
        let started = Instant::now();
        let deadline = started + inner.config.pressure_wait.0;
        let mut missed = false;
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = inner.lock();
                let model = st
                    .resolve(id)
                    .ok_or_else(|| CacheError::NotFound(id.to_string()))?;
                let now = Instant::now();
                match st.try_pin(&model, now, keep_alive, residency_bonus) {
                    Slot::Pinned(engine) => {
                        if missed {
                            let waited = started.elapsed().as_secs_f64();
                            inner
                                .metrics
                                .cache_miss_seconds
                                .with_label_values(&[&model])
                                .observe(waited);
                        }
                        return Ok(Lease {
                            engine,
                            model,
                            inner: inner.clone(),
                            _permit: None,
                        });
                    }
                    Slot::Loading => missed = true,
                    Slot::Failed(reason, retry_at) => {
                        return Err(CacheError::Failed {
                            id: model,
                            reason,
                            retry_after: retry_at - now,
                        });
                    }
                    Slot::Cold => {
                        missed = true;
                        match st.start_load(&model, now, &inner.metrics)? {
                            Some(load) => {
                                drop(st);
                                self.spawn_load(load);
                                continue;
                            }
                            None if now >= deadline => {
                                return Err(CacheError::NoRoom {
                                    id: model,
                                    waited: now - started,
                                });
                            }
                            None => {}
                        }
                    }
                }
            }
            let _ = tokio::time::timeout_at(
                deadline.max(Instant::now() + Duration::from_millis(50)),
                notified,
            )
            .await;
        }
    }

    fn spawn_load(&self, load: state::Load) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _permit = inner
                .loads
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let started = Instant::now();
            let (path, format) = (load.config.path.clone(), load.format);
            let (image, keep) = {
                let mut warm = inner.warm();
                (warm.get(&load.config.id, &path), warm.enabled())
            };
            let source = if image.is_some() { "warm" } else { "disk" };
            tracing::info!(model = %load.config.id, device = load.device, predicted_bytes = load.reserved, source, "Loading model");
            let from = path.clone();
            let result = tokio::task::spawn_blocking(move || match image {
                Some(image) => flatmesh_runtime::load_image(&image).map(|e| (e, None)),
                None if keep => flatmesh_runtime::load_keeping_image(&from, format),
                None => flatmesh_runtime::load(&from, format).map(|e| (e, None)),
            })
            .await
            .unwrap_or_else(|e| {
                Err(flatmesh_runtime::RuntimeError::Inference(format!(
                    "load task failed: {e}"
                )))
            });
            let result = result.map(|(engine, image)| {
                if let Some(image) = image {
                    let mut warm = inner.warm();
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
            let seconds = started.elapsed().as_secs_f64();
            let mut st = inner.lock();
            st.finish_load(load, result, Instant::now(), seconds, &inner.metrics);
            drop(st);
            inner.changed.notify_waiters();
        });
    }

    /// Load `id` now if it is not loaded, and wait until it is (or fails).
    pub async fn load(&self, id: &str) -> Result<(), CacheError> {
        self.pin(id, None, Duration::ZERO).await.map(drop)
    }

    /// Unload `id` now if idle, or as soon as its last lease ends.
    pub fn unload(&self, id: &str) -> Result<(), CacheError> {
        let mut st = self.inner.lock();
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
            let st = self.inner.lock();
            let mut room: u64 = st.devices.iter().map(|d| d.capacity).sum();
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
                let mut st = self.inner.lock();
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

    /// Register a model (persisted). Errors when the id is taken or it cannot fit anywhere.
    pub fn register(&self, config: ModelConfig) -> Result<(), CacheError> {
        let mut st = self.inner.lock();
        st.add(config, false)?;
        self.persist(&st)
    }

    /// Unregister a model registered through the API (persisted); its copy is unloaded.
    pub fn unregister(&self, id: &str) -> Result<(), CacheError> {
        let mut st = self.inner.lock();
        st.remove(id, Instant::now(), &self.inner.metrics)?;
        self.inner.warm().remove(id);
        self.persist(&st)?;
        drop(st);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Point vmodel `name` at `target`: the target is loaded first, then traffic moves.
    pub async fn set_vmodel(&self, name: &str, target: &str) -> Result<(), CacheError> {
        {
            let st = self.inner.lock();
            if st.models.contains_key(name) {
                return Err(CacheError::Conflict(format!(
                    "{name:?} is a model, not a vmodel"
                )));
            }
            if !st.models.contains_key(target) {
                return Err(CacheError::NotFound(target.to_string()));
            }
        }
        self.load(target).await?;
        let mut st = self.inner.lock();
        st.vmodels.insert(name.to_string(), target.to_string());
        self.persist(&st)?;
        tracing::info!(vmodel = %name, target = %target, "Switched vmodel");
        Ok(())
    }

    pub fn remove_vmodel(&self, name: &str) -> Result<(), CacheError> {
        let mut st = self.inner.lock();
        st.vmodels
            .remove(name)
            .ok_or_else(|| CacheError::NotFound(name.to_string()))?;
        self.persist(&st)
    }

    pub fn status(&self) -> Vec<CopyStatus> {
        self.inner.lock().status(Instant::now())
    }

    pub fn vmodels(&self) -> Vec<VmodelStatus> {
        self.inner
            .lock()
            .vmodels
            .iter()
            .map(|(n, t)| VmodelStatus {
                name: n.clone(),
                target: t.clone(),
            })
            .collect()
    }

    /// Bytes in use on each device, by name.
    pub fn devices(&self) -> Vec<(String, u64, u64)> {
        self.inner
            .lock()
            .devices
            .iter()
            .map(|d| (d.name.clone(), d.used, d.capacity))
            .collect()
    }

    fn persist(&self, st: &State) -> Result<(), CacheError> {
        if let Some(reg) = &self.inner.registry {
            reg.write(&st.registered())
                .map_err(|e| CacheError::Invalid(format!("cannot save the registry: {e:#}")))?;
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn warm(&self) -> MutexGuard<'_, warm::WarmTier> {
        self.warm.lock().unwrap_or_else(|e| e.into_inner())
    }
}
