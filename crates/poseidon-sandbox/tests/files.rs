//! File operations on a runner root, against a temporary directory standing in for the runner's
//! `/` (fixtures chowned to the host ids of the sandbox's users) and against a real runner.
//! Runs as root.

mod common;

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use poseidon_sandbox::files::{CopyItem, Entry, FilesError, IdMap, Root};
use tempfile::TempDir;

const IDS: IdMap =
    IdMap { root_uid: 100_000, root_gid: 100_000, user_uid: 101_001, user_gid: 101_001 };

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
    user:x:1001:1001::/home/user:/bin/bash\n\
    nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nuser:x:1001:\nnogroup:x:65534:\n";
const SENTINEL: &str = "host secret, must stay untouched";

/// A temp dir holding `root/` (the runner's `/`, with `workspace/` and `etc/`) and, outside
/// of it, `outside/sentinel.txt`.
struct Runner {
    base: TempDir,
    root: Root,
}

impl Runner {
    fn new() -> Runner {
        let base = tempfile::tempdir().unwrap();
        let root_dir = base.path().join("root");
        for dir in ["", "workspace", "etc"] {
            let path = root_dir.join(dir);
            fs::create_dir_all(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            chown(&path, Some(IDS.root_uid), Some(IDS.root_gid)).unwrap();
        }
        fs::set_permissions(root_dir.join("workspace"), fs::Permissions::from_mode(0o777)).unwrap();
        for (name, content) in [("passwd", PASSWD), ("group", GROUP)] {
            let path = root_dir.join("etc").join(name);
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            chown(&path, Some(IDS.root_uid), Some(IDS.root_gid)).unwrap();
        }
        fs::create_dir(base.path().join("outside")).unwrap();
        fs::write(base.path().join("outside/sentinel.txt"), SENTINEL).unwrap();
        let fd: OwnedFd =
            open(&root_dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .unwrap();
        Runner { root: Root::new(fd, IDS, "/workspace"), base }
    }

    /// A host path inside the runner root.
    fn path(&self, runner_path: &str) -> PathBuf {
        self.base.path().join("root").join(runner_path.trim_start_matches('/'))
    }

    fn workspace(&self, relative: &str) -> PathBuf {
        self.path("workspace").join(relative)
    }

    fn outside(&self) -> PathBuf {
        self.base.path().join("outside")
    }

    fn assert_outside_untouched(&self) {
        let entries: Vec<_> =
            fs::read_dir(self.outside()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(entries, ["sentinel.txt"], "nothing may appear outside the root");
        let sentinel = self.outside().join("sentinel.txt");
        assert_eq!(fs::read_to_string(&sentinel).unwrap(), SENTINEL);
        assert_eq!(fs::metadata(&sentinel).unwrap().uid(), 0);
        let base_entries: Vec<_> = fs::read_dir(self.base.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(base_entries.len(), 2, "only root/ and outside/: {base_entries:?}");
    }

    fn copy(&self, items: &[(&str, &[u8])]) -> Result<(), FilesError> {
        self.root.update(&[], &copy_items(items))
    }

    fn delete(&self, paths: &[&str]) {
        let paths: Vec<String> = paths.iter().map(|path| (*path).to_owned()).collect();
        self.root.update(&paths, &[]).unwrap();
    }

    fn names(&self, path: &str, recursive: bool) -> Vec<String> {
        entry_names(&self.root.list(path, recursive, false).unwrap())
    }

    fn download(&self, path: &str, privileged: bool) -> Result<Vec<u8>, FilesError> {
        let (size, mut reader) = self.root.open(path, privileged)?;
        let mut content = Vec::new();
        reader.read_to_end(&mut content).unwrap();
        assert_eq!(content.len() as u64, size, "the announced size must hold");
        Ok(content)
    }
}

fn copy_items(items: &[(&str, &[u8])]) -> Vec<CopyItem> {
    items
        .iter()
        .map(|(path, content)| CopyItem {
            path: (*path).to_owned(),
            content: Bytes::copy_from_slice(content),
        })
        .collect()
}

fn entry_names(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|entry| entry.name.clone()).collect()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn owner(path: &Path) -> (u32, u32) {
    let metadata = fs::symlink_metadata(path).unwrap();
    (metadata.uid(), metadata.gid())
}

fn is_not_found<T>(result: Result<T, FilesError>) -> bool {
    matches!(result, Err(FilesError::NotFound))
}

#[test]
fn root_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Root>();
}

#[test]
fn copy_list_and_download_round_trip_empty_and_binary_files() {
    let runner = Runner::new();
    let binary: Vec<u8> = (0..=255).chain([0, 0, 255, 10, 13]).collect();
    runner
        .copy(&[
            ("src/", b""),
            ("empty.txt", b""),
            ("src/main.bin", &binary),
            ("text.txt", b"hello\n"),
        ])
        .unwrap();

    assert_eq!(runner.download("empty.txt", false).unwrap(), b"");
    assert_eq!(runner.download("src/main.bin", false).unwrap(), binary);
    assert_eq!(runner.download("/workspace/text.txt", false).unwrap(), b"hello\n");
    assert_eq!(fs::read(runner.workspace("src/main.bin")).unwrap(), binary);

    let entries = runner.root.list("./", true, false).unwrap();
    assert_eq!(entry_names(&entries), ["./empty.txt", "./src", "./text.txt", "./src/main.bin"]);
    let empty = &entries[0];
    assert_eq!(
        *empty,
        Entry {
            name: "./empty.txt".to_owned(),
            entry_type: '-',
            link_target: None,
            size: 0,
            modification_time: 0,
            permissions: "rwxr--r--".to_owned(),
            owner: "root".to_owned(),
            group: "root".to_owned(),
        }
    );
    assert_eq!(entries[1].entry_type, 'd');
    assert_eq!(entries[1].permissions, "rwxrwxrwt");
    assert_eq!(entries[3].size, binary.len() as u64);
}

#[test]
fn uploads_are_root_owned_files_0744_and_sticky_directories_01777() {
    let runner = Runner::new();
    runner
        .copy(&[("protected/", b""), ("protected/test.txt", b"x"), ("deep/er/file", b"y")])
        .unwrap();

    let root_ids = (IDS.root_uid, IDS.root_gid);
    assert_eq!(mode(&runner.workspace("protected")), 0o1777);
    assert_eq!(owner(&runner.workspace("protected")), root_ids);
    assert_eq!(mode(&runner.workspace("protected/test.txt")), 0o744);
    assert_eq!(owner(&runner.workspace("protected/test.txt")), root_ids);
    // Missing parents are created like tar creates them: root-owned 0755.
    for parent in ["deep", "deep/er"] {
        assert_eq!(mode(&runner.workspace(parent)), 0o755, "{parent}");
        assert_eq!(owner(&runner.workspace(parent)), root_ids, "{parent}");
    }
    assert_eq!(mode(&runner.workspace("deep/er/file")), 0o744);
}

#[test]
fn directory_entries_make_parents_and_fix_attributes_of_existing_directories() {
    let runner = Runner::new();
    fs::create_dir(runner.workspace("existing")).unwrap();
    runner.copy(&[("existing/", b""), ("a/b/c/", b"")]).unwrap();

    assert_eq!(mode(&runner.workspace("existing")), 0o1777);
    assert_eq!(owner(&runner.workspace("existing")), (IDS.root_uid, IDS.root_gid));
    assert_eq!(mode(&runner.workspace("a/b")), 0o755);
    assert_eq!(mode(&runner.workspace("a/b/c")), 0o1777);
}

#[test]
fn uploading_replaces_existing_files() {
    let runner = Runner::new();
    runner.copy(&[("file.txt", b"a much longer first version")]).unwrap();
    runner.copy(&[("file.txt", b"short")]).unwrap();
    assert_eq!(fs::read(runner.workspace("file.txt")).unwrap(), b"short");
}

#[test]
fn workspace_glob_deletes_visible_entries_and_keeps_dotfiles() {
    let runner = Runner::new();
    runner
        .copy(&[("dir/sub/", b""), ("dir/sub/f", b"1"), ("top.txt", b"2"), (".hidden", b"3")])
        .unwrap();
    fs::create_dir(runner.workspace(".config")).unwrap();

    runner.delete(&["./*"]);

    let mut left: Vec<_> = fs::read_dir(runner.workspace(""))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [".config", ".hidden"]);
}

#[test]
fn deletions_run_before_copies_and_ignore_missing_paths() {
    let runner = Runner::new();
    runner.copy(&[("old/", b""), ("old/x", b"1"), ("keep", b"2")]).unwrap();

    let delete = vec!["old".to_owned(), "missing/file".to_owned(), "/workspace/keep".to_owned()];
    runner.root.update(&delete, &copy_items(&[("old/new.txt", b"3")])).unwrap();

    assert!(!runner.workspace("keep").exists());
    assert!(!runner.workspace("old/x").exists());
    assert_eq!(fs::read(runner.workspace("old/new.txt")).unwrap(), b"3");
}

#[test]
fn deleting_dot_dot_or_slash_is_refused_like_rm() {
    let runner = Runner::new();
    runner.copy(&[("file", b"1")]).unwrap();
    runner.delete(&[".", "..", "/", "../..", "./", "a/.."]);
    assert!(runner.workspace("file").exists());
    assert!(runner.path("etc/passwd").exists());
}

#[test]
fn recursive_listing_follows_ls_order_and_skips_hidden_entries() {
    let runner = Runner::new();
    runner
        .copy(&[
            ("b/", b""),
            ("a/", b""),
            ("a/z.txt", b""),
            ("a/inner/", b""),
            ("a/inner/deep.txt", b""),
            ("b/y.txt", b""),
            ("c.txt", b""),
            ("B.txt", b""),
            (".hidden/", b""),
            (".hidden/secret", b""),
            ("a/.dot", b""),
        ])
        .unwrap();

    assert_eq!(
        runner.names("./", true),
        [
            "./B.txt",
            "./a",
            "./b",
            "./c.txt",
            "./a/inner",
            "./a/z.txt",
            "./a/inner/deep.txt",
            "./b/y.txt",
        ]
    );
    assert_eq!(runner.names(".", true)[0], "./B.txt");
    assert_eq!(runner.names("/workspace", true)[..2], ["/workspace/B.txt", "/workspace/a"]);
    assert_eq!(runner.names("a", true), ["a/inner", "a/z.txt", "a/inner/deep.txt"]);
    assert_eq!(runner.names("a/", true), ["a/inner", "a/z.txt", "a/inner/deep.txt"]);
}

#[test]
fn non_recursive_listing_gives_bare_names() {
    let runner = Runner::new();
    runner.copy(&[("dir/", b""), ("dir/inner", b""), ("file", b"")]).unwrap();
    assert_eq!(runner.names("./", false), ["dir", "file"]);
    assert_eq!(runner.names("dir", false), ["inner"]);
    assert_eq!(runner.names("/workspace/dir/", false), ["inner"]);
}

#[test]
fn listing_a_file_gives_one_entry_named_as_passed() {
    let runner = Runner::new();
    runner.copy(&[("dir/", b""), ("dir/file.txt", b"12345")]).unwrap();
    for path in ["dir/file.txt", "./dir/file.txt", "/workspace/dir/file.txt"] {
        for recursive in [false, true] {
            let entries = runner.root.list(path, recursive, false).unwrap();
            assert_eq!(entry_names(&entries), [path]);
            assert_eq!(entries[0].size, 5);
        }
    }
}

#[test]
fn listing_a_symlink_lists_the_link_with_its_target() {
    let runner = Runner::new();
    runner.copy(&[("dir/", b""), ("dir/inner", b"")]).unwrap();
    symlink("/workspace/dir", runner.workspace("link")).unwrap();
    symlink("/nowhere", runner.workspace("dangling")).unwrap();

    let entries = runner.root.list("link", true, false).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "link");
    assert_eq!(entries[0].entry_type, 'l');
    assert_eq!(entries[0].link_target.as_deref(), Some("/workspace/dir"));
    assert_eq!(entries[0].permissions, "rwxrwxrwx");

    // With a trailing slash `ls` lists the target directory.
    assert_eq!(runner.names("link/", false), ["inner"]);

    // Links inside a listed directory are listed, never followed.
    let entries = runner.root.list("./", true, false).unwrap();
    assert_eq!(entry_names(&entries), ["./dangling", "./dir", "./link", "./dir/inner"]);
    assert_eq!(entries[0].link_target.as_deref(), Some("/nowhere"));
    assert_eq!(entries[1].link_target, None);
}

#[test]
fn empty_workspace_lists_no_entries() {
    let runner = Runner::new();
    assert!(runner.root.list("./", true, false).unwrap().is_empty());
    assert!(runner.root.list("./", false, true).unwrap().is_empty());
}

#[test]
fn owners_and_groups_are_named_from_the_runner_tables() {
    let runner = Runner::new();
    for (name, uid) in
        [("by-user", IDS.user_uid), ("by-42", IDS.root_uid + 42), ("by-host-root", 0)]
    {
        let path = runner.workspace(name);
        fs::write(&path, "").unwrap();
        chown(&path, Some(uid), Some(uid)).unwrap();
    }
    let entries = runner.root.list("./", false, false).unwrap();
    let owners: Vec<_> = entries
        .iter()
        .map(|entry| (entry.name.as_str(), entry.owner.as_str(), entry.group.as_str()))
        .collect();
    assert_eq!(
        owners,
        [("by-42", "42", "42"), ("by-host-root", "nobody", "nogroup"), ("by-user", "user", "user"),]
    );
}

#[test]
fn missing_paths_are_not_found() {
    let runner = Runner::new();
    runner.copy(&[("file", b"x")]).unwrap();
    for privileged in [false, true] {
        assert!(is_not_found(runner.root.list("missing", true, privileged)));
        assert!(is_not_found(runner.root.list("missing/", false, privileged)));
        assert!(is_not_found(runner.root.list("file/", false, privileged)));
        assert!(is_not_found(runner.root.list("", false, privileged)));
        assert!(is_not_found(runner.root.open("missing", privileged)));
        assert!(is_not_found(runner.root.open("/workspace/file/x", privileged)));
        assert!(is_not_found(runner.root.open("", privileged)));
    }
}

#[test]
fn downloading_a_directory_is_not_a_file() {
    let runner = Runner::new();
    assert!(matches!(runner.root.open("/workspace", true), Err(FilesError::NotAFile(_))));
    assert!(matches!(runner.root.open(".", false), Err(FilesError::NotAFile(_))));
}

#[test]
fn fifo_download_is_not_a_file_and_does_not_block() {
    let runner = Runner::new();
    mkfifo(&runner.workspace("pipe"), Mode::from_bits_truncate(0o666)).unwrap();
    let (done, finished) = mpsc::channel();
    let root = std::sync::Arc::new(runner);
    let worker = std::sync::Arc::clone(&root);
    std::thread::spawn(move || {
        let unprivileged = matches!(worker.root.open("pipe", false), Err(FilesError::NotAFile(_)));
        let privileged = matches!(worker.root.open("pipe", true), Err(FilesError::NotAFile(_)));
        done.send((unprivileged, privileged)).unwrap();
    });
    let outcome = finished.recv_timeout(Duration::from_secs(5)).expect("the download blocked");
    assert_eq!(outcome, (true, true));
}

#[test]
fn fifo_at_a_copy_target_is_replaced() {
    let runner = Runner::new();
    mkfifo(&runner.workspace("pipe"), Mode::from_bits_truncate(0o666)).unwrap();
    runner.copy(&[("pipe", b"content")]).unwrap();
    let metadata = fs::symlink_metadata(runner.workspace("pipe")).unwrap();
    assert!(metadata.file_type().is_file());
    assert_eq!(fs::read(runner.workspace("pipe")).unwrap(), b"content");
}

#[test]
fn failed_copy_entries_are_reported_like_tar_and_the_others_are_written() {
    let runner = Runner::new();
    runner.copy(&[("dir/", b""), ("dir/inner", b""), ("plain", b"")]).unwrap();

    let error = runner
        .copy(&[("dir", b"x"), ("good.txt", b"ok"), ("plain/sub.txt", b"x"), ("after.txt", b"ok")])
        .unwrap_err();

    let FilesError::CopyFailed(message) = error else {
        panic!("expected CopyFailed, got {error:?}");
    };
    assert_eq!(
        message,
        "tar: dir: Cannot open: Is a directory\ntar: plain/sub.txt: Cannot open: Not a directory"
    );
    assert_eq!(fs::read(runner.workspace("good.txt")).unwrap(), b"ok");
    assert_eq!(fs::read(runner.workspace("after.txt")).unwrap(), b"ok");
}

/// Symlinks a learner could plant that would lead out of the runner if followed on the host.
fn plant_escape_links(runner: &Runner) {
    symlink("/", runner.workspace("to-root")).unwrap();
    symlink("../..", runner.workspace("up")).unwrap();
    symlink("../../../../../../..", runner.workspace("way-up")).unwrap();
    symlink(runner.outside(), runner.workspace("host")).unwrap();
    symlink(runner.outside().join("sentinel.txt"), runner.workspace("host-file")).unwrap();
}

#[test]
fn copies_through_escaping_symlinks_stay_inside_the_root() {
    let runner = Runner::new();
    plant_escape_links(&runner);
    let outside = runner.outside();
    let host_outside = outside.to_str().unwrap().trim_start_matches('/');
    // Inside the runner, the host path the link names is an ordinary directory.
    let inside = runner.path(host_outside);
    fs::create_dir_all(&inside).unwrap();

    runner
        .copy(&[
            ("to-root/etc/passwd", b"runner passwd"),
            ("up/outside/sentinel.txt", b"overwritten"),
            ("way-up/outside/new.txt", b"new"),
            ("host/sentinel.txt", b"overwritten"),
            ("host/created/", b""),
        ])
        .unwrap();

    runner.assert_outside_untouched();
    // Each link resolved against the runner's `/`.
    assert_eq!(fs::read(runner.path("etc/passwd")).unwrap(), b"runner passwd");
    assert_eq!(fs::read(runner.path("outside/sentinel.txt")).unwrap(), b"overwritten");
    assert_eq!(fs::read(runner.path("outside/new.txt")).unwrap(), b"new");
    assert_eq!(fs::read(inside.join("sentinel.txt")).unwrap(), b"overwritten");
    assert_eq!(mode(&inside.join("created")), 0o1777);
}

#[test]
fn copies_below_a_symlink_dangling_inside_the_root_fail_without_escaping() {
    let runner = Runner::new();
    plant_escape_links(&runner);

    let error =
        runner.copy(&[("host/sentinel.txt", b"overwritten"), ("host/dir/", b"")]).unwrap_err();

    let FilesError::CopyFailed(message) = error else {
        panic!("expected CopyFailed, got {error:?}");
    };
    assert!(message.contains("tar: host/sentinel.txt: Cannot open: "), "{message}");
    assert!(message.contains("tar: host/dir: Cannot mkdir: "), "{message}");
    runner.assert_outside_untouched();
}

#[test]
fn symlinks_at_copy_targets_are_replaced_not_followed() {
    let runner = Runner::new();
    plant_escape_links(&runner);

    runner.copy(&[("host-file", b"replaced"), ("host/", b"")]).unwrap();

    runner.assert_outside_untouched();
    let metadata = fs::symlink_metadata(runner.workspace("host-file")).unwrap();
    assert!(metadata.file_type().is_file());
    assert_eq!(fs::read(runner.workspace("host-file")).unwrap(), b"replaced");
    assert!(fs::symlink_metadata(runner.workspace("host")).unwrap().is_dir());
}

#[test]
fn deletions_through_or_of_escaping_symlinks_stay_inside_the_root() {
    let runner = Runner::new();
    plant_escape_links(&runner);

    runner.delete(&[
        "up/outside/sentinel.txt",
        "way-up/outside",
        "host/sentinel.txt",
        "to-root/../outside",
        "host-file",
        "host",
    ]);

    runner.assert_outside_untouched();
    // The links themselves are gone, their targets are not.
    assert!(fs::symlink_metadata(runner.workspace("host-file")).is_err());
    assert!(fs::symlink_metadata(runner.workspace("host")).is_err());

    runner.delete(&["./*"]);
    runner.assert_outside_untouched();
    assert_eq!(fs::read_dir(runner.workspace("")).unwrap().count(), 0);
    assert!(runner.path("etc/passwd").exists(), "`to-root` was unlinked, not emptied");
}

#[test]
fn listings_and_downloads_through_escaping_symlinks_stay_inside_the_root() {
    let runner = Runner::new();
    plant_escape_links(&runner);

    for privileged in [false, true] {
        assert!(is_not_found(runner.root.list("up/outside", true, privileged)));
        assert!(is_not_found(runner.root.list("host/", true, privileged)));
        assert!(is_not_found(runner.root.open("host-file", privileged)));
        assert!(is_not_found(runner.root.open("host/sentinel.txt", privileged)));
        assert!(is_not_found(runner.root.open("way-up/outside/sentinel.txt", privileged)));
        assert_eq!(runner.names("to-root/", false), ["etc", "workspace"]);
        assert_eq!(runner.names("up/", false), ["etc", "workspace"]);
        assert_eq!(runner.download("to-root/etc/passwd", privileged).unwrap(), PASSWD.as_bytes());
    }
    let entries = runner.root.list("host-file", false, false).unwrap();
    assert_eq!(entries[0].entry_type, 'l');
    runner.assert_outside_untouched();
}

#[test]
fn dot_dot_paths_stay_inside_the_root() {
    let runner = Runner::new();
    runner.copy(&[("../../../../escaped.txt", b"x"), ("a/../../b/", b"")]).unwrap();
    assert_eq!(fs::read(runner.path("escaped.txt")).unwrap(), b"x");
    assert!(runner.path("b").is_dir());
    assert_eq!(runner.download("../../../../../etc/passwd", false).unwrap(), PASSWD.as_bytes());
    assert_eq!(runner.names("../../..", false), ["b", "escaped.txt", "etc", "workspace"]);
    runner.delete(&["../../../../escaped.txt"]);
    assert!(!runner.path("escaped.txt").exists());
    runner.assert_outside_untouched();
}

#[test]
fn unprivileged_operations_are_denied_what_the_user_may_not_access() {
    let runner = Runner::new();
    runner
        .copy(&[("private/", b""), ("private/file", b"secret"), ("secret.txt", b"secret")])
        .unwrap();
    fs::set_permissions(runner.workspace("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(runner.workspace("secret.txt"), fs::Permissions::from_mode(0o600)).unwrap();

    assert!(is_not_found(runner.root.list("private", false, false)));
    assert!(is_not_found(runner.root.list("private/file", false, false)));
    assert!(is_not_found(runner.root.open("private/file", false)));
    assert!(is_not_found(runner.root.open("secret.txt", false)));
    // A recursive listing skips the unreadable directory, like `ls -R`.
    assert_eq!(runner.names("./", true), ["./private", "./secret.txt"]);

    assert_eq!(entry_names(&runner.root.list("private", false, true).unwrap()), ["file"]);
    assert_eq!(runner.download("private/file", true).unwrap(), b"secret");
    assert_eq!(runner.download("secret.txt", true).unwrap(), b"secret");
}

#[test]
fn unprivileged_user_reads_files_of_its_own_and_world_readable_ones() {
    let runner = Runner::new();
    runner.copy(&[("shared.txt", b"shared")]).unwrap();
    let own = runner.workspace("own.txt");
    fs::write(&own, "mine").unwrap();
    fs::set_permissions(&own, fs::Permissions::from_mode(0o600)).unwrap();
    chown(&own, Some(IDS.user_uid), Some(IDS.user_gid)).unwrap();

    assert_eq!(runner.download("shared.txt", false).unwrap(), b"shared");
    assert_eq!(runner.download("own.txt", false).unwrap(), b"mine");
}

fn host_as_root() -> Root {
    let host =
        open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
    Root::new(host, IDS, "/")
}

/// Starts `sleep` as a host uid; its `/proc/<pid>/environ` is readable only for those who may
/// trace it, like the runner's `/proc/1/environ`.
fn sleeper(uid: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("sleep")
        .arg("30")
        .current_dir("/")
        .uid(uid)
        .gid(uid)
        .spawn()
        .unwrap()
}

fn environ_downloads(uid: u32) -> (Result<u64, FilesError>, Result<u64, FilesError>) {
    let root = host_as_root();
    let mut process = sleeper(uid);
    let environ = format!("/proc/{}/environ", process.id());
    let unprivileged = root.open(&environ, false).map(|(size, _)| size);
    let privileged = root.open(&environ, true).map(|(size, _)| size);
    process.kill().unwrap();
    process.wait().unwrap();
    (unprivileged, privileged)
}

/// The host's procfs stands in for the runner's.
#[test]
fn only_privileged_downloads_read_the_environment_of_the_runners_root_processes() {
    let (unprivileged, privileged) = environ_downloads(IDS.root_uid);
    assert!(is_not_found(unprivileged));
    assert!(privileged.unwrap() > 0, "the environment of `sleep` is not empty");
}

/// Privileged operations act as the runner's root, not as host root: no `CAP_SYS_PTRACE` over
/// host processes (nor `CAP_SYSLOG`, `CAP_SYS_RAWIO` for `/proc/kmsg` or `/proc/kcore`).
#[test]
fn privileged_downloads_lack_the_host_capabilities_of_the_service() {
    let (unprivileged, privileged) = environ_downloads(0);
    assert!(is_not_found(unprivileged));
    assert!(is_not_found(privileged));
}

#[test]
fn pseudo_files_reporting_size_zero_are_read_to_learn_their_length() {
    let (size, mut reader) = host_as_root().open("/proc/self/status", true).unwrap();
    let mut status = String::new();
    reader.read_to_string(&mut status).unwrap();
    assert!(size > 0);
    assert_eq!(status.len() as u64, size);
    assert!(status.starts_with("Name:"));
}

fn thread_credentials() -> Vec<String> {
    fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .filter(|line| {
            ["Uid:", "Gid:", "Groups:", "CapEff:", "CapPrm:"]
                .iter()
                .any(|key| line.starts_with(key))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn unprivileged_operations_leave_other_threads_credentials_unchanged() {
    let runner = Runner::new();
    runner.copy(&[("file", b"x")]).unwrap();
    let (ask, asked) = mpsc::channel::<()>();
    let (tell, told) = mpsc::channel();
    let bystander = std::thread::spawn(move || {
        while asked.recv().is_ok() {
            tell.send(thread_credentials()).unwrap();
        }
    });
    ask.send(()).unwrap();
    let bystander_before = told.recv().unwrap();
    let before = thread_credentials();

    for privileged in [false, true, false] {
        runner.root.list("./", true, privileged).unwrap();
        runner.download("file", privileged).unwrap();
        assert!(is_not_found(runner.root.list("missing", true, privileged)));
        runner.copy(&[("other", b"y")]).unwrap();
    }

    assert_eq!(thread_credentials(), before);
    ask.send(()).unwrap();
    assert_eq!(told.recv().unwrap(), bystander_before);
    assert!(
        before
            .iter()
            .any(|line| line.starts_with("CapEff:") && !line.ends_with("0000000000000000"))
    );
    drop(ask);
    bystander.join().unwrap();
    // The calling thread still reads what only host root may.
    fs::set_permissions(runner.outside(), fs::Permissions::from_mode(0o700)).unwrap();
    chown(runner.outside(), Some(1), Some(1)).unwrap();
    assert_eq!(fs::read_to_string(runner.outside().join("sentinel.txt")).unwrap(), SENTINEL);
}

/// One runtime for this test binary, with its own cgroup and state directory.
fn files_runtime() -> &'static poseidon_sandbox::Runtime {
    static RUNTIME: std::sync::OnceLock<poseidon_sandbox::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| common::shared_runtime("poseidon-test-files", "files"))
}

/// Parses `ls -l --time-style=+%s -1 --literal --recursive ./` the way the Go Poseidon does
/// (section headers set the prefix; `total` and blank lines are skipped).
fn parse_ls(output: &str) -> Vec<Entry> {
    let mut prefix = String::new();
    let mut entries = Vec::new();
    for line in output.lines() {
        if let Some(header) = line.strip_suffix(':') {
            prefix = if header.ends_with('/') { header.to_owned() } else { format!("{header}/") };
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 7 || line.starts_with("total ") {
            continue;
        }
        let mut mode = fields[0].chars();
        entries.push(Entry {
            entry_type: mode.next().unwrap(),
            permissions: mode.collect(),
            owner: fields[2].to_owned(),
            group: fields[3].to_owned(),
            size: fields[4].parse().unwrap(),
            modification_time: fields[5].parse().unwrap(),
            name: format!("{prefix}{}", fields[6..].join(" ")),
            link_target: None,
        });
    }
    entries
}

async fn real_runner() -> poseidon_sandbox::Sandbox {
    files_runtime()
        .create(poseidon_sandbox::SandboxSpec {
            name: common::unique_name("files"),
            image: files_runtime().host_image(),
            limits: poseidon_sandbox::Limits::default(),
        })
        .await
        .expect("create sandbox")
}

#[tokio::test]
async fn real_runner_uploads_listings_and_downloads_match_the_runner_view() {
    let sandbox = real_runner().await;
    let root = sandbox.files().unwrap();
    let planted = common::run(
        &sandbox,
        common::batch("echo old > old.txt && echo dot > .keep && ln -s / evil && mkfifo pipe"),
    )
    .await;
    assert_eq!(planted.exit.code, Some(0), "{planted:?}");

    let error = root
        .update(
            &["./*".to_owned()],
            &copy_items(&[
                ("protected/", b""),
                ("protected/test.txt", b"teacher"),
                ("/proc/1/environ", b"x"),
                ("main.py", b"print(1)\n"),
            ]),
        )
        .unwrap_err();
    let FilesError::CopyFailed(message) = error else { panic!("expected CopyFailed: {error:?}") };
    assert!(message.contains("tar: /proc/1/environ: Cannot open: "), "{message}");

    // The listing equals what `ls` inside the runner shows.
    let ls =
        common::run(&sandbox, common::batch("ls -l --time-style=+%s -1 --literal --recursive ./"))
            .await;
    let listed = root.list("./", true, false).unwrap();
    assert_eq!(listed, parse_ls(&ls.stdout), "ls said:\n{}", ls.stdout);
    assert_eq!(entry_names(&listed), ["./main.py", "./protected", "./protected/test.txt"]);
    assert_eq!(listed[1].permissions, "rwxrwxrwt");

    // The sticky directory protects teacher files from the user (the Go e2e expectations).
    let user = common::run(
        &sandbox,
        common::batch(
            "cat .keep; touch protected/mine && echo created; \
             rm -f protected/test.txt 2>/dev/null || echo protected; \
             (echo more >> protected/test.txt) 2>/dev/null || echo read-only",
        ),
    )
    .await;
    assert_eq!(user.stdout, "dot\ncreated\nprotected\nread-only\n");
    let mine = root.list("protected/mine", false, false).unwrap();
    assert_eq!((mine[0].owner.as_str(), mine[0].group.as_str()), ("user", "user"));

    assert_eq!(
        {
            let (_, mut reader) = root.open("protected/test.txt", false).unwrap();
            let mut content = String::new();
            reader.read_to_string(&mut content).unwrap();
            content
        },
        "teacher"
    );
    assert!(is_not_found(root.open("/proc/1/environ", false)));
    assert!(is_not_found(root.open("missing.txt", false)));
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn real_runner_symlinks_resolve_inside_the_runner() {
    let sandbox = real_runner().await;
    let root = sandbox.files().unwrap();
    let host_target = format!("/tmp/poseidon-files-escape-{}", std::process::id());
    let planted =
        common::run(&sandbox, common::batch("ln -s / .evil && ln -s /etc/passwd .pw")).await;
    assert_eq!(planted.exit.code, Some(0), "{planted:?}");

    let escape = format!(".evil{host_target}");
    root.update(&[], &copy_items(&[(escape.as_str(), b"inside")])).unwrap();

    assert!(!Path::new(&host_target).exists(), "written on the host");
    let inside = common::run(&sandbox, common::batch(&format!("cat {host_target}"))).await;
    assert_eq!(inside.stdout, "inside");
    let (_, mut reader) = root.open(".pw", false).unwrap();
    let mut passwd = String::new();
    reader.read_to_string(&mut passwd).unwrap();
    assert!(passwd.contains("user:x:1001:1001"), "the runner's passwd: {passwd}");
    assert_ne!(passwd, fs::read_to_string("/etc/passwd").unwrap());
    sandbox.destroy().await.unwrap();
}
