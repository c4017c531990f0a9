//! VHDs that qemu-img cannot make or does not read right, built here from known content so the
//! expected guest bytes are known independently of vdisk: differencing disks with their parents
//! (partial sector bitmaps, W2ru/W2ku/MacX locators, missing and mismatched parents, the
//! reference policy), an Azure-style fixed disk, small block sizes, damaged footers and headers,
//! and hostile tables.
//!
//! `write_fixtures` (ignored; run by `testdata/vhd/make.sh`) writes the committed fixtures.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: small known values

mod common;

use std::path::{Path, PathBuf};

use common::{have_qemu, qemu_convert, qemu_img, Rng};
use vdisk_core::{ErrorKind, ExtentKind, Format, Image, OpenOptions, ReferencePolicy};

const SECTOR: usize = 512;

// ---------------------------------------------------------------------------------------------
// The generator.

/// One's complement of the byte sum of `bytes` outside `skip`.
fn checksum(bytes: &[u8], skip: std::ops::Range<usize>) -> u32 {
    let sum =
        bytes.iter().enumerate().filter(|(i, _)| !skip.contains(i)).fold(0u32, |a, (_, &b)| a.wrapping_add(b.into()));
    !sum
}

/// The CHS geometry the VHD specification computes for a disk of `size` bytes.
fn chs_geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn utf16be(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// A 512-byte footer.
fn footer(
    disk_type: u32,
    data_offset: u64,
    creator: &[u8; 4],
    size: u64,
    geometry: (u16, u8, u8),
    uuid: [u8; 16],
) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..8].copy_from_slice(b"conectix");
    b[8..12].copy_from_slice(&2u32.to_be_bytes());
    b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    b[16..24].copy_from_slice(&data_offset.to_be_bytes());
    b[24..28].copy_from_slice(&0x2c00_0000u32.to_be_bytes());
    b[28..32].copy_from_slice(creator);
    b[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    b[36..40].copy_from_slice(b"Wi2k");
    b[40..48].copy_from_slice(&size.to_be_bytes());
    b[48..56].copy_from_slice(&size.to_be_bytes());
    b[56..58].copy_from_slice(&geometry.0.to_be_bytes());
    b[58] = geometry.1;
    b[59] = geometry.2;
    b[60..64].copy_from_slice(&disk_type.to_be_bytes());
    b[68..84].copy_from_slice(&uuid);
    let c = checksum(&b, 64..68);
    b[64..68].copy_from_slice(&c.to_be_bytes());
    b
}

/// Recompute the checksum of the footer at `at` in `image`.
fn refresh_footer_checksum(image: &mut [u8], at: usize) {
    let c = checksum(&image[at..at + 512], 64..68);
    image[at + 64..at + 68].copy_from_slice(&c.to_be_bytes());
}

/// The guest content one layer holds: bytes and which sectors it has.
#[derive(Clone)]
struct Model {
    data: Vec<u8>,
    present: Vec<bool>,
}

impl Model {
    fn empty(size: usize) -> Self {
        Model { data: vec![0; size], present: vec![false; size.div_ceil(SECTOR)] }
    }

    /// Random runs of sectors with random bytes, about `density` percent of the disk.
    fn random(size: usize, seed: u64, density: u64) -> Self {
        let mut m = Model::empty(size);
        let mut rng = Rng::new(seed);
        let sectors = m.present.len();
        let target = sectors as u64 * density / 100;
        let mut set = 0;
        while set < target {
            let start = rng.below(sectors as u64) as usize;
            let len = (rng.below(40) + 1) as usize;
            let fill = rng.below(255) as u8 + 1;
            for s in start..(start + len).min(sectors) {
                m.put(s, fill, &mut rng);
                set += 1;
            }
        }
        m
    }

    fn put(&mut self, sector: usize, fill: u8, rng: &mut Rng) {
        self.present[sector] = true;
        let end = ((sector + 1) * SECTOR).min(self.data.len());
        for (i, b) in self.data[sector * SECTOR..end].iter_mut().enumerate() {
            *b = if i % 64 == 0 { rng.below(256) as u8 } else { fill };
        }
    }

    /// The guest view of this layer over `parent` (zeros where neither has the sector).
    fn over(&self, parent: Option<&[u8]>) -> Vec<u8> {
        let mut out = vec![0u8; self.data.len()];
        for (s, &p) in self.present.iter().enumerate() {
            let r = s * SECTOR..((s + 1) * SECTOR).min(self.data.len());
            if p {
                out[r.clone()].copy_from_slice(&self.data[r]);
            } else if let Some(parent) = parent {
                let pr = r.start.min(parent.len())..r.end.min(parent.len());
                out[pr.start..pr.end].copy_from_slice(&parent[pr]);
            }
        }
        out
    }
}

/// How a generated VHD names its parent.
#[derive(Clone)]
struct ParentRef {
    uuid: [u8; 16],
    name: String,
    locators: Vec<([u8; 4], Vec<u8>)>,
}

