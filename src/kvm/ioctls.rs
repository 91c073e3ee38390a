//! The KVM ioctls memvisor needs that kvm-ioctls lacks (or that take a memvisor type), in
//! kvm-ioctls' style: one short function each, a typed error, validation before the ioctl so KVM
//! never has to answer `EINVAL` for a request we could have checked.

use kvm_bindings::{
    KVM_CAP_GET_TSC_KHZ, KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_USER_MEMORY, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVMIO, kvm_clear_dirty_log,
    kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::memory::bitmap::{WORD_BITS, words_for};
use crate::memory::pagemap::AnonMapping;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// Errors of the raw KVM ioctls.
#[derive(Debug, Error)]
pub enum KvmExtError {
    /// `first_page` of a clear request is not a multiple of 64; nothing was sent to KVM.
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot}: first_page {first_page} is not a multiple of 64")]
    ClearUnalignedFirstPage { slot: u32, first_page: u64 },
    /// The bitmap of a clear request is shorter than its window; nothing was sent to KVM.
    #[error(
        "KVM_CLEAR_DIRTY_LOG on slot {slot}: bitmap has {have} words, {num_pages} pages need {need}"
    )]
    ClearBitmapTooShort {
        slot: u32,
        num_pages: u32,
        have: usize,
        need: usize,
    },
    /// The buffer of a get request is shorter than the slot's bitmap; nothing was sent to KVM.
    #[error("KVM_GET_DIRTY_LOG on slot {slot}: buffer has {have} words, {pages} pages need {need}")]
    GetBufferTooShort {
        slot: u32,
        pages: u64,
        have: usize,
        need: usize,
    },
    /// KVM refused `KVM_GET_DIRTY_LOG`.
    #[error(
        "KVM_GET_DIRTY_LOG on slot {slot}: {source} (ENOENT: no such slot or dirty logging is off on it)"
    )]
    GetDirtyLog {
        slot: u32,
        #[source]
        source: errno::Error,
    },
    /// KVM refused `KVM_CLEAR_DIRTY_LOG`.
    #[error(
        "KVM_CLEAR_DIRTY_LOG on slot {slot}, pages {first_page}+{num_pages}: {source} (ENOENT: no \
         such slot or dirty logging is off on it; EINVAL: window past the slot end, or not a \
         multiple of 64 pages without reaching it; ENXIO/EINVAL: manual dirty-log protect not \
         enabled)"
    )]
    ClearDirtyLog {
        slot: u32,
        first_page: u64,
        num_pages: u32,
        #[source]
        source: errno::Error,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` failed.
    #[error("KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): {0}")]
    EnableManualDirtyLogProtect(#[source] errno::Error),
    /// KVM refused `KVM_SET_USER_MEMORY_REGION`.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} over {len} bytes: {source}")]
    SetUserMemory {
        slot: u32,
        len: usize,
        #[source]
        source: errno::Error,
    },
    /// The host KVM lacks capabilities memvisor needs.
    #[error("host KVM lacks required capabilities: {}", .0.join(", "))]
    MissingCapabilities(Vec<&'static str>),
}

/// `KVM_CLEAR_DIRTY_LOG`: clears the dirty bits of the pages of `first_page..first_page+num_pages`
/// whose bit is set in `bitmap` (bit `i` = page `first_page + i`) and write-protects those pages
/// again, so their next guest write is logged.
///
/// Checked before the ioctl: `first_page` is a multiple of 64 and `bitmap` has
/// `ceil(num_pages / 64)` words. KVM also wants `num_pages` to be a multiple of 64 unless the
/// window ends exactly at the slot end, and the window inside the slot; it refuses (EINVAL)
/// otherwise. `num_pages == 0` does nothing.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), KvmExtError> {
    if !first_page.is_multiple_of(WORD_BITS) {
        return Err(KvmExtError::ClearUnalignedFirstPage { slot, first_page });
    }
    let need = words_for(u64::from(num_pages));
    if bitmap.len() < need {
        return Err(KvmExtError::ClearBitmapTooShort {
            slot,
            num_pages,
            have: bitmap.len(),
            need,
        });
    }
    if num_pages == 0 {
        return Ok(());
    }
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_ptr() as *mut libc::c_void,
        },
    };
    // SAFETY: `vm` is a VM fd and `arg` a valid kvm_clear_dirty_log whose bitmap pointer covers
    // ceil(num_pages / 64) u64 words (checked above); KVM only reads the bitmap.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret == 0 {
        Ok(())
    } else {
        Err(KvmExtError::ClearDirtyLog {
            slot,
            first_page,
            num_pages,
            source: errno::Error::last(),
        })
    }
}

/// `KVM_GET_DIRTY_LOG` into `out`: the dirty bitmap of memslot `slot`, which holds `pages` pages
/// (bit `i` = the slot's page `i`), into the first `ceil(pages / 64)` words of `out` (checked
/// before the ioctl). With manual protect the bits stay set. KVM copies the whole slot's bitmap,
/// so the cost is the slot's size.
///
/// # Safety
///
/// Memslot `slot` must hold at most `pages` pages: KVM writes the bitmap of the slot's real size,
/// and only `pages` bits' worth of `out` is checked.
pub unsafe fn get_dirty_log(
    vm: &VmFd,
    slot: u32,
    pages: u64,
    out: &mut [u64],
) -> Result<(), KvmExtError> {
    let need = words_for(pages);
    if out.len() < need {
        return Err(KvmExtError::GetBufferTooShort {
            slot,
            pages,
            have: out.len(),
            need,
        });
    }
    let arg = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: out.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd and `arg` a valid kvm_dirty_log whose bitmap pointer covers
    // ceil(pages / 64) writable u64 words (checked above), at least what KVM writes for the slot,
    // which holds at most `pages` pages (the caller's contract).
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if ret == 0 {
        Ok(())
    } else {
        Err(KvmExtError::GetDirtyLog {
            slot,
            source: errno::Error::last(),
        })
    }
}

/// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` only
/// (not `KVM_DIRTY_LOG_INITIALLY_SET`): `KVM_GET_DIRTY_LOG` then leaves the bits set and only
/// `KVM_CLEAR_DIRTY_LOG` clears them.
pub fn enable_manual_dirty_log_protect(vm: &VmFd) -> Result<(), KvmExtError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(KvmExtError::EnableManualDirtyLogProtect)
}

