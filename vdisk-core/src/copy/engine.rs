//! Executing a plan: a rayon pool owned by the call reads and decompresses work items in
//! parallel, straight from each extent's location, and writes them with positional writes, in
//! any order. The calling thread reports progress and watches for cancellation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rayon::iter::{ParallelBridge, ParallelIterator};

use super::observer::{ItemContent, ItemDone, Observer};
use super::plan::{Planner, WorkItem};
use super::sink::{Sink, DIRECT_ALIGN};
use crate::decompress::ReadScratch;
use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;

/// Granule of zero detection in data items: the file-system block size, so that a zero granule
/// left as a hole frees a whole block.
const ZERO_GRANULE: usize = 4096;

/// Zero runs inside a data item shorter than this are written as data when the target needs
/// zeroing (one large write beats a write, a zeroing call and another write).
const MIN_ZERO_RUN: usize = 64 << 10;

/// Counters shared by the workers and the reporting thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) done: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) zeroed: AtomicU64,
    /// Bytes an observer said were already done (resume).
    pub(crate) skipped: AtomicU64,
}

/// One worker's reusable state.
struct Worker<'a> {
    image: &'a Image,
    sink: &'a Sink,
    counters: &'a Counters,
    buf: AlignedBuf,
    scratch: ReadScratch,
    observers: &'a [&'a dyn Observer],
}

/// A buffer whose start is aligned for `O_DIRECT`: a vector over-allocated by the alignment and
/// used from its first aligned byte.
#[derive(Default)]
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Make the buffer `len` bytes long (contents unspecified) and return it.
    fn resize(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + DIRECT_ALIGN {
            self.raw = vec![0u8; len + DIRECT_ALIGN];
            self.start = self.raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        }
        self.len = len;
        &mut self.raw[self.start..self.start + len]
    }

    fn get(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl Worker<'_> {
    fn run(&mut self, item: WorkItem) -> Result<()> {
        let (start, len) = match &item {
            WorkItem::Zero { start, len } | WorkItem::Data { start, len, .. } => (*start, *len),
        };
        let skipped = self.observers.iter().any(|o| o.skip(start, len));
        let mut work_bytes = 0;
        let content = match item {
            WorkItem::Zero { .. } => {
                if self.sink.zero_needed() && !skipped {
                    self.sink
                        .zero_range(start, len)
                        .map_err(|e| Error::io(format!("zeroing the target at {start:#x}"), e))?;
                    self.counters.zeroed.fetch_add(len, Relaxed);
                    work_bytes = len;
                }
                ItemContent::Zero
            }
            WorkItem::Data { .. } if skipped && !self.observers.iter().any(|o| o.wants_content()) => {
                ItemContent::Unread
            }
            WorkItem::Data { pieces, .. } => {
                let n = usize::try_from(len).map_err(|_| Error::invalid("work item too large"))?;
                let buf = self.buf.resize(n);
                for piece in &pieces {
                    let from = usize::try_from(piece.start - start).unwrap_or(0);
                    let to = usize::try_from(piece.end() - start).unwrap_or(n);
                    self.image.read_extent(piece, &mut buf[from..to], &mut self.scratch)?;
                }
                if !skipped {
                    work_bytes = self.write(start)?;
                    self.sink.written(self.counters.written.load(Relaxed));
                }
                ItemContent::Data(self.buf.get())
            }
        };
        if skipped {
            self.counters.skipped.fetch_add(len, Relaxed);
        }
        let done = ItemDone { start, len, content, skipped, work_bytes };
        for observer in self.observers {
            observer.item_done(&done)?;
        }
        self.counters.done.fetch_add(len, Relaxed);
        Ok(())
    }

    /// Write the buffer at `start`, leaving out zero granules (holes in a new file, zeroed ranges
    /// elsewhere); returns the bytes written or zeroed.
    fn write(&mut self, start: u64) -> Result<u64> {
        let buf = self.buf.get();
        let zero_needed = self.sink.zero_needed();
        let mut work = 0u64;
        let mut pos = 0;
        while pos < buf.len() {
            // Find the next run of zero granules long enough to treat apart.
            let data_start = pos;
            let mut zero_start = buf.len();
            let mut zero_end = buf.len();
            let mut i = pos;
            while i < buf.len() {
                let g_end = (i + ZERO_GRANULE).min(buf.len());
                if is_zero(&buf[i..g_end]) {
                    let mut j = g_end;
                    while j < buf.len() {
                        let k = (j + ZERO_GRANULE).min(buf.len());
                        if !is_zero(&buf[j..k]) {
                            break;
                        }
                        j = k;
                    }
                    if !zero_needed || j - i >= MIN_ZERO_RUN || (i == 0 && j == buf.len()) {
                        zero_start = i;
                        zero_end = j;
                        break;
                    }
                    i = j;
                } else {
                    i = g_end;
                }
            }
            if data_start < zero_start {
                let at = start + data_start as u64;
                self.sink
                    .write_at(&buf[data_start..zero_start], at)
                    .map_err(|e| Error::io(format!("writing the target at {at:#x}"), e))?;
                self.counters.written.fetch_add((zero_start - data_start) as u64, Relaxed);
                work += (zero_start - data_start) as u64;
            }
            if zero_start < zero_end && zero_needed {
                let at = start + zero_start as u64;
                let len = (zero_end - zero_start) as u64;
                self.sink.zero_range(at, len).map_err(|e| Error::io(format!("zeroing the target at {at:#x}"), e))?;
                self.counters.zeroed.fetch_add(len, Relaxed);
                work += len;
            }
            pos = zero_end;
        }
        Ok(work)
    }
}

