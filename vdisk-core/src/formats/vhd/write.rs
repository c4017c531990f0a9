//! The VHD writer (`-O vpc`): fixed and dynamic disks, fed by the copy engine through
//! [`FormatWriter`].
//!
//! # Options (qemu-img's names)
//!
//! * `subformat=dynamic` (default, as in qemu-img) or `fixed`.
//! * `force_size=on|off`: accepted for qemu-img command lines, and both values write the same
//!   file. qemu-img without `force_size` grows the disk to the next whole CHS geometry (a 100 MiB
//!   disk becomes 104,865,792 bytes, which Azure refuses and which moves a GPT backup header
//!   away from the last sector); with it, qemu-img writes the exact size and the geometry
//!   65535/16/255. vdisk always writes the exact size as the footer's current and original size,
//!   and the geometry the VHD specification computes for that size, which Windows writes too:
//!   it may cover a little less than the size (10 MiB is 301/4/17 = 10,479,616 bytes), and
//!   every reader that sizes a disk by its footer (Hyper-V, Azure, qemu-img for any creator but
//!   `vpc ` and `qemu`, vdisk) sees the exact size. The creator application is `vdsk`, so qemu-img
//!   does not take the geometry for the size.
//!
//! A VHD holds whole 512-byte sectors: a virtual size that is not a multiple of 512 is rounded up
//! to the next sector, as qemu-img does (the added bytes read as zero).
//!
//! # Fixed
//!
//! The guest data at its own offset, then the 512-byte footer: the file is exactly the virtual
//! size plus 512 bytes. The whole file is allocated with `fallocate` when the writer is created
//! (Hyper-V refuses sparse VHD files, and Azure wants a fixed disk), so all-zero data need not
//! be written: allocated space that was never written reads as zeros. Where the file system
//! cannot preallocate, every byte is written, zeros included, so the file is still not sparse.
//! qemu-img's fixed VHD, by contrast, is a sparse file.
//!
//! # Dynamic
//!
//! Footer copy at 0, dynamic header at 512, BAT at 1536, then the blocks as Windows lays them
//! out: 2 MiB blocks, each preceded by its 512-byte sector bitmap (all bits set) placed so that the
//! block's data starts on a 4 KiB boundary (a block takes 2 MiB + 4 KiB of file), and the footer
//! in the place of the next block's bitmap, so the file ends on a 4 KiB boundary. Blocks are
//! allocated in the order their first non-zero data arrives (an atomic bump pointer), so threads
//! never wait for one another; all-zero blocks stay unallocated. The BAT, header and both
//! footers are written by `finish`. The largest dynamic disk is 2040 GiB (the specification's
//! limit: BAT entries are 32-bit sector numbers).
//!
//! # Measure
//!
//! `required` counts the 2 MiB blocks the source has data in, `fully-allocated` every block; for
//! a fixed disk both are the virtual size plus 512. `qemu-img measure` does not support `vpc`
//! ("does not support size measurement"), so the figures are checked against the files this
//! writer makes: for a source whose data blocks hold non-zero bytes, `required` is the exact
//! file length. A zero-size fixed disk (a lone footer) is valid, but qemu-img 10 cannot open it,
//! not even the one it makes itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::dynamic::{
    RawHeader, HEADER_CHECKSUM_FIELD, HEADER_MAGIC, HEADER_SIZE, MAX_BLOCK_SIZE, SECTOR, UNALLOCATED,
};
use super::footer::{checksum, Geometry, RawFooter, FOOTER_CHECKSUM_FIELD, FOOTER_MAGIC, FOOTER_SIZE};
use crate::copy::is_zero;
use crate::copy::writer::{
    allocate_file, option_error, parse_bool, prepare_output, write_all_at, write_zeros, Allocated, FormatWriter,
    Measure,
};
use crate::error::{Error, Result};

/// Block size of a dynamic disk: what Hyper-V, Virtual PC and qemu-img write.
const BLOCK_SIZE_U32: u32 = 2 << 20;
const _: () = assert!(BLOCK_SIZE_U32 <= MAX_BLOCK_SIZE);
/// [`BLOCK_SIZE_U32`] for offset arithmetic.
const BLOCK_SIZE: u64 = BLOCK_SIZE_U32 as u64;

/// The file space a dynamic block takes: its data plus 4 KiB, so that the sector bitmap sits in
/// the last sector before a 4 KiB-aligned data area (Windows' layout).
const BLOCK_SLOT: u64 = BLOCK_SIZE + BITMAP_SLOT;

