//! Benchmark of the image store: time to import (hash + unpack) an image of about 200 MB built
//! from this host's files, and the extra disk and memory per runner of that image.
//!
//! ```sh
//! cargo build --release -p poseidon --example image_bench -p poseidon-image
//! target/release/examples/image_bench --init target/release/poseidon [--size-mb 200] [--runners 10]
//! ```
//!
//! Needs root (the runners are real sandboxes). Everything lives in a temporary directory that
//! is removed at the end.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use poseidon_image::{Store, StoreConfig, import};
use poseidon_sandbox::{Limits, ProcessSpec, Runtime, RuntimeConfig, SandboxSpec};
use serde_json::json;
use sha2::{Digest, Sha256};

const UID_BASE: u32 = 400_000;
/// Host directories whose files fill the bulk layer (libraries and data, as in real images).
const BULK_SOURCES: [&str; 4] =
    ["/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib/jvm", "/usr/lib/gcc"];
const SETTLE: Duration = Duration::from_secs(2);

struct Options {
    init: PathBuf,
    size_mb: u64,
    runners: usize,
}

fn options() -> Options {
    let mut options = Options { init: PathBuf::new(), size_mb: 200, runners: 10 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--init" => options.init = PathBuf::from(value),
            "--size-mb" => options.size_mb = value.parse().expect("--size-mb: a number"),
            "--runners" => options.runners = value.parse().expect("--runners: a number"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        options.init.is_file(),
        "--init PATH_TO_POSEIDON (the binary with `sandbox-init`) is required"
    );
    options
}

fn main() {
    let options = options();
    let work = tempfile::Builder::new().prefix("poseidon-image-bench-").tempdir().unwrap();
    let layout = work.path().join("layout");
    let started = Instant::now();
    let (uncompressed, compressed) = write_layout(&layout, options.size_mb << 20);
    println!(
        "built the image: {} MiB of layers, {} MiB gzip, in {:.1} s (not measured below)",
        uncompressed >> 20,
        compressed >> 20,
        started.elapsed().as_secs_f64()
    );
    let state = work.path().join("state");
    fs::create_dir(&state).unwrap();
    let store = Store::open(StoreConfig {
        root: state.join("store"),
        uid_base: UID_BASE,
        max_image_bytes: 8 << 30,
    })
    .unwrap();
    let started = Instant::now();
    let record = import(&store, &layout, Some("bench/image:1")).unwrap().remove(0);
    let import_time = started.elapsed();
    let started = Instant::now();
    import(&store, &layout, Some("bench/image:2")).unwrap();
    let reimport_time = started.elapsed();
    let rootfs = store.rootfs(&record);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (disk_before, disk_after, memory) =
        runtime.block_on(runners(&options, &state, &rootfs, &record));
    let per_runner = |before: u64, after: u64| {
        after.saturating_sub(before) as f64 / options.runners as f64 / 1024.0 / 1024.0
    };

    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| image: layers (uncompressed) / unpacked / gzip | {} / {} / {} MiB |",
        uncompressed >> 20,
        record.size >> 20,
        compressed >> 20
    );
    println!(
        "| import: copy + verify blobs, unpack (warm page cache) | {:.2} s ({:.0} MiB/s of layers) |",
        import_time.as_secs_f64(),
        uncompressed as f64 / 1048576.0 / import_time.as_secs_f64()
    );
    println!(
        "| import again under another tag (no unpack) | {:.2} s |",
        reimport_time.as_secs_f64()
    );
    println!("| store on disk, before runners | {:.1} MiB |", disk_before as f64 / 1048576.0);
    println!(
        "| extra disk per runner ({} runners) | {:.3} MiB |",
        options.runners,
        per_runner(disk_before, disk_after)
    );
    println!(
        "| host memory per runner (MemAvailable drop) | {:.2} MiB |",
        per_runner(memory.available_after, memory.available_before)
    );
    println!("| memory cgroup charge per runner | {:.2} MiB |", per_runner(0, memory.charged));
}

struct Memory {
    available_before: u64,
    available_after: u64,
    charged: u64,
}

/// Starts the runners, runs python3 in each, and measures disk and memory with all of them up.
async fn runners(
    options: &Options,
    state: &Path,
    rootfs: &Path,
    record: &poseidon_image::ImageRecord,
) -> (u64, u64, Memory) {
    let cgroup_name = format!("image-bench-{}", std::process::id());
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: state.join("local"),
        init_program: options.init.clone(),
        init_args: vec!["sandbox-init".into()],
        cgroup_name: cgroup_name.clone(),
        uid_base: UID_BASE,
        defaults: Limits {
            memory_mb: Some(256),
            cpu_mhz: None,
            pids: Some(128),
            disk_mb: Some(64),
            nofile: Some(1024),
        },
    })
    .unwrap();
    let image = runtime
        .directory_image(rootfs)
        .unwrap()
        .with_run_config(record.config.working_dir.as_deref(), &record.config.env);
    let disk_before = disk_usage(state);
    tokio::time::sleep(SETTLE).await;
    let available_before = meminfo_bytes("MemAvailable");
    let mut sandboxes = Vec::new();
    for i in 0..options.runners {
        let spec = SandboxSpec {
            name: format!("bench-{i}"),
            image: image.clone(),
            limits: Limits::default(),
        };
        let sandbox = runtime.create(spec).await.unwrap();
        let spec =
            ProcessSpec { command: "python3 -c \"print(1)\"".into(), ..ProcessSpec::default() };
        let exit = sandbox.spawn(spec).await.unwrap().wait().await.unwrap();
        assert_eq!(exit.code, Some(0), "python3 in a runner of the image");
        sandboxes.push(sandbox);
    }
    tokio::time::sleep(SETTLE).await;
    let available_after = meminfo_bytes("MemAvailable");
    let charged = cgroup_memory_bytes(&cgroup_name);
    let disk_after = disk_usage(state);
    for sandbox in &sandboxes {
        sandbox.destroy().await.unwrap();
    }
    (disk_before, disk_after, Memory { available_before, available_after, charged })
}

