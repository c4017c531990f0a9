//! `vdisk convert -O FMT` (export), `--preset`, and `vdisk measure`, against qemu-img.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(120);

fn vd(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = vdisk();
    for a in args {
        c.arg(a);
    }
    run_limited(&mut c, LIMIT)
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "vdisk failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "qemu-img is required on CI");
        eprintln!("SKIP: qemu-img not found");
    }
    ok
}

fn qemu(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new("qemu-img");
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

/// A sparse raw source: 40 MiB with random and repetitive runs and holes.
fn source(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(40 << 20).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let random: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    f.write_all_at(&random, 1 << 20).unwrap();
    let text: Vec<u8> = b"a compressible line of text\n".iter().copied().cycle().take(5 << 20).collect();
    f.write_all_at(&text, 20 << 20).unwrap();
    f.write_all_at(&[9u8; 1000], (40 << 20) - 1000).unwrap();
    path
}

fn assert_qcow2_good(src: &Path, out: &Path) {
    let check = qemu(&[&"check", &"-f", &"qcow2", &out]);
    assert!(check.status.success(), "check: {}", String::from_utf8_lossy(&check.stdout));
    let cmp = qemu(&[&"compare", &"-f", &"raw", &"-F", &"qcow2", &src, &out]);
    assert!(cmp.status.success(), "compare: {}", String::from_utf8_lossy(&cmp.stdout));
}

#[test]
fn convert_to_qcow2_compressed_and_with_options() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = dir.path().join("c.qcow2");
    ok(&vd(&[&"convert", &"-O", &"qcow2", &"-c", &src, &out]));
    assert_qcow2_good(&src, &out);
    let plain = dir.path().join("p.qcow2");
    ok(&vd(&[&"convert", &"-O", &"qcow2", &"-o", &"compat=0.10", &"-o", &"cluster_size=128k", &src, &plain]));
    assert_qcow2_good(&src, &plain);
    let bytes = std::fs::read(&plain).unwrap();
    assert_eq!(&bytes[4..8], &2u32.to_be_bytes());
    assert_eq!(&bytes[20..24], &17u32.to_be_bytes());
    assert!(std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&plain).unwrap().len());
    // JSON report.
    let again = dir.path().join("j.qcow2");
    let text = ok(&vd(&[&"convert", &"-O", &"qcow2", &"--output", &"json", &src, &again]));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["file-length"].as_u64(), Some(std::fs::metadata(&again).unwrap().len()));
}

#[test]
fn presets_choose_the_format() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = dir.path().join("os.qcow2");
    ok(&vd(&[&"convert", &"--preset", &"openstack", &src, &out]));
    assert_qcow2_good(&src, &out);
    assert_eq!(&std::fs::read(&out).unwrap()[4..8], &3u32.to_be_bytes());
    let out = dir.path().join("oci.qcow2");
    ok(&vd(&[&"convert", &"--preset", &"oci", &"-O", &"qcow2", &src, &out]));
    assert_qcow2_good(&src, &out);
    for preset in ["esxi", "aws", "oci"] {
        let out = dir.path().join(format!("{preset}.vmdk"));
        ok(&vd(&[&"convert", &"--preset", &preset, &"-c", &src, &out]));
        let check = qemu(&[&"check", &"-f", &"vmdk", &out]);
        assert!(check.status.success(), "{preset}: {}", String::from_utf8_lossy(&check.stdout));
        let cmp = qemu(&[&"compare", &"-f", &"raw", &"-F", &"vmdk", &src, &out]);
        assert!(cmp.status.success(), "{preset}: {}", String::from_utf8_lossy(&cmp.stdout));
        let head = std::fs::read(&out).unwrap();
        assert_eq!(&head[0..4], b"KDMV");
        assert_eq!(u32::from_le_bytes(head[8..12].try_into().unwrap()), 0x30001, "{preset}: stream flags");
        let text = String::from_utf8_lossy(&head[512..512 * 21]).into_owned();
        assert!(text.contains("createType=\"streamOptimized\"") && text.contains("ddb.adapterType = \"lsilogic\""));
    }
    // -c is refused where the VMDK subformat cannot compress.
    let refused =
        vd(&[&"convert", &"-O", &"vmdk", &"-c", &"-o", &"subformat=monolithicSparse", &src, &dir.path().join("y")]);
    assert_clean_error(&refused, 1, "-c with monolithicSparse");
    // A format the preset does not allow is refused, naming what it allows.
    let refused = vd(&[&"convert", &"--preset", &"openstack", &"-O", &"vmdk", &src, &dir.path().join("x")]);
    assert_clean_error(&refused, 1, "preset with the wrong format");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("qcow2"));
    let help = ok(&vd(&[&"convert", &"--help"]));
    for p in ["azure", "esxi", "hyperv", "oci", "aws", "openstack"] {
        assert!(help.contains(&format!("- {p}:")), "--help does not list preset {p}");
    }
}

