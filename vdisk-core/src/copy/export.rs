//! Exporting an image to another image format (qcow2, VMDK, VHD, VHDX): parse the `-o` options
//! (or a platform preset), check the space, write through the format's [`FormatWriter`] under a
//! temporary name in the target's directory, and rename it into place once synced.
//!
//! Work items are aligned to the writer's [`FormatWriter::alignment`] and run on a pool owned by
//! the call. An unordered writer gets them in any order; an ordered one (a VMDK stream) gets them
//! handed out in ascending order, so at most one item per thread is in flight: the workers
//! compress in parallel and the writer appends them in order.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::engine::{Counters, Reporting};
use super::plan::{WorkItem, MAX_ZERO_ITEM};
use super::sink::Writeback;
use super::writer::{option_error, FormatWriter, Measure};
use super::{ConvertReport, TargetKind, DEFAULT_ITEM_SIZE, DEFAULT_PROGRESS_INTERVAL, MAX_THREADS};
use crate::decompress::ReadScratch;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::Extent;
use crate::formats::qcow2::write as qcow2;
use crate::formats::vhd::write as vhd;
use crate::formats::vhdx::write as vhdx;
use crate::formats::vmdk::write as vmdk;
use crate::image::Image;

/// An output format (`-O`), by qemu-img's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OutputFormat {
    /// Raw content (`raw`; written by [`crate::convert`]).
    Raw,
    /// qcow2 (`qcow2`).
    Qcow2,
    /// VMDK (`vmdk`).
    Vmdk,
    /// VHD (`vpc`).
    Vpc,
    /// VHDX (`vhdx`).
    Vhdx,
}

impl OutputFormat {
    /// Every output format.
    pub const ALL: [OutputFormat; 5] =
        [OutputFormat::Raw, OutputFormat::Qcow2, OutputFormat::Vmdk, OutputFormat::Vpc, OutputFormat::Vhdx];

    /// qemu-img's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Raw => "raw",
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Vmdk => "vmdk",
            OutputFormat::Vpc => "vpc",
            OutputFormat::Vhdx => "vhdx",
        }
    }

    /// The format named `name` (qemu-img's names; `vhd` for `vpc`).
    pub fn from_name(name: &str) -> Result<OutputFormat> {
        match name {
            "raw" => Ok(OutputFormat::Raw),
            "qcow2" => Ok(OutputFormat::Qcow2),
            "vmdk" => Ok(OutputFormat::Vmdk),
            "vpc" | "vhd" => Ok(OutputFormat::Vpc),
            "vhdx" => Ok(OutputFormat::Vhdx),
            _ => Err(option_error(format!("unknown output format {name:?} (raw, qcow2, vmdk, vpc, vhdx)"))),
        }
    }
}

