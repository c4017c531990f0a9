//! ESX sparse extents (`COWD`, the VMFSSPARSE extents of vmfsSparse snapshot disks).
//!
//! A 2048-byte header, a grain directory of `numGDEntries` u32 sector offsets, grain tables of
//! 4096 u32 sector offsets (0 = unallocated), and grains of `grainSize` sectors.

use std::sync::Arc;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::extent::{ExtentKind, FileId, Location};
use crate::image::OpenContext;
use crate::info::CheckReport;
use crate::io::{read_exact, ReadAt};

use super::grains::{load_tables, read_directory, tables_for_check, GrainLookup, GrainTables, Mem, TableSpec};
use super::header::SECTOR;

/// `COWD` read as a little-endian u32.
pub(crate) const COWD_MAGIC: u32 = 0x4457_4f43;

/// Entries in every COWD grain table (fixed by the format).
const GTES_PER_GT: u64 = 4096;

/// Largest grain: 2^21 sectors (1 GiB), as for hosted sparse extents.
const MAX_GRAIN_SECTORS: u32 = 1 << 21;

/// The on-disk COWD header (the first 2048 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCowdHeader {
    /// `COWD`.
    magic: U32,
    /// Format version (1).
    version: U32,
    /// Flags (3 on ESX; not used for reading).
    flags: U32,
    /// Capacity in sectors.
    num_sectors: U32,
    /// Grain size in sectors.
    grain_size: U32,
    /// Sector of the grain directory.
    gd_offset: U32,
    /// Entries in the grain directory.
    num_gd_entries: U32,
    /// Next free sector.
    free_sector: U32,
    /// Root disk: geometry; child disk: parent file name (1024 bytes) and parent generation.
    union: [u8; 1028],
    /// Generation number.
    generation: U32,
    /// Disk name.
    name: [u8; 60],
    /// Description.
    description: [u8; 512],
    /// Saved generation.
    saved_generation: U32,
    /// Reserved.
    reserved: [u8; 8],
    /// Set while open for writing.
    unclean_shutdown: U32,
    /// Padding to 2048 bytes.
    padding: [u8; 396],
}
const _: () = assert!(size_of::<RawCowdHeader>() == 2048);

/// A COWD extent.
#[derive(Debug)]
pub(crate) struct CowdExtent {
    /// Capacity in bytes.
    pub(crate) capacity: u64,
    /// Grain size in bytes.
    pub(crate) grain_size: u64,
    file: FileId,
    src: Arc<dyn ReadAt>,
    tables: Option<GrainTables<u32>>,
    /// Byte offset of the grain directory.
    gd_offset: u64,
    /// Directory entries in use.
    gd_entries: u64,
}

impl CowdExtent {
    pub(crate) fn open(ctx: &OpenContext<'_>, src: Arc<dyn ReadAt>, file: FileId) -> Result<CowdExtent> {
        let mut buf = [0u8; 2048];
        read_exact(src.as_ref(), &mut buf, 0, "COWD header")?;
        let h = RawCowdHeader::ref_from_bytes(&buf[..]).map_err(|_| Error::invalid("COWD header: cannot be read"))?;
        if h.magic.get() != COWD_MAGIC {
            return Err(Error::invalid("COWD header at 0x0: bad magic"));
        }
        if h.version.get() != 1 {
            return Err(Error::unsupported(format!("COWD sparse extent version {}", h.version.get())));
        }
        let gsec = h.grain_size.get();
        if gsec == 0 || !gsec.is_power_of_two() || gsec > MAX_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "COWD header at 0x0: grain size of {gsec} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
            )));
        }
        let capacity = u64::from(h.num_sectors.get()) * SECTOR;
        let grain_size = u64::from(gsec) * SECTOR;
        let span = grain_size * GTES_PER_GT;
        let needed = capacity.div_ceil(span);
        let n = u64::from(h.num_gd_entries.get());
        if n < needed {
            return Err(Error::invalid(format!(
                "COWD header at 0x0: {n} grain directory entries cannot cover {capacity:#x} bytes (need {needed})"
            )));
        }
        let gd_offset = u64::from(h.gd_offset.get()) * SECTOR;
        if gd_offset < 2048 && needed > 0 {
            return Err(Error::invalid(format!("COWD grain directory at {gd_offset:#x} overlaps the header")));
        }
        let mut ext = CowdExtent { capacity, grain_size, file, src, tables: None, gd_offset, gd_entries: needed };
        if !ctx.describe_only {
            ext.tables = Some(ext.load(Mem { limits: ctx.limits(), budget: &ctx.budget })?);
        }
        Ok(ext)
    }

    /// Read the directory and tables, validating every entry.
    fn load(&self, mem: Mem<'_>) -> Result<GrainTables<u32>> {
        let (gd_offset, needed) = (self.gd_offset, self.gd_entries);
        let src = self.src.as_ref();
        let mut dir = read_directory(mem, src, gd_offset, needed, 4, "COWD grain directory")?;
        for (i, e) in dir.iter_mut().enumerate() {
            *e *= SECTOR;
            if *e != 0 && *e < 2048 {
                return Err(Error::invalid(format!(
                    "COWD grain directory at {gd_offset:#x}, entry {i}: grain table at {e:#x} overlaps the header"
                )));
            }
        }
        let size = src.size();
        let spec = TableSpec { what: "COWD grain directory", per_table: GTES_PER_GT, entry_bytes: 4 };
        load_tables(mem, src, &spec, &dir, |toff, idx, raw| {
            let v = u32::try_from(raw).unwrap_or(u32::MAX);
            if v != 0 && u64::from(v) * SECTOR >= size {
                return Err(Error::invalid(format!(
                    "COWD grain table at {toff:#x}, entry {idx}: grain at sector {v:#x} lies past the end of the file"
                )));
            }
            Ok(v)
        })
    }

    /// Grains that extend past the end of the file or overlap another grain.
    pub(crate) fn check(&self, name: &str, report: &mut CheckReport) {
        let t = match tables_for_check(self.tables.as_ref(), |m| self.load(m)) {
            Ok(t) => t,
            Err(e) => return report.corruption(format!("{name}: {e}")),
        };
        let size = self.src.size();
        let mut grains: Vec<(u64, u64)> =
            t.iter().filter(|&(_, v)| v != 0).map(|(g, v)| (u64::from(v) * SECTOR, g)).collect();
        grains.sort_unstable();
        let mut prev_end = 0;
        for &(off, g) in &grains {
            if off.saturating_add(self.grain_size) > size {
                report.corruption(format!("{name}: grain {g} at {off:#x} extends past the end of the file"));
            }
            if off < prev_end {
                report.corruption(format!("{name}: grain {g} at {off:#x} overlaps another grain"));
            }
            prev_end = prev_end.max(off.saturating_add(self.grain_size));
        }
    }
}

impl GrainLookup for CowdExtent {
    fn grain_size(&self) -> u64 {
        self.grain_size
    }

    fn table_span(&self) -> u64 {
        self.grain_size * GTES_PER_GT
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
            Some(v) => Ok(Some(ExtentKind::Data {
                layer: 0,
                location: Location::File { file: self.file, offset: u64::from(v) * SECTOR + in_grain },
            })),
        }
    }
}
