//! Watching a key prefix of etcd from a revision on.

use etcd_client::{Client, WatchOptions};

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
