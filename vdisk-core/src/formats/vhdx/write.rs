//! The VHDX writer (`-O vhdx`): dynamic and fixed disks laid out as Hyper-V lays them out, fed by
//! the copy engine through [`FormatWriter`].
//!
//! # Options
//!
//! qemu-img's names where it has them:
//!
//! * `subformat=dynamic` (default) or `fixed`.
//! * `block_size`: payload block size, a power of two from 1 MiB to 256 MiB (suffixes `K`, `M`,
//!   `G` allowed); default 32 MiB, what Hyper-V writes. `0` means the default (qemu-img's `0`
//!   picks 8 to 64 MiB by disk size).
//! * `log_size`: a multiple of 1 MiB, default 1 MiB. The log is written empty (log GUID zero).
//! * `block_state_zero=on|off`, default `off`: blocks that hold no data are recorded as
//!   PAYLOAD_BLOCK_NOT_PRESENT (what Hyper-V writes for blocks never written); with `on` as
//!   PAYLOAD_BLOCK_ZERO, which states that they read as zero (in a fixed disk their space stays
//!   reserved in the file, and the entry's offset is 0 as Hyper-V requires for that state).
//!   qemu-img's default is `on`, so its fixed disks hold ZERO blocks rather than present ones.
//! * `logical_sector_size=512|4096` (vdisk's own; qemu-img cannot make 4 KiB logical sectors),
//!   default 512. The physical sector size is always 4096, as Hyper-V writes it.
//!
//! The virtual size is rounded up to whole logical sectors (the format cannot say otherwise); at
//! most 64 TiB.
//!
//! # Layout
//!
//! The header section (file type identifier with creator `vdisk <version>`, two headers with
//! sequence numbers 1 and 2 and random file and data write GUIDs, the region table and its copy
//! with the BAT and metadata regions marked required), the log at 1 MiB, the metadata region after
//! the log (file parameters, virtual disk size, logical and physical sector size, page 83 data
//! with a random disk id), the BAT after the metadata (payload entries with a sector bitmap entry,
//! never present here, after every chunk-ratio of them), then the payload blocks, each
//! 1 MiB-aligned. With the defaults this is Hyper-V's layout: log at 1 MiB, metadata at 2 MiB, BAT
//! at 3 MiB, data from 4 MiB.
//!
//! A dynamic disk allocates a block at the end of the file when its first non-zero data arrives
//! (an atomic bump pointer: blocks land in arrival order and threads never wait for one
//! another); blocks with no non-zero byte stay unallocated, and zero runs (64 KiB granules)
//! inside an allocated block are not written: the new file reads as zero there. A fixed disk has
//! every block at its own place, FULLY_PRESENT, the file parameters' LeaveBlocksAllocated flag
//! set, and the whole file allocated with `fallocate` when the writer is created (so all-zero
//! data need not be written, and the file is not sparse as qemu-img's is); where the file system
//! cannot preallocate, every byte is written, zeros included. The BAT, metadata, region tables,
//! headers and file identifier are written by `finish`.
//!
//! # Measure
//!
//! `required` counts the payload blocks the source has data in, `fully-allocated` every block;
//! both add the header section, log, metadata and BAT regions. `qemu-img measure` does not
//! support `vhdx`, so the figures are checked against the files this writer makes: for a source
//! whose data blocks hold non-zero bytes, `required` is the exact file length. A zero-size disk
//! is written as the specification allows, but qemu-img 10 cannot open it (its unsigned BAT
//! arithmetic wants a BAT region of hundreds of MiB for an empty disk).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::bat::{
    OFFSET_SHIFT, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_ZERO, SECTORS_PER_BITMAP_BLOCK,
};
use super::crc32c::crc32c_with_zeroed_field;
use super::guid::Guid;
use super::header::{
    self, RawFileIdentifier, RawHeader, FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SIGNATURE, HEADER_SIZE, HEADER_VERSION,
};
use super::metadata::{
    self, RawFileParameters, RawMetadataEntry, RawMetadataHeader, FILE_PARAMETERS, FLAG_IS_REQUIRED,
    LOGICAL_SECTOR_SIZE, MAX_BLOCK_SIZE, MAX_VIRTUAL_DISK_SIZE, METADATA_SIGNATURE, MIN_BLOCK_SIZE, PAGE_83_DATA,
    PHYSICAL_SECTOR_SIZE, VIRTUAL_DISK_SIZE,
};
use super::region::{
    self, RawRegionEntry, RawRegionHeader, BAT_REGION, METADATA_REGION, REGION_SIGNATURE, REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
};
use super::MIB;
use crate::copy::is_zero;
use crate::copy::writer::{
    allocate_file, option_error, parse_bool, parse_size, prepare_output, write_all_at, write_zeros, Allocated,
    FormatWriter, Measure,
};
use crate::error::{Error, Result};