/// A platform an export is meant for: one word that picks the format and options it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Preset {
    /// Microsoft Azure: a fixed VHD whose virtual size is a whole MiB.
    Azure,
    /// VMware ESXi / vSphere / OVF: a streamOptimized VMDK.
    Esxi,
    /// Microsoft Hyper-V: a dynamic VHDX.
    Hyperv,
    /// Oracle Cloud (OCI): a streamOptimized VMDK, or with `-O qcow2` an uncompressed qcow2 v3.
    Oci,
    /// AWS VM Import: a streamOptimized VMDK.
    Aws,
    /// OpenStack: a qcow2 v3.
    Openstack,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 6] =
        [Preset::Azure, Preset::Esxi, Preset::Hyperv, Preset::Oci, Preset::Aws, Preset::Openstack];

    /// Its name (`--preset NAME`).
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Azure => "azure",
            Preset::Esxi => "esxi",
            Preset::Hyperv => "hyperv",
            Preset::Oci => "oci",
            Preset::Aws => "aws",
            Preset::Openstack => "openstack",
        }
    }

    /// The preset named `name`.
    pub fn from_name(name: &str) -> Result<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| option_error(format!("unknown preset {name:?} (azure, esxi, hyperv, oci, aws, openstack)")))
    }

    /// One line saying what the preset writes.
    pub fn describe(self) -> &'static str {
        match self {
            Preset::Azure => "fixed VHD (-O vpc -o subformat=fixed), virtual size a whole MiB",
            Preset::Esxi => "streamOptimized VMDK (-O vmdk -o subformat=streamOptimized,adapter_type=lsilogic)",
            Preset::Hyperv => "dynamic VHDX (-O vhdx -o subformat=dynamic), 32 MiB blocks",
            Preset::Oci => "streamOptimized VMDK, or with -O qcow2 an uncompressed qcow2 v3",
            Preset::Aws => "streamOptimized VMDK (-O vmdk -o subformat=streamOptimized,adapter_type=lsilogic)",
            Preset::Openstack => "qcow2 v3 (-O qcow2 -o compat=1.1)",
        }
    }

    /// The formats the preset allows: the first is its default.
    fn formats(self) -> &'static [OutputFormat] {
        match self {
            Preset::Azure => &[OutputFormat::Vpc],
            Preset::Esxi | Preset::Aws => &[OutputFormat::Vmdk],
            Preset::Hyperv => &[OutputFormat::Vhdx],
            Preset::Oci => &[OutputFormat::Vmdk, OutputFormat::Qcow2],
            Preset::Openstack => &[OutputFormat::Qcow2],
        }
    }

    /// The options the preset sets for `format` (the caller's `-o` pairs come after and win).
    fn options(self, format: OutputFormat) -> &'static [(&'static str, &'static str)] {
        match (self, format) {
            (Preset::Azure, _) => &[("subformat", "fixed")],
            (Preset::Esxi | Preset::Aws | Preset::Oci, OutputFormat::Vmdk) => {
                &[("subformat", "streamOptimized"), ("adapter_type", "lsilogic")]
            }
            (Preset::Hyperv, _) => &[("subformat", "dynamic")],
            (Preset::Oci | Preset::Openstack, OutputFormat::Qcow2) => &[("compat", "1.1")],
            _ => &[],
        }
    }

    /// Resolve the preset against an explicit `-O` (if any) and `-o` pairs: the format, and the
    /// preset's options followed by the caller's.
    pub fn resolve(
        self,
        format: Option<OutputFormat>,
        pairs: &[(String, String)],
    ) -> Result<(OutputFormat, Vec<(String, String)>)> {
        let allowed = self.formats();
        let format = match format {
            None => allowed[0],
            Some(f) if allowed.contains(&f) => f,
            Some(f) => {
                let names: Vec<&str> = allowed.iter().map(|f| f.as_str()).collect();
                return Err(option_error(format!(
                    "--preset {} writes {}, not {}",
                    self.as_str(),
                    names.join(" or "),
                    f.as_str()
                )));
            }
        };
        let mut all: Vec<(String, String)> =
            self.options(format).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        all.extend(pairs.iter().cloned());
        Ok((format, all))
    }
}

/// Split qemu-img's `-o KEY=VALUE[,KEY=VALUE...]` into pairs (`,,` is a literal comma).
pub fn parse_option_pairs(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(option_error(format!("invalid option {item:?}: expected KEY=VALUE")));
        };
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// The parsed options of one output format: the dispatch to the format writers.
#[derive(Clone, Debug)]
enum Writer {
    Qcow2(qcow2::Qcow2Options),
    Vmdk(vmdk::VmdkOptions),
    Vpc(vhd::VhdOptions),
    Vhdx(vhdx::VhdxOptions),
}

impl Writer {
    fn parse(format: OutputFormat, pairs: &[(String, String)], compress: bool) -> Result<Writer> {
        let no_compression =
            || option_error(format!("-c (compression) is not supported by the {} output format", format.as_str()));
        match format {
            OutputFormat::Qcow2 => {
                let mut o = qcow2::Qcow2Options::from_pairs(pairs)?;
                o.compress = compress;
                Ok(Writer::Qcow2(o))
            }
            OutputFormat::Vmdk => {
                let o = vmdk::VmdkOptions::from_pairs(pairs)?;
                if compress && !o.compresses() {
                    return Err(option_error(
                        "-c (compression) needs subformat=streamOptimized for vmdk (other VMDK subformats store grains as they are)",
                    ));
                }
                Ok(Writer::Vmdk(o))
            }
            OutputFormat::Raw => Err(option_error("raw output is written by convert, not export")),
            OutputFormat::Vpc | OutputFormat::Vhdx if compress => Err(no_compression()),
            OutputFormat::Vpc => Ok(Writer::Vpc(vhd::VhdOptions::from_pairs(pairs)?)),
            OutputFormat::Vhdx => Ok(Writer::Vhdx(vhdx::VhdxOptions::from_pairs(pairs)?)),
        }
    }