#[test]
fn raw_only_flags_and_bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let dst = dir.path().join("x.qcow2");
    for args in [
        vec!["-O", "qcow2", "-n"],
        vec!["-O", "qcow2", "--target-is-zero"],
        vec!["-O", "qcow2", "-o", "cluster_size=3000"],
        vec!["-O", "qcow2", "-o", "nosuchoption=1"],
        vec!["-o", "compat=1.1"],
        vec!["-c"],
    ] {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert"];
        for a in &args {
            all.push(a);
        }
        all.push(&src);
        all.push(&dst);
        assert_clean_error(&vd(&all), 1, &format!("{args:?}"));
        assert!(!dst.exists());
    }
}

#[test]
fn measure_prints_qemu_img_keys_and_numbers() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for opts in ["cluster_size=65536", "cluster_size=2M", "compat=0.10"] {
        let ours = ok(&vd(&[&"measure", &"-O", &"qcow2", &"-o", &opts, &"--output", &"json", &src]));
        let theirs = qemu(&[&"measure", &"-O", &"qcow2", &"-o", &opts, &"--output", &"json", &src]);
        let a: serde_json::Value = serde_json::from_str(&ours).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
        assert_eq!(a, b, "{opts}");
    }
    let ours = ok(&vd(&[&"measure", &"-O", &"qcow2", &src]));
    let theirs = qemu(&[&"measure", &"-O", &"qcow2", &src]);
    assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout));
    let ours = ok(&vd(&[&"measure", &"-O", &"qcow2", &"--size", &"10737418240"]));
    let theirs = qemu(&[&"measure", &"-O", &"qcow2", &"--size", &"10737418240"]);
    assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout));
    let ours = ok(&vd(&[&"measure", &src]));
    let theirs = qemu(&[&"measure", &"-O", &"raw", &src]);
    assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout));
}