/// Hyper-V's payload block size, the default.
const DEFAULT_BLOCK_SIZE: u64 = 32 * MIB;

/// The default log size (Hyper-V's and qemu-img's).
const DEFAULT_LOG_SIZE: u64 = MIB;

/// Largest log accepted: the header stores the log length in 32 bits.
const MAX_LOG_SIZE: u64 = 4095 * MIB;

/// The physical sector size written: Hyper-V's.
const PHYSICAL_SECTOR: u32 = 4096;

/// Where the log starts: right after the header section.
const LOG_OFFSET: u64 = MIB;

/// Length of the metadata region (the table and its few items fit in its first 64 KiB + 40 bytes).
const METADATA_REGION_LENGTH: u64 = MIB;

/// Offset of the first metadata item inside the metadata region (right after the table).
const ITEMS_OFFSET: u32 = 64 << 10;
const _: () = assert!(ITEMS_OFFSET as u64 == metadata::TABLE_SIZE);

/// Metadata entry flags: IsVirtualDisk (bit 1).
const FLAG_IS_VIRTUAL_DISK: u32 = 1 << 1;

/// File parameters flag: LeaveBlocksAllocated (a fixed disk).
const LEAVE_BLOCKS_ALLOCATED: u32 = 1;

/// Region table entry flag: a reader that does not know the region must refuse the file.
const REGION_REQUIRED: u32 = 1;

/// A BAT entry being filled by the thread that allocates the block (never a real entry: its
/// state bits would be 7).
const RESERVING: u64 = u64::MAX;

/// Granularity of zero detection in fixed disks: all-zero runs of this size are not written.
const ZERO_CHUNK: usize = 64 << 10;

/// Which kind of VHDX to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subformat {
    /// Blocks allocated as data arrives.
    Dynamic,
    /// Every block allocated, the file fully allocated.
    Fixed,
}

/// The `-o` options of `-O vhdx`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VhdxOptions {
    /// `subformat`.
    pub(crate) subformat: Subformat,
    /// `block_size`, bytes.
    pub(crate) block_size: u64,
    /// `log_size`, bytes.
    pub(crate) log_size: u64,
    /// `block_state_zero`.
    pub(crate) block_state_zero: bool,
    /// `logical_sector_size`, 512 or 4096.
    pub(crate) logical_sector_size: u64,
}

impl Default for VhdxOptions {
    fn default() -> Self {
        VhdxOptions {
            subformat: Subformat::Dynamic,
            block_size: DEFAULT_BLOCK_SIZE,
            log_size: DEFAULT_LOG_SIZE,
            block_state_zero: false,
            logical_sector_size: 512,
        }
    }
}

