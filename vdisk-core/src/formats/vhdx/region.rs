//! The region table (two copies, at 192 KiB and 256 KiB): where the BAT and the metadata live.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::crc32c;
use super::error::{corrupt, unsupported};
use super::guid::Guid;
use super::MIB;
use crate::error::Result;
use crate::io::{self, ReadAt};

/// Offsets of the two region table copies (fixed by the specification).
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Size of a region table, the span its checksum covers.
pub(crate) const REGION_TABLE_SIZE: usize = 64 << 10;
/// Signature of a region table.
pub(crate) const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Most entries a region table may hold (the specification's limit; 2047 fill the 64 KiB).
const MAX_REGION_ENTRIES: u32 = 2047;
/// Offset of the checksum field inside a region table.
pub(crate) const CHECKSUM_FIELD: usize = 4;

/// The BAT region: {2DC27766-F623-4200-9D64-115E9BFD4A08}.
pub(crate) const BAT_REGION: Guid =
    Guid::new(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
/// The metadata region: {8B7CA206-4790-4B9A-B8FE-575F050F886E}.
pub(crate) const METADATA_REGION: Guid =
    Guid::new(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);

/// The region table header.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawRegionHeader {
    /// `regi`.
    pub(crate) signature: [u8; 4],
    /// CRC-32C of the 64 KiB table with this field as zero.
    pub(crate) checksum: U32,
    /// Number of entries that follow.
    pub(crate) entry_count: U32,
    /// Reserved, zero.
    pub(crate) reserved: U32,
}
const _: () = assert!(size_of::<RawRegionHeader>() == 16);

/// One region table entry.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawRegionEntry {
    /// Which region.
    pub(crate) guid: Guid,
    /// Offset of the region in the file, a multiple of 1 MiB.
    pub(crate) file_offset: U64,
    /// Length of the region, a multiple of 1 MiB.
    pub(crate) length: U32,
    /// Bit 0: a reader that does not know the region must refuse the file.
    pub(crate) required: U32,
}
const _: () = assert!(size_of::<RawRegionEntry>() == 32);

/// A region of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    /// Offset in the file.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) length: u64,
}

impl Region {
    /// One past the last byte.
    pub(crate) fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The validated region table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegionTable {
    /// The BAT region.
    pub(crate) bat: Region,
    /// The metadata region.
    pub(crate) metadata: Region,
    /// Which copy was used (1 or 2).
    pub(crate) copy: u8,
}

/// What `read` found, with the problems of the copies for `check`.
#[derive(Clone, Debug)]
pub(crate) struct Regions {
    /// The table in use.
    pub(crate) table: RegionTable,
    /// One line per problem with a copy (invalid, or different from the other).
    pub(crate) problems: Vec<String>,
}

/// Read the region table: the first copy whose signature and checksum hold. `log` is the log's
/// span (empty when there is none); regions must not overlap it, the header section or each other.
pub(crate) fn read(src: &dyn ReadAt, log: Region) -> Result<Regions> {
    let mut tables = Vec::new();
    let mut problems = Vec::new();
    for (i, &offset) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let copy = if i == 0 { 1 } else { 2 };
        match read_one(src, offset, copy, log) {
            Ok(t) => tables.push(t),
            // A region vdisk does not know but must understand: refuse whichever copy says so.
            Err(e) if e.kind() == crate::ErrorKind::Unsupported => return Err(e),
            Err(e) => problems.push((copy, e)),
        }
    }
    let mut lines: Vec<String> = problems.iter().map(|(_, e)| e.to_string()).collect();
    let table =
        match tables.first() {
            Some(t) => t.clone(),
            None => {
                // Both copies bad: report the first copy's problem as the error (an unknown required
                // region is Unsupported rather than corrupt).
                return Err(problems.into_iter().next().map(|(_, e)| e).unwrap_or_else(|| {
                    corrupt("region table", REGION_TABLE_OFFSETS[0], "neither copy could be read")
                }));
            }
        };
    if let [a, b] = tables.as_slice() {
        if (a.bat, a.metadata) != (b.bat, b.metadata) {
            lines.push(format!(
                "region table 2 at {:#x} differs from region table 1 at {:#x}",
                REGION_TABLE_OFFSETS[1], REGION_TABLE_OFFSETS[0]
            ));
        }
    }
    Ok(Regions { table, problems: lines })
}

