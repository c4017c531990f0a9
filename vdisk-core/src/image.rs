//! Opening images: detection, the reference gate, chains, and the one [`Image`] type.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::container;
use crate::decompress::{self, ReadScratch};
use crate::error::{Error, Result};
use crate::extent::{Extent, ExtentKind, FileId, Location, Merger, SequentialStream};
use crate::formats;
use crate::info::{CheckReport, ImageInfo};
use crate::io::{FileSource, ReadAt};
use crate::limits::{Limits, MetadataBudget};
use crate::policy::{self, ReferencePolicy};
use crate::probe::{self, Detected, Format};
use crate::source::{self, HttpOptions, HttpSource};

/// How to open an image.
///
/// ```
/// use vdisk_core::{OpenOptions, ReferencePolicy};
/// let opts = OpenOptions { references: ReferencePolicy::SameDir, ..OpenOptions::default() };
/// assert!(opts.format.is_none());
/// ```
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format, or `None` to detect it from the content.
    pub format: Option<Format>,
    /// Which files the image may make vdisk open.
    pub references: ReferencePolicy,
    /// Resource limits.
    pub limits: Limits,
    /// For an OVA archive: which disk to open, 1-based in the OVF's order. `None` opens the only
    /// disk, or the first of several (conversion then refuses until one is chosen). Any other
    /// image refuses a disk number.
    pub disk: Option<u32>,
    /// How to read `http://` and `https://` sources (connections, retries, timeout, headers).
    pub http: HttpOptions,
}

/// What each format reader provides; the rest of the crate sees images only through this.
pub(crate) trait ImageFormat: Send + Sync + fmt::Debug {
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Append to `out` extents covering a non-empty prefix of `offset..offset + len`, in order and
    /// without gaps, starting exactly at `offset`. `len > 0` and the range lies inside the virtual
    /// size. Layers are relative to this image (0 = itself). A reader returns as much as it can
    /// cheaply (one table's worth); the caller asks again for the rest.
    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()>;

    /// Fill in the format's part of `info` (cluster size, backing file, format-specific, ...).
    fn describe(&self, info: &mut ImageInfo);

    /// Walk all metadata and record corruptions and leaks in `report`.
    fn check(&self, report: &mut CheckReport) -> Result<()>;

    /// The backing file or parent this layer falls through to, if it has one open.
    fn backing_layer(&self) -> Option<&Layer> {
        None
    }

    /// For a disk that can only be read front to back (a gzip-compressed OVA member): its
    /// content as a stream of units. `None` for every random-access reader.
    fn sequential(&self) -> Option<Result<SequentialStream>> {
        None
    }
}

/// One opened layer of any format (enum dispatch over the format readers).
#[derive(Debug)]
pub(crate) enum Layer {
    Raw(formats::raw::RawImage),
    Qcow2(formats::qcow2::Qcow2Image),
    Vmdk(formats::vmdk::VmdkImage),
    Vhd(formats::vhd::VhdImage),
    Vhdx(formats::vhdx::VhdxImage),
    Vdi(formats::vdi::VdiImage),
    /// A disk file compressed as a whole inside an OVA (gzip): readable only front to back.
    Compressed(container::ova::CompressedDisk),
}

impl Layer {
    fn reader(&self) -> &dyn ImageFormat {
        match self {
            Layer::Raw(r) => r,
            Layer::Qcow2(r) => r,
            Layer::Vmdk(r) => r,
            Layer::Vhd(r) => r,
            Layer::Vhdx(r) => r,
            Layer::Vdi(r) => r,
            Layer::Compressed(r) => r,
        }
    }

    pub(crate) fn format(&self) -> Format {
        match self {
            Layer::Raw(_) => Format::Raw,
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Vmdk(_) => Format::Vmdk,
            Layer::Vhd(_) => Format::Vhd,
            Layer::Vhdx(_) => Format::Vhdx,
            Layer::Vdi(_) => Format::Vdi,
            Layer::Compressed(r) => r.format(),
        }
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.reader().virtual_size()
    }

