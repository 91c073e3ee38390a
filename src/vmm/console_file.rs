//! Opening `--console FILE`: a regular file, created or truncated, or `/dev/null` (the null
//! device, to discard the console). Anything else (a FIFO, another device node, a socket, a
//! directory, a symbolic link) is refused, as `--map-out` refuses it.
//!
//! The path's type is checked before the open (so that no other device is even opened), and
//! again on the open descriptor (so that nothing swapped in between is used). The open itself
//! has `O_NONBLOCK`, `O_NOFOLLOW` and `O_NOCTTY`: a FIFO nobody reads cannot hang it (it fails
//! with `ENXIO`), a link is never followed, and a terminal never becomes ours.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The null device's numbers (`/dev/null` is character device 1:3 on Linux).
const NULL_DEVICE: (u32, u32) = (1, 3);

/// Opens `path` for the guest console, or says why not.
pub fn open(path: &Path) -> io::Result<File> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => refuse_unless_fit(&meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => refused("a FIFO (with no reader)"),
            Some(libc::ELOOP) => refused("a symbolic link"),
            _ => e,
        })?;
    let meta = file.metadata()?;
    refuse_unless_fit(&meta)?;
    if meta.file_type().is_file() {
        file.set_len(0)?;
    }
    Ok(file)
}

/// A regular file or the null device; anything else is refused, named.
fn refuse_unless_fit(meta: &Metadata) -> io::Result<()> {
    let t = meta.file_type();
    let rdev = meta.rdev();
    let null = t.is_char_device() && (libc::major(rdev), libc::minor(rdev)) == NULL_DEVICE;
    if t.is_file() || null {
        return Ok(());
    }
    Err(refused(if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a device node"
    }))
}

fn refused(kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{kind}, not a regular file: refused (use a file, /dev/null, or - for stderr)"),
    )
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
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
    }

    #[test]
    fn the_null_device_is_taken_and_other_devices_are_not() {
        open(Path::new("/dev/null"))
            .unwrap()
            .write_all(b"gone")
            .unwrap();
        let e = open(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("a device node"), "{e}");
    }
}
