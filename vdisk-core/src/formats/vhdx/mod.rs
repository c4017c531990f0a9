//! VHDX (Hyper-V virtual hard disk v2) reader: fixed, dynamic and differencing disks, 512- and
//! 4096-byte logical sectors, and files with an un-replayed log (replayed in memory).
//!
//! Layout: the header section (file type identifier, two headers, two region tables) in the
//! first 1 MiB; the regions it names (BAT, metadata); the log; payload blocks and sector bitmaps.
//! Opening reads the headers, replays the log if it must ([`log`]), and from then on reads the
//! file only through the replayed view ([`overlay::ReplayedFile`], registered as the image's
//! source so the copy engine reads payload through it too).
//!
//! Block states, as [`VhdxImage::map`] reads them:
//!
//! | state | without a parent | in a differencing disk |
//! |---|---|---|
//! | NOT_PRESENT (0) | unallocated (zeros) | the parent |
//! | UNDEFINED (1) | unallocated (zeros) | the parent |
//! | ZERO (2) | zeros | zeros |
//! | UNMAPPED (3; 5 in draft 0.95) | zeros | zeros |
//! | FULLY_PRESENT (6) | this file | this file |
//! | PARTIALLY_PRESENT (7) | refused | per sector: bitmap bit 1 this file, 0 the parent |
//!
//! ZERO says the block's content is zero, and UNMAPPED that it was discarded: in a child both
//! must hide the parent's data (a zero write or trim in the child cannot resurrect it). NOT_PRESENT
//! is where the specification sends reads to the parent; UNDEFINED means this file holds no
//! content for the block, so it reads the same way. Sector bitmap bits are LSB-first: sector `i`
//! of a block is bit `i % 8` of byte `i / 8` of the block's part of its chunk's bitmap.

mod bat;
mod crc32c;
mod error;
mod guid;
mod header;
mod log;
mod metadata;
mod overlay;
mod parent;
mod region;
pub(crate) mod write;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use self::bat::{Bat, BlockState};
use self::error::corrupt;
use self::header::HeaderSection;
use self::log::ReplaySummary;
use self::metadata::Metadata;
use self::region::{Region, Regions};
use crate::error::Result;
use crate::extent::{Extent, ExtentKind, FileId, Location};
use crate::image::{Emitter, ImageFormat, Layer, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::{self, ReadAt};
use crate::limits::MetadataBudget;

/// 1 MiB: the unit of region offsets, block sizes and BAT file offsets.
pub(crate) const MIB: u64 = 1 << 20;
/// Payload blocks mapped per call at most (a BAT run's worth; the iterator asks for the rest).
const MAX_BLOCKS_PER_MAP: u64 = 8192;
/// Extents this reader emits per call at most (a fragmented sector bitmap can describe one
/// extent per sector: 512 Ki in a 256 MiB block).
const MAX_EXTENTS_PER_MAP: usize = 4096;

/// A VHDX image.
#[derive(Debug)]
pub(crate) struct VhdxImage {
    /// The file as read (with the log replayed where needed).
    src: Arc<dyn ReadAt>,
    /// Its id in the image's file table.
    file: FileId,
    /// The header section (boxed, like the other parsed structures, to keep `Layer` small).
    headers: Box<HeaderSection>,
    /// The region table.
    regions: Box<Regions>,
    /// The metadata items.
    md: Box<Metadata>,
    /// The BAT.
    bat: Bat,
    /// The log replayed at open, if any.
    replay: Option<Box<ReplaySummary>>,
    /// The parent, for a differencing disk opened with its references.
    parent: Option<Box<Layer>>,
    /// The parent's name as the locator gives it.
    parent_name: Option<String>,
    /// The metadata budget of the open image (for `check`'s transient tables).
    budget: Arc<MetadataBudget>,
}

impl VhdxImage {
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        path: Option<&Path>,
    ) -> Result<Self> {
        let headers = header::read(src.as_ref())?;
        let h = &headers.current;

        // Replay the log in memory when the header says it may hold entries not yet in place.
        let (src, replay) = match log::replay(src.as_ref(), h, &ctx.budget)? {
            Some((overlay, summary)) => {
                let view: Arc<dyn ReadAt> = Arc::new(overlay.finish(src));
                ctx.replace_source(file, view.clone())?;
                (view, Some(Box::new(summary)))
            }
            None => (src, None),
        };

        let log_region = Region { offset: h.log_offset, length: h.log_length };
        let regions = region::read(src.as_ref(), log_region)?;
        let md = metadata::read(src.as_ref(), regions.table.metadata, &ctx.budget)?;
        let bat = Bat::read(src.as_ref(), regions.table.bat, &md, ctx.limits(), &ctx.budget)?;

        let mut parent = None;
        let mut parent_name = None;
        if let Some(loc) = md.parent_locator.as_ref() {
            let linkage = parent::Linkage::from_locator(loc, regions.table.metadata.offset)?;
            parent_name = parent::display_name(loc);
            if !ctx.describe_only {
                let layer = parent::open(ctx, path, loc, &linkage, |l| match l {
                    Layer::Vhdx(p) => Some(p.headers.current.data_write_guid),
                    _ => None,
                })?;
                parent = Some(Box::new(layer));
            }
        }
        Ok(VhdxImage {
            src,
            file,
            headers: Box::new(headers),
            regions: Box::new(regions),
            md: Box::new(md),
            bat,
            replay,
            parent,
            parent_name,
            budget: ctx.budget.clone(),
        })
    }

    /// Map the sectors of PARTIALLY_PRESENT block `block` (stored at `stored`) from `pos` to
    /// `seg_end`; returns where it stopped (before `seg_end` when the extent cap was reached).
    fn map_partial(&self, block: u64, stored: u64, pos: u64, seg_end: u64, em: &mut Emitter<'_>) -> Result<u64> {
        let ls = self.md.logical_sector_size;
        let bstart = block * self.bat.block_size;
        let s0 = (pos - bstart) / ls;
        let s1 = (seg_end - bstart).div_ceil(ls);
        let (b0, b1) = (s0 / 8, s1.div_ceil(8));
        let base = self.bat.bitmap_base(block).ok_or_else(|| {
            corrupt(format!("block {block}"), self.bat.offset, "PARTIALLY_PRESENT but its chunk has no sector bitmap")
        })?;
        let bits = io::read_vec(self.src.as_ref(), base + b0, b1 - b0, "VHDX sector bitmap")?;
        let bit = |s: u64| -> bool {
            let byte = usize::try_from(s / 8 - b0).ok().and_then(|i| bits.get(i)).copied().unwrap_or(0);
            byte >> (s % 8) & 1 != 0
        };
        let mut s = s0;
        let mut at = pos;
        while s < s1 {
            let present = bit(s);
            let mut e = s + 1;
            while e < s1 && bit(e) == present {
                e += 1;
            }
            let run_end = (bstart + e * ls).min(seg_end);
            if present {
                em.push(Extent::new(
                    at,
                    run_end - at,
                    ExtentKind::Data {
                        layer: 0,
                        location: Location::File { file: self.file, offset: stored + (at - bstart) },
                    },
                ))?;
            } else {
                em.fall_through(at, run_end - at)?;
            }
            at = run_end;
            s = e;
            if em.count() >= MAX_EXTENTS_PER_MAP {
                break;
            }
        }
        Ok(at)
    }

    fn subformat(&self) -> &'static str {
        if self.md.has_parent {
            "differencing"
        } else if self.md.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }
}

