//! The VDI pre-header and headers (versions 0 and 1.1, 384 and 400 bytes), all little-endian.
//!
//! Layout, from the start of the file:
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 64 | text for the eyes only (`<<< Oracle VM VirtualBox Disk Image >>>\n`, qemu's own, ...) |
//! | 64 | 4 | signature `0xbeda107f` |
//! | 68 | 4 | version: major in the high 16 bits (0 or 1), minor in the low 16 bits |
//! | 72 | 348 / 384 / 400 | header v0 / v1.1 / v1.1 with the LCHS geometry ("plus") |
//!
//! A v1 header starts with its own size (`cbHeader`); a v0 header has neither a size nor offsets:
//! its block map follows it directly, and the data follows the block map.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::error::VdiError;

/// `u32Signature` at offset 64.
pub(crate) const SIGNATURE: u32 = 0xbeda_107f;

/// Bytes of the pre-header (text, signature, version).
pub(super) const PRE_HEADER_BYTES: u64 = 72;

/// Bytes read from the start of the file to parse any header: the pre-header and the largest
/// header (v1.1 plus, 400 bytes).
pub(super) const HEAD_BYTES: usize = 472;

/// Bytes of a version 0 header.
const V0_HEADER_BYTES: u32 = 348;
/// The smallest v1 header (VirtualBox's `VDIHEADER1`).
const V1_HEADER_BYTES: u32 = 384;
/// The v1.1 header with the LCHS geometry (`VDIHEADER1PLUS`).
const V1_PLUS_HEADER_BYTES: u32 = 400;

/// Smallest block: VirtualBox and qemu address a disk in 512-byte sectors; a smaller block would
/// split a sector between blocks, which no writer does.
const MIN_BLOCK_BYTES: u32 = 512;

/// Image types (`u32Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ImageType {
    /// Dynamically growing (VirtualBox "normal").
    Dynamic,
    /// Preallocated (VirtualBox "fixed", qemu `static`).
    Static,
    /// VirtualBox 1.x undo image; read like a dynamic one.
    Undo,
    /// Differencing: free blocks come from the parent.
    Differencing,
}

impl ImageType {
    fn from_raw(v: u32) -> Option<Self> {
        match v {
            1 => Some(ImageType::Dynamic),
            2 => Some(ImageType::Static),
            3 => Some(ImageType::Undo),
            4 => Some(ImageType::Differencing),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            ImageType::Dynamic => "dynamic",
            ImageType::Static => "static",
            ImageType::Undo => "undo",
            ImageType::Differencing => "differencing",
        }
    }
}

/// The pre-header (72 bytes at offset 0).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawPreHeader {
    /// Text for the eyes only.
    file_info: [u8; 64],
    /// [`SIGNATURE`].
    signature: U32,
    /// Major version in the high 16 bits, minor in the low 16 bits.
    version: U32,
}
const _: () = assert!(size_of::<RawPreHeader>() == 72);

/// A CHS geometry with its sector size.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawGeometry {
    /// Cylinders.
    cylinders: U32,
    /// Heads.
    heads: U32,
    /// Sectors per track.
    sectors: U32,
    /// Bytes per sector (512).
    sector_bytes: U32,
}
const _: () = assert!(size_of::<RawGeometry>() == 16);

/// Header version 0 (348 bytes after the pre-header).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeaderV0 {
    /// Image type (1 dynamic, 2 static, 3 undo, 4 differencing).
    image_type: U32,
    /// Image flags.
    flags: U32,
    /// Comment, NUL-terminated UTF-8.
    comment: [u8; 256],
    /// Legacy geometry.
    geometry: RawGeometry,
    /// Disk size in bytes.
    disk_bytes: U64,
    /// Block size in bytes.
    block_bytes: U32,
    /// Blocks in the image (entries in the block map).
    blocks: U32,
    /// Blocks allocated in the file.
    blocks_allocated: U32,
    /// UUID of the image.
    uuid_create: [u8; 16],
    /// UUID of the last modification.
    uuid_modify: [u8; 16],
    /// Differencing images: the parent's creation UUID.
    uuid_linkage: [u8; 16],
}
const _: () = assert!(size_of::<RawHeaderV0>() == V0_HEADER_BYTES as usize);

