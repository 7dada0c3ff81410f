//! The cache's configuration: the node's devices, how copies come and go, and the models.

use std::{collections::HashSet, path::Path, path::PathBuf};

use flatmesh_runtime::Format;
use serde::{Deserialize, Serialize};

use super::residency::Residency;

use crate::units::{Bytes, KeepAlive, Secs};

/// Most copies one model may have on a node.
pub const MAX_COPIES: usize = 64;

/// One model the agent serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use (`model` in requests).
    pub id: String,
    /// A GGUF file or a model directory; relative paths are under `models_dir`.
    pub path: PathBuf,
    /// Detected from the path when absent.
    #[serde(default)]
    pub format: Option<Format>,
    /// Requests one copy runs at once (an LLM copy batches them into each step); more wait
    /// their turn in the fair queue.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Positions of KV cache one LLM copy holds for all its sequences together, in blocks
    /// taken as sequences grow (default 8192). Counted in the copy's bytes; one sequence
    /// can use at most this many (its context is the smaller of this and the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_tokens: Option<usize>,
    /// Keep the full KV blocks of prompts for later prompts that start with the same tokens
    /// (a shared system prompt, a chat's history): those are not computed again. The blocks
    /// stay in the copy's KV pool (its bytes do not change) until a sequence needs the room.
    #[serde(default = "yes")]
    pub prefix_cache: bool,
    /// How long a copy stays loaded when idle (default `cache.keep_alive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<KeepAlive>,
    /// Loaded at start and never evicted.
    #[serde(default)]
    pub pinned: bool,
    /// Most copies of the model on this node, each on its own device. The first loads on
    /// demand; another is added while every ready copy is busy (`max_concurrency` leases)
    /// and a device without a copy has room for it without evicting anything.
    #[serde(default = "one")]
    pub copies: usize,
}

/// The model cache: the node's devices and how copies come and go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// The node's pool. Default: one host-memory device with half of the machine's memory (or
    /// of the container's memory limit, when it has a smaller one).
    pub devices: Vec<DeviceConfig>,
    /// Loads that run at once (loads of one model are always shared).
    pub max_parallel_loads: usize,
    /// How long an idle copy stays loaded: `5m`, `0` (unload after use), `-1` (forever).
    pub keep_alive: KeepAlive,
    /// A copy is not evicted sooner than this after its load (stops thrash).
    pub min_residency: Secs,
    /// How long a request waits for room when memory is full of leased copies; then 503.
    pub pressure_wait: Secs,
    /// Load every model at start (cold models otherwise load on first use).
    pub preload: bool,
    /// Host RAM for the warm tier: prepared weights of recently loaded GGUF models, so a page-in
    /// after an eviction copies from memory instead of reading and converting the file again
    /// (`0` turns it off). Counted apart from the devices.
    pub warm_capacity: Bytes,
    /// Which idle copies leave first when room is needed: `demand` (recent requests × reload
    /// seconds per byte; the default) or `lru`.
    pub residency: Residency,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    /// Only `host` (host memory) runs engines today.
    #[serde(default = "default_device_kind")]
    pub kind: String,
    /// Bytes this device may hold: a number or `512MiB`, `2GiB`.
    pub capacity: Bytes,
}

fn default_device_kind() -> String {
    "host".into()
}

fn one() -> usize {
    1
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            devices: Vec::new(),
            max_parallel_loads: 2,
            keep_alive: KeepAlive::For(std::time::Duration::from_secs(300)),
            min_residency: Secs(std::time::Duration::from_secs(1)),
            pressure_wait: Secs(std::time::Duration::from_secs(30)),
            preload: true,
            warm_capacity: Bytes(1 << 30),
            residency: Residency::default(),
        }
    }
}

impl CacheConfig {
    /// Fill in the default device and check what serde cannot. Errors name the field.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if self.devices.is_empty() {
            self.devices.push(DeviceConfig {
                name: "host0".into(),
                kind: default_device_kind(),
                capacity: Bytes(default_host_capacity()),
            });
        }
        let mut names = HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if d.kind != "host" {
                anyhow::bail!(
                    "cache.devices[{i}].kind: {:?} is not supported (only \"host\")",
                    d.kind
                );
            }
            if !names.insert(d.name.clone()) {
                anyhow::bail!("cache.devices[{i}].name: {:?} is declared twice", d.name);
            }
        }
        if self.max_parallel_loads == 0 {
            anyhow::bail!("cache.max_parallel_loads: must be at least 1");
        }
        Ok(())
    }
}

