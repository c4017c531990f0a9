//! Helpers shared by the integration tests: running qemu-img/qemu-io, converting with vdisk, and
//! comparing content and maps. Each test file includes this with `mod common;`.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use sha2::{Digest, Sha256};
use vdisk_core::{convert, ConvertOptions, Image, OpenOptions, ReferencePolicy};

/// True when qemu-img and qemu-io are on PATH; otherwise prints one SKIP line (once per test
/// binary) naming what is missing. On CI (`CI=true`) a missing qemu-img fails instead.
pub fn have_qemu() -> bool {
    static SKIP: Once = Once::new();
    let ok = ["qemu-img", "qemu-io"]
        .iter()
        .all(|tool| Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false));
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-img/qemu-io are required on CI");
        }
        SKIP.call_once(|| eprintln!("SKIP: qemu-img or qemu-io not found; differential tests not run"));
    }
    ok
}

/// Run a command, panicking with its stderr when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS...`
pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-io -f FMT -c CMD... FILE` (each command is one `-c`).
pub fn qemu_io(fmt: &str, file: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(file);
    run(&mut c);
}

/// sha256 and length of a file's bytes.
pub fn sha256_file(path: &Path) -> (String, u64) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (hex(&h.finalize()), n)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Open options with a reference policy.
pub fn opts(references: ReferencePolicy) -> OpenOptions {
    OpenOptions { references, ..OpenOptions::default() }
}

/// Convert `image` with vdisk into `dir/name` using `threads` threads; returns the output path.
pub fn vdisk_convert(image: &Path, open: &OpenOptions, dir: &Path, name: &str, threads: usize) -> PathBuf {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    let img = Image::open(image, open).unwrap_or_else(|e| panic!("vdisk cannot open {}: {e}", image.display()));
    let o = ConvertOptions { threads: Some(threads), ..ConvertOptions::default() };
    convert(&img, &out, &o).unwrap_or_else(|e| panic!("vdisk cannot convert {}: {e}", image.display()));
    out
}

/// Convert with `qemu-img convert -f FMT -O raw` into `dir/name`.
pub fn qemu_convert(image: &Path, fmt: &str, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-f", fmt, "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    out
}

/// The merged byte ranges that `qemu-img map --output json` reports as `data: true`.
pub fn qemu_data_ranges(image: &Path, fmt: &str) -> Vec<(u64, u64)> {
    let json = qemu_img(&["map", "-f", fmt, "--output", "json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut ranges = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"].as_bool() == Some(true) {
            let s = e["start"].as_u64().unwrap();
            ranges.push((s, s + e["length"].as_u64().unwrap()));
        }
    }
    merge_ranges(ranges)
}

/// The merged byte ranges vdisk's extents report as data.
pub fn vdisk_data_ranges(img: &Image) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for e in img.extents() {
        let e = e.unwrap();
        if e.kind.is_data() {
            ranges.push((e.start, e.end()));
        }
    }
    merge_ranges(ranges)
}

pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// The whole differential check for one image: vdisk's raw output (1 and 2 threads) is
/// byte-identical to qemu-img's, the virtual sizes agree, the format is detected as `fmt`, and
/// (when `check_map`) the data ranges agree with `qemu-img map`.
pub fn assert_matches_qemu(image: &Path, fmt: &str, references: ReferencePolicy, check_map: bool) {
    let dir = tempfile::tempdir_in(image.parent().unwrap()).unwrap();
    let open = opts(references);
    let img = Image::open(image, &open).unwrap_or_else(|e| panic!("vdisk cannot open {}: {e}", image.display()));
    assert_eq!(img.format().as_str(), fmt, "{}: detected format", image.display());
    let qinfo: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-f", fmt, "--output", "json", image.to_str().unwrap()])).unwrap();
    assert_eq!(Some(img.virtual_size()), qinfo["virtual-size"].as_u64(), "{}: virtual size", image.display());
    let theirs = sha256_file(&qemu_convert(image, fmt, dir.path(), "qemu.raw"));
    for threads in [1, 2] {
        let ours = sha256_file(&vdisk_convert(image, &open, dir.path(), "vdisk.raw", threads));
        assert_eq!(ours, theirs, "{}: content differs from qemu-img ({threads} threads)", image.display());
    }
    if check_map {
        assert_eq!(vdisk_data_ranges(&img), qemu_data_ranges(image, fmt), "{}: data ranges differ", image.display());
    }
}

/// A small deterministic PRNG (xorshift64*) so generated images are reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random qemu-io commands over a disk of `size` bytes: data writes with patterns, zero writes
/// (`write -z`), discards, and (when `compressed`) compressed writes of whole `cluster`s.
pub fn random_io_commands(rng: &mut Rng, size: u64, cluster: u64, count: usize, compressed: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..count {
        let kind = rng.below(if compressed { 5 } else { 4 });
        let sector = 512;
        let off = rng.below(size / sector) * sector;
        let max = (size - off).min(cluster * 8).max(sector);
        let len = (rng.below(max / sector) + 1) * sector;
        let pattern = rng.below(255) + 1;
        cmds.push(match kind {
            0 | 1 => format!("write -P {pattern} {off} {len}"),
            2 => format!("write -z {off} {len}"),
            3 => format!("discard {off} {len}"),
            _ => {
                let c = rng.below(size / cluster) * cluster;
                format!("write -c -P {pattern} {c} {}", cluster.min(size - c))
            }
        });
    }
    cmds
}

/// The cases of the generator `testdata/<script>` (run once per script version and shared by the
/// test processes through the target's temporary folder) and its `cases.tsv`, one map per row.
/// `None` (after a SKIP line) when python3 is missing outside CI. Tests must not modify the files.
pub fn generate_cases(script: &str) -> Option<(PathBuf, Vec<std::collections::HashMap<String, String>>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(script);
    let key = sha256_file(&path).0;
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("cases-{}-{}", script.replace('/', "-"), &key[..16]));
    if !dir.join("cases.tsv").is_file() {
        std::fs::create_dir_all(&root).unwrap();
        let tmp = tempfile::tempdir_in(&root).unwrap();
        let Ok(out) = Command::new("python3").arg(&path).arg(tmp.path()).output() else {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "python3 is required on CI");
            eprintln!("SKIP: python3 not found; {script} cases not run");
            return None;
        };
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        // Another test process may have finished first: either copy serves.
        if std::fs::rename(tmp.path(), &dir).is_ok() {
            std::mem::forget(tmp);
        }
    }
    let text = std::fs::read_to_string(dir.join("cases.tsv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let rows = lines
        .map(|l| header.iter().zip(l.split('\t')).map(|(h, v)| (h.to_string(), v.to_string())).collect())
        .collect();
    Some((dir, rows))
}
