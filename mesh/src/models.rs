//! The models this agent serves: each loaded once, shared by requests, bounded in concurrency.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use flatmesh_runtime::{Engine, ModelKind};
use serde::Serialize;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::{config::ModelConfig, metrics::Metrics};

/// Why a model cannot serve.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model {0:?} does not exist")]
    NotFound(String),
    #[error("model {id:?} failed to load: {reason}")]
    Failed { id: String, reason: String },
}

/// The models of this agent, by id.
#[derive(Clone)]
pub struct Models {
    slots: Arc<BTreeMap<String, Arc<Slot>>>,
    metrics: Metrics,
}

struct Slot {
    config: ModelConfig,
    engine: OnceCell<Result<Arc<dyn Engine>, String>>,
    gate: Arc<Semaphore>,
}

/// A model ready to serve, with a permit that counts toward its concurrency limit.
pub struct Loaded {
    pub engine: Arc<dyn Engine>,
    _permit: OwnedSemaphorePermit,
}

/// What `/v1/models` and `/readyz` report about a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ModelKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Models {
    pub fn new(configs: &[ModelConfig], metrics: Metrics) -> Self {
        let slots = configs
            .iter()
            .map(|c| {
                let slot = Slot {
                    config: c.clone(),
                    engine: OnceCell::new(),
                    gate: Arc::new(Semaphore::new(c.max_concurrency)),
                };
                (c.id.clone(), Arc::new(slot))
            })
            .collect();
        Models {
            slots: Arc::new(slots),
            metrics,
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.slots.keys()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.slots.contains_key(id)
    }

    /// Load every model now (in the background of the caller), so the first request is warm.
    pub async fn preload(&self) {
        let loads = self.slots.keys().map(|id| self.engine(id));
        futures::future::join_all(loads).await;
    }

    /// The model's engine, loading it first if needed. Concurrent callers share one load.
    pub async fn engine(&self, id: &str) -> Result<Arc<dyn Engine>, ModelError> {
        let slot = self
            .slots
            .get(id)
            .ok_or_else(|| ModelError::NotFound(id.to_string()))?;
        let loaded = slot
            .engine
            .get_or_init(|| self.load(slot.config.clone()))
            .await;
        loaded.clone().map_err(|reason| ModelError::Failed {
            id: id.to_string(),
            reason,
        })
    }

    /// The engine plus a concurrency permit; waits while the model is at its limit.
    pub async fn acquire(&self, id: &str) -> Result<Loaded, ModelError> {
        let engine = self.engine(id).await?;
        let gate = self.slots[id].gate.clone();
        let permit = gate
            .acquire_owned()
            .await
            .expect("the gate is never closed");
        Ok(Loaded {
            engine,
            _permit: permit,
        })
    }

    async fn load(&self, config: ModelConfig) -> Result<Arc<dyn Engine>, String> {
        let started = Instant::now();
        let id = config.id.clone();
        let format = config.format.expect("config::finish sets the format");
        tracing::info!(model = %id, path = %config.path.display(), ?format, "Loading model");
        let result =
            tokio::task::spawn_blocking(move || flatmesh_runtime::load(&config.path, format))
                .await
                .map_err(|e| format!("load task failed: {e}"))?;
        match result {
            Ok(engine) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics
                    .model_load_seconds
                    .with_label_values(&[&id])
                    .observe(secs);
                self.metrics
                    .model_bytes
                    .with_label_values(&[&id])
                    .set(engine.size_bytes() as i64);
                tracing::info!(model = %id, seconds = secs, bytes = engine.size_bytes(), "Loaded model");
                Ok(engine)
            }
            Err(e) => {
                self.metrics
                    .model_load_failures
                    .with_label_values(&[&id, e.kind()])
                    .inc();
                tracing::error!(model = %id, error = %e, "Model failed to load");
                Err(e.to_string())
            }
        }
    }

    pub fn status(&self) -> Vec<ModelStatus> {
        self.slots
            .iter()
            .map(|(id, slot)| {
                let (state, kind, error) = match slot.engine.get() {
                    None => ("loading", None, None),
                    Some(Ok(e)) => ("ready", Some(e.info().kind), None),
                    Some(Err(reason)) => ("failed", None, Some(reason.clone())),
                };
                ModelStatus {
                    id: id.clone(),
                    state,
                    kind,
                    error,
                }
            })
            .collect()
    }
}
