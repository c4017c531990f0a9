//! Every VHD row of the real-image corpus (`../shared/corpus/expected.tsv`): images made by
//! Hyper-V, Windows, Virtual PC, Disk2VHD, FreeBSD mkimg, qemu-img and fuzzers.
//!
//! The corpus is found through `$VDISK_CORPUS` (the corpus folder holding `corpus.tar.xz` and
//! `expected.tsv`, the tarball itself, or a folder of already unpacked images) or at
//! `../shared/corpus/` beside the repository; without it the test prints one SKIP line.
//! Rows whose virtual size is over [`HASH_LIMIT`] are compared with `qemu-img compare` (fast: it
//! skips zero ranges) unless `VDISK_CORPUS_FULL=1` asks for the full sha256.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk_core::{convert, ConvertOptions, Format, Image, OpenOptions, ReferencePolicy};

/// Largest virtual size hashed by default: the two 127 GiB Hyper-V/Virtual PC samples would
/// take minutes to hash.
const HASH_LIMIT: u64 = 4 << 30;

struct Corpus {
    files: PathBuf,
    expected: PathBuf,
    qinfo: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

fn untar(tarball: &Path, dir: &Path, patterns: &[&str]) -> bool {
    let mut c = Command::new("tar");
    c.arg("-xSJf").arg(tarball).arg("-C").arg(dir).arg("--wildcards");
    c.args(patterns);
    c.status().map(|s| s.success()).unwrap_or(false)
}

fn corpus() -> Option<Corpus> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
    let given = std::env::var_os("VDISK_CORPUS").map(PathBuf::from);
    let default = repo.join("../shared/corpus");
    let root = given.clone().unwrap_or(default.clone());
    let (tarball, folder) = if root.is_file() {
        (Some(root.clone()), root.parent()?.to_path_buf())
    } else if root.join("corpus.tar.xz").is_file() {
        (Some(root.join("corpus.tar.xz")), root.clone())
    } else if root.is_dir() {
        (None, root.clone())
    } else {
        return None;
    };
    let expected = [folder.join("expected.tsv"), default.join("expected.tsv")].into_iter().find(|p| p.is_file())?;
    let tmp = tempfile::tempdir().ok()?;
    let files = match &tarball {
        Some(t) => {
            let dir = tmp.path().join("files");
            std::fs::create_dir(&dir).ok()?;
            if !untar(t, &dir, &["*.vhd"]) {
                return None;
            }
            dir
        }
        None => folder.clone(),
    };
    let qinfo_tar =
        [folder.join("qemu-info.tar.xz"), default.join("qemu-info.tar.xz")].into_iter().find(|p| p.is_file());
    let qinfo = qinfo_tar.and_then(|t| {
        let dir = tmp.path().join("qinfo");
        std::fs::create_dir(&dir).ok()?;
        untar(&t, &dir, &["*"]).then_some(dir)
    });
    Some(Corpus { files, expected, qinfo, _tmp: Some(tmp) })
}

struct Row {
    name: String,
    flags: String,
    expect: String,
    sha256: String,
    virtual_size: Option<u64>,
}

fn vhd_rows(expected: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(expected).unwrap();
    let mut rows: Vec<Row> = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 5 || !cols[0].ends_with(".vhd") || rows.iter().any(|r| r.name == cols[0]) {
            continue;
        }
        rows.push(Row {
            name: cols[0].to_string(),
            flags: cols[1].to_string(),
            expect: cols[2].to_string(),
            sha256: cols[3].to_string(),
            virtual_size: cols[4].parse().ok(),
        });
    }
    rows
}

fn find_json(dir: &Path, name: &str) -> Option<serde_json::Value> {
    let file = format!("{}.json", name.replace('/', "__"));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|f| f.to_str()) == Some(file.as_str()) {
                return serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok();
            }
        }
    }
    None
}

fn qemu_compare(image: &Path, raw: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "vpc", "-F", "raw"])
        .arg(image)
        .arg(raw)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn every_vhd_corpus_row() {
    let Some(corpus) = corpus() else {
        eprintln!("SKIP: VHD corpus not found (set VDISK_CORPUS or provide ../shared/corpus)");
        return;
    };
    let rows = vhd_rows(&corpus.expected);
    assert!(rows.len() >= 10, "expected.tsv lists only {} VHD rows", rows.len());
    let full = std::env::var("VDISK_CORPUS_FULL").as_deref() == Ok("1");
    let out = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut infos_compared = 0;
    for row in &rows {
        let path = corpus.files.join(&row.name);
        let policy = if row.flags.contains("same-dir") { ReferencePolicy::SameDir } else { ReferencePolicy::Deny };
        let open = OpenOptions { references: policy, ..OpenOptions::default() };
        let opened = Image::open(&path, &open);
        match row.expect.as_str() {
            "error" => match opened {
                Ok(img) => {
                    let r = convert(&img, out.path().join("x.raw"), &ConvertOptions::default());
                    if r.is_ok() {
                        failures.push(format!("{}: expected an error, but it converted", row.name));
                    }
                }
                Err(e) => eprintln!("{}: refused as expected: {e}", row.name),
            },
            "ok" => {
                let img = match opened {
                    Ok(i) => i,
                    Err(e) => {
                        failures.push(format!("{}: cannot open: {e}", row.name));
                        continue;
                    }
                };
                assert_eq!(img.format(), Format::Vhd, "{}: detected by content", row.name);
                if Some(img.virtual_size()) != row.virtual_size {
                    failures.push(format!(
                        "{}: virtual size {} != {:?}",
                        row.name,
                        img.virtual_size(),
                        row.virtual_size
                    ));
                    continue;
                }
                let info = img.info();
                if let Some(q) = corpus.qinfo.as_ref().and_then(|d| find_json(d, &row.name)) {
                    assert_eq!(q["virtual-size"].as_u64(), Some(info.virtual_size), "{}: info virtual-size", row.name);
                    assert_eq!(q["cluster-size"].as_u64(), info.cluster_size, "{}: info cluster-size", row.name);
                    assert_eq!(q["format"].as_str(), Some(info.format.as_str()), "{}: info format", row.name);
                    assert_eq!(q["dirty-flag"].as_bool(), Some(info.dirty_flag), "{}: info dirty-flag", row.name);
                    infos_compared += 1;
                }
                let fs = info.format_specific.as_ref().expect("format-specific");
                assert_eq!(fs["type"], "vpc");
                let report = img.check().unwrap();
                assert_eq!(report.corruptions, 0, "{}: check found {:?}", row.name, report.problems);
                let raw = common::vdisk_convert(&path, &open, out.path(), "out.raw", 2);
                let size = std::fs::metadata(&raw).unwrap().len();
                assert_eq!(Some(size), row.virtual_size, "{}: raw output size", row.name);
                if size <= HASH_LIMIT || full {
                    let (sha, _) = common::sha256_file(&raw);
                    if sha != row.sha256 {
                        failures.push(format!("{}: sha256 {sha} != {}", row.name, row.sha256));
                    }
                } else if common::have_qemu() {
                    if !qemu_compare(&path, &raw) {
                        failures.push(format!("{}: qemu-img compare differs", row.name));
                    }
                } else {
                    eprintln!("SKIP: {}: too large to hash and no qemu-img to compare with", row.name);
                }
                let _ = std::fs::remove_file(&raw);
            }
            other => failures.push(format!("{}: unknown expectation '{other}'", row.name)),
        }
    }
    assert!(failures.is_empty(), "corpus failures:\n{}", failures.join("\n"));
    assert!(corpus.qinfo.is_none() || infos_compared > 0, "no qemu-img info JSON matched a VHD row");
}
