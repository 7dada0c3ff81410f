//! The residency slot: a plugin decides which idle copies leave first when a device needs
//! room. The cache asks it through `cache::residency::Advisor` and still enforces every rule.

use super::{config::OnFailure, failure::Outcome, host::residency as residency_world, Policies};
use crate::cache::residency::{Advisor, Candidate, Verdict};

/// The cache's advisor: the residency slot of these policies.
pub struct PluginAdvisor(pub Policies);

impl Advisor for PluginAdvisor {
    fn is_active(&self) -> bool {
        self.0.residency.is_loaded()
    }

    fn advise(&self, copies: Vec<Candidate>) -> futures::future::BoxFuture<'static, Verdict> {
        let policies = self.0.clone();
        Box::pin(async move { policies.order(copies).await })
    }
}

impl Policies {
    /// The plugin's order of `copies`, the first to leave first. Without a plugin, or when it
    /// fails: the built-in order, or nothing evicted for a closed slot.
    pub async fn order(&self, copies: Vec<Candidate>) -> Verdict {
        let n = copies.len();
        let residents: Vec<residency_world::Resident> = copies
            .into_iter()
            .map(|c| residency_world::Resident {
                model: c.model,
                device: c.device,
                bytes: c.bytes,
                idle_ms: c.idle_ms,
                age_ms: c.age_ms,
                demand: c.demand,
                load_ms: c.load_ms,
                favoured: c.favoured,
            })
            .collect();
        let residents = &residents;
        // Node-wide decisions: no tenant's state.
        let outcome = self
            .residency
            .call("", |mut i| async move {
                let r = i.bindings.call_order(&mut i.store, residents).await;
                (i, r)
            })
            .await;
        let failure = match outcome {
            Outcome::Absent => return Verdict::BuiltIn,
            Outcome::Done(order) if order.len() <= n && order.iter().all(|&i| (i as usize) < n) => {
                return Verdict::Order(order.into_iter().map(|i| i as usize).collect());
            }
            Outcome::Done(order) => self.residency.invalid(format!(
                "an order of {} indices for {n} copies, or an index out of range",
                order.len()
            )),
            Outcome::Failed(f) => f,
        };
        tracing::debug!(error = %failure, "The residency plugin failed; deciding without it");
        match self.residency.on_failure {
            OnFailure::Closed => Verdict::KeepAll,
            OnFailure::Open | OnFailure::Default => Verdict::BuiltIn,
        }
    }
}
