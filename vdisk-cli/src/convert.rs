//! `vdisk convert`: write an image's guest content to a raw file or block device, or export it as
//! a qcow2, VMDK, VHD or VHDX image (`-O`, `-o`, `-c`, `--preset`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args as ClapArgs, ValueEnum};
use vdisk_core::{convert, export, ConvertOptions, ExportOptions, Image};

use crate::common::{OpenArgs, OutputArg};
use crate::progress::ProgressPrinter;

/// Target cache modes (qemu-img's `-t`): `writeback` goes through the page cache; `none` uses
/// `O_DIRECT` for aligned writes and syncs at the end; `unsafe` is accepted as `writeback`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum CacheMode {
    #[default]
    Writeback,
    None,
    Unsafe,
}

/// Output formats (qemu-img's names): raw content (`host_device` additionally requires a block
/// device), or an image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    #[default]
    Raw,
    #[value(name = "host_device")]
    HostDevice,
    Qcow2,
    Vmdk,
    /// VHD (alias vhd).
    #[value(alias = "vhd")]
    Vpc,
    Vhdx,
}

impl OutputFormat {
    /// The library's format; `None` for raw content (written by `convert`).
    pub(crate) fn image_format(self) -> Option<vdisk_core::OutputFormat> {
        match self {
            OutputFormat::Raw | OutputFormat::HostDevice => None,
            OutputFormat::Qcow2 => Some(vdisk_core::OutputFormat::Qcow2),
            OutputFormat::Vmdk => Some(vdisk_core::OutputFormat::Vmdk),
            OutputFormat::Vpc => Some(vdisk_core::OutputFormat::Vpc),
            OutputFormat::Vhdx => Some(vdisk_core::OutputFormat::Vhdx),
        }
    }
}

/// `--preset`: the platform the output is for; each picks the format and options it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PresetArg {
    /// Microsoft Azure: fixed VHD (-O vpc -o subformat=fixed), virtual size a whole MiB.
    Azure,
    /// VMware ESXi / vSphere / OVF: streamOptimized VMDK (subformat=streamOptimized,adapter_type=lsilogic).
    Esxi,
    /// Microsoft Hyper-V: dynamic VHDX (-O vhdx -o subformat=dynamic), 32 MiB blocks.
    Hyperv,
    /// Oracle Cloud: streamOptimized VMDK, or with -O qcow2 an uncompressed qcow2 v3.
    Oci,
    /// AWS VM Import: streamOptimized VMDK (subformat=streamOptimized,adapter_type=lsilogic).
    Aws,
    /// OpenStack: qcow2 v3 (-O qcow2 -o compat=1.1).
    Openstack,
}

impl From<PresetArg> for vdisk_core::Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Azure => vdisk_core::Preset::Azure,
            PresetArg::Esxi => vdisk_core::Preset::Esxi,
            PresetArg::Hyperv => vdisk_core::Preset::Hyperv,
            PresetArg::Oci => vdisk_core::Preset::Oci,
            PresetArg::Aws => vdisk_core::Preset::Aws,
            PresetArg::Openstack => vdisk_core::Preset::Openstack,
        }
    }
}

/// An image output format and its `-o` pairs.
pub(crate) type ImageOutput = (vdisk_core::OutputFormat, Vec<(String, String)>);

