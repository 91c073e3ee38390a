//! The KVM VM: guest RAM as memslot 0 with dirty logging in manual-protect mode, so the first guest
//! write to each page is logged and only `KVM_CLEAR_DIRTY_LOG` re-arms protection.
//!
//! The VM owns guest RAM (as Firecracker's `Vm` owns its regions), and a [`crate::kvm::vcpu::Vcpu`]
//! borrows the VM, so the memslot cannot outlive the mapping behind it and no vCPU can outlive the
//! VM: both hold by construction.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::kvm::ioctls;
use crate::memory::GuestRam;

/// The one memslot that holds guest RAM.
pub const RAM_SLOT: u32 = 0;
/// Where KVM may put the three-page TSS it needs on Intel (outside guest RAM).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Errors while creating or driving the VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM lacks a capability memvisor needs: {0}")]
    Capability(ioctls::KvmExtError),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("enabling manual dirty-log protection: {0}")]
    ManualProtect(ioctls::KvmExtError),
    #[error("KVM_SET_USER_MEMORY_REGION for guest RAM: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG: {0}")]
    GetDirtyLog(kvm_ioctls::Error),
    #[error("KVM_CLEAR_DIRTY_LOG: {0}")]
    ClearDirtyLog(ioctls::KvmExtError),
}

/// A VM with guest RAM registered. Fields drop in order: the VM's file descriptor (and with it the
/// memslot) before the RAM it points at.
pub struct Vm {
    fd: VmFd,
    kvm: Kvm,
    ram: GuestRam,
}

impl Vm {
    /// Opens KVM, checks capabilities, creates the VM and registers `ram` with dirty logging.
    pub fn new(ram: GuestRam) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        ioctls::check_capabilities(&kvm).map_err(VmError::Capability)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDR).map_err(VmError::SetTss)?;
        ioctls::enable_manual_dirty_log_protect(&fd).map_err(VmError::ManualProtect)?;
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_addr() as u64,
        };
        // SAFETY: the region is `ram`'s own mapping, which the VM takes ownership of below and
        // drops only after its file descriptor (field order), so the memslot never outlives it;
        // vCPUs borrow the VM, so none can keep the VM alive past that either.
        unsafe { fd.set_user_memory_region(region) }.map_err(VmError::SetMemory)?;
        Ok(Vm { fd, kvm, ram })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// KVM's dirty bitmap for guest RAM: bits stay set until cleared (manual protect).
    pub fn dirty_log(&self) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(RAM_SLOT, self.ram.size() as usize)
            .map_err(VmError::GetDirtyLog)
    }

    /// Clears the bits in `mask` (whole-slot bitmap) and write-protects those pages again.
    pub fn clear_dirty(&self, mask: &[u64]) -> Result<(), VmError> {
        ioctls::clear_dirty_log(&self.fd, RAM_SLOT, 0, self.ram.pages() as u32, mask)
            .map_err(VmError::ClearDirtyLog)
    }
}