    pub(crate) fn describe(&self, info: &mut ImageInfo) {
        self.reader().describe(info)
    }

    pub(crate) fn check(&self, report: &mut CheckReport) -> Result<()> {
        self.reader().check(report)
    }

    /// Layers below this one in its chain (0 without a backing file).
    pub(crate) fn chain_below(&self) -> u32 {
        let mut depth = 0u32;
        let mut layer = self;
        while let Some(b) = layer.reader().backing_layer() {
            depth = depth.saturating_add(1);
            layer = b;
        }
        depth
    }

    /// [`ImageFormat::map`], with its contract verified so a reader bug becomes an error, never
    /// a wrong copy.
    pub(crate) fn map_checked(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let first = out.len();
        let end = offset.checked_add(len).filter(|&e| e <= self.virtual_size()).ok_or_else(|| {
            Error::invalid(format!("internal error: map of {offset:#x}+{len:#x} past the virtual size"))
        })?;
        self.reader().map(offset, len, out)?;
        let mut pos = offset;
        for e in &out[first..] {
            if e.start != pos || e.len == 0 || e.end() > end || e.start.checked_add(e.len).is_none() {
                return Err(Error::invalid(format!(
                    "internal error: the {} reader mapped {e:?} while asked for {offset:#x}..{end:#x} at {pos:#x}",
                    self.format()
                )));
            }
            pos = e.end();
        }
        if pos == offset {
            return Err(Error::invalid(format!(
                "internal error: the {} reader mapped nothing at {offset:#x}",
                self.format()
            )));
        }
        Ok(())
    }
}

/// Map `offset..offset + len` of an overlay's backing (`None` when there is none) as the overlay
/// sees it: every extent one layer deeper, the whole range covered, and anything past the
/// backing file's end unallocated (reads of a shorter backing file return zeros).
pub(crate) fn map_backing(backing: Option<&Layer>, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    if let Some(b) = backing {
        let covered_end = end.min(b.virtual_size());
        while pos < covered_end {
            let first = out.len();
            b.map_checked(pos, covered_end - pos, out)?;
            for e in &mut out[first..] {
                e.kind = e.kind.deeper(1);
            }
            pos = out.last().map_or(covered_end, Extent::end);
        }
    }
    if pos < end {
        out.push(Extent::new(pos, end - pos, ExtentKind::Unallocated));
    }
    Ok(())
}

/// Collects one `map` call's extents for a format with a backing file or parent: merges
/// neighbours and sends each run the backing provides through [`map_backing`] in one piece.
#[derive(Debug)]
pub(crate) struct Emitter<'a> {
    out: &'a mut Vec<Extent>,
    first: usize,
    backing: Option<&'a Layer>,
    pending: Option<(u64, u64)>,
}

impl<'a> Emitter<'a> {
    /// Append to `out`, falling through to `backing` (or unallocated when `None`).
    pub(crate) fn new(out: &'a mut Vec<Extent>, backing: Option<&'a Layer>) -> Self {
        Emitter { first: out.len(), out, backing, pending: None }
    }

    /// Extents emitted by this call so far.
    pub(crate) fn count(&self) -> usize {
        self.out.len() - self.first + usize::from(self.pending.is_some())
    }

    /// Append `e`, merged into the previous extent of this call where it continues it.
    pub(crate) fn push(&mut self, e: Extent) -> Result<()> {
        self.flush()?;
        if self.out.len() > self.first {
            if let Some(last) = self.out.last_mut() {
                if last.try_merge(&e) {
                    return Ok(());
                }
            }
        }
        self.out.push(e);
        Ok(())
    }