/// What to build.
#[derive(Clone)]
struct Spec {
    creator: [u8; 4],
    /// Current size in the footer (the guest size for creators other than `vpc `/`qemu`).
    size: u64,
    geometry: Option<(u16, u8, u8)>,
    uuid: [u8; 16],
    block_size: u32,
    /// Differencing when set.
    parent: Option<ParentRef>,
    /// Byte stored in the sectors of an allocated block whose bitmap bit is clear.
    absent_fill: u8,
    /// Seed for the order blocks are stored in (0 keeps guest order).
    shuffle: u64,
}

impl Spec {
    fn new(size: u64, uuid_seed: u8) -> Self {
        Spec {
            creator: *b"win ",
            size,
            geometry: None,
            uuid: [uuid_seed; 16],
            block_size: 64 << 10,
            parent: None,
            absent_fill: 0,
            shuffle: 0,
        }
    }

    fn geometry(&self) -> (u16, u8, u8) {
        self.geometry.unwrap_or_else(|| chs_geometry(self.size))
    }
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(SECTOR) * SECTOR, 0);
}

/// A fixed VHD holding `data` (which must be `spec.size` long).
fn build_fixed(spec: &Spec, data: &[u8]) -> Vec<u8> {
    let mut img = data.to_vec();
    img.extend(footer(2, u64::MAX, &spec.creator, spec.size, spec.geometry(), spec.uuid));
    img
}

