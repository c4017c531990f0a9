//! Every VHDX row of the shared real-image corpus (`expected.tsv`): the content each `ok` image
//! must convert to (including the dirty-log image qemu-img refuses), a clean error for each
//! `error` image (the differencing disk without its parent), `info` against qemu-img's JSON,
//! and maps that are sparse where the BAT is.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vdisk_core::{Image, ReferencePolicy};

/// Where the corpus archive and its expectations are, if anywhere.
fn corpus_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VDISK_CORPUS") {
        let p = PathBuf::from(dir);
        let p = if p.is_file() { p.parent()?.to_path_buf() } else { p };
        return p.join("expected.tsv").is_file().then_some(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    // The main checkout sits beside `shared/`; worktrees sit one level deeper.
    [root.join("../shared/corpus"), root.join("../../shared/corpus")]
        .into_iter()
        .find(|p| p.join("corpus.tar.xz").is_file() && p.join("expected.tsv").is_file())
}

struct Row {
    name: String,
    flags: String,
    expect: String,
    sha256: String,
    virtual_size: String,
}

fn vhdx_rows(dir: &Path) -> Vec<Row> {
    let tsv = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    tsv.lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            let name = c.first()?.to_string();
            (name.ends_with(".vhdx") || name.ends_with(".avhdx")).then(|| Row {
                name,
                flags: c.get(1).unwrap_or(&"").to_string(),
                expect: c.get(2).unwrap_or(&"").to_string(),
                sha256: c.get(3).unwrap_or(&"").to_string(),
                virtual_size: c.get(4).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The unpacked VHDX files (and qemu-img's info JSON) under Cargo's per-target temporary
/// directory, or the corpus folder itself when it is already unpacked.
///
/// nextest runs each test in its own process, several at once: each process unpacks into a
/// folder of its own and renames it into place when complete, so no test ever sees a folder
/// another one is still filling or deleting. The name carries the archive's size and mtime, so a
/// new corpus is unpacked afresh.
fn files(dir: &Path) -> &'static Path {
    static FILES: OnceLock<PathBuf> = OnceLock::new();
    FILES.get_or_init(|| {
        let archive = dir.join("corpus.tar.xz");
        let Ok(meta) = std::fs::metadata(&archive) else {
            return dir.to_path_buf();
        };
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let key = format!("{}-{}", meta.len(), mtime.map_or(0, |d| d.as_secs()));
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let done = tmp.join(format!("vhdx-corpus-{key}"));
        if done.is_dir() {
            return done;
        }
        let into = tmp.join(format!("vhdx-corpus-{key}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&into);
        std::fs::create_dir_all(&into).unwrap();
        let names: Vec<String> = vhdx_rows(dir).iter().map(|r| format!("./{}", r.name)).collect();
        let mut cmd = Command::new("tar");
        cmd.arg("-xSJf").arg(&archive).arg("-C").arg(&into).args(&names);
        common::run(&mut cmd);
        let info = dir.join("qemu-info.tar.xz");
        if info.is_file() {
            let qdir = into.join("qemu-info");
            std::fs::create_dir_all(&qdir).unwrap();
            common::run(Command::new("tar").arg("-xJf").arg(&info).arg("-C").arg(&qdir));
        }
        // Another process may have finished first: then its copy is used and this one removed.
        if std::fs::rename(&into, &done).is_err() {
            let _ = std::fs::remove_dir_all(&into);
            assert!(done.is_dir(), "could not move the unpacked corpus to {}", done.display());
        }
        done
    })
}

/// sha256 and length of a (sparse) file, reading only its data regions: holes are hashed from a
/// zero buffer, which keeps a 10 GiB mostly-hole output quick to check.
fn sha256_sparse(path: &Path) -> (String, u64) {
    use sha2::{Digest, Sha256};
    let raw = Image::open(path, &common::opts(ReferencePolicy::Deny)).unwrap();
    assert_eq!(raw.format(), vdisk_core::Format::Raw);
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    for e in raw.extents() {
        let e = e.unwrap();
        let mut pos = e.start;
        while pos < e.end() {
            let n = usize::try_from((e.end() - pos).min(buf.len() as u64)).unwrap();
            if e.kind.is_data() {
                assert_eq!(raw.read_at(&mut buf[..n], pos).unwrap(), n);
                h.update(&buf[..n]);
            } else {
                h.update(&zeros[..n]);
            }
            pos += n as u64;
        }
    }
    (common::hex(&h.finalize()), raw.virtual_size())
}

fn policy(flags: &str) -> ReferencePolicy {
    if flags.contains("same-dir") {
        ReferencePolicy::SameDir
    } else if flags.contains("--references any") {
        ReferencePolicy::Any
    } else {
        ReferencePolicy::Deny
    }
}

/// qemu-img's `info` JSON for `name`, where the corpus has it.
fn qemu_info(files: &Path, name: &str) -> Option<serde_json::Value> {
    let flat = name.replace('/', "__");
    let found = files.join("qemu-info").join(format!("{flat}.json"));
    serde_json::from_str(&std::fs::read_to_string(found).ok()?).ok()
}

#[test]
fn corpus_vhdx_rows() {
    let Some(dir) = corpus_dir() else {
        eprintln!("SKIP: corpus not found (set VDISK_CORPUS or provide ../shared/corpus/corpus.tar.xz)");
        return;
    };
    let rows = vhdx_rows(&dir);
    assert!(rows.len() >= 7, "expected.tsv lists {} VHDX rows", rows.len());
    let files = files(&dir);
    let out = tempfile::tempdir().unwrap();
    for row in &rows {
        let path = files.join(&row.name);
        let open = common::opts(policy(&row.flags));
        eprintln!("corpus: {} ({})", row.name, row.expect);
        match row.expect.as_str() {
            "ok" => {
                let img = Image::open(&path, &open).unwrap_or_else(|e| panic!("{}: {e}", row.name));
                assert_eq!(img.format().as_str(), "vhdx", "{}", row.name);
                assert_eq!(img.virtual_size().to_string(), row.virtual_size, "{}: virtual size", row.name);
                // Sparse where the BAT is: stored data never exceeds the file holding it.
                let data: u64 = common::vdisk_data_ranges(&img).iter().map(|(s, e)| e - s).sum();
                let file_len = std::fs::metadata(&path).unwrap().len();
                assert!(data <= file_len, "{}: {data} bytes of data extents in a {file_len}-byte file", row.name);
                let raw = common::vdisk_convert(&path, &open, out.path(), "out.raw", 2);
                let (sha, len) = sha256_sparse(&raw);
                std::fs::remove_file(&raw).unwrap();
                assert_eq!(len.to_string(), row.virtual_size, "{}: output size", row.name);
                assert_eq!(sha, row.sha256, "{}: content", row.name);
                // check: real files are consistent, except for the log that had to be replayed.
                let report = img.check().unwrap();
                let dirty = usize::from(img.info().dirty_flag);
                assert_eq!(report.problems.len(), dirty, "{}: {:?}", row.name, report.problems);
                let info = Image::describe(&path, &open).unwrap();
                assert_eq!(info.format, "vhdx");
                if let Some(q) = qemu_info(files, &row.name) {
                    assert_eq!(Some(info.virtual_size), q["virtual-size"].as_u64(), "{}: info virtual-size", row.name);
                    assert_eq!(info.cluster_size, q["cluster-size"].as_u64(), "{}: info cluster-size", row.name);
                    assert_eq!(Some(info.dirty_flag), q["dirty-flag"].as_bool(), "{}: info dirty-flag", row.name);
                }
            }
            "error" => {
                let got = Image::open(&path, &open).and_then(|img| {
                    vdisk_core::convert(&img, out.path().join("err.raw"), &Default::default()).map(|_| ())
                });
                let e = got.expect_err(&row.name);
                assert!(!e.to_string().is_empty() && !e.to_string().contains('\n'), "{}: {e}", row.name);
                eprintln!("  refused: {e}");
            }
            other => panic!("{}: unexpected expectation '{other}'", row.name),
        }
    }
}

/// The differencing disk whose parent is absent: refused under every policy with an error that
/// names the parent, yet `info` describes it (as qemu-img cannot).
#[test]
fn corpus_differencing_without_parent() {
    let Some(dir) = corpus_dir() else {
        eprintln!("SKIP: corpus not found");
        return;
    };
    let name = "dissect-hyperv-ws2019-differencing-noparent.avhdx";
    if !vhdx_rows(&dir).iter().any(|r| r.name == name) {
        eprintln!("SKIP: {name} not in the corpus");
        return;
    }
    let path = files(&dir).join(name);
    let e = Image::open(&path, &common::opts(ReferencePolicy::Deny)).unwrap_err();
    assert_eq!(e.kind(), vdisk_core::ErrorKind::ReferenceDenied, "{e}");
    for p in [ReferencePolicy::SameDir, ReferencePolicy::Any] {
        let e = Image::open(&path, &common::opts(p)).unwrap_err();
        assert_eq!(e.kind(), vdisk_core::ErrorKind::Io, "{p}: {e}");
        assert!(e.to_string().contains("Generation 1_49C4BAF3"), "{p}: {e}");
    }
    let info = Image::describe(&path, &common::opts(ReferencePolicy::Deny)).unwrap();
    assert_eq!(info.virtual_size, 8 << 30);
    assert_eq!(info.cluster_size, Some(2 << 20));
    assert_eq!(info.backing_filename.as_deref(), Some("./Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"));
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["data"]["subformat"], "differencing");
    assert_eq!(fs["data"]["parent-linkage"], "{ff34003b-11ed-4cf8-a166-b2be05e20b80}");
}

/// The dirty-log image: info says the log was replayed and check reports it.
#[test]
fn corpus_dirty_log_is_reported() {
    let Some(dir) = corpus_dir() else {
        eprintln!("SKIP: corpus not found");
        return;
    };
    let name = "qemu-sample-dirtylog-10G-4M.vhdx";
    if !vhdx_rows(&dir).iter().any(|r| r.name == name) {
        eprintln!("SKIP: {name} not in the corpus");
        return;
    }
    let path = files(&dir).join(name);
    let before = common::sha256_file(&path);
    let img = Image::open(&path, &Default::default()).unwrap();
    let info = img.info();
    assert!(info.dirty_flag);
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["data"]["log"], "replayed");
    assert!(fs["data"]["log-replay"]["entries"].as_u64().unwrap() >= 1);
    let report = img.check().unwrap();
    assert!(report.problems.iter().any(|p| p.message.contains("never applied")), "{report:?}");
    drop(img);
    assert_eq!(common::sha256_file(&path), before, "opening must not modify the file");
}
