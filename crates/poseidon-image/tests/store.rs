//! The store with images built here, byte by byte: layers with whiteouts and crafted names,
//! packed as OCI layouts (directory and tar) and as `docker save` archives.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use poseidon_image::{ImportError, Store, StoreConfig, StoreError, import};
use sha2::{Digest, Sha256};

const UID_BASE: u32 = 300_000;

/// One tar entry; names are written raw, so `../x` and `/x` reach the unpacker as they are.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Owned(&'a str, &'a [u8], u64, u32),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str),
}

fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (name, kind, data, link, uid, mode): (&str, _, &[u8], Option<&str>, u64, u32) =
            match entry {
                Entry::Dir(name) => (name, tar::EntryType::Directory, b"", None, 0, 0o755),
                Entry::File(name, data) => (name, tar::EntryType::Regular, data, None, 0, 0o644),
                Entry::Owned(name, data, uid, mode) => {
                    (name, tar::EntryType::Regular, data, None, *uid, *mode)
                }
                Entry::Symlink(name, target) => {
                    (name, tar::EntryType::Symlink, b"", Some(target), 0, 0o777)
                }
                Entry::HardLink(name, target) => {
                    (name, tar::EntryType::Link, b"", Some(target), 0, 0o644)
                }
                Entry::CharDevice(name) => (name, tar::EntryType::Char, b"", None, 0, 0o666),
            };
        let raw = &mut header.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            let raw = &mut header.as_old_mut().linkname;
            raw.fill(0);
            raw[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_mode(mode);
        header.set_mtime(1_600_000_000);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn config_json(layers: &[Vec<u8>], working_dir: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| digest(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "IMAGE_VAR=1"], "WorkingDir": working_dir, "User": "user"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// An OCI image layout directory with gzip layers; `name` goes into the ref.name annotation.
fn oci_layout(dir: &Path, name: &str, layers: &[Vec<u8>]) {
    oci_layout_with(dir, name, layers, gzip);
}

fn oci_layout_with(dir: &Path, name: &str, layers: &[Vec<u8>], compress: fn(&[u8]) -> Vec<u8>) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = digest(data);
        fs::write(blobs.join(d.strip_prefix("sha256:").unwrap()), data).unwrap();
        serde_json::json!({"digest": d, "size": data.len()})
    };
    let config = config_json(layers, "/srv/app");
    let mut config_desc = put(&config);
    config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            let mut d = put(&compress(l));
            d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
            d
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc, "layers": layer_descs
    }))
    .unwrap();
    let mut manifest_desc = put(&manifest);
    manifest_desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    manifest_desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A `docker save` archive in the classic format: `<id>/layer.tar`, `<hex>.json`, `manifest.json`.
fn docker_archive(path: &Path, tag: &str, layers: &[Vec<u8>]) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    let mut append = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    };
    let config = config_json(layers, "");
    let config_name = format!("{}.json", digest(&config).strip_prefix("sha256:").unwrap());
    append(&config_name, &config);
    let mut names = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        append(&name, layer);
        names.push(name);
    }
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}]);
    append("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    builder.finish().unwrap();
}

/// Packs a directory into a tar (an OCI layout as `skopeo copy oci-archive:` writes it).
fn tar_dir(dir: &Path, path: &Path) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
}

struct Fixture {
    temp: tempfile::TempDir,
    store: Store,
}

impl Fixture {
    fn new(max_image_bytes: u64) -> Fixture {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig {
            root: temp.path().join("store"),
            uid_base: UID_BASE,
            max_image_bytes,
        })
        .unwrap();
        Fixture { temp, store }
    }

    fn import_layers(&self, name: &str, layers: &[Vec<u8>]) -> Result<PathBuf, ImportError> {
        let dir = tempfile::tempdir_in(self.temp.path()).unwrap();
        oci_layout(dir.path(), name, layers);
        let records = import(&self.store, dir.path(), None)?;
        Ok(self.store.rootfs(&records[0]))
    }
}

