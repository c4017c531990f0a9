//! The VHDX writer driven like the copy engine drives it (items in shuffled order from several
//! threads), then checked by qemu-img and read back by vdisk's reader and by qemu-img.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::formats::vhdx::bat::decode;
use crate::formats::vhdx::bat::BlockState;
use crate::image::{Image, OpenOptions};
use crate::io::ReadAt;
use crate::limits::MetadataBudget;

/// A deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `size` bytes of guest content: per `unit`, all zero, all random, or a mix of random and zero
/// 64 KiB pieces.
fn content(size: usize, unit: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = vec![0u8; size];
    for block in out.chunks_mut(unit) {
        match rng.below(3) {
            0 => {}
            1 => block.iter_mut().for_each(|b| *b = rng.next() as u8),
            _ => {
                for piece in block.chunks_mut(64 << 10) {
                    if rng.below(2) == 0 {
                        piece.iter_mut().for_each(|b| *b = rng.next() as u8 | 1);
                    }
                }
            }
        }
    }
    out
}

/// Feed `content` to `w` as the engine does: items of one to four alignment units (the last one
/// short), in shuffled order, from `threads` threads; all-zero items go to `zero` or `write`
/// alternately. Returns what `finish` returns.
fn drive(w: &dyn FormatWriter, content: &[u8], threads: usize, seed: u64) -> u64 {
    let align = usize::try_from(w.alignment()).unwrap();
    let mut items = Vec::new();
    let mut off = 0;
    while off < content.len() {
        let len = (align * (1 + items.len() % 4)).min(content.len() - off);
        items.push((off, len));
        off += len;
    }
    let mut rng = Rng(seed);
    for i in (1..items.len()).rev() {
        items.swap(i, usize::try_from(rng.below(i as u64 + 1)).unwrap());
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(o, l)) = items.get(k) else { break };
                let data = &content[o..o + l];
                if is_zero(data) && k % 2 == 0 {
                    w.zero(o as u64, l as u64).unwrap();
                } else {
                    w.write(o as u64, data).unwrap();
                }
            });
        }
    });
    w.finish().unwrap()
}

fn options(pairs: &[(&str, &str)]) -> VhdxOptions {
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    VhdxOptions::from_pairs(&pairs).unwrap()
}

/// Write `content` as a VHDX at `path`; returns the file length `finish` reported.
fn write_vhdx(path: &Path, content: &[u8], o: &VhdxOptions, seed: u64) -> u64 {
    let file = File::options().read(true).write(true).create_new(true).open(path).unwrap();
    let w = create(file, content.len() as u64, o).unwrap();
    let len = drive(w.as_ref(), content, 4, seed);
    assert_eq!(std::fs::metadata(path).unwrap().len(), len);
    len
}

/// The content as vdisk's reader reads it.
fn vdisk_read(path: &Path) -> (Image, Vec<u8>) {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let mut out = vec![0u8; usize::try_from(img.virtual_size()).unwrap()];
    let mut done = 0;
    while done < out.len() {
        let n = img.read_at(&mut out[done..], done as u64).unwrap();
        assert!(n > 0);
        done += n;
    }
    (img, out)
}

/// True when qemu-img runs; otherwise says the qemu comparisons are skipped (fails on CI).
fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "qemu-img is required on CI");
        eprintln!("SKIP: qemu-img not found; qemu comparisons not run");
    }
    ok
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-img's view: `check` must be clean; returns its virtual size and its raw conversion.
fn qemu_read(path: &Path, dir: &Path) -> (u64, Vec<u8>) {
    let p = path.to_str().unwrap();
    let check = qemu_img(&["check", "-f", "vhdx", "--output", "json", p]);
    let check: serde_json::Value = serde_json::from_str(&check).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        assert!(check.get(key).is_none_or(|v| v.as_u64() == Some(0)), "qemu-img check: {check}");
    }
    let info = qemu_img(&["info", "-f", "vhdx", "--output", "json", p]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let raw = dir.join("qemu.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw", p, raw.to_str().unwrap()]);
    (info["virtual-size"].as_u64().unwrap(), std::fs::read(&raw).unwrap())
}

