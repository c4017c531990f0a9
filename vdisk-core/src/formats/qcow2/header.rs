//! The qcow2 header and its extensions: on-disk layout, then a validated [`Header`].

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::error::Qcow2Error;
use crate::error::Result;
use crate::extent::Compression;
use crate::io::ReadAt;

/// `QFI\xfb`, the first four bytes of every qcow file.
pub(super) const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest cluster: 512 bytes (the spec's lower bound).
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB (the spec's and qemu's upper bound).
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// Length of the version 2 header (and of the common part of version 3).
const V2_HEADER_LEN: usize = 72;
/// [`V2_HEADER_LEN`] as the header's `header_length` field type.
const V2_HEADER_LEN_U32: u32 = 72;
const _: () = assert!(V2_HEADER_LEN_U32 as usize == V2_HEADER_LEN);
/// Smallest valid `header_length` of a version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;
/// Offset of the compression type byte, present when `header_length` is beyond it.
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Longest backing file name (the spec's bound: 1023 bytes).
const MAX_BACKING_NAME: u64 = 1023;
/// The backing format name must be shorter than this (qemu's bound: it keeps it in 16 bytes).
const MAX_BACKING_FORMAT_LEN: u32 = 16;
/// Size of one feature name table entry.
const FEATURE_ENTRY_LEN: usize = 48;

/// Incompatible feature: the image was not closed cleanly (refcounts may be stale).
pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: qemu found the image corrupt.
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type byte is meaningful (not zlib).
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: 128-bit L2 entries with 32 subclusters.
pub(super) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible bit this reader understands.
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;
/// Compatible feature: lazy refcounts.
pub(super) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub(super) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image on its own.
pub(super) const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension type: end of the extension area.
const EXT_END: u32 = 0;
/// Header extension type: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: names of feature bits.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: the full disk encryption header pointer.
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: persistent dirty bitmaps.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: the external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The header fields common to versions 2 and 3 (big-endian, 72 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeaderV2 {
    /// `QFI\xfb`.
    magic: [u8; 4],
    /// 2 or 3.
    version: U32,
    /// Offset of the backing file name in the first cluster, 0 for none.
    backing_file_offset: U64,
    /// Length of the backing file name in bytes.
    backing_file_size: U32,
    /// log2 of the cluster size.
    cluster_bits: U32,
    /// Virtual disk size in bytes.
    size: U64,
    /// 0 none, 1 AES, 2 LUKS.
    crypt_method: U32,
    /// Entries in the active L1 table.
    l1_size: U32,
    /// Offset of the active L1 table.
    l1_table_offset: U64,
    /// Offset of the refcount table.
    refcount_table_offset: U64,
    /// Clusters occupied by the refcount table.
    refcount_table_clusters: U32,
    /// Number of internal snapshots.
    nb_snapshots: U32,
    /// Offset of the snapshot table.
    snapshots_offset: U64,
}
const _: () = assert!(size_of::<RawHeaderV2>() == V2_HEADER_LEN);

/// The version 3 additions (big-endian, 32 bytes at offset 72).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeaderV3 {
    /// Features a reader must understand to read the image.
    incompatible_features: U64,
    /// Features a reader may ignore.
    compatible_features: U64,
    /// Features a writer that does not understand them must clear.
    autoclear_features: U64,
    /// log2 of the refcount width in bits.
    refcount_order: U32,
    /// Length of the header; extensions follow it.
    header_length: U32,
}
const _: () = assert!(size_of::<RawHeaderV3>() == 32);

/// One header extension's framing (big-endian, 8 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawExtension {
    /// Extension type.
    kind: U32,
    /// Length of the data that follows, before padding to 8 bytes.
    len: U32,
}
const _: () = assert!(size_of::<RawExtension>() == 8);

/// The bitmaps header extension (big-endian, 24 bytes).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBitmapsExt {
    /// Number of bitmaps in the directory.
    nb_bitmaps: U32,
    /// Must be zero.
    reserved: U32,
    /// Size of the bitmap directory in bytes.
    directory_size: U64,
    /// Offset of the bitmap directory.
    directory_offset: U64,
}
const _: () = assert!(size_of::<RawBitmapsExt>() == 24);

/// Most bitmaps in one image (qemu's limit).
const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (qemu's limit: 1 KiB per bitmap).
pub(super) const MAX_BITMAP_DIRECTORY: u64 = 1024 * MAX_BITMAPS as u64;

/// Where the bitmap directory is.
#[derive(Clone, Copy, Debug)]
pub(super) struct BitmapsExt {
    /// Number of bitmaps.
    pub(super) count: u32,
    /// Directory offset (cluster aligned).
    pub(super) directory_offset: u64,
    /// Directory size in bytes.
    pub(super) directory_size: u64,
}

/// A name from the feature name table.
#[derive(Clone, Debug)]
struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    kind: u8,
    /// Bit number.
    bit: u8,
    /// The name.
    name: String,
}

