//! Target allocations by min-funding revocation with the idle memory tax (Waldspurger, "Memory
//! Resource Management in VMware ESX Server", OSDI'02, sections 5 and 6).
//!
//! # The policy
//! Each VM has shares `S`, a configured size, a reservation (its minimum), an optional limit (its
//! maximum), an overhead, and `A` active pages (the sampler's estimate). When memory is short it is
//! taken from the VM with the lowest *adjusted shares-per-page ratio*
//!
//! ```text
//! ρ = S / (P · (f + k·(1 − f))),   k = 1 / (1 − τ)
//! ```
//!
//! where `P` is the VM's allocation, `f` the active fraction of it and `τ` the idle memory tax
//! (ESX's default 0.75, so an idle page costs `k = 4` times an active one). `P · (f + k·(1 − f))`
//! is the VM's *cost*: its active pages `A = f·P` count once, its idle ones `P − A` count `k` times.
//! The active pages are what the sampler measures, so as revocation shrinks `P` toward `A` the
//! fraction `f = min(1, A / P)` rises: a VM is never taxed for pages it uses. Below `A` every page
//! is active and costs 1. `τ = 0` is pure proportional sharing; `τ = 1` (`k` infinite) lets all idle
//! memory go.
//!
//! # The algorithm
//! Revoking one page at a time from the lowest-ρ VM is the definition, but it takes one step per
//! page: far too slow for gigabytes. Instead, think of VM `i`'s `p`-th page as having the value
//! `v(i, p) = S_i / cost_i(p)`, its ρ if it held exactly `p` pages. Values fall as `p` grows (cost
//! rises by at least one per page), so revoking the lowest-ρ VM's last page, again and again, keeps
//! exactly the highest-valued pages: the reservation's pages are kept whatever their value, pages
//! beyond `min(limit, size)` never. The result is therefore fixed by a threshold `ρ*`: a VM keeps
//! its pages worth more than `ρ*`, and the pages worth exactly `ρ*` fill what is left.
//!
//! `ρ*` is found by bisection over the bit patterns of non-negative `f64`s (ordered like the
//! numbers), at most 64 rounds; each round counts, per VM, the pages worth at least the candidate
//! threshold by bisection over `0..=min(limit, size)`. Both searches use the same value function,
//! so the result is exactly the page-by-page revocation's (the tests check it against one) and
//! costs `O(n · 64 · log2(pages))`: about 4,000 value evaluations per VM, whatever the budget.
//! Pages worth exactly `ρ*` (equal VMs, zero shares, the idle pages at `τ = 1`) are split evenly
//! among the VMs that hold them, the odd pages going to the VMs listed first.
//!
//! # Page sharing
//! Targets are machine memory. A VM's savings from page sharing (its SHRDSVD) are not charged, as
//! ESX charges `consumed = GRANT − SHRDSVD`: it is given at most its cap less its savings, and it
//! may hold its target plus its savings in guest pages ([`Target::guest_pages`]), which is what
//! reclamation works toward (`docs/design.md`, "Sharing and the targets").
//!
//! # Admission
//! Each VM's overhead is charged against the budget first; the VMs share the rest. If the
//! reservations plus the overheads exceed the budget, nothing is allocated: [`AdmissionError`] says
//! by how much, as ESX refuses to power on a VM whose reservation cannot be met.

use serde::Serialize;
use thiserror::Error;

use crate::units::{MIB, PAGE_SIZE};

/// ESX's idle memory tax default (75%: an idle page costs four active ones).
pub const DEFAULT_TAX: f64 = 0.75;

/// ESX's "normal" shares: 10 per MiB of configured memory ("low" is 5, "high" 20).
pub const NORMAL_SHARES_PER_MIB: u64 = 10;

/// ESX's default shares for a VM of `pages` pages: [`NORMAL_SHARES_PER_MIB`] per MiB, rounded
/// down (at least 1, so that a tiny VM is not at the mercy of everyone else).
pub fn normal_shares(pages: u64) -> u64 {
    let per_mib = MIB / PAGE_SIZE;
    (u128::from(pages) * u128::from(NORMAL_SHARES_PER_MIB) / u128::from(per_mib)).max(1) as u64
}

/// Where a VM's active pages come from, reported per VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveSource {
    /// The access sampler's estimate (reads and writes), its maximum of moving averages.
    Accesses,
    /// The write estimate (dirty logging), where reads are not seen.
    Writes,
}

/// One VM as the scheduler sees it. Sizes in pages.
#[derive(Clone, Debug, PartialEq)]
pub struct VmInput {
    /// For messages only.
    pub name: String,
    /// Configured memory (MEMSZ).
    pub mem_pages: u64,
    pub shares: u64,
    /// The minimum allocation, guaranteed by admission.
    pub reservation_pages: u64,
    /// The maximum allocation (ESX's limit); `None`, or a limit above the configured size, is no
    /// limit.
    pub limit_pages: Option<u64>,
    /// The VMM's own memory for this VM (OVHD), charged against the budget before sharing.
    pub overhead_pages: u64,
    /// Active pages `A`: the active fraction at an allocation `P` is `min(1, A / P)`.
    pub active_pages: u64,
    pub active_source: ActiveSource,
    /// Machine pages its page sharing saves now (its SHRDSVD): not charged. Its target is machine
    /// memory, so it is given at most `max(reservation, cap − saved)` of it, and its guest pages
    /// may hold its target plus its savings ([`Target::guest_pages`]).
    pub saved_pages: u64,
}

