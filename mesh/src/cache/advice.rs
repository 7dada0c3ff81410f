//! What the cache offers a residency plugin: the idle copies it may evict, and whether a load
//! needs room at all (the plugin is asked only then).

use tokio::time::Instant;

use super::{
    copy::CopyId,
    error::CacheError,
    plan::{fits_without_eviction, Advice},
    residency::{Candidate, Verdict},
    state::State,
};
use crate::metrics::Metrics;

impl State {
    /// Whether a new copy of `id` needs another copy evicted first (an error when its size
    /// cannot be read: the model is marked failed once).
    pub fn needs_room(
        &mut self,
        id: &str,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<bool, CacheError> {
        let need = self.need(id, now, metrics)?;
        Ok(fits_without_eviction(&self.rooms(id), need).is_none())
    }

    /// The copies the cache may evict now, with what a plugin may weigh.
    pub fn candidates(&self, now: Instant) -> Vec<((String, CopyId), Candidate)> {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.models
            .iter()
            .flat_map(|(k, e)| {
                e.copies.iter().filter_map(move |c| {
                    let evictable =
                        c.pins == 0 && !e.config.pinned && c.settled(now, self.min_residency);
                    let r = c.ready().filter(|_| evictable)?;
                    let candidate = Candidate {
                        model: k.clone(),
                        device: self.devices[c.device].name().to_string(),
                        bytes: r.bytes,
                        idle_ms: ms(now.saturating_duration_since(r.last_used)),
                        age_ms: ms(now.saturating_duration_since(r.loaded_at)),
                        demand: self.demand.count(k),
                        load_ms: e.load_seconds.map_or(0, |s| (s * 1000.0) as u64),
                        favoured: r.valued_until > now,
                    };
                    Some(((k.clone(), c.id), candidate))
                })
            })
            .collect()
    }
}

/// A plugin's verdict on `keys` (the candidates it was shown, in order) as advice by key;
/// indices out of range or named twice are dropped.
pub fn advice(keys: &[(String, CopyId)], verdict: Verdict) -> Advice<(String, CopyId)> {
    match verdict {
        Verdict::BuiltIn => Advice::BuiltIn,
        Verdict::KeepAll => Advice::KeepAll,
        Verdict::Order(indices) => {
            let mut order: Vec<(String, CopyId)> = Vec::new();
            for key in indices.into_iter().filter_map(|i| keys.get(i)) {
                if !order.contains(key) {
                    order.push(key.clone());
                }
            }
            Advice::Order(order)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_becomes_advice_by_key_without_bad_or_repeated_indices() {
        let keys = vec![("a".to_string(), CopyId(1)), ("b".to_string(), CopyId(2))];
        assert_eq!(
            advice(&keys, Verdict::Order(vec![1, 7, 1, 0])),
            Advice::Order(vec![keys[1].clone(), keys[0].clone()])
        );
        assert_eq!(advice(&keys, Verdict::KeepAll), Advice::KeepAll);
        assert_eq!(advice(&keys, Verdict::BuiltIn), Advice::BuiltIn);
    }
}
