//! The wasmtime side of policies: the engine, the bindings of `wit/`, and the host imports.
//!
//! This is the one module that configures wasmtime: pooling allocator, copy-on-write memory
//! images, epoch interruption (one ticker thread, 1 ms per tick), async calls so the `embed`
//! import can wait for a model without blocking a thread. Plugins get WASI with nothing in it:
//! no preopened directories, no environment, no arguments, no network.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use wasmtime::{
    component::{Linker, ResourceTable},
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::state::{Answers, PluginState};

pub use super::bindings::{cache, imports, pricing, residency, router, types, Answer};

/// How long one tick of the epoch clock is.
pub const TICK: Duration = Duration::from_millis(1);

/// Plugin instances alive at once, all slots and versions together (the pooling allocator
/// reserves this many slots up front, as virtual memory).
const MAX_INSTANCES: u32 = 256;

/// Computes embeddings for the `embed` import (the agent's model cache, or a test double).
pub trait Embedder: Send + Sync {
    fn embed(
        &self,
        model: String,
        text: String,
    ) -> futures::future::BoxFuture<'static, Result<Vec<f32>, String>>;
}

/// The wasmtime engine shared by every plugin, and its epoch clock.
#[derive(Clone)]
pub struct Runtime {
    pub engine: Engine,
    /// Shared host services: the answer store and the embedder.
    pub answers: Answers,
    pub embedder: Option<Arc<dyn Embedder>>,
    ticker: Arc<Ticker>,
}

