//! Which files an image may make vdisk open.
//!
//! An uploaded image can name other files: a qcow2 backing file or external data file, VMDK
//! descriptor extents and parents, VHD and VHDX parents. Every such name goes through
//! [`resolve`], the one gate, under the caller's [`ReferencePolicy`].

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};

/// What an image may make vdisk open besides the file the caller named.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReferencePolicy {
    /// Open nothing the caller did not name (the default).
    #[default]
    Deny,
    /// Open a relative name that resolves, after symlinks, inside the directory of the image that
    /// names it.
    SameDir,
    /// Open relative and absolute names alike (still only regular files).
    Any,
}

impl ReferencePolicy {
    /// The name used on the command line and in Python (`deny`, `same-dir`, `any`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReferencePolicy::Deny => "deny",
            ReferencePolicy::SameDir => "same-dir",
            ReferencePolicy::Any => "any",
        }
    }
}

impl fmt::Display for ReferencePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReferencePolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "deny" => Ok(ReferencePolicy::Deny),
            "same-dir" | "same_dir" | "samedir" => Ok(ReferencePolicy::SameDir),
            "any" => Ok(ReferencePolicy::Any),
            other => Err(Error::new(
                ErrorKind::InvalidImage,
                format!("unknown reference policy '{other}' (expected deny, same-dir or any)"),
            )),
        }
    }
}

/// Directories whose entries are devices or kernel interfaces, never image files.
const SYSTEM_DIRS: [&str; 3] = ["/dev", "/proc", "/sys"];

fn denied(message: String) -> Error {
    Error::new(ErrorKind::ReferenceDenied, message)
}

/// True for a name qemu would read as a protocol (`json:{...}`, `nbd:host`, `file:x`, ...).
fn is_protocol_name(name: &str) -> bool {
    match name.find(':') {
        Some(i) if i > 0 => {
            let scheme = &name[..i];
            !scheme.contains('/')
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'))
        }
        _ => false,
    }
}

/// Resolve `name`, found in the image at `referrer`, into the path of a regular file that the
/// policy allows to open. `what` names the reference for messages ("backing file", "extent").
///
/// `referrer` is `None` for an image read from memory: nothing is resolved relative to it.
pub fn resolve(policy: ReferencePolicy, referrer: Option<&Path>, name: &str, what: &str) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::invalid(format!("the {what} has an empty name")));
    }
    if name.contains('\0') {
        return Err(Error::invalid(format!("the {what} name contains a NUL byte")));
    }
    if name.starts_with("json:") || is_protocol_name(name) {
        return Err(denied(format!(
            "{what} '{name}' is a protocol or json: name; vdisk never opens these under any reference policy"
        )));
    }
    let Some(referrer) = referrer else {
        return Err(denied(format!("{what} '{name}' cannot be opened for an image read from memory")));
    };
    if policy == ReferencePolicy::Deny {
        return Err(denied(format!(
            "{what} '{name}' is not opened: references are denied by default \
             (allow files beside the image with --references same-dir, or references=\"same-dir\" in Python)"
        )));
    }
    let referrer_dir = referrer_directory(referrer)?;
    let given = Path::new(name);
    let candidate = if given.is_absolute() {
        if policy != ReferencePolicy::Any {
            return Err(denied(format!(
                "{what} '{name}' is an absolute path; --references same-dir allows only names inside the image's directory (use --references any to allow it)"
            )));
        }
        given.to_path_buf()
    } else {
        if policy == ReferencePolicy::SameDir && given.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(denied(format!(
                "{what} '{name}' leaves the image's directory; --references same-dir allows only names inside it (use --references any to allow it)"
            )));
        }
        referrer_dir.join(given)
    };
    let resolved = std::fs::canonicalize(&candidate)
        .map_err(|e| Error::io(format!("cannot open {what} '{name}' ({})", candidate.display()), e))?;
    if policy == ReferencePolicy::SameDir && !resolved.starts_with(&referrer_dir) {
        return Err(denied(format!(
            "{what} '{name}' resolves to {} outside the image's directory {}; --references any would allow it",
            resolved.display(),
            referrer_dir.display()
        )));
    }
    if SYSTEM_DIRS.iter().any(|d| resolved.starts_with(d)) {
        return Err(denied(format!(
            "{what} '{name}' resolves to {}, a system path; vdisk never opens it",
            resolved.display()
        )));
    }
    let meta = std::fs::metadata(&resolved)
        .map_err(|e| Error::io(format!("cannot open {what} '{name}' ({})", resolved.display()), e))?;
    if !meta.file_type().is_file() {
        return Err(denied(format!(
            "{what} '{name}' resolves to {}, which is not a regular file; vdisk opens only regular files as references",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// The canonical directory holding `referrer`.
fn referrer_directory(referrer: &Path) -> Result<PathBuf> {
    let canonical =
        std::fs::canonicalize(referrer).map_err(|e| Error::io(format!("cannot resolve {}", referrer.display()), e))?;
    Ok(canonical.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("top.img");
        std::fs::write(&img, b"x").unwrap();
        std::fs::write(dir.path().join("base.img"), b"y").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/deep.img"), b"z").unwrap();
        (dir, img)
    }

    #[test]
    fn deny_refuses_everything_and_names_the_option() {
        let (_d, img) = setup();
        let e = resolve(ReferencePolicy::Deny, Some(&img), "base.img", "backing file").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied);
        assert!(e.to_string().contains("--references same-dir"), "{e}");
    }

    #[test]
    fn same_dir_allows_relative_names_inside_only() {
        let (d, img) = setup();
        let p = resolve(ReferencePolicy::SameDir, Some(&img), "base.img", "backing file").unwrap();
        assert_eq!(p, std::fs::canonicalize(d.path().join("base.img")).unwrap());
        resolve(ReferencePolicy::SameDir, Some(&img), "sub/deep.img", "extent").unwrap();
        let abs = d.path().join("base.img");
        let e = resolve(ReferencePolicy::SameDir, Some(&img), abs.to_str().unwrap(), "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied);
        let e = resolve(ReferencePolicy::SameDir, Some(&img), "../etc/passwd", "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied);
        // A symlink beside the image that points outside is refused after resolution.
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("link.img")).unwrap();
        let e = resolve(ReferencePolicy::SameDir, Some(&img), "link.img", "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied);
    }

    #[test]
    fn any_allows_absolute_regular_files_but_never_devices_or_protocols() {
        let (d, img) = setup();
        let abs = d.path().join("base.img");
        resolve(ReferencePolicy::Any, Some(&img), abs.to_str().unwrap(), "x").unwrap();
        for name in ["/dev/null", "/proc/self/environ", "json:{\"file\":\"/etc/passwd\"}", "nbd:localhost:10809"] {
            let e = resolve(ReferencePolicy::Any, Some(&img), name, "x").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{name}: {e}");
        }
        let e = resolve(ReferencePolicy::Any, Some(&img), d.path().to_str().unwrap(), "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied);
        let e = resolve(ReferencePolicy::Any, Some(&img), "missing.img", "x").unwrap_err();
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [ReferencePolicy::Deny, ReferencePolicy::SameDir, ReferencePolicy::Any] {
            assert_eq!(p.as_str().parse::<ReferencePolicy>().unwrap(), p);
        }
        assert!("all".parse::<ReferencePolicy>().is_err());
    }
}
