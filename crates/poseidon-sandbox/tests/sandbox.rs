//! Real sandboxes (run as root): isolation, images, executions.

mod common;

use std::time::{Duration, Instant};

use common::*;
use poseidon_sandbox::{Limits, ProcessSpec, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_runs_as_user_in_workspace() {
    let sb = sandbox(Limits::default()).await;
    let spec = ProcessSpec {
        env: vec![("GREETING".into(), "hi there".into())],
        ..batch("echo \"$GREETING\"; id -u; id -g; pwd; echo $HOME; echo oops >&2")
    };
    let out = run(&sb, spec).await;
    assert_eq!(out.stdout, "hi there\n1001\n1001\n/workspace\n/workspace\n");
    assert_eq!(out.stderr, "oops\n");
    assert_eq!(out.exit.code, Some(0));
    let root = run(&sb, privileged("id -u; id -un")).await;
    assert_eq!(root.stdout, "0\nroot\n");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported() {
    let sb = sandbox(Limits::default()).await;
    let out = run(&sb, batch("exit 3")).await;
    assert_eq!((out.exit.code, out.exit.signal), (Some(3), None));
    let out = run(&sb, batch("kill -TERM $$")).await;
    assert_eq!((out.exit.code, out.exit.signal), (None, Some(15)));
    assert_eq!(out.exit.shell_code(), 143);
    assert!(!out.exit.oom_killed);
    let out = run(&sb, batch("exec /nonexistent")).await;
    assert_eq!(out.exit.code, Some(127));
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn process_list_shows_only_the_runner() {
    let sb = sandbox(Limits::default()).await;
    let out = run(&sb, batch("sleep 5 & echo $!; ls /proc; kill %1")).await;
    let mut words = out.stdout.split_whitespace();
    let sleep: u32 = words.next().unwrap().parse().unwrap();
    let mut pids: Vec<u32> = words.filter_map(|w| w.parse().ok()).collect();
    pids.sort();
    assert_eq!(pids[0], 1, "{pids:?}");
    assert!(pids.contains(&sleep), "{pids:?}");
    assert_eq!(pids.len(), 4, "init, bash, sleep and ls only: {pids:?}");
    let out = run(&sb, batch("cat /proc/1/cmdline | tr '\\0' ' '; hostname")).await;
    assert!(out.stdout.contains("poseidon-sandbox-init"), "{out:?}");
    assert!(out.stdout.contains(sb.name()), "{out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn host_and_other_runner_files_are_invisible() {
    let a = sandbox(Limits::default()).await;
    let b = sandbox(Limits::default()).await;
    let out = run(&a, batch("echo secret > /workspace/mine && echo ok")).await;
    assert_eq!(out.stdout, "ok\n");
    let out = run(&b, batch("ls -A /workspace; ls / | tr '\\n' ' '")).await;
    assert!(!out.stdout.contains("mine"), "{out:?}");
    for path in
        ["/root", "/home", "/var", "/etc/shadow", "/etc/gshadow", "/sys", "/usr/local/bin/docker"]
    {
        let out = run(&b, privileged(&format!("test -e {path} && echo visible"))).await;
        assert_eq!(out.stdout, "", "{path} must not exist");
    }
    let state = state_dir("main");
    let out = run(&b, privileged(&format!("ls {}", state.display()))).await;
    assert_ne!(out.exit.code, Some(0), "the state dir is not visible");
    let out = run(&b, batch("grep -c . /etc/passwd; ls /etc | wc -l")).await;
    assert!(out.stdout.starts_with("3\n"), "curated passwd: {out:?}");
    a.destroy().await.unwrap();
    b.destroy().await.unwrap();
}

#[tokio::test]
async fn unprivileged_cannot_write_image_read_init_environ_or_raise_limits() {
    let sb = sandbox(Limits::default()).await;
    for cmd in [
        "echo x >> /etc/passwd",
        "touch /usr/bin/evil",
        "touch /bin/evil",
        "mkdir /newdir",
        "cat /proc/1/environ",
        "ulimit -Hn 100000",
        "echo 100000 > /proc/self/oom_score_adj && test $(cat /proc/self/oom_score_adj) = -1000",
        "echo -1000 > /proc/self/oom_score_adj",
        "mknod /workspace/null c 1 3",
        "hostname other",
    ] {
        let out = run(&sb, batch(cmd)).await;
        assert_ne!(out.exit.code, Some(0), "{cmd} must fail: {out:?}");
    }
    let out = run(
        &sb,
        batch("echo data > /workspace/f && echo data > /tmp/f && cat /workspace/f /tmp/f"),
    )
    .await;
    assert_eq!(out.stdout, "data\ndata\n");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn seccomp_refuses_namespace_and_mount_calls_even_for_root() {
    let sb = sandbox(Limits::default()).await;
    for cmd in [
        "unshare -U true",
        "unshare -m true",
        "unshare -n true",
        "mount -t tmpfs none /tmp",
        "umount /proc",
        "python3 -c 'import os; os.unshare(os.CLONE_NEWUSER)'",
    ] {
        let out = run(&sb, privileged(cmd)).await;
        assert_ne!(out.exit.code, Some(0), "{cmd} must fail: {out:?}");
    }
    // clone3 is refused with ENOSYS, so the C library falls back to clone: threads work.
    let out = run(&sb, privileged("python3 -c 'import threading; t=threading.Thread(target=print, args=(\"thread\",)); t.start(); t.join()'")).await;
    assert_eq!(out.stdout, "thread\n", "{out:?}");
    let out = run(
        &sb,
        batch("grep -E '^(Seccomp|NoNewPrivs|CapEff)' /proc/self/status | tr -s '\\t' ' '"),
    )
    .await;
    assert!(out.stdout.contains("NoNewPrivs: 1"), "{out:?}");
    assert!(out.stdout.contains("Seccomp: 2"), "{out:?}");
    assert!(out.stdout.contains("CapEff: 0000000000000000"), "{out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn only_loopback_networking() {
    let sb = sandbox(Limits::default()).await;
    let out = run(&sb, batch("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")).await;
    assert_eq!(out.stdout, "lo\n");
    let script = "import socket\ns=socket.socket(); s.bind(('127.0.0.1',0)); s.listen()\n\
                  c=socket.create_connection(s.getsockname()); a,_=s.accept(); c.send(b'ping'); print(a.recv(4).decode())";
    let out = run(&sb, batch(&format!("python3 -c \"{script}\""))).await;
    assert_eq!(out.stdout, "ping\n", "{out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn host_image_runs_python_gcc_java_and_node() {
    let sb = sandbox(Limits::default()).await;
    let out = run(&sb, batch("python3 -c 'print(6*7)'")).await;
    assert_eq!(out.stdout, "42\n", "{out:?}");
    let out = run(&sb, batch("printf '#include <stdio.h>\\nint main(){puts(\"c ok\");}' > a.c && gcc a.c -o a && ./a && make --version | head -1")).await;
    assert!(out.stdout.starts_with("c ok\nGNU Make"), "{out:?}");
    let out = run(&sb, batch("node -e 'console.log(1+1)'")).await;
    assert_eq!(out.stdout, "2\n", "{out:?}");
    let out = run(&sb, batch("printf 'class H{public static void main(String[] a){System.out.println(\"java ok\");}}' > H.java && java H.java")).await;
    assert_eq!(out.stdout, "java ok\n", "{out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn memory_hog_is_oom_killed_and_reported() {
    let sb = sandbox(Limits { memory_mb: Some(48), ..Limits::default() }).await;
    let out = run(&sb, batch("python3 -c \"x = b'a' * (200 << 20)\"")).await;
    assert_eq!(out.exit.signal, Some(9), "{out:?}");
    assert!(out.exit.oom_killed, "{out:?}");
    let out = run(&sb, batch("echo alive")).await;
    assert_eq!(out.stdout, "alive\n");
    assert!(!out.exit.oom_killed);
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn fork_bomb_is_contained_and_runner_still_answers() {
    let sb = sandbox(Limits { pids: Some(48), ..Limits::default() }).await;
    let mut bomb = sb.spawn(batch("b(){ b|b& }; b; sleep 3")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bomb.killer().kill();
    let exit = tokio::time::timeout(Duration::from_secs(10), bomb.wait()).await.unwrap().unwrap();
    assert_eq!(exit.signal, Some(9));
    let out = run(&sb, batch("echo still here; ls /proc | grep -cE '^[0-9]+$'")).await;
    assert!(out.stdout.starts_with("still here\n"), "{out:?}");
    let procs: u32 = out.stdout.lines().nth(1).unwrap().parse().unwrap();
    assert!(procs <= 4, "the bomb is gone: {procs}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn busy_loop_is_throttled_to_its_cpu_share() {
    let mhz = runtime().host_mhz();
    let sb = sandbox(Limits { cpu_mhz: Some((mhz / 5.0) as u32), ..Limits::default() }).await;
    let script = "import os,time\nt=time.time()\nwhile time.time()-t<1.0: pass\nc=os.times()\nprint(c.user+c.system)";
    let out = run(&sb, batch(&format!("python3 -c \"{script}\""))).await;
    let cpu: f64 = out.stdout.trim().parse().expect("cpu seconds");
    assert!(cpu < 0.4, "20% share over 1 s, got {cpu} s of CPU");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn filling_the_disk_ends_in_no_space_left() {
    let sb = sandbox(Limits { disk_mb: Some(16), ..Limits::default() }).await;
    let out = run(&sb, batch("dd if=/dev/zero of=/workspace/big bs=1M count=64")).await;
    assert_ne!(out.exit.code, Some(0));
    assert!(out.stderr.contains("No space left on device"), "{out:?}");
    let out = run(&sb, batch("rm /workspace/big && echo freed")).await;
    assert_eq!(out.stdout, "freed\n");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn kill_ends_background_and_setsid_processes() {
    let sb = sandbox(Limits::default()).await;
    let mut p = sb.spawn(batch("sleep 100 & setsid sleep 100 & wait")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    p.killer().kill();
    let exit = tokio::time::timeout(Duration::from_secs(5), p.wait()).await.unwrap().unwrap();
    assert_eq!(exit.signal, Some(9));
    assert!(started.elapsed() < Duration::from_secs(2));
    let out = run(&sb, batch("pgrep -c sleep || true")).await;
    assert_eq!(out.stdout.trim(), "0", "no sleep survived: {out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn leftovers_of_an_exited_main_process_are_killed() {
    let sb = sandbox(Limits::default()).await;
    let out =
        run(&sb, batch("setsid sleep 100 > /dev/null 2>&1 & (sleep 100 &) ; echo started")).await;
    assert_eq!(out.stdout, "started\n");
    let out = run(&sb, batch("pgrep -c sleep || true")).await;
    assert_eq!(out.stdout.trim(), "0", "{out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn pty_echoes_and_keeps_stderr_separate() {
    let sb = sandbox(Limits::default()).await;
    let mut p = sb
        .spawn(ProcessSpec {
            tty: true,
            separate_stderr: true,
            ..batch("read line; echo \"got $line\"; echo err >&2; test -t 0 && echo tty")
        })
        .await
        .unwrap();
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    let out = finish(p).await;
    assert_eq!(out.stdout, "hello\r\ngot hello\r\ntty\r\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.exit.code, Some(0));
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn pty_ctrl_c_interrupts_and_stderr_can_be_merged() {
    let sb = sandbox(Limits::default()).await;
    let mut p =
        sb.spawn(ProcessSpec { tty: true, ..batch("echo ready >&2; sleep 30") }).await.unwrap();
    assert!(p.stderr.is_none());
    let mut stdout = p.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let n = stdout.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"ready\r\n");
    p.stdin.as_mut().unwrap().write_all(b"\x03").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), p.wait()).await.unwrap().unwrap();
    assert_eq!(exit.signal, Some(2), "{exit:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn stdin_is_fed_while_it_runs_and_output_streams() {
    let sb = sandbox(Limits::default()).await;
    let mut p = sb.spawn(batch("while read l; do echo \"<$l>\"; done")).await.unwrap();
    let mut stdin = p.stdin.take().unwrap();
    let mut stdout = p.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    for word in ["a", "b"] {
        stdin.write_all(format!("{word}\n").as_bytes()).await.unwrap();
        let n = stdout.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], format!("<{word}>\n").as_bytes());
    }
    stdin.shutdown().await.unwrap();
    let exit = p.wait().await.unwrap();
    assert_eq!(exit.code, Some(0));
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn concurrent_executions_in_one_runner() {
    let sb = sandbox(Limits::default()).await;
    let started = Instant::now();
    let outs = futures_join(&sb).await;
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.stdout, format!("{i}\n"));
    }
    assert!(started.elapsed() < Duration::from_millis(2500), "ran in parallel");
    sb.destroy().await.unwrap();
}

async fn futures_join(sb: &poseidon_sandbox::Sandbox) -> Vec<Output> {
    let (a, b, c, d) = tokio::join!(
        run(sb, batch("sleep 1; echo 0")),
        run(sb, batch("sleep 1; echo 1")),
        run(sb, batch("sleep 1; echo 2")),
        run(sb, batch("sleep 1; echo 3")),
    );
    vec![a, b, c, d]
}

#[tokio::test]
async fn bad_specs_are_refused_and_destroy_is_idempotent() {
    let sb = sandbox(Limits::default()).await;
    assert!(sb.spawn(ProcessSpec { cwd: Some("relative".into()), ..batch("true") }).await.is_err());
    assert!(
        sb.spawn(ProcessSpec { env: vec![("A=B".into(), "x".into())], ..batch("true") })
            .await
            .is_err()
    );
    assert!(sb.spawn(batch(&"x".repeat(100_000))).await.is_err());
    let err = sb.spawn(ProcessSpec { cwd: Some("/nonexistent".into()), ..batch("true") }).await;
    assert!(err.is_err(), "missing cwd is a spawn error");
    assert_eq!(run(&sb, batch("echo fine")).await.stdout, "fine\n");
    sb.files().expect("root of a live runner");
    sb.destroy().await.unwrap();
    sb.destroy().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sb.exited()).await.unwrap();
    assert!(sb.spawn(batch("true")).await.is_err());
    assert!(sb.files().is_err());
}

#[tokio::test]
async fn dev_is_minimal_and_works() {
    let sb = sandbox(Limits::default()).await;
    let out = run(&sb, batch("ls /dev | tr '\\n' ' '")).await;
    assert_eq!(
        out.stdout,
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero "
    );
    let script = "echo x > /dev/null && head -c 4 /dev/urandom | wc -c && echo s > /dev/shm/f && cat /dev/shm/f \
                  && python3 -c 'import os,pty; m,s=pty.openpty(); print(os.ttyname(s))'";
    let out = run(&sb, batch(script)).await;
    assert_eq!(out.stdout, "4\ns\n/dev/pts/0\n", "{out:?}");
    let out = run(&sb, batch("echo x > /dev/evil")).await;
    assert_ne!(out.exit.code, Some(0), "user cannot write /dev");
    sb.destroy().await.unwrap();
}

/// A tiny root file system: bash and its libraries, and a passwd with `user` = 2000:2000.
fn minimal_rootfs() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ldd = std::process::Command::new("ldd").arg("/bin/bash").output().unwrap();
    let libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_owned)
        .collect();
    for file in libs.iter().map(String::as_str).chain(["/bin/bash"]) {
        let target = dir.path().join(file.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(file).unwrap(), &target).unwrap();
    }
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0::/:/bin/bash\nuser:x:2000:2000::/workspace:/bin/bash\n",
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn directory_image_with_its_own_user() {
    let rootfs = minimal_rootfs();
    let rt = runtime();
    let image = rt.directory_image(rootfs.path()).unwrap();
    assert!(rt.directory_image(std::path::Path::new("relative")).is_err());
    let sb = rt
        .create(poseidon_sandbox::SandboxSpec {
            name: unique_name("dir"),
            image,
            limits: Limits::default(),
        })
        .await
        .unwrap();
    let out =
        run(&sb, batch("echo $UID $PWD; echo *; echo hi > /workspace/f && echo $(</workspace/f)"))
            .await;
    assert_eq!(out.stdout, "2000 /workspace\n*\nhi\n", "{out:?}");
    let out = run(&sb, batch("echo x > /bin/bash")).await;
    assert_ne!(out.exit.code, Some(0), "the image is read-only");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn runner_root_cannot_touch_the_init_or_the_image() {
    let sb = sandbox(Limits::default()).await;
    for cmd in [
        "cat /proc/1/environ",
        "ls /proc/1/fd",
        "ls /proc/1/root/",
        "echo x >> /etc/passwd",
        "touch /usr/bin/evil",
        "kill -9 1 && sleep 0.2 && kill -0 1 && false",
    ] {
        let out = run(&sb, privileged(cmd)).await;
        assert_ne!(out.exit.code, Some(0), "{cmd} must fail: {out:?}");
    }
    assert_eq!(run(&sb, batch("echo alive")).await.stdout, "alive\n");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn executions_inherit_only_their_stdio() {
    let sb = sandbox(Limits::default()).await;
    let out = run(&sb, batch("ls /proc/self/fd | tr '\\n' ' '; ulimit -n")).await;
    assert_eq!(out.stdout, "0 1 2 3 1024\n", "{out:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_dying_init_is_noticed() {
    let sb = sandbox(Limits::default()).await;
    let mut sleeper = sb.spawn(batch("sleep 100")).await.unwrap();
    let unified = std::path::Path::new("/sys/fs/cgroup/unified");
    let v2_root = if unified.exists() { unified } else { std::path::Path::new("/sys/fs/cgroup") };
    let procs = v2_root.join(CGROUP_NAME).join(sb.name()).join("cgroup.procs");
    let init: i32 = std::fs::read_to_string(procs).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), sb.exited()).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), sleeper.wait()).await.unwrap();
    assert!(waited.is_err(), "the runner is gone: {waited:?}");
    assert!(sb.spawn(batch("true")).await.is_err());
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn failures_are_errors_not_hangs_and_leave_nothing() {
    // An init that exits at once: creation fails and its cgroups are gone.
    let top = "poseidon-test-badinit";
    let bad = poseidon_sandbox::Runtime::new(poseidon_sandbox::RuntimeConfig {
        init_program: "/bin/true".into(),
        ..config(top, "badinit")
    })
    .unwrap();
    let name = unique_name("bad");
    let spec =
        SandboxSpec { name: name.clone(), image: bad.host_image(), limits: Limits::default() };
    let created = tokio::time::timeout(Duration::from_secs(10), bad.create(spec)).await.unwrap();
    assert!(created.is_err());
    for h in ["memory", "pids", "cpu", "unified"] {
        let dir = std::path::Path::new("/sys/fs/cgroup").join(h).join(top).join(&name);
        assert!(!dir.exists(), "{dir:?} removed");
    }
    // An image the runner cannot read (host root, mode 0700): executions fail to start.
    let hidden = tempfile::tempdir().unwrap();
    let rt = runtime();
    let image = rt.directory_image(hidden.path()).unwrap();
    let spec = SandboxSpec { name: unique_name("hidden"), image, limits: Limits::default() };
    let sb = rt.create(spec).await.unwrap();
    let spawned = tokio::time::timeout(Duration::from_secs(10), sb.spawn(batch("true"))).await;
    let err = spawned.unwrap().expect_err("no bash in that image");
    assert!(err.to_string().contains("/bin/bash"), "{err}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn zero_limits_are_refused() {
    let rt = runtime();
    for limits in [
        Limits { disk_mb: Some(0), ..Limits::default() },
        Limits { memory_mb: Some(0), ..Limits::default() },
        Limits { pids: Some(0), ..Limits::default() },
        Limits { cpu_mhz: Some(0), ..Limits::default() },
    ] {
        let spec = SandboxSpec { name: unique_name("zero"), image: rt.host_image(), limits };
        assert!(rt.create(spec).await.is_err());
    }
}

#[tokio::test]
async fn privileged_executions_keep_only_a_container_roots_capabilities() {
    let sb = sandbox(Limits::default()).await;
    let caps = "grep -E '^Cap(Eff|Bnd)' /proc/self/status";
    let root = run(&sb, privileged(caps)).await;
    // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT
    // AUDIT_WRITE SETFCAP; no SYS_ADMIN, NET_ADMIN, NET_RAW, SYS_PTRACE, ...
    assert_eq!(root.stdout, "CapEff:\t00000000a00405fb\nCapBnd:\t00000000a00405fb\n", "{root:?}");
    let user = run(&sb, batch(caps)).await;
    assert!(user.stdout.starts_with("CapEff:\t0000000000000000\n"), "{user:?}");
    // The dropped capabilities stay dropped for what root starts, and their syscalls fail.
    let admin = run(&sb, privileged("hostname other")).await;
    assert_ne!(admin.exit.code, Some(0), "root changed the hostname: {admin:?}");
    sb.destroy().await.unwrap();
}

/// Python that opens inotify instances until the kernel refuses one, prints how many it got,
/// and holds them (argument 1: seconds).
const INOTIFY_HOG: &str = "import ctypes, sys, time
libc = ctypes.CDLL(None)
held = []
while libc.inotify_init() >= 0:
    held.append(1)
print(len(held), flush=True)
time.sleep(float(sys.argv[1]))";

#[tokio::test]
async fn per_user_kernel_limits_of_a_runner_spare_the_host_and_other_runners() {
    let hog = sandbox(Limits::default()).await;
    let other = sandbox(Limits::default()).await;
    let mut holding = hog.spawn(batch(&format!("python3 -c '{INOTIFY_HOG}' 5"))).await.unwrap();
    let mut stdout = holding.stdout.take().unwrap();
    let mut count = Vec::new();
    while !count.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stdout.read(&mut byte).await.unwrap(), 1, "the hog ended early");
        count.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&count).trim().parse::<u32>().unwrap() > 0);
    // The hog used up its own budget, not host root's (the runner's namespace owner is its own
    // unprivileged id) nor the other runner's.
    let probe = "import ctypes; print(ctypes.CDLL(None).inotify_init() >= 0)";
    let inside = run(&other, batch(&format!("python3 -c '{probe}'"))).await;
    assert_eq!(inside.stdout, "True\n", "{inside:?}");
    let host = std::process::Command::new("/usr/bin/python3").args(["-c", probe]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&host.stdout), "True\n", "{host:?}");
    holding.killer().kill();
    holding.wait().await.unwrap();
    hog.destroy().await.unwrap();
    other.destroy().await.unwrap();
}

#[tokio::test]
async fn memory_that_belongs_to_no_process_costs_the_execution_not_the_runner() {
    let sb = sandbox(Limits { memory_mb: Some(32), disk_mb: Some(64), ..Limits::default() }).await;
    // Files in the writable layer are charged to the runner's memory but to nobody's RSS, so
    // the OOM killer's choice falls to the score: the execution's processes, not the init.
    let out = run(&sb, batch("dd if=/dev/zero of=/tmp/fill bs=1M count=60")).await;
    assert_eq!(out.exit.signal, Some(9), "{out:?}");
    sb.files().expect("the runner is alive").update(&["/tmp/fill".to_owned()], &[]).unwrap();
    let out = run(&sb, batch("echo alive")).await;
    assert_eq!(out.stdout, "alive\n", "the runner died with the hog: {out:?}");
    sb.destroy().await.unwrap();
}
