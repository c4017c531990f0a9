//! ESXi space-efficient sparse extents (seSparse, the SESPARSE extents of ESXi 6.5+ snapshots).
//!
//! A constant header (magic 0x00000000cafebabe) names the areas of the file in sectors: a
//! volatile header, a journal, the grain directory, the grain tables, a free bitmap, a back map
//! and the grains. Grains are 4 KiB and a grain table has 4096 u64 entries (16 MiB of disk).
//! A directory entry is 0 (no table) or `0x1000000T_TTTTTTTT`-style: top 32 bits 0x10000000 and
//! the table's index in the low 32 bits. A table entry's top nibble is its type: 0 unallocated,
//! 1 unmapped by SCSI UNMAP (reads as zero), 2 zeroed, 3 allocated with grain index
//! `entry[59:48] | entry[47:0] << 12`.

use std::sync::Arc;

use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, FileId, Location};
use crate::image::OpenContext;
use crate::info::CheckReport;
use crate::io::{read_exact, ReadAt};

use super::grains::{load_tables, read_directory, tables_for_check, GrainLookup, GrainTables, Mem, TableSpec};
use super::header::SECTOR;

/// The constant header magic.
pub(crate) const SESPARSE_MAGIC: u64 = 0xcafe_babe;
/// The volatile header magic.
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The only version ESXi writes (2.1).
const VERSION: u64 = 0x0000_0002_0000_0001;
/// Grain size in sectors (4 KiB), fixed by the format.
const GRAIN_SECTORS: u64 = 8;
/// Grain table size in sectors (32 KiB = 4096 entries), fixed by the format.
const GT_SECTORS: u64 = 64;
/// Entries per grain table.
const GTES_PER_GT: u64 = GT_SECTORS * SECTOR / 8;
/// Directory entry: the tag in the top 32 bits of an allocated entry.
const GD_ALLOCATED_TAG: u64 = 0x1000_0000;

/// Table entry types (top nibble).
const GTE_UNALLOCATED: u64 = 0;
const GTE_UNMAPPED: u64 = 1;
const GTE_ZERO: u64 = 2;
const GTE_ALLOCATED: u64 = 3;

/// Decoded table entry value for a grain that reads as zero (real grain offsets are multiples of
/// 4 KiB, so 1 is free).
const ZERO_ENTRY: u64 = 1;

/// The constant header (first 512 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawConstHeader {
    /// 0x00000000cafebabe.
    magic: U64,
    /// 0x0000000200000001.
    version: U64,
    /// Capacity in sectors.
    capacity: U64,
    /// Grain size in sectors (8).
    grain_size: U64,
    /// Grain table size in sectors (64).
    grain_table_size: U64,
    /// Flags (0).
    flags: U64,
    /// Reserved (0).
    reserved: [U64; 4],
    /// Volatile header offset, sectors.
    volatile_header_offset: U64,
    /// Volatile header size, sectors.
    volatile_header_size: U64,
    /// Journal header offset, sectors.
    journal_header_offset: U64,
    /// Journal header size, sectors.
    journal_header_size: U64,
    /// Journal offset, sectors.
    journal_offset: U64,
    /// Journal size, sectors.
    journal_size: U64,
    /// Grain directory offset, sectors.
    grain_dir_offset: U64,
    /// Grain directory size, sectors.
    grain_dir_size: U64,
    /// Grain tables area offset, sectors.
    grain_tables_offset: U64,
    /// Grain tables area size, sectors.
    grain_tables_size: U64,
    /// Free bitmap offset, sectors.
    free_bitmap_offset: U64,
    /// Free bitmap size, sectors.
    free_bitmap_size: U64,
    /// Back map offset, sectors.
    backmap_offset: U64,
    /// Back map size, sectors.
    backmap_size: U64,
    /// Grains area offset, sectors.
    grains_offset: U64,
    /// Grains area size, sectors.
    grains_size: U64,
    /// Padding.
    pad: [u8; 304],
}
const _: () = assert!(size_of::<RawConstHeader>() == 512);

/// The volatile header (the fields vdisk needs).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawVolatileHeader {
    /// 0x00000000cafecafe.
    magic: U64,
    /// Next free grain table.
    free_gt_number: U64,
    /// Next journal transaction.
    next_txn_seq_number: U64,
    /// Non-zero when the journal must be replayed before the extent is consistent.
    replay_journal: U64,
}
const _: () = assert!(size_of::<RawVolatileHeader>() == 32);

