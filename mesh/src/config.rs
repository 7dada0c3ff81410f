//! Agent configuration: one typed TOML file, overridden by CLI flags and `FLATMESH_*` env.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use flatmesh_runtime::Format;
use serde::{Deserialize, Serialize};

pub use crate::cache::config::{CacheConfig, DeviceConfig, ModelConfig};
use crate::units::{Bytes, Secs};

/// The whole configuration. Every field has a default, so an empty file (or none) serves
/// the demo models from `models_dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub cache: CacheConfig,
    pub tenancy: crate::tenancy::TenancyConfig,
    pub scheduler: SchedulerConfig,
    /// Policy plugins (WebAssembly components) for the router, cache and pricing slots.
    pub policy: crate::policy::PolicyConfig,
    /// Where the agent keeps state that must survive a restart (models and vmodels
    /// registered through the admin API). Relative to the working directory.
    pub state_dir: PathBuf,
    /// Where relative model paths are looked up (and where `deploy/fetch-models` puts the
    /// demo models).
    pub models_dir: PathBuf,
    /// The models this agent serves. When empty, the two demo models.
    pub models: Vec<ModelConfig>,
    /// Join other agents through etcd; absent, the agent is a single node.
    pub mesh: Option<crate::cluster::MeshConfig>,
    /// Traces over OTLP (off unless `otlp_endpoint` is set).
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The shared ledger in PostgreSQL (off unless `postgres` is set).
    pub ledger: crate::ledger::LedgerConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP API (OpenAI `/v1`, health, metrics). Port 0 picks a free port.
    pub http_addr: String,
    /// Address of the gRPC API (KServe v2 `inference.GRPCInferenceService`).
    pub grpc_addr: String,
    /// Largest gRPC message in either direction; larger ones get RESOURCE_EXHAUSTED.
    pub grpc_max_message_bytes: usize,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// After SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_grace_seconds: u64,
    /// Write the bound addresses here as JSON once listening (for scripts and tests).
    pub addr_file: Option<PathBuf>,
    /// Bearer token the admin API requires (`FLATMESH_ADMIN_TOKEN`). Unset: the admin API is
    /// open to whoever reaches the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Bearer token `/metrics` requires (`FLATMESH_METRICS_TOKEN`). Unset: scrapeable by
    /// whoever reaches the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<String>,
    /// Directories, besides `models_dir`, that model paths registered through the admin API
    /// may lie in (after resolving symlinks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_roots: Vec<PathBuf>,
    /// Largest model file the admin API registers (each file of a model directory).
    pub max_model_file_bytes: Bytes,
    /// How long a client may take to send a request's headers (also the longest an idle
    /// keep-alive connection stays open); then the connection closes.
    pub header_read_timeout: Secs,
    /// How long a client may take to send a request's body; then 408.
    pub body_read_timeout: Secs,
    /// Connections open at once, on the HTTP and on the gRPC port each; more wait in the
    /// listen queue until one closes.
    pub max_connections: usize,
    /// How long a new gRPC connection may take to send the HTTP/2 preface (its first 24
    /// bytes); then it is closed. Default 5 s.
    pub grpc_handshake_timeout: Secs,
    /// gRPC connections open at once from one client address; more are closed as soon as
    /// they are accepted. Default: a quarter of `max_connections`, at least 1. (Behind a load
    /// balancer that does not keep the client's address, raise it to `max_connections`.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_max_connections_per_peer: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `flatmesh=debug` (`RUST_LOG` wins when set).
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Execution slots shared between tiers by weighted fair queuing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Requests running at once on this node, all tiers and models together (default 32):
    /// an LLM copy batches the ones it holds into each step, so this is a count of sequences,
    /// not of cores.
    pub slots: usize,
    /// Requests a tier may have waiting; more get 429.
    pub max_queue: usize,
    /// How long a request may wait for a slot; then 429.
    pub max_wait: Secs,
    /// How long a request may run once it has its slot; then it is stopped (504).
    pub max_run: Secs,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            slots: 32,
            max_queue: 256,
            max_wait: Secs(std::time::Duration::from_secs(60)),
            max_run: Secs(std::time::Duration::from_secs(600)),
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.max_body_bytes == 0 {
            anyhow::bail!("server.max_body_bytes: must be greater than 0");
        }
        if self.max_model_file_bytes.0 == 0 {
            anyhow::bail!("server.max_model_file_bytes: must be greater than 0");
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            anyhow::bail!(
                "server.max_connections: {} is not in [1, 1000000]",
                self.max_connections
            );
        }
        if let Some(n) = self.grpc_max_connections_per_peer {
            if !(1..=self.max_connections).contains(&n) {
                anyhow::bail!(
                    "server.grpc_max_connections_per_peer: {n} is not in [1, max_connections = {}]",
                    self.max_connections
                );
            }
        }
        for (key, t) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("grpc_handshake_timeout", self.grpc_handshake_timeout),
        ] {
            if t.0.is_zero() {
                anyhow::bail!("server.{key}: must be greater than 0");
            }
        }
        for (key, token) in [
            ("admin_token", &self.admin_token),
            ("metrics_token", &self.metrics_token),
        ] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                anyhow::bail!("server.{key}: must not be empty (leave it unset instead)");
            }
        }
        Ok(())
    }

    /// gRPC connections one client address may hold open at once.
    pub fn grpc_per_peer(&self) -> usize {
        self.grpc_max_connections_per_peer
            .unwrap_or(self.max_connections / 4)
            .max(1)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_addr: "127.0.0.1:8000".into(),
            grpc_addr: "127.0.0.1:8033".into(),
            grpc_max_message_bytes: 16 << 20,
            max_body_bytes: 4 << 20,
            shutdown_grace_seconds: 30,
            addr_file: None,
            admin_token: None,
            metrics_token: None,
            model_roots: Vec::new(),
            max_model_file_bytes: Bytes(64 << 30),
            header_read_timeout: Secs(std::time::Duration::from_secs(30)),
            body_read_timeout: Secs(std::time::Duration::from_secs(60)),
            max_connections: 1024,
            grpc_handshake_timeout: Secs(std::time::Duration::from_secs(5)),
            grpc_max_connections_per_peer: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            log: LogConfig::default(),
            cache: CacheConfig::default(),
            tenancy: Default::default(),
            policy: Default::default(),
            scheduler: SchedulerConfig::default(),
            state_dir: PathBuf::from("state"),
            models_dir: PathBuf::from("models"),
            models: Vec::new(),
            mesh: None,
            telemetry: Default::default(),
            ledger: Default::default(),
        }
    }
}

