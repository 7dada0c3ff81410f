//! The `[mesh]` table: how this agent joins other agents through etcd.

use serde::{Deserialize, Serialize};

use crate::units::Secs;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// etcd endpoints (`http://host:2379`).
    pub etcd: Vec<String>,
    /// This node's name in the mesh (default: the host name).
    #[serde(default = "default_node")]
    pub node: String,
    /// The URL peers reach this node's HTTP front door at (default: the bound HTTP address).
    #[serde(default)]
    pub advertise: Option<String>,
    /// The URL peers reach this node's gRPC front door at (default: the bound gRPC address).
    #[serde(default)]
    pub advertise_grpc: Option<String>,
    /// Key prefix of this mesh in etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The node's record lives under an etcd lease of this TTL: a node that dies leaves
    /// routing within it.
    #[serde(default = "default_ttl")]
    pub lease_ttl: Secs,
}

fn default_node() -> String {
    host_name()
}

/// This machine's host name ("node" when it has none).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

fn default_prefix() -> String {
    "/flatmesh".into()
}

fn default_ttl() -> Secs {
    Secs(std::time::Duration::from_secs(10))
}

impl MeshConfig {
    /// A mesh through `etcd` with every other setting at its default.
    pub fn new(etcd: Vec<String>) -> Self {
        MeshConfig {
            etcd,
            node: default_node(),
            advertise: None,
            advertise_grpc: None,
            prefix: default_prefix(),
            lease_ttl: default_ttl(),
        }
    }

    /// Errors start with the field name.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.etcd.is_empty() {
            anyhow::bail!("mesh.etcd: at least one endpoint is needed");
        }
        crate::ids::check_id("mesh.node", &self.node)
            .map_err(|e| anyhow::anyhow!("mesh.node: {e}"))?;
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            anyhow::bail!("mesh.prefix: must start with '/' and not end with one");
        }
        let ttl = self.lease_ttl.0.as_secs();
        if !(1..=300).contains(&ttl) {
            anyhow::bail!("mesh.lease_ttl: {ttl}s is not in [1s, 300s]");
        }
        Ok(())
    }
}
