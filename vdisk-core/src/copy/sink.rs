//! Where a conversion writes: a new file, an existing file, a block device, or nowhere.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::{Error, Result};

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 127)`: zero a byte range of a block device (offload where the device can).
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// Sector size that `BLKZEROOUT` ranges must be aligned to.
const SECTOR: u64 = 512;
/// Largest buffer of zeros written when a target cannot zero a range any other way.
const ZERO_BUF_BYTES: usize = 1 << 20;
/// Alignment of offsets, lengths and buffers for `O_DIRECT` writes: 4 KiB satisfies devices
/// with 512-byte and 4096-byte logical blocks alike.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// What kind of target a conversion wrote to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetKind {
    /// A file vdisk created (sparse).
    NewFile,
    /// A regular file that already existed (never truncated).
    ExistingFile,
    /// A block device (never resized).
    BlockDevice,
    /// `/dev/null`: nothing is kept (benchmarks).
    Null,
}

impl TargetKind {
    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::NewFile => "new-file",
            TargetKind::ExistingFile => "existing-file",
            TargetKind::BlockDevice => "block-device",
            TargetKind::Null => "null",
        }
    }
}

/// What identifies an open target (see [`Sink::identity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TargetIdentity {
    /// Device of the file system holding the file (or the device node).
    pub(crate) dev: u64,
    /// Inode of the file (or the device node).
    pub(crate) ino: u64,
    /// For a block device, its device number; 0 otherwise.
    pub(crate) rdev: u64,
    /// Size in bytes.
    pub(crate) size: u64,
    /// The kind of target.
    pub(crate) kind: TargetKind,
}

/// How the caller asked for the target to be treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TargetRequest {
    /// `-n`: the target must already exist.
    pub(crate) must_exist: bool,
    /// `-O host_device`: the target must be a block device.
    pub(crate) require_device: bool,
    /// The target already reads as zero; zero ranges need no work.
    pub(crate) target_is_zero: bool,
    /// Write aligned data with `O_DIRECT` (bypassing the page cache), the rest buffered.
    pub(crate) direct: bool,
}

/// An open target.
#[derive(Debug)]
pub(crate) struct Sink {
    file: Option<File>,
    /// A second descriptor on the same target opened with `O_DIRECT`, for aligned writes.
    direct: Option<File>,
    kind: TargetKind,
    /// Zero ranges must be written (an existing target not known to be zero).
    zero_needed: bool,
    /// Punching holes works on this target (cleared after the first refusal).
    can_punch: std::sync::atomic::AtomicBool,
    /// `BLKZEROOUT` works on this device (cleared after the first refusal).
    can_zeroout: std::sync::atomic::AtomicBool,
    /// Starts writeback of a block device as the copy goes.
    writeback: Writeback,
}

