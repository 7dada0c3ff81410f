//! What the serve path takes and gives: a request as every protocol hands it over, and what
//! came of it.

use std::time::Instant;

use flatmesh_runtime::{Embeddings, GenerateRequest};

use super::{endpoint::Endpoint, generate::Generating};
use crate::{tenancy::Caller, units::KeepAlive};

/// What a request asks a model to do.
#[derive(Debug, Clone)]
pub enum Work {
    Generate(GenerateRequest),
    /// Embed the inputs; `dimensions`, when given, must be the model's width.
    Embed {
        inputs: Vec<String>,
        dimensions: Option<u32>,
    },
    /// v2 `infer`: an embedding model embeds the texts; an LLM generates from the one text.
    Infer {
        texts: Vec<String>,
        generate: GenerateRequest,
    },
}

/// A request, as every protocol hands it over.
#[derive(Debug, Clone)]
pub struct Request {
    pub caller: Caller,
    /// The model or vmodel the client named.
    pub model: String,
    /// Where it came in.
    pub endpoint: Endpoint,
    pub work: Work,
    pub keep_alive: Option<KeepAlive>,
    /// The client's own id of the request, if it gave one.
    pub client_id: Option<String>,
    pub stream: bool,
    /// Sent by a peer that routed, cached and placed it: served here, as it is.
    pub forwarded: Option<Forwarded>,
    /// When the client stops waiting (`x-request-timeout`, `grpc-timeout`): past it the
    /// request fails as timed out wherever it is, and a peer serving it gets what is left.
    pub deadline: Option<Instant>,
}

/// What a peer decided for a request it sent here.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// The router's next choices after the model, tried in turn where it cannot be loaded.
    pub fallbacks: Vec<String>,
}

/// A served request.
pub struct Served {
    /// The agent's own id of the request (the ledger's).
    pub id: String,
    /// The model that served it (a vmodel resolved; a router's choice).
    pub model: String,
    /// The router's reason, when a router chose the model.
    pub route: Option<String>,
    /// `hit` or `miss` when the response cache was asked.
    pub cache: Option<&'static str>,
    /// The peer that served it, when it was not this node.
    pub node: Option<String>,
    pub output: Output,
}

pub enum Output {
    Embeddings(Embeddings),
    Text(Generating),
}