/// The output format and `-o` pairs from `-O`, `-o` and `--preset`: `None` for raw content.
pub(crate) fn resolve_output(
    format: Option<OutputFormat>,
    options: &[String],
    preset: Option<PresetArg>,
) -> vdisk_core::Result<Option<ImageOutput>> {
    let mut pairs = Vec::new();
    for o in options {
        pairs.extend(vdisk_core::parse_option_pairs(o)?);
    }
    let image_format = match format {
        Some(f) => match f.image_format() {
            Some(f) => Some(f),
            None if preset.is_some() => {
                return Err(vdisk_core::Error::target("--preset writes an image format, not raw content"))
            }
            None => None,
        },
        None => None,
    };
    match preset {
        Some(p) => Ok(Some(vdisk_core::Preset::from(p).resolve(image_format, &pairs)?)),
        None => match image_format {
            Some(f) => Ok(Some((f, pairs))),
            None if pairs.is_empty() => Ok(None),
            None => {
                Err(vdisk_core::Error::target("-o options need an image output format (-O qcow2, vmdk, vpc or vhdx)"))
            }
        },
    }
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    open: OpenArgs,
    /// Output format: raw (file or device, the default), host_device (block device only), or an
    /// image: qcow2, vmdk, vpc (VHD), vhdx.
    #[arg(short = 'O', value_enum, value_name = "FMT")]
    output_format: Option<OutputFormat>,
    /// Options of the output format, qemu-img's names: KEY=VALUE[,KEY=VALUE...] (compat,
    /// cluster_size, compression_type, subformat, adapter_type, hwversion, force_size, block_size,
    /// log_size, block_state_zero, preallocation). May be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2 clusters; a streamOptimized VMDK is always compressed).
    #[arg(short = 'c')]
    compress: bool,
    /// Write what a platform accepts: picks the output format and its options (-o still
    /// overrides an option).
    #[arg(long, value_enum, value_name = "PLATFORM")]
    preset: Option<PresetArg>,
    /// Do not refuse when the target's file system has less free space than `vdisk measure`
    /// computes (a compressed output is usually much smaller).
    #[arg(long)]
    no_space_check: bool,
    /// Grow the output's virtual size to the next whole MiB (the added bytes read as zero): the
    /// explicit way to meet Azure's rule, which --preset azure otherwise enforces by refusing.
    #[arg(long)]
    round_up_mib: bool,
    /// Show progress (a bar on a terminal, periodic lines otherwise).
    #[arg(short = 'p')]
    progress: bool,
    /// Target cache mode: writeback (default) or none (O_DIRECT).
    #[arg(short = 't', value_enum, default_value = "writeback", value_name = "CACHE")]
    cache: CacheMode,
    /// Use an existing target (do not create it).
    #[arg(short = 'n')]
    no_create: bool,
    /// The target already reads as zero: skip zeroing.
    #[arg(long)]
    target_is_zero: bool,
    /// Copy threads (default: every core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// Bytes per work item (tuning; default 4 MiB, at least 4 KiB).
    #[arg(long, value_name = "BYTES", hide_short_help = true)]
    item_size: Option<u64>,
    /// Print the blkhash of what was written (computed while writing; `vdisk checksum` of the
    /// target gives the same).
    #[arg(long)]
    checksum: bool,
    /// Resume journal: a rerun of the same command skips what it records as written. Never on
    /// the target.
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
    /// Discard an existing journal and convert everything again.
    #[arg(long, requires = "journal")]
    restart: bool,
    /// Report format: human (default) or json (one object on stdout at the end).
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    /// Most bytes of work between journal checkpoints (tuning; default 1 GiB).
    #[arg(long, value_name = "BYTES", hide = true)]
    checkpoint_bytes: Option<u64>,
    /// Source image.
    src: PathBuf,
    /// Target file or block device.
    dst: PathBuf,
}

