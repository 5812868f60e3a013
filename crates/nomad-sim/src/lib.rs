//! A Nomad API simulator for tests: what Poseidon's Nomad backend needs of a Nomad cluster,
//! on a loopback port, with faults on demand. It follows `nomad-api.md` §7 (wire formats
//! §1–§5, behaviours §6); `GET /v1/client/allocation/:id/exec` really runs the command, in a
//! `poseidon-sandbox` sandbox per running allocation.
//!
//! # API
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use nomad_sim::{SimConfig, Simulator};
//! use poseidon_sandbox::{Limits, Runtime, RuntimeConfig};
//! // Any binary that runs `poseidon_sandbox::init::main` for `sandbox-init` can be the
//! // sandboxes' init: `poseidon` itself, or `nomad-sim`.
//! let runtime = Runtime::new(RuntimeConfig {
//!     state_dir: "/tmp/my-test-state".into(), // every ancestor searchable by the sandboxes
//!     init_program: "/path/to/poseidon".into(), // e.g. env!("CARGO_BIN_EXE_poseidon")
//!     init_args: vec!["sandbox-init".into()],
//!     cgroup_name: "my-test-unique-name".into(), // removed when the runtime is dropped
//!     uid_base: 500_000,
//!     defaults: Limits::default(),
//! })?;
//! let sim = Simulator::start(SimConfig { runtime: Some(runtime), ..SimConfig::default() }).await?;
//! let base = sim.url(); // "http://127.0.0.1:<port>", also `sim.address()`
//! # let alloc_id = String::new();
//! sim.restart_allocation(&alloc_id, true)?; // OOM kill: Terminated(oom_killed=true), Restarting
//! sim.shutdown().await; // or drop it: every sandbox is killed either way
//! # Ok(()) }
//! ```
//!
//! * [`Simulator::start`]`(`[`SimConfig`]`) -> Result<`[`SimHandle`]`, `[`SimError`]`>`.
//!   `SimConfig` fields: `listen` (default `127.0.0.1:0`), `runtime:
//!   Option<poseidon_sandbox::Runtime>` (`None`: allocations run without processes and exec
//!   closes with 1011), `acl_token: Option<String>` (`X-Nomad-Token` or `Authorization:
//!   Bearer`; missing → 403 `Permission denied`, wrong → 403 `ACL token not found`),
//!   `namespaces` (default `["default"]`), `capacity: Option<usize>` (allocations the single
//!   node holds; `None` = unlimited), `schedule_delay`, `pending_delay`, `restart_delay`,
//!   `reschedule_delay`, `kill_delay` (all short by default), `heartbeat_interval` (30 s),
//!   `event_buffer_size` (100 batches), `memory_oversubscription` (true; false adds Nomad's
//!   warning and limits sandboxes to `MemoryMB`), `max_jobs`, `max_allocations`,
//!   `max_body_bytes`, `max_exec_frame_bytes`.
//! * [`SimHandle`]: `address() -> SocketAddr`, `url() -> String`;
//!   faults — `restart_allocation(id, oom)` (restart in place following the group's restart
//!   policy; once its attempts are used up the allocation fails and is rescheduled),
//!   `fail_allocation(id)` (fails; rescheduled if the reschedule policy allows),
//!   `reschedule_allocation(id)` (fails and is always rescheduled), `lose_allocation(id)`
//!   (node lost: `lost`, replaced at once), `stop_allocation(id)` (`nomad alloc stop`:
//!   desired stop with migrate, replacement placed, old one killed); all return
//!   `Result<(), `[`FaultError`]`>`. `set_capacity(Option<usize>)` (blocked evaluations are
//!   placed when room appears), `drop_event_streams()` (every stream ends with EOF; clients
//!   resume by index), `clear_event_buffer()` (a server restart: streams end, the buffer
//!   is empty, indexes continue), `set_unreachable(bool).await` (down: the port refuses
//!   connections and every open connection, stream and exec session is cut; up: the same
//!   port listens again), `set_pending_delay`, `set_schedule_delay`,
//!   `set_suppress_stop_events(bool)`
//!   (Nomad sometimes sends no allocation stop events), `create_namespace(name)`;
//!   inspection — `jobs() -> Vec<`[`JobInfo`]`>`, `allocations() -> Vec<`[`AllocInfo`]`>`,
//!   `evaluations() -> Vec<`[`EvalInfo`]`>`, `requests() -> Vec<`[`RecordedRequest`]`>`
//!   (method, path with query, body; the last 10 000), `clear_requests()`, `index()`;
//!   `shutdown().await` (also done, synchronously, on drop).
//!
//! # HTTP
//!
//! `PUT|POST /v1/jobs`, `PUT|POST /v1/job/:id` (validated against Nomad's OpenAPI schema:
//! unknown or mistyped fields are 400; Nomad's admission errors are 500 multi-error text),
//! `PUT|POST /v1/jobs/parse` (HCL of Poseidon's template subset, or JSON), `GET /v1/jobs`
//! (`prefix`, `meta`, `namespace=*`), `GET|DELETE /v1/job/:id` (`purge`),
//! `GET /v1/job/:id/allocations` (`all`), `GET /v1/allocations`, `GET /v1/allocation/:id`,
//! `PUT|POST /v1/allocation/:id/stop`, `GET /v1/evaluation/:id`, `GET /v1/event/stream`,
//! `GET /v1/client/allocation/:id/exec` (WebSocket), `GET /v1/status/leader`,
//! `GET /v1/agent/self`. Reads answer `X-Nomad-Index` and block with `?index=&wait=`.
//!
//! Exec runs `argv` as `exec 'argv0' 'argv1' …` through the sandbox's `bash -c`, as root of
//! the sandbox (a container's default user), in `/workspace`, with a real PTY for `tty=true`.
//! The host image has no `/sbin/setuser` (phusion's); `setpriv --reuid=1001 --regid=1001
//! --clear-groups <cmd>` runs a command as the image's `user`.
//! Frames are Nomad's (§4.2/§4.3): ≤ 1024-byte output chunks, `close` frames, then
//! `{"exited":true,"result":{}}` (exit code 0 omitted) and the TCP connection is dropped
//! without a close frame. A client disconnect does not kill the process; stopping, killing
//! or restarting the allocation does (the session then ends with close code 1011
//! `failed to inspect exec: container is gone`).
//!
//! Dynamic ports (`Networks[0].DynamicPorts`) get host ports from 20000–32000, reported in
//! `AllocatedResources.Shared.Ports` (`HostIP` `127.0.0.1`) and `Shared.Networks`; while the
//! allocation runs, a connection to `127.0.0.1:<host port>` reaches `127.0.0.1:<To>` inside
//! its sandbox (relayed by a process in the sandbox, which has no network of its own).
#![forbid(unsafe_code)]

