//! Differential tests of the qcow2 reader against qemu-img on images qemu-img/qemu-io generate
//! at test time: raw output (1 and 2 threads), virtual size, format and data ranges must agree.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_matches_qemu, qemu_img, qemu_io, random_io_commands, Rng};
use vdisk_core::{ExtentKind, Image, OpenOptions, ReferencePolicy};

const MIB: u64 = 1 << 20;

/// `qemu-img create -f qcow2 [-o OPTS] NAME SIZE`, run inside DIR so that relative names in
/// OPTS (data files) land there.
fn create(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size = size.to_string();
    args.extend([name, size.as_str()]);
    common::run(Command::new("qemu-img").args(&args).current_dir(dir));
    dir.join(name)
}

/// Random qemu-io writes, zero writes (some with `-u`), discards and (optionally) compressed
/// writes, seeded.
fn scribble(path: &Path, seed: u64, size: u64, cluster: u64, count: usize, compressed: bool) {
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for cmd in random_io_commands(&mut rng, size, cluster, count, compressed) {
        // qemu writes compressed clusters only where nothing is allocated: discard first.
        if let Some(rest) = cmd.strip_prefix("write -c ") {
            let mut words = rest.split(' ').skip(2);
            let (off, len) = (words.next().unwrap(), words.next().unwrap());
            cmds.push(format!("discard {off} {len}"));
        }
        cmds.push(cmd);
    }
    // A few zero writes that may unmap (`write -z -u`), cluster aligned so they can.
    for _ in 0..count / 8 + 1 {
        let c = rng.below(size / cluster) * cluster;
        let n = (rng.below(4) + 1) * cluster;
        cmds.push(format!("write -z -u {c} {}", n.min(size - c)));
    }
    for chunk in cmds.chunks(64) {
        io(path, chunk);
    }
}

/// qemu opens external data files relative to its working directory (not the image's), so
/// images that have one are written and read by qemu from inside their directory.
fn scribble_in(dir: &Path, path: &Path, seed: u64, size: u64, cluster: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let cmds = random_io_commands(&mut rng, size, cluster, count, false);
    for chunk in cmds.chunks(64) {
        io_in(Some(dir), path, chunk);
    }
}

/// [`common::assert_matches_qemu`] with qemu-img run inside the image's directory.
fn assert_matches_qemu_in_dir(image: &Path) {
    let dir = image.parent().unwrap();
    let name = image.file_name().unwrap().to_str().unwrap();
    let open = common::opts(ReferencePolicy::SameDir);
    let img = Image::open(image, &open).unwrap();
    let qemu = |args: &[&str]| common::run(Command::new("qemu-img").args(args).current_dir(dir));
    let qinfo: serde_json::Value =
        serde_json::from_str(&qemu(&["info", "-f", "qcow2", "--output", "json", name])).unwrap();
    assert_eq!(Some(img.virtual_size()), qinfo["virtual-size"].as_u64());
    qemu(&["convert", "-f", "qcow2", "-O", "raw", name, "qemu.raw"]);
    let theirs = common::sha256_file(&dir.join("qemu.raw"));
    for threads in [1, 2] {
        let ours = common::sha256_file(&common::vdisk_convert(image, &open, dir, "vdisk.raw", threads));
        assert_eq!(ours, theirs, "{}: content differs from qemu-img ({threads} threads)", image.display());
    }
    let map: serde_json::Value =
        serde_json::from_str(&qemu(&["map", "-f", "qcow2", "--output", "json", name])).unwrap();
    let mut ranges = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"].as_bool() == Some(true) {
            let s = e["start"].as_u64().unwrap();
            ranges.push((s, s + e["length"].as_u64().unwrap()));
        }
    }
    assert_eq!(common::vdisk_data_ranges(&img), common::merge_ranges(ranges), "{}: data ranges", image.display());
}

/// `qemu-io -f qcow2 -c CMD... FILE`, showing qemu-io's output when it fails.
fn io(path: &Path, cmds: &[String]) {
    io_in(None, path, cmds)
}

fn io_in(dir: Option<&Path>, path: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    if let Some(dir) = dir {
        c.current_dir(dir);
    }
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-io on {} failed: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("wrote") && !l.contains("ops/sec") && !l.starts_with("discard"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(path: &Path) {
    assert_matches_qemu(path, "qcow2", ReferencePolicy::Deny, true);
}

#[test]
fn random_writes_default_v3() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in 1..=3 {
        let p = create(dir.path(), &format!("v3-{seed}.qcow2"), 32 * MIB, "");
        scribble(&p, seed, 32 * MIB, 65536, 120, false);
        check(&p);
    }
}

#[test]
fn compat_0_10() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "v2.qcow2", 24 * MIB + 512, "compat=0.10");
    // Version 2 has no zero clusters: qemu-io writes zeros as data or deallocates.
    scribble(&p, 11, 24 * MIB, 65536, 100, true);
    check(&p);
}

