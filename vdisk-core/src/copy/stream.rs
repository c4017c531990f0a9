//! The sequential copy path: a disk that can only be read front to back (a gzip-compressed
//! streamOptimized VMDK inside an OVA) is decoded in stream order, its units inflated in parallel
//! and written where they belong, with the engine's guarantees:
//!
//! - memory is bounded: the pool's threads pull one unit at a time from the shared decoder, so at
//!   most one stored and one inflated unit per thread are held;
//! - every unit is written once (a second unit for the same range is an invalid stream), and on
//!   an existing target every range no unit covered is zeroed at the end (unless the target is
//!   known to be zero);
//! - progress follows the stored bytes consumed, scaled to the virtual size; cancellation is
//!   checked between units and between zeroed ranges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rayon::iter::{ParallelBridge, ParallelIterator};

use super::engine::{is_zero, Counters, Reporting};
use super::plan::MAX_ZERO_ITEM;
use super::sink::Sink;
use crate::decompress::{read_unit, ReadScratch};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{CompressedUnit, FileId, SequentialStream, SequentialUnit};
use crate::io::ReadAt;

/// The stored bytes of one unit, read by the decompressor as a file.
#[derive(Debug)]
struct Stored<'a>(&'a [u8]);

impl ReadAt for Stored<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let Some(rest) = usize::try_from(offset).ok().and_then(|o| self.0.get(o..)) else { return Ok(0) };
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Which units of the disk have been written: one bit per unit, set atomically.
struct Written {
    bits: Vec<AtomicU64>,
    unit: u64,
}

impl Written {
    fn new(size: u64, unit: u64, budget_bytes: u64) -> Result<Self> {
        let units = size.div_ceil(unit);
        let words = units.div_ceil(64);
        if words.saturating_mul(8) > budget_bytes {
            return Err(Error::limit(format!(
                "tracking {units} units of {unit} bytes needs {} bytes, beyond the metadata limit of {budget_bytes} (raise max_metadata_bytes / --max-metadata-bytes)",
                words.saturating_mul(8)
            )));
        }
        let n = usize::try_from(words).map_err(|_| Error::limit("the written-unit map does not fit in memory"))?;
        let mut bits = Vec::new();
        bits.try_reserve_exact(n).map_err(|_| Error::limit("the written-unit map does not fit in memory"))?;
        bits.resize_with(n, || AtomicU64::new(0));
        Ok(Written { bits, unit })
    }

    /// Mark the unit at `start`; false when it was already marked.
    fn mark(&self, start: u64) -> bool {
        let u = start / self.unit;
        let Some(word) = usize::try_from(u / 64).ok().and_then(|w| self.bits.get(w)) else { return false };
        let bit = 1u64 << (u % 64);
        word.fetch_or(bit, Relaxed) & bit == 0
    }

    fn is_marked(&self, u: u64) -> bool {
        usize::try_from(u / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|w| w.load(Relaxed) & (1 << (u % 64)) != 0)
    }

    /// The ranges of `0..size` no unit covered, in order.
    fn gaps(&self, size: u64) -> Vec<(u64, u64)> {
        let units = size.div_ceil(self.unit);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut u = 0;
        while u < units {
            if self.is_marked(u) {
                u += 1;
                continue;
            }
            let first = u;
            while u < units && !self.is_marked(u) {
                u += 1;
            }
            let start = first * self.unit;
            out.push((start, (u * self.unit).min(size) - start));
        }
        out
    }
}

/// Per-thread state.
#[derive(Default)]
struct Worker {
    buf: Vec<u8>,
    scratch: ReadScratch,
}

/// Write one unit.
fn write_unit(
    w: &mut Worker,
    unit: SequentialUnit,
    sink: &Sink,
    size: u64,
    written: &Written,
    counters: &Counters,
    max_unit_bytes: u64,
) -> Result<()> {
    let end = unit.start.checked_add(unit.len).filter(|&e| e <= size && unit.len > 0 && unit.len <= written.unit);
    if end.is_none() || unit.start % written.unit != 0 {
        return Err(Error::invalid(format!(
            "internal error: a stream unit {:#x}+{:#x} does not fit the disk's units",
            unit.start, unit.len
        )));
    }
    if !written.mark(unit.start) {
        return Err(Error::invalid(format!(
            "the stream holds the data at {:#x} twice (a stream stores each grain once)",
            unit.start
        )));
    }
    let n = usize::try_from(unit.len).map_err(|_| Error::invalid("stream unit too large"))?;
    w.buf.resize(n, 0);
    match unit.compression {
        None => {
            if unit.data.len() != n {
                return Err(Error::invalid(format!(
                    "stream unit at {:#x}: {} bytes stored for {n}",
                    unit.start,
                    unit.data.len()
                )));
            }
            w.buf.copy_from_slice(&unit.data);
        }
        Some((method, unit_len)) => {
            let cu = CompressedUnit {
                file: FileId(0),
                method,
                offset: 0,
                stored_len: unit.data.len() as u64,
                unit_len,
                skip: 0,
            };
            read_unit(&Stored(&unit.data), &cu, &mut w.buf, &mut w.scratch, max_unit_bytes)
                .map_err(|e| e.context(format!("the grain for {:#x}", unit.start)))?;
        }
    }
    if is_zero(&w.buf) {
        // Nothing to write on a new file; zeroed on an existing target like any gap.
        if sink.zero_needed() {
            sink.zero_range(unit.start, unit.len)
                .map_err(|e| Error::io(format!("zeroing the target at {:#x}", unit.start), e))?;
            counters.zeroed.fetch_add(unit.len, Relaxed);
        }
        return Ok(());
    }
    sink.write_at(&w.buf, unit.start).map_err(|e| Error::io(format!("writing the target at {:#x}", unit.start), e))?;
    counters.written.fetch_add(unit.len, Relaxed);
    Ok(())
}

