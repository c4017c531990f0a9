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

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

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

    /// `write` compresses (CPU-bound); otherwise it is mostly the `pwrite` of `data`, and the
    /// export runs one `write` at a time.
    fn compresses(&self) -> bool {
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

    /// For a format whose data lives in a separate file named by a text descriptor (VMDK
    /// monolithicFlat): the descriptor, naming the data file `data_name`. The export then keeps
    /// this writer's file as `data_name` beside the target and writes the descriptor under the
    /// target's name. Called after `finish`.
    fn descriptor(&self, _data_name: &str) -> Option<String> {
        None
    }

    /// The export is stopping on an error or a cancellation: release every thread waiting in
    /// `write` or `zero` for an earlier item (they return an error). Ordered writers need this;
    /// for the others it does nothing.
    fn abort(&self) {}
}

/// What `vdisk measure` prints for one output format (qemu-img measure's keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the output file needs for this source (`required`).
    pub required: u64,
    /// Bytes the output file needs when every block of the disk is allocated (`fully-allocated`).
    pub fully_allocated: u64,
}

/// How much of the source holds data, at a granularity the writer chooses: called with a power of
/// two `unit` (512 B to 256 MiB), it returns how many aligned `unit`-sized pieces of the virtual
/// disk contain at least one allocated (non-zero, non-hole) extent.
pub(crate) type Allocated<'a> = dyn Fn(u64) -> Result<u64> + 'a;

/// An invalid `-o` option or combination: the message names the key and what is allowed.
pub(crate) fn option_error(message: impl Into<String>) -> Error {
    Error::target(message)
}

/// A size option the way qemu-img reads it: a number of bytes with an optional suffix
/// `k`/`K`, `M`, `G`, `T` (binary multiples) or `B`/`b` (bytes), e.g. `64k`, `2M`, `65536`.
pub(crate) fn parse_size(key: &str, value: &str) -> Result<u64> {
    let bad =
        || option_error(format!("invalid size {value:?} for option {key} (a number of bytes, or with k, M, G or T)"));
    let v = value.trim();
    let (digits, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c {
                'b' | 'B' => 0,
                'k' | 'K' => 10,
                'm' | 'M' => 20,
                'g' | 'G' => 30,
                't' | 'T' => 40,
                _ => return Err(bad()),
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// A boolean option the way qemu-img reads it: `on`/`off` (also `true`/`false`, `yes`/`no`).
pub(crate) fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(option_error(format!("invalid value {value:?} for option {key} (on or off)"))),
    }
}

/// A writer's lock on shared state; a thread that panicked while holding it has already failed the
/// export, so the data is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Check that the output of a `format` writer is a regular file and empty it, so that space never
/// written reads as zero.
pub(crate) fn prepare_output(file: &File, format: &str) -> Result<()> {
    let meta = file.metadata().map_err(|e| Error::io("reading the output file's metadata", e))?;
    if !meta.is_file() {
        return Err(Error::target(format!("a {format} is written to a regular file, not to a device or a pipe")));
    }
    if meta.len() > 0 {
        file.set_len(0).map_err(|e| Error::io("emptying the output file", e))?;
    }
    Ok(())
}

/// Allocate `len` bytes of the `format` output `file` so it is not sparse: true when done, false
/// when the file system cannot (the writer then writes every byte, zeros included).
/// `fallocate(2)` directly, not `posix_fallocate`, whose fallback writes a byte into every block.
pub(crate) fn allocate_file(file: &File, len: u64, format: &str) -> Result<bool> {
    let len = i64::try_from(len).map_err(|_| Error::target(format!("a file of {len} bytes is too large")))?;
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`,
    // which outlives the call.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(Error::io(format!("cannot allocate the {len} bytes of the fixed {format}"), err)),
    }
}

pub(crate) use super::sink::write_all_at;

/// Write `len` zero bytes at `offset` of the `format` output `file` (the copy sink's zero writer).
pub(crate) fn write_zeros(file: &File, offset: u64, len: u64, format: &str) -> Result<()> {
    super::sink::write_zeros(file, offset, len)
        .map_err(|e| Error::io(format!("writing {len} zero bytes into the {format} at {offset:#x}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_bools_parse_like_qemu() {
        assert_eq!(parse_size("cluster_size", "64k").unwrap(), 65536);
        assert_eq!(parse_size("cluster_size", "2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("cluster_size", "512").unwrap(), 512);
        assert_eq!(parse_size("cluster_size", "512B").unwrap(), 512);
        assert!(parse_size("cluster_size", "64q").is_err());
        assert!(parse_size("cluster_size", "").is_err());
        assert!(parse_size("cluster_size", "99999999999T").is_err());
        assert!(parse_bool("force_size", "on").unwrap());
        assert!(!parse_bool("force_size", "off").unwrap());
        assert!(parse_bool("force_size", "maybe").is_err());
    }
}
