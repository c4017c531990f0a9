"""Import a user-uploaded VM image onto a block volume, with vdisk instead of qemu-img.

The image steps of the reference pipeline, as an Airflow 3 TaskFlow DAG:

1. ``inspect_image``  detect the format from the content and read the virtual size
   (was ``qemu-img info --output json``);
2. ``volume_size``    the volume to provision: the virtual size rounded up to whole GiB;
3. ``convert``        write the guest content onto the target device, with progress in the task
   log (was ``qemu-img convert -f FMT -O host_device``);
4. ``verify``         compare a SHA-256 of the device's first ``virtual_size`` bytes with the image's
   content, and run ``e2fsck -fn`` when the disk holds an ext4 file system (was ``fsck -n``).

Creating the instance and creating/attaching the volume are the cloud steps around these and are
out of scope: the attached device is the ``device`` parameter. Trigger with, for example::

    airflow dags trigger vdisk_image_import \\
        --conf '{"image": "/data/upload/image.source", "device": "/dev/oracleoci/oraclevdb"}'
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import subprocess
import time
from typing import Any

import vdisk
from airflow.sdk import Param, dag, task

log = logging.getLogger(__name__)

GIB = 1 << 30
#: Bytes read at a time while verifying: large enough for sequential speed, small for memory.
VERIFY_CHUNK = 8 << 20
#: A progress line at least this often (seconds) while a conversion runs...
PROGRESS_EVERY_SECONDS = 10.0
#: ...and whenever this many more percent are done.
PROGRESS_EVERY_PERCENT = 10.0
#: ext4 (and ext2/3) superblock magic, little-endian at byte 1024 + 0x38 of the file system.
EXT_MAGIC_OFFSET = 1024 + 0x38
EXT_MAGIC = b"\x53\xef"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressLog:
    """A ``progress(done, total)`` callback for :func:`vdisk.convert` that writes throttled lines
    to the task log: the first call, then every ``PROGRESS_EVERY_PERCENT`` percent or
    ``PROGRESS_EVERY_SECONDS`` seconds, and the end."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.start = time.monotonic()
        self.last_time: float | None = None
        self.last_percent = 0.0
        self.lines = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        percent = 100.0 if total == 0 else done * 100.0 / total
        due = (
            self.last_time is None
            or done >= total
            or percent - self.last_percent >= PROGRESS_EVERY_PERCENT
            or now - self.last_time >= PROGRESS_EVERY_SECONDS
        )
        if not due:
            return
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        eta = f", ETA {int((total - done) / rate)} s" if 0 < rate and done < total else ""
        self.logger.info(
            "vdisk progress: %s of %s (%.1f%%), %s/s%s",
            _human(done),
            _human(total),
            percent,
            _human(rate),
            eta,
        )
        self.last_time = now
        self.last_percent = percent
        self.lines += 1


