//! The PMP-MMP map file: writing it safely, and reading it back as a stream.
//!
//! # Map file format (version 1)
//!
//! All fields little endian. A 40-byte header:
//!
//! | offset | type | field |
//! | --- | --- | --- |
//! | 0 | 8 bytes | magic `b"MVPMPMMP"` |
//! | 8 | u32 | version, 1 |
//! | 12 | u32 | page size in bytes (4096; a reader accepts powers of two from 4 KiB to 1 GiB) |
//! | 16 | u64 | guest pages (at least 1; guest pages × page size at most 2^52 bytes) |
//! | 24 | u32 | interval count: last harvested interval + 1 (0: never harvested) |
//! | 28 | u32 | flags: bit 0 = PFNs visible (else every PFN is 0, no page is `Shared`, and `Zero` means present but never written: see the map's docs) |
//! | 32 | u64 | record count (at most guest pages) |
//!
//! then `record count` records of 28 bytes, one per touched page, in ascending gfn order, so the
//! file is exactly 40 + 28 × record count bytes:
//!
//! | offset | type | field |
//! | --- | --- | --- |
//! | 0 | u64 | gfn (guest page number, below guest pages) |
//! | 8 | u64 | PFN (0 unless state is Backed or Shared, or when PFNs are hidden; below 2^55) |
//! | 16 | u32 | interval of first touch (below the interval count) |
//! | 20 | u32 | interval of the last observed write (`0xffff_ffff`: none; else below the interval count) |
//! | 24 | u8 | state: 1 Zero, 2 Backed, 3 Swapped, 4 Shared, 5 Discarded, 6 Released (given back by the balloon), 7 VmmSwapped (in the VMM's swap file, `--swap`) |
//! | 25 | u8 | flags: bit 0 guest-written, bit 1 VMM-written |
//! | 26 | u16 | reserved, 0 |
//!
//! Untouched pages have no record. In Python:
//!
//! ```text
//! import struct
//! HDR = struct.Struct("<8sIIQIIQ")   # magic, version, page_size, guest_pages, intervals, flags, nrec
//! REC = struct.Struct("<QQIIBBH")    # gfn, pfn, first_touch, last_write, state, flags, reserved
//! data = open("guest.map", "rb").read()
//! magic, version, page_size, pages, intervals, flags, nrec = HDR.unpack_from(data, 0)
//! assert magic == b"MVPMPMMP" and version == 1
//! assert len(data) == HDR.size + nrec * REC.size
//! recs = [REC.unpack_from(data, HDR.size + i * REC.size) for i in range(nrec)]
//! ```
//!
//! # Writing
//!
//! [`PmpMmpMap::write_file`] writes through [`crate::files::write_atomic`]: never through the
//! target's name (an unnamed file, linked in and renamed over the target when whole), so readers
//! never see half a map, two writers to one path both succeed (the last rename wins), and a kill
//! mid-write leaves no temporary file. A target that exists and is not a regular file (a device
//! node, FIFO, socket, symbolic link or directory) is refused; so is a target whose directory is
//! missing. [`check_target`] runs the same checks, and creates a file in the directory, so a run
//! can fail before its guest starts.
//!
//! # Reading
//!
//! [`MapFile`] reads the header, checks it against itself and (for a regular file) against the
//! file's size, then yields the records one at a time, validating each: memory stays constant
//! whatever the record count. [`MapFile::summary`] folds them into a [`MapSummary`].

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use thiserror::Error;

use super::record::{NO_WRITE, PFN_MASK, PageInfo, PageState};
use super::{MapSummary, PmpMmpMap};
use crate::files::{self, FileError};
use crate::units::PAGE_SIZE;

/// Map file magic.
pub const MAP_MAGIC: [u8; 8] = *b"MVPMPMMP";
/// Map file version.
pub const MAP_VERSION: u32 = 1;
/// Map file header size.
pub const HEADER_SIZE: usize = 40;
/// Map file record size.
pub const RECORD_SIZE: usize = 28;
/// Header flag: PFNs visible.
pub const FLAG_PFN_VISIBLE: u32 = 1;
/// Record flag: written by the guest.
pub const REC_GUEST_WRITTEN: u8 = 1;
/// Record flag: written by the VMM.
pub const REC_VMM_WRITTEN: u8 = 2;
/// Smallest page size a header may give.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size a header may give (1 GiB).
pub const MAX_PAGE_SIZE: u32 = 1 << 30;
/// Largest guest RAM a header may describe: 2^52 bytes, x86-64's widest physical address.
pub const MAX_GUEST_BYTES: u64 = 1 << 52;

