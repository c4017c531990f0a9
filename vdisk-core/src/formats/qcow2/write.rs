//! Writing qcow2 (export): version 3 (qemu's `compat=1.1`, the default) or version 2
//! (`compat=0.10`), clusters of 512 B to 2 MiB, 16-bit refcounts, all-zero clusters left
//! unallocated, and with `-c` every cluster compressed (raw deflate as qemu writes it, or zstd),
//! on every thread the engine runs.
//!
//! Layout, so that nothing is written twice: cluster 0 holds the header; data clusters (and packed
//! compressed clusters) follow from cluster 1 in the order the workers allocate them (a bump
//! allocator under a short lock). An L2 table is built in memory and written, at the next free
//! cluster, as soon as every byte of the guest range it maps has been delivered, so only the
//! tables of ranges in flight are held (a few per thread). At `finish`: the tables still held,
//! the L1 table, the refcount table and the refcount blocks; refcounts are kept in memory until
//! then (2 bytes per host cluster: 32 MiB for a 1 TiB output at 64 KiB clusters).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use flate2::{Compress, FlushCompress, Status};
use structured_zstd::encoding::{CompressionLevel, FrameCompressor};

use crate::copy::is_zero;
use crate::copy::writer::{lock, option_error, parse_bool, parse_size, write_all_at, Allocated, FormatWriter, Measure};
use crate::error::{Error, Result};

/// `QFI\xfb`.
const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster qemu accepts (512 B).
const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster qemu accepts (2 MiB).
const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's default cluster size (64 KiB).
const DEFAULT_CLUSTER_BITS: u32 = 16;
/// 16-bit refcounts, the only width version 2 knows and qemu's default.
const REFCOUNT_ORDER: u32 = 4;
/// Bytes of a version 2 header.
const V2_HEADER_LEN: usize = 72;
/// Bytes of the version 3 header written: 104 bytes of fields, the compression type byte, and
/// padding to a multiple of 8 (what qemu writes).
const V3_HEADER_LEN: usize = 112;
/// [`V3_HEADER_LEN`] as the header's 32-bit field.
const V3_HEADER_LEN_U32: u32 = 112;
const _: () = assert!(V3_HEADER_LEN_U32 as usize == V3_HEADER_LEN);
/// L1/L2 entry flag: the cluster's refcount is exactly one.
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: a compressed cluster.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Incompatible feature bit 3: the header's compression type field is not zlib.
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Header compression type value for zstd.
const COMPRESSION_TYPE_ZSTD: u8 = 1;
/// qemu's largest L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB): a bigger disk needs larger clusters.
const MAX_L1_BYTES: u64 = 32 << 20;
/// zstd level for compressed clusters. qemu uses libzstd's default, 3. The pure-Rust encoder's
/// levels are not libzstd's: at 3 it needs about 1.5 times libzstd's CPU; at 2 it takes 0.61 of
/// qemu-img's time for output 1.5 % larger, at 1 0.53 of the time for output 4 % larger (release
/// build, ext4 image of real files, 64 KiB clusters: benches/RESULTS.md). Level 1 is the one that
/// keeps both of issue 13's bounds (at most 0.6 of the time, at most 5 % larger).
const ZSTD_LEVEL: i32 = 1;
/// qemu inflates compressed clusters with a 4 KiB window (`windowBits = -12`), so they must be
/// deflated with no larger window.
const DEFLATE_WINDOW_BITS: u8 = 12;
/// Bytes per L1, L2 and refcount table entry.
const ENTRY_BYTES: u64 = 8;

/// How compressed clusters are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompressionType {
    /// Raw deflate (`compression_type=zlib`, readable by every qemu).
    Zlib,
    /// zstd frames (`compression_type=zstd`, needs qemu 5.1 or later).
    Zstd,
}

/// The `-o` options of a qcow2 output (qemu-img's names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Qcow2Options {
    /// Version 3 (`compat=1.1`) rather than 2 (`compat=0.10`).
    pub(crate) v3: bool,
    /// log2 of the cluster size (`cluster_size`).
    pub(crate) cluster_bits: u32,
    /// `compression_type`.
    pub(crate) compression: CompressionType,
    /// Compress every cluster (`-c`).
    pub(crate) compress: bool,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            v3: true,
            cluster_bits: DEFAULT_CLUSTER_BITS,
            compression: CompressionType::Zlib,
            compress: false,
        }
    }
}

