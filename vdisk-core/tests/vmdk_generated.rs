//! VMDK variants qemu-img cannot create (and partly cannot read), built here from known content
//! so the expected bytes do not depend on vdisk: seSparse, COWD (vmfsSparse), ESXi descriptors
//! over flat extents (vmfs, vmfsThin, vmfsEagerZeroedThick, vmfsPreallocated), ZERO and RDONLY
//! extents, FLAT extents with an offset, a streamOptimized file written the way VMware writes it
//! (grain directory at the end, footer, markers), and parent chains. Also the refusals: raw
//! device mappings, NOACCESS, descriptors without extents, CID mismatches, loops, and hostile
//! headers.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::Rng;
use vdisk_core::{ErrorKind, ExtentKind, Image, Location, ReferencePolicy};

const SECTOR: usize = 512;

/// What one grain of a generated sparse extent holds.
#[derive(Clone, Debug)]
enum G {
    /// Not allocated: reads from the parent, or zeros.
    Unalloc,
    /// Marked as reading zeros (zeroed-grain entry, seSparse zero/unmapped).
    Zero,
    /// Stored bytes (a whole grain).
    Data(Vec<u8>),
}

/// Random grains: a third unallocated, some zero, the rest random or patterned data.
fn grains(n: usize, grain: usize, seed: u64, allow_zero: bool) -> Vec<G> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| match rng.below(6) {
            0 | 1 => G::Unalloc,
            2 if allow_zero => G::Zero,
            3 => G::Data(vec![(rng.below(255) + 1) as u8; grain]),
            _ => G::Data((0..grain).map(|_| rng.next() as u8).collect()),
        })
        .collect()
}

