//! The guest protocol as a plain state machine: report-channel messages and clock readings in;
//! replies, the guest's truths and the guest's verdict out. No KVM here, so every message kind and
//! every failure is unit-tested (as vm-superio tests its devices).
//!
//! The VMM feeds it each decoded [`Message`] with the interval its clock is in
//! ([`Protocol::message`]); the protocol answers with the reply the guest is owed and what the
//! message told ([`News`]): the guest's exact truth for an interval that ended, or a phase that
//! ended. Pairing truths with rows is not its business (`vmm::rows` does it). When the guest
//! halts, [`Protocol::verdict`] says whether it ran its whole workload.
//!
//! The guest is not trusted: a message for an unknown phase or from a future interval is counted
//! as a violation and ignored, and DONE counts only after BOOT and every phase's end.

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::contract::abi::{self, Message, MsgKind};
use crate::contract::workload::{Phase, Workload};
use crate::row::{GuestView, Truth};
use crate::units::pages_mib;

/// A phase as the guest ran it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PhaseRecord {
    pub index: u64,
    pub name: String,
    pub started: bool,
    pub ended: bool,
    pub start_s: f64,
    pub end_s: f64,
    /// Distinct heap pages touched / written over the whole phase.
    pub touched_pages: u64,
    pub written_pages: u64,
    pub iterations: u64,
    pub status: u64,
    /// The guest's lists when the phase ended.
    pub allocated_pages: u64,
    pub free_pages: u64,
    pub heap_pages: u64,
    /// `check` phases: pages whose first word held what `touch ... write` put there, and pages
    /// that read zero (0 for other phases).
    pub intact_pages: u64,
    pub zero_pages: u64,
    /// Guest seconds the phase took (from its TSC).
    pub guest_seconds: f64,
    /// The VMM's clock when the phase started, as the guest read it with the TIME hypercall (ns).
    pub vmm_start_ns: u64,
}

/// What the guest kernel said at boot.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct BootReport {
    pub pool_start: u64,
    pub pool_pages: u64,
    pub reserved_pages: u64,
}

/// Why the guest did not run its workload to the end. Messages number phases from 1, as workload
/// parse errors do (the `phase` fields are the ABI's indices, from 0).
#[derive(Clone, Debug, Error, PartialEq)]
pub enum GuestError {
    #[error(
        "the guest took exception {name} (vector {vector}, error code {error:#x}) in {ring} at RIP {rip:#x}{cr2}"
    )]
    Exception {
        name: &'static str,
        vector: u64,
        error: u64,
        ring: &'static str,
        rip: u64,
        cr2: String,
    },
    #[error("the guest kernel could not boot: {0}")]
    Boot(&'static str),
    #[error("the guest ran out of memory in phase {} ({name})", .phase + 1)]
    OutOfMemory { phase: u64, name: String },
    #[error(
        "the guest found changed memory in phase {} ({name}): {accesses} accesses saw a page that did not hold what the app last wrote",
        .phase + 1
    )]
    Corrupt {
        phase: u64,
        name: String,
        accesses: u64,
    },
    /// A `verify` failed over pages no earlier phase wrote ([`GuestError::explained`]).
    #[error(
        "phase {} ({name}) verified pages that were never written: {} of them were not written by an earlier phase since they were allocated, so they read zero ({accesses} accesses found a page not holding what the app would have written; write them first, e.g. \"touch {} write\")",
        .phase + 1,
        crate::units::fmt_bytes(.never_written * crate::units::PAGE_SIZE),
        crate::units::fmt_size_spec(.pages * crate::units::PAGE_SIZE)
    )]
    NeverWritten {
        phase: u64,
        name: String,
        accesses: u64,
        /// Pages of the phase no earlier phase wrote, and the pages it touches.
        never_written: u64,
        pages: u64,
    },
    #[error("the guest reported failure status {status} in phase {} ({name})", .phase + 1)]
    PhaseFailed {
        phase: u64,
        name: String,
        status: u64,
    },
    #[error("the guest halted before finishing its workload (last phase: {phase}){device}")]
    HaltedEarly { phase: String, device: String },
    #[error(
        "the guest said it was done without running its workload ({}; {ended} of {phases} phases ended)",
        if *.booted { "after BOOT" } else { "no BOOT" }
    )]
    FinishedEarly {
        booted: bool,
        ended: usize,
        phases: usize,
    },
}