/// Header version 1.1 (384 bytes after the pre-header; 400 with the LCHS geometry after it).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeaderV1 {
    /// Size of this header: 384, or 400 with the LCHS geometry.
    header_bytes: U32,
    /// Image type (1 dynamic, 2 static, 3 undo, 4 differencing).
    image_type: U32,
    /// Image flags.
    flags: U32,
    /// Comment, NUL-terminated UTF-8.
    comment: [u8; 256],
    /// Offset of the block map from the start of the file.
    blocks_offset: U32,
    /// Offset of the data area from the start of the file.
    data_offset: U32,
    /// Legacy geometry.
    geometry: RawGeometry,
    /// Formerly the BIOS translation mode; unused.
    dummy: U32,
    /// Disk size in bytes.
    disk_bytes: U64,
    /// Block size in bytes, a power of two.
    block_bytes: U32,
    /// Bytes of extra data stored before each block's data (0 or a power of two).
    block_extra: U32,
    /// Blocks in the image (entries in the block map).
    blocks: U32,
    /// Blocks allocated in the file.
    blocks_allocated: U32,
    /// UUID of the image.
    uuid_create: [u8; 16],
    /// UUID of the last modification.
    uuid_modify: [u8; 16],
    /// Differencing images: the parent's creation UUID.
    uuid_linkage: [u8; 16],
    /// Differencing images: the parent's modification UUID when the child was made.
    uuid_parent_modify: [u8; 16],
}
const _: () = assert!(size_of::<RawHeaderV1>() == 384);

/// A CHS geometry as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) cylinders: u32,
    pub(super) heads: u32,
    pub(super) sectors: u32,
    pub(super) sector_bytes: u32,
}

impl Geometry {
    fn from_raw(g: &RawGeometry) -> Self {
        Geometry {
            cylinders: g.cylinders.get(),
            heads: g.heads.get(),
            sectors: g.sectors.get(),
            sector_bytes: g.sector_bytes.get(),
        }
    }
}

/// A validated header, whatever its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct VdiHeader {
    /// The pre-header text, up to its first NUL.
    pub(super) text: String,
    /// The raw version (0x00010001 = 1.1).
    pub(super) version: u32,
    /// `cbHeader` of a v1 header; the v0 header's fixed size.
    pub(super) header_bytes: u32,
    pub(super) image_type: ImageType,
    pub(super) flags: u32,
    pub(super) comment: String,
    /// Byte offset of the block map.
    pub(super) blocks_offset: u64,
    /// Byte offset of the data area.
    pub(super) data_offset: u64,
    pub(super) geometry: Geometry,
    /// The LCHS geometry of a 400-byte header.
    pub(super) lchs: Option<Geometry>,
    /// `cbDisk` as recorded.
    pub(super) disk_bytes: u64,
    /// The guest-visible size: `cbDisk` rounded up to whole sectors, as qemu does.
    pub(super) virtual_size: u64,
    pub(super) block_bytes: u64,
    pub(super) block_extra: u64,
    pub(super) blocks: u64,
    pub(super) blocks_allocated: u64,
    pub(super) uuid_create: [u8; 16],
    pub(super) uuid_modify: [u8; 16],
    pub(super) uuid_linkage: [u8; 16],
    /// The parent's modification UUID (v1 only).
    pub(super) uuid_parent_modify: Option<[u8; 16]>,
}

impl VdiHeader {
    /// Bytes one block takes in the data area (extra data, then the block).
    pub(super) fn block_stride(&self) -> u64 {
        self.block_extra + self.block_bytes
    }

    /// "major.minor".
    pub(super) fn version_string(&self) -> String {
        format!("{}.{}", self.version >> 16, self.version & 0xffff)
    }
}

/// Text up to the first NUL, lossily decoded.
fn c_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn corrupt(at: u64, problem: String) -> VdiError {
    VdiError::Corrupt { structure: "header", at, problem }
}

/// The signature at offset 64 of `head`, whatever else the head holds.
pub(crate) fn has_signature(head: &[u8]) -> bool {
    head.get(64..68).is_some_and(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) == SIGNATURE)
}

/// Parse and validate the pre-header and header from the first bytes of the file (`head`, up to
/// [`HEAD_BYTES`]; shorter when the file is).
pub(super) fn parse(head: &[u8]) -> Result<VdiHeader, VdiError> {
    let pre = head.get(..72).and_then(|b| RawPreHeader::ref_from_bytes(b).ok()).ok_or_else(|| {
        corrupt(0, format!("the file of {} bytes is too short for the 72-byte pre-header", head.len()))
    })?;
    if pre.signature.get() != SIGNATURE {
        return Err(VdiError::Corrupt {
            structure: "pre-header",
            at: 64,
            problem: format!("signature {:#010x} is not {SIGNATURE:#010x}", pre.signature.get()),
        });
    }
    let version = pre.version.get();
    let text = c_text(&pre.file_info);
    let rest = &head[72..];
    let mut h = match version >> 16 {
        0 => parse_v0(rest, version, text)?,
        1 => parse_v1(rest, version, text)?,
        major => {
            return Err(VdiError::Unsupported(format!(
                "VDI version {major}.{} (vdisk reads versions 0 and 1.x)",
                version & 0xffff
            )))
        }
    };
    validate(&mut h)?;
    Ok(h)
}

