//! The scheduler: execution slots of the node shared between tiers by weighted fair queuing.
//!
//! A request takes a slot before it runs and gives it back when it ends (`Slot` drops). While
//! slots are free nobody waits (work-conserving: an idle tier's share is lent out). When they
//! are not, requests wait in their tier's bounded queue, and each freed slot goes to the
//! waiting request with the smallest virtual finish tag, assigned on arrival (start =
//! max(virtual now, the tier's last finish), finish = start + 1/weight): busy tiers are served
//! in proportion to their weights, and a tier coming back from idle gets its share at once,
//! without banked credit.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// Why a request was not given a slot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("tier {0:?} has too many requests waiting; try again shortly")]
    QueueFull(String),
    #[error("no execution slot became free within {1:?} for tier {0:?}")]
    Timeout(String, Duration),
}

struct Waiter {
    id: u64,
    start: f64,
    finish: f64,
    tx: oneshot::Sender<()>,
}

struct TierQueue {
    /// Finish tag of the tier's latest request.
    finish: f64,
    waiting: VecDeque<Waiter>,
}

struct State {
    free: usize,
    virtual_now: f64,
    next_id: u64,
    tiers: BTreeMap<String, TierQueue>,
}

#[derive(Clone)]
pub struct Scheduler {
    state: Arc<Mutex<State>>,
    max_queue: usize,
    max_wait: Duration,
    metrics: Metrics,
}

/// A held execution slot; dropping it hands the slot to the next waiter.
pub struct Slot {
    scheduler: Scheduler,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.scheduler.lock();
        st.free += 1;
        dispatch(&mut st);
    }
}

/// Give free slots to waiters, smallest virtual finish tag first.
fn dispatch(st: &mut State) {
    while st.free > 0 {
        let next = st
            .tiers
            .iter()
            .filter_map(|(name, q)| q.waiting.front().map(|w| (w.finish, name.clone())))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((_, name)) = next else { return };
        let w = st
            .tiers
            .get_mut(&name)
            .expect("present")
            .waiting
            .pop_front()
            .expect("non-empty");
        if w.tx.send(()).is_ok() {
            st.virtual_now = w.start;
            st.free -= 1;
        }
    }
}

impl Scheduler {
    pub fn new(slots: usize, max_queue: usize, max_wait: Duration, metrics: Metrics) -> Self {
        Scheduler {
            state: Arc::new(Mutex::new(State {
                free: slots,
                virtual_now: 0.0,
                next_id: 0,
                tiers: BTreeMap::new(),
            })),
            max_queue,
            max_wait,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for a slot for a request of `tier` (with its weight).
    pub async fn acquire(&self, tier: &str, weight: u32) -> Result<Slot, Rejected> {
        let started = std::time::Instant::now();
        let (id, rx) = {
            let mut st = self.lock();
            let nobody_waits = st.tiers.values().all(|q| q.waiting.is_empty());
            let vnow = st.virtual_now;
            let at_once = nobody_waits && st.free > 0;
            let q = st
                .tiers
                .entry(tier.to_string())
                .or_insert_with(|| TierQueue {
                    finish: 0.0,
                    waiting: VecDeque::new(),
                });
            let queued = q.waiting.len();
            if !at_once && queued >= self.max_queue {
                self.metrics
                    .rejections
                    .with_label_values(&[tier, "queue_full"])
                    .inc();
                return Err(Rejected::QueueFull(tier.to_string()));
            }
            // Tags on arrival: a tier that was idle starts at virtual now, with no banked credit.
            let start = q.finish.max(vnow);
            let finish = start + 1.0 / weight.max(1) as f64;
            q.finish = finish;
            if at_once {
                st.free -= 1;
                st.virtual_now = start;
                drop(st);
                self.metrics
                    .queue_wait_seconds
                    .with_label_values(&[tier])
                    .observe(0.0);
                return Ok(Slot {
                    scheduler: self.clone(),
                });
            }
            let (tx, rx) = oneshot::channel();
            st.next_id += 1;
            let id = st.next_id;
            st.tiers
                .get_mut(tier)
                .expect("inserted")
                .waiting
                .push_back(Waiter {
                    id,
                    start,
                    finish,
                    tx,
                });
            (id, rx)
        };
        match tokio::time::timeout(self.max_wait, rx).await {
            Ok(Ok(())) => {
                self.metrics
                    .queue_wait_seconds
                    .with_label_values(&[tier])
                    .observe(started.elapsed().as_secs_f64());
                Ok(Slot {
                    scheduler: self.clone(),
                })
            }
            _ => {
                let mut st = self.lock();
                if let Some(q) = st.tiers.get_mut(tier) {
                    q.waiting.retain(|w| w.id != id);
                }
                self.metrics
                    .rejections
                    .with_label_values(&[tier, "timeout"])
                    .inc();
                Err(Rejected::Timeout(tier.to_string(), self.max_wait))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn busy_tiers_are_served_by_weight_and_a_lone_tier_gets_everything() {
        let s = Scheduler::new(1, 1000, Duration::from_secs(3600), Metrics::new());
        let served = Arc::new(Mutex::new(Vec::new()));
        let first = s.acquire("warm-up", 1).await.unwrap();
        let mut tasks = Vec::new();
        for (tier, weight) in [("gold", 3), ("basic", 1)] {
            for _ in 0..200 {
                let (s, served) = (s.clone(), served.clone());
                tasks.push(tokio::spawn(async move {
                    let _slot = s.acquire(tier, weight).await.unwrap();
                    served.lock().unwrap().push(tier);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }));
            }
        }
        tokio::task::yield_now().await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(10 * 200)).await;
        let order = served.lock().unwrap().clone();
        let first_200 = &order[..200];
        let gold = first_200.iter().filter(|t| **t == "gold").count() as f64;
        let ratio = gold / (200.0 - gold);
        assert!((2.7..=3.3).contains(&ratio), "gold:basic = {ratio}");
        for t in tasks {
            t.await.unwrap();
        }
        // Alone, a tier is never held back by the other's share.
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            let _slot = s.acquire("basic", 1).await.unwrap();
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queues_and_long_waits_are_rejected() {
        let s = Scheduler::new(1, 1, Duration::from_secs(2), Metrics::new());
        let _held = s.acquire("a", 1).await.unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.acquire("a", 1).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            s.acquire("a", 1).await.err(),
            Some(Rejected::QueueFull("a".into()))
        );
        assert!(matches!(waiter.await.unwrap(), Err(Rejected::Timeout(..))));
    }
}
