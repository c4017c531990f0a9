//! A remote object read with HTTP range requests.
//!
//! - **Open** with a ranged GET of the first [`CACHE_BLOCK`] bytes, never HEAD (a presigned URL is
//!   signed for GET only). The size comes from `Content-Range`'s total; the bytes seed the cache.
//! - **Every** reply to a range request must be `206` with exactly the `Content-Range` asked for
//!   and a body of exactly that length: a `200` (a server that ignores `Range`) or another range
//!   is never taken for the bytes asked, it is refused.
//! - **Pinned**: the ETag seen at open goes in `If-Match` on every later request (else
//!   Last-Modified in `If-Unmodified-Since`); a `412` or a different validator stops the read with
//!   "the object changed during the conversion", so a disk is never mixed from two uploads.
//! - **Retries** with exponential backoff and jitter for connection failures, resets, idle
//!   timeouts, truncated bodies (resumed from the last byte received), 408, 429, 500, 502, 503 and
//!   504, honouring `Retry-After`; other answers fail at once saying what the server answered.
//! - **Small reads** (format metadata: headers, tables, compressed clusters) are served from
//!   aligned cached blocks; large reads (the copy engine's data) go out as one ranged GET each.
//! - **Connections**: one agent keeps connections alive; at most
//!   [`HttpOptions::connections`] requests are in flight at once.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use super::url::{is_url, redact_text, redact_url};
use crate::error::{Error, RemoteFailure, Result};
use crate::io::ReadAt;

/// Bytes in one cached block: small reads are served from blocks of this size, aligned to it.
/// 256 KiB holds a qcow2 header with its L1 table, a few L2 tables or a run of compressed clusters
/// in one request, and costs little extra on a link of tens of MB/s.
pub(crate) const CACHE_BLOCK: u64 = 256 << 10;

/// Blocks kept in the cache (8 MiB): enough for every copy thread to have a couple of blocks in
/// use while it reads compressed clusters, and for the metadata an image touches at open.
const CACHE_BLOCKS: usize = 32;

/// Reads up to this long go through the cache; longer ones are fetched directly.
const SMALL_READ: u64 = CACHE_BLOCK;

/// Longest wait between two attempts, whatever the backoff or `Retry-After` say.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Longest `Retry-After` honoured as given; a longer one is cut to this (a server asking for
/// minutes would otherwise stall a conversion with no output).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Redirects followed per request before giving up.
const MAX_REDIRECTS: u32 = 10;

/// Time allowed to establish a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A function that returns a fresh URL for the same object when the server answers 401 or 403
/// (a pre-authenticated URL that expired mid-conversion). The object behind the new URL must be
/// the same: its ETag is still required.
pub type UrlRefresh = Arc<dyn Fn() -> std::result::Result<String, String> + Send + Sync>;

/// How to read remote (HTTP/HTTPS) sources.
///
/// ```
/// let mut http = vdisk_core::HttpOptions::default();
/// http.connections = 16;
/// http.headers.push(("Authorization".into(), "Bearer t0ken".into()));
/// assert!(!format!("{http:?}").contains("t0ken"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Most requests in flight at once (and connections kept alive) per source.
    pub connections: usize,
    /// Retries of one request after a retryable failure, before giving up.
    pub retries: u32,
    /// Idle timeout: the longest wait for the next byte (of a connection, a reply or a body).
    /// Not a limit on a whole request: a slow link that keeps delivering is never cut.
    pub timeout: Duration,
    /// The first backoff delay; each retry doubles it (up to 30 s), with random jitter.
    pub retry_delay: Duration,
    /// Extra request headers (`Authorization` for token-authenticated endpoints). Their values
    /// are never printed.
    pub headers: Vec<(String, String)>,
    /// Called for a fresh URL when the server answers 401 or 403; see [`UrlRefresh`].
    pub url_refresh: Option<UrlRefresh>,
    /// Polled while waiting to retry (a backoff or a `Retry-After` of up to two minutes): when it
    /// returns true the wait ends and the read fails, so an interrupt (the CLI's Ctrl-C) is not
    /// held up by a retry.
    pub interrupted: Option<Interrupted>,
}

/// See [`HttpOptions::interrupted`].
pub type Interrupted = Arc<dyn Fn() -> bool + Send + Sync>;

/// How often a retry wait looks at [`HttpOptions::interrupted`].
const INTERRUPT_POLL: Duration = Duration::from_millis(50);

