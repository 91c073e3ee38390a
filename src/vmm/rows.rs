//! The row joiner: pairs the row the VMM measured at the end of an interval with the guest's
//! exact truth for the same interval, and lets each row go as soon as it is complete.
//!
//! A plain state machine (rows, truths and clock readings in; rows out, in interval order), so
//! every transition is unit-tested without KVM. It holds at most one row (the interval that just
//! ended, waiting for its truth) and one truth (one that came before its row: the guest's last
//! report, sent before it halts). Whatever the guest sends, nothing else is kept.
//!
//! The guest reports the truth of interval k when it sees the interval number change, normally
//! within microseconds of the tick that ended k. A row whose truth has not come after
//! [`grace`] leaves without it (`truth` is null) and is never held back further; a truth that
//! comes after its row left is dropped.

use std::time::{Duration, Instant};

use crate::row::{Row, Truth};

/// The longest a row waits for its truth.
pub const GRACE_CAP: Duration = Duration::from_millis(250);

/// How long a row of an `interval`-long interval waits for the guest's truth: half the interval,
/// at most [`GRACE_CAP`]. The truth normally comes within microseconds of the tick, so the grace
/// costs nothing then; it is generous because a loaded host may not run the vCPU thread for a
/// few milliseconds, and a row that misses its truth loses its error column.
pub fn grace(interval: Duration) -> Duration {
    (interval / 2).min(GRACE_CAP)
}

/// A row waiting for its truth, and until when.
#[derive(Debug)]
struct Waiting {
    row: Row,
    until: Instant,
}

/// The joiner's state.
#[derive(Debug)]
pub struct Joiner {
    grace: Duration,
    waiting: Option<Waiting>,
    /// A truth that came before its row.
    early: Option<(u64, Truth)>,
    /// The interval of the last row that left: truths up to it are late.
    last_out: Option<u64>,
}

/// The rows that leave at once, in order (at most two: one given up on, and one complete).
pub type Leaving = std::iter::Flatten<std::array::IntoIter<Option<Row>, 2>>;

impl Joiner {
    /// A joiner whose rows wait at most `grace` for their truth.
    pub fn new(grace: Duration) -> Self {
        Joiner {
            grace,
            waiting: None,
            early: None,
            last_out: None,
        }
    }

    /// The row of the interval that just ended, measured at `now`; `last`: the run's last row,
    /// which never waits. A row still waiting from an interval before leaves first, without its
    /// truth; the new row leaves at once if its truth is already here (or it is the last).
    pub fn measured(&mut self, mut row: Row, last: bool, now: Instant) -> Leaving {
        let stale = self.waiting.take().map(|w| w.row);
        match self.early.take() {
            Some((i, truth)) if i == row.interval => row.attach_truth(truth),
            Some(early) if early.0 > row.interval => self.early = Some(early),
            _ => {}
        }
        let done = if row.truth.is_some() || last {
            Some(row)
        } else {
            let until = now.checked_add(self.grace).unwrap_or(now);
            self.waiting = Some(Waiting { row, until });
            None
        };
        self.out([stale, done])
    }

    /// The guest's truth for `interval`: the waiting row it completes, if that row is still
    /// here. A truth for an interval not measured yet is kept for its row (replacing any other
    /// such truth); one whose row already left is dropped.
    pub fn truth(&mut self, interval: u64, truth: Truth) -> Option<Row> {
        match self.waiting.take() {
            Some(mut w) if w.row.interval == interval => {
                let waited =
                    (self.grace).saturating_sub(w.until.saturating_duration_since(Instant::now()));
                log::debug!("interval {interval}: its truth came {waited:?} after its row");
                w.row.attach_truth(truth);
                return self.out([Some(w.row), None]).next();
            }
            waiting => self.waiting = waiting,
        }
        let newer_than_waiting = self
            .waiting
            .as_ref()
            .is_none_or(|w| interval > w.row.interval);
        if newer_than_waiting && self.last_out.is_none_or(|l| interval > l) {
            self.early = Some((interval, truth));
        }
        None
    }

    /// The waiting row, if its grace ran out by `now`: it leaves without its truth.
    pub fn expired(&mut self, now: Instant) -> Option<Row> {
        let w = self.waiting.take_if(|w| now >= w.until)?;
        self.out([Some(w.row), None]).next()
    }

