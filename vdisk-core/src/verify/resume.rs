//! Resumable conversion: binding a journal to a conversion, skipping what it records, and
//! recording what gets durably written.
//!
//! - The journal names the source (path, format, virtual size, the identity of every file it
//!   reads, a SHA-256 of its extent map), the target (device and inode or device number, size,
//!   the kernel's serial for a device) and the options that change what is written
//!   (`--target-is-zero`). A journal that does not match is refused with what changed; one
//!   whose target is gone is refused; `--restart` discards it.
//! - Before trusting a partial journal, a few recorded ranges are read back from the target and
//!   compared with the source, which catches a target rewritten or swapped between runs.
//! - Work items the journal covers are skipped. A finished item is recorded only after an
//!   `fdatasync` of the target that follows it (every `checkpoint_interval` or
//!   `checkpoint_bytes` of work, when the copy stops, and at the end), so a kill loses at most
//!   one interval of work and never records what is not durable.
//! - Zero ranges: with `--target-is-zero` the journal proves every earlier write came from this
//!   same source and options, so the target still reads as zero wherever nothing was written and
//!   the option stays valid; without it, every zero range not recorded is zeroed again.
//! - The conversion is complete only once every range is recorded after a final flush; a rerun
//!   on a complete journal does nothing and says so.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::blkhash::hex;
use super::journal::{dev_numbers, what_changed, Complete, Header, Journal, OptionsId, RangeSet, SourceId, TargetId};
use crate::copy::observer::{ItemDone, Observer};
use crate::copy::{TargetIdentity, TargetKind};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{ExtentKind, Location};
use crate::image::Image;

/// Recorded ranges read back from the target and compared with the source before resuming.
const SPOT_CHECKS: usize = 8;

/// Bytes compared at each spot check.
const SPOT_BYTES: usize = 64 << 10;

fn refuse(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Journal,
        format!("journal {} does not match this conversion: {why}; use --restart to discard it", path.display()),
    )
}

/// SHA-256 over the image's extent map: every extent's range, kind, layer and location.
fn map_digest(image: &Image) -> Result<String> {
    let mut h = Sha256::new();
    for e in image.extents() {
        let e = e?;
        h.update(e.start.to_le_bytes());
        h.update(e.len.to_le_bytes());
        match e.kind {
            ExtentKind::Data { layer, location } => {
                h.update([0u8]);
                h.update(layer.to_le_bytes());
                match location {
                    Location::File { file, offset } => {
                        h.update([0u8]);
                        h.update((file.index() as u64).to_le_bytes());
                        h.update(offset.to_le_bytes());
                    }
                    Location::Compressed(u) => {
                        h.update([1u8]);
                        h.update((u.file.index() as u64).to_le_bytes());
                        h.update(u.method.as_str().as_bytes());
                        for v in [u.offset, u.stored_len, u.unit_len, u.skip] {
                            h.update(v.to_le_bytes());
                        }
                    }
                }
            }
            ExtentKind::Zero { layer } => {
                h.update([1u8]);
                h.update(layer.to_le_bytes());
            }
            _ => h.update([2u8]),
        }
    }
    Ok(hex(&h.finalize()))
}

/// What the kernel says identifies block device `rdev`, if anything.
fn device_serial(rdev: u64) -> Option<String> {
    let (major, minor) = dev_numbers(rdev);
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let read =
        |p: &str| std::fs::read_to_string(sys.join(p)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if let Some(s) = ["device/wwid", "wwid", "device/serial", "serial"].into_iter().find_map(read) {
        return Some(s);
    }
    // A loop device: its backing file, and that file's inode (a path may be reused).
    let backing = read("loop/backing_file")?;
    let ino = std::fs::metadata(&backing).map(|m| format!(" (inode {} on {})", m.ino(), m.dev())).unwrap_or_default();
    Some(format!("loop:{backing}{ino}"))
}

fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// When to checkpoint: after `interval`, or `bytes` of work, whichever comes first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Checkpoints {
    pub(crate) interval: Duration,
    pub(crate) bytes: u64,
}

/// A journal read and checked against the source, before the target is opened.
pub(crate) struct Plan {
    path: PathBuf,
    source: SourceId,
    existing: Option<Journal>,
}

