//! Copy, list and download (spec §5, client §3): CodeOcean's request shapes, the workspace
//! wipe with `./*`, modes and owners, the sticky protected folders, byte-exact downloads and the
//! error statuses CodeOcean maps (400, 424, 500).

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{TestServer, copy_entries, with_runner};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

/// The entry named `name` of a recursive listing of the workspace.
async fn entry(server: &TestServer, runner: &str, name: &str) -> Value {
    let listing = server.list_files(runner, &[]).await.expect(200, "GET files").json();
    listing["files"]
        .as_array()
        .and_then(|files| files.iter().find(|entry| entry["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no entry {name} in {listing}"))
}

/// Deterministic pseudo-random bytes (xorshift64), so a failure can be reproduced.
fn pseudo_random_bytes(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn a_fresh_runner_lists_an_empty_files_array() {
    with_runner(async |server, runner| {
        let listing = server.list_files(runner, &[]).await.expect(200, "GET files").json();
        // `files` must be an array; null breaks CodeOcean (client §3).
        assert_eq!(listing, json!({"files": []}));
    })
    .await;
}

#[tokio::test]
async fn a_copied_empty_file_is_listed_as_root_owned_0744() {
    with_runner(async |server, runner| {
        server.copy(runner, &[("test.txt", b"")]).await;
        // CodeOcean's exact query (client §1): `./` percent-encoded, booleans as strings.
        let query = [("path", "./"), ("privilegedExecution", "false"), ("recursive", "true")];
        let listing = server.list_files(runner, &query).await.expect(200, "GET files").json();
        let files = listing["files"].as_array().expect("files is an array");
        assert_eq!(files.len(), 1, "{listing}");
        let file = &files[0];
        let mut keys: Vec<&str> =
            file.as_object().expect("entry").keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["entryType", "group", "modificationTime", "name", "owner", "permissions", "size"],
            "{file}"
        );
        assert_eq!(file["name"], "./test.txt");
        assert_eq!(file["entryType"], "-");
        assert_eq!(file["size"], 0);
        assert!(file["modificationTime"].is_i64(), "{file}");
        assert_eq!(file["owner"], "root");
        assert_eq!(file["group"], "root");
        assert_eq!(file["permissions"], "rwxr--r--");
    })
    .await;
}

#[tokio::test]
async fn directory_entries_are_sticky_and_created_with_parents() {
    with_runner(async |server, runner| {
        // CodeOcean sends only the leaf directory, then the file (client §3).
        server.copy(runner, &[("a/b/", b""), ("a/b/c.py", b"print(1)\n")]).await;
        let names = server.file_names(runner).await;
        for name in ["./a", "./a/b", "./a/b/c.py"] {
            assert!(names.iter().any(|listed| listed == name), "{name} missing from {names:?}");
        }
        let directory = entry(server, runner, "./a/b").await;
        assert_eq!(directory["entryType"], "d");
        assert_eq!(directory["permissions"], "rwxrwxrwt", "directories are 01777: {directory}");
        assert_eq!(entry(server, runner, "./a/b/c.py").await["size"], 9);

        // A non-recursive listing of a directory gives bare names (spec §5.2).
        let query = [("path", "a/b"), ("recursive", "false"), ("privilegedExecution", "false")];
        let listing = server.list_files(runner, &query).await.expect(200, "GET files").json();
        let names: Vec<&str> = listing["files"]
            .as_array()
            .expect("files is an array")
            .iter()
            .filter_map(|entry| entry["name"].as_str())
            .collect();
        assert_eq!(names, ["c.py"], "{listing}");
    })
    .await;
}

#[tokio::test]
async fn files_land_relative_to_the_workspace_or_at_absolute_paths() {
    with_runner(async |server, runner| {
        let files: [(&str, &[u8]); 2] = [
            ("relative/file/path.txt", b"Relative file content"),
            ("/tmp/absolute/file/path.txt", b"Absolute file content"),
        ];
        server.copy(runner, &files).await;
        let relative = server.run(runner, "cat /workspace/relative/file/path.txt").await;
        assert_eq!(relative.stdout, "Relative file content", "{relative:#?}");
        let absolute = server.run(runner, "cat /tmp/absolute/file/path.txt").await;
        assert_eq!(absolute.stdout, "Absolute file content", "{absolute:#?}");
    })
    .await;
}

#[tokio::test]
async fn delete_glob_wipes_the_workspace_but_keeps_dotfiles_and_runs_before_the_copy() {
    with_runner(async |server, runner| {
        let old: [(&str, &[u8]); 4] =
            [(".hidden", b"h"), ("old.txt", b"o"), ("dir/", b""), ("dir/inner.txt", b"i")];
        server.copy(runner, &old).await;
        // Exactly what CodeOcean sends: `./*` is an unquoted shell glob (client §3).
        let body = json!({"copy": copy_entries(&[("old.txt", b"new")]), "delete": ["./*"]});
        server.copy_files(runner, &body).await.expect_empty(204, "PATCH with delete");
        let listing = server.run(runner, "ls -A1").await;
        assert_eq!(listing.stdout, ".hidden\r\nold.txt\r\n", "{listing:#?}");
        assert_eq!(server.run(runner, "cat old.txt").await.stdout, "new");
    })
    .await;
}

#[tokio::test]
async fn other_delete_paths_are_literal() {
    with_runner(async |server, runner| {
        let files: [(&str, &[u8]); 4] =
            [("keep.txt", b"k"), ("star*.txt", b"s"), ("starfish.txt", b"f"), ("gone.txt", b"g")];
        server.copy(runner, &files).await;
        let body = json!({"copy": [], "delete": ["star*.txt", "./gone.txt", "missing.txt"]});
        server.copy_files(runner, &body).await.expect_empty(204, "PATCH with literal deletes");
        let listing = server.run(runner, "ls -A1").await;
        assert_eq!(listing.stdout, "keep.txt\r\nstarfish.txt\r\n", "{listing:#?}");
    })
    .await;
}

#[tokio::test]
async fn sticky_protected_folders_keep_teacher_files_safe() {
    with_runner(async |server, runner| {
        // Go's TestCopyFilesRoute_ProtectedFolders (spec §5.1).
        server
            .copy(
                runner,
                &[("protectedFolder/", b""), ("protectedFolder/test.txt", b"New content")],
            )
            .await;
        let create = server.run(runner, "touch protectedFolder/userfile").await;
        create.assert_exit(0);
        assert_eq!((create.stdout.as_str(), create.stderr.as_str()), ("", ""), "{create:#?}");

        let delete_folder = server.run(runner, "rm -fr protectedFolder/").await;
        assert!(delete_folder.stderr.contains("Operation not permitted"), "{delete_folder:#?}");
        assert_eq!(delete_folder.stdout, "");

        let delete_file = server.run(runner, "rm -f protectedFolder/test.txt").await;
        assert!(delete_file.stderr.contains("Operation not permitted"), "{delete_file:#?}");

        let append = server.run(runner, "echo Hi >> protectedFolder/test.txt").await;
        assert!(append.stderr.contains("Permission denied"), "{append:#?}");

        let content = server.run(runner, "cat protectedFolder/test.txt").await;
        assert_eq!(content.stdout, "New content", "{content:#?}");
    })
    .await;
}

#[tokio::test]
async fn binary_files_round_trip_byte_for_byte() {
    with_runner(async |server, runner| {
        let every_byte: Vec<u8> = (0..=255).collect();
        let blob = pseudo_random_bytes(1 << 20);
        server.copy(runner, &[("bytes.bin", &every_byte), ("data/blob.bin", &blob)]).await;
        for (path, content) in [("bytes.bin", &every_byte), ("data/blob.bin", &blob)] {
            let reply = server.download(runner, path, false).await.expect(200, path);
            // CodeOcean forwards Content-Length to the browser (client §3).
            assert_eq!(reply.header("content-length"), Some(content.len().to_string().as_str()));
            let disposition = format!("attachment; filename=\"{path}\"");
            assert_eq!(reply.header("content-disposition"), Some(disposition.as_str()));
            assert!(&reply.body == content, "{path}: downloaded bytes differ from the upload");
        }
        let listed = entry(server, runner, "./data/blob.bin").await;
        assert_eq!(listed["size"], 1 << 20);
    })
    .await;
}

#[tokio::test]
async fn stalled_downloads_block_no_other_file_operation() {
    with_runner(async |server, runner| {
        // CodeOcean streams downloads through to a learner's browser, which may stop reading.
        // More stalled downloads than the server has blocking threads (64) must not hold any.
        // The file is larger than what the kernel's socket buffers absorb, and the client's
        // receive buffer is tiny, so each download really stalls inside the server.
        server.copy(runner, &[("big.bin", &pseudo_random_bytes(16 << 20))]).await;
        let mut stalled = Vec::new();
        for _ in 0..80 {
            let socket = TcpSocket::new_v4().expect("socket");
            socket.set_recv_buffer_size(4096).expect("small receive buffer");
            let mut socket = socket.connect(server.addr).await.expect("connect");
            let token = server.token.as_deref().unwrap_or_default();
            let request = format!(
                "GET /api/v1/runners/{runner}/files/raw?path=big.bin HTTP/1.1\r\nHost: {}\r\n\
                 Poseidon-Token: {token}\r\n\r\n",
                server.addr
            );
            socket.write_all(request.as_bytes()).await.expect("send the request");
            stalled.push(socket);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        server.list_files(runner, &[]).await.expect(200, "listing beside stalled downloads");
        server.copy(runner, &[("small.txt", b"x")]).await;
        server.download(runner, "small.txt", false).await.expect(200, "download");
        assert!(started.elapsed() < Duration::from_secs(3), "file operations waited");
        drop(stalled);
    })
    .await;
}

#[tokio::test]
async fn uploads_of_several_megabytes_are_accepted() {
    with_runner(async |server, runner| {
        // Exercises may ship data sets or images; Go has no body limit (only a 15 s read timeout).
        let blob = pseudo_random_bytes(5 << 20);
        server.copy(runner, &[("data.bin", &blob)]).await;
        let reply = server.download(runner, "data.bin", false).await.expect(200, "download");
        assert!(reply.body == blob, "downloaded bytes differ from the upload");
    })
    .await;
}

#[tokio::test]
async fn missing_or_unreadable_downloads_are_424() {
    with_runner(async |server, runner| {
        // 424 before any body (client §3); CodeOcean raises WorkspaceError.
        server.download(runner, "test.txt", false).await.expect_message(424, "missing file");
        server
            .download(runner, "/proc/1/environ", false)
            .await
            .expect_message(424, "/proc/1/environ unprivileged");
    })
    .await;
}

#[tokio::test]
async fn downloads_honour_the_privileged_flag() {
    with_runner(async |server, runner| {
        let setup = server
            .run_privileged(
                runner,
                "echo secret > /workspace/secret.txt && chmod 600 /workspace/secret.txt",
            )
            .await;
        setup.assert_exit(0);
        server
            .download(runner, "secret.txt", false)
            .await
            .expect_message(424, "root-only file, unprivileged");
        let reply = server.download(runner, "secret.txt", true).await.expect(200, "privileged");
        assert_eq!(reply.body, b"secret\n");
        // Query booleans follow Go's strconv.ParseBool (spec §2.1).
        for spelling in ["1", "t", "T", "TRUE", "True"] {
            let query = [("path", "secret.txt"), ("privilegedExecution", spelling)];
            let request = server
                .request(reqwest::Method::GET, &format!("/runners/{runner}/files/raw"))
                .query(&query);
            common::Reply::from(request)
                .await
                .expect(200, &format!("privilegedExecution={spelling}"));
        }
    })
    .await;
}

#[tokio::test]
async fn a_failing_entry_is_500_but_the_other_files_are_written() {
    with_runner(async |server, runner| {
        let files: [(&str, &[u8]); 2] = [("/proc/1/environ", b"x"), ("test.txt", b"New content")];
        let body = json!({ "copy": copy_entries(&files) });
        let error =
            server.copy_files(runner, &body).await.expect_message(500, "copy to /proc/1/environ");
        // Go's e2e checks tar's wording; CodeOcean only needs a code other than NOMAD_OVERLOAD.
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("Cannot open: "), "{error}");
        assert!(error["errorCode"].is_string(), "{error}");
        assert_ne!(error["errorCode"], "NOMAD_OVERLOAD", "{error}");
        assert_eq!(server.run(runner, "cat test.txt").await.stdout, "New content");
    })
    .await;
}

#[tokio::test]
async fn files_written_by_the_learner_are_listed_and_downloadable() {
    with_runner(async |server, runner| {
        server.run(runner, "echo x > out.txt").await.assert_exit(0);
        let file = entry(server, runner, "./out.txt").await;
        assert_eq!(file["entryType"], "-");
        assert_eq!(file["owner"], "user", "{file}");
        assert_eq!(file["size"], 2);
        let reply = server.download(runner, "out.txt", false).await.expect(200, "download out.txt");
        assert_eq!(reply.body, b"x\n");
    })
    .await;
}

#[tokio::test]
async fn downloads_through_learner_symlinks_stay_inside_the_runner() {
    let host_file = tempfile::NamedTempFile::new().expect("create a host file");
    std::fs::write(host_file.path(), "host secret").expect("write the host file");
    let target = host_file.path().display().to_string();
    with_runner(async |server, runner| {
        let links =
            format!("ln -s {target} absolute && ln -s ../../../../../../..{target} relative");
        server.run(runner, &links).await.assert_exit(0);
        for link in ["absolute", "relative"] {
            // The target exists on the host only; inside the runner the link dangles.
            let reply = server.download(runner, link, true).await;
            assert_ne!(reply.body, b"host secret", "{link}: the download left the runner");
            reply.expect_message(424, link);
        }
    })
    .await;
}

#[tokio::test]
async fn malformed_copy_requests_are_400() {
    with_runner(async |server, runner| {
        let invalid_base64 = json!({"copy": [{"path": "x.txt", "content": "!!!not base64!!!"}]});
        server.copy_files(runner, &invalid_base64).await.expect_message(400, "invalid base64");
        let empty = server.request(reqwest::Method::PATCH, &format!("/runners/{runner}/files"));
        common::Reply::from(empty).await.expect_message(400, "empty body");
        // Go's e2e sends the empty body as text/html; Go ignores the content type.
        let html = server
            .client
            .patch(format!("{}/runners/{runner}/files", server.base_url))
            .header("Content-Type", "text/html");
        common::Reply::from(html).await.expect_message(400, "empty text/html body");
        // A 400 makes CodeOcean drop its runner record; the runner itself must still work.
        server.run(runner, "true").await.assert_exit(0);
    })
    .await;
}

#[tokio::test]
async fn listings_honour_the_privileged_flag() {
    with_runner(async |server, runner| {
        let setup = "mkdir -m 700 /workspace/private && touch /workspace/private/hidden.txt";
        server.run_privileged(runner, setup).await.assert_exit(0);
        server.copy(runner, &[("visible.txt", b"v")]).await;
        let names = |listing: Value| -> Vec<String> {
            listing["files"]
                .as_array()
                .expect("files is an array")
                .iter()
                .filter_map(|entry| entry["name"].as_str().map(str::to_owned))
                .collect()
        };
        let privileged = [("privilegedExecution", "true")];
        let all = names(server.list_files(runner, &privileged).await.expect(200, "root").json());
        assert!(all.contains(&"./private/hidden.txt".to_owned()), "{all:?}");
        // Go answers 200 with what it could read once the listing started (spec §5.2).
        let reply = server.list_files(runner, &[("privilegedExecution", "false")]).await;
        let some = names(reply.expect(200, "unprivileged listing").json());
        assert!(some.contains(&"./visible.txt".to_owned()), "{some:?}");
        assert!(!some.contains(&"./private/hidden.txt".to_owned()), "{some:?}");
    })
    .await;
}

#[tokio::test]
async fn listing_a_missing_path_is_424_or_empty() {
    with_runner(async |server, runner| {
        let reply = server.list_files(runner, &[("path", "missing/dir")]).await;
        // The spec recommends 424; Go in practice sends an empty listing. Never a 500.
        let empty = reply.status == 200 && reply.json() == json!({"files": []});
        assert!(reply.status == 424 || empty, "{} {}", reply.status, reply.text());
    })
    .await;
}

#[tokio::test]
async fn copied_paths_cannot_leave_the_runner() {
    let host_dir = tempfile::tempdir().expect("create a host directory");
    let host = host_dir.path().display().to_string();
    with_runner(async |server, runner| {
        // The learner plants a link to the host directory before the next copy.
        server.run(runner, &format!("ln -s {host} planted")).await.assert_exit(0);
        let absolute = format!("{host}/absolute.txt");
        let relative = format!("../../../../../../..{host}/relative.txt");
        let files: [(&str, &[u8]); 3] =
            [(&absolute, b"a"), (&relative, b"r"), ("planted/through-link.txt", b"l")];
        let body = json!({ "copy": copy_entries(&files) });
        let reply = server.copy_files(runner, &body).await;
        assert!(reply.status == 204 || reply.status == 500, "{} {}", reply.status, reply.text());
    })
    .await;
    let written: Vec<_> = std::fs::read_dir(host_dir.path())
        .expect("read the host directory")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .collect();
    assert!(written.is_empty(), "files escaped the runner onto the host: {written:?}");
}

#[tokio::test]
async fn admin_listing_and_download_take_absolute_paths() {
    with_runner(async |server, runner| {
        server.copy(runner, &[("test.txt", b"admin")]).await;
        // CodeOcean's admin shell: non-recursive listing of an explicit path (client §2).
        let query =
            [("path", "/workspace"), ("recursive", "false"), ("privilegedExecution", "true")];
        let listing = server.list_files(runner, &query).await.expect(200, "GET files").json();
        let names: Vec<&str> = listing["files"]
            .as_array()
            .expect("files is an array")
            .iter()
            .filter_map(|entry| entry["name"].as_str())
            .collect();
        assert_eq!(names, ["test.txt"], "{listing}");
        let reply =
            server.download(runner, "/workspace/test.txt", true).await.expect(200, "download");
        assert_eq!(reply.body, b"admin");
        let disposition = reply.header("content-disposition");
        assert_eq!(disposition, Some("attachment; filename=\"/workspace/test.txt\""));
    })
    .await;
}
