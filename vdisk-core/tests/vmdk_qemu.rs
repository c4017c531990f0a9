//! Differential tests: every VMDK subformat qemu-img can create, filled by qemu-io with random
//! writes, zero writes and discards, must convert byte-identically to `qemu-img convert -O raw`,
//! with the same virtual size, data ranges (sparse subformats) and `info` format-specific data.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_matches_qemu, qemu_img, qemu_io, random_io_commands, Rng};
use vdisk_core::{ErrorKind, Image, ReferencePolicy};

const GRAIN: u64 = 64 << 10;

/// `qemu-img create -f vmdk -o OPTS path size`.
fn create(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", opts, p.to_str().unwrap(), &size.to_string()]);
    p
}

/// qemu-io commands: random ones plus a few at the ends of the disk and across 2 GiB boundaries.
fn fill(path: &Path, size: u64, seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let mut cmds = random_io_commands(&mut rng, size, GRAIN, count, false);
    cmds.push(format!("write -P 0x5a {} 4096", size - 4096));
    cmds.push(format!("write -P 0x11 0 {}", 3 * GRAIN + 512));
    cmds.push(format!("write -z {} {}", GRAIN, GRAIN));
    if size > (2 << 30) + GRAIN {
        cmds.push(format!("write -P 0x22 {} {}", (2u64 << 30) - 8192, 16384));
    }
    qemu_io("vmdk", path, &cmds);
}

/// `info` agrees with qemu-img's, apart from sizes on disk and qemu's child nodes.
fn assert_info_matches(path: &Path, policy: ReferencePolicy) {
    let img = Image::open(path, &common::opts(policy)).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&img.info().to_json()).unwrap();
    let mut theirs: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-f", "vmdk", "--output", "json", path.to_str().unwrap()])).unwrap();
    let obj = theirs.as_object_mut().unwrap();
    obj.remove("children");
    obj.remove("actual-size");
    let mut ours = ours;
    ours.as_object_mut().unwrap().remove("actual-size");
    assert_eq!(ours, theirs, "{}: info differs", path.display());
    // Describing without opening extents gives the same size.
    let d = Image::describe(path, &common::opts(ReferencePolicy::Deny)).unwrap();
    assert_eq!(d.virtual_size, img.virtual_size());
}

fn assert_check_clean(path: &Path, policy: ReferencePolicy) {
    let img = Image::open(path, &common::opts(policy)).unwrap();
    let r = img.check().unwrap();
    assert_eq!(r.corruptions, 0, "{}: {:?}", path.display(), r.problems);
}

#[test]
fn monolithic_sparse() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [(1u64, 64u64 << 20), (2, (100 << 20) + 3 * 512)] {
        let p = create(dir.path(), &format!("ms{i}.vmdk"), "subformat=monolithicSparse", size);
        fill(&p, size, i, 60);
        assert_matches_qemu(&p, "vmdk", ReferencePolicy::Deny, true);
        assert_info_matches(&p, ReferencePolicy::Deny);
        assert_check_clean(&p, ReferencePolicy::Deny);
    }
}

#[test]
fn monolithic_sparse_zeroed_grains() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 48 << 20;
    let p = create(dir.path(), "zg.vmdk", "subformat=monolithicSparse,zeroed_grain=on", size);
    fill(&p, size, 7, 80);
    // Whole-grain zero writes over data make zeroed-grain entries.
    qemu_io("vmdk", &p, &[format!("write -P 3 0 {}", 8 * GRAIN), format!("write -z {} {}", 2 * GRAIN, 4 * GRAIN)]);
    assert_matches_qemu(&p, "vmdk", ReferencePolicy::Deny, true);
    assert_info_matches(&p, ReferencePolicy::Deny);
    let img = Image::open(&p, &Default::default()).unwrap();
    let zero = img
        .extents()
        .map(Result::unwrap)
        .any(|e| e.start <= 2 * GRAIN && e.end() >= 6 * GRAIN && matches!(e.kind, vdisk_core::ExtentKind::Zero { .. }));
    assert!(zero, "zeroed grains must map as Zero");
    assert_check_clean(&p, ReferencePolicy::Deny);
}

#[test]
fn monolithic_flat() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 40 << 20;
    let p = create(dir.path(), "mf.vmdk", "subformat=monolithicFlat", size);
    fill(&p, size, 3, 50);
    // qemu maps holes of a flat file as data; vdisk maps them as zero, so maps are not compared.
    assert_matches_qemu(&p, "vmdk", ReferencePolicy::SameDir, false);
    assert_info_matches(&p, ReferencePolicy::SameDir);
    let e = Image::open(&p, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
}

#[test]
fn two_gb_sparse_beyond_4g() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = (5 << 30) + (7 << 20);
    let p = create(dir.path(), "tgs.vmdk", "subformat=twoGbMaxExtentSparse", size);
    fill(&p, size, 11, 60);
    assert!(dir.path().join("tgs-s003.vmdk").is_file(), "several extent files");
    assert_matches_qemu(&p, "vmdk", ReferencePolicy::SameDir, true);
    assert_info_matches(&p, ReferencePolicy::SameDir);
    assert_check_clean(&p, ReferencePolicy::SameDir);
    let e = Image::open(&p, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    // A piece opened on its own is a disk of its own capacity.
    let piece = Image::open(dir.path().join("tgs-s001.vmdk"), &Default::default()).unwrap();
    assert!(piece.virtual_size() > 0 && piece.virtual_size() < size);
}