/// Buffer size of the file reader and writer.
const IO_BUF: usize = 1 << 16;

/// Errors of map files: their target, writing them, reading them back.
#[derive(Debug, Error)]
pub enum MapFileError {
    /// The target cannot take a map file (not a regular file, no directory...), or writing it
    /// failed.
    #[error("map file {0}")]
    Target(#[source] FileError),
    /// The map file to read cannot be opened, or is not a regular file.
    #[error("map file {0}")]
    Open(#[source] FileError),
    /// Writing the map to a stream failed.
    #[error("writing the map: {0}")]
    WriteStream(#[source] std::io::Error),
    /// Opening or reading the map file failed.
    #[error("reading the map: {0}")]
    Read(#[source] std::io::Error),
    /// The map file ends inside its header.
    #[error("reading the map: truncated header: {got} of {HEADER_SIZE} bytes")]
    TruncatedHeader { got: usize },
    /// The map file does not start with the magic.
    #[error("reading the map: bad magic {found:02x?} (not a memvisor map file)")]
    BadMagic { found: [u8; 8] },
    /// The map file has a version this reader does not know.
    #[error("reading the map: unsupported version {0} (this reader knows {MAP_VERSION})")]
    UnsupportedVersion(u32),
    /// A header field is out of range.
    #[error("reading the map: bad header: {0}")]
    BadHeader(String),
    /// The file's size is not what its header's record count makes it.
    #[error(
        "reading the map: size mismatch: {records} records make a {expected}-byte file, but \
         the file has {actual} bytes (truncated, or not a map file)"
    )]
    SizeMismatch {
        records: u64,
        expected: u64,
        actual: u64,
    },
    /// The input holds fewer records than the header says.
    #[error("reading the map: truncated records: header says {expected}, input holds {got} whole")]
    TruncatedRecords { expected: u64, got: u64 },
    /// The input holds more data than the header's records.
    #[error("reading the map: record count mismatch: data continues after the {expected} records")]
    TrailingData { expected: u64 },
    /// A record is invalid.
    #[error("reading the map: record {index}: {reason}")]
    BadRecord { index: u64, reason: String },
}

/// Checks that a map file can be written at `path` (see [`crate::files::check_target`]): it does
/// not exist or is a regular file (no device node, FIFO, socket, symbolic link or directory), its
/// directory exists, and a file can be created there.
pub fn check_target(path: &Path) -> Result<(), MapFileError> {
    files::check_target(path).map_err(MapFileError::Target)
}

/// The header of a map file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapHeader {
    pub page_size: u32,
    pub guest_pages: u64,
    /// Last harvested interval + 1.
    pub intervals: u32,
    pub pfn_visible: bool,
    pub records: u64,
}

impl MapHeader {
    fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..8].copy_from_slice(&MAP_MAGIC);
        h[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.page_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.guest_pages.to_le_bytes());
        h[24..28].copy_from_slice(&self.intervals.to_le_bytes());
        let flags = if self.pfn_visible {
            FLAG_PFN_VISIBLE
        } else {
            0
        };
        h[28..32].copy_from_slice(&flags.to_le_bytes());
        h[32..40].copy_from_slice(&self.records.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_SIZE]) -> Result<Self, MapFileError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[0..8]);
        if magic != MAP_MAGIC {
            return Err(MapFileError::BadMagic { found: magic });
        }
        let version = u32_at(h, 8);
        if version != MAP_VERSION {
            return Err(MapFileError::UnsupportedVersion(version));
        }
        let bad = |s: String| Err(MapFileError::BadHeader(s));
        let page_size = u32_at(h, 12);
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return bad(format!(
                "page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
            ));
        }
        let guest_pages = u64_at(h, 16);
        let fits = guest_pages
            .checked_mul(u64::from(page_size))
            .is_some_and(|b| b <= MAX_GUEST_BYTES);
        if guest_pages == 0 || !fits {
            return bad(format!(
                "{guest_pages} guest pages of {page_size} bytes: not between one page and \
                 {MAX_GUEST_BYTES} bytes"
            ));
        }
        let flags = u32_at(h, 28);
        if flags & !FLAG_PFN_VISIBLE != 0 {
            return bad(format!("unknown flags {flags:#x}"));
        }
        let records = u64_at(h, 32);
        if records > guest_pages {
            return bad(format!(
                "record count {records} exceeds the {guest_pages} guest pages"
            ));
        }
        Ok(MapHeader {
            page_size,
            guest_pages,
            intervals: u32_at(h, 24),
            pfn_visible: flags & FLAG_PFN_VISIBLE != 0,
            records,
        })
    }

    /// The size of a file with this header: 40 + 28 × records (cannot overflow: records are at
    /// most 2^52 / 4096 guest pages).
    fn file_size(&self) -> u64 {
        HEADER_SIZE as u64 + self.records * RECORD_SIZE as u64
    }

    /// An empty summary of this header's guest: every page untouched until records are added.
    fn empty_summary(&self) -> MapSummary {
        MapSummary {
            pages: self.guest_pages,
            untouched: self.guest_pages,
            page_size: u64::from(self.page_size),
            pfn_visible: self.pfn_visible,
            intervals: self.intervals,
            ..Default::default()
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// Writes a map file to `w`: `header`, then `records`, which must be `header.records` touched
/// pages in ascending gfn order (a count that disagrees is an `InvalidInput` error).
pub fn write_map(
    w: impl Write,
    header: &MapHeader,
    records: impl IntoIterator<Item = PageInfo>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(IO_BUF, w);
    w.write_all(&header.encode())?;
    let mut n = 0u64;
    for p in records {
        w.write_all(&encode_record(&p))?;
        n += 1;
    }
    if n != header.records {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{n} records written, the header says {}", header.records),
        ));
    }
    w.flush()
}

