//! Every row of the real-image corpus (`../shared/corpus/expected.tsv`) through the CLI:
//! `ok` rows convert to the listed sha256 and size and `info` reports the listed virtual size and
//! qemu-img's format; `error` rows are refused with exit 1 and one `vdisk: ` line; `either` rows
//! do one or the other, except VDIs, which vdisk reads: they must convert like `ok` rows; `ova`
//! rows must convert the disk inside to the listed content, and `info` must report format `ova`
//! and that disk's virtual size (qemu-img reads an OVA only as raw).

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use support::*;

/// Per-command time bound: the largest corpus image is 127 GiB of mostly holes.
const LIMIT: Duration = Duration::from_secs(300);

fn flags(row: &HashMap<String, String>) -> Vec<String> {
    row["flags"].split_whitespace().map(str::to_string).collect()
}

/// qemu-img's `format` for the file, from qemu-info.tar.xz (unpacked beside the corpus).
fn qemu_format(name: &str) -> Option<String> {
    let src = corpus_source()?;
    let key = format!("{}.json", name.replace('/', "__"));
    let out =
        std::process::Command::new("tar").arg("-xJOf").arg(src.join("qemu-info.tar.xz")).arg(&key).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["format"].as_str().map(str::to_string)
}

fn check_row(dir: &Path, out_dir: &Path, row: &HashMap<String, String>) -> Result<(), String> {
    let name = &row["name"];
    let image = dir.join(name);
    let target = out_dir.join(format!("{}.raw", name.replace('/', "__")));
    let _ = std::fs::remove_file(&target);
    let mut cmd = vdisk();
    cmd.arg("convert").args(flags(row)).arg(&image).arg(&target);
    let out = run_limited(&mut cmd, LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // VDIs were `either` until vdisk read them; OVAs convert the disk they hold.
    let expect = match row["expect"].as_str() {
        "either" if name.ends_with(".vdi") && row["sha256"] != "-" => "ok",
        other => other,
    };
    let converted = out.status.success();
    let one_error_line = out.status.code() == Some(1)
        && stderr.lines().count() == 1
        && stderr.starts_with("vdisk: ")
        && !stderr.contains("panicked");
    if !converted && !one_error_line {
        return Err(format!("{name}: neither success nor a clean error: {:?} {stderr}", out.status));
    }
    let content_ok = |target: &Path| -> Result<(), String> {
        let (sha, len) = sha256_file(target);
        let want_len: u64 = row["virtual_size"].parse().unwrap_or(len);
        if sha != row["sha256"] || len != want_len {
            return Err(format!("{name}: content {sha} ({len} bytes), expected {} ({want_len} bytes)", row["sha256"]));
        }
        Ok(())
    };
    let result = match expect {
        "ok" => {
            if !converted {
                return Err(format!("{name}: expected success, got: {stderr}"));
            }
            content_ok(&target)?;
            let mut info = vdisk();
            info.arg("info").arg("--output").arg("json").args(flags(row)).arg(&image);
            let out = run_limited(&mut info, LIMIT);
            if !out.status.success() {
                return Err(format!("{name}: info failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{name}: {e}"))?;
            let size: u64 = row["virtual_size"].parse().unwrap();
            if v["virtual-size"].as_u64() != Some(size) {
                return Err(format!("{name}: info virtual-size {}, expected {size}", v["virtual-size"]));
            }
            if let Some(f) = qemu_format(name) {
                if v["format"].as_str() != Some(f.as_str()) {
                    return Err(format!("{name}: info format {}, qemu-img says {f}", v["format"]));
                }
            }
            Ok(())
        }
        "error" => {
            if converted {
                Err(format!("{name}: expected a refusal, but it converted"))
            } else {
                Ok(())
            }
        }
        "either" => {
            if converted && row["sha256"] != "-" {
                content_ok(&target)
            } else {
                Ok(())
            }
        }
        "ova" => {
            if !converted {
                return Err(format!("{name}: expected the OVA's disk to convert, got: {stderr}"));
            }
            content_ok(&target)?;
            let mut info = vdisk();
            info.arg("info").arg("--output").arg("json").args(flags(row)).arg(&image);
            let out = run_limited(&mut info, LIMIT);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{name}: {e}"))?;
            let size: u64 = row["virtual_size"].parse().unwrap();
            if v["format"] != "ova" || v["virtual-size"].as_u64() != Some(size) {
                return Err(format!(
                    "{name}: info says {} of {}, expected ova of {size}",
                    v["format"], v["virtual-size"]
                ));
            }
            Ok(())
        }
        other => Err(format!("{name}: unknown expectation {other}")),
    };
    let _ = std::fs::remove_file(&target);
    result
}

#[test]
fn every_corpus_row_is_handled_as_expected() {
    let Some(dir) = corpus_dir() else { return };
    let rows = read_tsv(&corpus_source().unwrap().join("expected.tsv"));
    assert!(rows.len() >= 50, "expected.tsv has {} rows", rows.len());
    let out_dir = tempfile::tempdir().unwrap();
    let only = std::env::var("VDISK_CORPUS_ONLY").ok();
    let rows: Vec<_> =
        rows.into_iter().filter(|r| only.as_ref().is_none_or(|o| r["name"].contains(o.as_str()))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(row) = rows.get(i) else { break };
                if let Err(e) = check_row(dir, out_dir.path(), row) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} corpus rows failed:\n{}", failures.len(), failures.join("\n"));
}
