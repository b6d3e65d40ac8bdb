//! The registry in `registry.json` of the data directory: small, rarely written, readable by
//! people. Written whole to a temporary file, synced, then renamed over the old one, so a
//! crash leaves the old or the new registry, never half of one.

use super::{RegistryEntries, RegistryStore, StoreError};
use std::io::Write;
use std::path::PathBuf;

/// `registry.json` in a data directory.
#[derive(Debug, Clone)]
pub struct RegistryFile {
    path: PathBuf,
}

impl RegistryFile {
    pub fn new(data_dir: &std::path::Path) -> Self {
        Self {
            path: data_dir.join("registry.json"),
        }
    }

    /// The saved registry; None before the first save.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn load(&self) -> Result<Option<RegistryEntries>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl RegistryStore for RegistryFile {
    fn save(&self, entries: &RegistryEntries) -> Result<(), StoreError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(entries).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredTopic;

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = RegistryFile::new(dir.path());
        assert_eq!(file.load().expect("load"), None);
        let entries = RegistryEntries {
            topics: vec![StoredTopic {
                name: "t".into(),
                queues: 3,
                lite: true,
            }],
            ..RegistryEntries::default()
        };
        file.save(&entries).expect("save");
        assert_eq!(file.load().expect("load"), Some(entries));
        std::fs::write(dir.path().join("registry.json"), "{").expect("write");
        assert!(
            file.load().is_err(),
            "a damaged file is an error, not an empty registry"
        );
    }
}
