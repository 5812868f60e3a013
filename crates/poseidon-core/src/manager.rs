//! The core: environments, their pools, claimed runners and their executions.
//!
//! `Core` is a cheap-clone handle around `Arc<Shared>`. All state sits behind one
//! `std::sync::Mutex` that is never held across `.await`: every backend call happens after the
//! lock was released, on runners cloned out of the state.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::backend::{
    Backend, FileContent, FileEntry, FileUpdate, ListRequest, LostReason, MappedPort, Recovery,
    Runner, StartingRunner,
};
use crate::environment::EnvironmentConfig;
use crate::error::{
    ClaimError, CoreError, EnvironmentError, FileOpError, RunnerError, StartError, StoreError,
};
use crate::execution::{EndReason, ExecutionRequest, RunnerEnd, RunningExecution};
use crate::ids::{EnvironmentId, ExecutionId, RunnerId};
use crate::pool::{IdleRunner, LostWatcher, Pool};
use crate::store::EnvironmentStore;
use crate::timers::{self, Deadlines, TimerKey};

/// The first delay after a failed runner creation; it doubles up to [`MAX_CREATION_BACKOFF`].
const INITIAL_CREATION_BACKOFF: Duration = Duration::from_millis(100);
const MAX_CREATION_BACKOFF: Duration = Duration::from_secs(30);
/// How long one backend `destroy` may take.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for background work (creations, destructions) to finish.
const SHUTDOWN_TASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Environments are persisted here (`environments.json`); `None`: not persisted.
    pub state_dir: Option<PathBuf>,
    /// Keep stderr apart from stdout for executions (`server.interactivestderr`).
    pub separate_stderr: bool,
    /// Stored, not yet connected executions per runner; more are refused.
    pub max_stored_executions: usize,
    /// A stored execution that is never connected expires after this (zero: never).
    pub stored_execution_ttl: Duration,
    /// Runner creations in flight over all environments.
    pub creation_concurrency: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            state_dir: None,
            separate_stderr: true,
            max_stored_executions: 32,
            stored_execution_ttl: Duration::from_secs(5 * 60),
            creation_concurrency: 8,
        }
    }
}

/// Whether `put_environment` created the environment or replaced an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Updated,
}

/// A freshly claimed runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRunner {
    pub id: RunnerId,
    pub mapped_ports: Vec<MappedPort>,
}

/// One entry of `GET /statistics/execution-environments` (serializes as Poseidon does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatistics {
    pub id: EnvironmentId,
    pub prewarming_pool_size: u32,
    /// Runners ready to be claimed (creations in flight are not counted).
    pub idle_runners: usize,
    /// Claimed runners of the environment.
    pub used_runners: usize,
}

/// The handle to the core; clones share everything.
#[derive(Clone)]
pub struct Core {
    shared: Arc<Shared>,
    /// Stops the background tasks once the last handle is gone.
    _stop_background: Arc<DropGuard>,
}

/// What every handle and background task shares.
pub(crate) struct Shared {
    backend: Arc<dyn Backend>,
    config: CoreConfig,
    state: Mutex<State>,
    pub(crate) timer_wakeup: Notify,
    pub(crate) stopping: CancellationToken,
    creations: Semaphore,
    tasks: TaskTracker,
    store: Option<EnvironmentStore>,
    /// Serializes writes of the state file, so the last write holds the newest snapshot.
    persisting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    environments: BTreeMap<EnvironmentId, EnvironmentEntry>,
    used: HashMap<RunnerId, UsedRunner>,
    deadlines: Deadlines,
    last_generation: u64,
}

struct EnvironmentEntry {
    config: EnvironmentConfig,
    pool: Pool,
}

/// A claimed runner.
struct UsedRunner {
    environment: EnvironmentId,
    runner: Arc<dyn Runner>,
    _watcher: LostWatcher,
    /// `None`: never times out.
    inactivity_timeout: Option<Duration>,
    inactivity_deadline: Option<Instant>,
    stored: HashMap<ExecutionId, StoredExecution>,
    end: RunnerEnd,
}