/// The validated header, with what its extensions say.
#[derive(Clone, Debug)]
pub(super) struct Header {
    /// 2 or 3.
    pub(super) version: u32,
    /// log2 of the cluster size, 9..=21.
    pub(super) cluster_bits: u32,
    /// Virtual size, as qemu uses it (rounded down to whole 512-byte sectors).
    pub(super) size: u64,
    /// Entries in the active L1 table.
    pub(super) l1_size: u32,
    /// Offset of the active L1 table.
    pub(super) l1_table_offset: u64,
    /// Offset of the refcount table.
    pub(super) refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub(super) refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub(super) nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub(super) snapshots_offset: u64,
    /// Incompatible feature bits.
    pub(super) incompatible: u64,
    /// Compatible feature bits.
    pub(super) compatible: u64,
    /// Autoclear feature bits.
    pub(super) autoclear: u64,
    /// log2 of the refcount width.
    pub(super) refcount_order: u32,
    /// How compressed clusters are encoded.
    pub(super) compression: Compression,
    /// The backing file name, raw bytes up to the first NUL (None without one).
    pub(super) backing_file: Option<Vec<u8>>,
    /// The backing format name from its extension.
    pub(super) backing_format: Option<String>,
    /// The external data file name from its extension (raw bytes).
    pub(super) data_file: Option<Vec<u8>>,
    /// The bitmaps extension, when present and consistent (autoclear bit set).
    pub(super) bitmaps: Option<BitmapsExt>,
    /// How the guest data is encrypted.
    pub(super) encryption: Encryption,
}

/// `crypt_method`: not encrypted.
const CRYPT_NONE: u32 = 0;
/// `crypt_method`: the legacy AES-CBC scheme.
const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS, with its header in the image file.
const CRYPT_LUKS: u32 = 2;

/// How the guest data is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Encryption {
    /// Not encrypted.
    None,
    /// Legacy AES-CBC.
    Aes,
    /// LUKS, with its header at `offset` (`length` bytes) in the image file.
    Luks {
        /// Offset of the LUKS header.
        offset: u64,
        /// Length of the LUKS header area.
        length: u64,
    },
}

