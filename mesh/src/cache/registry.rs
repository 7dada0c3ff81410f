//! The embedded registry: models and vmodels added through the admin API, kept in one JSON
//! file that is replaced atomically (write, fsync, rename), so a crash leaves the old or the
//! new file, never half of one.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    pub models: Vec<ModelConfig>,
    pub vmodels: BTreeMap<String, String>,
}

/// The registry file under the agent's state directory.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
}

impl Registry {
    pub fn open(state_dir: &std::path::Path) -> anyhow::Result<Self> {
        fs::create_dir_all(state_dir)
            .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", state_dir.display()))?;
        Ok(Registry {
            path: state_dir.join("registry.json"),
        })
    }

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

    pub fn write(&self, saved: &Saved) -> anyhow::Result<()> {
        Self::write_json(&self.path, saved)
    }

    /// Replace `path` with `value` as JSON, atomically and durably.
    pub fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value)?)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