mod cluster;
mod driver;
mod events;
mod exec;
mod hcl;
mod http;
mod jobspec;
mod render;
pub mod schema;
mod server;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use poseidon_sandbox::Runtime;
use serde_json::Value;

pub use cluster::FaultError;
pub use jobspec::JobError;

use crate::cluster::{Cluster, Effects, Policy};
use crate::driver::{Delays, Settings, Shared};

/// How to start a simulator.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub listen: SocketAddr,
    /// Runs every running allocation as a sandbox; `None` simulates allocations without
    /// processes (exec is then refused).
    pub runtime: Option<Runtime>,
    pub acl_token: Option<String>,
    pub namespaces: Vec<String>,
    /// Allocations the node holds at once; `None` is unlimited.
    pub capacity: Option<usize>,
    /// From evaluation to plan.
    pub schedule_delay: Duration,
    /// From placement to `running` (three client updates in between).
    pub pending_delay: Duration,
    /// From a task restart to `running` again (Nomad: 15 s).
    pub restart_delay: Duration,
    /// From a failure to the rescheduled allocation (Nomad: the policy's delay).
    pub reschedule_delay: Duration,
    /// From desired stop to `complete`.
    pub kill_delay: Duration,
    pub heartbeat_interval: Duration,
    pub event_buffer_size: usize,
    pub memory_oversubscription: bool,
    pub max_jobs: usize,
    pub max_allocations: usize,
    pub max_body_bytes: usize,
    pub max_exec_frame_bytes: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            runtime: None,
            acl_token: None,
            namespaces: vec!["default".to_owned()],
            capacity: None,
            schedule_delay: Duration::from_millis(10),
            pending_delay: Duration::from_millis(60),
            restart_delay: Duration::from_millis(50),
            reschedule_delay: Duration::from_millis(100),
            kill_delay: Duration::from_millis(20),
            heartbeat_interval: Duration::from_secs(30),
            event_buffer_size: 100,
            memory_oversubscription: true,
            max_jobs: 1000,
            max_allocations: 1000,
            max_body_bytes: 1 << 20,
            max_exec_frame_bytes: 64 << 10,
        }
    }
}

