//! Finding a differencing VDI's parent.
//!
//! A differencing VDI does not name its parent: it records the parent's creation UUID
//! (`uuidLinkage`) and the parent's modification UUID at the time the child was made
//! (`uuidParentModify`); VirtualBox finds the parent through its media registry. vdisk looks
//! beside the child instead: every regular file in the child's directory whose header carries the
//! signature and the recorded creation UUID is a candidate, each name going through the reference
//! gate like any other parent (so `deny`, the default, opens nothing).

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Layer, OpenContext};
use crate::policy::{self, ReferencePolicy};
use crate::probe::Format;

use super::error::VdiError;
use super::header::{self, uuid_string, HEAD_BYTES};

/// Most directory entries looked at when searching for a parent: a VM folder holds a handful of
/// disks and snapshots; a directory of many thousands of files is not one, and reading the header
/// of each would make opening one image arbitrarily slow.
const MAX_PARENT_SCAN: usize = 4096;

/// What the references are called in messages and policy errors.
const WHAT: &str = "VDI parent";

/// Open the parent of the differencing image at `referrer` whose creation UUID is `linkage`,
/// checking its modification UUID against `parent_modify` when the child records one. Returns
/// the layer and the file name that found it.
pub(super) fn open_parent(
    ctx: &mut OpenContext<'_>,
    referrer: Option<&Path>,
    linkage: [u8; 16],
    parent_modify: Option<[u8; 16]>,
) -> Result<(Layer, String)> {
    let uuid = uuid_string(&linkage);
    let policy = ctx.options.references;
    if policy != ReferencePolicy::Deny && ctx.remote_url(referrer).is_some() {
        // The parent is found by listing the child's directory, which HTTP cannot do.
        return Err(Error::new(
            ErrorKind::ReferenceDenied,
            format!("{WHAT} {{{uuid}}} is not opened: a differencing VDI read over HTTP cannot search its directory for the parent"),
        ));
    }
    let Some(referrer) = referrer.filter(|_| policy != ReferencePolicy::Deny) else {
        // The gate's own refusal, with the option that would allow it.
        let label = format!("{{{uuid}}}");
        return Err(match policy::resolve(policy, referrer, &label, WHAT) {
            Err(e) => e,
            Ok(_) => Error::new(ErrorKind::ReferenceDenied, format!("{WHAT} {label} is not opened")),
        });
    };
    let this =
        std::fs::canonicalize(referrer).map_err(|e| Error::io(format!("cannot resolve {}", referrer.display()), e))?;
    let dir = this.parent().map(Path::to_path_buf).unwrap_or_else(|| "/".into());
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        if names.len() >= MAX_PARENT_SCAN {
            return Err(Error::limit(format!(
                "differencing VDI: {} holds more than {MAX_PARENT_SCAN} entries to search for the parent {uuid}",
                dir.display()
            )));
        }
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    let mut looked = 0usize;
    let mut found: Vec<(String, [u8; 16])> = Vec::new();
    for name in names {
        // The gate: symlinks out of the directory, devices and the like are skipped here.
        let Ok(path) = policy::resolve(policy, Some(referrer), &name, WHAT) else { continue };
        if path == this {
            continue;
        }
        looked += 1;
        let Some(h) = read_candidate(&path) else { continue };
        if h.uuid_create == linkage {
            found.push((name, h.uuid_modify));
        }
    }
    if found.is_empty() {
        return Err(VdiError::ParentNotFound { dir: dir.display().to_string(), uuid, looked }.into());
    }
    // Prefer a candidate whose modification UUID is the recorded one (another copy of the parent
    // may have been written since).
    let wanted = parent_modify.filter(|m| *m != [0; 16]);
    let pick = match wanted {
        Some(m) => found.iter().position(|(_, found_modify)| *found_modify == m || *found_modify == [0; 16]),
        None => Some(0),
    };
    let Some(pick) = pick else {
        let (name, found_modify) = &found[0];
        return Err(VdiError::ParentModified {
            name: name.clone(),
            found: uuid_string(found_modify),
            expected: uuid_string(&wanted.unwrap_or_default()),
        }
        .into());
    };
    let name = found[pick].0.clone();
    let layer = ctx.open_reference_image(Some(referrer), &name, WHAT, Some(Format::Vdi))?;
    Ok((layer, name))
}

/// The header of `path` when it is a VDI; `None` for anything else.
fn read_candidate(path: &Path) -> Option<header::VdiHeader> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).ok()?;
    let mut head = vec![0u8; HEAD_BYTES];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    head.truncate(got);
    if !header::has_signature(&head) {
        return None;
    }
    header::parse(&head).ok()
}
