//! VHD images (Microsoft Virtual PC, Hyper-V, Windows, Disk2VHD, Azure; qemu calls the format
//! `vpc`): fixed, dynamic and differencing disks.
//!
//! # Layout
//!
//! Every VHD ends with a 512-byte footer (`conectix`, big-endian fields, a one's-complement
//! byte-sum checksum). A **fixed** disk is the guest data followed by the footer and nothing
//! else, so it is detected by its last 512 bytes. A **dynamic** disk starts with a copy of the
//! footer, then a 1 KiB dynamic header (`cxsparse`) at the footer's data offset, the block
//! allocation table (BAT: one big-endian sector number per block, `0xFFFFFFFF` = not
//! allocated), and the blocks, each a sector bitmap (one bit per sector, most significant bit
//! first, padded to 512 bytes) followed by the block's data. A **differencing** disk (type 4) is
//! laid out like a dynamic one; its header also names the parent (UTF-16BE name, unique id, up
//! to eight platform locators) and a sector whose bitmap bit is 0 is read from the parent.
//!
//! # Virtual size
//!
//! The footer holds both a CHS geometry and a "current size", and producers disagree on which
//! one is the disk's size. vdisk follows qemu-img 10, so that `info` and `convert` agree with it:
//!
//! * creator application `vpc ` (Virtual PC) or `qemu` (qemu-img before 2.6): cylinders x heads x
//!   sectors x 512, **unless** the geometry is the maximum 65535/16/255, which cannot describe a
//!   larger disk, in which case the current size;
//! * any other creator (`win ` Hyper-V/Windows, `qem2` qemu-img with `force_size`, `d2v`
//!   Disk2VHD, `tap`, `CTXS`, `dutl`, `*img` FreeBSD mkimg, Azure tools, ...): the current size,
//!   rounded down to whole sectors.
//!
//! # Where vdisk differs from qemu-img
//!
//! * A fixed VHD is detected by its footer; qemu-img probes it as raw and would copy the footer
//!   as the disk's last sector.
//! * When the footer at the end is missing or its checksum is bad, the copy at offset 0 is used
//!   (and the other way round); qemu-img reads only the copy at offset 0 of a dynamic disk and
//!   gives up when that one is bad.
//! * Differencing disks are read with their parent, found through the parent locators (`W2ru`
//!   and `Wi2r` relative names first, then `W2ku`/`Wi2k` absolute names, then the `MacX` URL,
//!   then the parent's file name beside the child), under the reference policy, and checked
//!   against the parent's unique id; sector bitmaps decide, sector by sector, which layer a
//!   sector comes from. qemu-img reads a differencing disk as if it were dynamic, without its
//!   parent.
//! * Fixed disks larger than 2040 GiB (Azure allows them) are read; qemu-img refuses them.
//! * If a fixed disk's virtual size reaches past its data (a truncated file), the missing part
//!   reads as zeros; qemu-img returns the footer's bytes there.
//!
//! Like qemu-img, vdisk reads an allocated block of a dynamic (not differencing) disk whole,
//! whatever its sector bitmap says, and maps it as data; it refuses a BAT entry whose block
//! ends past the end of the file ("truncated"); and it accepts a dynamic header whose checksum
//! is wrong (qemu-img does not check it), which `check` reports.
//!
//! # Extents
//!
//! Fixed: the file's data regions are `Data` at the same offset, its holes `Zero` (qemu-img
//! maps the whole disk as data). Dynamic: allocated blocks are `Data`, unallocated ones `Zero`
//! (qemu-img reports them `present: true, zero: true`). Differencing: sectors whose bitmap bit
//! is set are `Data`, the rest (and unallocated blocks) are the parent's extents one layer down.

