//! The resume journal's file: what a conversion is (source, target, options), which ranges of
//! the virtual disk are durably written, and whether it finished.
//!
//! Layout: the 16-byte magic `VDISK-JOURNAL\0\0\x01`, then records, each
//!
//! | bytes | field |
//! |---|---|
//! | 4 | payload length, little-endian |
//! | 1 | record type: 1 header (JSON), 2 done ranges, 3 complete (JSON) |
//! | n | payload |
//! | 4 | CRC-32 (IEEE) of the length, type and payload, little-endian |
//!
//! A journal is exactly one header record, one done-ranges record (pairs of little-endian u64
//! `start, end`, sorted, disjoint, not touching) and, once the conversion finished, one complete
//! record. Anything else, a bad CRC, or a file that ends early is refused as corrupt: a journal
//! is trusted whole or not at all. The file is replaced atomically at every checkpoint (written
//! beside it, synced, renamed, directory synced), so a crash leaves the old or the new one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The magic at the start of every journal (the last byte is the format version).
const MAGIC: &[u8; 16] = b"VDISK-JOURNAL\0\0\x01";

/// Largest journal read: headers are a few KiB and done ranges stay few (the copy finishes work
/// items nearly in order), so anything near this is not a journal vdisk wrote.
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// Bytes of a record around its payload: length, type, CRC.
const RECORD_OVERHEAD: usize = 4 + 1 + 4;

const HEADER: u8 = 1;
const DONE: u8 = 2;
const COMPLETE: u8 = 3;

/// The source a journal was written for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct SourceId {
    /// The path (absolute) or URL.
    pub(crate) path: String,
    /// The format read.
    pub(crate) format: String,
    /// Its virtual size.
    pub(crate) virtual_size: u64,
    /// The identity of every file it reads (`ReadAt::identity`: device, inode, size and mtime,
    /// or an ETag).
    pub(crate) files: Vec<String>,
    /// SHA-256 of its extent map (every extent's range, kind and location).
    pub(crate) map_sha256: String,
}

/// The target a journal was written for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct TargetId {
    /// The path, as shown in messages (not compared: a device may be reached by several).
    pub(crate) path: String,
    /// `file` or `block-device`.
    pub(crate) kind: String,
    /// Device and inode of the file (for a device: of its node).
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// Device number of a block device (0 for files).
    pub(crate) rdev: u64,
    /// Size in bytes.
    pub(crate) size: u64,
    /// What the kernel says identifies the device (`wwid`, `serial`, or a loop device's backing
    /// file and inode), when it says anything.
    pub(crate) serial: Option<String>,
}

/// The options that change what is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct OptionsId {
    /// `--target-is-zero`: zero ranges are left alone.
    pub(crate) target_is_zero: bool,
}

/// What a journal is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Header {
    /// The vdisk version that wrote it.
    pub(crate) vdisk: String,
    pub(crate) source: SourceId,
    pub(crate) target: TargetId,
    pub(crate) options: OptionsId,
}

/// The record of a finished conversion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Complete {
    /// The blkhash of the content, when one was computed.
    pub(crate) checksum: Option<String>,
}

/// Sorted, disjoint, non-touching ranges `start..end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    /// Add `start..end`, merging it with what it overlaps or touches.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range that ends at or after `start` (it may touch or overlap).
        let i = self.0.partition_point(|&(_, e)| e < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < self.0.len() && self.0[j].0 <= end {
            s = s.min(self.0[j].0);
            e = e.max(self.0[j].1);
            j += 1;
        }
        self.0.splice(i..j, [(s, e)]);
    }

    /// Add every range of `other`.
    pub(crate) fn extend(&mut self, other: &RangeSet) {
        for &(s, e) in &other.0 {
            self.insert(s, e);
        }
    }

    /// True when `start..end` lies wholly inside the set.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        let i = self.0.partition_point(|&(_, e)| e < end);
        self.0.get(i).is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// Bytes in the set.
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|&(s, e)| e - s).sum()
    }

    /// The ranges.
    pub(crate) fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A whole journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Journal {
    pub(crate) header: Header,
    pub(crate) done: RangeSet,
    pub(crate) complete: Option<Complete>,
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Journal,
        format!("journal {} is damaged ({what}); it is not trusted: remove it or use --restart", path.display()),
    )
}

fn record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| Error::limit("journal record too large"))?;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

