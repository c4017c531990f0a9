//! Hostile and malformed qcow2 images: every header field and table pointer is validated at
//! open (or, for L2 entries, when mapped), with errors that name the structure and offset; no
//! input panics, hangs or allocates without bound.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vdisk_core::{Error, ErrorKind, Image, Limits, MemSource, OpenOptions};

/// A small qcow2 image made by qemu-img: 4 KiB clusters, some data, a compressed cluster, a
/// zero cluster and a snapshot.
fn sample(dir: &Path, opts: &str) -> Vec<u8> {
    let cluster: u64 =
        opts.split(',').find_map(|o| o.strip_prefix("cluster_size=")).map_or(65536, |c| c.parse().unwrap());
    let p = dir.join(format!("sample-{}.qcow2", opts.replace([',', '='], "_")));
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = p.to_str().unwrap();
    args.extend([ps, "1M"]);
    common::qemu_img(&args);
    common::qemu_io(
        "qcow2",
        &p,
        &[
            "write -P 1 0 64k".into(),
            format!("write -c -P 2 {} {cluster}", 128 * 1024),
            "write -z 192k 8k".into(),
            "write -P 3 900k 12k".into(),
        ],
    );
    common::qemu_img(&["snapshot", "-c", "s", ps]);
    common::qemu_io("qcow2", &p, &["write -P 4 8k 4k".into()]);
    std::fs::read(&p).unwrap()
}

fn open_bytes(bytes: &[u8]) -> Result<Image, Error> {
    let src: Arc<[u8]> = bytes.into();
    Image::from_source(Arc::new(MemSource(src)), &OpenOptions::default())
}

/// Open, map everything and read everything; the first error.
fn read_all(bytes: &[u8]) -> Result<(), Error> {
    let img = open_bytes(bytes)?;
    for e in img.extents() {
        e?;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < img.virtual_size().min(4 << 20) {
        off += img.read_at(&mut buf, off)? as u64;
    }
    Ok(())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn with(bytes: &[u8], at: usize, value: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.len() < at + value.len() {
        b.resize(at + value.len(), 0);
    }
    b[at..at + value.len()].copy_from_slice(value);
    b
}

fn expect_err(bytes: &[u8], kind: ErrorKind, needle: &str) {
    let e = read_all(bytes).err().unwrap_or_else(|| panic!("expected an error containing '{needle}'"));
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(needle), "'{e}' lacks '{needle}'");
}

#[test]
fn header_fields_are_validated() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), "cluster_size=4096");
    read_all(&good).unwrap();
    let v = |x: u32| x.to_be_bytes();
    let q = |x: u64| x.to_be_bytes();
    use ErrorKind::*;
    expect_err(&with(&good, 4, &v(1)), Unsupported, "version 1");
    let forced = OpenOptions { format: Some(vdisk_core::Format::Qcow2), ..OpenOptions::default() };
    let src: Arc<[u8]> = with(&good, 4, &v(1)).into();
    let e = Image::from_source(Arc::new(MemSource(src)), &forced).unwrap_err();
    assert!(e.to_string().contains("qcow version 1"), "{e}");
    expect_err(&with(&good, 4, &v(4)), Unsupported, "version 4");
    expect_err(&with(&good, 20, &v(8)), InvalidImage, "cluster_bits 8");
    expect_err(&with(&good, 20, &v(22)), InvalidImage, "cluster_bits 22");
    expect_err(&with(&good, 32, &v(1)), Unsupported, "AES");
    expect_err(&with(&good, 32, &v(2)), InvalidImage, "LUKS");
    expect_err(&with(&good, 32, &v(3)), Unsupported, "encryption method 3");
    expect_err(&with(&good, 72, &q(1 << 9)), Unsupported, "bit 9");
    expect_err(&with(&good, 100, &v(96)), InvalidImage, "header_length");
    expect_err(&with(&good, 100, &v(8192)), InvalidImage, "header_length");
    expect_err(&with(&good, 96, &v(7)), InvalidImage, "refcount_order");
    expect_err(&with(&good, 104, &[2]), Unsupported, "compression type 2");
    expect_err(&with(&good, 104, &[1]), InvalidImage, "compression type");
    expect_err(&with(&good, 72, &q(1 << 3)), InvalidImage, "compression type");
    expect_err(&with(&good, 72, &q(1 << 2)), InvalidImage, "data file");
    expect_err(&with(&good, 72, &q(1 << 4)), InvalidImage, "subclusters");
    expect_err(&with(&good, 88, &q(1 << 1)), InvalidImage, "data-file-raw");
    expect_err(&with(&good, 56, &v(0)), InvalidImage, "refcount table");
    expect_err(&with(&good, 56, &v(1 << 20)), InvalidImage, "refcount table");
    expect_err(&with(&good, 48, &q(0x1234)), InvalidImage, "refcount table at 0x1234");
    expect_err(&with(&good, 36, &v(0)), InvalidImage, "L1 table");
    expect_err(&with(&good, 36, &v(1 << 23)), InvalidImage, "L1 table");
    expect_err(&with(&good, 40, &q(0x1008)), InvalidImage, "L1 table at 0x1008");
    expect_err(&with(&good, 40, &q(1 << 40)), InvalidImage, "L1 table at 0x10000000000");
    expect_err(&with(&good, 24, &q(1 << 50)), LimitExceeded, "virtual size");
    expect_err(&with(&good, 60, &v(65537)), InvalidImage, "snapshot table");
    expect_err(&with(&good, 64, &q(0x1200)), InvalidImage, "snapshot table at 0x1200");
    expect_err(&with(&good, 64, &q(1 << 40)), InvalidImage, "snapshot table at 0x10000000000");
    // A backing file name offset outside the first cluster, and a name that is too long.
    expect_err(&with(&good, 8, &q(8192)), InvalidImage, "backing file name offset");
    let long = with(&with(&good, 8, &q(1024)), 16, &v(1024));
    expect_err(&long, InvalidImage, "backing file name");
    // A header extension running past the first cluster.
    let ext = with(&good, 112, &[0x12, 0x34, 0x56, 0x78, 0, 0, 0x20, 0]);
    expect_err(&ext, InvalidImage, "header extension at 0x70");
    // Truncated header.
    expect_err(&good[..50], InvalidImage, "qcow2 header");
}

