//! The VHD hard disk footer: 512 bytes at the end of every VHD (and copied at offset 0 in dynamic
//! and differencing disks), its checksum, and the virtual-size rule.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the footer and of its copy at offset 0.
pub(super) const FOOTER_SIZE: u64 = 512;

/// The footer's cookie.
pub(super) const FOOTER_MAGIC: [u8; 8] = *b"conectix";

/// The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track): an image whose
/// geometry is this is larger than CHS can say, so qemu takes the current size instead.
const MAX_GEOMETRY: Geometry = Geometry { cylinders: 65535, heads: 16, sectors: 255 };

/// Creator applications whose images qemu sizes by CHS geometry (Virtual PC, old qemu-img).
const CHS_CREATORS: [[u8; 4]; 2] = [*b"vpc ", *b"qemu"];

/// Byte range of the checksum field in the footer.
pub(super) const FOOTER_CHECKSUM_FIELD: std::ops::Range<usize> = 64..68;

/// The footer as stored on disk (all fields big-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawFooter {
    /// `conectix`.
    pub(super) cookie: [u8; 8],
    /// Feature bits (0x1 temporary, 0x2 reserved and always set).
    pub(super) features: U32,
    /// File format version, 0x00010000.
    pub(super) format_version: U32,
    /// Offset of the dynamic disk header; all ones for fixed disks.
    pub(super) data_offset: U64,
    /// Creation time, seconds since 2000-01-01 00:00:00 UTC.
    pub(super) timestamp: U32,
    /// Four characters naming the program that created the image (`win `, `vpc `, `qemu`, ...).
    pub(super) creator_app: [u8; 4],
    /// Creator version, major in the high 16 bits, minor in the low 16 bits.
    pub(super) creator_version: U32,
    /// Host OS of the creator (`Wi2k`, `Mac `).
    pub(super) creator_host: [u8; 4],
    /// Size of the disk at creation, bytes.
    pub(super) original_size: U64,
    /// Current size of the disk, bytes.
    pub(super) current_size: U64,
    /// CHS cylinders.
    pub(super) cylinders: U16,
    /// CHS heads.
    pub(super) heads: u8,
    /// CHS sectors per track.
    pub(super) sectors: u8,
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub(super) disk_type: U32,
    /// One's complement of the byte sum of the footer with this field zero.
    pub(super) checksum: U32,
    /// The disk's unique id; a differencing child records its parent's.
    pub(super) unique_id: [u8; 16],
    /// 1 when the disk is in a saved state.
    pub(super) saved_state: u8,
    /// Zeros.
    pub(super) reserved: [u8; 427],
}

const _: () = assert!(size_of::<RawFooter>() == 512);

/// CHS geometry as recorded in the footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) cylinders: u16,
    pub(super) heads: u8,
    pub(super) sectors: u8,
}

impl Geometry {
    /// Bytes addressed by this geometry.
    pub(super) fn bytes(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors) * 512
    }
}

/// The disk types vdisk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    /// The `subformat` name (qemu-img's `-o subformat=` values, plus `differencing`).
    pub(super) fn as_str(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Where the virtual size came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SizeRule {
    /// Cylinders x heads x sectors x 512.
    Chs,
    /// The footer's current size, rounded down to whole sectors.
    CurrentSize,
}

impl SizeRule {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            SizeRule::Chs => "chs",
            SizeRule::CurrentSize => "current-size",
        }
    }
}

/// A footer whose cookie and checksum are good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Footer {
    pub(super) features: u32,
    pub(super) format_version: u32,
    pub(super) data_offset: u64,
    pub(super) timestamp: u32,
    pub(super) creator_app: [u8; 4],
    pub(super) creator_version: u32,
    pub(super) creator_host: [u8; 4],
    pub(super) original_size: u64,
    pub(super) current_size: u64,
    pub(super) geometry: Geometry,
    /// The raw disk type field (validated into [`Footer::disk_type`] by the caller).
    pub(super) disk_type_raw: u32,
    pub(super) unique_id: [u8; 16],
    pub(super) saved_state: bool,
}

/// Why 512 bytes are not a usable footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum FooterProblem {
    /// No `conectix` cookie.
    NoMagic,
    /// The checksum does not match.
    Checksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for FooterProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FooterProblem::NoMagic => f.write_str("no 'conectix' cookie"),
            FooterProblem::Checksum { stored, computed } => {
                write!(f, "checksum {stored:#010x} does not match the computed {computed:#010x}")
            }
        }
    }
}

/// One's complement of the byte sum of `bytes`, skipping the checksum field at `field`.
pub(super) fn checksum(bytes: &[u8], field: std::ops::Range<usize>) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !field.contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

