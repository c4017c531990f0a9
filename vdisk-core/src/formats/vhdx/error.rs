//! The VHDX reader's own errors, converted into [`crate::Error`] at the boundary.

use crate::error::Error;

/// What can be wrong with a VHDX file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VhdxError {
    /// A structure is malformed: which one, where, and what is wrong.
    #[error("VHDX {what} at {offset:#x}: {detail}")]
    Corrupt {
        /// The structure ("header 1", "region table", "BAT entry 12", ...).
        what: String,
        /// Its offset in the file (or in the log, where said).
        offset: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// A real VHDX feature vdisk does not handle.
    #[error("VHDX {0} is not supported by vdisk")]
    Unsupported(String),
}

impl From<VhdxError> for Error {
    fn from(e: VhdxError) -> Error {
        match e {
            VhdxError::Corrupt { .. } => Error::invalid(e.to_string()),
            VhdxError::Unsupported(_) => Error::unsupported(e.to_string()),
        }
    }
}

/// An `InvalidImage` error for the structure `what` at `offset`.
pub(crate) fn corrupt(what: impl Into<String>, offset: u64, detail: impl Into<String>) -> Error {
    VhdxError::Corrupt { what: what.into(), offset, detail: detail.into() }.into()
}

/// An `Unsupported` error naming the feature.
pub(crate) fn unsupported(feature: impl Into<String>) -> Error {
    VhdxError::Unsupported(feature.into()).into()
}
