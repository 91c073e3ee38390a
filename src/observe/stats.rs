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

/// A stratified estimate, in pages: `exact` pages counted exactly, plus `t` of `n` sampled pages
/// drawn without replacement from a stratum of `population` pages, scaled up.
///
/// The sampled part's 95% interval is Wilson's with the finite population correction (its `z`
/// shrinks by `sqrt((N - n) / (N - 1))`, so a census has no uncertainty); the exact part adds
/// none. `docs/design.md` derives it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stratified {
    pub exact: u64,
    pub n: u64,
    pub t: u64,
    pub population: u64,
    pub pages: f64,
    pub low: f64,
    pub high: f64,
}

impl Stratified {
    /// The estimate for `exact` known pages and `t` of `n` samples from `population` pages.
    pub fn new(exact: u64, t: u64, n: u64, population: u64) -> Self {
        let n = n.min(population);
        let t = t.min(n);
        let (frac, low, high) = if n == 0 {
            // Nothing to sample: the stratum is empty (or was not sampled: then it is unknown).
            if population == 0 {
                (0.0, 0.0, 0.0)
            } else {
                (0.0, 0.0, 1.0)
            }
        } else {
            let fpc = if population > 1 {
                ((population - n) as f64 / (population - 1) as f64).sqrt()
            } else {
                0.0
            };
            let (lo, hi) = wilson(t, n, Z_95 * fpc);
            (t as f64 / n as f64, lo, hi)
        };
        let pop = population as f64;
        Stratified {
            exact,
            n,
            t,
            population,
            pages: exact as f64 + frac * pop,
            low: exact as f64 + low * pop,
            high: exact as f64 + high * pop,
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

    #[test]
    fn stratified_adds_the_exact_part_and_shrinks_with_the_population() {
        let s = Stratified::new(100, 50, 100, 1000);
        assert_eq!(s.pages, 100.0 + 500.0);
        assert!(s.low < s.pages && s.pages < s.high);
        assert!(s.low >= 100.0 && s.high <= 1100.0);
        // A census: no uncertainty.
        let c = Stratified::new(7, 30, 100, 100);
        assert_eq!((c.low, c.pages, c.high), (37.0, 37.0, 37.0));
        // The finite population correction narrows the interval as n nears N.
        let wide = Stratified::new(0, 50, 100, 1_000_000);
        let narrow = Stratified::new(0, 50, 100, 200);
        let rel = |s: Stratified| (s.high - s.low) / s.population as f64;
        assert!(rel(narrow) < rel(wide) * 0.75);
        // Empty strata.
        let e = Stratified::new(12, 0, 0, 0);
        assert_eq!((e.low, e.pages, e.high), (12.0, 12.0, 12.0));
    }

    /// Simulates a guest of `pages` pages of which `touched` were touched before, `active_old` of
    /// them active now, and `fresh` pages touched for the first time; returns the RMS errors
    /// (pages) of the plain and the stratified estimates over `rounds`, n samples each.
    fn rms_plain_vs_stratified(
        pages: u64,
        touched: u64,
        active_old: u64,
        fresh: u64,
        n: u64,
        rounds: u32,
    ) -> (f64, f64) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let truth = (active_old + fresh) as f64;
        let (mut plain, mut strat) = (0.0, 0.0);
        // Page i is: active-old for i < active_old, touched-old for i < touched, fresh for
        // touched <= i < touched + fresh, else untouched.
        let pick = |rng: &mut rand::rngs::StdRng, n: u64, of: u64| -> Vec<u64> {
            let mut set = std::collections::HashSet::new();
            while (set.len() as u64) < n.min(of) {
                set.insert(rng.random_range(0..of));
            }
            set.into_iter().collect()
        };
        for _ in 0..rounds {
            let p = pick(&mut rng, n, pages);
            let t = p
                .iter()
                .filter(|&&i| i < active_old || (touched..touched + fresh).contains(&i))
                .count() as u64;
            plain += (Stratified::new(0, t, n, pages).pages - truth).powi(2);
            let q = pick(&mut rng, n, touched);
            let t = q.iter().filter(|&&i| i < active_old).count() as u64;
            strat += (Stratified::new(fresh, t, n, touched).pages - truth).powi(2);
        }
        let r = f64::from(rounds);
        ((plain / r).sqrt(), (strat / r).sqrt())
    }

    #[test]
    fn stratification_is_never_worse_on_dense_guests_and_far_better_on_sparse_ones() {
        // Dense: everything touched before; the two estimators are the same up to noise.
        let (plain, strat) = rms_plain_vs_stratified(1 << 18, 1 << 18, 1 << 16, 0, 1000, 400);
        assert!(
            strat <= plain * 1.15,
            "dense: stratified {strat:.0}, plain {plain:.0}"
        );
        // Sparse: 64 GiB of pages (P), 1 GiB touched (T), half of it active (A), 4 MiB fresh.
        // The standard deviations are sqrt(P·A(1-A/P)/n) and sqrt(T·A(1-A/T)/n): their ratio is
        // sqrt(P(1-A/P) / (T(1-A/T))) = sqrt(64 / 0.5) = 11.3 here. Ask for 8 (the estimated
        // ratio's own noise over 400 rounds is a few percent).
        let (plain, strat) = rms_plain_vs_stratified(16 << 20, 1 << 18, 1 << 17, 1024, 1000, 400);
        assert!(
            strat * 8.0 < plain,
            "sparse: stratified {strat:.0}, plain {plain:.0}"
        );
    }

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
