"""Type stubs of vdisk's native module, re-exported by ``vdisk``."""

import os
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, final

__version__: str
"""The package version and the commit it was built from, e.g. ``0.1.0+g0123456789ab``."""

def cli_main(argv: list[str]) -> int:
    """Run the ``vdisk`` command with ``argv`` (program name first); returns its exit status."""

__all__ = [
    "__version__",
    "cli_main",
    "Checksum",
    "Comparison",
    "ConvertReport",
    "Extent",
    "ExtentIterator",
    "Image",
    "InvalidImageError",
    "JournalError",
    "LimitExceededError",
    "Limits",
    "Measure",
    "ReferenceDeniedError",
    "RemoteError",
    "TargetError",
    "UnsupportedFeatureError",
    "VdiskError",
    "checksum",
    "compare",
    "convert",
    "measure",
    "open",
]

_Path = str | os.PathLike[str]
_Format = Literal["raw", "qcow2", "vmdk", "vpc", "vhd", "vhdx", "vdi", "ova"]
_References = Literal["deny", "same-dir", "same_dir", "any"]
_OutputFormat = Literal["raw", "host_device", "qcow2", "vmdk", "vpc", "vhd", "vhdx"]
_Preset = Literal["azure", "esxi", "hyperv", "oci", "aws", "openstack"]

class VdiskError(Exception):
    """Base class of every error vdisk raises for an image or a target (I/O errors are OSError)."""

class InvalidImageError(VdiskError):
    """The image is corrupt or malformed; the message names the structure and its offset."""

class UnsupportedFeatureError(VdiskError):
    """The image uses a format or feature vdisk does not read; the message names it."""

class ReferenceDeniedError(VdiskError):
    """The image names another file that the reference policy does not allow opening."""

class LimitExceededError(VdiskError):
    """A limit would be exceeded; the message names the limit and how to raise it."""

class TargetError(VdiskError):
    """The conversion target cannot be used: too small, not a block device, or the source itself."""

class JournalError(VdiskError):
    """A resume journal does not match the conversion or is damaged; ``restart=True`` discards it."""

class RemoteError(VdiskError):
    """An http(s) source failed after its retries, ignores Range, or changed during the read."""

    status: int | None
    """The HTTP status the server last answered, or None (a connection failure)."""

@final
class Limits:
    """Bounds on what opening and reading an untrusted image may consume."""

    def __new__(
        cls,
        *,
        max_metadata_bytes: int | None = None,
        max_table_entries: int | None = None,
        max_chain_depth: int | None = None,
        max_virtual_size: int | None = None,
        max_unit_bytes: int | None = None,
    ) -> Limits:
        """Limits with vdisk's defaults, except those given."""
    @property
    def max_metadata_bytes(self) -> int:
        """Bytes of metadata all layers together may hold in memory."""
    @property
    def max_table_entries(self) -> int:
        """Entries in any one table."""
    @property
    def max_chain_depth(self) -> int:
        """Images in a chain (the image itself counts as one)."""
    @property
    def max_virtual_size(self) -> int:
        """Largest virtual disk size accepted, in bytes."""
    @property
    def max_unit_bytes(self) -> int:
        """Largest compressed cluster or grain, and largest single block, held in memory."""
    def __eq__(self, value: object, /) -> bool: ...

@final
class Extent:
    """One range of the virtual disk and what it holds."""

    @property
    def start(self) -> int:
        """First byte, as an offset in the virtual disk."""
    @property
    def length(self) -> int:
        """Length in bytes (never 0)."""
    @property
    def end(self) -> int:
        """One past the last byte (``start + length``)."""
    @property
    def kind(self) -> Literal["data", "zero", "unallocated"]:
        """``"data"``, ``"zero"`` or ``"unallocated"``."""
    @property
    def depth(self) -> int:
        """Layer of the chain the range comes from (0 = the image itself)."""
    @property
    def offset(self) -> int | None:
        """For uncompressed data, the offset of the first byte in the file that stores it."""
    @property
    def compressed(self) -> bool:
        """True when the data is stored compressed."""
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class ExtentIterator(Iterator[Extent]):
    """The lazy iterator returned by :meth:`Image.extents`."""

    def __iter__(self) -> ExtentIterator:
        """Return the iterator itself."""
    def __next__(self) -> Extent:
        """The next extent."""

