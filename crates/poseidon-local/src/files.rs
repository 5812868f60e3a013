//! File operations of a local runner, moved to blocking threads.

use bytes::Bytes;
use futures::StreamExt;
use poseidon_core::backend::{
    BackendError, FileContent, FileEntry, FileUpdate, FilesError, ListRequest,
};
use poseidon_sandbox::Sandbox;
use poseidon_sandbox::files::{CopyItem, Entry, FilesError as SandboxFilesError, Root};
use std::io::Read;
use std::time::Duration;
use tokio::sync::mpsc;

/// Chunks read ahead of a slow download.
const DOWNLOAD_CHUNKS: usize = 4;
const DOWNLOAD_CHUNK: usize = 64 * 1024;
/// How long a download may wait for its client to take the next chunk.
const DOWNLOAD_STALL: Duration = Duration::from_secs(30);

pub(crate) async fn update(sandbox: &Sandbox, update: FileUpdate) -> Result<(), FilesError> {
    let root = root(sandbox)?;
    let copy: Vec<CopyItem> =
        update.copy.into_iter().map(|c| CopyItem { path: c.path, content: c.content }).collect();
    blocking(move || root.update(&update.delete, &copy)).await
}

pub(crate) async fn list(
    sandbox: &Sandbox,
    request: ListRequest,
) -> Result<Vec<FileEntry>, FilesError> {
    let root = root(sandbox)?;
    let entries =
        blocking(move || root.list(&request.path, request.recursive, request.privileged)).await?;
    Ok(entries.into_iter().map(file_entry).collect())
}

pub(crate) async fn read(
    sandbox: &Sandbox,
    path: &str,
    privileged: bool,
) -> Result<FileContent, FilesError> {
    let root = root(sandbox)?;
    let path = path.to_owned();
    let (size, reader) = blocking(move || root.open(&path, privileged)).await?;
    let (tx, rx) = mpsc::channel(DOWNLOAD_CHUNKS);
    tokio::spawn(feed_download(reader, tx));
    let body =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) },
        );
    Ok(FileContent { size, body: body.boxed() })
}

/// Reads the file chunk by chunk, each read on a blocking thread that is released right after:
/// a client that stops reading parks no thread. One that takes nothing for
/// [`DOWNLOAD_STALL`] loses the download, so it cannot pin the file (and a destroyed runner's
/// storage) for as long as it keeps the connection open.
async fn feed_download(
    mut reader: Box<dyn Read + Send>,
    chunks: mpsc::Sender<std::io::Result<Bytes>>,
) {
    loop {
        let read = tokio::task::spawn_blocking(move || {
            let chunk = read_chunk(&mut reader);
            (reader, chunk)
        })
        .await;
        let Ok((returned, chunk)) = read else { return };
        reader = returned;
        let failed = match &chunk {
            Ok(bytes) if bytes.is_empty() => return,
            Ok(_) => false,
            Err(_) => true,
        };
        if chunks.send_timeout(chunk, DOWNLOAD_STALL).await.is_err() || failed {
            return;
        }
    }
}

/// The next chunk of `reader`; empty at its end.
fn read_chunk(reader: &mut dyn Read) -> std::io::Result<Bytes> {
    let mut buffer = vec![0; DOWNLOAD_CHUNK];
    loop {
        match reader.read(&mut buffer) {
            Ok(n) => {
                buffer.truncate(n);
                return Ok(Bytes::from(buffer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn root(sandbox: &Sandbox) -> Result<Root, FilesError> {
    sandbox.files().map_err(|e| {
        FilesError::Backend(BackendError::Internal(format!("cannot open the runner's files: {e}")))
    })
}

async fn blocking<T: Send + 'static>(
    operation: impl FnOnce() -> Result<T, SandboxFilesError> + Send + 'static,
) -> Result<T, FilesError> {
    tokio::task::spawn_blocking(operation)
        .await
        .map_err(|e| {
            FilesError::Backend(BackendError::Internal(format!("file operation panicked: {e}")))
        })?
        .map_err(files_error)
}

fn files_error(error: SandboxFilesError) -> FilesError {
    match error {
        SandboxFilesError::NotFound => FilesError::NotFound,
        SandboxFilesError::NotAFile(message) => FilesError::NotAFile(message),
        SandboxFilesError::CopyFailed(message) => FilesError::CopyFailed(message),
        error @ SandboxFilesError::Io { .. } => {
            FilesError::Backend(BackendError::Internal(error.to_string()))
        }
    }
}

fn file_entry(entry: Entry) -> FileEntry {
    FileEntry {
        name: entry.name,
        entry_type: entry.entry_type,
        link_target: entry.link_target,
        size: entry.size,
        modification_time: entry.modification_time,
        permissions: entry.permissions,
        owner: entry.owner,
        group: entry.group,
    }
}
