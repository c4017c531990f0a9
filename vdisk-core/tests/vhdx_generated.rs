//! VHDX variants qemu-img cannot create or read, built here from known content so the expected
//! guest bytes do not depend on vdisk: differencing disks with their parents (relative and
//! absolute locators, PARTIALLY_PRESENT blocks with sector bitmaps, every block state, a missing
//! parent, a DataWriteGuid mismatch, the reference policy), 4096-byte logical sectors, BATs with
//! interleaved sector bitmap entries, dirty logs replayed in memory, and damaged structures.
//!
//! The generator writes the format from the specification with its own CRC-32C; nothing here
//! calls into vdisk except to read the result.

// The generator writes on-disk fields whose values it chose small; narrowing casts are its job.
#![allow(clippy::cast_possible_truncation)]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use vdisk_core::{ErrorKind, ExtentKind, Image, OpenOptions, ReferencePolicy};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const LOG_OFFSET: u64 = MIB;
const LOG_LEN: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const BAT_OFFSET: u64 = 3 * MIB;

// ---------------------------------------------------------------------------------------------
// Encoding helpers
// ---------------------------------------------------------------------------------------------

/// CRC-32C, bit at a time, straight from the definition (independent of vdisk's table version).
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

/// Store the CRC-32C of `buf` (with its field at 4..8 zeroed) into that field.
fn seal(buf: &mut [u8]) {
    buf[4..8].fill(0);
    let c = crc32c(buf);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
}

fn put(buf: &mut [u8], at: u64, bytes: &[u8]) {
    let at = at as usize;
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&d1.to_le_bytes());
    g[4..6].copy_from_slice(&d2.to_le_bytes());
    g[6..8].copy_from_slice(&d3.to_le_bytes());
    g[8..].copy_from_slice(&d4);
    g
}

fn guid_text(g: &[u8; 16]) -> String {
    let d1 = u32::from_le_bytes(g[..4].try_into().unwrap());
    let d2 = u16::from_le_bytes(g[4..6].try_into().unwrap());
    let d3 = u16::from_le_bytes(g[6..8].try_into().unwrap());
    let tail: String = g[10..].iter().map(|b| format!("{b:02X}")).collect();
    format!("{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-{tail}}}", g[8], g[9])
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

const BAT_GUID: [u8; 16] =
    [0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08];
const METADATA_GUID: [u8; 16] =
    [0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E];

fn item_file_parameters() -> [u8; 16] {
    guid(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B])
}
fn item_virtual_disk_size() -> [u8; 16] {
    guid(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8])
}
fn item_page83() -> [u8; 16] {
    guid(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46])
}
fn item_logical_sector() -> [u8; 16] {
    guid(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F])
}
fn item_physical_sector() -> [u8; 16] {
    guid(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56])
}
fn item_parent_locator() -> [u8; 16] {
    guid(0xA8D3_5F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C])
}
fn vhdx_locator_type() -> [u8; 16] {
    guid(0xB04A_EFB7, 0xD19E, 0x4A81, [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13])
}

/// Deterministic bytes for content.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = common::Rng::new(seed);
    let mut v = Vec::with_capacity(len as usize);
    while (v.len() as u64) < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

/// Per-sector presence with runs of varied length (so bitmaps have 0x00, 0xFF and mixed bytes).
fn runs(seed: u64, sectors: u64) -> Vec<bool> {
    let mut rng = common::Rng::new(seed);
    let mut v = Vec::new();
    let mut on = rng.below(2) == 1;
    while (v.len() as u64) < sectors {
        let n = match rng.below(4) {
            0 => 1,
            1 => rng.below(8) + 1,
            _ => rng.below(200) + 1,
        };
        for _ in 0..n {
            v.push(on);
        }
        on = !on;
    }
    v.truncate(sectors as usize);
    v
}

// ---------------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------------

/// What a payload block holds in the generated file.
#[derive(Clone, Debug)]
enum Block {
    NotPresent,
    Undefined,
    Zero,
    Unmapped,
    /// Stored; the bytes of the block (its length inside the virtual disk).
    Full(Vec<u8>),
    /// Stored; the bytes, and which logical sectors the bitmap marks present.
    Partial(Vec<u8>, Vec<bool>),
}

/// A VHDX file to generate.
#[derive(Clone, Debug)]
struct Spec {
    virtual_size: u64,
    block_size: u64,
    logical: u64,
    physical: u64,
    leave_allocated: bool,
    blocks: BTreeMap<u64, Block>,
    /// Parent locator key/value pairs: present makes a differencing disk.
    locator: Option<Vec<(String, String)>>,
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
    /// An extra region the reader does not know, with the required bit set.
    unknown_required_region: bool,
    /// An extra metadata item the reader does not know, with the required bit set.
    unknown_required_item: bool,
}

/// A generated file and where things went.
struct Layout {
    file: Vec<u8>,
    block_offset: BTreeMap<u64, u64>,
}

impl Spec {
    fn new(virtual_size: u64, block_size: u64, logical: u64, seed: u8) -> Spec {
        Spec {
            virtual_size,
            block_size,
            logical,
            physical: 4096,
            leave_allocated: false,
            blocks: BTreeMap::new(),
            locator: None,
            data_write_guid: guid(0x1111_0000 | u32::from(seed), 0x2222, 0x3333, [4, 5, 6, 7, 8, 9, 10, seed]),
            log_guid: [0; 16],
            unknown_required_region: false,
            unknown_required_item: false,
        }
    }

    fn chunk_ratio(&self) -> u64 {
        (1 << 23) * self.logical / self.block_size
    }

    fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }

    fn bat_entries(&self) -> u64 {
        let (d, cr) = (self.data_blocks(), self.chunk_ratio());
        if self.locator.is_some() {
            d.div_ceil(cr) * (cr + 1)
        } else {
            d + (d - 1) / cr
        }
    }

    fn payload_index(&self, b: u64) -> u64 {
        b + b / self.chunk_ratio()
    }

    fn block_len(&self, b: u64) -> u64 {
        (self.virtual_size - b * self.block_size).min(self.block_size)
    }

    fn full(&mut self, b: u64, seed: u64) -> &mut Self {
        let len = self.block_len(b);
        self.blocks.insert(b, Block::Full(pattern(seed, len)));
        self
    }

    fn partial(&mut self, b: u64, seed: u64) -> &mut Self {
        let len = self.block_len(b);
        self.blocks.insert(b, Block::Partial(pattern(seed, len), runs(seed ^ 0xABCD, len / self.logical)));
        self
    }

    fn state(&mut self, b: u64, block: Block) -> &mut Self {
        self.blocks.insert(b, block);
        self
    }

    fn bat_region_len(&self) -> u64 {
        (self.bat_entries() * 8).div_ceil(MIB).max(1) * MIB
    }

    fn header(&self, seq: u64) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        put(&mut h, 0, b"head");
        put(&mut h, 8, &seq.to_le_bytes());
        put(&mut h, 16, &guid(0xF11E, 1, 2, [3; 8]));
        put(&mut h, 32, &self.data_write_guid);
        put(&mut h, 48, &self.log_guid);
        put(&mut h, 64, &0u16.to_le_bytes());
        put(&mut h, 66, &1u16.to_le_bytes());
        put(&mut h, 68, &(LOG_LEN as u32).to_le_bytes());
        put(&mut h, 72, &LOG_OFFSET.to_le_bytes());
        seal(&mut h);
        h
    }

    fn region_table(&self) -> Vec<u8> {
        let mut r = vec![0u8; 64 * KIB as usize];
        put(&mut r, 0, b"regi");
        let mut entries = vec![(BAT_GUID, BAT_OFFSET, self.bat_region_len()), (METADATA_GUID, METADATA_OFFSET, MIB)];
        if self.unknown_required_region {
            entries.push((guid(0xDEAD_BEEF, 1, 2, [9; 8]), 64 * MIB, MIB));
        }
        put(&mut r, 8, &(entries.len() as u32).to_le_bytes());
        for (i, (g, off, len)) in entries.iter().enumerate() {
            let at = 16 + 32 * i as u64;
            put(&mut r, at, g);
            put(&mut r, at + 16, &off.to_le_bytes());
            put(&mut r, at + 24, &(*len as u32).to_le_bytes());
            put(&mut r, at + 28, &1u32.to_le_bytes());
        }
        seal(&mut r);
        r
    }

    fn metadata(&self) -> Vec<u8> {
        let mut m = vec![0u8; MIB as usize];
        put(&mut m, 0, b"metadata");
        let mut flags = u32::from(self.leave_allocated);
        if self.locator.is_some() {
            flags |= 2;
        }
        let mut items: Vec<([u8; 16], Vec<u8>, u32)> = vec![
            (item_file_parameters(), [(self.block_size as u32).to_le_bytes(), flags.to_le_bytes()].concat(), 4),
            (item_virtual_disk_size(), self.virtual_size.to_le_bytes().to_vec(), 6),
            (item_page83(), guid(0xD15C, 7, 8, [1, 2, 3, 4, 5, 6, 7, 8]).to_vec(), 6),
            (item_logical_sector(), (self.logical as u32).to_le_bytes().to_vec(), 6),
            (item_physical_sector(), (self.physical as u32).to_le_bytes().to_vec(), 6),
        ];
        if let Some(kv) = &self.locator {
            let mut loc = Vec::new();
            loc.extend_from_slice(&vhdx_locator_type());
            loc.extend_from_slice(&0u16.to_le_bytes());
            loc.extend_from_slice(&(kv.len() as u16).to_le_bytes());
            let mut strings = Vec::new();
            let base = 20 + 12 * kv.len();
            let mut entries = Vec::new();
            for (k, v) in kv {
                let (k, v) = (utf16(k), utf16(v));
                let ko = base + strings.len();
                strings.extend_from_slice(&k);
                let vo = base + strings.len();
                strings.extend_from_slice(&v);
                entries.push((ko as u32, vo as u32, k.len() as u16, v.len() as u16));
            }
            for (ko, vo, kl, vl) in entries {
                loc.extend_from_slice(&ko.to_le_bytes());
                loc.extend_from_slice(&vo.to_le_bytes());
                loc.extend_from_slice(&kl.to_le_bytes());
                loc.extend_from_slice(&vl.to_le_bytes());
            }
            loc.extend_from_slice(&strings);
            items.push((item_parent_locator(), loc, 4));
        }
        if self.unknown_required_item {
            items.push((guid(0x0BAD_CAFE, 3, 4, [5; 8]), vec![1, 2, 3, 4], 4));
        }
        put(&mut m, 10, &(items.len() as u16).to_le_bytes());
        let mut data_at = 64 * KIB;
        for (i, (g, data, flags)) in items.iter().enumerate() {
            let at = 32 + 32 * i as u64;
            put(&mut m, at, g);
            put(&mut m, at + 16, &(data_at as u32).to_le_bytes());
            put(&mut m, at + 20, &(data.len() as u32).to_le_bytes());
            put(&mut m, at + 24, &flags.to_le_bytes());
            put(&mut m, data_at, data);
            data_at += (data.len() as u64).div_ceil(8) * 8;
        }
        m
    }

    fn build(&self) -> Layout {
        let data_start = BAT_OFFSET + self.bat_region_len();
        let mut f = vec![0u8; data_start as usize];
        put(&mut f, 0, b"vhdxfile");
        put(&mut f, 8, &utf16("vdisk test generator"));
        put(&mut f, 64 * KIB, &self.header(1));
        put(&mut f, 128 * KIB, &self.header(2));
        let rt = self.region_table();
        put(&mut f, 192 * KIB, &rt);
        put(&mut f, 256 * KIB, &rt);
        put(&mut f, METADATA_OFFSET, &self.metadata());

        let cr = self.chunk_ratio();
        let bpb = self.block_size / self.logical / 8;
        let mut block_offset = BTreeMap::new();
        let mut bitmaps: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (&b, block) in &self.blocks {
            let entry = match block {
                Block::NotPresent => 0,
                Block::Undefined => 1,
                Block::Zero => 2,
                Block::Unmapped => 3,
                Block::Full(data) | Block::Partial(data, _) => {
                    let off = f.len() as u64;
                    f.extend_from_slice(data);
                    f.resize((off + self.block_size) as usize, 0);
                    block_offset.insert(b, off);
                    if let Block::Partial(_, present) = block {
                        let bm = bitmaps.entry(b / cr).or_insert_with(|| vec![0u8; MIB as usize]);
                        for (s, &p) in present.iter().enumerate() {
                            if p {
                                let bit = (b % cr) * bpb * 8 + s as u64;
                                bm[(bit / 8) as usize] |= 1 << (bit % 8);
                            }
                        }
                        7 | (off / MIB) << 20
                    } else {
                        6 | (off / MIB) << 20
                    }
                }
            };
            put(&mut f, BAT_OFFSET + 8 * self.payload_index(b), &u64::to_le_bytes(entry));
        }
        for (chunk, bm) in bitmaps {
            let off = f.len() as u64;
            f.extend_from_slice(&bm);
            let index = chunk * (cr + 1) + cr;
            put(&mut f, BAT_OFFSET + 8 * index, &(6 | (off / MIB) << 20).to_le_bytes());
        }
        Layout { file: f, block_offset }
    }

    /// The guest content: this file's blocks over `parent` (zeros where there is none).
    fn expected(&self, parent: Option<&[u8]>) -> Vec<u8> {
        let size = self.virtual_size as usize;
        let mut out = match parent {
            Some(p) => {
                let mut v = p[..p.len().min(size)].to_vec();
                v.resize(size, 0);
                v
            }
            None => vec![0u8; size],
        };
        for (&b, block) in &self.blocks {
            let start = (b * self.block_size) as usize;
            let len = self.block_len(b) as usize;
            let dst = &mut out[start..start + len];
            match block {
                Block::NotPresent | Block::Undefined => {}
                Block::Zero | Block::Unmapped => dst.fill(0),
                Block::Full(data) => dst.copy_from_slice(data),
                Block::Partial(data, present) => {
                    let ls = self.logical as usize;
                    for (s, &p) in present.iter().enumerate() {
                        if p {
                            dst[s * ls..(s + 1) * ls].copy_from_slice(&data[s * ls..(s + 1) * ls]);
                        }
                    }
                }
            }
        }
        out
    }

    fn write(&self, path: &Path) -> Layout {
        let l = self.build();
        std::fs::write(path, &l.file).unwrap();
        l
    }
}

