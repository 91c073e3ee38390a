//! Preparing guest RAM for the first instruction: load the guest's ELF image, then write the
//! GDT and TSS and the identity page tables (whose addresses the vCPU takes from [`CpuTables`]),
//! and the boot-info page (see `docs/abi.md`).

use std::io::Cursor;
use std::path::Path;

use std::mem::size_of;

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::{Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, GuestAddress};

use crate::contract::abi::{self, BootInfo, PhaseEntry};
use crate::kvm::gdt;
use crate::memory::{GuestRam, MemoryError};
use crate::units::fmt_mib;

/// The test guest built from `guest/` by this crate's build script.
pub static DEFAULT_GUEST: &[u8] = include_bytes!(env!("MEMVISOR_GUEST_ELF"));

/// Errors while preparing the guest.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read guest image {path}: {source}")]
    ReadImage {
        path: String,
        source: std::io::Error,
    },
    #[error("guest image is empty")]
    Empty,
    #[error("guest image is not a 64-bit little-endian x86-64 ELF executable ({0})")]
    NotElf(&'static str),
    #[error("guest image is truncated: {0}")]
    Truncated(String),
    #[error("guest image is too big for its RAM: {0}")]
    TooBig(String),
    #[error(
        "guest image segment {index} at {start:#x}..{end:#x} is outside the kernel area {min:#x}..{max:#x}"
    )]
    BadSegment {
        index: usize,
        start: u64,
        end: u64,
        min: u64,
        max: u64,
    },
    #[error("guest image entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    #[error("loading guest image: {0}")]
    Load(String),
    #[error("writing boot structures: {0}")]
    Memory(#[from] MemoryError),
}

/// Where the image landed.
#[derive(Clone, Copy, Debug)]
pub struct LoadedImage {
    pub entry: u64,
    pub end: u64,
}

/// The first bytes of every ELF file.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Reads a guest image of at most `max_bytes` bytes (the guest's RAM) from a file.
///
/// Checks before it reads: the path (symlinks followed) must be a regular file, so a FIFO, a
/// device such as `/dev/zero` or a directory is refused without reading; the file must fit in
/// `max_bytes` and start with the ELF magic. It is opened with `O_NONBLOCK`, so a path swapped for
/// a FIFO after the check cannot block either, and the read stops at `max_bytes` whatever the file
/// does meanwhile.
pub fn read_image(path: &Path, max_bytes: u64) -> Result<Vec<u8>, BootError> {
    use std::fs::{File, Metadata, OpenOptions};
    use std::io::{self, Read};
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let io_err = |source| BootError::ReadImage {
        path: path.display().to_string(),
        source,
    };
    let check_type = |meta: &Metadata| {
        let t = meta.file_type();
        let what = if t.is_file() {
            return Ok(());
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        Err(io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({what})"),
        )))
    };
    let too_big = |len: Option<u64>| {
        let holds = match len {
            Some(len) => format!("holds {} ({len} bytes)", fmt_mib(len)),
            None => "grew while being read to".into(),
        };
        BootError::TooBig(format!(
            "the file {holds}, more than the guest's {} of RAM",
            fmt_mib(max_bytes)
        ))
    };

    check_type(&std::fs::metadata(path).map_err(io_err)?)?;
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err)?;
    // The same checks on what was opened, in case the path changed since.
    let meta = file.metadata().map_err(io_err)?;
    check_type(&meta)?;
    if meta.len() > max_bytes {
        return Err(too_big(Some(meta.len())));
    }

    let mut reader = file.take(max_bytes.saturating_add(1));
    let mut image = Vec::new();
    (&mut reader)
        .take(ELF_MAGIC.len() as u64)
        .read_to_end(&mut image)
        .map_err(io_err)?;
    if image.is_empty() {
        return Err(BootError::Empty);
    }
    if image.as_slice() != ELF_MAGIC {
        return Err(BootError::NotElf("no ELF magic"));
    }
    image.reserve(
        usize::try_from(meta.len())
            .unwrap_or(0)
            .saturating_sub(image.len()),
    );
    reader.read_to_end(&mut image).map_err(io_err)?;
    if image.len() as u64 > max_bytes {
        return Err(too_big(None));
    }
    Ok(image)
}