impl Header {
    /// Cluster size in bytes.
    pub(super) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// True with 128-bit L2 entries.
    pub(super) fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    /// True with an external data file.
    pub(super) fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// Parse and validate the header and its extensions from the start of `src`.
    pub(super) fn read(src: &dyn ReadAt) -> Result<Header> {
        let what = "qcow2 header";
        let mut base = [0u8; V2_HEADER_LEN];
        crate::io::read_exact(src, &mut base, 0, what)?;
        let raw = RawHeaderV2::read_from_bytes(&base[..]).map_err(|_| Qcow2Error::invalid(what, 0, "too short"))?;
        if raw.magic != MAGIC {
            return Err(Qcow2Error::invalid(what, 0, "bad magic (not a qcow2 image)").into());
        }
        let version = raw.version.get();
        match version {
            1 => return Err(Qcow2Error::Version1.into()),
            2 | 3 => {}
            v => return Err(Qcow2Error::Version(v).into()),
        }
        let cluster_bits = raw.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::invalid(
                what,
                0x14,
                format!("cluster_bits {cluster_bits} is outside 9..=21 (512 B to 2 MiB clusters)"),
            )
            .into());
        }
        let cluster_size = 1u64 << cluster_bits;
        // The header, its extensions and the backing name all live in the first cluster; bytes
        // past the end of a short file read as zeros, as qemu reads them.
        let mut first = vec![0u8; crate::io::to_usize(cluster_size, "qcow2 header cluster")?];
        src.read_at_zero_fill(&mut first, 0).map_err(|e| crate::Error::io("reading the qcow2 header", e))?;

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_LEN_U32)
        } else {
            let v3 = first
                .get(V2_HEADER_LEN..V2_HEADER_LEN + size_of::<RawHeaderV3>())
                .and_then(|b| RawHeaderV3::read_from_bytes(b).ok())
                .ok_or_else(|| Qcow2Error::invalid(what, 0x48, "version 3 fields are missing"))?;
            let len = v3.header_length.get();
            if len < V3_MIN_HEADER_LEN {
                return Err(Qcow2Error::invalid(what, 0x64, format!("header_length {len} is below 104")).into());
            }
            if u64::from(len) > cluster_size {
                return Err(Qcow2Error::invalid(
                    what,
                    0x64,
                    format!("header_length {len} exceeds the cluster size {cluster_size}"),
                )
                .into());
            }
            (
                v3.incompatible_features.get(),
                v3.compatible_features.get(),
                v3.autoclear_features.get(),
                v3.refcount_order.get(),
                len,
            )
        };

        let backing_file_offset = raw.backing_file_offset.get();
        if backing_file_offset > cluster_size {
            return Err(Qcow2Error::invalid(
                what,
                0x8,
                format!("backing file name offset {backing_file_offset:#x} is outside the first cluster"),
            )
            .into());
        }
        let ext_end = if backing_file_offset != 0 { backing_file_offset } else { cluster_size };
        let ext = read_extensions(&first, u64::from(header_length), ext_end, raw.crypt_method.get())?;

        // Encrypted images are refused by `open` (they can still be described); an unknown
        // method cannot even be described.
        let encryption = match raw.crypt_method.get() {
            CRYPT_NONE => Encryption::None,
            CRYPT_AES => Encryption::Aes,
            CRYPT_LUKS => {
                let (offset, length) = ext.crypto.ok_or_else(|| {
                    Qcow2Error::invalid(what, 0x20, "LUKS encryption without a LUKS header pointer extension")
                })?;
                Encryption::Luks { offset, length }
            }
            n => return Err(Qcow2Error::Encrypted(format!("{n} (unknown)")).into()),
        };
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::Feature(feature_names(&ext.feature_names, unknown)).into());
        }
        if refcount_order > 6 {
            return Err(Qcow2Error::invalid(
                what,
                0x60,
                format!("refcount_order {refcount_order} is too large (refcounts are at most 64 bits)"),
            )
            .into());
        }

        let compression_byte = if header_length as usize > COMPRESSION_TYPE_OFFSET {
            first.get(COMPRESSION_TYPE_OFFSET).copied().unwrap_or(0)
        } else {
            0
        };
        let compression = match compression_byte {
            0 => Compression::Deflate,
            1 => Compression::Zstd,
            n => return Err(Qcow2Error::CompressionType(n).into()),
        };
        let flagged = incompatible & INCOMPAT_COMPRESSION != 0;
        if flagged != (compression != Compression::Deflate) {
            return Err(Qcow2Error::invalid(
                what,
                0x48,
                if flagged {
                    "the compression type feature bit is set but the compression type is zlib"
                } else {
                    "the compression type is not zlib but its incompatible feature bit is clear"
                },
            )
            .into());
        }

        let backing_file = if backing_file_offset != 0 {
            let len = u64::from(raw.backing_file_size.get());
            if len > MAX_BACKING_NAME.min(cluster_size - backing_file_offset) {
                return Err(Qcow2Error::invalid(
                    "backing file name",
                    backing_file_offset,
                    format!("length {len} is too long (at most 1023 bytes, inside the first cluster)"),
                )
                .into());
            }
            let bytes = slice(&first, backing_file_offset, len).unwrap_or_default();
            let name = until_nul(bytes);
            (!name.is_empty()).then(|| name.to_vec())
        } else {
            None
        };

        let has_data_file = incompatible & INCOMPAT_DATA_FILE != 0;
        if has_data_file && ext.data_file.is_none() {
            return Err(Qcow2Error::invalid(
                what,
                0x48,
                "the external data file feature is set but no data file name extension is present",
            )
            .into());
        }
        if !has_data_file && autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(Qcow2Error::invalid(what, 0x58, "data-file-raw is set without an external data file").into());
        }

        Ok(Header {
            version,
            cluster_bits,
            // qemu keeps the size in whole sectors; a size that is not a multiple of 512 loses
            // its tail in qemu-img info and convert alike.
            size: raw.size.get() & !511,
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            compression,
            backing_file,
            backing_format: ext.backing_format,
            data_file: ext.data_file,
            bitmaps: if autoclear & AUTOCLEAR_BITMAPS != 0 { ext.bitmaps } else { None },
            encryption,
        })
    }
}

/// What the header extensions say.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<Vec<u8>>,
    bitmaps: Option<BitmapsExt>,
    feature_names: Vec<FeatureName>,
    crypto: Option<(u64, u64)>,
}

/// `len` bytes of `buf` at `off`, if they are all inside it.
pub(super) fn slice(buf: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    buf.get(start..end)
}

