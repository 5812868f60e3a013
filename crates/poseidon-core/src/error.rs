//! One error enum per operation family, so that the API can map each case to its status code.

use std::path::PathBuf;

use crate::backend::{BackendError, FilesError};

/// Reading or writing the persisted environments failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A failure of a whole-core operation (start-up).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backend could not report what survived the restart.
    #[error("cannot recover from the backend: {0}")]
    Recover(BackendError),
}

/// A failure of `PUT`/`DELETE /execution-environments/{id}`.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("execution environment not found")]
    NotFound,
    /// The backend cannot serve the environment; nothing was changed.
    #[error(transparent)]
    Backend(BackendError),
    /// The change is in effect but could not be persisted.
    #[error(transparent)]
    Persist(#[from] StoreError),
}

/// A failure of `POST /runners`. The texts are the ones Go Poseidon answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("execution environment not found")]
    UnknownEnvironment,
    #[error("no runners available for this execution environment")]
    NoIdleRunner,
}

/// A failure of an operation on a claimed runner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerError {
    /// Not a claimed runner (never existed, idle, or already destroyed).
    #[error("runner not found")]
    Unknown,
    /// The runner holds as many stored executions as allowed.
    #[error("too many stored executions for this runner")]
    TooManyExecutions,
    /// The backend failed to destroy the runner; it is gone from the core regardless.
    #[error(transparent)]
    Backend(BackendError),
}

/// A failure to start a stored execution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("runner not found")]
    UnknownRunner,
    #[error("execution id unknown")]
    UnknownExecution,
    /// The backend could not start the command; clients should see `ERROR_GENERIC`.
    #[error(transparent)]
    Backend(BackendError),
}

/// A failure of a file operation on a claimed runner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileOpError {
    #[error("runner not found")]
    UnknownRunner,
    #[error(transparent)]
    Files(#[from] FilesError),
}
