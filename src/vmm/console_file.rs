//! Opening `--console FILE`: a regular file, created or truncated. Anything else (a FIFO, a
//! device node, a socket, a directory, a symbolic link) is refused, as `--map-out` refuses it.
//!
//! The file is opened with `O_NONBLOCK` and `O_NOFOLLOW` before its type is checked, so that a
//! FIFO nobody reads cannot hang the open (it fails with `ENXIO`) and a link is never followed;
//! the type is then read from the open descriptor, so nothing can be swapped in between.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for the guest console, or says why not.
pub fn open(path: &Path) -> io::Result<File> {
    let refused = |kind: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{kind}, not a regular file: refused (use a file, or - for stderr)"),
        )
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => refused("a FIFO (with no reader)"),
            Some(libc::ELOOP) => refused("a symbolic link"),
            _ => e,
        })?;
    let t = file.metadata()?.file_type();
    if !t.is_file() {
        return Err(refused(if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a device node"
        }));
    }
    file.set_len(0)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::io::Write;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_regular_file_is_created_or_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console");
        open(&p).unwrap().write_all(b"first run, longer").unwrap();
        open(&p).unwrap().write_all(b"second").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second");
    }

    #[test]
    fn fifos_links_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        // No reader: refused at once (a blocking open would hang here).
        let e = open(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        // With a reader: opened, then refused for what it is.
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let e = open(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(!target.exists(), "nothing created through the link");
        let e = open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("directory") || e.raw_os_error() == Some(libc::EISDIR));
    }
}
