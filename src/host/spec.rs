//! One VM of a host, as given on the command line (`--vm SPEC`) or in a host file.
//!
//! A SPEC is comma-separated `key=value`: `name=web,mem=512M,shares=1000,reservation=128M,
//! limit=400M,workload=...`. `workload=` comes last and takes the rest of the text, so that a
//! workload's own `;`, `,` and spaces need no quoting. Any other key is a `memvisor run` option for
//! that VM (`access-samples=100`, `free-page-reporting`), checked here with the same parser `run`
//! uses, so that a typo is refused before any VM starts.

use clap::Parser;
use thiserror::Error;

use crate::contract::workload::Workload;
use crate::units::{PAGE_SIZE, parse_size};

use super::scheduler::normal_shares;
use crate::vmm::config::RunOptions;

/// `run` options the host sets itself for every VM.
const HOST_OWNED: &[&str] = &[
    "json",
    "csv",
    "control",
    "prometheus",
    "prometheus-linger",
    "name",
    "plot",
    "interval",
    "help",
    "version",
];

/// One VM of the host.
#[derive(Clone, Debug, PartialEq)]
pub struct VmSpec {
    pub name: String,
    /// Configured guest RAM, bytes.
    pub mem: u64,
    pub shares: u64,
    /// Guaranteed memory, bytes (0: none).
    pub reservation: u64,
    /// Most memory it may have, bytes (`None`: its configured size).
    pub limit: Option<u64>,
    /// The `memvisor run` options for this VM, as command-line words (without the ones the host
    /// sets: `--json`, `--control`, `--interval`).
    pub run_args: Vec<String>,
}

impl VmSpec {
    /// Whether the VM's guest RAM is mergeable by KSM (`ksm` in its spec).
    pub fn ksm(&self) -> bool {
        self.run_args.iter().any(|a| a == "--ksm")
    }
}

/// Why a SPEC is refused.
#[derive(Debug, Error, PartialEq)]
pub enum SpecError {
    #[error("VM spec {spec:?}: {why}")]
    Bad { spec: String, why: String },
}

fn bad(spec: &str, why: impl Into<String>) -> SpecError {
    SpecError::Bad {
        spec: spec.chars().take(120).collect(),
        why: why.into(),
    }
}

#[derive(Parser)]
#[command(name = "run", no_binary_name = true)]
struct RunArgs {
    #[command(flatten)]
    options: RunOptions,
}

/// Parses one SPEC; `index` names a VM without `name=` (`vm1`, `vm2`, ...).
pub fn parse(spec: &str, index: usize) -> Result<VmSpec, SpecError> {
    let (head, workload) = match split_workload(spec) {
        Some((h, w)) => (h, Some(w)),
        None => (spec, None),
    };
    let mut name = None;
    let mut mem = None;
    let mut shares = None;
    let mut reservation = 0;
    let mut limit = None;
    let mut run_args = Vec::new();
    for item in head.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (item, None),
        };
        let need = |what: &str| value.ok_or_else(|| bad(spec, format!("{key} needs ={what}")));
        let size = |v: &str| parse_size(v).map_err(|e| bad(spec, format!("{key}: {e}")));
        let once = |seen: bool| {
            if seen {
                Err(bad(spec, format!("{key} is given twice")))
            } else {
                Ok(())
            }
        };
        match key {
            "name" => {
                once(name.is_some())?;
                let v = need("NAME")?;
                if v.is_empty()
                    || v.len() > 32
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(bad(
                        spec,
                        "name must be 1 to 32 letters, digits, '-' or '_'",
                    ));
                }
                name = Some(v.to_string());
            }
            "mem" => {
                once(mem.is_some())?;
                mem = Some(size(need("SIZE")?)?);
            }
            "shares" => {
                once(shares.is_some())?;
                let v = need("N")?;
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0 && n <= 1 << 40)
                    .ok_or_else(|| {
                        bad(
                            spec,
                            format!("shares must be a whole number from 1 to 2^40, not {v:?}"),
                        )
                    })?;
                shares = Some(n);
            }
            "reservation" => reservation = size(need("SIZE")?)?,
            "limit" => {
                once(limit.is_some())?;
                limit = Some(size(need("SIZE")?)?);
            }
            k if HOST_OWNED.contains(&k) => {
                return Err(bad(spec, format!("{k} is set by the host for every VM")));
            }
            k if k.starts_with('-') || k.is_empty() => {
                return Err(bad(spec, format!("{k:?} is not a key (write key=value)")));
            }
            k => run_args.push(match value {
                Some(v) => format!("--{k}={v}"),
                None => format!("--{k}"),
            }),
        }
    }
    let mem_bytes = mem.unwrap_or_else(|| RunOptions::default().mem);
    run_args.insert(0, format!("--mem={mem_bytes}"));
    if let Some(w) = workload {
        run_args.push(format!("--workload={w}"));
    }
    // The same parser as `run`: unknown options and bad values are refused now.
    let options = RunArgs::try_parse_from(&run_args)
        .map_err(|e| bad(spec, first_line(&e.to_string())))?
        .options;
    Workload::parse(&options.workload, mem_bytes).map_err(|e| bad(spec, e.to_string()))?;
    if reservation > mem_bytes {
        return Err(bad(spec, "the reservation is larger than mem"));
    }
    if let Some(l) = limit
        && l < reservation
    {
        return Err(bad(spec, "the limit is below the reservation"));
    }
    Ok(VmSpec {
        name: name.unwrap_or_else(|| format!("vm{}", index + 1)),
        mem: mem_bytes,
        shares: shares.unwrap_or_else(|| normal_shares(mem_bytes / PAGE_SIZE)),
        reservation,
        limit,
        run_args,
    })
}