// ---------------------------------------------------------------------------------------------
// Log entries
// ---------------------------------------------------------------------------------------------

enum LogOp {
    /// A full 4 KiB sector to write at the offset.
    Data(u64, Vec<u8>),
    /// A range to zero.
    Zero(u64, u64),
}

struct LogEntry {
    seq: u64,
    tail: u64,
    flushed: u64,
    last: u64,
    guid: [u8; 16],
    ops: Vec<LogOp>,
}

impl LogEntry {
    fn bytes(&self) -> Vec<u8> {
        let hdr_sectors = (64 + 32 * self.ops.len() as u64).div_ceil(4096);
        let data_count = self.ops.iter().filter(|o| matches!(o, LogOp::Data(..))).count() as u64;
        let len = (hdr_sectors + data_count) * 4096;
        let mut e = vec![0u8; len as usize];
        put(&mut e, 0, b"loge");
        put(&mut e, 8, &(len as u32).to_le_bytes());
        put(&mut e, 12, &(self.tail as u32).to_le_bytes());
        put(&mut e, 16, &self.seq.to_le_bytes());
        put(&mut e, 24, &(self.ops.len() as u32).to_le_bytes());
        put(&mut e, 32, &self.guid);
        put(&mut e, 48, &self.flushed.to_le_bytes());
        put(&mut e, 56, &self.last.to_le_bytes());
        let mut sector = hdr_sectors;
        for (i, op) in self.ops.iter().enumerate() {
            let at = 64 + 32 * i as u64;
            match op {
                LogOp::Data(off, s) => {
                    assert_eq!(s.len(), 4096);
                    put(&mut e, at, b"desc");
                    put(&mut e, at + 4, &s[4092..]);
                    put(&mut e, at + 8, &s[..8]);
                    put(&mut e, at + 16, &off.to_le_bytes());
                    put(&mut e, at + 24, &self.seq.to_le_bytes());
                    let d = sector * 4096;
                    put(&mut e, d, b"data");
                    put(&mut e, d + 4, &((self.seq >> 32) as u32).to_le_bytes());
                    put(&mut e, d + 8, &s[8..4092]);
                    put(&mut e, d + 4092, &(self.seq as u32).to_le_bytes());
                    sector += 1;
                }
                LogOp::Zero(off, len) => {
                    put(&mut e, at, b"zero");
                    put(&mut e, at + 8, &len.to_le_bytes());
                    put(&mut e, at + 16, &off.to_le_bytes());
                    put(&mut e, at + 24, &self.seq.to_le_bytes());
                }
            }
        }
        seal(&mut e);
        e
    }
}

/// Write `bytes` into the circular log inside `file` at log position `pos`.
fn place(file: &mut [u8], pos: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        let p = (pos + i as u64) % LOG_LEN;
        file[(LOG_OFFSET + p) as usize] = b;
    }
}

// ---------------------------------------------------------------------------------------------
// Checking helpers
// ---------------------------------------------------------------------------------------------

fn open_with(path: &Path, policy: ReferencePolicy) -> vdisk_core::Result<Image> {
    Image::open(path, &OpenOptions { references: policy, ..OpenOptions::default() })
}

/// vdisk reads `path` as `expected`: through the copy engine with 1 and 2 threads, and through
/// `read_at` at unaligned offsets.
fn assert_content(path: &Path, policy: ReferencePolicy, expected: &[u8]) {
    let img = open_with(path, policy).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(img.virtual_size(), expected.len() as u64);
    let dir = tempfile::tempdir().unwrap();
    for threads in [1, 2] {
        let out = common::vdisk_convert(path, &common::opts(policy), dir.path(), "out.raw", threads);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), expected.len());
        if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
            panic!("{}: first difference at {i:#x} ({threads} threads)", path.display());
        }
    }
    let mut rng = common::Rng::new(expected.len() as u64);
    for _ in 0..50 {
        let off = rng.below(expected.len() as u64);
        let len = (rng.below(3 * 4096) + 1).min(expected.len() as u64 - off) as usize;
        let mut buf = vec![0u8; len];
        assert_eq!(img.read_at(&mut buf, off).unwrap(), len);
        assert!(buf == expected[off as usize..off as usize + len], "read_at {off:#x}+{len:#x}");
    }
}

