//! What `info` and `check` report, with qemu-img's JSON keys.

use serde::Serialize;
use serde_json::Value;

use crate::probe::Format;

/// An internal snapshot, as `qemu-img info` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Instruction count when taken, where recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    /// Guest clock, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Snapshot name.
    pub name: String,
    /// Wall-clock time taken, seconds.
    pub date_sec: u64,
    /// Wall-clock time taken, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock, seconds part.
    pub vm_clock_sec: u64,
    /// Snapshot id.
    pub id: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
}

impl SnapshotInfo {
    /// A snapshot entry.
    pub fn new(
        id: String,
        name: String,
        vm_state_size: u64,
        date_sec: u64,
        date_nsec: u64,
        vm_clock_nsec_total: u64,
    ) -> Self {
        SnapshotInfo {
            icount: None,
            vm_clock_nsec: vm_clock_nsec_total % 1_000_000_000,
            name,
            date_sec,
            date_nsec,
            vm_clock_sec: vm_clock_nsec_total / 1_000_000_000,
            id,
            vm_state_size,
        }
    }
}

/// What `vdisk info` reports about an image; serialises to `qemu-img info --output json`'s keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct ImageInfo {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The file name as given.
    pub filename: String,
    /// Cluster, grain or block size, where the format has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// qemu's format name.
    pub format: String,
    /// Bytes the file occupies on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Whether the image is encrypted (only present where the format can be).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// The backing file or parent, as the image names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The backing file resolved against the image's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing file's format, where the image records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Format-specific details: `{"type": FORMAT, "data": {...}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<Value>,
    /// Whether the image was not closed cleanly.
    pub dirty_flag: bool,
}

impl ImageInfo {
    pub(crate) fn new(filename: String, format: Format, virtual_size: u64, actual_size: Option<u64>) -> Self {
        ImageInfo {
            virtual_size,
            filename,
            cluster_size: None,
            format: format.as_str().to_string(),
            actual_size,
            encrypted: None,
            snapshots: Vec::new(),
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            format_specific: None,
            dirty_flag: false,
        }
    }

    /// Record the backing file `name` as named by the image at `self.filename`.
    pub(crate) fn set_backing(&mut self, name: &str, format: Option<&str>) {
        self.backing_filename = Some(name.to_string());
        let full = if name.starts_with('/') || self.filename.is_empty() {
            name.to_string()
        } else {
            match std::path::Path::new(&self.filename).parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.join(name).display().to_string(),
                _ => name.to_string(),
            }
        };
        self.full_backing_filename = Some(full);
        self.backing_filename_format = format.map(str::to_string);
    }

    /// Set `format-specific` to `{"type": type, "data": data}`.
    pub(crate) fn set_format_specific(&mut self, kind: &str, data: Value) {
        self.format_specific = Some(serde_json::json!({ "type": kind, "data": data }));
    }

    /// The JSON document `vdisk info --output json` prints (qemu-img's layout, 4-space indent).
    pub fn to_json(&self) -> String {
        to_qemu_json(self)
    }
}

/// Serialise like qemu-img: pretty, four-space indent.
pub(crate) fn to_qemu_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if value.serialize(&mut ser).is_err() {
        return "{}".to_string();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// One problem `check` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckProblem {
    /// `corruption` or `leak`.
    pub kind: &'static str,
    /// What and where.
    pub message: String,
}

/// What `vdisk check` reports; serialises with `qemu-img check --output json`'s keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct CheckReport {
    /// The file name as given.
    pub filename: String,
    /// qemu's format name.
    pub format: String,
    /// Errors that make reads wrong (a reference count too low, a table pointing out of the file).
    pub corruptions: u64,
    /// Space allocated but used by nothing.
    pub leaks: u64,
    /// Errors while checking (unreadable metadata).
    pub check_errors: u64,
    /// Offset just past the last byte the image uses, where the format defines it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    /// Clusters (or blocks) in the virtual disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    /// Clusters (or blocks) allocated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    /// Allocated clusters not contiguous with their predecessor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragmented_clusters: Option<u64>,
    /// Compressed clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_clusters: Option<u64>,
    /// The problems found, one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<CheckProblem>,
}

/// Most problems recorded one by one; beyond this they are only counted, so a hostile image
/// cannot make the report unbounded.
pub const MAX_CHECK_PROBLEMS: usize = 1000;

impl CheckReport {
    pub(crate) fn new(filename: String, format: Format) -> Self {
        CheckReport {
            filename,
            format: format.as_str().to_string(),
            corruptions: 0,
            leaks: 0,
            check_errors: 0,
            image_end_offset: None,
            total_clusters: None,
            allocated_clusters: None,
            fragmented_clusters: None,
            compressed_clusters: None,
            problems: Vec::new(),
        }
    }

    /// Record a corruption.
    pub(crate) fn corruption(&mut self, message: impl Into<String>) {
        self.corruptions += 1;
        self.note("corruption", message.into());
    }

    /// Record a leak.
    pub(crate) fn leak(&mut self, message: impl Into<String>) {
        self.leaks += 1;
        self.note("leak", message.into());
    }

    fn note(&mut self, kind: &'static str, message: String) {
        if self.problems.len() < MAX_CHECK_PROBLEMS {
            self.problems.push(CheckProblem { kind, message });
        }
    }

    /// qemu-img's exit status for this report: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 || self.check_errors > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The JSON document `vdisk check --output json` prints.
    pub fn to_json(&self) -> String {
        to_qemu_json(self)
    }
}
