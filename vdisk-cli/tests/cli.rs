//! The CLI's contract: exit codes, one-line errors, qemu-img-compatible JSON, and the target
//! rules of `convert` (new files sparse, existing targets never truncated, refusals).

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = vdisk();
    for a in args {
        c.arg(a);
    }
    run_limited(&mut c, LIMIT)
}

fn have_qemu_img() -> bool {
    let ok = std::process::Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "qemu-img is required on CI");
        eprintln!("SKIP: qemu-img not found; comparisons with qemu-img not run");
    }
    ok
}

fn write_pattern(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8 | 1).collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let out = run(&[&"info", &"--bogus", &"x"]);
    assert_clean_error(&out, 2, "unknown option");
    let out = run(&[&"convert", &"-O", &"qed", &"a", &"b"]);
    assert_clean_error(&out, 2, "unsupported output format");
    let out = run(&[&"--version"]);
    assert!(out.status.success());
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let out = run(&[&"info", &missing]);
    assert_clean_error(&out, 1, "missing file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
    let out = run(&[&"info", &dir.path()]);
    assert_clean_error(&out, 1, "a directory");
    let vdi = dir.path().join("disk.vdi");
    let mut bytes = b"<<< Oracle VM VirtualBox Disk Image >>>\n".to_vec();
    bytes.resize(0x200, 0);
    bytes[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
    std::fs::write(&vdi, &bytes).unwrap();
    let out = run(&[&"convert", &vdi, &dir.path().join("out.raw")]);
    assert_clean_error(&out, 1, "VDI");
    assert!(String::from_utf8_lossy(&out.stderr).contains("VDI"));
    assert!(!dir.path().join("out.raw").exists(), "no target is created for an unreadable source");
}

#[test]
fn info_json_matches_qemu_img_for_raw() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    write_pattern(&img, 3 * 65536 + 512);
    let ours = run(&[&"info", &"--output", &"json", &img]);
    assert!(ours.status.success());
    let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    let theirs = std::process::Command::new("qemu-img").args(["info", "--output", "json"]).arg(&img).output().unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    for key in ["virtual-size", "format", "filename", "actual-size", "dirty-flag"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let human = run(&[&"info", &img]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("file format: raw"), "{text}");
    assert!(text.contains("virtual size: 192 KiB (197120 bytes)"), "{text}");
}

#[test]
fn map_json_matches_qemu_img_for_a_sparse_raw_file() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
    f.write_all_at(&[2u8; 4096], 5 << 20).unwrap();
    f.sync_all().unwrap();
    let ours = run(&[&"map", &"--output", &"json", &img]);
    assert!(ours.status.success());
    let theirs = std::process::Command::new("qemu-img")
        .args(["map", "--output", "json", "-f", "raw"])
        .arg(&img)
        .output()
        .unwrap();
    let parse = |b: &[u8]| -> Vec<(u64, u64, bool)> {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"].as_bool().unwrap()))
            .collect()
    };
    assert_eq!(parse(&ours.stdout), parse(&theirs.stdout));
}

#[test]
fn convert_creates_a_sparse_file_with_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[7u8; 65536], 10 << 20).unwrap();
    drop(f);
    let dst = dir.path().join("dst.raw");
    let out = run(&[&"convert", &"-p", &src, &dst]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    let meta = std::fs::metadata(&dst).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 <= 1 << 20, "the output is sparse ({} blocks)", meta.blocks());
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("100.00/100%"), "progress lines reach a log: {progress}");
}

#[test]
fn convert_into_an_existing_file_zeroes_without_truncating() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = write_pattern(&src, 1 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.set_len(2 << 20).unwrap(); // second MiB is a hole: reads as zero
    drop(f);
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0xeeu8; 3 << 20]).unwrap();
    let out = run(&[&"convert", &"-n", &src, &dst]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = std::fs::read(&dst).unwrap();
    assert_eq!(got.len(), 3 << 20, "never truncated");
    assert_eq!(&got[..1 << 20], &data[..]);
    assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0), "zero range zeroed");
    assert!(got[2 << 20..].iter().all(|&b| b == 0xee), "past the virtual size untouched");

    // --target-is-zero leaves zero ranges alone.
    std::fs::write(&dst, vec![0xeeu8; 2 << 20]).unwrap();
    let out = run(&[&"convert", &"--target-is-zero", &src, &dst]);
    assert!(out.status.success());
    let got = std::fs::read(&dst).unwrap();
    assert!(got[1 << 20..].iter().all(|&b| b == 0xee));
}

#[test]
fn convert_refuses_bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_pattern(&src, 1 << 20);
    let small = dir.path().join("small.raw");
    std::fs::write(&small, b"tiny").unwrap();
    let out = run(&[&"convert", &src, &small]);
    assert_clean_error(&out, 1, "too small");
    assert_eq!(std::fs::read(&small).unwrap(), b"tiny", "a refused target is untouched");
    let out = run(&[&"convert", &src, &src]);
    assert_clean_error(&out, 1, "same file");
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let out = run(&[&"convert", &src, &link]);
    assert_clean_error(&out, 1, "same file through a symlink");
    let out = run(&[&"convert", &"-n", &src, &dir.path().join("absent.raw")]);
    assert_clean_error(&out, 1, "-n with a missing target");
    let out = run(&[&"convert", &"-O", &"host_device", &src, &dir.path().join("file.raw")]);
    assert_clean_error(&out, 1, "host_device onto a file");
}

