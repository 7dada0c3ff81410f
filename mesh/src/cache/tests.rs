//! Cache behaviour over time, with frozen time and real (generated) GGUF models.

use std::time::Duration;

use flatmesh_runtime::Format;
use flatmesh_tests::fixtures::{write_llama_gguf, Size};

use super::{Cache, CacheError};
use crate::{
    config::{CacheConfig, DeviceConfig, ModelConfig},
    metrics::Metrics,
    units::{Bytes, KeepAlive, Secs},
};

fn model(
    dir: &std::path::Path,
    id: &str,
    keep_alive: Option<KeepAlive>,
    pinned: bool,
) -> ModelConfig {
    let path = dir.join(format!("{id}.gguf"));
    write_llama_gguf(&path, Size::TINY, id.len() as u64).unwrap();
    ModelConfig {
        id: id.into(),
        path,
        format: Some(Format::Gguf),
        max_concurrency: 1,
        keep_alive,
        pinned,
    }
}

fn cache(models: &[ModelConfig], capacity: u64) -> Cache {
    let config = CacheConfig {
        devices: vec![DeviceConfig {
            name: "host0".into(),
            kind: "host".into(),
            capacity: Bytes(capacity),
        }],
        keep_alive: KeepAlive::For(Duration::from_secs(10)),
        min_residency: Secs(Duration::ZERO),
        pressure_wait: Secs(Duration::from_secs(2)),
        ..CacheConfig::default()
    };
    let cache = Cache::new(config, models, None, Metrics::new()).unwrap();
    let reaper = cache.clone();
    tokio::spawn(async move { reaper.run_reaper(std::future::pending()).await });
    cache
}

fn state(cache: &Cache, id: &str) -> &'static str {
    cache
        .status()
        .into_iter()
        .find(|m| m.id == id)
        .unwrap()
        .state
}

async fn advance(secs: u64) {
    tokio::time::advance(Duration::from_secs(secs)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn idle_copies_leave_after_keep_alive_and_per_request_overrides_win() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(&[model(dir.path(), "m", None, false)], 64 << 20);
    drop(c.acquire("m", None).await.unwrap());
    advance(9).await;
    assert_eq!(state(&c, "m"), "ready");
    advance(2).await;
    assert_eq!(state(&c, "m"), "cold");

    drop(
        c.acquire("m", Some(KeepAlive::For(Duration::from_secs(100))))
            .await
            .unwrap(),
    );
    advance(50).await;
    assert_eq!(state(&c, "m"), "ready", "the request asked for 100 s");
    advance(51).await;
    assert_eq!(state(&c, "m"), "cold");

    drop(c.acquire("m", Some(KeepAlive::Forever)).await.unwrap());
    advance(86_400).await;
    assert_eq!(state(&c, "m"), "ready", "-1 keeps it forever");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_zero_unloads_after_use_and_pinned_models_never_leave() {
    let dir = tempfile::tempdir().unwrap();
    let zero = model(
        dir.path(),
        "zero",
        Some(KeepAlive::For(Duration::ZERO)),
        false,
    );
    let pinned = model(
        dir.path(),
        "pinned",
        Some(KeepAlive::For(Duration::from_secs(1))),
        true,
    );
    let c = cache(&[zero, pinned], 64 << 20);
    let lease = c.acquire("zero", None).await.unwrap();
    assert_eq!(state(&c, "zero"), "ready");
    drop(lease);
    assert_eq!(state(&c, "zero"), "cold");
    c.load("pinned").await.unwrap();
    advance(3600).await;
    assert_eq!(state(&c, "pinned"), "ready");
}

/// Models "a" and "bb" on a device with room for one of them.
fn two_models_room_for_one() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let a = model(dir.path(), "a", None, false);
    let b = model(dir.path(), "bb", None, false);
    let one = flatmesh_runtime::footprint(&a.path, Format::Gguf)
        .unwrap()
        .with_sequences(1);
    let c = cache(&[a, b], one + one / 2);
    (dir, c)
}

#[tokio::test(start_paused = true)]
async fn a_leased_copy_is_never_evicted_and_pressure_ends_in_no_room() {
    let (_dir, c) = two_models_room_for_one();
    let lease = c.acquire("a", None).await.unwrap();
    match c.acquire("bb", None).await {
        Err(CacheError::NoRoom { .. }) => {}
        other => panic!("expected NoRoom, got {:?}", other.map(|l| l.model.clone())),
    }
    assert_eq!(state(&c, "a"), "ready");
    drop(lease);
    let b = c.acquire("bb", None).await.unwrap();
    assert_eq!(b.model, "bb");
    assert_eq!(state(&c, "a"), "cold", "the idle copy made room");
}

#[tokio::test(start_paused = true)]
async fn waiters_for_room_get_it_when_a_lease_ends() {
    let (_dir, c) = two_models_room_for_one();
    let lease = c.acquire("a", None).await.unwrap();
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.acquire("bb", None).await.map(|l| l.model.clone()) })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(lease);
    assert_eq!(waiter.await.unwrap().unwrap(), "bb");
}

#[tokio::test(start_paused = true)]
async fn a_tier_residency_bonus_keeps_its_models_loaded_longer_under_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let models: Vec<ModelConfig> = ["a", "bb", "ccc"]
        .iter()
        .map(|id| model(dir.path(), id, None, false))
        .collect();
    let one = flatmesh_runtime::footprint(&models[0].path, Format::Gguf)
        .unwrap()
        .with_sequences(1);
    let c = cache(&models, 2 * one + one / 2);
    // "a" is used first, by a tier with a 60 s residency bonus; "bb" later, without one.
    drop(
        c.acquire_for("a", None, Duration::from_secs(60))
            .await
            .unwrap(),
    );
    advance(1).await;
    drop(c.acquire("bb", None).await.unwrap());
    advance(1).await;
    drop(c.acquire("ccc", None).await.unwrap());
    assert_eq!(state(&c, "a"), "ready", "the bonus outranks plain recency");
    assert_eq!(state(&c, "bb"), "cold");
}