/// The extents of an image, as (start, end, kind).
fn extents(img: &Image) -> Vec<(u64, u64, ExtentKind)> {
    img.extents().map(|e| e.unwrap()).map(|e| (e.start, e.end(), e.kind)).collect()
}

fn kind_at(ext: &[(u64, u64, ExtentKind)], at: u64) -> ExtentKind {
    ext.iter().find(|(s, e, _)| *s <= at && at < *e).unwrap().2
}

fn layer_of(k: ExtentKind) -> Option<u32> {
    match k {
        ExtentKind::Data { layer, .. } | ExtentKind::Zero { layer } => Some(layer),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Differencing disks
// ---------------------------------------------------------------------------------------------

/// A parent (dynamic, 1 MiB blocks, last block short) and a child exercising every block state.
fn parent_and_child(logical: u64) -> (Spec, Spec) {
    let size = 9 * MIB + 8 * logical;
    let mut parent = Spec::new(size, MIB, logical, 1);
    for b in 0..=9 {
        parent.full(b, 100 + b);
    }
    parent.state(4, Block::Zero);
    let mut child = Spec::new(size, MIB, logical, 2);
    child
        .state(0, Block::NotPresent)
        .full(1, 201)
        .partial(2, 202)
        .state(3, Block::Zero)
        .state(5, Block::Unmapped)
        .state(6, Block::Undefined)
        .partial(7, 207)
        .partial(9, 209);
    // Block 8: PARTIALLY_PRESENT with no sector present reads entirely from the parent.
    let len = child.block_len(8);
    child.state(8, Block::Partial(pattern(208, len), vec![false; (len / logical) as usize]));
    (parent, child)
}

fn locator(parent: &Spec, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = vec![("parent_linkage".to_string(), guid_text(&parent.data_write_guid))];
    v.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    v
}

#[test]
fn differencing_relative_locator_every_block_state() {
    for logical in [512, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let (parent, mut child) = parent_and_child(logical);
        child.locator = Some(locator(
            &parent,
            &[
                ("relative_path", ".\\parent.vhdx"),
                ("volume_path", "\\\\?\\Volume{0eba351e-5634-46d6-a8cf-4ddc2d6ac0b9}\\vms\\parent.vhdx"),
                ("absolute_win32_path", "C:\\vms\\parent.vhdx"),
                ("parent_linkage2", "{00000000-0000-0000-0000-000000000000}"),
            ],
        ));
        parent.write(&dir.path().join("parent.vhdx"));
        let child_path = dir.path().join("child.avhdx");
        child.write(&child_path);
        let pexp = parent.expected(None);
        let expected = child.expected(Some(&pexp));
        assert_content(&child_path, ReferencePolicy::SameDir, &expected);

        // Extents: the child's own sectors at layer 0, the parent's at layer 1.
        let img = open_with(&child_path, ReferencePolicy::SameDir).unwrap();
        let ext = extents(&img);
        assert_eq!(layer_of(kind_at(&ext, 0)), Some(1), "NOT_PRESENT reads the parent");
        assert_eq!(layer_of(kind_at(&ext, MIB)), Some(0), "FULLY_PRESENT");
        assert_eq!(kind_at(&ext, 3 * MIB), ExtentKind::Zero { layer: 0 }, "ZERO hides the parent");
        assert_eq!(kind_at(&ext, 5 * MIB), ExtentKind::Zero { layer: 0 }, "UNMAPPED hides the parent");
        assert_eq!(layer_of(kind_at(&ext, 6 * MIB)), Some(1), "UNDEFINED reads the parent");
        assert_eq!(kind_at(&ext, 4 * MIB), ExtentKind::Zero { layer: 1 }, "the parent's ZERO block");
        let Some(Block::Partial(_, present)) = child.blocks.get(&2) else { unreachable!() };
        for (s, &p) in present.iter().enumerate() {
            let at = 2 * MIB + s as u64 * logical;
            assert_eq!(layer_of(kind_at(&ext, at)), Some(if p { 0 } else { 1 }), "block 2 sector {s}");
        }
        assert!(ext.iter().filter(|(_, _, k)| layer_of(*k) == Some(0)).count() > 4);

        // info describes the child and names its parent as the locator does.
        let info = Image::describe(&child_path, &common::opts(ReferencePolicy::Deny)).unwrap();
        assert_eq!(info.backing_filename.as_deref(), Some("./parent.vhdx"));
        assert_eq!(info.backing_filename_format.as_deref(), Some("vhdx"));
        let fs = info.format_specific.unwrap();
        assert_eq!(fs["data"]["subformat"], "differencing");
        assert_eq!(fs["data"]["has-parent"], true);
        assert_eq!(fs["data"]["logical-sector-size"], logical);
        assert_eq!(fs["data"]["parent-locator"]["relative_path"], ".\\parent.vhdx");
        assert_eq!(fs["data"]["parent-linkage"], guid_text(&parent.data_write_guid));
        assert_eq!(img.check().unwrap().corruptions, 0);

        // Under the default policy the parent is refused, naming the option that allows it.
        let e = open_with(&child_path, ReferencePolicy::Deny).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
        assert!(e.to_string().contains("same-dir"), "{e}");
    }
}

#[test]
fn differencing_absolute_locator_and_fallbacks() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, mut child) = parent_and_child(512);
    let sub = dir.path().join("base");
    std::fs::create_dir(&sub).unwrap();
    let parent_path = sub.join("parent.vhdx");
    parent.write(&parent_path);
    let expected = child.expected(Some(&parent.expected(None)));
    // A Windows absolute path: drive letter, backslashes.
    let win = format!("D:{}", parent_path.display().to_string().replace('/', "\\"));

    // Only an absolute path: opened under `any`, refused under `same-dir`.
    child.locator = Some(locator(&parent, &[("absolute_win32_path", &win)]));
    let only_abs = dir.path().join("abs.avhdx");
    child.write(&only_abs);
    assert_content(&only_abs, ReferencePolicy::Any, &expected);
    let e = open_with(&only_abs, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    let info = Image::describe(&only_abs, &Default::default()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some(parent_path.to_str().unwrap()));

    // A stale relative path falls back to the absolute one.
    child.locator = Some(locator(&parent, &[("relative_path", "moved\\parent.vhdx"), ("absolute_win32_path", &win)]));
    let stale = dir.path().join("stale.avhdx");
    child.write(&stale);
    assert_content(&stale, ReferencePolicy::Any, &expected);

    // A relative path into a sub-folder, Windows separators.
    child.locator = Some(locator(&parent, &[("relative_path", "base\\parent.vhdx")]));
    let rel = dir.path().join("rel.avhdx");
    child.write(&rel);
    assert_content(&rel, ReferencePolicy::SameDir, &expected);
}

#[test]
fn differencing_parent_missing_or_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, mut child) = parent_and_child(512);
    parent.write(&dir.path().join("parent.vhdx"));

    // Missing parent: a clean I/O error naming it, under every policy that would open it.
    child.locator =
        Some(locator(&parent, &[("relative_path", ".\\gone.vhdx"), ("absolute_win32_path", "C:\\gone.vhdx")]));
    let missing = dir.path().join("missing.avhdx");
    child.write(&missing);
    for p in [ReferencePolicy::SameDir, ReferencePolicy::Any] {
        let e = open_with(&missing, p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains("gone.vhdx"), "{e}");
    }
    // ... while info still works without it.
    let info = Image::describe(&missing, &Default::default()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("./gone.vhdx"));

    // A parent whose DataWriteGuid is not the linkage: refused.
    let mut other = parent.clone();
    other.data_write_guid = guid(0x0BAD, 1, 1, [1; 8]);
    child.locator = Some(locator(&other, &[("relative_path", "parent.vhdx")]));
    let wrong = dir.path().join("wrong.avhdx");
    child.write(&wrong);
    let e = open_with(&wrong, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    assert!(e.to_string().contains("DataWriteGuid"), "{e}");

    // parent_linkage2 naming the parent is accepted.
    let mut kv = locator(&other, &[("relative_path", "parent.vhdx")]);
    kv.push(("parent_linkage2".into(), guid_text(&parent.data_write_guid).to_lowercase()));
    child.locator = Some(kv);
    let alt = dir.path().join("alt.avhdx");
    child.write(&alt);
    assert_content(&alt, ReferencePolicy::SameDir, &child.expected(Some(&parent.expected(None))));

    // No parent_linkage at all: the locator is invalid.
    child.locator = Some(vec![("relative_path".into(), "parent.vhdx".into())]);
    let nolink = dir.path().join("nolink.avhdx");
    child.write(&nolink);
    let e = open_with(&nolink, ReferencePolicy::SameDir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");

    // A child that names itself: a loop, not a hang.
    let mut me = child.clone();
    me.locator = Some(locator(&child, &[("relative_path", "self.avhdx")]));
    me.data_write_guid = child.data_write_guid;
    let selfp = dir.path().join("self.avhdx");
    me.write(&selfp);
    let e = open_with(&selfp, ReferencePolicy::SameDir).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");

    // A parent path that leaves the directory is refused under same-dir.
    child.locator = Some(locator(&parent, &[("relative_path", "..\\x\\parent.vhdx")]));
    let up = dir.path().join("up.avhdx");
    child.write(&up);
    assert_eq!(open_with(&up, ReferencePolicy::SameDir).unwrap_err().kind(), ErrorKind::ReferenceDenied);
}

#[test]
fn differencing_chain_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mut mid) = parent_and_child(512);
    mid.locator = Some(locator(&base, &[("relative_path", ".\\base.vhdx")]));
    let mut top = Spec::new(base.virtual_size, MIB, 512, 3);
    top.partial(0, 300).partial(2, 302).state(6, Block::Zero).full(9, 309);
    top.locator = Some(locator(&mid, &[("relative_path", ".\\mid.avhdx")]));
    base.write(&dir.path().join("base.vhdx"));
    mid.write(&dir.path().join("mid.avhdx"));
    let top_path = dir.path().join("top.avhdx");
    top.write(&top_path);
    let expected = top.expected(Some(&mid.expected(Some(&base.expected(None)))));
    assert_content(&top_path, ReferencePolicy::SameDir, &expected);
    let img = open_with(&top_path, ReferencePolicy::SameDir).unwrap();
    let layers: std::collections::BTreeSet<u32> = extents(&img).iter().filter_map(|e| layer_of(e.2)).collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    // A chain deeper than the limit is refused.
    let mut limits = vdisk_core::Limits::default();
    limits.max_chain_depth = 2;
    let o = OpenOptions { references: ReferencePolicy::SameDir, limits, ..OpenOptions::default() };
    assert_eq!(Image::open(&top_path, &o).unwrap_err().kind(), ErrorKind::LimitExceeded);
}

