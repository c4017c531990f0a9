//! The VHD writer driven like the copy engine drives it (items in shuffled order from several
//! threads), then read back by vdisk's reader and by qemu-img.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::image::{Image, OpenOptions};

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

/// `size` bytes of guest content: per 2 MiB block, all zero, all random, or a mix of random and
/// zero 64 KiB pieces, so both allocated and unallocated blocks and zero runs inside data occur.
fn content(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = vec![0u8; size];
    for block in out.chunks_mut(BLOCK_SIZE as usize) {
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

/// Feed `content` to `w` as the engine does: items of one or two alignment units (the last one
/// short), in shuffled order, from `threads` threads; all-zero items go to `zero` or `write`
/// alternately. Returns what `finish` returns.
fn drive(w: &dyn FormatWriter, content: &[u8], threads: usize, seed: u64) -> u64 {
    let align = usize::try_from(w.alignment()).unwrap();
    let mut items = Vec::new();
    let mut off = 0;
    while off < content.len() {
        let len = (align * (1 + items.len() % 2)).min(content.len() - off);
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

/// Write `content` as a VHD at `path`; returns the file length `finish` reported.
fn write_vhd(path: &Path, size: u64, content: &[u8], options: &VhdOptions, seed: u64) -> u64 {
    let file = File::options().read(true).write(true).create_new(true).open(path).unwrap();
    let w = create(file, size, options).unwrap();
    assert_eq!(w.alignment(), BLOCK_SIZE);
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
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-img's view: its virtual size and its raw conversion.
fn qemu_read(path: &Path, dir: &Path) -> (u64, Vec<u8>) {
    let info = qemu_img(&["info", "-f", "vpc", "--output", "json", path.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let raw = dir.join("qemu.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", path.to_str().unwrap(), raw.to_str().unwrap()]);
    (info["virtual-size"].as_u64().unwrap(), std::fs::read(&raw).unwrap())
}

/// Blocks of `content` holding a non-zero byte.
fn nonzero_blocks(content: &[u8]) -> u64 {
    content.chunks(BLOCK_SIZE as usize).filter(|b| !is_zero(b)).count() as u64
}

fn footer_at(bytes: &[u8]) -> super::super::footer::Footer {
    super::super::footer::Footer::parse(bytes.try_into().unwrap()).unwrap()
}

#[test]
fn geometry_follows_the_specification_as_windows_writes_it() {
    let chs = |size: u64| {
        let g = geometry(size);
        (g.cylinders, g.heads, g.sectors)
    };
    // Sizes and geometries of Windows-made VHDs in the corpus.
    assert_eq!(chs(10 << 20), (301, 4, 17));
    assert_eq!(chs(3 << 20), (90, 4, 17));
    assert_eq!(chs(136_365_211_648), (65278, 16, 255));
    // qemu-img rounds 100 MiB up to 1004/12/17; the specification's geometry covers at most the size.
    assert_eq!(chs(100 << 20), (1003, 12, 17));
    assert_eq!(chs(1 << 30), (2080, 16, 63));
    assert_eq!(chs(4 << 40), (65535, 16, 255));
    assert_eq!(chs(0), (0, 4, 17));
    for size in [512, 1 << 20, 127 << 20, 5 << 30, 31 << 30, 127 << 30, 1 << 40] {
        assert!(geometry(size).bytes() <= size, "{size}");
    }
}

#[test]
fn options_parse_like_qemu_img() {
    let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert_eq!(VhdOptions::from_pairs(&[]).unwrap(), VhdOptions::default());
    assert_eq!(VhdOptions::default().subformat, Subformat::Dynamic);
    let o = VhdOptions::from_pairs(&pairs(&[("subformat", "fixed"), ("force_size", "on")])).unwrap();
    assert_eq!(o, VhdOptions { subformat: Subformat::Fixed, force_size: true });
    let o = VhdOptions::from_pairs(&pairs(&[("subformat", "dynamic"), ("force_size", "off")])).unwrap();
    assert_eq!(o, VhdOptions { subformat: Subformat::Dynamic, force_size: false });
    for (bad, names) in [
        (vec![("subformat", "differencing")], "subformat"),
        (vec![("force_size", "maybe")], "force_size"),
        (vec![("block_size", "2M")], "block_size"),
    ] {
        let e = VhdOptions::from_pairs(&pairs(&bad)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Target);
        assert!(e.to_string().contains(names), "{e}");
    }
}

#[test]
fn fixed_100_mib_is_exact_allocated_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixed.vhd");
    let size: u64 = 100 << 20;
    let mut data = vec![0u8; size as usize];
    // Data at the start, in the middle and in the last sector; zeros elsewhere.
    let sample = content(6 << 20, 7);
    data[..sample.len()].copy_from_slice(&sample);
    data[50 << 20..(50 << 20) + sample.len()].copy_from_slice(&sample);
    data[size as usize - 512..].fill(0xa5);
    let options = VhdOptions { subformat: Subformat::Fixed, force_size: false };
    let len = write_vhd(&path, size, &data, &options, 1);
    assert_eq!(len, size + 512, "a fixed VHD is the disk plus the footer, never rounded to CHS");
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.blocks() * 512 >= len, "the fixed VHD is sparse: {} bytes allocated", meta.blocks() * 512);
    let m = measure(size, &|_| Ok(0), &options).unwrap();
    assert_eq!((m.required, m.fully_allocated), (len, len));

    let bytes = std::fs::read(&path).unwrap();
    let f = footer_at(&bytes[size as usize..]);
    assert_eq!(f.disk_type(), Some(super::super::footer::DiskType::Fixed));
    assert_eq!((f.current_size, f.original_size, f.data_offset), (size, size, u64::MAX));
    assert_eq!((&f.creator_app, &f.creator_host), (b"vdsk", b"Wi2k"));
    assert_eq!(f.geometry, geometry(size));
    assert_eq!((f.features, f.format_version), (2, 0x0001_0000));
    assert!(f.timestamp > 800_000_000, "timestamp {} is not 'now' since 2000", f.timestamp);
    assert_eq!(f.unique_id[6] >> 4, 4, "a version 4 UUID");

    let (img, read) = vdisk_read(&path);
    assert_eq!(img.format(), crate::Format::Vhd);
    assert_eq!(img.virtual_size(), size);
    assert!(read == data, "vdisk reads back different content");
    assert_eq!(Image::check_file(&path, &OpenOptions::default()).unwrap().corruptions, 0);
    if have_qemu() {
        let (qsize, qdata) = qemu_read(&path, dir.path());
        assert_eq!(qsize, size);
        assert!(qdata == data, "qemu-img reads back different content");
    }
}

#[test]
fn dynamic_round_trips_with_zero_blocks_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    // Not a whole number of blocks: the last block is partial.
    let size: u64 = (21 << 20) + 3 * 512;
    let data = content(size as usize, 42);
    let path = dir.path().join("dynamic.vhd");
    let options = VhdOptions::default();
    let len = write_vhd(&path, size, &data, &options, 3);
    let blocks = nonzero_blocks(&data);
    assert!(blocks > 2 && blocks < size.div_ceil(BLOCK_SIZE), "the sample needs zero and data blocks");
    let m = measure(size, &|unit| Ok(if unit == BLOCK_SIZE { blocks } else { unreachable!() }), &options).unwrap();
    assert_eq!(m.required, len, "measure predicts the file length");
    let (entries, first_slot) = dynamic_layout(size);
    assert_eq!(m.fully_allocated, first_slot + entries * BLOCK_SLOT + 4096);
    assert_eq!(len % 4096, 0, "the file ends on a 4 KiB boundary");

    let bytes = std::fs::read(&path).unwrap();
    let end = bytes.len() - 512;
    assert_eq!(bytes[..512], bytes[end..], "the footer copy at 0 is the footer");
    let f = footer_at(&bytes[end..]);
    assert_eq!((f.current_size, f.data_offset, f.disk_type_raw), (size, 512, 3));
    let h = super::super::dynamic::DynamicHeader::parse(&bytes[512..1536], 512).unwrap();
    assert!(h.checksum_ok);
    assert_eq!((h.table_offset, u64::from(h.max_table_entries), u64::from(h.block_size)), (1536, entries, BLOCK_SIZE));
    let bat = super::super::dynamic::decode_bat(&bytes[1536..1536 + 4 * entries as usize]);
    for (i, (&e, block)) in bat.iter().zip(data.chunks(BLOCK_SIZE as usize)).enumerate() {
        if is_zero(block) {
            assert_eq!(e, UNALLOCATED, "block {i} is zero and must stay unallocated");
        } else {
            let bitmap = u64::from(e) * 512;
            assert_eq!((bitmap + 512) % 4096, 0, "block {i}'s data is 4 KiB-aligned");
            assert!(bytes[bitmap as usize..bitmap as usize + 512].iter().all(|&b| b == 0xff));
        }
    }

    let (img, read) = vdisk_read(&path);
    assert_eq!(img.virtual_size(), size);
    assert!(read == data, "vdisk reads back different content");
    let report = Image::check_file(&path, &OpenOptions::default()).unwrap();
    assert_eq!((report.corruptions, report.allocated_clusters), (0, Some(blocks)));
    if have_qemu() {
        let (qsize, qdata) = qemu_read(&path, dir.path());
        assert_eq!(qsize, size);
        assert!(qdata == data, "qemu-img reads back different content");
    }
}

#[test]
fn empty_and_tiny_disks() {
    let dir = tempfile::tempdir().unwrap();
    // An all-zero dynamic disk holds no block.
    let size = 8 << 20;
    let path = dir.path().join("empty.vhd");
    let len = write_vhd(&path, size, &vec![0; size as usize], &VhdOptions::default(), 5);
    assert_eq!(len, 8192, "an empty dynamic VHD: footer, header, BAT, footer");
    assert!(vdisk_read(&path).1.iter().all(|&b| b == 0));
    // A size that is not whole sectors is rounded up to the next sector, as qemu-img does.
    for subformat in [Subformat::Fixed, Subformat::Dynamic] {
        let path = dir.path().join(format!("odd-{subformat:?}.vhd"));
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8 + 1).collect();
        let options = VhdOptions { subformat, force_size: false };
        write_vhd(&path, 1000, &data, &options, 6);
        let (img, read) = vdisk_read(&path);
        assert_eq!(img.virtual_size(), 1024);
        assert_eq!(&read[..1000], &data[..]);
        assert!(read[1000..].iter().all(|&b| b == 0));
        if subformat == Subformat::Fixed {
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 1536);
        }
    }
}

#[test]
fn dynamic_size_limit() {
    let dynamic = VhdOptions::default();
    let fixed = VhdOptions { subformat: Subformat::Fixed, force_size: true };
    assert!(measure(MAX_DYNAMIC_SIZE, &|_| Ok(0), &dynamic).is_ok());
    let e = measure(MAX_DYNAMIC_SIZE + 512, &|_| Ok(0), &dynamic).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Target);
    assert!(e.to_string().contains("2040 GiB"), "{e}");
    // The last block of the largest dynamic disk still has a 32-bit sector number.
    let (entries, first_slot) = dynamic_layout(MAX_DYNAMIC_SIZE);
    assert!((first_slot + entries * BLOCK_SLOT) / SECTOR < u64::from(RESERVING));
    // A fixed disk has no such limit (Azure takes up to 32 TiB).
    let m = measure(32 << 40, &|_| Ok(0), &fixed).unwrap();
    assert_eq!(m.required, (32 << 40) + 512);
    let dir = tempfile::tempdir().unwrap();
    let file = File::create(dir.path().join("big.vhd")).unwrap();
    assert!(create(file, MAX_DYNAMIC_SIZE + (1 << 20), &dynamic).is_err());
}

