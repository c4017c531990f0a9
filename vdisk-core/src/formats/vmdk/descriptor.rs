//! The text descriptor: a separate `.vmdk` file, or the one embedded in a hosted sparse extent.
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=fffffffe
//! parentCID=ffffffff
//! createType="twoGbMaxExtentSparse"
//! parentFileNameHint="base.vmdk"
//! RW 8323072 SPARSE "disk-s001.vmdk"
//! RDONLY 2048 FLAT "disk-flat.vmdk" 128
//! RW 100 ZERO
//! ddb.adapterType = "lsilogic"
//! ```
//!
//! Lines end in LF or CRLF; `#` starts a comment line; values may be quoted; keys are matched
//! without regard to case and unknown keys are ignored. The text ends at the first NUL (descriptors
//! are NUL-padded to whole sectors). Bytes that are not UTF-8 are tolerated everywhere except in a
//! name vdisk must open.

use crate::error::{Error, Result};

/// The CID value meaning "no parent" (`parentCID=ffffffff`).
pub(crate) const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Most extent lines accepted: a twoGbMaxExtentSparse descriptor of a 62 TiB disk has about
/// 32,000; ten times that is still a small table.
pub(crate) const MAX_EXTENT_LINES: u64 = 1 << 18;

/// Access mode of an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Read-write.
    Rw,
    /// Read-only (reads as usual).
    RdOnly,
    /// No access: VMware allows neither reads nor writes.
    NoAccess,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s.to_ascii_uppercase().as_str() {
            "RW" => Some(Mode::Rw),
            "RDONLY" => Some(Mode::RdOnly),
            "NOACCESS" => Some(Mode::NoAccess),
            _ => None,
        }
    }
}

/// The type of an extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExtentType {
    /// Plain bytes in a file, from an offset.
    Flat,
    /// A hosted sparse extent (KDMV).
    Sparse,
    /// Reads as zeros; no file.
    Zero,
    /// Plain bytes in a VMFS file (like FLAT).
    Vmfs,
    /// An ESX sparse (COWD) extent.
    VmfsSparse,
    /// An ESXi space-efficient sparse extent.
    SeSparse,
    /// A raw device mapping (refused).
    VmfsRdm,
    /// A raw device (refused).
    VmfsRaw,
}

impl ExtentType {
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            _ => return None,
        })
    }

    /// The name as VMware (and qemu's `info`) writes it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    /// Mode mode.
    pub(crate) access: Mode,
    /// Size in 512-byte sectors.
    pub(crate) sectors: u64,
    /// Extent type.
    pub(crate) kind: ExtentType,
    /// File name (None for ZERO extents); `Err` holds the raw bytes when they are not UTF-8.
    pub(crate) file: Option<Result<String, Vec<u8>>>,
    /// Offset in sectors into the file (FLAT/VMFS), 0 when absent.
    pub(crate) offset: u64,
    /// 1-based line number, for messages.
    pub(crate) line: usize,
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    /// `version`, when present.
    pub(crate) version: Option<u32>,
    /// `CID`, when present.
    pub(crate) cid: Option<u32>,
    /// `parentCID`, when present.
    pub(crate) parent_cid: Option<u32>,
    /// `createType`, when present.
    pub(crate) create_type: Option<String>,
    /// `parentFileNameHint`, when present and not empty.
    pub(crate) parent_hint: Option<String>,
    /// Extent lines, in order.
    pub(crate) extents: Vec<ExtentLine>,
    /// Number of key lines (`key=value`), to tell an empty descriptor from one without extents.
    pub(crate) keys: usize,
}

