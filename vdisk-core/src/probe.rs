//! Format detection by content, never by file name.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};
use crate::io::ReadAt;

/// The disk image formats vdisk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// Raw bytes: a plain file or a block device.
    Raw,
    /// QEMU copy-on-write version 2 and 3.
    Qcow2,
    /// VMware virtual disk: sparse, stream-optimized, seSparse, COWD and descriptor files.
    Vmdk,
    /// Microsoft Virtual PC / Hyper-V VHD (qemu calls it `vpc`).
    Vhd,
    /// Microsoft Hyper-V VHDX.
    Vhdx,
    /// VirtualBox disk image (versions 0 and 1.1; static, dynamic and differencing).
    Vdi,
    /// An OVA archive (a tar of an OVF descriptor and disk files): not a disk format but a
    /// container; opening one opens the disk it holds (see `OpenOptions::disk`).
    Ova,
}

impl Format {
    /// qemu-img's name for the format (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`), or `ova`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Ova => "ova",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = Error;

    /// Parses qemu-img's `-f` names; `vhd` is accepted as an alias of `vpc`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vpc" | "vhd" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            "vdi" => Ok(Format::Vdi),
            "ova" => Ok(Format::Ova),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown format '{other}' (expected raw, qcow2, vmdk, vpc/vhd, vhdx, vdi or ova)"),
            )),
        }
    }
}

/// Bytes read from the start of a file to detect its format; a VMDK text descriptor is looked for
/// within this window (VMware embeds descriptors of at most a few KiB; 64 KiB leaves margin).
pub(crate) const PROBE_HEAD_BYTES: usize = 64 << 10;

/// Size of the footer region examined at the end of the file (VHD footer, DMG trailer).
const PROBE_TAIL_BYTES: usize = 512;

/// What the content says a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Detected {
    /// A format vdisk reads.
    Supported(Format),
    /// A recognisable format vdisk refuses, with its name.
    Known(&'static str),
}

/// Detect the format of `src` from its content.
pub(crate) fn detect(src: &dyn ReadAt) -> Result<Detected> {
    let size = src.size();
    let head_len = usize::try_from(size.min(PROBE_HEAD_BYTES as u64)).unwrap_or(PROBE_HEAD_BYTES);
    let mut head = vec![0u8; head_len];
    src.read_at_zero_fill(&mut head, 0).map_err(|e| Error::io("reading the image header", e))?;
    let tail_len = size.min(PROBE_TAIL_BYTES as u64);
    let mut tail = vec![0u8; usize::try_from(tail_len).unwrap_or(PROBE_TAIL_BYTES)];
    if tail_len > 0 {
        src.read_at_zero_fill(&mut tail, size - tail_len).map_err(|e| Error::io("reading the image footer", e))?;
    }
    Ok(detect_bytes(&head, &tail))
}

/// Detect from the first bytes (`head`) and the last up-to-512 bytes (`tail`) of a file.
pub(crate) fn detect_bytes(head: &[u8], tail: &[u8]) -> Detected {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = head.get(4..8).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(1) => Detected::Known("qcow (version 1)"),
            _ => Detected::Supported(Format::Qcow2),
        };
    }
    if at(0, b"vhdxfile") {
        return Detected::Supported(Format::Vhdx);
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, &SESPARSE_MAGIC) {
        return Detected::Supported(Format::Vmdk);
    }
    if at(0, b"conectix") {
        return Detected::Supported(Format::Vhd);
    }
    if at(0, b"QED\0") {
        return Detected::Known("QED");
    }
    // VDI: by the signature, never by the pre-header text (it is free text).
    if at(0x40, &VDI_SIGNATURE) {
        return Detected::Supported(Format::Vdi);
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        return Detected::Known("Parallels");
    }
    if at(0, b"Bochs Virtual HD Image") {
        return Detected::Known("Bochs");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Detected::Known("LUKS");
    }
    if at(0, b"#!/bin/sh") && head.len() >= 32 && contains(&head[..head.len().min(256)], b"cloop") {
        return Detected::Known("cloop");
    }
    // A POSIX (`ustar\0`) or GNU (`ustar  \0`) tar: read as an OVA (the container says whether
    // it holds an OVF descriptor).
    if at(257, b"ustar") {
        return Detected::Supported(Format::Ova);
    }
    if tail.len() == PROBE_TAIL_BYTES && tail.starts_with(b"koly") {
        return Detected::Known("DMG");
    }
    if tail.len() == PROBE_TAIL_BYTES && tail.starts_with(b"conectix") {
        return Detected::Supported(Format::Vhd);
    }
    if looks_like_vmdk_descriptor(head) {
        return Detected::Supported(Format::Vmdk);
    }
    Detected::Supported(Format::Raw)
}

/// The VDI signature 0xbeda107f (little-endian) at offset 64.
const VDI_SIGNATURE: [u8; 4] = [0x7f, 0x10, 0xda, 0xbe];