/// What the VMM owes the guest for a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to write back.
    None,
    /// Write this value into the message's `reply` field.
    Value(u64),
    /// Sleep this long or until the next interval tick, whichever is first, then reply 1 if the
    /// tick ended the sleep, else 0.
    Sleep(Duration),
}

/// What a message told the VMM, besides its reply.
#[derive(Clone, Debug, PartialEq)]
pub enum News {
    Nothing,
    /// The guest's exact truth for `interval` (it saw the interval number change, or it is about
    /// to halt and reports the interval it is in).
    Truth {
        interval: u64,
        truth: Truth,
    },
    /// Phase `index` ended (its record is complete in [`Protocol::phases`]).
    PhaseEnded(usize),
}

/// The protocol's state.
#[derive(Debug)]
pub struct Protocol {
    tsc_khz: u64,
    phases: Vec<PhaseRecord>,
    current_phase: Option<usize>,
    boot: Option<BootReport>,
    guest: GuestView,
    done: bool,
    failure: Option<GuestError>,
    violations: u64,
    first_violation: Option<String>,
}

impl GuestError {
    /// This error in the light of the workload: a failed `verify` over pages that no earlier
    /// phase wrote becomes [`GuestError::NeverWritten`] (nothing changed them: they were never
    /// written); any other error is returned as it is.
    pub fn explained(self, workload: &Workload) -> GuestError {
        match self {
            GuestError::Corrupt {
                phase,
                name,
                accesses,
            } => {
                let i = usize::try_from(phase).unwrap_or(usize::MAX);
                match workload.never_written(i) {
                    0 => GuestError::Corrupt {
                        phase,
                        name,
                        accesses,
                    },
                    never_written => GuestError::NeverWritten {
                        phase,
                        name,
                        accesses,
                        never_written,
                        pages: match workload.phases.get(i) {
                            Some(Phase::Touch(t)) => t.pages,
                            _ => never_written,
                        },
                    },
                }
            }
            e => e,
        }
    }
}

impl Protocol {
    /// A protocol for a workload with these phase names, on a guest whose TSC runs at `tsc_khz`.
    pub fn new(phase_names: impl IntoIterator<Item = String>, tsc_khz: u64) -> Self {
        Protocol {
            tsc_khz: tsc_khz.max(1),
            phases: phase_names
                .into_iter()
                .enumerate()
                .map(|(i, name)| PhaseRecord {
                    index: i as u64,
                    name,
                    ..Default::default()
                })
                .collect(),
            current_phase: None,
            boot: None,
            guest: GuestView::default(),
            done: false,
            failure: None,
            violations: 0,
            first_violation: None,
        }
    }

    /// The guest's view of its memory, as of its last message.
    pub fn guest(&self) -> &GuestView {
        &self.guest
    }

    /// The phases as the guest ran them.
    pub fn phases(&self) -> &[PhaseRecord] {
        &self.phases
    }

    /// What the guest kernel said at boot.
    pub fn boot(&self) -> Option<BootReport> {
        self.boot
    }

    /// Messages that broke the protocol (ignored), and the first of them.
    pub fn violations(&self) -> (u64, Option<&str>) {
        (self.violations, self.first_violation.as_deref())
    }

    /// The failure the guest reported last (a fault, running out of memory), if any.
    pub fn failure(&self) -> Option<&GuestError> {
        self.failure.as_ref()
    }

