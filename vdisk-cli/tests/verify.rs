//! `vdisk checksum`, `vdisk compare` and `convert --checksum/--journal` through the CLI: one
//! digest for the same content in every format and on a loop device, equal to an independent
//! computation; compare's messages and exit codes against `qemu-img compare` on the same pairs;
//! journals refused when the source, target or options changed, or when damaged.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::*;

const LIMIT: Duration = Duration::from_secs(120);

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: qemu-img not found");
    }
    ok
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// blkhash straight from its definition.
fn naive_blkhash(data: &[u8]) -> String {
    let mut outer = Sha256::new();
    for block in data.chunks(64 << 10) {
        outer.update(Sha256::digest(block));
    }
    outer.update((data.len() as u64).to_le_bytes());
    hex(&outer.finalize())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw disk of `size` bytes: data runs (some not 512-aligned), allocated zeros, holes.
fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in 0..60u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (x >> 17) % (size - 300_000);
        let len = (x >> 5) % 250_000 + 1;
        let bytes: Vec<u8> = if i % 5 == 4 {
            vec![0; len as usize]
        } else {
            (0..len).map(|j| ((j ^ (x >> 40)) as u8).wrapping_mul(31).wrapping_add(i as u8) | 1).collect()
        };
        f.write_all_at(&bytes, off).unwrap();
        content[off as usize..(off + len) as usize].copy_from_slice(&bytes);
    }
    content
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(file: &Path) -> Option<Loop> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return None;
    }
    let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().ok()?;
    out.status.success().then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

fn checksum(args: &[&str], file: &Path) -> String {
    let out = run_limited(vdisk().arg("checksum").args(args).arg(file), LIMIT);
    assert!(out.status.success(), "checksum {}: {}", file.display(), stderr(&out));
    let text = stdout(&out);
    let (digest, name) = text.trim_end().split_once("  ").unwrap();
    assert_eq!(name, file.display().to_string());
    digest.to_string()
}

#[test]
fn one_checksum_for_every_format_and_a_loop_device() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of 64 KiB: the last block is short.
    let size = (24u64 << 20) + 7 * 512;
    let raw = dir.path().join("disk.raw");
    let content = make_raw(&raw, size, 1);
    let want = naive_blkhash(&content);
    let want_sha = hex(&Sha256::digest(&content));
    let variants: &[(&str, &[&str])] = &[
        ("qcow2", &["-O", "qcow2"]),
        ("qcow2c", &["-O", "qcow2", "-c"]),
        ("vmdk", &["-O", "vmdk"]),
        ("vmdk-stream", &["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        ("vhd", &["-O", "vpc", "-o", "force_size=on"]),
        ("vhdx", &["-O", "vhdx"]),
    ];
    let mut files = vec![raw.clone()];
    for (name, args) in variants {
        let image = dir.path().join(format!("disk.{name}"));
        let mut a = vec!["convert", "-f", "raw"];
        a.extend_from_slice(args);
        a.push(raw.to_str().unwrap());
        a.push(image.to_str().unwrap());
        qemu_img(&a);
        files.push(image);
    }
    for f in &files {
        assert_eq!(checksum(&[], f), want, "{}", f.display());
        assert_eq!(checksum(&["-a", "sha256", "--threads", "1"], f), want_sha, "{}", f.display());
    }
    // Several files at once, JSON.
    let out = run_limited(vdisk().args(["checksum", "--output", "json"]).args(&files[..2]), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["algorithm"], "blkhash");
    assert_eq!(lines[1]["block-size"], 65536);
    assert_eq!(lines[1]["virtual-size"], size);
    assert_eq!(lines[1]["digest"], want.as_str());
    assert_eq!(lines[1]["format"], "qcow2");
    // convert --checksum prints the same digest of what it wrote.
    let out_raw = dir.path().join("out.raw");
    let out = run_limited(vdisk().args(["convert", "--checksum"]).arg(&files[2]).arg(&out_raw), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{want}  {}\n", out_raw.display()));
    let out = run_limited(
        vdisk().args(["convert", "--checksum", "--output", "json"]).arg(&files[1]).arg(dir.path().join("o2.raw")),
        LIMIT,
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["checksum"], want.as_str());
    assert_eq!(report["bytes-skipped"], 0);
    // A loop device holding the content, bigger than it: its first `size` bytes.
    let backing = dir.path().join("device.bin");
    let mut dev_bytes = content.clone();
    dev_bytes.resize(size as usize + (1 << 20) + 512, 0x5a);
    std::fs::write(&backing, &dev_bytes).unwrap();
    let Some(dev) = attach(&backing) else {
        eprintln!("SKIP: no loop device (needs root and losetup); device checksum not run");
        return;
    };
    let dev_path = PathBuf::from(&dev.0);
    assert_eq!(checksum(&["--size", &size.to_string()], &dev_path), want);
    assert_eq!(checksum(&[], &dev_path), naive_blkhash(&dev_bytes));
    // And a missing file among others: reported, the rest still printed, exit 1.
    let out = run_limited(vdisk().arg("checksum").arg(&raw).arg(dir.path().join("missing")), LIMIT);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out).lines().count(), 1);
    assert!(stderr(&out).starts_with("vdisk: ") && stderr(&out).lines().count() == 1, "{}", stderr(&out));
}

