//! Nomad's JSON for jobs, allocations and evaluations.
//!
//! `Allocation` and `Evaluation` (and `Port`, `NetworkResource`, `AllocatedPortMapping`) are
//! encoded by Nomad with struct-level omitempty: empty keys are absent. `Job`, `TaskState`,
//! `TaskEvent` and the list stubs carry every key, `null` for nil.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::cluster::{
    Alloc, Eval, JobRecord, NODE_ID, NODE_NAME, PortMapping, TaskEvent, TaskState,
};

/// The host address dynamic ports are reported on.
const HOST_IP: &str = "127.0.0.1";

/// The full job as `GET /v1/job/:id` returns it.
pub(crate) fn job(record: &JobRecord) -> Value {
    let mut value = record.spec.value.clone();
    if let Some(object) = value.as_object_mut() {
        object.insert("Status".into(), json!(record.status));
        object.insert("StatusDescription".into(), json!(""));
        object.insert("Stable".into(), json!(false));
        object.insert("Version".into(), json!(record.version));
        object.insert("SubmitTime".into(), json!(record.submit_time));
        object.insert("CreateIndex".into(), json!(record.create_index));
        object.insert("ModifyIndex".into(), json!(record.modify_index));
        object.insert("JobModifyIndex".into(), json!(record.job_modify_index));
        object.insert("Stop".into(), json!(record.stop));
    }
    value
}

/// Counts per group for a job's list stub.
pub(crate) type GroupSummary = BTreeMap<String, [u64; 7]>;

/// `JobListStub`.
pub(crate) fn job_stub(record: &JobRecord, summary: &GroupSummary, with_meta: bool) -> Value {
    let spec = &record.spec.value;
    let groups: Map<String, Value> = summary
        .iter()
        .map(|(name, c)| {
            let counts = json!({"Queued": c[0], "Complete": c[1], "Failed": c[2], "Running": c[3],
                                "Starting": c[4], "Lost": c[5], "Unknown": c[6]});
            (name.clone(), counts)
        })
        .collect();
    let mut stub = json!({
        "ID": record.spec.id, "ParentID": spec["ParentID"], "Name": spec["Name"],
        "Namespace": record.spec.namespace, "Datacenters": spec["Datacenters"],
        "NodePool": spec["NodePool"], "Multiregion": spec["Multiregion"], "Type": spec["Type"],
        "Priority": spec["Priority"], "Periodic": !spec["Periodic"].is_null(),
        "ParameterizedJob": !spec["ParameterizedJob"].is_null(), "Stop": record.stop,
        "Status": record.status, "StatusDescription": "",
        "JobSummary": {
            "JobID": record.spec.id, "Namespace": record.spec.namespace, "Summary": groups,
            "Children": {"Pending": 0, "Running": 0, "Dead": 0},
            "CreateIndex": record.create_index, "ModifyIndex": record.modify_index,
        },
        "CreateIndex": record.create_index, "ModifyIndex": record.modify_index,
        "JobModifyIndex": record.job_modify_index, "SubmitTime": record.submit_time,
    });
    if with_meta && let Some(object) = stub.as_object_mut() {
        object.insert("Meta".into(), spec["Meta"].clone());
    }
    stub
}

