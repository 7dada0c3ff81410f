//! The place step: here, or the peer of the mesh that holds the model (or should load it),
//! which then serves the request as it was routed and looked up in the cache here.

use super::{
    error::ServeError,
    peer::{self, After, Call, WireRequest, WireWork},
    request::{Request, Served, Work},
    track::Tracker,
};
use crate::{
    cluster::{Cluster, Peer},
    metrics::Metrics,
    policy::{CachePrompt, Policies},
};

/// This node's part in a mesh, for the place step.
pub struct Mesh {
    pub cluster: Cluster,
    /// The admin token every node of the mesh shares: it proves to a peer that a forwarded
    /// request comes from a node.
    pub token: Option<String>,
}

/// Where a request for a model is served.
pub enum Place {
    /// On this node: a local copy (loaded now if needed).
    Here,
    /// On a peer of the mesh.
    Peer(Cluster, Peer),
}

/// What the serve path decided here and the answer keeps: the router's reason, the cache.
pub(super) type Asked = (Option<String>, Option<&'static str>);

/// Here when there is no mesh, the request came from a peer (one hop at most), or the mesh's
/// placement says so; else the peer it names.
pub(super) async fn place(mesh: Option<&Mesh>, req: &Request, model: &str) -> Place {
    if req.forwarded.is_some() {
        return Place::Here;
    }
    let Some(mesh) = mesh else {
        return Place::Here;
    };
    match mesh.cluster.place(model).await {
        Some(peer) => Place::Peer(mesh.cluster.clone(), peer),
        None => Place::Here,
    }
}

/// What serving on a peer needs of this node: its policies (the response cache) and metrics.
pub(super) struct Here<'a> {
    pub policies: &'a Policies,
    pub metrics: &'a Metrics,
    pub token: Option<&'a str>,
}

impl Here<'_> {
    /// Serve the request on `peer`. `Err` (with the cache prompt given back) when the peer
    /// could not be reached: nothing was sent to the client, the request is served here.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_peer(
        &self,
        cluster: &Cluster,
        peer: &Peer,
        req: &Request,
        (model, fallbacks): (&str, &[String]),
        work: &Work,
        (route, cache): Asked,
        remember: Option<CachePrompt>,
        tracker: &mut Option<Tracker>,
    ) -> Result<Result<Served, ServeError>, Option<CachePrompt>> {
        let work = match work {
            Work::Generate(g) => WireWork::Generate(g.clone()),
            Work::Embed { inputs, dimensions } => WireWork::Embed {
                inputs: inputs.clone(),
                dimensions: *dimensions,
            },
            Work::Infer { .. } => {
                tracing::warn!("a v2 infer reached placement unresolved; serving it here");
                return Err(remember);
            }
        };
        let wire = WireRequest {
            model: model.to_string(),
            fallbacks: fallbacks.to_vec(),
            endpoint: req.endpoint.to_string(),
            work,
            keep_alive: req.keep_alive,
            client_id: req.client_id.clone(),
            stream: req.stream,
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
        };
        match peer::serve(call, &wire, self.metrics, after).await {
            Ok(result) => {
                // The peer answered: it counts the request, in the mesh's sums once.
                if let Some(t) = tracker {
                    t.hand_off();
                }
                Ok(result.map(|mut served| {
                    served.route = route;
                    served.cache = cache;
                    served
                }))
            }
            Err((e, after)) => {
                tracing::warn!(peer = %peer.node, error = %e, "Peer unreachable; serving here");
                Err(after.remember.map(|(_, cp)| cp))
            }
        }
    }
}
