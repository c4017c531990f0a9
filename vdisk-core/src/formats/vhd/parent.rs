//! Finding a differencing disk's parent: reading the parent locators, turning their Windows or
//! Mac names into names this host can resolve, and opening the first that the reference policy
//! allows and whose unique id is the one the child records.

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Layer, OpenContext};
use crate::io::{self, ReadAt};
use crate::probe::Format;

use super::dynamic::{utf16_name, LocatorEntry};
use super::error::VhdError;
use super::footer::{four_cc, uuid_string};

/// Largest parent locator read: Windows paths reach 32767 UTF-16 units (65534 bytes); anything
/// longer is not a path.
const MAX_LOCATOR_BYTES: u32 = 64 << 10;

/// What the references are called in messages and policy errors.
const WHAT: &str = "VHD parent";

/// A parent locator entry and what vdisk made of it.
#[derive(Clone, Debug)]
pub(super) struct Locator {
    pub(super) entry: LocatorEntry,
    /// The stored text, decoded.
    pub(super) text: Option<String>,
    /// The name to resolve on this host (forward slashes), when there is one.
    pub(super) name: Option<String>,
    /// Why the locator cannot be used, when it cannot.
    pub(super) problem: Option<String>,
    /// True when the problem is a corrupt entry (data outside the file) rather than a name
    /// that has no meaning here.
    pub(super) corrupt: bool,
}

impl Locator {
    pub(super) fn platform(&self) -> String {
        four_cc(self.entry.platform)
    }
}

/// Try order of the platform codes: relative names first (they survive copying a chain to
/// another directory or host), then absolute Windows names, then the Mac URL.
fn priority(platform: [u8; 4]) -> Option<u8> {
    match &platform {
        b"W2ru" => Some(0),
        b"Wi2r" => Some(1),
        b"W2ku" => Some(2),
        b"Wi2k" => Some(3),
        b"MacX" => Some(4),
        _ => None,
    }
}

/// Read and decode every used locator entry. Entries that cannot be read are kept with their
/// problem (another locator may still find the parent); only the metadata budget is fatal.
pub(super) fn read_locators(ctx: &OpenContext<'_>, src: &dyn ReadAt, entries: &[LocatorEntry]) -> Result<Vec<Locator>> {
    let mut out = Vec::new();
    for entry in entries {
        let mut loc = Locator { entry: entry.clone(), text: None, name: None, problem: None, corrupt: false };
        let what = format!("VHD parent locator {} ({})", entry.index, four_cc(entry.platform));
        let end = entry.data_offset.checked_add(u64::from(entry.data_length));
        if priority(entry.platform).is_none() {
            loc.problem = Some("platform code not read by vdisk".into());
        } else if entry.data_length == 0 {
            loc.problem = Some("no data".into());
        } else if entry.data_length > MAX_LOCATOR_BYTES {
            loc.problem = Some(format!("{} bytes of data is too long for a path", entry.data_length));
            loc.corrupt = true;
        } else if end.is_none_or(|e| e > src.size()) {
            loc.problem = Some(format!(
                "data at {:#x} (+{:#x}) lies past the end of the file ({:#x} bytes)",
                entry.data_offset,
                entry.data_length,
                src.size()
            ));
            loc.corrupt = true;
        } else {
            ctx.budget.reserve(&what, u64::from(entry.data_length))?;
            let bytes = io::read_vec(src, entry.data_offset, u64::from(entry.data_length), &what)?;
            let text = decode(entry.platform, &bytes);
            match host_name(entry.platform, &text) {
                Ok(name) => loc.name = Some(name),
                Err(why) => loc.problem = Some(why),
            }
            loc.text = Some(text);
        }
        out.push(loc);
    }
    Ok(out)
}

/// The locator's stored bytes as text.
fn decode(platform: [u8; 4], bytes: &[u8]) -> String {
    match &platform {
        b"W2ru" | b"W2ku" => utf16_name(bytes, true),
        _ => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(bytes.get(..end).unwrap_or_default()).into_owned()
        }
    }
}

/// Turn a locator's text into a name to resolve on this host.
fn host_name(platform: [u8; 4], text: &str) -> std::result::Result<String, String> {
    if text.is_empty() {
        return Err("empty name".into());
    }
    if &platform == b"MacX" {
        return mac_url_path(text);
    }
    windows_name(text)
}