impl Footer {
    /// Parse and verify 512 footer bytes.
    pub(super) fn parse(bytes: &[u8; 512]) -> Result<Footer, FooterProblem> {
        let raw = RawFooter::ref_from_bytes(bytes.as_slice()).map_err(|_| FooterProblem::NoMagic)?;
        if raw.cookie != FOOTER_MAGIC {
            return Err(FooterProblem::NoMagic);
        }
        let computed = checksum(bytes, FOOTER_CHECKSUM_FIELD);
        let stored = raw.checksum.get();
        if computed != stored {
            return Err(FooterProblem::Checksum { stored, computed });
        }
        Ok(Footer {
            features: raw.features.get(),
            format_version: raw.format_version.get(),
            data_offset: raw.data_offset.get(),
            timestamp: raw.timestamp.get(),
            creator_app: raw.creator_app,
            creator_version: raw.creator_version.get(),
            creator_host: raw.creator_host,
            original_size: raw.original_size.get(),
            current_size: raw.current_size.get(),
            geometry: Geometry { cylinders: raw.cylinders.get(), heads: raw.heads, sectors: raw.sectors },
            disk_type_raw: raw.disk_type.get(),
            unique_id: raw.unique_id,
            saved_state: raw.saved_state != 0,
        })
    }

    /// The disk type, if it is one vdisk reads.
    pub(super) fn disk_type(&self) -> Option<DiskType> {
        match self.disk_type_raw {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// The guest-visible size and the rule that gave it (see the module documentation).
    pub(super) fn virtual_size(&self) -> (u64, SizeRule) {
        if CHS_CREATORS.contains(&self.creator_app) && self.geometry != MAX_GEOMETRY {
            (self.geometry.bytes(), SizeRule::Chs)
        } else {
            (self.current_size & !511, SizeRule::CurrentSize)
        }
    }
}

/// Four bytes of a footer text field as shown to users: NULs dropped, other non-printable bytes
/// as `?`.
pub(super) fn four_cc(bytes: [u8; 4]) -> String {
    bytes
        .iter()
        .filter(|&&b| b != 0)
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { char::from(b) } else { '?' })
        .collect()
}

/// A 16-byte id as a lowercase hyphenated UUID, bytes in stored order.
pub(super) fn uuid_string(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn footer(creator: &[u8; 4], chs: (u16, u8, u8), current: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(&FOOTER_MAGIC);
        b[28..32].copy_from_slice(creator);
        b[48..56].copy_from_slice(&current.to_be_bytes());
        b[56..58].copy_from_slice(&chs.0.to_be_bytes());
        b[58] = chs.1;
        b[59] = chs.2;
        b[60..64].copy_from_slice(&3u32.to_be_bytes());
        let c = checksum(&b, FOOTER_CHECKSUM_FIELD);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn size_rule_follows_qemu() {
        let f = Footer::parse(&footer(b"vpc ", (301, 4, 17), 10_485_760)).unwrap();
        assert_eq!(f.virtual_size(), (10_479_616, SizeRule::Chs));
        let f = Footer::parse(&footer(b"qemu", (301, 4, 17), 10_485_760)).unwrap();
        assert_eq!(f.virtual_size(), (10_479_616, SizeRule::Chs));
        for creator in [b"win ", b"qem2", b"d2v\0", b"dutl", b"*img", b"wa\0\0"] {
            let f = Footer::parse(&footer(creator, (301, 4, 17), 10_000_000)).unwrap();
            assert_eq!(f.virtual_size(), (9_999_872, SizeRule::CurrentSize), "{creator:?}");
        }
        let f = Footer::parse(&footer(b"vpc ", (65535, 16, 255), 200 << 30)).unwrap();
        assert_eq!(f.virtual_size(), (200 << 30, SizeRule::CurrentSize));
    }

    #[test]
    fn checksum_and_magic_are_verified() {
        let mut b = footer(b"win ", (1, 1, 1), 512);
        assert!(Footer::parse(&b).is_ok());
        b[100] ^= 1;
        assert!(matches!(Footer::parse(&b), Err(FooterProblem::Checksum { .. })));
        b[0] = b'C';
        assert_eq!(Footer::parse(&b), Err(FooterProblem::NoMagic));
    }

    #[test]
    fn text_fields_render() {
        assert_eq!(four_cc(*b"d2v\0"), "d2v");
        assert_eq!(four_cc([b'a', 1, b' ', 0]), "a? ");
        let id = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(uuid_string(&id), "12345678-9abc-def0-0102-030405060708");
    }
}
