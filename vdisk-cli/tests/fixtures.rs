//! The small committed fixtures in `testdata/`: every `testdata/**/expected.tsv` row converts to
//! its golden sha256 and size with the CLI (no qemu-img needed).

mod support;

use std::time::Duration;

use support::*;

#[test]
fn committed_fixtures_convert_to_their_golden_content() {
    let root = repo_root().join("testdata");
    let mut tables = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("expected.tsv").is_file() {
            tables.push(dir);
        }
    }
    if root.join("expected.tsv").is_file() {
        tables.push(root.clone());
    }
    assert!(!tables.is_empty(), "no testdata/*/expected.tsv found");
    let out = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for dir in tables {
        for row in read_tsv(&dir.join("expected.tsv")) {
            let image = dir.join(&row["name"]);
            let target = out.path().join("out.raw");
            let _ = std::fs::remove_file(&target);
            let mut cmd = vdisk();
            cmd.arg("convert").args(row["flags"].split_whitespace()).arg(&image).arg(&target);
            let o = run_limited(&mut cmd, Duration::from_secs(60));
            assert!(o.status.success(), "{}: {}", image.display(), String::from_utf8_lossy(&o.stderr));
            let (sha, len) = sha256_file(&target);
            assert_eq!(sha, row["sha256"], "{}", image.display());
            assert_eq!(len.to_string(), row["virtual_size"], "{}", image.display());
            checked += 1;
        }
    }
    assert!(checked > 0);
}
