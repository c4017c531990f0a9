//! The VHDX writer (`-O vhdx`) through the public export: sources generated at test time (random
//! data, written zero runs, holes, odd sizes; a qcow2 made by qemu-io) are exported as dynamic
//! and fixed VHDXs with several option sets; each output must pass `qemu-img check`, be identical
//! to the source under `qemu-img compare` and read back identically through vdisk's own reader
//! (the only reader for 4096-byte logical sectors, which qemu-img 10 does not open), and fit in
//! what `measure` reports.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};
use vdisk_core::{export, measure, ExportOptions, Image, OpenOptions, OutputFormat, Preset};

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

fn export_vhdx(src: &Path, out: &Path, options: &str) {
    let img = Image::open(src, &OpenOptions::default()).unwrap();
    let opts = ExportOptions {
        format: OutputFormat::Vhdx,
        options: pairs(options),
        threads: Some(3),
        ..ExportOptions::default()
    };
    export(&img, out, &opts).unwrap_or_else(|e| panic!("export -O vhdx -o {options}: {e}"));
}

/// qemu-img finds `out` identical to `src` (of format `src_fmt`), with the same size, and vdisk
/// reads the same content from both.
fn assert_same(src: &Path, src_fmt: &str, out: &Path) {
    let o = Command::new("qemu-img").args(["compare", "-f", src_fmt, "-F", "vhdx"]).arg(src).arg(out).output().unwrap();
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

/// `qemu-img check` finds no error and no leak.
fn assert_check_clean(out: &Path) {
    let o = Command::new("qemu-img").args(["check", "-f", "vhdx"]).arg(out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "qemu-img check {}: {text}{}", out.display(), String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("No errors were found"), "qemu-img check {}: {text}", out.display());
}

/// Payload block size, logical and physical sector size and the file parameters' flags, read
/// from the metadata region at `md` (items in the order Hyper-V and vdisk write them).
fn metadata(out: &Path, md: usize) -> (u32, u32, u32, u32) {
    let b = std::fs::read(out).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let items = md + (64 << 10);
    (u32_at(items), u32_at(items + 16), u32_at(items + 20), u32_at(items + 4))
}

#[test]
fn raw_source_exports_with_every_option_set() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = (70u64 << 20) + 3 * 512;
    let src = raw_source(dir.path(), size, 1);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    // (options, metadata region offset, block size, file parameter flags)
    let cases: &[(&str, usize, u32, u32)] = &[
        ("", 2 << 20, 32 << 20, 0),
        ("subformat=fixed", 2 << 20, 32 << 20, 1),
        ("block_size=1M,log_size=2M", 3 << 20, 1 << 20, 0),
        ("block_size=256M,block_state_zero=on", 2 << 20, 256 << 20, 0),
        ("subformat=fixed,block_size=8M,block_state_zero=on", 2 << 20, 8 << 20, 1),
    ];
    for (i, &(options, md, block, flags)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out-{i}.vhdx"));
        export_vhdx(&src, &out, options);
        assert_eq!(metadata(&out, md), (block, 512, 4096, flags), "{options}");
        assert_check_clean(&out);
        assert_same(&src, "raw", &out);
        let m = measure(&img, OutputFormat::Vhdx, &pairs(options)).unwrap();
        let meta = std::fs::metadata(&out).unwrap();
        assert!(meta.len() <= m.required && m.required <= m.fully_allocated, "{options}: {} {m:?}", meta.len());
        if flags == 1 {
            assert_eq!(meta.len(), m.fully_allocated, "{options}");
            assert!(meta.blocks() * 512 >= meta.len(), "{options}: the fixed VHDX is sparse");
        }
    }
}

#[test]
fn logical_4096_sectors_read_back_in_vdisk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 21u64 << 20;
    let src = raw_source(dir.path(), size, 2);
    let out = dir.path().join("4k.vhdx");
    export_vhdx(&src, &out, "logical_sector_size=4096,block_size=2M");
    assert_eq!(metadata(&out, 2 << 20), (2 << 20, 4096, 4096, 0));
    assert_eq!(content_hash(&out), content_hash(&src));
    // A size that is not whole 4 KiB sectors is rounded up to the next one, reading as zeros.
    let odd = raw_source(dir.path(), (3 << 20) + 512, 3);
    let out = dir.path().join("4k-odd.vhdx");
    export_vhdx(&odd, &out, "logical_sector_size=4096");
    let img = Image::open(&out, &OpenOptions::default()).unwrap();
    assert_eq!(img.virtual_size(), (3 << 20) + 4096);
    let mut tail = vec![1u8; 4096];
    img.read_at(&mut tail, 3 << 20).unwrap();
    let mut want = vec![0u8; 512];
    std::fs::File::open(&odd).unwrap().read_exact_at(&mut want, 3 << 20).unwrap();
    assert_eq!(&tail[..512], &want[..]);
    assert!(tail[512..].iter().all(|&b| b == 0));
}

