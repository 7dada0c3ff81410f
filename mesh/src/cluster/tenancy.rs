//! Shared tenancy: tenants and key hashes made through the admin API on any node, one etcd
//! key each, applied by every node (a key made on one node works on all within a second).

use etcd_client::{Client, EventType, GetOptions, WatchResponse, WatchStream};

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
        // Tenants before keys: a key applies only to a tenant the node knows.
        let (tenants, keys): (Vec<_>, Vec<_>) = remote
            .iter()
            .cloned()
            .partition(|c| matches!(c, Shared::Tenant(_)));
        for change in tenants.into_iter().chain(keys) {
            tenancy.apply(change);
        }
        for mine in tenancy.shared() {
            if !remote.contains(&mine) {
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
        key.strip_prefix("tenants/")?;
        Some(Shared::Tenant(
            serde_json::from_slice::<TenantConfig>(value?).ok()?,
        ))
    }
}