/// Half of the memory this process may use: the machine's (`/proc/meminfo`), or its cgroup's
/// limit when that is smaller (in a container the machine's memory is not the pod's); 4 GiB
/// where neither can be read.
fn default_host_capacity() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    // cgroup v2, then v1; "max" (or a huge v1 number) means no limit.
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok());
    match (machine, limit) {
        (Some(m), Some(l)) => m.min(l) / 2,
        (Some(m), None) => m / 2,
        (None, Some(l)) => l / 2,
        (None, None) => 4 << 30,
    }
}

/// The most requests one model may run at once.
pub const MAX_CONCURRENCY: usize = 1024;

fn yes() -> bool {
    true
}

pub fn default_max_concurrency() -> usize {
    16
}

/// Bounds of `kv_cache_tokens`: one block, and 4 Mi positions.
pub const KV_CACHE_TOKENS: std::ops::RangeInclusive<usize> = 16..=1 << 22;

impl ModelConfig {
    /// A model with the default settings.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>, format: Option<Format>) -> Self {
        ModelConfig {
            id: id.into(),
            path: path.into(),
            format,
            max_concurrency: default_max_concurrency(),
            kv_cache_tokens: None,
            prefix_cache: true,
            keep_alive: None,
            pinned: false,
            copies: 1,
        }
    }

    /// How an LLM copy of this model batches.
    pub fn batch(&self) -> flatmesh_runtime::BatchConfig {
        let default = flatmesh_runtime::BatchConfig::default();
        flatmesh_runtime::BatchConfig {
            kv_tokens: self.kv_cache_tokens.unwrap_or(default.kv_tokens),
            prefix_cache: self.prefix_cache,
            ..default
        }
    }

    /// Resolve the path against `models_dir` and detect the format. Errors start with the
    /// field name.
    pub fn finish(&mut self, models_dir: &Path) -> Result<(), String> {
        crate::ids::check_id("model id", &self.id).map_err(|e| format!("id: {e}"))?;
        if !(1..=MAX_CONCURRENCY).contains(&self.max_concurrency) {
            return Err(format!(
                "max_concurrency: {} is not in [1, {MAX_CONCURRENCY}]",
                self.max_concurrency
            ));
        }
        if let Some(n) = self
            .kv_cache_tokens
            .filter(|n| !KV_CACHE_TOKENS.contains(n))
        {
            return Err(format!(
                "kv_cache_tokens: {n} is not in [{}, {}]",
                KV_CACHE_TOKENS.start(),
                KV_CACHE_TOKENS.end()
            ));
        }
        if !(1..=MAX_COPIES).contains(&self.copies) {
            return Err(format!("copies: must be between 1 and {MAX_COPIES}"));
        }
        if self.path.is_relative() {
            self.path = models_dir.join(&self.path);
        }
        if self.format.is_none() {
            self.format = Format::detect(&self.path);
            if self.format.is_none() {
                return Err(format!(
                    "format: cannot tell the format of {} (set format = \"gguf\" or \"bert-safetensors\")",
                    self.path.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_default_to_one_and_are_bounded() {
        let m: ModelConfig = toml::from_str("id = 'a'\npath = '/m/a.gguf'\n").unwrap();
        assert_eq!(m.copies, 1);
        let mut m: ModelConfig =
            toml::from_str("id = 'a'\npath = '/m/a.gguf'\ncopies = 0\n").unwrap();
        assert!(m.finish(Path::new("/m")).unwrap_err().starts_with("copies"));
        m.copies = 2;
        m.finish(Path::new("/m")).unwrap();
    }

    #[test]
    fn devices_default_to_host_memory_and_other_kinds_are_refused() {
        let mut c = CacheConfig::default();
        c.finish().unwrap();
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].kind, "host");
        c.devices.push(DeviceConfig {
            name: "gpu0".into(),
            kind: "cuda".into(),
            capacity: Bytes(1),
        });
        assert!(c
            .finish()
            .unwrap_err()
            .to_string()
            .starts_with("cache.devices[1].kind"));
    }
}
