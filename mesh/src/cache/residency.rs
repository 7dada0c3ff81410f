//! Which idle copies leave first when room is needed: by recency (LRU), or by demand — how
//! often a model is asked for lately, what a miss costs to load, and how much room it takes.
//!
//! The demand policy keeps, for every model (loaded or not), a request count that halves
//! every `half_life` requests to the cache. A copy's value is that count times its load
//! seconds per byte: the copy whose eviction would cost the least reload time per byte freed
//! leaves first. A one-off model has a count of one and leaves before a steady one (scan
//! resistance); a popular set that moves is followed within a few half-lives.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The built-in residency policies (`cache.residency`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residency {
    /// Least recently used leaves first.
    Lru,
    /// Least reload time per byte, by recent demand, leaves first (default).
    #[default]
    Demand,
}

impl Residency {
    /// The reason evictions by this policy are counted under.
    pub fn label(self) -> &'static str {
        match self {
            Residency::Lru => "lru",
            Residency::Demand => "demand",
        }
    }
}

/// An idle copy as a residency plugin sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub model: String,
    pub device: String,
    pub bytes: u64,
    pub idle_ms: u64,
    pub age_ms: u64,
    /// The model's recent requests (`Demand::count`).
    pub demand: f64,
    /// Milliseconds the model's last load took (0 while unknown).
    pub load_ms: u64,
    /// Whether a tier's residency bonus protects it now.
    pub favoured: bool,
}

/// A residency plugin's answer about a list of candidates.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    BuiltIn,
    /// Indices into the candidates, the first to leave first.
    Order(Vec<usize>),
    KeepAll,
}

/// Who the cache asks which idle copies leave first (the policy layer's residency slot). The
/// cache still enforces every rule: it offers only evictable copies and checks the answer.
pub trait Advisor: Send + Sync + 'static {
    /// Whether there is anything to ask (a plugin is loaded).
    fn is_active(&self) -> bool;
    fn advise(&self, copies: Vec<Candidate>) -> futures::future::BoxFuture<'static, Verdict>;
}

/// Requests to the cache after which a model's count halves.
pub const HALF_LIFE: f64 = 75.0;

/// Load seconds assumed per byte before a model's load has been measured (1 GB/s).
const SECONDS_PER_BYTE: f64 = 1e-9;

/// Recent demand of every model: counts that halve every `half_life` requests.
#[derive(Debug, Clone)]
pub struct Demand {
    half_life: f64,
    /// Requests seen so far (the clock of the decay).
    now: u64,
    /// model → (count, when it was last updated)
    counts: HashMap<String, (f64, u64)>,
}

impl Default for Demand {
    fn default() -> Self {
        Demand::new(HALF_LIFE)
    }
}

impl Demand {
    pub fn new(half_life: f64) -> Self {
        Demand {
            half_life: half_life.max(1.0),
            now: 0,
            counts: HashMap::new(),
        }
    }

    /// A request for `model`.
    pub fn request(&mut self, model: &str) {
        self.now += 1;
        let now = self.now;
        let count = self.count(model) + 1.0;
        self.counts.insert(model.to_string(), (count, now));
        // Forget models whose count has decayed to nothing (bounded memory).
        if now.is_multiple_of(4096) {
            let half_life = self.half_life;
            self.counts
                .retain(|_, (c, at)| decayed(*c, now - *at, half_life) > 1e-3);
        }
    }

    /// The model's count now.
    pub fn count(&self, model: &str) -> f64 {
        self.counts
            .get(model)
            .map_or(0.0, |&(c, at)| decayed(c, self.now - at, self.half_life))
    }

    /// Forget a model (unregistered).
    pub fn forget(&mut self, model: &str) {
        self.counts.remove(model);
    }

    /// What keeping a copy is worth: recent demand × reload seconds per byte.
    pub fn value(&self, model: &str, bytes: u64, load_seconds: Option<f64>) -> f64 {
        let per_byte = match load_seconds {
            Some(s) if s > 0.0 && bytes > 0 => s / bytes as f64,
            _ => SECONDS_PER_BYTE,
        };
        self.count(model) * per_byte
    }
}

fn decayed(count: f64, age: u64, half_life: f64) -> f64 {
    count * (-(age as f64) / half_life).exp2()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_halve_every_half_life() {
        let mut d = Demand::new(10.0);
        for _ in 0..4 {
            d.request("a");
        }
        for _ in 0..10 {
            d.request("b");
        }
        let a = d.count("a");
        assert!(
            (a - (1.0 + 0.5f64.powf(0.1) + 0.5f64.powf(0.2) + 0.5f64.powf(0.3)) * 0.5).abs() < 1e-9
        );
        assert_eq!(d.count("never"), 0.0);
        d.forget("b");
        assert_eq!(d.count("b"), 0.0);
    }

    #[test]
    fn a_steady_model_outvalues_a_one_off_and_cheap_reloads_leave_first() {
        let mut d = Demand::default();
        for i in 0..50 {
            d.request("steady");
            if i == 49 {
                d.request("one-off");
            }
        }
        let gb = 1 << 30;
        assert!(d.value("steady", gb, Some(1.0)) > d.value("one-off", gb, Some(1.0)));
        // The same demand, but one reloads in a tenth of the time per byte.
        d.request("fast");
        d.request("slow");
        assert!(d.value("fast", gb, Some(0.1)) < d.value("slow", gb, Some(1.0)));
        // Unmeasured loads are valued at 1 GB/s.
        assert!((d.value("slow", gb, None) - d.count("slow") * 1e-9).abs() < 1e-18);
    }
}
