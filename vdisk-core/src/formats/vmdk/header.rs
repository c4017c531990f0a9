//! The hosted sparse extent header (`KDMV`) and the streamOptimized markers and footer.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::io::{read_exact, ReadAt};

/// Bytes in a sector, the unit of every offset and size in VMDK metadata.
pub(crate) const SECTOR: u64 = 512;

/// `KDMV` read as a little-endian u32.
pub(crate) const KDMV_MAGIC: u32 = 0x564d_444b;

/// Highest hosted sparse version: 1 (Workstation), 2 (ESXi with a change tracking file), 3
/// (streamOptimized with persistent change tracking).
const MAX_VERSION: u32 = 3;

/// Flag: the newline-detection characters are valid (a text-mode transfer would mangle them).
const FLAG_VALID_NEWLINE_TEST: u32 = 1 << 0;
/// Flag: a redundant grain directory is kept at `rgd_offset`.
pub(crate) const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Flag: a grain table entry of 1 means "this grain reads as zeros".
pub(crate) const FLAG_ZEROED_GRAIN_GTE: u32 = 1 << 2;
/// Flag: grains are preceded by markers (streamOptimized).
pub(crate) const FLAG_MARKERS: u32 = 1 << 17;

/// `gdOffset` value meaning "the grain directory is at the end; read the footer".
pub(crate) const GD_AT_END: u64 = u64::MAX;

/// compressAlgorithm: none.
const COMPRESSION_NONE: u16 = 0;
/// compressAlgorithm: deflate in zlib framing (RFC 1950).
const COMPRESSION_DEFLATE: u16 = 1;

/// Largest grain: 2^21 sectors (1 GiB); larger grains are unrealistic and only a forged header
/// would ask for them (qemu draws the same line).
const MAX_GRAIN_SECTORS: u64 = 1 << 21;

/// Most entries per grain table: VMware always writes 512; 2^16 leaves room for odd writers while
/// keeping one table at 256 KiB.
const MAX_GTES_PER_GT: u32 = 1 << 16;

/// The on-disk hosted sparse extent header (512 bytes at offset 0, and in a stream's footer).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawSparseHeader {
    /// `KDMV`.
    magic: U32,
    /// Format version, 1 to 3.
    version: U32,
    /// Feature flags (`FLAG_*`).
    flags: U32,
    /// Extent capacity in sectors.
    capacity: U64,
    /// Grain size in sectors.
    grain_size: U64,
    /// Sector of the embedded descriptor, 0 when none.
    descriptor_offset: U64,
    /// Size of the embedded descriptor in sectors.
    descriptor_size: U64,
    /// Entries per grain table.
    num_gtes_per_gt: U32,
    /// Sector of the redundant grain directory.
    rgd_offset: U64,
    /// Sector of the grain directory, or [`GD_AT_END`].
    gd_offset: U64,
    /// Sectors of metadata before the first grain.
    overhead: U64,
    /// Set while the extent is open for writing.
    unclean_shutdown: u8,
    /// `'\n'`.
    single_end_line_char: u8,
    /// `' '`.
    non_end_line_char: u8,
    /// `'\r'`.
    double_end_line_char1: u8,
    /// `'\n'`.
    double_end_line_char2: u8,
    /// Grain compression: 0 none, 1 deflate.
    compress_algorithm: U16,
    /// Zeros.
    pad: [u8; 433],
}
const _: () = assert!(size_of::<RawSparseHeader>() == 512);

/// A validated hosted sparse header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SparseHeader {
    pub(crate) version: u32,
    pub(crate) flags: u32,
    /// Capacity in bytes.
    pub(crate) capacity: u64,
    /// Grain size in bytes.
    pub(crate) grain_size: u64,
    /// Embedded descriptor (byte offset, byte length), when present.
    pub(crate) descriptor: Option<(u64, u64)>,
    pub(crate) gtes_per_gt: u32,
    /// Byte offset of the redundant grain directory, when the flag says there is one.
    pub(crate) rgd_offset: Option<u64>,
    /// Byte offset of the grain directory, or `None` when it is at the end (footer).
    pub(crate) gd_offset: Option<u64>,
    /// Byte offset of the first grain.
    pub(crate) overhead: u64,
    /// Grains are compressed (deflate, zlib framing).
    pub(crate) compressed: bool,
    /// Grains carry markers.
    pub(crate) markers: bool,
    /// Grain table entries of 1 are zeroed grains.
    pub(crate) zeroed_grains: bool,
}