/// A dynamic (or, with `spec.parent`, differencing) VHD holding `layer`.
fn build_sparse(spec: &Spec, layer: &Model) -> Vec<u8> {
    let bs = spec.block_size as usize;
    let spb = bs / SECTOR;
    let entries = (spec.size as usize).div_ceil(bs);
    let bitmap_size = spb.div_ceil(8).div_ceil(SECTOR) * SECTOR;
    let disk_type = if spec.parent.is_some() { 4 } else { 3 };
    let ftr = footer(disk_type, 512, &spec.creator, spec.size, spec.geometry(), spec.uuid);
    let mut img = ftr.clone();
    img.resize(1536, 0);
    let bat_at = 1536usize;
    img.resize(bat_at + (entries * 4).div_ceil(SECTOR) * SECTOR, 0xff);
    img.resize(img.len() + SECTOR, 0);
    // Locator data.
    let mut loc_entries = Vec::new();
    if let Some(p) = &spec.parent {
        for (code, bytes) in &p.locators {
            let at = img.len();
            img.extend_from_slice(bytes);
            pad(&mut img);
            loc_entries.push((*code, bytes.len(), at));
        }
    }
    // Blocks, in a possibly shuffled storage order.
    let mut order: Vec<usize> = (0..entries).collect();
    if spec.shuffle != 0 {
        let mut rng = Rng::new(spec.shuffle);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let mut bat = vec![u32::MAX; entries];
    for &b in &order {
        let sectors = b * spb..((b + 1) * spb).min(layer.present.len());
        if !sectors.clone().any(|s| layer.present[s]) {
            continue;
        }
        let at = img.len();
        bat[b] = (at / SECTOR) as u32;
        let mut bitmap = vec![0u8; bitmap_size];
        let mut block = vec![spec.absent_fill; bs];
        for s in sectors {
            let i = s - b * spb;
            if layer.present[s] {
                bitmap[i / 8] |= 0x80 >> (i % 8);
                let src = s * SECTOR..((s + 1) * SECTOR).min(layer.data.len());
                block[i * SECTOR..i * SECTOR + src.len()].copy_from_slice(&layer.data[src]);
            }
        }
        img.extend_from_slice(&bitmap);
        img.extend_from_slice(&block);
    }
    for (i, e) in bat.iter().enumerate() {
        img[bat_at + 4 * i..bat_at + 4 * i + 4].copy_from_slice(&e.to_be_bytes());
    }
    // Dynamic header.
    let mut h = vec![0u8; 1024];
    h[0..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&(bat_at as u64).to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    h[32..36].copy_from_slice(&spec.block_size.to_be_bytes());
    if let Some(p) = &spec.parent {
        h[40..56].copy_from_slice(&p.uuid);
        let name = utf16be(&p.name);
        h[64..64 + name.len()].copy_from_slice(&name);
        for (k, (code, len, at)) in loc_entries.iter().enumerate() {
            let e = 0x240 + 24 * k;
            h[e..e + 4].copy_from_slice(code);
            h[e + 4..e + 8].copy_from_slice(&(len.div_ceil(SECTOR) as u32).to_be_bytes());
            h[e + 8..e + 12].copy_from_slice(&(*len as u32).to_be_bytes());
            h[e + 16..e + 24].copy_from_slice(&(*at as u64).to_be_bytes());
        }
    }
    let c = checksum(&h, 36..40);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    img[512..1536].copy_from_slice(&h);
    img.extend_from_slice(&ftr);
    img
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open(path: &Path, references: ReferencePolicy) -> vdisk_core::Result<Image> {
    Image::open(path, &OpenOptions { references, ..OpenOptions::default() })
}

/// vdisk's raw output (1 and 2 threads) and unaligned `read_at`s all equal `expected`.
fn assert_content(path: &Path, references: ReferencePolicy, expected: &[u8]) {
    let img = open(path, references).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(img.format(), Format::Vhd);
    assert_eq!(img.virtual_size(), expected.len() as u64, "{}: virtual size", path.display());
    let dir = tempfile::tempdir().unwrap();
    for threads in [1, 2] {
        let out = common::vdisk_convert(path, &common::opts(references), dir.path(), "out.raw", threads);
        let got = std::fs::read(&out).unwrap();
        assert!(got == expected, "{}: converted content differs ({threads} threads)", path.display());
    }
    let mut rng = Rng::new(expected.len() as u64);
    for _ in 0..64 {
        let off = rng.below(expected.len() as u64) as usize;
        let len = (rng.below(5000) as usize + 1).min(expected.len() - off);
        let mut buf = vec![0u8; len];
        assert_eq!(img.read_at(&mut buf, off as u64).unwrap(), len);
        assert!(buf == expected[off..off + len], "{}: read_at({off}, {len}) differs", path.display());
    }
}

fn layers_seen(img: &Image) -> (u64, u64, u64) {
    let (mut own, mut parent, mut other) = (0, 0, 0);
    for e in img.extents() {
        match e.unwrap().kind {
            ExtentKind::Data { layer: 0, .. } => own += 1,
            ExtentKind::Data { layer: 1, .. } => parent += 1,
            _ => other += 1,
        }
    }
    (own, parent, other)
}

/// A parent (dynamic) and a differencing child over it, with partial sector bitmaps and garbage
/// in the child's absent sectors; returns (parent image, child spec, child model, expected).
fn chain(size: usize, seed: u64) -> (Vec<u8>, Spec, Model, Vec<u8>) {
    let pmodel = Model::random(size, seed, 35);
    let mut pspec = Spec::new(size as u64, 0x11);
    pspec.shuffle = seed;
    let parent = build_sparse(&pspec, &pmodel);
    let pview = pmodel.over(None);
    let cmodel = Model::random(size, seed + 1, 20);
    let mut cspec = Spec::new(size as u64, 0x22);
    cspec.absent_fill = 0xEE;
    cspec.shuffle = seed + 2;
    cspec.parent = Some(ParentRef { uuid: pspec.uuid, name: "parent.vhd".into(), locators: Vec::new() });
    let expected = cmodel.over(Some(&pview));
    (parent, cspec, cmodel, expected)
}

fn with_locators(mut spec: Spec, locators: Vec<([u8; 4], Vec<u8>)>) -> Spec {
    if let Some(p) = &mut spec.parent {
        p.locators = locators;
    }
    spec
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn geometry_helper_matches_windows() {
    // The geometries Windows wrote into the corpus images (footer dumps): the generator's CHS
    // is the specification's, rounded down like Windows (qemu-img rounds up instead).
    assert_eq!(chs_geometry(3 << 20), (90, 4, 17));
    assert_eq!(chs_geometry(10 << 20), (301, 4, 17));
    assert_eq!(chs_geometry(136_365_211_648), (65278, 16, 255));
    assert_eq!(chs_geometry(4_352_000), (125, 4, 17));
}

#[test]
fn dynamic_small_blocks_read_right_and_qemu_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let size = 5 * 1024 * 1024 + 3 * 512;
    let model = Model::random(size, 7, 30);
    for (i, block) in [4096u32, 64 << 10, 2 << 20].into_iter().enumerate() {
        let mut spec = Spec::new(size as u64, 0x33);
        spec.block_size = block;
        spec.shuffle = 99 + i as u64;
        let path = write(dir.path(), &format!("dyn{i}.vhd"), &build_sparse(&spec, &model));
        let expected = model.over(None);
        assert_content(&path, ReferencePolicy::Deny, &expected);
        let img = open(&path, ReferencePolicy::Deny).unwrap();
        assert_eq!(img.info().cluster_size, Some(u64::from(block)));
        assert_eq!(img.check().unwrap().corruptions, 0);
        if have_qemu() {
            let q = qemu_convert(&path, "vpc", dir.path(), "q.raw");
            assert!(std::fs::read(q).unwrap() == expected, "qemu-img reads the generated image differently");
            assert_eq!(common::vdisk_data_ranges(&img), common::qemu_data_ranges(&path, "vpc"));
        }
    }
}

#[test]
fn dynamic_disk_reads_whole_blocks_like_qemu() {
    // A dynamic (not differencing) disk whose allocated block has clear bitmap bits over
    // non-zero bytes: qemu-img ignores the bitmap and so does vdisk.
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let model = Model::random(size, 3, 10);
    let mut spec = Spec::new(size as u64, 0x44);
    spec.absent_fill = 0x5A;
    let bytes = build_sparse(&spec, &model);
    let path = write(dir.path(), "whole.vhd", &bytes);
    let bs = spec.block_size as usize;
    let mut expected = vec![0u8; size];
    for b in 0..size / bs {
        let r = b * bs..(b + 1) * bs;
        if model.present[b * bs / SECTOR..(b + 1) * bs / SECTOR].iter().any(|&p| p) {
            for (s, chunk) in expected[r.clone()].chunks_mut(SECTOR).enumerate() {
                let sector = b * bs / SECTOR + s;
                if model.present[sector] {
                    chunk.copy_from_slice(&model.data[sector * SECTOR..(sector + 1) * SECTOR]);
                } else {
                    chunk.fill(0x5A);
                }
            }
        }
    }
    assert_content(&path, ReferencePolicy::Deny, &expected);
    if have_qemu() {
        let q = qemu_convert(&path, "vpc", dir.path(), "q.raw");
        assert!(std::fs::read(q).unwrap() == expected);
    }
}

#[test]
fn differencing_relative_locator_with_partial_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * 1024 * 1024 + 7 * 512;
    let (parent, cspec, cmodel, expected) = chain(size, 1000);
    write(dir.path(), "parent.vhd", &parent);
    let cspec = with_locators(
        cspec,
        vec![(*b"W2ku", utf16le("C:\\Hyper-V\\Disks\\parent.vhd")), (*b"W2ru", utf16le(".\\parent.vhd"))],
    );
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    assert_content(&child, ReferencePolicy::SameDir, &expected);
    let img = open(&child, ReferencePolicy::SameDir).unwrap();
    let (own, from_parent, _) = layers_seen(&img);
    assert!(own > 10 && from_parent > 10, "expected a mix of layers: {own} own, {from_parent} from the parent");
    let info = img.info();
    assert_eq!(info.backing_filename.as_deref(), Some("parent.vhd"));
    assert_eq!(info.backing_filename_format.as_deref(), Some("vpc"));
    let fs = &info.format_specific.unwrap()["data"];
    assert_eq!(fs["subformat"], "differencing");
    assert_eq!(fs["parent-name"], "parent.vhd");
    assert_eq!(fs["parent-uuid"], "11111111-1111-1111-1111-111111111111");
    assert_eq!(fs["parent-locators"][1]["path"], ".\\parent.vhd");
    assert_eq!(img.check().unwrap().corruptions, 0);
    // Describing needs no parent and no permission.
    let d = Image::describe(&child, &OpenOptions::default()).unwrap();
    assert_eq!(d.backing_filename.as_deref(), Some("parent.vhd"));
    assert_eq!(d.virtual_size, size as u64);
}

#[test]
fn differencing_relative_locator_in_a_subfolder() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * 1024;
    let (parent, cspec, cmodel, expected) = chain(size, 2000);
    std::fs::create_dir(dir.path().join("base")).unwrap();
    write(&dir.path().join("base"), "parent.vhd", &parent);
    let cspec = with_locators(cspec, vec![(*b"W2ru", utf16le(".\\base\\parent.vhd"))]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    assert_content(&child, ReferencePolicy::SameDir, &expected);
}

#[test]
fn differencing_absolute_locator_needs_policy_any() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * 1024 * 1024;
    let (parent, cspec, cmodel, expected) = chain(size, 3000);
    std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
    let ppath = write(&dir.path().join("elsewhere"), "base.vhd", &parent);
    let cspec = with_locators(cspec, vec![(*b"W2ku", utf16le(ppath.to_str().unwrap()))]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    let e = open(&child, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    assert!(e.to_string().contains("base.vhd"), "{e}");
    let e = open(&child, ReferencePolicy::Deny).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    assert_content(&child, ReferencePolicy::Any, &expected);
}

#[test]
fn differencing_mac_locator() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * 1024;
    let (parent, cspec, cmodel, expected) = chain(size, 4000);
    let ppath = write(dir.path(), "my parent.vhd", &parent);
    let url = format!("file://localhost{}", ppath.to_str().unwrap().replace(' ', "%20"));
    let cspec = with_locators(cspec, vec![(*b"MacX", url.into_bytes())]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    assert_content(&child, ReferencePolicy::Any, &expected);
}

#[test]
fn differencing_ascii_locator_and_parent_name_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * 1024;
    let (parent, cspec, cmodel, expected) = chain(size, 5000);
    write(dir.path(), "parent.vhd", &parent);
    // A deprecated ASCII relative locator.
    let spec = with_locators(cspec.clone(), vec![(*b"Wi2r", b".\\parent.vhd\0".to_vec())]);
    let child = write(dir.path(), "child1.vhd", &build_sparse(&spec, &cmodel));
    assert_content(&child, ReferencePolicy::SameDir, &expected);
    // Only a Windows drive path: the parent's file name from the header, beside the child, is
    // the last resort (and is checked by unique id).
    let spec = with_locators(cspec, vec![(*b"W2ku", utf16le("D:\\VMs\\parent.vhd"))]);
    let child = write(dir.path(), "child2.vhd", &build_sparse(&spec, &cmodel));
    assert_content(&child, ReferencePolicy::SameDir, &expected);
}

#[test]
fn differencing_chain_of_three_over_a_fixed_base() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * 1024 * 1024;
    let mut rng = Rng::new(6000);
    let base: Vec<u8> = (0..size).map(|_| rng.below(256) as u8).collect();
    let bspec = Spec::new(size as u64, 0x55);
    write(dir.path(), "base.vhd", &build_fixed(&bspec, &base));
    let mid_model = Model::random(size, 6001, 25);
    let mut mid = Spec::new(size as u64, 0x66);
    mid.parent = Some(ParentRef {
        uuid: bspec.uuid,
        name: "base.vhd".into(),
        locators: vec![(*b"W2ru", utf16le(".\\base.vhd"))],
    });
    mid.absent_fill = 0xAB;
    write(dir.path(), "mid.vhd", &build_sparse(&mid, &mid_model));
    let top_model = Model::random(size, 6002, 25);
    let mut top = Spec::new(size as u64, 0x77);
    top.parent =
        Some(ParentRef { uuid: mid.uuid, name: "mid.vhd".into(), locators: vec![(*b"W2ru", utf16le(".\\mid.vhd"))] });
    top.absent_fill = 0xCD;
    let path = write(dir.path(), "top.vhd", &build_sparse(&top, &top_model));
    let expected = top_model.over(Some(&mid_model.over(Some(&base))));
    assert_content(&path, ReferencePolicy::SameDir, &expected);
    let img = open(&path, ReferencePolicy::SameDir).unwrap();
    let layers: std::collections::BTreeSet<u32> = img
        .extents()
        .filter_map(|e| match e.unwrap().kind {
            ExtentKind::Data { layer, .. } => Some(layer),
            _ => None,
        })
        .collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn differencing_parent_missing_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cspec, cmodel, _) = chain(1 << 20, 7000);
    let cspec = with_locators(cspec, vec![(*b"W2ru", utf16le(".\\parent.vhd"))]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    let e = open(&child, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("parent.vhd"), "{e}");
}

#[test]
fn differencing_parent_with_another_uuid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, cspec, cmodel, _) = chain(1 << 20, 8000);
    let mut wrong = parent.clone();
    let len = wrong.len();
    for at in [0, len - 512] {
        wrong[at + 68] ^= 0xff;
        refresh_footer_checksum(&mut wrong, at);
    }
    write(dir.path(), "parent.vhd", &wrong);
    let cspec = with_locators(cspec, vec![(*b"W2ru", utf16le(".\\parent.vhd"))]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    let e = open(&child, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("11111111-1111-1111-1111-111111111111"), "{msg}");
    assert!(msg.contains("ee111111-1111-1111-1111-111111111111"), "{msg}");
}

