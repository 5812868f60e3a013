//! The core's `Backend` over Nomad: environments are template jobs, runners are jobs copied
//! from them, recovery reads both back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;
use poseidon_core::backend::{Backend, BackendError, MappedPort, Recovery, Runner};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::{EnvironmentId, RunnerId};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::client::{NomadClient, NomadError};
use crate::config::{NomadConfig, TemplateSource};
use crate::events;
use crate::retry::{self, Attempt};
use crate::runner::NomadRunner;
use crate::template::{self, TemplateError};
use crate::tracker::{Phase, Tracker};

/// Why the backend cannot start.
#[derive(Debug, thiserror::Error)]
pub enum NomadStartError {
    #[error(transparent)]
    Client(#[from] NomadError),
    #[error("cannot read the template job file {path}: {error}")]
    TemplateFile { path: String, error: std::io::Error },
    #[error("cannot parse the template job file {path} with Nomad: {error}")]
    TemplateParse { path: String, error: NomadError },
    #[error(transparent)]
    Template(#[from] TemplateError),
}

impl From<NomadError> for BackendError {
    fn from(error: NomadError) -> Self {
        match &error {
            NomadError::Unreachable(_) => BackendError::Unavailable(error.to_string()),
            NomadError::Status { message, .. } if message.contains("Unknown allocation") => {
                BackendError::RunnerGone
            }
            _ => BackendError::Internal(error.to_string()),
        }
    }
}

/// What the backend and its runners share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) client: NomadClient,
    pub(crate) tracker: Arc<Tracker>,
    config: NomadConfig,
    /// Template jobs per environment, as registered or recovered.
    templates: Mutex<HashMap<EnvironmentId, Value>>,
}

impl Shared {
    /// Deregisters (and purges) `job` in the background, retrying with back-off for
    /// `deregister_patience`, so that callers answer at once even while Nomad is down.
    /// `writes` serializes with the runner's claim updates.
    pub(crate) fn deregister_in_background(
        self: &Arc<Self>,
        job: String,
        writes: Option<Arc<tokio::sync::Mutex<()>>>,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            let patience = shared.config.deregister_patience;
            retry::until_done("deregister the job", &job, patience, || async {
                if shared.is_registered_template(&job) {
                    return Attempt::Finished;
                }
                let _writing = match &writes {
                    Some(writes) => Some(writes.lock().await),
                    None => None,
                };
                match shared.client.deregister_job(&job).await {
                    Ok(()) => Attempt::Finished,
                    Err(error) => Attempt::Failed(error),
                }
            })
            .await;
        });
    }

    /// A template job that was registered again after its deletion must stay.
    fn is_registered_template(&self, job: &str) -> bool {
        template::environment_of_template(job).is_some_and(|environment| {
            self.templates.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&environment)
        })
    }

    fn template_of(&self, environment: &EnvironmentConfig) -> Value {
        let known =
            self.templates.lock().unwrap_or_else(|p| p.into_inner()).get(&environment.id).cloned();
        known.unwrap_or_else(|| self.build_template(environment, &template::embedded()))
    }

    fn build_template(&self, environment: &EnvironmentConfig, base: &Value) -> Value {
        let force_pull = !self.config.disable_force_pull;
        template::template_job(base, environment, &self.config.network, force_pull)
    }

    /// Waits until the runner job's allocation runs (or the start fails or times out, in which
    /// case the job is deregistered so that a late placement cannot over-provision the pool).
    async fn await_running(
        self: Arc<Self>,
        environment: EnvironmentConfig,
        id: RunnerId,
        job: Value,
        mut phase: watch::Receiver<Phase>,
    ) -> Result<Arc<dyn Runner>, BackendError> {
        let timeout = self.config.start_timeout;
        let started = tokio::time::timeout(timeout, phase.wait_for(|p| *p != Phase::Starting))
            .await
            .map(|waited| waited.map(|current| current.clone()));
        let outcome = match started {
            Ok(Ok(current)) => current,
            Ok(Err(_)) => Phase::Ended(poseidon_core::backend::LostReason::Stopped),
            Err(_) => {
                self.abandon(&id);
                return Err(BackendError::Unavailable(format!(
                    "runner {id} got no running allocation within {timeout:?} (not enough capacity?)"
                )));
            }
        };
        match outcome {
            Phase::Running { allocation } => {
                let ports = self.mapped_ports(&environment, &allocation).await;
                Ok(NomadRunner::new(self.clone(), id, job, allocation, ports, phase)
                    as Arc<dyn Runner>)
            }
            ended => {
                self.abandon(&id);
                Err(BackendError::Unavailable(format!("runner {id} did not start: {ended:?}")))
            }
        }
    }

    fn abandon(self: &Arc<Self>, id: &RunnerId) {
        self.tracker.forget(id.as_str());
        self.deregister_in_background(id.to_string(), None);
    }

    /// `AllocatedResources.Shared.Ports` of the allocation as `mappedPorts`.
    async fn mapped_ports(
        &self,
        environment: &EnvironmentConfig,
        allocation: &str,
    ) -> Vec<MappedPort> {
        if environment.exposed_ports.is_empty() {
            return Vec::new();
        }
        match self.client.allocation(allocation).await {
            Ok(Some(allocation)) => ports_of(&allocation),
            Ok(None) => Vec::new(),
            Err(error) => {
                tracing::warn!(allocation, %error, "cannot read the port mappings");
                Vec::new()
            }
        }
    }
}

