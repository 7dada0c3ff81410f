//! The place step: here, or the peer of the mesh that holds the model (or should load it),
//! which then serves the request as it was routed and looked up in the cache here.

use super::{
    error::ServeError,
    peer::{self, After, Call, WireRequest, WireWork},
    request::{Request, Served, Work},
    track::Tracker,
};
use crate::{
    cluster::{placement::Confined, Cluster, Peer},
    metrics::Metrics,
    policy::{CachePrompt, Policies},
};

/// A peer's deadline comes this much before the client's, so that the peer's own timeout
/// answer crosses back before this node's deadline drops the connection to it.
const PEER_MARGIN: std::time::Duration = std::time::Duration::from_millis(5);

/// This node's part in a mesh, for the place step.
pub struct Mesh {
    pub cluster: Cluster,
    /// The token every node of the mesh shares (`mesh.token`): it proves to a peer that a
    /// forwarded request comes from a node.
    pub token: Option<String>,
}

/// Where a request for a model is served.
pub enum Place {
    /// On this node: a local copy (loaded now if needed).
    Here,
    /// On a peer of the mesh.
    Peer(Cluster, Peer),
}

/// What the serve path decided here: for the peer, and for the answer.
pub(super) struct Decided<'a> {
    pub model: &'a str,
    /// The router's next choices.
    pub fallbacks: &'a [String],
    pub work: &'a Work,
    /// The router's reason and the response cache's `miss`, for the answer.
    pub route: Option<String>,
    pub cache: Option<&'static str>,
    /// The prompt to store the answer under, in this node's response cache.
    pub remember: Option<CachePrompt>,
}

/// How serving on a peer went.
pub(super) enum OnPeer {
    /// The peer answered: its answer, or its error.
    Answered(Result<Served, ServeError>),
    /// The peer could not be reached and nothing reached the client: serve it here (the cache
    /// prompt given back).
    ServeHere(Option<CachePrompt>),
}

/// Here when there is no mesh, the request came from a peer (one hop at most), or the mesh's
/// placement says so; else the peer it names. A tier held to pools or labels is served only on
/// a node of them (a node outside a mesh is in pool `default`, with no labels): else refused.
pub(super) async fn place(
    mesh: Option<&Mesh>,
    req: &Request,
    model: &str,
) -> Result<Place, ServeError> {
    let tier = &req.caller.tier;
    let Some(mesh) = mesh else {
        if !runs_here(None, tier) {
            return Err(Confined {
                tier: tier.name.clone(),
                confinement: tier.confinement(),
                pool: crate::cluster::config::default_pool(),
            }
            .into());
        }
        return Ok(Place::Here);
    };
    if req.forwarded.is_some() {
        // The node that forwarded it chose this one from what it saw; this node's own pool
        // is what counts.
        if !mesh.cluster.runs_here(tier) {
            return Err(mesh.cluster.confined(tier).into());
        }
        return Ok(Place::Here);
    }
    match mesh.cluster.place(model, tier).await {
        Ok(Some(peer)) => Ok(Place::Peer(mesh.cluster.clone(), peer)),
        Ok(None) => Ok(Place::Here),
        Err(confined) => Err(confined.into()),
    }
}

/// Whether `tier` may run on this node: its pool and labels in a mesh, pool `default` with
/// no labels outside one.
pub(super) fn runs_here(mesh: Option<&Mesh>, tier: &crate::tenancy::Tier) -> bool {
    match mesh {
        Some(m) => m.cluster.runs_here(tier),
        None => tier.runs_on(&crate::cluster::config::default_pool(), &Default::default()),
    }
}

/// What serving on a peer needs of this node: its policies (the response cache) and metrics.
pub(super) struct Here<'a> {
    pub policies: &'a Policies,
    pub metrics: &'a Metrics,
    pub token: Option<&'a str>,
}

impl Here<'_> {
    /// Serve the request on `peer`, as decided here.
    pub(super) async fn on_peer(
        &self,
        (cluster, peer): (&Cluster, &Peer),
        req: &Request,
        decided: Decided<'_>,
        tracker: &mut Option<Tracker>,
    ) -> OnPeer {
        let Decided {
            model,
            fallbacks,
            work,
            route,
            cache,
            remember,
        } = decided;
        let work = match work {
            Work::Generate(g) => WireWork::Generate(g.clone()),
            Work::Embed { inputs, dimensions } => WireWork::Embed {
                inputs: inputs.clone(),
                dimensions: *dimensions,
            },
            Work::Infer { .. } => {
                tracing::warn!("a v2 infer reached placement unresolved; serving it here");
                return OnPeer::ServeHere(remember);
            }
        };
        let wire = WireRequest {
            model: model.to_string(),
            fallbacks: fallbacks.to_vec(),
            endpoint: req.endpoint.label().to_string(),
            work,
            keep_alive: req.keep_alive,
            client_id: req.client_id.clone(),
            stream: req.stream,
            timeout_ms: req.deadline.map(|d| {
                let left = d.saturating_duration_since(std::time::Instant::now());
                u64::try_from(left.saturating_sub(PEER_MARGIN).as_millis()).unwrap_or(u64::MAX)
            }),
        };
        let after = After {
            remember: remember.map(|cp| (self.policies.clone(), cp)),
            span: tracing::Span::current(),
        };
        let call = Call {
            node: &peer.node,
            url: &peer.http,
            origin: cluster.node(),
            authorization: req.caller.authorization.as_ref().map(|c| c.as_header()),
            mesh_token: self.token,
            deadline: req.deadline,
        };
        match peer::serve(call, &wire, self.metrics, after).await {
            Ok(result) => {
                // The peer answered: it counts the request, in the mesh's sums once.
                if let Some(t) = tracker {
                    t.hand_off();
                }
                OnPeer::Answered(result.map(|mut served| {
                    served.route = route;
                    served.cache = cache;
                    served
                }))
            }
            Err((e, after)) => {
                tracing::warn!(peer = %peer.node, error = %e, "Peer unreachable; serving here");
                OnPeer::ServeHere(after.remember.map(|(_, cp)| cp))
            }
        }
    }
}
