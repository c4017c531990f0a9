//! Where image bytes come from besides local files: remote objects read over HTTP(S).
//!
//! A source answers positional reads and its size through [`crate::io::ReadAt`] and knows nothing
//! of formats, so every reader works on a URL unchanged.

pub(crate) mod http;
pub(crate) mod url;

pub use http::{HttpOptions, HttpSource, Interrupted, UrlRefresh};
pub use url::{is_url, redact_url};
