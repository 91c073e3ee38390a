//! What a run is asked to do ([`RunOptions`], the command line's `run` options, with every
//! default in one place: its clap attributes), and the same validated once into typed values
//! ([`RunConfig`]) before anything is built. Every rejection names the option and the bad value.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use thiserror::Error;

use crate::contract::abi;
use crate::contract::workload::{DEFAULT_SPEC, Workload, WorkloadError};
use crate::kvm::boot::{self, BootError};
use crate::memory::swap::{Policy, SwapFile, SwapFileError};
use crate::memory::{GuestRam, MemoryError};
use crate::observe::pmp_mmp::{self, MapFileError};
use crate::observe::sampler::{Sampler, SamplerError, Stream, stream_seed};
use crate::observe::stats::{DEFAULT_FAST_ALPHA, DEFAULT_SLOW_ALPHA, Smoother, StatsError};
use crate::units::PAGE_SIZE;
use crate::units::{fmt_mib, parse_duration, parse_size};

/// Shortest reporting interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest reporting interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// The options of `memvisor run` that shape the VM and its measurement.
#[derive(Args, Clone, Debug)]
pub struct RunOptions {
    /// Guest RAM, e.g. 256M, 1G, 64G (untouched pages cost the host nothing).
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub mem: u64,
    /// The workload the guest app runs, e.g. "alloc 64M; touch 32M write 2s; idle 1s".
    #[arg(long, default_value = DEFAULT_SPEC)]
    pub workload: String,
    /// A guest ELF image instead of the built-in test guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Stop a guest that has not finished after this long, e.g. 30s (exit code 124).
    #[arg(long, value_parser = duration_arg)]
    pub timeout: Option<Duration>,
    /// Reporting and sampling interval.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    pub interval: Duration,
    /// Pages the write estimate samples per interval (among the pages written before).
    #[arg(long, default_value_t = 1000)]
    pub samples: u64,
    /// Turn the write estimate's sampling off.
    #[arg(long)]
    pub no_sampling: bool,
    /// Pages per interval the access sampler (reads and writes, userfaultfd) watches; 0 turns it
    /// off. Each watched page that the guest touches costs it one trapped access (about 0.15 ms
    /// on the development host with a fully active guest), so the default keeps a busy guest's
    /// slowdown under 1% at 1 s intervals (README, `cargo bench --bench access -- overhead`).
    #[arg(long, default_value_t = 60)]
    pub access_samples: u64,
    /// Sample all of guest RAM uniformly, as ESX does, instead of only the pages touched before
    /// (first touches are then estimated too, not counted exactly).
    #[arg(long)]
    pub plain_sampling: bool,
    /// Seed for sample selection and the guest's access patterns (reproducible runs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Weight of the newest interval in the fast moving average (0 < a <= 1).
    #[arg(long, default_value_t = DEFAULT_FAST_ALPHA)]
    pub ewma_fast: f64,
    /// Weight of the newest interval in the slow moving average (0 < a <= 1).
    #[arg(long, default_value_t = DEFAULT_SLOW_ALPHA)]
    pub ewma_slow: f64,
    /// Allow transparent huge pages for guest RAM (off by default).
    #[arg(long)]
    pub hugepages: bool,
    /// Let the host kernel's KSM merge identical guest pages (MADV_MERGEABLE on guest RAM; ksmd
    /// must run: /sys/kernel/mm/ksm/run, or `memvisor host --ksm-run`). Off by default: sharing
    /// across VMs is a timing side channel (a write to a shared page is a slow copy-on-write, so
    /// a guest learns whether another VM holds the same page), which is why ESX salts sharing per
    /// VM by default since 2014.
    #[arg(long)]
    pub ksm: bool,
    /// Write the PMP-MMP map to this file at the end (also when the run is stopped).
    #[arg(long)]
    pub map_out: Option<PathBuf>,
    /// Also write the map every N intervals (needs --map-out).
    #[arg(long, requires = "map_out")]
    pub map_every: Option<u64>,
    /// Where the guest console goes: a file, or "-" for stderr (default).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Let the guest report free memory (extents of 2 MiB or more) through the virtio-balloon,
    /// which gives it back to the host: host usage falls after the guest frees (off by default:
    /// host usage is then a high-water mark).
    #[arg(long)]
    pub free_page_reporting: bool,
    /// Hold the guest to this much RAM, e.g. 256M: the balloon's target is --mem minus the limit,
    /// the guest gives up free pages first, and an allocation beyond the limit fails in the guest.
    #[arg(long, value_parser = size_arg)]
    pub limit: Option<u64>,
    /// Start with this much of the guest's RAM in the balloon, e.g. 128M (a soft target: the guest
    /// deflates it when it would otherwise run out of memory).
    #[arg(long, value_parser = size_arg, conflicts_with = "limit")]
    pub balloon: Option<u64>,
    /// No virtio-balloon device: the guest cannot give memory back by ballooning, as a guest
    /// without a balloon driver (only hypervisor swap can take memory from it).
    #[arg(long, conflicts_with_all = ["limit", "balloon", "free_page_reporting"])]
    pub no_balloon: bool,
    #[command(flatten)]
    pub swap: SwapOptions,
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    options: RunOptions,
}

