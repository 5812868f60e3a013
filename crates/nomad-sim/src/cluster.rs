//! The simulated cluster's state and its transitions, all synchronous under one lock.
//!
//! Every operation bumps the global index, changes the state and publishes the event lines
//! Nomad would publish (`events`). What has to happen later or outside the lock (a
//! scheduling delay, starting or killing a sandbox) is returned as [`Effects`] for the
//! driver to carry out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use poseidon_sandbox::Sandbox;
use serde_json::Value;

use crate::events::{Event, EventBuffer};
use crate::jobspec::{GroupSpec, JobSpec};
use crate::render;

/// Allocations kept after they became terminal; older ones are garbage-collected.
const MAX_TERMINAL_ALLOCS: usize = 2000;
/// Terminal evaluations kept; older ones are garbage-collected.
const MAX_TERMINAL_EVALS: usize = 4000;
/// Task events kept per task, as Nomad does.
const MAX_TASK_EVENTS: usize = 10;
/// The simulated node.
pub(crate) const NODE_ID: &str = "f3d9a0c4-5e1b-4c2a-9b7d-2d6f0e8a1c11";
pub(crate) const NODE_NAME: &str = "nomad-sim-node";

/// Nanoseconds since the Unix epoch, Nomad's timestamp unit.
pub(crate) fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A registered job.
#[derive(Clone, Debug)]
pub(crate) struct JobRecord {
    pub spec: JobSpec,
    pub version: u64,
    pub stop: bool,
    pub submit_time: i64,
    pub create_index: u64,
    pub modify_index: u64,
    pub job_modify_index: u64,
    pub status: &'static str,
}

/// An evaluation.
#[derive(Clone, Debug)]
pub(crate) struct Eval {
    pub id: String,
    pub namespace: String,
    pub job_id: String,
    pub job_modify_index: u64,
    pub job_type: String,
    pub priority: i64,
    pub triggered_by: &'static str,
    pub status: &'static str,
    pub status_description: String,
    pub failed_tg_allocs: BTreeMap<String, u32>,
    pub blocked_eval: String,
    pub previous_eval: String,
    pub wait_until: Option<i64>,
    pub queued: BTreeMap<String, u32>,
    pub create_index: u64,
    pub modify_index: u64,
    pub create_time: i64,
    pub modify_time: i64,
}

impl Eval {
    fn is_terminal(&self) -> bool {
        matches!(self.status, "complete" | "failed" | "canceled")
    }
}

/// One task event (`TaskEvent`).
#[derive(Clone, Debug)]
pub(crate) struct TaskEvent {
    pub kind: &'static str,
    pub time: i64,
    pub message: String,
    pub details: BTreeMap<String, String>,
    pub fails_task: bool,
    pub exit_code: i64,
    pub restart_reason: String,
    pub start_delay: i64,
}

impl TaskEvent {
    fn new(kind: &'static str, message: &str) -> TaskEvent {
        TaskEvent {
            kind,
            time: now_nanos(),
            message: message.to_owned(),
            details: BTreeMap::new(),
            fails_task: false,
            exit_code: 0,
            restart_reason: String::new(),
            start_delay: 0,
        }
    }

    fn detail(mut self, key: &str, value: impl Into<String>) -> TaskEvent {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// One task's state (`TaskState`).
#[derive(Clone, Debug)]
pub(crate) struct TaskState {
    pub state: &'static str,
    pub failed: bool,
    pub restarts: u64,
    pub last_restart: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub events: VecDeque<TaskEvent>,
}

impl TaskState {
    fn push(&mut self, event: TaskEvent) {
        if self.events.len() == MAX_TASK_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// A host port given to an allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortMapping {
    pub label: String,
    pub value: u16,
    pub to: i64,
}

/// An allocation.
#[derive(Debug)]
pub(crate) struct Alloc {
    pub id: String,
    pub namespace: String,
    pub eval_id: String,
    pub name: String,
    pub job_id: String,
    pub job_create_index: u64,
    pub job_version: u64,
    /// The job as it was when the allocation was placed or last updated in place.
    pub job: Value,
    pub group: GroupSpec,
    pub slot: u32,
    pub ports: Vec<PortMapping>,
    pub desired_status: &'static str,
    pub desired_description: String,
    pub migrate: bool,
    pub client_status: &'static str,
    pub client_description: String,
    pub task_states: BTreeMap<String, TaskState>,
    pub previous_allocation: String,
    pub next_allocation: String,
    pub followup_eval_id: String,
    pub reschedule_events: Vec<(i64, String)>,
    pub force_reschedule: bool,
    pub create_index: u64,
    pub modify_index: u64,
    pub alloc_modify_index: u64,
    pub create_time: i64,
    pub modify_time: i64,
    /// Bumped whenever the client side starts over (restart, stop); stale work checks it.
    pub incarnation: u64,
    pub sandbox: Option<Arc<Sandbox>>,
}

impl Alloc {
    pub fn client_terminal(&self) -> bool {
        matches!(self.client_status, "complete" | "failed" | "lost")
    }

    /// Nomad's `TerminalStatus`: desired stop/evict or a terminal client status.
    pub fn terminal(&self) -> bool {
        self.desired_status != "run" || self.client_terminal()
    }

    /// Uses a slot of the node's capacity.
    fn occupies_node(&self) -> bool {
        matches!(self.client_status, "pending" | "running")
    }
}

/// Work the driver must do after an operation, outside the lock.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Allocations whose client side starts (placement) or starts again (restart).
    pub start: Vec<(String, u64, bool)>,
    /// Allocations the client must kill (desired stop), with the incarnation to kill.
    pub kill: Vec<(String, u64)>,
    /// Sandboxes to destroy.
    pub destroy: Vec<Arc<Sandbox>>,
    /// Evaluations to hand to the scheduler after a delay.
    pub delayed_evals: Vec<(String, Duration)>,
    /// Pending evaluations were queued.
    pub wake_scheduler: bool,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.start.extend(other.start);
        self.kill.extend(other.kill);
        self.destroy.extend(other.destroy);
        self.delayed_evals.extend(other.delayed_evals);
        self.wake_scheduler |= other.wake_scheduler;
    }
}

/// Why a register was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    #[error("job {job:?} is in nonexistent namespace {namespace:?}")]
    Namespace { job: String, namespace: String },
    #[error("the simulator holds {0} jobs, its limit")]
    TooManyJobs(usize),
}