/// Run `qemu-img compare` and `vdisk compare` with the same arguments.
fn both(args: &[&str]) -> (Output, Output) {
    let q = Command::new("qemu-img").arg("compare").args(args).output().unwrap();
    let v = run_limited(vdisk().arg("compare").args(args), LIMIT);
    (q, v)
}

/// qemu-img rounds a content mismatch down to 512 bytes; vdisk reports the exact byte.
fn round_offsets(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("Content mismatch at offset ").and_then(|r| r.strip_suffix('!')) {
            Some(n) => format!("Content mismatch at offset {}!", n.parse::<u64>().unwrap() / 512 * 512),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn compare_agrees_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let size = 8u64 << 20;
    let content = make_raw(Path::new(&p("a.raw")), size, 2);
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &p("a.raw"), &p("a.qcow2")]);
    // One byte different at an unaligned offset.
    std::fs::write(p("b.raw"), &content).unwrap();
    let at = 5_000_003u64;
    std::fs::File::options()
        .write(true)
        .open(p("b.raw"))
        .unwrap()
        .write_all_at(&[content[at as usize] ^ 1], at)
        .unwrap();
    // Longer, with a zero tail; then with data in the tail.
    qemu_img(&["create", "-q", "-f", "qcow2", &p("long.qcow2"), &(2 * size).to_string()]);
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2", "-c"]).arg(format!("write -s {} 0 {size}", p("a.raw"))).arg(p("long.qcow2"));
    assert!(io.output().unwrap().status.success());
    qemu_img(&["convert", "-O", "qcow2", &p("long.qcow2"), &p("longdata.qcow2")]);
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2", "-c"]).arg(format!("write -P 7 {} 4096", size + 3 * 65536)).arg(p("longdata.qcow2"));
    assert!(io.output().unwrap().status.success());
    // Same content, different allocation: a zero cluster against an unallocated one.
    qemu_img(&["create", "-q", "-f", "qcow2", &p("z1.qcow2"), "4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p("z2.qcow2"), "4M"]);
    for (img, cmd) in [("z1.qcow2", "write -P 9 0 65536"), ("z2.qcow2", "write -P 9 0 65536")] {
        assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, &p(img)]).output().unwrap().status.success());
    }
    assert!(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -z 1048576 65536", &p("z2.qcow2")])
        .output()
        .unwrap()
        .status
        .success());

    let cases: Vec<(Vec<String>, i32)> = vec![
        (vec![p("a.raw"), p("a.qcow2")], 0),
        (vec!["-f".into(), "raw".into(), "-F".into(), "qcow2".into(), p("a.raw"), p("a.qcow2")], 0),
        (vec![p("a.raw"), p("b.raw")], 1),
        (vec![p("b.raw"), p("a.qcow2")], 1),
        (vec![p("a.raw"), p("long.qcow2")], 0),
        (vec![p("long.qcow2"), p("a.qcow2")], 0),
        (vec![p("a.raw"), p("longdata.qcow2")], 1),
        (vec!["-s".into(), p("a.raw"), p("long.qcow2")], 1),
        (vec![p("z1.qcow2"), p("z2.qcow2")], 0),
        (vec!["-s".into(), p("a.raw"), p("a.qcow2")], 1),
        (vec!["-s".into(), p("a.qcow2"), p("a.qcow2")], 0),
        (vec![p("a.raw"), p("missing.raw")], 2),
    ];
    for (args, code) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (q, v) = both(&args);
        assert_eq!(q.status.code(), Some(code), "qemu-img compare {args:?}: {}{}", stdout(&q), stderr(&q));
        assert_eq!(v.status.code(), Some(code), "vdisk compare {args:?}: {}{}", stdout(&v), stderr(&v));
        assert_eq!(round_offsets(&stdout(&v)), stdout(&q).trim_end(), "{args:?}");
        if code == 2 {
            assert!(stdout(&v).is_empty() && stderr(&v).starts_with("vdisk: "), "{}", stderr(&v));
        }
    }
    // Strict allocation: a zero cluster against an unallocated one at 1 MiB. vdisk names that
    // offset; qemu-img compares its internal status flags, which also differ at 64 KiB where
    // only one run reaches the end of the image (its EOF flag), so it reports that one.
    for (a, b) in [("z1.qcow2", "z2.qcow2"), ("z2.qcow2", "z1.qcow2")] {
        let (q, v) = both(&["-s", &p(a), &p(b)]);
        assert_eq!((q.status.code(), v.status.code()), (Some(1), Some(1)));
        assert_eq!(stdout(&v), "Strict mode: Offset 1048576 block status mismatch!\n");
        let qemu_offset: u64 = stdout(&q)
            .strip_prefix("Strict mode: Offset ")
            .and_then(|r| r.strip_suffix(" block status mismatch!\n"))
            .unwrap_or_else(|| panic!("qemu-img: {}", stdout(&q)))
            .parse()
            .unwrap();
        assert!(qemu_offset <= 1048576, "{qemu_offset}");
    }
    // The exact byte, in human and JSON output.
    let (_, v) = both(&[&p("a.raw"), &p("b.raw")]);
    assert_eq!(stdout(&v), format!("Content mismatch at offset {at}!\n"));
    let v = run_limited(vdisk().args(["compare", "--output", "json", &p("a.raw"), &p("longdata.qcow2")]), LIMIT);
    let j: serde_json::Value = serde_json::from_str(&stdout(&v)).unwrap();
    assert_eq!(j["result"], "content-mismatch");
    assert_eq!(j["offset"], size + 3 * 65536);
    assert_eq!(j["size-mismatch"], true);
    assert_eq!(v.status.code(), Some(1));
    // Both zero or unallocated: nothing read.
    let v = run_limited(vdisk().args(["compare", "--output", "json", &p("z1.qcow2"), &p("z2.qcow2")]), LIMIT);
    let j: serde_json::Value = serde_json::from_str(&stdout(&v)).unwrap();
    assert_eq!(j["bytes-read"], 2 * 65536);
}

