//! The cache's state behind its one lock: models, their copies on devices, vmodels, and the
//! copies of removed models that drain until their last lease ends.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use flatmesh_runtime::{Device, Engine, Footprint, Format, RuntimeError};
use tokio::time::Instant;

use crate::scheduler::Scheduler;

use super::{
    config::{DeviceConfig, ModelConfig},
    copy::{CopyId, CopyState, Draining, ModelCopy, Ready},
    error::CacheError,
    history::Why,
    plan::{fits_without_eviction, place, Advice, Resident},
    residency::{Demand, Residency},
};
use crate::{metrics::Metrics, registry::Saved, units::KeepAlive};

pub struct Entry {
    pub config: ModelConfig,
    /// Declared in the config file (not removable through the API).
    pub from_config: bool,
    /// Predicted bytes of one copy (weights + its KV block pool), `None` while the header
    /// cannot be read; measured once a copy has loaded.
    pub predicted: Option<u64>,
    pub copies: Vec<ModelCopy>,
    /// The last load failed; no new copy is started before `retry_at`.
    pub failure: Option<Failure>,
    failures: u32,
    /// Seconds the last load took (what a miss costs, for the residency policy).
    pub load_seconds: Option<f64>,
}

pub struct Failure {
    pub reason: String,
    pub retry_at: Instant,
}

/// A pin on a ready copy, as `try_pin` hands it out.
pub struct Pinned {
    pub copy: CopyId,
    pub device: String,
    pub engine: Arc<dyn Engine>,
    pub gate: Scheduler,
}

/// What `try_pin` found.
pub enum Pin {
    /// A ready copy (the least leased), and a further copy to load when every copy is busy.
    Pinned(Pinned, Option<Load>),
    Loading,
    Cold,
    Failed(String, Instant),
    /// The model is not there (removed since it was resolved).
    Gone,
}

/// A load to run: which copy, on which device, and how much was reserved for it.
pub struct Load {
    pub config: ModelConfig,
    pub format: Format,
    pub copy: CopyId,
    pub device: Arc<Device>,
    device_index: usize,
    pub reserved: u64,
}

pub struct State {
    pub models: BTreeMap<String, Entry>,
    /// Recent page-ins and evictions.
    pub history: super::history::History,
    pub devices: Vec<Arc<Device>>,
    pub vmodels: BTreeMap<String, String>,
    pub draining: BTreeMap<CopyId, Draining>,
    pub default_keep_alive: KeepAlive,
    next_copy: u64,
    /// Which idle copies leave first when room is needed.
    pub residency: Residency,
    /// No copy leaves for room sooner than this after its load.
    pub min_residency: Duration,
    /// Recent demand of every model (used by `Residency::Demand`).
    pub demand: Demand,
    /// GPUs found not usable at start, with the reason: their devices take no copies.
    pub gpu_down: BTreeMap<usize, String>,
}

