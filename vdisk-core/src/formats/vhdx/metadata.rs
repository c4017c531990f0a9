//! The metadata region: its table and the items the reader needs (block size, sizes, parent).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::{corrupt, unsupported};
use super::guid::Guid;
use super::header::utf16_string;
use super::region::Region;
use super::MIB;
use crate::error::Result;
use crate::io::{self, ReadAt};
use crate::limits::MetadataBudget;

/// Size of the metadata table at the start of the region (fixed by the specification).
pub(crate) const TABLE_SIZE: u64 = 64 << 10;
/// Signature of the metadata table.
pub(crate) const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Most entries the table may hold (the specification's limit).
const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest metadata item (the specification's limit).
const MAX_ITEM_LENGTH: u64 = MIB;
/// Entry flag: the item is required; a reader that does not know it must refuse the file.
pub(crate) const FLAG_IS_REQUIRED: u32 = 1 << 2;

/// Smallest block size the specification allows.
pub(crate) const MIN_BLOCK_SIZE: u64 = MIB;
/// Largest block size the specification allows.
pub(crate) const MAX_BLOCK_SIZE: u64 = 256 * MIB;
/// Largest virtual disk the specification allows (64 TiB).
pub(crate) const MAX_VIRTUAL_DISK_SIZE: u64 = 64 << 40;

/// File parameters: {CAA16737-FA36-4D43-B3B6-33F0AA44E76B}.
pub(crate) const FILE_PARAMETERS: Guid =
    Guid::new(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
/// Virtual disk size: {2FA54224-CD1B-4876-B211-5DBED83BF4B8}.
pub(crate) const VIRTUAL_DISK_SIZE: Guid =
    Guid::new(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
/// Page 83 data (the virtual disk id): {BECA12AB-B2E6-4523-93EF-C309E000C746}.
pub(crate) const PAGE_83_DATA: Guid =
    Guid::new(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]);
/// Logical sector size: {8141BF1D-A96F-4709-BA47-F233A8FAAB5F}.
pub(crate) const LOGICAL_SECTOR_SIZE: Guid =
    Guid::new(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]);
/// Physical sector size: {CDA348C7-445D-4471-9CC9-E9885251C556}.
pub(crate) const PHYSICAL_SECTOR_SIZE: Guid =
    Guid::new(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]);
/// Parent locator: {A8D35F2D-B30B-454D-ABF7-D3D84834AB0C}.
pub(crate) const PARENT_LOCATOR: Guid =
    Guid::new(0xA8D3_5F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);
/// The VHDX parent locator type: {B04AEFB7-D19E-4A81-B789-25B8E9445913}.
pub(crate) const VHDX_LOCATOR_TYPE: Guid =
    Guid::new(0xB04A_EFB7, 0xD19E, 0x4A81, [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13]);

/// The metadata table header.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawMetadataHeader {
    /// `metadata`.
    pub(crate) signature: [u8; 8],
    /// Reserved, zero.
    pub(crate) reserved: U16,
    /// Number of entries that follow.
    pub(crate) entry_count: U16,
    /// Reserved, zero.
    pub(crate) reserved2: [u8; 20],
}
const _: () = assert!(size_of::<RawMetadataHeader>() == 32);

/// One metadata table entry.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawMetadataEntry {
    /// Which item.
    pub(crate) item_id: Guid,
    /// Offset of the item from the start of the metadata region (at least 64 KiB).
    pub(crate) offset: U32,
    /// Length of the item in bytes.
    pub(crate) length: U32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub(crate) flags: U32,
    /// Reserved, zero.
    pub(crate) reserved: U32,
}
const _: () = assert!(size_of::<RawMetadataEntry>() == 32);

/// The file parameters item.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawFileParameters {
    /// Payload block size in bytes: a power of two from 1 MiB to 256 MiB.
    pub(crate) block_size: U32,
    /// Bit 0 LeaveBlocksAllocated (a fixed disk), bit 1 HasParent (a differencing disk).
    pub(crate) flags: U32,
}
const _: () = assert!(size_of::<RawFileParameters>() == 8);

/// The parent locator item's header.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLocatorHeader {
    /// The locator type; VHDX defines one.
    locator_type: Guid,
    /// Reserved, zero.
    reserved: U16,
    /// Number of key/value entries that follow.
    key_value_count: U16,
}
const _: () = assert!(size_of::<RawLocatorHeader>() == 20);

