//! GGUF files: opening one (regular files only), reading its header, and errors that name
//! the file without quoting its bytes.

use std::{fs::File, io::BufReader, path::Path};

use candle_core::quantized::gguf_file;

use crate::{Result, RuntimeError};

pub fn open_error(path: &Path, e: std::io::Error) -> RuntimeError {
    match e.kind() {
        std::io::ErrorKind::NotFound => RuntimeError::NotFound(path.to_path_buf()),
        _ => bad_gguf(path, e.to_string()),
    }
}

/// A header that does not parse. A wrong magic number is reported as "not a GGUF file",
/// never with the bytes read: the file may be anything, and errors reach clients.
pub fn header_error(path: &Path, e: candle_core::Error) -> RuntimeError {
    let reason = e.to_string();
    if reason.contains("magic") {
        bad_gguf(path, "not a GGUF file".into())
    } else {
        bad_gguf(path, reason)
    }
}

pub fn bad_gguf(path: &Path, reason: String) -> RuntimeError {
    RuntimeError::BadFormat {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    }
}

/// Open a GGUF file and read its header (metadata and tensor index), leaving the reader
/// positioned for the tensor data.
pub fn read_header(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    let (file, _) = crate::file::open_regular(path).map_err(|e| open_error(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let ct = gguf_file::Content::read(&mut reader).map_err(|e| header_error(path, e))?;
    Ok((ct, reader))
}
