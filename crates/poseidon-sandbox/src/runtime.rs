//! The service side: [`Runtime`] (detection, leftovers, images) and [`Sandbox`] (one runner:
//! its init, cgroups and control socket).
//!
//! Each sandbox has one reader task that receives the init's messages and routes them to the
//! waiting executions; requests are sent under a lock (one datagram each).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::cgroup::{self, CgroupLimits, Layout, RunnerCgroup};
use crate::image::{self, Image};
use crate::network::{Attachment, Network, NetworkConfig, NetworkSpec};
use crate::process::{self, Process, ProcessSpec, RawExit};
use crate::protocol::{self, Datagram, FromInit, ProtocolError, RecvError, SetupConfig, ToInit};
use crate::{Error, files, sys};

/// How long the init may take to build a runner.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a destroyed runner's reader task may take to see the socket close.
const READER_TIMEOUT: Duration = Duration::from_secs(1);
/// Ids mapped into every runner's user namespace.
pub const MAPPED_IDS: u32 = 65536;
/// Fallbacks where neither the sandbox nor the runtime defaults set a limit.
const DEFAULT_PIDS: u64 = 512;
const DEFAULT_DISK_MB: u64 = 512;

/// Configuration of a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The host image and the runners' scratch mount point live below.
    pub state_dir: PathBuf,
    /// Started as the runner init; it must call [`crate::init::main`].
    pub init_program: PathBuf,
    /// Passed to the init first (e.g. `["sandbox-init"]`).
    pub init_args: Vec<OsString>,
    /// Our top-level cgroup directory in every hierarchy.
    pub cgroup_name: String,
    /// Host uid/gid of sandbox root; [`MAPPED_IDS`] ids are mapped from there.
    pub uid_base: u32,
    /// Used where a [`SandboxSpec`]'s limit is `None`.
    pub defaults: Limits,
}

/// Resource limits of a runner; `None` means "the default".
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub memory_mb: Option<u64>,
    pub cpu_mhz: Option<u32>,
    pub pids: Option<u64>,
    pub disk_mb: Option<u64>,
    pub nofile: Option<u64>,
}

impl Limits {
    /// Zero is never meant: a tmpfs of size 0 would even be unlimited.
    fn validate(&self) -> Result<(), Error> {
        let zero = [
            ("memory_mb", self.memory_mb == Some(0)),
            ("cpu_mhz", self.cpu_mhz == Some(0)),
            ("pids", self.pids == Some(0)),
            ("disk_mb", self.disk_mb == Some(0)),
            ("nofile", self.nofile == Some(0)),
        ];
        match zero.iter().find(|(_, is_zero)| *is_zero) {
            Some((name, _)) => Err(Error::InvalidLimit(name)),
            None => Ok(()),
        }
    }

    fn or(&self, defaults: &Limits) -> Limits {
        Limits {
            memory_mb: self.memory_mb.or(defaults.memory_mb),
            cpu_mhz: self.cpu_mhz.or(defaults.cpu_mhz),
            pids: self.pids.or(defaults.pids),
            disk_mb: self.disk_mb.or(defaults.disk_mb),
            nofile: self.nofile.or(defaults.nofile),
        }
    }
}

/// What to create.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// Unique, `[A-Za-z0-9-]{1,63}`; the cgroup directory and the hostname.
    pub name: String,
    pub image: Image,
    pub limits: Limits,
}

/// The sandbox runtime. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

#[derive(Debug)]
struct RuntimeInner {
    config: RuntimeConfig,
    layout: Layout,
    host_mhz: f64,
    host_image: Image,
    scratch_dir: PathBuf,
    network: Option<Network>,
    /// Hands out the owners of runners' user namespaces, see [`Runtime::next_owner`].
    owners: AtomicU32,
}

impl Drop for RuntimeInner {
    /// Every sandbox holds the runtime, so this runs after the last runner is gone.
    fn drop(&mut self) {
        self.layout.remove_top(&self.config.cgroup_name);
    }
}

