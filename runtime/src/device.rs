//! Devices a node can hold copies on: host memory, and CUDA GPUs found through the driver
//! (loaded at run time, so the binary runs on machines without one).

use serde::Serialize;

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
    #[test]
    fn discovery_never_panics() {
        // On a machine without a driver this is an error with a reason; with one, a list.
        match super::discover_cuda() {
            Ok(gpus) => assert!(gpus.iter().all(|g| g.total_bytes >= g.free_bytes)),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
}
