//! The `[mesh]` table: how this agent joins other agents through etcd.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::Secs;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// etcd endpoints (`http://host:2379`; `https://` with `etcd_tls`).
    pub etcd: Vec<String>,
    /// TLS to etcd: the CA that signed its certificate, and this node's client certificate.
    #[serde(default)]
    pub etcd_tls: Option<EtcdTls>,
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
    /// The token the nodes of the mesh prove themselves to each other with
    /// (`FLATMESH_MESH_TOKEN`), the same on every node: it opens only the internal endpoints
    /// (forwarded requests, ledger queries), never `/admin`, and must differ from
    /// `server.admin_token`. Required in a mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The node pool this node belongs to (`onprem`, `rented`, `spot`): tiers may be held to
    /// pools (`pools` in a `[[tenancy.tiers]]` entry).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Labels of this node (`{region = "dk", kind = "spot"}`): tiers may require some.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What a copy here costs relative to other nodes: a load goes to the cheapest node with
    /// room, then overflows to dearer ones, and requests prefer the cheapest copy that is not
    /// queueing (reserved machines first, spot after).
    #[serde(default = "default_cost")]
    pub cost: f64,
    /// On SIGTERM, how long the node may take to drain before it stops (a spot instance's
    /// notice): it takes no new work, and waits until nothing runs here and its pinned models
    /// are ready on other nodes, or this long. `0s` (the default): it stops taking new work
    /// and stops, finishing what runs within `server.shutdown_grace_seconds`.
    #[serde(default)]
    pub drain_notice: Secs,
}

/// `[mesh.etcd_tls]`: the files are read again at every connection, so a renewed
/// certificate is used from the next one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// The CA certificate (PEM) etcd's certificate must be signed by.
    pub ca: PathBuf,
    /// This node's client certificate (PEM), for an etcd started with `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name etcd's certificate is checked against (default: the endpoint's host).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl EtcdTls {
    /// The TLS settings of a connection, from the files as they are now.
    pub fn options(&self) -> anyhow::Result<etcd_client::TlsOptions> {
        // A file that is not the PEM it should be (a key where the certificate goes) is named
        // here; a TLS handshake would only say "transport error".
        let read = |what: &str, p: &PathBuf, marker: &str| {
            let pem = std::fs::read(p)
                .map_err(|e| anyhow::anyhow!("mesh.etcd_tls.{what}: {}: {e}", p.display()))?;
            let text = String::from_utf8_lossy(&pem);
            if !text.contains("-----BEGIN ") || !text.contains(marker) {
                anyhow::bail!(
                    "mesh.etcd_tls.{what}: {}: no PEM {marker} in it",
                    p.display()
                );
            }
            Ok::<_, anyhow::Error>(pem)
        };
        let ca = read("ca", &self.ca, "CERTIFICATE-----")?;
        let mut tls =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("cert", cert, "CERTIFICATE-----")?,
                read("key", key, "PRIVATE KEY-----")?,
            ));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
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

/// The pool of a node that names none.
pub fn default_pool() -> String {
    "default".into()
}

