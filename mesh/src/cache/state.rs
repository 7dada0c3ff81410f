//! The cache's state behind its one lock: models, their copies, devices, vmodels.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use flatmesh_runtime::{Engine, Format, ModelKind, RuntimeError};
use serde::Serialize;
use tokio::{sync::Semaphore, time::Instant};

use super::{
    plan::{place, DeviceRoom, Resident},
    registry::Saved,
    CacheError,
};
use crate::{
    config::{DeviceConfig, ModelConfig},
    metrics::Metrics,
    units::KeepAlive,
};

pub struct DeviceState {
    pub name: String,
    pub capacity: u64,
    /// Loaded copies plus reservations of loads in progress.
    pub used: u64,
}

pub struct Entry {
    pub config: ModelConfig,
    /// Declared in the config file (not removable through the API).
    from_config: bool,
    /// Predicted bytes (weights + KV reservation), `None` while the header cannot be read.
    predicted: Option<u64>,
    /// KV cache reserved on top of the measured weights.
    kv_reserve: u64,
    copy: CopyState,
    failures: u32,
    /// Bumped when the model is (re-)registered, so a stale load is discarded.
    generation: u64,
    gate: Arc<Semaphore>,
}

enum CopyState {
    Cold,
    Loading { device: usize, reserved: u64 },
    Loaded(Copy),
    Failed { reason: String, retry_at: Instant },
}

struct Copy {
    engine: Arc<dyn Engine>,
    device: usize,
    bytes: u64,
    loaded_at: Instant,
    last_used: Instant,
    /// Under memory pressure the copy ranks as if last used at this time (tier bonus).
    valued_until: Instant,
    pins: usize,
    used: bool,
    keep_alive: KeepAlive,
    unload_when_idle: bool,
}

/// What `try_pin` found.
pub enum Slot {
    Pinned(Arc<dyn Engine>),
    Loading,
    Cold,
    Failed(String, Instant),
}

/// A load to run: where, and how much was reserved for it.
pub struct Load {
    pub config: ModelConfig,
    pub format: Format,
    pub device: usize,
    pub reserved: u64,
    generation: u64,
}

/// A model as the admin API and `/v1/models` show it.
#[derive(Debug, Clone, Serialize)]
pub struct CopyStatus {
    pub id: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ModelKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Measured bytes when loaded, predicted otherwise.
    pub bytes: Option<u64>,
    pub leases: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<f64>,
    pub keep_alive: String,
    pub pinned: bool,
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmodelStatus {
    pub name: String,
    pub target: String,
}

pub struct State {
    pub models: BTreeMap<String, Entry>,
    pub devices: Vec<DeviceState>,
    pub vmodels: BTreeMap<String, String>,
    default_keep_alive: KeepAlive,
    generations: u64,
}

/// Failed loads are retried after 1 s, 2 s, 4 s ... up to a minute.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl State {
    pub fn new(devices: &[DeviceConfig], default_keep_alive: KeepAlive, metrics: &Metrics) -> Self {
        let devices: Vec<DeviceState> = devices
            .iter()
            .map(|d| DeviceState {
                name: d.name.clone(),
                capacity: d.capacity.0,
                used: 0,
            })
            .collect();
        for d in &devices {
            metrics
                .device_capacity_bytes
                .with_label_values(&[&d.name])
                .set(d.capacity as i64);
            metrics
                .device_used_bytes
                .with_label_values(&[&d.name])
                .set(0);
        }
        State {
            models: BTreeMap::new(),
            devices,
            vmodels: BTreeMap::new(),
            default_keep_alive,
            generations: 0,
        }
    }