fn encode_record(p: &PageInfo) -> [u8; RECORD_SIZE] {
    let flags = (u8::from(p.guest_written) * REC_GUEST_WRITTEN)
        | (u8::from(p.vmm_written) * REC_VMM_WRITTEN);
    let mut rec = [0u8; RECORD_SIZE];
    rec[0..8].copy_from_slice(&p.gfn.to_le_bytes());
    rec[8..16].copy_from_slice(&p.state.pfn().to_le_bytes());
    rec[16..20].copy_from_slice(&p.first_touch.unwrap_or(0).to_le_bytes());
    rec[20..24].copy_from_slice(&p.last_write.unwrap_or(NO_WRITE).to_le_bytes());
    rec[24] = p.state.code();
    rec[25] = flags;
    rec
}

fn decode_record(
    header: &MapHeader,
    rec: &[u8; RECORD_SIZE],
    prev: Option<u64>,
) -> Result<PageInfo, String> {
    let gfn = u64_at(rec, 0);
    let pfn = u64_at(rec, 8);
    let first_touch = u32_at(rec, 16);
    let last_write = u32_at(rec, 20);
    let (code, flags) = (rec[24], rec[25]);
    if gfn >= header.guest_pages {
        return Err(format!(
            "gfn {gfn} past the {} guest pages",
            header.guest_pages
        ));
    }
    if let Some(p) = prev.filter(|&p| gfn <= p) {
        return Err(format!("gfn {gfn} out of order (after {p})"));
    }
    let state = match PageState::from_code(code, pfn) {
        Some(PageState::Untouched) | None => return Err(format!("bad state {code}")),
        Some(s) => s,
    };
    if pfn > PFN_MASK {
        return Err(format!("PFN {pfn:#x} out of range"));
    }
    if pfn != state.pfn() {
        return Err(format!("PFN {pfn:#x} on a page in state {state:?}"));
    }
    if !header.pfn_visible && (pfn != 0 || matches!(state, PageState::Shared(_))) {
        return Err(format!("{state:?} in a map written with PFNs hidden"));
    }
    if first_touch >= header.intervals {
        return Err(format!(
            "first touch {first_touch} not below the interval count {}",
            header.intervals
        ));
    }
    if last_write != NO_WRITE && last_write >= header.intervals {
        return Err(format!(
            "last write {last_write} not below the interval count {}",
            header.intervals
        ));
    }
    if flags & !(REC_GUEST_WRITTEN | REC_VMM_WRITTEN) != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    if rec[26..28] != [0, 0] {
        return Err("reserved bytes not zero".into());
    }
    Ok(PageInfo {
        gfn,
        state,
        first_touch: Some(first_touch),
        last_write: (last_write != NO_WRITE).then_some(last_write),
        guest_written: flags & REC_GUEST_WRITTEN != 0,
        vmm_written: flags & REC_VMM_WRITTEN != 0,
    })
}

impl PmpMmpMap {
    /// The header of this map's file.
    fn file_header(&self) -> MapHeader {
        MapHeader {
            page_size: PAGE_SIZE as u32,
            guest_pages: self.pages,
            intervals: self.interval_count,
            pfn_visible: self.pagemap.pfn_visible(),
            records: self.touched.count_ones(),
        }
    }

