//! Where a request came in, and how the labels and the request ids name it.

/// Where a request came in; its label names it in the ledger, the metrics, the spans and
/// between the nodes of a mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    V2Infer,
    V2Generate,
    V2GenerateStream,
    /// gRPC `ModelStreamInfer`.
    V2Stream,
}

impl Endpoint {
    pub const ALL: [Endpoint; 7] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::V2Infer,
        Endpoint::V2Generate,
        Endpoint::V2GenerateStream,
        Endpoint::V2Stream,
    ];

    /// The `endpoint` label of the metrics and the ledger.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::V2Infer => "v2_infer",
            Endpoint::V2Generate => "v2_generate",
            Endpoint::V2GenerateStream => "v2_generate_stream",
            Endpoint::V2Stream => "v2_stream",
        }
    }

    /// The endpoint a label names.
    pub fn from_label(label: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.label() == label)
    }

    /// How the agent's request ids start (`chatcmpl-…`, as OpenAI's do).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chatcmpl",
            Endpoint::Completions => "cmpl",
            Endpoint::Embeddings => "emb",
            Endpoint::V2Generate | Endpoint::V2GenerateStream => "gen",
            Endpoint::V2Infer | Endpoint::V2Stream => "v2",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