// ---------------------------------------------------------------------------------------------
// 4096-byte logical sectors, interleaved BATs, fixed disks
// ---------------------------------------------------------------------------------------------

#[test]
fn logical_sectors_of_4096_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(6 * MIB + 3 * 4096, MIB, 4096, 4);
    spec.full(0, 1).state(1, Block::Zero).full(2, 2).state(3, Block::Unmapped).full(6, 6);
    let path = dir.path().join("4k.vhdx");
    spec.write(&path);
    assert_content(&path, ReferencePolicy::Deny, &spec.expected(None));
    let info = Image::describe(&path, &Default::default()).unwrap();
    assert_eq!(info.format_specific.unwrap()["data"]["logical-sector-size"], 4096);
    // qemu-img refuses 4096-byte logical sectors; vdisk is the only way to read them.
    if common::have_qemu() {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-f", "vhdx", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "qemu-img now reads 4096-byte logical sectors");
    }
    // A virtual size that is not a whole number of 4096-byte sectors is invalid.
    let mut bad = spec.clone();
    bad.virtual_size = 6 * MIB + 512;
    bad.blocks.clear();
    let p = dir.path().join("bad.vhdx");
    bad.write(&p);
    assert_eq!(open_with(&p, ReferencePolicy::Deny).unwrap_err().kind(), ErrorKind::InvalidImage);
}

