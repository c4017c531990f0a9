//! The OVF descriptor: the files it references and the disks it declares, in document order.
//!
//! Only what locates and sizes the disks is read: `References/File` (`href`, `id`, `size`,
//! `compression`, `chunkSize`) and `DiskSection/Disk` (`diskId`, `fileRef`, `capacity` with
//! `capacityAllocationUnits`, `format`, `populatedSize`). Elements and attributes are matched by
//! local name, so OVF 0.9, 1.x and 2.0 namespaces all read. A document type declaration is
//! refused (no entity can be defined, so none can expand), and the document size and node count
//! are bounded.

use crate::error::{Error, Result};

/// Largest descriptor read: real ones are a few KiB to a few hundred KiB (many VMs, long
/// product sections); 16 MiB bounds the read and the parse.
pub(super) const MAX_DESCRIPTOR_BYTES: u64 = 16 << 20;

/// Most XML nodes parsed: a descriptor of 16 MiB holds far fewer; this stops a document made of
/// millions of empty elements early.
const MAX_NODES: u32 = 1 << 20;

/// Most disks or files read from one descriptor: a VM with hundreds of disks is already unusual.
pub(super) const MAX_OVF_ITEMS: usize = 4096;

/// How a referenced file is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FileCompression {
    None,
    Gzip,
}

/// A `References/File` element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct OvfFile {
    pub(super) id: String,
    pub(super) href: String,
    /// `ovf:size`: the file's size in bytes (stored, i.e. compressed where compressed).
    pub(super) size: Option<u64>,
    pub(super) compression: FileCompression,
    /// `ovf:chunkSize`: the file is split into members `href.000000000`, `href.000000001`, ...
    pub(super) chunk_size: Option<u64>,
}

/// A `DiskSection/Disk` element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct OvfDisk {
    pub(super) disk_id: String,
    pub(super) file_ref: Option<String>,
    /// The capacity in bytes, when it could be read.
    pub(super) capacity: Option<u64>,
    /// The capacity as written (`capacity` and its units), for messages.
    pub(super) capacity_text: String,
    /// The `ovf:format` URI.
    pub(super) format: Option<String>,
}

/// What the descriptor says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Descriptor {
    pub(super) files: Vec<OvfFile>,
    pub(super) disks: Vec<OvfDisk>,
}

fn attr<'a>(node: &roxmltree::Node<'a, '_>, local: &str) -> Option<&'a str> {
    node.attributes().find(|a| a.name() == local).map(|a| a.value())
}

/// Parse `capacity` in `units` (`byte`, `byte * 2^N`, `byte * 10^N`, `byte * N`, or the old
/// `KiloBytes`/`MegaBytes`/`GigaBytes`) into bytes.
pub(super) fn capacity_bytes(capacity: &str, units: Option<&str>) -> Option<u64> {
    let value: u64 = capacity.trim().parse().ok()?;
    let units: String = units.unwrap_or("byte").chars().filter(|c| !c.is_whitespace()).collect();
    let factor: u64 = match units.to_ascii_lowercase().as_str() {
        "" | "byte" | "bytes" => 1,
        "kilobytes" => 1 << 10,
        "megabytes" => 1 << 20,
        "gigabytes" => 1 << 30,
        "terabytes" => 1 << 40,
        u => {
            let rest = u.strip_prefix("byte*")?;
            if let Some(exp) = rest.strip_prefix("2^") {
                let e: u32 = exp.parse().ok()?;
                1u64.checked_shl(e).filter(|_| e < 64)?
            } else if let Some(exp) = rest.strip_prefix("10^") {
                10u64.checked_pow(exp.parse().ok()?)?
            } else {
                rest.parse().ok()?
            }
        }
    };
    value.checked_mul(factor)
}

