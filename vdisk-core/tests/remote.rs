//! Remote sources: images served by the loopback test server (`testdata/http/server.py`) are read
//! over HTTP(S) and must convert to exactly what the local file converts to; injected faults are
//! survived (retries) or refused with one clear line; secrets never show.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{have_qemu, qemu_img, qemu_io, random_io_commands, sha256_file, Rng};
use vdisk_core::{convert, ConvertOptions, ErrorKind, Format, HttpOptions, Image, OpenOptions, ReferencePolicy};

/// The test server, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    scheme: &'static str,
}

impl Server {
    /// Start the server on `root` with extra arguments; `None` (after a SKIP line) without python3
    /// outside CI.
    fn start(root: &Path, extra: &[&str]) -> Option<Server> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/http/server.py");
        let spawned = Command::new("python3")
            .arg(&script)
            .args(["--root", root.to_str().unwrap(), "--port", "0", "--exit-on-stdin-eof"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "python3 is required on CI: {e}");
                eprintln!("SKIP: python3 not found; remote tests not run");
                return None;
            }
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("server did not print its port: {line:?}"));
        let scheme = if extra.contains(&"--tls-cert") { "https" } else { "http" };
        Some(Server { child, port, scheme })
    }

    fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}/{}", self.scheme, self.port, path.trim_start_matches('/'))
    }

    /// The server's `/_stats` as JSON (plain HTTP only).
    fn stats(&self) -> serde_json::Value {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET /_stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str(body).unwrap()
    }

    fn reset_stats(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET /_stats/reset HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options with quick retries, so fault tests do not wait long.
fn fast(connections: usize) -> OpenOptions {
    let mut http = HttpOptions::default();
    http.connections = connections;
    http.retry_delay = Duration::from_millis(20);
    http.retries = 4;
    http.timeout = Duration::from_secs(10);
    OpenOptions { http, ..OpenOptions::default() }
}

/// Convert `image` (a path or URL) to raw with vdisk; returns the sha256 of the output.
fn convert_sha(image: &str, open: &OpenOptions, out_dir: &Path, name: &str) -> vdisk_core::Result<String> {
    let img = Image::open(image, open)?;
    let out = out_dir.join(name);
    let _ = std::fs::remove_file(&out);
    convert(&img, &out, &ConvertOptions { threads: Some(4), ..ConvertOptions::default() })?;
    Ok(sha256_file(&out).0)
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// Every format read over HTTP converts to the same bytes as the local file.
#[test]
fn every_format_over_http_matches_the_local_conversion() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let size: u64 = 24 << 20;
    let base = root.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), &size.to_string()]);
    let mut rng = Rng::new(11);
    qemu_io("qcow2", &base, &random_io_commands(&mut rng, size, 64 << 10, 60, false));
    let compressed = root.join("compressed.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", compressed.to_str().unwrap(), &size.to_string()]);
    // qemu writes compressed clusters only over unallocated ones: compressed writes alone.
    let mut rng = Rng::new(12);
    let clusters: std::collections::BTreeSet<u64> = (0..80).map(|_| rng.below(size >> 16)).collect();
    let cmds: Vec<String> = clusters.iter().map(|c| format!("write -c -P {} {} 65536", c % 255 + 1, c << 16)).collect();
    qemu_io("qcow2", &compressed, &cmds);
    let raw = root.join("disk.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", base.to_str().unwrap(), raw.to_str().unwrap()]);
    let b = base.to_str().unwrap();
    for (name, fmt, opts) in [
        ("stream.vmdk", "vmdk", "subformat=streamOptimized"),
        ("sparse.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("dynamic.vhd", "vpc", "subformat=dynamic"),
        ("fixed.vhd", "vpc", "subformat=fixed"),
        ("disk.vhdx", "vhdx", "subformat=dynamic"),
        ("disk.vdi", "vdi", "static=off"),
    ] {
        let out = root.join(name);
        qemu_img(&["convert", "-f", "qcow2", "-O", fmt, "-o", opts, b, out.to_str().unwrap()]);
    }
    let Some(server) = Server::start(&root, &[]) else { return };
    let work = dir.path().join("out");
    std::fs::create_dir(&work).unwrap();
    for (name, format) in [
        ("base.qcow2", Format::Qcow2),
        ("compressed.qcow2", Format::Qcow2),
        ("disk.raw", Format::Raw),
        ("stream.vmdk", Format::Vmdk),
        ("sparse.vmdk", Format::Vmdk),
        ("dynamic.vhd", Format::Vhd),
        ("fixed.vhd", Format::Vhd),
        ("disk.vhdx", Format::Vhdx),
        ("disk.vdi", Format::Vdi),
    ] {
        let local =
            convert_sha(root.join(name).to_str().unwrap(), &OpenOptions::default(), &work, "local.raw").unwrap();
        let url = server.url(name);
        let remote = convert_sha(&url, &fast(8), &work, "remote.raw").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(remote, local, "{name}: content over HTTP differs from the local conversion");
        let img = Image::open(&url, &fast(8)).unwrap();
        assert_eq!(img.format(), format, "{name}");
        let info = img.info();
        assert_eq!(info.filename, url, "{name}");
        assert_eq!(info.actual_size, None, "{name}: no local file to measure");
        let local_info = Image::describe(root.join(name), &OpenOptions::default()).unwrap();
        assert_eq!(info.virtual_size, local_info.virtual_size, "{name}");
        let report = Image::check_file(&url, &fast(8)).unwrap();
        assert_eq!(report.corruptions, 0, "{name}");
    }
}

