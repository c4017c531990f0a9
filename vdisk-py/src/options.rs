//! Arguments shared by `open` and `convert`: format, reference policy, limits.

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use vdisk_core::{Format, HttpOptions, OpenOptions, ReferencePolicy};

use crate::errors;

/// Bounds on what opening and reading an untrusted image may consume.
///
/// Every argument defaults to vdisk's built-in limit; pass a larger value to accept an image
/// that a :class:`LimitExceededError` refused (its message names the limit to raise)::
///
///     vdisk.open(path, limits=vdisk.Limits(max_metadata_bytes=4 << 30))
#[pyclass(module = "vdisk", frozen, eq)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Bytes of metadata (tables, descriptors, logs) all layers together may hold in memory.
    #[pyo3(get)]
    max_metadata_bytes: u64,
    /// Entries in any one table (L1, refcount table, grain directory, BAT, snapshot table).
    #[pyo3(get)]
    max_table_entries: u64,
    /// Images in a chain (the image itself counts as one).
    #[pyo3(get)]
    max_chain_depth: u32,
    /// Largest virtual disk size accepted, in bytes.
    #[pyo3(get)]
    max_virtual_size: u64,
    /// Largest compressed cluster or grain, and largest single block, held in memory, in bytes.
    #[pyo3(get)]
    max_unit_bytes: u64,
}

impl Limits {
    pub(crate) fn to_core(&self) -> vdisk_core::Limits {
        let mut limits = vdisk_core::Limits::default();
        limits.max_metadata_bytes = self.max_metadata_bytes;
        limits.max_table_entries = self.max_table_entries;
        limits.max_chain_depth = self.max_chain_depth;
        limits.max_virtual_size = self.max_virtual_size;
        limits.max_unit_bytes = self.max_unit_bytes;
        limits
    }
}

#[pymethods]
impl Limits {
    /// Limits with vdisk's defaults, except those given.
    #[new]
    #[pyo3(signature = (*, max_metadata_bytes=None, max_table_entries=None, max_chain_depth=None, max_virtual_size=None, max_unit_bytes=None))]
    fn new(
        max_metadata_bytes: Option<u64>,
        max_table_entries: Option<u64>,
        max_chain_depth: Option<u32>,
        max_virtual_size: Option<u64>,
        max_unit_bytes: Option<u64>,
    ) -> Self {
        let d = vdisk_core::Limits::default();
        Limits {
            max_metadata_bytes: max_metadata_bytes.unwrap_or(d.max_metadata_bytes),
            max_table_entries: max_table_entries.unwrap_or(d.max_table_entries),
            max_chain_depth: max_chain_depth.unwrap_or(d.max_chain_depth),
            max_virtual_size: max_virtual_size.unwrap_or(d.max_virtual_size),
            max_unit_bytes: max_unit_bytes.unwrap_or(d.max_unit_bytes),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Limits(max_metadata_bytes={}, max_table_entries={}, max_chain_depth={}, max_virtual_size={}, max_unit_bytes={})",
            self.max_metadata_bytes,
            self.max_table_entries,
            self.max_chain_depth,
            self.max_virtual_size,
            self.max_unit_bytes
        )
    }
}

/// The core's open options from Python's arguments; bad names and disk numbers raise `ValueError`.
pub(crate) fn open_options(
    format: Option<&str>,
    references: &str,
    limits: Option<&Limits>,
    disk: Option<i64>,
) -> PyResult<OpenOptions> {
    let format = format.map(|f| f.parse::<Format>().map_err(errors::value_error)).transpose()?;
    let references = references.parse::<ReferencePolicy>().map_err(errors::value_error)?;
    let disk = disk
        .map(|d| {
            u32::try_from(d)
                .ok()
                .filter(|&d| d >= 1)
                .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("disk must be 1 or more, not {d}")))
        })
        .transpose()?;
    Ok(OpenOptions {
        format,
        references,
        limits: limits.map(Limits::to_core).unwrap_or_default(),
        disk,
        ..OpenOptions::default()
    })
}

