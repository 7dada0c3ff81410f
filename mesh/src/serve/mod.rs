//! The one serve path: every front door (OpenAI, v2 REST, v2 gRPC) hands a parsed, validated
//! request to `Serve::run`, which takes it through
//! route → resolve → tier check → response cache → place → admit → lease → slot → run →
//! record → charge, and gives back one result or a stream of text.
//!
//! Routing, the response cache and placement run where the request arrives; when placement
//! names a peer, the peer runs the rest (admission, fair scheduling, execution, the ledger
//! record) and its answer streams back (`peer`). Every check that can refuse a request for
//! its own content runs before admission, so a bad request costs no quota; one refused only
//! once the engine has read it (a prompt over the context) keeps its rate count.

mod bill;
pub mod check;
mod embedder;
mod endpoint;
pub mod error;
mod execute;
mod generate;
mod held;
pub mod peer;
mod place;
mod request;
mod span;
mod track;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use flatmesh_runtime::{FinishReason, Generation, ModelKind};

use self::{
    bill::Bill,
    execute::{Hit, Prepared, Ready},
    generate::Limit,
    held::Held,
};
pub use self::{
    bill::{client_id, request_info},
    embedder::CacheEmbedder,
    endpoint::Endpoint,
    error::{ErrorKind, ServeError},
    generate::{finish_reason, Event, Generating},
    place::{Mesh, Place},
    request::Forwarded,
    request::{Output, Request, Served, Work},
    track::{Outcome, Tracker},
};
use self::{
    span::{describe, request_span},
    track::Waiting,
};
use crate::{
    cache::{Cache, Lease},
    ledger::{now_ms, Ledger},
    metrics::Metrics,
    policy::{self, CachePrompt, Policies, RequestInfo},
    scheduler::Scheduler,
    telemetry,
    tenancy::{
        limits::{Admission, Limits},
        Caller, Tenancy,
    },
};

/// Most inputs one request may embed (as OpenAI's embeddings API allows).
pub const MAX_INPUTS: usize = 2048;

/// The serve path's handle. Cheap to clone.
#[derive(Clone)]
pub struct Serve {
    pub cache: Cache,
    pub scheduler: Scheduler,
    pub limits: Limits,
    pub policies: Policies,
    pub ledger: Ledger,
    pub metrics: Metrics,
    /// The longest one request may run once it has its slot.
    pub max_run: Duration,
    /// The mesh this node is part of, if any: made before `Serve`, so never set late.
    pub mesh: Option<Arc<Mesh>>,
}

impl Serve {
    /// A model name as a metric label: configured ids only, so labels stay bounded.
    pub fn model_label(&self, model: &str) -> String {
        if self.cache.contains(model) {
            model.to_string()
        } else {
            "unknown".to_string()
        }
    }

    /// Count a request that a front door refused before it reached the serve path (it did
    /// not parse or validate), so errors by endpoint include it.
    pub fn refused(&self, endpoint: Endpoint, status: u16) {
        self.metrics
            .requests
            .with_label_values(&["unknown", endpoint.label(), &status.to_string()])
            .inc();
    }

    /// Serve one request.
    pub async fn run(&self, req: Request) -> Result<Served, ServeError> {
        let label = self.model_label(&req.model);
        let id = format!(
            "{}-{}",
            req.endpoint.id_prefix(),
            uuid::Uuid::new_v4().simple()
        );
        let span = request_span(&req, &id);
        let mut tracker = Some(Tracker::new(
            &self.metrics,
            label,
            req.endpoint,
            req.caller.tier.name.clone(),
            span.clone(),
        ));
        let result = tracing::Instrument::instrument(self.serve(id, req, &mut tracker), span).await;
        // A running generation took the tracker with it; otherwise the request ends here.
        if let Some(t) = tracker {
            t.finish(Outcome::of(&result));
        }
        result
    }

    /// The steps of the serve path. The client's deadline ends the waiting ones at once;
    /// once the engine runs it is the engine's limit, so what was computed is recorded.
    async fn serve(
        &self,
        id: String,
        req: Request,
        tracker: &mut Option<Tracker>,
    ) -> Result<Served, ServeError> {
        let prepared = until(req.deadline, self.prepare(&id, &req, tracker)).await?;
        let ready = match prepared {
            Prepared::Answered(served) => return Ok(served),
            Prepared::Hit(hit) => return hit.answer(id, tracker).await,
            Prepared::Ready(ready) => ready,
        };
        let limit = self.limit(req.deadline);
        execute::run(id, ready, limit, tracker).await
    }