impl Plan {
    /// Read the journal at `path` (unless `restart`) for converting `image` to `target`.
    pub(crate) fn load(image: &Image, target: &Path, path: &Path, restart: bool) -> Result<Plan> {
        let files = image
            .source_identities()
            .into_iter()
            .map(|id| {
                id.ok_or_else(|| {
                    Error::unsupported("a resume journal needs a source that can be identified (a file or URL)")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Ok(meta) = std::fs::metadata(path) {
            let id = (meta.dev(), meta.ino());
            if image.file_ids().any(|f| f == id) {
                return Err(Error::new(
                    ErrorKind::Journal,
                    format!("journal {} is one of the source's files", path.display()),
                ));
            }
            if std::fs::metadata(target).is_ok_and(|t| (t.dev(), t.ino()) == id) {
                return Err(Error::new(ErrorKind::Journal, format!("journal {} is the target itself", path.display())));
            }
        }
        // A disk read front to back has no extent map; its files' identities bind it.
        let map_sha256 =
            if image.sequential().is_some() { "none (read front to back)".into() } else { map_digest(image)? };
        let source = SourceId {
            path: image.path().map(absolute).unwrap_or_default(),
            format: image.format().to_string(),
            virtual_size: image.virtual_size(),
            files,
            map_sha256,
        };
        let existing = if restart { None } else { Journal::read(path)? };
        if let Some(j) = &existing {
            if std::fs::symlink_metadata(target).is_err() {
                return Err(refuse(
                    path,
                    format!(
                        "its target {} no longer exists, so what it records as written is gone",
                        j.header.target.path
                    ),
                ));
            }
        }
        Ok(Plan { path: path.to_path_buf(), source, existing })
    }

    /// Bind the plan to the opened target: check it matches the journal (and that the target
    /// still holds what the journal records), or start a new journal.
    pub(crate) fn bind<'a>(
        self,
        image: &Image,
        target: &Path,
        identity: Option<TargetIdentity>,
        target_is_zero: bool,
        flush: &'a (dyn Fn() -> io::Result<()> + Sync),
        checkpoints: Checkpoints,
    ) -> Result<Resume<'a>> {
        let path = self.path;
        let identity = identity
            .ok_or_else(|| Error::new(ErrorKind::Journal, "a resume journal needs a target file or block device"))?;
        let device = identity.kind == TargetKind::BlockDevice;
        let journal_dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if device && std::fs::metadata(journal_dir).is_ok_and(|m| m.dev() == identity.rdev) {
            return Err(Error::new(
                ErrorKind::Journal,
                format!("journal {} would be on the target device itself", path.display()),
            ));
        }
        let header = Header {
            vdisk: env!("CARGO_PKG_VERSION").to_string(),
            source: self.source,
            target: TargetId {
                path: absolute(target),
                kind: if device { "block-device" } else { "file" }.to_string(),
                dev: identity.dev,
                ino: identity.ino,
                rdev: identity.rdev,
                size: identity.size,
                serial: if device { device_serial(identity.rdev) } else { None },
            },
            options: OptionsId { target_is_zero },
        };
        let (done, complete) = match self.existing {
            Some(j) => {
                if let Some(change) = what_changed(&j.header, &header) {
                    return Err(refuse(&path, change));
                }
                if image.sequential().is_none() {
                    spot_check(image, target, &path, &j.done)?;
                }
                (j.done, j.complete)
            }
            None => {
                let fresh = Journal { header: header.clone(), done: RangeSet::default(), complete: None };
                fresh.write(&path)?;
                (RangeSet::default(), None)
            }
        };
        Ok(Resume {
            path,
            header,
            size: image.virtual_size(),
            initial: done.clone(),
            complete,
            flush,
            interval: checkpoints.interval,
            bytes: checkpoints.bytes,
            state: Mutex::new(State { recorded: done, fresh: RangeSet::default(), work: 0, last: Instant::now() }),
        })
    }
}

/// Compare a few recorded ranges of the target with the source.
fn spot_check(image: &Image, target: &Path, path: &Path, done: &RangeSet) -> Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    let file = File::open(target).map_err(|e| Error::io(format!("cannot read back target {}", target.display()), e))?;
    let ranges = done.ranges();
    let mut offsets = Vec::new();
    if let (Some(first), Some(last)) = (ranges.first(), ranges.last()) {
        offsets.push((first.0, first.1));
        offsets.push((last.1.saturating_sub(SPOT_BYTES as u64).max(last.0), last.1));
    }
    // The rest spread over the recorded bytes, from a seed that differs between runs.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0));
    let total = done.total();
    while offsets.len() < SPOT_CHECKS {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let mut k = (z ^ (z >> 31)) % total.max(1);
        for &(s, e) in ranges {
            if k < e - s {
                offsets.push((s + k, e));
                break;
            }
            k -= e - s;
        }
    }
    let mut want = vec![0u8; SPOT_BYTES];
    let mut got = vec![0u8; SPOT_BYTES];
    for (at, range_end) in offsets {
        let n = usize::try_from(range_end - at).unwrap_or(SPOT_BYTES).min(SPOT_BYTES);
        image.read_at(&mut want[..n], at)?;
        file.read_exact_at(&mut got[..n], at)
            .map_err(|e| Error::io(format!("cannot read back target {} at {at:#x}", target.display()), e))?;
        if want[..n] != got[..n] {
            return Err(refuse(
                path,
                format!(
                    "it records {at:#x}..{:#x} as written, but the target holds other bytes there (written by something else since?)",
                    at + n as u64
                ),
            ));
        }
    }
    Ok(())
}

struct State {
    /// Ranges the journal on disk records.
    recorded: RangeSet,
    /// Ranges finished since the last checkpoint.
    fresh: RangeSet,
    /// Bytes written or zeroed since the last checkpoint.
    work: u64,
    last: Instant,
}

/// A bound journal, watching the copy.
pub(crate) struct Resume<'a> {
    path: PathBuf,
    header: Header,
    size: u64,
    /// What the journal recorded when the run started: skipped.
    initial: RangeSet,
    complete: Option<Complete>,
    flush: &'a (dyn Fn() -> io::Result<()> + Sync),
    interval: Duration,
    bytes: u64,
    state: Mutex<State>,
}

