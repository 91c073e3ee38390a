//! The row schema: what one reporting interval says, in every output (table, JSON, CSV, the plot,
//! Prometheus). Producers (the guest protocol, the interval work, the balloon) fill it; reporting
//! reads nothing else.
//!
//! - **Host memory usage**: machine pages backing guest RAM (from the PMP-MMP map) plus the VMM's
//!   own overhead.
//! - **Guest memory usage**: active memory, estimated by sampling (reads and writes by the access
//!   sampler, writes by the dirty log).
//! - **The guest's own view** and **truth** come from the guest over the report channel and are
//!   used only to check the estimators.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The version of the rows' JSON schema (`docs/schema.json`), written as `schema_version` in every
/// row of `memvisor run` and `memvisor host`: raised when a field is renamed or removed, or its
/// type or meaning changes (adding a field is a change too: the schema refuses unknown fields).
pub const SCHEMA_VERSION: u32 = 1;

/// A row's `schema_version`: always [`SCHEMA_VERSION`] when written. Reading takes a row without
/// it (an older output) and refuses another version with a clear error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchemaVersion;

impl Serialize for SchemaVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(SCHEMA_VERSION)
    }
}

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if v == u64::from(SCHEMA_VERSION) {
            Ok(SchemaVersion)
        } else {
            Err(serde::de::Error::custom(format!(
                "a row of schema version {v}; this memvisor reads version {SCHEMA_VERSION}"
            )))
        }
    }
}

/// The guest's own view of its memory (its kernel's lists).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestView {
    pub allocated_pages: u64,
    pub free_pages: u64,
    pub heap_pages: u64,
    pub allocated_mib: f64,
    pub free_mib: f64,
    /// The guest could not meet an allocation (its pool, less the balloon under `--limit`, ran
    /// out): the workload stopped there.
    pub out_of_memory: bool,
}

/// Ground truth for one interval, as the guest reported it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Truth {
    pub touched_pages: u64,
    pub written_pages: u64,
    pub touched_mib: f64,
    pub written_mib: f64,
    pub iterations: u64,
    /// Page accesses per second of guest time.
    pub rate: f64,
}

/// Host memory usage.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HostUsage {
    /// Machine memory charged to this VM: backed guest pages + overhead.
    pub host_mib: f64,
    /// Guest pages with a machine page of their own (incl. shared ones).
    pub backed_mib: f64,
    /// VMM overhead: RSS minus resident guest RAM.
    pub overhead_mib: f64,
    pub untouched_mib: f64,
    /// Read but never written: mapped to the host's zero page, no machine page.
    pub zero_mib: f64,
    pub swapped_mib: f64,
    /// SHRD: guest pages whose machine page other guest pages map too, of this VM or of any
    /// (KSM), exact from PFNs; counted in `backed_mib`.
    pub shared_mib: f64,
    /// SHRDSVD: this VM's part of the machine pages sharing saves. A machine page that m guest
    /// pages map saves m − 1 pages, each sharer charged (m − 1)/m, so the VMs' parts add up to
    /// the host's saving. `host_mib` is `backed_mib` − this + `overhead_mib`.
    pub shared_saved_mib: f64,
    /// Distinct machine pages behind the shared pages.
    pub shared_frames: u64,
    /// The kernel's own KSM figures for the comparison (`--ksm` runs; null otherwise).
    pub ksm: Option<KsmKernel>,
    /// Given back to the host by the balloon (inflated or reported free), untouched since.
    pub released_mib: f64,
    /// Touched before, now neither resident nor in any swap (the VMM dropped it): no machine page.
    pub discarded_mib: f64,
    /// In the VMM's own swap file (hypervisor swap, `--swap`) as the map last saw it; not in
    /// `swapped_mib` (the host kernel's swap). With `untouched`, `zero`, `backed` (shared
    /// included), `swapped`, `released` and `discarded` it makes up configured RAM exactly.
    pub vmm_swapped_mib: f64,
    /// Pages written by the VMM itself (image, boot info), counted in backed.
    pub vmm_written_mib: f64,
    pub configured_mib: f64,
    pub backed_pages: u64,
    pub zero_pages: u64,
    pub released_pages: u64,
    /// Whether PFNs were visible. Without them (no `CAP_SYS_ADMIN`) zero and backed pages are
    /// told apart by whether they were ever written, and sharing is not seen.
    pub pfn_visible: bool,
}

