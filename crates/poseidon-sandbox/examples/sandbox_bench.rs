//! Measures runner creation (without and with network access), the first output byte of
//! `echo hi`, destruction and the host memory of idle runners, next to a plain fork+exec of
//! `/bin/true` (run as root; the network part needs Debian's `nftables`):
//!
//! ```text
//! cargo build -p poseidon-sandbox --release --bins --examples
//! target/release/examples/sandbox_bench target/release/poseidon-sandbox-init
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use poseidon_sandbox::{
    Limits, NetworkConfig, NetworkSpec, ProcessSpec, Runtime, RuntimeConfig, SandboxSpec,
};
use tokio::io::AsyncReadExt;

const ROUNDS: usize = 50;
const IDLE_RUNNERS: usize = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let init_program: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: sandbox_bench <path of poseidon-sandbox-init>")?
        .into();
    let state = std::env::temp_dir().join("poseidon-sandbox-bench");
    let network = NetworkConfig {
        bridge: "psbench0".into(),
        subnet: "10.219.0.0/24".parse()?,
        resolvers: Vec::new(),
        allow: Vec::new(),
        deny: Vec::new(),
        host_ports: (33000, 33099),
        advertised_address: None,
    };
    let runtime = Runtime::with_network(
        RuntimeConfig {
            state_dir: state.clone(),
            init_program,
            init_args: Vec::new(),
            cgroup_name: "poseidon-bench".into(),
            uid_base: 400_000,
            defaults: Limits { memory_mb: Some(256), ..Limits::default() },
        },
        Some(network),
    )?;
    let spec =
        |name: String| SandboxSpec { name, image: runtime.host_image(), limits: Limits::default() };

    let mut forks = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        std::process::Command::new("/bin/true").status()?;
        forks.push(start.elapsed());
    }

    let (mut creates, mut first_bytes, mut destroys) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let start = Instant::now();
        let sandbox = runtime.create(spec(format!("bench-{i}"))).await?;
        creates.push(start.elapsed());

        let start = Instant::now();
        let mut process = sandbox
            .spawn(ProcessSpec { command: "echo hi".into(), ..ProcessSpec::default() })
            .await?;
        let mut byte = [0u8; 1];
        process.stdout.as_mut().ok_or("no stdout")?.read_exact(&mut byte).await?;
        first_bytes.push(start.elapsed());
        process.wait().await?;

        let start = Instant::now();
        sandbox.destroy().await?;
        destroys.push(start.elapsed());
    }

    let mut network_creates = Vec::new();
    for i in 0..ROUNDS {
        let start = Instant::now();
        let networked = NetworkSpec { exposed_ports: vec![8080] };
        let sandbox =
            runtime.create_with_network(spec(format!("net-{i}")), Some(networked)).await?;
        network_creates.push(start.elapsed());
        sandbox.destroy().await?;
    }

    let before = mem_available_kib()?;
    let mut idle = Vec::new();
    for i in 0..IDLE_RUNNERS {
        idle.push(runtime.create(spec(format!("idle-{i}"))).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = mem_available_kib()?;
    for sandbox in &idle {
        sandbox.destroy().await?;
    }

    report("fork+exec /bin/true", &mut forks);
    report("create", &mut creates);
    report("create with network", &mut network_creates);
    report("exec → first byte", &mut first_bytes);
    report("destroy", &mut destroys);
    println!(
        "idle runner memory: {:.0} KiB each ({IDLE_RUNNERS} runners, MemAvailable delta)",
        before.saturating_sub(after) as f64 / IDLE_RUNNERS as f64
    );
    drop(runtime);
    std::fs::remove_dir_all(&state)?;
    Ok(())
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<22} median {:7.2} ms  min {:7.2} ms  max {:7.2} ms  (n={})",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

fn mem_available_kib() -> Result<u64, Box<dyn std::error::Error>> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no MemAvailable in /proc/meminfo".into())
}