#[test]
fn a_write_past_the_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in [Subformat::Fixed, Subformat::Dynamic] {
        let file = File::create(dir.path().join(format!("{subformat:?}.vhd"))).unwrap();
        let w = create(file, 4 << 20, &VhdOptions { subformat, force_size: false }).unwrap();
        assert!(w.write(4 << 20, &[1; 512]).is_err());
        assert!(w.write(2 << 20, &vec![1; 3 << 20]).is_err());
        assert!(w.write(u64::MAX - 511, &[1; 512]).is_err());
    }
}

#[test]
fn threads_racing_for_one_block_allocate_it_once() {
    // Smaller pieces than the engine sends, so several threads reach each block at once.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.vhd");
    let size: u64 = 8 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 255) as u8 + 1).collect();
    let file = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    let w = create(file, size, &VhdOptions::default()).unwrap();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                // Interleave the blocks: piece k goes to block k % 4.
                let (block, piece) = (k % 4, k / 4);
                if piece >= 512 {
                    break;
                }
                let at = block * (2 << 20) + piece * 4096;
                w.write(at as u64, &data[at..at + 4096]).unwrap();
            });
        }
    });
    let len = w.finish().unwrap();
    let (_, first_slot) = dynamic_layout(size);
    assert_eq!(len, first_slot + 4 * BLOCK_SLOT + 4096, "each block allocated exactly once");
    assert!(vdisk_read(&path).1 == data);
}