#[test]
fn compressed_zlib_and_zstd() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in
        ["compression_type=zlib", "compression_type=zstd", "compression_type=zstd,cluster_size=4096"].iter().enumerate()
    {
        let cluster = if opts.contains("4096") { 4096 } else { 65536 };
        let p = create(dir.path(), &format!("c{i}.qcow2"), 16 * MIB, opts);
        scribble(&p, 20 + i as u64, 16 * MIB, cluster, 150, true);
        check(&p);
    }
    // A fully compressed image, as `qemu-img convert -c` writes it, with a size that is not a
    // multiple of the cluster size.
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, (0..3 * MIB + 1536).map(|i| (i * 7 / 13 % 251) as u8).collect::<Vec<u8>>()).unwrap();
    for ty in ["zlib", "zstd"] {
        let out = dir.path().join(format!("all-{ty}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ty}"),
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        check(&out);
    }
}

#[test]
fn cluster_sizes() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, (cluster, size)) in
        [(512u64, 2 * MIB), (4096, 8 * MIB), (16384, 8 * MIB), (2 * MIB, 64 * MIB)].into_iter().enumerate()
    {
        let p = create(dir.path(), &format!("cs{cluster}.qcow2"), size, &format!("cluster_size={cluster}"));
        scribble(&p, 30 + i as u64, size, cluster, 80, cluster <= 16384);
        check(&p);
    }
}

#[test]
fn extended_l2_subclusters() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, cluster) in [16384u64, 65536, 2 * MIB].into_iter().enumerate() {
        let size = if cluster == 2 * MIB { 64 * MIB } else { 16 * MIB };
        let p =
            create(dir.path(), &format!("ext{cluster}.qcow2"), size, &format!("extended_l2=on,cluster_size={cluster}"));
        scribble(&p, 40 + i as u64, size, cluster, 120, true);
        check(&p);
        // With a backing file: unallocated subclusters fall through to it.
        let base = create(dir.path(), &format!("extbase{cluster}.qcow2"), size, "");
        scribble(&base, 45 + i as u64, size, 65536, 40, false);
        let top = create(
            dir.path(),
            &format!("exttop{cluster}.qcow2"),
            size,
            &format!("extended_l2=on,cluster_size={cluster},backing_file=extbase{cluster}.qcow2,backing_fmt=qcow2"),
        );
        scribble(&top, 48 + i as u64, size, cluster, 60, false);
        assert_matches_qemu(&top, "qcow2", ReferencePolicy::SameDir, true);
    }
}

#[test]
fn lazy_refcounts_left_dirty() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "dirty.qcow2", 8 * MIB, "lazy_refcounts=on");
    scribble(&p, 50, 8 * MIB, 65536, 30, false);
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 192k", "-c", "write -z 2M 64k", "-c", "sigraise 9"])
        .arg(&p)
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "qemu-io should have been killed");
    let info = Image::describe(&p, &OpenOptions::default()).unwrap();
    assert!(info.dirty_flag, "the dirty bit must be set");
    check(&p);
}

#[test]
fn internal_snapshots() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "snap.qcow2", 16 * MIB, "");
    scribble(&p, 60, 16 * MIB, 65536, 60, true);
    qemu_img(&["snapshot", "-c", "first", p.to_str().unwrap()]);
    scribble(&p, 61, 16 * MIB, 65536, 60, false);
    qemu_img(&["snapshot", "-c", "second one", p.to_str().unwrap()]);
    scribble(&p, 62, 16 * MIB, 65536, 60, true);
    check(&p);
    let info = Image::describe(&p, &OpenOptions::default()).unwrap();
    assert_eq!(info.snapshots.len(), 2);
    assert_eq!(info.snapshots[1].name, "second one");
}