    /// Writes the map file (format in [`crate::observe::pmp_mmp::file`]) to `w`.
    pub fn write(&self, w: impl Write) -> Result<(), MapFileError> {
        self.write_records(w).map_err(MapFileError::WriteStream)
    }

    /// The header, then a record per touched page.
    fn write_records(&self, w: impl Write) -> std::io::Result<()> {
        let pages = self
            .touched
            .bitmap()
            .iter_ones()
            .filter_map(|g| self.page(g));
        write_map(w, &self.file_header(), pages)
    }

    /// Writes the map file at `path`: through a temporary file created exclusively beside it
    /// and renamed into place (see the module docs); a target that exists and is not a regular
    /// file is refused.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), MapFileError> {
        files::write_atomic(path.as_ref(), |f| self.write_records(f)).map_err(MapFileError::Target)
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A map file being read: its validated header, then its records one at a time (as an
/// iterator of `Result<PageInfo, MapFileError>`; it ends after the first error).
#[derive(Debug)]
pub struct MapFile<R = File> {
    header: MapHeader,
    input: BufReader<R>,
    /// Index of the next record.
    next: u64,
    prev_gfn: Option<u64>,
    done: bool,
}

impl MapFile<File> {
    /// Opens the map file at `path` (a regular file: a FIFO or device is refused, see
    /// [`crate::files::open_regular`]), reads and validates its header, and checks the file's
    /// size against it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MapFileError> {
        let f = files::open_regular(path.as_ref()).map_err(MapFileError::Open)?;
        let meta = f.metadata().map_err(MapFileError::Read)?;
        let size = meta.is_file().then_some(meta.len());
        Self::start(f, size)
    }
}

impl<R: Read> MapFile<R> {
    /// Reads and validates the header of a map file from `r`; the records follow as the
    /// iterator is driven.
    pub fn from_reader(r: R) -> Result<Self, MapFileError> {
        Self::start(r, None)
    }

    fn start(r: R, size: Option<u64>) -> Result<Self, MapFileError> {
        let mut input = BufReader::with_capacity(IO_BUF, r);
        let mut h = [0u8; HEADER_SIZE];
        let got = read_full(&mut input, &mut h).map_err(MapFileError::Read)?;
        if got < HEADER_SIZE {
            return Err(MapFileError::TruncatedHeader { got });
        }
        let header = MapHeader::decode(&h)?;
        if let Some(actual) = size.filter(|&s| s != header.file_size()) {
            return Err(MapFileError::SizeMismatch {
                records: header.records,
                expected: header.file_size(),
                actual,
            });
        }
        Ok(MapFile {
            header,
            input,
            next: 0,
            prev_gfn: None,
            done: false,
        })
    }

    /// The file's header.
    pub fn header(&self) -> &MapHeader {
        &self.header
    }

    /// Reads the remaining records and counts them: page counts as [`PmpMmpMap::summary`] gave
    /// them when the file was written (when read from the start).
    pub fn summary(mut self) -> Result<MapSummary, MapFileError> {
        let mut s = self.header.empty_summary();
        for p in &mut self {
            let p = p?;
            s.untouched -= 1;
            match p.state {
                PageState::Zero => s.zero += 1,
                PageState::Backed(_) => s.backed += 1,
                PageState::Swapped => s.swapped += 1,
                PageState::Shared(_) => s.shared += 1,
                PageState::Discarded => s.discarded += 1,
                PageState::Released => s.released += 1,
                PageState::VmmSwapped => s.vmm_swapped += 1,
                PageState::Untouched => {}
            }
            s.guest_written += u64::from(p.guest_written);
            s.vmm_written += u64::from(p.vmm_written);
        }
        Ok(s)
    }

    fn next_record(&mut self) -> Result<Option<PageInfo>, MapFileError> {
        if self.next == self.header.records {
            let mut extra = [0u8; 1];
            if read_full(&mut self.input, &mut extra).map_err(MapFileError::Read)? != 0 {
                return Err(MapFileError::TrailingData {
                    expected: self.header.records,
                });
            }
            return Ok(None);
        }
        let mut rec = [0u8; RECORD_SIZE];
        if read_full(&mut self.input, &mut rec).map_err(MapFileError::Read)? < RECORD_SIZE {
            return Err(MapFileError::TruncatedRecords {
                expected: self.header.records,
                got: self.next,
            });
        }
        let index = self.next;
        let p = decode_record(&self.header, &rec, self.prev_gfn)
            .map_err(|reason| MapFileError::BadRecord { index, reason })?;
        self.next += 1;
        self.prev_gfn = Some(p.gfn);
        Ok(Some(p))
    }
}

impl<R: Read> Iterator for MapFile<R> {
    type Item = Result<PageInfo, MapFileError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.next_record();
        self.done = !matches!(r, Ok(Some(_)));
        r.transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::path::PathBuf;

