//! OCI images end to end: an image built here from the host's python3 (two layers, one with a
//! whiteout), converted and pushed by `skopeo`, pulled from a real registry on loopback
//! (Debian's `docker-registry`) or imported from a `docker save` / OCI archive, then run in
//! runners of the real server. `poseidon image ls|rm` work on the server's store.

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{INACTIVITY_TIMEOUT, ServerOptions, TestServer, nomad_backend, with_server};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
const REGISTRY_READY: Duration = Duration::from_secs(10);
const WORKING_DIR: &str = "/srv/app";
const PASSWORD: &str = "s3cret";
/// bcrypt of [`PASSWORD`] with the lowest cost (the registry accepts only bcrypt and checks it
/// on every request).
const PASSWORD_BCRYPT: &str = "$2b$04$k6mZuUbETPKWsdEQh2l/Eexs0spag/QSnedmZVPrd1X.7hMM3H8qO";

/// Fails with the Debian package to install instead of a confusing error later.
/// The image store belongs to the local backend; with Nomad, the cluster pulls images.
fn skipped() -> bool {
    if nomad_backend() {
        eprintln!("skipped: only for the local backend");
    }
    nomad_backend()
}

fn require(program: &str, package: &str) {
    let found = Path::new(program).is_file()
        || Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is missing: install the Debian package `{package}` (apt-get install {package})"
    );
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn skopeo(args: &[&str]) {
    run(Command::new("skopeo").arg("--insecure-policy").args(args));
}

fn poseidon_image(server: &TestServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .arg("image")
        .args(args)
        .arg("--config")
        .arg(server.config_path())
        .output()
        .expect("run poseidon image")
}

/// A layer as tar entries (name, content or symlink target, mode, uid).
#[derive(Default)]
struct Layer {
    builder: Option<tar::Builder<Vec<u8>>>,
}

impl Layer {
    fn new() -> Self {
        Layer { builder: Some(tar::Builder::new(Vec::new())) }
    }

    fn file(&mut self, name: &str, content: &[u8], mode: u32, uid: u64) -> &mut Self {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_mtime(1_700_000_000);
        self.builder.as_mut().unwrap().append_data(&mut header, name, content).unwrap();
        self
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        self.builder.as_mut().unwrap().append_link(&mut header, name, target).unwrap();
        self
    }

    fn host_file(&mut self, host: &Path, name: &str) -> &mut Self {
        let content = fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        let mode = fs::metadata(host).unwrap().mode() & 0o7777;
        self.file(name, &content, mode, 0)
    }

    fn finish(&mut self) -> Vec<u8> {
        self.builder.take().unwrap().into_inner().unwrap()
    }
}

/// bash and python3 of this host with their libraries (merged /usr) and a `user` account.
fn python_layer() -> Vec<u8> {
    let mut layer = Layer::new();
    layer.symlink("bin", "usr/bin").symlink("lib", "usr/lib").symlink("lib64", "usr/lib64");
    let python = fs::canonicalize("/usr/bin/python3").expect("python3 on the host");
    let python_name = python.file_name().unwrap().to_str().unwrap().to_owned();
    layer.host_file(&python, &format!("usr/bin/{python_name}"));
    layer.symlink("usr/bin/python3", &python_name);
    layer.host_file(Path::new("/bin/bash"), "usr/bin/bash");
    for library in shared_libraries(&[&python, Path::new("/bin/bash")]) {
        let inside = library.strip_prefix("/").unwrap().to_str().unwrap().to_owned();
        let inside =
            inside.strip_prefix("usr/").map_or_else(|| format!("usr/{inside}"), str::to_owned);
        layer.host_file(&library, &inside);
    }
    let stdlib = PathBuf::from(format!("/usr/lib/{python_name}"));
    add_tree(&mut layer, &stdlib, &format!("usr/lib/{python_name}"), 0);
    layer.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/bash\nuser:x:1001:1001::/workspace:/bin/bash\n",
        0o644,
        0,
    );
    layer.file("etc/group", b"root:x:0:\nuser:x:1001:\n", 0o644, 0);
    layer.file("etc/lower-only", b"removed by the upper layer", 0o644, 0);
    layer.finish()
}

