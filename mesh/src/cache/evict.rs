//! Copies leaving: leases ending, admin unloads, keep-alive expiry, eviction, and removed
//! models whose copies drain.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    copy::{CopyId, CopyState, Draining},
    error::CacheError,
    history::Why,
    state::State,
};
use crate::{metrics::Metrics, units::KeepAlive};

impl State {
    /// Remove a model registered through the API. Idle copies leave now; leased ones drain
    /// (their bytes stay counted until their last lease ends); a load in progress is
    /// discarded when it finishes (its reservation is released then).
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
        let idle: Vec<CopyId> = entry
            .copies
            .iter()
            .filter(|c| c.is_idle())
            .map(|c| c.id)
            .collect();
        for copy in idle {
            self.evict(id, copy, now, Why::Unregistered, metrics);
        }
        self.demand.forget(id);
        let Some(entry) = self.models.remove(id) else {
            return Ok(());
        };
        self.publish_model(id, metrics);
        for c in entry.copies {
            if let CopyState::Ready(r) = c.state {
                tracing::info!(model = %id, copy = %c.id, leases = c.pins, "Draining a copy of an unregistered model");
                self.draining.insert(
                    c.id,
                    Draining {
                        model: id.to_string(),
                        device: c.device,
                        bytes: r.bytes,
                        pins: c.pins,
                    },
                );
            }
        }
        Ok(())
    }

    /// A lease on `copy` of `model` ended.
    pub fn unpin(&mut self, model: &str, copy: CopyId, now: Instant, metrics: &Metrics) {
        let found = self
            .models
            .get_mut(model)
            .and_then(|e| e.copies.iter_mut().find(|c| c.id == copy));
        if let Some(c) = found {
            c.pins = c.pins.saturating_sub(1);
            let idle = c.pins == 0;
            if let CopyState::Ready(r) = &mut c.state {
                r.last_used = now;
                let leave = r.unload_when_idle || r.keep_alive == KeepAlive::For(Duration::ZERO);
                if idle && leave {
                    self.evict(model, copy, now, Why::KeepAlive, metrics);
                }
            }
            return;
        }
        let Some(d) = self.draining.get_mut(&copy) else {
            return;
        };
        d.pins = d.pins.saturating_sub(1);
        if d.pins == 0 {
            if let Some(d) = self.draining.remove(&copy) {
                if let Some(dev) = self.devices.get(d.device) {
                    dev.release(d.bytes);
                }
                metrics.copies_loaded.dec();
                self.publish_device(d.device, metrics);
                tracing::info!(model = %d.model, copy = %copy, "Unloaded the drained copy of an unregistered model");
            }
        }
    }

    /// Admin unload: idle copies now, leased ones when their last lease ends.
    pub fn unload(&mut self, id: &str, now: Instant, metrics: &Metrics) {
        let Some(entry) = self.models.get_mut(id) else {
            return;
        };
        entry.failure = None; // An explicit unload also clears a failure.
        let mut idle = Vec::new();
        for c in &mut entry.copies {
            match &mut c.state {
                CopyState::Ready(r) if c.pins > 0 => r.unload_when_idle = true,
                CopyState::Ready(_) => idle.push(c.id),
                CopyState::Loading { .. } => {}
            }
        }
        for copy in idle {
            self.evict(id, copy, now, Why::Admin, metrics);
        }
    }

    /// Unload an idle ready copy.
    pub(super) fn evict(
        &mut self,
        id: &str,
        copy: CopyId,
        now: Instant,
        why: Why,
        metrics: &Metrics,
    ) {
        let Some(entry) = self.models.get_mut(id) else {
            return;
        };
        let Some(pos) = entry
            .copies
            .iter()
            .position(|c| c.id == copy && c.is_idle())
        else {
            return;
        };
        let c = entry.copies.remove(pos);
        let CopyState::Ready(r) = c.state else {
            return;
        };
        if let Some(dev) = self.devices.get(c.device) {
            dev.release(r.bytes);
        }
        let started = std::time::Instant::now();
        let age = (now - r.loaded_at).as_secs_f64();
        drop(r);
        metrics
            .model_unload_seconds
            .with_label_values(&[id])
            .observe(started.elapsed().as_secs_f64());
        metrics.evictions.with_label_values(&[why.label()]).inc();
        metrics.eviction_age_seconds.observe(age);
        metrics.copies_loaded.dec();
        self.publish_model(id, metrics);
        self.publish_device(c.device, metrics);
        let device = self
            .devices
            .get(c.device)
            .map_or("", |d| d.name())
            .to_string();
        let reason = why.label();
        self.history.push(
            why.event(),
            (id, copy.to_string(), &device),
            format!("{reason} after {age:.0} s"),
        );
        tracing::info!(model = %id, copy = %copy, reason, age_seconds = age, "Unloaded model");
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
            if e.config.pinned {
                continue;
            }
            for c in e.copies.iter().filter(|c| c.is_idle()) {
                let Some(at) = c.expires_at(min_residency) else {
                    continue;
                };
                if at <= now {
                    expired.push((id.clone(), c.id));
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        for (id, copy) in expired {
            self.evict(&id, copy, now, Why::KeepAlive, metrics);
        }
        next
    }
}