impl VmInput {
    /// A VM with ESX's defaults: normal shares, no reservation, no limit, no overhead, and `active`
    /// pages seen by the access estimate.
    pub fn new(name: &str, mem_pages: u64, active_pages: u64) -> Self {
        VmInput {
            name: name.to_string(),
            mem_pages,
            shares: normal_shares(mem_pages),
            reservation_pages: 0,
            limit_pages: None,
            overhead_pages: 0,
            active_pages,
            active_source: ActiveSource::Accesses,
            saved_pages: 0,
        }
    }

    /// The most guest memory it may hold: `min(limit, configured size)`.
    pub fn cap_pages(&self) -> u64 {
        self.limit_pages
            .map_or(self.mem_pages, |l| l.min(self.mem_pages))
    }

    /// The most machine memory it may be given: its cap less what its sharing saves (the cap's
    /// guest pages need no more), but not below its reservation.
    pub fn machine_cap_pages(&self) -> u64 {
        self.cap_pages()
            .saturating_sub(self.saved_pages)
            .max(self.reservation_pages)
    }

    /// The guest pages it may hold for a machine-memory target of `machine_pages`: the target
    /// plus its savings, at most its cap. Holding that many, it is charged
    /// `guest − saved ≤ machine_pages`.
    pub fn guest_pages(&self, machine_pages: u64) -> u64 {
        machine_pages
            .saturating_add(self.saved_pages)
            .min(self.cap_pages())
            .max(machine_pages)
    }
}

/// What holds a VM's target where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// Its shares against the others' (the threshold falls inside its range).
    Shares,
    /// Its reservation: the shares alone would give it less.
    Reservation,
    /// Its limit: the shares alone would give it more.
    Limit,
    /// Its configured size: the shares alone would give it more.
    Size,
}

/// One VM's target allocation (ESX's SZTGT), in the order of the input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    /// Machine memory (SZTGT): what it is charged for, its savings not included.
    pub pages: u64,
    /// The guest pages it may hold (GRANT plus balloon plus swapped, less what the balloon and
    /// swap keep reclaimed): `min(cap, pages + saved)` ([`VmInput::guest_pages`]). Reclamation
    /// works toward this.
    pub guest_pages: u64,
    /// The active fraction `f = min(1, A / P)` at the target (0 for an empty target of an idle VM,
    /// 1 for an empty target of an active one).
    pub active_fraction: f64,
    pub active_source: ActiveSource,
    /// The adjusted shares-per-page ratio at the target; `None` for an empty target (infinite).
    pub rho: Option<f64>,
    pub bound: Bound,
}

/// The reservations and overheads do not fit the budget.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error(
    "cannot admit these VMs: their reservations ({:.1} MiB) plus their overheads ({:.1} MiB) need {:.1} MiB, {:.1} MiB over the budget of {:.1} MiB",
    mib128(*.reservation_pages), mib128(*.overhead_pages),
    mib128(*.reservation_pages + *.overhead_pages),
    mib128(*.reservation_pages + *.overhead_pages - u128::from(*.budget_pages)),
    mib128(u128::from(*.budget_pages))
)]
pub struct AdmissionError {
    pub budget_pages: u64,
    /// Sums over all VMs (wider than a page count, so that no sum overflows).
    pub reservation_pages: u128,
    pub overhead_pages: u128,
}

/// Why no targets could be computed.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum SchedError {
    #[error("the idle memory tax must be between 0 and 1 (0% and 100%), not {0}")]
    BadTax(f64),
    #[error(
        "VM {name}: its reservation ({:.1} MiB) is above the most it may have, min(limit, size) = {:.1} MiB",
        mib128(u128::from(*.reservation_pages)), mib128(u128::from(*.cap_pages))
    )]
    ReservationAboveCap {
        name: String,
        reservation_pages: u64,
        cap_pages: u64,
    },
    #[error(transparent)]
    Admission(#[from] AdmissionError),
}

fn mib128(pages: u128) -> f64 {
    pages as f64 * PAGE_SIZE as f64 / MIB as f64
}

/// One VM's page values, for a given tax.
#[derive(Clone, Copy, Debug)]
struct Curve {
    shares: f64,
    active: u64,
    /// `k = 1 / (1 − τ)`, infinite at `τ = 1`.
    k: f64,
    lo: u64,
    hi: u64,
}

impl Curve {
    fn new(vm: &VmInput, k: f64) -> Self {
        Curve {
            shares: vm.shares as f64,
            active: vm.active_pages,
            k,
            lo: vm.reservation_pages,
            hi: vm.machine_cap_pages(),
        }
    }

    /// `P · (f + k·(1 − f))` with `f = min(1, A / P)`: active pages count once, idle ones `k`
    /// times. At least 1 for `p ≥ 1`, and never decreasing in `p` (each float step is monotonic).
    fn cost(&self, p: u64) -> f64 {
        if p <= self.active {
            p as f64
        } else {
            self.active as f64 + self.k * (p - self.active) as f64
        }
    }

