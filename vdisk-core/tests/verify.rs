//! Checksum, convert --checksum and compare against independent implementations written here in
//! the plainest way (blkhash straight from its definition over the whole content, sha256 of the
//! bytes, the first differing byte by a linear scan), on generated layouts: sparse files with
//! holes, data and allocated zeros, and qcow2 images written by qemu-io.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use vdisk_core::{
    checksum, compare, convert, ChecksumAlgorithm, ChecksumOptions, CompareOptions, ConvertOptions, Difference, Image,
    OpenOptions,
};

/// blkhash by its definition: SHA-256 of each 64 KiB block (the last one at its real length),
/// then SHA-256 of those digests followed by the length as a little-endian u64.
fn naive_blkhash(data: &[u8]) -> String {
    let mut outer = Sha256::new();
    for block in data.chunks(64 << 10) {
        outer.update(Sha256::digest(block));
    }
    outer.update((data.len() as u64).to_le_bytes());
    common::hex(&outer.finalize())
}

fn naive_sha256(data: &[u8]) -> String {
    common::hex(&Sha256::digest(data))
}

/// Runs of (length in 512-byte sectors, kind): 0 hole, 1 data, 2 allocated zeros.
fn layout() -> impl Strategy<Value = Vec<(u64, u8)>> {
    prop::collection::vec((1u64..1200, 0u8..3), 1..30)
}

/// A sparse file with the layout and an odd tail; returns it and its content.
fn build(dir: &Path, name: &str, runs: &[(u64, u8)], seed: u8, tail: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let total: u64 = runs.iter().map(|r| r.0 * 512).sum::<u64>() + tail;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(total).unwrap();
    let mut content = vec![0u8; total as usize];
    let mut pos = 0u64;
    for (i, &(sectors, kind)) in runs.iter().enumerate() {
        let len = sectors * 512;
        match kind {
            1 => {
                let bytes: Vec<u8> = (0..len).map(|j| ((j * 7 + i as u64) as u8).wrapping_mul(seed | 1) | 1).collect();
                f.write_all_at(&bytes, pos).unwrap();
                content[pos as usize..(pos + len) as usize].copy_from_slice(&bytes);
            }
            2 => f.write_all_at(&vec![0u8; len as usize], pos).unwrap(),
            _ => {}
        }
        pos += len;
    }
    (path, content)
}

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default()).unwrap()
}

fn sum(image: &Image, algorithm: ChecksumAlgorithm, threads: usize) -> String {
    checksum(image, &ChecksumOptions { algorithm, threads: Some(threads), ..Default::default() }).unwrap().digest
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// checksum (both algorithms, any thread count) and convert --checksum (any item size, so
    /// blocks straddle work items) agree with the naive definitions.
    #[test]
    fn checksums_match_the_definitions(runs in layout(), seed in any::<u8>(), tail in 0u64..70_000,
                                       threads in 1usize..5, item_shift in 12u32..21) {
        let dir = tempfile::tempdir().unwrap();
        let (src, content) = build(dir.path(), "src.img", &runs, seed, tail);
        let img = open(&src);
        let want = naive_blkhash(&content);
        prop_assert_eq!(sum(&img, ChecksumAlgorithm::Blkhash, threads), want.clone());
        prop_assert_eq!(sum(&img, ChecksumAlgorithm::Sha256, threads), naive_sha256(&content));
        let out = dir.path().join("out.raw");
        let o = ConvertOptions {
            threads: Some(threads),
            item_size: (1u64 << item_shift) + 512 * u64::from(seed % 3),
            checksum: true,
            ..ConvertOptions::default()
        };
        let report = convert(&img, &out, &o).unwrap();
        prop_assert_eq!(report.checksum, Some(want));
        prop_assert!(std::fs::read(&out).unwrap() == content);
    }

    /// compare finds the exact first differing byte, and identical content (whatever the
    /// allocation) is identical.
    #[test]
    fn compare_finds_the_first_difference(runs in layout(), seed in any::<u8>(), threads in 1usize..5,
                                          flips in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        let dir = tempfile::tempdir().unwrap();
        let (a, content) = build(dir.path(), "a.img", &runs, seed, 0);
        // The same content, fully allocated.
        let b = dir.path().join("b.img");
        let mut other = content.clone();
        for f in &flips {
            let i = f.index(other.len());
            other[i] ^= 0x40;
        }
        std::fs::write(&b, &other).unwrap();
        let want = content.iter().zip(&other).position(|(x, y)| x != y).map(|i| i as u64);
        let opts = CompareOptions { threads: Some(threads), ..Default::default() };
        let r = compare(&open(&a), &open(&b), ("a", "b"), &opts).unwrap();
        prop_assert_eq!(r.difference, want.map(|offset| Difference::Content { offset }));
        let r = compare(&open(&b), &open(&a), ("b", "a"), &opts).unwrap();
        prop_assert_eq!(r.difference, want.map(|offset| Difference::Content { offset }));
    }
}

