//! Devices a node can hold copies on: host memory, and CUDA GPUs found through the driver
//! (loaded at run time, so the binary runs on machines without one).
//!
//! A `Device` is a memory pool with a capacity, the bytes its copies use, and an execution
//! lane: the turn an engine takes around each forward pass on it.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, MutexGuard, OnceLock,
};

use serde::Serialize;

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum DeviceKind {
    /// Host memory, computed on by the CPU cores.
    Host,
    /// A budget on a CUDA GPU (several budgets may share one GPU). LLM copies run on it
    /// through the `Cuda` backend (UNVERIFIED on a GPU: see `cuda/README.md`).
    Cuda { ordinal: usize },
}

/// One forward step at a time on an execution lane, computed by the lane's worker pool.
/// On the host the pool has a thread per core, created once when the first step runs, and
/// steps of different copies take turns: a copy batches its own sequences, so two copies
/// stepping at once would only split the same cores. Host devices share one lane: they are
/// memory pools over the same cores.
#[derive(Clone, Default)]
pub struct Lane {
    turn: Arc<Mutex<()>>,
    workers: Arc<OnceLock<rayon::ThreadPool>>,
    /// A GPU's lane: the step runs on the calling thread (the GPU computes), no host pool.
    gpu: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lane")
    }
}

impl Lane {
    pub fn new() -> Self {
        Lane::default()
    }

    /// The lane of one GPU: budgets on the same GPU share it.
    pub fn gpu() -> Self {
        Lane {
            gpu: true,
            ..Lane::default()
        }
    }

    /// Wait for the lane's turn; it is held until the guard drops.
    pub fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The threads that compute on this lane (one per core).
    pub fn threads(&self) -> usize {
        match self.gpu {
            true => 1,
            false => self.workers().current_num_threads(),
        }
    }

    /// Run `f` in the lane's turn, on its worker pool (parallel work inside `f` uses it);
    /// on a GPU's lane, on the calling thread.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let _turn = self.turn();
        match self.gpu {
            true => f(),
            false => self.workers().install(f),
        }
    }

    fn workers(&self) -> &rayon::ThreadPool {
        self.workers.get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("flatmesh-cpu-{i}"))
                .build()
                .expect("the worker threads start")
        })
    }

    /// Whether two handles are the same lane.
    pub fn same(&self, other: &Lane) -> bool {
        Arc::ptr_eq(&self.turn, &other.turn)
    }
}

/// A memory pool copies are loaded onto, with its execution lane.
#[derive(Debug)]
pub struct Device {
    kind: DeviceKind,
    name: String,
    capacity: u64,
    /// Bytes of copies on it (and reservations of loads in progress).
    used: AtomicU64,
    lane: Lane,
}

impl Device {
    /// A device of `capacity` bytes whose engines take turns on `lane`.
    pub fn new(kind: DeviceKind, name: impl Into<String>, capacity: u64, lane: Lane) -> Self {
        Device {
            kind,
            name: name.into(),
            capacity,
            used: AtomicU64::new(0),
            lane,
        }
    }

    /// A host-memory device with a lane of its own (tests, tools).
    pub fn host(name: impl Into<String>, capacity: u64) -> Self {
        Device::new(DeviceKind::Host, name, capacity, Lane::new())
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }

    pub fn lane(&self) -> &Lane {
        &self.lane
    }

    /// The lane an engine loaded onto this device takes turns on.
    pub fn engine_lane(&self) -> crate::Result<Lane> {
        Ok(self.lane.clone())
    }

    /// The lane of an engine that computes on the host only (the BERT embedding engine):
    /// refused on a GPU's budget, whose bytes it would not use.
    pub fn host_lane(&self) -> crate::Result<Lane> {
        match self.kind {
            DeviceKind::Host => Ok(self.lane.clone()),
            DeviceKind::Cuda { .. } => Err(crate::RuntimeError::Unsupported(
                "an embedding model on a CUDA device (embedding models run on host devices)",
            )),
        }
    }

    /// The driver's (free, total) bytes of this device's GPU; `None` on the host or without
    /// a driver. Several budgets on one GPU report the same numbers.
    pub fn driver_memory(&self) -> Option<(u64, u64)> {
        match self.kind {
            DeviceKind::Host => None,
            DeviceKind::Cuda { ordinal } => crate::cuda::gpu::mem_info(ordinal).ok(),
        }
    }

