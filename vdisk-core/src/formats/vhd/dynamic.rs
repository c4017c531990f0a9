//! The dynamic disk header (`cxsparse`), the block allocation table and the parent locator
//! entries of dynamic and differencing disks.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::VhdError;
use super::footer::checksum;

/// Size of the dynamic disk header.
pub(super) const HEADER_SIZE: u64 = 1024;

/// The dynamic header's cookie.
pub(super) const HEADER_MAGIC: [u8; 8] = *b"cxsparse";

/// Byte range of the checksum field in the dynamic header.
pub(super) const HEADER_CHECKSUM_FIELD: std::ops::Range<usize> = 36..40;

/// A BAT entry for a block that is not allocated.
pub(super) const UNALLOCATED: u32 = u32::MAX;

/// The VHD sector size: BAT entries, bitmaps and locators count in these.
pub(super) const SECTOR: u64 = 512;

/// Smallest block size: one sector (qemu's lower bound too).
const MIN_BLOCK_SIZE: u32 = 512;

/// Largest block size accepted: 256 MiB is 128 times the 2 MiB that Hyper-V, Virtual PC and
/// qemu-img write (Hyper-V's only other choice is 512 KiB) and keeps one block's sector bitmap
/// at 64 KiB, read whole when a differencing block is mapped.
pub(super) const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// The dynamic disk header as stored (big-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawHeader {
    /// `cxsparse`.
    pub(super) cookie: [u8; 8],
    /// Unused, all ones.
    pub(super) data_offset: U64,
    /// Offset of the block allocation table.
    pub(super) table_offset: U64,
    /// Header version, 0x00010000.
    pub(super) header_version: U32,
    /// Entries in the BAT.
    pub(super) max_table_entries: U32,
    /// Bytes of guest data per block (a power of two; 2 MiB by default).
    pub(super) block_size: U32,
    /// One's complement of the byte sum of the header with this field zero.
    pub(super) checksum: U32,
    /// Unique id of the parent (differencing disks).
    pub(super) parent_uuid: [u8; 16],
    /// Parent's modification time, seconds since 2000-01-01 UTC.
    pub(super) parent_timestamp: U32,
    /// Zero.
    pub(super) reserved1: U32,
    /// Parent file name, UTF-16BE, NUL-padded.
    pub(super) parent_name: [u8; 512],
    /// Where to find the parent on each platform.
    pub(super) locators: [RawLocator; 8],
    /// Zeros.
    pub(super) reserved2: [u8; 256],
}

const _: () = assert!(size_of::<RawHeader>() == 1024);

/// One parent locator entry as stored.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawLocator {
    /// Platform code (`W2ru`, `W2ku`, `Wi2r`, `Wi2k`, `MacX`, `Mac `), zero when unused.
    pub(super) platform_code: [u8; 4],
    /// Sectors reserved for the locator data.
    pub(super) data_space: U32,
    /// Bytes of locator data.
    pub(super) data_length: U32,
    /// Zero.
    pub(super) reserved: U32,
    /// Offset of the locator data in the file.
    pub(super) data_offset: U64,
}

const _: () = assert!(size_of::<RawLocator>() == 24);

/// A used parent locator entry, not yet read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LocatorEntry {
    pub(super) index: usize,
    pub(super) platform: [u8; 4],
    pub(super) data_space: u32,
    pub(super) data_length: u32,
    pub(super) data_offset: u64,
}

/// The dynamic header's fields, with the structural checks done.
#[derive(Clone, Debug)]
pub(super) struct DynamicHeader {
    pub(super) table_offset: u64,
    pub(super) max_table_entries: u32,
    pub(super) block_size: u32,
    /// False when the stored checksum does not match (qemu ignores it; `check` reports it).
    pub(super) checksum_ok: bool,
    pub(super) stored_checksum: u32,
    pub(super) computed_checksum: u32,
    pub(super) parent_uuid: [u8; 16],
    pub(super) parent_timestamp: u32,
    pub(super) parent_name: String,
    pub(super) locators: Vec<LocatorEntry>,
}

