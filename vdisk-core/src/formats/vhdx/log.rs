//! The metadata log: finding the active sequence of entries and replaying it in memory.
//!
//! A VHDX writer records metadata updates (and sometimes payload) in a circular log before
//! writing them in place. A file whose header names a log GUID was not closed cleanly: the
//! entries of its active sequence may not be in place yet. vdisk never writes the image, so it
//! replays the sequence into an [`OverlayBuilder`] and reads the whole file through it.
//!
//! The active sequence: every valid entry of the log is found (signature, CRC-32C, the header's
//! log GUID, descriptors that agree with the entry's sequence number); the entry with the highest
//! sequence number is the head; walking back through entries that end where the next one starts
//! and whose sequence numbers decrease by one gives the run that ends at the head; the replay
//! starts at the entry the head's `tail` names, which must lie in that run (earlier entries are
//! known to be in place already).

use std::borrow::Cow;
use std::collections::HashMap;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::crc32c;
use super::error::corrupt;
use super::guid::Guid;
use super::header::Header;
use super::overlay::OverlayBuilder;
use super::MIB;
use crate::error::Result;
use crate::io::{self, ReadAt};
use crate::limits::MetadataBudget;

/// Log entries, descriptors and data sectors are laid out in 4 KiB sectors.
const LOG_SECTOR: u64 = 4096;
/// [`LOG_SECTOR`] as a buffer length.
const LOG_SECTOR_BYTES: usize = 4096;
/// Size of a log entry header.
const ENTRY_HEADER_SIZE: u64 = 64;
/// Size of a descriptor.
const DESCRIPTOR_SIZE: u64 = 32;
/// Offset of the checksum field inside an entry.
const CHECKSUM_FIELD: usize = 4;
/// Signature of a log entry.
const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// Signature of a zero descriptor.
const ZERO_SIGNATURE: &[u8; 4] = b"zero";
/// Signature of a data descriptor.
const DATA_SIGNATURE: &[u8; 4] = b"desc";
/// Signature of a data sector.
const SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// Checksumming work allowed while scanning, in multiples of the log length: a real log needs
/// little more than one pass, while forged entry headers at every sector could otherwise make
/// the scan quadratic in the log length.
const MAX_SCAN_PASSES: u64 = 8;

/// A log entry header.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawEntryHeader {
    /// `loge`.
    signature: [u8; 4],
    /// CRC-32C of the whole entry (`entry_length` bytes) with this field as zero.
    checksum: U32,
    /// Length of the entry, a multiple of 4 KiB.
    entry_length: U32,
    /// Offset in the log of the first entry of the sequence this entry belongs to.
    tail: U32,
    /// Sequence number, increasing by one from entry to entry; never 0.
    sequence_number: U64,
    /// Number of descriptors that follow the header.
    descriptor_count: U32,
    /// Reserved, zero.
    reserved: U32,
    /// Must equal the header's LogGuid.
    log_guid: Guid,
    /// File size that must exist before the entry can be replayed.
    flushed_file_offset: U64,
    /// File size once the entry is replayed.
    last_file_offset: U64,
}
const _: () = assert!(size_of::<RawEntryHeader>() == 64);

/// A zero descriptor: a range of the file to fill with zeros.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawZeroDescriptor {
    /// `zero`.
    signature: [u8; 4],
    /// Reserved, zero.
    reserved: U32,
    /// Length of the range, a multiple of 4 KiB.
    zero_length: U64,
    /// Start of the range, a multiple of 4 KiB.
    file_offset: U64,
    /// The entry's sequence number.
    sequence_number: U64,
}
const _: () = assert!(size_of::<RawZeroDescriptor>() == 32);

/// A data descriptor: one 4 KiB sector of the file, whose middle is in the next data sector.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDataDescriptor {
    /// `desc`.
    signature: [u8; 4],
    /// The sector's last four bytes.
    trailing_bytes: [u8; 4],
    /// The sector's first eight bytes.
    leading_bytes: [u8; 8],
    /// Offset of the sector in the file, a multiple of 4 KiB.
    file_offset: U64,
    /// The entry's sequence number.
    sequence_number: U64,
}
const _: () = assert!(size_of::<RawDataDescriptor>() == 32);

/// A data sector: bytes 8..4092 of the sector a data descriptor writes.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDataSector {
    /// `data`.
    signature: [u8; 4],
    /// High 32 bits of the entry's sequence number.
    sequence_high: U32,
    /// The sector's bytes 8..4092.
    data: [u8; 4084],
    /// Low 32 bits of the entry's sequence number.
    sequence_low: U32,
}
const _: () = assert!(size_of::<RawDataSector>() == LOG_SECTOR_BYTES);

/// One write of an entry.
#[derive(Debug)]
enum Op {
    /// Write the 4 KiB at `at` in the entry's sector buffer to `offset`.
    Data { offset: u64, at: usize },
    /// Zero `len` bytes at `offset`.
    Zero { offset: u64, len: u64 },
}

