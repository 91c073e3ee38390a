//! userfaultfd, the few operations guest memory needs, in kvm-ioctls' style: one type for the
//! file descriptor, one short function per ioctl with a SAFETY line and an errno check. The
//! structures and numbers are those of `<linux/userfaultfd.h>` (libc does not carry them).
//!
//! The operations that put or take pages ([`Uffd::move_page`], [`Uffd::fill_missing`]) can change
//! any memory of this process under whoever holds a reference to it, so they are `unsafe fn`; the
//! safe interface is [`crate::memory::faults::Faults`], which moves only pages of guest RAM and of
//! its own stash.
//!
//! MISSING mode on anonymous memory: a registered page that has no page table entry faults to
//! this descriptor instead of being filled in, whoever touches it (a vCPU through KVM, or a VMM
//! thread), and the toucher sleeps until the page is resolved: here by `UFFDIO_COPY`, which puts a
//! copy of a page of ours into place and wakes it (`UFFDIO_MOVE` moves pages out, and back when
//! nobody touched them).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use thiserror::Error;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
/// `UFFDIO_MOVE` (Linux 6.8).
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 2;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Default)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// `struct uffd_msg` (packed, 32 bytes); only the page-fault arm is read.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_MOVE, UFFDIO, 0x05, UffdioMove);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
// `/dev/userfaultfd`'s `USERFAULTFD_IOC_NEW`.
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// Errors of userfaultfd.
#[derive(Debug, Error)]
pub enum UffdError {
    #[error(
        "cannot open a userfaultfd: the userfaultfd system call said \"{syscall}\" (it needs CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd = 1), /dev/userfaultfd said \"{device}\""
    )]
    Open {
        syscall: std::io::Error,
        device: std::io::Error,
    },
    #[error("UFFDIO_API: {0}")]
    Api(#[source] errno::Error),
    #[error("this kernel's userfaultfd lacks UFFDIO_MOVE (Linux 6.8 or later)")]
    NoMove,
    #[error("UFFDIO_REGISTER of {len} bytes at {start:#x}: {source}")]
    Register {
        start: u64,
        len: u64,
        #[source]
        source: errno::Error,
    },
    #[error("UFFDIO_WAKE of {len} bytes at {start:#x}: {source}")]
    Wake {
        start: u64,
        len: u64,
        #[source]
        source: errno::Error,
    },
    #[error("reading userfaultfd events: {0}")]
    Read(#[source] std::io::Error),
}

/// A page fault reported by the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address, page aligned.
    pub page: u64,
    /// True if the access was a write.
    pub write: bool,
    /// True if the page is present but write-protected ([`Uffd::write_protect`]).
    pub protected: bool,
}

/// A userfaultfd with `UFFDIO_MOVE`.
#[derive(Debug)]
pub struct Uffd {
    file: File,
}

