"""Read and convert qcow2, VMDK, VHD, VHDX, VDI and raw disk images, and the disks of OVA archives.

A drop-in for ``qemu-img info`` and ``qemu-img convert -O raw`` in Python, without qemu::

    import vdisk

    with vdisk.open("upload.img") as img:  # format detected from the content
        print(img.format, img.virtual_size)
    report = vdisk.convert("upload.img", "/dev/vdb", checksum=True, journal="/var/tmp/upload.journal")
    assert vdisk.checksum("/dev/vdb", size=report.virtual_size).digest == report.checksum
    vdisk.convert("/dev/vdb", "export.vmdk", preset="esxi")  # streamOptimized VMDK

Long calls release the GIL; ``progress`` runs on the calling thread; Ctrl-C cancels a
conversion. Errors are :class:`VdiskError` subclasses, or ``OSError`` subclasses for I/O.
"""

from ._vdisk import (
    Checksum,
    Comparison,
    ConvertReport,
    Extent,
    ExtentIterator,
    Image,
    InvalidImageError,
    JournalError,
    LimitExceededError,
    Limits,
    Measure,
    ReferenceDeniedError,
    RemoteError,
    TargetError,
    UnsupportedFeatureError,
    VdiskError,
    __version__,
    checksum,
    compare,
    convert,
    measure,
    open,
)

__all__ = [
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
    "__version__",
    "checksum",
    "compare",
    "convert",
    "measure",
    "open",
]