/// What the reader's own parsers make of the file: region table, metadata, payload states.
struct Parsed {
    regions: region::RegionTable,
    md: metadata::Metadata,
    /// The raw region table bytes (for the required flags).
    region_bytes: Vec<u8>,
    /// The raw BAT entries.
    bat: Vec<u64>,
}

fn parse(path: &Path) -> Parsed {
    let file = File::open(path).unwrap();
    let source = crate::io::FileSource::new(File::open(path).unwrap()).unwrap();
    let src: &dyn ReadAt = &source;
    let headers = header::read(src).unwrap();
    assert!(headers.problems.is_empty(), "{:?}", headers.problems);
    assert_eq!((headers.current.copy, headers.current.sequence_number), (2, 2));
    assert!(headers.current.log_guid.is_zero());
    assert!(headers.creator.starts_with("vdisk "), "{}", headers.creator);
    let log = region::Region { offset: headers.current.log_offset, length: headers.current.log_length };
    let regions = region::read(src, log).unwrap();
    assert!(regions.problems.is_empty(), "{:?}", regions.problems);
    let md = metadata::read(src, regions.table.metadata, &MetadataBudget::new(64 << 20)).unwrap();
    let mut region_bytes = vec![0u8; 128];
    file.read_exact_at(&mut region_bytes, REGION_TABLE_OFFSETS[0]).unwrap();
    let bat_len = usize::try_from(regions.table.bat.length).unwrap();
    let mut raw = vec![0u8; bat_len];
    file.read_exact_at(&mut raw, regions.table.bat.offset).unwrap();
    let bat = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    Parsed { regions: regions.table, md, region_bytes, bat }
}

/// Payload block `block`'s entry (skipping the interleaved sector bitmap entries).
fn payload(p: &Parsed, block: u64) -> BlockState {
    let ratio = SECTORS_PER_BITMAP_BLOCK * p.md.logical_sector_size / p.md.block_size;
    decode(p.bat[usize::try_from(block + block / ratio).unwrap()]).unwrap()
}

#[test]
fn options_parse_with_qemu_names_and_checks() {
    assert_eq!(VhdxOptions::from_pairs(&[]).unwrap(), VhdxOptions::default());
    let d = VhdxOptions::default();
    assert_eq!(
        (d.subformat, d.block_size, d.log_size, d.block_state_zero),
        (Subformat::Dynamic, 32 << 20, 1 << 20, false)
    );
    assert_eq!(d.logical_sector_size, 512);
    let o = options(&[
        ("subformat", "fixed"),
        ("block_size", "8M"),
        ("log_size", "2097152"),
        ("block_state_zero", "on"),
        ("logical_sector_size", "4k"),
    ]);
    assert_eq!(
        o,
        VhdxOptions {
            subformat: Subformat::Fixed,
            block_size: 8 << 20,
            log_size: 2 << 20,
            block_state_zero: true,
            logical_sector_size: 4096
        }
    );
    assert_eq!(options(&[("block_size", "0")]).block_size, 32 << 20);
    assert_eq!(options(&[("block_size", "256M")]).block_size, 256 << 20);
    assert_eq!(options(&[("block_size", "1048576")]).block_size, 1 << 20);
    for (key, value) in [
        ("subformat", "differencing"),
        ("block_size", "3M"),
        ("block_size", "512K"),
        ("block_size", "512M"),
        ("block_size", "32Q"),
        ("block_size", "M"),
        ("log_size", "0"),
        ("log_size", "1536K"),
        ("log_size", "8G"),
        ("logical_sector_size", "1024"),
        ("block_state_zero", "maybe"),
        ("cluster_size", "64k"),
    ] {
        let e = VhdxOptions::from_pairs(&[(key.to_string(), value.to_string())]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Target);
        assert!(e.to_string().contains(key), "{e}");
    }
}

