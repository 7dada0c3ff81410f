//! `[policy]` in the agent's config: the limits shared by the slots and one table per slot.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::name::SlotName;
use crate::units::Bytes;

/// `[policy]`: limits shared by the slots and one table per slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Guest CPU time one plugin call may take, in milliseconds (time the host spends
    /// computing an embedding for the plugin is not counted).
    pub deadline_ms: f64,
    /// Linear memory of one plugin instance, in MiB.
    pub memory_mib: u64,
    /// Initialised instances kept ready per slot.
    pub instances: usize,
    /// How long one call may wait in the host besides its CPU budget (an embedding model
    /// paging in), in milliseconds. A call blocked longer ends as a timeout.
    pub host_wait_ms: u64,
    /// Bytes each plugin may keep in its key-value store.
    pub kv_bytes: usize,
    /// Reload a plugin when its file changes (checked every second).
    pub watch: bool,
    /// Largest plugin file the agent reads (`64MiB`); only regular files are read.
    pub max_plugin_bytes: Bytes,
    /// Directories a plugin named in a reload through the admin API must lie in. Empty: the
    /// directories of the plugins named in this section.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugin_roots: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router: Option<SlotConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<SlotConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<SlotConfig>,
    /// Which idle copies leave first when room is needed (the cache's built-in policy
    /// without it, and on a failure unless `on_failure = "closed"`: then nothing is evicted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residency: Option<SlotConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            deadline_ms: 5.0,
            memory_mib: 32,
            instances: 4,
            host_wait_ms: 30_000,
            kv_bytes: 1 << 20,
            watch: true,
            max_plugin_bytes: Bytes(64 << 20),
            plugin_roots: Vec::new(),
            router: None,
            cache: None,
            pricing: None,
            residency: None,
        }
    }
}

/// One slot's plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// The component (`.wasm`), relative to the working directory.
    pub plugin: PathBuf,
    /// Given to the plugin's `init`: a string as it is, anything else as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// What a failing plugin means for the request.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Overrides `policy.deadline_ms` for this slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<f64>,
    /// Router only: where the built-in policy sends a request for a name that is neither a
    /// registered model nor a vmodel (an alias only the plugin knows) when the plugin fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_target: Option<String>,
}

impl SlotConfig {
    pub fn config_string(&self) -> String {
        match &self.config {
            None => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Skip the policy: the request goes on as if the slot were empty.
    Open,
    /// Refuse the request: 503 with the reason.
    Closed,
    /// Run the built-in policy.
    #[default]
    Default,
}

impl OnFailure {
    pub fn label(self) -> &'static str {
        match self {
            OnFailure::Open => "open",
            OnFailure::Closed => "closed",
            OnFailure::Default => "default",
        }
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Result<(), String> {
        let ok = |ms: f64| ms.is_finite() && ms > 0.0 && ms <= 10_000.0;
        if !ok(self.deadline_ms) {
            return Err(format!(
                "policy.deadline_ms: {} is not in (0, 10000]",
                self.deadline_ms
            ));
        }
        if self.instances > 64 {
            return Err(format!(
                "policy.instances: {} is more than 64 (the calls a slot runs at once)",
                self.instances
            ));
        }
        if !(1..=4096).contains(&self.memory_mib) {
            return Err(format!(
                "policy.memory_mib: {} is not in [1, 4096]",
                self.memory_mib
            ));
        }
        if self.max_plugin_bytes.0 == 0 {
            return Err("policy.max_plugin_bytes: must be greater than 0".into());
        }
        for (name, slot) in self.slots() {
            if let Some(ms) = slot.deadline_ms.filter(|ms| !ok(*ms)) {
                return Err(format!(
                    "policy.{name}.deadline_ms: {ms} is not in (0, 10000]"
                ));
            }
            if slot.default_target.is_some() && name != SlotName::Router {
                return Err(format!(
                    "policy.{name}.default_target: only the router slot has one"
                ));
            }
        }
        Ok(())
    }

    /// Where plugins named through the admin API may come from: `plugin_roots`, or else the
    /// directories of the configured plugins.
    pub fn roots(&self) -> Vec<PathBuf> {
        if !self.plugin_roots.is_empty() {
            return self.plugin_roots.clone();
        }
        let mut roots: Vec<PathBuf> = self
            .slots()
            .filter_map(|(_, s)| s.plugin.parent().map(|p| p.to_path_buf()))
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p
                }
            })
            .collect();
        roots.dedup();
        roots
    }

    /// The table of a slot, if it has one.
    pub fn slot(&self, name: SlotName) -> Option<&SlotConfig> {
        match name {
            SlotName::Router => self.router.as_ref(),
            SlotName::Cache => self.cache.as_ref(),
            SlotName::Pricing => self.pricing.as_ref(),
            SlotName::Residency => self.residency.as_ref(),
        }
    }

    /// The slots with a table, in order.
    pub fn slots(&self) -> impl Iterator<Item = (SlotName, &SlotConfig)> {
        SlotName::ALL
            .into_iter()
            .filter_map(|n| self.slot(n).map(|s| (n, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> PolicyConfig {
        toml::from_str(toml).expect("valid policy TOML")
    }

    #[test]
    fn slot_config_reaches_the_plugin_as_json_or_as_written() {
        let c = parse(
            "[router]\nplugin = \"r.wasm\"\nconfig = { alias = \"auto\", models = [\"a\"] }\n\
             [cache]\nplugin = \"c.wasm\"\nconfig = \"raw text\"\n[pricing]\nplugin = \"p.wasm\"\n",
        );
        let router = c.router.as_ref().unwrap();
        assert_eq!(router.config_string(), r#"{"alias":"auto","models":["a"]}"#);
        assert_eq!(router.on_failure, OnFailure::Default);
        assert!(c.validate().is_ok());
        assert_eq!(c.cache.unwrap().config_string(), "raw text");
        assert_eq!(c.pricing.unwrap().config_string(), "");
    }

    #[test]
    fn bad_settings_are_named() {
        let e = parse("deadline_ms = 0").validate().unwrap_err();
        assert!(e.starts_with("policy.deadline_ms"), "{e}");
        let e = parse("memory_mib = 0").validate().unwrap_err();
        assert!(e.starts_with("policy.memory_mib"), "{e}");
        let e = parse("[cache]\nplugin = \"c.wasm\"\ndefault_target = \"m\"")
            .validate()
            .unwrap_err();
        assert!(e.starts_with("policy.cache.default_target"), "{e}");
        assert!(
            toml::from_str::<PolicyConfig>("[router]\nplugin = \"r\"\non_failure = \"maybe\"")
                .is_err()
        );
        let e = parse("max_plugin_bytes = 0").validate().unwrap_err();
        assert!(e.starts_with("policy.max_plugin_bytes"), "{e}");
    }

    #[test]
    fn plugin_roots_default_to_the_configured_plugins_directories() {
        let c = parse("[router]\nplugin = \"/p/r.wasm\"\n[cache]\nplugin = \"c.wasm\"\n");
        assert_eq!(c.roots(), [PathBuf::from("/p"), PathBuf::from(".")]);
        assert_eq!(parse("").roots(), Vec::<PathBuf>::new());
        let c = parse("plugin_roots = [\"/x\"]\n[router]\nplugin = \"/p/r.wasm\"\n");
        assert_eq!(c.roots(), [PathBuf::from("/x")]);
        assert_eq!(
            parse("max_plugin_bytes = \"1MiB\"").max_plugin_bytes.0,
            1 << 20
        );
    }
}