/// raw <- qcow2 (shorter) <- qcow2, each layer written.
#[test]
fn chain_of_three_with_raw_base() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), &(12 * MIB).to_string()]);
    let mut rng = Rng::new(70);
    qemu_io("raw", &base, &random_io_commands(&mut rng, 12 * MIB, 65536, 40, false));
    let mid = create(dir.path(), "mid.qcow2", 6 * MIB, "backing_file=base.raw,backing_fmt=raw");
    scribble(&mid, 71, 6 * MIB, 65536, 40, false);
    let top = create(dir.path(), "top.qcow2", 16 * MIB, "backing_file=mid.qcow2,backing_fmt=qcow2");
    scribble(&top, 72, 16 * MIB, 65536, 40, true);
    assert_matches_qemu(&top, "qcow2", ReferencePolicy::SameDir, true);
    // Without a recorded backing format the backing file is probed.
    let top2 = create(dir.path(), "top2.qcow2", 6 * MIB, "backing_file=mid.qcow2,backing_fmt=qcow2");
    // Turn the backing format extension into an unknown one (skipped by readers).
    let mut bytes = std::fs::read(&top2).unwrap();
    let at = bytes[..65536].windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).unwrap();
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&top2, bytes).unwrap();
    assert!(Image::describe(&top2, &OpenOptions::default()).unwrap().backing_filename_format.is_none());
    scribble(&top2, 73, 6 * MIB, 65536, 20, false);
    assert_matches_qemu(&top2, "qcow2", ReferencePolicy::SameDir, true);
    // Extents from the chain carry their depth.
    let img = Image::open(&top, &common::opts(ReferencePolicy::SameDir)).unwrap();
    let mut layers = std::collections::BTreeSet::new();
    for e in img.extents() {
        if let ExtentKind::Data { layer, .. } = e.unwrap().kind {
            layers.insert(layer);
        }
    }
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn external_data_file() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, raw) in ["off", "on"].into_iter().enumerate() {
        let p = create(
            dir.path(),
            &format!("ext-{raw}.qcow2"),
            8 * MIB,
            &format!("data_file=data-{raw}.bin,data_file_raw={raw}"),
        );
        scribble_in(dir.path(), &p, 80 + i as u64, 8 * MIB, 65536, 60);
        assert_matches_qemu_in_dir(&p);
        // The data extents point into the data file, not the image.
        let img = Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap();
        let mut files = std::collections::BTreeSet::new();
        for e in img.extents() {
            if let ExtentKind::Data { location, .. } = e.unwrap().kind {
                files.insert(location.file().index());
            }
        }
        assert_eq!(files.into_iter().collect::<Vec<_>>(), vec![1], "data file index");
        // Refused without a reference policy that allows it.
        let e = Image::open(&p, &OpenOptions::default()).unwrap_err();
        assert_eq!(e.kind(), vdisk_core::ErrorKind::ReferenceDenied, "{e}");
    }
}

#[test]
fn preallocation_metadata_and_falloc() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, prealloc) in ["metadata", "falloc", "full"].into_iter().enumerate() {
        let size = if prealloc == "full" { 4 * MIB } else { 16 * MIB };
        let p = create(dir.path(), &format!("pre-{prealloc}.qcow2"), size, &format!("preallocation={prealloc}"));
        scribble(&p, 90 + i as u64, size, 65536, 40, false);
        check(&p);
    }
}

#[test]
fn empty_one_tebibyte_maps_to_few_extents() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "huge.qcow2", 1 << 40, "");
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(img.virtual_size(), 1 << 40);
    let extents: Vec<_> = img.extents().collect::<Result<_, _>>().unwrap();
    assert!(extents.len() <= 2, "{extents:?}");
    assert_eq!(extents[0].start, 0);
    assert_eq!(extents.last().unwrap().end(), 1 << 40);
    assert!(extents.iter().all(|e| !e.kind.is_data()));
    // With a little data near the end.
    qemu_io("qcow2", &p, &["write -P 9 1099511562240 65536".to_string()]);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let extents: Vec<_> = img.extents().collect::<Result<_, _>>().unwrap();
    assert_eq!(extents.len(), 2, "{extents:?}");
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, (1 << 40) - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
}

#[test]
fn zero_writes_with_and_without_unmap() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "zeros.qcow2", 8 * MIB, "");
    qemu_io(
        "qcow2",
        &p,
        &[
            "write -P 1 0 8M".into(),
            "write -z 64k 128k".into(),
            "write -z -u 1M 256k".into(),
            "write -z 2M 1000".into(),
            "discard 3M 192k".into(),
            "write -z -u 4M 4k".into(),
        ],
    );
    check(&p);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert!(img.extents().any(|e| matches!(e.unwrap().kind, ExtentKind::Zero { layer: 0 })));
}