/// The epoch clock: a thread that ticks the engine's epoch, started with the first plugin and
/// stopped when the last handle to the runtime goes.
#[derive(Default)]
struct Ticker {
    stop: Arc<AtomicBool>,
    started: std::sync::OnceLock<Result<(), String>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Runtime {
    /// `memory_cap` bounds each instance's linear memory.
    pub fn new(memory_cap: usize, embedder: Option<Arc<dyn Embedder>>) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * 8)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES * 4)
            .total_stacks(MAX_INSTANCES)
            .max_memory_size(memory_cap);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            // Reserve only the cap per memory (not 4 GiB): the pool's address space stays
            // small, at the price of explicit bounds checks.
            .memory_reservation(memory_cap as u64)
            .memory_guard_size(64 << 10)
            .epoch_interruption(true)
            .max_wasm_stack(512 << 10)
            .async_stack_size(1 << 20);
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("configuring the WebAssembly engine: {e:#}"))?;
        Ok(Runtime {
            engine,
            answers: Answers::default(),
            embedder,
            ticker: Arc::default(),
        })
    }

    /// Start the epoch clock if it is not running (an agent without plugins has no ticking
    /// thread). Without it no deadline could fire, so a plugin must not load without it.
    pub fn start_clock(&self) -> Result<(), String> {
        self.ticker
            .started
            .get_or_init(|| {
                let engine = self.engine.clone();
                let stop = self.ticker.stop.clone();
                std::thread::Builder::new()
                    .name("policy-epoch".into())
                    .spawn(move || {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            std::thread::sleep(TICK);
                            engine.increment_epoch();
                        }
                    })
                    .map(drop)
                    .map_err(|e| format!("cannot start the epoch clock: {e}"))
            })
            .clone()
    }

    /// A linker with WASI (empty) and the host imports; each world adds only what it imports.
    pub fn linker(&self) -> wasmtime::Result<Linker<Ctx>> {
        let mut linker = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Ok(linker)
    }

    /// A fresh store for one instance of a plugin.
    pub fn store(&self, plugin: Arc<PluginState>, memory_cap: usize) -> Store<Ctx> {
        let ctx = Ctx {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_cap,
                exceeded: false,
            },
            plugin,
            answers: self.answers.clone(),
            embedder: self.embedder.clone(),
            call: Call::default(),
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|c| &mut c.limiter);
        store.epoch_deadline_callback(|mut cx| {
            let call = &mut cx.data_mut().call;
            if call.over() {
                call.timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store
    }
}

/// What a store holds: WASI, limits, the plugin's state and the current call.
pub struct Ctx {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: Limiter,
    pub plugin: Arc<PluginState>,
    answers: Answers,
    embedder: Option<Arc<dyn Embedder>>,
    pub call: Call,
}

/// The call running in a store.
///
/// Its deadline counts the CPU time of the guest, not the wall clock: on a busy node a call may
/// wait for a core, and that is not the plugin's fault. The epoch callback runs once the call
/// is a tick old (most calls end long before, and pay nothing for this); from then on it adds
/// the thread's CPU time at every tick. The first tick is counted as run (a running guest
/// meets an epoch check within microseconds of a tick, so it cannot have run much more). A
/// wall-clock ceiling (50x the budget, at least 1 s) still ends a call that never gets to run.
pub struct Call {
    /// The tenant the call acts for: `answers` is scoped to it.
    pub tenant: String,
    pub started: Instant,
    /// Time spent in host imports that wait (embeddings): not counted against the deadline.
    pub host_time: Duration,
    pub budget: Duration,
    /// Guest CPU time so far, and where the thread clock stood when last read.
    pub cpu: Duration,
    mark: Option<(std::thread::ThreadId, Duration)>,
    pub timed_out: bool,
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

impl Call {
    fn new(tenant: &str, budget: Duration) -> Self {
        Call {
            tenant: tenant.to_string(),
            started: Instant::now(),
            host_time: Duration::ZERO,
            budget,
            cpu: Duration::ZERO,
            mark: None,
            timed_out: false,
        }
    }

    /// Add the guest CPU time since the last mark (if the call is still on that thread).
    fn account(&mut self) {
        let (thread, now) = (std::thread::current().id(), thread_cpu());
        match self.mark {
            Some((t, then)) if t == thread => self.cpu += now.saturating_sub(then),
            Some(_) => {}
            None => self.cpu += self.started.elapsed().min(TICK * 2),
        }
        self.mark = Some((thread, now));
    }

    /// After a wait in the host: what the thread did meanwhile is not the guest's.
    fn resume(&mut self) {
        self.mark = Some((std::thread::current().id(), thread_cpu()));
    }

    /// Whether the call has used up its budget.
    fn over(&mut self) -> bool {
        self.account();
        let wall = self.started.elapsed().saturating_sub(self.host_time);
        let ceiling = (self.budget * 50).max(Duration::from_secs(1));
        self.cpu >= self.budget || wall >= ceiling
    }
}

impl Default for Call {
    fn default() -> Self {
        Call::new("", Duration::from_millis(5))
    }
}

impl Ctx {
    /// Start a call with `budget` of guest CPU time.
    pub fn begin(&mut self, tenant: &str, budget: Duration) {
        self.call = Call::new(tenant, budget);
        self.limiter.exceeded = false;
    }
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory per instance; remembers that a plugin hit the cap.
pub struct Limiter {
    memory_cap: usize,
    pub exceeded: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

use imports::flatmesh::policy as wit;

impl wit::types::Host for Ctx {}

impl wit::log::Host for Ctx {
    fn log(&mut self, level: wit::log::Level, message: String) -> wasmtime::Result<()> {
        use wit::log::Level;
        let message: String = message.chars().take(2048).collect();
        let plugin = self.plugin.name.as_str();
        match level {
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}

impl wit::clock::Host for Ctx {
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(crate::util::now_ms())
    }
}

impl wit::kv::Host for Ctx {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(self.plugin.kv.get(&key))
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(self.plugin.kv.set(key, value, ttl_ms))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.plugin.kv.delete(&key);
        Ok(())
    }
}

impl wit::counters::Host for Ctx {
    fn add(&mut self, name: String, amount: u64, window_ms: u64) -> wasmtime::Result<u64> {
        Ok(self.plugin.counters.add(&name, amount, window_ms))
    }

    fn sum(&mut self, name: String, window_ms: u64) -> wasmtime::Result<u64> {
        Ok(self.plugin.counters.sum(&name, window_ms))
    }
}

impl wit::embedder::Host for Ctx {
    async fn embed(&mut self, model: String, text: String) -> Result<Vec<f32>, String> {
        let Some(embedder) = self.embedder.clone() else {
            return Err("this agent has no embedder".into());
        };
        let started = Instant::now();
        self.call.account();
        let result = embedder.embed(model, text).await;
        self.call.host_time += started.elapsed();
        self.call.resume();
        result
    }
}

impl wit::answers::Host for Ctx {
    fn get(&mut self, namespace: String, key: String) -> wasmtime::Result<Option<Answer>> {
        Ok(self.answers.get(&self.call.tenant, &namespace, &key))
    }

    fn put(
        &mut self,
        namespace: String,
        key: String,
        answer: Answer,
        vector: Option<Vec<f32>>,
        ttl_ms: u64,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(self
            .answers
            .put(&self.call.tenant, namespace, key, answer, vector, ttl_ms))
    }

    fn nearest(
        &mut self,
        namespace: String,
        vector: Vec<f32>,
        threshold: f32,
    ) -> wasmtime::Result<Option<wit::answers::Neighbour>> {
        Ok(self
            .answers
            .nearest(&self.call.tenant, &namespace, &vector, threshold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_cpu_time_not_waiting() {
        let mut call = Call::new("t", Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!call.over(), "30 ms asleep is not 5 ms of CPU");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!call.over(), "{:?} counted", call.cpu);
        let spinning = Instant::now();
        while !call.over() {
            assert!(spinning.elapsed() < Duration::from_secs(5), "never over");
            std::hint::spin_loop();
        }
        assert!(call.cpu >= Duration::from_millis(5));
    }

    #[test]
    fn a_call_that_never_runs_still_ends_at_the_wall_clock_ceiling() {
        let mut call = Call::new("t", Duration::from_millis(100));
        call.started -= Duration::from_secs(4);
        assert!(!call.over(), "4 s is under the ceiling of 50 x 100 ms");
        call.started -= Duration::from_secs(2);
        assert!(call.over());
        assert!(
            call.cpu < call.budget,
            "ended by the ceiling, not by CPU time"
        );
    }
}
