//! Tenants, tiers and API keys: who is calling, on which flat-rate plan, with what rights.
//!
//! Keys are shown once when created and stored only as SHA-256 hashes. Tenants and keys added
//! through the admin API live in `state_dir/tenancy.json`, replaced atomically.

pub mod limits;

use parking_lot::Mutex;
use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A flat-rate plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub name: String,
    /// Flat price per period (in the pool's currency).
    #[serde(default)]
    pub price: f64,
    /// Guaranteed share of the pool's execution slots, relative to other tiers.
    #[serde(default = "one")]
    pub weight: u32,
    /// Requests a tenant of this tier may run at once (0 = no limit).
    #[serde(default)]
    pub max_concurrency: u32,
    /// Model ids this tier may use; `*` matches any run of characters.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// Requests per minute per tenant (0 = no limit).
    #[serde(default)]
    pub requests_per_minute: u64,
    /// Tokens (input + output) per minute per tenant (0 = no limit).
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Tokens per tenant per calendar month (UTC) (0 = no budget).
    #[serde(default)]
    pub token_budget: u64,
    /// Residency priority: under memory pressure, a model this tier uses counts as used this
    /// much later than it was, so it stays loaded longer (`"2m"`; default none).
    #[serde(default)]
    pub residency_bonus: crate::units::Secs,
    /// The node pools (`[mesh] pool`) whose nodes may serve this tier; empty: any pool. Held
    /// everywhere: placement, forwarding, copies that follow demand, pinned re-placement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
    /// Labels (`[mesh] labels`) a node must carry, every one, to serve this tier.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Tier {
    /// Whether a node of `pool` carrying `labels` may serve this tier.
    pub fn runs_on(&self, pool: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.pools.is_empty() || self.pools.iter().any(|p| p == pool))
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether this tier is held to some pools or labels.
    pub fn confined(&self) -> bool {
        !self.pools.is_empty() || !self.labels.is_empty()
    }

    /// Where this tier may run, for messages: `pools [onprem], labels {region=dk}`.
    pub fn confinement(&self) -> String {
        let mut parts = Vec::new();
        if !self.pools.is_empty() {
            parts.push(format!("pools [{}]", self.pools.join(", ")));
        }
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.push(format!("labels {{{}}}", labels.join(", ")));
        }
        if parts.is_empty() {
            "any node".into()
        } else {
            parts.join(", ")
        }
    }
}

fn one() -> u32 {
    1
}

fn all_models() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    pub tier: String,
}

/// The `[tenancy]` config section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    /// With no tiers at all, the agent runs single-tenant: every caller is `anonymous` on an
    /// unlimited tier `open`. Once tiers exist, callers need a key unless this names a tier.
    pub anonymous_tier: Option<String>,
    pub tiers: Vec<Tier>,
    pub tenants: Vec<TenantConfig>,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub tier: Arc<Tier>,
    /// The `Authorization` the caller sent, passed to a peer that serves its request (the
    /// peer authenticates the caller itself). `None` for anonymous callers.
    pub authorization: Option<Credential>,
}

/// A caller's `Authorization` value; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    pub fn as_header(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing API key: send Authorization: Bearer <key>")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("tier {tier:?} may not use model {model:?}")]
    Forbidden { tier: String, model: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    tenants: Vec<TenantConfig>,
    /// sha256 hex → tenant id
    keys: BTreeMap<String, String>,
}

struct Inner {
    tiers: BTreeMap<String, Arc<Tier>>,
    /// The tiers of this node's config (shared with the mesh; the others were adopted).
    configured: std::collections::BTreeSet<String>,
    tenants: BTreeMap<String, (TenantConfig, bool)>,
    keys: BTreeMap<String, String>,
    anonymous: Option<Arc<Tier>>,
    /// No tiers configured: any key (the OpenAI client always sends one) is anonymous.
    open: bool,
}

