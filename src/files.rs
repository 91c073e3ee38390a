//! Files memvisor writes or reads on a user's behalf (the PMP-MMP map, the plot, a run's JSON), made
//! safe against whatever a path names.
//!
//! # Writing
//!
//! [`write_atomic`] never writes through the target's name. A target that exists and is not a
//! regular file (a symbolic link, device node, FIFO, socket or directory) is refused, and so is a
//! target whose directory is missing. The data goes to a new file with no name (`O_TMPFILE`) in
//! the target's directory; once it is whole, the file is linked in under a fresh hidden name
//! (`.NAME.XXXXXX.tmp`) and renamed over the target. Readers never see half a file, two writers to
//! one path both succeed (the last rename wins), and a process killed while writing leaves
//! nothing behind. Where the file system has no `O_TMPFILE`, the file is created exclusively
//! under the hidden name instead (a kill mid-write leaves it behind). Either way each write first
//! removes stale hidden files of that pattern for that target: regular files of our user whose
//! last change is older than [`STALE_AFTER`] (a live writer's file is younger, or has no name).
//!
//! [`check_target`] runs the same checks and creates (and drops) a file in the directory, so a run
//! can fail before its guest starts.
//!
//! # Reading
//!
//! [`open_regular`] opens only regular files: a FIFO (which would block until a writer comes),
//! a device node or a directory is refused, and the open itself cannot block (`O_NONBLOCK`).

use std::ffi::{CString, OsString};
use std::fs::{File, FileType, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;

/// A hidden temporary file of ours is stale when it has not changed for this long.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// Random characters in a hidden temporary file's name.
const RANDOM_CHARS: usize = 6;
/// Names tried before giving up on linking the new file in.
const LINK_ATTEMPTS: usize = 16;

/// Why a file cannot be written or read.
#[derive(Debug, Error)]
pub enum FileError {
    /// The path cannot take the file (not a regular file, no directory...), or cannot be read as
    /// one (not a regular file).
    #[error("{}: {reason}", path.display())]
    BadTarget { path: PathBuf, reason: String },
    /// A system call on the path failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    fn io(path: &Path, what: impl Into<String>, source: std::io::Error) -> Self {
        FileError::Io {
            path: path.to_owned(),
            what: what.into(),
            source,
        }
    }

    fn bad(path: &Path, reason: impl Into<String>) -> Self {
        FileError::BadTarget {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What a file type is, for messages.
pub fn kind(t: FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

/// Checks that a file can be written at `path` by [`write_atomic`]: it does not exist or is a
/// regular file, its directory exists, and a file can be created there (one is, and dropped).
pub fn check_target(path: &Path) -> Result<(), FileError> {
    let dir = target_dir(path)?;
    NewFile::create(path, &dir).map(drop)
}

/// Writes a file at `path` with `write`, which gets the new file (see the module docs). A target
/// that exists and is not a regular file is refused and left alone.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), FileError> {
    let dir = target_dir(path)?;
    remove_stale(path, &dir);
    let mut new = NewFile::create(path, &dir)?;
    write(new.file()).map_err(|e| FileError::io(path, "writing it", e))?;
    new.file()
        .flush()
        .map_err(|e| FileError::io(path, "writing it", e))?;
    new.persist(path, &dir)
}

/// Creates (or truncates) a regular file at `path` to be written as it goes, for a log that a
/// reader may follow while it grows (the host's `--csv`). The same checks as [`write_atomic`] on
/// the target and its directory; the open itself follows no symbolic link (`O_NOFOLLOW`) and
/// cannot block (`O_NONBLOCK`), and what it opened must be a regular file, so a path swapped for
/// a link, FIFO or device after the checks is still refused.
pub fn create_stream(path: &Path) -> Result<File, FileError> {
    target_dir(path)?;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FileError::io(path, "creating it", e))?;
    let meta = f
        .metadata()
        .map_err(|e| FileError::io(path, "creating it", e))?;
    if !meta.is_file() {
        return Err(FileError::bad(
            path,
            format!(
                "is {}, not a regular file: refusing to write it",
                kind(meta.file_type())
            ),
        ));
    }
    Ok(f)
}

/// Opens `path` for reading if it is a regular file (through symbolic links); anything else is
/// refused without blocking.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let not_regular = |t: FileType| {
        FileError::bad(
            path,
            format!("is {}, not a regular file: refusing to read it", kind(t)),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| FileError::io(path, "opening it", e))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    // O_NONBLOCK: should the path be swapped for a FIFO in between, the open cannot block.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FileError::io(path, "opening it", e))?;
    let meta = f
        .metadata()
        .map_err(|e| FileError::io(path, "opening it", e))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok(f)
}

/// The directory `path` would be written in, after the checks on `path` itself.
fn target_dir(path: &Path) -> Result<PathBuf, FileError> {
    if path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err(FileError::bad(path, "does not name a file"));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => {
            return Err(FileError::bad(
                path,
                format!(
                    "exists and is {}, not a regular file: refusing to replace it",
                    kind(m.file_type())
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FileError::io(path, "checking it", e)),
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(FileError::bad(
            path,
            format!("{} is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FileError::bad(
            path,
            format!("directory {} does not exist", dir.display()),
        )),
        Err(e) => Err(FileError::io(
            path,
            format!("checking directory {}", dir.display()),
            e,
        )),
    }
}

/// The hidden name prefix of `path`'s temporary files: `.NAME.`.
fn hidden_prefix(path: &Path) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    prefix
}

/// Whether `name` is one of our temporary names for `path`: `.NAME.XXXXXX.tmp`.
fn is_our_temp(name: &[u8], prefix: &[u8]) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(b".tmp"))
        .is_some_and(|r| r.len() == RANDOM_CHARS && r.iter().all(u8::is_ascii_alphanumeric))
}

/// A fresh hidden name for `path` in `dir`.
fn hidden_name(path: &Path, dir: &Path) -> PathBuf {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x: u64 = rand::random();
    let mut name = hidden_prefix(path);
    let mut random = String::with_capacity(RANDOM_CHARS);
    for _ in 0..RANDOM_CHARS {
        random.push(char::from(CHARS[(x % CHARS.len() as u64) as usize]));
        x /= CHARS.len() as u64;
    }
    name.push(random);
    name.push(".tmp");
    dir.join(name)
}

/// Removes stale hidden temporary files of `path` in `dir` (see the module docs). Best effort:
/// what cannot be listed or removed stays.
fn remove_stale(path: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = hidden_prefix(path);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let name = e.file_name();
        if !is_our_temp(name.as_bytes(), prefix.as_bytes()) {
            continue;
        }
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let stale = m
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if m.file_type().is_file() && m.uid() == uid && stale {
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!("removed a stale temporary file {}", p.display()),
                Err(err) => log::debug!("cannot remove {}: {err}", p.display()),
            }
        }
    }
}

