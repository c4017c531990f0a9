//! `vdisk compare`: qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 cannot open, 3 cannot map, 4 cannot read), reporting the exact first differing byte.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use vdisk_core::{compare, CompareOptions, CompareStage, Difference, ErrorKind, Image};

use crate::common::{FormatArg, OpenArgs, OutputArg};
use crate::convert::{install_sigint_handler, INTERRUPTED};
use crate::progress::ProgressPrinter;

/// Exit code when the images differ.
const EXIT_DIFFERENT: u8 = 1;
/// Exit code when an image cannot be opened.
const EXIT_OPEN: u8 = 2;
/// Exit code when an image's allocation cannot be mapped.
const EXIT_MAP: u8 = 3;
/// Exit code when an image cannot be read.
const EXIT_READ: u8 = 4;
/// Exit code when interrupted by SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// `-f` is the first image's format; the other options apply to both.
    #[command(flatten)]
    open: OpenArgs,
    /// Format of the second image (detected from the content when omitted).
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    b_format: Option<FormatArg>,
    /// Strict: different sizes, or a different allocation at the same offset, are a difference.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Print nothing; the exit code says the result.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    /// Threads (default: every core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

pub fn run(args: Args) -> vdisk_core::Result<u8> {
    let options_a = args.open.options();
    let mut options_b = options_a.clone();
    options_b.format = args.b_format.map(Into::into);
    let open = |path: &PathBuf, options| Image::open(path, options);
    let (a, b) = match (open(&args.a, &options_a), open(&args.b, &options_b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vdisk: {e}");
            return Ok(EXIT_OPEN);
        }
    };
    install_sigint_handler();
    let printer = (args.progress && !args.quiet).then(ProgressPrinter::new);
    let callback = |done: u64, total: u64| {
        if let Some(p) = &printer {
            p.update(done, total);
        }
    };
    let options = CompareOptions {
        strict: args.strict,
        threads: args.threads.map(usize::from),
        progress: Some(&callback),
        cancel: Some(&INTERRUPTED),
        ..CompareOptions::default()
    };
    // URLs are shown with their secrets replaced by `...`.
    let shown = |p: &PathBuf| vdisk_core::redact_url(&p.display().to_string());
    let (name_a, name_b) = (shown(&args.a), shown(&args.b));
    let result = compare(&a, &b, (&name_a, &name_b), &options);
    if let Some(p) = &printer {
        p.finish();
    }
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vdisk: {e}");
            return Ok(match (e.error.kind(), e.stage) {
                (ErrorKind::Cancelled, _) => EXIT_INTERRUPTED,
                (_, CompareStage::Allocation) => EXIT_MAP,
                _ => EXIT_READ,
            });
        }
    };
    if !args.quiet {
        match args.output {
            OutputArg::Human => result.qemu_lines().iter().for_each(|l| outln!("{l}")),
            OutputArg::Json => {
                let (kind, offset) = match result.difference {
                    None => ("identical", None),
                    Some(Difference::Content { offset }) => ("content-mismatch", Some(offset)),
                    Some(Difference::Size) => ("size-mismatch", None),
                    Some(Difference::Allocation { offset }) => ("allocation-mismatch", Some(offset)),
                    Some(_) => ("different", None),
                };
                outln!(
                    "{}",
                    serde_json::json!({
                        "identical": result.identical(),
                        "result": kind,
                        "offset": offset,
                        "size-a": result.size_a,
                        "size-b": result.size_b,
                        "size-mismatch": result.size_a != result.size_b,
                        "bytes-read": result.bytes_read,
                        "seconds": result.seconds,
                    })
                );
            }
        }
    }
    Ok(if result.identical() { 0 } else { EXIT_DIFFERENT })
}
