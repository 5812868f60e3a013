//! Raw downloads: regular files only, with a length known before the first byte is sent.

use std::fs::File;
use std::io::{self, Cursor, Read};

use super::FilesError;
use super::resolve::{OpenRegularError, Tree, clear_nonblocking, lookup_error};

/// Files that report size 0 (procfs, sysfs and other pseudo files) are read into memory up to
/// this many bytes to learn their real length.
const MAX_UNSIZED_BYTES: u64 = 1 << 20;

/// A download: its exact length and the reader yielding exactly that many bytes.
pub(super) type Download = (u64, Box<dyn Read + Send>);

/// Opens the regular file at `path` (symlinks are followed, inside the runner only).
pub(super) fn open(tree: &Tree<'_>, path: &str) -> Result<Download, FilesError> {
    if path.is_empty() {
        return Err(FilesError::NotFound);
    }
    let (file, stat) = tree.open_regular(&tree.absolute(path)).map_err(|error| match error {
        OpenRegularError::Open(errno) => lookup_error(path, errno),
        OpenRegularError::NotRegular => {
            FilesError::NotAFile(format!("{path:?} is not a regular file"))
        }
    })?;
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size > 0 {
        clear_nonblocking(&file).map_err(|errno| lookup_error(path, errno))?;
        return Ok((size, Box::new(ExactLength::new(file, size))));
    }
    let content =
        read_available(file, MAX_UNSIZED_BYTES).map_err(|source| read_error(path, source))?;
    Ok((content.len() as u64, Box::new(Cursor::new(content))))
}

/// Reads up to `limit` bytes of a non-blocking file; a pseudo file that has nothing more to
/// give right now (`EAGAIN`) has ended, as far as a download is concerned.
fn read_available(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut content = Vec::new();
    match file.take(limit).read_to_end(&mut content) {
        Err(error) if error.kind() != io::ErrorKind::WouldBlock => Err(error),
        _ => Ok(content),
    }
}

/// A read refused by the kernel (procfs checks some files at read time) is what `cat` reports
/// as a failure, i.e. not found or insufficient permissions.
fn read_error(path: &str, source: io::Error) -> FilesError {
    match source.raw_os_error() {
        Some(code) => lookup_error(path, nix::errno::Errno::from_raw(code)),
        None => FilesError::Io { context: format!("reading {path:?}"), source },
    }
}

/// Yields exactly `remaining` bytes: the announced `Content-Length` must hold even if the file
/// changes during the download. A file that grew is cut at the announced size; a file that
/// shrank is padded with zero bytes.
#[derive(Debug)]
pub(super) struct ExactLength<R> {
    inner: R,
    remaining: u64,
    inner_ended: bool,
}

impl<R> ExactLength<R> {
    pub(super) fn new(inner: R, length: u64) -> Self {
        ExactLength { inner, remaining: length, inner_ended: false }
    }
}

impl<R: Read> Read for ExactLength<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wanted = usize::try_from(self.remaining).map_or(buf.len(), |left| left.min(buf.len()));
        if wanted == 0 {
            return Ok(0);
        }
        let produced = if self.inner_ended { 0 } else { self.inner.read(&mut buf[..wanted])? };
        let produced = if produced == 0 {
            self.inner_ended = true;
            buf[..wanted].fill(0);
            wanted
        } else {
            produced
        };
        self.remaining -= produced as u64;
        Ok(produced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(reader: impl Read) -> Vec<u8> {
        let mut out = Vec::new();
        let mut reader = reader;
        reader.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn exact_length_cuts_a_grown_source() {
        assert_eq!(read_all(ExactLength::new(&b"abcdef"[..], 3)), b"abc");
    }

    #[test]
    fn exact_length_pads_a_shrunk_source_with_zeros() {
        assert_eq!(read_all(ExactLength::new(&b"ab"[..], 5)), b"ab\0\0\0");
    }

    #[test]
    fn exact_length_passes_an_unchanged_source_through() {
        assert_eq!(read_all(ExactLength::new(&b"abc"[..], 3)), b"abc");
    }
}