impl VhdxOptions {
    /// Parse `-o` pairs, refusing unknown keys and bad values.
    pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Result<Self> {
        let mut o = VhdxOptions::default();
        for (key, value) in pairs {
            match key.as_str() {
                "subformat" => {
                    o.subformat = match value.as_str() {
                        "dynamic" => Subformat::Dynamic,
                        "fixed" => Subformat::Fixed,
                        _ => {
                            return Err(option_error(format!(
                                "vhdx: subformat '{value}' is not one of 'dynamic', 'fixed'"
                            )))
                        }
                    }
                }
                "block_size" => {
                    let v = parse_size(key, value)?;
                    o.block_size = match v {
                        0 => DEFAULT_BLOCK_SIZE,
                        v if v.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&v) => v,
                        _ => {
                            return Err(option_error(format!(
                                "vhdx: block_size {v} is not a power of two from 1 MiB to 256 MiB"
                            )))
                        }
                    }
                }
                "log_size" => {
                    let v = parse_size(key, value)?;
                    if v == 0 || v % MIB != 0 || v > MAX_LOG_SIZE {
                        return Err(option_error(format!(
                            "vhdx: log_size {v} is not a multiple of 1 MiB from 1 MiB to {MAX_LOG_SIZE} bytes"
                        )));
                    }
                    o.log_size = v;
                }
                "block_state_zero" => o.block_state_zero = parse_bool(key, value)?,
                "logical_sector_size" => {
                    o.logical_sector_size = match parse_size(key, value)? {
                        v @ (512 | 4096) => v,
                        v => {
                            return Err(option_error(format!("vhdx: logical_sector_size {v} is neither 512 nor 4096")))
                        }
                    }
                }
                _ => {
                    return Err(option_error(format!(
                        "vhdx: unknown option '{key}' (the options are subformat, block_size, log_size, \
                         block_state_zero, logical_sector_size)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Where everything goes in a VHDX of `size` bytes with `o`'s parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// The virtual size (whole logical sectors).
    size: u64,
    block_size: u64,
    /// Payload blocks covering the disk.
    blocks: u64,
    /// Payload blocks per sector bitmap entry.
    chunk_ratio: u64,
    /// Entries in the BAT (payload and sector bitmap, interleaved).
    bat_entries: u64,
    metadata_offset: u64,
    bat_offset: u64,
    bat_length: u64,
    /// Where payload blocks start.
    data_offset: u64,
}

impl Layout {
    fn new(virtual_size: u64, o: &VhdxOptions) -> Result<Layout> {
        let size = virtual_size
            .checked_next_multiple_of(o.logical_sector_size)
            .filter(|&s| s <= MAX_VIRTUAL_DISK_SIZE)
            .ok_or_else(|| {
                Error::target(format!(
                    "a VHDX holds at most 64 TiB ({MAX_VIRTUAL_DISK_SIZE} bytes), not {virtual_size}"
                ))
            })?;
        let block_size = o.block_size;
        let blocks = size.div_ceil(block_size);
        let chunk_ratio = SECTORS_PER_BITMAP_BLOCK * o.logical_sector_size / block_size;
        let bat_entries = if blocks == 0 { 0 } else { blocks + (blocks - 1) / chunk_ratio };
        let metadata_offset = LOG_OFFSET + o.log_size;
        let bat_offset = metadata_offset + METADATA_REGION_LENGTH;
        let bat_length = (bat_entries * 8).next_multiple_of(MIB).max(MIB);
        Ok(Layout {
            size,
            block_size,
            blocks,
            chunk_ratio,
            bat_entries,
            metadata_offset,
            bat_offset,
            bat_length,
            data_offset: bat_offset + bat_length,
        })
    }

    /// The file length with `blocks` payload blocks allocated.
    fn file_len(&self, blocks: u64) -> u64 {
        self.data_offset + blocks * self.block_size
    }
}

/// Bytes the output needs: `required` for the blocks `allocated` reports, `fully-allocated` for
/// every block.
pub(crate) fn measure(virtual_size: u64, allocated: &Allocated<'_>, options: &VhdxOptions) -> Result<Measure> {
    let l = Layout::new(virtual_size, options)?;
    let full = l.file_len(l.blocks);
    let required = match options.subformat {
        Subformat::Fixed => full,
        Subformat::Dynamic => l.file_len(allocated(l.block_size)?.min(l.blocks)),
    };
    Ok(Measure { required, fully_allocated: full })
}

/// Start writing a VHDX of `virtual_size` bytes into `file` (a new, empty file).
pub(crate) fn create(file: File, virtual_size: u64, options: &VhdxOptions) -> Result<Box<dyn FormatWriter>> {
    create_with(file, virtual_size, options, true)
}

/// [`create`], trying to preallocate a fixed disk when `preallocate` (tests turn it off to check
/// the dense writes used where the file system cannot preallocate).
fn create_with(
    file: File,
    virtual_size: u64,
    options: &VhdxOptions,
    preallocate: bool,
) -> Result<Box<dyn FormatWriter>> {
    let layout = Layout::new(virtual_size, options)?;
    prepare_output(&file, "VHDX")?;
    let blocks = usize::try_from(layout.blocks)
        .map_err(|_| Error::limit(format!("{} VHDX blocks do not fit in memory", layout.blocks)))?;
    let mut bat = Vec::new();
    bat.try_reserve_exact(blocks)
        .map_err(|_| Error::limit(format!("the BAT of {blocks} VHDX blocks does not fit in memory")))?;
    bat.resize_with(blocks, || AtomicU64::new(PAYLOAD_BLOCK_NOT_PRESENT));
    let mut dense = false;
    if options.subformat == Subformat::Fixed {
        let len = layout.file_len(layout.blocks);
        if !(preallocate && allocate_file(&file, len, "VHDX")?) {
            // Write what the engine will not: the metadata area and the tail of the last block.
            dense = true;
            file.set_len(len).map_err(|e| Error::io("setting the length of the fixed VHDX", e))?;
            write_zeros(&file, 0, layout.data_offset, "VHDX")?;
            let end = layout.data_offset + layout.size;
            write_zeros(&file, end, len - end, "VHDX")?;
        }
    }
    Ok(Box::new(VhdxWriter { file, layout, options: options.clone(), bat, slots: AtomicU64::new(0), dense }))
}

/// The writer of one VHDX.
#[derive(Debug)]
struct VhdxWriter {
    file: File,
    layout: Layout,
    options: VhdxOptions,
    /// Per payload block: 0 (nothing written yet), [`RESERVING`], or its final FULLY_PRESENT entry.
    bat: Vec<AtomicU64>,
    /// Blocks allocated so far in a dynamic disk (the bump pointer).
    slots: AtomicU64,
    /// A fixed disk whose file could not be preallocated: zeros are written too.
    dense: bool,
}

impl VhdxWriter {
    /// File offset of payload block `index`, allocating it on first use (dynamic) or marking it
    /// written (fixed). Exactly one thread allocates a block; others asking at the same time wait.
    fn block(&self, index: u64) -> Result<u64> {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.bat.get(i))
            .ok_or_else(|| Error::target(format!("VHDX block {index} is past the end of the disk")))?;
        if self.options.subformat == Subformat::Fixed {
            let offset = self.layout.data_offset + index * self.layout.block_size;
            entry.store(offset | PAYLOAD_BLOCK_FULLY_PRESENT, Ordering::Relaxed);
            return Ok(offset);
        }
        loop {
            match entry.load(Ordering::Acquire) {
                PAYLOAD_BLOCK_NOT_PRESENT => {
                    if entry
                        .compare_exchange(PAYLOAD_BLOCK_NOT_PRESENT, RESERVING, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    let slot = self.slots.fetch_add(1, Ordering::Relaxed);
                    let offset = self.layout.data_offset + slot * self.layout.block_size;
                    entry.store(offset | PAYLOAD_BLOCK_FULLY_PRESENT, Ordering::Release);
                    return Ok(offset);
                }
                RESERVING => std::thread::yield_now(),
                e => return Ok(e >> OFFSET_SHIFT << OFFSET_SHIFT),
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.size => Ok(()),
            _ => Err(Error::target(format!(
                "a write at {offset:#x} (+{len:#x}) reaches past the {}-byte VHDX",
                self.layout.size
            ))),
        }
    }

    fn write_at(&self, data: &[u8], at: u64) -> Result<()> {
        write_all_at(&self.file, data, at).map_err(|e| Error::io(format!("writing the VHDX at {at:#x}"), e))
    }

    /// Write `data` at file offset `at`, skipping all-zero runs (the space reads as zero).
    fn write_nonzero(&self, data: &[u8], at: u64) -> Result<()> {
        let mut run: Option<usize> = None;
        for (i, chunk) in data.chunks(ZERO_CHUNK).enumerate() {
            let here = i * ZERO_CHUNK;
            match (is_zero(chunk), run) {
                (false, None) => run = Some(here),
                (true, Some(start)) => {
                    self.write_at(&data[start..here], at + start as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        match run {
            Some(start) => self.write_at(&data[start..], at + start as u64),
            None => Ok(()),
        }
    }

    /// The BAT as stored: payload entries with a sector bitmap entry (not present) after every
    /// chunk ratio of them.
    fn bat_bytes(&self) -> Result<Vec<u8>> {
        let l = &self.layout;
        let len = usize::try_from(l.bat_entries * 8).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        out.try_reserve_exact(len)
            .map_err(|_| Error::limit(format!("a VHDX BAT of {len} bytes does not fit in memory")))?;
        let absent = if self.options.block_state_zero { PAYLOAD_BLOCK_ZERO } else { PAYLOAD_BLOCK_NOT_PRESENT };
        for (i, e) in (0u64..).zip(&self.bat) {
            if i > 0 && i % l.chunk_ratio == 0 {
                out.extend_from_slice(&0u64.to_le_bytes());
            }
            let entry = match e.load(Ordering::Acquire) {
                PAYLOAD_BLOCK_NOT_PRESENT | RESERVING => match self.options.subformat {
                    // Never written: zero. A fixed disk keeps the block where it belongs.
                    Subformat::Fixed if !self.options.block_state_zero => {
                        (l.data_offset + i * l.block_size) | PAYLOAD_BLOCK_FULLY_PRESENT
                    }
                    _ => absent,
                },
                e => e,
            };
            out.extend_from_slice(&entry.to_le_bytes());
        }
        Ok(out)
    }
}

impl FormatWriter for VhdxWriter {
    fn alignment(&self) -> u64 {
        // Blocks may be written piecewise (see `block`), so items need only be MiB-aligned.
        MIB
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let l = &self.layout;
        self.check_range(offset, data.len() as u64)?;
        if self.dense {
            // A fixed disk's blocks lie in guest order from the data offset: zeros too go there.
            self.write_at(data, l.data_offset + offset)?;
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let in_block = pos % l.block_size;
            let n = usize::try_from(l.block_size - in_block).unwrap_or(usize::MAX).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            if !is_zero(piece) {
                let at = self.block(pos / l.block_size)? + in_block;
                // A new block's space in the new file reads as zero until written, so zero runs
                // inside it are left out (as they are in a preallocated fixed disk).
                if !self.dense {
                    self.write_nonzero(piece, at)?;
                }
            }
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.dense {
            write_zeros(&self.file, self.layout.data_offset + offset, len, "VHDX")?;
        }
        Ok(())
    }

    fn finish(&self) -> Result<u64> {
        let l = &self.layout;
        let len = match self.options.subformat {
            Subformat::Fixed => l.file_len(l.blocks),
            Subformat::Dynamic => l.file_len(self.slots.load(Ordering::Acquire)),
        };
        self.write_at(&self.bat_bytes()?, l.bat_offset)?;
        self.write_at(&metadata_bytes(l, &self.options)?, l.metadata_offset)?;
        let regions = region_table_bytes(l)?;
        for at in REGION_TABLE_OFFSETS {
            self.write_at(&regions, at)?;
        }
        let (file_write, data_write) = (Guid::random(), Guid::random());
        for (sequence, at) in (1u64..).zip(HEADER_OFFSETS) {
            self.write_at(&header_bytes(sequence, file_write, data_write, self.options.log_size)?, at)?;
        }
        self.write_at(&file_identifier_bytes(), 0)?;
        self.file.set_len(len).map_err(|e| Error::io("setting the length of the VHDX", e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing the VHDX", e))?;
        Ok(len)
    }
}

/// The file type identifier: signature and creator.
fn file_identifier_bytes() -> Vec<u8> {
    let mut fti = RawFileIdentifier::new_zeroed();
    fti.signature = *FILE_SIGNATURE;
    let creator = concat!("vdisk ", env!("CARGO_PKG_VERSION"));
    for (slot, unit) in fti.creator.chunks_exact_mut(2).zip(creator.encode_utf16()) {
        slot.copy_from_slice(&unit.to_le_bytes());
    }
    fti.as_bytes().to_vec()
}

/// One header copy.
fn header_bytes(sequence: u64, file_write: Guid, data_write: Guid, log_size: u64) -> Result<Vec<u8>> {
    let mut h = RawHeader::new_zeroed();
    h.signature = *HEADER_SIGNATURE;
    h.sequence_number = U64::new(sequence);
    h.file_write_guid = file_write;
    h.data_write_guid = data_write;
    h.log_version = U16::new(0);
    h.version = U16::new(HEADER_VERSION);
    h.log_length =
        U32::new(u32::try_from(log_size).map_err(|_| option_error(format!("vhdx: log_size {log_size} is too large")))?);
    h.log_offset = U64::new(LOG_OFFSET);
    let mut bytes = h.as_bytes().to_vec();
    debug_assert_eq!(bytes.len(), HEADER_SIZE);
    let sum = crc32c_with_zeroed_field(&bytes, header::CHECKSUM_FIELD);
    bytes[header::CHECKSUM_FIELD..header::CHECKSUM_FIELD + 4].copy_from_slice(&sum.to_le_bytes());
    Ok(bytes)
}

/// The region table (both copies are the same): the BAT and the metadata region, required.
fn region_table_bytes(l: &Layout) -> Result<Vec<u8>> {
    let mut out = vec![0u8; REGION_TABLE_SIZE];
    let mut h = RawRegionHeader::new_zeroed();
    h.signature = *REGION_SIGNATURE;
    h.entry_count = U32::new(2);
    let entry = |guid: Guid, offset: u64, length: u64| -> Result<RawRegionEntry> {
        let mut e = RawRegionEntry::new_zeroed();
        e.guid = guid;
        e.file_offset = U64::new(offset);
        e.length =
            U32::new(u32::try_from(length).map_err(|_| Error::target(format!("a VHDX region of {length} bytes")))?);
        e.required = U32::new(REGION_REQUIRED);
        Ok(e)
    };
    let bat = entry(BAT_REGION, l.bat_offset, l.bat_length)?;
    let metadata = entry(METADATA_REGION, l.metadata_offset, METADATA_REGION_LENGTH)?;
    let mut pos = 0;
    for part in [h.as_bytes(), bat.as_bytes(), metadata.as_bytes()] {
        out[pos..pos + part.len()].copy_from_slice(part);
        pos += part.len();
    }
    let sum = crc32c_with_zeroed_field(&out, region::CHECKSUM_FIELD);
    out[region::CHECKSUM_FIELD..region::CHECKSUM_FIELD + 4].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The metadata region's used part: the table, then the items in Hyper-V's order.
fn metadata_bytes(l: &Layout, o: &VhdxOptions) -> Result<Vec<u8>> {
    let mut params = RawFileParameters::new_zeroed();
    params.block_size =
        U32::new(u32::try_from(l.block_size).map_err(|_| option_error(format!("vhdx: block_size {}", l.block_size)))?);
    params.flags = U32::new(if o.subformat == Subformat::Fixed { LEAVE_BLOCKS_ALLOCATED } else { 0 });
    let logical = u32::try_from(o.logical_sector_size).unwrap_or(512);
    let page83 = Guid::random();
    let items: [(Guid, &[u8], u32); 5] = [
        (FILE_PARAMETERS, params.as_bytes(), FLAG_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE, &l.size.to_le_bytes(), FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_SIZE, &logical.to_le_bytes(), FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_SIZE, &PHYSICAL_SECTOR.to_le_bytes(), FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK),
        (PAGE_83_DATA, page83.as_bytes(), FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK),
    ];
    let mut table = Vec::with_capacity(usize::try_from(ITEMS_OFFSET).unwrap_or(0));
    let mut h = RawMetadataHeader::new_zeroed();
    h.signature = *METADATA_SIGNATURE;
    h.entry_count = U16::new(5);
    table.extend_from_slice(h.as_bytes());
    let mut data = Vec::new();
    for (guid, bytes, flags) in items {
        let mut e = RawMetadataEntry::new_zeroed();
        e.item_id = guid;
        e.offset = U32::new(ITEMS_OFFSET + u32::try_from(data.len()).unwrap_or(0));
        e.length = U32::new(u32::try_from(bytes.len()).unwrap_or(0));
        e.flags = U32::new(flags);
        table.extend_from_slice(e.as_bytes());
        data.extend_from_slice(bytes);
    }
    table.resize(usize::try_from(ITEMS_OFFSET).unwrap_or(0), 0);
    table.extend_from_slice(&data);
    Ok(table)
}

#[cfg(test)]
mod tests;