mod dynamic;
mod error;
mod footer;
mod parent;
pub(crate) mod write;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::extent::{Extent, ExtentKind, FileId, Location};
use crate::image::{map_backing, ImageFormat, Layer, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::{self, ReadAt};

use dynamic::{decode_bat, DynamicHeader, HEADER_SIZE, SECTOR, UNALLOCATED};
use error::VhdError;
use footer::{four_cc, uuid_string, DiskType, Footer, FooterProblem, SizeRule, FOOTER_SIZE};
use parent::Locator;

/// Largest data extent of a fixed disk reported in one piece, so that a fully allocated
/// multi-terabyte file still yields extents of bounded size to the copy planner.
const MAX_FIXED_EXTENT: u64 = 1 << 30;

/// Blocks looked at in one `map` call: the BAT is in memory, so this only bounds the extents
/// one call appends (4096 blocks are 8 GiB at the usual 2 MiB).
const MAX_BLOCKS_PER_MAP: u64 = 4096;

/// A VHD image.
#[derive(Debug)]
pub(crate) struct VhdImage {
    src: Arc<dyn ReadAt>,
    file: FileId,
    file_len: u64,
    /// Where the footer in use was read from (the end, or 0 for the copy of a dynamic disk).
    footer_at: u64,
    disk_type: DiskType,
    size: u64,
    size_rule: SizeRule,
    footers: Box<Footers>,
    /// The dynamic header and BAT of dynamic and differencing disks.
    sparse: Option<Box<Sparse>>,
}

/// The footer in use and what was found at each place a footer lives.
#[derive(Debug)]
struct Footers {
    used: Footer,
    /// What was found at the end of the file.
    end: std::result::Result<Footer, FooterProblem>,
    /// What was found at offset 0 (`None` when the file is only a footer).
    head: Option<std::result::Result<Footer, FooterProblem>>,
}

/// The parts of a dynamic or differencing disk.
#[derive(Debug)]
struct Sparse {
    header_at: u64,
    header: DynamicHeader,
    bat: Vec<u32>,
    bitmap_size: u64,
    block_size: u64,
    diff: Option<Differencing>,
}

/// The parent side of a differencing disk.
#[derive(Debug)]
struct Differencing {
    locators: Vec<Locator>,
    /// The opened parent (`None` when only describing).
    parent: Option<Box<Layer>>,
    /// The name the parent was found by, or the first name to try when it was not opened.
    parent_ref: Option<String>,
}

/// Read and parse the 512 bytes at `at`.
fn read_footer(src: &dyn ReadAt, at: u64) -> Result<std::result::Result<Footer, FooterProblem>> {
    let mut bytes = [0u8; 512];
    io::read_exact(src, &mut bytes, at, "VHD footer")?;
    Ok(Footer::parse(&bytes))
}

impl VhdImage {
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        path: Option<&Path>,
    ) -> Result<Self> {
        let file_len = src.size();
        if file_len < FOOTER_SIZE {
            return Err(Error::invalid(format!("VHD file of {file_len} bytes is too short for a 512-byte footer")));
        }
        let end_at = file_len - FOOTER_SIZE;
        let end_footer = read_footer(src.as_ref(), end_at)?;
        let head_footer = if end_at > 0 { Some(read_footer(src.as_ref(), 0)?) } else { None };
        let (footer, footer_at) = choose_footer(&end_footer, head_footer.as_ref(), end_at)?;
        let disk_type = footer.disk_type().ok_or_else(|| {
            VhdError::Unsupported(format!(
                "VHD footer at {footer_at:#x}: disk type {} is not fixed (2), dynamic (3) or differencing (4)",
                footer.disk_type_raw
            ))
        })?;
        let (size, size_rule) = footer.virtual_size();
        let sparse = match disk_type {
            DiskType::Fixed => None,
            DiskType::Dynamic | DiskType::Differencing => {
                Some(Box::new(open_sparse(ctx, src.as_ref(), path, &footer, disk_type, size)?))
            }
        };
        Ok(VhdImage {
            src,
            file,
            file_len,
            footer_at,
            disk_type,
            size,
            size_rule,
            footers: Box::new(Footers { used: footer, end: end_footer, head: head_footer }),
            sparse,
        })
    }

    /// The disk's unique id (a differencing child records its parent's).
    pub(super) fn unique_id(&self) -> [u8; 16] {
        self.footers.used.unique_id
    }

    fn data(&self, start: u64, len: u64, offset: u64) -> Extent {
        Extent::new(start, len, ExtentKind::Data { layer: 0, location: Location::File { file: self.file, offset } })
    }

    /// Fixed disk: guest offset = file offset over the data area; holes of a sparse file are
    /// zeros; whatever lies past the data area (a truncated file) reads as zeros.
    fn map_fixed(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset.saturating_add(len);
        let data_end = self.file_len - FOOTER_SIZE;
        if offset >= data_end {
            out.push(Extent::new(offset, len, ExtentKind::Zero { layer: 0 }));
            return Ok(());
        }
        let stop = end.min(data_end);
        match self.src.next_data(offset) {
            None => out.push(self.data(offset, (stop - offset).min(MAX_FIXED_EXTENT), offset)),
            Some(Err(e)) => return Err(Error::io(format!("finding data at {offset:#x}"), e)),
            Some(Ok(None)) => out.push(Extent::new(offset, stop - offset, ExtentKind::Zero { layer: 0 })),
            Some(Ok(Some((s, e)))) => {
                if s > offset {
                    out.push(Extent::new(offset, s.min(stop) - offset, ExtentKind::Zero { layer: 0 }));
                }
                if s < stop {
                    let s = s.max(offset);
                    out.push(self.data(s, (e.min(stop) - s).min(MAX_FIXED_EXTENT), s));
                }
            }
        }
        Ok(())
    }

    fn map_sparse(&self, s: &Sparse, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset.saturating_add(len);
        let parent = s.diff.as_ref().and_then(|d| d.parent.as_deref());
        let mut pos = offset;
        let mut blocks = 0;
        while pos < end && blocks < MAX_BLOCKS_PER_MAP {
            let index = pos / s.block_size;
            let block_start = index * s.block_size;
            let run_end = end.min(block_start.saturating_add(s.block_size));
            let entry = usize::try_from(index).ok().and_then(|i| s.bat.get(i)).copied().unwrap_or(UNALLOCATED);
            if entry == UNALLOCATED {
                if s.diff.is_some() {
                    map_backing(parent, pos, run_end - pos, out)?;
                } else {
                    out.push(Extent::new(pos, run_end - pos, ExtentKind::Zero { layer: 0 }));
                }
            } else {
                let bitmap_at = u64::from(entry) * SECTOR;
                let data_at = bitmap_at + s.bitmap_size;
                if s.diff.is_some() {
                    self.map_bitmap(bitmap_at, data_at, block_start, pos, run_end, parent, out)?;
                    // One bitmap read per call.
                    return Ok(());
                }
                out.push(self.data(pos, run_end - pos, data_at + (pos - block_start)));
            }
            pos = run_end;
            blocks += 1;
        }
        Ok(())
    }

    /// Map `pos..run_end` of an allocated differencing block by its sector bitmap: set bits
    /// are this file's data, clear bits the parent's.
    #[allow(clippy::too_many_arguments)]
    fn map_bitmap(
        &self,
        bitmap_at: u64,
        data_at: u64,
        block_start: u64,
        pos: u64,
        run_end: u64,
        parent: Option<&Layer>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let first = (pos - block_start) / SECTOR;
        let last = (run_end - 1 - block_start) / SECTOR;
        let byte0 = first / 8;
        let bits = io::read_vec(self.src.as_ref(), bitmap_at + byte0, last / 8 + 1 - byte0, "VHD sector bitmap")?;
        let bit = |sector: u64| {
            let byte = usize::try_from(sector / 8 - byte0).ok().and_then(|i| bits.get(i)).copied().unwrap_or(0);
            byte & (0x80 >> (sector % 8)) != 0
        };
        let mut p = pos;
        while p < run_end {
            let sector = (p - block_start) / SECTOR;
            let present = bit(sector);
            let mut next = sector + 1;
            while next <= last && bit(next) == present {
                next += 1;
            }
            let q = run_end.min(block_start + next * SECTOR);
            if present {
                out.push(self.data(p, q - p, data_at + (p - block_start)));
            } else {
                map_backing(parent, p, q - p, out)?;
            }
            p = q;
        }
        Ok(())
    }
}