    fn create(&self, file: File, size: u64) -> Result<Box<dyn FormatWriter>> {
        match self {
            Writer::Qcow2(o) => qcow2::create(file, size, o),
            Writer::Vmdk(o) => vmdk::create(file, size, o),
            Writer::Vpc(o) => vhd::create(file, size, o),
            Writer::Vhdx(o) => vhdx::create(file, size, o),
        }
    }

    fn measure(&self, size: u64, allocated: &super::writer::Allocated<'_>) -> Result<Measure> {
        match self {
            Writer::Qcow2(o) => qcow2::measure(size, allocated, o),
            Writer::Vmdk(o) => vmdk::measure(size, allocated, o),
            Writer::Vpc(o) => vhd::measure(size, allocated, o),
            Writer::Vhdx(o) => vhdx::measure(size, allocated, o),
        }
    }

    /// Tell the writer the output's file name (a VMDK descriptor names its extent).
    fn set_file_name(&mut self, name: &str) {
        if let Writer::Vmdk(o) = self {
            o.file_name = name.to_string();
        }
    }
}

/// How to export.
#[derive(Clone)]
pub struct ExportOptions<'a> {
    /// The output format (`-O`).
    pub format: OutputFormat,
    /// qemu-img's `-o` pairs for that format (after a preset's, see [`Preset::resolve`]).
    pub options: Vec<(String, String)>,
    /// Compress (`-c`): qcow2 clusters; a streamOptimized VMDK is compressed anyway.
    pub compress: bool,
    /// Threads; `None` uses every available core.
    pub threads: Option<usize>,
    /// Called from the calling thread with (done, total) at most every `progress_interval`, and
    /// once with done == total at the end.
    pub progress: Option<super::Progress<'a>>,
    /// Interval between progress callbacks.
    pub progress_interval: Duration,
    /// Set to true (from any thread) to stop between work items; nothing is left at the target.
    pub cancel: Option<&'a AtomicBool>,
    /// Refuse up front when the target's file system has less free space than
    /// [`measure`] says the output needs.
    pub check_space: bool,
    /// The platform preset the format and options came from (see [`Preset::resolve`]): it adds
    /// the platform's own checks (Azure: the virtual size must be a whole MiB).
    pub preset: Option<Preset>,
    /// Grow the output's virtual size to the next whole MiB (`--round-up-mib`; the added bytes
    /// read as zero), the explicit way to meet Azure's rule. It moves the disk's last sector, so
    /// a GPT backup header is no longer at the end.
    pub round_up_mib: bool,
}

impl Default for ExportOptions<'_> {
    fn default() -> Self {
        ExportOptions {
            format: OutputFormat::Qcow2,
            options: Vec::new(),
            compress: false,
            threads: None,
            progress: None,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            cancel: None,
            check_space: true,
            preset: None,
            round_up_mib: false,
        }
    }
}

impl std::fmt::Debug for ExportOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportOptions")
            .field("format", &self.format)
            .field("options", &self.options)
            .field("compress", &self.compress)
            .field("threads", &self.threads)
            .field("progress", &self.progress.is_some())
            .field("check_space", &self.check_space)
            .field("preset", &self.preset)
            .field("round_up_mib", &self.round_up_mib)
            .finish()
    }
}