#[test]
fn dynamic_default_is_hyper_v_layout_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dynamic.vhdx");
    // Four 32 MiB blocks and a partial fifth; block 1 all zero.
    let size = (128 << 20) + (3 << 20) + 1536;
    let mut data = content(size, 4 << 20, 11);
    data[32 << 20..64 << 20].fill(0);
    let o = VhdxOptions::default();
    let len = write_vhdx(&path, &data, &o, 2);
    let blocks: Vec<bool> = data.chunks(32 << 20).map(|b| !is_zero(b)).collect();
    let used = blocks.iter().filter(|&&b| b).count() as u64;
    assert_eq!(used, 4, "the sample has four data blocks and one zero block");
    let m = measure(size as u64, &|unit| Ok(if unit == 32 << 20 { used } else { unreachable!() }), &o).unwrap();
    assert_eq!(m.required, len, "measure predicts the file length");
    assert_eq!(m.fully_allocated, (4 << 20) + 5 * (32 << 20));

    let p = parse(&path);
    // Hyper-V's layout: log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB, both regions required.
    assert_eq!((p.regions.metadata.offset, p.regions.bat.offset, p.regions.bat.length), (2 << 20, 3 << 20, 1 << 20));
    assert_eq!(&p.region_bytes[16..20], &BAT_REGION.0[..4]);
    for entry in 0..2 {
        let at = 16 + 32 * entry + 28;
        assert_eq!(u32::from_le_bytes(p.region_bytes[at..at + 4].try_into().unwrap()), 1, "entry {entry} required");
    }
    assert_eq!((p.md.block_size, p.md.logical_sector_size, p.md.physical_sector_size), (32 << 20, 512, 4096));
    assert_eq!(p.md.virtual_size, size as u64);
    assert!(!p.md.leave_blocks_allocated && !p.md.has_parent);
    assert!(p.md.page83.is_some_and(|g| !g.is_zero()));
    let mut offsets = Vec::new();
    for (i, &present) in blocks.iter().enumerate() {
        match payload(&p, i as u64) {
            BlockState::FullyPresent(off) => {
                assert!(present, "block {i} is zero but allocated");
                assert!(off % (1 << 20) == 0 && off >= 4 << 20);
                offsets.push(off);
            }
            BlockState::NotPresent => assert!(!present, "block {i} holds data but is not present"),
            s => panic!("block {i}: {s:?}"),
        }
    }
    offsets.sort_unstable();
    assert!(offsets.windows(2).all(|w| w[1] - w[0] >= 32 << 20), "blocks overlap: {offsets:?}");

    let (img, read) = vdisk_read(&path);
    assert_eq!(img.virtual_size(), size as u64);
    assert!(read == data, "vdisk reads back different content");
    assert_eq!(Image::check_file(&path, &OpenOptions::default()).unwrap().corruptions, 0);
    if have_qemu() {
        let (qsize, qdata) = qemu_read(&path, dir.path());
        assert_eq!(qsize, size as u64);
        assert!(qdata == data, "qemu-img reads back different content");
    }
}

#[test]
fn small_blocks_zero_state_and_a_long_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.vhdx");
    let size = (19 << 20) + 512;
    let data = content(size, 1 << 20, 23);
    let o = options(&[("block_size", "1M"), ("log_size", "3M"), ("block_state_zero", "on")]);
    let len = write_vhdx(&path, &data, &o, 4);
    let used = data.chunks(1 << 20).filter(|b| !is_zero(b)).count() as u64;
    assert!(used > 3 && used < 20);
    assert_eq!(measure(size as u64, &|_| Ok(used), &o).unwrap().required, len);
    let p = parse(&path);
    assert_eq!((p.regions.metadata.offset, p.regions.bat.offset), (4 << 20, 5 << 20));
    for (i, block) in data.chunks(1 << 20).enumerate() {
        let state = payload(&p, i as u64);
        if is_zero(block) {
            assert_eq!(state, BlockState::Zero, "block {i}");
            assert_eq!(p.bat[i] >> OFFSET_SHIFT, 0, "a ZERO entry's offset must be 0 for Hyper-V");
        } else {
            assert!(matches!(state, BlockState::FullyPresent(_)), "block {i}: {state:?}");
        }
    }
    assert!(vdisk_read(&path).1 == data);
    if have_qemu() {
        assert!(qemu_read(&path, dir.path()).1 == data, "qemu-img reads back different content");
    }
}