#[test]
fn azure_and_hyperv_presets() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    // 40 MiB: a whole MiB, so Azure's fixed VHD is the exact size plus the footer.
    let vhd = dir.path().join("azure.vhd");
    ok(&vd(&[&"convert", &"--preset", &"azure", &src, &vhd]));
    assert_eq!(std::fs::metadata(&vhd).unwrap().len(), (40 << 20) + 512);
    let cmp = qemu(&[&"compare", &"-f", &"raw", &"-F", &"vpc", &src, &vhd]);
    assert!(cmp.status.success(), "azure: {}", String::from_utf8_lossy(&cmp.stdout));
    let vhdx = dir.path().join("hyperv.vhdx");
    ok(&vd(&[&"convert", &"--preset", &"hyperv", &src, &vhdx]));
    let check = qemu(&[&"check", &"-f", &"vhdx", &vhdx]);
    assert!(check.status.success(), "hyperv: {}", String::from_utf8_lossy(&check.stdout));
    let cmp = qemu(&[&"compare", &"-f", &"raw", &"-F", &"vhdx", &src, &vhdx]);
    assert!(cmp.status.success(), "hyperv: {}", String::from_utf8_lossy(&cmp.stdout));
    // Not a whole MiB: refused, naming --round-up-mib; with it, grown to the next MiB.
    let odd = dir.path().join("odd.raw");
    std::fs::copy(&src, &odd).unwrap();
    std::fs::OpenOptions::new().write(true).open(&odd).unwrap().set_len((40 << 20) + 4096).unwrap();
    let out = dir.path().join("odd.vhd");
    let refused = vd(&[&"convert", &"--preset", &"azure", &odd, &out]);
    assert_clean_error(&refused, 1, "azure with an odd size");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--round-up-mib"));
    assert!(!out.exists());
    ok(&vd(&[&"convert", &"--preset", &"azure", &"--round-up-mib", &odd, &out]));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), (41 << 20) + 512);
    let cmp = qemu(&[&"compare", &"-f", &"raw", &"-F", &"vpc", &odd, &out]);
    assert!(cmp.status.success(), "rounded: {}", String::from_utf8_lossy(&cmp.stdout));
    // VHD and VHDX do not compress.
    assert_clean_error(&vd(&[&"convert", &"-O", &"vpc", &"-c", &src, &dir.path().join("c.vhd")]), 1, "-c vpc");
}

/// A read-only loop device over a sparse file of `size` bytes (it reads as data: a device has no
/// holes), detached on drop; `None` (after a SKIP line) where losetup cannot attach one.
fn zero_device(dir: &Path, size: u64) -> Option<(String, impl Drop)> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !root {
        eprintln!("SKIP: not root; export interruption tests (need a loop device) not run");
        return None;
    }
    let backing = dir.join("zeros.img");
    std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
    let attach = Command::new("losetup").args(["-f", "--show", "-r"]).arg(&backing).output();
    let Some(dev) =
        attach.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    else {
        eprintln!("SKIP: losetup cannot attach a loop device here; export interruption tests not run");
        return None;
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    Some((dev.clone(), Detach(dev)))
}

/// Names in `dir` other than the loop device's backing file.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "zeros.img")
        .collect();
    v.sort();
    v
}

#[test]
fn interrupted_exports_leave_no_image_at_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let Some((dev, _detach)) = zero_device(dir.path(), 64 << 30) else { return };
    let out = dir.path().join("volume.vmdk");
    for signal in ["-INT", "-KILL"] {
        let mut child = vdisk()
            .args(["convert", "--no-space-check", "-O", "vmdk", "-f", "raw", &dev])
            .arg(&out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
        let sent = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(sent.elapsed() < Duration::from_secs(10), "export did not stop after {signal}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!out.exists(), "{signal}: a partial image was left at the target");
        let left = names(dir.path());
        if signal == "-INT" {
            assert_eq!(status.code(), Some(130));
            assert!(left.is_empty(), "an interrupted export left {left:?}");
        } else {
            // A killed export cannot clean up: at most its hidden temporary file remains.
            assert!(left.iter().all(|n| n.starts_with(".volume.vmdk.vdisk-tmp-")), "{left:?}");
            for n in left {
                std::fs::remove_file(dir.path().join(n)).unwrap();
            }
        }
    }
}

#[test]
fn an_export_that_cannot_fit_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let df = Command::new("df").args(["--output=avail", "-B1"]).arg(dir.path()).output().unwrap();
    let free: u64 = String::from_utf8_lossy(&df.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    if free == 0 || free > (8 << 40) {
        eprintln!("SKIP: free space unknown or above 8 TiB; space check test not run");
        return;
    }
    // A device of zeros reads as data: the qcow2 output may need all of it.
    let size = (free + (1 << 30)).next_multiple_of(1 << 20);
    let Some((dev, _detach)) = zero_device(dir.path(), size) else { return };
    let out = dir.path().join("big.qcow2");
    let refused = vd(&[&"convert", &"-O", &"qcow2", &"-f", &"raw", &dev, &out]);
    assert_clean_error(&refused, 1, "export larger than the free space");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("bytes free"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(names(dir.path()).is_empty());
}

/// An ext4 file system (96 MiB, not a multiple of any block size) holding real files from
/// /usr/share (up to about 40 MB, in a fixed order), made by mkfs.ext4 -d; `None` (a printed
/// SKIP, a failure on CI) when mkfs.ext4 is missing.
fn ext4_source(dir: &Path) -> Option<std::path::PathBuf> {
    let mkfs = ["/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4"].into_iter().find(|p| Path::new(p).exists());
    let Some(mkfs) = mkfs else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "mkfs.ext4 is required on CI");
        eprintln!("SKIP: mkfs.ext4 not found");
        return None;
    };
    let tree = dir.join("tree");
    let mut budget: u64 = 40 << 20;
    let mut stack = vec![std::path::PathBuf::from("/usr/share")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() && meta.len() <= budget && meta.len() > 0 {
                let dest = tree.join(p.strip_prefix("/").unwrap());
                std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                if std::fs::copy(&p, &dest).is_ok() {
                    budget -= meta.len();
                }
            }
        }
        if budget < 1 << 20 {
            break;
        }
    }
    assert!(budget <= 30 << 20, "fewer than 10 MB of files found under /usr/share");
    let img = dir.join("ext4.raw");
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg(format!("{}k", 96 * 1024 + 4))
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&tree).unwrap();
    Some(img)
}

