//! The tar members of an OVA: names, kinds and where their data lies, read from the headers
//! alone (positional reads; member data is never read here).
//!
//! Formats: v7/ustar (POSIX 1003.1, name + prefix), GNU (`ustar  \0`; long names in `L` members,
//! base-256 sizes for members of 8 GiB and more) and pax (`x` records `path` and `size`; `g`
//! global records are read and ignored). Everything is bounded: the number of members, the size of
//! long names and pax records, and every size against the archive's end.
//!
//! Refused: a header whose checksum is wrong, a member whose data runs past the end of the archive,
//! and member names that are absolute or contain `..` (an OVA's files are relative names; such a
//! name only serves to escape a directory when extracted).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{self, ReadAt};

/// Bytes in a tar block (headers and the padding of data).
pub(super) const BLOCK: u64 = 512;

/// Most members walked: an OVA holds a descriptor, a manifest, a certificate and its disks;
/// chunked disks add one member per chunk (a 4 TiB disk in 1 GiB chunks is 4096).
const MAX_MEMBERS: usize = 1 << 16;

/// Largest GNU long name or link read: `PATH_MAX` is 4096; 64 KiB leaves ample margin.
const MAX_LONG_NAME_BYTES: u64 = 64 << 10;

/// Largest pax extended header read: real ones carry a few short records.
const MAX_PAX_BYTES: u64 = 1 << 20;

/// What a member is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A regular file (`0`, NUL, or `7` contiguous).
    File,
    /// A directory.
    Directory,
    /// A hard or symbolic link.
    Link,
    /// A GNU sparse file: its data is not stored as is.
    Sparse,
    /// Anything else (devices, FIFOs, volume labels, multi-volume continuations).
    Other(u8),
}

/// One member of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Member {
    /// The name, without a leading `./`.
    pub(super) name: String,
    pub(super) kind: Kind,
    /// Offset of its header (for messages).
    pub(super) header_at: u64,
    /// Offset of its data.
    pub(super) offset: u64,
    /// Bytes of data.
    pub(super) size: u64,
}

/// Parse an octal or base-256 numeric field.
fn number(field: &[u8], what: &str, at: u64) -> Result<u64> {
    let bad = |why: &str| Error::invalid(format!("tar header at {at:#x}: the {what} field {why}"));
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            // Base-256 (GNU): big-endian, the top bit of the first byte set; negative values
            // (0xff first) are meaningless for sizes.
            if first == 0xff {
                return Err(bad("is a negative base-256 number"));
            }
            let mut v: u64 = u64::from(first & 0x7f);
            for &b in &field[1..] {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(b)))
                    .ok_or_else(|| bad("overflows 64 bits"))?;
            }
            return Ok(v);
        }
    }
    let text: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let text = std::str::from_utf8(&text).map_err(|_| bad("is not ASCII"))?;
    let text = text.trim_matches(' ');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| bad(&format!("'{text}' is not an octal number")))
}

/// Text up to the first NUL.
fn field_text(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Validate the header checksum (unsigned sum, or the signed sum old tars wrote).
fn checksum_ok(h: &[u8; 512], at: u64) -> Result<bool> {
    let stored = number(&h[148..156], "checksum", at)?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    Ok(stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed))
}

/// The member name with a leading `./` removed; refused when absolute or containing `..`.
fn clean_name(raw: &[u8], at: u64) -> Result<String> {
    let name = String::from_utf8_lossy(raw).into_owned();
    if name.contains('\0') {
        return Err(Error::invalid(format!("tar member at {at:#x}: its name contains a NUL byte")));
    }
    if name.starts_with('/') || name.split('/').any(|c| c == "..") {
        return Err(Error::invalid(format!(
            "tar member '{name}' at {at:#x}: absolute names and names with '..' are refused (they point outside the archive)"
        )));
    }
    let mut s = name.as_str();
    while let Some(rest) = s.strip_prefix("./") {
        s = rest.trim_start_matches('/');
    }
    Ok(s.to_string())
}

/// The pax records `path` and `size` (and whether GNU sparse records are present) of an
/// extended header's data.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    size: Option<u64>,
    sparse: bool,
}

