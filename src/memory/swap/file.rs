//! The swap file: page-sized slots holding guest pages the VMM swapped out.
//!
//! `--swap FILE` creates FILE exclusively (never following a symlink), mode 0600, and removes it
//! when the run ends; `--swap DIR` (an existing directory) uses an unnamed `O_TMPFILE` there, which
//! never outlives the process, not even a SIGKILL. Slots are handed out lowest-free first and
//! reused, so the file grows only to the most pages ever swapped out at once.
//!
//! Errors keep their kind: a full file system or a short write means "stop swapping, keep the page
//! in RAM" ([`SwapFileError::is_full`]); a failed read at page-in cannot be hidden from the guest.
//! Each slot's CRC-32 is kept in memory (4 bytes per slot), so a page read back that is not the
//! page written (the file changed or cut and regrown behind the VMM's back, or a disk that
//! returns bad data) is a read error too ([`SwapFileError::Corrupt`]), never a wrong page.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::units::PAGE_SIZE;

/// One page-sized slot of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u32);

impl Slot {
    fn offset(self) -> u64 {
        u64::from(self.0) * PAGE_SIZE
    }
}

/// What went wrong with the swap file.
#[derive(Debug, Error)]
pub enum SwapFileError {
    #[error("swap file {path}: {why}")]
    Refused { path: PathBuf, why: &'static str },
    #[error("swap file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("swap file: no space left for slot {slot} ({source})")]
    NoSpace { slot: u32, source: io::Error },
    #[error("swap file: short write to slot {slot} ({written} of {PAGE_SIZE} bytes)")]
    ShortWrite { slot: u32, written: usize },
    #[error("swap file: writing slot {slot}: {source}")]
    Write { slot: u32, source: io::Error },
    #[error("swap file: reading slot {slot}: {source}")]
    Read { slot: u32, source: io::Error },
    #[error("swap file: slot {slot} is short ({read} of {PAGE_SIZE} bytes)")]
    ShortRead { slot: u32, read: usize },
    #[error("swap file: all {0} slots are in use")]
    Slots(u32),
    #[error("swap file: slot {slot} does not hold the page written there (checksum mismatch)")]
    Corrupt { slot: u32 },
}

impl SwapFileError {
    /// A write failure that means the file cannot take more pages: stop swapping, keep the page.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            SwapFileError::NoSpace { .. }
                | SwapFileError::ShortWrite { .. }
                | SwapFileError::Write { .. }
                | SwapFileError::Slots(_)
        )
    }
}

/// The swap file and its slot allocator.
pub struct SwapFile {
    file: File,
    /// The named file to remove at the end (`None` for `O_TMPFILE`), with its identity.
    named: Option<(PathBuf, (u64, u64))>,
    /// Slots freed and not reused yet, lowest first.
    free: BinaryHeap<Reverse<u32>>,
    /// Slots ever handed out: the file's length in pages.
    high: u32,
    in_use: u32,
    /// The CRC-32 of the page in each slot ever handed out.
    sums: Vec<u32>,
}