#[test]
fn unknown_features_are_named_from_the_feature_table() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), "cluster_size=4096");
    // A feature name table extension naming incompatible bit 5, right after the header.
    let start = be32(&good, 100) as usize;
    assert_eq!(be64(&good, start), 0, "qemu wrote no extensions");
    let mut ext = vec![0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 48, 0, 5];
    ext.extend_from_slice(b"time travel");
    ext.resize(8 + 48, 0);
    let named = with(&good, start, &ext);
    read_all(&named).unwrap();
    expect_err(&with(&named, 72, &(1u64 << 5).to_be_bytes()), ErrorKind::Unsupported, "time travel");
    expect_err(&with(&named, 72, &(1u64 << 6).to_be_bytes()), ErrorKind::Unsupported, "bit 6");
    // Unknown extensions are skipped.
    let unknown = with(&named, start + 56, &[0xab, 0xcd, 0xef, 0x01, 0, 0, 0, 3, b'x', b'y', b'z', 0, 0, 0, 0, 0]);
    read_all(&unknown).unwrap();
}

#[test]
fn table_pointers_are_validated_when_mapped() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), "cluster_size=4096");
    let l1 = be64(&good, 40) as usize;
    let l2 = (be64(&good, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    use ErrorKind::*;
    // L2 table unaligned, or past the end of the file.
    expect_err(
        &with(&good, l1, &((1u64 << 63) | (l2 as u64 + 512)).to_be_bytes()),
        InvalidImage,
        "not cluster aligned",
    );
    expect_err(&with(&good, l1, &((1u64 << 63) | (1 << 40)).to_be_bytes()), InvalidImage, "L2 table at 0x10000000000");
    // A data cluster that is unaligned.
    let e = be64(&good, l2);
    expect_err(&with(&good, l2, &(e + 512).to_be_bytes()), InvalidImage, "L2 table at");
    // A data cluster past the end of the file reads as zeros, as in qemu.
    let past = with(&good, l2, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let img = open_bytes(&past).unwrap();
    let mut buf = [1u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 4096]);
    // A zero flag in a version 2 image.
    let v2 = sample(dir.path(), "cluster_size=4096,compat=0.10");
    let l1 = be64(&v2, 40) as usize;
    let l2 = (be64(&v2, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(&v2, l2);
    expect_err(&with(&v2, l2, &(e | 1).to_be_bytes()), InvalidImage, "version 2");
    // Extended L2: a subcluster both allocated and zero; allocated subclusters without a cluster.
    let ext = sample(dir.path(), "cluster_size=16384,extended_l2=on");
    let l1 = be64(&ext, 40) as usize;
    let l2 = (be64(&ext, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    expect_err(&with(&ext, l2 + 8, &[0, 0, 0, 1, 0, 0, 0, 1]), InvalidImage, "both allocated and zero");
    let free = 16 * 30;
    assert_eq!(be64(&ext, l2 + free), 0);
    expect_err(&with(&ext, l2 + free + 8, &[0, 0, 0, 0, 0, 0, 0, 1]), InvalidImage, "unallocated cluster");
}

#[test]
fn the_metadata_budget_bounds_tables() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    common::qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p.to_str().unwrap(), "4G"]);
    let mut o = OpenOptions::default();
    o.limits.max_metadata_bytes = 4096;
    let e = Image::open(&p, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    assert!(e.to_string().contains("L1 table"), "{e}");
    o.limits = Limits::default();
    o.limits.max_table_entries = 1000;
    let e = Image::open(&p, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    Image::open(&p, &OpenOptions::default()).unwrap();
}

/// Random byte corruption of real images: errors are fine, panics and hangs are not.
#[test]
fn random_corruption_never_panics() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let samples = [
        sample(dir.path(), "cluster_size=4096"),
        sample(dir.path(), "cluster_size=16384,extended_l2=on,compression_type=zstd"),
        sample(dir.path(), "cluster_size=512,compat=0.10"),
        sample(dir.path(), "cluster_size=1024,refcount_bits=2"),
    ];
    let mut rng = common::Rng::new(0x9c0b2);
    let mut opened = 0;
    for i in 0..1500 {
        let good = &samples[i % samples.len()];
        let mut b = good.clone();
        for _ in 0..rng.below(4) + 1 {
            // Mostly metadata: the header cluster and the tables that follow it.
            let span = if rng.below(3) == 0 { b.len() as u64 } else { (b.len() as u64).min(16384) };
            let at = rng.below(span) as usize;
            b[at] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => b[at] ^ (1 << rng.below(8)),
                _ => rng.below(256) as u8,
            };
        }
        if let Ok(img) = open_bytes(&b) {
            opened += 1;
            let _ = img.info();
            let _ = read_all(&b);
            let _ = img.check();
        }
    }
    assert!(opened > 100, "too few mutated images opened ({opened}) to mean anything");
}

#[test]
fn qcow2_fixtures_match_expected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/qcow2");
    let tsv = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut n = 0;
    for line in tsv.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        let (name, sha, size) = (f[0], f[2], f[3]);
        let img = Image::open(dir.join(name), &OpenOptions::default()).unwrap();
        assert_eq!(img.virtual_size().to_string(), size, "{name}");
        let mut buf = vec![0u8; img.virtual_size() as usize];
        img.read_at(&mut buf, 0).unwrap();
        use sha2::Digest;
        assert_eq!(common::hex(&sha2::Sha256::digest(&buf)), sha, "{name}");
        if common::have_qemu() {
            let out = Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(dir.join(name))
                .arg("/dev/stdout")
                .output()
                .unwrap();
            if out.status.success() && out.stdout.len() == buf.len() {
                assert!(out.stdout == buf, "{name}: differs from qemu-img");
            }
        }
        n += 1;
    }
    assert!(n >= 2);
}
