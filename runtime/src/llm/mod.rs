//! The LLM engine: llama-family GGUF weights used in place, quantized SIMD kernels chosen at
//! run time, a paged KV cache and continuous batching.
//!
//! Layers, top down: `engine` (the `Engine` a copy is) → `batch` (its step loop) →
//! `forward` (one pass over a batch, over the `Backend` trait) → `cpu` (the host backend) →
//! `kernels` (quantized dot products; the only unsafe code besides the crate's `bytes` (the mmap)).

pub(crate) mod batch;
mod choices;
pub(crate) mod cpu;
pub(crate) mod engine;
#[cfg(test)]
pub(crate) mod fixture;
pub(crate) mod forward;
pub mod kernels;
pub(crate) mod kv;
pub(crate) mod model;
mod prefix;

pub use batch::BatchConfig;
pub use engine::{check, footprint, LlmEngine, TextParts};

#[cfg(test)]
mod choice_tests;
#[cfg(test)]
mod tests;