    /// Every step before the engine runs: route, resolve, check, admit, the response cache,
    /// placement (a peer's answer), the lease and the slot.
    async fn prepare(
        &self,
        id: &str,
        req: &Request,
        tracker: &mut Option<Tracker>,
    ) -> Result<Prepared, ServeError> {
        let info = self.info(id, req);
        let (targets, route) = self.targets(req, &info).await?;
        // Resolve once; the tier check, the kind check and the lease are on that model.
        let (model, kind) = self.check(req, &targets[0])?;
        if let Some(t) = tracker {
            t.relabel(self.model_label(&model)); // an alias or vmodel counts as what it became
        }
        let work = resolve_work(req.work.clone(), kind, &req.model)?;
        let span = tracing::Span::current();
        describe(&span, req, &work);
        // Admitted before the response cache is asked: a caller over its limits costs no
        // plugin call (nor the embedding a semantic cache computes).
        let admission = self.admit(&req.caller, &info).await?;
        // A tier held to other pools keeps its prompts and answers out of this node's
        // response cache: it is only passed through here.
        let outside = !place::runs_here(self.mesh.as_deref(), &req.caller.tier);
        let lookup = match outside {
            true => Lookup::NotAsked,
            false => self.look_up(req, &info, &model, &work).await?,
        };
        let mut remember = match lookup {
            Lookup::Hit(generation) => {
                telemetry::attr(&span, "gen_ai.response.model", model.clone());
                let mut bill = self.bill(req, info);
                bill.cache_hit = true;
                return Ok(Prepared::Hit(Box::new(Hit {
                    bill,
                    model,
                    route,
                    generation,
                    admission,
                })));
            }
            Lookup::Miss(cp) => Some(cp),
            Lookup::NotAsked => None,
        };
        let cache = remember.as_ref().map(|_| "miss");
        let mut admission = admission;
        let mesh = self.mesh.as_deref();
        if let Place::Peer(cluster, peer) = place::place(mesh, req, &model).await? {
            // The peer admits it against its own limits: out of this node's window.
            admission.refund();
            let here = place::Here {
                policies: &self.policies,
                metrics: &self.metrics,
                token: mesh.and_then(|m| m.token.as_deref()),
            };
            let decided = place::Decided {
                model: &model,
                fallbacks: &targets[1..],
                work: &work,
                route: route.clone(),
                cache,
                remember,
            };
            match here.on_peer((&cluster, &peer), req, decided, tracker).await {
                place::OnPeer::Answered(served) => return served.map(Prepared::Answered),
                // The peer could not take it: here, unless the tier may not run here.
                place::OnPeer::ServeHere(_) if !cluster.runs_here(&req.caller.tier) => {
                    return Err(cluster.confined(&req.caller.tier).into());
                }
                place::OnPeer::ServeHere(kept) => remember = kept,
            }
            admission = self.admit(&req.caller, &info).await?;
        }
        let bill = self.bill(req, info);
        let (lease, model) = self.lease(req, model, &targets[1..]).await?;
        if let Some(t) = tracker {
            t.relabel(self.model_label(&model)); // a router's fallback
        }
        telemetry::attr(&span, "gen_ai.response.model", model.clone());
        if let Some(cp) = &mut remember {
            cp.target = model.clone(); // A fallback's answer belongs to its own namespace.
        }
        let (tier, weight) = (&req.caller.tier.name, req.caller.tier.weight);
        let queued = tracing::info_span!(target: telemetry::TARGET, "queue", otel.name = "queue wait", flatmesh.tier = %tier);
        let mut lease = lease;
        let waiting = Waiting::new(&self.metrics, tier);
        let slot = tracing::Instrument::instrument(
            async {
                let slot = self.scheduler.acquire(tier, weight).await?;
                if lease.try_enter(tier, weight) {
                    return Ok(slot);
                }
                // The copy's batch is full: wait for a place in it (given out by the tiers'
                // weights) without holding an execution slot that another model could use,
                // then queue for one again.
                drop(slot);
                lease.enter(tier, weight).await;
                self.scheduler.acquire(tier, weight).await
            },
            queued,
        )
        .await?;
        drop(waiting);
        Ok(Prepared::Ready(Box::new(Ready {
            engine: lease.engine.clone(),
            held: Held::new(admission, lease, slot),
            work,
            bill,
            model,
            route,
            cache,
            remember,
        })))
    }

    /// The models to try in turn and the router's reason: as a peer decided them for a
    /// forwarded request, else as the router decides.
    async fn targets(
        &self,
        req: &Request,
        info: &RequestInfo,
    ) -> Result<(Vec<String>, Option<String>), ServeError> {
        match &req.forwarded {
            Some(f) => {
                let targets = std::iter::once(req.model.clone())
                    .chain(f.fallbacks.iter().cloned())
                    .collect();
                Ok((targets, None))
            }
            None => self.route(req, info).await,
        }
    }

