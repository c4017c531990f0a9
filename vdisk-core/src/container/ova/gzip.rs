//! A disk file stored gzip-compressed inside an OVA (`ovf:compression="gzip"`).
//!
//! A gzip stream can only be read front to back, so such a disk has no random access: `map` and
//! reads refuse with one line that says so. A streamOptimized VMDK needs none: its grain markers
//! carry their position, so `convert` decodes it front to back (see [`crate::copy`]).

use std::io::{BufReader, Read};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde_json::json;

use crate::error::{Error, Result};
use crate::extent::{Extent, SequentialStream};
use crate::formats::vmdk::stream::{stream_head, StreamDecoder, StreamHead};
use crate::image::ImageFormat;
use crate::info::{CheckReport, ImageInfo};
use crate::io::ReadAt;
use crate::limits::Limits;
use crate::probe::{self, Detected, Format};

use super::source::SequentialReader;

/// Bytes decompressed from the start to recognise the disk format.
const HEAD_BYTES: usize = 64 << 10;

/// Bytes read from the stored file at a time (large reads suit remote sources too).
const READ_BUFFER_BYTES: usize = 1 << 20;

/// A gzip-compressed disk of an OVA.
#[derive(Debug)]
pub(crate) struct CompressedDisk {
    /// The stored (compressed) file.
    src: Arc<dyn ReadAt>,
    /// The file's name in the OVF, for messages.
    name: String,
    head: StreamHead,
    limits: Limits,
}

/// The decompressed stream of `src`, counting the compressed bytes consumed into `consumed`.
fn decompressed(src: Arc<dyn ReadAt>, consumed: Arc<AtomicU64>) -> Box<dyn Read + Send> {
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, SequentialReader::new(src, consumed));
    Box::new(flate2::bufread::MultiGzDecoder::new(reader))
}

impl CompressedDisk {
    /// Recognise the disk inside the compressed file `src` named `name`.
    pub(super) fn open(src: Arc<dyn ReadAt>, name: &str, limits: &Limits) -> Result<Self> {
        let mut r = decompressed(src.clone(), Arc::new(AtomicU64::new(0)));
        let mut head = vec![0u8; HEAD_BYTES];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::invalid(format!("gzip-compressed file '{name}': {e}"))),
            }
        }
        head.truncate(got);
        let no_random_access = |what: &str| {
            Error::unsupported(format!(
                "'{name}' is a gzip-compressed {what} disk: reading it needs random access, which a compressed \
                 file cannot give; extract and decompress it first"
            ))
        };
        match probe::detect_bytes(&head, &[]) {
            Detected::Supported(Format::Vmdk) if head.starts_with(b"KDMV") => {}
            Detected::Supported(f) => return Err(no_random_access(f.as_str())),
            Detected::Known(kind) => {
                return Err(Error::unsupported(format!("'{name}' holds a {kind} image, which vdisk does not read")))
            }
        }
        let head = stream_head(&head).map_err(|e| e.context(format!("gzip-compressed file '{name}'")))?;
        limits.check_virtual_size(head.capacity)?;
        Ok(CompressedDisk { src, name: name.to_string(), head, limits: limits.clone() })
    }

    /// The format inside the compressed file.
    pub(crate) fn format(&self) -> Format {
        Format::Vmdk
    }

    fn decoder(&self, consumed: Arc<AtomicU64>) -> Result<StreamDecoder> {
        if !self.head.streamable {
            return Err(Error::unsupported(format!(
                "'{}' is a gzip-compressed {} VMDK: only streamOptimized VMDKs can be read front to back; \
                 extract and decompress it first",
                self.name, self.head.kind
            )));
        }
        StreamDecoder::new(decompressed(self.src.clone(), consumed), &self.limits)
            .map_err(|e| e.context(format!("gzip-compressed file '{}'", self.name)))
    }
}

impl ImageFormat for CompressedDisk {
    fn virtual_size(&self) -> u64 {
        self.head.capacity
    }

    fn map(&self, _offset: u64, _len: u64, _out: &mut Vec<Extent>) -> Result<()> {
        Err(Error::unsupported(format!(
            "'{}' is stored gzip-compressed in the OVA: it can only be read front to back, so its map and random \
             reads are impossible (convert reads a streamOptimized VMDK sequentially)",
            self.name
        )))
    }

    fn describe(&self, info: &mut ImageInfo) {
        info.cluster_size = Some(self.head.grain_size);
        info.set_format_specific(
            "vmdk",
            json!({
                "create-type": self.head.kind,
                "compression": "gzip",
                "random-access": false,
                "sequential": self.head.streamable,
            }),
        );
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        // Walk the whole stream: the gzip checksums, every marker and grain position.
        let walk = || -> Result<u64> {
            let mut grains = 0u64;
            for unit in self.decoder(Arc::new(AtomicU64::new(0)))? {
                unit?;
                grains += 1;
            }
            Ok(grains)
        };
        match walk() {
            Ok(grains) => report.allocated_clusters = Some(grains),
            Err(e) => report.corruption(e.to_string()),
        }
        report.total_clusters = Some(self.head.capacity.div_ceil(self.head.grain_size));
        Ok(())
    }

    fn sequential(&self) -> Option<Result<SequentialStream>> {
        let consumed = Arc::new(AtomicU64::new(0));
        Some(self.decoder(consumed.clone()).map(|d| SequentialStream {
            units: Box::new(d),
            unit_size: self.head.grain_size,
            consumed,
            stored_len: self.src.size(),
        }))
    }
}
