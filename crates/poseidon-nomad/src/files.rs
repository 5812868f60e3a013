//! File operations as shell commands inside the runner (spec §5): a tar archive on stdin for
//! uploads, `ls -l` output parsed into entries for listings and before downloads. Every path
//! is single-quoted and passed after `--`, so no path is ever interpreted by a shell or as an
//! option.

use poseidon_core::backend::{FileCopy, FileEntry, FileUpdate};

use crate::command::quote;

/// The delete and extract script of a `PATCH …/files` (run as root, tar on stdin). It reads
/// stdin to its end even when tar stops at the archive's end marker, so that it never ends
/// before Nomad has read every frame we sent.
pub(crate) fn update_script(update: &FileUpdate) -> String {
    let mut script = String::new();
    if !update.delete.is_empty() {
        let paths: Vec<String> = update
            .delete
            .iter()
            .map(|path| match path.as_str() {
                // CodeOcean's "everything in the workspace": a glob on purpose.
                "./*" => "./*".to_owned(),
                other => quote(&clean(other)),
            })
            .collect();
        script.push_str(&format!("rm --recursive --force -- {}; ", paths.join(" ")));
    }
    script.push_str(
        "tar --extract --absolute-names --verbose --file=-; ec=$?; cat > /dev/null; exit $ec",
    );
    script
}

/// `ls -l` with epoch times and literal names (spec §5.2).
pub(crate) fn list_script(path: &str, recursive: bool) -> String {
    let recursive = if recursive { " --recursive" } else { "" };
    format!("ls -l --time-style=+%s -1 --literal{recursive} -- {}", quote(path))
}

/// Exit code of [`read_script`] for a path that exists but is no regular file.
pub(crate) const NOT_A_FILE: u8 = 3;

/// Opens the file first (so an unreadable file fails before anything is announced), then
/// prints its size on one line and streams its bytes from the same open file: the size comes
/// before the body, as the download's `Content-Length` needs. Files whose size the kernel
/// reports as 0 (procfs) are counted.
pub(crate) fn read_script(path: &str) -> String {
    let path = quote(path);
    format!(
        "exec 3< {path} || exit 1; [ -f {path} ] || exit {NOT_A_FILE}; \
         size=$(stat -L -c %s -- {path}) || exit 1; \
         if [ \"$size\" = 0 ]; then size=$(wc -c < {path}); fi; \
         printf '%s\\n' \"$size\"; exec cat <&3"
    )
}

/// A GNU tar archive of the copies: directories 01777, files 0744, owned by root, as Go
/// writes them. Hand-written because tar libraries refuse absolute and `..` member names,
/// which Poseidon's API allows (tar runs with `--absolute-names` inside the runner).
pub(crate) fn archive(copies: &[FileCopy], mtime: u64) -> Vec<u8> {
    let mut archive = Vec::new();
    for copy in copies {
        let is_directory = copy.path.ends_with('/');
        let name = clean(&copy.path);
        let (kind, mode, content): (u8, u32, &[u8]) = match is_directory {
            true => (b'5', 0o1777, &[]),
            false => (b'0', 0o744, &copy.content),
        };
        if name.len() >= 100 {
            let mut long = name.as_bytes().to_vec();
            long.push(0);
            append_entry(&mut archive, "././@LongLink", b'L', 0o644, &long, mtime);
        }
        append_entry(&mut archive, &name, kind, mode, content, mtime);
    }
    archive.extend_from_slice(&[0; 1024]);
    archive
}

fn append_entry(archive: &mut Vec<u8>, name: &str, kind: u8, mode: u32, data: &[u8], mtime: u64) {
    let mut header = [0u8; 512];
    let name_bytes = name.as_bytes();
    let stored = &name_bytes[..name_bytes.len().min(99)];
    header[..stored.len()].copy_from_slice(stored);
    write_octal(&mut header[100..108], u64::from(mode));
    write_octal(&mut header[108..116], 0);
    write_octal(&mut header[116..124], 0);
    write_octal(&mut header[124..136], data.len() as u64);
    write_octal(&mut header[136..148], mtime);
    header[148..156].copy_from_slice(b"        ");
    header[156] = kind;
    header[257..265].copy_from_slice(b"ustar  \0");
    let checksum: u64 = header.iter().map(|byte| u64::from(*byte)).sum();
    write_octal(&mut header[148..155], checksum);
    archive.extend_from_slice(&header);
    archive.extend_from_slice(data);
    let padding = (512 - data.len() % 512) % 512;
    archive.extend(std::iter::repeat_n(0, padding));
}