impl ImageFormat for VhdxImage {
    fn backing_layer(&self) -> Option<&Layer> {
        self.parent.as_deref()
    }

    fn virtual_size(&self) -> u64 {
        self.md.virtual_size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset.saturating_add(len).min(self.md.virtual_size);
        let bs = self.bat.block_size;
        let mut em = Emitter::new(out, self.parent.as_deref());
        let mut pos = offset;
        let mut blocks = 0;
        while pos < end && blocks < MAX_BLOCKS_PER_MAP && em.count() < MAX_EXTENTS_PER_MAP {
            let block = pos / bs;
            let bstart = block * bs;
            let seg_end = (bstart + self.bat.block_len(block)).min(end);
            if seg_end <= pos {
                break; // Cannot happen inside the virtual size; never loop forever.
            }
            let n = seg_end - pos;
            match self.bat.payload(block) {
                BlockState::FullyPresent(stored) => em.push(Extent::new(
                    pos,
                    n,
                    ExtentKind::Data {
                        layer: 0,
                        location: Location::File { file: self.file, offset: stored + (pos - bstart) },
                    },
                ))?,
                BlockState::Zero | BlockState::Unmapped => {
                    em.push(Extent::new(pos, n, ExtentKind::Zero { layer: 0 }))?
                }
                BlockState::NotPresent | BlockState::Undefined => {
                    if self.md.has_parent {
                        em.fall_through(pos, n)?;
                    } else {
                        em.push(Extent::new(pos, n, ExtentKind::Unallocated))?;
                    }
                }
                BlockState::PartiallyPresent(stored) => {
                    pos = self.map_partial(block, stored, pos, seg_end, &mut em)?;
                    blocks += 1;
                    continue;
                }
            }
            pos = seg_end;
            blocks += 1;
        }
        em.flush()
    }

