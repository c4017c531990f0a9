//! Positional reads and checked arithmetic on untrusted offsets.
//!
//! Readers never seek: every read names its offset, so one source is shared by many threads.
//! [`ReadAt`] is implemented for files (`pread`) and for in-memory bytes (tests and fuzzing).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A source of bytes read by offset, shareable across threads.
pub trait ReadAt: Send + Sync + fmt::Debug {
    /// Read up to `buf.len()` bytes at `offset`; returns how many were read (0 at end of source).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The size of the source in bytes.
    fn size(&self) -> u64;

    /// For sources that know their holes (sparse files): the first data region at or after
    /// `offset`, as `start..end`, or `Ok(None)` when only a hole remains. `None` when the source
    /// cannot tell, in which case everything is data.
    fn next_data(&self, _offset: u64) -> Option<io::Result<Option<(u64, u64)>>> {
        None
    }

    /// What identifies the bytes behind this source, so that a later run can tell whether it
    /// still reads the same object: for files `file:DEV:INO:SIZE:MTIME_NS`, for remote objects
    /// their validator (ETag or Last-Modified). `None` when the source cannot say (memory).
    fn identity(&self) -> Option<String> {
        None
    }

    /// Fill `buf` from `offset`; bytes past the end of the source read as zeros, as qemu's file
    /// driver does. Returns how many bytes came from the source.
    fn read_at_zero_fill(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some(pos) = offset.checked_add(done as u64) else { break };
            match self.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }
}

/// A regular file or block device read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
    identity: String,
}

impl FileSource {
    /// Wrap an open file; its size is taken now (block devices by seeking to the end).
    pub fn new(file: File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        let identity = format!("file:{}:{}:{size}:{mtime_ns}", meta.dev(), meta.ino());
        Ok(FileSource { file, size, identity })
    }
}

impl ReadAt for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> Option<String> {
        Some(self.identity.clone())
    }

    fn next_data(&self, offset: u64) -> Option<io::Result<Option<(u64, u64)>>> {
        use std::os::fd::AsRawFd;
        if offset >= self.size {
            return Some(Ok(None));
        }
        let fd = self.file.as_raw_fd();
        let seek = |whence: libc::c_int, at: u64| -> io::Result<Option<u64>> {
            let at = libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: lseek on a descriptor this struct owns; it only moves the file position,
            // which vdisk never uses (all reads are positional).
            let r = unsafe { libc::lseek(fd, at, whence) };
            if r < 0 {
                let err = io::Error::last_os_error();
                return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
            }
            Ok(u64::try_from(r).ok())
        };
        let start = match seek(libc::SEEK_DATA, offset) {
            Ok(Some(s)) => s,
            Ok(None) => return Some(Ok(None)),
            // EINVAL: this file system or device cannot say; treat everything as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return None,
            Err(e) => return Some(Err(e)),
        };
        if start >= self.size {
            return Some(Ok(None));
        }
        let end = match seek(libc::SEEK_HOLE, start) {
            Ok(Some(e)) => e.min(self.size),
            Ok(None) => self.size,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(Some((start, end.max(start + 1).min(self.size)))))
    }
}

/// Bytes held in memory.
#[derive(Clone)]
pub struct MemSource(pub Arc<[u8]>);

impl fmt::Debug for MemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemSource({} bytes)", self.0.len())
    }
}

impl ReadAt for MemSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.0.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Read exactly `buf.len()` bytes of the structure `what` at `offset`, failing with an
/// `InvalidImage` error that names it when the source ends first.
pub fn read_exact(src: &dyn ReadAt, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    let end = checked_end(offset, buf.len() as u64, what)?;
    if end > src.size() {
        return Err(Error::invalid(format!(
            "{what} at {offset:#x} (+{:#x}) lies past the end of the file ({:#x} bytes)",
            buf.len(),
            src.size()
        )));
    }
    let n = src.read_at_zero_fill(buf, offset).map_err(|e| Error::io(format!("reading {what} at {offset:#x}"), e))?;
    if n < buf.len() {
        return Err(Error::invalid(format!("{what} at {offset:#x} is truncated: the file ended after {n} bytes")));
    }
    Ok(())
}

/// Read `len` bytes of the structure `what` at `offset` into a new vector.
///
/// The caller must already have checked `len` against a limit; this only guards the file size.
pub fn read_vec(src: &dyn ReadAt, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let end = checked_end(offset, len, what)?;
    if end > src.size() {
        return Err(Error::invalid(format!(
            "{what} at {offset:#x} (+{len:#x}) lies past the end of the file ({:#x} bytes)",
            src.size()
        )));
    }
    let n = usize::try_from(len).map_err(|_| Error::limit(format!("{what} of {len} bytes does not fit in memory")))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(n).map_err(|_| Error::limit(format!("{what} of {len} bytes does not fit in memory")))?;
    buf.resize(n, 0);
    read_exact(src, &mut buf, offset, what)?;
    Ok(buf)
}

/// `offset + len`, or an `InvalidImage` error naming `what` on overflow.
pub fn checked_end(offset: u64, len: u64, what: &str) -> Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| Error::invalid(format!("{what} at {offset:#x} with length {len:#x} overflows 64 bits")))
}

/// `a * b`, or an `InvalidImage` error naming `what` on overflow.
pub fn checked_mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| Error::invalid(format!("{what}: {a:#x} * {b:#x} overflows 64 bits")))
}

/// Convert a length from the file into `usize` for a buffer, or fail naming `what`.
pub fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::limit(format!("{what} of {v} bytes does not fit in memory")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_source_reads_and_zero_fills() {
        let src = MemSource(Arc::from(&b"abcdef"[..]));
        let mut buf = [9u8; 4];
        assert_eq!(src.read_at_zero_fill(&mut buf, 4).unwrap(), 2);
        assert_eq!(&buf, b"ef\0\0");
        assert_eq!(src.read_at(&mut buf, 100).unwrap(), 0);
    }

    #[test]
    fn file_identity_changes_when_the_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        std::fs::write(&path, b"one").unwrap();
        let first = FileSource::new(File::open(&path).unwrap()).unwrap().identity().unwrap();
        assert!(first.starts_with("file:"), "{first}");
        assert_eq!(FileSource::new(File::open(&path).unwrap()).unwrap().identity().unwrap(), first);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"two!").unwrap();
        assert_ne!(FileSource::new(File::open(&path).unwrap()).unwrap().identity().unwrap(), first);
        assert_eq!(MemSource(Arc::from(&b"x"[..])).identity(), None);
    }

    #[test]
    fn read_exact_names_the_structure_past_the_end() {
        let src = MemSource(Arc::from(&b"abcdef"[..]));
        let mut buf = [0u8; 4];
        let e = read_exact(&src, &mut buf, 4, "L1 table").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidImage);
        assert!(e.to_string().contains("L1 table at 0x4"), "{e}");
        assert!(read_exact(&src, &mut buf, u64::MAX, "x").is_err());
        assert_eq!(read_vec(&src, 1, 3, "y").unwrap(), b"bcd");
    }
}
