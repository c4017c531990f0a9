//! `vdisk.checksum`, `vdisk.compare`, and their result types.
//!
//! Like `convert`, each call runs with the GIL released; progress callbacks run on the calling
//! thread, which also checks for signals (Ctrl-C cancels), and an exception from either stops the
//! work and is raised once it has stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use vdisk_core::{ChecksumAlgorithm, ChecksumOptions, CompareOptions, Difference};

use crate::errors;
use crate::options::{http_options, open_options, HttpArgs, Limits};

/// A digest of an image's guest content, from :func:`vdisk.checksum`.
#[pyclass(module = "vdisk", frozen, eq)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Checksum {
    /// ``"blkhash"`` (SHA-256 over 64 KiB blocks, as ``blksum`` computes it) or ``"sha256"``.
    #[pyo3(get)]
    algorithm: &'static str,
    /// The blkhash block size (65536), or ``None`` for plain SHA-256.
    #[pyo3(get)]
    block_size: Option<u64>,
    /// Bytes of guest content hashed.
    #[pyo3(get)]
    virtual_size: u64,
    /// The digest in lowercase hex.
    #[pyo3(get)]
    digest: String,
}

#[pymethods]
impl Checksum {
    fn __repr__(&self) -> String {
        format!(
            "Checksum(algorithm='{}', virtual_size={}, digest='{}')",
            self.algorithm, self.virtual_size, self.digest
        )
    }

    fn __str__(&self) -> String {
        self.digest.clone()
    }
}

/// The result of :func:`vdisk.compare`.
#[pyclass(module = "vdisk", frozen)]
#[derive(Clone, Debug)]
pub(crate) struct Comparison {
    /// True when the images hold the same guest content (and, with ``strict``, the same size
    /// and allocation).
    #[pyo3(get)]
    identical: bool,
    /// How they differ: ``"content"``, ``"size"`` (strict) or ``"allocation"`` (strict); ``None``
    /// when identical.
    #[pyo3(get)]
    difference: Option<&'static str>,
    /// The exact offset of the first difference (content or allocation), or ``None``.
    #[pyo3(get)]
    offset: Option<u64>,
    /// Virtual size of the first image.
    #[pyo3(get)]
    size_a: u64,
    /// Virtual size of the second image.
    #[pyo3(get)]
    size_b: u64,
    /// Bytes read from both images together.
    #[pyo3(get)]
    bytes_read: u64,
    /// Wall-clock seconds.
    #[pyo3(get)]
    seconds: f64,
    /// What ``qemu-img compare`` prints for this result, one line per item.
    #[pyo3(get)]
    messages: Vec<String>,
}

#[pymethods]
impl Comparison {
    fn __repr__(&self) -> String {
        format!(
            "Comparison(identical={}, difference={}, offset={}, size_a={}, size_b={})",
            if self.identical { "True" } else { "False" },
            self.difference.map_or("None".to_string(), |d| format!("'{d}'")),
            self.offset.map_or("None".to_string(), |o| o.to_string()),
            self.size_a,
            self.size_b
        )
    }

    fn __bool__(&self) -> bool {
        self.identical
    }
}

/// Run `work` with the GIL released, bridging progress, signals and cancellation.
fn run_released<T: Send>(
    py: Python<'_>,
    progress: Option<&PyObject>,
    work: impl FnOnce(&(dyn Fn(u64, u64) + Sync), &AtomicBool) -> T + Send,
) -> PyResult<T> {
    if let Some(callback) = progress {
        if !callback.bind(py).is_callable() {
            return Err(PyTypeError::new_err("progress must be callable as progress(done, total)"));
        }
    }
    let cancel = AtomicBool::new(false);
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let on_progress = |done: u64, total: u64| {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        Python::with_gil(|py| {
            let outcome = py.check_signals().and_then(|()| match progress {
                Some(callback) => callback.call1(py, (done, total)).map(drop),
                None => Ok(()),
            });
            if let Err(err) = outcome {
                *raised.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                cancel.store(true, Ordering::Relaxed);
            }
        });
    };
    let result = py.allow_threads(|| work(&on_progress, &cancel));
    if let Some(err) = raised.lock().unwrap_or_else(PoisonError::into_inner).take() {
        return Err(err);
    }
    py.check_signals()?;
    Ok(result)
}

