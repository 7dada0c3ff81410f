//! The model runtime: engines that load models and run generate and embed on a device.
//!
//! Nothing here knows about HTTP, tenants or the mesh; the agent in `mesh/` drives it.

mod bert;
mod bytes;
pub mod constrain;
pub mod cuda;
pub mod device;
mod engine;
mod error;
mod file;
mod gguf;
mod llm;
mod load;
pub mod sampling;
mod stop;
pub mod template;
pub mod tokenizer;

pub use bert::BertEngine;
pub use device::{Device, DeviceKind, Lane};
pub use engine::{
    ChatMessage, Choice, Embeddings, Engine, FinishReason, GenerateEvent, GenerateRequest,
    Generation, ModelInfo, ModelKind, Prompt, TextDelta, TokenLogprob, TokenText, MAX_CHOICES,
    MAX_TOP_LOGPROBS,
};
pub use error::{Result, RuntimeError};
pub use file::{file_kind, open_regular, read_regular};
pub use llm::{check as check_gguf, kernels, BatchConfig, LlmEngine};
pub use load::{footprint, load, load_image, load_keeping_image, Footprint, Format, Image};
pub use sampling::SamplingParams;