impl Default for RunOptions {
    /// The command line's defaults, from the same clap attributes.
    fn default() -> Self {
        DefaultsOnly::parse_from(["memvisor"]).options
    }
}

/// Why the options cannot make a run.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--mem")]
    Mem(#[source] MemoryError),
    #[error(
        "--mem {}: the built-in guest boots with at most {} (its kernel's page tables and truth bitmaps must fit below 1 GiB)",
        fmt_mib(*.0),
        fmt_mib(abi::MAX_MEM_BYTES)
    )]
    MemForBuiltInGuest(u64),
    #[error("--workload")]
    Workload(#[source] WorkloadError),
    #[error("--guest")]
    Guest(#[source] BootError),
    #[error("--interval {0:?} is too short; the minimum is {MIN_INTERVAL:?}")]
    IntervalTooShort(Duration),
    #[error("--interval {0:?} is too long; the maximum is {MAX_INTERVAL:?}")]
    IntervalTooLong(Duration),
    #[error("--timeout must be more than 0")]
    ZeroTimeout,
    #[error("--samples {0}")]
    Samples(u64, #[source] SamplerError),
    #[error("--access-samples {0}")]
    AccessSamples(u64, #[source] SamplerError),
    #[error("--ewma-fast/--ewma-slow")]
    Ewma(#[source] StatsError),
    #[error("--map-every must be at least 1")]
    ZeroMapEvery,
    #[error("--map-out")]
    MapOut(#[source] MapFileError),
    #[error("{option} {} is above --mem {}", fmt_mib(*.size), fmt_mib(*.mem))]
    AboveMem {
        option: &'static str,
        size: u64,
        mem: u64,
    },
    #[error("{0} {size} is not a multiple of the 4 KiB page size", size = fmt_mib(*.1))]
    Unaligned(&'static str, u64),
    #[error(
        "{0} needs the virtio-balloon, which sits at {b:#x}, inside a guest RAM of {m}",
        b = abi::balloon::MMIO_BASE,
        m = fmt_mib(*.1)
    )]
    NoBalloon(&'static str, u64),
    #[error("--swap")]
    Swap(#[source] SwapFileError),
    #[error("--swap-target and --swap-policy need --swap")]
    SwapTargetWithoutSwap,
    #[error("--console {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the guest's console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// Standard error (the default, and `--console -`).
    Stderr,
    /// A file, created at set-up (refused if it is a link, a device or a FIFO).
    File(PathBuf),
    /// Nowhere (tests and benchmarks).
    Discard,
}

impl Console {
    /// Opens it (at set-up).
    pub fn open(&self) -> Result<Box<dyn std::io::Write + Send>, ConfigError> {
        Ok(match self {
            Console::Stderr => Box::new(std::io::stderr()),
            Console::Discard => Box::new(std::io::sink()),
            Console::File(p) => Box::new(crate::vmm::console_file::open(p).map_err(|source| {
                ConfigError::Console {
                    path: p.clone(),
                    source,
                }
            })?),
        })
    }
}

/// A validated run: plain, typed values only, checked once. Set-up ([`crate::vmm::setup`])
/// creates what they describe (the samplers, the console, the guest image's bytes).
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub mem_bytes: u64,
    pub hugepages: bool,
    /// Guest RAM is mergeable by KSM (`--ksm`); the map is refreshed every interval.
    pub ksm: bool,
    pub workload: Workload,
    /// A guest ELF image instead of the built-in test guest (checked here, read at set-up).
    pub guest: Option<PathBuf>,
    pub timeout: Option<Duration>,
    pub interval: Duration,
    /// The write sample sizes cycled interval by interval (`None`: no sampling in that interval).
    pub sample_cycle: Vec<Option<u64>>,
    /// The seed of the write samplers' streams (each its own, [`Stream::Write`]), if reproducible.
    pub sample_seed: Option<u64>,
    /// The moving averages, empty.
    pub smoother: Smoother,
    /// Pages the access sampler watches per interval (0: off).
    pub access_samples: u64,
    /// For benchmarks and tests: access sample sizes cycled interval by interval (0: none).
    pub access_cycle: Vec<u64>,
    /// Sample only pages touched (written) before, counting first touches exactly.
    pub stratify: bool,
    /// The access sampler's seed, if reproducible: its own stream of `--seed`
    /// ([`Stream::Access`]), as each write sampler has its own ([`Stream::Write`]).
    pub access_seed: Option<u64>,
    /// The guest's own seed (access patterns); from `--seed` or random.
    pub guest_seed: u64,
    /// Write the PMP-MMP map here at the end (and every `map_every` intervals).
    pub map_out: Option<PathBuf>,
    pub map_every: Option<u64>,
    /// Where the guest's console goes.
    pub console: Console,
    /// The virtio-balloon, when guest RAM leaves room for its registers.
    pub balloon: Option<BalloonConfig>,
    /// Hypervisor swap (`--swap`), with its file open.
    pub swap: Option<SwapConfig>,
}

/// What the virtio-balloon offers and asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer free page reporting (`--free-page-reporting`).
    pub reporting: bool,
    /// The balloon's target in pages: RAM minus `--limit`, or `--balloon` (0 without either).
    pub target_pages: u32,
    /// The target is a hard limit (`--limit`): `DEFLATE_ON_OOM` is not offered.
    pub hard_limit: bool,
}

impl BalloonConfig {
    /// The balloon for `mem` bytes of RAM, or `None` when its registers would fall inside RAM
    /// (an error if an option needs it).
    fn new(opts: &RunOptions) -> Result<Option<Self>, ConfigError> {
        let sized = [("--limit", opts.limit), ("--balloon", opts.balloon)];
        if opts.no_balloon {
            return Ok(None);
        }
        if opts.mem > abi::balloon::MMIO_BASE {
            return match sized.iter().find(|(_, v)| v.is_some()) {
                _ if opts.free_page_reporting => {
                    Err(ConfigError::NoBalloon("--free-page-reporting", opts.mem))
                }
                Some((option, _)) => Err(ConfigError::NoBalloon(option, opts.mem)),
                None => Ok(None),
            };
        }
        for (option, v) in sized {
            match v {
                Some(size) if size > opts.mem => {
                    return Err(ConfigError::AboveMem {
                        option,
                        size,
                        mem: opts.mem,
                    });
                }
                Some(size) if !size.is_multiple_of(PAGE_SIZE) => {
                    return Err(ConfigError::Unaligned(option, size));
                }
                _ => {}
            }
        }
        let target = match (opts.limit, opts.balloon) {
            (Some(l), _) => (opts.mem - l) / PAGE_SIZE,
            (None, Some(b)) => b / PAGE_SIZE,
            (None, None) => 0,
        };
        Ok(Some(BalloonConfig {
            reporting: opts.free_page_reporting,
            // RAM is at most MMIO_BASE here (448 GiB): its pages fit in 32 bits.
            target_pages: u32::try_from(target).unwrap_or(u32::MAX),
            hard_limit: opts.limit.is_some(),
        }))
    }
}

/// At most one access sample per page of `mem_bytes` of RAM (0: the access sampler is off).
fn check_access_samples(samples: u64, mem_bytes: u64) -> Result<(), ConfigError> {
    let pages = mem_bytes / PAGE_SIZE;
    if samples > pages {
        return Err(ConfigError::AccessSamples(
            samples,
            SamplerError::TooManySamples {
                samples,
                guest_pages: pages,
            },
        ));
    }
    Ok(())
}

impl RunConfig {
    /// Validates `opts` into a run (reading the guest image once to check it; nothing is kept
    /// open or created).
    pub fn new(opts: RunOptions) -> Result<Self, ConfigError> {
        GuestRam::validate_size(opts.mem).map_err(ConfigError::Mem)?;
        match &opts.guest {
            Some(p) => drop(boot::read_image(p, opts.mem).map_err(ConfigError::Guest)?),
            None if opts.mem > abi::MAX_MEM_BYTES => {
                return Err(ConfigError::MemForBuiltInGuest(opts.mem));
            }
            None => {}
        }
        let workload = Workload::parse(&opts.workload, opts.mem).map_err(ConfigError::Workload)?;
        if opts.interval < MIN_INTERVAL {
            return Err(ConfigError::IntervalTooShort(opts.interval));
        }
        if opts.interval > MAX_INTERVAL {
            return Err(ConfigError::IntervalTooLong(opts.interval));
        }
        if opts.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroTimeout);
        }
        if opts.map_every == Some(0) {
            return Err(ConfigError::ZeroMapEvery);
        }
        if let Some(p) = &opts.map_out {
            pmp_mmp::check_target(p).map_err(ConfigError::MapOut)?;
        }
        let balloon = BalloonConfig::new(&opts)?;
        let swap = SwapConfig::new(&opts.swap, opts.mem, opts.seed)?;
        let cycle = vec![(!opts.no_sampling).then_some(opts.samples)];
        samplers(&cycle, opts.mem, opts.seed)?;
        check_access_samples(opts.access_samples, opts.mem)?;
        let smoother = Smoother::new(opts.ewma_fast, opts.ewma_slow).map_err(ConfigError::Ewma)?;
        let console = match opts.console {
            Some(p) if p.as_os_str() != "-" => Console::File(p),
            _ => Console::Stderr,
        };
        Ok(RunConfig {
            mem_bytes: opts.mem,
            hugepages: opts.hugepages,
            ksm: opts.ksm,
            workload,
            guest: opts.guest,
            timeout: opts.timeout,
            interval: opts.interval,
            sample_cycle: cycle,
            sample_seed: opts.seed,
            smoother,
            access_samples: opts.access_samples,
            access_cycle: Vec::new(),
            stratify: !opts.plain_sampling,
            access_seed: opts.seed.map(|s| stream_seed(s, Stream::Access)),
            guest_seed: opts.seed.unwrap_or_else(rand::random),
            map_out: opts.map_out,
            map_every: opts.map_every,
            console,
            balloon,
            swap,
        })
    }

    /// For benchmarks and tests: cycle these access sample sizes interval by interval (0: no
    /// access sampling in that interval), so their costs compare inside one run.
    pub fn with_access_cycle(mut self, cycle: &[u64]) -> Result<Self, ConfigError> {
        let most = cycle.iter().copied().max().unwrap_or(0);
        check_access_samples(most, self.mem_bytes)?;
        self.access_samples = most;
        self.access_cycle = cycle.to_vec();
        Ok(self)
    }

    /// For benchmarks and tests: cycle these sample sizes interval by interval instead.
    pub fn with_sample_cycle(mut self, cycle: &[Option<u64>]) -> Result<Self, ConfigError> {
        samplers(cycle, self.mem_bytes, Some(self.guest_seed))?;
        self.sample_cycle = cycle.to_vec();
        self.sample_seed = Some(self.guest_seed);
        Ok(self)
    }

    /// The write samplers, fresh (at set-up).
    pub fn write_samplers(&self) -> Result<Vec<Option<Sampler>>, ConfigError> {
        samplers(&self.sample_cycle, self.mem_bytes, self.sample_seed)
    }

    /// The guest image's bytes (at set-up).
    pub fn image(&self) -> Result<Vec<u8>, BootError> {
        match &self.guest {
            Some(p) => boot::read_image(p, self.mem_bytes),
            None => Ok(boot::DEFAULT_GUEST.to_vec()),
        }
    }
}

/// The write samplers of `cycle`, each with its own stream of `seed` ([`Stream::Write`]).
fn samplers(
    cycle: &[Option<u64>],
    mem_bytes: u64,
    seed: Option<u64>,
) -> Result<Vec<Option<Sampler>>, ConfigError> {
    let pages = mem_bytes / PAGE_SIZE;
    let cycle = if cycle.is_empty() { &[None][..] } else { cycle };
    cycle
        .iter()
        .zip(0u64..)
        .map(|(n, i)| {
            let seed = seed.map(|s| stream_seed(s, Stream::Write(i)));
            n.map(|n| Sampler::new(n, pages, seed).map_err(|e| ConfigError::Samples(n, e)))
                .transpose()
        })
        .collect()
}

// ---- Hypervisor swap (`--swap`, `--swap-target`, `--swap-policy`) ----------------------------

/// The options of hypervisor swap.
#[derive(Args, Clone, Debug, Default)]
pub struct SwapOptions {
    /// Hypervisor swap: write guest pages to FILE and drop them from RAM, reading each back on
    /// the guest's next access. FILE is created anew (mode 0600; an existing file or a symlink is
    /// refused) and removed at the end; an existing directory gets an unnamed file there, which
    /// never outlives the process.
    #[arg(long, value_name = "FILE")]
    pub swap: Option<PathBuf>,
    /// How much guest RAM to keep swapped out, e.g. 64M (needs --swap; default 0).
    #[arg(long, value_parser = size_arg)]
    pub swap_target: Option<u64>,
    /// Which pages to swap out: cold (longest unseen first) or random (ESX's choice).
    #[arg(long, value_enum)]
    pub swap_policy: Option<Policy>,
}

/// Hypervisor swap, validated (its file is created at set-up).
#[derive(Clone, Debug)]
pub struct SwapConfig {
    /// The swap file, or the directory for an unnamed one (checked: [`SwapFile::check`]).
    pub path: PathBuf,
    /// Pages to keep swapped out.
    pub target_pages: u64,
    pub policy: Policy,
    /// The page choice's seed, if reproducible (its own stream of `--seed`).
    pub seed: Option<u64>,
}

/// The swap policy when `--swap-policy` is not given.
pub const DEFAULT_SWAP_POLICY: Policy = Policy::Cold;

impl SwapConfig {
    fn new(opts: &SwapOptions, mem: u64, seed: Option<u64>) -> Result<Option<Self>, ConfigError> {
        let Some(path) = &opts.swap else {
            if opts.swap_target.is_some() || opts.swap_policy.is_some() {
                return Err(ConfigError::SwapTargetWithoutSwap);
            }
            return Ok(None);
        };
        let target = opts.swap_target.unwrap_or(0);
        if target > mem {
            return Err(ConfigError::AboveMem {
                option: "--swap-target",
                size: target,
                mem,
            });
        }
        if !target.is_multiple_of(PAGE_SIZE) {
            return Err(ConfigError::Unaligned("--swap-target", target));
        }
        SwapFile::check(path).map_err(ConfigError::Swap)?;
        Ok(Some(SwapConfig {
            path: path.clone(),
            target_pages: target / PAGE_SIZE,
            policy: opts.swap_policy.unwrap_or(DEFAULT_SWAP_POLICY),
            seed: seed.map(|s| stream_seed(s, Stream::Swap)),
        }))
    }
}

// ---- end of hypervisor swap ----------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> RunOptions {
        DefaultsOnly::try_parse_from(std::iter::once("memvisor").chain(args.iter().copied()))
            .unwrap()
            .options
    }

    fn err(args: &[&str]) -> String {
        let e = RunConfig::new(opts(args)).expect_err("should be rejected");
        let mut text = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            text.push_str(&format!(": {s}"));
            src = s.source();
        }
        text
    }

    #[test]
    fn defaults_come_from_one_place_and_are_valid() {
        let d = RunOptions::default();
        assert_eq!(d.mem, 256 << 20);
        assert_eq!(d.interval, Duration::from_secs(1));
        assert_eq!(d.samples, 1000);
        assert_eq!(d.workload, DEFAULT_SPEC);
        let cfg = RunConfig::new(d).unwrap();
        let mut samplers = cfg.write_samplers().unwrap();
        assert_eq!(samplers.len(), 1);
        assert_eq!(samplers[0].as_mut().unwrap().arm().len(), 1000);
        assert_eq!(cfg.console, Console::Stderr);
    }

    #[test]
    fn swap_options_are_checked_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.vswp");
        let p = path.to_str().unwrap();
        let cfg = RunConfig::new(opts(&["--swap", p, "--swap-target", "64M"])).unwrap();
        let swap = cfg.swap.as_ref().unwrap();
        assert_eq!(swap.target_pages, 64 * 256);
        assert_eq!(swap.policy, DEFAULT_SWAP_POLICY);
        assert_eq!(swap.path, path);
        assert!(!path.exists(), "checked, not created: set-up creates it");
        drop(cfg);
        assert!(RunConfig::new(opts(&[])).unwrap().swap.is_none());
        let e = err(&["--swap-target", "8M"]);
        assert!(e.contains("need --swap"), "{e}");
        let e = err(&["--swap", p, "--swap-target", "1G"]);
        assert!(e.contains("--swap-target 1024.0 MiB is above --mem"), "{e}");
        std::fs::write(&path, b"mine").unwrap();
        let e = err(&["--swap", p]);
        assert!(e.starts_with("--swap") && e.contains("exists"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"mine",
            "an existing file is left alone"
        );
        let e = err(&["--swap", dir.path().join("no/such/dir/f").to_str().unwrap()]);
        assert!(e.starts_with("--swap"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = err(&["--swap", link.to_str().unwrap()]);
        assert!(e.contains("symbolic link"), "{e}");
        let d = dir.path().to_str().unwrap();
        let cfg = RunConfig::new(opts(&["--swap", d, "--swap-policy", "random"])).unwrap();
        assert_eq!(cfg.swap.as_ref().unwrap().policy, Policy::Random);
    }

    #[test]
    fn bad_values_name_their_option() {
        assert!(err(&["--interval", "1ms"]).contains("too short"));
        assert!(err(&["--interval", "2h"]).contains("too long"));
        assert!(err(&["--timeout", "0s"]).contains("--timeout"));
        assert!(err(&["--samples", "0"]).starts_with("--samples 0"));
        let e = err(&["--mem", "4M", "--workload", "idle 1ms", "--samples", "5000"]);
        assert!(e.contains("only 1024 pages"), "{e}");
        assert!(err(&["--ewma-fast", "2"]).starts_with("--ewma"));
        assert!(err(&["--workload", "touch 1M wrte"]).contains("wrte"));
        let e = err(&["--map-out", "x", "--map-every", "0"]);
        assert!(e.contains("--map-every"), "{e}");
        // The access sampler's own option, not the write sampler's.
        let e = err(&[
            "--mem",
            "64M",
            "--workload",
            "idle 1ms",
            "--access-samples",
            "16385",
        ]);
        assert!(e.starts_with("--access-samples 16385"), "{e}");
        assert!(e.contains("only 16384 pages"), "{e}");
        // Sizes below a tenth of a MiB do not print as "0.0 MiB".
        let e = err(&["--mem", "4k"]);
        assert!(e.contains("guest memory size 4 KiB is below"), "{e}");
    }

    #[test]
    fn ram_the_built_in_guest_cannot_boot_is_refused_up_front() {
        let too_big = format!("{}", abi::MAX_MEM_BYTES + PAGE_SIZE);
        let e = err(&["--mem", &too_big, "--workload", "idle 1ms"]);
        assert!(e.contains("at most 458752.0 MiB"), "{e}");
        let e = err(&["--mem", "2T"]);
        assert!(e.contains("above the maximum"), "{e}");
    }

    #[test]
    fn balloon_options_are_checked_and_set_the_target() {
        let cfg = RunConfig::new(RunOptions::default()).unwrap();
        let b = cfg.balloon.unwrap();
        assert_eq!(
            (b.reporting, b.target_pages, b.hard_limit),
            (false, 0, false)
        );
        let cfg = RunConfig::new(opts(&["--mem", "1G", "--limit", "256M"])).unwrap();
        let b = cfg.balloon.unwrap();
        assert_eq!(b.target_pages, (768 << 20) / 4096);
        assert!(b.hard_limit && !b.reporting);
        let cfg = RunConfig::new(opts(&["--free-page-reporting"])).unwrap();
        assert!(cfg.balloon.unwrap().reporting);
        let e = err(&["--mem", "256M", "--limit", "1G"]);
        assert!(
            e.contains("--limit 1024.0 MiB is above --mem 256.0 MiB"),
            "{e}"
        );
        let e = err(&["--limit", "1000000"]);
        assert!(
            e.contains("--limit 1.0 MiB is not a multiple of the 4 KiB"),
            "{e}"
        );
        let cfg = RunConfig::new(opts(&["--mem", "1G", "--balloon", "100M"])).unwrap();
        let b = cfg.balloon.unwrap();
        assert_eq!((b.target_pages, b.hard_limit), (100 * 256, false));
        let e = err(&["--balloon", "1G"]);
        assert!(
            e.contains("--balloon 1024.0 MiB is above --mem 256.0 MiB"),
            "{e}"
        );
        let both = DefaultsOnly::try_parse_from(["m", "--limit", "1M", "--balloon", "1M"]);
        assert!(both.is_err(), "--limit and --balloon exclude each other");
        assert!(
            RunConfig::new(opts(&["--no-balloon"]))
                .unwrap()
                .balloon
                .is_none()
        );
        for with in ["--limit=1M", "--balloon=1M", "--free-page-reporting"] {
            let both = DefaultsOnly::try_parse_from(["m", "--no-balloon", with]);
            assert!(both.is_err(), "--no-balloon excludes {with}");
        }
        // A custom guest may have RAM where the balloon's registers would be.
        let mut o = opts(&["--free-page-reporting", "--workload", "idle 1ms"]);
        o.mem = abi::balloon::MMIO_BASE + (1 << 30);
        let e = BalloonConfig::new(&o).unwrap_err().to_string();
        assert!(
            e.contains("--free-page-reporting needs the virtio-balloon"),
            "{e}"
        );
        o.free_page_reporting = false;
        assert_eq!(BalloonConfig::new(&o).unwrap(), None);
    }

    #[test]
    fn no_sampling_and_sample_cycles() {
        let cfg = RunConfig::new(opts(&["--no-sampling"])).unwrap();
        assert!(cfg.write_samplers().unwrap()[0].is_none());
        let cfg = cfg.with_sample_cycle(&[None, Some(10), Some(100)]).unwrap();
        let mut samplers = cfg.write_samplers().unwrap();
        assert_eq!(samplers.len(), 3);
        assert_eq!(samplers[2].as_mut().unwrap().arm().len(), 100);
        let cfg = RunConfig::new(opts(&["--mem", "4M", "--workload", "idle 1ms"])).unwrap();
        assert!(cfg.with_sample_cycle(&[Some(1 << 20)]).is_err());
    }

    #[test]
    fn the_samplers_of_one_seed_draw_independent_reproducible_streams() {
        let pages = (64u64 << 20) / PAGE_SIZE;
        let picks = |args: &[&str]| {
            let cfg = RunConfig::new(opts(args)).unwrap();
            let mut access = Sampler::new(100, pages, cfg.access_seed).unwrap();
            let mut samplers = cfg.write_samplers().unwrap();
            let write: Vec<Vec<u64>> = (0..3)
                .map(|_| samplers[0].as_mut().unwrap().arm().to_vec())
                .collect();
            let access: Vec<Vec<u64>> = (0..3).map(|_| access.arm().to_vec()).collect();
            (write, access, cfg.access_seed)
        };
        let args = [
            "--mem",
            "64M",
            "--workload",
            "alloc 16M",
            "--samples",
            "100",
            "--seed",
            "7",
        ];
        let (w1, a1, s1) = picks(&args);
        let (w2, a2, _) = picks(&args);
        assert_eq!(w1, w2, "the write stream is reproducible");
        assert_eq!(a1, a2, "the access stream is reproducible");
        assert_ne!(
            s1,
            Some(7),
            "the access sampler does not take the run seed itself"
        );
        for (w, a) in w1.iter().zip(&a1) {
            assert_ne!(w, a, "the two samplers drew the same pages");
            // Independent streams of 100 out of 16384 pages share about 0.6 pages.
            let common = w.iter().filter(|p| a.binary_search(p).is_ok()).count();
            assert!(common < 10, "{common} pages in common");
        }
        let mut other = args;
        other[7] = "8";
        let (w3, a3, _) = picks(&other);
        assert_ne!((w3, a3), (w1, a1), "another seed, other streams");
    }
}