#[test]
fn compare_sizes_and_tails() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.raw");
    let long = dir.path().join("long.raw");
    std::fs::write(&short, vec![7u8; 100_000]).unwrap();
    let f = std::fs::File::create(&long).unwrap();
    f.write_all_at(&[7u8; 100_000], 0).unwrap();
    f.set_len(10 << 20).unwrap();
    let opts = CompareOptions::default();
    let r = compare(&open(&short), &open(&long), ("s", "l"), &opts).unwrap();
    assert!(r.identical());
    assert_eq!(r.qemu_lines(), ["Warning: Image size mismatch!", "Images are identical."]);
    let strict = CompareOptions { strict: true, ..Default::default() };
    assert_eq!(compare(&open(&short), &open(&long), ("s", "l"), &strict).unwrap().difference, Some(Difference::Size));
    f.write_all_at(&[1], (9 << 20) + 3).unwrap();
    let r = compare(&open(&long), &open(&short), ("l", "s"), &opts).unwrap();
    assert_eq!(r.difference, Some(Difference::Content { offset: (9 << 20) + 3 }));
    assert_eq!(r.qemu_lines()[0], "Warning: Image size mismatch!");
    // A difference in the common part comes first, without the warning.
    f.write_all_at(&[8], 99_999).unwrap();
    let r = compare(&open(&long), &open(&short), ("l", "s"), &opts).unwrap();
    assert_eq!(r.qemu_lines(), ["Content mismatch at offset 99999!"]);
}

/// qcow2 images written by qemu-io with unaligned data writes, zero writes and discards, plain
/// and compressed: checksum equals the naive digest of qemu-img's raw conversion.
#[test]
fn qcow2_checksums_match_qemu_content() {
    if !common::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = (9u64 << 20) + 7 * 512;
    for (case, cluster) in [(0u64, "65536"), (1, "4096"), (2, "2097152")] {
        let img = dir.path().join(format!("img{case}.qcow2"));
        let opt = format!("cluster_size={cluster}");
        common::qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, img.to_str().unwrap(), &size.to_string()]);
        let mut cmds = Vec::new();
        let mut x = 0x9e37_79b9u64.wrapping_mul(case + 1);
        for i in 0..40u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size - 200_000) / 512 * 512;
            let len = ((x >> 8) % 180_000 / 512 + 1) * 512;
            cmds.push(match i % 4 {
                0 | 1 => format!("write -P {} {off} {len}", (x >> 3) % 255 + 1),
                2 => format!("write -z {off} {len}"),
                _ => format!("discard {off} {len}"),
            });
        }
        common::qemu_io("qcow2", &img, &cmds);
        let compressed = dir.path().join(format!("img{case}c.qcow2"));
        common::qemu_img(&["convert", "-c", "-O", "qcow2", img.to_str().unwrap(), compressed.to_str().unwrap()]);
        let raw = dir.path().join(format!("img{case}.raw"));
        common::qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
        let content = std::fs::read(&raw).unwrap();
        let want = naive_blkhash(&content);
        for path in [&img, &compressed, &raw] {
            let image = open(path);
            assert_eq!(sum(&image, ChecksumAlgorithm::Blkhash, 2), want, "{}", path.display());
            assert_eq!(sum(&image, ChecksumAlgorithm::Sha256, 2), naive_sha256(&content), "{}", path.display());
        }
    }
}
