//! The qcow2 writer against qemu-img: sources generated at test time (random data, explicit zero
//! runs, holes, an odd size; a qcow2 with compressed and zero clusters made by qemu-io) are
//! exported with several option sets; each output must pass `qemu-img check`, be identical to the
//! source under `qemu-img compare`, and read back identically through vdisk's own reader; and
//! `measure` must report what `qemu-img measure` reports.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};
use vdisk_core::{export, measure, measure_size, ExportOptions, Image, OpenOptions, OutputFormat};

/// A raw source of `size` bytes: random (incompressible) runs, repetitive (compressible) runs,
/// written zero runs (data to the file system, zero content) and holes.
fn raw_source(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let path = dir.join(format!("src-{seed}.raw"));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut pos = 0;
    while pos < size {
        let len = (rng.below(3 << 20) + 1).min(size - pos);
        let n = usize::try_from(len).unwrap();
        match rng.below(4) {
            0 => {
                let buf: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                f.write_all_at(&buf, pos).unwrap();
            }
            1 => {
                let text = b"compressible text, repeated many times over. ";
                let buf: Vec<u8> = (0..n).map(|i| text[i % text.len()]).collect();
                f.write_all_at(&buf, pos).unwrap();
            }
            2 => f.write_all_at(&vec![0u8; n], pos).unwrap(),
            _ => {}
        }
        pos += len;
    }
    path
}

/// sha256 of an image's guest content as vdisk reads it.
fn content_hash(path: &Path) -> String {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < img.virtual_size() {
        let n = img.read_at(&mut buf, at).unwrap();
        h.update(&buf[..n]);
        at += n as u64;
    }
    hex(&h.finalize())
}

/// Random qemu-io writes into a qcow2 (compressed ones after a discard, as qemu needs).
fn scribble(path: &Path, seed: u64, size: u64) {
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for cmd in random_io_commands(&mut rng, size, 65536, 100, true) {
        if let Some(rest) = cmd.strip_prefix("write -c ") {
            let mut words = rest.split(' ').skip(2);
            let (off, len) = (words.next().unwrap(), words.next().unwrap());
            cmds.push(format!("discard {off} {len}"));
        }
        cmds.push(cmd);
    }
    for chunk in cmds.chunks(64) {
        qemu_io("qcow2", path, chunk);
    }
}

fn pairs(text: &str) -> Vec<(String, String)> {
    vdisk_core::parse_option_pairs(text).unwrap()
}

fn export_qcow2(src: &Path, out: &Path, options: &str, compress: bool) {
    let img = Image::open(src, &OpenOptions::default()).unwrap();
    let opts = ExportOptions {
        format: OutputFormat::Qcow2,
        options: pairs(options),
        compress,
        threads: Some(3),
        ..ExportOptions::default()
    };
    export(&img, out, &opts).unwrap_or_else(|e| panic!("export {options} -c={compress}: {e}"));
}

/// `qemu-img check` finds no error and no leak.
fn assert_check_clean(out: &Path) {
    let o = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "qemu-img check {}: {text}{}", out.display(), String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("No errors were found"), "qemu-img check {}: {text}", out.display());
}

fn assert_same(src: &Path, src_fmt: &str, out: &Path) {
    let o =
        Command::new("qemu-img").args(["compare", "-f", src_fmt, "-F", "qcow2"]).arg(src).arg(out).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}",
        src.display(),
        out.display(),
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(content_hash(out), content_hash(src), "vdisk reads {} differently", out.display());
}

fn header_field(out: &Path) -> (u32, u32, u64) {
    let bytes = std::fs::read(out).unwrap();
    let version = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let incompat = if version >= 3 { u64::from_be_bytes(bytes[72..80].try_into().unwrap()) } else { 0 };
    (version, cluster_bits, incompat)
}

