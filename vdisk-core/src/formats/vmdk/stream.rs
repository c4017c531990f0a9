//! Reading a streamOptimized extent front to back, from markers alone.
//!
//! A stream is a header, an embedded descriptor, then markers: each grain marker carries the
//! grain's first sector and its compressed size, followed by the deflated grain; metadata markers
//! (grain table, grain directory, footer) announce how many sectors follow; an all-zero sector is
//! the end-of-stream marker. Nothing in this walk needs a seek, so it reads a disk that is itself
//! compressed (a gzip member of an OVA), where the grain directory cannot be reached at random.

use std::io::Read;

use crate::error::{Error, Result};
use crate::extent::{Compression, SequentialUnit};
use crate::limits::Limits;

use super::header::{
    parse_marker, parse_sparse_header, SparseHeader, GRAIN_MARKER_BYTES, MARKER_EOS, MARKER_FOOTER, MARKER_GD,
    MARKER_GT, SECTOR,
};

/// Bytes of a grain marker before its data, as an index.
const MARKER_DATA_AT: usize = 12;
const _: () = assert!(MARKER_DATA_AT as u64 == GRAIN_MARKER_BYTES);

/// Slack allowed between a grain and its compressed size: deflate grows incompressible data by a
/// few bytes per block.
const STORED_SLACK_BYTES: u64 = 64 << 10;

/// What the first sector of a hosted sparse extent says about reading it front to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamHead {
    pub(crate) capacity: u64,
    pub(crate) grain_size: u64,
    /// Compressed grains with markers: readable front to back.
    pub(crate) streamable: bool,
    /// `streamOptimized` or `monolithicSparse`.
    pub(crate) kind: &'static str,
}

/// Parse the header in the first 512 bytes of `head`.
pub(crate) fn stream_head(head: &[u8]) -> Result<StreamHead> {
    let bytes: &[u8; 512] = head
        .get(..512)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::invalid("sparse header: the stream ends inside its first sector"))?;
    let h = parse_sparse_header(bytes, 0)?;
    let streamable = h.compressed && h.markers;
    Ok(StreamHead {
        capacity: h.capacity,
        grain_size: h.grain_size,
        streamable,
        kind: if h.compressed { "streamOptimized" } else { "monolithicSparse" },
    })
}

/// The grains of a stream, in stream order.
pub(crate) struct StreamDecoder {
    r: Box<dyn Read + Send>,
    header: SparseHeader,
    /// Bytes of the stream read so far.
    pos: u64,
    done: bool,
    max_stored: u64,
    max_metadata: u64,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder").field("pos", &self.pos).field("done", &self.done).finish_non_exhaustive()
    }
}

/// Read up to `buf.len()` bytes; fewer only at the end of the stream.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(stream_error(e)),
        }
    }
    Ok(got)
}

/// A read error of the underlying stream: a decompression error is a corrupt file, anything else
/// an I/O error.
fn stream_error(e: std::io::Error) -> Error {
    if matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData) {
        Error::invalid(format!("the compressed file is corrupt: {e}"))
    } else {
        Error::io("reading the compressed file", e)
    }
}

/// Read and discard `n` bytes.
fn skip(r: &mut dyn Read, n: u64) -> Result<u64> {
    std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(stream_error)
}

impl StreamDecoder {
    /// Start decoding the stream `r` (positioned at the extent's first byte) under `limits`.
    pub(crate) fn new(mut r: Box<dyn Read + Send>, limits: &Limits) -> Result<Self> {
        let mut first = [0u8; 512];
        if fill(r.as_mut(), &mut first)? < first.len() {
            return Err(Error::invalid("sparse header: the stream ends inside its first sector"));
        }
        let header = parse_sparse_header(&first, 0)?;
        if !(header.compressed && header.markers) {
            return Err(Error::unsupported(
                "a hosted sparse VMDK without compressed grains and markers cannot be read front to back",
            ));
        }
        limits.check_virtual_size(header.capacity)?;
        limits.check_unit("compressed grain", header.grain_size)?;
        let mut pos = SECTOR;
        let overhead = header.overhead.max(SECTOR);
        if skip(r.as_mut(), overhead - pos)? < overhead - pos {
            return Err(Error::invalid(format!(
                "sparse header: the stream ends before its first grain at {overhead:#x}"
            )));
        }
        pos = overhead;
        Ok(StreamDecoder {
            r,
            max_stored: header.grain_size.saturating_add(STORED_SLACK_BYTES),
            max_metadata: limits.max_metadata_bytes,
            header,
            pos,
            done: false,
        })
    }

