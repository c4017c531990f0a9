//! Converting an image to a raw file or block device: plan -> execute -> sink.

mod engine;
mod export;
pub(crate) mod observer;
mod plan;
mod sink;
mod stream;
// The export contract, implemented by each format's write.rs.
pub(crate) mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub(crate) use engine::is_zero;
pub(crate) use export::random_u64;
pub use export::{export, measure, measure_size, parse_option_pairs, ExportOptions, OutputFormat, Preset};
pub(crate) use sink::TargetIdentity;
pub use sink::TargetKind;
pub use writer::Measure;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::verify::blkhash::StreamHasher;
use crate::verify::resume;
use observer::Observer;

/// Default work item size: large enough that per-item overhead (a pool hand-off, a write call)
/// is negligible, small enough that threads x items stays a few tens of MiB, and at least the
/// largest qcow2 cluster (2 MiB) so no compressed cluster is split.
pub const DEFAULT_ITEM_SIZE: u64 = 4 << 20;

/// Default interval between resume-journal checkpoints: at most this much work is redone after
/// a kill.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Default bytes of work between resume-journal checkpoints, whichever comes first.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 1 << 30;

/// Default interval between progress callbacks.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A progress callback: bytes of the virtual disk done, and the total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// How to convert.
#[derive(Clone)]
pub struct ConvertOptions<'a> {
    /// Copy threads; `None` uses every available core.
    pub threads: Option<usize>,
    /// The target already reads as zero, so zero ranges need no work (`--target-is-zero`).
    pub target_is_zero: bool,
    /// The target must already exist (`-n`).
    pub must_exist: bool,
    /// The target must be a block device (`-O host_device`).
    pub require_device: bool,
    /// Write with `O_DIRECT`, bypassing the page cache (`-t none`): aligned data goes straight
    /// to the device; unaligned edges are written through the cache; the target is synced.
    pub direct_io: bool,
    /// Bytes per work item (rounded to at least 4 KiB).
    pub item_size: u64,
    /// Called from the calling thread with (done, total) at most every `progress_interval`, and
    /// once with done == total at the end of a successful copy.
    pub progress: Option<Progress<'a>>,
    /// Interval between progress callbacks.
    pub progress_interval: Duration,
    /// Set to true (from any thread) to stop the copy between work items.
    pub cancel: Option<&'a AtomicBool>,
    /// Compute the blkhash of what is written while writing it (`--checksum`).
    pub checksum: bool,
    /// Keep a resume journal here (`--journal`): a rerun with the same source, target and
    /// options skips what it records as written. Never on the target.
    pub journal: Option<&'a Path>,
    /// Discard an existing journal and start over (`--restart`).
    pub restart: bool,
    /// Most time between journal checkpoints.
    pub checkpoint_interval: Duration,
    /// Most bytes of work between journal checkpoints.
    pub checkpoint_bytes: u64,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            threads: None,
            target_is_zero: false,
            must_exist: false,
            require_device: false,
            direct_io: false,
            item_size: DEFAULT_ITEM_SIZE,
            progress: None,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            cancel: None,
            checksum: false,
            journal: None,
            restart: false,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
        }
    }
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("threads", &self.threads)
            .field("target_is_zero", &self.target_is_zero)
            .field("must_exist", &self.must_exist)
            .field("require_device", &self.require_device)
            .field("direct_io", &self.direct_io)
            .field("item_size", &self.item_size)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel.map(|c| c.load(Relaxed)))
            .field("checksum", &self.checksum)
            .field("journal", &self.journal)
            .field("restart", &self.restart)
            .finish()
    }
}

/// What a conversion did.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConvertReport {
    /// The virtual size copied.
    pub virtual_size: u64,
    /// Bytes written as data.
    pub bytes_written: u64,
    /// Bytes explicitly zeroed (punched, `BLKZEROOUT`, or written as zeros).
    pub bytes_zeroed: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
    /// The kind of target.
    pub target: TargetKind,
    /// Bytes a resume journal recorded as already written, so not written again.
    pub bytes_skipped: u64,
    /// The blkhash of the content, when asked for (`checksum`).
    pub checksum: Option<String>,
    /// The journal recorded the conversion as complete: nothing was written.
    pub already_complete: bool,
    /// The length of the image file written, for an export to an image format; `None` for raw.
    pub output_length: Option<u64>,
}

