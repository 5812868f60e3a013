//! A submitted job: Nomad's defaults filled in, semantic validation with Nomad's
//! multi-error text, and the few facts the scheduler needs pulled out.
//!
//! The job itself stays JSON, so everything a client sent (task `Config`, `Meta`, fields the
//! simulator does not model) comes back from `GET /v1/job/:id` exactly.

use serde_json::{Map, Value, json};

use crate::schema;

/// Server-owned job fields: ignored on register, set by the simulator on output.
pub const SERVER_FIELDS: &[&str] = &[
    "Status",
    "StatusDescription",
    "Stable",
    "Version",
    "SubmitTime",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
    "Stop",
];

const SECOND: i64 = 1_000_000_000;
/// Allocations one group may ask for; the scheduler walks every slot.
pub const MAX_COUNT: i64 = 10_000;
/// Dynamic ports one group may ask for; each needs a free host port.
pub const MAX_DYNAMIC_PORTS: usize = 64;

/// A validated, canonical job.
#[derive(Clone, Debug)]
pub(crate) struct JobSpec {
    pub namespace: String,
    pub id: String,
    /// The canonical job without [`SERVER_FIELDS`].
    pub value: Value,
    pub groups: Vec<GroupSpec>,
}

/// What the scheduler needs of a task group.
#[derive(Clone, Debug)]
pub(crate) struct GroupSpec {
    pub name: String,
    pub count: u32,
    /// The group without `Count`: a difference here replaces the allocations.
    pub value: Value,
    pub tasks: Vec<TaskSpec>,
    pub network_mode: Option<String>,
    pub dynamic_ports: Vec<(String, i64)>,
    pub disk_mb: i64,
    pub restart: RestartPolicy,
    pub reschedule: ReschedulePolicy,
}

#[derive(Clone, Debug)]
pub(crate) struct TaskSpec {
    pub name: String,
    pub cpu: i64,
    pub memory_mb: i64,
    pub memory_max_mb: i64,
}

#[derive(Clone, Debug)]
pub(crate) struct RestartPolicy {
    pub attempts: u64,
    pub mode: String,
    /// Go's duration text of the interval, for Nomad's messages.
    pub interval_text: String,
}

#[derive(Clone, Debug)]
pub(crate) struct ReschedulePolicy {
    pub attempts: u64,
    pub interval_ns: i64,
    pub unlimited: bool,
}

/// Why a job was refused, with the status code Nomad uses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    /// 400: the body does not fit the API.
    #[error("{0}")]
    BadRequest(String),
    /// 500: Nomad's admission validation (a multi-error text).
    #[error("{0}")]
    Invalid(String),
}

/// From a register body (`{"Job": ...}`) to a canonical job in `namespace`.
pub(crate) fn from_register_body(
    body: &Value,
    path_id: Option<&str>,
    query_namespace: Option<&str>,
) -> Result<JobSpec, JobError> {
    schema::validate("JobRegisterRequest", body)
        .map_err(|e| JobError::BadRequest(format!("Request decode failed: {e}")))?;
    let job = match body.get("Job") {
        Some(job @ Value::Object(_)) => job.clone(),
        _ => return Err(JobError::BadRequest("Job must be specified".into())),
    };
    let id = job.get("ID").and_then(Value::as_str).unwrap_or_default().to_owned();
    if id.is_empty() {
        return Err(JobError::BadRequest("Job ID hasn't been provided".into()));
    }
    if path_id.is_some_and(|p| p != id) {
        return Err(JobError::BadRequest("Job ID does not match name".into()));
    }
    let namespace = query_namespace
        .or_else(|| body.get("Namespace").and_then(Value::as_str).filter(|s| !s.is_empty()))
        .or_else(|| job.get("Namespace").and_then(Value::as_str).filter(|s| !s.is_empty()))
        .unwrap_or("default")
        .to_owned();
    canonical(job, id, namespace)
}

