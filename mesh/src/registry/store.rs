//! What a registry keeps, and the trait every registry store implements.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cache::config::ModelConfig;

/// Models registered through the API, and every vmodel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Saved {
    pub models: Vec<ModelConfig>,
    pub vmodels: BTreeMap<String, String>,
}

/// A place the registered models and vmodels are kept. Calls may do I/O: the cache calls them
/// outside its state lock, one write at a time, in the order the changes were made.
#[async_trait::async_trait]
pub trait ModelRegistry: Send + Sync + 'static {
    /// What was saved last (empty when nothing was).
    async fn load(&self) -> anyhow::Result<Saved>;

    /// Replace what is saved with `saved`.
    async fn save(&self, saved: Saved) -> anyhow::Result<()>;
}