impl Journal {
    /// The file's bytes.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let mut out = MAGIC.to_vec();
        record(&mut out, HEADER, &json(&self.header)?)?;
        let ranges: Vec<u8> =
            self.done.0.iter().flat_map(|&(s, e)| s.to_le_bytes().into_iter().chain(e.to_le_bytes())).collect();
        record(&mut out, DONE, &ranges)?;
        if let Some(c) = &self.complete {
            record(&mut out, COMPLETE, &json(c)?)?;
        }
        Ok(out)
    }

    /// Parse a journal's bytes; `path` is for messages.
    pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Journal> {
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(|| {
            if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
                corrupt(path, "it ends inside its first bytes")
            } else {
                Error::new(ErrorKind::Journal, format!("{} is not a vdisk journal", path.display()))
            }
        })?;
        let mut records = Vec::new();
        let mut pos = 0usize;
        while pos < rest.len() {
            let at = pos + MAGIC.len();
            let Some(len_bytes) = rest.get(pos..pos + 4) else {
                return Err(corrupt(path, format!("truncated record at {at:#x}")));
            };
            let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
            let end = pos.checked_add(len).and_then(|n| n.checked_add(RECORD_OVERHEAD));
            let Some(whole) = end.and_then(|end| rest.get(pos..end)) else {
                return Err(corrupt(path, format!("truncated record at {at:#x}")));
            };
            let (body, crc) = whole.split_at(whole.len() - 4);
            if crc32fast::hash(body).to_le_bytes() != crc {
                return Err(corrupt(path, format!("bad checksum in the record at {at:#x}")));
            }
            records.push((at, body[4], &body[5..]));
            pos += whole.len();
        }
        let kinds: Vec<u8> = records.iter().map(|r| r.1).collect();
        if kinds != [HEADER, DONE] && kinds != [HEADER, DONE, COMPLETE] {
            return Err(corrupt(path, format!("unexpected records {kinds:?}")));
        }
        let header: Header = serde_json::from_slice(records[0].2)
            .map_err(|e| corrupt(path, format!("header at {:#x}: {e}", records[0].0)))?;
        let ranges = records[1].2;
        if ranges.len() % 16 != 0 {
            return Err(corrupt(path, format!("done ranges at {:#x} have a partial entry", records[1].0)));
        }
        let mut done = RangeSet::default();
        let mut last_end = None;
        for pair in ranges.chunks_exact(16) {
            let word = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            let (s, e) = (word(&pair[..8]), word(&pair[8..]));
            if s >= e || e > header.source.virtual_size || last_end.is_some_and(|l| s <= l) {
                return Err(corrupt(path, format!("done range {s:#x}..{e:#x} out of order or past the disk")));
            }
            last_end = Some(e);
            done.0.push((s, e));
        }
        let complete = match records.get(2) {
            Some(&(at, _, body)) => {
                Some(serde_json::from_slice(body).map_err(|e| corrupt(path, format!("record at {at:#x}: {e}")))?)
            }
            None => None,
        };
        Ok(Journal { header, done, complete })
    }

    /// Read the journal at `path`; `None` when there is none.
    pub(crate) fn read(path: &Path) -> Result<Option<Journal>> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read journal {}", path.display()), e)),
        };
        if !meta.is_file() {
            return Err(Error::new(ErrorKind::Journal, format!("journal {} is not a regular file", path.display())));
        }
        if meta.len() > MAX_JOURNAL_BYTES {
            return Err(corrupt(path, format!("{} bytes, more than any journal vdisk writes", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("cannot read journal {}", path.display()), e))?;
        Journal::decode(path, &bytes).map(Some)
    }

    /// Replace the journal at `path` with this one, durably and atomically.
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.encode()?;
        let tmp = temp_path(path);
        let fail = |e| Error::io(format!("cannot write journal {}", path.display()), e);
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(fail)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
        Ok(())
    }
}

/// Where a journal is written before it replaces the old one.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A Linux device number's major and minor parts.
pub(crate) fn dev_numbers(dev: u64) -> (u64, u64) {
    (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff))
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::invalid(format!("journal: {e}")))
}

