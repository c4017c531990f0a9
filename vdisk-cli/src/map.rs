//! `vdisk map`: the extents, in qemu-img map's layouts.

use std::io::{BufWriter, Write};

use clap::Args as ClapArgs;
use vdisk_core::{Error, ExtentKind, Image, Location};

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
    let image = Image::open(&args.file, &args.open.options())?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let io_err = |e| Error::io("writing the map", e);
    let bottom = image.chain_depth();
    if args.output == OutputArg::Json {
        let mut first = true;
        for extent in image.extents() {
            let e = extent?;
            let (depth, present, zero, data, compressed, offset) = match e.kind {
                ExtentKind::Data { layer, location: Location::File { offset, .. } } => {
                    (layer, true, false, true, false, Some(offset))
                }
                ExtentKind::Data { layer, .. } => (layer, true, false, true, true, None),
                ExtentKind::Zero { layer } => (layer, true, true, false, false, None),
                _ => (bottom, false, true, false, false, None),
            };
            let sep = if first { "[" } else { ",\n" };
            first = false;
            write!(
                out,
                "{sep}{{ \"start\": {}, \"length\": {}, \"depth\": {depth}, \"present\": {present}, \"zero\": {zero}, \"data\": {data}, \"compressed\": {compressed}",
                e.start, e.len
            )
            .map_err(io_err)?;
            if let Some(o) = offset {
                write!(out, ", \"offset\": {o}").map_err(io_err)?;
            }
            write!(out, "}}").map_err(io_err)?;
        }
        writeln!(out, "{}", if first { "[]" } else { "]" }).map_err(io_err)?;
    } else {
        // The first extent before the header: an image that cannot be mapped prints only its error.
        let mut extents = image.extents().peekable();
        if let Some(Err(_)) = extents.peek() {
            if let Some(Err(e)) = extents.next() {
                return Err(e);
            }
        }
        writeln!(out, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to").map_err(io_err)?;
        for extent in extents {
            let e = extent?;
            let ExtentKind::Data { location, .. } = e.kind else { continue };
            let (mapped, file) = match location {
                Location::File { file, offset } => (format!("{offset:#x}"), file),
                Location::Compressed(unit) => ("compressed".to_string(), unit.file),
            };
            let name = image.file_path(file).map(|p| p.display().to_string()).unwrap_or_default();
            writeln!(out, "{:<#16x}{:<#16x}{:<16}{}", e.start, e.len, mapped, name).map_err(io_err)?;
        }
    }
    out.flush().map_err(io_err)?;
    Ok(0)
}
