//! Images: the read-only lower layer of a runner's root.
//!
//! * `host`: built by [`build_host_image`] at every start. It holds a curated `/etc` and the
//!   symlinks `bin`, `lib`, `lib64`, `sbin` into `usr`; the runner bind-mounts the host's
//!   `/usr` read-only onto it. Nothing else of the host is visible.
//! * directory images: an unpacked root filesystem, used as it is; an OCI image's
//!   `WorkingDir` and `Env` come along ([`Image::with_run_config`]).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::process::WORKDIR;
use crate::runtime::MAPPED_IDS;

/// uid/gid of the unprivileged `user` when an image does not define one.
pub const DEFAULT_USER_ID: u32 = 1001;
/// `/etc/passwd` files larger than this are not read.
const MAX_PASSWD_BYTES: u64 = 1 << 20;
/// How deep a copied `/etc` directory may nest.
const MAX_COPY_DEPTH: usize = 8;

/// A failed image operation, with the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot build the host image at {path}: {source}")]
    Build { path: PathBuf, source: io::Error },
    #[error("image root {path} is not an absolute directory without ',' or ':'")]
    InvalidRoot { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("user {uid}:{gid} of {path} is outside the {MAPPED_IDS} mapped ids")]
    UnmappedUser { path: PathBuf, uid: u32, gid: u32 },
}

/// A runner's root file system image. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Image {
    inner: Arc<ImageInner>,
}

#[derive(Debug)]
struct ImageInner {
    root: PathBuf,
    kind: ImageKind,
    user_uid: u32,
    user_gid: u32,
    /// Where executions start and relative file paths point; [`WORKDIR`] when unset.
    working_dir: Option<String>,
    /// The image's environment, below the request's variables.
    env: Vec<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageKind {
    Host,
    Directory,
}

impl Image {
    pub(crate) fn host(root: PathBuf) -> Image {
        Image::new(root, ImageKind::Host, DEFAULT_USER_ID, DEFAULT_USER_ID)
    }

    /// A directory image; the unprivileged ids come from its `/etc/passwd` entry `user`.
    pub(crate) fn directory(root: &Path) -> Result<Image, ImageError> {
        let valid = root.is_absolute()
            && root.is_dir()
            && root.to_str().is_some_and(|s| !s.contains([',', ':', '\n']));
        if !valid {
            return Err(ImageError::InvalidRoot { path: root.to_owned() });
        }
        let passwd = root.join("etc/passwd");
        let (uid, gid) = read_user_ids(&passwd)?;
        if uid >= MAPPED_IDS || gid >= MAPPED_IDS {
            return Err(ImageError::UnmappedUser { path: passwd, uid, gid });
        }
        Ok(Image::new(root.to_owned(), ImageKind::Directory, uid, gid))
    }

    fn new(root: PathBuf, kind: ImageKind, user_uid: u32, user_gid: u32) -> Image {
        let inner =
            ImageInner { root, kind, user_uid, user_gid, working_dir: None, env: Vec::new() };
        Image { inner: Arc::new(inner) }
    }

    /// The same image with an OCI image's `WorkingDir` (absolute, else ignored) and `Env`
    /// (`KEY=value`; entries without `=` are ignored, like Docker does).
    pub fn with_run_config(self, working_dir: Option<&str>, env: &[String]) -> Image {
        let inner = &self.inner;
        let env = env
            .iter()
            .filter_map(|entry| entry.split_once('='))
            .filter(|(key, value)| !(key.is_empty() || key.contains('\0') || value.contains('\0')))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        let working_dir = working_dir
            .filter(|dir| dir.starts_with('/') && !dir.contains('\0'))
            .map(str::to_owned);
        let inner = ImageInner {
            root: inner.root.clone(),
            kind: inner.kind,
            user_uid: inner.user_uid,
            user_gid: inner.user_gid,
            working_dir,
            env,
        };
        Image { inner: Arc::new(inner) }
    }

    /// Where executions start: the image's `WorkingDir`, else [`WORKDIR`].
    pub fn working_dir(&self) -> &str {
        self.inner.working_dir.as_deref().unwrap_or(WORKDIR)
    }

    /// The image's environment variables (`Env`).
    pub fn env(&self) -> &[(String, String)] {
        &self.inner.env
    }

