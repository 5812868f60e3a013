//! The asynchronous side: the scheduler worker (Nomad's eval broker, one evaluation at a
//! time), the client side of allocations (pending steps, a sandbox per running allocation,
//! kills) and delayed evaluations. Everything is tracked so that shutdown stops it all.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use poseidon_sandbox::{Limits, ProcessSpec, Runtime, Sandbox, SandboxSpec};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::RecordedRequest;
use crate::cluster::{Alloc, Cluster, Effects};

/// Requests kept for [`crate::SimHandle::requests`].
pub(crate) const MAX_RECORDED_REQUESTS: usize = 10_000;

/// Delays that tests may change while the simulator runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Delays {
    pub schedule: Duration,
    pub pending: Duration,
    pub restart: Duration,
    pub kill: Duration,
}

/// Fixed settings of the HTTP side.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub acl_token: Option<String>,
    pub heartbeat: Duration,
    pub max_body_bytes: usize,
    pub max_exec_frame_bytes: usize,
}

/// Everything the tasks and handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    cluster: Mutex<Cluster>,
    pub runtime: Option<Runtime>,
    pub settings: Settings,
    delays: Mutex<Delays>,
    scheduler: Notify,
    /// The cluster index after every operation, for blocking queries.
    pub index: watch::Sender<u64>,
    /// Bumped to end every event stream.
    pub stream_drops: watch::Sender<u64>,
    /// `true` while the simulated server is down.
    pub unreachable: watch::Sender<bool>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    shut_down: AtomicBool,
}

impl Shared {
    pub fn new(
        cluster: Cluster,
        runtime: Option<Runtime>,
        settings: Settings,
        delays: Delays,
    ) -> Shared {
        let index = cluster.index;
        Shared {
            cluster: Mutex::new(cluster),
            runtime,
            settings,
            delays: Mutex::new(delays),
            scheduler: Notify::new(),
            index: watch::Sender::new(index),
            stream_drops: watch::Sender::new(0),
            unreachable: watch::Sender::new(false),
            requests: Mutex::new(VecDeque::new()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            shut_down: AtomicBool::new(false),
        }
    }

    /// Read access to the cluster (no effects).
    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs an operation under the lock, then carries out its effects.
    pub fn with_cluster<R>(
        self: &Arc<Self>,
        operation: impl FnOnce(&mut Cluster) -> (R, Effects),
    ) -> R {
        let (result, effects, index) = {
            let mut cluster = self.cluster();
            let (result, effects) = operation(&mut cluster);
            (result, effects, cluster.index)
        };
        self.index.send_if_modified(|old| {
            let changed = *old != index;
            *old = index;
            changed
        });
        self.apply(effects);
        result
    }

    pub fn delays(&self) -> Delays {
        *self.delays.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update_delays(&self, change: impl FnOnce(&mut Delays)) {
        change(&mut self.delays.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn record(&self, request: RecordedRequest) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if requests.len() == MAX_RECORDED_REQUESTS {
            requests.pop_front();
        }
        requests.push_back(request);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn spawn(self: &Arc<Self>, work: impl Future<Output = ()> + Send + 'static) {
        if self.shut_down.load(Ordering::SeqCst) {
            return;
        }
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = work => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    fn apply(self: &Arc<Self>, effects: Effects) {
        for sandbox in effects.destroy {
            // Not cancellable: a destroy cut short would leave the sandbox's cgroups.
            self.tasks.spawn(destroy(sandbox));
        }
        for (id, incarnation, restart) in effects.start {
            // Cancelled only between steps (see `pause`): a sandbox creation cut short
            // could leave cgroups behind.
            if !self.shut_down.load(Ordering::SeqCst) {
                self.tasks.spawn(run_alloc(self.clone(), id, incarnation, restart));
            }
        }
        for (id, incarnation) in effects.kill {
            self.spawn(kill_alloc(self.clone(), id, incarnation));
        }
        for (eval, delay) in effects.delayed_evals {
            let shared = self.clone();
            self.spawn(async move {
                tokio::time::sleep(delay).await;
                shared.cluster().queue_eval(&eval);
                shared.scheduler.notify_one();
            });
        }
        if effects.wake_scheduler {
            self.scheduler.notify_one();
        }
    }

    /// Sleeps; `false` if the simulator shuts down meanwhile.
    async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => !self.cancel.is_cancelled(),
            () = self.cancel.cancelled() => false,
        }
    }

    /// Starts the scheduler worker.
    pub fn start_scheduler(self: &Arc<Self>) {
        let shared = self.clone();
        self.spawn(async move {
            loop {
                let next = shared.cluster().next_queued_eval();
                match next {
                    Some(eval) => {
                        tokio::time::sleep(shared.delays().schedule).await;
                        shared.with_cluster(|c| ((), c.process_eval(&eval)));
                    }
                    None => shared.scheduler.notified().await,
                }
            }
        });
    }

    /// Stops every task and kills every sandbox.
    pub async fn shutdown(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        self.cancel.cancel();
        self.tasks.close();
        let sandboxes = self.cluster().take_all_sandboxes();
        for sandbox in sandboxes {
            let _ = sandbox.destroy().await;
        }
        self.tasks.wait().await;
    }

    /// The synchronous part of shutdown, for `Drop`: sandboxes die when dropped.
    pub fn shutdown_now(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        self.cancel.cancel();
        drop(self.cluster().take_all_sandboxes());
    }
}

async fn destroy(sandbox: Arc<Sandbox>) {
    if let Err(error) = sandbox.destroy().await {
        tracing::warn!(%error, "cannot destroy an allocation's sandbox");
    }
}

/// The client side of one allocation incarnation: `Received`, `Task Setup`, a sandbox, then
/// `running`. A restart skips to the sandbox after the restart delay.
async fn run_alloc(shared: Arc<Shared>, id: String, incarnation: u64, restart: bool) {
    let delays = shared.delays();
    let step = delays.pending / 3;
    if restart {
        if !shared.pause(delays.restart).await {
            return;
        }
    } else {
        if !shared.pause(step).await {
            return;
        }
        if !shared.with_cluster(|c| {
            (c.client_update(&id, incarnation, Cluster::received), Effects::default())
        }) {
            return;
        }
        if !shared.pause(step).await {
            return;
        }
        if !shared.with_cluster(|c| {
            (c.client_update(&id, incarnation, Cluster::task_setup), Effects::default())
        }) {
            return;
        }
    }
    let sandbox = match create_sandbox(&shared, &id, incarnation).await {
        Ok(sandbox) => sandbox,
        Err(message) => {
            shared.with_cluster(|c| ((), c.driver_failure(&id, incarnation, &message)));
            return;
        }
    };
    let kept = sandbox.clone();
    let started = shared.pause(step).await
        && shared.with_cluster(|c| {
            let applied = c.client_update(&id, incarnation, |alloc| Cluster::started(alloc, kept));
            (applied, Effects::default())
        });
    match sandbox {
        Some(sandbox) if !started => destroy(sandbox).await,
        Some(sandbox) => {
            let ports =
                shared.cluster().allocs.get(&id).map(|a| a.ports.clone()).unwrap_or_default();
            for port in ports {
                shared.spawn(forward_port(shared.clone(), sandbox.clone(), port.value, port.to));
            }
        }
        None => {}
    }
}

/// Makes `127.0.0.1:<to>` inside the sandbox reachable on the host port, until the sandbox
/// dies. The sandbox has no network, so each connection is relayed by a process inside it
/// (bash's `/dev/tcp`) over its stdin and stdout.
async fn forward_port(shared: Arc<Shared>, sandbox: Arc<Sandbox>, host: u16, to: i64) {
    let Some(listener) = bind_host_port(host).await else { return };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    shared.spawn(relay(sandbox.clone(), stream, to));
                }
            }
            () = sandbox.exited() => return,
        }
    }
}