    /// `start..start + len` is allocated nowhere in this layer: the backing provides it.
    pub(crate) fn fall_through(&mut self, start: u64, len: u64) -> Result<()> {
        match self.pending {
            Some((s, l)) if s + l == start => self.pending = Some((s, l + len)),
            _ => {
                self.flush()?;
                self.pending = Some((start, len));
            }
        }
        Ok(())
    }

    /// Map the pending fall-through run; call once at the end of `map`.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if let Some((s, l)) = self.pending.take() {
            map_backing(self.backing, s, l, self.out)?;
        }
        Ok(())
    }
}

/// One file held open by an image.
#[derive(Debug)]
struct OpenFile {
    src: Arc<dyn ReadAt>,
    path: Option<PathBuf>,
    id: Option<(u64, u64)>,
    /// For a view of part of `path` (a disk inside an OVA): where the view starts in that file.
    /// Extents report locations in `path` (offsets plus this), and reads take it off again.
    base: u64,
}

/// State shared while an image and its references are being opened.
#[derive(Debug)]
pub(crate) struct OpenContext<'a> {
    pub(crate) options: &'a OpenOptions,
    pub(crate) budget: Arc<MetadataBudget>,
    /// True when only describing: readers record references but do not open them.
    pub(crate) describe_only: bool,
    files: Vec<OpenFile>,
    /// (device, inode) of each image on the path from the top to the one being opened.
    chain: Vec<(u64, u64)>,
    /// Remote sources opened so far, by the (redacted) path they are shown as: the names they
    /// give to other objects resolve against their URLs, never against the local file system.
    remote: Vec<(PathBuf, Arc<HttpSource>)>,
}

