//! The `embed` import of policy plugins, served by the node's embedding models.

use flatmesh_runtime::ModelKind;

use crate::cache::Cache;

/// Embeds for plugins (a semantic cache, a router). The agent calls it on a request's behalf,
/// so it takes no admission or slot of its own; it never pages in a model that cannot embed.
pub struct CacheEmbedder(pub Cache);

impl crate::policy::Embedder for CacheEmbedder {
    fn embed(
        &self,
        model: String,
        text: String,
    ) -> futures::future::BoxFuture<'static, Result<Vec<f32>, String>> {
        let cache = self.0.clone();
        Box::pin(async move {
            let id = cache
                .resolve(&model)
                .ok_or_else(|| format!("no model {model:?}"))?;
            let kind = cache.kind(&id);
            if kind != Some(ModelKind::Embedding) {
                return Err(format!("{model:?} is not an embedding model"));
            }
            let lease = cache.acquire(&id, None).await.map_err(|e| e.to_string())?;
            let engine = lease.engine.clone();
            let out = tokio::task::spawn_blocking(move || engine.embed(&[text]))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            drop(lease);
            out.vectors
                .into_iter()
                .next()
                .ok_or_else(|| "the model returned no vector".to_string())
        })
    }
}