/// What a register answers.
#[derive(Debug)]
pub(crate) struct Registered {
    pub eval_id: String,
    pub index: u64,
    pub warnings: String,
}

/// What a deregister answers.
#[derive(Debug)]
pub(crate) struct Deregistered {
    pub eval_id: String,
    pub index: u64,
}

/// Why a fault could not be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("allocation {0} does not exist")]
    UnknownAllocation(String),
    #[error("allocation {id} is {status}, not {expected}")]
    WrongState { id: String, status: String, expected: &'static str },
}

/// Settings the cluster reads while it schedules.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub restart_delay: Duration,
    pub reschedule_delay: Duration,
    pub memory_oversubscription: bool,
    pub max_jobs: usize,
    pub max_allocations: usize,
    pub suppress_stop_events: bool,
}

/// The whole simulated cluster.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub index: u64,
    pub namespaces: BTreeSet<String>,
    pub jobs: BTreeMap<(String, String), JobRecord>,
    pub evals: HashMap<String, Eval>,
    /// By ID, so iteration is in UUID order like Nomad's state store.
    pub allocs: BTreeMap<String, Alloc>,
    pub capacity: Option<usize>,
    pub events: EventBuffer,
    pub policy: Policy,
    queue: VecDeque<String>,
    ports: PortAllocator,
    last_eval: String,
}

impl Cluster {
    pub fn new(namespaces: BTreeSet<String>, buffer_size: usize, policy: Policy) -> Cluster {
        Cluster {
            index: 1,
            namespaces,
            jobs: BTreeMap::new(),
            evals: HashMap::new(),
            allocs: BTreeMap::new(),
            capacity: None,
            events: EventBuffer::new(buffer_size),
            policy,
            queue: VecDeque::new(),
            ports: PortAllocator::default(),
            last_eval: String::new(),
        }
    }

    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Per-group counts for a job's list stub: queued, complete, failed, running, starting,
    /// lost, unknown.
    pub fn summary(&self, namespace: &str, job_id: &str) -> render::GroupSummary {
        let mut summary = render::GroupSummary::new();
        if let Some(job) = self.jobs.get(&(namespace.to_owned(), job_id.to_owned())) {
            for group in &job.spec.groups {
                summary.insert(group.name.clone(), [0; 7]);
            }
        }
        for alloc in self.allocs.values().filter(|a| a.namespace == namespace && a.job_id == job_id)
        {
            let slot = match alloc.client_status {
                "complete" => 1,
                "failed" => 2,
                "running" => 3,
                "pending" => 4,
                "lost" => 5,
                _ => 6,
            };
            summary.entry(alloc.group.name.clone()).or_insert([0; 7])[slot] += 1;
        }
        for eval in self.evals.values() {
            if eval.status == "blocked" && eval.namespace == namespace && eval.job_id == job_id {
                for (group, queued) in &eval.queued {
                    summary.entry(group.clone()).or_insert([0; 7])[0] += u64::from(*queued);
                }
            }
        }
        summary
    }

    /// A job's `Type`, `service` when unknown.
    pub fn job_type(&self, namespace: &str, job_id: &str) -> String {
        self.jobs
            .get(&(namespace.to_owned(), job_id.to_owned()))
            .and_then(|j| j.spec.value["Type"].as_str())
            .unwrap_or("service")
            .to_owned()
    }

    /// The evaluation created last and the current index.
    pub fn last_eval(&self) -> (String, u64) {
        (self.last_eval.clone(), self.index)
    }

    /// Hands a delayed evaluation to the scheduler.
    pub fn queue_eval(&mut self, id: &str) {
        let pending = self.evals.get(id).is_some_and(|e| e.status == "pending");
        if pending && !self.queue.iter().any(|e| e == id) {
            self.queue.push_back(id.to_owned());
        }
    }

    /// The next evaluation the scheduler should process.
    pub fn next_queued_eval(&mut self) -> Option<String> {
        self.queue.pop_front()
    }

    // ---- jobs ------------------------------------------------------------------------------

    /// Registers or updates a job: job and evaluation lines at one index.
    pub fn register(&mut self, spec: JobSpec) -> Result<(Registered, Effects), RegisterError> {
        let key = (spec.namespace.clone(), spec.id.clone());
        if !self.namespaces.contains(&spec.namespace) {
            return Err(RegisterError::Namespace { job: spec.id, namespace: spec.namespace });
        }
        if !self.jobs.contains_key(&key) && self.jobs.len() >= self.policy.max_jobs {
            return Err(RegisterError::TooManyJobs(self.jobs.len()));
        }
        let warnings = self.oversubscription_warnings(&spec);
        let index = self.bump();
        let now = now_nanos();
        let record = match self.jobs.remove(&key) {
            Some(mut old) => {
                let changed = old.spec.value != spec.value || old.stop;
                if changed {
                    old.version += 1;
                }
                old.spec = spec;
                old.stop = false;
                old.modify_index = index;
                old.job_modify_index = index;
                old.submit_time = now;
                old
            }
            None => JobRecord {
                spec,
                version: 0,
                stop: false,
                submit_time: now,
                create_index: index,
                modify_index: index,
                job_modify_index: index,
                status: "pending",
            },
        };
        self.jobs.insert(key.clone(), record);
        let eval_id = self.create_eval(&key.0, &key.1, "job-register", index, "pending");
        let job_event = self.job_event("JobRegistered", &key, index, true);
        self.events.publish(index, vec![job_event]);
        let eval_event = self.eval_event("JobRegistered", &eval_id);
        self.events.publish(index, vec![eval_event]);
        let effects = Effects { wake_scheduler: true, ..Effects::default() };
        Ok((Registered { eval_id, index, warnings }, effects))
    }