impl<'a> OpenContext<'a> {
    pub(crate) fn new(options: &'a OpenOptions, describe_only: bool) -> Self {
        OpenContext {
            options,
            budget: Arc::new(MetadataBudget::new(options.limits.max_metadata_bytes)),
            describe_only,
            files: Vec::new(),
            chain: Vec::new(),
            remote: Vec::new(),
        }
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> &Limits {
        &self.options.limits
    }

    pub(crate) fn add_file(&mut self, src: Arc<dyn ReadAt>, path: Option<PathBuf>, id: Option<(u64, u64)>) -> FileId {
        let index = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
        self.files.push(OpenFile { src, path, id, base: 0 });
        FileId(index)
    }

    /// The number of files registered so far: the id the next one will get.
    pub(crate) fn next_file(&self) -> FileId {
        FileId(u32::try_from(self.files.len()).unwrap_or(u32::MAX))
    }

    /// Say that `file` is the part of `path` starting at `base` (a disk stored in one piece inside
    /// an OVA), so that extents name offsets in `path`.
    pub(crate) fn set_file_view(&mut self, file: FileId, path: Option<PathBuf>, base: u64) {
        if let Some(f) = self.files.get_mut(file.index()) {
            f.path = path;
            f.base = base;
        }
    }

    /// The URL behind `referrer` when it is a remote source opened in this context.
    pub(crate) fn remote_url(&self, referrer: Option<&Path>) -> Option<String> {
        let referrer = referrer?;
        self.remote.iter().find(|(p, _)| p == referrer).map(|(_, s)| s.url())
    }

    /// Resolve `name`, found in the image at `referrer`, under the policy: a local file, or, for
    /// an image read over HTTP, the object at the URL it names relative to its own.
    fn resolve(&self, referrer: Option<&Path>, name: &str, what: &str) -> Result<Resolved> {
        match self.remote_url(referrer) {
            Some(base) => {
                source::url::resolve_reference(self.options.references, &base, name, what).map(Resolved::Remote)
            }
            None => policy::resolve(self.options.references, referrer, name, what).map(Resolved::Local),
        }
    }

    /// Open what [`OpenContext::resolve`] found.
    fn open_resolved(&mut self, target: Resolved, what: &str) -> Result<OpenedSource> {
        match target {
            Resolved::Remote(url) => self.open_remote(&url),
            Resolved::Local(path) => {
                let (src, id) = open_source(&path, what)?;
                Ok((src, path, id))
            }
        }
    }

    /// Open the object at `url`; it is shown (in messages, `info`, extents) as its redacted URL.
    fn open_remote(&mut self, url: &str) -> Result<OpenedSource> {
        let src = Arc::new(HttpSource::open(url, &self.options.http)?);
        let shown = PathBuf::from(src.shown_url());
        self.remote.push((shown.clone(), src.clone()));
        Ok((src, shown, source::url::pseudo_id(url)))
    }

    /// Open `name`, found in the image at `referrer`, as a plain file (a qcow2 data file, a VMDK
    /// flat extent), under the reference policy.
    pub(crate) fn open_reference_file(
        &mut self,
        referrer: Option<&Path>,
        name: &str,
        what: &str,
    ) -> Result<(FileId, Arc<dyn ReadAt>, PathBuf)> {
        let target = self.resolve(referrer, name, what)?;
        let (src, path, id) = self.open_resolved(target, what)?;
        let file = self.add_file(src.clone(), Some(path.clone()), Some(id));
        Ok((file, src, path))
    }

    /// Open `name`, found in the image at `referrer`, as an image of `format` (detected when
    /// `None`): a backing file or parent. Checks the policy, the chain depth and loops.
    pub(crate) fn open_reference_image(
        &mut self,
        referrer: Option<&Path>,
        name: &str,
        what: &str,
        format: Option<Format>,
    ) -> Result<Layer> {
        let target = self.resolve(referrer, name, what)?;
        let max = self.options.limits.max_chain_depth;
        if self.chain.len() >= max as usize {
            return Err(Error::limit(format!(
                "{what} '{}' would make the chain deeper than the limit of {max} images (raise max_chain_depth / --max-chain-depth)",
                source::redact_url(name)
            )));
        }
        let (src, path, id) = self.open_resolved(target, what)?;
        if self.chain.contains(&id) {
            return Err(Error::invalid(format!(
                "{what} '{name}' ({}) is already in the chain: the references form a loop",
                path.display()
            )));
        }
        Layer::open(self, src, Some(path.clone()), Some(id), format).map_err(|e| e.in_file(&path))
    }

    /// Replace the source behind an already registered `file` with a view of it (a VHDX log
    /// replayed in memory): every later read of that file, `Location::File` extents included,
    /// goes through `src`. The path and identity recorded for the file stay as they were.
    pub(crate) fn replace_source(&mut self, file: FileId, src: Arc<dyn ReadAt>) -> Result<()> {
        let entry = self
            .files
            .get_mut(file.index())
            .ok_or_else(|| Error::invalid("internal error: replacing the source of an unknown file"))?;
        entry.src = src;
        Ok(())
    }
}

/// A source opened for an image: the bytes, the path it is shown as, its (device, inode) or
/// stand-in.
type OpenedSource = (Arc<dyn ReadAt>, PathBuf, (u64, u64));

/// Where a reference resolved to.
#[derive(Debug)]
enum Resolved {
    Local(PathBuf),
    Remote(String),
}

/// Open `path` read-only as a source, refusing what is not a regular file or block device.
fn open_source(path: &Path, what: &str) -> Result<(Arc<dyn ReadAt>, (u64, u64))> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("cannot open {what} {}", path.display()), e))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::io_with_message(
            format!("{} is a directory", path.display()),
            std::io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(Error::unsupported(format!("{} is not a regular file or block device", path.display())));
    }
    let file = File::open(path).map_err(|e| Error::io(format!("cannot open {what} {}", path.display()), e))?;
    let src = FileSource::new(file).map_err(|e| Error::io(format!("cannot read {what} {}", path.display()), e))?;
    Ok((Arc::new(src), (meta.dev(), meta.ino())))
}

