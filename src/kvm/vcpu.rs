//! One vCPU entering the guest directly in 64-bit long mode, and the translation of KVM exits into
//! [`Exit`], which the VMM's exit handler consumes (and unit tests can synthesise).
//!
//! A vCPU thread is kicked out of `KVM_RUN` by a signal whose handler sets `kvm_run.immediate_exit`,
//! so a kick that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Once;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use crate::contract::abi;
use crate::kvm::boot::CpuTables;
use crate::kvm::gdt;
use crate::kvm::vm::Vm;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors while creating or running a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    GetCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_REGS: {0}")]
    GetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_TSC_KHZ: {0}")]
    TscKhz(kvm_ioctls::Error),
    #[error("KVM_RUN: {0}")]
    Run(kvm_ioctls::Error),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// A VM exit, owned by the exit handler until the next `run`.
#[derive(Debug)]
pub enum Exit<'a> {
    /// `out` to a port.
    IoOut { port: u16, data: &'a [u8] },
    /// `in` from a port; fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// MMIO read outside RAM; fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// MMIO write outside RAM.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// `hlt` with interrupts off: the guest has stopped.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// `KVM_RUN` was interrupted by a kick.
    Interrupted,
    /// VM entry failed.
    FailEntry(u64),
    /// KVM could not handle something (e.g. emulation failure).
    InternalError,
    /// Any other exit.
    Other(String),
}

thread_local! {
    // The running vCPU's kvm_run, for the kick handler. Const-initialised without Drop, so it is
    // safe to touch from a signal handler.
    static KICK_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KICK_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU kvm_run mapping, set in `Vcpu::new` and
        // cleared when the vCPU is dropped; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::Signal);
    });
    result
}

/// Sends the kick signal to a thread (`libc::pthread_self()` of the vCPU thread).
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill only queues a signal; a stale thread id yields ESRCH, ignored.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// A vCPU in long mode. It borrows its VM, so it cannot outlive it.
pub struct Vcpu<'vm> {
    fd: VcpuFd,
    run: *mut kvm_run,
    _vm: PhantomData<&'vm Vm>,
}

impl<'vm> Vcpu<'vm> {
    /// Creates vCPU `id` on the calling thread, ready to run from `entry` in long mode with the
    /// descriptor and page tables that `boot` wrote (`tables`).
    pub fn new(vm: &'vm Vm, id: u64, entry: u64, tables: &CpuTables) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let mut fd = vm.fd().create_vcpu(id).map_err(VcpuError::Create)?;
        let cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::GetCpuid)?;
        fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;

        let mut sregs = fd.get_sregs().map_err(VcpuError::GetSregs)?;
        let seg = |selector| gdt::segment(&tables.gdt, selector);
        sregs.cs = seg(abi::SEL_KERNEL_CODE);
        let data = seg(abi::SEL_KERNEL_DATA);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = seg(abi::SEL_TSS);
        // LTR marks the TSS busy; VM entry insists on a busy TSS in TR.
        sregs.tr.type_ |= 0x2;
        sregs.gdt.base = tables.gdt_addr;
        sregs.gdt.limit = gdt::limit();
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = tables.cr3;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_SCE | EFER_LME | EFER_LMA;
        fd.set_sregs(&sregs).map_err(VcpuError::SetSregs)?;

        let regs = kvm_regs {
            rip: entry,
            rflags: 0x2,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(VcpuError::SetRegs)?;

        let run = fd.get_kvm_run() as *mut kvm_run;
        KICK_RUN.with(|r| r.set(run));
        Ok(Vcpu {
            fd,
            run,
            _vm: PhantomData,
        })
    }

    /// The guest's TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd.get_tsc_khz().map_err(VcpuError::TscKhz)
    }

    /// The guest's RIP, for error messages.
    pub fn rip(&self) -> Result<u64, VcpuError> {
        Ok(self.fd.get_regs().map_err(VcpuError::GetRegs)?.rip)
    }

    /// Runs until the next exit.
    pub fn run(&mut self) -> Result<Exit<'_>, VcpuError> {
        let run = self.run;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoOut(port, data) => Exit::IoOut { port, data },
                VcpuExit::IoIn(port, data) => Exit::IoIn { port, data },
                VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
                VcpuExit::Hlt => Exit::Hlt,
                VcpuExit::Shutdown => Exit::Shutdown,
                VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
                VcpuExit::InternalError => Exit::InternalError,
                VcpuExit::Intr => Exit::Interrupted,
                other => Exit::Other(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run` is this vCPU's kvm_run mapping, valid while `self.fd` lives.
                unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(VcpuError::Run(e)),
        }
    }
}

impl Drop for Vcpu<'_> {
    fn drop(&mut self) {
        KICK_RUN.with(|r| {
            if r.get() == self.run {
                r.set(std::ptr::null_mut())
            }
        });
    }
}