/// Failed loads are retried after 1 s, 2 s, 4 s ... up to a minute.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl State {
    /// The configured devices (`pool::build`); GPUs are checked by `check_gpus`.
    pub fn new(devices: &[DeviceConfig], default_keep_alive: KeepAlive, metrics: &Metrics) -> Self {
        let devices = super::pool::build(devices);
        for d in &devices {
            metrics
                .device_capacity_bytes
                .with_label_values(&[d.name()])
                .set(d.capacity() as i64);
            metrics
                .device_used_bytes
                .with_label_values(&[d.name()])
                .set(0);
            metrics.device_copies.with_label_values(&[d.name()]).set(0);
        }
        State {
            models: BTreeMap::new(),
            history: Default::default(),
            devices,
            vmodels: BTreeMap::new(),
            draining: BTreeMap::new(),
            default_keep_alive,
            next_copy: 0,
            residency: Residency::default(),
            min_residency: Duration::ZERO,
            demand: Demand::default(),
            gpu_down: BTreeMap::new(),
        }
    }

    /// Add a model, given its footprint as read from its files (outside the lock). A model
    /// whose files cannot be read is kept (as failed with its reason, retried on use) when it
    /// comes from the config file or the saved registry at start, so the agent serves the
    /// rest; it is refused when registered through the API.
    pub fn add(
        &mut self,
        config: ModelConfig,
        origin: Origin,
        footprint: Result<Footprint, RuntimeError>,
    ) -> Result<(), CacheError> {
        let from_config = origin == Origin::Config;
        if self.models.contains_key(&config.id) || self.vmodels.contains_key(&config.id) {
            return Err(CacheError::Conflict(format!(
                "model {:?} already exists",
                config.id
            )));
        }
        if config.format.is_none() {
            return Err(CacheError::Invalid("format is not set".into()));
        }
        let (predicted, failure) = match footprint {
            Ok(f) => {
                let total = f.with_kv_tokens(config.batch().kv_tokens);
                let largest = self.largest_for(config.format);
                if total > largest {
                    return Err(CacheError::TooLarge {
                        id: config.id.clone(),
                        need: total,
                        largest,
                    });
                }
                (Some(total), None)
            }
            Err(e) if origin != Origin::Api => (
                None,
                Some(Failure {
                    reason: e.to_string(),
                    retry_at: Instant::now(),
                }),
            ),
            Err(e) => return Err(CacheError::Invalid(e.to_string())),
        };
        let entry = Entry {
            config,
            from_config,
            predicted,
            copies: Vec::new(),
            failure,
            failures: 0,
            load_seconds: None,
        };
        self.models.insert(entry.config.id.clone(), entry);
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

    /// Pin the least leased ready copy of `id`. When every ready copy is busy (as many leases
    /// as `max_concurrency`) and the model may have more copies, also start one where it fits
    /// without evicting anything.
    pub fn try_pin(
        &mut self,
        id: &str,
        now: Instant,
        keep_alive: Option<KeepAlive>,
        residency_bonus: Duration,
    ) -> Pin {
        let Some(entry) = self.models.get_mut(id) else {
            return Pin::Gone;
        };
        let concurrency = entry.config.max_concurrency;
        let best = entry
            .copies
            .iter_mut()
            .filter(|c| c.ready().is_some())
            .min_by_key(|c| c.pins);
        if let Some(c) = best {
            let busy = c.pins >= concurrency;
            let (copy, device, gate) = (c.id, c.device, c.gate.clone());
            let CopyState::Ready(r) = &mut c.state else {
                return Pin::Loading;
            };
            c.pins += 1;
            r.used = true;
            r.last_used = now;
            r.valued_until = r.valued_until.max(now + residency_bonus);
            r.unload_when_idle = false;
            if let Some(k) = keep_alive {
                r.keep_alive = k;
            }
            let engine = r.engine.clone();
            let grow = if busy { self.grow(id, now) } else { None };
            let device = self
                .devices
                .get(device)
                .map_or_else(String::new, |d| d.name().to_string());
            let pinned = Pinned {
                copy,
                device,
                engine,
                gate,
            };
            return Pin::Pinned(pinned, grow);
        }
        if entry.copies.iter().any(|c| c.is_loading()) {
            return Pin::Loading;
        }
        match &entry.failure {
            Some(f) if now < f.retry_at => Pin::Failed(f.reason.clone(), f.retry_at),
            _ => Pin::Cold,
        }
    }

    /// Start one more copy of `id` on a device that has none of it and room for it without
    /// evicting, if the model may have more copies and no copy is loading.
    fn grow(&mut self, id: &str, now: Instant) -> Option<Load> {
        let entry = self.models.get(id)?;
        if entry.copies.len() >= entry.config.copies
            || entry.copies.iter().any(|c| c.is_loading())
            || entry.failure.as_ref().is_some_and(|f| now < f.retry_at)
        {
            return None;
        }
        let need = entry.predicted?;
        // A device that already holds a copy of this model counts as full.
        let mut rooms = self.rooms(id);
        for c in &entry.copies {
            if let Some(r) = rooms.get_mut(c.device) {
                r.used = r.capacity;
            }
        }
        let device = fits_without_eviction(&rooms, need)?;
        let load = self.new_copy(id, device, need)?;
        tracing::info!(model = %id, device = %load.device.name(), "Every copy is busy: adding a copy");
        Some(load)
    }

    /// Reserve `need` bytes on `device` for a new copy of `id`, marked loading.
    fn new_copy(&mut self, id: &str, device: usize, need: u64) -> Option<Load> {
        let dev = self.devices.get(device)?.clone();
        self.next_copy += 1;
        let copy = CopyId(self.next_copy);
        let entry = self.models.get_mut(id)?;
        let format = entry.config.format?;
        dev.reserve(need);
        entry.failure = None;
        entry.copies.push(ModelCopy::loading(
            copy,
            device,
            need,
            entry.config.max_concurrency,
        ));
        Some(Load {
            config: entry.config.clone(),
            format,
            copy,
            device: dev,
            device_index: device,
            reserved: need,
        })
    }

    /// Reserve room for the first copy of `id`, evicting the least valuable idle copies (as
    /// the residency policy, or a plugin's advice, values them), and mark it loading.
    /// `Ok(None)` when there is no room now.
    pub fn start_load(
        &mut self,
        id: &str,
        now: Instant,
        metrics: &Metrics,
        advice: &Advice<(String, CopyId)>,
    ) -> Result<Option<Load>, CacheError> {
        let need = self.need(id, now, metrics)?;
        if let Some(why) = self.no_device(id, need) {
            let (reason, retry_after) = self.fail(id, why, now, metrics, "no_device");
            return Err(CacheError::Failed {
                id: id.into(),
                reason,
                retry_after,
            });
        }
        let rooms = self.rooms(id);
        let mut residents = self.residents(now);
        let why = match advice {
            Advice::BuiltIn => Why::Room(self.residency),
            Advice::KeepAll => {
                residents.iter_mut().for_each(|r| r.evictable = false);
                Why::Plugin
            }
            Advice::Order(order) => {
                // Named copies first, in the plugin's order; the rest after, as built in.
                let n = order.len() as f64;
                for r in &mut residents {
                    r.value = match order.iter().position(|k| *k == r.key) {
                        Some(i) => i as f64,
                        None => n + 1.0 + r.value,
                    };
                }
                Why::Plugin
            }
        };
        let Some(plan) = place(&rooms, &residents, need) else {
            return Ok(None);
        };
        for (model, copy) in &plan.victims {
            self.evict(model, *copy, now, why, metrics);
        }
        let load = self.new_copy(id, plan.device, need);
        self.publish_device(plan.device, metrics);
        load.map(Some)
            .ok_or_else(|| CacheError::NotFound(id.to_string()))
    }

    /// The ready copies as placement sees them, valued by the residency policy.
    pub fn residents(&self, now: Instant) -> Vec<Resident<(String, CopyId)>> {
        let (residency, demand) = (self.residency, &self.demand);
        self.models
            .iter()
            .flat_map(|(k, e)| {
                e.copies.iter().filter_map(move |c| {
                    let r = c.ready()?;
                    // A tier's residency bonus outranks demand while it lasts.
                    let value = match residency {
                        Residency::Lru => 0.0,
                        Residency::Demand if r.valued_until > now => f64::INFINITY,
                        Residency::Demand => demand.value(k, r.bytes, e.load_seconds),
                    };
                    Some(Resident {
                        key: (k.clone(), c.id),
                        device: c.device,
                        bytes: r.bytes,
                        last_used: r.last_used.max(r.valued_until).into_std(),
                        value,
                        evictable: c.pins == 0
                            && !e.config.pinned
                            && c.settled(now, self.min_residency),
                    })
                })
            })
            .collect()
    }

    /// Bytes a copy of `id` needs, reading the header now if it could not be read before.
    pub fn need(&mut self, id: &str, now: Instant, metrics: &Metrics) -> Result<u64, CacheError> {
        let entry = self
            .models
            .get_mut(id)
            .ok_or_else(|| CacheError::NotFound(id.to_string()))?;
        if let Some(n) = entry.predicted {
            return Ok(n);
        }
        let format = entry
            .config
            .format
            .ok_or_else(|| CacheError::Invalid("format is not set".into()))?;
        match flatmesh_runtime::footprint(&entry.config.path, format) {
            Ok(f) => {
                let total = f.with_kv_tokens(entry.config.batch().kv_tokens);
                entry.predicted = Some(total);
                Ok(total)
            }
            Err(err) => {
                let (reason, retry_after) =
                    self.fail(id, err.to_string(), now, metrics, err.kind());
                Err(CacheError::Failed {
                    id: id.into(),
                    reason,
                    retry_after,
                })
            }
        }
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
        load.device.release(load.reserved);
        let current = self.models.get_mut(&id).and_then(|e| {
            let pos = e
                .copies
                .iter()
                .position(|c| c.id == load.copy && c.is_loading())?;
            Some((e, pos))
        });
        let Some((entry, pos)) = current else {
            // Removed while loading: the engine is dropped here.
            self.publish_device(load.device_index, metrics);
            return;
        };
        match result {
            Ok(engine) => {
                let bytes = engine.size_bytes();
                if bytes != load.reserved {
                    tracing::debug!(model = %id, predicted = load.reserved, measured = bytes, "Corrected copy size");
                }
                entry.predicted = Some(bytes);
                entry.load_seconds = Some(seconds);
                entry.failures = 0;
                entry.failure = None;
                let Some(copy) = entry.copies.get_mut(pos) else {
                    return;
                };
                copy.state = CopyState::Ready(Ready {
                    engine,
                    bytes,
                    loaded_at: now,
                    last_used: now,
                    valued_until: now,
                    used: false,
                    keep_alive: entry.config.keep_alive.unwrap_or(self.default_keep_alive),
                    unload_when_idle: false,
                });
                load.device.reserve(bytes);
                metrics
                    .model_load_seconds
                    .with_label_values(&[&id])
                    .observe(seconds);
                metrics.copies_loaded.inc();
                self.publish_model(&id, metrics);
                tracing::info!(model = %id, copy = %load.copy, seconds, bytes, device = %load.device.name(), "Loaded model");
            }
            Err(e) => {
                entry.copies.remove(pos);
                tracing::error!(model = %id, error = %e, "Model failed to load");
                self.fail(&id, e.to_string(), now, metrics, e.kind());
            }
        }
        self.publish_device(load.device_index, metrics);
    }

    /// Record a failed load; returns the reason and how long until the next try.
    fn fail(
        &mut self,
        id: &str,
        reason: String,
        now: Instant,
        metrics: &Metrics,
        kind: &str,
    ) -> (String, Duration) {
        metrics
            .model_load_failures
            .with_label_values(&[id, kind])
            .inc();
        let Some(entry) = self.models.get_mut(id) else {
            return (reason, Duration::ZERO);
        };
        entry.failures += 1;
        let wait = backoff(entry.failures);
        entry.failure = Some(Failure {
            reason: reason.clone(),
            retry_at: now + wait,
        });
        (reason, wait)
    }

    pub(super) fn publish_device(&self, device: usize, metrics: &Metrics) {
        if let Some(d) = self.devices.get(device) {
            metrics
                .device_used_bytes
                .with_label_values(&[d.name()])
                .set(d.used() as i64);
            let copies = self
                .models
                .values()
                .flat_map(|e| &e.copies)
                .filter(|c| c.device == device)
                .count();
            metrics
                .device_copies
                .with_label_values(&[d.name()])
                .set(copies as i64);
        }
    }

    /// Bytes of the model's ready copies together.
    pub(super) fn publish_model(&self, id: &str, metrics: &Metrics) {
        let bytes: u64 = self.models.get(id).map_or(0, |e| {
            e.copies
                .iter()
                .filter_map(|c| c.ready())
                .map(|r| r.bytes)
                .sum()
        });
        metrics
            .model_bytes
            .with_label_values(&[id])
            .set(bytes as i64);
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

/// Where a model being added comes from: what becomes of one whose files cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The config file: kept as failed.
    Config,
    /// The registry saved by an earlier run: kept as failed.
    Saved,
    /// A registration now (admin API, or the mesh's shared registry): refused.
    Api,
}
