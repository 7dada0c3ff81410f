//! The scheduler: execution slots of the node shared between tiers by weighted fair queuing.
//!
//! A request takes a slot before it runs and gives it back when it ends (`Slot` drops). While
//! slots are free nobody waits (work-conserving: an idle tier's share is lent out). When they
//! are not, requests wait in their tier's bounded queue, and each freed slot goes to the
//! waiting request with the smallest virtual finish tag, assigned on arrival (start =
//! max(virtual now, the tier's last finish), finish = start + 1/weight): busy tiers are served
//! in proportion to their weights, and a tier coming back from idle gets its share at once,
//! without banked credit.
//!
//! The same queue gates each copy (`Scheduler::gate`): a copy runs at most `max_concurrency`
//! sequences in its batch, and when the batch is full the next to join is chosen by the
//! tiers' weights too, so the shares hold whichever of the two limits binds.

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
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
    /// The node's scheduler reports waits and rejections; a copy's gate does not.
    metrics: Option<Arc<Metrics>>,
}

/// A held execution slot; dropping it hands the slot to the next waiter.
pub struct Slot {
    scheduler: Scheduler,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.scheduler.state.lock();
        st.free += 1;
        dispatch(&mut st);
    }
}

impl TierQueue {
    /// Tags on arrival: a tier that was idle starts at virtual now, with no banked credit.
    fn tag(&mut self, vnow: f64, weight: u32) -> (f64, f64) {
        let start = self.finish.max(vnow);
        self.finish = start + 1.0 / weight.max(1) as f64;
        (start, self.finish)
    }
}

