//! The shared registry: models and vmodels registered on any node, one etcd key each, kept
//! in every node's cache (and in its own registry file, which still survives a restart).

use parking_lot::Mutex;

use etcd_client::{Client, EventType, GetOptions, WatchResponse, WatchStream};

use crate::{
    cache::{config::ModelConfig, Cache},
    registry::{FileRegistry, ModelRegistry, Saved},
};

/// How long an admin change may wait for etcd: long enough for its members to elect a new
/// leader when the old one dies (1–2 s with etcd's default timeouts) and the write to go
/// again through another member.
const SAVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(4);

/// How long one try of an admin change's writes may take before it is made again.
const ATTEMPT: std::time::Duration = std::time::Duration::from_secs(1);

/// The pause before trying again, cut short when the session moves to another member.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// The node's registry file, mirrored to etcd while the node is connected.
pub struct MeshRegistry {
    file: FileRegistry,
    prefix: String,
    /// The session's client; a new one each time the session moves to another etcd member.
    client: tokio::sync::watch::Sender<Option<Client>>,
    /// What this node last saved (its cache's registered models and vmodels).
    local: Mutex<Saved>,
    /// What etcd holds, as far as this node knows (what it wrote and what it watched).
    shared: Mutex<Saved>,
}

impl MeshRegistry {
    pub fn new(file: FileRegistry, prefix: &str) -> anyhow::Result<Self> {
        let local = file.read()?;
        Ok(MeshRegistry {
            file,
            prefix: format!("{prefix}/registry/"),
            client: tokio::sync::watch::Sender::new(None),
            local: Mutex::new(local),
            shared: Mutex::new(Saved::default()),
        })
    }

    fn model_key(&self, id: &str) -> String {
        format!("{}models/{id}", self.prefix)
    }

    fn vmodel_key(&self, name: &str) -> String {
        format!("{}vmodels/{name}", self.prefix)
    }

    /// On (re)connecting: take what etcd holds, and write what only this node holds (a
    /// registration made while etcd was away). Returns the revision to watch from.
    pub async fn sync(&self, client: &mut Client, cache: &Cache) -> anyhow::Result<i64> {
        let found = client
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut remote = Saved::default();
        for kv in found.kvs() {
            self.read_into(&mut remote, kv.key(), Some(kv.value()));
        }
        self.client.send_replace(Some(client.clone()));
        *self.shared.lock() = remote.clone();
        let local = self.local.lock().clone();
        self.write_diff(&remote, &local, false).await?;
        for m in remote.models {
            if !local.models.iter().any(|l| l.id == m.id) {
                adopt_model(cache, m).await;
            }
        }
        for (name, target) in remote.vmodels {
            if local.vmodels.get(&name) != Some(&target) {
                adopt_vmodel(cache, name, target);
            }
        }
        Ok(found.header().map_or(0, |h| h.revision()) + 1)
    }

    /// On moving to another etcd member with the watch resumed where it was: use its client,
    /// and write what only this node holds (a registration whose write failed on the last one).
    pub async fn resume(&self, client: &Client) -> anyhow::Result<()> {
        self.client.send_replace(Some(client.clone()));
        let (shared, local) = (self.shared.lock().clone(), self.local.lock().clone());
        self.write_diff(&shared, &local, false).await
    }

    /// Watch the registry keys from `revision` on.
    pub async fn watch(&self, client: &mut Client, revision: i64) -> anyhow::Result<WatchStream> {
        super::watch::watch_prefix(client, &self.prefix, revision).await
    }

    /// Apply another node's changes to this node's cache.
    pub async fn apply(&self, resp: &WatchResponse, cache: &Cache) {
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let value = (e.event_type() == EventType::Put).then(|| kv.value());
            let change = {
                let mut shared = self.shared.lock();
                self.read_into(&mut shared, kv.key(), value)
            };
            let local = self.local.lock().clone();
            match change {
                Some(Change::Model {
                    config: Some(m), ..
                }) => adopt_model(cache, m).await,
                Some(Change::Model { id, config: None })
                    if local.models.iter().any(|m| m.id == id) =>
                {
                    if let Err(e) = cache.unregister(&id).await {
                        tracing::debug!(model = %id, error = %e, "Shared unregister not applied");
                    }
                }
                Some(Change::Vmodel {
                    name,
                    target: Some(t),
                }) => adopt_vmodel(cache, name, t),
                Some(Change::Vmodel { name, target: None })
                    if local.vmodels.contains_key(&name) =>
                {
                    if let Err(e) = cache.remove_vmodel(&name).await {
                        tracing::debug!(vmodel = %name, error = %e, "Shared vmodel removal not applied");
                    }
                }
                _ => {}
            }
        }
    }

    /// Read one key into `saved`; what changed, if the key is one of ours.
    fn read_into(&self, saved: &mut Saved, key: &[u8], value: Option<&[u8]>) -> Option<Change> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(id) = key.strip_prefix("models/") {
            let config = match value {
                Some(v) => Some(serde_json::from_slice::<ModelConfig>(v).ok()?),
                None => None,
            };
            saved.models.retain(|m| m.id != id);
            saved.models.extend(config.clone());
            return Some(Change::Model {
                id: id.to_string(),
                config,
            });
        }
        let name = key.strip_prefix("vmodels/")?.to_string();
        let target = match value {
            Some(v) => Some(String::from_utf8(v.to_vec()).ok()?),
            None => None,
        };
        match &target {
            Some(t) => saved.vmodels.insert(name.clone(), t.clone()),
            None => saved.vmodels.remove(&name),
        };
        Some(Change::Vmodel { name, target })
    }

    /// Write to etcd what `to` has that `from` lacks (and, with `delete`, remove what `to`
    /// dropped).
    async fn write_diff(&self, from: &Saved, to: &Saved, delete: bool) -> anyhow::Result<()> {
        let Some(mut client) = self.client.borrow().clone() else {
            return Ok(());
        };
        for m in &to.models {
            let same = from.models.iter().any(|f| f.id == m.id && same_model(f, m));
            if !same {
                client
                    .put(self.model_key(&m.id), serde_json::to_vec(m)?, None)
                    .await?;
            }
        }
        for (name, target) in &to.vmodels {
            if from.vmodels.get(name) != Some(target) {
                client
                    .put(self.vmodel_key(name), target.as_bytes(), None)
                    .await?;
            }
        }
        if delete {
            for m in from
                .models
                .iter()
                .filter(|f| !to.models.iter().any(|m| m.id == f.id))
            {
                client.delete(self.model_key(&m.id), None).await?;
            }
            for name in from.vmodels.keys().filter(|n| !to.vmodels.contains_key(*n)) {
                client.delete(self.vmodel_key(name), None).await?;
            }
        }
        Ok(())
    }
}

