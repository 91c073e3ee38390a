//! Which pages to swap out (`--swap-policy`), as a pure function of the candidates.
//!
//! - `random`: ESX's choice, uniform among the backed pages. It needs no knowledge of the guest
//!   and is never fooled by it, but it swaps hot pages as readily as cold ones.
//! - `cold`: the pages with the longest time since their last access the VMM knows of (the last
//!   write in the dirty log, or an access the access sampler saw), ties broken at random.
//!
//! Both take O(candidates) time and return distinct pages.
//!
//! Both choose among unshared pages. Pages on a machine page shared by page sharing (KSM) come
//! after all of those ([`choose_shared`]): swapping one out frees nothing while another page maps
//! its machine page.

use rand::Rng;
use rand::RngExt;

/// How pages are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Random,
    Cold,
}

/// A page that may be swapped out, with the last interval in which it was seen accessed
/// (`None`: never seen, the coldest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub page: u64,
    pub last_seen: Option<u32>,
}

/// Up to `n` distinct pages from `candidates`, chosen by `policy`.
pub fn choose(
    policy: Policy,
    candidates: impl IntoIterator<Item = Candidate>,
    n: usize,
    rng: &mut impl Rng,
) -> Vec<u64> {
    if n == 0 {
        return Vec::new();
    }
    match policy {
        Policy::Random => reservoir(candidates.into_iter().map(|c| c.page), n, rng),
        Policy::Cold => {
            // Key: last seen (never seen first), then a random tie-break.
            let mut keyed: Vec<(u64, u64, u64)> = candidates
                .into_iter()
                .map(|c| {
                    let age = c.last_seen.map_or(0, |s| u64::from(s) + 1);
                    (age, rng.random::<u64>(), c.page)
                })
                .collect();
            if keyed.len() > n {
                keyed.select_nth_unstable(n - 1);
                keyed.truncate(n);
            }
            keyed.into_iter().map(|(_, _, page)| page).collect()
        }
    }
}

/// The guest pages of one VM on one shared machine page, and how many guest pages map it
/// across the host (`sharers`, at least `pages.len()`; 2 or more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedFrame {
    pub pages: Vec<u64>,
    pub sharers: u64,
}

/// Up to `n` distinct pages of shared machine pages, for when the unshared ones are not enough.
/// A machine page is freed only when all its sharers are gone, so whole frames are taken, in this
/// order: the fewest sharers outside this VM first (none: swapping out this VM's pages of it
/// frees it), then the fewest pages of this VM (the machine pages freed per page swapped out),
/// ties at random. Only the last frame taken may be taken in part.
pub fn choose_shared(frames: Vec<SharedFrame>, n: usize, rng: &mut impl Rng) -> Vec<u64> {
    let mut keyed: Vec<(u64, usize, u64, SharedFrame)> = frames
        .into_iter()
        .filter(|f| !f.pages.is_empty())
        .map(|f| {
            let outside = f.sharers.saturating_sub(f.pages.len() as u64);
            (outside, f.pages.len(), rng.random::<u64>(), f)
        })
        .collect();
    keyed.sort_unstable_by_key(|k| (k.0, k.1, k.2));
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for (_, _, _, f) in keyed {
        if out.len() >= n {
            break;
        }
        let take = (n - out.len()).min(f.pages.len());
        out.extend_from_slice(&f.pages[..take]);
    }
    out
}

/// A uniform sample of `n` items from a stream of unknown length (Algorithm R).
fn reservoir(items: impl Iterator<Item = u64>, n: usize, rng: &mut impl Rng) -> Vec<u64> {
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for (i, item) in items.enumerate() {
        if i < n {
            out.push(item);
        } else {
            let j = rng.random_range(0..=i as u64) as usize;
            if j < n {
                out[j] = item;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn pages(n: u64, seen: impl Fn(u64) -> Option<u32>) -> Vec<Candidate> {
        (0..n)
            .map(|page| Candidate {
                page,
                last_seen: seen(page),
            })
            .collect()
    }

    #[test]
    fn cold_takes_the_longest_unseen_first() {
        let mut rng = StdRng::seed_from_u64(1);
        // Pages 0..100 were seen at interval page/10; 100..110 never.
        let c = pages(110, |p| (p < 100).then_some((p / 10) as u32));
        let got = choose(Policy::Cold, c, 15, &mut rng);
        // The 10 never seen, then 5 of the 10 seen at interval 0.
        assert_eq!(got.len(), 15);
        assert_eq!(got.iter().filter(|&&p| p >= 100).count(), 10, "{got:?}");
        assert!(got.iter().all(|&p| !(10..100).contains(&p)), "{got:?}");
    }

    #[test]
    fn both_return_distinct_pages_and_at_most_what_there_is() {
        let mut rng = StdRng::seed_from_u64(2);
        for policy in [Policy::Random, Policy::Cold] {
            let got = choose(policy, pages(50, |p| Some(p as u32)), 20, &mut rng);
            assert_eq!(got.len(), 20);
            assert_eq!(got.iter().collect::<HashSet<_>>().len(), 20);
            assert_eq!(choose(policy, pages(5, |_| None), 20, &mut rng).len(), 5);
            assert!(choose(policy, pages(5, |_| None), 0, &mut rng).is_empty());
            assert!(choose(policy, pages(0, |_| None), 3, &mut rng).is_empty());
        }
    }

    #[test]
    fn random_is_uniform() {
        // 20 pages, 5 drawn, 20,000 times: each page drawn about 5,000 times (chi-square).
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0u64; 20];
        let rounds = 20_000;
        for _ in 0..rounds {
            for p in choose(Policy::Random, pages(20, |_| Some(0)), 5, &mut rng) {
                counts[p as usize] += 1;
            }
        }
        let expected = rounds as f64 * 5.0 / 20.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        // 19 degrees of freedom: P(chi2 > 43.8) = 0.001.
        assert!(chi2 < 43.8, "chi2 {chi2}, counts {counts:?}");
    }

    #[test]
    fn shared_frames_go_whole_those_freed_by_this_vm_first() {
        let mut rng = StdRng::seed_from_u64(5);
        let frame = |pages: std::ops::Range<u64>, sharers| SharedFrame {
            pages: pages.collect(),
            sharers,
        };
        let frames = vec![
            // Shared with another VM's page: freed only when that one goes too.
            frame(0..1, 2),
            // Only this VM's: 3 pages free it, then 4 pages free the next.
            frame(10..14, 4),
            frame(20..23, 3),
            // Three other sharers.
            frame(30..32, 5),
        ];
        assert_eq!(choose_shared(frames.clone(), 3, &mut rng), [20, 21, 22]);
        assert_eq!(
            choose_shared(frames.clone(), 9, &mut rng),
            [20, 21, 22, 10, 11, 12, 13, 0, 30]
        );
        // Never more than there is, nor a page twice.
        assert_eq!(choose_shared(frames.clone(), 100, &mut rng).len(), 10);
        assert!(choose_shared(frames, 0, &mut rng).is_empty());
        assert!(choose_shared(Vec::new(), 5, &mut rng).is_empty());
    }

    #[test]
    fn cold_breaks_ties_at_random() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut seen = HashSet::new();
        for _ in 0..50 {
            seen.extend(choose(Policy::Cold, pages(10, |_| Some(3)), 1, &mut rng));
        }
        assert!(seen.len() > 5, "{seen:?}");
    }
}
