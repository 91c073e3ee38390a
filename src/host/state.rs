//! The host's memory state, from the free part of the budget, with ESX's thresholds and
//! hysteresis (Waldspurger, OSDI'02, section 6.3).
//!
//! | state | entered when free falls below | left upward when free rises above | action |
//! |---|---|---|---|
//! | `high` | (the start) | | none |
//! | `soft` | 4% | 6% + 1% → `high` | balloon toward the targets |
//! | `hard` | 2% | 4% + 1% → `soft` | hypervisor swap toward the targets |
//! | `low` | 1% | 2% + 1% → `hard` | also pause the vCPUs of VMs above their target |
//!
//! Going down, the state drops to the lowest state whose threshold free memory is below, in one
//! step (a host can fall from `high` to `low` in one period). Going up, a state is left for the
//! next one up only when free memory *significantly exceeds* the next state's threshold, as the
//! paper puts it: by [`MARGIN_PCT`] of the budget, and in each of the last [`UP_PERIODS`]
//! observations; the state rises to the lowest one those observations all allow, which may be
//! several steps when free memory jumped and stayed (a VM was killed).
//!
//! The dwell is memvisor's, for small budgets: reclamation frees memory in lumps (a boundary swaps
//! out up to 64 MiB of a VM at once) and a busy VM pulls swapped pages back between boundaries, so
//! free memory on a budget of a few hundred MiB swings by several points within a period. Without
//! the dwell, one good observation lifted a host from `low` to `high`, which stopped reclaiming,
//! and the next period fell back to `low`: measured, 21 state changes in a minute of
//! `cargo bench --bench host -- ladder`. Falling is never delayed: short memory is acted on at
//! once.
//!
//! Re-entering `high` (which stops reclaiming) is damped further, as routers damp a flapping route
//! (RFC 2439): each fall from `high` within the last [`EPISODE_WINDOW`] periods doubles the dwell
//! before `high` is re-entered ([`StateMachine::high_dwell`]: 3, 6, 12, at most 24 periods), and
//! the host waits in `soft` meanwhile. A host whose demand keeps arriving in steps then stays in
//! its reclaiming states through them, instead of returning to `high` between two steps.
//!
//! Hence between entering a state and leaving it upward, free memory must move by at least two
//! points of the budget (`low`: below 1% to above 3%; `hard`: below 2% to above 5%; `soft`: below
//! 4% to above 7%): a free fraction that wanders inside any band two points wide never changes
//! state back and forth. The 1-point margin is memvisor's choice (ESX does not publish its own):
//! the smallest whole percent, it keeps every state's upward exit at least 2 points above its
//! entry, and `high`'s re-entry (above 7%) 3 points above `soft`'s entry (below 4%).
//!
//! ESX computes its targets "to drive the aggregate amount of free space above the high
//! threshold": [`schedulable_pages`] is the part of the budget the targets (and overheads) may
//! share so that a host whose VMs sit at their targets is back in `high`.
//!
//! All comparisons are exact in integers (`free · 100` against `percent · budget`).

use std::collections::VecDeque;

use serde::Serialize;

/// The free thresholds, in percent of the budget: the paper's 6%, 4%, 2%, 1% (later ESX releases
/// keep `Mem.MinFreePct` = 6% and put soft, hard and low at 64%, 32% and 16% of it).
pub const HIGH_PCT: u64 = 6;
pub const SOFT_PCT: u64 = 4;
pub const HARD_PCT: u64 = 2;
pub const LOW_PCT: u64 = 1;
/// How far above the next threshold up free memory must rise before a state is left upward.
pub const MARGIN_PCT: u64 = 1;

/// How many observations in a row must allow a state to be left upward.
pub const UP_PERIODS: usize = 3;

/// The periods over which falls from `high` are remembered (see [`StateMachine::high_dwell`]).
pub const EPISODE_WINDOW: u64 = 60;

/// The longest dwell before `high` is re-entered: [`UP_PERIODS`] doubled three times.
pub const MAX_HIGH_DWELL: usize = UP_PERIODS << 3;

