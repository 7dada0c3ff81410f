//! One policy slot: the plugin loaded in it, a pool of ready instances, hot reload, and what
//! happens when the plugin fails (counted, logged once per burst, backed off).

use parking_lot::{Mutex, RwLock};
use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};

use super::{
    config::OnFailure,
    failure::{classify, clip, over_limit, Failure, FailureKind, Outcome, Refusal},
    host::{Ctx, Runtime},
    kind::{Instance, Kind},
    name::SlotName,
    state::PluginState,
};
use crate::metrics::Metrics;

/// The limits and failure policy of a slot.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Guest time one call may take.
    pub deadline: Duration,
    /// Linear memory of one instance.
    pub memory_cap: usize,
    /// Instances kept ready between calls.
    pub max_idle: usize,
    /// How long a call may wait in the host (see `PolicyConfig::host_wait_ms`).
    pub host_wait: Duration,
    /// Largest plugin file read (see `PolicyConfig::max_plugin_bytes`).
    pub max_plugin_bytes: u64,
}

/// A loaded version of the plugin.
struct Loaded<K: Kind> {
    version: u64,
    path: PathBuf,
    sha256: String,
    config: String,
    loaded_ms: u64,
    /// The file's modification time and length when it was loaded (for `watch`).
    stamp: Option<(SystemTime, u64)>,
    pre: K::Pre,
    idle: Mutex<Vec<Instance<K>>>,
}

#[derive(Default)]
struct Health {
    consecutive: u32,
    backoff_until: Option<Instant>,
    /// The failures since the last success: logged when they start, then every 30 s.
    burst: Option<(u64, Instant)>,
    failures: u64,
}

/// What the admin API shows of a slot.
#[derive(Debug, serde::Serialize)]
pub struct SlotStatus {
    pub slot: SlotName,
    pub loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_ms: Option<u64>,
    pub deadline_ms: f64,
    pub memory_cap_bytes: usize,
    pub on_failure: OnFailure,
    pub failures: u64,
    pub failing_now: bool,
    pub idle_instances: usize,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A plugin file's bytes: a regular file of at most `max` bytes, read off the async runtime,
/// starting with the WebAssembly magic. Errors name the file, never echo its contents.
async fn read_plugin(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let owned = path.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || flatmesh_runtime::read_regular(&owned, max))
        .await
        .map_err(|e| format!("reading task failed: {e}"))?
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !bytes.starts_with(b"\0asm") {
        return Err(format!(
            "{}: not a WebAssembly component (it does not start with the WebAssembly header)",
            path.display()
        ));
    }
    Ok(bytes)
}

/// What a new slot is made of.
pub struct Setup<'a> {
    pub runtime: &'a Runtime,
    pub settings: Settings,
    /// What a failing plugin means for the request.
    pub on_failure: OnFailure,
    /// Bytes the plugin may keep in its key-value store.
    pub kv_bytes: usize,
    pub metrics: &'a Metrics,
}