impl SwapFile {
    /// Checks, before anything is created, that [`SwapFile::create`] may use `path`: an existing
    /// directory, or a new name in an existing directory.
    pub fn check(path: &Path) -> Result<(), SwapFileError> {
        let refused = |why| SwapFileError::Refused {
            path: path.to_path_buf(),
            why,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_dir() => Ok(()),
            Ok(m) if m.file_type().is_symlink() => Err(refused("it is a symbolic link")),
            Ok(_) => Err(refused("it exists; swap files are created anew")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                match std::fs::metadata(dir) {
                    Ok(m) if m.is_dir() => Ok(()),
                    Ok(_) => Err(refused("its directory is not a directory")),
                    Err(source) => Err(SwapFileError::Open {
                        path: path.to_path_buf(),
                        source,
                    }),
                }
            }
            Err(source) => Err(SwapFileError::Open {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Opens the swap file at `path`: a new file created there, or an unnamed one inside `path`
    /// when it is an existing directory.
    pub fn create(path: &Path) -> Result<Self, SwapFileError> {
        let open_err = |source| SwapFileError::Open {
            path: path.to_path_buf(),
            source,
        };
        let refused = |why| SwapFileError::Refused {
            path: path.to_path_buf(),
            why,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).mode(0o600);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_dir() => {
                let file = opts
                    .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(open_err)?;
                return Ok(Self::with(file, None));
            }
            Ok(m) if m.file_type().is_symlink() => return Err(refused("it is a symbolic link")),
            Ok(_) => return Err(refused("it exists; swap files are created anew")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
        let file = opts
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let m = file.metadata().map_err(open_err)?;
        Ok(Self::with(
            file,
            Some((path.to_path_buf(), (m.dev(), m.ino()))),
        ))
    }

    fn with(file: File, named: Option<(PathBuf, (u64, u64))>) -> Self {
        SwapFile {
            file,
            named,
            free: BinaryHeap::new(),
            high: 0,
            in_use: 0,
            sums: Vec::new(),
        }
    }

    /// Slots holding a page now.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Writes `page` to a free slot and returns it; on failure no slot is taken.
    pub fn store(&mut self, page: &[u8]) -> Result<Slot, SwapFileError> {
        debug_assert_eq!(page.len() as u64, PAGE_SIZE);
        let slot = match self.free.pop() {
            Some(Reverse(s)) => s,
            None if self.high < u32::MAX => self.high,
            None => return Err(SwapFileError::Slots(self.high)),
        };
        let result = self.write_all(Slot(slot), page);
        match result {
            Ok(()) => {
                if slot == self.high {
                    self.high += 1;
                    self.sums.push(0);
                }
                self.sums[slot as usize] = crc32fast::hash(page);
                self.in_use += 1;
                Ok(Slot(slot))
            }
            Err(e) => {
                if slot != self.high {
                    self.free.push(Reverse(slot));
                }
                Err(e)
            }
        }
    }

    fn write_all(&self, slot: Slot, page: &[u8]) -> Result<(), SwapFileError> {
        let mut done = 0;
        while done < page.len() {
            match self
                .file
                .write_at(&page[done..], slot.offset() + done as u64)
            {
                Ok(0) => {
                    return Err(SwapFileError::ShortWrite {
                        slot: slot.0,
                        written: done,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    return Err(SwapFileError::NoSpace {
                        slot: slot.0,
                        source: e,
                    });
                }
                Err(e) => {
                    return Err(SwapFileError::Write {
                        slot: slot.0,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads `slot` into `page` and checks it is the page written there; the slot stays taken
    /// until [`Self::release`].
    pub fn load(&self, slot: Slot, page: &mut [u8]) -> Result<(), SwapFileError> {
        let mut done = 0;
        while done < page.len() {
            match self
                .file
                .read_at(&mut page[done..], slot.offset() + done as u64)
            {
                Ok(0) => {
                    return Err(SwapFileError::ShortRead {
                        slot: slot.0,
                        read: done,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(SwapFileError::Read {
                        slot: slot.0,
                        source: e,
                    });
                }
            }
        }
        match self.sums.get(slot.0 as usize) {
            Some(&sum) if sum == crc32fast::hash(page) => Ok(()),
            _ => Err(SwapFileError::Corrupt { slot: slot.0 }),
        }
    }

    /// Frees `slot` for reuse.
    pub fn release(&mut self, slot: Slot) {
        debug_assert!(slot.0 < self.high);
        self.in_use = self.in_use.saturating_sub(1);
        self.free.push(Reverse(slot.0));
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        // Remove the named file only if it is still ours (not replaced behind our back).
        if let Some((path, id)) = &self.named
            && let Ok(m) = std::fs::symlink_metadata(path)
            && (m.dev(), m.ino()) == *id
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE as usize]
    }

    #[test]
    fn pages_come_back_and_slots_are_reused_lowest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.vswp");
        let mut f = SwapFile::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let slots: Vec<Slot> = (0..4).map(|i| f.store(&page(i)).unwrap()).collect();
        assert_eq!(slots, [Slot(0), Slot(1), Slot(2), Slot(3)]);
        assert_eq!(f.in_use(), 4);
        let mut buf = page(0xff);
        f.load(Slot(2), &mut buf).unwrap();
        assert_eq!(buf, page(2));
        f.release(Slot(2));
        f.release(Slot(1));
        assert_eq!(f.in_use(), 2);
        assert_eq!(f.store(&page(9)).unwrap(), Slot(1));
        assert_eq!(f.store(&page(8)).unwrap(), Slot(2));
        assert_eq!(f.store(&page(7)).unwrap(), Slot(4));
        f.load(Slot(1), &mut buf).unwrap();
        assert_eq!(buf, page(9));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            5 * PAGE_SIZE,
            "the file grows only to the pages held at once"
        );
        drop(f);
        assert!(!path.exists(), "a named swap file is removed at the end");
    }

    #[test]
    fn existing_paths_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        assert!(matches!(
            SwapFile::create(&victim),
            Err(SwapFileError::Refused { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(matches!(
            SwapFile::create(&link),
            Err(SwapFileError::Refused { .. })
        ));
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(SwapFile::create(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(matches!(
            SwapFile::create(&dir.path().join("no/such/dir/f")),
            Err(SwapFileError::Open { .. })
        ));
    }

    #[test]
    fn a_directory_gets_an_unnamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SwapFile::create(dir.path()).unwrap();
        f.store(&page(5)).unwrap();
        let mut buf = page(0);
        f.load(Slot(0), &mut buf).unwrap();
        assert_eq!(buf, page(5));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing is named in the directory"
        );
    }

    #[test]
    fn a_slot_changed_behind_our_back_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut f = SwapFile::create(&path).unwrap();
        f.store(&page(1)).unwrap();
        f.store(&page(2)).unwrap();
        // Another writer changes one byte of slot 1; then the file is cut and regrown (holes
        // read zero).
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        other.write_at(&[9], PAGE_SIZE + 100).unwrap();
        let mut buf = page(0);
        f.load(Slot(0), &mut buf).unwrap();
        assert!(matches!(
            f.load(Slot(1), &mut buf),
            Err(SwapFileError::Corrupt { slot: 1 })
        ));
        other.set_len(0).unwrap();
        other.set_len(2 * PAGE_SIZE).unwrap();
        assert!(matches!(
            f.load(Slot(0), &mut buf),
            Err(SwapFileError::Corrupt { slot: 0 })
        ));
    }

    #[test]
    fn reading_a_slot_never_written_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = SwapFile::create(dir.path()).unwrap();
        let mut buf = page(0);
        assert!(matches!(
            f.load(Slot(3), &mut buf),
            Err(SwapFileError::ShortRead { slot: 3, read: 0 })
        ));
    }

    /// A full file system: the failed store takes no slot, says it is full, and the pages
    /// stored before still read back.
    #[test]
    fn a_full_file_system_stops_stores_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return;
        }
        let _mount = Tmpfs::mount(&mnt, 64 * 1024).expect("root can mount a tmpfs");
        let mut f = SwapFile::create(&mnt.join("s")).unwrap();
        let mut stored = 0u32;
        let err = loop {
            match f.store(&page(stored as u8)) {
                Ok(s) => {
                    assert_eq!(s, Slot(stored));
                    stored += 1;
                    assert!(stored < 1000, "a 64 KiB file system took {stored} pages");
                }
                Err(e) => break e,
            }
        };
        assert!(err.is_full(), "{err}");
        assert!((1..=16).contains(&stored), "{stored}");
        assert_eq!(f.in_use(), stored);
        let mut buf = page(0xff);
        for i in 0..stored {
            f.load(Slot(i), &mut buf).unwrap();
            assert_eq!(buf, page(i as u8));
        }
        // Freeing a slot makes room again.
        f.release(Slot(0));
        assert_eq!(f.store(&page(0xaa)).unwrap(), Slot(0));
    }

    /// A tmpfs of a given size mounted for one test, unmounted when dropped.
    pub(crate) struct Tmpfs(PathBuf);

    impl Tmpfs {
        pub(crate) fn mount(at: &Path, bytes: u64) -> Option<Self> {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes}"))
                .arg("memvisor-test")
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Tmpfs(at.to_path_buf()))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
}
