//! VMDK: VMware's virtual disks, in every layout VMware, ESXi and other tools write.
//!
//! A VMDK image is a *descriptor* (text: CID, parent, create type, and a list of extents) plus
//! the *extents* holding the data. The descriptor is either a file of its own whose extents are
//! other files (monolithicFlat, twoGbMaxExtent*, vmfs*, vmfsSparse, seSparse), or embedded in a
//! hosted sparse extent that holds the whole disk itself (monolithicSparse, streamOptimized).
//!
//! | file starts with | what it is | module |
//! |---|---|---|
//! | `KDMV` | hosted sparse extent (monolithicSparse, streamOptimized, twoGb pieces) | [`sparse`], [`header`] |
//! | `COWD` | ESX sparse extent (vmfsSparse snapshots) | [`cowd`] |
//! | `0xcafebabe` (u64) | seSparse extent (ESXi 6.5+ snapshots) | [`sesparse`] |
//! | text | descriptor | [`descriptor`] |
//!
//! Extents named by a descriptor and parents named by `parentFileNameHint` are opened only
//! through the reference policy. A sparse, COWD or seSparse extent opened on its own reads as a
//! disk of its own capacity.
//!
//! Mode modes: RW and RDONLY extents read the same. VMware documents NOACCESS only as "no
//! access" to the extent: its content is not meant to be read at all, so reading it as zeros
//! would silently put a hole in the disk. vdisk refuses to open such an image for reading
//! (describing it still works).
//!
//! Where vdisk deliberately differs from qemu-img 10:
//! - qemu skips extent lines that are not RW (RDONLY, NOACCESS) and ZERO lines, which shifts every
//!   later extent; vdisk reads RDONLY extents in place and ZERO extents as zeros.
//! - qemu refuses createType vmfsThin, vmfsEagerZeroedThick, vmfsPreallocated and other types it
//!   does not list; vdisk goes by the extents and refuses only device types (raw device mappings).
//! - qemu reads the primary grain directory only; vdisk falls back to the redundant one when the
//!   primary names tables or grains outside the file.
//! - qemu reads grains or FLAT bytes past the end of a (truncated) file as zeros; vdisk refuses
//!   such an image at open.
//! - holes of a FLAT extent file map as zero (qemu's map calls them data).

mod cowd;
mod descriptor;
mod grains;
mod header;
mod sesparse;
mod sparse;
pub(crate) mod stream;
pub(crate) mod write;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::extent::{Extent, ExtentKind, FileId, Location};
use crate::image::{ImageFormat, Layer, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::{read_vec, ReadAt};

use cowd::{CowdExtent, COWD_MAGIC};
use descriptor::{Descriptor, ExtentLine, ExtentType, Mode, NO_PARENT_CID};
use grains::{map_grains, GrainLookup};
use header::{read_footer, read_sparse_header, KDMV_MAGIC, SECTOR};
use sesparse::{SeSparseExtent, SESPARSE_MAGIC};
use sparse::SparseExtent;

/// Largest descriptor read (file or embedded): VMware's are a few KiB; a twoGbMaxExtentSparse
/// descriptor of a 62 TiB disk is about 1.3 MiB. 4 MiB bounds the read and the parse.
const MAX_DESCRIPTOR_BYTES: u64 = 4 << 20;

/// Largest data extent of a FLAT extent reported in one piece (keeps copy work items bounded).
const MAX_FLAT_EXTENT: u64 = 1 << 30;

/// createType values naming a physical device: the data is not in any file vdisk could read.
const DEVICE_CREATE_TYPES: [&str; 5] =
    ["vmfsRaw", "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap", "fullDevice", "partitionedDevice"];

/// Where one extent's data is.
#[derive(Debug)]
enum ExtentData {
    /// Plain bytes in `file` from `offset`.
    Flat { file: FileId, src: Arc<dyn ReadAt>, offset: u64 },
    /// Reads as zeros.
    Zero,
    /// A hosted sparse extent.
    Sparse(SparseExtent),
    /// An ESX sparse extent.
    Cowd(CowdExtent),
    /// An seSparse extent.
    SeSparse(SeSparseExtent),
    /// Not opened (describing only).
    Unopened,
}

/// One extent of the disk.
#[derive(Debug)]
struct VExtent {
    /// Virtual offset of its first byte.
    start: u64,
    /// Length in bytes.
    len: u64,
    /// The file name the descriptor gives, or `None` for the image file itself.
    name: Option<String>,
    /// The type as qemu reports it ("" for a monolithic image's own extent).
    type_name: &'static str,
    data: ExtentData,
}

/// A VMDK image: its extents, in order, and its parent.
#[derive(Debug)]
pub(crate) struct VmdkImage {
    size: u64,
    extents: Vec<VExtent>,
    parent: Option<Box<Layer>>,
    parent_hint: Option<String>,
    cid: u32,
    parent_cid: u32,
    create_type: String,
}

fn grain_lookup(data: &ExtentData) -> Option<&dyn GrainLookup> {
    match data {
        ExtentData::Sparse(s) => Some(s),
        ExtentData::Cowd(c) => Some(c),
        ExtentData::SeSparse(s) => Some(s),
        _ => None,
    }
}

/// The first bytes of a file: what kind of VMDK file it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Magic {
    Kdmv,
    Cowd,
    SeSparse,
    Other,
}

