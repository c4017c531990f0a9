//! Hosted sparse extents (`KDMV`): monolithicSparse, the pieces of twoGbMaxExtentSparse, and
//! streamOptimized (compressed grains with markers, the grain directory possibly at the end).

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::extent::{CompressedUnit, Compression, ExtentKind, FileId, Location};
use crate::image::OpenContext;
use crate::info::CheckReport;
use crate::io::{read_exact, ReadAt};

use super::grains::{load_tables, read_directory, tables_for_check, GrainLookup, GrainTables, Mem, TableSpec};
use super::header::{
    parse_marker, SparseHeader, GRAIN_MARKER_BYTES, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
};

/// Upper bound on the stored size of a compressed grain without a marker (which would say its
/// size): deflate never grows data by more than a few bytes per block, so twice the grain is ample.
const UNMARKED_STORED_FACTOR: u64 = 2;

/// A hosted sparse extent.
#[derive(Debug)]
pub(crate) struct SparseExtent {
    pub(crate) header: SparseHeader,
    /// Byte offset of the grain directory in use.
    gd_offset: u64,
    file: FileId,
    src: Arc<dyn ReadAt>,
    /// The grain tables, or `None` when only describing.
    tables: Option<GrainTables<u32>>,
    /// Why the primary grain directory was rejected, when the redundant one is in use.
    pub(crate) primary_problem: Option<String>,
}

impl SparseExtent {
    /// Open the extent whose validated header (from the footer for a stream with its grain
    /// directory at the end) is `header`. Tables are loaded unless `ctx.describe_only`.
    pub(crate) fn open(
        ctx: &OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        header: SparseHeader,
    ) -> Result<SparseExtent> {
        let gd_offset = header.gd_offset.ok_or_else(|| Error::invalid("sparse header: no grain directory offset"))?;
        ctx.limits().check_virtual_size(header.capacity)?;
        if header.compressed {
            ctx.limits().check_unit("compressed grain", header.grain_size)?;
        }
        let mut ext = SparseExtent { header, gd_offset, file, src, tables: None, primary_problem: None };
        if !ctx.describe_only {
            let (tables, gd, problem) = ext.load_any(Mem { limits: ctx.limits(), budget: &ctx.budget })?;
            ext.tables = Some(tables);
            ext.gd_offset = gd;
            ext.primary_problem = problem;
        }
        Ok(ext)
    }

