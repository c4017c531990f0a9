//! Differential tests against qemu-img for the VHDX files qemu-img can create: fixed and dynamic,
//! block sizes from 1 MiB to 256 MiB, `block_state_zero` on and off, log sizes, with random
//! writes, zero writes and discards from qemu-io. Content must be byte-identical to
//! `qemu-img convert -O raw`. Maps are NOT compared with qemu-img (it reports every VHDX as data
//! from end to end); instead vdisk's map must be sparse where the BAT is: data only in blocks
//! that qemu-io wrote.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use vdisk_core::{Image, ReferencePolicy};

const MIB: u64 = 1 << 20;

/// One qemu-made image: its `qemu-img create -o` options, size, and qemu-io workload.
struct Variant {
    name: &'static str,
    options: &'static str,
    size: u64,
    block_size: u64,
    ops: usize,
    seed: u64,
}

/// Block-aligned ranges touched by the data and zero writes of `cmds` (qemu's VHDX driver has no
/// zero-write or discard operation of its own: `write -z` stores zeros and allocates, discard
/// does nothing).
fn written_blocks(cmds: &[String], block: u64, size: u64) -> Vec<(u64, u64)> {
    let mut r = Vec::new();
    for c in cmds {
        let w: Vec<&str> = c.split_whitespace().collect();
        if w.first() != Some(&"write") {
            continue;
        }
        let n = w.len();
        let off: u64 = w[n - 2].parse().unwrap();
        let len: u64 = w[n - 1].parse().unwrap();
        r.push((off / block * block, ((off + len).div_ceil(block) * block).min(size)));
    }
    common::merge_ranges(merge_overlapping(r))
}

fn merge_overlapping(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn inside(ranges: &[(u64, u64)], s: u64, e: u64) -> bool {
    ranges.iter().any(|&(a, b)| a <= s && e <= b)
}

fn run_variant(dir: &Path, v: &Variant) {
    let path = dir.join(format!("{}.vhdx", v.name));
    common::qemu_img(&["create", "-q", "-f", "vhdx", "-o", v.options, path.to_str().unwrap(), &v.size.to_string()]);

    // Freshly created: nothing is data (fixed disks too: their blocks are stored but qemu marks
    // them ZERO unless block_state_zero=off).
    let img = Image::open(&path, &Default::default()).unwrap();
    let fresh = common::vdisk_data_ranges(&img);
    if !v.options.contains("fixed") || v.options.contains("block_state_zero=on") {
        assert!(fresh.is_empty(), "{}: fresh image maps data {fresh:?}", v.name);
    }
    drop(img);

    let mut rng = common::Rng::new(v.seed);
    let cmds = common::random_io_commands(&mut rng, v.size, v.block_size.min(2 * MIB), v.ops, false);
    common::qemu_io("vhdx", &path, &cmds);
    common::assert_matches_qemu(&path, "vhdx", ReferencePolicy::Deny, false);

    let img = Image::open(&path, &Default::default()).unwrap();
    let data = common::vdisk_data_ranges(&img);
    if !v.options.contains("fixed") {
        let written = written_blocks(&cmds, v.block_size, v.size);
        for &(s, e) in &data {
            assert!(inside(&written, s, e), "{}: data {s:#x}..{e:#x} outside the written blocks {written:?}", v.name);
        }
        let total: u64 = data.iter().map(|(s, e)| e - s).sum();
        assert!(total < v.size || written.iter().map(|(s, e)| e - s).sum::<u64>() == v.size, "{}: not sparse", v.name);
    }

    // info: qemu-img's keys keep qemu-img's values; format-specific is vdisk's addition.
    let q: serde_json::Value =
        serde_json::from_str(&common::qemu_img(&["info", "-f", "vhdx", "--output", "json", path.to_str().unwrap()]))
            .unwrap();
    let info = img.info();
    assert_eq!(Some(info.virtual_size), q["virtual-size"].as_u64(), "{}", v.name);
    assert_eq!(info.cluster_size, q["cluster-size"].as_u64(), "{}", v.name);
    assert_eq!(Some(info.dirty_flag), q["dirty-flag"].as_bool(), "{}", v.name);
    assert_eq!(info.format, q["format"].as_str().unwrap());
    assert!(q.get("format-specific").is_none(), "qemu-img now has a vhdx format-specific: {q}");
    let fs = info.format_specific.as_ref().unwrap();
    assert_eq!(fs["type"], "vhdx");
    assert_eq!(fs["data"]["block-size"], v.block_size);
    assert_eq!(fs["data"]["logical-sector-size"], 512);
    assert_eq!(fs["data"]["log"], "clean");
    assert_eq!(fs["data"]["subformat"], if v.options.contains("fixed") { "fixed" } else { "dynamic" });
    assert!(fs["data"]["creator"].as_str().unwrap().starts_with("QEMU"), "{fs}");

    // check: qemu-made files are clean.
    let report = img.check().unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{}: {:?}", v.name, report.problems);
}

#[test]
fn qemu_dynamic_block_sizes() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let variants = [
        Variant {
            name: "dyn-1m",
            options: "subformat=dynamic,block_size=1M",
            size: 48 * MIB + 512 * 3,
            block_size: MIB,
            ops: 40,
            seed: 1,
        },
        Variant {
            name: "dyn-2m-bsz-off",
            options: "subformat=dynamic,block_size=2M,block_state_zero=off",
            size: 64 * MIB,
            block_size: 2 * MIB,
            ops: 40,
            seed: 2,
        },
        Variant {
            name: "dyn-8m-log4m",
            options: "subformat=dynamic,block_size=8M,log_size=4M",
            size: 100 * MIB,
            block_size: 8 * MIB,
            ops: 30,
            seed: 3,
        },
        Variant {
            name: "dyn-32m",
            options: "subformat=dynamic,block_size=32M,block_state_zero=on",
            size: 200 * MIB,
            block_size: 32 * MIB,
            ops: 20,
            seed: 4,
        },
        Variant {
            name: "dyn-256m",
            options: "subformat=dynamic,block_size=256M",
            size: 600 * MIB,
            block_size: 256 * MIB,
            ops: 8,
            seed: 5,
        },
    ];
    for v in &variants {
        run_variant(dir.path(), v);
    }
}

#[test]
fn qemu_fixed() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let variants = [
        Variant {
            name: "fixed-zero-on",
            options: "subformat=fixed,block_size=1M,block_state_zero=on",
            size: 24 * MIB,
            block_size: MIB,
            ops: 30,
            seed: 11,
        },
        Variant {
            name: "fixed-zero-off",
            options: "subformat=fixed,block_size=4M,block_state_zero=off",
            size: 20 * MIB,
            block_size: 4 * MIB,
            ops: 30,
            seed: 12,
        },
        Variant {
            name: "fixed-log2m",
            options: "subformat=fixed,log_size=2M",
            size: 16 * MIB,
            block_size: 8 * MIB,
            ops: 20,
            seed: 13,
        },
    ];
    for v in &variants {
        run_variant(dir.path(), v);
    }
}

/// An image qemu-img creates and vdisk must read without any writes: all zeros, no data.
#[test]
fn qemu_empty_large_sparse() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhdx");
    common::qemu_img(&["create", "-q", "-f", "vhdx", path.to_str().unwrap(), "2T"]);
    let img = Image::open(&path, &Default::default()).unwrap();
    assert_eq!(img.virtual_size(), 2 << 40);
    assert!(common::vdisk_data_ranges(&img).is_empty());
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, (1 << 40) + 12345).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}