/// Pick the footer to use: the end one of a fixed disk; for a dynamic or differencing disk the
/// copy at offset 0 when it is good (qemu's choice), else the end one.
fn choose_footer(
    end: &std::result::Result<Footer, FooterProblem>,
    head: Option<&std::result::Result<Footer, FooterProblem>>,
    end_at: u64,
) -> Result<(Footer, u64)> {
    if let Ok(f) = end {
        if f.disk_type() == Some(DiskType::Fixed) {
            return Ok((f.clone(), end_at));
        }
    }
    if let Some(Ok(h)) = head {
        if h.disk_type() != Some(DiskType::Fixed) {
            return Ok((h.clone(), 0));
        }
    }
    if let Ok(f) = end {
        return Ok((f.clone(), end_at));
    }
    let end_problem = match end {
        Err(p) => p.to_string(),
        Ok(_) => String::new(),
    };
    let head_problem = match head {
        Some(Ok(_)) => "holds a fixed-disk footer, which belongs at the end".to_string(),
        Some(Err(p)) => p.to_string(),
        None => "absent".to_string(),
    };
    Err(VhdError::Corrupt {
        structure: "VHD footer",
        at: end_at,
        problem: format!("{end_problem}; the copy at offset 0: {head_problem}"),
    }
    .into())
}

