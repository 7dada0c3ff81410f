//! The CUDA kernels of the LLM engine: CUDA C sources embedded in the binary, compiled at run
//! time by NVRTC for the device's architecture, and their launch configurations.
//!
//! What is checked without a GPU: every file compiles with NVRTC to CUBIN (`tests`), and every
//! kernel computes the CPU backend's numbers when the same source runs on the host under the
//! launch emulation of `runtime/cuda-emu` (`emu`). See README.md beside this file.

pub mod backend;
pub mod copy;
pub mod gpu;
pub mod nvrtc;
pub mod pagein;

#[cfg(test)]
mod backend_tests;
#[cfg(test)]
mod emu;
#[cfg(test)]
mod emu_tests;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod sample_tests;
#[cfg(test)]
mod tests;

use crate::llm::kernels::QType;

/// One `.cu` file and the kernels (`extern "C"` names) it defines.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub file: &'static str,
    pub text: &'static str,
    pub kernels: &'static [&'static str],
}

/// Headers the sources include, by the name they include them as.
pub const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("weights.cuh", include_str!("kernels/weights.cuh")),
];

/// Every kernel source.
pub const SOURCES: &[Source] = &[
    Source {
        file: "quant.cu",
        text: include_str!("kernels/quant.cu"),
        kernels: &["quantize_q8", "quantize_q8k", "to_f16"],
    },
    Source {
        file: "matvec.cu",
        text: include_str!("kernels/matvec.cu"),
        kernels: &[
            "matvec_f32",
            "matvec_f16",
            "matvec_q4_0",
            "matvec_q4_1",
            "matvec_q5_0",
            "matvec_q5_1",
            "matvec_q8_0",
            "matvec_q4_k",
            "matvec_q5_k",
            "matvec_q6_k",
            "embed_f32",
            "embed_f16",
            "embed_q4_0",
            "embed_q4_1",
            "embed_q5_0",
            "embed_q5_1",
            "embed_q8_0",
            "embed_q4_k",
            "embed_q5_k",
            "embed_q6_k",
        ],
    },
    Source {
        file: "norm.cu",
        text: include_str!("kernels/norm.cu"),
        kernels: &["rms_norm", "rope", "silu_mul", "add", "add_bias"],
    },
    Source {
        file: "attention.cu",
        text: include_str!("kernels/attention.cu"),
        kernels: &["kv_store", "attention"],
    },
    Source {
        file: "sample.cu",
        text: include_str!("kernels/sample.cu"),
        kernels: &["argmax", "apply_penalties", "sample"],
    },
];

/// The oldest GPU architecture the kernels are built and tested for (Turing; CUDA 13 supports
/// nothing older, and `__dp4a` needs 6.1).
pub const OLDEST_ARCH: u32 = 75;

/// Largest head width of the attention kernel.
pub const MAX_HEAD_DIM: usize = 128;

/// Grid and block of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

fn launch(grid: [usize; 2], block: u32) -> Launch {
    Launch {
        grid: [grid[0].max(1) as u32, grid[1].max(1) as u32, 1],
        block: [block, 1, 1],
    }
}

impl Launch {
    /// `matvec_*`: 4 rows (a warp each) per block, a grid row per 8 tokens.
    pub fn matvec(rows: usize, tokens: usize) -> Launch {
        launch([rows.div_ceil(4), tokens.div_ceil(8)], 128)
    }

    /// `quantize_q8`: a warp per 32 values; `quantize_q8k`: a block per 256.
    pub fn quantize(cols: usize, tokens: usize) -> Launch {
        launch([cols.div_ceil(256), tokens], 256)
    }

    /// One block of 256 threads per row (`embed_*`, `rms_norm`, `rope`, `kv_store`, `argmax`,
    /// `sample`).
    pub fn per_row(rows: usize) -> Launch {
        launch([rows, 1], 256)
    }

    /// One thread per element (`silu_mul`, `add`, `add_bias`, `to_f16`, `apply_penalties`).
    pub fn elementwise(n: usize) -> Launch {
        launch([n.div_ceil(256), 1], 256)
    }

    /// `attention`: a block of 128 threads per head and token.
    pub fn attention(heads: usize, tokens: usize) -> Launch {
        launch([heads, tokens], 128)
    }
}

/// Whether the attention kernel takes heads of `head_dim` values.
pub fn head_dim_supported(head_dim: usize) -> bool {
    head_dim <= MAX_HEAD_DIM && head_dim.is_multiple_of(2) && MAX_HEAD_DIM.is_multiple_of(head_dim)
}

/// The `matvec_*` and `embed_*` kernel suffix of a weight type.
pub fn suffix(q: QType) -> &'static str {
    match q {
        QType::F32 => "f32",
        QType::F16 => "f16",
        QType::Q4_0 => "q4_0",
        QType::Q4_1 => "q4_1",
        QType::Q5_0 => "q5_0",
        QType::Q5_1 => "q5_1",
        QType::Q8_0 => "q8_0",
        QType::Q4K => "q4_k",
        QType::Q5K => "q5_k",
        QType::Q6K => "q6_k",
    }
}