#[test]
fn fixed_is_fully_present_and_allocated() {
    let dir = tempfile::tempdir().unwrap();
    for (name, zero_state) in [("fixed.vhdx", false), ("fixed-zero.vhdx", true)] {
        let path = dir.path().join(name);
        let size = 40 << 20;
        let mut data = content(size, 2 << 20, 31);
        data[8 << 20..16 << 20].fill(0);
        let o = options(&[
            ("subformat", "fixed"),
            ("block_size", "8M"),
            ("block_state_zero", if zero_state { "on" } else { "off" }),
        ]);
        let len = write_vhdx(&path, &data, &o, 5);
        assert_eq!(len, (4 << 20) + 5 * (8 << 20));
        let m = measure(size as u64, &|_| Ok(0), &o).unwrap();
        assert_eq!((m.required, m.fully_allocated), (len, len));
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 >= len, "the fixed VHDX is sparse: {} bytes allocated", meta.blocks() * 512);
        let p = parse(&path);
        assert!(p.md.leave_blocks_allocated);
        for i in 0..5u64 {
            let state = payload(&p, i);
            if zero_state && i == 1 {
                assert_eq!(state, BlockState::Zero);
            } else {
                assert_eq!(state, BlockState::FullyPresent((4 << 20) + i * (8 << 20)), "block {i}");
            }
        }
        assert!(vdisk_read(&path).1 == data);
        if have_qemu() {
            assert!(qemu_read(&path, dir.path()).1 == data, "qemu-img reads back different content");
        }
    }
}

#[test]
fn logical_4096_sectors_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("4k.vhdx");
    // Rounded up to whole 4 KiB sectors.
    let size = (9 << 20) + 4096;
    let data = content(size, 1 << 20, 41);
    let o = options(&[("logical_sector_size", "4096"), ("block_size", "2M")]);
    let file = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    let w = create(file, size as u64 - 1000, &o).unwrap();
    let mut data = data;
    data[size - 1000..].fill(0);
    drive(w.as_ref(), &data[..size - 1000], 3, 6);
    let p = parse(&path);
    assert_eq!((p.md.logical_sector_size, p.md.physical_sector_size, p.md.virtual_size), (4096, 4096, size as u64));
    let (img, read) = vdisk_read(&path);
    assert_eq!(img.virtual_size(), size as u64);
    assert!(read == data, "vdisk reads back different content");
    if have_qemu() {
        // qemu-img 10 opens only 512-byte logical sectors; where a later one opens this, it
        // must read the same content.
        let out = Command::new("qemu-img").args(["info", "-f", "vhdx", path.to_str().unwrap()]).output().unwrap();
        if out.status.success() {
            let (qsize, qdata) = qemu_read(&path, dir.path());
            assert_eq!(qsize, size as u64);
            assert!(qdata == data, "qemu-img reads back different content");
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("not supported"), "{err}");
        }
    }
}

#[test]
fn sector_bitmap_entries_interleave_past_one_chunk() {
    // 1 MiB blocks and 512-byte sectors: a sector bitmap entry follows every 4096 payload
    // entries. A sparse 4.1 GiB disk with data on both sides of the first two chunk boundaries.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chunks.vhdx");
    let size: u64 = (8192 + 8) << 20;
    let o = options(&[("block_size", "1M")]);
    let file = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    let w = create(file, size, &o).unwrap();
    let blocks = [0u64, 4095, 4096, 4098, 8190, 8192, 8198];
    // The blocks after these hold no data.
    let gaps = [1u64, 4097, 4099, 8191, 8193, 8199];
    for (k, block) in blocks.into_iter().enumerate() {
        w.write(block << 20, &vec![k as u8 + 1; 1 << 20]).unwrap();
    }
    let len = w.finish().unwrap();
    let p = parse(&path);
    // 8200 payload entries and two sector bitmap entries (after payloads 4095 and 8191).
    assert_eq!(p.bat.iter().take(8202).filter(|&&e| e & 7 == 6).count(), 7);
    assert_eq!((p.bat[4096], p.bat[8193]), (0, 0), "sector bitmap entries are not present");
    assert_eq!(len, p.regions.bat.end() + 7 * (1 << 20));
    let img = Image::open(&path, &OpenOptions::default()).unwrap();
    for (k, block) in blocks.into_iter().enumerate() {
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, block << 20).unwrap();
        assert!(buf.iter().all(|&b| b == k as u8 + 1), "block {block}");
    }
    for block in gaps {
        let mut buf = vec![1u8; 1 << 20];
        img.read_at(&mut buf, block << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "block {block}");
    }
    if have_qemu() {
        let p = path.to_str().unwrap();
        let check = qemu_img(&["check", "-f", "vhdx", p]);
        assert!(check.contains("No errors"), "{check}");
        // Each written block reads its pattern, the blocks between read zero (qemu-io exits 0
        // even when a pattern does not match, so its output is checked).
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "vhdx", "-r"]);
        for (k, block) in blocks.into_iter().enumerate() {
            cmd.arg("-c").arg(format!("read -P {} {} 1M", k + 1, block << 20));
        }
        for block in gaps {
            cmd.arg("-c").arg(format!("read -P 0 {} 1M", block << 20));
        }
        let out = cmd.arg(p).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("Pattern verification failed"), "{text}");
        assert_eq!(text.matches("read 1048576/1048576 bytes").count(), 13, "{text}");
    }
}

