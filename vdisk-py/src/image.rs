//! `vdisk.open`, `vdisk.Image`, `vdisk.Extent` and the lazy extent iterator.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};
use vdisk_core::{Extent as CoreExtent, ExtentKind, Location};

use crate::errors;
use crate::options::{open_options, HttpArgs, Limits};

/// Extents fetched per batch while the GIL is released: enough that the per-batch cost (one
/// table lookup to resume) vanishes, few enough that a Python loop that stops early wastes little.
const EXTENT_BATCH: usize = 1024;

/// An open disk image (any supported format, with its backing chain).
///
/// Returned by :func:`vdisk.open`. Use it as a context manager, or call :meth:`close`. Reads take
/// no lock: one ``Image`` may be used from several threads at once, and from a process forked
/// while it was open.
#[pyclass(module = "vdisk", frozen)]
pub(crate) struct Image {
    inner: Mutex<Option<Arc<vdisk_core::Image>>>,
    path: PathBuf,
}

impl Image {
    /// The open image, or `ValueError` once closed. The lock is held only to clone the `Arc`,
    /// always with the GIL held, so it is never held across a fork or a long call.
    fn get(&self) -> PyResult<Arc<vdisk_core::Image>> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| PyValueError::new_err("I/O operation on a closed vdisk.Image"))
    }
}

/// Open the disk image at ``path``.
///
/// ``format`` is ``"raw"``, ``"qcow2"``, ``"vmdk"``, ``"vpc"`` (or ``"vhd"``), ``"vhdx"``,
/// ``"vdi"`` or ``"ova"``; by default it is detected from the content, never from the file name.
/// ``references`` says which other files the image may make vdisk open (backing files, data files,
/// VMDK extents, parents): ``"deny"`` (default), ``"same-dir"`` or ``"any"``. ``limits`` raises or
/// lowers the bounds on what an untrusted image can make vdisk allocate.
///
/// An OVA archive opens one of its disks, read in place: ``disk`` (1-based, in the OVF's order)
/// chooses it; without it the only disk, or the first of several (``info()["format-specific"]``
/// lists them all, and :func:`convert` then asks for ``disk``).
///
/// ``path`` may be an ``http://`` or ``https://`` URL (a presigned or pre-authenticated object
/// URL): the image is then read with ranged GETs, pinned to the object's ETag. ``http_headers``
/// adds request headers (``{"Authorization": "Bearer ..."}``), ``http_connections`` bounds the
/// requests in flight (default 8), ``http_retries`` the retries of a failed request (default 8),
/// ``http_timeout`` is the idle timeout in seconds (default 60), and ``url_refresh()`` returns a
/// fresh URL for the same object when the server answers 401/403 (an expired URL). The same
/// settings may be given as ``headers=`` and ``http={"connections": 8, "retries": 8, "timeout":
/// 60, "url_refresh": f, "headers": {...}}``; naming one twice is a ``ValueError``. Secrets in
/// URLs (query strings, OCI tokens) and header values never appear in messages.
///
/// Raises ``FileNotFoundError``/``PermissionError``/``OSError`` when the file cannot be read,
/// :class:`RemoteError` when a URL cannot be read, and a :class:`VdiskError` subclass when the
/// image is refused.
#[pyfunction]
#[pyo3(name = "open", signature = (
    path, format=None, references="deny", *, limits=None, disk=None, headers=None, http=None, http_headers=None, http_connections=None,
    http_retries=None, http_timeout=None, url_refresh=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_image(
    py: Python<'_>,
    path: PathBuf,
    format: Option<&str>,
    references: &str,
    limits: Option<&Limits>,
    disk: Option<i64>,
    headers: Option<HashMap<String, String>>,
    http: Option<HashMap<String, PyObject>>,
    http_headers: Option<HashMap<String, String>>,
    http_connections: Option<usize>,
    http_retries: Option<u32>,
    http_timeout: Option<f64>,
    url_refresh: Option<PyObject>,
) -> PyResult<Image> {
    let mut options = open_options(format, references, limits, disk)?;
    options.http = HttpArgs { headers, http, http_headers, http_connections, http_retries, http_timeout, url_refresh }
        .into_options(py)?;
    let image = py.allow_threads(|| vdisk_core::Image::open(&path, &options)).map_err(|e| errors::to_py(py, e))?;
    Ok(Image { inner: Mutex::new(Some(Arc::new(image))), path })
}

