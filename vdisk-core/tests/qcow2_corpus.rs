//! The qcow2 (and qcow v1) rows of the real-image corpus: converted through the library, the
//! content must match the recorded sha256; `error` rows must fail cleanly; qcow v1 is refused by
//! name. Prints one SKIP line when the corpus is absent.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vdisk_core::{convert, ConvertOptions, ErrorKind, Format, Image, OpenOptions, ReferencePolicy};

/// The corpus archive and its expected.tsv, from `$VDISK_CORPUS` (the archive or its folder) or
/// `../shared/corpus/` beside the repository.
fn corpus_paths() -> Option<(PathBuf, PathBuf)> {
    let given = std::env::var_os("VDISK_CORPUS").map(PathBuf::from);
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus");
    let base = given.unwrap_or(default);
    let archive = if base.is_dir() { base.join("corpus.tar.xz") } else { base };
    let tsv = archive.with_file_name("expected.tsv");
    if archive.is_file() && tsv.is_file() {
        Some((archive, tsv))
    } else {
        eprintln!("SKIP: corpus not found (set VDISK_CORPUS to corpus.tar.xz); qcow2 corpus tests not run");
        None
    }
}

/// Unpack the corpus (sparse) into a tempdir.
fn unpack(archive: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("tar").arg("-xSJf").arg(archive).arg("-C").arg(dir.path()).status().unwrap().success();
    assert!(ok, "cannot unpack {}", archive.display());
    dir
}

struct Row {
    name: String,
    flags: String,
    expect: String,
    sha256: String,
    size: String,
}

fn rows(tsv: &Path) -> Vec<Row> {
    std::fs::read_to_string(tsv)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() >= 5).then(|| Row {
                name: f[0].into(),
                flags: f[1].into(),
                expect: f[2].into(),
                sha256: f[3].into(),
                size: f[4].into(),
            })
        })
        .collect()
}

fn open_options(flags: &str) -> OpenOptions {
    let mut o = OpenOptions::default();
    if flags.contains("--references same-dir") {
        o.references = ReferencePolicy::SameDir;
    } else if flags.contains("--references any") {
        o.references = ReferencePolicy::Any;
    }
    o
}

/// Open and convert; the sha256 and size of the output, or the error.
fn convert_row(path: &Path, flags: &str, out: &Path) -> Result<(String, u64, u64), vdisk_core::Error> {
    let img = Image::open(path, &open_options(flags))?;
    let vsize = img.virtual_size();
    let _ = std::fs::remove_file(out);
    convert(&img, out, &ConvertOptions { threads: Some(2), ..ConvertOptions::default() })?;
    let (sha, len) = common::sha256_file(out);
    Ok((sha, len, vsize))
}

#[test]
fn corpus_qcow2_rows() {
    let Some((archive, tsv)) = corpus_paths() else { return };
    let dir = unpack(&archive);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.raw");
    let mut seen = 0;
    for row in rows(&tsv) {
        if !(row.name.ends_with(".qcow2") || row.name.ends_with(".qcow")) {
            continue;
        }
        seen += 1;
        let path = dir.path().join(&row.name);
        let result = convert_row(&path, &row.flags, &out);
        let name = &row.name;
        if row.name.ends_with(".qcow") {
            let e = result.err().unwrap_or_else(|| panic!("{name}: qcow v1 must be refused"));
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{name}: {e}");
            assert!(e.to_string().contains("qcow (version 1)"), "{name}: {e}");
            // Forced as qcow2, the reader itself refuses it by name.
            let forced = OpenOptions { format: Some(Format::Qcow2), ..OpenOptions::default() };
            let e = Image::open(&path, &forced).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{name}: {e}");
            assert!(e.to_string().contains("qcow version 1"), "{name}: {e}");
            continue;
        }
        match (row.expect.as_str(), result) {
            ("ok" | "either", Ok((sha, len, vsize))) => {
                assert_eq!(sha, row.sha256, "{name}: content");
                assert_eq!(len.to_string(), row.size, "{name}: output size");
                assert_eq!(vsize.to_string(), row.size, "{name}: virtual size");
            }
            ("error" | "either", Err(e)) => {
                assert!(!e.to_string().is_empty() && !e.to_string().contains('\n'), "{name}: {e}");
            }
            (expect, Ok(_)) => panic!("{name}: expected {expect}, converted"),
            (expect, Err(e)) => panic!("{name}: expected {expect}: {e}"),
        }
    }
    assert!(seen >= 10, "only {seen} qcow rows in {}", tsv.display());
}

/// The image with 65536 snapshots opens, converts and describes like qemu-img.
#[test]
fn corpus_65536_snapshots() {
    let Some((archive, _)) = corpus_paths() else { return };
    let dir = unpack(&archive);
    let name = "cdi-malicious-qcow2-large-json.qcow2";
    let path = dir.path().join(name);
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    let info = img.info();
    assert_eq!(info.snapshots.len(), 65536);
    assert_eq!(info.snapshots[0].vm_clock_nsec, 512);
    assert_eq!(info.snapshots[0].date_nsec, 16);
    if !common::have_qemu() {
        return;
    }
    let out = Command::new("qemu-img")
        .current_dir(dir.path())
        .args(["info", "-f", "qcow2", "--output", "json", name])
        .output()
        .unwrap();
    let mut theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ours: Value =
        serde_json::from_str(&Image::describe(&path, &OpenOptions::default()).unwrap().to_json()).unwrap();
    ours["filename"] = Value::String(name.into());
    for v in [&mut theirs, &mut ours] {
        let m = v.as_object_mut().unwrap();
        m.remove("children");
        m.remove("actual-size");
    }
    assert!(ours == theirs, "describe differs from qemu-img info");
}
