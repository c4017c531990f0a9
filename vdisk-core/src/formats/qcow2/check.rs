//! `check`: rebuild the reference counts from every table (active L1/L2, snapshots, the
//! snapshot and refcount tables, bitmaps) and compare them with the on-disk refcounts, as
//! `qemu-img check` does, classifying each difference as a corruption (refcount too low) or a
//! leak (refcount too high).
//!
//! Memory is bounded: one counter per host cluster (reserved from the metadata budget), the
//! refcount table (at most 8 MiB), and one table or refcount block at a time. Tables are read
//! as qemu reads them: bytes past the end of the file are zeros.

use super::bitmap;
use super::compressed;
use super::snapshot;
use super::tables::{
    be64, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, MAX_L1_ENTRIES, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO,
};
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::info::CheckReport;
use crate::io::ReadAt;

/// Refcount table entry: offset of a refcount block.
const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Refcount table entry bits that must be zero.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Bitmap table entry: offset of a data cluster.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bits that must be zero.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry flag: the cluster reads as all ones (only without an offset).
const BME_ALL_ONES: u64 = 1;
/// Table entries read at a time when walking L1 and bitmap tables.
const CHUNK_ENTRIES: u64 = 8192;
/// Table entries a check may examine per 8 bytes of file (an L2 table shared by snapshots is
/// walked once per reference, as qemu does): real images stay far below; a forged image whose
/// snapshots all point at the same huge tables would otherwise keep `check` busy for hours.
const CHECK_WORK_PER_ENTRY: u64 = 64;
/// Table entries a check may always examine, whatever the file size (about a second of work).
const MIN_CHECK_WORK: u64 = 1 << 26;

/// What an L2 entry describes, as `qemu-img check` classifies it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// The recomputed reference counts, one per host cluster, as narrow as the image's refcounts.
enum Counts {
    Narrow(Vec<u16>),
    Wide(Vec<u64>),
}

impl Counts {
    fn get(&self, i: u64) -> u64 {
        let Ok(i) = usize::try_from(i) else { return 0 };
        match self {
            Counts::Narrow(v) => v.get(i).map_or(0, |&c| u64::from(c)),
            Counts::Wide(v) => v.get(i).copied().unwrap_or(0),
        }
    }

    fn set(&mut self, i: u64, value: u64) {
        let Ok(i) = usize::try_from(i) else { return };
        match self {
            Counts::Narrow(v) => {
                if let Some(c) = v.get_mut(i) {
                    *c = u16::try_from(value).unwrap_or(u16::MAX);
                }
            }
            Counts::Wide(v) => {
                if let Some(c) = v.get_mut(i) {
                    *c = value;
                }
            }
        }
    }

    fn len(&self) -> u64 {
        match self {
            Counts::Narrow(v) => v.len() as u64,
            Counts::Wide(v) => v.len() as u64,
        }
    }
}

/// Allocation counters `qemu-img check` prints.
#[derive(Default)]
struct FragInfo {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// One run of `check` over an image.
pub(super) struct Checker<'a> {
    img: &'a Qcow2Image,
    src: &'a dyn ReadAt,
    cs: u64,
    file_len: u64,
    counts: Counts,
    /// Clusters to compare: the file's, plus a last one partly past the end when referenced.
    compare_len: u64,
    refcount_bits: u32,
    refcount_max: u64,
    reftable: Vec<u64>,
    block_cache: Option<(u64, Vec<u8>)>,
    frag: FragInfo,
    /// A cluster-sized buffer for L2 tables.
    l2_buf: Vec<u8>,
    /// Table entries examined so far, and the most allowed.
    work: u64,
    work_limit: u64,
}