/// Read the dynamic header, the BAT and (for a differencing disk) the parent.
fn open_sparse(
    ctx: &mut OpenContext<'_>,
    src: &dyn ReadAt,
    path: Option<&Path>,
    footer: &Footer,
    disk_type: DiskType,
    size: u64,
) -> Result<Sparse> {
    let file_len = src.size();
    let header_at = footer.data_offset;
    if header_at.checked_add(HEADER_SIZE).is_none_or(|e| e > file_len) {
        return Err(VhdError::Corrupt {
            structure: "dynamic disk header",
            at: header_at,
            problem: format!("lies past the end of the file ({file_len:#x} bytes)"),
        }
        .into());
    }
    let bytes = io::read_vec(src, header_at, HEADER_SIZE, "VHD dynamic disk header")?;
    let header = DynamicHeader::parse(&bytes, header_at)?;
    let entries = u64::from(header.max_table_entries);
    let block_size = u64::from(header.block_size);
    let bat_at = header.table_offset;
    let bat_bytes = entries * 4;
    if bat_at.checked_add(bat_bytes).is_none_or(|e| e > file_len) {
        return Err(VhdError::Corrupt {
            structure: "VHD BAT",
            at: bat_at,
            problem: format!(
                "{entries} entries ({bat_bytes} bytes) run past the end of the file ({file_len:#x} bytes)"
            ),
        }
        .into());
    }
    let covered = entries * block_size;
    if covered < size {
        return Err(VhdError::Corrupt {
            structure: "dynamic disk header",
            at: header_at,
            problem: format!(
                "{entries} BAT entries of {block_size}-byte blocks cover {covered} bytes, less than the virtual size {size}"
            ),
        }
        .into());
    }
    ctx.limits().check_table_entries("VHD BAT", entries)?;
    ctx.budget.reserve("VHD BAT", bat_bytes)?;
    let bat = decode_bat(&io::read_vec(src, bat_at, bat_bytes, "VHD BAT")?);
    let bitmap_size = header.bitmap_size();
    for (i, &entry) in bat.iter().enumerate() {
        if entry == UNALLOCATED {
            continue;
        }
        let block_at = u64::from(entry) * SECTOR;
        let block_end = block_at + bitmap_size + block_size;
        if block_end > file_len {
            return Err(VhdError::Corrupt {
                structure: "VHD BAT",
                at: bat_at + 4 * i as u64,
                problem: format!(
                    "entry {i} puts a block at {block_at:#x} that ends at {block_end:#x}, past the end of the file \
                     ({file_len:#x} bytes): the image is truncated"
                ),
            }
            .into());
        }
    }
    let diff = if disk_type == DiskType::Differencing {
        let locators = parent::read_locators(ctx, src, &header.locators)?;
        let candidates = parent::candidates(&locators, &header.parent_name);
        if ctx.describe_only {
            let parent_ref = candidates.first().map(|c| c.name.clone());
            Some(Differencing { locators, parent: None, parent_ref })
        } else {
            let (layer, name) = parent::open_parent(ctx, path, &candidates, header.parent_uuid, &locators)?;
            Some(Differencing { locators, parent: Some(Box::new(layer)), parent_ref: Some(name) })
        }
    } else {
        None
    };
    Ok(Sparse { header_at, header, bat, bitmap_size, block_size, diff })
}

