//! Options shared by the subcommands, and human-readable sizes.

use clap::{Args, ValueEnum};
use vdisk_core::{Format, HttpOptions, Limits, OpenOptions, ReferencePolicy};

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
    /// For http:// and https:// sources: most requests in flight (and connections kept open).
    #[arg(long, value_name = "N", default_value_t = HttpOptions::DEFAULT_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub http_connections: u32,
    /// For http(s) sources: retries of a failed request (connection errors, 408, 429, 5xx).
    #[arg(long, value_name = "N", default_value_t = HttpOptions::DEFAULT_RETRIES)]
    pub http_retries: u32,
    /// For http(s) sources: idle timeout, the longest wait for the next byte (not a limit on a
    /// whole request).
    #[arg(long, value_name = "SECS", default_value_t = HttpOptions::DEFAULT_TIMEOUT.as_secs_f64(),
          value_parser = parse_seconds)]
    pub http_timeout: f64,
    /// For http(s) sources: an extra request header 'Name: value' (repeatable), for
    /// token-authenticated endpoints. Values are never printed.
    #[arg(long, value_name = "'NAME: VALUE'", value_parser = parse_header)]
    pub http_header: Vec<(String, String)>,
}

/// `--http-timeout`: positive seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds between 0 and 86400")),
    }
}

/// `--http-header 'Name: value'`. The error never repeats the value (it may be a token).
fn parse_header(s: &str) -> Result<(String, String), String> {
    let Some((name, value)) = s.split_once(':') else {
        return Err("expected 'Name: value'".to_string());
    };
    let name = name.trim();
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return Err(format!("'{name}' is not a valid header name"));
    }
    Ok((name.to_string(), value.trim().to_string()))
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
        let mut http = HttpOptions::default();
        http.connections = usize::try_from(self.http_connections).unwrap_or(HttpOptions::DEFAULT_CONNECTIONS);
        http.retries = self.http_retries;
        http.timeout = std::time::Duration::from_secs_f64(self.http_timeout);
        http.headers = self.http_header.clone();
        // Ctrl-C during a retry wait stops the wait (the copy then stops as for files).
        http.interrupted =
            Some(std::sync::Arc::new(|| crate::convert::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)));
        OpenOptions {
            format: self.format.map(Format::from),
            references: match self.references {
                ReferencesArg::Deny => ReferencePolicy::Deny,
                ReferencesArg::SameDir => ReferencePolicy::SameDir,
                ReferencesArg::Any => ReferencePolicy::Any,
            },
            limits,
            disk: self.disk,
            http,
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