/// Set by the SIGINT handler; the copy stops between work items.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Route the first SIGINT to [`INTERRUPTED`]; a second one kills the process as usual.
pub(crate) fn install_sigint_handler() {
    // SAFETY: sigaction with a zeroed struct plus a handler that only stores to an atomic, which
    // is async-signal-safe; SA_RESETHAND restores the default action after the first signal.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

pub fn run(args: Args) -> vdisk_core::Result<u8> {
    if let Some((format, options)) = resolve_output(args.output_format, &args.options, args.preset)? {
        return run_export(&args, format, options);
    }
    if args.compress {
        return Err(vdisk_core::Error::target("-c needs an image output format (-O qcow2 or vmdk)"));
    }
    if args.round_up_mib {
        return Err(vdisk_core::Error::target(
            "--round-up-mib needs an image output format (-O vpc, vhdx, qcow2 or vmdk)",
        ));
    }
    let image = Image::open(&args.src, &args.open.options())?;
    install_sigint_handler();
    let printer = args.progress.then(ProgressPrinter::new);
    let callback = |done: u64, total: u64| {
        if let Some(p) = &printer {
            p.update(done, total);
        }
    };
    let options = ConvertOptions {
        threads: args.threads.map(usize::from),
        target_is_zero: args.target_is_zero,
        must_exist: args.no_create,
        require_device: args.output_format == Some(OutputFormat::HostDevice),
        direct_io: args.cache == CacheMode::None,
        item_size: args.item_size.unwrap_or(vdisk_core::DEFAULT_ITEM_SIZE),
        progress: Some(&callback),
        cancel: Some(&INTERRUPTED),
        checksum: args.checksum,
        journal: args.journal.as_deref(),
        restart: args.restart,
        checkpoint_bytes: args.checkpoint_bytes.unwrap_or(vdisk_core::DEFAULT_CHECKPOINT_BYTES),
        ..ConvertOptions::default()
    };
    let result = convert(&image, &args.dst, &options);
    if let Some(p) = &printer {
        p.finish();
    }
    let report = result.map_err(|e| match e.kind() {
        vdisk_core::ErrorKind::Cancelled => vdisk_core::Error::new(
            vdisk_core::ErrorKind::Cancelled,
            match &args.journal {
                Some(j) => format!(
                    "interrupted; {} is left as written so far, and journal {} records it: rerun to resume",
                    args.dst.display(),
                    j.display()
                ),
                None => format!("interrupted; {} is left as written so far", args.dst.display()),
            },
        ),
        _ => e,
    })?;
    if let Some(journal) = &args.journal {
        if report.already_complete {
            eprintln!("vdisk: journal {} records this conversion as complete; nothing to do", journal.display());
        } else if report.bytes_skipped > 0 {
            eprintln!(
                "vdisk: resumed with journal {}: {} bytes were already written",
                journal.display(),
                report.bytes_skipped
            );
        }
    }
    match args.output {
        OutputArg::Human => {
            if let Some(sum) = &report.checksum {
                outln!("{sum}  {}", args.dst.display());
            }
        }
        OutputArg::Json => {
            let mut out = serde_json::json!({
                "virtual-size": report.virtual_size,
                "bytes-written": report.bytes_written,
                "bytes-zeroed": report.bytes_zeroed,
                "bytes-skipped": report.bytes_skipped,
                "seconds": report.seconds,
                "threads": report.threads,
                "target": report.target.as_str(),
                "already-complete": report.already_complete,
            });
            if let (Some(sum), Some(map)) = (&report.checksum, out.as_object_mut()) {
                map.insert("checksum".into(), sum.as_str().into());
            }
            outln!("{out}");
        }
    }
    Ok(0)
}

/// `convert -O qcow2|vmdk|vpc|vhdx`: export through the format's writer.
fn run_export(args: &Args, format: vdisk_core::OutputFormat, options: Vec<(String, String)>) -> vdisk_core::Result<u8> {
    let raw_only = [
        (args.no_create, "-n"),
        (args.target_is_zero, "--target-is-zero"),
        (args.checksum, "--checksum"),
        (args.journal.is_some(), "--journal"),
        (args.cache == CacheMode::None, "-t none"),
    ];
    if let Some((_, flag)) = raw_only.iter().find(|(set, _)| *set) {
        return Err(vdisk_core::Error::target(format!(
            "{flag} applies to raw output only, not to -O {}",
            format.as_str()
        )));
    }
    let image = Image::open(&args.src, &args.open.options())?;
    install_sigint_handler();
    let printer = args.progress.then(ProgressPrinter::new);
    let callback = |done: u64, total: u64| {
        if let Some(p) = &printer {
            p.update(done, total);
        }
    };
    let opts = ExportOptions {
        format,
        options,
        compress: args.compress,
        threads: args.threads.map(usize::from),
        progress: Some(&callback),
        cancel: Some(&INTERRUPTED),
        check_space: !args.no_space_check,
        preset: args.preset.map(vdisk_core::Preset::from),
        round_up_mib: args.round_up_mib,
        ..ExportOptions::default()
    };
    let result = export(&image, &args.dst, &opts);
    if let Some(p) = &printer {
        p.finish();
    }
    let report = result.map_err(|e| match e.kind() {
        vdisk_core::ErrorKind::Cancelled => vdisk_core::Error::new(
            vdisk_core::ErrorKind::Cancelled,
            format!("interrupted; {} was not written", args.dst.display()),
        ),
        _ => e,
    })?;
    if args.output == OutputArg::Json {
        let out = serde_json::json!({
            "virtual-size": report.virtual_size,
            "format": format.as_str(),
            "file-length": report.output_length,
            "bytes-written": report.bytes_written,
            "seconds": report.seconds,
            "threads": report.threads,
            "target": report.target.as_str(),
        });
        outln!("{out}");
    }
    Ok(0)
}