pub fn default_cost() -> f64 {
    1.0
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
            etcd_tls: None,
            node: default_node(),
            advertise: None,
            advertise_grpc: None,
            prefix: default_prefix(),
            lease_ttl: default_ttl(),
            token: None,
            pool: default_pool(),
            labels: BTreeMap::new(),
            cost: default_cost(),
            drain_notice: Secs::default(),
        }
    }

    /// Errors start with the field name.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.etcd.is_empty() {
            anyhow::bail!("mesh.etcd: at least one endpoint is needed");
        }
        for e in &self.etcd {
            match (e.starts_with("https://"), &self.etcd_tls) {
                (true, None) => {
                    anyhow::bail!("mesh.etcd: {e} is https: set mesh.etcd_tls (at least its ca)")
                }
                (false, Some(_)) => anyhow::bail!(
                    "mesh.etcd: {e} is not https, but mesh.etcd_tls is set: use https:// endpoints"
                ),
                _ => {}
            }
        }
        if let Some(tls) = &self.etcd_tls {
            if tls.cert.is_some() != tls.key.is_some() {
                anyhow::bail!("mesh.etcd_tls: cert and key go together");
            }
            tls.options()?; // every file there and readable now
        }
        crate::ids::check_id("mesh.node", &self.node)
            .map_err(|e| anyhow::anyhow!("mesh.node: {e}"))?;
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            anyhow::bail!("mesh.prefix: must start with '/' and not end with one");
        }
        crate::ids::check_id("mesh.pool", &self.pool)
            .map_err(|e| anyhow::anyhow!("mesh.pool: {e}"))?;
        for (k, v) in &self.labels {
            crate::ids::check_id("label", k)
                .and_then(|()| crate::ids::check_id("label value", v))
                .map_err(|e| anyhow::anyhow!("mesh.labels: {e}"))?;
        }
        if !self.cost.is_finite() || self.cost < 0.0 {
            anyhow::bail!("mesh.cost: {} is not a finite number ≥ 0", self.cost);
        }
        let ttl = self.lease_ttl.0.as_secs();
        if !(1..=300).contains(&ttl) {
            anyhow::bail!("mesh.lease_ttl: {ttl}s is not in [1s, 300s]");
        }
        match self.token.as_deref().map(str::trim) {
            None => anyhow::bail!(
                "mesh.token (FLATMESH_MESH_TOKEN) must be set, the same on every node of the \
                 mesh: the nodes prove with it that a forwarded request or a ledger query comes \
                 from the mesh (server.admin_token is no longer used for that, and is not needed \
                 to form a mesh)"
            ),
            Some("") => anyhow::bail!("mesh.token: must not be empty"),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(etcd: &str, tls: Option<EtcdTls>) -> anyhow::Result<()> {
        let mut c = MeshConfig::new(vec![etcd.into()]);
        c.node = "n".into();
        c.token = Some("mesh-secret".into());
        c.etcd_tls = tls;
        c.validate()
    }

    #[test]
    fn pool_labels_and_cost_are_checked() {
        let check = |f: &dyn Fn(&mut MeshConfig)| {
            let mut c = MeshConfig::new(vec!["http://e:2379".into()]);
            c.node = "n".into();
            c.token = Some("mesh-secret".into());
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        assert!(check(&|_| {}).is_ok());
        let e = check(&|c| c.pool = "on/prem".into()).unwrap_err();
        assert!(e.starts_with("mesh.pool:"), "{e}");
        let e = check(&|c| {
            c.labels.insert("region".into(), "".into());
        })
        .unwrap_err();
        assert!(e.starts_with("mesh.labels:"), "{e}");
        for cost in [-1.0, f64::NAN, f64::INFINITY] {
            let e = check(&|c| c.cost = cost).unwrap_err();
            assert!(e.starts_with("mesh.cost:"), "{e}");
        }
        let c: MeshConfig = toml::from_str(
            "etcd = ['http://e:2379']\npool = 'spot'\ncost = 0.4\ndrain_notice = '30s'\n\
             labels = { region = 'dk', kind = 'spot' }\n",
        )
        .unwrap();
        assert_eq!((c.pool.as_str(), c.cost, c.labels.len()), ("spot", 0.4, 2));
        assert_eq!(c.drain_notice.0, std::time::Duration::from_secs(30));
    }

    #[test]
    fn https_and_tls_settings_go_together() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let key = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(key.path(), "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let tls = |cert: Option<&std::path::Path>, key: Option<&std::path::Path>| EtcdTls {
            ca: ca.path().into(),
            cert: cert.map(Into::into),
            key: key.map(Into::into),
            server_name: None,
        };
        assert!(with("http://e:2379", None).is_ok());
        assert!(with("https://e:2379", Some(tls(None, None))).is_ok());
        let e = with("https://e:2379", None).unwrap_err().to_string();
        assert!(e.contains("set mesh.etcd_tls"), "{e}");
        let e = with("http://e:2379", Some(tls(None, None)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use https://"), "{e}");
        let e = with("https://e:2379", Some(tls(Some(ca.path()), None)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert and key go together"), "{e}");
        assert!(with(
            "https://e:2379",
            Some(tls(Some(ca.path()), Some(key.path())))
        )
        .is_ok());
        // Swapped: the key where the certificate goes.
        let e = with(
            "https://e:2379",
            Some(tls(Some(key.path()), Some(key.path()))),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("mesh.etcd_tls.cert") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        let missing = std::path::Path::new("/nowhere/key.pem");
        let e = with("https://e:2379", Some(tls(Some(ca.path()), Some(missing))))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("mesh.etcd_tls.key: /nowhere/key.pem"), "{e}");
    }
}