/// Zero-padded octal, NUL-terminated, filling `field`.
fn write_octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}", width = field.len() - 1);
    let digits = &digits.as_bytes()[digits.len() - (field.len() - 1)..];
    field[..digits.len()].copy_from_slice(digits);
    field[field.len() - 1] = 0;
}

/// Go's `path.Clean`: `test/` → `test`, `a/../b` → `b`, `./x` → `x`; `/..` stays at the root,
/// a relative `..` is kept.
pub(crate) fn clean(path: &str) -> String {
    path_clean::clean(path).to_string_lossy().into_owned()
}

/// The entries of `ls -l` output: section headers (`dir:`) set the prefix of the following
/// names; lines that are no entries (`total`, blank, devices) are skipped.
pub(crate) fn parse_listing(output: &str) -> Vec<FileEntry> {
    let mut prefix = String::new();
    let mut entries = Vec::new();
    for line in output.lines() {
        if let Some(directory) = line.strip_suffix(':').filter(|_| parse_entry(line).is_none()) {
            prefix = match directory.ends_with('/') {
                true => directory.to_owned(),
                false => format!("{directory}/"),
            };
            continue;
        }
        if let Some(mut entry) = parse_entry(line) {
            entry.name = format!("{prefix}{}", entry.name);
            entries.push(entry);
        }
    }
    entries
}

/// One `ls -l --time-style=+%s` line:
/// `<type><9 permissions>[+] <links> <owner> <group> <size> <mtime> <name>[ -> <target>]`.
fn parse_entry(line: &str) -> Option<FileEntry> {
    let mut fields = Fields(line);
    let mode = fields.next()?;
    let mut characters = mode.chars();
    let entry_type = characters.next().filter(|c| "-aAbcCdDlMnpPsw?".contains(*c))?;
    let permissions: String = characters.collect();
    let bare = permissions.strip_suffix('+').unwrap_or(&permissions);
    if bare.chars().count() != 9 || !bare.chars().all(|c| "-rwxXsStT".contains(c)) {
        return None;
    }
    fields.next()?.parse::<u64>().ok()?;
    let owner = fields.next()?.to_owned();
    let group = fields.next()?.to_owned();
    let size = fields.next()?.parse().ok()?;
    let modification_time = fields.next()?.parse().ok()?;
    let rest = fields.rest()?;
    let (name, link_target) = match (entry_type, rest.split_once(" -> ")) {
        ('l', Some((name, target))) => (name.to_owned(), Some(target.to_owned())),
        _ => (rest.to_owned(), None),
    };
    Some(FileEntry {
        name,
        entry_type,
        link_target,
        size,
        modification_time,
        permissions,
        owner,
        group,
    })
}

/// Space-separated fields, then the rest of the line after exactly one separator.
struct Fields<'a>(&'a str);

