//! Backing files and external data files under the reference policy: refused by default,
//! allowed beside the image with SameDir, json: names refused always, loops and deep chains
//! refused with an error (never a hang).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vdisk_core::{ErrorKind, Image, Limits, MemSource, OpenOptions, ReferencePolicy};

fn qemu_in(dir: &Path, args: &[&str]) {
    common::run(Command::new("qemu-img").args(args).current_dir(dir));
}

fn opts(references: ReferencePolicy) -> OpenOptions {
    common::opts(references)
}

/// Point the backing file name of the qcow2 image at `path` to `name` (stored at 0x1000 in the
/// first cluster).
fn set_backing_name(path: &Path, name: &str) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[8..16].copy_from_slice(&0x1000u64.to_be_bytes());
    bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    bytes[0x1000..0x1000 + name.len()].copy_from_slice(name.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn backing_file_denied_by_default_allowed_same_dir() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_in(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    common::qemu_io("qcow2", &d.join("base.qcow2"), &["write -P 7 0 64k".into()]);
    qemu_in(d, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let top = d.join("top.qcow2");
    let e = Image::open(&top, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    assert!(e.to_string().contains("base.qcow2"), "{e}");
    // Describing needs no reference.
    let info = Image::describe(&top, &OpenOptions::default()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("base.qcow2"));
    assert_eq!(info.backing_filename_format.as_deref(), Some("qcow2"));
    // SameDir opens it and reads through it.
    let img = Image::open(&top, &opts(ReferencePolicy::SameDir)).unwrap();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 512]);
    assert_eq!(img.files().count(), 2);
    // An image read from memory can open nothing.
    let bytes: Arc<[u8]> = std::fs::read(&top).unwrap().into();
    let e = Image::from_source(Arc::new(MemSource(bytes)), &opts(ReferencePolicy::Any)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
}

#[test]
fn json_backing_names_are_refused_even_under_any() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_in(d, &["create", "-q", "-f", "qcow2", "top.qcow2", "4M"]);
    let top = d.join("top.qcow2");
    set_backing_name(&top, r#"json:{"driver":"file","filename":"/etc/passwd"}"#);
    for policy in [ReferencePolicy::SameDir, ReferencePolicy::Any] {
        let e = Image::open(&top, &opts(policy)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
        assert!(e.to_string().contains("json:"), "{e}");
    }
    // An absolute name is refused under SameDir.
    set_backing_name(&top, "/etc/hostname");
    let e = Image::open(&top, &opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
}

#[test]
fn backing_loops_are_errors() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_in(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_in(d, &["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"]);
    qemu_in(d, &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    for name in ["a.qcow2", "b.qcow2"] {
        let e = Image::open(d.join(name), &opts(ReferencePolicy::SameDir)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
        assert!(e.to_string().contains("loop"), "{e}");
    }
    // An image that is its own backing file.
    qemu_in(d, &["create", "-q", "-f", "qcow2", "self.qcow2", "4M"]);
    set_backing_name(&d.join("self.qcow2"), "self.qcow2");
    let e = Image::open(d.join("self.qcow2"), &opts(ReferencePolicy::SameDir)).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
}

#[test]
fn deep_chains_hit_the_limit() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_in(d, &["create", "-q", "-f", "qcow2", "c0.qcow2", "1M"]);
    for i in 1..5 {
        let (b, t) = (format!("c{}.qcow2", i - 1), format!("c{i}.qcow2"));
        qemu_in(d, &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &t]);
    }
    let mut o = opts(ReferencePolicy::SameDir);
    Image::open(d.join("c4.qcow2"), &o).unwrap();
    o.limits = Limits::default();
    o.limits.max_chain_depth = 3;
    let e = Image::open(d.join("c4.qcow2"), &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
}

#[test]
fn missing_backing_file_is_an_io_error() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_in(d, &["create", "-q", "-f", "qcow2", "top.qcow2", "4M"]);
    set_backing_name(&d.join("top.qcow2"), "missing.raw");
    let e = Image::open(d.join("top.qcow2"), &opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("missing.raw"), "{e}");
}