impl Qcow2Options {
    /// Parse qemu-img's `-o` pairs for qcow2.
    pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Result<Self> {
        let mut o = Qcow2Options::default();
        for (key, value) in pairs {
            let v = value.as_str();
            match key.as_str() {
                "compat" => {
                    o.v3 = match v {
                        "1.1" | "v3" => true,
                        "0.10" | "v2" => false,
                        _ => return Err(option_error(format!("invalid compat {v:?} for qcow2 (0.10 or 1.1)"))),
                    }
                }
                "cluster_size" => {
                    let size = parse_size(key, v)?;
                    if !size.is_power_of_two() || !(1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&size) {
                        return Err(option_error(format!(
                            "invalid cluster_size {v:?} for qcow2 (a power of two from 512 to 2M)"
                        )));
                    }
                    o.cluster_bits = size.trailing_zeros();
                }
                "compression_type" => {
                    o.compression = match v {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => {
                            return Err(option_error(format!("invalid compression_type {v:?} for qcow2 (zlib or zstd)")))
                        }
                    }
                }
                "refcount_bits" => {
                    if v != "16" {
                        return Err(option_error(format!("refcount_bits {v:?} is not supported: vdisk writes 16")));
                    }
                }
                "preallocation" => {
                    if v != "off" {
                        return Err(option_error(format!(
                            "preallocation {v:?} is not supported for qcow2: vdisk writes only what holds data (off)"
                        )));
                    }
                }
                "lazy_refcounts" | "extended_l2" => {
                    if parse_bool(key, v)? {
                        return Err(option_error(format!("{key}=on is not supported for qcow2")));
                    }
                }
                _ => {
                    return Err(option_error(format!(
                        "qcow2 has no option {key:?} (options: compat, cluster_size, compression_type, refcount_bits, preallocation, lazy_refcounts, extended_l2)"
                    )))
                }
            }
        }
        if o.compression == CompressionType::Zstd && !o.v3 {
            return Err(option_error("compression_type=zstd needs compat=1.1 (qcow2 version 2 has only zlib)"));
        }
        Ok(o)
    }
}

/// qcow2 readers see whole 512-byte sectors (qemu floors the header's size): a virtual size that
/// is not a multiple of 512 is rounded up, as qemu-img does (the added bytes read as zero).
fn sector_size(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(512).ok_or_else(|| option_error(format!("a qcow2 cannot hold {size} bytes")))
}

/// The table geometry of a qcow2 image of `size` bytes.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    cluster_bits: u32,
    /// Guest clusters (rounded up).
    clusters: u64,
    /// L1 entries (one per L2 table the disk needs).
    l1_entries: u64,
}

impl Geometry {
    fn new(size: u64, cluster_bits: u32) -> Result<Self> {
        let size = sector_size(size)?;
        let cs = 1u64 << cluster_bits;
        let clusters = size.div_ceil(cs);
        let l2_entries = cs / ENTRY_BYTES;
        let l1_entries = clusters.div_ceil(l2_entries);
        if l1_entries.saturating_mul(ENTRY_BYTES) > MAX_L1_BYTES {
            return Err(option_error(format!(
                "a {size}-byte disk needs an L1 table larger than qemu's 32 MiB limit with {cs}-byte clusters; use a larger cluster_size"
            )));
        }
        Ok(Geometry { cluster_bits, clusters, l1_entries })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / ENTRY_BYTES
    }
}

/// qemu's `qcow2_refcount_metadata_size`: refcount blocks and table clusters needed to count
/// `clusters` clusters plus themselves (the fixed point); returns (table clusters, blocks).
fn refcount_metadata(clusters: u64, cluster_size: u64) -> (u64, u64) {
    let per_table_cluster = cluster_size / ENTRY_BYTES;
    let per_block = cluster_size * 8 / (1 << REFCOUNT_ORDER);
    let (mut table, mut blocks, mut last, mut n) = (0u64, 0u64, 0u64, 0u64);
    loop {
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        let next = clusters + blocks + table;
        if next == last && n > 0 {
            return (table, blocks);
        }
        last = next;
        n += 1;
    }
}