/// The kernel's own KSM figures, beside the PFN count (`shared_mib`, `shared_saved_mib`) they
/// should agree with up to the scan in progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KsmKernel {
    /// `/proc/PID/ksm_stat` `ksm_merging_pages`: this VMM's pages merged by ksmd (SHRD's figure;
    /// it keeps counting a merged page whose other sharers left, until ksmd looks again).
    pub merging_pages: u64,
    /// `ksm_zero_pages`: pages merged into the zero page (`use_zero_pages`), in `zero_mib`.
    pub zero_pages: u64,
    /// `ksm_process_profit`: merged and zero pages less ksmd's rmap items, MiB.
    pub process_profit_mib: f64,
    /// Host-wide `/sys/kernel/mm/ksm/pages_sharing`: pages saved by all of KSM (the sum of every
    /// VM's `shared_saved_mib`, in pages, when only these VMs merge).
    pub host_pages_sharing: u64,
    /// Host-wide `pages_shared`: KSM pages in use.
    pub host_pages_shared: u64,
    /// Host-wide `full_scans`: ksmd's passes over all mergeable memory so far.
    pub full_scans: u64,
}

/// Active memory in one interval, estimated by stratified sampling: the pages touched (or, for
/// the write estimate, written) for the first time are counted exactly; the pages touched
/// (written) before are sampled, `t` of `n`, and scaled up.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Active {
    /// Sample size and touched samples.
    pub n: u64,
    pub t: u64,
    /// The part counted exactly: first touches (first writes) seen by the harvest.
    pub exact_mib: f64,
    /// The population the sample was drawn from: the pages touched (written) before, and for
    /// the access estimate the untouched pages the VMM mapped to the zero page too (all of RAM
    /// with `--plain-sampling`).
    pub sampled_from_mib: f64,
    /// Picked pages that could not be armed and were replaced (access estimate only).
    pub skipped: u64,
    /// First touches that went through the fault handler in the interval (access estimate only):
    /// missing pages of a registered region that were not sampled, i.e. pages released since their
    /// last touch (never-touched ones are mapped to the zero page when their region is registered).
    pub handler_fills: u64,
    pub estimate_mib: f64,
    /// 95% interval: Wilson's for the sampled part, with the finite population correction.
    pub ci_low_mib: f64,
    pub ci_high_mib: f64,
    pub fast_mib: f64,
    pub slow_mib: f64,
    pub max_mib: f64,
    /// Estimate minus the guest's truth (touched for the access estimate, written for the write
    /// estimate), when the truth is known.
    pub error_mib: Option<f64>,
    /// The write estimate only (`None`, and absent from JSON, on the access estimate): the
    /// estimate per second of the interval, what QEMU's calc-dirty-rate reports (a page written
    /// many times in the interval counts once). See `observe::usage::dirty_rate_mib_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_rate_mib_s: Option<f64>,
}

/// The VMM's work at the interval's closing boundary, with the vCPU stopped (the guest paused),
/// in milliseconds of wall time, by part (`observe::interval::IntervalWork::end`). Hypervisor
/// swap's own work at the same boundary is `swap.out_ms`, not in here.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VmmWork {
    /// All of it: the parts below and the glue between them.
    pub work_ms: f64,
    /// Reading KVM's dirty log and harvesting the PMP-MMP map (first touches and first writes
    /// found, pages looked up), and forming both estimates.
    pub harvest_ms: f64,
    /// The access sampler's round: closing the one that ended and arming the next.
    pub access_round_ms: f64,
    /// The write sampler's round: drawing the next sample and write-protecting it
    /// (`KVM_CLEAR_DIRTY_LOG`).
    pub write_round_ms: f64,
    /// Re-reading the map in full (KSM runs, and the last row); 0 otherwise.
    pub map_ms: f64,
    /// Forming the row's host usage (the map's counts, the VMM's resident set).
    pub row_ms: f64,
    /// Memslots whose dirty log was read (the others could hold no dirty page).
    pub dirty_log_slots: u64,
    /// Of `harvest_ms`: the `PAGEMAP_SCAN` of guest RAM that finds the populated pages (0 when
    /// the map harvests by whole-RAM passes).
    pub scan_ms: f64,
    /// The scan's `PAGEMAP_SCAN` ioctls: one per range between runs of words wholly present at
    /// the last scan, which it skips.
    pub scan_ioctls: u64,
}