    /// The name of the phase running now, or `boot`, `-` (between phases) or `done`.
    pub fn phase_name(&self) -> String {
        match self.current_phase {
            Some(i) => self.phases[i].name.clone(),
            None if self.done => "done".into(),
            None if self.boot.is_none() => "boot".into(),
            None => crate::row::BETWEEN_PHASES.into(),
        }
    }

    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.violations <= 5 {
            log::warn!("guest protocol: {what}");
        }
        self.first_violation.get_or_insert(what);
    }

    fn ticks_to_s(&self, ticks: u64) -> f64 {
        ticks as f64 / (self.tsc_khz as f64 * 1e3)
    }

    /// Handles one message; `now` is the time since the guest started and `current` the interval
    /// the VMM's clock is in.
    pub fn message(
        &mut self,
        msg: &Message,
        kind: MsgKind,
        now: Duration,
        current: u64,
    ) -> (Reply, News) {
        self.guest = GuestView {
            allocated_pages: msg.alloc_pages,
            free_pages: msg.free_pages,
            heap_pages: msg.heap_pages,
            allocated_mib: pages_mib(msg.alloc_pages),
            free_mib: pages_mib(msg.free_pages),
            out_of_memory: self.guest.out_of_memory
                || (kind == MsgKind::PhaseEnd && msg.arg1 == abi::PHASE_OOM),
        };
        let now_s = now.as_secs_f64();
        let index = usize::try_from(msg.phase).unwrap_or(usize::MAX);
        match kind {
            MsgKind::Boot => {
                self.boot = Some(BootReport {
                    pool_start: msg.arg0,
                    pool_pages: msg.arg1,
                    reserved_pages: msg.arg2,
                });
            }
            MsgKind::PhaseStart if self.boot.is_none() => {
                self.violation(format!("PHASE_START for phase {} before BOOT", index + 1));
            }
            MsgKind::PhaseStart => match self.phases.get_mut(index) {
                Some(p) => {
                    p.started = true;
                    p.start_s = now_s;
                    p.vmm_start_ns = msg.arg0;
                    self.current_phase = Some(index);
                }
                None => self.violation(format!(
                    "PHASE_START for unknown phase index {} (the ABI's, from 0)",
                    msg.phase
                )),
            },
            MsgKind::PhaseEnd => {
                if self.phase_end(msg, index, now_s) {
                    return (Reply::None, News::PhaseEnded(index));
                }
            }
            MsgKind::Interval if msg.interval > current => {
                self.violation(format!(
                    "INTERVAL report for interval {} from the future (current {current})",
                    msg.interval
                ));
            }
            MsgKind::Interval => {
                let secs = self.ticks_to_s(msg.arg0);
                let truth = Truth {
                    touched_pages: msg.touched,
                    written_pages: msg.written,
                    touched_mib: pages_mib(msg.touched),
                    written_mib: pages_mib(msg.written),
                    iterations: msg.iterations,
                    rate: if secs > 0.0 {
                        msg.iterations as f64 / secs
                    } else {
                        0.0
                    },
                };
                let interval = msg.interval;
                return (Reply::None, News::Truth { interval, truth });
            }
            MsgKind::Sleep => {
                return (Reply::Sleep(Duration::from_nanos(msg.arg0)), News::Nothing);
            }
            MsgKind::Time => {
                let ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                return (Reply::Value(ns), News::Nothing);
            }
            MsgKind::Done => {
                self.done = true;
                self.current_phase = None;
            }
            MsgKind::Fault => self.failure = Some(fault(msg)),
        }
        (Reply::None, News::Nothing)
    }

    /// Records a phase's end; false if the message broke the protocol.
    fn phase_end(&mut self, msg: &Message, index: usize, now_s: f64) -> bool {
        let secs = self.ticks_to_s(msg.arg0);
        let Some(p) = self.phases.get_mut(index) else {
            self.violation(format!(
                "PHASE_END for unknown phase index {} (the ABI's, from 0)",
                msg.phase
            ));
            return false;
        };
        if !p.started || p.ended {
            let what = if p.ended {
                "already ended"
            } else {
                "never started"
            };
            let what = format!("PHASE_END for phase {}, which {what}", index + 1);
            self.violation(what);
            return false;
        }
        p.ended = true;
        p.end_s = now_s;
        p.touched_pages = msg.touched;
        p.written_pages = msg.written;
        p.iterations = msg.iterations;
        p.status = msg.arg1;
        p.allocated_pages = msg.alloc_pages;
        p.free_pages = msg.free_pages;
        p.heap_pages = msg.heap_pages;
        p.intact_pages = msg.arg2 & 0xffff_ffff;
        p.zero_pages = msg.arg2 >> 32;
        p.guest_seconds = secs;
        self.current_phase = None;
        let (phase, name) = (p.index, p.name.clone());
        match msg.arg1 {
            abi::PHASE_OK => {}
            abi::PHASE_OOM => self.failure = Some(GuestError::OutOfMemory { phase, name }),
            abi::PHASE_CORRUPT => {
                self.failure = Some(GuestError::Corrupt {
                    phase,
                    name,
                    accesses: msg.arg2,
                })
            }
            status => {
                self.failure = Some(GuestError::PhaseFailed {
                    phase,
                    name,
                    status,
                })
            }
        }
        true
    }

    /// The verdict once the guest has halted: `Ok` only if it booted, ran every phase to its end
    /// and said DONE, with no failure reported. `device` is the report channel's own tally of
    /// malformed accesses and the first of them, for the message.
    pub fn verdict(&mut self, device: (u64, Option<&str>)) -> Result<(), GuestError> {
        if let Some(f) = self.failure.take() {
            return Err(f);
        }
        if !self.done {
            let errors = device.0 + self.violations;
            let first = device.1.or(self.first_violation.as_deref());
            return Err(GuestError::HaltedEarly {
                phase: self.phase_name(),
                device: match first {
                    Some(e) => format!("; it sent {errors} malformed report(s), the first: {e}"),
                    None => String::new(),
                },
            });
        }
        let ended = self.phases.iter().filter(|p| p.ended).count();
        if self.boot.is_none() || ended < self.phases.len() {
            return Err(GuestError::FinishedEarly {
                booted: self.boot.is_some(),
                ended,
                phases: self.phases.len(),
            });
        }
        Ok(())
    }
}

