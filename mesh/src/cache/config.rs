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

/// One device of the node's pool: host memory, or a budget on one CUDA GPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    /// `host` (host memory, computed on by the CPU cores; the default) or `cuda` (a budget on
    /// one GPU; several devices may name the same GPU and share it).
    #[serde(default = "default_device_kind")]
    pub kind: String,
    /// The GPU's ordinal as the driver counts them (`kind = "cuda"` only; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<usize>,
    /// Bytes this device may hold: a number or `512MiB`, `60GiB`; on a `cuda` device also a
    /// fraction of the GPU's total memory as the driver reports it at start (`0.8`).
    pub capacity: Capacity,
}

/// A device's capacity as written: bytes, or a fraction of a GPU's memory (resolved to bytes
/// by `CacheConfig::finish`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    Bytes(u64),
    Fraction(f64),
}

impl Capacity {
    /// The bytes; 0 for a fraction not yet resolved (`CacheConfig::finish` resolves them).
    pub fn bytes(&self) -> u64 {
        match self {
            Capacity::Bytes(n) => *n,
            Capacity::Fraction(_) => 0,
        }
    }
}

impl std::str::FromStr for Capacity {
    type Err = String;
    /// A number with a decimal point and no unit is a fraction (`0.8`); anything else a size.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.contains('.') {
            if let Ok(f) = t.parse::<f64>() {
                return Ok(Capacity::Fraction(f));
            }
        }
        t.parse::<Bytes>().map(|b| Capacity::Bytes(b.0))
    }
}

impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            F(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Capacity::Bytes(n)),
            Raw::F(f) => Ok(Capacity::Fraction(f)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Capacity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Capacity::Bytes(n) => s.serialize_u64(*n),
            Capacity::Fraction(f) => s.serialize_f64(*f),
        }
    }
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
    /// Fill in the default device, resolve GPU fractions through the driver and check what
    /// serde cannot. Errors name the field.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.finish_with(&gpu_total_bytes)
    }

    /// `finish`, asking `total` for a GPU's total bytes (only when a fraction needs it).
    pub fn finish_with(
        &mut self,
        total: &dyn Fn(usize) -> Result<u64, String>,
    ) -> anyhow::Result<()> {
        if self.devices.is_empty() {
            self.devices.push(DeviceConfig {
                name: "host0".into(),
                kind: default_device_kind(),
                gpu: None,
                capacity: Capacity::Bytes(default_host_capacity()),
            });
        }
        let mut names = HashSet::new();
        for (i, d) in self.devices.iter_mut().enumerate() {
            d.finish(i, total)?;
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

impl DeviceConfig {
    /// Check the kind, GPU and capacity of `cache.devices[i]`; resolve a fraction to bytes.
    fn finish(
        &mut self,
        i: usize,
        total: &dyn Fn(usize) -> Result<u64, String>,
    ) -> anyhow::Result<()> {
        match self.kind.as_str() {
            "host" => {
                if let Some(g) = self.gpu {
                    anyhow::bail!("cache.devices[{i}].gpu: {g} is set on a host device (only kind = \"cuda\" names a GPU)");
                }
                if let Capacity::Fraction(f) = self.capacity {
                    anyhow::bail!("cache.devices[{i}].capacity: {f} is a fraction, which only a cuda device takes (of its GPU's memory); give bytes, e.g. \"8GiB\"");
                }
            }
            "cuda" => {
                let gpu = *self.gpu.get_or_insert(0);
                if let Capacity::Fraction(f) = self.capacity {
                    if !(f > 0.0 && f <= 1.0) {
                        anyhow::bail!("cache.devices[{i}].capacity: {f} is not a fraction in (0, 1] of the GPU's memory");
                    }
                    let bytes = total(gpu).map_err(|e| anyhow::anyhow!(
                        "cache.devices[{i}].capacity: {f} of GPU {gpu}'s memory needs the driver's count, which is not there ({e}); give bytes, e.g. \"60GiB\""
                    ))?;
                    self.capacity = Capacity::Bytes((bytes as f64 * f) as u64);
                }
            }
            other => anyhow::bail!(
                "cache.devices[{i}].kind: {other:?} is not supported (\"host\" or \"cuda\")"
            ),
        }
        Ok(())
    }
}

/// GPU `ordinal`'s total bytes as the CUDA driver reports them, or why not.
fn gpu_total_bytes(ordinal: usize) -> Result<u64, String> {
    gpu_memory(ordinal).map(|(_, total)| total)
}

/// The driver's (free, total) bytes of GPU `ordinal`, or why not; a panic of the driver
/// bindings (a library that lacks a symbol) is a reason too, never the end of the process.
pub fn gpu_memory(ordinal: usize) -> Result<(u64, u64), String> {
    std::panic::catch_unwind(|| flatmesh_runtime::cuda::gpu::mem_info(ordinal))
        .map_err(|_| "the CUDA driver bindings failed (see the panic above)".to_string())?
        .map_err(|e| e.to_string())
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
    fn devices_default_to_host_memory_and_unknown_kinds_are_refused() {
        let mut c = CacheConfig::default();
        c.finish().unwrap();
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].kind, "host");
        c.devices.push(DeviceConfig {
            name: "tpu0".into(),
            kind: "tpu".into(),
            gpu: None,
            capacity: Capacity::Bytes(1),
        });
        let e = c.finish().unwrap_err().to_string();
        assert!(e.starts_with("cache.devices[1].kind: \"tpu\""), "{e}");
    }

    fn devices(toml: &str, total: Result<u64, String>) -> anyhow::Result<Vec<DeviceConfig>> {
        let mut c: CacheConfig = toml::from_str(toml).unwrap();
        c.finish_with(&|_| total.clone())?;
        Ok(c.devices)
    }

    #[test]
    fn cuda_devices_take_bytes_or_a_fraction_of_the_gpu() {
        let d = devices(
            "[[devices]]\nname = 'h'\ncapacity = '1GiB'\n\
             [[devices]]\nname = 'g0'\nkind = 'cuda'\ncapacity = '60GiB'\n\
             [[devices]]\nname = 'g1a'\nkind = 'cuda'\ngpu = 1\ncapacity = '0.25'\n\
             [[devices]]\nname = 'g1b'\nkind = 'cuda'\ngpu = 1\ncapacity = 0.5\n",
            Ok(80 << 30),
        )
        .unwrap();
        let got: Vec<_> = d
            .iter()
            .map(|d| (d.kind.as_str(), d.gpu, d.capacity))
            .collect();
        assert_eq!(
            got,
            [
                ("host", None, Capacity::Bytes(1 << 30)),
                ("cuda", Some(0), Capacity::Bytes(60 << 30)),
                ("cuda", Some(1), Capacity::Bytes(20 << 30)),
                ("cuda", Some(1), Capacity::Bytes(40 << 30)),
            ]
        );
        // Bytes need no driver.
        let d = devices(
            "[[devices]]\nname = 'g'\nkind = 'cuda'\ncapacity = 1024\n",
            Err("no driver".into()),
        );
        assert_eq!(d.unwrap()[0].capacity, Capacity::Bytes(1024));
    }

    #[test]
    fn bad_gpu_devices_are_refused_naming_the_field() {
        let err =
            |toml: &str, total: Result<u64, String>| devices(toml, total).unwrap_err().to_string();
        let e = err(
            "[[devices]]\nname = 'g'\nkind = 'cuda'\ncapacity = '0.8'\n",
            Err("no CUDA driver library".into()),
        );
        assert!(
            e.starts_with("cache.devices[0].capacity: 0.8 of GPU 0"),
            "{e}"
        );
        assert!(e.contains("no CUDA driver library"), "{e}");
        for bad in ["'0.0'", "1.5", "'-0.5'"] {
            let e = err(
                &format!("[[devices]]\nname = 'g'\nkind = 'cuda'\ncapacity = {bad}\n"),
                Ok(1 << 30),
            );
            assert!(
                e.starts_with("cache.devices[0].capacity") && e.contains("(0, 1]"),
                "{bad}: {e}"
            );
        }
        let e = err("[[devices]]\nname = 'h'\ncapacity = '0.5'\n", Ok(1 << 30));
        assert!(
            e.starts_with("cache.devices[0].capacity: 0.5 is a fraction"),
            "{e}"
        );
        let e = err(
            "[[devices]]\nname = 'h'\ngpu = 0\ncapacity = '1GiB'\n",
            Ok(1 << 30),
        );
        assert!(e.starts_with("cache.devices[0].gpu"), "{e}");
        let e = err(
            "[[devices]]\nname = 'g'\nkind = 'cuda'\ncapacity = '1GiB'\n[[devices]]\nname = 'g'\nkind = 'cuda'\ncapacity = '1GiB'\n",
            Ok(1 << 30),
        );
        assert!(e.starts_with("cache.devices[1].name"), "{e}");
    }
}