/// Parse the descriptor text.
pub(super) fn parse(bytes: &[u8], name: &str) -> Result<Descriptor> {
    let bad = |why: String| Error::invalid(format!("OVF descriptor '{name}': {why}"));
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    if bytes.starts_with(b"\xff\xfe") || bytes.starts_with(b"\xfe\xff") {
        return Err(Error::unsupported(format!("OVF descriptor '{name}' is UTF-16; vdisk reads UTF-8 descriptors")));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8 text ({e})")))?;
    let options = roxmltree::ParsingOptions { allow_dtd: false, nodes_limit: MAX_NODES, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| match e {
        roxmltree::Error::DtdDetected => {
            bad("it has a document type declaration (<!DOCTYPE>), which vdisk refuses (entity definitions)".into())
        }
        roxmltree::Error::NodesLimitReached => {
            Error::limit(format!("OVF descriptor '{name}' has more than {MAX_NODES} XML nodes"))
        }
        other => bad(format!("not well-formed XML: {other}")),
    })?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(bad(format!("the root element is <{}>, not an OVF <Envelope>", root.tag_name().name())));
    }
    let mut d = Descriptor::default();
    for node in root.descendants().filter(|n| n.is_element()) {
        let parent = node.parent_element().map(|p| p.tag_name().name()).unwrap_or("");
        match node.tag_name().name() {
            "File" if parent == "References" => {
                if d.files.len() >= MAX_OVF_ITEMS {
                    return Err(Error::limit(format!(
                        "OVF descriptor '{name}' references more than {MAX_OVF_ITEMS} files"
                    )));
                }
                let href = attr(&node, "href").ok_or_else(|| bad("a References/File has no href".into()))?;
                let id = attr(&node, "id").unwrap_or("").to_string();
                let number = |key: &str| -> Result<Option<u64>> {
                    match attr(&node, key) {
                        None => Ok(None),
                        Some(v) => v
                            .trim()
                            .parse::<u64>()
                            .map(Some)
                            .map_err(|_| bad(format!("file '{href}': {key} '{v}' is not a number"))),
                    }
                };
                let compression = match attr(&node, "compression").map(str::trim) {
                    None | Some("") | Some("identity") => FileCompression::None,
                    Some(c) if c.eq_ignore_ascii_case("gzip") => FileCompression::Gzip,
                    Some(other) => {
                        return Err(Error::unsupported(format!(
                            "OVF file '{href}' is compressed with '{other}'; vdisk reads gzip"
                        )))
                    }
                };
                let chunk_size = number("chunkSize")?;
                if chunk_size == Some(0) {
                    return Err(bad(format!("file '{href}': chunkSize is 0")));
                }
                d.files.push(OvfFile { id, href: href.to_string(), size: number("size")?, compression, chunk_size });
            }
            "Disk" if parent.ends_with("DiskSection") || parent == "Section" => {
                if d.disks.len() >= MAX_OVF_ITEMS {
                    return Err(Error::limit(format!(
                        "OVF descriptor '{name}' declares more than {MAX_OVF_ITEMS} disks"
                    )));
                }
                let capacity = attr(&node, "capacity").unwrap_or("");
                let units = attr(&node, "capacityAllocationUnits");
                let capacity_text = match units {
                    Some(u) => format!("{capacity} ({u})"),
                    None => capacity.to_string(),
                };
                d.disks.push(OvfDisk {
                    disk_id: attr(&node, "diskId").unwrap_or("").to_string(),
                    file_ref: attr(&node, "fileRef").map(str::to_string),
                    capacity: capacity_bytes(capacity, units),
                    capacity_text,
                    format: attr(&node, "format").map(str::to_string),
                });
            }
            _ => {}
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="7804077568"/>
    <File ovf:href="disk2.vmdk.gz" ovf:id="file2" ovf:compression="gzip" ovf:chunkSize="1048576"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="50" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="1048576" ovf:diskId="vmdisk2" ovf:fileRef="file2"/>
  </DiskSection>
</Envelope>"#;

    #[test]
    fn reads_files_and_disks_in_order() {
        let d = parse(OVF.as_bytes(), "x.ovf").unwrap();
        assert_eq!(d.files.len(), 2);
        assert_eq!(d.files[0].size, Some(7804077568));
        assert_eq!(d.files[1].compression, FileCompression::Gzip);
        assert_eq!(d.files[1].chunk_size, Some(1 << 20));
        assert_eq!(d.disks[0].capacity, Some(50 << 30));
        assert_eq!(d.disks[1].capacity, Some(1 << 20));
        assert_eq!(d.disks[1].file_ref.as_deref(), Some("file2"));
    }

    #[test]
    fn units() {
        assert_eq!(capacity_bytes("4", Some("byte * 2^20")), Some(4 << 20));
        assert_eq!(capacity_bytes("4", Some("byte*2^10")), Some(4096));
        assert_eq!(capacity_bytes("3", Some("MegaBytes")), Some(3 << 20));
        assert_eq!(capacity_bytes("2", Some("byte * 10^3")), Some(2000));
        assert_eq!(capacity_bytes("${disk.size}", None), None);
        assert_eq!(capacity_bytes("1", Some("byte * 2^64")), None);
        assert_eq!(capacity_bytes(&u64::MAX.to_string(), Some("byte * 2^1")), None);
    }

    #[test]
    fn refuses_dtds_and_non_ovf() {
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><Envelope>&lol2;</Envelope>"#;
        let e = parse(bomb.as_bytes(), "b.ovf").unwrap_err();
        assert!(e.to_string().contains("document type declaration"), "{e}");
        assert!(parse(b"<html/>", "h.ovf").unwrap_err().to_string().contains("not an OVF"));
        assert!(parse(b"<Envelope><References>", "t.ovf").unwrap_err().to_string().contains("well-formed"));
    }
}