impl SparseHeader {
    /// Bytes covered by one grain table.
    pub(crate) fn table_span(&self) -> u64 {
        self.grain_size * u64::from(self.gtes_per_gt)
    }

    /// Entries in the grain directory.
    pub(crate) fn gd_entries(&self) -> u64 {
        self.capacity.div_ceil(self.table_span())
    }
}

fn sectors_to_bytes(v: u64, what: &str, at: u64) -> Result<u64> {
    v.checked_mul(SECTOR)
        .ok_or_else(|| Error::invalid(format!("sparse header at {at:#x}: {what} {v:#x} sectors overflows 64 bits")))
}

/// Parse and validate the 512-byte header `bytes` read at `at`.
pub(crate) fn parse_sparse_header(bytes: &[u8; 512], at: u64) -> Result<SparseHeader> {
    let h = RawSparseHeader::ref_from_bytes(bytes)
        .map_err(|_| Error::invalid(format!("sparse header at {at:#x}: cannot be read")))?;
    if h.magic.get() != KDMV_MAGIC {
        return Err(Error::invalid(format!("sparse header at {at:#x}: bad magic {:#x}", h.magic.get())));
    }
    let version = h.version.get();
    if version == 0 || version > MAX_VERSION {
        return Err(Error::unsupported(format!("hosted sparse extent version {version} (at {at:#x})")));
    }
    let flags = h.flags.get();
    if flags & FLAG_VALID_NEWLINE_TEST != 0
        && (h.single_end_line_char, h.non_end_line_char, h.double_end_line_char1, h.double_end_line_char2)
            != (b'\n', b' ', b'\r', b'\n')
    {
        return Err(Error::invalid(format!(
            "sparse header at {at:#x}: the newline-detection characters are mangled (was the file transferred in text mode?)"
        )));
    }
    let grain_sectors = h.grain_size.get();
    if grain_sectors == 0 || !grain_sectors.is_power_of_two() || grain_sectors > MAX_GRAIN_SECTORS {
        return Err(Error::invalid(format!(
            "sparse header at {at:#x}: grain size of {grain_sectors:#x} sectors is not a power of two up to {MAX_GRAIN_SECTORS:#x}"
        )));
    }
    let gtes_per_gt = h.num_gtes_per_gt.get();
    if gtes_per_gt == 0 || gtes_per_gt > MAX_GTES_PER_GT {
        return Err(Error::invalid(format!(
            "sparse header at {at:#x}: {gtes_per_gt} entries per grain table (expected 1 to {MAX_GTES_PER_GT})"
        )));
    }
    let capacity = sectors_to_bytes(h.capacity.get(), "capacity", at)?;
    let grain_size = grain_sectors * SECTOR;
    let compressed = match h.compress_algorithm.get() {
        COMPRESSION_NONE => false,
        COMPRESSION_DEFLATE => true,
        other => return Err(Error::unsupported(format!("VMDK grain compression algorithm {other}"))),
    };
    let descriptor = match h.descriptor_offset.get() {
        0 => None,
        off => Some((
            sectors_to_bytes(off, "descriptor offset", at)?,
            sectors_to_bytes(h.descriptor_size.get(), "descriptor size", at)?,
        )),
    };
    let gd_offset = match h.gd_offset.get() {
        GD_AT_END => None,
        off => Some(sectors_to_bytes(off, "grain directory offset", at)?),
    };
    let rgd_offset = match h.rgd_offset.get() {
        0 => None,
        _ if flags & FLAG_REDUNDANT_GD == 0 => None,
        GD_AT_END => None,
        off => Some(sectors_to_bytes(off, "redundant grain directory offset", at)?),
    };
    let header = SparseHeader {
        version,
        flags,
        capacity,
        grain_size,
        descriptor,
        gtes_per_gt,
        rgd_offset,
        gd_offset,
        overhead: h.overhead.get().saturating_mul(SECTOR),
        compressed,
        markers: flags & FLAG_MARKERS != 0,
        zeroed_grains: flags & FLAG_ZEROED_GRAIN_GTE != 0,
    };
    // table_span cannot overflow: grain_size <= 2^30 and gtes_per_gt <= 2^16.
    Ok(header)
}

/// Read and validate the header at offset 0 of `src`.
pub(crate) fn read_sparse_header(src: &dyn ReadAt) -> Result<SparseHeader> {
    let mut buf = [0u8; 512];
    read_exact(src, &mut buf, 0, "sparse header")?;
    parse_sparse_header(&buf, 0)
}

