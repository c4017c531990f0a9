//! VDIs that qemu cannot make or read, built from known content by `testdata/vdi/make.py`:
//! block sizes from 512 bytes to 8 MiB, header version 0, both v1.1 header sizes with
//! VirtualBox's 1 MiB alignment, `cbBlockExtra`, odd disk sizes, a last block cut short by the
//! end of the file, static and undo images, ZERO and FREE entries, differencing chains found by
//! UUID, and hostile headers and block maps. Content must match the generator's exactly; every
//! refusal must be the expected one.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vdisk_core::{convert, ConvertOptions, ErrorKind, Image, OpenOptions, ReferencePolicy};

fn generate() -> Option<(PathBuf, Vec<HashMap<String, String>>)> {
    common::generate_cases("vdi/make.py")
}

fn options(flags: &str) -> OpenOptions {
    let references = if flags.contains("same-dir") { ReferencePolicy::SameDir } else { ReferencePolicy::Deny };
    OpenOptions { references, ..OpenOptions::default() }
}

fn convert_sha(image: &Image, out: &Path, threads: usize) -> (String, u64) {
    let _ = std::fs::remove_file(out);
    let o = ConvertOptions { threads: Some(threads), item_size: 256 << 10, ..ConvertOptions::default() };
    convert(image, out, &o).unwrap();
    common::sha256_file(out)
}

#[test]
fn generated_vdis_match_their_known_content_or_are_refused() {
    let Some((dir, rows)) = generate() else { return };
    assert!(rows.len() >= 30, "only {} cases", rows.len());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.raw");
    for row in &rows {
        let name = &row["name"];
        let path: PathBuf = dir.join(name);
        let opts = options(&row["flags"]);
        match row["expect"].as_str() {
            "ok" => {
                let image = Image::open(&path, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
                let size: u64 = row["virtual_size"].parse().unwrap();
                assert_eq!(image.virtual_size(), size, "{name}");
                for threads in [1, 3] {
                    let (sha, len) = convert_sha(&image, &out, threads);
                    assert_eq!((sha.as_str(), len), (row["sha256"].as_str(), size), "{name} ({threads} threads)");
                }
                // Extents cover the disk; a read through them agrees with the copy.
                let mut pos = 0;
                for e in image.extents() {
                    let e = e.unwrap();
                    assert_eq!(e.start, pos, "{name}");
                    pos = e.end();
                }
                assert_eq!(pos, size, "{name}");
                let copy = std::fs::read(&out).unwrap();
                let at = size / 3;
                let mut buf = vec![0u8; 70_000.min(usize::try_from(size - at).unwrap())];
                image.read_at(&mut buf, at).unwrap();
                assert!(buf[..] == copy[at as usize..at as usize + buf.len()], "{name}: read_at");
                let report = Image::check_file(&path, &opts).unwrap();
                assert_eq!(report.exit_code(), 0, "{name}: {:?}", report.problems);
                let info = Image::describe(&path, &opts).unwrap();
                assert_eq!(info.format, "vdi");
                assert_eq!(info.virtual_size, size);
            }
            "error" => {
                let e = Image::open(&path, &opts).err().unwrap_or_else(|| panic!("{name}: opened"));
                assert!(e.to_string().contains(&row["error"]), "{name}: {e}");
                assert!(!e.to_string().contains('\n'));
                assert!(
                    matches!(e.kind(), ErrorKind::InvalidImage | ErrorKind::Unsupported | ErrorKind::ReferenceDenied),
                    "{name}: {:?}",
                    e.kind()
                );
            }
            other => panic!("{name}: unknown expectation {other}"),
        }
    }
}

#[test]
fn check_reports_hostile_block_maps_with_qemu_exit_codes() {
    let Some((dir, _)) = generate() else { return };
    // Opening refuses these, naming the entry; check (which needs no valid map to describe the
    // image) reports them as corruptions: exit 2, like qemu-img check.
    for (name, what) in [
        ("bad-entry-out-of-range.vdi", "entry 2: block index 7 is out of range"),
        ("bad-entry-duplicate.vdi", "also used by entry 0"),
        ("bad-entry-past-end.vdi", "runs past the end of the file"),
    ] {
        let report = Image::check_file(dir.join(name), &OpenOptions::default()).unwrap();
        assert_eq!(report.exit_code(), 2, "{name}");
        assert!(report.problems.iter().any(|p| p.message.contains(what)), "{name}: {:?}", report.problems);
    }
    // A wrong allocated-block count in the header is a corruption too (qemu-img check says so).
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("changed.vdi");
    let mut bytes = std::fs::read(dir.join("dynamic-block-4096.vdi")).unwrap();
    let n = u32::from_le_bytes(bytes[388..392].try_into().unwrap());
    bytes[388..392].copy_from_slice(&(n + 1).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let report = Image::check_file(&path, &OpenOptions::default()).unwrap();
    assert_eq!(report.exit_code(), 2);
    assert!(report.problems[0].message.contains("allocated blocks"), "{:?}", report.problems);
}

#[test]
fn differencing_chain_reports_its_parent_and_depth() {
    let Some((dir, _)) = generate() else { return };
    let top = dir.join("chain/snap2.vdi");
    let image = Image::open(&top, &options("same-dir")).unwrap();
    assert_eq!(image.chain_depth(), 2);
    let files: Vec<String> = image.files().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(files, ["snap2.vdi", "snap1.vdi", "base.vdi"], "the decoy copy of the base is not used");
    let info = image.info();
    assert_eq!(info.backing_filename.as_deref(), Some("snap1.vdi"));
    assert_eq!(info.backing_filename_format.as_deref(), Some("vdi"));
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["data"]["image-type"], "differencing");
    assert!(fs["data"]["parent-uuid"].is_string());
    // Unallocated blocks of the child show the parent's extents one layer down.
    let depths: Vec<u32> = image
        .extents()
        .filter_map(|e| match e.unwrap().kind {
            vdisk_core::ExtentKind::Data { layer, .. } => Some(layer),
            _ => None,
        })
        .collect();
    for layer in 0..=2 {
        assert!(depths.contains(&layer), "data from layer {layer}: {depths:?}");
    }
    // Describing needs no parent.
    let info = Image::describe(&top, &OpenOptions::default()).unwrap();
    assert_eq!(info.format_specific.unwrap()["data"]["image-type"], "differencing");
    // A chain deeper than the limit is refused.
    let mut o = options("same-dir");
    o.limits.max_chain_depth = 2;
    let e = Image::open(&top, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
}