#[test]
fn whiteouts_and_opaque_directories_apply_across_layers() {
    let fixture = Fixture::new(1 << 30);
    let lower = layer(&[
        Entry::Dir("a/"),
        Entry::File("a/gone", b"x"),
        Entry::File("a/stays", b"y"),
        Entry::Dir("b/"),
        Entry::File("b/hidden", b"z"),
        Entry::Dir("b/sub/"),
        Entry::File("b/sub/deep", b"z"),
        Entry::Dir("c/"),
        Entry::File("c/inner", b"z"),
        Entry::File("replaced", b"file"),
    ]);
    let upper = layer(&[
        Entry::File("a/.wh.gone", b""),
        Entry::Dir("b/"),
        Entry::File("b/new", b"n"),
        Entry::File("b/.wh..wh..opq", b""),
        Entry::File(".wh.c", b""),
        Entry::Dir("replaced/"),
        Entry::File("replaced/now-a-dir", b"d"),
    ]);
    let root = fixture.import_layers("example.org/test/whiteouts:1", &[lower, upper]).unwrap();
    assert!(!root.join("a/gone").exists(), "whiteout removes the lower file");
    assert_eq!(fs::read(root.join("a/stays")).unwrap(), b"y");
    assert!(
        !root.join("b/hidden").exists() && !root.join("b/sub").exists(),
        "opaque dir hides lower entries"
    );
    assert_eq!(
        fs::read(root.join("b/new")).unwrap(),
        b"n",
        "opaque dir keeps its own layer's entries"
    );
    assert!(!root.join("c").exists(), "whiteout removes a whole directory");
    assert!(root.join("replaced/now-a-dir").is_file());
    assert!(
        !root.join("a/.wh.gone").exists() && !root.join("b/.wh..wh..opq").exists(),
        "markers are not files"
    );
}

#[test]
fn ownership_modes_links_and_config_are_kept_and_devices_skipped() {
    let fixture = Fixture::new(1 << 30);
    let layer = layer(&[
        Entry::Owned("etc/owned-by-root", b"r", 0, 0o4755),
        Entry::Owned("home/user/mine", b"u", 1001, 0o600),
        Entry::Owned("odd", b"o", 4_000_000, 0o644),
        Entry::Symlink("bin", "usr/bin"),
        Entry::File("usr/bin/tool", b"t"),
        Entry::HardLink("usr/bin/tool2", "usr/bin/tool"),
        Entry::CharDevice("dev/null"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), "example.org/test/owners:1", &[layer]);
    let records = import(&fixture.store, dir.path(), None).unwrap();
    let record = &records[0];
    assert_eq!(record.reference, "example.org/test/owners:1");
    assert_eq!(record.config.working_dir.as_deref(), Some("/srv/app"));
    assert!(record.config.env.contains(&"IMAGE_VAR=1".to_owned()));
    let root = fixture.store.rootfs(record);
    let meta = fs::metadata(root.join("etc/owned-by-root")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (UID_BASE, UID_BASE));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o4755, "setuid survives the chown");
    let meta = fs::metadata(root.join("home/user/mine")).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (UID_BASE + 1001, 0o600));
    assert_eq!(
        fs::metadata(root.join("odd")).unwrap().uid(),
        UID_BASE + 65534,
        "unmapped ids become nobody"
    );
    assert_eq!(meta.mtime(), 1_600_000_000);
    assert_eq!(fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
    assert_eq!(fs::metadata(root.join("usr/bin/tool2")).unwrap().nlink(), 2);
    assert!(!root.join("dev/null").exists(), "devices are skipped");
    assert!(root.join("srv/app").is_dir(), "the working directory is created");
    let root_meta = fs::metadata(&root).unwrap();
    assert_eq!((root_meta.uid(), root_meta.permissions().mode() & 0o777), (UID_BASE, 0o755));
}