@final
class Image:
    """An open disk image (any supported format, with its backing chain)."""

    @property
    def format(self) -> str:
        """The image format, as qemu-img names it (``"ova"`` for a disk inside an OVA)."""
    @property
    def disk_format(self) -> str:
        """The format of the disk being read (inside an OVA, the selected disk's)."""
    @property
    def disk(self) -> int | None:
        """Inside an OVA, the selected disk (1-based); ``None`` for other images."""
    @property
    def virtual_size(self) -> int:
        """The guest-visible size of the disk in bytes."""
    @property
    def path(self) -> str:
        """The path the image was opened from."""
    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
    def info(self) -> dict[str, Any]:
        """What ``vdisk info --output json`` prints for this image, as a dict."""
    def extents(self) -> ExtentIterator:
        """A lazy iterator over the extents of the virtual disk."""
    def read(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` guest bytes at ``offset``."""
    def close(self) -> None:
        """Release the image's files."""
    def __enter__(self) -> Image:
        """Return the image itself."""
    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> bool:
        """Close the image."""

@final
class ConvertReport:
    """What :func:`convert` did."""

    @property
    def virtual_size(self) -> int:
        """The virtual size of the image, in bytes."""
    @property
    def bytes_written(self) -> int:
        """Bytes written as data."""
    @property
    def bytes_zeroed(self) -> int:
        """Bytes explicitly zeroed on the target."""
    @property
    def seconds(self) -> float:
        """Wall-clock seconds the conversion took."""
    @property
    def threads(self) -> int:
        """Copy threads used."""
    @property
    def target(self) -> Literal["new-file", "existing-file", "block-device", "null"]:
        """What the target was."""
    @property
    def bytes_skipped(self) -> int:
        """Bytes a resume journal recorded as already written, not written again."""
    @property
    def checksum(self) -> str | None:
        """With ``checksum=True``, the blkhash of the content written; otherwise ``None``."""
    @property
    def already_complete(self) -> bool:
        """The journal recorded the conversion as complete: nothing was written."""
    @property
    def output_length(self) -> int | None:
        """For an image output format, the length of the file written; otherwise ``None``."""

@final
class Measure:
    """What :func:`measure` reports (``qemu-img measure``'s keys)."""

    @property
    def required(self) -> int:
        """Bytes the output file needs for this source."""
    @property
    def fully_allocated(self) -> int:
        """Bytes it needs with every block of the disk allocated."""

@final
class Checksum:
    """A digest of an image's guest content, from :func:`checksum`."""

    @property
    def algorithm(self) -> Literal["blkhash", "sha256"]:
        """``"blkhash"`` (SHA-256 over 64 KiB blocks, as blksum computes it) or ``"sha256"``."""
    @property
    def block_size(self) -> int | None:
        """The blkhash block size (65536), or ``None`` for plain SHA-256."""
    @property
    def virtual_size(self) -> int:
        """Bytes of guest content hashed."""
    @property
    def digest(self) -> str:
        """The digest in lowercase hex."""
    def __eq__(self, value: object, /) -> bool: ...

@final
class Comparison:
    """The result of :func:`compare`."""

    @property
    def identical(self) -> bool:
        """True when the images hold the same guest content."""
    @property
    def difference(self) -> Literal["content", "size", "allocation"] | None:
        """How they differ, or ``None`` when identical."""
    @property
    def offset(self) -> int | None:
        """The exact offset of the first difference (content or allocation), or ``None``."""
    @property
    def size_a(self) -> int:
        """Virtual size of the first image."""
    @property
    def size_b(self) -> int:
        """Virtual size of the second image."""
    @property
    def bytes_read(self) -> int:
        """Bytes read from both images together."""
    @property
    def seconds(self) -> float:
        """Wall-clock seconds."""
    @property
    def messages(self) -> list[str]:
        """What ``qemu-img compare`` prints for this result, one line per item."""
    def __bool__(self) -> bool:
        """True when identical."""

def open(
    path: _Path,
    format: _Format | None = None,
    references: _References = "deny",
    *,
    limits: Limits | None = None,
    disk: int | None = None,
    http_headers: Mapping[str, str] | None = None,
    http_connections: int | None = None,
    http_retries: int | None = None,
    http_timeout: float | None = None,
    url_refresh: Callable[[], str] | None = None,
) -> Image:
    """Open the disk image at ``path``, a file or an ``http(s)://`` URL (``disk`` chooses a disk of an OVA)."""

def convert(
    src: _Path,
    dst: _Path,
    *,
    format: _Format | None = None,
    references: _References = "deny",
    threads: int | None = None,
    target_is_zero: bool = False,
    progress: Callable[[int, int], object] | None = None,
    must_exist: bool = False,
    require_device: bool = False,
    limits: Limits | None = None,
    disk: int | None = None,
    checksum: bool = False,
    journal: _Path | None = None,
    restart: bool = False,
    http_headers: Mapping[str, str] | None = None,
    http_connections: int | None = None,
    http_retries: int | None = None,
    http_timeout: float | None = None,
    url_refresh: Callable[[], str] | None = None,
    output_format: _OutputFormat | None = None,
    options: Mapping[str, str] | None = None,
    compress: bool = False,
    preset: _Preset | None = None,
    round_up_mib: bool = False,
    check_space: bool = True,
) -> ConvertReport:
    """Convert the image at ``src`` to its raw guest content at ``dst``, or export it as an image."""

def measure(
    src: _Path | None = None,
    *,
    output_format: _OutputFormat = "raw",
    options: Mapping[str, str] | None = None,
    preset: _Preset | None = None,
    size: int | None = None,
    format: _Format | None = None,
    references: _References = "deny",
    limits: Limits | None = None,
    disk: int | None = None,
) -> Measure:
    """The size an exported image needs (``qemu-img measure``): for ``src``, or an empty disk of ``size``."""

def checksum(
    path: _Path,
    *,
    format: _Format | None = None,
    algorithm: Literal["blkhash", "sha256"] = "blkhash",
    size: int | None = None,
    references: _References = "deny",
    threads: int | None = None,
    limits: Limits | None = None,
    progress: Callable[[int, int], object] | None = None,
    disk: int | None = None,
    http_headers: Mapping[str, str] | None = None,
    http_connections: int | None = None,
    http_retries: int | None = None,
    http_timeout: float | None = None,
    url_refresh: Callable[[], str] | None = None,
) -> Checksum:
    """The digest of the guest content of the image at ``path``, independent of its format."""

def compare(
    a: _Path,
    b: _Path,
    *,
    format_a: _Format | None = None,
    format_b: _Format | None = None,
    strict: bool = False,
    references: _References = "deny",
    threads: int | None = None,
    limits: Limits | None = None,
    progress: Callable[[int, int], object] | None = None,
    disk_a: int | None = None,
    disk_b: int | None = None,
    http_headers: Mapping[str, str] | None = None,
    http_connections: int | None = None,
    http_retries: int | None = None,
    http_timeout: float | None = None,
) -> Comparison:
    """Compare the guest content of two images (qemu-img compare's semantics)."""