fn convert(args: &[&str]) -> Output {
    run_limited(vdisk().arg("convert").args(args), LIMIT)
}

fn refused(out: &Output, needle: &str) {
    assert_clean_error(out, 1, needle);
    let err = stderr(out);
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn journals_bind_source_target_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let content = make_raw(Path::new(&p("src.raw")), 6 << 20, 3);
    std::fs::write(p("t1.raw"), vec![0x77u8; 7 << 20]).unwrap();
    std::fs::write(p("t2.raw"), vec![0x77u8; 7 << 20]).unwrap();
    let j = p("job.journal");
    let out = convert(&["--journal", &j, "--output", "json", &p("src.raw"), &p("t1.raw")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(first["already-complete"], false);
    assert_eq!(&std::fs::read(p("t1.raw")).unwrap()[..content.len()], &content[..]);
    // A rerun does nothing and says so; with --checksum it hashes the source without writing.
    let out = convert(&["--journal", &j, "--checksum", "--output", "json", &p("src.raw"), &p("t1.raw")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("records this conversion as complete; nothing to do"), "{}", stderr(&out));
    let again: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((again["already-complete"].clone(), again["bytes-written"].clone()), (true.into(), 0.into()));
    assert_eq!(again["bytes-skipped"], 6 << 20);
    assert_eq!(again["checksum"], naive_blkhash(&content).as_str());
    // Different target, changed options, changed source: each refused with what changed.
    refused(&convert(&["--journal", &j, &p("src.raw"), &p("t2.raw")]), "the target changed");
    refused(
        &convert(&["--journal", &j, "--target-is-zero", &p("src.raw"), &p("t1.raw")]),
        "--target-is-zero was off, now on",
    );
    let mtime = std::fs::metadata(p("src.raw")).unwrap().modified().unwrap();
    let f = std::fs::File::options().write(true).open(p("src.raw")).unwrap();
    f.set_modified(mtime + Duration::from_secs(1)).unwrap();
    refused(&convert(&["--journal", &j, &p("src.raw"), &p("t1.raw")]), "the source changed: its identity was file:");
    f.set_modified(mtime).unwrap();
    let out = convert(&["--journal", &j, &p("src.raw"), &p("t1.raw")]);
    assert!(out.status.success(), "{}", stderr(&out));
    refused(&convert(&["--journal", &j, &p("t2.raw"), &p("t1.raw")]), "the source changed: it was");
    // The target overwritten behind the journal's back: the read-back check refuses it.
    std::fs::write(p("t1.raw"), vec![0x77u8; 7 << 20]).unwrap();
    refused(&convert(&["--journal", &j, &p("src.raw"), &p("t1.raw")]), "the target holds other bytes");
    // --restart discards the journal and converts again.
    let out = convert(&["--journal", &j, "--restart", &p("src.raw"), &p("t1.raw")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&std::fs::read(p("t1.raw")).unwrap()[..content.len()], &content[..]);
    // The journal is never the target or a source.
    refused(&convert(&["--journal", &p("t2.raw"), &p("src.raw"), &p("t2.raw")]), "is the target itself");
    refused(&convert(&["--journal", &p("src.raw"), &p("src.raw"), &p("t2.raw")]), "is one of the source's files");
    // A target that disappeared.
    std::fs::remove_file(p("t1.raw")).unwrap();
    refused(&convert(&["--journal", &j, &p("src.raw"), &p("t1.raw")]), "no longer exists");
    assert!(!Path::new(&p("t1.raw")).exists(), "a refused run must not create the target");
}

#[test]
fn damaged_journals_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    make_raw(Path::new(&p("src.raw")), 2 << 20, 4);
    let j = p("job.journal");
    let out = convert(&["--journal", &j, &p("src.raw"), &p("t.raw")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let good = std::fs::read(&j).unwrap();
    assert!(good.starts_with(b"VDISK-JOURNAL\0\0\x01"));
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for n in [0, 5, 16, 17, 40, good.len() / 2, good.len() - 1] {
        cases.push((format!("truncated to {n}"), good[..n].to_vec()));
    }
    for i in [3, 16, 20, 60, good.len() - 30, good.len() - 2] {
        let mut b = good.clone();
        b[i] ^= 0x10;
        cases.push((format!("byte {i} flipped"), b));
    }
    let mut extra = good.clone();
    extra.extend_from_slice(b"garbage");
    cases.push(("garbage appended".into(), extra));
    for (what, bytes) in cases {
        std::fs::write(&j, &bytes).unwrap();
        let out = convert(&["--journal", &j, &p("src.raw"), &p("t.raw")]);
        assert_clean_error(&out, 1, &what);
        let err = stderr(&out);
        assert!(err.contains("is damaged") || err.contains("is not a vdisk journal"), "{what}: {err}");
    }
}

/// Real images: `checksum -a sha256` of each corpus image up to 300 MB is the sha256 of its
/// guest content listed in the corpus expectations.
#[test]
fn corpus_sha256_checksums() {
    let Some(dir) = corpus_dir() else { return };
    let rows = read_tsv(&repo_root().join("../shared/corpus/expected.tsv"));
    let mut checked = 0;
    for row in rows.iter().filter(|r| r["expect"] == "ok") {
        let size: u64 = row["virtual_size"].parse().unwrap();
        if size > 300_000_000 {
            continue;
        }
        let image = dir.join(&row["name"]);
        let out = run_limited(
            vdisk().args(["checksum", "-a", "sha256"]).args(row["flags"].split_whitespace()).arg(&image),
            LIMIT,
        );
        assert!(out.status.success(), "{}: {}", row["name"], stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.split_whitespace().next(), Some(row["sha256"].as_str()), "{}", row["name"]);
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} corpus images checked");
}

/// A disk read front to back (gzip-compressed in an OVA): `--checksum` is taken from what was
/// written and equals the checksum of the same disk stored uncompressed; the journal records the
/// conversion once complete, so a rerun does nothing.
#[test]
fn front_to_back_disks_get_a_checksum_and_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let ova = repo_root().join("testdata/ova");
    let want = checksum(&[], &ova.join("stream.ova"));
    let out_raw = dir.path().join("out.raw");
    let journal = dir.path().join("j");
    let args = |extra: &[&str]| {
        let mut c = vdisk();
        c.args(["convert", "--checksum", "--output", "json", "--journal"]).arg(&journal).args(extra);
        c.arg(ova.join("gzip-stream.ova")).arg(&out_raw);
        c
    };
    for complete in [false, true] {
        let out = run_limited(&mut args(&[]), LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["checksum"], want.as_str());
        assert_eq!(report["already-complete"], complete);
    }
    assert_eq!(checksum(&[], &out_raw), want);
}