#[test]
fn two_gb_flat_beyond_4g() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = (4 << 30) + (3 << 20);
    let p = create(dir.path(), "tgf.vmdk", "subformat=twoGbMaxExtentFlat", size);
    fill(&p, size, 13, 40);
    assert!(dir.path().join("tgf-f003.vmdk").is_file(), "several extent files");
    assert_matches_qemu(&p, "vmdk", ReferencePolicy::SameDir, false);
    assert_info_matches(&p, ReferencePolicy::SameDir);
}

/// A raw file of random data with zero areas, as streamOptimized input.
fn random_raw(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size as usize];
    let mut pos = 0usize;
    while pos < data.len() {
        let len = ((rng.below(6) + 1) * 37 * 1024) as usize;
        let end = (pos + len).min(data.len());
        match rng.below(4) {
            0 => {}
            1 => data[pos..end].fill((rng.below(255) + 1) as u8),
            _ => data[pos..end].iter_mut().for_each(|b| *b = rng.next() as u8),
        }
        pos = end;
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn stream_optimized() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [(1u64, 12u64 << 20), (2, (9 << 20) + 7 * 512)] {
        let raw = dir.path().join(format!("src{i}.raw"));
        random_raw(&raw, size, 100 + i);
        let p = dir.path().join(format!("so{i}.vmdk"));
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        assert_matches_qemu(&p, "vmdk", ReferencePolicy::Deny, true);
        assert_info_matches(&p, ReferencePolicy::Deny);
        assert_check_clean(&p, ReferencePolicy::Deny);
        // The content is the raw source's.
        let out = common::vdisk_convert(&p, &Default::default(), dir.path(), "out.raw", 2);
        assert_eq!(common::sha256_file(&out), common::sha256_file(&raw));
        // Compressed grains are marked as such.
        let img = Image::open(&p, &Default::default()).unwrap();
        assert!(img.extents().map(Result::unwrap).any(|e| matches!(
            e.kind,
            vdisk_core::ExtentKind::Data { location: vdisk_core::Location::Compressed(_), .. }
        )));
        // Renamed, it still opens: the embedded descriptor names the old file.
        let renamed = dir.path().join(format!("renamed{i}.img"));
        std::fs::rename(&p, &renamed).unwrap();
        let out = common::vdisk_convert(&renamed, &Default::default(), dir.path(), "out.raw", 1);
        assert_eq!(common::sha256_file(&out), common::sha256_file(&raw));
    }
}

/// The primary grain directory damaged (entries pointing past the end of the file): the
/// redundant one is used and the content is unchanged; `check` reports the damage.
#[test]
fn redundant_grain_directory_replaces_a_damaged_primary() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 80 << 20;
    let p = create(dir.path(), "rgd.vmdk", "subformat=monolithicSparse", size);
    fill(&p, size, 21, 50);
    let want = common::sha256_file(&common::qemu_convert(&p, "vmdk", dir.path(), "want.raw"));
    let mut bytes = std::fs::read(&p).unwrap();
    let gd = u64::from_le_bytes(bytes[56..64].try_into().unwrap()) as usize * 512;
    let rgd = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize * 512;
    assert!(rgd != 0 && gd != rgd);
    bytes[gd..gd + 4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let got = common::sha256_file(&common::vdisk_convert(&p, &Default::default(), dir.path(), "got.raw", 2));
    assert_eq!(got, want);
    let r = Image::open(&p, &Default::default()).unwrap().check().unwrap();
    assert!(r.corruptions > 0, "{:?}", r.problems);
    // Both copies damaged: a clean error naming the structure.
    bytes[rgd..rgd + 4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = Image::open(&p, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("grain directory"), "{e}");
}

/// Extents are references: denied by default, allowed beside the descriptor with same-dir, and an
/// extent named by absolute path is refused under same-dir (allowed under any).
#[test]
fn descriptor_extents_follow_the_reference_policy() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "pol.vmdk", "subformat=monolithicFlat", 1 << 20);
    qemu_io("vmdk", &p, &["write -P 9 0 4096".to_string()]);
    let e = Image::open(&p, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied);
    assert!(e.to_string().contains("pol-flat.vmdk"), "{e}");
    Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap();
    // info works without opening the extent.
    let info = Image::describe(&p, &Default::default()).unwrap();
    assert_eq!(info.virtual_size, 1 << 20);
    let text = std::fs::read_to_string(&p).unwrap();
    let abs = dir.path().join("pol-flat.vmdk");
    let p2 = dir.path().join("abs.vmdk");
    std::fs::write(&p2, text.replace("\"pol-flat.vmdk\"", &format!("\"{}\"", abs.display()))).unwrap();
    let e = Image::open(&p2, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    let img = Image::open(&p2, &common::opts(ReferencePolicy::Any)).unwrap();
    let mut b = [0u8; 8];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [9u8; 8]);
}
