//! The VMDK writer against qemu-img and VMware's stream layout: generated sources exported as
//! streamOptimized, monolithicSparse and monolithicFlat must pass `qemu-img check`, compare
//! identical with the source, and read back identically through vdisk; a stream is walked
//! marker by marker (ascending grains, a table after each group, directory, footer, end of
//! stream) and its header compared with the footer and with the VMware-made stream of the corpus.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};
use vdisk_core::{export, measure, ExportOptions, Image, OpenOptions, OutputFormat};

const SECTOR: usize = 512;

/// A raw source: random and repetitive runs, written zeros and holes; `size` a sector multiple.
fn raw_source(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut pos = 0;
    while pos < size {
        let len = (rng.below(2 << 20) + 1).min(size - pos);
        let n = usize::try_from(len).unwrap();
        match rng.below(4) {
            0 => {
                let buf: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                f.write_all_at(&buf, pos).unwrap();
            }
            1 => {
                let text = b"streamOptimized grains compress well. ";
                let buf: Vec<u8> = (0..n).map(|i| text[i % text.len()]).collect();
                f.write_all_at(&buf, pos).unwrap();
            }
            2 => f.write_all_at(&vec![0u8; n], pos).unwrap(),
            _ => {}
        }
        pos += len;
    }
    path
}

