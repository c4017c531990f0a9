//! qcow2 reader: versions 2 and 3, standard and extended L2 entries, zero and compressed
//! (zlib, zstd) clusters, backing files, external data files, internal snapshots (listed; the
//! active layer is read), persistent bitmaps (listed) and a refcount `check`. Encrypted
//! images (AES, LUKS) are described like `qemu-img info` does but refused by `open`.
//!
//! Everything is validated at open; `map` reads the L2 entries it needs on demand, with no
//! cache and no lock, so any number of threads can map and read at once.

mod bitmap;
mod check;
mod compressed;
mod crypto;
mod error;
mod header;
mod snapshot;
mod tables;
pub(crate) mod write;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use self::error::invalid;
use self::header::{Encryption, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use self::tables::{Geometry, Mapper};
use crate::error::{Error, Result};
use crate::extent::{Extent, FileId};
use crate::image::{ImageFormat, Layer, OpenContext};
use crate::info::{CheckReport, ImageInfo};
use crate::io::ReadAt;
use crate::limits::MetadataBudget;
use crate::probe::Format;

/// Largest refcount table (qemu's limit: 8 MiB).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// A qcow2 image.
pub(crate) struct Qcow2Image {
    src: Arc<dyn ReadAt>,
    file: FileId,
    header: Box<Header>,
    geo: Geometry,
    /// The active L1 table, the entries covering the virtual size.
    l1: Vec<u64>,
    /// Where data clusters live: this file, or the external data file (None when not opened).
    data_file: Option<FileId>,
    backing: Option<Box<Layer>>,
    snapshots: Vec<snapshot::Snapshot>,
    /// Size of the snapshot table in bytes.
    snapshots_size: u64,
    bitmaps: Vec<bitmap::Bitmap>,
    /// `format-specific.data.encrypt` of an encrypted image (only opened to be described).
    encrypt: Option<Value>,
    budget: Arc<MetadataBudget>,
    /// The limit on table entries, for `check`.
    max_table_entries: u64,
}

impl fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("version", &self.header.version)
            .field("cluster_size", &self.geo.cluster_size)
            .field("size", &self.header.size)
            .field("extended_l2", &self.geo.extended)
            .field("data_file", &self.data_file)
            .field("snapshots", &self.snapshots.len())
            .field("backing", &self.backing)
            .finish()
    }
}

