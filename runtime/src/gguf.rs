//! GGUF files: a bounded reader of the header (metadata and tensor index) that checks every
//! number the file supplies before it sizes anything, and errors that name the file without
//! quoting its bytes.
//!
//! Every count, length and size in a GGUF header comes from the file, which may be crafted.
//! The reader walks the header over the file's bytes (mapped or in memory) and refuses, with a
//! reason, anything that would run past the end of the file, overflow, or cost more memory
//! than any real model needs ([`LIMITS`]); only then does it build the metadata, so a bad
//! file costs no more memory than a good one and never a panic.

use std::{collections::HashMap, path::Path};

use candle_core::quantized::{
    gguf_file::{Content, TensorInfo, Value, VersionedMagic},
    GgmlDType,
};

use crate::{Result, RuntimeError};

/// Bounds on what a GGUF header may hold, well above what real models use (a 262k-token
/// vocabulary, ~300k merges, a few thousand tensors) and far below what would hurt the agent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub tensors: u64,
    pub metadata_keys: u64,
    /// Bytes of one string (a key, a value, a tensor name, an element of an array).
    pub string_bytes: u64,
    /// Elements of one array.
    pub array_elements: u64,
    /// Arrays within arrays.
    pub depth: usize,
    /// What the metadata may take in memory once read, in bytes (each value counts its
    /// in-memory size, strings their bytes too): a 32 MiB file of one-byte array elements
    /// would otherwise take a gigabyte.
    pub metadata_memory: u64,
    /// Elements of one tensor.
    pub tensor_elements: u64,
}

pub const LIMITS: Limits = Limits {
    tensors: 1 << 16,
    metadata_keys: 1 << 16,
    string_bytes: 1 << 24,
    array_elements: 1 << 22,
    depth: 2,
    metadata_memory: 1 << 28,
    tensor_elements: 1 << 40,
};

pub fn open_error(path: &Path, e: std::io::Error) -> RuntimeError {
    match e.kind() {
        std::io::ErrorKind::NotFound => RuntimeError::NotFound(path.to_path_buf()),
        _ => bad_gguf(path, e.to_string()),
    }
}

pub fn bad_gguf(path: &Path, reason: String) -> RuntimeError {
    RuntimeError::BadFormat {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    }
}

/// Open a GGUF file (regular files only) and read its header.
pub fn read_header(path: &Path) -> Result<Content> {
    let (file, _) = crate::file::open_regular(path).map_err(|e| open_error(path, e))?;
    let bytes = crate::bytes::Bytes::map(&file).map_err(|e| open_error(path, e))?;
    read(&bytes, path)
}

/// The header of the GGUF file whose whole bytes are `bytes`, every tensor checked to lie
/// inside them; `path` names the file in errors.
pub fn read(bytes: &[u8], path: &Path) -> Result<Content> {
    parse(bytes, &LIMITS).map_err(|reason| bad_gguf(path, reason))
}

/// The bytes of tensor `t` as stored (its elements were checked to fill whole blocks).
pub fn tensor_bytes(t: &TensorInfo) -> u64 {
    let elements = t.shape.elem_count() as u64;
    elements / t.ggml_dtype.block_size() as u64 * t.ggml_dtype.type_size() as u64
}

type Parsed<T> = std::result::Result<T, String>;