/// The file being written: unnamed (`O_TMPFILE`) or under a hidden name.
enum NewFile {
    Unnamed(File),
    Named(tempfile::NamedTempFile),
}

impl NewFile {
    /// A new file in `dir` for `path`, mode 0666 less the umask as `File::create` gives.
    fn create(path: &Path, dir: &Path) -> Result<NewFile, FileError> {
        let cannot = |e| {
            FileError::io(
                path,
                format!("cannot create a file in {}", dir.display()),
                e,
            )
        };
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| FileError::bad(path, format!("{} holds a NUL byte", dir.display())))?;
        // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
                0o666 as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            return Ok(NewFile::Unnamed(unsafe { File::from_raw_fd(fd) }));
        }
        let e = std::io::Error::last_os_error();
        // Kernels without O_TMPFILE say EISDIR; file systems without it EOPNOTSUPP.
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) {
            return Err(cannot(e));
        }
        tempfile::Builder::new()
            .prefix(&hidden_prefix(path))
            .suffix(".tmp")
            .rand_bytes(RANDOM_CHARS)
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)
            .map(NewFile::Named)
            .map_err(cannot)
    }

    fn file(&mut self) -> &mut File {
        match self {
            NewFile::Unnamed(f) => f,
            NewFile::Named(t) => t.as_file_mut(),
        }
    }

    /// Puts the whole file in place at `path`.
    fn persist(self, path: &Path, dir: &Path) -> Result<(), FileError> {
        let failed = |e| FileError::io(path, "putting it in place", e);
        match self {
            NewFile::Named(t) => t.persist(path).map(drop).map_err(|e| failed(e.error)),
            NewFile::Unnamed(f) => {
                let tmp = link_unnamed(&f, path, dir).map_err(failed)?;
                std::fs::rename(&tmp, path).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    failed(e)
                })
            }
        }
    }
}