/// The seSparse header magic, 0xcafebabe as a little-endian u64.
const SESPARSE_MAGIC: [u8; 8] = [0xbe, 0xba, 0xfe, 0xca, 0, 0, 0, 0];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A VMDK text descriptor: text (possibly NUL-padded) whose first meaningful line is
/// `version=N` or which carries the `# Disk DescriptorFile` banner and a `createType`.
pub(crate) fn looks_like_vmdk_descriptor(head: &[u8]) -> bool {
    let text_end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    // Everything after the first NUL must be padding.
    if head[text_end..].iter().any(|&b| b != 0) {
        return false;
    }
    let text = &head[..text_end];
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    if text.is_empty() || text.iter().any(|&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t')) {
        return false;
    }
    let Ok(text) = std::str::from_utf8(text) else {
        // A descriptor with mangled bytes still names itself in ASCII.
        return contains(text, b"# Disk DescriptorFile") && contains(text, b"createType");
    };
    let mut banner = false;
    let mut create_type = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            banner |= line.trim_start_matches('#').trim().eq_ignore_ascii_case("Disk DescriptorFile");
            continue;
        }
        let key = line.split('=').next().unwrap_or("").trim();
        if key.eq_ignore_ascii_case("version") && !banner && !create_type {
            return true;
        }
        create_type |= key.eq_ignore_ascii_case("createType");
    }
    banner && create_type
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> Vec<u8> {
        let mut v = bytes.to_vec();
        v.resize(1024, 0);
        v
    }

    #[test]
    fn detects_supported_magics() {
        assert_eq!(detect_bytes(&head(b"QFI\xfb\0\0\0\x03"), &[]), Detected::Supported(Format::Qcow2));
        assert_eq!(detect_bytes(&head(b"QFI\xfb\0\0\0\x01"), &[]), Detected::Known("qcow (version 1)"));
        assert_eq!(detect_bytes(&head(b"vhdxfile"), &[]), Detected::Supported(Format::Vhdx));
        assert_eq!(detect_bytes(&head(b"KDMV"), &[]), Detected::Supported(Format::Vmdk));
        assert_eq!(detect_bytes(&head(b"conectix"), &[]), Detected::Supported(Format::Vhd));
        let mut tail = b"conectix".to_vec();
        tail.resize(512, 0);
        assert_eq!(detect_bytes(&head(b"\xeb\x63\x90"), &tail), Detected::Supported(Format::Vhd));
        assert_eq!(detect_bytes(&head(b"hello"), &[0; 512]), Detected::Supported(Format::Raw));
    }

    #[test]
    fn detects_descriptors_including_nul_padded_and_crlf() {
        let d = b"# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\ncreateType=\"monolithicFlat\"\r\n";
        assert_eq!(detect_bytes(&head(d), &[]), Detected::Supported(Format::Vmdk));
        assert_eq!(detect_bytes(b"version=1\ncreateType=\"vmfs\"\n", &[]), Detected::Supported(Format::Vmdk));
        // Text that is not a descriptor stays raw; so does binary with a descriptor-looking start.
        assert_eq!(detect_bytes(&head(b"hello world\n"), &[]), Detected::Supported(Format::Raw));
        let mut bin = head(b"version=1\n");
        bin[600] = 7;
        assert_eq!(detect_bytes(&bin, &[]), Detected::Supported(Format::Raw));
    }

    #[test]
    fn refuses_known_foreign_formats_by_name() {
        assert_eq!(detect_bytes(&head(b"QED\0"), &[]), Detected::Known("QED"));
        assert_eq!(detect_bytes(&head(b"WithoutFreeSpace"), &[]), Detected::Known("Parallels"));
        assert_eq!(detect_bytes(&head(b"Bochs Virtual HD Image"), &[]), Detected::Known("Bochs"));
        let mut koly = b"koly".to_vec();
        koly.resize(512, 0);
        assert_eq!(detect_bytes(&head(b"x"), &koly), Detected::Known("DMG"));
    }

    #[test]
    fn detects_vdi_by_signature_and_tar_by_magic() {
        // Any pre-header text, or none: the signature decides.
        let mut vdi = head(b"<<< QEMU VM Virtual Disk Image >>>\n");
        vdi[0x40..0x44].copy_from_slice(&VDI_SIGNATURE);
        assert_eq!(detect_bytes(&vdi, &[]), Detected::Supported(Format::Vdi));
        vdi[..64].fill(0);
        assert_eq!(detect_bytes(&vdi, &[]), Detected::Supported(Format::Vdi));
        assert_eq!(
            detect_bytes(&head(b"<<< Oracle VM VirtualBox Disk Image >>>\n"), &[]),
            Detected::Supported(Format::Raw)
        );
        let mut tar = head(b"disk.ovf");
        tar[257..263].copy_from_slice(b"ustar\0");
        assert_eq!(detect_bytes(&tar, &[]), Detected::Supported(Format::Ova));
        tar[257..265].copy_from_slice(b"ustar  \0");
        assert_eq!(detect_bytes(&tar, &[]), Detected::Supported(Format::Ova));
    }

    #[test]
    fn format_names_match_qemu() {
        assert_eq!("vhd".parse::<Format>().unwrap(), Format::Vhd);
        assert_eq!(Format::Vhd.to_string(), "vpc");
        assert_eq!("vdi".parse::<Format>().unwrap(), Format::Vdi);
        assert_eq!(Format::Ova.to_string(), "ova");
        assert!("vdx".parse::<Format>().is_err());
    }
}