    /// Count `bytes` more as used (a reservation or a loaded copy).
    pub fn reserve(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Count `bytes` as no longer used. Never goes below zero (a mistake in the caller's
    /// accounting is logged, not a panic).
    pub fn release(&self, bytes: u64) {
        let prev = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            })
            .unwrap_or_default();
        if prev < bytes {
            tracing::error!(device = %self.name, used = prev, released = bytes, "Released more bytes than were in use");
        }
    }
}

/// A GPU as the CUDA driver reports it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// The CUDA GPUs of this machine, or why there are none (no driver, no device). Never
/// panics: cudarc panics when it cannot load the driver library, which is caught here.
pub fn discover_cuda() -> Result<Vec<GpuInfo>, String> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(|| -> Result<Vec<GpuInfo>, String> {
        use cudarc::driver::CudaContext;
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
        (0..count.max(0) as usize)
            .map(|i| {
                let ctx = CudaContext::new(i).map_err(|e| format!("GPU {i}: {e}"))?;
                let name = ctx.name().unwrap_or_else(|_| format!("GPU {i}"));
                let (free, total) = ctx.mem_get_info().map_err(|e| format!("GPU {i}: {e}"))?;
                Ok(GpuInfo {
                    ordinal: i,
                    name,
                    total_bytes: total as u64,
                    free_bytes: free as u64,
                })
            })
            .collect()
    });
    std::panic::set_hook(quiet);
    match found {
        Ok(r) => r,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .map(|m| {
                m.split(" - searched")
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_else(|| "the CUDA driver library could not be loaded".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_bytes_go_up_and_down_and_never_below_zero() {
        let d = Device::host("host0", 100);
        d.reserve(60);
        assert_eq!((d.used(), d.free()), (60, 40));
        d.release(60);
        d.release(1);
        assert_eq!(d.used(), 0);
    }

    #[test]
    fn a_lane_gives_one_turn_at_a_time() {
        let lane = Lane::new();
        let other = lane.clone();
        assert!(lane.same(&other));
        let turn = lane.turn();
        assert!(other.turn.try_lock().is_err());
        drop(turn);
        assert!(other.turn.try_lock().is_ok());
    }

    #[test]
    fn forward_passes_take_the_lane_of_the_device() {
        use crate::{Format, GenerateRequest, Prompt, SamplingParams};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2-135m-instruct/model.gguf");
        let device = Device::host("host0", u64::MAX);
        let engine = crate::load(&path, Format::Gguf, &device, Default::default()).unwrap();
        let turn = device.lane().turn();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let req = GenerateRequest {
                prompt: Prompt::Text("Hello".into()),
                max_tokens: Some(1),
                sampling: SamplingParams::default(),
                stop: vec![],
                n: 1,
                logprobs: None,
            };
            let g = engine.generate(&req, &mut |_| std::ops::ControlFlow::Continue(()));
            tx.send(g.map(|g| g.completion_tokens)).unwrap();
        });
        let waited = rx.recv_timeout(std::time::Duration::from_millis(300));
        assert!(
            waited.is_err(),
            "a forward pass ran without the lane's turn"
        );
        drop(turn);
        assert_eq!(rx.recv().unwrap().unwrap(), 1);
        worker.join().unwrap();
    }

    #[test]
    fn without_a_driver_a_load_onto_a_gpu_fails_with_a_reason_and_no_panic() {
        use crate::Format;
        if crate::cuda::gpu::driver_present() {
            return;
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2-135m-instruct/model.gguf");
        let cuda = Device::new(
            DeviceKind::Cuda { ordinal: 0 },
            "gpu0",
            1 << 30,
            Lane::gpu(),
        );
        assert_eq!(cuda.driver_memory(), None);
        let refused = crate::load(&path, Format::Gguf, &cuda, Default::default())
            .err()
            .unwrap();
        assert_eq!(refused.kind(), "inference_error");
        assert!(refused.to_string().contains("gpu0 (GPU 0)"), "{refused}");
        let bert =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
        let refused = crate::load(&bert, Format::BertSafetensors, &cuda, Default::default())
            .err()
            .unwrap();
        assert_eq!(refused.kind(), "unsupported_operation");
    }

    #[test]
    fn discovery_never_panics() {
        // On a machine without a driver this is an error with a reason; with one, a list.
        match super::discover_cuda() {
            Ok(gpus) => assert!(gpus.iter().all(|g| g.total_bytes >= g.free_bytes)),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
}