impl HttpOptions {
    /// The default number of connections per source.
    pub const DEFAULT_CONNECTIONS: usize = 8;
    /// The default number of retries per request.
    pub const DEFAULT_RETRIES: u32 = 8;
    /// The default idle timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connections: Self::DEFAULT_CONNECTIONS,
            retries: Self::DEFAULT_RETRIES,
            timeout: Self::DEFAULT_TIMEOUT,
            retry_delay: Duration::from_millis(500),
            headers: Vec::new(),
            url_refresh: None,
            interrupted: None,
        }
    }
}

impl fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be credentials: only their names are shown.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HttpOptions")
            .field("connections", &self.connections)
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .field("retry_delay", &self.retry_delay)
            .field("headers", &names)
            .field("url_refresh", &self.url_refresh.is_some())
            .field("interrupted", &self.interrupted.is_some())
            .finish()
    }
}

/// What pins the object read: the validators of the first reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

/// A counting semaphore bounding the requests in flight.
#[derive(Debug)]
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots { free: Mutex::new(n.max(1)), freed: Condvar::new() }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}

/// Aligned blocks of the object, least recently used evicted first.
#[derive(Debug, Default)]
struct BlockCache {
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    blocks: HashMap<u64, (Arc<[u8]>, u64)>,
    tick: u64,
}

impl BlockCache {
    fn get(&self, index: u64) -> Option<Arc<[u8]>> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.tick += 1;
        let tick = c.tick;
        c.blocks.get_mut(&index).map(|(data, used)| {
            *used = tick;
            data.clone()
        })
    }

    fn put(&self, index: u64, data: Arc<[u8]>) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.tick += 1;
        let tick = c.tick;
        if c.blocks.len() >= CACHE_BLOCKS && !c.blocks.contains_key(&index) {
            if let Some(oldest) = c.blocks.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k) {
                c.blocks.remove(&oldest);
            }
        }
        c.blocks.insert(index, (data, tick));
    }
}

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug)]
struct Attempt {
    message: String,
    status: Option<u16>,
    retry: bool,
    retry_after: Option<Duration>,
    /// 401/403: a fresh URL may help.
    auth: bool,
}

impl Attempt {
    fn fatal(message: impl Into<String>, status: Option<u16>) -> Self {
        Attempt { message: message.into(), status, retry: false, retry_after: None, auth: false }
    }

    fn transient(message: impl Into<String>, status: Option<u16>) -> Self {
        Attempt { message: message.into(), status, retry: true, retry_after: None, auth: false }
    }
}

/// A remote object read with HTTP range requests; see the module documentation.
pub struct HttpSource {
    /// The URL in use (replaced by [`HttpOptions::url_refresh`]); never printed.
    url: RwLock<String>,
    /// The URL with its secrets replaced by `...`, for messages.
    shown: String,
    agent: ureq::Agent,
    options: HttpOptions,
    size: u64,
    validator: Validator,
    cache: BlockCache,
    slots: Slots,
    requests: AtomicU64,
    /// Seed of the backoff jitter.
    jitter: AtomicU64,
}

impl fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSource").field("url", &self.shown).field("size", &self.size).finish()
    }
}

impl HttpSource {
    /// Open the object at `url` (`http://` or `https://`): one ranged GET gives its size, its
    /// validator and its first bytes.
    pub fn open(url: &str, options: &HttpOptions) -> Result<HttpSource> {
        let shown = redact_url(url);
        if !is_url(url) {
            return Err(Error::invalid(format!("{shown} is not an http:// or https:// URL")));
        }
        for (name, value) in &options.headers {
            if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || ureq::http::HeaderValue::from_str(value).is_err()
            {
                return Err(Error::invalid(format!("the HTTP header '{name}' has an invalid name or value")));
            }
        }
        let agent = build_agent(url, options).map_err(|e| e.context(&shown))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = u64::from(now.subsec_nanos())
            ^ now.as_secs().rotate_left(20)
            ^ u64::from(std::process::id()).rotate_left(40);
        let mut src = HttpSource {
            url: RwLock::new(url.to_string()),
            shown,
            agent,
            options: options.clone(),
            size: 0,
            validator: Validator::default(),
            cache: BlockCache::default(),
            slots: Slots::new(options.connections),
            requests: AtomicU64::new(0),
            jitter: AtomicU64::new(seed | 1),
        };
        let (size, validator, first) = src.open_request().map_err(|f| Error::remote(f).context(&src.shown))?;
        src.size = size;
        src.validator = validator;
        if !first.is_empty() {
            src.cache.put(0, Arc::from(first));
        }
        Ok(src)
    }