    /// The response cache, for a generation that arrived here (a forwarded one was looked up
    /// where it arrived).
    async fn look_up(
        &self,
        req: &Request,
        info: &RequestInfo,
        model: &str,
        work: &Work,
    ) -> Result<Lookup, ServeError> {
        let Work::Generate(gen) = work else {
            return Ok(Lookup::NotAsked);
        };
        // The cache holds one text: an answer with more choices or with logprobs is neither
        // served from it nor stored in it.
        let whole_answer = gen.n > 1 || gen.logprobs.is_some();
        if !self.policies.caches() || req.forwarded.is_some() || whole_answer {
            return Ok(Lookup::NotAsked);
        }
        let cp = CachePrompt {
            request: info.clone(),
            target: model.to_string(),
            text: policy::cache_text(gen),
            temperature: gen.sampling.temperature,
            seed: gen.sampling.seed,
        };
        let hit = self.policies.lookup(&cp).await?;
        // A constrained request takes only an answer that follows its grammar (a semantic
        // cache may offer one stored for a similar prompt under another format).
        let hit = hit.filter(|a| match &gen.sampling.grammar {
            Some(g) => {
                flatmesh_runtime::constrain::accepts(g, &a.text, a.finish_reason != "length")
            }
            None => true,
        });
        let label = if hit.is_some() { "hit" } else { "miss" };
        self.metrics
            .response_cache
            .with_label_values(&[label])
            .inc();
        telemetry::attr(&tracing::Span::current(), "flatmesh.response_cache", label);
        Ok(match hit {
            Some(answer) => {
                Lookup::Hit(cached_generation(answer, cp.request.prompt_tokens as usize))
            }
            None => Lookup::Miss(cp),
        })
    }

    /// The bill of a request admitted here.
    fn bill(&self, req: &Request, info: RequestInfo) -> Bill {
        Bill {
            ledger: self.ledger.clone(),
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            policies: self.policies.clone(),
            caller: req.caller.clone(),
            endpoint: req.endpoint,
            info,
            client_id: req.client_id.clone(),
            cache_hit: false,
            started_ms: now_ms(),
            started: std::time::Instant::now(),
        }
    }

    fn info(&self, id: &str, req: &Request) -> RequestInfo {
        let generate = match &req.work {
            Work::Generate(g) | Work::Infer { generate: g, .. } => Some(g),
            Work::Embed { .. } => None,
        };
        request_info(
            id,
            &req.caller,
            &req.model,
            req.endpoint,
            generate,
            req.stream,
        )
    }

    /// The router's choice for a generation: the targets to try in turn, and its reason.
    async fn route(
        &self,
        req: &Request,
        info: &RequestInfo,
    ) -> Result<(Vec<String>, Option<String>), ServeError> {
        let asked = vec![req.model.clone()];
        if !matches!(req.work, Work::Generate(_)) || !self.policies.routes() {
            return Ok((asked, None));
        }
        let known = self.cache.contains(&req.model);
        let candidates = self.candidates(&req.caller);
        match self.policies.route(info, candidates, known).await? {
            None => Ok((asked, None)),
            Some(r) => {
                tracing::info!(target = %r.target, reason = %r.reason, "Routed");
                let targets = std::iter::once(r.target).chain(r.fallbacks).collect();
                Ok((targets, Some(r.reason)))
            }
        }
    }

    /// The models a tier may use, as candidates for the router.
    fn candidates(&self, caller: &Caller) -> Vec<policy::Candidate> {
        self.cache
            .status()
            .into_iter()
            .filter(|m| Tenancy::check_model(caller, &m.id).is_ok())
            .map(|m| policy::Candidate {
                kind: match m.kind {
                    Some(ModelKind::Llm) => "llm".into(),
                    Some(ModelKind::Embedding) => "embedding".into(),
                    None => String::new(),
                },
                loaded: m.state == crate::cache::ModelState::Ready,
                queue_depth: u32::try_from(m.leases).unwrap_or(u32::MAX),
                size_bytes: m.bytes.unwrap_or(0),
                context_length: 0,
                name: m.id,
            })
            .collect()
    }

    /// Resolve a name once and check the caller's tier and the work against that model.
    fn check(&self, req: &Request, name: &str) -> Result<(String, ModelKind), ServeError> {
        let Some(model) = self.cache.resolve(name) else {
            // An unknown name the tier may not use is refused as such: no probing for names.
            Tenancy::check_model(&req.caller, name)?;
            let mut e = ServeError::not_found(format!("model {name:?} does not exist"));
            e.param = Some("model".into());
            return Err(e);
        };
        Tenancy::check_model(&req.caller, &model)?;
        let kind = self
            .cache
            .kind(&model)
            .ok_or_else(|| ServeError::not_found(format!("model {name:?} does not exist")))?;
        check_kind(&req.work, kind, name)?;
        Ok((model, kind))
    }

