//! The VHD writer (`-O vpc`) through the public export: sources generated at test time (random
//! data, written zero runs, holes, odd sizes; a qcow2 made by qemu-io) are exported as fixed and
//! dynamic VHDs; each output must be identical to the source under `qemu-img compare`, read back
//! identically through vdisk's own reader, have exactly the size asked (a fixed VHD is the disk
//! plus its 512-byte footer, never rounded to a CHS geometry) and fit in what `measure` reports.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};
use vdisk_core::{export, measure, ExportOptions, Image, OpenOptions, OutputFormat};

/// A raw source of `size` bytes: random runs, written zero runs (data to the file system, zero
/// content) and holes.
fn raw_source(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let path = dir.join(format!("src-{seed}.raw"));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut pos = 0;
    while pos < size {
        let len = (rng.below(5 << 20) + 1).min(size - pos);
        let n = usize::try_from(len).unwrap();
        match rng.below(3) {
            0 => {
                let buf: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                f.write_all_at(&buf, pos).unwrap();
            }
            1 => f.write_all_at(&vec![0u8; n], pos).unwrap(),
            _ => {}
        }
        pos += len;
    }
    path
}

/// sha256 of an image's guest content as vdisk reads it, and its virtual size.
fn content_hash(path: &Path) -> (String, u64) {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < img.virtual_size() {
        let n = img.read_at(&mut buf, at).unwrap();
        h.update(&buf[..n]);
        at += n as u64;
    }
    (hex(&h.finalize()), img.virtual_size())
}

fn pairs(text: &str) -> Vec<(String, String)> {
    vdisk_core::parse_option_pairs(text).unwrap()
}

fn export_vpc(src: &Path, out: &Path, options: &str) {
    let img = Image::open(src, &OpenOptions::default()).unwrap();
    let opts = ExportOptions {
        format: OutputFormat::Vpc,
        options: pairs(options),
        threads: Some(3),
        ..ExportOptions::default()
    };
    export(&img, out, &opts).unwrap_or_else(|e| panic!("export -O vpc -o {options}: {e}"));
}

/// qemu-img finds `out` identical to `src` (of format `src_fmt`), with the same size, and vdisk
/// reads the same content from both.
fn assert_same(src: &Path, src_fmt: &str, out: &Path) {
    let o = Command::new("qemu-img").args(["compare", "-f", src_fmt, "-F", "vpc"]).arg(src).arg(out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !text.contains("size mismatch"),
        "qemu-img compare {} {}: {text}{}",
        src.display(),
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(content_hash(out), content_hash(src), "vdisk reads {} differently", out.display());
}

fn qemu_virtual_size(out: &Path) -> u64 {
    let info = qemu_img(&["info", "-f", "vpc", "--output", "json", out.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn fixed_100_mib_is_exactly_100_mib_plus_the_footer() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 100u64 << 20;
    let src = raw_source(dir.path(), size, 1);
    let out = dir.path().join("fixed.vhd");
    export_vpc(&src, &out, "subformat=fixed");
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), size + 512, "qemu-img without force_size would write 104,865,792 + 512 bytes");
    assert!(meta.blocks() * 512 >= meta.len(), "the fixed VHD is sparse");
    assert_eq!(qemu_virtual_size(&out), size);
    assert_eq!(Image::open(&out, &OpenOptions::default()).unwrap().virtual_size(), size);
    assert_same(&src, "raw", &out);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let m = measure(&img, OutputFormat::Vpc, &pairs("subformat=fixed")).unwrap();
    assert_eq!((m.required, m.fully_allocated), (size + 512, size + 512));
    // force_size changes nothing: the size is always exact.
    let forced = dir.path().join("forced.vhd");
    export_vpc(&src, &forced, "subformat=fixed,force_size=on");
    assert_eq!(std::fs::metadata(&forced).unwrap().len(), size + 512);
}

#[test]
fn dynamic_odd_sizes_and_measure() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [(37u64 << 20) + 3 * 512, 6 << 20, 512].into_iter().enumerate() {
        let src = raw_source(dir.path(), size, 10 + i as u64);
        let out = dir.path().join(format!("dynamic-{i}.vhd"));
        export_vpc(&src, &out, "");
        assert_eq!(qemu_virtual_size(&out), size);
        assert_same(&src, "raw", &out);
        let img = Image::open(&src, &OpenOptions::default()).unwrap();
        let m = measure(&img, OutputFormat::Vpc, &[]).unwrap();
        let len = std::fs::metadata(&out).unwrap().len();
        assert!(len <= m.required && m.required <= m.fully_allocated, "{len} {m:?}");
        let report = Image::check_file(&out, &OpenOptions::default()).unwrap();
        assert_eq!(report.corruptions, 0);
    }
}

