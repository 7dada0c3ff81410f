//! The cache's recent page-ins and evictions, newest first, and why each copy left.

use std::collections::VecDeque;

use super::residency::Residency;
use crate::util::now_ms;

/// How many events are kept.
const KEEP: usize = 32;

/// What happened to a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A copy was loaded.
    PageIn,
    /// A copy's load failed.
    PageInFailed,
    /// A copy left for room.
    Evicted,
    /// A copy was let go: idle, by an operator, or its model removed.
    Unloaded,
}

impl EventKind {
    /// As the status page shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::PageIn => "page-in",
            EventKind::PageInFailed => "page-in failed",
            EventKind::Evicted => "evicted",
            EventKind::Unloaded => "unloaded",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a copy leaves; its label is the `reason` evictions are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// For room, by the built-in residency policy.
    Room(Residency),
    /// For room, in the residency plugin's order (or the plugin kept them all).
    Plugin,
    /// Idle past its keep-alive (or asked to leave when idle).
    KeepAlive,
    /// Unloaded by an operator.
    Admin,
    /// Its model was removed.
    Unregistered,
}

impl Why {
    /// The `reason` label of the eviction metrics, and the start of the event's detail.
    pub fn label(self) -> &'static str {
        match self {
            Why::Room(r) => r.label(),
            Why::Plugin => "plugin",
            Why::KeepAlive => "keep_alive",
            Why::Admin => "admin",
            Why::Unregistered => "unregistered",
        }
    }

    /// How the status page lists it: evicted by the built-in policy for room; otherwise
    /// let go (a plugin's eviction has always been listed as `unloaded`).
    pub fn event(self) -> EventKind {
        match self {
            Why::Room(_) => EventKind::Evicted,
            Why::Plugin | Why::KeepAlive | Why::Admin | Why::Unregistered => EventKind::Unloaded,
        }
    }
}

/// One page-in or eviction.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: EventKind,
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
        kind: EventKind,
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
                EventKind::Evicted,
                (&format!("m{i}"), "copy-1".into(), "host0"),
                "lru".into(),
            );
        }
        let r = h.recent();
        assert_eq!(r.len(), KEEP);
        assert_eq!(r[0].model, format!("m{}", KEEP + 4));
        assert_eq!(r[KEEP - 1].model, "m5");
    }

    #[test]
    fn the_built_in_policy_evicts_and_the_rest_let_go() {
        let all = [
            (Why::Room(Residency::Lru), "lru", "evicted"),
            (Why::Room(Residency::Demand), "demand", "evicted"),
            (Why::Plugin, "plugin", "unloaded"),
            (Why::KeepAlive, "keep_alive", "unloaded"),
            (Why::Admin, "admin", "unloaded"),
            (Why::Unregistered, "unregistered", "unloaded"),
        ];
        for (why, label, event) in all {
            assert_eq!((why.label(), why.event().as_str()), (label, event));
        }
    }
}