#[test]
fn differencing_under_deny_is_refused_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, cspec, cmodel, _) = chain(1 << 20, 9000);
    write(dir.path(), "parent.vhd", &parent);
    let cspec = with_locators(cspec, vec![(*b"W2ru", utf16le(".\\parent.vhd"))]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    let e = open(&child, ReferencePolicy::Deny).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    assert!(e.to_string().contains("same-dir"), "{e}");
    // In memory there is no directory to look in.
    let bytes = std::fs::read(&child).unwrap();
    let src = std::sync::Arc::new(vdisk_core::MemSource(bytes.into()));
    let e = Image::from_source(src, &common::opts(ReferencePolicy::Any)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
}

#[test]
fn differencing_disk_naming_itself_is_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut cspec, cmodel, _) = chain(1 << 20, 9200);
    if let Some(p) = &mut cspec.parent {
        p.uuid = cspec.uuid;
        p.name = "self.vhd".into();
    }
    let cspec = with_locators(cspec, vec![(*b"W2ru", utf16le(".\\self.vhd"))]);
    let child = write(dir.path(), "self.vhd", &build_sparse(&cspec, &cmodel));
    let e = open(&child, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    assert!(e.to_string().contains("loop"), "{e}");
}

#[test]
fn qemu_reads_a_differencing_disk_without_its_parent() {
    // qemu-img treats type 4 as dynamic and ignores the parent: its output has the child's
    // garbage where the bitmap says "parent" and zeros where the child has no block.
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (parent, cspec, cmodel, expected) = chain(1 << 20, 9500);
    write(dir.path(), "parent.vhd", &parent);
    let cspec = with_locators(cspec, vec![(*b"W2ru", utf16le(".\\parent.vhd"))]);
    let child = write(dir.path(), "child.vhd", &build_sparse(&cspec, &cmodel));
    let q = std::fs::read(qemu_convert(&child, "vpc", dir.path(), "q.raw")).unwrap();
    assert!(q != expected);
    assert_content(&child, ReferencePolicy::SameDir, &expected);
}

