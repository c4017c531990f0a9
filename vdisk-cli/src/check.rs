//! `vdisk check`: walk an image's metadata; exit 0 clean, 2 corrupt, 3 leaks only.

use clap::Args as ClapArgs;
use vdisk_core::Image;

use crate::common::{OpenArgs, OutputArg};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    open: OpenArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    /// The image.
    file: std::path::PathBuf,
}

pub fn run(args: Args) -> vdisk_core::Result<u8> {
    let report = Image::check_file(&args.file, &args.open.options())?;
    match args.output {
        OutputArg::Json => outln!("{}", report.to_json()),
        OutputArg::Human => {
            for p in &report.problems {
                let label = if p.kind == "leak" { "Leaked cluster" } else { "ERROR" };
                outln!("{label}: {}", p.message);
            }
            let listed = report.problems.len() as u64;
            let total = report.corruptions + report.leaks;
            if total > listed {
                outln!("({} more problems not listed)", total - listed);
            }
            if report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0 {
                outln!("No errors were found on the image.");
            } else {
                if report.corruptions > 0 {
                    outln!("\n{} errors were found on the image.", report.corruptions);
                    outln!("Data may be corrupted, or further writes to the image may corrupt it.");
                }
                if report.leaks > 0 {
                    outln!("\n{} leaked clusters were found on the image.", report.leaks);
                    outln!("This means waste of disk space, but no harm to data.");
                }
            }
            if let (Some(alloc), Some(total)) = (report.allocated_clusters, report.total_clusters) {
                let pct = if total > 0 { alloc as f64 * 100.0 / total as f64 } else { 0.0 };
                let frag = report.fragmented_clusters.unwrap_or(0);
                let fpct = if alloc > 0 { frag as f64 * 100.0 / alloc as f64 } else { 0.0 };
                let cpct =
                    if alloc > 0 { report.compressed_clusters.unwrap_or(0) as f64 * 100.0 / alloc as f64 } else { 0.0 };
                outln!("{alloc}/{total} = {pct:.2}% allocated, {fpct:.2}% fragmented, {cpct:.2}% compressed clusters");
            }
            if let Some(end) = report.image_end_offset {
                outln!("Image end offset: {end}");
            }
        }
    }
    u8::try_from(report.exit_code()).map_err(|_| vdisk_core::Error::invalid("bad exit code"))
}