/// Writes an OCI layout: a python3 root plus host files up to `target` bytes, gzip layers.
fn write_layout(dir: &Path, target: u64) -> (u64, u64) {
    let layers = [python_layer(), bulk_layer(target)];
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8], media_type: &str| {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        fs::write(blobs.join(&digest[7..]), data).unwrap();
        json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    };
    let diff_ids: Vec<String> =
        layers.iter().map(|l| format!("sha256:{}", hex::encode(Sha256::digest(l)))).collect();
    let config = json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let config =
        put(&serde_json::to_vec(&config).unwrap(), "application/vnd.oci.image.config.v1+json");
    let mut compressed = 0;
    let descriptors: Vec<_> = layers
        .iter()
        .map(|layer| {
            let mut gzip =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gzip.write_all(layer).unwrap();
            let gzip = gzip.finish().unwrap();
            compressed += gzip.len() as u64;
            put(&gzip, "application/vnd.oci.image.layer.v1.tar+gzip")
        })
        .collect();
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descriptors});
    let manifest =
        put(&serde_json::to_vec(&manifest).unwrap(), "application/vnd.oci.image.manifest.v1+json");
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [manifest]})).unwrap(),
    )
    .unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    (layers.iter().map(|l| l.len() as u64).sum(), compressed)
}

fn python_layer() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        symlink(&mut builder, name, target);
    }
    let python = fs::canonicalize("/usr/bin/python3").unwrap();
    let python_name = python.file_name().unwrap().to_str().unwrap().to_owned();
    append_host_file(&mut builder, &python, &format!("usr/bin/{python_name}"));
    symlink(&mut builder, "usr/bin/python3", &python_name);
    append_host_file(&mut builder, Path::new("/bin/bash"), "usr/bin/bash");
    let ldd = Command::new("ldd").arg(&python).arg("/bin/bash").output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split("=>").last().unwrap().trim().split(' ').next().unwrap();
        if let Some(inside) = path.strip_prefix('/') {
            let inside = inside.strip_prefix("usr/").unwrap_or(inside);
            append_host_file(&mut builder, Path::new(path), &format!("usr/{inside}"));
        }
    }
    let stdlib = format!("/usr/lib/{python_name}");
    walk(Path::new(&stdlib), &mut |path| {
        let keep = path.extension().is_some_and(|e| e == "py")
            && !path.to_string_lossy().contains("/test");
        if keep {
            append_host_file(&mut builder, path, &path.to_string_lossy()[1..]);
        }
        true
    });
    builder.into_inner().unwrap()
}

fn bulk_layer(target: u64) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut bytes = 0;
    for source in BULK_SOURCES {
        walk(Path::new(source), &mut |path| {
            if bytes >= target {
                return false;
            }
            bytes += append_host_file(&mut builder, path, &path.to_string_lossy()[1..]);
            true
        });
    }
    builder.into_inner().unwrap()
}

/// Regular files below `dir`, depth first, until `visit` says stop.
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path) -> bool) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return true };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else { continue };
        let path = entry.path();
        let go_on = if kind.is_dir() {
            walk(&path, visit)
        } else if kind.is_file() {
            visit(&path)
        } else {
            true
        };
        if !go_on {
            return false;
        }
    }
    true
}

fn append_host_file(builder: &mut tar::Builder<Vec<u8>>, host: &Path, name: &str) -> u64 {
    let Ok(content) = fs::read(host) else { return 0 };
    let meta = fs::metadata(host).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(meta.mtime().max(0) as u64);
    if builder.append_data(&mut header, name, content.as_slice()).is_err() {
        return 0;
    }
    content.len() as u64
}

fn symlink(builder: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder.append_link(&mut header, name, target).unwrap();
}

/// Bytes allocated below `dir` (hard links counted once), like `du`.
fn disk_usage(dir: &Path) -> u64 {
    let output = Command::new("du").args(["-s", "-B1"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

fn meminfo_bytes(key: &str) -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kib * 1024
}

fn cgroup_memory_bytes(name: &str) -> u64 {
    let read = |path: String| fs::read_to_string(path).ok()?.trim().parse().ok();
    read(format!("/sys/fs/cgroup/memory/{name}/memory.usage_in_bytes"))
        .or_else(|| read(format!("/sys/fs/cgroup/{name}/memory.current")))
        .unwrap_or(0)
}
