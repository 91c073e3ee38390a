//! Per VM and period: how much of the memory it must give back goes to the balloon and how much to
//! hypervisor swap.
//!
//! A VM with a target of `T` pages must not hold more than `T`. What it would hold without
//! reclamation is what it holds now (GRANT) plus what is reclaimed already (its balloon and its
//! swapped pages): the excess over `T` is to be kept reclaimed, by the balloon (the guest picks
//! the pages, cheap) or by hypervisor swap (the host picks blindly, slow). Memory a guest never
//! touched costs the host nothing and is not reclaimed: a VM that uses less than its target is
//! left alone, whatever its configured size. This closes the loop on what the VM holds: when it
//! holds less than its target, the balloon may deflate by the difference. [`plan`] turns the target, what the VM holds
//! now and the host's [`MemState`] into a balloon target (ESX's MCTLTGT) and a swap target
//! (SWTGT):
//!
//! - the balloon first, up to [`CTL_MAX_PERCENT`] of the VM's memory (ESX's `Mem.CtlMaxPercent`);
//! - `high`: nothing new is reclaimed: the balloon only deflates, toward what the VM's target
//!   needs, and the swap target is what swap held last period (its target, not what is still out
//!   after this period's page-ins), less what the VM may take back below its target. Swapped
//!   pages come back as the guest touches them, but a VM's page-ins never take it
//!   above its target (the next boundary swaps out as many of its coldest pages): letting them
//!   would refill the memory the last reclamation freed, and the host would fall back from `high`
//!   to where it came from, period after period;
//! - `soft`: the balloon moves toward its share; swap only for what the balloon may not take
//!   (above its maximum), swap already done that the balloon has not yet replaced, and everything
//!   for a VM whose balloon is stuck (below);
//! - `hard` and `low`: swap whatever the balloon has not yet delivered, now; the balloon keeps
//!   inflating, and as it grows the swap target shrinks (the guest's choice of pages replaces the
//!   host's);
//! - `low`: also pause the VM's vCPUs while it holds more than its target;
//! - a VM whose balloon has not grown for [`STUCK_PERIODS`] periods while asked to (or that has no
//!   balloon) is swapped instead;
//! - when memory frees up, in reverse: the swap target falls first (the swap is what the target
//!   no longer needs beyond the balloon), then the balloon deflates.
//!
//! The balloon target moves at most [`BALLOON_STEP_PERCENT`] of the VM's memory per period, both
//! ways, and the swap target falls by at most as much (it rises at once: swap is the fallback when
//! ballooning is too slow). The limit on the way back is what keeps the host from swinging: a VM
//! whose target rose takes back swapped pages as fast as it touches them (tens of MiB a second),
//! while the VMs whose targets fell give memory back only once the host is short again; without
//! it, a host of a few hundred MiB fell from `high` to `low` within one period, again and again. oVirt MOM's balloon policy moves a guest by at most 5% of its memory per policy round
//! (`max_balloon_change_percent`, every 10 s by default); Proxmox's autoballoon moves a VM by at
//! most 100 MiB per 10 s round. Memvisor's period is 1 s by default and its VMs are small (tens to
//! hundreds of MiB), so MOM's 5% per period is used: a guest's balloon driver inflates that much
//! within a period without starving the guest's allocator of pages all at once, and the balloon
//! reaches its 65% maximum in 13 periods, well inside a run of a minute. Swap is not limited: it
//! is the fallback when ballooning is too slow.

use serde::Serialize;

use crate::host::state::MemState;

/// ESX's `Mem.CtlMaxPercent`: the balloon takes at most 65% of a VM's memory.
pub const CTL_MAX_PERCENT: u64 = 65;

/// The balloon target moves at most this percent of the VM's memory per period (MOM's 5%).
pub const BALLOON_STEP_PERCENT: u64 = 5;

/// A balloon asked to grow that has not grown for this many periods is stuck, and the VM is
/// swapped instead. One period is the device's turn-around (the target is set, the guest's driver
/// answers at its next poll); three allows for a guest busy for two periods.
pub const STUCK_PERIODS: u32 = 3;

