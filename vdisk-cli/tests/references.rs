//! The reference policy, end to end: a decoy secret outside the image's directory is named by
//! images in every way an uploaded image could (absolute path, `..`, a symlink beside the image,
//! a `json:` pseudo-protocol, a qcow2 external data file, VMDK flat extents). No policy level
//! may copy it into an output it should not reach: `deny` and `same-dir` refuse all of them;
//! `any` still refuses `json:` names.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

const MARKER: &[u8] = b"VDISK-DECOY-SECRET";

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn vmdk_descriptor(path: &Path, extent: &str) {
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n\
         # Extent description\nRW 2048 FLAT \"{extent}\" 0\n\n# The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n"
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_decoy_secret_never_reaches_an_output_it_should_not() {
    if !Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success()) {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "qemu-img is required on CI");
        eprintln!("SKIP: qemu-img not found; reference-policy test not run");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let secret_dir = root.path().join("secret");
    let images = root.path().join("images");
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::create_dir_all(&images).unwrap();
    let secret = secret_dir.join("decoy.bin");
    std::fs::write(&secret, &MARKER.repeat((1 << 20) / MARKER.len() + 1)[..1 << 20]).unwrap();
    std::os::unix::fs::symlink("../secret/decoy.bin", images.join("link.bin")).unwrap();
    let abs = secret.to_str().unwrap().to_string();
    let json = format!("json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"file\",\"filename\":\"{abs}\"}}}}");

    let mk = |name: &str, backing: &str| {
        let p = images.join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", p.to_str().unwrap(), "1M"]);
    };
    mk("q-abs.qcow2", &abs);
    mk("q-rel.qcow2", "../secret/decoy.bin");
    mk("q-link.qcow2", "link.bin");
    mk("q-json.qcow2", &json);
    // An external data file named "../secret/decoy.bin": made against a scratch file with a name of
    // the same length, then renamed inside the header, so qemu-img never writes to the decoy.
    std::fs::create_dir_all(root.path().join("secrex")).unwrap();
    let df = images.join("q-datafile.qcow2");
    // qemu-img resolves a data file name against its working directory: run it from the image's.
    let o = Command::new("qemu-img")
        .current_dir(&images)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=../secrex/decoy.bin,data_file_raw=on",
            "q-datafile.qcow2",
            "1M",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut bytes = std::fs::read(&df).unwrap();
    let at = bytes.windows(19).position(|w| w == b"../secrex/decoy.bin").expect("data file name in the header");
    bytes[at..at + 19].copy_from_slice(b"../secret/decoy.bin");
    std::fs::write(&df, bytes).unwrap();
    vmdk_descriptor(&images.join("v-abs.vmdk"), &abs);
    vmdk_descriptor(&images.join("v-rel.vmdk"), "../secret/decoy.bin");
    vmdk_descriptor(&images.join("v-link.vmdk"), "link.bin");

    let cases = [
        "q-abs.qcow2",
        "q-rel.qcow2",
        "q-link.qcow2",
        "q-json.qcow2",
        "q-datafile.qcow2",
        "v-abs.vmdk",
        "v-rel.vmdk",
        "v-link.vmdk",
    ];
    let out = root.path().join("out.raw");
    let mut failures = Vec::new();
    for policy in ["deny", "same-dir", "any"] {
        for name in cases {
            let _ = std::fs::remove_file(&out);
            let o = run_limited(
                vdisk().args(["convert", "--references", policy]).arg(images.join(name)).arg(&out),
                Duration::from_secs(60),
            );
            let leaked = std::fs::read(&out).is_ok_and(|b| contains(&b, MARKER));
            let may_reach = policy == "any" && name != "q-json.qcow2";
            if !may_reach {
                if o.status.code() != Some(1) {
                    failures.push(format!("{policy} {name}: expected a refusal, got {:?}", o.status));
                }
                if leaked {
                    failures.push(format!("{policy} {name}: THE SECRET LEAKED into the output"));
                }
                let stderr = String::from_utf8_lossy(&o.stderr);
                if !(stderr.starts_with("vdisk: ") && stderr.lines().count() == 1) {
                    failures.push(format!("{policy} {name}: not one error line: {stderr}"));
                }
            } else if !o.status.success() {
                failures.push(format!(
                    "{policy} {name}: allowed by the policy but failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            } else if !leaked {
                failures.push(format!("{policy} {name}: allowed, yet the referenced content is missing"));
            }
            // Describing never opens references, under any policy.
            let i = run_limited(
                vdisk().args(["info", "--references", policy]).arg(images.join(name)),
                Duration::from_secs(60),
            );
            if !i.status.success() {
                failures.push(format!("{policy} {name}: info failed: {}", String::from_utf8_lossy(&i.stderr)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