fn short(need: u64, have: usize) -> VdiError {
    corrupt(
        PRE_HEADER_BYTES,
        format!("the header needs {need} bytes but the file holds only {have} after the pre-header"),
    )
}

fn parse_v0(rest: &[u8], version: u32, text: String) -> Result<VdiHeader, VdiError> {
    let size = size_of::<RawHeaderV0>();
    let h = rest
        .get(..size)
        .and_then(|b| RawHeaderV0::ref_from_bytes(b).ok())
        .ok_or_else(|| short(size as u64, rest.len()))?;
    let image_type = h.image_type.get();
    let blocks = u64::from(h.blocks.get());
    let blocks_offset = PRE_HEADER_BYTES + u64::from(V0_HEADER_BYTES);
    Ok(VdiHeader {
        text,
        version,
        header_bytes: V0_HEADER_BYTES,
        image_type: ImageType::from_raw(image_type)
            .ok_or_else(|| corrupt(PRE_HEADER_BYTES, format!("image type {image_type} is not 1 to 4")))?,
        flags: h.flags.get(),
        comment: c_text(&h.comment),
        blocks_offset,
        // blocks < 2^32, so the map's end fits easily.
        data_offset: blocks_offset + blocks * 4,
        geometry: Geometry::from_raw(&h.geometry),
        lchs: None,
        disk_bytes: h.disk_bytes.get(),
        virtual_size: 0,
        block_bytes: u64::from(h.block_bytes.get()),
        block_extra: 0,
        blocks,
        blocks_allocated: u64::from(h.blocks_allocated.get()),
        uuid_create: h.uuid_create,
        uuid_modify: h.uuid_modify,
        uuid_linkage: h.uuid_linkage,
        uuid_parent_modify: None,
    })
}

fn parse_v1(rest: &[u8], version: u32, text: String) -> Result<VdiHeader, VdiError> {
    let size = size_of::<RawHeaderV1>();
    let h = rest
        .get(..size)
        .and_then(|b| RawHeaderV1::ref_from_bytes(b).ok())
        .ok_or_else(|| short(size as u64, rest.len()))?;
    let header_bytes = h.header_bytes.get();
    if header_bytes < V1_HEADER_BYTES {
        return Err(corrupt(
            PRE_HEADER_BYTES,
            format!("header size {header_bytes} is smaller than the {V1_HEADER_BYTES} bytes of a version 1 header"),
        ));
    }
    let lchs = if header_bytes >= V1_PLUS_HEADER_BYTES {
        let g = rest
            .get(size..size + size_of::<RawGeometry>())
            .and_then(|b| RawGeometry::ref_from_bytes(b).ok())
            .ok_or_else(|| short(u64::from(V1_PLUS_HEADER_BYTES), rest.len()))?;
        Some(Geometry::from_raw(g))
    } else {
        None
    };
    let image_type = h.image_type.get();
    Ok(VdiHeader {
        text,
        version,
        header_bytes,
        image_type: ImageType::from_raw(image_type)
            .ok_or_else(|| corrupt(PRE_HEADER_BYTES, format!("image type {image_type} is not 1 to 4")))?,
        flags: h.flags.get(),
        comment: c_text(&h.comment),
        blocks_offset: u64::from(h.blocks_offset.get()),
        data_offset: u64::from(h.data_offset.get()),
        geometry: Geometry::from_raw(&h.geometry),
        lchs,
        disk_bytes: h.disk_bytes.get(),
        virtual_size: 0,
        block_bytes: u64::from(h.block_bytes.get()),
        block_extra: u64::from(h.block_extra.get()),
        blocks: u64::from(h.blocks.get()),
        blocks_allocated: u64::from(h.blocks_allocated.get()),
        uuid_create: h.uuid_create,
        uuid_modify: h.uuid_modify,
        uuid_linkage: h.uuid_linkage,
        uuid_parent_modify: Some(h.uuid_parent_modify),
    })
}