impl Layer {
    /// Open one layer from `src`, detecting the format unless `format` is given.
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        path: Option<PathBuf>,
        id: Option<(u64, u64)>,
        format: Option<Format>,
    ) -> Result<Layer> {
        let format = match format {
            Some(f) => f,
            None => match probe::detect(src.as_ref())? {
                Detected::Supported(f) => f,
                Detected::Known(name) => return Err(Error::unsupported(unsupported_format_message(name))),
            },
        };
        let file = ctx.add_file(src.clone(), path.clone(), id);
        if let Some(id) = id {
            ctx.chain.push(id);
        }
        let p = path.as_deref();
        let opened = match format {
            Format::Raw => formats::raw::RawImage::open(ctx, src, file).map(Layer::Raw),
            Format::Qcow2 => formats::qcow2::Qcow2Image::open(ctx, src, file, p).map(Layer::Qcow2),
            Format::Vmdk => formats::vmdk::VmdkImage::open(ctx, src, file, p).map(Layer::Vmdk),
            Format::Vhd => formats::vhd::VhdImage::open(ctx, src, file, p).map(Layer::Vhd),
            Format::Vhdx => formats::vhdx::VhdxImage::open(ctx, src, file, p).map(Layer::Vhdx),
            Format::Vdi => formats::vdi::VdiImage::open(ctx, src, file, p).map(Layer::Vdi),
            Format::Ova => Err(Error::unsupported(
                "an OVA archive cannot be a backing file, a parent, an extent or a disk inside another OVA",
            )),
        };
        if id.is_some() {
            ctx.chain.pop();
        }
        let layer = opened?;
        ctx.options.limits.check_virtual_size(layer.virtual_size())?;
        Ok(layer)
    }
}

/// The refusal for a recognised format vdisk does not read.
fn unsupported_format_message(name: &str) -> String {
    format!("{name} images are not supported by vdisk")
}

/// An open disk image, with its whole chain, ready to be read from many threads.
///
/// ```
/// # fn main() -> vdisk_core::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// std::fs::write(&path, vec![7u8; 4096]).unwrap();
/// let image = vdisk_core::Image::open(&path, &Default::default())?;
/// assert_eq!(image.format(), vdisk_core::Format::Raw);
/// assert_eq!(image.virtual_size(), 4096);
/// let mut buf = [0u8; 16];
/// image.read_at(&mut buf, 100)?;
/// assert_eq!(buf, [7u8; 16]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Image {
    top: Layer,
    files: Vec<OpenFile>,
    path: Option<PathBuf>,
    max_unit_bytes: u64,
    max_metadata_bytes: u64,
    /// The archive `top` was opened from (an OVA), with its other disks.
    container: Option<Box<container::ova::Ova>>,
    /// For an image with remote sources: the requests each may have in flight.
    remote_connections: Option<usize>,
}