/// The HTTP keyword arguments of :func:`vdisk.open`, :func:`vdisk.convert` and
/// :func:`vdisk.checksum`, in both spellings: ``headers=`` and ``http={"connections": ...,
/// "retries": ..., "timeout": ..., "url_refresh": ..., "headers": ...}``, or the flat
/// ``http_headers=``, ``http_connections=``, ``http_retries=``, ``http_timeout=``, ``url_refresh=``.
/// Naming one setting twice is a ``ValueError``.
#[derive(Default)]
pub(crate) struct HttpArgs {
    pub(crate) headers: Option<HashMap<String, String>>,
    pub(crate) http: Option<HashMap<String, PyObject>>,
    pub(crate) http_headers: Option<HashMap<String, String>>,
    pub(crate) http_connections: Option<usize>,
    pub(crate) http_retries: Option<u32>,
    pub(crate) http_timeout: Option<f64>,
    pub(crate) url_refresh: Option<PyObject>,
}

impl HttpArgs {
    /// The core's options, after merging the two spellings.
    pub(crate) fn into_options(self, py: Python<'_>) -> PyResult<HttpOptions> {
        fn once<T>(slot: &mut Option<T>, value: Option<T>, name: &str) -> PyResult<()> {
            if value.is_some() {
                if slot.is_some() {
                    return Err(PyValueError::new_err(format!("{name} is given twice")));
                }
                *slot = value;
            }
            Ok(())
        }
        let HttpArgs {
            headers,
            http,
            mut http_headers,
            mut http_connections,
            mut http_retries,
            mut http_timeout,
            mut url_refresh,
        } = self;
        once(&mut http_headers, headers, "the HTTP headers (headers= / http_headers=)")?;
        for (key, value) in http.unwrap_or_default() {
            let value = value.bind(py);
            let bad = |what: &str| PyTypeError::new_err(format!("http[{key:?}] must be {what}"));
            match key.as_str() {
                "connections" => {
                    once(&mut http_connections, Some(value.extract().map_err(|_| bad("an int"))?), "connections")?
                }
                "retries" => once(&mut http_retries, Some(value.extract().map_err(|_| bad("an int"))?), "retries")?,
                "timeout" => {
                    once(&mut http_timeout, Some(value.extract().map_err(|_| bad("a number of seconds"))?), "timeout")?
                }
                "headers" => once(
                    &mut http_headers,
                    Some(value.extract().map_err(|_| bad("a dict of str to str"))?),
                    "the HTTP headers",
                )?,
                "url_refresh" => once(&mut url_refresh, Some(value.clone().unbind()), "url_refresh")?,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown http setting {other:?} (connections, retries, timeout, headers, url_refresh)"
                    )))
                }
            }
        }
        http_options(http_headers, http_connections, http_retries, http_timeout, url_refresh)
    }
}

/// The core's HTTP options from Python's ``http_*`` and ``url_refresh`` arguments.
///
/// ``url_refresh`` is called (with the GIL, from whichever thread met the expiry) when the server
/// answers 401 or 403; it returns a fresh URL for the same object.
pub(crate) fn http_options(
    headers: Option<HashMap<String, String>>,
    connections: Option<usize>,
    retries: Option<u32>,
    timeout: Option<f64>,
    url_refresh: Option<PyObject>,
) -> PyResult<HttpOptions> {
    let mut http = HttpOptions::default();
    if let Some(n) = connections {
        if n == 0 || n > 256 {
            return Err(PyValueError::new_err(format!("http_connections must be between 1 and 256, not {n}")));
        }
        http.connections = n;
    }
    if let Some(n) = retries {
        http.retries = n;
    }
    if let Some(t) = timeout {
        if !(t > 0.0 && t <= 86_400.0) {
            return Err(PyValueError::new_err("http_timeout must be a number of seconds between 0 and 86400"));
        }
        http.timeout = std::time::Duration::from_secs_f64(t);
    }
    if let Some(headers) = headers {
        let mut pairs: Vec<(String, String)> = headers.into_iter().collect();
        pairs.sort();
        http.headers = pairs;
    }
    if let Some(callback) = url_refresh {
        let callable = Python::with_gil(|py| callback.bind(py).is_callable());
        if !callable {
            return Err(PyTypeError::new_err("url_refresh must be callable as url_refresh() -> str"));
        }
        http.url_refresh = Some(Arc::new(move || {
            Python::with_gil(|py| {
                let fresh = callback.call0(py).map_err(|e| format!("url_refresh raised {e}"))?;
                fresh.extract::<String>(py).map_err(|_| "url_refresh did not return a str".to_string())
            })
        }));
    }
    Ok(http)
}
