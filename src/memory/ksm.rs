//! The host kernel's KSM (kernel samepage merging): its own counters, per process
//! (`/proc/PID/ksm_stat`) and host-wide (`/sys/kernel/mm/ksm`), and ksmd's switch (`run`), which
//! [`KsmRun`] turns on and restores. Guest RAM is made mergeable by
//! [`GuestRam::merge`](crate::memory::GuestRam::merge).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where the kernel shows KSM (absent on a kernel without `CONFIG_KSM`).
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// Errors of the KSM interface, naming the file.
#[derive(Debug, Error)]
pub enum KsmError {
    #[error("{KSM_DIR} is missing: the host kernel has no KSM (CONFIG_KSM)")]
    Missing,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected contents {text:?}")]
    Parse { path: PathBuf, text: String },
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a regular sysfs file (refused)")]
    NotRegular(PathBuf),
}

/// One process's KSM figures (`/proc/PID/ksm_stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessKsm {
    /// Pages of the process merged into KSM pages (`ksm_merging_pages`).
    pub merging_pages: u64,
    /// Pages merged into the zero page by `use_zero_pages` (`ksm_zero_pages`).
    pub zero_pages: u64,
    /// The kernel's profit: merged and zero pages minus its rmap items' memory, bytes
    /// (`ksm_process_profit`; may be negative).
    pub profit_bytes: i64,
}

/// Host-wide KSM figures (`/sys/kernel/mm/ksm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostKsm {
    /// `run`: 0 stopped, 1 running, 2 stopped and unmerged.
    pub run: u64,
    /// KSM pages in use (`pages_shared`).
    pub pages_shared: u64,
    /// Pages sharing them beyond the first of each, i.e. pages saved (`pages_sharing`).
    pub pages_sharing: u64,
    /// Pages merged into the zero page (`ksm_zero_pages`).
    pub zero_pages: u64,
    /// Completed scans of all mergeable memory (`full_scans`).
    pub full_scans: u64,
}

/// Whether the host kernel has KSM.
pub fn available() -> bool {
    Path::new(KSM_DIR).is_dir()
}

/// The KSM figures of process `pid` (`None`: this process).
pub fn process(pid: Option<u32>) -> Result<ProcessKsm, KsmError> {
    let path = PathBuf::from(match pid {
        Some(p) => format!("/proc/{p}/ksm_stat"),
        None => "/proc/self/ksm_stat".into(),
    });
    let text = std::fs::read_to_string(&path).map_err(|source| KsmError::Read {
        path: path.clone(),
        source,
    })?;
    parse_process(&text).ok_or(KsmError::Parse { path, text })
}

/// Parses `ksm_stat`: `key value` lines; the three figures must be there.
fn parse_process(text: &str) -> Option<ProcessKsm> {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(' ')?
                .trim()
                .parse::<i64>()
                .ok()
        })
    };
    Some(ProcessKsm {
        merging_pages: u64::try_from(field("ksm_merging_pages")?).ok()?,
        zero_pages: u64::try_from(field("ksm_zero_pages")?).ok()?,
        profit_bytes: field("ksm_process_profit")?,
    })
}

/// Reads one number from `KSM_DIR/name`.
pub fn knob(name: &str) -> Result<u64, KsmError> {
    if !available() {
        return Err(KsmError::Missing);
    }
    let path = Path::new(KSM_DIR).join(name);
    let text = std::fs::read_to_string(&path).map_err(|source| KsmError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim()
        .parse()
        .map_err(|_| KsmError::Parse { path, text })
}

/// Writes one number to `KSM_DIR/name` (a regular sysfs file; anything else is refused).
pub fn set_knob(name: &str, value: u64) -> Result<(), KsmError> {
    if !available() {
        return Err(KsmError::Missing);
    }
    let path = Path::new(KSM_DIR).join(name);
    let meta = std::fs::symlink_metadata(&path).map_err(|source| KsmError::Read {
        path: path.clone(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(KsmError::NotRegular(path));
    }
    let value = value.to_string();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| KsmError::Write {
            path,
            value,
            source,
        })
}

/// The host-wide figures.
pub fn host() -> Result<HostKsm, KsmError> {
    Ok(HostKsm {
        run: knob("run")?,
        pages_shared: knob("pages_shared")?,
        pages_sharing: knob("pages_sharing")?,
        zero_pages: knob("ksm_zero_pages").unwrap_or(0),
        full_scans: knob("full_scans")?,
    })
}

/// KSM knobs set for a while: each goes back to its old value when this is dropped (a normal
/// end, or the end a SIGINT/SIGTERM asks for, which unwinds to here).
#[derive(Debug)]
pub struct KsmRun {
    /// (knob, old value), in the order set; restored in reverse.
    old: Vec<(&'static str, u64)>,
}

impl KsmRun {
    /// Starts ksmd (`run` = 1), remembering its state.
    pub fn start() -> Result<Self, KsmError> {
        let mut k = KsmRun { old: Vec::new() };
        k.set("run", 1)?;
        Ok(k)
    }

    /// Sets knob `name` (e.g. `pages_to_scan`) to `value` until drop.
    pub fn set(&mut self, name: &'static str, value: u64) -> Result<(), KsmError> {
        let old = knob(name)?;
        set_knob(name, value)?;
        self.old.push((name, old));
        Ok(())
    }

    /// The knobs and their values before.
    pub fn saved(&self) -> &[(&'static str, u64)] {
        &self.old
    }
}

impl Drop for KsmRun {
    fn drop(&mut self) {
        for &(name, old) in self.old.iter().rev() {
            if let Err(e) = set_knob(name, old) {
                log::error!("ksm: could not restore {name} to {old}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksm_stat_parses_and_refuses_garbage() {
        let text = "ksm_rmap_items 10\nksm_zero_pages 3\nksm_merging_pages 7\n\
                    ksm_process_profit -12\nksm_merge_any: no\nksm_mergeable: yes\n";
        assert_eq!(
            parse_process(text),
            Some(ProcessKsm {
                merging_pages: 7,
                zero_pages: 3,
                profit_bytes: -12
            })
        );
        assert_eq!(parse_process("ksm_merging_pages 7\n"), None);
        assert_eq!(
            parse_process("ksm_zero_pages x\nksm_merging_pages 7\nksm_process_profit 1"),
            None
        );
        assert_eq!(
            parse_process("ksm_zero_pages 0\nksm_merging_pages -7\nksm_process_profit 1"),
            None,
            "a negative count is refused"
        );
    }

    #[test]
    fn this_process_and_the_host_read_where_ksm_exists() {
        if !available() {
            eprintln!("SKIPPED this_process_and_the_host_read_where_ksm_exists: no {KSM_DIR}");
            return;
        }
        let p = process(None).unwrap();
        assert_eq!(
            p.merging_pages, 0,
            "nothing of the test process is mergeable"
        );
        let h = host().unwrap();
        assert!(h.run <= 2, "{h:?}");
        assert!(
            matches!(knob("no_such_knob"), Err(KsmError::Read { .. })),
            "a missing knob is an error"
        );
    }
}