/// Opening a qcow2 costs a few requests, not one per table; mapping it a few more.
#[test]
fn opening_a_qcow2_costs_few_requests() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    let size: u64 = 64 << 30;
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), &size.to_string()]);
    // Data scattered over the whole disk: many L2 tables.
    let cmds: Vec<String> = (0..64u64).map(|i| format!("write -P {} {} 65536", i + 1, i * (size / 64))).collect();
    qemu_io("qcow2", &img, &cmds);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let url = server.url("big.qcow2");
    let info = Image::describe(&url, &fast(4)).unwrap();
    assert_eq!(info.virtual_size, size);
    let opened = server.stats()["requests"].as_u64().unwrap();
    // The first block (header, tables near it), the last (the format probe's footer check), and
    // at most one more.
    assert!(opened <= 3, "describing a qcow2 took {opened} requests");
    server.reset_stats();
    let image = Image::open(&url, &fast(4)).unwrap();
    let data: u64 = image
        .extents()
        .map(|e| e.unwrap())
        .filter(|e| matches!(e.kind, vdisk_core::ExtentKind::Data { .. }))
        .map(|e| e.len)
        .sum();
    assert_eq!(data, 64 * 65536);
    let mapped = server.stats()["requests"].as_u64().unwrap();
    // 64 L2 tables spread over 8 MiB of file: read through 256 KiB cached blocks.
    assert!(mapped <= 40, "opening and mapping took {mapped} requests");
}

/// Retryable faults (503/429 with Retry-After, resets, truncated bodies, slow first bytes past
/// the idle timeout, redirects) end in exact content.
#[test]
fn retryable_faults_end_in_exact_content() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_file(&dir.path().join("disk.raw"), 3 << 20, 5);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let mut quick_timeout = fast(4);
    quick_timeout.http.timeout = Duration::from_millis(700);
    for (spec, opts) in [
        ("status=503,times=2", fast(4)),
        ("status=429,times=1,retry-after=1", fast(4)),
        ("status=500,after=1,times=3", fast(4)),
        ("status=502,after=2,times=1", fast(4)),
        ("drop,after=1,times=2", fast(4)),
        ("truncate,times=3", fast(4)),
        ("slow=3,after=1,times=1", quick_timeout),
        ("redirect", fast(4)),
    ] {
        let url = server.url(&format!("_fault/{spec}/disk.raw"));
        let started = std::time::Instant::now();
        let image = Image::open(&url, &opts).unwrap_or_else(|e| panic!("{spec}: {e}"));
        let mut got = vec![0u8; data.len()];
        // Large reads go out as ranged GETs of their own; small ones through the cache.
        assert_eq!(image.read_at(&mut got[..2 << 20], 0).unwrap(), 2 << 20, "{spec}");
        for off in ((2 << 20)..data.len()).step_by(4096) {
            image.read_at(&mut got[off..off + 4096], off as u64).unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
        assert!(got == data, "{spec}: content differs");
        if spec.starts_with("slow") {
            // The idle timeout (0.7 s) cut the 3 s stall short and the retry was answered at once.
            let took = started.elapsed();
            assert!(took < Duration::from_millis(2500), "{spec}: took {took:?}");
        }
    }
    let stats = server.stats();
    assert!(stats["status"]["503"].as_u64().unwrap() >= 2, "{stats}");
}