    use proptest::prelude::*;

    use super::super::tests::{Ram, dirty_of};
    use super::*;

    /// A small map: writes (guest and VMM), a read, two intervals; its file bytes.
    fn sample_map() -> (Ram, PmpMmpMap, Vec<u8>) {
        let ram = Ram::new(300);
        for g in [0u64, 7, 299] {
            ram.write(g, 1);
        }
        ram.read(64);
        ram.write(200, 1);
        let mut map = PmpMmpMap::new(ram.host(), 300).unwrap();
        map.harvest(&dirty_of(300, &[0, 7, 299]), &dirty_of(300, &[200]), 0)
            .unwrap();
        map.harvest(&dirty_of(300, &[0, 7, 299]), &[], 1).unwrap();
        let mut buf = Vec::new();
        map.write(&mut buf).unwrap();
        (ram, map, buf)
    }

    fn read_all(bytes: &[u8]) -> Result<(MapHeader, Vec<PageInfo>), MapFileError> {
        let mut f = MapFile::from_reader(bytes)?;
        let header = f.header().clone();
        let recs = f.by_ref().collect::<Result<Vec<_>, _>>()?;
        Ok((header, recs))
    }

    fn summary_of(bytes: &[u8]) -> Result<MapSummary, MapFileError> {
        MapFile::from_reader(bytes)?.summary()
    }

    /// `buf` with the 8 bytes at `off` replaced by `v`.
    fn with_u64(buf: &[u8], off: usize, v: u64) -> Vec<u8> {
        let mut b = buf.to_vec();
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        b
    }

    fn with_u32(buf: &[u8], off: usize, v: u32) -> Vec<u8> {
        let mut b = buf.to_vec();
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        b
    }

    #[test]
    fn round_trip_of_a_live_map() {
        let (_ram, map, buf) = sample_map();
        assert_eq!(buf.len(), HEADER_SIZE + 5 * RECORD_SIZE);
        let (header, recs) = read_all(&buf).unwrap();
        assert_eq!(header.records, 5);
        assert_eq!(header.page_size, 4096);
        assert_eq!(
            recs.iter().map(|r| r.gfn).collect::<Vec<_>>(),
            vec![0, 7, 64, 200, 299]
        );
        for r in &recs {
            assert_eq!(Some(*r), map.page(r.gfn));
        }
        assert_eq!(summary_of(&buf).unwrap(), map.summary());

        // Through a file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.map");
        map.write_file(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), buf);
        assert_eq!(
            MapFile::open(&path).unwrap().summary().unwrap(),
            map.summary()
        );
        assert!(matches!(
            MapFile::open(dir.path().join("missing.map")),
            Err(MapFileError::Open(_))
        ));
        // A FIFO is refused at once instead of blocking until a writer comes.
        let fifo = dir.path().join("fifo.map");
        mknod(&fifo, libc::S_IFIFO | 0o600, 0);
        let e = MapFile::open(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
    }