/// `(before, workload)` when the SPEC has a `workload=` key (at its start or after a comma).
fn split_workload(spec: &str) -> Option<(&str, &str)> {
    let key = "workload=";
    let mut from = 0;
    while let Some(i) = spec[from..].find(key) {
        let at = from + i;
        let before = spec[..at].trim_end();
        if before.is_empty() || before.ends_with(',') {
            return Some((before.trim_end_matches(','), &spec[at + key.len()..]));
        }
        from = at + key.len();
    }
    None
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    #[test]
    fn a_full_spec() {
        let s = parse(
            "name=web,mem=512M,shares=1000,reservation=128M,limit=400M,access-samples=100,free-page-reporting,workload=alloc 64M; touch 32M write",
            0,
        )
        .unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.mem, 512 * MIB);
        assert_eq!(s.shares, 1000);
        assert_eq!(s.reservation, 128 * MIB);
        assert_eq!(s.limit, Some(400 * MIB));
        assert_eq!(
            s.run_args,
            [
                format!("--mem={}", 512 * MIB),
                "--access-samples=100".into(),
                "--free-page-reporting".into(),
                "--workload=alloc 64M; touch 32M write".into(),
            ]
        );
    }

    #[test]
    fn ksm_is_a_run_option_per_vm() {
        let s = parse("name=a,mem=256M,ksm,seed=5", 0).unwrap();
        assert_eq!(
            s.run_args,
            [
                format!("--mem={}", 256 * MIB),
                "--ksm".into(),
                "--seed=5".into()
            ]
        );
        assert!(s.ksm());
        assert!(!parse("mem=256M", 0).unwrap().ksm());
    }

    #[test]
    fn defaults_are_esx_normal_shares_no_reservation_no_limit() {
        let s = parse("mem=1G", 2).unwrap();
        assert_eq!(s.name, "vm3");
        assert_eq!(
            s.shares,
            1024 * super::super::scheduler::NORMAL_SHARES_PER_MIB
        );
        assert_eq!(s.reservation, 0);
        assert_eq!(s.limit, None);
        let d = parse("", 0).unwrap();
        assert_eq!(d.mem, RunOptions::default().mem);
    }

    #[test]
    fn workload_takes_the_rest_only_as_a_key() {
        assert_eq!(
            split_workload("name=a,workload=x,y=z"),
            Some(("name=a", "x,y=z"))
        );
        assert_eq!(split_workload("workload=a"), Some(("", "a")));
        assert_eq!(split_workload("name=myworkload=,mem=1G"), None);
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        for (spec, why) in [
            ("mem=lots", "mem"),
            ("shares=0", "shares"),
            ("shares=-5", "shares"),
            ("name=a b", "name"),
            ("name=a,name=b", "twice"),
            ("reservation=1G,mem=512M", "reservation"),
            ("reservation=256M,limit=128M", "limit"),
            ("json", "set by the host"),
            ("interval=1s", "set by the host"),
            ("control=/tmp/x", "set by the host"),
            ("no-such-option=3", "no-such-option"),
            ("access-samples=many", "access-samples"),
            ("mem", "needs"),
            ("workload=frobnicate 3", "frobnicate"),
        ] {
            match parse(spec, 0) {
                Err(SpecError::Bad { why: w, .. }) => {
                    assert!(w.contains(why), "{spec}: {w}")
                }
                Ok(s) => panic!("{spec} was accepted: {s:?}"),
            }
        }
    }
}
