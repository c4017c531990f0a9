//! The block allocation table: payload entries with a sector bitmap entry after every
//! `chunk_ratio` of them.

use super::error::corrupt;
use super::metadata::Metadata;
use super::region::Region;
use super::MIB;
use crate::error::Result;
use crate::io::{self, ReadAt};
use crate::limits::{Limits, MetadataBudget};

/// Payload block state: not allocated (a differencing disk reads the parent).
pub(crate) const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
/// Payload block state: content undefined.
const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
/// Payload block state: reads as zero.
pub(crate) const PAYLOAD_BLOCK_ZERO: u64 = 2;
/// Payload block state: unmapped (trimmed).
const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
/// Payload block state of draft 0.95 of the specification for unmapped blocks; qemu reads it as
/// zeros, so files made by early writers keep working.
const PAYLOAD_BLOCK_UNMAPPED_V095: u64 = 5;
/// Payload block state: every sector is stored in this file.
pub(crate) const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
/// Payload block state: the sector bitmap says which sectors are in this file (differencing only).
const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state: no bitmap stored.
const SB_BLOCK_NOT_PRESENT: u64 = 0;
/// Sector bitmap block state: the bitmap is stored at the entry's offset.
const SB_BLOCK_PRESENT: u64 = 6;
/// Mask of the state bits of a BAT entry.
const STATE_MASK: u64 = 0x7;
/// Mask of the reserved bits of a BAT entry (between the state and the offset).
pub(crate) const RESERVED_MASK: u64 = 0xF_FFF8;
/// The file offset is stored in MiB from bit 20 up.
pub(crate) const OFFSET_SHIFT: u32 = 20;
/// Size of a sector bitmap block: one bit per logical sector of `chunk_ratio` payload blocks.
pub(crate) const SECTOR_BITMAP_BLOCK_SIZE: u64 = MIB;
/// Sectors one sector bitmap block describes (2^23: 1 MiB of bits).
pub(crate) const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// Bytes of BAT read at a time while loading it (bounds the transient buffer).
const BAT_READ_CHUNK: u64 = MIB;

/// What a payload block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// PAYLOAD_BLOCK_NOT_PRESENT.
    NotPresent,
    /// PAYLOAD_BLOCK_UNDEFINED.
    Undefined,
    /// PAYLOAD_BLOCK_ZERO.
    Zero,
    /// PAYLOAD_BLOCK_UNMAPPED.
    Unmapped,
    /// PAYLOAD_BLOCK_FULLY_PRESENT, stored at this file offset.
    FullyPresent(u64),
    /// PAYLOAD_BLOCK_PARTIALLY_PRESENT, stored at this file offset; the bitmap says which sectors.
    PartiallyPresent(u64),
}

/// The loaded, validated BAT.
#[derive(Debug)]
pub(crate) struct Bat {
    /// Every entry, payload and sector bitmap interleaved.
    entries: Vec<u64>,
    /// Payload block size.
    pub(crate) block_size: u64,
    /// Payload blocks per sector bitmap block.
    pub(crate) chunk_ratio: u64,
    /// Payload blocks covering the virtual disk.
    pub(crate) data_blocks: u64,
    /// Virtual disk size.
    virtual_size: u64,
    /// Bytes of sector bitmap per payload block.
    pub(crate) bitmap_bytes_per_block: u64,
    /// Offset of the BAT in the file, for messages.
    pub(crate) offset: u64,
}

/// Bytes of payload block `index` inside a disk of `virtual_size` (the last block may be short).
fn block_len(index: u64, block_size: u64, virtual_size: u64) -> u64 {
    let start = index.saturating_mul(block_size);
    virtual_size.saturating_sub(start).min(block_size)
}

