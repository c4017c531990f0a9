//! The OVA manifest (`.mf`): one line per file, `SHA256(name)= hex` (also written
//! `SHA256 (name) = hex`), with SHA1, SHA256 or SHA512 digests.

use sha1::Digest;

use crate::error::{Error, Result};
use crate::io::ReadAt;

/// Largest manifest read: one short line per file of the archive.
pub(super) const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Bytes hashed per read while verifying.
const HASH_CHUNK_BYTES: usize = 1 << 20;

/// A digest algorithm of the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "SHA1" => Some(Algorithm::Sha1),
            "SHA256" => Some(Algorithm::Sha256),
            "SHA512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// One line of the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) algorithm: Algorithm,
    pub(super) name: String,
    /// Lowercase hex.
    pub(super) digest: String,
    pub(super) line: usize,
}

/// The manifest: its entries, and the lines that could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Manifest {
    pub(super) entries: Vec<Entry>,
    pub(super) problems: Vec<String>,
}

/// Parse the manifest text.
pub(super) fn parse(bytes: &[u8]) -> Manifest {
    let mut m = Manifest::default();
    let text = String::from_utf8_lossy(bytes);
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok((algorithm, name, digest)) => m.entries.push(Entry { algorithm, name, digest, line: i + 1 }),
            Err(why) => m.problems.push(format!("line {}: {why}", i + 1)),
        }
    }
    m
}

fn parse_line(line: &str) -> std::result::Result<(Algorithm, String, String), String> {
    let eq = line.rfind('=').ok_or("no '='")?;
    let (left, hex) = (line[..eq].trim_end(), line[eq + 1..].trim());
    let open = left.find('(').ok_or("no '(' before the name")?;
    let name = left.strip_suffix(')').ok_or("no ')' after the name")?;
    let name = name.get(open + 1..).ok_or("no name")?;
    let alg_name = left[..open].trim();
    let algorithm =
        Algorithm::parse(alg_name).ok_or_else(|| format!("digest '{alg_name}' is not SHA1, SHA256 or SHA512"))?;
    if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the {} digest of '{name}' is not {} hex digits", algorithm.as_str(), algorithm.hex_len()));
    }
    Ok((algorithm, name.to_string(), hex.to_ascii_lowercase()))
}

/// The digest of `len` bytes of `src` from `start`, as lowercase hex.
pub(super) fn digest(src: &dyn ReadAt, start: u64, len: u64, algorithm: Algorithm) -> Result<String> {
    fn run<D: Digest>(src: &dyn ReadAt, start: u64, len: u64) -> Result<Vec<u8>> {
        let mut h = D::new();
        let mut buf = vec![0u8; HASH_CHUNK_BYTES];
        let mut pos = 0u64;
        while pos < len {
            let n = usize::try_from((len - pos).min(HASH_CHUNK_BYTES as u64)).unwrap_or(HASH_CHUNK_BYTES);
            crate::io::read_exact(src, &mut buf[..n], start + pos, "a file listed in the manifest")?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(h.finalize().to_vec())
    }
    let bytes = match algorithm {
        Algorithm::Sha1 => run::<sha1::Sha1>(src, start, len)?,
        Algorithm::Sha256 => run::<sha2::Sha256>(src, start, len)?,
        Algorithm::Sha512 => run::<sha2::Sha512>(src, start, len)?,
    };
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `e` names a file that is not a plain relative name.
pub(super) fn refused_name(e: &Entry) -> Option<Error> {
    (e.name.starts_with('/') || e.name.split('/').any(|c| c == ".."))
        .then(|| Error::invalid(format!("manifest line {}: '{}' is not a name inside the archive", e.line, e.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemSource;
    use std::sync::Arc;

    #[test]
    fn both_spellings_and_problems() {
        let sha1_abc = "a9993e364706816aba3e25717850c26c9cd0d89d";
        let text =
            format!("SHA1(disk1.vmdk)= {sha1_abc}\r\nSHA256 (vm.ovf) = {}\nMD5(x)= 00\nSHA1(y)= 12\n", "0".repeat(64));
        let m = parse(text.as_bytes());
        assert_eq!(m.entries.len(), 2);
        assert_eq!(m.entries[0].name, "disk1.vmdk");
        assert_eq!(m.entries[1].algorithm, Algorithm::Sha256);
        assert_eq!(m.problems.len(), 2, "{:?}", m.problems);
        let src = MemSource(Arc::from(&b"xxabcxx"[..]));
        assert_eq!(digest(&src, 2, 3, Algorithm::Sha1).unwrap(), sha1_abc);
        assert_eq!(
            digest(&src, 2, 3, Algorithm::Sha256).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
