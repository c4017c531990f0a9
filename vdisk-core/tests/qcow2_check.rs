//! `check` of qcow2 images against `qemu-img check --output json`: the same counters and the
//! same classification (corruptions, leaks, exit code), on clean images and on planted faults.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{random_io_commands, Rng};
use serde_json::Value;
use vdisk_core::{CheckReport, Image, OpenOptions};

fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    common::run(Command::new("qemu-img").args(&args).current_dir(dir));
    dir.join(name)
}

fn io(dir: &Path, path: &Path, cmds: &[String]) -> bool {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(path).output().unwrap().status.success()
}

/// Random writes that keep qemu-io happy (compressed writes only to discarded clusters).
fn scribble(dir: &Path, path: &Path, seed: u64, size: u64, cluster: u64, compressed: bool) {
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for cmd in random_io_commands(&mut rng, size, cluster, 60, compressed) {
        if let Some(rest) = cmd.strip_prefix("write -c ") {
            let mut w = rest.split(' ').skip(2);
            cmds.push(format!("discard {} {}", w.next().unwrap(), w.next().unwrap()));
        }
        cmds.push(cmd);
    }
    assert!(io(dir, path, &cmds), "qemu-io failed on {}", path.display());
}

/// `qemu-img check --output json` and its exit code.
fn qemu_check(dir: &Path, path: &Path) -> (Value, i32) {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(["check", "-f", "qcow2", "--output", "json"])
        .arg(path)
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img check output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (json, code)
}

fn ours(path: &Path) -> CheckReport {
    let img = Image::open(path, &common::opts(vdisk_core::ReferencePolicy::SameDir)).unwrap();
    img.check().unwrap()
}

/// Counters and exit code agree with qemu-img check; returns vdisk's report.
fn assert_check_matches(dir: &Path, path: &Path) -> CheckReport {
    let (theirs, code) = qemu_check(dir, path);
    let r = ours(path);
    let n = |k: &str| theirs.get(k).and_then(Value::as_u64).unwrap_or(0);
    let name = path.display();
    assert_eq!(r.corruptions, n("corruptions"), "{name}: corruptions {:?}", r.problems);
    assert_eq!(r.leaks, n("leaks"), "{name}: leaks {:?}", r.problems);
    assert_eq!(r.check_errors, n("check-errors"), "{name}: check errors");
    assert_eq!(r.image_end_offset, theirs.get("image-end-offset").and_then(Value::as_u64), "{name}: image end");
    assert_eq!(r.total_clusters.unwrap_or(0), n("total-clusters"), "{name}: total clusters");
    assert_eq!(r.allocated_clusters.unwrap_or(0), n("allocated-clusters"), "{name}: allocated clusters");
    assert_eq!(r.fragmented_clusters.unwrap_or(0), n("fragmented-clusters"), "{name}: fragmented clusters");
    assert_eq!(r.compressed_clusters.unwrap_or(0), n("compressed-clusters"), "{name}: compressed clusters");
    assert_eq!(r.exit_code(), code, "{name}: exit code");
    r
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// File offset of the L2 entry that maps guest cluster 0 (standard 64 KiB-cluster images).
fn first_l2_entry(bytes: &[u8]) -> usize {
    let l1 = be64(bytes, 40) as usize;
    (be64(bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize
}

#[test]
fn clean_images_match_qemu() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, u64, u64, &str, bool)] = &[
        ("plain.qcow2", 16 << 20, 65536, "", true),
        ("v2.qcow2", 8 << 20, 65536, "compat=0.10", true),
        ("small.qcow2", 2 << 20, 512, "cluster_size=512", true),
        ("rc1.qcow2", 4 << 20, 4096, "cluster_size=4096,refcount_bits=1", false),
        ("rc4.qcow2", 4 << 20, 65536, "refcount_bits=4", true),
        ("rc8.qcow2", 4 << 20, 65536, "refcount_bits=8", false),
        ("rc32.qcow2", 4 << 20, 65536, "refcount_bits=32", false),
        ("rc64.qcow2", 4 << 20, 65536, "refcount_bits=64", true),
        ("ext.qcow2", 16 << 20, 65536, "extended_l2=on", true),
        ("zstd.qcow2", 8 << 20, 65536, "compression_type=zstd", true),
        ("meta.qcow2", 8 << 20, 65536, "preallocation=metadata", false),
    ];
    for (i, (name, size, cluster, opts, compressed)) in cases.iter().enumerate() {
        let p = create(d, name, &size.to_string(), opts);
        scribble(d, &p, 100 + i as u64, *size, *cluster, *compressed);
        let r = assert_check_matches(d, &p);
        assert_eq!(r.exit_code(), 0, "{name}: {:?}", r.problems);
    }
}

