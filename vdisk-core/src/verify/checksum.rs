//! `vdisk checksum`: a digest of an image's guest content, independent of its container format.
//!
//! The disk is cut into units aligned to the blkhash block size. A unit with no data is hashed
//! without reading (its blocks all take the zero-block digest); a unit with data is read (and
//! decompressed) on one of the threads, which hashes its blocks, skipping the hash of blocks that
//! read as zero; the digests are folded in order (see [`super::blkhash`]). Memory is bounded by
//! threads x unit size plus the fold's window, whatever the disk size. The plain SHA-256 of the
//! content is also offered; it is inherently sequential, so there only the reading is parallel.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::blkhash::{hex, StreamHasher, BLKHASH_BLOCK_SIZE};
use super::fold::{Fold, OrderedFold};
use super::pool::{self, Reporting};
use super::PageBuf;
use crate::copy::{Progress, DEFAULT_PROGRESS_INTERVAL, MAX_THREADS};
use crate::decompress::ReadScratch;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::Extent;
use crate::image::Image;

/// Bytes read and hashed as one unit of work: many blocks per hand-off, and threads x units a
/// few tens of MiB at most.
const UNIT_BYTES: u64 = 4 << 20;

/// Longest run of zero blocks handed over as one unit for blkhash: its cost is 32 bytes of outer
/// hash per block (64 GiB take about 20 ms), so progress and cancellation stay responsive.
const MAX_ZERO_UNIT_BLKHASH: u64 = 64 << 30;

/// Longest run of zeros handed over as one unit for plain SHA-256, which hashes every zero byte
/// (256 MiB take about 0.15 s).
const MAX_ZERO_UNIT_SHA256: u64 = 256 << 20;

/// How far (in bytes) readers may run ahead of the plain SHA-256 fold: the buffers waiting for
/// it are the memory this bounds.
const SHA256_WINDOW: u64 = 64 << 20;

/// A checksum algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChecksumAlgorithm {
    /// blkhash with SHA-256 and 64 KiB blocks, as `blksum` (>= 0.10.1) and `nbdcopy --blkhash`
    /// compute it.
    #[default]
    Blkhash,
    /// The plain SHA-256 of the guest content (what `sha256sum` gives for the raw conversion).
    Sha256,
}

impl ChecksumAlgorithm {
    /// The name used on the command line and in JSON: `blkhash` or `sha256`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Blkhash => "blkhash",
            ChecksumAlgorithm::Sha256 => "sha256",
        }
    }

    /// The block size of the construction (`None` for plain SHA-256).
    pub fn block_size(self) -> Option<u64> {
        match self {
            ChecksumAlgorithm::Blkhash => Some(BLKHASH_BLOCK_SIZE),
            ChecksumAlgorithm::Sha256 => None,
        }
    }
}

impl fmt::Display for ChecksumAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChecksumAlgorithm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "blkhash" => Ok(ChecksumAlgorithm::Blkhash),
            "sha256" => Ok(ChecksumAlgorithm::Sha256),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown checksum algorithm '{s}' (expected blkhash or sha256)"),
            )),
        }
    }
}

/// How to compute a checksum.
#[derive(Clone)]
pub struct ChecksumOptions<'a> {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// Hash only the first `size` bytes (the virtual size of an image written to a larger
    /// device); `None` hashes the whole virtual disk.
    pub size: Option<u64>,
    /// Threads; `None` uses every available core.
    pub threads: Option<usize>,
    /// Called from the calling thread with (done, total) at most every `progress_interval`.
    pub progress: Option<Progress<'a>>,
    /// Interval between progress callbacks.
    pub progress_interval: Duration,
    /// Set to true (from any thread) to stop.
    pub cancel: Option<&'a AtomicBool>,
}

impl Default for ChecksumOptions<'_> {
    fn default() -> Self {
        ChecksumOptions {
            algorithm: ChecksumAlgorithm::default(),
            size: None,
            threads: None,
            progress: None,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            cancel: None,
        }
    }
}

