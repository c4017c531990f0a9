//! Writing VMDK (export): `streamOptimized` (the default) in the layout VMware itself writes,
//! `monolithicSparse` and `monolithicFlat` on request.
//!
//! streamOptimized, as the VMDK 5.0 technote describes it and VMware's exports show it: a version
//! 3 header with flags newline-test | compressed grains | markers (no redundant directory) and
//! `gdOffset = GD_AT_END`; the embedded descriptor; then, in ascending LBA order, each non-zero
//! grain behind its grain marker (zlib-compressed, padded to a sector), and after the grains of
//! each grain table that has any, a grain-table marker and the table; at the end a
//! grain-directory marker and the directory, a footer marker and the footer (the header with the
//! real `gdOffset`), and the end-of-stream marker. Grains are compressed in parallel by the
//! export's workers; one at a time, in LBA order, they append what they compressed (the engine
//! hands items out in order), so the file is written front to back exactly once.
//!
//! monolithicSparse: a version 1 header with a redundant directory, both directories and all
//! their grain tables before the first grain (as VMware and qemu lay it out), grains uncompressed
//! and allocated by a bump pointer from any thread; each run of grains' table entries is written
//! in place with the grains (nothing is held in memory), the directories at `finish`.
//!
//! monolithicFlat: the data is a flat file (`NAME-flat.vmdk`, sparse where the disk is zero)
//! named by a text descriptor written under the target's name.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use flate2::{Compress, FlushCompress, Status};

use super::header::{
    FLAG_MARKERS, FLAG_REDUNDANT_GD, GD_AT_END, KDMV_MAGIC, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
};
use crate::copy::is_zero;
use crate::copy::writer::{lock, option_error, parse_bool, write_all_at, Allocated, FormatWriter, Measure};
use crate::error::{Error, ErrorKind, Result};

/// Grain size in sectors (64 KiB): what VMware, qemu and open-vmdk write.
const GRAIN_SECTORS: u64 = 128;
/// Grain size in bytes.
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
/// [`GRAIN_BYTES`] as a buffer length.
const GRAIN_LEN: usize = 65536;
const _: () = assert!(GRAIN_LEN as u64 == GRAIN_BYTES);
/// [`SECTOR`] as a buffer length.
const SECTOR_LEN: usize = 512;
const _: () = assert!(SECTOR_LEN as u64 == SECTOR);
/// Grain table entries per table: VMware always writes 512.
const GTES_PER_GT: u64 = 512;
/// [`GTES_PER_GT`] as the header's field and a table length.
const GTES_PER_GT_U32: u32 = 512;
const GTES_PER_GT_LEN: usize = 512;
const _: () = assert!(GTES_PER_GT_U32 as u64 == GTES_PER_GT && GTES_PER_GT_LEN as u64 == GTES_PER_GT);
/// Sectors of one grain table (512 four-byte entries).
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
/// Sectors reserved for the embedded descriptor: 10 KiB, so a tool that rewrites it in place
/// (VirtualBox adds its UUID keys) never overwrites what follows.
const DESCRIPTOR_SECTORS: u64 = 20;
/// Sectors before the first grain of a stream (what VMware writes: one grain).
const STREAM_OVERHEAD_SECTORS: u64 = 128;
/// Flag: the newline-detection characters are valid.
const FLAG_NEWLINE_TEST: u32 = 1 << 0;
/// Flag: grains are compressed.
const FLAG_COMPRESSED: u32 = 1 << 16;
/// compressAlgorithm: deflate in zlib framing.
const COMPRESSION_DEFLATE: u16 = 1;
/// Bytes of a grain marker before the compressed data (LBA u64, size u32).
const GRAIN_MARKER_BYTES: usize = 12;
/// Largest extent a hosted sparse extent can address: grain-table entries are 32-bit sector
/// numbers, so no grain may start at or beyond 2 TiB in the file.
const MAX_SPARSE_FILE_SECTORS: u64 = 1 << 32;
/// Largest monolithicSparse disk: its file holds every grain uncompressed plus the tables and
/// must stay below 2 TiB; 2 TiB minus 64 MiB leaves room for the metadata of a full disk.
const MAX_MONOLITHIC_SPARSE_BYTES: u64 = (2 << 40) - (64 << 20);
/// Largest stream disk: the grain directory is held in memory (4 bytes per 32 MiB); 64 TiB is
/// VMware's largest virtual disk (62 TiB) with some room.
const MAX_STREAM_BYTES: u64 = 64 << 40;