/// Links the unnamed file `f` into `dir` under a fresh hidden name for `path`; returns the name.
fn link_unnamed(f: &File, path: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let fd_path = CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    let mut last = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
    for _ in 0..LINK_ATTEMPTS {
        let tmp = hidden_name(path, dir);
        let to = CString::new(tmp.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated paths; linkat only creates a directory entry.
        let mut r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                fd_path.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
            // No /proc: AT_EMPTY_PATH (needs CAP_DAC_READ_SEARCH).
            // SAFETY: a valid descriptor, an empty path and a valid target path.
            r = unsafe {
                libc::linkat(
                    f.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
        }
        if r == 0 {
            return Ok(tmp);
        }
        last = std::io::Error::last_os_error();
        if last.kind() != std::io::ErrorKind::AlreadyExists {
            break;
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn nothing_named_appears_while_writing_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = d.join("out.bin");
        write_atomic(&out, |f| {
            f.write_all(b"first")?;
            // Mid-write: no new name in the directory (O_TMPFILE on this file system).
            assert!(names(d).is_empty(), "{:?}", names(d));
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"first");
        write_atomic(&out, |f| f.write_all(b"second")).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"second");
        assert_eq!(names(d), ["out.bin"]);
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_ne!(mode & 0o044, 0, "readable beyond the owner: {mode:o}");
        // A failed write leaves the old file and nothing else.
        let e = write_atomic(&out, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"second");
        assert_eq!(names(d), ["out.bin"]);
    }

    #[test]
    fn stale_hidden_files_of_ours_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = SystemTime::now() - STALE_AFTER * 2;
        let plant = |name: &str, age: Option<SystemTime>| {
            let f = File::create(d.join(name)).unwrap();
            if let Some(t) = age {
                f.set_modified(t).unwrap();
            }
        };
        plant(".out.map.Ab3x9Z.tmp", Some(old)); // stale: removed
        plant(".out.map.Zz0000.tmp", None); // fresh (a live writer's): kept
        plant(".out.map.toolong1.tmp", Some(old)); // not our pattern: kept
        plant(".other.map.Ab3x9Z.tmp", Some(old)); // another target's: kept
        plant("out.map.Ab3x9Z.tmp", Some(old)); // not hidden: kept
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join(".out.map.Link00.tmp")).unwrap();
        write_atomic(&d.join("out.map"), |f| f.write_all(b"map")).unwrap();
        assert_eq!(
            names(d),
            [
                ".other.map.Ab3x9Z.tmp",
                ".out.map.Link00.tmp",
                ".out.map.Zz0000.tmp",
                ".out.map.toolong1.tmp",
                "out.map",
                "out.map.Ab3x9Z.tmp",
                "victim"
            ]
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(is_our_temp(b".a.b.c.XYZ123.tmp", b".a.b.c."));
        assert!(!is_our_temp(b".a.XYZ12-.tmp", b".a."));
        let h = hidden_name(Path::new("x/out.map"), Path::new("x"));
        let n = h.file_name().unwrap().as_bytes().to_vec();
        assert!(is_our_temp(&n, b".out.map."), "{}", h.display());
    }

    #[test]
    fn a_stream_is_created_only_as_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("log.csv");
        std::fs::write(&file, b"old text").unwrap();
        let mut f = create_stream(&file).unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"new",
            "truncated, then written"
        );
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.join("link.csv");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = create_stream(&link).unwrap_err().to_string();
        assert!(e.contains("a symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let e = create_stream(d).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let e = create_stream(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a character device"), "{e}");
        let e = create_stream(&d.join("no/such/dir.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fifo = d.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path in our temporary directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
        let e = open_regular(d).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let e = open_regular(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a character device"), "{e}");
        let e = open_regular(&d.join("absent")).unwrap_err().to_string();
        assert!(e.contains("absent") && e.contains("opening it"), "{e}");
        let file = d.join("f");
        std::fs::write(&file, b"x").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            open_regular(&link).is_ok(),
            "a link to a regular file is read"
        );
    }
}
