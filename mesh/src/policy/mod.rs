//! Policies as sandboxed WebAssembly components: the router, cache, pricing and residency slots.
//!
//! Each slot holds at most one plugin (a component of its world in `wit/`). An empty slot
//! means the built-in behaviour: no routing, no response cache, flat-rate pricing. When a
//! plugin fails, its slot's `on_failure` decides: `open` skips the policy, `closed` refuses the
//! request with 503, `default` runs the built-in policy (for the router: `default_target`).

mod bindings;
mod config;
mod failure;
pub mod host;
pub mod kind;
mod name;
mod prompt;
pub mod residency;
pub mod slot;
pub mod state;

use std::{sync::Arc, time::Duration};

pub use self::config::{OnFailure, PolicyConfig, SlotConfig};
pub use self::failure::Refusal;
pub use self::host::{
    types::{AnswerShape, PromptFeatures, RequestInfo, ResponseFormat, Usage},
    Answer, Embedder,
};
pub use self::name::{NoSuchSlot, SlotName};
pub use self::prompt::{answer_shape, cache_text, estimate_tokens, features, prompt_text};
pub use self::slot::{AnySlot, SlotStatus};
use self::{
    failure::Outcome,
    host::{cache as cache_world, pricing as pricing_world, router as router_world, Runtime},
    kind::{CacheKind, PricingKind, ResidencyKind, RouterKind},
    slot::{Settings, Slot},
};
use crate::metrics::Metrics;

/// Where the router sent a request.
#[derive(Debug, Clone)]
pub struct Route {
    pub target: String,
    pub fallbacks: Vec<String>,
    pub reason: String,
}

pub use router_world::Candidate;

/// What the cache slot sees of a generation request.
pub type CachePrompt = cache_world::Prompt;

/// A tier as the pricing plugin sees it.
pub use pricing_world::{InvoiceLine, PeriodUse, TenantUse, TierInfo};

/// The shortest `wait` the host honours: a plugin asking again and again within microseconds
/// would spin the host.
const MIN_WAIT_MS: u32 = 25;

/// Longest string a plugin may hand back in a decision (reasons, messages).
const MAX_TEXT: usize = 4096;
/// Longest cached answer.
const MAX_ANSWER: usize = 1 << 20;

/// The four slots. Cheap to clone.
#[derive(Clone)]
pub struct Policies {
    pub router: Arc<Slot<RouterKind>>,
    pub cache: Arc<Slot<CacheKind>>,
    pub pricing: Arc<Slot<PricingKind>>,
    pub residency: Arc<Slot<ResidencyKind>>,
    default_target: Option<String>,
    /// Longest a pricing `wait` may hold a request in all.
    max_wait: Duration,
    pub runtime: Runtime,
}

impl Policies {
    /// Empty slots; `load_configured` fills them.
    pub fn new(
        config: &PolicyConfig,
        embedder: Option<Arc<dyn Embedder>>,
        max_wait: Duration,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let memory_cap = (config.memory_mib << 20) as usize;
        let runtime = Runtime::new(memory_cap, embedder)?;
        let settings = |slot: Option<&SlotConfig>| Settings {
            deadline: Duration::from_secs_f64(
                slot.and_then(|s| s.deadline_ms)
                    .unwrap_or(config.deadline_ms)
                    / 1000.0,
            ),
            memory_cap,
            max_idle: config.instances,
            host_wait: Duration::from_millis(config.host_wait_ms),
            max_plugin_bytes: config.max_plugin_bytes.0,
        };
        let setup = |name: SlotName| slot::Setup {
            runtime: &runtime,
            settings: settings(config.slot(name)),
            on_failure: config
                .slot(name)
                .map_or(OnFailure::Default, |s| s.on_failure),
            kv_bytes: config.kv_bytes,
            metrics: &metrics,
        };
        Ok(Policies {
            router: Slot::new(setup(SlotName::Router))?,
            cache: Slot::new(setup(SlotName::Cache))?,
            pricing: Slot::new(setup(SlotName::Pricing))?,
            residency: Slot::new(setup(SlotName::Residency))?,
            default_target: config
                .router
                .as_ref()
                .and_then(|r| r.default_target.clone()),
            max_wait,
            runtime,
        })
    }