/// An seSparse extent.
#[derive(Debug)]
pub(crate) struct SeSparseExtent {
    /// Capacity in bytes.
    pub(crate) capacity: u64,
    file: FileId,
    src: Arc<dyn ReadAt>,
    /// Decoded entries: 0 unallocated, [`ZERO_ENTRY`], else the grain's byte offset.
    tables: Option<GrainTables<u64>>,
    layout: Layout,
}

/// Where the areas of an seSparse file are (bytes).
#[derive(Clone, Copy, Debug)]
struct Layout {
    gd_off: u64,
    gd_entries: u64,
    gt_off: u64,
    gt_count: u64,
    grains_off: u64,
    grains_len: u64,
}

fn bytes(v: u64, what: &str) -> Result<u64> {
    v.checked_mul(SECTOR)
        .ok_or_else(|| Error::invalid(format!("seSparse header at 0x0: {what} {v:#x} sectors overflows 64 bits")))
}

impl SeSparseExtent {
    pub(crate) fn open(ctx: &OpenContext<'_>, src: Arc<dyn ReadAt>, file: FileId) -> Result<SeSparseExtent> {
        let mut buf = [0u8; 512];
        read_exact(src.as_ref(), &mut buf, 0, "seSparse header")?;
        let h =
            RawConstHeader::ref_from_bytes(&buf[..]).map_err(|_| Error::invalid("seSparse header: cannot be read"))?;
        if h.magic.get() != SESPARSE_MAGIC {
            return Err(Error::invalid("seSparse header at 0x0: bad magic"));
        }
        if h.version.get() != VERSION {
            return Err(Error::unsupported(format!("seSparse version {:#x}", h.version.get())));
        }
        if h.grain_size.get() != GRAIN_SECTORS || h.grain_table_size.get() != GT_SECTORS {
            return Err(Error::unsupported(format!(
                "seSparse grain size of {} sectors / grain table size of {} sectors (only 8 / 64 exist)",
                h.grain_size.get(),
                h.grain_table_size.get()
            )));
        }
        if h.flags.get() != 0 || h.reserved.iter().any(|r| r.get() != 0) {
            return Err(Error::unsupported(format!("seSparse flags {:#x} or reserved fields set", h.flags.get())));
        }
        let capacity = bytes(h.capacity.get(), "capacity")?;
        ctx.limits().check_virtual_size(capacity)?;
        let vol_off = bytes(h.volatile_header_offset.get(), "volatile header offset")?;
        let mut vb = [0u8; 32];
        read_exact(src.as_ref(), &mut vb, vol_off, "seSparse volatile header")?;
        let v = RawVolatileHeader::ref_from_bytes(&vb[..])
            .map_err(|_| Error::invalid("seSparse volatile header: cannot be read"))?;
        if v.magic.get() != VOLATILE_MAGIC {
            return Err(Error::invalid(format!("seSparse volatile header at {vol_off:#x}: bad magic")));
        }
        if v.replay_journal.get() != 0 {
            return Err(Error::unsupported(
                "seSparse extent whose journal must be replayed (the snapshot was not closed cleanly)",
            ));
        }
        let gd_off = bytes(h.grain_dir_offset.get(), "grain directory offset")?;
        let gd_entries_max = bytes(h.grain_dir_size.get(), "grain directory size")? / 8;
        let gt_off = bytes(h.grain_tables_offset.get(), "grain tables offset")?;
        let gt_count = bytes(h.grain_tables_size.get(), "grain tables size")? / (GT_SECTORS * SECTOR);
        let grains_off = bytes(h.grains_offset.get(), "grains offset")?;
        let grains_len = bytes(h.grains_size.get(), "grains size")?;
        if grains_off < SECTOR || gt_off < SECTOR || gd_off < SECTOR {
            return Err(Error::invalid("seSparse header at 0x0: an area overlaps the header"));
        }
        let span = GTES_PER_GT * GRAIN_SECTORS * SECTOR;
        let needed = capacity.div_ceil(span);
        if needed > gd_entries_max {
            return Err(Error::invalid(format!(
                "seSparse grain directory at {gd_off:#x}: {gd_entries_max} entries cannot cover {capacity:#x} bytes"
            )));
        }
        let layout = Layout { gd_off, gd_entries: needed, gt_off, gt_count, grains_off, grains_len };
        let mut ext = SeSparseExtent { capacity, file, src, tables: None, layout };
        if !ctx.describe_only {
            ext.tables = Some(ext.load(Mem { limits: ctx.limits(), budget: &ctx.budget })?);
        }
        Ok(ext)
    }

