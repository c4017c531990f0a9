//! `vdisk.convert` and `vdisk.ConvertReport`.
//!
//! The copy runs on the core's own thread pool with the GIL released. The core calls the progress
//! callback on the thread that called `convert` about every 100 ms; the binding re-acquires the
//! GIL there, checks for signals (so Ctrl-C cancels even without a user callback), then calls the
//! user's `progress`. A `KeyboardInterrupt`, or any exception from `progress`, sets the cancel flag
//! and is raised once the copy has stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use vdisk_core::ConvertOptions;

use crate::errors;
use crate::options::{http_options, open_options, Limits};

/// What :func:`vdisk.convert` did.
#[pyclass(module = "vdisk", frozen)]
#[derive(Clone, Debug)]
pub(crate) struct ConvertReport {
    /// The virtual size of the image, in bytes (all of it was converted).
    #[pyo3(get)]
    virtual_size: u64,
    /// Bytes written as data.
    #[pyo3(get)]
    bytes_written: u64,
    /// Bytes explicitly zeroed on the target (holes punched, ``BLKZEROOUT``, or zeros written).
    #[pyo3(get)]
    bytes_zeroed: u64,
    /// Wall-clock seconds the conversion took.
    #[pyo3(get)]
    seconds: f64,
    /// Copy threads used.
    #[pyo3(get)]
    threads: usize,
    /// What the target was: ``"new-file"``, ``"existing-file"``, ``"block-device"`` or ``"null"``.
    #[pyo3(get)]
    target: &'static str,
    /// Bytes the journal recorded as already written by an interrupted run, not written again.
    #[pyo3(get)]
    bytes_skipped: u64,
    /// With ``checksum=True``, the blkhash of the content written (what :func:`vdisk.checksum`
    /// gives for the target's first ``virtual_size`` bytes); otherwise ``None``.
    #[pyo3(get)]
    checksum: Option<String>,
    /// The journal recorded this conversion as complete, so nothing was written.
    #[pyo3(get)]
    already_complete: bool,
}

#[pymethods]
impl ConvertReport {
    fn __repr__(&self) -> String {
        format!(
            "ConvertReport(virtual_size={}, bytes_written={}, bytes_zeroed={}, bytes_skipped={}, seconds={:.3}, threads={}, target='{}', checksum={})",
            self.virtual_size,
            self.bytes_written,
            self.bytes_zeroed,
            self.bytes_skipped,
            self.seconds,
            self.threads,
            self.target,
            self.checksum.as_ref().map_or("None".to_string(), |c| format!("'{c}'"))
        )
    }
}

/// Convert the image at ``src`` to its raw guest content at ``dst`` (a file or a block device),
/// like ``qemu-img convert -O raw``.
///
/// A missing ``dst`` is created sparse; an existing file or device is never truncated or resized,
/// must be at least the virtual size, and has its zero ranges zeroed unless ``target_is_zero``.
/// ``must_exist`` refuses to create ``dst`` (``-n``); ``require_device`` refuses anything but a
/// block device (``-O host_device``). ``format``, ``references``, ``limits`` and ``disk`` are as
/// for :func:`vdisk.open` (an OVA of several disks needs ``disk``); ``threads`` defaults to every
/// core.
///
/// ``checksum=True`` computes the blkhash of the content while writing it (``report.checksum``).
/// ``journal`` names a resume journal (never on the target): a call with the same source, target
/// and options after an interrupted one skips what the journal records as durably written
/// (``report.bytes_skipped``), and a call after a finished one does nothing
/// (``report.already_complete``). A journal that does not match raises :class:`JournalError`
/// saying what changed; ``restart=True`` discards it.
///
/// ``progress(done, total)`` is called with bytes of the virtual disk done about every 100 ms on the
/// calling thread, and once with ``done == total`` at the end. An exception it raises stops the copy
/// and is re-raised; Ctrl-C (``KeyboardInterrupt``) stops it within a second. A stopped copy leaves
/// ``dst`` as written so far. The GIL is released while the copy runs.
#[pyfunction]
#[pyo3(signature = (
    src, dst, *, format=None, references="deny", threads=None, target_is_zero=false, progress=None,
    must_exist=false, require_device=false, limits=None, disk=None, checksum=false, journal=None, restart=false,
    http_headers=None, http_connections=None, http_retries=None, http_timeout=None, url_refresh=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn convert(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    format: Option<&str>,
    references: &str,
    threads: Option<usize>,
    target_is_zero: bool,
    progress: Option<PyObject>,
    must_exist: bool,
    require_device: bool,
    limits: Option<&Limits>,
    disk: Option<i64>,
    checksum: bool,
    journal: Option<PathBuf>,
    restart: bool,
    http_headers: Option<HashMap<String, String>>,
    http_connections: Option<usize>,
    http_retries: Option<u32>,
    http_timeout: Option<f64>,
    url_refresh: Option<PyObject>,
) -> PyResult<ConvertReport> {
    if restart && journal.is_none() {
        return Err(PyValueError::new_err("restart=True needs a journal"));
    }
    let mut options = open_options(format, references, limits, disk)?;
    options.http = http_options(http_headers, http_connections, http_retries, http_timeout, url_refresh)?;
    if threads == Some(0) {
        return Err(PyValueError::new_err("threads must be at least 1"));
    }
    if let Some(callback) = &progress {
        if !callback.bind(py).is_callable() {
            return Err(PyTypeError::new_err("progress must be callable as progress(done, total)"));
        }
    }
    let image = py.allow_threads(|| vdisk_core::Image::open(&src, &options)).map_err(|e| errors::to_py(py, e))?;

    let cancel = AtomicBool::new(false);
    // The first exception from a signal handler or from `progress`; raised after the copy.
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let on_progress = |done: u64, total: u64| {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        Python::with_gil(|py| {
            let outcome = py.check_signals().and_then(|()| match &progress {
                Some(callback) => callback.call1(py, (done, total)).map(drop),
                None => Ok(()),
            });
            if let Err(err) = outcome {
                *raised.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                cancel.store(true, Ordering::Relaxed);
            }
        });
    };
    let convert_options = ConvertOptions {
        threads,
        target_is_zero,
        must_exist,
        require_device,
        progress: Some(&on_progress),
        cancel: Some(&cancel),
        checksum,
        journal: journal.as_deref(),
        restart,
        ..ConvertOptions::default()
    };
    let result = py.allow_threads(|| vdisk_core::convert(&image, &dst, &convert_options));
    if let Some(err) = raised.lock().unwrap_or_else(PoisonError::into_inner).take() {
        return Err(err);
    }
    // A signal that arrived after the last callback is not lost.
    py.check_signals()?;
    match result {
        Ok(report) => Ok(ConvertReport {
            virtual_size: report.virtual_size,
            bytes_written: report.bytes_written,
            bytes_zeroed: report.bytes_zeroed,
            seconds: report.seconds,
            threads: report.threads,
            target: report.target.as_str(),
            bytes_skipped: report.bytes_skipped,
            checksum: report.checksum,
            already_complete: report.already_complete,
        }),
        Err(e) => Err(errors::to_py(py, e)),
    }
}