impl fmt::Debug for ChecksumOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChecksumOptions")
            .field("algorithm", &self.algorithm)
            .field("size", &self.size)
            .field("threads", &self.threads)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// A computed checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checksum {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// Bytes of content hashed.
    pub size: u64,
    /// The digest in lowercase hex.
    pub digest: String,
}

/// One unit of work: `start..start + len`, and the extents covering it when it holds data.
struct Unit {
    start: u64,
    len: u64,
    /// Empty when the whole unit reads as zero.
    pieces: Vec<Extent>,
}

/// Units aligned to `UNIT_BYTES`, zero windows merged into runs of at most `max_zero`.
struct Units<'a> {
    extents: crate::image::Extents<'a>,
    end: u64,
    /// Next byte to plan (a multiple of `UNIT_BYTES`, or `end`).
    pos: u64,
    /// The part of an extent not yet planned.
    carry: Option<Extent>,
    /// A zero run being built: (start, len).
    zero_run: Option<(u64, u64)>,
    ready: std::collections::VecDeque<Unit>,
    max_zero: u64,
    failed: bool,
}

impl<'a> Units<'a> {
    fn new(image: &'a Image, end: u64, max_zero: u64) -> Self {
        Units {
            extents: image.extents_in(0, end),
            end,
            pos: 0,
            carry: None,
            zero_run: None,
            ready: Default::default(),
            max_zero: max_zero.max(UNIT_BYTES),
            failed: false,
        }
    }

    fn next_extent(&mut self) -> Result<Extent> {
        match self.carry.take() {
            Some(e) => Ok(e),
            None => self
                .extents
                .next()
                .unwrap_or_else(|| Err(Error::invalid(format!("internal error: the extents end at {:#x}", self.pos)))),
        }
    }

    /// Plan the window at `self.pos`: its pieces, or nothing when it reads as zero.
    fn window(&mut self, end: u64) -> Result<Vec<Extent>> {
        let mut pieces = Vec::new();
        let mut pos = self.pos;
        while pos < end {
            let e = self.next_extent()?;
            let piece = e
                .clip(pos, end)
                .ok_or_else(|| Error::invalid(format!("internal error: extent {e:?} does not continue at {pos:#x}")))?;
            if e.end() > end {
                self.carry = Some(e.tail_from(end));
            }
            pos = piece.end();
            pieces.push(piece);
        }
        if !pieces.iter().any(|p| p.kind.is_data()) {
            pieces.clear();
        }
        Ok(pieces)
    }

    /// Add `len` bytes of zeros at `self.pos` to the zero run.
    fn add_zeros(&mut self, len: u64) {
        match &mut self.zero_run {
            Some((_, l)) if *l + len <= self.max_zero => *l += len,
            _ => {
                if let Some((start, len)) = self.zero_run.replace((self.pos, len)) {
                    self.ready.push_back(Unit { start, len, pieces: Vec::new() });
                }
            }
        }
        self.pos += len;
    }

    fn plan(&mut self) -> Result<()> {
        if self.pos >= self.end {
            self.failed = true;
            if let Some((start, len)) = self.zero_run.take() {
                self.ready.push_back(Unit { start, len, pieces: Vec::new() });
            }
            return Ok(());
        }
        // A long zero extent: whole windows at once, without cutting it into pieces.
        if self.carry.is_none() {
            self.carry = Some(self.next_extent()?);
        }
        if let Some(c) = self.carry.filter(|c| !c.kind.is_data() && c.start == self.pos) {
            let whole = (c.end() - self.pos) / UNIT_BYTES * UNIT_BYTES;
            if whole > 0 {
                let mut left = whole;
                while left > 0 {
                    let n = left.min(self.max_zero);
                    self.add_zeros(n);
                    left -= n;
                }
                self.carry = (c.end() > self.pos).then(|| c.tail_from(self.pos));
                return Ok(());
            }
        }
        let end = self.pos.saturating_add(UNIT_BYTES).min(self.end);
        let pieces = self.window(end)?;
        if pieces.is_empty() {
            self.add_zeros(end - self.pos);
        } else {
            if let Some((start, len)) = self.zero_run.take() {
                self.ready.push_back(Unit { start, len, pieces: Vec::new() });
            }
            self.ready.push_back(Unit { start: self.pos, len: end - self.pos, pieces });
            self.pos = end;
        }
        Ok(())
    }
}

