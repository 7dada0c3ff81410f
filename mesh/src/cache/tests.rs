//! Cache behaviour over time, with frozen time and real (generated) GGUF models.

use std::time::Duration;

use flatmesh_runtime::Format;
use flatmesh_tests::fixtures::{write_llama_gguf, Size};

use super::{
    config::{CacheConfig, Capacity, DeviceConfig, ModelConfig},
    Cache, CacheError, CopyPhase, ModelState,
};
use crate::{
    metrics::Metrics,
    units::{KeepAlive, Secs},
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
        kv_cache_tokens: None,
        prefix_cache: true,
        keep_alive,
        pinned,
        copies: 1,
    }
}

fn cache(models: &[ModelConfig], capacity: u64) -> Cache {
    cache_on(models, &[capacity])
}

/// A cache over host devices `host0`, `host1` ... of the given capacities.
fn cache_on(models: &[ModelConfig], capacities: &[u64]) -> Cache {
    let config = CacheConfig {
        devices: capacities
            .iter()
            .enumerate()
            .map(|(i, c)| DeviceConfig {
                name: format!("host{i}"),
                kind: "host".into(),
                gpu: None,
                capacity: Capacity::Bytes(*c),
            })
            .collect(),
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

fn state(cache: &Cache, id: &str) -> ModelState {
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
    assert_eq!(state(&c, "m"), ModelState::Ready);
    advance(2).await;
    assert_eq!(state(&c, "m"), ModelState::Cold);

    drop(
        c.acquire("m", Some(KeepAlive::For(Duration::from_secs(100))))
            .await
            .unwrap(),
    );
    advance(50).await;
    assert_eq!(
        state(&c, "m"),
        ModelState::Ready,
        "the request asked for 100 s"
    );
    advance(51).await;
    assert_eq!(state(&c, "m"), ModelState::Cold);

    drop(c.acquire("m", Some(KeepAlive::Forever)).await.unwrap());
    advance(86_400).await;
    assert_eq!(state(&c, "m"), ModelState::Ready, "-1 keeps it forever");
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
    assert_eq!(state(&c, "zero"), ModelState::Ready);
    drop(lease);
    assert_eq!(state(&c, "zero"), ModelState::Cold);
    c.load("pinned").await.unwrap();
    advance(3600).await;
    assert_eq!(state(&c, "pinned"), ModelState::Ready);
}

/// Models "a" and "bb" on a device with room for one of them.
fn two_models_room_for_one() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let a = model(dir.path(), "a", None, false);
    let b = model(dir.path(), "bb", None, false);
    let one = flatmesh_runtime::footprint(&a.path, Format::Gguf)
        .unwrap()
        .with_kv_tokens(flatmesh_runtime::BatchConfig::default().kv_tokens);
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
    assert_eq!(state(&c, "a"), ModelState::Ready);
    drop(lease);
    let b = c.acquire("bb", None).await.unwrap();
    assert_eq!(b.model, "bb");
    assert_eq!(state(&c, "a"), ModelState::Cold, "the idle copy made room");
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
        .with_kv_tokens(flatmesh_runtime::BatchConfig::default().kv_tokens);
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
    assert_eq!(
        state(&c, "a"),
        ModelState::Ready,
        "the bonus outranks plain recency"
    );
    assert_eq!(state(&c, "bb"), ModelState::Cold);
}

/// Bytes in use on all devices together.
fn used(cache: &Cache) -> u64 {
    cache.devices().iter().map(|d| d.1).sum()
}

fn registry_cache(dir: &std::path::Path, capacity: u64) -> Cache {
    let reg = super::Registry::open(&dir.join("state")).unwrap();
    let config = CacheConfig {
        devices: vec![DeviceConfig {
            name: "host0".into(),
            kind: "host".into(),
            gpu: None,
            capacity: Capacity::Bytes(capacity),
        }],
        keep_alive: KeepAlive::For(Duration::from_secs(10)),
        min_residency: Secs(Duration::ZERO),
        ..CacheConfig::default()
    };
    Cache::new(config, &[], Some(reg), Metrics::new()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn unregister_while_leased_drains_the_copy_and_frees_its_bytes_after_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let c = registry_cache(dir.path(), 64 << 20);
    c.register(model(dir.path(), "m", None, false))
        .await
        .unwrap();
    let lease = c.acquire("m", None).await.unwrap();
    let bytes = used(&c);
    assert!(bytes > 0);
    c.unregister("m").await.unwrap();
    assert!(!c.contains("m"));
    assert_eq!(used(&c), bytes, "the leased copy stays counted");
    let draining = c.draining();
    assert_eq!(draining.len(), 1);
    assert_eq!(
        (draining[0].0.as_str(), draining[0].1.state),
        ("m", CopyPhase::Draining)
    );
    // The same id registered again is a new model; the old lease does not touch it.
    c.register(model(dir.path(), "m", None, false))
        .await
        .unwrap();
    let again = c.acquire("m", None).await.unwrap();
    assert_ne!(again.copy, lease.copy);
    drop(lease);
    assert!(c.draining().is_empty());
    assert_eq!(c.status()[0].leases, 1, "the new copy keeps its own lease");
    drop(again);
    c.unregister("m").await.unwrap();
    assert_eq!(used(&c), 0, "every byte came back");
}

#[tokio::test(start_paused = true)]
async fn unregister_during_a_load_releases_the_reservation_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = registry_cache(dir.path(), 64 << 20);
    // The load runs on the blocking pool in real time: on a fast machine it may finish
    // before the unregister, so the scenario is retried until it is caught mid-load.
    let mut caught = false;
    for _ in 0..50 {
        c.register(model(dir.path(), "m", None, false))
            .await
            .unwrap();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.acquire("m", None).await.map(|l| l.model.clone()) })
        };
        tokio::task::yield_now().await;
        if state(&c, "m") != ModelState::Loading {
            let _ = waiter.await;
            c.unregister("m").await.unwrap();
            continue;
        }
        c.unregister("m").await.unwrap();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(CacheError::NotFound(_))
        ));
        caught = true;
        break;
    }
    assert!(caught, "never caught the model while it was loading");
    // The load finishes on the blocking pool; its reservation is released then, once.
    for _ in 0..200 {
        if used(&c) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(used(&c), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unregister_under_concurrent_acquires_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let c = registry_cache(dir.path(), 256 << 20);
    let m = model(dir.path(), "m", None, false);
    c.register(m.clone()).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut served = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match c.acquire("m", None).await {
                        Ok(lease) => {
                            served += 1;
                            tokio::task::yield_now().await;
                            drop(lease);
                        }
                        Err(CacheError::NotFound(_)) => tokio::task::yield_now().await,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                served
            })
        })
        .collect();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.unregister("m").await.unwrap();
        c.register(m.clone()).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for w in workers {
        served += w.await.expect("no request panicked");
    }
    assert!(served > 0);
    c.unregister("m").await.unwrap();
    for _ in 0..500 {
        if used(&c) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(used(&c), 0, "every byte came back");
}

