//! The pure part of active-memory sampling: each interval, pick `samples` distinct guest pages
//! uniformly at random, from all of guest RAM (`--plain-sampling`) or from a stratum (the pages
//! touched, or written, before: the stratified estimate counts first touches exactly and samples
//! only the rest). The write side write-protects the pages it drew (the KVM side, elsewhere, uses
//! [`Sampler::mask_into`] to build the mask) and at the end of the interval counts how many were
//! written ([`Sampler::count_touched`]); the access side moves its pages out with userfaultfd. Each
//! sampler draws from its own random stream of the run's seed.
//!
//! Page selection is Floyd's algorithm: O(samples) time and memory whatever the guest's size, and
//! every subset of `samples` pages is equally likely.

use std::collections::HashSet;

use rand::rngs::{StdRng, SysRng};
use rand::{RngExt, SeedableRng};
use thiserror::Error;

use crate::memory::bitmap::{Bitmap, Ranks};
use crate::units::PAGE_SIZE;
use crate::units::fmt_bytes;

/// Why a sampler could not be set up.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SamplerError {
    #[error("the sample count must be at least 1")]
    NoSamples,
    #[error(
        "cannot sample {samples} pages: the guest has only {guest_pages} pages ({}); use at most {guest_pages} samples",
        fmt_bytes(guest_pages.saturating_mul(PAGE_SIZE))
    )]
    TooManySamples { samples: u64, guest_pages: u64 },
    #[error("cannot seed the page sampler from the operating system's entropy source: {0}")]
    Entropy(String),
}

/// The random streams of one run: each sampler draws from its own, derived from the run's seed,
/// so that no two samplers pick correlated pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The write sampler at position `i` of the sample-size cycle.
    Write(u64),
    /// The access sampler.
    Access,
    /// Hypervisor swap's page choice.
    Swap,
}