/// The modules `python3 -c` needs: the top-level stdlib and a few packages, no caches.
fn add_tree(layer: &mut Layer, host: &Path, inside: &str, depth: usize) {
    const PACKAGES: [&str; 4] = ["encodings", "collections", "importlib", "re"];
    for entry in fs::read_dir(host).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let path = entry.path();
        if path.is_dir() {
            if depth == 0 && PACKAGES.contains(&name.as_str()) || depth > 0 && name != "__pycache__"
            {
                add_tree(layer, &path, &format!("{inside}/{name}"), depth + 1);
            }
        } else if name.ends_with(".py") && path.is_file() {
            layer.host_file(&path, &format!("{inside}/{name}"));
        }
    }
}

fn shared_libraries(programs: &[&Path]) -> Vec<PathBuf> {
    let mut libraries: Vec<PathBuf> = Vec::new();
    for program in programs {
        let output = run(Command::new("ldd").arg(program));
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let path = line.split("=>").last().unwrap().trim().split(' ').next().unwrap();
            if path.starts_with('/') && !libraries.iter().any(|l| l == Path::new(path)) {
                libraries.push(PathBuf::from(path));
            }
        }
    }
    libraries
}

/// The upper layer: a whiteout of a lower file and a file owned by `user`.
fn upper_layer() -> Vec<u8> {
    let mut layer = Layer::new();
    layer.file("etc/.wh.lower-only", b"", 0o644, 0);
    layer.file(&format!("{}/owned-by-user", &WORKING_DIR[1..]), b"mine", 0o600, 1001);
    layer.finish()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes an OCI image layout (gzip layers, tag `latest`) with a WorkingDir and an Env.
fn write_oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8], media_type: &str| {
        let digest = sha256(data);
        fs::write(blobs.join(&digest[7..]), data).unwrap();
        json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    };
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "IMAGE_GREETING=hello from the image"], "WorkingDir": WORKING_DIR},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(l)).collect::<Vec<_>>()},
    });
    let config =
        put(&serde_json::to_vec(&config).unwrap(), "application/vnd.oci.image.config.v1+json");
    let layers: Vec<Value> = layers
        .iter()
        .map(|layer| {
            let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gzip.write_all(layer).unwrap();
            put(&gzip.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": layers,
    });
    let mut manifest =
        put(&serde_json::to_vec(&manifest).unwrap(), "application/vnd.oci.image.manifest.v1+json");
    manifest["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
    let index = json!({"schemaVersion": 2, "manifests": [manifest]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A `docker-registry` on a free loopback port with its storage in a temporary directory;
/// killed and removed on drop.
struct Registry {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with("")
    }

    /// A registry that wants basic auth: user `poseidon`, password [`PASSWORD`].
    fn start_with_auth() -> Registry {
        Registry::start_with("auth:\n  htpasswd:\n    realm: e2e\n    path: {dir}/htpasswd\n")
    }

    /// `extra` is added to the configuration; `{dir}` in it is the registry's directory.
    fn start_with(extra: &str) -> Registry {
        require(REGISTRY_BINARY, "docker-registry");
        let dir = tempfile::Builder::new().prefix("poseidon-registry-").tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        fs::write(dir.path().join("htpasswd"), format!("poseidon:{PASSWORD_BCRYPT}\n")).unwrap();
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n{}",
                dir.path().join("data").display(),
                extra.replace("{dir}", &dir.path().display().to_string()),
            ),
        )
        .unwrap();
        let child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, address, _dir: dir };
        registry.wait_until_ready();
        registry
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + REGISTRY_READY;
        while std::net::TcpStream::connect(&self.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {} in time",
                self.address
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn environment(id: u32, image: &str, pool: u64) -> Value {
    json!({
        "id": id, "image": image, "prewarmingPoolSize": pool, "cpuLimit": 20, "memoryLimit": 256,
        "networkAccess": false, "exposedPorts": [],
    })
}

/// What the image's configuration and layers look like from inside a runner (a script, as
/// commands may not contain `'`).
const INSPECT: &str = "import os
st = os.stat('owned-by-user')
print(os.getcwd(), os.environ['IMAGE_GREETING'], os.getuid(), st.st_uid,
      os.stat('/etc/passwd').st_uid, os.path.exists('/etc/lower-only'), sep='|')
";

async fn assert_runs_python(server: &TestServer, env: u32) {
    server.wait_idle(env, 1).await;
    let runner = server.claim(env, INACTIVITY_TIMEOUT).await;
    let transcript = server.run(&runner, "python3 -c \"print(1)\"").await;
    transcript.assert_exit(0);
    assert_eq!(transcript.stdout.trim(), "1", "stderr: {}", transcript.stderr);
    server.copy(&runner, &[("inspect.py", INSPECT.as_bytes())]).await;
    let transcript = server.run(&runner, "python3 inspect.py").await;
    transcript.assert_exit(0);
    assert_eq!(
        transcript.stdout.trim(),
        format!("{WORKING_DIR}|hello from the image|1001|1001|0|False"),
        "working dir, Env, user, ownership, whiteout; stderr: {}",
        transcript.stderr
    );
}

fn rootfs_dirs(server: &TestServer) -> Vec<(PathBuf, u64)> {
    let store = server.config_path().parent().unwrap().join("state/local/store/rootfs");
    fs::read_dir(store)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let inode = fs::metadata(&path).unwrap().ino();
            (path, inode)
        })
        .collect()
}

#[test]
fn an_image_pulled_from_a_registry_runs_python_and_is_unpacked_once() {
    if skipped() {
        return;
    }
    require("skopeo", "skopeo");
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    write_oci_layout(layout.path(), &[python_layer(), upper_layer()]);
    let image = format!("{}/e2e/python:3.11", registry.address);
    let source = format!("oci:{}:latest", layout.path().display());
    skopeo(&["copy", "--dest-tls-verify=false", &source, &format!("docker://{image}")]);

    let options = ServerOptions {
        local_yaml: format!("  registries:\n    {:?}:\n      plainhttp: true\n", registry.address),
        ..ServerOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(with_server(options, async |server| {
        server
            .put_env(1, &environment(1, &image, 1))
            .await
            .expect_empty(201, "PUT pulls the image");
        assert_runs_python(server, 1).await;
        let unpacked = rootfs_dirs(server);
        assert_eq!(unpacked.len(), 1);

        server.put_env(2, &environment(2, &image, 1)).await.expect_empty(201, "PUT, image stored");
        assert_runs_python(server, 2).await;
        assert_eq!(rootfs_dirs(server), unpacked, "the second environment unpacked nothing");

        let refused = poseidon_image(server, &["rm", &image]);
        assert!(!refused.status.success(), "rm of a used image must fail");
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(message.contains("used by execution environment"), "{message}");
        let listed = String::from_utf8_lossy(&poseidon_image(server, &["ls"]).stdout).into_owned();
        assert!(listed.contains(&image) && listed.contains("1,2"), "{listed}");

        let missing = format!("{}/e2e/absent:1", registry.address);
        let reply = server
            .put_env(3, &environment(3, &missing, 1))
            .await
            .expect_message(500, "PUT of an image nobody has");
        assert!(reply["message"].as_str().unwrap().contains("absent"), "{reply}");

        server.delete("/execution-environments/1").await.expect_empty(204, "DELETE 1");
        server.delete("/execution-environments/2").await.expect_empty(204, "DELETE 2");
        let removed = poseidon_image(server, &["rm", &image]);
        assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
        assert!(rootfs_dirs(server).is_empty(), "the root file system is collected");

        let pulled = poseidon_image(server, &["pull", &image]);
        let progress = String::from_utf8_lossy(&pulled.stderr);
        assert!(pulled.status.success(), "{progress}");
        assert!(progress.contains("2 layers") && progress.contains("layer 2/2"), "{progress}");
        assert!(String::from_utf8_lossy(&pulled.stdout).contains(&format!("pulled {image}")));
        assert_eq!(rootfs_dirs(server).len(), 1, "pulled from the command line");
    }));
}

#[test]
fn docker_save_and_oci_archives_import_and_run() {
    if skipped() {
        return;
    }
    require("skopeo", "skopeo");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    fs::create_dir(&layout).unwrap();
    write_oci_layout(&layout, &[python_layer(), upper_layer()]);
    let source = format!("oci:{}:latest", layout.display());
    let docker_archive = work.path().join("saved.tar");
    let docker_name = "openhpi/co_execenv_python:3.8";
    skopeo(&[
        "copy",
        &source,
        &format!("docker-archive:{}:{docker_name}", docker_archive.display()),
    ]);
    let oci_archive = work.path().join("oci.tar");
    skopeo(&["copy", &source, &format!("oci-archive:{}:latest", oci_archive.display())]);

    let options = ServerOptions {
        env: vec![("POSEIDON_LOCAL_IMAGEPULLPOLICY", "never")],
        ..ServerOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(with_server(options, async |server| {
        let reply = server
            .put_env(1, &environment(1, docker_name, 1))
            .await
            .expect_message(500, "PUT before the import");
        assert!(reply["message"].as_str().unwrap().contains("never"), "{reply}");

        let imported = poseidon_image(server, &["import", docker_archive.to_str().unwrap()]);
        assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
        assert!(
            String::from_utf8_lossy(&imported.stdout)
                .contains("docker.io/openhpi/co_execenv_python:3.8")
        );
        server
            .put_env(1, &environment(1, docker_name, 1))
            .await
            .expect_empty(201, "PUT after the import");
        assert_runs_python(server, 1).await;

        // From stdin, as in `docker save IMAGE | poseidon image import -`.
        let imported = Command::new(env!("CARGO_BIN_EXE_poseidon"))
            .args(["image", "import", "-", "--tag", "python:3.11", "--config"])
            .arg(server.config_path())
            .stdin(fs::File::open(&oci_archive).unwrap())
            .output()
            .unwrap();
        assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
        server
            .put_env(2, &environment(2, "python:3.11", 1))
            .await
            .expect_empty(201, "PUT, OCI archive");
        assert_runs_python(server, 2).await;
    }));
}

#[test]
fn pulls_authenticate_with_the_configured_credentials() {
    if skipped() {
        return;
    }
    require("skopeo", "skopeo");
    let registry = Registry::start_with_auth();
    let layout = tempfile::tempdir().unwrap();
    // Credentials are what this test is about: one small layer is enough.
    write_oci_layout(layout.path(), &[upper_layer()]);
    let image = format!("{}/private/python:1", registry.address);
    let source = format!("oci:{}:latest", layout.path().display());
    let credentials = format!("--dest-creds=poseidon:{PASSWORD}");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &credentials,
        &source,
        &format!("docker://{image}"),
    ]);

    let home = tempfile::tempdir().unwrap();
    let pull = |password: &str| {
        let config = home.path().join("config.yaml");
        let yaml = format!(
            "statedir: {:?}\nlocal:\n  registries:\n    {:?}:\n      plainhttp: true\n      username: poseidon\n      password: {password:?}\n",
            home.path().join("state"),
            registry.address
        );
        fs::write(&config, yaml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_poseidon"))
            .args(["image", "pull", &image, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let refused = pull("wrong");
    assert!(!refused.status.success(), "a wrong password must not pull");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("cannot pull") && message.contains("private/python"), "{message}");
    let pulled = pull(PASSWORD);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let listed = Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .args(["image", "ls", "--config"])
        .arg(home.path().join("config.yaml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&image));
}

#[test]
fn pull_policy_always_pulls_again_and_falls_back_to_the_stored_image() {
    if skipped() {
        return;
    }
    require("skopeo", "skopeo");
    let mut registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    write_oci_layout(layout.path(), &[upper_layer()]);
    let image = format!("{}/e2e/always:1", registry.address);
    let source = format!("oci:{}:latest", layout.path().display());
    skopeo(&["copy", "--dest-tls-verify=false", &source, &format!("docker://{image}")]);
    let options = ServerOptions {
        env: vec![("POSEIDON_LOCAL_IMAGEPULLPOLICY", "always")],
        local_yaml: format!("  registries:\n    {:?}:\n      plainhttp: true\n", registry.address),
        ..ServerOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(with_server(options, async |server| {
        server.put_env(1, &environment(1, &image, 0)).await.expect_empty(201, "PUT pulls");
        let _ = registry.child.kill();
        let _ = registry.child.wait();
        server.put_env(2, &environment(2, &image, 0)).await.expect_empty(201, "PUT, registry gone");
        let other = image.replace("always:1", "never-pushed:1");
        let reply = server.put_env(3, &environment(3, &other, 0)).await.expect_message(500, "PUT");
        assert!(reply["message"].as_str().unwrap().contains("cannot pull"), "{reply}");
    }));
}
