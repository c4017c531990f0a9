//! `vdisk.convert`, `vdisk.ConvertReport`, `vdisk.measure` and `vdisk.Measure`.
//!
//! The copy runs on the core's own thread pool with the GIL released. The core calls the progress
//! callback on the thread that called `convert` about every 100 ms; the binding re-acquires the
//! GIL there, checks for signals (so Ctrl-C cancels even without a user callback), then calls the
//! user's `progress`. A `KeyboardInterrupt`, or any exception from `progress`, sets the cancel flag
//! and is raised once the copy has stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use vdisk_core::{ConvertOptions, ExportOptions};

use crate::errors;
use crate::options::{open_options, HttpArgs, Limits};

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
    /// For an image output format (``output_format`` other than raw), the length of the file
    /// written; otherwise ``None``.
    #[pyo3(get)]
    output_length: Option<u64>,
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
/// ``output_format`` other than ``"raw"`` exports an image instead (``qemu-img convert -O``):
/// ``"qcow2"``, ``"vmdk"``, ``"vpc"`` (VHD) or ``"vhdx"``, with ``options`` in qemu-img's ``-o``
/// names (``{"compat": "0.10", "cluster_size": "2M"}``, ``{"subformat": "fixed"}``), ``compress``
/// for ``-c``, or a platform ``preset`` (``"azure"``, ``"esxi"``, ``"hyperv"``, ``"oci"``,
/// ``"aws"``, ``"openstack"``) that picks the format and options (``options`` still override).
/// The image is written under a temporary name beside ``dst`` and renamed into place when
/// complete, so a failed or cancelled export leaves nothing at ``dst``; ``round_up_mib`` grows
/// the disk to a whole MiB (what ``preset="azure"`` otherwise refuses); ``check_space=False``
/// skips the free-space check against :func:`measure`. The raw-only arguments (``must_exist``,
/// ``target_is_zero``, ``checksum``, ``journal``) are refused with an image format.
///
/// ``progress(done, total)`` is called with bytes of the virtual disk done about every 100 ms on the
/// calling thread, and once with ``done == total`` at the end. An exception it raises stops the copy
/// and is re-raised; Ctrl-C (``KeyboardInterrupt``) stops it within a second. A stopped copy leaves
/// ``dst`` as written so far. The GIL is released while the copy runs.
#[pyfunction]
#[pyo3(signature = (
    src, dst, *, format=None, references="deny", threads=None, target_is_zero=false, progress=None,
    must_exist=false, require_device=false, limits=None, disk=None, checksum=false, journal=None, restart=false,
    headers=None, http=None, http_headers=None, http_connections=None, http_retries=None, http_timeout=None, url_refresh=None,
    output_format=None, options=None, compress=false, preset=None, round_up_mib=false, check_space=true
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
    headers: Option<HashMap<String, String>>,
    http: Option<HashMap<String, PyObject>>,
    http_headers: Option<HashMap<String, String>>,
    http_connections: Option<usize>,
    http_retries: Option<u32>,
    http_timeout: Option<f64>,
    url_refresh: Option<PyObject>,
    output_format: Option<&str>,
    options: Option<std::collections::BTreeMap<String, String>>,
    compress: bool,
    preset: Option<&str>,
    round_up_mib: bool,
    check_space: bool,
) -> PyResult<ConvertReport> {
    let export = export_target(output_format, options, preset).map_err(|e| errors::to_py(py, e))?;
    let require_device = require_device || output_format == Some("host_device");
    if export.is_none() && (compress || round_up_mib) {
        return Err(PyValueError::new_err("compress and round_up_mib need an image output_format or a preset"));
    }
    if export.is_some() && (must_exist || target_is_zero || checksum || journal.is_some() || require_device) {
        return Err(PyValueError::new_err(
            "must_exist, target_is_zero, checksum, journal and require_device apply to raw output only",
        ));
    }
    if restart && journal.is_none() {
        return Err(PyValueError::new_err("restart=True needs a journal"));
    }
    let mut options = open_options(format, references, limits, disk)?;
    options.http = HttpArgs { headers, http, http_headers, http_connections, http_retries, http_timeout, url_refresh }
        .into_options(py)?;
    // Set on Ctrl-C or an exception from `progress`; a remote read waiting to retry also sees it
    // (the calling thread checks for signals every progress tick, even while no bytes move).
    let cancel = Arc::new(AtomicBool::new(false));
    options.http.interrupted = Some(Arc::new({
        let cancel = Arc::clone(&cancel);
        move || cancel.load(Ordering::Relaxed)
    }));
    if threads == Some(0) {
        return Err(PyValueError::new_err("threads must be at least 1"));
    }
    if let Some(callback) = &progress {
        if !callback.bind(py).is_callable() {
            return Err(PyTypeError::new_err("progress must be callable as progress(done, total)"));
        }
    }
    let image = py.allow_threads(|| vdisk_core::Image::open(&src, &options)).map_err(|e| errors::to_py(py, e))?;

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
    if let Some((format, pairs)) = export {
        let export_options = ExportOptions {
            format,
            options: pairs,
            compress,
            threads,
            progress: Some(&on_progress),
            cancel: Some(&*cancel),
            check_space,
            preset: preset.map(vdisk_core::Preset::from_name).transpose().map_err(|e| errors::to_py(py, e))?,
            round_up_mib,
            ..ExportOptions::default()
        };
        let result = py.allow_threads(|| vdisk_core::export(&image, &dst, &export_options));
        if let Some(err) = raised.lock().unwrap_or_else(PoisonError::into_inner).take() {
            return Err(err);
        }
        py.check_signals()?;
        return result.map(report_from).map_err(|e| errors::to_py(py, e));
    }
    let convert_options = ConvertOptions {
        threads,
        target_is_zero,
        must_exist,
        require_device,
        progress: Some(&on_progress),
        cancel: Some(&*cancel),
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
    result.map(report_from).map_err(|e| errors::to_py(py, e))
}

fn report_from(report: vdisk_core::ConvertReport) -> ConvertReport {
    ConvertReport {
        virtual_size: report.virtual_size,
        bytes_written: report.bytes_written,
        bytes_zeroed: report.bytes_zeroed,
        seconds: report.seconds,
        threads: report.threads,
        target: report.target.as_str(),
        bytes_skipped: report.bytes_skipped,
        checksum: report.checksum,
        already_complete: report.already_complete,
        output_length: report.output_length,
    }
}

/// An image output format and its `-o` pairs.
type ImageOutput = (vdisk_core::OutputFormat, Vec<(String, String)>);

/// The image format and `-o` pairs `output_format`, `options` and `preset` ask for; `None` for
/// raw content (`output_format` None, `"raw"` or `"host_device"` without a preset).
fn export_target(
    output_format: Option<&str>,
    options: Option<std::collections::BTreeMap<String, String>>,
    preset: Option<&str>,
) -> vdisk_core::Result<Option<ImageOutput>> {
    let pairs: Vec<(String, String)> = options.unwrap_or_default().into_iter().collect();
    let format = match output_format {
        None | Some("raw") | Some("host_device") if preset.is_none() => {
            if !pairs.is_empty() {
                return Err(vdisk_core::Error::target("options need an image output_format or a preset"));
            }
            return Ok(None);
        }
        None => None,
        Some(name) => Some(vdisk_core::OutputFormat::from_name(name)?),
    };
    match preset {
        Some(name) => Ok(Some(vdisk_core::Preset::from_name(name)?.resolve(format, &pairs)?)),
        None => Ok(format.map(|f| (f, pairs))),
    }
}

/// What :func:`vdisk.measure` reports (``qemu-img measure``'s keys).
#[pyclass(module = "vdisk", frozen, eq)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Measure {
    /// Bytes the output file needs for this source (``required``).
    #[pyo3(get)]
    required: u64,
    /// Bytes it needs with every block of the disk allocated (``fully-allocated``).
    #[pyo3(get)]
    fully_allocated: u64,
}