    fn describe(&self, info: &mut ImageInfo) {
        let h = &self.headers.current;
        info.cluster_size = Some(self.bat.block_size);
        // qemu-img reports false for every VHDX it can open; a log that had to be replayed is
        // the VHDX way of not having been closed cleanly.
        info.dirty_flag = self.replay.is_some();
        if let Some(name) = &self.parent_name {
            info.set_backing(name, Some("vhdx"));
        }
        let mut data = Map::new();
        data.insert("subformat".into(), json!(self.subformat()));
        data.insert("block-size".into(), json!(self.bat.block_size));
        data.insert("logical-sector-size".into(), json!(self.md.logical_sector_size));
        data.insert("physical-sector-size".into(), json!(self.md.physical_sector_size));
        data.insert("has-parent".into(), json!(self.md.has_parent));
        data.insert("leave-blocks-allocated".into(), json!(self.md.leave_blocks_allocated));
        data.insert("creator".into(), json!(self.headers.creator));
        data.insert("header-sequence-number".into(), json!(h.sequence_number));
        data.insert("file-write-guid".into(), json!(h.file_write_guid.to_string()));
        data.insert("data-write-guid".into(), json!(h.data_write_guid.to_string()));
        if let Some(id) = self.md.page83 {
            data.insert("virtual-disk-id".into(), json!(id.to_string()));
        }
        data.insert("log".into(), json!(if self.replay.is_some() { "replayed" } else { "clean" }));
        data.insert("log-size".into(), json!(h.log_length));
        if let Some(r) = &self.replay {
            data.insert(
                "log-replay".into(),
                json!({
                    "entries": r.entries,
                    "first-sequence": r.sequence.0,
                    "last-sequence": r.sequence.1,
                    "sectors": r.sectors,
                    "zero-ranges": r.zero_ranges,
                }),
            );
        }
        if let Some(loc) = &self.md.parent_locator {
            if let Some(l) = loc.get("parent_linkage") {
                data.insert("parent-linkage".into(), json!(l));
            }
            if let Some(l) = loc.get("parent_linkage2") {
                data.insert("parent-linkage2".into(), json!(l));
            }
            let entries: Map<String, Value> = loc.entries.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            data.insert("parent-locator".into(), Value::Object(entries));
        }
        info.set_format_specific("vhdx", Value::Object(data));
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        for p in self.headers.problems.iter().chain(self.regions.problems.iter()) {
            report.corruption(p.clone());
        }
        if let Some(r) = &self.replay {
            report.corruption(format!(
                "the log at {:#x} holds {} entries (sequence {}..{}) that were never applied: vdisk reads the image as if they were (qemu-img check -r all would apply them)",
                r.log_offset, r.entries, r.sequence.0, r.sequence.1
            ));
        }
        self.check_bat(report)
    }
}

impl VhdxImage {
    /// Report BAT entries with reserved bits set and allocations that overlap each other or the
    /// file's fixed structures.
    fn check_bat(&self, report: &mut CheckReport) -> Result<()> {
        let bat = &self.bat;
        // (start, end, BAT index) of every stored block and sector bitmap.
        let mut spans: Vec<(u64, u64, u64)> = Vec::new();
        for index in 0..bat.len() {
            let raw = bat.raw(index);
            if raw & bat::RESERVED_MASK != 0 && raw & 0x7 != 0 {
                report.corruption(format!(
                    "BAT entry {index} at {:#x}: reserved bits are set ({raw:#018x})",
                    bat.entry_offset(index)
                ));
            }
            let span = if bat.is_bitmap_index(index) {
                if !self.md.has_parent {
                    continue;
                }
                bat::bitmap_offset(raw).map(|o| (o, bat::SECTOR_BITMAP_BLOCK_SIZE))
            } else {
                let block = index - index / (bat.chunk_ratio + 1);
                match bat::decode(raw) {
                    Some(BlockState::FullyPresent(o) | BlockState::PartiallyPresent(o)) => {
                        Some((o, bat.block_len(block)))
                    }
                    _ => None,
                }
            };
            if let Some((start, len)) = span {
                if spans.len() == spans.capacity() {
                    self.budget.reserve("VHDX check block list", (spans.capacity().max(1024) * 24) as u64)?;
                    spans.try_reserve(spans.capacity().max(1024)).map_err(|_| {
                        crate::Error::limit("the VHDX check block list does not fit in memory".to_string())
                    })?;
                }
                spans.push((start, start.saturating_add(len), index));
            }
        }
        let h = &self.headers.current;
        let t = &self.regions.table;
        let fixed = [
            (0, MIB, "the header section"),
            (h.log_offset, h.log_offset.saturating_add(h.log_length), "the log"),
            (t.bat.offset, t.bat.end(), "the BAT region"),
            (t.metadata.offset, t.metadata.end(), "the metadata region"),
        ];
        spans.sort_unstable();
        let mut prev: Option<(u64, u64, u64)> = None;
        for &(start, end, index) in &spans {
            for &(fs, fe, name) in &fixed {
                if fs < fe && start < fe && fs < end {
                    report.corruption(format!(
                        "BAT entry {index} at {:#x}: its data at {start:#x}..{end:#x} overlaps {name} ({fs:#x}..{fe:#x})",
                        bat.entry_offset(index)
                    ));
                }
            }
            if let Some((ps, pe, pi)) = prev {
                if start < pe {
                    report.corruption(format!(
                        "BAT entries {pi} and {index}: their data at {ps:#x}..{pe:#x} and {start:#x}..{end:#x} overlap"
                    ));
                }
            }
            // Later spans are compared with the one reaching furthest.
            if prev.is_none_or(|(_, pe, _)| pe < end) {
                prev = Some((start, end, index));
            }
        }
        Ok(())
    }
}