    #[test]
    fn bad_headers_are_refused() {
        let (_ram, _map, buf) = sample_map();
        let header_err = |b: &[u8]| match MapFile::from_reader(b) {
            Err(e) => e,
            Ok(_) => panic!("header accepted"),
        };
        assert!(matches!(
            header_err(&buf[..10]),
            MapFileError::TruncatedHeader { got: 10 }
        ));
        assert!(matches!(
            header_err(&[]),
            MapFileError::TruncatedHeader { got: 0 }
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(header_err(&bad), MapFileError::BadMagic { .. }));
        assert!(matches!(
            header_err(&with_u32(&buf, 8, 2)),
            MapFileError::UnsupportedVersion(2)
        ));
        // Page sizes: not a power of two, too small, absurdly large.
        for ps in [0u32, 3, 512, 2048, 4097, 1 << 31, u32::MAX] {
            let e = header_err(&with_u32(&buf, 12, ps));
            assert!(
                matches!(e, MapFileError::BadHeader(ref m) if m.contains("page size")),
                "page size {ps}: {e}"
            );
        }
        // Guest pages: none, 2^64 - 1, more bytes than a physical address space.
        for pages in [0u64, u64::MAX, (MAX_GUEST_BYTES / 4096) + 1] {
            let e = header_err(&with_u64(&buf, 16, pages));
            assert!(
                matches!(e, MapFileError::BadHeader(ref m) if m.contains("guest pages")),
                "{pages} pages: {e}"
            );
        }
        // The largest guest is fine (its five records still fit).
        assert!(MapFile::from_reader(&with_u64(&buf, 16, MAX_GUEST_BYTES / 4096)[..]).is_ok());
        // 2 MiB pages over the same 300 pages: fine, and MiB figures follow the page size.
        let big = with_u32(&buf, 12, 2 << 20);
        let s = summary_of(&big).unwrap();
        assert_eq!(s.page_size, 2 << 20);
        assert!(s.to_string().contains("(600.0 MiB)"), "{s}");
        assert!(summary_of(&buf).unwrap().to_string().contains("(1.2 MiB)"));
        let e = header_err(&with_u32(&buf, 28, 6));
        assert!(matches!(e, MapFileError::BadHeader(ref m) if m.contains("flags")));
        // More records than pages.
        let e = header_err(&with_u64(&buf, 32, 301));
        assert!(matches!(e, MapFileError::BadHeader(ref m) if m.contains("record count")));
        let e = header_err(&with_u64(&buf, 32, u64::MAX));
        assert!(matches!(e, MapFileError::BadHeader(_)));
    }

    #[test]
    fn file_size_must_match_the_record_count() {
        let (_ram, _map, buf) = sample_map();
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            MapFile::open(&p)
        };
        // Caught from the header alone, before any record is read.
        assert!(matches!(
            open("cut.map", &buf[..buf.len() - 1]),
            Err(MapFileError::SizeMismatch {
                records: 5,
                expected: 180,
                actual: 179
            })
        ));
        let mut long = buf.clone();
        long.push(0);
        assert!(matches!(
            open("long.map", &long),
            Err(MapFileError::SizeMismatch { actual: 181, .. })
        ));
        // A plausible count on a file too short for it.
        assert!(matches!(
            open("count.map", &with_u64(&buf, 32, 300)),
            Err(MapFileError::SizeMismatch { records: 300, .. })
        ));
        let e = open("few.map", &with_u64(&buf, 32, 4)).unwrap_err();
        assert!(e.to_string().contains("size mismatch"), "{e}");
        // From a stream (no size known) the same faults show up while reading.
        assert!(matches!(
            summary_of(&buf[..buf.len() - 1]),
            Err(MapFileError::TruncatedRecords {
                expected: 5,
                got: 4
            })
        ));
        assert!(matches!(
            summary_of(&long),
            Err(MapFileError::TrailingData { expected: 5 })
        ));
        assert!(matches!(
            summary_of(&with_u64(&buf, 32, 4)),
            Err(MapFileError::TrailingData { .. })
        ));
        assert!(matches!(
            summary_of(&with_u64(&buf, 32, 300)),
            Err(MapFileError::TruncatedRecords { expected: 300, .. })
        ));
    }

    #[test]
    fn bad_records_are_refused() {
        let (_ram, _map, buf) = sample_map();
        let rec = |i: usize, off: usize| HEADER_SIZE + i * RECORD_SIZE + off;
        let record_err = |b: Vec<u8>| match summary_of(&b) {
            Err(MapFileError::BadRecord { index, reason }) => (index, reason),
            other => panic!("expected a bad record, got {other:?}"),
        };
        let mut bad = buf.clone();
        bad[rec(0, 24)] = 9;
        assert_eq!(record_err(bad).0, 0);
        let mut bad = buf.clone();
        bad[rec(0, 24)] = 0; // untouched has no record
        assert!(record_err(bad).1.contains("state"));
        // gfn repeats, goes backwards, runs past the guest.
        assert!(record_err(with_u64(&buf, rec(1, 0), 0)).1.contains("order"));
        assert_eq!(record_err(with_u64(&buf, rec(2, 0), 1)).0, 2);
        assert!(
            record_err(with_u64(&buf, rec(4, 0), 300))
                .1
                .contains("past")
        );
        // Intervals at or past the count (2).
        assert!(
            record_err(with_u32(&buf, rec(0, 16), 2))
                .1
                .contains("first touch")
        );
        assert!(
            record_err(with_u32(&buf, rec(0, 20), 2))
                .1
                .contains("last write")
        );
        // A PFN on a zero page (gfn 64, record 2), one past 55 bits.
        assert!(record_err(with_u64(&buf, rec(2, 8), 5)).1.contains("PFN"));
        assert!(
            record_err(with_u64(&buf, rec(0, 8), 1 << 60))
                .1
                .contains("PFN")
        );
        let mut bad = buf.clone();
        bad[rec(0, 25)] = 4;
        assert!(record_err(bad).1.contains("flags"));
        let mut bad = buf.clone();
        bad[rec(3, 27)] = 1;
        assert_eq!(record_err(bad), (3, "reserved bytes not zero".to_string()));
        // With PFNs hidden (header flag clear), a record with a PFN is inconsistent.
        let e = record_err(with_u32(&buf, 28, 0));
        assert!(e.1.contains("PFNs hidden"), "{e:?}");
        // The iterator stops after an error.
        let repeated = with_u64(&buf, rec(1, 0), 0);
        let mut f = MapFile::from_reader(&repeated[..]).unwrap();
        assert!(f.next().unwrap().is_ok());
        assert!(f.next().unwrap().is_err());
        assert!(f.next().is_none());
    }

