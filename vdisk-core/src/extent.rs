//! Extents: the contract between format readers and everything else.
//!
//! The iterator from [`Image::extents`](crate::Image::extents) yields extents that are
//!
//! 1. sorted by `start` and non-overlapping,
//! 2. never empty (`len > 0`),
//! 3. merged: no two neighbours could be merged ([`Extent::try_merge`] would refuse),
//! 4. covering exactly `0..virtual_size` (each starts where the previous one ended).
//!
//! A `Data` extent says where its bytes live, so the copy engine reads them straight from the
//! file (decompressing where needed) without going through the reader's tables again.

use std::fmt;

/// Index of a file in an open image's file table (the image itself, backing files, extents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub(crate) u32);

impl FileId {
    /// The position in the image's file table.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a compressed unit is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// Raw deflate without a zlib header (qcow2 `zlib` compression type).
    Deflate,
    /// A zlib stream with its RFC 1950 header (VMDK compressed grains).
    Zlib,
    /// A Zstandard frame (qcow2 `zstd` compression type).
    Zstd,
}

impl Compression {
    /// The name qemu uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Deflate | Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// One compressed unit (a qcow2 cluster or a VMDK grain) and the part of it an extent covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompressedUnit {
    /// The file holding the compressed bytes.
    pub file: FileId,
    /// The encoding.
    pub method: Compression,
    /// Offset of the compressed bytes in the file.
    pub offset: u64,
    /// Bytes to read at `offset` (an upper bound: reading stops at the end of the file and the
    /// decoder ignores what follows the end of the stream).
    pub stored_len: u64,
    /// Size of the unit once decompressed.
    pub unit_len: u64,
    /// Offset inside the decompressed unit where this extent starts.
    pub skip: u64,
}

/// Where a `Data` extent's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Stored as is at `offset` in `file`.
    File {
        /// The file.
        file: FileId,
        /// Offset of the extent's first byte.
        offset: u64,
    },
    /// Stored compressed.
    Compressed(CompressedUnit),
}

/// What an extent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExtentKind {
    /// Stored bytes, found in chain layer `layer` (0 = the image itself) at `location`.
    Data {
        /// Depth in the chain where the bytes were found.
        layer: u32,
        /// Where they are.
        location: Location,
    },
    /// Reads as zero because layer `layer` says so (zero cluster, ZERO block, zeroed grain, hole).
    Zero {
        /// Depth in the chain that says so.
        layer: u32,
    },
    /// Allocated in no layer; reads as zero.
    Unallocated,
}

impl ExtentKind {
    /// True for `Data`.
    pub fn is_data(&self) -> bool {
        matches!(self, ExtentKind::Data { .. })
    }

    /// The same kind, found one layer deeper (what a backing file's extent is to its overlay).
    pub(crate) fn deeper(self, by: u32) -> Self {
        match self {
            ExtentKind::Data { layer, location } => ExtentKind::Data { layer: layer.saturating_add(by), location },
            ExtentKind::Zero { layer } => ExtentKind::Zero { layer: layer.saturating_add(by) },
            ExtentKind::Unallocated => ExtentKind::Unallocated,
        }
    }
}

/// A range of the virtual disk and what it holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte, in virtual-disk offsets.
    pub start: u64,
    /// Length in bytes (never 0 from the iterator).
    pub len: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Extent({:#x}+{:#x} {:?})", self.start, self.len, self.kind)
    }
}

impl Extent {
    /// A new extent.
    pub fn new(start: u64, len: u64, kind: ExtentKind) -> Self {
        Extent { start, len, kind }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// The part of this extent from `at` (virtual offset, inside the extent) to its end.
    /// `at` must lie in `start..end`.
    pub fn tail_from(&self, at: u64) -> Extent {
        let skip = at.saturating_sub(self.start).min(self.len);
        let kind = match self.kind {
            ExtentKind::Data { layer, location } => ExtentKind::Data { layer, location: location.advanced(skip) },
            other => other,
        };
        Extent { start: self.start + skip, len: self.len - skip, kind }
    }

    /// The first `len` bytes of this extent (`len` no more than its length).
    pub fn head(&self, len: u64) -> Extent {
        Extent { start: self.start, len: len.min(self.len), kind: self.kind }
    }

    /// The part of this extent inside `start..end`, if any.
    pub fn clip(&self, start: u64, end: u64) -> Option<Extent> {
        let s = self.start.max(start);
        let e = self.end().min(end);
        (s < e).then(|| self.tail_from(s).head(e - s))
    }

    /// Append `next` to `self` when it starts where `self` ends and holds the same kind of
    /// content continuing the same storage; returns whether it did.
    pub fn try_merge(&mut self, next: &Extent) -> bool {
        if self.end() != next.start {
            return false;
        }
        let mergeable = match (&self.kind, &next.kind) {
            (ExtentKind::Unallocated, ExtentKind::Unallocated) => true,
            (ExtentKind::Zero { layer: a }, ExtentKind::Zero { layer: b }) => a == b,
            (ExtentKind::Data { layer: la, location: a }, ExtentKind::Data { layer: lb, location: b }) => {
                la == lb && a.advanced(self.len) == *b
            }
            _ => false,
        };
        if mergeable {
            self.len += next.len;
        }
        mergeable
    }
}

impl Location {
    /// The location `by` bytes further on.
    pub fn advanced(self, by: u64) -> Location {
        match self {
            Location::File { file, offset } => Location::File { file, offset: offset.saturating_add(by) },
            Location::Compressed(mut unit) => {
                unit.skip = unit.skip.saturating_add(by);
                Location::Compressed(unit)
            }
        }
    }

