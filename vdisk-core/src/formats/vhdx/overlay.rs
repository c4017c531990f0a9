//! The image file as it reads once its log is replayed: the stored bytes with the log's sector
//! writes and zeroed ranges laid over them, in memory. The file itself is never written.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::io::ReadAt;

/// One replayed range: `start` (the map key) up to `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    /// Reads as zeros.
    Zero {
        /// One past the last byte.
        end: u64,
    },
    /// Reads from the replay buffer, starting at `at` for the range's first byte.
    Data {
        /// One past the last byte.
        end: u64,
        /// Index in the replay buffer of the range's first byte.
        at: usize,
    },
}

impl Piece {
    fn end(self) -> u64 {
        match self {
            Piece::Zero { end } | Piece::Data { end, .. } => end,
        }
    }

    fn with_end(self, end: u64) -> Piece {
        match self {
            Piece::Zero { .. } => Piece::Zero { end },
            Piece::Data { at, .. } => Piece::Data { end, at },
        }
    }

    /// The same piece with its first `skip` bytes dropped (the caller keeps the end).
    fn skipped(self, skip: u64) -> Piece {
        match self {
            Piece::Zero { end } => Piece::Zero { end },
            Piece::Data { end, at } => {
                Piece::Data { end, at: at.saturating_add(usize::try_from(skip).unwrap_or(usize::MAX)) }
            }
        }
    }
}

/// Collects the writes of a log replay, newest last; later writes replace earlier ones.
#[derive(Debug, Default)]
pub(crate) struct OverlayBuilder {
    pieces: BTreeMap<u64, Piece>,
    data: Vec<u8>,
    size: u64,
}

impl OverlayBuilder {
    /// A builder for a file of `size` bytes (grown by writes past it and by [`Self::extend_to`]).
    pub(crate) fn new(size: u64) -> Self {
        OverlayBuilder { pieces: BTreeMap::new(), data: Vec::new(), size }
    }

    /// Lay `bytes` over the file at `offset`. The caller has checked that the end does not overflow.
    pub(crate) fn write(&mut self, offset: u64, bytes: &[u8]) {
        let Some(end) = offset.checked_add(bytes.len() as u64) else { return };
        if bytes.is_empty() {
            return;
        }
        let at = self.data.len();
        self.data.extend_from_slice(bytes);
        self.put(offset, end, Piece::Data { end, at });
        self.size = self.size.max(end);
    }

    /// Make `offset..offset + len` read as zeros.
    pub(crate) fn zero(&mut self, offset: u64, len: u64) {
        let Some(end) = offset.checked_add(len) else { return };
        if len == 0 {
            return;
        }
        self.put(offset, end, Piece::Zero { end });
        self.size = self.size.max(end);
    }

    /// Make the file at least `size` bytes long (the added bytes read as zeros).
    pub(crate) fn extend_to(&mut self, size: u64) {
        self.size = self.size.max(size);
    }

    /// The replayed file's size so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Cut the piece that straddles `at`, if any, in two.
    fn split_at(&mut self, at: u64) {
        let Some((&start, &piece)) = self.pieces.range(..at).next_back() else { return };
        if piece.end() > at {
            self.pieces.insert(start, piece.with_end(at));
            self.pieces.insert(at, piece.skipped(at - start));
        }
    }

    fn put(&mut self, start: u64, end: u64, piece: Piece) {
        self.split_at(start);
        self.split_at(end);
        let covered: Vec<u64> = self.pieces.range(start..end).map(|(&k, _)| k).collect();
        for k in covered {
            self.pieces.remove(&k);
        }
        self.pieces.insert(start, piece);
    }

    /// The view of `base` with every write applied.
    pub(crate) fn finish(self, base: Arc<dyn ReadAt>) -> ReplayedFile {
        ReplayedFile { base, size: self.size, pieces: self.pieces, data: self.data }
    }
}

/// A VHDX file with its log replayed in memory; see the module documentation.
pub(crate) struct ReplayedFile {
    base: Arc<dyn ReadAt>,
    size: u64,
    pieces: BTreeMap<u64, Piece>,
    data: Vec<u8>,
}

impl fmt::Debug for ReplayedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayedFile")
            .field("base", &self.base)
            .field("size", &self.size)
            .field("ranges", &self.pieces.len())
            .field("replayed_bytes", &self.data.len())
            .finish()
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "internal error: replayed VHDX log range out of its buffer")
}

impl ReadAt for ReplayedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = usize::try_from((self.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        let Some(buf) = buf.get_mut(..n) else { return Err(broken()) };
        // The stored bytes first; past the real end of the file they read as zeros.
        self.base.read_at_zero_fill(buf, offset)?;
        let end = offset + n as u64;
        let from = self.pieces.range(..=offset).next_back().map_or(offset, |(&k, _)| k);
        for (&start, &piece) in self.pieces.range(from..end) {
            let s = start.max(offset);
            let e = piece.end().min(end);
            if s >= e {
                continue;
            }
            let dst = usize::try_from(s - offset).ok().zip(usize::try_from(e - offset).ok());
            let Some(dst) = dst.and_then(|(a, b)| buf.get_mut(a..b)) else { return Err(broken()) };
            match piece {
                Piece::Zero { .. } => dst.fill(0),
                Piece::Data { at, .. } => {
                    let skip = usize::try_from(s - start).map_err(|_| broken())?;
                    let src = at.checked_add(skip).and_then(|a| self.data.get(a..a.checked_add(dst.len())?));
                    dst.copy_from_slice(src.ok_or_else(broken)?);
                }
            }
        }
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::io::MemSource;

    #[test]
    fn later_writes_win_and_reads_past_the_end_are_zero() {
        let base: Arc<dyn ReadAt> = Arc::new(MemSource(Arc::from(vec![1u8; 100])));
        let mut b = OverlayBuilder::new(100);
        b.write(10, &[2; 20]); // 10..30
        b.zero(20, 40); // 20..60
        b.write(25, &[3; 10]); // 25..35
        b.write(95, &[4; 10]); // 95..105 grows the file
        b.extend_to(120);
        let f = b.finish(base);
        assert_eq!(f.size(), 120);
        let mut buf = vec![9u8; 130];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 120);
        let mut want = [1u8; 120];
        want[10..20].fill(2);
        want[20..60].fill(0);
        want[25..35].fill(3);
        want[95..105].fill(4);
        want[105..120].fill(0);
        assert_eq!(&buf[..120], &want[..]);
        // Unaligned reads inside pieces.
        let mut small = [0u8; 7];
        assert_eq!(f.read_at(&mut small, 22).unwrap(), 7);
        assert_eq!(&small, &want[22..29]);
        assert_eq!(f.read_at(&mut small, 120).unwrap(), 0);
    }
}
