//! L1 and L2 tables: geometry, entry layout, and mapping guest ranges to extents.

use super::error::invalid;
use super::header::Header;
use crate::error::Result;
use crate::extent::{Extent, ExtentKind};
use crate::image::{map_backing, Emitter, Layer, OpenContext};
use crate::io::ReadAt;

/// L1 entry: offset of the L2 table (bits 9-55).
pub(super) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero.
pub(super) const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry: host cluster offset of a standard cluster (bits 9-55).
pub(super) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry bits that must be zero.
pub(super) const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// L1/L2 entry flag: the refcount is exactly one.
pub(super) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: the cluster is compressed.
pub(super) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry flag: the cluster reads as zeros (version 3).
pub(super) const OFLAG_ZERO: u64 = 1 << 0;
/// Largest active L1 table (qemu's limit: 32 MiB of entries).
pub(super) const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;
/// Smallest subcluster (qemu's bound: a sector).
const MIN_SUBCLUSTER: u64 = 512;

/// How guest offsets split into L1 index, L2 index and offset in a cluster.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    /// log2 of the cluster size.
    pub(super) cluster_bits: u32,
    /// Cluster size in bytes.
    pub(super) cluster_size: u64,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub(super) entry_bytes: u64,
    /// Entries per L2 table.
    pub(super) l2_entries: u64,
    /// True with extended L2 entries (subclusters).
    pub(super) extended: bool,
}

impl Geometry {
    pub(super) fn new(h: &Header) -> Result<Self> {
        let cluster_size = h.cluster_size();
        let extended = h.extended_l2();
        let entry_bytes = if extended { 16 } else { 8 };
        if extended && cluster_size / SUBCLUSTERS < MIN_SUBCLUSTER {
            return Err(invalid(
                "qcow2 header",
                0x48,
                format!(
                    "extended L2 entries with {cluster_size}-byte clusters make subclusters smaller than 512 bytes"
                ),
            ));
        }
        Ok(Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size,
            entry_bytes,
            l2_entries: cluster_size / entry_bytes,
            extended,
        })
    }

    /// Guest bytes one L2 table maps (at most 2^21 * 2^18 = 2^39).
    pub(super) fn l2_coverage(&self) -> u64 {
        self.cluster_size * self.l2_entries
    }

    /// Subcluster size with extended L2 entries.
    fn subcluster_size(&self) -> u64 {
        self.cluster_size / SUBCLUSTERS
    }
}

/// Read the part of the active L1 table that covers the virtual disk.
pub(super) fn read_l1(ctx: &OpenContext<'_>, src: &dyn ReadAt, h: &Header, geo: &Geometry) -> Result<Vec<u64>> {
    let what = "L1 table";
    let at = h.l1_table_offset;
    let size = u64::from(h.l1_size);
    if size > MAX_L1_ENTRIES {
        return Err(invalid(what, at, format!("{size} entries, more than the limit of {MAX_L1_ENTRIES}")));
    }
    let needed = h.size.div_ceil(geo.l2_coverage());
    if size < needed {
        return Err(invalid(what, at, format!("{size} entries are too few for the virtual size (needs {needed})")));
    }
    if size > 0 && at % geo.cluster_size != 0 {
        return Err(invalid(what, at, "is not cluster aligned"));
    }
    if needed == 0 {
        return Ok(Vec::new());
    }
    ctx.limits().check_table_entries(what, needed)?;
    let bytes = needed * 8;
    let end = crate::io::checked_end(at, bytes, what)?;
    if end > src.size() {
        return Err(invalid(
            what,
            at,
            format!("its {bytes:#x} bytes lie past the end of the file ({:#x} bytes)", src.size()),
        ));
    }
    ctx.budget.reserve(what, bytes)?;
    let raw = crate::io::read_vec(src, at, bytes, what)?;
    Ok(raw.chunks_exact(8).map(be64).collect())
}

/// A big-endian u64 from 8 bytes (0 if fewer).
pub(super) fn be64(b: &[u8]) -> u64 {
    b.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes)
}

/// Everything `map` needs to know about one image.
pub(super) struct Mapper<'a> {
    pub(super) src: &'a dyn ReadAt,
    pub(super) header: &'a Header,
    pub(super) geo: Geometry,
    pub(super) l1: &'a [u64],
    pub(super) backing: Option<&'a Layer>,
    /// Where compressed clusters live (the image file).
    pub(super) image_file: crate::extent::FileId,
    /// Where data clusters live (the image file or the external data file; None when the data
    /// file was not opened).
    pub(super) data_file: Option<crate::extent::FileId>,
}

