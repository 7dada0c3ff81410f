//! The cache's recent page-ins and evictions, newest first, for the operators' status page.

use std::collections::VecDeque;

use crate::util::now_ms;

/// How many events are kept.
const KEEP: usize = 32;

/// One page-in or eviction.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `page-in`, `page-in failed`, `evicted` (for room) or `unloaded` (idle, by an operator).
    pub kind: &'static str,
    pub model: String,
    pub copy: String,
    pub device: String,
    /// A page-in's source (`disk`, `warm`) and seconds, or why it failed; an eviction's reason
    /// and the copy's age.
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct History {
    events: VecDeque<CacheEvent>,
}

impl History {
    pub fn push(
        &mut self,
        kind: &'static str,
        (model, copy, device): (&str, String, &str),
        detail: String,
    ) {
        if self.events.len() == KEEP {
            self.events.pop_back();
        }
        self.events.push_front(CacheEvent {
            at_ms: now_ms(),
            kind,
            model: model.to_string(),
            copy,
            device: device.to_string(),
            detail,
        });
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<CacheEvent> {
        self.events.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_first_and_at_most_keep() {
        let mut h = History::default();
        for i in 0..KEEP + 5 {
            h.push(
                "evicted",
                (&format!("m{i}"), "copy-1".into(), "host0"),
                "lru".into(),
            );
        }
        let r = h.recent();
        assert_eq!(r.len(), KEEP);
        assert_eq!(r[0].model, format!("m{}", KEEP + 4));
        assert_eq!(r[KEEP - 1].model, "m5");
    }
}