impl Iterator for Units<'_> {
    type Item = Result<Unit>;

    fn next(&mut self) -> Option<Result<Unit>> {
        loop {
            if let Some(unit) = self.ready.pop_front() {
                return Some(Ok(unit));
            }
            if self.failed {
                return None;
            }
            if let Err(e) = self.plan() {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }
}

/// Read a unit's pieces into `buf` (its length).
fn read_unit(image: &Image, unit: &Unit, buf: &mut [u8], scratch: &mut ReadScratch) -> Result<()> {
    for piece in &unit.pieces {
        let from = usize::try_from(piece.start - unit.start).unwrap_or(0);
        let to = usize::try_from(piece.end() - unit.start).unwrap_or(buf.len());
        image.read_extent(piece, &mut buf[from..to], scratch)?;
    }
    Ok(())
}

fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "the checksum was cancelled")
}

/// Compute the checksum of `image`'s guest content (or of its first `options.size` bytes).
///
/// ```
/// # fn main() -> vdisk_core::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("empty.raw");
/// std::fs::File::create(&path).unwrap().set_len(64 << 10).unwrap();
/// let image = vdisk_core::Image::open(&path, &Default::default())?;
/// let sum = vdisk_core::checksum(&image, &Default::default())?;
/// // blkhash of one 64 KiB block of zeros (blkhash's own test vector).
/// assert_eq!(sum.digest, "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af");
/// # Ok(()) }
/// ```
pub fn checksum(image: &Image, options: &ChecksumOptions<'_>) -> Result<Checksum> {
    image.require_selected_disk()?;
    let size = match options.size {
        None => image.virtual_size(),
        Some(n) if n <= image.virtual_size() => n,
        Some(n) => {
            return Err(Error::new(
                ErrorKind::Target,
                format!("cannot hash {n} bytes: the image holds only {} bytes", image.virtual_size()),
            ))
        }
    };
    let threads = options.threads.unwrap_or_else(|| image.default_threads()).clamp(1, MAX_THREADS);
    let reporting =
        Reporting { progress: options.progress, cancel: options.cancel, interval: options.progress_interval };
    let done = AtomicU64::new(0);
    let digest = match options.algorithm {
        ChecksumAlgorithm::Blkhash => blkhash(image, size, threads, &done, &reporting)?,
        ChecksumAlgorithm::Sha256 => sha256(image, size, threads, &done, &reporting)?,
    };
    Ok(Checksum { algorithm: options.algorithm, size, digest })
}

fn blkhash(image: &Image, size: u64, threads: usize, done: &AtomicU64, reporting: &Reporting<'_>) -> Result<String> {
    let hasher = StreamHasher::new(size);
    pool::run(
        threads,
        Units::new(image, size, MAX_ZERO_UNIT_BLKHASH),
        || (PageBuf::default(), ReadScratch::default()),
        |(buf, scratch): &mut (PageBuf, ReadScratch), unit: Unit| {
            if unit.pieces.is_empty() {
                hasher.add(unit.start, unit.len, None)?;
            } else {
                let n = usize::try_from(unit.len).map_err(|_| Error::invalid("unit too large"))?;
                read_unit(image, &unit, buf.resize(n), scratch)?;
                hasher.add(unit.start, unit.len, Some(buf.get()))?;
            }
            done.fetch_add(unit.len, Relaxed);
            Ok(())
        },
        || hasher.stop(),
        cancelled,
        done,
        size,
        reporting,
    )?;
    hasher.finish()
}