/// What `qemu-img measure -O qcow2` reports: the fully allocated image (qemu's
/// `qcow2_calc_prealloc_size`), and that less the guest clusters that hold no data.
pub(crate) fn measure(virtual_size: u64, allocated: &Allocated<'_>, options: &Qcow2Options) -> Result<Measure> {
    let g = Geometry::new(virtual_size, options.cluster_bits)?;
    let cs = g.cluster_size();
    let aligned = g.clusters * cs;
    let mut meta = cs; // the header cluster
    let l2_entries = g.clusters.div_ceil(g.l2_entries()) * g.l2_entries();
    meta += l2_entries * ENTRY_BYTES;
    let l1_entries = (l2_entries * ENTRY_BYTES / cs).div_ceil(cs / ENTRY_BYTES) * (cs / ENTRY_BYTES);
    meta += l1_entries * ENTRY_BYTES;
    let (table, blocks) = refcount_metadata((meta + aligned) / cs, cs);
    meta += (table + blocks) * cs;
    let fully_allocated = meta + aligned;
    let data = allocated(cs)?.saturating_mul(cs).min(aligned);
    Ok(Measure { required: fully_allocated - aligned + data, fully_allocated })
}

/// Create a qcow2 writer on `file` (empty, opened for writing) for a disk of `virtual_size`.
pub(crate) fn create(file: File, virtual_size: u64, options: &Qcow2Options) -> Result<Box<dyn FormatWriter>> {
    let geometry = Geometry::new(virtual_size, options.cluster_bits)?;
    let l1 = usize::try_from(geometry.l1_entries).map_err(|_| option_error("the L1 table does not fit in memory"))?;
    Ok(Box::new(Qcow2Writer {
        file,
        options: options.clone(),
        size: sector_size(virtual_size)?,
        input_size: virtual_size,
        geometry,
        alloc: Mutex::new(Alloc { next: geometry.cluster_size(), refs: vec![1] }),
        l2: Mutex::new(Tables { tables: (0..l1).map(|_| None).collect(), delivered: vec![0; l1], l1: vec![0; l1] }),
        compressors: Mutex::new(Vec::new()),
    }))
}

/// The host allocator: a bump pointer in bytes and the refcount of every host cluster below it.
#[derive(Debug)]
struct Alloc {
    /// Next free byte of the file.
    next: u64,
    /// Refcount of each host cluster (index 0 is the header).
    refs: Vec<u16>,
}

impl Alloc {
    fn add_ref(&mut self, cluster: u64) -> Result<()> {
        let i = usize::try_from(cluster).map_err(|_| Error::limit("the output is too large to track"))?;
        if self.refs.len() <= i {
            self.refs.resize(i + 1, 0);
        }
        self.refs[i] = self.refs[i].saturating_add(1);
        Ok(())
    }

    /// `count` whole clusters; returns the first one's offset.
    fn clusters(&mut self, count: u64, bits: u32) -> Result<u64> {
        let at = self.next.div_ceil(1 << bits) << bits;
        for c in 0..count {
            self.add_ref((at >> bits) + c)?;
        }
        self.next = at + (count << bits);
        Ok(at)
    }

    /// `len` bytes for compressed clusters, packed after the previous ones; every host cluster the
    /// range touches gets one reference per compressed cluster in `pieces` touching it.
    fn bytes(&mut self, pieces: &[(u64, u64)], bits: u32) -> Result<u64> {
        // A cluster whose refcount is saturated takes no more compressed clusters.
        if self.next % (1 << bits) != 0 {
            let current = usize::try_from(self.next >> bits).unwrap_or(usize::MAX);
            let room = u64::from(u16::MAX) - u64::from(self.refs.get(current).copied().unwrap_or(0));
            if room < pieces.len() as u64 {
                self.next = self.next.div_ceil(1 << bits) << bits;
            }
        }
        let at = self.next;
        for &(rel, len) in pieces {
            let start = at + rel;
            // qemu counts whole 512-byte sectors; the last sector never leaves the last cluster.
            for c in start >> bits..=(start + len - 1) >> bits {
                self.add_ref(c)?;
            }
        }
        self.next = at + pieces.last().map_or(0, |&(rel, len)| rel + len);
        Ok(at)
    }
}