#[test]
fn limits_and_writes_past_the_end() {
    let o = VhdxOptions::default();
    assert!(measure(64 << 40, &|_| Ok(0), &o).is_ok());
    let e = measure((64 << 40) + 1, &|_| Ok(0), &o).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Target);
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["dynamic", "fixed"] {
        let file = File::create(dir.path().join(subformat)).unwrap();
        let w = create(file, 4 << 20, &options(&[("subformat", subformat), ("block_size", "1M")])).unwrap();
        assert_eq!(w.alignment(), 1 << 20);
        assert!(w.write(4 << 20, &[1; 512]).is_err());
        assert!(w.write(3 << 20, &vec![1; 2 << 20]).is_err());
        assert!(w.write(u64::MAX - 511, &[1; 512]).is_err());
    }
}

/// `name` unpacked from the shared real-image corpus into `dir`, when the corpus is there.
fn corpus_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let archive = [root.join("../shared/corpus/corpus.tar.xz"), root.join("../../shared/corpus/corpus.tar.xz")]
        .into_iter()
        .find(|p| p.is_file());
    let Some(archive) = archive else {
        eprintln!("SKIP: the shared corpus is not here; layout not compared with Hyper-V's files");
        return None;
    };
    let ok = Command::new("tar")
        .arg("-xSJf")
        .arg(&archive)
        .arg("-C")
        .arg(dir)
        .arg(format!("./{name}"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot unpack {name} from {}", archive.display());
    Some(dir.join(name))
}

#[test]
fn layout_matches_what_hyper_v_writes() {
    // A dynamic 10 MiB disk made by Windows 10 1909 (build 18363) with one block written.
    let dir = tempfile::tempdir().unwrap();
    let Some(theirs) = corpus_file(dir.path(), "dissect-hyperv-win10-18363-dynamic.vhdx") else { return };
    let ours = dir.path().join("ours.vhdx");
    let mut data = vec![0u8; 10 << 20];
    data[..4096].fill(0x33);
    write_vhdx(&ours, &data, &VhdxOptions::default(), 10);
    let (a, b) = (std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
    assert_eq!(a.len(), b.len(), "one 32 MiB block after the same metadata");
    let same = |range: std::ops::Range<usize>, what: &str| {
        let first = range.clone().find(|&i| a[i] != b[i]);
        assert!(first.is_none(), "{what} differs from Hyper-V's at {:#x}", first.unwrap_or(0));
    };
    // Headers: everything but the checksum, sequence number and GUIDs (bytes 64..4096).
    for at in HEADER_OFFSETS {
        let at = usize::try_from(at).unwrap();
        same(at + 64..at + 4096, "a header");
    }
    // Region tables: identical, checksum included.
    for at in REGION_TABLE_OFFSETS {
        let at = usize::try_from(at).unwrap();
        same(at..at + REGION_TABLE_SIZE, "a region table");
    }
    // Metadata: the same table header and five entries (Windows leaves a stale sixth entry past
    // the count), and the same items except the random page 83 disk id.
    let md = 2 << 20;
    same(md..md + 32 * 6, "the metadata table");
    assert!(is_zero(&a[md + 32 * 6..md + (64 << 10)]));
    let items = md + (64 << 10);
    same(items..items + 24, "the metadata items");
    // The BAT: block 0 at 4 MiB, fully present; everything else not present.
    let bat = 3 << 20;
    same(bat..bat + (1 << 20), "the BAT");
    assert_eq!(u64::from_le_bytes(a[bat..bat + 8].try_into().unwrap()), (4 << 20) | 6);
}

#[test]
fn the_output_is_emptied_and_must_be_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reused.vhdx");
    std::fs::write(&path, vec![0xee; 12 << 20]).unwrap();
    let mut data = vec![0u8; 6 << 20];
    data[..1000].fill(7);
    let file = File::options().read(true).write(true).open(&path).unwrap();
    let w = create(file, data.len() as u64, &options(&[("block_size", "4M")])).unwrap();
    drive(w.as_ref(), &data, 2, 12);
    assert!(vdisk_read(&path).1 == data, "old bytes show through");
    let dev = File::options().write(true).open("/dev/null").unwrap();
    assert_eq!(create(dev, 1 << 20, &VhdxOptions::default()).unwrap_err().kind(), crate::ErrorKind::Target);
}

#[test]
fn a_zero_size_disk() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["dynamic", "fixed"] {
        let path = dir.path().join(format!("zero-{subformat}.vhdx"));
        let len = write_vhdx(&path, &[], &options(&[("subformat", subformat)]), 1);
        assert_eq!(len, 4 << 20);
        assert_eq!(vdisk_read(&path).0.virtual_size(), 0);
        // qemu-img 10 cannot open a zero-size VHDX unless its BAT region is big enough for the
        // (0 - 1) >> chunk_ratio_bits entries its unsigned arithmetic computes (its own empty
        // VHDX carries a 64 MiB BAT region for that), so only vdisk reads these back.
    }
}

mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// A disk of up to 12 MiB with 1 MiB or 2 MiB blocks, either sector size, and 1 to 6 runs of
    /// a byte value at any sector-aligned place.
    fn layout() -> impl Strategy<Value = (VhdxOptions, u64, Vec<(u64, u64, u8)>, u64)> {
        let o = (any::<bool>(), 20u32..=21, any::<bool>(), any::<bool>()).prop_map(|(fixed, shift, k4, zero)| {
            VhdxOptions {
                subformat: if fixed { Subformat::Fixed } else { Subformat::Dynamic },
                block_size: 1 << shift,
                block_state_zero: zero,
                logical_sector_size: if k4 { 4096 } else { 512 },
                ..VhdxOptions::default()
            }
        });
        (o, 1u64..=3 * 1024).prop_flat_map(|(o, units)| {
            let size = units * o.logical_sector_size;
            let run = (0..size, 1..=size.min(3 << 20), any::<u8>());
            (Just(o), Just(size), prop::collection::vec(run, 1..6), any::<u64>())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random layouts written in random order read back as written.
        #[test]
        fn random_layouts_read_back((o, size, runs, seed) in layout()) {
            let mut data = vec![0u8; usize::try_from(size).unwrap()];
            for (start, len, byte) in runs {
                let end = (start + len).min(size);
                data[start as usize..end as usize].fill(byte);
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.vhdx");
            let len = write_vhdx(&path, &data, &o, seed);
            let blocks = data.chunks(usize::try_from(o.block_size).unwrap()).filter(|b| !is_zero(b)).count() as u64;
            prop_assert_eq!(measure(size, &|_| Ok(blocks), &o).unwrap().required, len);
            let (img, read) = vdisk_read(&path);
            prop_assert_eq!(img.virtual_size(), size);
            prop_assert!(read == data);
        }
    }
}

#[test]
fn fixed_without_preallocation_writes_every_byte() {
    // Where fallocate is not supported, zeros are written: the file is still not sparse.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dense.vhdx");
    let size = (13 << 20) + 4096;
    let data = content(size, 1 << 20, 78);
    assert!(data.chunks(1 << 20).any(is_zero), "the sample needs zero items");
    let o = options(&[("subformat", "fixed"), ("block_size", "4M")]);
    let file = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    let w = create_with(file, size as u64, &o, false).unwrap();
    let len = drive(w.as_ref(), &data, 3, 14);
    assert_eq!(len, (4 << 20) + 4 * (4 << 20));
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.blocks() * 512 >= len, "the fixed VHDX is sparse: {} bytes allocated", meta.blocks() * 512);
    assert!(vdisk_read(&path).1 == data);
    if have_qemu() {
        assert!(qemu_read(&path, dir.path()).1 == data, "qemu-img reads back different content");
    }
}
