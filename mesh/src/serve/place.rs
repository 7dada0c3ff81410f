//! Placement: where a request runs. One node today; the mesh makes it answer "forward".

/// Where a request for a model is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On this node: a local copy (loaded now if needed).
    Here,
}

/// Decide where a request for `model` runs. A single agent always serves it itself.
pub fn place(_model: &str) -> Place {
    Place::Here
}