pub struct Slot<K: Kind> {
    runtime: Runtime,
    linker: Linker<Ctx>,
    pub settings: Settings,
    pub on_failure: OnFailure,
    state: Arc<PluginState>,
    current: RwLock<Option<Arc<Loaded<K>>>>,
    health: Mutex<Health>,
    versions: AtomicU64,
    metrics: Metrics,
    /// The last file stamp a reload was attempted for (so a broken file is tried once).
    attempted: Mutex<Option<(SystemTime, u64)>>,
    /// One load at a time: a reload through the API and one from the file watcher must not
    /// race (the last to finish would win with the other's file or config).
    loading: tokio::sync::Mutex<()>,
    /// Calls in flight (each holds an instance): more wait for a permit, briefly.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl<K: Kind> Slot<K> {
    pub fn new(setup: Setup<'_>) -> anyhow::Result<Arc<Self>> {
        let runtime = setup.runtime.clone();
        let mut linker = runtime
            .linker()
            .map_err(|e| anyhow::anyhow!("linking WASI: {e:#}"))?;
        K::add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("linking the {} world: {e:#}", K::SLOT))?;
        Ok(Arc::new(Slot {
            runtime,
            linker,
            settings: setup.settings,
            on_failure: setup.on_failure,
            state: PluginState::new(K::SLOT.to_string(), setup.kv_bytes),
            current: RwLock::new(None),
            health: Mutex::default(),
            versions: AtomicU64::new(0),
            metrics: setup.metrics.clone(),
            attempted: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }))
    }

    fn current(&self) -> Option<Arc<Loaded<K>>> {
        self.current.read().clone()
    }

    /// The config string of the loaded plugin.
    pub fn config(&self) -> Option<String> {
        self.current().map(|c| c.config.clone())
    }

    pub fn is_loaded(&self) -> bool {
        self.current().is_some()
    }

    /// Compile, link and initialise a plugin; on success it replaces the one loaded (calls in
    /// flight finish on the old one). On failure the old one stays and the reason comes back.
    pub async fn load(&self, path: &Path, config: String) -> Result<u64, String> {
        let _one = self.loading.lock().await;
        let result = self.try_load(path, config).await;
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        self.metrics
            .policy_reloads
            .with_label_values(&[K::SLOT.as_str(), outcome])
            .inc();
        match &result {
            Ok(v) => {
                tracing::info!(slot = K::SLOT.as_str(), path = %path.display(), version = v, "Policy plugin loaded")
            }
            Err(e) => {
                tracing::warn!(slot = K::SLOT.as_str(), path = %path.display(), error = %e, "Policy plugin rejected; the previous one stays")
            }
        }
        result
    }

    async fn try_load(&self, path: &Path, config: String) -> Result<u64, String> {
        self.runtime.start_clock()?;
        let file_stamp = stamp(path);
        *self.attempted.lock() = file_stamp;
        let bytes = read_plugin(path, self.settings.max_plugin_bytes).await?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        let engine = self.runtime.engine.clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .map_err(|e| format!("compilation task failed: {e}"))?
            .map_err(|e| format!("not a WebAssembly component that compiles: {e:#}"))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(K::pre)
            .map_err(|e| {
                let hint = super::kind::version_hint(&self.runtime.engine, &component);
                format!("does not fit the `{}` world{hint}: {e:#}", K::SLOT)
            })?;
        let mut loaded = Loaded {
            version: 0,
            path: path.to_path_buf(),
            sha256,
            config,
            loaded_ms: crate::util::now_ms(),
            stamp: file_stamp,
            pre,
            idle: Mutex::default(),
        };
        // Init time is bounded too: generously, a config may take some parsing.
        let first = self
            .instantiate(
                &loaded,
                (self.settings.deadline * 20).max(Duration::from_millis(200)),
            )
            .await
            .map_err(|f| format!("init failed: {f}"))?;
        // Loads are serialized (`loading`), so versions are published in order.
        loaded.version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        loaded.idle.lock().push(first);
        let version = loaded.version;
        *self.current.write() = Some(Arc::new(loaded));
        *self.health.lock() = Health::default();
        self.metrics
            .policy_version
            .with_label_values(&[K::SLOT.as_str()])
            .set(version as i64);
        Ok(version)
    }

    /// Load the current plugin again from its file, with its config.
    pub async fn reload(&self) -> Result<u64, String> {
        let Some(cur) = self.current() else {
            return Err(format!("no plugin is loaded in the {} slot", K::SLOT));
        };
        self.load(&cur.path, cur.config.clone()).await
    }

    /// Reload whenever the plugin's file changes (polled every `every`), until shutdown.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let Some(cur) = self.current() else { continue };
            let now = stamp(&cur.path);
            if now.is_none() || now == cur.stamp || now == *self.attempted.lock() {
                continue;
            }
            // Let a writer finish: the stamp must hold still for one more period.
            tokio::time::sleep(every.min(Duration::from_millis(200))).await;
            if stamp(&cur.path) != now {
                continue;
            }
            // An API reload may have happened meanwhile: take what is current now.
            let Some(cur) = self.current() else { continue };
            if stamp(&cur.path) == cur.stamp {
                continue;
            }
            let _ = self.load(&cur.path, cur.config.clone()).await;
        }
    }

    /// A fresh instance with its config applied.
    async fn instantiate(
        &self,
        loaded: &Loaded<K>,
        budget: Duration,
    ) -> Result<Instance<K>, Failure> {
        let mut store = self
            .runtime
            .store(self.state.clone(), self.settings.memory_cap);
        store.data_mut().begin("", budget);
        store.set_epoch_deadline(1);
        let bindings = match K::instantiate(&loaded.pre, &mut store).await {
            Ok(b) => b,
            Err(e) => return Err(classify(&store, e, FailureKind::Unavailable)),
        };
        match K::init(&bindings, &mut store, &loaded.config).await {
            Ok(Ok(())) => Ok(Instance { store, bindings }),
            Ok(Err(message)) => Err(Failure {
                kind: FailureKind::Error,
                message: format!("the plugin rejected its config: {}", clip(&message)),
            }),
            Err(e) => Err(classify(&store, e, FailureKind::Trap)),
        }
    }

    /// Call the plugin for `tenant`. `f` gets an instance and gives it back with the result.
    pub async fn call<R, F, Fut>(&self, tenant: &str, f: F) -> Outcome<R>
    where
        F: FnOnce(Instance<K>) -> Fut,
        Fut: Future<Output = (Instance<K>, wasmtime::Result<Result<R, String>>)>,
    {
        let Some(loaded) = self.current() else {
            return Outcome::Absent;
        };
        let span = tracing::info_span!(target: crate::telemetry::TARGET, "policy", otel.name = %format_args!("policy {}", K::SLOT), flatmesh.policy.slot = K::SLOT.as_str(), flatmesh.policy.plugin = %loaded.path.display(), flatmesh.policy.version = loaded.version);
        let outcome =
            tracing::Instrument::instrument(self.call_loaded(loaded, tenant, f), span.clone())
                .await;
        if let Outcome::Failed(f) = &outcome {
            crate::telemetry::failed(&span, f.kind.label(), &f.message);
        }
        outcome
    }

    async fn call_loaded<R, F, Fut>(&self, loaded: Arc<Loaded<K>>, tenant: &str, f: F) -> Outcome<R>
    where
        F: FnOnce(Instance<K>) -> Fut,
        Fut: Future<Output = (Instance<K>, wasmtime::Result<Result<R, String>>)>,
    {
        let started = Instant::now();
        let backoff_until = self.health.lock().backoff_until;
        if let Some(until) = backoff_until {
            if until > started {
                return Outcome::Failed(self.failed(Failure {
                    kind: FailureKind::Unavailable,
                    message: "backing off after the plugin failed".into(),
                }));
            }
        }
        let limit = self.call_limit();
        let Ok(Ok(_permit)) =
            tokio::time::timeout(limit, self.in_flight.clone().acquire_owned()).await
        else {
            // The host is overloaded, not the plugin at fault: no backoff, no burst.
            self.metrics
                .policy_calls
                .with_label_values(&[K::SLOT.as_str(), FailureKind::Unavailable.label()])
                .inc();
            return Outcome::Failed(Failure {
                kind: FailureKind::Unavailable,
                message: format!("{MAX_IN_FLIGHT} calls in flight; no instance free"),
            });
        };
        let idle = loaded.idle.lock().pop();
        let mut instance = match idle {
            Some(i) => i,
            None => {
                let made = tokio::time::timeout(
                    limit,
                    self.instantiate(&loaded, self.settings.deadline * 20),
                )
                .await;
                match made {
                    Ok(Ok(i)) => i,
                    Ok(Err(f)) => return Outcome::Failed(self.failed(f)),
                    Err(_) => return Outcome::Failed(self.failed(over_limit(limit))),
                }
            }
        };
        instance
            .store
            .data_mut()
            .begin(tenant, self.settings.deadline);
        // The first check comes after one tick; from there the callback counts CPU time.
        instance.store.set_epoch_deadline(1);
        // Guest time is bounded by the epoch callback; this bounds the rest (a guest blocked
        // in a host import). The instance is dropped with the call.
        let Ok((instance, result)) = tokio::time::timeout(limit, f(instance)).await else {
            return Outcome::Failed(self.failed(over_limit(limit)));
        };
        self.metrics
            .policy_call_seconds
            .with_label_values(&[K::SLOT.as_str()])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(r)) => {
                self.succeeded();
                let mut idle = loaded.idle.lock();
                if idle.len() < self.settings.max_idle {
                    idle.push(instance);
                }
                Outcome::Done(r)
            }
            Ok(Err(message)) => {
                let mut idle = loaded.idle.lock();
                if idle.len() < self.settings.max_idle {
                    idle.push(instance);
                }
                drop(idle);
                Outcome::Failed(self.failed(Failure {
                    kind: FailureKind::Error,
                    message: clip(&message),
                }))
            }
            // The instance is dropped: its state may be broken.
            Err(e) => Outcome::Failed(self.failed(classify(&instance.store, e, FailureKind::Trap))),
        }
    }

    /// The longest a call may take in all: the guest's CPU budget is enforced by the epoch
    /// callback; beyond that a call may wait in the host (an embedding model paging in).
    fn call_limit(&self) -> Duration {
        (self.settings.deadline * 50).max(Duration::from_secs(1)) + self.settings.host_wait
    }

    /// Where a request goes when this slot's plugin failed and the built-in policy is to do
    /// nothing: `closed` refuses it, `open` and `default` go on with `otherwise`.
    pub fn fallback<T>(&self, failure: &Failure, otherwise: T) -> Result<T, Refusal> {
        match self.on_failure {
            OnFailure::Closed => Err(Refusal::closed(K::SLOT, failure)),
            OnFailure::Open | OnFailure::Default => Ok(otherwise),
        }
    }

    /// A result that broke the contract: counted like any failure.
    pub fn invalid(&self, message: String) -> Failure {
        self.failed(Failure {
            kind: FailureKind::Invalid,
            message,
        })
    }

    fn succeeded(&self) {
        self.metrics
            .policy_calls
            .with_label_values(&[K::SLOT.as_str(), "ok"])
            .inc();
        let mut h = self.health.lock();
        if let Some((count, _)) = h.burst.take() {
            tracing::info!(
                slot = K::SLOT.as_str(),
                failures = count,
                "Policy plugin recovered"
            );
        }
        h.consecutive = 0;
        h.backoff_until = None;
    }

    fn failed(&self, failure: Failure) -> Failure {
        self.metrics
            .policy_calls
            .with_label_values(&[K::SLOT.as_str(), failure.kind.label()])
            .inc();
        let now = Instant::now();
        let mut h = self.health.lock();
        h.failures += 1;
        // One request can make a healthy plugin fail (a huge prompt, say); only failures in a
        // row put the slot to rest.
        if failure.kind.backs_off() {
            h.consecutive += 1;
            if h.consecutive >= BACKOFF_AFTER {
                let n = (h.consecutive - BACKOFF_AFTER).min(7);
                let rest = Duration::from_millis(250) * 2u32.pow(n);
                h.backoff_until = Some(now + rest.min(Duration::from_secs(30)));
            }
        }
        match &mut h.burst {
            None => {
                h.burst = Some((1, now));
                tracing::warn!(slot = K::SLOT.as_str(), kind = failure.kind.label(), error = %failure.message, on_failure = self.on_failure.label(), "Policy plugin failed");
            }
            Some((count, last)) => {
                *count += 1;
                if now.duration_since(*last) >= Duration::from_secs(30) {
                    *last = now;
                    tracing::warn!(slot = K::SLOT.as_str(), kind = failure.kind.label(), error = %failure.message, failures = *count, "Policy plugin still failing");
                }
            }
        }
        failure
    }

    pub fn status(&self) -> SlotStatus {
        let cur = self.current();
        let h = self.health.lock();
        SlotStatus {
            slot: K::SLOT,
            loaded: cur.is_some(),
            path: cur.as_ref().map(|c| c.path.clone()),
            sha256: cur.as_ref().map(|c| c.sha256.clone()),
            version: cur.as_ref().map(|c| c.version),
            loaded_ms: cur.as_ref().map(|c| c.loaded_ms),
            deadline_ms: self.settings.deadline.as_secs_f64() * 1000.0,
            memory_cap_bytes: self.settings.memory_cap,
            on_failure: self.on_failure,
            failures: h.failures,
            failing_now: h.burst.is_some(),
            idle_instances: cur.as_ref().map_or(0, |c| c.idle.lock().len()),
        }
    }
}