    /// Read the directory and tables, validating every entry.
    fn load(&self, mem: Mem<'_>) -> Result<GrainTables<u64>> {
        let Layout { gd_off, gd_entries: needed, gt_off, gt_count, grains_off, grains_len } = self.layout;
        let src = self.src.as_ref();
        let mut dir = read_directory(mem, src, gd_off, needed, 8, "seSparse grain directory")?;
        for (i, e) in dir.iter_mut().enumerate() {
            *e = match *e {
                0 => 0,
                v if v >> 32 == GD_ALLOCATED_TAG && (v & 0xffff_ffff) < gt_count => {
                    gt_off.saturating_add((v & 0xffff_ffff) * GT_SECTORS * SECTOR)
                }
                v => {
                    return Err(Error::invalid(format!(
                        "seSparse grain directory at {gd_off:#x}, entry {i}: {v:#018x} is not a valid grain table reference"
                    )))
                }
            };
        }
        let size = src.size();
        let grain_bytes = GRAIN_SECTORS * SECTOR;
        let grain_count = grains_len / grain_bytes;
        let spec = TableSpec { what: "seSparse grain directory", per_table: GTES_PER_GT, entry_bytes: 8 };
        load_tables(mem, src, &spec, &dir, |toff, idx, e| {
            let bad =
                |why: &str| Error::invalid(format!("seSparse grain table at {toff:#x}, entry {idx}: {e:#018x} {why}"));
            match e >> 60 {
                GTE_UNALLOCATED if e == 0 => Ok(0),
                GTE_UNALLOCATED => Err(bad("is unallocated but not zero")),
                GTE_UNMAPPED | GTE_ZERO => Ok(ZERO_ENTRY),
                GTE_ALLOCATED => {
                    let index = ((e >> 48) & 0xfff) | ((e & 0xffff_ffff_ffff) << 12);
                    if index >= grain_count {
                        return Err(bad("names a grain outside the grains area"));
                    }
                    let off = grains_off.saturating_add(index * grain_bytes);
                    if off >= size {
                        return Err(bad("names a grain past the end of the file (truncated image?)"));
                    }
                    Ok(off)
                }
                _ => Err(bad("has an unknown type")),
            }
        })
    }

    /// Grains that extend past the end of the file or are used twice.
    pub(crate) fn check(&self, name: &str, report: &mut CheckReport) {
        let t = match tables_for_check(self.tables.as_ref(), |m| self.load(m)) {
            Ok(t) => t,
            Err(e) => return report.corruption(format!("{name}: {e}")),
        };
        let size = self.src.size();
        let gb = GRAIN_SECTORS * SECTOR;
        let mut grains: Vec<(u64, u64)> = t.iter().filter(|&(_, v)| v > ZERO_ENTRY).map(|(g, v)| (v, g)).collect();
        grains.sort_unstable();
        let mut prev: Option<u64> = None;
        for &(off, g) in &grains {
            if off.saturating_add(gb) > size {
                report.corruption(format!("{name}: grain {g} at {off:#x} extends past the end of the file"));
            }
            if prev == Some(off) {
                report.corruption(format!("{name}: grain {g} at {off:#x} is used by two grain table entries"));
            }
            prev = Some(off);
        }
    }
}

impl GrainLookup for SeSparseExtent {
    fn grain_size(&self) -> u64 {
        GRAIN_SECTORS * SECTOR
    }

    fn table_span(&self) -> u64 {
        GTES_PER_GT * GRAIN_SECTORS * SECTOR
    }

    fn covered(&self) -> u64 {
        self.capacity
    }

    fn has_table(&self, t: u64) -> bool {
        self.tables.as_ref().is_some_and(|tb| tb.has_table(t))
    }

    fn resolve(&self, g: u64, in_grain: u64) -> Result<Option<ExtentKind>> {
        match self.tables.as_ref().and_then(|t| t.entry(g)) {
            None | Some(0) => Ok(None),
            Some(ZERO_ENTRY) => Ok(Some(ExtentKind::Zero { layer: 0 })),
            Some(off) => Ok(Some(ExtentKind::Data {
                layer: 0,
                location: Location::File { file: self.file, offset: off + in_grain },
            })),
        }
    }
}