/// VMDK subformats vdisk writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subformat {
    /// Compressed grains with markers, grain directory at the end (ESXi/OVF, AWS, OCI).
    StreamOptimized,
    /// One hosted sparse extent (Workstation, VirtualBox).
    MonolithicSparse,
    /// A descriptor and one flat extent file.
    MonolithicFlat,
}

impl Subformat {
    fn as_str(self) -> &'static str {
        match self {
            Subformat::StreamOptimized => "streamOptimized",
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
        }
    }
}

/// `ddb.adapterType` values (qemu's `adapter_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Adapter {
    Ide,
    Lsilogic,
    Buslogic,
    LegacyEsx,
}

impl Adapter {
    fn as_str(self) -> &'static str {
        match self {
            Adapter::Ide => "ide",
            Adapter::Lsilogic => "lsilogic",
            Adapter::Buslogic => "buslogic",
            Adapter::LegacyEsx => "legacyESX",
        }
    }

    /// (heads, most cylinders): 16 heads for IDE, 255 for SCSI, 63 sectors per track.
    fn geometry(self) -> (u64, u64) {
        match self {
            Adapter::Ide => (16, 16383),
            _ => (255, 65535),
        }
    }
}

/// The `-o` options of a VMDK output (qemu-img's names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VmdkOptions {
    /// `subformat` (default streamOptimized).
    pub(crate) subformat: Subformat,
    /// `adapter_type` (default lsilogic, what VMware's exports carry).
    pub(crate) adapter: Adapter,
    /// `hwversion` → `ddb.virtualHWVersion` (default 4, which every ESXi accepts).
    pub(crate) hwversion: String,
    /// `toolsversion` → `ddb.toolsVersion` (written only when given).
    pub(crate) toolsversion: Option<String>,
    /// The output's file name, for the descriptor's extent line (set by the export).
    pub(crate) file_name: String,
}

impl Default for VmdkOptions {
    fn default() -> Self {
        VmdkOptions {
            subformat: Subformat::StreamOptimized,
            adapter: Adapter::Lsilogic,
            hwversion: "4".into(),
            toolsversion: None,
            file_name: "disk.vmdk".into(),
        }
    }
}

impl VmdkOptions {
    /// Parse qemu-img's `-o` pairs for vmdk.
    pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Result<Self> {
        let mut o = VmdkOptions::default();
        for (key, value) in pairs {
            let v = value.as_str();
            match key.as_str() {
                "subformat" => {
                    o.subformat = match v {
                        "streamOptimized" => Subformat::StreamOptimized,
                        "monolithicSparse" => Subformat::MonolithicSparse,
                        "monolithicFlat" => Subformat::MonolithicFlat,
                        _ => {
                            return Err(option_error(format!(
                                "invalid subformat {v:?} for vmdk (streamOptimized, monolithicSparse or monolithicFlat)"
                            )))
                        }
                    }
                }
                "adapter_type" => {
                    o.adapter = match v {
                        "ide" => Adapter::Ide,
                        "lsilogic" => Adapter::Lsilogic,
                        "buslogic" => Adapter::Buslogic,
                        "legacyESX" => Adapter::LegacyEsx,
                        "pvscsi" => {
                            return Err(option_error(
                                "adapter_type pvscsi does not belong in a VMDK descriptor (set it in the VM's configuration); use lsilogic",
                            ))
                        }
                        _ => {
                            return Err(option_error(format!(
                                "invalid adapter_type {v:?} for vmdk (ide, lsilogic, buslogic or legacyESX)"
                            )))
                        }
                    }
                }
                "hwversion" => {
                    if v.is_empty() || v.len() > 3 || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(option_error(format!("invalid hwversion {v:?} for vmdk (a number such as 4 or 14)")));
                    }
                    o.hwversion = v.to_string();
                }
                "toolsversion" => {
                    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(option_error(format!("invalid toolsversion {v:?} for vmdk (a number)")));
                    }
                    o.toolsversion = Some(v.to_string());
                }
                "zeroed_grain" => {
                    if parse_bool(key, v)? {
                        return Err(option_error("zeroed_grain=on is not supported: vdisk leaves zero grains out"));
                    }
                }
                _ => {
                    return Err(option_error(format!(
                        "vmdk has no option {key:?} (options: subformat, adapter_type, hwversion, toolsversion, zeroed_grain)"
                    )))
                }
            }
        }
        Ok(o)
    }

    /// Whether `-c` is meaningful: stream grains are always compressed.
    pub(crate) fn compresses(&self) -> bool {
        self.subformat == Subformat::StreamOptimized
    }
}