fn parse(bytes: &[u8], limits: &Limits) -> Parsed<Content> {
    let mut r = Reader {
        bytes,
        pos: 0,
        wide: true,
        memory: 0,
        limits,
    };
    if r.take(4, "the magic number").ok() != Some(b"GGUF".as_slice()) {
        return Err("not a GGUF file".into());
    }
    let magic = match r.u32("the version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(format!("GGUF version {v} is not supported (1 to 3 are)")),
    };
    r.wide = magic != VersionedMagic::GgufV1;
    let tensors = r.count("the tensor count", limits.tensors)?;
    let keys = r.count("the metadata key count", limits.metadata_keys)?;
    let mut metadata = HashMap::new();
    for _ in 0..keys {
        let key = r.string("a metadata key")?;
        let ty = r.u32("a metadata type")?;
        let value = r.value(ty, 0).map_err(|e| format!("metadata {key}: {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key} appears twice"));
        }
    }
    let mut tensor_infos = HashMap::new();
    for _ in 0..tensors {
        let name = r.string("a tensor name")?;
        let info = r.tensor().map_err(|e| format!("tensor {name}: {e}"))?;
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(format!("tensor {name} appears twice"));
        }
    }
    let alignment = alignment(&metadata)?;
    let tensor_data_offset = (r.pos as u64)
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or("the tensor data offset overflows")?;
    for (name, t) in &tensor_infos {
        let end = tensor_data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(tensor_bytes(t)));
        if end.is_none_or(|end| end > bytes.len() as u64) {
            return Err(format!(
                "tensor {name}: its data runs past the end of the file"
            ));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

/// `general.alignment`: a power of two (32 when absent, as the format says).
fn alignment(metadata: &HashMap<String, Value>) -> Parsed<u64> {
    let Some(v) = metadata.get("general.alignment") else {
        return Ok(32);
    };
    match v.to_u32() {
        Ok(a) if a.is_power_of_two() && a <= 1 << 16 => Ok(a as u64),
        _ => Err(format!(
            "general.alignment {v:?} is not a power of two up to 65536"
        )),
    }
}

/// A cursor over the header, charging what it reads against the limits.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Lengths and counts are 64-bit (versions 2 and 3) rather than 32-bit (version 1).
    wide: bool,
    memory: u64,
    limits: &'a Limits,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Parsed<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "{what} ({n} bytes at byte {}) runs past the end of the file",
                self.pos
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parsed<[u8; N]> {
        let b = self.take(N as u64, what)?;
        Ok(b.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Parsed<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Parsed<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length or count, in the width of this version.
    fn length(&mut self, what: &str) -> Parsed<u64> {
        match self.wide {
            true => self.u64(what),
            false => self.u32(what).map(u64::from),
        }
    }

    fn count(&mut self, what: &str, max: u64) -> Parsed<u64> {
        let n = self.length(what)?;
        if n > max {
            return Err(format!("{what} {n} is more than the limit of {max}"));
        }
        Ok(n)
    }

    /// Count `bytes` of memory the metadata will take.
    fn charge(&mut self, bytes: u64) -> Parsed<()> {
        self.memory = self.memory.saturating_add(bytes);
        if self.memory > self.limits.metadata_memory {
            return Err(format!(
                "the metadata would take more than {} MiB of memory",
                self.limits.metadata_memory >> 20
            ));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Parsed<String> {
        let len = self.count(&format!("the length of {what}"), self.limits.string_bytes)?;
        let raw = self.take(len, what)?;
        self.charge(len)?;
        // Strings should not be NUL-terminated, but some writers do it.
        let end = raw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Parsed<Value> {
        self.charge(std::mem::size_of::<Value>() as u64)?;
        Ok(match ty {
            0 => Value::U8(self.array::<1>("a u8")?[0]),
            1 => Value::I8(self.array::<1>("an i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("a u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("an i16")?)),
            4 => Value::U32(self.u32("a u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("an i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("an f32")?)),
            7 => match self.array::<1>("a bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{b} is not a bool")),
            },
            8 => Value::String(self.string("a string")?),
            9 => {
                if depth >= self.limits.depth {
                    return Err(format!(
                        "arrays nest deeper than {} levels",
                        self.limits.depth
                    ));
                }
                let ty = self.u32("an array's element type")?;
                let n = self.count("an array's length", self.limits.array_elements)?;
                // Each element takes at least one byte of the file: a length beyond the
                // bytes left is refused before anything is allocated for it.
                let left = (self.bytes.len() - self.pos) as u64;
                if n > left {
                    return Err(format!(
                        "an array of {n} elements is longer than the {left} bytes left"
                    ));
                }
                self.charge(n.saturating_mul(std::mem::size_of::<Value>() as u64))?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("a u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("an i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("an f64")?)),
            t => return Err(format!("value type {t} is not a GGUF type")),
        })
    }

    /// A tensor's dimensions, type and offset, its element count checked.
    fn tensor(&mut self) -> Parsed<TensorInfo> {
        let n_dims = self.u32("the dimension count")?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("{n_dims} dimensions (1 to 4 are allowed)"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.length("a dimension")?;
            if d == 0 {
                return Err("a dimension is 0".into());
            }
            dims.push(d);
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= self.limits.tensor_elements)
            .ok_or_else(|| {
                format!(
                    "dimensions {dims:?} hold more than {} elements",
                    self.limits.tensor_elements
                )
            })?;
        let ty = self.u32("the tensor type")?;
        let ggml_dtype = dtype(ty).ok_or_else(|| format!("tensor type {ty} is not known"))?;
        // Rows are the innermost dimension (first in the file): each fills whole blocks.
        if dims[0] % ggml_dtype.block_size() as u64 != 0 {
            return Err(format!(
                "rows of {} elements do not fill {ggml_dtype:?} blocks of {}",
                dims[0],
                ggml_dtype.block_size()
            ));
        }
        debug_assert!(elements <= usize::MAX as u64);
        let offset = self.u64("the tensor offset")?;
        // The file lists the innermost dimension first; the shape lists it last.
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        Ok(TensorInfo {
            ggml_dtype,
            shape: shape.into(),
            offset,
        })
    }
}

/// The tensor types of GGUF (ggml's numbering) that the reader knows.
fn dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
