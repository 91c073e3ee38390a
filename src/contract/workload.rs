//! The guest workload: a short script of phases, parsed from command-line text, checked against
//! the guest's RAM, and encoded into the boot info's phase table (`docs/abi.md`).
//!
//! # Grammar
//!
//! Phases are separated by `;`; whitespace around and between tokens is free; one trailing `;` (or
//! several) is fine, an empty phase anywhere else is an error. Keywords are case-sensitive.
//!
//! ```text
//! alloc SIZE      pages move from the guest kernel's free list to its allocated list and join
//!                 the app's heap (at its top)
//! free SIZE       the top SIZE of the heap goes back to the free list (LIFO)
//! touch SIZE [read|write|mixed] [DURATION] [seq|random] [hot P%:Q%] [verify] [fill zero|same|unique]
//!                 touch the first SIZE of the heap; options in any order, each at most once.
//!                 Defaults: write, seq, one pass (no duration), fill unique. `hot P%:Q%`: the
//!                 first P% of those pages receive Q% of the accesses; needs `random`, and Q > P.
//!                 `fill`: what writes put in a page (needs write or mixed): `unique` its index
//!                 + 1, `same` one word from the guest's seed (identical pages, across guests
//!                 with the same seed too), `zero` nothing (the page reads all zero).
//! idle DURATION   the guest sleeps
//! fault           (tests) the app touches an unmapped address; the guest stops there, so no
//!                 phase may follow
//! ```
//!
//! SIZE is a [`parse_size`] size (binary units: `64K`, `512M`, `2G`), a non-zero multiple of 4 KiB.
//! DURATION is a [`parse_duration`] duration (`2s`, `500ms`, `1.5s`; a bare number is seconds),
//! non-zero and at most [`MAX_PHASE_DURATION`] (a year, 8760h). P and Q are percentages with at
//! most one decimal (`2.5%`); the `%` signs are optional.
//!
//! Besides the syntax, [`Workload::parse`] walks the phases keeping track of the heap: it never
//! exceeds guest RAM, and `touch`/`free` never reach beyond it. A spec has 1 to [`MAX_PHASES`]
//! phases and at most [`MAX_SPEC_TEXT`] bytes of text. Every phase error names the phase (counted
//! from 1), its text, and the offending token or amount.

/// The workload grammar as `memvisor run --help` shows it (README's "Workload spec").
pub const GRAMMAR_HELP: &str = "\
Workload spec (--workload): phases separated by `;`
  alloc SIZE      pages move from the guest's free list to its allocated list (the app's heap)
  free SIZE       the top SIZE of the heap goes back to the free list
  touch SIZE [read|write|mixed] [DURATION] [seq|random] [hot P%:Q%] [verify]
                  access the first SIZE of the heap; without DURATION one pass
                  (hot P%:Q%: the first P% of the pages get Q% of the accesses; needs random)
                  (mixed: reads and writes in turn, access by access)
                  (verify: every access checksums the whole page against what the app wrote
                  there, so write the range first; a changed page fails the run)
  idle DURATION   sleep (the guest sleeps through a hypercall instead of spinning)
  check SIZE      read the first SIZE of the heap, whole pages; counts the pages still holding
                  what `touch ... write` wrote and the pages reading zero (JSON `check`)
  fault           (tests) the app touches an unmapped address
SIZE: 64K, 16M, 1G...; DURATION: 500ms, 2s, 1.5s...";

use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::contract::abi::{
    MAX_PHASES, MAX_SPEC_TEXT, PHASE_FILL_SAME, PHASE_FILL_ZERO, PHASE_MIXED, PHASE_RANDOM,
    PHASE_VERIFY, PHASE_WRITE, PhaseEntry, phase_kind,
};
use crate::units::{
    PAGE_SIZE, UnitError, fmt_bytes, fmt_duration_spec, fmt_size_spec, parse_duration, parse_size,
};

/// The default story: allocate, work on a subset, free most, idle, work again.
pub const DEFAULT_SPEC: &str =
    "alloc 192M; touch 64M write 3s; free 160M; idle 3s; touch 32M write 3s";

/// The longest phase duration: one year (8760h). The guest turns a duration into a TSC deadline;
/// a year stays far below 2^64 ticks for any TSC rate up to several hundred GHz, so the deadline
/// cannot wrap.
pub const MAX_PHASE_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A workload spec that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WorkloadError {
    #[error("the workload is empty: give at least one phase, e.g. \"{DEFAULT_SPEC}\"")]
    Empty,
    #[error(
        "the workload text is {len} bytes long; at most {MAX_SPEC_TEXT} bytes fit in the guest's boot info"
    )]
    TooLong { len: usize },
    #[error("the workload has {count} phases; at most {MAX_PHASES} are supported")]
    TooManyPhases { count: usize },
    #[error("phase {index} ({text:?}): {problem}")]
    Phase {
        /// Phase number, counted from 1.
        index: usize,
        /// The phase's text as written (trimmed).
        text: String,
        problem: PhaseProblem,
    },
}

/// What is wrong with one phase (wrapped in [`WorkloadError::Phase`], which adds the phase number
/// and text).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PhaseProblem {
    #[error("empty phase (remove the extra ';')")]
    EmptyPhase,
    #[error("unknown phase \"{0}\" (expected alloc, free, touch, idle, check or fault)")]
    UnknownKind(String),
    #[error("\"{0}\" needs a size, e.g. \"{0} 64M\"")]
    MissingSize(&'static str),
    #[error("{0}")]
    BadSize(UnitError),
    #[error("size \"{0}\" is zero; give at least 4K")]
    ZeroSize(String),
    #[error("size \"{0}\" is not a multiple of the 4 KiB page size")]
    UnalignedSize(String),
    #[error("\"{0}\" needs a duration, e.g. \"{0} 2s\"")]
    MissingDuration(&'static str),
    #[error("{0}")]
    BadDuration(UnitError),
    #[error("duration \"{0}\" is zero{hint}", hint = if *.1 { " (leave the duration out for a single pass)" } else { "" })]
    ZeroDuration(String, bool),
    #[error("duration \"{0}\" is too long (at most {max}h, one year)", max = MAX_PHASE_DURATION.as_secs() / 3600)]
    DurationTooLong(String),
    #[error("unexpected \"{token}\": {usage}")]
    Unexpected { token: String, usage: &'static str },
    #[error(
        "unknown touch option \"{0}\" (expected read, write, mixed, seq, random, verify, a duration such as 2s, hot P%:Q% or fill zero|same|unique)"
    )]
    UnknownOption(String),
    #[error("\"fill\" needs a content: \"fill zero\", \"fill same\" or \"fill unique\"")]
    MissingFill,
    #[error("unknown fill \"{0}\" (expected zero, same or unique)")]
    BadFill(String),
    #[error("\"fill {0}\" needs writes (write or mixed); a read touch writes nothing")]
    FillNeedsWrite(&'static str),
    #[error("\"{token}\" sets the {what} again (already set by \"{earlier}\")")]
    DuplicateOption {
        token: String,
        earlier: String,
        what: &'static str,
    },
    #[error(
        "\"hot\" needs a split such as \"hot 10%:90%\" (the first 10% of the pages get 90% of the accesses)"
    )]
    MissingHot,
    #[error("bad hot split \"{token}\": {reason}")]
    BadHot { token: String, reason: &'static str },
    #[error("\"hot\" needs \"random\" (a sequential pass spreads its accesses evenly)")]
    HotNeedsRandom,
    #[error("hot split \"{token}\" of {pages} pages leaves no hot or no cold page")]
    HotSplitEmpty { token: String, pages: u64 },
    #[error("allocates {} but the heap holds {} and guest RAM is {}", fmt_bytes(*.bytes), fmt_bytes(*.heap), fmt_bytes(*.ram))]
    AllocExceedsRam { bytes: u64, heap: u64, ram: u64 },
    #[error("frees {} but the heap holds {}", fmt_bytes(*.bytes), fmt_bytes(*.heap))]
    FreeExceedsHeap { bytes: u64, heap: u64 },
    #[error("touches {} but the heap holds {}", fmt_bytes(*.bytes), fmt_bytes(*.heap))]
    TouchExceedsHeap { bytes: u64, heap: u64 },
    #[error("comes after \"fault\", which stops the guest")]
    AfterFault,
}

