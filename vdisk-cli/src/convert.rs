//! `vdisk convert`: write an image's guest content to a raw file or block device.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args as ClapArgs, ValueEnum};
use vdisk_core::{convert, ConvertOptions, Image};

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

/// Output formats: vdisk writes raw content; `host_device` additionally requires a block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    #[default]
    Raw,
    #[value(name = "host_device")]
    HostDevice,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    open: OpenArgs,
    /// Output format: raw (file or device) or host_device (block device only).
    #[arg(short = 'O', value_enum, default_value = "raw", value_name = "FMT")]
    output_format: OutputFormat,
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
        require_device: args.output_format == OutputFormat::HostDevice,
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
                println!("{sum}  {}", args.dst.display());
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
            println!("{out}");
        }
    }
    Ok(0)
}