/// One VM this period. Sizes in pages; values above `mem_pages` are taken as `mem_pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmMemory {
    /// Configured memory (MEMSZ).
    pub mem_pages: u64,
    /// The guest pages it may hold: the scheduler's target (SZTGT, machine memory) plus its
    /// sharing savings, at most its size or limit ([`Target::guest_pages`](crate::host::scheduler::Target::guest_pages)).
    pub target_pages: u64,
    /// Guest pages the VM holds now (GRANT less swapped, i.e. backed).
    pub granted_pages: u64,
    /// Pages in its balloon now (MCTLSZ).
    pub balloon_pages: u64,
    /// Pages swapped out now (SWCUR).
    pub swapped_pages: u64,
    /// Whether it has a balloon device at all.
    pub balloon_device: bool,
}

/// What [`plan`] remembers of a VM from one period to the next. Starts at the default (zeros).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct History {
    /// The balloon target set last period.
    pub balloon_target_pages: u64,
    /// The balloon's size last period.
    pub last_balloon_pages: u64,
    /// Consecutive periods the balloon was asked to grow and did not.
    pub still_periods: u32,
    /// The swap target set last period: what was swapped out stays swapped out (pages the guest
    /// touched since are swapped out again at the next boundary, its coldest first) until the
    /// plan lowers the target.
    pub swap_target_pages: u64,
}

/// This period's orders for one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The balloon's target size (MCTLTGT).
    pub balloon_target_pages: u64,
    /// How many pages should be swapped out (SWTGT): swap out while fewer are; above it, swap no
    /// more (swapped pages come back as they are touched).
    pub swap_target_pages: u64,
    /// Pause the VM's vCPUs (`low`, above its target).
    pub pause: bool,
    /// Its balloon does not answer (or it has none): swap stands in for it.
    pub balloon_stuck: bool,
    /// Pass back next period.
    pub history: History,
}

fn percent_of(pages: u64, pct: u64) -> u64 {
    (u128::from(pages) * u128::from(pct) / 100) as u64
}

/// The most the balloon target moves per period for a VM of `mem_pages`: 5%, rounded up, so
/// that any VM with memory moves at least a page.
pub fn balloon_step(mem_pages: u64) -> u64 {
    (u128::from(mem_pages) * u128::from(BALLOON_STEP_PERCENT)).div_ceil(100) as u64
}

/// The balloon's maximum for a VM of `mem_pages`: 65%, rounded down.
pub fn balloon_max(mem_pages: u64) -> u64 {
    percent_of(mem_pages, CTL_MAX_PERCENT)
}