    /// The URL with its secrets replaced by `...`.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// The URL as given (or as last refreshed), secrets included: for building the URLs of
    /// referenced objects, never for printing.
    pub(crate) fn url(&self) -> String {
        self.url.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests sent so far (every attempt counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The first request: `bytes=0-(CACHE_BLOCK-1)`, whose reply gives the size and validator.
    fn open_request(&self) -> std::result::Result<(u64, Validator, Vec<u8>), RemoteFailure> {
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            match self.try_open() {
                Ok(v) => return Ok(v),
                Err(a) => self.after_failure(a, &mut attempt, &mut refreshed)?,
            }
        }
    }

    fn try_open(&self) -> std::result::Result<(u64, Validator, Vec<u8>), Attempt> {
        let last = CACHE_BLOCK - 1;
        let _slot = self.slots.acquire();
        let response = self.send(0, last, false)?;
        let status = response.status().as_u16();
        if status == 416 {
            // Nothing to read: an empty object answers any range with 416 and `bytes */0`.
            let total = content_range(&response).and_then(|r| r.2);
            if total == Some(0) {
                return Ok((0, validator_of(&response), Vec::new()));
            }
        }
        self.check_status(&response, 0, last)?;
        let (start, end, total) = content_range(&response).ok_or_else(|| {
            Attempt::fatal(
                "the server answered 206 without a usable Content-Range; vdisk needs exact byte ranges",
                Some(206),
            )
        })?;
        let Some(total) = total else {
            return Err(Attempt::fatal(
                "the server does not say the object's size (Content-Range ends in /*); vdisk needs it",
                Some(206),
            ));
        };
        let expected_end = last.min(total.saturating_sub(1));
        if start != 0 || end != expected_end || total == 0 {
            return Err(range_mismatch(0, last, &response));
        }
        let len = usize::try_from(end + 1).map_err(|_| Attempt::fatal("range too large", None))?;
        let mut buf = vec![0u8; len];
        let validator = validator_of(&response);
        let got = read_body(response, &mut buf);
        if got < len {
            return Err(Attempt::transient(format!("the body ended after {got} of {len} bytes"), Some(206)));
        }
        Ok((total, validator, buf))
    }

    /// Send a GET for `bytes=first-last`, conditional on the validator unless `open`.
    fn send(
        &self,
        first: u64,
        last: u64,
        conditional: bool,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, Attempt> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let url = self.url();
        let mut req =
            self.agent.get(&url).header("Range", format!("bytes={first}-{last}")).header("Accept-Encoding", "identity");
        if conditional {
            if let Some(etag) = self.validator.etag.as_deref().filter(|e| !e.starts_with("W/")) {
                req = req.header("If-Match", etag);
            } else if let Some(lm) = &self.validator.last_modified {
                req = req.header("If-Unmodified-Since", lm.as_str());
            }
        }
        for (name, value) in &self.options.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        req.call().map_err(|e| transport_failure(e, self.options.timeout))
    }

    /// Refuse any reply but a 206 of stored bytes; say what the server answered.
    fn check_status(
        &self,
        response: &ureq::http::Response<ureq::Body>,
        first: u64,
        last: u64,
    ) -> std::result::Result<(), Attempt> {
        let status = response.status();
        let code = status.as_u16();
        let encoding = response.headers().get("content-encoding").and_then(|v| v.to_str().ok()).map(str::trim);
        if code == 206 && encoding.is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity")) {
            return Err(Attempt::fatal(
                format!(
                    "the server sent the range encoded ({}) although vdisk asked for identity; a range must be the stored bytes",
                    redact_text(encoding.unwrap_or("")).chars().take(40).collect::<String>()
                ),
                Some(206),
            ));
        }
        let reason = status.canonical_reason().unwrap_or("");
        let answered = format!("the server answered {code} {reason}").trim_end().to_string();
        match code {
            206 => Ok(()),
            200 => Err(Attempt::fatal(
                format!(
                    "the server ignores Range requests (it answered 200 with the whole object to a request for bytes {first}-{last}); \
                     vdisk reads remote images only from servers that honour Range"
                ),
                Some(200),
            )),
            412 => Err(Attempt::fatal(
                "the object changed during the conversion (the server answered 412 Precondition Failed to If-Match); \
                 nothing read after the change was used",
                Some(412),
            )),
            408 | 429 | 500 | 502 | 503 | 504 => {
                let mut a = Attempt::transient(answered, Some(code));
                a.retry_after = retry_after(response);
                Err(a)
            }
            401 | 403 => {
                let mut a = Attempt::fatal(
                    if code == 403 {
                        format!("{answered} (the URL may have expired or lack permission to read)")
                    } else {
                        format!("{answered} (the request was not authenticated)")
                    },
                    Some(code),
                );
                a.auth = true;
                Err(a)
            }
            416 => Err(Attempt::fatal(format!("{answered} for bytes {first}-{last}"), Some(code))),
            _ => Err(Attempt::fatal(answered, Some(code))),
        }
    }