#[test]
fn snapshots_bitmaps_data_file_and_dirt_match_qemu() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = create(d, "snaps.qcow2", "8M", "");
    scribble(d, &p, 200, 8 << 20, 65536, true);
    common::run(Command::new("qemu-img").current_dir(d).args(["snapshot", "-c", "s1", "snaps.qcow2"]));
    scribble(d, &p, 201, 8 << 20, 65536, false);
    common::run(Command::new("qemu-img").current_dir(d).args(["snapshot", "-c", "s2", "snaps.qcow2"]));
    scribble(d, &p, 202, 8 << 20, 65536, true);
    assert_eq!(assert_check_matches(d, &p).exit_code(), 0);

    let p = create(d, "bitmaps.qcow2", "8M", "");
    common::run(Command::new("qemu-img").current_dir(d).args(["bitmap", "--add", "bitmaps.qcow2", "b0"]));
    common::run(Command::new("qemu-img").current_dir(d).args(["bitmap", "--add", "-g", "512", "bitmaps.qcow2", "b1"]));
    scribble(d, &p, 203, 8 << 20, 65536, false);
    assert_eq!(assert_check_matches(d, &p).exit_code(), 0);

    let p = create(d, "data.qcow2", "8M", "data_file=data.bin");
    scribble(d, &p, 204, 8 << 20, 65536, false);
    assert_eq!(assert_check_matches(d, &p).exit_code(), 0);

    // Lazy refcounts, killed: refcounts lag behind the L2 tables (corruptions, as qemu says).
    let p = create(d, "dirty.qcow2", "8M", "lazy_refcounts=on");
    scribble(d, &p, 205, 8 << 20, 65536, false);
    assert!(!io(d, &p, &["write -P 7 5M 256k".into(), "sigraise 9".into()]));
    let r = assert_check_matches(d, &p);
    assert!(r.corruptions > 0);
}

#[test]
fn planted_leak_is_a_leak_only() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = create(d, "leak.qcow2", "4M", "");
    assert!(io(d, &p, &["write -P 1 0 256k".into()]));
    // Forget guest cluster 0: its host cluster is still counted but nothing references it.
    let mut bytes = std::fs::read(&p).unwrap();
    let at = first_l2_entry(&bytes);
    assert_ne!(be64(&bytes, at), 0);
    put64(&mut bytes, at, 0);
    std::fs::write(&p, bytes).unwrap();
    let r = assert_check_matches(d, &p);
    assert_eq!((r.corruptions, r.leaks, r.exit_code()), (0, 1, 3), "{:?}", r.problems);
}

#[test]
fn planted_corruptions_match_qemu() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An L2 entry pointing past the end of the file.
    let p = create(d, "past-eof.qcow2", "4M", "");
    assert!(io(d, &p, &["write -P 1 0 256k".into()]));
    let mut bytes = std::fs::read(&p).unwrap();
    let at = first_l2_entry(&bytes);
    let past = (bytes.len() as u64).next_multiple_of(65536) + 16 * 65536;
    put64(&mut bytes, at + 8, (1 << 63) | past);
    std::fs::write(&p, &bytes).unwrap();
    let r = assert_check_matches(d, &p);
    assert_eq!(r.exit_code(), 2);
    assert!(r.corruptions >= 1);

    // A refcount zeroed under a data cluster.
    let p = create(d, "zeroed.qcow2", "4M", "");
    assert!(io(d, &p, &["write -P 1 0 256k".into()]));
    let mut bytes = std::fs::read(&p).unwrap();
    let data = be64(&bytes, first_l2_entry(&bytes)) & 0x00ff_ffff_ffff_fe00;
    let reftable = be64(&bytes, 48) as usize;
    let block = be64(&bytes, reftable) as usize;
    let index = (data / 65536) as usize;
    bytes[block + 2 * index..block + 2 * index + 2].copy_from_slice(&[0, 0]);
    std::fs::write(&p, &bytes).unwrap();
    let r = assert_check_matches(d, &p);
    assert_eq!(r.exit_code(), 2);
    assert!(r.problems.iter().any(|p| p.message.contains("refcount=0 reference=1")), "{:?}", r.problems);

    // An unaligned L2 table offset and an unaligned data cluster.
    let p = create(d, "unaligned.qcow2", "4M", "");
    assert!(io(d, &p, &["write -P 1 0 256k".into()]));
    let mut bytes = std::fs::read(&p).unwrap();
    let at = first_l2_entry(&bytes);
    let e = be64(&bytes, at + 16);
    put64(&mut bytes, at + 16, e + 512);
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(assert_check_matches(d, &p).exit_code(), 2);
    // Reading that cluster is an error naming the L2 table.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let e = img.read_at(&mut [0u8; 512], 2 * 65536).unwrap_err();
    assert!(e.to_string().contains("L2 table at 0x"), "{e}");
}