/// `name` unpacked from the shared real-image corpus into `dir`, when the corpus is there.
fn corpus_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let archive = [root.join("../shared/corpus/corpus.tar.xz"), root.join("../../shared/corpus/corpus.tar.xz")]
        .into_iter()
        .find(|p| p.is_file());
    let Some(archive) = archive else {
        eprintln!("SKIP: the shared corpus is not here; layout not compared with Windows' files");
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
fn layout_matches_what_windows_writes() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 10 << 20;
    // Windows 10's fixed 10 MiB VHD: the footer agrees on every field but the creator, the
    // time and the id.
    let Some(theirs) = corpus_file(dir.path(), "dissect-hyperv-win10-fixed.vhd") else { return };
    let theirs = std::fs::read(theirs).unwrap();
    assert_eq!(theirs.len() as u64, size + 512);
    let ours = dir.path().join("fixed.vhd");
    let data = content(size as usize, 9);
    write_vhd(&ours, size, &data, &VhdOptions { subformat: Subformat::Fixed, force_size: false }, 8);
    let ours = std::fs::read(ours).unwrap();
    assert_eq!(ours.len(), theirs.len());
    let (a, b) = (footer_at(&ours[size as usize..]), footer_at(&theirs[size as usize..]));
    let fields = |f: &super::super::footer::Footer| {
        (f.features, f.format_version, f.data_offset, f.creator_host, f.original_size, f.current_size)
    };
    assert_eq!(fields(&a), fields(&b));
    assert_eq!((a.geometry, a.disk_type_raw, a.saved_state), (b.geometry, b.disk_type_raw, b.saved_state));
    assert_eq!(&ours[size as usize + 85..], &theirs[size as usize + 85..], "reserved bytes");

    // Windows 10's dynamic 10 MiB VHD with three blocks: same header, BAT place, block slots.
    let Some(theirs) = corpus_file(dir.path(), "dissect-hyperv-win10-dynamic.vhd") else { return };
    let theirs = std::fs::read(theirs).unwrap();
    let ours = dir.path().join("dynamic.vhd");
    let mut data = vec![0u8; size as usize];
    data[..6 << 20].fill(0x5a);
    write_vhd(&ours, size, &data, &VhdOptions::default(), 9);
    let ours = std::fs::read(ours).unwrap();
    assert_eq!(ours.len(), theirs.len(), "three blocks take the same file space");
    let header = |b: &[u8]| super::super::dynamic::DynamicHeader::parse(&b[512..1536], 512).unwrap();
    let (a, b) = (header(&ours), header(&theirs));
    assert_eq!(
        (a.table_offset, a.max_table_entries, a.block_size, a.bitmap_size()),
        (b.table_offset, b.max_table_entries, b.block_size, b.bitmap_size())
    );
    // Both dynamic headers: data offset all ones, version 1.0, the same reserved and parent fields.
    assert_eq!(&ours[512 + 8..512 + 16], &theirs[512 + 8..512 + 16]);
    assert_eq!(&ours[512 + 24..512 + 28], &theirs[512 + 24..512 + 28]);
    assert_eq!(&ours[512 + 40..1536], &theirs[512 + 40..1536]);
    let bat = |b: &[u8]| {
        let mut v = super::super::dynamic::decode_bat(&b[1536..1536 + 20]);
        v.sort_unstable();
        v
    };
    assert_eq!(bat(&ours), bat(&theirs), "blocks in the same slots");
    // The table padded with unallocated entries to 4 KiB, then zeros up to the first bitmap.
    assert_eq!(&ours[1536 + 20..7680], &theirs[1536 + 20..7680]);
    let (fa, fb) = (footer_at(&ours[..512]), footer_at(&theirs[..512]));
    assert_eq!(fields(&fa), fields(&fb));
}