fn content_hash(path: &Path) -> String {
    let img =
        Image::open(path, &OpenOptions { references: vdisk_core::ReferencePolicy::SameDir, ..Default::default() })
            .unwrap_or_else(|e| panic!("vdisk cannot open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < img.virtual_size() {
        let n = img.read_at(&mut buf, at).unwrap();
        h.update(&buf[..n]);
        at += n as u64;
    }
    hex(&h.finalize())
}

fn export_vmdk(src: &Path, out: &Path, options: &str, threads: usize) {
    let img = Image::open(src, &OpenOptions::default()).unwrap();
    let opts = ExportOptions {
        format: OutputFormat::Vmdk,
        options: vdisk_core::parse_option_pairs(options).unwrap(),
        threads: Some(threads),
        ..ExportOptions::default()
    };
    export(&img, out, &opts).unwrap_or_else(|e| panic!("export {options}: {e}"));
}

fn assert_good(src: &Path, src_fmt: &str, out: &Path) {
    let o = Command::new("qemu-img").args(["check", "-f", "vmdk"]).arg(out).output().unwrap();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("No errors"),
        "qemu-img check {}: {}{}",
        out.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("qemu-img").args(["compare", "-f", src_fmt, "-F", "vmdk"]).arg(src).arg(out).output().unwrap();
    assert!(o.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(content_hash(out), content_hash(src), "vdisk reads {} differently", out.display());
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Walk a stream front to back and check VMware's layout; returns the number of grains.
fn walk_stream(path: &Path) -> usize {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[0..4], b"KDMV");
    assert_eq!(le32(&b, 4), 3, "version");
    assert_eq!(le32(&b, 8), 0x30001, "flags: newline test, compressed, markers, no redundant GD");
    let capacity = le64(&b, 12);
    assert_eq!(le64(&b, 20), 128, "grain");
    assert_eq!(le32(&b, 44), 512, "GTEs per GT");
    assert_eq!(le64(&b, 48), 0, "rgdOffset");
    assert_eq!(le64(&b, 56), u64::MAX, "gdOffset = GD_AT_END");
    let overhead = usize::try_from(le64(&b, 64)).unwrap();
    assert_eq!(&b[73..77], b"\n \r\n");
    assert_eq!(u16::from_le_bytes([b[77], b[78]]), 1, "deflate");
    let desc = String::from_utf8_lossy(&b[512..usize::try_from(le64(&b, 36)).unwrap() * SECTOR + 512]);
    let desc = desc.trim_end_matches('\0');
    assert!(desc.starts_with("# Disk DescriptorFile\n"), "{desc}");
    for key in [
        "createType=\"streamOptimized\"",
        "ddb.adapterType = \"lsilogic\"",
        "ddb.longContentID = \"",
        "ddb.virtualHWVersion",
    ] {
        assert!(desc.contains(key), "{key} not in {desc}");
    }
    let mut pos = overhead * SECTOR;
    let mut last_lba: Option<u64> = None;
    let mut grains_in_group: Vec<(u64, u32)> = Vec::new();
    let mut tables: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut grains = 0;
    let mut gd: Option<(usize, Vec<u32>)> = None;
    loop {
        let value = le64(&b, pos);
        let size = le32(&b, pos + 8);
        if size > 0 {
            assert!(gd.is_none(), "grain after the directory");
            let lba = value;
            assert!(last_lba.is_none_or(|l| lba > l), "grains out of LBA order at {lba}");
            assert_eq!(lba % 128, 0);
            last_lba = Some(lba);
            grains_in_group.push((lba, u32::try_from(pos / SECTOR).unwrap()));
            grains += 1;
            pos += (12 + size as usize).div_ceil(SECTOR) * SECTOR;
            continue;
        }
        let kind = le32(&b, pos + 12);
        let sectors = usize::try_from(value).unwrap();
        let body = pos + SECTOR;
        match kind {
            1 => {
                assert_eq!(sectors, 4);
                let gt: Vec<u32> = (0..512).map(|i| le32(&b, body + 4 * i)).collect();
                assert!(!grains_in_group.is_empty(), "an empty grain table was written");
                let index = grains_in_group[0].0 / 128 / 512;
                for (lba, sector) in grains_in_group.drain(..) {
                    assert_eq!(lba / 128 / 512, index, "a group spans two grain tables");
                    assert_eq!(gt[usize::try_from(lba / 128 % 512).unwrap()], sector);
                }
                tables.push((body / SECTOR, gt));
            }
            2 => {
                assert!(grains_in_group.is_empty(), "grains without a table before the directory");
                let entries = usize::try_from(capacity.div_ceil(128).div_ceil(512)).unwrap();
                gd = Some((body / SECTOR, (0..entries).map(|i| le32(&b, body + 4 * i)).collect()));
            }
            3 => {
                assert_eq!(sectors, 1);
                let footer = &b[body..body + SECTOR];
                let (gd_sector, _) = gd.as_ref().expect("footer before the directory");
                assert_eq!(le64(footer, 56), *gd_sector as u64, "footer gdOffset");
                let mut expect = b[0..SECTOR].to_vec();
                expect[56..64].copy_from_slice(&(*gd_sector as u64).to_le_bytes());
                assert_eq!(footer, &expect[..], "the footer is the header with the real gdOffset");
            }
            0 => {
                assert_eq!(sectors, 0);
                assert_eq!(pos + SECTOR, b.len(), "end-of-stream marker is the last sector");
                assert!(b[pos..].iter().all(|&x| x == 0));
                break;
            }
            k => panic!("unknown marker {k} at {pos:#x}"),
        }
        pos = body + sectors * SECTOR;
    }
    let (_, gd) = gd.expect("no directory");
    let used: Vec<usize> = tables.iter().map(|(s, _)| *s).collect();
    let pointed: Vec<usize> = gd.iter().filter(|&&e| e != 0).map(|&e| e as usize).collect();
    assert_eq!(pointed, used, "the directory names exactly the tables written");
    grains
}

#[test]
fn stream_optimized_round_trips_and_has_vmware_layout() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, (size, threads)) in
        [((37 << 20) + 7 * 512, 3usize), (65536 * 512 * 2 + 512, 1), (1 << 20, 2)].iter().enumerate()
    {
        let src = raw_source(dir.path(), &format!("s{i}.raw"), *size, 20 + i as u64);
        let out = dir.path().join(format!("s{i}.vmdk"));
        export_vmdk(&src, &out, "", *threads);
        assert_good(&src, "raw", &out);
        walk_stream(&out);
    }
    // The same layout as the VMware-made stream of the corpus, where it is present.
    if let Some(corpus) = corpus_file("qemu-sample-esxi-version3.vmdk", dir.path()) {
        let vmware = std::fs::read(corpus).unwrap();
        let ours = std::fs::read(dir.path().join("s0.vmdk")).unwrap();
        for (at, len, what) in [
            (4, 4, "version"),
            (8, 4, "flags"),
            (20, 8, "grain"),
            (44, 4, "GTEs"),
            (56, 8, "gdOffset"),
            (64, 8, "overhead"),
            (73, 6, "newline chars and compression"),
        ] {
            assert_eq!(&ours[at..at + len], &vmware[at..at + len], "{what} differs from VMware's stream");
        }
    }
}

/// A file of the real-image corpus (`$VDISK_CORPUS_SOURCE`, else `../shared/corpus` beside the
/// repository), unpacked into `into`; `None` (after a SKIP line) when the corpus is absent.
fn corpus_file(name: &str, into: &Path) -> Option<PathBuf> {
    let root = match std::env::var_os("VDISK_CORPUS_SOURCE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"),
    };
    let archive = root.join("corpus.tar.xz");
    if !archive.is_file() {
        eprintln!("SKIP: corpus not found; comparison with VMware's stream not run");
        return None;
    }
    let status = Command::new("tar").arg("xJf").arg(&archive).arg("-C").arg(into).arg(format!("./{name}")).status();
    assert!(status.is_ok_and(|s| s.success()), "cannot unpack {name} from {}", archive.display());
    Some(into.join(name))
}

#[test]
fn stream_from_a_qcow2_with_compressed_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let size = 40u64 << 20;
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), &size.to_string()]);
    let mut rng = Rng::new(5);
    let mut cmds = Vec::new();
    for cmd in random_io_commands(&mut rng, size, 65536, 80, true) {
        if let Some(rest) = cmd.strip_prefix("write -c ") {
            let mut w = rest.split(' ').skip(2);
            cmds.push(format!("discard {} {}", w.next().unwrap(), w.next().unwrap()));
        }
        cmds.push(cmd);
    }
    for chunk in cmds.chunks(64) {
        qemu_io("qcow2", &src, chunk);
    }
    let out = dir.path().join("out.vmdk");
    export_vmdk(&src, &out, "", 4);
    assert_good(&src, "qcow2", &out);
    walk_stream(&out);
}