/// A Windows name with `/` separators: `.\parent.vhd` becomes `parent.vhd`, `..\a\b.vhd`
/// becomes `../a/b.vhd`. Drive-letter, UNC and device paths have no meaning on this host.
pub(super) fn windows_name(text: &str) -> std::result::Result<String, String> {
    if text.starts_with("\\\\") || text.starts_with("//") {
        return Err(format!("'{text}' is a UNC or device path"));
    }
    let bytes = text.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(format!("'{text}' is a Windows drive path"));
    }
    let unix = text.replace('\\', "/");
    let mut name = unix.as_str();
    while let Some(rest) = name.strip_prefix("./") {
        name = rest.trim_start_matches('/');
    }
    if name.is_empty() {
        return Err(format!("'{text}' names no file"));
    }
    Ok(name.to_string())
}

/// The path of a `file://` URL (`file://localhost/Users/a/p.vhd`, `file:///Users/a/p.vhd`),
/// percent-decoded.
fn mac_url_path(text: &str) -> std::result::Result<String, String> {
    let rest = text
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("file://"))
        .and_then(|_| text.get(7..))
        .ok_or_else(|| format!("'{text}' is not a file:// URL"))?;
    let rest = match rest.get(..9) {
        Some(host) if host.eq_ignore_ascii_case("localhost") => rest.get(9..).unwrap_or_default(),
        _ => rest,
    };
    if !rest.starts_with('/') {
        return Err(format!("'{text}' names a remote host or no path"));
    }
    let mut bytes = Vec::with_capacity(rest.len());
    let raw = rest.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    bytes.push(v);
                    i += 3;
                    continue;
                }
                None => return Err(format!("'{text}' has a bad %-escape")),
            }
        }
        bytes.push(b);
        i += 1;
    }
    String::from_utf8(bytes).map_err(|_| format!("'{text}' is not UTF-8 once decoded"))
}

/// A name to look for the parent by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Candidate {
    /// Where the name came from, for messages (`W2ru locator`, `parent name`).
    pub(super) label: String,
    pub(super) name: String,
    /// True for the last resort (the parent's file name from the header), whose failure is
    /// reported only when no locator gave a name.
    pub(super) fallback: bool,
}

/// The names to try, in order: each usable locator by platform priority, then the parent's
/// file name from the header (in the child's directory) as a last resort, without duplicates.
/// The unique id check makes the last resort safe.
pub(super) fn candidates(locators: &[Locator], parent_name: &str) -> Vec<Candidate> {
    let mut usable: Vec<&Locator> = locators.iter().filter(|l| l.name.is_some()).collect();
    usable.sort_by_key(|l| (priority(l.entry.platform).unwrap_or(u8::MAX), l.entry.index));
    let mut out: Vec<Candidate> = Vec::new();
    for l in usable {
        if let Some(name) = &l.name {
            if !out.iter().any(|c| &c.name == name) {
                out.push(Candidate { label: format!("{} locator", l.platform()), name: name.clone(), fallback: false });
            }
        }
    }
    let base = parent_name.rsplit(['\\', '/']).next().unwrap_or_default();
    if !base.is_empty() && base != "." && base != ".." && !out.iter().any(|c| c.name == base) {
        out.push(Candidate { label: "parent name".into(), name: base.to_string(), fallback: true });
    }
    out
}

/// The unique id of an opened parent layer.
fn unique_id(layer: &Layer) -> Option<[u8; 16]> {
    match layer {
        Layer::Vhd(p) => Some(p.unique_id()),
        _ => None,
    }
}