impl<'a> Checker<'a> {
    pub(super) fn new(img: &'a Qcow2Image) -> Result<Self> {
        let src = img.src.as_ref();
        let cs = img.geo.cluster_size;
        let file_len = src.size();
        let nb_clusters = file_len.div_ceil(cs);
        let slots = nb_clusters + 1;
        let what = "refcount check";
        if slots > img.max_table_entries {
            return Err(Error::limit(format!(
                "{what} needs {slots} refcount entries, more than the limit of {} (raise max_table_entries / --max-table-entries)",
                img.max_table_entries
            )));
        }
        let refcount_bits = 1u32 << img.header.refcount_order;
        let width = if refcount_bits <= 16 { 2 } else { 8 };
        img.budget.reserve(what, slots * width)?;
        let n = crate::io::to_usize(slots, what)?;
        let counts = if refcount_bits <= 16 { Counts::Narrow(vec![0; n]) } else { Counts::Wide(vec![0; n]) };
        let refcount_max = if refcount_bits >= 64 { u64::MAX } else { (1u64 << refcount_bits) - 1 };

        let reftable_bytes = u64::from(img.header.refcount_table_clusters) * cs;
        img.budget.reserve("refcount table", reftable_bytes)?;
        let mut raw = vec![0u8; crate::io::to_usize(reftable_bytes, "refcount table")?];
        read_zero_fill(src, img.header.refcount_table_offset, &mut raw, "refcount table")?;
        let reftable = raw.chunks_exact(8).map(be64).collect();
        img.budget.reserve("refcount check", cs)?;
        Ok(Checker {
            img,
            src,
            cs,
            file_len,
            counts,
            compare_len: nb_clusters,
            refcount_bits,
            refcount_max,
            reftable,
            block_cache: None,
            frag: FragInfo::default(),
            l2_buf: vec![0; crate::io::to_usize(cs, "L2 table")?],
            work: 0,
            work_limit: (file_len / 8).saturating_mul(CHECK_WORK_PER_ENTRY).max(MIN_CHECK_WORK),
        })
    }

