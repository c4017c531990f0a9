//! VDI: VirtualBox's disk images (and qemu's, which writes the same format).
//!
//! # Layout
//!
//! A 72-byte pre-header (free text, the signature `0xbeda107f` at offset 64, the version), a
//! header (version 0, or 1.1 of 384 bytes, or 400 bytes with an LCHS geometry), a *block map*
//! of one little-endian `u32` per block, and the data area. Entry `i` of the map says where
//! virtual block `i` is: `0xffffffff` not allocated, `0xfffffffe` reads as zeros, anything else
//! the index of the block in the data area, stored at `data + index * (extra + block) + extra`
//! (`cbBlockExtra` bytes of service data precede each block). A static (fixed) image has every
//! block allocated, in order; a dynamic one allocates them as they are written. A differencing
//! image (type 4) reads its unallocated blocks from its parent, found by UUID beside it (see
//! [`parent`]).
//!
//! # Where vdisk differs from qemu-img 10
//!
//! - qemu reads only version 1.1 with 1 MiB blocks, sector-aligned offsets, no `cbBlockExtra`
//!   and no parent; vdisk reads versions 0 and 1.x, every power-of-two block size from 512 bytes,
//!   any offsets, extra block data, and differencing images with their parent.
//! - qemu reads a block entry that points past the end of the file as zeros; vdisk refuses the
//!   image at open, naming the entry (a truncated image). A block that starts inside the file and
//!   ends past it (VBoxManage leaves the last block of an odd-sized disk short) reads as zeros
//!   past the end of the file, as in qemu.
//! - qemu reads an entry that is out of range or shared by two blocks as it comes; vdisk refuses
//!   the image at open (`check` reports them, as qemu's does).
//!
//! Like qemu, a disk size that is not a whole number of sectors is rounded up, unallocated
//! blocks of an image without a parent map as zeros (`present: true, zero: true`), and `check`
//! reports out-of-range and duplicate entries and a wrong allocated-block count as corruptions.