/// The checks VirtualBox and qemu make on the numbers; sets `virtual_size`.
fn validate(h: &mut VdiHeader) -> Result<(), VdiError> {
    let at = PRE_HEADER_BYTES;
    let block = h.block_bytes;
    if !block.is_power_of_two() || block < u64::from(MIN_BLOCK_BYTES) {
        return Err(corrupt(at, format!("block size {block} is not a power of two of at least {MIN_BLOCK_BYTES}")));
    }
    if h.block_extra != 0 && !h.block_extra.is_power_of_two() {
        return Err(corrupt(at, format!("extra block data size {} is neither 0 nor a power of two", h.block_extra)));
    }
    if h.version >> 16 == 1 {
        let min_map = PRE_HEADER_BYTES + u64::from(V1_HEADER_BYTES);
        if h.blocks_offset < min_map {
            return Err(corrupt(
                at,
                format!("the block map offset {:#x} lies inside the header (before {min_map:#x})", h.blocks_offset),
            ));
        }
        // blocks < 2^32 and blocks_offset < 2^32: no overflow.
        let map_end = h.blocks_offset + h.blocks * 4;
        if h.data_offset < map_end {
            return Err(corrupt(
                at,
                format!(
                    "the data area at {:#x} overlaps the block map at {:#x} ({} entries, ending at {map_end:#x})",
                    h.data_offset, h.blocks_offset, h.blocks
                ),
            ));
        }
    }
    // qemu rounds a disk size that is not a whole number of sectors up (VBoxManage convertfromraw
    // makes such images); the block holding the last partial sector holds the rest of it.
    let size = h
        .disk_bytes
        .checked_next_multiple_of(512)
        .ok_or_else(|| corrupt(at, format!("disk size {:#x} overflows when rounded to whole sectors", h.disk_bytes)))?;
    // block <= 2^31 and blocks < 2^32: the product fits.
    let covered = h.blocks * block;
    if size > covered {
        return Err(corrupt(
            at,
            format!(
                "disk size {} is larger than the block map covers ({} blocks of {block} bytes = {covered})",
                h.disk_bytes, h.blocks
            ),
        ));
    }
    h.virtual_size = size;
    Ok(())
}

/// A VirtualBox UUID (`RTUUID`: the first three fields little-endian) as text.
pub(super) fn uuid_string(u: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([u[0], u[1], u[2], u[3]]),
        u16::from_le_bytes([u[4], u[5]]),
        u16::from_le_bytes([u[6], u[7]]),
        u[8],
        u[9],
        u[10],
        u[11],
        u[12],
        u[13],
        u[14],
        u[15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1.1 header of `header_bytes` (384 or 400) for `disk` bytes in `blocks` of `block`.
    pub(crate) fn v1(header_bytes: u32, disk: u64, block: u32, blocks: u32) -> Vec<u8> {
        let mut b = vec![0u8; HEAD_BYTES];
        b[..20].copy_from_slice(b"<<< test image >>>\n\0");
        b[64..68].copy_from_slice(&SIGNATURE.to_le_bytes());
        b[68..72].copy_from_slice(&0x0001_0001u32.to_le_bytes());
        b[72..76].copy_from_slice(&header_bytes.to_le_bytes());
        b[76..80].copy_from_slice(&1u32.to_le_bytes());
        b[340..344].copy_from_slice(&512u32.to_le_bytes());
        let data = 512 + blocks * 4;
        b[344..348].copy_from_slice(&data.to_le_bytes());
        b[360..364].copy_from_slice(&512u32.to_le_bytes());
        b[368..376].copy_from_slice(&disk.to_le_bytes());
        b[376..380].copy_from_slice(&block.to_le_bytes());
        b[384..388].copy_from_slice(&blocks.to_le_bytes());
        b
    }

    #[test]
    fn parses_both_v1_sizes_and_rounds_odd_sizes_up() {
        let h = parse(&v1(384, 10 << 20, 1 << 20, 10)).unwrap();
        assert_eq!((h.virtual_size, h.block_bytes, h.blocks, h.lchs), (10 << 20, 1 << 20, 10, None));
        assert_eq!(h.text, "<<< test image >>>\n");
        let mut b = v1(400, 1000, 4096, 1);
        b[456..460].copy_from_slice(&8u32.to_le_bytes());
        b[468..472].copy_from_slice(&512u32.to_le_bytes());
        let h = parse(&b).unwrap();
        assert_eq!(h.virtual_size, 1024);
        assert_eq!(h.lchs.map(|g| g.cylinders), Some(8));
    }

    #[test]
    fn refuses_what_neither_virtualbox_nor_qemu_reads() {
        let e = parse(&v1(384, (10 << 20) + 1, 1 << 20, 10)).unwrap_err().to_string();
        assert!(e.contains("larger than the block map covers"), "{e}");
        assert!(parse(&v1(384, 1 << 20, 3 << 19, 1)).unwrap_err().to_string().contains("power of two"));
        assert!(parse(&v1(300, 1 << 20, 1 << 20, 1)).unwrap_err().to_string().contains("header size 300"));
        let mut b = v1(384, 1 << 20, 1 << 20, 1);
        b[68..72].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert!(matches!(parse(&b).unwrap_err(), VdiError::Unsupported(_)));
        let mut b = v1(384, 1 << 20, 1 << 20, 1);
        b[344..348].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse(&b).unwrap_err().to_string().contains("overlaps the block map"));
        assert!(parse(&b[..100]).unwrap_err().to_string().contains("too short") || parse(&b[..100]).is_err());
    }

    #[test]
    fn uuids_print_like_virtualbox() {
        let u = [0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(uuid_string(&u), "12345678-9abc-def0-0102-030405060708");
    }
}