/// A `key=value` value without its quotes.
fn unquote(v: &str) -> &str {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Parse a CID: hexadecimal, 1 to 8 digits, with an optional `0x`.
fn parse_cid(v: &str) -> Option<u32> {
    let v = unquote(v);
    let v = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")).unwrap_or(v);
    if v.is_empty() || v.len() > 8 {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

/// Split off the next whitespace-delimited token.
fn token(s: &[u8]) -> (&[u8], &[u8]) {
    let s = trim_start(s);
    let end = s.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    &s[start..]
}

fn trim(s: &[u8]) -> &[u8] {
    let s = trim_start(s);
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &s[..end]
}

fn ascii(s: &[u8]) -> Option<&str> {
    std::str::from_utf8(s).ok()
}

/// Parse descriptor text; `what` names it in errors ("descriptor", "embedded descriptor at 0x200").
pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<Descriptor> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = &bytes[..end];
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let mut d = Descriptor::default();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = trim(raw);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let (first, rest) = token(line);
        if let Some(access) = ascii(first).and_then(Mode::parse) {
            if d.extents.len() as u64 >= MAX_EXTENT_LINES {
                return Err(Error::limit(format!(
                    "{what} has more than {MAX_EXTENT_LINES} extent lines; vdisk refuses such a descriptor"
                )));
            }
            d.extents.push(parse_extent(access, rest, line_no, what)?);
            continue;
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            // Neither an extent nor a key: VMware ignores such lines, and so does vdisk.
            continue;
        };
        d.keys += 1;
        let key = String::from_utf8_lossy(trim(&line[..eq])).to_ascii_lowercase();
        let value = String::from_utf8_lossy(&line[eq + 1..]);
        let bad = |k: &str| Error::invalid(format!("{what}, line {line_no}: invalid {k} value '{}'", value.trim()));
        match key.as_str() {
            // The version is informational: a value vdisk cannot parse does not stop the read.
            "version" => d.version = unquote(&value).parse().ok(),
            "cid" => d.cid = Some(parse_cid(&value).ok_or_else(|| bad("CID"))?),
            "parentcid" => d.parent_cid = Some(parse_cid(&value).ok_or_else(|| bad("parentCID"))?),
            "createtype" => d.create_type = Some(unquote(&value).to_string()),
            "parentfilenamehint" => {
                let v = unquote(&value);
                if !v.is_empty() {
                    if value.contains('\u{fffd}') {
                        return Err(Error::invalid(format!(
                            "{what}, line {line_no}: parentFileNameHint is not valid UTF-8"
                        )));
                    }
                    d.parent_hint = Some(v.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(d)
}

fn parse_extent(access: Mode, rest: &[u8], line: usize, what: &str) -> Result<ExtentLine> {
    let bad = |why: &str| Error::invalid(format!("{what}, line {line}: invalid extent line: {why}"));
    let (size, rest) = token(rest);
    let sectors = ascii(size).and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| bad("the size is not a number"))?;
    let (kind_tok, rest) = token(rest);
    let kind_str = String::from_utf8_lossy(kind_tok);
    let kind = ExtentType::parse(&kind_str)
        .ok_or_else(|| Error::unsupported(format!("{what}, line {line}: extent type '{kind_str}' is not supported")))?;
    let rest = trim_start(rest);
    let (file, rest) = if rest.is_empty() {
        (None, rest)
    } else if let Some(q) = rest.strip_prefix(b"\"") {
        let close = q.iter().position(|&b| b == b'"').ok_or_else(|| bad("the file name has no closing quote"))?;
        (Some(&q[..close]), &q[close + 1..])
    } else {
        let (t, r) = token(rest);
        (Some(t), r)
    };
    let (off_tok, rest) = token(rest);
    let offset = if off_tok.is_empty() {
        0
    } else {
        ascii(off_tok).and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| bad("the offset is not a number"))?
    };
    // Anything after the offset (ESXi writes nothing there; old tools a partition UUID) is ignored.
    let _ = rest;
    let file = file.map(|f| String::from_utf8(f.to_vec()).map_err(|e| e.into_bytes()));
    if kind != ExtentType::Zero && file.is_none() {
        return Err(bad("a file name is required for this extent type"));
    }
    Ok(ExtentLine { access, sectors, kind, file, offset, line })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_crlf_comments_quotes_and_unknown_keys() {
        let text = b"\xef\xbb\xbf# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=0000abcd\r\n\
            parentCID = ffffffff \r\nisNativeSnapshot=\"no\"\r\ncreateType=\"vmfsThin\"\r\n\r\n\
            # Extent description\r\nRW 8 VMFS \"my disk-flat.vmdk\"\r\nRDONLY 16 FLAT \"x.vmdk\" 4\r\n\
            NOACCESS 2 ZERO\r\nrw 4 sesparse d\xc3\xa9j\xc3\xa0.vmdk\r\nddb.uuid = \"60 00\"\r\nweird line\r\n\0\0\0junk";
        let d = parse(text, "descriptor").unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.cid, Some(0xabcd));
        assert_eq!(d.parent_cid, Some(NO_PARENT_CID));
        assert_eq!(d.create_type.as_deref(), Some("vmfsThin"));
        assert_eq!(d.extents.len(), 4);
        assert_eq!(d.extents[0].file, Some(Ok("my disk-flat.vmdk".into())));
        assert_eq!((d.extents[1].access, d.extents[1].offset, d.extents[1].sectors), (Mode::RdOnly, 4, 16));
        assert_eq!((d.extents[2].kind, d.extents[2].file.clone()), (ExtentType::Zero, None));
        assert_eq!(d.extents[3].file, Some(Ok("déjà.vmdk".into())));
        assert_eq!(d.extents[3].kind, ExtentType::SeSparse);
    }

    #[test]
    fn refuses_broken_lines() {
        assert!(parse(b"RW x FLAT \"a\"", "d").is_err());
        assert!(parse(b"RW 1 FLAT \"a", "d").is_err());
        assert!(parse(b"RW 1 FLAT", "d").is_err());
        assert!(parse(b"RW 1 FLAT \"a\" z", "d").is_err());
        assert!(parse(b"CID=xyz", "d").is_err());
        let e = parse(b"RW 1 WEIRD \"a\"", "d").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        let d = parse(b"RW 1 FLAT \"\xff.vmdk\"", "d").unwrap();
        assert!(matches!(d.extents[0].file, Some(Err(_))));
    }
}
