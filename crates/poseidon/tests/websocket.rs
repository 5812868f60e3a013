//! The execution WebSocket (spec §3, §4; client §2): frames, exit codes, the terminal, stdin,
//! time limits, client close, and how commands are run (user, directory, environment).

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::ws::{NORMAL_CLOSURE, Terminal, WsSession};
use common::{ServerOptions, TIME_LIMIT, USER_UID, eventually, with_runner, with_server};
use serde_json::json;

#[tokio::test]
async fn true_sends_only_start_and_exit_zero_then_closes_1000() {
    with_runner(async |server, runner| {
        let transcript = server.run(runner, "true").await;
        // No prompt, banner or marker may leak into the output (spec §14.6).
        assert_eq!(
            transcript.frames,
            [json!({"type": "start"}), json!({"type": "exit", "data": 0})],
            "{transcript:#?}"
        );
        assert_eq!(transcript.close_code, Some(NORMAL_CLOSURE));
    })
    .await;
}

#[tokio::test]
async fn exit_codes_and_signals_are_passed_through() {
    with_runner(async |server, runner| {
        server.run(runner, "exit 42").await.assert_exit(42);
        server.run(runner, "").await.assert_exit(0);
        // Signals give 128 + n (spec §3.6).
        server.run(runner, "kill -TERM $$").await.assert_exit(143);
    })
    .await;
}

