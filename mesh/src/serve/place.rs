//! Placement inside the serve path: always here. In a mesh the front doors decide first
//! (`api::forward`, `cluster` placement) and forward whole requests to a peer; what reaches
//! the serve path runs here.

/// Where a request for a model is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On this node: a local copy (loaded now if needed).
    Here,
}

/// Decide where a request for `model` runs: here (the mesh forwarded it earlier if needed).
pub fn place(_model: &str) -> Place {
    Place::Here
}
