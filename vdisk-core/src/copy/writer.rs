//! The contract between the copy engine and an image-format writer (export to qcow2, VMDK, VHD,
//! VHDX): each format's `formats/<fmt>/write.rs` implements [`FormatWriter`] and a `measure`
//! function; the export dispatcher (temporary name, rename, `-o` parsing, presets) drives them.
//!
//! Every format module offers the same three entry points:
//!
//! ```text
//! pub(crate) struct <Fmt>Options { .. }            // parsed from -o pairs by
//! impl <Fmt>Options { pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Result<Self> }
//! pub(crate) fn create(file: File, virtual_size: u64, options: &<Fmt>Options)
//!     -> Result<Box<dyn FormatWriter>>;
//! pub(crate) fn measure(virtual_size: u64, allocated: &Allocated<'_>, options: &<Fmt>Options)
//!     -> Result<Measure>;
//! ```
//!
//! `from_pairs` rejects an unknown key or a bad value with [`option_error`], naming the key.

use crate::error::{Error, Result};

/// A writer of one output format, fed by the copy engine.
///
/// The engine covers every byte of `[0, virtual_size)` exactly once, by one call of
/// [`write`](FormatWriter::write) or [`zero`](FormatWriter::zero) per work item, from many threads
/// at once and in any order, except that for a writer whose [`ordered`](FormatWriter::ordered) is
/// true the items are handed out in ascending offset order (each call may still come from any
/// thread, and a call may wait for the earlier ones to arrive). Item offsets are multiples of
/// [`alignment`](FormatWriter::alignment); lengths are too, except for the last item of the disk.
///
/// `write` gets the item's guest content, which may hold all-zero runs: the writer leaves every
/// all-zero cluster / grain / block unallocated where its format can express that (test with
/// `crate::copy::is_zero`). `zero` says the source knows the range reads as zero; for most
/// formats it does nothing. After every item has been delivered, [`finish`](FormatWriter::finish)
/// is called once: it writes tables, headers and footers, syncs the file (`sync_all`), and returns
/// the final file length. A writer never reads its output back.
pub(crate) trait FormatWriter: Send + Sync + std::fmt::Debug {
    /// Offsets and lengths of work items are multiples of this (a power of two, at least 512,
    /// at most 64 MiB): the format's cluster, grain or block size, or a multiple of it.
    fn alignment(&self) -> u64;

    /// Items must arrive in ascending offset order (stream formats).
    fn ordered(&self) -> bool {
        false
    }

    /// Store `data`, the guest content at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// The guest range `offset..offset + len` reads as zero.
    fn zero(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Write the metadata, sync, and return the file's length. Called once, after all items.
    fn finish(&self) -> Result<u64>;
}

/// What `vdisk measure` prints for one output format (qemu-img measure's keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Measure {
    /// Bytes the output file needs for this source (`required`).
    pub(crate) required: u64,
    /// Bytes the output file needs when every block of the disk is allocated (`fully-allocated`).
    pub(crate) fully_allocated: u64,
}

/// How much of the source holds data, at a granularity the writer chooses: called with a power of
/// two `unit` (512 B to 256 MiB), it returns how many aligned `unit`-sized pieces of the virtual
/// disk contain at least one allocated (non-zero, non-hole) extent.
pub(crate) type Allocated<'a> = dyn Fn(u64) -> Result<u64> + 'a;

/// An invalid `-o` option or combination: the message names the key and what is allowed.
pub(crate) fn option_error(message: impl Into<String>) -> Error {
    Error::target(message)
}