#[test]
fn azure_style_fixed_disk_uses_the_current_size() {
    // Azure wants fixed VHDs whose size is a whole number of MiB; their CHS geometry cannot
    // express that size, so the current size (not CHS) is the disk's size.
    let dir = tempfile::tempdir().unwrap();
    let size = 3usize << 20;
    let mut rng = Rng::new(11);
    let data: Vec<u8> = (0..size).map(|i| if i % 4096 < 700 { rng.below(256) as u8 } else { 0 }).collect();
    for creator in [*b"wa\0\0", *b"win ", *b"qem2"] {
        let mut spec = Spec::new(size as u64, 0x88);
        spec.creator = creator;
        let (c, h, s) = spec.geometry();
        assert!(u64::from(c) * u64::from(h) * u64::from(s) * 512 < size as u64, "CHS would shrink the disk");
        let path = write(dir.path(), "azure.vhd", &build_fixed(&spec, &data));
        assert_content(&path, ReferencePolicy::Deny, &data);
        let info = Image::describe(&path, &OpenOptions::default()).unwrap();
        assert_eq!(info.format_specific.unwrap()["data"]["size-rule"], "current-size");
        if have_qemu() {
            assert_eq!(qemu_info_size(&path), size as u64);
        }
    }
    // The same disk from Virtual PC is sized by CHS, as qemu-img does.
    let mut spec = Spec::new(size as u64, 0x88);
    spec.creator = *b"vpc ";
    let (c, h, s) = spec.geometry();
    let chs = u64::from(c) * u64::from(h) * u64::from(s) * 512;
    let path = write(dir.path(), "vpc.vhd", &build_fixed(&spec, &data));
    assert_content(&path, ReferencePolicy::Deny, &data[..chs as usize]);
    if have_qemu() {
        assert_eq!(qemu_info_size(&path), chs);
    }
}