mod error;
pub(crate) mod header;
mod parent;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::extent::{Extent, ExtentKind, FileId, Location};
use crate::image::{Emitter, ImageFormat, Layer, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::{self, ReadAt};

use error::VdiError;
use header::{uuid_string, ImageType, VdiHeader, HEAD_BYTES};

/// Block map entry: not allocated (reads from the parent, or as zeros without one).
const BLOCK_FREE: u32 = 0xffff_ffff;
/// Block map entry: reads as zeros.
const BLOCK_ZERO: u32 = 0xffff_fffe;

/// Blocks looked at in one `map` call: the map is in memory, so this only bounds the extents one
/// call appends (4096 blocks are 4 GiB at the usual 1 MiB).
const MAX_BLOCKS_PER_MAP: u64 = 4096;

/// A VDI image.
#[derive(Debug)]
pub(crate) struct VdiImage {
    src: Arc<dyn ReadAt>,
    file: FileId,
    header: VdiHeader,
    /// One entry per block.
    map: Vec<u32>,
    /// The parent of a differencing image (`None` when only describing, or for other types).
    parent: Option<Box<Layer>>,
    /// The file name the parent was found by.
    parent_name: Option<String>,
}

impl VdiImage {
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        path: Option<&Path>,
    ) -> Result<Self> {
        let file_len = src.size();
        let mut head = vec![0u8; HEAD_BYTES];
        let got = src.read_at_zero_fill(&mut head, 0).map_err(|e| crate::Error::io("reading the VDI header", e))?;
        head.truncate(got);
        let header = header::parse(&head)?;
        ctx.limits().check_virtual_size(header.virtual_size)?;
        ctx.limits().check_table_entries("VDI block map", header.blocks)?;
        let map_bytes = header.blocks * 4;
        if header.blocks_offset.checked_add(map_bytes).is_none_or(|e| e > file_len) {
            return Err(VdiError::Corrupt {
                structure: "block map",
                at: header.blocks_offset,
                problem: format!(
                    "{} entries ({map_bytes} bytes) run past the end of the file ({file_len:#x} bytes)",
                    header.blocks
                ),
            }
            .into());
        }
        ctx.budget.reserve("VDI block map", map_bytes)?;
        let raw = io::read_vec(src.as_ref(), header.blocks_offset, map_bytes, "VDI block map")?;
        let map: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        drop(raw);
        let mut image = VdiImage { src, file, header, map, parent: None, parent_name: None };
        if !ctx.describe_only {
            image.validate_map(ctx)?;
            if image.header.image_type == ImageType::Differencing {
                image.open_parent(ctx, path)?;
            }
        }
        Ok(image)
    }

    /// File offset of the data of block index `index` (after its extra data), or `None` on
    /// overflow.
    fn data_at(&self, index: u32) -> Option<u64> {
        let h = &self.header;
        u64::from(index).checked_mul(h.block_stride())?.checked_add(h.data_offset)?.checked_add(h.block_extra)
    }

    /// Bytes of block `i` inside the virtual disk (the last one may be partial).
    fn block_len_in_disk(&self, i: u64) -> u64 {
        let b = self.header.block_bytes;
        self.header.virtual_size.saturating_sub(i.saturating_mul(b)).min(b)
    }

    /// Refuse entries that are out of range, shared, or point past the end of the file.
    fn validate_map(&self, ctx: &OpenContext<'_>) -> Result<()> {
        let h = &self.header;
        let file_len = self.src.size();
        // One bit per block index: which data block is already used, and by which entry is found
        // again only on a clash.
        let bits = usize::try_from(h.blocks.div_ceil(64)).unwrap_or(usize::MAX);
        ctx.budget.reserve("VDI block map check", (bits as u64).saturating_mul(8))?;
        let mut used = vec![0u64; bits];
        let entry_at = |i: u64| h.blocks_offset + 4 * i;
        for (i, &e) in (0u64..).zip(self.map.iter()) {
            if e >= BLOCK_ZERO {
                continue;
            }
            let idx = u64::from(e);
            if idx >= h.blocks {
                return Err(VdiError::BadEntry {
                    index: i,
                    at: entry_at(i),
                    problem: format!("block index {e} is out of range (the image has {} blocks)", h.blocks),
                }
                .into());
            }
            let word = usize::try_from(idx / 64).unwrap_or(usize::MAX);
            let bit = 1u64 << (idx % 64);
            let Some(slot) = used.get_mut(word) else { continue };
            if *slot & bit != 0 {
                let first = self.map.iter().position(|&x| x == e).unwrap_or(0);
                return Err(VdiError::BadEntry {
                    index: i,
                    at: entry_at(i),
                    problem: format!("data block {e} is also used by entry {first}"),
                }
                .into());
            }
            *slot |= bit;
            let start = self.data_at(e).unwrap_or(u64::MAX);
            if start >= file_len && self.block_len_in_disk(i) > 0 {
                return Err(VdiError::BadEntry {
                    index: i,
                    at: entry_at(i),
                    problem: format!(
                        "data block {e} at {start:#x} lies past the end of the file ({file_len:#x} bytes): the image is truncated"
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    fn open_parent(&mut self, ctx: &mut OpenContext<'_>, path: Option<&Path>) -> Result<()> {
        let h = &self.header;
        if h.uuid_linkage == [0; 16] {
            return Err(VdiError::Corrupt {
                structure: "header",
                at: header::PRE_HEADER_BYTES,
                problem: "a differencing image (type 4) whose parent UUID is null: its parent cannot be found".into(),
            }
            .into());
        }
        let (layer, name) = parent::open_parent(ctx, path, h.uuid_linkage, h.uuid_parent_modify)?;
        self.parent = Some(Box::new(layer));
        self.parent_name = Some(name);
        Ok(())
    }

    fn data(&self, start: u64, len: u64, offset: u64) -> Extent {
        Extent::new(start, len, ExtentKind::Data { layer: 0, location: Location::File { file: self.file, offset } })
    }
}

impl ImageFormat for VdiImage {
    fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let diff = self.header.image_type == ImageType::Differencing;
        let mut em = Emitter::new(out, self.parent.as_deref());
        let end = offset.saturating_add(len);
        let b = self.header.block_bytes;
        let mut pos = offset;
        let mut blocks = 0;
        while pos < end && blocks < MAX_BLOCKS_PER_MAP {
            let i = pos / b;
            let block_start = i * b;
            let run_end = end.min(block_start.saturating_add(b));
            let entry = usize::try_from(i).ok().and_then(|i| self.map.get(i)).copied().unwrap_or(BLOCK_FREE);
            match entry {
                BLOCK_FREE if diff => em.fall_through(pos, run_end - pos)?,
                BLOCK_FREE | BLOCK_ZERO => em.push(Extent::new(pos, run_end - pos, ExtentKind::Zero { layer: 0 }))?,
                e => {
                    let at = self.data_at(e).ok_or_else(|| {
                        crate::Error::invalid(format!("VDI block map entry {i}: data block {e} overflows"))
                    })?;
                    em.push(self.data(pos, run_end - pos, at + (pos - block_start)))?;
                }
            }
            pos = run_end;
            blocks += 1;
        }
        em.flush()
    }

    fn describe(&self, info: &mut ImageInfo) {
        let h = &self.header;
        info.cluster_size = Some(h.block_bytes);
        let allocated = self.map.iter().filter(|&&e| e < BLOCK_ZERO).count();
        let zero = self.map.iter().filter(|&&e| e == BLOCK_ZERO).count();
        let mut data = Map::new();
        data.insert("version".into(), json!(h.version_string()));
        data.insert("header-size".into(), json!(h.header_bytes));
        data.insert("image-type".into(), json!(h.image_type.as_str()));
        data.insert("uuid".into(), json!(uuid_string(&h.uuid_create)));
        data.insert("modification-uuid".into(), json!(uuid_string(&h.uuid_modify)));
        if h.uuid_linkage != [0; 16] {
            data.insert("parent-uuid".into(), json!(uuid_string(&h.uuid_linkage)));
        }
        if let Some(m) = h.uuid_parent_modify.filter(|m| *m != [0; 16]) {
            data.insert("parent-modification-uuid".into(), json!(uuid_string(&m)));
        }
        data.insert("block-size".into(), json!(h.block_bytes));
        if h.block_extra != 0 {
            data.insert("block-extra".into(), json!(h.block_extra));
        }
        data.insert("blocks".into(), json!(h.blocks));
        data.insert("allocated-blocks".into(), json!(allocated));
        if zero > 0 {
            data.insert("zero-blocks".into(), json!(zero));
        }
        if h.disk_bytes != h.virtual_size {
            data.insert("disk-size".into(), json!(h.disk_bytes));
        }
        data.insert("block-map-offset".into(), json!(h.blocks_offset));
        data.insert("data-offset".into(), json!(h.data_offset));
        if !h.comment.is_empty() {
            data.insert("comment".into(), json!(h.comment));
        }
        if let Some(g) = &h.lchs {
            data.insert("lchs".into(), json!({"cylinders": g.cylinders, "heads": g.heads, "sectors": g.sectors}));
        }
        if let Some(name) = &self.parent_name {
            info.set_backing(name, Some("vdi"));
        }
        info.set_format_specific("vdi", Value::Object(data));
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        let h = &self.header;
        let file_len = self.src.size();
        let mut owner: Vec<u32> = Vec::new();
        let n = usize::try_from(h.blocks).unwrap_or(usize::MAX);
        owner
            .try_reserve_exact(n)
            .map_err(|_| crate::Error::limit("checking the VDI block map does not fit in memory"))?;
        owner.resize(n, BLOCK_FREE);
        let mut allocated = 0u64;
        for (i, &e) in (0u64..).zip(self.map.iter()) {
            if e >= BLOCK_ZERO {
                continue;
            }
            if u64::from(e) >= h.blocks {
                report.corruption(format!(
                    "block map entry {i}: block index {e} is out of range (the image has {} blocks)",
                    h.blocks
                ));
                continue;
            }
            allocated += 1;
            let Some(slot) = usize::try_from(e).ok().and_then(|k| owner.get_mut(k)) else { continue };
            if *slot != BLOCK_FREE {
                report.corruption(format!("block map entry {i}: data block {e} is also used by entry {}", *slot));
            } else {
                *slot = u32::try_from(i).unwrap_or(BLOCK_FREE);
            }
            let start = self.data_at(e).unwrap_or(u64::MAX);
            let need = self.block_len_in_disk(i);
            if need > 0 && start.saturating_add(need) > file_len {
                report.corruption(format!(
                    "block map entry {i}: data block {e} at {start:#x} (+{need:#x}) runs past the end of the file ({file_len:#x} bytes)"
                ));
            }
        }
        if allocated != h.blocks_allocated {
            report.corruption(format!(
                "the header counts {} allocated blocks but the block map has {allocated}",
                h.blocks_allocated
            ));
        }
        report.total_clusters = Some(h.blocks);
        report.allocated_clusters = Some(allocated);
        Ok(())
    }

    fn backing_layer(&self) -> Option<&Layer> {
        self.parent.as_deref()
    }
}
