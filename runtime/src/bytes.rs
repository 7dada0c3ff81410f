//! The bytes a model's weights are read from in place: a mapped file, or a warm image.
#![allow(unsafe_code)]

use std::{fs::File, ops::Deref, sync::Arc};

/// A GGUF file's bytes, shared, never copied or converted.
#[derive(Clone)]
pub enum Bytes {
    /// The file mapped read-only: pages come from the page cache on first touch.
    Mapped(Arc<memmap2::Mmap>),
    /// A file read into memory once (the warm tier keeps these, and copies share them).
    Shared(Arc<Vec<u8>>),
}

impl Bytes {
    /// Map `file` read-only.
    pub fn map(file: &File) -> std::io::Result<Bytes> {
        // SAFETY: the mapping is read-only and private to this process. Model files are
        // opened as regular files (never devices or pipes) from the operator's model roots,
        // which the agent does not write to; a file truncated underneath a running copy would
        // fault on access, the same contract every mmap-based model server makes. Loads
        // that must survive files changing read them into memory instead (`Shared`).
        let map = unsafe { memmap2::Mmap::map(file)? };
        Ok(Bytes::Mapped(Arc::new(map)))
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Shared(v) => v,
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bytes::Mapped(m) => write!(f, "Mapped({} bytes)", m.len()),
            Bytes::Shared(v) => write!(f, "Shared({} bytes)", v.len()),
        }
    }
}