impl<'a> Fields<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let trimmed = self.0.trim_start_matches(' ');
        let end = trimmed.find(' ')?;
        let (field, rest) = trimmed.split_at(end);
        self.0 = rest;
        Some(field)
    }

    fn rest(&self) -> Option<&'a str> {
        let rest = self.0.strip_prefix(' ')?;
        (!rest.is_empty()).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use bytes::Bytes;

    use super::*;

    #[test]
    fn the_read_script_announces_the_size_and_refuses_what_it_cannot_stream() {
        let directory = std::env::temp_dir().join(format!("poseidon-read-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let file = directory.join("it's a file");
        std::fs::write(&file, b"hello").unwrap();
        let run = |path: &std::path::Path| {
            let output = Command::new("bash")
                .arg("-c")
                .arg(read_script(&path.display().to_string()))
                .output()
                .unwrap();
            (String::from_utf8_lossy(&output.stdout).into_owned(), output.status.code().unwrap())
        };
        assert_eq!(run(&file), ("5\nhello".to_owned(), 0));
        assert_eq!(run(&directory), (String::new(), i32::from(NOT_A_FILE)));
        assert_eq!(run(&directory.join("missing")).1, 1);
        let (output, code) = run(std::path::Path::new("/proc/self/status"));
        let (size, body) = output.split_once('\n').unwrap();
        assert!(code == 0 && size.parse::<usize>().unwrap() > 0 && !body.is_empty());
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn paths_are_cleaned_like_go() {
        for (path, clean_path) in [
            ("test/", "test"),
            ("a/../b", "b"),
            ("./x", "x"),
            ("/abs/./y/", "/abs/y"),
            ("../x", "../x"),
            ("/../x", "/x"),
            ("", "."),
        ] {
            assert_eq!(clean(path), clean_path, "{path}");
        }
    }

    #[test]
    fn delete_paths_are_quoted_except_the_workspace_glob() {
        let update = FileUpdate {
            delete: vec!["./*".into(), "it's/$(id)".into(), "-rf".into()],
            copy: Vec::new(),
        };
        assert_eq!(
            update_script(&update),
            "rm --recursive --force -- ./* 'it'\\''s/$(id)' '-rf'; \
             tar --extract --absolute-names --verbose --file=-; ec=$?; cat > /dev/null; exit $ec"
        );
    }

    #[test]
    fn listings_parse_sections_links_and_skip_other_lines() {
        let output = "./:\ntotal 8\n-rwxr--r-- 1 root root 5 1660763446 test.txt\n\
            drwxrwxrwt 2 root root 4096 1660763446 dir with space\n\n./dir with space:\n\
            lrwxrwxrwx 1 user user 10 1660763446 link -> /workspace\n\
            crw-rw-rw- 1 root root 1, 3 1660763446 null\n";
        let entries = parse_listing(output);
        let names: Vec<_> = entries.iter().map(|entry| entry.name.as_str()).collect();
        assert_eq!(names, ["./test.txt", "./dir with space", "./dir with space/link"]);
        assert_eq!(entries[0].permissions, "rwxr--r--");
        assert_eq!((entries[0].size, entries[0].modification_time), (5, 1660763446));
        assert_eq!(entries[1].entry_type, 'd');
        assert_eq!(entries[2].link_target.as_deref(), Some("/workspace"));
        assert_eq!(parse_listing("lrwxrwxrwx 1 a b 0 1 /proc/1/cwd\n")[0].link_target, None);
    }

    /// The archive extracts with GNU tar into what Go's would: modes, types, long names.
    #[test]
    fn archives_extract_with_gnu_tar() {
        let directory = std::env::temp_dir().join(format!("poseidon-tar-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let long = format!("sub/{}", "n".repeat(150));
        let copies = vec![
            FileCopy { path: "sub/".into(), content: Bytes::new() },
            FileCopy { path: "sub/file.txt".into(), content: Bytes::from_static(b"hello") },
            FileCopy { path: long.clone(), content: Bytes::from(vec![b'x'; 1000]) },
        ];
        let tarball = directory.join("a.tar");
        std::fs::write(&tarball, archive(&copies, 0)).unwrap();
        let extract = Command::new("tar")
            .args(["--extract", "--file"])
            .arg(&tarball)
            .arg("-C")
            .arg(&directory)
            .status()
            .expect("GNU tar is installed");
        assert!(extract.success());
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &str| {
            std::fs::metadata(directory.join(path)).unwrap().permissions().mode() & 0o7777
        };
        assert_eq!(std::fs::read(directory.join("sub/file.txt")).unwrap(), b"hello");
        assert_eq!(mode("sub/file.txt"), 0o744);
        assert_eq!(mode("sub"), 0o1777);
        assert_eq!(std::fs::read(directory.join(&long)).unwrap().len(), 1000);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