/// Open `path` as the target for `size` bytes, refusing it when it is one of `sources`
/// ((device, inode) pairs), too small, or of the wrong kind.
pub(crate) fn open_target(path: &Path, size: u64, sources: &[(u64, u64)], req: TargetRequest) -> Result<Sink> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("cannot open target {shown}"), e)),
    };
    let Some(meta) = meta else {
        if req.must_exist {
            return Err(Error::target(format!("target {shown} does not exist (-n uses an existing target)")));
        }
        if req.require_device {
            return Err(Error::target(format!("target {shown} does not exist; host_device needs a block device")));
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create target {shown}"), e))?;
        file.set_len(size).map_err(|e| Error::io(format!("cannot set the size of {shown}"), e))?;
        return Sink::new(Some(file), TargetKind::NewFile, false).with_direct(path, req.direct);
    };
    if sources.contains(&(meta.dev(), meta.ino())) {
        return Err(Error::target(format!("target {shown} is the source image (or one of its files)")));
    }
    let ft = meta.file_type();
    if ft.is_char_device() && path == Path::new("/dev/null") {
        return Ok(Sink::new(None, TargetKind::Null, false));
    }
    if ft.is_block_device() {
        let file = OpenOptions::new().write(true).custom_flags(libc::O_EXCL).open(path).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EBUSY) => {
                    Error::target(format!("target {shown} is in use (mounted or held open exclusively)"))
                }
                _ => Error::io(format!("cannot open target {shown}"), e),
            }
        })?;
        let dev_size =
            block_device_size(&file).map_err(|e| Error::io(format!("cannot read the size of {shown}"), e))?;
        if dev_size < size {
            return Err(Error::target(format!(
                "target {shown} holds {dev_size} bytes, less than the virtual size {size}; vdisk never resizes a device"
            )));
        }
        return Sink::new(Some(file), TargetKind::BlockDevice, !req.target_is_zero).with_direct(path, req.direct);
    }
    if req.require_device {
        return Err(Error::target(format!("target {shown} is not a block device (host_device needs one)")));
    }
    if !ft.is_file() {
        return Err(Error::target(format!("target {shown} is neither a regular file nor a block device")));
    }
    if meta.len() < size {
        return Err(Error::target(format!(
            "target {shown} is {} bytes, smaller than the virtual size {size}; vdisk never resizes an existing target (remove it to create a new one)",
            meta.len()
        )));
    }
    let file =
        OpenOptions::new().write(true).open(path).map_err(|e| Error::io(format!("cannot open target {shown}"), e))?;
    Sink::new(Some(file), TargetKind::ExistingFile, !req.target_is_zero).with_direct(path, req.direct)
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl Sink {
    fn new(file: Option<File>, kind: TargetKind, zero_needed: bool) -> Self {
        Sink {
            file,
            direct: None,
            kind,
            zero_needed,
            can_punch: true.into(),
            can_zeroout: true.into(),
            writeback: Writeback::default(),
        }
    }

    /// Open the `O_DIRECT` descriptor when asked to.
    fn with_direct(mut self, path: &Path, direct: bool) -> Result<Self> {
        if direct {
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(|e| Error::io(format!("cannot open {} for direct I/O (-t none)", path.display()), e))?;
            self.direct = Some(file);
        }
        Ok(self)
    }

    /// The kind of target.
    pub(crate) fn kind(&self) -> TargetKind {
        self.kind
    }

    /// Whether zero ranges must be written to make them read as zero.
    pub(crate) fn zero_needed(&self) -> bool {
        self.zero_needed
    }

    /// Write `buf` at `offset`.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned = |n: u64| n % DIRECT_ALIGN as u64 == 0;
        match (&self.direct, &self.file) {
            (Some(d), _)
                if aligned(offset) && aligned(buf.len() as u64) && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0 =>
            {
                d.write_all_at(buf, offset)
            }
            (_, Some(f)) => write_all_at(f, buf, offset),
            _ => Ok(()),
        }
    }

    /// Make `offset..offset + len` read as zero.
    pub(crate) fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            TargetKind::ExistingFile | TargetKind::NewFile if self.can_punch.load(Relaxed) => {
                let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                };
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fallocate on an owned descriptor with in-range arguments; no memory is passed.
                if unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) } == 0 {
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if !matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)) {
                    return Err(err);
                }
                self.can_punch.store(false, Relaxed);
            }
            TargetKind::BlockDevice if self.can_zeroout.load(Relaxed) => {
                // The sector-aligned middle goes to BLKZEROOUT; unaligned edges are written.
                let first = offset.div_ceil(SECTOR) * SECTOR;
                let last = (offset + len) / SECTOR * SECTOR;
                if first < last {
                    let range: [u64; 2] = [first, last - first];
                    // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, a live local.
                    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
                    if r == 0 {
                        write_zeros(file, offset, first - offset)?;
                        return write_zeros(file, last, offset + len - last);
                    }
                    let err = io::Error::last_os_error();
                    if !matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)) {
                        return Err(err);
                    }
                    self.can_zeroout.store(false, Relaxed);
                }
            }
            _ => {}
        }
        write_zeros(file, offset, len)
    }

    /// `written` bytes have been written so far: start writing them to the device now and then.
    /// Only a device is synced at the end (`finish`); a file is left to the page cache, as
    /// qemu-img leaves it, and writing it out early would only add disk traffic.
    pub(crate) fn written(&self, written: u64) {
        if let (Some(file), TargetKind::BlockDevice) = (&self.file, self.kind) {
            self.writeback.poll(file, written);
        }
    }

    /// Make everything written so far durable (`fdatasync`), whatever the kind of target: a
    /// resume journal records work only after this returns.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// What identifies the target, for a resume journal: `None` for `/dev/null`.
    pub(crate) fn identity(&self) -> io::Result<Option<TargetIdentity>> {
        let Some(file) = &self.file else { return Ok(None) };
        let meta = file.metadata()?;
        let size = if self.kind == TargetKind::BlockDevice { block_device_size(file)? } else { meta.len() };
        Ok(Some(TargetIdentity { dev: meta.dev(), ino: meta.ino(), rdev: meta.rdev(), size, kind: self.kind }))
    }

    /// Flush what was written: devices are synced (the volume is detached next); files are left
    /// to the page cache, as qemu-img does.
    pub(crate) fn finish(&self) -> io::Result<()> {
        match (&self.file, self.kind) {
            (Some(f), TargetKind::BlockDevice) => f.sync_all(),
            // Direct writes bypassed the cache but may have allocated blocks: make it durable too.
            (Some(f), _) if self.direct.is_some() => f.sync_all(),
            _ => Ok(()),
        }
    }
}

