//! The run's clock: the interval grid, the interval now running (the clock is the one owner of
//! its number), the `--timeout` deadline, and the kicker thread that kicks the vCPU thread out of
//! `KVM_RUN` at every boundary, at an alarm the run loop sets (a row's grace running out), at the
//! deadline and when a stop signal arrives (the kick's signal handler sets
//! `kvm_run.immediate_exit`, so no kick is lost).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kvm::vcpu;
use crate::vmm::command::PendingFlag;
use crate::vmm::stop;

/// Longest the VMM sleeps without looking at the clock and the stop flag.
pub const POLL: Duration = Duration::from_millis(20);

/// Far enough ahead to be never for a run (about 31 years).
const MAX_AHEAD: Duration = Duration::from_secs(1 << 30);

/// The interval grid and the deadline: plain values, shared with the kicker thread.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub start: Instant,
    pub interval: Duration,
    /// `None` also when the timeout is too far away to represent: it then never fires.
    deadline: Option<Instant>,
}

impl Grid {
    /// The first boundary strictly after `now`.
    pub fn boundary_after(&self, now: Instant) -> Instant {
        let since = now.saturating_duration_since(self.start).as_nanos();
        let k = since / self.interval.as_nanos().max(1) + 1;
        u64::try_from(k * self.interval.as_nanos())
            .ok()
            .and_then(|ns| self.start.checked_add(Duration::from_nanos(ns)))
            .unwrap_or(self.start + MAX_AHEAD)
    }

    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// How an interval ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntervalEnd {
    /// Its number (0-based).
    pub interval: u64,
    /// Its real length.
    pub length: Duration,
    /// It ended before its boundary (only the run's last interval can).
    pub partial: bool,
}

/// The clock of one run, owned by the vCPU thread.
#[derive(Debug)]
pub struct Clock {
    grid: Grid,
    pub timeout: Option<Duration>,
    /// The interval now running, when it began, and the boundary that ends it.
    current: u64,
    began: Instant,
    ends: Instant,
}

impl Clock {
    /// A clock whose interval 0 starts now.
    pub fn new(interval: Duration, timeout: Option<Duration>) -> Self {
        let start = Instant::now();
        let grid = Grid {
            start,
            interval,
            deadline: timeout.and_then(|t| start.checked_add(t)),
        };
        Clock {
            grid,
            timeout,
            current: 0,
            began: start,
            ends: grid.boundary_after(start),
        }
    }

    pub fn grid(&self) -> Grid {
        self.grid
    }

    /// The interval now running (0-based); the VMM publishes it in the boot info.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// The configured interval length.
    pub fn interval(&self) -> Duration {
        self.grid.interval
    }

    /// Time since the run started.
    pub fn elapsed(&self) -> Duration {
        self.grid.start.elapsed()
    }

    /// The boundary that ends the running interval.
    pub fn ends(&self) -> Instant {
        self.ends
    }

    pub fn past_deadline(&self) -> bool {
        self.grid.past_deadline()
    }

    /// Ends the running interval at `now` (`last`: the run's last). Unless last, the next one
    /// begins, ending at the first boundary after `now`: boundaries the run was too busy for are
    /// skipped (the interval is then longer), never counted as intervals.
    pub fn end_interval(&mut self, now: Instant, last: bool) -> IntervalEnd {
        let end = IntervalEnd {
            interval: self.current,
            length: now.saturating_duration_since(self.began),
            partial: last && now < self.ends,
        };
        if !last {
            self.current += 1;
            self.began = now;
            self.ends = self.grid.boundary_after(now);
        }
        end
    }
}

/// What the run loop and the kicker thread share.
struct Shared {
    done: AtomicBool,
    /// The alarm, in ns after the grid's start (`u64::MAX`: none).
    alarm_ns: AtomicU64,
}

/// A thread that kicks the vCPU thread out of `KVM_RUN` at every interval boundary, at the alarm,
/// at the deadline and when a stop signal arrives. It keeps no interval count of its own: it
/// reads the grid. Stopped (and joined) on drop, so it never kicks a thread that has gone.
pub struct Kicker {
    grid: Grid,
    /// The alarm as last set.
    alarm: Option<Instant>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    /// Starts kicking the calling thread (also soon after a controller queued a command).
    pub fn spawn(grid: Grid, commands: PendingFlag) -> Self {
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let shared = Arc::new(Shared {
            done: AtomicBool::new(false),
            alarm_ns: AtomicU64::new(u64::MAX),
        });
        let theirs = shared.clone();
        let thread = std::thread::spawn(move || kick_loop(grid, target, &theirs, &commands));
        Kicker {
            grid,
            alarm: None,
            shared,
            thread: Some(thread),
        }
    }