/// The Nomad backend.
#[derive(Debug)]
pub struct NomadBackend {
    shared: Arc<Shared>,
    base_template: Value,
    _events: DropGuard,
}

impl NomadBackend {
    /// Loads the template job and starts following Nomad's events. Nomad need not be
    /// reachable yet (except to parse an HCL template file).
    pub async fn start(config: NomadConfig) -> Result<Self, NomadStartError> {
        let client = NomadClient::new(&config)?;
        let base_template = load_template(&client, &config.template).await?;
        let tracker = Arc::new(Tracker::default());
        let stop = CancellationToken::new();
        tokio::spawn(events::follow(
            client.clone(),
            tracker.clone(),
            config.reconcile_interval,
            stop.clone(),
        ));
        let shared =
            Arc::new(Shared { client, tracker, config, templates: Mutex::new(HashMap::new()) });
        Ok(Self { shared, base_template, _events: stop.drop_guard() })
    }

    fn remember_template(&self, environment: EnvironmentId, job: Value) {
        self.shared.templates.lock().unwrap_or_else(|p| p.into_inner()).insert(environment, job);
    }

    /// Template jobs as environments, with their jobs.
    async fn recover_environments(&self) -> Result<Vec<(EnvironmentConfig, Value)>, NomadError> {
        let mut environments = Vec::new();
        for stub in self.shared.client.jobs(template::TEMPLATE_PREFIX).await? {
            if template::environment_of_template(&stub.id).is_none() {
                continue;
            }
            let Some(job) = self.shared.client.job(&stub.id).await? else { continue };
            match template::validate(job)
                .ok()
                .and_then(|job| Some((template::environment_of(&job)?, job)))
            {
                Some(found) => environments.push(found),
                None => {
                    tracing::warn!(job = stub.id, "ignoring a template job Poseidon cannot use")
                }
            }
        }
        Ok(environments)
    }
}