/// Room before each block's data for its sector bitmap, keeping the data 4 KiB-aligned.
const BITMAP_SLOT: u64 = 4096;

/// Bytes of sector bitmap per block: one bit per 512-byte sector of a 2 MiB block.
const BITMAP_SIZE: u64 = BLOCK_SIZE / SECTOR / 8;
const _: () = assert!(BITMAP_SIZE == SECTOR);

/// The sector bitmap of every written block: all sectors present, as Windows writes it.
const BITMAP: [u8; 512] = [0xff; 512];

/// Where the dynamic header goes (right after the footer copy).
const HEADER_OFFSET: u64 = FOOTER_SIZE;

/// Where the BAT goes (right after the header).
const BAT_OFFSET: u64 = HEADER_OFFSET + HEADER_SIZE;

/// Largest dynamic disk: the specification's 2040 GiB, which keeps every block's sector number
/// inside the 32-bit BAT entries.
const MAX_DYNAMIC_SIZE: u64 = 2040 << 30;

/// A BAT entry being filled by the thread that allocates the block (never a real sector number:
/// blocks of a disk up to [`MAX_DYNAMIC_SIZE`] end far below it).
const RESERVING: u32 = u32::MAX - 1;

/// Granularity of zero detection in fixed disks: all-zero runs of this size are not written.
const ZERO_CHUNK: usize = 64 << 10;

/// The creator application in the footer.
const CREATOR_APP: [u8; 4] = *b"vdsk";

/// The creator host OS: what Windows writes, and what Azure's tools expect.
const CREATOR_HOST: [u8; 4] = *b"Wi2k";

/// The footer's format version, 1.0.
const FORMAT_VERSION: u32 = 0x0001_0000;

/// The dynamic header's version, 1.0.
const HEADER_VERSION: u32 = 0x0001_0000;

/// Footer feature bits: bit 1 is reserved and always set.
const FEATURES: u32 = 2;

/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;

/// Which kind of VHD to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subformat {
    /// Data then footer, fully allocated.
    Fixed,
    /// Footer copy, header, BAT, allocated blocks, footer.
    Dynamic,
}

/// The `-o` options of `-O vpc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VhdOptions {
    /// `subformat`.
    pub(crate) subformat: Subformat,
    /// `force_size`: accepted, with no effect (see the module documentation).
    pub(crate) force_size: bool,
}

impl Default for VhdOptions {
    fn default() -> Self {
        VhdOptions { subformat: Subformat::Dynamic, force_size: false }
    }
}