/// The part of `budget_pages` that targets and overheads may use: the budget less just over
/// `HIGH_PCT + MARGIN_PCT` percent of it, so that free memory at the targets exceeds `high`'s
/// upward exit and the state returns to `high`.
pub fn schedulable_pages(budget_pages: u64) -> u64 {
    let keep_free = u128::from(budget_pages) * u128::from(HIGH_PCT + MARGIN_PCT) / 100 + 1;
    (u128::from(budget_pages).saturating_sub(keep_free)) as u64
}

/// The host's memory state, from most to least free memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemState {
    /// Enough free memory: no reclamation.
    High,
    /// Balloon toward the targets.
    Soft,
    /// Hypervisor swap toward the targets.
    Hard,
    /// Swap, and pause the vCPUs of VMs above their target.
    Low,
}

impl MemState {
    /// The word the table shows.
    pub fn as_str(self) -> &'static str {
        match self {
            MemState::High => "high",
            MemState::Soft => "soft",
            MemState::Hard => "hard",
            MemState::Low => "low",
        }
    }

    /// The threshold below which this state is entered (none for `high`).
    fn entry_pct(self) -> Option<u64> {
        match self {
            MemState::High => None,
            MemState::Soft => Some(SOFT_PCT),
            MemState::Hard => Some(HARD_PCT),
            MemState::Low => Some(LOW_PCT),
        }
    }

    /// The next state up and the free percent it must be exceeded by, less the margin: the
    /// threshold of that state.
    fn up(self) -> Option<(MemState, u64)> {
        match self {
            MemState::High => None,
            MemState::Soft => Some((MemState::High, HIGH_PCT)),
            MemState::Hard => Some((MemState::Soft, SOFT_PCT)),
            MemState::Low => Some((MemState::Hard, HARD_PCT)),
        }
    }

    /// The next state down.
    fn down(self) -> Option<MemState> {
        match self {
            MemState::High => Some(MemState::Soft),
            MemState::Soft => Some(MemState::Hard),
            MemState::Hard => Some(MemState::Low),
            MemState::Low => None,
        }
    }
}

/// A change of state, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub from: MemState,
    pub to: MemState,
    pub free_pages: u64,
    pub budget_pages: u64,
}

/// The memory state over successive observations of free memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateMachine {
    state: MemState,
    transitions: u64,
    /// The highest state each of the last observations allowed (at most [`MAX_HIGH_DWELL`],
    /// since the last fall).
    allowed: VecDeque<MemState>,
    /// Observations so far.
    period: u64,
    /// The periods at which the state fell from `high`, within the last [`EPISODE_WINDOW`].
    episodes: VecDeque<u64>,
}

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

/// `free / budget < pct%`, exactly. An empty budget has nothing free.
fn below(free: u64, budget: u64, pct: u64) -> bool {
    u128::from(free) * 100 < u128::from(pct) * u128::from(budget) || budget == 0
}

/// `free / budget > pct%`, exactly.
fn above(free: u64, budget: u64, pct: u64) -> bool {
    u128::from(free) * 100 > u128::from(pct) * u128::from(budget) && budget > 0
}

impl StateMachine {
    /// Starts in `high`: an empty host.
    pub fn new() -> Self {
        StateMachine {
            state: MemState::High,
            transitions: 0,
            allowed: VecDeque::with_capacity(MAX_HIGH_DWELL),
            period: 0,
            episodes: VecDeque::new(),
        }
    }

    /// How many observations in a row must allow `high` before it is re-entered: [`UP_PERIODS`]
    /// after one fall from `high` in the last [`EPISODE_WINDOW`] periods (or none), doubled for
    /// each further fall, up to [`MAX_HIGH_DWELL`]. Route flap damping's rule (RFC 2439), in
    /// periods: a host that keeps falling out of `high` keeps reclaiming until memory has stayed
    /// free for longer.
    pub fn high_dwell(&self) -> usize {
        let falls = self.episodes.len().saturating_sub(1).min(3);
        UP_PERIODS << falls
    }

    pub fn state(&self) -> MemState {
        self.state
    }