    /// The value of the `p`-th page (`p ≥ 1`): the ratio ρ at an allocation of `p` pages.
    fn value(&self, p: u64) -> f64 {
        self.shares / self.cost(p)
    }

    /// How many of pages `1..=hi` are worth at least `t` (`t ≥ 0`): a prefix, since values never
    /// rise with `p`.
    fn count_at_least(&self, t: f64) -> u64 {
        if t <= 0.0 {
            return self.hi;
        }
        // Invariant: pages 1..=lo_p are worth at least t; page hi_p + 1 is not (or is past hi).
        let (mut lo_p, mut hi_p) = (0u64, self.hi);
        while lo_p < hi_p {
            let mid = lo_p + (hi_p - lo_p).div_ceil(2);
            if self.value(mid) >= t {
                lo_p = mid;
            } else {
                hi_p = mid - 1;
            }
        }
        lo_p
    }

    /// The allocation that keeps the pages worth at least `t`, within `[lo, hi]`.
    fn keep(&self, t: f64) -> u64 {
        self.count_at_least(t).max(self.lo)
    }
}

/// Each VM's target allocation, in pages, for a `budget` of pages and an idle memory tax `tax`
/// (0 to 1): min-funding revocation with the idle memory tax, exactly (see the module's text).
///
/// Targets are machine memory: a VM's savings from page sharing (`saved_pages`) are not charged,
/// so its guest target is its target plus its savings, at most its cap ([`Target::guest_pages`]),
/// and it is given at most [`VmInput::machine_cap_pages`].
///
/// When the VMs' machine caps fit the budget less the overheads, each gets its machine cap (and
/// its cap of guest pages). Otherwise the targets sum to exactly the budget less the overheads.
pub fn targets(vms: &[VmInput], budget_pages: u64, tax: f64) -> Result<Vec<Target>, SchedError> {
    if !(0.0..=1.0).contains(&tax) {
        return Err(SchedError::BadTax(tax));
    }
    for vm in vms {
        if vm.reservation_pages > vm.cap_pages() {
            return Err(SchedError::ReservationAboveCap {
                name: vm.name.clone(),
                reservation_pages: vm.reservation_pages,
                cap_pages: vm.cap_pages(),
            });
        }
    }
    let reservations: u128 = vms.iter().map(|v| u128::from(v.reservation_pages)).sum();
    let overheads: u128 = vms.iter().map(|v| u128::from(v.overhead_pages)).sum();
    if reservations + overheads > u128::from(budget_pages) {
        return Err(AdmissionError {
            budget_pages,
            reservation_pages: reservations,
            overhead_pages: overheads,
        }
        .into());
    }
    // Fits in u64: it is at most the budget.
    let available = (u128::from(budget_pages) - overheads) as u64;
    let k = 1.0 / (1.0 - tax);
    let curves: Vec<Curve> = vms.iter().map(|v| Curve::new(v, k)).collect();
    let caps: u128 = curves.iter().map(|c| u128::from(c.hi)).sum();

    let (pages, level) = if caps <= u128::from(available) {
        (curves.iter().map(|c| c.hi).collect(), Level::Uncontended)
    } else if reservations == u128::from(available) {
        (curves.iter().map(|c| c.lo).collect(), Level::Reservations)
    } else {
        let (pages, rho) = revoke(&curves, available);
        (pages, Level::Threshold(rho))
    };

    Ok(vms
        .iter()
        .zip(&curves)
        .zip(&pages)
        .map(|((vm, c), &p)| describe(vm, c, p, level))
        .collect())
}

/// Where the revocation stopped.
#[derive(Clone, Copy, Debug)]
enum Level {
    /// Every cap fits: nothing revoked.
    Uncontended,
    /// Only the reservations fit.
    Reservations,
    /// Pages worth more than ρ* kept, pages worth exactly ρ* shared.
    Threshold(f64),
}

/// The exact min-funding allocation of `available` pages, for `Σ lo < available < Σ hi`, and
/// its threshold ρ*.
fn revoke(curves: &[Curve], available: u64) -> (Vec<u64>, f64) {
    let total = |t: f64| -> u128 { curves.iter().map(|c| u128::from(c.keep(t))).sum() };
    // ρ* is the largest threshold that keeps at least `available` pages. Non-negative f64s are
    // ordered like their bit patterns; keep(0) keeps every cap (≥ available) and keep(∞) only the
    // reservations (< available), so ρ* lies in [0, ∞).
    let (mut lo_bits, mut hi_bits) = (0u64, f64::INFINITY.to_bits());
    while hi_bits - lo_bits > 1 {
        let mid = lo_bits + (hi_bits - lo_bits) / 2;
        if total(f64::from_bits(mid)) >= u128::from(available) {
            lo_bits = mid;
        } else {
            hi_bits = mid;
        }
    }
    let (rho, above) = (f64::from_bits(lo_bits), f64::from_bits(hi_bits));
    // Pages worth more than ρ* are kept; those worth exactly ρ* fill the rest.
    let mut pages: Vec<u64> = curves.iter().map(|c| c.keep(above)).collect();
    let kept: u128 = pages.iter().map(|&p| u128::from(p)).sum();
    let rest = (u128::from(available) - kept) as u64;
    let tied: Vec<u64> = curves
        .iter()
        .zip(&pages)
        .map(|(c, &p)| c.keep(rho) - p)
        .collect();
    for (p, extra) in pages.iter_mut().zip(split_evenly(&tied, rest)) {
        *p += extra;
    }
    (pages, rho)
}

