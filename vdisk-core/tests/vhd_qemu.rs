//! Differential tests: VHDs that qemu-img creates (`-f vpc`, fixed and dynamic, with and without
//! `force_size`, sizes that are not multiples of the CHS geometry) and qemu-io fills with random
//! writes, zero writes and discards, read by vdisk and compared byte for byte with
//! `qemu-img convert`, and `info`/`map` compared with qemu-img's.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{assert_matches_qemu, have_qemu, qemu_img, qemu_io, random_io_commands, Rng};
use vdisk_core::{Format, Image, OpenOptions, ReferencePolicy};

fn create(dir: &Path, name: &str, subformat: &str, force_size: bool, size: u64) -> PathBuf {
    let path = dir.join(name);
    let mut o = format!("subformat={subformat}");
    if force_size {
        o.push_str(",force_size=on");
    }
    qemu_img(&["create", "-q", "-f", "vpc", "-o", &o, path.to_str().unwrap(), &size.to_string()]);
    path
}

fn qemu_info(path: &Path, fmt: Option<&str>) -> serde_json::Value {
    let mut args = vec!["info", "--output", "json"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.push(path.to_str().unwrap());
    serde_json::from_str(&qemu_img(&args)).unwrap()
}

/// vdisk's `info` keeps qemu-img's keys and values and adds a `vpc` format-specific.
fn assert_info_matches(path: &Path, subformat: &str) {
    let q = qemu_info(path, Some("vpc"));
    let info = Image::describe(path, &OpenOptions::default()).unwrap();
    assert_eq!(Some(info.virtual_size), q["virtual-size"].as_u64(), "{}", path.display());
    assert_eq!(info.cluster_size, q["cluster-size"].as_u64(), "{}: cluster-size", path.display());
    assert_eq!(info.format, q["format"].as_str().unwrap());
    assert_eq!(Some(info.dirty_flag), q["dirty-flag"].as_bool());
    assert!(q.get("format-specific").is_none(), "qemu-img now prints a format-specific for vpc: {q}");
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["type"], "vpc");
    assert_eq!(fs["data"]["subformat"], subformat);
    assert!(fs["data"]["creator-app"].as_str().unwrap().starts_with("qem"), "{fs}");
}

fn random_fill(path: &Path, size: u64, seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let cmds = random_io_commands(&mut rng, size, 64 << 10, count, false);
    qemu_io("vpc", path, &cmds);
}

fn assert_clean_check(path: &Path) {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let report = img.check().unwrap();
    assert_eq!(report.corruptions, 0, "{}: {:?}", path.display(), report.problems);
}

#[test]
fn dynamic_disks_match_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: [(u64, bool); 4] = [
        (10_000_000, false),
        (10_000_000, true),
        ((1 << 30) + (7 << 20), false),
        ((300 << 20) + (7 << 20) + 512, true),
    ];
    for (i, (size, force)) in cases.into_iter().enumerate() {
        let path = create(dir.path(), &format!("d{i}.vhd"), "dynamic", force, size);
        let vsize = qemu_info(&path, Some("vpc"))["virtual-size"].as_u64().unwrap();
        if force {
            assert_eq!(vsize, size.div_ceil(512) * 512, "force_size keeps the size");
        } else {
            assert!(vsize > size, "CHS rounding of {size} gave {vsize}");
        }
        random_fill(&path, vsize, 0x5648_4400 + i as u64, 40);
        assert_matches_qemu(&path, "vpc", ReferencePolicy::Deny, true);
        assert_info_matches(&path, "dynamic");
        assert_clean_check(&path);
    }
}

#[test]
fn fixed_disks_match_qemu_and_are_detected_by_content() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: [(u64, bool); 3] = [(10_000_000, false), (10_000_000, true), ((64 << 20) + (7 << 20) + 4096, false)];
    for (i, (size, force)) in cases.into_iter().enumerate() {
        let path = create(dir.path(), &format!("f{i}.vhd"), "fixed", force, size);
        let vsize = qemu_info(&path, Some("vpc"))["virtual-size"].as_u64().unwrap();
        random_fill(&path, vsize, 0x5648_4600 + i as u64, 40);
        // qemu-img probes a fixed VHD as raw (there is no header at offset 0); vdisk finds the
        // footer.
        assert_eq!(qemu_info(&path, None)["format"], "raw", "qemu-img's probe");
        let img = Image::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Vhd);
        // qemu-img maps the whole fixed disk as data (holes as "data, zero"); vdisk maps the
        // holes of the file as zero, so its data ranges lie inside qemu's.
        assert_matches_qemu(&path, "vpc", ReferencePolicy::Deny, false);
        let ours = common::vdisk_data_ranges(&img);
        let theirs = common::qemu_data_ranges(&path, "vpc");
        assert!(!ours.is_empty());
        for (s, e) in &ours {
            assert!(theirs.iter().any(|(ts, te)| ts <= s && e <= te), "{s:#x}..{e:#x} not data for qemu");
        }
        assert_info_matches(&path, "fixed");
        assert_clean_check(&path);
    }
}

#[test]
fn qemu_converted_images_match() {
    if !have_qemu() {
        return;
    }
    // A raw disk with data, converted by qemu-img to both subformats.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 24u64 << 20;
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    random_fill_raw(&raw, size);
    for sub in ["fixed", "dynamic"] {
        let out = dir.path().join(format!("conv-{sub}.vhd"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            &format!("subformat={sub}"),
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_matches_qemu(&out, "vpc", ReferencePolicy::Deny, sub == "dynamic");
    }
}

fn random_fill_raw(path: &Path, size: u64) {
    let mut rng = Rng::new(0x0072_6177);
    let cmds = random_io_commands(&mut rng, size, 64 << 10, 30, false);
    qemu_io("raw", path, &cmds);
}