thread_local! {
    /// This thread's zstd compressor (it is not `Send`, so it stays with its thread).
    static ZSTD: std::cell::RefCell<Option<FrameCompressor>> = const { std::cell::RefCell::new(None) };
}

/// A reusable compressor (one per worker at a time).
#[derive(Debug)]
enum Compressor {
    Deflate(Box<Compress>),
    /// zstd, through the thread's own compressor.
    Zstd,
}

impl Compressor {
    fn new(kind: CompressionType) -> Self {
        match kind {
            CompressionType::Zlib => Compressor::Deflate(Box::new(Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                DEFLATE_WINDOW_BITS,
            ))),
            CompressionType::Zstd => Compressor::Zstd,
        }
    }

    /// Compress `input` (one cluster) into `out`, returning false when the result would not be
    /// smaller than `limit` bytes (the cluster is then stored as it is).
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<bool> {
        out.clear();
        match self {
            Compressor::Deflate(c) => {
                c.reset();
                // Room for deflate's worst case, so the stream always ends (zlib-rs panics when
                // a stored block does not fit the output); too long is then refused below.
                out.resize(input.len() + input.len() / 4 + 64, 0);
                let status = c
                    .compress(input, out, FlushCompress::Finish)
                    .map_err(|e| Error::new(crate::error::ErrorKind::Io, format!("deflate failed: {e}")))?;
                let n = usize::try_from(c.total_out()).unwrap_or(usize::MAX);
                if status != Status::StreamEnd || n >= limit {
                    return Ok(false);
                }
                out.truncate(n);
                Ok(true)
            }
            Compressor::Zstd => {
                ZSTD.with(|z| {
                    let mut z = z.borrow_mut();
                    z.get_or_insert_with(|| FrameCompressor::new(CompressionLevel::Level(ZSTD_LEVEL)))
                        .compress_independent_frame_into(input, out);
                });
                Ok(out.len() < limit)
            }
        }
    }
}

/// The qcow2 writer.
#[derive(Debug)]
struct Qcow2Writer {
    file: File,
    options: Qcow2Options,
    size: u64,
    /// The virtual size the engine covers (before rounding to a sector).
    input_size: u64,
    geometry: Geometry,
    alloc: Mutex<Alloc>,
    /// The L2 tables and what the engine has delivered of each one's range.
    l2: Mutex<Tables>,
    /// Idle compressors.
    compressors: Mutex<Vec<Compressor>>,
}

/// The L2 tables, by L1 index.
#[derive(Debug)]
struct Tables {
    /// Tables being filled, created on first use; taken out once written.
    tables: Vec<Option<Box<[u64]>>>,
    /// Guest bytes of each table's range delivered so far (by `write` or `zero`).
    delivered: Vec<u64>,
    /// Where each written table is (0: not written, or not needed).
    l1: Vec<u64>,
}

impl Qcow2Writer {
    fn write_err(&self, at: u64, e: std::io::Error) -> Error {
        Error::io(format!("writing the qcow2 output at {at:#x}"), e)
    }

    /// Record `entry` for guest cluster `cluster`.
    fn set_l2(&self, tables: &mut Tables, cluster: u64, entry: u64) -> Result<()> {
        let per = self.geometry.l2_entries();
        let (t, i) = (cluster / per, cluster % per);
        let slot = usize::try_from(t).ok().and_then(|t| tables.tables.get_mut(t)).ok_or_else(|| {
            Error::new(crate::error::ErrorKind::Io, format!("guest cluster {cluster} is beyond the disk"))
        })?;
        let table = slot.get_or_insert_with(|| vec![0u64; usize::try_from(per).unwrap_or(0)].into_boxed_slice());
        let i = usize::try_from(i).unwrap_or(usize::MAX);
        if let Some(e) = table.get_mut(i) {
            *e = entry;
        }
        Ok(())
    }