/// A fault that does not go away is reported after the retries, with the status.
#[test]
fn persistent_failures_give_up_after_the_retries() {
    let dir = tempfile::tempdir().unwrap();
    random_file(&dir.path().join("disk.raw"), 1 << 20, 6);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let e = Image::open(server.url("_fault/status=503/disk.raw"), &fast(2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    assert_eq!(e.http_status(), Some(503));
    let s = e.to_string();
    assert!(s.contains("503") && s.contains("gave up after 5 attempts"), "{s}");
    assert_eq!(server.stats()["requests"].as_u64(), Some(5), "one attempt and four retries");
    let e = Image::open(server.url("missing.raw"), &fast(2)).unwrap_err();
    assert_eq!((e.kind(), e.http_status()), (ErrorKind::Remote, Some(404)), "{e}");
}

/// A server that ignores Range, or answers another range, is refused: its bytes are never used.
#[test]
fn servers_that_ignore_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    random_file(&dir.path().join("disk.raw"), 1 << 20, 7);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let e = Image::open(server.url("_fault/ignore-range/disk.raw"), &fast(2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    assert!(e.to_string().contains("ignores Range requests"), "{e}");
    assert!(!e.to_string().contains('\n'));
    // The open (and the format probe's read of the footer) succeed; a later read gets a shifted
    // range.
    let image = Image::open(server.url("_fault/badrange,after=2/disk.raw"), &fast(2)).unwrap();
    let mut buf = vec![0u8; 512 << 10];
    let e = image.read_at(&mut buf, 300 << 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    assert!(e.to_string().contains("ignores Range") && e.to_string().contains("bytes 307200-"), "{e}");
    // A range labelled with a content encoding is not the stored bytes.
    let e = Image::open(server.url("_fault/encoding=gzip/disk.raw"), &fast(2)).unwrap_err();
    assert!(e.to_string().contains("encoded (gzip)"), "{e}");
    // A whole server that never honours Range.
    let Some(plain) = Server::start(dir.path(), &["--no-range"]) else { return };
    let e = Image::open(plain.url("disk.raw"), &fast(2)).unwrap_err();
    assert!(e.to_string().contains("ignores Range requests"), "{e}");
}

/// An object replaced between two requests stops the read: If-Match gets 412.
#[test]
fn an_object_replaced_mid_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    random_file(&dir.path().join("disk.raw"), 2 << 20, 8);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let image = Image::open(server.url("_fault/replace-after=2/disk.raw"), &fast(2)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let e = image.read_at(&mut buf, 1 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    assert_eq!(e.http_status(), Some(412));
    assert!(e.to_string().contains("the object changed during the conversion"), "{e}");
    // A conversion stops the same way.
    let out = dir.path().join("out.raw");
    let image = Image::open(server.url("_fault/replace-after=2,x/disk.raw"), &fast(2)).unwrap();
    let e = convert(&image, &out, &ConvertOptions::default()).unwrap_err();
    assert!(e.to_string().contains("the object changed during the conversion"), "{e}");
}

/// 403 says the URL may have expired; no secret (query string, OCI token) shows in any message.
#[test]
fn errors_name_the_status_and_hide_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vms")).unwrap();
    random_file(&dir.path().join("vms/disk.raw"), 1 << 20, 9);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let url = server.url("_fault/status=403/vms/disk.raw?X-Amz-Signature=SECRETSIG&X-Amz-Credential=CRED");
    let e = Image::open(&url, &fast(2)).unwrap_err();
    let s = e.to_string();
    assert_eq!(e.http_status(), Some(403));
    assert!(s.contains("403 Forbidden") && s.contains("the URL may have expired"), "{s}");
    assert!(!s.contains("SECRETSIG") && !s.contains("CRED"), "{s}");
    assert!(s.contains("/vms/disk.raw?..."), "{s}");
    // OCI pre-authenticated request: the token is a path segment.
    let par = server.url("p/PARTOKEN123/n/ns/b/bucket/o/vms%2Fmissing.raw");
    let e = Image::open(&par, &fast(2)).unwrap_err();
    assert!(!e.to_string().contains("PARTOKEN123") && e.to_string().contains("/p/.../n/ns"), "{e}");
    // And a good PAR URL opens, shown redacted everywhere.
    let par = server.url("p/PARTOKEN123/n/ns/b/bucket/o/vms%2Fdisk.raw?sig=Q");
    let image = Image::open(&par, &fast(2)).unwrap();
    let shown = format!("{:?} {} {:?}", image, image.path().unwrap().display(), image.info());
    assert!(!shown.contains("PARTOKEN123") && !shown.contains("sig=Q"), "{shown}");
    // A connection refused mid-conversion names the redacted source.
    drop(server);
    let mut buf = vec![0u8; 512 << 10];
    let e = image.read_at(&mut buf, 0).unwrap_err();
    assert!(!e.to_string().contains("PARTOKEN123"), "{e}");
}

/// A URL that expires mid-read is replaced by the refresh function; the object must be the same.
#[test]
fn an_expired_url_is_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_file(&dir.path().join("disk.raw"), 2 << 20, 10);
    let Some(server) = Server::start(dir.path(), &[]) else { return };
    let fresh = server.url("disk.raw?sig=fresh");
    let mut opts = fast(2);
    opts.http.url_refresh = Some(Arc::new(move || Ok(fresh.clone())));
    let image = Image::open(server.url("_fault/status=403,after=1/disk.raw?sig=old"), &opts).unwrap();
    let mut got = vec![0u8; data.len()];
    image.read_at(&mut got, 0).unwrap();
    assert!(got == data);
    // Refreshed to another object: If-Match fails.
    std::fs::write(dir.path().join("other.raw"), vec![1u8; 2 << 20]).unwrap();
    let other = server.url("other.raw");
    opts.http.url_refresh = Some(Arc::new(move || Ok(other.clone())));
    let image = Image::open(server.url("_fault/status=403,after=2,times=99/disk.raw"), &opts).unwrap();
    let e = image.read_at(&mut got, 0).unwrap_err();
    assert!(e.to_string().contains("the object changed"), "{e}");
}

/// Extra headers reach the server (token-authenticated endpoints) and are never printed.
#[test]
fn extra_headers_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    random_file(&dir.path().join("disk.raw"), 1 << 20, 11);
    let Some(server) = Server::start(dir.path(), &["--require-header", "Authorization: Bearer T0KEN"]) else { return };
    let e = Image::open(server.url("disk.raw"), &fast(2)).unwrap_err();
    assert_eq!(e.http_status(), Some(401), "{e}");
    let mut opts = fast(2);
    opts.http.headers.push(("Authorization".into(), "Bearer T0KEN".into()));
    let image = Image::open(server.url("disk.raw"), &opts).unwrap();
    assert_eq!(image.virtual_size(), 1 << 20);
    assert!(!format!("{opts:?}").contains("T0KEN"));
    // A redirect on the same host keeps the Authorization header.
    let image = Image::open(server.url("_fault/redirect/disk.raw"), &opts).unwrap();
    assert_eq!(image.virtual_size(), 1 << 20);
}

/// Backing files of a remote image resolve against its URL under same-dir, never to local files.
#[test]
fn backing_files_resolve_against_the_url() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let base = root.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    qemu_io("qcow2", &base, &["write -P 7 0 4M".to_string()]);
    let top = root.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io("qcow2", &top, &["write -P 9 1M 1M".to_string()]);
    // A top image naming an absolute local path: refused even under `any` when read remotely.
    let abs = root.join("abs.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", abs.to_str().unwrap()]);
    let Some(server) = Server::start(&root, &[]) else { return };
    let work = dir.path().join("out");
    std::fs::create_dir(&work).unwrap();
    let local = {
        let o = OpenOptions { references: ReferencePolicy::SameDir, ..OpenOptions::default() };
        convert_sha(top.to_str().unwrap(), &o, &work, "local.raw").unwrap()
    };
    let mut same = fast(2);
    same.references = ReferencePolicy::SameDir;
    let url = server.url("top.qcow2?sig=S3CRET");
    let remote = convert_sha(&url, &same, &work, "remote.raw").unwrap();
    assert_eq!(remote, local);
    let image = Image::open(&url, &same).unwrap();
    let files: Vec<String> = image.files().map(|p| p.display().to_string()).collect();
    assert_eq!(files, [server.url("top.qcow2?..."), server.url("base.qcow2")]);
    // The signature was not sent for the backing file.
    let e = Image::open(&url, &fast(2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    assert!(!e.to_string().contains("S3CRET"), "{e}");
    let mut any = fast(2);
    any.references = ReferencePolicy::Any;
    let e = Image::open(server.url("abs.qcow2"), &any).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    // describe does not open references.
    let info = Image::describe(server.url("abs.qcow2"), &fast(2)).unwrap();
    assert_eq!(info.backing_filename.as_deref(), base.to_str());
}

/// HTTPS with a test CA given through SSL_CERT_FILE; a certificate from another CA is refused.
#[test]
fn https_with_a_test_ca() {
    let Some(ok) = Command::new("openssl").arg("version").output().ok().filter(|o| o.status.success()) else {
        eprintln!("SKIP: openssl not found; HTTPS test not run");
        return;
    };
    drop(ok);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = random_file(&d.join("disk.raw"), 1 << 20, 12);
    let ossl = |args: &[&str]| common::run(Command::new("openssl").args(args).current_dir(d));
    for ca in ["ca", "other-ca"] {
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=vdisk {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ]);
    }
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    let cert = d.join("server.pem");
    let key = d.join("server.key");
    let Some(server) = Server::start(d, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()])
    else {
        return;
    };
    let url = server.url("disk.raw");
    assert!(url.starts_with("https://"));
    // Only this test reads HTTPS, so setting the variable does not disturb the others.
    std::env::set_var("SSL_CERT_FILE", d.join("other-ca.pem"));
    let e = Image::open(&url, &fast(2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // Not retried: a refused certificate does not get better.
    assert!(!e.to_string().contains("gave up"), "{e}");
    std::env::set_var("SSL_CERT_FILE", d.join("ca.pem"));
    let image = Image::open(&url, &fast(2)).unwrap();
    let mut got = vec![0u8; data.len()];
    image.read_at(&mut got, 0).unwrap();
    assert!(got == data);
}

/// Real images from the corpus (`../shared/corpus`, or `$VDISK_CORPUS` naming that folder), read
/// over HTTP, convert to the guest content its manifest records: every row that converts without
/// options, up to 300 MB of virtual size.
#[test]
fn corpus_images_over_http_match_their_manifest() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let folder =
        std::env::var_os("VDISK_CORPUS").map(std::path::PathBuf::from).unwrap_or(repo.join("../shared/corpus"));
    let (tarball, expected) = (folder.join("corpus.tar.xz"), folder.join("expected.tsv"));
    if !tarball.is_file() || !expected.is_file() {
        eprintln!("SKIP: corpus not found (set VDISK_CORPUS or provide ../shared/corpus)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    common::run(Command::new("tar").arg("-xSJf").arg(&tarball).arg("-C").arg(&files));
    let Some(server) = Server::start(&files, &[]) else { return };
    let mut done = 0;
    for line in std::fs::read_to_string(&expected).unwrap().lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (name, flags, expect, sha, size) =
            (cols[0], cols[1], cols[2], cols[3], cols[4].parse::<u64>().unwrap_or(0));
        if expect != "ok" || !flags.is_empty() || size == 0 || size > 300_000_000 || !files.join(name).is_file() {
            continue;
        }
        let got =
            convert_sha(&server.url(name), &fast(4), dir.path(), "out.raw").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, sha, "{name}: content over HTTP differs from the manifest");
        done += 1;
    }
    assert!(done >= 10, "only {done} corpus rows were checked");
}