    fn next_unit(&mut self) -> Result<Option<SequentialUnit>> {
        loop {
            let at = self.pos;
            let mut sector = [0u8; 512];
            let got = fill(self.r.as_mut(), &mut sector)?;
            self.pos += got as u64;
            if got == 0 {
                return Ok(None);
            }
            if got < MARKER_DATA_AT || (got < 16 && sector[..got].iter().any(|&b| b != 0)) {
                return Err(Error::invalid(format!("stream marker at {at:#x} is cut short by the end of the stream")));
            }
            let mut m = [0u8; 16];
            m.copy_from_slice(&sector[..16]);
            let marker = parse_marker(&m);
            if marker.size > 0 {
                return self.grain(at, marker.value, u64::from(marker.size), &sector[..got]).map(Some);
            }
            match marker.kind {
                MARKER_EOS => return Ok(None),
                MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                    let bytes = marker.value.checked_mul(SECTOR).filter(|&b| b <= self.max_metadata).ok_or_else(|| {
                        Error::limit(format!(
                            "stream marker at {at:#x}: {} sectors of metadata follow, more than the metadata limit (raise max_metadata_bytes / --max-metadata-bytes)",
                            marker.value
                        ))
                    })?;
                    // The marker's sector was read whole; the metadata sectors follow it.
                    let skipped = skip(self.r.as_mut(), bytes)?;
                    self.pos += skipped;
                    if skipped < bytes {
                        return Ok(None);
                    }
                }
                other => {
                    return Err(Error::invalid(format!("stream marker at {at:#x}: unknown marker type {other}")));
                }
            }
        }
    }

    /// The grain whose marker at `at` says it holds sector `lba` in `size` compressed bytes;
    /// `sector` is the marker's sector as read.
    fn grain(&mut self, at: u64, lba: u64, size: u64, sector: &[u8]) -> Result<SequentialUnit> {
        let h = &self.header;
        let start = lba.checked_mul(SECTOR).filter(|&s| s < h.capacity).ok_or_else(|| {
            Error::invalid(format!(
                "grain marker at {at:#x}: sector {lba:#x} lies outside the disk ({:#x} bytes)",
                h.capacity
            ))
        })?;
        if start % h.grain_size != 0 {
            return Err(Error::invalid(format!(
                "grain marker at {at:#x}: sector {lba:#x} is not the start of a grain of {} bytes",
                h.grain_size
            )));
        }
        if size > self.max_stored {
            return Err(Error::invalid(format!(
                "grain marker at {at:#x}: {size} compressed bytes for a grain of {} bytes",
                h.grain_size
            )));
        }
        let n = usize::try_from(size).map_err(|_| Error::invalid("grain too large"))?;
        let mut data = Vec::with_capacity(n);
        let in_sector = &sector[MARKER_DATA_AT..];
        data.extend_from_slice(&in_sector[..n.min(in_sector.len())]);
        if data.len() < n {
            let need = n - data.len();
            data.resize(n, 0);
            let got = fill(self.r.as_mut(), &mut data[n - need..])?;
            self.pos += got as u64;
            if got < need {
                return Err(Error::invalid(format!(
                    "grain marker at {at:#x}: the stream ends inside its {size} compressed bytes"
                )));
            }
        }
        // Pad to the next sector.
        let end = (at + GRAIN_MARKER_BYTES + size).next_multiple_of(SECTOR);
        if end > self.pos {
            let pad = end - self.pos;
            self.pos += skip(self.r.as_mut(), pad)?;
        }
        let len = h.grain_size.min(h.capacity - start);
        Ok(SequentialUnit { start, len, data, compression: Some((Compression::Zlib, h.grain_size)) })
    }
}

impl Iterator for StreamDecoder {
    type Item = Result<SequentialUnit>;

    fn next(&mut self) -> Option<Result<SequentialUnit>> {
        if self.done {
            return None;
        }
        match self.next_unit() {
            Ok(Some(u)) => Some(Ok(u)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A stream of `grains` (sector, data) with 128-sector grains over `capacity` sectors.
    pub(crate) fn stream(capacity: u64, grains: &[(u64, Vec<u8>)], trailer: bool) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&0x30001u32.to_le_bytes());
        h[12..20].copy_from_slice(&capacity.to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        h[64..72].copy_from_slice(&1u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        let mut out = h.to_vec();
        for (lba, data) in grains {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(data).unwrap();
            let z = z.finish().unwrap();
            out.extend_from_slice(&lba.to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
            out.resize(out.len().next_multiple_of(512), 0);
        }
        if trailer {
            // A grain table marker with 4 sectors of table, then the end-of-stream marker.
            let mut m = [0u8; 512];
            m[0..8].copy_from_slice(&4u64.to_le_bytes());
            m[12..16].copy_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&m);
            out.extend_from_slice(&[7u8; 2048]);
            out.extend_from_slice(&[0u8; 512]);
        }
        out
    }

    #[test]
    fn decodes_grains_in_stream_order() {
        let g0 = vec![1u8; 65536];
        let g2: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let bytes = stream(300, &[(256, g2.clone()), (0, g0.clone())], true);
        let d = StreamDecoder::new(Box::new(std::io::Cursor::new(bytes)), &Limits::default()).unwrap();
        let units: Vec<SequentialUnit> = d.map(|u| u.unwrap()).collect();
        assert_eq!(units.len(), 2);
        assert_eq!((units[0].start, units[0].len), (256 * 512, 300 * 512 - 256 * 512));
        assert_eq!((units[1].start, units[1].len), (0, 65536));
    }

    #[test]
    fn refuses_bad_grains_and_truncation() {
        let bytes = stream(256, &[(64, vec![1u8; 512])], false);
        let mut d = StreamDecoder::new(Box::new(std::io::Cursor::new(bytes)), &Limits::default()).unwrap();
        assert!(d.next().unwrap().unwrap_err().to_string().contains("not the start of a grain"));
        let bytes = stream(256, &[(512, vec![1u8; 512])], false);
        let mut d = StreamDecoder::new(Box::new(std::io::Cursor::new(bytes)), &Limits::default()).unwrap();
        assert!(d.next().unwrap().unwrap_err().to_string().contains("outside the disk"));
        let mut bytes = stream(256, &[(0, vec![3u8; 65536])], false);
        bytes.truncate(530);
        let mut d = StreamDecoder::new(Box::new(std::io::Cursor::new(bytes)), &Limits::default()).unwrap();
        assert!(d.next().unwrap().unwrap_err().to_string().contains("ends inside"));
    }
}