#[test]
fn bat_with_interleaved_sector_bitmap_entries() {
    // 1 MiB blocks and 512-byte sectors: a sector bitmap entry follows every 4096 payload entries.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(4 * 1024 * MIB + 5 * MIB, MIB, 512, 5);
    spec.full(0, 10).full(4095, 11).full(4096, 12).state(4097, Block::Zero).full(4100, 13);
    let path = dir.path().join("wide.vhdx");
    spec.write(&path);
    let img = open_with(&path, ReferencePolicy::Deny).unwrap();
    let data = common::vdisk_data_ranges(&img);
    assert_eq!(data, vec![(0, MIB), (4095 * MIB, 4097 * MIB), (4100 * MIB, 4101 * MIB)]);
    for (b, seed) in [(0u64, 10u64), (4095, 11), (4096, 12), (4100, 13)] {
        let mut buf = vec![0u8; MIB as usize];
        img.read_at(&mut buf, b * MIB).unwrap();
        assert!(buf == pattern(seed, MIB), "block {b}");
    }
    let ext = extents(&img);
    assert_eq!(kind_at(&ext, 4097 * MIB), ExtentKind::Zero { layer: 0 });
    assert_eq!(kind_at(&ext, 4098 * MIB), ExtentKind::Unallocated);
    assert_eq!(img.check().unwrap().corruptions, 0);
}