    /// Decide after a failed attempt: wait and go on, refresh the URL, or give up.
    fn after_failure(
        &self,
        a: Attempt,
        attempt: &mut u32,
        refreshed: &mut bool,
    ) -> std::result::Result<(), RemoteFailure> {
        if a.auth && !*refreshed {
            if let Some(refresh) = &self.options.url_refresh {
                *refreshed = true;
                let fresh = refresh().map_err(|e| RemoteFailure {
                    message: format!("{}; refreshing the URL failed: {}", a.message, redact_text(&e)),
                    status: a.status,
                })?;
                if !is_url(&fresh) {
                    return Err(RemoteFailure {
                        message: format!(
                            "{}; the URL refresh returned something that is not an http(s) URL",
                            a.message
                        ),
                        status: a.status,
                    });
                }
                *self.url.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                return Ok(());
            }
        }
        if !a.retry {
            return Err(RemoteFailure { message: a.message, status: a.status });
        }
        if *attempt >= self.options.retries {
            let n = *attempt + 1;
            return Err(RemoteFailure {
                message: format!("{} (gave up after {n} attempt{})", a.message, if n == 1 { "" } else { "s" }),
                status: a.status,
            });
        }
        let delay = match a.retry_after {
            Some(d) => d.min(MAX_RETRY_AFTER),
            None => self.backoff(*attempt),
        };
        *attempt += 1;
        let until = std::time::Instant::now() + delay;
        loop {
            let now = std::time::Instant::now();
            if now >= until {
                return Ok(());
            }
            if self.options.interrupted.as_ref().is_some_and(|f| f()) {
                return Err(RemoteFailure {
                    message: format!("interrupted while waiting to retry ({})", a.message),
                    status: a.status,
                });
            }
            std::thread::sleep((until - now).min(INTERRUPT_POLL));
        }
    }