/// The digest of the guest content of the image (or raw file, or block device) at ``path``,
/// independent of its format: a qcow2, its VMDK export and the device it was written to give the
/// same value.
///
/// ``algorithm="blkhash"`` (default) is blkhash with SHA-256 and 64 KiB blocks, what ``blksum`` and
/// ``nbdcopy --blkhash`` print; zero and unallocated ranges are not read, and blocks are hashed on
/// every core. ``"sha256"`` is the plain SHA-256 of the content (``sha256sum`` of the raw image).
/// ``size`` hashes only the first ``size`` bytes: the virtual size of an image written to a larger
/// device. ``format``, ``references``, ``limits`` and ``disk`` are as for :func:`vdisk.open`.
#[pyfunction]
#[pyo3(signature = (
    path, *, format=None, algorithm="blkhash", size=None, references="deny", threads=None, limits=None, progress=None,
    disk=None, headers=None, http=None, http_headers=None, http_connections=None, http_retries=None, http_timeout=None, url_refresh=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn checksum(
    py: Python<'_>,
    path: PathBuf,
    format: Option<&str>,
    algorithm: &str,
    size: Option<u64>,
    references: &str,
    threads: Option<usize>,
    limits: Option<&Limits>,
    progress: Option<PyObject>,
    disk: Option<i64>,
    headers: Option<HashMap<String, String>>,
    http: Option<HashMap<String, PyObject>>,
    http_headers: Option<HashMap<String, String>>,
    http_connections: Option<usize>,
    http_retries: Option<u32>,
    http_timeout: Option<f64>,
    url_refresh: Option<PyObject>,
) -> PyResult<Checksum> {
    let mut options = open_options(format, references, limits, disk)?;
    options.http = HttpArgs { headers, http, http_headers, http_connections, http_retries, http_timeout, url_refresh }
        .into_options(py)?;
    let algorithm = algorithm.parse::<ChecksumAlgorithm>().map_err(errors::value_error)?;
    if threads == Some(0) {
        return Err(PyValueError::new_err("threads must be at least 1"));
    }
    let result = run_released(py, progress.as_ref(), |on_progress, cancel| {
        let image = vdisk_core::Image::open(&path, &options)?;
        let opts = ChecksumOptions {
            algorithm,
            size,
            threads,
            progress: Some(on_progress),
            cancel: Some(cancel),
            ..ChecksumOptions::default()
        };
        let shown = PathBuf::from(vdisk_core::redact_url(&path.display().to_string()));
        vdisk_core::checksum(&image, &opts).map_err(|e| e.in_file(&shown))
    })?;
    let sum = result.map_err(|e| errors::to_py(py, e))?;
    Ok(Checksum {
        algorithm: sum.algorithm.as_str(),
        block_size: sum.algorithm.block_size(),
        virtual_size: sum.size,
        digest: sum.digest,
    })
}

/// Compare the guest content of two images, with ``qemu-img compare``'s semantics: without
/// ``strict``, images of different sizes are identical when the longer one's excess reads as
/// zero; with ``strict``, a different size or a different allocation at the same offset is a
/// difference. The first difference is reported at its exact byte (qemu-img rounds it down to
/// 512). Ranges where both sides are zero or unallocated are not read.
///
/// ``disk_a``/``disk_b`` choose a disk of an OVA, as ``disk`` does for :func:`vdisk.open`. Raises
/// like :func:`vdisk.open` when an image cannot be opened or read.
#[pyfunction]
#[pyo3(signature = (
    a, b, *, format_a=None, format_b=None, strict=false, references="deny", threads=None, limits=None, progress=None,
    disk_a=None, disk_b=None, http_headers=None, http_connections=None, http_retries=None, http_timeout=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn compare(
    py: Python<'_>,
    a: PathBuf,
    b: PathBuf,
    format_a: Option<&str>,
    format_b: Option<&str>,
    strict: bool,
    references: &str,
    threads: Option<usize>,
    limits: Option<&Limits>,
    progress: Option<PyObject>,
    disk_a: Option<i64>,
    disk_b: Option<i64>,
    http_headers: Option<HashMap<String, String>>,
    http_connections: Option<usize>,
    http_retries: Option<u32>,
    http_timeout: Option<f64>,
) -> PyResult<Comparison> {
    let http = http_options(http_headers, http_connections, http_retries, http_timeout, None)?;
    let mut options_a = open_options(format_a, references, limits, disk_a)?;
    options_a.http = http.clone();
    let mut options_b = open_options(format_b, references, limits, disk_b)?;
    options_b.http = http;
    if threads == Some(0) {
        return Err(PyValueError::new_err("threads must be at least 1"));
    }
    let result = run_released(py, progress.as_ref(), |on_progress, cancel| {
        let image_a = vdisk_core::Image::open(&a, &options_a)?;
        let image_b = vdisk_core::Image::open(&b, &options_b)?;
        let opts = CompareOptions {
            strict,
            threads,
            progress: Some(on_progress),
            cancel: Some(cancel),
            ..CompareOptions::default()
        };
        let names =
            (vdisk_core::redact_url(&a.display().to_string()), vdisk_core::redact_url(&b.display().to_string()));
        vdisk_core::compare(&image_a, &image_b, (&names.0, &names.1), &opts).map_err(vdisk_core::Error::from)
    })?;
    let r = result.map_err(|e| errors::to_py(py, e))?;
    let (difference, offset) = match r.difference {
        None => (None, None),
        Some(Difference::Content { offset }) => (Some("content"), Some(offset)),
        Some(Difference::Size) => (Some("size"), None),
        Some(Difference::Allocation { offset }) => (Some("allocation"), Some(offset)),
        Some(_) => (Some("content"), None),
    };
    Ok(Comparison {
        identical: r.identical(),
        difference,
        offset,
        size_a: r.size_a,
        size_b: r.size_b,
        bytes_read: r.bytes_read,
        seconds: r.seconds,
        messages: r.qemu_lines(),
    })
}
