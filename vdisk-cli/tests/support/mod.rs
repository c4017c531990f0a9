//! Helpers for the CLI tests: running `vdisk` with a time bound, hashing outputs, locating the
//! real-image corpus.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The `vdisk` binary under test.
pub fn vdisk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vdisk"))
}

/// Run `cmd`, killing it after `limit`; panics on a timeout (a hang is a bug).
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let start = Instant::now();
    // Drain pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// Assert a failed run printed exactly one stderr line starting `vdisk: ` and exited with `code`.
pub fn assert_clean_error(out: &Output, code: i32, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{what}: exit status {:?}, stderr: {stderr}", out.status);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("vdisk: "), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
}

/// sha256 (hex) and length of a file. Holes (found with `SEEK_DATA`/`SEEK_HOLE`) are hashed from
/// a buffer of zeros instead of being read, which keeps 100+ GiB sparse outputs quick.
pub fn sha256_file(path: &Path) -> (String, u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut h = Sha256::new();
    let zeros = vec![0u8; 4 << 20];
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    let fd = f.as_raw_fd();
    let seek = |whence: libc::c_int, at: u64| -> u64 {
        // SAFETY: lseek on a descriptor owned by `f`, which lives until the end of this function.
        let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
        if r < 0 {
            len
        } else {
            r as u64
        }
    };
    while pos < len {
        let data = seek(libc::SEEK_DATA, pos).min(len);
        let mut hole_left = data - pos;
        while hole_left > 0 {
            let n = hole_left.min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            hole_left -= n as u64;
        }
        pos = data;
        if pos >= len {
            break;
        }
        let hole = seek(libc::SEEK_HOLE, pos).min(len).max(pos + 1);
        let mut left = hole - pos;
        let mut at = pos;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], at).unwrap();
            at += n as u64;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        pos = hole;
    }
    (h.finalize().iter().map(|b| format!("{b:02x}")).collect(), len)
}

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The corpus folder (`../shared/corpus` beside the repository), if present.
pub fn corpus_source() -> Option<PathBuf> {
    let dir = repo_root().join("../shared/corpus");
    dir.join("corpus.tar.xz").is_file().then_some(dir)
}

/// The corpus images, unpacked once per test binary (sparse) into a temporary folder, or from
/// `$VDISK_CORPUS` when set. `None` (after one SKIP line) when the corpus is absent.
pub fn corpus_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<(PathBuf, Option<tempfile::TempDir>)>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("VDISK_CORPUS") {
            return Some((PathBuf::from(dir), None));
        }
        let Some(src) = corpus_source() else {
            eprintln!("SKIP: ../shared/corpus/corpus.tar.xz not found; real-image tests not run");
            return None;
        };
        let tmp = tempfile::tempdir().unwrap();
        let status =
            Command::new("tar").arg("-xSJf").arg(src.join("corpus.tar.xz")).arg("-C").arg(tmp.path()).status().unwrap();
        assert!(status.success(), "cannot unpack the corpus");
        Some((tmp.path().to_path_buf(), Some(tmp)))
    })
    .as_ref()
    .map(|(p, _)| p.as_path())
}

/// One row of a tab-separated expectations file, as (column name, value) pairs.
pub fn read_tsv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#'));
    let header: Vec<String> = lines.next().unwrap().split('\t').map(str::to_string).collect();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split('\t').collect();
            header.iter().enumerate().map(|(i, h)| (h.clone(), cells.get(i).unwrap_or(&"").to_string())).collect()
        })
        .collect()
}

/// The cases of the generator `testdata/<script>` (run once per script version, shared by the
/// test processes through the target's temporary folder) and its `cases.tsv` rows. `None` (after
/// a SKIP line) when python3 or qemu-img is missing outside CI. Tests must not modify the files.
pub fn generate_cases(script: &str) -> Option<(PathBuf, Vec<std::collections::HashMap<String, String>>)> {
    let ok = |c: &str| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok("python3") || !ok("qemu-img") {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "python3 and qemu-img are required on CI");
        eprintln!("SKIP: python3 or qemu-img missing; {script} cases not run");
        return None;
    }
    let path = repo_root().join("testdata").join(script);
    let key = sha256_file(&path).0;
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("cases-{}-{}", script.replace('/', "-"), &key[..16]));
    if !dir.join("cases.tsv").is_file() {
        std::fs::create_dir_all(&root).unwrap();
        let tmp = tempfile::tempdir_in(&root).unwrap();
        let out = Command::new("python3").arg(&path).arg(tmp.path()).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        // Another test process may have finished first: either copy serves.
        if std::fs::rename(tmp.path(), &dir).is_ok() {
            std::mem::forget(tmp);
        }
    }
    Some((dir.clone(), read_tsv(&dir.join("cases.tsv"))))
}
