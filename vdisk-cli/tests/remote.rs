//! `vdisk` on http:// sources served by the loopback test server (`testdata/http/server.py`):
//! every command that takes an image accepts a URL, gives what it gives for the local file, and
//! never prints a secret (query string, OCI pre-authenticated token, header value); failures are
//! one line.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(120);

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(root: &Path, extra: &[&str]) -> Server {
        let script = repo_root().join("testdata/http/server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--root", root.to_str().unwrap(), "--port", "0", "--exit-on-stdin-eof"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the test server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        Server { child, port: line.trim().parse().unwrap() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_tools() -> bool {
    let ok = |c: &str| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success());
    if ok("qemu-img") && ok("python3") {
        return true;
    }
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "qemu-img and python3 are required on CI");
    eprintln!("SKIP: qemu-img or python3 not found; remote CLI tests not run");
    false
}

fn vdisk_run(args: &[&str]) -> Output {
    run_limited(vdisk().args(args), LIMIT)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A qcow2 with data in `dir`, and its name.
fn make_image(dir: &Path) -> &'static str {
    let p = dir.join("disk.qcow2");
    let q =
        |args: &[&str]| assert!(Command::new(args[0]).args(&args[1..]).output().unwrap().status.success(), "{args:?}");
    q(&["qemu-img", "create", "-q", "-f", "qcow2", p.to_str().unwrap(), "32M"]);
    q(&["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 3M", "-c", "write -P 9 20M 512k", p.to_str().unwrap()]);
    "disk.qcow2"
}

#[test]
fn every_command_reads_a_url_and_hides_its_secrets() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let name = make_image(&root);
    let local = root.join(name);
    let local = local.to_str().unwrap();
    let server = Server::start(&root, &[]);
    // An OCI pre-authenticated URL with a query string too: both secrets must stay hidden.
    let url = server.url(&format!("p/PARTOKEN/n/ns/b/bucket/o/{name}?sig=QSECRET"));
    let shown = server.url(&format!("p/.../n/ns/b/bucket/o/{name}?..."));
    let secret_free = |out: &Output, what: &str| {
        let t = text(out);
        assert!(!t.contains("PARTOKEN") && !t.contains("QSECRET"), "{what} printed a secret: {t}");
    };

    let info = vdisk_run(&["info", "--output", "json", &url]);
    assert!(info.status.success(), "{}", text(&info));
    secret_free(&info, "info");
    let remote: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let mine: serde_json::Value =
        serde_json::from_slice(&vdisk_run(&["info", "--output", "json", local]).stdout).unwrap();
    assert_eq!(remote["filename"], shown.as_str());
    assert_eq!(remote["virtual-size"], mine["virtual-size"]);
    assert_eq!(remote["format"], "qcow2");

    for args in [
        vec!["info", url.as_str()],
        vec!["map", "--output", "json", url.as_str()],
        vec!["map", url.as_str()],
        vec!["check", url.as_str()],
    ] {
        let out = vdisk_run(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        secret_free(&out, args[0]);
    }
    let map_remote = vdisk_run(&["map", "--output", "json", &url]);
    let map_local = vdisk_run(&["map", "--output", "json", local]);
    let strip = |o: &Output| -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
        for e in &mut v {
            e.as_object_mut().unwrap().remove("filename");
        }
        v
    };
    assert_eq!(strip(&map_remote), strip(&map_local));

    let out_remote = dir.path().join("remote.raw");
    let out_local = dir.path().join("local.raw");
    let c = vdisk_run(&["convert", "-p", "--http-connections", "4", &url, out_remote.to_str().unwrap()]);
    assert!(c.status.success(), "{}", text(&c));
    secret_free(&c, "convert");
    assert!(vdisk_run(&["convert", local, out_local.to_str().unwrap()]).status.success());
    assert_eq!(sha256_file(&out_remote), sha256_file(&out_local));

    let sum = vdisk_run(&["checksum", &url]);
    assert!(sum.status.success(), "{}", text(&sum));
    secret_free(&sum, "checksum");
    let sum_local = vdisk_run(&["checksum", local]);
    let digest = |o: &Output| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().to_string();
    assert_eq!(digest(&sum), digest(&sum_local));
    assert!(String::from_utf8_lossy(&sum.stdout).contains(&shown));

    let cmp = vdisk_run(&["compare", &url, out_local.to_str().unwrap()]);
    assert_eq!(cmp.status.code(), Some(0), "{}", text(&cmp));
    secret_free(&cmp, "compare");
}

#[test]
fn remote_failures_are_one_line() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = make_image(dir.path());
    let server = Server::start(dir.path(), &[]);
    let fast = ["--http-retries", "1", "--http-timeout", "2"];

    let url = server.url(&format!("_fault/status=403/{name}?X-Amz-Signature=QSECRET"));
    let out = vdisk_run(&[&["info"][..], &fast, &[&url]].concat());
    assert_clean_error(&out, 1, "403");
    let t = text(&out);
    assert!(t.contains("403 Forbidden") && t.contains("may have expired") && !t.contains("QSECRET"), "{t}");

    let url = server.url(&format!("_fault/ignore-range/{name}"));
    let out = vdisk_run(&[&["convert"][..], &fast, &[&url, dir.path().join("x.raw").to_str().unwrap()]].concat());
    assert_clean_error(&out, 1, "ignore-range");
    assert!(text(&out).contains("ignores Range requests"), "{}", text(&out));

    // One 503 then success: retried with the default retries, fatal with none.
    let url = server.url(&format!("_fault/status=503,times=1/{name}"));
    let out = vdisk_run(&["info", "--http-retries", "0", &url]);
    assert_clean_error(&out, 1, "503 without retries");
    assert!(text(&out).contains("503"), "{}", text(&out));
    let url = server.url(&format!("_fault/status=503,times=1,retry-after=1/{name}"));
    let out = vdisk_run(&["info", &url]);
    assert!(out.status.success(), "{}", text(&out));

    let out = vdisk_run(&["info", "--http-header", "no colon", &url]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn http_headers_reach_the_server_and_are_never_printed() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = make_image(dir.path());
    let server = Server::start(dir.path(), &["--require-header", "Authorization: Bearer HSECRET"]);
    let url = server.url(name);
    let out = vdisk_run(&["info", &url]);
    assert_clean_error(&out, 1, "no header");
    assert!(text(&out).contains("401"), "{}", text(&out));
    let out = vdisk_run(&["info", "--http-header", "Authorization: Bearer HSECRET", &url]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("HSECRET"));
    let out = vdisk_run(&["info", "--http-header", "Authorization: Bearer WRONG", &url]);
    assert_clean_error(&out, 1, "wrong header");
    assert!(!text(&out).contains("WRONG"), "{}", text(&out));
}

#[test]
fn ctrl_c_cuts_a_retry_wait_short() {
    // Every data request after the first (the open) is answered 503 with Retry-After: 100, so
    // vdisk sits in a retry wait; Ctrl-C must end it within seconds with exit 130, not after
    // the server's 100 s.
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.raw"), vec![7u8; 8 << 20]).unwrap();
    let server = Server::start(dir.path(), &[]);
    let url = server.url("_fault/status=503,retry-after=100,after=1/disk.raw");
    let out = dir.path().join("out.raw");
    let mut child = vdisk()
        .args(["convert", "-f", "raw", "--http-retries", "5", &url])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "vdisk ended before the interrupt");
    // SAFETY: kill(2) on the child this test started and has not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let sent = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("vdisk still waits to retry 20 s after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(sent.elapsed() < Duration::from_secs(10), "took {:?}", sent.elapsed());
}
