//! The internal snapshot table: listed by `describe`, walked by `check`; reads use the active
//! layer only.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::error::invalid;
use super::header::until_nul;
use crate::error::{Error, Result};
use crate::image::OpenContext;
use crate::info::SnapshotInfo;
use crate::io::ReadAt;

/// Most snapshots in one image (qemu's limit).
pub(super) const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table (qemu's limit: 64 MiB).
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data of one entry (qemu's limit).
const MAX_EXTRA_DATA: u32 = 1024;
/// Bytes read from the file at a time while walking the table.
const CHUNK: usize = 64 << 10;

/// One snapshot table entry's fixed part (big-endian, 40 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSnapshot {
    /// Offset of the snapshot's L1 table.
    l1_table_offset: U64,
    /// Entries in that L1 table.
    l1_size: U32,
    /// Length of the id string.
    id_str_size: U16,
    /// Length of the name.
    name_size: U16,
    /// Wall-clock time taken, seconds.
    date_sec: U32,
    /// Wall-clock time taken, nanoseconds.
    date_nsec: U32,
    /// Guest clock in nanoseconds.
    vm_clock_nsec: U64,
    /// Size of the saved VM state (32-bit; superseded by the extra data).
    vm_state_size: U32,
    /// Length of the extra data that follows.
    extra_data_size: U32,
}
const _: () = assert!(size_of::<RawSnapshot>() == 40);

/// The known part of a snapshot's extra data (big-endian, 24 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSnapshotExtra {
    /// Size of the saved VM state (64-bit).
    vm_state_size_large: U64,
    /// Virtual disk size when taken.
    disk_size: U64,
    /// Instruction count when taken, all ones when not recorded.
    icount: U64,
}
const _: () = assert!(size_of::<RawSnapshotExtra>() == 24);

/// One internal snapshot.
#[derive(Clone, Debug)]
pub(super) struct Snapshot {
    /// Offset of its L1 table.
    pub(super) l1_table_offset: u64,
    /// Entries in its L1 table.
    pub(super) l1_size: u32,
    /// Its id.
    pub(super) id: String,
    /// Its name.
    pub(super) name: String,
    /// Saved VM state size.
    pub(super) vm_state_size: u64,
    /// Wall-clock seconds.
    pub(super) date_sec: u32,
    /// Wall-clock nanoseconds.
    pub(super) date_nsec: u32,
    /// Guest clock in nanoseconds.
    pub(super) vm_clock_nsec: u64,
    /// Instruction count, where recorded.
    pub(super) icount: Option<u64>,
    /// Bytes of extra data in the entry.
    pub(super) extra_data_size: u32,
}

/// Extra data every complete entry has: the 64-bit VM state size and the disk size (entries
/// with less are "incomplete" to `qemu-img check`).
pub(super) const COMPLETE_EXTRA_DATA: u32 = 16;

impl Snapshot {
    /// As `qemu-img info` lists it.
    pub(super) fn info(&self) -> SnapshotInfo {
        let mut s = SnapshotInfo::new(
            self.id.clone(),
            self.name.clone(),
            self.vm_state_size,
            u64::from(self.date_sec),
            u64::from(self.date_nsec),
            self.vm_clock_nsec,
        );
        s.icount = self.icount;
        s
    }
}

/// Sequential reads of a table whose bytes past the end of the file read as zeros (as qemu reads
/// them), through a bounded buffer.
pub(super) struct ZeroFillCursor<'a> {
    src: &'a dyn ReadAt,
    /// Next offset to read.
    pub(super) pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl<'a> ZeroFillCursor<'a> {
    pub(super) fn new(src: &'a dyn ReadAt, pos: u64) -> Self {
        ZeroFillCursor { src, pos, buf: Vec::new(), buf_start: 0 }
    }

    /// The next `n` bytes.
    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = crate::io::checked_end(self.pos, n as u64, what)?;
        let buf_end = self.buf_start + self.buf.len() as u64;
        if self.pos < self.buf_start || end > buf_end {
            self.buf.resize(n.max(CHUNK), 0);
            self.src
                .read_at_zero_fill(&mut self.buf, self.pos)
                .map_err(|e| Error::io(format!("reading the {what} at {:#x}", self.pos), e))?;
            self.buf_start = self.pos;
        }
        let from = usize::try_from(self.pos - self.buf_start).unwrap_or(usize::MAX);
        self.pos = end;
        self.buf.get(from..from + n).ok_or_else(|| Error::invalid(format!("internal error reading the {what}")))
    }

    /// Skip `n` bytes.
    pub(super) fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.pos = crate::io::checked_end(self.pos, n, what)?;
        Ok(())
    }
}

