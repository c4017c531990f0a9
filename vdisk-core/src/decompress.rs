//! Reading compressed units (qcow2 clusters, VMDK grains) from their location.
//!
//! A unit never inflates past its declared size: decoding stops when the unit is full.

use std::io::Read;

use flate2::{Decompress, FlushDecompress, Status};

use crate::error::{Error, Result};
use crate::extent::{CompressedUnit, Compression};
use crate::io::{to_usize, ReadAt};

/// Slack allowed between a unit's size and its stored size: incompressible data stored with the
/// deflate or zstd framing grows by a few bytes per 16-128 KiB block, and qcow2 rounds the stored
/// size up to whole sectors.
const STORED_SLACK_BYTES: u64 = 64 << 10;

/// Buffers reused between reads of compressed units, one per thread.
#[derive(Default)]
pub struct ReadScratch {
    stored: Vec<u8>,
    unit: Vec<u8>,
    deflate: Option<Decompress>,
    zlib: Option<Decompress>,
    zstd: Option<structured_zstd::decoding::FrameDecoder>,
}

impl std::fmt::Debug for ReadScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadScratch")
            .field("stored", &self.stored.capacity())
            .field("unit", &self.unit.capacity())
            .finish()
    }
}

/// Fill `buf` from the decompressed `unit`, starting at `unit.skip`.
pub(crate) fn read_unit(
    src: &dyn ReadAt,
    unit: &CompressedUnit,
    buf: &mut [u8],
    scratch: &mut ReadScratch,
    max_unit_bytes: u64,
) -> Result<()> {
    if unit.unit_len > max_unit_bytes {
        return Err(Error::limit(format!(
            "compressed unit at {:#x} of {} bytes is larger than the limit of {max_unit_bytes} (raise max_unit_bytes / --max-unit-bytes)",
            unit.offset, unit.unit_len
        )));
    }
    let want_end = unit.skip.checked_add(buf.len() as u64).filter(|&e| e <= unit.unit_len).ok_or_else(|| {
        Error::invalid(format!("internal error: read past the end of the compressed unit at {:#x}", unit.offset))
    })?;
    let stored_max = unit.unit_len.saturating_add(STORED_SLACK_BYTES);
    let stored_len = unit.stored_len.min(stored_max).min(src.size().saturating_sub(unit.offset));
    if stored_len == 0 {
        return Err(Error::invalid(format!(
            "compressed {} data at {:#x} lies past the end of the file",
            unit.method.as_str(),
            unit.offset
        )));
    }
    let ReadScratch { stored, unit: unit_buf, deflate, zlib, zstd } = scratch;
    stored.resize(to_usize(stored_len, "compressed unit")?, 0);
    let got = src
        .read_at_zero_fill(stored, unit.offset)
        .map_err(|e| Error::io(format!("reading compressed data at {:#x}", unit.offset), e))?;
    stored.truncate(got);

    let whole = unit.skip == 0 && want_end == unit.unit_len;
    let out: &mut [u8] = if whole {
        buf
    } else {
        unit_buf.resize(to_usize(unit.unit_len, "compressed unit")?, 0);
        unit_buf
    };
    match unit.method {
        Compression::Deflate => {
            inflate(deflate.get_or_insert_with(|| Decompress::new(false)), false, stored, out, unit)?
        }
        Compression::Zlib => inflate(zlib.get_or_insert_with(|| Decompress::new(true)), true, stored, out, unit)?,
        Compression::Zstd => {
            unzstd(zstd.get_or_insert_with(structured_zstd::decoding::FrameDecoder::new), stored, out, unit)?
        }
    }
    if !whole {
        let from = to_usize(unit.skip, "compressed unit")?;
        buf.copy_from_slice(&unit_buf[from..from + buf.len()]);
    }
    Ok(())
}

fn inflate(d: &mut Decompress, zlib_header: bool, input: &[u8], out: &mut [u8], unit: &CompressedUnit) -> Result<()> {
    d.reset(zlib_header);
    let bad =
        |why: String| Error::invalid(format!("compressed {} data at {:#x}: {why}", unit.method.as_str(), unit.offset));
    let status = d.decompress(input, out, FlushDecompress::Finish).map_err(|e| bad(e.to_string()))?;
    let produced = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
    if produced >= out.len() {
        // Full: a stream that would inflate further is cut at the unit size, as qemu does.
        return Ok(());
    }
    match (status, unit.method) {
        // A VMDK grain may hold less than a full grain (the last grain of a disk whose size is not
        // a multiple of the grain size); what it lacks reads as zeros.
        (Status::StreamEnd, Compression::Zlib) => {
            out[produced..].fill(0);
            Ok(())
        }
        (Status::StreamEnd, _) => Err(bad(format!("inflates to {produced} bytes, expected {}", unit.unit_len))),
        _ => Err(bad(format!("the stream is truncated after {produced} of {} bytes", unit.unit_len))),
    }
}