fn canonical(mut job: Value, id: String, namespace: String) -> Result<JobSpec, JobError> {
    let object =
        job.as_object_mut().ok_or_else(|| JobError::BadRequest("Job must be an object".into()))?;
    for field in SERVER_FIELDS {
        object.remove(*field);
    }
    object.insert("Namespace".into(), json!(namespace));
    default(object, "Name", json!(id));
    default(object, "Region", json!("global"));
    default(object, "Type", json!("service"));
    default(object, "Priority", json!(50));
    default(object, "AllAtOnce", json!(false));
    default(object, "NodePool", json!("default"));
    default(object, "Datacenters", json!(["*"]));
    default(object, "ParentID", json!(""));
    default(object, "Dispatched", json!(false));
    let job_type = object["Type"].as_str().unwrap_or("service").to_owned();
    if let Some(Value::Array(groups)) = object.get_mut("TaskGroups") {
        for group in groups.iter_mut().filter_map(Value::as_object_mut) {
            canonical_group(group, &job_type);
        }
    }
    fill_nulls(object, "Job");
    let groups = validate(&job, &id)?;
    Ok(JobSpec { namespace, id, value: job, groups })
}

fn canonical_group(group: &mut Map<String, Value>, job_type: &str) {
    default(group, "Count", json!(1));
    default(group, "EphemeralDisk", json!({}));
    if let Some(disk) = group.get_mut("EphemeralDisk").and_then(Value::as_object_mut) {
        default(disk, "Sticky", json!(false));
        default(disk, "Migrate", json!(false));
        default(disk, "SizeMB", json!(300));
    }
    let (attempts, interval) = if job_type == "batch" { (3, 24 * 3600) } else { (2, 30 * 60) };
    default(group, "RestartPolicy", json!({}));
    if let Some(restart) = group.get_mut("RestartPolicy").and_then(Value::as_object_mut) {
        default(restart, "Attempts", json!(attempts));
        default(restart, "Interval", json!(interval * SECOND));
        default(restart, "Delay", json!(15 * SECOND));
        default(restart, "Mode", json!("fail"));
        default(restart, "RenderTemplates", json!(false));
    }
    default(group, "ReschedulePolicy", json!({}));
    if let Some(reschedule) = group.get_mut("ReschedulePolicy").and_then(Value::as_object_mut) {
        let batch = job_type == "batch";
        default(reschedule, "Attempts", json!(if batch { 1 } else { 0 }));
        default(reschedule, "Interval", json!(if batch { 24 * 3600 * SECOND } else { 0 }));
        default(reschedule, "Delay", json!(if batch { 5 * SECOND } else { 30 * SECOND }));
        default(reschedule, "DelayFunction", json!(if batch { "constant" } else { "exponential" }));
        default(reschedule, "MaxDelay", json!(if batch { 0 } else { 3600 * SECOND }));
        default(reschedule, "Unlimited", json!(!batch));
    }
    if let Some(Value::Array(tasks)) = group.get_mut("Tasks") {
        for task in tasks.iter_mut().filter_map(Value::as_object_mut) {
            canonical_task(task);
        }
    }
    fill_nulls(group, "TaskGroup");
}

fn canonical_task(task: &mut Map<String, Value>) {
    default(task, "KillTimeout", json!(5 * SECOND));
    default(task, "LogConfig", json!({}));
    if let Some(logs) = task.get_mut("LogConfig").and_then(Value::as_object_mut) {
        default(logs, "MaxFiles", json!(10));
        default(logs, "MaxFileSizeMB", json!(10));
        default(logs, "Disabled", json!(false));
    }
    default(task, "Resources", json!({}));
    if let Some(resources) = task.get_mut("Resources").and_then(Value::as_object_mut) {
        default(resources, "CPU", json!(100));
        default(resources, "Cores", json!(0));
        default(resources, "MemoryMB", json!(300));
        default(resources, "MemoryMaxMB", json!(0));
    }
    fill_nulls(task, "Task");
}

/// Sets `key` when it is absent or null.
fn default(object: &mut Map<String, Value>, key: &str, value: Value) {
    if object.get(key).is_none_or(Value::is_null) {
        object.insert(key.to_owned(), value);
    }
}

/// Nomad's `Job`, `TaskGroup` and `Task` carry every field, `null` when unset.
fn fill_nulls(object: &mut Map<String, Value>, schema_name: &str) {
    for name in schema::property_names(schema_name) {
        if !SERVER_FIELDS.contains(&name.as_str()) {
            object.entry(name).or_insert(Value::Null);
        }
    }
}