fn read_magic(src: &dyn ReadAt) -> Result<Magic> {
    let mut m = [0u8; 8];
    src.read_at_zero_fill(&mut m, 0).map_err(|e| Error::io("reading the VMDK magic", e))?;
    let m32 = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
    Ok(if m32 == KDMV_MAGIC {
        Magic::Kdmv
    } else if m32 == COWD_MAGIC {
        Magic::Cowd
    } else if u64::from_le_bytes(m) == SESPARSE_MAGIC {
        Magic::SeSparse
    } else {
        Magic::Other
    })
}

/// Read descriptor text of `len` bytes at `offset`, bounded by [`MAX_DESCRIPTOR_BYTES`].
fn read_descriptor_text(ctx: &OpenContext<'_>, src: &dyn ReadAt, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    if len > MAX_DESCRIPTOR_BYTES {
        return Err(Error::limit(format!(
            "{what} at {offset:#x} is {len} bytes, more than vdisk reads ({MAX_DESCRIPTOR_BYTES})"
        )));
    }
    ctx.budget.reserve(what, len)?;
    read_vec(src, offset, len, what)
}

/// Open a hosted sparse extent's header, reading the stream footer when the grain directory is
/// at the end.
fn open_kdmv_extent(ctx: &OpenContext<'_>, src: Arc<dyn ReadAt>, file: FileId) -> Result<SparseExtent> {
    let h = read_sparse_header(src.as_ref())?;
    let header = if h.gd_offset.is_none() {
        let mut f = read_footer(src.as_ref())?;
        f.descriptor = h.descriptor;
        f
    } else {
        h
    };
    SparseExtent::open(ctx, src, file, header)
}

/// Open a file named by a SPARSE, VMFSSPARSE or SESPARSE extent line, by its content.
fn open_sparse_file(ctx: &OpenContext<'_>, src: Arc<dyn ReadAt>, file: FileId, name: &str) -> Result<ExtentData> {
    Ok(match read_magic(src.as_ref())? {
        Magic::Kdmv => ExtentData::Sparse(open_kdmv_extent(ctx, src, file)?),
        Magic::Cowd => ExtentData::Cowd(CowdExtent::open(ctx, src, file)?),
        Magic::SeSparse => ExtentData::SeSparse(SeSparseExtent::open(ctx, src, file)?),
        Magic::Other => {
            return Err(Error::invalid(format!(
                "extent '{name}' is not a sparse extent (no KDMV, COWD or seSparse magic at 0x0)"
            )))
        }
    })
}