    /// The same bytes, with the stored offset `by` further into the file (a location in a view of
    /// part of a file, expressed in the whole file).
    pub(crate) fn shifted(self, by: u64) -> Location {
        match self {
            Location::File { file, offset } => Location::File { file, offset: offset.saturating_add(by) },
            Location::Compressed(mut unit) => {
                unit.offset = unit.offset.saturating_add(by);
                Location::Compressed(unit)
            }
        }
    }

    /// The file the bytes are in.
    pub fn file(&self) -> FileId {
        match self {
            Location::File { file, .. } => *file,
            Location::Compressed(unit) => unit.file,
        }
    }
}

/// One piece of a disk that can only be read front to back (a gzip-compressed OVA member):
/// `len` bytes of the virtual disk at `start`, stored in `data` (compressed with `compression`
/// into a unit of `unit_len` bytes, whose first `len` bytes are the disk's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SequentialUnit {
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) data: Vec<u8>,
    pub(crate) compression: Option<(Compression, u64)>,
}

/// A disk's content in the order it is stored, for the sequential copy path.
pub(crate) struct SequentialStream {
    /// The units, in stream order; their ranges must not overlap.
    pub(crate) units: Box<dyn Iterator<Item = crate::error::Result<SequentialUnit>> + Send>,
    /// Every unit starts at a multiple of this and is no longer.
    pub(crate) unit_size: u64,
    /// Bytes of the stored (compressed) file consumed so far, for progress.
    pub(crate) consumed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes of the stored file in all.
    pub(crate) stored_len: u64,
}

impl fmt::Debug for SequentialStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SequentialStream")
            .field("unit_size", &self.unit_size)
            .field("stored_len", &self.stored_len)
            .finish_non_exhaustive()
    }
}

/// Merges adjacent extents of a sorted, gap-free stream as they arrive (invariant 3).
#[derive(Debug, Default)]
pub(crate) struct Merger {
    pending: Option<Extent>,
}

impl Merger {
    /// Feed the next extent; returns a finished extent when `e` could not be merged.
    pub(crate) fn push(&mut self, e: Extent) -> Option<Extent> {
        if let Some(p) = &mut self.pending {
            if p.try_merge(&e) {
                return None;
            }
        }
        self.pending.replace(e)
    }

    /// The last extent, once the stream is done.
    pub(crate) fn finish(&mut self) -> Option<Extent> {
        self.pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F0: FileId = FileId(0);

    fn data(start: u64, len: u64, off: u64) -> Extent {
        Extent::new(start, len, ExtentKind::Data { layer: 0, location: Location::File { file: F0, offset: off } })
    }

    #[test]
    fn merges_contiguous_storage_only() {
        let mut a = data(0, 10, 100);
        assert!(a.try_merge(&data(10, 5, 110)));
        assert_eq!(a.len, 15);
        assert!(!a.try_merge(&data(15, 5, 200)));
        assert!(!a.try_merge(&Extent::new(15, 5, ExtentKind::Zero { layer: 0 })));
        let mut z = Extent::new(0, 4, ExtentKind::Zero { layer: 1 });
        assert!(!z.try_merge(&Extent::new(4, 4, ExtentKind::Zero { layer: 0 })));
        assert!(z.try_merge(&Extent::new(4, 4, ExtentKind::Zero { layer: 1 })));
    }

    #[test]
    fn compressed_units_merge_only_with_their_own_rest() {
        let unit = CompressedUnit {
            file: F0,
            method: Compression::Deflate,
            offset: 4096,
            stored_len: 600,
            unit_len: 65536,
            skip: 0,
        };
        let whole = Extent::new(0, 65536, ExtentKind::Data { layer: 0, location: Location::Compressed(unit) });
        let mut first = whole.head(1000);
        assert!(first.try_merge(&whole.tail_from(1000)));
        assert_eq!(first, whole);
        let other = CompressedUnit { offset: 8192, ..unit };
        let next = Extent::new(65536, 65536, ExtentKind::Data { layer: 0, location: Location::Compressed(other) });
        assert!(!first.try_merge(&next));
    }

    #[test]
    fn clip_and_tail_move_the_location() {
        let e = data(100, 50, 1000);
        let c = e.clip(120, 130).unwrap();
        assert_eq!(c, data(120, 10, 1020));
        assert!(e.clip(0, 100).is_none());
        assert_eq!(e.tail_from(149), data(149, 1, 1049));
    }
}