/// What this node shares with the mesh: its tiers, and the tenants and keys made through its
/// admin API.
#[derive(Debug, Clone, PartialEq)]
pub enum Shared {
    /// A tier of this node's config (first come in the mesh: a tier of the same name already
    /// shared is not replaced).
    Tier(Tier),
    /// A shared tier removed from the mesh (by an operator, in etcd).
    TierGone(String),
    Tenant(TenantConfig),
    /// A key's hash and its tenant.
    Key(String, String),
    /// A revoked key's hash.
    Revoked(String),
}

/// The cloneable handle.
#[derive(Clone)]
pub struct Tenancy {
    inner: Arc<Mutex<Inner>>,
    path: Option<PathBuf>,
    /// In a mesh: where this node's own changes go to be shared.
    mirror: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<Shared>>>>,
}

pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

impl TenancyConfig {
    /// Check references; errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tiers.iter().enumerate() {
            crate::ids::check_id("tier", &t.name)
                .map_err(|e| anyhow::anyhow!("tenancy.tiers[{i}].name: {e}"))?;
            if !names.insert(t.name.as_str()) {
                anyhow::bail!("tenancy.tiers[{i}].name: {:?} is declared twice", t.name);
            }
            if t.weight == 0 {
                anyhow::bail!("tenancy.tiers[{i}].weight: must be at least 1");
            }
            for p in &t.pools {
                crate::ids::check_id("pool", p)
                    .map_err(|e| anyhow::anyhow!("tenancy.tiers[{i}].pools: {e}"))?;
            }
            for (k, v) in &t.labels {
                crate::ids::check_id("label", k)
                    .and_then(|()| crate::ids::check_id("label value", v))
                    .map_err(|e| anyhow::anyhow!("tenancy.tiers[{i}].labels: {e}"))?;
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            crate::ids::check_id("tenant", &t.id)
                .map_err(|e| anyhow::anyhow!("tenancy.tenants[{i}].id: {e}"))?;
            if !names.contains(t.tier.as_str()) {
                anyhow::bail!("tenancy.tenants[{i}].tier: no tier named {:?}", t.tier);
            }
        }
        if let Some(a) = &self.anonymous_tier {
            if !self.tiers.is_empty() && !names.contains(a.as_str()) {
                anyhow::bail!("tenancy.anonymous_tier: no tier named {a:?}");
            }
        }
        Ok(())
    }
}

impl Tenancy {
    pub fn new(
        config: &TenancyConfig,
        state_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut tiers: BTreeMap<String, Arc<Tier>> = config
            .tiers
            .iter()
            .map(|t| (t.name.clone(), Arc::new(t.clone())))
            .collect();
        let open = tiers.is_empty();
        let anonymous = if open {
            let open = Arc::new(Tier {
                name: "open".into(),
                price: 0.0,
                weight: 1,
                max_concurrency: 0,
                models: all_models(),
                requests_per_minute: 0,
                tokens_per_minute: 0,
                token_budget: 0,
                residency_bonus: Default::default(),
                pools: Vec::new(),
                labels: BTreeMap::new(),
            });
            tiers.insert("open".into(), open.clone());
            tracing::warn!(
                "No tiers configured: serving every caller anonymously on tier \"open\""
            );
            Some(open)
        } else {
            config.anonymous_tier.as_ref().map(|a| tiers[a].clone())
        };
        let tenants = config
            .tenants
            .iter()
            .map(|t| (t.id.clone(), (t.clone(), true)))
            .collect();
        let mut inner = Inner {
            configured: config.tiers.iter().map(|t| t.name.clone()).collect(),
            tiers,
            tenants,
            keys: BTreeMap::new(),
            anonymous,
            open,
        };
        let path = state_dir.map(|d| d.join("tenancy.json"));
        if let Some(p) = &path {
            if let Ok(bytes) = std::fs::read(p) {
                let saved: Saved = serde_json::from_slice(&bytes)
                    .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", p.display()))?;
                for t in saved.tenants {
                    if inner.tiers.contains_key(&t.tier) {
                        inner.tenants.entry(t.id.clone()).or_insert((t, false));
                    } else {
                        tracing::warn!(tenant = %t.id, tier = %t.tier, "Skipping a tenant whose tier no longer exists");
                    }
                }
                inner.keys = saved.keys;
            }
        }
        Ok(Tenancy {
            inner: Arc::new(Mutex::new(inner)),
            path,
            mirror: Arc::default(),
        })
    }

