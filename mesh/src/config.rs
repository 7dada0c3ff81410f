//! Agent configuration: one typed TOML file, overridden by CLI flags and `FLATMESH_*` env.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use flatmesh_runtime::Format;
use serde::{Deserialize, Serialize};

/// The whole configuration. Every field has a default, so an empty file (or none) serves
/// the demo models from `models_dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    /// Where relative model paths are looked up (and where `deploy/fetch-models` puts the
    /// demo models).
    pub models_dir: PathBuf,
    /// The models this agent serves. When empty, the two demo models.
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP API (OpenAI `/v1`, health, metrics). Port 0 picks a free port.
    pub http_addr: String,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// After SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_grace_seconds: u64,
    /// Write the bound addresses here as JSON once listening (for scripts and tests).
    pub addr_file: Option<PathBuf>,
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
    /// Requests this model runs at once; more wait their turn.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
}

fn default_max_concurrency() -> usize {
    4
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_addr: "127.0.0.1:8000".into(),
            max_body_bytes: 4 << 20,
            shutdown_grace_seconds: 30,
            addr_file: None,
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
            models_dir: PathBuf::from("models"),
            models: Vec::new(),
        }
    }
}

/// The demo models that `deploy/fetch-models` installs.
pub fn demo_models() -> Vec<ModelConfig> {
    vec![
        ModelConfig {
            id: "smollm2-135m-instruct".into(),
            path: "smollm2-135m-instruct/model.gguf".into(),
            format: Some(Format::Gguf),
            max_concurrency: default_max_concurrency(),
        },
        ModelConfig {
            id: "all-minilm-l6-v2".into(),
            path: "all-minilm-l6-v2".into(),
            format: Some(Format::BertSafetensors),
            max_concurrency: default_max_concurrency(),
        },
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
        if self.server.max_body_bytes == 0 {
            anyhow::bail!("server.max_body_bytes: must be greater than 0");
        }
        let mut seen = HashSet::new();
        for (i, m) in self.models.iter_mut().enumerate() {
            if m.id.is_empty() || m.id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                anyhow::bail!(
                    "models[{i}].id: {:?} must be non-empty without spaces",
                    m.id
                );
            }
            if !seen.insert(m.id.clone()) {
                anyhow::bail!("models[{i}].id: {:?} is declared twice", m.id);
            }
            if m.max_concurrency == 0 {
                anyhow::bail!("models[{i}].max_concurrency: must be at least 1");
            }
            if m.path.is_relative() {
                m.path = self.models_dir.join(&m.path);
            }
            if m.format.is_none() {
                m.format = Format::detect(&m.path);
                if m.format.is_none() {
                    anyhow::bail!(
                        "models[{i}].format: cannot tell the format of {} (set format = \"gguf\" \
                         or \"bert-safetensors\")",
                        m.path.display()
                    );
                }
            }
        }
        Ok(self)
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
    fn format_is_detected_from_the_path() {
        let c = Config::from_toml("models_dir = '/m'\n[[models]]\nid='a'\npath='x.gguf'\n")
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(c.models[0].format, Some(Format::Gguf));
        assert_eq!(c.models[0].path, Path::new("/m/x.gguf"));
    }
}