#[pymethods]
impl Image {
    /// The image format, as qemu-img names it: ``"raw"``, ``"qcow2"``, ``"vmdk"``, ``"vpc"``,
    /// ``"vhdx"``, ``"vdi"``, or ``"ova"`` for a disk opened inside an OVA archive.
    #[getter]
    fn format(&self) -> PyResult<&'static str> {
        Ok(self.get()?.format().as_str())
    }

    /// The format of the disk being read: :attr:`format`, or, inside an OVA, the selected disk's.
    #[getter]
    fn disk_format(&self) -> PyResult<&'static str> {
        Ok(self.get()?.disk_format().as_str())
    }

    /// Inside an OVA, the selected disk (1-based, in the OVF's order); ``None`` for other images.
    #[getter]
    fn disk(&self) -> PyResult<Option<u32>> {
        Ok(self.get()?.disk())
    }

    /// The guest-visible size of the disk in bytes.
    #[getter]
    fn virtual_size(&self) -> PyResult<u64> {
        Ok(self.get()?.virtual_size())
    }

    /// The path the image was opened from.
    #[getter]
    fn path(&self) -> std::ffi::OsString {
        self.path.clone().into_os_string()
    }

    /// True once :meth:`close` has been called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// What ``vdisk info --output json`` prints for this image, as a dict (qemu-img's keys:
    /// ``virtual-size``, ``format``, ``actual-size``, ``cluster-size``, ``backing-filename``,
    /// ``format-specific``, ...).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let image = self.get()?;
        let json = py.allow_threads(|| image.info().to_json());
        py.import("json")?.call_method1("loads", (json,))
    }

    /// A lazy iterator over the extents of the virtual disk: sorted, non-overlapping, merged, and
    /// covering exactly ``0..virtual_size``. Each is an :class:`Extent`.
    fn extents(slf: &Bound<'_, Self>) -> PyResult<ExtentIterator> {
        let image = slf.get().get()?;
        Ok(ExtentIterator {
            owner: slf.clone().unbind(),
            state: Mutex::new(IterState {
                pos: 0,
                end: image.virtual_size(),
                depth: image.chain_depth(),
                queue: VecDeque::new(),
                pending_error: None,
                busy: false,
            }),
        })
    }

    /// Read up to ``length`` guest bytes at ``offset``; fewer only at the end of the disk (none
    /// at or past it). Zero and unallocated ranges read as zeros.
    fn read<'py>(&self, py: Python<'py>, offset: u64, length: u64) -> PyResult<Bound<'py, PyBytes>> {
        let image = self.get()?;
        let n = image.virtual_size().saturating_sub(offset).min(length);
        let n = usize::try_from(n).map_err(|_| PyValueError::new_err("length too large for this platform"))?;
        PyBytes::new_with(py, n, |buf| {
            let got = py.allow_threads(|| image.read_at(buf, offset)).map_err(|e| errors::to_py(py, e))?;
            if got != buf.len() {
                return Err(PyValueError::new_err(format!("short read: {got} of {} bytes at {offset:#x}", buf.len())));
            }
            Ok(())
        })
    }

    /// Release the image's files. Further use raises ``ValueError``; a read already running on
    /// another thread finishes first. Closing twice is allowed.
    fn close(&self) {
        let taken = self.inner.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(taken);
    }

    /// Return the image itself.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Close the image.
    #[pyo3(signature = (exc_type=None, exc_value=None, traceback=None))]
    fn __exit__(
        &self,
        exc_type: Option<&Bound<'_, PyType>>,
        exc_value: Option<&Bound<'_, PyAny>>,
        traceback: Option<&Bound<'_, PyAny>>,
    ) -> bool {
        let _ = (exc_type, exc_value, traceback);
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(image) => format!(
                "<vdisk.Image {:?} format={} virtual_size={}>",
                vdisk_core::redact_url(&self.path.display().to_string()),
                image.format(),
                image.virtual_size()
            ),
            None => format!("<vdisk.Image {:?} closed>", vdisk_core::redact_url(&self.path.display().to_string())),
        }
    }
}