impl Runtime {
    /// Detects the cgroup layout, removes leftovers of a previous run and builds the host image.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, Error> {
        Runtime::with_network(config, None)
    }

    /// [`Runtime::new`], and with `network` runners may get network access
    /// ([`Runtime::create_with_network`]). Blocking: sets up the bridge and the rules.
    pub fn with_network(
        config: RuntimeConfig,
        network: Option<NetworkConfig>,
    ) -> Result<Runtime, Error> {
        validate_config(&config)?;
        let scratch_dir = config.state_dir.join("mnt");
        let images = config.state_dir.join("images");
        for dir in [&scratch_dir, &images] {
            fs::create_dir_all(dir)
                .map_err(|source| Error::StateDir { path: dir.clone(), source })?;
        }
        make_traversable(&config.state_dir, &[&scratch_dir, &images])?;
        // Runner inits are orphaned by their set-up process; as subreaper we reap them
        // ourselves instead of leaving zombies to whatever PID 1 the host has.
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| Error::Io(e.into()))?;
        let layout = Layout::detect(Path::new("/sys/fs/cgroup"))?;
        layout.remove_leftovers(&config.cgroup_name)?;
        layout.create_top(&config.cgroup_name)?;
        let host_image = Image::host(image::build_host_image(&images, Path::new("/etc"))?);
        let network = network.map(Network::new).transpose()?;
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                host_mhz: host_cpu_mhz()?,
                config,
                layout,
                host_image,
                scratch_dir,
                network,
                owners: AtomicU32::new(0),
            }),
        })
    }

    /// The built-in image: the host's programs with a curated `/etc`.
    pub fn host_image(&self) -> Image {
        self.inner.host_image.clone()
    }

    /// An unpacked root file system at `rootfs`.
    pub fn directory_image(&self, rootfs: &Path) -> Result<Image, Error> {
        Ok(Image::directory(rootfs)?)
    }

    /// The host's CPU clock in MHz (the unit of CPU limits).
    pub fn host_mhz(&self) -> f64 {
        self.inner.host_mhz
    }

    /// Whether runners may get network access.
    pub fn network_enabled(&self) -> bool {
        self.inner.network.is_some()
    }

    /// Creates a runner (loopback only) and waits until its init is ready.
    pub async fn create(&self, spec: SandboxSpec) -> Result<Sandbox, Error> {
        self.create_with_network(spec, None).await
    }

    /// [`Runtime::create`]; with `network` the runner is connected to the outside world and
    /// its exposed ports are mapped ([`Sandbox::mapped_ports`]).
    pub async fn create_with_network(
        &self,
        spec: SandboxSpec,
        network: Option<NetworkSpec>,
    ) -> Result<Sandbox, Error> {
        if network.is_some() && !self.network_enabled() {
            return Err(Error::NetworkDisabled);
        }
        let sandbox = self.create_isolated(spec, network.is_some()).await?;
        if let Some(network) = network
            && let Err(e) = sandbox.attach_network(network).await
        {
            let _ = sandbox.destroy().await;
            return Err(e);
        }
        Ok(sandbox)
    }

    async fn create_isolated(&self, spec: SandboxSpec, networked: bool) -> Result<Sandbox, Error> {
        validate_name(&spec.name)?;
        let limits = spec.limits.or(&self.inner.config.defaults);
        limits.validate()?;
        let cgroup = self.inner.layout.runner(&self.inner.config.cgroup_name, &spec.name);
        cgroup.create()?;
        let unfinished = UnfinishedCgroup(Some(cgroup.clone()));
        let started = async {
            cgroup.apply(&self.cgroup_limits(&limits))?;
            self.start_init(&spec, &limits, &cgroup, networked).await
        };
        let started = started.await;
        unfinished.disarm();
        match started {
            Ok(init) => Ok(Sandbox::new(self.clone(), spec, limits, cgroup, init)),
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = cgroup.kill_all();
                    cgroup.remove()
                })
                .await;
                Err(e)
            }
        }
    }

    fn cgroup_limits(&self, limits: &Limits) -> CgroupLimits {
        CgroupLimits {
            memory_bytes: limits.memory_mb.map(|mb| mb.saturating_mul(1 << 20)),
            cpu_quota_us: limits.cpu_mhz.map(|mhz| cgroup::cpu_quota_us(mhz, self.inner.host_mhz)),
            pids: limits.pids.unwrap_or(DEFAULT_PIDS),
        }
    }

    /// Spawns the init and runs the handshake of [`crate::protocol`].
    async fn start_init(
        &self,
        spec: &SandboxSpec,
        limits: &Limits,
        cgroup: &RunnerCgroup,
        networked: bool,
    ) -> Result<InitHandle, Error> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(Error::Socket)?;
        make_blocking(&theirs)?;
        let config = &self.inner.config;
        let mut child = tokio::process::Command::new(&config.init_program)
            .args(&config.init_args)
            .arg(&spec.name)
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::SpawnInit { path: config.init_program.clone(), source })?;
        let channel = Channel::new(ours)?;
        let handshake = async {
            let pid = child.id().map(|p| Pid::from_raw(p as i32)).ok_or(Error::InitDied)?;
            // Before the init runs anything: it is in the runner's cgroups, its children too.
            cgroup.add(pid)?;
            channel.send(&ToInit::Setup(self.setup_config(spec, limits, networked)), &[]).await?;
            channel.expect(|m| matches!(m, FromInit::MapIds), 0).await?;
            self.write_id_maps(pid)?;
            channel.send(&ToInit::IdsMapped, &[]).await?;
            let (forked, fds) = channel.expect(|m| matches!(m, FromInit::Forked { .. }), 1).await?;
            let (FromInit::Forked { pid: init_pid }, Some(pidfd)) =
                (forked, fds.into_iter().next())
            else {
                return Err(ProtocolError::Unexpected("Forked without a pidfd".into()).into());
            };
            let _ = child.wait().await;
            channel.expect(|m| matches!(m, FromInit::Ready), 0).await?;
            Ok::<_, Error>(InitHandle { channel, pid: Pid::from_raw(init_pid), pidfd })
        };
        match tokio::time::timeout(SETUP_TIMEOUT, handshake).await {
            Ok(result) => result,
            Err(_) => Err(Error::SetupTimeout),
        }
    }

    fn setup_config(&self, spec: &SandboxSpec, limits: &Limits, networked: bool) -> SetupConfig {
        let network = self.inner.network.as_ref().filter(|_| networked);
        SetupConfig {
            owner_id: self.next_owner(),
            hostname: spec.name.clone(),
            image_root: spec.image.root().to_owned(),
            scratch_dir: self.inner.scratch_dir.clone(),
            disk_bytes: limits.disk_mb.unwrap_or(DEFAULT_DISK_MB).saturating_mul(1 << 20),
            bind_host_usr: spec.image.is_host(),
            resolv_conf: network.map(Network::resolv_conf),
        }
    }

    /// The host id that creates (and so owns) a runner's user namespace: one of 65536 ids right
    /// above the mapped range, in turn. The kernel charges per-user limits (inotify instances,
    /// queued signals, message queues) of everything in a user namespace to its owner as well;
    /// with host root as the owner, one learner could exhaust them for the host's own services,
    /// and with one shared owner, for every other runner.
    fn next_owner(&self) -> u32 {
        let slot = self.inner.owners.fetch_add(1, Ordering::Relaxed) % MAPPED_IDS;
        self.inner.config.uid_base + MAPPED_IDS + slot
    }

    /// Sandbox ids `0..65536` are host ids `uid_base..uid_base+65536`. Root may write the
    /// maps directly (no newuidmap/subuid needed).
    fn write_id_maps(&self, pid: Pid) -> Result<(), Error> {
        let line = format!("0 {} {MAPPED_IDS}\n", self.inner.config.uid_base);
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            fs::write(&path, &line).map_err(|source| Error::IdMap { path, source })?;
        }
        Ok(())
    }
}

