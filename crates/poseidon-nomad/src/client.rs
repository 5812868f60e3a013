//! The HTTP client for the part of Nomad's API Poseidon uses (`docs/nomad-api.md` of the
//! reference): every request carries the namespace and the ACL token, transient failures are
//! retried a bounded number of times with back-off, and errors keep Nomad's plain-text message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::NomadConfig;
use crate::tls;

/// How long one ordinary request may take (the event stream has none: it never ends).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The first retry delay; it doubles per attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

/// A failed call to Nomad.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NomadError {
    /// Nomad could not be reached (or did not answer in time).
    #[error("Nomad is unreachable: {0}")]
    Unreachable(String),
    /// Nomad answered with an error status; `message` is its plain-text body.
    #[error("Nomad answered {status}: {message}")]
    Status { status: u16, message: String },
    /// Nomad's answer was not what its API documents.
    #[error("unexpected answer from Nomad: {0}")]
    Decode(String),
    /// The TLS configuration for Nomad cannot be used.
    #[error("invalid TLS configuration for Nomad: {0}")]
    Tls(String),
}

impl NomadError {
    /// Whether trying again later may succeed (transport failures, overloaded proxies).
    fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            Self::Decode(_) | Self::Tls(_) => false,
        }
    }
}

/// A `JobListStub`, the part we read.
#[derive(Debug, Clone, Deserialize)]
pub struct JobStub {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Status", default)]
    pub status: String,
}

/// What the client needs to build `alloc exec` WebSocket requests.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    pub url: Url,
    pub token: Option<String>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A Nomad API client bound to one namespace.
#[derive(Debug, Clone)]
pub struct NomadClient {
    http: reqwest::Client,
    /// The event stream: no overall timeout.
    streaming: reqwest::Client,
    base: Url,
    token: Option<String>,
    namespace: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    attempts: u32,
}

impl NomadClient {
    pub fn new(config: &NomadConfig) -> Result<Self, NomadError> {
        let tls = config.tls.as_ref().map(tls::client_config).transpose()?.map(Arc::new);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match config.address.contains(':') {
            true => format!("[{}]", config.address),
            false => config.address.clone(),
        };
        let base = Url::parse(&format!("{scheme}://{host}:{}/", config.port))
            .map_err(|error| NomadError::Decode(format!("invalid Nomad address: {error}")))?;
        let builder = |timeout: Option<Duration>| {
            let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
            if let Some(timeout) = timeout {
                builder = builder.timeout(timeout);
            }
            if let Some(tls) = &tls {
                builder = builder.use_preconfigured_tls((**tls).clone());
            }
            builder.build().map_err(|error| NomadError::Tls(error.to_string()))
        };
        Ok(Self {
            http: builder(Some(REQUEST_TIMEOUT))?,
            streaming: builder(None)?,
            base,
            token: Some(config.token.clone()).filter(|token| !token.is_empty()),
            namespace: config.namespace.clone(),
            tls,
            attempts: config.request_attempts.max(1),
        })
    }

    /// `PUT /v1/jobs`: registers or updates `job` (its `Namespace` is set to ours). The
    /// evaluation is not awaited: the allocation's progress arrives through the event stream.
    pub async fn register_job(&self, job: &Value) -> Result<(), NomadError> {
        let mut job = job.clone();
        job["Namespace"] = Value::String(self.namespace.clone());
        let body = serde_json::json!({ "Job": job });
        let answer: Value = decode(&self.request(Method::PUT, "v1/jobs", &[], Some(&body)).await?)?;
        if let Some(warnings) =
            answer.get("Warnings").and_then(Value::as_str).filter(|w| !w.is_empty())
        {
            tracing::warn!(job = %job["ID"], warnings, "Nomad warns about a job");
        }
        Ok(())
    }