    /// The directory used as the overlay's lower layer.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Whether this is the built-in `host` image (which needs the host's `/usr`).
    pub fn is_host(&self) -> bool {
        self.inner.kind == ImageKind::Host
    }

    /// uid and gid of the unprivileged `user`, inside the sandbox.
    pub fn user_ids(&self) -> (u32, u32) {
        (self.inner.user_uid, self.inner.user_gid)
    }
}

/// The uid and gid of `user` in a passwd file; the defaults when the file or entry is absent.
/// An image's `/etc/passwd` that is a symlink or not a regular file (a FIFO would block the
/// read) counts as absent.
fn read_user_ids(passwd: &Path) -> Result<(u32, u32), ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(passwd)
        .and_then(|file| match file.metadata()?.is_file() {
            true => Ok(file),
            false => Err(io::ErrorKind::NotFound.into()),
        });
    let text = match opened {
        Ok(file) => {
            let mut text = String::new();
            file.take(MAX_PASSWD_BYTES)
                .read_to_string(&mut text)
                .map_err(|source| ImageError::Read { path: passwd.to_owned(), source })?;
            text
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            String::new()
        }
        Err(source) => {
            return Err(ImageError::Read { path: passwd.to_owned(), source });
        }
    };
    Ok(parse_user_ids(&text).unwrap_or((DEFAULT_USER_ID, DEFAULT_USER_ID)))
}

fn parse_user_ids(passwd: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != "user" {
            return None;
        }
        let uid = fields.nth(1)?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

const PASSWD: &str = "root:x:0:0:root:/workspace:/bin/bash\n\
user:x:1001:1001:user:/workspace:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nuser:x:1001:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
networks: files\nprotocols: files\nservices: files\n";

/// Entries of the host's `/etc` the runtimes need (java: `alternatives`,
/// `java-17-openjdk`; TLS: `ssl/certs`, `ca-certificates`; the dynamic linker: `ld.so.*`).
/// Nothing that holds secrets (`shadow`, `ssl/private`, ...) is listed.
const COPIED_FROM_HOST_ETC: &[&str] = &[
    "resolv.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "java-17-openjdk",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "mime.types",
    "bash.bashrc",
    "profile",
    "inputrc",
    "os-release",
    "debian_version",
    "protocols",
    "services",
];

/// Builds the `host` image below `images_dir` and returns its root. Idempotent: the image is
/// built next to the old one and then swapped in, so a crash leaves no half-built image in use.
pub fn build_host_image(images_dir: &Path, host_etc: &Path) -> Result<PathBuf, ImageError> {
    let target = images_dir.join("host");
    let staging = images_dir.join("host.new");
    let build = |path: &Path| {
        let error = |source| ImageError::Build { path: path.to_owned(), source };
        remove_if_exists(&staging).map_err(error)?;
        populate_host_image(&staging, host_etc).map_err(error)?;
        remove_if_exists(&target).map_err(error)?;
        fs::rename(&staging, &target).map_err(error)
    };
    build(&target)?;
    Ok(target)
}

fn populate_host_image(root: &Path, host_etc: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).recursive(true).create(root)?;
    for (link, target) in
        [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")]
    {
        symlink(target, root.join(link))?;
    }
    let etc = root.join("etc");
    fs::DirBuilder::new().mode(0o755).create(&etc)?;
    for (name, content) in [
        ("passwd", PASSWD),
        ("group", GROUP),
        ("hosts", HOSTS),
        ("hostname", "sandbox\n"),
        ("nsswitch.conf", NSSWITCH),
    ] {
        write_public(&etc.join(name), content)?;
    }
    for name in COPIED_FROM_HOST_ETC {
        copy_entry(&host_etc.join(name), &etc.join(name), 0)?;
    }
    for entry in fs::read_dir(host_etc)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("python3") {
            copy_entry(&entry.path(), &etc.join(entry.file_name()), 0)?;
        }
    }
    Ok(())
}

fn write_public(path: &Path, content: &str) -> io::Result<()> {
    fs::write(path, content)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
}