/// Sectors of the disk: the byte size rounded up to a sector (VMDK sizes are in sectors).
fn capacity_sectors(size: u64) -> u64 {
    size.div_ceil(SECTOR)
}

fn check_size(size: u64, options: &VmdkOptions) -> Result<()> {
    let max = match options.subformat {
        Subformat::StreamOptimized => MAX_STREAM_BYTES,
        Subformat::MonolithicSparse => MAX_MONOLITHIC_SPARSE_BYTES,
        Subformat::MonolithicFlat => u64::MAX - SECTOR,
    };
    if size > max {
        return Err(option_error(format!(
            "a {size}-byte disk is larger than a {} VMDK can hold ({max} bytes)",
            options.subformat.as_str()
        )));
    }
    Ok(())
}

/// Grain-table count and the sectors of one grain directory for `sectors` of capacity.
fn directory(sectors: u64) -> (u64, u64) {
    let grains = sectors.div_ceil(GRAIN_SECTORS);
    let gts = grains.div_ceil(GTES_PER_GT);
    (gts, (gts * 4).div_ceil(SECTOR))
}

/// The monolithicSparse metadata layout: (rgd, gd, first grain) sectors.
fn sparse_layout(sectors: u64) -> (u64, u64, u64) {
    let (gts, gd_sectors) = directory(sectors);
    let rgd = 1 + DESCRIPTOR_SECTORS;
    let gd = rgd + gd_sectors + gts * GT_SECTORS;
    let tables_end = gd + gd_sectors + gts * GT_SECTORS;
    (rgd, gd, tables_end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS)
}

/// What the output needs: the metadata plus every grain that holds data, uncompressed (a
/// stream's compressed grains are smaller, so this is its upper bound).
pub(crate) fn measure(virtual_size: u64, allocated: &Allocated<'_>, options: &VmdkOptions) -> Result<Measure> {
    check_size(virtual_size, options)?;
    let sectors = capacity_sectors(virtual_size);
    let grains = sectors.div_ceil(GRAIN_SECTORS);
    let used = allocated(GRAIN_BYTES)?.min(grains);
    let (gts, gd_sectors) = directory(sectors);
    Ok(match options.subformat {
        Subformat::StreamOptimized => {
            // Each grain: a marker sector at most beyond its 64 KiB (when it does not shrink),
            // each used table with its marker; directory, footer, end of stream.
            let used_gts = used.min(gts);
            let meta = STREAM_OVERHEAD_SECTORS + (gd_sectors + 1) + 2 + 1;
            let per_grain = GRAIN_SECTORS + 1;
            let required = (meta + used * per_grain + used_gts * (GT_SECTORS + 1)) * SECTOR;
            let fully = (meta + grains * per_grain + gts * (GT_SECTORS + 1)) * SECTOR;
            Measure { required, fully_allocated: fully }
        }
        Subformat::MonolithicSparse => {
            let (_, _, first) = sparse_layout(sectors);
            Measure {
                required: (first + used * GRAIN_SECTORS) * SECTOR,
                fully_allocated: (first + grains * GRAIN_SECTORS) * SECTOR,
            }
        }
        Subformat::MonolithicFlat => {
            // The flat file is sparse where the disk is zero; the descriptor is one block.
            let descriptor = 4096;
            Measure {
                required: (used * GRAIN_BYTES).min(sectors * SECTOR) + descriptor,
                fully_allocated: sectors * SECTOR + descriptor,
            }
        }
    })
}

