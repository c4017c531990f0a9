//! Real block devices: a loop device full of garbage receives an image holding an ext4 file
//! system, in every format; `e2fsck -fn` must pass, the device must hold exactly the guest
//! content, and nothing past the virtual size may be touched.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

/// Virtual size of the test disk: not a multiple of 1 MiB, so edge handling is exercised.
const DISK_BYTES: u64 = (80 << 20) + (3 << 16) + 512;
/// Garbage past the virtual size that must survive.
const TAIL_BYTES: u64 = 4 << 20;

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

fn tools_present() -> bool {
    let ok = |c: &str, a: &str| Command::new(c).arg(a).output().is_ok_and(|o| o.status.success());
    ok("qemu-img", "--version") && ok("mkfs.ext4", "-V") && ok("losetup", "--version")
}

/// Build an ext4 file system of [`DISK_BYTES`] populated with real files from /usr.
fn make_ext4(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut budget: u64 = 24 << 20;
    for src in ["/usr/share/doc", "/usr/bin", "/usr/share/common-licenses"] {
        let Ok(entries) = std::fs::read_dir(src) else { continue };
        let dst = root.join(src.trim_start_matches('/').replace('/', "_"));
        std::fs::create_dir_all(&dst).unwrap();
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::metadata(&p) else { continue };
            if !meta.is_file() || meta.len() > budget {
                continue;
            }
            if std::fs::copy(&p, dst.join(e.file_name())).is_ok() {
                budget -= meta.len();
            }
            if budget < 64 << 10 {
                break;
            }
        }
    }
    let img = dir.join("fs.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    drop(f);
    let st = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&img).status().unwrap();
    assert!(st.success());
    img
}

#[test]
fn converts_onto_a_loop_device_in_every_format() {
    if cannot_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = make_ext4(dir.path());
    let (want_sha, _) = sha256_file(&raw);
    let variants: &[(&str, &[&str])] = &[
        ("raw", &["-O", "raw"]),
        ("qcow2", &["-O", "qcow2"]),
        ("qcow2-zlib", &["-O", "qcow2", "-c"]),
        ("qcow2-zstd", &["-O", "qcow2", "-c", "-o", "compression_type=zstd"]),
        ("vmdk", &["-O", "vmdk"]),
        ("vmdk-stream", &["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        ("vhd", &["-O", "vpc", "-o", "force_size=on"]),
        ("vhd-fixed", &["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
        ("vhdx", &["-O", "vhdx"]),
    ];
    let backing = dir.path().join("device.bin");
    let garbage: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x11).collect();
    for (name, args) in variants {
        let image = dir.path().join(format!("disk.{name}"));
        let st =
            Command::new("qemu-img").args(["convert", "-f", "raw"]).args(*args).arg(&raw).arg(&image).status().unwrap();
        assert!(st.success(), "qemu-img convert to {name}");
        // A device of garbage, larger than the disk.
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&backing).unwrap();
            let mut left = DISK_BYTES + TAIL_BYTES;
            while left > 0 {
                let n = left.min(garbage.len() as u64) as usize;
                f.write_all(&garbage[..n]).unwrap();
                left -= n as u64;
            }
        }
        let Some(dev) = attach(&backing) else {
            eprintln!("SKIP: losetup cannot attach a loop device here; block-device test not run");
            return;
        };
        let out = run_limited(
            vdisk().args(["convert", "-O", "host_device", "-p"]).arg(&image).arg(&dev.0),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let fsck = Command::new("e2fsck").args(["-fn", &dev.0]).output().unwrap();
        assert!(fsck.status.success(), "{name}: e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
        drop(dev);
        let content = std::fs::read(&backing).unwrap();
        let (head, tail) = content.split_at(DISK_BYTES as usize);
        let head_path = dir.path().join("head.bin");
        std::fs::write(&head_path, head).unwrap();
        assert_eq!(sha256_file(&head_path).0, want_sha, "{name}: device content differs from the guest content");
        let expect_tail: Vec<u8> =
            (0..TAIL_BYTES).map(|i| garbage[((DISK_BYTES + i) % garbage.len() as u64) as usize]).collect();
        assert!(tail == &expect_tail[..], "{name}: bytes past the virtual size were touched");
    }
}

/// True (after one SKIP line) when this machine cannot run the test: not root, or tools missing.
fn cannot_run() -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !tools_present() {
        eprintln!("SKIP: loop devices need root, losetup, mkfs.ext4 and qemu-img; block-device test not run");
        return true;
    }
    false
}

/// Every generated VDI and OVA case that converts goes onto one loop device with
/// `-O host_device`: the device holds exactly the case's content (garbage written first is
/// overwritten or zeroed) and the bytes just past the virtual size are untouched.
#[test]
fn every_vdi_and_ova_case_onto_a_loop_device() {
    if cannot_run() {
        return;
    }
    let mut cases = Vec::new();
    for script in ["vdi/make.py", "ova/make.py"] {
        let Some((dir, rows)) = generate_cases(script) else { return };
        cases.extend(rows.into_iter().filter(|r| r["expect"] == "ok").map(|r| (dir.clone(), r)));
    }
    let largest = cases.iter().map(|(_, r)| r["virtual_size"].parse::<u64>().unwrap()).max().unwrap();
    let guard = 64u64 << 10;
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("device.bin");
    let garbage: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8 | 0x21).collect();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&backing).unwrap();
        let mut left = largest + guard;
        while left > 0 {
            let n = left.min(garbage.len() as u64) as usize;
            f.write_all(&garbage[..n]).unwrap();
            left -= n as u64;
        }
    }
    let Some(dev) = attach(&backing) else {
        eprintln!("SKIP: losetup cannot attach a loop device here; block-device test not run");
        return;
    };
    use std::os::unix::fs::FileExt;
    let device = std::fs::OpenOptions::new().read(true).write(true).open(&dev.0).unwrap();
    for (dir, row) in &cases {
        let size: u64 = row["virtual_size"].parse().unwrap();
        let label = format!("{} {}", row["name"], row["flags"]);
        // Garbage over the disk's range, and a record of what lies just past it.
        let mut at = 0;
        while at < size {
            let n = (size - at).min(garbage.len() as u64) as usize;
            device.write_all_at(&garbage[..n], at).unwrap();
            at += n as u64;
        }
        device.sync_all().unwrap();
        let mut after = vec![0u8; guard as usize];
        device.read_exact_at(&mut after, size).unwrap();
        let out = run_limited(
            vdisk()
                .args(["convert", "-O", "host_device"])
                .args(row["flags"].split_whitespace())
                .arg(dir.join(&row["name"]))
                .arg(&dev.0),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "{label}: {}", String::from_utf8_lossy(&out.stderr));
        let mut content = vec![0u8; size as usize];
        device.read_exact_at(&mut content, 0).unwrap();
        let head = tmp.path().join("head.bin");
        std::fs::write(&head, &content).unwrap();
        assert_eq!(sha256_file(&head).0, row["sha256"], "{label}: device content");
        let mut now = vec![0u8; guard as usize];
        device.read_exact_at(&mut now, size).unwrap();
        assert!(now == after, "{label}: bytes past the virtual size were touched");
    }
    drop(device);
}
