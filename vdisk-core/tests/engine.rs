//! The copy engine: parallel and serial copies are byte-identical to the known content, for
//! generated extent layouts (sparse files with data, holes and zero-filled data), thread counts
//! and work item sizes; progress is monotonic and ends at done == total; cancellation stops.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use proptest::prelude::*;
use vdisk_core::{convert, ConvertOptions, ErrorKind, Image, OpenOptions};

/// A layout: runs of (length in 512-byte sectors, kind) where kind 0 = hole, 1 = data, 2 = data
/// that is all zeros (allocated zeros: must still read as zero and may be left sparse).
fn layout() -> impl Strategy<Value = Vec<(u64, u8)>> {
    prop::collection::vec((1u64..3000, 0u8..3), 1..40)
}

fn build(dir: &std::path::Path, runs: &[(u64, u8)], seed: u8) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("src.img");
    let total: u64 = runs.iter().map(|r| r.0 * 512).sum::<u64>() + 333; // odd tail
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(total).unwrap();
    let mut content = vec![0u8; total as usize];
    let mut pos = 0u64;
    for (i, &(sectors, kind)) in runs.iter().enumerate() {
        let len = sectors * 512;
        match kind {
            1 => {
                let bytes: Vec<u8> =
                    (0..len).map(|j| (j as u8).wrapping_mul(seed | 1).wrapping_add(i as u8) | 1).collect();
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn parallel_equals_serial_equals_content(runs in layout(), seed in any::<u8>(), threads in 2usize..6, item_shift in 12u32..23) {
        let dir = tempfile::tempdir().unwrap();
        let (src, content) = build(dir.path(), &runs, seed);
        let img = Image::open(&src, &OpenOptions::default()).unwrap();
        for (name, t, item) in [("serial.raw", 1, 4u64 << 20), ("parallel.raw", threads, 1u64 << item_shift)] {
            let out = dir.path().join(name);
            let o = ConvertOptions { threads: Some(t), item_size: item, ..ConvertOptions::default() };
            convert(&img, &out, &o).unwrap();
            let got = std::fs::read(&out).unwrap();
            prop_assert_eq!(got.len(), content.len());
            prop_assert!(got == content, "{} differs", name);
        }
        // Into an existing file full of garbage: zero ranges must be zeroed.
        let out = dir.path().join("existing.raw");
        std::fs::write(&out, vec![0x5au8; content.len() + 4096]).unwrap();
        let o = ConvertOptions { threads: Some(threads), item_size: 1 << item_shift, ..ConvertOptions::default() };
        convert(&img, &out, &o).unwrap();
        let got = std::fs::read(&out).unwrap();
        prop_assert!(got[..content.len()] == content[..]);
        prop_assert!(got[content.len()..].iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn progress_is_monotonic_and_ends_at_total() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<(u64, u8)> = (0..200).map(|i| (2048, (i % 3) as u8)).collect();
    let (src, _) = build(dir.path(), &runs, 7);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let seen = Mutex::new(Vec::new());
    let cb = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
    let o = ConvertOptions {
        threads: Some(2),
        item_size: 1 << 16,
        progress: Some(&cb),
        progress_interval: std::time::Duration::from_millis(1),
        ..ConvertOptions::default()
    };
    convert(&img, dir.path().join("out.raw"), &o).unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(!seen.is_empty());
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "monotonic: {seen:?}");
    assert_eq!(*seen.last().unwrap(), (img.virtual_size(), img.virtual_size()));
}

#[test]
fn cancellation_stops_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<(u64, u8)> = (0..64).map(|_| (8192, 1u8)).collect();
    let (src, _) = build(dir.path(), &runs, 3);
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    let cancel = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let cb = |_: u64, _: u64| {
        calls.fetch_add(1, Ordering::Relaxed);
    };
    cancel.store(true, Ordering::Relaxed);
    let o =
        ConvertOptions { cancel: Some(&cancel), progress: Some(&cb), item_size: 1 << 16, ..ConvertOptions::default() };
    let e = convert(&img, dir.path().join("out.raw"), &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
}
