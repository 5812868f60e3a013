//! What each runner job's allocation is doing, fed by the event stream and by full
//! reconciliations (spec §6.6, nomad-api §3).
//!
//! A runner is bound to one allocation *incarnation*: the allocation that was running when it
//! started, with its restart and OOM counts at that moment. Any restart, OOM kill, reschedule,
//! stop or failure of it ends the runner (its job is then deregistered and the pool creates a
//! fresh one), so a restarted allocation that lost the learner's files is never handed out as
//! the same runner, and executions end at once instead of hanging on a dead allocation.
//!
//! Updates are state-based and idempotent: an allocation update older than one already applied
//! (by `ModifyIndex`) is ignored, so replayed events and reconciliations cannot move a runner
//! backwards.

use std::collections::HashMap;
use std::sync::Mutex;

use poseidon_core::backend::LostReason;
use serde::Deserialize;
use tokio::sync::watch;

use crate::template::{RUNNER_GROUP, RUNNER_TASK};

/// Where a runner job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No running allocation yet (pending, or an evaluation blocked for lack of capacity).
    Starting,
    /// The runner's allocation runs.
    Running { allocation: String },
    /// The runner is gone for good.
    Ended(LostReason),
}

/// The part of an `Allocation` (or `AllocListStub`) the tracker reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Allocation {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "JobID", default)]
    pub job_id: String,
    #[serde(rename = "TaskGroup", default)]
    pub task_group: String,
    #[serde(rename = "ClientStatus", default)]
    pub client_status: String,
    #[serde(rename = "DesiredStatus", default)]
    pub desired_status: String,
    #[serde(rename = "CreateIndex", default)]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex", default)]
    pub modify_index: u64,
    #[serde(rename = "TaskStates", default)]
    pub task_states: Option<HashMap<String, TaskState>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct TaskState {
    #[serde(rename = "Restarts", default)]
    pub restarts: u64,
    #[serde(rename = "Events", default)]
    pub events: Option<Vec<TaskEvent>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct TaskEvent {
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "DisplayMessage", default)]
    pub display_message: Option<String>,
    #[serde(rename = "Details", default)]
    pub details: Option<HashMap<String, String>>,
}

impl Allocation {
    fn runner_task(&self) -> Option<&TaskState> {
        self.task_states.as_ref()?.get(RUNNER_TASK)
    }

    fn restarts(&self) -> u64 {
        self.runner_task().map_or(0, |task| task.restarts)
    }

    fn events(&self) -> impl Iterator<Item = &TaskEvent> {
        self.runner_task().and_then(|task| task.events.as_ref()).into_iter().flatten()
    }

    /// `Terminated` events that report an OOM kill (nomad-api §6.3).
    fn oom_kills(&self) -> usize {
        self.events()
            .filter(|event| event.kind == "Terminated")
            .filter(|event| {
                event.details.as_ref().and_then(|details| details.get("oom_killed"))
                    == Some(&"true".to_owned())
            })
            .count()
    }

    /// A driver failure (an image that cannot be pulled, say) while starting.
    fn driver_failure(&self) -> Option<String> {
        self.events().find(|event| event.kind == "Driver Failure").map(|event| {
            event.display_message.clone().unwrap_or_else(|| "driver failure".to_owned())
        })
    }

    fn is_running(&self) -> bool {
        self.client_status == "running" && self.desired_status == "run"
    }
}

/// The incarnation a running runner is bound to.
#[derive(Debug, Clone)]
struct Incarnation {
    allocation: String,
    create_index: u64,
    restarts: u64,
    oom_kills: usize,
}

struct Watched {
    phase: watch::Sender<Phase>,
    running: Option<Incarnation>,
    /// The newest `ModifyIndex` applied per allocation.
    applied: HashMap<String, u64>,
}

