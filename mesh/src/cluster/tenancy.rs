//! Shared tenancy: tiers, and tenants and key hashes made through the admin API on any node,
//! one etcd key each, applied by every node (a key made on one node works on all within a
//! second; a tenant on a tier only another node's config defines works here too).

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchResponse, WatchStream,
};

use crate::tenancy::{Shared, Tenancy, TenantConfig};

/// The etcd keys of shared tenancy under a mesh prefix.
pub struct SharedTenancy {
    prefix: String,
}

impl SharedTenancy {
    pub fn new(prefix: &str) -> Self {
        SharedTenancy {
            prefix: format!("{prefix}/tenancy/"),
        }
    }

    /// Write one of this node's changes.
    pub async fn write(&self, client: &mut Client, change: &Shared) -> anyhow::Result<()> {
        match change {
            Shared::Tier(t) => {
                // The first definition in the mesh stays: written only where none is.
                let key = format!("{}tiers/{}", self.prefix, t.name);
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, serde_json::to_vec(t)?, None)]);
                client.txn(txn).await?;
            }
            Shared::TierGone(_) => {} // an operator's deletion in etcd; nodes never write it
            Shared::Tenant(t) => {
                let key = format!("{}tenants/{}", self.prefix, t.id);
                client.put(key, serde_json::to_vec(t)?, None).await?;
            }
            Shared::Key(hash, tenant) => {
                client
                    .put(
                        format!("{}keys/{hash}", self.prefix),
                        tenant.as_bytes(),
                        None,
                    )
                    .await?;
            }
            Shared::Revoked(hash) => {
                client
                    .delete(format!("{}keys/{hash}", self.prefix), None)
                    .await?;
            }
        }
        Ok(())
    }

    /// On (re)connecting: take what etcd holds, and write what only this node holds.
    /// Returns the revision to watch from.
    pub async fn sync(&self, client: &mut Client, tenancy: &Tenancy) -> anyhow::Result<i64> {
        let found = client
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let remote: Vec<Shared> = found
            .kvs()
            .iter()
            .filter_map(|kv| self.read(kv.key(), Some(kv.value())))
            .collect();
        // Tiers, then tenants, then keys: a tenant applies only on a tier the node knows, a
        // key only to a tenant it knows.
        let order = |c: &Shared| match c {
            Shared::Tier(_) | Shared::TierGone(_) => 0,
            Shared::Tenant(_) => 1,
            _ => 2,
        };
        let mut ordered = remote.clone();
        ordered.sort_by_key(order);
        for change in ordered {
            tenancy.apply(change);
        }
        let shared_tier = |name: &str| {
            remote
                .iter()
                .any(|c| matches!(c, Shared::Tier(t) if t.name == name))
        };
        for mine in tenancy.shared() {
            let known = match &mine {
                Shared::Tier(t) => shared_tier(&t.name),
                other => remote.contains(other),
            };
            if !known {
                self.write(client, &mine).await?;
            }
        }
        Ok(found.header().map_or(0, |h| h.revision()) + 1)
    }

    pub async fn watch(&self, client: &mut Client, revision: i64) -> anyhow::Result<WatchStream> {
        super::watch::watch_prefix(client, &self.prefix, revision).await
    }

    /// Apply other nodes' changes.
    pub fn apply(&self, resp: &WatchResponse, tenancy: &Tenancy) {
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let value = (e.event_type() == EventType::Put).then(|| kv.value());
            if let Some(change) = self.read(kv.key(), value) {
                tenancy.apply(change);
            }
        }
    }

    fn read(&self, key: &[u8], value: Option<&[u8]>) -> Option<Shared> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(hash) = key.strip_prefix("keys/") {
            return Some(match value {
                Some(v) => Shared::Key(hash.to_string(), String::from_utf8(v.to_vec()).ok()?),
                None => Shared::Revoked(hash.to_string()),
            });
        }
        if let Some(name) = key.strip_prefix("tiers/") {
            return Some(match value {
                Some(v) => Shared::Tier(serde_json::from_slice(v).ok()?),
                None => Shared::TierGone(name.to_string()),
            });
        }
        key.strip_prefix("tenants/")?;
        Some(Shared::Tenant(
            serde_json::from_slice::<TenantConfig>(value?).ok()?,
        ))
    }
}
