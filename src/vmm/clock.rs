//! The run's clock: the interval grid, the `--timeout` deadline, and the kicker thread that
//! kicks the vCPU thread out of `KVM_RUN` at every tick, at the deadline and when a stop signal
//! arrives (the kick's signal handler sets `kvm_run.immediate_exit`, so no kick is lost).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kvm::vcpu;
use crate::vmm::stop;

/// Longest the VMM sleeps without looking at the clock and the stop flag.
pub const POLL: Duration = Duration::from_millis(20);

/// The interval grid and the deadline, shared with the kicker thread.
#[derive(Clone)]
pub struct Clock {
    pub start: Instant,
    pub interval: Duration,
    pub timeout: Option<Duration>,
    /// `None` also when the timeout is too far away to represent: it then never fires.
    deadline: Option<Instant>,
}

impl Clock {
    pub fn new(interval: Duration, timeout: Option<Duration>) -> Self {
        let start = Instant::now();
        Clock {
            start,
            interval,
            timeout,
            deadline: timeout.and_then(|t| start.checked_add(t)),
        }
    }

    /// The end of interval `n` (0-based).
    pub fn tick(&self, n: u64) -> Instant {
        let k = u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX);
        self.start
            .checked_add(self.interval.saturating_mul(k))
            .unwrap_or(self.start + MAX_AHEAD)
    }

    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Far enough ahead to be never for a run (about 31 years).
const MAX_AHEAD: Duration = Duration::from_secs(1 << 30);

/// A thread that kicks the vCPU thread out of `KVM_RUN` at every interval tick, at the deadline
/// and when a stop signal arrives.
pub struct Kicker {
    done: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Kicker {
    pub fn spawn(clock: Clock) -> Self {
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let done = Arc::new(AtomicBool::new(false));
        let stop_flag = done.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            let (mut deadline_kicked, mut signal_kicked) = (false, false);
            while !stop_flag.load(Ordering::Relaxed) {
                let tick = clock.tick(n);
                let now = Instant::now();
                let mut kick = false;
                if now >= tick {
                    n = n.saturating_add(1);
                    kick = true;
                }
                if !deadline_kicked && clock.past_deadline() {
                    deadline_kicked = true;
                    kick = true;
                }
                if !signal_kicked && stop::requested().is_some() {
                    signal_kicked = true;
                    kick = true;
                }
                if kick {
                    vcpu::kick(target);
                } else {
                    std::thread::sleep((tick - now).min(POLL));
                }
            }
        });
        Kicker { done, thread }
    }

    pub fn stop(self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_grid_and_a_huge_timeout_never_fires() {
        let c = Clock::new(
            Duration::from_millis(100),
            Some(Duration::from_secs(u64::MAX)),
        );
        assert_eq!(c.tick(0) - c.start, Duration::from_millis(100));
        assert_eq!(c.tick(9) - c.start, Duration::from_secs(1));
        assert!(
            c.tick(u64::MAX) > c.start,
            "saturates instead of overflowing"
        );
        assert!(c.deadline.is_none());
        assert!(!c.past_deadline());
        let c = Clock::new(Duration::from_millis(100), Some(Duration::from_nanos(1)));
        std::thread::sleep(Duration::from_millis(1));
        assert!(c.past_deadline());
    }
}