    /// Load the primary directory, or the redundant one when the primary is damaged: the tables,
    /// the directory's offset, and the primary's problem when the redundant one is used.
    fn load_any(&self, mem: Mem<'_>) -> Result<(GrainTables<u32>, u64, Option<String>)> {
        let primary = self.header.gd_offset.unwrap_or(self.gd_offset);
        match self.load(mem, primary, "grain directory") {
            Ok(t) => Ok((t, primary, None)),
            Err(e) if e.kind() == ErrorKind::InvalidImage => {
                let Some(rgd) = self.header.rgd_offset else { return Err(e) };
                match self.load(mem, rgd, "redundant grain directory") {
                    Ok(t) => Ok((t, rgd, Some(e.to_string()))),
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Load the directory at `gd_offset` and every table it names, validating each entry.
    fn load(&self, mem: Mem<'_>, gd_offset: u64, what: &str) -> Result<GrainTables<u32>> {
        let h = &self.header;
        let src = self.src.as_ref();
        if gd_offset < SECTOR {
            return Err(Error::invalid(format!("{what} at {gd_offset:#x} overlaps the sparse header")));
        }
        let n = h.gd_entries();
        let mut dir = read_directory(mem, src, gd_offset, n, 4, what)?;
        // Sector offsets are u32 on disk, so the byte offsets cannot overflow; 0 stays "no table".
        dir.iter_mut().for_each(|e| *e *= SECTOR);
        let size = src.size();
        let zeroed = h.zeroed_grains;
        let spec = TableSpec { what, per_table: u64::from(h.gtes_per_gt), entry_bytes: 4 };
        load_tables(mem, src, &spec, &dir, |toff, idx, raw| {
            let v = u32::try_from(raw).unwrap_or(u32::MAX);
            if v == 0 || (v == 1 && zeroed) {
                return Ok(v);
            }
            let off = u64::from(v) * SECTOR;
            if off >= size {
                return Err(Error::invalid(format!(
                    "grain table at {toff:#x}, entry {idx}: grain at {off:#x} lies past the end of the file ({size:#x} bytes; truncated image?)"
                )));
            }
            Ok(v)
        })
    }

    /// The grain size in bytes.
    pub(crate) fn grain_size(&self) -> u64 {
        self.header.grain_size
    }

    /// Metadata byte ranges: header, descriptor, directories and tables in use.
    fn metadata_ranges(&self, tables: &GrainTables<u32>) -> Vec<(u64, u64, &'static str)> {
        let h = &self.header;
        let mut m = vec![(0, SECTOR, "header")];
        if let Some((off, len)) = h.descriptor {
            m.push((off, off.saturating_add(len), "embedded descriptor"));
        }
        let gd_len = h.gd_entries().saturating_mul(4);
        m.push((self.gd_offset, self.gd_offset.saturating_add(gd_len), "grain directory"));
        let tb = u64::from(h.gtes_per_gt) * 4;
        for &t in &tables.table_offsets {
            m.push((t, t.saturating_add(tb), "grain table"));
        }
        m.sort_unstable();
        m
    }

    /// Check the tables: grains outside the file, overlapping metadata or each other, the
    /// redundant directory against the primary, and leaked grains.
    pub(crate) fn check(&self, name: &str, report: &mut CheckReport) -> Result<()> {
        let mut primary_problem = self.primary_problem.clone();
        let loaded = tables_for_check(self.tables.as_ref(), |m| {
            self.load_any(m).map(|(t, _, problem)| {
                primary_problem = problem;
                t
            })
        });
        let tables = match loaded {
            Ok(t) => t,
            Err(e) => {
                report.corruption(format!("{name}: {e}"));
                return Ok(());
            }
        };
        let tables = tables.as_ref();
        let h = &self.header;
        if let Some(p) = &primary_problem {
            report
                .corruption(format!("{name}: the primary grain directory is damaged ({p}); the redundant one is used"));
        } else if let Some(rgd) = h.rgd_offset {
            // Both copies should agree; a difference means one of them was not updated.
            let ctx_free = compare_directories(self, tables, rgd);
            if let Some(msg) = ctx_free {
                report.corruption(format!("{name}: {msg}"));
            }
        }
        let size = self.src.size();
        let meta = self.metadata_ranges(tables);
        let gs = h.grain_size;
        let mut grains: Vec<(u64, u64)> = Vec::new();
        for (g, v) in tables.iter() {
            if v == 0 || (v == 1 && h.zeroed_grains) {
                continue;
            }
            let off = u64::from(v) * SECTOR;
            grains.push((off, g));
            if h.compressed {
                continue;
            }
            let end = off.saturating_add(gs);
            if end > size {
                report.corruption(format!(
                    "{name}: grain {g} at {off:#x} extends past the end of the file ({size:#x} bytes)"
                ));
            }
            if let Some((s, _, what)) = meta.iter().find(|(s, e, _)| off < *e && *s < end) {
                report.corruption(format!("{name}: grain {g} at {off:#x} overlaps the {what} at {s:#x}"));
            }
        }
        grains.sort_unstable();
        if h.compressed {
            if h.markers {
                self.check_stream(name, &grains, report)?;
            }
            return Ok(());
        }
        let mut prev_end = 0u64;
        let mut prev_grain = 0u64;
        for &(off, g) in &grains {
            if off < prev_end {
                report.corruption(format!("{name}: grains {prev_grain} and {g} overlap at {off:#x}"));
            }
            prev_end = prev_end.max(off.saturating_add(gs));
            prev_grain = g;
        }
        // Leaks: whole grains of file space past the metadata that no entry uses.
        let meta_end = meta.iter().map(|m| m.1).max().unwrap_or(0).max(h.overhead);
        let mut pos = meta_end.div_ceil(gs).saturating_mul(gs);
        let mut leaked = 0u64;
        for &(off, _) in &grains {
            if off > pos {
                leaked += (off - pos) / gs;
            }
            pos = pos.max(off.saturating_add(gs));
        }
        if size > pos {
            leaked += (size - pos) / gs;
        }
        for _ in 0..leaked {
            report.leak(format!("{name}: an allocated grain past the metadata is used by no grain table entry"));
        }
        Ok(())
    }

    /// Walk a stream's markers from the first grain: every grain marker must be the one a table
    /// entry names (else it is leaked) and every entry must name a grain marker of its own grain.
    fn check_stream(&self, name: &str, grains: &[(u64, u64)], report: &mut CheckReport) -> Result<()> {
        let size = self.src.size();
        let gsec = self.header.grain_size / SECTOR;
        let mut seen = 0usize;
        let mut pos = self.header.overhead.max(SECTOR);
        let mut steps = 0u64;
        while pos.saturating_add(SECTOR) <= size && steps <= size / SECTOR {
            steps += 1;
            let mut b = [0u8; 16];
            read_exact(self.src.as_ref(), &mut b, pos, "stream marker")?;
            let m = parse_marker(&b);
            if m.size > 0 {
                match grains.binary_search_by_key(&pos, |&(o, _)| o) {
                    Ok(i) => {
                        seen += 1;
                        let g = grains[i].1;
                        if m.value != g * gsec {
                            report.corruption(format!(
                                "{name}: grain {g} at {pos:#x} has a marker for sector {:#x}",
                                m.value
                            ));
                        }
                    }
                    Err(_) => {
                        report.leak(format!("{name}: the grain marker at {pos:#x} is used by no grain table entry"))
                    }
                }
                pos = (pos + GRAIN_MARKER_BYTES + u64::from(m.size)).div_ceil(SECTOR) * SECTOR;
                continue;
            }
            match m.kind {
                MARKER_EOS => break,
                MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                    pos = pos.saturating_add(SECTOR).saturating_add(m.value.saturating_mul(SECTOR));
                }
                other => {
                    report.corruption(format!("{name}: unknown stream marker type {other} at {pos:#x}"));
                    break;
                }
            }
        }
        if seen < grains.len() {
            report.corruption(format!(
                "{name}: {} grain table entries do not point at a grain marker",
                grains.len() - seen
            ));
        }
        Ok(())
    }
}

/// Compare the directory in use with the other copy at `other`; a message when they differ.
fn compare_directories(ext: &SparseExtent, tables: &GrainTables<u32>, other: u64) -> Option<String> {
    let limits = crate::limits::Limits::default();
    let budget = crate::limits::MetadataBudget::new(limits.max_metadata_bytes);
    match ext.load(Mem { limits: &limits, budget: &budget }, other, "other grain directory") {
        Err(e) => Some(format!("the redundant grain directory is unusable: {e}")),
        Ok(copy) => {
            let differ = tables.iter().zip(copy.iter()).filter(|(a, b)| a != b).count();
            let count = |t: &GrainTables<u32>| t.iter().count();
            if differ > 0 || count(tables) != count(&copy) {
                Some(format!("the redundant grain directory differs from the primary in {differ} entries"))
            } else {
                None
            }
        }
    }
}

impl GrainLookup for SparseExtent {
    fn grain_size(&self) -> u64 {
        self.header.grain_size
    }

    fn table_span(&self) -> u64 {
        self.header.table_span()
    }

    fn covered(&self) -> u64 {
        self.header.capacity
    }

    fn has_table(&self, t: u64) -> bool {
        self.tables.as_ref().is_some_and(|tb| tb.has_table(t))
    }

    fn resolve(&self, g: u64, in_grain: u64) -> Result<Option<ExtentKind>> {
        let Some(v) = self.tables.as_ref().and_then(|t| t.entry(g)) else { return Ok(None) };
        let h = &self.header;
        if v == 0 {
            return Ok(None);
        }
        if v == 1 && h.zeroed_grains {
            return Ok(Some(ExtentKind::Zero { layer: 0 }));
        }
        let off = u64::from(v) * SECTOR;
        if !h.compressed {
            return Ok(Some(ExtentKind::Data {
                layer: 0,
                location: Location::File { file: self.file, offset: off + in_grain },
            }));
        }
        let (offset, stored_len) = if h.markers {
            let mut b = [0u8; 16];
            let n = self
                .src
                .read_at_zero_fill(&mut b, off)
                .map_err(|e| Error::io(format!("reading the grain marker at {off:#x}"), e))?;
            if (n as u64) < GRAIN_MARKER_BYTES {
                return Err(Error::invalid(format!("grain marker at {off:#x} is truncated")));
            }
            let m = parse_marker(&b);
            let data = off + GRAIN_MARKER_BYTES;
            if m.size == 0 || data.saturating_add(u64::from(m.size)) > self.src.size() {
                return Err(Error::invalid(format!(
                    "grain marker at {off:#x} (grain {g}): compressed size {} is zero or runs past the end of the file",
                    m.size
                )));
            }
            (data, u64::from(m.size))
        } else {
            (off, h.grain_size.saturating_mul(UNMARKED_STORED_FACTOR))
        };
        Ok(Some(ExtentKind::Data {
            layer: 0,
            location: Location::Compressed(CompressedUnit {
                file: self.file,
                method: Compression::Zlib,
                offset,
                stored_len,
                unit_len: h.grain_size,
                skip: in_grain,
            }),
        }))
    }
}