/// The demo models that `deploy/fetch-models` installs.
pub fn demo_models() -> Vec<ModelConfig> {
    vec![
        ModelConfig::new(
            "smollm2-135m-instruct",
            "smollm2-135m-instruct/model.gguf",
            Some(Format::Gguf),
        ),
        ModelConfig::new(
            "all-minilm-l6-v2",
            "all-minilm-l6-v2",
            Some(Format::BertSafetensors),
        ),
    ]
}

impl Config {
    /// Read a TOML file; errors name the file, the line and the offending key.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Fill in defaults that depend on other fields and check what serde cannot.
    pub fn finish(mut self) -> anyhow::Result<Config> {
        if self.models.is_empty() {
            self.models = demo_models();
        }
        self.http_addr()?;
        self.grpc_addr()?;
        self.tenancy.validate()?;
        self.policy.validate().map_err(anyhow::Error::msg)?;
        if let Some(mesh) = &self.mesh {
            // The nodes prove to each other with `mesh.token` (required there) that a
            // forwarded request or a ledger query comes from the mesh. It opens nothing else:
            // the same value as another token would let a peer in where that one does.
            mesh.validate()?;
            for (key, other) in [
                ("admin_token", &self.server.admin_token),
                ("metrics_token", &self.server.metrics_token),
            ] {
                if other.is_some() && *other == mesh.token {
                    anyhow::bail!("mesh.token: must differ from server.{key}");
                }
            }
        }
        self.telemetry.validate()?;
        self.ledger.validate()?;
        if self.scheduler.slots == 0 {
            anyhow::bail!("scheduler.slots: must be at least 1");
        }
        self.server.validate()?;
        self.cache.finish()?;
        let mut seen = HashSet::new();
        for (i, m) in self.models.iter_mut().enumerate() {
            if !seen.insert(m.id.clone()) {
                anyhow::bail!("models[{i}].id: {:?} is declared twice", m.id);
            }
            m.finish(&self.models_dir)
                .map_err(|e| anyhow::anyhow!("models[{i}].{e}"))?;
        }
        Ok(self)
    }

