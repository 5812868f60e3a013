//! The argv sent to `alloc exec` (spec §4): Nomad's variables removed, the request's variables
//! set, the unprivileged `user` through `/sbin/setuser`, and the user's command run by
//! `bash -c` exactly as given. Unlike Go, every layer is single-quoted, so variable values,
//! newlines and control characters arrive unchanged and nothing is expanded twice.

use poseidon_core::backend::ExecRequest;

/// Ticks of 10 ms a stderr reader waits for its fifo before giving up.
const FIFO_WAIT_TICKS: u32 = 1000;

/// `value` as one single-quoted shell word.
pub(crate) fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The user's command with its variables: `env -- 'K=V' … /bin/bash -c '<command>'`.
fn user_command(request: &ExecRequest) -> String {
    let variables: Vec<String> =
        request.env.iter().map(|(key, value)| quote(&format!("{key}={value}"))).collect();
    format!("env -- {} /bin/bash -c {}", variables.join(" "), quote(&request.command))
}

/// Runs `command` as `user` unless privileged: through phusion's `/sbin/setuser` as Go does
/// (CodeOcean's images have it), else through util-linux's `setpriv` (plain images). Replaces
/// the calling shell unless that shell still has work to do afterwards (`then`).
fn as_user(command: &str, privileged: bool, then: Then) -> String {
    if privileged {
        return command.to_owned();
    }
    let command = quote(command);
    let exec = match then {
        Then::Exit => "exec ",
        Then::Continue => "",
    };
    format!(
        "if [ -x /sbin/setuser ]; then {exec}/sbin/setuser user /bin/bash -c {command}; \
         else {exec}setpriv --reuid=user --regid=user --clear-groups /bin/bash -c {command}; fi"
    )
}

/// Whether the shell around [`as_user`] ends with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Exit,
    Continue,
}

/// The outermost layer: Nomad's own variables are not the learner's business.
fn argv(command: &str) -> Vec<String> {
    vec!["/bin/bash".into(), "-c".into(), format!("unset ${{!NOMAD_@}}; {command}")]
}

/// The outermost layer of an execution: its process id is kept in `pid_file` while it runs, so
/// that a stop can kill its process group from a second exec. Nomad has no way to kill an exec
/// session's processes, and a `^\` on the terminal cannot pass a full input queue.
fn tracked_argv(command: &str, pid_file: &str) -> Vec<String> {
    let pid_file = quote(pid_file);
    argv(&format!("echo $$ > {pid_file}; {command}; ec=$?; rm -f {pid_file}; exit $ec"))
}

/// Kills the process group (and the process) recorded in `pid_file`, as root.
pub(crate) fn kill(pid_file: &str) -> Vec<String> {
    let pid_file = quote(pid_file);
    argv(&format!(
        "if [ -f {pid_file} ]; then pid=$(cat {pid_file}); kill -KILL -- -\"$pid\" \"$pid\" \
         2>/dev/null; rm -f {pid_file}; fi; true"
    ))
}

/// One exec running the request (stderr merged into the terminal when `tty` is set).
pub(crate) fn single(request: &ExecRequest, pid_file: &str) -> Vec<String> {
    tracked_argv(&as_user(&user_command(request), request.privileged, Then::Continue), pid_file)
}

/// The two execs of an interactive execution with stderr kept apart (spec §4.3): the main exec
/// creates `fifo` and sends the command's stderr into it, the reader exec copies the fifo to
/// its own output. Improvements over Go: the main side creates the fifo, so it never waits for
/// a reader that failed to start beyond what the service bounds, falls back to a merged stderr
/// when the fifo cannot be made, and removes the fifo itself; the reader gives up after 10 s.
/// The main side ends with the command's status rather than `exit`, so that the tracking
/// layer (which runs it inline when privileged) still removes its pid file.
pub(crate) fn split_stderr(
    request: &ExecRequest,
    fifo: &str,
    pid_file: &str,
) -> (Vec<String>, Vec<String>) {
    let fifo = quote(fifo);
    let user = user_command(request);
    let main = format!(
        "if mkfifo -m 600 {fifo} 2>/dev/null; then ({user}) 2> {fifo}; ec=$?; rm -f {fifo}; \
         (exit $ec); else {user}; fi"
    );
    let reader = format!(
        "for _ in $(seq {FIFO_WAIT_TICKS}); do if [ -p {fifo} ]; then exec cat {fifo}; fi; \
         sleep 0.01; done"
    );
    (
        tracked_argv(&as_user(&main, request.privileged, Then::Continue), pid_file),
        argv(&as_user(&reader, request.privileged, Then::Exit)),
    )
}