impl Qcow2Image {
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        src: Arc<dyn ReadAt>,
        file: FileId,
        path: Option<&Path>,
    ) -> Result<Self> {
        let header = Header::read(src.as_ref())?;
        let encrypt = match header.encryption {
            Encryption::None => None,
            e if !ctx.describe_only => {
                let name = if e == Encryption::Aes { "AES" } else { "LUKS" };
                return Err(error::Qcow2Error::Encrypted(name.into()).into());
            }
            e => crypto::describe(src.as_ref(), e)?,
        };
        let geo = Geometry::new(&header)?;
        ctx.limits().check_virtual_size(header.size)?;
        check_refcount_table(&header)?;
        let snapshots_what = "snapshot table";
        if header.snapshots_offset % geo.cluster_size != 0 {
            return Err(invalid(snapshots_what, header.snapshots_offset, "is not cluster aligned"));
        }
        let l1 = tables::read_l1(ctx, src.as_ref(), &header, &geo)?;
        let (snapshots, snapshots_size) =
            snapshot::read_table(ctx, src.as_ref(), header.snapshots_offset, header.nb_snapshots)?;
        let bitmaps = match &header.bitmaps {
            Some(ext) => bitmap::read_directory(ctx, src.as_ref(), ext, geo.cluster_size)?,
            None => Vec::new(),
        };

        let data_file = match (&header.data_file, header.has_data_file()) {
            (Some(name), true) => {
                if ctx.describe_only {
                    None
                } else {
                    let name = utf8_name(name, "external data file name")?;
                    Some(ctx.open_reference_file(path, name, "external data file")?.0)
                }
            }
            _ => Some(file),
        };
        let backing = match &header.backing_file {
            Some(name) if !ctx.describe_only => {
                let name = utf8_name(name, "backing file name")?;
                let format = header.backing_format.as_deref().and_then(|f| f.parse::<Format>().ok());
                Some(Box::new(ctx.open_reference_image(path, name, "backing file", format)?))
            }
            _ => None,
        };
        Ok(Qcow2Image {
            src,
            file,
            header: Box::new(header),
            geo,
            l1,
            data_file,
            backing,
            snapshots,
            snapshots_size,
            bitmaps,
            encrypt,
            budget: ctx.budget.clone(),
            max_table_entries: ctx.limits().max_table_entries,
        })
    }

    fn mapper(&self) -> Mapper<'_> {
        Mapper {
            src: self.src.as_ref(),
            header: &self.header,
            geo: self.geo,
            l1: &self.l1,
            backing: self.backing.as_deref(),
            image_file: self.file,
            data_file: self.data_file,
        }
    }

    /// `format-specific.data` as qemu-img prints it (same keys, same order).
    fn format_specific(&self) -> Value {
        let h = &self.header;
        let mut m = Map::new();
        let compression = h.compression.as_str();
        if h.version < 3 {
            m.insert("compat".into(), json!("0.10"));
            m.insert("compression-type".into(), json!(compression));
            m.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
            if let Some(e) = &self.encrypt {
                m.insert("encrypt".into(), e.clone());
            }
            return Value::Object(m);
        }
        m.insert("compat".into(), json!("1.1"));
        m.insert("compression-type".into(), json!(compression));
        m.insert("lazy-refcounts".into(), json!(h.compatible & COMPAT_LAZY_REFCOUNTS != 0));
        if !self.bitmaps.is_empty() {
            m.insert("bitmaps".into(), Value::Array(self.bitmaps.iter().map(bitmap::Bitmap::info).collect()));
        }
        m.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
        if let Some(e) = &self.encrypt {
            m.insert("encrypt".into(), e.clone());
        }
        if let Some(name) = &h.data_file {
            m.insert("data-file".into(), json!(String::from_utf8_lossy(name)));
        }
        if h.has_data_file() {
            m.insert("data-file-raw".into(), json!(h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0));
        }
        m.insert("corrupt".into(), json!(h.incompatible & INCOMPAT_CORRUPT != 0));
        m.insert("extended-l2".into(), json!(self.geo.extended));
        Value::Object(m)
    }
}

/// A name from the image as UTF-8, or an error naming it.
fn utf8_name<'a>(name: &'a [u8], what: &'static str) -> Result<&'a str> {
    std::str::from_utf8(name).map_err(|_| Error::unsupported(format!("the qcow2 {what} is not valid UTF-8")))
}

/// The refcount table must exist, be cluster aligned and be of bounded size (qemu refuses the
/// image otherwise, even though reading does not need it).
fn check_refcount_table(h: &Header) -> Result<()> {
    let what = "refcount table";
    let at = h.refcount_table_offset;
    let clusters = u64::from(h.refcount_table_clusters);
    if clusters == 0 {
        return Err(invalid(what, at, "is empty (the image has no reference count table)"));
    }
    if clusters > MAX_REFCOUNT_TABLE_BYTES / h.cluster_size() {
        return Err(invalid(what, at, format!("{clusters} clusters are more than the limit of 8 MiB")));
    }
    if at % h.cluster_size() != 0 {
        return Err(invalid(what, at, "is not cluster aligned"));
    }
    Ok(())
}

impl ImageFormat for Qcow2Image {
    fn backing_layer(&self) -> Option<&Layer> {
        self.backing.as_deref()
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        self.mapper().map(offset, len, out)
    }

    fn describe(&self, info: &mut ImageInfo) {
        info.cluster_size = Some(self.geo.cluster_size);
        info.dirty_flag = self.header.incompatible & INCOMPAT_DIRTY != 0;
        if let Some(name) = &self.header.backing_file {
            info.set_backing(&String::from_utf8_lossy(name), self.header.backing_format.as_deref());
        }
        info.snapshots = self.snapshots.iter().map(snapshot::Snapshot::info).collect();
        info.set_format_specific("qcow2", self.format_specific());
        if self.encrypt.is_some() {
            info.encrypted = Some(true);
        }
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        check::Checker::new(self)?.run(report)
    }
}