fn parse_pax(data: &[u8], at: u64) -> Result<Pax> {
    let bad = |why: String| Error::invalid(format!("tar pax header at {at:#x}: {why}"));
    let mut pax = Pax::default();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(|| bad("a record has no length".into()))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|t| t.parse().ok())
            .filter(|&l| l > sp + 1 && l <= rest.len())
            .ok_or_else(|| bad("a record length is malformed or runs past the header".into()))?;
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").ok_or_else(|| bad("a record does not end with a newline".into()))?;
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| bad("a record has no '='".into()))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"size" => {
                let v = std::str::from_utf8(value).ok().and_then(|t| t.parse::<u64>().ok());
                pax.size = Some(v.ok_or_else(|| bad("the size record is not a number".into()))?);
            }
            k if k.starts_with(b"GNU.sparse.") => pax.sparse = true,
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(pax)
}

/// Read `len` bytes of extension data at `at`, bounded by `max`.
fn read_extension(src: &dyn ReadAt, at: u64, len: u64, max: u64, what: &str) -> Result<Vec<u8>> {
    if len > max {
        return Err(Error::limit(format!(
            "tar {what} at {at:#x} is {len} bytes, more than the {max} bytes vdisk reads"
        )));
    }
    io::read_vec(src, at, len, &format!("tar {what}"))
}

