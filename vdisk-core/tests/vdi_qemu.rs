//! Differential tests: VDIs that qemu-img creates (`-f vdi`, dynamic and static, sizes that are
//! not whole blocks) and qemu-io fills with random data and zero writes, read by vdisk and
//! compared byte for byte with `qemu-img convert`, and `info`, `map` and `check` compared with
//! qemu-img's.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{assert_matches_qemu, have_qemu, qemu_img, qemu_io, random_io_commands, Rng};
use vdisk_core::{Format, Image, OpenOptions, ReferencePolicy};

fn create(dir: &Path, name: &str, static_: bool, size: u64) -> PathBuf {
    let path = dir.join(name);
    let o = format!("static={}", if static_ { "on" } else { "off" });
    qemu_img(&["create", "-q", "-f", "vdi", "-o", &o, path.to_str().unwrap(), &size.to_string()]);
    path
}

fn qemu_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-f", "vdi", "--output", "json", path.to_str().unwrap()])).unwrap()
}

/// Random data and zero writes (qemu's VDI driver has no discard).
fn random_fill(path: &Path, size: u64, seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let cmds: Vec<String> = random_io_commands(&mut rng, size, 1 << 20, count, false)
        .into_iter()
        .filter(|c| !c.starts_with("discard"))
        .collect();
    qemu_io("vdi", path, &cmds);
}

/// `info` keeps qemu-img's keys and values and adds a `vdi` format-specific.
fn assert_info_matches(path: &Path, image_type: &str) {
    let q = qemu_info(path);
    let info = Image::describe(path, &OpenOptions::default()).unwrap();
    assert_eq!(Some(info.virtual_size), q["virtual-size"].as_u64(), "{}", path.display());
    assert_eq!(info.cluster_size, q["cluster-size"].as_u64(), "{}: cluster-size", path.display());
    assert_eq!(info.format, q["format"].as_str().unwrap());
    assert_eq!(Some(info.dirty_flag), q["dirty-flag"].as_bool());
    assert!(q.get("format-specific").is_none(), "qemu-img now prints a format-specific for vdi: {q}");
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["type"], "vdi");
    assert_eq!(fs["data"]["image-type"], image_type);
    assert_eq!(fs["data"]["version"], "1.1");
    assert_eq!(fs["data"]["header-size"], 384);
    assert_eq!(fs["data"]["block-size"], 1 << 20);
    assert_eq!(fs["data"]["uuid"].as_str().unwrap().len(), 36);
}

/// `check` is clean where `qemu-img check` is (exit 0).
fn assert_clean_check(path: &Path) {
    let st = std::process::Command::new("qemu-img").args(["check", "-f", "vdi"]).arg(path).status().unwrap();
    assert!(st.success(), "qemu-img check {}", path.display());
    let report = Image::check_file(path, &OpenOptions::default()).unwrap();
    assert_eq!(report.exit_code(), 0, "{}: {:?}", path.display(), report.problems);
    assert_eq!(report.allocated_clusters, Some(qemu_allocated(path)), "{}", path.display());
}

/// Blocks qemu-img's map reports as data, counted in 1 MiB blocks.
fn qemu_allocated(path: &Path) -> u64 {
    common::qemu_data_ranges(path, "vdi").iter().map(|(s, e)| (e - s).div_ceil(1 << 20)).sum()
}

#[test]
fn dynamic_vdis_match_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sizes = [10u64 << 20, (20 << 20) + 4096 + 512, (1 << 30) + (3 << 20)];
    for (i, size) in sizes.into_iter().enumerate() {
        let path = create(dir.path(), &format!("d{i}.vdi"), false, size);
        assert_eq!(qemu_info(&path)["virtual-size"].as_u64(), Some(size));
        random_fill(&path, size, 0x5644_4900 + i as u64, 30);
        assert_matches_qemu(&path, "vdi", ReferencePolicy::Deny, true);
        assert_info_matches(&path, "dynamic");
        assert_clean_check(&path);
        // Probed by content, whatever the name.
        let renamed = dir.path().join(format!("upload{i}.source"));
        std::fs::copy(&path, &renamed).unwrap();
        assert_eq!(Image::open(&renamed, &OpenOptions::default()).unwrap().format(), Format::Vdi);
    }
}

#[test]
fn static_vdis_match_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [(3u64 << 20) + 512, 8 << 20].into_iter().enumerate() {
        let path = create(dir.path(), &format!("s{i}.vdi"), true, size);
        random_fill(&path, size, 0x5644_5300 + i as u64, 20);
        assert_matches_qemu(&path, "vdi", ReferencePolicy::Deny, true);
        assert_info_matches(&path, "static");
        let report = Image::check_file(&path, &OpenOptions::default()).unwrap();
        assert_eq!(report.exit_code(), 0, "{:?}", report.problems);
        assert_eq!(report.allocated_clusters, Some(size.div_ceil(1 << 20)));
    }
}

#[test]
fn qemu_converted_vdis_match() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = (24u64 << 20) + 1536;
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    let mut rng = Rng::new(0x0076_6469);
    let cmds = random_io_commands(&mut rng, size, 1 << 20, 30, false);
    qemu_io("raw", &raw, &cmds);
    for sub in ["off", "on"] {
        let out = dir.path().join(format!("conv-{sub}.vdi"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vdi",
            "-o",
            &format!("static={sub}"),
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_matches_qemu(&out, "vdi", ReferencePolicy::Deny, true);
        let theirs = common::sha256_file(&raw);
        let ours = common::sha256_file(&common::vdisk_convert(&out, &OpenOptions::default(), dir.path(), "o.raw", 2));
        assert_eq!(ours, theirs, "round trip through qemu's VDI writer");
    }
}