    pub fn grpc_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .grpc_addr
            .parse()
            .map_err(|e| anyhow::anyhow!("server.grpc_addr: {:?}: {e}", self.server.grpc_addr))
    }

    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .http_addr
            .parse()
            .map_err(|e| anyhow::anyhow!("server.http_addr: {:?}: {e}", self.server.http_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_serves_the_demo_models() {
        let c = Config::from_toml("").unwrap().finish().unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(
            c.models[0].path,
            Path::new("models/smollm2-135m-instruct/model.gguf")
        );
        assert_eq!(c.http_addr().unwrap().port(), 8000);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[server]\nhttp_adr = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http_adr"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[server]\nmax_body_bytes = \"big\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_body_bytes"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |toml: &str| {
            Config::from_toml(toml)
                .unwrap()
                .finish()
                .unwrap_err()
                .to_string()
        };
        assert!(bad("[server]\nhttp_addr = \"nowhere\"").starts_with("server.http_addr"));
        assert!(bad("[server]\nmax_connections = 0").starts_with("server.max_connections"));
        assert!(bad("[server]\nbody_read_timeout = 0").starts_with("server.body_read_timeout"));
        assert!(bad("[server]\nmetrics_token = \"\"").starts_with("server.metrics_token"));
        let e = bad("[server]\ngrpc_handshake_timeout = 0");
        assert!(e.starts_with("server.grpc_handshake_timeout"), "{e}");
        let e = bad("[server]\nmax_connections = 8\ngrpc_max_connections_per_peer = 9");
        assert!(e.starts_with("server.grpc_max_connections_per_peer"), "{e}");
        let twice = "[[models]]\nid='a'\npath='a.gguf'\n[[models]]\nid='a'\npath='b.gguf'\n";
        assert!(bad(twice).starts_with("models[1].id"), "{}", bad(twice));
        let unknown = "[[models]]\nid='a'\npath='/nowhere/a.bin'\n";
        assert!(
            bad(unknown).starts_with("models[0].format"),
            "{}",
            bad(unknown)
        );
    }

    #[test]
    fn the_grpc_share_of_one_address_defaults_to_a_quarter() {
        let server = |toml: &str| Config::from_toml(toml).unwrap().finish().unwrap().server;
        let s = server("");
        assert_eq!(
            (s.grpc_per_peer(), s.grpc_handshake_timeout.0.as_secs()),
            (256, 5)
        );
        assert_eq!(server("[server]\nmax_connections = 2").grpc_per_peer(), 1);
        let s = server("[server]\ngrpc_max_connections_per_peer = 1024");
        assert_eq!(s.grpc_per_peer(), 1024);
    }

    #[test]
    fn a_mesh_needs_a_token_of_its_own() {
        let mesh = |extra: &str| {
            Config::from_toml(&format!(
                "[server]\nadmin_token = 'admin'\n[mesh]\netcd = ['http://e:2379']\nnode = 'n'\n{extra}"
            ))
            .unwrap()
            .finish()
        };
        let e = mesh("").unwrap_err().to_string();
        assert!(
            e.starts_with("mesh.token (FLATMESH_MESH_TOKEN) must be set"),
            "{e}"
        );
        let e = mesh("token = 'admin'").unwrap_err().to_string();
        assert_eq!(e, "mesh.token: must differ from server.admin_token");
        assert!(mesh("token = ' '").is_err());
        let c = mesh("token = 'peers'").unwrap();
        assert_eq!(c.mesh.unwrap().token.as_deref(), Some("peers"));
        // No admin token is needed to form a mesh.
        let open = Config::from_toml("[mesh]\netcd = ['http://e:2379']\nnode = 'n'\ntoken = 't'")
            .unwrap()
            .finish();
        assert!(open.is_ok(), "{:?}", open.err());
    }

    #[test]
    fn format_is_detected_from_the_path() {
        let c = Config::from_toml("models_dir = '/m'\n[[models]]\nid='a'\npath='x.gguf'\n")
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(c.models[0].format, Some(Format::Gguf));
        assert_eq!(c.models[0].path, Path::new("/m/x.gguf"));
    }

    #[test]
    fn model_numbers_and_ids_are_range_checked() {
        let model = |id: &str, fields: &str| {
            let mut m: ModelConfig =
                toml::from_str(&format!("id = '{id}'\npath = 'a.gguf'\n{fields}")).unwrap();
            m.finish(Path::new("/m"))
        };
        let finish = |fields: &str| model("a", fields);
        assert!(finish("max_concurrency = 1024").is_ok());
        for n in ["0", "1025", "17592186044416", "4611686018427387904"] {
            let e = finish(&format!("max_concurrency = {n}")).unwrap_err();
            assert!(e.starts_with("max_concurrency"), "{e}");
        }
        let e = model("../../x", "").unwrap_err();
        assert!(e.starts_with("id"), "{e}");
    }
}