    /// Send this node's tenancy changes to `tx` from now on (the mesh shares them).
    pub fn mirror_to(&self, tx: tokio::sync::mpsc::UnboundedSender<Shared>) {
        *self.mirror.lock() = Some(tx);
    }

    fn share(&self, change: Shared) {
        if let Some(tx) = &*self.mirror.lock() {
            let _ = tx.send(change);
        }
    }

    /// Tenants and keys made through the API (what a node shares with the mesh).
    pub fn shared(&self) -> Vec<Shared> {
        let inner = self.inner.lock();
        let tenants = inner
            .tenants
            .values()
            .filter(|(_, from_config)| !from_config);
        let tiers = inner
            .tiers
            .values()
            .filter(|t| inner.configured.contains(&t.name))
            .map(|t| Shared::Tier((**t).clone()));
        tiers
            .chain(tenants.map(|(t, _)| Shared::Tenant(t.clone())))
            .chain(
                inner
                    .keys
                    .iter()
                    .map(|(h, t)| Shared::Key(h.clone(), t.clone())),
            )
            .collect()
    }

    /// Apply a change another node made (kept locally, not shared again). A tier this node
    /// lacks is adopted (this node's own definition of a tier wins here); a tenant on a tier
    /// this node does not have, or a key of a tenant it does not know, is skipped.
    pub fn apply(&self, change: Shared) {
        let mut inner = self.inner.lock();
        let changed = match change {
            Shared::Tier(t) if crate::ids::check_id("tier", &t.name).is_err() || t.weight == 0 => {
                tracing::warn!(tier = %t.name, "Ignoring a shared tier that is not valid");
                false
            }
            Shared::TierGone(name) => {
                if !inner.configured.contains(&name) && inner.tiers.remove(&name).is_some() {
                    tracing::info!(tier = %name, "A tier adopted from the mesh was removed");
                }
                false
            }
            Shared::Tier(t) => {
                match inner.tiers.get(&t.name) {
                    None => {
                        tracing::info!(tier = %t.name, "Adopted a tier another node of the mesh defines");
                        inner.tiers.insert(t.name.clone(), Arc::new(t));
                    }
                    Some(mine) if **mine != t => {
                        tracing::warn!(tier = %t.name, "This node's tier differs from the one the mesh shares; keeping this node's (give every node the same tiers)");
                    }
                    Some(_) => {}
                }
                false // tiers come from config and the mesh, never from the state file
            }
            Shared::Tenant(t)
                if inner.tiers.contains_key(&t.tier) && !inner.tenants.contains_key(&t.id) =>
            {
                inner.tenants.insert(t.id.clone(), (t, false));
                true
            }
            Shared::Key(hash, tenant) if inner.tenants.contains_key(&tenant) => {
                inner.keys.insert(hash, tenant.clone()) != Some(tenant)
            }
            Shared::Revoked(hash) => inner.keys.remove(&hash).is_some(),
            other => {
                tracing::debug!(?other, "Shared tenancy change not applied here");
                false
            }
        };
        if changed {
            if let Err(e) = self.save(&inner) {
                tracing::warn!(error = %e, "Could not save a shared tenancy change");
            }
        }
    }

    /// Whether the agent runs single-tenant (no tiers configured): everyone is `anonymous`.
    pub fn is_open(&self) -> bool {
        self.inner.lock().open
    }