impl VmdkImage {
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        path: Option<&Path>,
    ) -> Result<Self> {
        match read_magic(src.as_ref())? {
            Magic::Kdmv => Self::open_hosted_sparse(ctx, src, file, path),
            Magic::Cowd => {
                let c = CowdExtent::open(ctx, src, file)?;
                let len = c.capacity;
                Ok(Self::bare(len, "vmfsSparse", ExtentData::Cowd(c)))
            }
            Magic::SeSparse => {
                let s = SeSparseExtent::open(ctx, src, file)?;
                let len = s.capacity;
                Ok(Self::bare(len, "seSparse", ExtentData::SeSparse(s)))
            }
            Magic::Other => {
                let size = src.size();
                if size > MAX_DESCRIPTOR_BYTES {
                    return Err(Error::invalid(format!(
                        "VMDK descriptor of {size} bytes: larger than any descriptor ({MAX_DESCRIPTOR_BYTES} bytes at most)"
                    )));
                }
                let text = read_descriptor_text(ctx, src.as_ref(), 0, size, "descriptor")?;
                let d = descriptor::parse(&text, "descriptor")?;
                Self::open_descriptor(ctx, d, path)
            }
        }
    }

    /// A disk made of one extent that is the image file itself, without a descriptor.
    fn bare(len: u64, create_type: &str, data: ExtentData) -> Self {
        VmdkImage {
            size: len,
            extents: vec![VExtent { start: 0, len, name: None, type_name: "", data }],
            parent: None,
            parent_hint: None,
            cid: 0,
            parent_cid: NO_PARENT_CID,
            create_type: create_type.to_string(),
        }
    }

    /// monolithicSparse / streamOptimized (or a sparse extent opened on its own).
    fn open_hosted_sparse(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        path: Option<&Path>,
    ) -> Result<Self> {
        let h = read_sparse_header(src.as_ref())?;
        let desc = match h.descriptor {
            Some((off, len)) if len > 0 => {
                let len = len.min(src.size().saturating_sub(off));
                let what = format!("embedded descriptor at {off:#x}");
                let text = read_descriptor_text(ctx, src.as_ref(), off, len, &what)?;
                // A descriptor area left blank (the pieces of a twoGbMaxExtentSparse set) means
                // no descriptor: the extent is read on its own.
                if matches!(text.first(), None | Some(0)) {
                    None
                } else {
                    Some(descriptor::parse(&text, &what)?)
                }
            }
            _ => None,
        };
        if let Some(d) = &desc {
            if h.capacity == 0 {
                // A sparse header without capacity only carries a descriptor naming other files.
                return Self::open_descriptor(ctx, d.clone(), path);
            }
            if d.extents.is_empty() {
                return Err(Error::invalid(format!(
                    "embedded descriptor at {:#x}: it lists no extent{}; the disk it describes is unknown",
                    h.descriptor.map_or(0, |d| d.0),
                    if d.keys == 0 { " and no key" } else { "" }
                )));
            }
        }
        let sparse = open_kdmv_extent(ctx, src, file)?;
        let len = sparse.header.capacity;
        let default_type = if sparse.header.compressed { "streamOptimized" } else { "monolithicSparse" };
        let mut image = Self::bare(len, default_type, ExtentData::Sparse(sparse));
        if let Some(d) = desc {
            image.apply_descriptor_keys(&d);
            image.open_parent(ctx, &d, path)?;
        }
        Ok(image)
    }

    fn apply_descriptor_keys(&mut self, d: &Descriptor) {
        if let Some(c) = d.cid {
            self.cid = c;
        }
        if let Some(p) = d.parent_cid {
            self.parent_cid = p;
        }
        if let Some(t) = &d.create_type {
            self.create_type = t.clone();
        }
        self.parent_hint = d.parent_hint.clone();
    }

    /// Follow `parentFileNameHint` under the policy and check the parent's CID.
    fn open_parent(&mut self, ctx: &mut OpenContext<'_>, d: &Descriptor, path: Option<&Path>) -> Result<()> {
        let Some(hint) = &d.parent_hint else { return Ok(()) };
        if ctx.describe_only {
            return Ok(());
        }
        let parent = ctx.open_reference_image(path, hint, "parent", None)?;
        if let Layer::Vmdk(p) = &parent {
            if p.cid != self.parent_cid {
                return Err(Error::invalid(format!(
                    "parent '{hint}' has CID {:08x} but this disk's parentCID is {:08x}: the parent changed after this disk was made (or is the wrong file)",
                    p.cid, self.parent_cid
                )));
            }
        }
        self.parent = Some(Box::new(parent));
        Ok(())
    }

    /// A descriptor file (or a capacity-0 sparse file's embedded descriptor) and its extents.
    fn open_descriptor(ctx: &mut OpenContext<'_>, d: Descriptor, path: Option<&Path>) -> Result<Self> {
        if let Some(ct) = &d.create_type {
            if DEVICE_CREATE_TYPES.iter().any(|t| t.eq_ignore_ascii_case(ct)) {
                return Err(Error::unsupported(format!(
                    "VMDK createType '{ct}': the disk is a physical device (raw device mapping), not a file vdisk can read"
                )));
            }
        }
        if d.extents.is_empty() {
            return Err(Error::invalid("VMDK descriptor lists no extent: there is no data to read"));
        }
        let mut extents = Vec::with_capacity(d.extents.len());
        let mut files = OpenFiles::default();
        let mut start = 0u64;
        for line in &d.extents {
            let len = line.sectors.checked_mul(SECTOR).ok_or_else(|| {
                Error::invalid(format!(
                    "descriptor, line {}: extent size {} sectors overflows",
                    line.line, line.sectors
                ))
            })?;
            let next = start.checked_add(len).ok_or_else(|| Error::invalid("descriptor: extent sizes overflow"))?;
            ctx.limits().check_virtual_size(next)?;
            let (name, data) = Self::open_extent(ctx, line, path, &mut files)?;
            extents.push(VExtent { start, len, name, type_name: line.kind.as_str(), data });
            start = next;
        }
        let mut image = VmdkImage {
            size: start,
            extents,
            parent: None,
            parent_hint: None,
            cid: 0,
            parent_cid: NO_PARENT_CID,
            create_type: String::new(),
        };
        image.apply_descriptor_keys(&d);
        image.open_parent(ctx, &d, path)?;
        Ok(image)
    }

    fn open_extent(
        ctx: &mut OpenContext<'_>,
        line: &ExtentLine,
        path: Option<&Path>,
        files: &mut OpenFiles,
    ) -> Result<(Option<String>, ExtentData)> {
        let at = |msg: String| Error::invalid(format!("descriptor, line {}: {msg}", line.line));
        if matches!(line.kind, ExtentType::VmfsRdm | ExtentType::VmfsRaw) {
            return Err(Error::unsupported(format!(
                "descriptor, line {}: {} extents are raw device mappings: the data is on a physical device, not in a file",
                line.line,
                line.kind.as_str()
            )));
        }
        let name = match &line.file {
            None => None,
            Some(Ok(n)) if n.is_empty() => return Err(at("the extent file name is empty".into())),
            Some(Ok(n)) => Some(n.clone()),
            Some(Err(_)) => return Err(at("the extent file name is not valid UTF-8".into())),
        };
        if ctx.describe_only {
            return Ok((name, ExtentData::Unopened));
        }
        if line.access == Mode::NoAccess {
            return Err(Error::unsupported(format!(
                "descriptor, line {}: the extent is NOACCESS; VMware allows no reads from it, so its content is unknown",
                line.line
            )));
        }
        let data = match (line.kind, &name) {
            (ExtentType::Zero, _) => ExtentData::Zero,
            (_, None) => return Err(at("the extent has no file name".into())),
            (ExtentType::Flat | ExtentType::Vmfs, Some(n)) => {
                let (file, src) = files.open(ctx, path, n)?;
                let offset = line.offset.checked_mul(SECTOR).ok_or_else(|| at("the extent offset overflows".into()))?;
                let need = line.sectors.saturating_mul(SECTOR).saturating_add(offset);
                if src.size() < need {
                    return Err(at(format!(
                        "FLAT extent '{n}' holds {} bytes but the descriptor needs {need} (the file is truncated)",
                        src.size()
                    )));
                }
                ExtentData::Flat { file, src, offset }
            }
            (_, Some(n)) => {
                let (file, src) = files.open(ctx, path, n)?;
                open_sparse_file(ctx, src, file, n).map_err(|e| e.context(format!("extent '{n}'")))?
            }
        };
        Ok((name, data))
    }
}