/// The virtio-balloon's side of a row.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BalloonView {
    /// Pages in the balloon (inflated minus deflated), and the device's target.
    pub balloon_mib: f64,
    pub target_mib: f64,
    /// Free page reporting so far: extents and MiB released.
    pub reported_extents: u64,
    pub reported_mib: f64,
    /// The guest's own view from the balloon's statistics queue (`source` says so), as of its
    /// last answer (asked for at every interval tick).
    pub guest_stats: Option<GuestStats>,
    /// Malformed requests the device skipped or refused.
    pub errors: u64,
}

/// Hypervisor swap (`--swap`) in one interval: ESX's SWCUR, SWTGT, SWR/s and SWW/s.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Swap {
    /// Guest RAM in the VMM's swap file now (pages that read as zero at swap-out included: they
    /// were dropped too), and the target.
    pub swapped_mib: f64,
    pub target_mib: f64,
    /// Read back (page-ins) and written out (page-outs) per second of the interval's real length.
    pub in_mib_s: f64,
    pub out_mib_s: f64,
    /// Pages brought back and swapped out in this interval.
    pub page_ins: u64,
    pub page_outs: u64,
    /// Of `page_outs`, pages that were on a shared machine page (KSM): swapped out only when the
    /// unshared backed pages were not enough.
    pub shared_page_outs: u64,
    /// The page-ins' waits as the fault handler measured them (fault read to page in place), in
    /// microseconds; `None` when there were none.
    pub page_in_us_p50: Option<f64>,
    pub page_in_us_p99: Option<f64>,
    /// The VMM's wall time at this interval's closing boundary spent swapping out (choosing the
    /// pages, writing them, dropping them from guest RAM), in milliseconds; the vCPU is stopped
    /// meanwhile. 0 when the boundary swapped nothing out (the target was reached, swapping
    /// stopped, or the run ended).
    pub out_ms: f64,
    /// The page-ins' waits in this interval added up (each from the fault read to the page in
    /// place, as the fault handler measured it), in milliseconds: a lower bound of the time the
    /// guest's faulting accesses waited for swapped pages (the wake-ups of the handler and of the
    /// faulting thread are not in it).
    pub in_ms: f64,
    /// The swap file could not take more (full, a short write, an I/O error): swapping stopped.
    pub stopped: bool,
}

/// The guest's own view, from the balloon's last statistics buffer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestStats {
    pub free_mib: Option<f64>,
    pub total_mib: Option<f64>,
    pub available_mib: Option<f64>,
    /// Where the numbers come from.
    pub source: String,
}

/// Why a run ended, on its last row.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// The guest ran its workload and halted.
    Done,
    /// The guest failed (a fault, out of memory, halted early): the run's error says how.
    GuestError,
    /// `--timeout` ran out.
    Timeout,
    /// SIGINT or SIGTERM.
    Sigint,
    Sigterm,
    /// Whoever read the rows went away (a closed pipe).
    OutputClosed,
    /// A controller asked the run to stop (`stop` on the control socket).
    Stopped,
    /// A page swapped out by the VMM (`--swap`) could not be read back.
    SwapError,
}

impl EndReason {
    /// Every reason, in the order the Prometheus enum-style gauge lists them.
    pub const ALL: [EndReason; 8] = [
        EndReason::Done,
        EndReason::GuestError,
        EndReason::Timeout,
        EndReason::Sigint,
        EndReason::Sigterm,
        EndReason::OutputClosed,
        EndReason::Stopped,
        EndReason::SwapError,
    ];

    /// The word the table shows.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Done => "done",
            EndReason::GuestError => "guest-error",
            EndReason::Timeout => "timeout",
            EndReason::Sigint => "sigint",
            EndReason::Sigterm => "sigterm",
            EndReason::OutputClosed => "output-closed",
            EndReason::Stopped => "stopped",
            EndReason::SwapError => "swap-error",
        }
    }
}

/// The phase name of a row that ended between two phases.
pub const BETWEEN_PHASES: &str = "-";