impl Image {
    /// Open the image at `path` and everything it references that `options` allows.
    ///
    /// A `path` whose text starts with `http://` or `https://` is read over HTTP with range
    /// requests (see [`HttpOptions`]); the image is then shown everywhere (messages, `info`,
    /// [`Image::path`]) by its URL with any secret replaced by `...`, and the names it gives to
    /// other objects resolve against its URL, never to local files.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image> {
        Self::open_inner(path.as_ref(), options, false)
    }

    /// Describe the image at `path` (as `qemu-img info` does) without opening its references.
    pub fn describe(path: impl AsRef<Path>, options: &OpenOptions) -> Result<ImageInfo> {
        let path = path.as_ref();
        let image = Self::open_inner(path, options, true)?;
        Ok(image.info())
    }

    /// Check the image at `path` (as `qemu-img check` does): its own metadata only, without
    /// opening its references.
    pub fn check_file(path: impl AsRef<Path>, options: &OpenOptions) -> Result<CheckReport> {
        let image = Self::open_inner(path.as_ref(), options, true)?;
        let shown = image.path.clone().unwrap_or_default();
        image.check().map_err(|e| e.in_file(&shown))
    }

    /// Open an image held in memory (or any [`ReadAt`] source); it may reference no other file.
    pub fn from_source(src: Arc<dyn ReadAt>, options: &OpenOptions) -> Result<Image> {
        let mut ctx = OpenContext::new(options, false);
        let (top, container) = Self::open_top(&mut ctx, src, None, None)?;
        Ok(Image {
            top,
            files: ctx.files,
            path: None,
            max_unit_bytes: options.limits.max_unit_bytes,
            max_metadata_bytes: options.limits.max_metadata_bytes,
            container,
            remote_connections: None,
        })
    }

    fn open_inner(path: &Path, options: &OpenOptions, describe_only: bool) -> Result<Image> {
        let mut ctx = OpenContext::new(options, describe_only);
        let (src, path, id) = match path.to_str().filter(|s| source::is_url(s)) {
            Some(url) => ctx.open_remote(url)?,
            None => {
                let (src, id) = open_source(path, "image")?;
                (src, path.to_path_buf(), id)
            }
        };
        let (top, container) =
            Self::open_top(&mut ctx, src, Some(path.clone()), Some(id)).map_err(|e| e.in_file(&path))?;
        let remote_connections = (!ctx.remote.is_empty()).then_some(options.http.connections.max(1));
        Ok(Image {
            top,
            files: ctx.files,
            path: Some(path),
            max_unit_bytes: options.limits.max_unit_bytes,
            max_metadata_bytes: options.limits.max_metadata_bytes,
            container,
            remote_connections,
        })
    }

    /// The threads a copy or a hash uses when the caller does not say: every core, and for an
    /// image read over HTTP at least one per connection (those threads mostly wait on the network).
    pub(crate) fn default_threads(&self) -> usize {
        let cores = crate::copy::default_threads();
        self.remote_connections.map_or(cores, |n| cores.max(n))
    }

    /// True when some of the image's bytes come from a remote (HTTP) source.
    pub fn is_remote(&self) -> bool {
        self.remote_connections.is_some()
    }

    /// The limit on compressed units held in memory.
    pub(crate) fn max_unit_bytes(&self) -> u64 {
        self.max_unit_bytes
    }

    /// The limit on metadata held in memory.
    pub(crate) fn max_metadata_bytes(&self) -> u64 {
        self.max_metadata_bytes
    }

    /// Open the file the caller named: an image, or an OVA archive and the disk chosen in it.
    fn open_top(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        path: Option<PathBuf>,
        id: Option<(u64, u64)>,
    ) -> Result<(Layer, Option<Box<container::ova::Ova>>)> {
        let format = match ctx.options.format {
            Some(f) => f,
            None => match probe::detect(src.as_ref())? {
                Detected::Supported(f) => f,
                Detected::Known(name) => return Err(Error::unsupported(unsupported_format_message(name))),
            },
        };
        if format == Format::Ova {
            let (ova, top) = container::ova::open(ctx, src, path, id)?;
            return Ok((top, Some(Box::new(ova))));
        }
        if let Some(n) = ctx.options.disk {
            return Err(Error::unsupported(format!(
                "a disk number ({n}) selects a disk of an OVA archive; this is a {format} image, which holds one disk"
            )));
        }
        Ok((Layer::open(ctx, src, path, id, Some(format))?, None))
    }

    /// The detected (or given) format of the top image (`Ova` for a disk opened inside an OVA).
    pub fn format(&self) -> Format {
        if self.container.is_some() {
            return Format::Ova;
        }
        self.top.format()
    }

    /// The format of the disk being read: the image's own, or, inside an OVA, the selected disk's.
    pub fn disk_format(&self) -> Format {
        self.top.format()
    }

    /// Inside an OVA, the selected disk (1-based, in the OVF's order); `None` for other images.
    pub fn disk(&self) -> Option<u32> {
        self.container.as_ref().map(|c| c.selected_index())
    }

    /// Refuse to go on when this is an OVA of several disks and none was chosen: writing the wrong
    /// disk to a volume is the mistake to avoid. The error lists the disks.
    pub fn require_selected_disk(&self) -> Result<()> {
        match &self.container {
            Some(c) => c.require_selected_disk(),
            None => Ok(()),
        }
    }

    /// The content as a front-to-back stream, for a disk that cannot be read at random.
    pub(crate) fn sequential(&self) -> Option<Result<SequentialStream>> {
        self.top.reader().sequential()
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.top.virtual_size()
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Images below the top one in its backing chain (qemu's `depth` of an unallocated range).
    pub fn chain_depth(&self) -> u32 {
        self.top.chain_below()
    }

    /// The paths of every file this image reads (itself, backing files, extents), in open order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().filter_map(|f| f.path.as_deref())
    }

    /// The identity of every source this image reads, in open order (see [`ReadAt::identity`]):
    /// a resume journal records them to tell whether a later run reads the same bytes.
    pub fn source_identities(&self) -> Vec<Option<String>> {
        self.files.iter().map(|f| f.src.identity()).collect()
    }

    /// The path of the file behind `file` (from an extent's location), if it has one.
    pub fn file_path(&self, file: FileId) -> Option<&Path> {
        self.files.get(file.index()).and_then(|f| f.path.as_deref())
    }

    /// (device, inode) of every file this image reads, to refuse writing onto one of them.
    pub(crate) fn file_ids(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.files.iter().filter_map(|f| f.id)
    }

    /// What `qemu-img info` reports, with the same keys.
    pub fn info(&self) -> ImageInfo {
        let filename = self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let actual_size = self
            .path
            .as_ref()
            .filter(|p| !p.to_str().is_some_and(source::is_url))
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.blocks().saturating_mul(512));
        let mut info = ImageInfo::new(filename, self.format(), self.virtual_size(), actual_size);
        match &self.container {
            Some(c) => c.describe(&mut info, &self.top),
            None => self.top.describe(&mut info),
        }
        info
    }

    /// Walk all metadata of the top image and report corruptions and leaks.
    pub fn check(&self) -> Result<CheckReport> {
        let mut report =
            CheckReport::new(self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), self.format());
        match &self.container {
            Some(c) => c.check(&mut report, &self.top)?,
            None => self.top.check(&mut report)?,
        }
        Ok(report)
    }

    /// The extents of the whole virtual disk.
    pub fn extents(&self) -> Extents<'_> {
        Extents::new(self, 0, self.virtual_size())
    }

    /// The extents covering `start..end` (clamped to the virtual size), clipped to that range.
    pub fn extents_in(&self, start: u64, end: u64) -> Extents<'_> {
        let end = end.min(self.virtual_size());
        Extents::new(self, start.min(end), end)
    }

    /// Read guest bytes at `offset` into `buf`; returns how many were read, fewer only at the end
    /// of the virtual disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.virtual_size();
        if offset >= size {
            return Ok(0);
        }
        let n = usize::try_from((size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        let end = offset + n as u64;
        let mut scratch = ReadScratch::default();
        for extent in self.extents_in(offset, end) {
            let extent = extent?;
            let from = usize::try_from(extent.start - offset).unwrap_or(0);
            let to = usize::try_from(extent.end() - offset).unwrap_or(n);
            self.read_extent(&extent, &mut buf[from..to], &mut scratch)?;
        }
        Ok(n)
    }

    /// Fill `buf` with the first `buf.len()` bytes of `extent` (no more than its length), reading
    /// its location directly: a pread for stored bytes, a decompression for compressed ones,
    /// zeros otherwise. `scratch` is reused between calls to avoid allocations.
    pub fn read_extent(&self, extent: &Extent, buf: &mut [u8], scratch: &mut ReadScratch) -> Result<()> {
        let n = (buf.len() as u64).min(extent.len);
        let buf = &mut buf[..usize::try_from(n).unwrap_or(0)];
        match extent.kind {
            ExtentKind::Data { location, .. } => self.read_location(&location, buf, scratch),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_location(&self, location: &Location, buf: &mut [u8], scratch: &mut ReadScratch) -> Result<()> {
        let file = self
            .files
            .get(location.file().index())
            .ok_or_else(|| Error::invalid("internal error: extent names an unknown file"))?;
        let relative = |at: u64| {
            at.checked_sub(file.base).ok_or_else(|| {
                Error::invalid(format!("internal error: location {at:#x} lies before the start of its file view"))
            })
        };
        match location {
            Location::File { offset, .. } => {
                file.src.read_at_zero_fill(buf, relative(*offset)?).map_err(|e| {
                    let name = file.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "image".into());
                    Error::io(format!("reading {name} at {offset:#x}"), e)
                })?;
                Ok(())
            }
            Location::Compressed(unit) => {
                let unit = crate::extent::CompressedUnit { offset: relative(unit.offset)?, ..*unit };
                decompress::read_unit(file.src.as_ref(), &unit, buf, scratch, self.max_unit_bytes)
            }
        }
    }

    pub(crate) fn map_checked(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let first = out.len();
        self.top.map_checked(offset, len, out)?;
        // Locations inside a file view (a disk stored inside an OVA) become offsets in the file.
        for e in &mut out[first..] {
            if let ExtentKind::Data { location, .. } = &mut e.kind {
                let base = self.files.get(location.file().index()).map_or(0, |f| f.base);
                if base != 0 {
                    *location = location.shifted(base);
                }
            }
        }
        Ok(())
    }
}

/// Iterator over an image's extents; see [`crate::extent`] for its invariants.
#[derive(Debug)]
pub struct Extents<'a> {
    image: &'a Image,
    pos: u64,
    end: u64,
    queue: std::collections::VecDeque<Extent>,
    scratch: Vec<Extent>,
    merger: Merger,
    done: bool,
}