#[test]
fn crafted_layers_cannot_write_outside_the_root() {
    let fixture = Fixture::new(1 << 30);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, "untouched").unwrap();
    let o = outside.path().to_str().unwrap();
    let tricks: Vec<Vec<Vec<u8>>> = vec![
        vec![layer(&[Entry::File("../../../../../../../../escape-dotdot", b"x")])],
        vec![layer(&[Entry::File(&format!("{o}/escape-absolute"), b"x")])],
        vec![layer(&[Entry::Symlink("link", o), Entry::File("link/escape-symlink-dir", b"x")])],
        vec![layer(&[
            Entry::Symlink("up", "../../../../../../.."),
            Entry::File(&format!("up{o}/escape-relative-link"), b"x"),
        ])],
        vec![layer(&[
            Entry::Symlink("victim", &format!("{o}/victim")),
            Entry::File("victim", b"overwritten"),
        ])],
        vec![
            layer(&[Entry::Symlink("evil", o)]),
            layer(&[Entry::File("evil/escape-across-layers", b"x")]),
        ],
        vec![layer(&[Entry::HardLink("hard", &format!("../../../../../..{o}/victim"))])],
        vec![layer(&[Entry::Symlink("wh", o)]), layer(&[Entry::File("wh/.wh.victim", b"")])],
        vec![layer(&[Entry::Symlink("opq", o)]), layer(&[Entry::File("opq/.wh..wh..opq", b"")])],
    ];
    for (i, layers) in tricks.iter().enumerate() {
        // Refusing the layer is as good as placing the entry inside the root.
        let result = fixture.import_layers(&format!("example.org/test/trick:{i}"), layers);
        if let Ok(root) = &result {
            assert!(root.starts_with(fixture.store.root()));
        }
    }
    let outside_entries: Vec<_> =
        fs::read_dir(outside.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside_entries, vec![std::ffi::OsString::from("victim")], "nothing new outside");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
    assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1, "not hard-linked into an image");
    let temp_entries: Vec<_> =
        fs::read_dir(fixture.temp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(
        temp_entries.iter().all(|n| !n.to_string_lossy().starts_with("escape")),
        "{temp_entries:?}"
    );
    let root = fixture.import_layers("example.org/test/trick:again", &tricks[0]).unwrap();
    assert!(root.join("escape-dotdot").is_file(), "`..` stops at the image root");
}

#[test]
fn docker_archives_and_oci_layout_tars_import_and_share_one_rootfs() {
    let fixture = Fixture::new(1 << 30);
    let layers = vec![layer(&[Entry::File("hello", b"world")])];
    let archive = fixture.temp.path().join("saved.tar");
    docker_archive(&archive, "openhpi/co_execenv_python:3.8", &layers);
    let records = import(&fixture.store, &archive, None).unwrap();
    assert_eq!(records[0].reference, "docker.io/openhpi/co_execenv_python:3.8");
    let root = fixture.store.rootfs(&records[0]);
    assert_eq!(fs::read(root.join("hello")).unwrap(), b"world");
    fs::write(root.join("marker"), "planted after the first unpack").unwrap();

    // The same image again, as an OCI layout tar under another name: no second unpack.
    let layout = tempfile::tempdir().unwrap();
    oci_layout(layout.path(), "3.8", &layers);
    let oci_tar = fixture.temp.path().join("oci.tar");
    tar_dir(layout.path(), &oci_tar);
    assert!(
        matches!(import(&fixture.store, &oci_tar, None), Err(ImportError::Unnamed(_))),
        "a bare tag names nothing"
    );
    let again = import(&fixture.store, &oci_tar, Some("python:3.12")).unwrap();
    assert_eq!(again[0].reference, "docker.io/library/python:3.12");
    // The OCI layout's config differs (working dir), so it is another image...
    assert_ne!(again[0].id, records[0].id);
    // ... but the docker archive imported twice is unpacked once.
    let twice = import(&fixture.store, &archive, Some("python:copy")).unwrap();
    assert_eq!(twice[0].id, records[0].id);
    assert!(root.join("marker").exists(), "the existing root file system was reused");
    let listed: Vec<String> =
        fixture.store.list().unwrap().into_iter().map(|r| r.reference).collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
}

