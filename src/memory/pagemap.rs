//! `/proc/self/pagemap` and `mincore(2)`: which machine page (PFN) backs each page of this
//! process's memory, and which pages are resident.
//!
//! A pagemap entry is one little-endian `u64` per virtual page: bit 63 present, bit 62 swapped,
//! bit 61 file-page or shared-anonymous, bit 56 exclusively mapped, bit 55 soft-dirty, bits 0-54
//! the PFN when present (swap type and offset when swapped). Since Linux 4.2 the PFN reads as zero
//! without `CAP_SYS_ADMIN`; [`Pagemap::open`] detects that, says so once with `log::warn!`, and
//! from then on pages can only be told present or swapped ([`Pagemap::pfn_visible`] is false).
//!
//! Reads of never-written private anonymous memory map the host's shared zero page (or, in a
//! transparent-huge-page region, the huge zero page): present, not exclusive, costing no machine
//! page. [`Pagemap::open`] finds their PFNs by read-touching fresh pages of its own.
//!
//! [`Pagemap::scan`] wraps the `PAGEMAP_SCAN` ioctl (Linux 6.7+) on the same file: it walks only
//! the populated page tables of a range and returns runs of pages that share categories
//! (present, swapped, zero PFN, huge), so finding the resident pages of a sparse 64 GiB range
//! costs far less than `mincore`'s byte per page.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

/// Path of this process's pagemap.
pub const PAGEMAP_PATH: &str = "/proc/self/pagemap";
/// Per machine page (PFN), how many page table entries map it: 8 bytes per PFN (root only).
pub const KPAGECOUNT_PATH: &str = "/proc/kpagecount";
/// PFNs of gap a `/proc/kpagecount` read reads through rather than starting a new `pread`.
const COUNT_GAP_PFNS: u64 = 64;
/// Entries read by one `pread` (512 KiB).
pub const READ_CHUNK_ENTRIES: usize = 64 * 1024;
/// Pages checked by one `mincore` call (4 GiB of address space, a 1 MiB vector).
pub const MINCORE_CHUNK_PAGES: usize = 1 << 20;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// 4 KiB pages in a 2 MiB huge page.
const HUGE_PAGES: u64 = 512;

/// `PAGEMAP_SCAN` category: the page is present.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGEMAP_SCAN` category: the page is swapped.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGEMAP_SCAN` category: the page maps the zero PFN (small or huge zero page).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGEMAP_SCAN` category: THP or hugetlb backed.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// Regions returned by one `PAGEMAP_SCAN` call.
pub const SCAN_BATCH_REGIONS: usize = 4096;

/// `struct pm_scan_arg` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of `<linux/fs.h>`: addresses `start..end` share `categories`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

ioctl_iowr_nr!(PAGEMAP_SCAN, 0x66, 16, PmScanArg);