fn qemu_info_size(path: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-f", "vpc", "--output", "json", path.to_str().unwrap()])).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn a_bad_footer_falls_back_to_the_other_copy() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let model = Model::random(size, 12, 30);
    let good = build_sparse(&Spec::new(size as u64, 0x99), &model);
    let expected = model.over(None);
    let len = good.len();
    // End footer bad: the copy at 0 is used (qemu-img reads that one too).
    let mut end_bad = good.clone();
    end_bad[len - 512 + 100] ^= 1;
    let p = write(dir.path(), "end-bad.vhd", &end_bad);
    assert_content(&p, ReferencePolicy::Deny, &expected);
    let r = open(&p, ReferencePolicy::Deny).unwrap().check().unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.problems);
    // End footer missing entirely (a file cut before it): still readable from the copy.
    let p = write(dir.path(), "no-end.vhd", &good[..len - 512]);
    assert_content(&p, ReferencePolicy::Deny, &expected);
    // Copy at 0 bad: the end footer is used (qemu-img refuses this image).
    let mut head_bad = good.clone();
    head_bad[100] ^= 1;
    let p = write(dir.path(), "head-bad.vhd", &head_bad);
    assert_content(&p, ReferencePolicy::Deny, &expected);
    if have_qemu() {
        let out = std::process::Command::new("qemu-img").args(["info", "-f", "vpc"]).arg(&p).output().unwrap();
        assert!(!out.status.success(), "qemu-img now reads a VHD whose footer copy at 0 is bad");
    }
    // Both bad: refused, naming the checksum.
    let mut both = head_bad.clone();
    both[len - 512 + 100] ^= 1;
    let p = write(dir.path(), "both-bad.vhd", &both);
    let e = open(&p, ReferencePolicy::Deny).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("checksum"), "{e}");
    // The two copies disagree: qemu's choice (offset 0) is used and check reports it.
    let mut differ = good.clone();
    differ[len - 512 + 24] ^= 1;
    refresh_footer_checksum(&mut differ, len - 512);
    let p = write(dir.path(), "differ.vhd", &differ);
    let r = open(&p, ReferencePolicy::Deny).unwrap().check().unwrap();
    assert!(r.problems.iter().any(|p| p.message.contains("differs")), "{:?}", r.problems);
}

#[test]
fn a_bad_dynamic_header_checksum_is_read_like_qemu_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let model = Model::random(size, 13, 30);
    let mut img = build_sparse(&Spec::new(size as u64, 0xaa), &model);
    img[512 + 0x30] ^= 1; // parent uuid byte of a dynamic disk: unused, but checksummed
    let p = write(dir.path(), "hdr.vhd", &img);
    assert_content(&p, ReferencePolicy::Deny, &model.over(None));
    let r = open(&p, ReferencePolicy::Deny).unwrap().check().unwrap();
    assert!(r.problems.iter().any(|p| p.message.contains("dynamic disk header")), "{:?}", r.problems);
    if have_qemu() {
        let q = qemu_convert(&p, "vpc", dir.path(), "q.raw");
        assert!(std::fs::read(q).unwrap() == model.over(None));
    }
}