#[test]
fn fixed_disk_and_every_state_without_parent() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(5 * MIB, MIB, 512, 6);
    spec.leave_allocated = true;
    spec.full(0, 1).state(1, Block::Undefined).state(2, Block::Zero).state(3, Block::Unmapped).full(4, 4);
    let path = dir.path().join("fixed.vhdx");
    spec.write(&path);
    assert_content(&path, ReferencePolicy::Deny, &spec.expected(None));
    let info = Image::describe(&path, &Default::default()).unwrap();
    assert_eq!(info.format_specific.unwrap()["data"]["subformat"], "fixed");

    // PARTIALLY_PRESENT makes sense only in a differencing disk.
    spec.partial(1, 7);
    let p = dir.path().join("partial.vhdx");
    spec.write(&p);
    let e = open_with(&p, ReferencePolicy::Deny).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("PARTIALLY_PRESENT"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Dirty logs
// ---------------------------------------------------------------------------------------------

/// The final image (as it reads once the log is replayed) and the file as stored, whose log
/// holds the entries that turn one into the other.
struct Dirty {
    /// The final state, as a spec (the expected content).
    spec: Spec,
    /// The file as stored: stale BAT and payload, truncated before its last block, dirty log.
    file: Vec<u8>,
}

/// `last_short_by`: how far the head's LastFileOffset falls short of the final file size (the
/// replay rounds it up to 1 MiB).
fn dirty_image(last_short_by: u64) -> Dirty {
    let mut spec = Spec::new(16 * MIB, MIB, 512, 8);
    spec.log_guid = guid(0x1065_0000, 1, 2, [3; 8]);
    // Block 0: data, with 64 KiB..192 KiB zero (the log zeroes stale bytes there).
    let mut b0 = pattern(1, MIB);
    b0[64 * KIB as usize..192 * KIB as usize].fill(0);
    spec.state(0, Block::Full(b0));
    spec.full(3, 3);
    spec.state(7, Block::Zero);
    // Block 5, stored last: only its first 4 KiB are non-zero, and they exist only in the log.
    let mut b5 = vec![0u8; MIB as usize];
    b5[..4096].copy_from_slice(&pattern(5, 4096));
    spec.state(5, Block::Full(b5));
    let fin = spec.build();
    let (o0, o5) = (fin.block_offset[&0], fin.block_offset[&5]);
    assert_eq!(o5 + MIB, fin.file.len() as u64, "block 5 is stored last");

    let mut s = fin.file.clone();
    // Stale BAT: blocks 3 and 5 not yet allocated.
    put(&mut s, BAT_OFFSET + 8 * spec.payload_index(3), &0u64.to_le_bytes());
    put(&mut s, BAT_OFFSET + 8 * spec.payload_index(5), &0u64.to_le_bytes());
    // Stale payload: block 0's third sector, and garbage where the log zeroes.
    put(&mut s, o0 + 8 * KIB, &[0x5A; 4096]);
    put(&mut s, o0 + 64 * KIB, &vec![0xEE; 128 * KIB as usize]);
    // The file ends before block 5: the replay grows it.
    s.truncate(o5 as usize);
    let stored_len = s.len() as u64;
    let final_len = fin.file.len() as u64;
    let sector = |at: u64| fin.file[at as usize..(at + 4096) as usize].to_vec();

    let g = spec.log_guid;
    let e1_pos = LOG_LEN - 12 * KIB;
    let e1 = LogEntry {
        seq: 10,
        tail: e1_pos,
        flushed: stored_len,
        last: stored_len,
        guid: g,
        // Metadata (the BAT sector holding blocks 3 and 5) and a zeroed payload range.
        ops: vec![LogOp::Data(BAT_OFFSET, sector(BAT_OFFSET)), LogOp::Zero(o0 + 64 * KIB, 128 * KIB)],
    };
    let e1b = e1.bytes();
    assert_eq!(e1b.len() as u64, 8 * KIB);
    let e2 = LogEntry {
        seq: 11,
        tail: e1_pos,
        flushed: stored_len,
        last: final_len - last_short_by,
        guid: g,
        // Payload, including a sector past the stored end of the file.
        ops: vec![LogOp::Data(o0 + 8 * KIB, sector(o0 + 8 * KIB)), LogOp::Data(o5, sector(o5))],
    };
    let e2b = e2.bytes();
    assert_eq!(e2b.len() as u64, 12 * KIB);
    let e2_pos = e1_pos + e1b.len() as u64; // wraps around the end of the log
    place(&mut s, e1_pos, &e1b);
    place(&mut s, e2_pos, &e2b);
    // An old, valid entry of an earlier sequence: must not be replayed.
    let stale = LogEntry {
        seq: 3,
        tail: 0x40000,
        flushed: stored_len,
        last: stored_len,
        guid: g,
        ops: vec![LogOp::Data(o0 + 8 * KIB, vec![0xC3; 4096])],
    };
    place(&mut s, 0x40000, &stale.bytes());
    // A newer entry with a bad checksum and one of another log: both ignored.
    let mut torn = LogEntry {
        seq: 12,
        tail: e1_pos,
        flushed: stored_len,
        last: stored_len,
        guid: g,
        ops: vec![LogOp::Zero(o0, MIB)],
    }
    .bytes();
    torn[100] ^= 1;
    place(&mut s, (e2_pos + e2b.len() as u64) % LOG_LEN, &torn);
    let foreign = LogEntry {
        seq: 50,
        tail: 0x60000,
        flushed: stored_len,
        last: stored_len,
        guid: guid(0xF0E1, 0, 0, [0; 8]),
        ops: vec![LogOp::Zero(o0, MIB)],
    };
    place(&mut s, 0x60000, &foreign.bytes());
    Dirty { spec, file: s }
}

#[test]
fn dirty_log_is_replayed_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dirty_image(0);
    let path = dir.path().join("dirty.vhdx");
    std::fs::write(&path, &d.file).unwrap();
    let expected = d.spec.expected(None);
    assert_content(&path, ReferencePolicy::Deny, &expected);
    assert_eq!(std::fs::read(&path).unwrap(), d.file, "the file must not be modified");

    let img = open_with(&path, ReferencePolicy::Deny).unwrap();
    let info = img.info();
    assert!(info.dirty_flag);
    let fs = info.format_specific.clone().unwrap();
    assert_eq!(fs["data"]["log"], "replayed");
    assert_eq!(fs["data"]["log-replay"]["entries"], 2);
    assert_eq!(fs["data"]["log-replay"]["first-sequence"], 10);
    assert_eq!(fs["data"]["log-replay"]["last-sequence"], 11);
    assert_eq!(fs["data"]["log-replay"]["sectors"], 3);
    assert_eq!(fs["data"]["log-replay"]["zero-ranges"], 1);
    let report = img.check().unwrap();
    assert_eq!(report.corruptions, 1, "{:?}", report.problems);
    assert!(report.problems[0].message.contains("never applied"));
    // Block 5 lies past the stored end of the file but inside the replayed size.
    let ext = extents(&img);
    assert!(matches!(kind_at(&ext, 5 * MIB), ExtentKind::Data { layer: 0, .. }));

    // qemu-img refuses the file read-only; its own replay (on a copy) must agree with ours.
    if common::have_qemu() {
        let q = std::process::Command::new("qemu-img")
            .args(["info", "-f", "vhdx", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!q.status.success());
        let copy = dir.path().join("copy.vhdx");
        // qemu-img grows the file to LastFileOffset only when that is not a multiple of 1 MiB
        // (its replay rounds up and truncates inside that branch); give it an unaligned one.
        let d = dirty_image(4096);
        std::fs::write(&copy, &d.file).unwrap();
        assert_content(&copy, ReferencePolicy::Deny, &expected);
        let o = std::process::Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx"])
            .arg(&copy)
            .output()
            .unwrap();
        // qemu-img counts the replayed log as one repaired corruption, as vdisk's check does.
        assert!(String::from_utf8_lossy(&o.stdout).contains("1 corruptions"), "{o:?}");
        let raw = common::qemu_convert(&copy, "vhdx", dir.path(), "qemu.raw");
        assert!(std::fs::read(raw).unwrap() == expected, "qemu-img's replay differs from the expected content");
    }
}

#[test]
fn dirty_log_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dirty_image(0);

    // Without a log GUID the log is not looked at: the stale content reads as stored.
    let mut clean = d.file.clone();
    let mut spec = d.spec.clone();
    spec.log_guid = [0; 16];
    put(&mut clean, 64 * KIB, &spec.header(1));
    put(&mut clean, 128 * KIB, &spec.header(2));
    let p = dir.path().join("clean.vhdx");
    std::fs::write(&p, &clean).unwrap();
    let img = open_with(&p, ReferencePolicy::Deny).unwrap();
    assert!(!img.info().dirty_flag);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 8 * KIB).unwrap();
    assert_eq!(buf, vec![0x5A; 4096]);
    img.read_at(&mut buf, 3 * MIB).unwrap();
    assert_eq!(buf, vec![0; 4096], "block 3 is not allocated before the replay");

    // A log GUID with no valid entry: nothing to replay.
    let mut empty = clean.clone();
    put(&mut empty, 64 * KIB, &d.spec.header(1));
    put(&mut empty, 128 * KIB, &d.spec.header(2));
    empty[LOG_OFFSET as usize..(LOG_OFFSET + LOG_LEN) as usize].fill(0);
    let p = dir.path().join("empty-log.vhdx");
    std::fs::write(&p, &empty).unwrap();
    let img = open_with(&p, ReferencePolicy::Deny).unwrap();
    assert_eq!(img.info().format_specific.unwrap()["data"]["log"], "clean");

    // An entry that needs more file than there is: the file was truncated.
    let mut short = d.file.clone();
    short.truncate(short.len() - MIB as usize);
    let p = dir.path().join("short.vhdx");
    std::fs::write(&p, &short).unwrap();
    let e = open_with(&p, ReferencePolicy::Deny).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("truncated"), "{e}");

    // The head names a tail outside its sequence: refused rather than half replayed.
    let mut f = d.file.clone();
    let e1_pos = LOG_LEN - 12 * KIB;
    let o0 = 4 * MIB;
    let head = LogEntry {
        seq: 11,
        tail: 0x20000,
        flushed: 0,
        last: 0,
        guid: d.spec.log_guid,
        ops: vec![LogOp::Zero(o0, 4096), LogOp::Zero(o0 + 4096, 4096)],
    };
    let mut hb = head.bytes();
    hb.resize(12 * KIB as usize, 0);
    // Re-seal at the original length so it replaces entry 2 exactly.
    hb[8..12].copy_from_slice(&(12 * KIB as u32).to_le_bytes());
    seal(&mut hb);
    place(&mut f, e1_pos + 8 * KIB, &hb);
    let p = dir.path().join("badtail.vhdx");
    std::fs::write(&p, &f).unwrap();
    let e = open_with(&p, ReferencePolicy::Deny).unwrap_err();
    assert!(e.to_string().contains("tail"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Damaged and unsupported structures
// ---------------------------------------------------------------------------------------------

#[test]
fn header_and_region_copies() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(4 * MIB, MIB, 512, 9);
    spec.full(1, 1);
    let base = spec.build().file;
    let expected = spec.expected(None);

    // Header 2 (the newer) damaged: header 1 is used; check reports the bad copy.
    let mut f = base.clone();
    f[128 * KIB as usize + 200] ^= 0xFF;
    let p = dir.path().join("h2.vhdx");
    std::fs::write(&p, &f).unwrap();
    assert_content(&p, ReferencePolicy::Deny, &expected);
    let img = open_with(&p, ReferencePolicy::Deny).unwrap();
    assert_eq!(img.info().format_specific.unwrap()["data"]["header-sequence-number"], 1);
    let r = img.check().unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.problems);
    assert!(r.problems[0].message.contains("header 2"));

    // Both headers damaged: refused.
    f[64 * KIB as usize + 200] ^= 0xFF;
    let p = dir.path().join("h12.vhdx");
    std::fs::write(&p, &f).unwrap();
    let e = open_with(&p, ReferencePolicy::Deny).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("header"), "{e}");

    // Region table 1 damaged: table 2 is used.
    let mut f = base.clone();
    f[192 * KIB as usize + 40] ^= 0xFF;
    let p = dir.path().join("r1.vhdx");
    std::fs::write(&p, &f).unwrap();
    assert_content(&p, ReferencePolicy::Deny, &expected);
    assert_eq!(open_with(&p, ReferencePolicy::Deny).unwrap().check().unwrap().corruptions, 1);

    // Not a VHDX at all past the signature.
    let mut f = base.clone();
    f[64 * KIB as usize..320 * KIB as usize].fill(0);
    let p = dir.path().join("nohdr.vhdx");
    std::fs::write(&p, &f).unwrap();
    assert_eq!(open_with(&p, ReferencePolicy::Deny).unwrap_err().kind(), ErrorKind::InvalidImage);
}

