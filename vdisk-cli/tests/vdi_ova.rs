//! Every generated VDI and OVA case (`testdata/vdi/make.py`, `testdata/ova/make.py`) through the
//! command: `convert` gives the known content or one `vdisk: ` line naming the problem; `info`
//! and `map` agree with it; `check` gives qemu-img's exit codes; `--disk` selects an OVA's disk.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(120);

fn flags(row: &HashMap<String, String>) -> Vec<String> {
    row["flags"].split_whitespace().map(str::to_string).collect()
}

/// Convert, and compare with the row's expectation; then info, map and check.
fn check_case(dir: &Path, out_dir: &Path, row: &HashMap<String, String>) -> Result<(), String> {
    let name = &row["name"];
    let image = dir.join(name);
    let label = format!("{name} {}", row["flags"]);
    let target = out_dir.join("out.raw");
    let _ = std::fs::remove_file(&target);
    let out = run_limited(vdisk().arg("convert").args(flags(row)).arg(&image).arg(&target), LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    match row["expect"].as_str() {
        "ok" => {
            if !out.status.success() {
                return Err(format!("{label}: convert failed: {stderr}"));
            }
            let (sha, len) = sha256_file(&target);
            if sha != row["sha256"] || len.to_string() != row["virtual_size"] {
                return Err(format!("{label}: content {sha} ({len} bytes), expected {}", row["sha256"]));
            }
            let info = run_limited(vdisk().args(["info", "--output", "json"]).args(flags(row)).arg(&image), LIMIT);
            let v: serde_json::Value =
                serde_json::from_slice(&info.stdout).map_err(|e| format!("{label}: info: {e}"))?;
            if v["virtual-size"].as_u64() != Some(len) {
                return Err(format!("{label}: info virtual-size {}", v["virtual-size"]));
            }
            let want = if name.ends_with(".vdi") { "vdi" } else { "ova" };
            if v["format"] != want {
                return Err(format!("{label}: info format {}", v["format"]));
            }
            let map = run_limited(vdisk().args(["map", "--output", "json"]).args(flags(row)).arg(&image), LIMIT);
            let compressed_file = v["format-specific"]["data"]["disk-format-specific"]["data"]["compression"] == "gzip";
            if compressed_file {
                // No random access: one clear line, exit 1.
                let e = String::from_utf8_lossy(&map.stderr);
                if map.status.code() != Some(1) || e.lines().count() != 1 || !e.contains("front to back") {
                    return Err(format!("{label}: map of a gzip-compressed disk: {e}"));
                }
            } else {
                let m: serde_json::Value =
                    serde_json::from_slice(&map.stdout).map_err(|e| format!("{label}: map: {e}"))?;
                let covered: u64 = m.as_array().unwrap().iter().map(|e| e["length"].as_u64().unwrap()).sum();
                if covered != len {
                    return Err(format!("{label}: map covers {covered} of {len} bytes"));
                }
            }
        }
        "error" => {
            let one_line = out.status.code() == Some(1)
                && stderr.lines().count() == 1
                && stderr.starts_with("vdisk: ")
                && !stderr.contains("panicked");
            if !one_line || !stderr.contains(&row["error"]) {
                return Err(format!(
                    "{label}: expected one error line with '{}': {:?} {stderr}",
                    row["error"], out.status
                ));
            }
        }
        other => return Err(format!("{label}: unknown expectation {other}")),
    }
    let want_check = match row.get("check").map(String::as_str) {
        Some(c) if c != "-" => c.parse::<i32>().ok(),
        // VDIs: clean where they convert.
        None if row["expect"] == "ok" => Some(0),
        _ => None,
    };
    if let Some(code) = want_check {
        let c = run_limited(vdisk().arg("check").args(flags(row)).arg(&image), LIMIT);
        if c.status.code() != Some(code) {
            return Err(format!(
                "{label}: check exit {:?}, expected {code}: {}{}",
                c.status.code(),
                String::from_utf8_lossy(&c.stdout),
                String::from_utf8_lossy(&c.stderr)
            ));
        }
    }
    Ok(())
}

fn run_all(script: &str) {
    let Some((dir, rows)) = generate_cases(script) else { return };
    let out = tempfile::tempdir().unwrap();
    let failures: Vec<String> = rows.iter().filter_map(|r| check_case(&dir, out.path(), r).err()).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

#[test]
fn every_generated_vdi_through_the_cli() {
    run_all("vdi/make.py");
}

#[test]
fn every_generated_ova_through_the_cli() {
    run_all("ova/make.py");
}

#[test]
fn ova_info_human_lists_the_disks_and_convert_names_them_when_one_must_be_chosen() {
    let Some((dir, _)) = generate_cases("ova/make.py") else { return };
    let ova = dir.join("two-disks.ova");
    let out = run_limited(vdisk().arg("info").arg(&ova), LIMIT);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("file format: ova"), "{text}");
    assert!(text.contains("virtual size: 6 MiB (6291456 bytes)"), "{text}");
    for needle in ["file: disk1.vmdk", "file: disk2.vmdk", "index: 2", "capacity: 3146240", "manifest: true"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    let out = run_limited(vdisk().args(["info", "--disk", "2"]).arg(&ova), LIMIT);
    assert!(String::from_utf8_lossy(&out.stdout).contains("virtual size: 3 MiB (3146240 bytes)"));
    let target = tempfile::tempdir().unwrap().path().join("never.raw");
    let out = run_limited(vdisk().arg("convert").arg(&ova).arg(&target), LIMIT);
    assert_clean_error(&out, 1, "multi-disk convert");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--disk N") && e.contains("1 'disk1.vmdk'") && e.contains("2 'disk2.vmdk'"), "{e}");
    assert!(!target.exists());
    let out = run_limited(vdisk().args(["info", "--disk", "0"]).arg(&ova), LIMIT);
    assert_clean_error(&out, 2, "--disk 0 is a usage error");
    let out = run_limited(vdisk().args(["info", "--disk", "1"]).arg(dir.join("../").join("nonexistent")), LIMIT);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn disk_numbers_are_for_ovas_only_and_formats_can_be_forced() {
    let Some((dir, _)) = generate_cases("vdi/make.py") else { return };
    let vdi = dir.join("version0.vdi");
    let out = run_limited(vdisk().args(["info", "--disk", "1"]).arg(&vdi), LIMIT);
    assert_clean_error(&out, 1, "--disk on a VDI");
    assert!(String::from_utf8_lossy(&out.stderr).contains("OVA"));
    let out = run_limited(vdisk().args(["info", "-f", "vdi", "--output", "json"]).arg(&vdi), LIMIT);
    assert!(out.status.success());
    let out = run_limited(vdisk().args(["info", "-f", "ova"]).arg(&vdi), LIMIT);
    assert_clean_error(&out, 1, "-f ova on a VDI");
}

#[test]
fn a_compressed_ova_disk_converts_onto_an_existing_target_with_progress() {
    let Some((dir, rows)) = generate_cases("ova/make.py") else { return };
    let row = rows.iter().find(|r| r["name"] == "gzip-vmware-stream.ova").unwrap();
    let size: u64 = row["virtual_size"].parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("existing.raw");
    let mut garbage = vec![0x5au8; size as usize];
    garbage.extend_from_slice(b"tail that must survive");
    std::fs::write(&target, &garbage).unwrap();
    let out =
        run_limited(vdisk().args(["convert", "-n", "-p"]).arg(dir.join("gzip-vmware-stream.ova")).arg(&target), LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = std::fs::read(&target).unwrap();
    let head = tmp.path().join("head.raw");
    std::fs::write(&head, &got[..size as usize]).unwrap();
    assert_eq!(sha256_file(&head).0, row["sha256"]);
    assert!(got.ends_with(b"tail that must survive"));
    let progress = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("100"), "{progress}");
}