    fn oversubscription_warnings(&self, spec: &JobSpec) -> String {
        if self.policy.memory_oversubscription {
            return String::new();
        }
        let mut warnings = Vec::new();
        for group in &spec.groups {
            for task in group.tasks.iter().filter(|t| t.memory_max_mb > 0) {
                warnings.push(format!(
                    "Memory oversubscription is not enabled; Task \"{}.{}\" memory_max value will \
                     be ignored. Update the Scheduler Configuration to allow oversubscription.",
                    group.name, task.name
                ));
            }
        }
        warnings.join("\n")
    }

    /// Stops a job (and with `purge` deletes it). A missing job answers an empty result.
    pub fn deregister(
        &mut self,
        namespace: &str,
        id: &str,
        purge: bool,
    ) -> (Deregistered, Effects) {
        let key = (namespace.to_owned(), id.to_owned());
        if !self.jobs.contains_key(&key) {
            return (Deregistered { eval_id: String::new(), index: 0 }, Effects::default());
        }
        let index = self.bump();
        // A purge reports the job as it was; a stop reports the stopped job.
        let job_event = if purge {
            let event = self.job_event("JobDeregistered", &key, index, false);
            self.jobs.remove(&key);
            event
        } else {
            if let Some(job) = self.jobs.get_mut(&key) {
                job.stop = true;
                job.modify_index = index;
                job.job_modify_index = index;
            }
            self.job_event("JobDeregistered", &key, index, true)
        };
        let eval_id = self.create_eval(namespace, id, "job-deregister", index, "pending");
        self.events.publish(index, vec![job_event]);
        let eval_event = self.eval_event("JobDeregistered", &eval_id);
        self.events.publish(index, vec![eval_event]);
        (Deregistered { eval_id, index }, Effects { wake_scheduler: true, ..Effects::default() })
    }