/// True when every byte is zero; OR-folding fixed-size chunks lets the compiler vectorise it.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0) && chunks.remainder().iter().all(|&b| b == 0)
}

/// How the calling thread reports.
pub(crate) struct Reporting<'a> {
    pub(crate) progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    pub(crate) cancel: Option<&'a AtomicBool>,
    pub(crate) interval: Duration,
}

/// Run the whole copy of `image` into `sink` on `threads` threads with items of `item_size`,
/// telling `observers` about every item.
pub(crate) fn execute(
    image: &Image,
    sink: &Sink,
    threads: usize,
    item_size: u64,
    counters: &Counters,
    reporting: &Reporting<'_>,
    observers: &[&dyn Observer],
) -> Result<()> {
    let total = image.virtual_size();
    let stop = AtomicBool::new(false);
    let cancelled = || stop.load(Relaxed) || reporting.cancel.is_some_and(|c| c.load(Relaxed));
    let first_error: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("vdisk-copy-{i}"))
        .build()
        .map_err(|e| Error::new(ErrorKind::Io, format!("cannot start copy threads: {e}")))?;
    let run = || -> Result<()> {
        let items = Planner::new(image.extents(), item_size);
        pool.install(|| {
            items.par_bridge().try_for_each_init(
                || Worker {
                    image,
                    sink,
                    counters,
                    buf: AlignedBuf::default(),
                    scratch: ReadScratch::default(),
                    observers,
                },
                |worker, item| {
                    if cancelled() {
                        return Err(Error::new(ErrorKind::Cancelled, "the conversion was cancelled"));
                    }
                    worker.run(item?).map_err(|e| {
                        // Keep the first error (rayon returns any one of them), then release copy
                        // threads an observer may hold waiting for this one.
                        let mut first = first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if first.is_none() {
                            *first = Some(e);
                            drop(first);
                            observers.iter().for_each(|o| o.abort());
                        }
                        Error::new(ErrorKind::Cancelled, "stopped by an error in another copy thread")
                    })
                },
            )
        })
    };
    let mut tick_error = None;
    let result = std::thread::scope(|s| {
        // The copy runs on its own thread; this one reports progress and watches for
        // cancellation, and is woken the moment the copy ends (no polling latency).
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
            if tick_error.is_none() {
                if let Some(e) = observers.iter().find_map(|o| o.tick().err()) {
                    tick_error = Some(e);
                    stop.store(true, Relaxed);
                    observers.iter().for_each(|o| o.abort());
                }
            }
            if let Some(progress) = reporting.progress {
                if last.elapsed() >= reporting.interval {
                    last = Instant::now();
                    progress(counters.done.load(Relaxed).min(total), total);
                }
            }
        }
        handle.join().unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "a copy thread panicked")))
    });
    if let Some(e) = tick_error {
        return Err(e);
    }
    if result.is_err() && reporting.cancel.is_some_and(|c| c.load(Relaxed)) {
        return Err(Error::new(ErrorKind::Cancelled, "the conversion was cancelled"));
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    result?;
    if let Some(progress) = reporting.progress {
        progress(total, total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 10001];
        assert!(is_zero(&v));
        assert!(is_zero(&v[3..]));
        v[10000] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&v[..10000]));
    }
}