impl ImageFormat for VhdImage {
    fn backing_layer(&self) -> Option<&Layer> {
        self.sparse.as_ref()?.diff.as_ref()?.parent.as_deref()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        match &self.sparse {
            None => self.map_fixed(offset, len, out),
            Some(s) => self.map_sparse(s, offset, len, out),
        }
    }

    fn describe(&self, info: &mut ImageInfo) {
        let f = &self.footers.used;
        let mut data = json!({
            "subformat": self.disk_type.as_str(),
            "creator-app": four_cc(f.creator_app),
            "creator-version": format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
            "creator-host": four_cc(f.creator_host),
            "uuid": uuid_string(&f.unique_id),
            "current-size": f.current_size,
            "original-size": f.original_size,
            "geometry": {
                "cylinders": f.geometry.cylinders,
                "heads": f.geometry.heads,
                "sectors": f.geometry.sectors,
            },
            "size-rule": self.size_rule.as_str(),
            "saved-state": f.saved_state,
            "footer-offset": self.footer_at,
        });
        if let (Some(s), Value::Object(map)) = (&self.sparse, &mut data) {
            info.cluster_size = Some(s.block_size);
            map.insert("block-size".into(), json!(s.block_size));
            map.insert("bat-entries".into(), json!(s.bat.len()));
            map.insert("allocated-blocks".into(), json!(s.bat.iter().filter(|&&e| e != UNALLOCATED).count()));
            if let Some(d) = &s.diff {
                if let Some(name) = &d.parent_ref {
                    info.set_backing(name, Some("vpc"));
                }
                map.insert("parent-name".into(), json!(s.header.parent_name));
                map.insert("parent-uuid".into(), json!(uuid_string(&s.header.parent_uuid)));
                map.insert("parent-timestamp".into(), json!(s.header.parent_timestamp));
                let locators: Vec<Value> =
                    d.locators.iter().map(|l| json!({ "platform": l.platform(), "path": l.text })).collect();
                map.insert("parent-locators".into(), Value::Array(locators));
            }
        }
        info.dirty_flag = false;
        info.set_format_specific("vpc", data);
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        let end_at = self.file_len - FOOTER_SIZE;
        if let Err(p) = &self.footers.end {
            report.corruption(format!("VHD footer at {end_at:#x}: {p}"));
        }
        let Some(s) = &self.sparse else {
            let data_len = end_at;
            if self.size > data_len {
                report.corruption(format!(
                    "fixed VHD: the virtual size {} reaches past the {data_len} bytes of data before the footer",
                    self.size
                ));
            }
            return Ok(());
        };
        match &self.footers.head {
            Some(Err(p)) => report.corruption(format!("VHD footer copy at 0x0: {p}")),
            Some(Ok(h)) => {
                if let Ok(e) = &self.footers.end {
                    if e != h {
                        report.corruption(format!("the VHD footer copy at 0x0 differs from the footer at {end_at:#x}"));
                    }
                }
            }
            None => {}
        }
        if !s.header.checksum_ok {
            report.corruption(format!(
                "dynamic disk header at {:#x}: checksum {:#010x} does not match the computed {:#010x}",
                s.header_at, s.header.stored_checksum, s.header.computed_checksum
            ));
        }
        if let Some(d) = &s.diff {
            for l in d.locators.iter().filter(|l| l.corrupt) {
                report.corruption(format!(
                    "parent locator {} ({}): {}",
                    l.entry.index,
                    l.platform(),
                    l.problem.as_deref().unwrap_or("corrupt")
                ));
            }
        }
        self.check_blocks(s, report)
    }
}