impl DynamicHeader {
    /// Parse the header read at `at`.
    pub(super) fn parse(bytes: &[u8], at: u64) -> Result<DynamicHeader, VhdError> {
        let corrupt = |problem: String| VhdError::Corrupt { structure: "dynamic disk header", at, problem };
        let raw = RawHeader::ref_from_bytes(bytes).map_err(|_| corrupt(format!("expected {HEADER_SIZE} bytes")))?;
        if raw.cookie != HEADER_MAGIC {
            return Err(corrupt(format!("no 'cxsparse' cookie (found {:02x?})", raw.cookie)));
        }
        let block_size = raw.block_size.get();
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(corrupt(format!("block size {block_size} is not a power of two of at least 512")));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(VhdError::Unsupported(format!(
                "dynamic disk header at {at:#x}: block size {block_size} is larger than the {MAX_BLOCK_SIZE} bytes vdisk supports"
            )));
        }
        let computed = checksum(bytes, HEADER_CHECKSUM_FIELD);
        let stored = raw.checksum.get();
        let locators = raw
            .locators
            .iter()
            .enumerate()
            .filter(|(_, l)| l.platform_code != [0; 4])
            .map(|(index, l)| LocatorEntry {
                index,
                platform: l.platform_code,
                data_space: l.data_space.get(),
                data_length: l.data_length.get(),
                data_offset: l.data_offset.get(),
            })
            .collect();
        Ok(DynamicHeader {
            table_offset: raw.table_offset.get(),
            max_table_entries: raw.max_table_entries.get(),
            block_size,
            checksum_ok: computed == stored,
            stored_checksum: stored,
            computed_checksum: computed,
            parent_uuid: raw.parent_uuid,
            parent_timestamp: raw.parent_timestamp.get(),
            parent_name: utf16_name(&raw.parent_name, false),
            locators,
        })
    }

    /// Bytes of the sector bitmap in front of each block: one bit per sector, padded to a
    /// whole sector.
    pub(super) fn bitmap_size(&self) -> u64 {
        let sectors = u64::from(self.block_size) / SECTOR;
        sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
    }
}

/// Decode NUL-terminated UTF-16 (`little` endian or big), replacing invalid units.
pub(super) fn utf16_name(bytes: &[u8], little: bool) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|c| if little { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) })
        .take_while(|&u| u != 0);
    char::decode_utf16(units).map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
}

/// Decode the BAT read from the file (big-endian u32 sector offsets).
pub(super) fn decode_bat(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(block_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&1536u64.to_be_bytes());
        b[28..32].copy_from_slice(&4u32.to_be_bytes());
        b[32..36].copy_from_slice(&block_size.to_be_bytes());
        let name: Vec<u8> = "p.vhd".encode_utf16().flat_map(u16::to_be_bytes).collect();
        b[64..64 + name.len()].copy_from_slice(&name);
        b[0x240..0x244].copy_from_slice(b"W2ru");
        let c = checksum(&b, HEADER_CHECKSUM_FIELD);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn parses_and_validates() {
        let h = DynamicHeader::parse(&header(2 << 20), 512).unwrap();
        assert!(h.checksum_ok);
        assert_eq!(h.parent_name, "p.vhd");
        assert_eq!(h.locators.len(), 1);
        assert_eq!(h.bitmap_size(), 512);
        assert_eq!(DynamicHeader::parse(&header(512), 512).unwrap().bitmap_size(), 512);
        assert!(DynamicHeader::parse(&header(3 << 20), 512).is_err());
        assert!(DynamicHeader::parse(&header(256), 512).is_err());
        assert!(matches!(DynamicHeader::parse(&header(1 << 30), 512), Err(VhdError::Unsupported(_))));
        let mut bad = header(2 << 20);
        bad[100] ^= 1;
        assert!(!DynamicHeader::parse(&bad, 512).unwrap().checksum_ok);
        assert_eq!(DynamicHeader::parse(&header(MAX_BLOCK_SIZE), 512).unwrap().bitmap_size(), 64 << 10);
    }
}