/// Extent files already opened for one descriptor, so a name listed many times is opened once.
#[derive(Default)]
struct OpenFiles(std::collections::HashMap<String, (FileId, Arc<dyn ReadAt>)>);

impl OpenFiles {
    fn open(
        &mut self,
        ctx: &mut OpenContext<'_>,
        path: Option<&Path>,
        name: &str,
    ) -> Result<(FileId, Arc<dyn ReadAt>)> {
        if let Some((f, s)) = self.0.get(name) {
            return Ok((*f, s.clone()));
        }
        let (file, src, _) = ctx.open_reference_file(path, name, "extent")?;
        self.0.insert(name.to_string(), (file, src.clone()));
        Ok((file, src))
    }
}

/// Map `rel..rel + len` of a FLAT extent at virtual `base`: holes in the file read as zeros,
/// and so does anything past its end.
fn map_flat(
    src: &dyn ReadAt,
    file: FileId,
    foff: u64,
    base: u64,
    rel: u64,
    len: u64,
    out: &mut Vec<Extent>,
) -> Result<()> {
    let at = foff + rel;
    let end = at + len;
    let size = src.size();
    let data = |s: u64, e: u64| {
        Extent::new(
            base + rel + (s - at),
            (e - s).min(MAX_FLAT_EXTENT),
            ExtentKind::Data { layer: 0, location: Location::File { file, offset: s } },
        )
    };
    let zero = |s: u64, e: u64| Extent::new(base + rel + (s - at), e - s, ExtentKind::Zero { layer: 0 });
    if at >= size {
        out.push(zero(at, end));
        return Ok(());
    }
    match src.next_data(at) {
        None => out.push(data(at, end.min(size))),
        Some(Err(e)) => return Err(Error::io(format!("finding data at {at:#x} in a FLAT extent"), e)),
        Some(Ok(None)) => out.push(zero(at, end)),
        Some(Ok(Some((s, e)))) => {
            if s > at {
                out.push(zero(at, s.min(end)));
            }
            if s < end {
                let s = s.max(at);
                out.push(data(s, e.min(end)));
            }
        }
    }
    Ok(())
}