/// Copy `stream`, a disk of `size` bytes, into `sink` on `threads` threads.
pub(crate) fn execute(
    stream: SequentialStream,
    size: u64,
    sink: &Sink,
    threads: usize,
    counters: &Counters,
    reporting: &Reporting<'_>,
    limits: (u64, u64),
) -> Result<()> {
    let (max_unit_bytes, max_metadata_bytes) = limits;
    let unit = stream.unit_size.max(1);
    let written = Written::new(size, unit, max_metadata_bytes)?;
    let stop = AtomicBool::new(false);
    let cancelled = || stop.load(Relaxed) || reporting.cancel.is_some_and(|c| c.load(Relaxed));
    let cancel_error = || Error::new(ErrorKind::Cancelled, "the conversion was cancelled");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("vdisk-copy-{i}"))
        .build()
        .map_err(|e| Error::new(ErrorKind::Io, format!("cannot start copy threads: {e}")))?;
    let consumed = stream.consumed.clone();
    let stored_len = stream.stored_len.max(1);
    // Progress: the share of the stored file consumed, scaled to the virtual size.
    let progress_done = || -> u64 {
        let c = u128::from(consumed.load(Relaxed).min(stored_len));
        u64::try_from(c * u128::from(size) / u128::from(stored_len)).unwrap_or(size)
    };
    let run = || -> Result<()> {
        let units = stream.units;
        pool.install(|| {
            units.par_bridge().try_for_each_init(Worker::default, |w, unit| {
                if cancelled() {
                    return Err(cancel_error());
                }
                write_unit(w, unit?, sink, size, &written, counters, max_unit_bytes)
            })
        })?;
        // Everything the stream did not cover reads as zero.
        if sink.zero_needed() {
            for (start, len) in written.gaps(size) {
                let mut pos = start;
                while pos < start + len {
                    if cancelled() {
                        return Err(cancel_error());
                    }
                    let n = (start + len - pos).min(MAX_ZERO_ITEM);
                    sink.zero_range(pos, n).map_err(|e| Error::io(format!("zeroing the target at {pos:#x}"), e))?;
                    counters.zeroed.fetch_add(n, Relaxed);
                    pos += n;
                }
            }
        }
        Ok(())
    };
    let result = std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let handle = s.spawn(move || {
            let r = run();
            let _ = done_tx.send(());
            r
        });
        let mut last = Instant::now();
        let tick = reporting.interval.min(Duration::from_millis(50)).max(Duration::from_millis(1));
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(tick) {
            if reporting.cancel.is_some_and(|c| c.load(Relaxed)) {
                stop.store(true, Relaxed);
            }
            if let Some(progress) = reporting.progress {
                if last.elapsed() >= reporting.interval {
                    last = Instant::now();
                    progress(progress_done().min(size), size);
                }
            }
        }
        handle.join().unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "a copy thread panicked")))
    });
    if result.is_err() && reporting.cancel.is_some_and(|c| c.load(Relaxed)) {
        return Err(cancel_error());
    }
    result?;
    counters.done.store(size, Relaxed);
    if let Some(progress) = reporting.progress {
        progress(size, size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_map_finds_gaps_and_repeats() {
        let w = Written::new(10 * 4096 + 100, 4096, 1 << 20).unwrap();
        assert!(w.mark(0));
        assert!(w.mark(4096 * 3));
        assert!(!w.mark(4096 * 3));
        assert!(w.mark(4096 * 10));
        assert_eq!(w.gaps(10 * 4096 + 100), vec![(4096, 2 * 4096), (4 * 4096, 6 * 4096)]);
        assert!(Written::new(1 << 40, 512, 1 << 20).is_err());
    }
}
