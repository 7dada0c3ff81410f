//! The registry: models and vmodels added through the admin API, kept across restarts behind
//! an async trait (the embedded file store here; a shared store for a mesh can implement it).

mod file;
mod store;

pub use self::file::FileRegistry;
pub use self::store::{ModelRegistry, Saved};