fn validate_config(config: &RuntimeConfig) -> Result<(), Error> {
    let state = config.state_dir.to_str().unwrap_or(",");
    let invalid = if !config.state_dir.is_absolute() || state.contains([',', ':', '\n']) {
        Some("state_dir must be absolute and free of ',' and ':' (overlay options)")
    } else if config.uid_base == 0 || config.uid_base.checked_add(2 * MAPPED_IDS).is_none() {
        Some("uid_base must be above 0 and leave room for 2 × 65536 ids (mapped ids, owners)")
    } else if validate_name(&config.cgroup_name).is_err() {
        Some("cgroup_name must match [A-Za-z0-9-]{1,63}")
    } else {
        None
    };
    invalid.map_or(Ok(()), |reason| Err(Error::Config(reason)))
}

/// A runner's root (an unprivileged host id) resolves the image and the scratch mount point
/// below the state directory: every ancestor must be searchable by others. The state
/// directory itself becomes 0711 (searchable, not listable), `images` and `mnt` 0755.
fn make_traversable(state_dir: &Path, inner: &[&PathBuf]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let set_mode = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|source| Error::StateDir { path: path.to_owned(), source })
    };
    for ancestor in state_dir.ancestors().skip(1) {
        let meta = fs::metadata(ancestor)
            .map_err(|source| Error::StateDir { path: ancestor.to_owned(), source })?;
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(Error::Config("every ancestor of state_dir must be searchable (o+x)"));
        }
    }
    set_mode(state_dir, 0o711)?;
    inner.iter().try_for_each(|dir| set_mode(dir, 0o755))
}