    /// The caller behind an `Authorization` header value (or none).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let inner = self.inner.lock();
        let Some(value) = authorization else {
            return inner
                .anonymous
                .clone()
                .map(|tier| Caller {
                    tenant: "anonymous".into(),
                    tier,
                    authorization: None,
                })
                .ok_or(AuthError::Missing);
        };
        let key = value.strip_prefix("Bearer ").unwrap_or(value).trim();
        let Some(tenant) = inner.keys.get(&hash_key(key)) else {
            return match (&inner.anonymous, inner.open) {
                (Some(tier), true) => Ok(Caller {
                    tenant: "anonymous".into(),
                    tier: tier.clone(),
                    authorization: None,
                }),
                _ => Err(AuthError::Invalid),
            };
        };
        let (t, _) = inner.tenants.get(tenant).ok_or(AuthError::Invalid)?;
        let tier = inner
            .tiers
            .get(&t.tier)
            .cloned()
            .ok_or(AuthError::Invalid)?;
        Ok(Caller {
            tenant: tenant.clone(),
            tier,
            authorization: Some(Credential(value.to_string())),
        })
    }

    /// Whether the caller's tier may use `model`.
    pub fn check_model(caller: &Caller, model: &str) -> Result<(), AuthError> {
        if caller.tier.models.iter().any(|p| glob(p, model)) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                tier: caller.tier.name.clone(),
                model: model.into(),
            })
        }
    }

    pub fn add_tenant(&self, t: TenantConfig) -> Result<(), AuthError> {
        let mut inner = self.inner.lock();
        if !inner.tiers.contains_key(&t.tier) {
            return Err(AuthError::NotFound(format!("no tier named {:?}", t.tier)));
        }
        if inner.tenants.contains_key(&t.id) {
            return Err(AuthError::Conflict(format!(
                "tenant {:?} already exists",
                t.id
            )));
        }
        inner.tenants.insert(t.id.clone(), (t.clone(), false));
        self.save(&inner)?;
        self.share(Shared::Tenant(t));
        Ok(())
    }

    /// A new key for a tenant, returned once.
    pub fn create_key(&self, tenant: &str) -> Result<String, AuthError> {
        use rand::Rng;
        let mut inner = self.inner.lock();
        if !inner.tenants.contains_key(tenant) {
            return Err(AuthError::NotFound(format!(
                "tenant {tenant:?} does not exist"
            )));
        }
        let bytes: [u8; 24] = rand::rng().random();
        let key = format!(
            "fm-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        inner.keys.insert(hash_key(&key), tenant.to_string());
        self.save(&inner)?;
        self.share(Shared::Key(hash_key(&key), tenant.to_string()));
        Ok(key)
    }

    pub fn revoke_key(&self, key: &str) -> Result<(), AuthError> {
        let mut inner = self.inner.lock();
        inner
            .keys
            .remove(&hash_key(key))
            .ok_or_else(|| AuthError::NotFound("no such key".into()))?;
        self.save(&inner)?;
        self.share(Shared::Revoked(hash_key(key)));
        Ok(())
    }

    pub fn tenants(&self) -> Vec<(String, String)> {
        self.inner
            .lock()
            .tenants
            .values()
            .map(|(t, _)| (t.id.clone(), t.tier.clone()))
            .collect()
    }

    pub fn tiers(&self) -> Vec<Arc<Tier>> {
        self.inner.lock().tiers.values().cloned().collect()
    }

    pub fn tier_of(&self, tenant: &str) -> Option<Arc<Tier>> {
        let inner = self.inner.lock();
        let (t, _) = inner.tenants.get(tenant)?;
        inner.tiers.get(&t.tier).cloned()
    }

    fn save(&self, inner: &Inner) -> Result<(), AuthError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let saved = Saved {
            tenants: inner
                .tenants
                .values()
                .filter(|(_, cfg)| !cfg)
                .map(|(t, _)| t.clone())
                .collect(),
            keys: inner.keys.clone(),
        };
        crate::util::write_json(path, &saved)
            .map_err(|e| AuthError::Conflict(format!("cannot save tenancy: {e:#}")))
    }
}

#[cfg(test)]
mod tests;