/// Starts the kernel writing a file's dirty pages to disk every [`WRITEBACK_STEP`] bytes written
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for the disk), so the disk
/// writes while the copy reads, decompresses or compresses, and the final sync waits only for
/// the tail instead of for everything.
#[derive(Debug, Default)]
pub(crate) struct Writeback {
    /// Bytes written when writeback was last started.
    last: AtomicU64,
}

/// Bytes written between two starts of writeback.
const WRITEBACK_STEP: u64 = 32 << 20;

impl Writeback {
    /// `written` bytes have been written to `file` so far (by every thread together).
    pub(crate) fn poll(&self, file: &File, written: u64) {
        let last = self.last.load(Relaxed);
        if written < last.saturating_add(WRITEBACK_STEP)
            || self.last.compare_exchange(last, written, Relaxed, Relaxed).is_err()
        {
            return;
        }
        // SAFETY: a system call on an open descriptor, with no memory passed. A failure (a file
        // system that does not support it) only means writeback starts at the final sync.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

/// Most bytes one buffered `pwrite` carries. The kernel sizes the page-cache folios it allocates
/// for a write by the write's length: a 4 MiB write takes 2 MiB folios, which the page allocator
/// serves from its highest-order free blocks. On a VM whose balloon reports free memory to the
/// host (free page reporting hands back blocks of 2 MiB and up), those are the blocks the host has
/// reclaimed, and touching them costs a host fault per page: writes of 4 MiB then took 0.25-0.68 s
/// for 0.5 GiB where writes of 1 MiB took 0.23-0.31 s (eight runs each, after a run of another
/// program; benches/RESULTS.md, "Export"). Below 2 MiB the folios come from the smaller, recently
/// used free blocks.
const WRITE_PIECE: usize = 1 << 20;

/// `write_all_at` in pieces of at most [`WRITE_PIECE`] bytes.
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    for (i, piece) in buf.chunks(WRITE_PIECE).enumerate() {
        file.write_all_at(piece, offset + (i * WRITE_PIECE) as u64)?;
    }
    Ok(())
}

pub(crate) fn write_zeros(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; ZERO_BUF_BYTES.min(usize::try_from(len).unwrap_or(ZERO_BUF_BYTES))];
    while len > 0 {
        let n = zeros.len().min(usize::try_from(len).unwrap_or(zeros.len()));
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}