    /// Nomad's `getJobStatus`.
    fn compute_job_status(&self, namespace: &str, id: &str) -> &'static str {
        let Some(job) = self.jobs.get(&(namespace.to_owned(), id.to_owned())) else {
            return "dead";
        };
        if job.stop {
            return "dead";
        }
        let mine = |a: &&Alloc| {
            a.namespace == namespace && a.job_id == id && a.job_create_index >= job.create_index
        };
        if self.allocs.values().filter(mine).any(|a| !a.terminal()) {
            return "running";
        }
        let eval_live = self
            .evals
            .values()
            .any(|e| e.namespace == namespace && e.job_id == id && !e.is_terminal());
        if eval_live { "pending" } else { "dead" }
    }

    /// Recomputes a job's status; returns its event when it changed.
    fn refresh_job_status(
        &mut self,
        namespace: &str,
        id: &str,
        kind: &'static str,
    ) -> Option<Event> {
        let status = self.compute_job_status(namespace, id);
        let key = (namespace.to_owned(), id.to_owned());
        let index = self.index;
        let job = self.jobs.get_mut(&key)?;
        if job.status == status {
            return None;
        }
        job.status = status;
        job.modify_index = index;
        Some(self.job_event(kind, &key, index, false))
    }

    fn job_event(
        &mut self,
        kind: &'static str,
        key: &(String, String),
        index: u64,
        refresh: bool,
    ) -> Event {
        if refresh {
            let status = self.compute_job_status(&key.0, &key.1);
            if let Some(job) = self.jobs.get_mut(key) {
                job.status = status;
            }
        }
        let payload = match self.jobs.get(key) {
            Some(job) => render::job(job),
            None => Value::Null,
        };
        Event {
            topic: "Job",
            kind,
            key: key.1.clone(),
            namespace: key.0.clone(),
            filter_keys: None,
            index,
            payload: serde_json::json!({ "Job": payload }),
        }
    }

    // ---- evaluations -----------------------------------------------------------------------

    fn create_eval(
        &mut self,
        namespace: &str,
        job_id: &str,
        triggered_by: &'static str,
        index: u64,
        status: &'static str,
    ) -> String {
        let id = new_id();
        let now = now_nanos();
        let job = self.jobs.get(&(namespace.to_owned(), job_id.to_owned()));
        let job_modify_index = job.map_or(0, |j| j.job_modify_index);
        let job_type =
            job.and_then(|j| j.spec.value["Type"].as_str()).unwrap_or("service").to_owned();
        let priority = job.and_then(|j| j.spec.value["Priority"].as_i64()).unwrap_or(50);
        self.evals.insert(
            id.clone(),
            Eval {
                id: id.clone(),
                namespace: namespace.to_owned(),
                job_id: job_id.to_owned(),
                job_modify_index,
                job_type,
                priority,
                triggered_by,
                status,
                status_description: String::new(),
                failed_tg_allocs: BTreeMap::new(),
                blocked_eval: String::new(),
                previous_eval: String::new(),
                wait_until: None,
                queued: BTreeMap::new(),
                create_index: index,
                modify_index: index,
                create_time: now,
                modify_time: now,
            },
        );
        if status == "pending" {
            self.queue.push_back(id.clone());
        }
        self.last_eval = id.clone();
        self.gc_evals();
        id
    }

    fn eval_event(&self, kind: &'static str, id: &str) -> Event {
        let eval = &self.evals[id];
        Event {
            topic: "Evaluation",
            kind,
            key: eval.id.clone(),
            namespace: eval.namespace.clone(),
            filter_keys: Some(vec![eval.job_id.clone(), String::new()]),
            index: self.index,
            payload: serde_json::json!({ "Evaluation": render::eval(eval) }),
        }
    }

    fn gc_evals(&mut self) {
        let terminal = self.evals.values().filter(|e| e.is_terminal()).count();
        if terminal <= MAX_TERMINAL_EVALS {
            return;
        }
        let mut old: Vec<(u64, String)> = self
            .evals
            .values()
            .filter(|e| e.is_terminal())
            .map(|e| (e.modify_index, e.id.clone()))
            .collect();
        old.sort();
        for (_, id) in old.into_iter().take(terminal - MAX_TERMINAL_EVALS) {
            self.evals.remove(&id);
        }
    }

    /// Requeues blocked evaluations when the node has room again.
    fn unblock(&mut self) -> bool {
        if !self.has_room() {
            return false;
        }
        let mut blocked: Vec<(u64, String)> = self
            .evals
            .values()
            .filter(|e| e.status == "blocked")
            .map(|e| (e.create_index, e.id.clone()))
            .collect();
        blocked.sort();
        let any = !blocked.is_empty();
        for (_, id) in blocked {
            if !self.queue.contains(&id) {
                self.queue.push_back(id);
            }
        }
        any
    }

    pub fn set_capacity(&mut self, capacity: Option<usize>) -> Effects {
        self.capacity = capacity;
        Effects { wake_scheduler: self.unblock(), ..Effects::default() }
    }

    fn has_room(&self) -> bool {
        let used = self.allocs.values().filter(|a| a.occupies_node()).count();
        let live = self.allocs.values().filter(|a| !a.client_terminal()).count();
        self.capacity.is_none_or(|c| used < c) && live < self.policy.max_allocations
    }

    // ---- the scheduler ---------------------------------------------------------------------

    /// Processes one evaluation: the plan (`PlanResult`), then the evaluation's end
    /// (`EvaluationUpdated`), and a blocked evaluation for what did not fit.
    pub fn process_eval(&mut self, eval_id: &str) -> Effects {
        let Some(eval) = self.evals.get(eval_id) else {
            return Effects::default();
        };
        if !matches!(eval.status, "pending" | "blocked") {
            return Effects::default();
        }
        let (namespace, job_id, was_blocked) =
            (eval.namespace.clone(), eval.job_id.clone(), eval.status == "blocked");
        let key = (namespace.clone(), job_id.clone());
        let mut plan = Plan::default();
        let mut effects = Effects::default();
        let index = self.bump();
        if !was_blocked {
            self.cancel_blocked_evals(&namespace, &job_id, eval_id, &mut plan);
        }
        match self.jobs.get(&key).filter(|j| !j.stop).cloned() {
            None => self.plan_stop_all(&namespace, &job_id, &mut plan, &mut effects),
            Some(job) => self.plan_job(&job, eval_id, &mut plan, &mut effects),
        }
        if was_blocked && !plan.failed.is_empty() {
            // Not everything fits yet: the evaluation stays blocked (Nomad re-blocks it).
            if plan.changed.is_empty() {
                self.index -= 1;
            } else {
                self.publish_plan(eval_id, &namespace, &job_id, index, &plan);
            }
            if let Some(eval) = self.evals.get_mut(eval_id) {
                eval.failed_tg_allocs = plan.failed.clone();
                eval.queued = plan.failed;
            }
            return effects;
        }
        self.publish_plan(eval_id, &namespace, &job_id, index, &plan);
        self.finish_eval(eval_id, &namespace, &job_id, plan.failed, was_blocked);
        effects
    }

    fn cancel_blocked_evals(
        &mut self,
        namespace: &str,
        job_id: &str,
        current: &str,
        plan: &mut Plan,
    ) {
        let index = self.index;
        for eval in self.evals.values_mut() {
            if eval.status == "blocked"
                && eval.namespace == namespace
                && eval.job_id == job_id
                && eval.id != current
            {
                eval.status = "canceled";
                eval.status_description = "evaluation superseded by a newer one".into();
                eval.modify_index = index;
                eval.modify_time = now_nanos();
                plan.canceled.push(eval.id.clone());
            }
        }
    }

    fn plan_stop_all(
        &mut self,
        namespace: &str,
        job_id: &str,
        plan: &mut Plan,
        effects: &mut Effects,
    ) {
        let ids: Vec<String> = self
            .allocs
            .values()
            .filter(|a| a.namespace == namespace && a.job_id == job_id && a.desired_status == "run")
            .map(|a| a.id.clone())
            .collect();
        for id in ids {
            self.stop_alloc(&id, "alloc not needed due to job update", plan, effects);
        }
    }

    fn stop_alloc(&mut self, id: &str, reason: &str, plan: &mut Plan, effects: &mut Effects) {
        let index = self.index;
        let Some(alloc) = self.allocs.get_mut(id) else { return };
        alloc.desired_status = "stop";
        alloc.desired_description = reason.to_owned();
        alloc.modify_index = index;
        alloc.alloc_modify_index = index;
        alloc.modify_time = now_nanos();
        if !alloc.client_terminal() {
            effects.kill.push((alloc.id.clone(), alloc.incarnation));
        }
        plan.changed.push((alloc.id.clone(), !self.policy.suppress_stop_events));
    }

    fn plan_job(&mut self, job: &JobRecord, eval_id: &str, plan: &mut Plan, effects: &mut Effects) {
        let (namespace, job_id) = (job.spec.namespace.clone(), job.spec.id.clone());
        let groups: BTreeSet<&str> = job.spec.groups.iter().map(|g| g.name.as_str()).collect();
        let orphans: Vec<String> = self
            .allocs
            .values()
            .filter(|a| a.namespace == namespace && a.job_id == job_id && a.desired_status == "run")
            .filter(|a| !groups.contains(a.group.name.as_str()))
            .map(|a| a.id.clone())
            .collect();
        for id in orphans {
            self.stop_alloc(&id, "alloc not needed due to job update", plan, effects);
        }
        for group in &job.spec.groups {
            self.plan_group(job, group, eval_id, plan, effects);
        }
    }

    fn plan_group(
        &mut self,
        job: &JobRecord,
        group: &GroupSpec,
        eval_id: &str,
        plan: &mut Plan,
        effects: &mut Effects,
    ) {
        let mine: Vec<String> = self
            .allocs
            .values()
            .filter(|a| {
                a.namespace == job.spec.namespace
                    && a.job_id == job.spec.id
                    && a.group.name == group.name
                    && a.job_create_index >= job.create_index
            })
            .map(|a| a.id.clone())
            .collect();
        let mut occupied = BTreeSet::new();
        let mut predecessors: BTreeMap<u32, String> = BTreeMap::new();
        for id in &mine {
            let alloc = &self.allocs[id];
            let slot = alloc.slot;
            if alloc.desired_status == "run" && !alloc.client_terminal() {
                if slot >= group.count {
                    self.stop_alloc(id, "alloc not needed due to job update", plan, effects);
                } else if alloc.group.value != group.value {
                    self.stop_alloc(id, "alloc is being updated due to job update", plan, effects);
                    predecessors.insert(slot, id.clone());
                } else {
                    occupied.insert(slot);
                    self.update_in_place(id, job, plan);
                }
                continue;
            }
            if !alloc.next_allocation.is_empty() || slot >= group.count {
                continue;
            }
            match self.replacement_of(id, eval_id, job) {
                Replacement::Occupies => {
                    occupied.insert(slot);
                }
                Replacement::Later => {
                    occupied.insert(slot);
                    self.schedule_followup(id, job, plan, effects);
                }
                Replacement::Now => {
                    predecessors.insert(slot, id.clone());
                }
                Replacement::None => {}
            }
        }
        let free: Vec<u32> = (0..group.count).filter(|s| !occupied.contains(s)).collect();
        for (placed, slot) in free.iter().copied().enumerate() {
            if !self.has_room() {
                let unplaced = u32::try_from(free.len() - placed).unwrap_or(u32::MAX);
                *plan.failed.entry(group.name.clone()).or_default() += unplaced;
                break;
            }
            let previous = predecessors.get(&slot).cloned();
            let id = self.place(job, group, slot, eval_id, previous.as_deref(), plan);
            effects.start.push((id, 0, false));
        }
    }

    /// Whether a terminal (or stopped) allocation's slot gets a replacement, and when.
    fn replacement_of(&self, id: &str, eval_id: &str, job: &JobRecord) -> Replacement {
        let alloc = &self.allocs[id];
        match alloc.client_status {
            "lost" => Replacement::Now,
            "failed" if alloc.desired_status == "run" => {
                if !alloc.force_reschedule && !self.reschedule_allowed(alloc, job) {
                    Replacement::Occupies
                } else if alloc.followup_eval_id == eval_id {
                    Replacement::Now
                } else if alloc.followup_eval_id.is_empty() {
                    Replacement::Later
                } else {
                    Replacement::Occupies
                }
            }
            "complete" if alloc.desired_status == "run" => Replacement::Occupies,
            _ if alloc.desired_status == "stop" && alloc.migrate => Replacement::Now,
            _ => Replacement::None,
        }
    }

    fn reschedule_allowed(&self, alloc: &Alloc, job: &JobRecord) -> bool {
        let Some(group) = job.spec.groups.iter().find(|g| g.name == alloc.group.name) else {
            return false;
        };
        let policy = &group.reschedule;
        if policy.unlimited {
            return true;
        }
        let since = now_nanos().saturating_sub(policy.interval_ns);
        let recent = alloc.reschedule_events.iter().filter(|(t, _)| *t >= since).count();
        u64::try_from(recent).unwrap_or(u64::MAX) < policy.attempts
    }

    fn schedule_followup(
        &mut self,
        id: &str,
        job: &JobRecord,
        plan: &mut Plan,
        effects: &mut Effects,
    ) {
        let index = self.index;
        let followup = self.create_eval(
            &job.spec.namespace,
            &job.spec.id,
            "alloc-reschedule",
            index,
            "pending",
        );
        // Not queued yet: it waits for the reschedule delay.
        self.queue.retain(|e| *e != followup);
        let delay = self.policy.reschedule_delay;
        if let Some(eval) = self.evals.get_mut(&followup) {
            eval.wait_until = Some(now_nanos() + i64::try_from(delay.as_nanos()).unwrap_or(0));
            eval.status_description = "created for delayed rescheduling".into();
        }
        if let Some(alloc) = self.allocs.get_mut(id) {
            alloc.followup_eval_id = followup.clone();
            alloc.modify_index = index;
            alloc.alloc_modify_index = index;
        }
        plan.changed.push((id.to_owned(), true));
        plan.created_evals.push(followup.clone());
        effects.delayed_evals.push((followup, delay));
    }

    fn update_in_place(&mut self, id: &str, job: &JobRecord, plan: &mut Plan) {
        let index = self.index;
        let job_value = render::job(job);
        let Some(alloc) = self.allocs.get_mut(id) else { return };
        if alloc.job_version == job.version {
            return;
        }
        alloc.job_version = job.version;
        alloc.job = job_value;
        alloc.modify_index = index;
        alloc.alloc_modify_index = index;
        alloc.modify_time = now_nanos();
        plan.changed.push((id.to_owned(), true));
    }

    fn place(
        &mut self,
        job: &JobRecord,
        group: &GroupSpec,
        slot: u32,
        eval_id: &str,
        previous: Option<&str>,
        plan: &mut Plan,
    ) -> String {
        let index = self.index;
        let now = now_nanos();
        let id = new_id();
        let ports = group.dynamic_ports.iter().map(|(label, to)| PortMapping {
            label: label.clone(),
            value: self.ports.next(),
            to: *to,
        });
        let ports = ports.collect();
        let mut reschedule_events = Vec::new();
        let mut previous_allocation = String::new();
        if let Some(prev_id) = previous
            && let Some(prev) = self.allocs.get_mut(prev_id)
        {
            previous_allocation = prev_id.to_owned();
            if prev.client_status == "failed" {
                reschedule_events = prev.reschedule_events.clone();
                reschedule_events.push((now, prev_id.to_owned()));
                prev.desired_status = "stop";
                prev.desired_description = "alloc was rescheduled because it failed".into();
            }
            prev.next_allocation = id.clone();
            prev.modify_index = index;
            prev.alloc_modify_index = index;
            prev.modify_time = now;
            plan.changed.push((prev_id.to_owned(), true));
        }
        let alloc = Alloc {
            id: id.clone(),
            namespace: job.spec.namespace.clone(),
            eval_id: eval_id.to_owned(),
            name: format!("{}.{}[{slot}]", job.spec.id, group.name),
            job_id: job.spec.id.clone(),
            job_create_index: job.create_index,
            job_version: job.version,
            job: render::job(job),
            group: group.clone(),
            slot,
            ports,
            desired_status: "run",
            desired_description: String::new(),
            migrate: false,
            client_status: "pending",
            client_description: String::new(),
            task_states: BTreeMap::new(),
            previous_allocation,
            next_allocation: String::new(),
            followup_eval_id: String::new(),
            reschedule_events,
            force_reschedule: false,
            create_index: index,
            modify_index: index,
            alloc_modify_index: index,
            create_time: now,
            modify_time: now,
            incarnation: 0,
            sandbox: None,
        };
        self.allocs.insert(id.clone(), alloc);
        plan.changed.push((id.clone(), true));
        self.gc_allocs();
        id
    }

    fn gc_allocs(&mut self) {
        let terminal: Vec<(u64, String)> = self
            .allocs
            .values()
            .filter(|a| a.client_terminal() && a.sandbox.is_none())
            .map(|a| (a.modify_index, a.id.clone()))
            .collect();
        if terminal.len() <= MAX_TERMINAL_ALLOCS {
            return;
        }
        let mut terminal = terminal;
        terminal.sort();
        let excess = terminal.len() - MAX_TERMINAL_ALLOCS;
        for (_, id) in terminal.into_iter().take(excess) {
            self.allocs.remove(&id);
        }
    }

    fn publish_plan(
        &mut self,
        eval_id: &str,
        namespace: &str,
        job_id: &str,
        index: u64,
        plan: &Plan,
    ) {
        let mut events = Vec::new();
        let mut seen = BTreeSet::new();
        for (id, visible) in &plan.changed {
            if *visible && seen.insert(id.clone()) {
                events.push(self.alloc_event("PlanResult", id));
            }
        }
        if events.is_empty() && plan.canceled.is_empty() {
            return;
        }
        if let Some(eval) = self.evals.get_mut(eval_id) {
            eval.modify_index = index;
        }
        events.push(self.eval_event("PlanResult", eval_id));
        for id in &plan.created_evals {
            events.push(self.eval_event("PlanResult", id));
        }
        for id in &plan.canceled {
            events.push(self.eval_event("PlanResult", id));
        }
        events.extend(self.refresh_job_status(namespace, job_id, "PlanResult"));
        self.events.publish(index, events);
    }

    fn finish_eval(
        &mut self,
        eval_id: &str,
        namespace: &str,
        job_id: &str,
        failed: BTreeMap<String, u32>,
        was_blocked: bool,
    ) {
        let index = self.bump();
        let now = now_nanos();
        let mut lines = Vec::new();
        let blocked = if !failed.is_empty() && !was_blocked {
            let blocked = self.create_eval(namespace, job_id, "queued-allocs", index, "blocked");
            if let Some(eval) = self.evals.get_mut(&blocked) {
                eval.previous_eval = eval_id.to_owned();
                eval.failed_tg_allocs = failed.clone();
                eval.queued = failed.clone();
            }
            Some(blocked)
        } else {
            None
        };
        if let Some(eval) = self.evals.get_mut(eval_id) {
            eval.status = "complete";
            eval.modify_index = index;
            eval.modify_time = now;
            eval.failed_tg_allocs = failed.clone();
            eval.queued = failed;
            if let Some(blocked) = &blocked {
                eval.blocked_eval = blocked.clone();
            }
        }
        lines.push(self.eval_event("EvaluationUpdated", eval_id));
        if let Some(blocked) = &blocked {
            lines.push(self.eval_event("EvaluationUpdated", blocked));
        }
        self.events.publish(index, lines);
        if let Some(event) = self.refresh_job_status(namespace, job_id, "EvaluationUpdated") {
            self.events.publish(index, vec![event]);
        }
    }

    fn alloc_event(&self, kind: &'static str, id: &str) -> Event {
        let alloc = &self.allocs[id];
        Event {
            topic: "Allocation",
            kind,
            key: alloc.id.clone(),
            namespace: alloc.namespace.clone(),
            filter_keys: Some(vec![alloc.job_id.clone(), String::new()]),
            index: self.index,
            payload: serde_json::json!({ "Allocation": render::alloc(alloc, false) }),
        }
    }

    // ---- the client side -------------------------------------------------------------------

    /// Applies a client update to an allocation if it is still the same incarnation; returns
    /// whether it applied. Publishes one `AllocationUpdated` line (with a job event if the
    /// job's status changed).
    pub fn client_update(
        &mut self,
        id: &str,
        incarnation: u64,
        update: impl FnOnce(&mut Alloc),
    ) -> bool {
        let Some(alloc) = self.allocs.get_mut(id) else { return false };
        if alloc.incarnation != incarnation || alloc.terminal() {
            return false;
        }
        let index = self.index + 1;
        self.index = index;
        let alloc = self.allocs.get_mut(id).expect("checked above");
        update(alloc);
        alloc.modify_index = index;
        alloc.modify_time = now_nanos();
        let failed = alloc.client_status == "failed";
        let (namespace, job_id) = (alloc.namespace.clone(), alloc.job_id.clone());
        let mut events = vec![self.alloc_event("AllocationUpdated", id)];
        if failed {
            // In the same write as the failure, so the job never looks dead in between.
            let eval = self.create_eval(&namespace, &job_id, "alloc-failure", index, "pending");
            events.push(self.eval_event("AllocationUpdated", &eval));
        }
        events.extend(self.refresh_job_status(&namespace, &job_id, "AllocationUpdated"));
        self.events.publish(index, events);
        true
    }

    /// A task event on every task of the allocation (tasks share one sandbox here).
    pub fn task_event(alloc: &mut Alloc, event: TaskEvent, state: Option<&'static str>) {
        for task in &alloc.group.tasks {
            let entry = alloc.task_states.entry(task.name.clone()).or_insert_with(|| TaskState {
                state: "pending",
                failed: false,
                restarts: 0,
                last_restart: None,
                started_at: None,
                finished_at: None,
                events: VecDeque::new(),
            });
            entry.push(event.clone());
            if let Some(state) = state {
                entry.state = state;
            }
        }
    }

    pub fn received(alloc: &mut Alloc) {
        Cluster::task_event(alloc, TaskEvent::new("Received", "Task received by client"), None);
        alloc.client_description = "No tasks have started".into();
    }

    pub fn task_setup(alloc: &mut Alloc) {
        let event = TaskEvent::new("Task Setup", "Building Task Directory");
        Cluster::task_event(alloc, event, None);
    }

    pub fn started(alloc: &mut Alloc, sandbox: Option<Arc<Sandbox>>) {
        Cluster::task_event(
            alloc,
            TaskEvent::new("Started", "Task started by client"),
            Some("running"),
        );
        let now = now_nanos();
        for state in alloc.task_states.values_mut() {
            state.started_at = Some(now);
            state.finished_at = None;
        }
        alloc.client_status = "running";
        alloc.client_description = "Tasks are running".into();
        alloc.sandbox = sandbox;
    }

    /// The task could not start (e.g. the sandbox failed): the allocation fails.
    pub fn driver_failure(&mut self, id: &str, incarnation: u64, message: &str) -> Effects {
        let mut effects = Effects::default();
        let applied = self.client_update(id, incarnation, |alloc| {
            let event = TaskEvent::new("Driver Failure", message).detail("driver_error", message);
            Cluster::task_event(alloc, TaskEvent { fails_task: true, ..event }, Some("dead"));
            Cluster::mark_failed(alloc);
        });
        if applied {
            effects.merge(self.after_failure());
        }
        effects
    }

    fn mark_failed(alloc: &mut Alloc) {
        let now = now_nanos();
        for state in alloc.task_states.values_mut() {
            state.failed = true;
            state.finished_at = Some(now);
            state.state = "dead";
        }
        alloc.client_status = "failed";
        alloc.client_description = "Failed tasks".into();
    }

    /// The client killed a stopped allocation's tasks: `complete` with `Killing`/`Killed`.
    pub fn killed(&mut self, id: &str, incarnation: u64) -> Effects {
        let mut effects = Effects::default();
        let Some(alloc) = self.allocs.get_mut(id) else { return effects };
        if alloc.incarnation != incarnation || alloc.client_terminal() {
            return effects;
        }
        let index = self.bump();
        let alloc = self.allocs.get_mut(id).expect("present");
        let killing = TaskEvent::new("Killing", "Sent interrupt. Waiting 0s before force killing")
            .detail("kill_timeout", "0s");
        Cluster::task_event(alloc, killing, None);
        Cluster::task_event(
            alloc,
            TaskEvent::new("Killed", "Task successfully killed"),
            Some("dead"),
        );
        let now = now_nanos();
        for state in alloc.task_states.values_mut() {
            state.finished_at = Some(now);
        }
        alloc.client_status = "complete";
        alloc.client_description = "All tasks have completed".into();
        alloc.modify_index = index;
        alloc.modify_time = now;
        alloc.incarnation += 1;
        effects.destroy.extend(alloc.sandbox.take());
        let (namespace, job_id) = (alloc.namespace.clone(), alloc.job_id.clone());
        let mut events = Vec::new();
        if !self.policy.suppress_stop_events {
            events.push(self.alloc_event("AllocationUpdated", id));
        }
        events.extend(self.refresh_job_status(&namespace, &job_id, "AllocationUpdated"));
        if !events.is_empty() {
            self.events.publish(index, events);
        }
        effects.wake_scheduler |= self.unblock();
        effects
    }

    // ---- faults ----------------------------------------------------------------------------

    fn live_alloc(&self, id: &str) -> Result<&Alloc, FaultError> {
        let alloc = self.allocs.get(id).ok_or_else(|| FaultError::UnknownAllocation(id.into()))?;
        if alloc.terminal() {
            return Err(FaultError::WrongState {
                id: id.into(),
                status: format!("{}/{}", alloc.client_status, alloc.desired_status),
                expected: "pending or running",
            });
        }
        Ok(alloc)
    }

    /// The task died (OOM or otherwise) and the restart policy decides: restart in place, or
    /// fail the allocation once the attempts are used up (mode `fail`).
    pub fn restart(&mut self, id: &str, oom: bool) -> Result<Effects, FaultError> {
        let alloc = self.live_alloc(id)?;
        let restarts = alloc.task_states.values().map(|s| s.restarts).max().unwrap_or(0);
        let policy = alloc.group.restart.clone();
        let incarnation = alloc.incarnation;
        let exhausted = restarts >= policy.attempts;
        let delay = self.policy.restart_delay;
        let mut effects = Effects::default();
        self.client_update(id, incarnation, |alloc| {
            effects.destroy.extend(alloc.sandbox.take());
            alloc.incarnation += 1;
            let message =
                if oom { "OOM Killed" } else { "Exit Code: 137, Exit Message: \"Killed\"" };
            let terminated = TaskEvent { exit_code: 137, ..TaskEvent::new("Terminated", message) }
                .detail("exit_code", "137")
                .detail("signal", "0")
                .detail("oom_killed", if oom { "true" } else { "false" })
                .detail("exit_message", if oom { "OOM Killed" } else { "" });
            Cluster::task_event(alloc, terminated, None);
            if exhausted && policy.mode == "fail" {
                let reason = format!(
                    "Exceeded allowed attempts {} in interval {} and mode is \"fail\"",
                    policy.attempts, policy.interval_text
                );
                let event =
                    TaskEvent { fails_task: true, ..TaskEvent::new("Not Restarting", &reason) }
                        .detail("fails_task", "true")
                        .detail("restart_reason", reason.clone());
                Cluster::task_event(alloc, event, Some("dead"));
                Cluster::mark_failed(alloc);
                return;
            }
            let start_delay = i64::try_from(delay.as_nanos()).unwrap_or(0);
            let restarting = TaskEvent {
                restart_reason: "Restart within policy".into(),
                start_delay,
                ..TaskEvent::new("Restarting", "Task restarting in 0s")
            }
            .detail("restart_reason", "Restart within policy")
            .detail("start_delay", start_delay.to_string());
            Cluster::task_event(alloc, restarting, Some("pending"));
            let now = now_nanos();
            for state in alloc.task_states.values_mut() {
                state.restarts += 1;
                state.last_restart = Some(now);
            }
            alloc.client_status = "pending";
            alloc.client_description = "Tasks are pending".into();
            effects.start.push((alloc.id.clone(), alloc.incarnation, true));
        });
        if exhausted && policy.mode == "fail" {
            effects.merge(self.after_failure());
        }
        Ok(effects)
    }

    /// Fails the allocation for good: Nomad's reschedule path (subject to the policy).
    pub fn fail(&mut self, id: &str, force_reschedule: bool) -> Result<Effects, FaultError> {
        let incarnation = self.live_alloc(id)?.incarnation;
        let mut effects = Effects::default();
        self.client_update(id, incarnation, |alloc| {
            effects.destroy.extend(alloc.sandbox.take());
            alloc.incarnation += 1;
            alloc.force_reschedule = force_reschedule;
            let terminated =
                TaskEvent { exit_code: 1, ..TaskEvent::new("Terminated", "Exit Code: 1") }
                    .detail("exit_code", "1")
                    .detail("signal", "0")
                    .detail("oom_killed", "false");
            Cluster::task_event(alloc, terminated, None);
            let event = TaskEvent {
                fails_task: true,
                ..TaskEvent::new("Not Restarting", "Policy allows no restarts")
            }
            .detail("fails_task", "true");
            Cluster::task_event(alloc, event, Some("dead"));
            Cluster::mark_failed(alloc);
        });
        effects.merge(self.after_failure());
        Ok(effects)
    }

    /// A failed allocation frees its slot; its `alloc-failure` evaluation is queued.
    fn after_failure(&mut self) -> Effects {
        self.unblock();
        Effects { wake_scheduler: true, ..Effects::default() }
    }

    /// The node lost contact: the allocation is `lost` and replaced.
    pub fn lose(&mut self, id: &str) -> Result<Effects, FaultError> {
        self.live_alloc(id)?;
        let index = self.bump();
        let mut effects = Effects::default();
        let alloc = self.allocs.get_mut(id).expect("checked");
        effects.destroy.extend(alloc.sandbox.take());
        alloc.incarnation += 1;
        alloc.client_status = "lost";
        alloc.client_description = "alloc is lost since its node is down".into();
        alloc.desired_status = "stop";
        alloc.desired_description = "alloc is lost since its node is down".into();
        for state in alloc.task_states.values_mut() {
            state.state = "dead";
        }
        alloc.modify_index = index;
        alloc.modify_time = now_nanos();
        let (namespace, job_id) = (alloc.namespace.clone(), alloc.job_id.clone());
        let eval = self.create_eval(&namespace, &job_id, "node-update", index, "pending");
        let mut events =
            vec![self.alloc_event("PlanResult", id), self.eval_event("PlanResult", &eval)];
        events.extend(self.refresh_job_status(&namespace, &job_id, "PlanResult"));
        self.events.publish(index, events);
        self.unblock();
        effects.wake_scheduler = true;
        Ok(effects)
    }

    /// `POST /v1/allocation/:id/stop`: desired stop with a migrate transition and a
    /// replacement placed by the evaluation.
    pub fn stop(&mut self, id: &str) -> Result<Effects, FaultError> {
        self.live_alloc(id)?;
        let index = self.bump();
        let mut effects = Effects::default();
        let alloc = self.allocs.get_mut(id).expect("checked");
        alloc.desired_status = "stop";
        alloc.desired_description = "alloc is being migrated".into();
        alloc.migrate = true;
        alloc.modify_index = index;
        alloc.alloc_modify_index = index;
        alloc.modify_time = now_nanos();
        effects.kill.push((alloc.id.clone(), alloc.incarnation));
        let (namespace, job_id) = (alloc.namespace.clone(), alloc.job_id.clone());
        let eval = self.create_eval(&namespace, &job_id, "alloc-stop", index, "pending");
        let mut events = Vec::new();
        if !self.policy.suppress_stop_events {
            events.push(self.alloc_event("AllocationUpdateDesiredStatus", id));
        }
        events.push(self.eval_event("AllocationUpdateDesiredStatus", &eval));
        events.extend(self.refresh_job_status(
            &namespace,
            &job_id,
            "AllocationUpdateDesiredStatus",
        ));
        self.events.publish(index, events);
        effects.wake_scheduler = true;
        Ok(effects)
    }

    /// Everything still running, for shutdown.
    pub fn take_all_sandboxes(&mut self) -> Vec<Arc<Sandbox>> {
        self.allocs.values_mut().filter_map(|a| a.sandbox.take()).collect()
    }
}

