//! `PATCH …/files` (upload), `GET …/files` (listing) and `GET …/files/raw` (download).

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::{Stream, StreamExt};
use poseidon_core::backend::{FileCopy, FileEntry, FileUpdate, ListRequest};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;
use crate::request::{QueryParams, read_json};
use crate::runners::{claimed_runner_route, runner_id};

pub(crate) fn router(state: &AppState) -> Router<AppState> {
    let files = get(list_files).patch(update_files);
    Router::new()
        .route("/runners/{runner_id}/files", claimed_runner_route(files, state))
        .route("/runners/{runner_id}/files/raw", claimed_runner_route(get(download_file), state))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UpdateRequest {
    delete: Option<Vec<String>>,
    copy: Option<Vec<CopyRequest>>,
}

/// A file, or a directory when `path` ends in `/`; `content` is standard, padded base64.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CopyRequest {
    path: Option<String>,
    content: Option<String>,
}

impl UpdateRequest {
    fn into_update(self) -> Result<FileUpdate, ApiError> {
        let copy = self
            .copy
            .unwrap_or_default()
            .into_iter()
            .map(|entry| {
                let content =
                    STANDARD.decode(entry.content.unwrap_or_default()).map_err(|error| {
                        ApiError::BadRequest(format!("illegal base64 data: {error}"))
                    })?;
                Ok(FileCopy { path: entry.path.unwrap_or_default(), content: Bytes::from(content) })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(FileUpdate { delete: self.delete.unwrap_or_default(), copy })
    }
}

async fn update_files(
    State(state): State<AppState>,
    Path(runner): Path<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let request: UpdateRequest = read_json(body, state.config.max_upload_bytes).await?;
    state.core.update_files(&runner_id(&runner), request.into_update()?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize)]
struct FileListing {
    files: Vec<FileEntryResponse>,
}

/// One listed entry, in Go's field order; `linkTarget` only for links that have one.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FileEntryResponse {
    name: String,
    entry_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_target: Option<String>,
    size: u64,
    modification_time: i64,
    permissions: String,
    owner: String,
    group: String,
}

impl From<FileEntry> for FileEntryResponse {
    fn from(entry: FileEntry) -> Self {
        Self {
            name: entry.name,
            entry_type: entry.entry_type.to_string(),
            link_target: entry.link_target.filter(|target| !target.is_empty()),
            size: entry.size,
            modification_time: entry.modification_time,
            permissions: entry.permissions,
            owner: entry.owner,
            group: entry.group,
        }
    }
}

/// `path` defaults to `./`; `recursive` is true unless it parses as false.
async fn list_files(
    State(state): State<AppState>,
    Path(runner): Path<String>,
    query: QueryParams,
) -> Result<Json<FileListing>, ApiError> {
    let path = query.get("path").filter(|path| !path.is_empty()).unwrap_or("./");
    let request = ListRequest {
        path: path.to_owned(),
        recursive: query.bool_or("recursive", true),
        privileged: query.bool_or("privilegedExecution", false),
    };
    let entries = state.core.list_files(&runner_id(&runner), request).await?;
    Ok(Json(FileListing { files: entries.into_iter().map(Into::into).collect() }))
}

/// Streams the file; 424 (not found) is decided before any byte of the body is sent.
async fn download_file(
    State(state): State<AppState>,
    Path(runner): Path<String>,
    query: QueryParams,
) -> Result<Response, ApiError> {
    let path = query.get("path").unwrap_or_default();
    let privileged = query.bool_or("privilegedExecution", false);
    let content = state.core.read_file(&runner_id(&runner), path, privileged).await?;
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
        (header::CONTENT_LENGTH, HeaderValue::from(content.size)),
        (header::CONTENT_DISPOSITION, content_disposition(path)),
    ];
    let body = Body::from_stream(truncated(content.body, content.size));
    Ok((headers, body).into_response())
}

/// `attachment; filename="<path>"` with `"` and `\` escaped and control characters removed,
/// so that a path chosen by learner code cannot break or forge headers.
fn content_disposition(path: &str) -> HeaderValue {
    let mut value = String::from("attachment; filename=\"");
    for c in path.chars().filter(|c| !c.is_control()) {
        if matches!(c, '"' | '\\') {
            value.push('\\');
        }
        value.push(c);
    }
    value.push('"');
    HeaderValue::from_bytes(value.as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// At most `size` bytes of `body`: the announced `Content-Length` must not be exceeded even if
/// the file grew after it was measured.
fn truncated<S>(body: S, size: u64) -> impl Stream<Item = std::io::Result<Bytes>>
where
    S: Stream<Item = std::io::Result<Bytes>>,
{
    body.scan(size, |remaining, chunk| {
        let item = match chunk {
            Ok(_) if *remaining == 0 => return futures::future::ready(None),
            Ok(mut bytes) => {
                let keep = usize::try_from(*remaining).unwrap_or(usize::MAX).min(bytes.len());
                bytes.truncate(keep);
                *remaining -= keep as u64;
                Ok(bytes)
            }
            Err(error) => Err(error),
        };
        futures::future::ready(Some(item))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_disposition_quotes_the_path() {
        assert_eq!(content_disposition("test.txt"), "attachment; filename=\"test.txt\"");
        assert_eq!(
            content_disposition("a\"b\\c\r\nd\u{7f}.txt"),
            "attachment; filename=\"a\\\"b\\\\cd.txt\""
        );
        assert_eq!(
            content_disposition("ä.txt").as_bytes(),
            "attachment; filename=\"ä.txt\"".as_bytes()
        );
    }

    #[tokio::test]
    async fn downloads_stop_at_the_announced_size() {
        let chunks = futures::stream::iter([
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"def")),
            Ok(Bytes::from_static(b"ghi")),
        ]);
        let body: Vec<_> = truncated(chunks, 5).map(Result::unwrap).collect().await;
        assert_eq!(body, [Bytes::from_static(b"abc"), Bytes::from_static(b"de")]);
    }

    #[test]
    fn invalid_base64_is_a_bad_request() {
        let request = UpdateRequest {
            copy: Some(vec![CopyRequest { path: Some("a".into()), content: Some("!!".into()) }]),
            ..Default::default()
        };
        assert!(matches!(request.into_update(), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn missing_content_is_an_empty_file() {
        let request = UpdateRequest {
            copy: Some(vec![CopyRequest { path: Some("dir/".into()), content: None }]),
            ..Default::default()
        };
        let update = request.into_update().unwrap();
        assert_eq!(update.copy, [FileCopy { path: "dir/".into(), content: Bytes::new() }]);
        assert!(update.delete.is_empty());
    }
}