impl UsedRunner {
    /// A claimed runner without inactivity timeout and without stored executions.
    fn new(environment: EnvironmentId, runner: Arc<dyn Runner>, watcher: LostWatcher) -> Self {
        Self {
            environment,
            runner,
            _watcher: watcher,
            inactivity_timeout: None,
            inactivity_deadline: None,
            stored: HashMap::new(),
            end: RunnerEnd::default(),
        }
    }
}

struct StoredExecution {
    request: ExecutionRequest,
    expires_at: Option<Instant>,
}

impl Core {
    /// Creates the core and its timer task; must be called inside a tokio runtime.
    pub fn new(backend: Arc<dyn Backend>, config: CoreConfig) -> Core {
        let stopping = CancellationToken::new();
        let shared = Arc::new(Shared {
            backend,
            store: config.state_dir.clone().map(EnvironmentStore::new),
            creations: Semaphore::new(config.creation_concurrency.max(1)),
            config,
            state: Mutex::new(State::default()),
            timer_wakeup: Notify::new(),
            stopping: stopping.clone(),
            tasks: TaskTracker::new(),
            persisting: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(timers::run(shared.clone()));
        Core { shared, _stop_background: Arc::new(stopping.drop_guard()) }
    }

    /// Restores what survived a restart and starts filling the pools; returns how many
    /// environments were restored.
    ///
    /// Environments the backend reports (Nomad's template jobs) win over the persisted ones:
    /// the cluster is the shared truth when several service instances or a Go Poseidon used it,
    /// and the state file is rewritten from them. Without any, the persisted environments are
    /// prepared with the backend; one it refuses is skipped (and logged), so one broken image
    /// does not keep the service from starting. Recovered runners rejoin their pools (claimed
    /// ones with a fresh, full inactivity timer); runners starting at the restart count towards
    /// their pool like creations in flight; surplus and orphaned runners are destroyed.
    pub async fn restore(&self) -> Result<usize, CoreError> {
        let recovery = self.shared.backend.recover().await.map_err(CoreError::Recover)?;
        let from_backend = !recovery.environments.is_empty();
        let configs = match &self.shared.store {
            _ if from_backend => recovery.environments.clone(),
            Some(store) => store.load().await?,
            None => Vec::new(),
        };
        let mut restored = Vec::new();
        for config in configs {
            let id = config.id;
            let prepared = match from_backend {
                true => Ok(()),
                false => self.shared.backend.prepare_environment(&config).await,
            };
            if let Err(error) = prepared {
                tracing::error!(environment = %id, %error, "cannot restore execution environment");
                continue;
            }
            let retired = self.shared.lock().apply_environment(config).1;
            self.shared.destroy_in_background(retired);
            restored.push(id);
        }
        self.shared.adopt(recovery);
        for id in &restored {
            self.shared.refill(*id);
        }
        if from_backend {
            self.shared.persist().await?;
        }
        Ok(restored.len())
    }

    /// Every environment, sorted by id.
    pub fn environments(&self) -> Vec<EnvironmentConfig> {
        self.shared.environments()
    }

    pub fn environment(&self, id: EnvironmentId) -> Option<EnvironmentConfig> {
        self.shared.lock().environments.get(&id).map(|entry| entry.config.clone())
    }

    /// Creates or replaces an environment. A changed configuration replaces every runner of it
    /// (claimed ones too); an identical one changes nothing.
    pub async fn put_environment(
        &self,
        config: EnvironmentConfig,
    ) -> Result<PutOutcome, EnvironmentError> {
        self.shared
            .backend
            .prepare_environment(&config)
            .await
            .map_err(EnvironmentError::Backend)?;
        let id = config.id;
        let (outcome, retired) = self.shared.lock().apply_environment(config);
        self.shared.destroy_in_background(retired);
        self.shared.refill(id);
        self.shared.persist().await?;
        Ok(outcome)
    }

    /// Deletes an environment; its runners are destroyed in the background.
    pub async fn delete_environment(&self, id: EnvironmentId) -> Result<(), EnvironmentError> {
        let retired = {
            let mut state = self.shared.lock();
            let mut entry = state.environments.remove(&id).ok_or(EnvironmentError::NotFound)?;
            let mut retired = entry.pool.drain();
            retired.extend(state.end_used_runners_of(id, EndReason::EnvironmentChanged));
            retired
        };
        self.shared.destroy_in_background(retired);
        self.shared.persist().await?;
        self.shared.backend.delete_environment(id).await.map_err(EnvironmentError::Backend)
    }

    /// Pool sizes and runner counts per environment, sorted by id.
    pub fn statistics(&self) -> Vec<EnvironmentStatistics> {
        let state = self.shared.lock();
        let mut used: HashMap<EnvironmentId, usize> = HashMap::new();
        for runner in state.used.values() {
            *used.entry(runner.environment).or_default() += 1;
        }
        state
            .environments
            .values()
            .map(|entry| EnvironmentStatistics {
                id: entry.config.id,
                prewarming_pool_size: entry.config.prewarming_pool_size,
                idle_runners: entry.pool.idle_count(),
                used_runners: used.get(&entry.config.id).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Environments whose share of idle runners is below `threshold`. A pool size of 0 is never
    /// depleting and a threshold of 0 disables the check, as in Go.
    pub fn depleting_environments(&self, threshold: f64) -> Vec<EnvironmentId> {
        self.statistics()
            .into_iter()
            .filter(|statistics| statistics.prewarming_pool_size > 0)
            .filter(|statistics| {
                (statistics.idle_runners as f64) / f64::from(statistics.prewarming_pool_size)
                    < threshold
            })
            .map(|statistics| statistics.id)
            .collect()
    }

    /// Hands out an idle runner of `environment` and starts its replacement.
    /// `inactivity_timeout` zero: the runner never times out.
    pub async fn claim(
        &self,
        environment: EnvironmentId,
        inactivity_timeout: Duration,
    ) -> Result<ClaimedRunner, ClaimError> {
        let claimed = self.shared.claim_idle(environment, inactivity_timeout);
        self.shared.refill(environment);
        let runner = claimed?;
        runner.claimed(inactivity_timeout);
        Ok(ClaimedRunner { id: runner.id().clone(), mapped_ports: runner.mapped_ports() })
    }

    /// Whether `id` is a claimed runner (idle runners are not addressable).
    pub fn has_runner(&self, id: &RunnerId) -> bool {
        self.shared.lock().used.contains_key(id)
    }

    /// Destroys a claimed runner; its executions end with `ERROR_STOPPED`. The runner is gone
    /// even when the backend reports an error.
    pub async fn destroy_runner(&self, id: &RunnerId) -> Result<(), RunnerError> {
        let used = self.shared.remove_used(id, EndReason::Destroyed).ok_or(RunnerError::Unknown)?;
        destroy_bounded(&used.runner).await.map_err(RunnerError::Backend)
    }

    /// Stores a one-shot execution until the client connects (or its TTL passes).
    pub fn store_execution(
        &self,
        runner: &RunnerId,
        request: ExecutionRequest,
    ) -> Result<ExecutionId, RunnerError> {
        let max = self.shared.config.max_stored_executions;
        let ttl = self.shared.config.stored_execution_ttl;
        let mut state = self.shared.lock();
        let used = state.used.get_mut(runner).ok_or(RunnerError::Unknown)?;
        if used.stored.len() >= max {
            return Err(RunnerError::TooManyExecutions);
        }
        let id = ExecutionId::new();
        let expires_at = (!ttl.is_zero()).then(|| Instant::now().checked_add(ttl)).flatten();
        used.stored.insert(id, StoredExecution { request, expires_at });
        if let Some(at) = expires_at {
            let earliest =
                state.deadlines.insert(at, TimerKey::StoredExecution(runner.clone(), id));
            drop(state);
            self.shared.wake_timers_if(earliest);
        }
        Ok(id)
    }

    /// Whether `execution` is stored for `runner` and can still be started.
    pub fn has_execution(&self, runner: &RunnerId, execution: ExecutionId) -> bool {
        self.shared.lock().used.get(runner).is_some_and(|used| used.stored.contains_key(&execution))
    }

    /// Pops a stored execution and starts it; resets the runner's inactivity timer.
    pub async fn start_execution(
        &self,
        runner: &RunnerId,
        execution: ExecutionId,
    ) -> Result<RunningExecution, StartError> {
        let (backend_runner, request, end) = self.shared.pop_execution(runner, execution)?;
        let exec_request = request.to_exec_request(self.shared.config.separate_stderr);
        let deadline = request.deadline(Instant::now());
        let handle = backend_runner.execute(exec_request).await.map_err(|error| {
            tracing::warn!(%runner, %error, "cannot start execution");
            StartError::Backend(error)
        })?;
        let weak = Arc::downgrade(&self.shared);
        let stuck_runner = runner.clone();
        let on_stuck = Box::new(move || {
            if let Some(shared) = weak.upgrade() {
                shared.destroy_used_in_background(&stuck_runner, EndReason::ExecutionDidNotStop);
            }
        });
        Ok(RunningExecution::new(runner.clone(), handle, end, deadline, on_stuck))
    }

    /// `PATCH …/files`; resets the inactivity timer.
    pub async fn update_files(
        &self,
        runner: &RunnerId,
        update: FileUpdate,
    ) -> Result<(), FileOpError> {
        let runner = self.shared.touch(runner)?;
        Ok(runner.update_files(update).await?)
    }

    /// `GET …/files`; resets the inactivity timer.
    pub async fn list_files(
        &self,
        runner: &RunnerId,
        request: ListRequest,
    ) -> Result<Vec<FileEntry>, FileOpError> {
        let runner = self.shared.touch(runner)?;
        Ok(runner.list_files(request).await?)
    }

    /// `GET …/files/raw`; resets the inactivity timer.
    pub async fn read_file(
        &self,
        runner: &RunnerId,
        path: &str,
        privileged: bool,
    ) -> Result<FileContent, FileOpError> {
        let runner = self.shared.touch(runner)?;
        Ok(runner.read_file(path, privileged).await?)
    }

    /// Stops timers and pool refills and destroys every runner, each destruction bounded.
    /// Runners of a backend whose runners outlive the service (Nomad) are kept for the next
    /// start's recovery; only their executions end.
    pub async fn shutdown(&self) {
        self.shared.stopping.cancel();
        let mut runners = self.shared.lock().take_all_runners();
        if self.shared.backend.runners_outlive_service() {
            runners.clear();
        }
        futures::future::join_all(runners.iter().map(|runner| async move {
            if let Err(error) = destroy_bounded(runner).await {
                tracing::warn!(runner = %runner.id(), %error, "cannot destroy runner at shutdown");
            }
        }))
        .await;
        self.shared.tasks.close();
        if tokio::time::timeout(SHUTDOWN_TASK_TIMEOUT, self.shared.tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not finish at shutdown");
        }
    }
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Core")
            .field("environments", &state.environments.len())
            .field("used_runners", &state.used.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough data: each update is small.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_timers_if(&self, earliest: bool) {
        if earliest {
            self.timer_wakeup.notify_one();
        }
    }

    fn environments(&self) -> Vec<EnvironmentConfig> {
        self.lock().environments.values().map(|entry| entry.config.clone()).collect()
    }

    async fn persist(&self) -> Result<(), StoreError> {
        let Some(store) = &self.store else { return Ok(()) };
        let _writing = self.persisting.lock().await;
        store.save(self.environments()).await
    }

    /// Moves the oldest idle runner of `environment` to the claimed runners.
    fn claim_idle(
        &self,
        environment: EnvironmentId,
        inactivity_timeout: Duration,
    ) -> Result<Arc<dyn Runner>, ClaimError> {
        let mut state = self.lock();
        let entry =
            state.environments.get_mut(&environment).ok_or(ClaimError::UnknownEnvironment)?;
        let idle = entry.pool.take_idle().ok_or(ClaimError::NoIdleRunner)?;
        let id = idle.runner.id().clone();
        let runner = idle.runner.clone();
        let mut used = UsedRunner::new(environment, idle.runner, idle.watcher);
        used.inactivity_timeout = (!inactivity_timeout.is_zero()).then_some(inactivity_timeout);
        let earliest = state.deadlines.reset_inactivity(&id, &mut used);
        state.used.insert(id, used);
        drop(state);
        self.wake_timers_if(earliest);
        Ok(runner)
    }

    /// Removes a claimed runner and ends its executions with `reason`; the caller destroys it.
    fn remove_used(&self, id: &RunnerId, reason: EndReason) -> Option<UsedRunner> {
        self.lock().remove_used(id, reason)
    }

    fn destroy_used_in_background(&self, id: &RunnerId, reason: EndReason) {
        if let Some(used) = self.remove_used(id, reason) {
            self.destroy_in_background(vec![used.runner]);
        }
    }

    /// A claimed runner for a file operation, with its inactivity timer reset.
    fn touch(&self, id: &RunnerId) -> Result<Arc<dyn Runner>, FileOpError> {
        let mut state = self.lock();
        let State { used, deadlines, .. } = &mut *state;
        let used = used.get_mut(id).ok_or(FileOpError::UnknownRunner)?;
        let earliest = deadlines.reset_inactivity(id, used);
        let runner = used.runner.clone();
        drop(state);
        self.wake_timers_if(earliest);
        Ok(runner)
    }

    fn pop_execution(
        &self,
        id: &RunnerId,
        execution: ExecutionId,
    ) -> Result<(Arc<dyn Runner>, ExecutionRequest, RunnerEnd), StartError> {
        let mut state = self.lock();
        let State { used, deadlines, .. } = &mut *state;
        let used = used.get_mut(id).ok_or(StartError::UnknownRunner)?;
        let stored = used.stored.remove(&execution).ok_or(StartError::UnknownExecution)?;
        if let Some(at) = stored.expires_at {
            deadlines.remove(at, TimerKey::StoredExecution(id.clone(), execution));
        }
        let earliest = deadlines.reset_inactivity(id, used);
        let popped = (used.runner.clone(), stored.request, used.end.clone());
        drop(state);
        self.wake_timers_if(earliest);
        Ok(popped)
    }

    /// Handles every deadline up to `now`; returns the next one.
    pub(crate) fn expire_due(&self, now: Instant) -> Option<Instant> {
        let mut timed_out = Vec::new();
        let next = {
            let mut state = self.lock();
            for key in state.deadlines.pop_expired(now) {
                match key {
                    TimerKey::Inactivity(id) => {
                        if let Some(used) = state.remove_used(&id, EndReason::InactivityTimeout) {
                            tracing::info!(runner = %id, "runner inactivity timeout exceeded");
                            timed_out.push(used.runner);
                        }
                    }
                    TimerKey::StoredExecution(id, execution) => {
                        if let Some(used) = state.used.get_mut(&id) {
                            used.stored.remove(&execution);
                        }
                    }
                }
            }
            state.deadlines.next()
        };
        self.destroy_in_background(timed_out);
        next
    }

    /// Starts creators that bring `environment`'s pool to its size.
    fn refill(self: &Arc<Self>, environment: EnvironmentId) {
        if self.stopping.is_cancelled() {
            return;
        }
        let (config, generation, count) = {
            let mut state = self.lock();
            let Some(entry) = state.environments.get_mut(&environment) else { return };
            let size = entry.config.prewarming_pool_size as usize;
            let count = entry.pool.reserve_creations(size, self.config.creation_concurrency.max(1));
            (entry.config.clone(), entry.pool.generation(), count)
        };
        for _ in 0..count {
            let shared = self.clone();
            let config = config.clone();
            self.tasks.spawn(async move { shared.fill_pool(config, generation).await });
        }
    }

    /// Creates runners for the pool while some are missing, each failure retried with
    /// exponential back-off, until the pool is full, replaced by a newer generation or the core
    /// stops. Holds one reservation of the pool all along.
    async fn fill_pool(self: Arc<Self>, config: EnvironmentConfig, generation: u64) {
        let mut backoff = INITIAL_CREATION_BACKOFF;
        while self.is_current(config.id, generation) {
            let permit = tokio::select! {
                () = self.stopping.cancelled() => return,
                permit = self.creations.acquire() => permit.expect("the semaphore is never closed"),
            };
            let Some(result) = self.create_runner(&config).await else { return };
            drop(permit);
            match result {
                Ok(runner) => {
                    if !self.add_created(config.id, generation, runner) {
                        return;
                    }
                    backoff = INITIAL_CREATION_BACKOFF;
                }
                Err(error) => {
                    tracing::warn!(environment = %config.id, %error, retry_in = ?backoff, "cannot create runner");
                    tokio::select! {
                        () = self.stopping.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_CREATION_BACKOFF);
                }
            }
        }
    }

    /// The backend's creation; `None` when the core stops first. Only a backend whose runners
    /// outlive the service is interrupted (its half-created runner is recovered at the next
    /// start); a local creation runs to its end so that nothing it set up leaks.
    async fn create_runner(
        &self,
        config: &EnvironmentConfig,
    ) -> Option<Result<Arc<dyn Runner>, crate::backend::BackendError>> {
        let creation = self.backend.create_runner(config, RunnerId::new(config.id));
        if !self.backend.runners_outlive_service() {
            return Some(creation.await);
        }
        tokio::select! {
            () = self.stopping.cancelled() => None,
            result = creation => Some(result),
        }
    }

    /// Puts recovered runners back: idle ones into their pools while there is room, claimed
    /// ones into the used map with a full inactivity timer, starting ones as reservations of
    /// their pools. Runners of unknown environments and surplus ones are destroyed.
    fn adopt(self: &Arc<Self>, recovery: Recovery) {
        let mut surplus = Vec::new();
        let mut state = self.lock();
        for (environment, runner) in recovery.idle {
            let Some(entry) = state.environments.get_mut(&environment) else {
                surplus.push(runner);
                continue;
            };
            let size = entry.config.prewarming_pool_size as usize;
            let idle = IdleRunner { watcher: self.watch_lost(runner.clone()), runner };
            if let Err(idle) = entry.pool.adopt_idle(idle, size) {
                surplus.push(idle.runner);
            }
        }
        let mut wake = false;
        for (environment, runner, inactivity_timeout) in recovery.used {
            if !state.environments.contains_key(&environment) {
                surplus.push(runner);
                continue;
            }
            let id = runner.id().clone();
            let mut used = UsedRunner::new(environment, runner.clone(), self.watch_lost(runner));
            used.inactivity_timeout = (!inactivity_timeout.is_zero()).then_some(inactivity_timeout);
            wake |= state.deadlines.reset_inactivity(&id, &mut used);
            state.used.insert(id, used);
        }
        for (environment, starting) in recovery.starting {
            let reserved = state.environments.get_mut(&environment).and_then(|entry| {
                let size = entry.config.prewarming_pool_size as usize;
                entry
                    .pool
                    .reserve_starting(size)
                    .then(|| (entry.config.clone(), entry.pool.generation()))
            });
            let shared = self.clone();
            match reserved {
                Some((config, generation)) => self.tasks.spawn(async move {
                    shared.finish_starting(config, generation, starting).await
                }),
                None => {
                    self.tasks.spawn(async move { shared.destroy_when_started(starting).await })
                }
            };
        }
        drop(state);
        self.wake_timers_if(wake);
        if !surplus.is_empty() {
            tracing::info!(count = surplus.len(), "destroying surplus recovered runners");
        }
        self.destroy_in_background(surplus);
    }

    /// Waits for a runner that was starting at the restart, holding its pool reservation, then
    /// goes on like any creator of the pool.
    async fn finish_starting(
        self: Arc<Self>,
        config: EnvironmentConfig,
        generation: u64,
        starting: StartingRunner,
    ) {
        let result = tokio::select! {
            () = self.stopping.cancelled() => return,
            result = starting => result,
        };
        match result {
            Ok(runner) => {
                if !self.add_created(config.id, generation, runner) {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(environment = %config.id, %error, "recovered runner did not start");
            }
        }
        self.fill_pool(config, generation).await;
    }

    /// A surplus runner that was starting at the restart: destroyed once it exists.
    async fn destroy_when_started(self: Arc<Self>, starting: StartingRunner) {
        let result = tokio::select! {
            () = self.stopping.cancelled() => return,
            result = starting => result,
        };
        if let Ok(runner) = result {
            self.destroy_in_background(vec![runner]);
        }
    }

    fn is_current(&self, environment: EnvironmentId, generation: u64) -> bool {
        !self.stopping.is_cancelled()
            && self
                .lock()
                .environments
                .get(&environment)
                .is_some_and(|entry| entry.pool.generation() == generation)
    }

    /// Adds a created runner to its pool, or destroys it when the pool was replaced meanwhile.
    /// Returns whether the pool still misses runners (the creator goes on).
    fn add_created(
        self: &Arc<Self>,
        environment: EnvironmentId,
        generation: u64,
        runner: Arc<dyn Runner>,
    ) -> bool {
        let mut state = self.lock();
        let entry = state
            .environments
            .get_mut(&environment)
            .filter(|entry| entry.pool.generation() == generation && !self.stopping.is_cancelled());
        match entry {
            Some(entry) => {
                let watcher = self.watch_lost(runner.clone());
                let size = entry.config.prewarming_pool_size as usize;
                entry.pool.add_created(IdleRunner { runner, watcher }, size)
            }
            None => {
                drop(state);
                self.destroy_in_background(vec![runner]);
                false
            }
        }
    }

    /// Watches a runner for dying on its own; the watcher lives as long as the runner's record.
    fn watch_lost(self: &Arc<Self>, runner: Arc<dyn Runner>) -> LostWatcher {
        let shared: Weak<Shared> = Arc::downgrade(self);
        LostWatcher::new(tokio::spawn(async move {
            let reason = runner.lost().await;
            if let Some(shared) = shared.upgrade() {
                shared.runner_lost(runner.id(), reason);
            }
        }))
    }

    /// A runner died on its own: a claimed one ends its executions and is gone; an idle one is
    /// replaced. A runner the core is destroying itself also ends its `lost()`; only runners
    /// the core still holds count as lost.
    fn runner_lost(self: &Arc<Self>, id: &RunnerId, reason: LostReason) {
        let mut state = self.lock();
        if let Some(used) = state.remove_used(id, EndReason::Lost(reason.clone())) {
            drop(state);
            tracing::warn!(runner = %id, ?reason, "claimed runner lost");
            return self.destroy_in_background(vec![used.runner]);
        }
        let found = state
            .environments
            .iter_mut()
            .find_map(|(environment, entry)| Some((*environment, entry.pool.remove_idle(id)?)));
        drop(state);
        if let Some((environment, idle)) = found {
            tracing::warn!(runner = %id, ?reason, "idle runner lost");
            self.destroy_in_background(vec![idle.runner]);
            self.refill(environment);
        }
    }

    /// Releases runners the core no longer holds, each destruction bounded.
    fn destroy_in_background(&self, runners: Vec<Arc<dyn Runner>>) {
        for runner in runners {
            self.tasks.spawn(async move {
                if let Err(error) = destroy_bounded(&runner).await {
                    tracing::warn!(runner = %runner.id(), %error, "cannot destroy runner");
                }
            });
        }
    }
}

impl State {
    fn next_generation(&mut self) -> u64 {
        self.last_generation += 1;
        self.last_generation
    }

    /// Stores `config`; returns the outcome and the runners to destroy because it changed.
    fn apply_environment(
        &mut self,
        config: EnvironmentConfig,
    ) -> (PutOutcome, Vec<Arc<dyn Runner>>) {
        let generation = self.next_generation();
        let id = config.id;
        let Some(entry) = self.environments.get_mut(&id) else {
            self.environments.insert(id, EnvironmentEntry { config, pool: Pool::new(generation) });
            return (PutOutcome::Created, Vec::new());
        };
        if entry.config == config {
            return (PutOutcome::Updated, Vec::new());
        }
        let mut retired = entry.pool.drain();
        *entry = EnvironmentEntry { config, pool: Pool::new(generation) };
        retired.extend(self.end_used_runners_of(id, EndReason::EnvironmentChanged));
        (PutOutcome::Updated, retired)
    }

    fn end_used_runners_of(
        &mut self,
        environment: EnvironmentId,
        reason: EndReason,
    ) -> Vec<Arc<dyn Runner>> {
        let ids: Vec<RunnerId> = self
            .used
            .iter()
            .filter(|(_, used)| used.environment == environment)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| self.remove_used(id, reason.clone()))
            .map(|used| used.runner)
            .collect()
    }

    fn remove_used(&mut self, id: &RunnerId, reason: EndReason) -> Option<UsedRunner> {
        let used = self.used.remove(id)?;
        if let Some(at) = used.inactivity_deadline {
            self.deadlines.remove(at, TimerKey::Inactivity(id.clone()));
        }
        for (execution, stored) in &used.stored {
            if let Some(at) = stored.expires_at {
                self.deadlines.remove(at, TimerKey::StoredExecution(id.clone(), *execution));
            }
        }
        used.end.end(reason);
        Some(used)
    }

    /// Empties every pool and the used map (environments stay), for shutdown.
    fn take_all_runners(&mut self) -> Vec<Arc<dyn Runner>> {
        let mut runners: Vec<Arc<dyn Runner>> =
            self.environments.values_mut().flat_map(|entry| entry.pool.drain()).collect();
        let ids: Vec<RunnerId> = self.used.keys().cloned().collect();
        runners.extend(
            ids.iter()
                .filter_map(|id| self.remove_used(id, EndReason::Shutdown))
                .map(|used| used.runner),
        );
        runners
    }
}

impl Deadlines {
    /// Restarts a claimed runner's inactivity timer from its full duration; `true` when the
    /// timer task must wake up.
    fn reset_inactivity(&mut self, id: &RunnerId, used: &mut UsedRunner) -> bool {
        if let Some(previous) = used.inactivity_deadline.take() {
            self.remove(previous, TimerKey::Inactivity(id.clone()));
        }
        let Some(at) =
            used.inactivity_timeout.and_then(|timeout| Instant::now().checked_add(timeout))
        else {
            return false;
        };
        used.inactivity_deadline = Some(at);
        self.insert(at, TimerKey::Inactivity(id.clone()))
    }
}

/// The backend's `destroy`, bounded so that a hanging backend cannot hang the caller.
async fn destroy_bounded(runner: &Arc<dyn Runner>) -> Result<(), crate::backend::BackendError> {
    match tokio::time::timeout(DESTROY_TIMEOUT, runner.destroy()).await {
        Ok(result) => result,
        Err(_) => Err(crate::backend::BackendError::Internal(format!(
            "destroying runner {} timed out after {DESTROY_TIMEOUT:?}",
            runner.id()
        ))),
    }
}
