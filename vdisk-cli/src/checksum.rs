//! `vdisk checksum`: a digest of each image's guest content, printed like `sha256sum`.

use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, ValueEnum};
use vdisk_core::{checksum, ChecksumAlgorithm, ChecksumOptions, Image};

use crate::common::{OpenArgs, OutputArg};
use crate::convert::{install_sigint_handler, INTERRUPTED};
use crate::progress::ProgressPrinter;

/// `-a`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum AlgorithmArg {
    /// blkhash (SHA-256, 64 KiB blocks): what blksum and `nbdcopy --blkhash` print.
    #[default]
    Blkhash,
    /// The plain SHA-256 of the content (what sha256sum prints for the raw image).
    Sha256,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    open: OpenArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    /// Algorithm.
    #[arg(short = 'a', long = "algorithm", value_enum, default_value = "blkhash")]
    algorithm: AlgorithmArg,
    /// Hash only the first BYTES bytes (an image's virtual size, on a larger device).
    #[arg(long, value_name = "BYTES")]
    size: Option<u64>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Threads (default: every core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// Images, raw files or block devices.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn run(args: Args) -> vdisk_core::Result<u8> {
    install_sigint_handler();
    let algorithm = match args.algorithm {
        AlgorithmArg::Blkhash => ChecksumAlgorithm::Blkhash,
        AlgorithmArg::Sha256 => ChecksumAlgorithm::Sha256,
    };
    let mut failed = false;
    for file in &args.files {
        let printer = args.progress.then(ProgressPrinter::new);
        let callback = |done: u64, total: u64| {
            if let Some(p) = &printer {
                p.update(done, total);
            }
        };
        let options = ChecksumOptions {
            algorithm,
            size: args.size,
            threads: args.threads.map(usize::from),
            progress: Some(&callback),
            cancel: Some(&INTERRUPTED),
            ..ChecksumOptions::default()
        };
        // A URL is shown with its secrets (query string, OCI token) replaced by `...`.
        let shown = vdisk_core::redact_url(&file.display().to_string());
        let result = Image::open(file, &args.open.options()).and_then(|image| {
            checksum(&image, &options).map(|sum| (image.format(), sum)).map_err(|e| e.in_file(Path::new(&shown)))
        });
        if let Some(p) = &printer {
            p.finish();
        }
        match result {
            Ok((format, sum)) => match args.output {
                OutputArg::Human => outln!("{}  {shown}", sum.digest),
                OutputArg::Json => outln!(
                    "{}",
                    serde_json::json!({
                        "filename": shown,
                        "format": format.as_str(),
                        "algorithm": sum.algorithm.as_str(),
                        "block-size": sum.algorithm.block_size(),
                        "virtual-size": sum.size,
                        "digest": sum.digest,
                    })
                ),
            },
            Err(e) if e.kind() == vdisk_core::ErrorKind::Cancelled => return Err(e),
            Err(e) => {
                eprintln!("vdisk: {e}");
                failed = true;
            }
        }
    }
    Ok(u8::from(failed))
}