impl<'a> Extents<'a> {
    fn new(image: &'a Image, start: u64, end: u64) -> Self {
        Extents {
            image,
            pos: start,
            end,
            queue: Default::default(),
            scratch: Vec::new(),
            merger: Merger::default(),
            done: false,
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                if let Some(out) = self.merger.push(e) {
                    return Some(Ok(out));
                }
                continue;
            }
            if self.done {
                return None;
            }
            if self.pos >= self.end {
                self.done = true;
                return self.merger.finish().map(Ok);
            }
            self.scratch.clear();
            if let Err(e) = self.image.map_checked(self.pos, self.end - self.pos, &mut self.scratch) {
                self.done = true;
                self.merger = Merger::default();
                return Some(Err(e));
            }
            self.pos = self.scratch.last().map_or(self.end, Extent::end);
            self.queue.extend(self.scratch.drain(..));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One image is shared by many copy threads: it must stay `Send + Sync` whatever the readers
    /// hold.
    #[test]
    fn images_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Image>();
        assert_send_sync::<Layer>();
    }

    #[test]
    fn reads_past_the_end_are_short_and_extents_cover_the_disk() {
        let src: Arc<dyn ReadAt> = Arc::new(crate::io::MemSource(Arc::from(&b"0123456789"[..])));
        let img = Image::from_source(src, &OpenOptions::default()).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(img.read_at(&mut buf, 6).unwrap(), 4);
        assert_eq!(&buf[..4], b"6789");
        assert_eq!(img.read_at(&mut buf, 10).unwrap(), 0);
        let extents: Vec<Extent> = img.extents().map(|e| e.unwrap()).collect();
        assert_eq!(extents.len(), 1);
        assert_eq!((extents[0].start, extents[0].len), (0, 10));
        let clipped: Vec<Extent> = img.extents_in(3, 5).map(|e| e.unwrap()).collect();
        assert_eq!((clipped[0].start, clipped[0].len), (3, 2));
    }
}
