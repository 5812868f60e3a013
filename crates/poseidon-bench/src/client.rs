//! A Poseidon client that makes the calls CodeOcean makes, and remembers what it created so
//! that a run never leaves runners or environments behind.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every HTTP request is bounded; CodeOcean has no read timeout, a benchmark must.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between claims while the pool is empty (`NOMAD_OVERLOAD`).
const CLAIM_RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Failures of the HTTP calls, each naming the call and the object it was about.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{call} {object}")]
    Transport {
        call: &'static str,
        object: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{call} {object}: unexpected status {status}: {body}")]
    Status { call: &'static str, object: String, status: StatusCode, body: String },
    #[error("{call} {object}: unexpected body: {body}")]
    Body { call: &'static str, object: String, body: String },
    #[error("claim in environment {environment}: pool still empty after {waited:?}")]
    PoolEmpty { environment: u64, waited: Duration },
}

/// One environment's line of `GET /statistics/execution-environments`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatistics {
    pub idle_runners: u64,
}

/// A claimed runner and what the claim cost.
#[derive(Debug, Clone)]
pub struct Claim {
    pub runner_id: String,
    /// Answers `NOMAD_OVERLOAD` before one succeeded.
    pub overloaded_answers: u32,
}

/// What this client created and has not destroyed yet.
#[derive(Debug, Default)]
struct Ledger {
    runners: HashSet<String>,
    environments: BTreeSet<u64>,
}

/// The client; cheap to share by reference between tasks.
#[derive(Debug)]
pub struct Poseidon {
    http: reqwest::Client,
    api: String,
    token: Option<String>,
    ledger: Mutex<Ledger>,
}

impl Poseidon {
    /// `url` is the service's base URL, e.g. `http://127.0.0.1:7200` (the API prefix is added).
    pub fn new(url: &str, token: Option<String>) -> Result<Poseidon, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(usize::MAX)
            .tcp_nodelay(true)
            .build()?;
        let api = format!("{}/api/v1", url.trim_end_matches('/'));
        Ok(Poseidon { http, api, token, ledger: Mutex::default() })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A request with CodeOcean's headers: JSON content type and the token.
    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self
            .http
            .request(method, format!("{}{path}", self.api))
            .header("Content-Type", "application/json");
        match &self.token {
            Some(token) => builder.header("Poseidon-Token", token),
            None => builder,
        }
    }

    /// Sends `builder` and returns the status and body, or a transport error.
    async fn send(
        &self,
        call: &'static str,
        object: &str,
        builder: RequestBuilder,
    ) -> Result<(StatusCode, bytes_body::Body), ClientError> {
        let transport = |source| ClientError::Transport { call, object: object.to_owned(), source };
        let response = builder.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        Ok((status, bytes_body::Body(body.to_vec())))
    }

    fn expect(
        call: &'static str,
        object: &str,
        (status, body): (StatusCode, bytes_body::Body),
        accepted: &[StatusCode],
    ) -> Result<bytes_body::Body, ClientError> {
        if accepted.contains(&status) {
            Ok(body)
        } else {
            Err(ClientError::Status { call, object: object.to_owned(), status, body: body.text() })
        }
    }

    pub async fn health(&self) -> Result<(), ClientError> {
        let answer = self.send("GET", "/health", self.request(Method::GET, "/health")).await?;
        Self::expect("GET", "/health", answer, &[StatusCode::NO_CONTENT]).map(drop)
    }

    /// Creates or updates environment `id` with a prewarming pool of `pool` runners of the
    /// built-in `host` image, without network access.
    pub async fn put_environment(&self, id: u64, pool: u64) -> Result<(), ClientError> {
        self.put_environment_with(id, pool, None).await
    }

    /// [`Poseidon::put_environment`]; with `exposed_ports`, the runners get network access and
    /// these ports mapped.
    pub async fn put_environment_with(
        &self,
        id: u64,
        pool: u64,
        exposed_ports: Option<&[u16]>,
    ) -> Result<(), ClientError> {
        let body = json!({
            "prewarmingPoolSize": pool,
            "cpuLimit": 0,
            "memoryLimit": 256,
            "image": "host",
            "networkAccess": exposed_ports.is_some(),
            "exposedPorts": exposed_ports.unwrap_or_default(),
        });
        self.ledger().environments.insert(id);
        let request = self.request(Method::PUT, &format!("/execution-environments/{id}"));
        let answer = self.send("put environment", &id.to_string(), request.json(&body)).await?;
        let accepted = [StatusCode::CREATED, StatusCode::NO_CONTENT];
        Self::expect("put environment", &id.to_string(), answer, &accepted).map(drop)
    }

    pub async fn delete_environment(&self, id: u64) -> Result<(), ClientError> {
        let request = self.request(Method::DELETE, &format!("/execution-environments/{id}"));
        let answer = self.send("delete environment", &id.to_string(), request).await?;
        self.ledger().environments.remove(&id);
        Self::expect("delete environment", &id.to_string(), answer, &[StatusCode::NO_CONTENT])
            .map(drop)
    }

    pub async fn environment_statistics(
        &self,
        id: u64,
    ) -> Result<EnvironmentStatistics, ClientError> {
        let call = "statistics";
        let request = self.request(Method::GET, "/statistics/execution-environments");
        let answer = self.send(call, "", request).await?;
        let body = Self::expect(call, "", answer, &[StatusCode::OK])?;
        let mut all: HashMap<String, EnvironmentStatistics> = body.json(call, "")?;
        all.remove(&id.to_string()).ok_or_else(|| ClientError::Body {
            call,
            object: id.to_string(),
            body: "environment missing".to_owned(),
        })
    }

    /// One `POST /runners`; `Ok(None)` when the pool is empty (`NOMAD_OVERLOAD`).
    pub async fn try_claim(&self, environment: u64) -> Result<Option<String>, ClientError> {
        let call = "claim";
        let object = environment.to_string();
        let body = json!({"executionEnvironmentId": environment, "inactivityTimeout": 60});
        let request = self.request(Method::POST, "/runners").json(&body);
        let (status, body) = self.send(call, &object, request).await?;
        if status == StatusCode::INTERNAL_SERVER_ERROR && body.error_code() == "NOMAD_OVERLOAD" {
            return Ok(None);
        }
        let body = Self::expect(call, &object, (status, body), &[StatusCode::OK])?;
        let value: Value = body.json(call, &object)?;
        let runner_id =
            value["runnerId"].as_str().filter(|id| !id.is_empty()).ok_or_else(|| {
                ClientError::Body { call, object: object.clone(), body: value.to_string() }
            })?;
        self.ledger().runners.insert(runner_id.to_owned());
        Ok(Some(runner_id.to_owned()))
    }

    /// Claims a runner, retrying while the pool is empty as CodeOcean's callers do, for at
    /// most `patience`.
    pub async fn claim(&self, environment: u64, patience: Duration) -> Result<Claim, ClientError> {
        let started = Instant::now();
        let mut overloaded_answers = 0;
        loop {
            if let Some(runner_id) = self.try_claim(environment).await? {
                return Ok(Claim { runner_id, overloaded_answers });
            }
            overloaded_answers += 1;
            if started.elapsed() >= patience {
                return Err(ClientError::PoolEmpty { environment, waited: started.elapsed() });
            }
            tokio::time::sleep(CLAIM_RETRY_PAUSE).await;
        }
    }

    /// CodeOcean's copy: wipe the workspace with `./*`, then write the files.
    pub async fn copy_files(
        &self,
        runner: &str,
        files: &[(&str, &[u8])],
    ) -> Result<(), ClientError> {
        let copy: Vec<Value> = files
            .iter()
            .map(|(path, content)| json!({"path": path, "content": BASE64.encode(content)}))
            .collect();
        let body = json!({"delete": ["./*"], "copy": copy});
        let request = self.request(Method::PATCH, &format!("/runners/{runner}/files")).json(&body);
        let answer = self.send("copy files", runner, request).await?;
        Self::expect("copy files", runner, answer, &[StatusCode::NO_CONTENT]).map(drop)
    }

    /// `POST …/execute`; returns the WebSocket URL to connect to.
    pub async fn execute(
        &self,
        runner: &str,
        command: &str,
        time_limit_secs: u64,
    ) -> Result<String, ClientError> {
        let call = "execute";
        let body =
            json!({"command": command, "timeLimit": time_limit_secs, "privilegedExecution": false});
        let request = self.request(Method::POST, &format!("/runners/{runner}/execute")).json(&body);
        let answer = self.send(call, runner, request).await?;
        let value: Value =
            Self::expect(call, runner, answer, &[StatusCode::OK])?.json(call, runner)?;
        value["websocketUrl"].as_str().filter(|url| !url.is_empty()).map(str::to_owned).ok_or_else(
            || ClientError::Body { call, object: runner.to_owned(), body: value.to_string() },
        )
    }

    /// The recursive listing of the workspace, as CodeOcean asks for it after a run; returns
    /// the number of entries.
    pub async fn list_files(&self, runner: &str) -> Result<usize, ClientError> {
        let call = "list files";
        let request = self.request(Method::GET, &format!("/runners/{runner}/files")).query(&[
            ("path", "./"),
            ("privilegedExecution", "false"),
            ("recursive", "true"),
        ]);
        let answer = self.send(call, runner, request).await?;
        let value: Value =
            Self::expect(call, runner, answer, &[StatusCode::OK])?.json(call, runner)?;
        value["files"].as_array().map(Vec::len).ok_or_else(|| ClientError::Body {
            call,
            object: runner.to_owned(),
            body: value.to_string(),
        })
    }

    pub async fn download(&self, runner: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let request = self
            .request(Method::GET, &format!("/runners/{runner}/files/raw"))
            .query(&[("path", path), ("privilegedExecution", "false")]);
        let answer = self.send("download", runner, request).await?;
        Self::expect("download", runner, answer, &[StatusCode::OK]).map(|body| body.0)
    }

    /// `DELETE /runners/{id}`; 410 counts as success, as in CodeOcean.
    pub async fn destroy(&self, runner: &str) -> Result<(), ClientError> {
        let request = self.request(Method::DELETE, &format!("/runners/{runner}"));
        let answer = self.send("destroy", runner, request).await?;
        self.ledger().runners.remove(runner);
        Self::expect("destroy", runner, answer, &[StatusCode::NO_CONTENT, StatusCode::GONE])
            .map(drop)
    }

    /// Destroys every runner and environment this client created and did not destroy;
    /// returns how many objects were left over and the errors of deleting them.
    pub async fn clean_up(&self) -> (usize, Vec<ClientError>) {
        let (runners, environments) = {
            let ledger = self.ledger();
            (
                ledger.runners.iter().cloned().collect::<Vec<_>>(),
                ledger.environments.iter().copied().collect::<Vec<_>>(),
            )
        };
        let mut errors = Vec::new();
        let runner_results =
            futures::future::join_all(runners.iter().map(|runner| self.destroy(runner))).await;
        errors.extend(runner_results.into_iter().filter_map(Result::err));
        for environment in &environments {
            if let Err(error) = self.delete_environment(*environment).await {
                errors.push(error);
            }
        }
        (runners.len() + environments.len(), errors)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A response body and the ways the client reads it.
mod bytes_body {
    use super::ClientError;
    use serde::de::DeserializeOwned;

    #[derive(Debug)]
    pub struct Body(pub Vec<u8>);

    impl Body {
        /// The body as text for error messages, cut to a readable length.
        pub fn text(&self) -> String {
            let text = String::from_utf8_lossy(&self.0);
            text.chars().take(300).collect()
        }

        pub fn json<T: DeserializeOwned>(
            &self,
            call: &'static str,
            object: &str,
        ) -> Result<T, ClientError> {
            serde_json::from_slice(&self.0).map_err(|_| ClientError::Body {
                call,
                object: object.to_owned(),
                body: self.text(),
            })
        }

        pub fn error_code(&self) -> String {
            serde_json::from_slice::<serde_json::Value>(&self.0)
                .ok()
                .and_then(|value| value["errorCode"].as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    }
}