impl Uffd {
    /// Opens a non-blocking userfaultfd (the system call, else `/dev/userfaultfd`) and checks that
    /// it can move pages.
    pub fn new() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd system call takes only flags and returns a new descriptor or -1.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        if fd < 0 {
            let syscall = std::io::Error::last_os_error();
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|device| UffdError::Open {
                    syscall: std::io::Error::from_raw_os_error(syscall.raw_os_error().unwrap_or(0)),
                    device,
                })?;
            // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd takes the flags by value and returns
            // a new descriptor or -1; `dev` is open for the call.
            fd = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    USERFAULTFD_IOC_NEW() as _,
                    flags as libc::c_ulong,
                )
            };
            if fd < 0 {
                return Err(UffdError::Open {
                    syscall,
                    device: std::io::Error::last_os_error(),
                });
            }
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_MOVE,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `uffdio_api`, which `api` is; the fd is ours.
        let rc = unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
        if rc < 0 {
            let e = errno::Error::last();
            return Err(if e.errno() == libc::EINVAL {
                UffdError::NoMove
            } else {
                UffdError::Api(e)
            });
        }
        if api.features & UFFD_FEATURE_MOVE == 0 {
            return Err(UffdError::NoMove);
        }
        Ok(Uffd { file })
    }

    /// The descriptor, for `poll`.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Registers `[start, start + len)` (page aligned, in an anonymous private mapping) in
    /// MISSING and WP modes (a write-protected page faults on a write: [`Uffd::write_protect`]).
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `uffdio_register`; a bad range is refused
        // with an errno, never touched by us.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut reg) };
        if rc < 0 {
            return Err(UffdError::Register {
                start,
                len,
                source: errno::Error::last(),
            });
        }
        Ok(())
    }

    /// Write-protects `[start, start + len)` (present pages of a range registered with this
    /// descriptor), or lifts the protection and wakes whoever waits on it. A write to a protected
    /// page faults to the descriptor (`Fault::protected`) instead of changing it.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), errno::Error> {
        let wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `uffdio_writeprotect`; the kernel checks the range
        // and only changes page protections, never contents.
        let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_WRITEPROTECT(), &wp) };
        if rc < 0 {
            return Err(errno::Error::last());
        }
        Ok(())
    }

    /// Wakes whoever waits on a fault in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a `uffdio_range`.
        let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_WAKE(), &range) };
        if rc < 0 {
            return Err(UffdError::Wake {
                start,
                len,
                source: errno::Error::last(),
            });
        }
        Ok(())
    }

    /// Moves the page at `src` to `dst` (which must have no page, and be registered with this
    /// descriptor, as must be the whole destination mapping), keeping its contents; wakes
    /// whoever waits on `dst` unless `wake` is false. The errno says why not: `EBUSY` for a page
    /// that cannot move (pinned, KSM-shared, part of a huge page), `ENOENT` for no page at `src`,
    /// `EEXIST` for a page already at `dst`.
    ///
    /// # Safety
    ///
    /// `[src, src + len)` and `[dst, dst + len)` must lie in anonymous private mappings of this
    /// process that stay mapped for the call and that no Rust reference covers: `src` loses its
    /// pages (it reads as missing afterwards) and `dst` gains them, which would change memory
    /// under such a reference.
    pub unsafe fn move_page(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        wake: bool,
    ) -> Result<(), errno::Error> {
        let mut mv = UffdioMove {
            dst,
            src,
            len,
            mode: if wake { 0 } else { UFFDIO_MOVE_MODE_DONTWAKE },
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes a `uffdio_move`; the kernel checks both ranges
        // (they must be in anonymous private mappings of this process) and refuses with an errno.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_MOVE(), &mut mv) };
        if rc < 0 {
            return Err(errno::Error::last());
        }
        Ok(())
    }

    /// Fills the missing page at `page` the way the kernel would have: with the shared zero page
    /// for a read, a fresh zeroed page for a write (copied from `zeros`, a zeroed page of ours);
    /// wakes whoever waits on it. `EEXIST` (someone filled it first) is success.
    ///
    /// # Safety
    ///
    /// `page` must be a page of an anonymous private mapping registered with this descriptor that
    /// no Rust reference covers (a missing page there reads as zero once filled), and `zeros` a
    /// readable page of this process that stays mapped for the call.
    pub unsafe fn fill_missing(
        &self,
        page: u64,
        write: bool,
        zeros: u64,
    ) -> Result<(), errno::Error> {
        let len = crate::units::PAGE_SIZE;
        let rc = if write {
            let mut copy = UffdioCopy {
                dst: page,
                src: zeros,
                len,
                ..Default::default()
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (a page of ours) and writes the
            // `uffdio_copy`; the kernel checks the destination.
            unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut copy) }
        } else {
            let mut zp = UffdioZeropage {
                range: UffdioRange { start: page, len },
                ..Default::default()
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes a `uffdio_zeropage`.
            unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut zp) }
        };
        if rc < 0 {
            let e = errno::Error::last();
            if e.errno() == libc::EEXIST {
                return self
                    .wake(page, len)
                    .map_err(|_| errno::Error::new(libc::EIO));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Installs a copy of the page at `src` at the missing page `page` (`UFFDIO_COPY`) and wakes
    /// whoever waits on it. `EEXIST` (a page is there already) is an error here: the caller's
    /// contents would be lost.
    ///
    /// # Safety
    ///
    /// `page` must be a page of an anonymous private mapping registered with this descriptor that
    /// no Rust reference covers, and `src` a page-aligned readable page of this process that
    /// stays mapped for the call.
    pub unsafe fn copy_page(&self, page: u64, src: u64) -> Result<(), errno::Error> {
        let mut copy = UffdioCopy {
            dst: page,
            src,
            len: crate::units::PAGE_SIZE,
            ..Default::default()
        };
        // SAFETY: UFFDIO_COPY reads one page at `src` (the caller's promise) and writes the
        // `uffdio_copy`; the kernel checks the destination.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut copy) };
        if rc < 0 {
            return Err(errno::Error::last());
        }
        Ok(())
    }

    /// The page faults queued now (none if there are none: the descriptor is non-blocking).
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<(), UffdError> {
        let mut buf = [UffdMsg::default(); 16];
        loop {
            let size = std::mem::size_of_val(&buf);
            // SAFETY: reads at most `size` bytes into `buf`, which is that large and plain data.
            let n = unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), size) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return Ok(());
                }
                return Err(UffdError::Read(e));
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            for m in &buf[..count] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    let (flags, address) = (m.flags, m.address);
                    out.push(Fault {
                        page: address & !(crate::units::PAGE_SIZE - 1),
                        write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                        protected: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                    });
                }
            }
            if count < buf.len() {
                return Ok(());
            }
        }
    }

    /// Waits up to `timeout_ms` for the descriptor to become readable.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        rc > 0 && pfd.revents & libc::POLLIN != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::pagemap::AnonMapping;

    const PAGE: u64 = crate::units::PAGE_SIZE;

    /// A userfaultfd, or `None` after saying the test is skipped (the kernel or its settings
    /// refuse one).
    fn uffd_or_skip() -> Option<Uffd> {
        Uffd::new().map_err(|e| eprintln!("SKIPPED: {e}")).ok()
    }

    #[test]
    fn a_moved_out_page_faults_to_the_handler_and_moves_back_intact() {
        let Some(uffd) = uffd_or_skip() else {
            return;
        };
        let ram = AnonMapping::new(4 * PAGE as usize).unwrap();
        let stash = AnonMapping::new(PAGE as usize).unwrap();
        let page = ram.addr() as u64 + PAGE;
        ram.write_volatile(PAGE as usize + 7, 42);
        uffd.register(page, PAGE).unwrap();
        // A move's destination must be registered too: the stash, once.
        uffd.register(stash.addr() as u64, PAGE).unwrap();
        // SAFETY: both pages are in this test's own anonymous mappings, which no reference covers
        // and which outlive the call.
        unsafe { uffd.move_page(stash.addr() as u64, page, PAGE, false) }.unwrap();
        assert_eq!(stash.read_volatile(7), 42, "the page itself moved");
        // A second thread touches the armed page: it sleeps until the page is moved back.
        let addr = ram.addr();
        let reader = std::thread::spawn(move || {
            // SAFETY: the page is inside `ram`, which outlives the join below.
            unsafe { std::ptr::read_volatile((addr + PAGE as usize + 7) as *const u8) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            assert!(uffd.wait(5000), "no fault within 5 s");
            uffd.read_faults(&mut faults).unwrap();
        }
        assert_eq!(
            faults[0],
            Fault {
                page,
                write: false,
                protected: false
            }
        );
        // SAFETY: as above.
        unsafe { uffd.move_page(page, stash.addr() as u64, PAGE, true) }.unwrap();
        assert_eq!(reader.join().unwrap(), 42);
        assert_eq!(ram.read_volatile(PAGE as usize + 7), 42, "back in place");
        // The stash is empty again: nothing more to move out of it.
        // SAFETY: as above.
        let e = unsafe { uffd.move_page(page, stash.addr() as u64, PAGE, false) }.unwrap_err();
        assert!(matches!(e.errno(), libc::ENOENT | libc::EEXIST), "{e}");
    }

    #[test]
    fn a_write_protected_page_reads_freely_and_faults_on_a_write() {
        let Some(uffd) = uffd_or_skip() else {
            return;
        };
        let ram = AnonMapping::new(2 * PAGE as usize).unwrap();
        let page = ram.addr() as u64 + PAGE;
        ram.write_volatile(PAGE as usize + 7, 42);
        uffd.register(ram.addr() as u64, 2 * PAGE).unwrap();
        uffd.write_protect(page, PAGE, true).unwrap();
        // A read goes through: no fault.
        assert_eq!(ram.read_volatile(PAGE as usize + 7), 42);
        let mut faults = Vec::new();
        uffd.read_faults(&mut faults).unwrap();
        assert!(faults.is_empty(), "{faults:?}");
        // A write from another thread sleeps until the protection is lifted.
        let addr = ram.addr();
        let writer = std::thread::spawn(move || {
            // SAFETY: the page is inside `ram`, which outlives the join below.
            unsafe { std::ptr::write_volatile((addr + PAGE as usize + 8) as *mut u8, 9) }
        });
        while faults.is_empty() {
            assert!(uffd.wait(5000), "no fault within 5 s");
            uffd.read_faults(&mut faults).unwrap();
        }
        assert_eq!(
            faults[0],
            Fault {
                page,
                write: true,
                protected: true
            }
        );
        uffd.write_protect(page, PAGE, false).unwrap();
        writer.join().unwrap();
        assert_eq!(
            ram.read_volatile(PAGE as usize + 8),
            9,
            "the write went through"
        );
        assert_eq!(ram.read_volatile(PAGE as usize + 7), 42, "contents intact");
    }
}