/// Largest zstd window accepted, relative to the unit: qemu compresses one cluster per frame, so
/// a window beyond the unit size (or 128 KiB for tiny units) is never needed and only costs memory.
fn zstd_window_ok(header: &[u8], unit_len: u64) -> bool {
    let limit = unit_len.max(128 << 10);
    let Some(&descriptor) = header.get(4) else { return false };
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let Some(&wd) = header.get(5) else { return false };
        let log = 10 + u64::from(wd >> 3);
        if log > 40 {
            return false;
        }
        let base = 1u64 << log;
        let window = base + (base / 8) * u64::from(wd & 7);
        return window <= limit;
    }
    // Single segment: the window is the frame content size.
    let dict_bytes = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_bytes = [1usize, 2, 4, 8][usize::from(descriptor >> 6)];
    let start = 5 + dict_bytes;
    let Some(field) = header.get(start..start + fcs_bytes) else { return false };
    let mut size = 0u64;
    for (i, b) in field.iter().enumerate() {
        size |= u64::from(*b) << (8 * i);
    }
    if fcs_bytes == 2 {
        size += 256;
    }
    size <= limit
}

fn unzstd(
    dec: &mut structured_zstd::decoding::FrameDecoder,
    input: &[u8],
    out: &mut [u8],
    unit: &CompressedUnit,
) -> Result<()> {
    let bad = |why: String| Error::invalid(format!("compressed zstd data at {:#x}: {why}", unit.offset));
    if !zstd_window_ok(input, unit.unit_len) {
        return Err(bad("the frame header is invalid or asks for a window larger than the cluster".into()));
    }
    let mut source = input;
    let mut stream = structured_zstd::decoding::StreamingDecoder::new_with_decoder(&mut source, dec)
        .map_err(|e| bad(e.to_string()))?;
    let mut filled = 0;
    while filled < out.len() {
        match stream.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    if filled < out.len() {
        return Err(bad(format!("decompresses to {filled} bytes, expected {}", unit.unit_len)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::FileId;
    use crate::io::MemSource;
    use std::io::Write;
    use std::sync::Arc;

    fn unit(method: Compression, stored_len: u64, unit_len: u64) -> CompressedUnit {
        CompressedUnit { file: FileId(0), method, offset: 0, stored_len, unit_len, skip: 0 }
    }

    fn deflate(data: &[u8], zlib: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if zlib {
            let mut e = flate2::write::ZlibEncoder::new(&mut out, flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap();
        } else {
            let mut e = flate2::write::DeflateEncoder::new(&mut out, flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap();
        }
        out
    }

    #[test]
    fn inflates_whole_and_partial_units() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let c = deflate(&data, false);
        let src = MemSource(Arc::from(c.clone()));
        let mut scratch = ReadScratch::default();
        let mut out = vec![0u8; 65536];
        read_unit(&src, &unit(Compression::Deflate, c.len() as u64 + 512, 65536), &mut out, &mut scratch, 1 << 21)
            .unwrap();
        assert_eq!(out, data);
        let mut part = vec![0u8; 100];
        let u = CompressedUnit { skip: 1000, ..unit(Compression::Deflate, c.len() as u64, 65536) };
        read_unit(&src, &u, &mut part, &mut scratch, 1 << 21).unwrap();
        assert_eq!(part, &data[1000..1100]);
    }

    #[test]
    fn short_streams_fail_for_qcow2_and_zero_fill_for_vmdk() {
        let data = vec![5u8; 1000];
        let mut scratch = ReadScratch::default();
        let mut out = vec![1u8; 4096];
        let c = deflate(&data, false);
        let src = MemSource(Arc::from(c.clone()));
        let e = read_unit(&src, &unit(Compression::Deflate, c.len() as u64, 4096), &mut out, &mut scratch, 1 << 21)
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidImage);
        let z = deflate(&data, true);
        let src = MemSource(Arc::from(z.clone()));
        read_unit(&src, &unit(Compression::Zlib, z.len() as u64, 4096), &mut out, &mut scratch, 1 << 21).unwrap();
        assert_eq!(&out[..1000], &data[..]);
        assert!(out[1000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_bomb_stops_at_the_unit_size_and_garbage_is_an_error() {
        let c = deflate(&vec![0u8; 1 << 24], false);
        let src = MemSource(Arc::from(c.clone()));
        let mut out = vec![1u8; 4096];
        let mut scratch = ReadScratch::default();
        read_unit(&src, &unit(Compression::Deflate, c.len() as u64, 4096), &mut out, &mut scratch, 1 << 21).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        let src = MemSource(Arc::from(vec![0xffu8; 600]));
        for m in [Compression::Deflate, Compression::Zlib, Compression::Zstd] {
            assert!(read_unit(&src, &unit(m, 600, 4096), &mut out, &mut scratch, 1 << 21).is_err());
        }
        let e = read_unit(&src, &unit(Compression::Zlib, 600, 1 << 30), &mut out, &mut scratch, 1 << 21).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::LimitExceeded);
    }

    #[test]
    fn zstd_window_check() {
        // Single-segment frame with a 1-byte content size of 200.
        assert!(zstd_window_ok(&[0x28, 0xb5, 0x2f, 0xfd, 0x20, 200], 4096));
        // Window descriptor asking for 2^40 bytes.
        assert!(!zstd_window_ok(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 30 << 3], 65536));
        // 64 KiB window for a 64 KiB unit.
        assert!(zstd_window_ok(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 6 << 3], 65536));
    }
}