/// The descriptor text for a disk of `sectors`, with `extent` as its one extent line.
fn descriptor_text(create_type: &str, extent: &str, sectors: u64, options: &VmdkOptions) -> String {
    let cid = u32::try_from(crate::copy::random_u64() >> 32).unwrap_or(0);
    let long_id = format!("{:016x}{:016x}", crate::copy::random_u64(), crate::copy::random_u64());
    let (heads, max_cylinders) = options.adapter.geometry();
    let cylinders = (sectors / (heads * 63)).clamp(1, max_cylinders);
    let mut text = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
         # Extent description\n{extent}\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.adapterType = \"{}\"\nddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"63\"\nddb.longContentID = \"{long_id}\"\n",
        options.adapter.as_str()
    );
    if let Some(tools) = &options.toolsversion {
        text.push_str(&format!("ddb.toolsInstallType = \"4\"\nddb.toolsVersion = \"{tools}\"\n"));
    }
    text.push_str(&format!("ddb.virtualHWVersion = \"{}\"\n", options.hwversion));
    text
}

/// The extent's file name as a descriptor quotes it (no quotes or control characters).
fn quoted_name(name: &str) -> String {
    name.chars().filter(|c| *c != '"' && !c.is_control()).collect()
}

/// A hosted sparse extent header (512 bytes).
#[allow(clippy::too_many_arguments)]
fn sparse_header(
    version: u32,
    flags: u32,
    capacity: u64,
    rgd: u64,
    gd: u64,
    overhead: u64,
    compression: u16,
) -> [u8; 512] {
    let mut h = [0u8; 512];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        h[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&KDMV_MAGIC.to_le_bytes());
    put(&version.to_le_bytes());
    put(&flags.to_le_bytes());
    put(&capacity.to_le_bytes());
    put(&GRAIN_SECTORS.to_le_bytes());
    put(&1u64.to_le_bytes()); // descriptor at sector 1
    put(&DESCRIPTOR_SECTORS.to_le_bytes());
    put(&GTES_PER_GT_U32.to_le_bytes());
    put(&rgd.to_le_bytes());
    put(&gd.to_le_bytes());
    put(&overhead.to_le_bytes());
    put(&[0, b'\n', b' ', b'\r', b'\n']);
    put(&compression.to_le_bytes());
    h
}

/// A metadata marker sector: `{sectors u64, 0 u32, kind u32}` and zeros.
fn marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

fn io_err(at: u64, e: std::io::Error) -> Error {
    Error::io(format!("writing the VMDK output at {at:#x}"), e)
}

/// Create a VMDK writer on `file` for a disk of `virtual_size`.
pub(crate) fn create(file: File, virtual_size: u64, options: &VmdkOptions) -> Result<Box<dyn FormatWriter>> {
    check_size(virtual_size, options)?;
    let sectors = capacity_sectors(virtual_size);
    match options.subformat {
        Subformat::StreamOptimized => Ok(Box::new(StreamWriter::new(file, sectors, options)?)),
        Subformat::MonolithicSparse => Ok(Box::new(SparseWriter::new(file, sectors, options)?)),
        Subformat::MonolithicFlat => {
            Ok(Box::new(FlatWriter { file, sectors, options: options.clone(), size: virtual_size }))
        }
    }
}

/// Write the header and the embedded descriptor (sectors 0 to 20).
fn write_head(file: &File, header: &[u8; 512], descriptor: &str) -> Result<()> {
    let mut head = vec![0u8; usize::try_from((1 + DESCRIPTOR_SECTORS) * SECTOR).unwrap_or(0)];
    head[..512].copy_from_slice(header);
    let text = descriptor.as_bytes();
    if text.len() > head.len() - 512 {
        return Err(Error::new(ErrorKind::Io, "internal error: the VMDK descriptor does not fit its area"));
    }
    head[512..512 + text.len()].copy_from_slice(text);
    file.write_all_at(&head, 0).map_err(|e| io_err(0, e))
}

