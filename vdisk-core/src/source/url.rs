//! URLs of remote images: recognising them, hiding their secrets, and resolving the names an image
//! stored at a URL gives to other files (backing files, parents, extents).
//!
//! Object stores put credentials in URLs: a presigned S3 URL, an Azure SAS or a GCS signed URL in
//! the query string, an OCI pre-authenticated request in a path segment
//! (`/p/<token>/n/<namespace>/b/<bucket>/o/<object>`). [`redact_url`] replaces each with `...`, and
//! nothing vdisk prints shows a URL any other way.

use crate::error::{Error, ErrorKind, Result};
use crate::policy::ReferencePolicy;

/// True when `s` names a remote object (`http://` or `https://`, any case).
pub fn is_url(s: &str) -> bool {
    let lower = |n: usize| s.get(..n).map(str::to_ascii_lowercase);
    lower(7).as_deref() == Some("http://") || lower(8).as_deref() == Some("https://")
}

/// A URL split into the parts vdisk works with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// `http://` or `https://` as written.
    pub(crate) scheme: &'a str,
    /// `user:password@` when present (with the `@`).
    pub(crate) userinfo: &'a str,
    /// `host[:port]`.
    pub(crate) host: &'a str,
    /// From the first `/` (empty when the URL has no path).
    pub(crate) path: &'a str,
    /// From the `?` (empty when there is no query), without any fragment.
    pub(crate) query: &'a str,
}

/// Split `url` (which [`is_url`] accepts) into its parts; the fragment is dropped.
pub(crate) fn split(url: &str) -> Option<Parts<'_>> {
    if !is_url(url) {
        return None;
    }
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let rest = rest.split('#').next().unwrap_or("");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let (userinfo, host) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    let after = &rest[authority_end..];
    let (path, query) = match after.find('?') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    Some(Parts { scheme: &url[..scheme_end], userinfo, host, path, query })
}

/// `url` with its secrets replaced by `...`: the query string, any `user:password@`, and the
/// token of an OCI pre-authenticated request (`/p/<token>/n/...` becomes `/p/.../n/...`).
///
/// ```
/// use vdisk_core::redact_url;
/// assert_eq!(redact_url("https://s3.example/b/disk.qcow2?X-Amz-Signature=abc"), "https://s3.example/b/disk.qcow2?...");
/// assert_eq!(
///     redact_url("https://os.example/p/SeCrEt/n/ns/b/bkt/o/disk.vmdk"),
///     "https://os.example/p/.../n/ns/b/bkt/o/disk.vmdk"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(p) = split(url) else {
        // Not http(s): still never echo what follows a '?'.
        return match url.find('?') {
            Some(i) => format!("{}?...", &url[..i]),
            None => url.to_string(),
        };
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(p.scheme);
    if !p.userinfo.is_empty() {
        out.push_str("...@");
    }
    out.push_str(p.host);
    let segments: Vec<&str> = p.path.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        let is_par_token = i >= 1 && segments[i - 1] == "p" && segments.get(i + 1) == Some(&"n");
        out.push_str(if is_par_token { "..." } else { seg });
    }
    if !p.query.is_empty() {
        out.push_str("?...");
    }
    out
}

/// Every URL inside free text (an error message from a library) redacted.
pub(crate) fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(i) = lower.find("http://").into_iter().chain(lower.find("https://")).min() else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let end =
            tail.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')')).unwrap_or(tail.len());
        out.push_str(&redact_url(&tail[..end]));
        rest = &tail[end..];
    }
}

/// A stable stand-in for (device, inode) of a remote object, so that chains of URLs find loops
/// the way chains of files do: the object's URL without its query string, hashed (FNV-1a). The
/// device part is `u64::MAX`, which no local device has.
pub(crate) fn pseudo_id(url: &str) -> (u64, u64) {
    let key = match split(url) {
        Some(p) => format!("{}{}{}", p.scheme.to_ascii_lowercase(), p.host.to_ascii_lowercase(), p.path),
        None => url.to_string(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (u64::MAX, h)
}

fn denied(message: String) -> Error {
    Error::new(ErrorKind::ReferenceDenied, message)
}

/// Resolve `name`, found in the image at `referrer` (a URL), into the URL of the object it names,
/// under `policy`. Only relative names are followed, against the referrer's "directory" (its path
/// up to the last `/`, or up to the last `%2F` for object stores that encode an object name's
/// slashes): the scheme, host and port stay those of the referrer, and absolute paths, protocol
/// names and (under `same-dir`) `..` are refused. The referrer's query string is forwarded only
/// under `any` (a presigned signature covers one object; passing it to another leaks it).
pub(crate) fn resolve_reference(policy: ReferencePolicy, referrer: &str, name: &str, what: &str) -> Result<String> {
    if name.is_empty() {
        return Err(Error::invalid(format!("the {what} has an empty name")));
    }
    if name.contains('\0') {
        return Err(Error::invalid(format!("the {what} name contains a NUL byte")));
    }
    let shown = redact_url(name);
    if policy == ReferencePolicy::Deny {
        return Err(denied(format!(
            "{what} '{shown}' is not opened: references are denied by default \
             (allow objects beside the image with --references same-dir, or references=\"same-dir\" in Python)"
        )));
    }
    if name.contains(':') || name.starts_with('/') || name.starts_with('\\') {
        return Err(denied(format!(
            "{what} '{shown}' is an absolute path, a URL or a protocol name; an image read over HTTP may name only \
             objects relative to its own URL"
        )));
    }
    if name.contains(['?', '#', '\\']) || name.chars().any(char::is_control) {
        return Err(denied(format!(
            "{what} '{shown}' contains characters that do not belong in an object name ('?', '#', '\\' or controls)"
        )));
    }
    let base = split(referrer).ok_or_else(|| Error::invalid("internal error: a remote referrer is not a URL"))?;
    // The directory: up to the last '/' or the last "%2F" (OCI writes an object's slashes so).
    let lower = base.path.to_ascii_lowercase();
    let slash = base.path.rfind('/').map(|i| (i + 1, "/"));
    let encoded = lower.rfind("%2f").map(|i| (i + 3, "%2F"));
    let (dir_end, sep) = match (slash, encoded) {
        (Some(s), Some(e)) if e.0 > s.0 => e,
        (Some(s), _) => s,
        (None, Some(e)) => e,
        (None, None) => (0, "/"),
    };
    let mut segments: Vec<String> = Vec::new();
    for seg in name.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if policy == ReferencePolicy::SameDir {
                    return Err(denied(format!(
                        "{what} '{shown}' leaves the image's directory; --references same-dir allows only names inside it \
                         (use --references any to allow it)"
                    )));
                }
                if segments.pop().is_none() {
                    return Err(denied(format!("{what} '{shown}' climbs above the image's directory")));
                }
            }
            other => segments.push(encode_segment(other)),
        }
    }
    if segments.is_empty() {
        return Err(denied(format!("{what} '{shown}' names a directory, not an object")));
    }
    let mut url = String::new();
    url.push_str(base.scheme);
    url.push_str(base.userinfo);
    url.push_str(base.host);
    let dir = &base.path[..dir_end];
    if dir.is_empty() {
        url.push('/');
    } else {
        url.push_str(dir);
    }
    url.push_str(&segments.join(sep));
    if policy == ReferencePolicy::Any {
        url.push_str(base.query);
    }
    Ok(url)
}