    /// Load the configured plugins; one that does not load stops the agent from starting.
    pub async fn load_configured(&self, config: &PolicyConfig) -> anyhow::Result<()> {
        for (name, s) in config.slots() {
            self.slot(name)
                .load(&s.plugin, s.config_string())
                .await
                .map_err(|e| anyhow::anyhow!("policy.{name}: {e}"))?;
        }
        Ok(())
    }

    /// A slot by name, whatever its plugin's kind.
    pub fn slot(&self, name: SlotName) -> Arc<dyn AnySlot> {
        match name {
            SlotName::Router => self.router.clone(),
            SlotName::Cache => self.cache.clone(),
            SlotName::Pricing => self.pricing.clone(),
            SlotName::Residency => self.residency.clone(),
        }
    }

    /// Reload plugins whose files change, until the process ends.
    pub fn watch(&self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
        let every = Duration::from_secs(1);
        let all = futures::future::join_all(SlotName::ALL.map(|n| self.slot(n).watch(every)));
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                _ = all => {}
            }
        });
    }

    pub fn status(&self) -> Vec<SlotStatus> {
        SlotName::ALL.map(|n| self.slot(n).status()).into()
    }

    /// Which model serves the request: `None` keeps the one asked for.
    /// `known` says whether the requested name is a registered model or vmodel: the built-in
    /// default only takes requests for names nobody else serves.
    pub async fn route(
        &self,
        request: &RequestInfo,
        candidates: Vec<Candidate>,
        known: bool,
    ) -> Result<Option<Route>, Refusal> {
        let names: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
        let outcome = self
            .router
            .call(&request.tenant, |mut i| async move {
                let r = i
                    .bindings
                    .call_route(&mut i.store, request, &candidates)
                    .await;
                (i, r)
            })
            .await;
        let failure = match outcome {
            Outcome::Absent => return Ok(None),
            Outcome::Done(None) => return Ok(None),
            Outcome::Done(Some(d)) => {
                let unknown = std::iter::once(&d.target)
                    .chain(&d.fallbacks)
                    .find(|m| !names.contains(m));
                match unknown {
                    Some(m) => self.router.invalid(format!(
                        "routed to {m:?}, which is not a candidate for tier {:?}",
                        request.tier
                    )),
                    None if d.reason.len() > MAX_TEXT || d.fallbacks.len() > 64 => {
                        self.router.invalid(format!(
                            "a decision of {} bytes of reason and {} fallbacks is too large",
                            d.reason.len(),
                            d.fallbacks.len()
                        ))
                    }
                    None => {
                        return Ok(Some(Route {
                            target: d.target,
                            fallbacks: d.fallbacks,
                            reason: d.reason,
                        }))
                    }
                }
            }
            Outcome::Failed(f) => f,
        };
        match self.router.on_failure {
            OnFailure::Open => Ok(None),
            OnFailure::Closed => Err(Refusal::closed(SlotName::Router, &failure)),
            OnFailure::Default => {
                Ok(self
                    .default_target
                    .as_ref()
                    .filter(|_| !known)
                    .map(|t| Route {
                        target: t.clone(),
                        fallbacks: Vec::new(),
                        reason: format!(
                            "built-in default (the router failed: {})",
                            failure.kind.label()
                        ),
                    }))
            }
        }
    }

    /// Whether a router plugin is loaded (else candidates are not worth listing).
    pub fn routes(&self) -> bool {
        self.router.is_loaded()
    }

    pub fn caches(&self) -> bool {
        self.cache.is_loaded()
    }

    /// An answer from the cache, if the plugin has one for this prompt.
    pub async fn lookup(&self, prompt: &CachePrompt) -> Result<Option<Answer>, Refusal> {
        let outcome = self
            .cache
            .call(&prompt.request.tenant, |mut i| async move {
                let r = i.bindings.call_lookup(&mut i.store, prompt).await;
                (i, r)
            })
            .await;
        let failure = match outcome {
            Outcome::Absent | Outcome::Done(None) => return Ok(None),
            Outcome::Done(Some(a)) if a.text.len() <= MAX_ANSWER => return Ok(Some(a)),
            Outcome::Done(Some(a)) => self
                .cache
                .invalid(format!("an answer of {} bytes is too large", a.text.len())),
            Outcome::Failed(f) => f,
        };
        self.cache.fallback(&failure, None)
    }

    /// Offer a fresh answer to the cache. Failures are counted and logged, never the
    /// request's problem: its answer is already made.
    pub async fn store(&self, prompt: &CachePrompt, answer: &Answer) {
        let _ = self
            .cache
            .call(&prompt.request.tenant, |mut i| async move {
                let r = i.bindings.call_store(&mut i.store, prompt, answer).await;
                (i, r)
            })
            .await;
    }

    /// Ask the pricing plugin to admit a request; `used` says what the tier used this period.
    pub async fn admit(
        &self,
        request: &RequestInfo,
        used: impl Fn() -> PeriodUse,
    ) -> Result<(), Refusal> {
        if !self.pricing.is_loaded() {
            return Ok(()); // The period's use is not worth reading for nobody.
        }
        let deadline = tokio::time::Instant::now() + self.max_wait;
        loop {
            let used = used();
            let outcome = self
                .pricing
                .call(&request.tenant, |mut i| async move {
                    let r = i.bindings.call_admit(&mut i.store, request, &used).await;
                    (i, r)
                })
                .await;
            let failure = match outcome {
                Outcome::Absent | Outcome::Done(pricing_world::Admission::Admit) => return Ok(()),
                Outcome::Done(pricing_world::Admission::Deny(d)) => {
                    if (400..=599).contains(&d.status) && d.message.len() <= MAX_TEXT {
                        return Err(Refusal {
                            status: d.status,
                            message: d.message,
                            retry_after: d.retry_after_s.map(u64::from),
                        });
                    }
                    self.pricing.invalid(format!(
                        "a denial with status {} and a message of {} bytes",
                        d.status,
                        d.message.len()
                    ))
                }
                Outcome::Done(pricing_world::Admission::Wait(ms)) => {
                    let ms = ms.max(MIN_WAIT_MS);
                    let until = tokio::time::Instant::now() + Duration::from_millis(ms.into());
                    if until > deadline {
                        return Err(Refusal {
                            status: 429,
                            message: format!(
                                "the pricing policy holds requests of tier {:?} longer than the queue may wait ({:?})",
                                request.tier, self.max_wait
                            ),
                            retry_after: Some(u64::from(ms.div_ceil(1000)).max(1)),
                        });
                    }
                    tokio::time::sleep_until(until).await;
                    continue;
                }
                Outcome::Failed(f) => f,
            };
            return self.pricing.fallback(&failure, ());
        }
    }

    /// Tell the pricing plugin what a finished request used.
    pub async fn charge(&self, request: &RequestInfo, usage: Usage) {
        let _ = self
            .pricing
            .call(&request.tenant, |mut i| async move {
                let r = i.bindings.call_charge(&mut i.store, request, usage).await;
                (i, r)
            })
            .await;
    }

    /// Invoice lines from the pricing plugin: `None` when the built-in flat rate applies
    /// (no plugin, or a failing one in an open or default slot).
    pub async fn settle(
        &self,
        period: &str,
        tiers: Vec<TierInfo>,
        tenants: Vec<TenantUse>,
    ) -> Result<Option<Vec<InvoiceLine>>, Refusal> {
        let outcome = self
            .pricing
            .call("", |mut i| async move {
                let r = i
                    .bindings
                    .call_settle(&mut i.store, period, &tiers, &tenants)
                    .await;
                (i, r)
            })
            .await;
        let failure = match outcome {
            Outcome::Absent => return Ok(None),
            Outcome::Done(lines) => match lines
                .iter()
                .find(|l| !l.amount.is_finite() || l.description.len() > MAX_TEXT)
            {
                None => return Ok(Some(lines)),
                Some(l) => self.pricing.invalid(format!(
                    "an invoice line for {:?} with amount {} is not valid",
                    l.tenant, l.amount
                )),
            },
            Outcome::Failed(f) => f,
        };
        self.pricing.fallback(&failure, None)
    }
}