fn read_one(src: &dyn ReadAt, offset: u64, copy: u8, log: Region) -> Result<RegionTable> {
    let what = format!("region table {copy}");
    let buf = io::read_vec(src, offset, REGION_TABLE_SIZE as u64, "VHDX region table")?;
    let (header, rest) =
        RawRegionHeader::ref_from_prefix(&buf[..]).map_err(|_| corrupt(what.clone(), offset, "cannot be parsed"))?;
    if &header.signature != REGION_SIGNATURE {
        return Err(corrupt(what, offset, "the signature is not 'regi'"));
    }
    let sum = crc32c::crc32c_with_zeroed_field(&buf, CHECKSUM_FIELD);
    if sum != header.checksum.get() {
        return Err(corrupt(
            what,
            offset,
            format!("checksum {:#010x} does not match the content ({sum:#010x})", header.checksum.get()),
        ));
    }
    let count = header.entry_count.get();
    if count > MAX_REGION_ENTRIES {
        return Err(corrupt(what, offset, format!("{count} entries, more than the {MAX_REGION_ENTRIES} allowed")));
    }
    let count = usize::try_from(count).map_err(|_| corrupt(what.clone(), offset, "too many entries"))?;
    let (entries, _) = <[RawRegionEntry]>::ref_from_prefix_with_elems(rest, count)
        .map_err(|_| corrupt(what.clone(), offset, "the entries do not fit in the table"))?;

    let mut bat = None;
    let mut metadata = None;
    let mut seen: Vec<(Region, &'static str)> = vec![(Region { offset: 0, length: MIB }, "header section")];
    if log.length > 0 {
        seen.push((log, "log"));
    }
    for (i, e) in entries.iter().enumerate() {
        let at = offset + 16 + 32 * i as u64;
        let ewhat = format!("{what} entry {i}");
        let name = if e.guid == BAT_REGION {
            "BAT region"
        } else if e.guid == METADATA_REGION {
            "metadata region"
        } else if e.required.get() & 1 != 0 {
            return Err(unsupported(format!("required region {{{}}} (in {what} at {at:#x})", e.guid)));
        } else {
            continue; // An optional region vdisk does not know: ignore it, as the specification says.
        };
        let r = Region { offset: e.file_offset.get(), length: u64::from(e.length.get()) };
        if r.offset % MIB != 0 || r.length % MIB != 0 || r.length == 0 {
            return Err(corrupt(
                ewhat,
                at,
                format!("{name} at {:#x} (+{:#x}) is not 1 MiB-aligned and non-empty", r.offset, r.length),
            ));
        }
        if r.offset.checked_add(r.length).is_none() {
            return Err(corrupt(ewhat, at, format!("{name} at {:#x} overflows", r.offset)));
        }
        if let Some((other, oname)) = seen.iter().find(|(o, _)| o.offset < r.end() && r.offset < o.end()) {
            return Err(corrupt(
                ewhat,
                at,
                format!(
                    "{name} {:#x}..{:#x} overlaps the {oname} {:#x}..{:#x}",
                    r.offset,
                    r.end(),
                    other.offset,
                    other.end()
                ),
            ));
        }
        seen.push((r, name));
        let slot = if e.guid == BAT_REGION { &mut bat } else { &mut metadata };
        if slot.replace(r).is_some() {
            return Err(corrupt(ewhat, at, format!("a second {name}")));
        }
    }
    let bat = bat.ok_or_else(|| corrupt(what.clone(), offset, "there is no BAT region"))?;
    let metadata = metadata.ok_or_else(|| corrupt(what.clone(), offset, "there is no metadata region"))?;
    Ok(RegionTable { bat, metadata, copy })
}
