//! Writers against vdisk's own readers, without qemu: round trips A -> B -> content for every
//! pair of output formats, and a property test (random data/zero/hole layouts and sizes, random
//! options and thread counts -> export -> read back equals the input).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vdisk_core::{export, parse_option_pairs, ExportOptions, Image, OpenOptions, OutputFormat, ReferencePolicy};

/// Every output format and a subformat or option set of each.
const OUTPUTS: &[(OutputFormat, &str, bool)] = &[
    (OutputFormat::Qcow2, "", false),
    (OutputFormat::Qcow2, "cluster_size=4k", true),
    (OutputFormat::Qcow2, "compat=0.10,cluster_size=2M", true),
    (OutputFormat::Qcow2, "compression_type=zstd", true),
    (OutputFormat::Vmdk, "", false),
    (OutputFormat::Vmdk, "subformat=monolithicSparse", false),
    (OutputFormat::Vmdk, "subformat=monolithicFlat", false),
    (OutputFormat::Vpc, "", false),
    (OutputFormat::Vpc, "subformat=fixed", false),
    (OutputFormat::Vhdx, "", false),
    (OutputFormat::Vhdx, "subformat=fixed,block_size=1M", false),
];

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions { references: ReferencePolicy::SameDir, ..Default::default() })
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// The guest content of an image (its first `len` bytes; the rest must read as zero).
fn content(path: &Path, len: usize) -> Vec<u8> {
    let img = open(path);
    let size = usize::try_from(img.virtual_size()).unwrap();
    assert!(size >= len, "{}: virtual size {size} < {len}", path.display());
    let mut buf = vec![0u8; size];
    let mut at = 0;
    while at < size {
        at += img.read_at(&mut buf[at..], at as u64).unwrap();
    }
    assert!(buf[len..].iter().all(|&b| b == 0), "{}: bytes past the source's size", path.display());
    buf.truncate(len);
    buf
}

fn export_to(src: &Path, out: &Path, (format, options, compress): (OutputFormat, &str, bool), threads: usize) {
    let img = open(src);
    let opts = ExportOptions {
        format,
        options: parse_option_pairs(options).unwrap(),
        compress,
        threads: Some(threads),
        check_space: false,
        ..ExportOptions::default()
    };
    export(&img, out, &opts).unwrap_or_else(|e| panic!("export {format:?} {options}: {e}"));
}

/// A raw file from (kind, length) runs: 0 random data, 1 a repeated byte, 2 written zeros, 3 a hole.
fn raw_from_runs(dir: &Path, runs: &[(u8, u64, u8)]) -> (PathBuf, Vec<u8>) {
    let path = dir.join("src.raw");
    let f = std::fs::File::create(&path).unwrap();
    let mut data = Vec::new();
    let mut seed = 0x9e37_79b9_u64;
    for &(kind, len, byte) in runs {
        let n = usize::try_from(len).unwrap();
        let start = data.len();
        match kind {
            0 => data.extend((0..n).map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })),
            1 => data.extend(std::iter::repeat_n(byte | 1, n)),
            _ => data.extend(std::iter::repeat_n(0, n)),
        }
        if kind != 3 {
            f.write_all_at(&data[start..], start as u64).unwrap();
        }
    }
    f.set_len(data.len() as u64).unwrap();
    // The raw reader sees whole sectors (as qemu does): the disk is what it reports.
    data.truncate(usize::try_from(open(&path).virtual_size()).unwrap());
    (path, data)
}

fn name(i: usize, format: OutputFormat) -> String {
    format!("out{i}.{}", if format == OutputFormat::Vpc { "vhd" } else { format.as_str() })
}

#[test]
fn every_pair_of_formats_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<(u8, u64, u8)> = vec![
        (0, 300_000, 0),
        (3, 5 << 20, 0),
        (1, 70_000, 7),
        (2, 2 << 20, 0),
        (0, 4096, 0),
        (3, 1_000_000, 0),
        (1, 512, 3),
    ];
    let (src, expect) = raw_from_runs(dir.path(), &runs);
    let mut firsts = Vec::new();
    for (i, &out) in OUTPUTS.iter().enumerate() {
        let a = dir.path().join(name(i, out.0));
        export_to(&src, &a, out, 2);
        assert!(content(&a, expect.len()) == expect, "raw -> {:?} {}", out.0, out.1);
        firsts.push(a);
    }
    for (i, a) in firsts.iter().enumerate() {
        for (j, &out) in OUTPUTS.iter().enumerate() {
            let sub = dir.path().join(format!("pair-{i}-{j}"));
            std::fs::create_dir(&sub).unwrap();
            let b = sub.join(name(j, out.0));
            export_to(a, &b, out, 3);
            assert!(
                content(&b, expect.len()) == expect,
                "raw -> {:?} {} -> {:?} {}",
                OUTPUTS[i].0,
                OUTPUTS[i].1,
                out.0,
                out.1
            );
            std::fs::remove_dir_all(&sub).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random layouts of data, repeated bytes, written zeros and holes, of random (sector or odd)
    /// sizes, through a random writer on 1 to 4 threads, read back equal.
    #[test]
    fn random_layouts_read_back(
        runs in prop::collection::vec((0u8..4, 1u64..400_000, any::<u8>()), 1..12),
        output in 0usize..OUTPUTS.len(),
        threads in 1usize..5,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (src, expect) = raw_from_runs(dir.path(), &runs);
        let out = dir.path().join(name(output, OUTPUTS[output].0));
        export_to(&src, &out, OUTPUTS[output], threads);
        prop_assume!(!expect.is_empty());
        prop_assert!(content(&out, expect.len()) == expect, "{:?} {}", OUTPUTS[output].0, OUTPUTS[output].1);
    }
}
