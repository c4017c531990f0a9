//! The one public error type.
//!
//! Every failure is an [`Error`] with a small, matchable [`ErrorKind`] and a one-line message that
//! says what went wrong and where (structure names and offsets in hex). Format readers keep their
//! own error enums for the detail and convert into this type at their boundary.

use std::fmt;
use std::io;
use std::path::Path;

/// The broad cause of an [`Error`]; match on this, read the message for detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused a read, write, open or ioctl.
    Io,
    /// The image is corrupt or malformed (the message names the structure and its offset).
    InvalidImage,
    /// The image uses a real feature or format that vdisk does not handle (the message names it).
    Unsupported,
    /// The image names another file and the reference policy does not allow opening it.
    ReferenceDenied,
    /// A configured limit would be exceeded (the message names the limit and how to raise it).
    LimitExceeded,
    /// The conversion target cannot be used: too small, not writable, or the source itself.
    Target,
    /// The operation was cancelled by the caller.
    Cancelled,
    /// A resume journal does not match this conversion (the message says what changed), or is
    /// damaged.
    Journal,
    /// A remote source (HTTP/HTTPS) failed after its retries, answered something vdisk cannot use
    /// (a server that ignores `Range`), or changed during the read; [`Error::http_status`] gives
    /// the server's status where there was one.
    Remote,
}

impl ErrorKind {
    /// A short lowercase name, stable for scripts and bindings.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidImage => "invalid-image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ReferenceDenied => "reference-denied",
            ErrorKind::LimitExceeded => "limit-exceeded",
            ErrorKind::Target => "target",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Journal => "journal",
            ErrorKind::Remote => "remote",
        }
    }
}

/// An error from vdisk: a kind, a one-line message, and the underlying cause where there is one.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with vdisk's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// An [`ErrorKind::InvalidImage`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, message)
    }

    /// An [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// An [`ErrorKind::LimitExceeded`] error.
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }

    /// An [`ErrorKind::Target`] error.
    pub fn target(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Target, message)
    }

    /// An [`ErrorKind::Io`] error that keeps `err` as its source and says what was being done
    /// ([`ErrorKind::Remote`] when `err` carries a [`RemoteFailure`] from a remote source).
    pub fn io(what: impl fmt::Display, err: io::Error) -> Self {
        Error { kind: io_kind_of(&err), message: format!("{what}: {}", io_text(&err)), source: Some(Box::new(err)) }
    }

    /// An [`ErrorKind::Remote`] error.
    pub fn remote(failure: RemoteFailure) -> Self {
        Error { kind: ErrorKind::Remote, message: failure.message.clone(), source: Some(Box::new(failure)) }
    }

    /// For [`ErrorKind::Remote`] errors: the HTTP status the server last answered, if any.
    pub fn http_status(&self) -> Option<u16> {
        let source = self.source.as_ref()?;
        if let Some(f) = source.downcast_ref::<RemoteFailure>() {
            return f.status;
        }
        source.downcast_ref::<io::Error>()?.get_ref()?.downcast_ref::<RemoteFailure>()?.status
    }

    /// An [`ErrorKind::Io`] error with its own `message` that keeps `err` as its source, so that
    /// [`Error::io_kind`] and [`Error::raw_os_error`] report it.
    pub fn io_with_message(message: impl Into<String>, err: io::Error) -> Self {
        Error { kind: ErrorKind::Io, message: message.into(), source: Some(Box::new(err)) }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The one-line message (the same text `Display` prints).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For [`ErrorKind::Io`] errors caused by the operating system, its error kind.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        self.source.as_ref()?.downcast_ref::<io::Error>().map(io::Error::kind)
    }

    /// For errors caused by the operating system, its raw `errno`.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref()?.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error)
    }

    /// Prefix the message with `context` (typically a file name), as `context: message`.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Prefix the message with a path, unless it already starts with it.
    #[must_use]
    pub fn in_file(self, path: &Path) -> Self {
        let shown = path.display().to_string();
        if self.message.starts_with(&shown) {
            self
        } else {
            self.context(shown)
        }
    }
}

/// Why a remote source could not answer a read: a one-line message with every secret already
/// redacted, and the HTTP status the server last answered. Readers see it inside an
/// [`io::Error`]; [`Error::io`] turns it back into an [`ErrorKind::Remote`] error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFailure {
    /// What happened, without the URL (the caller names the source).
    pub message: String,
    /// The server's HTTP status, when it answered one.
    pub status: Option<u16>,
}

impl fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteFailure {}

impl From<RemoteFailure> for io::Error {
    fn from(f: RemoteFailure) -> Self {
        io::Error::other(f)
    }
}

/// [`ErrorKind::Remote`] for an I/O error carrying a [`RemoteFailure`], else [`ErrorKind::Io`].
fn io_kind_of(err: &io::Error) -> ErrorKind {
    match err.get_ref() {
        Some(inner) if inner.is::<RemoteFailure>() => ErrorKind::Remote,
        _ => ErrorKind::Io,
    }
}

/// The text of an I/O error without Rust's " (os error N)" suffix, as a user would expect it.
fn io_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error").field("kind", &self.kind).field("message", &self.message).finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever the message carries: newlines from foreign text are flattened.
        if self.message.contains(['\n', '\r']) {
            f.write_str(&self.message.replace(['\n', '\r'], " "))
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error { kind: io_kind_of(&err), message: io_text(&err), source: Some(Box::new(err)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_kind_and_read_as_one_line() {
        let e = Error::io("opening x", io::Error::from_raw_os_error(libc::ENOENT)).context("a\nb");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
        assert_eq!(e.to_string(), "a b: opening x: No such file or directory");
    }

    #[test]
    fn remote_failures_inside_io_errors_keep_their_kind_and_status() {
        let f = RemoteFailure { message: "the server answered 503 Service Unavailable".into(), status: Some(503) };
        let e = Error::io("reading L1 table at 0x30000", f.clone().into());
        assert_eq!(e.kind(), ErrorKind::Remote);
        assert_eq!(e.http_status(), Some(503));
        assert_eq!(e.to_string(), "reading L1 table at 0x30000: the server answered 503 Service Unavailable");
        assert_eq!(Error::from(io::Error::from(f.clone())).kind(), ErrorKind::Remote);
        assert_eq!(Error::remote(f).http_status(), Some(503));
        assert_eq!(Error::io("x", io::Error::other("plain")).http_status(), None);
    }

    #[test]
    fn in_file_does_not_repeat_the_path() {
        let p = Path::new("/tmp/x.img");
        let e = Error::invalid("bad").in_file(p).in_file(p);
        assert_eq!(e.to_string(), "/tmp/x.img: bad");
    }
}
