//! Statistics for the active-memory estimate: the Wilson score interval around a sampled fraction,
//! and ESX-style exponentially weighted moving averages that rise quickly and fall slowly.

use serde::Serialize;
use thiserror::Error;

/// z for a two-sided 95% confidence interval.
pub const Z_95: f64 = 1.959964;

/// Default weight of a new sample in the fast average (see [`Smoother`]).
pub const DEFAULT_FAST_ALPHA: f64 = 0.5;
/// Default weight of a new sample in the slow average (see [`Smoother`]).
pub const DEFAULT_SLOW_ALPHA: f64 = 0.125;

/// Bad statistics parameters.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StatsError {
    #[error(
        "the {which} smoothing factor must be greater than 0 and at most 1 (the weight of each new sample), got {value}"
    )]
    BadAlpha { which: &'static str, value: f64 },
}

/// Wilson score interval `(low, high)` for `t` successes in `n` trials, as fractions in `[0, 1]`.
///
/// Unlike the normal approximation it stays inside `[0, 1]` and is meaningful at `t = 0` and
/// `t = n`, where the low (respectively high) end is exactly 0 (respectively 1). With `n = 0` there
/// is no information and the interval is `(0, 1)`. `t > n` is treated as `t = n`; a negative or
/// non-finite `z` is treated as its absolute value, or as 0 when it is not a number.
pub fn wilson(t: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let t = t.min(n);
    let z = if z.is_nan() { 0.0 } else { z.abs() };
    if z.is_infinite() {
        return (0.0, 1.0);
    }
    let nf = n as f64;
    let p = t as f64 / nf;
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let center = (p + z2 / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    let low = if t == 0 {
        0.0
    } else {
        (center - half).clamp(0.0, p)
    };
    let high = if t == n {
        1.0
    } else {
        (center + half).clamp(p, 1.0)
    };
    (low, high)
}

/// A sampled fraction with its 95% Wilson interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// Samples taken.
    pub n: u64,
    /// Samples that were hit (touched).
    pub t: u64,
    /// `t / n` (0 when `n` is 0).
    pub fraction: f64,
    /// Low end of the 95% interval.
    pub low: f64,
    /// High end of the 95% interval.
    pub high: f64,
}

impl Estimate {
    /// The estimate for `t` hits in `n` samples (`t` is capped at `n`).
    pub fn from_counts(t: u64, n: u64) -> Self {
        let t = t.min(n);
        let (low, high) = wilson(t, n, Z_95);
        let fraction = if n == 0 { 0.0 } else { t as f64 / n as f64 };
        Estimate {
            n,
            t,
            fraction,
            low,
            high,
        }
    }
}

/// The smoothed values after an update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Smoothed {
    /// Fast moving average.
    pub fast: f64,
    /// Slow moving average.
    pub slow: f64,
    /// `max(fast, slow)`: follows a rise within an interval or two, and a fall only as fast as the
    /// slow average lets go. This is the number to size memory by.
    pub max: f64,
}

/// Two exponentially weighted moving averages of a per-interval sample, and their maximum, the way
/// ESX smooths its active-memory estimate: the result rises quickly and falls slowly, so a guest is
/// not starved right after a short lull.
///
/// Each update is `avg += alpha * (sample - avg)`. With one sample per interval, an average with
/// weight `alpha` forgets a past sample by a factor `1 - alpha` per interval: its half-life is
/// `ln 0.5 / ln(1 - alpha)` intervals and its time constant (1/e) `-1 / ln(1 - alpha)` intervals.
/// The defaults are
///
/// * fast, `alpha = 0.5`: half-life 1 interval, time constant about 1.4 intervals (a step is 94%
///   followed after 4 intervals);
/// * slow, `alpha = 0.125`: half-life about 5.2 intervals, time constant about 7.5 intervals (a step
///   is 94% followed after about 21 intervals).
///
/// With a 1-second interval that is about 1.4 s and 7.5 s.
#[derive(Clone, Debug, PartialEq)]
pub struct Smoother {
    fast_alpha: f64,
    slow_alpha: f64,
    state: Option<(f64, f64)>,
}

impl Default for Smoother {
    fn default() -> Self {
        Smoother {
            fast_alpha: DEFAULT_FAST_ALPHA,
            slow_alpha: DEFAULT_SLOW_ALPHA,
            state: None,
        }
    }
}

