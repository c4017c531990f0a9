//! Persistent dirty bitmaps: listed by `describe` and counted by `check`; they never change what
//! the guest reads.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::error::invalid;
use super::header::{slice, until_nul, BitmapsExt};
use crate::error::Result;
use crate::image::OpenContext;
use crate::io::ReadAt;

/// Bitmap flag: the bitmap is in use (was not saved cleanly).
pub(super) const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: the bitmap tracks writes automatically.
pub(super) const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag: extra data may be ignored.
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The only bitmap type defined: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Granularity bounds (qemu's): 512 B to 2 GiB.
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Longest bitmap name (qemu's limit).
const MAX_NAME: u16 = 1023;
/// Most entries in one bitmap table (qemu's limit).
pub(super) const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;

/// A bitmap directory entry's fixed part (big-endian, 24 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBitmapEntry {
    /// Offset of the bitmap table.
    table_offset: U64,
    /// Entries in the bitmap table.
    table_size: U32,
    /// Flags (in use, auto, extra data compatible).
    flags: U32,
    /// Bitmap type (1: dirty tracking).
    kind: u8,
    /// log2 of the bytes each bit covers.
    granularity_bits: u8,
    /// Length of the name.
    name_size: U16,
    /// Length of the extra data.
    extra_data_size: U32,
}
const _: () = assert!(size_of::<RawBitmapEntry>() == 24);

/// One persistent bitmap.
#[derive(Clone, Debug)]
pub(super) struct Bitmap {
    /// Its name.
    pub(super) name: String,
    /// Flags.
    pub(super) flags: u32,
    /// log2 of its granularity.
    pub(super) granularity_bits: u8,
    /// Offset of its bitmap table.
    pub(super) table_offset: u64,
    /// Entries in its bitmap table.
    pub(super) table_size: u32,
}

impl Bitmap {
    /// As `qemu-img info` lists it under `format-specific.data.bitmaps`.
    pub(super) fn info(&self) -> serde_json::Value {
        let mut flags = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            flags.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            flags.push("auto");
        }
        serde_json::json!({
            "flags": flags,
            "name": self.name,
            "granularity": 1u64 << self.granularity_bits,
        })
    }
}

/// Read and validate the bitmap directory.
pub(super) fn read_directory(
    ctx: &OpenContext<'_>,
    src: &dyn ReadAt,
    ext: &BitmapsExt,
    cluster_size: u64,
) -> Result<Vec<Bitmap>> {
    let what = "bitmap directory";
    let at = ext.directory_offset;
    if ext.directory_size == 0 {
        return Err(invalid(what, at, "is empty"));
    }
    if at % cluster_size != 0 {
        return Err(invalid(what, at, "is not cluster aligned"));
    }
    // The size is bounded by MAX_BITMAP_DIRECTORY (checked with the extension) and by the file.
    ctx.budget.reserve(what, ext.directory_size)?;
    let dir = crate::io::read_vec(src, at, ext.directory_size, what)?;
    let mut bitmaps = Vec::new();
    let mut off = 0u64;
    while off < ext.directory_size {
        let entry_at = at + off;
        let raw = slice(&dir, off, size_of::<RawBitmapEntry>() as u64)
            .and_then(|b| RawBitmapEntry::read_from_bytes(b).ok())
            .ok_or_else(|| invalid(what, entry_at, "entry runs past the end of the directory"))?;
        if bitmaps.len() >= ext.count as usize {
            return Err(invalid(what, at, format!("holds more bitmaps than the {} the header says", ext.count)));
        }
        let extra = u64::from(raw.extra_data_size.get());
        let name_size = raw.name_size.get();
        let name_at = off + size_of::<RawBitmapEntry>() as u64 + extra;
        let name = slice(&dir, name_at, u64::from(name_size))
            .ok_or_else(|| invalid(what, entry_at, "entry runs past the end of the directory"))?;
        let name = String::from_utf8_lossy(until_nul(name)).into_owned();
        let flags = raw.flags.get();
        let table_size = raw.table_size.get();
        let table_offset = raw.table_offset.get();
        let granularity_bits = raw.granularity_bits;
        let bad = if extra != 0 {
            Some("extra data is not supported".to_string())
        } else if raw.kind != TYPE_DIRTY_TRACKING {
            Some(format!("unknown bitmap type {}", raw.kind))
        } else if !GRANULARITY_BITS.contains(&granularity_bits) {
            Some(format!("granularity 2^{granularity_bits} is outside 2^9..2^31"))
        } else if flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            Some(format!("reserved flags set ({flags:#x})"))
        } else if name_size > MAX_NAME {
            Some(format!("name of {name_size} bytes is too long"))
        } else if table_size > MAX_TABLE_ENTRIES {
            Some(format!("bitmap table of {table_size} entries is too large"))
        } else if table_offset == 0 || table_offset % cluster_size != 0 {
            Some(format!("bitmap table offset {table_offset:#x} is not cluster aligned"))
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(invalid(what, entry_at, format!("bitmap '{name}': {why}")));
        }
        bitmaps.push(Bitmap { name, flags, granularity_bits, table_offset, table_size });
        off = (name_at + u64::from(name_size)).next_multiple_of(8);
    }
    if bitmaps.len() != ext.count as usize {
        return Err(invalid(what, at, format!("holds {} bitmaps, the header says {}", bitmaps.len(), ext.count)));
    }
    Ok(bitmaps)
}