/// What `qemu-img measure -O FORMAT -o OPTIONS` reports for `image`: the bytes the output needs
/// for this content (`required`) and with every block allocated (`fully_allocated`). Without
/// compression: a compressed output is smaller.
pub fn measure(image: &Image, format: OutputFormat, options: &[(String, String)]) -> Result<Measure> {
    let size = image.virtual_size();
    if format == OutputFormat::Raw {
        return Ok(Measure { required: size, fully_allocated: size });
    }
    let writer = Writer::parse(format, options, false)?;
    let allocated = |unit: u64| allocated_units(image, unit);
    writer.measure(size, &allocated)
}

/// [`measure`] for an empty disk of `size` bytes (`qemu-img measure --size`).
pub fn measure_size(size: u64, format: OutputFormat, options: &[(String, String)]) -> Result<Measure> {
    if format == OutputFormat::Raw {
        return Ok(Measure { required: size, fully_allocated: size });
    }
    let writer = Writer::parse(format, options, false)?;
    writer.measure(size, &|_| Ok(0))
}

/// How many `unit`-aligned pieces of the disk hold data.
fn allocated_units(image: &Image, unit: u64) -> Result<u64> {
    if unit == 0 || !unit.is_power_of_two() {
        return Err(Error::invalid("internal error: measure unit is not a power of two"));
    }
    let mut count = 0u64;
    let mut last: Option<u64> = None;
    for e in image.extents() {
        let e = e?;
        if !e.kind.is_data() || e.len == 0 {
            continue;
        }
        let first = e.start / unit;
        let end = (e.end() - 1) / unit;
        let first = match last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if first <= end {
            count += end - first + 1;
        }
        last = Some(end);
    }
    Ok(count)
}