    /// `GET /v1/job/:id`; `None` when the job does not exist.
    pub async fn job(&self, id: &str) -> Result<Option<Value>, NomadError> {
        let path = format!("v1/job/{}", encode_segment(id));
        match self.request(Method::GET, &path, &[], None).await {
            Ok(bytes) => decode(&bytes).map(Some),
            Err(NomadError::Status { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `GET /v1/jobs?prefix=`.
    pub async fn jobs(&self, prefix: &str) -> Result<Vec<JobStub>, NomadError> {
        let bytes = self.request(Method::GET, "v1/jobs", &[("prefix", prefix)], None).await?;
        decode(&bytes)
    }

    /// `DELETE /v1/job/:id?purge=true`; deleting a missing job succeeds (as in Nomad).
    pub async fn deregister_job(&self, id: &str) -> Result<(), NomadError> {
        let path = format!("v1/job/{}", encode_segment(id));
        self.request(Method::DELETE, &path, &[("purge", "true")], None).await.map(drop)
    }

    /// `GET /v1/allocations`: every allocation of the namespace, with the index of the answer.
    pub async fn allocations(&self) -> Result<(Vec<Value>, u64), NomadError> {
        let (bytes, index) = self.request_indexed(Method::GET, "v1/allocations", &[], None).await?;
        Ok((decode(&bytes)?, index))
    }

    /// `GET /v1/allocation/:id`; `None` when unknown (garbage-collected).
    pub async fn allocation(&self, id: &str) -> Result<Option<Value>, NomadError> {
        let path = format!("v1/allocation/{}", encode_segment(id));
        match self.request(Method::GET, &path, &[], None).await {
            Ok(bytes) => decode(&bytes).map(Some),
            Err(NomadError::Status { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `PUT /v1/jobs/parse`: HCL (or HCL-in-JSON) to an `api.Job` JSON object.
    pub async fn parse_job(&self, hcl: &str) -> Result<Value, NomadError> {
        let body = serde_json::json!({ "JobHCL": hcl, "Canonicalize": false });
        let bytes = self.request(Method::PUT, "v1/jobs/parse", &[], Some(&body)).await?;
        decode(&bytes)
    }

    /// `GET /v1/event/stream` for allocation and job events from `index` on; the body never
    /// ends by itself.
    pub async fn event_stream(
        &self,
        index: u64,
    ) -> Result<impl Stream<Item = reqwest::Result<Bytes>> + use<>, NomadError> {
        let index = index.to_string();
        let query = [
            ("topic", "Allocation:*"),
            ("topic", "Job:*"),
            ("index", index.as_str()),
            ("namespace", self.namespace.as_str()),
        ];
        let response = self
            .authorized(self.streaming.get(self.url("v1/event/stream")?).query(&query))
            .send()
            .await
            .map_err(transport_error)?;
        Ok(check_status(response).await?.bytes_stream())
    }

    /// The exec WebSocket of `allocation`'s task `task` running `command`.
    pub fn exec_target(
        &self,
        allocation: &str,
        task: &str,
        tty: bool,
        command: &[String],
    ) -> Result<ExecTarget, NomadError> {
        let mut url =
            self.url(&format!("v1/client/allocation/{}/exec", encode_segment(allocation)))?;
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|()| NomadError::Decode("invalid exec URL".into()))?;
        let command = serde_json::to_string(command).expect("strings serialize");
        url.query_pairs_mut()
            .append_pair("task", task)
            .append_pair("tty", if tty { "true" } else { "false" })
            .append_pair("command", &command)
            .append_pair("namespace", &self.namespace);
        Ok(ExecTarget { url, token: self.token.clone(), tls: self.tls.clone() })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Bytes, NomadError> {
        Ok(self.request_indexed(method, path, query, body).await?.0)
    }

    /// One call, retried while it fails transiently; the answer and its `X-Nomad-Index`.
    async fn request_indexed(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(Bytes, u64), NomadError> {
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 1;
        loop {
            match self.request_once(method.clone(), path, query, body).await {
                Ok(answer) => return Ok(answer),
                Err(error) if error.is_transient() && attempt < self.attempts => {
                    tracing::debug!(%method, path, %error, retry_in = ?delay, "Nomad request failed");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn request_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(Bytes, u64), NomadError> {
        let mut request = self
            .authorized(self.http.request(method, self.url(path)?))
            .query(&[("namespace", self.namespace.as_str())])
            .query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = check_status(request.send().await.map_err(transport_error)?).await?;
        let index = response
            .headers()
            .get("X-Nomad-Index")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0);
        let bytes = response.bytes().await.map_err(transport_error)?;
        Ok((bytes, index))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.header("X-Nomad-Token", token),
            None => request,
        }
    }

    fn url(&self, path: &str) -> Result<Url, NomadError> {
        self.base.join(path).map_err(|error| NomadError::Decode(format!("invalid URL: {error}")))
    }
}

/// Percent-encodes one path segment (job ids are ours, but Nomad's allocation ids are input).
fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(byte as char);
            }
            other => encoded.push_str(&format!("%{other:02X}")),
        }
    }
    encoded
}

fn transport_error(error: reqwest::Error) -> NomadError {
    NomadError::Unreachable(error.to_string())
}

async fn check_status(response: reqwest::Response) -> Result<reqwest::Response, NomadError> {
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response);
    }
    let message = response.text().await.unwrap_or_default();
    let message = message.trim().chars().take(2000).collect();
    Err(NomadError::Status { status: status.as_u16(), message })
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, NomadError> {
    serde_json::from_slice(bytes).map_err(|error| NomadError::Decode(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("29-4dbd13a6"), "29-4dbd13a6");
        assert_eq!(encode_segment("a/../b c"), "a%2F..%2Fb%20c");
    }

    #[test]
    fn only_transport_failures_and_proxy_errors_are_retried() {
        assert!(NomadError::Unreachable("refused".into()).is_transient());
        assert!(NomadError::Status { status: 503, message: String::new() }.is_transient());
        assert!(!NomadError::Status { status: 500, message: "invalid".into() }.is_transient());
        assert!(!NomadError::Status { status: 404, message: String::new() }.is_transient());
    }

    #[test]
    fn exec_urls_carry_task_tty_command_and_namespace() {
        let config = NomadConfig { namespace: "poseidon".into(), ..NomadConfig::default() };
        let client = NomadClient::new(&config).unwrap();
        let command = vec!["/bin/bash".to_owned(), "-c".to_owned(), "echo hi".to_owned()];
        let target = client.exec_target("5f3c", "default-task", true, &command).unwrap();
        assert_eq!(
            target.url.as_str(),
            "ws://127.0.0.1:4646/v1/client/allocation/5f3c/exec?task=default-task&tty=true\
             &command=%5B%22%2Fbin%2Fbash%22%2C%22-c%22%2C%22echo+hi%22%5D&namespace=poseidon"
        );
    }
}
