//! The VHD reader's errors, converted into [`crate::Error`] at the module boundary.

use crate::error::{Error, ErrorKind};

/// What can be wrong with a VHD.
#[derive(Debug, thiserror::Error)]
pub(super) enum VhdError {
    /// A structure is malformed.
    #[error("{structure} at {at:#x}: {problem}")]
    Corrupt { structure: &'static str, at: u64, problem: String },
    /// A real feature vdisk does not read.
    #[error("{0}")]
    Unsupported(String),
    /// The parent found does not carry the unique id the child records.
    #[error(
        "VHD parent '{name}' has unique id {found}, but the differencing disk expects parent id {expected}: \
         it is not this disk's parent"
    )]
    ParentMismatch { name: String, found: String, expected: String },
    /// A differencing disk that names no parent vdisk could look for.
    #[error("differencing VHD names no parent it can be found by (locators: {0})")]
    NoParent(String),
}

impl From<VhdError> for Error {
    fn from(e: VhdError) -> Error {
        let kind = match e {
            VhdError::Unsupported(_) => ErrorKind::Unsupported,
            VhdError::Corrupt { .. } | VhdError::ParentMismatch { .. } | VhdError::NoParent(_) => {
                ErrorKind::InvalidImage
            }
        };
        Error::new(kind, e.to_string())
    }
}
