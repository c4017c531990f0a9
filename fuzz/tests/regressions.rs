//! Inputs that once crashed, hung or misbehaved under fuzzing, kept as named tests. Each file in
//! `fuzz/regressions/` is named `<target>-<what>.bin`; add a line below when adding one.

use std::path::Path;

fn input(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions").join(name)).unwrap()
}

fn body(target: &str) -> fn(&[u8]) {
    match target {
        "probe" => vdisk_fuzz::probe,
        "convert" => vdisk_fuzz::convert,
        "qcow2" => |d| vdisk_fuzz::format(d, vdisk_core::Format::Qcow2),
        "vmdk" => |d| vdisk_fuzz::format(d, vdisk_core::Format::Vmdk),
        "vhd" => |d| vdisk_fuzz::format(d, vdisk_core::Format::Vhd),
        "vhdx" => |d| vdisk_fuzz::format(d, vdisk_core::Format::Vhdx),
        other => panic!("unknown target {other}"),
    }
}

/// Every committed regression input runs without panicking.
#[test]
fn all_regression_inputs_are_handled() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".bin")).collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        let target = name.split('-').next().unwrap();
        body(target)(&input(&name));
    }
}