/// Buffers handed back by the plain SHA-256 fold for reuse.
type FreeList = Arc<Mutex<Vec<Vec<u8>>>>;

/// The plain SHA-256 fold: a unit's bytes, or its length in zeros.
struct Plain {
    hash: Sha256,
    free: FreeList,
}

impl Fold<std::result::Result<Vec<u8>, u64>> for Plain {
    fn fold(&mut self, unit: std::result::Result<Vec<u8>, u64>) {
        match unit {
            Ok(buf) => {
                self.hash.update(&buf);
                self.free.lock().unwrap_or_else(PoisonError::into_inner).push(buf);
            }
            Err(mut zeros) => {
                static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
                while zeros > 0 {
                    let n = zeros.min(ZEROS.len() as u64);
                    self.hash.update(&ZEROS[..usize::try_from(n).unwrap_or(ZEROS.len())]);
                    zeros -= n;
                }
            }
        }
    }
}

fn sha256(image: &Image, size: u64, threads: usize, done: &AtomicU64, reporting: &Reporting<'_>) -> Result<String> {
    let free: FreeList = Arc::default();
    let fold = OrderedFold::new(SHA256_WINDOW, Plain { hash: Sha256::new(), free: free.clone() });
    pool::run(
        threads,
        Units::new(image, size, MAX_ZERO_UNIT_SHA256),
        ReadScratch::default,
        |scratch: &mut ReadScratch, unit: Unit| {
            let end = unit.start + unit.len;
            if unit.pieces.is_empty() {
                fold.deposit(unit.start, end, Err(unit.len))?;
            } else {
                let n = usize::try_from(unit.len).map_err(|_| Error::invalid("unit too large"))?;
                let mut buf = free.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default();
                buf.resize(n, 0);
                read_unit(image, &unit, &mut buf, scratch)?;
                fold.deposit(unit.start, end, Ok(buf))?;
            }
            done.fetch_add(unit.len, Relaxed);
            Ok(())
        },
        || fold.stop(),
        cancelled,
        done,
        size,
        reporting,
    )?;
    let (folded, waiting, plain) = fold.into_parts();
    if folded != size || waiting {
        return Err(Error::invalid(format!("internal error: the sha256 covers {folded:#x} of {size:#x} bytes")));
    }
    Ok(hex(&plain.hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{MemSource, ReadAt};

    fn image(bytes: Vec<u8>) -> Image {
        let src: Arc<dyn ReadAt> = Arc::new(MemSource(Arc::from(bytes)));
        Image::from_source(src, &Default::default()).unwrap()
    }

    #[test]
    fn both_algorithms_match_their_definitions_on_memory_images() {
        for len in [0usize, 1, 65535, 65536, 65537, (9 << 20) + 12345] {
            let data: Vec<u8> = (0..len).map(|i| if (i >> 16) % 3 == 0 { 0 } else { (i * 7 % 251) as u8 }).collect();
            let img = image(data.clone());
            for threads in [1, 3] {
                let opts = ChecksumOptions { threads: Some(threads), ..Default::default() };
                assert_eq!(checksum(&img, &opts).unwrap().digest, super::super::blkhash::blkhash(&data));
                let opts = ChecksumOptions { algorithm: ChecksumAlgorithm::Sha256, ..opts };
                assert_eq!(checksum(&img, &opts).unwrap().digest, hex(&Sha256::digest(&data)));
            }
            if len > 10 {
                let opts = ChecksumOptions { size: Some(10), ..Default::default() };
                assert_eq!(checksum(&img, &opts).unwrap().digest, super::super::blkhash::blkhash(&data[..10]));
            }
        }
        let opts = ChecksumOptions { size: Some(2), ..Default::default() };
        assert_eq!(checksum(&image(vec![1]), &opts).unwrap_err().kind(), ErrorKind::Target);
    }
}