/// The failure a FAULT message reports.
fn fault(msg: &Message) -> GuestError {
    if msg.arg0 >= abi::FAULT_BOOT_ERROR {
        return GuestError::Boot(match msg.arg0 {
            abi::BOOT_ERR_MAGIC => "the boot-info page has a bad magic",
            abi::BOOT_ERR_APP => "the embedded app has a bad header",
            abi::BOOT_ERR_NO_MEMORY => {
                "its reserved area (page tables, truth bitmaps) does not fit below 1 GiB"
            }
            abi::BOOT_ERR_TOO_LARGE => "guest RAM is larger than its kernel supports",
            _ => "unknown boot error",
        });
    }
    GuestError::Exception {
        name: exception_name(msg.arg0),
        vector: msg.arg0,
        error: msg.arg1,
        ring: if msg.cs & 3 == 3 {
            "the app (ring 3)"
        } else {
            "the guest kernel (ring 0)"
        },
        rip: msg.arg2,
        cr2: if msg.arg0 == 14 {
            format!(", address {:#x}", msg.cr2)
        } else {
            String::new()
        },
    }
}

/// The name of an x86 exception vector.
pub fn exception_name(v: u64) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn proto(phases: usize) -> Protocol {
        Protocol::new((0..phases).map(|i| format!("phase{i}")), 1_000_000)
    }

    fn msg(kind: MsgKind) -> Message {
        Message::new(kind)
    }

    /// Sends a message while the VMM's clock is in interval 0.
    fn send(p: &mut Protocol, m: Message) -> Reply {
        send_in(p, m, 0).0
    }

    fn send_in(p: &mut Protocol, m: Message, current: u64) -> (Reply, News) {
        let kind = m.decode_kind().unwrap();
        p.message(&m, kind, SEC, current)
    }

    fn phase_msg(kind: MsgKind, phase: u64) -> Message {
        let mut m = msg(kind);
        m.phase = phase;
        m
    }

    fn interval_msg(interval: u64, touched: u64, written: u64) -> Message {
        let mut m = msg(MsgKind::Interval);
        m.interval = interval;
        m.touched = touched;
        m.written = written;
        m
    }

    #[test]
    fn messages_number_phases_from_1_and_say_when_verified_pages_were_never_written() {
        let w =
            Workload::parse("alloc 8M; touch 4M write; touch 8M read verify", 32 << 20).unwrap();
        let corrupt = |phase| GuestError::Corrupt {
            phase,
            name: "touch 8M read verify".into(),
            accesses: 1024,
        };
        let e = corrupt(2).explained(&w);
        assert!(
            matches!(
                e,
                GuestError::NeverWritten {
                    never_written: 1024,
                    pages: 2048,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "phase 3 (touch 8M read verify) verified pages that were never written: 4.0 MiB"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("\"touch 8M write\"") && !msg.contains("changed"),
            "{msg}"
        );
        // Over written pages a failed verify means changed memory, as before.
        let w =
            Workload::parse("alloc 8M; touch 8M write; touch 8M read verify", 32 << 20).unwrap();
        let msg = corrupt(2).explained(&w).to_string();
        assert!(
            msg.starts_with("the guest found changed memory in phase 3 ("),
            "{msg}"
        );
        let oom = GuestError::OutOfMemory {
            phase: 0,
            name: "alloc 63M".into(),
        };
        assert_eq!(
            oom.explained(&w).to_string(),
            "the guest ran out of memory in phase 1 (alloc 63M)"
        );
    }

    #[test]
    fn a_whole_workload_gets_an_ok_verdict() {
        let mut p = proto(2);
        assert_eq!(p.phase_name(), "boot");
        let mut boot = msg(MsgKind::Boot);
        boot.arg0 = 2 << 20;
        boot.arg1 = 100;
        boot.alloc_pages = 3;
        send(&mut p, boot);
        assert_eq!(p.boot().unwrap().pool_pages, 100);
        assert_eq!(p.guest().allocated_pages, 3);
        assert_eq!(p.phase_name(), "-");
        let mut start = phase_msg(MsgKind::PhaseStart, 0);
        start.arg0 = 42;
        send(&mut p, start);
        assert_eq!(p.phase_name(), "phase0");
        assert_eq!(p.phases()[0].vmm_start_ns, 42);
        let mut end = phase_msg(MsgKind::PhaseEnd, 0);
        end.touched = 7;
        end.arg0 = 2_000_000_000; // 2 s at 1 GHz
        send(&mut p, end);
        assert!(p.phases()[0].ended);
        assert_eq!(p.phases()[0].touched_pages, 7);
        assert!((p.phases()[0].guest_seconds - 2.0).abs() < 1e-9);
        send(&mut p, phase_msg(MsgKind::PhaseStart, 1));
        send(&mut p, phase_msg(MsgKind::PhaseEnd, 1));
        send(&mut p, msg(MsgKind::Done));
        assert_eq!(p.phase_name(), "done");
        assert_eq!(p.verdict((0, None)), Ok(()));
    }

    #[test]
    fn done_without_boot_is_not_a_success() {
        let mut p = proto(3);
        send(&mut p, msg(MsgKind::Done));
        let e = p.verdict((0, None)).unwrap_err();
        assert_eq!(
            e,
            GuestError::FinishedEarly {
                booted: false,
                ended: 0,
                phases: 3
            }
        );
        assert!(e.to_string().contains("no BOOT"), "{e}");
    }

    #[test]
    fn done_before_every_phase_ended_is_not_a_success() {
        let mut p = proto(3);
        send(&mut p, msg(MsgKind::Boot));
        send(&mut p, phase_msg(MsgKind::PhaseStart, 0));
        send(&mut p, phase_msg(MsgKind::PhaseEnd, 0));
        send(&mut p, msg(MsgKind::Done));
        assert!(matches!(
            p.verdict((0, None)),
            Err(GuestError::FinishedEarly {
                booted: true,
                ended: 1,
                phases: 3
            })
        ));
    }

    #[test]
    fn halting_without_done_reports_the_phase_and_malformed_reports() {
        let mut p = proto(1);
        send(&mut p, msg(MsgKind::Boot));
        send(&mut p, phase_msg(MsgKind::PhaseStart, 0));
        let e = p.verdict((2, Some("bad magic"))).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("phase0"), "{text}");
        assert!(
            text.contains("2 malformed report(s), the first: bad magic"),
            "{text}"
        );
    }

    #[test]
    fn a_fault_is_the_verdict_and_stays_visible_while_the_guest_spins() {
        let mut p = proto(1);
        send(&mut p, msg(MsgKind::Boot));
        let mut f = msg(MsgKind::Fault);
        f.arg0 = 14;
        f.arg1 = 4;
        f.arg2 = 0x4000_1234;
        f.cr2 = 0x7000_0000;
        f.cs = 0x2b;
        send(&mut p, f);
        // FAULT followed by silence (a timeout): the fault is still there to report.
        let shown = p.failure().unwrap().to_string();
        assert!(shown.contains("#PF page fault"), "{shown}");
        assert!(shown.contains("ring 3"), "{shown}");
        assert!(shown.contains("address 0x70000000"), "{shown}");
        assert!(matches!(
            p.verdict((0, None)),
            Err(GuestError::Exception { vector: 14, .. })
        ));
    }

    #[test]
    fn boot_errors_and_kernel_faults_are_named() {
        let mut p = proto(1);
        let mut f = msg(MsgKind::Fault);
        f.arg0 = abi::BOOT_ERR_TOO_LARGE;
        send(&mut p, f);
        assert!(matches!(p.failure(), Some(GuestError::Boot(s)) if s.contains("larger")));
        f.arg0 = 13;
        f.cs = 0x08;
        send(&mut p, f);
        let shown = p.failure().unwrap().to_string();
        assert!(shown.contains("ring 0") && shown.contains("#GP"), "{shown}");
    }

    #[test]
    fn out_of_memory_and_bad_status_fail_the_run() {
        let mut p = proto(2);
        send(&mut p, msg(MsgKind::Boot));
        send(&mut p, phase_msg(MsgKind::PhaseStart, 0));
        let mut end = phase_msg(MsgKind::PhaseEnd, 0);
        end.arg1 = abi::PHASE_OOM;
        send(&mut p, end);
        assert!(matches!(
            p.failure(),
            Some(GuestError::OutOfMemory { phase: 0, .. })
        ));
        send(&mut p, phase_msg(MsgKind::PhaseStart, 1));
        let mut end = phase_msg(MsgKind::PhaseEnd, 1);
        end.arg1 = abi::PHASE_CORRUPT;
        end.arg2 = 3;
        send(&mut p, end);
        let shown = p.failure().unwrap().to_string();
        assert!(shown.contains("3 accesses saw a page"), "{shown}");
        let mut p = proto(1);
        send(&mut p, msg(MsgKind::Boot));
        send(&mut p, phase_msg(MsgKind::PhaseStart, 0));
        let mut end = phase_msg(MsgKind::PhaseEnd, 0);
        end.arg1 = 9;
        send(&mut p, end);
        send(&mut p, msg(MsgKind::Done));
        assert!(matches!(
            p.verdict((0, None)),
            Err(GuestError::PhaseFailed { status: 9, .. })
        ));
    }

    #[test]
    fn unknown_or_unstarted_phases_are_violations_not_state() {
        let mut p = proto(1);
        send(&mut p, phase_msg(MsgKind::PhaseStart, 0)); // before BOOT
        send(&mut p, msg(MsgKind::Boot));
        send(&mut p, phase_msg(MsgKind::PhaseStart, 5));
        send(&mut p, phase_msg(MsgKind::PhaseEnd, u64::MAX));
        send(&mut p, phase_msg(MsgKind::PhaseEnd, 0)); // never started
        assert_eq!(p.violations().0, 4);
        assert!(p.violations().1.unwrap().contains("before BOOT"));
        assert!(!p.phases()[0].started && !p.phases()[0].ended);
        send(&mut p, msg(MsgKind::Done));
        assert!(p.verdict((0, None)).is_err());
    }

    #[test]
    fn sleep_and_time_ask_for_replies() {
        let mut p = proto(1);
        let mut s = msg(MsgKind::Sleep);
        s.arg0 = 1_500_000;
        assert_eq!(send(&mut p, s), Reply::Sleep(Duration::from_micros(1500)));
        let t = msg(MsgKind::Time);
        assert_eq!(
            p.message(&t, MsgKind::Time, Duration::from_millis(3), 0),
            (Reply::Value(3_000_000), News::Nothing)
        );
        assert_eq!(send(&mut p, msg(MsgKind::Boot)), Reply::None);
    }

    #[test]
    fn an_interval_report_is_news_of_its_truth() {
        let mut p = proto(1);
        let mut m = interval_msg(2, 256, 128);
        m.iterations = 1000;
        m.arg0 = 500_000_000; // 0.5 s at 1 GHz
        let (reply, news) = send_in(&mut p, m, 3);
        assert_eq!(reply, Reply::None);
        let News::Truth { interval, truth } = news else {
            panic!("no truth: {news:?}");
        };
        assert_eq!(interval, 2);
        assert_eq!((truth.touched_pages, truth.written_pages), (256, 128));
        assert_eq!((truth.touched_mib, truth.written_mib), (1.0, 0.5));
        assert!((truth.rate - 2000.0).abs() < 1e-9, "{}", truth.rate);
        // The guest's report of the interval it is in (before it halts) is news too.
        assert!(matches!(
            send_in(&mut p, interval_msg(3, 1, 1), 3).1,
            News::Truth { interval: 3, .. }
        ));
        assert_eq!(p.violations().0, 0);
    }

    #[test]
    fn truths_from_the_future_are_violations_not_news() {
        let mut p = proto(1);
        assert_eq!(send_in(&mut p, interval_msg(5, 1, 1), 4).1, News::Nothing);
        assert_eq!(p.violations().0, 1);
        assert!(p.violations().1.unwrap().contains("from the future"));
    }

    #[test]
    fn a_phase_end_is_news_only_when_it_is_valid() {
        let mut p = proto(2);
        send(&mut p, msg(MsgKind::Boot));
        let mut end = phase_msg(MsgKind::PhaseEnd, 1);
        assert_eq!(send_in(&mut p, end, 0).1, News::Nothing, "never started");
        send(&mut p, phase_msg(MsgKind::PhaseStart, 1));
        end.arg2 = 3 | 5 << 32;
        assert_eq!(send_in(&mut p, end, 0).1, News::PhaseEnded(1));
        assert_eq!(
            (p.phases()[1].intact_pages, p.phases()[1].zero_pages),
            (3, 5)
        );
        assert_eq!(
            send_in(&mut p, phase_msg(MsgKind::PhaseEnd, 9), 0).1,
            News::Nothing
        );
        // A phase ends once: a repeat is a violation, and its counts are not taken.
        end.arg2 = 9;
        assert_eq!(send_in(&mut p, end, 0).1, News::Nothing);
        assert_eq!(p.phases()[1].intact_pages, 3);
        assert_eq!(p.violations().0, 3);
        assert!(p.violations().1.unwrap().contains("never started"));
    }

    #[test]
    fn every_message_updates_the_guest_view() {
        let mut p = proto(1);
        let mut m = msg(MsgKind::Time);
        m.alloc_pages = 256;
        m.free_pages = 512;
        send(&mut p, m);
        assert_eq!(p.guest().allocated_mib, 1.0);
        assert_eq!(p.guest().free_mib, 2.0);
    }
}
