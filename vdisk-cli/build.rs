//! Records the commit the build comes from, for `vdisk --version` and `vdisk.__version__`.
//!
//! From the file `BUILD-COMMIT` that `packaging/build.sh` puts into the sdist, else from git when
//! the sources are a checkout (with `-dirty` when tracked files differ from the commit), else
//! `unknown`. `VDISK_BUILD_COMMIT` in the environment overrides both.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

/// (commit, date) from git, and the files whose change means the answer may have changed.
fn from_git(dir: &Path) -> Option<(String, String, Vec<PathBuf>)> {
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    let date = git(dir, &["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
    let dirty = git(dir, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let mut watch = Vec::new();
    if let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        watch.push(git_dir.join("HEAD"));
        watch.push(git_dir.join("index"));
        if let (Some(common), Some(head_ref)) =
            (git(dir, &["rev-parse", "--git-common-dir"]), git(dir, &["symbolic-ref", "-q", "HEAD"]))
        {
            let common = if Path::new(&common).is_absolute() { PathBuf::from(common) } else { dir.join(common) };
            watch.push(common.join(&head_ref));
            watch.push(common.join("packed-refs"));
        }
    }
    let commit = if dirty { format!("{commit}-dirty") } else { commit };
    Some((commit, date, watch))
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let stamp = dir.join("BUILD-COMMIT");
    println!("cargo:rerun-if-env-changed=VDISK_BUILD_COMMIT");
    println!("cargo:rerun-if-changed={}", stamp.display());
    let (commit, date) = if let Ok(forced) = std::env::var("VDISK_BUILD_COMMIT") {
        (forced, String::new())
    } else if let Ok(text) = std::fs::read_to_string(&stamp) {
        // An sdist: its stamp wins over whatever repository it happens to be unpacked in.
        let mut words = text.split_whitespace();
        (words.next().unwrap_or("unknown").to_string(), words.next().unwrap_or("").to_string())
    } else if let Some((commit, date, watch)) = from_git(&dir) {
        for path in watch {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        (commit, date)
    } else {
        ("unknown".to_string(), String::new())
    };
    let described = if date.is_empty() { commit.clone() } else { format!("{commit} {date}") };
    println!("cargo:rustc-env=VDISK_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=VDISK_BUILD_DESCRIBED={described}");
}