impl VhdOptions {
    /// Parse `-o` pairs, refusing unknown keys and bad values.
    pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Result<Self> {
        let mut o = VhdOptions::default();
        for (key, value) in pairs {
            match key.as_str() {
                "subformat" => {
                    o.subformat = match value.as_str() {
                        "dynamic" => Subformat::Dynamic,
                        "fixed" => Subformat::Fixed,
                        _ => {
                            return Err(option_error(format!(
                                "vpc: subformat '{value}' is not one of 'dynamic', 'fixed'"
                            )))
                        }
                    }
                }
                "force_size" => o.force_size = parse_bool(key, value)?,
                _ => {
                    return Err(option_error(format!(
                        "vpc: unknown option '{key}' (the options are subformat, force_size)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// The virtual size rounded up to whole sectors, refused past what the subformat can hold.
fn disk_size(virtual_size: u64, subformat: Subformat) -> Result<u64> {
    let size = virtual_size
        .checked_next_multiple_of(SECTOR)
        .filter(|s| s.checked_add(FOOTER_SIZE).is_some())
        .ok_or_else(|| Error::target(format!("a VHD cannot hold a virtual size of {virtual_size} bytes")))?;
    if subformat == Subformat::Dynamic && size > MAX_DYNAMIC_SIZE {
        return Err(Error::target(format!(
            "a dynamic VHD holds at most {MAX_DYNAMIC_SIZE} bytes (2040 GiB), not {size}: use -o subformat=fixed, or VHDX"
        )));
    }
    Ok(size)
}

/// Layout of a dynamic disk of `size` bytes: (BAT entries, offset of the first block slot).
fn dynamic_layout(size: u64) -> (u64, u64) {
    let entries = size.div_ceil(BLOCK_SIZE);
    let first_slot = (BAT_OFFSET + entries * 4).next_multiple_of(BITMAP_SLOT);
    (entries, first_slot)
}

/// Length of a dynamic disk with `blocks` blocks: the footer takes the place of the next
/// block's sector bitmap, so the file ends on a 4 KiB boundary (Windows' layout).
fn dynamic_file_len(first_slot: u64, blocks: u64) -> u64 {
    first_slot + blocks * BLOCK_SLOT + BITMAP_SLOT
}

/// Bytes the output needs: `required` for the blocks `allocated` reports, `fully-allocated` for
/// every block.
pub(crate) fn measure(virtual_size: u64, allocated: &Allocated<'_>, options: &VhdOptions) -> Result<Measure> {
    let size = disk_size(virtual_size, options.subformat)?;
    match options.subformat {
        Subformat::Fixed => {
            let total = size + FOOTER_SIZE;
            Ok(Measure { required: total, fully_allocated: total })
        }
        Subformat::Dynamic => {
            let (entries, first_slot) = dynamic_layout(size);
            let used = allocated(BLOCK_SIZE)?.min(entries);
            Ok(Measure {
                required: dynamic_file_len(first_slot, used),
                fully_allocated: dynamic_file_len(first_slot, entries),
            })
        }
    }
}

/// Start writing a VHD of `virtual_size` bytes into `file` (a new, empty file).
pub(crate) fn create(file: File, virtual_size: u64, options: &VhdOptions) -> Result<Box<dyn FormatWriter>> {
    create_with(file, virtual_size, options, true)
}

/// [`create`], trying to preallocate a fixed disk when `preallocate` (tests turn it off to check
/// the dense writes used where the file system cannot preallocate).
fn create_with(
    file: File,
    virtual_size: u64,
    options: &VhdOptions,
    preallocate: bool,
) -> Result<Box<dyn FormatWriter>> {
    let size = disk_size(virtual_size, options.subformat)?;
    prepare_output(&file, "VHD")?;
    let footer = footer_bytes(size, options.subformat, now_vhd(), random_id());
    let kind = match options.subformat {
        Subformat::Fixed => {
            let len = size + FOOTER_SIZE;
            let allocated = preallocate && allocate_file(&file, len, "VHD")?;
            if !allocated {
                file.set_len(len).map_err(|e| Error::io("setting the length of the fixed VHD", e))?;
            }
            Kind::Fixed { dense: !allocated }
        }
        Subformat::Dynamic => {
            let (entries, first_slot) = dynamic_layout(size);
            let bat = (0..entries).map(|_| AtomicU32::new(UNALLOCATED)).collect();
            Kind::Dynamic(Dynamic { bat, first_slot, slots: AtomicU64::new(0) })
        }
    };
    Ok(Box::new(VhdWriter { file, size, footer, kind }))
}

/// The writer of one VHD.
#[derive(Debug)]
struct VhdWriter {
    file: File,
    /// The virtual size (whole sectors).
    size: u64,
    /// The complete footer, checksum included.
    footer: [u8; 512],
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// `dense`: the file could not be preallocated, so zeros are written too.
    Fixed {
        dense: bool,
    },
    Dynamic(Dynamic),
}

/// The allocation state of a dynamic disk.
#[derive(Debug)]
struct Dynamic {
    /// Per block: [`UNALLOCATED`], [`RESERVING`], or the sector of its bitmap.
    bat: Vec<AtomicU32>,
    /// File offset of the first block slot.
    first_slot: u64,
    /// Slots handed out so far (the bump pointer).
    slots: AtomicU64,
}

impl Dynamic {
    /// The bitmap sector of block `index`, allocating the block (and writing its bitmap) on its
    /// first use. Exactly one thread allocates a block; others asking at the same time wait.
    fn block(&self, file: &File, index: usize) -> Result<u64> {
        let Some(entry) = self.bat.get(index) else {
            return Err(Error::target(format!("VHD block {index} is past the end of the disk")));
        };
        loop {
            match entry.load(Ordering::Acquire) {
                UNALLOCATED => {
                    if entry.compare_exchange(UNALLOCATED, RESERVING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        continue;
                    }
                    match self.allocate(file) {
                        Ok(sector) => {
                            entry.store(sector, Ordering::Release);
                            return Ok(u64::from(sector) * SECTOR + BITMAP_SIZE);
                        }
                        Err(e) => {
                            entry.store(UNALLOCATED, Ordering::Release);
                            return Err(e);
                        }
                    }
                }
                RESERVING => std::thread::yield_now(),
                sector => return Ok(u64::from(sector) * SECTOR + BITMAP_SIZE),
            }
        }
    }

    /// Take the next block slot and write its sector bitmap; returns the bitmap's sector.
    fn allocate(&self, file: &File) -> Result<u32> {
        let slot = self.slots.fetch_add(1, Ordering::Relaxed);
        let bitmap_at = self.first_slot + slot * BLOCK_SLOT + BITMAP_SLOT - BITMAP_SIZE;
        let sector = u32::try_from(bitmap_at / SECTOR)
            .ok()
            .filter(|&s| s < RESERVING)
            .ok_or_else(|| Error::target(format!("a VHD block at {bitmap_at:#x} lies past 2 TiB")))?;
        file.write_all_at(&BITMAP, bitmap_at)
            .map_err(|e| Error::io(format!("writing a VHD sector bitmap at {bitmap_at:#x}"), e))?;
        Ok(sector)
    }
}

impl VhdWriter {
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::target(format!(
                "a write at {offset:#x} (+{len:#x}) reaches past the {}-byte VHD",
                self.size
            ))),
        }
    }

    fn write_at(&self, data: &[u8], at: u64) -> Result<()> {
        write_all_at(&self.file, data, at).map_err(|e| Error::io(format!("writing the VHD at {at:#x}"), e))
    }
}

impl FormatWriter for VhdWriter {
    fn alignment(&self) -> u64 {
        BLOCK_SIZE
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        match &self.kind {
            Kind::Fixed { dense: true } => self.write_at(data, offset),
            Kind::Fixed { dense: false } => {
                // The file is allocated and reads as zeros: write only the non-zero runs.
                let mut run: Option<usize> = None;
                for (i, chunk) in data.chunks(ZERO_CHUNK).enumerate() {
                    let at = i * ZERO_CHUNK;
                    match (is_zero(chunk), run) {
                        (false, None) => run = Some(at),
                        (true, Some(start)) => {
                            self.write_at(&data[start..at], offset + start as u64)?;
                            run = None;
                        }
                        _ => {}
                    }
                }
                if let Some(start) = run {
                    self.write_at(&data[start..], offset + start as u64)?;
                }
                Ok(())
            }
            Kind::Dynamic(d) => {
                let mut pos = offset;
                let mut rest = data;
                while !rest.is_empty() {
                    let in_block = pos % BLOCK_SIZE;
                    let n = usize::try_from(BLOCK_SIZE - in_block).unwrap_or(usize::MAX).min(rest.len());
                    let (piece, tail) = rest.split_at(n);
                    if !is_zero(piece) {
                        let index = usize::try_from(pos / BLOCK_SIZE)
                            .map_err(|_| Error::target(format!("VHD offset {pos:#x} is too large")))?;
                        let data_at = d.block(&self.file, index)?;
                        self.write_at(piece, data_at + in_block)?;
                    }
                    pos += n as u64;
                    rest = tail;
                }
                Ok(())
            }
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if matches!(self.kind, Kind::Fixed { dense: true }) {
            write_zeros(&self.file, offset, len, "VHD")?;
        }
        Ok(())
    }

    fn finish(&self) -> Result<u64> {
        let end = match &self.kind {
            Kind::Fixed { .. } => self.size,
            Kind::Dynamic(d) => {
                let entries = d.bat.len() as u64;
                let header = header_bytes(entries)?;
                let mut bat = Vec::new();
                bat.try_reserve_exact(usize::try_from(d.first_slot - BAT_OFFSET).unwrap_or(usize::MAX))
                    .map_err(|_| Error::limit(format!("a VHD BAT of {entries} entries does not fit in memory")))?;
                for e in &d.bat {
                    bat.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
                }
                // Pad the table with unallocated entries up to the first block slot (a 4 KiB
                // boundary), as Windows does.
                bat.resize(usize::try_from(d.first_slot - BAT_OFFSET).unwrap_or(0), 0xff);
                self.write_at(&self.footer, 0)?;
                self.write_at(&header, HEADER_OFFSET)?;
                self.write_at(&bat, BAT_OFFSET)?;
                dynamic_file_len(d.first_slot, d.slots.load(Ordering::Acquire)) - FOOTER_SIZE
            }
        };
        self.write_at(&self.footer, end)?;
        let len = end + FOOTER_SIZE;
        self.file.set_len(len).map_err(|e| Error::io("setting the length of the VHD", e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing the VHD", e))?;
        Ok(len)
    }
}

/// The CHS geometry the VHD specification assigns to a disk of `size` bytes (its appendix
/// "CHS calculation"): at most 65535/16/255, and covering at most `size`.
pub(super) fn geometry(size: u64) -> Geometry {
    let total = (size / SECTOR).min(65535 * 16 * 255);
    let (sectors, heads, cyl_heads) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let mut sectors = 17;
        let mut cyl_heads = total / sectors;
        let mut heads = cyl_heads.div_ceil(1024).max(4);
        if cyl_heads >= heads * 1024 || heads > 16 {
            sectors = 31;
            heads = 16;
            cyl_heads = total / sectors;
        }
        if cyl_heads >= heads * 1024 {
            sectors = 63;
            heads = 16;
            cyl_heads = total / sectors;
        }
        (sectors, heads, cyl_heads)
    };
    Geometry {
        cylinders: u16::try_from(cyl_heads / heads).unwrap_or(u16::MAX),
        heads: u8::try_from(heads).unwrap_or(16),
        sectors: u8::try_from(sectors).unwrap_or(255),
    }
}

/// The footer of a disk of `size` bytes.
fn footer_bytes(size: u64, subformat: Subformat, timestamp: u32, id: [u8; 16]) -> [u8; 512] {
    let g = geometry(size);
    let mut f = RawFooter::new_zeroed();
    f.cookie = FOOTER_MAGIC;
    f.features = U32::new(FEATURES);
    f.format_version = U32::new(FORMAT_VERSION);
    f.data_offset = U64::new(match subformat {
        Subformat::Fixed => u64::MAX,
        Subformat::Dynamic => HEADER_OFFSET,
    });
    f.timestamp = U32::new(timestamp);
    f.creator_app = CREATOR_APP;
    f.creator_version = U32::new(creator_version());
    f.creator_host = CREATOR_HOST;
    f.original_size = U64::new(size);
    f.current_size = U64::new(size);
    f.cylinders = U16::new(g.cylinders);
    f.heads = g.heads;
    f.sectors = g.sectors;
    f.disk_type = U32::new(match subformat {
        Subformat::Fixed => 2,
        Subformat::Dynamic => 3,
    });
    f.unique_id = id;
    let mut bytes = [0u8; 512];
    bytes.copy_from_slice(f.as_bytes());
    let sum = checksum(&bytes, FOOTER_CHECKSUM_FIELD);
    bytes[FOOTER_CHECKSUM_FIELD].copy_from_slice(&sum.to_be_bytes());
    bytes
}

/// The dynamic disk header for a BAT of `entries` entries at [`BAT_OFFSET`].
fn header_bytes(entries: u64) -> Result<Vec<u8>> {
    let mut h = RawHeader::new_zeroed();
    h.cookie = HEADER_MAGIC;
    h.data_offset = U64::new(u64::MAX);
    h.table_offset = U64::new(BAT_OFFSET);
    h.header_version = U32::new(HEADER_VERSION);
    h.max_table_entries =
        U32::new(u32::try_from(entries).map_err(|_| Error::target(format!("{entries} VHD blocks are too many")))?);
    h.block_size = U32::new(BLOCK_SIZE_U32);
    let mut bytes = h.as_bytes().to_vec();
    let sum = checksum(&bytes, HEADER_CHECKSUM_FIELD);
    bytes[HEADER_CHECKSUM_FIELD].copy_from_slice(&sum.to_be_bytes());
    Ok(bytes)
}

/// vdisk's version as the footer stores it: major in the high 16 bits, minor in the low.
fn creator_version() -> u32 {
    let part = |s: &str| s.parse::<u32>().unwrap_or(0) & 0xffff;
    (part(env!("CARGO_PKG_VERSION_MAJOR")) << 16) | part(env!("CARGO_PKG_VERSION_MINOR"))
}

/// Seconds since 2000-01-01 UTC, now (0 if the clock is before it or past 2136).
fn now_vhd() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| d.as_secs().checked_sub(VHD_EPOCH))
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or(0)
}

/// A random (version 4) UUID for the footer, from the standard library's per-process random
/// hash keys, the clock and a counter: unique, not secret.
fn random_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; 16];
    for half in out.chunks_exact_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

#[cfg(test)]
mod tests;