#[test]
fn removal_is_refused_while_used_and_collects_garbage() {
    let fixture = Fixture::new(1 << 30);
    let layers = vec![layer(&[Entry::File("f", b"data")])];
    let root = fixture.import_layers("example.org/test/rm:1", &layers).unwrap();
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), "example.org/test/rm:2", &layers);
    import(&fixture.store, dir.path(), None).unwrap();
    let refused = fixture.store.remove("example.org/test/rm:1", |_| vec!["7".to_owned()]);
    assert!(matches!(refused, Err(StoreError::InUse { .. })), "{refused:?}");
    fixture.store.remove("example.org/test/rm:1", |_| Vec::new()).unwrap();
    assert!(root.is_dir(), "still used by the second tag");
    fixture.store.remove("example.org/test/rm:2", |_| Vec::new()).unwrap();
    assert!(!root.exists());
    let blobs = fs::read_dir(fixture.store.root().join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 0, "unreferenced blobs are deleted");
    assert!(matches!(
        fixture.store.remove("example.org/test/rm:2", |_| Vec::new()),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn oversized_images_and_wrong_digests_leave_nothing_behind() {
    let fixture = Fixture::new(64 * 1024);
    let bomb = layer(&[Entry::File("big", &vec![0u8; 256 * 1024])]);
    let result = fixture.import_layers("example.org/test/bomb:1", &[bomb]);
    assert!(matches!(result, Err(ImportError::Store(StoreError::Unpack { .. }))), "{result:?}");
    assert_eq!(fs::read_dir(fixture.store.root().join("rootfs")).unwrap().count(), 0);

    let fixture = Fixture::new(1 << 30);
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), "example.org/test/tampered:1", &[layer(&[Entry::File("f", b"1")])]);
    let blobs = dir.path().join("blobs/sha256");
    let tampered = fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]));
    fs::write(tampered.unwrap(), gzip(&layer(&[Entry::File("f", b"2")]))).unwrap();
    let result = import(&fixture.store, dir.path(), None);
    assert!(matches!(result, Err(ImportError::Store(StoreError::Digest { .. }))), "{result:?}");
    assert!(fixture.store.list().unwrap().is_empty());
}

#[test]
fn concurrent_imports_of_one_image_unpack_it_once() {
    let fixture = Fixture::new(1 << 30);
    let layers =
        vec![layer(&[Entry::File("big", &vec![7u8; 4 << 20]), Entry::File("small", b"s")])];
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), "example.org/test/concurrent:1", &layers);
    let records: Vec<_> = std::thread::scope(|scope| {
        let imports: Vec<_> = (0..4)
            .map(|i| {
                let (store, path) = (&fixture.store, dir.path());
                scope.spawn(move || import(store, path, Some(&format!("example.org/test/c:{i}"))))
            })
            .collect();
        imports.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
    });
    assert!(records.iter().all(|r| r[0].id == records[0][0].id));
    assert_eq!(fs::read_dir(fixture.store.root().join("rootfs")).unwrap().count(), 1);
    assert_eq!(
        fs::read_dir(fixture.store.root().join("tmp")).unwrap().count(),
        0,
        "no staging left"
    );
    assert_eq!(fixture.store.list().unwrap().len(), 4);
}

#[test]
fn zstd_and_uncompressed_layers_are_recognised_by_their_content() {
    let fixture = Fixture::new(1 << 30);
    let zstd = |data: &[u8]| {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    };
    let dir = tempfile::tempdir().unwrap();
    oci_layout_with(
        dir.path(),
        "example.org/test/zstd:1",
        &[layer(&[Entry::File("z", b"zstd")])],
        zstd,
    );
    let records = import(&fixture.store, dir.path(), None).unwrap();
    assert_eq!(fs::read(fixture.store.rootfs(&records[0]).join("z")).unwrap(), b"zstd");
    let dir = tempfile::tempdir().unwrap();
    oci_layout_with(
        dir.path(),
        "example.org/test/plain:1",
        &[layer(&[Entry::File("p", b"plain")])],
        <[u8]>::to_vec,
    );
    let records = import(&fixture.store, dir.path(), None).unwrap();
    assert_eq!(fs::read(fixture.store.rootfs(&records[0]).join("p")).unwrap(), b"plain");
}
