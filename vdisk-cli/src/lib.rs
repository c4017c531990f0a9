//! `vdisk`: inspect and convert disk images (qcow2, VMDK, VHD, VHDX, VDI, raw) and OVA archives.
//!
//! The command lives in this library so that the binary (`src/bin/vdisk.rs`) and the Python
//! package's `vdisk` command (`pip install vdisk` puts it on `PATH`) run the same code: [`run`].
//!
//! A thin command: parse arguments, call one vdisk-core function, render the result, map errors
//! to exit codes (0 success, 1 error, 2 usage; `check` also 2 corrupt and 3 leaks; `compare`
//! qemu-img's 0 identical, 1 different, 2 open, 3 map and 4 read errors; 130 when interrupted).
//! Every error is one line on stderr beginning `vdisk: `.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

/// `println!` that never panics: stdout closed early (`vdisk check IMG | head`) ends the process
/// as a SIGPIPE would (status 141) instead of panicking; another write error is one line and
/// status 1.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout_line(format_args!($($arg)*))
    };
}

mod check;
mod checksum;
mod common;
mod compare;
mod convert;
mod info;
mod map;
mod measure;
mod progress;

use std::io::Write;

use clap::{Parser, Subcommand};

/// Exit code for any error.
const EXIT_ERROR: u8 = 1;
/// Exit code for a usage error.
const EXIT_USAGE: u8 = 2;
/// Exit status when stdout is closed early: what a shell reports for SIGPIPE (128 + 13).
const EXIT_BROKEN_PIPE: i32 = 141;
/// Exit code when interrupted by SIGINT (128 + 2, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// `vdisk --version`: the package version, the commit it was built from and its date.
pub const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("VDISK_BUILD_DESCRIBED"), ")");

/// The commit this build comes from (12 hex digits, `-dirty` when the tree differed), or `unknown`.
pub const BUILD_COMMIT: &str = env!("VDISK_BUILD_COMMIT");

#[derive(Parser, Debug)]
#[command(
    name = "vdisk",
    version = LONG_VERSION,
    about = "Inspect and convert qcow2, VMDK, VHD, VHDX, VDI and raw disk images, and the disks of OVA archives"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Describe an image (qemu-img info compatible).
    Info(info::Args),
    /// Show how the virtual disk maps to stored data (qemu-img map compatible).
    Map(map::Args),
    /// Write the guest content to a raw file or block device, or export it as a qcow2, VMDK,
    /// VHD or VHDX image (qemu-img convert compatible).
    Convert(convert::Args),
    /// The size an output image needs (qemu-img measure compatible).
    Measure(measure::Args),
    /// Check an image's metadata for corruptions and leaks (qemu-img check compatible).
    Check(check::Args),
    /// Print a digest of each image's guest content, the same for every format (blkhash).
    Checksum(checksum::Args),
    /// Compare the guest content of two images (qemu-img compare compatible).
    Compare(compare::Args),
}

/// Write one line to stdout for [`outln!`].
pub(crate) fn write_stdout_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        let _ = writeln!(std::io::stderr(), "vdisk: writing to stdout: {e}");
        std::process::exit(i32::from(EXIT_ERROR));
    }
}

/// Run `vdisk` with `args` (the program name first) and return its exit status. The binary and
/// the Python package's `vdisk` command both come here.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let code = run_inner(args);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    code
}

fn run_inner<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return EXIT_USAGE;
            }
            let text = e.to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            eprintln!("vdisk: {first} (see 'vdisk --help')");
            return EXIT_USAGE;
        }
    };
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Map(a) => map::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Check(a) => check::run(a),
        Command::Checksum(a) => checksum::run(a),
        Command::Compare(a) => compare::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("vdisk: {e}");
            // An error after Ctrl-C (a remote read whose retry wait it cut short) is the interrupt.
            if e.kind() == vdisk_core::ErrorKind::Cancelled
                || convert::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
            {
                EXIT_INTERRUPTED
            } else {
                EXIT_ERROR
            }
        }
    }
}