/// A stream marker: `{value u64, size u32, type u32}` followed by data (grain) or padding.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawMarker {
    /// Grain marker: the grain's sector; metadata marker: sectors of metadata that follow.
    value: U64,
    /// Grain marker: compressed bytes that follow; metadata marker: 0.
    size: U32,
    /// Metadata marker type (only meaningful when `size` is 0).
    kind: U32,
}
const _: () = assert!(size_of::<RawMarker>() == 16);

/// Bytes of a grain marker before its compressed data (`value` and `size`).
pub(crate) const GRAIN_MARKER_BYTES: u64 = 12;

/// Metadata marker types.
pub(crate) const MARKER_EOS: u32 = 0;
pub(crate) const MARKER_GT: u32 = 1;
pub(crate) const MARKER_GD: u32 = 2;
pub(crate) const MARKER_FOOTER: u32 = 3;

/// A decoded marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) value: u64,
    pub(crate) size: u32,
    pub(crate) kind: u32,
}

pub(crate) fn parse_marker(bytes: &[u8; 16]) -> Marker {
    // A 16-byte array always fits the 16-byte marker.
    match RawMarker::ref_from_bytes(bytes) {
        Ok(m) => Marker { value: m.value.get(), size: m.size.get(), kind: m.kind.get() },
        Err(_) => Marker { value: 0, size: 0, kind: u32::MAX },
    }
}

/// The footer marker, footer header and end-of-stream marker, one sector each.
const FOOTER_BYTES: usize = 1536;

/// Read the footer of a stream whose header says the grain directory is at the end: the last
/// three sectors are a footer marker, a copy of the header with the real `gdOffset`, and the
/// end-of-stream marker.
pub(crate) fn read_footer(src: &dyn ReadAt) -> Result<SparseHeader> {
    let size = src.size();
    let at = size
        .checked_sub(3 * SECTOR)
        .filter(|&a| a >= SECTOR)
        .ok_or_else(|| Error::invalid("stream footer: the file is too small to hold the footer"))?;
    let mut buf = [0u8; FOOTER_BYTES];
    read_exact(src, &mut buf, at, "stream footer")?;
    let mut m = [0u8; 16];
    m.copy_from_slice(&buf[..16]);
    let footer = parse_marker(&m);
    m.copy_from_slice(&buf[1024..1040]);
    let eos = parse_marker(&m);
    if footer.size != 0 || footer.kind != MARKER_FOOTER {
        return Err(Error::invalid(format!(
            "stream footer marker at {at:#x}: expected a footer marker (type 3), found type {} size {} \
             (the stream is truncated or its grain directory is missing)",
            footer.kind, footer.size
        )));
    }
    if eos != (Marker { value: 0, size: 0, kind: MARKER_EOS }) {
        return Err(Error::invalid(format!(
            "end-of-stream marker at {:#x}: not an end-of-stream marker",
            at + 2 * SECTOR
        )));
    }
    let mut h = [0u8; 512];
    h.copy_from_slice(&buf[512..1024]);
    let header = parse_sparse_header(&h, at + SECTOR)?;
    if header.gd_offset.is_none() {
        return Err(Error::invalid(format!(
            "stream footer header at {:#x}: the grain directory offset is still 'at end'",
            at + SECTOR
        )));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header_bytes(capacity: u64, grain: u64, gd: u64, flags: u32, comp: u16) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(b"KDMV");
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[20..28].copy_from_slice(&grain.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[56..64].copy_from_slice(&gd.to_le_bytes());
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&comp.to_le_bytes());
        b
    }

    #[test]
    fn validates_fields() {
        let h = parse_sparse_header(&header_bytes(2048, 128, 21, 3, 0), 0).unwrap();
        assert_eq!((h.capacity, h.grain_size, h.gd_offset, h.gd_entries()), (1 << 20, 65536, Some(21 * 512), 1));
        assert!(parse_sparse_header(&header_bytes(2048, 100, 21, 3, 0), 0).is_err());
        assert!(parse_sparse_header(&header_bytes(2048, 0, 21, 3, 0), 0).is_err());
        assert!(parse_sparse_header(&header_bytes(u64::MAX, 128, 21, 3, 0), 0).is_err());
        let e = parse_sparse_header(&header_bytes(2048, 128, 21, 3, 7), 0).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        let mut b = header_bytes(2048, 128, 21, 1, 0);
        b[75] = b'\n';
        assert!(parse_sparse_header(&b, 0).unwrap_err().to_string().contains("text mode"));
        let h = parse_sparse_header(&header_bytes(2048, 128, GD_AT_END, 0x30001, 1), 0).unwrap();
        assert!(h.compressed && h.markers && h.gd_offset.is_none());
    }
}
