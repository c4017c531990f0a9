//! `vdisk info`: what qemu-img info prints, from the image's own metadata.

use clap::Args as ClapArgs;
use serde_json::Value;
use vdisk_core::{Image, ImageInfo};

use crate::common::{human_size, OpenArgs, OutputArg};

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
    let info = Image::describe(&args.file, &args.open.options())?;
    match args.output {
        OutputArg::Json => outln!("{}", info.to_json()),
        OutputArg::Human => {
            let text = render(&info);
            outln!("{}", text.strip_suffix('\n').unwrap_or(&text))
        }
    }
    Ok(0)
}

/// The human layout of `qemu-img info`.
fn render(info: &ImageInfo) -> String {
    let mut out = String::new();
    out += &format!("image: {}\n", info.filename);
    out += &format!("file format: {}\n", info.format);
    out += &format!("virtual size: {} ({} bytes)\n", human_size(info.virtual_size), info.virtual_size);
    if let Some(a) = info.actual_size {
        out += &format!("disk size: {}\n", human_size(a));
    }
    if let Some(c) = info.cluster_size {
        out += &format!("cluster_size: {c}\n");
    }
    if let Some(e) = info.encrypted {
        out += &format!("encrypted: {}\n", if e { "yes" } else { "no" });
    }
    if let Some(b) = &info.backing_filename {
        out += &format!("backing file: {b}");
        match &info.full_backing_filename {
            Some(full) if full != b => out += &format!(" (actual path: {full})\n"),
            _ => out += "\n",
        }
    }
    if let Some(f) = &info.backing_filename_format {
        out += &format!("backing file format: {f}\n");
    }
    if !info.snapshots.is_empty() {
        out += "Snapshot list:\n";
        out += &format!("{:<10}{:<17}{:>7}{:>20}{:>15}{:>10}\n", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
        for s in &info.snapshots {
            let clock = s.vm_clock_sec;
            let vm_clock = format!(
                "{:04}:{:02}:{:02}.{:03}",
                clock / 3600,
                clock / 60 % 60,
                clock % 60,
                s.vm_clock_nsec / 1_000_000
            );
            out += &format!(
                "{:<10}{:<17}{:>7}{:>20}{:>15}{:>10}\n",
                s.id,
                s.name,
                human_size(s.vm_state_size),
                date(s.date_sec),
                vm_clock,
                s.icount.map_or("--".to_string(), |i| i.to_string())
            );
        }
    }
    if let Some(spec) = &info.format_specific {
        out += "Format specific information:\n";
        render_value(&mut out, spec.get("data").unwrap_or(spec), 1);
    }
    out
}

/// Seconds since the epoch as `YYYY-MM-DD hh:mm:ss` (UTC).
fn date(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for the whole u64 range we care about.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

fn render_value(out: &mut String, v: &Value, indent: usize) {
    let pad = "    ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = k.replace('-', " ");
                match v {
                    Value::Object(_) | Value::Array(_) => {
                        *out += &format!("{pad}{key}:\n");
                        render_value(out, v, indent + 1);
                    }
                    other => *out += &format!("{pad}{key}: {}\n", scalar(other)),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                *out += &format!("{pad}[{i}]:\n");
                render_value(out, item, indent + 1);
            }
        }
        other => *out += &format!("{pad}{}\n", scalar(other)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_utc_civil() {
        assert_eq!(super::date(0), "1970-01-01 00:00:00");
        assert_eq!(super::date(1_700_000_000), "2023-11-14 22:13:20");
    }
}
