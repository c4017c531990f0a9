//! OVA archives: a tar of an OVF descriptor, an optional manifest, and the disk files of a virtual
//! machine. The disks are read *in place*, as views of the archive's members (no extraction, no
//! temporary copy), so an OVA on any [`ReadAt`] source (a file, and later a URL) reads the same.
//!
//! # What is read
//!
//! - The tar ([`tar`]): ustar, GNU and pax headers; hostile members are refused.
//! - The descriptor ([`ovf`]): the first member named `*.ovf` (DSP0243 puts it first; it is
//!   found anywhere). Its `DiskSection/Disk` elements, in document order, are the disks, numbered
//!   from 1; each names a `References/File`: one member, or the members `href.000000000`,
//!   `href.000000001`, ... of a file split with `ovf:chunkSize`, possibly gzip-compressed.
//! - The manifest ([`manifest`]), the first member named `*.mf`: `check` verifies every digest.
//!
//! The disk's own header is the truth for its format and size: the OVF's `ovf:format` only
//! decides a disk that has no recognisable header (so a placeholder named VMDK is refused rather
//! than read as raw), and an `ovf:capacity` or `ovf:size` that disagrees is reported by `info` and
//! `check`.

mod gzip;
mod manifest;
mod ovf;
mod source;
mod tar;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map, Value};

pub(crate) use gzip::CompressedDisk;

use crate::error::{Error, Result};
use crate::image::{Layer, OpenContext, OpenOptions};
use crate::info::{CheckReport, ImageInfo};
use crate::io::{self, ReadAt};
use crate::probe::{self, Detected, Format};

use manifest::Manifest;
use ovf::{FileCompression, OvfDisk, OvfFile};
use source::{Segment, Segments};
use tar::{Kind, Member};

/// Most chunks of one chunked file: a 4 TiB disk in 1 GiB chunks.
const MAX_CHUNKS: usize = 1 << 16;

/// Where a disk file is stored in the archive.
#[derive(Clone, Debug)]
struct Stored {
    segments: Vec<Segment>,
    /// Bytes stored (the sum of the segments).
    size: u64,
}

/// What the disk inside a file is.
#[derive(Clone, Copy, Debug)]
struct Summary {
    format: Format,
    virtual_size: u64,
}

/// One disk of the OVF.
#[derive(Debug)]
struct Disk {
    /// 1-based, in document order.
    index: u32,
    ovf: OvfDisk,
    /// The file the disk names, when it names one that the References list.
    file: Option<OvfFile>,
    stored: std::result::Result<Stored, String>,
    summary: std::result::Result<Summary, String>,
}

impl Disk {
    fn label(&self) -> String {
        match &self.file {
            Some(f) => format!("disk {} ('{}')", self.index, f.href),
            None => format!("disk {}", self.index),
        }
    }

    /// Differences between the OVF and what is stored.
    fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let (Ok(s), Some(cap)) = (&self.summary, self.ovf.capacity) {
            if s.virtual_size != cap {
                w.push(format!(
                    "the OVF capacity {} ({cap} bytes) differs from the disk's virtual size {}",
                    self.ovf.capacity_text, s.virtual_size
                ));
            }
        }
        if let (Ok(st), Some(f)) = (&self.stored, &self.file) {
            if let Some(declared) = f.size {
                if declared != st.size {
                    w.push(format!("the OVF says the file is {declared} bytes but the archive holds {}", st.size));
                }
            }
        }
        w
    }
}

/// An opened OVA: its members, descriptor, manifest and disks, and which disk is selected.
#[derive(Debug)]
pub(crate) struct Ova {
    src: Arc<dyn ReadAt>,
    options: OpenOptions,
    members: Vec<Member>,
    descriptor: String,
    descriptor_first: bool,
    manifest: Option<(String, Manifest)>,
    disks: Vec<Disk>,
    /// Index into `disks`.
    selected: usize,
    /// The caller chose the disk (or there is only one).
    chosen: bool,
}

/// The member named `name` that is a regular file; an error when it is absent, repeated, or not a
/// regular file.
fn find_member<'a>(members: &'a [Member], name: &str) -> std::result::Result<Option<&'a Member>, String> {
    let mut found = members.iter().filter(|m| m.name == name);
    let Some(first) = found.next() else { return Ok(None) };
    if found.next().is_some() {
        return Err(format!("the archive holds several members named '{name}'"));
    }
    match first.kind {
        Kind::File => Ok(Some(first)),
        Kind::Sparse => Err(format!("member '{name}' is a GNU sparse file, whose data is not stored in place")),
        Kind::Link => Err(format!("member '{name}' is a link, not a regular file")),
        Kind::Directory => Err(format!("member '{name}' is a directory")),
        Kind::Other(t) => Err(format!("member '{name}' is of tar type '{}', not a regular file", t as char)),
    }
}