/// Export `image` to `target` in the format and options of `options`.
///
/// The output is written to a temporary file (`.NAME.vdisk-tmp-XXXXXXXX`) in the target's
/// directory, synced, and renamed over `target` at the end, so a failed, cancelled or killed
/// export never leaves a partial image under the target's name (a killed one may leave the
/// hidden temporary file). An existing target is replaced only at that rename; a block device is
/// refused (formats are files: use [`crate::convert`] for raw content on a device).
pub fn export(image: &Image, target: impl AsRef<Path>, options: &ExportOptions<'_>) -> Result<ConvertReport> {
    let target = target.as_ref();
    let started = Instant::now();
    image.require_selected_disk()?;
    if image.sequential().is_some() {
        return Err(Error::unsupported(
            "this disk can only be read front to back (a compressed OVA member); convert it to raw first",
        ));
    }
    let size = output_size(image.virtual_size(), options)?;
    let mut writer_options = Writer::parse(options.format, &options.options, options.compress)?;
    let shown = target.display();
    match std::fs::metadata(target) {
        Ok(meta) => {
            let sources: Vec<(u64, u64)> = image.file_ids().collect();
            if sources.contains(&(meta.dev(), meta.ino())) {
                return Err(Error::target(format!("target {shown} is the source image (or one of its files)")));
            }
            if !meta.is_file() {
                return Err(Error::target(format!(
                    "target {shown} is not a regular file; {} output is written to a file (use -O raw or host_device for a device)",
                    options.format.as_str()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot open target {shown}"), e)),
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| Error::target(format!("target {shown} does not name a file")))?
        .to_string_lossy()
        .into_owned();
    writer_options.set_file_name(&name);
    // A descriptor-plus-data output also replaces NAME-flat.vmdk: never a source file.
    if let Ok(meta) = std::fs::metadata(dir.join(data_file_name(&name))) {
        if image.file_ids().any(|id| id == (meta.dev(), meta.ino())) {
            return Err(Error::target(format!(
                "the output's data file {} would replace a file of the source image",
                data_file_name(&name)
            )));
        }
    }
    if options.check_space {
        let need = writer_options.measure(size, &|unit| allocated_units(image, unit))?.required;
        if let Some(free) = free_space(&dir) {
            if free < need {
                return Err(Error::target(format!(
                    "the file system of {} has {free} bytes free, and the {} output may need {need} (vdisk measure)",
                    dir.display(),
                    options.format.as_str()
                )));
            }
        }
    }
    let (temp, file) = create_temp(&dir, &name)?;
    let guard = TempGuard(Some(temp.clone()));
    // A second handle on the output, for starting writeback while the export runs: the output
    // is synced before the rename, and the sync then waits only for the last items.
    let early = file.try_clone().ok();
    let writer = writer_options.create(file, size)?;
    let threads = options.threads.unwrap_or_else(|| image.default_threads()).clamp(1, MAX_THREADS);
    let counters = Counters::default();
    let reporting =
        Reporting { progress: options.progress, cancel: options.cancel, interval: options.progress_interval };
    execute(image, size, writer.as_ref(), threads, &counters, &reporting, early.as_ref())?;
    let length = writer.finish()?;
    let data_name = data_file_name(&name);
    match writer.descriptor(&data_name) {
        None => {
            std::fs::rename(&temp, target).map_err(|e| Error::io(format!("renaming the output to {shown}"), e))?;
            guard.disarm();
        }
        Some(text) => {
            // The data file goes beside the target, then the descriptor that names it.
            let data_path = dir.join(&data_name);
            let (desc_temp, desc_file) = create_temp(&dir, &name)?;
            let desc_guard = TempGuard(Some(desc_temp.clone()));
            desc_file
                .write_all_at(text.as_bytes(), 0)
                .and_then(|()| desc_file.sync_all())
                .map_err(|e| Error::io(format!("writing the descriptor {}", desc_temp.display()), e))?;
            std::fs::rename(&temp, &data_path)
                .map_err(|e| Error::io(format!("renaming the output to {}", data_path.display()), e))?;
            guard.disarm();
            std::fs::rename(&desc_temp, target).map_err(|e| Error::io(format!("renaming the output to {shown}"), e))?;
            desc_guard.disarm();
        }
    }
    if let Ok(d) = File::open(&dir) {
        // The rename is durable once the directory is; a failure here loses nothing written.
        let _ = d.sync_all();
    }
    Ok(ConvertReport {
        virtual_size: size,
        bytes_written: counters.written.load(Relaxed),
        bytes_zeroed: 0,
        seconds: started.elapsed().as_secs_f64(),
        threads,
        target: TargetKind::NewFile,
        bytes_skipped: 0,
        checksum: None,
        already_complete: false,
        output_length: Some(length),
    })
}

/// The data file of a descriptor-plus-data output: `NAME-flat.vmdk` for `NAME.vmdk` (VMware's
/// naming), `NAME-flat` otherwise.
fn data_file_name(name: &str) -> String {
    match name.strip_suffix(".vmdk") {
        Some(stem) if !stem.is_empty() => format!("{stem}-flat.vmdk"),
        _ => format!("{name}-flat"),
    }
}

/// Bytes in a MiB, Azure's unit of virtual size.
const MIB: u64 = 1 << 20;

/// The output's virtual size: the image's, grown to a whole MiB on request; refused when the
/// preset's platform would refuse it.
fn output_size(size: u64, options: &ExportOptions<'_>) -> Result<u64> {
    let size = if options.round_up_mib {
        size.checked_next_multiple_of(MIB).ok_or_else(|| Error::target("the virtual size cannot be rounded up"))?
    } else {
        size
    };
    if options.preset == Some(Preset::Azure) && size % MIB != 0 {
        let up = size.div_ceil(MIB) * MIB;
        return Err(Error::target(format!(
            "the virtual size {size} is not a whole MiB, which Azure requires; --round-up-mib grows the disk to {up} bytes (the added bytes read as zero; a GPT backup header then no longer sits in the last sector)"
        )));
    }
    Ok(size)
}

/// Free bytes for an unprivileged writer on the file system holding `dir` (`None` when unknown).
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for the call to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a live, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    avail.checked_mul(frsize)
}

/// A random 64-bit value (std's per-process random hash keys, mixed with the time).
pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish()
}

/// Create `.NAME.vdisk-tmp-XXXXXXXX` in `dir`.
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..16 {
        let path = dir.join(format!(".{name}.vdisk-tmp-{:08x}", random_u64() & 0xffff_ffff));
        match OpenOptions::new().read(true).write(true).create_new(true).mode(0o644).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(Error::io(format!("cannot create a temporary file in {}", dir.display()), e)),
        }
    }
    Err(Error::io(
        format!("cannot create a temporary file in {}", dir.display()),
        last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AlreadyExists)),
    ))
}

