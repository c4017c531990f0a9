//! Property tests: qcow2 images built in memory by a generator from a random list of cluster
//! states (unallocated, zero, preallocated zero, data, compressed, subclusters), so the guest
//! content is known independently of vdisk. The extent iterator's invariants hold and
//! `Image::read_at` returns the known content.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

use std::io::Write;
use std::sync::Arc;

use proptest::prelude::*;
use vdisk_core::{Extent, ExtentKind, Image, MemSource, OpenOptions};

/// What one cluster of the generated image holds.
#[derive(Clone, Debug)]
enum Cluster {
    Unallocated,
    /// Zero flag, no host cluster (version 3 only).
    Zero,
    /// Zero flag over a preallocated host cluster full of garbage (version 3 only).
    ZeroAlloc,
    Data(u8),
    Compressed(u8),
    /// Extended L2: per-subcluster allocation and zero bits, with or without a host cluster.
    Sub {
        host: bool,
        alloc: u32,
        zero: u32,
        pattern: u8,
    },
}

/// The parameters of one generated image.
#[derive(Clone, Debug)]
struct Spec {
    cluster_bits: u32,
    extended: bool,
    version: u32,
    zstd: bool,
    /// Bytes cut from the end of the last cluster (a multiple of 512).
    tail_cut: u64,
    clusters: Vec<Cluster>,
}

fn pattern(cluster: usize, byte: usize, p: u8) -> u8 {
    (cluster.wrapping_mul(131) ^ byte.wrapping_mul(7) ^ (byte >> 9)) as u8 ^ p
}

fn put(buf: &mut Vec<u8>, at: u64, bytes: &[u8]) {
    let at = at as usize;
    if buf.len() < at + bytes.len() {
        buf.resize(at + bytes.len(), 0);
    }
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn put64(buf: &mut Vec<u8>, at: u64, v: u64) {
    put(buf, at, &v.to_be_bytes());
}

fn compress(data: &[u8], zstd: bool) -> Vec<u8> {
    if zstd {
        structured_zstd::encoding::compress_to_vec(data, structured_zstd::encoding::CompressionLevel::Fastest)
    } else {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }
}

/// Build the image file and the guest content it holds.
fn build(spec: &Spec) -> (Vec<u8>, Vec<u8>) {
    let (file, guest, _) = build_with_map(spec);
    (file, guest)
}

/// Merge sorted ranges that touch.
fn merge(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ if s < e => out.push((s, e)),
            _ => {}
        }
    }
    out
}

