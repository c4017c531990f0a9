//! `vdisk._vdisk`: the Python bindings of vdisk-core, re-exported by the `vdisk` package.
//!
//! Thin by design: each function converts its arguments, calls one vdisk-core function with the
//! GIL released, and converts the result or the error. No parsing or copying logic lives here.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod convert;
mod errors;
mod image;
mod options;
mod verify;

use pyo3::prelude::*;

/// The package version with the commit it was built from as a PEP 440 local version label:
/// `0.1.0+g0123456789ab` (`.dirty` appended when the tree differed from the commit), or the
/// plain version when the commit is unknown.
fn python_version(version: &str, commit: &str) -> String {
    match commit.strip_suffix("-dirty") {
        _ if commit == "unknown" || commit.is_empty() => version.to_string(),
        Some(hash) => format!("{version}+g{hash}.dirty"),
        None => format!("{version}+g{commit}"),
    }
}

/// Run the `vdisk` command with `argv` (program name first) and return its exit status: what
/// the `vdisk` executable that pip installs runs, in this process, with the GIL released.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<std::ffi::OsString>) -> u8 {
    py.allow_threads(|| vdisk_cli::run(argv))
}

/// Read and convert qcow2, VMDK, VHD, VHDX, VDI and raw disk images and OVA disks (native part of ``vdisk``).
#[pymodule]
fn _vdisk(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", python_version(env!("CARGO_PKG_VERSION"), vdisk_cli::BUILD_COMMIT))?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(image::open_image, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert, m)?)?;
    m.add_class::<image::Image>()?;
    m.add_class::<image::Extent>()?;
    m.add_class::<image::ExtentIterator>()?;
    m.add_class::<options::Limits>()?;
    m.add_class::<convert::ConvertReport>()?;
    m.add_function(wrap_pyfunction!(convert::measure, m)?)?;
    m.add_class::<convert::Measure>()?;
    m.add_function(wrap_pyfunction!(verify::checksum, m)?)?;
    m.add_function(wrap_pyfunction!(verify::compare, m)?)?;
    m.add_class::<verify::Checksum>()?;
    m.add_class::<verify::Comparison>()?;
    errors::register(m)?;
    Ok(())
}