    /// The pricing policy, then the tier's limits.
    async fn admit(&self, caller: &Caller, info: &RequestInfo) -> Result<Admission, ServeError> {
        self.policies
            .admit(info, || self.limits.period_use(&caller.tier.name))
            .await?;
        Ok(self.limits.admit(caller)?)
    }

    /// A lease on a copy of `model`, placed here; while a model cannot be loaded, the
    /// router's fallbacks are tried in turn (each checked like the first).
    async fn lease(
        &self,
        req: &Request,
        model: String,
        fallbacks: &[String],
    ) -> Result<(Lease, String), ServeError> {
        let bonus = req.caller.tier.residency_bonus.0;
        let mut model = model;
        let mut rest = fallbacks.iter();
        loop {
            match self.cache.pin_for(&model, req.keep_alive, bonus).await {
                Ok(lease) => return Ok((lease, model)),
                Err(e) => {
                    let e = ServeError::from(e);
                    let next = match (e.kind, rest.next()) {
                        (ErrorKind::Unavailable, Some(next)) => next,
                        _ => return Err(e),
                    };
                    tracing::warn!(target = %model, error = %e, "Trying the router's next fallback");
                    model = self.check(req, next)?.0;
                }
            }
        }
    }
}

impl Serve {
    /// The engine's limit: `scheduler.max_run` from now, or the client's deadline where nearer.
    fn limit(&self, deadline: Option<Instant>) -> Limit {
        let until = Instant::now() + self.max_run;
        match deadline {
            Some(d) if d < until => Limit {
                until: d,
                error: ServeError::past_deadline(),
            },
            _ => Limit {
                until,
                error: ServeError::new(
                    ErrorKind::Timeout,
                    "request_timeout",
                    format!("the request ran past its limit of {:?}", self.max_run),
                ),
            },
        }
    }
}

/// `serving`, unless the client's deadline passes first (queued, paging in, waiting for a
/// peer): the caller gets a timeout, and what was held goes back.
async fn until<T>(
    deadline: Option<Instant>,
    serving: impl std::future::Future<Output = Result<T, ServeError>>,
) -> Result<T, ServeError> {
    let Some(d) = deadline else {
        return serving.await;
    };
    tokio::time::timeout_at(d.into(), serving)
        .await
        .unwrap_or_else(|_| Err(ServeError::past_deadline()))
}

/// Whether a model of `kind` can do the work, or why not.
fn check_kind(work: &Work, kind: ModelKind, name: &str) -> Result<(), ServeError> {
    match (work, kind) {
        (Work::Generate(_), ModelKind::Llm) | (Work::Embed { .. }, ModelKind::Embedding) => Ok(()),
        (Work::Infer { .. }, ModelKind::Embedding) => Ok(()),
        (Work::Generate(_), ModelKind::Embedding) => Err(ServeError::bad_request(
            "model",
            format!("{name:?} is an embedding model; use /v1/embeddings"),
        )),
        (Work::Embed { .. }, ModelKind::Llm) => Err(ServeError::bad_request(
            "model",
            format!("{name:?} is not an embedding model"),
        )),
        (Work::Infer { texts, .. }, ModelKind::Llm) => match texts.len() {
            1 => Ok(()),
            n => Err(ServeError::invalid(format!(
                "input \"text_input\" must hold one element, got {n}"
            ))),
        },
    }
}

/// The work a model of `kind` does for a request (v2 `infer` becomes embed or generate).
fn resolve_work(work: Work, kind: ModelKind, name: &str) -> Result<Work, ServeError> {
    check_kind(&work, kind, name)?;
    Ok(match (work, kind) {
        (Work::Infer { texts, .. }, ModelKind::Embedding) => Work::Embed {
            inputs: texts,
            dimensions: None,
        },
        (Work::Infer { generate, .. }, ModelKind::Llm) => Work::Generate(generate),
        (work, _) => work,
    })
}

/// An answer of the response cache as a generation. The plugin's count is checked against
/// the text (a token is at least one byte, and any text is at least one token); the prompt
/// was not tokenized, so its tokens are the estimate policies saw.
fn cached_generation(answer: policy::Answer, prompt_tokens: usize) -> Generation {
    let completion_tokens = (answer.completion_tokens as usize).clamp(
        usize::from(!answer.text.is_empty()),
        answer.text.len().max(1),
    );
    let finish_reason = match answer.finish_reason.as_str() {
        "length" => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    Generation::new(answer.text, prompt_tokens, completion_tokens, finish_reason)
}

/// What the response cache said.
enum Lookup {
    /// An answer (a generation that is already complete).
    Hit(Generation),
    /// No answer: the prompt to store the answer under.
    Miss(CachePrompt),
    /// Not asked (no cache plugin, not a generation, or asked where it arrived).
    NotAsked,
}

#[cfg(test)]
mod tests;
