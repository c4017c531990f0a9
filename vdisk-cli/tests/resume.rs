//! Resumable convert: a conversion onto a loop device full of garbage, killed with SIGKILL at
//! several points and interrupted once with SIGINT, each time rerun with the same journal, ends
//! with the device holding exactly the image's content (and nothing past it touched); every run
//! keeps what the journal recorded and the last one skips at least that much; a rerun after
//! success does nothing. The same with `--target-is-zero` on a zeroed file.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::*;

/// Virtual size: 96 MiB and a bit (a multiple of 512 for qcow2).
const SIZE: u64 = (96 << 20) + 3 * 512;
/// Garbage past the virtual size that must survive.
const TAIL: u64 = 2 << 20;
/// Checkpoint often, so that kills land between checkpoints with work recorded.
const CHECKPOINT_BYTES: &str = "2097152";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn naive_blkhash(data: &[u8]) -> String {
    let mut outer = Sha256::new();
    for block in data.chunks(64 << 10) {
        outer.update(Sha256::digest(block));
    }
    outer.update((data.len() as u64).to_le_bytes());
    hex(&outer.finalize())
}

/// Text-like data that compresses (so the source is a compressed qcow2), in runs separated by
/// holes and by allocated zeros.
fn make_raw(path: &Path) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut content = vec![0u8; SIZE as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let text: Vec<u8> =
        (0..(1 << 20)).map(|i| if i % 7 == 6 { b' ' } else { b'a' + ((next() >> 3) % 13) as u8 }).collect();
    let mut pos = 0u64;
    let mut run = 0;
    while pos < SIZE {
        let len = ((next() % 3_000_000) + 1).min(SIZE - pos);
        match run % 4 {
            0 | 1 => {
                let shift = (next() % 4096) as usize;
                let bytes: Vec<u8> = text.iter().cycle().skip(shift).take(len as usize).copied().collect();
                f.write_all_at(&bytes, pos).unwrap();
                content[pos as usize..(pos + len) as usize].copy_from_slice(&bytes);
            }
            2 => f.write_all_at(&vec![0u8; len as usize], pos).unwrap(),
            _ => {}
        }
        pos += len;
        run += 1;
    }
    content
}