def _device_size(path: str) -> int:
    """Size in bytes of a block device or file."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


@dag(
    dag_id="vdisk_image_import",
    schedule=None,
    catchup=False,
    tags=["vdisk", "image-import"],
    doc_md=__doc__,
    params={
        "image": Param("/data/upload/image.source", type="string", description="The uploaded image file."),
        "device": Param(
            "/dev/oracleoci/oraclevdb", type="string", description="The attached volume to write the disk onto."
        ),
        "format": Param(
            None,
            type=["null", "string"],
            enum=[None, "raw", "qcow2", "vmdk", "vpc", "vhd", "vhdx"],
            description="Source format; detected from the content when null.",
        ),
        "references": Param(
            "deny",
            type="string",
            enum=["deny", "same-dir", "any"],
            description="Which files the image may make vdisk open (backing files, extents, parents).",
        ),
        "require_block_device": Param(True, type="boolean", description="Refuse a target that is not a device."),
        "target_is_zero": Param(False, type="boolean", description="The volume is new and reads as zeros."),
        "min_volume_gb": Param(1, type="integer", minimum=1, description="Smallest volume to provision."),
        "verify": Param(True, type="boolean", description="Hash-compare the device with the image, fsck ext4."),
    },
)
def vdisk_image_import() -> None:
    """Inspect, size, convert and verify one uploaded image."""

    @task
    def inspect_image(**context: Any) -> dict[str, Any]:
        """Detect the format and read the virtual size (``qemu-img info``'s job)."""
        params = context["params"]
        with vdisk.open(params["image"], format=params["format"], references=params["references"]) as img:
            info = img.info()
            result = {"image": params["image"], "format": img.format, "virtual_size": img.virtual_size}
        log.info("image %s: format %s, virtual size %d bytes", params["image"], result["format"], result["virtual_size"])
        if info.get("backing-filename"):
            log.info("backing file: %s", info["backing-filename"])
        return result

    @task
    def volume_size(image: dict[str, Any], **context: Any) -> int:
        """Size of the volume to provision, in GiB: the virtual size rounded up."""
        gib: int = max(int(context["params"]["min_volume_gb"]), math.ceil(int(image["virtual_size"]) / GIB))
        log.info("volume size: %d GiB for %d bytes", gib, image["virtual_size"])
        return gib

    @task
    def convert(image: dict[str, Any], volume_gb: int, **context: Any) -> dict[str, Any]:
        """Write the guest content onto the device, with progress in the task log."""
        params = context["params"]
        device = params["device"]
        size = _device_size(device)
        if size < image["virtual_size"]:
            raise ValueError(f"{device} has {size} bytes, fewer than the image's {image['virtual_size']}")
        if size < volume_gb * GIB:
            log.warning("%s has %d bytes, less than the %d GiB volume computed", device, size, volume_gb)
        log.info("converting %s (%s) onto %s", image["image"], image["format"], device)
        progress = ProgressLog(log)
        report = vdisk.convert(
            image["image"],
            device,
            format=image["format"],
            references=params["references"],
            target_is_zero=params["target_is_zero"],
            require_device=params["require_block_device"],
            must_exist=True,
            progress=progress,
        )
        log.info(
            "converted %d bytes in %.2f s (%d written, %d zeroed, %d threads)",
            report.virtual_size,
            report.seconds,
            report.bytes_written,
            report.bytes_zeroed,
            report.threads,
        )
        return {
            "virtual_size": report.virtual_size,
            "bytes_written": report.bytes_written,
            "bytes_zeroed": report.bytes_zeroed,
            "seconds": report.seconds,
            "progress_lines": progress.lines,
        }

    @task
    def verify(image: dict[str, Any], report: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Compare the device with the image and fsck an ext4 file system (``fsck -n``'s job)."""
        params = context["params"]
        device = params["device"]
        if not params["verify"]:
            log.info("verification skipped")
            return {"verified": False}
        size = image["virtual_size"]
        want = hashlib.sha256()
        got = hashlib.sha256()
        with vdisk.open(image["image"], format=image["format"], references=params["references"]) as img, open(
            device, "rb"
        ) as dev:
            pos = 0
            while pos < size:
                n = min(VERIFY_CHUNK, size - pos)
                want.update(img.read(pos, n))
                chunk = dev.read(n)
                if len(chunk) != n:
                    raise RuntimeError(f"{device}: short read at {pos}")
                got.update(chunk)
                pos += n
            dev.seek(EXT_MAGIC_OFFSET)
            ext = dev.read(len(EXT_MAGIC)) == EXT_MAGIC
        if got.hexdigest() != want.hexdigest():
            raise RuntimeError(f"{device} does not hold the image's content (sha256 {got.hexdigest()})")
        log.info("device content verified: sha256 %s over %d bytes", want.hexdigest(), size)
        fsck = None
        if ext:
            e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
            run = subprocess.run([e2fsck, "-fn", device], capture_output=True, text=True, check=False)
            log.info("e2fsck -fn %s: exit %d\n%s%s", device, run.returncode, run.stdout, run.stderr)
            if run.returncode != 0:
                raise RuntimeError(f"e2fsck -fn {device} found problems (exit {run.returncode})")
            fsck = run.returncode
        else:
            log.info("no ext2/3/4 file system at the start of the disk: fsck skipped")
        return {"verified": True, "sha256": want.hexdigest(), "e2fsck": fsck}

    image = inspect_image()
    gb = volume_size(image)
    report = convert(image, gb)
    verify(image, report)


image_import_dag = vdisk_image_import()
