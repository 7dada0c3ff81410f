//! A copy of an LLM on a GPU: the `Cuda` backend the engine's step loop drives, opened on the
//! device's GPU with the copy's KV pool there. UNVERIFIED on a GPU (see README.md).

use super::backend::Cuda;
use super::gpu::Gpu;
use crate::llm::batch::BatchConfig;
use crate::llm::kv::KvPool;
use crate::llm::model::Model;
use crate::{Result, RuntimeError};

/// The backend of a copy of `model` on GPU `ordinal` (device `device`): weights paged in, a
/// KV pool of `config.kv_tokens` positions and a step's buffers on the GPU. Out of memory
/// fails the load with what could not be allocated; nothing of it stays on the GPU.
pub fn backend(ordinal: usize, device: &str, model: &Model, config: &BatchConfig) -> Result<Cuda> {
    let s = &model.shape;
    if !super::head_dim_supported(s.head_dim) {
        return Err(RuntimeError::Unsupported(
            "this head width on a CUDA device",
        ));
    }
    let gpu = Gpu::new(ordinal)
        .map_err(|e| RuntimeError::Inference(format!("{device} (GPU {ordinal}): {e}")))?;
    let pool = KvPool::blocks_only(config.kv_tokens, config.block_tokens, s.layers, s.kv_dim())
        .with_prefix_cache(config.prefix_cache);
    let started = std::time::Instant::now();
    let cuda = Cuda::new(gpu, model, pool, config.step_tokens)
        .map_err(|e| RuntimeError::Inference(format!("{device} (GPU {ordinal}): {e}")))?;
    tracing::info!(
        device,
        gpu = ordinal,
        bytes = cuda.held_bytes(),
        weights = model.bytes.len(),
        seconds = started.elapsed().as_secs_f64(),
        "Paged a copy into GPU memory"
    );
    Ok(cuda)
}