    /// When the waiting row's grace runs out, if a row is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting.as_ref().map(|w| w.until)
    }

    /// Notes the rows leaving, in order.
    fn out(&mut self, rows: [Option<Row>; 2]) -> Leaving {
        for r in rows.iter().flatten() {
            self.last_out = Some(r.interval);
        }
        rows.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(50);

    fn row(interval: u64) -> Row {
        Row {
            interval,
            ..Row::default()
        }
    }

    fn truth(written: u64) -> Truth {
        Truth {
            written_pages: written,
            ..Truth::default()
        }
    }

    fn intervals(rows: impl Iterator<Item = Row>) -> Vec<(u64, Option<u64>)> {
        rows.map(|r| (r.interval, r.truth.map(|t| t.written_pages)))
            .collect()
    }

    #[test]
    fn the_grace_is_half_the_interval_with_a_cap() {
        assert_eq!(grace(Duration::from_millis(10)), Duration::from_millis(5));
        assert_eq!(
            grace(Duration::from_millis(200)),
            Duration::from_millis(100)
        );
        assert_eq!(grace(Duration::from_secs(2)), GRACE_CAP);
    }

    #[test]
    fn a_row_waits_for_its_truth_then_leaves_with_it_at_once() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        assert!(intervals(j.measured(row(0), false, t0)).is_empty());
        assert_eq!(j.deadline(), Some(t0 + GRACE));
        assert!(j.expired(t0 + GRACE / 2).is_none(), "still in its grace");
        let r = j.truth(0, truth(128)).expect("the truth completes the row");
        assert_eq!((r.interval, r.truth.unwrap().written_pages), (0, 128));
        assert_eq!(j.deadline(), None, "nothing waits");
    }

    #[test]
    fn a_row_whose_truth_does_not_come_leaves_after_its_grace_without_it() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        assert!(intervals(j.measured(row(0), false, t0)).is_empty());
        let r = j.expired(t0 + GRACE).expect("grace ran out");
        assert_eq!(r.interval, 0);
        assert!(r.truth.is_none());
        assert!(j.expired(t0 + GRACE * 10).is_none(), "it left once");
        // Its truth, coming late, is dropped: it does not land on the next row.
        assert!(j.truth(0, truth(1)).is_none());
        assert!(intervals(j.measured(row(1), false, t0)).is_empty());
        assert!(j.expired(t0 + GRACE).unwrap().truth.is_none());
    }

    #[test]
    fn a_row_still_waiting_at_the_next_tick_leaves_first() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        assert!(intervals(j.measured(row(0), false, t0)).is_empty());
        // The loop was too busy to see the grace run out: the next row pushes it out, in order.
        assert_eq!(intervals(j.measured(row(1), false, t0)), vec![(0, None)]);
        assert_eq!(j.deadline(), Some(t0 + GRACE));
        let mut j = Joiner::new(GRACE);
        let _ = j.measured(row(0), false, t0);
        j.truth(1, truth(5)); // row 1's truth before row 1 (a hostile or hurried guest)
        assert_eq!(
            intervals(j.measured(row(1), false, t0)),
            vec![(0, None), (1, Some(5))]
        );
    }

    #[test]
    fn a_truth_that_comes_first_waits_for_its_row() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        assert!(j.truth(0, truth(10)).is_none());
        assert_eq!(
            intervals(j.measured(row(0), false, t0)),
            vec![(0, Some(10))]
        );
        // A truth for a later interval waits past rows it does not belong to.
        assert!(j.truth(3, truth(30)).is_none());
        assert!(intervals(j.measured(row(1), false, t0)).is_empty());
        assert_eq!(j.expired(t0 + GRACE).map(|r| r.truth), Some(None));
        assert!(intervals(j.measured(row(2), false, t0)).is_empty());
        assert!(j.expired(t0 + GRACE).is_some());
        assert_eq!(intervals(j.measured(row(3), true, t0)), vec![(3, Some(30))]);
    }

    #[test]
    fn the_last_row_never_waits() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        let _ = j.measured(row(0), false, t0);
        // The run ends: the waiting row leaves without truth, then the last row.
        assert_eq!(
            intervals(j.measured(row(1), true, t0)),
            vec![(0, None), (1, None)]
        );
        assert_eq!(j.deadline(), None);
        // The guest's last report came before the end: the last row carries it.
        let mut j = Joiner::new(GRACE);
        let _ = j.truth(0, truth(7));
        assert_eq!(intervals(j.measured(row(0), true, t0)), vec![(0, Some(7))]);
    }

    #[test]
    fn stale_and_repeated_truths_are_dropped_and_nothing_accumulates() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        let _ = j.measured(row(0), false, t0);
        assert!(j.truth(0, truth(1)).is_some());
        // The same interval again, and an older one: their row left already.
        assert!(j.truth(0, truth(2)).is_none());
        assert!(j.early.is_none());
        let _ = j.measured(row(1), false, t0);
        assert!(j.truth(0, truth(3)).is_none(), "not row 1's");
        assert!(j.early.is_none());
        // Many truths from a guest ahead of the clock keep one slot, the latest.
        for i in 2..1000 {
            j.truth(i, truth(i));
        }
        assert_eq!(j.early.as_ref().map(|e| e.0), Some(999));
        assert_eq!(j.truth(1, truth(11)).unwrap().interval, 1);
    }

    #[test]
    fn a_row_measured_with_its_truth_missing_ignores_truths_of_older_rows() {
        let t0 = Instant::now();
        let mut j = Joiner::new(GRACE);
        j.truth(5, truth(5));
        // Row 6 comes (interval 5 was never measured: the early truth is of no use).
        assert!(intervals(j.measured(row(6), false, t0)).is_empty());
        assert!(j.early.is_none());
    }
}