/// The bytes of `b` before the first NUL.
pub(super) fn until_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// Walk the header extensions in `first[start..end]`.
fn read_extensions(first: &[u8], start: u64, end: u64, crypt_method: u32) -> Result<Extensions> {
    let what = "qcow2 header extension";
    let mut ext = Extensions::default();
    let mut off = start;
    while off < end {
        let body = off + 8;
        let Some(raw) =
            slice(first, off, 8).and_then(|b| RawExtension::read_from_bytes(b).ok()).filter(|_| body <= end)
        else {
            return Err(Qcow2Error::invalid(what, off, "runs past the end of the extension area").into());
        };
        let kind = raw.kind.get();
        let len = raw.len.get();
        if u64::from(len) > end - body {
            return Err(Qcow2Error::invalid(
                what,
                off,
                format!("length {len} runs past the end of the extension area"),
            )
            .into());
        }
        let data = slice(first, body, u64::from(len))
            .ok_or_else(|| Qcow2Error::invalid(what, off, "runs past the end of the first cluster"))?;
        match kind {
            EXT_END => return Ok(ext),
            EXT_BACKING_FORMAT => {
                if len >= MAX_BACKING_FORMAT_LEN {
                    return Err(Qcow2Error::invalid(
                        what,
                        off,
                        format!("backing format name of {len} bytes is too long"),
                    )
                    .into());
                }
                ext.backing_format = Some(String::from_utf8_lossy(until_nul(data)).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for entry in data.chunks_exact(FEATURE_ENTRY_LEN) {
                    ext.feature_names.push(FeatureName {
                        kind: entry[0],
                        bit: entry[1],
                        name: String::from_utf8_lossy(until_nul(&entry[2..])).into_owned(),
                    });
                }
            }
            EXT_CRYPTO => {
                if crypt_method != CRYPT_LUKS {
                    return Err(Qcow2Error::invalid(
                        what,
                        off,
                        "a LUKS encryption header pointer in an image that is not LUKS-encrypted",
                    )
                    .into());
                }
                let (Some(offset), Some(length)) = (data.get(..8), data.get(8..16)) else {
                    return Err(Qcow2Error::invalid(
                        what,
                        off,
                        format!("LUKS header pointer of {len} bytes, expected 16"),
                    )
                    .into());
                };
                if len != 16 {
                    return Err(Qcow2Error::invalid(
                        what,
                        off,
                        format!("LUKS header pointer of {len} bytes, expected 16"),
                    )
                    .into());
                }
                ext.crypto = Some((super::tables::be64(offset), super::tables::be64(length)));
            }
            EXT_BITMAPS => {
                let b = RawBitmapsExt::read_from_bytes(data).map_err(|_| {
                    Qcow2Error::invalid(what, off, format!("bitmaps extension of {len} bytes, expected 24"))
                })?;
                let count = b.nb_bitmaps.get();
                let directory_offset = b.directory_offset.get();
                let directory_size = b.directory_size.get();
                if b.reserved.get() != 0 {
                    return Err(Qcow2Error::invalid(what, off, "bitmaps extension: reserved field is not zero").into());
                }
                if count == 0 || count > MAX_BITMAPS {
                    return Err(Qcow2Error::invalid(
                        what,
                        off,
                        format!("bitmaps extension: {count} bitmaps (1..=65535)"),
                    )
                    .into());
                }
                if directory_size > MAX_BITMAP_DIRECTORY {
                    return Err(Qcow2Error::invalid(
                        what,
                        off,
                        format!("bitmaps extension: directory of {directory_size} bytes is too large"),
                    )
                    .into());
                }
                ext.bitmaps = Some(BitmapsExt { count, directory_offset, directory_size });
            }
            EXT_DATA_FILE => ext.data_file = Some(until_nul(data).to_vec()),
            // Unknown extensions are skipped, as the spec allows.
            _ => {}
        }
        off = body + u64::from(len).next_multiple_of(8);
    }
    Ok(ext)
}

/// Names for the incompatible feature bits in `bits`, from the feature name table where present.
fn feature_names(table: &[FeatureName], bits: u64) -> String {
    let mut names = Vec::new();
    for bit in 0..64u8 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        match table.iter().find(|f| f.kind == 0 && f.bit == bit && !f.name.is_empty()) {
            Some(f) => names.push(format!("{} (incompatible bit {bit})", f.name)),
            None => names.push(format!("unknown incompatible feature bit {bit}")),
        }
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_use_the_table() {
        let table = vec![FeatureName { kind: 0, bit: 7, name: "frobnicate".into() }];
        assert_eq!(
            feature_names(&table, (1 << 7) | (1 << 9)),
            "frobnicate (incompatible bit 7), unknown incompatible feature bit 9"
        );
    }
}