/// Compressed grains ready to append: sector-padded marker + grain records, and per grain its
/// grain number and offset in the records.
type Records = (Vec<u8>, Vec<(u64, usize)>);

/// The streamOptimized writer.
#[derive(Debug)]
struct StreamWriter {
    file: File,
    sectors: u64,
    descriptor: String,
    /// The appender's state; workers wait on `turn` for their item's turn.
    state: Mutex<StreamState>,
    turn: Condvar,
    /// Idle zlib compressors.
    compressors: Mutex<Vec<Compress>>,
}

#[derive(Debug)]
struct StreamState {
    /// The guest offset of the next item to append.
    next: u64,
    /// The next free sector of the file.
    sector: u64,
    /// The grain table being filled, and its index.
    gt: Vec<u32>,
    gt_index: u64,
    gt_used: bool,
    /// The grain directory.
    gd: Vec<u32>,
    /// Stop: an error or a cancellation elsewhere.
    aborted: bool,
}

impl StreamWriter {
    fn new(file: File, sectors: u64, options: &VmdkOptions) -> Result<Self> {
        let (gts, _) = directory(sectors);
        let gd = vec![0u32; usize::try_from(gts).map_err(|_| option_error("the grain directory does not fit"))?];
        Ok(StreamWriter {
            file,
            sectors,
            descriptor: descriptor_text(
                "streamOptimized",
                &format!("RW {sectors} SPARSE \"{}\"", quoted_name(&options.file_name)),
                sectors,
                options,
            ),
            state: Mutex::new(StreamState {
                next: 0,
                sector: STREAM_OVERHEAD_SECTORS,
                gt: vec![0u32; GTES_PER_GT_LEN],
                gt_index: 0,
                gt_used: false,
                gd,
                aborted: false,
            }),
            turn: Condvar::new(),
            compressors: Mutex::new(Vec::new()),
        })
    }

    fn header(&self, gd: u64) -> [u8; 512] {
        let flags = FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS;
        sparse_header(3, flags, self.sectors, 0, gd, STREAM_OVERHEAD_SECTORS, COMPRESSION_DEFLATE)
    }

    /// Compress the non-zero grains of `data` into sector-padded marker + grain records; returns
    /// the records and, per grain, its index in the item and offset in the records.
    fn compress(&self, offset: u64, data: &[u8]) -> Result<Records> {
        let grain = GRAIN_LEN;
        let mut out = Vec::new();
        let mut grains = Vec::new();
        let mut c =
            lock(&self.compressors).pop().unwrap_or_else(|| Compress::new(flate2::Compression::default(), true));
        let mut padded = Vec::new();
        let result = (|| -> Result<()> {
            for (i, chunk) in data.chunks(grain).enumerate() {
                if is_zero(chunk) {
                    continue;
                }
                // The disk's last grain may be short: it is compressed padded with zeros.
                let input = if chunk.len() < grain {
                    padded.clear();
                    padded.extend_from_slice(chunk);
                    padded.resize(grain, 0);
                    &padded[..]
                } else {
                    chunk
                };
                let lba = (offset / SECTOR) + (i as u64) * GRAIN_SECTORS;
                let start = out.len();
                out.extend_from_slice(&lba.to_le_bytes());
                out.extend_from_slice(&[0u8; 4]);
                c.reset();
                let room = input.len() + input.len() / 4 + 64;
                out.resize(start + GRAIN_MARKER_BYTES + room, 0);
                let status = c
                    .compress(input, &mut out[start + GRAIN_MARKER_BYTES..], FlushCompress::Finish)
                    .map_err(|e| Error::new(ErrorKind::Io, format!("deflate failed: {e}")))?;
                if status != Status::StreamEnd {
                    return Err(Error::new(ErrorKind::Io, "deflate did not finish a grain"));
                }
                let n = usize::try_from(c.total_out()).unwrap_or(usize::MAX);
                let size = u32::try_from(n).map_err(|_| Error::new(ErrorKind::Io, "compressed grain too large"))?;
                out[start + 8..start + 12].copy_from_slice(&size.to_le_bytes());
                let end = (start + GRAIN_MARKER_BYTES + n).div_ceil(SECTOR_LEN) * SECTOR_LEN;
                out.resize(end, 0);
                grains.push((lba / GRAIN_SECTORS, start));
            }
            Ok(())
        })();
        lock(&self.compressors).push(c);
        result.map(|()| (out, grains))
    }