/// RFC 3339 with nanoseconds in UTC, Nomad's format for `time.Time` fields.
pub(crate) fn rfc3339(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let frac = nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn time_or_null(nanos: Option<i64>) -> Value {
    nanos.map_or(Value::Null, |n| json!(rfc3339(n)))
}

fn task_event(event: &TaskEvent) -> Value {
    json!({
        "Type": event.kind, "Time": event.time, "Message": event.message,
        "DisplayMessage": event.message, "Details": event.details, "FailsTask": event.fails_task,
        "RestartReason": event.restart_reason, "SetupError": "", "DriverError": "",
        "ExitCode": event.exit_code, "Signal": 0, "KillTimeout": 0, "KillError": "",
        "KillReason": "", "StartDelay": event.start_delay, "DownloadError": "",
        "ValidationError": "", "DiskLimit": 0, "FailedSibling": "", "VaultError": "",
        "TaskSignalReason": "", "TaskSignal": "", "DriverMessage": "", "GenericSource": "",
    })
}

fn task_state(state: &TaskState) -> Value {
    json!({
        "State": state.state, "Failed": state.failed, "Restarts": state.restarts,
        "LastRestart": time_or_null(state.last_restart),
        "StartedAt": time_or_null(state.started_at),
        "FinishedAt": time_or_null(state.finished_at),
        "Events": state.events.iter().map(task_event).collect::<Vec<_>>(),
        "Paused": "",
    })
}

fn task_states(alloc: &Alloc) -> Value {
    if alloc.task_states.is_empty() {
        return Value::Null;
    }
    let states: Map<String, Value> =
        alloc.task_states.iter().map(|(name, s)| (name.clone(), task_state(s))).collect();
    Value::Object(states)
}

/// Drops empty values: Nomad's struct-level omitempty.
fn omit_empty(value: Value) -> Value {
    let Value::Object(map) = value else { return value };
    let kept = map.into_iter().filter(|(_, v)| !is_empty(v)).collect();
    Value::Object(kept)
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

fn port(port: &PortMapping) -> Value {
    omit_empty(json!({"Label": port.label, "Value": port.value, "To": port.to}))
}

fn allocated_resources(alloc: &Alloc) -> Value {
    let tasks: Map<String, Value> = alloc
        .group
        .tasks
        .iter()
        .map(|t| {
            let resources = json!({
                "Cpu": {"CpuShares": t.cpu, "ReservedCores": null},
                "Memory": {"MemoryMB": t.memory_mb, "MemoryMaxMB": t.memory_max_mb},
                "Networks": null, "Devices": null,
            });
            (t.name.clone(), resources)
        })
        .collect();
    let lifecycles: Map<String, Value> =
        alloc.group.tasks.iter().map(|t| (t.name.clone(), Value::Null)).collect();
    let networks = match &alloc.group.network_mode {
        Some(mode) => {
            let dynamic: Vec<Value> = alloc.ports.iter().map(port).collect();
            vec![omit_empty(json!({"Mode": mode, "IP": HOST_IP, "DynamicPorts": dynamic}))]
        }
        None => Vec::new(),
    };
    let ports: Vec<Value> = alloc
        .ports
        .iter()
        .map(|p| {
            omit_empty(json!({"Label": p.label, "Value": p.value, "To": p.to, "HostIP": HOST_IP}))
        })
        .collect();
    json!({
        "Tasks": tasks,
        "TaskLifecycles": lifecycles,
        "Shared": {
            "DiskMB": alloc.group.disk_mb,
            "Networks": networks,
            "Ports": if ports.is_empty() { Value::Null } else { json!(ports) },
        },
    })
}

fn reschedule_tracker(alloc: &Alloc) -> Value {
    if alloc.reschedule_events.is_empty() {
        return Value::Null;
    }
    let events: Vec<Value> = alloc
        .reschedule_events
        .iter()
        .map(|(time, prev)| {
            json!({"RescheduleTime": time, "Delay": 0, "PrevAllocID": prev, "PrevNodeID": NODE_ID})
        })
        .collect();
    json!({"Events": events, "LastReschedule": "ok"})
}

fn desired_transition(alloc: &Alloc) -> Value {
    if alloc.migrate { json!({"Migrate": true}) } else { Value::Null }
}

/// The full `Allocation`; `with_job` for `GET /v1/allocation/:id` (events strip the job).
pub(crate) fn alloc(alloc: &Alloc, with_job: bool) -> Value {
    let resources = allocated_resources(alloc);
    let legacy_networks = resources["Shared"]["Networks"].clone();
    omit_empty(json!({
        "ID": alloc.id, "Namespace": alloc.namespace, "EvalID": alloc.eval_id,
        "Name": alloc.name, "NodeID": NODE_ID, "NodeName": NODE_NAME, "JobID": alloc.job_id,
        "Job": if with_job { alloc.job.clone() } else { Value::Null },
        "TaskGroup": alloc.group.name,
        "Resources": {
            "CPU": alloc.group.tasks.iter().map(|t| t.cpu).sum::<i64>(),
            "MemoryMB": alloc.group.tasks.iter().map(|t| t.memory_mb).sum::<i64>(),
            "DiskMB": alloc.group.disk_mb,
            "Networks": legacy_networks,
        },
        "AllocatedResources": resources,
        "DesiredStatus": alloc.desired_status, "DesiredDescription": alloc.desired_description,
        "DesiredTransition": desired_transition(alloc),
        "ClientStatus": alloc.client_status, "ClientDescription": alloc.client_description,
        "TaskStates": task_states(alloc),
        "PreviousAllocation": alloc.previous_allocation,
        "NextAllocation": alloc.next_allocation,
        "RescheduleTracker": reschedule_tracker(alloc),
        "FollowupEvalID": alloc.followup_eval_id,
        "CreateIndex": alloc.create_index, "ModifyIndex": alloc.modify_index,
        "AllocModifyIndex": alloc.alloc_modify_index,
        "CreateTime": alloc.create_time, "ModifyTime": alloc.modify_time,
    }))
}

/// `AllocListStub`: every key, no `PreviousAllocation`.
pub(crate) fn alloc_stub(
    alloc: &Alloc,
    job_type: &str,
    with_resources: bool,
    with_states: bool,
) -> Value {
    let mut stub = json!({
        "ID": alloc.id, "EvalID": alloc.eval_id, "Name": alloc.name,
        "Namespace": alloc.namespace, "NodeID": NODE_ID, "NodeName": NODE_NAME,
        "JobID": alloc.job_id, "JobType": job_type, "JobVersion": alloc.job_version,
        "TaskGroup": alloc.group.name,
        "DesiredStatus": alloc.desired_status, "DesiredDescription": alloc.desired_description,
        "ClientStatus": alloc.client_status, "ClientDescription": alloc.client_description,
        "DesiredTransition": {"Migrate": if alloc.migrate { json!(true) } else { Value::Null },
            "Reschedule": null, "ForceReschedule": null, "NoShutdownDelay": null,
            "MigrateDisablePlacement": null},
        "TaskStates": if with_states { task_states(alloc) } else { Value::Null },
        "DeploymentStatus": null, "FollowupEvalID": alloc.followup_eval_id,
        "NextAllocation": alloc.next_allocation,
        "RescheduleTracker": reschedule_tracker(alloc),
        "PreemptedAllocations": null, "PreemptedByAllocation": "",
        "CreateIndex": alloc.create_index, "ModifyIndex": alloc.modify_index,
        "CreateTime": alloc.create_time, "ModifyTime": alloc.modify_time,
    });
    if with_resources && let Some(object) = stub.as_object_mut() {
        object.insert("AllocatedResources".into(), allocated_resources(alloc));
    }
    stub
}

fn alloc_metric(group: &str, failed: u32) -> (String, Value) {
    let metric = json!({
        "NodesEvaluated": 1, "NodesFiltered": 0, "NodesInPool": 1, "NodePool": "default",
        "NodesAvailable": {"dc1": 1}, "ClassFiltered": null, "ConstraintFiltered": null,
        "NodesExhausted": 1, "ClassExhausted": null,
        "DimensionExhausted": {"memory": failed}, "QuotaExhausted": null,
        "ResourcesExhausted": null, "Scores": null, "ScoreMetaData": null,
        "AllocationTime": 10_000, "CoalescedFailures": failed.saturating_sub(1),
    });
    (group.to_owned(), metric)
}

/// `Evaluation`.
pub(crate) fn eval(eval: &Eval) -> Value {
    let failed: Map<String, Value> =
        eval.failed_tg_allocs.iter().map(|(g, n)| alloc_metric(g, *n)).collect();
    omit_empty(json!({
        "ID": eval.id, "Namespace": eval.namespace, "Priority": eval.priority,
        "Type": eval.job_type, "TriggeredBy": eval.triggered_by, "JobID": eval.job_id,
        "JobModifyIndex": eval.job_modify_index, "Status": eval.status,
        "StatusDescription": eval.status_description,
        "WaitUntil": eval.wait_until.map(rfc3339),
        "PreviousEval": eval.previous_eval, "BlockedEval": eval.blocked_eval,
        "FailedTGAllocs": failed, "QueuedAllocations": eval.queued,
        "SnapshotIndex": eval.modify_index,
        "CreateIndex": eval.create_index, "ModifyIndex": eval.modify_index,
        "CreateTime": eval.create_time, "ModifyTime": eval.modify_time,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_nanoseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_700_000_000_123_456_789), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn omit_empty_drops_zero_values() {
        let value = omit_empty(json!({"a": "", "b": 0, "c": false, "d": null, "e": [], "f": "x"}));
        assert_eq!(value, json!({"f": "x"}));
    }
}
