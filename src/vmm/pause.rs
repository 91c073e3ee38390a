//! Whether a controller holds the vCPU out of the guest (`pause`, `resume`), and for how long in
//! each interval: a plain state machine the run loop asks before each entry into the guest.

use std::time::{Duration, Instant};

/// Running, or paused since an instant; with the paused time of the interval so far.
#[derive(Debug, Default)]
pub struct Pause {
    since: Option<Instant>,
    /// Paused time of the running interval before `since`.
    banked: Duration,
}

impl Pause {
    pub fn is_paused(&self) -> bool {
        self.since.is_some()
    }

    /// Pauses at `now` (nothing if paused already).
    pub fn pause(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// Resumes at `now` (nothing if running).
    pub fn resume(&mut self, now: Instant) {
        if let Some(since) = self.since.take() {
            self.banked += now.saturating_duration_since(since);
        }
    }

    /// The paused time of the interval that ends at `now`; the next interval starts from zero
    /// (still paused if it was).
    pub fn end_interval(&mut self, now: Instant) -> Duration {
        let mut paused = std::mem::take(&mut self.banked);
        if let Some(since) = &mut self.since {
            paused += now.saturating_duration_since(*since);
            *since = now;
        }
        paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_time_is_counted_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Pause::default();
        assert!(!p.is_paused());
        assert_eq!(p.end_interval(t0 + s(1)), s(0));
        p.resume(t0 + s(1));
        assert_eq!(p.end_interval(t0 + s(2)), s(0), "resume while running");
        p.pause(t0 + s(2));
        p.pause(t0 + s(3));
        assert!(p.is_paused());
        // Paused across a boundary: each interval gets its own part.
        // The second pause changes nothing; the boundary at 4 s splits the pause.
        assert_eq!(p.end_interval(t0 + s(4)), s(2));
        p.resume(t0 + s(5));
        assert!(!p.is_paused());
        p.pause(t0 + s(6));
        p.resume(t0 + s(6) + Duration::from_millis(500));
        assert_eq!(p.end_interval(t0 + s(8)), Duration::from_millis(1500));
        assert_eq!(p.end_interval(t0 + s(9)), s(0));
    }
}