    /// Kicks the vCPU thread also at `at` (one alarm: a later call replaces it; `None` clears it).
    pub fn alarm(&mut self, at: Option<Instant>) {
        if at == self.alarm {
            return;
        }
        self.alarm = at;
        let ns = at.map_or(u64::MAX, |at| {
            let ns = at.saturating_duration_since(self.grid.start).as_nanos();
            u64::try_from(ns).unwrap_or(u64::MAX - 1)
        });
        self.shared.alarm_ns.store(ns, Ordering::SeqCst);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Stops and joins the thread (again: nothing).
    pub fn stop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kick_loop(grid: Grid, target: libc::pthread_t, shared: &Shared, commands: &PendingFlag) {
    let mut next = grid.boundary_after(Instant::now());
    let (mut deadline_kicked, mut signal_kicked) = (false, false);
    while !shared.done.load(Ordering::SeqCst) {
        let now = Instant::now();
        let mut kick = false;
        if now >= next {
            next = grid.boundary_after(now);
            kick = true;
        }
        let alarm = shared.alarm_ns.load(Ordering::SeqCst);
        let alarm_at = (alarm != u64::MAX)
            .then(|| grid.start.checked_add(Duration::from_nanos(alarm)))
            .flatten();
        if alarm_at.is_some_and(|a| now >= a) {
            // Only the alarm we saw is spent: a newer one set meanwhile stays.
            let _ = shared.alarm_ns.compare_exchange(
                alarm,
                u64::MAX,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            kick = true;
        }
        if !deadline_kicked && grid.past_deadline() {
            deadline_kicked = true;
            kick = true;
        }
        if !signal_kicked && stop::requested().is_some() {
            signal_kicked = true;
            kick = true;
        }
        if commands.take() {
            kick = true;
        }
        if kick {
            vcpu::kick(target);
        } else {
            let wake = alarm_at.filter(|&a| a < next).unwrap_or(next);
            std::thread::park_timeout(wake.saturating_duration_since(now).min(POLL));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn boundaries_follow_the_grid_and_a_huge_timeout_never_fires() {
        let c = Clock::new(100 * MS, Some(Duration::from_secs(u64::MAX)));
        let g = c.grid();
        assert_eq!(g.boundary_after(g.start) - g.start, 100 * MS);
        assert_eq!(g.boundary_after(g.start + 99 * MS) - g.start, 100 * MS);
        assert_eq!(g.boundary_after(g.start + 100 * MS) - g.start, 200 * MS);
        assert_eq!(g.boundary_after(g.start + 950 * MS) - g.start, 1000 * MS);
        assert!(
            g.boundary_after(g.start + Duration::from_secs(u64::MAX / 4)) > g.start,
            "saturates instead of overflowing"
        );
        assert!(g.deadline.is_none());
        assert!(!c.past_deadline());
        let c = Clock::new(100 * MS, Some(Duration::from_nanos(1)));
        std::thread::sleep(MS);
        assert!(c.past_deadline());
    }

    #[test]
    fn the_clock_numbers_intervals_and_skips_boundaries_it_was_too_busy_for() {
        let mut c = Clock::new(100 * MS, None);
        let s = c.grid().start;
        assert_eq!((c.current(), c.ends() - s), (0, 100 * MS));
        let e = c.end_interval(s + 100 * MS, false);
        assert_eq!(
            e,
            IntervalEnd {
                interval: 0,
                length: 100 * MS,
                partial: false
            }
        );
        // Interval 1 ends late, past two boundaries: it is longer; the next is number 2.
        let e = c.end_interval(s + 320 * MS, false);
        assert_eq!((e.interval, e.length, e.partial), (1, 220 * MS, false));
        assert_eq!((c.current(), c.ends() - s), (2, 400 * MS));
        // The run ends before the boundary: the last interval is partial and counts on.
        let e = c.end_interval(s + 330 * MS, true);
        assert_eq!((e.interval, e.length, e.partial), (2, 10 * MS, true));
        assert_eq!(c.current(), 2, "the last interval starts none");
    }

    #[test]
    fn a_last_interval_that_reached_its_boundary_is_not_partial() {
        let mut c = Clock::new(100 * MS, None);
        let s = c.grid().start;
        let e = c.end_interval(s + 105 * MS, true);
        assert_eq!((e.interval, e.partial), (0, false));
    }
}
