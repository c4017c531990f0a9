//! The header section: the file type identifier at 0 and the two headers at 64 KiB and 128 KiB.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::crc32c;
use super::error::{corrupt, unsupported};
use super::guid::Guid;
use super::MIB;
use crate::error::Result;
use crate::io::{self, ReadAt};

/// Signature of the file type identifier, at offset 0.
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Signature of a header.
pub(crate) const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Offsets of the two headers (the specification fixes them).
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Size of a header, the span its checksum covers.
pub(crate) const HEADER_SIZE: usize = 4096;
/// The only header version the specification defines.
pub(crate) const HEADER_VERSION: u16 = 1;
/// The only log version the specification defines.
const LOG_VERSION: u16 = 0;
/// Offset of the checksum field inside a header.
pub(crate) const CHECKSUM_FIELD: usize = 4;

/// The file type identifier (the first 520 bytes of its 64 KiB).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawFileIdentifier {
    /// `vhdxfile`.
    pub(crate) signature: [u8; 8],
    /// Name of the program that created the file, UTF-16LE, NUL-padded.
    pub(crate) creator: [u8; 512],
}
const _: () = assert!(size_of::<RawFileIdentifier>() == 520);

/// A header as stored.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeader {
    /// `head`.
    pub(crate) signature: [u8; 4],
    /// CRC-32C of the 4 KiB header with this field as zero.
    pub(crate) checksum: U32,
    /// The header with the higher number among the valid ones is current.
    pub(crate) sequence_number: U64,
    /// Changed the first time the file is written after being opened.
    pub(crate) file_write_guid: Guid,
    /// Changed the first time the virtual disk's content is written after being opened.
    pub(crate) data_write_guid: Guid,
    /// Identifies the log entries that belong to this file; zero when the log is empty.
    pub(crate) log_guid: Guid,
    /// Log format version, 0.
    pub(crate) log_version: U16,
    /// Header format version, 1.
    pub(crate) version: U16,
    /// Size of the log in bytes, a multiple of 1 MiB.
    pub(crate) log_length: U32,
    /// Offset of the log, a multiple of 1 MiB.
    pub(crate) log_offset: U64,
    /// Reserved, zero.
    pub(crate) reserved: [u8; 4016],
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);

/// A validated header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    /// Which copy (1 or 2).
    pub(crate) copy: u8,
    /// Its sequence number.
    pub(crate) sequence_number: u64,
    /// FileWriteGuid.
    pub(crate) file_write_guid: Guid,
    /// DataWriteGuid: what a child's parent_linkage names.
    pub(crate) data_write_guid: Guid,
    /// LogGuid; zero when there is nothing to replay.
    pub(crate) log_guid: Guid,
    /// Log offset in the file.
    pub(crate) log_offset: u64,
    /// Log length in bytes.
    pub(crate) log_length: u64,
}

/// The header section as read: the creator, the current header, and what is wrong with the other.
#[derive(Clone, Debug)]
pub(crate) struct HeaderSection {
    /// The creator string of the file type identifier.
    pub(crate) creator: String,
    /// The current header.
    pub(crate) current: Header,
    /// Problems with the header copies (for `check`): a copy that is not valid.
    pub(crate) problems: Vec<String>,
}