/// What changed between the journal's header and this run's, as a phrase; `None` when nothing.
pub(crate) fn what_changed(old: &Header, new: &Header) -> Option<String> {
    let (o, n) = (&old.source, &new.source);
    if old.vdisk != new.vdisk {
        return Some(format!("it was written by vdisk {}, this is vdisk {}", old.vdisk, new.vdisk));
    }
    if o.path != n.path {
        return Some(format!("the source changed: it was {}, now {}", o.path, n.path));
    }
    if o.format != n.format || o.virtual_size != n.virtual_size {
        return Some(format!(
            "the source changed: it was {} of {} bytes, now {} of {} bytes",
            o.format, o.virtual_size, n.format, n.virtual_size
        ));
    }
    if o.files != n.files {
        let (a, b) = o.files.iter().zip(&n.files).find(|(a, b)| a != b).map_or_else(
            || (format!("{} files", o.files.len()), format!("{} files", n.files.len())),
            |(a, b)| (a.clone(), b.clone()),
        );
        return Some(format!("the source changed: its identity was {a}, now {b}"));
    }
    if o.map_sha256 != n.map_sha256 {
        return Some("the source changed: its extent map differs".to_string());
    }
    let (o, n) = (&old.target, &new.target);
    if o.kind != n.kind || o.dev != n.dev || o.ino != n.ino || o.rdev != n.rdev {
        let id = |t: &TargetId| {
            if t.kind == "block-device" {
                let (major, minor) = dev_numbers(t.rdev);
                format!("{} (device {major}:{minor})", t.path)
            } else {
                format!("{} (inode {} on device {})", t.path, t.ino, t.dev)
            }
        };
        return Some(format!("the target changed: it was {}, now {}", id(o), id(n)));
    }
    if o.size != n.size {
        return Some(format!("the target changed: it held {} bytes, now {}", o.size, n.size));
    }
    if o.serial != n.serial {
        return Some(format!(
            "the target changed: it was {}, now {}",
            o.serial.as_deref().unwrap_or("unidentified"),
            n.serial.as_deref().unwrap_or("unidentified")
        ));
    }
    if old.options.target_is_zero != new.options.target_is_zero {
        let on = |b: bool| if b { "on" } else { "off" };
        return Some(format!(
            "the options changed: --target-is-zero was {}, now {}",
            on(old.options.target_is_zero),
            on(new.options.target_is_zero)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        Journal {
            header: Header {
                vdisk: "0.1.0".into(),
                source: SourceId {
                    path: "/src.qcow2".into(),
                    format: "qcow2".into(),
                    virtual_size: 1 << 30,
                    files: vec!["file:1:2:3:4".into()],
                    map_sha256: "ab".into(),
                },
                target: TargetId {
                    path: "/dev/loop0".into(),
                    kind: "block-device".into(),
                    dev: 5,
                    ino: 6,
                    rdev: 7 << 8,
                    size: 2 << 30,
                    serial: None,
                },
                options: OptionsId { target_is_zero: false },
            },
            done: RangeSet(vec![(0, 4096), (8192, 1 << 20)]),
            complete: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_any_damage() {
        let p = Path::new("j");
        let j = sample();
        let bytes = j.encode().unwrap();
        assert_eq!(Journal::decode(p, &bytes).unwrap(), j);
        let mut done = j.clone();
        done.complete = Some(Complete { checksum: Some("00".into()) });
        assert_eq!(Journal::decode(p, &done.encode().unwrap()).unwrap(), done);
        // Every truncation and every single-bit flip is refused.
        for n in 0..bytes.len() {
            let e = Journal::decode(p, &bytes[..n]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Journal, "{n}: {e}");
        }
        for i in 0..bytes.len() {
            for bit in [0, 3, 7] {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(Journal::decode(p, &b).is_err(), "flip of bit {bit} at {i} accepted");
            }
        }
        // A valid record appended is refused too.
        let mut extra = bytes.clone();
        record(&mut extra, DONE, &[]).unwrap();
        assert!(Journal::decode(p, &extra).is_err());
    }

    #[test]
    fn range_sets_merge() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.ranges(), [(10, 40)]);
        r.insert(0, 5);
        r.insert(50, 60);
        r.insert(4, 51);
        assert_eq!(r.ranges(), [(0, 60)]);
        assert!(r.covers(0, 60) && r.covers(3, 7) && !r.covers(59, 61));
        r.insert(100, 200);
        assert!(!r.covers(50, 150) && r.covers(100, 200));
        assert_eq!(r.total(), 160);
    }

    #[test]
    fn names_what_changed() {
        let a = sample().header;
        assert_eq!(what_changed(&a, &a), None);
        let mut b = a.clone();
        b.source.files[0] = "file:1:2:3:5".into();
        assert!(what_changed(&a, &b).unwrap().contains("file:1:2:3:4, now file:1:2:3:5"));
        let mut b = a.clone();
        b.target.rdev = 8 << 8;
        assert!(what_changed(&a, &b).unwrap().starts_with("the target changed"));
        let mut b = a.clone();
        b.options.target_is_zero = true;
        assert_eq!(what_changed(&a, &b).unwrap(), "the options changed: --target-is-zero was off, now on");
    }
}
