//! A short, deterministic, stable-toolchain smoke run of every fuzz body: the committed fixtures
//! in `testdata/` and images made here are mutated (bit flips, interesting values in header
//! fields, truncation) and fed to each target. Coverage-guided fuzzing is `cargo fuzz run NAME`.

use std::path::{Path, PathBuf};

/// Mutants per seed and target; the whole smoke stays within seconds.
const MUTANTS: usize = 150;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0xff, 0x8000, 0xffff_ffff, 0x8000_0000, 1 << 40, u64::MAX, u64::MAX >> 1];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    if v.is_empty() {
        return v;
    }
    // Most format metadata lives in the first 64 KiB and the last 512 bytes: aim there.
    let hot = |rng: &mut Rng, len: usize| -> usize {
        match rng.below(4) {
            0 => rng.below(len),
            1 => len.saturating_sub(1 + rng.below(512.min(len))),
            _ => rng.below(len.min(4096)),
        }
    };
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 => {
                let i = hot(rng, v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = hot(rng, v.len());
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let bytes = if rng.below(2) == 0 { value.to_le_bytes() } else { value.to_be_bytes() };
                for k in 0..width {
                    if let Some(b) = v.get_mut(i + k) {
                        *b = bytes[if rng.below(2) == 0 { k } else { 8 - width + k }];
                    }
                }
            }
            2 => {
                let i = hot(rng, v.len());
                v[i] = rng.next() as u8;
            }
            _ => {
                let cut = rng.below(v.len());
                v.truncate(cut.max(1));
            }
        }
    }
    v
}

fn seeds() -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata");
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(meta) = p.metadata() {
                let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
                if meta.len() <= 1 << 20 && !matches!(ext, "sh" | "py" | "tsv" | "md" | "txt") {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

fn run_all(name: &str, body: fn(&[u8])) {
    let seeds = seeds();
    assert!(!seeds.is_empty(), "no seeds in testdata/");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    for (path, seed) in &seeds {
        body(seed);
        for i in 0..MUTANTS {
            let m = mutate(seed, &mut rng);
            let r = std::panic::catch_unwind(|| body(&m));
            if r.is_err() {
                let keep = std::env::temp_dir().join(format!("vdisk-smoke-{name}-{i}.bin"));
                let _ = std::fs::write(&keep, &m);
                panic!("{name}: mutant {i} of {} panicked; input saved to {}", path.display(), keep.display());
            }
        }
    }
}

#[test]
fn probe_smoke() {
    run_all("probe", vdisk_fuzz::probe);
}

#[test]
fn qcow2_smoke() {
    run_all("qcow2", |d| vdisk_fuzz::format(d, vdisk_core::Format::Qcow2));
}

#[test]
fn vmdk_smoke() {
    run_all("vmdk", |d| vdisk_fuzz::format(d, vdisk_core::Format::Vmdk));
}

#[test]
fn vhd_smoke() {
    run_all("vhd", |d| vdisk_fuzz::format(d, vdisk_core::Format::Vhd));
}

#[test]
fn vhdx_smoke() {
    run_all("vhdx", |d| vdisk_fuzz::format(d, vdisk_core::Format::Vhdx));
}

#[test]
fn vdi_smoke() {
    run_all("vdi", |d| vdisk_fuzz::format(d, vdisk_core::Format::Vdi));
}

#[test]
fn ova_smoke() {
    run_all("ova", |d| vdisk_fuzz::format(d, vdisk_core::Format::Ova));
}

#[test]
fn convert_smoke() {
    run_all("convert", vdisk_fuzz::convert);
}
