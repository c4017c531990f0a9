//! Every VMDK row of the real-image corpus (`../shared/corpus/expected.tsv`): `ok` rows convert
//! to the listed sha256 and size, `error` rows are refused cleanly, `either` rows do one or the
//! other without panicking. `vdisk info` is compared with qemu-img's recorded JSON where qemu
//! could read the file.
//!
//! The corpus is `../shared/corpus` beside the repository (or `$VDISK_CORPUS_SOURCE`); the images
//! are unpacked from it, or read from `$VDISK_CORPUS` when that names an unpacked copy. Without
//! it the test prints one SKIP line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk_core::{Image, OpenOptions, ReferencePolicy};

/// The corpus source folder (`corpus.tar.xz`, `expected.tsv`, `qemu-info.tar.xz`):
/// `$VDISK_CORPUS_SOURCE`, else `../shared/corpus` beside the repository.
fn corpus_source() -> Option<PathBuf> {
    let dir = match std::env::var_os("VDISK_CORPUS_SOURCE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"),
    };
    (dir.join("corpus.tar.xz").is_file() && dir.join("expected.tsv").is_file()).then_some(dir)
}

struct Row {
    name: String,
    flags: String,
    expect: String,
    sha256: String,
    size: String,
}

fn rows(dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let name = f.first()?.to_string();
            name.ends_with(".vmdk").then(|| Row {
                name,
                flags: f.get(1).unwrap_or(&"").to_string(),
                expect: f.get(2).unwrap_or(&"").to_string(),
                sha256: f.get(3).unwrap_or(&"").to_string(),
                size: f.get(4).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unpack(dir: &Path, into: &Path) {
    let st = Command::new("tar")
        .arg("-xSJf")
        .arg(dir.join("corpus.tar.xz"))
        .arg("-C")
        .arg(into)
        .args(["--wildcards", "./*.vmdk"])
        .status()
        .unwrap();
    assert!(st.success(), "tar failed");
}

fn open_opts(flags: &str) -> OpenOptions {
    let policy = if flags.contains("same-dir") { ReferencePolicy::SameDir } else { ReferencePolicy::Deny };
    common::opts(policy)
}

/// Compare two JSON values, ignoring keys that depend on the file system (`actual-size`) or on
/// the working directory qemu-img ran in (`filename`), and qemu's `children` node list.
fn strip(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "actual-size" | "filename" | "children"))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

#[test]
fn corpus_vmdk_rows() {
    let Some(dir) = corpus_source() else {
        eprintln!("SKIP: corpus not found (../shared/corpus or $VDISK_CORPUS_SOURCE)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = match std::env::var_os("VDISK_CORPUS") {
        Some(d) => PathBuf::from(d),
        None => {
            unpack(&dir, tmp.path());
            tmp.path().to_path_buf()
        }
    };
    let qinfo = tempfile::tempdir().unwrap();
    let have_qinfo = dir.join("qemu-info.tar.xz").is_file()
        && Command::new("tar")
            .arg("-xJf")
            .arg(dir.join("qemu-info.tar.xz"))
            .arg("-C")
            .arg(qinfo.path())
            .status()
            .is_ok_and(|s| s.success());
    let out = tempfile::tempdir().unwrap();
    let rows = rows(&dir);
    assert!(rows.len() >= 20, "expected the VMDK rows of expected.tsv, found {}", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let path = images.join(&row.name);
        let opts = open_opts(&row.flags);
        let opened = Image::open(&path, &opts);
        let result: Result<(String, u64), String> = opened.map_err(|e| e.to_string()).and_then(|img| {
            if img.format().as_str() != "vmdk" {
                // FLAT extents opened alone are raw files.
                assert!(row.name.contains("flat"), "{}: detected as {}", row.name, img.format());
            }
            let o = vdisk_core::ConvertOptions { threads: Some(2), ..Default::default() };
            let target = out.path().join("out.raw");
            let _ = std::fs::remove_file(&target);
            vdisk_core::convert(&img, &target, &o).map_err(|e| e.to_string())?;
            let r = common::sha256_file(&target);
            let _ = std::fs::remove_file(&target);
            Ok(r)
        });
        match (row.expect.as_str(), &result) {
            ("ok", Ok((sha, size))) if *sha != row.sha256 || size.to_string() != row.size => {
                failures.push(format!("{}: got {sha} ({size} bytes), want {} ({})", row.name, row.sha256, row.size));
            }
            ("ok", Err(e)) => failures.push(format!("{}: refused: {e}", row.name)),
            ("error", Ok(_)) => failures.push(format!("{}: converted but must be refused", row.name)),
            ("error", Err(e)) | ("either", Err(e)) => {
                assert!(!e.contains('\n') && !e.is_empty(), "{}: error message {e:?}", row.name);
                eprintln!("{}: refused: {e}", row.name);
            }
            _ => {}
        }
        // info: compare with qemu-img's JSON where qemu read the file as vmdk.
        let qjson = qinfo.path().join(format!("{}.json", row.name.replace('/', "__")));
        if row.expect == "ok" && have_qinfo && qjson.is_file() {
            let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&qjson).unwrap()).unwrap();
            if theirs["format"] == "vmdk" {
                match Image::open(&path, &opts) {
                    Ok(img) => {
                        let ours: serde_json::Value = serde_json::from_str(&img.info().to_json()).unwrap();
                        if strip(&ours) != strip(&theirs) {
                            failures.push(format!(
                                "{}: info differs:\n ours   {}\n theirs {}",
                                row.name,
                                strip(&ours),
                                strip(&theirs)
                            ));
                        }
                    }
                    Err(e) => failures.push(format!("{}: info: {e}", row.name)),
                }
                let described = Image::describe(&path, &opts).map(|i| i.virtual_size);
                if described.as_ref().ok() != theirs["virtual-size"].as_u64().as_ref() {
                    failures.push(format!("{}: describe gives {described:?}", row.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "corpus failures:\n{}", failures.join("\n"));
}
