//! What the cache shows of itself: each model with its copies, and the vmodels.

use flatmesh_runtime::ModelKind;
use serde::Serialize;
use tokio::time::Instant;

pub use super::copy::{CopyPhase, ModelState};
use super::{
    copy::CopyState,
    state::{Entry, State},
};

/// A model as the admin API and `/v1/models` show it, with each of its copies. The top-level
/// fields sum up the copies: `state` is the best copy's, `device` the first ready copy's,
/// `bytes` one copy's, `leases` all copies' together.
#[derive(Debug, Clone, Serialize)]
pub struct CopyStatus {
    pub id: String,
    pub state: ModelState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ModelKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Measured bytes of one copy when loaded, predicted otherwise.
    pub bytes: Option<u64>,
    pub leases: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<f64>,
    pub keep_alive: String,
    pub pinned: bool,
    pub source: ModelSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Most copies the model may have.
    pub max_copies: usize,
    pub copies: Vec<CopyDetail>,
}

/// One copy of a model.
#[derive(Debug, Clone, Serialize)]
pub struct CopyDetail {
    pub copy: u64,
    pub device: String,
    /// `loading`, `ready` or `draining`.
    pub state: CopyPhase,
    /// Measured when ready, reserved while loading.
    pub bytes: u64,
    pub leases: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<String>,
}

/// Where a model was registered from: the config file or the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    Config,
    Api,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmodelStatus {
    pub name: String,
    pub target: String,
}

impl Entry {
    pub fn state(&self) -> ModelState {
        if self.copies.iter().any(|c| c.ready().is_some()) {
            ModelState::Ready
        } else if self.copies.iter().any(|c| c.is_loading()) {
            ModelState::Loading
        } else if self.failure.is_some() {
            ModelState::Failed
        } else {
            ModelState::Cold
        }
    }
}

impl State {
    fn device_name(&self, device: usize) -> String {
        self.devices
            .get(device)
            .map_or_else(String::new, |d| d.name().to_string())
    }

    pub fn status(&self, now: Instant) -> Vec<CopyStatus> {
        self.models
            .values()
            .map(|e| self.model_status(e, now))
            .collect()
    }

    fn model_status(&self, e: &Entry, now: Instant) -> CopyStatus {
        let copies: Vec<CopyDetail> = e
            .copies
            .iter()
            .map(|c| {
                let mut d = CopyDetail {
                    copy: c.id.0,
                    device: self.device_name(c.device),
                    state: c.phase(),
                    bytes: 0,
                    leases: c.pins,
                    idle_seconds: None,
                    keep_alive: None,
                };
                match &c.state {
                    CopyState::Loading { reserved } => d.bytes = *reserved,
                    CopyState::Ready(r) => {
                        d.bytes = r.bytes;
                        d.keep_alive = Some(r.keep_alive.to_string());
                        d.idle_seconds = (c.pins == 0).then(|| (now - r.last_used).as_secs_f64());
                    }
                }
                d
            })
            .collect();
        let state = e.state();
        let ready = e.copies.iter().find_map(|c| Some((c, c.ready()?)));
        let shown = ready.map(|(c, _)| c).or_else(|| e.copies.first());
        let idle: Option<f64> = copies
            .iter()
            .map(|c| c.idle_seconds)
            .collect::<Option<Vec<f64>>>()
            .and_then(|v| v.into_iter().reduce(f64::min));
        CopyStatus {
            id: e.config.id.clone(),
            state,
            kind: match ready {
                Some((_, r)) => Some(r.engine.info().kind),
                None => e.config.format.map(|f| f.kind()),
            },
            device: shown.map(|c| self.device_name(c.device)),
            bytes: ready.map(|(_, r)| r.bytes).or(e.predicted),
            leases: e.copies.iter().map(|c| c.pins).sum(),
            idle_seconds: if state == ModelState::Ready {
                idle
            } else {
                None
            },
            keep_alive: match ready {
                Some((_, r)) => r.keep_alive.to_string(),
                None => e
                    .config
                    .keep_alive
                    .unwrap_or(self.default_keep_alive)
                    .to_string(),
            },
            pinned: e.config.pinned,
            source: if e.from_config {
                ModelSource::Config
            } else {
                ModelSource::Api
            },
            error: match (state, &e.failure) {
                (ModelState::Failed, Some(f)) => Some(f.reason.clone()),
                _ => None,
            },
            max_copies: e.config.copies,
            copies,
        }
    }

    /// Copies of removed models still serving their last leases.
    pub fn draining(&self) -> Vec<(String, CopyDetail)> {
        self.draining
            .iter()
            .map(|(id, d)| {
                let detail = CopyDetail {
                    copy: id.0,
                    device: self.device_name(d.device),
                    state: CopyPhase::Draining,
                    bytes: d.bytes,
                    leases: d.pins,
                    idle_seconds: None,
                    keep_alive: None,
                };
                (d.model.clone(), detail)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{CopyPhase, ModelSource, ModelState};

    #[test]
    fn states_show_as_the_words_the_api_has_always_used() {
        for (s, word) in [
            (ModelState::Cold, "cold"),
            (ModelState::Loading, "loading"),
            (ModelState::Ready, "ready"),
            (ModelState::Failed, "failed"),
        ] {
            assert_eq!((json!(s), s.to_string()), (json!(word), word.to_string()));
        }
        for (p, word) in [
            (CopyPhase::Loading, "loading"),
            (CopyPhase::Ready, "ready"),
            (CopyPhase::Draining, "draining"),
        ] {
            assert_eq!((json!(p), p.to_string()), (json!(word), word.to_string()));
        }
        assert_eq!(
            json!([ModelSource::Config, ModelSource::Api]),
            json!(["config", "api"])
        );
    }
}