/// Build the image file, the guest content, and the guest ranges stored as data.
fn build_with_map(spec: &Spec) -> (Vec<u8>, Vec<u8>, Vec<(u64, u64)>) {
    let mut data_ranges = Vec::new();
    let cb = spec.cluster_bits;
    let cs = 1u64 << cb;
    let n = spec.clusters.len() as u64;
    let size = n * cs - spec.tail_cut;
    let entry_bytes = if spec.extended { 16 } else { 8 };
    let l2_entries = cs / entry_bytes;
    let l1_entries = n.div_ceil(l2_entries);
    let l1_offset = 2 * cs;
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let l2_base = l1_offset + l1_clusters * cs;
    let mut next_host = l2_base + l1_entries * cs;
    let mut file = vec![0u8; next_host as usize];
    let mut guest = vec![0u8; size as usize];

    // Header.
    put(&mut file, 0, b"QFI\xfb");
    put(&mut file, 4, &spec.version.to_be_bytes());
    put(&mut file, 20, &cb.to_be_bytes());
    put64(&mut file, 24, size);
    put(&mut file, 36, &(l1_entries as u32).to_be_bytes());
    put64(&mut file, 40, l1_offset);
    put64(&mut file, 48, cs);
    put(&mut file, 56, &1u32.to_be_bytes());
    if spec.version == 3 {
        let mut incompat = 0u64;
        if spec.extended {
            incompat |= 1 << 4;
        }
        if spec.zstd {
            incompat |= 1 << 3;
        }
        put64(&mut file, 72, incompat);
        put(&mut file, 96, &4u32.to_be_bytes());
        put(&mut file, 100, &112u32.to_be_bytes());
        file[104] = u8::from(spec.zstd);
    }
    for i in 0..l1_entries {
        put64(&mut file, l1_offset + 8 * i, (1 << 63) | (l2_base + i * cs));
    }

    let mut compressed_blobs = Vec::new();
    for (i, c) in spec.clusters.iter().enumerate() {
        let i64_ = i as u64;
        let l2 = l2_base + (i64_ / l2_entries) * cs;
        let at = l2 + (i64_ % l2_entries) * entry_bytes;
        let start = (i64_ * cs) as usize;
        let end = ((i64_ + 1) * cs).min(size) as usize;
        let p = match c {
            Cluster::Data(p) | Cluster::Compressed(p) | Cluster::Sub { pattern: p, .. } => *p,
            _ => 0,
        };
        let content: Vec<u8> = (0..cs as usize).map(|j| pattern(i, j, p)).collect();
        match c {
            Cluster::Unallocated => {}
            Cluster::Zero => put64(&mut file, at, 1),
            Cluster::ZeroAlloc => {
                put(&mut file, next_host, &vec![0xee; cs as usize]);
                put64(&mut file, at, (1 << 63) | next_host | 1);
                next_host += cs;
            }
            Cluster::Data(_) => {
                data_ranges.push((start as u64, end as u64));
                put(&mut file, next_host, &content);
                put64(&mut file, at, (1 << 63) | next_host);
                if spec.extended {
                    put64(&mut file, at + 8, 0xffff_ffff);
                }
                guest[start..end].copy_from_slice(&content[..end - start]);
                next_host += cs;
            }
            Cluster::Compressed(_) => {
                data_ranges.push((start as u64, end as u64));
                compressed_blobs.push((at, compress(&content, spec.zstd)));
                guest[start..end].copy_from_slice(&content[..end - start]);
            }
            Cluster::Sub { host, alloc, zero, .. } => {
                let sc = cs / 32;
                let (alloc, zero) = if *host { (*alloc & !*zero, *zero) } else { (0, *zero) };
                let host_offset = if *host {
                    let mut garbage = vec![0xeeu8; cs as usize];
                    for s in 0..32 {
                        if alloc & (1 << s) != 0 {
                            let r = (s * sc) as usize..((s + 1) * sc) as usize;
                            garbage[r.clone()].copy_from_slice(&content[r.clone()]);
                            let g = start + r.start..(start + r.end).min(end);
                            data_ranges.push((g.start as u64, g.end.max(g.start) as u64));
                            if g.start < g.end {
                                guest[g.clone()].copy_from_slice(&content[r.start..r.start + g.len()]);
                            }
                        }
                    }
                    put(&mut file, next_host, &garbage);
                    next_host += cs;
                    next_host - cs
                } else {
                    0
                };
                let flags = if *host { 1 << 63 } else { 0 };
                put64(&mut file, at, flags | host_offset);
                put64(&mut file, at + 8, (u64::from(zero) << 32) | u64::from(alloc));
            }
        }
    }
    // Compressed clusters, packed at odd offsets after the data clusters.
    let mut pos = next_host + 3;
    let shift = 62 - (cb - 8);
    for (at, blob) in compressed_blobs {
        let sectors = ((pos % 512) + blob.len() as u64).div_ceil(512) - 1;
        assert!(sectors < (1 << (cb - 8)), "compressed cluster too large for the descriptor");
        put(&mut file, pos, &blob);
        put64(&mut file, at, (1 << 62) | (sectors << shift) | pos);
        pos += blob.len() as u64 + 5;
    }
    (file, guest, merge(data_ranges))
}

fn open(file: Vec<u8>) -> Image {
    let src: Arc<[u8]> = file.into();
    Image::from_source(Arc::new(MemSource(src)), &OpenOptions::default()).unwrap()
}

fn cluster_strategy(version: u32, extended: bool) -> BoxedStrategy<Cluster> {
    if extended {
        prop_oneof![
            Just(Cluster::Unallocated),
            any::<u32>().prop_map(|zero| Cluster::Sub { host: false, alloc: 0, zero, pattern: 0 }),
            (any::<u32>(), any::<u32>(), 1u8..).prop_map(|(alloc, zero, pattern)| Cluster::Sub {
                host: true,
                alloc,
                zero,
                pattern
            }),
            any::<u8>().prop_map(Cluster::Data),
            any::<u8>().prop_map(Cluster::Compressed),
        ]
        .boxed()
    } else if version == 2 {
        prop_oneof![
            Just(Cluster::Unallocated),
            any::<u8>().prop_map(Cluster::Data),
            any::<u8>().prop_map(Cluster::Compressed)
        ]
        .boxed()
    } else {
        prop_oneof![
            Just(Cluster::Unallocated),
            Just(Cluster::Zero),
            Just(Cluster::ZeroAlloc),
            any::<u8>().prop_map(Cluster::Data),
            any::<u8>().prop_map(Cluster::Compressed),
        ]
        .boxed()
    }
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![Just((9u32, false)), Just((12, false)), Just((14, true)), Just((15, false)), Just((16, true))],
        2u32..=3,
        any::<bool>(),
    )
        .prop_flat_map(|((cluster_bits, ext), version, zstd)| {
            let extended = ext && version == 3;
            let zstd = zstd && version == 3;
            let max = if cluster_bits >= 15 { 40 } else { 150 };
            let tail_max = (1u64 << cluster_bits) / 512;
            (
                Just(cluster_bits),
                Just(extended),
                Just(version),
                Just(zstd),
                0..tail_max,
                prop::collection::vec(cluster_strategy(version, extended), 1..max),
            )
        })
        .prop_map(|(cluster_bits, extended, version, zstd, tail, clusters)| Spec {
            cluster_bits,
            extended,
            version,
            zstd,
            tail_cut: tail * 512,
            clusters,
        })
}