/// One reporting interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Row {
    /// The schema's version, [`SCHEMA_VERSION`].
    pub schema_version: SchemaVersion,
    /// Seconds since the guest started.
    pub time_s: f64,
    /// Interval number (0-based).
    pub interval: u64,
    /// The workload phase running when the interval ended.
    pub phase: String,
    /// On the last row only: why the run ended (its interval may be partial).
    pub end: Option<EndReason>,
    /// The interval's real length in seconds (rates are per this length).
    pub length_s: f64,
    /// The interval ended before its boundary (the run's last row, cut short): its rates are over
    /// a short length and its counts are not comparable to a full interval's.
    pub partial: bool,
    /// Seconds of the interval the vCPU was held out of the guest by a controller's `pause`
    /// (the host scheduler's `low` state): the guest did no work then.
    pub paused_s: f64,
    pub configured_mib: f64,
    pub guest: GuestView,
    pub truth: Option<Truth>,
    pub host: Option<HostUsage>,
    /// Active memory, reads and writes (the access sampler); `None` when it is off.
    pub active: Option<Active>,
    /// Whether reads are seen: false when the access sampler is off or unavailable (then only
    /// writes are estimated, and `active` is `None`).
    pub reads_seen: bool,
    /// Active memory as seen through writes (KVM's dirty log).
    pub active_writes: Option<Active>,
    /// The virtio-balloon, when the guest has one.
    pub balloon: Option<BalloonView>,
    /// Hypervisor swap, when it is on (`--swap`).
    pub swap: Option<Swap>,
    /// The `check` phase that ended in this interval, if one did.
    pub check: Option<Check>,
    /// What the interval's closing boundary cost the VMM, the guest paused.
    pub vmm: Option<VmmWork>,
}

/// What a `check` phase found, on the row of the interval in which it ended: of the heap pages
/// it read, those still holding what the app wrote there and those reading zero (the rest were
/// changed). When more than one check phase ended in the interval, their counts add up and their
/// names are joined with `; `.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Check {
    pub phase: String,
    pub checked_pages: u64,
    pub intact_pages: u64,
    pub zero_pages: u64,
    pub intact_mib: f64,
    pub zero_mib: f64,
}

impl Check {
    /// Adds another check phase's counts (same interval).
    pub fn add(&mut self, other: Check) {
        if !self.phase.is_empty() {
            self.phase.push_str("; ");
        }
        self.phase.push_str(&other.phase);
        self.checked_pages += other.checked_pages;
        self.intact_pages += other.intact_pages;
        self.zero_pages += other.zero_pages;
        self.intact_mib += other.intact_mib;
        self.zero_mib += other.zero_mib;
    }
}

impl Row {
    /// Every active-memory estimate the row carries, with its kind: `"access"` (reads and
    /// writes, the access sampler) and `"writes"` (the dirty log). The plot, CSV and Prometheus
    /// outputs draw whatever this lists.
    pub fn actives(&self) -> impl Iterator<Item = (&'static str, &Active)> {
        [
            ("access", self.active.as_ref()),
            ("writes", self.active_writes.as_ref()),
        ]
        .into_iter()
        .filter_map(|(kind, a)| a.map(|a| (kind, a)))
    }

    /// Fills the estimates' errors once the truth is known: the access estimate against the
    /// pages touched, the write estimate against the pages written.
    pub fn attach_truth(&mut self, truth: Truth) {
        if let Some(a) = &mut self.active {
            a.error_mib = Some(a.estimate_mib - truth.touched_mib);
        }
        if let Some(a) = &mut self.active_writes {
            a.error_mib = Some(a.estimate_mib - truth.written_mib);
        }
        self.truth = Some(truth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_says_its_schema_version_and_another_version_is_refused() {
        let text = serde_json::to_string(&Row::default()).unwrap();
        assert!(
            text.starts_with(&format!("{{\"schema_version\":{SCHEMA_VERSION},")),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Row>(&text).unwrap(), Row::default());
        // An older row without it reads; another version does not, and says why.
        assert!(serde_json::from_str::<Row>(r#"{"time_s": 1.0}"#).is_ok());
        let e = serde_json::from_str::<Row>(r#"{"schema_version": 99}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("schema version 99"), "{e}");
        assert!(serde_json::from_str::<Row>(r#"{"schema_version": "1"}"#).is_err());
    }
}