/// One parent locator key/value entry.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLocatorEntry {
    /// Offset of the key from the start of the item.
    key_offset: U32,
    /// Offset of the value from the start of the item.
    value_offset: U32,
    /// Key length in bytes (UTF-16LE).
    key_length: U16,
    /// Value length in bytes (UTF-16LE).
    value_length: U16,
}
const _: () = assert!(size_of::<RawLocatorEntry>() == 12);

/// The parent locator: its key/value pairs, in file order.
#[derive(Clone, Debug, Default)]
pub(crate) struct ParentLocator {
    /// The pairs, decoded from UTF-16LE.
    pub(crate) entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value of `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The validated metadata.
#[derive(Clone, Debug)]
pub(crate) struct Metadata {
    /// Payload block size.
    pub(crate) block_size: u64,
    /// LeaveBlocksAllocated (a fixed disk).
    pub(crate) leave_blocks_allocated: bool,
    /// HasParent (a differencing disk).
    pub(crate) has_parent: bool,
    /// Virtual disk size.
    pub(crate) virtual_size: u64,
    /// Logical sector size: 512 or 4096.
    pub(crate) logical_sector_size: u64,
    /// Physical sector size: 512 or 4096.
    pub(crate) physical_sector_size: u64,
    /// The virtual disk id (page 83 data), where present.
    pub(crate) page83: Option<Guid>,
    /// The parent locator of a differencing disk.
    pub(crate) parent_locator: Option<ParentLocator>,
}

/// Read and validate the metadata region.
pub(crate) fn read(src: &dyn ReadAt, region: Region, budget: &MetadataBudget) -> Result<Metadata> {
    let base = region.offset;
    let table = io::read_vec(src, base, TABLE_SIZE, "VHDX metadata table")?;
    let (header, rest) = RawMetadataHeader::ref_from_prefix(&table[..])
        .map_err(|_| corrupt("metadata table", base, "cannot be parsed"))?;
    if &header.signature != METADATA_SIGNATURE {
        return Err(corrupt("metadata table", base, "the signature is not 'metadata'"));
    }
    let count = header.entry_count.get();
    if count > MAX_METADATA_ENTRIES {
        return Err(corrupt(
            "metadata table",
            base,
            format!("{count} entries, more than the {MAX_METADATA_ENTRIES} allowed"),
        ));
    }
    let (entries, _) = <[RawMetadataEntry]>::ref_from_prefix_with_elems(rest, usize::from(count))
        .map_err(|_| corrupt("metadata table", base, "the entries do not fit in the table"))?;

    let mut items: [Option<Vec<u8>>; 6] = Default::default();
    let known =
        [FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE_83_DATA, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR];
    for (i, e) in entries.iter().enumerate() {
        let at = base + 32 + 32 * i as u64;
        let what = format!("metadata entry {i}");
        let Some(slot) = known.iter().position(|g| *g == e.item_id) else {
            if e.flags.get() & FLAG_IS_REQUIRED != 0 {
                return Err(unsupported(format!("required metadata item {{{}}} (entry at {at:#x})", e.item_id)));
            }
            continue; // Optional and unknown: ignore it.
        };
        let offset = u64::from(e.offset.get());
        let length = u64::from(e.length.get());
        if length == 0 {
            continue; // An empty item carries nothing (the specification then wants offset 0).
        }
        if offset < TABLE_SIZE || offset.saturating_add(length) > region.length || length > MAX_ITEM_LENGTH {
            return Err(corrupt(
                what,
                at,
                format!(
                    "item {{{}}} at {offset:#x} (+{length:#x}) lies outside the metadata region (+{:#x})",
                    e.item_id, region.length
                ),
            ));
        }
        budget.reserve("VHDX metadata item", length)?;
        let data = io::read_vec(src, base + offset, length, "VHDX metadata item")?;
        let Some(cell) = items.get_mut(slot) else { continue };
        if cell.replace(data).is_some() {
            return Err(corrupt(what, at, format!("item {{{}}} appears twice", e.item_id)));
        }
    }
    let [file_params, vsize, page83, logical, physical, locator] = items;

    let need = |item: Option<Vec<u8>>, name: &str, len: usize| -> Result<Vec<u8>> {
        match item {
            Some(v) if v.len() >= len => Ok(v),
            Some(v) => Err(corrupt(
                "metadata table",
                base,
                format!("the {name} item holds {} bytes, fewer than {len}", v.len()),
            )),
            None => Err(corrupt("metadata table", base, format!("the required {name} item is missing"))),
        }
    };
    let fp = need(file_params, "file parameters", 8)?;
    let fp = RawFileParameters::ref_from_prefix(&fp[..])
        .map_err(|_| corrupt("metadata table", base, "file parameters cannot be parsed"))?
        .0;
    let block_size = u64::from(fp.block_size.get());
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(corrupt(
            "file parameters",
            base,
            format!("block size {block_size:#x} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    let flags = fp.flags.get();
    let leave_blocks_allocated = flags & 1 != 0;
    let has_parent = flags & 2 != 0;

    let read_u32 = |v: &[u8]| v.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let logical = need(logical, "logical sector size", 4)?;
    let logical_sector_size = u64::from(read_u32(&logical).unwrap_or(0));
    let physical = need(physical, "physical sector size", 4)?;
    let physical_sector_size = u64::from(read_u32(&physical).unwrap_or(0));
    for (name, v) in [("logical", logical_sector_size), ("physical", physical_sector_size)] {
        if v != 512 && v != 4096 {
            return Err(corrupt("metadata", base, format!("{name} sector size {v} is neither 512 nor 4096")));
        }
    }
    let vsize = need(vsize, "virtual disk size", 8)?;
    let virtual_size = U64::read_from_prefix(&vsize[..]).map(|(v, _)| v.get()).unwrap_or(0);
    if virtual_size > MAX_VIRTUAL_DISK_SIZE || virtual_size % logical_sector_size != 0 {
        return Err(corrupt(
            "metadata",
            base,
            format!(
                "virtual disk size {virtual_size:#x} is not a multiple of the {logical_sector_size}-byte sector up to 64 TiB"
            ),
        ));
    }
    let page83 = page83.and_then(|v| Guid::read_from_prefix(&v[..]).ok().map(|(g, _)| g));

    let parent_locator = match (has_parent, locator) {
        (true, Some(data)) => Some(parse_locator(&data, base)?),
        (true, None) => {
            return Err(corrupt("metadata table", base, "a differencing disk without a parent locator item"));
        }
        (false, _) => None,
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated,
        has_parent,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        page83,
        parent_locator,
    })
}

/// Parse the parent locator item (`at` is the metadata region's offset, for messages).
fn parse_locator(data: &[u8], at: u64) -> Result<ParentLocator> {
    let err = |detail: String| corrupt("parent locator", at, detail);
    let (header, rest) = RawLocatorHeader::ref_from_prefix(data).map_err(|_| err("too short".into()))?;
    if header.locator_type != VHDX_LOCATOR_TYPE {
        return Err(unsupported(format!("parent locator type {{{}}}", header.locator_type)));
    }
    let count = usize::from(header.key_value_count.get());
    let (entries, _) = <[RawLocatorEntry]>::ref_from_prefix_with_elems(rest, count)
        .map_err(|_| err(format!("{count} key/value entries do not fit in {} bytes", data.len())))?;
    let text = |offset: u32, len: u16| -> Result<String> {
        let start = usize::try_from(offset).map_err(|_| err("offset overflows".into()))?;
        let end = start.checked_add(usize::from(len)).ok_or_else(|| err("offset overflows".into()))?;
        let bytes = data
            .get(start..end)
            .ok_or_else(|| err(format!("a key or value at {start:#x} (+{len:#x}) lies outside the item")))?;
        if len % 2 != 0 {
            return Err(err(format!("a key or value at {start:#x} has an odd length {len}")));
        }
        Ok(utf16_string(bytes))
    };
    let mut out = ParentLocator::default();
    let mut keys = std::collections::HashSet::new();
    for e in entries {
        let key = text(e.key_offset.get(), e.key_length.get())?;
        let value = text(e.value_offset.get(), e.value_length.get())?;
        if key.is_empty() {
            return Err(err("an entry has an empty key".into()));
        }
        if !keys.insert(key.clone()) {
            return Err(err(format!("the key '{key}' appears twice")));
        }
        out.entries.push((key, value));
    }
    Ok(out)
}
