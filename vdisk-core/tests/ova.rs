//! OVA archives built at test time by `testdata/ova/make.py` around disks of known content
//! (qemu-made streamOptimized and monolithicSparse VMDKs and qcow2, VMware-layout streams, a
//! VDI, raw): ustar, GNU and pax archives, one and two disks, gzip-compressed and chunked files,
//! good and bad manifests, and hostile archives. The selected disk must convert to its content
//! exactly, or be refused with the expected line; `check` must give the expected exit status.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vdisk_core::{
    convert, ConvertOptions, ErrorKind, ExtentKind, Format, Image, Location, MemSource, OpenOptions, ReadAt,
};

fn generate() -> Option<(PathBuf, Vec<HashMap<String, String>>)> {
    if !common::have_qemu() {
        return None;
    }
    common::generate_cases("ova/make.py")
}

/// Open options from a row's flags (`--disk N`).
fn options(flags: &str) -> OpenOptions {
    let mut o = OpenOptions::default();
    let words: Vec<&str> = flags.split_whitespace().collect();
    if let Some(i) = words.iter().position(|w| *w == "--disk") {
        o.disk = Some(words[i + 1].parse().unwrap());
    }
    o
}

fn sha_of_convert(image: &Image, out: &Path, options: &ConvertOptions<'_>) -> (String, u64) {
    let _ = std::fs::remove_file(out);
    convert(image, out, options).unwrap();
    common::sha256_file(out)
}

#[test]
fn generated_ovas_convert_their_selected_disk_or_are_refused() {
    let Some((dir, rows)) = generate() else { return };
    assert!(rows.len() >= 35, "only {} cases", rows.len());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.raw");
    for row in &rows {
        let name = &row["name"];
        let path = dir.join(name);
        let opts = options(&row["flags"]);
        let result = Image::open(&path, &opts).and_then(|image| {
            let _ = std::fs::remove_file(&out);
            let o = ConvertOptions { threads: Some(3), item_size: 1 << 20, ..ConvertOptions::default() };
            convert(&image, &out, &o).map(|_| image)
        });
        match (row["expect"].as_str(), result) {
            ("ok", Ok(image)) => {
                assert_eq!(image.format(), Format::Ova, "{name}");
                let (sha, len) = common::sha256_file(&out);
                assert_eq!(sha, row["sha256"], "{name} {}", row["flags"]);
                assert_eq!(len.to_string(), row["virtual_size"], "{name}");
                assert_eq!(image.virtual_size().to_string(), row["virtual_size"], "{name}");
            }
            ("error", Err(e)) => {
                assert!(e.to_string().contains(&row["error"]), "{name}: {e}");
                assert!(!e.to_string().contains('\n'), "{name}: {e}");
            }
            (expect, Ok(_)) => panic!("{name} {}: expected {expect}, converted", row["flags"]),
            (expect, Err(e)) => panic!("{name} {}: expected {expect}: {e}", row["flags"]),
        }
        if let Ok(code) = row["check"].parse::<i32>() {
            let report = Image::check_file(&path, &opts).unwrap_or_else(|e| panic!("{name}: check: {e}"));
            assert_eq!(report.exit_code(), code, "{name}: {:?}", report.problems);
            assert_eq!(report.format, "ova");
        }
    }
}

#[test]
fn info_lists_every_disk_and_says_what_disagrees() {
    let Some((dir, _)) = generate() else { return };
    let info = Image::describe(dir.join("two-disks.ova"), &OpenOptions::default()).unwrap();
    assert_eq!(info.format, "ova");
    assert_eq!(info.virtual_size, 6 << 20, "the first disk by default");
    let data = &info.format_specific.as_ref().unwrap()["data"];
    assert_eq!(data["manifest"], true);
    assert_eq!(data["selected-disk"], 1);
    let disks = data["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for (d, (file, size)) in disks.iter().zip([("disk1.vmdk", 6u64 << 20), ("disk2.vmdk", (3 << 20) + 512)]) {
        assert_eq!(d["file"], file);
        assert_eq!(d["format"], "vmdk");
        assert_eq!(d["virtual-size"], size);
        assert_eq!(d["capacity"], size, "the OVF's capacity, in bytes");
        assert!(d.get("warnings").is_none(), "{d}");
    }
    let o = OpenOptions { disk: Some(2), ..OpenOptions::default() };
    let image = Image::open(dir.join("two-disks.ova"), &o).unwrap();
    assert_eq!((image.disk(), image.disk_format(), image.virtual_size()), (Some(2), Format::Vmdk, (3 << 20) + 512));
    assert_eq!(image.info().format_specific.unwrap()["data"]["selected-disk"], 2);

    let info = Image::describe(dir.join("capacity-mismatch.ova"), &OpenOptions::default()).unwrap();
    let d = &info.format_specific.unwrap()["data"]["disks"][0];
    assert_eq!(d["capacity"], 50u64 << 30);
    let warnings = d["warnings"].to_string();
    assert!(warnings.contains("differs from the disk's virtual size"), "{warnings}");
    assert!(warnings.contains("ovf:size") || warnings.contains("the OVF says the file is"), "{warnings}");
    let info = Image::describe(dir.join("gnu-sparse-sha1.ova"), &OpenOptions::default()).unwrap();
    assert_eq!(info.format_specific.unwrap()["data"]["manifest"], true);
    let info = Image::describe(dir.join("chunk-missing.ova"), &OpenOptions::default());
    assert!(info.is_err());
}

