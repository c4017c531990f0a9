//! `vdisk measure`: the size an output image needs (qemu-img measure compatible).

use std::path::PathBuf;

use clap::Args as ClapArgs;
use vdisk_core::{measure, measure_size, Image};

use crate::common::{OpenArgs, OutputArg};
use crate::convert::{resolve_output, OutputFormat, PresetArg};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    open: OpenArgs,
    /// Output format to measure for: raw, qcow2, vmdk, vpc (VHD), vhdx (default raw).
    #[arg(short = 'O', value_enum, value_name = "FMT")]
    output_format: Option<OutputFormat>,
    /// Options of the output format, qemu-img's names: KEY=VALUE[,KEY=VALUE...]. May be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure for a platform's preset (as `convert --preset`).
    #[arg(long, value_enum, value_name = "PLATFORM")]
    preset: Option<PresetArg>,
    /// Measure an empty disk of this many bytes instead of an image.
    #[arg(long, value_name = "BYTES", conflicts_with = "src")]
    size: Option<u64>,
    /// Output: human (qemu-img's lines) or json (`required`, `fully-allocated`).
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    /// Source image.
    #[arg(required_unless_present = "size")]
    src: Option<PathBuf>,
}

pub fn run(args: Args) -> vdisk_core::Result<u8> {
    let (format, options) = resolve_output(args.output_format, &args.options, args.preset)?
        .unwrap_or((vdisk_core::OutputFormat::Raw, Vec::new()));
    let m = match (&args.src, args.size) {
        (Some(src), _) => {
            let image = Image::open(src, &args.open.options())?;
            measure(&image, format, &options)?
        }
        (None, Some(size)) => measure_size(size, format, &options)?,
        (None, None) => return Err(vdisk_core::Error::target("measure needs an image or --size")),
    };
    match args.output {
        OutputArg::Human => {
            outln!("required size: {}", m.required);
            outln!("fully allocated size: {}", m.fully_allocated);
        }
        OutputArg::Json => {
            // qemu-img's layout: four-space indentation.
            outln!("{{\n    \"required\": {},\n    \"fully-allocated\": {}\n}}", m.required, m.fully_allocated);
        }
    }
    Ok(0)
}
