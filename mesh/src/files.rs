//! Files that admin API callers name (models, plugins): confined to configured roots, only
//! regular files of bounded size, checked without ever opening a pipe or a device.

use std::path::{Component, Path, PathBuf};

use flatmesh_runtime::Format;

/// Where API-named files may come from, and how large model files may be.
#[derive(Debug, Clone, Default)]
pub struct FileRules {
    /// A model path registered through the API must lie under one of these.
    pub model_roots: Vec<PathBuf>,
    /// A plugin path given in a reload through the API must lie under one of these.
    pub plugin_roots: Vec<PathBuf>,
    /// Largest model file (each file of a model directory counts on its own).
    pub max_model_file_bytes: u64,
}

/// Resolve `path` (a relative one against `base`) to its canonical form and check that it
/// lies under one of `roots`. `what` names the field in errors. Blocking (it resolves
/// symlinks): call it off the async runtime.
pub fn confine(what: &str, path: &Path, base: &Path, roots: &[PathBuf]) -> Result<PathBuf, String> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{what}: {} must not contain '..'", path.display()));
    }
    let joined = if path.is_relative() {
        base.join(path)
    } else {
        path.to_path_buf()
    };
    let real = joined
        .canonicalize()
        .map_err(|e| format!("{what}: cannot resolve {}: {e}", joined.display()))?;
    let inside = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| real.starts_with(r));
    if !inside {
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(format!(
            "{what}: {} is outside the allowed directories ({})",
            joined.display(),
            if roots.is_empty() {
                "none are configured".to_string()
            } else {
                roots.join(", ")
            }
        ));
    }
    Ok(real)
}

/// Check, by metadata only, that `path` is a regular file of at most `max` bytes.
pub fn check_regular(what: &str, path: &Path, max: u64) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{what}: {} is not a regular file ({})",
            path.display(),
            flatmesh_runtime::file_kind(&meta.file_type())
        ));
    }
    if meta.len() > max {
        return Err(format!(
            "{what}: {} is {} bytes, more than the limit of {max} bytes",
            path.display(),
            meta.len()
        ));
    }
    Ok(())
}

/// The files a model of `format` at `path` is read from, each a regular file within `max`
/// bytes (a BERT directory must be a directory; its optional files are checked when present).
pub fn check_model(path: &Path, format: Format, max: u64) -> Result<(), String> {
    match format {
        Format::Gguf => check_regular("path", path, max),
        Format::BertSafetensors => {
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("path: cannot read {}: {e}", path.display()))?;
            if !meta.is_dir() {
                return Err(format!(
                    "path: {} is not a model directory ({})",
                    path.display(),
                    flatmesh_runtime::file_kind(&meta.file_type())
                ));
            }
            for (name, required) in [
                ("model.safetensors", true),
                ("config.json", true),
                ("tokenizer.json", true),
                ("pooling.json", false),
            ] {
                let file = path.join(name);
                if required || std::fs::symlink_metadata(&file).is_ok() {
                    check_regular("path", &file, max)?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn paths_stay_under_their_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("models");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/m.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.path().join("secret"), b"root:x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let roots = [root.clone()];
        let ok = confine("path", Path::new("a/m.gguf"), &root, &roots).unwrap();
        assert_eq!(ok, root.canonicalize().unwrap().join("a/m.gguf"));
        let abs = root.join("a/m.gguf");
        assert!(confine("path", &abs, &root, &roots).is_ok());
        let e = confine("path", Path::new("../secret"), &root, &roots).unwrap_err();
        assert!(e.contains("must not contain '..'"), "{e}");
        let e = confine("path", &dir.path().join("secret"), &root, &roots).unwrap_err();
        assert!(e.contains("outside the allowed directories"), "{e}");
        let e = confine("path", Path::new("link"), &root, &roots).unwrap_err();
        assert!(
            e.contains("outside the allowed directories"),
            "symlink out: {e}"
        );
        let e = confine("plugin", Path::new("/etc/shadow"), &root, &[]).unwrap_err();
        assert!(e.contains("none are configured"), "{e}");
        assert!(!e.contains("root:"), "no file contents: {e}");
    }

    #[test]
    fn only_regular_files_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("m.gguf");
        mkfifo(&fifo);
        let e = check_model(&fifo, Format::Gguf, 1 << 20).unwrap_err();
        assert!(e.contains("not a regular file (a named pipe)"), "{e}");
        let e = check_model(Path::new("/dev/zero"), Format::Gguf, 1 << 20).unwrap_err();
        assert!(e.contains("a character device"), "{e}");
        let e = check_model(dir.path(), Format::Gguf, 1 << 20).unwrap_err();
        assert!(e.contains("a directory"), "{e}");
        let big = dir.path().join("big.gguf");
        std::fs::write(&big, [0u8; 100]).unwrap();
        assert!(check_model(&big, Format::Gguf, 100).is_ok());
        let e = check_model(&big, Format::Gguf, 99).unwrap_err();
        assert!(e.contains("more than the limit of 99 bytes"), "{e}");
        // A BERT directory whose tokenizer is a pipe.
        let bert = dir.path().join("bert");
        std::fs::create_dir(&bert).unwrap();
        std::fs::write(bert.join("model.safetensors"), b"x").unwrap();
        std::fs::write(bert.join("config.json"), b"{}").unwrap();
        mkfifo(&bert.join("tokenizer.json"));
        let e = check_model(&bert, Format::BertSafetensors, 1 << 20).unwrap_err();
        assert!(e.contains("tokenizer.json is not a regular file"), "{e}");
    }
}