    /// Add a model. A model whose files cannot be read is kept (as failed, retried on use)
    /// when it comes from the config file, and refused when registered through the API.
    pub fn add(&mut self, config: ModelConfig, from_config: bool) -> Result<(), CacheError> {
        if self.models.contains_key(&config.id) || self.vmodels.contains_key(&config.id) {
            return Err(CacheError::Conflict(format!(
                "model {:?} already exists",
                config.id
            )));
        }
        let format = config
            .format
            .ok_or_else(|| CacheError::Invalid("format is not set".into()))?;
        let (predicted, kv_reserve, copy) = match flatmesh_runtime::footprint(&config.path, format)
        {
            Ok(f) => {
                let total = f.with_sequences(config.max_concurrency);
                let largest = self.devices.iter().map(|d| d.capacity).max().unwrap_or(0);
                if total > largest {
                    return Err(CacheError::TooLarge {
                        id: config.id.clone(),
                        need: total,
                        largest,
                    });
                }
                (Some(total), total - f.weights, CopyState::Cold)
            }
            Err(e) if from_config => (
                None,
                0,
                CopyState::Failed {
                    reason: e.to_string(),
                    retry_at: Instant::now(),
                },
            ),
            Err(e) => return Err(CacheError::Invalid(e.to_string())),
        };
        self.generations += 1;
        let entry = Entry {
            gate: Arc::new(Semaphore::new(config.max_concurrency)),
            config,
            from_config,
            predicted,
            kv_reserve,
            copy,
            failures: 0,
            generation: self.generations,
        };
        self.models.insert(entry.config.id.clone(), entry);
        Ok(())
    }

    pub fn remove(&mut self, id: &str, now: Instant, metrics: &Metrics) -> Result<(), CacheError> {
        let entry = self
            .models
            .get(id)
            .ok_or_else(|| CacheError::NotFound(id.to_string()))?;
        if entry.from_config {
            return Err(CacheError::Conflict(format!(
                "model {id:?} is declared in the config file"
            )));
        }
        if let Some(v) = self.vmodels.iter().find(|(_, t)| t.as_str() == id) {
            return Err(CacheError::Conflict(format!(
                "vmodel {:?} points at model {id:?}",
                v.0
            )));
        }
        self.evict(id, now, "unregistered", metrics);
        let entry = self.models.remove(id).expect("checked above");
        if let CopyState::Loading { device, reserved } = entry.copy {
            self.devices[device].used -= reserved;
        }
        Ok(())
    }

    /// The model a name means: itself, or a vmodel's target.
    pub fn resolve(&self, id: &str) -> Option<String> {
        if self.models.contains_key(id) {
            Some(id.to_string())
        } else {
            self.vmodels
                .get(id)
                .filter(|t| self.models.contains_key(*t))
                .cloned()
        }
    }

    /// Predicted (or measured) bytes of a model's copy, when known.
    pub fn predicted(&self, id: &str) -> Option<u64> {
        self.models.get(id).and_then(|e| e.predicted)
    }

    pub fn gate(&self, id: &str) -> Arc<Semaphore> {
        self.models[id].gate.clone()
    }

    pub fn try_pin(
        &mut self,
        id: &str,
        now: Instant,
        keep_alive: Option<KeepAlive>,
        residency_bonus: Duration,
    ) -> Slot {
        let entry = self.models.get_mut(id).expect("resolved");
        match &mut entry.copy {
            CopyState::Loaded(c) => {
                c.pins += 1;
                c.used = true;
                c.last_used = now;
                c.valued_until = c.valued_until.max(now + residency_bonus);
                c.unload_when_idle = false;
                if let Some(k) = keep_alive {
                    c.keep_alive = k;
                }
                Slot::Pinned(c.engine.clone())
            }
            CopyState::Loading { .. } => Slot::Loading,
            CopyState::Failed { reason, retry_at } if now < *retry_at => {
                Slot::Failed(reason.clone(), *retry_at)
            }
            CopyState::Failed { .. } | CopyState::Cold => Slot::Cold,
        }
    }