#[pymethods]
impl Measure {
    fn __repr__(&self) -> String {
        format!("Measure(required={}, fully_allocated={})", self.required, self.fully_allocated)
    }
}

/// The size an image exported as ``output_format`` with ``options`` (or ``preset``) needs, like
/// ``qemu-img measure -O FMT -o ...``: for the image at ``src``, or with ``size`` for an empty disk
/// of that many bytes. Without compression: a compressed output is smaller. ``format``,
/// ``references``, ``limits`` and ``disk`` are as for :func:`vdisk.open`.
#[pyfunction]
#[pyo3(signature = (
    src=None, *, output_format="raw", options=None, preset=None, size=None, format=None, references="deny",
    limits=None, disk=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn measure(
    py: Python<'_>,
    src: Option<PathBuf>,
    output_format: &str,
    options: Option<std::collections::BTreeMap<String, String>>,
    preset: Option<&str>,
    size: Option<u64>,
    format: Option<&str>,
    references: &str,
    limits: Option<&Limits>,
    disk: Option<i64>,
) -> PyResult<Measure> {
    let explicit = (output_format != "raw" || preset.is_none()).then_some(output_format);
    let target = export_target(explicit, options, preset).map_err(|e| errors::to_py(py, e))?;
    let (fmt, pairs) = target.unwrap_or((vdisk_core::OutputFormat::Raw, Vec::new()));
    let m = match (src, size) {
        (Some(_), Some(_)) => return Err(PyValueError::new_err("give src or size, not both")),
        (None, None) => return Err(PyValueError::new_err("measure needs src or size")),
        (None, Some(size)) => vdisk_core::measure_size(size, fmt, &pairs),
        (Some(src), None) => {
            let open = open_options(format, references, limits, disk)?;
            py.allow_threads(|| {
                let image = vdisk_core::Image::open(&src, &open)?;
                vdisk_core::measure(&image, fmt, &pairs)
            })
        }
    }
    .map_err(|e| errors::to_py(py, e))?;
    Ok(Measure { required: m.required, fully_allocated: m.fully_allocated })
}