impl Mapper<'_> {
    fn l1_entry(&self, index: u64) -> u64 {
        usize::try_from(index).ok().and_then(|i| self.l1.get(i)).copied().unwrap_or(0)
    }

    /// [`crate::image::ImageFormat::map`] for qcow2: at most one L2 table's worth (or a run of
    /// unallocated L2 tables).
    pub(super) fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset.saturating_add(len);
        let cov = self.geo.l2_coverage();
        let l1_index = offset / cov;
        let l2_offset = self.l1_entry(l1_index) & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            let mut next = l1_index + 1;
            while next.saturating_mul(cov) < end && self.l1_entry(next) & L1E_OFFSET_MASK == 0 {
                next += 1;
            }
            let run_end = next.saturating_mul(cov).min(end);
            return map_backing(self.backing, offset, run_end - offset, out);
        }
        let base = l1_index * cov;
        let table_end = (base + cov).min(end);
        self.map_l2(l1_index, l2_offset, base, offset, table_end, out)
    }

    fn map_l2(
        &self,
        l1_index: u64,
        l2_offset: u64,
        base: u64,
        start: u64,
        end: u64,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let what = "L2 table";
        let geo = self.geo;
        let cs = geo.cluster_size;
        if l2_offset % cs != 0 {
            return Err(invalid(what, l2_offset, format!("is not cluster aligned (L1 index {l1_index:#x})")));
        }
        let table_end = crate::io::checked_end(l2_offset, cs, what)?;
        if table_end > self.src.size() {
            return Err(invalid(
                what,
                l2_offset,
                format!("lies past the end of the file ({:#x} bytes) (L1 index {l1_index:#x})", self.src.size()),
            ));
        }
        let first = (start - base) >> geo.cluster_bits;
        let last = (end - 1 - base) >> geo.cluster_bits;
        let count = last - first + 1;
        // At most one cluster (2 MiB): the slice of the table this range needs.
        let entries =
            crate::io::read_vec(self.src, l2_offset + first * geo.entry_bytes, count * geo.entry_bytes, what)?;
        let mut em = Emitter::new(out, self.backing);
        for (i, raw) in (0..count).zip(entries.chunks_exact(crate::io::to_usize(geo.entry_bytes, what)?)) {
            let index = first + i;
            let cluster_start = base + (index << geo.cluster_bits);
            let s = start.max(cluster_start);
            let e = end.min(cluster_start + cs);
            let entry = be64(raw);
            let bitmap = if geo.extended { be64(raw.get(8..).unwrap_or_default()) } else { 0 };
            let at = Where { l2_offset, index, cluster_start };
            self.map_entry(&at, entry, bitmap, s, e, &mut em)?;
        }
        em.flush()
    }

    fn map_entry(&self, at: &Where, entry: u64, bitmap: u64, s: u64, e: u64, em: &mut Emitter<'_>) -> Result<()> {
        let h = self.header;
        let cs = self.geo.cluster_size;
        if entry & OFLAG_COMPRESSED != 0 {
            if h.has_data_file() {
                return Err(at.error("a compressed cluster in an image with an external data file"));
            }
            let (offset, stored_len) = super::compressed::decode(entry, self.geo.cluster_bits);
            let unit = crate::extent::CompressedUnit {
                file: self.image_file,
                method: h.compression,
                offset,
                stored_len,
                unit_len: cs,
                skip: s - at.cluster_start,
            };
            let kind = ExtentKind::Data { layer: 0, location: crate::extent::Location::Compressed(unit) };
            return em.push(Extent::new(s, e - s, kind));
        }
        let host = entry & L2E_OFFSET_MASK;
        // Offset 0 is a valid data file offset; there the COPIED flag tells it from "unallocated".
        let allocated = host != 0 || (h.has_data_file() && entry & OFLAG_COPIED != 0);
        if !self.geo.extended {
            if entry & OFLAG_ZERO != 0 {
                if h.version < 3 {
                    return Err(at.error("a zero cluster entry in a version 2 image"));
                }
                if host != 0 {
                    self.check_host(at, host)?;
                }
                return em.push(Extent::new(s, e - s, ExtentKind::Zero { layer: 0 }));
            }
            if !allocated {
                return em.fall_through(s, e - s);
            }
            self.check_host(at, host)?;
            return em.push(self.data(s, e - s, host + (s - at.cluster_start))?);
        }
        // Extended L2: bits 0-31 of the bitmap say "allocated", bits 32-63 "reads as zero".
        let alloc = bitmap & 0xffff_ffff;
        let zero = bitmap >> 32;
        if allocated {
            if alloc & zero != 0 {
                return Err(at.error(format!("subclusters marked both allocated and zero (bitmap {bitmap:#018x})")));
            }
            self.check_host(at, host)?;
        } else if alloc != 0 {
            return Err(at.error(format!("an unallocated cluster with allocated subclusters (bitmap {bitmap:#018x})")));
        }
        let sc = self.geo.subcluster_size();
        let mut pos = s;
        while pos < e {
            let in_cluster = pos - at.cluster_start;
            let sub = in_cluster / sc;
            let next = (at.cluster_start + (sub + 1) * sc).min(e);
            if zero & (1 << sub) != 0 {
                em.push(Extent::new(pos, next - pos, ExtentKind::Zero { layer: 0 }))?;
            } else if allocated && alloc & (1 << sub) != 0 {
                em.push(self.data(pos, next - pos, host + in_cluster)?)?;
            } else {
                em.fall_through(pos, next - pos)?;
            }
            pos = next;
        }
        Ok(())
    }

    /// A data extent at `host` in the data file.
    fn data(&self, start: u64, len: u64, host: u64) -> Result<Extent> {
        let file = self.data_file.ok_or_else(|| {
            crate::Error::invalid("internal error: the external data file was not opened (describe-only open)")
        })?;
        Ok(Extent::new(
            start,
            len,
            ExtentKind::Data { layer: 0, location: crate::extent::Location::File { file, offset: host } },
        ))
    }

    /// A host cluster offset must be cluster aligned, and in an external data file equal to the
    /// guest offset.
    fn check_host(&self, at: &Where, host: u64) -> Result<()> {
        if host % self.geo.cluster_size != 0 {
            return Err(at.error(format!("data cluster offset {host:#x} is not cluster aligned")));
        }
        if self.header.has_data_file() && host != at.cluster_start {
            return Err(at.error(format!(
                "external data file cluster offset {host:#x} differs from the guest offset {:#x}",
                at.cluster_start
            )));
        }
        Ok(())
    }
}

/// Where an L2 entry is, for messages.
struct Where {
    l2_offset: u64,
    index: u64,
    cluster_start: u64,
}

impl Where {
    fn error(&self, why: impl std::fmt::Display) -> crate::Error {
        invalid(
            "L2 table",
            self.l2_offset,
            format!("entry {:#x} (guest offset {:#x}): {why}", self.index, self.cluster_start),
        )
    }
}