/// A valid log entry.
#[derive(Debug)]
struct Entry {
    /// Offset in the log.
    pos: u64,
    /// Length.
    len: u64,
    /// Offset in the log of its sequence's first entry.
    tail: u64,
    /// Sequence number.
    seq: u64,
    /// FlushedFileOffset.
    flushed_file_offset: u64,
    /// LastFileOffset.
    last_file_offset: u64,
    /// Its writes, in order.
    ops: Vec<Op>,
    /// The full sectors its data descriptors write, 4 KiB each.
    sectors: Vec<u8>,
}

/// What the replay did, for `describe` and `check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReplaySummary {
    /// Entries replayed.
    pub(crate) entries: u64,
    /// Sequence numbers of the first and last entries replayed.
    pub(crate) sequence: (u64, u64),
    /// 4 KiB sectors written.
    pub(crate) sectors: u64,
    /// Zeroed ranges.
    pub(crate) zero_ranges: u64,
    /// Offset of the log in the file.
    pub(crate) log_offset: u64,
    /// The file's size after the replay.
    pub(crate) replayed_size: u64,
}

/// Find the active sequence of the log `header` names and replay it into an overlay over `src`.
/// `None` when there is nothing to replay (no log GUID, or no valid entry).
pub(crate) fn replay(
    src: &dyn ReadAt,
    header: &Header,
    budget: &MetadataBudget,
) -> Result<Option<(OverlayBuilder, ReplaySummary)>> {
    if header.log_guid.is_zero() {
        return Ok(None);
    }
    let log_offset = header.log_offset;
    let log_len = header.log_length;
    budget.reserve("VHDX log", log_len)?;
    let log = io::read_vec(src, log_offset, log_len, "VHDX log")?;
    let entries = scan(&log, header.log_guid, log_offset, budget)?;
    let Some(head) = entries.iter().max_by_key(|e| e.seq) else { return Ok(None) };

    // Walk back from the head through contiguous entries with consecutive sequence numbers.
    let by_end: HashMap<u64, usize> = entries.iter().enumerate().map(|(i, e)| ((e.pos + e.len) % log_len, i)).collect();
    let mut run = vec![head];
    while let Some(prev) = run.last().and_then(|cur| {
        by_end.get(&cur.pos).and_then(|&i| entries.get(i)).filter(|p| p.seq.checked_add(1) == Some(cur.seq))
    }) {
        if run.len() > entries.len() {
            break; // Cannot happen (sequence numbers strictly decrease); a guard all the same.
        }
        run.push(prev);
    }
    run.reverse();
    let Some(start) = run.iter().position(|e| e.pos == head.tail) else {
        return Err(corrupt(
            "log entry",
            log_offset + head.pos,
            format!(
                "the head of the log (sequence {}) names tail {:#x}, which is not an entry of its sequence",
                head.seq, head.tail
            ),
        ));
    };
    let active = run.get(start..).unwrap_or_default();

    let file_size = src.size();
    let mut overlay = OverlayBuilder::new(file_size);
    let mut summary = ReplaySummary {
        entries: active.len() as u64,
        sequence: (active.first().map_or(0, |e| e.seq), head.seq),
        sectors: 0,
        zero_ranges: 0,
        log_offset,
        replayed_size: file_size,
    };
    for e in active {
        if e.flushed_file_offset > file_size {
            return Err(corrupt(
                "log entry",
                log_offset + e.pos,
                format!(
                    "sequence {} needs the file to hold {:#x} bytes but it has {file_size:#x}: the file was truncated",
                    e.seq, e.flushed_file_offset
                ),
            ));
        }
        for op in &e.ops {
            match *op {
                Op::Data { offset, at } => {
                    let bytes = e.sectors.get(at..at.saturating_add(LOG_SECTOR_BYTES)).unwrap_or_default();
                    overlay.write(offset, bytes);
                    summary.sectors += 1;
                }
                Op::Zero { offset, len } => {
                    overlay.zero(offset, len);
                    summary.zero_ranges += 1;
                }
            }
        }
    }
    // A replay grows the file to the head's LastFileOffset, rounded up to 1 MiB as qemu does.
    if head.last_file_offset > file_size {
        overlay.extend_to(head.last_file_offset.div_ceil(MIB).saturating_mul(MIB));
    }
    summary.replayed_size = overlay.size();
    Ok(Some((overlay, summary)))
}

/// Every valid entry of the log, in log order. A valid entry is skipped over whole (entries of
/// one log never overlap); elsewhere the scan moves on by one sector.
fn scan(log: &[u8], guid: Guid, log_offset: u64, budget: &MetadataBudget) -> Result<Vec<Entry>> {
    let log_len = log.len() as u64;
    let mut work_left = log_len.saturating_mul(MAX_SCAN_PASSES);
    let mut entries = Vec::new();
    let mut pos = 0;
    while pos < log_len {
        match parse_entry(log, pos, guid, &mut work_left, budget)? {
            Some(e) => {
                pos += e.len;
                entries.push(e);
            }
            None => pos += LOG_SECTOR,
        }
        if work_left == 0 {
            return Err(corrupt(
                "log",
                log_offset,
                format!("too many overlapping entry headers: scanning would checksum more than {MAX_SCAN_PASSES} times the log"),
            ));
        }
    }
    Ok(entries)
}