/// The number of threads `threads: None` means: every core this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Convert `image` to the raw file or block device at `target`.
///
/// A missing target is created sparse with the virtual size; an existing file or device is
/// never truncated or resized and must be at least the virtual size; zero ranges are zeroed on
/// existing targets unless `target_is_zero`. The target must not be one of the image's files.
/// With `journal`, the conversion resumes where an interrupted one with the same source, target
/// and options stopped (see `ConvertOptions::journal`); with `checksum`, the report carries the
/// blkhash of the content, computed from what was written (skipped ranges are read from the
/// source, without writing, so the digest always covers everything).
pub fn convert(image: &Image, target: impl AsRef<Path>, options: &ConvertOptions<'_>) -> Result<ConvertReport> {
    let target = target.as_ref();
    let started = Instant::now();
    image.require_selected_disk()?;
    // A disk that can only be read front to back (a gzip-compressed OVA member) takes the
    // sequential path; it refuses here, before the target is touched, if it cannot.
    let sequential = image.sequential().transpose()?;
    let front_to_back = sequential.is_some();
    let size = image.virtual_size();
    let plan = options.journal.map(|j| resume::Plan::load(image, target, j, options.restart)).transpose()?;
    let sources: Vec<(u64, u64)> = image.file_ids().collect();
    let sink = sink::open_target(
        target,
        size,
        &sources,
        sink::TargetRequest {
            must_exist: options.must_exist,
            require_device: options.require_device,
            target_is_zero: options.target_is_zero,
            direct: options.direct_io,
        },
    )?;
    let flush = || sink.sync_data();
    let journal = match plan {
        Some(plan) => {
            let identity =
                sink.identity().map_err(|e| Error::io(format!("cannot stat target {}", target.display()), e))?;
            Some(plan.bind(
                image,
                target,
                identity,
                options.target_is_zero,
                &flush,
                resume::Checkpoints { interval: options.checkpoint_interval, bytes: options.checkpoint_bytes },
            )?)
        }
        None => None,
    };
    let threads = options.threads.unwrap_or_else(|| image.default_threads()).clamp(1, MAX_THREADS);
    let report = |counters: &engine::Counters, checksum, already_complete| ConvertReport {
        virtual_size: size,
        bytes_written: counters.written.load(Relaxed),
        bytes_zeroed: counters.zeroed.load(Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        threads,
        target: sink.kind(),
        bytes_skipped: counters.skipped.load(Relaxed),
        checksum,
        already_complete,
        output_length: None,
    };
    let counters = engine::Counters::default();
    let already_complete = journal.as_ref().and_then(|j| j.complete()).cloned();
    if let Some(complete) = &already_complete {
        if !options.checksum || complete.checksum.is_some() {
            counters.skipped.store(size, Relaxed);
            if let Some(progress) = options.progress {
                progress(size, size);
            }
            let checksum = if options.checksum { complete.checksum.clone() } else { None };
            return Ok(report(&counters, checksum, true));
        }
        if sequential.is_some() {
            // No random access to hash the source again: hash what the target holds.
            counters.skipped.store(size, Relaxed);
            let checksum = Some(written_checksum(target, size, threads)?);
            return Ok(report(&counters, checksum, true));
        }
    }
    // A disk read front to back comes in stream order with its holes filled only at the end,
    // which the in-order digest cannot wait for: its checksum is taken from the target after
    // the copy, and its journal records the conversion only once it is complete.
    let hasher = (options.checksum && sequential.is_none()).then(|| StreamHasher::new(size));
    let observers: Vec<&dyn Observer> =
        [journal.as_ref().map(|j| j as &dyn Observer), hasher.as_ref().map(|h| h as &dyn Observer)]
            .into_iter()
            .flatten()
            .collect();
    let reporting =
        engine::Reporting { progress: options.progress, cancel: options.cancel, interval: options.progress_interval };
    let copied = match sequential {
        Some(stream) => {
            let limits = (image.max_unit_bytes(), image.max_metadata_bytes());
            stream::execute(stream, size, &sink, threads, &counters, &reporting, limits)
        }
        None => engine::execute(image, &sink, threads, options.item_size, &counters, &reporting, &observers),
    }
    .and_then(|()| sink.finish().map_err(|e| Error::io(format!("flushing {}", target.display()), e)));
    if let Err(e) = copied {
        if let Some(journal) = &journal {
            // Keep what was done: the next run resumes from here. A failure to record it only
            // means more work next time.
            let _ = journal.checkpoint();
        }
        return Err(e);
    }
    let checksum = match hasher {
        Some(hasher) => Some(hasher.finish()?),
        None if options.checksum => Some(written_checksum(target, size, threads)?),
        None => None,
    };
    if let Some(journal) = &journal {
        journal.finish(checksum.clone(), front_to_back)?;
    }
    Ok(report(&counters, checksum, already_complete.is_some()))
}

/// The blkhash of the first `size` bytes of `target`, read back (for a source without random
/// access).
fn written_checksum(target: &Path, size: u64, threads: usize) -> Result<String> {
    let raw = crate::image::OpenOptions { format: Some(crate::probe::Format::Raw), ..Default::default() };
    let written = Image::open(target, &raw)?;
    let options = crate::verify::ChecksumOptions { size: Some(size), threads: Some(threads), ..Default::default() };
    Ok(crate::verify::checksum(&written, &options)?.digest)
}

/// Most copy threads: beyond this, storage, not CPU, is the limit on any machine vdisk targets.
pub const MAX_THREADS: usize = 256;