/// Removes the temporary output unless disarmed.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Work items aligned to `align`: windows of `item` bytes (a multiple of `align`) that hold any
/// data become data items covering the whole window; runs of windows without data become zero
/// items of at most [`MAX_ZERO_ITEM`] bytes. Every boundary is a multiple of `item` (the last
/// item ends at the disk's end).
struct AlignedPlanner<I> {
    extents: I,
    size: u64,
    item: u64,
    pos: u64,
    /// The extent not yet consumed past `pos`.
    carry: Option<Extent>,
    failed: bool,
}

impl<I: Iterator<Item = Result<Extent>>> AlignedPlanner<I> {
    fn new(extents: I, size: u64, item: u64) -> Self {
        AlignedPlanner { extents, size, item, pos: 0, carry: None, failed: false }
    }

    fn next_extent(&mut self) -> Result<Option<Extent>> {
        if let Some(e) = self.carry.take() {
            return Ok(Some(e));
        }
        loop {
            match self.extents.next() {
                Some(Ok(e)) if e.len == 0 || e.end() <= self.pos => continue,
                Some(Ok(e)) => return Ok(Some(e)),
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    fn plan_next(&mut self) -> Result<Option<WorkItem>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let start = self.pos;
        let window_end = (start + self.item).min(self.size);
        let mut pieces = Vec::new();
        let mut has_data = false;
        while let Some(e) = self.next_extent()? {
            if e.start >= window_end {
                self.carry = Some(e);
                break;
            }
            if let Some(piece) = e.clip(start.max(e.start), window_end) {
                has_data |= piece.kind.is_data();
                pieces.push(piece);
            }
            if e.end() > window_end {
                self.carry = Some(e);
                break;
            }
        }
        if has_data {
            self.pos = window_end;
            return Ok(Some(WorkItem::Data { start, len: window_end - start, pieces }));
        }
        // No data here: extend over the following windows the current zero extent covers.
        let mut end = window_end;
        if let Some(e) = &self.carry {
            if !e.kind.is_data() && e.start <= window_end {
                let reach = if e.end() >= self.size { self.size } else { e.end() / self.item * self.item };
                end = end.max(reach);
            }
        }
        let end = end.min(start + MAX_ZERO_ITEM);
        self.pos = end;
        Ok(Some(WorkItem::Zero { start, len: end - start }))
    }
}

impl<I: Iterator<Item = Result<Extent>>> Iterator for AlignedPlanner<I> {
    type Item = Result<WorkItem>;

    fn next(&mut self) -> Option<Result<WorkItem>> {
        if self.failed {
            return None;
        }
        match self.plan_next() {
            Ok(item) => item.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Work item size for an ordered writer: a worker that finished item k+1 waits for item k
/// before appending, so smaller items keep that wait (and the reorder window, threads x item)
/// short.
const ORDERED_ITEM_SIZE: u64 = 1 << 20;

/// The work item size for `writer`.
fn item_size(writer: &dyn FormatWriter) -> u64 {
    let base = if writer.ordered() { ORDERED_ITEM_SIZE } else { DEFAULT_ITEM_SIZE };
    base.max(writer.alignment())
}

/// Run every work item of `image` through `writer` on `threads` threads, reporting progress and
/// watching for cancellation on the calling thread. `total` is the output's virtual size: at
/// least the image's (beyond it, zero items).
fn execute(
    image: &Image,
    total: u64,
    writer: &dyn FormatWriter,
    threads: usize,
    counters: &Counters,
    reporting: &Reporting<'_>,
    output: Option<&File>,
) -> Result<()> {
    let align = writer.alignment();
    if !align.is_power_of_two() || align < 512 {
        return Err(Error::invalid("internal error: writer alignment is not a power of two of at least 512"));
    }
    let item = item_size(writer);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        let mut first = first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
        drop(first);
        stop.store(true, Relaxed);
        writer.abort();
    };
    // Workers pull items one at a time from the planner under a lock, so items are handed out
    // in ascending order (what an ordered writer needs) and each worker holds at most one.
    let items = Mutex::new(AlignedPlanner::new(image.extents(), total, item));
    let writeback = Writeback::default();
    // An uncompressed writer's work is its pwrite, and the kernel lets one buffered write into a
    // file proceed at a time (ext4 takes the inode lock for each): waiting for that turn here
    // puts the other threads to sleep instead of spinning on the kernel lock, which on two
    // cores cost up to 1 s of CPU per 0.5 GiB and made the export 2-4 times slower in some runs
    // (benches/RESULTS.md, "Export"). A compressing writer runs unserialised, and so does an
    // ordered one (a thread waiting in `write` for an earlier item must not hold the turn).
    let turn = (!writer.compresses() && !writer.ordered()).then(|| Mutex::new(()));
    let worker = || {
        let mut buf = Vec::new();
        let mut scratch = ReadScratch::default();
        loop {
            if reporting.cancel.is_some_and(|c| c.load(Relaxed)) {
                stop.store(true, Relaxed);
            }
            if stop.load(Relaxed) {
                break;
            }
            let next = items.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
            let Some(next) = next else { break };
            if let Err(e) =
                next.and_then(|item| run_item(image, writer, turn.as_ref(), item, &mut buf, &mut scratch, counters))
            {
                fail(e);
                break;
            }
            if let Some(file) = output {
                writeback.poll(file, counters.written.load(Relaxed));
            }
        }
    };
    let run = || -> Result<()> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| std::thread::Builder::new().name(format!("vdisk-export-{i}")).spawn_scoped(s, worker))
                .collect();
            let mut result = Ok(());
            for h in handles {
                match h {
                    Ok(h) => {
                        if h.join().is_err() {
                            result = Err(Error::new(ErrorKind::Io, "an export thread panicked"));
                        }
                    }
                    Err(e) => {
                        stop.store(true, Relaxed);
                        writer.abort();
                        result = Err(Error::io("cannot start export threads", e));
                    }
                }
            }
            result
        })?;
        if stop.load(Relaxed) {
            return Err(Error::new(ErrorKind::Cancelled, "the export was cancelled"));
        }
        Ok(())
    };
    let result = std::thread::scope(|s| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let handle = s.spawn(move || {
            let r = run();
            let _ = done_tx.send(());
            r
        });
        let mut last = Instant::now();
        let tick = reporting.interval.min(Duration::from_millis(50)).max(Duration::from_millis(1));
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(tick) {
            if reporting.cancel.is_some_and(|c| c.load(Relaxed)) && !stop.swap(true, Relaxed) {
                writer.abort();
            }
            if let Some(progress) = reporting.progress {
                if last.elapsed() >= reporting.interval {
                    last = Instant::now();
                    progress(counters.done.load(Relaxed).min(total), total);
                }
            }
        }
        handle.join().unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "an export thread panicked")))
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    if result.is_err() && reporting.cancel.is_some_and(|c| c.load(Relaxed)) {
        return Err(Error::new(ErrorKind::Cancelled, "the export was cancelled"));
    }
    result?;
    if let Some(progress) = reporting.progress {
        progress(total, total);
    }
    Ok(())
}