/// Read or write accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Access {
    Read,
    #[default]
    Write,
    /// Reads and writes in turn, access by access.
    Mixed,
}

/// Sequential passes or random pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pattern {
    #[default]
    Seq,
    Random,
}

/// What a write puts in a page (the guest writes only a page's first word; the rest stays zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fill {
    /// The page's heap index + 1: every page differs.
    #[default]
    Unique,
    /// One word derived from the guest's seed: every page of the guest, and of any guest with the
    /// same seed, is identical (what page sharing merges).
    Same,
    /// Zero: the whole page reads zero.
    Zero,
}

impl Fill {
    /// The spec keyword.
    pub fn name(self) -> &'static str {
        match self {
            Fill::Unique => "unique",
            Fill::Same => "same",
            Fill::Zero => "zero",
        }
    }
}

/// A hot/cold split: the first `pages_permille` of the touched pages receive `share_permille` of
/// the accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hot {
    pub pages_permille: u32,
    pub share_permille: u32,
}

/// A touch phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touch {
    /// The first `pages` pages of the heap.
    pub pages: u64,
    pub access: Access,
    pub pattern: Pattern,
    /// How long to keep touching; `None` is a single pass over the pages.
    pub duration: Option<Duration>,
    pub hot: Option<Hot>,
    /// Check every access: the page must hold what the app last wrote there (write the range
    /// first); a mismatch fails the phase.
    pub verify: bool,
    /// What the writes put in the pages.
    pub fill: Fill,
}

impl Touch {
    /// Pages in the hot part (0 without a split).
    pub fn hot_pages(&self) -> u64 {
        match self.hot {
            Some(h) => (u128::from(self.pages) * u128::from(h.pages_permille) / 1000) as u64,
            None => 0,
        }
    }
}

/// One phase of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Alloc {
        pages: u64,
    },
    Free {
        pages: u64,
    },
    Touch(Touch),
    Idle {
        duration: Duration,
    },
    /// Reads the first `pages` heap pages and counts those holding what `touch ... write` put
    /// there (intact) and those reading zero (released by the balloon).
    Check {
        pages: u64,
    },
    Fault,
}

impl Phase {
    /// The phase table entry the guest reads.
    pub fn entry(&self) -> PhaseEntry {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        match *self {
            Phase::Alloc { pages } => PhaseEntry {
                kind: phase_kind::ALLOC,
                pages,
                ..Default::default()
            },
            Phase::Free { pages } => PhaseEntry {
                kind: phase_kind::FREE,
                pages,
                ..Default::default()
            },
            Phase::Touch(t) => {
                let mut flags = 0;
                if t.access == Access::Mixed {
                    flags |= PHASE_MIXED;
                }
                if t.access == Access::Write {
                    flags |= PHASE_WRITE;
                }
                if t.pattern == Pattern::Random {
                    flags |= PHASE_RANDOM;
                }
                if t.verify {
                    flags |= PHASE_VERIFY;
                }
                flags |= match t.fill {
                    Fill::Unique => 0,
                    Fill::Same => PHASE_FILL_SAME,
                    Fill::Zero => PHASE_FILL_ZERO,
                };
                PhaseEntry {
                    kind: phase_kind::TOUCH,
                    flags,
                    pages: t.pages,
                    duration_ns: t.duration.map_or(0, ns),
                    hot_pages: t.hot_pages(),
                    hot_permille: t.hot.map_or(0, |h| u64::from(h.share_permille)),
                    ..Default::default()
                }
            }
            Phase::Idle { duration } => PhaseEntry {
                kind: phase_kind::IDLE,
                duration_ns: ns(duration),
                ..Default::default()
            },
            Phase::Check { pages } => PhaseEntry {
                kind: phase_kind::CHECK,
                pages,
                ..Default::default()
            },
            Phase::Fault => PhaseEntry {
                kind: phase_kind::FAULT,
                ..Default::default()
            },
        }
    }

    /// The heap size after this phase, given the size before it.
    fn heap_after(&self, before: u64) -> u64 {
        match self {
            Phase::Alloc { pages } => before.saturating_add(*pages),
            Phase::Free { pages } => before.saturating_sub(*pages),
            _ => before,
        }
    }
}

/// A percentage in permille as the shortest text: 100 -> "10%", 25 -> "2.5%".
fn fmt_permille(p: u32) -> String {
    if p.is_multiple_of(10) {
        format!("{}%", p / 10)
    } else {
        format!("{}.{}%", p / 10, p % 10)
    }
}

impl fmt::Display for Phase {
    /// The canonical short form, which [`Workload::parse`] reads back to the same phase:
    /// `alloc 192M`, `touch 64M write random 2s hot 10%:90%`, `idle 3s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = |pages: u64| fmt_size_spec(pages.saturating_mul(PAGE_SIZE));
        match self {
            Phase::Alloc { pages } => write!(f, "alloc {}", size(*pages)),
            Phase::Free { pages } => write!(f, "free {}", size(*pages)),
            Phase::Touch(t) => {
                let access = match t.access {
                    Access::Read => "read",
                    Access::Write => "write",
                    Access::Mixed => "mixed",
                };
                write!(f, "touch {} {access}", size(t.pages))?;
                if t.pattern == Pattern::Random {
                    write!(f, " random")?;
                }
                if let Some(d) = t.duration {
                    write!(f, " {}", fmt_duration_spec(d))?;
                }
                if let Some(h) = t.hot {
                    write!(
                        f,
                        " hot {}:{}",
                        fmt_permille(h.pages_permille),
                        fmt_permille(h.share_permille)
                    )?;
                }
                if t.verify {
                    write!(f, " verify")?;
                }
                if t.fill != Fill::Unique {
                    write!(f, " fill {}", t.fill.name())?;
                }
                Ok(())
            }
            Phase::Idle { duration } => write!(f, "idle {}", fmt_duration_spec(*duration)),
            Phase::Check { pages } => write!(f, "check {}", size(*pages)),
            Phase::Fault => write!(f, "fault"),
        }
    }
}

/// A parsed and checked workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub phases: Vec<Phase>,
    /// The spec as given (trimmed); this is what the guest prints.
    pub text: String,
}