/// Binds a host port, retrying briefly: the previous incarnation's forwarder may still
/// hold it while its sandbox is being destroyed.
async fn bind_host_port(host: u16) -> Option<tokio::net::TcpListener> {
    const ATTEMPTS: u32 = 20;
    for _ in 0..ATTEMPTS {
        match tokio::net::TcpListener::bind(("127.0.0.1", host)).await {
            Ok(listener) => return Some(listener),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    tracing::warn!(host, "cannot listen on an allocation's host port");
    None
}

async fn relay(sandbox: Arc<Sandbox>, mut stream: tokio::net::TcpStream, to: i64) {
    let spec = ProcessSpec {
        command: format!("exec 3<>/dev/tcp/127.0.0.1/{to} && {{ cat <&3 & cat >&3; wait; }}"),
        ..ProcessSpec::default()
    };
    let Ok(mut process) = sandbox.spawn(spec).await else { return };
    let (Some(mut stdin), Some(mut stdout)) = (process.stdin.take(), process.stdout.take()) else {
        return;
    };
    let (mut from_client, mut to_client) = stream.split();
    let upstream = async {
        let _ = tokio::io::copy(&mut from_client, &mut stdin).await;
        let _ = stdin.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut stdout, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    let _ = tokio::join!(upstream, downstream, process.wait());
}

/// The sandbox of a running allocation: the host image, the group's memory, no network.
async fn create_sandbox(
    shared: &Shared,
    id: &str,
    incarnation: u64,
) -> Result<Option<Arc<Sandbox>>, String> {
    let Some(runtime) = &shared.runtime else {
        return Ok(None);
    };
    let memory_mb = {
        let cluster = shared.cluster();
        let oversubscription = cluster.policy.memory_oversubscription;
        cluster.allocs.get(id).map(|alloc| memory_limit(alloc, oversubscription))
    };
    let Some(memory_mb) = memory_mb else {
        return Err(format!("allocation {id} is gone"));
    };
    let spec = SandboxSpec {
        name: format!("nomad-{id}-{incarnation}"),
        image: runtime.host_image(),
        limits: Limits { memory_mb: Some(memory_mb), ..Limits::default() },
    };
    runtime
        .create(spec)
        .await
        .map(|s| Some(Arc::new(s)))
        .map_err(|e| format!("failed to create container: {e}"))
}

/// `MemoryMaxMB` is the hard limit where oversubscription is on; `MemoryMB` otherwise.
fn memory_limit(alloc: &Alloc, oversubscription: bool) -> u64 {
    let per_task = alloc.group.tasks.iter().map(|t| {
        let max =
            if oversubscription && t.memory_max_mb > 0 { t.memory_max_mb } else { t.memory_mb };
        u64::try_from(max.max(t.memory_mb)).unwrap_or(0)
    });
    per_task.sum::<u64>().max(16)
}

/// The client kills a stopped allocation after the kill delay.
async fn kill_alloc(shared: Arc<Shared>, id: String, incarnation: u64) {
    tokio::time::sleep(shared.delays().kill).await;
    shared.with_cluster(|c| ((), c.killed(&id, incarnation)));
}