impl Resume<'_> {
    /// The record of a finished conversion, when the journal has one.
    pub(crate) fn complete(&self) -> Option<&Complete> {
        self.complete.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, done: RangeSet, complete: Option<Complete>) -> Result<()> {
        Journal { header: self.header.clone(), done, complete }.write(&self.path)
    }

    /// Make what was finished durable, then record it.
    pub(crate) fn checkpoint(&self) -> Result<()> {
        let fresh = {
            let mut state = self.lock();
            state.last = Instant::now();
            state.work = 0;
            std::mem::take(&mut state.fresh)
        };
        if fresh.is_empty() {
            return Ok(());
        }
        // Every item in `fresh` had its writes return before it was added: this covers them.
        (self.flush)().map_err(|e| Error::io("flushing the target before a checkpoint", e))?;
        let done = {
            let mut state = self.lock();
            state.recorded.extend(&fresh);
            state.recorded.clone()
        };
        self.write(done, None)
    }

    /// The copy finished and the target was flushed by the caller's sink: flush, check that
    /// every byte is recorded, and mark the journal complete. `whole`: the copy (a front-to-back
    /// stream, which reports no items) wrote the whole disk.
    pub(crate) fn finish(&self, checksum: Option<String>, whole: bool) -> Result<()> {
        (self.flush)().map_err(|e| Error::io("flushing the target", e))?;
        let done = {
            let mut state = self.lock();
            let fresh = std::mem::take(&mut state.fresh);
            state.recorded.extend(&fresh);
            if whole {
                state.recorded.insert(0, self.size);
            }
            state.recorded.clone()
        };
        if self.size > 0 && !done.covers(0, self.size) {
            return Err(Error::invalid(format!(
                "internal error: the copy finished with {} of {} bytes recorded",
                done.total(),
                self.size
            )));
        }
        let checksum = checksum.or_else(|| self.complete.as_ref().and_then(|c| c.checksum.clone()));
        self.write(done, Some(Complete { checksum }))
    }
}

impl Observer for Resume<'_> {
    fn skip(&self, start: u64, len: u64) -> bool {
        self.initial.covers(start, start.saturating_add(len))
    }

    fn item_done(&self, item: &ItemDone<'_>) -> Result<()> {
        if !item.skipped {
            let mut state = self.lock();
            state.fresh.insert(item.start, item.start + item.len);
            state.work = state.work.saturating_add(item.work_bytes);
        }
        Ok(())
    }

    fn tick(&self) -> Result<()> {
        let due = {
            let state = self.lock();
            !state.fresh.is_empty() && (state.last.elapsed() >= self.interval || state.work >= self.bytes)
        };
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }
}