#[test]
fn unsupported_and_invalid_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let try_open = |name: &str, spec: &Spec| {
        let p = dir.path().join(name);
        spec.write(&p);
        open_with(&p, ReferencePolicy::Deny).err().map(|e| (e.kind(), e.to_string()))
    };
    let mut spec = Spec::new(4 * MIB, MIB, 512, 10);
    spec.full(0, 1);

    let mut s = spec.clone();
    s.unknown_required_region = true;
    let (k, m) = try_open("region.vhdx", &s).unwrap();
    assert_eq!(k, ErrorKind::Unsupported, "{m}");
    assert!(m.contains("deadbeef"), "{m}");

    let mut s = spec.clone();
    s.unknown_required_item = true;
    let (k, m) = try_open("item.vhdx", &s).unwrap();
    assert_eq!(k, ErrorKind::Unsupported, "{m}");

    for (bs, ok) in [(MIB / 2, false), (3 * MIB, false), (512 * MIB, false), (2 * MIB, true)] {
        let mut s = Spec::new(4 * MIB, bs.max(MIB), 512, 11);
        s.block_size = bs;
        let got = try_open("bs.vhdx", &s);
        assert_eq!(got.is_none(), ok, "block size {bs}: {got:?}");
    }
    let mut s = spec.clone();
    s.logical = 1024;
    s.blocks.clear();
    assert_eq!(try_open("ls.vhdx", &s).unwrap().0, ErrorKind::InvalidImage);

    // A present block past the end of the file: the image was truncated.
    let l = spec.build();
    let mut f = l.file.clone();
    f.truncate(f.len() - 4096);
    let p = dir.path().join("trunc.vhdx");
    std::fs::write(&p, &f).unwrap();
    let e = open_with(&p, ReferencePolicy::Deny).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");

    // A BAT entry with an undefined state.
    let mut f = l.file.clone();
    put(&mut f, BAT_OFFSET + 8, &4u64.to_le_bytes());
    let p = dir.path().join("state.vhdx");
    std::fs::write(&p, &f).unwrap();
    assert_eq!(open_with(&p, ReferencePolicy::Deny).unwrap_err().kind(), ErrorKind::InvalidImage);
}

#[test]
fn check_reports_overlapping_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(4 * MIB, MIB, 512, 12);
    spec.full(0, 1).full(1, 2);
    let l = spec.build();
    let mut f = l.file.clone();
    // Block 1 now points at block 0's data, and block 2 into the metadata region.
    let o0 = l.block_offset[&0];
    put(&mut f, BAT_OFFSET + 8, &(6 | (o0 / MIB) << 20).to_le_bytes());
    put(&mut f, BAT_OFFSET + 16, &(6 | (METADATA_OFFSET / MIB) << 20).to_le_bytes());
    let p = dir.path().join("overlap.vhdx");
    std::fs::write(&p, &f).unwrap();
    let img = open_with(&p, ReferencePolicy::Deny).unwrap();
    let r = img.check().unwrap();
    assert_eq!(r.corruptions, 2, "{:?}", r.problems);
    assert!(r.problems.iter().any(|p| p.message.contains("overlap") && p.message.contains("metadata")));
    assert!(r.problems.iter().any(|p| p.message.contains("BAT entries 0 and 1")));
    assert_eq!(r.exit_code(), 2);
}

/// Damaged bytes anywhere in the metadata, BAT, log or bitmaps never make vdisk panic or hang.
#[test]
fn mutations_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, mut child) = parent_and_child(512);
    child.locator = Some(locator(&parent, &[("relative_path", "parent.vhdx")]));
    parent.write(&dir.path().join("parent.vhdx"));
    let child_file = child.build().file;
    let dirty = dirty_image(0).file;
    let mut rng = common::Rng::new(77);
    let path = dir.path().join("m.avhdx");
    for round in 0..300 {
        let mut f = if round % 2 == 0 { child_file.clone() } else { dirty.clone() };
        let (lo, hi) = match rng.below(4) {
            0 => (METADATA_OFFSET, METADATA_OFFSET + 64 * KIB + 512),
            1 => (BAT_OFFSET, BAT_OFFSET + 4096),
            2 => (LOG_OFFSET, LOG_OFFSET + LOG_LEN),
            _ => (0, f.len() as u64),
        };
        for _ in 0..=rng.below(8) {
            let at = (lo + rng.below(hi - lo)) as usize;
            f[at] = rng.below(256) as u8;
        }
        std::fs::write(&path, &f).unwrap();
        if let Ok(img) = open_with(&path, ReferencePolicy::SameDir) {
            let _ = img.info();
            let _ = img.check();
            let mut buf = vec![0u8; 64 * KIB as usize];
            for e in img.extents() {
                let Ok(e) = e else { break };
                let _ = img.read_at(&mut buf, e.start);
            }
        }
    }
}