#[test]
fn check_reports_a_raw_image_clean() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_pattern(&src, 4096);
    let out = run(&[&"check", &"--output", &"json", &src]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corruptions"], 0);
    assert_eq!(v["format"], "raw");
}

#[test]
fn the_sample_image_converts() {
    let sample = repo_root().join("testdata/sample.qcow2");
    let out_dir = tempfile::tempdir().unwrap();
    let dst = out_dir.path().join("sample.raw");
    let out = run(&[&"info", &"--output", &"json", &sample]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    let out = run(&[&"convert", &sample, &dst]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), v["virtual-size"].as_u64().unwrap());
}

#[test]
fn map_json_equals_qemu_img_for_a_qcow2_chain() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let sh = |args: &[&str], prog: &str| {
        let o = std::process::Command::new(prog).args(args).current_dir(dir.path()).output().unwrap();
        assert!(o.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    sh(&["create", "-q", "-f", "qcow2", &p("c1.qcow2"), "4M"], "qemu-img");
    sh(&["-c", "write -P 1 0 64k", "-c", "write -c -P 5 3M 64k", &p("c1.qcow2")], "qemu-io");
    sh(&["create", "-q", "-f", "qcow2", "-b", "c1.qcow2", "-F", "qcow2", &p("c2.qcow2")], "qemu-img");
    sh(&["-c", "write -z 1M 64k", &p("c2.qcow2")], "qemu-io");
    sh(&["create", "-q", "-f", "qcow2", "-b", "c2.qcow2", "-F", "qcow2", &p("c3.qcow2"), "3M"], "qemu-img");
    sh(&["-c", "write -P 3 2M 64k", &p("c3.qcow2")], "qemu-io");
    for img in ["c1.qcow2", "c3.qcow2"] {
        let ours = run(&[&"map", &"--output", &"json", &"--references", &"same-dir", &p(img)]);
        assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
        let theirs =
            std::process::Command::new("qemu-img").args(["map", "--output", "json", &p(img)]).output().unwrap();
        let a: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
        assert_eq!(a, b, "{img}");
    }
}

#[test]
fn an_empty_1_tib_qcow2_converts_to_a_sparse_file() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.qcow2");
    let o = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1T")
        .output()
        .unwrap();
    assert!(o.status.success());
    let dst = dir.path().join("empty.raw");
    let out = run(&[&"convert", &img, &dst]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = std::fs::metadata(&dst).unwrap();
    assert_eq!(meta.len(), 1 << 40);
    assert_eq!(meta.blocks(), 0, "nothing is written for an empty disk");
}

/// SIGINT during a convert stops it with exit status 130 and one `vdisk: ` line, leaving the
/// target as written so far. The source is a read-only loop device over a large sparse file:
/// reading it takes far longer than the signal's delay.
#[test]
fn sigint_stops_a_convert_with_exit_130() {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !root {
        eprintln!("SKIP: not root; SIGINT test (needs a loop device) not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("big.img");
    std::fs::File::create(&backing).unwrap().set_len(64 << 30).unwrap();
    let attach = std::process::Command::new("losetup").args(["-f", "--show", "-r"]).arg(&backing).output();
    let Some(dev) =
        attach.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    else {
        eprintln!("SKIP: losetup cannot attach a loop device here; SIGINT test not run");
        return;
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());
    let dst = dir.path().join("out.raw");
    let mut child =
        vdisk().args(["convert", "-f", "raw", &dev]).arg(&dst).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let st = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let sent = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        // The engine checks between work items (4 MiB each); 5 s leaves a loaded CI machine margin.
        assert!(sent.elapsed() < Duration::from_secs(5), "convert did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("vdisk: ") && stderr.contains("interrupted"), "{stderr}");
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 64 << 30, "the target is left in place");
}

#[test]
fn a_reader_that_closes_stdout_early_ends_vdisk_quietly() {
    // `vdisk ... | true`: the reader is gone before vdisk writes, so its writes fail with EPIPE
    // (Rust ignores SIGPIPE). vdisk must end like a tool killed by SIGPIPE (status 141), never
    // panic (status 101 with "failed printing to stdout").
    let bin = vdisk().get_program().to_owned();
    let sample = repo_root().join("testdata/sample.qcow2");
    for cmd in ["check", "info", "checksum"] {
        let script = format!("(sleep 0.5; \"$0\" {cmd} \"$1\" 2>err; echo $? >status) | true");
        let dir = tempfile::tempdir().unwrap();
        let mut c = std::process::Command::new("sh");
        c.current_dir(dir.path()).arg("-c").arg(&script).arg(&bin).arg(&sample);
        let out = run_limited(&mut c, LIMIT);
        assert!(out.status.success(), "{out:?}");
        let status = std::fs::read_to_string(dir.path().join("status")).unwrap();
        let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
        assert_eq!(status.trim(), "141", "vdisk {cmd}: stderr {err:?}");
        assert!(!err.contains("panicked"), "vdisk {cmd}: {err}");
    }
}