#[test]
fn qcow2_source_and_the_hyperv_preset() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let size = 48u64 << 20;
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), &size.to_string()]);
    let mut rng = Rng::new(5);
    let cmds = random_io_commands(&mut rng, size, 65536, 80, false);
    for chunk in cmds.chunks(64) {
        qemu_io("qcow2", &src, chunk);
    }
    let (format, options) = Preset::Hyperv.resolve(None, &[]).unwrap();
    assert_eq!(format, OutputFormat::Vhdx);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let out = dir.path().join("hyperv.vhdx");
    export(&img, &out, &ExportOptions { format, options, ..ExportOptions::default() }).unwrap();
    assert_eq!(metadata(&out, 2 << 20), (32 << 20, 512, 4096, 0));
    assert_check_clean(&out);
    assert_same(&src, "qcow2", &out);
}

#[test]
fn bad_options_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_source(dir.path(), 1 << 20, 4);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let out = dir.path().join("bad.vhdx");
    for options in ["block_size=3M", "block_size=512M", "log_size=1536K", "logical_sector_size=1024", "compat=1.1"] {
        let opts = ExportOptions { format: OutputFormat::Vhdx, options: pairs(options), ..ExportOptions::default() };
        let e = export(&img, &out, &opts).unwrap_err();
        assert_eq!(e.kind(), vdisk_core::ErrorKind::Target, "{options}: {e}");
        assert!(!out.exists());
    }
}

#[test]
fn multi_terabyte_sparse_source() {
    // 3 TiB (past what a VHD can hold) with data at the start, around 2 TiB and at the very end:
    // the BAT spans three MiB of entries and sector bitmap entries interleave, and only three
    // blocks are stored.
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 3u64 << 40;
    let src = dir.path().join("big.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    let at = [0u64, (2 << 40) + (5 << 20), size - (1 << 20)];
    for (k, &a) in at.iter().enumerate() {
        f.write_all_at(&vec![k as u8 + 1; 1 << 20], a).unwrap();
    }
    let out = dir.path().join("big.vhdx");
    export_vhdx(&src, &out, "");
    let len = std::fs::metadata(&out).unwrap().len();
    // Header section, 1 MiB log, 1 MiB metadata, a 1 MiB BAT (98,304 + 767 entries), 3 blocks.
    assert_eq!(len, (4 << 20) + 3 * (32 << 20));
    assert_check_clean(&out);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "vhdx", "-r"]);
    for (k, &a) in at.iter().enumerate() {
        cmd.arg("-c").arg(format!("read -P {} {a} 1M", k + 1));
    }
    cmd.arg("-c").arg(format!("read -P 0 {} 1M", 1u64 << 40));
    let o = cmd.arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !text.contains("verification failed"), "{text}");
    let img = Image::open(&out, &OpenOptions::default()).unwrap();
    assert_eq!(img.virtual_size(), size);
    for (k, &a) in at.iter().enumerate() {
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, a).unwrap();
        assert!(buf.iter().all(|&b| b == k as u8 + 1), "at {a:#x}");
    }
    // A VHD cannot hold it.
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let opts = ExportOptions { format: OutputFormat::Vpc, ..ExportOptions::default() };
    let e = export(&img, dir.path().join("big.vhd"), &opts).unwrap_err();
    assert!(e.to_string().contains("2040 GiB"), "{e}");
}

#[test]
fn round_trip_through_vhd_and_back() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Whole 4 KiB sectors, so the 4K-sector hop keeps the size.
    let src = raw_source(dir.path(), (29u64 << 20) + 4096, 6);
    let hops = [
        ("a.vhd", OutputFormat::Vpc, ""),
        ("b.vhdx", OutputFormat::Vhdx, "block_size=1M"),
        ("c.vhd", OutputFormat::Vpc, "subformat=fixed"),
        ("d.vhdx", OutputFormat::Vhdx, "subformat=fixed,logical_sector_size=4096"),
        ("e.vhdx", OutputFormat::Vhdx, ""),
    ];
    let mut from = src.clone();
    for (name, format, options) in hops {
        let out = dir.path().join(name);
        let img = Image::open(&from, &OpenOptions::default()).unwrap();
        export(&img, &out, &ExportOptions { format, options: pairs(options), ..ExportOptions::default() })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(content_hash(&out), content_hash(&src), "{name}");
        from = out;
    }
    assert_same(&src, "raw", &from);
}