/// This period's balloon and swap targets for one VM (see the module's text).
pub fn plan(vm: &VmMemory, state: MemState, history: History) -> Plan {
    let mem = vm.mem_pages;
    let target = vm.target_pages.min(mem);
    let cap = balloon_max(mem);
    let balloon = vm.balloon_pages.min(mem);
    let swapped = vm.swapped_pages.min(mem);
    let footprint = (vm.granted_pages.min(mem))
        .saturating_add(balloon)
        .saturating_add(swapped)
        .min(mem);
    let need = footprint.saturating_sub(target);
    let previous = history.balloon_target_pages.min(cap);

    // Stuck: asked to grow (last target above its size) and has not grown since last period.
    let grew = balloon > history.last_balloon_pages;
    let asked = previous > balloon;
    let still_periods = if asked && !grew {
        history.still_periods.saturating_add(1)
    } else {
        0
    };
    let stuck = !vm.balloon_device || still_periods >= STUCK_PERIODS;

    let wanted = if !vm.balloon_device {
        0
    } else if state == MemState::High {
        previous.min(need)
    } else {
        need.min(cap)
    };
    let step = balloon_step(mem);
    let balloon_target = if wanted >= previous {
        previous + (wanted - previous).min(step)
    } else {
        previous - (previous - wanted).min(step)
    };

    // What the balloon has not delivered of what must be reclaimed.
    let uncovered = need.saturating_sub(balloon);
    // What swap holds now: last period's target, not what is still out after this period's
    // page-ins (a guest's page-ins would otherwise lower the target by as much, and a VM at its
    // target would creep above it, period after period, until the host fell out of `high`).
    let holds = history.swap_target_pages.min(mem).max(swapped);
    let wanted_swap = match state {
        MemState::High => holds.min(uncovered),
        MemState::Soft if stuck => uncovered,
        MemState::Soft => holds.max(need.saturating_sub(cap)).min(uncovered),
        MemState::Hard | MemState::Low => uncovered,
    };
    // Swapped pages come back at most a step a period, as the balloon deflates.
    let swap_target = wanted_swap.max(holds.saturating_sub(step));

    Plan {
        balloon_target_pages: balloon_target,
        swap_target_pages: swap_target,
        pause: state == MemState::Low && vm.granted_pages > target,
        balloon_stuck: stuck,
        history: History {
            balloon_target_pages: balloon_target,
            last_balloon_pages: balloon,
            still_periods,
            swap_target_pages: swap_target,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemState::*;

    const MEM: u64 = 10_000;

    fn vm(target: u64, balloon: u64, swapped: u64) -> VmMemory {
        VmMemory {
            mem_pages: MEM,
            target_pages: target,
            granted_pages: MEM - balloon - swapped,
            balloon_pages: balloon,
            swapped_pages: swapped,
            balloon_device: true,
        }
    }

    /// Runs `periods` periods against a guest whose balloon follows its target a period late and
    /// a host that swaps out exactly to its target; returns the last plan and the VM.
    fn simulate(
        mut v: VmMemory,
        states: &[MemState],
        mut h: History,
        obey: bool,
    ) -> (Plan, VmMemory, History) {
        let mut last = None;
        for &s in states {
            let p = plan(&v, s, h);
            if obey {
                v.balloon_pages = p.balloon_target_pages;
            }
            v.swapped_pages = p.swap_target_pages;
            v.granted_pages = v.mem_pages - v.balloon_pages - v.swapped_pages;
            h = p.history;
            last = Some(p);
        }
        (last.expect("at least one period"), v, h)
    }

    #[test]
    fn constants() {
        assert_eq!(balloon_max(MEM), 6_500);
        assert_eq!(balloon_step(MEM), 500);
        assert_eq!(balloon_step(1), 1);
        assert_eq!(balloon_step(0), 0);
        assert_eq!(
            balloon_max(u64::MAX),
            (u128::from(u64::MAX) * 65 / 100) as u64
        );
    }

    #[test]
    fn high_reclaims_nothing() {
        let p = plan(&vm(4_000, 0, 0), High, History::default());
        assert_eq!((p.balloon_target_pages, p.swap_target_pages), (0, 0));
        assert!(!p.pause && !p.balloon_stuck);
    }

    #[test]
    fn soft_balloons_at_the_rate_limit_then_stops_at_the_target() {
        // Needs 4,000 pages: 8 periods at 500.
        let (p, v, _) = simulate(vm(6_000, 0, 0), &[Soft; 8], History::default(), true);
        assert_eq!(p.balloon_target_pages, 4_000);
        assert_eq!(v.swapped_pages, 0);
        let (p, _, _) = simulate(vm(6_000, 0, 0), &[Soft; 7], History::default(), true);
        assert_eq!(p.balloon_target_pages, 3_500);
        assert_eq!(p.swap_target_pages, 0);
    }

    #[test]
    fn soft_swaps_what_the_balloon_may_not_take() {
        // Needs 8,000 of 10,000: the balloon takes 6,500, swap the other 1,500 at once.
        let p = plan(&vm(2_000, 0, 0), Soft, History::default());
        assert_eq!(p.balloon_target_pages, 500);
        assert_eq!(p.swap_target_pages, 1_500);
        let (p, v, _) = simulate(vm(2_000, 0, 0), &[Soft; 20], History::default(), true);
        assert_eq!(p.balloon_target_pages, 6_500);
        assert_eq!(v.swapped_pages, 1_500);
        assert_eq!(v.granted_pages, 2_000);
    }

    #[test]
    fn hard_swaps_at_once_and_the_balloon_replaces_the_swap() {
        let p = plan(&vm(6_000, 0, 0), Hard, History::default());
        assert_eq!(p.swap_target_pages, 4_000);
        assert_eq!(p.balloon_target_pages, 500);
        // The balloon grows; the swap target shrinks by as much.
        let (p, v, _) = simulate(vm(6_000, 0, 0), &[Hard; 4], History::default(), true);
        assert_eq!(p.balloon_target_pages, 2_000);
        // The swap target trails the balloon by a period (set from last period's balloon).
        assert_eq!((v.balloon_pages, v.swapped_pages), (2_000, 4_000 - 1_500));
        // Back in soft, the swap already done is held until the balloon covers it.
        let (p, v, _) = simulate(v, &[Soft], p.history, true);
        assert_eq!(p.swap_target_pages, 4_000 - 2_000);
        assert_eq!(v.balloon_pages, 2_500);
    }

    #[test]
    fn low_pauses_only_vms_above_their_target() {
        let above = VmMemory {
            granted_pages: 7_000,
            ..vm(6_000, 0, 0)
        };
        assert!(plan(&above, Low, History::default()).pause);
        assert!(!plan(&above, Hard, History::default()).pause);
        let under = VmMemory {
            granted_pages: 6_000,
            ..vm(6_000, 0, 0)
        };
        assert!(!plan(&under, Low, History::default()).pause);
        // It holds 1,000 above its target: swap those.
        assert_eq!(
            plan(&above, Low, History::default()).swap_target_pages,
            1_000
        );
    }

    #[test]
    fn a_stuck_balloon_is_swapped_after_n_periods() {
        // The guest ignores the balloon: it stays at 0.
        let v = vm(6_000, 0, 0);
        let mut h = History::default();
        for period in 0..=STUCK_PERIODS {
            let p = plan(&v, Soft, h);
            // The first period only sets the target; the next STUCK_PERIODS see no growth.
            assert_eq!(p.balloon_stuck, period == STUCK_PERIODS, "period {period}");
            let swap = if p.balloon_stuck { 4_000 } else { 0 };
            assert_eq!(p.swap_target_pages, swap, "period {period}");
            h = p.history;
        }
        // It starts answering: no longer stuck, the swap is held until the balloon covers it.
        let moved = vm(6_000, 300, 3_700);
        let p = plan(&moved, Soft, h);
        assert!(!p.balloon_stuck);
        assert_eq!(p.history.still_periods, 0);
        assert_eq!(p.swap_target_pages, 3_700);
    }

    #[test]
    fn no_balloon_device_is_swapped_at_once() {
        let v = VmMemory {
            balloon_device: false,
            ..vm(6_000, 0, 0)
        };
        let p = plan(&v, Soft, History::default());
        assert!(p.balloon_stuck);
        assert_eq!((p.balloon_target_pages, p.swap_target_pages), (0, 4_000));
    }

    #[test]
    fn freed_memory_stops_swapping_first_then_deflates() {
        // Reclaiming 8,000: balloon 6,500, swap 1,500.
        let (p, v, h) = simulate(vm(2_000, 0, 0), &[Soft; 20], History::default(), true);
        assert_eq!((v.balloon_pages, v.swapped_pages), (6_500, 1_500));
        assert_eq!(p.swap_target_pages, 1_500);
        // The target rises by 1,000: the swap target falls by a step (500) of those 1,000, the
        // balloon holds (in high as in soft).
        for s in [High, Soft] {
            let p = plan(
                &VmMemory {
                    target_pages: 3_000,
                    ..v
                },
                s,
                h,
            );
            assert_eq!(
                (p.balloon_target_pages, p.swap_target_pages),
                (6_500, 1_000)
            );
        }
        // By 2,000: no swap is needed; the swap target falls by a step and the balloon deflates
        // by one (the rate limits).
        let p = plan(
            &VmMemory {
                target_pages: 4_000,
                ..v
            },
            High,
            h,
        );
        assert_eq!(
            (p.balloon_target_pages, p.swap_target_pages),
            (6_000, 1_000)
        );
        // All of it: the balloon empties in 13 periods.
        let (p, v, _) = simulate(
            VmMemory {
                target_pages: MEM,
                ..v
            },
            &[High; 13],
            h,
            true,
        );
        assert_eq!((p.balloon_target_pages, v.swapped_pages), (0, 0));
    }

    #[test]
    fn only_what_a_vm_holds_above_its_target_is_reclaimed() {
        // It touched 5,000 of its 10,000 pages; its target is 6,000: nothing to take, whatever
        // the state.
        let v = VmMemory {
            granted_pages: 5_000,
            ..vm(6_000, 0, 0)
        };
        for s in [High, Soft, Hard, Low] {
            let p = plan(&v, s, History::default());
            assert_eq!(
                (p.balloon_target_pages, p.swap_target_pages),
                (0, 0),
                "{s:?}"
            );
            assert!(!p.pause && !p.balloon_stuck, "{s:?}");
        }
        // It holds 7,000, 1,000 above: in hard, swap the 1,000 now while the balloon starts.
        let v = VmMemory {
            granted_pages: 7_000,
            ..vm(6_000, 0, 0)
        };
        let p = plan(&v, Hard, History::default());
        assert_eq!((p.balloon_target_pages, p.swap_target_pages), (500, 1_000));
        // It holds 3,000 with 2,000 in its balloon and 1,000 swapped: 6,000 in all, its target.
        // Nothing more is needed: the balloon deflates at its rate, and swapped pages may come
        // back at the same rate.
        let v = VmMemory {
            granted_pages: 3_000,
            ..vm(6_000, 2_000, 1_000)
        };
        let h = History {
            balloon_target_pages: 2_000,
            last_balloon_pages: 2_000,
            still_periods: 0,
            swap_target_pages: 1_000,
        };
        let p = plan(&v, Soft, h);
        assert_eq!((p.balloon_target_pages, p.swap_target_pages), (1_500, 500));
    }

    #[test]
    fn page_ins_do_not_lower_the_swap_target() {
        // Held at its target (6,000) with 4,000 swapped; the guest pages 300 back in.
        let (p, v, h) = simulate(vm(6_000, 0, 0), &[Hard], History::default(), false);
        assert_eq!((p.swap_target_pages, v.swapped_pages), (4_000, 4_000));
        let paged_in = VmMemory {
            granted_pages: 6_300,
            swapped_pages: 3_700,
            ..v
        };
        for s in [High, Soft, Hard, Low] {
            // The target holds: the next boundary swaps 300 out again (its coldest pages).
            assert_eq!(plan(&paged_in, s, h).swap_target_pages, 4_000, "{s:?}");
        }
        // Its target rises by 1,000: the held swap falls, a step at a time.
        let raised = VmMemory {
            target_pages: 7_000,
            ..paged_in
        };
        assert_eq!(plan(&raised, High, h).swap_target_pages, 3_500);
    }

    #[test]
    fn garbage_is_clamped() {
        let v = VmMemory {
            mem_pages: 100,
            target_pages: u64::MAX,
            granted_pages: u64::MAX,
            balloon_pages: u64::MAX,
            swapped_pages: u64::MAX,
            balloon_device: true,
        };
        let h = History {
            balloon_target_pages: u64::MAX,
            last_balloon_pages: u64::MAX,
            still_periods: u32::MAX,
            swap_target_pages: u64::MAX,
        };
        for s in [High, Soft, Hard, Low] {
            let p = plan(&v, s, h);
            assert!(p.balloon_target_pages <= 65, "{s:?}");
            // Nothing is needed (the target is all of it); what is swapped (clamped to 100)
            // comes back a step (5) at a time.
            assert_eq!(p.swap_target_pages, 95, "{s:?}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn any_state() -> impl Strategy<Value = MemState> {
            prop_oneof![Just(High), Just(Soft), Just(Hard), Just(Low)]
        }

        fn any_vm() -> impl Strategy<Value = VmMemory> {
            (1u64..1_000_000, any::<bool>()).prop_flat_map(|(mem, device)| {
                (0..=mem, 0..=mem, 0..=mem, 0..=mem).prop_map(
                    move |(target, granted, balloon, swapped)| VmMemory {
                        mem_pages: mem,
                        target_pages: target,
                        granted_pages: granted,
                        balloon_pages: balloon,
                        swapped_pages: swapped,
                        balloon_device: device,
                    },
                )
            })
        }

        fn any_history(mem: u64) -> impl Strategy<Value = History> {
            (0..=mem, 0..=mem, 0u32..10, 0..=mem).prop_map(|(t, b, s, w)| History {
                balloon_target_pages: t,
                last_balloon_pages: b,
                still_periods: s,
                swap_target_pages: w,
            })
        }

        proptest! {
            #[test]
            fn plans_keep_their_rules(
                (v, h) in any_vm().prop_flat_map(|v| (Just(v), any_history(v.mem_pages))),
                s in any_state(),
            ) {
                let p = plan(&v, s, h);
                let held = (v.granted_pages + v.balloon_pages + v.swapped_pages).min(v.mem_pages);
                let need = held.saturating_sub(v.target_pages);
                let previous = h.balloon_target_pages.min(balloon_max(v.mem_pages));
                // The rate limit, both ways, and the balloon's maximum.
                prop_assert!(p.balloon_target_pages.abs_diff(previous) <= balloon_step(v.mem_pages));
                prop_assert!(p.balloon_target_pages <= balloon_max(v.mem_pages));
                // What swap holds: last period's target, or what is out now if more.
                let holds = h.swap_target_pages.min(v.mem_pages).max(v.swapped_pages.min(v.mem_pages));
                // Never swap what the balloon already covers, beyond what may come back in a
                // step.
                let held = holds.saturating_sub(balloon_step(v.mem_pages));
                prop_assert!(
                    p.swap_target_pages <= need.saturating_sub(v.balloon_pages).max(held)
                );
                if need <= v.balloon_pages {
                    prop_assert!(p.swap_target_pages <= held);
                }
                // Swapped pages come back at most a step a period.
                prop_assert!(p.swap_target_pages >= held);
                match s {
                    High => {
                        prop_assert!(p.swap_target_pages <= holds);
                        prop_assert!(p.balloon_target_pages <= previous);
                    }
                    Soft if !p.balloon_stuck && need <= balloon_max(v.mem_pages) => {
                        prop_assert!(p.swap_target_pages <= holds);
                    }
                    Soft => {}
                    Hard | Low => {
                        prop_assert!(v.balloon_pages + p.swap_target_pages >= need);
                    }
                }
                if p.balloon_stuck && s != High {
                    prop_assert_eq!(
                        p.swap_target_pages,
                        need.saturating_sub(v.balloon_pages).max(held)
                    );
                }
                prop_assert_eq!(p.pause, s == Low && v.granted_pages > v.target_pages);
                prop_assert_eq!(p.history.balloon_target_pages, p.balloon_target_pages);
                if !v.balloon_device {
                    prop_assert!(p.balloon_stuck);
                }
            }

            /// An obedient guest under steady soft pressure ends exactly at its target, with the
            /// balloon at min(need, 65%) and swap for the rest, after the rate limit's periods.
            #[test]
            fn soft_converges(mem in 1u64..100_000, target_frac in 0.0f64..=1.0) {
                let target = (mem as f64 * target_frac) as u64;
                let v = VmMemory {
                    mem_pages: mem,
                    target_pages: target,
                    granted_pages: mem,
                    balloon_pages: 0,
                    swapped_pages: 0,
                    balloon_device: true,
                };
                let need = mem - target;
                let periods = need.min(balloon_max(mem)).div_ceil(balloon_step(mem)) as usize + 1;
                let (p, v, _) = simulate(v, &vec![Soft; periods], History::default(), true);
                prop_assert_eq!(p.balloon_target_pages, need.min(balloon_max(mem)));
                prop_assert_eq!(v.swapped_pages, need - need.min(balloon_max(mem)));
                prop_assert_eq!(v.granted_pages, target);
                prop_assert!(!p.balloon_stuck);
            }
        }
    }
}