/// Read the file type identifier and both headers; the valid header with the higher sequence
/// number is current.
pub(crate) fn read(src: &dyn ReadAt) -> Result<HeaderSection> {
    let mut fti = [0u8; size_of::<RawFileIdentifier>()];
    io::read_exact(src, &mut fti, 0, "VHDX file type identifier")?;
    let fti = RawFileIdentifier::ref_from_bytes(&fti[..])
        .map_err(|_| corrupt("file type identifier", 0, "cannot be parsed"))?;
    if &fti.signature != FILE_SIGNATURE {
        return Err(corrupt("file type identifier", 0, "the signature is not 'vhdxfile'"));
    }
    let creator = utf16_string(&fti.creator);

    let mut valid: Vec<Header> = Vec::new();
    let mut problems = Vec::new();
    let mut newer = None;
    for (i, &offset) in HEADER_OFFSETS.iter().enumerate() {
        let copy = if i == 0 { 1 } else { 2 };
        match read_one(src, offset, copy) {
            Ok(h) => valid.push(h),
            Err(Problem::Invalid(why)) => problems.push(format!("header {copy} at {offset:#x}: {why}")),
            Err(Problem::Version(why)) => {
                problems.push(format!("header {copy} at {offset:#x}: {why}"));
                newer = Some(why);
            }
        }
    }
    // The higher sequence number wins; on a tie the first copy is taken.
    let current = match valid.as_slice() {
        [] => {
            if let Some(why) = newer {
                return Err(unsupported(why));
            }
            return Err(corrupt(
                "header",
                HEADER_OFFSETS[0],
                format!("neither header copy is valid ({})", problems.join("; ")),
            ));
        }
        [one] => one.clone(),
        [a, b, ..] => {
            if b.sequence_number > a.sequence_number {
                b.clone()
            } else {
                a.clone()
            }
        }
    };
    validate(&current)?;
    Ok(HeaderSection { creator, current, problems })
}

/// Why a header copy is not used.
enum Problem {
    /// Bad signature or checksum, or unreadable.
    Invalid(String),
    /// A checksummed header of a version vdisk does not know (a newer format, not corruption).
    Version(String),
}

/// Read one header copy.
fn read_one(src: &dyn ReadAt, offset: u64, copy: u8) -> std::result::Result<Header, Problem> {
    let mut buf = vec![0u8; HEADER_SIZE];
    io::read_exact(src, &mut buf, offset, "VHDX header").map_err(|e| Problem::Invalid(e.to_string()))?;
    let raw = RawHeader::ref_from_bytes(&buf[..]).map_err(|_| Problem::Invalid("cannot be parsed".into()))?;
    if &raw.signature != HEADER_SIGNATURE {
        return Err(Problem::Invalid("the signature is not 'head'".into()));
    }
    let sum = crc32c::crc32c_with_zeroed_field(&buf, CHECKSUM_FIELD);
    if sum != raw.checksum.get() {
        return Err(Problem::Invalid(format!(
            "checksum {:#010x} does not match the content ({sum:#010x})",
            raw.checksum.get()
        )));
    }
    if raw.version.get() != HEADER_VERSION {
        return Err(Problem::Version(format!(
            "header version {} (only {HEADER_VERSION} is defined)",
            raw.version.get()
        )));
    }
    if raw.log_version.get() != LOG_VERSION {
        return Err(Problem::Version(format!("log version {} (only {LOG_VERSION} is defined)", raw.log_version.get())));
    }
    Ok(Header {
        copy,
        sequence_number: raw.sequence_number.get(),
        file_write_guid: raw.file_write_guid,
        data_write_guid: raw.data_write_guid,
        log_guid: raw.log_guid,
        log_offset: raw.log_offset.get(),
        log_length: u64::from(raw.log_length.get()),
    })
}

/// Check the current header's log placement.
fn validate(h: &Header) -> Result<()> {
    let at = HEADER_OFFSETS[usize::from(h.copy.saturating_sub(1)).min(1)];
    let what = format!("header {}", h.copy);
    if h.log_length % MIB != 0 {
        return Err(corrupt(what, at, format!("log length {:#x} is not a multiple of 1 MiB", h.log_length)));
    }
    if h.log_length != 0 && (h.log_offset % MIB != 0 || h.log_offset < MIB) {
        return Err(corrupt(
            what,
            at,
            format!("log offset {:#x} is not a multiple of 1 MiB past the header section", h.log_offset),
        ));
    }
    if !h.log_guid.is_zero() && h.log_length == 0 {
        return Err(corrupt(what, at, "a log GUID is set but the log is empty"));
    }
    Ok(())
}

/// Decode a NUL-terminated UTF-16LE string, replacing what is not valid.
pub(crate) fn utf16_string(bytes: &[u8]) -> String {
    let units = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0);
    char::decode_utf16(units).map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
}