/// The runner jobs being watched.
#[derive(Default)]
pub(crate) struct Tracker {
    jobs: Mutex<HashMap<String, Watched>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").field("jobs", &self.lock().len()).finish()
    }
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts watching `job` (before it is registered, so that no event is missed).
    pub(crate) fn watch(&self, job: &str) -> watch::Receiver<Phase> {
        let mut jobs = self.lock();
        let watched = jobs.entry(job.to_owned()).or_insert_with(|| Watched {
            phase: watch::Sender::new(Phase::Starting),
            running: None,
            applied: HashMap::new(),
        });
        watched.phase.subscribe()
    }

    pub(crate) fn forget(&self, job: &str) {
        self.lock().remove(job);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// An allocation update from the event stream.
    pub(crate) fn apply(&self, allocation: &Allocation) {
        if allocation.task_group != RUNNER_GROUP {
            return;
        }
        if let Some(watched) = self.lock().get_mut(&allocation.job_id) {
            watched.apply(allocation);
        }
    }

    /// The job was deregistered (Nomad does not always send allocation stops for it).
    pub(crate) fn job_deregistered(&self, job: &str) {
        if let Some(watched) = self.lock().get_mut(job) {
            watched.end(LostReason::Stopped);
        }
    }

    /// Applies every allocation of the namespace; a running runner whose allocation is no
    /// longer listed has lost it.
    pub(crate) fn reconcile(&self, allocations: &[Allocation]) {
        let mut by_job: HashMap<&str, Vec<&Allocation>> = HashMap::new();
        for allocation in allocations.iter().filter(|a| a.task_group == RUNNER_GROUP) {
            by_job.entry(allocation.job_id.as_str()).or_default().push(allocation);
        }
        for (job, watched) in self.lock().iter_mut() {
            let mut own = by_job.remove(job.as_str()).unwrap_or_default();
            own.sort_by_key(|allocation| allocation.create_index);
            for allocation in &own {
                watched.apply(allocation);
            }
            let vanished = watched.running.as_ref().is_some_and(|running| {
                !own.iter().any(|allocation| allocation.id == running.allocation)
            });
            if vanished {
                watched.end(LostReason::Failed("the allocation vanished".into()));
            }
        }
    }
}

impl Watched {
    fn apply(&mut self, allocation: &Allocation) {
        let applied = self.applied.entry(allocation.id.clone()).or_insert(0);
        if allocation.modify_index != 0 && allocation.modify_index <= *applied {
            return;
        }
        *applied = allocation.modify_index;
        if matches!(*self.phase.borrow(), Phase::Ended(_)) {
            return;
        }
        match self.running.clone() {
            None => self.apply_starting(allocation),
            Some(running) => self.apply_running(&running, allocation),
        }
    }

    fn apply_starting(&mut self, allocation: &Allocation) {
        if allocation.is_running() {
            self.running = Some(Incarnation {
                allocation: allocation.id.clone(),
                create_index: allocation.create_index,
                restarts: allocation.restarts(),
                oom_kills: allocation.oom_kills(),
            });
            self.phase.send_replace(Phase::Running { allocation: allocation.id.clone() });
        } else if let Some(failure) = allocation.driver_failure() {
            self.end(LostReason::Failed(failure));
        }
    }

    fn apply_running(&mut self, running: &Incarnation, allocation: &Allocation) {
        if allocation.id != running.allocation {
            if allocation.create_index > running.create_index && allocation.desired_status == "run"
            {
                self.end(LostReason::Failed("the allocation was rescheduled".into()));
            }
            return;
        }
        if allocation.oom_kills() > running.oom_kills {
            return self.end(LostReason::OomKilled);
        }
        if allocation.desired_status != "run" {
            return self.end(LostReason::Stopped);
        }
        if allocation.restarts() > running.restarts || allocation.client_status != "running" {
            let reason = match allocation.client_status.as_str() {
                "pending" | "running" => "the allocation restarted".to_owned(),
                status => format!("the allocation is {status}"),
            };
            self.end(LostReason::Failed(reason));
        }
    }