#[test]
fn monolithic_sparse_and_flat() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = raw_source(dir.path(), "m.raw", (45 << 20) + 3 * 512, 9);
    let sparse = dir.path().join("sparse.vmdk");
    export_vmdk(&src, &sparse, "subformat=monolithicSparse,adapter_type=ide,hwversion=14", 3);
    assert_good(&src, "raw", &sparse);
    let b = std::fs::read(&sparse).unwrap();
    assert_eq!(le32(&b, 4), 1);
    assert_eq!(le32(&b, 8), 3, "newline test and redundant directory");
    let text = String::from_utf8_lossy(&b[512..512 * 21]);
    assert!(text.contains("createType=\"monolithicSparse\"") && text.contains("ddb.adapterType = \"ide\""));
    assert!(text.contains("ddb.geometry.heads = \"16\"") && text.contains("ddb.virtualHWVersion = \"14\""));
    let flat = dir.path().join("flat.vmdk");
    export_vmdk(&src, &flat, "subformat=monolithicFlat", 2);
    assert_good(&src, "raw", &flat);
    let text = std::fs::read_to_string(&flat).unwrap();
    assert!(text.contains(&format!("RW {} FLAT \"flat-flat.vmdk\" 0", ((45 << 20) + 3 * 512) / 512)), "{text}");
    assert_eq!(std::fs::metadata(dir.path().join("flat-flat.vmdk")).unwrap().len(), (45 << 20) + 3 * 512);
    // The output is no larger than measure says.
    let img = Image::open(&src, &OpenOptions::default()).unwrap();
    for (path, opts) in [(&sparse, "subformat=monolithicSparse"), (&dir.path().join("x.vmdk"), "")] {
        if !path.exists() {
            export_vmdk(&src, path, opts, 2);
        }
        let m = measure(&img, OutputFormat::Vmdk, &vdisk_core::parse_option_pairs(opts).unwrap()).unwrap();
        let len = std::fs::metadata(path).unwrap().len();
        assert!(len <= m.required && m.required <= m.fully_allocated, "{opts}: {len} vs {m:?}");
    }
}

#[test]
fn sizes_around_two_tib() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tib2 = 2u64 << 40;
    for (size, subformat, ok) in [
        (tib2 - 65536, "streamOptimized", true),
        (tib2 + 512, "streamOptimized", true),
        (tib2 - (64 << 20), "monolithicSparse", true),
        (tib2 + 512, "monolithicSparse", false),
    ] {
        let src = dir.path().join("big.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[0x5a; 4096], size - 4096).unwrap();
        f.write_all_at(&[0xa5; 4096], 1 << 20).unwrap();
        drop(f);
        let out = dir.path().join(format!("big-{subformat}-{size}.vmdk"));
        let img = Image::open(&src, &OpenOptions::default()).unwrap();
        let opts = ExportOptions {
            format: OutputFormat::Vmdk,
            options: vdisk_core::parse_option_pairs(&format!("subformat={subformat}")).unwrap(),
            ..ExportOptions::default()
        };
        let r = export(&img, &out, &opts);
        assert_eq!(r.is_ok(), ok, "{subformat} {size}: {:?}", r.err().map(|e| e.to_string()));
        if ok {
            // `qemu-img compare` reads all 2 TiB (about a minute): check, and read the data back.
            let o = Command::new("qemu-img").args(["check", "-f", "vmdk"]).arg(&out).output().unwrap();
            assert!(o.status.success(), "{subformat} {size}: {}", String::from_utf8_lossy(&o.stdout));
            let reads = [format!("read -P 90 {} 4096", size - 4096), "read -P 165 1048576 4096".to_string()];
            let mut c = Command::new("qemu-io");
            c.args(["-r", "-f", "vmdk"]);
            for r in &reads {
                c.arg("-c").arg(r);
            }
            let o = c.arg(&out).output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success() && !text.contains("failed"), "{subformat} {size}: {text}");
            let img = Image::open(&out, &OpenOptions::default()).unwrap();
            assert_eq!(img.virtual_size(), size);
            let mut buf = vec![0u8; 8192];
            img.read_at(&mut buf, size - 8192).unwrap();
            assert!(buf[..4096].iter().all(|&x| x == 0) && buf[4096..].iter().all(|&x| x == 0x5a));
            if subformat == "streamOptimized" {
                // The tail crosses a grain boundary when the size is not a grain multiple.
                let expect = if size % 65536 == 0 { 2 } else { 3 };
                assert_eq!(walk_stream(&out), expect);
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
}