/// What the host does with a slot whatever its plugin's kind: load, reload, watch, show.
pub trait AnySlot: Send + Sync {
    fn load<'a>(&'a self, path: &'a Path, config: String) -> BoxFuture<'a, Result<u64, String>>;
    fn reload(&self) -> BoxFuture<'_, Result<u64, String>>;
    fn watch(self: Arc<Self>, every: Duration) -> BoxFuture<'static, ()>;
    fn config(&self) -> Option<String>;
    fn status(&self) -> SlotStatus;
}

impl<K: Kind> AnySlot for Slot<K> {
    fn load<'a>(&'a self, path: &'a Path, config: String) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(Slot::load(self, path, config))
    }

    fn reload(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(Slot::reload(self))
    }

    fn watch(self: Arc<Self>, every: Duration) -> BoxFuture<'static, ()> {
        Box::pin(Slot::watch(self, every))
    }

    fn config(&self) -> Option<String> {
        Slot::config(self)
    }

    fn status(&self) -> SlotStatus {
        Slot::status(self)
    }
}

/// Calls of one slot in flight at once (each holds an instance; the pool has room for all
/// three slots and a reload's overlap).
const MAX_IN_FLIGHT: usize = 64;

/// Failures in a row (trap, timeout, memory) after which a slot backs off.
const BACKOFF_AFTER: u32 = 3;