/// Read the snapshot table: `count` entries at `offset`. Returns the entries and the table's
/// size in bytes.
pub(super) fn read_table(
    ctx: &OpenContext<'_>,
    src: &dyn ReadAt,
    offset: u64,
    count: u32,
) -> Result<(Vec<Snapshot>, u64)> {
    let what = "snapshot table";
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    if count > MAX_SNAPSHOTS {
        return Err(invalid(what, offset, format!("{count} snapshots, more than the limit of {MAX_SNAPSHOTS}")));
    }
    if offset >= src.size() {
        return Err(invalid(what, offset, format!("starts past the end of the file ({:#x} bytes)", src.size())));
    }
    ctx.limits().check_table_entries(what, u64::from(count))?;
    ctx.budget.reserve(what, u64::from(count) * size_of::<Snapshot>() as u64)?;
    let mut snapshots = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut cur = ZeroFillCursor::new(src, offset);
    for i in 0..count {
        cur.pos = cur.pos.next_multiple_of(8);
        let entry = cur.pos;
        let raw = RawSnapshot::read_from_bytes(cur.take(size_of::<RawSnapshot>(), what)?)
            .map_err(|_| invalid(what, entry, "short entry"))?;
        let extra_size = raw.extra_data_size.get();
        if extra_size > MAX_EXTRA_DATA {
            return Err(invalid(
                "snapshot table entry",
                entry,
                format!("snapshot {i} has {extra_size} bytes of extra data, more than {MAX_EXTRA_DATA}"),
            ));
        }
        let mut vm_state_size = u64::from(raw.vm_state_size.get());
        let mut icount = None;
        let known = usize::try_from(extra_size).unwrap_or(0).min(size_of::<RawSnapshotExtra>());
        let mut extra = [0u8; size_of::<RawSnapshotExtra>()];
        extra[..known].copy_from_slice(cur.take(known, what)?);
        let extra = RawSnapshotExtra::read_from_bytes(&extra[..]).map_err(|_| invalid(what, entry, "short entry"))?;
        if known >= 8 {
            vm_state_size = extra.vm_state_size_large.get();
        }
        if known >= 24 && extra.icount.get() != u64::MAX {
            icount = Some(extra.icount.get());
        }
        cur.skip(u64::from(extra_size) - known as u64, what)?;
        let id = String::from_utf8_lossy(until_nul(cur.take(usize::from(raw.id_str_size.get()), what)?)).into_owned();
        let name = String::from_utf8_lossy(until_nul(cur.take(usize::from(raw.name_size.get()), what)?)).into_owned();
        if cur.pos - offset > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(invalid(what, offset, format!("larger than the limit of {MAX_SNAPSHOT_TABLE_BYTES} bytes")));
        }
        ctx.budget.reserve(what, (id.len() + name.len()) as u64)?;
        snapshots.push(Snapshot {
            l1_table_offset: raw.l1_table_offset.get(),
            l1_size: raw.l1_size.get(),
            id,
            name,
            vm_state_size,
            date_sec: raw.date_sec.get(),
            date_nsec: raw.date_nsec.get(),
            vm_clock_nsec: raw.vm_clock_nsec.get(),
            icount,
            extra_data_size: extra_size,
        });
    }
    Ok((snapshots, cur.pos - offset))
}