/// Errors of the pagemap and mincore readers.
#[derive(Debug, Error)]
pub enum PagemapError {
    /// Opening `/proc/self/pagemap` failed.
    #[error("opening {PAGEMAP_PATH}: {0}")]
    Open(#[source] std::io::Error),
    /// Opening or reading `/proc/kpagecount` failed.
    #[error("reading {KPAGECOUNT_PATH} at PFN {pfn:#x}: {source}")]
    Counts {
        pfn: u64,
        #[source]
        source: std::io::Error,
    },
    /// `pread` of the pagemap failed or ended early.
    #[error("reading {PAGEMAP_PATH} for {pages} pages at {vaddr:#x}: {source}")]
    Read {
        vaddr: usize,
        pages: usize,
        #[source]
        source: std::io::Error,
    },
    /// An address handed in is not page aligned.
    #[error("{what} address {addr:#x} is not aligned to the {page_size}-byte page")]
    Unaligned {
        what: &'static str,
        addr: usize,
        page_size: usize,
    },
    /// The output buffer is smaller than the request.
    #[error("{what}: output buffer holds {have} entries, {need} needed")]
    BufferTooSmall {
        what: &'static str,
        have: usize,
        need: usize,
    },
    /// The address range wraps around.
    #[error("{what}: range at {addr:#x} of {len} bytes overflows the address space")]
    Overflow {
        what: &'static str,
        addr: usize,
        len: usize,
    },
    /// `mincore` failed (ENOMEM: part of the range is not mapped).
    #[error("mincore over {len} bytes at {addr:#x}: {source}")]
    Mincore {
        addr: usize,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// Mapping the probe page for the zero-page PFN failed.
    #[error("mapping a probe page to find the zero page's PFN: {0}")]
    ProbeMap(#[source] std::io::Error),
    /// The `PAGEMAP_SCAN` ioctl failed.
    #[error("PAGEMAP_SCAN over {len} bytes at {addr:#x}: {source}")]
    Scan {
        addr: usize,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// `PAGEMAP_SCAN` stopped without progress.
    #[error("PAGEMAP_SCAN at {addr:#x} made no progress (walk ended at {walk_end:#x})")]
    ScanStalled { addr: u64, walk_end: u64 },
    /// The read-touched probe page did not show up present in the pagemap.
    #[error("the read-touched probe page is not present in {PAGEMAP_PATH} (entry {entry:#x})")]
    ProbeNotPresent { entry: u64 },
}

/// The host page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects; the result is checked.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r <= 0 { 4096 } else { r as usize }
}

/// One decoded pagemap entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageEntry(pub u64);

impl PageEntry {
    /// Bit 63: a page frame is mapped.
    pub fn present(self) -> bool {
        self.0 & PM_PRESENT != 0
    }
    /// Bit 62: the page is in swap.
    pub fn swapped(self) -> bool {
        self.0 & PM_SWAPPED != 0
    }
    /// Bit 56: mapped by this process only.
    pub fn exclusive(self) -> bool {
        self.0 & PM_EXCLUSIVE != 0
    }
    /// The PFN, when present and visible (non-zero).
    pub fn pfn(self) -> Option<u64> {
        let pfn = self.0 & PM_PFN_MASK;
        (self.present() && pfn != 0).then_some(pfn)
    }
}

/// What backs one page, as far as the pagemap can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Nothing mapped and nothing in swap.
    Absent,
    /// The shared zero page (or a page of the huge zero page).
    Zero,
    /// A machine page: its PFN, or `None` when PFNs are hidden.
    Frame(Option<u64>),
    /// In swap.
    Swapped,
}

static HIDDEN_WARNED: AtomicBool = AtomicBool::new(false);

/// Reader of `/proc/self/pagemap` with the zero-page PFNs probed.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    page_size: usize,
    pfn_visible: bool,
    /// Mask applied to every entry read (drops PFN bits when emulating an unprivileged reader).
    entry_mask: u64,
    zero_pfn: Option<u64>,
    huge_zero_pfn: Option<u64>,
    scan_supported: bool,
}

/// `/proc/kpagecount`: the mappings of each machine page, across all processes. A KSM page that
/// m guest pages map (of this VM or of any other) reads m.
#[derive(Debug)]
pub struct PageCounts {
    file: File,
    buf: Vec<u8>,
}

impl PageCounts {
    /// Opens `/proc/kpagecount` (needs `CAP_SYS_ADMIN`).
    pub fn open() -> Result<Self, PagemapError> {
        let file = File::open(KPAGECOUNT_PATH)
            .map_err(|source| PagemapError::Counts { pfn: 0, source })?;
        Ok(PageCounts {
            file,
            buf: Vec::new(),
        })
    }