/// The guest content of `gs` over `parent` (zeros where there is none), cut to `size`.
fn expected(gs: &[G], grain: usize, size: usize, parent: Option<&[u8]>) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, g) in gs.iter().enumerate() {
        let s = i * grain;
        if s >= size {
            break;
        }
        let e = (s + grain).min(size);
        match g {
            G::Unalloc => {
                if let Some(p) = parent {
                    let pe = e.min(p.len());
                    if s < pe {
                        out[s..pe].copy_from_slice(&p[s..pe]);
                    }
                }
            }
            G::Zero => {}
            G::Data(d) => out[s..e].copy_from_slice(&d[..e - s]),
        }
    }
    out
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn pad_to(v: &mut Vec<u8>, align: usize) {
    let n = v.len().div_ceil(align) * align;
    v.resize(n, 0);
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Options of a generated hosted sparse extent.
#[derive(Clone)]
struct Kdmv {
    grain_sectors: u64,
    gtes: usize,
    /// Capacity in sectors.
    capacity: u64,
    /// VMware stream: compressed grains with markers, GD at the end with a footer.
    stream: bool,
    /// Keep a redundant grain directory.
    rgd: bool,
    descriptor: Option<String>,
}

fn kdmv_header(o: &Kdmv, flags: u32, gd: u64, rgd: u64, desc_sectors: u64, overhead: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    put_u32(&mut h, 4, if o.stream { 3 } else { 1 });
    put_u32(&mut h, 8, flags);
    put_u64(&mut h, 12, o.capacity);
    put_u64(&mut h, 20, o.grain_sectors);
    put_u64(&mut h, 28, if desc_sectors > 0 { 1 } else { 0 });
    put_u64(&mut h, 36, desc_sectors);
    put_u32(&mut h, 44, o.gtes as u32);
    put_u64(&mut h, 48, rgd);
    put_u64(&mut h, 56, gd);
    put_u64(&mut h, 64, overhead);
    h[73..77].copy_from_slice(b"\n \r\n");
    if o.stream {
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
    }
    h
}

/// Build a hosted sparse extent holding `gs`.
fn build_kdmv(o: &Kdmv, gs: &[G]) -> Vec<u8> {
    let grain = o.grain_sectors as usize * SECTOR;
    let n_gt = (o.capacity as usize * SECTOR).div_ceil(grain * o.gtes);
    let desc = o.descriptor.clone().unwrap_or_default();
    let desc_sectors = if o.descriptor.is_some() { (desc.len() / SECTOR + 2) as u64 } else { 0 };
    let any_zero = gs.iter().any(|g| matches!(g, G::Zero));
    let mut flags = 1 | if any_zero { 4 } else { 0 };
    if o.rgd {
        flags |= 2;
    }
    let mut f = vec![0u8; SECTOR];
    let mut d = desc.into_bytes();
    d.resize(desc_sectors as usize * SECTOR, 0);
    f.extend_from_slice(&d);
    if o.stream {
        flags |= (1 << 16) | (1 << 17);
        let overhead = f.len() / SECTOR;
        let mut gd = vec![0u32; n_gt];
        for (t, gd_entry) in gd.iter_mut().enumerate() {
            let mut gt = vec![0u32; o.gtes];
            for (k, gte) in gt.iter_mut().enumerate() {
                let i = t * o.gtes + k;
                match gs.get(i) {
                    Some(G::Data(data)) => {
                        *gte = (f.len() / SECTOR) as u32;
                        let c = zlib(data);
                        f.extend_from_slice(&((i as u64) * o.grain_sectors).to_le_bytes());
                        f.extend_from_slice(&(c.len() as u32).to_le_bytes());
                        f.extend_from_slice(&c);
                        pad_to(&mut f, SECTOR);
                    }
                    Some(G::Zero) => *gte = 1,
                    _ => {}
                }
            }
            if gt.iter().all(|&v| v == 0) {
                continue;
            }
            let gt_bytes = (o.gtes * 4).div_ceil(SECTOR) * SECTOR;
            let mut m = vec![0u8; SECTOR];
            put_u64(&mut m, 0, (gt_bytes / SECTOR) as u64);
            put_u32(&mut m, 12, 1);
            f.extend_from_slice(&m);
            *gd_entry = (f.len() / SECTOR) as u32;
            for v in gt {
                f.extend_from_slice(&v.to_le_bytes());
            }
            pad_to(&mut f, SECTOR);
        }
        let gd_bytes = (n_gt * 4).div_ceil(SECTOR) * SECTOR;
        let mut m = vec![0u8; SECTOR];
        put_u64(&mut m, 0, (gd_bytes / SECTOR) as u64);
        put_u32(&mut m, 12, 2);
        f.extend_from_slice(&m);
        let gd_at = (f.len() / SECTOR) as u64;
        for v in gd {
            f.extend_from_slice(&v.to_le_bytes());
        }
        pad_to(&mut f, SECTOR);
        let mut m = vec![0u8; SECTOR];
        put_u64(&mut m, 0, 1);
        put_u32(&mut m, 12, 3);
        f.extend_from_slice(&m);
        f.extend_from_slice(&kdmv_header(o, flags, gd_at, 0, desc_sectors, overhead as u64));
        f.extend_from_slice(&[0u8; SECTOR]);
        let h = kdmv_header(o, flags, u64::MAX, 0, desc_sectors, overhead as u64);
        f[..SECTOR].copy_from_slice(&h);
        return f;
    }
    // Metadata: [RGD, RGTs], GD, GTs, then grains.
    let gd_bytes = (n_gt * 4).div_ceil(SECTOR) * SECTOR;
    let gt_bytes = (o.gtes * 4).div_ceil(SECTOR) * SECTOR;
    let meta = gd_bytes + n_gt * gt_bytes;
    let rgd_at = f.len();
    if o.rgd {
        f.resize(f.len() + meta, 0);
    }
    let gd_at = f.len();
    f.resize(f.len() + meta, 0);
    pad_to(&mut f, grain);
    let overhead = f.len() / SECTOR;
    let mut gts = vec![0u32; n_gt * o.gtes];
    for (i, g) in gs.iter().enumerate() {
        match g {
            G::Data(data) => {
                gts[i] = (f.len() / SECTOR) as u32;
                f.extend_from_slice(data);
            }
            G::Zero => gts[i] = 1,
            G::Unalloc => {}
        }
    }
    let write_dir = |f: &mut Vec<u8>, at: usize| {
        for t in 0..n_gt {
            let gt_at = at + gd_bytes + t * gt_bytes;
            put_u32(f, at + t * 4, (gt_at / SECTOR) as u32);
            for k in 0..o.gtes {
                put_u32(f, gt_at + k * 4, gts[t * o.gtes + k]);
            }
        }
    };
    write_dir(&mut f, gd_at);
    if o.rgd {
        write_dir(&mut f, rgd_at);
    }
    let h = kdmv_header(
        o,
        flags,
        (gd_at / SECTOR) as u64,
        if o.rgd { (rgd_at / SECTOR) as u64 } else { 0 },
        desc_sectors,
        overhead as u64,
    );
    f[..SECTOR].copy_from_slice(&h);
    f
}

/// Build a COWD extent of `capacity` sectors holding `gs` (grains of `grain_sectors`).
fn build_cowd(capacity: u32, grain_sectors: u32, gs: &[G]) -> Vec<u8> {
    let grain = grain_sectors as usize * SECTOR;
    let span = grain * 4096;
    let n_gd = (capacity as usize * SECTOR).div_ceil(span);
    let mut f = vec![0u8; 2048];
    f[0..4].copy_from_slice(b"COWD");
    put_u32(&mut f, 4, 1);
    put_u32(&mut f, 8, 3);
    put_u32(&mut f, 12, capacity);
    put_u32(&mut f, 16, grain_sectors);
    put_u32(&mut f, 20, 4);
    put_u32(&mut f, 24, n_gd as u32);
    let gd_at = f.len();
    f.resize(gd_at + (n_gd * 4).div_ceil(SECTOR) * SECTOR, 0);
    let mut gt_at = Vec::new();
    for t in 0..n_gd {
        if gs[t * 4096..gs.len().min((t + 1) * 4096)].iter().all(|g| !matches!(g, G::Data(_))) {
            gt_at.push(0);
            continue;
        }
        gt_at.push(f.len());
        let here = (f.len() / SECTOR) as u32;
        put_u32(&mut f, gd_at + t * 4, here);
        f.resize(f.len() + 4096 * 4, 0);
    }
    for (i, g) in gs.iter().enumerate() {
        if let G::Data(d) = g {
            let at = gt_at[i / 4096] + (i % 4096) * 4;
            let here = (f.len() / SECTOR) as u32;
            put_u32(&mut f, at, here);
            f.extend_from_slice(d);
        }
    }
    let here = (f.len() / SECTOR) as u32;
    put_u32(&mut f, 28, here);
    f
}

/// Build an seSparse extent of `capacity` sectors holding `gs` (4 KiB grains). Zero grains are
/// written alternately as "zero" (type 2) and "unmapped" (type 1) entries; data grains are stored
/// at grain index `first_index + k` so that indices above 4095 are exercised.
fn build_sesparse(capacity: u64, gs: &[G], first_index: u64, journal_dirty: bool) -> Vec<u8> {
    let span = 4096 * 4096usize;
    let n_gt = (capacity as usize * SECTOR).div_ceil(span);
    let (vol, jh, j, gd) = (1u64, 2u64, 4u64, 8u64);
    let gd_size = 8u64;
    let gt_off = gd + gd_size;
    let gt_size = 64 * n_gt as u64;
    let fb = gt_off + gt_size;
    let bm = fb + 8;
    let grains_off = bm + 8;
    let grains_size = capacity + first_index * 8;
    let mut h = vec![0u8; SECTOR];
    let fields = [
        0xcafe_babeu64,
        0x2_0000_0001,
        capacity,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        vol,
        1,
        jh,
        2,
        j,
        4,
        gd,
        gd_size,
        gt_off,
        gt_size,
        fb,
        8,
        bm,
        8,
        grains_off,
        grains_size,
    ];
    for (i, v) in fields.iter().enumerate() {
        put_u64(&mut h, i * 8, *v);
    }
    let mut f = h;
    f.resize(grains_off as usize * SECTOR, 0);
    put_u64(&mut f, vol as usize * SECTOR, 0xcafe_cafe);
    put_u64(&mut f, vol as usize * SECTOR + 24, journal_dirty as u64);
    let mut next = first_index;
    let mut flip = false;
    for (i, g) in gs.iter().enumerate() {
        let t = i / 4096;
        let entry = match g {
            G::Unalloc => continue,
            G::Zero => {
                flip = !flip;
                if flip {
                    2u64 << 60
                } else {
                    1u64 << 60
                }
            }
            G::Data(d) => {
                let idx = next;
                next += 1;
                let at = (grains_off + idx * 8) as usize * SECTOR;
                if f.len() < at + 4096 {
                    f.resize(at + 4096, 0);
                }
                f[at..at + 4096].copy_from_slice(d);
                (3u64 << 60) | ((idx & 0xfff) << 48) | (idx >> 12)
            }
        };
        put_u64(&mut f, gd as usize * SECTOR + t * 8, 0x1000_0000_0000_0000 | t as u64);
        let e_at = (gt_off as usize + t * 64) * SECTOR + (i % 4096) * 8;
        put_u64(&mut f, e_at, entry);
    }
    f
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// vdisk's raw output of `path` (converted with 2 threads), also checked against 1 thread and
/// against `Image::read_at`.
fn vdisk_raw(path: &Path, policy: ReferencePolicy) -> Vec<u8> {
    let open = common::opts(policy);
    let tmp = tempfile::tempdir().unwrap();
    let a = std::fs::read(common::vdisk_convert(path, &open, tmp.path(), "a.raw", 2)).unwrap();
    let b = std::fs::read(common::vdisk_convert(path, &open, tmp.path(), "b.raw", 1)).unwrap();
    assert!(a == b, "{}: 1 and 2 threads differ", path.display());
    let img = Image::open(path, &open).unwrap();
    let mut c = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut c, 0).unwrap();
    assert!(a == c, "{}: read_at and convert differ", path.display());
    a
}

fn assert_content(path: &Path, policy: ReferencePolicy, want: &[u8]) {
    let got = vdisk_raw(path, policy);
    assert_eq!(got.len(), want.len(), "{}: size", path.display());
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{}: content differs first at {i:#x}", path.display());
    }
}

/// When qemu-img can read the file, its output must match the generator's expectation too
/// (which checks the generator against an independent reader). Returns whether qemu read it.
fn qemu_agrees(path: &Path, want: &[u8]) -> bool {
    if !common::have_qemu() {
        return false;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "vmdk", "-O", "raw"])
        .arg(path)
        .arg(&out)
        .output()
        .unwrap();
    if !st.status.success() {
        return false;
    }
    let q = std::fs::read(&out).unwrap();
    assert!(q == want, "{}: qemu-img reads other content than generated", path.display());
    true
}

