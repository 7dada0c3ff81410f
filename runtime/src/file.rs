//! Opening files without blocking: regular files only, read within a size limit.

use std::path::Path;

/// Open a file for reading only if it is a regular file, without ever blocking on it: the
/// open is non-blocking (a named pipe opens at once instead of waiting for a writer) and the
/// type is checked on the open file, so a FIFO, a device (`/dev/zero`) or a directory is
/// refused with an error saying what it is. Returns the file and its length.
pub fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", file_kind(&meta.file_type())),
        ));
    }
    Ok((file, meta.len()))
}

/// Read a whole regular file of at most `max` bytes (see [`open_regular`]); memory is
/// bounded by `max` even if the file grows while it is read.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    let too_large = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{len} bytes is more than the limit of {max} bytes"),
        )
    };
    if len > max {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// What a file is, in words, for errors.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_and_a_fifo_never_blocks() {
        let dir = std::env::temp_dir().join(format!("flatmesh-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("pipe");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let started = std::time::Instant::now();
        let e = open_regular(&fifo).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.to_string().contains("a named pipe"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        assert!(open_regular(&dir)
            .unwrap_err()
            .to_string()
            .contains("a directory"));
        let file = dir.join("f");
        std::fs::write(&file, [7u8; 100]).unwrap();
        assert_eq!(read_regular(&file, 100).unwrap().len(), 100);
        let e = read_regular(&file, 99).unwrap_err();
        assert!(
            e.to_string().contains("more than the limit of 99 bytes"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
