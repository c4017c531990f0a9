//! # vdisk-core
//!
//! A pure-Rust reader for qcow2, VMDK, VHD, VHDX, VDI and raw disk images, and for the disks inside
//! OVA archives (read in place), that exposes each image as a sparse list of [`Extent`]s and copies
//! the guest-visible content, in parallel, to a raw file or a block device.
//!
//! Images are untrusted input: format detection is by content, every reference to another file
//! goes through a [`ReferencePolicy`] (deny by default), and every table is bounded by [`Limits`].
//!
//! ```
//! # fn main() -> vdisk_core::Result<()> {
//! use vdisk_core::{convert, ConvertOptions, Image, OpenOptions};
//! let dir = tempfile::tempdir().unwrap();
//! let src = dir.path().join("disk.img");
//! std::fs::write(&src, b"hello, disk").unwrap();
//!
//! let image = Image::open(&src, &OpenOptions::default())?;
//! assert_eq!(image.virtual_size(), 11);
//! for extent in image.extents() {
//!     let extent = extent?;
//!     println!("{:#x}+{:#x}: {:?}", extent.start, extent.len, extent.kind);
//! }
//! let report = convert(&image, dir.path().join("out.raw"), &ConvertOptions::default())?;
//! assert_eq!(std::fs::read(dir.path().join("out.raw")).unwrap(), b"hello, disk");
//! assert_eq!(report.bytes_written, 11);
//! # Ok(()) }
//! ```

#![forbid(unsafe_op_in_unsafe_fn)]
// Library code never unwraps or truncates silently: input comes from untrusted files.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation))]

mod container;
mod copy;
mod decompress;
mod error;
mod extent;
mod formats;
mod image;
mod info;
mod io;
mod limits;
mod policy;
mod probe;
mod source;
mod verify;

pub use copy::{
    convert, default_threads, export, measure, measure_size, parse_option_pairs, ConvertOptions, ConvertReport,
    ExportOptions, Measure, OutputFormat, Preset, Progress, TargetKind, DEFAULT_CHECKPOINT_BYTES,
    DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_ITEM_SIZE,
};
pub use decompress::ReadScratch;
pub use error::{Error, ErrorKind, RemoteFailure, Result};
pub use extent::{CompressedUnit, Compression, Extent, ExtentKind, FileId, Location};
pub use image::{Extents, Image, OpenOptions};
pub use info::{CheckProblem, CheckReport, ImageInfo, SnapshotInfo};
pub use io::{MemSource, ReadAt};
pub use limits::Limits;
pub use policy::ReferencePolicy;
pub use probe::Format;
pub use source::{is_url, redact_url, HttpOptions, HttpSource, Interrupted, UrlRefresh};
pub use verify::{
    checksum, compare, Checksum, ChecksumAlgorithm, ChecksumOptions, CompareError, CompareOptions, CompareStage,
    Comparison, Difference, BLKHASH_BLOCK_SIZE,
};