/// An internal command (file operations): `command` is already a shell script.
pub(crate) fn internal(script: &str, privileged: bool) -> Vec<String> {
    argv(&as_user(script, privileged, Then::Exit))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn request(command: &str, env: &[(&str, &str)], privileged: bool) -> ExecRequest {
        ExecRequest {
            command: command.into(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            privileged,
            tty: true,
            separate_stderr: true,
        }
    }

    /// A pid file in a directory of its own, removed with the returned guard.
    fn pid_file(name: &str) -> (tempfile::TempDir, String) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(format!("{name}.pid")).display().to_string();
        (directory, path)
    }

    /// Runs an argv built for the privileged case with the host's bash.
    fn run(argv: &[String]) -> (String, i32) {
        let output = Command::new(&argv[0]).args(&argv[1..]).output().expect("bash runs");
        (String::from_utf8_lossy(&output.stdout).into_owned(), output.status.code().unwrap_or(-1))
    }

    fn single_for_test(request: &ExecRequest) -> (tempfile::TempDir, Vec<String>) {
        let (directory, pid_file) = pid_file("single");
        (directory, single(request, &pid_file))
    }

    #[test]
    fn quoting_keeps_every_byte() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        let tricky = "echo \"$HOME\" '`x`' $(id) \\ \u{fc}\nprintf 'two\\tlines'";
        let (_directory, argv) = single_for_test(&request(
            &format!("printf '%s' {}", quote(tricky)),
            &[("A", "x y $B")],
            true,
        ));
        let (out, code) = run(&argv);
        assert_eq!((out.as_str(), code), (tricky, 0));
    }

    #[test]
    fn variables_arrive_verbatim_and_nomad_ones_are_removed() {
        let (_directory, argv) = single_for_test(&request(
            "printf '%s|%s' \"$A\" \"${NOMAD_X-unset}\"",
            &[("A", "a b'$c")],
            true,
        ));
        let output =
            Command::new(&argv[0]).args(&argv[1..]).env("NOMAD_X", "secret").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "a b'$c|unset");
    }

    #[test]
    fn exit_codes_propagate_and_unprivileged_commands_use_setuser() {
        let (_directory, argv) = single_for_test(&request("exit 3", &[], true));
        assert_eq!(run(&argv).1, 3);
        let (_directory, argv) = single_for_test(&request("id", &[], false));
        assert!(argv[2].contains("then /sbin/setuser user /bin/bash -c "));
        assert!(argv[2].contains("else setpriv --reuid=user --regid=user"));
        assert!(internal("ls", false)[2].contains("then exec /sbin/setuser user"));
    }

    #[test]
    fn split_stderr_delivers_stderr_through_the_fifo_and_removes_it() {
        let (directory, pid_file) = pid_file("split");
        let fifo = directory.path().join("stderr.fifo").display().to_string();
        let (main, reader) =
            split_stderr(&request("echo out; echo err >&2; exit 4", &[], true), &fifo, &pid_file);
        let reader = std::thread::spawn(move || run(&reader));
        let (out, code) = run(&main);
        let (err, _) = reader.join().unwrap();
        assert_eq!((out.as_str(), code, err.as_str()), ("out\n", 4, "err\n"));
        assert!(!std::path::Path::new(&fifo).exists());
        assert!(!std::path::Path::new(&pid_file).exists(), "the pid file is removed");
    }

    #[test]
    fn a_stop_kills_the_whole_process_group_and_the_pid_file_goes() {
        use std::os::unix::process::CommandExt;
        let (_directory, pid_file) = pid_file("kill");
        let argv = single(&request("sleep 1000 & sleep 1000", &[], true), &pid_file);
        let mut child = Command::new(&argv[0]).args(&argv[1..]).process_group(0).spawn().unwrap();
        let started = std::time::Instant::now();
        while !std::path::Path::new(&pid_file).exists() {
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "no pid file");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(run(&kill(&pid_file)).1, 0);
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(!std::path::Path::new(&pid_file).exists());
        assert_eq!(run(&kill(&pid_file)).1, 0, "killing twice is harmless");
        let (_, code) = run(&single(&request("exit 5", &[], true), &pid_file));
        assert_eq!(code, 5);
        assert!(!std::path::Path::new(&pid_file).exists(), "removed after a normal end");
    }
}