#[cfg(test)]
mod read_image_tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    /// `read_image` on another thread, failing the test instead of hanging if it blocks.
    fn read_bounded(path: PathBuf, max_bytes: u64) -> Result<Vec<u8>, BootError> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_image(&path, max_bytes));
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("read_image blocked for 30 s")
    }

    fn not_regular(r: Result<Vec<u8>, BootError>, what: &str) {
        let e = r.expect_err("accepted a non-regular file");
        let msg = e.to_string();
        assert!(matches!(e, BootError::ReadImage { .. }), "{msg}");
        assert!(
            msg.contains("not a regular file") && msg.contains(what),
            "{msg}"
        );
    }

    #[test]
    fn reads_a_regular_elf_file_and_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("guest.elf");
        std::fs::write(&p, DEFAULT_GUEST).unwrap();
        let len = DEFAULT_GUEST.len() as u64;
        assert_eq!(read_bounded(p.clone(), 256 * MIB).unwrap(), DEFAULT_GUEST);
        // Exactly at the cap is fine; one byte over is not.
        assert_eq!(read_bounded(p.clone(), len).unwrap(), DEFAULT_GUEST);
        let e = read_bounded(p.clone(), len - 1).unwrap_err();
        assert!(matches!(e, BootError::TooBig(_)), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_bounded(link, 256 * MIB).unwrap(), DEFAULT_GUEST);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
        not_regular(read_bounded(p.clone(), 256 * MIB), "a FIFO");
        // Through a symlink too.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        not_regular(read_bounded(link, 256 * MIB), "a FIFO");
    }

    #[test]
    fn devices_and_directories_are_refused() {
        not_regular(
            read_bounded("/dev/zero".into(), 256 * MIB),
            "character device",
        );
        let dir = tempfile::tempdir().unwrap();
        not_regular(read_bounded(dir.path().into(), 256 * MIB), "a directory");
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        not_regular(read_bounded(link, 256 * MIB), "character device");
        let e = read_bounded(dir.path().join("absent"), 256 * MIB).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }

    #[test]
    fn a_sparse_file_beyond_the_cap_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.elf");
        let f = std::fs::File::create(&p).unwrap();
        std::io::Write::write_all(&mut &f, ELF_MAGIC).unwrap();
        f.set_len(4 << 30).unwrap();
        let e = read_bounded(p, 256 * MIB).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BootError::TooBig(_)), "{msg}");
        assert!(
            msg.contains("4096.0 MiB") && msg.contains("256.0 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_without_elf_magic_is_refused_from_its_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // 64 GiB of holes under an unlimited cap: reading it all would run out of memory.
        let p = dir.path().join("huge.txt");
        let f = std::fs::File::create(&p).unwrap();
        std::io::Write::write_all(&mut &f, b"#!/bin/sh\n").unwrap();
        f.set_len(64 << 30).unwrap();
        let e = read_bounded(p, u64::MAX).unwrap_err();
        assert!(matches!(e, BootError::NotElf("no ELF magic")), "{e}");
        // Shorter than the magic, and empty.
        let short = dir.path().join("short");
        std::fs::write(&short, b"\x7fEL").unwrap();
        let e = read_bounded(short, 256 * MIB).unwrap_err();
        assert!(matches!(e, BootError::NotElf(_)), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = read_bounded(empty, 256 * MIB).unwrap_err();
        assert!(matches!(e, BootError::Empty), "{e}");
    }
}

/// A plain structure copied out of `bytes` at `off`, if it fits.
fn struct_at<T: ByteValued + Default>(bytes: &[u8], off: u64) -> Option<T> {
    let off = usize::try_from(off).ok()?;
    let src = bytes.get(off..off.checked_add(size_of::<T>())?)?;
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(src);
    Some(v)
}

/// Checks an ELF image against guest RAM before anything is written, so that a truncated or
/// oversized image gets a precise message. Returns the entry point and the highest loaded byte.
pub fn check_image(image: &[u8], ram_bytes: u64) -> Result<LoadedImage, BootError> {
    const EHDR: usize = size_of::<Elf64_Ehdr>();
    const PHDR: usize = size_of::<Elf64_Phdr>();
    if image.is_empty() {
        return Err(BootError::Empty);
    }
    if !image.starts_with(ELF_MAGIC) {
        return Err(BootError::NotElf("no ELF magic"));
    }
    let Some(eh) = struct_at::<Elf64_Ehdr>(image, 0) else {
        return Err(BootError::Truncated(format!(
            "{} bytes, an ELF header needs {EHDR}",
            image.len()
        )));
    };
    if eh.e_ident[4] != 2 || eh.e_ident[5] != 1 {
        return Err(BootError::NotElf("not ELF64 little-endian"));
    }
    if eh.e_machine != 62 {
        return Err(BootError::NotElf("machine is not x86-64"));
    }
    if usize::from(eh.e_phentsize) != PHDR {
        return Err(BootError::NotElf("unexpected program header size"));
    }
    let phnum = u64::from(eh.e_phnum);
    let ph_end = eh.e_phoff.saturating_add(phnum * PHDR as u64);
    if ph_end > image.len() as u64 {
        return Err(BootError::Truncated(format!(
            "program headers end at byte {ph_end}, the file has {}",
            image.len()
        )));
    }
    let entry = eh.e_entry;
    let max = ram_bytes.min(abi::KERNEL_MAX_ADDR);
    let mut end = 0u64;
    let mut entry_ok = false;
    for index in 0..phnum {
        let ph: Elf64_Phdr = struct_at(image, eh.e_phoff + index * PHDR as u64)
            .expect("within the program headers checked above");
        let index = index as usize;
        if ph.p_type != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz) = (ph.p_offset, ph.p_paddr, ph.p_filesz);
        let memsz = ph.p_memsz.max(filesz);
        let file_end = offset.saturating_add(filesz);
        if file_end > image.len() as u64 {
            return Err(BootError::Truncated(format!(
                "segment {index} needs file bytes {offset}..{file_end}, the file has {}",
                image.len()
            )));
        }
        let seg_end = paddr.saturating_add(memsz);
        if seg_end > ram_bytes {
            return Err(BootError::TooBig(format!(
                "segment {index} ends at {seg_end:#x} ({}), guest RAM is {}",
                fmt_mib(seg_end),
                fmt_mib(ram_bytes)
            )));
        }
        if paddr < abi::KERNEL_MIN_ADDR || seg_end > max {
            return Err(BootError::BadSegment {
                index,
                start: paddr,
                end: seg_end,
                min: abi::KERNEL_MIN_ADDR,
                max,
            });
        }
        if (paddr..seg_end).contains(&entry) {
            entry_ok = true;
        }
        end = end.max(seg_end);
    }
    if !entry_ok {
        return Err(BootError::BadEntry(entry));
    }
    Ok(LoadedImage { entry, end })
}