    fn end(&mut self, reason: LostReason) {
        self.phase.send_if_modified(|phase| {
            if matches!(phase, Phase::Ended(_)) {
                return false;
            }
            *phase = Phase::Ended(reason);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn allocation(value: serde_json::Value) -> Allocation {
        serde_json::from_value(value).unwrap()
    }

    fn running(id: &str, modify: u64) -> Allocation {
        allocation(json!({"ID": id, "JobID": "1-a", "TaskGroup": "default-group",
            "ClientStatus": "running", "DesiredStatus": "run", "CreateIndex": 10,
            "ModifyIndex": modify,
            "TaskStates": {"default-task": {"State": "running", "Restarts": 0, "Events": null}}}))
    }

    fn tracker_with_running() -> (Tracker, watch::Receiver<Phase>) {
        let tracker = Tracker::default();
        let phase = tracker.watch("1-a");
        tracker.apply(&running("A", 12));
        assert_eq!(*phase.borrow(), Phase::Running { allocation: "A".into() });
        (tracker, phase)
    }

    #[test]
    fn pending_then_running_starts_the_runner_and_other_jobs_are_ignored() {
        let tracker = Tracker::default();
        let phase = tracker.watch("1-a");
        let mut pending = running("A", 11);
        pending.client_status = "pending".into();
        tracker.apply(&pending);
        assert_eq!(*phase.borrow(), Phase::Starting);
        let mut other = running("B", 11);
        other.job_id = "1-b".into();
        tracker.apply(&other);
        assert_eq!(*phase.borrow(), Phase::Starting);
        tracker.apply(&running("A", 12));
        assert_eq!(*phase.borrow(), Phase::Running { allocation: "A".into() });
    }

    #[test]
    fn a_restart_ends_the_runner_and_replayed_old_events_change_nothing() {
        let (tracker, phase) = tracker_with_running();
        tracker.apply(&running("A", 12));
        let mut old_pending = running("A", 11);
        old_pending.client_status = "pending".into();
        tracker.apply(&old_pending);
        assert_eq!(*phase.borrow(), Phase::Running { allocation: "A".into() });
        let mut restarted = running("A", 20);
        restarted.task_states.as_mut().unwrap().get_mut("default-task").unwrap().restarts = 1;
        tracker.apply(&restarted);
        assert_eq!(
            *phase.borrow(),
            Phase::Ended(LostReason::Failed("the allocation restarted".into()))
        );
    }

    #[test]
    fn an_oom_kill_is_reported_as_such() {
        let (tracker, phase) = tracker_with_running();
        tracker.apply(&allocation(json!({"ID": "A", "JobID": "1-a", "TaskGroup": "default-group",
            "ClientStatus": "pending", "DesiredStatus": "run", "CreateIndex": 10, "ModifyIndex": 30,
            "TaskStates": {"default-task": {"State": "pending", "Restarts": 1, "Events": [
                {"Type": "Terminated", "Details": {"exit_code": "137", "oom_killed": "true"}},
                {"Type": "Restarting", "Details": {}}]}}})));
        assert_eq!(*phase.borrow(), Phase::Ended(LostReason::OomKilled));
    }

    #[test]
    fn stop_and_reschedule_end_the_runner() {
        let (tracker, phase) = tracker_with_running();
        let mut stopped = running("A", 20);
        stopped.desired_status = "stop".into();
        tracker.apply(&stopped);
        assert_eq!(*phase.borrow(), Phase::Ended(LostReason::Stopped));

        let (tracker, phase) = tracker_with_running();
        let mut successor = running("B", 25);
        successor.create_index = 20;
        successor.client_status = "pending".into();
        tracker.apply(&successor);
        assert_eq!(
            *phase.borrow(),
            Phase::Ended(LostReason::Failed("the allocation was rescheduled".into()))
        );
    }

    #[test]
    fn reconciliation_catches_missed_changes() {
        let (tracker, phase) = tracker_with_running();
        tracker.reconcile(&[running("A", 12)]);
        assert_eq!(*phase.borrow(), Phase::Running { allocation: "A".into() });
        tracker.reconcile(&[]);
        assert_eq!(
            *phase.borrow(),
            Phase::Ended(LostReason::Failed("the allocation vanished".into()))
        );

        let tracker = Tracker::default();
        let phase = tracker.watch("1-a");
        tracker.reconcile(&[running("A", 12)]);
        assert_eq!(*phase.borrow(), Phase::Running { allocation: "A".into() });
        tracker.job_deregistered("1-a");
        assert_eq!(*phase.borrow(), Phase::Ended(LostReason::Stopped));
    }

    #[test]
    fn a_driver_failure_while_starting_fails_the_start() {
        let tracker = Tracker::default();
        let phase = tracker.watch("1-a");
        tracker.apply(&allocation(json!({"ID": "A", "JobID": "1-a", "TaskGroup": "default-group",
            "ClientStatus": "pending", "DesiredStatus": "run", "ModifyIndex": 5,
            "TaskStates": {"default-task": {"Restarts": 0, "Events": [
                {"Type": "Driver Failure", "DisplayMessage": "image not found"}]}}})));
        assert_eq!(*phase.borrow(), Phase::Ended(LostReason::Failed("image not found".into())));
    }
}