enum Replacement {
    /// The slot stays taken (a completed batch task, a failure without reschedule left).
    Occupies,
    /// A follow-up evaluation will reschedule it after the delay.
    Later,
    /// Place the replacement now, linked to this one.
    Now,
    /// The slot is free without a link.
    None,
}

/// What one evaluation changed.
#[derive(Debug, Default)]
struct Plan {
    /// Allocations touched, and whether the change is published.
    changed: Vec<(String, bool)>,
    created_evals: Vec<String>,
    canceled: Vec<String>,
    failed: BTreeMap<String, u32>,
}

/// Dynamic host ports from Nomad's default range, skipping ports in use on loopback.
#[derive(Debug)]
struct PortAllocator {
    next: u16,
}

impl Default for PortAllocator {
    fn default() -> Self {
        // Spread start points so that simulators in parallel tests rarely compete.
        let offset = u16::try_from(std::process::id() % 6000).unwrap_or(0);
        PortAllocator { next: 20000 + offset }
    }
}

impl PortAllocator {
    const LOW: u16 = 20000;
    const HIGH: u16 = 32000;

    fn next(&mut self) -> u16 {
        for _ in Self::LOW..Self::HIGH {
            let port = self.next;
            self.next = if port + 1 >= Self::HIGH { Self::LOW } else { port + 1 };
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
        self.next
    }
}