/// SplitMix64's finaliser: a bijection of u64 that spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of `stream` for a run seeded with `seed`: the same run seed always gives the same
/// stream seed, and different streams (or run seeds) give unrelated ones.
pub fn stream_seed(seed: u64, stream: Stream) -> u64 {
    let tag = match stream {
        Stream::Access => 1,
        Stream::Swap => 3,
        Stream::Write(i) => i.wrapping_mul(2).wrapping_add(2),
    };
    mix(seed ^ mix(tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Picks random guest pages to watch, one set per interval.
#[derive(Debug)]
pub struct Sampler {
    samples: u64,
    guest_pages: u64,
    rng: StdRng,
    armed: Vec<u64>,
    /// Scratch set for Floyd's algorithm, kept to avoid reallocating every interval.
    picked: HashSet<u64>,
}

impl Sampler {
    /// A sampler of `samples` pages out of `guest_pages`. With a seed the sequence of armed sets is
    /// reproducible; without one the generator is seeded from the OS.
    pub fn new(samples: u64, guest_pages: u64, seed: Option<u64>) -> Result<Self, SamplerError> {
        if samples == 0 {
            return Err(SamplerError::NoSamples);
        }
        if samples > guest_pages {
            return Err(SamplerError::TooManySamples {
                samples,
                guest_pages,
            });
        }
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::try_from_rng(&mut SysRng)
                .map_err(|e| SamplerError::Entropy(e.to_string()))?,
        };
        let cap = usize::try_from(samples).unwrap_or(usize::MAX);
        Ok(Sampler {
            samples,
            guest_pages,
            rng,
            armed: Vec::new(),
            picked: HashSet::with_capacity(cap),
        })
    }

    /// Words (`u64`) in a bitmap with one bit per guest page.
    fn bitmap_words(&self) -> usize {
        usize::try_from(self.guest_pages.div_ceil(64)).unwrap_or(usize::MAX)
    }

    /// Picks a new set of `samples` distinct page indices, uniformly at random, and returns it
    /// sorted ascending. The set stays armed until the next call.
    pub fn arm(&mut self) -> &[u64] {
        let mut taken = std::mem::take(&mut self.picked);
        taken.clear();
        self.armed = self.draw_ranks(self.samples, self.guest_pages, &mut taken);
        self.picked = taken;
        self.armed.sort_unstable();
        &self.armed
    }

    /// Picks up to `samples` distinct pages uniformly from `population` (one bit per guest page)
    /// minus `exclude` (likewise), sorted ascending: all of them when there are no more than
    /// that. Returns the pages and the number of candidates they were drawn from. The cost is one
    /// count over the bitmaps, then the cheaper of rejection sampling (draws ~ samples x guest
    /// pages / candidates) and one pass.
    pub fn arm_from(&mut self, population: &Bitmap, exclude: Option<&Bitmap>) -> (&[u64], u64) {
        let is_candidate = |p: u64| population.get(p) && !exclude.is_some_and(|e| e.get(p));
        let candidates = match exclude {
            None => population.count_ones(),
            Some(e) => population.count_and_not(e),
        };
        let k = self.samples.min(candidates);
        self.picked.clear();
        self.armed.clear();
        let n = population.len();
        let rejection_draws = k.saturating_mul(n).checked_div(candidates).unwrap_or(0);
        if rejection_draws < n.div_ceil(64) + candidates {
            while (self.picked.len() as u64) < k {
                let p = self.rng.random_range(0..n);
                if is_candidate(p) {
                    self.picked.insert(p);
                }
            }
            self.armed.extend(self.picked.iter().copied());
        } else {
            let mut all: Vec<u64> = population
                .iter_ones()
                .filter(|&p| is_candidate(p))
                .collect();
            // A partial Fisher-Yates shuffle: the first k are a uniform k-subset.
            for i in 0..k as usize {
                let j = self.rng.random_range(i..all.len());
                all.swap(i, j);
            }
            all.truncate(k as usize);
            self.armed = all;
        }
        self.armed.sort_unstable();
        (&self.armed, candidates)
    }

    /// [`Sampler::arm_from`] through `ranks`, the rank index of `population`: ranks are drawn
    /// uniformly and selected, and a page in `exclude` is drawn again, so the cost is
    /// O(samples × (log(pages / 4096) + 64)) whatever the guest's size, where `arm_from` counts
    /// and may walk all of the bitmaps. `excluded` lists the pages set in `exclude` (distinct), to
    /// count the candidates by.
    pub fn arm_ranked(
        &mut self,
        population: &Bitmap,
        ranks: &Ranks,
        exclude: &Bitmap,
        excluded: &[u64],
    ) -> (&[u64], u64) {
        let total = ranks.total();
        let out = excluded.iter().filter(|&&p| population.get(p)).count() as u64;
        let candidates = total - out.min(total);
        let k = self.samples.min(candidates);
        let mut taken = std::mem::take(&mut self.picked);
        taken.clear();
        self.armed.clear();
        while (self.armed.len() as u64) < k {
            let mut drawn = self.draw_ranks(k - self.armed.len() as u64, total, &mut taken);
            if drawn.is_empty() {
                break;
            }
            drawn.sort_unstable();
            for p in ranks.select_sorted(population, &drawn) {
                if !exclude.get(p) {
                    self.armed.push(p);
                }
            }
        }
        self.picked = taken;
        self.armed.sort_unstable();
        (&self.armed, candidates)
    }

    /// Draws up to `k` ranks from `0..n` that are not in `taken`, uniformly, and adds them to
    /// `taken`: all the rest when fewer than `k` are left. O(k) expected while `taken` holds at
    /// most half of `0..n` (Floyd's algorithm when it is empty); a caller that keeps drawing
    /// replacements bounds `taken` itself. The sampler's own sample size is not used.
    pub fn draw_ranks(&mut self, k: u64, n: u64, taken: &mut HashSet<u64>) -> Vec<u64> {
        let left = n.saturating_sub(taken.len() as u64);
        let mut out = Vec::with_capacity(usize::try_from(k.min(left)).unwrap_or(0));
        if k >= left {
            out.extend((0..n).filter(|r| !taken.contains(r)));
        } else if taken.is_empty() {
            // Floyd's algorithm: for j in n-k .. n, pick t in 0..=j; take t, or j if t is
            // already taken. Each k-subset of 0..n comes out with probability 1 / C(n, k).
            for j in n - k..n {
                let t = self.rng.random_range(0..=j);
                let pick = if taken.insert(t) { t } else { j };
                taken.insert(pick);
                out.push(pick);
            }
            return out;
        } else {
            while (out.len() as u64) < k {
                let t = self.rng.random_range(0..n);
                if taken.insert(t) {
                    out.push(t);
                }
            }
            return out;
        }
        taken.extend(out.iter().copied());
        out
    }

    /// The armed set (sorted ascending; empty before the first [`Sampler::arm`]).
    pub fn armed(&self) -> &[u64] {
        &self.armed
    }

    /// Applies `op` to the armed pages' words and bits; pages beyond the end of `words` are
    /// skipped with a warning (a caller bug: the bitmap should hold one bit per guest page).
    fn for_each_armed_bit(&self, words: &mut [u64], what: &str, op: impl Fn(&mut u64, u64)) {
        let mut skipped = 0usize;
        for &p in &self.armed {
            match usize::try_from(p / 64).ok().and_then(|w| words.get_mut(w)) {
                Some(word) => op(word, 1u64 << (p % 64)),
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            log::warn!(
                "sampler: {what}: the bitmap has {} words but the guest's {} pages need {}; \
                 {skipped} armed pages skipped",
                words.len(),
                self.guest_pages,
                self.bitmap_words()
            );
        }
    }

    /// Sets the armed pages' bits in `words` (bit `p % 64` of word `p / 64` for page `p`), leaving
    /// the other bits alone. `words` should hold one bit per guest page; armed pages past
    /// its end are skipped (and logged).
    pub fn mask_into(&self, words: &mut [u64]) {
        self.for_each_armed_bit(words, "mask", |w, bit| *w |= bit);
    }

    /// Clears the armed pages' bits in `words`, undoing [`Sampler::mask_into`] at O(samples) cost.
    pub fn unmask_from(&self, words: &mut [u64]) {
        self.for_each_armed_bit(words, "unmask", |w, bit| *w &= !bit);
    }

    /// How many armed pages have their bit set in `dirty`. Words beyond the end of `dirty` count as
    /// zero.
    pub fn count_touched(&self, dirty: &[u64]) -> u64 {
        self.armed
            .iter()
            .filter(|&&p| {
                usize::try_from(p / 64)
                    .ok()
                    .and_then(|w| dirty.get(w))
                    .is_some_and(|word| word & (1u64 << (p % 64)) != 0)
            })
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn population_samples_are_uniform_over_the_candidates_only() {
        // A sparse population (rejection sampling) and a dense one (enumeration), with an
        // exclusion: every pick is a candidate, and each candidate is picked about equally often.
        for (pages, every) in [(1u64 << 20, 64u64), (4096, 2)] {
            let mut pop = Bitmap::new(pages);
            for p in (0..pages).step_by(every as usize) {
                pop.set(p);
            }
            let mut exclude = Bitmap::new(pages);
            for p in [0, every, 3 * every] {
                exclude.set(p);
            }
            let candidates = pages / every - 3;
            let mut s = Sampler::new(100, pages, Some(9)).unwrap();
            let mut hits = std::collections::HashMap::new();
            let rounds = 200;
            for _ in 0..rounds {
                let (picked, from) = s.arm_from(&pop, Some(&exclude));
                assert_eq!(from, candidates);
                assert_eq!(picked.len(), 100);
                assert!(picked.windows(2).all(|w| w[0] < w[1]));
                for &p in picked {
                    assert!(pop.get(p) && !exclude.get(p), "{p}");
                    *hits.entry(p).or_insert(0u32) += 1;
                }
            }
            // Expected picks per candidate: rounds x 100 / candidates.
            let expect = rounds as f64 * 100.0 / candidates as f64;
            let max = *hits.values().max().unwrap() as f64;
            assert!(max < expect * 3.0 + 10.0, "max {max}, expected {expect}");
        }
    }

    #[test]
    fn a_small_population_is_taken_whole() {
        let mut pop = Bitmap::new(1000);
        pop.set(5);
        pop.set(500);
        let mut s = Sampler::new(100, 1000, Some(1)).unwrap();
        let (picked, from) = s.arm_from(&pop, None);
        assert_eq!((picked, from), (&[5u64, 500][..], 2));
        let (picked, from) = s.arm_from(&Bitmap::new(1000), None);
        assert_eq!((picked.len(), from), (0, 0));
    }

    #[test]
    fn rejects_bad_counts() {
        assert_eq!(
            Sampler::new(0, 100, Some(1)).unwrap_err(),
            SamplerError::NoSamples
        );
        let e = Sampler::new(101, 100, Some(1)).unwrap_err();
        assert_eq!(
            e,
            SamplerError::TooManySamples {
                samples: 101,
                guest_pages: 100
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("101") && msg.contains("100 pages") && msg.contains("400.0 KiB"));
        assert!(Sampler::new(1, 0, None).is_err());
        assert!(Sampler::new(100, 100, Some(1)).is_ok());
        assert!(Sampler::new(10, 100, None).is_ok());
    }

    #[test]
    fn streams_of_one_seed_are_distinct_and_reproducible() {
        let streams = [
            Stream::Access,
            Stream::Write(0),
            Stream::Write(1),
            Stream::Write(2),
        ];
        let mut seen = HashSet::new();
        for seed in [0u64, 1, 42, u64::MAX] {
            for st in streams {
                assert_eq!(stream_seed(seed, st), stream_seed(seed, st));
                assert!(
                    seen.insert(stream_seed(seed, st)),
                    "{st:?} of {seed} repeats"
                );
                assert_ne!(
                    stream_seed(seed, st),
                    seed,
                    "a stream is not the run seed itself"
                );
            }
        }
    }

    #[test]
    fn seeded_is_reproducible() {
        let mut a = Sampler::new(50, 10_000, Some(42)).unwrap();
        let mut b = Sampler::new(50, 10_000, Some(42)).unwrap();
        let mut c = Sampler::new(50, 10_000, Some(43)).unwrap();
        for _ in 0..5 {
            let sa = a.arm().to_vec();
            assert_eq!(sa, b.arm());
            assert_ne!(sa, c.arm());
        }
        // Unseeded samplers differ from each other (a collision has probability ~1e-100).
        let mut u = Sampler::new(50, 10_000, None).unwrap();
        let mut v = Sampler::new(50, 10_000, None).unwrap();
        assert_ne!(u.arm().to_vec(), v.arm());
    }

    #[test]
    fn armed_pages_are_distinct_sorted_in_range() {
        let mut s = Sampler::new(1000, 5000, Some(7)).unwrap();
        assert!(s.armed().is_empty());
        for _ in 0..20 {
            let set = s.arm().to_vec();
            assert_eq!(set.len(), 1000);
            assert!(set.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            assert!(set.iter().all(|&p| p < 5000));
            assert_eq!(s.armed(), &set[..]);
        }
        // All pages: the whole range.
        let mut all = Sampler::new(64, 64, Some(1)).unwrap();
        assert_eq!(all.arm(), (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn large_guest_is_cheap() {
        // 64 GiB of 4 KiB pages; an O(guest_pages) algorithm would allocate and walk 16 Mi entries.
        let mut s = Sampler::new(100_000, 16 << 20, Some(3)).unwrap();
        for _ in 0..3 {
            let set = s.arm();
            assert_eq!(set.len(), 100_000);
            assert!(*set.last().unwrap() < 16 << 20);
        }
    }

    #[test]
    fn mask_unmask_and_count() {
        let mut s = Sampler::new(37, 1000, Some(9)).unwrap();
        let set = s.arm().to_vec();
        assert_eq!(s.bitmap_words(), 16);
        let mut words = vec![0u64; 16];
        s.mask_into(&mut words);
        let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(ones, 37);
        for &p in &set {
            assert!(words[(p / 64) as usize] & (1 << (p % 64)) != 0);
        }
        assert_eq!(s.count_touched(&words), 37);
        s.unmask_from(&mut words);
        assert!(words.iter().all(|&w| w == 0));

        // Masking leaves other bits alone; unmasking clears only the armed ones.
        let mut words = vec![u64::MAX; 16];
        s.unmask_from(&mut words);
        let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(ones, 16 * 64 - 37);
        assert_eq!(s.count_touched(&words), 0);
        s.mask_into(&mut words);
        assert!(words.iter().all(|&w| w == u64::MAX));

        // A bitmap that is too short is not a panic: the pages that fit are (un)masked.
        let mut short = vec![0u64; 8];
        s.mask_into(&mut short);
        let fit = set.iter().filter(|&&p| p < 8 * 64).count() as u32;
        assert_eq!(short.iter().map(|w| w.count_ones()).sum::<u32>(), fit);
        s.unmask_from(&mut short);
        assert!(short.iter().all(|&w| w == 0));
        s.mask_into(&mut []);
    }

    #[test]
    fn count_touched_counts_armed_bits_only() {
        let mut s = Sampler::new(200, 1000, Some(11)).unwrap();
        let set = s.arm().to_vec();
        // Mark every other armed page, plus every page that is not armed.
        let mut dirty = vec![0u64; 16];
        for p in 0..1000u64 {
            if set.binary_search(&p).is_err() {
                dirty[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        for &p in set.iter().step_by(2) {
            dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
        assert_eq!(s.count_touched(&dirty), 100);
        // Missing words count as zero.
        let cut = 8;
        let expect = set
            .iter()
            .step_by(2)
            .filter(|&&p| p < cut as u64 * 64)
            .count() as u64;
        assert_eq!(s.count_touched(&dirty[..cut]), expect);
        assert_eq!(s.count_touched(&[]), 0);
    }

    /// Pearson's chi-square statistic of `counts` against equal expected counts.
    fn chi_square(counts: &[u64]) -> f64 {
        let total: u64 = counts.iter().sum();
        let expected = total as f64 / counts.len() as f64;
        counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum()
    }

    // Thresholds: with a fixed seed each test is deterministic, so the threshold only has to tell a
    // biased sampler from a fair one. For a fair sampler the statistic follows (approximately, and
    // slightly below it because samples within one round are drawn without replacement) a
    // chi-square distribution with buckets - 1 degrees of freedom; its 99.9% quantile is 43.82 for
    // 19 dof, 103.44 for 63 and 27.88 for 9. A fair sampler exceeds it for only 1 seed in 1000,
    // while a real bias of even a few percent in one bucket, with about 10,000 expected hits per
    // bucket, pushes the statistic far above it.

    #[test]
    fn pages_are_uniform_over_the_guest() {
        const PAGES: u64 = 10_000;
        const BUCKETS: usize = 20;
        let mut s = Sampler::new(100, PAGES, Some(0x5eed)).unwrap();
        let mut counts = [0u64; BUCKETS];
        for _ in 0..2_000 {
            for &p in s.arm() {
                counts[(p * BUCKETS as u64 / PAGES) as usize] += 1;
            }
        }
        let chi2 = chi_square(&counts);
        assert!(chi2 < 43.82, "chi-square {chi2:.2} over {counts:?}");
    }

    #[test]
    fn bit_positions_within_words_are_uniform() {
        // A whole number of words so that every bit position has the same number of pages.
        const PAGES: u64 = 64 * 157;
        let mut s = Sampler::new(100, PAGES, Some(0xb175)).unwrap();
        let mut counts = [0u64; 64];
        for _ in 0..6_400 {
            for &p in s.arm() {
                counts[(p % 64) as usize] += 1;
            }
        }
        let chi2 = chi_square(&counts);
        assert!(chi2 < 103.44, "chi-square {chi2:.2} over {counts:?}");
    }

    #[test]
    fn every_subset_is_equally_likely() {
        // 2 of 5 pages: 10 possible subsets, each expected 2,000 times in 20,000 rounds.
        let mut s = Sampler::new(2, 5, Some(0xf10d)).unwrap();
        let mut counts = [0u64; 10];
        let index = |a: u64, b: u64| -> usize {
            // Lexicographic index of {a < b} among the 2-subsets of 0..5.
            let before: u64 = (0..a).map(|i| 4 - i).sum();
            (before + (b - a - 1)) as usize
        };
        for _ in 0..20_000 {
            let set = s.arm();
            counts[index(set[0], set[1])] += 1;
        }
        let chi2 = chi_square(&counts);
        assert!(chi2 < 27.88, "chi-square {chi2:.2} over {counts:?}");
    }

    #[test]
    fn drawn_ranks_are_uniform_subsets() {
        // First draws (Floyd): 2 of 5, 20,000 times; 10 subsets, 2,000 each expected.
        let mut s = Sampler::new(1, 5, Some(0xd2a)).unwrap();
        let index = |a: u64, b: u64| -> usize {
            let before: u64 = (0..a).map(|i| 4 - i).sum();
            (before + (b - a - 1)) as usize
        };
        let mut first = [0u64; 10];
        for _ in 0..20_000 {
            let mut taken = HashSet::new();
            let mut d = s.draw_ranks(2, 5, &mut taken);
            d.sort_unstable();
            assert_eq!(taken.len(), 2);
            first[index(d[0], d[1])] += 1;
        }
        assert!(chi_square(&first) < 27.88, "first draws {first:?}");
        // Replacements (rejection): one more of 5 with 0 and 1 taken, uniform over the three left.
        let mut more = [0u64; 3];
        for _ in 0..9_000 {
            let mut taken: HashSet<u64> = [0, 1].into_iter().collect();
            let d = s.draw_ranks(1, 5, &mut taken);
            assert_eq!(d.len(), 1);
            assert!(d[0] >= 2, "a replacement repeats a taken rank");
            more[(d[0] - 2) as usize] += 1;
        }
        // 2 degrees of freedom, p = 0.001.
        assert!(chi_square(&more) < 13.82, "replacements {more:?}");
    }

    #[test]
    fn drawing_past_the_population_takes_the_rest() {
        let mut s = Sampler::new(1, 10, Some(3)).unwrap();
        let mut taken: HashSet<u64> = [1, 4, 6].into_iter().collect();
        let mut rest = s.draw_ranks(10, 8, &mut taken);
        rest.sort_unstable();
        assert_eq!(rest, vec![0, 2, 3, 5, 7]);
        assert_eq!(taken.len(), 8);
        assert!(s.draw_ranks(3, 8, &mut taken).is_empty());
        assert!(s.draw_ranks(3, 0, &mut HashSet::new()).is_empty());
    }
}