    /// Makes a node with `mknod(2)`.
    fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mknod only creates a directory entry.
        let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
        assert_eq!(
            r,
            0,
            "mknod {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }

    fn assert_refused(r: Result<(), MapFileError>, what: &str) {
        match r {
            Err(e @ MapFileError::Target(FileError::BadTarget { .. })) => {
                assert!(e.to_string().contains(what), "{e}")
            }
            other => panic!("expected a refusal mentioning {what:?}, got {other:?}"),
        }
    }

    #[test]
    fn special_targets_are_refused_and_left_alone() {
        let (_ram, map, _) = sample_map();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let chr = d.join("null.map");
        mknod(&chr, libc::S_IFCHR | 0o600, libc::makedev(1, 3));
        let fifo = d.join("fifo.map");
        mknod(&fifo, libc::S_IFIFO | 0o600, 0);
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.join("link.map");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        for (p, what) in [
            (&chr, "character device"),
            (&fifo, "FIFO"),
            (&link, "symbolic link"),
            (&sub, "directory"),
        ] {
            assert_refused(check_target(p), what);
            match map.write_file(p) {
                Err(e) => assert!(e.to_string().contains(what), "{e}"),
                Ok(()) => panic!("{} was written over", p.display()),
            }
        }
        let meta = |p: &Path| std::fs::symlink_metadata(p).unwrap().file_type();
        assert!(meta(&chr).is_char_device());
        assert!(meta(&fifo).is_fifo());
        assert!(meta(&link).is_symlink());
        assert!(meta(&sub).is_dir());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // Nothing else was left in the directory.
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["fifo.map", "link.map", "null.map", "sub", "victim"]);
    }