/// The member name of `name`, found in the folder `dir` of the file that lists it (hrefs and
/// manifest names are relative to it) or, failing that, at the top of the archive.
fn in_folder(members: &[Member], dir: &str, name: &str, probe: &str) -> String {
    if !dir.is_empty() {
        let nested = format!("{dir}/{probe}");
        if members.iter().any(|m| m.name == nested) {
            return format!("{dir}/{name}");
        }
    }
    name.to_string()
}

/// The folder of a member name (`""` at the top of the archive).
fn folder(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(d, _)| d)
}

/// Where the file `f`, listed by a descriptor in folder `dir`, is stored.
fn locate(members: &[Member], f: &OvfFile, dir: &str) -> std::result::Result<Stored, String> {
    let mut href = f.href.as_str();
    while let Some(rest) = href.strip_prefix("./") {
        href = rest;
    }
    if href.is_empty() || href.starts_with('/') || href.contains("://") || href.split('/').any(|c| c == "..") {
        return Err(format!("the OVF file reference '{}' is not a name inside the archive", f.href));
    }
    let probe = match f.chunk_size {
        None => href.to_string(),
        Some(_) => format!("{href}.000000000"),
    };
    let href = in_folder(members, dir, href, &probe);
    let href = href.as_str();
    let mut segments = Vec::new();
    let mut size = 0u64;
    match f.chunk_size {
        None => {
            let m = find_member(members, href)?.ok_or_else(|| format!("the archive holds no member '{href}'"))?;
            segments.push(Segment { start: m.offset, len: m.size });
            size = m.size;
        }
        Some(chunk) => {
            for k in 0..MAX_CHUNKS {
                let name = format!("{href}.{k:09}");
                let Some(m) = find_member(members, &name)? else { break };
                if let Some(prev) = segments.last() {
                    let prev: &Segment = prev;
                    if prev.len != chunk {
                        return Err(format!(
                            "chunk {} of '{href}' holds {} bytes, but every chunk but the last must hold the chunk size {chunk}",
                            k - 1,
                            prev.len
                        ));
                    }
                }
                if m.size > chunk || m.size == 0 {
                    return Err(format!("chunk '{name}' holds {} bytes; the chunk size is {chunk}", m.size));
                }
                segments.push(Segment { start: m.offset, len: m.size });
                size = size.checked_add(m.size).ok_or("the chunk sizes overflow")?;
            }
            if segments.is_empty() {
                return Err(format!(
                    "the file is split into chunks but the archive holds no member '{href}.000000000'"
                ));
            }
            // A later chunk after a missing one means the file has a hole, not an end.
            let prefix = format!("{href}.");
            let found = segments.len();
            let later = members.iter().find(|m| {
                m.name.strip_prefix(&prefix).is_some_and(|n| {
                    n.len() == 9 && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<usize>().is_ok_and(|k| k > found)
                })
            });
            if let Some(m) = later {
                return Err(format!("chunk {found} of '{href}' is missing, but the archive holds '{}'", m.name));
            }
        }
    }
    Ok(Stored { segments, size })
}

/// The format the OVF's `ovf:format` URI names, if any.
fn format_hint(uri: Option<&str>) -> Option<Format> {
    let u = uri?.to_ascii_lowercase();
    if u.contains("vmdk") {
        Some(Format::Vmdk)
    } else if u.contains("vhdx") {
        Some(Format::Vhdx)
    } else if u.contains("vhd") {
        Some(Format::Vhd)
    } else if u.contains("qcow") {
        Some(Format::Qcow2)
    } else if u.contains("vdi") {
        Some(Format::Vdi)
    } else {
        None
    }
}

/// The format to open the uncompressed disk file `view` as: its content's, or, when it has no
/// recognisable header, the one the OVF names (so a placeholder is refused by that reader).
fn disk_format(view: &dyn ReadAt, uri: Option<&str>) -> Result<Format> {
    match probe::detect(view)? {
        Detected::Supported(Format::Raw) => Ok(format_hint(uri).unwrap_or(Format::Raw)),
        Detected::Supported(Format::Ova) => {
            Err(Error::unsupported("the disk file is itself a tar archive (an OVA inside an OVA is not read)"))
        }
        Detected::Supported(f) => Ok(f),
        Detected::Known(name) => Err(Error::unsupported(format!("{name} images are not supported by vdisk"))),
    }
}

