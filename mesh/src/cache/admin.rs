//! The cache's operator side: registering models and vmodels (persisted in order, outside
//! the state lock) and what the admin API lists.

use super::{config::ModelConfig, footprint, CacheError, CopyDetail, CopyStatus, VmodelStatus};
use tokio::time::Instant;

use crate::registry::Saved;

impl super::Cache {
    /// Register a model (persisted). Errors when the id is taken or it cannot fit anywhere.
    /// Its files are read and the registry written outside the state lock.
    pub async fn register(&self, config: ModelConfig) -> Result<(), CacheError> {
        let footprint = footprint(&config).await;
        let _order = self.inner.persist.lock().await;
        let saved = {
            let mut st = self.inner.state.lock();
            st.add(config, super::state::Origin::Api, footprint)?;
            st.registered()
        };
        self.save(saved).await
    }

    /// Unregister a model registered through the API (persisted). Idle copies are unloaded;
    /// copies in use serve their leases and leave after the last one.
    pub async fn unregister(&self, id: &str) -> Result<(), CacheError> {
        let _order = self.inner.persist.lock().await;
        let saved = {
            let mut st = self.inner.state.lock();
            st.remove(id, Instant::now(), &self.inner.metrics)?;
            st.registered()
        };
        self.inner.warm.lock().remove(id);
        self.inner.changed.notify_waiters();
        self.save(saved).await
    }

    /// Point vmodel `name` at `target`: the target is loaded first, then traffic moves.
    pub async fn set_vmodel(&self, name: &str, target: &str) -> Result<(), CacheError> {
        {
            let st = self.inner.state.lock();
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
        self.switch_vmodel(name, target).await
    }

    /// Point vmodel `name` at `target` as another node of the mesh did (it loaded the target
    /// first): traffic moves at once, to a copy wherever the mesh places one, so that a switch
    /// does not load the target on every node.
    pub async fn adopt_vmodel(&self, name: &str, target: &str) -> Result<(), CacheError> {
        self.switch_vmodel(name, target).await
    }

    async fn switch_vmodel(&self, name: &str, target: &str) -> Result<(), CacheError> {
        let _order = self.inner.persist.lock().await;
        let saved = {
            let mut st = self.inner.state.lock();
            if st.models.contains_key(name) {
                return Err(CacheError::Conflict(format!(
                    "{name:?} is a model, not a vmodel"
                )));
            }
            if !st.models.contains_key(target) {
                return Err(CacheError::NotFound(target.to_string()));
            }
            st.vmodels.insert(name.to_string(), target.to_string());
            st.registered()
        };
        self.save(saved).await?;
        tracing::info!(vmodel = %name, target = %target, "Switched vmodel");
        Ok(())
    }

    pub async fn remove_vmodel(&self, name: &str) -> Result<(), CacheError> {
        let _order = self.inner.persist.lock().await;
        let saved = {
            let mut st = self.inner.state.lock();
            st.vmodels
                .remove(name)
                .ok_or_else(|| CacheError::VmodelNotFound(name.to_string()))?;
            st.registered()
        };
        self.save(saved).await
    }

    pub fn status(&self) -> Vec<CopyStatus> {
        self.inner.state.lock().status(Instant::now())
    }

    pub fn vmodels(&self) -> Vec<VmodelStatus> {
        self.inner
            .state
            .lock()
            .vmodels
            .iter()
            .map(|(n, t)| VmodelStatus {
                name: n.clone(),
                target: t.clone(),
            })
            .collect()
    }

    /// How many requests one copy of `model` runs at once (`max_concurrency`).
    pub fn max_concurrency(&self, model: &str) -> Option<usize> {
        let st = self.inner.state.lock();
        st.models.get(model).map(|e| e.config.max_concurrency)
    }

    /// The models whose image is in the warm tier (a page-in from memory).
    pub fn warm_models(&self) -> Vec<String> {
        self.inner.warm.lock().ids()
    }

    /// Bytes in use on each device, by name: (name, used, capacity).
    pub fn devices(&self) -> Vec<(String, u64, u64)> {
        self.inner
            .state
            .lock()
            .devices
            .iter()
            .map(|d| (d.name().to_string(), d.used(), d.capacity()))
            .collect()
    }

    /// Every device with its kind, why a GPU device takes no copies, and (for a usable GPU)
    /// the driver's (free, total) bytes, also published as `flatmesh_device_driver_used_bytes`.
    /// The driver is asked outside the state lock.
    pub fn device_views(&self) -> Vec<(super::DeviceView, Option<(u64, u64)>)> {
        let views = self.inner.state.lock().device_views();
        views
            .into_iter()
            .map(|v| {
                let driver = v.driver_memory();
                if let Some((free, total)) = driver {
                    self.inner
                        .metrics
                        .device_driver_used_bytes
                        .with_label_values(&[v.device.name()])
                        .set(total.saturating_sub(free) as i64);
                }
                (v, driver)
            })
            .collect()
    }

    /// Refresh `flatmesh_device_driver_used_bytes` (before a scrape).
    pub fn publish_driver_memory(&self) {
        self.device_views();
    }

    /// Copies of unregistered models still serving their last leases, by model.
    pub fn draining(&self) -> Vec<(String, CopyDetail)> {
        self.inner.state.lock().draining()
    }

    /// Write `saved` to the registry; the caller holds `persist`, not the state lock.
    async fn save(&self, saved: Saved) -> Result<(), CacheError> {
        if let Some(reg) = &self.inner.registry {
            reg.save(saved)
                .await
                .map_err(|e| CacheError::Unavailable(format!("cannot save the registry: {e:#}")))?;
        }
        Ok(())
    }
}