impl Smoother {
    /// A smoother with the given per-interval weights, each in `(0, 1]`.
    pub fn new(fast_alpha: f64, slow_alpha: f64) -> Result<Self, StatsError> {
        for (which, value) in [("fast", fast_alpha), ("slow", slow_alpha)] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(StatsError::BadAlpha { which, value });
            }
        }
        Ok(Smoother {
            fast_alpha,
            slow_alpha,
            state: None,
        })
    }

    /// Folds in one sample. The first sample sets both averages. A sample that is not a finite
    /// number is ignored (and logged), returning the current state (0 if there is none).
    pub fn update(&mut self, sample: f64) -> Smoothed {
        if !sample.is_finite() {
            log::warn!("smoother: ignoring non-finite sample {sample}");
            return self.current().unwrap_or(Smoothed {
                fast: 0.0,
                slow: 0.0,
                max: 0.0,
            });
        }
        let (fast, slow) = match self.state {
            None => (sample, sample),
            Some((fast, slow)) => (
                fast + self.fast_alpha * (sample - fast),
                slow + self.slow_alpha * (sample - slow),
            ),
        };
        self.state = Some((fast, slow));
        Smoothed {
            fast,
            slow,
            max: fast.max(slow),
        }
    }

    /// The state after the last update, if any.
    fn current(&self) -> Option<Smoothed> {
        self.state.map(|(fast, slow)| Smoothed {
            fast,
            slow,
            max: fast.max(slow),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_known_values() {
        let (lo, hi) = wilson(0, 1000, Z_95);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 0.003827, 1e-5), "{hi}");

        let (lo, hi) = wilson(1000, 1000, Z_95);
        assert_eq!(hi, 1.0);
        assert!(close(lo, 1.0 - 0.003827, 1e-5), "{lo}");

        let (lo, hi) = wilson(500, 1000, Z_95);
        assert!(close(lo, 0.4691, 1e-4), "{lo}");
        assert!(close(hi, 0.5309, 1e-4), "{hi}");

        // 10 of 100: the textbook interval is (0.0552, 0.1744).
        let (lo, hi) = wilson(10, 100, Z_95);
        assert!(close(lo, 0.0552, 1e-4), "{lo}");
        assert!(close(hi, 0.1744, 1e-4), "{hi}");

        // 1 of 1: (0.2065, 1).
        let (lo, hi) = wilson(1, 1, Z_95);
        assert!(close(lo, 0.2065, 1e-4), "{lo}");
        assert_eq!(hi, 1.0);
    }

    #[test]
    fn wilson_edge_inputs() {
        assert_eq!(wilson(0, 0, Z_95), (0.0, 1.0));
        assert_eq!(wilson(5, 3, Z_95), wilson(3, 3, Z_95));
        assert_eq!(wilson(3, 10, -Z_95), wilson(3, 10, Z_95));
        assert_eq!(wilson(3, 10, f64::INFINITY), (0.0, 1.0));
        assert_eq!(wilson(3, 10, f64::NAN), (0.3, 0.3));
        assert_eq!(wilson(3, 10, 0.0), (0.3, 0.3));
        let (lo, hi) = wilson(u64::MAX / 2, u64::MAX, Z_95);
        assert!(lo <= 0.5 && hi >= 0.5 && hi - lo < 1e-6);
        for n in [1u64, 2, 7, 100, 1000] {
            for t in 0..=n.min(50) {
                let (lo, hi) = wilson(t, n, Z_95);
                let p = t as f64 / n as f64;
                assert!(
                    (0.0..=p).contains(&lo) && (p..=1.0).contains(&hi),
                    "{t}/{n}"
                );
            }
        }
    }

    #[test]
    fn estimate_from_counts() {
        let e = Estimate::from_counts(250, 1000);
        assert_eq!(e.fraction, 0.25);
        assert!(e.low < 0.25 && e.high > 0.25);

        let empty = Estimate::from_counts(0, 0);
        assert_eq!((empty.fraction, empty.low, empty.high), (0.0, 0.0, 1.0));
        assert_eq!(Estimate::from_counts(9, 4).t, 4);
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(json["n"], 1000);
        assert_eq!(json["t"], 250);
    }

    #[test]
    fn smoother_validates() {
        assert!(Smoother::new(0.5, 0.125).is_ok());
        assert!(Smoother::new(1.0, 1.0).is_ok());
        assert_eq!(
            Smoother::new(0.0, 0.1),
            Err(StatsError::BadAlpha {
                which: "fast",
                value: 0.0
            })
        );
        assert!(Smoother::new(0.5, 1.5).is_err());
        assert!(Smoother::new(f64::NAN, 0.5).is_err());
        assert!(Smoother::new(0.5, -0.1).is_err());
        let msg = Smoother::new(0.5, 2.0).unwrap_err().to_string();
        assert!(msg.contains("slow") && msg.contains('2'), "{msg}");
    }

    #[test]
    fn smoother_rises_fast_falls_slow() {
        let mut s = Smoother::default();
        assert_eq!(s.current(), None);
        let first = s.update(0.2);
        assert_eq!((first.fast, first.slow, first.max), (0.2, 0.2, 0.2));

        let up = s.update(1.0);
        assert!(close(up.fast, 0.6, 1e-12));
        assert!(close(up.slow, 0.3, 1e-12));
        assert_eq!(up.max, up.fast);

        for _ in 0..10 {
            s.update(1.0);
        }
        let high = s.current().unwrap();
        assert!(high.fast > 0.999);

        let down = s.update(0.0);
        assert!(close(down.fast, high.fast * 0.5, 1e-12));
        assert!(close(down.slow, high.slow * 0.875, 1e-12));
        assert_eq!(down.max, down.slow);

        // Non-finite samples leave the state alone.
        assert_eq!(s.update(f64::NAN), down);
        let mut fresh = Smoother::default();
        assert_eq!(fresh.update(f64::INFINITY).max, 0.0);
        assert_eq!(fresh.current(), None);
        assert_eq!(fresh.update(0.7).slow, 0.7);
    }

    #[test]
    fn default_time_constants() {
        // Half-lives documented on Smoother: 1 interval (fast) and about 5.2 (slow).
        let half = |a: f64| 0.5f64.ln() / (1.0 - a).ln();
        assert!(close(half(DEFAULT_FAST_ALPHA), 1.0, 1e-12));
        assert!(close(half(DEFAULT_SLOW_ALPHA), 5.19, 0.01));
        let tau = |a: f64| -1.0 / (1.0 - a).ln();
        assert!(close(tau(DEFAULT_FAST_ALPHA), 1.44, 0.01));
        assert!(close(tau(DEFAULT_SLOW_ALPHA), 7.49, 0.01));
    }
}
