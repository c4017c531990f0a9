//! Finding a differencing disk's parent through its locator, under the reference policy.

use std::path::Path;

use super::error::corrupt;
use super::guid::Guid;
use super::metadata::ParentLocator;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Layer, OpenContext};
use crate::probe::Format;

/// What the reference is called in messages and policy errors.
const WHAT: &str = "VHDX parent";

/// The parent's identity as the child's locator records it.
#[derive(Clone, Debug)]
pub(crate) struct Linkage {
    /// `parent_linkage`: the parent's DataWriteGuid.
    pub(crate) primary: Guid,
    /// `parent_linkage2`, when present and non-zero: an alternative accepted DataWriteGuid.
    pub(crate) secondary: Option<Guid>,
}

impl Linkage {
    /// Read the linkage keys of `loc` (`at`: the metadata region's offset, for messages).
    pub(crate) fn from_locator(loc: &ParentLocator, at: u64) -> Result<Linkage> {
        let text = loc
            .get("parent_linkage")
            .ok_or_else(|| corrupt("parent locator", at, "the required key parent_linkage is missing"))?;
        let primary = Guid::parse(text)
            .ok_or_else(|| corrupt("parent locator", at, format!("parent_linkage '{text}' is not a GUID")))?;
        let secondary = match loc.get("parent_linkage2") {
            None => None,
            Some(t) => Some(
                Guid::parse(t)
                    .ok_or_else(|| corrupt("parent locator", at, format!("parent_linkage2 '{t}' is not a GUID")))?,
            )
            .filter(|g| !g.is_zero()),
        };
        Ok(Linkage { primary, secondary })
    }

    /// True when a parent whose DataWriteGuid is `guid` is the one this child was made from.
    pub(crate) fn accepts(&self, guid: Guid) -> bool {
        guid == self.primary || self.secondary == Some(guid)
    }
}

/// The names to try for the parent, in the specification's order, converted to this system's
/// separators: `relative_path`, then `absolute_win32_path` with its drive letter dropped.
/// `volume_path` (`\\?\Volume{GUID}\...`) names a Windows volume and cannot be resolved here.
pub(crate) fn candidates(loc: &ParentLocator) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(rel) = loc.get("relative_path").filter(|s| !s.is_empty()) {
        out.push(("relative_path", rel.replace('\\', "/")));
    }
    if let Some(abs) = loc.get("absolute_win32_path").filter(|s| !s.is_empty()) {
        let unix = abs.replace('\\', "/");
        let bytes = unix.as_bytes();
        let stripped = match bytes {
            [d, b':', b'/', ..] if d.is_ascii_alphabetic() => unix.get(2..).unwrap_or_default().to_string(),
            _ => unix.clone(),
        };
        out.push(("absolute_win32_path", stripped));
    }
    out
}

/// The name `describe` reports as the backing file: the relative path where there is one.
pub(crate) fn display_name(loc: &ParentLocator) -> Option<String> {
    candidates(loc).into_iter().next().map(|(_, n)| n).or_else(|| loc.get("volume_path").map(str::to_string))
}

/// Open the parent: each candidate name in turn, under the policy, keeping the first whose
/// DataWriteGuid matches the linkage. A policy refusal of the first candidate is final; a
/// missing file moves on to the next name.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    path: Option<&Path>,
    loc: &ParentLocator,
    linkage: &Linkage,
    data_write_guid_of: impl Fn(&Layer) -> Option<Guid>,
) -> Result<Layer> {
    let names = candidates(loc);
    if names.is_empty() {
        return Err(Error::invalid(format!(
            "the {WHAT} locator has no relative_path or absolute_win32_path that vdisk could resolve{}",
            loc.get("volume_path").map(|v| format!(" (only volume_path '{v}')")).unwrap_or_default()
        )));
    }
    let mut first_error: Option<Error> = None;
    let mut mismatch: Option<Error> = None;
    for (i, (key, name)) in names.iter().enumerate() {
        match ctx.open_reference_image(path, name, WHAT, Some(Format::Vhdx)) {
            Ok(layer) => {
                let found = data_write_guid_of(&layer);
                match found {
                    Some(g) if linkage.accepts(g) => return Ok(layer),
                    _ => {
                        let shown = found.map_or_else(|| "none".to_string(), |g| format!("{{{g}}}"));
                        mismatch.get_or_insert_with(|| {
                            Error::invalid(format!(
                                "{WHAT} '{name}' (from {key}) is not this disk's parent: its DataWriteGuid {shown} differs from parent_linkage {{{}}}{}",
                                linkage.primary,
                                linkage.secondary.map(|g| format!(" and parent_linkage2 {{{g}}}")).unwrap_or_default()
                            ))
                        });
                    }
                }
            }
            Err(e) => {
                let missing = e.kind() == ErrorKind::Io && e.io_kind() == Some(std::io::ErrorKind::NotFound);
                if i == 0 && !missing {
                    return Err(e);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    Err(mismatch.or(first_error).unwrap_or_else(|| Error::invalid(format!("the {WHAT} could not be opened"))))
}