    /// Wait until `offset` is the next item to append; the guard returned holds the appender.
    fn wait_turn(&self, offset: u64) -> Result<MutexGuard<'_, StreamState>> {
        let mut state = lock(&self.state);
        while state.next != offset && !state.aborted {
            if state.next > offset {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("internal error: stream item at {offset:#x} came twice"),
                ));
            }
            state = self.turn.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.aborted {
            return Err(Error::new(ErrorKind::Cancelled, "the export stopped"));
        }
        Ok(state)
    }

    /// Append the grain table being filled (if it has any grain) and record it in the directory.
    fn flush_gt(&self, state: &mut StreamState) -> Result<()> {
        if !state.gt_used {
            return Ok(());
        }
        let at = state.sector * SECTOR;
        let mut buf = Vec::with_capacity(512 + 2048);
        buf.extend_from_slice(&marker(GT_SECTORS, MARKER_GT));
        for e in &state.gt {
            buf.extend_from_slice(&e.to_le_bytes());
        }
        self.file.write_all_at(&buf, at).map_err(|e| io_err(at, e))?;
        let table_sector = sector_u32(state.sector + 1)?;
        let i = usize::try_from(state.gt_index).unwrap_or(usize::MAX);
        if let Some(slot) = state.gd.get_mut(i) {
            *slot = table_sector;
        }
        state.sector += 1 + GT_SECTORS;
        state.gt.iter_mut().for_each(|e| *e = 0);
        state.gt_used = false;
        Ok(())
    }

    fn append(&self, state: &mut StreamState, records: &[u8], grains: &[(u64, usize)]) -> Result<()> {
        // Runs of records between grain-table boundaries are written with one call each.
        let mut run_start = 0usize;
        let mut run_sector = state.sector;
        for &(grain, rel) in grains {
            let gt = grain / GTES_PER_GT;
            if gt != state.gt_index {
                self.write_run(&records[run_start..rel], run_sector)?;
                state.sector = run_sector + ((rel - run_start) as u64) / SECTOR;
                self.flush_gt(state)?;
                state.gt_index = gt;
                run_start = rel;
                run_sector = state.sector;
            }
            let grain_sector = run_sector + ((rel - run_start) as u64) / SECTOR;
            state.gt[usize::try_from(grain % GTES_PER_GT).unwrap_or(0)] = sector_u32(grain_sector)?;
            state.gt_used = true;
        }
        self.write_run(&records[run_start..], run_sector)?;
        state.sector = run_sector + ((records.len() - run_start) as u64) / SECTOR;
        Ok(())
    }

    fn write_run(&self, bytes: &[u8], sector: u64) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let at = sector * SECTOR;
        self.file.write_all_at(bytes, at).map_err(|e| io_err(at, e))
    }

    fn advance(&self, mut state: MutexGuard<'_, StreamState>, to: u64) {
        state.next = to;
        drop(state);
        self.turn.notify_all();
    }
}

/// A file sector as a grain-table or directory entry.
fn sector_u32(sector: u64) -> Result<u32> {
    if sector >= MAX_SPARSE_FILE_SECTORS {
        return Err(Error::limit("the VMDK file would pass 2 TiB, the most a sparse extent can address"));
    }
    u32::try_from(sector).map_err(|_| Error::limit("the VMDK file would pass 2 TiB"))
}

impl FormatWriter for StreamWriter {
    fn alignment(&self) -> u64 {
        GRAIN_BYTES
    }

    fn ordered(&self) -> bool {
        true
    }

    fn compresses(&self) -> bool {
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let compressed = self.compress(offset, data);
        let mut state = self.wait_turn(offset)?;
        let result = compressed.and_then(|(records, grains)| self.append(&mut state, &records, &grains));
        if result.is_err() {
            state.aborted = true;
        }
        self.advance(state, offset + data.len() as u64);
        result
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let state = self.wait_turn(offset)?;
        self.advance(state, offset + len);
        Ok(())
    }