/// Patch the dynamic header of `img` with `f` and fix its checksum.
fn patch_header(img: &mut [u8], f: impl FnOnce(&mut [u8])) {
    f(&mut img[512..1536]);
    let c = checksum(&img[512..1536], 36..40);
    img[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn hostile_tables_are_clean_errors_or_reported() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let model = Model::random(size, 14, 50);
    let spec = Spec::new(size as u64, 0xbb);
    let good = build_sparse(&spec, &model);
    let bat = 1536;
    let kind = |bytes: &[u8], name: &str| {
        let p = write(dir.path(), name, bytes);
        open(&p, ReferencePolicy::Deny).map(|_| ()).map_err(|e| e.kind())
    };
    // A BAT entry past the end of the file: qemu-img refuses ("truncated"), so does vdisk.
    let mut b = good.clone();
    b[bat..bat + 4].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    assert_eq!(kind(&b, "past-eof.vhd"), Err(ErrorKind::InvalidImage));
    // Max table entries far beyond the file.
    let mut b = good.clone();
    patch_header(&mut b, |h| h[28..32].copy_from_slice(&0x4000_0001u32.to_be_bytes()));
    assert_eq!(kind(&b, "entries.vhd"), Err(ErrorKind::InvalidImage));
    // Too few entries for the size ("page table too small").
    let mut b = good.clone();
    patch_header(&mut b, |h| h[28..32].copy_from_slice(&1u32.to_be_bytes()));
    assert_eq!(kind(&b, "few.vhd"), Err(ErrorKind::InvalidImage));
    // Block size not a power of two, and absurdly large.
    let mut b = good.clone();
    patch_header(&mut b, |h| h[32..36].copy_from_slice(&(3u32 << 16).to_be_bytes()));
    assert_eq!(kind(&b, "bs3.vhd"), Err(ErrorKind::InvalidImage));
    let mut b = good.clone();
    patch_header(&mut b, |h| h[32..36].copy_from_slice(&(1u32 << 31).to_be_bytes()));
    assert_eq!(kind(&b, "bs2g.vhd"), Err(ErrorKind::Unsupported));
    // Dynamic header past the end; no cookie.
    let mut b = good.clone();
    let len = b.len();
    for at in [0, len - 512] {
        b[at + 16..at + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
        refresh_footer_checksum(&mut b, at);
    }
    assert_eq!(kind(&b, "hdr-far.vhd"), Err(ErrorKind::InvalidImage));
    let mut b = good.clone();
    b[512] = b'X';
    assert_eq!(kind(&b, "no-cookie.vhd"), Err(ErrorKind::InvalidImage));
    // Unknown disk type.
    let mut b = good.clone();
    for at in [0, len - 512] {
        b[at + 63] = 5;
        refresh_footer_checksum(&mut b, at);
    }
    assert_eq!(kind(&b, "type5.vhd"), Err(ErrorKind::Unsupported));
    // Too short to hold a footer.
    assert_eq!(kind(&good[..100], "short.vhd"), Err(ErrorKind::InvalidImage));
    // Nothing but garbage with the cookie.
    let mut g = vec![0u8; 4096];
    g[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
    assert_eq!(kind(&g, "garbage.vhd"), Err(ErrorKind::InvalidImage));

    // Blocks pointing at metadata or at each other open (qemu reads them) but check reports.
    let entries: Vec<u32> =
        (0..16).map(|i| u32::from_be_bytes(good[bat + 4 * i..bat + 4 * i + 4].try_into().unwrap())).collect();
    let allocated: Vec<usize> = (0..16).filter(|&i| entries[i] != u32::MAX).collect();
    assert!(allocated.len() >= 2);
    let mut b = good.clone();
    let first = entries[allocated[0]];
    b[bat + 4 * allocated[1]..bat + 4 * allocated[1] + 4].copy_from_slice(&first.to_be_bytes());
    let p = write(dir.path(), "overlap.vhd", &b);
    let r = open(&p, ReferencePolicy::Deny).unwrap().check().unwrap();
    assert!(r.problems.iter().any(|p| p.message.contains("overlap")), "{:?}", r.problems);
    let mut b = good.clone();
    b[bat + 4 * allocated[0]..bat + 4 * allocated[0] + 4].copy_from_slice(&1u32.to_be_bytes());
    let p = write(dir.path(), "on-header.vhd", &b);
    let r = open(&p, ReferencePolicy::Deny).unwrap().check().unwrap();
    assert!(r.problems.iter().any(|p| p.message.contains("dynamic disk header")), "{:?}", r.problems);
}

#[test]
fn locator_data_outside_the_file_is_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, cspec, cmodel, expected) = chain(1 << 20, 15000);
    write(dir.path(), "parent.vhd", &parent);
    let cspec = with_locators(cspec, vec![(*b"W2ku", utf16le("/nowhere/p.vhd")), (*b"W2ru", utf16le(".\\parent.vhd"))]);
    let mut img = build_sparse(&cspec, &cmodel);
    patch_header(&mut img, |h| h[0x240 + 16..0x240 + 24].copy_from_slice(&(1u64 << 50).to_be_bytes()));
    let child = write(dir.path(), "child.vhd", &img);
    assert_content(&child, ReferencePolicy::SameDir, &expected);
    let r = open(&child, ReferencePolicy::SameDir).unwrap().check().unwrap();
    assert!(r.problems.iter().any(|p| p.message.contains("parent locator 0")), "{:?}", r.problems);
}

#[test]
fn fixed_disk_shorter_than_its_size_reads_zeros_past_the_data() {
    // qemu-img would return the footer's bytes as guest data there.
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0x42u8; 1 << 20];
    let mut spec = Spec::new(2 << 20, 0xcc);
    spec.creator = *b"win ";
    let img = build_fixed(&spec, &data);
    let p = write(dir.path(), "short-fixed.vhd", &img);
    let mut expected = data.clone();
    expected.resize(2 << 20, 0);
    assert_content(&p, ReferencePolicy::Deny, &expected);
    let r = open(&p, ReferencePolicy::Deny).unwrap().check().unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.problems);
}

// ---------------------------------------------------------------------------------------------
// Committed fixtures.