/// `KVM_SET_USER_MEMORY_REGION`: memslot `slot` with `flags` (`KVM_MEM_*`) over guest-physical
/// `0..mem.len()`, backed by `mem`.
///
/// # Safety
///
/// `mem` must outlive the memslot: drop the VM (or delete the slot) before `mem`.
pub unsafe fn set_user_memory(
    vm: &VmFd,
    slot: u32,
    flags: u32,
    mem: &AnonMapping,
) -> Result<(), KvmExtError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: 0,
        memory_size: mem.len() as u64,
        userspace_addr: mem.addr() as u64,
    };
    // SAFETY: `mem` is a live mapping of memory_size bytes that the caller keeps alive as long
    // as the slot exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| KvmExtError::SetUserMemory {
        slot,
        len: mem.len(),
        source,
    })
}

/// The capabilities memvisor needs, by name and number.
pub const REQUIRED_CAPABILITIES: [(&str, u32); 4] = [
    ("KVM_CAP_USER_MEMORY", KVM_CAP_USER_MEMORY),
    (
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    ),
    ("KVM_CAP_GET_TSC_KHZ", KVM_CAP_GET_TSC_KHZ),
    ("KVM_CAP_IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT),
];

/// Names of the required capabilities that `probe` (a `KVM_CHECK_EXTENSION`) reports missing.
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` answers with the supported flags and counts as present
/// only when they include `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub fn missing_capabilities(probe: impl Fn(u32) -> i32) -> Vec<&'static str> {
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|&&(_, cap)| {
            let r = probe(cap);
            if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 {
                r <= 0 || (r as u32) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0
            } else {
                r <= 0
            }
        })
        .map(|&(name, _)| name)
        .collect()
}