    fn finish(&self) -> Result<u64> {
        let mut state = lock(&self.state);
        self.flush_gt(&mut state)?;
        // Directory marker and directory.
        let (_, gd_sectors) = directory(self.sectors);
        let gd_sector = state.sector + 1;
        let mut tail = Vec::new();
        tail.extend_from_slice(&marker(gd_sectors, MARKER_GD));
        for e in &state.gd {
            tail.extend_from_slice(&e.to_le_bytes());
        }
        tail.resize(usize::try_from((1 + gd_sectors) * SECTOR).unwrap_or(0), 0);
        // Footer marker, footer (the header with the real directory offset), end of stream.
        tail.extend_from_slice(&marker(1, MARKER_FOOTER));
        tail.extend_from_slice(&self.header(gd_sector));
        tail.extend_from_slice(&marker(0, MARKER_EOS));
        let at = state.sector * SECTOR;
        self.file.write_all_at(&tail, at).map_err(|e| io_err(at, e))?;
        let end = at + tail.len() as u64;
        write_head(&self.file, &self.header(GD_AT_END), &self.descriptor)?;
        self.file.set_len(end).map_err(|e| Error::io("setting the length of the VMDK output", e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing the VMDK output", e))?;
        Ok(end)
    }

    fn abort(&self) {
        lock(&self.state).aborted = true;
        self.turn.notify_all();
    }
}

/// The monolithicSparse writer.
#[derive(Debug)]
struct SparseWriter {
    file: File,
    sectors: u64,
    descriptor: String,
    /// Sectors of the redundant directory, the directory and the first grain.
    rgd: u64,
    gd: u64,
    first_grain: u64,
    /// Next free grain sector.
    next: AtomicU64,
    /// Sectors of one grain directory: the grain tables of each copy follow its directory,
    /// back to back, so grain g's entry is at a fixed place in each.
    gd_sectors: u64,
}

impl SparseWriter {
    fn new(file: File, sectors: u64, options: &VmdkOptions) -> Result<Self> {
        let (rgd, gd, first_grain) = sparse_layout(sectors);
        let (_, gd_sectors) = directory(sectors);
        Ok(SparseWriter {
            file,
            sectors,
            descriptor: descriptor_text(
                "monolithicSparse",
                &format!("RW {sectors} SPARSE \"{}\"", quoted_name(&options.file_name)),
                sectors,
                options,
            ),
            rgd,
            gd,
            first_grain,
            next: AtomicU64::new(first_grain),
            gd_sectors,
        })
    }
}

impl FormatWriter for SparseWriter {
    fn alignment(&self) -> u64 {
        GRAIN_BYTES
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let grain = GRAIN_LEN;
        let chunks: Vec<&[u8]> = data.chunks(grain).collect();
        let mut i = 0;
        while i < chunks.len() {
            if is_zero(chunks[i]) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < chunks.len() && !is_zero(chunks[j]) {
                j += 1;
            }
            let count = (j - i) as u64;
            let sector = self.next.fetch_add(count * GRAIN_SECTORS, Relaxed);
            sector_u32(sector + count * GRAIN_SECTORS - 1)?;
            let from = i * grain;
            let to = (j * grain).min(data.len());
            let at = sector * SECTOR;
            write_all_at(&self.file, &data[from..to], at).map_err(|e| io_err(at, e))?;
            // The grains' entries, consecutive in both copies of the tables (the file is new, so
            // every entry not written reads as 0, unallocated): no table is held in memory.
            let mut entries = Vec::with_capacity(usize::try_from(count * 4).unwrap_or(0));
            for k in 0..count {
                entries.extend_from_slice(&sector_u32(sector + k * GRAIN_SECTORS)?.to_le_bytes());
            }
            let first = offset / GRAIN_BYTES + i as u64;
            for dir in [self.rgd, self.gd] {
                let at = (dir + self.gd_sectors) * SECTOR + first * 4;
                self.file.write_all_at(&entries, at).map_err(|e| io_err(at, e))?;
            }
            i = j;
        }
        Ok(())
    }

    fn finish(&self) -> Result<u64> {
        let (gts, gd_sectors) = directory(self.sectors);
        let end = self.next.load(Relaxed).max(self.first_grain) * SECTOR;
        // Both directories; their tables, right after each, were filled as grains arrived.
        for dir in [self.rgd, self.gd] {
            let tables = dir + gd_sectors;
            let mut gd = Vec::with_capacity(usize::try_from(gd_sectors * SECTOR).unwrap_or(0));
            for t in 0..gts {
                gd.extend_from_slice(&sector_u32(tables + t * GT_SECTORS)?.to_le_bytes());
            }
            self.file.write_all_at(&gd, dir * SECTOR).map_err(|e| io_err(dir * SECTOR, e))?;
        }
        let flags = FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD;
        let header = sparse_header(1, flags, self.sectors, self.rgd, self.gd, self.first_grain, 0);
        write_head(&self.file, &header, &self.descriptor)?;
        self.file.set_len(end).map_err(|e| Error::io("setting the length of the VMDK output", e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing the VMDK output", e))?;
        Ok(end)
    }
}

/// The monolithicFlat writer: the flat extent's bytes (zero grains left as holes).
#[derive(Debug)]
struct FlatWriter {
    file: File,
    sectors: u64,
    size: u64,
    options: VmdkOptions,
}

impl FormatWriter for FlatWriter {
    fn alignment(&self) -> u64 {
        GRAIN_BYTES
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        for (i, chunk) in data.chunks(GRAIN_LEN).enumerate() {
            if !is_zero(chunk) {
                let at = offset + (i as u64) * GRAIN_BYTES;
                self.file.write_all_at(chunk, at).map_err(|e| io_err(at, e))?;
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<u64> {
        let len = self.sectors * SECTOR;
        debug_assert!(len >= self.size);
        self.file.set_len(len).map_err(|e| Error::io("setting the length of the flat extent", e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing the flat extent", e))?;
        Ok(len)
    }

    fn descriptor(&self, data_name: &str) -> Option<String> {
        let extent = format!("RW {} FLAT \"{}\" 0", self.sectors, quoted_name(data_name));
        Some(descriptor_text("monolithicFlat", &extent, self.sectors, &self.options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn options_follow_qemu_names() {
        let o = VmdkOptions::from_pairs(&[]).unwrap();
        assert_eq!(o, VmdkOptions::default());
        let o = VmdkOptions::from_pairs(&pairs(&[("subformat", "monolithicFlat"), ("adapter_type", "ide")])).unwrap();
        assert_eq!((o.subformat, o.adapter), (Subformat::MonolithicFlat, Adapter::Ide));
        assert!(VmdkOptions::from_pairs(&pairs(&[("adapter_type", "pvscsi")])).is_err());
        assert!(VmdkOptions::from_pairs(&pairs(&[("subformat", "twoGbMaxExtentSparse")])).is_err());
        assert!(VmdkOptions::from_pairs(&pairs(&[("hwversion", "x")])).is_err());
    }

    #[test]
    fn descriptor_carries_the_keys_platforms_need() {
        let text = descriptor_text("streamOptimized", "RW 2048 SPARSE \"disk.vmdk\"", 2048, &VmdkOptions::default());
        for key in [
            "# Disk DescriptorFile",
            "createType=\"streamOptimized\"",
            "parentCID=ffffffff",
            "ddb.adapterType = \"lsilogic\"",
            "ddb.geometry.heads = \"255\"",
            "ddb.geometry.sectors = \"63\"",
            "ddb.virtualHWVersion = \"4\"",
            "ddb.longContentID = \"",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
        assert!(text.len() < (DESCRIPTOR_SECTORS * SECTOR) as usize);
    }

    #[test]
    fn sparse_layout_puts_tables_before_the_first_grain() {
        // 1 GiB: 16384 grains, 32 tables, a one-sector directory.
        let (rgd, gd, first) = sparse_layout(2 << 20);
        assert_eq!(rgd, 21);
        assert_eq!(gd, 21 + 1 + 32 * 4);
        assert_eq!(first % GRAIN_SECTORS, 0);
        assert!(first >= gd + 1 + 32 * 4);
    }
}
