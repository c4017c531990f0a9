"""Import a user-uploaded VM image onto block volumes, with vdisk instead of qemu-img.

The image steps of the reference pipeline, as an Airflow 3 TaskFlow DAG:

1. ``inspect_image``  detect the format from the content and read the virtual size (was
   ``qemu-img info --output json``); for an OVA archive, list its disks. It returns the list of
   disks to import, one per target volume: one for a disk image, one per disk of an OVA.
2. ``volume_size``    the volume to provision for each disk: its virtual size rounded up to GiB;
3. ``convert``        write each disk's guest content onto its device, with progress in the task
   log, computing the content's blkhash as it writes (was ``qemu-img convert -f FMT -O
   host_device``); a resume journal on the worker lets an Airflow retry continue where a killed
   attempt stopped instead of starting over;
4. ``verify``         compare ``vdisk.checksum`` of each device's first ``virtual_size`` bytes with
   the checksum ``convert`` computed, and run ``e2fsck -fn`` when it holds an ext4 file system
   (was ``fsck -n``).

Failures that a retry cannot fix (an invalid or unsupported image, a reference the policy denies,
a device too small, content that does not verify) raise ``AirflowFailException``, so the task
fails at once instead of using up its retries; I/O errors and kills are retried.

Steps 2 to 4 are mapped over the disk list (dynamic task mapping, ``.expand()``): an OVA of
several disks fans out into one task per disk at each step, so the disks convert in parallel on
the workers.

The upload is read where it lies: ``image`` may be the object's pre-authenticated URL (an OCI
pre-authenticated request, an S3 presigned URL, an Azure SAS or GCS signed URL) instead of a
downloaded file. vdisk fetches only the image's metadata and allocated data with parallel ranged
GETs, pinned to the object's ETag, so there is no download step and no scratch disk. The URL's
secrets (query string, the token of an OCI pre-authenticated URL) never reach the task log or
XCom: tasks show the redacted URL (``...`` in place of the secrets) and read the real one from the
run's ``conf``. Token-authenticated endpoints take ``http_headers``.

Creating the instance and creating/attaching the volumes are the cloud steps around these and
are out of scope: the attached devices are the ``device`` parameter (a disk image or a one-disk
OVA) or the ``devices`` list (an OVA's disks, in order). Trigger with, for example::

    airflow dags trigger vdisk_image_import \\
        --conf '{"image": "/data/upload/image.source", "device": "/dev/oracleoci/oraclevdb"}'
    airflow dags trigger vdisk_image_import \\
        --conf '{"image": "https://objectstorage.example.com/p/TOKEN/n/ns/b/uploads/o/image.source",
                 "device": "/dev/oracleoci/oraclevdb"}'
    airflow dags trigger vdisk_image_import \\
        --conf '{"image": "/data/upload/vm.ova", "devices": ["/dev/oracleoci/oraclevdb", "/dev/oracleoci/oraclevdc"]}'
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import time
from datetime import timedelta
from typing import Any

import vdisk
from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

GIB = 1 << 30
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


#: vdisk's errors that a retry cannot fix: the image, its references, or the target is wrong.
DETERMINISTIC_ERRORS = (
    vdisk.InvalidImageError,
    vdisk.UnsupportedFeatureError,
    vdisk.ReferenceDeniedError,
    vdisk.LimitExceededError,
    vdisk.TargetError,
)


def _source_options(params: dict[str, Any]) -> dict[str, Any]:
    """vdisk keyword arguments that say how to read the image (only the HTTP ones, for a URL)."""
    if not str(params["image"]).startswith(("http://", "https://")):
        return {}
    options: dict[str, Any] = {"http_headers": dict(params.get("http_headers") or {})}
    if params.get("http_connections"):
        options["http_connections"] = int(params["http_connections"])
    return options


def _journal_path(params: dict[str, Any], context: dict[str, Any]) -> str:
    """Where a convert task keeps its resume journal: on the worker, never on the device, one per
    DAG run, task and mapped disk, so every retry of that conversion finds it."""
    ti = context["ti"]
    if params.get("journal"):
        journal = str(params["journal"])
        return journal if ti.map_index in (-1, 0) else f"{journal}.{ti.map_index}"
    directory = params["journal_dir"]
    os.makedirs(directory, exist_ok=True)
    name = f"{ti.dag_id}.{context['run_id']}.{ti.task_id}.{ti.map_index}.journal"
    return os.path.join(directory, re.sub(r"[^A-Za-z0-9._+-]", "_", name))


@dag(
    dag_id="vdisk_image_import",
    schedule=None,
    catchup=False,
    # Retries resume the conversion from its journal; deterministic failures skip them.
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    tags=["vdisk", "image-import"],
    doc_md=__doc__,
    params={
        "image": Param(
            "/data/upload/image.source",
            type="string",
            description="The uploaded image: a file on the worker, or its http(s) (pre-authenticated) URL.",
        ),
        "http_headers": Param(
            {},
            type="object",
            description="Extra HTTP headers for a URL image (e.g. Authorization); never logged.",
        ),
        "http_connections": Param(
            None, type=["null", "integer"], minimum=1, description="Parallel HTTP connections (default: vdisk's)."
        ),
        "device": Param(
            "/dev/oracleoci/oraclevdb", type="string", description="The attached volume to write the disk onto."
        ),
        "devices": Param(
            [],
            type="array",
            items={"type": "string"},
            description="For an OVA: the attached volumes to write its disks onto, in the OVF's order.",
        ),
        "format": Param(
            None,
            type=["null", "string"],
            enum=[None, "raw", "qcow2", "vmdk", "vpc", "vhd", "vhdx", "vdi", "ova"],
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
        "verify": Param(True, type="boolean", description="Compare the device's checksum with the image's, fsck ext4."),
        "journal_dir": Param(
            "/var/tmp/vdisk-journals",
            type="string",
            description="Directory on the worker for resume journals (one per run, task and disk).",
        ),
        "journal": Param(
            None, type=["null", "string"], description="An explicit resume journal path (default: in journal_dir)."
        ),
    },
)
def vdisk_image_import() -> None:
    """Inspect, size, convert and verify one uploaded image, disk by disk."""

    @task
    def inspect_image(**context: Any) -> list[dict[str, Any]]:
        """Detect the format, read the virtual size and list the disks (``qemu-img info``'s job)."""
        params = context["params"]
        image = params["image"]
        try:
            with vdisk.open(
                image, format=params["format"], references=params["references"], **_source_options(params)
            ) as img:
                info = img.info()
                fmt = img.format
        except DETERMINISTIC_ERRORS as e:
            raise AirflowFailException(f"{type(e).__name__}: {e}") from e
        # What tasks log and pass on: the image as vdisk shows it (a URL with its secrets
        # replaced by "..."); the convert task reads the real source from the run's conf.
        image = info["filename"]
        base = {"image": image, "format": fmt, "references": params["references"]}
        if fmt != "ova":
            log.info("image %s: format %s, virtual size %d bytes", image, fmt, info["virtual-size"])
            if info.get("backing-filename"):
                log.info("backing file: %s", info["backing-filename"])
            disk = {"disk": None, "disk_format": fmt, "virtual_size": info["virtual-size"], "device": params["device"]}
            return [base | disk]
        listed = info["format-specific"]["data"]["disks"]
        devices = list(params["devices"]) or ([params["device"]] if len(listed) == 1 else [])
        log.info("image %s: format ova, %d disk%s", image, len(listed), "" if len(listed) == 1 else "s")
        if len(devices) != len(listed):
            raise AirflowFailException(
                f"{image} holds {len(listed)} disks but {len(devices)} devices were given (param devices)"
            )
        disks = []
        for d, device in zip(listed, devices):
            if d.get("error"):
                raise AirflowFailException(f"{image}: disk {d['index']} ({d['file']}) cannot be read: {d['error']}")
            log.info(
                "disk %d: %s, format %s, virtual size %d bytes -> %s",
                d["index"],
                d["file"],
                d["format"],
                d["virtual-size"],
                device,
            )
            disks.append(
                base | {"disk": d["index"], "disk_format": d["format"], "virtual_size": d["virtual-size"], "device": device}
            )
        return disks

    @task
    def volume_size(disk: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Size of the volume to provision, in GiB: the virtual size rounded up."""
        gib: int = max(int(context["params"]["min_volume_gb"]), math.ceil(int(disk["virtual_size"]) / GIB))
        log.info("volume size: %d GiB for %d bytes (%s)", gib, disk["virtual_size"], _label(disk))
        return disk | {"volume_gb": gib}

    @task
    def convert(disk: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Write the disk's guest content onto its device, with progress in the task log; resumable."""
        params = context["params"]
        device = disk["device"]
        size = _device_size(device)
        if size < disk["virtual_size"]:
            raise AirflowFailException(f"{device} has {size} bytes, fewer than the disk's {disk['virtual_size']}")
        if size < disk["volume_gb"] * GIB:
            log.warning("%s has %d bytes, less than the %d GiB volume computed", device, size, disk["volume_gb"])
        journal = _journal_path(params, context)
        log.info("converting %s onto %s, journal %s", _label(disk), device, journal)
        progress = ProgressLog(log)
        options: dict[str, Any] = {
            "format": disk["format"],
            "references": disk["references"],
            "disk": disk["disk"],
            "target_is_zero": params["target_is_zero"],
            "require_device": params["require_block_device"],
            "must_exist": True,
            "progress": progress,
            "checksum": True,
            "journal": journal,
            **_source_options(params),
        }
        try:
            try:
                report = vdisk.convert(params["image"], device, **options)
            except vdisk.JournalError as e:
                # The journal is for another source, target or options (a re-upload, a new
                # volume): start over. An earlier attempt may have written to this device, so it
                # no longer reads as zero whatever target_is_zero said.
                log.warning("%s; converting from the start with zeroing", e)
                report = vdisk.convert(
                    params["image"], device, **{**options, "restart": True, "target_is_zero": False}
                )
        except DETERMINISTIC_ERRORS as e:
            raise AirflowFailException(f"{type(e).__name__}: {e}") from e
        if report.already_complete:
            log.info("the journal records this conversion as complete: nothing written")
        elif report.bytes_skipped:
            log.info("resumed: %d bytes were already written by an earlier attempt", report.bytes_skipped)
        log.info(
            "converted %d bytes in %.2f s (%d written, %d zeroed, %d skipped, %d threads), blkhash %s",
            report.virtual_size,
            report.seconds,
            report.bytes_written,
            report.bytes_zeroed,
            report.bytes_skipped,
            report.threads,
            report.checksum,
        )
        return disk | {
            "bytes_written": report.bytes_written,
            "bytes_zeroed": report.bytes_zeroed,
            "bytes_skipped": report.bytes_skipped,
            "seconds": report.seconds,
            "checksum": report.checksum,
            "progress_lines": progress.lines,
        }

    @task
    def verify(disk: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Check the device holds the disk's content and fsck an ext4 file system (``fsck -n``'s job).

        ``convert`` computed the blkhash of what it wrote; one parallel read of the device's first
        ``virtual_size`` bytes (zero blocks not hashed) must give the same value.
        """
        params = context["params"]
        device = disk["device"]
        if not params["verify"]:
            log.info("verification skipped")
            return {"verified": False}
        size = disk["virtual_size"]
        got = vdisk.checksum(device, format="raw", size=size)
        if got.digest != disk["checksum"]:
            raise AirflowFailException(
                f"{device} does not hold the content of {_label(disk)}: blkhash {got.digest}, expected {disk['checksum']}"
            )
        log.info("device content verified: blkhash %s over %d bytes (%s on %s)", got.digest, size, _label(disk), device)
        with open(device, "rb") as dev:
            dev.seek(EXT_MAGIC_OFFSET)
            ext = dev.read(len(EXT_MAGIC)) == EXT_MAGIC
        fsck = None
        if ext:
            e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
            run = subprocess.run([e2fsck, "-fn", device], capture_output=True, text=True, check=False)
            log.info("e2fsck -fn %s: exit %d\n%s%s", device, run.returncode, run.stdout, run.stderr)
            if run.returncode != 0:
                raise AirflowFailException(f"e2fsck -fn {device} found problems (exit {run.returncode})")
            fsck = run.returncode
        else:
            log.info("no ext2/3/4 file system at the start of %s: fsck skipped", device)
        return {"verified": True, "device": device, "blkhash": got.digest, "e2fsck": fsck}

    disks = inspect_image()
    sized = volume_size.expand(disk=disks)
    converted = convert.expand(disk=sized)
    verify.expand(disk=converted)


def _label(disk: dict[str, Any]) -> str:
    """``image`` or ``image disk N`` for the log."""
    if disk["disk"] is None:
        return f"{disk['image']} ({disk['format']})"
    return f"{disk['image']} disk {disk['disk']} ({disk['disk_format']})"


image_import_dag = vdisk_image_import()