impl Workload {
    /// Parses `text` and checks it against a guest of `guest_mem_bytes` bytes of RAM.
    pub fn parse(text: &str, guest_mem_bytes: u64) -> Result<Workload, WorkloadError> {
        let text = text.trim();
        if text.len() > MAX_SPEC_TEXT {
            return Err(WorkloadError::TooLong { len: text.len() });
        }
        let mut parts: Vec<&str> = text.split(';').map(str::trim).collect();
        while parts.last().is_some_and(|p| p.is_empty()) {
            parts.pop();
        }
        if parts.is_empty() {
            return Err(WorkloadError::Empty);
        }
        if parts.len() > MAX_PHASES {
            return Err(WorkloadError::TooManyPhases { count: parts.len() });
        }
        let guest_pages = guest_mem_bytes / PAGE_SIZE;
        let mut heap = 0u64;
        let mut phases = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let err = |problem| WorkloadError::Phase {
                index: i + 1,
                text: (*part).to_string(),
                problem,
            };
            if phases.last() == Some(&Phase::Fault) {
                return Err(err(PhaseProblem::AfterFault));
            }
            let phase = parse_phase(part).map_err(err)?;
            check_heap(&phase, heap, guest_pages).map_err(err)?;
            heap = phase.heap_after(heap);
            phases.push(phase);
        }
        Ok(Workload {
            phases,
            text: text.to_string(),
        })
    }

    /// Pages that phase `i` (counted from 0) touches but that no earlier phase wrote since they
    /// joined the heap: they read zero, not what the app would have written, so a `verify` over
    /// them fails although nothing changed them. Counted conservatively: a `write` or `mixed`
    /// touch of SIZE counts the first SIZE of the heap as written, `free` drops the freed part,
    /// `alloc` adds unwritten pages; 0 for a phase that touches nothing or past the last phase.
    pub fn never_written(&self, i: usize) -> u64 {
        let Some(Phase::Touch(t)) = self.phases.get(i) else {
            return 0;
        };
        let mut heap = 0u64;
        let mut written = 0u64;
        for p in &self.phases[..i] {
            heap = p.heap_after(heap);
            written = written.min(heap);
            if let Phase::Touch(t) = p
                && t.access != Access::Read
            {
                written = written.max(t.pages);
            }
        }
        t.pages.saturating_sub(written)
    }

    /// Heap pages after phase `i` (counted from 0), or `None` past the last phase.
    pub fn heap_after(&self, i: usize) -> Option<u64> {
        if i >= self.phases.len() {
            return None;
        }
        Some(
            self.phases[..=i]
                .iter()
                .fold(0, |heap, p| p.heap_after(heap)),
        )
    }
}

/// The canonical form of the whole workload: the phases' [`Phase`] forms joined by `"; "`, which
/// [`Workload::parse`] reads back to the same phases.
impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.phases.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

const ALLOC_USAGE: &str = "alloc takes only a size, e.g. \"alloc 64M\"";
const FREE_USAGE: &str = "free takes only a size, e.g. \"free 64M\"";
const IDLE_USAGE: &str = "idle takes only a duration, e.g. \"idle 2s\"";
const FAULT_USAGE: &str = "fault takes no arguments";
const CHECK_USAGE: &str = "check takes only a size, e.g. \"check 64M\"";

/// Parses one phase (syntax only; the heap is checked by [`check_heap`]).
fn parse_phase(text: &str) -> Result<Phase, PhaseProblem> {
    let mut tokens = text.split_whitespace();
    let Some(kind) = tokens.next() else {
        return Err(PhaseProblem::EmptyPhase);
    };
    let no_more = |tokens: &mut std::str::SplitWhitespace<'_>, usage| match tokens.next() {
        Some(t) => Err(PhaseProblem::Unexpected {
            token: t.to_string(),
            usage,
        }),
        None => Ok(()),
    };
    match kind {
        "alloc" => {
            let pages = parse_pages(tokens.next(), "alloc")?;
            no_more(&mut tokens, ALLOC_USAGE)?;
            Ok(Phase::Alloc { pages })
        }
        "free" => {
            let pages = parse_pages(tokens.next(), "free")?;
            no_more(&mut tokens, FREE_USAGE)?;
            Ok(Phase::Free { pages })
        }
        "touch" => {
            let pages = parse_pages(tokens.next(), "touch")?;
            parse_touch_options(pages, tokens).map(Phase::Touch)
        }
        "idle" => {
            let token = tokens.next().ok_or(PhaseProblem::MissingDuration("idle"))?;
            let duration = parse_phase_duration(token, false)?;
            no_more(&mut tokens, IDLE_USAGE)?;
            Ok(Phase::Idle { duration })
        }
        "check" => {
            let pages = parse_pages(tokens.next(), "check")?;
            no_more(&mut tokens, CHECK_USAGE)?;
            Ok(Phase::Check { pages })
        }
        "fault" => {
            no_more(&mut tokens, FAULT_USAGE)?;
            Ok(Phase::Fault)
        }
        other => Err(PhaseProblem::UnknownKind(other.to_string())),
    }
}

/// A size token as a non-zero number of whole pages.
fn parse_pages(token: Option<&str>, kind: &'static str) -> Result<u64, PhaseProblem> {
    let token = token.ok_or(PhaseProblem::MissingSize(kind))?;
    let bytes = parse_size(token).map_err(PhaseProblem::BadSize)?;
    if bytes == 0 {
        return Err(PhaseProblem::ZeroSize(token.to_string()));
    }
    if !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(PhaseProblem::UnalignedSize(token.to_string()));
    }
    Ok(bytes / PAGE_SIZE)
}

/// A non-zero duration of at most [`MAX_PHASE_DURATION`].
fn parse_phase_duration(token: &str, in_touch: bool) -> Result<Duration, PhaseProblem> {
    let d = parse_duration(token).map_err(PhaseProblem::BadDuration)?;
    if d.is_zero() {
        return Err(PhaseProblem::ZeroDuration(token.to_string(), in_touch));
    }
    if d > MAX_PHASE_DURATION {
        return Err(PhaseProblem::DurationTooLong(token.to_string()));
    }
    Ok(d)
}

/// Parses `P%:Q%` into permille, checking 0 < P < 100 and P < Q <= 100.
fn parse_hot(token: &str) -> Result<Hot, PhaseProblem> {
    let bad = |reason| PhaseProblem::BadHot {
        token: token.to_string(),
        reason,
    };
    let (p, q) = token
        .split_once(':')
        .ok_or_else(|| bad("expected P%:Q%, e.g. 10%:90%"))?;
    let permille = |s: &str| -> Option<u32> {
        let s = s.strip_suffix('%').unwrap_or(s);
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, "0"),
        };
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(int) || !digits(frac) || frac.len() != 1 || int.len() > 3 {
            return None;
        }
        Some(int.parse::<u32>().ok()? * 10 + frac.parse::<u32>().ok()?)
    };
    let pages_permille =
        permille(p).ok_or_else(|| bad("P and Q must be percentages with at most one decimal"))?;
    let share_permille =
        permille(q).ok_or_else(|| bad("P and Q must be percentages with at most one decimal"))?;
    if pages_permille == 0 || pages_permille >= 1000 {
        return Err(bad(
            "the hot part P must be more than 0% and less than 100%",
        ));
    }
    if share_permille > 1000 {
        return Err(bad("the hot share Q cannot exceed 100%"));
    }
    if share_permille <= pages_permille {
        return Err(bad(
            "the hot share Q must be larger than the hot part P, or the pages are not hot",
        ));
    }
    Ok(Hot {
        pages_permille,
        share_permille,
    })
}

