//! The qcow2 reader's errors: the detail behind the public [`crate::Error`].

use crate::error::{Error, ErrorKind};

/// What can be wrong with a qcow2 image, grouped by cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Qcow2Error {
    /// The file is a qcow version 1 image (a different, legacy format).
    #[error("qcow version 1 images are not supported by vdisk (only qcow2 versions 2 and 3)")]
    Version1,
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (only versions 2 and 3)")]
    Version(u32),
    /// Encrypted images (AES or LUKS).
    #[error("encrypted qcow2 images are not supported (encryption method {0})")]
    Encrypted(String),
    /// Incompatible feature bits this reader does not know.
    #[error("unsupported qcow2 feature(s): {0}")]
    Feature(String),
    /// A compression type other than zlib and zstd.
    #[error("qcow2 header at 0x68: unsupported compression type {0}")]
    CompressionType(u8),
    /// A malformed structure: what it is, where, and what is wrong.
    #[error("{what} at {offset:#x}: {why}")]
    Invalid {
        /// The structure ("qcow2 header", "L2 table", ...).
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
}

impl Qcow2Error {
    /// A malformed structure.
    pub(crate) fn invalid(what: &'static str, offset: u64, why: impl Into<String>) -> Self {
        Qcow2Error::Invalid { what, offset, why: why.into() }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            Qcow2Error::Version1
            | Qcow2Error::Version(_)
            | Qcow2Error::Encrypted(_)
            | Qcow2Error::Feature(_)
            | Qcow2Error::CompressionType(_) => ErrorKind::Unsupported,
            Qcow2Error::Invalid { .. } => ErrorKind::InvalidImage,
        }
    }
}

impl From<Qcow2Error> for Error {
    fn from(e: Qcow2Error) -> Self {
        Error::new(e.kind(), e.to_string())
    }
}

/// Shorthand: an `InvalidImage` [`Error`] for `what` at `offset`.
pub(crate) fn invalid(what: &'static str, offset: u64, why: impl Into<String>) -> Error {
    Qcow2Error::invalid(what, offset, why).into()
}