#[tokio::test]
async fn stdout_has_terminal_line_endings() {
    with_runner(async |server, runner| {
        let transcript = server.run(runner, "echo hi").await;
        transcript.assert_exit(0);
        // Interactive executions run on a TTY: `\n` becomes `\r\n` (client §2).
        assert_eq!(transcript.stdout, "hi\r\n", "{transcript:#?}");
        assert_eq!(transcript.stderr, "", "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn errors_arrive_on_stderr_not_stdout() {
    with_runner(async |server, runner| {
        // `server.interactivestderr: true` keeps stderr apart (spec §4.3, §14.7).
        let listing = server.run(runner, "ls /nonexistent").await;
        assert_ne!(listing.exit_code(), 0);
        assert!(listing.stderr.contains("/nonexistent"), "{listing:#?}");
        assert!(!listing.stdout.contains("nonexistent"), "{listing:#?}");

        let cat = server.run(runner, "cat -invalid").await;
        assert_ne!(cat.exit_code(), 0);
        assert!(cat.stderr.contains("invalid"), "{cat:#?}");
        assert!(!cat.stdout.contains("invalid"), "{cat:#?}");
    })
    .await;
}

#[tokio::test]
async fn stdin_is_echoed_by_the_terminal_and_read_by_the_process() {
    with_runner(async |server, runner| {
        let url =
            server.execute(runner, "echo ready; read x; echo \"got $x\"", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        session.send("hello\n").await;
        let transcript = session.finish().await;
        transcript.assert_exit(0);
        let echo = transcript.stdout.find("hello\r\n");
        let answer = transcript.stdout.find("got hello\r\n");
        assert!(
            echo.is_some() && answer.is_some() && echo < answer,
            "expected the echoed input before the answer: {transcript:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn stdin_sent_right_after_the_upgrade_is_not_lost() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "read x; echo \"got $x\"", TIME_LIMIT, false).await;
        let transcript = server.run_ws(&url, &["early\n"]).await;
        transcript.assert_exit(0);
        assert!(transcript.stdout.contains("got early\r\n"), "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn stdin_json_lines_reach_the_process_byte_for_byte() {
    with_runner(async |server, runner| {
        // CodeOcean forwards the browser's JSON plus `\n` as one text frame (client §2).
        let line = r#"{"cmd":"result","data":"Älice \\ \"quoted\""}"#;
        let url =
            server.execute(runner, "read -r x; printf \"<%s>\" \"$x\"", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.send(&format!("{line}\n")).await;
        let transcript = session.finish().await;
        transcript.assert_exit(0);
        assert!(transcript.stdout.contains(&format!("<{line}>")), "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn ctrl_c_interrupts_the_foreground_process() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "echo ready; sleep 100", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        let sent = Instant::now();
        // The TTY turns ETX into SIGINT (spec §3.3).
        session.send("\u{3}").await;
        let transcript = session.finish().await;
        transcript.assert_exit(130);
        assert!(sent.elapsed() < Duration::from_secs(3), "Ctrl-C took {:?}", sent.elapsed());
    })
    .await;
}

#[tokio::test]
async fn output_with_quotes_and_control_characters_is_valid_json() {
    with_runner(async |server, runner| {
        let transcript = server.run(runner, r#"printf "a\"b\\\\d\x01\tz""#).await;
        transcript.assert_exit(0);
        assert_eq!(transcript.stdout, "a\"b\\d\u{1}\tz", "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn unicode_output_arrives_intact() {
    with_runner(async |server, runner| {
        let transcript = server.run(runner, "printf \"ü€😀\"").await;
        transcript.assert_exit(0);
        assert_eq!(transcript.stdout, "ü€😀", "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn multibyte_characters_split_across_chunks_arrive_intact() {
    with_runner(async |server, runner| {
        // 9-byte units written in 4 KiB blocks: most chunk boundaries split a character.
        let command = "yes \"ü€😀\" | head -n 5000 | tr -d \"\\n\"";
        let transcript = server.run(runner, command).await;
        transcript.assert_exit(0);
        assert!(!transcript.stdout.contains('\u{FFFD}'), "replacement characters in stdout");
        assert_eq!(transcript.stdout.len(), 45_000, "stdout has the wrong length");
        assert!(transcript.stdout == "ü€😀".repeat(5000), "stdout differs from the input");
    })
    .await;
}

#[tokio::test]
async fn execution_ids_are_one_shot_and_unknown_ids_are_404() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "true", TIME_LIMIT, false).await;
        server.run_ws(&url, &[]).await.assert_exit(0);
        // Rejected before the upgrade (spec §2.12).
        assert_eq!(WsSession::connect(&url, None).await.err(), Some(404), "second connect");

        let unknown = format!(
            "ws://{}/api/v1/runners/{runner}/websocket?executionID=00000000-0000-4000-8000-000000000000",
            server.addr
        );
        assert_eq!(WsSession::connect(&unknown, None).await.err(), Some(404), "unknown id");
    })
    .await;
}

#[tokio::test]
async fn execution_ids_belong_to_their_runner() {
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 2).await;
        let first = server.claim(1, 60).await;
        let second = server.claim(1, 60).await;
        let url = server.execute(&first, "true", TIME_LIMIT, false).await;
        let foreign = url.replace(&first, &second);
        assert_eq!(WsSession::connect(&foreign, None).await.err(), Some(404), "foreign runner");
        server.run_ws(&url, &[]).await.assert_exit(0);
    })
    .await;
}

#[tokio::test]
async fn stored_executions_can_be_connected_in_any_order() {
    with_runner(async |server, runner| {
        let one = server.execute(runner, "echo one", TIME_LIMIT, false).await;
        let two = server.execute(runner, "echo two", TIME_LIMIT, false).await;
        assert_ne!(one, two);
        assert_eq!(server.run_ws(&two, &[]).await.stdout, "two\r\n");
        assert_eq!(server.run_ws(&one, &[]).await.stdout, "one\r\n");
    })
    .await;
}

#[tokio::test]
async fn single_quotes_in_commands_are_rejected_with_400() {
    with_runner(async |server, runner| {
        let body =
            json!({"command": "echo 'quoted'", "timeLimit": 10, "privilegedExecution": false});
        let error = server
            .execute_with(runner, &body)
            .await
            .expect_message(400, "execute with a single quote");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("use of forbidden character"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn commands_see_codeocean_true_and_no_service_variables() {
    with_runner(async |server, runner| {
        // CODEOCEAN=true overrides a value from the request (spec §4.1).
        let body = json!({
            "command": "env",
            "timeLimit": TIME_LIMIT,
            "privilegedExecution": false,
            "environment": {"CODEOCEAN": "false"},
        });
        let url = server.execute_body(runner, &body).await;
        let transcript = server.run_ws(&url, &[]).await;
        transcript.assert_exit(0);
        let lines: Vec<&str> = transcript.stdout.lines().map(str::trim_end).collect();
        assert!(lines.contains(&"CODEOCEAN=true"), "{transcript:#?}");
        assert!(!lines.contains(&"CODEOCEAN=false"), "{transcript:#?}");
        let leaked: Vec<&&str> = lines
            .iter()
            .filter(|line| {
                line.starts_with("NOMAD_")
                    || line.starts_with("POSEIDON")
                    || line.starts_with(common::HOST_SECRET_VARIABLE)
            })
            .collect();
        assert!(leaked.is_empty(), "service variables leaked into the runner: {leaked:?}");
    })
    .await;
}

#[tokio::test]
async fn request_environment_variables_are_passed_literally() {
    with_runner(async |server, runner| {
        let body = json!({
            "command": "printf \"%s|%s\" \"$GREETING\" \"$LITERAL\"",
            "timeLimit": TIME_LIMIT,
            "environment": {"GREETING": "hello world", "LITERAL": "$HOME `id`"},
        });
        let url = server.execute_body(runner, &body).await;
        let transcript = server.run_ws(&url, &[]).await;
        transcript.assert_exit(0);
        assert_eq!(transcript.stdout, "hello world|$HOME `id`", "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn commands_run_in_the_workspace() {
    with_runner(async |server, runner| {
        let transcript = server.run(runner, "pwd").await;
        assert_eq!(transcript.stdout, "/workspace\r\n", "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn unprivileged_commands_run_as_user_and_privileged_as_root() {
    with_runner(async |server, runner| {
        assert_eq!(server.run(runner, "id -u").await.stdout, format!("{USER_UID}\r\n"));
        assert_eq!(server.run_privileged(runner, "id -u").await.stdout, "0\r\n");
        // CodeOcean validates an environment with `whoami`; any stderr output is a failure.
        let whoami = server.run(runner, "whoami").await;
        whoami.assert_exit(0);
        assert_eq!(whoami.stdout, "user\r\n", "{whoami:#?}");
        assert_eq!(whoami.stderr, "", "{whoami:#?}");
    })
    .await;
}

#[tokio::test]
async fn time_limit_sends_timeout_promptly_and_the_runner_survives() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "sleep 10", 1, false).await;
        let transcript = server.run_ws(&url, &[]).await;
        // `timeout`, never a kill exit code (client §6.8), then close 1000 (spec §3.4).
        assert_eq!(transcript.terminal, Terminal::Timeout, "{transcript:#?}");
        assert!(
            transcript.elapsed < Duration::from_millis(2500),
            "timeout after {:?}",
            transcript.elapsed
        );
        assert!(
            transcript.elapsed >= Duration::from_millis(900),
            "timeout after {:?}",
            transcript.elapsed
        );

        let after = server.run(runner, "echo ok").await;
        after.assert_exit(0);
        assert_eq!(after.stdout, "ok\r\n");
        let processes = server.run(runner, "ps ax").await;
        assert!(
            !processes.stdout.contains("sleep 10"),
            "the timed-out process survived: {processes:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn client_close_stops_the_process() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "echo ready; exec sleep 1234", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        let transcript = session.close().await;
        // Faye waits for the server's close reply before CodeOcean continues (client §6.10).
        assert_eq!(transcript.close_code, Some(NORMAL_CLOSURE), "{transcript:#?}");
        assert_eq!(
            transcript.terminal,
            Terminal::Missing,
            "no terminal frame after a client close"
        );

        let stopped = eventually(Duration::from_secs(3), async || {
            !server.run(runner, "ps ax").await.stdout.contains("sleep 1234")
        })
        .await;
        assert!(stopped, "`sleep 1234` still runs 3 s after the client closed");
    })
    .await;
}

#[tokio::test]
async fn dropping_the_connection_stops_the_process() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "echo ready; exec sleep 4321", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        // A TCP close without a close frame, as when CodeOcean's process dies.
        drop(session);
        let stopped = eventually(Duration::from_secs(3), async || {
            !server.run(runner, "ps ax").await.stdout.contains("sleep 4321")
        })
        .await;
        assert!(stopped, "`sleep 4321` still runs 3 s after the connection dropped");
    })
    .await;
}

#[tokio::test]
async fn deleting_the_runner_ends_its_running_execution() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "echo ready; sleep 100", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        server.delete(&format!("/runners/{runner}")).await.expect_empty(204, "DELETE runner");
        let transcript = session.finish().await;
        // Spec §3.6: DELETE maps to this error text.
        assert_eq!(
            transcript.terminal,
            Terminal::Error("the allocation stopped as expected".into()),
            "{transcript:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn running_out_of_memory_is_reported_as_oom() {
    with_server(ServerOptions::default(), async |server| {
        let mut body = common::environment_body(1, 1);
        body["memoryLimit"] = json!(64);
        server.put_env(1, &body).await.expect_empty(201, "PUT with 64 MB");
        server.wait_idle(1, 1).await;
        let runner = server.claim(1, 60).await;
        // Writes 256 MB, so the pages are really used.
        let transcript =
            server.run(&runner, "python3 -c \"x = bytes(range(256)) * (1 << 20)\"").await;
        // CodeOcean maps both to "out of memory" (client §2, §6.8).
        let oom = Terminal::Error("the allocation was OOM Killed".into());
        assert!(
            transcript.terminal == oom || transcript.terminal == Terminal::Exit(137),
            "{transcript:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_output_flood_still_ends_at_the_time_limit() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "yes flood", 1, false).await;
        let transcript = server.run_ws(&url, &[]).await;
        assert_eq!(transcript.terminal, Terminal::Timeout, "frames: {}", transcript.frames.len());
        assert!(transcript.stdout.starts_with("flood\r\n"), "no output before the timeout");
        assert!(
            transcript.elapsed < Duration::from_secs(5),
            "timeout of a flooding execution after {:?}",
            transcript.elapsed
        );
        server.run(runner, "true").await.assert_exit(0);
    })
    .await;
}

#[tokio::test]
async fn a_binary_stdin_frame_is_used_or_refused_but_never_stalls() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "read x; echo \"got $x\"", 5, false).await;
        let mut session = server.connect(&url).await;
        session.send_binary(b"binary\n").await;
        let transcript = session.finish().await;
        // Spec §3.3: accept it as raw bytes, or answer with an error and close.
        let used =
            transcript.terminal == Terminal::Exit(0) && transcript.stdout.contains("got binary");
        let refused = matches!(transcript.terminal, Terminal::Error(_));
        assert!(used || refused, "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn executions_on_one_runner_run_concurrently() {
    with_runner(async |server, runner| {
        let url =
            server.execute(runner, "echo ready; read x; echo \"got $x\"", TIME_LIMIT, false).await;
        let mut first = server.connect(&url).await;
        first.wait_for_stdout("ready").await;
        // CodeOcean may score while a run still waits for input.
        let second = server.run(runner, "echo second").await;
        assert_eq!(second.stdout, "second\r\n", "{second:#?}");
        first.send("done\n").await;
        let first = first.finish().await;
        first.assert_exit(0);
        assert!(first.stdout.contains("got done"), "{first:#?}");
    })
    .await;
}

#[tokio::test]
async fn websocket_url_uses_the_request_host() {
    with_runner(async |server, runner| {
        // Behind a proxy the client's Host is what it can reach (spec §2.11).
        let request = server
            .request(reqwest::Method::POST, &format!("/runners/{runner}/execute"))
            .header("Host", "poseidon.example:7200")
            .body(json!({"command": "true", "timeLimit": 10}).to_string());
        let reply = common::Reply::from(request).await.expect(200, "execute").json();
        let url = reply["websocketUrl"].as_str().unwrap_or_default();
        let expected =
            format!("ws://poseidon.example:7200/api/v1/runners/{runner}/websocket?executionID=");
        assert!(url.starts_with(&expected), "{url}");
    })
    .await;
}

#[tokio::test]
async fn a_client_that_does_not_read_does_not_grow_the_server() {
    with_runner(async |server, runner| {
        let before = server.resident_kib();
        let url = server.execute(runner, "yes flood", 3, false).await;
        let session = server.connect(&url).await;
        // Output queues are bounded: the process blocks instead of the server buffering.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let grown = server.resident_kib().saturating_sub(before);
        assert!(grown < 64 * 1024, "server grew by {grown} KiB while the client did not read");
        let transcript = session.finish().await;
        assert_eq!(transcript.terminal, Terminal::Timeout, "frames: {}", transcript.frames.len());
    })
    .await;
}

#[tokio::test]
async fn execute_accepts_a_body_without_time_limit_and_flag() {
    with_runner(async |server, runner| {
        // Go decodes missing fields as zero values: no time limit, unprivileged.
        let url = server.execute_body(runner, &json!({"command": "id -u"})).await;
        let transcript = server.run_ws(&url, &[]).await;
        assert_eq!(transcript.stdout, format!("{USER_UID}\r\n"), "{transcript:#?}");
    })
    .await;
}

#[tokio::test]
async fn deleting_the_environment_ends_its_running_executions() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "echo ready; sleep 100", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        server.delete("/execution-environments/1").await.expect_empty(204, "DELETE environment");
        let transcript = session.finish().await;
        assert!(matches!(transcript.terminal, Terminal::Error(_)), "{transcript:#?}");
        server.list_files(runner, &[]).await.expect(410, "runner of the deleted environment");
    })
    .await;
}

#[tokio::test]
async fn stored_executions_that_are_never_connected_expire() {
    let options = ServerOptions { stored_execution_ttl: Some(1), ..ServerOptions::default() };
    with_server(options, async |server| {
        server.create_env(1, 1).await;
        let runner = server.claim(1, 60).await;
        let url = server.execute(&runner, "true", TIME_LIMIT, false).await;
        // Go keeps them forever (spec §13.2); a bounded TTL frees them.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(WsSession::connect(&url, None).await.err(), Some(404), "expired execution");
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_output_arrives_as_replacement_characters() {
    with_runner(async |server, runner| {
        // Text frames must be valid UTF-8 or the client's driver closes with 1007 (client §2).
        let transcript = server.run(runner, r#"printf "a\xffb""#).await;
        transcript.assert_exit(0);
        assert_eq!(transcript.stdout, "a\u{FFFD}b", "{transcript:#?}");
        let stderr = server.run(runner, r#"printf "c\xfed" >&2"#).await;
        assert_eq!(stderr.stderr, "c\u{FFFD}d", "{stderr:#?}");
    })
    .await;
}

#[tokio::test]
async fn a_truncated_character_at_the_end_is_not_lost() {
    with_runner(async |server, runner| {
        // The first two bytes of 😀: carried over, then flushed when the output ends.
        let transcript = server.run(runner, r#"printf "x\xf0\x9f""#).await;
        transcript.assert_exit(0);
        let rest = transcript.stdout.strip_prefix('x').unwrap_or_default();
        assert!(
            !rest.is_empty() && rest.chars().all(|character| character == '\u{FFFD}'),
            "{transcript:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn client_close_is_honoured_while_stdin_is_backed_up() {
    with_runner(async |server, runner| {
        let url = server.execute(runner, "echo ready; exec sleep 2345", TIME_LIMIT, false).await;
        let mut session = server.connect(&url).await;
        session.wait_for_stdout("ready").await;
        // The process never reads: stdin fills the terminal and the server's bounded queue.
        let line = format!("{}\n", "x".repeat(1000));
        for _ in 0..200 {
            session.send(&line).await;
        }
        let closing = Instant::now();
        let transcript = session.close().await;
        assert_eq!(transcript.close_code, Some(NORMAL_CLOSURE), "{transcript:#?}");
        assert!(closing.elapsed() < Duration::from_secs(3), "close took {:?}", closing.elapsed());
        let stopped = eventually(Duration::from_secs(3), async || {
            !server.run(runner, "ps ax").await.stdout.contains("sleep 2345")
        })
        .await;
        assert!(stopped, "`sleep 2345` still runs after the client closed");
    })
    .await;
}
