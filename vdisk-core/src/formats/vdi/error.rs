//! The VDI reader's errors, converted into [`crate::Error`] at the module boundary.

use crate::error::{Error, ErrorKind};

/// What can be wrong with a VDI.
#[derive(Debug, thiserror::Error)]
pub(super) enum VdiError {
    /// A structure is malformed.
    #[error("VDI {structure} at {at:#x}: {problem}")]
    Corrupt { structure: &'static str, at: u64, problem: String },
    /// A block map entry is unusable (out of range, shared with another entry, past the end).
    #[error("VDI block map entry {index} (at {at:#x}): {problem}")]
    BadEntry { index: u64, at: u64, problem: String },
    /// A real feature vdisk does not read.
    #[error("{0}")]
    Unsupported(String),
    /// The parent found does not carry the modification UUID the child records.
    #[error(
        "VDI parent '{name}' has modification UUID {found}, but the differencing image was made against {expected}: \
         the parent changed after the child was created (or it is another copy of the parent)"
    )]
    ParentModified { name: String, found: String, expected: String },
    /// No file beside the child carries the parent's creation UUID.
    #[error("differencing VDI: no VDI in {dir} has the parent's UUID {uuid} (looked at {looked} files)")]
    ParentNotFound { dir: String, uuid: String, looked: usize },
}

impl From<VdiError> for Error {
    fn from(e: VdiError) -> Error {
        let kind = match e {
            VdiError::Unsupported(_) => ErrorKind::Unsupported,
            VdiError::Corrupt { .. }
            | VdiError::BadEntry { .. }
            | VdiError::ParentModified { .. }
            | VdiError::ParentNotFound { .. } => ErrorKind::InvalidImage,
        };
        Error::new(kind, e.to_string())
    }
}