    /// Store the clusters of `data` (guest offset `offset`) uncompressed; zero clusters are skipped.
    fn write_plain(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = usize::try_from(self.geometry.cluster_size()).unwrap_or(usize::MAX);
        let bits = self.geometry.cluster_bits;
        let clusters: Vec<&[u8]> = data.chunks(cs).collect();
        let mut i = 0;
        while i < clusters.len() {
            if is_zero(clusters[i]) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < clusters.len() && !is_zero(clusters[j]) {
                j += 1;
            }
            // Clusters i..j hold data: one allocation, one write.
            let count = (j - i) as u64;
            let host = lock(&self.alloc).clusters(count, bits)?;
            let from = i * cs;
            let to = (j * cs).min(data.len());
            write_all_at(&self.file, &data[from..to], host).map_err(|e| self.write_err(host, e))?;
            let mut tables = lock(&self.l2);
            for k in 0..count {
                let guest = (offset >> bits) + i as u64 + k;
                self.set_l2(&mut tables, guest, (host + (k << bits)) | OFLAG_COPIED)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Compress the clusters of `data`; a cluster that does not shrink is stored as it is.
    fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = usize::try_from(self.geometry.cluster_size()).unwrap_or(usize::MAX);
        let bits = self.geometry.cluster_bits;
        let mut compressor = lock(&self.compressors).pop().unwrap_or_else(|| Compressor::new(self.options.compression));
        let mut packed = Vec::new();
        // (index in the item, offset in `packed`, length)
        let mut pieces: Vec<(usize, u64, u64)> = Vec::new();
        let mut plain: Vec<usize> = Vec::new();
        let mut out = Vec::new();
        let mut padded = Vec::new();
        let result = (|| -> Result<()> {
            for (i, cluster) in data.chunks(cs).enumerate() {
                if is_zero(cluster) {
                    continue;
                }
                // The disk's last cluster may be short: it is compressed padded with zeros.
                let input = if cluster.len() < cs {
                    padded.clear();
                    padded.extend_from_slice(cluster);
                    padded.resize(cs, 0);
                    &padded[..]
                } else {
                    cluster
                };
                if compressor.compress(input, &mut out, cs)? {
                    pieces.push((i, packed.len() as u64, out.len() as u64));
                    packed.extend_from_slice(&out);
                } else {
                    plain.push(i);
                }
            }
            Ok(())
        })();
        lock(&self.compressors).push(compressor);
        result?;
        if !pieces.is_empty() {
            let ranges: Vec<(u64, u64)> = pieces.iter().map(|&(_, rel, len)| (rel, len)).collect();
            let host = lock(&self.alloc).bytes(&ranges, bits)?;
            self.file.write_all_at(&packed, host).map_err(|e| self.write_err(host, e))?;
            let x = 62 - (bits - 8);
            let mut tables = lock(&self.l2);
            for &(i, rel, len) in &pieces {
                let at = host + rel;
                let sectors = ((at + len - 1) >> 9) - (at >> 9);
                let entry = OFLAG_COMPRESSED | (sectors << x) | at;
                self.set_l2(&mut tables, (offset >> bits) + i as u64, entry)?;
            }
        }
        for i in plain {
            let from = i * cs;
            let to = (from + cs).min(data.len());
            self.write_plain(offset + from as u64, &data[from..to])?;
        }
        Ok(())
    }

    /// Count `offset..offset + len` as delivered, and write each L2 table whose whole range now
    /// is: its entries can no longer change.
    fn delivered(&self, offset: u64, len: u64) -> Result<()> {
        let span = self.geometry.l2_entries() << self.geometry.cluster_bits;
        let end = offset.saturating_add(len).min(self.input_size);
        let mut tables = lock(&self.l2);
        let mut at = offset;
        while at < end {
            let t = at / span;
            let table_end = ((t + 1) * span).min(self.input_size);
            let piece = table_end.min(end) - at;
            let i = usize::try_from(t).map_err(|_| Error::limit("L1 index beyond memory"))?;
            let done = tables.delivered.get_mut(i).ok_or_else(|| {
                Error::new(
                    crate::error::ErrorKind::Io,
                    format!("internal error: delivery at {at:#x} is beyond the disk"),
                )
            })?;
            *done += piece;
            if *done == table_end - t * span {
                if let Some(table) = tables.tables[i].take() {
                    let host = lock(&self.alloc).clusters(1, self.geometry.cluster_bits)?;
                    self.write_table(&table, host)?;
                    tables.l1[i] = host;
                }
            }
            at += piece;
        }
        Ok(())
    }

    fn write_table(&self, table: &[u64], at: u64) -> Result<()> {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&bytes, at).map_err(|e| self.write_err(at, e))
    }

    fn header(&self, l1_offset: u64, refcount_table_offset: u64, refcount_table_clusters: u64) -> Vec<u8> {
        let v3 = self.options.v3;
        let mut h = Vec::with_capacity(V3_HEADER_LEN);
        let be32 = |h: &mut Vec<u8>, v: u32| h.extend_from_slice(&v.to_be_bytes());
        let be64 = |h: &mut Vec<u8>, v: u64| h.extend_from_slice(&v.to_be_bytes());
        be32(&mut h, QCOW_MAGIC);
        be32(&mut h, if v3 { 3 } else { 2 });
        be64(&mut h, 0); // backing file offset
        be32(&mut h, 0); // backing file name length
        be32(&mut h, self.geometry.cluster_bits);
        be64(&mut h, self.size);
        be32(&mut h, 0); // no encryption
        be32(&mut h, u32::try_from(self.geometry.l1_entries).unwrap_or(u32::MAX));
        be64(&mut h, l1_offset);
        be64(&mut h, refcount_table_offset);
        be32(&mut h, u32::try_from(refcount_table_clusters).unwrap_or(u32::MAX));
        be32(&mut h, 0); // no snapshots
        be64(&mut h, 0); // snapshot table offset
        debug_assert_eq!(h.len(), V2_HEADER_LEN);
        if v3 {
            let zstd = self.options.compression == CompressionType::Zstd;
            be64(&mut h, if zstd { INCOMPAT_COMPRESSION } else { 0 });
            be64(&mut h, 0); // compatible features
            be64(&mut h, 0); // autoclear features
            be32(&mut h, REFCOUNT_ORDER);
            be32(&mut h, V3_HEADER_LEN_U32);
            h.push(if zstd { COMPRESSION_TYPE_ZSTD } else { 0 });
            h.resize(V3_HEADER_LEN, 0);
        }
        // Header extensions follow; the zeroed cluster reads as the end-of-extensions marker.
        h
    }
}

impl FormatWriter for Qcow2Writer {
    fn alignment(&self) -> u64 {
        self.geometry.cluster_size()
    }