#[test]
fn multi_disk_convert_needs_a_disk_and_touches_nothing_without_one() {
    let Some((dir, _)) = generate() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let path = dir.join("two-disks.ova");
    let image = Image::open(&path, &OpenOptions::default()).unwrap();
    let out = tmp.path().join("never.raw");
    let e = convert(&image, &out, &ConvertOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(
        e.to_string().contains("1 'disk1.vmdk' (vmdk, 6291456 bytes), 2 'disk2.vmdk' (vmdk, 3146240 bytes)"),
        "{e}"
    );
    assert!(!out.exists());
    // The archive itself is one of the image's files: never a target.
    let image = Image::open(&path, &OpenOptions { disk: Some(1), ..OpenOptions::default() }).unwrap();
    let e = convert(&image, &path, &ConvertOptions { must_exist: true, ..ConvertOptions::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Target, "{e}");
}

#[test]
fn disks_stored_in_one_member_map_to_offsets_in_the_ova() {
    let Some((dir, _)) = generate() else { return };
    for (name, disk) in [("gnu-sparse-sha1.ova", 1), ("two-disks.ova", 2), ("raw-disk.ova", 1), ("vdi-disk.ova", 1)] {
        let path = dir.join(name);
        let image = Image::open(&path, &OpenOptions { disk: Some(disk), ..OpenOptions::default() }).unwrap();
        let archive = std::fs::read(&path).unwrap();
        let mut checked = 0;
        for e in image.extents() {
            let e = e.unwrap();
            if let ExtentKind::Data { location: Location::File { file, offset }, .. } = e.kind {
                assert_eq!(image.file_path(file), Some(path.as_path()), "{name}");
                let n = e.len.min(4096) as usize;
                let mut buf = vec![0u8; n];
                image.read_at(&mut buf, e.start).unwrap();
                assert!(buf[..] == archive[offset as usize..offset as usize + n], "{name} at {:#x}", e.start);
                checked += 1;
            }
        }
        assert!(checked > 0, "{name}: no data extent");
    }
    // Chunked and compressed disks are not one piece of the archive: their reads still work.
    let image = Image::open(dir.join("chunked.ova"), &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 1 << 20).unwrap();
}

#[test]
fn an_ova_from_any_source_reads_the_same() {
    let Some((dir, rows)) = generate() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for name in ["ustar-stream.ova", "chunked.ova", "gzip-stream.ova", "pax-longname.ova"] {
        let row = rows.iter().find(|r| r["name"] == name).unwrap();
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let src: Arc<dyn ReadAt> = Arc::new(MemSource(Arc::from(bytes)));
        let image = Image::from_source(src, &OpenOptions::default()).unwrap();
        assert_eq!(image.format(), Format::Ova);
        let (sha, _) = sha_of_convert(&image, &tmp.path().join("mem.raw"), &ConvertOptions::default());
        assert_eq!(sha, row["sha256"], "{name}");
    }
}

#[test]
fn compressed_streams_keep_the_engines_guarantees() {
    let Some((dir, rows)) = generate() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let row = rows.iter().find(|r| r["name"] == "gzip-shuffled-stream.ova").unwrap();
    let path = dir.join("gzip-shuffled-stream.ova");
    let image = Image::open(&path, &OpenOptions::default()).unwrap();
    let size = image.virtual_size();
    // Map and reads refuse with one line; the copy goes front to back.
    let e = image.extents().next().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("front to back"), "{e}");

    // An existing target full of garbage: holes of the stream are zeroed, nothing past the disk
    // is touched; progress rises to the total.
    let out = tmp.path().join("existing.raw");
    let tail = b"keep me".repeat(1000);
    let mut garbage = vec![0xa5u8; size as usize];
    garbage.extend_from_slice(&tail);
    std::fs::write(&out, &garbage).unwrap();
    let seen = Mutex::new(Vec::new());
    let progress = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
    let o = ConvertOptions {
        threads: Some(3),
        must_exist: true,
        progress: Some(&progress),
        progress_interval: std::time::Duration::from_millis(1),
        ..ConvertOptions::default()
    };
    let report = convert(&image, &out, &o).unwrap();
    assert!(report.bytes_zeroed > 0 && report.bytes_written > 0, "{report:?}");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(common::hex(&sha2_of(&got[..size as usize])), row["sha256"]);
    assert!(got[size as usize..] == tail[..]);
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.last(), Some(&(size, size)));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");

    // With --target-is-zero nothing is zeroed.
    let zeroed = tmp.path().join("zero.raw");
    std::fs::write(&zeroed, vec![0u8; size as usize]).unwrap();
    let o = ConvertOptions { must_exist: true, target_is_zero: true, ..ConvertOptions::default() };
    assert_eq!(convert(&image, &zeroed, &o).unwrap().bytes_zeroed, 0);

    // Cancellation stops the copy with its own error.
    let cancel = AtomicBool::new(true);
    let o = ConvertOptions { cancel: Some(&cancel), ..ConvertOptions::default() };
    let e = convert(&image, tmp.path().join("cancelled.raw"), &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled);

    // One thread gives the same content as three.
    let calls = AtomicU64::new(0);
    let count = |_: u64, _: u64| {
        calls.fetch_add(1, Ordering::Relaxed);
    };
    let o = ConvertOptions { threads: Some(1), progress: Some(&count), ..ConvertOptions::default() };
    let (sha, _) = sha_of_convert(&image, &tmp.path().join("serial.raw"), &o);
    assert_eq!(sha, row["sha256"]);
    assert!(calls.load(Ordering::Relaxed) >= 1);
}

fn sha2_of(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}
