//! Watching a key prefix of etcd from a revision on, and where each watch got to, so a watch
//! resumes on another member without losing or repeating events.

use etcd_client::{Client, WatchOptions, WatchResponse};

/// Watch every key under `prefix` from `revision` on (what a get at `revision - 1` saw is
/// already applied).
pub async fn watch_prefix(
    client: &mut Client,
    prefix: &str,
    revision: i64,
) -> anyhow::Result<etcd_client::WatchStream> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision);
    Ok(client.watch(prefix, Some(opts)).await?)
}

/// The revision each of the session's watches goes on from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revisions {
    pub nodes: i64,
    pub registry: i64,
    pub tenancy: i64,
}

/// The revision to watch from after `resp`: one past its last event. A watch etcd cancelled
/// (its revision compacted away) cannot go on: the caller reads everything again.
pub fn advance(from: i64, resp: &WatchResponse) -> anyhow::Result<i64> {
    if resp.canceled() {
        anyhow::bail!(
            "etcd cancelled a watch (compacted at revision {}): {}",
            resp.compact_revision(),
            resp.cancel_reason()
        );
    }
    Ok(resp
        .events()
        .iter()
        .filter_map(|e| e.kv())
        .map(|kv| kv.mod_revision() + 1)
        .fold(from, i64::max))
}