fn validate_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid { Ok(()) } else { Err(Error::InvalidName(name.to_owned())) }
}

/// MHz of the first CPU in `/proc/cpuinfo`.
fn host_cpu_mhz() -> Result<f64, Error> {
    let text = fs::read_to_string("/proc/cpuinfo")
        .map_err(|source| Error::StateDir { path: "/proc/cpuinfo".into(), source })?;
    parse_cpu_mhz(&text).ok_or(Error::Config("no 'cpu MHz' in /proc/cpuinfo"))
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("cpu MHz"))
        .find_map(|l| l.split(':').nth(1)?.trim().parse().ok())
        .filter(|mhz: &f64| *mhz > 0.0)
}

fn make_blocking(fd: &OwnedFd) -> Result<(), Error> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(Error::Socket)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop).map_err(Error::Socket)
}

/// The init, once it is ready.
struct InitHandle {
    channel: Channel,
    pid: Pid,
    pidfd: OwnedFd,
}

/// The service's end of the control socket.
#[derive(Debug)]
struct Channel {
    socket: AsyncFd<OwnedFd>,
    send_lock: tokio::sync::Mutex<()>,
}

impl Channel {
    fn new(socket: OwnedFd) -> Result<Channel, Error> {
        Ok(Channel {
            socket: sys::async_fd(socket, Interest::READABLE | Interest::WRITABLE)
                .map_err(Error::Io)?,
            send_lock: tokio::sync::Mutex::new(()),
        })
    }

    async fn send(
        &self,
        message: &ToInit,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let bytes = protocol::encode(message)?;
        let _guard = self.send_lock.lock().await;
        loop {
            let mut ready = self.socket.writable().await.map_err(Error::Io)?;
            match protocol::send_raw(self.socket.get_ref().as_fd(), &bytes, fds) {
                Err(nix::Error::EAGAIN) => ready.clear_ready(),
                Err(nix::Error::EINTR) => {}
                other => return other.map_err(|e| ProtocolError::Send(e).into()),
            }
        }
    }