/// Open the parent: the first candidate the policy allows, that opens as a VHD, and whose
/// footer unique id is `expected` (not checked when the child records the nil id). Returns
/// the layer and the name that found it.
pub(super) fn open_parent(
    ctx: &mut OpenContext<'_>,
    referrer: Option<&Path>,
    candidates: &[Candidate],
    expected: [u8; 16],
    locators: &[Locator],
) -> Result<(Layer, String)> {
    if candidates.is_empty() {
        let list: Vec<String> = locators
            .iter()
            .map(|l| format!("{} {}", l.platform(), l.problem.as_deref().unwrap_or("unusable")))
            .collect();
        let list = if list.is_empty() { "none".to_string() } else { list.join("; ") };
        return Err(VhdError::NoParent(list).into());
    }
    let mut errors: Vec<(Error, bool)> = Vec::new();
    for c in candidates {
        match ctx.open_reference_image(referrer, &c.name, WHAT, Some(Format::Vhd)) {
            Ok(layer) => {
                let found = unique_id(&layer);
                if expected == [0; 16] || found == Some(expected) {
                    return Ok((layer, c.name.clone()));
                }
                let found = found.map_or_else(|| "none".to_string(), |id| uuid_string(&id));
                let e: Error =
                    VhdError::ParentMismatch { name: c.name.clone(), found, expected: uuid_string(&expected) }.into();
                errors.push((e.context(&c.label), c.fallback));
            }
            Err(e) => errors.push((e.context(&c.label), c.fallback)),
        }
    }
    let tried: Vec<String> = candidates.iter().map(|c| format!("{} '{}'", c.label, c.name)).collect();
    // The error to report: a locator's over the last resort's, and one the policy did not
    // cause over a refusal (a refusal says which option would allow the name).
    let rank = |(e, fallback): &(Error, bool)| (*fallback, e.kind() == ErrorKind::ReferenceDenied);
    let pick = (0..errors.len()).min_by_key(|&i| rank(&errors[i])).unwrap_or(0);
    let others: Vec<String> =
        errors.iter().enumerate().filter(|(i, _)| *i != pick).map(|(_, (e, _))| e.to_string()).collect();
    let mut chosen =
        errors.into_iter().nth(pick).map(|(e, _)| e).unwrap_or_else(|| Error::invalid("no VHD parent candidate"));
    if !others.is_empty() {
        chosen = Error::new(chosen.kind(), format!("{chosen}; also: {}", others.join("; ")));
    }
    Err(chosen.context(format!("differencing VHD parent not found (tried {})", tried.join(", "))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn windows_names_become_host_names() {
        assert_eq!(windows_name(".\\parent.vhd").unwrap(), "parent.vhd");
        assert_eq!(windows_name(".\\.\\sub\\p.vhd").unwrap(), "sub/p.vhd");
        assert_eq!(windows_name("..\\base\\p.vhd").unwrap(), "../base/p.vhd");
        assert_eq!(windows_name("/srv/img/p.vhd").unwrap(), "/srv/img/p.vhd");
        assert!(windows_name("C:\\VMs\\p.vhd").is_err());
        assert!(windows_name("\\\\server\\share\\p.vhd").is_err());
        assert!(windows_name("\\\\?\\C:\\p.vhd").is_err());
        assert!(windows_name(".\\").is_err());
    }

    #[test]
    fn mac_urls_become_paths() {
        assert_eq!(mac_url_path("file://localhost/Users/a/My%20Disk.vhd").unwrap(), "/Users/a/My Disk.vhd");
        assert_eq!(mac_url_path("file:///p.vhd").unwrap(), "/p.vhd");
        assert!(mac_url_path("file://server/p.vhd").is_err());
        assert!(mac_url_path("http://x/p.vhd").is_err());
        assert!(mac_url_path("file:///p%zz").is_err());
        assert!(mac_url_path("file:///p%").is_err());
    }

    #[test]
    fn candidates_prefer_relative_and_fall_back_to_the_parent_name() {
        let loc = |index, platform: &[u8; 4], name: &str| Locator {
            entry: LocatorEntry { index, platform: *platform, data_space: 1, data_length: 8, data_offset: 0 },
            text: Some(name.into()),
            name: Some(name.into()),
            problem: None,
            corrupt: false,
        };
        let locs = vec![loc(0, b"W2ku", "/a/p.vhd"), loc(1, b"MacX", "/m/p.vhd"), loc(2, b"W2ru", "p.vhd")];
        let c = candidates(&locs, "C:\\dir\\p.vhd");
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["p.vhd", "/a/p.vhd", "/m/p.vhd"]);
        let c = candidates(&[], "C:\\dir\\q.vhd");
        assert_eq!(c, [Candidate { label: "parent name".into(), name: "q.vhd".into(), fallback: true }]);
        assert!(candidates(&[], "").is_empty());
    }
}