impl VhdImage {
    /// Blocks must not overlap each other or the metadata.
    fn check_blocks(&self, s: &Sparse, report: &mut CheckReport) -> Result<()> {
        let span = s.bitmap_size + s.block_size;
        let end_at = self.file_len - FOOTER_SIZE;
        let bat_len = (s.bat.len() as u64 * 4).div_ceil(SECTOR) * SECTOR;
        let mut metadata: Vec<(u64, u64, String)> = vec![
            (0, FOOTER_SIZE, "the footer copy at 0x0".into()),
            (s.header_at, s.header_at + HEADER_SIZE, format!("the dynamic disk header at {:#x}", s.header_at)),
            (
                s.header.table_offset,
                s.header.table_offset + bat_len,
                format!("the BAT at {:#x}", s.header.table_offset),
            ),
            (end_at, self.file_len, format!("the footer at {end_at:#x}")),
        ];
        if let Some(d) = &s.diff {
            for l in d.locators.iter().filter(|l| l.text.is_some()) {
                let e = &l.entry;
                metadata.push((
                    e.data_offset,
                    e.data_offset + u64::from(e.data_length),
                    format!("parent locator {} data at {:#x}", e.index, e.data_offset),
                ));
            }
        }
        // Allocated blocks as (sector << 32 | index), sorted by where they are stored: 8 bytes
        // per block, twice the BAT at most.
        let allocated = s.bat.iter().filter(|&&e| e != UNALLOCATED).count();
        let mut sorted: Vec<u64> = Vec::new();
        sorted
            .try_reserve_exact(allocated)
            .map_err(|_| Error::limit(format!("checking {allocated} VHD blocks does not fit in memory")))?;
        sorted.extend(
            s.bat.iter().zip(0u64..).filter(|(&e, _)| e != UNALLOCATED).map(|(&e, i)| (u64::from(e) << 32) | i),
        );
        sorted.sort_unstable();
        let unpack = |v: u64| ((v >> 32) * SECTOR, v & 0xffff_ffff);
        for &v in &sorted {
            let (start, index) = unpack(v);
            let end = start + span;
            for (ms, me, what) in &metadata {
                if start < *me && *ms < end {
                    report.corruption(format!("block {index} at {start:#x} (+{span:#x}) overlaps {what}"));
                }
            }
        }
        for pair in sorted.windows(2) {
            let ((a, ia), (b, ib)) = (unpack(pair[0]), unpack(pair[1]));
            if a + span > b {
                report.corruption(format!("blocks {ia} and {ib} overlap (at {a:#x} and {b:#x}, {span:#x} bytes each)"));
            }
        }
        let blocks = self.size.div_ceil(s.block_size);
        report.total_clusters = Some(blocks);
        report.allocated_clusters = Some(allocated as u64);
        Ok(())
    }
}