fn descriptor(create_type: &str, cid: u32, parent: Option<(u32, &str)>, extents: &[String]) -> String {
    let mut s = String::from("# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\n");
    s += &format!("CID={cid:08x}\r\n");
    match parent {
        Some((pcid, name)) => s += &format!("parentCID={pcid:08x}\r\nparentFileNameHint=\"{name}\"\r\n"),
        None => s += "parentCID=ffffffff\r\n",
    }
    s += &format!("isNativeSnapshot = \"no\"\r\ncreateType=\"{create_type}\"\r\n\r\n# Extent description\r\n");
    for e in extents {
        s += e;
        s += "\r\n";
    }
    s += "\r\n# The Disk Data Base\r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\nddb.thinProvisioned = \"1\"\r\n";
    s += "ddb.uuid = \"60 00 C2 9b 52 e1 55 b0-e1 2c 1e 5f 76 8a 48 0b\"\r\nddb.virtualHWVersion = \"14\"\r\n";
    s
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next() as u8).collect()
}

fn info_json(path: &Path, policy: ReferencePolicy) -> serde_json::Value {
    serde_json::from_str(&Image::open(path, &common::opts(policy)).unwrap().info().to_json()).unwrap()
}

#[test]
fn sesparse_descriptor_and_bare_extent() {
    let dir = tempfile::tempdir().unwrap();
    // 40 MiB: three grain tables; the last grain table partly used.
    let capacity = 40 * 2048u64;
    let n = (capacity as usize * SECTOR) / 4096;
    let gs = grains(n, 4096, 5, true);
    let want = expected(&gs, 4096, capacity as usize * SECTOR, None);
    write(dir.path(), "disk-sesparse.vmdk", &build_sesparse(capacity, &gs, 4000, false));
    let d = descriptor("seSparse", 0x1234_5678, None, &[format!("RW {capacity} SESPARSE \"disk-sesparse.vmdk\"")]);
    let p = write(dir.path(), "disk.vmdk", d.as_bytes());
    assert_content(&p, ReferencePolicy::SameDir, &want);
    let bare = dir.path().join("disk-sesparse.vmdk");
    assert_content(&bare, ReferencePolicy::Deny, &want);
    let info = info_json(&p, ReferencePolicy::SameDir);
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["create-type"], "seSparse");
    assert_eq!(info["format-specific"]["data"]["cid"], 0x1234_5678);
    assert_eq!(info["format-specific"]["data"]["extents"][0]["format"], "SESPARSE");
    let r = Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap().check().unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.problems);
    assert!(qemu_agrees(&p, &want) || !common::have_qemu(), "qemu-img reads seSparse");
    // A journal that needs replaying is refused.
    write(dir.path(), "disk-sesparse.vmdk", &build_sesparse(capacity, &gs, 4000, true));
    let e = Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn cowd_vmfs_sparse_child_over_a_vmfs_base() {
    let dir = tempfile::tempdir().unwrap();
    let sectors = 12 * 2048u32 + 3;
    let size = sectors as usize * SECTOR;
    let base = random_bytes(size, 77);
    write(dir.path(), "base-flat.vmdk", &base);
    // createType vmfs (not vmfsThin, which qemu-img refuses) so qemu-img can cross-check.
    let bd = descriptor("vmfs", 0xaaaa_0001, None, &[format!("RW {sectors} VMFS \"base-flat.vmdk\"")]);
    let bp = write(dir.path(), "base.vmdk", bd.as_bytes());
    assert_content(&bp, ReferencePolicy::SameDir, &base);
    // Child: 512-byte grains (ESX's default) over 1 MiB... and 4 KiB grains.
    for (k, gsec) in [(0u64, 1u32), (1, 8)] {
        let grain = gsec as usize * SECTOR;
        let gs = grains(size.div_ceil(grain), grain, 30 + k, false);
        let want = expected(&gs, grain, size, Some(&base));
        write(dir.path(), &format!("c{k}-delta.vmdk"), &build_cowd(sectors, gsec, &gs));
        let cd = descriptor(
            "vmfsSparse",
            0xbbbb_0000 + k as u32,
            Some((0xaaaa_0001, "base.vmdk")),
            &[format!("RW {sectors} VMFSSPARSE \"c{k}-delta.vmdk\"")],
        );
        let cp = write(dir.path(), &format!("c{k}.vmdk"), cd.as_bytes());
        assert_content(&cp, ReferencePolicy::SameDir, &want);
        let info = info_json(&cp, ReferencePolicy::SameDir);
        assert_eq!(info["backing-filename"], "base.vmdk");
        assert_eq!(info["format-specific"]["data"]["parent-cid"], 0xaaaa_0001u32);
        assert_eq!(info["format-specific"]["data"]["extents"][0]["format"], "VMFSSPARSE");
        // Layers: data from the child is layer 0, from the base layer 1.
        let img = Image::open(&cp, &common::opts(ReferencePolicy::SameDir)).unwrap();
        let layers: Vec<u32> = img
            .extents()
            .filter_map(|e| match e.unwrap().kind {
                ExtentKind::Data { layer, .. } => Some(layer),
                _ => None,
            })
            .collect();
        assert!(layers.contains(&0) && layers.contains(&1));
        // The bare COWD extent opened alone is the child's own grains over zeros.
        let alone = expected(&gs, grain, size, None);
        assert_content(&dir.path().join(format!("c{k}-delta.vmdk")), ReferencePolicy::Deny, &alone);
        assert!(qemu_agrees(&cp, &want) || !common::have_qemu(), "qemu-img reads COWD children");
    }
}

