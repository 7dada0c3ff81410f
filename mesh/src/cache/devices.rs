//! The node's devices as the cache places on them: which devices a model of a given format may
//! use, GPUs found not usable at start, and what the admin API shows of each device.

use std::sync::Arc;

use flatmesh_runtime::{Device, DeviceKind, Format};

use super::{plan::DeviceRoom, state::State};

/// A device as the admin API and the status page show it.
pub struct DeviceView {
    pub device: Arc<Device>,
    /// Why a GPU device takes no copies (its GPU was not usable at start).
    pub unusable: Option<String>,
}

impl DeviceView {
    /// The driver's (free, total) bytes of a cuda device's usable GPU (`None` on the host, for
    /// a GPU not usable, or when the driver cannot say). Asks the driver: call outside the
    /// cache's lock.
    pub fn driver_memory(&self) -> Option<(u64, u64)> {
        self.unusable
            .is_none()
            .then(|| self.device.driver_memory())?
    }

    /// `host` or `cuda`.
    pub fn kind(&self) -> &'static str {
        match self.device.kind() {
            DeviceKind::Host => "host",
            DeviceKind::Cuda { .. } => "cuda",
        }
    }

    /// The GPU's ordinal of a cuda device.
    pub fn gpu(&self) -> Option<usize> {
        match self.device.kind() {
            DeviceKind::Host => None,
            DeviceKind::Cuda { ordinal } => Some(ordinal),
        }
    }
}

impl State {
    /// Ask the driver about every GPU a device names, once at start: a GPU that cannot be
    /// used (no driver, no such GPU) is remembered with the reason, and its devices take no
    /// copies (models go to the other devices). One log line per such GPU.
    pub fn check_gpus(&mut self, probe: &dyn Fn(usize) -> Result<(u64, u64), String>) {
        let gpus: std::collections::BTreeSet<usize> = self
            .devices
            .iter()
            .filter_map(|d| match d.kind() {
                DeviceKind::Cuda { ordinal } => Some(ordinal),
                DeviceKind::Host => None,
            })
            .collect();
        for gpu in gpus {
            match probe(gpu) {
                Ok((free, total)) => {
                    tracing::info!(
                        gpu,
                        free_bytes = free,
                        total_bytes = total,
                        "GPU devices ready"
                    )
                }
                Err(reason) => {
                    let names: Vec<&str> = self
                        .devices
                        .iter()
                        .filter(|d| d.kind() == DeviceKind::Cuda { ordinal: gpu })
                        .map(|d| d.name())
                        .collect();
                    tracing::warn!(gpu, %reason, devices = ?names,
                        "GPU not usable: its devices take no copies (models go to the other devices)");
                    self.gpu_down.insert(gpu, reason);
                }
            }
        }
    }

    /// Whether a copy of a model of `format` may go on device `i`: any model on the host; on
    /// a GPU only GGUF LLMs (BERT embedding models run on the host), and only while the GPU
    /// is usable.
    pub fn takes(&self, i: usize, format: Option<Format>, ignore_down: bool) -> bool {
        match self.devices.get(i).map(|d| d.kind()) {
            Some(DeviceKind::Host) => true,
            Some(DeviceKind::Cuda { ordinal }) => {
                format == Some(Format::Gguf)
                    && (ignore_down || !self.gpu_down.contains_key(&ordinal))
            }
            None => false,
        }
    }