    /// Reserve room for a copy of `id`, evicting LRU idle copies, and mark it loading.
    /// `Ok(None)` when there is no room now.
    pub fn start_load(
        &mut self,
        id: &str,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<Option<Load>, CacheError> {
        let entry = &self.models[id];
        let format = entry.config.format.expect("set by finish");
        let need = match entry.predicted {
            Some(n) => n,
            None => match flatmesh_runtime::footprint(&entry.config.path, format) {
                Ok(f) => {
                    let total = f.with_sequences(entry.config.max_concurrency);
                    let e = self.models.get_mut(id).expect("present");
                    e.predicted = Some(total);
                    e.kv_reserve = total - f.weights;
                    total
                }
                Err(err) => {
                    self.fail(id, err.to_string(), now, metrics, err.kind());
                    let CopyState::Failed { reason, retry_at } = &self.models[id].copy else {
                        unreachable!()
                    };
                    return Err(CacheError::Failed {
                        id: id.into(),
                        reason: reason.clone(),
                        retry_after: *retry_at - now,
                    });
                }
            },
        };
        let rooms: Vec<DeviceRoom> = self
            .devices
            .iter()
            .map(|d| DeviceRoom {
                capacity: d.capacity,
                used: d.used,
            })
            .collect();
        let residents: Vec<Resident<String>> = self
            .models
            .iter()
            .filter_map(|(k, e)| match &e.copy {
                CopyState::Loaded(c) => Some(Resident {
                    key: k.clone(),
                    device: c.device,
                    bytes: c.bytes,
                    last_used: c.last_used.max(c.valued_until).into_std(),
                    evictable: c.pins == 0 && !e.config.pinned,
                }),
                _ => None,
            })
            .collect();
        let Some(plan) = place(&rooms, &residents, need) else {
            return Ok(None);
        };
        for victim in &plan.victims {
            self.evict(victim, now, "lru", metrics);
        }
        self.devices[plan.device].used += need;
        self.publish_device(plan.device, metrics);
        let entry = self.models.get_mut(id).expect("present");
        entry.copy = CopyState::Loading {
            device: plan.device,
            reserved: need,
        };
        Ok(Some(Load {
            config: entry.config.clone(),
            format,
            device: plan.device,
            reserved: need,
            generation: entry.generation,
        }))
    }

    pub fn finish_load(
        &mut self,
        load: Load,
        result: Result<Arc<dyn Engine>, RuntimeError>,
        now: Instant,
        seconds: f64,
        metrics: &Metrics,
    ) {
        let id = load.config.id.clone();
        let current = self.models.get(&id).is_some_and(|e| {
            e.generation == load.generation && matches!(e.copy, CopyState::Loading { .. })
        });
        self.devices[load.device].used -= load.reserved;
        if !current {
            self.publish_device(load.device, metrics);
            return; // Unregistered while loading: the engine is dropped here.
        }
        match result {
            Ok(engine) => {
                let entry = self.models.get_mut(&id).expect("current");
                let bytes = engine.size_bytes() + entry.kv_reserve;
                if bytes != load.reserved {
                    tracing::debug!(model = %id, predicted = load.reserved, measured = bytes, "Corrected copy size");
                }
                entry.predicted = Some(bytes);
                entry.failures = 0;
                entry.copy = CopyState::Loaded(Copy {
                    engine,
                    device: load.device,
                    bytes,
                    loaded_at: now,
                    last_used: now,
                    valued_until: now,
                    pins: 0,
                    used: false,
                    keep_alive: entry.config.keep_alive.unwrap_or(self.default_keep_alive),
                    unload_when_idle: false,
                });
                self.devices[load.device].used += bytes;
                metrics
                    .model_load_seconds
                    .with_label_values(&[&id])
                    .observe(seconds);
                metrics
                    .model_bytes
                    .with_label_values(&[&id])
                    .set(bytes as i64);
                metrics.copies_loaded.inc();
                tracing::info!(model = %id, seconds, bytes, device = %self.devices[load.device].name, "Loaded model");
            }
            Err(e) => {
                tracing::error!(model = %id, error = %e, "Model failed to load");
                self.fail(&id, e.to_string(), now, metrics, e.kind());
            }
        }
        self.publish_device(load.device, metrics);
    }

    fn fail(&mut self, id: &str, reason: String, now: Instant, metrics: &Metrics, kind: &str) {
        let entry = self.models.get_mut(id).expect("present");
        entry.failures += 1;
        entry.copy = CopyState::Failed {
            reason,
            retry_at: now + backoff(entry.failures),
        };
        metrics
            .model_load_failures
            .with_label_values(&[id, kind])
            .inc();
    }

    pub fn unpin(&mut self, id: &str, now: Instant, metrics: &Metrics) {
        let Some(CopyState::Loaded(c)) = self.models.get_mut(id).map(|e| &mut e.copy) else {
            return;
        };
        c.pins -= 1;
        c.last_used = now;
        if c.pins == 0 && (c.unload_when_idle || c.keep_alive == KeepAlive::For(Duration::ZERO)) {
            self.evict(id, now, "keep_alive", metrics);
        }
    }

    /// Admin unload: now if idle, else when the last lease ends.
    pub fn unload(&mut self, id: &str, now: Instant, metrics: &Metrics) {
        if let Some(CopyState::Loaded(c)) = self.models.get_mut(id).map(|e| &mut e.copy) {
            if c.pins > 0 {
                c.unload_when_idle = true;
                return;
            }
        }
        self.evict(id, now, "admin", metrics);
        if let Some(e) = self.models.get_mut(id) {
            if matches!(e.copy, CopyState::Failed { .. }) {
                e.copy = CopyState::Cold; // An explicit unload also clears a failure.
            }
        }
    }

    fn evict(&mut self, id: &str, now: Instant, reason: &str, metrics: &Metrics) {
        let Some(entry) = self.models.get_mut(id) else {
            return;
        };
        if !matches!(entry.copy, CopyState::Loaded(_)) {
            return;
        }
        let CopyState::Loaded(c) = std::mem::replace(&mut entry.copy, CopyState::Cold) else {
            unreachable!()
        };
        self.devices[c.device].used -= c.bytes;
        let started = std::time::Instant::now();
        let age = (now - c.loaded_at).as_secs_f64();
        let device = c.device;
        drop(c);
        metrics
            .model_unload_seconds
            .with_label_values(&[id])
            .observe(started.elapsed().as_secs_f64());
        metrics.evictions.with_label_values(&[reason]).inc();
        metrics.eviction_age_seconds.observe(age);
        metrics.copies_loaded.dec();
        metrics.model_bytes.with_label_values(&[id]).set(0);
        self.publish_device(device, metrics);
        tracing::info!(model = %id, reason, age_seconds = age, "Unloaded model");
    }

    /// Evict copies idle past their keep-alive; returns when the next one would expire.
    pub fn expire(
        &mut self,
        now: Instant,
        min_residency: Duration,
        metrics: &Metrics,
    ) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for (id, e) in &self.models {
            let CopyState::Loaded(c) = &e.copy else {
                continue;
            };
            let KeepAlive::For(keep) = c.keep_alive else {
                continue;
            };
            if c.pins > 0 || e.config.pinned {
                continue;
            }
            // A copy nobody has used yet gets at least a second for its waiters to pin it.
            let floor = if c.used {
                min_residency
            } else {
                min_residency.max(Duration::from_secs(1))
            };
            let at = (c.last_used + keep).max(c.loaded_at + floor);
            if at <= now {
                expired.push(id.clone());
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        for id in expired {
            self.evict(&id, now, "keep_alive", metrics);
        }
        next
    }

    fn publish_device(&self, device: usize, metrics: &Metrics) {
        let d = &self.devices[device];
        metrics
            .device_used_bytes
            .with_label_values(&[&d.name])
            .set(d.used as i64);
    }

    pub fn status(&self, now: Instant) -> Vec<CopyStatus> {
        self.models
            .values()
            .map(|e| {
                let mut s = CopyStatus {
                    id: e.config.id.clone(),
                    state: "cold",
                    kind: e.config.format.map(|f| f.kind()),
                    device: None,
                    bytes: e.predicted,
                    leases: 0,
                    idle_seconds: None,
                    keep_alive: e
                        .config
                        .keep_alive
                        .unwrap_or(self.default_keep_alive)
                        .to_string(),
                    pinned: e.config.pinned,
                    source: if e.from_config { "config" } else { "api" },
                    error: None,
                };
                match &e.copy {
                    CopyState::Cold => {}
                    CopyState::Loading { device, .. } => {
                        s.state = "loading";
                        s.device = Some(self.devices[*device].name.clone());
                    }
                    CopyState::Loaded(c) => {
                        s.state = "ready";
                        s.kind = Some(c.engine.info().kind);
                        s.device = Some(self.devices[c.device].name.clone());
                        s.bytes = Some(c.bytes);
                        s.leases = c.pins;
                        s.keep_alive = c.keep_alive.to_string();
                        s.idle_seconds = (c.pins == 0).then(|| (now - c.last_used).as_secs_f64());
                    }
                    CopyState::Failed { reason, .. } => {
                        s.state = "failed";
                        s.error = Some(reason.clone());
                    }
                }
                s
            })
            .collect()
    }

    /// What the registry keeps: models added through the API, and every vmodel.
    pub fn registered(&self) -> Saved {
        Saved {
            models: self
                .models
                .values()
                .filter(|e| !e.from_config)
                .map(|e| e.config.clone())
                .collect(),
            vmodels: self.vmodels.clone(),
        }
    }
}