/// Why the simulator cannot start or change its listener.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {address}: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
    #[error("the simulator's server task is gone")]
    ServerGone,
}

/// A job as the simulator holds it.
#[derive(Clone, Debug)]
pub struct JobInfo {
    pub namespace: String,
    pub id: String,
    pub version: u64,
    /// `pending`, `running` or `dead`.
    pub status: String,
    pub stop: bool,
    /// What `GET /v1/job/:id` answers.
    pub job: Value,
}

/// An allocation as the simulator holds it.
#[derive(Clone, Debug)]
pub struct AllocInfo {
    pub id: String,
    pub namespace: String,
    pub job_id: String,
    pub task_group: String,
    pub name: String,
    pub client_status: String,
    pub desired_status: String,
    pub restarts: u64,
    pub previous_allocation: Option<String>,
    pub next_allocation: Option<String>,
    /// `(label, host port, container port)`.
    pub ports: Vec<(String, u16, i64)>,
    pub create_index: u64,
    /// A sandbox runs for it.
    pub has_sandbox: bool,
}

/// An evaluation as the simulator holds it.
#[derive(Clone, Debug)]
pub struct EvalInfo {
    pub id: String,
    pub namespace: String,
    pub job_id: String,
    pub status: String,
    pub triggered_by: String,
    pub blocked_eval: Option<String>,
    pub create_index: u64,
}

/// One request the simulator received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    pub body: String,
}

/// Starts simulators.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Listens on `config.listen` and starts the scheduler.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| SimError::Listen { address: config.listen, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| SimError::Listen { address: config.listen, source })?;
        let policy = Policy {
            restart_delay: config.restart_delay,
            reschedule_delay: config.reschedule_delay,
            memory_oversubscription: config.memory_oversubscription,
            max_jobs: config.max_jobs,
            max_allocations: config.max_allocations,
            suppress_stop_events: false,
        };
        let namespaces: BTreeSet<String> = config.namespaces.iter().cloned().collect();
        let mut cluster = Cluster::new(namespaces, config.event_buffer_size, policy);
        cluster.capacity = config.capacity;
        let settings = Settings {
            acl_token: config.acl_token.clone(),
            heartbeat: config.heartbeat_interval,
            max_body_bytes: config.max_body_bytes,
            max_exec_frame_bytes: config.max_exec_frame_bytes,
        };
        let delays = Delays {
            schedule: config.schedule_delay,
            pending: config.pending_delay,
            restart: config.restart_delay,
            kill: config.kill_delay,
        };
        let shared = Arc::new(Shared::new(cluster, config.runtime, settings, delays));
        shared.start_scheduler();
        let control = server::start(shared.clone(), listener);
        Ok(SimHandle { shared, address, control })
    }
}

/// A running simulator. Dropping it stops everything and kills every sandbox.
#[derive(Debug)]
pub struct SimHandle {
    shared: Arc<Shared>,
    address: SocketAddr,
    control: server::Control,
}

impl SimHandle {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The current Raft index.
    pub fn index(&self) -> u64 {
        self.shared.cluster().index
    }

    fn fault(
        &self,
        operation: impl FnOnce(&mut Cluster) -> Result<Effects, FaultError>,
    ) -> Result<(), FaultError> {
        self.shared.with_cluster(|c| match operation(c) {
            Ok(effects) => (Ok(()), effects),
            Err(e) => (Err(e), Effects::default()),
        })
    }

    /// The task dies (`oom`: OOM-killed) and restarts under the group's restart policy.
    pub fn restart_allocation(&self, id: &str, oom: bool) -> Result<(), FaultError> {
        self.fault(|c| c.restart(id, oom))
    }

    /// Fails the allocation for good; rescheduled always.
    pub fn reschedule_allocation(&self, id: &str) -> Result<(), FaultError> {
        self.fault(|c| c.fail(id, true))
    }