/// Walk every header of the archive in `src` and return its members, in archive order.
pub(super) fn members(src: &Arc<dyn ReadAt>) -> Result<Vec<Member>> {
    let src = src.as_ref();
    let end = src.size();
    let mut out: Vec<Member> = Vec::new();
    let mut at = 0u64;
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax: Option<Pax> = None;
    loop {
        if at.checked_add(BLOCK).is_none_or(|e| e > end) {
            // The end-of-archive blocks may be missing; a header cut short is not.
            if at < end {
                let mut tail = vec![0u8; usize::try_from(end - at).unwrap_or(0)];
                io::read_exact(src, &mut tail, at, "tar header")?;
                if tail.iter().any(|&b| b != 0) {
                    return Err(Error::invalid(format!(
                        "tar header at {at:#x} is cut short by the end of the archive"
                    )));
                }
            }
            break;
        }
        let mut h = [0u8; 512];
        io::read_exact(src, &mut h, at, "tar header")?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        if !checksum_ok(&h, at)? {
            return Err(Error::invalid(format!(
                "tar header at {at:#x}: the checksum does not match (not a tar archive, or a damaged one)"
            )));
        }
        if out.len() >= MAX_MEMBERS {
            return Err(Error::limit(format!("the archive holds more than {MAX_MEMBERS} members")));
        }
        let typeflag = h[156];
        let header_size = number(&h[124..136], "size", at)?;
        let data_at = at + BLOCK;
        // Link, device, directory and FIFO headers carry no data whatever their size field says.
        let has_data = !matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6');
        let mut size = if has_data { header_size } else { 0 };
        if let (Some(p), true) = (&pax, has_data) {
            if let Some(s) = p.size {
                size = s;
            }
        }
        let data_end = data_at.checked_add(size).filter(|&e| e <= end).ok_or_else(|| {
            Error::invalid(format!(
                "tar member at {at:#x}: its {size} bytes of data run past the end of the archive ({end:#x} bytes)"
            ))
        })?;
        let next = data_end
            .checked_next_multiple_of(BLOCK)
            .ok_or_else(|| Error::invalid(format!("tar member at {at:#x}: its size overflows")))?;
        match typeflag {
            b'L' => {
                let mut name = read_extension(src, data_at, size, MAX_LONG_NAME_BYTES, "GNU long name")?;
                name.truncate(field_text(&name).len());
                long_name = Some(name);
                at = next;
                continue;
            }
            b'K' => {
                // A long link target: only bounded, never used.
                read_extension(src, data_at, size, MAX_LONG_NAME_BYTES, "GNU long link name")?;
                at = next;
                continue;
            }
            b'x' | b'g' => {
                let data = read_extension(src, data_at, size, MAX_PAX_BYTES, "pax extended header")?;
                let parsed = parse_pax(&data, at)?;
                if typeflag == b'x' {
                    pax = Some(parsed);
                }
                at = next;
                continue;
            }
            _ => {}
        }
        let ustar_posix = &h[257..263] == b"ustar\0";
        let raw_name: Vec<u8> = if let Some(p) = pax.as_mut().and_then(|p| p.path.take()) {
            p
        } else if let Some(n) = long_name.take() {
            n
        } else if ustar_posix && h[345] != 0 {
            let mut n = field_text(&h[345..500]).to_vec();
            n.push(b'/');
            n.extend_from_slice(field_text(&h[0..100]));
            n
        } else {
            field_text(&h[0..100]).to_vec()
        };
        let sparse = pax.as_ref().is_some_and(|p| p.sparse);
        pax = None;
        long_name = None;
        let name = clean_name(&raw_name, at)?;
        let kind = match typeflag {
            _ if sparse => Kind::Sparse,
            b'0' | 0 | b'7' => Kind::File,
            b'5' => Kind::Directory,
            b'1' | b'2' => Kind::Link,
            b'S' => Kind::Sparse,
            other => Kind::Other(other),
        };
        out.push(Member { name, kind, header_at: at, offset: data_at, size });
        at = next;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::io::MemSource;

    /// A ustar header for `name` of `size` bytes with type `flag`, checksum set.
    pub(crate) fn header(name: &[u8], size: u64, flag: u8, gnu: bool) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = flag;
        if gnu {
            h[257..265].copy_from_slice(b"ustar  \0");
        } else {
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
        }
        set_checksum(&mut h);
        h
    }

    pub(crate) fn set_checksum(h: &mut [u8; 512]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    fn archive(parts: &[(&[u8; 512], &[u8])]) -> Arc<dyn ReadAt> {
        let mut v = Vec::new();
        for (h, data) in parts {
            v.extend_from_slice(&h[..]);
            v.extend_from_slice(data);
            v.resize(v.len().next_multiple_of(512), 0);
        }
        v.extend_from_slice(&[0u8; 1024]);
        Arc::new(MemSource(Arc::from(v)))
    }

    #[test]
    fn walks_ustar_gnu_long_names_and_pax() {
        let long = vec![b'd'; 150];
        let mut pax_rec = Vec::new();
        let rec = b"path=pax/name.vmdk\n";
        let len = rec.len() + 3;
        pax_rec.extend_from_slice(format!("{len} ").as_bytes());
        pax_rec.extend_from_slice(rec);
        let a = archive(&[
            (&header(b"./vm.ovf", 5, b'0', false), b"hello"),
            (&header(b"././@LongLink", long.len() as u64, b'L', true), &long),
            (&header(b"ddd", 3, b'0', true), b"abc"),
            (&header(b"PaxHeader", pax_rec.len() as u64, b'x', false), &pax_rec),
            (&header(b"short", 2, b'0', false), b"xy"),
        ]);
        let m = members(&a).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].name.as_str(), m[0].offset, m[0].size), ("vm.ovf", 512, 5));
        assert_eq!(m[1].name, String::from_utf8(long).unwrap());
        assert_eq!(m[2].name, "pax/name.vmdk");
    }

    #[test]
    fn base256_sizes() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[7] = 2; // 2 << 32
        assert_eq!(number(&f, "size", 0).unwrap(), 2 << 32);
        f[0] = 0xff;
        assert!(number(&f, "size", 0).is_err());
        assert_eq!(number(b"00000001000\0", "size", 0).unwrap(), 512);
    }

    #[test]
    fn refuses_hostile_members() {
        let e = members(&archive(&[(&header(b"../etc/passwd", 1, b'0', false), b"x")])).unwrap_err();
        assert!(e.to_string().contains("'..'"), "{e}");
        let e = members(&archive(&[(&header(b"/abs", 1, b'0', false), b"x")])).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let mut v = header(b"big", 1 << 20, b'0', false).to_vec();
        v.extend_from_slice(&[0u8; 1024]);
        let e = members(&(Arc::new(MemSource(Arc::from(v))) as Arc<dyn ReadAt>)).unwrap_err();
        assert!(e.to_string().contains("past the end of the archive"), "{e}");
        let mut h = header(b"x", 0, b'0', false);
        h[0] = b'y';
        let e = members(&archive(&[(&h, b"")])).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = members(&archive(&[(&header(b"@LongLink", 1 << 20, b'L', true), &vec![b'a'; 1 << 20])])).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::LimitExceeded, "{e}");
    }
}