fn parse_touch_options<'a>(
    pages: u64,
    mut tokens: impl Iterator<Item = &'a str>,
) -> Result<Touch, PhaseProblem> {
    // Each option with the text that set it, for duplicate errors.
    let mut access: Option<(Access, String)> = None;
    let mut pattern: Option<(Pattern, String)> = None;
    let mut duration: Option<(Duration, String)> = None;
    let mut hot: Option<(Hot, String)> = None;
    let mut verify: Option<((), String)> = None;
    let mut fill: Option<(Fill, String)> = None;

    /// Fails if `slot` is already set.
    fn once<T>(
        slot: &Option<(T, String)>,
        token: &str,
        what: &'static str,
    ) -> Result<(), PhaseProblem> {
        match slot {
            Some((_, earlier)) => Err(PhaseProblem::DuplicateOption {
                token: token.to_string(),
                earlier: earlier.clone(),
                what,
            }),
            None => Ok(()),
        }
    }

    while let Some(token) = tokens.next() {
        match token {
            "read" | "write" | "mixed" => {
                once(&access, token, "access mode")?;
                let a = match token {
                    "read" => Access::Read,
                    "mixed" => Access::Mixed,
                    _ => Access::Write,
                };
                access = Some((a, token.to_string()));
            }
            "seq" | "random" => {
                once(&pattern, token, "access pattern")?;
                let p = if token == "seq" {
                    Pattern::Seq
                } else {
                    Pattern::Random
                };
                pattern = Some((p, token.to_string()));
            }
            "verify" => {
                once(&verify, token, "verify")?;
                verify = Some(((), token.to_string()));
            }
            "fill" => {
                once(&fill, token, "fill")?;
                let what = tokens.next().ok_or(PhaseProblem::MissingFill)?;
                let f = match what {
                    "unique" => Fill::Unique,
                    "same" => Fill::Same,
                    "zero" => Fill::Zero,
                    other => return Err(PhaseProblem::BadFill(other.to_string())),
                };
                fill = Some((f, format!("fill {what}")));
            }
            "hot" => {
                once(&hot, token, "hot split")?;
                let split = tokens.next().ok_or(PhaseProblem::MissingHot)?;
                hot = Some((parse_hot(split)?, split.to_string()));
            }
            t if t.starts_with(|c: char| c.is_ascii_digit() || c == '.') => {
                once(&duration, token, "duration")?;
                duration = Some((parse_phase_duration(token, true)?, token.to_string()));
            }
            other => return Err(PhaseProblem::UnknownOption(other.to_string())),
        }
    }

    let pattern = pattern.map_or(Pattern::Seq, |(p, _)| p);
    let touch = Touch {
        pages,
        access: access.map_or(Access::Write, |(a, _)| a),
        pattern,
        duration: duration.map(|(d, _)| d),
        hot: hot.as_ref().map(|(h, _)| *h),
        verify: verify.is_some(),
        fill: fill.map_or(Fill::Unique, |(f, _)| f),
    };
    if touch.access == Access::Read && touch.fill != Fill::Unique {
        return Err(PhaseProblem::FillNeedsWrite(touch.fill.name()));
    }
    if let Some((_, split)) = hot {
        if pattern != Pattern::Random {
            return Err(PhaseProblem::HotNeedsRandom);
        }
        let hot_pages = touch.hot_pages();
        if hot_pages == 0 || hot_pages >= pages {
            return Err(PhaseProblem::HotSplitEmpty {
                token: split,
                pages,
            });
        }
    }
    Ok(touch)
}

