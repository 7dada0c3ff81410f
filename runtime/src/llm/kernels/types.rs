//! The storage types the kernels know: weight types (ggml ids, block sizes) and the
//! activation types they pair with.

/// Elements in a K-quant super-block.
pub const QK_K: usize = 256;

/// A weight storage type (ggml type ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QType {
    /// Every supported weight type.
    pub const ALL: [QType; 10] = [
        QType::F32,
        QType::F16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ];

    /// The type for a ggml type id, if supported.
    pub fn from_ggml(id: u32) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// The ggml type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q5K => 13,
            QType::Q6K => 14,
        }
    }

    /// The ggml name ("Q4_1", "Q4_K", "F16", ...).
    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q8_0 => "Q8_0",
            QType::Q4K => "Q4_K",
            QType::Q5K => "Q5_K",
            QType::Q6K => "Q6_K",
        }
    }

    /// Values per block: 1 for F32/F16, 32 or 256.
    pub fn block_elems(self) -> usize {
        match self {
            QType::F32 | QType::F16 => 1,
            QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 => 2,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Bytes in a row of `n` values; `n` must be a multiple of [`QType::block_elems`].
    pub fn row_bytes(self, n: usize) -> usize {
        assert!(
            n.is_multiple_of(self.block_elems()),
            "{n} is not a multiple of the {} block",
            self.name()
        );
        n / self.block_elems() * self.block_bytes()
    }

    /// The activation format this weight type is multiplied with (llama.cpp's `vec_dot_type`).
    pub fn act(self) -> Act {
        match self {
            QType::F32 => Act::F32,
            QType::F16 => Act::F16,
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => Act::Q8_0,
            QType::Q4_1 | QType::Q5_1 => Act::Q8_1,
            QType::Q4K | QType::Q5K | QType::Q6K => Act::Q8K,
        }
    }
}

/// An activation row format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// f16 d; i8 qs[32] (34 bytes per 32 values).
    Q8_0,
    /// f16 d; f16 s = d * sum(qs); i8 qs[32] (36 bytes per 32 values).
    Q8_1,
    /// f32 d; i8 qs[256]; i16 bsums[16] (292 bytes per 256 values).
    Q8K,
    /// Plain f16 values.
    F16,
    /// Plain f32 values.
    F32,
}

impl Act {
    /// Values per block.
    pub fn block_elems(self) -> usize {
        match self {
            Act::Q8_0 | Act::Q8_1 => 32,
            Act::Q8K => QK_K,
            Act::F16 | Act::F32 => 1,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Act::Q8_0 => 34,
            Act::Q8_1 => 36,
            Act::Q8K => 292,
            Act::F16 => 2,
            Act::F32 => 4,
        }
    }

    /// Bytes in a row of `n` values; `n` must be a multiple of the block.
    pub fn row_bytes(self, n: usize) -> usize {
        assert!(
            n.is_multiple_of(self.block_elems()),
            "{n} is not a multiple of the {self:?} block"
        );
        n / self.block_elems() * self.block_bytes()
    }
}

/// Quantized activation rows' block scales as f32 (`d`, and `s` for `Q8_1`), row after row:
/// read once per matrix product rather than once per weight row. Empty for other types
/// (their kernels read their scales themselves).
#[derive(Debug, Default)]
pub struct ActScales {
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
}

impl ActScales {
    /// The scales of `rows` activation rows of `n` values quantized as `act`, back to back.
    pub fn of(act: Act, acts: &[u8], n: usize, rows: usize) -> ActScales {
        let (has_s, bb) = match act {
            Act::Q8_0 => (false, 34),
            Act::Q8_1 => (true, 36),
            _ => return ActScales::default(),
        };
        let f = |b: &[u8]| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let blocks = acts[..act.row_bytes(n) * rows].chunks_exact(bb);
        let d = blocks.clone().map(&f).collect::<Vec<_>>();
        let s = match has_s {
            true => blocks.map(|b| f(&b[2..])).collect(),
            false => vec![0.0; d.len()],
        };
        ActScales { d, s }
    }
}