impl MeshRegistry {
    /// [`Self::write_diff`] for an admin change, tried again (the puts and deletes are safe to
    /// repeat) when the member in use fails or holds the write longer than [`ATTEMPT`] (a
    /// follower whose leader died drops what it was sent), through the member the session
    /// moved to, if it moved; `save` bounds the whole.
    async fn write_diff_through(
        &self,
        from: &Saved,
        to: &Saved,
        delete: bool,
    ) -> anyhow::Result<()> {
        loop {
            let mut moved = self.client.subscribe();
            match tokio::time::timeout(ATTEMPT, self.write_diff(from, to, delete)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    tracing::debug!(
                        error = format!("{e:#}"),
                        "A registry write failed; trying again"
                    )
                }
                Err(_) => tracing::debug!(
                    "A registry write was not answered within {ATTEMPT:?}; trying again"
                ),
            }
            let _ = tokio::time::timeout(RETRY_PAUSE, moved.changed()).await;
        }
    }
}

/// One registry key's change: a value, or `None` when the key was deleted.
enum Change {
    Model {
        id: String,
        config: Option<ModelConfig>,
    },
    Vmodel {
        name: String,
        target: Option<String>,
    },
}

fn same_model(a: &ModelConfig, b: &ModelConfig) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

async fn adopt_model(cache: &Cache, m: ModelConfig) {
    let id = m.id.clone();
    match cache.register(m).await {
        Ok(()) => tracing::info!(model = %id, "Registered from the mesh"),
        Err(e) => tracing::debug!(model = %id, error = %e, "Shared registration not applied here"),
    }
}

/// A vmodel switch made on another node (which loaded the target first) moves traffic here at
/// once; in the background, so the watch goes on.
fn adopt_vmodel(cache: &Cache, name: String, target: String) {
    let cache = cache.clone();
    tokio::spawn(async move {
        if let Err(e) = cache.adopt_vmodel(&name, &target).await {
            tracing::debug!(vmodel = %name, %target, error = %e, "Shared vmodel not applied here");
        }
    });
}

#[async_trait::async_trait]
impl ModelRegistry for MeshRegistry {
    async fn load(&self) -> anyhow::Result<Saved> {
        self.file.load().await
    }

    /// The file first (this node's durable copy), then etcd, within [`SAVE_WITHIN`] (the admin
    /// API refuses changes while etcd is away; one that loses it midway is shared when the
    /// node reconnects).
    async fn save(&self, saved: Saved) -> anyhow::Result<()> {
        tokio::time::timeout(SAVE_WITHIN, self.share(saved))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "etcd did not confirm within {SAVE_WITHIN:?}; the change stands on this node \
                     and reaches the mesh when etcd answers (making it again conflicts)"
                )
            })?
    }
}

impl MeshRegistry {
    async fn share(&self, saved: Saved) -> anyhow::Result<()> {
        self.file.save(saved.clone()).await?;
        let before = std::mem::replace(&mut *self.local.lock(), saved.clone());
        let shared = self.shared.lock().clone();
        // Only this node's own changes go out: what it adds beyond what etcd holds, and what
        // it removed that etcd still has.
        let mut removed = shared.clone();
        removed.models.retain(|m| {
            before.models.iter().any(|b| b.id == m.id) && !saved.models.iter().any(|s| s.id == m.id)
        });
        removed
            .vmodels
            .retain(|n, _| before.vmodels.contains_key(n) && !saved.vmodels.contains_key(n));
        self.write_diff_through(&shared, &saved, false).await?;
        self.write_diff_through(&removed, &Saved::default(), true)
            .await?;
        // etcd now holds this node's set plus what only others had registered.
        let mut next = saved;
        for m in shared.models {
            let gone = removed.models.iter().any(|r| r.id == m.id);
            if !gone && !next.models.iter().any(|n| n.id == m.id) {
                next.models.push(m);
            }
        }
        for (n, t) in shared.vmodels {
            if !removed.vmodels.contains_key(&n) {
                next.vmodels.entry(n).or_insert(t);
            }
        }
        *self.shared.lock() = next;
        Ok(())
    }
}