    fn compresses(&self) -> bool {
        self.options.compress
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.options.compress {
            self.write_compressed(offset, data)?;
        } else {
            self.write_plain(offset, data)?;
        }
        self.delivered(offset, data.len() as u64)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.delivered(offset, len)
    }

    fn finish(&self) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        let bits = self.geometry.cluster_bits;
        let mut tables = std::mem::replace(
            &mut *lock(&self.l2),
            Tables { tables: Vec::new(), delivered: Vec::new(), l1: Vec::new() },
        );
        let mut alloc = lock(&self.alloc);
        // L2 tables not written yet (every one, if the engine did not report a range), in L1
        // order, after the data.
        let mut buf = Vec::with_capacity(usize::try_from(cs).unwrap_or(0));
        let mut l1 = vec![0u8; usize::try_from(self.geometry.l1_entries * ENTRY_BYTES).unwrap_or(0)];
        for i in 0..tables.tables.len() {
            if let Some(table) = tables.tables[i].take() {
                let at = alloc.clusters(1, bits)?;
                self.write_table(&table, at)?;
                tables.l1[i] = at;
            }
            if tables.l1[i] != 0 {
                l1[i * 8..i * 8 + 8].copy_from_slice(&(tables.l1[i] | OFLAG_COPIED).to_be_bytes());
            }
        }
        // The L1 table.
        let l1_clusters = (l1.len() as u64).div_ceil(cs).max(1);
        let l1_offset = alloc.clusters(l1_clusters, bits)?;
        self.file.write_all_at(&l1, l1_offset).map_err(|e| self.write_err(l1_offset, e))?;
        // The refcount table and blocks, which count every cluster including themselves.
        let before = alloc.next.div_ceil(cs);
        let (table_clusters, block_clusters) = refcount_metadata(before, cs);
        let table_offset = alloc.clusters(table_clusters, bits)?;
        let blocks_offset = alloc.clusters(block_clusters, bits)?;
        let end = alloc.next;
        let per_block = usize::try_from(cs * 8 / (1 << REFCOUNT_ORDER)).unwrap_or(usize::MAX);
        let mut table = vec![0u8; usize::try_from(table_clusters * cs).unwrap_or(0)];
        for (b, refs) in alloc.refs.chunks(per_block).enumerate() {
            let block_at = blocks_offset + (b as u64) * cs;
            buf.clear();
            for r in refs {
                buf.extend_from_slice(&r.to_be_bytes());
            }
            self.file.write_all_at(&buf, block_at).map_err(|e| self.write_err(block_at, e))?;
            if let Some(slot) = table.get_mut(b * 8..b * 8 + 8) {
                slot.copy_from_slice(&block_at.to_be_bytes());
            }
        }
        self.file.write_all_at(&table, table_offset).map_err(|e| self.write_err(table_offset, e))?;
        let header = self.header(l1_offset, table_offset, table_clusters);
        self.file.write_all_at(&header, 0).map_err(|e| self.write_err(0, e))?;
        self.file.set_len(end).map_err(|e| Error::io("setting the length of the qcow2 output", e))?;
        self.file.sync_all().map_err(|e| Error::io("syncing the qcow2 output", e))?;
        Ok(end)
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
        let o = Qcow2Options::from_pairs(&pairs(&[("compat", "0.10"), ("cluster_size", "2M")])).unwrap();
        assert!(!o.v3);
        assert_eq!(o.cluster_bits, 21);
        assert!(Qcow2Options::from_pairs(&pairs(&[("cluster_size", "4M")])).is_err());
        assert!(Qcow2Options::from_pairs(&pairs(&[("cluster_size", "3000")])).is_err());
        assert!(Qcow2Options::from_pairs(&pairs(&[("compat", "0.10"), ("compression_type", "zstd")])).is_err());
        assert!(Qcow2Options::from_pairs(&pairs(&[("refcount_bits", "8")])).is_err());
        assert!(Qcow2Options::from_pairs(&pairs(&[("bogus", "1")])).unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn l2_tables_are_written_once_their_range_is_delivered() {
        // 512-byte clusters: one L2 table maps 64 clusters (32 KiB).
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("t.qcow2")).unwrap();
        let options = Qcow2Options { cluster_bits: 9, ..Qcow2Options::default() };
        let geometry = Geometry::new(1 << 20, 9).unwrap();
        let l1 = usize::try_from(geometry.l1_entries).unwrap();
        let w = Qcow2Writer {
            file,
            options,
            size: 1 << 20,
            input_size: 1 << 20,
            geometry,
            alloc: Mutex::new(Alloc { next: 512, refs: vec![1] }),
            l2: Mutex::new(Tables { tables: (0..l1).map(|_| None).collect(), delivered: vec![0; l1], l1: vec![0; l1] }),
            compressors: Mutex::new(Vec::new()),
        };
        w.write(32768, &[1u8; 16384]).unwrap();
        assert!(lock(&w.l2).tables[1].is_some(), "half of table 1's range is still to come");
        w.zero(49152, 16384).unwrap();
        let t = lock(&w.l2);
        assert!(t.tables[1].is_none() && t.l1[1] != 0, "table 1 was written when its range completed");
        assert_eq!(t.l1[0], 0);
    }

    #[test]
    fn refcount_fixed_point_counts_itself() {
        // 64 KiB clusters count 32768 clusters per block.
        assert_eq!(refcount_metadata(1, 65536), (1, 1));
        assert_eq!(refcount_metadata(32766, 65536), (1, 1));
        assert_eq!(refcount_metadata(32767, 65536), (1, 2));
    }

    #[test]
    fn measure_matches_qemu_for_an_empty_and_a_full_disk() {
        // `qemu-img measure -O qcow2 --size 1G`: required 393216, fully allocated 1074135040.
        let none = |_unit: u64| -> Result<u64> { Ok(0) };
        let m = measure(1 << 30, &none, &Qcow2Options::default()).unwrap();
        assert_eq!(m, Measure { required: 393216, fully_allocated: 1074135040 });
    }
}