    #[test]
    fn missing_or_bad_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_refused(check_target(&d.join("nope/out.map")), "does not exist");
        let file = d.join("plain");
        std::fs::write(&file, b"x").unwrap();
        // A regular file as the directory: stat of the target fails with ENOTDIR.
        assert!(matches!(
            check_target(&file.join("out.map")),
            Err(MapFileError::Target(FileError::Io { .. }))
        ));
        assert_refused(check_target(Path::new("")), "does not name a file");
        assert_refused(check_target(&d.join("x/..")), "does not name a file");
        let slash = PathBuf::from(format!("{}/new/", d.display()));
        assert_refused(check_target(&slash), "does not name a file");
        // A fine target: absent, or an existing regular file; the probe leaves nothing behind.
        check_target(&d.join("out.map")).unwrap();
        check_target(&file).unwrap();
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 1);
    }

    #[test]
    fn writes_never_follow_links_and_two_writers_both_succeed() {
        let (_ram, map, buf) = sample_map();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = d.join("out.map");
        // The old fixed temporary name, planted as a link to a victim: untouched.
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("out.map.tmp")).unwrap();
        // A user's own file of that name would be untouched too; a stale regular target is
        // replaced.
        std::fs::write(&out, b"old").unwrap();
        map.write_file(&out).unwrap();
        map.write_file(&out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), buf);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(
            std::fs::symlink_metadata(d.join("out.map.tmp"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // Two writers at once: both succeed, the file is whole.
        std::thread::scope(|s| {
            let a = s.spawn(|| map.write_file(&out));
            let b = s.spawn(|| map.write_file(&out));
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        assert_eq!(std::fs::read(&out).unwrap(), buf);
        assert_eq!(
            std::fs::read_dir(d).unwrap().count(),
            3,
            "no temporary files left"
        );
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_ne!(
            mode & 0o044,
            0,
            "readable beyond the owner as File::create makes it: {mode:o}"
        );
    }

    /// A valid set of records for a header: ascending gfns below `pages`, fields in range.
    fn records_strategy() -> impl Strategy<Value = (MapHeader, Vec<PageInfo>)> {
        (1u64..5000, 1u32..50, any::<bool>()).prop_flat_map(|(pages, intervals, pfn_visible)| {
            let rec = (
                0..pages,
                0u32..7,
                1u64..PFN_MASK,
                0..intervals,
                proptest::option::of(0..intervals),
                any::<bool>(),
                any::<bool>(),
            );
            proptest::collection::vec(rec, 0..200).prop_map(move |mut v| {
                v.sort_by_key(|r| r.0);
                v.dedup_by_key(|r| r.0);
                let recs: Vec<PageInfo> = v
                    .into_iter()
                    .map(|(gfn, s, pfn, first, last, gw, vw)| {
                        let pfn = if pfn_visible { pfn } else { 0 };
                        let state = match s {
                            0 => PageState::Zero,
                            1 => PageState::Backed(pfn),
                            2 => PageState::Swapped,
                            3 if pfn_visible => PageState::Shared(pfn),
                            4 => PageState::Released,
                            5 => PageState::VmmSwapped,
                            _ => PageState::Discarded,
                        };
                        PageInfo {
                            gfn,
                            state,
                            first_touch: Some(first),
                            last_write: last,
                            guest_written: gw,
                            vmm_written: vw,
                        }
                    })
                    .collect();
                let header = MapHeader {
                    page_size: 4096,
                    guest_pages: pages,
                    intervals,
                    pfn_visible,
                    records: recs.len() as u64,
                };
                (header, recs)
            })
        })
    }

    proptest! {
        // Cases: proptest's default (256), or PROPTEST_CASES from the environment.

        #[test]
        fn reader_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            plausible in any::<bool>(),
            pages in 1u64..64,
            flags in 0u32..2,
            extra in 0u64..2,
        ) {
            let mut bytes = bytes;
            if plausible && bytes.len() >= HEADER_SIZE {
                // A header that passes its own checks, so that records get decoded too.
                let n = (bytes.len() - HEADER_SIZE) as u64 / RECORD_SIZE as u64 + extra;
                bytes[0..8].copy_from_slice(&MAP_MAGIC);
                bytes[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
                bytes[12..16].copy_from_slice(&4096u32.to_le_bytes());
                bytes[16..24].copy_from_slice(&pages.max(n).to_le_bytes());
                bytes[28..32].copy_from_slice(&flags.to_le_bytes());
                bytes[32..40].copy_from_slice(&n.to_le_bytes());
            }
            if let Ok(f) = MapFile::from_reader(&bytes[..]) {
                let n = f.header().records;
                if let Ok(s) = f.summary() {
                    prop_assert_eq!(bytes.len() as u64, 40 + 28 * n);
                    prop_assert_eq!(s.untouched + s.zero + s.backed + s.swapped + s.shared + s.discarded + s.released + s.vmm_swapped, s.pages);
                }
            }
        }

        #[test]
        fn writer_output_reads_back_the_same((header, recs) in records_strategy()) {
            let mut buf = Vec::new();
            write_map(&mut buf, &header, recs.iter().copied()).unwrap();
            prop_assert_eq!(buf.len(), HEADER_SIZE + recs.len() * RECORD_SIZE);
            let (h, back) = read_all(&buf).unwrap();
            prop_assert_eq!(&h, &header);
            prop_assert_eq!(&back, &recs);
            let s = summary_of(&buf).unwrap();
            prop_assert_eq!(s.pages - s.untouched, recs.len() as u64);
            prop_assert_eq!(s.guest_written, recs.iter().filter(|r| r.guest_written).count() as u64);
            // One flipped byte never panics the reader.
            let mut flipped = buf.clone();
            let i = buf.len() / 2;
            flipped[i] ^= 0x5a;
            let _ = MapFile::from_reader(&flipped[..]).and_then(MapFile::summary);
        }
    }

    #[test]
    fn writer_refuses_a_count_that_disagrees() {
        let header = MapHeader {
            page_size: 4096,
            guest_pages: 10,
            intervals: 1,
            pfn_visible: true,
            records: 2,
        };
        let one = PageInfo {
            gfn: 3,
            state: PageState::Zero,
            first_touch: Some(0),
            last_write: None,
            guest_written: false,
            vmm_written: false,
        };
        let e = write_map(Vec::new(), &header, [one]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