/// Loads the ELF image into guest RAM.
pub fn load_image(ram: &GuestRam, image: &[u8]) -> Result<LoadedImage, BootError> {
    let checked = check_image(image, ram.size())?;
    let mut cursor = Cursor::new(image);
    let res = Elf::load(
        ram.mem(),
        None,
        &mut cursor,
        Some(GuestAddress(abi::KERNEL_MIN_ADDR)),
    )
    .map_err(|e| BootError::Load(e.to_string()))?;
    Ok(LoadedImage {
        entry: res.kernel_load.0,
        end: checked.end.max(res.kernel_end),
    })
}

/// What the vCPU needs of the tables [`write_cpu_tables`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct CpuTables {
    /// The GDT as written at `gdt_addr`; segment registers are derived from it.
    pub gdt: [u64; abi::GDT_ENTRIES],
    pub gdt_addr: u64,
    /// The PML4 of the identity map.
    pub cr3: u64,
}

/// Writes the GDT, an empty TSS and the identity page tables (0..1 GiB, 2 MiB pages).
pub fn write_cpu_tables(ram: &GuestRam) -> Result<CpuTables, BootError> {
    let table = gdt::table();
    ram.write_obj(abi::GDT_ADDR, table)?;
    ram.write(abi::TSS_ADDR, &[0u8; abi::TSS_SIZE as usize])?;
    // PML4[0] -> PDPT (user bit set so lower levels decide), PDPT[0] -> PD0 (supervisor).
    ram.write_obj(abi::PML4_ADDR, abi::PDPT_ADDR | 0x7)?;
    ram.write_obj(abi::PDPT_ADDR, abi::PD0_ADDR | 0x3)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    ram.write(abi::PD0_ADDR, &pd)?;
    Ok(CpuTables {
        gdt: table,
        gdt_addr: abi::GDT_ADDR,
        cr3: abi::PML4_ADDR,
    })
}

/// Writes the boot-info page.
pub fn write_boot_info(
    ram: &GuestRam,
    tsc_khz: u64,
    seed: u64,
    phases: &[PhaseEntry],
    spec_text: &str,
    cmdline: &str,
) -> Result<(), BootError> {
    let info = BootInfo::new(ram.size(), tsc_khz, seed, phases, spec_text, cmdline);
    ram.write_obj(abi::BOOT_INFO_ADDR, info)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_segment(
        paddr: u64,
        filesz: u64,
        memsz: u64,
        entry: u64,
        file_len: usize,
    ) -> Vec<u8> {
        let mut b = vec![0u8; file_len.max(64 + 56)];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut b[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        b
    }

    #[test]
    fn accepts_a_good_image() {
        let img = elf_with_segment(0x100000, 0x100, 0x2000, 0x100000, 0x1100);
        let l = check_image(&img, 16 << 20).unwrap();
        assert_eq!(l.entry, 0x100000);
        assert_eq!(l.end, 0x102000);
    }

    #[test]
    fn rejects_bad_images_with_reasons() {
        assert!(matches!(check_image(&[], 1 << 24), Err(BootError::Empty)));
        assert!(matches!(
            check_image(b"hello", 1 << 24),
            Err(BootError::NotElf(_))
        ));
        let img = elf_with_segment(0x100000, 0x100, 0x100, 0x100000, 0x1100);
        assert!(matches!(
            check_image(&img[..40], 1 << 24),
            Err(BootError::Truncated(_))
        ));
        assert!(matches!(
            check_image(&img[..0x1080], 1 << 24),
            Err(BootError::Truncated(_))
        ));
        let big = elf_with_segment(0x100000, 0x100, 64 << 20, 0x100000, 0x1100);
        let e = check_image(&big, 16 << 20).unwrap_err();
        assert!(matches!(e, BootError::TooBig(_)), "{e}");
        let low = elf_with_segment(0x1000, 0x100, 0x100, 0x1000, 0x1100);
        assert!(matches!(
            check_image(&low, 1 << 24),
            Err(BootError::BadSegment { .. })
        ));
        let noentry = elf_with_segment(0x100000, 0x100, 0x100, 0x900000, 0x1100);
        assert!(matches!(
            check_image(&noentry, 1 << 24),
            Err(BootError::BadEntry(0x900000))
        ));
    }
}
