//! Options shared by the subcommands, and human-readable sizes.

use clap::{Args, ValueEnum};
use vdisk_core::{Format, Limits, OpenOptions, ReferencePolicy};

/// Source format names accepted by `-f` (qemu-img's, plus `vhd` for `vpc`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
    Vmdk,
    Vpc,
    Vhd,
    Vhdx,
    Vdi,
    Ova,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
            FormatArg::Vmdk => Format::Vmdk,
            FormatArg::Vpc | FormatArg::Vhd => Format::Vhd,
            FormatArg::Vhdx => Format::Vhdx,
            FormatArg::Vdi => Format::Vdi,
            FormatArg::Ova => Format::Ova,
        }
    }
}

/// `--references`.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum ReferencesArg {
    /// Open nothing the image names (default).
    #[default]
    Deny,
    /// Open relative names that resolve inside the image's directory.
    SameDir,
    /// Open any regular file the image names.
    Any,
}

/// `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    #[default]
    Human,
    Json,
}

/// How to open the source: format, reference policy, limits.
#[derive(Args, Debug, Clone)]
pub struct OpenArgs {
    /// Source format (detected from the content when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Which files the image may make vdisk open (backing files, extents, parents).
    #[arg(long, value_enum, default_value = "deny")]
    pub references: ReferencesArg,
    /// Most bytes of metadata held in memory.
    #[arg(long, value_name = "BYTES")]
    pub max_metadata_bytes: Option<u64>,
    /// Most entries in any one table.
    #[arg(long, value_name = "N")]
    pub max_table_entries: Option<u64>,
    /// Most images in a chain.
    #[arg(long, value_name = "N")]
    pub max_chain_depth: Option<u32>,
    /// Largest virtual size accepted.
    #[arg(long, value_name = "BYTES")]
    pub max_virtual_size: Option<u64>,
    /// Largest compressed cluster or grain.
    #[arg(long, value_name = "BYTES")]
    pub max_unit_bytes: Option<u64>,
    /// For an OVA: the disk to read, 1-based in the OVF's order (default: the only disk).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub disk: Option<u32>,
}

impl OpenArgs {
    pub fn options(&self) -> OpenOptions {
        let mut limits = Limits::default();
        if let Some(v) = self.max_metadata_bytes {
            limits.max_metadata_bytes = v;
        }
        if let Some(v) = self.max_table_entries {
            limits.max_table_entries = v;
        }
        if let Some(v) = self.max_chain_depth {
            limits.max_chain_depth = v;
        }
        if let Some(v) = self.max_virtual_size {
            limits.max_virtual_size = v;
        }
        if let Some(v) = self.max_unit_bytes {
            limits.max_unit_bytes = v;
        }
        OpenOptions {
            format: self.format.map(Format::from),
            references: match self.references {
                ReferencesArg::Deny => ReferencePolicy::Deny,
                ReferencesArg::SameDir => ReferencePolicy::SameDir,
                ReferencesArg::Any => ReferencePolicy::Any,
            },
            limits,
            disk: self.disk,
            ..OpenOptions::default()
        }
    }
}

/// A size the way qemu-img prints it: three significant digits and a binary unit ("4 MiB",
/// "1.5 GiB", "328 KiB"); bytes below 1 KiB as "N B".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    format!("{} {}", three_significant(value), UNITS[unit])
}

/// `%0.3g` without exponent: 1.5, 328, 12.3.
fn three_significant(v: f64) -> String {
    let digits_before = if v >= 100.0 {
        3
    } else if v >= 10.0 {
        2
    } else {
        1
    };
    let decimals = 3usize.saturating_sub(digits_before);
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_read_like_qemu() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(335872), "328 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(136365211648), "127 GiB");
        assert_eq!(human_size(263454720), "251 MiB");
    }
}