/// Percent-encode what may not stand in a URL path segment (RFC 3986 unreserved and sub-delims
/// stay; `%` is encoded too, so a name is taken literally).
fn encode_segment(seg: &str) -> String {
    let mut out = String::with_capacity(seg.len());
    for b in seg.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'@'
            );
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recognised_by_scheme_only() {
        assert!(is_url("http://h/x"));
        assert!(is_url("HTTPS://h/x"));
        assert!(!is_url("/tmp/http://x"));
        assert!(!is_url("ftp://h/x"));
        assert!(!is_url("http:/x"));
    }

    #[test]
    fn redaction_hides_queries_userinfo_and_par_tokens() {
        assert_eq!(redact_url("http://h:8080/a/b.img"), "http://h:8080/a/b.img");
        assert_eq!(redact_url("https://h/a?sig=SECRET&x=1#frag"), "https://h/a?...");
        assert_eq!(redact_url("https://user:SECRET@h/a"), "https://...@h/a");
        assert_eq!(
            redact_url("https://objectstorage.r.oraclecloud.com/p/TOKEN-1/n/ns/b/bkt/o/dir%2Fimg.qcow2"),
            "https://objectstorage.r.oraclecloud.com/p/.../n/ns/b/bkt/o/dir%2Fimg.qcow2"
        );
        // A path that merely has a segment called p keeps it when no n follows.
        assert_eq!(redact_url("http://h/p/q/r"), "http://h/p/q/r");
        let text = redact_text("GET https://h/p/TOK/n/x/b/y/o/z?sig=S failed (http://u:P@h2/a)");
        assert!(!text.contains("TOK") && !text.contains("sig=S") && !text.contains(":P@"), "{text}");
        assert_eq!(text, "GET https://h/p/.../n/x/b/y/o/z?... failed (http://...@h2/a)");
    }

    #[test]
    fn references_resolve_against_the_directory_url() {
        let same = ReferencePolicy::SameDir;
        let r = "http://h:1/dir/top.qcow2?sig=S";
        assert_eq!(resolve_reference(same, r, "base.qcow2", "backing file").unwrap(), "http://h:1/dir/base.qcow2");
        assert_eq!(resolve_reference(same, r, "sub/b c.img", "x").unwrap(), "http://h:1/dir/sub/b%20c.img");
        assert_eq!(resolve_reference(ReferencePolicy::Any, r, "base", "x").unwrap(), "http://h:1/dir/base?sig=S");
        assert_eq!(resolve_reference(ReferencePolicy::Any, r, "o/../base", "x").unwrap(), "http://h:1/dir/base?sig=S");
        // OCI object names keep their slashes encoded.
        let oci = "https://h/p/T/n/ns/b/bk/o/vms%2Fa%2Ftop.vmdk";
        assert_eq!(
            resolve_reference(same, oci, "top-flat.vmdk", "x").unwrap(),
            "https://h/p/T/n/ns/b/bk/o/vms%2Fa%2Ftop-flat.vmdk"
        );
        assert_eq!(resolve_reference(same, "http://h", "a", "x").unwrap(), "http://h/a");
        for (policy, name) in [
            (ReferencePolicy::Deny, "base.qcow2"),
            (same, "/etc/passwd"),
            (ReferencePolicy::Any, "/etc/passwd"),
            (ReferencePolicy::Any, "http://169.254.169.254/latest"),
            (ReferencePolicy::Any, "json:{}"),
            (same, "../base"),
            (ReferencePolicy::Any, "../../../x"),
            (same, "a?b"),
            (same, "."),
        ] {
            let e = resolve_reference(policy, r, name, "backing file").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{policy} {name}: {e}");
            assert!(!e.to_string().contains("sig=S"), "{e}");
        }
    }

    #[test]
    fn pseudo_ids_ignore_the_query_and_the_host_case() {
        assert_eq!(pseudo_id("http://H/a?x=1"), pseudo_id("http://h/a?x=2"));
        assert_ne!(pseudo_id("http://h/a"), pseudo_id("http://h/b"));
        assert_eq!(pseudo_id("http://h/a").0, u64::MAX);
    }
}
