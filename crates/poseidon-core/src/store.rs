//! Environments persisted in the state directory, so that a restart keeps them.
//!
//! Writes go to a temporary file that is synced and then renamed over `environments.json`, so
//! a crash leaves either the old or the new file, never a torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::environment::EnvironmentConfig;
use crate::error::StoreError;

const FILE_NAME: &str = "environments.json";
const TEMPORARY_FILE_NAME: &str = "environments.json.tmp";

/// The file's content; an object so that fields can be added later.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersistedState {
    execution_environments: Vec<EnvironmentConfig>,
}

/// `environments.json` in a state directory.
#[derive(Debug, Clone)]
pub(crate) struct EnvironmentStore {
    directory: PathBuf,
}

impl EnvironmentStore {
    pub(crate) fn new(directory: PathBuf) -> Self {
        Self { directory }
    }

    fn path(&self) -> PathBuf {
        self.directory.join(FILE_NAME)
    }

    /// The persisted environments; none when the file does not exist yet.
    pub(crate) async fn load(&self) -> Result<Vec<EnvironmentConfig>, StoreError> {
        let path = self.path();
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let state: PersistedState = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Corrupt { path, source })?;
        Ok(state.execution_environments)
    }

    /// Replaces the persisted environments atomically.
    pub(crate) async fn save(
        &self,
        environments: Vec<EnvironmentConfig>,
    ) -> Result<(), StoreError> {
        let state = PersistedState { execution_environments: environments };
        let json = serde_json::to_vec_pretty(&state).expect("environments always serialize");
        let temporary = self.directory.join(TEMPORARY_FILE_NAME);
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Write { path, source }
        };
        tokio::fs::create_dir_all(&self.directory).await.map_err(write_error(&self.directory))?;
        write_synced(&temporary, &json).await.map_err(write_error(&temporary))?;
        let path = self.path();
        tokio::fs::rename(&temporary, &path).await.map_err(write_error(&path))?;
        sync_directory(&self.directory).await.map_err(write_error(&self.directory))
    }
}

async fn write_synced(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut file = tokio::fs::File::create(path).await?;
    file.write_all(content).await?;
    file.sync_all().await
}

/// Makes the rename itself durable.
async fn sync_directory(directory: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(directory).await?.sync_all().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EnvironmentId;

    fn environment(id: i64) -> EnvironmentConfig {
        EnvironmentConfig {
            id: EnvironmentId(id),
            prewarming_pool_size: 2,
            cpu_limit: 20,
            memory_limit: 100,
            image: "debian:12".into(),
            network_access: true,
            exposed_ports: vec![80, 443],
        }
    }

    #[tokio::test]
    async fn a_missing_file_means_no_environments() {
        let directory = tempfile::tempdir().unwrap();
        let store = EnvironmentStore::new(directory.path().join("not-yet-created"));
        assert!(store.load().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn saved_environments_load_back_and_leave_no_temporary_file() {
        let directory = tempfile::tempdir().unwrap();
        let store = EnvironmentStore::new(directory.path().join("state"));
        store.save(vec![environment(1), environment(7)]).await.unwrap();
        store.save(vec![environment(7)]).await.unwrap();
        assert_eq!(store.load().await.unwrap(), vec![environment(7)]);
        assert!(!directory.path().join("state").join(TEMPORARY_FILE_NAME).exists());
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_naming_the_file() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join(FILE_NAME), b"{not json").unwrap();
        let error = EnvironmentStore::new(directory.path().into()).load().await.unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }));
        assert!(error.to_string().contains(FILE_NAME), "{error}");
    }
}