    /// The devices as placement sees them for a copy of `id`: a device that may not hold it
    /// has no room at all.
    pub fn rooms(&self, id: &str) -> Vec<DeviceRoom> {
        let format = self.models.get(id).and_then(|e| e.config.format);
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| match self.takes(i, format, false) {
                true => DeviceRoom {
                    capacity: d.capacity(),
                    used: d.used(),
                },
                false => DeviceRoom {
                    capacity: 0,
                    used: 0,
                },
            })
            .collect()
    }

    /// The largest device a model of `format` may ever use (GPUs down now included).
    pub fn largest_for(&self, format: Option<Format>) -> u64 {
        (0..self.devices.len())
            .filter(|&i| self.takes(i, format, true))
            .map(|i| self.devices[i].capacity())
            .max()
            .unwrap_or(0)
    }

    /// Why no device can hold `need` bytes of `id` now, when none can (even after evicting).
    pub fn no_device(&self, id: &str, need: u64) -> Option<String> {
        let rooms = self.rooms(id);
        if rooms.iter().any(|r| r.capacity >= need) {
            return None;
        }
        let down: Vec<String> = self
            .gpu_down
            .iter()
            .map(|(g, why)| format!("GPU {g} is not usable ({why})"))
            .collect();
        Some(format!(
            "no usable device can hold its {need} bytes{}",
            match down.is_empty() {
                true => String::new(),
                false => format!(": {}", down.join("; ")),
            }
        ))
    }

    /// Every device, with why a GPU device takes no copies.
    pub fn device_views(&self) -> Vec<DeviceView> {
        self.devices
            .iter()
            .map(|d| DeviceView {
                device: d.clone(),
                unusable: match d.kind() {
                    DeviceKind::Cuda { ordinal } => self.gpu_down.get(&ordinal).cloned(),
                    DeviceKind::Host => None,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use flatmesh_runtime::{Footprint, RuntimeError};
    use tokio::time::Instant;

    use super::*;
    use crate::{
        cache::{
            config::{Capacity, DeviceConfig, ModelConfig},
            plan::Advice,
            state::{Origin, Pin},
            CacheError,
        },
        metrics::Metrics,
        units::KeepAlive,
    };

    const GIB: u64 = 1 << 30;

    fn device(name: &str, gpu: Option<usize>, bytes: u64) -> DeviceConfig {
        DeviceConfig {
            name: name.into(),
            kind: if gpu.is_some() { "cuda" } else { "host" }.into(),
            gpu,
            capacity: Capacity::Bytes(bytes),
        }
    }

    /// host0 (1 GiB); two budgets on GPU 0 (4 GiB each); GPU 1 (16 GiB), which is down.
    fn pool(metrics: &Metrics) -> State {
        let devices = [
            device("host0", None, GIB),
            device("gpu0a", Some(0), 4 * GIB),
            device("gpu0b", Some(0), 4 * GIB),
            device("gpu1", Some(1), 16 * GIB),
        ];
        let mut st = State::new(&devices, KeepAlive::Forever, metrics);
        st.check_gpus(&|gpu| match gpu {
            0 => Ok((70 * GIB, 80 * GIB)),
            _ => Err("no such GPU".into()),
        });
        st
    }

    fn add(st: &mut State, id: &str, format: Format, weights: u64) -> Result<(), CacheError> {
        let mut c = ModelConfig::new(id, format!("/m/{id}"), Some(format));
        c.kv_cache_tokens = Some(16);
        let f = Footprint {
            weights,
            kv_bytes_per_token: 0,
            context: 16,
        };
        st.add(c, Origin::Config, Ok(f))
    }

    fn place(st: &mut State, id: &str, m: &Metrics) -> Result<String, CacheError> {
        let load = st.start_load(id, Instant::now(), m, &Advice::BuiltIn)?;
        Ok(load.expect("room").device.name().to_string())
    }

    #[test]
    fn budgets_on_one_gpu_share_its_lane_and_each_gpu_has_its_own() {
        let st = pool(&Metrics::new());
        let lane = |i: usize| st.devices[i].lane().clone();
        assert!(lane(1).same(&lane(2)));
        assert!(!lane(1).same(&lane(3)));
        assert!(!lane(0).same(&lane(1)));
        assert_eq!(st.devices[3].kind(), DeviceKind::Cuda { ordinal: 1 });
        assert_eq!(st.gpu_down.get(&1).map(String::as_str), Some("no such GPU"));
        let views = st.device_views();
        let shown: Vec<_> = views
            .iter()
            .map(|v| (v.kind(), v.gpu(), v.unusable.is_some()))
            .collect();
        assert_eq!(
            shown,
            [
                ("host", None, false),
                ("cuda", Some(0), false),
                ("cuda", Some(0), false),
                ("cuda", Some(1), true)
            ]
        );
    }

    #[tokio::test]
    async fn embedding_models_stay_on_the_host_and_llms_go_to_a_usable_gpu() {
        let m = Metrics::new();
        let mut st = pool(&m);
        add(&mut st, "bert", Format::BertSafetensors, 100 << 20).unwrap();
        add(&mut st, "llm", Format::Gguf, 100 << 20).unwrap();
        add(&mut st, "llm2", Format::Gguf, 100 << 20).unwrap();
        // The GPUs have the most free bytes, yet the embedding model goes to the host.
        assert_eq!(place(&mut st, "bert", &m).unwrap(), "host0");
        // LLMs take the budget with the most room on the usable GPU, never GPU 1.
        let a = place(&mut st, "llm", &m).unwrap();
        let b = place(&mut st, "llm2", &m).unwrap();
        assert!(
            a.starts_with("gpu0") && b.starts_with("gpu0") && a != b,
            "{a} {b}"
        );
        // An embedding model larger than every host device cannot be added at all.
        let e = add(&mut st, "big-bert", Format::BertSafetensors, 2 * GIB).unwrap_err();
        assert!(
            matches!(e, CacheError::TooLarge { largest, .. } if largest == GIB),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_model_only_a_down_gpu_could_hold_fails_with_the_reason() {
        let m = Metrics::new();
        let mut st = pool(&m);
        // Fits GPU 1's budget only (so it is accepted), but GPU 1 is not usable.
        add(&mut st, "huge", Format::Gguf, 8 * GIB).unwrap();
        match place(&mut st, "huge", &m) {
            Err(CacheError::Failed { reason, .. }) => {
                assert!(
                    reason.contains("GPU 1 is not usable (no such GPU)"),
                    "{reason}"
                )
            }
            other => panic!("{:?}", other.map_err(|e| e.to_string())),
        }
        assert!(matches!(
            st.try_pin("huge", Instant::now(), None, Default::default()),
            Pin::Failed(..)
        ));
        assert_eq!(st.devices.iter().map(|d| d.used()).sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn a_failed_gpu_load_marks_the_model_failed_and_frees_its_reservation() {
        let m = Metrics::new();
        let mut st = pool(&m);
        add(&mut st, "llm", Format::Gguf, GIB).unwrap();
        let load = st
            .start_load("llm", Instant::now(), &m, &Advice::BuiltIn)
            .unwrap()
            .unwrap();
        let dev = load.device.clone();
        assert!(matches!(dev.kind(), DeviceKind::Cuda { ordinal: 0 }));
        assert_eq!(dev.used(), GIB);
        let oom = RuntimeError::Inference("CUDA driver: out of memory".into());
        st.finish_load(load, Err(oom), Instant::now(), 0.1, &m);
        assert_eq!(dev.used(), 0);
        match st.try_pin("llm", Instant::now(), None, Default::default()) {
            Pin::Failed(reason, _) => assert!(reason.contains("out of memory"), "{reason}"),
            _ => panic!("the model is not marked failed"),
        }
    }
}