#[test]
fn esxi_flat_descriptors_zero_and_rdonly_extents_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let a = random_bytes(3 << 20, 1);
    let mut b = vec![0u8; 5 << 20];
    b[(1 << 20)..].copy_from_slice(&random_bytes(4 << 20, 2));
    write(dir.path(), "a-flat.vmdk", &a);
    write(dir.path(), "b-flat.vmdk", &b);
    for ct in ["vmfs", "vmfsThin", "vmfsEagerZeroedThick", "vmfsPreallocated", "monolithicFlat", "custom"] {
        let d = descriptor(ct, 1, None, &[format!("RW {} VMFS \"a-flat.vmdk\"", a.len() / SECTOR)]);
        let p = write(dir.path(), &format!("{ct}.vmdk"), d.as_bytes());
        assert_content(&p, ReferencePolicy::SameDir, &a);
        assert_eq!(info_json(&p, ReferencePolicy::SameDir)["format-specific"]["data"]["create-type"], ct);
    }
    // FLAT with an offset (2048 sectors into b), a ZERO extent, an RDONLY extent.
    let d = descriptor(
        "monolithicFlat",
        2,
        None,
        &[
            format!("RW {} FLAT \"b-flat.vmdk\" 2048", 4 << 11),
            "RW 4096 ZERO".to_string(),
            format!("RDONLY {} FLAT \"a-flat.vmdk\" 0", 3 << 11),
            format!("RW {} FLAT \"b-flat.vmdk\" 0", 2048),
        ],
    );
    let p = write(dir.path(), "mix.vmdk", d.as_bytes());
    let mut want = b[(1 << 20)..].to_vec();
    want.extend_from_slice(&vec![0u8; 2 << 20]);
    want.extend_from_slice(&a);
    want.extend_from_slice(&b[..1 << 20]);
    assert_content(&p, ReferencePolicy::SameDir, &want);
    let img = Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap();
    assert!(img.extents().map(Result::unwrap).any(|e| e.start == 4 << 20 && matches!(e.kind, ExtentKind::Zero { .. })));
    let info = info_json(&p, ReferencePolicy::SameDir);
    assert_eq!(info["virtual-size"], want.len());
    assert_eq!(info["format-specific"]["data"]["extents"][1]["format"], "ZERO");
    // qemu skips the ZERO and RDONLY lines (and so reads other content): not compared.
    // A FLAT extent shorter than the descriptor says is refused (truncated upload).
    let d = descriptor("vmfs", 3, None, &[format!("RW {} VMFS \"a-flat.vmdk\"", a.len() / SECTOR + 1)]);
    let p = write(dir.path(), "short.vmdk", d.as_bytes());
    let e = Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
}