#[test]
fn raw_source_exports_with_every_option_set() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // An odd size: not a multiple of any cluster size above 512.
    let src = raw_source(dir.path(), (23 << 20) + 3 * 512, 1);
    let cases: &[(&str, bool, u32, u32, u64)] = &[
        ("", false, 3, 16, 0),
        ("", true, 3, 16, 0),
        ("compression_type=zstd", true, 3, 16, 8),
        ("compat=0.10", false, 2, 16, 0),
        ("compat=0.10", true, 2, 16, 0),
        ("cluster_size=512", false, 3, 9, 0),
        ("cluster_size=512", true, 3, 9, 0),
        ("cluster_size=4k", true, 3, 12, 0),
        ("cluster_size=2M", false, 3, 21, 0),
        ("cluster_size=2M,compression_type=zstd", true, 3, 21, 8),
    ];
    for (i, &(options, compress, version, bits, incompat)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out-{i}.qcow2"));
        export_qcow2(&src, &out, options, compress);
        assert_eq!(header_field(&out), (version, bits, incompat), "{options} -c={compress}");
        assert_check_clean(&out);
        assert_same(&src, "raw", &out);
        // Never larger than measure's bound; compressed output well below it.
        let img = Image::open(&src, &OpenOptions::default()).unwrap();
        let m = measure(&img, OutputFormat::Qcow2, &pairs(options)).unwrap();
        let len = std::fs::metadata(&out).unwrap().len();
        assert!(len <= m.required, "{options} -c={compress}: {len} > required {}", m.required);
    }
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("vdisk-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn qcow2_source_with_compressed_and_zero_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let size = 48u64 << 20;
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", src.to_str().unwrap(), &size.to_string()]);
    scribble(&src, 7, size);
    for (i, (options, compress)) in [("", false), ("", true), ("cluster_size=8k,compat=0.10", true)].iter().enumerate()
    {
        let out = dir.path().join(format!("out-{i}.qcow2"));
        export_qcow2(&src, &out, options, *compress);
        assert_check_clean(&out);
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&src)
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "compare: {}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(content_hash(&out), content_hash(&src));
    }
}

#[test]
fn empty_and_tiny_disks() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for size in [512u64, 65536 + 512, 1 << 20] {
        let src = dir.path().join(format!("empty-{size}.raw"));
        std::fs::File::create(&src).unwrap().set_len(size).unwrap();
        let out = dir.path().join(format!("empty-{size}.qcow2"));
        export_qcow2(&src, &out, "", true);
        assert_check_clean(&out);
        assert_same(&src, "raw", &out);
    }
}

fn qemu_measure(args: &[&str]) -> (u64, u64) {
    let mut all = vec!["measure", "--output", "json"];
    all.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&qemu_img(&all)).unwrap();
    (v["required"].as_u64().unwrap(), v["fully-allocated"].as_u64().unwrap())
}

#[test]
fn measure_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path(), (23 << 20) + 3 * 512, 3);
    let sparse = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(5 << 30).unwrap();
    f.write_all_at(&[1u8; 70000], 3 << 30).unwrap();
    f.write_all_at(&[2u8; 4096], 100 << 20).unwrap();
    let q = dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "64M"]);
    scribble(&q, 11, 64 << 20);
    for src in [&raw, &sparse, &q] {
        let img = Image::open(src, &OpenOptions::default()).unwrap();
        for options in ["", "cluster_size=512", "cluster_size=2M", "compat=0.10,cluster_size=4k"] {
            let mut args = vec!["-O", "qcow2"];
            if !options.is_empty() {
                args.extend(["-o", options]);
            }
            args.push(src.to_str().unwrap());
            let (required, fully) = qemu_measure(&args);
            let m = measure(&img, OutputFormat::Qcow2, &pairs(options)).unwrap();
            assert_eq!((m.required, m.fully_allocated), (required, fully), "{} {options}", src.display());
        }
        let m = measure(&img, OutputFormat::Raw, &[]).unwrap();
        let (required, fully) = qemu_measure(&["-O", "raw", src.to_str().unwrap()]);
        assert_eq!(m.fully_allocated, fully);
        // qemu counts a raw output as fully required whatever the source holds.
        assert_eq!(m.required, required);
    }
    for size in [1u64 << 20, 1 << 30, (100 << 30) + 512, 2 << 40] {
        let (required, fully) = qemu_measure(&["-O", "qcow2", "--size", &size.to_string()]);
        let m = measure_size(size, OutputFormat::Qcow2, &[]).unwrap();
        assert_eq!((m.required, m.fully_allocated), (required, fully), "--size {size}");
    }
}

#[test]
fn refusals_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    // Exporting onto the source is refused.
    let opts = ExportOptions { format: OutputFormat::Qcow2, ..ExportOptions::default() };
    let e = export(&img, &src, &opts).unwrap_err();
    assert_eq!(e.kind(), vdisk_core::ErrorKind::Target, "{e}");
    // A bad option names itself.
    let opts = ExportOptions { options: pairs("cluster_size=3k"), ..ExportOptions::default() };
    let e = export(&img, dir.path().join("x.qcow2"), &opts).unwrap_err();
    assert!(e.to_string().contains("cluster_size"), "{e}");
    // A cancelled export leaves neither the target nor a temporary file.
    let cancel = std::sync::atomic::AtomicBool::new(true);
    let opts = ExportOptions { cancel: Some(&cancel), ..ExportOptions::default() };
    let e = export(&img, dir.path().join("c.qcow2"), &opts).unwrap_err();
    assert_eq!(e.kind(), vdisk_core::ErrorKind::Cancelled, "{e}");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["src.raw".to_string()]);
}
