//! `vdisk._vdisk`: the Python bindings of vdisk-core, re-exported by the `vdisk` package.
//!
//! Thin by design: each function converts its arguments, calls one vdisk-core function with the
//! GIL released, and converts the result or the error. No parsing or copying logic lives here.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod convert;
mod errors;
mod image;
mod options;

use pyo3::prelude::*;

/// Read and convert qcow2, VMDK, VHD, VHDX and raw disk images (native part of ``vdisk``).
#[pymodule]
fn _vdisk(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(image::open_image, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert, m)?)?;
    m.add_class::<image::Image>()?;
    m.add_class::<image::Extent>()?;
    m.add_class::<image::ExtentIterator>()?;
    m.add_class::<options::Limits>()?;
    m.add_class::<convert::ConvertReport>()?;
    errors::register(m)?;
    Ok(())
}