/// Copies a regular file, a symlink (as a link, never followed) or a directory of those.
/// Anything else, and a missing source, is skipped.
fn copy_entry(src: &Path, dst: &Path, depth: usize) -> io::Result<()> {
    let meta = match fs::symlink_metadata(src) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(parent) = dst.parent() {
        fs::DirBuilder::new().mode(0o755).recursive(true).create(parent)?;
    }
    let kind = meta.file_type();
    if kind.is_symlink() {
        symlink(fs::read_link(src)?, dst)
    } else if kind.is_file() {
        fs::copy(src, dst)?;
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode() & 0o755))
    } else if kind.is_dir() && depth < MAX_COPY_DEPTH {
        fs::DirBuilder::new().mode(0o755).create(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_entry(&entry.path(), &dst.join(entry.file_name()), depth + 1)?;
        }
        Ok(())
    } else {
        Ok(())
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_come_from_passwd_or_default() {
        assert_eq!(
            parse_user_ids("root:x:0:0::/:/bin/sh\nuser:x:2000:3000::/w:/bin/sh\n"),
            Some((2000, 3000))
        );
        assert_eq!(parse_user_ids("root:x:0:0::/:/bin/sh\n"), None);
        assert_eq!(parse_user_ids("user:x:oops:1:"), None);
    }

    #[test]
    fn a_passwd_that_is_a_fifo_or_a_symlink_counts_as_absent() {
        let root = tempfile::tempdir().unwrap();
        let passwd = root.path().join("passwd");
        nix::unistd::mkfifo(&passwd, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert_eq!(read_user_ids(&passwd).unwrap(), (DEFAULT_USER_ID, DEFAULT_USER_ID));
        fs::remove_file(&passwd).unwrap();
        let real = root.path().join("real");
        fs::write(&real, "user:x:2000:2000::/:/bin/sh\n").unwrap();
        symlink(&real, &passwd).unwrap();
        assert_eq!(read_user_ids(&passwd).unwrap(), (DEFAULT_USER_ID, DEFAULT_USER_ID));
        assert_eq!(read_user_ids(&real).unwrap(), (2000, 2000));
    }

    #[test]
    fn run_config_sets_the_working_directory_and_environment() {
        let image = Image::host(PathBuf::from("/nonexistent"));
        assert_eq!(image.working_dir(), WORKDIR);
        let env = ["PATH=/opt/bin".to_owned(), "NOVALUE".to_owned(), "A=b=c".to_owned()];
        let image = image.with_run_config(Some("/srv/app"), &env);
        assert_eq!(image.working_dir(), "/srv/app");
        assert_eq!(
            image.env(),
            [("PATH".to_owned(), "/opt/bin".to_owned()), ("A".to_owned(), "b=c".to_owned())]
        );
        assert_eq!(image.with_run_config(Some("relative"), &[]).working_dir(), WORKDIR);
    }

    #[test]
    fn host_image_copies_only_listed_entries_without_following_links() {
        let host = tempfile::tempdir().unwrap();
        let etc = host.path();
        fs::write(etc.join("shadow"), "secret").unwrap();
        fs::write(etc.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::create_dir_all(etc.join("ssl/certs")).unwrap();
        fs::create_dir_all(etc.join("ssl/private")).unwrap();
        fs::write(etc.join("ssl/private/key.pem"), "secret").unwrap();
        symlink("/etc/shadow", etc.join("ssl/certs/evil.pem")).unwrap();
        fs::create_dir(etc.join("python3.11")).unwrap();
        fs::write(etc.join("python3.11/sitecustomize.py"), "").unwrap();
        let images = tempfile::tempdir().unwrap();
        let root = build_host_image(images.path(), etc).unwrap();
        let built = root.join("etc");
        assert!(!built.join("shadow").exists());
        assert!(!built.join("ssl/private").exists());
        assert_eq!(
            fs::read_link(built.join("ssl/certs/evil.pem")).unwrap(),
            Path::new("/etc/shadow"),
            "copied as a link, not followed"
        );
        assert!(built.join("python3.11/sitecustomize.py").is_file());
        assert!(fs::read_to_string(built.join("passwd")).unwrap().contains("user:x:1001:1001"));
        assert_eq!(fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
        build_host_image(images.path(), etc).unwrap();
        assert!(!images.path().join("host.new").exists(), "rebuild is idempotent");
    }
}