/// Splits `amount` (at most `Σ capacity`) as evenly as the capacities allow; odd units go to the
/// first entries that still have room.
fn split_evenly(capacity: &[u64], amount: u64) -> Vec<u64> {
    let mut order: Vec<usize> = (0..capacity.len()).filter(|&i| capacity[i] > 0).collect();
    order.sort_by_key(|&i| (capacity[i], i));
    let mut out = vec![0u64; capacity.len()];
    let mut left = amount;
    let mut rest = &order[..];
    while let Some((&i, tail)) = rest.split_first() {
        let m = rest.len() as u64;
        if u128::from(capacity[i]) * u128::from(m) <= u128::from(left) {
            out[i] = capacity[i];
            left -= capacity[i];
            rest = tail;
            continue;
        }
        // Every remaining entry has more room than the level, so each takes the level and the
        // first `left % m` (in input order) one more.
        let (level, mut odd) = (left / m, left % m);
        let mut by_index = rest.to_vec();
        by_index.sort_unstable();
        for j in by_index {
            out[j] = level + u64::from(odd > 0);
            odd = odd.saturating_sub(1);
        }
        return out;
    }
    out
}

fn describe(vm: &VmInput, c: &Curve, pages: u64, level: Level) -> Target {
    let active_fraction = if pages == 0 {
        if vm.active_pages > 0 { 1.0 } else { 0.0 }
    } else {
        (vm.active_pages as f64 / pages as f64).min(1.0)
    };
    let cap_bound = if vm.limit_pages.is_some_and(|l| l < vm.mem_pages) {
        Bound::Limit
    } else {
        Bound::Size
    };
    let bound = match level {
        _ if c.lo == c.hi && c.lo > 0 => Bound::Reservation,
        Level::Uncontended => cap_bound,
        Level::Reservations if pages > 0 => Bound::Reservation,
        Level::Reservations => Bound::Shares,
        // At its cap with a next page (were there one) worth the threshold: the cap holds it.
        Level::Threshold(rho) if pages == c.hi && c.value(c.hi.saturating_add(1)) >= rho => {
            cap_bound
        }
        // At its reservation with its last page worth less than the threshold: the reservation
        // holds it.
        Level::Threshold(rho) if pages == c.lo && pages > 0 && c.value(pages) < rho => {
            Bound::Reservation
        }
        Level::Threshold(_) => Bound::Shares,
    };
    Target {
        pages,
        guest_pages: vm.guest_pages(pages),
        active_fraction,
        active_source: vm.active_source,
        rho: (pages > 0).then(|| c.value(pages)),
        bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_PAGES: u64 = MIB / PAGE_SIZE;

    fn vm(name: &str, mem: u64, active: u64) -> VmInput {
        VmInput::new(name, mem, active)
    }

    fn pages(ts: &[Target]) -> Vec<u64> {
        ts.iter().map(|t| t.pages).collect()
    }

    /// The definition: revoke one page at a time from the VM with the lowest ρ at its current
    /// allocation (ties: the VM listed last), above its reservation, until the rest fits.
    fn naive(vms: &[VmInput], budget: u64, tax: f64) -> Vec<u64> {
        let k = 1.0 / (1.0 - tax);
        let curves: Vec<Curve> = vms.iter().map(|v| Curve::new(v, k)).collect();
        let available = budget - vms.iter().map(|v| v.overhead_pages).sum::<u64>();
        let mut p: Vec<u64> = curves.iter().map(|c| c.hi).collect();
        while p.iter().sum::<u64>() > available {
            let i = (0..curves.len())
                .filter(|&i| p[i] > curves[i].lo)
                .min_by(|&a, &b| {
                    let (va, vb) = (curves[a].value(p[a]), curves[b].value(p[b]));
                    va.partial_cmp(&vb).unwrap().then(b.cmp(&a))
                })
                .expect("admitted, so some VM is above its reservation");
            p[i] -= 1;
        }
        p
    }

    #[test]
    fn esx_defaults() {
        assert_eq!(normal_shares(256 * MIB_PAGES), 2_560);
        assert_eq!(normal_shares(1), 1);
        assert_eq!(normal_shares(u64::MAX), u64::MAX / 256 * 10 + 9);
        let v = vm("a", 512 * MIB_PAGES, 7);
        assert_eq!(v.shares, 5_120);
        assert_eq!((v.reservation_pages, v.limit_pages), (0, None));
        assert_eq!(v.cap_pages(), 512 * MIB_PAGES);
        assert_eq!(DEFAULT_TAX, 0.75);
    }

    #[test]
    fn uncontended_vms_get_their_caps() {
        let mut a = vm("a", 1_000, 10);
        a.limit_pages = Some(600);
        a.overhead_pages = 50;
        let b = vm("b", 2_000, 2_000);
        let ts = targets(&[a, b], 2_650, DEFAULT_TAX).unwrap();
        assert_eq!(pages(&ts), [600, 2_000]);
        assert_eq!([ts[0].bound, ts[1].bound], [Bound::Limit, Bound::Size]);
        assert_eq!(ts[0].active_fraction, 10.0 / 600.0);
        assert_eq!(ts[1].active_fraction, 1.0);
        assert_eq!(ts[1].active_source, ActiveSource::Accesses);
    }

    #[test]
    fn admission_names_the_numbers() {
        let mut a = vm("a", 100 * MIB_PAGES, 0);
        a.reservation_pages = 60 * MIB_PAGES;
        a.overhead_pages = 10 * MIB_PAGES;
        let mut b = a.clone();
        b.name = "b".into();
        let err = targets(&[a.clone(), b], 130 * MIB_PAGES, DEFAULT_TAX).unwrap_err();
        assert_eq!(
            err,
            SchedError::Admission(AdmissionError {
                budget_pages: 130 * MIB_PAGES,
                reservation_pages: u128::from(120 * MIB_PAGES),
                overhead_pages: u128::from(20 * MIB_PAGES),
            })
        );
        assert_eq!(
            err.to_string(),
            "cannot admit these VMs: their reservations (120.0 MiB) plus their overheads (20.0 MiB) \
             need 140.0 MiB, 10.0 MiB over the budget of 130.0 MiB"
        );
        // Exactly full: everyone at its reservation.
        let mut b = a.clone();
        b.name = "b".into();
        let ts = targets(&[a, b], 140 * MIB_PAGES, DEFAULT_TAX).unwrap();
        assert_eq!(pages(&ts), [60 * MIB_PAGES; 2]);
        assert_eq!(ts[0].bound, Bound::Reservation);
        // Sums wider than u64 do not overflow.
        let mut huge = vm("h", u64::MAX, 0);
        huge.reservation_pages = u64::MAX;
        huge.overhead_pages = u64::MAX;
        let err = targets(&[huge.clone(), huge], u64::MAX, 0.5).unwrap_err();
        assert!(matches!(err, SchedError::Admission(_)), "{err}");
    }

    #[test]
    fn bad_input_is_refused() {
        let v = vm("a", 100, 0);
        for tax in [-0.01, 1.01, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                targets(std::slice::from_ref(&v), 100, tax),
                Err(SchedError::BadTax(_))
            ));
        }
        let mut w = vm("web", 100 * MIB_PAGES, 0);
        w.limit_pages = Some(40 * MIB_PAGES);
        w.reservation_pages = 50 * MIB_PAGES;
        let err = targets(&[w], u64::MAX, 0.5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM web: its reservation (50.0 MiB) is above the most it may have, min(limit, size) = 40.0 MiB"
        );
        assert_eq!(targets(&[], 0, 0.0), Ok(vec![]));
    }

    /// Two 256 MiB VMs with equal shares under a 320 MiB budget (Waldspurger's Fig. 7 setting).
    fn fig7(idle_active: u64, busy_active: u64, tax: f64) -> Vec<Target> {
        let m = 256 * MIB_PAGES;
        targets(
            &[vm("idle", m, idle_active), vm("busy", m, busy_active)],
            320 * MIB_PAGES,
            tax,
        )
        .unwrap()
    }

    #[test]
    fn no_tax_splits_equally_whatever_the_activity() {
        for (a, b) in [(0, 0), (1_024, 65_536), (65_536, 0), (30_000, 5)] {
            assert_eq!(pages(&fig7(a, b, 0.0)), [160 * MIB_PAGES; 2], "{a} {b}");
        }
    }

    #[test]
    fn closed_form_equilibria_at_the_default_tax() {
        let budget = (320 * MIB_PAGES) as f64;
        let k = 1.0 / (1.0 - DEFAULT_TAX);
        // The busy VM uses all it gets (cost P), the idle one A + k(P − A) with P above A:
        // k·P_a − (k − 1)·A_a = M − P_a, so P_a = (M + (k − 1)·A_a) / (k + 1).
        let a_idle = 1_024.0;
        let ts = fig7(1_024, 256 * MIB_PAGES, DEFAULT_TAX);
        let want = (budget + (k - 1.0) * a_idle) / (k + 1.0);
        assert!((ts[0].pages as f64 - want).abs() <= 1.0, "{ts:?} vs {want}");
        assert_eq!(ts[0].pages + ts[1].pages, 320 * MIB_PAGES);
        assert_eq!(ts[1].active_fraction, 1.0);
        assert_eq!([ts[0].bound, ts[1].bound], [Bound::Shares, Bound::Shares]);
        // Both partly idle: k·P_a − (k − 1)·A_a = k·P_b − (k − 1)·A_b, so
        // P_a − P_b = τ·(A_a − A_b).
        let (aa, ab) = (1_024.0, 30_000.0);
        let ts = fig7(1_024, 30_000, DEFAULT_TAX);
        let want = (budget + DEFAULT_TAX * (aa - ab)) / 2.0;
        assert!((ts[0].pages as f64 - want).abs() <= 1.0, "{ts:?} vs {want}");
        // The ratios are equal at the equilibrium.
        let (ra, rb) = (ts[0].rho.unwrap(), ts[1].rho.unwrap());
        assert!((ra - rb).abs() / ra < 1e-4, "{ra} {rb}");
        // The idle VM's fraction is its active pages over its target: it rose as it shrank.
        assert!((ts[0].active_fraction - aa / ts[0].pages as f64).abs() < 1e-12);
    }

    #[test]
    fn a_full_tax_takes_all_idle_memory() {
        let ts = targets(
            &[vm("idle", 10_000, 1_000), vm("busy", 10_000, 10_000)],
            10_500,
            1.0,
        )
        .unwrap();
        assert_eq!(pages(&ts), [1_000, 9_500]);
        // Memory nobody actively wants still goes to the idle pages.
        let ts = targets(
            &[vm("idle", 10_000, 1_000), vm("busy", 10_000, 10_000)],
            15_000,
            1.0,
        )
        .unwrap();
        assert_eq!(pages(&ts), [5_000, 10_000]);
    }

    #[test]
    fn shares_one_two_four_give_one_two_four() {
        let mem = 100_000;
        for (tax, active) in [
            (DEFAULT_TAX, [mem; 3]),                // all busy: f = 1
            (DEFAULT_TAX, [0; 3]),                  // all idle: f = 0
            (DEFAULT_TAX, [5_000, 10_000, 20_000]), // f = 1/2 each at the outcome
            (0.0, [3, 99_999, 12]),
            (1.0 - 1e-9, [mem; 3]),
        ] {
            let vms: Vec<VmInput> = [1, 2, 4]
                .iter()
                .zip(active)
                .map(|(&s, a)| VmInput {
                    shares: s * 1_000,
                    ..vm("v", mem, a)
                })
                .collect();
            let ts = targets(&vms, 70_000, tax).unwrap();
            assert_eq!(pages(&ts), [10_000, 20_000, 40_000], "{tax} {active:?}");
            assert!(ts.iter().all(|t| t.bound == Bound::Shares));
        }
    }

    #[test]
    fn bounds_hold_and_are_reported() {
        let mut r = vm("reserved", 10_000, 0);
        r.reservation_pages = 4_000;
        let mut l = vm("limited", 10_000, 10_000);
        l.limit_pages = Some(3_000);
        let free = vm("free", 10_000, 10_000);
        let ts = targets(&[r, l, free], 12_000, DEFAULT_TAX).unwrap();
        assert_eq!(pages(&ts), [4_000, 3_000, 5_000]);
        assert_eq!(
            ts.iter().map(|t| t.bound).collect::<Vec<_>>(),
            [Bound::Reservation, Bound::Limit, Bound::Shares]
        );
    }

    #[test]
    fn zero_shares_get_only_their_reservation_under_pressure() {
        let mut z = vm("zero", 10_000, 10_000);
        z.shares = 0;
        z.reservation_pages = 100;
        let ts = targets(&[z.clone(), vm("b", 10_000, 0)], 10_000, DEFAULT_TAX).unwrap();
        assert_eq!(pages(&ts), [100, 9_900]);
        // Two zero-share VMs split what is left above their reservations evenly (the odd page to
        // the first).
        let mut z2 = z.clone();
        z2.reservation_pages = 0;
        let ts = targets(&[z, z2, vm("b", 1_000, 0)], 2_001, DEFAULT_TAX).unwrap();
        assert_eq!(pages(&ts), [100 + 451, 450, 1_000]);
    }

    #[test]
    fn savings_are_not_charged() {
        // Three equal VMs of 12 000 pages on 27 000: 9 000 each. The first saves 3 000 pages by
        // sharing: the budget still gives it 9 000 pages of machine memory, and it may hold 12 000
        // guest pages (its cap) on them.
        let plain = vm("b", 12_000, 12_000);
        let mut sharing = vm("a", 12_000, 12_000);
        sharing.saved_pages = 3_000;
        let ts = targets(
            &[sharing.clone(), plain.clone(), plain.clone()],
            27_000,
            DEFAULT_TAX,
        )
        .unwrap();
        assert_eq!(pages(&ts), [9_000, 9_000, 9_000]);
        assert_eq!(
            ts.iter().map(|t| t.guest_pages).collect::<Vec<_>>(),
            [12_000, 9_000, 9_000]
        );
        // Saving 5 000, it needs only 7 000 machine pages for its cap: the 2 000 it cannot use go
        // to the others.
        sharing.saved_pages = 5_000;
        let ts = targets(
            &[sharing.clone(), plain.clone(), plain],
            27_000,
            DEFAULT_TAX,
        )
        .unwrap();
        assert_eq!(pages(&ts), [7_000, 10_000, 10_000]);
        assert_eq!(ts[0].guest_pages, 12_000);
        assert_eq!(ts[0].bound, Bound::Size);
        // A limit caps guest pages, savings or not; a reservation is machine memory, kept whole.
        sharing.limit_pages = Some(8_000);
        sharing.reservation_pages = 4_000;
        assert_eq!(sharing.machine_cap_pages(), 4_000);
        assert_eq!(sharing.guest_pages(4_000), 8_000);
        let ts = targets(&[sharing], 1_000_000, DEFAULT_TAX).unwrap();
        assert_eq!((ts[0].pages, ts[0].guest_pages), (4_000, 8_000));
    }

    #[test]
    fn huge_budgets_are_exact_and_quick() {
        // 64 VMs of 4 TiB each (2^30 pages) under a budget of a third of them: one solve, no
        // page-by-page loop.
        let vms: Vec<VmInput> = (0..64u64)
            .map(|i| VmInput {
                shares: 1 + i * 1_000,
                overhead_pages: i,
                ..vm("v", 1 << 30, (i << 24) + i)
            })
            .collect();
        let budget = (64u64 << 30) / 3;
        let ts = targets(&vms, budget, DEFAULT_TAX).unwrap();
        let overhead: u64 = (0..64).sum();
        assert_eq!(ts.iter().map(|t| t.pages).sum::<u64>(), budget - overhead);
        assert_optimal(&vms, &pages(&ts), DEFAULT_TAX);
    }

    #[test]
    fn serialized_for_the_report() {
        let t = &fig7(0, 0, 0.5)[0];
        let json = serde_json::to_value(t).unwrap();
        assert_eq!(json["active_source"], "accesses");
        assert_eq!(json["bound"], "shares");
        assert_eq!(
            serde_json::to_value(ActiveSource::Writes).unwrap(),
            "writes"
        );
    }

    /// No page can move from one VM to another and be worth more there: the exchange condition
    /// that characterizes the min-funding allocation.
    fn assert_optimal(vms: &[VmInput], p: &[u64], tax: f64) {
        let k = 1.0 / (1.0 - tax);
        let curves: Vec<Curve> = vms.iter().map(|v| Curve::new(v, k)).collect();
        for (i, ci) in curves.iter().enumerate() {
            if p[i] <= ci.lo {
                continue;
            }
            for (j, cj) in curves.iter().enumerate() {
                if i != j && p[j] < cj.hi {
                    assert!(
                        cj.value(p[j] + 1) <= ci.value(p[i]),
                        "VM {j}'s next page is worth more than VM {i}'s last: {p:?}"
                    );
                }
            }
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A VM of up to `max_mem` pages with any shares, reservation, limit, overhead, activity.
        fn any_vm(max_mem: u64) -> impl Strategy<Value = VmInput> {
            (1..=max_mem, 0u64..10_000, any::<bool>()).prop_flat_map(|(mem, shares, writes)| {
                (
                    0..=mem,
                    prop::option::of(0..=mem),
                    0u64..=mem / 4,
                    0..=mem + mem / 8,
                )
                    .prop_map(move |(resv, limit, overhead, active)| {
                        let cap = limit.map_or(mem, |l| l.min(mem));
                        // Savings in about half of the VMs, from a few pages to all of them.
                        let saved = if active % 2 == 0 {
                            0
                        } else {
                            (active / 2).min(mem)
                        };
                        VmInput {
                            name: "v".into(),
                            mem_pages: mem,
                            shares,
                            reservation_pages: resv.min(cap),
                            limit_pages: limit,
                            overhead_pages: overhead,
                            active_pages: active,
                            active_source: if writes {
                                ActiveSource::Writes
                            } else {
                                ActiveSource::Accesses
                            },
                            saved_pages: saved,
                        }
                    })
            })
        }

        /// VMs and a budget anywhere from nothing to more than they could use.
        fn setup(max_mem: u64, max_vms: usize) -> impl Strategy<Value = (Vec<VmInput>, u64)> {
            prop::collection::vec(any_vm(max_mem), 1..=max_vms).prop_flat_map(|vms| {
                let all: u64 = vms.iter().map(|v| v.mem_pages + v.overhead_pages).sum();
                (Just(vms), 0..=all + all / 4)
            })
        }

        /// VMs and a budget that admits them.
        fn admitted(max_mem: u64, max_vms: usize) -> impl Strategy<Value = (Vec<VmInput>, u64)> {
            prop::collection::vec(any_vm(max_mem), 1..=max_vms).prop_flat_map(|vms| {
                let need: u64 = vms
                    .iter()
                    .map(|v| v.reservation_pages + v.overhead_pages)
                    .sum();
                let all: u64 = vms.iter().map(|v| v.mem_pages + v.overhead_pages).sum();
                (Just(vms), need..=all + all / 4)
            })
        }

        fn tax() -> impl Strategy<Value = f64> {
            prop_oneof![Just(0.0), Just(DEFAULT_TAX), Just(1.0), 0.0f64..=1.0]
        }

        proptest! {
            #[test]
            fn bounded_and_summing_to_the_budget((vms, budget) in setup(1 << 40, 8), tax in tax()) {
                let reservations: u64 = vms.iter().map(|v| v.reservation_pages).sum();
                let overheads: u64 = vms.iter().map(|v| v.overhead_pages).sum();
                match targets(&vms, budget, tax) {
                    Err(SchedError::Admission(e)) => {
                        prop_assert!(reservations + overheads > budget);
                        prop_assert_eq!(e.reservation_pages, u128::from(reservations));
                        prop_assert_eq!(e.overhead_pages, u128::from(overheads));
                    }
                    Err(e) => prop_assert!(false, "{}", e),
                    Ok(ts) => {
                        prop_assert_eq!(ts.len(), vms.len());
                        let mut charged = 0u64;
                        for (v, t) in vms.iter().zip(&ts) {
                            prop_assert!(t.pages >= v.reservation_pages);
                            prop_assert!(t.pages <= v.machine_cap_pages());
                            prop_assert!((0.0..=1.0).contains(&t.active_fraction));
                            prop_assert_eq!(t.active_source, v.active_source);
                            // Guest pages: never fewer than the target, never more than the cap
                            // (a reservation above the cap less the savings aside), and a VM
                            // holding them is charged at most its target.
                            prop_assert!(t.guest_pages >= t.pages);
                            prop_assert!(t.guest_pages <= v.cap_pages().max(t.pages));
                            let charge = t.guest_pages.saturating_sub(v.saved_pages);
                            prop_assert!(charge <= t.pages);
                            charged += charge;
                        }
                        // The machine memory the VMs are charged at their guest targets fits.
                        prop_assert!(charged + overheads <= budget);
                        let sum: u64 = ts.iter().map(|t| t.pages).sum();
                        let caps: u64 = vms.iter().map(|v| v.machine_cap_pages()).sum();
                        prop_assert_eq!(sum, caps.min(budget - overheads));
                        if sum < caps {
                            assert_optimal(&vms, &pages(&ts), tax);
                        }
                    }
                }
            }

            #[test]
            fn same_as_revoking_page_by_page(
                (vms, budget) in admitted(300, 4)
                    .prop_map(|(mut vms, b)| { for v in &mut vms { v.shares += 1; } (vms, b) }),
                tax in 0.0f64..0.99,
            ) {
                let ts = targets(&vms, budget, tax).unwrap();
                prop_assert_eq!(pages(&ts), naive(&vms, budget, tax));
            }

            #[test]
            fn equal_vms_get_equal_targets(
                v in any_vm(1 << 30),
                copies in 2usize..6,
                (others, budget) in admitted(1 << 30, 3),
                spare in 0.0f64..=1.5,
                tax in tax(),
            ) {
                // Admit the copies too, with up to 1.5 times their size to share.
                let budget = budget
                    + copies as u64 * (v.reservation_pages + v.overhead_pages)
                    + (spare * (copies as u64 * v.mem_pages) as f64) as u64;
                let mut vms = vec![v; copies];
                vms.extend(others);
                let ts = targets(&vms, budget, tax).unwrap();
                let equal = &ts[..copies];
                let lo = equal.iter().map(|t| t.pages).min().unwrap();
                let hi = equal.iter().map(|t| t.pages).max().unwrap();
                prop_assert!(hi - lo <= 1, "{:?}", pages(&ts));
            }

            #[test]
            fn more_shares_never_give_less(
                (vms, budget) in admitted(1 << 30, 6),
                extra in 1u64..100_000,
                tax in tax(),
            ) {
                if let Ok(before) = targets(&vms, budget, tax) {
                    let mut richer = vms.clone();
                    richer[0].shares += extra;
                    let after = targets(&richer, budget, tax).unwrap();
                    prop_assert!(after[0].pages >= before[0].pages,
                        "{} < {}", after[0].pages, before[0].pages);
                }
            }

            #[test]
            fn more_savings_never_give_less(
                (vms, budget) in admitted(1 << 30, 6),
                extra in 1u64..1 << 30,
                tax in tax(),
            ) {
                // A VM whose sharing saves more may hold at least as many guest pages, and the
                // others get at least as much machine memory (it needs less of it).
                if let Ok(before) = targets(&vms, budget, tax) {
                    let mut more = vms.clone();
                    more[0].saved_pages = (more[0].saved_pages + extra).min(more[0].mem_pages);
                    let after = targets(&more, budget, tax).unwrap();
                    prop_assert!(after[0].guest_pages >= before[0].guest_pages,
                        "{} < {}", after[0].guest_pages, before[0].guest_pages);
                    for (a, b) in after.iter().zip(&before).skip(1) {
                        prop_assert!(a.pages >= b.pages, "{:?} < {:?}", pages(&after), pages(&before));
                    }
                }
            }

            #[test]
            fn no_tax_ignores_activity(
                (vms, budget) in setup(1 << 40, 6),
                actives in prop::collection::vec(any::<u64>(), 6),
            ) {
                let mut other = vms.clone();
                for (v, a) in other.iter_mut().zip(actives) {
                    v.active_pages = a % (v.mem_pages * 2 + 1);
                }
                prop_assert_eq!(
                    targets(&vms, budget, 0.0).map(|t| pages(&t)),
                    targets(&other, budget, 0.0).map(|t| pages(&t))
                );
            }

            #[test]
            fn never_panics(
                vms in prop::collection::vec(
                    (any::<u64>(), any::<u64>(), any::<u64>(), any::<Option<u64>>(), any::<u64>(), any::<u64>()),
                    0..5,
                ),
                budget in any::<u64>(),
                tax in any::<f64>(),
            ) {
                let vms: Vec<VmInput> = vms
                    .into_iter()
                    .map(|(mem, shares, resv, limit, overhead, active)| VmInput {
                        name: "v".into(),
                        mem_pages: mem,
                        shares,
                        reservation_pages: resv,
                        limit_pages: limit,
                        overhead_pages: overhead,
                        active_pages: active,
                        active_source: ActiveSource::Writes,
                        saved_pages: active / 3,
                    })
                    .collect();
                if let Ok(ts) = targets(&vms, budget, tax) {
                    let sum: u128 = ts.iter().map(|t| u128::from(t.pages)).sum();
                    prop_assert!(sum <= u128::from(budget));
                }
            }
        }
    }
}
