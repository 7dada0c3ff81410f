//! One GPU through cudarc: its context with every kernel loaded, device memory as the
//! page-in layer sees it (`pagein::DeviceMemory`), host memory page-locked for a page-in,
//! and the driver's own count of used memory. UNVERIFIED: built in CI, not yet run on a GPU.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError,
};
use cudarc::nvrtc::Ptx;

use super::pagein::{self, Counted, DeviceMemory, Failure, Held};
use super::{nvrtc, SOURCES};

/// What went wrong setting up or running the backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error(transparent)]
    Nvrtc(#[from] nvrtc::NvrtcError),
    #[error(transparent)]
    Memory(#[from] pagein::MemError),
}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

/// Every source compiled for one architecture, once per process.
fn cubins(arch: u32) -> Result<Arc<Vec<nvrtc::Cubin>>, CudaError> {
    type Cache = Mutex<HashMap<u32, Arc<Vec<nvrtc::Cubin>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&arch) {
        return Ok(c.clone());
    }
    let built: Vec<nvrtc::Cubin> = SOURCES
        .iter()
        .map(|s| nvrtc::compile(s, arch))
        .collect::<Result<_, _>>()?;
    let built = Arc::new(built);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    Ok(cache.entry(arch).or_insert(built).clone())
}

/// Whether the driver library can be opened (cudarc panics at the first call into a library
/// it cannot open, so this is asked first).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the driver library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// The driver's (free, total) bytes of GPU `ordinal`, or why not.
pub fn mem_info(ordinal: usize) -> Result<(u64, u64), CudaError> {
    if !driver_present() {
        return Err(CudaError::Driver("no CUDA driver library".into()));
    }
    let ctx = CudaContext::new(ordinal)?;
    let (free, total) = ctx.mem_get_info()?;
    Ok((free as u64, total as u64))
}

/// One GPU with the kernels loaded.
pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(super) funcs: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        if !driver_present() {
            return Err(CudaError::Driver(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = (major * 10 + minor) as u32;
        let mut funcs = HashMap::new();
        for (src, cubin) in SOURCES.iter().zip(cubins(arch)?.iter()) {
            let module = ctx.load_module(Ptx::from_binary(cubin.image.clone()))?;
            for k in src.kernels {
                funcs.insert(*k, module.load_function(k)?);
            }
        }
        // A stream of the copy's own: its page-in and steps are ordered on it, and other
        // copies on the same GPU do not wait behind them.
        let stream = ctx.new_stream()?;
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            funcs,
        })
    }

    pub fn memory(&self) -> Mem {
        Mem(self.stream.clone())
    }
}

/// Device memory of one stream, for the page-in layer.
#[derive(Clone)]
pub struct Mem(pub Arc<CudaStream>);

fn failure(e: DriverError) -> Failure {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Failure::OutOfMemory
    } else {
        Failure::Other(e.to_string())
    }
}

impl DeviceMemory for Mem {
    type Block = CudaSlice<u8>;

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>, Failure> {
        // SAFETY: the memory is uninitialised; every user writes before it reads (the weights
        // are copied in, buffers are written by the kernel that produces them, KV positions
        // are stored before attention reads them).
        unsafe { self.0.alloc::<u8>(bytes) }.map_err(failure)
    }

    fn copy_in(&self, dst: &mut CudaSlice<u8>, offset: usize, src: &[u8]) -> Result<(), Failure> {
        let mut view = dst.slice_mut(offset..offset + src.len());
        self.0.memcpy_htod(src, &mut view).map_err(failure)
    }

    fn finish(&self) -> Result<(), Failure> {
        self.0.synchronize().map_err(failure)
    }
}

/// The device address of an allocation.
pub fn addr(stream: &CudaStream, s: &CudaSlice<u8>) -> u64 {
    s.device_ptr(stream).0
}

/// Host memory page-locked while it lives (plain pinned memory, not write-combined: the CPU
/// reads it too), so the copies from it run asynchronously at the link's speed.
pub struct Pinned {
    ptr: *mut std::ffi::c_void,
    registered: bool,
}

impl Pinned {
    /// Lock `bytes` in place; on failure the copies run from pageable memory (slower, still
    /// correct), which is logged.
    pub fn new(ctx: &CudaContext, bytes: &[u8]) -> Pinned {
        let ptr = bytes.as_ptr() as *mut std::ffi::c_void;
        let registered = !bytes.is_empty()
            && ctx.bind_to_thread().is_ok()
            // SAFETY: `bytes` stays alive and unmoved while this guard lives (the caller holds
            // both); registration only locks its pages.
            && unsafe { sys::cuMemHostRegister_v2(ptr, bytes.len(), 0) }
                == sys::CUresult::CUDA_SUCCESS;
        if !registered {
            tracing::warn!(
                bytes = bytes.len(),
                "Could not page-lock the image; copying from pageable memory"
            );
        }
        Pinned { ptr, registered }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.registered {
            // SAFETY: registered by `new` with this address; the copies from it are done
            // (the page-in waited for them before dropping this).
            unsafe { sys::cuMemHostUnregister(self.ptr) };
        }
    }
}

/// A device buffer that grows to what a step needs, counted in the copy's bytes.
#[derive(Default)]
pub struct DBuf {
    pub mem: Option<Counted<CudaSlice<u8>>>,
    pub ptr: u64,
}

/// `b` with room for `bytes` (reallocated, contents lost, when smaller); its address. A
/// failure is kept in `error`.
pub fn grow(
    mem: &Mem,
    held: &Held,
    b: &mut DBuf,
    bytes: usize,
    error: &mut Option<CudaError>,
) -> u64 {
    if b.mem.as_ref().is_some_and(|m| m.len() >= bytes as u64) {
        return b.ptr;
    }
    b.mem = None;
    match pagein::alloc(mem, held, bytes, "a step's buffers") {
        Ok(m) => {
            b.ptr = addr(&mem.0, &m.block);
            b.mem = Some(m);
        }
        Err(e) => {
            error.get_or_insert(e.into());
        }
    }
    b.ptr
}