/// Fails with [`KvmExtError::MissingCapabilities`] naming every required capability the host
/// KVM lacks.
pub fn check_capabilities(kvm: &Kvm) -> Result<(), KvmExtError> {
    let missing = missing_capabilities(|cap| kvm.check_extension_raw(libc::c_ulong::from(cap)));
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KvmExtError::MissingCapabilities(missing))
    }
}

/// For tests (unit and integration), the one rule for KVM tests: true when `/dev/kvm` can be opened;
/// otherwise the test says it is skipped, unless `MEMVISOR_REQUIRE_KVM` is set (CI sets it where
/// `/dev/kvm` exists), in which case a KVM that cannot be used fails the test.
#[doc(hidden)]
pub fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("MEMVISOR_REQUIRE_KVM").is_none(),
            "{test}: MEMVISOR_REQUIRE_KVM is set but /dev/kvm cannot be opened"
        );
        eprintln!("SKIPPED {test}: /dev/kvm is absent on this machine");
    }
    ok
}

/// Helpers for tests that run a guest, shared with the other modules' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

    /// Opens `/dev/kvm`, or says that `test` is skipped (see [`super::kvm_usable`]).
    pub(crate) fn kvm_or_skip(test: &str) -> Option<Kvm> {
        super::kvm_usable(test).then(|| Kvm::new().expect("/dev/kvm opened just now"))
    }

    /// Runs `vcpu` in real mode from guest-physical 0 (CS and DS based at 0) until it halts;
    /// any other exit fails the test.
    pub(crate) fn run_to_hlt(vcpu: &mut VcpuFd) {
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0;
        sregs.ds.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: 0,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).unwrap();
        match vcpu.run().expect("vcpu run") {
            VcpuExit::Hlt => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{kvm_or_skip, run_to_hlt};
    use super::*;
    use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

    const PAGE: usize = 4096;

    fn set_slot(vm: &VmFd, region: &AnonMapping, flags: u32) {
        // SAFETY: the tests drop the VM before the region.
        unsafe { set_user_memory(vm, 0, flags, region) }.expect("set_user_memory_region");
    }

    #[test]
    fn missing_capabilities_names_each() {
        assert!(missing_capabilities(|_| 1).is_empty());
        let all = missing_capabilities(|_| 0);
        assert_eq!(all.len(), 4);
        // Manual protect present but without the ENABLE flag counts as missing.
        let m = missing_capabilities(|c| {
            if c == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 {
                2
            } else if c == KVM_CAP_GET_TSC_KHZ {
                0
            } else {
                1
            }
        });
        assert_eq!(
            m,
            vec!["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_GET_TSC_KHZ"]
        );
        let msg = KvmExtError::MissingCapabilities(m).to_string();
        assert!(msg.contains("KVM_CAP_GET_TSC_KHZ") && msg.contains("PROTECT2"));
    }

    #[test]
    fn host_has_required_capabilities() {
        let Some(kvm) = kvm_or_skip("host_has_required_capabilities") else {
            return;
        };
        check_capabilities(&kvm).expect("this host's KVM should have every capability");
    }

    #[test]
    fn clear_dirty_log_validates_before_ioctl() {
        let Some(kvm) = kvm_or_skip("clear_dirty_log_validates_before_ioctl") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let region = AnonMapping::new(1000 * PAGE).expect("mmap"); // not a multiple of 64 pages
        enable_manual_dirty_log_protect(&vm).unwrap();
        set_slot(&vm, &region, KVM_MEM_LOG_DIRTY_PAGES);
        let ones = vec![u64::MAX; 16];

        // Good: aligned windows, and the short last window that reaches the slot end.
        clear_dirty_log(&vm, 0, 0, 64, &ones).unwrap();
        clear_dirty_log(&vm, 0, 128, 512, &ones).unwrap();
        clear_dirty_log(&vm, 0, 960, 40, &ones).unwrap();
        clear_dirty_log(&vm, 0, 0, 1000, &ones).unwrap();
        clear_dirty_log(&vm, 0, 0, 0, &[]).unwrap();

        // Bad, caught before the ioctl.
        assert!(matches!(
            clear_dirty_log(&vm, 0, 3, 64, &ones),
            Err(KvmExtError::ClearUnalignedFirstPage { first_page: 3, .. })
        ));
        assert!(matches!(
            clear_dirty_log(&vm, 0, 0, 640, &ones[..2]),
            Err(KvmExtError::ClearBitmapTooShort {
                need: 10,
                have: 2,
                ..
            })
        ));
        // Bad in a way only KVM knows without the slot size: reported as KVM's refusal.
        let e = clear_dirty_log(&vm, 0, 64, 10, &ones).unwrap_err();
        assert!(
            matches!(e, KvmExtError::ClearDirtyLog { ref source, .. } if source.errno() == libc::EINVAL),
            "{e}"
        );
        // No such slot.
        assert!(matches!(
            clear_dirty_log(&vm, 7, 0, 64, &ones),
            Err(KvmExtError::ClearDirtyLog { .. })
        ));
        // Past the slot end: KVM's refusal.
        assert!(matches!(
            clear_dirty_log(&vm, 0, 960, 64, &ones),
            Err(KvmExtError::ClearDirtyLog { .. })
        ));
        drop(vm);
    }

    fn dirty_pages(vm: &VmFd, size: usize) -> Vec<u64> {
        let log = vm.get_dirty_log(0, size).unwrap();
        let b = crate::memory::bitmap::Bitmap::from_words(&log, (size / PAGE) as u64);
        b.iter_ones().collect()
    }

    fn manual_protect_cycle(cap_before_slot: bool) {
        let Some(kvm) = kvm_or_skip("manual_protect_cycle") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let size = 256 * PAGE;
        let region = AnonMapping::new(size).expect("mmap");
        // mov byte [0x1000], 1 ; hlt   (16-bit real mode), written through the host mapping,
        // which KVM's dirty log never sees.
        let code = [0xc6u8, 0x06, 0x00, 0x10, 0x01, 0xf4];
        for (i, &b) in code.iter().enumerate() {
            region.write_volatile(i, b);
        }
        if cap_before_slot {
            enable_manual_dirty_log_protect(&vm).unwrap();
            set_slot(&vm, &region, KVM_MEM_LOG_DIRTY_PAGES);
        } else {
            set_slot(&vm, &region, KVM_MEM_LOG_DIRTY_PAGES);
            enable_manual_dirty_log_protect(&vm).unwrap();
        }
        let mut vcpu = vm.create_vcpu(0).unwrap();
        assert!(dirty_pages(&vm, size).is_empty(), "nothing written yet");
        run_to_hlt(&mut vcpu);
        let byte = region.read_volatile(0x1000);
        assert_eq!(byte, 1, "the guest's write reached the host mapping");
        assert_eq!(dirty_pages(&vm, size), vec![1]);
        // Manual protect: reading the log does not clear it.
        assert_eq!(dirty_pages(&vm, size), vec![1]);
        // Clearing another page's bit leaves page 1 alone.
        clear_dirty_log(&vm, 0, 0, 64, &[1]).unwrap();
        assert_eq!(dirty_pages(&vm, size), vec![1]);
        // Clearing page 1's bit clears it and write-protects the page again...
        clear_dirty_log(&vm, 0, 0, 64, &[0b10]).unwrap();
        assert!(dirty_pages(&vm, size).is_empty());
        // ...so the next guest write is logged again.
        run_to_hlt(&mut vcpu);
        assert_eq!(dirty_pages(&vm, size), vec![1]);
        drop(vcpu);
        drop(vm);
    }

    #[test]
    fn manual_protect_enabled_before_slot() {
        manual_protect_cycle(true);
    }

    #[test]
    fn manual_protect_enabled_after_slot() {
        manual_protect_cycle(false);
    }
}