/// A nested error list in the text format of hashicorp/go-multierror.
struct MultiError(Vec<String>);

impl MultiError {
    fn text(&self) -> String {
        let noun = if self.0.len() == 1 { "error" } else { "errors" };
        let points: Vec<String> = self.0.iter().map(|e| format!("* {e}")).collect();
        format!("{} {noun} occurred:\n\t{}\n\n", self.0.len(), points.join("\n\t"))
    }
}

fn int(value: &Value, key: &str) -> i64 {
    value.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn validate(job: &Value, id: &str) -> Result<Vec<GroupSpec>, JobError> {
    let mut errors = Vec::new();
    let job_type = text(job, "Type");
    if !matches!(job_type, "service" | "batch" | "system" | "sysbatch") {
        errors.push(format!("Invalid job type: {job_type:?}"));
    }
    if id.contains(' ') || id.contains('\0') {
        errors.push("Job ID contains a space or null character".into());
    }
    let groups = job.get("TaskGroups").and_then(Value::as_array).cloned().unwrap_or_default();
    if groups.is_empty() {
        errors.push("Missing job task groups".into());
    }
    let mut specs = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, group) in groups.iter().enumerate() {
        let name = text(group, "Name");
        if !name.is_empty() && !names.insert(name.to_owned()) {
            errors.push(format!("Job task group {} redefines '{name}' from group {}", i + 1, i));
        }
        match group_spec(group) {
            Ok(spec) => specs.push(spec),
            Err(group_errors) => errors.push(format!(
                "Task group {name} validation failed: {}",
                MultiError(group_errors).text()
            )),
        }
    }
    if errors.is_empty() { Ok(specs) } else { Err(JobError::Invalid(MultiError(errors).text())) }
}