#[test]
fn an_ext4_disk_exports_to_every_format_and_comes_back_fsck_clean() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(src) = ext4_source(dir.path()) else { return };
    let want = std::fs::read(&src).unwrap();
    let e2fsck = ["/sbin/e2fsck", "/usr/sbin/e2fsck"].into_iter().find(|p| Path::new(p).exists()).unwrap();
    // (qemu-img's name, vdisk's extra arguments, whether qemu-img check understands it)
    let cases: [(&str, &[&str], bool); 10] = [
        ("qcow2", &[], true),
        ("qcow2", &["-c"], true),
        ("qcow2", &["-c", "-o", "compression_type=zstd"], true),
        ("qcow2", &["-o", "compat=0.10,cluster_size=4096"], true),
        ("vmdk", &[], true),
        ("vmdk", &["-o", "subformat=monolithicSparse"], true),
        ("vpc", &[], false),
        ("vpc", &["-o", "subformat=fixed"], false),
        ("vhdx", &[], true),
        ("vhdx", &["-o", "subformat=fixed"], true),
    ];
    for (i, (fmt, extra, checkable)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out{i}.{fmt}"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &"-f", &"raw", &"-O", fmt];
        for a in extra.iter() {
            args.push(a);
        }
        args.push(&src);
        args.push(&out);
        ok(&vd(&args));
        let what = format!("-O {fmt} {extra:?}");
        if *checkable {
            let check = qemu(&[&"check", &"-f", fmt, &out]);
            assert!(check.status.success(), "{what}: qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
        }
        let cmp = qemu(&[&"compare", &"-f", &"raw", &"-F", fmt, &src, &out]);
        assert!(cmp.status.success(), "{what}: qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));
        // Back to raw with vdisk: the same bytes, and e2fsck finds the file system clean.
        let back = dir.path().join(format!("back{i}.raw"));
        ok(&vd(&[&"convert", &"-f", fmt, &"-O", &"raw", &out, &back]));
        let got = std::fs::read(&back).unwrap();
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "{what}: content differs after the round trip"
        );
        assert!(got[want.len()..].iter().all(|&b| b == 0), "{what}: the padding is not zero");
        let fsck = Command::new(e2fsck).arg("-fn").arg(&back).output().unwrap();
        assert!(fsck.status.success(), "{what}: e2fsck -fn: {}", String::from_utf8_lossy(&fsck.stdout));
        std::fs::remove_file(&back).unwrap();
        std::fs::remove_file(&out).unwrap();
    }
}