#[test]
fn qcow2_source_to_both_subformats() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let size = 40u64 << 20;
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), &size.to_string()]);
    let mut rng = Rng::new(5);
    let cmds = random_io_commands(&mut rng, size, 65536, 80, false);
    for chunk in cmds.chunks(64) {
        qemu_io("qcow2", &src, chunk);
    }
    for subformat in ["fixed", "dynamic"] {
        let out = dir.path().join(format!("{subformat}.vhd"));
        export_vpc(&src, &out, &format!("subformat={subformat}"));
        assert_same(&src, "qcow2", &out);
    }
}

#[test]
fn bad_options_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_source(dir.path(), 1 << 20, 3);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let out = dir.path().join("bad.vhd");
    for options in ["subformat=differencing", "force_size=maybe", "cluster_size=64k"] {
        let opts = ExportOptions { format: OutputFormat::Vpc, options: pairs(options), ..ExportOptions::default() };
        let e = export(&img, &out, &opts).unwrap_err();
        assert_eq!(e.kind(), vdisk_core::ErrorKind::Target, "{options}: {e}");
        assert!(!out.exists());
    }
}

#[test]
fn azure_preset_is_a_whole_mib_fixed_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let size = (30u64 << 20) + 512;
    let src = raw_source(dir.path(), size, 20);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let (format, options) = vdisk_core::Preset::Azure.resolve(None, &[]).unwrap();
    assert_eq!(format, OutputFormat::Vpc);
    let opts = ExportOptions { format, options, preset: Some(vdisk_core::Preset::Azure), ..ExportOptions::default() };
    // Not a whole MiB: refused, naming the explicit way to grow it, and nothing is written.
    let out = dir.path().join("azure.vhd");
    let e = export(&img, &out, &opts).unwrap_err();
    assert!(e.to_string().contains("--round-up-mib"), "{e}");
    assert!(!out.exists());
    // Grown on request: 31 MiB + the footer, a fixed disk whose footer says exactly 31 MiB.
    export(&img, &out, &ExportOptions { round_up_mib: true, ..opts }).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let grown = 31u64 << 20;
    assert_eq!(bytes.len() as u64, grown + 512);
    let footer = &bytes[grown as usize..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!((&footer[28..32], &footer[36..40]), (&b"vdsk"[..], &b"Wi2k"[..]));
    assert_eq!(u64::from_be_bytes(footer[40..48].try_into().unwrap()), grown, "original size");
    assert_eq!(u64::from_be_bytes(footer[48..56].try_into().unwrap()), grown, "current size");
    assert_eq!(u32::from_be_bytes(footer[60..64].try_into().unwrap()), 2, "fixed");
    // The source's bytes, then zeros.
    let original = std::fs::read(&src).unwrap();
    assert!(bytes[..size as usize] == original[..], "the disk's content moved");
    assert!(bytes[size as usize..grown as usize].iter().all(|&b| b == 0));
    if have_qemu() {
        assert_eq!(qemu_virtual_size(&out), grown);
    }
}