/// Checks the phase against the heap (`heap` pages before it) and guest RAM.
fn check_heap(phase: &Phase, heap: u64, guest_pages: u64) -> Result<(), PhaseProblem> {
    let bytes = |pages: u64| pages.saturating_mul(PAGE_SIZE);
    match *phase {
        Phase::Alloc { pages } if heap.saturating_add(pages) > guest_pages => {
            Err(PhaseProblem::AllocExceedsRam {
                bytes: bytes(pages),
                heap: bytes(heap),
                ram: bytes(guest_pages),
            })
        }
        Phase::Free { pages } if pages > heap => Err(PhaseProblem::FreeExceedsHeap {
            bytes: bytes(pages),
            heap: bytes(heap),
        }),
        Phase::Touch(t) if t.pages > heap => Err(PhaseProblem::TouchExceedsHeap {
            bytes: bytes(t.pages),
            heap: bytes(heap),
        }),
        Phase::Check { pages } if pages > heap => Err(PhaseProblem::TouchExceedsHeap {
            bytes: bytes(pages),
            heap: bytes(heap),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    const RAM: u64 = 256 * MIB;
    const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;

    fn parse(text: &str) -> Result<Workload, WorkloadError> {
        Workload::parse(text, RAM)
    }

    fn entries(w: &Workload) -> Vec<PhaseEntry> {
        w.phases.iter().map(Phase::entry).collect()
    }

    /// The error's message, asserting it is a phase error for `index` with the phase's `text`.
    fn phase_err(spec: &str, index: usize, text: &str) -> (PhaseProblem, String) {
        match parse(spec) {
            Err(e @ WorkloadError::Phase { .. }) => {
                let msg = e.to_string();
                let WorkloadError::Phase {
                    index: i,
                    text: t,
                    problem,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((i, t.as_str()), (index, text), "{msg}");
                assert!(
                    msg.starts_with(&format!("phase {index} ({text:?}): ")),
                    "{msg}"
                );
                (problem, msg)
            }
            other => panic!("expected a phase error for {spec:?}, got {other:?}"),
        }
    }

    #[test]
    fn never_written_pages_are_counted_conservatively() {
        let w = parse(
            "alloc 8M; touch 4M write; touch 8M read verify; free 6M; alloc 4M; touch 6M mixed; \
             touch 6M verify; touch 2M read; idle 1s",
        )
        .unwrap();
        let mib = 256;
        assert_eq!(w.never_written(0), 0, "alloc touches nothing");
        assert_eq!(w.never_written(1), 4 * mib, "the first write phase");
        assert_eq!(
            w.never_written(2),
            4 * mib,
            "the upper 4 MiB were never written"
        );
        // After freeing 6 MiB only the first 2 MiB keep their contents; the 4 MiB allocated
        // again are new.
        assert_eq!(w.never_written(5), 4 * mib);
        assert_eq!(w.never_written(6), 0, "the mixed phase wrote them");
        assert_eq!(w.never_written(7), 0);
        assert_eq!(w.never_written(8), 0, "idle touches nothing");
        assert_eq!(w.never_written(99), 0);
    }

    #[test]
    fn check_reads_heap_pages_and_round_trips() {
        let w = parse("alloc 8M; touch 8M write; check 4M").unwrap();
        assert_eq!(
            w.phases[2],
            Phase::Check {
                pages: 4 * PAGES_PER_MIB
            }
        );
        let e = entries(&w)[2];
        assert_eq!((e.kind, e.pages), (phase_kind::CHECK, 4 * PAGES_PER_MIB));
        assert_eq!(w.to_string(), "alloc 8M; touch 8M write; check 4M");
        let e = parse("alloc 8M; check 9M").unwrap_err().to_string();
        assert!(
            e.contains("touches 9.0 MiB but the heap holds 8.0 MiB"),
            "{e}"
        );
        let e = parse("alloc 8M; check 4M write").unwrap_err().to_string();
        assert!(e.contains("check takes only a size"), "{e}");
    }

    #[test]
    fn fill_parses_encodes_and_round_trips() {
        let w = parse(
            "alloc 8M; touch 8M fill same; touch 4M mixed fill zero verify; touch 8M fill unique; \
             touch 8M read verify",
        )
        .unwrap();
        let fills: Vec<Fill> = w
            .phases
            .iter()
            .filter_map(|p| match p {
                Phase::Touch(t) => Some(t.fill),
                _ => None,
            })
            .collect();
        assert_eq!(fills, [Fill::Same, Fill::Zero, Fill::Unique, Fill::Unique]);
        let e = entries(&w);
        assert_eq!(e[1].flags, PHASE_WRITE | PHASE_FILL_SAME);
        assert_eq!(e[2].flags, PHASE_MIXED | PHASE_VERIFY | PHASE_FILL_ZERO);
        assert_eq!(e[3].flags, PHASE_WRITE, "unique is the default: no flag");
        assert_eq!(e[4].flags & (PHASE_FILL_SAME | PHASE_FILL_ZERO), 0);
        // The canonical form leaves the default out and reads back to the same phases.
        let text = w.to_string();
        assert_eq!(
            text,
            "alloc 8M; touch 8M write fill same; touch 4M mixed verify fill zero; \
             touch 8M write; touch 8M read verify"
        );
        assert_eq!(parse(&text).unwrap().phases, w.phases);
    }

    #[test]
    fn bad_fills_are_refused() {
        let (p, msg) = phase_err("alloc 8M; touch 8M fill", 2, "touch 8M fill");
        assert_eq!(p, PhaseProblem::MissingFill);
        assert!(msg.contains("fill zero"), "{msg}");
        let (p, _) = phase_err("alloc 8M; touch 8M fill ones", 2, "touch 8M fill ones");
        assert_eq!(p, PhaseProblem::BadFill("ones".into()));
        let (p, msg) = phase_err(
            "alloc 8M; touch 8M fill same fill zero",
            2,
            "touch 8M fill same fill zero",
        );
        assert!(matches!(p, PhaseProblem::DuplicateOption { .. }), "{msg}");
        assert!(msg.contains("already set by \"fill same\""), "{msg}");
        let (p, msg) = phase_err(
            "alloc 8M; touch 8M read fill zero",
            2,
            "touch 8M read fill zero",
        );
        assert_eq!(p, PhaseProblem::FillNeedsWrite("zero"));
        assert!(msg.contains("needs writes"), "{msg}");
        // fill unique on a read is the default spelled out: harmless.
        assert!(parse("alloc 8M; touch 8M read fill unique").is_ok());
    }

    #[test]
    fn default_spec_parses() {
        let w = parse(DEFAULT_SPEC).unwrap();
        assert_eq!(w.phases.len(), 5);
        assert_eq!(w.text, DEFAULT_SPEC);
        assert_eq!(w.heap_after(0), Some(192 * PAGES_PER_MIB));
        assert_eq!(w.heap_after(1), Some(192 * PAGES_PER_MIB));
        assert_eq!(w.heap_after(2), Some(32 * PAGES_PER_MIB));
        assert_eq!(w.heap_after(4), Some(32 * PAGES_PER_MIB));
        assert_eq!(w.heap_after(5), None);
        assert_eq!(w.to_string(), DEFAULT_SPEC);
        // It needs 192 MiB of RAM.
        assert!(Workload::parse(DEFAULT_SPEC, 192 * MIB).is_ok());
        assert!(Workload::parse(DEFAULT_SPEC, 191 * MIB).is_err());
    }

    #[test]
    fn touch_defaults_and_options_in_any_order() {
        let w = parse("alloc 64M; touch 64M").unwrap();
        assert_eq!(
            w.phases[1],
            Phase::Touch(Touch {
                pages: 64 * PAGES_PER_MIB,
                access: Access::Write,
                pattern: Pattern::Seq,
                duration: None,
                hot: None,
                verify: false,
                fill: Fill::Unique,
            })
        );
        let v = parse("alloc 64M; touch 64M write; touch 64M verify random 1s").unwrap();
        let Phase::Touch(t) = v.phases[2] else {
            panic!("{v:?}")
        };
        assert!(t.verify);
        assert_eq!(entries(&v)[2].flags & PHASE_VERIFY, PHASE_VERIFY);
        assert_eq!(v.phases[2].to_string(), "touch 64M write random 1s verify");
        assert!(parse("alloc 4M; touch 4M verify verify").is_err());
        let m = parse("alloc 4M; touch 4M mixed random 1s").unwrap();
        assert_eq!(entries(&m)[1].flags, PHASE_MIXED | PHASE_RANDOM);
        assert_eq!(m.phases[1].to_string(), "touch 4M mixed random 1s");
        assert!(parse("alloc 4M; touch 4M mixed read").is_err());
        let a = parse("alloc 64M; touch 64M read 2s random hot 10%:90%").unwrap();
        let b = parse("alloc 64M; touch 64M hot 10:90 random 2000ms read").unwrap();
        assert_eq!(a.phases, b.phases);
        let Phase::Touch(t) = a.phases[1] else {
            panic!()
        };
        assert_eq!(t.access, Access::Read);
        assert_eq!(t.pattern, Pattern::Random);
        assert_eq!(t.duration, Some(Duration::from_secs(2)));
        assert_eq!(
            t.hot,
            Some(Hot {
                pages_permille: 100,
                share_permille: 900
            })
        );
        assert_eq!(t.hot_pages(), 64 * PAGES_PER_MIB / 10);
        assert_eq!(
            a.phases[1].to_string(),
            "touch 64M read random 2s hot 10%:90%"
        );
    }

    #[test]
    fn whitespace_and_semicolons() {
        let a = parse("  alloc   4M ;touch 4M\twrite;\n idle 1s ; ").unwrap();
        assert_eq!(a.phases.len(), 3);
        assert_eq!(a.to_string(), "alloc 4M; touch 4M write; idle 1s");
        assert_eq!(parse("alloc 4M;;").unwrap().phases.len(), 1);
        let (p, _) = phase_err("alloc 4M;; touch 4M", 2, "");
        assert_eq!(p, PhaseProblem::EmptyPhase);
        let (p, _) = phase_err("; alloc 4M", 1, "");
        assert_eq!(p, PhaseProblem::EmptyPhase);
    }

    #[test]
    fn entries_encode_the_abi() {
        let w = parse(
            "alloc 8M; touch 8M read random 1.5s hot 25%:75%; touch 4M; free 4M; idle 250ms; fault",
        )
        .unwrap();
        let e = entries(&w);
        assert_eq!(
            e[0],
            PhaseEntry {
                kind: phase_kind::ALLOC,
                pages: 2048,
                ..Default::default()
            }
        );
        assert_eq!(
            e[1],
            PhaseEntry {
                kind: phase_kind::TOUCH,
                flags: PHASE_RANDOM,
                pages: 2048,
                duration_ns: 1_500_000_000,
                hot_pages: 512,
                hot_permille: 750,
                ..Default::default()
            }
        );
        assert_eq!(
            e[2],
            PhaseEntry {
                kind: phase_kind::TOUCH,
                flags: PHASE_WRITE,
                pages: 1024,
                ..Default::default()
            }
        );
        assert_eq!(e[3].kind, phase_kind::FREE);
        assert_eq!(e[3].pages, 1024);
        assert_eq!(
            e[4],
            PhaseEntry {
                kind: phase_kind::IDLE,
                duration_ns: 250_000_000,
                ..Default::default()
            }
        );
        assert_eq!(
            e[5],
            PhaseEntry {
                kind: phase_kind::FAULT,
                ..Default::default()
            }
        );
        assert_eq!(w.heap_after(3), Some(1024));
    }

    #[test]
    fn canonical_form_round_trips() {
        let spec = "alloc 1536K; touch 1M read seq; touch 1536K random 1.25s hot 2.5%:50.5%; \
                    free 512K; idle 100us; alloc 1G; touch 1G write 1m; fault";
        let w = Workload::parse(spec, 2 << 30).unwrap();
        let canon = w.to_string();
        assert_eq!(
            canon,
            "alloc 1536K; touch 1M read; touch 1536K write random 1.25s hot 2.5%:50.5%; \
             free 512K; idle 100us; alloc 1G; touch 1G write 60s; fault"
        );
        let again = Workload::parse(&canon, 2 << 30).unwrap();
        assert_eq!(again.phases, w.phases);
    }

    #[test]
    fn bad_sizes_name_the_token() {
        let (p, msg) = phase_err("alloc 64M; touch 64X write", 2, "touch 64X write");
        assert!(matches!(p, PhaseProblem::BadSize(_)));
        assert!(
            msg.starts_with("phase 2 (\"touch 64X write\"): bad size \"64X\""),
            "{msg}"
        );
        let (p, msg) = phase_err("alloc 6K", 1, "alloc 6K");
        assert_eq!(p, PhaseProblem::UnalignedSize("6K".into()));
        assert!(msg.contains("\"6K\"") && msg.contains("4 KiB"), "{msg}");
        let (p, _) = phase_err("alloc 0M", 1, "alloc 0M");
        assert_eq!(p, PhaseProblem::ZeroSize("0M".into()));
        let (p, _) = phase_err("alloc -4K", 1, "alloc -4K");
        assert!(matches!(
            p,
            PhaseProblem::BadSize(UnitError::NegativeSize(_))
        ));
        let (p, msg) = phase_err("alloc", 1, "alloc");
        assert_eq!(p, PhaseProblem::MissingSize("alloc"));
        assert!(msg.contains("\"alloc 64M\""), "{msg}");
        let (p, _) = phase_err("alloc 4M; touch", 2, "touch");
        assert_eq!(p, PhaseProblem::MissingSize("touch"));
        let (p, msg) = phase_err("alloc 4M; touch write", 2, "touch write");
        assert!(msg.contains("bad size \"write\""), "{msg} {p:?}");
        let (p, _) = phase_err("alloc 99999999999T", 1, "alloc 99999999999T");
        assert!(matches!(
            p,
            PhaseProblem::BadSize(UnitError::SizeOverflow(_))
        ));
    }

    #[test]
    fn unknown_words_are_named() {
        let (p, msg) = phase_err("allocate 4M", 1, "allocate 4M");
        assert_eq!(p, PhaseProblem::UnknownKind("allocate".into()));
        assert!(msg.contains("\"allocate\""), "{msg}");
        // Keywords are case-sensitive.
        let (p, _) = phase_err("Alloc 4M", 1, "Alloc 4M");
        assert_eq!(p, PhaseProblem::UnknownKind("Alloc".into()));
        let (p, msg) = phase_err("alloc 4M; touch 4M fast", 2, "touch 4M fast");
        assert_eq!(p, PhaseProblem::UnknownOption("fast".into()));
        assert!(msg.contains("\"fast\""), "{msg}");
        let (p, _) = phase_err("alloc 4M; touch 4M WRITE", 2, "touch 4M WRITE");
        assert_eq!(p, PhaseProblem::UnknownOption("WRITE".into()));
        let (p, msg) = phase_err("alloc 4M extra", 1, "alloc 4M extra");
        assert!(matches!(p, PhaseProblem::Unexpected { ref token, .. } if token == "extra"));
        assert!(msg.contains("\"extra\""), "{msg}");
        let (p, _) = phase_err("alloc 4M; free 4M 4M", 2, "free 4M 4M");
        assert!(matches!(p, PhaseProblem::Unexpected { ref token, .. } if token == "4M"));
        let (p, _) = phase_err("idle 1s 2s", 1, "idle 1s 2s");
        assert!(matches!(p, PhaseProblem::Unexpected { ref token, .. } if token == "2s"));
        let (p, msg) = phase_err("fault now", 1, "fault now");
        assert!(matches!(p, PhaseProblem::Unexpected { ref token, .. } if token == "now"));
        assert!(msg.contains("no arguments"), "{msg}");
    }

    #[test]
    fn duplicate_options_are_rejected() {
        let (p, msg) = phase_err("alloc 4M; touch 4M read write", 2, "touch 4M read write");
        assert_eq!(
            p,
            PhaseProblem::DuplicateOption {
                token: "write".into(),
                earlier: "read".into(),
                what: "access mode"
            }
        );
        assert!(
            msg.contains("\"write\"") && msg.contains("\"read\""),
            "{msg}"
        );
        let (p, _) = phase_err("alloc 4M; touch 4M write write", 2, "touch 4M write write");
        assert!(matches!(
            p,
            PhaseProblem::DuplicateOption {
                what: "access mode",
                ..
            }
        ));
        let (p, _) = phase_err("alloc 4M; touch 4M seq random", 2, "touch 4M seq random");
        assert!(matches!(
            p,
            PhaseProblem::DuplicateOption {
                what: "access pattern",
                ..
            }
        ));
        let (p, _) = phase_err("alloc 4M; touch 4M 1s 2s", 2, "touch 4M 1s 2s");
        assert_eq!(
            p,
            PhaseProblem::DuplicateOption {
                token: "2s".into(),
                earlier: "1s".into(),
                what: "duration"
            }
        );
        let spec = "alloc 4M; touch 4M random hot 10%:90% hot 20%:80%";
        let (p, _) = phase_err(spec, 2, "touch 4M random hot 10%:90% hot 20%:80%");
        assert!(matches!(
            p,
            PhaseProblem::DuplicateOption {
                what: "hot split",
                ..
            }
        ));
    }

    #[test]
    fn durations() {
        let (p, msg) = phase_err("idle", 1, "idle");
        assert_eq!(p, PhaseProblem::MissingDuration("idle"));
        assert!(msg.contains("needs a duration"), "{msg}");
        let (p, msg) = phase_err("idle 2x", 1, "idle 2x");
        assert!(matches!(p, PhaseProblem::BadDuration(_)));
        assert!(msg.contains("bad duration \"2x\""), "{msg}");
        let (p, _) = phase_err("idle 0s", 1, "idle 0s");
        assert_eq!(p, PhaseProblem::ZeroDuration("0s".into(), false));
        let (p, msg) = phase_err("alloc 4M; touch 4M 0ms", 2, "touch 4M 0ms");
        assert_eq!(p, PhaseProblem::ZeroDuration("0ms".into(), true));
        assert!(msg.contains("single pass"), "{msg}");
        let (p, msg) = phase_err("alloc 4M; touch 4M 3q", 2, "touch 4M 3q");
        assert!(msg.contains("\"3q\""), "{msg} {p:?}");
        let (p, _) = phase_err("idle 10000000h", 1, "idle 10000000h");
        assert_eq!(p, PhaseProblem::DurationTooLong("10000000h".into()));
    }

    #[test]
    fn durations_are_capped_at_a_year() {
        // The issue's example: accepted before, and the guest's tick conversion overflowed.
        let (p, msg) = phase_err("idle 7543427992616ms", 1, "idle 7543427992616ms");
        assert_eq!(p, PhaseProblem::DurationTooLong("7543427992616ms".into()));
        assert_eq!(
            msg,
            "phase 1 (\"idle 7543427992616ms\"): duration \"7543427992616ms\" is too long \
             (at most 8760h, one year)"
        );
        let text = "touch 4M 8760.5h";
        let (p, _) = phase_err(&format!("alloc 4M; {text}"), 2, text);
        assert_eq!(p, PhaseProblem::DurationTooLong("8760.5h".into()));
        // Exactly a year is fine, and reaches the phase table as such.
        let w = parse("idle 8760h; alloc 4M; touch 4M 8760h").unwrap();
        assert_eq!(
            entries(&w)[0].duration_ns,
            MAX_PHASE_DURATION.as_nanos() as u64
        );
        assert_eq!(entries(&w)[2].duration_ns, 365 * 24 * 3600 * 1_000_000_000);
        let (p, _) = phase_err("idle 31536000.000000001s", 1, "idle 31536000.000000001s");
        assert_eq!(
            p,
            PhaseProblem::DurationTooLong("31536000.000000001s".into())
        );
        assert_eq!(
            parse("idle 3; idle 0.5").unwrap().phases,
            [
                Phase::Idle {
                    duration: Duration::from_secs(3)
                },
                Phase::Idle {
                    duration: Duration::from_millis(500)
                }
            ]
        );
    }

    #[test]
    fn hot_splits() {
        let (p, msg) = phase_err("alloc 4M; touch 4M hot 10%:90%", 2, "touch 4M hot 10%:90%");
        assert_eq!(p, PhaseProblem::HotNeedsRandom);
        assert!(msg.contains("random"), "{msg}");
        let (p, _) = phase_err(
            "alloc 4M; touch 4M seq random hot 10%:90%",
            2,
            "touch 4M seq random hot 10%:90%",
        );
        assert!(matches!(p, PhaseProblem::DuplicateOption { .. }));
        let (p, _) = phase_err("alloc 4M; touch 4M random hot", 2, "touch 4M random hot");
        assert_eq!(p, PhaseProblem::MissingHot);
        for (split, why) in [
            ("10%", "expected P%:Q%"),
            ("x:90%", "percentages"),
            ("10%:90.25%", "percentages"),
            ("0%:90%", "more than 0%"),
            ("100%:100%", "less than 100%"),
            ("10%:101%", "exceed 100%"),
            ("50%:50%", "larger than the hot part"),
            ("1e1:90", "percentages"),
            ("-5:90", "percentages"),
        ] {
            let text = format!("touch 4M random hot {split}");
            let (p, msg) = phase_err(&format!("alloc 4M; {text}"), 2, &text);
            assert!(
                matches!(p, PhaseProblem::BadHot { ref token, .. } if token == split),
                "{msg}"
            );
            assert!(
                msg.contains(&format!("\"{split}\"")) && msg.contains(why),
                "{msg}"
            );
        }
        // 1% of 8 pages is no page at all.
        let (p, msg) = phase_err(
            "alloc 32K; touch 32K random hot 1%:90%",
            2,
            "touch 32K random hot 1%:90%",
        );
        assert_eq!(
            p,
            PhaseProblem::HotSplitEmpty {
                token: "1%:90%".into(),
                pages: 8
            }
        );
        assert!(msg.contains("\"1%:90%\""), "{msg}");
        let w = parse("alloc 4M; touch 4M random hot 0.1%:100%").unwrap();
        assert_eq!(entries(&w)[1].hot_pages, 1);
        assert_eq!(entries(&w)[1].hot_permille, 1000);
    }

    #[test]
    fn heap_accounting() {
        let (p, msg) = phase_err("alloc 64M; idle 1s; free 512M", 3, "free 512M");
        assert_eq!(
            p,
            PhaseProblem::FreeExceedsHeap {
                bytes: 512 * MIB,
                heap: 64 * MIB
            }
        );
        assert_eq!(
            msg,
            "phase 3 (\"free 512M\"): frees 512.0 MiB but the heap holds 64.0 MiB"
        );
        let (_, msg) = phase_err("alloc 64M; touch 128M", 2, "touch 128M");
        assert_eq!(
            msg,
            "phase 2 (\"touch 128M\"): touches 128.0 MiB but the heap holds 64.0 MiB"
        );
        let (_, msg) = phase_err("touch 4K", 1, "touch 4K");
        assert!(
            msg.ends_with("touches 4.0 KiB but the heap holds 0 B"),
            "{msg}"
        );
        let (_, msg) = phase_err("alloc 200M; alloc 100M", 2, "alloc 100M");
        assert_eq!(
            msg,
            "phase 2 (\"alloc 100M\"): allocates 100.0 MiB but the heap holds 200.0 MiB and \
             guest RAM is 256.0 MiB"
        );
        // Exactly all of RAM is fine; freeing makes room again (LIFO heap).
        let w = parse("alloc 256M; free 56M; alloc 56M; touch 256M; free 256M").unwrap();
        assert_eq!(w.heap_after(4), Some(0));
        // A guest RAM size that is not whole pages rounds down.
        assert!(Workload::parse("alloc 8K", 8191).is_err());
        assert!(Workload::parse("alloc 4K", 8191).is_ok());
        assert!(Workload::parse("alloc 4K", 0).is_err());
    }

    #[test]
    fn fault_ends_the_workload() {
        assert!(parse("alloc 4M; fault").is_ok());
        assert!(parse("fault;").is_ok());
        let (p, msg) = phase_err("fault; idle 1s", 2, "idle 1s");
        assert_eq!(p, PhaseProblem::AfterFault);
        assert!(msg.contains("\"fault\""), "{msg}");
    }

    #[test]
    fn whole_spec_limits() {
        assert_eq!(parse(""), Err(WorkloadError::Empty));
        assert_eq!(parse("  ; ;  "), Err(WorkloadError::Empty));
        assert!(parse("").unwrap_err().to_string().contains(DEFAULT_SPEC));

        let ok = vec!["idle 1ms"; MAX_PHASES].join("; ");
        assert_eq!(parse(&ok).unwrap().phases.len(), MAX_PHASES);
        let too_many = vec!["idle 1ms"; MAX_PHASES + 1].join("; ");
        assert_eq!(
            parse(&too_many),
            Err(WorkloadError::TooManyPhases {
                count: MAX_PHASES + 1
            })
        );

        let long = format!("idle {}s", "0".repeat(MAX_SPEC_TEXT) + "1");
        assert_eq!(
            parse(&long),
            Err(WorkloadError::TooLong { len: long.len() })
        );
        let msg = parse(&long).unwrap_err().to_string();
        assert!(msg.contains(&MAX_SPEC_TEXT.to_string()), "{msg}");
        // Exactly at the limit.
        let at = format!("idle {}1s", "0".repeat(MAX_SPEC_TEXT - 7));
        assert_eq!(at.len(), MAX_SPEC_TEXT);
        assert!(parse(&at).is_ok());
    }

    #[test]
    fn odd_input_gets_an_error_or_a_sound_workload() {
        // Each of these is nonsense (or a corner) and must be refused with a message.
        for spec in [
            ";",
            "touch",
            "touch ;",
            "alloc 4M; touch 4M hot",
            "alloc 4M; touch 4M .",
            "alloc 4M; touch 4M 1.",
            "idle ∞",
            "alloc 4M; touch 4M random hot :",
            "alloc 4M; touch 4M random hot 10%:",
            "alloc 4M; touch 4M random hot %:%",
            "alloc 4M; touch 4M random hot 9999999999%:1%",
            "alloc 18446744073709551615",
            "\u{0}",
            "free 0",
        ] {
            let e = Workload::parse(spec, u64::MAX).expect_err(spec);
            assert!(!e.to_string().is_empty(), "{spec:?}");
        }
        // These are odd but valid, and mean what they say.
        let w = Workload::parse("alloc 16777215T; touch 16777215T 1s", u64::MAX).unwrap();
        assert_eq!(entries(&w)[1].pages, 16_777_215 << 28);
        let w = parse("alloc 4M; touch 4M .5s").unwrap();
        assert_eq!(entries(&w)[1].duration_ns, 500_000_000);
        // Any Unicode white space separates tokens.
        let w = parse("alloc\u{a0}4M").unwrap();
        assert_eq!(entries(&w)[0].pages, 1024);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Guest RAM for the property tests: large enough that many random specs fit.
        const BIG_RAM: u64 = 1 << 40;

        /// A token from the grammar's vocabulary, or a near miss.
        fn token() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(vec![
                    "alloc", "free", "touch", "idle", "fault", "read", "write", "seq", "random",
                    "hot", "fill", "zero", "same", "unique", ";", ";", ";",
                ]).prop_map(String::from),
                3 => (1u64..4096, prop::sample::select(vec!["K", "M", "G", "k", "MiB", "", "T"]))
                    .prop_map(|(n, u)| format!("{}{u}", n * 4)),
                3 => (1u64..100_000, prop::sample::select(vec!["ns", "us", "ms", "s", "m", "h", ""]))
                    .prop_map(|(n, u)| format!("{n}{u}")),
                1 => (0u64..10, 0u64..10).prop_map(|(i, f)| format!("{i}.{f}s")),
                2 => (0u32..1001, 0u32..1001, any::<bool>()).prop_map(|(p, q, pct)| {
                    let pc = if pct { "%" } else { "" };
                    format!("{}.{}{pc}:{}.{}{pc}", p / 10, p % 10, q / 10, q % 10)
                }),
                1 => "\\PC{0,6}",
            ]
        }

        /// A spec made of vocabulary tokens, which parses often enough to exercise round trips.
        fn soup() -> impl Strategy<Value = String> {
            prop::collection::vec(token(), 0..24).prop_map(|t| t.join(" "))
        }

        /// A spec that must parse: alloc, touch (options in random order and spellings), idle and
        /// free phases that respect the heap, in non-canonical spellings.
        fn valid_spec() -> impl Strategy<Value = String> {
            let size = |pages: u64, style: u8| match style % 3 {
                0 => format!("{}K", pages * 4),
                1 => format!("{}", pages * 4096),
                _ if pages.is_multiple_of(128) => {
                    format!(
                        "{}.{}M",
                        pages / 256,
                        if pages.is_multiple_of(256) { 0 } else { 5 }
                    )
                }
                _ => format!("{}KiB", pages * 4),
            };
            let dur = |ms: u64, style: u8| match style % 3 {
                0 => format!("{ms}ms"),
                1 => format!("{}us", ms * 1000),
                _ => format!("{}.{:03}", ms / 1000, ms % 1000),
            };
            prop::collection::vec(
                (
                    0u8..4,
                    1u64..5000,
                    1u64..100_000,
                    any::<[u8; 6]>(),
                    any::<bool>(),
                ),
                1..16,
            )
            .prop_map(move |raw| {
                let mut heap = 0u64;
                let mut out = Vec::new();
                for (kind, pages, ms, st, flag) in raw {
                    let phase = match kind {
                        0 => {
                            heap += pages;
                            format!("alloc {}", size(pages, st[0]))
                        }
                        1 if heap > 0 => {
                            let n = pages.min(heap);
                            let mut opts = vec![size(n, st[0])];
                            if st[1] % 2 == 0 {
                                opts.push(if flag { "read" } else { "write" }.into());
                            }
                            if st[2] % 2 == 0 {
                                opts.push(dur(ms, st[3]));
                            }
                            let random = st[4] % 3 != 0;
                            if random {
                                opts.push("random".into());
                            } else if st[4] % 2 == 0 {
                                opts.push("seq".into());
                            }
                            if random && n >= 100 && st[5] % 2 == 0 {
                                opts.push("hot 10%:90.5%".into());
                            }
                            let writes = st[1] % 2 != 0 || !flag;
                            if writes && st[3] % 4 != 0 {
                                opts.push(
                                    ["fill zero", "fill same", "fill unique"]
                                        [usize::from(st[3] % 4 - 1)]
                                    .into(),
                                );
                            }
                            // Options after the size in any order.
                            let rot = usize::from(st[5]) % opts.len().max(1);
                            let mut rest = opts.split_off(1);
                            let len = rest.len().max(1);
                            rest.rotate_left(rot % len);
                            format!("touch {} {}", opts[0], rest.join("  "))
                        }
                        2 if heap > 0 => {
                            let n = pages.min(heap);
                            heap -= n;
                            format!("free\t{}", size(n, st[0]))
                        }
                        _ => format!("idle {}", dur(ms, st[3])),
                    };
                    out.push(phase);
                }
                out.join(" ;")
            })
        }

        proptest! {
            #[test]
            fn valid_specs_round_trip(s in valid_spec()) {
                let w = Workload::parse(&s, BIG_RAM);
                prop_assert!(w.is_ok(), "{:?}: {:?}", s, w);
                let w = w.unwrap();
                let canon = w.to_string();
                let again = Workload::parse(&canon, BIG_RAM);
                prop_assert_eq!(again.map(|a| a.phases), Ok(w.phases), "{:?} -> {:?}", s, canon);
            }

            #[test]
            fn never_panics_on_arbitrary_text(s in "\\PC{0,200}", ram in any::<u64>()) {
                let _ = Workload::parse(&s, ram);
            }

            #[test]
            fn canonical_form_round_trips(s in soup()) {
                if let Ok(w) = Workload::parse(&s, BIG_RAM) {
                    let canon = w.to_string();
                    let again = Workload::parse(&canon, BIG_RAM);
                    prop_assert_eq!(
                        again.as_ref().map(|a| &a.phases),
                        Ok(&w.phases),
                        "{:?} -> {:?}", s, canon
                    );
                    // The canonical form is a fixed point.
                    prop_assert_eq!(again.unwrap().to_string(), canon);
                }
            }

            #[test]
            fn accepted_durations_fit_the_phase_table(s in soup()) {
                if let Ok(w) = Workload::parse(&s, BIG_RAM) {
                    for p in &w.phases {
                        let e = p.entry();
                        prop_assert!(e.duration_ns <= MAX_PHASE_DURATION.as_nanos() as u64);
                        prop_assert!(e.hot_permille <= 1000);
                    }
                }
            }
        }
    }
}
