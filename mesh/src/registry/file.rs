//! The embedded registry: one JSON file under the agent's state directory, replaced
//! atomically, written on the blocking pool.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::store::{ModelRegistry, Saved};

/// The registry file under the agent's state directory.
#[derive(Debug, Clone)]
pub struct FileRegistry {
    path: PathBuf,
}

impl FileRegistry {
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(state_dir)
            .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", state_dir.display()))?;
        Ok(FileRegistry {
            path: state_dir.join("registry.json"),
        })
    }

    /// Read the file now, blocking (at start, before serving).
    pub fn read(&self) -> anyhow::Result<Saved> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("registry {} is corrupt: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read registry {}: {e}",
                self.path.display()
            )),
        }
    }

    /// Replace the file now, blocking.
    pub fn write(&self, saved: &Saved) -> anyhow::Result<()> {
        crate::util::write_json(&self.path, saved)
    }
}

#[async_trait::async_trait]
impl ModelRegistry for FileRegistry {
    async fn load(&self) -> anyhow::Result<Saved> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.read()).await?
    }

    async fn save(&self, saved: Saved) -> anyhow::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.write(&saved)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::config::ModelConfig;

    #[tokio::test]
    async fn what_is_saved_is_loaded_again_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let reg = FileRegistry::open(&dir.path().join("state")).unwrap();
        let empty = reg.load().await.unwrap();
        assert!(empty.models.is_empty() && empty.vmodels.is_empty());
        let mut saved = Saved::default();
        saved.models.push(ModelConfig::new("m", "/m/m.gguf", None));
        saved.vmodels.insert("v".into(), "m".into());
        reg.save(saved.clone()).await.unwrap();
        let again = FileRegistry::open(&dir.path().join("state")).unwrap();
        let back = again.load().await.unwrap();
        assert_eq!(back.vmodels, saved.vmodels);
        assert_eq!(back.models[0].id, "m");
        fs::write(dir.path().join("state/registry.json"), b"{").unwrap();
        assert!(again.load().await.is_err());
    }
}