    /// The next datagram; `None` when the init closed the channel.
    async fn recv(&self) -> Result<Option<Datagram>, Error> {
        loop {
            let mut ready = self.socket.readable().await.map_err(Error::Io)?;
            match protocol::recv_raw(self.socket.get_ref().as_fd()) {
                Err(RecvError::Os(nix::Error::EAGAIN)) => ready.clear_ready(),
                Err(RecvError::Os(nix::Error::EINTR)) => {}
                Err(e) => return Err(ProtocolError::from(e).into()),
                Ok(d) => return Ok(d),
            }
        }
    }

    /// The next message, which must satisfy `expected` and carry `fds` descriptors.
    async fn expect(
        &self,
        expected: impl Fn(&FromInit) -> bool,
        fds: usize,
    ) -> Result<(FromInit, Vec<OwnedFd>), Error> {
        let datagram = self.recv().await?.ok_or(Error::InitDied)?;
        let message: FromInit = protocol::decode(&datagram.bytes)?;
        if let FromInit::SetupFailed { error } = message {
            return Err(Error::Setup(error));
        }
        if !expected(&message) {
            return Err(ProtocolError::Unexpected(format!("{message:?}")).into());
        }
        if datagram.fds.len() != fds {
            return Err(ProtocolError::FdCount { expected: fds, got: datagram.fds.len() }.into());
        }
        Ok((message, datagram.fds))
    }
}

/// Waiters of one execution.
#[derive(Debug)]
struct Waiters {
    started: Option<oneshot::Sender<Result<(), String>>>,
    exited: Option<oneshot::Sender<RawExit>>,
}

/// State shared between a sandbox and its reader task.
#[derive(Debug)]
pub(crate) struct Shared {
    channel: Channel,
    executions: Mutex<HashMap<u64, Waiters>>,
    exited: watch::Sender<bool>,
}

/// A runner. Dropping it without [`Sandbox::destroy`] kills it synchronously.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    runtime: Runtime,
    image: Image,
    limits: Limits,
    cgroup: RunnerCgroup,
    init_pid: Pid,
    pidfd: OwnedFd,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    destroyed: AtomicBool,
    network: Mutex<Option<Attachment>>,
}