/// The iterator's invariants: sorted, non-empty, contiguous, covering 0..size, merged.
fn check_extents(extents: &[Extent], size: u64) {
    let mut pos = 0;
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.start, pos, "gap or overlap at {i}: {extents:?}");
        assert!(e.len > 0, "empty extent {e:?}");
        pos = e.end();
        if i > 0 {
            let mut prev = extents[i - 1];
            assert!(!prev.try_merge(e), "unmerged neighbours {:?} {e:?}", extents[i - 1]);
        }
    }
    assert_eq!(pos, size, "coverage");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_images_read_back(spec in spec_strategy(), cuts in prop::collection::vec((any::<u64>(), 1u64..100_000), 4)) {
        let (file, guest, data_ranges) = build_with_map(&spec);
        let img = open(file);
        let size = guest.len() as u64;
        let ours = merge(img.extents().map(|e| e.unwrap()).filter(|e| e.kind.is_data()).map(|e| (e.start, e.end())));
        prop_assert_eq!(ours, data_ranges);
        prop_assert_eq!(img.virtual_size(), size);
        let extents: Vec<Extent> = img.extents().collect::<Result<_, _>>().unwrap();
        check_extents(&extents, size);
        // Nothing in a generated image is unallocated-with-data: data extents cover exactly the
        // bytes with stored content, and everything else reads as zero.
        for e in &extents {
            if !e.kind.is_data() {
                let s = e.start as usize;
                prop_assert!(guest[s..s + e.len as usize].iter().all(|&b| b == 0), "{:?} is not zero", e);
            }
            if let ExtentKind::Data { layer, .. } = e.kind {
                prop_assert_eq!(layer, 0);
            }
        }
        let mut all = vec![0xaau8; guest.len()];
        prop_assert_eq!(img.read_at(&mut all, 0).unwrap(), guest.len());
        prop_assert!(all == guest, "whole-image read differs");
        for (off, len) in cuts {
            let off = off % size;
            let len = len.min(size - off) as usize;
            let mut buf = vec![0x55u8; len];
            img.read_at(&mut buf, off).unwrap();
            prop_assert!(buf[..] == guest[off as usize..off as usize + len], "read at {off:#x}+{len:#x} differs");
        }
        // Extents of a sub-range are that range, clipped.
        let (a, b) = (size / 3, size - size / 5);
        if a < b {
            let sub: Vec<Extent> = img.extents_in(a, b).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(sub.first().map(|e| e.start), Some(a));
            prop_assert_eq!(sub.last().map(|e| e.end()), Some(b));
        }
    }
}

#[test]
fn generator_sanity() {
    let spec = Spec {
        cluster_bits: 16,
        extended: true,
        version: 3,
        zstd: false,
        tail_cut: 512,
        clusters: vec![
            Cluster::Sub { host: true, alloc: 0b1011, zero: 0b0100, pattern: 3 },
            Cluster::Compressed(9),
            Cluster::Unallocated,
            Cluster::Sub { host: false, alloc: 0, zero: u32::MAX, pattern: 0 },
            Cluster::Data(1),
        ],
    };
    let (file, guest) = build(&spec);
    let img = open(file);
    let extents: Vec<Extent> = img.extents().collect::<Result<_, _>>().unwrap();
    check_extents(&extents, guest.len() as u64);
    assert!(matches!(extents[0].kind, ExtentKind::Data { .. }));
    assert_eq!(extents[0].len, 2 * 2048);
    assert!(matches!(extents[1].kind, ExtentKind::Zero { layer: 0 }));
    let mut all = vec![0u8; guest.len()];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == guest);
}