/// The stored file of `disk` as a source.
fn view(src: &Arc<dyn ReadAt>, stored: &Stored) -> Arc<Segments> {
    Arc::new(Segments::new(src.clone(), stored.segments.clone()))
}

/// Open the disk `d` only to describe it, in a context of its own.
fn summarize(options: &OpenOptions, src: &Arc<dyn ReadAt>, d: &Disk) -> std::result::Result<Summary, String> {
    let stored = d.stored.as_ref().map_err(Clone::clone)?;
    let file = d.file.as_ref().ok_or("it names no file")?;
    let layer =
        open_disk(&mut OpenContext::new(options, true), file, d, view(src, stored), None).map_err(|e| e.to_string())?;
    Ok(Summary { format: layer.format(), virtual_size: layer.virtual_size() })
}

/// Open the disk file `v` of `d` as a layer in `ctx`; `shown` is the archive's path, under
/// which a disk stored in one piece is reported.
fn open_disk(
    ctx: &mut OpenContext<'_>,
    file: &OvfFile,
    d: &Disk,
    v: Arc<Segments>,
    shown: Option<PathBuf>,
) -> Result<Layer> {
    if file.compression == FileCompression::Gzip {
        return Ok(Layer::Compressed(CompressedDisk::open(v, &file.href, ctx.limits())?));
    }
    let format = disk_format(v.as_ref(), d.ovf.format.as_deref())?;
    let first = ctx.next_file();
    let base = v.single_start();
    let layer = Layer::open(ctx, v, None, None, Some(format))?;
    if let Some(base) = base {
        ctx.set_file_view(first, shown, base);
    }
    Ok(layer)
}

/// Read member `m` whole, bounded by `max`.
fn read_member(ctx: &OpenContext<'_>, src: &dyn ReadAt, m: &Member, max: u64, what: &str) -> Result<Vec<u8>> {
    if m.size > max {
        return Err(Error::limit(format!(
            "the {what} '{}' is {} bytes, more than the {max} bytes vdisk reads",
            m.name, m.size
        )));
    }
    ctx.budget.reserve(what, m.size)?;
    io::read_vec(src, m.offset, m.size, what)
}