impl Bat {
    /// Load the BAT from `region` and validate every entry against `file_size`.
    pub(crate) fn read(
        src: &dyn ReadAt,
        region: Region,
        md: &Metadata,
        limits: &Limits,
        budget: &MetadataBudget,
    ) -> Result<Bat> {
        let block_size = md.block_size;
        let chunk_ratio = SECTORS_PER_BITMAP_BLOCK * md.logical_sector_size / block_size;
        let data_blocks = md.virtual_size.div_ceil(block_size);
        let total = if md.has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        limits.check_table_entries("VHDX BAT", total)?;
        let bytes = io::checked_mul(total, 8, "VHDX BAT")?;
        if bytes > region.length {
            return Err(corrupt(
                "BAT region",
                region.offset,
                format!("{total} entries need {bytes:#x} bytes, more than the region's {:#x}", region.length),
            ));
        }
        if io::checked_end(region.offset, bytes, "VHDX BAT")? > src.size() {
            return Err(corrupt("BAT", region.offset, format!("{bytes:#x} bytes lie past the end of the file")));
        }
        budget.reserve("VHDX BAT", bytes)?;
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(io::to_usize(total, "VHDX BAT")?)
            .map_err(|_| crate::Error::limit(format!("the VHDX BAT of {bytes} bytes does not fit in memory")))?;
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(BAT_READ_CHUNK);
            let buf = io::read_vec(src, region.offset + done, n, "VHDX BAT")?;
            entries.extend(
                buf.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
            );
            done += n;
        }
        let bat = Bat {
            entries,
            block_size,
            chunk_ratio,
            data_blocks,
            virtual_size: md.virtual_size,
            bitmap_bytes_per_block: block_size / md.logical_sector_size / 8,
            offset: region.offset,
        };
        bat.validate(md.has_parent, src.size())?;
        Ok(bat)
    }

    /// Check every payload entry (and the sector bitmap entries of a differencing disk).
    fn validate(&self, has_parent: bool, file_size: u64) -> Result<()> {
        for block in 0..self.data_blocks {
            let index = self.payload_index(block);
            let raw = self.raw(index);
            let state = decode(raw).ok_or_else(|| {
                corrupt(
                    format!("BAT entry {index}"),
                    self.entry_offset(index),
                    format!("state {} is not a payload block state", raw & STATE_MASK),
                )
            })?;
            let (offset, partial) = match state {
                BlockState::FullyPresent(o) => (o, false),
                BlockState::PartiallyPresent(o) => (o, true),
                _ => continue,
            };
            let what = || format!("BAT entry {index} (block {block})");
            if offset == 0 {
                return Err(corrupt(what(), self.entry_offset(index), "a present block has file offset 0"));
            }
            let len = block_len(block, self.block_size, self.virtual_size);
            if !matches!(offset.checked_add(len), Some(end) if end <= file_size) {
                return Err(corrupt(
                    what(),
                    self.entry_offset(index),
                    format!(
                        "the block at {offset:#x} (+{len:#x}) lies past the end of the file ({file_size:#x} bytes): the image is truncated"
                    ),
                ));
            }
            if partial {
                if !has_parent {
                    return Err(corrupt(
                        what(),
                        self.entry_offset(index),
                        "PARTIALLY_PRESENT in a disk without a parent",
                    ));
                }
                if self.bitmap_base(block).is_none() {
                    return Err(corrupt(
                        what(),
                        self.entry_offset(index),
                        "PARTIALLY_PRESENT but the chunk has no sector bitmap",
                    ));
                }
            }
        }
        if has_parent {
            for chunk in 0..self.data_blocks.div_ceil(self.chunk_ratio) {
                let index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
                let raw = self.raw(index);
                let at = self.entry_offset(index);
                match raw & STATE_MASK {
                    SB_BLOCK_NOT_PRESENT => {}
                    SB_BLOCK_PRESENT => {
                        let offset = raw >> OFFSET_SHIFT << OFFSET_SHIFT;
                        if offset == 0
                            || !matches!(offset.checked_add(SECTOR_BITMAP_BLOCK_SIZE), Some(e) if e <= file_size)
                        {
                            return Err(corrupt(
                                format!("BAT entry {index} (sector bitmap {chunk})"),
                                at,
                                format!(
                                    "the sector bitmap at {offset:#x} lies outside the file ({file_size:#x} bytes)"
                                ),
                            ));
                        }
                    }
                    s => {
                        return Err(corrupt(
                            format!("BAT entry {index} (sector bitmap {chunk})"),
                            at,
                            format!("state {s} is not a sector bitmap state"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The raw entry at `index` (0 past the table, which validation rules out for used indexes).
    pub(crate) fn raw(&self, index: u64) -> u64 {
        usize::try_from(index).ok().and_then(|i| self.entries.get(i)).copied().unwrap_or(0)
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// File offset of entry `index`, for messages.
    pub(crate) fn entry_offset(&self, index: u64) -> u64 {
        self.offset.saturating_add(index.saturating_mul(8))
    }

    /// BAT index of payload block `block`.
    pub(crate) fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// True when BAT index `index` holds a sector bitmap entry.
    pub(crate) fn is_bitmap_index(&self, index: u64) -> bool {
        (index + 1) % (self.chunk_ratio + 1) == 0
    }

    /// The state of payload block `block` (validated at load).
    pub(crate) fn payload(&self, block: u64) -> BlockState {
        decode(self.raw(self.payload_index(block))).unwrap_or(BlockState::NotPresent)
    }

    /// File offset of the part of the sector bitmap that covers payload block `block`, when the
    /// chunk's bitmap is present.
    pub(crate) fn bitmap_base(&self, block: u64) -> Option<u64> {
        let chunk = block / self.chunk_ratio;
        let raw = self.raw(chunk * (self.chunk_ratio + 1) + self.chunk_ratio);
        if raw & STATE_MASK != SB_BLOCK_PRESENT {
            return None;
        }
        let base = raw >> OFFSET_SHIFT << OFFSET_SHIFT;
        Some(base + (block % self.chunk_ratio) * self.bitmap_bytes_per_block)
    }

    /// Bytes of payload block `block` inside the virtual disk.
    pub(crate) fn block_len(&self, block: u64) -> u64 {
        block_len(block, self.block_size, self.virtual_size)
    }
}

/// The state of a payload entry, or `None` for a value the specification does not define.
pub(crate) fn decode(raw: u64) -> Option<BlockState> {
    let offset = raw >> OFFSET_SHIFT << OFFSET_SHIFT;
    Some(match raw & STATE_MASK {
        PAYLOAD_BLOCK_NOT_PRESENT => BlockState::NotPresent,
        PAYLOAD_BLOCK_UNDEFINED => BlockState::Undefined,
        PAYLOAD_BLOCK_ZERO => BlockState::Zero,
        PAYLOAD_BLOCK_UNMAPPED | PAYLOAD_BLOCK_UNMAPPED_V095 => BlockState::Unmapped,
        PAYLOAD_BLOCK_FULLY_PRESENT => BlockState::FullyPresent(offset),
        PAYLOAD_BLOCK_PARTIALLY_PRESENT => BlockState::PartiallyPresent(offset),
        _ => return None,
    })
}

/// File offset and state of a sector bitmap entry, when present.
pub(crate) fn bitmap_offset(raw: u64) -> Option<u64> {
    (raw & STATE_MASK == SB_BLOCK_PRESENT).then_some(raw >> OFFSET_SHIFT << OFFSET_SHIFT)
}
