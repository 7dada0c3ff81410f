//! Pinning a copy for a request: look, load (asking the residency plugin where room is needed), or wait.

use std::{sync::Arc, time::Duration};

use parking_lot::MutexGuard;
use tokio::time::Instant;

use super::{
    advice,
    copy::CopyId,
    plan::Advice,
    residency::{Advisor, Candidate},
    state::{Pin, Pinned, State},
    Cache, CacheError, Lease,
};
use crate::units::KeepAlive;

/// One request's wait for a copy.
struct Attempt<'a> {
    id: &'a str,
    keep_alive: Option<KeepAlive>,
    residency_bonus: Duration,
    started: Instant,
    /// When a request still without room gives up (`pressure_wait`).
    deadline: Instant,
    /// Whether it had to wait for a load: a cache miss, timed.
    missed: bool,
    /// A residency plugin is asked once per request, only when room is needed.
    asked: bool,
    advice: Advice<(String, CopyId)>,
}

/// What one look at the state decided.
enum Step {
    Pinned(Lease),
    /// A load was started: look again at once.
    Again,
    /// Ask the residency plugin (without the lock) about these copies, then look again.
    Ask(Arc<dyn Advisor>, Vec<(String, CopyId)>, Vec<Candidate>),
    /// Wait for a change in the state, or the deadline.
    Wait,
}

impl Cache {
    /// Pin a copy without taking a concurrency slot.
    pub(super) async fn pin(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
        residency_bonus: Duration,
    ) -> Result<Lease, CacheError> {
        let started = Instant::now();
        let mut attempt = Attempt {
            id,
            keep_alive,
            residency_bonus,
            started,
            deadline: started + self.inner.config.pressure_wait.0,
            missed: false,
            asked: false,
            advice: Advice::BuiltIn,
        };
        {
            // One request, counted once for the residency policy however long it waits.
            let mut st = self.inner.state.lock();
            if let Some(model) = st.resolve(id) {
                st.demand.request(&model);
            }
        }
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.look(&mut attempt)? {
                Step::Pinned(lease) => return Ok(lease),
                Step::Again => {}
                Step::Ask(advisor, keys, candidates) => {
                    attempt.asked = true;
                    let verdict = advisor.advise(candidates).await;
                    attempt.advice = advice::advice(&keys, verdict);
                }
                Step::Wait => {
                    let until = attempt
                        .deadline
                        .max(Instant::now() + Duration::from_millis(50));
                    let _ = tokio::time::timeout_at(until, notified).await;
                }
            }
        }
    }

    /// One look at the state, under its lock.
    fn look(&self, a: &mut Attempt) -> Result<Step, CacheError> {
        let mut st = self.inner.state.lock();
        let model = st
            .resolve(a.id)
            .ok_or_else(|| CacheError::NotFound(a.id.to_string()))?;
        let now = Instant::now();
        match st.try_pin(&model, now, a.keep_alive, a.residency_bonus) {
            Pin::Pinned(pinned, grow) => {
                drop(st);
                if let Some(load) = grow {
                    self.spawn_load(load);
                }
                Ok(Step::Pinned(self.lease(a, model, pinned)))
            }
            Pin::Loading => {
                a.missed = true;
                Ok(Step::Wait)
            }
            Pin::Gone => Err(CacheError::NotFound(a.id.to_string())),
            Pin::Failed(reason, retry_at) => Err(CacheError::Failed {
                id: model,
                reason,
                retry_after: retry_at - now,
            }),
            Pin::Cold => {
                a.missed = true;
                self.cold(st, a, model, now)
            }
        }
    }

    /// No copy: ask the residency plugin when room is needed (once), else start a load, or
    /// give up once the deadline has passed without room.
    fn cold(
        &self,
        mut st: MutexGuard<'_, State>,
        a: &Attempt,
        model: String,
        now: Instant,
    ) -> Result<Step, CacheError> {
        let inner = &self.inner;
        // Its advice is checked by key.
        let advisor = inner.advisor().filter(|x| x.is_active());
        match advisor {
            Some(x) if !a.asked && st.needs_room(&model, now, &inner.metrics)? => {
                let (keys, candidates): (Vec<_>, Vec<_>) = st.candidates(now).into_iter().unzip();
                Ok(Step::Ask(x, keys, candidates))
            }
            _ => match st.start_load(&model, now, &inner.metrics, &a.advice)? {
                Some(load) => {
                    drop(st);
                    self.spawn_load(load);
                    Ok(Step::Again)
                }
                None if now >= a.deadline => Err(CacheError::NoRoom {
                    id: model,
                    waited: now - a.started,
                }),
                None => Ok(Step::Wait),
            },
        }
    }

    /// The lease on a pinned copy; a request that waited for a load counts as a miss.
    fn lease(&self, a: &Attempt, model: String, pinned: Pinned) -> Lease {
        if a.missed {
            let waited = a.started.elapsed().as_secs_f64();
            self.inner
                .metrics
                .cache_miss_seconds
                .with_label_values(&[&model])
                .observe(waited);
        }
        Lease {
            engine: pinned.engine,
            model,
            copy: pinned.copy,
            device: pinned.device,
            gate: pinned.gate,
            inner: self.inner.clone(),
            _place: None,
        }
    }
}