#[async_trait]
impl Backend for NomadBackend {
    async fn prepare_environment(
        &self,
        environment: &EnvironmentConfig,
    ) -> Result<(), BackendError> {
        let job = self.shared.build_template(environment, &self.base_template);
        match self.shared.client.register_job(&job).await {
            Ok(_) => {
                self.remember_template(environment.id, job);
                Ok(())
            }
            Err(NomadError::Status { status, message }) if status == 400 || status == 500 => {
                Err(BackendError::InvalidEnvironment(format!(
                    "Nomad refused the template job: {message}"
                )))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn create_runner(
        &self,
        environment: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn Runner>, BackendError> {
        let job = template::runner_job(&self.shared.template_of(environment), id.as_str());
        let phase = self.shared.tracker.watch(id.as_str());
        if let Err(error) = self.shared.client.register_job(&job).await {
            // The registration may have happened even though its answer got lost.
            self.shared.abandon(&id);
            return Err(error.into());
        }
        self.shared.clone().await_running(environment.clone(), id, job, phase).await
    }

    async fn recover(&self) -> Result<Recovery, BackendError> {
        let environments = self.recover_environments().await?;
        let mut candidates = Vec::new();
        for (environment, job) in &environments {
            self.remember_template(environment.id, job.clone());
            for stub in self.shared.client.jobs(&format!("{}-", environment.id)).await? {
                let id: RunnerId = stub.id.parse().expect("infallible");
                if id.environment() != Some(environment.id) {
                    continue;
                }
                if stub.status == "dead" {
                    self.shared.deregister_in_background(stub.id, None);
                    continue;
                }
                let Some(job) = self.shared.client.job(&stub.id).await? else { continue };
                let phase = self.shared.tracker.watch(id.as_str());
                candidates.push((environment.clone(), id, job, phase));
            }
        }
        events::reconcile(&self.shared.client, &self.shared.tracker).await;
        let mut recovery = Recovery {
            environments: environments.into_iter().map(|(environment, _)| environment).collect(),
            ..Recovery::default()
        };
        for (environment, id, job, phase) in candidates {
            let claim = template::claim_of(&job);
            let current = phase.borrow().clone();
            match (current, claim) {
                (Phase::Running { allocation }, claim) => {
                    let ports = self.shared.mapped_ports(&environment, &allocation).await;
                    let runner: Arc<dyn Runner> =
                        NomadRunner::new(self.shared.clone(), id, job, allocation, ports, phase);
                    match claim {
                        Some(timeout) => recovery.used.push((environment.id, runner, timeout)),
                        None => recovery.idle.push((environment.id, runner)),
                    }
                }
                (Phase::Starting, None) => {
                    let starting =
                        self.shared.clone().await_running(environment.clone(), id, job, phase);
                    recovery.starting.push((environment.id, starting.boxed()));
                }
                // A claimed runner whose allocation restarted lost the learner's files.
                (Phase::Starting | Phase::Ended(_), _) => self.shared.abandon(&id),
            }
        }
        tracing::info!(?recovery, "recovered from Nomad");
        Ok(recovery)
    }

    async fn delete_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        self.shared.templates.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.shared.deregister_in_background(template::template_id(id), None);
        Ok(())
    }

    fn runners_outlive_service(&self) -> bool {
        true
    }
}

async fn load_template(
    client: &NomadClient,
    source: &TemplateSource,
) -> Result<Value, NomadStartError> {
    let path = match source {
        TemplateSource::Embedded => return Ok(template::embedded()),
        TemplateSource::File(path) => path,
    };
    let display = path.display().to_string();
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|error| NomadStartError::TemplateFile { path: display.clone(), error })?;
    let job = match serde_json::from_str::<Value>(&text) {
        Ok(job) => job,
        Err(_) => client
            .parse_job(&text)
            .await
            .map_err(|error| NomadStartError::TemplateParse { path: display, error })?,
    };
    Ok(template::validate(job)?)
}

fn ports_of(allocation: &Value) -> Vec<MappedPort> {
    let ports = allocation
        .pointer("/AllocatedResources/Shared/Ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ports
        .iter()
        .filter_map(|port| {
            let exposed = u16::try_from(port.get("To")?.as_u64()?).ok()?;
            let host_port = port.get("Value")?.as_u64()?;
            let host = port.get("HostIP").and_then(Value::as_str).unwrap_or("127.0.0.1");
            Some(MappedPort { exposed_port: exposed, host_address: format!("{host}:{host_port}") })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn port_mappings_come_from_the_shared_allocated_ports() {
        let allocation = json!({"AllocatedResources": {"Shared": {"Ports": [
            {"Label": "8080", "Value": 24571, "To": 8080, "HostIP": "10.0.0.5"}]}}});
        assert_eq!(
            ports_of(&allocation),
            vec![MappedPort { exposed_port: 8080, host_address: "10.0.0.5:24571".into() }]
        );
        assert!(ports_of(&json!({})).is_empty());
    }
}