fn group_spec(group: &Value) -> Result<GroupSpec, Vec<String>> {
    let mut errors = Vec::new();
    let name = text(group, "Name").to_owned();
    if name.is_empty() {
        errors.push("Missing task group name".into());
    }
    let count = int(group, "Count");
    if count < 0 {
        errors.push("Task group count can't be negative".into());
    }
    if count > MAX_COUNT {
        errors
            .push(format!("Task group count {count} exceeds the simulator's limit of {MAX_COUNT}"));
    }
    let restart = &group["RestartPolicy"];
    let mode = text(restart, "Mode").to_owned();
    if !matches!(mode.as_str(), "delay" | "fail") {
        errors.push(format!("Unsupported restart mode: {mode:?}"));
    }
    let networks = group.get("Networks").and_then(Value::as_array).cloned().unwrap_or_default();
    if networks.len() > 1 {
        errors.push("Only one network resource is allowed".into());
    }
    let port_count = networks
        .first()
        .and_then(|n| n.get("DynamicPorts"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if port_count > MAX_DYNAMIC_PORTS {
        errors.push(format!(
            "{port_count} dynamic ports exceed the simulator's limit of {MAX_DYNAMIC_PORTS}"
        ));
    }
    let tasks = group.get("Tasks").and_then(Value::as_array).cloned().unwrap_or_default();
    if tasks.is_empty() {
        errors.push("Missing tasks for task group".into());
    }
    let mut task_specs = Vec::new();
    for task in &tasks {
        match task_spec(task) {
            Ok(spec) => task_specs.push(spec),
            Err(task_errors) => errors.push(format!(
                "Task {} validation failed: {}",
                text(task, "Name"),
                MultiError(task_errors).text()
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let network = networks.first();
    let dynamic_ports = network
        .and_then(|n| n.get("DynamicPorts"))
        .and_then(Value::as_array)
        .map(|ports| ports.iter().map(|p| (text(p, "Label").to_owned(), int(p, "To"))).collect())
        .unwrap_or_default();
    let mut value = group.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("Count");
    }
    let reschedule = &group["ReschedulePolicy"];
    Ok(GroupSpec {
        name,
        count: u32::try_from(count).unwrap_or(0),
        value,
        tasks: task_specs,
        network_mode: network.map(|n| text(n, "Mode").to_owned()),
        dynamic_ports,
        disk_mb: int(&group["EphemeralDisk"], "SizeMB"),
        restart: RestartPolicy {
            attempts: u64::try_from(int(restart, "Attempts")).unwrap_or(0),
            mode,
            interval_text: go_duration(int(restart, "Interval")),
        },
        reschedule: ReschedulePolicy {
            attempts: u64::try_from(int(reschedule, "Attempts")).unwrap_or(0),
            interval_ns: int(reschedule, "Interval"),
            unlimited: reschedule.get("Unlimited").and_then(Value::as_bool).unwrap_or(false),
        },
    })
}

fn task_spec(task: &Value) -> Result<TaskSpec, Vec<String>> {
    let mut errors = Vec::new();
    let name = text(task, "Name").to_owned();
    if name.is_empty() {
        errors.push("Missing task name".into());
    }
    if text(task, "Driver").is_empty() {
        errors.push("Missing task driver".into());
    }
    let resources = &task["Resources"];
    let (cpu, memory_mb, memory_max_mb) =
        (int(resources, "CPU"), int(resources, "MemoryMB"), int(resources, "MemoryMaxMB"));
    if cpu < 1 && int(resources, "Cores") == 0 {
        errors.push(format!("minimum CPU value is 1; got {cpu}"));
    }
    if memory_mb < 10 {
        errors.push(format!("minimum MemoryMB value is 10; got {memory_mb}"));
    }
    if memory_max_mb != 0 && memory_max_mb != -1 && memory_max_mb < memory_mb {
        errors.push(format!(
            "MemoryMaxMB value ({memory_max_mb}) should be larger than MemoryMB value ({memory_mb})"
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(TaskSpec { name, cpu, memory_mb, memory_max_mb })
}

/// Go's `time.Duration.String` for whole seconds, which is all Nomad's messages need.
fn go_duration(nanos: i64) -> String {
    let total = nanos / SECOND;
    let (h, m, s) = (total / 3600, total % 3600 / 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(resources: Value) -> Value {
        json!({"Job": {"ID": "j", "Type": "batch", "TaskGroups": [{"Name": "g", "Count": 0,
            "Meta": {"used": "false"},
            "Tasks": [{"Name": "t", "Driver": "docker", "Resources": resources}]}]}})
    }

    #[test]
    fn fills_defaults_and_keeps_meta() {
        let job = from_register_body(&body(json!({"CPU": 40, "MemoryMB": 50})), None, None)
            .expect("valid");
        assert_eq!(job.namespace, "default");
        assert_eq!(job.value["Name"], "j");
        assert_eq!(job.value["TaskGroups"][0]["Meta"], json!({"used": "false"}));
        assert_eq!(job.value["TaskGroups"][0]["Tasks"][0]["KillTimeout"], 5 * SECOND);
        assert!(job.value["TaskGroups"][0]["Tasks"][0].get("Vault").is_some());
        assert_eq!(job.groups[0].count, 0);
        assert_eq!(job.groups[0].restart.interval_text, "24h0m0s");
    }

    #[test]
    fn memory_max_below_memory_is_a_multi_error() {
        let error =
            from_register_body(&body(json!({"MemoryMB": 50, "MemoryMaxMB": 30})), None, None)
                .unwrap_err();
        let JobError::Invalid(text) = error else { panic!("{error:?}") };
        assert!(
            text.starts_with("1 error occurred:\n\t* Task group g validation failed"),
            "{text}"
        );
        assert!(text.contains("MemoryMaxMB value (30) should be larger than MemoryMB value (50)"));
    }

    #[test]
    fn namespace_precedence_and_id_checks() {
        let mut with_ns = body(json!({}));
        with_ns["Job"]["Namespace"] = json!("job-ns");
        with_ns["Namespace"] = json!("body-ns");
        let job = from_register_body(&with_ns, None, Some("query-ns")).expect("valid");
        assert_eq!(job.namespace, "query-ns");
        assert_eq!(from_register_body(&with_ns, None, None).expect("valid").namespace, "body-ns");
        assert_eq!(
            from_register_body(&with_ns, Some("other"), None).unwrap_err(),
            JobError::BadRequest("Job ID does not match name".into())
        );
        assert_eq!(
            from_register_body(&json!({}), None, None).unwrap_err(),
            JobError::BadRequest("Job must be specified".into())
        );
    }
}