    /// `retry_delay * 2^attempt`, capped, with the upper half randomised (so many threads failing
    /// together do not retry together).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.options.retry_delay.saturating_mul(1u32 << attempt.min(16)).min(MAX_RETRY_DELAY);
        // xorshift64: jitter needs no cryptographic quality.
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        let half = base / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(x % nanos)
    }

    /// Fill `buf` from `offset` (the range lies inside the object) with as many requests as
    /// failures demand, each range checked.
    fn fetch(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), RemoteFailure> {
        let mut done = 0usize;
        let mut attempt = 0u32;
        let mut refreshed = false;
        while done < buf.len() {
            let first = offset + done as u64;
            let last = offset + buf.len() as u64 - 1;
            match self.try_fetch(&mut buf[done..], first, last) {
                Ok(n) if first + n as u64 > last => return Ok(()),
                Ok(n) => {
                    // A body cut short: resume from the first byte not received.
                    done += n;
                    if n > 0 {
                        attempt = 0;
                    }
                    self.after_failure(
                        Attempt::transient(
                            format!("the body ended after {n} of {} bytes", last - first + 1),
                            Some(206),
                        ),
                        &mut attempt,
                        &mut refreshed,
                    )?;
                }
                Err(a) => self.after_failure(a, &mut attempt, &mut refreshed)?,
            }
        }
        Ok(())
    }

    /// One request for `first..=last` into `buf`; returns the bytes received (fewer when the
    /// body broke off).
    fn try_fetch(&self, buf: &mut [u8], first: u64, last: u64) -> std::result::Result<usize, Attempt> {
        let _slot = self.slots.acquire();
        let response = self.send(first, last, true)?;
        self.check_status(&response, first, last)?;
        match content_range(&response) {
            Some((s, e, Some(t))) if s == first && e == last && t == self.size => {}
            Some((s, e, t)) if s == first && e == last && t != Some(self.size) => {
                return Err(Attempt::fatal(
                    format!(
                        "the object changed during the conversion (its size went from {} to {})",
                        self.size,
                        t.map_or_else(|| "unknown".to_string(), |t| t.to_string())
                    ),
                    Some(206),
                ))
            }
            _ => return Err(range_mismatch(first, last, &response)),
        }
        let seen = validator_of(&response);
        let changed = |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(x), Some(y)) if x != y);
        if changed(&self.validator.etag, &seen.etag)
            || (self.validator.etag.is_none() && changed(&self.validator.last_modified, &seen.last_modified))
        {
            return Err(Attempt::fatal(
                "the object changed during the conversion (its ETag or Last-Modified differs from the one seen at open); \
                 nothing read after the change was used",
                Some(206),
            ));
        }
        let want = usize::try_from(last - first + 1).unwrap_or(buf.len()).min(buf.len());
        Ok(read_body(response, &mut buf[..want]))
    }

    /// Read `buf.len()` bytes at `offset` (inside the object) through the block cache.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), RemoteFailure> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / CACHE_BLOCK;
            let block = match self.cache.get(index) {
                Some(b) => b,
                None => {
                    let start = index * CACHE_BLOCK;
                    let len = CACHE_BLOCK.min(self.size - start);
                    let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
                    self.fetch(&mut data, start)?;
                    let data: Arc<[u8]> = Arc::from(data);
                    self.cache.put(index, data.clone());
                    data
                }
            };
            let within = usize::try_from(pos - index * CACHE_BLOCK).unwrap_or(0);
            let n = (buf.len() - done).min(block.len().saturating_sub(within));
            if n == 0 {
                break;
            }
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

impl ReadAt for HttpSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = usize::try_from((self.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        let buf = &mut buf[..n];
        if (n as u64) < SMALL_READ {
            self.read_cached(buf, offset)?;
        } else {
            self.fetch(buf, offset)?;
        }
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> Option<String> {
        let v = &self.validator;
        let tag = match (&v.etag, &v.last_modified) {
            (Some(e), _) => format!("etag:{e}"),
            (None, Some(lm)) => format!("last-modified:{lm}"),
            (None, None) => return None,
        };
        Some(format!("http:{tag}:{}", self.size))
    }
}

/// The agent for `url`: connection pool sized by the options, the idle timeout, redirects, the
/// proxy from the environment, and for HTTPS rustls (ring) with the system's root certificates
/// (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured).
fn build_agent(url: &str, options: &HttpOptions) -> Result<ureq::Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let connections = options.connections.max(1);
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(MAX_REDIRECTS)
        // An Authorization header given with --http-header follows a redirect on the same host only.
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .max_idle_connections(connections.saturating_mul(2))
        .max_idle_connections_per_host(connections)
        .timeout_connect(Some(CONNECT_TIMEOUT.min(options.timeout.max(Duration::from_millis(1)))))
        .timeout_per_read(Some(options.timeout))
        .timeout_per_write(Some(options.timeout))
        .user_agent(concat!("vdisk/", env!("CARGO_PKG_VERSION")))
        .proxy(ureq::Proxy::try_from_env());
    if url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
        let found = rustls_native_certs::load_native_certs();
        let roots: Vec<Certificate<'static>> =
            found.certs.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect();
        if roots.is_empty() {
            let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
            return Err(Error::new(
                crate::ErrorKind::Remote,
                format!("no trusted root certificates were found (set SSL_CERT_FILE or SSL_CERT_DIR){why}"),
            ));
        }
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        config = config.tls_config(tls);
    }
    Ok(config.build().into())
}