#[tokio::test(start_paused = true)]
async fn a_busy_model_gets_a_second_copy_and_requests_pick_the_least_leased() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = model(dir.path(), "m", None, false);
    m.copies = 2;
    let one = flatmesh_runtime::footprint(&m.path, Format::Gguf)
        .unwrap()
        .with_kv_tokens(flatmesh_runtime::BatchConfig::default().kv_tokens);
    let c = cache_on(&[m], &[one + one / 2, one + one / 2]);
    let first = c.acquire("m", None).await.unwrap();
    // Every copy is busy: the next request waits for the first copy, and a second one loads
    // on the other device.
    let second = {
        let c = c.clone();
        tokio::spawn(async move { c.acquire("m", None).await.unwrap() })
    };
    for _ in 0..200 {
        let s = &c.status()[0];
        if s.copies
            .iter()
            .filter(|c| c.state == CopyPhase::Ready)
            .count()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = &c.status()[0];
    assert_eq!(status.copies.len(), 2, "{status:?}");
    assert_ne!(status.copies[0].device, status.copies[1].device);
    let third = c.acquire("m", None).await.unwrap();
    assert_ne!(third.copy, first.copy, "the idle copy is picked");
    assert_ne!(third.device, first.device);
    drop(first);
    let second = second.await.unwrap();
    assert_eq!(c.status()[0].leases, 2);
    assert_eq!(c.status()[0].max_copies, 2);
    drop((second, third));
    advance(11).await;
    assert_eq!(state(&c, "m"), ModelState::Cold);
    assert_eq!(used(&c), 0);
}

#[tokio::test(start_paused = true)]
async fn one_copy_by_default_however_busy() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), "m", None, false);
    let c = cache_on(&[m], &[64 << 20, 64 << 20]);
    let first = c.acquire("m", None).await.unwrap();
    let second = {
        let c = c.clone();
        tokio::spawn(async move { c.acquire("m", None).await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.status()[0].copies.len(), 1);
    drop(first);
    second.await.unwrap().unwrap();
}

/// A registry whose writes wait until the test lets them through.
struct SlowRegistry {
    gate: tokio::sync::Semaphore,
    saved: std::sync::Mutex<Vec<Vec<String>>>,
}

#[async_trait::async_trait]
impl crate::registry::ModelRegistry for SlowRegistry {
    async fn load(&self) -> anyhow::Result<crate::registry::Saved> {
        Ok(Default::default())
    }

    async fn save(&self, saved: crate::registry::Saved) -> anyhow::Result<()> {
        self.gate.acquire().await?.forget();
        let ids = saved.models.iter().map(|m| m.id.clone()).collect();
        self.saved.lock().unwrap().push(ids);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn registry_writes_never_block_requests_and_land_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let reg = std::sync::Arc::new(SlowRegistry {
        gate: tokio::sync::Semaphore::new(0),
        saved: Default::default(),
    });
    let config = CacheConfig {
        devices: vec![DeviceConfig {
            name: "host0".into(),
            kind: "host".into(),
            gpu: None,
            capacity: Capacity::Bytes(64 << 20),
        }],
        ..CacheConfig::default()
    };
    let served = model(dir.path(), "served", None, false);
    let c = Cache::open(config, &[served], Some(reg.clone()), Metrics::new())
        .await
        .unwrap();
    let writes: Vec<_> = ["a", "bb"]
        .iter()
        .map(|id| {
            let (c, m) = (c.clone(), model(dir.path(), id, None, false));
            tokio::spawn(async move { c.register(m).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Both writes are stuck in the registry; requests are served all the same.
    drop(c.acquire("served", None).await.unwrap());
    reg.gate.add_permits(2);
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let saved = reg.saved.lock().unwrap().clone();
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[0].len(), 1);
    assert_eq!(
        saved[1].len(),
        2,
        "the later write holds both models: {saved:?}"
    );
}