/// The fixtures of `testdata/vhd/` made by the generator: (file name, bytes, flags, expected).
fn fixtures() -> Vec<(&'static str, Vec<u8>, &'static str, Vec<u8>)> {
    let size = 32 * 1024 + 512;
    let pmodel = Model::random(size, 0xf1, 40);
    let mut pspec = Spec::new(size as u64, 0xd1);
    pspec.block_size = 8192;
    pspec.shuffle = 5;
    let parent = build_sparse(&pspec, &pmodel);
    let pview = pmodel.over(None);
    let cmodel = Model::random(size, 0xf2, 25);
    let mut cspec = Spec::new(size as u64, 0xd2);
    cspec.block_size = 8192;
    cspec.absent_fill = 0xEE;
    cspec.parent = Some(ParentRef {
        uuid: pspec.uuid,
        name: "dynamic-small-blocks.vhd".into(),
        locators: vec![
            (*b"W2ru", utf16le(".\\dynamic-small-blocks.vhd")),
            (*b"W2ku", utf16le("C:\\VMs\\dynamic-small-blocks.vhd")),
        ],
    });
    let child = build_sparse(&cspec, &cmodel);
    let cview = cmodel.over(Some(&pview));
    vec![
        ("dynamic-small-blocks.vhd", parent, "", pview),
        ("differencing-child.vhd", child, "--references same-dir", cview),
    ]
}

#[test]
fn committed_fixtures_match_the_generator() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/vhd");
    for (name, bytes, flags, expected) in fixtures() {
        let committed = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e} (run make.sh)"));
        assert!(committed == bytes, "{name}: the committed fixture is not what the generator makes (run make.sh)");
        let policy = if flags.is_empty() { ReferencePolicy::Deny } else { ReferencePolicy::SameDir };
        assert_content(&dir.join(name), policy, &expected);
    }
    // Every row of expected.tsv converts to its sha256.
    let tsv = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut rows = 0;
    for line in tsv.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let policy = if cols[1].contains("same-dir") { ReferencePolicy::SameDir } else { ReferencePolicy::Deny };
        let out = tempfile::tempdir().unwrap();
        let raw = common::vdisk_convert(&dir.join(cols[0]), &common::opts(policy), out.path(), "o.raw", 2);
        let (sha, len) = common::sha256_file(&raw);
        assert_eq!(sha, cols[2], "{}", cols[0]);
        assert_eq!(len.to_string(), cols[3], "{}", cols[0]);
        rows += 1;
    }
    assert_eq!(rows, 3);
}

#[test]
#[ignore = "writes testdata/vhd; run by testdata/vhd/make.sh"]
fn write_fixtures() {
    let dir = PathBuf::from(std::env::var("VHD_FIXTURE_DIR").expect("VHD_FIXTURE_DIR"));
    let mut rows = String::new();
    for (name, bytes, flags, expected) in fixtures() {
        std::fs::write(dir.join(name), &bytes).unwrap();
        use sha2::Digest;
        let sha = common::hex(&sha2::Sha256::digest(&expected));
        rows.push_str(&format!("{name}\t{flags}\t{sha}\t{}\n", expected.len()));
    }
    std::fs::write(dir.join("generated.tsv"), rows).unwrap();
}

#[test]
fn mutated_images_never_panic() {
    // A small in-process fuzz: random byte flips, field-sized overwrites and truncations of a
    // dynamic and a fixed image must give an error or a readable image, never a panic or hang.
    let size = 256 * 1024;
    let model = Model::random(size, 77, 40);
    let mut spec = Spec::new(size as u64, 0xee);
    spec.block_size = 16384;
    let dynamic = build_sparse(&spec, &model);
    let fixed = build_fixed(&spec, &model.over(None));
    let mut rng = Rng::new(0xf022);
    let (mut opened, mut refused) = (0, 0);
    for round in 0..3000 {
        let base = if round % 3 == 0 { &fixed } else { &dynamic };
        let mut b = base.clone();
        let hot = [0usize, 512, 1536, b.len() - 512];
        for _ in 0..=rng.below(4) {
            let at = if rng.below(2) == 0 {
                hot[rng.below(4) as usize] + rng.below(600) as usize
            } else {
                rng.below(b.len() as u64) as usize
            };
            let at = at.min(b.len() - 1);
            match rng.below(3) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = if rng.below(2) == 0 { 0 } else { 0xff },
                _ => {
                    for x in b.iter_mut().skip(at).take(4) {
                        *x = rng.below(256) as u8;
                    }
                }
            }
        }
        // Keep footers' checksums valid most of the time so the mutation reaches deeper.
        if rng.below(4) != 0 {
            let len = b.len();
            refresh_footer_checksum(&mut b, len - 512);
            if b.starts_with(b"conectix") {
                refresh_footer_checksum(&mut b, 0);
            }
            if b.len() >= 1536 && &b[512..520] == b"cxsparse" {
                patch_header(&mut b, |_| {});
            }
        }
        if rng.below(10) == 0 {
            let cut = rng.below(b.len() as u64) as usize;
            b.truncate(cut);
        }
        let src = std::sync::Arc::new(vdisk_core::MemSource(b.into()));
        match Image::from_source(src, &OpenOptions::default()) {
            Err(_) => refused += 1,
            Ok(img) => {
                opened += 1;
                let _ = img.info();
                let _ = img.check();
                let mut n = 0;
                for e in img.extents() {
                    n += 1;
                    if e.is_err() || n > 100_000 {
                        break;
                    }
                }
                let mut buf = vec![0u8; 64 * 1024];
                let _ = img.read_at(&mut buf, 0);
                let _ = img.read_at(&mut buf, img.virtual_size().saturating_sub(1000));
            }
        }
    }
    assert!(opened > 100 && refused > 100, "{opened} opened, {refused} refused");
}