impl Sandbox {
    fn new(
        runtime: Runtime,
        spec: SandboxSpec,
        limits: Limits,
        cgroup: RunnerCgroup,
        init: InitHandle,
    ) -> Sandbox {
        let shared = Arc::new(Shared {
            channel: init.channel,
            executions: Mutex::new(HashMap::new()),
            exited: watch::Sender::new(false),
        });
        let reader = tokio::spawn(read_replies(shared.clone()));
        Sandbox {
            name: spec.name,
            runtime,
            image: spec.image,
            limits,
            cgroup,
            init_pid: init.pid,
            pidfd: init.pidfd,
            shared,
            reader: Mutex::new(Some(reader)),
            next_id: AtomicU64::new(1),
            destroyed: AtomicBool::new(false),
            network: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(exposed port, address a client connects to)` of a network-enabled runner.
    pub fn mapped_ports(&self) -> Vec<(u16, SocketAddr)> {
        let attachment = self.lock_network();
        match (self.runtime.inner.network.as_ref(), attachment.as_ref()) {
            (Some(network), Some(attachment)) => network.mapped_ports(attachment),
            _ => Vec::new(),
        }
    }

    fn lock_network(&self) -> std::sync::MutexGuard<'_, Option<Attachment>> {
        self.network.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn attach_network(&self, spec: NetworkSpec) -> Result<(), Error> {
        let pidfd = self.pidfd.try_clone().map_err(Error::Io)?;
        let runtime = self.runtime.clone();
        let attachment = tokio::task::spawn_blocking(move || {
            runtime
                .inner
                .network
                .as_ref()
                .ok_or(Error::NetworkDisabled)?
                .attach(pidfd.as_fd(), &spec)
                .map_err(Error::from)
        })
        .await
        .map_err(|_| Error::Panicked("network set-up"))??;
        *self.lock_network() = Some(attachment);
        Ok(())
    }

    /// Starts an execution; returns once `bash` runs (or with the reason it could not).
    pub async fn spawn(&self, spec: ProcessSpec) -> Result<Process, Error> {
        if self.destroyed.load(Ordering::SeqCst) || *self.shared.exited.borrow() {
            return Err(Error::InitDied);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = process::request(id, &spec, &self.image, &self.limits)?;
        let (exec_cgroup, procs) = self.cgroup.create_exec(id)?;
        let cleanup = process::CgroupGuard::new(exec_cgroup);
        let stdio = process::Stdio::open(&spec)?;
        let oom_before = self.cgroup.oom_kills()?;
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.lock_executions()
            .insert(id, Waiters { started: Some(started_tx), exited: Some(exited_tx) });
        let fds = stdio.child_fds(procs.as_fd());
        let sent = self.shared.channel.send(&ToInit::Exec(request), &fds).await;
        drop(fds);
        let started = match sent {
            Ok(()) => started_rx.await.map_err(|_| Error::InitDied)?,
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = started {
            self.lock_executions().remove(&id);
            return Err(Error::Spawn(reason));
        }
        Ok(Process::new(stdio.into_parent()?, cleanup, self.cgroup.clone(), oom_before, exited_rx))
    }

    fn lock_executions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiters>> {
        self.shared.executions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sandbox's file system, for file operations from the service.
    pub fn files(&self) -> Result<files::Root, Error> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::InitDied);
        }
        let path = PathBuf::from(format!("/proc/{}/root", self.init_pid));
        let dir = nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|source| Error::OpenRoot { path, source })?;
        // The pid could have been reused only if our init had died; it still lives, so the
        // directory we opened is its root.
        sys::pidfd_send_signal(self.pidfd.as_fd(), 0).map_err(|_| Error::InitDied)?;
        let base = self.runtime.inner.config.uid_base;
        let (uid, gid) = self.image.user_ids();
        Ok(files::Root::new(
            dir,
            files::IdMap {
                root_uid: base,
                root_gid: base,
                user_uid: base + uid,
                user_gid: base + gid,
            },
            self.image.working_dir(),
        ))
    }

    /// Kills every process and removes the runner's cgroups. Idempotent.
    pub async fn destroy(&self) -> Result<(), Error> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.kill_init();
        self.forget_executions();
        self.release_network();
        let cgroup = self.cgroup.clone();
        let pidfd = self.pidfd.try_clone().map_err(Error::Io)?;
        let removed = tokio::task::spawn_blocking(move || {
            cgroup.kill_all()?;
            reap(pidfd.as_fd());
            cgroup.remove()
        })
        .await
        .map_err(|_| Error::Panicked("cgroup removal"))?;
        self.finish_reader().await;
        Ok(removed?)
    }

    /// Resolves when the init died on its own (or was killed).
    pub async fn exited(&self) {
        let mut rx = self.shared.exited.subscribe();
        let _ = rx.wait_for(|dead| *dead).await;
    }

    /// The init is dead, so the reader task ends at the socket's end-of-file; waiting for
    /// it (bounded) means the control socket is closed once the sandbox is dropped.
    async fn finish_reader(&self) {
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut reader) = reader
            && tokio::time::timeout(READER_TIMEOUT, &mut reader).await.is_err()
        {
            reader.abort();
        }
    }

    /// After the init was killed: its namespace, and with it the veth pair, is going away.
    fn release_network(&self) {
        if let (Some(network), Some(attachment)) =
            (self.runtime.inner.network.as_ref(), self.lock_network().take())
        {
            network.release(attachment);
        }
    }

    fn kill_init(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
    }

    /// Once the init is gone nothing will be reported: waiting executions and
    /// [`Sandbox::exited`] learn it now rather than never.
    fn forget_executions(&self) {
        self.lock_executions().clear();
        self.shared.exited.send_replace(true);
    }
}

/// Removes a runner's cgroups when its creation is dropped half-way (a cancelled future, e.g.
/// when the caller's runtime shuts down); the init itself dies with its `kill_on_drop` child.
struct UnfinishedCgroup(Option<RunnerCgroup>);

impl UnfinishedCgroup {
    /// The creation finished, well or not: its own code cleans up from here.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for UnfinishedCgroup {
    fn drop(&mut self) {
        if let Some(cgroup) = self.0.take() {
            let _ = cgroup.kill_all();
            let _ = cgroup.remove();
        }
    }
}

/// Collects the exit status of a killed init. The runtime is the child subreaper of its inits
/// (their parent, the set-up process, exits early), so without this they would stay zombies;
/// where the init is not our child (e.g. another subreaper above us) there is nothing to do.
fn reap(pidfd: BorrowedFd<'_>) {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    while let Err(Errno::EINTR) = waitid(Id::PIDFd(pidfd), WaitPidFlag::WEXITED) {}
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            reader.abort();
        }
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            self.kill_init();
            self.forget_executions();
            self.release_network();
            let _ = self.cgroup.kill_all();
            reap(self.pidfd.as_fd());
            let _ = self.cgroup.remove();
        }
    }
}

/// Routes the init's replies until it closes the channel. Anything malformed (the init runs
/// inside the runner and must not be trusted) is dropped.
async fn read_replies(shared: Arc<Shared>) {
    loop {
        match shared.channel.recv().await {
            Ok(Some(datagram)) => {
                if let Ok(message) = protocol::decode::<FromInit>(&datagram.bytes) {
                    route(&shared, message);
                }
            }
            Err(Error::Protocol(
                ProtocolError::TooLarge | ProtocolError::FdsTruncated | ProtocolError::Malformed(_),
            )) => {}
            Ok(None) | Err(_) => break,
        }
    }
    shared.executions.lock().unwrap_or_else(|e| e.into_inner()).clear();
    shared.exited.send_replace(true);
}

fn route(shared: &Shared, message: FromInit) {
    let mut executions = shared.executions.lock().unwrap_or_else(|e| e.into_inner());
    match message {
        FromInit::Started { id } => {
            if let Some(tx) = executions.get_mut(&id).and_then(|w| w.started.take()) {
                let _ = tx.send(Ok(()));
            }
        }
        FromInit::SpawnFailed { id, error } => {
            if let Some(tx) = executions.remove(&id).and_then(|mut w| w.started.take()) {
                let _ = tx.send(Err(error));
            }
        }
        FromInit::Exited { id, code, signal } => {
            if let Some(tx) = executions.remove(&id).and_then(|mut w| w.exited.take()) {
                let _ = tx.send(RawExit { code, signal });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz_is_parsed_from_cpuinfo() {
        let text = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2600.000\n";
        assert_eq!(parse_cpu_mhz(text), Some(2600.0));
        assert_eq!(parse_cpu_mhz("cpu MHz : 0\n"), None);
    }

    #[test]
    fn names_are_restricted() {
        assert!(validate_name("runner-1").is_ok());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sandbox_limits_fall_back_to_defaults() {
        let defaults = Limits { memory_mb: Some(100), pids: Some(10), ..Limits::default() };
        let spec = Limits { memory_mb: Some(50), ..Limits::default() };
        let merged = spec.or(&defaults);
        assert_eq!(merged.memory_mb, Some(50));
        assert_eq!(merged.pids, Some(10));
        assert_eq!(merged.cpu_mhz, None);
    }
}
