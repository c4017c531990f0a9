//! The bodies of vdisk's fuzz targets, shared by the libFuzzer binaries (`cargo fuzz run NAME`)
//! and the stable smoke test (`cargo test --no-default-features` in this folder).
//!
//! Every body opens untrusted bytes under small limits and must never panic, hang or allocate
//! beyond the limits; on success it checks the extent invariants and reads what it can.

use std::sync::Arc;

use vdisk_core::{ConvertOptions, Extent, ExtentKind, Format, Image, Limits, MemSource, OpenOptions};

/// Limits for fuzzing: small enough that a forged table cannot exhaust the fuzzer's memory.
pub fn fuzz_limits() -> Limits {
    let mut l = Limits::default();
    l.max_metadata_bytes = 64 << 20;
    l.max_table_entries = 1 << 22;
    l.max_chain_depth = 4;
    l.max_unit_bytes = 2 << 20;
    l
}

/// Most bytes of data extents read per input, so a huge allocated image stays fast to check.
const MAX_READ_BYTES: u64 = 16 << 20;
/// Most extents walked per input.
const MAX_EXTENTS: usize = 200_000;

fn open(data: &[u8], format: Option<Format>) -> Option<Image> {
    let options = OpenOptions { format, limits: fuzz_limits(), ..OpenOptions::default() };
    Image::from_source(Arc::new(MemSource(Arc::from(data))), &options).ok()
}

/// Walk the extents, asserting the iterator's invariants, and read up to [`MAX_READ_BYTES`] of
/// data through both the extent path and `read_at`, which must agree.
pub fn walk_and_read(image: &Image) {
    let size = image.virtual_size();
    let mut pos = 0u64;
    let mut prev: Option<Extent> = None;
    let mut budget = MAX_READ_BYTES;
    let mut scratch = vdisk_core::ReadScratch::default();
    for (n, extent) in image.extents().enumerate() {
        if n >= MAX_EXTENTS {
            return;
        }
        let Ok(e) = extent else { return };
        assert_eq!(e.start, pos, "extents are contiguous");
        assert!(e.len > 0, "extents are never empty");
        if let Some(mut p) = prev {
            assert!(!p.try_merge(&e), "neighbours are merged: {p:?} {e:?}");
        }
        pos = e.end();
        if matches!(e.kind, ExtentKind::Data { .. }) && budget > 0 {
            let n = e.len.min(budget).min(1 << 20);
            budget -= n;
            let mut a = vec![0u8; n as usize];
            let mut b = vec![0u8; n as usize];
            let via_extent = image.read_extent(&e, &mut a, &mut scratch).is_ok();
            let via_read = image.read_at(&mut b, e.start).is_ok();
            if via_extent && via_read {
                assert_eq!(a, b, "read paths agree at {:#x}", e.start);
            }
        }
        prev = Some(e);
    }
    if prev.is_some() {
        assert_eq!(pos, size, "extents cover the virtual size");
    }
}

/// Detect the format and, whatever it is, open, walk and read.
pub fn probe(data: &[u8]) {
    if let Some(image) = open(data, None) {
        let _ = image.info().to_json();
        walk_and_read(&image);
    }
}

/// Open as `format` (no detection), walk, read, describe and check.
pub fn format(data: &[u8], format: Format) {
    if let Some(image) = open(data, Some(format)) {
        let _ = image.info().to_json();
        let _ = image.check();
        walk_and_read(&image);
    }
}

/// Largest virtual size converted per input (into a temporary file): enough for every fixture's
/// structures, small enough to keep thousands of executions per second.
const MAX_CONVERT_BYTES: u64 = 8 << 20;

/// Convert serially and in parallel (small items) and compare the outputs.
pub fn convert(data: &[u8]) {
    let Some(image) = open(data, None) else { return };
    if image.virtual_size() > MAX_CONVERT_BYTES {
        return;
    }
    let Ok(dir) = tempfile::tempdir() else { return };
    let serial = dir.path().join("serial.raw");
    let parallel = dir.path().join("parallel.raw");
    let one = ConvertOptions { threads: Some(1), ..ConvertOptions::default() };
    let many = ConvertOptions { threads: Some(3), item_size: 16 << 10, ..ConvertOptions::default() };
    let a = vdisk_core::convert(&image, &serial, &one);
    let b = vdisk_core::convert(&image, &parallel, &many);
    assert_eq!(a.is_ok(), b.is_ok(), "serial and parallel agree on success: {a:?} {b:?}");
    if a.is_ok() {
        let x = std::fs::read(&serial).ok();
        let y = std::fs::read(&parallel).ok();
        assert!(x == y, "serial and parallel outputs are identical");
    }
}