    /// The mapping count of each PFN of `pfns` (ascending), in the same order: one `pread` per
    /// run of PFNs less than [`COUNT_GAP_PFNS`] apart.
    pub fn counts(&mut self, pfns: &[u64]) -> Result<Vec<u64>, PagemapError> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::with_capacity(pfns.len());
        let mut i = 0;
        while i < pfns.len() {
            let first = pfns[i];
            let mut j = i + 1;
            while j < pfns.len()
                && pfns[j] >= pfns[j - 1]
                && pfns[j] - pfns[j - 1] <= COUNT_GAP_PFNS
                && pfns[j] - first < READ_CHUNK_ENTRIES as u64
            {
                j += 1;
            }
            let span = (pfns[j - 1] - first + 1) as usize;
            self.buf.resize(span * 8, 0);
            let err = |source| PagemapError::Counts { pfn: first, source };
            let off = first
                .checked_mul(8)
                .ok_or_else(|| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
            self.file.read_exact_at(&mut self.buf, off).map_err(err)?;
            for &pfn in &pfns[i..j] {
                let at = ((pfn - first) * 8) as usize;
                let word: [u8; 8] = self.buf[at..at + 8].try_into().expect("8 bytes");
                out.push(u64::from_ne_bytes(word));
            }
            i = j;
        }
        Ok(out)
    }
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`, probes the zero page's PFN and whether PFNs are visible.
    pub fn open() -> Result<Self, PagemapError> {
        Self::open_inner(false)
    }

    /// Like [`Pagemap::open`], but reads as an unprivileged process would (every PFN zero), to
    /// exercise the degraded path.
    pub fn open_without_pfns() -> Result<Self, PagemapError> {
        Self::open_inner(true)
    }

    fn open_inner(hide_pfns: bool) -> Result<Self, PagemapError> {
        let file = File::open(PAGEMAP_PATH).map_err(PagemapError::Open)?;
        let mut pm = Pagemap {
            file,
            page_size: page_size(),
            pfn_visible: false,
            entry_mask: if hide_pfns { !PM_PFN_MASK } else { u64::MAX },
            zero_pfn: None,
            huge_zero_pfn: None,
            scan_supported: false,
        };
        let probe = AnonMapping::new(pm.page_size).map_err(PagemapError::ProbeMap)?;
        let entry = pm.read_touch(&probe, 0)?;
        let mut buf = Vec::new();
        let mut found = 0u64;
        // Probe PAGEMAP_SCAN on the page just read: it must report it present.
        pm.scan_supported = true;
        match pm.scan(probe.addr(), 1, PAGE_IS_PRESENT, &mut buf, |r| {
            found += (r.end - r.start) / pm.page_size as u64
        }) {
            Ok(()) if found == 1 => {}
            r => {
                log::debug!("pagemap: PAGEMAP_SCAN unusable ({r:?}, {found} pages): mincore only");
                pm.scan_supported = false;
            }
        }
        match entry.pfn() {
            Some(pfn) => {
                pm.pfn_visible = true;
                pm.zero_pfn = Some(pfn);
                pm.huge_zero_pfn = pm.probe_huge_zero(pfn);
                log::debug!(
                    "pagemap: zero page PFN {pfn:#x}, huge zero page PFN {:?}",
                    pm.huge_zero_pfn
                );
            }
            None => {
                if !HIDDEN_WARNED.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "pagemap: PFNs read as zero (no CAP_SYS_ADMIN?): pages are told only \
                         present or swapped; the map counts never-written pages as zero pages \
                         and cannot see sharing"
                    );
                }
            }
        }
        Ok(pm)
    }

    /// Finds the huge zero page's first PFN by read-touching a 2 MiB-aligned, MADV_HUGEPAGE
    /// region; `None` when THP does not give one (then reads map the small zero page).
    fn probe_huge_zero(&self, zero_pfn: u64) -> Option<u64> {
        let huge = HUGE_PAGES as usize * self.page_size;
        let probe = AnonMapping::new(2 * huge).ok()?;
        let aligned = probe.addr().next_multiple_of(huge);
        let off = aligned - probe.addr();
        // SAFETY: madvise on a range inside our own live mapping; failure is harmless.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, huge, libc::MADV_HUGEPAGE);
        }
        let e = self.read_touch(&probe, off).ok()?;
        let pfn = e.pfn()?;
        (pfn != zero_pfn && !e.exclusive() && pfn % HUGE_PAGES == 0).then_some(pfn)
    }

    /// Reads one byte of `probe` at `off` (never writes) and returns that page's entry, which
    /// must be present.
    fn read_touch(&self, probe: &AnonMapping, off: usize) -> Result<PageEntry, PagemapError> {
        if off >= probe.len() {
            return Err(PagemapError::ProbeNotPresent { entry: 0 });
        }
        probe.read_volatile(off);
        let e = self.entry(probe.addr() + off / self.page_size * self.page_size)?;
        if e.present() {
            Ok(e)
        } else {
            Err(PagemapError::ProbeNotPresent { entry: e.0 })
        }
    }

    /// Whether PFNs are visible (false: every present page reads as PFN zero).
    pub fn pfn_visible(&self) -> bool {
        self.pfn_visible
    }

    /// Whether the `PAGEMAP_SCAN` ioctl works here (Linux 6.7+).
    pub fn scan_supported(&self) -> bool {
        self.scan_supported
    }

    /// `PAGEMAP_SCAN` over `pages` pages from `vaddr` (page aligned): calls `f` with each run of
    /// pages whose categories include all of `required` (`PAGE_IS_*`), in ascending order, with
    /// `categories` limited to present, swapped, zero-PFN and huge. Adjacent runs may be
    /// reported separately. `buf` is scratch space whose length is the batch size (regions per
    /// ioctl); an empty one is grown to [`SCAN_BATCH_REGIONS`].
    pub fn scan(
        &self,
        vaddr: usize,
        pages: usize,
        required: u64,
        buf: &mut Vec<PageRegion>,
        f: impl FnMut(&PageRegion),
    ) -> Result<(), PagemapError> {
        self.scan_masks(vaddr, pages, (required, 0), buf, f)
            .map(|_| ())
    }

    /// [`Pagemap::scan`] for runs of pages whose categories include any of `any_of` (each run's
    /// `categories` says which); returns how many ioctls it took.
    pub fn scan_any(
        &self,
        vaddr: usize,
        pages: usize,
        any_of: u64,
        buf: &mut Vec<PageRegion>,
        f: impl FnMut(&PageRegion),
    ) -> Result<u64, PagemapError> {
        self.scan_masks(vaddr, pages, (0, any_of), buf, f)
    }

    /// `PAGEMAP_SCAN` with `(category_mask, category_anyof_mask)`; returns the ioctls made.
    fn scan_masks(
        &self,
        vaddr: usize,
        pages: usize,
        (required, any_of): (u64, u64),
        buf: &mut Vec<PageRegion>,
        mut f: impl FnMut(&PageRegion),
    ) -> Result<u64, PagemapError> {
        if !vaddr.is_multiple_of(self.page_size) {
            return Err(PagemapError::Unaligned {
                what: "PAGEMAP_SCAN",
                addr: vaddr,
                page_size: self.page_size,
            });
        }
        let len = pages.saturating_mul(self.page_size);
        let Some(end) = vaddr.checked_add(len) else {
            return Err(PagemapError::Overflow {
                what: "PAGEMAP_SCAN",
                addr: vaddr,
                len,
            });
        };
        if !self.scan_supported {
            return Err(PagemapError::Scan {
                addr: vaddr,
                len,
                source: std::io::ErrorKind::Unsupported.into(),
            });
        }
        if buf.is_empty() {
            buf.resize(SCAN_BATCH_REGIONS, PageRegion::default());
        }
        let mut start = vaddr as u64;
        let end = end as u64;
        let mut ioctls = 0u64;
        while start < end {
            ioctls += 1;
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start,
                end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_mask: required,
                category_anyof_mask: any_of,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
                ..Default::default()
            };
            // SAFETY: the fd is a pagemap; `arg` is a valid pm_scan_arg whose `vec` points to
            // `buf`, which holds `vec_len` page_region entries the kernel may write; the kernel
            // only reads page tables of our own address space.
            let r = unsafe { ioctl_with_mut_ref(&self.file, PAGEMAP_SCAN(), &mut arg) };
            if r < 0 {
                return Err(PagemapError::Scan {
                    addr: start as usize,
                    len: (end - start) as usize,
                    source: std::io::Error::last_os_error(),
                });
            }
            for region in &buf[..(r as usize).min(buf.len())] {
                f(region);
            }
            if arg.walk_end >= end {
                break;
            }
            if arg.walk_end <= start {
                return Err(PagemapError::ScanStalled {
                    addr: start,
                    walk_end: arg.walk_end,
                });
            }
            start = arg.walk_end;
        }
        Ok(ioctls)
    }

    /// The page size the entries describe.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Whether `pfn` is (part of) a zero page.
    pub fn is_zero_pfn(&self, pfn: u64) -> bool {
        Some(pfn) == self.zero_pfn
            || self
                .huge_zero_pfn
                .is_some_and(|h| (h..h + HUGE_PAGES).contains(&pfn))
    }

    /// Classifies an entry read by this reader.
    pub fn classify(&self, e: PageEntry) -> Residency {
        if e.present() {
            match e.pfn() {
                Some(pfn) if self.is_zero_pfn(pfn) => Residency::Zero,
                pfn => Residency::Frame(pfn),
            }
        } else if e.swapped() {
            Residency::Swapped
        } else {
            Residency::Absent
        }
    }

    /// Reads the entries of `pages` pages from `vaddr` (page aligned) into `out[..pages]`, with
    /// `pread`s of up to [`READ_CHUNK_ENTRIES`] entries. Unmapped addresses read as zero entries.
    pub fn read(&self, vaddr: usize, pages: usize, out: &mut [u64]) -> Result<(), PagemapError> {
        if !vaddr.is_multiple_of(self.page_size) {
            return Err(PagemapError::Unaligned {
                what: "pagemap read",
                addr: vaddr,
                page_size: self.page_size,
            });
        }
        if out.len() < pages {
            return Err(PagemapError::BufferTooSmall {
                what: "pagemap read",
                have: out.len(),
                need: pages,
            });
        }
        if pages
            .checked_mul(self.page_size)
            .and_then(|l| vaddr.checked_add(l))
            .is_none()
        {
            return Err(PagemapError::Overflow {
                what: "pagemap read",
                addr: vaddr,
                len: pages.saturating_mul(self.page_size),
            });
        }
        let first = vaddr / self.page_size;
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(READ_CHUNK_ENTRIES);
            let buf = &mut out[done..done + n];
            let offset = ((first + done) * 8) as libc::off_t;
            let bytes = n * 8;
            // SAFETY: `buf` is a live, exclusively borrowed buffer of `bytes` bytes; pread writes
            // at most that many.
            let r = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    bytes,
                    offset,
                )
            };
            let err = |source| PagemapError::Read {
                vaddr: vaddr + done * self.page_size,
                pages: n,
                source,
            };
            if r < 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
            // Short reads end on an entry boundary; a zero-length read means no more entries.
            let got = r as usize / 8;
            if got == 0 {
                return Err(err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            for x in &mut buf[..got] {
                *x = u64::from_le(*x) & self.entry_mask;
            }
            done += got;
        }
        Ok(())
    }

    /// The entry of one page.
    pub fn entry(&self, vaddr: usize) -> Result<PageEntry, PagemapError> {
        let mut e = [0u64; 1];
        self.read(vaddr, 1, &mut e)?;
        Ok(PageEntry(e[0]))
    }
}

/// `mincore(2)` over `len` bytes at `addr` (page aligned): `out[i] & 1` tells whether page `i` is
/// resident (zero-page mappings count). Fails with ENOMEM when part of the range is unmapped.
pub fn mincore(addr: usize, len: usize, out: &mut [u8]) -> Result<(), PagemapError> {
    let ps = page_size();
    if !addr.is_multiple_of(ps) {
        return Err(PagemapError::Unaligned {
            what: "mincore",
            addr,
            page_size: ps,
        });
    }
    if addr.checked_add(len).is_none() {
        return Err(PagemapError::Overflow {
            what: "mincore",
            addr,
            len,
        });
    }
    let need = len.div_ceil(ps);
    if out.len() < need {
        return Err(PagemapError::BufferTooSmall {
            what: "mincore",
            have: out.len(),
            need,
        });
    }
    if len == 0 {
        return Ok(());
    }
    // SAFETY: mincore only inspects the page tables of the range and writes `need` bytes to
    // `out`, which is at least that long.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, out.as_mut_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(PagemapError::Mincore {
            addr,
            len,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// A private anonymous read-write mapping, `MAP_NORESERVE` so that a large one costs nothing
/// until touched; unmapped on drop. Its pages read as zero until written.
#[derive(Debug)]
pub struct AnonMapping {
    addr: *mut u8,
    len: usize,
}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to whole pages by the kernel; `len == 0` fails with EINVAL).
    pub fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping that aliases nothing; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AnonMapping {
            addr: addr.cast(),
            len,
        })
    }

    /// The start address (page aligned).
    pub fn addr(&self) -> usize {
        self.addr as usize
    }

    /// The length asked for, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty mapping cannot be made.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start as a raw pointer, valid for reads and writes of [`Self::len`] bytes while
    /// `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Reads the byte at `off` with a volatile read (never elided, so it maps the page if it
    /// was not).
    ///
    /// # Panics
    ///
    /// When `off` is not below [`Self::len`].
    pub fn read_volatile(&self, off: usize) -> u8 {
        assert!(
            off < self.len,
            "offset {off} past a {}-byte mapping",
            self.len
        );
        // SAFETY: `off` is inside our live, readable mapping; nothing holds a Rust reference
        // into it (only raw pointers are handed out).
        unsafe { self.addr.add(off).read_volatile() }
    }

    /// Writes `val` to the byte at `off` with a volatile write.
    ///
    /// # Panics
    ///
    /// When `off` is not below [`Self::len`].
    pub fn write_volatile(&self, off: usize, val: u8) {
        assert!(
            off < self.len,
            "offset {off} past a {}-byte mapping",
            self.len
        );
        // SAFETY: `off` is inside our live, writable mapping; nothing holds a Rust reference
        // into it (only raw pointers are handed out).
        unsafe { self.addr.add(off).write_volatile(val) }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our own mapping; no reference into it outlives self (users of
        // the raw pointer, a KVM memslot for one, must be gone first).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a byte to page `page` of `m`.
    fn write_page(m: &AnonMapping, page: usize) {
        m.write_volatile(page * page_size(), 0xa5);
    }

    /// Reads the first byte of page `page` of `m`.
    fn read_page(m: &AnonMapping, page: usize) -> u8 {
        m.read_volatile(page * page_size())
    }

    #[test]
    fn entry_bits_decode() {
        let e = PageEntry(PM_PRESENT | PM_EXCLUSIVE | 0x1234);
        assert!(e.present() && e.exclusive() && !e.swapped());
        assert_eq!(e.pfn(), Some(0x1234));
        let s = PageEntry(PM_SWAPPED | 0x55);
        assert!(s.swapped() && !s.present());
        assert_eq!(s.pfn(), None, "a swap entry's offset is not a PFN");
        assert_eq!(PageEntry(PM_PRESENT).pfn(), None, "hidden PFN");
    }

    #[test]
    fn own_memory_written_read_untouched() {
        let pm = Pagemap::open().unwrap();
        let ps = page_size();
        let r = AnonMapping::new(16 * ps).expect("mmap");
        for p in 0..4 {
            write_page(&r, p);
        }
        for p in 4..8 {
            assert_eq!(read_page(&r, p), 0);
        }
        let mut e = vec![0u64; 16];
        pm.read(r.addr(), 16, &mut e).unwrap();
        let e: Vec<PageEntry> = e.into_iter().map(PageEntry).collect();
        if pm.pfn_visible() {
            let zero = pm.zero_pfn.unwrap();
            let mut pfns = Vec::new();
            for x in &e[0..4] {
                assert!(x.present() && x.exclusive(), "{x:?}");
                let pfn = x.pfn().unwrap();
                assert_ne!(pfn, zero);
                assert_eq!(pm.classify(*x), Residency::Frame(Some(pfn)));
                pfns.push(pfn);
            }
            pfns.sort_unstable();
            pfns.dedup();
            assert_eq!(pfns.len(), 4, "written pages have distinct frames");
            for x in &e[4..8] {
                assert!(x.present() && !x.exclusive(), "{x:?}");
                assert_eq!(x.pfn(), Some(zero));
                assert_eq!(pm.classify(*x), Residency::Zero);
            }
        }
        for x in &e[8..] {
            assert!(!x.present() && !x.swapped());
            assert_eq!(pm.classify(*x), Residency::Absent);
        }
        let mut v = vec![0u8; 16];
        mincore(r.addr(), 16 * ps, &mut v).unwrap();
        let resident: Vec<bool> = v.iter().map(|b| b & 1 != 0).collect();
        assert!(
            resident[..8].iter().all(|&b| b),
            "written and read pages are resident"
        );
        assert!(resident[8..].iter().all(|&b| !b));
    }

    #[test]
    fn read_spans_chunks() {
        let pm = Pagemap::open().unwrap();
        let ps = page_size();
        let pages = READ_CHUNK_ENTRIES + 100;
        let r = AnonMapping::new(pages * ps).expect("mmap");
        write_page(&r, 0);
        write_page(&r, READ_CHUNK_ENTRIES - 1);
        write_page(&r, READ_CHUNK_ENTRIES);
        write_page(&r, pages - 1);
        let mut e = vec![0u64; pages];
        pm.read(r.addr(), pages, &mut e).unwrap();
        let present: Vec<usize> = (0..pages).filter(|&i| PageEntry(e[i]).present()).collect();
        assert_eq!(
            present,
            vec![0, READ_CHUNK_ENTRIES - 1, READ_CHUNK_ENTRIES, pages - 1]
        );
    }

    #[test]
    fn scan_finds_runs_and_zero_pages() {
        let pm = Pagemap::open().unwrap();
        assert!(pm.scan_supported(), "this host's kernel has PAGEMAP_SCAN");
        let ps = page_size();
        let pages = 2 * READ_CHUNK_ENTRIES;
        let r = AnonMapping::new(pages * ps).expect("mmap");
        for p in [3usize, 4, 5, 100, pages - 1] {
            write_page(&r, p);
        }
        read_page(&r, 6);
        read_page(&r, 50);
        let base = r.addr() as u64;
        // A batch of one region forces the ioctl loop to go round.
        let mut buf = vec![PageRegion::default(); 1];
        let mut runs = Vec::new();
        pm.scan(r.addr(), pages, PAGE_IS_PRESENT, &mut buf, |g| {
            runs.push((
                (g.start - base) / ps as u64,
                (g.end - base) / ps as u64,
                g.categories & PAGE_IS_PFNZERO != 0,
            ))
        })
        .unwrap();
        assert!(runs.len() >= 5);
        // Merge adjacent runs with the same zero-ness for comparison.
        let mut merged: Vec<(u64, u64, bool)> = Vec::new();
        for x in runs {
            match merged.last_mut() {
                Some(l) if l.1 == x.0 && l.2 == x.2 => l.1 = x.1,
                _ => merged.push(x),
            }
        }
        let last = pages as u64 - 1;
        assert_eq!(
            merged,
            vec![
                (3, 6, false),
                (6, 7, true),
                (50, 51, true),
                (100, 101, false),
                (last, last + 1, false)
            ]
        );
        assert!(matches!(
            pm.scan(1, 1, PAGE_IS_PRESENT, &mut buf, |_| {}),
            Err(PagemapError::Unaligned { .. })
        ));
        // An unmapped range has nothing present.
        let mut n = 0;
        pm.scan(0, 16, PAGE_IS_PRESENT, &mut buf, |_| n += 1)
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn hidden_pfns_degrade() {
        let pm = Pagemap::open_without_pfns().unwrap();
        assert!(!pm.pfn_visible());
        assert_eq!(pm.zero_pfn, None);
        let r = AnonMapping::new(2 * page_size()).expect("mmap");
        write_page(&r, 0);
        read_page(&r, 1);
        let e0 = pm.entry(r.addr()).unwrap();
        let e1 = pm.entry(r.addr() + page_size()).unwrap();
        assert_eq!(pm.classify(e0), Residency::Frame(None));
        assert_eq!(pm.classify(e1), Residency::Frame(None));
    }

    #[test]
    fn bad_input_is_an_error() {
        let pm = Pagemap::open().unwrap();
        let mut e = [0u64; 4];
        assert!(matches!(
            pm.read(1, 1, &mut e),
            Err(PagemapError::Unaligned { .. })
        ));
        assert!(matches!(
            pm.read(0, 5, &mut e),
            Err(PagemapError::BufferTooSmall { .. })
        ));
        assert!(matches!(
            pm.read(usize::MAX - 4095, 4, &mut e),
            Err(PagemapError::Overflow { .. })
        ));
        let mut v = [0u8; 4];
        assert!(matches!(
            mincore(1, 4096, &mut v),
            Err(PagemapError::Unaligned { .. })
        ));
        assert!(matches!(
            mincore(0, 5 * 4096, &mut v),
            Err(PagemapError::BufferTooSmall { .. })
        ));
        // Page 0 is never mapped.
        assert!(matches!(
            mincore(0, 4096, &mut v),
            Err(PagemapError::Mincore { .. })
        ));
        // Reading the pagemap of unmapped memory is fine: not present.
        assert!(!pm.entry(0).unwrap().present());
    }
}