/// Read one item and hand it to the writer.
fn run_item(
    image: &Image,
    writer: &dyn FormatWriter,
    turn: Option<&Mutex<()>>,
    item: WorkItem,
    buf: &mut Vec<u8>,
    scratch: &mut ReadScratch,
    counters: &Counters,
) -> Result<()> {
    match item {
        WorkItem::Zero { start, len } => {
            writer.zero(start, len)?;
            counters.done.fetch_add(len, Relaxed);
        }
        WorkItem::Data { start, len, pieces } => {
            let n = usize::try_from(len).map_err(|_| Error::invalid("work item too large"))?;
            // Every byte is written below: the pieces are read in place and only what they do
            // not cover (past the image's end) is zeroed, so the buffer is never cleared first.
            buf.resize(n, 0);
            let mut covered = 0;
            for piece in &pieces {
                let from = usize::try_from(piece.start - start).unwrap_or(0).min(n);
                let to = usize::try_from(piece.end() - start).unwrap_or(n).clamp(from, n);
                buf[covered.min(from)..from].fill(0);
                image.read_extent(piece, &mut buf[from..to], scratch)?;
                covered = covered.max(to);
            }
            buf[covered..].fill(0);
            match turn {
                // One pwrite into the output at a time (see `execute`).
                Some(turn) => {
                    let _turn = super::writer::lock(turn);
                    writer.write(start, buf)?;
                }
                None => writer.write(start, buf)?,
            }
            counters.written.fetch_add(len, Relaxed);
            counters.done.fetch_add(len, Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::{ExtentKind, FileId, Location};
    use proptest::prelude::*;

    fn data(start: u64, len: u64) -> Extent {
        Extent::new(
            start,
            len,
            ExtentKind::Data { layer: 0, location: Location::File { file: FileId(0), offset: start } },
        )
    }

    fn zero(start: u64, len: u64) -> Extent {
        Extent::new(start, len, ExtentKind::Unallocated)
    }

    #[test]
    fn option_pairs_split_like_qemu() {
        let p = parse_option_pairs("subformat=streamOptimized,adapter_type=lsilogic,,x").unwrap();
        assert_eq!(
            p,
            vec![
                ("subformat".to_string(), "streamOptimized".to_string()),
                ("adapter_type".to_string(), "lsilogic,x".to_string())
            ]
        );
        assert!(parse_option_pairs("novalue").is_err());
    }

    #[test]
    fn presets_pick_format_and_let_options_override() {
        let (f, o) = Preset::Oci.resolve(Some(OutputFormat::Qcow2), &[]).unwrap();
        assert_eq!(f, OutputFormat::Qcow2);
        assert_eq!(o, vec![("compat".to_string(), "1.1".to_string())]);
        assert_eq!(Preset::Esxi.resolve(None, &[]).unwrap().0, OutputFormat::Vmdk);
        assert!(Preset::Azure.resolve(Some(OutputFormat::Qcow2), &[]).is_err());
        let (_, o) = Preset::Openstack.resolve(None, &[("compat".into(), "0.10".into())]).unwrap();
        assert_eq!(o.last().unwrap().1, "0.10");
    }

    proptest! {
        /// Aligned items tile the disk in order, each boundary on the item grid, data items
        /// exactly where the extents hold data.
        #[test]
        fn aligned_items_tile_the_disk(lens in prop::collection::vec((1u64..300_000, any::<bool>()), 1..40),
                                       shift in 12u32..18) {
            let item = 1u64 << shift;
            let mut extents = Vec::new();
            let mut pos = 0;
            for (len, is_data) in lens {
                extents.push(if is_data { data(pos, len) } else { zero(pos, len) });
                pos += len;
            }
            let size = pos;
            let items: Vec<WorkItem> =
                AlignedPlanner::new(extents.clone().into_iter().map(Ok), size, item).map(|r| r.unwrap()).collect();
            let mut at = 0;
            for it in &items {
                let (start, len) = match it {
                    WorkItem::Data { start, len, pieces } => {
                        prop_assert!(*len <= item);
                        let mut p = *start;
                        for piece in pieces {
                            prop_assert_eq!(piece.start, p);
                            p = piece.end();
                        }
                        prop_assert_eq!(p, start + len);
                        prop_assert!(pieces.iter().any(|e| e.kind.is_data()));
                        (*start, *len)
                    }
                    WorkItem::Zero { start, len } => {
                        prop_assert!(*len <= MAX_ZERO_ITEM);
                        prop_assert!(extents.iter().all(|e| e.clip(*start, start + len).is_none_or(|c| !c.kind.is_data())));
                        (*start, *len)
                    }
                };
                prop_assert_eq!(start, at);
                prop_assert_eq!(start % item, 0);
                prop_assert!((start + len) % item == 0 || start + len == size);
                at += len;
            }
            prop_assert_eq!(at, size);
        }
    }
}