/// A transport failure (no usable reply), with its retry decision.
fn transport_failure(e: ureq::Error, idle: Duration) -> Attempt {
    use ureq::Error as E;
    let text = redact_text(&e.to_string());
    match e {
        E::Timeout(_) => {
            Attempt::transient(format!("no data arrived for {} s (the idle timeout): {text}", idle.as_secs_f64()), None)
        }
        // A certificate or handshake refusal comes back as an I/O error; retrying cannot help.
        E::Io(ref io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            Attempt::fatal(format!("the TLS connection was refused: {text}"), None)
        }
        E::Rustls(_) | E::Tls(_) => Attempt::fatal(format!("the TLS connection was refused: {text}"), None),
        E::Io(_) | E::ConnectionFailed | E::HostNotFound | E::Protocol(_) => {
            Attempt::transient(format!("the connection failed: {text}"), None)
        }
        E::TooManyRedirects => Attempt::fatal(format!("more than {MAX_REDIRECTS} redirects"), None),
        E::BadUri(_) => Attempt::fatal("the URL is not valid", None),
        _ => Attempt::fatal(format!("the request failed: {text}"), None),
    }
}

/// Read the body into `buf` until it is full or the body ends or breaks; returns bytes read.
fn read_body(response: ureq::http::Response<ureq::Body>, buf: &mut [u8]) -> usize {
    let mut reader = response.into_body().into_reader();
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

/// `(first, last, total)` from a `Content-Range: bytes first-last/total` header (total `None`
/// for `*`); `bytes */total` gives `(0, 0, Some(total))` only to carry the total.
fn content_range(response: &ureq::http::Response<ureq::Body>) -> Option<(u64, u64, Option<u64>)> {
    let value = response.headers().get("content-range")?.to_str().ok()?.trim();
    let rest = value.strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if range.trim() == "*" {
        return Some((0, 0, total));
    }
    let (a, b) = range.trim().split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

fn validator_of(response: &ureq::http::Response<ureq::Body>) -> Validator {
    let get = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string());
    Validator {
        etag: get("etag").filter(|s| !s.is_empty()),
        last_modified: get("last-modified").filter(|s| !s.is_empty()),
    }
}

fn retry_after(response: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    let v = response.headers().get("retry-after")?.to_str().ok()?.trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

fn range_mismatch(first: u64, last: u64, response: &ureq::http::Response<ureq::Body>) -> Attempt {
    let got = response.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    Attempt::fatal(
        format!(
            "the server ignores Range requests: asked for bytes {first}-{last}, it answered Content-Range '{}'; \
             vdisk never uses bytes it did not ask for",
            redact_text(&got).chars().take(80).collect::<String>()
        ),
        Some(206),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_debug_hides_header_values() {
        let mut o = HttpOptions::default();
        o.headers.push(("Authorization".into(), "Bearer SECRET".into()));
        let s = format!("{o:?}");
        assert!(s.contains("Authorization") && !s.contains("SECRET"), "{s}");
    }

    #[test]
    fn cache_evicts_the_least_recently_used_block() {
        let c = BlockCache::default();
        for i in 0..CACHE_BLOCKS as u64 {
            c.put(i, Arc::from(vec![i as u8]));
        }
        assert!(c.get(0).is_some());
        c.put(1000, Arc::from(vec![1u8]));
        assert!(c.get(0).is_some(), "block 0 was used last and stays");
        assert!(c.get(1).is_none(), "block 1 was the least recently used");
        assert_eq!(c.inner.lock().unwrap().blocks.len(), CACHE_BLOCKS);
    }

    #[test]
    fn bad_urls_and_headers_are_refused_before_any_request() {
        let e = HttpSource::open("ftp://h/x?sig=S", &HttpOptions::default()).unwrap_err();
        assert!(!e.to_string().contains("sig=S"), "{e}");
        let mut o = HttpOptions::default();
        o.headers.push(("Bad Name".into(), "v".into()));
        assert!(HttpSource::open("http://127.0.0.1:9/x", &o).is_err());
    }

    #[test]
    fn a_refused_connection_is_retried_then_reported_without_secrets() {
        // Port 9 (discard) is closed on loopback here: every attempt is refused at once.
        let o = HttpOptions { retries: 2, retry_delay: Duration::from_millis(1), ..HttpOptions::default() };
        let e = HttpSource::open("http://127.0.0.1:9/p/TOKEN/n/a/b/c/o/d?sig=SECRET", &o).unwrap_err();
        let s = e.to_string();
        assert_eq!(e.kind(), crate::ErrorKind::Remote);
        assert!(s.contains("gave up after 3 attempts"), "{s}");
        assert!(!s.contains("TOKEN") && !s.contains("SECRET"), "{s}");
        assert!(s.starts_with("http://127.0.0.1:9/p/.../n/a/b/c/o/d?...: "), "{s}");
    }
}