#[test]
fn the_output_is_emptied_and_must_be_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reused.vhd");
    std::fs::write(&path, vec![0xee; 9 << 20]).unwrap();
    let mut data = vec![0u8; 6 << 20];
    data[..4096].fill(7);
    let file = File::options().read(true).write(true).open(&path).unwrap();
    let w = create(file, data.len() as u64, &VhdOptions::default()).unwrap();
    // Only the first 4 KiB of block 0 is written: the rest of its slot must read as zero.
    w.write(0, &data[..4096]).unwrap();
    w.finish().unwrap();
    assert!(vdisk_read(&path).1 == data, "old bytes show through");
    let dev = File::options().write(true).open("/dev/null").unwrap();
    assert_eq!(create(dev, 1 << 20, &VhdOptions::default()).unwrap_err().kind(), crate::ErrorKind::Target);
}

#[test]
fn a_zero_size_disk() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in [Subformat::Fixed, Subformat::Dynamic] {
        let path = dir.path().join(format!("zero-{subformat:?}.vhd"));
        let len = write_vhd(&path, 0, &[], &VhdOptions { subformat, force_size: false }, 1);
        assert_eq!(len, if subformat == Subformat::Fixed { 512 } else { 8192 });
        assert_eq!(vdisk_read(&path).0.virtual_size(), 0);
        // qemu-img 10 cannot open a zero-size fixed VHD, not even the one it makes itself
        // ("Error reading dynamic VHD header"), so only vdisk reads these back.
    }
}

mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// A disk of up to 12 MiB and 1 to 6 runs of a byte value at any sector-aligned place.
    fn layout() -> impl Strategy<Value = (u64, Vec<(u64, u64, u8)>, bool, u64)> {
        (1u64..=24 * 1024).prop_flat_map(|sectors| {
            let size = sectors * 512;
            let run = (0..size, 1..=size.min(3 << 20), any::<u8>());
            (Just(size), prop::collection::vec(run, 1..6), any::<bool>(), any::<u64>())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random layouts written in random order read back as written.
        #[test]
        fn random_layouts_read_back((size, runs, fixed, seed) in layout()) {
            let mut data = vec![0u8; usize::try_from(size).unwrap()];
            for (start, len, byte) in runs {
                let end = (start + len).min(size);
                data[start as usize..end as usize].fill(byte);
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.vhd");
            let subformat = if fixed { Subformat::Fixed } else { Subformat::Dynamic };
            let options = VhdOptions { subformat, force_size: false };
            let len = write_vhd(&path, size, &data, &options, seed);
            let blocks = nonzero_blocks(&data);
            prop_assert_eq!(measure(size, &|_| Ok(blocks), &options).unwrap().required, len);
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
    let path = dir.path().join("dense.vhd");
    let size: u64 = 20 << 20;
    let data = content(size as usize, 77);
    assert!(data.chunks(BLOCK_SIZE as usize).any(is_zero), "the sample needs zero items");
    let file = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    let w = create_with(file, size, &VhdOptions { subformat: Subformat::Fixed, force_size: false }, false).unwrap();
    assert_eq!(drive(w.as_ref(), &data, 3, 13), size + 512);
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.blocks() * 512 >= size + 512, "the fixed VHD is sparse: {} bytes allocated", meta.blocks() * 512);
    assert!(vdisk_read(&path).1 == data);
    if have_qemu() {
        assert!(qemu_read(&path, dir.path()).1 == data, "qemu-img reads back different content");
    }
}