    /// Fails the allocation for good; rescheduled if the reschedule policy allows.
    pub fn fail_allocation(&self, id: &str) -> Result<(), FaultError> {
        self.fault(|c| c.fail(id, false))
    }

    /// The node is lost: `lost`, replaced at once.
    pub fn lose_allocation(&self, id: &str) -> Result<(), FaultError> {
        self.fault(|c| c.lose(id))
    }

    /// `nomad alloc stop`: killed and replaced.
    pub fn stop_allocation(&self, id: &str) -> Result<(), FaultError> {
        self.fault(|c| c.stop(id))
    }

    /// Allocations the node holds; `None` for unlimited.
    pub fn set_capacity(&self, capacity: Option<usize>) {
        self.shared.with_cluster(|c| ((), c.set_capacity(capacity)));
    }

    /// Ends every event stream (clients see EOF).
    pub fn drop_event_streams(&self) {
        self.shared.stream_drops.send_modify(|n| *n += 1);
    }

    /// Empties the event buffer and ends every stream, as a server restart does; indexes
    /// continue where they were.
    pub fn clear_event_buffer(&self) {
        self.shared.cluster().events.clear();
        self.drop_event_streams();
    }

    /// Down: connections are refused and open ones cut. Up: listening again on the same port.
    pub async fn set_unreachable(&self, unreachable: bool) -> Result<(), SimError> {
        self.control.set_unreachable(&self.shared, self.address, unreachable).await
    }

    pub fn set_pending_delay(&self, delay: Duration) {
        self.shared.update_delays(|d| d.pending = delay);
    }

    pub fn set_schedule_delay(&self, delay: Duration) {
        self.shared.update_delays(|d| d.schedule = delay);
    }

    /// Leaves out the allocation events of stops (desired stop and `complete`).
    pub fn set_suppress_stop_events(&self, suppress: bool) {
        self.shared.cluster().policy.suppress_stop_events = suppress;
    }

    pub fn create_namespace(&self, name: &str) {
        self.shared.cluster().namespaces.insert(name.to_owned());
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        let cluster = self.shared.cluster();
        cluster
            .jobs
            .values()
            .map(|job| JobInfo {
                namespace: job.spec.namespace.clone(),
                id: job.spec.id.clone(),
                version: job.version,
                status: job.status.to_owned(),
                stop: job.stop,
                job: render::job(job),
            })
            .collect()
    }

    pub fn allocations(&self) -> Vec<AllocInfo> {
        let cluster = self.shared.cluster();
        let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
        cluster
            .allocs
            .values()
            .map(|a| AllocInfo {
                id: a.id.clone(),
                namespace: a.namespace.clone(),
                job_id: a.job_id.clone(),
                task_group: a.group.name.clone(),
                name: a.name.clone(),
                client_status: a.client_status.to_owned(),
                desired_status: a.desired_status.to_owned(),
                restarts: a.task_states.values().map(|s| s.restarts).max().unwrap_or(0),
                previous_allocation: non_empty(&a.previous_allocation),
                next_allocation: non_empty(&a.next_allocation),
                ports: a.ports.iter().map(|p| (p.label.clone(), p.value, p.to)).collect(),
                create_index: a.create_index,
                has_sandbox: a.sandbox.is_some(),
            })
            .collect()
    }

    pub fn evaluations(&self) -> Vec<EvalInfo> {
        let cluster = self.shared.cluster();
        let mut evals: Vec<EvalInfo> = cluster
            .evals
            .values()
            .map(|e| EvalInfo {
                id: e.id.clone(),
                namespace: e.namespace.clone(),
                job_id: e.job_id.clone(),
                status: e.status.to_owned(),
                triggered_by: e.triggered_by.to_owned(),
                blocked_eval: (!e.blocked_eval.is_empty()).then(|| e.blocked_eval.clone()),
                create_index: e.create_index,
            })
            .collect();
        evals.sort_by_key(|e| e.create_index);
        evals
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests()
    }

    pub fn clear_requests(&self) {
        self.shared.clear_requests();
    }

    /// Stops the server and every task, and destroys every sandbox.
    pub async fn shutdown(self) {
        self.control.stop();
        self.shared.shutdown().await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.control.stop();
        self.shared.shutdown_now();
    }
}