/// The `len` bytes of the circular log from `pos`.
fn circular(log: &[u8], pos: u64, len: u64) -> Option<Cow<'_, [u8]>> {
    let start = usize::try_from(pos).ok()?;
    let len = usize::try_from(len).ok()?;
    if len > log.len() {
        return None;
    }
    let end = start.checked_add(len)?;
    if end <= log.len() {
        return log.get(start..end).map(Cow::Borrowed);
    }
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(log.get(start..)?);
    v.extend_from_slice(log.get(..end - log.len())?);
    Some(Cow::Owned(v))
}

/// The entry at `pos`, or `None` when there is no valid entry there.
fn parse_entry(
    log: &[u8],
    pos: u64,
    guid: Guid,
    work_left: &mut u64,
    budget: &MetadataBudget,
) -> Result<Option<Entry>> {
    let log_len = log.len() as u64;
    let Some(head) = circular(log, pos, ENTRY_HEADER_SIZE) else { return Ok(None) };
    let Ok(h) = RawEntryHeader::read_from_bytes(&head) else { return Ok(None) };
    let len = u64::from(h.entry_length.get());
    let tail = u64::from(h.tail.get());
    let seq = h.sequence_number.get();
    let count = u64::from(h.descriptor_count.get());
    let header_sectors = (ENTRY_HEADER_SIZE + count * DESCRIPTOR_SIZE).div_ceil(LOG_SECTOR);
    if &h.signature != ENTRY_SIGNATURE
        || len == 0
        || len % LOG_SECTOR != 0
        || len > log_len
        || tail % LOG_SECTOR != 0
        || tail >= log_len
        || seq == 0
        || h.log_guid != guid
        || header_sectors * LOG_SECTOR > len
    {
        return Ok(None);
    }
    *work_left = work_left.saturating_sub(len);
    let Some(bytes) = circular(log, pos, len) else { return Ok(None) };
    if crc32c::crc32c_with_zeroed_field(&bytes, CHECKSUM_FIELD) != h.checksum.get() {
        return Ok(None);
    }

    let mut ops = Vec::new();
    let mut sectors = Vec::new();
    let mut next_sector = header_sectors;
    for i in 0..count {
        let at = ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE;
        let Some(d) = slice(&bytes, at, DESCRIPTOR_SIZE) else { return Ok(None) };
        let sig = d.get(..4);
        if sig == Some(&ZERO_SIGNATURE[..]) {
            let Ok(z) = RawZeroDescriptor::read_from_bytes(d) else { return Ok(None) };
            let (offset, zlen) = (z.file_offset.get(), z.zero_length.get());
            if z.sequence_number.get() != seq
                || offset % LOG_SECTOR != 0
                || zlen % LOG_SECTOR != 0
                || offset.checked_add(zlen).is_none()
            {
                return Ok(None);
            }
            ops.push(Op::Zero { offset, len: zlen });
        } else if sig == Some(&DATA_SIGNATURE[..]) {
            let Ok(dd) = RawDataDescriptor::read_from_bytes(d) else { return Ok(None) };
            let offset = dd.file_offset.get();
            if dd.sequence_number.get() != seq || offset % LOG_SECTOR != 0 || offset.checked_add(LOG_SECTOR).is_none() {
                return Ok(None);
            }
            let Some(raw) = slice(&bytes, next_sector * LOG_SECTOR, LOG_SECTOR) else { return Ok(None) };
            next_sector += 1;
            let Ok(s) = RawDataSector::read_from_bytes(raw) else { return Ok(None) };
            if &s.signature != SECTOR_SIGNATURE
                || u64::from(s.sequence_high.get()) != seq >> 32
                || u64::from(s.sequence_low.get()) != seq & 0xFFFF_FFFF
            {
                return Ok(None);
            }
            let at = sectors.len();
            sectors.extend_from_slice(&dd.leading_bytes);
            sectors.extend_from_slice(&s.data);
            sectors.extend_from_slice(&dd.trailing_bytes);
            ops.push(Op::Data { offset, at });
        } else {
            return Ok(None);
        }
    }
    budget.reserve("VHDX log replay", sectors.len() as u64)?;
    Ok(Some(Entry {
        pos,
        len,
        tail,
        seq,
        flushed_file_offset: h.flushed_file_offset.get(),
        last_file_offset: h.last_file_offset.get(),
        ops,
        sectors,
    }))
}

/// `len` bytes of `bytes` at `at`, if inside.
fn slice(bytes: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let a = usize::try_from(at).ok()?;
    let b = a.checked_add(usize::try_from(len).ok()?)?;
    bytes.get(a..b)
}