fn queue<'a>(st: &'a mut State, tier: &str) -> &'a mut TierQueue {
    st.tiers
        .entry(tier.to_string())
        .or_insert_with(|| TierQueue {
            finish: 0.0,
            waiting: VecDeque::new(),
        })
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
        Scheduler::with(slots, max_queue, max_wait, Some(Arc::new(metrics)))
    }

    /// The gate of one copy: `slots` sequences at once, waiting unbounded (the node's queue
    /// bounds who can get here, and a request's `max_run` bounds how long it waits).
    pub fn gate(slots: usize) -> Self {
        Scheduler::with(
            slots,
            usize::MAX,
            Duration::from_secs(10 * 365 * 86_400),
            None,
        )
    }

    fn with(
        slots: usize,
        max_queue: usize,
        max_wait: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
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

    /// A slot now, if one is free and nobody waits for one (tagged as `acquire` would).
    pub fn try_acquire(&self, tier: &str, weight: u32) -> Option<Slot> {
        let mut st = self.state.lock();
        if st.free == 0 || st.tiers.values().any(|q| !q.waiting.is_empty()) {
            return None;
        }
        let vnow = st.virtual_now;
        let (start, _) = queue(&mut st, tier).tag(vnow, weight);
        st.free -= 1;
        st.virtual_now = start;
        Some(Slot {
            scheduler: self.clone(),
        })
    }

    fn observe_wait(&self, tier: &str, seconds: f64) {
        if let Some(m) = &self.metrics {
            m.queue_wait_seconds
                .with_label_values(&[tier])
                .observe(seconds);
        }
    }

    fn count_rejection(&self, tier: &str, why: &str) {
        if let Some(m) = &self.metrics {
            m.rejections.with_label_values(&[tier, why]).inc();
        }
    }

    /// Wait for a slot for a request of `tier` (with its weight).
    pub async fn acquire(&self, tier: &str, weight: u32) -> Result<Slot, Rejected> {
        let started = std::time::Instant::now();
        let (id, rx) = {
            let mut st = self.state.lock();
            let nobody_waits = st.tiers.values().all(|q| q.waiting.is_empty());
            let vnow = st.virtual_now;
            let at_once = nobody_waits && st.free > 0;
            let q = queue(&mut st, tier);
            let queued = q.waiting.len();
            if !at_once && queued >= self.max_queue {
                self.count_rejection(tier, "queue_full");
                return Err(Rejected::QueueFull(tier.to_string()));
            }
            let (start, finish) = q.tag(vnow, weight);
            if at_once {
                st.free -= 1;
                st.virtual_now = start;
                drop(st);
                self.observe_wait(tier, 0.0);
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
        let mut waiting = Waiting {
            scheduler: self,
            tier,
            id,
            rx,
            done: false,
        };
        let granted = match tokio::time::timeout(self.max_wait, &mut waiting.rx).await {
            Ok(Ok(())) => true,
            // Timed out (or the sender went away): under the lock, a waiter that is no longer
            // queued was granted a slot just now, and takes it.
            _ => waiting.leave(),
        };
        waiting.done = true;
        if granted {
            self.observe_wait(tier, started.elapsed().as_secs_f64());
            Ok(Slot {
                scheduler: self.clone(),
            })
        } else {
            self.count_rejection(tier, "timeout");
            Err(Rejected::Timeout(tier.to_string(), self.max_wait))
        }
    }
}

/// A request waiting in its tier's queue. Leaving (on timeout, or when the waiting future is
/// dropped because the client went away) removes it from the queue; a slot granted in the
/// meantime is either taken (`leave` answers true) or, on drop, handed to the next waiter.
struct Waiting<'a> {
    scheduler: &'a Scheduler,
    tier: &'a str,
    id: u64,
    rx: oneshot::Receiver<()>,
    /// Set once the outcome is settled (slot taken or timeout reported).
    done: bool,
}

impl Waiting<'_> {
    /// Leave the queue; true when a slot was granted before we could.
    fn leave(&mut self) -> bool {
        let mut st = self.scheduler.state.lock();
        if let Some(q) = st.tiers.get_mut(self.tier) {
            let before = q.waiting.len();
            q.waiting.retain(|w| w.id != self.id);
            if q.waiting.len() < before {
                return false;
            }
        }
        // Not queued any more: `dispatch` sent the grant (under this same lock), so it is in
        // the channel.
        self.rx.try_recv().is_ok()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done && self.leave() {
            let mut st = self.scheduler.state.lock();
            st.free += 1;
            dispatch(&mut st);
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
                    served.lock().push(tier);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }));
            }
        }
        tokio::task::yield_now().await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(10 * 200)).await;
        let order = served.lock().clone();
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

    /// Free slots and nobody queued: every slot can be had at once.
    async fn assert_all_slots_back(s: &Scheduler, slots: usize) {
        {
            let st = s.state.lock();
            assert_eq!(st.free, slots, "slots leaked");
            assert!(st.tiers.values().all(|q| q.waiting.is_empty()));
        }
        let t0 = tokio::time::Instant::now();
        let mut held = Vec::new();
        for _ in 0..slots {
            held.push(s.acquire("check", 1).await.expect("a free slot"));
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_granted_to_a_request_that_goes_away_is_handed_back() {
        let s = Scheduler::new(1, 10, Duration::from_secs(5), Metrics::new());
        let held = s.acquire("a", 1).await.unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.acquire("a", 1).await.map(drop) })
        };
        tokio::task::yield_now().await;
        // The grant is sent, and the waiter is dropped before it could take it.
        drop(held);
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_all_slots_back(&s, 1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn slots_all_come_back_after_a_timeout_storm() {
        const SLOTS: usize = 3;
        // Waits run out after two ticks; waiters arrive at 0 or 1 tick, holders release at
        // 2 or 3 ticks, and some waiters are dropped at 2 ticks: every release and drop falls
        // on an instant at which some waits time out.
        let tick = Duration::from_millis(1);
        let s = Scheduler::new(SLOTS, 10_000, 2 * tick, Metrics::new());
        let (mut served, mut timed_out) = (0, 0);
        for round in 0..60usize {
            let mut held = Vec::new();
            for _ in 0..SLOTS {
                held.push(s.acquire("hold", 1).await.unwrap());
            }
            let mut waiters = Vec::new();
            for i in 0..(4 * SLOTS + round % 5) {
                let s = s.clone();
                let tier = ["gold", "basic", "free"][i % 3];
                waiters.push(tokio::spawn(async move {
                    tokio::time::sleep(tick * ((i / 2) % 2) as u32).await;
                    let slot = s.acquire(tier, 1 + (i % 3) as u32).await;
                    tokio::time::sleep(tick * (i % 2) as u32).await;
                    slot.map(drop)
                }));
            }
            tokio::task::yield_now().await;
            // Holders release, and some waiters are dropped, at the instant the waits run out.
            let release = tokio::spawn(async move {
                tokio::time::sleep(2 * tick).await;
                for (i, slot) in held.into_iter().enumerate() {
                    if i == SLOTS - 1 {
                        tokio::time::sleep(tick).await;
                    }
                    drop(slot);
                    if i % 2 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            });
            let aborted: Vec<_> = waiters
                .iter()
                .enumerate()
                .filter(|(i, _)| (i + round) % 3 == 0)
                .map(|(_, w)| w.abort_handle())
                .collect();
            let abort = tokio::spawn(async move {
                tokio::time::sleep(2 * tick).await;
                for (i, w) in aborted.into_iter().enumerate() {
                    w.abort();
                    if i % 2 == 1 {
                        tokio::task::yield_now().await;
                    }
                }
            });
            release.await.unwrap();
            abort.await.unwrap();
            for w in waiters {
                match w.await {
                    Ok(Ok(())) => served += 1,
                    Ok(Err(Rejected::Timeout(..))) => timed_out += 1,
                    Ok(Err(e)) => panic!("unexpected {e}"),
                    Err(e) => assert!(e.is_cancelled()),
                }
            }
        }
        assert!(
            served > 0 && timed_out > 0,
            "{served} served, {timed_out} timed out"
        );
        assert_all_slots_back(&s, SLOTS).await;
    }
}
