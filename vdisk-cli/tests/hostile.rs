//! The hostile corpus (`testdata/hostile/make.py`): every malformed, truncated, looping or
//! malicious image gets a clean refusal (exit 1, one `vdisk: ` line) or a correct conversion from
//! `convert`, `info`, `map` and `check` alike; never a panic, a signal, a hang (each command is
//! time-bounded) or memory beyond a bound (each runs under an address-space limit).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

/// Time bound per command.
const LIMIT: Duration = Duration::from_secs(60);
/// Address-space bound per command: the copy engine needs threads x 4 MiB plus metadata; a
/// forged table that tried to allocate gigabytes would hit this.
const ADDRESS_SPACE_BYTES: u64 = 2 << 30;

fn can_run() -> bool {
    let ok = |c: &str, a: &str| Command::new(c).arg(a).output().is_ok_and(|o| o.status.success());
    let present = ok("python3", "--version")
        && ok("qemu-img", "--version")
        && ok("qemu-io", "--version")
        && ok("prlimit", "--version");
    if !present {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "python3, qemu-img, qemu-io and prlimit are required on CI"
        );
        eprintln!("SKIP: python3, qemu-img, qemu-io or prlimit missing; hostile corpus not run");
    }
    present
}

fn limited(
    args: &[&str],
    flags: &str,
    file: &std::path::Path,
    extra: Option<&std::path::Path>,
) -> std::process::Output {
    let mut c = Command::new("prlimit");
    c.arg(format!("--as={ADDRESS_SPACE_BYTES}")).arg("--").arg(env!("CARGO_BIN_EXE_vdisk"));
    c.args(args).args(flags.split_whitespace()).arg(file);
    if let Some(e) = extra {
        c.arg(e);
    }
    run_limited(&mut c, LIMIT)
}

#[test]
fn every_hostile_image_is_refused_cleanly_or_converted() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("hostile");
    let st = Command::new("python3").arg(repo_root().join("testdata/hostile/make.py")).arg(&corpus).status().unwrap();
    assert!(st.success(), "make.py failed");
    let rows = read_tsv(&corpus.join("cases.tsv"));
    assert!(rows.len() > 150, "only {} hostile cases", rows.len());
    let out = dir.path().join("out.raw");
    let mut failures = Vec::new();
    for row in &rows {
        let name = &row["name"];
        let file = corpus.join(name);
        let flags = row["flags"].as_str();
        let _ = std::fs::remove_file(&out);
        let conv = limited(&["convert"], flags, &file, Some(&out));
        let _ = std::fs::remove_file(&out);
        let mut problems = Vec::new();
        let clean = |o: &std::process::Output, ok_codes: &[i32]| -> Option<String> {
            let stderr = String::from_utf8_lossy(&o.stderr);
            match o.status.code() {
                None => Some(format!("killed by a signal: {stderr}")),
                Some(1) if stderr.lines().count() == 1 && stderr.starts_with("vdisk: ") => None,
                Some(c) if ok_codes.contains(&c) && !stderr.contains("panicked") => None,
                Some(c) => Some(format!("exit {c}: {stderr}")),
            }
        };
        if let Some(p) = clean(&conv, &[0]) {
            problems.push(format!("convert: {p}"));
        }
        if row["expect"] == "error" && conv.status.code() == Some(0) {
            problems.push("convert: expected a refusal but it converted".to_string());
        }
        for (cmd, codes) in
            [(&["info"][..], &[0][..]), (&["map", "--output", "json"][..], &[0][..]), (&["check"][..], &[0, 2, 3][..])]
        {
            let o = limited(cmd, flags, &file, None);
            if let Some(p) = clean(&o, codes) {
                problems.push(format!("{}: {p}", cmd[0]));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases misbehaved:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}