/// Open the OVA in `src` and the disk `ctx.options.disk` selects.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    src: Arc<dyn ReadAt>,
    path: Option<PathBuf>,
    id: Option<(u64, u64)>,
) -> Result<(Ova, Layer)> {
    // The archive itself is one of the image's files (so it is never a conversion's target).
    ctx.add_file(src.clone(), path.clone(), id);
    let members = tar::members(&src)?;
    let is = |m: &&Member, ext: &str| m.kind == Kind::File && m.name.to_ascii_lowercase().ends_with(ext);
    let Some(desc) = members.iter().find(|m| is(m, ".ovf")) else {
        let names: Vec<&str> = members.iter().take(8).map(|m| m.name.as_str()).collect();
        return Err(Error::invalid(format!(
            "this tar archive holds no .ovf descriptor, so it is not an OVA (members: {})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        )));
    };
    let descriptor =
        ovf::parse(&read_member(ctx, src.as_ref(), desc, ovf::MAX_DESCRIPTOR_BYTES, "OVF descriptor")?, &desc.name)?;
    let manifest = match members.iter().find(|m| is(m, ".mf")) {
        Some(m) => {
            let text = read_member(ctx, src.as_ref(), m, manifest::MAX_MANIFEST_BYTES, "manifest")?;
            Some((m.name.clone(), manifest::parse(&text)))
        }
        None => None,
    };
    let mut disks = Vec::new();
    for (i, ovf_disk) in descriptor.disks.into_iter().enumerate() {
        let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let file = ovf_disk.file_ref.as_ref().and_then(|r| descriptor.files.iter().find(|f| &f.id == r)).cloned();
        let stored = match (&file, &ovf_disk.file_ref) {
            (Some(f), _) => locate(&members, f, folder(&desc.name)),
            (None, Some(r)) => Err(format!("it names file '{r}', which the OVF's References do not list")),
            (None, None) => Err(format!(
                "it names no file (an empty disk of capacity {} to be created on import)",
                ovf_disk.capacity_text
            )),
        };
        disks.push(Disk { index, ovf: ovf_disk, file, stored, summary: Err(String::new()) });
    }
    let desc_name = desc.name.clone();
    if disks.is_empty() {
        return Err(Error::invalid(format!("OVF descriptor '{desc_name}' declares no disk (DiskSection/Disk)")));
    }
    let count = disks.len();
    let (selected, chosen) = match ctx.options.disk {
        Some(n) => match usize::try_from(n).ok().filter(|&n| (1..=count).contains(&n)) {
            Some(n) => (n - 1, true),
            None => {
                return Err(Error::unsupported(format!(
                    "there is no disk {n}: the OVA holds {count} disk{} ({})",
                    if count == 1 { "" } else { "s" },
                    list_disks(&disks)
                )))
            }
        },
        // By default the only disk, or the first one stored in the archive (conversion then
        // asks for a choice when there are several).
        None => (disks.iter().position(|d| d.stored.is_ok() && d.file.is_some()).unwrap_or(0), count == 1),
    };
    let top = {
        let d = &disks[selected];
        let opened = match (&d.stored, &d.file) {
            (Ok(stored), Some(file)) => open_disk(ctx, file, d, view(&src, stored), path.clone()),
            (Err(why), _) => Err(Error::invalid(why.clone())),
            (Ok(_), None) => Err(Error::invalid("it names no file")),
        };
        opened.map_err(|e| e.context(format!("OVA {}", d.label())))?
    };
    for (i, d) in disks.iter_mut().enumerate() {
        d.summary = if i == selected {
            Ok(Summary { format: top.format(), virtual_size: top.virtual_size() })
        } else {
            summarize(ctx.options, &src, d)
        };
    }
    let descriptor_first = members.first().is_some_and(|m| m.name == desc_name);
    let ova = Ova {
        src,
        options: ctx.options.clone(),
        members,
        descriptor: desc_name,
        descriptor_first,
        manifest,
        disks,
        selected,
        chosen,
    };
    Ok((ova, top))
}

/// `1 'a.vmdk' (vmdk, 10737418240 bytes), 2 ...`
fn list_disks(disks: &[Disk]) -> String {
    let items: Vec<String> = disks
        .iter()
        .map(|d| {
            let name = d.file.as_ref().map_or("no file", |f| f.href.as_str());
            match &d.summary {
                Ok(s) => format!("{} '{name}' ({}, {} bytes)", d.index, s.format, s.virtual_size),
                Err(_) => format!("{} '{name}'", d.index),
            }
        })
        .collect();
    items.join(", ")
}

impl Ova {
    /// The selected disk, 1-based.
    pub(crate) fn selected_index(&self) -> u32 {
        self.disks.get(self.selected).map_or(1, |d| d.index)
    }

    /// Refuse when several disks are held and none was chosen.
    pub(crate) fn require_selected_disk(&self) -> Result<()> {
        if self.chosen {
            return Ok(());
        }
        Err(Error::unsupported(format!(
            "this OVA holds {} disks; choose one with --disk N (disk=N in Python): {}",
            self.disks.len(),
            list_disks(&self.disks)
        )))
    }

    /// `info` of an OVA: the selected disk's size, and every disk in `format-specific`.
    pub(crate) fn describe(&self, info: &mut ImageInfo, top: &Layer) {
        let mut inner = ImageInfo::new(info.filename.clone(), top.format(), top.virtual_size(), None);
        top.describe(&mut inner);
        let disks: Vec<Value> = self
            .disks
            .iter()
            .map(|d| {
                let mut m = Map::new();
                m.insert("index".into(), json!(d.index));
                m.insert("id".into(), json!(d.ovf.disk_id));
                m.insert("file".into(), json!(d.file.as_ref().map(|f| f.href.clone())));
                match &d.summary {
                    Ok(s) => {
                        m.insert("format".into(), json!(s.format.as_str()));
                        m.insert("virtual-size".into(), json!(s.virtual_size));
                    }
                    Err(why) => {
                        m.insert("format".into(), Value::Null);
                        m.insert("virtual-size".into(), Value::Null);
                        m.insert("error".into(), json!(why));
                    }
                }
                m.insert("capacity".into(), json!(d.ovf.capacity));
                if let Some(f) = &d.ovf.format {
                    m.insert("ovf-format".into(), json!(f));
                }
                if let Ok(st) = &d.stored {
                    m.insert("size".into(), json!(st.size));
                    if d.file.as_ref().is_some_and(|f| f.chunk_size.is_some()) {
                        m.insert("chunks".into(), json!(st.segments.len()));
                    }
                } else if let Err(why) = &d.stored {
                    m.insert("error".into(), json!(why));
                }
                if d.file.as_ref().is_some_and(|f| f.compression == FileCompression::Gzip) {
                    m.insert("compression".into(), json!("gzip"));
                }
                let warnings = d.warnings();
                if !warnings.is_empty() {
                    m.insert("warnings".into(), json!(warnings));
                }
                Value::Object(m)
            })
            .collect();
        let mut data = Map::new();
        data.insert("descriptor".into(), json!(self.descriptor));
        if !self.descriptor_first {
            data.insert("descriptor-first".into(), json!(false));
        }
        data.insert("manifest".into(), json!(self.manifest.is_some()));
        if let Some((name, _)) = &self.manifest {
            data.insert("manifest-file".into(), json!(name));
        }
        data.insert("selected-disk".into(), json!(self.selected_index()));
        data.insert("disk-format".into(), json!(top.format().as_str()));
        if let Some(c) = inner.cluster_size {
            data.insert("cluster-size".into(), json!(c));
        }
        if let Some(spec) = inner.format_specific {
            data.insert("disk-format-specific".into(), spec);
        }
        data.insert("disks".into(), Value::Array(disks));
        info.set_format_specific("ova", Value::Object(data));
    }

    /// `check` of an OVA: the manifest's digests, the OVF against the disks, and the disks' own
    /// metadata (the selected one, or all when none was chosen).
    pub(crate) fn check(&self, report: &mut CheckReport, top: &Layer) -> Result<()> {
        self.check_manifest(report)?;
        let only = self.chosen.then_some(self.selected);
        let mut checked = 0;
        for (i, d) in self.disks.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let label = d.label();
            if let Err(why) = &d.stored {
                report.corruption(format!("{label}: {why}"));
                continue;
            }
            for w in d.warnings() {
                report.corruption(format!("{label}: {w}"));
            }
            let mut sub = CheckReport::new(String::new(), Format::Ova);
            if i == self.selected {
                top.check(&mut sub)?;
            } else {
                match self.reopen(d) {
                    Ok(layer) => layer.check(&mut sub)?,
                    Err(e) => sub.corruption(e.to_string()),
                }
            }
            checked += 1;
            // Listed problems are recorded again with the disk's name; those beyond the list's
            // bound are only counted.
            let (mut corruptions, mut leaks) = (sub.corruptions, sub.leaks);
            for p in sub.problems {
                let message = format!("{label}: {}", p.message);
                if p.kind == "leak" {
                    leaks = leaks.saturating_sub(1);
                    report.leak(message);
                } else {
                    corruptions = corruptions.saturating_sub(1);
                    report.corruption(message);
                }
            }
            report.corruptions += corruptions;
            report.leaks += leaks;
            report.check_errors += sub.check_errors;
            if checked == 1 {
                report.total_clusters = sub.total_clusters;
                report.allocated_clusters = sub.allocated_clusters;
            } else {
                report.total_clusters = None;
                report.allocated_clusters = None;
            }
        }
        Ok(())
    }

    /// Open disk `d` again to check it.
    fn reopen(&self, d: &Disk) -> Result<Layer> {
        let stored = d.stored.as_ref().map_err(|why| Error::invalid(why.clone()))?;
        let file = d.file.as_ref().ok_or_else(|| Error::invalid("it names no file"))?;
        open_disk(&mut OpenContext::new(&self.options, true), file, d, view(&self.src, stored), None)
    }

    fn check_manifest(&self, report: &mut CheckReport) -> Result<()> {
        let Some((name, m)) = &self.manifest else { return Ok(()) };
        for p in &m.problems {
            report.corruption(format!("manifest '{name}', {p}"));
        }
        for e in &m.entries {
            if let Some(err) = manifest::refused_name(e) {
                report.corruption(format!("manifest '{name}': {err}"));
                continue;
            }
            let mut listed = e.name.as_str();
            while let Some(rest) = listed.strip_prefix("./") {
                listed = rest;
            }
            let listed = in_folder(&self.members, folder(name), listed, listed);
            let member = match find_member(&self.members, &listed) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    report.corruption(format!("manifest '{name}' lists '{}', which the archive does not hold", e.name));
                    continue;
                }
                Err(why) => {
                    report.corruption(format!("manifest '{name}', line {}: {why}", e.line));
                    continue;
                }
            };
            let got = manifest::digest(self.src.as_ref(), member.offset, member.size, e.algorithm)?;
            if got != e.digest {
                report.corruption(format!(
                    "manifest '{name}': the {} of '{}' is {got}, but the manifest says {}",
                    e.algorithm.as_str(),
                    e.name,
                    e.digest
                ));
            }
        }
        Ok(())
    }
}
