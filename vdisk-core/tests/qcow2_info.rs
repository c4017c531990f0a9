//! `describe` of qcow2 images against `qemu-img info --output json` (ignoring `children` and
//! `actual-size`), for the variants qemu-img can make.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vdisk_core::{Image, OpenOptions};

/// Run `qemu-img ARGS` inside `dir`.
fn qemu_in(dir: &Path, args: &[&str]) -> String {
    common::run(Command::new("qemu-img").args(args).current_dir(dir))
}

fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    qemu_in(dir, &args);
    dir.join(name)
}

fn io(dir: &Path, path: &Path, cmds: &[&str]) -> bool {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(path).output().unwrap().status.success()
}

fn strip(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("children");
        m.remove("actual-size");
    }
    v
}

/// vdisk's info JSON equals qemu-img's (run with the same file name, from the same directory).
fn assert_info_matches(dir: &Path, name: &str) {
    let theirs: Value =
        serde_json::from_str(&qemu_in(dir, &["info", "-f", "qcow2", "--output", "json", "-U", name])).unwrap();
    // vdisk reports the file name as given; give the same name qemu-img got.
    let ours = Image::describe(dir.join(name), &OpenOptions::default()).unwrap();
    let mut ours: Value = serde_json::from_str(&ours.to_json()).unwrap();
    ours["filename"] = Value::String(name.to_string());
    if let Some(full) = ours.get("full-backing-filename").and_then(Value::as_str) {
        let rel = full.strip_prefix(&format!("{}/", dir.display())).unwrap_or(full).to_string();
        ours["full-backing-filename"] = Value::String(rel);
    }
    assert_eq!(strip(ours), strip(theirs), "{name}");
}

#[test]
fn info_matches_qemu_for_many_variants() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, &str, &str)] = &[
        ("v3.qcow2", "64M", ""),
        ("v2.qcow2", "10M", "compat=0.10"),
        ("zstd.qcow2", "1G", "compression_type=zstd,extended_l2=on,lazy_refcounts=on,refcount_bits=8"),
        ("small.qcow2", "3M", "cluster_size=512,refcount_bits=1"),
        ("big.qcow2", "5G", "cluster_size=2M,refcount_bits=64"),
        ("data.qcow2", "4M", "data_file=data.bin"),
        ("dataraw.qcow2", "4M", "data_file=dataraw.bin,data_file_raw=on"),
    ];
    for (name, size, opts) in cases {
        let p = create(d, name, size, opts);
        assert!(io(d, &p, &["write -P 3 0 64k"]));
        assert_info_matches(d, name);
    }
}

#[test]
fn info_matches_qemu_with_backing_snapshots_bitmaps_and_dirt() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "base.qcow2", "8M", "");
    qemu_in(d, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "over.qcow2"]);
    assert_info_matches(d, "over.qcow2");
    qemu_in(d, &["create", "-q", "-f", "raw", "base.raw", "1M"]);
    qemu_in(d, &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "over2.qcow2"]);
    assert_info_matches(d, "over2.qcow2");

    let p = create(d, "snaps.qcow2", "16M", "");
    assert!(io(d, &p, &["write -P 1 0 1M"]));
    qemu_in(d, &["snapshot", "-c", "one", "snaps.qcow2"]);
    assert!(io(d, &p, &["write -P 2 0 64k"]));
    qemu_in(d, &["snapshot", "-c", "two two", "snaps.qcow2"]);
    assert_info_matches(d, "snaps.qcow2");

    let p = create(d, "bitmaps.qcow2", "4M", "");
    qemu_in(d, &["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    qemu_in(d, &["bitmap", "--add", "-g", "1M", "--disable", "bitmaps.qcow2", "b one"]);
    assert!(io(d, &p, &["write -P 5 0 192k"]));
    assert_info_matches(d, "bitmaps.qcow2");
    // Killed while open: bitmaps stay in use and (with lazy refcounts) the image is dirty.
    let p = create(d, "dirty.qcow2", "4M", "lazy_refcounts=on");
    qemu_in(d, &["bitmap", "--add", "dirty.qcow2", "auto"]);
    assert!(!io(d, &p, &["write -P 5 0 64k", "sigraise 9"]));
    let info = Image::describe(&p, &OpenOptions::default()).unwrap();
    assert!(info.dirty_flag);
    assert_info_matches(d, "dirty.qcow2");

    // The corrupt bit (incompatible bit 1) is reported.
    let p = create(d, "corrupt.qcow2", "4M", "");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[79] |= 2;
    std::fs::write(&p, bytes).unwrap();
    assert_info_matches(d, "corrupt.qcow2");
    let info = Image::describe(&p, &OpenOptions::default()).unwrap();
    assert_eq!(info.format_specific.unwrap()["data"]["corrupt"], Value::Bool(true));
}

/// Encrypted images are described (as qemu-img info does, without a key) but never opened for
/// reading: the error names the encryption.
#[test]
fn encrypted_images_are_described_but_refused() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        ("luks.qcow2", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "LUKS"),
        (
            "luks-essiv.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,\
             encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
            "LUKS",
        ),
        ("aes.qcow2", "encrypt.format=aes,encrypt.key-secret=sec0", "AES"),
    ];
    for (name, opts, method) in cases {
        qemu_in(d, &["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o", opts, name, "1M"]);
        assert_info_matches(d, name);
        let info = Image::describe(d.join(name), &OpenOptions::default()).unwrap();
        assert_eq!(info.encrypted, Some(true));
        let e = Image::open(d.join(name), &OpenOptions::default()).unwrap_err();
        assert_eq!(e.kind(), vdisk_core::ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains(method) && e.to_string().contains("encrypt"), "{e}");
    }
}
