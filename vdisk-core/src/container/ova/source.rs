//! A view of parts of another source as one: a disk stored in one member of a tar, or in several
//! (the chunks of a file split with `ovf:chunkSize`), read in place.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::io::ReadAt;

/// One piece of the view: `len` bytes of the inner source from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// The concatenation of segments of `inner`, positionally readable like a file.
pub(crate) struct Segments {
    inner: Arc<dyn ReadAt>,
    segments: Vec<Segment>,
    /// Where each segment starts in the view.
    starts: Vec<u64>,
    size: u64,
}

impl fmt::Debug for Segments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segments").field("segments", &self.segments.len()).field("size", &self.size).finish()
    }
}

impl Segments {
    /// A view of `segments` of `inner`, in order. The caller has checked that each lies inside
    /// `inner` and that the sizes add up without overflow.
    pub(crate) fn new(inner: Arc<dyn ReadAt>, segments: Vec<Segment>) -> Self {
        let mut starts = Vec::with_capacity(segments.len());
        let mut size = 0u64;
        for s in &segments {
            starts.push(size);
            size = size.saturating_add(s.len);
        }
        Segments { inner, segments, starts, size }
    }

    /// Where the view starts in the inner source when it is one segment (a member read in place).
    pub(crate) fn single_start(&self) -> Option<u64> {
        match self.segments.as_slice() {
            [one] => Some(one.start),
            _ => None,
        }
    }
}

impl ReadAt for Segments {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let i = self.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let (Some(seg), Some(&seg_start)) = (self.segments.get(i), self.starts.get(i)) else { return Ok(0) };
        let within = offset - seg_start;
        let n = usize::try_from((seg.len - within).min(buf.len() as u64)).unwrap_or(buf.len());
        self.inner.read_at(&mut buf[..n], seg.start + within)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn next_data(&self, offset: u64) -> Option<io::Result<Option<(u64, u64)>>> {
        // Holes are only known for a single segment (the common case: a member read in place).
        let [seg] = self.segments.as_slice() else { return None };
        if offset >= seg.len {
            return Some(Ok(None));
        }
        let end = seg.start + seg.len;
        match self.inner.next_data(seg.start + offset)? {
            Err(e) => Some(Err(e)),
            Ok(None) => Some(Ok(None)),
            Ok(Some((s, e))) if s >= end => {
                let _ = e;
                Some(Ok(None))
            }
            Ok(Some((s, e))) => Some(Ok(Some((s - seg.start, e.min(end) - seg.start)))),
        }
    }

    fn identity(&self) -> Option<String> {
        let inner = self.inner.identity()?;
        let parts: Vec<String> = self.segments.iter().map(|s| format!("{}+{}", s.start, s.len)).collect();
        Some(format!("{inner}[{}]", parts.join(",")))
    }
}

/// Reads a source front to back through `std::io::Read`, counting what was consumed.
pub(crate) struct SequentialReader {
    src: Arc<dyn ReadAt>,
    pos: u64,
    consumed: Arc<std::sync::atomic::AtomicU64>,
}

impl SequentialReader {
    pub(crate) fn new(src: Arc<dyn ReadAt>, consumed: Arc<std::sync::atomic::AtomicU64>) -> Self {
        SequentialReader { src, pos: 0, consumed }
    }
}

impl io::Read for SequentialReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read_at(buf, self.pos)?;
        self.pos += n as u64;
        self.consumed.store(self.pos, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemSource;

    #[test]
    fn segments_read_across_boundaries() {
        let inner: Arc<dyn ReadAt> = Arc::new(MemSource(Arc::from(&b"0123456789abcdef"[..])));
        let v = Segments::new(inner, vec![Segment { start: 2, len: 3 }, Segment { start: 10, len: 4 }]);
        assert_eq!(v.size(), 7);
        let mut buf = [0u8; 7];
        assert_eq!(v.read_at_zero_fill(&mut buf, 0).unwrap(), 7);
        assert_eq!(&buf, b"234abcd");
        let mut buf = [0u8; 4];
        assert_eq!(v.read_at_zero_fill(&mut buf, 5).unwrap(), 2);
        assert_eq!(&buf, b"cd\0\0");
        assert_eq!(v.single_start(), None);
    }
}