/// What the journal records: (bytes done, complete). Parsed here from its documented layout.
fn journal_state(path: &Path) -> Option<(u64, bool)> {
    let bytes = std::fs::read(path).ok()?;
    let mut rest = bytes.strip_prefix(b"VDISK-JOURNAL\0\0\x01".as_slice())?;
    let (mut done, mut complete) = (None, false);
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (kind, payload) = (rest[4], &rest[5..5 + len]);
        match kind {
            2 => {
                done = Some(
                    payload
                        .chunks_exact(16)
                        .map(|p| {
                            u64::from_le_bytes(p[8..].try_into().unwrap())
                                - u64::from_le_bytes(p[..8].try_into().unwrap())
                        })
                        .sum(),
                )
            }
            3 => complete = true,
            _ => {}
        }
        rest = &rest[len + 9..];
    }
    Some((done?, complete))
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(file: &Path) -> Option<Loop> {
    let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().ok()?;
    out.status.success().then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

fn can_run() -> bool {
    let ok = |c: &str, a: &str| Command::new(c).arg(a).output().is_ok_and(|o| o.status.success());
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !ok("qemu-img", "--version") || !ok("losetup", "--version") {
        eprintln!("SKIP: the resume test needs root, losetup and qemu-img");
        return false;
    }
    true
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGKILL this long after the start, whatever was recorded.
    KillAfter(Duration),
    /// SIGKILL once the journal records work of this run (its first checkpoint).
    KillAtCheckpoint,
    /// SIGINT at this run's first checkpoint.
    InterruptAtCheckpoint,
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vdisk")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Run a conversion and stop it as `stop` says; returns whether the signal landed while it ran,
/// and what the journal records afterwards.
fn run_and_stop(args: &[&str], journal: &Path, stop: Stop) -> (bool, u64) {
    let before = journal_state(journal).map_or(0, |s| s.0);
    let mut child = spawn(args);
    let start = Instant::now();
    let pid = child.id() as libc::pid_t;
    let mut landed = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "convert did not finish");
        // Signal once this run has recorded work of its own: it is copying by then, with more
        // work done than recorded.
        let checkpointed = journal_state(journal).map_or(0, |s| s.0) > before;
        let signal = match stop {
            Stop::KillAfter(d) if start.elapsed() >= d => Some(libc::SIGKILL),
            Stop::KillAtCheckpoint if checkpointed => Some(libc::SIGKILL),
            Stop::InterruptAtCheckpoint if checkpointed => Some(libc::SIGINT),
            _ => None,
        };
        if let Some(sig) = signal {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(pid, sig) };
            landed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match (stop, landed) {
        (_, false) => assert!(out.status.success(), "{stop:?}: {stderr}"),
        (Stop::InterruptAtCheckpoint, true) => {
            // Signalled at its first checkpoint, with most of the disk still to do: it stops
            // between work items, records what it finished, and says so.
            assert_eq!(out.status.code(), Some(130), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains("interrupted;") && stderr.contains("rerun to resume"), "{stderr}");
        }
        (_, true) => {
            use std::os::unix::process::ExitStatusExt;
            assert!(out.status.signal() == Some(libc::SIGKILL) || out.status.success(), "{stop:?}: {stderr}");
        }
    }
    let after = journal_state(journal).map_or(0, |s| s.0);
    assert!(after >= before, "{stop:?}: the journal lost ranges ({before} -> {after})");
    (landed, after)
}

#[test]
fn killed_conversions_onto_a_loop_device_resume() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let content = make_raw(&raw);
    let src = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img").args(["convert", "-c", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&src).status();
    assert!(st.unwrap().success());
    let backing = dir.path().join("device.bin");
    let garbage: Vec<u8> = (0..SIZE + TAIL).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8 | 0x21).collect();
    std::fs::write(&backing, &garbage).unwrap();
    let Some(dev) = attach(&backing) else {
        eprintln!("SKIP: losetup cannot attach a loop device here");
        return;
    };
    let journal = dir.path().join("convert.journal");
    let (src_s, dev_s, journal_s) = (src.to_str().unwrap(), dev.0.as_str(), journal.to_str().unwrap());
    let args = [
        "convert",
        "-O",
        "host_device",
        "--threads",
        "1",
        "--checkpoint-bytes",
        CHECKPOINT_BYTES,
        "--journal",
        journal_s,
        src_s,
        dev_s,
    ];
    let mut landed = 0;
    let mut recorded = 0;
    for stop in [
        Stop::KillAfter(Duration::from_millis(15)),
        Stop::KillAtCheckpoint,
        Stop::InterruptAtCheckpoint,
        Stop::KillAtCheckpoint,
        Stop::KillAtCheckpoint,
    ] {
        let (hit, after) = run_and_stop(&args, &journal, stop);
        eprintln!("{stop:?}: signalled while running: {hit}; {after} bytes recorded");
        landed += usize::from(hit);
        recorded = after;
    }
    assert!(landed >= 4, "only {landed} of 5 signals landed while converting");
    assert!(recorded > 0 && recorded < SIZE, "{recorded}");
    // The last run: resumes, skips at least what was recorded, and hashes everything.
    let mut last: Vec<&str> = args.to_vec();
    last.splice(1..1, ["--checksum", "--output", "json"]);
    let out = run_limited(vdisk().args(&last), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["bytes-skipped"].as_u64().unwrap() >= recorded, "{report} after {recorded} recorded");
    assert_eq!(report["already-complete"], false);
    assert_eq!(report["checksum"], naive_blkhash(&content).as_str());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed with journal"));
    assert_eq!(journal_state(&journal), Some((SIZE, true)));
    // The device: the content, then the garbage it had.
    let mut head = vec![0u8; SIZE as usize];
    let f = std::fs::File::open(&dev.0).unwrap();
    f.read_exact_at(&mut head, 0).unwrap();
    assert!(head == content, "the device does not hold the image's content");
    let mut tail = vec![0u8; TAIL as usize];
    f.read_exact_at(&mut tail, SIZE).unwrap();
    assert!(tail == garbage[SIZE as usize..], "bytes past the virtual size were touched");
    // vdisk's own verification agrees.
    let sum = run_limited(vdisk().args(["checksum", "--size", &SIZE.to_string(), dev_s]), Duration::from_secs(60));
    assert_eq!(String::from_utf8_lossy(&sum.stdout), format!("{}  {dev_s}\n", naive_blkhash(&content)));
    // A rerun does nothing.
    let out = run_limited(vdisk().args(&last), Duration::from_secs(60));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["already-complete"], true);
    assert_eq!(report["bytes-written"], 0);
}

#[test]
fn target_is_zero_resumes_without_zeroing() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let content = make_raw(&raw);
    let target: PathBuf = dir.path().join("zeroed.raw");
    std::fs::File::create(&target).unwrap().set_len(SIZE).unwrap();
    let journal = dir.path().join("j");
    let args = [
        "convert",
        "-n",
        "--target-is-zero",
        "--threads",
        "1",
        "--checkpoint-bytes",
        "1048576",
        "--journal",
        journal.to_str().unwrap(),
        raw.to_str().unwrap(),
        target.to_str().unwrap(),
    ];
    let (_, recorded) = run_and_stop(&args, &journal, Stop::KillAtCheckpoint);
    let mut last = args.to_vec();
    last.splice(1..1, ["--output", "json"]);
    let out = run_limited(vdisk().args(&last), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["bytes-skipped"].as_u64().unwrap() >= recorded);
    assert_eq!(report["bytes-zeroed"], 0, "a zero target needs no zeroing, resumed or not");
    assert!(std::fs::read(&target).unwrap() == content);
}