/// One range of the virtual disk and what it holds.
///
/// ``kind`` is ``"data"`` (stored bytes), ``"zero"`` (reads as zero because the format says so)
/// or ``"unallocated"`` (stored in no layer; reads as zero). ``depth`` is the layer of the backing
/// chain where the range was found (0 = the image itself), as in ``qemu-img map``.
#[pyclass(module = "vdisk", frozen, eq, hash)]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Extent {
    /// First byte, as an offset in the virtual disk.
    #[pyo3(get)]
    start: u64,
    /// Length in bytes (never 0).
    #[pyo3(get)]
    length: u64,
    /// ``"data"``, ``"zero"`` or ``"unallocated"``.
    #[pyo3(get)]
    kind: &'static str,
    /// Layer of the chain the range comes from (0 = the image itself); for unallocated ranges, the
    /// depth of the bottom of the chain, as ``qemu-img map`` reports it.
    #[pyo3(get)]
    depth: u32,
    /// For uncompressed data, the offset of the first byte in the file that stores it; else None.
    #[pyo3(get)]
    offset: Option<u64>,
    /// True when the data is stored compressed.
    #[pyo3(get)]
    compressed: bool,
}

impl Extent {
    fn from_core(e: &CoreExtent, bottom: u32) -> Self {
        let (kind, depth, offset, compressed) = match e.kind {
            ExtentKind::Data { layer, location: Location::File { offset, .. } } => ("data", layer, Some(offset), false),
            ExtentKind::Data { layer, .. } => ("data", layer, None, true),
            ExtentKind::Zero { layer } => ("zero", layer, None, false),
            _ => ("unallocated", bottom, None, false),
        };
        Extent { start: e.start, length: e.len, kind, depth, offset, compressed }
    }
}

#[pymethods]
impl Extent {
    /// One past the last byte (``start + length``).
    #[getter]
    fn end(&self) -> u64 {
        self.start.saturating_add(self.length)
    }

    fn __repr__(&self) -> String {
        let mut s =
            format!("Extent(start={}, length={}, kind='{}', depth={}", self.start, self.length, self.kind, self.depth);
        if let Some(o) = self.offset {
            s += &format!(", offset={o}");
        }
        if self.compressed {
            s += ", compressed=True";
        }
        s + ")"
    }
}

/// Where an extent iterator is.
struct IterState {
    pos: u64,
    end: u64,
    depth: u32,
    queue: VecDeque<Extent>,
    /// An error met after some extents of a batch: raised once those have been yielded.
    pending_error: Option<vdisk_core::Error>,
    /// A thread is fetching the next batch with the GIL released.
    busy: bool,
}

/// The lazy iterator returned by :meth:`Image.extents`; fetches extents in batches with the GIL
/// released.
#[pyclass(module = "vdisk", frozen)]
pub(crate) struct ExtentIterator {
    owner: Py<Image>,
    state: Mutex<IterState>,
}

#[pymethods]
impl ExtentIterator {
    /// Return the iterator itself.
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The next :class:`Extent`.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Extent>> {
        let (pos, end, depth) = {
            let mut st = self.lock();
            if st.busy {
                return Err(PyValueError::new_err("this extent iterator is already running in another thread"));
            }
            if let Some(e) = st.queue.pop_front() {
                return Ok(Some(e));
            }
            if let Some(err) = st.pending_error.take() {
                return Err(errors::to_py(py, err));
            }
            if st.pos >= st.end {
                return Ok(None);
            }
            st.busy = true;
            (st.pos, st.end, st.depth)
        };
        let image = match self.owner.get().get() {
            Ok(image) => image,
            Err(e) => {
                self.lock().busy = false;
                return Err(e);
            }
        };
        // The lock is not held while the GIL is released (another thread would block on it
        // holding the GIL); `busy` keeps a second thread from fetching the same batch.
        //
        // Each batch starts afresh at the end of the last extent yielded: an iterator yields an
        // extent only once the next one cannot merge into it, so batches join without splitting
        // or repeating an extent.
        let (batch, error) = py.allow_threads(|| {
            let mut batch = Vec::new();
            let mut error = None;
            for extent in image.extents_in(pos, end) {
                match extent {
                    Ok(e) => batch.push(Extent::from_core(&e, depth)),
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
                if batch.len() >= EXTENT_BATCH {
                    break;
                }
            }
            (batch, error)
        });
        let mut st = self.lock();
        st.busy = false;
        // After an error, or once the batch reached the end, nothing more is fetched.
        st.pos = match (&error, batch.last()) {
            (None, Some(last)) => last.end(),
            _ => end,
        };
        st.queue.extend(batch);
        st.pending_error = error;
        if let Some(e) = st.queue.pop_front() {
            return Ok(Some(e));
        }
        match st.pending_error.take() {
            Some(err) => Err(errors::to_py(py, err)),
            None => Ok(None),
        }
    }
}

impl ExtentIterator {
    fn lock(&self) -> std::sync::MutexGuard<'_, IterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