impl ImageFormat for VmdkImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        let e = self.extents.get(i).ok_or_else(|| Error::invalid(format!("no extent holds {offset:#x}")))?;
        let rel = offset - e.start;
        let len = len.min(e.len - rel);
        let parent = self.parent.as_deref();
        match &e.data {
            ExtentData::Flat { file, src, offset: foff } => {
                map_flat(src.as_ref(), *file, *foff, e.start, rel, len, out)
            }
            ExtentData::Zero => {
                out.push(Extent::new(offset, len, ExtentKind::Zero { layer: 0 }));
                Ok(())
            }
            ExtentData::Unopened => Err(Error::invalid("internal error: mapping an extent that was not opened")),
            data => match grain_lookup(data) {
                Some(g) => map_grains(g, e.start, rel, len, parent, out),
                None => Err(Error::invalid("internal error: unknown extent kind")),
            },
        }
    }

    fn describe(&self, info: &mut ImageInfo) {
        let dir = Path::new(&info.filename).parent().map(Path::to_path_buf);
        let resolve = |name: &Option<String>| -> String {
            match name {
                None => info.filename.clone(),
                Some(n) if n.starts_with('/') => n.clone(),
                Some(n) => match &dir {
                    Some(d) if !d.as_os_str().is_empty() => d.join(n).display().to_string(),
                    _ => n.clone(),
                },
            }
        };
        let mut list = Vec::new();
        for e in &self.extents {
            let mut m = Map::new();
            let (cluster, compressed) = match &e.data {
                ExtentData::Sparse(s) => (Some(s.grain_size()), s.header.compressed),
                ExtentData::Cowd(c) => (Some(c.grain_size), false),
                ExtentData::SeSparse(_) => (Some(4096), false),
                _ => (None, false),
            };
            if compressed {
                m.insert("compressed".into(), json!(true));
            }
            m.insert("virtual-size".into(), json!(e.len));
            if e.name.is_some() || !matches!(e.data, ExtentData::Zero) {
                m.insert("filename".into(), json!(resolve(&e.name)));
            }
            if let Some(c) = cluster {
                m.insert("cluster-size".into(), json!(c));
            }
            m.insert("format".into(), json!(e.type_name));
            list.push(Value::Object(m));
        }
        info.cluster_size = self.extents.first().and_then(|e| grain_lookup(&e.data)).map(|g| g.grain_size());
        if let Some(h) = &self.parent_hint {
            info.set_backing(h, None);
        }
        info.set_format_specific(
            "vmdk",
            json!({
                "cid": self.cid,
                "parent-cid": self.parent_cid,
                "create-type": self.create_type,
                "extents": list,
            }),
        );
    }

    fn backing_layer(&self) -> Option<&Layer> {
        self.parent.as_deref()
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        for (i, e) in self.extents.iter().enumerate() {
            let name = e.name.clone().unwrap_or_else(|| format!("extent {i}"));
            match &e.data {
                ExtentData::Sparse(s) => s.check(&name, report)?,
                ExtentData::Cowd(c) => c.check(&name, report),
                ExtentData::SeSparse(s) => s.check(&name, report),
                _ => {}
            }
        }
        Ok(())
    }
}