    pub(super) fn run(mut self, report: &mut CheckReport) -> Result<()> {
        let img = self.img;
        let h = &img.header;
        let cs = self.cs;
        // The header cluster.
        self.inc(report, 0, cs);
        // The active L1 table and everything under it.
        self.check_l1(report, h.l1_table_offset, h.l1_size, true)?;
        // Snapshots.
        if h.has_data_file() && !img.snapshots.is_empty() {
            report.corruption(format!("{} snapshots in an image with an external data file", img.snapshots.len()));
        }
        for (i, sn) in img.snapshots.iter().enumerate() {
            if sn.extra_data_size < snapshot::COMPLETE_EXTRA_DATA {
                report.corruption(format!("snapshot table entry {i} is incomplete"));
            }
        }
        for sn in &img.snapshots {
            if sn.l1_table_offset % cs != 0 {
                report.corruption(format!(
                    "snapshot {} ({}): L1 table at {:#x} is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
                report.corruption(format!(
                    "snapshot {} ({}): L1 table of {:#x} entries is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.check_l1(report, sn.l1_table_offset, sn.l1_size, false)?;
        }
        self.inc(report, h.snapshots_offset, img.snapshots_size);
        // The refcount table.
        self.inc(report, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs);
        // Bitmaps.
        self.check_bitmaps(report)?;
        // Refcount blocks.
        self.check_refblocks(report);
        // Compare with what is on disk.
        let highest = self.compare(report)?;
        self.check_copied_flags(report)?;

        report.image_end_offset = Some((highest + 1).saturating_mul(cs));
        report.total_clusters = Some(h.size.div_ceil(cs));
        report.allocated_clusters = Some(self.frag.allocated);
        report.fragmented_clusters = Some(self.frag.fragmented);
        report.compressed_clusters = Some(self.frag.compressed);
        Ok(())
    }

    /// Account for examining `entries` more table entries, failing once the work is out of
    /// proportion to the file.
    fn charge(&mut self, entries: u64) -> Result<()> {
        self.work = self.work.saturating_add(entries);
        if self.work > self.work_limit {
            return Err(Error::limit(format!(
                "qcow2 check stopped after examining {} table entries, out of proportion to a file of {} bytes: the tables reference each other over and over (a corrupt or forged image)",
                self.work_limit, self.file_len
            )));
        }
        Ok(())
    }

    /// Count one reference to every cluster of `offset..offset + size`.
    fn inc(&mut self, report: &mut CheckReport, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let Some(end) = offset.checked_add(size) else {
            report.corruption(format!("reference to {offset:#x} (+{size:#x}) overflows 64 bits"));
            return;
        };
        // The last cluster may be partly past the end of the file; anything further is corrupt.
        if end > self.file_len && end - self.file_len >= self.cs {
            report.corruption(format!(
                "counting a reference to a region a cluster or more past the end of the file: offset {offset:#x} size {size:#x}"
            ));
            return;
        }
        for k in offset / self.cs..=(end - 1) / self.cs {
            if k >= self.counts.len() {
                break;
            }
            self.compare_len = self.compare_len.max(k + 1);
            let c = self.counts.get(k);
            if c >= self.refcount_max {
                report.corruption(format!("refcount overflow at cluster offset {:#x}", k * self.cs));
                continue;
            }
            self.counts.set(k, c + 1);
        }
    }

    /// Walk an L1 table of `size` entries at `offset` and the L2 tables it points to.
    fn check_l1(&mut self, report: &mut CheckReport, offset: u64, size: u32, active: bool) -> Result<()> {
        let size = u64::from(size);
        if size == 0 {
            return Ok(());
        }
        self.inc(report, offset, size * 8);
        let mut chunk = Vec::new();
        let mut first = 0;
        while first < size {
            let n = CHUNK_ENTRIES.min(size - first);
            let at = offset + first * 8;
            if at >= self.file_len {
                break; // the rest reads as zeros: no entries
            }
            self.charge(n)?;
            chunk.resize(crate::io::to_usize(n * 8, "L1 table")?, 0);
            read_zero_fill(self.src, at, &mut chunk, "L1 table")?;
            let entries: Vec<u64> = chunk.chunks_exact(8).map(be64).collect();
            for (i, entry) in (first..).zip(entries) {
                if entry == 0 {
                    continue;
                }
                if entry & L1E_RESERVED_MASK != 0 {
                    report.corruption(format!(
                        "L1 entry {i:#x} at {:#x} has reserved bits set: {entry:#x}",
                        offset + i * 8
                    ));
                }
                let l2 = entry & L1E_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                self.inc(report, l2, self.cs);
                if l2 % self.cs != 0 {
                    report.corruption(format!("L2 table at {l2:#x} is not cluster aligned; L1 entry {i:#x} corrupted"));
                }
                self.check_l2(report, l2, active)?;
            }
            first += n;
        }
        Ok(())
    }

    fn cluster_type(&self, entry: u64) -> ClusterType {
        let h = &self.img.header;
        if entry & OFLAG_COMPRESSED != 0 {
            ClusterType::Compressed
        } else if entry & OFLAG_ZERO != 0 && !self.img.geo.extended {
            if entry & L2E_OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if entry & L2E_OFFSET_MASK == 0 {
            if h.has_data_file() && entry & OFLAG_COPIED != 0 {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// Read the L2 table at `offset` into `self.l2_buf`.
    fn read_l2(&mut self, offset: u64) -> Result<()> {
        self.l2_buf.fill(0);
        if offset < self.file_len {
            read_zero_fill(self.src, offset, &mut self.l2_buf, "L2 table")?;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> (u64, u64) {
        let eb = if self.img.geo.extended { 16 } else { 8 };
        let raw = self.l2_buf.get(index * eb..).unwrap_or_default();
        let bitmap = if eb == 16 { be64(raw.get(8..).unwrap_or_default()) } else { 0 };
        (be64(raw), bitmap)
    }

    fn check_l2(&mut self, report: &mut CheckReport, l2_offset: u64, active: bool) -> Result<()> {
        self.charge(self.img.geo.l2_entries)?;
        self.read_l2(l2_offset)?;
        let has_data_file = self.img.header.has_data_file();
        let mut next_contiguous = 0u64;
        for i in 0..crate::io::to_usize(self.img.geo.l2_entries, "L2 table")? {
            let (entry, bitmap) = self.entry(i);
            let kind = self.cluster_type(entry);
            if kind != ClusterType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                report.corruption(format!(
                    "L2 entry {i:#x} of the table at {l2_offset:#x} has reserved bits set: {entry:#x}"
                ));
            }
            match kind {
                ClusterType::Compressed => {
                    let (coffset, csize) = compressed::decode(entry & !OFLAG_COPIED, self.img.geo.cluster_bits);
                    if entry & OFLAG_COPIED != 0 {
                        report.corruption(format!(
                            "compressed cluster at {coffset:#x}: the copied flag must never be set for compressed clusters"
                        ));
                    }
                    if has_data_file {
                        report
                            .corruption(format!("compressed cluster {i} with an external data file, entry {entry:#x}"));
                        continue;
                    }
                    if bitmap != 0 {
                        report.corruption(format!(
                            "compressed cluster {i} with a non-zero subcluster bitmap, entry {entry:#x}"
                        ));
                        continue;
                    }
                    self.inc(report, coffset, csize);
                    if active {
                        self.frag.allocated += 1;
                        self.frag.compressed += 1;
                        self.frag.fragmented += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = entry & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        report.corruption(format!(
                            "data cluster at {offset:#x}: corrupted subcluster allocation bitmap {bitmap:#018x}"
                        ));
                    }
                    if offset % self.cs != 0 {
                        let has_data =
                            if self.img.geo.extended { bitmap & 0xffff_ffff != 0 } else { entry & OFLAG_ZERO == 0 };
                        report.corruption(if has_data {
                            format!("data cluster at {offset:#x} is not cluster aligned; L2 entry corrupted")
                        } else {
                            format!("preallocated cluster at {offset:#x} is not cluster aligned; L2 entry corrupted")
                        });
                    }
                    if active {
                        self.frag.allocated += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.frag.fragmented += 1;
                        }
                        next_contiguous = offset + self.cs;
                    }
                    if !has_data_file {
                        self.inc(report, offset, self.cs);
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        report.corruption(format!(
                            "unallocated cluster {i} of the L2 table at {l2_offset:#x} has a non-zero subcluster allocation bitmap"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_bitmaps(&mut self, report: &mut CheckReport) -> Result<()> {
        let Some(ext) = self.img.header.bitmaps else { return Ok(()) };
        self.inc(report, ext.directory_offset, ext.directory_size);
        let img = self.img;
        let mut chunk = Vec::new();
        for bm in &img.bitmaps {
            let size = u64::from(bm.table_size);
            self.inc(report, bm.table_offset, size * 8);
            let mut first = 0;
            while first < size.min(u64::from(bitmap::MAX_TABLE_ENTRIES)) {
                let n = CHUNK_ENTRIES.min(size - first);
                let at = bm.table_offset + first * 8;
                if at >= self.file_len {
                    break;
                }
                self.charge(n)?;
                chunk.resize(crate::io::to_usize(n * 8, "bitmap table")?, 0);
                read_zero_fill(self.src, at, &mut chunk, "bitmap table")?;
                let entries: Vec<u64> = chunk.chunks_exact(8).map(be64).collect();
                for entry in entries {
                    let offset = entry & BME_OFFSET_MASK;
                    if entry & BME_RESERVED_MASK != 0
                        || (offset != 0 && (entry & BME_ALL_ONES != 0 || offset % self.cs != 0))
                    {
                        report.corruption(format!("bitmap '{}': invalid bitmap table entry {entry:#x}", bm.name));
                        continue;
                    }
                    if offset != 0 {
                        self.inc(report, offset, self.cs);
                    }
                }
                first += n;
            }
        }
        Ok(())
    }

    fn check_refblocks(&mut self, report: &mut CheckReport) {
        for i in 0..self.reftable.len() {
            let entry = self.reftable.get(i).copied().unwrap_or(0);
            let offset = entry & REFT_OFFSET_MASK;
            if entry & REFT_RESERVED_MASK != 0 {
                report.corruption(format!("refcount table entry {i} has reserved bits set"));
                continue;
            }
            if offset % self.cs != 0 {
                report.corruption(format!("refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            let cluster = offset / self.cs;
            if cluster >= self.compare_len {
                report.corruption(format!("refcount block {i} at {offset:#x} is outside the image"));
                continue;
            }
            if offset != 0 {
                self.inc(report, offset, self.cs);
                let c = self.counts.get(cluster);
                if c != 1 {
                    report.corruption(format!("refcount block {i} at {offset:#x} is referenced {c} times"));
                }
            }
        }
    }

    /// The refcount of `cluster` on disk; `None` when its refcount block is unusable.
    fn on_disk(&mut self, cluster: u64) -> Result<Option<u64>> {
        let per_block = self.cs * 8 / u64::from(self.refcount_bits);
        let block = cluster / per_block;
        let Some(entry) = usize::try_from(block).ok().and_then(|b| self.reftable.get(b)).copied() else {
            return Ok(Some(0));
        };
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(Some(0));
        }
        if offset % self.cs != 0 {
            return Ok(None);
        }
        if self.block_cache.as_ref().map(|(b, _)| *b) != Some(block) {
            let mut buf = match self.block_cache.take() {
                Some((_, buf)) => buf,
                None => vec![0u8; crate::io::to_usize(self.cs, "refcount block")?],
            };
            buf.fill(0);
            if offset < self.file_len {
                read_zero_fill(self.src, offset, &mut buf, "refcount block")?;
            }
            self.block_cache = Some((block, buf));
        }
        let Some((_, buf)) = &self.block_cache else { return Ok(Some(0)) };
        Ok(Some(refcount_at(buf, cluster % per_block, self.refcount_bits)))
    }

    /// Compare every cluster's counted references with its refcount; returns the highest
    /// cluster in use.
    fn compare(&mut self, report: &mut CheckReport) -> Result<u64> {
        let mut highest = 0;
        for i in 0..self.compare_len {
            let Some(on_disk) = self.on_disk(i)? else {
                report.check_errors += 1;
                continue;
            };
            let counted = self.counts.get(i);
            if on_disk > 0 || counted > 0 {
                highest = i;
            }
            if on_disk < counted {
                report.corruption(format!("cluster {i} refcount={on_disk} reference={counted}"));
            } else if on_disk > counted {
                report.leak(format!("leaked cluster {i} refcount={on_disk} reference={counted}"));
            }
        }
        Ok(highest)
    }

    /// The COPIED flag of active L1 and L2 entries must be set exactly when the refcount is 1.
    fn check_copied_flags(&mut self, report: &mut CheckReport) -> Result<()> {
        let img = self.img;
        let has_data_file = img.header.has_data_file();
        let size = u64::from(img.header.l1_size);
        let mut chunk = Vec::new();
        let mut first = 0;
        while first < size {
            let n = CHUNK_ENTRIES.min(size - first);
            let at = img.header.l1_table_offset + first * 8;
            if at >= self.file_len {
                break;
            }
            self.charge(n)?;
            chunk.resize(crate::io::to_usize(n * 8, "L1 table")?, 0);
            read_zero_fill(self.src, at, &mut chunk, "L1 table")?;
            let l1: Vec<u64> = chunk.chunks_exact(8).map(be64).collect();
            for (i, l1_entry) in (first..).zip(l1) {
                let l2 = l1_entry & L1E_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let Some(refcount) = self.on_disk(l2 / self.cs)? else { continue };
                if (refcount == 1) != (l1_entry & OFLAG_COPIED != 0) {
                    report.corruption(format!(
                        "OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"
                    ));
                }
                self.read_l2(l2)?;
                for j in 0..crate::io::to_usize(img.geo.l2_entries, "L2 table")? {
                    let (entry, _) = self.entry(j);
                    if !matches!(self.cluster_type(entry), ClusterType::Normal | ClusterType::ZeroAlloc) {
                        continue;
                    }
                    let refcount = if has_data_file {
                        1
                    } else {
                        let Some(r) = self.on_disk((entry & L2E_OFFSET_MASK) / self.cs)? else { continue };
                        r
                    };
                    if (refcount == 1) != (entry & OFLAG_COPIED != 0) {
                        report.corruption(format!("OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"));
                    }
                }
            }
            first += n;
        }
        Ok(())
    }
}

/// Entry `index` of a refcount block of `bits`-bit entries (big-endian; sub-byte entries from
/// the least significant bits of each byte).
fn refcount_at(block: &[u8], index: u64, bits: u32) -> u64 {
    let Ok(index) = usize::try_from(index) else { return 0 };
    let byte = |i: usize| block.get(i).copied().map_or(0, u64::from);
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits as usize;
            let shift = (index % per_byte) * bits as usize;
            (byte(index / per_byte) >> shift) & ((1 << bits) - 1)
        }
        8 => byte(index),
        _ => {
            let n = bits as usize / 8;
            let start = index * n;
            (0..n).fold(0u64, |acc, k| (acc << 8) | byte(start + k))
        }
    }
}

/// Read `buf.len()` bytes at `offset`, zeros past the end of the file.
fn read_zero_fill(src: &dyn ReadAt, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    src.read_at_zero_fill(buf, offset).map_err(|e| Error::io(format!("reading the {what} at {offset:#x}"), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::refcount_at;

    #[test]
    fn refcount_widths() {
        let block = [0b1011_0100u8, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
        assert_eq!(refcount_at(&block, 2, 1), 1);
        assert_eq!(refcount_at(&block, 3, 1), 0);
        assert_eq!(refcount_at(&block, 1, 2), 1);
        assert_eq!(refcount_at(&block, 1, 4), 0b1011);
        assert_eq!(refcount_at(&block, 1, 8), 0x12);
        assert_eq!(refcount_at(&block, 1, 16), 0x3456);
        assert_eq!(refcount_at(&block, 1, 32), 0x789a_bcde);
        assert_eq!(refcount_at(&block, 0, 64), 0xb412_3456_789a_bcde);
        assert_eq!(refcount_at(&block, 9, 64), 0);
    }
}