#[test]
fn refusals_name_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "x-flat.vmdk", &[0u8; 4096]);
    let cases: Vec<(&str, String, ErrorKind)> = vec![
        (
            "rdm",
            descriptor("vmfsRawDeviceMap", 1, None, &["RW 8 VMFSRDM \"x-flat.vmdk\"".into()]),
            ErrorKind::Unsupported,
        ),
        ("raw", descriptor("vmfs", 1, None, &["RW 8 VMFSRAW \"x-flat.vmdk\"".into()]), ErrorKind::Unsupported),
        (
            "pt",
            descriptor("vmfsPassthroughRawDeviceMap", 1, None, &["RW 8 VMFS \"x-flat.vmdk\"".into()]),
            ErrorKind::Unsupported,
        ),
        ("noacc", descriptor("vmfs", 1, None, &["NOACCESS 8 VMFS \"x-flat.vmdk\"".into()]), ErrorKind::Unsupported),
        ("none", descriptor("vmfs", 1, None, &[]), ErrorKind::InvalidImage),
        ("weird", descriptor("vmfs", 1, None, &["RW 8 FANCY \"x-flat.vmdk\"".into()]), ErrorKind::Unsupported),
        ("empty", descriptor("vmfs", 1, None, &["RW 8 FLAT \"\"".into()]), ErrorKind::InvalidImage),
    ];
    for (name, text, kind) in cases {
        let p = write(dir.path(), &format!("{name}.vmdk"), text.as_bytes());
        let e = Image::open(&p, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
        assert_eq!(e.kind(), kind, "{name}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
    // NOACCESS still describes (info does not read extents).
    let p = dir.path().join("noacc.vmdk");
    assert_eq!(Image::describe(&p, &Default::default()).unwrap().virtual_size, 4096);
}

fn kdmv(capacity: u64, descriptor: Option<String>) -> Kdmv {
    Kdmv { grain_sectors: 16, gtes: 512, capacity, stream: false, rgd: true, descriptor }
}

#[test]
fn vmware_style_stream_optimized() {
    let dir = tempfile::tempdir().unwrap();
    // 70 MiB + 3 sectors: three grain tables (64 KiB grains x 512 = 32 MiB each), a short last grain.
    let capacity = 70 * 2048 + 3u64;
    let size = capacity as usize * SECTOR;
    let grain = 128 * SECTOR;
    let mut gs = grains(size.div_ceil(grain), grain, 9, true);
    // A whole grain table left empty (VMware omits its table).
    for g in gs.iter_mut().skip(512).take(512) {
        *g = G::Unalloc;
    }
    let want = expected(&gs, grain, size, None);
    let d = descriptor("streamOptimized", 0x0c0ffee0, None, &[format!("RW {capacity} SPARSE \"exported.vmdk\"")]);
    let o = Kdmv { grain_sectors: 128, gtes: 512, capacity, stream: true, rgd: false, descriptor: Some(d) };
    let bytes = build_kdmv(&o, &gs);
    let p = write(dir.path(), "renamed-export.vmdk", &bytes);
    assert_content(&p, ReferencePolicy::Deny, &want);
    assert!(qemu_agrees(&p, &want) || !common::have_qemu(), "qemu-img reads VMware streams");
    let info = info_json(&p, ReferencePolicy::Deny);
    assert_eq!(info["format-specific"]["data"]["extents"][0]["compressed"], true);
    assert_eq!(info["format-specific"]["data"]["create-type"], "streamOptimized");
    let img = Image::open(&p, &Default::default()).unwrap();
    let r = img.check().unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.problems);
    // Compressed grains carry their marker's size.
    let e = img
        .extents()
        .map(Result::unwrap)
        .find_map(|e| match e.kind {
            ExtentKind::Data { location: Location::Compressed(u), .. } => Some(u),
            _ => None,
        })
        .unwrap();
    assert_eq!(e.unit_len, grain as u64);
    // Truncated (no footer): a clean error.
    let t = write(dir.path(), "truncated.vmdk", &bytes[..bytes.len() - 1024]);
    let e = Image::open(&t, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    // A corrupt compressed grain is an error when read, never a panic.
    let mut bad = bytes.clone();
    let first_grain = bytes.len() - 100_000.min(bytes.len() / 2);
    for b in &mut bad[first_grain..first_grain + 64] {
        *b ^= 0x5a;
    }
    let badp = write(dir.path(), "bad.vmdk", &bad);
    if let Ok(img) = Image::open(&badp, &Default::default()) {
        let o = vdisk_core::ConvertOptions { threads: Some(2), ..Default::default() };
        let _ = vdisk_core::convert(&img, dir.path().join("bad.raw"), &o);
    }
}

#[test]
fn monolithic_sparse_grain_sizes_and_zeroed_grains() {
    let dir = tempfile::tempdir().unwrap();
    for (k, gsec, gtes) in [(0u64, 1u64, 512usize), (1, 8, 512), (2, 128, 512), (3, 2048, 4), (4, 16, 100)] {
        let capacity = 3 * 2048 + 5 * gsec;
        let size = capacity as usize * SECTOR;
        let grain = gsec as usize * SECTOR;
        let gs = grains(size.div_ceil(grain), grain, 40 + k, true);
        let want = expected(&gs, grain, size, None);
        let d = descriptor("monolithicSparse", 7, None, &[format!("RW {capacity} SPARSE \"old-name.vmdk\"")]);
        let o = Kdmv { grain_sectors: gsec, gtes, capacity, stream: false, rgd: k % 2 == 0, descriptor: Some(d) };
        let p = write(dir.path(), &format!("g{k}.vmdk"), &build_kdmv(&o, &gs));
        assert_content(&p, ReferencePolicy::Deny, &want);
        let info = info_json(&p, ReferencePolicy::Deny);
        assert_eq!(info["cluster-size"], grain);
        let r = Image::open(&p, &Default::default()).unwrap().check().unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{k}: {:?}", r.problems);
        assert!(qemu_agrees(&p, &want) || !common::have_qemu() || gtes != 512, "qemu-img reads grain size {gsec}");
    }
}

/// A monolithicSparse child (its embedded descriptor names the parent and its CID) over a
/// monolithicSparse parent over a flat grandparent.
#[test]
fn parent_chain() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 6 * 2048u64;
    let size = capacity as usize * SECTOR;
    let grain = 16 * SECTOR;
    let base = random_bytes(size, 3);
    write(dir.path(), "gp-flat.vmdk", &base);
    let gpd = descriptor("monolithicFlat", 0x1111_1111, None, &[format!("RW {capacity} FLAT \"gp-flat.vmdk\" 0")]);
    write(dir.path(), "gp.vmdk", gpd.as_bytes());
    let pg = grains(size / grain, grain, 50, true);
    let pd = descriptor(
        "monolithicSparse",
        0x2222_2222,
        Some((0x1111_1111, "gp.vmdk")),
        &[format!("RW {capacity} SPARSE \"p.vmdk\"")],
    );
    write(dir.path(), "p.vmdk", &build_kdmv(&kdmv(capacity, Some(pd)), &pg));
    let pwant = expected(&pg, grain, size, Some(&base));
    let cg = grains(size / grain, grain, 51, true);
    let cd = descriptor(
        "monolithicSparse",
        0x3333_3333,
        Some((0x2222_2222, "p.vmdk")),
        &[format!("RW {capacity} SPARSE \"c.vmdk\"")],
    );
    let c = write(dir.path(), "c.vmdk", &build_kdmv(&kdmv(capacity, Some(cd)), &cg));
    let want = expected(&cg, grain, size, Some(&pwant));
    assert_content(&c, ReferencePolicy::SameDir, &want);
    assert!(qemu_agrees(&c, &want) || !common::have_qemu(), "qemu-img reads the chain");
    // The parent is a reference: denied by default, but info names it.
    let e = Image::open(&c, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    let info = Image::describe(&c, &Default::default()).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("p.vmdk"));
    // A parent whose CID changed: an error naming both CIDs.
    let cd = descriptor(
        "monolithicSparse",
        0x3333_3333,
        Some((0x2222_2223, "p.vmdk")),
        &[format!("RW {capacity} SPARSE \"c.vmdk\"")],
    );
    let bad = write(dir.path(), "bad.vmdk", &build_kdmv(&kdmv(capacity, Some(cd)), &cg));
    let e = Image::open(&bad, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("22222222") && e.to_string().contains("22222223"), "{e}");
    // A loop: x names y as parent, y names x.
    let xd = descriptor("monolithicSparse", 1, Some((2, "y.vmdk")), &[format!("RW {capacity} SPARSE \"x.vmdk\"")]);
    let yd = descriptor("monolithicSparse", 2, Some((1, "x.vmdk")), &[format!("RW {capacity} SPARSE \"y.vmdk\"")]);
    let x = write(dir.path(), "x.vmdk", &build_kdmv(&kdmv(capacity, Some(xd)), &cg));
    write(dir.path(), "y.vmdk", &build_kdmv(&kdmv(capacity, Some(yd)), &cg));
    let e = Image::open(&x, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    // A parent named by absolute path is refused under same-dir.
    let abs = dir.path().join("p.vmdk");
    let ad = descriptor(
        "monolithicSparse",
        5,
        Some((0x2222_2222, abs.to_str().unwrap())),
        &[format!("RW {capacity} SPARSE \"a.vmdk\"")],
    );
    let a = write(dir.path(), "a.vmdk", &build_kdmv(&kdmv(capacity, Some(ad)), &cg));
    let e = Image::open(&a, &common::opts(ReferencePolicy::SameDir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReferenceDenied, "{e}");
    assert_content(&a, ReferencePolicy::Any, &want);
}

/// Hostile headers and tables: clean errors, never a panic or a huge allocation.
#[test]
fn hostile_sparse_extents() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 2048u64;
    let gs = grains(64, 16 * SECTOR, 60, true);
    let good = build_kdmv(&Kdmv { rgd: false, ..kdmv(capacity, None) }, &gs);
    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let gd = u64::from_le_bytes(good[56..64].try_into().unwrap()) as usize * SECTOR;
    let gt = u32::from_le_bytes(good[gd..gd + 4].try_into().unwrap()) as usize * SECTOR;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("capacity", mutate(&|b| put_u64(b, 12, u64::MAX / 256))),
        ("grain", mutate(&|b| put_u64(b, 20, 3))),
        ("gtes", mutate(&|b| put_u32(b, 44, 0))),
        ("version", mutate(&|b| put_u32(b, 4, 9))),
        ("gd-past-eof", mutate(&|b| put_u64(b, 56, 1 << 40))),
        ("gt-past-eof", mutate(&|b| put_u32(b, gd, 0x00ff_ffff))),
        ("grain-past-eof", mutate(&|b| put_u32(b, gt + 8, 0x0fff_ffff))),
        ("truncated", good[..good.len() / 3].to_vec()),
        ("compression", mutate(&|b| b[77] = 9)),
        ("newline", mutate(&|b| b[76] = b'\r')),
        (
            "empty-descriptor",
            mutate(&|b| {
                put_u64(b, 28, 1);
                put_u64(b, 36, 1);
                b[512] = b'\n';
            }),
        ),
        ("cowd", {
            let mut c = build_cowd(2048, 1, &grains(2048, 512, 1, false));
            put_u32(&mut c, 24, 0);
            c
        }),
        ("sesparse", {
            let mut s = build_sesparse(2048, &grains(256, 4096, 2, true), 0, false);
            put_u64(&mut s, 8, 7);
            s
        }),
    ];
    for (name, bytes) in cases {
        let p = write(dir.path(), &format!("{name}.vmdk"), &bytes);
        let r = Image::open(&p, &Default::default()).and_then(|img| {
            let o = vdisk_core::ConvertOptions { threads: Some(1), ..Default::default() };
            vdisk_core::convert(&img, dir.path().join("o.raw"), &o).map(|_| ())
        });
        let e = r.expect_err(name);
        assert!(
            matches!(e.kind(), ErrorKind::InvalidImage | ErrorKind::Unsupported | ErrorKind::LimitExceeded),
            "{name}: {e}"
        );
    }
    // The GD pointing at the same table many times loads it once.
    let mut b = good.clone();
    let first = b[gd..gd + 4].to_vec();
    b[gd + 4..gd + 8].copy_from_slice(&first);
    let p = write(dir.path(), "shared-gt.vmdk", &b);
    Image::open(&p, &Default::default()).unwrap();
}

/// Writes the committed fixtures of `testdata/vmdk/` into `$VMDK_FIXTURE_DIR` (run by
/// `testdata/vmdk/make.sh`): a monolithicSparse with 4 KiB grains, zeroed-grain entries and a
/// redundant directory; a VMware-style streamOptimized; an seSparse descriptor and its extent.
/// Each is checked here against the content it was built from.
#[test]
#[ignore = "writes fixtures; run by testdata/vmdk/make.sh"]
fn write_fixtures() {
    let Some(dir) = std::env::var_os("VMDK_FIXTURE_DIR").map(PathBuf::from) else {
        panic!("set VMDK_FIXTURE_DIR");
    };
    let pattern = |seed: u64, n: usize| -> Vec<u8> {
        let mut rng = Rng::new(seed);
        let mut v = vec![0u8; n];
        for chunk in v.chunks_mut(512) {
            chunk.fill((rng.below(200) + 1) as u8);
            chunk[..8].copy_from_slice(&rng.next().to_le_bytes());
        }
        v
    };
    // 256 KiB, 4 KiB grains: data, zeroed and unallocated grains.
    let grain = 4096;
    let gs: Vec<G> = (0..64)
        .map(|i| match i % 16 {
            0 | 5 => G::Data(pattern(i, grain)),
            1 | 9 => G::Zero,
            _ => G::Unalloc,
        })
        .collect();
    let d = descriptor("monolithicSparse", 0x5eed_0001, None, &["RW 512 SPARSE \"sparse-zeroed.vmdk\"".into()]);
    let o = Kdmv { grain_sectors: 8, gtes: 512, capacity: 512, stream: false, rgd: true, descriptor: Some(d) };
    let p = write(&dir, "sparse-zeroed.vmdk", &build_kdmv(&o, &gs));
    assert_content(&p, ReferencePolicy::Deny, &expected(&gs, grain, 512 * SECTOR, None));
    // 1 MiB + 3 sectors streamOptimized, 64 KiB grains, grain directory at the end.
    let grain = 65536;
    let capacity = 2048 + 3;
    let gs: Vec<G> = (0..17).map(|i| if i % 3 == 0 { G::Data(pattern(100 + i, grain)) } else { G::Unalloc }).collect();
    let d = descriptor("streamOptimized", 0x5eed_0002, None, &[format!("RW {capacity} SPARSE \"disk1.vmdk\"")]);
    let o = Kdmv { grain_sectors: 128, gtes: 512, capacity, stream: true, rgd: false, descriptor: Some(d) };
    let p = write(&dir, "stream-vmware.vmdk", &build_kdmv(&o, &gs));
    assert_content(&p, ReferencePolicy::Deny, &expected(&gs, grain, capacity as usize * SECTOR, None));
    // seSparse: 1 MiB, 4 KiB grains, a few of each entry type.
    let capacity = 2048u64;
    let gs: Vec<G> = (0..256)
        .map(|i| match i % 9 {
            _ if i % 100 == 0 => G::Data(pattern(200 + i, 4096)),
            4 => G::Zero,
            _ => G::Unalloc,
        })
        .collect();
    write(&dir, "sesparse-extent.vmdk", &build_sesparse(capacity, &gs, 0, false));
    let d = descriptor("seSparse", 0x5eed_0003, None, &[format!("RW {capacity} SESPARSE \"sesparse-extent.vmdk\"")]);
    let p = write(&dir, "sesparse.vmdk", d.as_bytes());
    assert_content(&p, ReferencePolicy::SameDir, &expected(&gs, 4096, capacity as usize * SECTOR, None));
    for f in ["sparse-zeroed.vmdk", "stream-vmware.vmdk", "sesparse-extent.vmdk", "sesparse.vmdk"] {
        let len = std::fs::metadata(dir.join(f)).unwrap().len();
        assert!(len < 64 << 10, "{f} is {len} bytes");
    }
}

/// Seeded random corruption of every generated kind (hosted sparse, VMware stream, COWD,
/// seSparse): opening, mapping, converting and checking give a result or a clean error, never a
/// panic. Corruption is aimed at the metadata (the first sectors and the stream's footer).
#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 4 * 2048u64;
    let gs16 = grains(capacity as usize / 16, 16 * SECTOR, 90, true);
    let stream = Kdmv {
        grain_sectors: 16,
        gtes: 512,
        capacity,
        stream: true,
        rgd: false,
        descriptor: Some(descriptor("streamOptimized", 1, None, &[format!("RW {capacity} SPARSE \"s.vmdk\"")])),
    };
    let bases: Vec<(&str, Vec<u8>)> = vec![
        (
            "sparse",
            build_kdmv(
                &kdmv(capacity, Some(descriptor("monolithicSparse", 1, None, &["RW 8192 SPARSE \"x\"".into()]))),
                &gs16,
            ),
        ),
        ("stream", build_kdmv(&stream, &gs16)),
        ("cowd", build_cowd(capacity as u32, 1, &grains(capacity as usize, SECTOR, 91, false))),
        ("sesparse", build_sesparse(capacity, &grains(capacity as usize / 8, 4096, 92, true), 4090, false)),
    ];
    let mut rng = Rng::new(4242);
    let out = dir.path().join("o.raw");
    for (kind, base) in &bases {
        for round in 0..60 {
            let mut b = base.clone();
            let meta_end = b.len().min(if *kind == "sesparse" { 96 * SECTOR } else { 48 * SECTOR });
            for _ in 0..(1 + rng.below(8)) {
                let at = if *kind == "stream" && rng.below(2) == 0 {
                    b.len() - 1 - rng.below(1536) as usize
                } else {
                    rng.below(meta_end as u64) as usize
                };
                b[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
            }
            if rng.below(10) == 0 {
                b.truncate(rng.below(b.len() as u64) as usize);
            }
            let p = write(dir.path(), &format!("{kind}-{round}.vmdk"), &b);
            let r = std::panic::catch_unwind(|| {
                if let Ok(img) = Image::open(&p, &Default::default()) {
                    let _ = img.extents().take(100_000).count();
                    let _ = img.check();
                    let o = vdisk_core::ConvertOptions { threads: Some(2), ..Default::default() };
                    let _ = vdisk_core::convert(&img, &out, &o);
                }
                let _ = Image::describe(&p, &Default::default());
            });
            assert!(r.is_ok(), "{kind} round {round}: panicked");
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(&out);
        }
    }
}

/// `check` finds grains overlapping metadata or each other (corruptions), grains no entry uses
/// (leaks), and a redundant directory that disagrees with the primary.
#[test]
fn check_reports_overlaps_leaks_and_directory_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 2048u64;
    let gs: Vec<G> = (0..64).map(|i| if i < 8 { G::Data(vec![i as u8 + 1; 8192]) } else { G::Unalloc }).collect();
    let good = build_kdmv(&kdmv(capacity, None), &gs);
    let img = |b: &[u8], name: &str| {
        let p = write(dir.path(), name, b);
        Image::open(&p, &Default::default()).unwrap().check().unwrap()
    };
    let r = img(&good, "good.vmdk");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.problems);
    // An extra grain appended that no entry names: a leak.
    let mut b = good.clone();
    b.extend_from_slice(&[7u8; 8192]);
    let r = img(&b, "leak.vmdk");
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{:?}", r.problems);
    // Grain 1 pointed at the primary grain table, grain 2 at grain 3 (both directories agree).
    let mut b = good.clone();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * SECTOR;
    let rgd = u64::from_le_bytes(b[48..56].try_into().unwrap()) as usize * SECTOR;
    for d in [gd, rgd] {
        let gt = u32::from_le_bytes(b[d..d + 4].try_into().unwrap()) as usize * SECTOR;
        let g3 = u32::from_le_bytes(b[gt + 12..gt + 16].try_into().unwrap());
        put_u32(&mut b, gt + 4, (gd / SECTOR) as u32);
        put_u32(&mut b, gt + 8, g3);
    }
    let r = img(&b, "overlap.vmdk");
    assert!(r.corruptions >= 2, "{:?}", r.problems);
    let text = format!("{:?}", r.problems);
    assert!(text.contains("grain directory") && text.contains("overlap"), "{text}");
    // Only the primary changed: the copies disagree.
    let mut b = good.clone();
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * SECTOR;
    put_u32(&mut b, gt + 8, 0);
    let r = img(&b, "mismatch.vmdk");
    assert!(format!("{:?}", r.problems).contains("differs"), "{:?}", r.problems);
    // check on an image opened only to be described (as `vdisk check` does) walks the same tables.
    let p = dir.path().join("overlap.vmdk");
    let r = Image::check_file(&p, &Default::default()).unwrap();
    assert!(r.corruptions >= 2, "{:?}", r.problems);
}