    /// Changes of state so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// One period's observation: `free_pages` of `budget_pages` are free (the budget less every
    /// VM's granted memory and overhead; the caller saturates at 0). Returns the change, if any.
    pub fn observe(&mut self, free_pages: u64, budget_pages: u64) -> Option<Transition> {
        while (self.episodes.front()).is_some_and(|&p| self.period - p >= EPISODE_WINDOW) {
            self.episodes.pop_front();
        }
        let from = self.state;
        let mut to = from;
        // Down: as far as free memory is below the entry threshold of the next state down.
        while let Some(next) = to.down() {
            match next.entry_pct() {
                Some(pct) if below(free_pages, budget_pages, pct) => to = next,
                _ => break,
            }
        }
        // Up (only if not going down): step by step while free memory exceeds the next state's
        // threshold by the margin, as far as each of the last UP_PERIODS observations allowed.
        if to == from {
            let mut allowed = from;
            while let Some((next, pct)) = allowed.up() {
                if above(free_pages, budget_pages, pct + MARGIN_PCT) {
                    allowed = next;
                } else {
                    break;
                }
            }
            if self.allowed.len() == MAX_HIGH_DWELL {
                self.allowed.pop_front();
            }
            self.allowed.push_back(allowed);
            // The least free state of the last `n` (the greatest in the order), if there are `n`.
            let least = |n: usize| {
                let a = &self.allowed;
                (a.len() >= n).then(|| a.iter().skip(a.len() - n).copied().max())
            };
            if let Some(Some(rise)) = least(UP_PERIODS) {
                // Back to `high` only after its own (longer) dwell; `soft` meanwhile.
                let rise = match rise {
                    MemState::High if least(self.high_dwell()) != Some(Some(MemState::High)) => {
                        MemState::Soft
                    }
                    other => other,
                };
                to = rise.min(from);
            }
        } else {
            // Falling: what earlier observations allowed no longer counts.
            self.allowed.clear();
            if from == MemState::High {
                self.episodes.push_back(self.period);
            }
        }
        self.period += 1;
        if to == from {
            return None;
        }
        self.state = to;
        self.transitions += 1;
        Some(Transition {
            from,
            to,
            free_pages,
            budget_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemState::*;

    /// A budget of 10,000 pages: free pages are hundredths of a percent (400 is 4%).
    const B: u64 = 10_000;

    fn machine_in(state: MemState) -> StateMachine {
        let mut m = StateMachine::new();
        let free = match state {
            High => 1000,
            Soft => 300,
            Hard => 150,
            Low => 50,
        };
        m.observe(free, B);
        assert_eq!(m.state(), state);
        m
    }

    /// Observes `free` UP_PERIODS times: the last returns the change, if any; the others none.
    fn observe_long(m: &mut StateMachine, free: u64, budget: u64) -> Option<Transition> {
        for _ in 1..UP_PERIODS {
            let t = m.observe(free, budget);
            if t.is_some() {
                return t;
            }
        }
        m.observe(free, budget)
    }

    #[test]
    fn starts_high_and_stays_in_the_band_above_soft() {
        let mut m = StateMachine::new();
        assert_eq!(m.state(), High);
        // 4% exactly is not below 4%.
        for free in [10_000, 600, 500, 400] {
            assert_eq!(m.observe(free, B), None, "{free}");
        }
        assert_eq!(m.transitions(), 0);
    }

    #[test]
    fn every_downward_transition() {
        let cases = [
            (High, 399, Soft),
            (High, 199, Hard),
            (High, 99, Low),
            (Soft, 199, Hard),
            (Soft, 99, Low),
            (Hard, 99, Low),
        ];
        for (from, free, to) in cases {
            let mut m = machine_in(from);
            let before = m.transitions();
            let t = m.observe(free, B).expect("a transition");
            assert_eq!((t.from, t.to), (from, to), "{from:?} at {free}");
            assert_eq!((t.free_pages, t.budget_pages), (free, B));
            assert_eq!(m.transitions(), before + 1);
        }
        // At the threshold exactly: no change.
        for (from, free) in [(High, 400), (Soft, 200), (Hard, 100)] {
            let mut m = machine_in(from);
            assert_eq!(m.observe(free, B), None, "{from:?} at {free}");
        }
    }

    #[test]
    fn every_upward_transition_needs_the_margin() {
        // (from, highest free that keeps it, lowest free that leaves, where to)
        let cases = [
            (Soft, 700, 701, High),
            (Hard, 500, 501, Soft),
            (Low, 300, 301, Hard),
            (Hard, 500, 701, High),
            (Low, 300, 501, Soft),
            (Low, 300, 10_000, High),
        ];
        for (from, stay, leave, to) in cases {
            let mut m = machine_in(from);
            assert_eq!(observe_long(&mut m, stay, B), None, "{from:?} at {stay}");
            for _ in 1..UP_PERIODS {
                assert_eq!(m.observe(leave, B), None, "{from:?}: the dwell");
            }
            let t = m.observe(leave, B).expect("a transition");
            assert_eq!((t.from, t.to), (from, to), "{from:?} at {leave}");
        }
    }

    #[test]
    fn a_moment_of_free_memory_does_not_lift_the_state() {
        let mut m = machine_in(Low);
        // Plenty free for one period, then short again: still low, no change counted.
        assert_eq!(m.observe(10_000, B), None);
        assert_eq!(m.observe(50, B), None);
        assert_eq!(m.observe(10_000, B), None);
        assert_eq!(m.observe(10_000, B), None);
        assert_eq!(m.transitions(), 1);
        // Three in a row: straight to high. Mixed ones rise to the least of them.
        assert_eq!(m.observe(10_000, B).map(|t| t.to), Some(High));
        let mut m = machine_in(Low);
        for free in [10_000, 600, 10_000] {
            m.observe(free, B);
        }
        assert_eq!(m.state(), Soft);
        // Falling is at once, and clears what the earlier observations allowed.
        assert_eq!(m.observe(150, B).map(|t| t.to), Some(Hard));
        assert_eq!(m.observe(10_000, B), None);
        assert_eq!(m.observe(10_000, B), None);
        assert_eq!(m.observe(10_000, B).map(|t| t.to), Some(High));
    }

    #[test]
    fn an_empty_budget_is_low_and_exact_in_huge_budgets() {
        let mut m = StateMachine::new();
        assert_eq!(m.observe(0, 0).map(|t| t.to), Some(Low));
        assert_eq!(m.observe(5, 0), None);
        // u64::MAX pages: 3% + 1 page leaves low, 3% exactly does not (no overflow, no rounding).
        let b = u64::MAX - u64::MAX % 100;
        let three = b / 100 * 3;
        assert_eq!(observe_long(&mut m, three, b), None);
        assert_eq!(observe_long(&mut m, three + 1, b).map(|t| t.to), Some(Hard));
    }

    #[test]
    fn the_schedulable_part_leaves_the_host_in_high() {
        assert_eq!(schedulable_pages(B), B - 701);
        assert_eq!(schedulable_pages(0), 0);
        assert_eq!(schedulable_pages(50), 46);
        for budget in [1, 99, 100, 101, B, 1 << 40, u64::MAX] {
            for from in [Soft, Hard, Low] {
                let mut m = machine_in(from);
                observe_long(&mut m, budget - schedulable_pages(budget), budget);
                assert_eq!(m.state(), High, "{budget} from {from:?}");
            }
        }
    }

    #[test]
    fn falls_from_high_lengthen_the_way_back() {
        let mut m = StateMachine::new();
        for (fall, dwell) in [(1, 3), (2, 6), (3, 12), (4, 24)] {
            assert_eq!(m.observe(50, B).map(|t| (t.from, t.to)), Some((High, Low)));
            assert_eq!(m.high_dwell(), dwell, "fall {fall}");
            // Rising through the reclaiming states keeps their own dwell of UP_PERIODS.
            for _ in 1..UP_PERIODS {
                assert_eq!(m.observe(10_000, B), None);
            }
            let t = m.observe(10_000, B).expect("a rise");
            assert_eq!(t.to, if dwell == UP_PERIODS { High } else { Soft });
            for _ in UP_PERIODS..dwell - 1 {
                assert_eq!(m.observe(10_000, B), None, "fall {fall}: the dwell");
            }
            if dwell > UP_PERIODS {
                assert_eq!(m.observe(10_000, B).map(|t| t.to), Some(High));
            }
        }
        // A fifth: the dwell stays at its longest.
        m.observe(50, B);
        assert_eq!(m.high_dwell(), MAX_HIGH_DWELL);
        // EPISODE_WINDOW periods after the last fall, one fall counts as the first again.
        let mut m = StateMachine::new();
        for _ in 0..3 {
            m.observe(50, B);
            observe_long(&mut m, 10_000, B);
            while m.state() != High {
                m.observe(10_000, B);
            }
        }
        assert_eq!(m.high_dwell(), 12);
        for _ in 0..EPISODE_WINDOW {
            m.observe(10_000, B);
        }
        m.observe(50, B);
        assert_eq!(m.high_dwell(), UP_PERIODS);
        // A fall from `high` is a new episode; a fall from a reclaiming state is not.
        m.observe(10_000, B);
        m.observe(10_000, B);
        m.observe(10_000, B);
        assert_eq!(m.state(), High);
        m.observe(300, B);
        assert_eq!(m.state(), Soft);
        m.observe(50, B);
        assert_eq!(m.high_dwell(), 6);
    }

    #[test]
    fn names() {
        assert_eq!(
            [High, Soft, Hard, Low].map(MemState::as_str),
            ["high", "soft", "hard", "low"]
        );
        assert_eq!(serde_json::to_string(&Hard).unwrap(), "\"hard\"");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn any_state() -> impl Strategy<Value = MemState> {
            prop_oneof![Just(High), Just(Soft), Just(Hard), Just(Low)]
        }

        proptest! {
            /// Inside any band two points of the budget wide, the state moves one way only: it
            /// never goes down and then up (or up and then down).
            #[test]
            fn never_flaps_inside_a_two_point_band(
                start in any_state(),
                base in 0u64..=1100,
                walk in prop::collection::vec(0u64..=200, 1..200),
            ) {
                let mut m = machine_in(start);
                let mut direction = 0i8;
                for x in walk {
                    if let Some(t) = m.observe(base + x, B) {
                        let d = if t.to > t.from { -1 } else { 1 };
                        prop_assert!(direction == 0 || direction == d, "{:?}", t);
                        direction = d;
                    }
                }
            }

            /// The state is always consistent with the thresholds: never `high` below 4%, never
            /// above `soft` below 2%, never above `hard` below 1%; and once UP_PERIODS
            /// observations in a row were above 3%, 5% or 7%, never `low`, below `soft` or below
            /// `high`.
            #[test]
            fn state_respects_the_thresholds(walk in prop::collection::vec(0u64..=1200, 1..100)) {
                let mut m = StateMachine::new();
                let mut count = 0;
                for (i, &free) in walk.iter().enumerate() {
                    let before = m.state();
                    match m.observe(free, B) {
                        Some(t) => {
                            count += 1;
                            prop_assert_eq!((t.from, t.to), (before, m.state()));
                        }
                        None => prop_assert_eq!(m.state(), before),
                    }
                    let s = m.state();
                    if free < 400 { prop_assert!(s >= Soft); }
                    if free < 200 { prop_assert!(s >= Hard); }
                    if free < 100 { prop_assert_eq!(s, Low); }
                    // The least free of the last UP_PERIODS observations (all of them, early on:
                    // the machine starts in high).
                    let recent = walk[i.saturating_sub(UP_PERIODS - 1)..=i].iter().min().unwrap();
                    let full = i + 1 >= UP_PERIODS;
                    if *recent > 300 && full { prop_assert!(s <= Hard); }
                    if *recent > 500 && full { prop_assert!(s <= Soft); }
                    // `high` after its own dwell, which falls from it lengthen.
                    let dwell = m.high_dwell();
                    let recent_high = walk[(i + 1).saturating_sub(dwell)..=i].iter().min().unwrap();
                    if *recent_high > 700 && i + 1 >= dwell { prop_assert_eq!(s, High); }
                    if *recent > 700 && full { prop_assert!(s <= Soft); }
                }
                prop_assert_eq!(m.transitions(), count);
            }
        }
    }
}
