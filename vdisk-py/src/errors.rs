//! vdisk's errors as Python exceptions.
//!
//! Every [`vdisk_core::ErrorKind`] has its exception class, with the same one-line message the CLI
//! prints after `vdisk: `. I/O errors become the `OSError` subclass Python itself would raise for
//! their `errno` (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, ...), with `errno`
//! set and the message left as vdisk's words.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use vdisk_core::{Error, ErrorKind};

create_exception!(
    vdisk,
    VdiskError,
    PyException,
    "Base class of every error vdisk raises for an image or a target (I/O errors are OSError)."
);
create_exception!(
    vdisk,
    InvalidImageError,
    VdiskError,
    "The image is corrupt or malformed; the message names the structure and its offset."
);
create_exception!(
    vdisk,
    UnsupportedFeatureError,
    VdiskError,
    "The image uses a format or feature vdisk does not read; the message names it."
);
create_exception!(
    vdisk,
    ReferenceDeniedError,
    VdiskError,
    "The image names another file (backing file, extent, parent) that the reference policy does not allow opening."
);
create_exception!(
    vdisk,
    LimitExceededError,
    VdiskError,
    "A limit would be exceeded; the message names the limit and how to raise it (see vdisk.Limits)."
);
create_exception!(
    vdisk,
    TargetError,
    VdiskError,
    "The conversion target cannot be used: too small, not a block device when one is required, or the source itself."
);

create_exception!(
    vdisk,
    RemoteError,
    VdiskError,
    "An http(s) source failed after its retries, answered what vdisk cannot use (a server that ignores Range), or changed during the read; ``status`` is the HTTP status the server last answered, or None."
);

create_exception!(
    vdisk,
    JournalError,
    VdiskError,
    "A resume journal does not match the conversion (the message says what changed) or is damaged; pass restart=True to discard it."
);

/// The Python exception for a vdisk error.
pub(crate) fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let message = err.to_string();
    match err.kind() {
        ErrorKind::InvalidImage => InvalidImageError::new_err(message),
        ErrorKind::Unsupported => UnsupportedFeatureError::new_err(message),
        ErrorKind::ReferenceDenied => ReferenceDeniedError::new_err(message),
        ErrorKind::LimitExceeded => LimitExceededError::new_err(message),
        ErrorKind::Target => TargetError::new_err(message),
        ErrorKind::Journal => JournalError::new_err(message),
        ErrorKind::Io => os_error(py, &err, message),
        ErrorKind::Remote => {
            let status = err.http_status();
            let exc = RemoteError::new_err(message);
            if let Err(e) = exc.value(py).setattr("status", status) {
                return e;
            }
            exc
        }
        _ => VdiskError::new_err(message),
    }
}

/// An `OSError` of the subclass Python picks for the error's `errno`, whose `str()` is `message`.
fn os_error(py: Python<'_>, err: &Error, message: String) -> PyErr {
    let Some(errno) = err.raw_os_error() else {
        return PyOSError::new_err(message);
    };
    match subclass_for_errno(py, errno, &message) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// Build `cls(message)` with `errno` set, where `cls` is what `OSError(errno, ...)` maps to.
/// Setting only `errno` (not `strerror`) keeps `str(exc)` equal to `message`.
fn subclass_for_errno<'py>(py: Python<'py>, errno: i32, message: &str) -> PyResult<Bound<'py, PyAny>> {
    let probe = py.get_type::<PyOSError>().call1((errno, message))?;
    let exc = probe.get_type().call1((message,))?;
    exc.setattr("errno", errno)?;
    Ok(exc)
}

/// A `ValueError` for a bad argument, with the core's words.
pub(crate) fn value_error(err: Error) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Register the exception classes on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("VdiskError", py.get_type::<VdiskError>())?;
    m.add("InvalidImageError", py.get_type::<InvalidImageError>())?;
    m.add("UnsupportedFeatureError", py.get_type::<UnsupportedFeatureError>())?;
    m.add("ReferenceDeniedError", py.get_type::<ReferenceDeniedError>())?;
    m.add("LimitExceededError", py.get_type::<LimitExceededError>())?;
    m.add("TargetError", py.get_type::<TargetError>())?;
    m.add("JournalError", py.get_type::<JournalError>())?;
    // `status` exists on the class too (None), so it reads the same on every instance.
    py.get_type::<RemoteError>().setattr("status", py.None())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    Ok(())
}
